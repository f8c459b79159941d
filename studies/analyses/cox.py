"""``cox``: Cox proportional hazards fitted exactly by federated Newton–Raphson (Breslow ties).

The Breslow log partial likelihood of the pooled data,
``ℓ(β) = Σ_k [βᵀ s_k − d_k log S0(t_k)]``, depends on the data only through sums that add over
nodes: at each pooled event time ``t_k`` the number of events ``d_k`` and the risk-set sums
``S0 = Σ exp(xβ)``, ``S1 = Σ x exp(xβ)``, ``S2 = Σ x xᵀ exp(xβ)`` over entries still at risk
(time ≥ ``t_k``), plus the covariate sum over all events ``Σ s_k``. So:

- round 0: each node returns its events and leavers per segment of the study's declared
  time bins (``studies.analyses.time_axis``: 0 or >= k each); ``combine`` merges the nodes'
  segments into one grid (a pure function of the signed round-0 releases) and pools the events
  per grid time into the first state (grid, events, beta = 0);
- round r ≥ 1: each node checks that the state's grid cuts none of its own segments, rounds its
  times up to the grid and returns ``n_risk``, ``S0``, ``S1``, ``S2`` at every grid time (risk
  sets as reverse cumulative sums, matched to the grid by an ASOF join) and the covariate sums
  over all events; the coordinator forms ``U = Σ s_k − Σ d_k S1/S0`` and
  ``I = Σ d_k (S2/S0 − (S1/S0)(S1/S0)ᵀ)`` and takes a Newton–Raphson step, until the step is
  below ``tolerance``. The result is the Breslow fit of the union with times coarsened to the
  merged grid (statsmodels ``PHReg``, ``ties="breslow"``, on those times). Between two grid
  times every node has 0 or at least k persons leaving its risk set, so no difference of
  released sums describes one person.

Time to event as in ``survival`` (first outcome on or after entry, censoring at cohort end,
observation end or ``follow_up_days``; ``time_bin_days`` declares the bins, 30 by default and
never below the node policy's ``min_time_bin_days``). Risk-set sums at a time travel in the same
statistics group as the number at risk, so a gate withholds them when that number is small.

Study entry::

    - id: bleed_hazard
      kind: cox
      cohort: celecoxib
      outcome: gi_bleed
      follow_up_days: 1825
      time_bin_days: 30
      covariates:
        - {type: age, center: 50, scale: 10}
        - {type: sex}

summarised_result (result_type ``cox``), group ``cohort_name``/<cohort>, additional
``outcome``/<outcome cohort>: per covariate term ``coefficient``, ``standard_error``,
``z_value``, ``p_value``, ``coefficient_95CI_lower``/``upper``, ``hazard_ratio`` and
``hazard_ratio_95CI_lower``/``upper``; ``variable_name`` ``model``: ``number_records``,
``number_events``, ``log_partial_likelihood``, ``number_nodes``, ``iterations``, ``converged``,
and ``nodes_withheld`` (character) naming nodes whose gate withheld a risk set (those times left
the model).

Every round also returns the counts the gate's regression guards read (as ``glm``): ``records``,
``outcome`` levels ``1``/``0`` (entries with and without the event) and the ``1``/``0`` levels of
each binary covariate. The guards count one parameter per ``event_sum`` row; per-time rows
(``variable_name`` ``time``) are cells of the time axis, suppressed when small, not parameters.
Risk-set sums are ``fsum`` (exactly rounded), so repeated runs agree to the last bit. The design
rows (time, event, covariates) are built once per connection and cohorts
(``node_sql.design_table``) and read by every round's queries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from studies.analyses import node_sql, pooling
from studies.analyses.glm import (
    coefficient_table,
    covariate_columns,
    model_table,
    newton_raphson,
)
from studies.analyses.spec_fields import RECORDS_PER_PERSON
from studies.analyses.specs import CoxSpec
from studies.analyses.survival import TIME_TO_EVENT_CTE, time_to_event_params
from studies.analyses.time_axis import (
    TIME_VARIABLE,
    check_grid,
    coarsen_sql,
    merged_grid,
    per_segment,
    segment_ends,
    segment_table,
    to_grid,
)
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.registry import register
from studies.statistics import make_statistics


def _design(cdm: CdmContext, spec: CoxSpec) -> tuple[str, list[int]]:
    """The temp table of design rows (t, event, x0..; see ``design_table``), built on the first
    round on this connection; indices of the binary columns."""
    columns, cov_params, binary = covariate_columns(cdm, spec.covariates)
    xs = ", ".join(f"CAST({expr} AS DOUBLE) AS x{i}" for i, expr in enumerate(columns))
    params = (
        node_sql.entries_params(cdm, [spec.cohort])
        | cov_params
        | time_to_event_params(
            cdm, spec.outcome, spec.outcome_washout, spec.follow_up_days, spec.time_bin_days
        )
    )
    sql = f"""WITH {node_sql.ENTRIES_CTE}, {TIME_TO_EVENT_CTE}
        SELECT e.t, e.event, {xs} FROM binned e"""
    return node_sql.design_table(cdm, sql, params), binary


def _guard_counts(cdm: CdmContext, spec: CoxSpec, design: str, binary: list[int]) -> pl.DataFrame:
    """The counts the gate's regression guards read: rows, entries with and without the
    outcome, and the levels of each binary covariate (``variable_name`` its term).

    Column names in the SQL are positions (``b0_1``); terms are attached here, in Python.
    """
    levels = [f"count(*) FILTER (x{i} = {v}) AS b{i}_{v}" for i in binary for v in (1, 0)]
    sql = f"""SELECT count(*) AS n, count(*) FILTER (event) AS out_1,
               count(*) FILTER (NOT event) AS out_0{"".join(", " + c for c in levels)}
        FROM {design}"""
    row = node_sql.query(cdm.con, sql, {}).row(0, named=True)
    rows = [
        ("records", "", row["n"]),
        ("outcome", "1", row["out_1"]),
        ("outcome", "0", row["out_0"]),
    ]
    rows += [(spec.terms[i], str(v), row[f"b{i}_{v}"]) for i in binary for v in (1, 0)]
    return pl.DataFrame(
        rows, schema=["variable_name", "variable_level", "value"], orient="row"
    ).select(
        "variable_name",
        "variable_level",
        pl.lit("count").alias("estimate_name"),
        pl.lit("count").alias("release_class"),
        pl.col("value").cast(pl.Float64),
    )


def _bins(cdm: CdmContext, design: str) -> pl.DataFrame:
    """Events and censorings per declared bin on this node (never released as such)."""
    sql = f"""SELECT 0 AS series, t, count(*) FILTER (event) AS n_event,
               count(*) FILTER (NOT event) AS n_censor
        FROM {design} GROUP BY t ORDER BY t"""
    return node_sql.query(cdm.con, sql, {})


def _segment_ends(cdm: CdmContext, spec: CoxSpec, bins: pl.DataFrame) -> list[int]:
    return segment_ends(bins, cdm.min_cell_count, spec.time_bin_days, spec.follow_up_days)


def _events(cdm: CdmContext, spec: CoxSpec) -> pl.DataFrame:
    """Round 0: guard counts, and events and leavers per node segment (``time_axis``)."""
    design, binary = _design(cdm, spec)
    bins = _bins(cdm, design)
    segments = per_segment(bins, _segment_ends(cdm, spec, bins), ["series"])
    events = segments.unpivot(
        index="t", on=["n_event", "n_leave"], variable_name="estimate_name"
    ).select(
        pl.lit(TIME_VARIABLE).alias("variable_name"),
        pl.col("t").cast(pl.String).alias("variable_level"),
        "estimate_name",
        pl.lit("count").alias("release_class"),
        pl.col("value").cast(pl.Float64),
    )
    return pl.concat([_guard_counts(cdm, spec, design, binary), events], how="vertical_relaxed")


def _checked_state(
    cdm: CdmContext, spec: CoxSpec, design: str, state: dict[str, Any]
) -> tuple[list[int], list[float]]:
    """The grid and coefficients of a state, checked against this node's own segments before
    any risk set is read: a grid that splits a segment (one leaver between two times) or a
    coefficient vector of the wrong shape is refused whoever sent it."""
    what = f"cox {spec.id}"
    ends = _segment_ends(cdm, spec, _bins(cdm, design))
    grid = check_grid(state.get("grid"), ends, spec.time_bin_days, what)
    beta = state.get("beta")
    p = len(spec.terms)
    if not isinstance(beta, list) or len(beta) != p:
        raise ValueError(f"{what}: state beta must hold {p} coefficients")
    if not all(isinstance(b, int | float) and np.isfinite(b) for b in beta):
        raise ValueError(f"{what}: state beta holds a value that is not a finite number")
    return grid, [float(b) for b in beta]


def _risk_sets(cdm: CdmContext, spec: CoxSpec, state: dict[str, Any]) -> pl.DataFrame:
    """Round r ≥ 1: risk-set sums at each grid time and event covariate sums at ``beta``.

    Times are coarsened to the grid first (a time becomes the first grid time at or after it),
    so the risk set at grid time ``g`` is every entry whose coarsened time is ``g`` or later:
    two grid times differ by whole segments of this node, 0 or ``>= k`` leavers each.
    """
    p = len(spec.terms)
    design, binary = _design(cdm, spec)
    grid, beta = _checked_state(cdm, spec, design, state)
    eta = " + ".join(f"$beta[{i + 1}] * x{i}" for i in range(p))
    pairs = [(i, j) for i in range(p) for j in range(i, p)]
    sums = ["count(*) AS n", "fsum(r) AS s0"]
    sums += [f"fsum(r * x{i}) AS s1_{i}" for i in range(p)]
    sums += [f"fsum(r * x{i} * x{j}) AS s2_{i}_{j}" for i, j in pairs]
    names = ["n", "s0"] + [f"s1_{i}" for i in range(p)] + [f"s2_{i}_{j}" for i, j in pairs]
    cumulative = ", ".join(f"fsum({c}) OVER later AS {c}" for c in names)
    picked = ", ".join(f"coalesce(c.{c}, 0) AS {c}" for c in names)
    event_sums = ", ".join(f"coalesce(fsum(x{i}) FILTER (event), 0) AS e{i}" for i in range(p))
    sql = f"""WITH scored AS (SELECT *, exp({eta}) AS r, {coarsen_sql("t")} AS tg FROM {design}),
        exits AS (SELECT tg, {", ".join(sums)} FROM scored GROUP BY tg),
        cumulative AS (
            SELECT tg, {cumulative} FROM exits
            WINDOW later AS (ORDER BY tg DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
        ),
        grid AS (SELECT unnest($grid::BIGINT[]) AS g)
        SELECT grid.g, {picked} FROM grid ASOF LEFT JOIN cumulative c ON grid.g <= c.tg
        ORDER BY grid.g
    """
    risk = node_sql.query(cdm.con, sql, {"grid": grid, "beta": beta})
    totals = node_sql.query(cdm.con, f"SELECT {event_sums} FROM {design}", {}).row(0, named=True)
    guards = _guard_counts(cdm, spec, design, binary)
    per_time = risk.unpivot(index="g", variable_name="estimate_name").select(
        pl.lit(TIME_VARIABLE).alias("variable_name"),
        pl.col("g").cast(pl.String).alias("variable_level"),
        pl.when(pl.col("estimate_name") == "n")
        .then(pl.lit("n_risk"))
        .otherwise(pl.col("estimate_name"))
        .alias("estimate_name"),
        pl.when(pl.col("estimate_name") == "n")
        .then(pl.lit("count"))
        .otherwise(pl.lit("value"))
        .alias("release_class"),
        pl.col("value").cast(pl.Float64),
    )
    events = pl.DataFrame(
        {
            "variable_name": ["event_sum"] * p,
            "variable_level": [str(i) for i in range(p)],
            "estimate_name": ["event_sum"] * p,
            "release_class": ["value"] * p,
            "value": [float(totals[f"e{i}"]) for i in range(p)],
        }
    )
    return pl.concat([per_time, guards, events], how="vertical_relaxed")


def _first_state(inputs: CombineInput, spec: CoxSpec) -> NextRound:
    """Round 1's state from the round-0 releases alone: the merged grid (``time_axis``), the
    pooled events per grid time, and beta = 0. Deterministic: node tables in node-name order.
    """
    names = pooling.node_names(inputs)
    segments = [segment_table(table) for table in inputs.statistics]
    for name, rows in zip(names, segments, strict=True):
        if rows["value"].is_nan().any() or rows["value"].is_null().any():
            raise ValueError(
                f"cox {spec.id}: node {name} withheld its event-time counts, so no grid "
                "keeps its risk sets whole; coarser time_bin_days would release them"
            )
    grid = merged_grid([rows["end"].to_list() for rows in segments])
    on_grid = CombineInput([to_grid(t, grid) for t in inputs.statistics], names)
    pooled = pooling.pool(on_grid).filter(
        (pl.col("variable_name") == TIME_VARIABLE) & (pl.col("estimate_name") == "n_event")
    )
    by_time = dict(zip(pooled["variable_level"], pooled["value"], strict=True))
    events = [float(by_time.get(str(g)) or 0.0) for g in grid]
    if sum(events) == 0:
        raise ValueError(f"cox {spec.id}: no outcome events released by any node")
    return NextRound(
        {"grid": grid, "events": events, "beta": [0.0] * len(spec.terms), "iteration": 0}
    )


def _score_information(
    pooled: pl.DataFrame, state: dict[str, Any], p: int
) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Pooled U, I, log partial likelihood and events used, from the nodes' risk-set sums.

    A grid time enters only when every answering node released its risk set there: a risk set
    missing one node's members would bias every later term.
    """
    beta = np.array(state["beta"])
    answered = int(pooled["nodes"].max())
    complete = pooled.filter(pl.col("variable_name") == "time").with_columns(
        (pl.col("nodes") == answered).all().over("variable_level").alias("_complete")
    )
    times = complete.filter(pl.col("_complete")).pivot(
        on="estimate_name", index="variable_level", values="value"
    )
    grid = dict(zip(map(str, state["grid"]), state["events"], strict=True))
    with_events = [t for t, d in grid.items() if d > 0]  # times without events add nothing
    times = times.drop_nulls().filter(pl.col("variable_level").is_in(with_events))
    d = np.array([grid[t] for t in times["variable_level"]], dtype=float)
    s0 = times["s0"].to_numpy()
    s1 = np.column_stack([times[f"s1_{i}"].to_numpy() for i in range(p)])
    s2 = np.zeros((times.height, p, p))
    for i in range(p):
        for j in range(i, p):
            s2[:, i, j] = s2[:, j, i] = times[f"s2_{i}_{j}"].to_numpy()
    sums = pooled.filter(pl.col("variable_name") == "event_sum")
    event_sum = dict(zip(sums["variable_level"], sums["value"], strict=True))
    e = np.array([event_sum[str(i)] for i in range(p)])
    mean = s1 / s0[:, None]
    score = e - (d[:, None] * mean).sum(0)
    info = np.einsum("k,kij->ij", d / s0, s2) - np.einsum("k,ki,kj->ij", d, mean, mean)
    loglik = float(beta @ e - np.sum(d * np.log(s0)))
    return score, info, loglik, int(d.sum())


@register
class Cox:
    """Federated Newton–Raphson for the Cox model with Breslow ties."""

    kind = "cox"
    Spec = CoxSpec

    def profile(self, spec: CoxSpec) -> ReleaseProfile:
        """Round 0 (events per segment), then one round per Newton–Raphson iteration."""
        return ReleaseProfile(max_rounds=1 + spec.max_iterations)

    def local(self, cdm: CdmContext, spec: CoxSpec, state: dict | None) -> pl.DataFrame:
        rows = _events(cdm, spec) if state is None else _risk_sets(cdm, spec, state)
        return make_statistics(
            rows.with_columns(
                pl.lit(spec.cohort).alias("cohort"),
                pl.col("value").cast(pl.Float64),
                pl.when(pl.col("release_class") == "count").then(RECORDS_PER_PERSON).alias("upper"),
            )
        )

    def combine(
        self, inputs: CombineInput, spec: CoxSpec, state: dict | None
    ) -> Finished | NextRound:
        if state is None:
            return _first_state(inputs, spec)
        pooled = pooling.pool(inputs)
        score, info, loglik, n_events = _score_information(pooled, state, len(spec.terms))
        step = newton_raphson(
            f"cox {spec.id}",
            spec.terms,
            state,
            score,
            info,
            -2 * loglik,
            spec.tolerance,
            spec.max_iterations,
        )
        if isinstance(step, NextRound):
            return step
        records = pooled.filter(pl.col("variable_name") == "records")["value"]
        withheld = ";".join(sorted({n for w in pooled["withheld"] if w for n in w.split(";")}))
        keys = {
            "group_name": "cohort_name",
            "group_level": spec.cohort,
            "additional_name": "outcome",
            "additional_level": spec.outcome,
        }
        model = {
            "number_records": int(records.sum()),
            "number_events": n_events,
            "log_partial_likelihood": -step.deviance / 2,
            "number_nodes": len(inputs.statistics),
        } | ({"nodes_withheld": withheld} if withheld else {})
        return Finished(
            pl.concat(
                [
                    coefficient_table(spec.terms, step, spec.confidence, "hazard_ratio", keys),
                    model_table(model, step, keys),
                ],
                how="vertical",
            )
        )
