"""``dp_sgd``: a logistic regression (or small MLP) trained across nodes by federated DP-SGD.

Each node builds one row per person (their first entry in ``cohort``) with the study's features
(``studies.analyses.features``: the glm kind's age, sex, cohort and concept-set flags, and age
groups, index year, capped record counts in windows before index) and the outcome: an
``outcome`` entry starting within ``outcome_window`` days of index. A person is held out of
training when a keyed hash of their person id (key: this analysis's id and seed) falls below
``holdout``: a per-person rule, so one person's presence moves no one else.
Rows are persons, so Opacus's per-example guarantee is a per-person guarantee.

Rounds. Round 0 starts from weights initialised under ``seed`` (the same at every node); in each
of ``rounds`` training rounds every node runs ``epochs`` local epochs of Opacus DP-SGD
(``privacy.dpsgd``) from the state's weights and releases its new weights (``value`` rows) with
its number of training rows (a ``count`` row, OpenDP-noised at ``size_rho``). ``combine``
averages the weights weighted by those sizes (FedAvg), summed in node-name order: a pure
function of the released tables and the state, so each node can derive the next state itself
from the signed transcript. After the last training round one evaluation round asks every node
for its hold-out counts per outcome and predicted-risk bin (``evaluation_edges``, declared by the
study, never by data), OpenDP-noised at ``evaluation_rho``; ``combine`` pools them into AUC
(with a Hanley-McNeil interval), Brier score and calibration (intercept, slope, observed and
expected risk per bin), pooled and per node (``studies.analyses.risk_bins``). Bin counts and risks are computed at the bins'
representative risks (midpoints on the logit scale), so the metrics are binned approximations.

Noise: a study may state ``noise_multiplier``; without it each node's gate fixes the smallest
whose planned rounds and noisy counts fit the permit's grant at the node's delta
(``DpSgdSpec.planned_history``, ``privacy.dpsgd.fixed_noise_multiplier``) and trains at it
(``CdmContext.noise_multiplier``).

Privacy: the weights are DP by DP-SGD, every released count by OpenDP; the gate charges both in
one RDP accountant per permit (``node.gate``, permit mechanism ``dp_sgd``). A node whose exact
counts show fewer than ``min_persons`` training rows or an outcome level (zero included) below the
minimum cell count refuses the round (audited) and takes no part.

Non-private baseline: under a permit grant of mechanism ``none`` a node whose policy sets
``allow_nonprivate_models`` trains the same logistic model without noise, its batches from
``batch_seed`` (so it equals the run in process), and releases it exactly after the GLM's
regression guards on its exact counts, ``feature_level`` rows included (``node.gate_release``).

Study entry::

    - id: bleed_model
      kind: dp_sgd
      cohort: population
      outcome: gi_bleed
      covariates:
        - {type: age_group, low: 40, high: 64}
        - {type: sex}
        - {type: concept_count, concept_set: ppi, domain: drug, cap: 10}
      rounds: 3
      epochs: 20
      sample_rate: 0.2
      max_grad_norm: 5.0
      learning_rate: 2.0

summarised_result (result_type ``dp_sgd``), group ``cohort_name``/<cohort>, additional
``outcome``/<outcome>. The weights are a prediction model, not effect estimates: logistic
(``hidden: 0``) per term (``(Intercept)``, ``age``, ``sex_male``, ``cohort_<name>``) a
``weight`` and ``weight_spread_between_nodes`` (the size-weighted SD of the nodes' last-round
weights around their average: a sign of how unstable DP-SGD weights are, which vary run to run
by more than their size suggests; so no odds ratios);
MLP: ``variable_name`` ``parameter``, ``variable_level`` its index, ``weight``.
``variable_name`` ``model``: ``rounds``, ``number_records`` (noisy training rows of the last
round), ``number_nodes``, ``estimand`` ("prediction model"). ``variable_name`` ``evaluation``
(pooled, and per node with ``cdm_name`` = the node): ``number_records``, ``number_events``,
``auc``, ``auc_lower``/``auc_upper`` (95 %), ``brier_score``, ``calibration_intercept``,
``calibration_slope``; ``variable_name`` ``calibration``, ``variable_level`` the bin (pooled,
and per node): ``number_records``, ``number_events``, ``observed_risk``, ``expected_risk`` (the
ROC curve's and calibration plot's points). Through gates, ``variable_name`` ``privacy``,
``variable_level`` the round, ``cdm_name`` the node: ``epsilon`` (the node's permit epsilon
after that round's release), ``epsilon_analysis`` and ``noise_multiplier``, from the accounting
rows each gate adds to its signed release (``accounting_rows``). With ``trace: true`` every training
round also releases the hold-out's noisy risk bins at its incoming weights (a loss trace:
``variable_name`` ``trace``, ``variable_level`` the round, ``number_records``,
``number_events``, ``auc``, ``brier_score``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

import numpy as np
import polars as pl

from studies.analyses import node_sql
from studies.analyses.covariates import CohortCovariate
from studies.analyses.features import feature_columns, level_features
from studies.analyses.risk_bins import bin_levels, calibration_rows, evaluation_metrics, mid_risks
from studies.analyses.specs import EVALUATE, TRAIN, DpSgdSpec, phase
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.registry import register
from studies.results import POOLED, estimates
from studies.statistics import make_statistics

#: The released hold-out counts per risk bin: persons with the outcome, persons without.
BIN_VARIABLES = ("risk_bin_1", "risk_bin_0")
#: The gate's accounting rows in a release, and the charge settings they carry.
ACCOUNTING = "accounting"
ACCOUNTING_ESTIMATES = {
    "epsilon": "epsilon_total",
    "epsilon_analysis": "epsilon_analysis",
    "noise_multiplier": "noise_scale",
}


def accounting_rows(spec: DpSgdSpec, settings: dict[str, Any]) -> pl.DataFrame:
    """The value rows a node's gate adds to each release (signed with it): its epsilon after
    the release (the permit's and this analysis's own) and its noise multiplier, from the
    charge's ``settings``. Public numbers (the study, the grant and the node's delta fix them);
    they give the result its epsilon per node and round."""
    rows = [
        (ACCOUNTING, "", name, "value", float(settings[key]))
        for name, key in ACCOUNTING_ESTIMATES.items()
    ]
    frame = pl.DataFrame(
        rows,
        schema=["variable_name", "variable_level", "estimate_name", "release_class", "value"],
        orient="row",
    )
    return make_statistics(frame.with_columns(pl.lit(spec.cohort).alias("cohort")))


def _rows(cdm: CdmContext, spec: DpSgdSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Person ids, features and outcome, one row per person (first cohort entry), ordered by
    person; the rows are built once per connection and cohorts (``node_sql.design_table``).

    Feature SQL comes from ``studies.analyses.features`` (the glm kind's covariates and more:
    age groups, index year, capped record counts); the outcome is the cohort covariate of
    ``outcome`` in ``outcome_window``. Names of columns and parameters are generated, never
    taken from a study.
    """
    outcome = CohortCovariate(type="cohort", cohort=spec.outcome, window=spec.outcome_window)
    columns, params = feature_columns(cdm, [*spec.covariates, outcome])
    xs = ", ".join(f"{expr} AS x{i}" for i, expr in enumerate(columns))
    sql = f"""WITH {node_sql.ENTRIES_CTE},
        first_entry AS (
            SELECT * FROM entries
            QUALIFY row_number() OVER (PARTITION BY subject_id ORDER BY cohort_start_date) = 1
        )
        SELECT e.subject_id, {xs} FROM first_entry e"""
    rows = node_sql.design_table(cdm, sql, params | node_sql.entries_params(cdm, [spec.cohort]))
    frame = node_sql.query(cdm.con, f"SELECT * FROM {rows} ORDER BY subject_id", {})
    if not frame.height:
        return np.zeros(0, np.int64), np.zeros((0, len(columns) - 1)), np.zeros(0)
    data = frame.drop("subject_id").to_numpy().astype(np.float64)
    return frame["subject_id"].to_numpy().astype(np.int64), data[:, :-1], data[:, -1]


def held_out(person_ids: np.ndarray, spec: DpSgdSpec) -> np.ndarray:
    """Whether each person is held out: HMAC-SHA256 of the person id under a key from this
    analysis's id and ``seed``, read as a number in [0, 1), below ``holdout``.

    A per-person function: adding or removing one person moves no one else between training
    and hold-out (a permutation of rows would). The key leaves out the training settings, so
    models tuned on one study compare on the same hold-out. It is public (the study is), which
    is fine: the split is not private, it only decides whose rows train.
    """
    material = f"fedomop dp_sgd hold-out\x00{spec.id}\x00{spec.seed}".encode()
    key = hashlib.sha256(material).digest()
    draws = [
        int.from_bytes(hmac.new(key, str(int(i)).encode(), hashlib.sha256).digest()[:8], "big")
        for i in person_ids
    ]
    return np.array(draws, dtype=np.float64) / 2.0**64 < spec.holdout


def _statistics(
    spec: DpSgdSpec,
    y: np.ndarray,
    values: list[tuple[str, str, str, float]],
    bins: list[tuple[float, float]] | None = None,
    *,
    x: np.ndarray | None = None,
) -> Any:
    """The exact guard counts (``records``, ``outcome`` levels and, for training rows ``x``,
    ``feature_level`` rows: each level-counted feature's persons with it and without it; never
    released), the released counts (``size``: training rows, when ``x`` is given;
    ``risk_bin_1``/``risk_bin_0``: hold-out persons with and without the outcome per risk bin,
    each count its own group: the counts are noisy, not linked cells of one person set) and the
    value rows (variable_name, variable_level, estimate_name, value)."""
    from privacy.dpsgd import LEVEL_VARIABLE

    rows = [("records", "", "count", "count", float(len(y)))]
    rows += [("outcome", "1", "count", "count", float(y.sum()))]
    rows += [("outcome", "0", "count", "count", float(len(y) - y.sum()))]
    if x is not None:  # the released training size, FedAvg's weight; the features' levels
        rows += [("size", "", "count", "count", float(len(y)))]
        for i in level_features(spec.covariates):
            present = float(np.count_nonzero(x[:, i]))
            term = spec.terms[i]
            rows += [(LEVEL_VARIABLE, f"{term}:1", "count", "count", present)]
            rows += [(LEVEL_VARIABLE, f"{term}:0", "count", "count", float(len(y)) - present)]
    for level, (events, others) in zip(bin_levels(spec), bins or [], strict=False):
        rows += [(BIN_VARIABLES[0], level, "count", "count", float(events))]
        rows += [(BIN_VARIABLES[1], level, "count", "count", float(others))]
    rows += [(name, level, estimate, "value", value) for name, level, estimate, value in values]
    frame = pl.DataFrame(
        rows,
        schema=["variable_name", "variable_level", "estimate_name", "release_class", "value"],
        orient="row",
    ).with_columns(pl.lit(spec.cohort).alias("cohort"))
    return make_statistics(frame)


def batch_seed(spec: DpSgdSpec, round_: int) -> int:
    """The seed of the non-private baseline's batches in a round: from the analysis's id, its
    ``seed`` and the round, so a gated baseline equals the same run in process. Never used
    under DP-SGD, whose batches must stay secret (``privacy.dpsgd.train_round``)."""
    material = f"fedomop dp_sgd non-private batches\x00{spec.id}\x00{spec.seed}\x00{round_}"
    return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big") >> 1


def _node_values(frame: pl.DataFrame, variable: str) -> tuple[float, np.ndarray]:
    """A node's released (noisy) number of rows and its value rows of ``variable``."""
    records = frame.filter(pl.col("variable_name") == "size")["value"]
    values = frame.filter(pl.col("variable_name") == variable)
    ordered = values.sort(pl.col("variable_level").cast(pl.Int64, strict=False))
    n = float(records[0]) if records.len() else float("nan")
    return n, ordered["value"].to_numpy()


def _node_bins(frame: pl.DataFrame, spec: DpSgdSpec) -> np.ndarray:
    """A node's released (noisy) hold-out counts, (bins, 2) for outcome 1 and 0; a suppressed
    or negative noisy count reads as 0."""
    table = frame.filter(pl.col("variable_name").is_in(BIN_VARIABLES))
    out = np.zeros((len(spec.evaluation_edges) + 1, 2))
    for name, level, value in table.select("variable_name", "variable_level", "value").rows():
        column = BIN_VARIABLES.index(name)
        out[int(level), column] = value if math.isfinite(value) and value > 0 else 0.0
    return out


@register
class DpSgd:
    """Federated averaging of Opacus DP-SGD rounds, then a hold-out evaluation round."""

    kind = "dp_sgd"
    Spec = DpSgdSpec

    def profile(self, spec: DpSgdSpec) -> ReleaseProfile:
        """The training rounds, then one evaluation round; each person is in one count row."""
        return ReleaseProfile(max_rounds=spec.rounds + 1, rows_per_person=1)

    def local(self, cdm: CdmContext, spec: DpSgdSpec, state: dict | None) -> pl.DataFrame:
        from privacy.dpsgd import NON_PRIVATE, initial_weights, risk_bins, train_round

        state = state or {}
        ids, x, y = _rows(cdm, spec)
        weights = state.get("weights") or initial_weights(x.shape[1], spec.hidden, spec.seed)
        held = held_out(ids, spec)
        if phase(state) == EVALUATE:
            bins = risk_bins(x[held], y[held], weights, spec.hidden, spec.evaluation_edges)
            return _statistics(spec, y[held], [], bins)
        train = ~held
        trace = None
        if spec.trace:  # the incoming weights on the hold-out, before this round trains
            trace = risk_bins(x[held], y[held], weights, spec.hidden, spec.evaluation_edges)
        start = [float(w) for w in weights]
        if cdm.noise_multiplier == NON_PRIVATE:  # the gate's baseline under a none grant
            plain = spec.training(NON_PRIVATE)
            seed = batch_seed(spec, int(state.get("round", 0)))
            new = train_round(x[train], y[train], start, plain, private=False, seed=seed)
        else:
            config = spec.training(cdm.noise_multiplier)  # the gate's, fixed from the budget
            new = train_round(x[train], y[train], start, config)
        values = [("weight", str(i), "weight", w) for i, w in enumerate(new)]
        return _statistics(spec, y[train], values, trace, x=x[train])

    def combine(
        self, inputs: CombineInput, spec: DpSgdSpec, state: dict | None
    ) -> Finished | NextRound:
        """FedAvg of the released weights (deterministic: node-name order), or the result."""
        state = state or {}
        round_ = int(state.get("round", 0))
        spent = [*state.get("accounting", []), *_accounting(inputs, round_)]
        if phase(state) == EVALUATE:
            return Finished(_result(spec, state | {"accounting": spent}, inputs))
        released = [_node_values(f, "weight") for f in inputs.statistics if f.height]
        released = [
            (n, w) for n, w in released if np.isfinite(n) and w.size and np.isfinite(w).all()
        ]
        if not released:
            raise ValueError(f"dp_sgd {spec.id} round {round_}: no node released its weights")
        sizes = np.array([max(n, 1.0) for n, _ in released])  # noisy sizes: at least one row
        average = np.zeros(released[0][1].size)
        for size, (_, w) in zip(sizes, released, strict=True):  # in node order, one by one
            average = average + size * w
        average = average / math.fsum(sizes)
        spread = np.zeros(average.size)  # the nodes' weighted spread around their average
        for size, (_, w) in zip(sizes, released, strict=True):
            spread = spread + size * (w - average) ** 2
        next_round = round_ + 1
        following = {
            "phase": TRAIN if next_round < spec.rounds else EVALUATE,
            "round": next_round,
            "weights": average.tolist(),
            "spread": np.sqrt(spread / math.fsum(sizes)).tolist(),
            "records": int(round(math.fsum(sizes))),
            "nodes": len(released),
        }
        if spent:
            following["accounting"] = spent
        if spec.trace:
            pooled = sum(
                (_node_bins(f, spec) for f in inputs.statistics if f.height), _no_bins(spec)
            )
            metrics = evaluation_metrics(pooled, spec)
            entry = {"round": round_} | {k: _json_number(metrics.get(k)) for k in TRACE_METRICS}
            following["trace"] = [*state.get("trace", []), entry]
        return NextRound(following)


def _accounting(inputs: CombineInput, round_: int) -> list[dict[str, Any]]:
    """Each node's accounting rows of this round (``accounting_rows``), in node
    order: what its gate had spent after the release; none outside a gate."""
    names = inputs.node_names or [f"node{i + 1}" for i in range(len(inputs.statistics))]
    out = []
    for name, frame in zip(names, inputs.statistics, strict=True):
        rows = frame.filter(pl.col("variable_name") == ACCOUNTING) if frame.height else frame
        values = dict(zip(rows["estimate_name"].to_list(), rows["value"].to_list(), strict=True))
        if values:
            out.append({"round": round_, "node": name} | values)
    return out


def _json_number(value: Any) -> float | None:
    """A metric as the state holds it: None for a missing or undefined one (an AUC without
    events), since the state is canonical JSON, which has no NaN."""
    return float(value) if value is not None and math.isfinite(value) else None


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


#: What a traced round adds to the state (and the result's ``trace`` rows) per round.
TRACE_METRICS = ("number_records", "number_events", "auc", "brier_score")


def _no_bins(spec: DpSgdSpec) -> np.ndarray:
    return np.zeros((len(spec.evaluation_edges) + 1, 2))


def released_weights(result: pl.DataFrame, spec: DpSgdSpec) -> list[float]:
    """The final (FedAvg) weights back from the analysis's summarised_result, in the model's
    order (the inverse of ``_result``'s model rows); ``ValueError`` when any is missing."""
    rows = result.filter((pl.col("estimate_name") == "weight") & (pl.col("cdm_name") == POOLED))
    if spec.hidden == 0:
        keys, column = [*spec.terms, "(Intercept)"], "variable_name"
    else:
        keys = [str(i) for i in range(rows.height)]
        rows, column = rows.filter(pl.col("variable_name") == "parameter"), "variable_level"
    found = dict(zip(rows[column].to_list(), rows["estimate_value"].to_list(), strict=True))
    missing = [k for k in keys if k not in found]
    if missing or not keys:
        raise ValueError(f"the released {spec.id!r} model lacks the weights of {missing or keys}")
    return [float(found[k]) for k in keys]


def _result(spec: DpSgdSpec, state: dict[str, Any], inputs: CombineInput) -> pl.DataFrame:
    """Final weights (a prediction model), its training summary, and the pooled and per-node
    hold-out metrics and calibration."""
    keys = {
        "group_name": "cohort_name",
        "group_level": spec.cohort,
        "additional_name": "outcome",
        "additional_level": spec.outcome,
    }
    weights = np.array(state["weights"])
    spread = np.array(state.get("spread", [math.nan] * weights.size))
    types = {"weight": "numeric", "weight_spread_between_nodes": "numeric"}
    if spec.hidden == 0:  # Linear layer: the weights, one per term, then the bias
        table = pl.DataFrame(
            {
                "variable_name": [*spec.terms, "(Intercept)"],
                "weight": weights,
                "weight_spread_between_nodes": spread,
            }
        )
        model = estimates(table, types, **keys)
    else:
        table = pl.DataFrame(
            {
                "variable_level": [str(i) for i in range(weights.size)],
                "weight": weights,
                "weight_spread_between_nodes": spread,
            }
        )
        model = estimates(table, types, variable_name="parameter", **keys)
    summary = pl.DataFrame(
        {
            "rounds": [spec.rounds],
            "number_records": [state["records"]],
            "number_nodes": [state["nodes"]],
        }
    )
    integers = dict.fromkeys(summary.columns, "integer")
    trained = "DP-SGD" if state.get("accounting") else "FedAvg"  # nodes' gates sign the former
    estimand = pl.DataFrame({"estimand": [f"prediction model ({trained}), not effect estimates"]})
    parts = [
        model,
        estimates(summary, integers, variable_name="model", **keys),
        estimates(estimand, {"estimand": "character"}, variable_name="model", **keys),
    ]
    names = inputs.node_names or [f"node{i + 1}" for i in range(len(inputs.statistics))]
    per_node = {
        n: _node_bins(f, spec) for n, f in zip(names, inputs.statistics, strict=True) if f.height
    }
    pooled = sum(per_node.values(), _no_bins(spec))
    risk = mid_risks(spec)
    for name, bins in [("federated", pooled), *per_node.items()]:
        metrics = evaluation_metrics(bins, spec)
        row = pl.DataFrame({k: [v] for k, v in metrics.items()})
        types = {c: "numeric" for c in row.columns}
        where = {} if name == "federated" else {"cdm_name": name}
        parts.append(estimates(row, types, variable_name="evaluation", **where, **keys))
    for name, bins in [("federated", pooled), *per_node.items()]:  # pooled, then per node
        where = {} if name == "federated" else {"cdm_name": name}
        parts.append(calibration_rows(bins, risk, spec, where | keys))
    if state.get("accounting"):  # epsilon per node and round, as each node's gate signed it
        spent = pl.DataFrame(
            {
                "cdm_name": [e["node"] for e in state["accounting"]],
                "variable_level": [str(e["round"]) for e in state["accounting"]],
            }
            | {k: [_number(e.get(k)) for e in state["accounting"]]
               for k in ACCOUNTING_ESTIMATES}
        )  # fmt: skip
        types = dict.fromkeys(ACCOUNTING_ESTIMATES, "numeric")
        parts.append(estimates(spent, types, variable_name="privacy", **keys))
    if state.get("trace"):  # the loss trace: the incoming weights of each training round
        trace = pl.DataFrame(
            {"variable_level": [str(e["round"]) for e in state["trace"]]}
            | {k: [_number(e[k]) for e in state["trace"]] for k in TRACE_METRICS}
        )
        types = dict.fromkeys(TRACE_METRICS, "numeric")
        parts.append(estimates(trace, types, variable_name="trace", **keys))
    return pl.concat(parts, how="vertical")
