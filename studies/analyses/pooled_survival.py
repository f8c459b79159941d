"""``pooled_survival``: Kaplan–Meier risk-set tables per declared bin, summed under secure sum.

``survival`` needs each node's own segments to hold 0 or >= k events and censorings, which a
node with three patients never has: it withholds everything. ``pooled_survival`` sums, over the
nodes, each declared bin's events and censorings (``n_event``, ``n_censor`` per target cohort
and bin ``0, w, 2w, ...`` up to ``follow_up_days``) through the dropout-tolerant secure sum
(``studies.analyses.secure_sum``; the gate's side ``node.pooled``, counts in the 48-bit ring),
with a discrete Gaussian noise share per node when the grant is ``gaussian`` (OpenDP), or
exactly under a ``none`` grant. The coordinator sees masked vectors and the (noisy) total only.

Each person counts once per target cohort, at the first entry (a person's time to event is one
cell: one row per person and cohort, the declared ``rows_per_person``). ``combine`` merges the
declared bins into segments whose pooled events and censorings are
each 0 or at least the largest minimum cell count the nodes announced (``time_axis``'s
``segment_ends``, run on the total instead of one node), clamps noisy segment totals at 0 and
fits Kaplan–Meier on them:
``n_risk`` follows (everyone at risk at 0, minus those who left before). A cohort whose
pooled total cannot be cut into such segments gets a summary-less, curve-less result. Under an
exact grant the result equals lifelines on the union with times coarsened to those segments.

Study entry::

    - id: survival_after_diagnosis
      kind: pooled_survival
      target_cohorts: [rare_condition]
      outcome: death
      follow_up_days: 1825
      time_bin_days: 180

summarised_result: as ``survival``'s curve and summary rows (no strata, no log-rank).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from privacy.secagg import ROW_ORDER
from studies.analyses import node_sql, pooling
from studies.analyses.secure_sum import SumPlan, advance, count_reader, has_protocol_rows
from studies.analyses.specs import PooledSurvivalSpec
from studies.analyses.survival import (
    TIME_TO_EVENT_CTE,
    Survival,
    kaplan_meier,
    km_summary,
    time_to_event_params,
)
from studies.analyses.time_axis import per_segment, segment_ends
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.registry import register
from studies.statistics import make_statistics

ROUNDS = 5
COUNTS = ("n_censor", "n_event")


def layout(spec: PooledSurvivalSpec) -> pl.DataFrame:
    """Every node's rows, in the order every node sorts them: cohort x bin x count."""
    rows = [
        (cohort, str(t), name)
        for cohort in spec.target_cohorts
        for t in spec.bins
        for name in COUNTS
    ]
    frame = pl.DataFrame(rows, schema=["cohort", "variable_level", "estimate_name"], orient="row")
    return (
        frame.with_columns(
            strata_name=pl.lit("overall"),
            strata_level=pl.lit("overall"),
            variable_name=pl.lit("time"),
        )
        .select(*ROW_ORDER, "estimate_name")
        .sort([*ROW_ORDER, "estimate_name"])
    )


def _binned(cdm: CdmContext, spec: PooledSurvivalSpec) -> pl.DataFrame:
    """This node's events and censorings per cohort and declared bin, first entries only."""
    sql = f"""
        WITH {node_sql.ENTRIES_CTE}, {TIME_TO_EVENT_CTE},
        first AS (
            SELECT * FROM binned QUALIFY row_number() OVER (
                PARTITION BY cohort_name, subject_id ORDER BY cohort_start_date) = 1
        )
        SELECT cohort_name AS cohort, CAST(t AS VARCHAR) AS variable_level,
               count(*) FILTER (event) AS n_event, count(*) FILTER (NOT event) AS n_censor
        FROM first GROUP BY ALL
    """
    params = node_sql.entries_params(cdm, spec.target_cohorts) | time_to_event_params(
        cdm, spec.outcome, spec.outcome_washout, spec.follow_up_days, spec.time_bin_days
    )
    return node_sql.query(cdm.con, sql, params).unpivot(
        index=["cohort", "variable_level"], variable_name="estimate_name", value_name="n"
    )


@register
class PooledSurvival:
    """Kaplan–Meier from securely summed (noisy or exact) events and censorings per bin."""

    kind = "pooled_survival"
    Spec = PooledSurvivalSpec

    def profile(self, spec: PooledSurvivalSpec) -> ReleaseProfile:
        """Five rounds; a person is one cell per target cohort (first entry). Noisy grants only:
        the coordinator unmasks the total of every declared bin, so an exact total of 1 or 2
        in a bin would be a small cell it learns (plain survival releases only segments of 0
        or at least k, merged at each node)."""
        return ReleaseProfile(
            max_rounds=ROUNDS,
            rows_per_person=len(spec.target_cohorts),
            data_keyed_strata=frozenset(),
            pooled=True,
        )

    def local(self, cdm: CdmContext, spec: PooledSurvivalSpec, state: dict | None) -> pl.DataFrame:
        keys = ["cohort", "variable_level", "estimate_name"]
        counts = layout(spec).join(_binned(cdm, spec), on=keys, how="left")
        return make_statistics(
            counts.with_columns(
                release_class=pl.lit("count"), value=pl.col("n").fill_null(0).cast(pl.Float64)
            ).drop("n")
        )

    def combine(
        self, inputs: CombineInput, spec: PooledSurvivalSpec, state: dict | None
    ) -> Finished | NextRound:
        if state is None and not has_protocol_rows(inputs):  # no gates: the exact reference
            total = (
                pl.concat(inputs.statistics)
                .group_by("cohort", "variable_level", "estimate_name", maintain_order=True)
                .agg(pl.col("value").sum())
            )
            return Finished(_result(layout(spec).join(total, on=["cohort", "variable_level",
                                                              "estimate_name"]), spec, 1))  # fmt: skip
        plan = SumPlan(spec.id, spec.threshold, spec.colluders, count_reader(layout(spec)))
        step = advance(inputs, state, plan)
        if isinstance(step, NextRound):
            return step
        total = layout(spec).with_columns(value=pl.Series(step.values, dtype=pl.Float64))
        return Finished(_result(total, spec, step.min_cell_count))


def _result(total: pl.DataFrame, spec: PooledSurvivalSpec, k: int) -> pl.DataFrame:
    """Kaplan–Meier per target cohort on the pooled total's releasable segments."""
    bins = (
        total.pivot(on="estimate_name", index=["cohort", "variable_level"], values="value")
        .with_columns(pl.col("variable_level").cast(pl.Int64).alias("t"), series=pl.col("cohort"))
        .sort("cohort", "t")
    )
    z = pooling.z_value(spec.confidence)
    curves, summaries = [], []
    for cohort in spec.target_cohorts:
        rows = bins.filter(pl.col("cohort") == cohort)
        ends = segment_ends(rows, k, spec.time_bin_days, spec.follow_up_days)
        if not ends:
            continue
        # bins after the last segment hold no one (segment_ends keeps those with leavers)
        rows = rows.filter(pl.col("t") <= ends[-1])
        seg = per_segment(rows.drop("series"), ends, ["cohort"])
        # noisy counts: clamped at 0 per segment (not per bin: that would bias them upwards)
        t, d, c = (
            np.clip(np.round(seg[col].to_numpy().astype(float)), 0, None)
            for col in ("t", "n_event", "n_censor")
        )
        if not np.all(((d == 0) | (d >= k)) & ((c == 0) | (c >= k))):  # no cut passes: none
            continue
        km = kaplan_meier(t, d, c, z)
        keys = {"group_level": cohort, "strata_name": "overall", "strata_level": "overall"}
        curves.append(pl.DataFrame(km).with_columns([pl.lit(v).alias(k) for k, v in keys.items()]))
        summaries.append(km_summary(keys, km))
    return Survival._result(spec, curves, summaries, [])
