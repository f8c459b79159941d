"""``survival``: Kaplan–Meier curves, Greenwood CI, median survival and the log-rank test.

Each node counts, per target cohort, stratum and segment of the study's declared time bins
(``studies.analyses.time_axis``: one set of segments per node, each holding 0 or >= k events and
0 or >= k censorings in every cohort and stratum), how many entries had the outcome
(``n_event``) and how many left follow-up (``n_leave``: events and censorings, so the
difference of the two released counts, ``n_censor``, is 0 or >= k too). ``combine`` merges the
nodes' segments into one grid and adds the counts there (a series any node withheld is withheld
whole: no partial curves); the numbers at risk follow from them (everyone starts
at risk; ``n_risk(t)`` = all minus those removed before ``t``), so the pooled curve is exactly
the Kaplan–Meier curve of the union with event and censoring times rounded up to the merged
grid. Times are never observed days: a day is data, a declared bin is not.

Time to event: from cohort entry to the first outcome-cohort start on or after entry; censored at
the earliest of cohort end, observation period end and ``follow_up_days``. Entries with an
outcome before entry are left out: any time before (``outcome_washout: null``) or within
``outcome_washout`` days before.

Study entry::

    - id: km_gi_bleed
      kind: survival
      target_cohorts: [celecoxib, diclofenac]
      outcome: gi_bleed
      outcome_washout: null
      follow_up_days: 1825
      time_bin_days: 30
      strata: [sex]

summarised_result (result_type ``survival``), group ``target_cohort``/<cohort>, variable
``outcome``/<outcome cohort>:
- the curve: ``additional_name`` ``time``, ``additional_level`` the day (``"0"``, ``"30"``...),
  estimates ``estimate``, ``estimate_95CI_lower``, ``estimate_95CI_upper`` (survival probability,
  log(-log) Greenwood CI as lifelines), ``n_risk``, ``n_event``, ``n_censor``;
- the summary (``additional`` overall): ``number_records``, ``n_events``, ``median_survival``,
  ``median_survival_95CI_lower``, ``median_survival_95CI_upper`` (days; ``NA`` if not reached);
- with two or more target cohorts, per stratum: group_level ``"A vs B"``, variable_name
  ``log_rank``, estimates ``chi_squared``, ``df``, ``p_value``;
- a cohort and stratum whose counts a node's gate withheld at some time has no curve and no
  summary (never a curve over the other nodes), only ``nodes_contributing`` and
  ``nodes_withheld`` flags at each grid time; a target cohort without entries gets a summary
  with zero records and no curve.

The per-time counts count cohort entries (``upper = inf``): a DP release withholds them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from studies.analyses import node_sql, pooling
from studies.analyses.spec_fields import RECORDS_PER_PERSON, normalise_strata
from studies.analyses.specs import SurvivalSpec
from studies.analyses.time_axis import per_segment, segment_ends, tables_on_grid
from studies.analysis import CdmContext, CombineInput, Finished, ReleaseProfile
from studies.registry import register
from studies.results import RESULT_COLUMNS, estimates

# Time to the first outcome on or after entry, per cohort entry (after ENTRIES_CTE): censored at
# the earliest of cohort end, observation end and $follow_up days; entries with an outcome before
# entry dropped (any time before when $washout is null, else within $washout days); times rounded
# up to the end of their $bin-day bin (t), with the event flag.
TIME_TO_EVENT_CTE = f"""
followed AS (
    SELECT e.cohort_name, e.subject_id, e.cohort_start_date, e.sex, e.age, e.age_group,
           e.calendar_year,
           least(e.cohort_end_date, coalesce(e.obs_end, e.cohort_end_date),
                 e.cohort_start_date + coalesce($follow_up::INTEGER, 36600)) AS end_date,
    {node_sql.OUTCOME_AFTER_ENTRY}
),
times AS (
    SELECT *, coalesce(event_date <= end_date, false) AS event,
           date_diff('day', cohort_start_date,
                     CASE WHEN event_date <= end_date THEN event_date ELSE end_date END) AS days
    FROM followed
    WHERE end_date >= cohort_start_date
),
binned AS (
    SELECT *, CAST(ceil(days / $bin) * $bin AS BIGINT) AS t FROM times
)
"""


def time_to_event_params(
    cdm: CdmContext,
    outcome: str,
    washout: int | None,
    follow_up: int | None,
    bin_days: int,
) -> dict[str, Any]:
    """Bound parameters of ``TIME_TO_EVENT_CTE``."""
    return {
        "outcome_id": node_sql.cohort_id(cdm, outcome),
        "follow_up": follow_up,
        "washout": washout,
        "bin": float(bin_days),
    }


def _event_table(cdm: CdmContext, spec: SurvivalSpec) -> pl.DataFrame:
    """Events and censorings per cohort, stratum and node segment (``time_axis``): one set of
    segments for every cohort and stratum, so no stratum's counts differ from another's or
    the overall's at a finer split."""
    grouping = node_sql.grouping_sets(["cohort_name", "t"], normalise_strata(spec.strata))
    sql = f"""
        WITH {node_sql.ENTRIES_CTE}, {TIME_TO_EVENT_CTE}
        SELECT cohort_name, t, {grouping.select},
               count(*) FILTER (event) AS n_event, count(*) FILTER (NOT event) AS n_censor
        FROM binned GROUP BY {grouping.clause}
    """
    params = node_sql.entries_params(
        cdm, spec.target_cohorts, spec.age_groups
    ) | time_to_event_params(
        cdm, spec.outcome, spec.outcome_washout, spec.follow_up_days, spec.time_bin_days
    )
    bins = node_sql.strata_columns(node_sql.query(cdm.con, sql, params), grouping)
    keys = ["cohort_name", "strata_name", "strata_level"]
    series = bins.with_columns(pl.concat_str(keys, separator="\x1f").alias("series"))
    ends = segment_ends(series, cdm.min_cell_count, spec.time_bin_days, spec.follow_up_days)
    return per_segment(bins, ends, keys)


def kaplan_meier(times: np.ndarray, d: np.ndarray, c: np.ndarray, z: float) -> dict:
    """Kaplan–Meier estimate from event/censor counts at sorted times (time 0 always present).

    Returns arrays over ``times`` (with 0 prepended when absent): n_risk, n_event, n_censor,
    estimate and the log(-log) Greenwood CI, computed with the same formulas as lifelines.
    """
    if times.size == 0 or times[0] != 0:
        times, d, c = np.r_[0, times], np.r_[0, d], np.r_[0, c]
    n_risk = d.sum() + c.sum() - np.r_[0, np.cumsum(d + c)[:-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = np.exp(np.cumsum(np.log(n_risk - d) - np.log(n_risk)))
        terms = d / (n_risk * (n_risk - d))
        greenwood = np.cumsum(np.where(np.isinf(terms), 0.0, terms))
        v = np.log(estimate)
        lower = np.exp(-np.exp(np.log(-v) - z * np.sqrt(greenwood) / v))
        upper = np.exp(-np.exp(np.log(-v) + z * np.sqrt(greenwood) / v))
    return {
        "time": times,
        "n_risk": n_risk,
        "n_event": d,
        "n_censor": c,
        "estimate": estimate,
        "estimate_95CI_lower": np.nan_to_num(lower, nan=1.0),
        "estimate_95CI_upper": np.nan_to_num(upper, nan=1.0),
    }


def first_time_at_or_below(times: np.ndarray, curve: np.ndarray, q: float = 0.5) -> float:
    """First time the curve reaches ``q`` or below (the median for q=0.5); NaN if never."""
    hit = np.flatnonzero(curve <= q)
    return float(times[hit[0]]) if hit.size else float("nan")


def km_summary(keys: dict[str, str], km: dict) -> dict:
    """A curve's summary row: records, events, median survival and its CI (days)."""
    return {
        **keys,
        "number_records": km["n_event"].sum() + km["n_censor"].sum(),
        "n_events": km["n_event"].sum(),
        "median_survival": first_time_at_or_below(km["time"], km["estimate"]),
        "median_survival_95CI_lower": first_time_at_or_below(km["time"], km["estimate_95CI_lower"]),
        "median_survival_95CI_upper": first_time_at_or_below(km["time"], km["estimate_95CI_upper"]),
    }


def log_rank(groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, int, float]:
    """k-sample log-rank test from per-group (times, events, censorings): (chi², df, p).

    Each group's numbers at risk are evaluated at every time of the union, as in lifelines'
    ``multivariate_logrank_test``.
    """
    from scipy import stats  # here, not at the top: a study validates without scipy

    grid = np.unique(np.concatenate([t for t, _, _ in groups]))
    k = len(groups)
    d = np.zeros((k, grid.size))
    n = np.zeros((k, grid.size))
    for g, (t, dg, cg) in enumerate(groups):
        idx = np.searchsorted(grid, t)
        d[g, idx] = dg
        removed = np.zeros(grid.size)
        removed[idx] = dg + cg
        n[g] = removed.sum() - np.r_[0, np.cumsum(removed)[:-1]]
    d_all, n_all = d.sum(0), n.sum(0)
    use = n_all > 1
    d, n, d_all, n_all = d[:, use], n[:, use], d_all[use], n_all[use]
    share = n / n_all
    observed_minus_expected = (d - d_all * share).sum(1)
    factor = d_all * (n_all - d_all) / (n_all - 1)
    cov = np.einsum("t,it,jt->ij", factor, share, share) * -1
    cov[np.diag_indices(k)] += (factor * share).sum(1)
    u = observed_minus_expected[:-1]
    chi2 = float(u @ np.linalg.solve(cov[:-1, :-1], u))
    return chi2, k - 1, float(stats.chi2.sf(chi2, k - 1))


def _empty_summaries(spec: SurvivalSpec, summaries: list[dict], withheld: set[str]) -> list[dict]:
    """Overall summary rows (no records, no events) for target cohorts no node had entries in
    (not for cohorts whose curve was withheld: they are not empty)."""
    seen = {s["group_level"] for s in summaries if s["strata_name"] == "overall"} | withheld
    return [
        {
            "group_level": cohort,
            "strata_name": "overall",
            "strata_level": "overall",
            "number_records": 0.0,
            "n_events": 0.0,
            "median_survival": float("nan"),
            "median_survival_95CI_lower": float("nan"),
            "median_survival_95CI_upper": float("nan"),
        }
        for cohort in spec.target_cohorts
        if cohort not in seen
    ]


@register
class Survival:
    """Kaplan–Meier and log-rank from pooled per-time event and censoring counts."""

    kind = "survival"
    Spec = SurvivalSpec

    def profile(self, spec: SurvivalSpec) -> ReleaseProfile:
        """Event and censoring counts count entries (unbounded): no row a DP release noises."""
        return ReleaseProfile(rows_per_person=0)

    def local(self, cdm: CdmContext, spec: SurvivalSpec, state: dict | None) -> pl.DataFrame:
        table = _event_table(cdm, spec)
        return node_sql.stratum_statistics(
            table,
            {"n_event": "count", "n_leave": "count"},
            pl.lit("time"),
            pl.col("t").cast(pl.String),
            pl.lit(RECORDS_PER_PERSON).alias("upper"),
            index=("t",),
        )

    def combine(self, inputs: CombineInput, spec: SurvivalSpec, state: dict | None) -> Finished:
        _, on_grid = tables_on_grid(inputs.statistics)
        pooled = pooling.pool(CombineInput(on_grid, pooling.node_names(inputs)))
        series = ["cohort", "strata_name", "strata_level"]
        table = (
            pooling.wide(pooled, names=["n_event", "n_leave"])
            .with_columns(
                pl.col("variable_level").cast(pl.Int64).alias("t"),
                (pl.col("n_leave") - pl.col("n_event")).alias("n_censor"),
            )
            .sort(*series, "t")
        )
        # no partial curves: a series with any time a node withheld is left out whole (its
        # flags say why), never computed from the other nodes or with zeros in the gap
        complete = pl.col("n_event").is_not_null().all().over(series)
        withheld = table.filter(~complete).select(series).unique()
        table = table.filter(complete)
        z = pooling.z_value(spec.confidence)
        curves, summaries, tests = [], [], []
        for (strata_name, strata_level), by_stratum in table.group_by(
            ["strata_name", "strata_level"], maintain_order=True
        ):
            groups = []
            for cohort in spec.target_cohorts:
                rows = by_stratum.filter(pl.col("cohort") == cohort)
                if rows.height == 0:
                    continue
                t, d, c = (
                    rows[col].to_numpy().astype(float) for col in ("t", "n_event", "n_censor")
                )
                groups.append((cohort, (t, d, c)))
                km = kaplan_meier(t, d, c, z)
                keys = {
                    "group_level": cohort,
                    "strata_name": strata_name,
                    "strata_level": strata_level,
                }
                curves.append(
                    pl.DataFrame(km).with_columns([pl.lit(v).alias(k) for k, v in keys.items()])
                )
                summaries.append(km_summary(keys, km))
            if len(groups) >= 2:
                chi2, df, p = log_rank([g for _, g in groups])
                tests.append(
                    {
                        "group_level": " vs ".join(name for name, _ in groups),
                        "strata_name": strata_name,
                        "strata_level": strata_level,
                        "chi_squared": chi2,
                        "df": df,
                        "p_value": p,
                    }
                )
        left_out = set(withheld.filter(pl.col("strata_name") == "overall")["cohort"])
        summaries += _empty_summaries(spec, summaries, left_out)
        flags = pooling.partial_pool_rows(
            pooled,
            group_name="target_cohort",
            group_level=pl.col("cohort"),
            variable_name="outcome",
            variable_level=spec.outcome,
            additional_name="time",
            additional_level=pl.col("variable_level"),
        )
        return Finished(pl.concat([self._result(spec, curves, summaries, tests), flags]))

    @staticmethod
    def _result(spec: SurvivalSpec, curves: list, summaries: list, tests: list) -> pl.DataFrame:
        common = {
            "group_name": "target_cohort",
            "variable_name": "outcome",
            "variable_level": spec.outcome,
        }
        parts = []
        if curves:
            curve = (
                pl.concat(curves, how="vertical_relaxed")
                .with_columns(
                    pl.col("time").cast(pl.Int64).cast(pl.String).alias("additional_level")
                )
                .drop("time")
            )
            parts.append(
                estimates(
                    curve,
                    {
                        "estimate": "numeric",
                        "estimate_95CI_lower": "numeric",
                        "estimate_95CI_upper": "numeric",
                        "n_risk": "integer",
                        "n_event": "integer",
                        "n_censor": "integer",
                    },
                    additional_name="time",
                    **common,
                )
            )
        if summaries:
            parts.append(
                estimates(
                    pl.DataFrame(summaries),
                    {
                        "number_records": "integer",
                        "n_events": "integer",
                        "median_survival": "numeric",
                        "median_survival_95CI_lower": "numeric",
                        "median_survival_95CI_upper": "numeric",
                    },
                    **common,
                )
            )
        if tests:
            parts.append(
                estimates(
                    pl.DataFrame(tests),
                    {"chi_squared": "numeric", "df": "integer", "p_value": "numeric"},
                    group_name="target_cohort",
                    variable_name="log_rank",
                    variable_level=spec.outcome,
                )
            )
        if not parts:  # every curve withheld: only the flags say why
            return pl.DataFrame(schema=RESULT_COLUMNS)
        return pl.concat(parts, how="vertical")
