"""Measurement: what a DP-training example reaches, DP-SGD at epsilon 1 and 8 vs non-private
vs the exact GLM, on generated nodes. Prints JSON. Chooses nothing itself; its numbers chose
the examples' hyper-parameters (``examples/dp_training/study.yaml``, the default, and
``examples/gibleed_dp_training/study.yaml`` with ``--study``/``--analysis``).

Generates ``--nodes`` nodes (``omop_etl.synth``, profiles in turn, their GI-bleed hazard scaled
by ``--bleed-multiplier``: the same known signal, more events) of ``--patients`` each, loads
them (``omop_etl.synthea``), builds the analysis's rows per node (``_rows``) and its per-person
hold-out. For each configuration (default: the study's rounds, epochs, sample rate, clip norm
and learning rate) and target epsilon, the noise multiplier is the one a node's gate fixes
(``privacy.dpsgd.planned_noise_multiplier`` over the study's planned rounds and noisy counts,
delta 1e-6); training is the analysis's FedAvg of ``privacy.dpsgd.train_round`` at every node,
repeated ``--repeats`` times (DP noise is not seeded). The AUC is the exact one of the pooled
hold-out (sklearn), so it measures the model, not the noisy release of its evaluation. The
exact GLM is statsmodels on the pooled training rows, which the federated GLM equals.

    .venv/bin/python bench/dpsgd_accuracy.py --nodes 5 --patients 5000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import duckdb
import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dp_training" / "study.yaml"
PROFILES = ("urban_hospital", "rural_clinic", "elderly_care")
DELTA = 1e-6


def nodes(folder: Path, count: int, patients: int, bleed_multiplier: float = 1.0) -> list[Path]:
    """Generated CDM files (made once per folder), each profile's GI-bleed hazard scaled."""
    import dataclasses

    from omop_etl.profiles import get_profile
    from omop_etl.synth import generate
    from omop_etl.synthea import load_synthea

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        base = get_profile(PROFILES[i % len(PROFILES)])
        profile = dataclasses.replace(
            base, gi_bleed_multiplier=base.gi_bleed_multiplier * bleed_multiplier
        )
        db = folder / f"node{i + 1}_{patients}_x{bleed_multiplier:g}.duckdb"
        if not db.exists():
            src = generate(folder / f"src{i + 1}", patients=patients, seed=100 + i, profile=profile)
            load_synthea(src, db, progress=False)
        paths.append(db)
    return paths


def node_rows(paths: list[Path], study, spec) -> list[tuple]:
    """(x_train, y_train, x_held, y_held) per node, as the analysis builds them."""
    from studies.analyses.dpsgd import _rows, held_out
    from studies.runner import prepare_cdm

    out = []
    for path in paths:
        with duckdb.connect(str(path), read_only=True) as con:
            ids, x, y = _rows(prepare_cdm(con, study, path.stem), spec)
        held = held_out(ids, spec)
        out.append((x[~held], y[~held], x[held], y[held]))
    return out


def train(rows, config, rounds: int, weights, *, private: bool) -> list[float]:
    from privacy.dpsgd import train_round

    for _ in range(rounds):
        updates = [
            (len(y), np.array(train_round(x, y, weights, config, private=private)))
            for x, y, _, _ in rows
        ]
        total = sum(n for n, _ in updates)
        weights = (sum(n * w for n, w in updates) / total).tolist()
    return weights


def pooled_auc(rows, weights, hidden: int) -> float:
    from sklearn.metrics import roc_auc_score

    from privacy.dpsgd import predicted_risk

    p = np.concatenate([predicted_risk(xh, weights, hidden) for _, _, xh, _ in rows])
    y = np.concatenate([yh for _, _, _, yh in rows])
    return float(roc_auc_score(y, p))


def glm_auc(rows) -> float:
    """The exact pooled logistic regression (statsmodels) on the training rows."""
    import statsmodels.api as sm
    from sklearn.metrics import roc_auc_score

    x = np.vstack([r[0] for r in rows])
    y = np.concatenate([r[1] for r in rows])
    fit = sm.Logit(y, sm.add_constant(x, has_constant="add")).fit(disp=0)
    xh = np.vstack([r[2] for r in rows])
    yh = np.concatenate([r[3] for r in rows])
    return float(roc_auc_score(yh, fit.predict(sm.add_constant(xh, has_constant="add"))))


def compare(spec, rows, epsilons: list[float], repeats: int) -> dict:
    """Pooled hold-out AUCs of the exact GLM, FedAvg without privacy and DP-SGD at each
    epsilon (the noise a node fixes for that grant), ``repeats`` runs each; ``spec`` gives
    every other setting."""
    from privacy.dpsgd import initial_weights, planned_noise_multiplier

    start = initial_weights(rows[0][0].shape[1], spec.hidden, spec.seed)
    plain = spec.training(1.0)  # the noise multiplier is unused without privacy
    out: dict = {
        "terms": [*spec.terms, "(Intercept)"] if spec.hidden == 0 else None,
        "exact_glm_auc": round(glm_auc(rows), 4),
        "nonprivate_auc": [
            round(pooled_auc(rows, train(rows, plain, spec.rounds, start, private=False),
                             spec.hidden), 4)
            for _ in range(repeats)
        ],
    }  # fmt: skip
    for epsilon in epsilons:
        sigma = planned_noise_multiplier(spec.planned_history, epsilon, DELTA)
        config = spec.training(sigma)
        models = [train(rows, config, spec.rounds, start, private=True) for _ in range(repeats)]
        aucs = [pooled_auc(rows, weights, spec.hidden) for weights in models]
        out[f"epsilon_{epsilon:g}"] = {
            "noise_multiplier": round(sigma, 4),
            "auc": [round(a, 4) for a in aucs],
            "auc_median": round(statistics.median(aucs), 4),
            # run-to-run spread of each weight: why DP weights are no effect estimates
            "weight_sd_between_runs": [round(float(v), 3) for v in np.std(models, axis=0)],
            "weights_first_run": [round(float(v), 3) for v in models[0]],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", type=Path, default=EXAMPLE)
    parser.add_argument("--analysis", default="bleed_model")
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--patients", type=int, default=5_000)
    parser.add_argument("--bleed-multiplier", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/fedomop_dpsgd_nodes"))
    parser.add_argument("--configs", type=str, nargs="*", default=[],
                        help="ROUNDS:EPOCHS:RATE:CLIP:LR, one per configuration "
                        "(default: the study's own)")  # fmt: skip
    args = parser.parse_args()

    from studies.loading import load_study

    study = load_study(args.study)
    spec = study.analysis(args.analysis)
    paths = nodes(args.folder, args.nodes, args.patients, args.bleed_multiplier)
    rows = node_rows(paths, study, spec)
    runs = []
    for text in args.configs or [None]:
        tried = spec
        if text is not None:
            rounds, epochs, rate, clip, lr = text.split(":")
            tried = spec.model_copy(update={
                "rounds": int(rounds), "epochs": int(epochs), "sample_rate": float(rate),
                "max_grad_norm": float(clip), "learning_rate": float(lr),
            })  # fmt: skip
        began = time.perf_counter()
        row = {
            "config": text or "study",
            "steps": tried.rounds * tried.epochs * int(1 / tried.sample_rate),
        }
        row |= compare(tried, rows, args.epsilons, args.repeats)
        row["seconds"] = round(time.perf_counter() - began, 1)
        runs.append(row)
    print(
        json.dumps(
            {
                "benchmark": "dpsgd_example_accuracy",
                "study": str(args.study),
                "nodes": args.nodes,
                "patients_per_node": args.patients,
                "bleed_multiplier": args.bleed_multiplier,
                "persons_per_node": [int(len(r[1]) + len(r[3])) for r in rows],
                "events_per_node": [int(r[1].sum() + r[3].sum()) for r in rows],
                "held_out": int(sum(len(r[3]) for r in rows)),
                "outcome_window": [spec.outcome_window.start, spec.outcome_window.end],
                "delta": DELTA,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
