"""``pooled_counts``: persons per cohort and stratum, pooled where no node alone may report them.

Rare-disease teams need totals that no single node could release: each node holds a handful of
patients, below any minimum cell count. In pooled mode (design: "Pooled mode for small numbers")
each node's gate adds its share of discrete Gaussian noise and masks its counts for a secure sum
(``privacy.secagg``), so the coordinator learns only the noisy total; the minimum cell count
then applies to that total, here in ``combine``, not to each node.

Study entry::

    - id: cf_by_sex_age
      kind: pooled_counts
      cohorts: [cystic_fibrosis]
      strata: [sex, age_group, [sex, age_group]]
      age_groups: [[0, 17], [18, 39], [40, 150]]

Study entry option ``threshold: t``: the sum completes when at least t nodes' masked vectors
arrive, so up to n - t nodes may drop after sharing their seeds (default: every node).

The rounds, through the gates (``node.pooled``, protocol in ``privacy.secagg_plus``): round 0
each node publishes two public keys signed by its pooling identity (``value`` rows, nothing from
the data); ``combine`` makes the roster and asks for the ``share`` round (each node checks the
signatures against the permit's ``node_keys`` and the threshold against its policy, then sends
encrypted Shamir shares of its seeds to its peers), then ``masked`` (noisy counts, double
masked: the only round charged), ``consistency`` (each survivor signs who survived) and
``reveal`` (one kind of share per node); ``combine`` rebuilds the self-masks and the dropped
nodes' pairwise masks, checks the sum, suppresses noisy totals below the largest minimum cell
count the nodes announced (zero and negative noisy totals too), and finishes. No complementary
suppression: every total carries its own noise, so a difference of released totals is a noisy
number too, never a person's exact count; and a noisy total of at least the minimum cell count
is never hidden. More dropouts than the threshold allows fail the analysis with a clear reason.
Without gates (``studies.runner.run_local``, the exact reference) the nodes answer round 0 with
their plain counts and ``combine`` sums them.

Counts are of persons at their first entry into the cohort, on a fixed grid (every cohort x
stratum level the study names, zeros too) so that every node's vector has the same rows and a
person touches at most ``1 + len(strata)`` rows per cohort (the declared ``rows_per_person``:
``len(cohorts) * (1 + len(strata))``). Levels the study does not name (an unknown sex, an age
outside every group: the ``None`` levels) are not released: they are noise around zero at best,
and a person without them is still counted in ``overall``. The calendar year (of the first entry:
the year of diagnosis) is a stratum when the study names its years (``years: [2000, 2024]``),
so that its levels are known before any data is read; entries in other years are in
``overall`` only.

summarised_result (result_type ``pooled_counts``): as ``counts``, variable ``Number subjects``,
estimate ``count``; suppressed totals are missing.
"""

from __future__ import annotations

from itertools import product
from typing import Any

import polars as pl

from privacy.secagg import ROW_ORDER
from studies.analyses import node_sql, pooling
from studies.analyses.glm import covariate_columns
from studies.analyses.secure_sum import (
    SumPlan,
    advance,
    count_reader,
    has_protocol_rows,
    protocol_rows,
    unmask_frames,
)
from studies.analyses.spec_fields import age_label, normalise_strata
from studies.analyses.specs import PooledCountsSpec
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.registry import register
from studies.results import SEP, estimates
from studies.statistics import make_statistics

VARIABLE = "Number subjects"
SEXES = ("Female", "Male")
ROUNDS = 5
"""Keys, shares, masked vectors, consistency, reveal (``privacy.secagg_plus``)."""


def grid(spec: PooledCountsSpec) -> pl.DataFrame:
    """Every (cohort, strata_name, strata_level) the analysis reports, from the spec alone:
    only levels the study names (no ``None`` level)."""
    years = range(spec.years[0], spec.years[1] + 1) if spec.years else range(0)
    levels = {
        "sex": list(SEXES),
        "age_group": [age_label(b) for b in spec.age_groups],
        "calendar_year": [str(y) for y in years],
    }
    cells = [("overall", "overall", "")]
    for combo in normalise_strata(spec.strata):
        cells += [(SEP.join(combo), SEP.join(c), "") for c in product(*(levels[s] for s in combo))]
    cells += [("overall", "overall", c.term) for c in spec.characteristics]
    return pl.DataFrame(
        [(c, *cell) for c in spec.cohorts for cell in cells],
        schema=["cohort", "strata_name", "strata_level", "variable_level"],
        orient="row",
    )


FIRST_ENTRIES_CTE = f"""{node_sql.ENTRIES_CTE},
        e AS (
            SELECT * FROM entries
            QUALIFY row_number() OVER (
                PARTITION BY cohort_name, subject_id ORDER BY cohort_start_date) = 1
        )"""
"""Each person's first entry into each cohort (``e``): a person counts once per cohort."""


def first_entry_counts(cdm: CdmContext, spec: PooledCountsSpec) -> pl.DataFrame:
    """Persons per cohort and grid cell on this node, at their first cohort entry (zeros kept)."""
    grouping = node_sql.grouping_sets(["cohort_name"], normalise_strata(spec.strata))
    sql = f"""
        WITH {FIRST_ENTRIES_CTE}
        SELECT cohort_name, {grouping.select}, count(*) AS subjects
        FROM e GROUP BY {grouping.clause}
    """
    params = node_sql.entries_params(cdm, spec.cohorts, spec.age_groups)
    counted = node_sql.strata_columns(node_sql.query(cdm.con, sql, params), grouping).rename(
        {"cohort_name": "cohort"}
    )
    counted = pl.concat(
        [counted.with_columns(variable_level=pl.lit("")), _characteristic_counts(cdm, spec)],
        how="diagonal_relaxed",
    )
    cells = ["cohort", "strata_name", "strata_level", "variable_level"]
    return grid(spec).join(counted.select(*cells, "subjects"), on=cells, how="left")


def _characteristic_counts(cdm: CdmContext, spec: PooledCountsSpec) -> pl.DataFrame:
    """Persons per cohort with each characteristic at their first entry (SQL from the GLM's
    covariates: bound ids and windows, table names from the fixed domain map)."""
    if not spec.characteristics:
        return pl.DataFrame()
    columns, extra, _ = covariate_columns(cdm, spec.characteristics)
    sums = ", ".join(f"sum({col}) AS c{i}" for i, col in enumerate(columns))
    sql = f"""
        WITH {FIRST_ENTRIES_CTE}
        SELECT cohort_name AS cohort, {sums} FROM e GROUP BY cohort_name
    """
    params = node_sql.entries_params(cdm, spec.cohorts, spec.age_groups) | extra
    wide = node_sql.query(cdm.con, sql, params)
    names = {f"c{i}": c.term for i, c in enumerate(spec.characteristics)}
    return (
        wide.rename(names)
        .unpivot(index="cohort", variable_name="variable_level", value_name="subjects")
        .with_columns(strata_name=pl.lit("overall"), strata_level=pl.lit("overall"))
    )


@register
class PooledCounts:
    """Noisy persons per cohort and stratum, summed across nodes by secure aggregation.

    Each node adds a share of discrete Gaussian noise, only the noisy total is seen, and totals
    below the minimum cell count are suppressed. Needs mechanism gaussian and three nodes.
    """

    kind = "pooled_counts"
    Spec = PooledCountsSpec

    def profile(self, spec: PooledCountsSpec) -> ReleaseProfile:
        """Five rounds (keys, shares, masked, consistency, reveal); a person is in ``overall``
        and in at most one level of each stratum, per cohort."""
        per_cohort = 1 + len(normalise_strata(spec.strata)) + len(spec.characteristics)
        rows = len(spec.cohorts) * per_cohort
        # calendar years are the study's own (``years``), never keys found in the data
        return ReleaseProfile(
            max_rounds=ROUNDS, rows_per_person=rows, data_keyed_strata=frozenset(), pooled=True
        )

    def local(self, cdm: CdmContext, spec: PooledCountsSpec, state: dict | None) -> pl.DataFrame:
        counts = first_entry_counts(cdm, spec)
        return make_statistics(
            counts.select(
                "cohort",
                "strata_name",
                "strata_level",
                pl.lit(VARIABLE).alias("variable_name"),
                "variable_level",
                pl.lit("count").alias("estimate_name"),
                pl.lit("count").alias("release_class"),
                pl.col("subjects").fill_null(0).cast(pl.Float64).alias("value"),
            )
        )

    def combine(
        self, inputs: CombineInput, spec: PooledCountsSpec, state: dict | None
    ) -> Finished | NextRound:
        if state is None and not has_protocol_rows(inputs):  # no gates: the exact reference
            plain = dict(zip(pooling.node_names(inputs), inputs.statistics, strict=True))
            return Finished(_result(_exact_total(plain), spec))
        step = advance(inputs, state, sum_plan(spec))
        if isinstance(step, NextRound):
            return step
        total = _total_table(step.values, spec)
        return Finished(_result(suppress_small_totals(total, step.min_cell_count), spec))


def sum_plan(spec: PooledCountsSpec) -> SumPlan:
    """The secure sum of the persons per grid cell (``layout``), in the 48-bit ring."""
    return SumPlan(spec.id, spec.threshold, spec.colluders, count_reader(layout(spec)))


def suppress_small_totals(total: pl.DataFrame, min_cell: int) -> pl.DataFrame:
    """Noisy totals below the minimum cell count go missing, the rest stay, whatever they imply.

    Noise turns small true counts into any small number, zero and negatives included, so all of
    those go. Nothing else does: each total carries its own noise (DP covers every released
    total and their differences), so complementary suppression would only hide totals of at
    least ``min_cell`` (as it did when a near-zero ``None`` level forced it on real levels).
    """
    return total.with_columns(
        value=pl.when(pl.col("value") < min_cell).then(None).otherwise("value")
    )


def unmasked_total(
    frames: dict[str, pl.DataFrame], state: dict[str, Any], spec: PooledCountsSpec
) -> pl.DataFrame:
    """The survivors' noisy total (before suppression) from the ``reveal`` round's shares."""
    protocol = {name: protocol_rows(frame) for name, frame in frames.items()}
    return _total_table(unmask_frames(protocol, state, sum_plan(spec)), spec)


def _total_table(values: list[int], spec: PooledCountsSpec) -> pl.DataFrame:
    return layout(spec).with_columns(
        release_class=pl.lit("count"), value=pl.Series(values, dtype=pl.Float64)
    )


def layout(spec: PooledCountsSpec) -> pl.DataFrame:
    """The rows of every node's vector, in the order every node sorts them (check row aside)."""
    return (
        grid(spec)
        .with_columns(variable_name=pl.lit(VARIABLE), estimate_name=pl.lit("count"))
        .sort([*ROW_ORDER, "estimate_name"])
    )


def _exact_total(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Plain counts summed (reference runs without gates, hence without noise or masks)."""
    keys = [*ROW_ORDER, "estimate_name", "release_class", "lower", "upper"]
    return pl.concat(frames.values()).group_by(keys, maintain_order=True).agg(pl.col("value").sum())


def _result(total: pl.DataFrame, spec: PooledCountsSpec) -> pl.DataFrame:
    table = total.select(
        pl.lit("cohort_name").alias("group_name"),
        pl.col("cohort").alias("group_level"),
        "strata_name",
        "strata_level",
        "variable_name",
        "variable_level",
        pl.col("value").fill_nan(None).alias("count"),
    )
    return estimates(table, {"count": "integer"})
