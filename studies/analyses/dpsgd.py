"""``dp_sgd``: a logistic regression (or small MLP) trained across nodes by federated DP-SGD.

Each node builds one row per person (their first entry in ``cohort``) with the glm kind's
covariates (``studies.analyses.glm.covariate_columns``: age, sex, prior cohorts) and the
outcome: an ``outcome`` entry starting within ``outcome_window`` days of index. A seeded split
holds ``holdout`` of the rows out of training. Rows are persons, so Opacus's per-example
guarantee is a per-person guarantee.

Rounds. Round 0 starts from weights initialised under ``seed`` (the same at every node); in each
of ``rounds`` training rounds every node runs ``epochs`` local epochs of Opacus DP-SGD
(``privacy.dpsgd``) from the coordinator's weights and returns its new weights (``value`` rows)
with its number of training rows and outcome levels (``count`` rows, which the gate's regression
guards look at); ``combine`` averages the weights weighted by training rows (FedAvg). After the
last training round one evaluation round asks every node for the AUC, accuracy and Brier score of
the final model on its hold-out rows (no training, no privacy cost; these metrics are released
under disclosure control only, like any exact aggregate).

Privacy: the weights are DP by DP-SGD; the gate charges each training round from Opacus's RDP
accountant kept in the node's ledger (``node.gate``, permit mechanism ``dp_sgd``), adding no
count noise of its own. The numbers of rows are released exactly, under the minimum cell count.

Study entry::

    - id: bleed_model
      kind: dp_sgd
      cohort: population
      outcome: gi_bleed
      outcome_window: {start: 1, end: 365}
      covariates:
        - {type: age, center: 50, scale: 10}
        - {type: sex}
      rounds: 3
      epochs: 1
      sample_rate: 0.05
      noise_multiplier: 1.0
      max_grad_norm: 1.0
      learning_rate: 0.5

summarised_result (result_type ``dp_sgd``), group ``cohort_name``/<cohort>, additional
``outcome``/<outcome>: logistic (``hidden: 0``): per term (``(Intercept)``, ``age``,
``sex_male``, ``cohort_<name>``) ``coefficient`` and ``odds_ratio``; MLP: ``variable_name``
``parameter``, ``variable_level`` its index, ``weight``. ``variable_name`` ``model``:
``rounds``, ``number_records`` (training rows of the last round), ``number_nodes``. Per node
(``cdm_name`` = the node), ``variable_name`` ``evaluation``: ``number_records`` (hold-out rows),
``auc``, ``accuracy``, ``brier_score``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import Field

from studies.analyses import register
from studies.analyses.common import (
    ENTRIES_CTE,
    Name,
    Window,
    design_table,
    entries_params,
    query,
)
from studies.analyses.glm import CohortCovariate, Covariate, CovariatesSpec, covariate_columns
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.results import estimates
from studies.statistics import make_statistics

#: The state's phases: training rounds, then one evaluation round.
TRAIN, EVALUATE = "train", "evaluate"


class DpSgdSpec(CovariatesSpec):
    """A model of ``outcome`` after entry into ``cohort``, trained by federated DP-SGD."""

    kind: Literal["dp_sgd"]
    cohort: Name
    outcome: Name
    outcome_window: Window = Window(start=1, end=365)
    covariates: list[Covariate] = Field(min_length=1)
    hidden: int = Field(default=0, ge=0, le=64, description="0: logistic regression")
    rounds: int = Field(default=3, ge=1, le=50)
    epochs: int = Field(default=1, ge=1, le=20)
    sample_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    noise_multiplier: float = Field(default=1.0, ge=0.3, le=100.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0, le=100.0)
    learning_rate: float = Field(default=0.5, gt=0.0, le=10.0)
    holdout: float = Field(default=0.2, ge=0.05, le=0.5)
    seed: int = Field(default=0, ge=0, lt=2**31)

    def training(self) -> Any:
        """The ``privacy.dpsgd.TrainingConfig`` of one round."""
        from privacy.dpsgd import TrainingConfig

        return TrainingConfig(
            hidden=self.hidden,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            epochs=self.epochs,
            learning_rate=self.learning_rate,
        )

    def accountant_step(self, state: dict[str, Any] | None) -> Any:
        """What a node's request at ``state`` adds to its RDP accountant: one round's steps
        when it trains, None when it only evaluates (the gate charges from this)."""
        return None if phase(state) == EVALUATE else self.training().accountant_step()


def phase(state: dict[str, Any] | None) -> str:
    """The phase a state asks for (training when absent); an unknown phase is an error."""
    asked = (state or {}).get("phase", TRAIN)
    if asked not in (TRAIN, EVALUATE):
        raise ValueError(f"unknown dp_sgd phase {asked!r}; expected {TRAIN!r} or {EVALUATE!r}")
    return asked


def _rows(cdm: CdmContext, spec: DpSgdSpec) -> tuple[np.ndarray, np.ndarray]:
    """Features and outcome, one row per person (first cohort entry), ordered by person; the
    rows are built once per connection and cohorts (``common.design_table``), not every round.

    Covariate and outcome SQL come from the glm kind: the outcome is the cohort covariate of
    ``outcome`` in ``outcome_window``. Names of columns and parameters are generated, never
    taken from a study.
    """
    outcome = CohortCovariate(type="cohort", cohort=spec.outcome, window=spec.outcome_window)
    columns, params, _ = covariate_columns(cdm, [*spec.covariates, outcome])
    xs = ", ".join(f"{expr} AS x{i}" for i, expr in enumerate(columns))
    sql = f"""WITH {ENTRIES_CTE},
        first_entry AS (
            SELECT * FROM entries
            QUALIFY row_number() OVER (PARTITION BY subject_id ORDER BY cohort_start_date) = 1
        )
        SELECT e.subject_id, {xs} FROM first_entry e"""
    rows = design_table(cdm, sql, params | entries_params(cdm, [spec.cohort]))
    frame = query(cdm.con, f"SELECT * EXCLUDE (subject_id) FROM {rows} ORDER BY subject_id", {})
    data = frame.to_numpy().astype(np.float64) if frame.height else np.zeros((0, len(columns)))
    return data[:, :-1], data[:, -1]


def _split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train and hold-out row positions (not private: fixes only which rows train)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(holdout * n))
    return np.sort(order[cut:]), np.sort(order[:cut])


def _statistics(spec: DpSgdSpec, y: np.ndarray, values: list[tuple[str, str, str, float]]) -> Any:
    """Count rows (rows, outcome levels) and the given value rows
    (variable_name, variable_level, estimate_name, value)."""
    rows = [("records", "", "count", "count", float(len(y)))]
    rows += [("outcome", "1", "count", "count", float(y.sum()))]
    rows += [("outcome", "0", "count", "count", float(len(y) - y.sum()))]
    rows += [(name, level, estimate, "value", value) for name, level, estimate, value in values]
    frame = pl.DataFrame(
        rows,
        schema=["variable_name", "variable_level", "estimate_name", "kind", "value"],
        orient="row",
    ).with_columns(pl.lit(spec.cohort).alias("cohort"))
    return make_statistics(frame)


def _node_values(frame: pl.DataFrame, variable: str) -> tuple[float, np.ndarray]:
    """A node's number of rows and its value rows of ``variable`` (in level order)."""
    records = frame.filter(pl.col("variable_name") == "records")["value"]
    values = frame.filter(pl.col("variable_name") == variable)
    ordered = values.sort(pl.col("variable_level").cast(pl.Int64, strict=False))
    n = float(records[0]) if records.len() else float("nan")
    return n, ordered["value"].to_numpy()


@register
class DpSgd:
    """Federated averaging of Opacus DP-SGD rounds, then a hold-out evaluation round."""

    kind = "dp_sgd"
    Spec = DpSgdSpec

    def profile(self, spec: DpSgdSpec) -> ReleaseProfile:
        """The training rounds, then one evaluation round."""
        return ReleaseProfile(max_rounds=spec.rounds + 1)

    def local(self, cdm: CdmContext, spec: DpSgdSpec, state: dict | None) -> pl.DataFrame:
        from privacy.dpsgd import evaluate, initial_weights, train_round

        state = state or {}
        x, y = _rows(cdm, spec)
        weights = state.get("weights") or initial_weights(x.shape[1], spec.hidden, spec.seed)
        train, held = _split(len(y), spec.holdout, spec.seed)
        if phase(state) == EVALUATE:
            metrics = evaluate(x[held], y[held], weights, spec.hidden)
            values = [("evaluation", "", name, v) for name, v in metrics.items()]
            return _statistics(spec, y[held], values)
        new = train_round(x[train], y[train], [float(w) for w in weights], spec.training())
        values = [("weight", str(i), "weight", w) for i, w in enumerate(new)]
        return _statistics(spec, y[train], values)

    def combine(
        self, inputs: CombineInput, spec: DpSgdSpec, state: dict | None
    ) -> Finished | NextRound:
        state = state or {}
        round_ = int(state.get("round", 0))
        if phase(state) == EVALUATE:
            return Finished(_result(spec, state, inputs))
        released = [_node_values(f, "weight") for f in inputs.statistics if f.height]
        released = [
            (n, w) for n, w in released if np.isfinite(n) and w.size and np.isfinite(w).all()
        ]
        if not released:
            raise ValueError(f"dp_sgd {spec.id} round {round_}: no node released its weights")
        sizes = np.array([n for n, _ in released])
        average = (sizes[:, None] * np.vstack([w for _, w in released])).sum(0) / sizes.sum()
        next_round = round_ + 1
        return NextRound(
            {
                "phase": TRAIN if next_round < spec.rounds else EVALUATE,
                "round": next_round,
                "weights": average.tolist(),
                "records": int(sizes.sum()),
                "nodes": len(released),
            }
        )


def _result(spec: DpSgdSpec, state: dict[str, Any], inputs: CombineInput) -> pl.DataFrame:
    """Final weights, the model's training summary and every node's hold-out metrics."""
    keys = {
        "group_name": "cohort_name",
        "group_level": spec.cohort,
        "additional_name": "outcome",
        "additional_level": spec.outcome,
    }
    weights = np.array(state["weights"])
    if spec.hidden == 0:  # Linear layer: the weights, one per term, then the bias
        coefficients = pl.DataFrame(
            {
                "variable_name": [*spec.terms, "(Intercept)"],
                "coefficient": weights,
                "odds_ratio": np.exp(weights),
            }
        )
        model = estimates(coefficients, {"coefficient": "numeric", "odds_ratio": "numeric"}, **keys)
    else:
        table = pl.DataFrame(
            {"variable_level": [str(i) for i in range(weights.size)], "weight": weights}
        )
        model = estimates(table, {"weight": "numeric"}, variable_name="parameter", **keys)
    summary = pl.DataFrame(
        {
            "rounds": [spec.rounds],
            "number_records": [state["records"]],
            "number_nodes": [state["nodes"]],
        }
    )
    integers = dict.fromkeys(summary.columns, "integer")
    parts = [model, estimates(summary, integers, variable_name="model", **keys)]
    names = inputs.node_names or [f"node{i + 1}" for i in range(len(inputs.statistics))]
    for name, frame in zip(names, inputs.statistics, strict=True):
        if not frame.height:
            continue
        metrics = frame.filter(pl.col("variable_name") == "evaluation")
        records = frame.filter(pl.col("variable_name") == "records")["value"]
        row = pl.DataFrame({"number_records": records[:1]}).with_columns(
            pl.lit(v).alias(k)
            for k, v in zip(metrics["estimate_name"], metrics["value"], strict=True)
        )
        types = {c: "numeric" for c in row.columns} | {"number_records": "integer"}
        parts.append(estimates(row, types, variable_name="evaluation", cdm_name=name, **keys))
    return pl.concat(parts, how="vertical")
