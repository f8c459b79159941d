"""``incidence``: incidence rate of an outcome per 1,000 person-years, with exact Poisson CI.

Time at risk runs from each denominator-cohort entry to the earliest of its cohort end, the end
of its observation period and the first outcome-cohort start on or after entry (that day
included, person-days counted as end − start + 1, as IncidencePrevalence does). Entries with an
outcome before entry are left out: any time before (``outcome_washout: null``) or within
``outcome_washout`` days before. Person-time is split by calendar year, so the
``calendar_year`` stratum is the year the time was lived in; sex and age group are taken at entry.

Nodes return outcome and denominator counts and person-days per stratum; all three add over
nodes, so the pooled rate is exactly the rate on the union of the data. The exact (Garwood)
Poisson interval is ``[χ²(α/2; 2k)/2, χ²(1−α/2; 2k+2)/2] / person-years``.

Study entry::

    - id: bleed_incidence
      kind: incidence
      denominator_cohort: celecoxib
      outcome: gi_bleed
      outcome_washout: 365
      strata: [sex, age_group, calendar_year]

summarised_result (result_type ``incidence``): group ``denominator_cohort_name &&&
outcome_cohort_name``/``<denominator> &&& <outcome>``, strata as requested; variable_name
``Denominator``: ``denominator_count``, ``person_days``, ``person_years``; variable_name
``Outcome``: ``outcome_count``, ``incidence_1000_pys``, ``incidence_1000_pys_95CI_lower``,
``incidence_1000_pys_95CI_upper``. A stratum a node's gate withheld part of is pooled over the
other nodes and flagged (variable_name ``Outcome``) by ``nodes_contributing``/``nodes_withheld``;
an empty denominator cohort gives zeros overall. Outcome counts count entries' events
(``upper = inf``: withheld from DP releases); person-days are clamped in SQL to ``MAX_DAYS``
per person, the bound the release declares (``person_time``).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from studies.analyses import node_sql, pooling
from studies.analyses.spec_fields import (
    MAX_DAYS,
    RECORDS_PER_PERSON,
    normalise_strata,
    strata_rows_per_person,
)
from studies.analyses.specs import IncidenceSpec
from studies.analysis import CdmContext, CombineInput, Finished, ReleaseProfile
from studies.registry import register
from studies.results import SEP

DAYS_PER_YEAR = 365.25


def person_time(cdm: CdmContext, spec: IncidenceSpec) -> pl.DataFrame:
    """Persons, outcomes and person-days per stratum on one node.

    Each person's person-days are clamped where they are computed to the ``MAX_DAYS`` the
    release declares as its bound: an entry's time at risk ends ``MAX_DAYS`` days after its
    start at the latest, and a person's pieces (entries by start, then calendar years) count
    only until their running total reaches ``MAX_DAYS``. Nothing a study can ask (an exit
    10,000,000 days after a death outside observation, overlapping Circe periods) makes one
    person add more; every real person (at most 150 years of life) is unaffected.
    """
    grouping = node_sql.grouping_sets(["cohort_name"], normalise_strata(spec.strata))
    sql = f"""
        WITH {node_sql.ENTRIES_CTE},
        followed AS (
            SELECT e.cohort_name, e.subject_id, e.cohort_start_date AS start, e.sex, e.age_group,
                   least(e.cohort_end_date, coalesce(e.obs_end, e.cohort_end_date),
                         e.cohort_start_date + ($max_days - 1)) AS stop,
            {node_sql.OUTCOME_AFTER_ENTRY}
        ),
        at_risk AS (
            SELECT *, coalesce(event_date <= stop, false) AS event,
                   CASE WHEN event_date <= stop THEN event_date ELSE stop END AS tar_end
            FROM followed
            WHERE stop >= start
        ),
        years AS (
            SELECT unnest(range(lo, hi + 1)) AS y
            FROM (SELECT min(year(start)) AS lo, max(year(tar_end)) AS hi FROM at_risk)
            WHERE lo IS NOT NULL
        ),
        pieces AS (
            SELECT a.cohort_name, a.subject_id, a.sex, a.age_group, a.start, y,
                   CAST(y AS VARCHAR) AS calendar_year,
                   date_diff('day', greatest(a.start, make_date(y, 1, 1)),
                             least(a.tar_end, make_date(y, 12, 31))) + 1 AS days,
                   a.event AND year(a.tar_end) = y AS event
            FROM at_risk a JOIN years ON y BETWEEN year(a.start) AND year(a.tar_end)
        ),
        clamped AS (
            SELECT *, greatest(0, least(days, $max_days - coalesce(sum(days) OVER (
                       PARTITION BY cohort_name, subject_id ORDER BY start, y, days
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0))) AS person_days
            FROM pieces
        )
        SELECT cohort_name, {grouping.select},
               count(DISTINCT subject_id) AS denominator_count,
               count(*) FILTER (event) AS outcome_count,
               sum(person_days) AS person_days
        FROM clamped GROUP BY {grouping.clause}
    """
    params = node_sql.entries_params(cdm, [spec.denominator_cohort], spec.age_groups) | {
        "outcome_id": node_sql.cohort_id(cdm, spec.outcome),
        "washout": spec.outcome_washout,
        "max_days": MAX_DAYS,
    }
    return node_sql.strata_columns(node_sql.query(cdm.con, sql, params), grouping)


ESTIMATES = ["denominator_count", "outcome_count", "person_days"]


def poisson_interval(events: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Garwood) confidence interval for a Poisson count."""
    from scipy import stats  # here, not at the top: a study validates without scipy

    alpha = 1 - confidence
    lower = np.where(events > 0, stats.chi2.ppf(alpha / 2, 2 * events) / 2, 0.0)
    upper = stats.chi2.ppf(1 - alpha / 2, 2 * events + 2) / 2
    return lower, upper


@register
class Incidence:
    """Incidence rates pooled from per-node outcome counts and person-days."""

    kind = "incidence"
    Spec = IncidenceSpec

    def profile(self, spec: IncidenceSpec) -> ReleaseProfile:
        """Denominator count and person-days in each stratum row a person's time falls in
        (outcome counts are records, unbounded); calendar years: no bound from the spec."""
        cells = strata_rows_per_person(spec.strata, spec.age_groups, per_entry=True)
        return ReleaseProfile(rows_per_person=None if cells is None else 2 * cells)

    def local(self, cdm: CdmContext, spec: IncidenceSpec, state: dict | None) -> pl.DataFrame:
        table = person_time(cdm, spec)
        kinds = {"denominator_count": "count", "outcome_count": "count", "person_days": "sum"}
        return node_sql.stratum_statistics(
            table,
            kinds,
            pl.lit("outcome"),
            pl.lit(spec.outcome),
            pl.when(pl.col("estimate_name") == "person_days").then(0.0).alias("lower"),
            pl.when(pl.col("estimate_name") == "person_days")
            .then(float(MAX_DAYS))
            .when(pl.col("estimate_name") == "outcome_count")
            .then(RECORDS_PER_PERSON)
            .alias("upper"),
        )

    def combine(self, inputs: CombineInput, spec: IncidenceSpec, state: dict | None) -> Finished:
        pooled = pooling.pool(inputs)
        table = pooling.with_zero_overall(
            pooling.wide(pooled, names=ESTIMATES),
            spec.denominator_cohort,
            "outcome",
            [spec.outcome],
            ESTIMATES,
        ).with_columns((pl.col("person_days") / DAYS_PER_YEAR).alias("person_years"))
        events = table["outcome_count"].to_numpy().astype(float)
        years = table["person_years"].to_numpy().astype(float)
        lower, upper = poisson_interval(events, spec.confidence)
        with np.errstate(divide="ignore", invalid="ignore"):
            table = table.with_columns(
                pl.Series("incidence_1000_pys", events / years * 1000),
                pl.Series("incidence_1000_pys_95CI_lower", lower / years * 1000),
                pl.Series("incidence_1000_pys_95CI_upper", upper / years * 1000),
            ).select(
                pl.lit(pooling.DENOMINATOR_OUTCOME).alias("group_name"),
                (pl.col("cohort") + SEP + pl.col("variable_level")).alias("group_level"),
                "strata_name",
                "strata_level",
                "denominator_count",
                "person_days",
                "person_years",
                "outcome_count",
                "incidence_1000_pys",
                "incidence_1000_pys_95CI_lower",
                "incidence_1000_pys_95CI_upper",
            )
        result = pooling.ratio_result(
            table,
            pooled,
            {"denominator_count": "integer", "person_days": "integer", "person_years": "numeric"},
            "incidence_1000_pys",
            group_level=pl.col("cohort") + SEP + pl.col("variable_level"),
        )
        return Finished(result)
