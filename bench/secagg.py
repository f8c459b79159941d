"""Secure-sum cost: seconds for one node to mask its vector and for the coordinator to unmask.

Prints one JSON document: per (nodes K, vector length d) the median of ``--repeat`` runs of
``privacy.secagg.mask`` (one node: K - 1 key agreements and mask streams) and ``unmask_sum``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from privacy.secagg import ephemeral_key, mask, public_hex, session_id, unmask_sum


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args()
    sizes = [(3, 8), (10, 100)] if args.quick else [(3, 8), (3, 1000), (10, 1000), (30, 10000)]
    rows = []
    for k, d in sizes:
        print(f"K={k} d={d}", file=sys.stderr)
        rows.append(measure(k, d, args.repeat))
    print(json.dumps({"benchmark": "secagg", "cpu_count": os.cpu_count(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
