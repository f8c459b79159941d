"""Benchmark: one node's local DP-SGD round (Opacus, CPU) and its accounting. Prints JSON.

For each number of training rows, times ``privacy.dpsgd.train_round`` (logistic regression on
5 features, Poisson batches of about 256 rows, one epoch) and the gate's accounting of a round
composed onto nine earlier ones (``round_charge``, uncached history). The first call's set-up
time is reported apart.

    .venv/bin/python bench/dpsgd.py [--rows 1000 10000 100000] [--hidden 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--hidden", type=int, default=0)
    args = parser.parse_args()

    import torch

    from privacy.dpsgd import TrainingConfig, initial_weights, round_charge, train_round

    rng = np.random.default_rng(0)
    start = time.perf_counter()  # first call: Opacus's and torch's lazy set-up
    warm = TrainingConfig(args.hidden, 1.0, 1.0, 0.5, 1, 0.5)
    train_round(
        rng.normal(size=(10, 5)),
        np.r_[np.zeros(5), np.ones(5)],
        initial_weights(5, args.hidden, 0),
        warm,
    )
    first_call_s = time.perf_counter() - start
    runs = []
    for n in args.rows:
        x = rng.normal(size=(n, 5))
        y = (rng.random(n) < 1 / (1 + np.exp(-x[:, 0]))).astype(float)
        config = TrainingConfig(args.hidden, 1.0, 1.0, min(256 / n, 1.0), 1, 0.5)
        weights = initial_weights(5, args.hidden, 0)
        start = time.perf_counter()
        train_round(x, y, weights, config)
        train_s = time.perf_counter() - start
        step = config.accountant_step()
        start = time.perf_counter()
        charge = round_charge([(step[0], step[1], 9 * step[2] + n % 7)], step, 1e-6)
        account_s = time.perf_counter() - start
        runs.append(
            {
                "rows": n,
                "steps": step[2],
                "train_round_s": round(train_s, 3),
                "ms_per_step": round(1000 * train_s / step[2], 3),
                "accounting_s": round(account_s, 3),
                "epsilon_after_10_rounds": round(charge.epsilon_after, 4),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "dpsgd_local_round",
                "hidden": args.hidden,
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "first_call_s": round(first_call_s, 3),
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
