"""``meta``: meta-analysis of per-node estimates, fixed and random effects (DerSimonian–Laird).

Where pooling the raw statistics is not wanted (or not allowed), each node estimates the measure
on its own data and returns the estimate and its standard error; the coordinator combines them
by inverse-variance weighting (fixed effect) and by DerSimonian–Laird random effects, and reports
Cochran's Q, τ² and I². Measures:

- ``log_odds_ratio``: outcome (an ``outcome`` cohort entry starting in ``window`` days from index)
  in ``target`` versus ``comparator`` entries; SE = √(1/a + 1/b + 1/c + 1/d), with 0.5 added to
  every cell of a node's table when one cell is zero (Haldane–Anscombe).
- ``log_incidence_rate``: outcome rate per 1,000 person-years in ``target`` entries, time at risk
  as in ``incidence``; SE = 1/√events (a node without events gives no estimate).

A node's estimate travels in the same statistics group as the counts it is built from, so the
gate withholds it whenever one of those counts is too small to release.

Study entry::

    - id: bleed_or_meta
      kind: meta
      measure: log_odds_ratio
      target: celecoxib
      comparator: diclofenac
      outcome: gi_bleed
      window: {start: 1, end: 365}

summarised_result (result_type ``meta``), group ``cohort_name``/<target> (``<target> &&&
<comparator>`` with group_name ``target_cohort_name &&& comparator_cohort_name`` for odds
ratios), additional ``outcome_cohort_name``/<outcome>:
- per node (``cdm_name`` = the node): variable_name ``<measure>``, estimates ``estimate``,
  ``standard_error``, ``estimate_95CI_lower``, ``estimate_95CI_upper``, ``weight_fixed``,
  ``weight_random`` (percent);
- pooled (``cdm_name`` ``federated``): variable_name ``fixed_effect`` and ``random_effects``
  with ``estimate``, ``standard_error``, ``estimate_95CI_lower``/``upper``, ``p_value``,
  ``exp_estimate``, ``exp_estimate_95CI_lower``/``upper``; variable_name ``heterogeneity`` with
  ``q``, ``df``, ``q_p_value``, ``tau_squared``, ``i_squared`` (percent), ``number_nodes``, and
  ``nodes_withheld`` (character, ``;``-joined) naming nodes that sent no usable estimate (withheld
  by their gate, or not estimable there, e.g. no events).

Record and event counts carry ``upper = inf`` (a person may have many entries).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from studies.analyses import node_sql, pooling
from studies.analyses.incidence import DAYS_PER_YEAR, person_time
from studies.analyses.spec_fields import MAX_DAYS, RECORDS_PER_PERSON
from studies.analyses.specs import IncidenceSpec, MetaSpec
from studies.analysis import CdmContext, CombineInput, Finished, ReleaseProfile
from studies.registry import register
from studies.results import POOLED, SEP, estimates
from studies.statistics import make_statistics


def _odds_ratio_cells(cdm: CdmContext, spec: MetaSpec) -> dict[str, float]:
    """Entries and outcome entries in target and comparator on one node."""
    sql = f"""
        WITH {node_sql.ENTRIES_CTE}
        SELECT sc.cohort_name, count(e.subject_id) AS records,
               count(e.subject_id) FILTER (EXISTS (
                   SELECT 1 FROM cohort o
                   WHERE o.cohort_definition_id = $outcome_id AND o.subject_id = e.subject_id
                     AND o.cohort_start_date BETWEEN e.cohort_start_date + $w_start
                                                 AND e.cohort_start_date + $w_end)) AS events
        FROM study_cohorts sc LEFT JOIN entries e USING (cohort_name)
        GROUP BY sc.cohort_name
    """
    params = node_sql.entries_params(cdm, [spec.target, spec.comparator]) | {
        "outcome_id": node_sql.cohort_id(cdm, spec.outcome),
        "w_start": spec.window.start,
        "w_end": spec.window.end,
    }
    table = {r[0]: r[1:] for r in node_sql.query(cdm.con, sql, params).iter_rows()}
    (n1, e1), (n0, e0) = table[spec.target], table[spec.comparator]
    return {
        "target_records": n1,
        "target_events": e1,
        "comparator_records": n0,
        "comparator_events": e0,
    }


def log_odds_ratio(cells: dict[str, float]) -> tuple[float, float]:
    """Log odds ratio and its SE from a 2×2 table, 0.5 added to all cells if one is zero."""
    a, c = cells["target_events"], cells["comparator_events"]
    b, d = cells["target_records"] - a, cells["comparator_records"] - c
    if min(a, b, c, d) == 0:
        a, b, c, d = (x + 0.5 for x in (a, b, c, d))
    return math.log(a * d / (b * c)), math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)


def _rate_rows(cdm: CdmContext, spec: MetaSpec) -> tuple[dict[str, float], dict[str, str]]:
    incidence = IncidenceSpec(
        id=spec.id,
        kind="incidence",
        denominator_cohort=spec.target,
        outcome=spec.outcome,
        outcome_washout=spec.outcome_washout,
    )
    rows = person_time(cdm, incidence)  # no row when the target cohort is empty here
    row = rows.row(0, named=True) if rows.height else {"outcome_count": 0, "person_days": 0}
    events, days = float(row["outcome_count"]), float(row["person_days"] or 0)
    if events > 0:
        estimate = math.log(events / (days / DAYS_PER_YEAR) * 1000)
        se = 1 / math.sqrt(events)
    else:
        estimate = se = math.nan
    values = {
        "outcome_count": events,
        "person_days": days,
        "estimate": estimate,
        "standard_error": se,
    }
    return values, {"outcome_count": "count", "person_days": "sum"}


def dersimonian_laird(y: np.ndarray, se: np.ndarray, confidence: float) -> dict[str, dict]:
    """Fixed-effect and DerSimonian–Laird random-effects pooling with Q, τ², I²."""
    from scipy import stats  # here, not at the top: a study validates without scipy

    z = pooling.z_value(confidence)
    w = 1 / se**2
    fixed = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fixed) ** 2))
    df = y.size - 1
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    tau2 = max(0.0, (q - df) / c) if df > 0 else 0.0
    w_random = 1 / (se**2 + tau2)
    random = float(np.sum(w_random * y) / np.sum(w_random))
    out: dict[str, dict] = {}
    for name, est, weights in (("fixed_effect", fixed, w), ("random_effects", random, w_random)):
        s = float(1 / math.sqrt(np.sum(weights)))
        out[name] = {
            "estimate": est,
            "standard_error": s,
            "estimate_95CI_lower": est - z * s,
            "estimate_95CI_upper": est + z * s,
            "p_value": float(2 * stats.norm.sf(abs(est / s))),
            "exp_estimate": math.exp(est),
            "exp_estimate_95CI_lower": math.exp(est - z * s),
            "exp_estimate_95CI_upper": math.exp(est + z * s),
        }
    out["heterogeneity"] = {
        "q": q,
        "df": df,
        "q_p_value": float(stats.chi2.sf(q, df)) if df > 0 else math.nan,
        "tau_squared": tau2,
        "i_squared": max(0.0, (q - df) / q) * 100 if q > 0 else 0.0,
        "number_nodes": y.size,
    }
    out["weights"] = {
        "weight_fixed": w / w.sum() * 100,
        "weight_random": w_random / w_random.sum() * 100,
    }
    return out


def _estimate_type(name: str) -> str:
    if name == "nodes_withheld":
        return "character"
    return "integer" if name in ("df", "number_nodes") else "numeric"


@register
class Meta:
    """Inverse-variance and DerSimonian–Laird pooling of per-node estimates."""

    kind = "meta"
    Spec = MetaSpec

    def profile(self, spec: MetaSpec) -> ReleaseProfile:
        """Odds ratios count entries only (unbounded); rates add the person-days row."""
        return ReleaseProfile(rows_per_person=1 if spec.measure == "log_incidence_rate" else 0)

    def local(self, cdm: CdmContext, spec: MetaSpec, state: dict | None) -> pl.DataFrame:
        if spec.measure == "log_odds_ratio":
            cells = _odds_ratio_cells(cdm, spec)
            estimate, se = log_odds_ratio(cells)
            values = {**cells, "estimate": estimate, "standard_error": se}
            kinds = dict.fromkeys(cells, "count")
        else:
            values, kinds = _rate_rows(cdm, spec)
        frame = pl.DataFrame(
            {
                "estimate_name": list(values),
                "value": [float(v) for v in values.values()],
            }
        ).with_columns(
            pl.lit(spec.target).alias("cohort"),
            pl.lit(spec.measure).alias("variable_name"),
            pl.col("estimate_name").replace_strict(kinds, default="value").alias("release_class"),
            pl.when(pl.col("estimate_name") == "person_days").then(0.0).alias("lower"),
            pl.when(pl.col("estimate_name") == "person_days")
            .then(float(MAX_DAYS))
            .when(pl.col("estimate_name").is_in(list(kinds)))
            .then(RECORDS_PER_PERSON)
            .alias("upper"),
        )
        return make_statistics(frame)

    def combine(self, inputs: CombineInput, spec: MetaSpec, state: dict | None) -> Finished:
        names = pooling.node_names(inputs)
        per_node = []
        for name, frame in zip(names, inputs.statistics, strict=True):
            value = dict(zip(frame["estimate_name"], frame["value"], strict=True))
            y, se = value.get("estimate", math.nan), value.get("standard_error", math.nan)
            if math.isfinite(y) and math.isfinite(se) and se > 0:
                per_node.append((name, y, se))
        if not per_node:
            raise ValueError(f"meta {spec.id}: no node released an estimate with its SE")
        y = np.array([p[1] for p in per_node])
        se = np.array([p[2] for p in per_node])
        pooled = dersimonian_laird(y, se, spec.confidence)
        left_out = [name for name in names if name not in {p[0] for p in per_node}]
        if left_out:
            pooled["heterogeneity"]["nodes_withheld"] = ";".join(left_out)
        z = pooling.z_value(spec.confidence)
        if spec.measure == "log_odds_ratio":
            keys = {
                "group_name": "target_cohort_name" + SEP + "comparator_cohort_name",
                "group_level": spec.target + SEP + spec.comparator,
            }
        else:
            keys = {"group_name": "cohort_name", "group_level": spec.target}
        keys |= {"additional_name": "outcome_cohort_name", "additional_level": spec.outcome}
        nodes = pl.DataFrame(
            {
                "cdm_name": [p[0] for p in per_node],
                "estimate": y,
                "standard_error": se,
                "estimate_95CI_lower": y - z * se,
                "estimate_95CI_upper": y + z * se,
                **pooled["weights"],
            }
        )
        parts = [
            estimates(
                nodes,
                dict.fromkeys(nodes.columns[1:], "numeric"),
                variable_name=spec.measure,
                **keys,
            )
        ]
        for variable in ("fixed_effect", "random_effects", "heterogeneity"):
            row = pl.DataFrame([pooled[variable]])
            types = {k: _estimate_type(k) for k in row.columns}
            parts.append(estimates(row, types, variable_name=variable, cdm_name=POOLED, **keys))
        return Finished(pl.concat(parts, how="vertical"))
