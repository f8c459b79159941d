"""Pieces every analysis kind shares: spec fields, the cohort-entry SQL, strata, pooling.

The SQL text here is fixed by the code; study values (cohort ids and names, age bands, windows)
reach DuckDB only as bound parameters, and the strata a study may ask for are a closed list of
column names (``STRATA``), so no text from a study ever becomes SQL text.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import duckdb
import polars as pl
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from scipy import stats

from studies.analysis import CdmContext, CombineInput
from studies.results import SEP, estimates
from studies.statistics import GROUP_KEYS, WITHHELD_KEYS, make_statistics

#: Names a study uses for analyses and cohorts: a letter, then letters, digits, ``_`` or ``-``.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")]
#: Strata every analysis understands; each is a column of the cohort-entry table.
Stratum = Literal["sex", "age_group", "calendar_year"]
STRATA: tuple[str, ...] = ("sex", "age_group", "calendar_year")
#: Bounds of one person's contribution to sums (ages in years, observation in days).
MAX_AGE = 150
MAX_DAYS = 366 * MAX_AGE
#: ``upper`` of a count row that counts records (cohort entries, events) rather than persons:
#: one person may add any number of them, so DP cannot bound their change (see
#: ``studies.statistics``); exact releases are unaffected.
RECORDS_PER_PERSON = math.inf
#: Float64 adds integers exactly, in any order, while every partial sum stays below 2^53.
EXACT_INTEGERS = 2.0**53


class SpecBase(BaseModel):
    """Every analysis entry: an ``id`` unique within the study; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Name

    def cohort_references(self) -> list[tuple[str, str]]:
        """(field path, cohort name) for every cohort this analysis names, nested ones included.

        Fields naming cohorts follow one convention: the name contains ``cohort`` or starts
        with ``outcome``/``target``/``comparator``/``denominator``, or is ``comparison``;
        the study model checks each against its cohorts.
        """
        return _references(self, "", _names_cohort)

    def concept_set_references(self) -> list[tuple[str, str]]:
        """(field path, concept set name) for every ``concept_set`` field (e.g. a covariate's);
        the study model checks each against its concept sets."""
        return _references(self, "", lambda field: field == "concept_set")


COHORT_FIELD_PREFIXES = ("outcome", "target", "comparator", "denominator", "comparison")


def _names_cohort(field: str) -> bool:
    return "cohort" in field or field.startswith(COHORT_FIELD_PREFIXES)


def _references(
    model: BaseModel, prefix: str, names_reference: Callable[[str], bool]
) -> list[tuple[str, str]]:
    """(path, value) of the string fields, through nested models and lists, that
    ``names_reference(field name)`` says name something of the study."""
    refs: list[tuple[str, str]] = []
    for field, value in model:
        path = f"{prefix}{field}"
        values = value if isinstance(value, list | tuple) else [value]
        for i, item in enumerate(values):
            where = f"{path}.{i}" if isinstance(value, list | tuple) else path
            if isinstance(item, BaseModel):
                refs += _references(item, where + ".", names_reference)
            elif isinstance(item, str) and names_reference(field):
                refs.append((where, item))
    return refs


class Window(BaseModel):
    """Days relative to cohort entry (index = day 0); both ends included."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: int = Field(ge=-36600, le=36600)
    end: int = Field(ge=-36600, le=36600)

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.start > self.end:
            raise ValueError(f"window start {self.start} is after its end {self.end}")
        return self

    @property
    def label(self) -> str:
        return f"{self.start} to {self.end}"


AgeBand = tuple[Annotated[int, Field(ge=0, le=MAX_AGE)], Annotated[int, Field(ge=0, le=MAX_AGE)]]
DEFAULT_AGE_GROUPS: list[tuple[int, int]] = [(0, 17), (18, 64), (65, MAX_AGE)]


def check_age_groups(groups: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Age bands must be ordered pairs that do not overlap (a person falls in at most one)."""
    ordered = sorted(groups)
    for lo, hi in ordered:
        if lo > hi:
            raise ValueError(f"age group [{lo}, {hi}]: lower bound above upper bound")
    for (_, hi), (lo, _) in zip(ordered, ordered[1:], strict=False):
        if lo <= hi:
            raise ValueError(f"age groups overlap at age {lo}")
    return ordered


# Spec fields several analysis kinds share: one definition each, so their bounds and defaults
# cannot drift apart between kinds.
#: ``age_groups``: ordered, non-overlapping bands (``check_age_groups``), 0-17, 18-64, 65+ unless set.
AgeGroups = Annotated[
    list[AgeBand],
    AfterValidator(check_age_groups),
    Field(default_factory=lambda: list(DEFAULT_AGE_GROUPS)),
]
#: ``strata``: each a stratum or a combination of strata; none (overall only) unless set.
Strata = Annotated[list[Stratum | list[Stratum]], Field(default_factory=list)]
#: Strata fixed per person rather than per entry (no calendar year).
PersonStratum = Literal["sex", "age_group"]
PersonStrata = Annotated[list[PersonStratum | list[PersonStratum]], Field(default_factory=list)]
#: ``confidence``: level of the reported intervals.
Confidence = Annotated[float, Field(default=0.95, gt=0.5, lt=1)]
#: ``outcome_washout``: days before entry in which an outcome drops the entry (null: any time).
OutcomeWashout = Annotated[int | None, Field(default=None, ge=0, le=36600)]
#: ``follow_up_days``: censoring this many days after entry (null: no limit but the data's).
FollowUpDays = Annotated[int | None, Field(default=None, ge=1, le=36600)]
#: ``time_bin_days``: event and censoring times rounded up to the end of bins this wide (the
#: study declares them; a node refuses bins under its policy's ``min_time_bin_days``, 30 by
#: default, which is also the default width; see ``studies.analyses.time_axis``).
TimeBinDays = Annotated[int, Field(default=30, ge=1, le=3660)]
#: ``max_iterations`` and ``tolerance`` of a federated Newton–Raphson fit (GLM, Cox).
MaxIterations = Annotated[int, Field(default=50, ge=1, le=500)]
Tolerance = Annotated[float, Field(default=1e-10, gt=0, le=1e-4)]


def age_label(band: tuple[int, int]) -> str:
    """``"18 to 64"`` as omopgenerics writes age groups."""
    return f"{band[0]} to {band[1]}"


def normalise_strata(strata: list[Stratum | list[Stratum]]) -> list[tuple[str, ...]]:
    """``["sex", ["sex", "age_group"]]`` -> ``[("sex",), ("sex", "age_group")]``; no repeats."""
    out: list[tuple[str, ...]] = []
    for item in strata:
        combo = (item,) if isinstance(item, str) else tuple(item)
        if len(set(combo)) != len(combo):
            raise ValueError(f"stratum {list(combo)} names a column twice")
        if not combo:
            raise ValueError("a stratum combination must name at least one of " + str(STRATA))
        if combo not in out:
            out.append(combo)
    return out


def strata_rows_per_person(
    strata: list[Stratum | list[Stratum]],
    age_groups: list[tuple[int, int]],
    *,
    per_entry: bool,
) -> int | None:
    """Stratum rows (overall included) one person can fall in, per cohort: the bound behind an
    analysis's ``rows_per_person`` declaration (``studies.analysis.ReleaseProfile``).

    Sex is fixed per person. With ``per_entry`` (strata taken at each cohort entry, as counts
    and incidence do), a person's entries may fall in every age band (and ``None``) and in any
    number of calendar years (None: no bound from the spec); otherwise every stratum is taken
    once per person and each combination gives one row.
    """
    levels = {"sex": 1, "age_group": len(age_groups) + 1 if per_entry else 1}
    total = 1
    for combo in normalise_strata(strata):
        if per_entry and "calendar_year" in combo:
            return None
        total += math.prod(levels.get(stratum, 1) for stratum in combo)
    return total


def cohort_id(cdm: CdmContext, name: str) -> int:
    """The node's cohort_definition_id of a study cohort, or a clear error naming it."""
    try:
        return cdm.cohort_ids[name]
    except KeyError:
        raise KeyError(
            f"cohort {name!r} is not among the study's cohorts {sorted(cdm.cohort_ids)}"
        ) from None


# One row per cohort entry of the requested cohorts, with the person's sex, age at entry in
# completed years (birth date from birth_datetime, else year/month/day of birth), the age band,
# the calendar year of entry and the observation period that holds the entry date.
ENTRIES_CTE = """
study_cohorts AS (
    SELECT unnest($cohort_ids::BIGINT[]) AS cohort_definition_id,
           unnest($cohort_names::VARCHAR[]) AS cohort_name
),
age_bands AS (
    SELECT unnest($age_lo::INTEGER[]) AS age_lo, unnest($age_hi::INTEGER[]) AS age_hi,
           unnest($age_label::VARCHAR[]) AS age_label
),
entries_raw AS (
    SELECT sc.cohort_name, c.subject_id, c.cohort_start_date, c.cohort_end_date,
           CASE p.gender_concept_id WHEN 8507 THEN 'Male' WHEN 8532 THEN 'Female' ELSE 'None' END
               AS sex,
           year(c.cohort_start_date) - coalesce(year(p.birth_datetime), p.year_of_birth)
               - CASE WHEN month(c.cohort_start_date) * 100 + day(c.cohort_start_date)
                           < coalesce(month(p.birth_datetime), p.month_of_birth, 1) * 100
                             + coalesce(day(p.birth_datetime), p.day_of_birth, 1)
                      THEN 1 ELSE 0 END AS age,
           CAST(year(c.cohort_start_date) AS VARCHAR) AS calendar_year,
           op.observation_period_start_date AS obs_start,
           op.observation_period_end_date AS obs_end
    FROM cohort c
    JOIN study_cohorts sc USING (cohort_definition_id)
    JOIN person p ON p.person_id = c.subject_id
    LEFT JOIN observation_period op
      ON op.person_id = c.subject_id
     AND c.cohort_start_date BETWEEN op.observation_period_start_date
                                 AND op.observation_period_end_date
),
entries AS (
    SELECT e.*, coalesce(ab.age_label, 'None') AS age_group
    FROM entries_raw e LEFT JOIN age_bands ab ON e.age BETWEEN ab.age_lo AND ab.age_hi
)
"""


# Completes a SELECT of cohort-entry columns from ``entries e`` (after ENTRIES_CTE), one row per
# entry: the first start of the outcome cohort ($outcome_id) on or after entry (event_date) and
# the last one before entry (prior_date). Entries with an outcome before entry are dropped: any
# time before when $washout is null, else within $washout days before. Incidence and survival
# (and Cox through survival's rows) apply this one rule.
OUTCOME_AFTER_ENTRY = """
           min(o.cohort_start_date) FILTER (o.cohort_start_date >= e.cohort_start_date)
               AS event_date,
           max(o.cohort_start_date) FILTER (o.cohort_start_date < e.cohort_start_date)
               AS prior_date
    FROM entries e
    LEFT JOIN cohort o ON o.cohort_definition_id = $outcome_id AND o.subject_id = e.subject_id
    GROUP BY ALL
    HAVING NOT (prior_date IS NOT NULL AND ($washout::INTEGER IS NULL
                OR date_diff('day', prior_date, e.cohort_start_date) <= $washout::INTEGER))
"""


def entries_params(
    cdm: CdmContext, cohorts: list[str], age_groups: list[tuple[int, int]] | None = None
) -> dict[str, Any]:
    """Bound parameters for ``ENTRIES_CTE``."""
    bands = age_groups if age_groups is not None else DEFAULT_AGE_GROUPS
    return {
        "cohort_ids": [cohort_id(cdm, name) for name in cohorts],
        "cohort_names": list(cohorts),
        "age_lo": [lo for lo, _ in bands],
        "age_hi": [hi for _, hi in bands],
        "age_label": [age_label(b) for b in bands],
    }


def query(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> pl.DataFrame:
    """Run fixed SQL text with bound parameters and return a polars frame."""
    return con.sql(sql, params=params).pl()


#: Temp tables holding an analysis's design rows: the prefix, then hex digits only.
DESIGN_PREFIX = "fedomop_design_"
_DESIGN_NAME = re.compile(rf"^{DESIGN_PREFIX}[0-9a-f]{{16}}_[0-9a-f]{{32}}$")


def design_table(cdm: CdmContext, sql: str, params: dict[str, Any]) -> str:
    """Name of a temp table holding the rows of ``sql`` (fixed SELECT text, bound ``params``),
    built on the first call and reused by later calls on the same connection.

    Multi-round analyses (GLM and Cox Newton–Raphson) read the same design rows (covariates,
    outcome, offset or time) every round and change only the coefficients, so building the rows
    once (correlated subqueries over ``cohort`` and the event tables) leaves each round a scan.
    The name is ``DESIGN_PREFIX`` + a digest of the cohorts' generation + a digest of the SQL
    text and parameters: hex digits only, never study text. Temp tables live and die with the
    connection (a node's gate reopens it when the CDM file is replaced). When the cohorts are
    re-materialised (``materialise_cohorts`` re-creates ``cohort`` and ``study_codeset``, e.g.
    for another study on the gate's connection), the generation changes, so the rows are
    rebuilt and the stale tables dropped. The CDM tables themselves are read-only on a node.
    """
    generation = _cohort_generation(cdm.con)
    digest = hashlib.sha256(json.dumps([sql, params], sort_keys=True, default=str).encode())
    name = f"{DESIGN_PREFIX}{generation}_{digest.hexdigest()[:32]}"
    if not _DESIGN_NAME.match(name):  # the one identifier made here: hex digits only
        raise ValueError(f"bad design table name {name!r}")
    existing = _design_tables(cdm.con)
    if name not in existing:
        for stale in existing:
            if not stale.startswith(f"{DESIGN_PREFIX}{generation}_"):
                cdm.con.execute(f"DROP TABLE IF EXISTS temp.{stale}")
        cdm.con.execute(f"CREATE TEMP TABLE {name} AS {sql}", params)
    return name


def _cohort_generation(con: duckdb.DuckDBPyConnection) -> str:
    """Digest (16 hex digits) of the catalog ids and row counts of the tables a design reads
    that a study writes (``cohort``, ``study_codeset``): materialising the cohorts again
    re-creates them, which gives new catalog ids (DuckDB's ids only grow); the row counts also
    catch rows appended in place."""
    rows = con.execute(
        """SELECT table_name, temporary, table_oid, estimated_size FROM duckdb_tables()
           WHERE table_name IN ('cohort', 'study_codeset')
           ORDER BY table_name, temporary DESC"""
    ).fetchall()
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def _design_tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The design tables on this connection (names matching ``DESIGN_PREFIX`` + hex)."""
    rows = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE temporary AND starts_with(table_name, ?)",
        [DESIGN_PREFIX],
    ).fetchall()
    return [r[0] for r in rows if _DESIGN_NAME.match(r[0])]


@dataclass(frozen=True)
class Grouping:
    """SQL text for grouping by fixed keys plus overall and each strata combination.

    ``select`` lists the strata columns in use and ``grouping_id`` (their ``GROUPING()`` bits),
    ``clause`` is the ``GROUPING SETS`` clause; ``strata_columns`` reads the result back.
    """

    select: str
    clause: str
    combos: tuple[tuple[str, ...], ...]
    used: tuple[str, ...]


def grouping_sets(keys: list[str], strata: list[tuple[str, ...]]) -> Grouping:
    """Grouping over ``keys`` (fixed by the analysis) plus each stratum from ``STRATA``.

    Every name comes from ``keys`` or from the closed list ``STRATA``, never from a study.
    """
    combos: list[tuple[str, ...]] = [(), *strata]
    for combo in combos:
        for col in combo:
            if col not in STRATA:
                raise ValueError(f"unknown stratum {col!r}; allowed {STRATA}")
    used = tuple(col for col in STRATA if any(col in combo for combo in combos))
    select = (
        ", ".join(used) + f", GROUPING({', '.join(used)}) AS grouping_id"
        if used
        else "0 AS grouping_id"
    )
    sets = ", ".join("(" + ", ".join(keys + list(combo)) + ")" for combo in combos)
    return Grouping(select, f"GROUPING SETS ({sets})", tuple(combos), used)


def strata_columns(frame: pl.DataFrame, grouping: Grouping) -> pl.DataFrame:
    """Turn a grouped frame (with ``grouping_id``) into ``strata_name``/``strata_level`` columns.

    Rows come out in a fixed order (sorted within each stratum): DuckDB does not order a
    GROUP BY's output, and a node must give the same answer to the same request.
    """
    used = grouping.used
    parts = []
    frame = frame.sort(frame.columns, nulls_last=True)
    for combo in grouping.combos:
        mask = sum(1 << (len(used) - 1 - i) for i, col in enumerate(used) if col not in combo)
        part = frame.filter(pl.col("grouping_id") == mask)
        if combo:
            level = pl.concat_str([pl.col(c).fill_null("None") for c in combo], separator=SEP)
            name = SEP.join(combo)
        else:
            level, name = pl.lit("overall"), "overall"
        parts.append(
            part.with_columns(pl.lit(name).alias("strata_name"), level.alias("strata_level"))
        )
    return pl.concat(parts, how="vertical").drop(["grouping_id", *used])


def stratum_statistics(
    table: pl.DataFrame,
    kinds: dict[str, str],
    variable_name: pl.Expr,
    variable_level: pl.Expr,
    *bounds: pl.Expr,
    index: tuple[str, ...] = (),
) -> pl.DataFrame:
    """Statistics rows from a table with a row per cohort and stratum (``strata_columns``) and
    a column per estimate: ``kinds`` maps each estimate column to its kind (count, sum);
    ``index`` names further columns the variable expressions read; ``bounds`` are the
    ``lower``/``upper`` expressions (over ``estimate_name``) where the analysis has them."""
    rows = table.unpivot(
        index=["cohort_name", "strata_name", "strata_level", *index],
        on=list(kinds),
        variable_name="estimate_name",
    ).select(
        pl.col("cohort_name").alias("cohort"),
        "strata_name",
        "strata_level",
        variable_name.alias("variable_name"),
        variable_level.alias("variable_level"),
        "estimate_name",
        pl.col("estimate_name").replace_strict(kinds).alias("release_class"),
        pl.col("value").cast(pl.Float64),
        *bounds,
    )
    return make_statistics(rows)


def pool(inputs: CombineInput) -> pl.DataFrame:
    """Sum every count and sum over nodes, per group and estimate: exact for integer counts.

    No partial pools: a group (``GROUP_KEYS``) in which any node's gate suppressed a cell (NaN)
    is withheld in the pool as a whole (``value`` null), since a sum over the other nodes would
    understate the cell and a ratio of such sums mislead; ``withheld`` names the nodes that
    withheld it (``;``-joined, empty when none did) and ``partial_pool_rows`` reports them.
    ``nodes`` says how many nodes released the whole group (a node that sent no row of a group
    has none of it: a declared key it does not hold is zero there).

    Sums use ``math.fsum`` in node order, so a pooled float (GLM/Cox sums) is the correctly
    rounded total and the same in every run, whatever order polars groups rows in.
    """
    schema = {
        **{k: pl.String for k in GROUP_KEYS},
        "estimate_name": pl.String,
        "value": pl.Float64,
        "nodes": pl.UInt32,
        "withheld": pl.String,
    }
    names = node_names(inputs)
    frames = [
        f.with_columns(pl.lit(i).alias("_node"), pl.lit(names[i]).alias("_name"))
        for i, f in enumerate(inputs.statistics)
        if f.height
    ]
    if not frames:
        return pl.DataFrame(schema=schema)
    stacked = pl.concat(frames, how="vertical").with_columns(pl.col("value").fill_nan(None))
    stacked = _absent_keys_withheld(stacked)
    released = stacked.with_columns(
        pl.col("value").is_null().any().over([*GROUP_KEYS, "_node"]).alias("_withheld")
    ).with_columns(
        pl.when(pl.col("_withheld")).then(None).otherwise(pl.col("value")).alias("value")
    )
    summed = (
        released.sort("_node", maintain_order=True)
        .group_by([*GROUP_KEYS, "estimate_name"], maintain_order=True)
        .agg(
            pl.col("value").sum(),
            pl.col("value").drop_nulls().alias("_values"),
            (
                (pl.col("value") != pl.col("value").round()).any()
                | (pl.col("value").abs().sum() >= EXACT_INTEGERS)
            ).alias("_inexact"),
            pl.col("value").count().alias("nodes"),
            pl.col("_name").filter(pl.col("_withheld")).unique(maintain_order=True).alias("_w"),
        )
        .with_row_index("_order")
    )
    # integers whose absolute sum is below 2^53 add exactly in any order; others need fsum
    inexact = summed.filter(pl.col("_inexact")).with_columns(
        pl.col("_values").map_elements(math.fsum, return_dtype=pl.Float64).alias("value")
    )
    return (
        pl.concat([summed.filter(~pl.col("_inexact")), inexact])
        .sort("_order")
        .with_columns(
            pl.when((pl.col("nodes") > 0) & (pl.col("_w").list.len() == 0))
            .then(pl.col("value"))
            .alias("value"),
            pl.col("_w").list.join(";").alias("withheld"),
        )
        .sort([*GROUP_KEYS, "estimate_name"])
        .select(list(schema))
    )


def _absent_keys_withheld(stacked: pl.DataFrame) -> pl.DataFrame:
    """Where a node's gate withheld rows keyed by the data (its ``WITHHELD_KEYS`` marker for a
    cohort and strata), the groups there it did not send may be withheld ones, not zeros: add
    them for that node as withheld (null), so ``pool`` withholds them. Markers go."""
    marker = pl.col("variable_level") == WITHHELD_KEYS
    scope = ["cohort", "strata_name"]
    marks = stacked.filter(marker).select(*scope, "_node", "_name").unique()
    rows = stacked.filter(~marker)
    if marks.is_empty():
        return rows
    groups = rows.select(*scope, *GROUP_KEYS[2:], "estimate_name", "release_class").unique()
    absent = groups.join(marks, on=scope).join(
        rows.select(*GROUP_KEYS, "estimate_name", "_node"),
        on=[*GROUP_KEYS, "estimate_name", "_node"],
        how="anti",
    )
    filler = absent.with_columns(value=pl.lit(None, dtype=pl.Float64))
    return pl.concat([rows, filler], how="diagonal_relaxed")


def node_names(inputs: CombineInput) -> list[str]:
    """The nodes' names, or ``node1``, ``node2``... when the transport gave none."""
    return inputs.node_names or [f"node{i + 1}" for i in range(len(inputs.statistics))]


def partial_pool_rows(pooled: pl.DataFrame, **keys: pl.Expr | str) -> pl.DataFrame:
    """summarised_result rows saying why a pooled group is withheld (see ``pool``).

    For every group that a node sent with part of it withheld by its gate, two estimates:
    ``nodes_contributing`` (integer: nodes that released the whole group) and
    ``nodes_withheld`` (character: the nodes that withheld part of it, ``;``-joined), so a
    reader (and the report) sees why the pooled cell is not shown. ``keys`` map the
    group's statistics columns to the analysis's result columns (``group_level=pl.col("cohort")``
    or a constant text); strata pass through unless given. No rows when every pool is complete.
    """
    partial = (
        pooled.filter(pl.col("withheld") != "")
        .group_by(GROUP_KEYS, maintain_order=True)
        .agg(pl.col("nodes").min().alias("nodes_contributing"), pl.col("withheld").first())
    )
    exprs = {k: pl.lit(v) if isinstance(v, str) else v for k, v in keys.items()}
    exprs = {"strata_name": pl.col("strata_name"), "strata_level": pl.col("strata_level")} | exprs
    table = partial.select(
        *[e.alias(k) for k, e in exprs.items()],
        pl.col("nodes_contributing").cast(pl.Int64),
        pl.col("withheld").alias("nodes_withheld"),
    )
    return estimates(table, {"nodes_contributing": "integer", "nodes_withheld": "character"})


def wide(
    pooled: pl.DataFrame, keys: list[str] | None = None, names: list[str] | None = None
) -> pl.DataFrame:
    """Pooled long statistics -> one row per group with a column per estimate_name.

    ``names`` are the estimates the analysis reads: each becomes a column even when no node
    sent it (an empty cohort, everything withheld), holding null. Groups merged by coarser
    ``keys`` add up, and stay withheld (null) when any of them is: never a sum of the rest.
    """
    index = keys if keys is not None else GROUP_KEYS
    complete = pl.when(pl.element().null_count() > 0).then(None).otherwise(pl.element().sum())
    table = pooled.pivot(
        on="estimate_name", index=index, values="value", aggregate_function=complete
    )
    missing = [n for n in names or [] if n not in table.columns]
    return table.with_columns(pl.lit(None, dtype=pl.Float64).alias(n) for n in missing)


#: ``group_name`` of a ratio of outcome to denominator cohort (incidence, prevalence).
DENOMINATOR_OUTCOME = "denominator_cohort_name" + SEP + "outcome_cohort_name"


def with_zero_overall(
    table: pl.DataFrame, cohort: str, variable_name: str, levels: list[str], names: list[str]
) -> pl.DataFrame:
    """Add overall rows of zeros (``names`` columns) for the ``levels`` (variable_level) at
    which no node had anyone in the denominator ``cohort``, so an empty cohort still reports."""
    present = table.filter(pl.col("strata_name") == "overall")["variable_level"].to_list()
    missing = [level for level in levels if level not in present]
    if not missing:
        return table
    zeros = pl.DataFrame(
        {
            "cohort": cohort,
            "strata_name": "overall",
            "strata_level": "overall",
            "variable_name": variable_name,
            "variable_level": missing,
        }
        | dict.fromkeys(names, 0.0)
    )
    return pl.concat([table, zeros.select(table.columns)], how="vertical_relaxed")


def ratio_estimates(
    table: pl.DataFrame, denominator: dict[str, str], outcome: dict[str, str]
) -> pl.DataFrame:
    """summarised_result rows of a ratio: ``denominator`` columns (name -> estimate_type) under
    variable_name ``Denominator``, then ``outcome`` columns under ``Outcome``; the result
    columns of ``table`` are the keys of both."""
    return pl.concat(
        [
            estimates(table, denominator, variable_name="Denominator"),
            estimates(table, outcome, variable_name="Outcome"),
        ],
        how="vertical",
    )


def z_value(level: float = 0.95) -> float:
    """Two-sided normal quantile for a confidence level (1.959963984540054 for 95 %)."""
    return float(stats.norm.ppf(1 - (1 - level) / 2))


def normal_p_value(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    return float(2 * stats.norm.sf(abs(z))) if math.isfinite(z) else math.nan
