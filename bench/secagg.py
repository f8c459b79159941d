"""Secure-sum cost: seconds for one node to mask its vector and for the coordinator to unmask,
and the privacy charge each node books as nodes join.

Prints one JSON document: per (nodes K, vector length d) the median of ``--repeat`` runs of
``privacy.secagg.mask`` (one node: K - 1 key agreements and mask streams) and ``unmask_sum``;
then, per number of nodes n (3, 8, 20, 50), the rho each node books for the example study's
pooled grant (``privacy.secagg.pooled_charge``, h = ``--min-honest``) beside what the previous
sizing (shares for n - 1 nodes) booked and what one share alone really cost there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

from privacy.secagg import (
    SecAggError,
    distributed_gaussian_rho,
    ephemeral_key,
    mask,
    pooled_charge,
    public_hex,
    session_id,
    unmask_sum,
)

CHARGE_NODES = (3, 8, 20, 50)
EXAMPLE_GRANT = {"cost": 0.5, "rows_per_person": 3, "dimension": 6}
"""``examples/rare_disease_pooling``'s pooled grant: rho 0.5 on the total, 3 rows per person,
6 cells (overall, 2 sexes, 3 age groups)."""


def measure(k: int, d: int, repeat: int) -> dict[str, float | int]:
    keys = {f"node-{i:02d}": ephemeral_key(os.urandom(32), "bench") for i in range(k)}
    roster = {name: public_hex(key) for name, key in keys.items()}
    session = session_id("bench", roster, 0)
    values = [3] * d
    mask_s, unmask_s = [], []
    for _ in range(repeat):
        tic = time.perf_counter()
        shares = [mask(values, name, key, roster, session) for name, key in keys.items()]
        mask_s.append((time.perf_counter() - tic) / k)
        tic = time.perf_counter()
        total = unmask_sum(shares, session)
        unmask_s.append(time.perf_counter() - tic)
        assert total == [3 * k] * d
    return {
        "nodes": k,
        "length": d,
        "mask_s_per_node": statistics.median(mask_s),
        "unmask_s": statistics.median(unmask_s),
        "share_bytes_as_float64": (d + 1) * 8,
    }


def _previous_booking(scale: float, summands: int, rows: int, d: int) -> float | None:
    """The previous scheme's charge, or None where its shares fell below scale 1/2 (refused)."""
    try:
        return distributed_gaussian_rho(scale, summands, math.sqrt(rows), d)
    except SecAggError:
        return None


def charges(min_honest: int) -> list[dict[str, float | int]]:
    """Per n: the rho booked now (flat), and the previous scheme's booking and true share loss.

    Previously shares were sized for n - 1 nodes: each share alone was ((n - 1) rho)-zCDP
    while the node booked the Kairouz bound of n - 1 shares (about rho): what issue 9 measured.
    """
    cost, rows, d = (
        EXAMPLE_GRANT["cost"],
        EXAMPLE_GRANT["rows_per_person"],
        EXAMPLE_GRANT["dimension"],
    )
    out = []
    for n in CHARGE_NODES:
        now = pooled_charge(cost, rows, d, n, min_honest)
        old_scale = math.sqrt(rows / (2 * cost * (n - 1)))
        out.append(
            {
                "nodes": n,
                "min_honest_nodes": min(min_honest, n),
                "rho_booked_per_node": now.rho_booked,
                "share_scale": now.share_scale,
                "total_noise_sd": now.total_sd,
                "previous_rho_booked": _previous_booking(old_scale, n - 1, rows, d),
                "previous_rho_share_alone": rows / (2 * old_scale**2),
                "previous_total_noise_sd": old_scale * math.sqrt(n),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--min-honest", type=int, default=2, help="the policy's min_honest_nodes")
    args = parser.parse_args()
    sizes = [(3, 8), (10, 100)] if args.quick else [(3, 8), (3, 1000), (10, 1000), (30, 10000)]
    rows = []
    for k, d in sizes:
        print(f"K={k} d={d}", file=sys.stderr)
        rows.append(measure(k, d, args.repeat))
    report = {
        "benchmark": "secagg",
        "cpu_count": os.cpu_count(),
        "runs": rows,
        "grant": EXAMPLE_GRANT,
        "charge_per_node": charges(args.min_honest),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
