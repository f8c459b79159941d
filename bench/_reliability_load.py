"""The reliability bench's load scenarios (``bench/reliability.py``): three studies at once on
the same nodes, many nodes in one process, three deployed SuperNodes; and the memory they take,
per node and per process kind, as the issue asks for a bound stated and measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
from _reliability_harness import (
    PERMIT_GRANTS,
    REPO,
    STUDY,
    Row,
    Transport,
    World,
    audit_gaps,
    budget_drift,
    data_lost,
    finish,
    ledger_rows,
    people,
    run,
    write_ra_bleed_cdm,
)
from _sampling import Sampler

from coordinator.study_runner import StudyPlan, run_study
from node.policy import load_policy
from studies.canonical import canonical_data, study_hash
from studies.loading import study_from_data


def three_studies_at_once(world: World, work: Path) -> Row:
    nodes = [n.in_process() for n in world.nodes(work)]
    row = Row(
        "3 studies at once on the same nodes",
        "each node answers all three; each permit is charged exactly its grant; every exact "
        "result equals the sequential (centralised) one",
    )
    runs = []
    for letter in "abc":
        study = {**STUDY, "name": f"reliability_{letter}"}
        permit = world.permit(nodes, study_hash=study_hash(study_from_data(study)))
        out = work / f"results_{letter}"
        plan = StudyPlan(canonical_data(study_from_data(study)), permit, str(out), 2, 60.0, False)
        runs.append((plan, out))
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(lambda run: run_study(run[0], Transport(nodes)), runs))
    grant = next(a.cost for a in PERMIT_GRANTS if a.id == "n_dp")
    exact = all(
        abs(sum(ledger_rows(load_policy(n.policy).ledger_path).values()) - 3 * grant) < 1e-12
        for n in nodes
    )
    answered = all(
        len(o.contributors.get(a["id"], [])) == 3 for o in outcomes for a in STUDY["analyses"]
    )
    row.observed = f"all answered by 3 nodes: {answered}; each node charged 3 x {grant}: {exact}"
    row.ok = answered and exact
    for (_, out), outcome in zip(runs, outcomes, strict=True):
        lost = data_lost(world, out, outcome, work)
        row.data_lost += lost
    row.budget_drift = round(budget_drift(nodes), 12)
    row.audit_gaps = audit_gaps(nodes)
    finished = all(a.status == "finished" for o in outcomes for a in o.analyses)
    row.ok = row.ok and finished and not (row.data_lost or row.budget_drift or row.audit_gaps)
    return row


def many_nodes(world: World, work: Path, count: int = 30) -> Row:
    row = Row(
        f"{count} nodes (in process)",
        f"the study completes on all {count}; memory per node measured",
    )
    first = 1
    names = []
    for i in range(count):
        name = f"node{i + 1}"
        cdm = world.root / f"many-{name}.duckdb"
        world.cdms.setdefault(name, write_ra_bleed_cdm(cdm, people(first, 60)))
        names.append(name)
        first += 10_000
    many = World(world.root, world.key, world.public, {n: world.cdms[n] for n in names})
    rss = psutil.Process().memory_info().rss
    nodes = [n.in_process() for n in many.nodes(work)]
    out, outcome = run(many, work, nodes, many.permit(nodes))
    grown = psutil.Process().memory_info().rss - rss
    answered = min(len(outcome.contributors.get(a["id"], [])) for a in STUDY["analyses"])
    row.observed = (
        f"fewest contributors {answered}/{count}; RSS grew {grown / 2**20:.0f} MB "
        f"({grown / 2**20 / count:.1f} MB per node: gate, ledger, DuckDB connection, cohorts)"
    )
    row.ok = answered == count
    return finish(row, many, work, nodes, out, outcome)


#: Process kinds of a local deployment, by a piece of their command line (first match wins).
PROCESS_KINDS = [
    ("SuperNode", "runner_supernode"),
    ("SuperNode", "flower-supernode"),
    ("ServerApp", "flwr-serverapp"),
    ("SuperExec", "flower-superexec"),
    ("SuperLink", "flower-superlink"),
    ("fedomop node start (node runner + gate)", "node start"),
    ("fedomop coordinator start", "coordinator start"),
]


class MemorySampler(Sampler):
    """Peak resident (RSS) and proportional (PSS: shared pages split among the processes
    mapping them) memory per process kind among this process's descendants."""

    sample_at_start = False

    def __init__(self) -> None:
        super().__init__()
        self.me = psutil.Process()
        self.peak: dict[str, dict[str, float]] = {}
        self.total = {"rss": 0.0, "pss": 0.0}

    def sample(self) -> None:
        now: dict[str, dict[str, float]] = {}
        for proc in self.me.children(recursive=True):
            try:
                command = " ".join(proc.cmdline())
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            kind = next((k for k, part in PROCESS_KINDS if part in command), "other")
            kind = "this benchmark" if proc.pid == self.me.pid else kind
            slot = now.setdefault(kind, {"processes": 0, "rss": 0.0, "pss": 0.0})
            slot["processes"] += 1
            slot["rss"] += info.rss / 2**20
            slot["pss"] += info.pss / 2**20
        for kind, slot in now.items():
            best = self.peak.setdefault(kind, {"processes": 0, "rss": 0.0, "pss": 0.0})
            for key, value in slot.items():
                best[key] = max(best[key], value)
        for key in ("rss", "pss"):
            self.total[key] = max(self.total[key], sum(v[key] for v in now.values()))


@dataclass
class _Recorded:
    """A federation.json read back, shaped like the runner's outcome for ``data_lost``."""

    record: dict[str, Any]

    @property
    def contributors(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rec in self.record["nodes"]:
            if rec["status"] == "contributed":
                out.setdefault(rec["analysis_id"], []).append(rec["node"])
        return out

    @property
    def analyses(self) -> list[Any]:
        return [SimpleNamespace(**a) for a in self.record["analyses"]]


def deployed_memory(world: World, work: Path) -> Row:
    row = Row(
        "3 deployed SuperNodes: memory by process kind",
        "the study completes over TLS on 127.0.0.1; peak RSS and PSS per process kind measured",
    )
    from coordinator import deploy
    from coordinator.local_federation import start_local_federation
    from coordinator.server_app import EXPECTED_NODES_KEY, PLAN_KEY

    nodes = world.nodes(work)
    out = work / "results"
    plan = StudyPlan(
        canonical_data(study_from_data(STUDY)), world.permit(nodes), str(out), 2, 120.0, False
    )
    with MemorySampler() as memory, redirect_stdout(sys.stderr):
        fed = start_local_federation(work / "deploy", {n.name: n.policy for n in nodes})
        try:
            client = deploy.control_client(fed.address, fed.ca_cert)
            run_id = deploy.start_run(client, {PLAN_KEY: plan.to_json(), EXPECTED_NODES_KEY: 3})
            status, details = deploy.wait_run(client, run_id, 900, poll_s=0.2)
            client.close()
        finally:
            fed.stop()
    row.memory = {"total_mb": {k: round(v) for k, v in memory.total.items()}} | {
        kind: {k: round(v) for k, v in slot.items()} for kind, slot in sorted(memory.peak.items())
    }
    row.observed = (
        f"run {status}; peak RSS summed {memory.total['rss']:.0f} MB, PSS {memory.total['pss']:.0f}"
        f" MB over {sum(v['processes'] for v in memory.peak.values()):.0f} processes"
    )
    recorded = _Recorded(json.loads((out / "federation.json").read_text()))
    row.ok = status == "completed"
    return finish(row, world, work, nodes, out, recorded)


#: What each process of a deployed node loads (``fedomop node start`` runs the SuperNode and the
#: pinned runner, which opens the gate at its first request), and what the heavy optional
#: dependencies cost on their own: resident MB of a fresh interpreter after importing them.
FOOTPRINTS = {
    "python alone": "",
    "fedomop CLI (node start)": "import fedomop.cli",
    "Flower SuperNode": "import flwr.supernode",
    "node runner": "import node.runner",
    "node runner + gate": "import node.runner, node.gate",
    "torch": "import torch",
    "opacus (DP-SGD)": "import opacus",
}


def import_footprint() -> dict[str, float]:
    """Resident MB per process kind, each measured in a fresh interpreter."""
    probe = "import psutil; {0}; print(psutil.Process().memory_info().rss)"
    out = {}
    for what, statement in FOOTPRINTS.items():
        done = subprocess.run(
            [sys.executable, "-c", probe.format(statement or "pass")],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=os.environ | {"PYTHONPATH": str(REPO)},
            check=True,
        )
        out[what] = round(int(done.stdout.split()[-1]) / 2**20, 1)
    return out
