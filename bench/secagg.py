"""Secure-sum cost: seconds per node and at the coordinator for the dropout-tolerant sum, with
no dropout and with one, and the privacy charge each node books as nodes join.

Prints one JSON document: per (nodes K, vector length d) the median of ``--repeat`` runs of the
protocol's steps (``privacy.secagg_plus``): one node's shares (Shamir + AES-GCM to K peers) and
masked vector (K - 1 key agreements and mask streams), and the coordinator's unmasking, with
every node surviving and with one dropped after sharing (its pairwise masks rebuilt from
shares); then, per number of nodes n (3, 8, 20, 50), the rho each node books for the example
study's pooled grant (``privacy.secagg.pooled_charge``, h = ``--min-honest``) beside what the
previous sizing (shares for n - 1 nodes) booked and what one share alone really cost there.
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
    identity_public_hex,
    pooled_charge,
)
from privacy.secagg_plus import (
    NodeKeys,
    masked_vector,
    open_shares,
    reveal,
    session_id,
    share_secrets,
    sign_survivors,
    unmask_total,
)

CHARGE_NODES = (3, 8, 20, 50)
EXAMPLE_GRANT = {"cost": 0.5, "rows_per_person": 3, "dimension": 6}
"""``examples/rare_disease``'s pooled grant: rho 0.5 on the total, 3 rows per person,
6 cells (overall, 2 sexes, 3 age groups)."""


def _protocol(k: int, d: int, dropped: int) -> dict[str, float]:
    """One run of the protocol's steps; seconds per node (shares, masking) and to unmask."""
    secrets = {f"node-{i:02d}": os.urandom(32) for i in range(k)}
    identities = {n: identity_public_hex(s) for n, s in secrets.items()}
    roster = {n: NodeKeys.derive(s, "bench").public() for n, s in secrets.items()}
    threshold = k - dropped
    session = session_id("bench", roster, threshold)
    names = sorted(secrets)
    tic = time.perf_counter()
    sent = {n: share_secrets(secrets[n], "bench", n, roster, threshold, session) for n in names}
    share_s = (time.perf_counter() - tic) / k
    survivors = names[dropped:]
    tic = time.perf_counter()
    masked = {
        n: masked_vector([3] * d, secrets[n], "bench", n, roster, names, session) for n in survivors
    }
    mask_s = (time.perf_counter() - tic) / len(survivors)
    signed = {n: sign_survivors(secrets[n], session, survivors) for n in survivors}
    revealed = {}
    for n in survivors:
        inbox = {sender: blobs[n] for sender, blobs in sent.items()}
        opened = open_shares(secrets[n], "bench", n, roster, inbox, session)
        revealed[n] = reveal(opened, names, survivors, signed, identities, threshold, session)
    tic = time.perf_counter()
    total = unmask_total(masked, revealed, roster, survivors, threshold, session)
    unmask_s = time.perf_counter() - tic
    assert total == [3 * len(survivors)] * d
    return {"share_s_per_node": share_s, "mask_s_per_node": mask_s, "unmask_s": unmask_s}


def measure(k: int, d: int, repeat: int) -> dict[str, float | int]:
    """Medians of ``repeat`` runs, every node surviving and one dropped after sharing."""
    row: dict[str, float | int] = {"nodes": k, "length": d}
    for label, dropped in (("", 0), ("one_dropout_", 1)):
        runs = [_protocol(k, d, dropped) for _ in range(repeat)]
        for key in runs[0]:
            row[label + key] = statistics.median(r[key] for r in runs)
    row["share_bytes_as_float64"] = (d + 1) * 8
    return row


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
    sizes = [(3, 8), (8, 100)] if args.quick else [(3, 8), (8, 1000), (20, 1000), (50, 1000)]
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
