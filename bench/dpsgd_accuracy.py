"""Measurement: what the DP-training example reaches, DP-SGD at epsilon 1 and 8 vs non-private
vs the exact GLM, on generated nodes. Prints JSON. Chooses nothing itself; its numbers chose
the example's hyper-parameters (``examples/gibleed_dp_training/study.yaml``).

Generates ``--nodes`` nodes (``omop_etl.synth``, profiles in turn) of ``--patients`` each,
loads them (``omop_etl.synthea``), builds the example's rows per node (``_rows``: first NSAID
era, age, sex, diclofenac, the outcome in its window) and its per-person hold-out. For each
configuration (steps per round from epochs and sample rate, clip norm, learning rate) and
target epsilon, the noise multiplier is the smallest whose accounted epsilon at delta 1e-6 over
all rounds plus the release's noisy counts (the gate's accountant) stays within the target;
training is the example's FedAvg of ``privacy.dpsgd.train_round`` at every node, repeated
``--repeats`` times (DP noise is not seeded). The AUC is the exact one of the pooled hold-out
(sklearn), so it measures the model, not the noisy release of its evaluation.

    .venv/bin/python bench/dpsgd_accuracy.py --nodes 5 --patients 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import duckdb
import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gibleed_dp_training" / "study.yaml"
PROFILES = ("urban_hospital", "rural_clinic", "elderly_care")
DELTA = 1e-6


def nodes(folder: Path, count: int, patients: int) -> list[Path]:
    """Generated CDM files (made once per folder)."""
    from omop_etl.synth import generate
    from omop_etl.synthea import load_synthea

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        profile = PROFILES[i % len(PROFILES)]
        db = folder / f"node{i + 1}_{patients}.duckdb"
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


def noise_for(epsilon: float, rate: float, steps: int, counts_rho: float) -> float:
    """The smallest noise multiplier (bisection) whose whole-run epsilon fits ``epsilon``."""
    from privacy.accounting import permit_epsilon, zcdp_step

    def spent(sigma: float) -> float:
        return permit_epsilon(0.0, [[(sigma, rate, steps), zcdp_step(counts_rho)]], DELTA)

    low, high = 0.3, 100.0
    if spent(high) > epsilon:
        return float("nan")
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > epsilon else (low, mid)
    return high


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/fedomop_dpsgd_nodes"))
    parser.add_argument("--configs", type=str, nargs="+", default=["3:1:0.05:1:0.5"],
                        help="ROUNDS:EPOCHS:RATE:CLIP:LR, one per configuration")  # fmt: skip
    args = parser.parse_args()

    from privacy.dpsgd import TrainingConfig, initial_weights
    from studies.loading import load_study

    study = load_study(EXAMPLE)
    spec = study.analysis("bleed_model")
    rows = node_rows(nodes(args.folder, args.nodes, args.patients), study, spec)
    start_weights = initial_weights(rows[0][0].shape[1], spec.hidden, spec.seed)
    counts_rho = spec.rounds * spec.size_rho + spec.evaluation_rho
    runs = []
    for text in args.configs:
        rounds, epochs, rate, clip, lr = text.split(":")
        rounds, epochs, rate, clip, lr = (
            int(rounds),
            int(epochs),
            float(rate),
            float(clip),
            float(lr),
        )
        steps = rounds * epochs * int(1 / rate)
        base = TrainingConfig(spec.hidden, 1.0, clip, rate, epochs, lr)
        began = time.perf_counter()
        plain = [
            pooled_auc(rows, train(rows, base, rounds, start_weights, private=False), spec.hidden)
            for _ in range(args.repeats)
        ]
        row = {"config": text, "steps": steps, "nonprivate_auc": plain}
        for epsilon in args.epsilons:
            sigma = noise_for(epsilon, rate, steps, counts_rho)
            config = TrainingConfig(spec.hidden, sigma, clip, rate, epochs, lr)
            aucs = [
                pooled_auc(
                    rows, train(rows, config, rounds, start_weights, private=True), spec.hidden
                )
                for _ in range(args.repeats)
            ]
            row[f"epsilon_{epsilon:g}"] = {
                "noise_multiplier": round(sigma, 4),
                "auc": [round(a, 4) for a in aucs],
                "auc_median": round(statistics.median(aucs), 4),
            }
        row["nonprivate_auc"] = [round(a, 4) for a in plain]
        row["seconds"] = round(time.perf_counter() - began, 1)
        runs.append(row)
    print(
        json.dumps(
            {
                "benchmark": "dpsgd_example_accuracy",
                "nodes": args.nodes,
                "patients_per_node": args.patients,
                "persons": int(sum(len(r[1]) + len(r[3]) for r in rows)),
                "events": int(sum(r[1].sum() + r[3].sum() for r in rows)),
                "held_out": int(sum(len(r[3]) for r in rows)),
                "outcome_window": [spec.outcome_window.start, spec.outcome_window.end],
                "exact_glm_auc": round(glm_auc(rows), 4),
                "delta": DELTA,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
