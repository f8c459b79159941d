"""``prevalence``: point and period prevalence of an outcome in a denominator cohort, Wilson CI.

Point prevalence on a date: persons in the denominator cohort that day, and among them those in
the outcome cohort that day. Period prevalence over [start, end]: persons in the denominator
cohort on at least one day of the period (every day with ``full_contribution: true``), and among
them those with an outcome-cohort day inside both the period and their denominator time. Sex and
age group are those of the person's earliest denominator entry.

Nodes return the two person counts per time point and stratum; they add over nodes, so the
pooled prevalence is exactly that of the union. The interval is Wilson's score interval, as in
IncidencePrevalence.

Study entry::

    - id: bleed_prevalence
      kind: prevalence
      type: period
      denominator_cohort: everyone
      outcome: gi_bleed
      periods: [{start: 2010-01-01, end: 2010-12-31}, {start: 2011-01-01, end: 2011-12-31}]
      strata: [sex]

    (or ``type: point`` with ``dates: [2010-01-01, 2011-01-01]``)

summarised_result (result_type ``prevalence``): group ``denominator_cohort_name &&&
outcome_cohort_name``, strata as requested, ``additional_name`` ``prevalence_start_date &&&
prevalence_end_date`` with the dates; variable_name ``Denominator``: ``denominator_count``;
variable_name ``Outcome``: ``outcome_count``, ``prevalence``, ``prevalence_95CI_lower``,
``prevalence_95CI_upper`` (proportions in [0, 1]). A time point and stratum a node's gate
withheld part of is pooled over the other nodes and flagged (variable_name ``Outcome``) by
``nodes_contributing``/``nodes_withheld``; with nobody in the denominator, zeros.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from studies.analyses import node_sql, pooling
from studies.analyses.spec_fields import normalise_strata, strata_rows_per_person
from studies.analyses.specs import Period, PrevalenceSpec
from studies.analysis import CdmContext, CombineInput, Finished, ReleaseProfile
from studies.registry import register
from studies.results import SEP

_PERSONS_CTE = f"""
        {node_sql.ENTRIES_CTE},
        periods AS (
            SELECT unnest($p_starts::DATE[]) AS p_start, unnest($p_ends::DATE[]) AS p_end
        ),
        denominator AS (
            SELECT e.cohort_name, e.subject_id, e.sex, e.age_group, e.cohort_start_date,
                   p.p_start, p.p_end,
                   greatest(e.cohort_start_date, p.p_start) AS s,
                   least(e.cohort_end_date, p.p_end) AS t
            FROM entries e JOIN periods p
              ON e.cohort_start_date <= p.p_end AND e.cohort_end_date >= p.p_start
            WHERE NOT $full OR (e.cohort_start_date <= p.p_start AND e.cohort_end_date >= p.p_end)
        ),
        persons AS (
            SELECT d.cohort_name, d.subject_id, d.p_start, d.p_end,
                   arg_min(d.sex, d.cohort_start_date) AS sex,
                   arg_min(d.age_group, d.cohort_start_date) AS age_group,
                   NULL::VARCHAR AS calendar_year,
                   bool_or(o.subject_id IS NOT NULL) AS has_outcome
            FROM denominator d
            LEFT JOIN cohort o
              ON o.cohort_definition_id = $outcome_id AND o.subject_id = d.subject_id
             AND o.cohort_start_date <= d.t AND o.cohort_end_date >= d.s
            GROUP BY d.cohort_name, d.subject_id, d.p_start, d.p_end
        )"""
"""Per period, each denominator person once, with whether they had the outcome in it."""


def _params(cdm: CdmContext, spec: PrevalenceSpec) -> dict[str, Any]:
    return node_sql.entries_params(cdm, [spec.denominator_cohort], spec.age_groups) | {
        "outcome_id": node_sql.cohort_id(cdm, spec.outcome),
        "p_starts": [p.start for p in spec.intervals],
        "p_ends": [p.end for p in spec.intervals],
        "full": spec.full_contribution,
    }


def _counts(cdm: CdmContext, spec: PrevalenceSpec) -> pl.DataFrame:
    """Denominator and outcome person counts per time point and stratum on one node."""
    grouping = node_sql.grouping_sets(
        ["cohort_name", "p_start", "p_end"], normalise_strata(spec.strata)
    )
    sql = f"""
        WITH {_PERSONS_CTE}
        SELECT cohort_name, p_start, p_end, {grouping.select},
               count(*) AS denominator_count, count(*) FILTER (has_outcome) AS outcome_count
        FROM persons GROUP BY {grouping.clause}
    """
    return node_sql.strata_columns(node_sql.query(cdm.con, sql, _params(cdm, spec)), grouping)


def period_persons(cdm: CdmContext, spec: PrevalenceSpec) -> pl.DataFrame:
    """(p_start, p_end, person hash, has_outcome) of every person counted in each period: the
    sets the node's overlap control compares (``node.overlap``); never released."""
    sql = f"""WITH {_PERSONS_CTE}
        SELECT p_start, p_end, hash(subject_id) AS person, has_outcome FROM persons"""
    return node_sql.query(cdm.con, sql, _params(cdm, spec))


ESTIMATES = ["denominator_count", "outcome_count"]


def _interval_label(period: Period) -> str:
    return f"{period.start} to {period.end}"


def wilson_interval(
    successes: np.ndarray, n: np.ndarray, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for a binomial proportion."""
    z = pooling.z_value(confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = successes / n
        denominator = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denominator
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denominator
    return centre - half, centre + half


@register
class Prevalence:
    """Point or period prevalence pooled from per-node person counts."""

    kind = "prevalence"
    Spec = PrevalenceSpec

    def profile(self, spec: PrevalenceSpec) -> ReleaseProfile:
        """Denominator and outcome count per time point and strata combination (strata of the
        person's earliest entry, so one row each)."""
        cells = strata_rows_per_person(spec.strata, spec.age_groups, per_entry=False)
        return ReleaseProfile(rows_per_person=2 * len(spec.intervals) * cells)

    def local(self, cdm: CdmContext, spec: PrevalenceSpec, state: dict | None) -> pl.DataFrame:
        table = _counts(cdm, spec).with_columns(
            (pl.col("p_start").cast(pl.String) + " to " + pl.col("p_end").cast(pl.String)).alias(
                "variable_level"
            )
        )
        return node_sql.stratum_statistics(
            table,
            {"denominator_count": "count", "outcome_count": "count"},
            pl.lit(spec.outcome),
            pl.col("variable_level"),
            index=("variable_level",),
        )

    def combine(self, inputs: CombineInput, spec: PrevalenceSpec, state: dict | None) -> Finished:
        pooled = pooling.pool(inputs)
        levels = [_interval_label(p) for p in spec.intervals]
        table = pooling.with_zero_overall(
            pooling.wide(pooled, names=ESTIMATES),
            spec.denominator_cohort,
            spec.outcome,
            levels,
            ESTIMATES,
        )
        n = table["denominator_count"].to_numpy().astype(float)
        x = table["outcome_count"].fill_null(0).to_numpy().astype(float)
        lower, upper = wilson_interval(x, n, spec.confidence)
        with np.errstate(divide="ignore", invalid="ignore"):
            prevalence = x / n
        table = table.with_columns(
            pl.Series("prevalence", prevalence),
            pl.Series("prevalence_95CI_lower", lower),
            pl.Series("prevalence_95CI_upper", upper),
            pl.lit(pooling.DENOMINATOR_OUTCOME).alias("group_name"),
            (pl.col("cohort") + SEP + pl.col("variable_name")).alias("group_level"),
            pl.lit("prevalence_start_date" + SEP + "prevalence_end_date").alias("additional_name"),
            pl.col("variable_level")
            .str.replace(" to ", SEP, literal=True)
            .alias("additional_level"),
        ).drop("cohort", "variable_name", "variable_level")
        result = pooling.ratio_result(
            table,
            pooled,
            {"denominator_count": "integer"},
            "prevalence",
            group_level=pl.col("cohort") + SEP + pl.col("variable_name"),
            variable_level="",
            additional_name="prevalence_start_date" + SEP + "prevalence_end_date",
            additional_level=pl.col("variable_level").str.replace(" to ", SEP, literal=True),
        )
        return Finished(result)
