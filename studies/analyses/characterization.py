"""``characterization``: who is in a cohort — demographics and the most frequent concepts before
entry — and, for two cohorts, standardized mean differences (SMD) between them.

Each node returns, per cohort entry set: numbers of records and subjects; counts by sex and age
group; for age at entry and prior/future observation days the count, sum and sum of squares
(so mean and SD pool exactly); and, for every concept of the requested domains recorded in the
window before entry, the number of entries with it. The top-N concepts are the union's, chosen in
two rounds: in round 0 each node releases the concepts whose counts pass its gate (a withheld
one leaves no key, ``studies.statistics``); ``combine`` ranks them by the released counts into
one key list per cohort and domain, which every node derives from the signed round 0; in round 1
every node answers for exactly that list (zero where it has none), so each cell pools complete
(or is withheld as a whole) and nothing beyond the N is released.

Study entry::

    - id: baseline
      kind: characterization
      cohorts: [celecoxib, diclofenac]
      window: {start: -365, end: -1}
      domains: [condition, drug, procedure, measurement]
      top_n: 10
      comparison: [celecoxib, diclofenac]

summarised_result (result_type ``characterization``), group ``cohort_name``/<cohort>:
- ``Number records``, ``Number subjects``: ``count``;
- ``Sex`` (levels ``Female``, ``Male``, ``None``) and ``Age group`` (e.g. ``18 to 64``):
  ``count``, ``percentage`` (of records);
- ``Age``, ``Prior observation``, ``Future observation`` (days): ``mean``, ``sd``;
- ``Conditions``, ``Drugs``, ``Procedures``, ``Measurements``: variable_level the concept name,
  ``additional_name`` ``concept_id &&& window``, ``additional_level`` e.g. ``"3001 &&& -365 to -1"``,
  ``count``, ``percentage``; the top ``top_n`` per domain by pooled count.
- With ``comparison: [A, B]``: group ``cohort_name_reference &&& cohort_name_comparator`` /
  ``A &&& B``, the same variable names and levels, ``estimate_name`` ``smd``
  ((A − B) / √((s²_A + s²_B)/2); proportions use s² = p(1 − p)).
- Rows pooled without a node whose gate withheld part of them: ``nodes_contributing`` and
  ``nodes_withheld`` with the row's keys.

Everything here but ``Number subjects`` counts or sums over cohort entries, and one person may
have many entries: those rows carry ``upper = inf``, so a DP release withholds them.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from studies.analyses import node_sql, pooling
from studies.analyses.spec_fields import RECORDS_PER_PERSON
from studies.analyses.specs import DOMAIN_LABELS, CharacterizationSpec
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.registry import register
from studies.results import SEP, estimates
from studies.statistics import GROUP_KEYS, make_statistics

#: Continuous characteristics: SQL expression over ``entries``.
CONTINUOUS = {
    "Age": "age",
    "Prior observation": "date_diff('day', obs_start, cohort_start_date)",
    "Future observation": "date_diff('day', cohort_start_date, obs_end)",
}
CATEGORICAL = {"Sex": "sex", "Age group": "age_group"}

# Events of every domain, from fixed tables and columns; the study only picks domains by name.
EVENTS_SQL = """
events AS (
    SELECT 'Conditions' AS domain, person_id, condition_concept_id AS concept_id,
           condition_start_date AS event_date
    FROM condition_occurrence WHERE list_contains($domains, 'Conditions')
    UNION ALL
    SELECT 'Drugs', person_id, drug_concept_id, drug_exposure_start_date
    FROM drug_exposure WHERE list_contains($domains, 'Drugs')
    UNION ALL
    SELECT 'Procedures', person_id, procedure_concept_id, procedure_date
    FROM procedure_occurrence WHERE list_contains($domains, 'Procedures')
    UNION ALL
    SELECT 'Measurements', person_id, measurement_concept_id, measurement_date
    FROM measurement WHERE list_contains($domains, 'Measurements')
)
"""


def _demographics(cdm: CdmContext, spec: CharacterizationSpec) -> pl.DataFrame:
    """Counts, categorical counts and continuous count/sum/sum of squares per cohort.

    One statement, so DuckDB builds the cohort entries once for all three parts.
    """
    continuous = ", ".join(
        f'CAST(count({expr}) AS DOUBLE) AS "{name}|count", '
        f'CAST(coalesce(sum({expr}), 0) AS DOUBLE) AS "{name}|sum", '
        f'CAST(coalesce(sum(({expr}) * ({expr})), 0) AS DOUBLE) AS "{name}|sum_squares"'
        for name, expr in CONTINUOUS.items()
    )
    categorical = " UNION ALL ".join(
        f"SELECT cohort_name, '{name}', {column}, 'count', CAST(count(*) AS DOUBLE) "
        "FROM entries GROUP BY ALL"
        for name, column in CATEGORICAL.items()
    )
    sql = f"""
        WITH {node_sql.ENTRIES_CTE},
        overall AS (
            SELECT sc.cohort_name, CAST(count(e.subject_id) AS DOUBLE) AS "Number records|count",
                   CAST(count(DISTINCT e.subject_id) AS DOUBLE) AS "Number subjects|count",
                   {continuous}
            FROM study_cohorts sc LEFT JOIN entries e USING (cohort_name)
            GROUP BY sc.cohort_name
        ),
        numbers AS (
            UNPIVOT overall ON COLUMNS(* EXCLUDE (cohort_name))
            INTO NAME key VALUE value
        )
        SELECT cohort_name, split_part(key, '|', 1) AS variable_name, '' AS variable_level,
               split_part(key, '|', 2) AS estimate_name, value
        FROM numbers
        UNION ALL {categorical}
    """
    frame = node_sql.query(
        cdm.con, sql, node_sql.entries_params(cdm, spec.cohorts, spec.age_groups)
    )
    is_sum = pl.col("estimate_name").is_in(["sum", "sum_squares"])
    return frame.with_columns(
        pl.when(is_sum).then(pl.lit("sum")).otherwise(pl.lit("count")).alias("release_class"),
        pl.when(is_sum).then(0.0).alias("lower"),
        pl.when(pl.col("variable_name") != "Number subjects")
        .then(RECORDS_PER_PERSON)
        .alias("upper"),
    )


def _concepts(cdm: CdmContext, spec: CharacterizationSpec) -> pl.DataFrame:
    """Entries with each concept in the window, per cohort and domain (all concepts)."""
    sql = f"""
        WITH {node_sql.ENTRIES_CTE}, {EVENTS_SQL},
        hits AS (
            SELECT DISTINCT e.cohort_name, e.subject_id, e.cohort_start_date, ev.domain,
                   ev.concept_id
            FROM entries e JOIN events ev
              ON ev.person_id = e.subject_id
             AND ev.event_date BETWEEN e.cohort_start_date + $w_start
                                   AND e.cohort_start_date + $w_end
            WHERE ev.concept_id <> 0
        ),
        counted AS (
            SELECT cohort_name, domain, concept_id, count(*) AS value FROM hits GROUP BY ALL
        )
        SELECT h.cohort_name, h.domain AS variable_name,
               CAST(h.concept_id AS VARCHAR) || ' ' || coalesce(c.concept_name, '')
                   AS variable_level,
               h.value
        FROM counted h LEFT JOIN concept c ON c.concept_id = h.concept_id
    """
    params = node_sql.entries_params(cdm, spec.cohorts, spec.age_groups) | {
        "domains": [DOMAIN_LABELS[d] for d in spec.domains],
        "w_start": spec.window.start,
        "w_end": spec.window.end,
    }
    return node_sql.query(cdm.con, sql, params).with_columns(
        pl.lit("count").alias("estimate_name"),
        pl.lit("count").alias("release_class"),
        pl.col("value").cast(pl.Float64),
        pl.lit(RECORDS_PER_PERSON).alias("upper"),
    )


KEY_COLUMNS = ["cohort_name", "variable_name", "concept_id", "variable_level"]


def _concept_id() -> pl.Expr:
    """A concept row's id, from its ``variable_level`` (``"<concept_id> <concept name>"``)."""
    return (
        pl.col("variable_level")
        .str.splitn(" ", 2)
        .struct.field("field_0")
        .cast(pl.Int64)
        .alias("concept_id")
    )


def _candidates(inputs: CombineInput, spec: CharacterizationSpec) -> list[list[Any]]:
    """Round 1's key list: per cohort and domain the ``top_n`` concepts by the counts the nodes
    released in round 0 (each node's own passing counts; ties: lower concept id), labelled by
    the first node that named them. Deterministic: the same transcript, the same list."""
    concept = pl.col("variable_name").is_in(list(DOMAIN_LABELS.values()))
    frames = [
        f.filter(concept & pl.col("value").is_finite()).select(
            "cohort", "variable_name", "variable_level", "value"
        )
        for f in inputs.statistics
    ]
    if not frames:
        return []
    released = pl.concat(frames).with_columns(_concept_id())
    ranked = (
        released.group_by(["cohort", "variable_name", "concept_id"], maintain_order=True)
        .agg(pl.col("value").sum(), pl.col("variable_level").first())
        .sort(
            ["cohort", "variable_name", "value", "concept_id"],
            descending=[False, False, True, False],
        )
        .group_by(["cohort", "variable_name"], maintain_order=True)
        .head(spec.top_n)
    )
    return [
        list(row)
        for row in ranked.select(
            "cohort", "variable_name", "concept_id", "variable_level"
        ).iter_rows()
    ]


def _keys(state: dict[str, Any]) -> pl.DataFrame:
    """The key list of a round-1 state as a table (``KEY_COLUMNS``)."""
    schema = dict(zip(KEY_COLUMNS, [pl.String, pl.String, pl.Int64, pl.String], strict=True))
    return pl.DataFrame(state.get("top", []), schema=schema, orient="row")


def _answer_keys(concepts: pl.DataFrame, keys: pl.DataFrame) -> pl.DataFrame:
    """This node's counts for exactly the key list, zero where it has none: complete cells
    every node pools, and nothing beyond the list."""
    ids = concepts.with_columns(_concept_id()).select(
        "cohort_name", "variable_name", "concept_id", "value"
    )
    answered = keys.join(ids, on=["cohort_name", "variable_name", "concept_id"], how="left")
    return answered.select(
        "cohort_name",
        "variable_name",
        "variable_level",
        pl.col("value").fill_null(0.0),
        pl.lit("count").alias("estimate_name"),
        pl.lit("count").alias("release_class"),
        pl.lit(RECORDS_PER_PERSON).alias("upper"),
    )


def _summaries(pooled: pl.DataFrame, spec: CharacterizationSpec) -> pl.DataFrame:
    """One row per cohort × variable × level with count, percentage, mean, sd (where defined)."""
    table = pooled.pivot(
        on="estimate_name", index=["cohort", "variable_name", "variable_level"], values="value"
    )
    for column in ("count", "sum", "sum_squares"):
        if column not in table.columns:
            table = table.with_columns(pl.lit(None, dtype=pl.Float64).alias(column))
    records = table.filter(pl.col("variable_name") == "Number records").select(
        "cohort", pl.col("count").alias("records")
    )
    n, s, ss = pl.col("count"), pl.col("sum"), pl.col("sum_squares")
    return table.join(records, on="cohort", how="left").with_columns(
        (n / pl.col("records") * 100).alias("percentage"),
        (s / n).alias("mean"),
        ((ss - s * s / n) / (n - 1)).sqrt().alias("sd"),
    )


def _top_concepts(summary: pl.DataFrame, spec: CharacterizationSpec) -> pl.DataFrame:
    """The ``top_n`` concepts per cohort and domain by pooled count (ties: lower concept id)."""
    concepts = summary.filter(pl.col("variable_name").is_in(list(DOMAIN_LABELS.values())))
    concepts = concepts.with_columns(_concept_id())
    return (
        concepts.sort(["count", "concept_id"], descending=[True, False], nulls_last=True)
        .group_by(["cohort", "variable_name"], maintain_order=True)
        .head(spec.top_n)
    )


def _smd(summary: pl.DataFrame, spec: CharacterizationSpec, concepts: pl.DataFrame) -> pl.DataFrame:
    """Standardized mean differences between the two comparison cohorts."""
    reference, comparator = spec.comparison
    keys = ["variable_name", "variable_level"]
    shown = concepts.filter(pl.col("cohort").is_in(spec.comparison)).select(keys).unique()
    rows = (
        summary.filter(pl.col("variable_name").is_in(list(CONTINUOUS) + list(CATEGORICAL)))
        .select(keys)
        .unique()
    )
    wanted = pl.concat([rows, shown], how="vertical").unique()

    def side(cohort: str) -> pl.DataFrame:
        part = summary.filter(pl.col("cohort") == cohort)
        records = part.filter(pl.col("variable_name") == "Number records")["count"]
        total = records.item() if records.len() else math.nan
        return (
            wanted.join(part, on=keys, how="left")
            .with_columns(
                pl.when(pl.col("variable_name").is_in(list(CONTINUOUS)))
                .then(pl.col("mean"))
                .otherwise(pl.col("count").fill_null(0) / total)
                .alias("m"),
                pl.when(pl.col("variable_name").is_in(list(CONTINUOUS)))
                .then(pl.col("sd") ** 2)
                .otherwise(
                    (pl.col("count").fill_null(0) / total)
                    * (1 - pl.col("count").fill_null(0) / total)
                )
                .alias("v"),
            )
            .select(*keys, "m", "v")
        )

    both = side(reference).join(side(comparator), on=keys, suffix="_c")
    return both.with_columns(
        ((pl.col("m") - pl.col("m_c")) / ((pl.col("v") + pl.col("v_c")) / 2).sqrt()).alias("smd"),
        pl.lit("cohort_name_reference" + SEP + "cohort_name_comparator").alias("group_name"),
        pl.lit(reference + SEP + comparator).alias("group_level"),
    ).select("group_name", "group_level", *keys, "smd")


def _concept_keys(frame: pl.DataFrame, spec: CharacterizationSpec) -> pl.DataFrame:
    """Concept rows: name as variable_level, ``concept_id &&& window`` as additional columns."""
    is_concept = pl.col("variable_name").is_in(list(DOMAIN_LABELS.values()))
    parts = pl.col("variable_level").str.splitn(" ", 2)
    return frame.with_columns(
        pl.when(is_concept)
        .then(pl.lit("concept_id" + SEP + "window"))
        .otherwise(pl.lit("overall"))
        .alias("additional_name"),
        pl.when(is_concept)
        .then(parts.struct.field("field_0") + SEP + spec.window.label)
        .otherwise(pl.lit("overall"))
        .alias("additional_level"),
        pl.when(is_concept)
        .then(parts.struct.field("field_1"))
        .otherwise(pl.col("variable_level"))
        .alias("variable_level"),
    )


def _partial_flags(
    pooled: pl.DataFrame, concepts: pl.DataFrame, spec: CharacterizationSpec
) -> pl.DataFrame:
    """``nodes_contributing``/``nodes_withheld`` for the shown rows some node withheld."""
    keys = ["cohort", "variable_name", "variable_level"]
    shown = pooled.filter(~pl.col("variable_name").is_in(list(DOMAIN_LABELS.values()))).vstack(
        pooled.join(concepts.select(keys), on=keys, how="semi")
    )
    flags = pooling.partial_pool_rows(
        shown,
        group_level=pl.col("cohort"),
        variable_name=pl.col("variable_name"),
        variable_level=pl.col("variable_level"),
    )
    return _concept_keys(flags, spec).select(flags.columns)


@register
class Characterization:
    """Pooled demographics, federated top-N concepts and SMDs."""

    kind = "characterization"
    Spec = CharacterizationSpec

    def profile(self, spec: CharacterizationSpec) -> ReleaseProfile:
        """Two rounds: concepts found in the data (keyed by the data), then the top-N key list;
        ``Number subjects`` per cohort is the one row of persons (every other row counts or sums
        entries: unbounded)."""
        return ReleaseProfile(
            max_rounds=2,
            rows_per_person=len(spec.cohorts),
            data_keyed=frozenset(DOMAIN_LABELS.values()),
        )

    def local(
        self, cdm: CdmContext, spec: CharacterizationSpec, state: dict | None
    ) -> pl.DataFrame:
        concepts = _concepts(cdm, spec)
        if state is not None:
            concepts = _answer_keys(concepts, _keys(state))
        frame = pl.concat([_demographics(cdm, spec), concepts], how="diagonal_relaxed").rename(
            {"cohort_name": "cohort"}
        )
        # DuckDB's parallel GROUP BY returns groups in any order: sorted, the same request gives
        # the same release bytes (and signed payload hash) in every process (bench/reliability)
        return make_statistics(frame).sort([*GROUP_KEYS, "estimate_name"])

    def combine(
        self, inputs: CombineInput, spec: CharacterizationSpec, state: dict | None
    ) -> Finished | NextRound:
        if state is None:
            return NextRound({"top": _candidates(inputs, spec)})
        pooled = pooling.pool(inputs)
        summary = _summaries(pooled, spec)
        concepts = _top_concepts(summary, spec)
        base = summary.filter(~pl.col("variable_name").is_in(list(DOMAIN_LABELS.values())))
        base = base.with_columns(pl.col("cohort").alias("group_level"))
        parts = [
            estimates(
                base.filter(
                    pl.col("variable_name").is_in(["Number records", "Number subjects"])
                ).select("group_level", "variable_name", "variable_level", "count"),
                {"count": "integer"},
            ),
            estimates(
                base.filter(pl.col("variable_name").is_in(list(CATEGORICAL))).select(
                    "group_level", "variable_name", "variable_level", "count", "percentage"
                ),
                {"count": "integer", "percentage": "percentage"},
            ),
            estimates(
                base.filter(pl.col("variable_name").is_in(list(CONTINUOUS))).select(
                    "group_level", "variable_name", "variable_level", "mean", "sd"
                ),
                {"mean": "numeric", "sd": "numeric"},
            ),
        ]
        if concepts.height:
            parts.append(
                estimates(
                    _concept_keys(
                        concepts.with_columns(pl.col("cohort").alias("group_level")), spec
                    ).select(
                        "group_level",
                        "variable_name",
                        "variable_level",
                        "additional_name",
                        "additional_level",
                        "count",
                        "percentage",
                    ),
                    {"count": "integer", "percentage": "percentage"},
                )
            )
        parts.append(_partial_flags(pooled, concepts, spec))
        result = pl.concat(parts, how="vertical").with_columns(
            pl.lit("cohort_name").alias("group_name")
        )
        if spec.comparison:
            smd = _concept_keys(_smd(summary, spec, concepts), spec)
            smd = estimates(smd.sort("variable_name", "variable_level"), {"smd": "numeric"})
            result = pl.concat([result, smd], how="vertical")
        return Finished(
            result.sort("group_name", "group_level", "variable_name", maintain_order=True)
        )
