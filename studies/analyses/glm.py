"""``glm``: logistic and Poisson regression fitted exactly by federated Newton–Raphson.

The log-likelihood of the pooled data is the sum of the nodes' log-likelihoods, so its score
vector ``U = Σ Xᵀ(y − μ)`` and information matrix ``I = Σ Xᵀ W X`` are sums of per-node
aggregates. Each round, every node returns its ``U``, ``I`` and deviance at the current
coefficients (``kind="value"`` rows), the coordinator sums them and takes the step
``β ← β + I⁻¹U`` (halving it if the deviance rose), until the step is below ``tolerance``: the
result is the maximum-likelihood fit of the union, equal to statsmodels on the pooled rows.
A node builds its design rows once per connection and cohorts (``node_sql.design_table``), so a
round after the first is one scan of them.
Nodes also return the counts the gate's regression guards look at: rows, outcome levels and the
levels of each binary covariate.

One row per entry of ``cohort``; the outcome is the presence (binomial) or the number (Poisson)
of ``outcome`` cohort entries starting within ``outcome_window`` days from index. Covariates: ``age``
at index (``(age − center) / scale``), ``sex`` (1 = male), ``cohort`` (1 = an entry of that cohort
starts within ``window`` days of index), ``concept_set`` (1 = a record of ``domain`` with a concept
of that study concept set starts within ``window`` days of index; the set is resolved on the
node and reached through ``CdmContext.concept_sets``). Poisson ``offset: true`` adds log(years observed in the
outcome window), dropping entries with no observed time there.

Study entry::

    - id: bleed_risk
      kind: glm
      family: binomial
      cohort: celecoxib
      outcome: gi_bleed
      outcome_window: {start: 1, end: 365}
      covariates:
        - {type: age, center: 50, scale: 10}
        - {type: sex}
        - {type: cohort, cohort: prior_nsaid, window: {start: -365, end: -1}}
        - {type: concept_set, concept_set: ppi, domain: drug, window: {start: -365, end: 0}}

summarised_result (result_type ``glm``), group ``cohort_name``/<cohort>, additional
``outcome``/<outcome cohort>: per term (``variable_name`` ``(Intercept)``, ``age``, ``sex_male``,
``cohort_<name>``, ``concept_set_<name>``): ``coefficient``, ``standard_error``, ``z_value``, ``p_value``,
``coefficient_95CI_lower``/``upper``, and ``odds_ratio`` (binomial) or ``rate_ratio`` (Poisson)
with ``..._95CI_lower``/``upper``; ``variable_name`` ``model``: ``number_records``,
``deviance``, ``df_residual``, ``iterations``, ``converged`` (logical), ``number_nodes``, and
``nodes_withheld`` (character, ``;``-joined) when a node's gate withheld part of its sums and the
node was left out of the fit. Count rows count cohort entries (``upper = inf``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from studies.analyses import node_sql, pooling
from studies.analyses.covariates import AgeCovariate, SexCovariate
from studies.analyses.spec_fields import RECORDS_PER_PERSON
from studies.analyses.specs import GlmSpec
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.cdm_tables import CDM_DOMAIN_TABLES
from studies.registry import register
from studies.results import estimates
from studies.statistics import make_statistics


def covariate_columns(
    cdm: CdmContext, covariates: list[Any], first: int = 0
) -> tuple[list[str], dict[str, Any], list[int]]:
    """SQL expressions (over a cohort-entry row ``e``) for covariates, their parameters and the
    positions of binary ones; positions start at ``first`` (after an intercept).

    Parameter names are generated here from positions, never taken from a study.
    """
    columns: list[str] = []
    params: dict[str, Any] = {}
    binary: list[int] = []
    for k, cov in enumerate(covariates):
        i = first + k
        if isinstance(cov, AgeCovariate):
            params |= {f"center{i}": cov.center, f"scale{i}": cov.scale}
            columns.append(f"(e.age - $center{i}) / $scale{i}")
            continue
        binary.append(i)
        if isinstance(cov, SexCovariate):
            columns.append("CASE WHEN e.sex = 'Male' THEN 1.0 ELSE 0.0 END")
            continue
        records, more = records_in_window(cdm, cov, i)
        params |= more
        columns.append(f"CASE WHEN EXISTS (SELECT 1 {records}) THEN 1.0 ELSE 0.0 END")
    return columns, params, binary


def records_in_window(cdm: CdmContext, cov: Any, i: int) -> tuple[str, dict[str, Any]]:
    """``FROM ... WHERE ...`` of the records of a cohort or concept-set covariate ``cov`` (at
    position ``i``) starting within its window of index (entry row ``e``), and its parameters.

    Table and column names come from the fixed domain map, the set and cohort as bound ids.
    """
    params: dict[str, Any] = {f"start{i}": cov.window.start, f"end{i}": cov.window.end}
    if getattr(cov, "cohort", None) is not None:
        params[f"cohort{i}"] = node_sql.cohort_id(cdm, cov.cohort)
        table, person, start = "cohort", "subject_id", "cohort_start_date"
        match = f"r.cohort_definition_id = $cohort{i}"
    else:
        params[f"codeset{i}"] = node_sql.codeset_id(cdm, cov.concept_set)
        domain = CDM_DOMAIN_TABLES[cov.domain]
        table, person, start = domain.table, "person_id", domain.start
        match = f"""r.{domain.concept} IN
            (SELECT concept_id FROM study_codeset WHERE codeset_id = $codeset{i})"""
    sql = f"""FROM {table} r
        WHERE {match} AND r.{person} = e.subject_id
          AND r.{start} BETWEEN e.cohort_start_date + $start{i}
                            AND e.cohort_start_date + $end{i}"""
    return sql, params


def _design(cdm: CdmContext, spec: GlmSpec) -> tuple[str, list[int]]:
    """The temp table of design rows (x0.., y, off, and the row's ``person``; see
    ``design_table``), built on the first round on this connection; indices of the binary
    columns.

    Column names x0, x1, ... and parameter names are generated here, never taken from a study.
    """
    intercept = ["1.0"] if spec.intercept else []
    covariates, cov_params, binary = covariate_columns(cdm, spec.covariates, len(intercept))
    columns = intercept + covariates
    params = (
        node_sql.entries_params(cdm, [spec.cohort])
        | cov_params
        | {
            "outcome_id": node_sql.cohort_id(cdm, spec.outcome),
            "out_start": spec.outcome_window.start,
            "out_end": spec.outcome_window.end,
        }
    )
    outcome_rows = """(SELECT count(*) FROM cohort o
        WHERE o.cohort_definition_id = $outcome_id AND o.subject_id = e.subject_id
          AND o.cohort_start_date BETWEEN e.cohort_start_date + $out_start
                                      AND e.cohort_start_date + $out_end)"""
    y = (
        outcome_rows
        if spec.family == "poisson"
        else f"CASE WHEN {outcome_rows} > 0 THEN 1.0 ELSE 0.0 END"
    )
    observed = """date_diff('day', e.cohort_start_date + $out_start,
                            least(e.cohort_start_date + $out_end, e.obs_end)) + 1"""
    offset = f"ln(({observed}) / 365.25)" if spec.offset else "0.0"
    where = f"WHERE e.obs_end IS NOT NULL AND {observed} > 0" if spec.offset else ""
    xs = ", ".join(f"CAST({expr} AS DOUBLE) AS x{i}" for i, expr in enumerate(columns))
    sql = f"""WITH {node_sql.ENTRIES_CTE}
        SELECT {xs}, CAST({y} AS DOUBLE) AS y, CAST({offset} AS DOUBLE) AS off,
            e.subject_id AS person
        FROM entries e {where}"""
    return node_sql.design_table(cdm, sql, params), binary


def _round_sql(spec: GlmSpec, design: str, binary: list[int]) -> str:
    """Score, information, deviance and guard counts at ``$beta`` over the design table."""
    p = len(spec.terms)
    eta = " + ".join(f"$beta[{i + 1}] * x{i}" for i in range(p)) + " + off"
    if spec.family == "binomial":
        mu, weight = "1 / (1 + exp(-eta))", "mu * (1 - mu)"
        deviance = "-2 * fsum(y * eta - (greatest(eta, 0) + ln(1 + exp(-abs(eta)))))"
        outcome_counts = "count(*) FILTER (y = 1) AS out_1, count(*) FILTER (y = 0) AS out_0"
    else:
        mu, weight = "exp(eta)", "mu"
        deviance = "2 * fsum(CASE WHEN y > 0 THEN y * ln(y / mu) ELSE 0 END - (y - mu))"
        outcome_counts = "count(*) FILTER (y > 0) AS out_1, count(*) FILTER (y = 0) AS out_0"
    sums = [f"fsum((y - mu) * x{i}) AS s{i}" for i in range(p)]
    sums += [f"fsum(w * x{i} * x{j}) AS h{i}_{j}" for i in range(p) for j in range(i, p)]
    guards = [
        f"count(*) FILTER (x{i} = 1) AS b{i}_1, count(*) FILTER (x{i} = 0) AS b{i}_0"
        for i in binary
    ]
    return f"""WITH eta AS (SELECT *, {eta} AS eta FROM {design}),
        fitted AS (SELECT *, {mu} AS mu FROM eta),
        weighted AS (SELECT *, {weight} AS w FROM fitted)
        SELECT count(*) AS n, {outcome_counts}, {", ".join(sums + guards)}, {deviance} AS deviance
        FROM weighted"""


def guard_person_counts(cdm: CdmContext, spec: GlmSpec) -> pl.DataFrame:
    """The regression guards' rows (records, outcome levels, binary covariate levels) as
    distinct persons, each bounded by one per person: what ``pooled_glm`` sums under noise
    before any score or information leaves a node (a record count has no per-person bound, so
    DP cannot noise it). A level's persons never exceed its records: a level of at least k
    persons holds at least k records."""
    design, binary = _design(cdm, spec)
    positive = "y = 1" if spec.family == "binomial" else "y > 0"
    guards = [
        f"count(DISTINCT person) FILTER (x{i} = 1) AS b{i}_1, "
        f"count(DISTINCT person) FILTER (x{i} = 0) AS b{i}_0"
        for i in binary
    ]
    sql = f"""SELECT count(DISTINCT person) AS n,
        count(DISTINCT person) FILTER ({positive}) AS out_1,
        count(DISTINCT person) FILTER (y = 0) AS out_0{"".join(", " + g for g in guards)}
        FROM {design}"""
    row = node_sql.query(cdm.con, sql, {}).row(0, named=True)
    no_sums = defaultdict(float, row)  # score, information, deviance: not computed, not sent
    counts = _statistics(spec, no_sums, binary).filter(pl.col("release_class") == "count")
    return counts.with_columns(upper=pl.lit(float("nan")))


def _statistics(spec: GlmSpec, row: dict[str, Any], binary: list[int]) -> pl.DataFrame:
    """One node's round as statistics rows: guard counts, then score/information/deviance."""
    terms, p = spec.terms, len(spec.terms)
    out_levels = ("1", "0") if spec.family == "binomial" else ("any", "none")
    rows = [("records", "", "count", "count", row["n"])]
    rows += [
        ("outcome", lvl, "count", "count", row[f"out_{k}"])
        for lvl, k in zip(out_levels, "10", strict=True)
    ]
    rows += [(terms[i], lvl, "count", "count", row[f"b{i}_{lvl}"]) for i in binary for lvl in "10"]
    rows += [("score", str(i), "score", "value", row[f"s{i}"]) for i in range(p)]
    rows += [
        ("information", f"{i},{j}", "information", "value", row[f"h{i}_{j}"])
        for i in range(p)
        for j in range(i, p)
    ]
    rows.append(("deviance", "", "deviance", "value", row["deviance"]))
    frame = pl.DataFrame(
        rows,
        schema=["variable_name", "variable_level", "estimate_name", "release_class", "value"],
        orient="row",
    ).with_columns(
        pl.col("value").cast(pl.Float64).fill_null(0.0),
        pl.lit(spec.cohort).alias("cohort"),
        pl.when(pl.col("release_class") == "count").then(RECORDS_PER_PERSON).alias("upper"),
    )
    return make_statistics(frame)


def released_nodes(inputs: CombineInput) -> CombineInput:
    """The nodes whose model values (score, information...) all came through their gate.

    A node that withheld any of them is left out as a whole (part of its sums would bias the
    fit); ``withheld_nodes`` names it in the result.
    """
    names = pooling.node_names(inputs)
    kept = [
        (name, f)
        for name, f in zip(names, inputs.statistics, strict=True)
        if f.height and not f.filter(pl.col("release_class") == "value")["value"].is_nan().any()
    ]
    return CombineInput([f for _, f in kept], [name for name, _ in kept])


def withheld_nodes(inputs: CombineInput, used: CombineInput) -> dict[str, str]:
    """``{"nodes_withheld": "a;b"}`` for model tables when nodes were left out, else ``{}``."""
    left_out = [n for n in pooling.node_names(inputs) if n not in used.node_names]
    return {"nodes_withheld": ";".join(left_out)} if left_out else {}


def _sums(inputs: CombineInput, p: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Pooled score U, information I, deviance and number of rows over released nodes."""
    total = pooling.pool(inputs)
    value = {
        (r["variable_name"], r["variable_level"]): r["value"] for r in total.iter_rows(named=True)
    }
    score = np.array([value[("score", str(i))] for i in range(p)])
    info = np.zeros((p, p))
    for i in range(p):
        for j in range(i, p):
            info[i, j] = info[j, i] = value[("information", f"{i},{j}")]
    return score, info, value[("deviance", "")], value[("records", "")]


@dataclass
class Fit:
    """A Newton–Raphson fit: coefficients, their covariance (inverse information), the objective
    (deviance, or −2 log partial likelihood for Cox), rounds taken and whether it converged."""

    beta: np.ndarray
    covariance: np.ndarray
    deviance: float
    iterations: int
    converged: bool


def newton_raphson(
    name: str,
    terms: list[str],
    state: dict[str, Any] | None,
    score: np.ndarray,
    info: np.ndarray,
    deviance: float,
    tolerance: float,
    max_iterations: int,
) -> Fit | NextRound:
    """One coordinator step of Newton–Raphson on pooled score and information at ``state["beta"]``.

    Takes ``β + I⁻¹U``; if the objective rose since the last round, goes halfway back instead.
    Finished when the step is below ``tolerance`` (coefficients after that last step, covariance
    from the information of this round). Other keys of ``state`` are carried along.
    """
    p = len(terms)
    state = dict(state or {})
    beta = np.array(state.get("beta") or [0.0] * p)
    iteration = int(state.get("iteration", 0)) + 1
    previous = state.get("deviance")
    if previous is not None and deviance > previous + 1e-12 * (1 + abs(previous)):
        if iteration >= max_iterations:
            raise ValueError(f"{name}: no convergence in {max_iterations} iterations")
        halfway = (beta + np.array(state["previous_beta"])) / 2
        return NextRound(state | {"beta": halfway.tolist(), "iteration": iteration})
    if np.linalg.matrix_rank(info) < p:
        raise ValueError(
            f"{name}: information matrix is singular; terms {terms} are collinear "
            "or a covariate is constant in the pooled data"
        )
    step = np.linalg.solve(info, score)
    if np.max(np.abs(step)) < tolerance:
        return Fit(beta + step, np.linalg.inv(info), deviance, iteration, True)
    if iteration >= max_iterations:
        return Fit(beta, np.linalg.inv(info), deviance, iteration, False)
    return NextRound(
        state
        | {
            "beta": (beta + step).tolist(),
            "previous_beta": beta.tolist(),
            "deviance": deviance,
            "iteration": iteration,
        }
    )


def coefficient_table(
    terms: list[str], fit: Fit, confidence: float, ratio: str, keys: dict[str, str]
) -> pl.DataFrame:
    """Per-term summarised_result rows: coefficient, SE, z, p, CI, and exp(coefficient) as
    ``ratio`` (odds_ratio, rate_ratio, hazard_ratio) with its CI."""
    from scipy import stats  # here, not at the top: a study validates without scipy

    beta = fit.beta
    se = np.sqrt(np.diag(fit.covariance))
    z = pooling.z_value(confidence)
    zs = beta / se
    table = pl.DataFrame(
        {
            "variable_name": terms,
            "coefficient": beta,
            "standard_error": se,
            "z_value": zs,
            "p_value": 2 * stats.norm.sf(np.abs(zs)),
            "coefficient_95CI_lower": beta - z * se,
            "coefficient_95CI_upper": beta + z * se,
            ratio: np.exp(beta),
            f"{ratio}_95CI_lower": np.exp(beta - z * se),
            f"{ratio}_95CI_upper": np.exp(beta + z * se),
        }
    )
    return estimates(table, dict.fromkeys(table.columns[1:], "numeric"), **keys)


def model_table(model: dict[str, Any], fit: Fit, keys: dict[str, str]) -> pl.DataFrame:
    """``variable_name="model"`` rows: the given numbers (integers unless float) plus
    ``iterations`` and ``converged``."""
    numbers = {**model, "iterations": fit.iterations}
    frame = pl.DataFrame({k: [v] for k, v in numbers.items()})
    types = {k: _estimate_type(v) for k, v in numbers.items()}
    summary = estimates(frame, types, variable_name="model", **keys)
    converged = summary.head(1).with_columns(
        pl.lit("converged").alias("estimate_name"),
        pl.lit("logical").alias("estimate_type"),
        pl.lit("TRUE" if fit.converged else "FALSE").alias("estimate_value"),
    )
    return pl.concat([summary, converged], how="vertical")


def _estimate_type(value: Any) -> str:
    if isinstance(value, str):
        return "character"
    return "numeric" if isinstance(value, float) else "integer"


@register
class Glm:
    """Federated Newton–Raphson for binomial (logit) and Poisson (log) GLMs."""

    kind = "glm"
    Spec = GlmSpec

    def profile(self, spec: GlmSpec) -> ReleaseProfile:
        """One round per Newton–Raphson iteration (a halving step counts as one)."""
        return ReleaseProfile(max_rounds=spec.max_iterations)

    def local(self, cdm: CdmContext, spec: GlmSpec, state: dict | None) -> pl.DataFrame:
        beta = (state or {}).get("beta") or [0.0] * len(spec.terms)
        if len(beta) != len(spec.terms):
            raise ValueError(f"state has {len(beta)} coefficients, the model has {len(spec.terms)}")
        design, binary = _design(cdm, spec)
        sql = _round_sql(spec, design, binary)
        row = node_sql.query(cdm.con, sql, {"beta": [float(b) for b in beta]}).row(0, named=True)
        return _statistics(spec, row, binary)

    def combine(
        self, inputs: CombineInput, spec: GlmSpec, state: dict | None
    ) -> Finished | NextRound:
        released = released_nodes(inputs)
        if not released.statistics:
            raise ValueError(f"glm {spec.id}: no node released its score and information")
        score, info, deviance, n = _sums(released, len(spec.terms))
        if n == 0:
            raise ValueError(f"glm {spec.id}: cohort {spec.cohort!r} has no entries at any node")
        step = newton_raphson(
            f"glm {spec.id}",
            spec.terms,
            state,
            score,
            info,
            deviance,
            spec.tolerance,
            spec.max_iterations,
        )
        if isinstance(step, NextRound):
            return step
        extra = withheld_nodes(inputs, released)
        return Finished(fitted_model(spec, step, int(n), len(released.statistics), extra))


def fitted_model(
    spec: GlmSpec, fit: Fit, records: int, nodes: int, extra: dict[str, Any] | None = None
) -> pl.DataFrame:
    """A fitted GLM's summarised_result: per-term rows and the ``model`` rows (``extra`` adds
    to those, e.g. ``nodes_withheld``); shared by ``glm`` and ``pooled_glm``."""
    keys = {
        "group_name": "cohort_name",
        "group_level": spec.cohort,
        "additional_name": "outcome",
        "additional_level": spec.outcome,
    }
    ratio = "odds_ratio" if spec.family == "binomial" else "rate_ratio"
    model = {
        "number_records": records,
        "deviance": float(fit.deviance),
        "df_residual": records - len(spec.terms),
        "number_nodes": nodes,
    } | (extra or {})
    return pl.concat(
        [
            coefficient_table(spec.terms, fit, spec.confidence, ratio, keys),
            model_table(model, fit, keys),
        ],
        how="vertical",
    )
