"""The node-side SQL every analysis kind shares: the cohort-entry rows, strata, design tables.

The SQL text here is fixed by the code; study values (cohort ids and names, age bands, windows)
reach DuckDB only as bound parameters, and the strata a study may ask for are a closed list of
column names (``STRATA``), so no text from a study ever becomes SQL text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl

from studies.analyses.spec_fields import DEFAULT_AGE_GROUPS, STRATA, age_label
from studies.analysis import CdmContext
from studies.results import SEP
from studies.statistics import make_statistics


def cohort_id(cdm: CdmContext, name: str) -> int:
    """The node's cohort_definition_id of a study cohort, or a clear error naming it."""
    return _study_id(cdm.cohort_ids, name, "cohort")


def codeset_id(cdm: CdmContext, name: str) -> int:
    """The node's codeset id of a study concept set, or a clear error naming it."""
    return _study_id(cdm.concept_sets, name, "concept set")


def _study_id(ids: dict[str, int], name: str, what: str) -> int:
    """``ids[name]``, or a ``KeyError`` naming the study's ``what``s instead of a bare key."""
    try:
        return ids[name]
    except KeyError:
        raise KeyError(f"{what} {name!r} is not among the study's {what}s {sorted(ids)}") from None


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
    """Run fixed SQL text with bound parameters and return a polars frame.

    Through the Arrow C stream (``__arrow_c_stream__``), not ``.pl()``: the same frame, but
    ``.pl()`` imports pyarrow (about 40 MB resident) into every node process for nothing.
    """
    return pl.DataFrame(con.sql(sql, params=params))


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
