"""``counts``: persons and records per cohort, overall and by sex, age group and calendar year.

The feasibility question of every study ("how many, where?"), answered exactly: each node counts
cohort entries (records) and distinct persons (subjects) per stratum, and the pooled count is the
sum over nodes (persons never appear at two nodes).

Study entry::

    - id: feasibility
      kind: counts
      cohorts: [celecoxib, diclofenac]
      strata: [sex, age_group, calendar_year, [sex, age_group]]
      age_groups: [[0, 17], [18, 64], [65, 150]]

summarised_result (result_type ``counts``): group ``cohort_name``/<cohort>, strata as requested
(``overall``, ``sex``, ``age_group``, ``calendar_year`` or combinations joined by `` &&& ``),
``variable_name`` ``"Number records"`` and ``"Number subjects"``, ``estimate_name`` ``count``
(integer), ``additional_*`` ``overall``. A count suppressed at some node sums the releasing nodes
and is flagged by ``nodes_contributing``/``nodes_withheld`` rows (``pooling.partial_pool_rows``).
Record counts carry ``upper = inf`` (a person may have any number of cohort entries), so a DP
release withholds them and noises the subject counts only.
"""

from __future__ import annotations

import polars as pl

from studies.analyses import node_sql, pooling
from studies.analyses.spec_fields import (
    RECORDS_PER_PERSON,
    normalise_strata,
    strata_rows_per_person,
)
from studies.analyses.specs import CountsSpec
from studies.analysis import CdmContext, CombineInput, Finished, ReleaseProfile
from studies.registry import register
from studies.results import estimates
from studies.statistics import make_statistics

VARIABLES = {"records": "Number records", "subjects": "Number subjects"}


def count_entries(
    cdm: CdmContext, cohorts: list[str], strata: list[tuple[str, ...]], age_groups: list
) -> pl.DataFrame:
    """Records and subjects per cohort and stratum on one node (long statistics rows).

    Every requested cohort gets an overall row, with zeros when it is empty on this node.
    """
    grouping = node_sql.grouping_sets(["cohort_name"], strata)
    sql = f"""
        WITH {node_sql.ENTRIES_CTE}
        SELECT cohort_name, {grouping.select},
               count(*) AS records, count(DISTINCT subject_id) AS subjects
        FROM entries GROUP BY {grouping.clause}
    """
    grouped = node_sql.strata_columns(
        node_sql.query(cdm.con, sql, node_sql.entries_params(cdm, cohorts, age_groups)), grouping
    )
    empty = pl.DataFrame(
        {"cohort_name": cohorts, "records": 0, "subjects": 0, "strata_name": "overall"},
        schema_overrides={"records": pl.Int64, "subjects": pl.Int64},
    ).with_columns(pl.lit("overall").alias("strata_level"))
    missing = empty.join(grouped, on=["cohort_name", "strata_name"], how="anti")
    grouped = pl.concat([grouped, missing.select(grouped.columns)], how="vertical_relaxed")
    return grouped.unpivot(
        index=["cohort_name", "strata_name", "strata_level"],
        on=list(VARIABLES),
        variable_name="measure",
        value_name="value",
    ).select(
        pl.col("cohort_name").alias("cohort"),
        "strata_name",
        "strata_level",
        pl.col("measure").replace_strict(VARIABLES).alias("variable_name"),
        pl.lit("count").alias("estimate_name"),
        pl.lit("count").alias("release_class"),
        pl.col("value").cast(pl.Float64),
        pl.when(pl.col("measure") == "records").then(RECORDS_PER_PERSON).alias("upper"),
    )


@register
class Counts:
    """Persons and records per cohort and stratum, pooled by summation."""

    kind = "counts"
    Spec = CountsSpec

    def profile(self, spec: CountsSpec) -> ReleaseProfile:
        """Subject rows a person's entries fall in, per cohort (record rows are unbounded)."""
        cells = strata_rows_per_person(spec.strata, spec.age_groups, per_entry=True)
        return ReleaseProfile(rows_per_person=None if cells is None else len(spec.cohorts) * cells)

    def local(self, cdm: CdmContext, spec: CountsSpec, state: dict | None) -> pl.DataFrame:
        rows = count_entries(cdm, spec.cohorts, normalise_strata(spec.strata), spec.age_groups)
        return make_statistics(rows)

    def combine(self, inputs: CombineInput, spec: CountsSpec, state: dict | None) -> Finished:
        raw = pooling.pool(inputs)
        # estimate_name is the pool's, not a key: estimates() writes the result's own
        pooled = raw.drop("estimate_name").rename({"cohort": "group_level", "value": "count"})
        result = estimates(pooled, {"count": "integer"}, group_name="cohort_name")
        flags = pooling.partial_pool_rows(
            raw,
            group_name="cohort_name",
            group_level=pl.col("cohort"),
            variable_name=pl.col("variable_name"),
            variable_level=pl.col("variable_level"),
        )
        return Finished(pl.concat([result, flags], how="vertical"))
