"""Benchmark: one node's local training round, DP-SGD (Opacus) vs non-private, CPU. Prints JSON.

For each number of training rows and each model (logistic, and an MLP with ``--hidden`` units),
times ``privacy.dpsgd.train_round`` with and without privacy on the same data and Poisson
batches of about 256 rows (``epochs`` local epochs), and reports seconds per round and per
epoch side by side with the ratio DP / non-private. It also times the gate's accounting of a
round composed onto nine earlier ones (``round_charge``; uncached for the logistic row, the MLP row of
the same size has the same history and hits the cache). A federation of 5
nodes of 50,000 persons trains each node's round on that node, so the per-node figure at 50,000
rows is the round time of that federation (plus transport). The first call's set-up time is
reported apart.

    .venv/bin/python bench/dpsgd.py [--rows 10000 50000] [--hidden 16] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--hidden", type=int, default=16, help="MLP hidden units (0: skip)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--features", type=int, default=10)
    args = parser.parse_args()

    import torch

    from privacy.dpsgd import TrainingConfig, initial_weights, round_charge, train_round

    rng = np.random.default_rng(0)
    p = args.features
    warm = TrainingConfig(0, 1.0, 1.0, 0.5, 1, 0.5)
    first_call_s = _timed(
        lambda: train_round(
            rng.normal(size=(10, p)), np.r_[np.zeros(5), np.ones(5)], initial_weights(p, 0, 0), warm
        )
    )
    models = [0] + ([args.hidden] if args.hidden else [])
    runs = []
    for n in args.rows:
        x = rng.normal(size=(n, p))
        y = (rng.random(n) < 1 / (1 + np.exp(-x[:, 0]))).astype(float)
        for hidden in models:
            config = TrainingConfig(hidden, 1.0, 1.0, min(256 / n, 1.0), args.epochs, 0.5)
            weights = initial_weights(p, hidden, 0)
            dp_s = _timed(lambda c=config, w=weights, x=x, y=y: train_round(x, y, w, c))
            plain_s = _timed(
                lambda c=config, w=weights, x=x, y=y: train_round(x, y, w, c, private=False)
            )
            step = config.accountant_step()
            earlier = [(step[0], step[1], 9 * step[2] + n % 7)]
            account_s = _timed(lambda s=step, e=earlier: round_charge(e, s, 0.001, 1e-6))
            runs.append(
                {
                    "rows": n,
                    "model": "logistic" if hidden == 0 else f"mlp_{hidden}",
                    "steps_per_round": step[2],
                    "dp_s_per_round": round(dp_s, 3),
                    "nonprivate_s_per_round": round(plain_s, 3),
                    "dp_s_per_epoch": round(dp_s / args.epochs, 3),
                    "nonprivate_s_per_epoch": round(plain_s / args.epochs, 3),
                    "ratio_dp_to_nonprivate": round(dp_s / plain_s, 2),
                    "accounting_s": round(account_s, 3),
                }
            )
    print(
        json.dumps(
            {
                "benchmark": "dpsgd_local_round",
                "features": p,
                "epochs": args.epochs,
                "torch_threads_in_round": 1,
                "cpus": os.cpu_count(),
                "load_average": [round(v, 2) for v in os.getloadavg()],
                "first_call_s": round(first_call_s, 3),
                "torch_version": torch.__version__,
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
