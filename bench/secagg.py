"""Secure-sum cost: seconds per node and at the coordinator for the dropout-tolerant sum, with
no dropout and with one, and the privacy charge each node books as nodes join.

Prints one JSON document: per (nodes K, vector length d) the median of ``--repeat`` runs of the
protocol's steps (``privacy.secagg_plus``): one node's shares (Shamir + AES-GCM to K peers) and
masked vector (K - 1 key agreements and mask streams), and the coordinator's unmasking, with
every node surviving and with one dropped after sharing (its pairwise masks rebuilt from
shares); then, per number of nodes n (3, 8, 20, 50), the rho each node books for the example
study's pooled grant (``privacy.secagg.pooled_charge``, h = ``--min-honest``) beside what the
previous sizing (shares for n - 1 nodes) booked and what one share alone really cost there.

With ``--study``: seconds for the rare-disease example's pooled count (``cf_pooled``) and
pooled GLM (``cf_model_pooled``) through K real in-process gates (K = ``--study-nodes``, small
generated nodes copied to K), beside the plain federated run of the same analysis (``counts``,
``glm``), and the pooled run with one node lost after sharing its seeds (threshold K - 1, each
policy assuming 3 honest nodes: 2t > 2n - h holds for t = n - 1 from h = 3 on, and a larger h
would shrink each noise share below the scale the distributed-noise bound needs; impossible at
3 nodes: no threshold passes t > n/2, t >= h and 2t > 2n - h there). JSON under ``study_runs`` with the ratios pooled / plain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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
DROPOUT_HONEST = 3
"""min_honest_nodes of the dropout runs: the least h with which threshold n - 1 passes."""
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


def _study_nodes(root: Path, k: int, patients: int) -> list[tuple[str, Path]]:
    """K nodes: three generated ones (1-6 rare cases each) copied round-robin to K folders."""
    from coordinator.demo import build_demo_nodes

    base = build_demo_nodes(root / "base", 3, None, patients, [3, 5, 2])
    nodes = []
    for i in range(k):
        folder = root / f"k{k}" / f"node{i:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        cdm = folder / "cdm.duckdb"
        if not cdm.exists():
            shutil.copy(base[i % 3][1], cdm)
        nodes.append((f"node{i:02d}", cdm))
    return nodes


def _study(dropout: bool, k: int) -> Any:
    """The rare-disease study plus a model both ways (plain ``glm`` and ``pooled_glm``) of an
    outcome common enough (death) that every node's plain GLM passes its guards, with
    threshold K - 1 on the pooled analyses when one node is to drop."""
    import yaml

    from coordinator.rare_disease import STUDY_PATH
    from studies.loading import study_from_data

    data = yaml.safe_load(STUDY_PATH.read_text())
    model = next(a for a in data["analyses"] if a["id"] == "cf_model_pooled")
    model = {**model, "outcome": "death"}
    data["analyses"] += [
        {"id": "warm_up", "kind": "counts", "cohorts": ["patients"]},
        {**model, "id": "death_model", "kind": "glm"},
        {**model, "id": "death_model_pooled", "kind": "pooled_glm"},
    ]
    for entry in data["analyses"]:
        if dropout and entry["kind"].startswith("pooled"):
            entry["threshold"] = k - 1
    return study_from_data(data)


def _gates(root: Path, nodes: list[tuple[str, Path]], study: Any, honest: int):
    from coordinator.demo import issue_permit, make_permit_body, node_identities, write_policy
    from node.gate import Gate
    from node.policy import load_policy
    from studies.permit import PermitAnalysis

    keys = make_permit_body(root / "body")
    policies = []
    for name, cdm in nodes:
        kinds = ["counts", "glm", "pooled_counts", "pooled_glm"]
        path = write_policy(cdm.parent, name, cdm, keys.public, kinds=kinds, max_epsilon=50.0)
        path.write_text(
            path.read_text().replace("[privacy]\n", f"[privacy]\nmin_honest_nodes = {honest}\n")
        )
        for stale in cdm.parent.glob("ledger.sqlite*"):
            stale.unlink()
        policies.append(path)
    ids = ["warm_up", "cf_feasibility", "cf_pooled", "death_model", "death_model_pooled"]
    grants = [
        PermitAnalysis(id="cf_pooled", mechanism="gaussian", cost=0.5, max_rows_per_person=3),
        # the pooled model's grant is its noisy guard sum's (records, outcome, sex: 5 rows)
        PermitAnalysis(
            id="death_model_pooled", mechanism="gaussian", cost=0.5, max_rows_per_person=5
        ),
    ]
    permit = issue_permit(
        study, [n for n, _ in nodes], keys.private, root / "permit.json", epsilon=50.0,
        analyses=ids, node_keys=node_identities(policies), grants=grants,
    )  # fmt: skip
    return {p.node_name: Gate(p) for p in map(load_policy, policies)}, permit


def _timed(study: Any, gates: dict, permit: dict, analysis_id: str, lost: tuple[str, ...]) -> dict:
    from coordinator.rare_disease import in_process_asker
    from studies.analyses import REGISTRY
    from studies.runner import drive

    spec = study.analysis(analysis_id)
    doc = study.model_dump(mode="json", exclude_none=True)
    replies: list = []
    ask = in_process_asker(gates, doc, permit, analysis_id, replies, lost, lost_from=2)
    tic = time.perf_counter()
    try:
        drive(REGISTRY[spec.kind](), spec, ask)
        outcome = "finished"
    except (ValueError, RuntimeError) as err:  # the plain runs at rare nodes release nothing
        outcome = f"nothing released: {str(err)[:80]}"
    seconds = time.perf_counter() - tic
    return {
        "seconds": round(seconds, 3),
        "rounds": len({r for r, _ in replies}),
        "outcome": outcome,
    }


def study_runs(root: Path, sizes: list[int], patients: int) -> list[dict[str, Any]]:
    """Per K: plain and pooled count and GLM, and the pooled ones with one node lost."""
    rows = []
    for k in sizes:
        nodes = _study_nodes(root, k, patients)
        study = _study(False, k)
        gates, permit = _gates(root / f"k{k}", nodes, study, 2)
        _timed(study, gates, permit, "warm_up", ())  # each gate builds its cohorts once
        row: dict[str, Any] = {"nodes": k, "patients_per_node": patients}
        for label, analysis in (("plain_count", "cf_feasibility"), ("pooled_count", "cf_pooled"),
                                ("plain_glm", "death_model"),
                                ("pooled_glm", "death_model_pooled")):  # fmt: skip
            print(f"K={k} {label}", file=sys.stderr)
            row[label] = _timed(study, gates, permit, analysis, ())
        if k >= 4:
            study = _study(True, k)
            gates, permit = _gates(root / f"k{k}", nodes, study, DROPOUT_HONEST)
            _timed(study, gates, permit, "warm_up", ())
            lost = (nodes[-1][0],)
            for label, analysis in (("pooled_count_one_dropout", "cf_pooled"),
                                    ("pooled_glm_one_dropout", "death_model_pooled")):  # fmt: skip
                print(f"K={k} {label}", file=sys.stderr)
                row[label] = _timed(study, gates, permit, analysis, lost)
        for kind in ("count", "glm"):
            plain = row[f"plain_{kind}"]["seconds"]
            row[f"ratio_pooled_{kind}_to_plain"] = round(
                row[f"pooled_{kind}"]["seconds"] / plain, 2
            )
            if f"pooled_{kind}_one_dropout" in row:
                dropped = row[f"pooled_{kind}_one_dropout"]["seconds"]
                row[f"ratio_dropout_{kind}_to_plain"] = round(dropped / plain, 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--min-honest", type=int, default=2, help="the policy's min_honest_nodes")
    parser.add_argument("--study", action="store_true", help="also time whole studies")
    parser.add_argument("--study-nodes", default="3,8,20", help="K for --study, comma-separated")
    parser.add_argument("--patients", type=int, default=400, help="patients per generated node")
    parser.add_argument("--work", type=Path, default=Path("bench-secagg-nodes"))
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
    if args.study:
        sizes = [int(k) for k in args.study_nodes.split(",")]
        report["study_runs"] = study_runs(args.work.resolve(), sizes, args.patients)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
