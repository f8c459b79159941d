"""Benchmark: the demo study over Flower, simulated (3, 10, 30 nodes) and deployed (3 SuperNodes).

Prints JSON: per configuration the wall seconds per phase (node data, Ray/Flower start and first
round, each analysis, writing), rounds and seconds per round, peak memory (RSS summed over this
process and every process it started), and the ratio to the in-process reference
(``studies.runner.run_local``) on the same CDM files. The deployed federation runs twice: with
Flower's own polling (SuperNode idle poll 3 s, ServerApp pull 3 s) and with fedomop's (0.25 s,
0.05 s), to show where a round's time goes. Also times one node's ``local_step`` opened per
request (what the gate does) against a connection kept open (what ``run_local`` does), and the
transcript's cost in the GLM's rounds (signing and verifying releases, re-deriving the state).

    .venv/bin/python bench/federation.py [--nodes 3,10,30] [--patients 800] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from _sampling import Sampler

from node.flower_runtime import use_flower_env

use_flower_env(override=False)


class PeakMemory(Sampler):
    """The peak RSS of this process and all its descendants, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        self._me = psutil.Process()

    def sample(self) -> None:
        total = 0
        for proc in [self._me, *self._me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a process that just ended
                total += proc.memory_info().rss
        self.peak = max(self.peak, total)


def _rounds(outcome: dict[str, Any]) -> dict[str, Any]:
    analyses = outcome["analyses"]
    seconds = [s for a in analyses for s in a["round_seconds"]]
    return {
        "analyses": {
            a["analysis_id"]: {
                "status": a["status"],
                "rounds": a["rounds"],
                "round_s": [round(s, 3) for s in a["round_seconds"]],
                "combine_s": round(a["combine_seconds"], 3),
            }
            for a in analyses
        },
        "rounds": len(seconds),
        "first_round_s": round(seconds[0], 3) if seconds else None,
        "mean_later_round_s": round(sum(seconds[1:]) / max(len(seconds) - 1, 1), 3),
        "phases_s": {k: round(v, 3) for k, v in outcome["phases"].items()},
    }


def _setup(root: Path, count: int, patients: int) -> tuple[list[Path], list[str], Any, Any]:
    """Nodes (from the shared pool beside ``root``), policies and a permit for the demo study.

    Returns (policies, names, plan, cdms).
    """
    from coordinator.demo import (
        DEMO_STUDY,
        build_demo_nodes,
        issue_permit,
        make_permit_body,
        node_identities,
        write_policy,
    )
    from coordinator.study_runner import StudyPlan
    from studies.canonical import canonical_data
    from studies.loading import load_study

    nodes = build_demo_nodes(root.parent / "nodes", count, patients=patients)
    keys = make_permit_body(root / "permit_body")
    policies = [write_policy(cdm.parent, name, cdm, keys.public) for name, cdm in nodes]
    study = load_study(DEMO_STUDY)
    names = [name for name, _ in nodes]
    permit = issue_permit(
        study, names, keys.private, root / "permit.json", node_keys=node_identities(policies)
    )
    plan = StudyPlan(canonical_data(study), permit, str(root / "results"), 2, 600.0, report=False)
    return policies, names, plan, [cdm for _, cdm in nodes]


def _reference(root: Path, cdms: list[Path], names: list[str]) -> float:
    from coordinator.demo import DEMO_STUDY
    from studies.runner import run_local

    tic = time.perf_counter()
    run_local(DEMO_STUDY, cdms, root / "reference", node_names=names)
    return time.perf_counter() - tic


def bench_simulation(root: Path, count: int, patients: int) -> dict[str, Any]:
    """The demo study over ``count`` simulated nodes, and the in-process reference."""
    from dataclasses import asdict

    from coordinator.simulation import run_simulated

    policies, names, plan, cdms = _setup(root, count, patients)
    with PeakMemory() as memory:
        tic = time.perf_counter()
        outcome = asdict(run_simulated(plan, policies))
        wall = time.perf_counter() - tic
    reference = _reference(root, cdms, names)
    return {
        "mode": "simulation",
        "nodes": count,
        "patients_per_node": patients,
        "wall_s": round(wall, 2),
        "reference_wall_s": round(reference, 2),
        "ratio_to_reference": round(wall / reference, 2),
        "peak_rss_mb": round(memory.peak / 2**20),
        **_rounds(outcome),
    }


def bench_deployment(root: Path, patients: int, flower_polling: bool) -> dict[str, Any]:
    """The demo study over 3 deployed SuperNodes (TLS, node auth) on this machine."""
    from coordinator import deploy
    from coordinator.local_federation import start_local_federation
    from coordinator.server_app import EXPECTED_NODES_KEY, PLAN_KEY, PULL_KEY

    policies, names, plan, cdms = _setup(root, 3, patients)
    poll, pull = (3.0, 3.0) if flower_polling else (0.25, 0.05)
    with PeakMemory() as memory, contextlib.redirect_stdout(sys.stderr):  # Flower's chatter
        tic = time.perf_counter()
        fed = start_local_federation(
            root / "deploy", dict(zip(names, policies, strict=True)), poll_s=poll
        )
        start_s = time.perf_counter() - tic
        try:
            client = deploy.control_client(fed.address, fed.ca_cert)
            tic = time.perf_counter()
            run_id = deploy.start_run(
                client, {PLAN_KEY: plan.to_json(), EXPECTED_NODES_KEY: 3, PULL_KEY: pull}
            )
            sub_status, details = deploy.wait_run(client, run_id, 1200, poll_s=0.2)
            wall = time.perf_counter() - tic
            client.close()
        finally:
            fed.stop()
    outcome = json.loads((Path(plan.out_dir) / "federation.json").read_text())
    reference = _reference(root, cdms, names)
    return {
        "mode": "deployment",
        "polling": "flower (3 s / 3 s)" if flower_polling else "fedomop (0.25 s / 0.05 s)",
        "nodes": 3,
        "patients_per_node": patients,
        "run_status": sub_status,
        "processes_start_s": round(start_s, 2),
        "wall_s": round(wall, 2),
        "reference_wall_s": round(reference, 2),
        "ratio_to_reference": round(wall / reference, 2),
        "peak_rss_mb": round(memory.peak / 2**20),
        **_rounds(outcome),
    }


def bench_local_step(root: Path, patients: int) -> dict[str, Any]:
    """Per-request cost on a node: reopen + re-materialise (gate today) vs an open connection."""
    from coordinator.demo import DEMO_STUDY, build_demo_nodes
    from omop_etl.cdm import connect
    from studies.loading import load_study
    from studies.runner import local_step

    ((_, cdm),) = build_demo_nodes(root.parent / "nodes", 1, patients=patients)
    study = load_study(DEMO_STUDY)
    state = None
    tic = time.perf_counter()
    for _ in range(3):
        local_step(cdm, study, "feasibility", state)
    reopened = (time.perf_counter() - tic) / 3
    with connect(cdm) as con:
        local_step(con, study, "feasibility", state)
        tic = time.perf_counter()
        for _ in range(3):
            local_step(con, study, "feasibility", state)
        kept = (time.perf_counter() - tic) / 3
    return {
        "local_step_reopen_s": round(reopened, 3),
        "local_step_open_connection_s": round(kept, 3),
    }


def bench_transcript(root: Path, patients: int) -> dict[str, Any]:
    """The demo study's GLM through 3 in-process gates: round seconds beside the transcript's
    share of them (signing each release; verifying a round's signatures and re-deriving its
    state with ``combine`` at each node)."""
    from node.gate import Gate
    from node.messages import GateRequest
    from node.policy import load_policy
    from node.transcript import Expected, sign, signed_release, transcript_json, verify
    from studies.loading import study_from_data
    from studies.rounds import next_state
    from studies.statistics import from_ipc

    policies, names, plan, _ = _setup(root, 3, patients)
    gates = {name: Gate(load_policy(p)) for name, p in zip(names, policies, strict=True)}
    study = study_from_data(plan.study)
    spec = next(a for a in study.analyses if a.kind == "glm")
    body = plan.permit["body"]
    state, transcript, rounds, verify_s, sign_s = None, None, [], [], []
    for round_ in range(spec.max_iterations):
        request = GateRequest(plan.study, plan.permit, spec.id, state, round_, transcript)
        tic = time.perf_counter()
        replies = {name: gate.handle(request) for name, gate in gates.items()}
        rounds.append(time.perf_counter() - tic)
        releases = [signed_release(r) for r in replies.values()]
        tic = time.perf_counter()
        for release in releases:
            sign(gates[release.claim.node].policy.identity_key(), release.claim)
        sign_s.append((time.perf_counter() - tic) / len(releases))
        transcript = transcript_json(state, releases)
        expected = Expected(
            body["permit_id"], body["study_hash"], spec.id, round_, names[0],
            releases[0].claim.snapshot, 2,
        )  # fmt: skip
        tic = time.perf_counter()
        _, released = verify(transcript, expected, body["node_keys"])
        try:
            state = next_state(spec, {n: from_ipc(b) for n, b in released.items()}, state)
        except ValueError:  # finished: the last round has no next state
            verify_s.append(time.perf_counter() - tic)
            break
        verify_s.append(time.perf_counter() - tic)
    mean = sum(rounds) / len(rounds)
    verify_mean = sum(verify_s) / len(verify_s)
    return {
        "glm_rounds": len(rounds),
        "glm_round_s": round(mean, 4),
        "sign_ms_per_release": round(1000 * sum(sign_s) / len(sign_s), 3),
        "verify_and_derive_ms_per_node_round": round(1000 * verify_mean, 3),
        "transcript_share_of_round": round((verify_mean + sum(sign_s) / len(sign_s)) / mean, 4),
    }


def main() -> None:
    from coordinator.demo import build_demo_nodes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,10,30", help="simulated federation sizes")
    parser.add_argument("--patients", type=int, default=800, help="patients per node")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--skip-deployment", action="store_true")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="fedomop-bench-"))
    report: dict[str, Any] = {"cpus": os.cpu_count(), "runs": []}
    counts = [int(n) for n in args.nodes.split(",") if n]
    tic = time.perf_counter()
    build_demo_nodes(root / "nodes", max(counts), patients=args.patients)
    report["node_data_s"] = round(time.perf_counter() - tic, 1)
    report["node_step"] = bench_local_step(root / "step", args.patients)
    report["transcript"] = bench_transcript(root / "transcript", args.patients)
    print(json.dumps(report["transcript"]), flush=True)
    for count in counts:
        report["runs"].append(bench_simulation(root / f"sim{count}", count, args.patients))
        print(json.dumps(report["runs"][-1]), flush=True)
    if not args.skip_deployment:
        for flower_polling in (True, False):
            name = "deploy_flower" if flower_polling else "deploy_fedomop"
            report["runs"].append(bench_deployment(root / name, args.patients, flower_polling))
            print(json.dumps(report["runs"][-1]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
