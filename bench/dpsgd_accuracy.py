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
exact GLM is statsmodels on the pooled training rows, which the federated GLM equals. The
non-private baseline runs twice: in process, and through the nodes' real gates (policies that
allow non-private models, a permit granting the analysis under mechanism none); both draw the
batches a gate's baseline draws, so they agree (the JSON gives the largest weight difference).

    .venv/bin/python bench/dpsgd_accuracy.py --nodes 5 --patients 5000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

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
    from omop_etl.cdm import connect
    from studies.analyses.dpsgd import _rows, held_out
    from studies.runner import prepare_cdm

    out = []
    for path in paths:
        with connect(path) as con:
            ids, x, y = _rows(prepare_cdm(con, study, path.stem), spec)
        held = held_out(ids, spec)
        out.append((x[~held], y[~held], x[held], y[held]))
    return out


def train(rows, config, rounds: int, weights, *, private: bool, spec=None) -> list[float]:
    """FedAvg of ``rounds`` local rounds; without privacy on the batches a gate's baseline
    draws (``batch_seed`` of ``spec``), so it is the gated baseline's run in process."""
    from privacy.dpsgd import train_round
    from studies.analyses.dpsgd import batch_seed

    for round_ in range(rounds):
        seed = None if private else batch_seed(spec, round_)
        updates = [
            (len(y), np.array(train_round(x, y, weights, config, private=private, seed=seed)))
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


def gated_baseline(paths: list[Path], study, spec, folder: Path) -> dict:
    """The non-private baseline through real gates: each node's policy allows non-private
    models, a permit grants the analysis exactly (mechanism none, every node's identity bound),
    and its rounds run through in-process gates with signed transcripts. Returns the released
    FedAvg ``weights`` (None when too few nodes released) and each refusing node's round-0
    ``refused`` reason (a node whose guards fail takes no part, as it would refuse a GLM)."""
    from coordinator.demo import issue_permit, make_permit_body, node_identities, write_policy
    from coordinator.rare_disease import in_process_asker
    from node.gate import Gate
    from node.policy import load_policy
    from studies.analyses import REGISTRY
    from studies.analyses.dpsgd import released_weights
    from studies.runner import drive

    keys = make_permit_body(folder / "permit_body")
    policies = [
        write_policy(folder / p.stem, p.stem, p, keys.public, kinds=["dp_sgd"],
                     allow_nonprivate_models=True)
        for p in paths
    ]  # fmt: skip
    permit = issue_permit(
        study, [p.stem for p in paths], keys.private, folder / "permit.json",
        analyses=[spec.id], node_keys=node_identities(policies),
    )  # fmt: skip
    gates = {policy.node_name: Gate(policy) for policy in map(load_policy, policies)}
    document = study.model_dump(mode="json", exclude_none=True)
    replies: list = []
    ask = in_process_asker(gates, document, permit, spec.id, replies)
    try:
        weights = released_weights(drive(REGISTRY[spec.kind](), spec, ask), spec)
    except RuntimeError:  # fewer nodes than a round needs passed their guards
        weights = None
    refused = {r.node_name: r.reason for q, r in replies if q == 0 and not r.released}
    return {"weights": weights, "refused": refused}


def compare(spec, rows, epsilons: list[float], repeats: int, gated: dict | None = None):
    """Pooled hold-out AUCs of the exact GLM, FedAvg without privacy (in process, and the
    ``gated`` baseline's released weights when given) and DP-SGD at each epsilon (the noise a
    node fixes for that grant), ``repeats`` runs each; ``spec`` gives every other setting."""
    from privacy.dpsgd import initial_weights, planned_noise_multiplier

    start = initial_weights(rows[0][0].shape[1], spec.hidden, spec.seed)
    plain = spec.training(1.0)  # the noise multiplier is unused without privacy
    nonprivate = train(rows, plain, spec.rounds, start, private=False, spec=spec)
    out: dict = {
        "terms": [*spec.terms, "(Intercept)"] if spec.hidden == 0 else None,
        "exact_glm_auc": round(glm_auc(rows), 4),
        "nonprivate_auc": round(pooled_auc(rows, nonprivate, spec.hidden), 4),  # seeded: one run
    }
    if gated is not None:  # the same model released by the nodes' gates (a none grant)
        out["gated_baseline_refused"] = gated["refused"]
        weights = gated["weights"]
        if weights is not None and not gated["refused"]:  # the same nodes as in process
            out["gated_baseline_auc"] = round(pooled_auc(rows, weights, spec.hidden), 4)
            gap = np.abs(np.array(weights) - np.array(nonprivate)).max()
            out["gated_minus_in_process_max_weight"] = float(gap)
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
    parser.add_argument("--no-gated", action="store_true",
                        help="skip the non-private baseline through the nodes' gates")  # fmt: skip
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
        gated = None
        if not args.no_gated and text is None:  # the study's own settings, as permitted
            gated = gated_baseline(paths, study, tried, args.folder / "gated")
        row |= compare(tried, rows, args.epsilons, args.repeats, gated)
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
