"""Reliability under faults (issue 15): each scenario runs a study over three real nodes and
prints what was expected, what happened, and three numbers that must be 0.

The coordinator is ``coordinator.study_runner.run_study`` (the one Flower's ServerApp runs);
the nodes are real gates on real CDM files, ledgers and audit logs, answering in this process
or, where the fault needs a process of its own (a file-size limit standing in for a full disk,
a clock set a day off with libfaketime, a SIGKILL between charge and release), in a child
process per request. Killed SuperNodes and nodes past the timeout over real Flower processes
are ``tests/test_e2e_deployment.py``'s (too slow to repeat here).

Per scenario:
- ``data_lost``: result rows of the exact analyses (counts, GLM) that differ from, or are
  missing against, the centralised reference on the nodes that contributed (``run_local``);
- ``budget_drift``: rho a ledger holds without an audited release of that request, plus any
  difference between a ledger row's rho and the rho its audit entry names;
- ``audit_gaps``: breaks in the nodes' hash chains (``AuditLog.verify``).

    .venv/bin/python bench/reliability.py [--only NAME ...]   # JSON on stdout, table on stderr
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stdout, suppress
from dataclasses import asdict, dataclass, field
from datetime import date
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the tests' CDM, policy and permit helpers

import polars as pl  # noqa: E402
import yaml  # noqa: E402
from _helpers import (  # noqa: E402
    RA_BLEED_COHORTS,
    RA_BLEED_CONCEPT_SETS,
    signed_permit,
    write_node_policy,
    write_ra_bleed_cdm,
)

from coordinator.study_runner import StudyPlan, run_study  # noqa: E402
from node.audit import AuditLog  # noqa: E402
from node.gate import Gate  # noqa: E402
from node.messages import GateReply, GateRequest  # noqa: E402
from node.policy import load_policy  # noqa: E402
from studies.canonical import canonical_data, study_hash  # noqa: E402
from studies.loading import study_from_data  # noqa: E402
from studies.permit import PermitAnalysis, generate_keypair, load_private_key  # noqa: E402
from studies.runner import run_local  # noqa: E402

FAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), Path("/no/libfaketime"))
SIZES = {"node1": 120, "node2": 150, "node3": 180}
EXACT = ("n", "risk")
STUDY: dict[str, Any] = {
    "name": "reliability",
    "concept_sets": RA_BLEED_CONCEPT_SETS,
    "cohorts": RA_BLEED_COHORTS,
    "analyses": [
        {"id": "n", "kind": "counts", "cohorts": ["population", "bleed"], "strata": ["sex"]},
        {"id": "n_dp", "kind": "counts", "cohorts": ["population"], "strata": ["sex"]},
        {
            "id": "risk",
            "kind": "glm",
            "family": "binomial",
            "cohort": "population",
            "outcome": "bleed",
            "outcome_window": {"start": 1, "end": 3650},
            "covariates": [{"type": "sex"}],
        },
    ],
}
PERMIT_GRANTS = [
    PermitAnalysis(id="n"),
    PermitAnalysis(id="n_dp", mechanism="gaussian", cost=0.05, max_rows_per_person=2),
    PermitAnalysis(id="risk"),
]
KEYS = ["result_id", "group_level", "strata_name", "strata_level", "variable_name",
        "variable_level", "estimate_name", "additional_name", "additional_level"]  # fmt: skip

NODE_SCRIPT = r"""
import base64, json, os, resource, signal, sys
from pathlib import Path
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy

policy, fsize, kill = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "kill"
hook = (lambda _id: os.kill(os.getpid(), signal.SIGKILL)) if kill else None
gate = Gate(load_policy(Path(policy)), after_charge=hook)
request = GateRequest(**json.loads(sys.stdin.read()))
if fsize:  # files may not grow past fsize bytes: writes fail with EFBIG, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
reply = gate.handle(request)
out = reply.__dict__ | {"statistics": base64.b64encode(reply.statistics).decode()}
print(json.dumps(out, default=str))
"""


@dataclass
class Row:
    """One scenario's line of the table."""

    scenario: str
    expected: str
    observed: str = ""
    data_lost: int = 0
    budget_drift: float = 0.0
    audit_gaps: int = 0
    wall_s: float = 0.0
    ok: bool = False
    memory: dict[str, Any] = field(default_factory=dict)


@dataclass
class Node:
    """One node: its policy, and how a request reaches its gate (in process or a child)."""

    name: str
    policy: Path
    answer: Callable[[GateRequest], GateReply | str] = field(repr=False, default=None)  # type: ignore[assignment]

    def in_process(self) -> Node:
        gate = Gate(load_policy(self.policy))
        self.answer = gate.handle
        return self

    def child(self, *, fsize: int = 0, kill: bool = False, clock: str = "") -> Node:
        self.answer = lambda request: _child_answer(self.policy, request, fsize, kill, clock)
        return self


def _child_answer(
    policy: Path, request: GateRequest, fsize: int, kill: bool, clock: str
) -> GateReply | str:
    """The request answered by the node's gate in a process of its own."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    if clock:
        env |= {"LD_PRELOAD": str(FAKETIME), "FAKETIME": clock, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    done = subprocess.run(
        [sys.executable, "-c", NODE_SCRIPT, str(policy), str(fsize), "kill" if kill else "-"],
        input=json.dumps(asdict(request), default=str),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    if done.returncode != 0:
        return f"error: node process ended with {done.returncode}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["statistics"] = base64.b64decode(out["statistics"])
    return GateReply(**out)


class Transport:
    """``coordinator.study_runner.Transport`` over ``Node``s; ``before`` sees every request
    first (where a scenario injects its fault between rounds)."""

    def __init__(self, nodes: list[Node], before: Callable[[GateRequest], None] | None = None):
        self.nodes, self.before = nodes, before

    def node_ids(self) -> list[int]:
        return list(range(len(self.nodes)))

    def ask(self, requests: dict[int, GateRequest], timeout: float) -> dict[int, GateReply | str]:
        if self.before is not None:
            self.before(next(iter(requests.values())))
        return {nid: self.nodes[nid].answer(request) for nid, request in requests.items()}


@dataclass
class World:
    """Keys, the three nodes' clean CDMs, and a scenario's folder."""

    root: Path
    key: Any
    public: Path
    cdms: dict[str, Path]

    def nodes(self, folder: Path) -> list[Node]:
        """Fresh nodes in ``folder``: copies of the CDMs, empty ledgers and audit logs."""
        nodes = []
        for name, cdm in self.cdms.items():
            own = folder / name / "cdm.duckdb"
            own.parent.mkdir(parents=True)
            shutil.copy(cdm, own)
            policy = write_node_policy(
                own.parent,
                name=name,
                cdm=own,
                permit_body_key=self.public,
                privacy={"max_epsilon_per_permit": 5.0, "max_epsilon_per_year": 50.0},
                allowed=["*"],
            )
            nodes.append(Node(name, policy))
        return nodes

    def permit(self, nodes: list[Node], **dates: Any) -> dict[str, Any]:
        return signed_permit(
            self.key,
            nodes=[n.name for n in nodes],
            node_keys={n.name: load_policy(n.policy).identity_hex() for n in nodes},
            analyses=PERMIT_GRANTS,
            epsilon=2.0,
            **(self.default_hash() | dates),
        )

    def default_hash(self) -> dict[str, str]:
        return {"study_hash": study_hash(study_from_data(STUDY))}


def make_world(root: Path) -> World:
    private, public, _ = generate_keypair(root / "keys")
    cdms = {}
    first = 1
    for name, size in SIZES.items():
        people = pl.DataFrame({"person_id": range(first, first + size)}).with_columns(
            gender_concept_id=pl.when(pl.col("person_id") % 2 == 0).then(8532).otherwise(8507),
            year_of_birth=1940 + pl.col("person_id") % 50,
            bleed=(pl.col("person_id") % 3 == 0) | (pl.col("person_id") % 7 == 0),
        )
        cdms[name] = write_ra_bleed_cdm(root / f"{name}.duckdb", people)
        first += 10_000
    return World(root, load_private_key(private), public, cdms)


# --- measuring -----------------------------------------------------------------------------------


def _ledger_rows(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT request_id, rho FROM release").fetchall())
    finally:
        con.close()


def budget_drift(nodes: list[Node]) -> float:
    """Rho charged without an audited release of that request, and rho the ledger and the
    audit disagree on, summed over the nodes."""
    drift = 0.0
    for node in nodes:
        policy = load_policy(node.policy)
        audited: dict[str, float] = {}
        for entry in AuditLog(policy.audit_path).entries():
            if entry.get("verdict") == "released":
                audited[entry["request_id"]] = float(entry.get("ledger_rho", 0.0))
        for request_id, rho in _ledger_rows(policy.ledger_path).items():
            drift += abs(rho - audited[request_id]) if request_id in audited else rho
    return drift


def audit_gaps(nodes: list[Node]) -> int:
    return sum(len(AuditLog(load_policy(n.policy).audit_path).verify()) for n in nodes)


def _exact_rows(folder: Path) -> pl.DataFrame:
    frame = pl.read_csv(folder / "results.csv", infer_schema=False)
    return frame.filter(
        (pl.col("cdm_name") == "federated") & pl.col("result_id").is_in(list(EXACT))
    ).select([*KEYS, "estimate_value"])


def data_lost(world: World, out: Path, outcome: Any, work: Path) -> int:
    """Exact result rows that differ from the centralised reference on the contributors."""
    lost = 0
    study_file = work / "study.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    for analysis in EXACT:
        names = sorted(outcome.contributors.get(analysis, []))
        if not names:
            lost += 1  # an analysis the remaining nodes could answer has no result
            continue
        reference = work / f"reference-{analysis}-{'-'.join(names)}"
        if not reference.exists():
            run_local(study_file, [world.cdms[n] for n in names], reference, node_names=names)
        got = _exact_rows(out).filter(pl.col("result_id") == analysis)
        want = _exact_rows(reference).filter(pl.col("result_id") == analysis)
        joined = want.join(got, on=KEYS, how="left", suffix="_got")
        for a, b in zip(joined["estimate_value"], joined["estimate_value_got"], strict=True):
            if b is None or not _same(a, b):
                lost += 1
    return lost


def _same(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    return abs(x - y) <= 1e-6 * max(1.0, abs(x))


def run(
    world: World,
    work: Path,
    nodes: list[Node],
    permit: dict[str, Any],
    before: Callable[[GateRequest], None] | None = None,
) -> tuple[Path, Any]:
    out = work / "results"
    plan = StudyPlan(canonical_data(study_from_data(STUDY)), permit, str(out), 2, 60.0, False)
    return out, run_study(plan, Transport(nodes, before))


def statuses(outcome: Any, node: str) -> dict[str, str]:
    return {r.analysis_id: f"{r.status}: {r.reason}" for r in outcome.nodes if r.node == node}


# --- scenarios -----------------------------------------------------------------------------------


def _finish(row: Row, world: World, work: Path, nodes: list[Node], out: Path, outcome: Any) -> Row:
    row.data_lost = data_lost(world, out, outcome, work)
    row.budget_drift = round(budget_drift(nodes), 12)
    row.audit_gaps = audit_gaps(nodes)
    finished = [a.status for a in outcome.analyses]
    row.ok = row.ok and finished == ["finished"] * len(STUDY["analyses"])
    row.ok = row.ok and row.data_lost == 0 and row.budget_drift == 0 and row.audit_gaps == 0
    return row


def baseline(world: World, work: Path) -> Row:
    row = Row("no fault", "3 nodes answer every analysis")
    nodes = [n.in_process() for n in world.nodes(work)]
    out, outcome = run(world, work, nodes, world.permit(nodes))
    contributors = outcome.contributors
    row.ok = all(len(contributors.get(a["id"], [])) == 3 for a in STUDY["analyses"])
    row.observed = f"contributors {sorted(len(v) for v in contributors.values())}"
    return _finish(row, world, work, nodes, out, outcome)


def _broken_cdm(world: World, work: Path, how: str) -> Row:
    row = Row(
        f"corrupted CDM ({how})",
        "node1 refuses naming its CDM; the study completes on node2, node3",
    )
    nodes = [n.in_process() for n in world.nodes(work)]
    cdm = load_policy(nodes[0].policy).cdm_path
    size = cdm.stat().st_size
    if how == "truncated":
        os.truncate(cdm, size // 2)
    else:  # garbage over every data block (DuckDB's blocks start after 12 KiB of headers)
        with open(cdm, "r+b") as handle:
            handle.seek(12 * 1024)
            handle.write(os.urandom(size - 12 * 1024))
    out, outcome = run(world, work, nodes, world.permit(nodes))
    seen = statuses(outcome, "node1")
    row.observed = "; ".join(sorted(set(seen.values())))[:160]
    row.ok = all(s.startswith("refused") and "CDM file" in s for s in seen.values())
    return _finish(row, world, work, nodes, out, outcome)


def truncated_cdm(world: World, work: Path) -> Row:
    return _broken_cdm(world, work, "truncated")


def overwritten_cdm(world: World, work: Path) -> Row:
    return _broken_cdm(world, work, "overwritten blocks")


def rebuilt_cdm(world: World, work: Path) -> Row:
    row = Row(
        "CDM rebuilt between GLM rounds",
        "node1 refuses round 1 (its snapshot changed); the GLM completes on node2, node3",
    )
    nodes = [n.in_process() for n in world.nodes(work)]
    cdm = load_policy(nodes[0].policy).cdm_path

    def rebuild(request: GateRequest) -> None:
        if request.analysis_id == "risk" and request.round == 1 and not rebuild.done:
            fresh = cdm.with_name("rebuilt.duckdb")
            shutil.copy(world.cdms["node1"], fresh)
            os.replace(fresh, cdm)  # as omop_etl.build.atomic_build swaps a rebuilt file in
            rebuild.done = True

    rebuild.done = False
    out, outcome = run(world, work, nodes, world.permit(nodes), rebuild)
    risk = statuses(outcome, "node1").get("risk", "")
    row.observed = risk[:160]
    row.ok = risk.startswith("refused: round 1") and "CDM changed" in risk
    return _finish(row, world, work, nodes, out, outcome)


def first_faulty(nodes: list[Node], **fault: Any) -> list[Node]:
    """node1 answers in a child process with ``fault`` (``Node.child``), the rest in process."""
    nodes[0].child(**fault)
    for node in nodes[1:]:
        node.in_process()
    return nodes


def _retry(node: Node, permit: dict[str, Any], analysis: str) -> GateReply:
    """The node's round-0 request of ``analysis`` again, once the fault is gone."""
    study = canonical_data(study_from_data(STUDY))
    return Gate(load_policy(node.policy)).handle(GateRequest(study, permit, analysis))


def _retry_all(node: Node, permit: dict[str, Any]) -> list[GateReply]:
    """Every analysis's round-0 request again: what a coordinator resuming the study asks."""
    return [_retry(node, permit, a["id"]) for a in STUDY["analyses"]]


def disk_full_ledger(world: World, work: Path) -> Row:
    row = Row(
        "disk full at the ledger",
        "node1 refuses (storage error, nothing charged); the study completes on node2, node3; "
        "once space is back the request is charged once",
    )
    nodes = world.nodes(work)
    first_faulty(nodes, fsize=4096)  # below one SQLite WAL frame: the charge cannot commit
    permit = world.permit(nodes)
    out, outcome = run(world, work, nodes, permit)
    seen = statuses(outcome, "node1")
    charged = _ledger_rows(load_policy(nodes[0].policy).ledger_path)
    retries = _retry_all(nodes[0], permit)
    after = _ledger_rows(load_policy(nodes[0].policy).ledger_path)
    released = sum(r.released and not r.settings["replayed"] for r in retries)
    row.observed = f"{seen.get('n_dp', '')[:90]}; retries charged {len(after)}/{released}"
    row.ok = (
        all("storage error" in s for s in seen.values())
        and not charged
        and released == len(retries) == len(after)
    )
    return _finish(row, world, work, nodes, out, outcome)


def disk_full_audit(world: World, work: Path) -> Row:
    row = Row(
        "disk full at the audit log (after the charge)",
        "node1 releases nothing; the study completes on node2, node3; once space is back the "
        "retry replays the charge (no second charge), the chain intact",
    )
    nodes = world.nodes(work)
    policy = load_policy(nodes[0].policy)
    gate = Gate(policy)
    forged = world.permit(nodes)
    forged["body"]["epsilon"] = 9.0  # a broken signature: refusals fill the audit log
    for _ in range(150):
        gate.handle(GateRequest(STUDY, forged, "n"))
    first_faulty(nodes, fsize=policy.audit_path.stat().st_size + 200)  # room for no more entries
    permit = world.permit(nodes)
    out, outcome = run(world, work, nodes, permit)
    seen = statuses(outcome, "node1")
    charged = _ledger_rows(policy.ledger_path)
    retries = _retry_all(nodes[0], permit)
    after = _ledger_rows(policy.ledger_path)
    replayed = sum(r.released and r.settings["replayed"] for r in retries)
    row.observed = (
        f"{seen.get('n_dp', '')[:70]}; charged before retry {len(charged)}, "
        f"retries replayed {replayed}"
    )
    row.ok = (
        all(s.startswith("refused") for s in seen.values())
        and len(charged) == replayed == len(retries)
        and after == charged
    )
    return _finish(row, world, work, nodes, out, outcome)


def killed_after_charge(world: World, work: Path) -> Row:
    row = Row(
        "node process killed between charge and release",
        "node1 gives no answer; the study completes on node2, node3; the retry replays the "
        "stored release with no second charge",
    )
    nodes = world.nodes(work)
    first_faulty(nodes, kill=True)
    permit = world.permit(nodes)
    out, outcome = run(world, work, nodes, permit)
    policy = load_policy(nodes[0].policy)
    charged = _ledger_rows(policy.ledger_path)
    retry = _retry(nodes[0], permit, "n")
    row.observed = f"charged {len(charged)}, retry replayed={retry.settings.get('replayed')}"
    row.ok = (
        len(charged) == 1
        and retry.released
        and retry.settings.get("replayed") is True
        and _ledger_rows(policy.ledger_path) == charged
    )
    return _finish(row, world, work, nodes, out, outcome)


def _clock(world: World, work: Path, offset: str) -> Row:
    problem = "expired" if offset.startswith("+") else "not valid before"
    row = Row(
        f"clock of node1 {offset[0]}1 day",
        f"node1 refuses the permit ({problem}), charges nothing; the study completes on "
        "node2, node3",
    )
    if not FAKETIME.exists():
        row.observed, row.ok = "skipped: libfaketime is not installed", True
        return row
    nodes = world.nodes(work)
    first_faulty(nodes, clock=offset)
    today = date.today()
    permit = world.permit(nodes, valid_from=today, valid_until=today)  # one day of validity
    out, outcome = run(world, work, nodes, permit)
    seen = statuses(outcome, "node1")
    row.observed = "; ".join(sorted(set(seen.values())))[:160]
    row.ok = all(problem in s for s in seen.values()) and not _ledger_rows(
        load_policy(nodes[0].policy).ledger_path
    )
    return _finish(row, world, work, nodes, out, outcome)


def clock_ahead(world: World, work: Path) -> Row:
    return _clock(world, work, "+1d")


def clock_behind(world: World, work: Path) -> Row:
    return _clock(world, work, "-1d")


class CoordinatorKilled(Exception):
    """The coordinator's process ends here (what SIGKILL does to a running study)."""


def coordinator_killed(world: World, work: Path) -> Row:
    row = Row(
        "coordinator killed mid-study, run resumed",
        "the resumed run (the plan saved in its results folder) completes; every node replays "
        "what it released before (same request ids) and charges no round twice",
    )
    nodes = [n.in_process() for n in world.nodes(work)]
    out = work / "results"
    study = canonical_data(study_from_data(STUDY))
    StudyPlan(study, world.permit(nodes), str(out), 2, 60.0, False).save()

    def die(request: GateRequest) -> None:
        if request.analysis_id == "risk" and request.round == 1:  # after n, n_dp, risk round 0
            raise CoordinatorKilled

    with suppress(CoordinatorKilled):
        run_study(StudyPlan.resumed(out), Transport(nodes, die))
    before = {n.name: _ledger_rows(load_policy(n.policy).ledger_path) for n in nodes}
    outcome = run_study(StudyPlan.resumed(out), Transport(nodes))
    after = {n.name: _ledger_rows(load_policy(n.policy).ledger_path) for n in nodes}
    replayed = [r.settings.get("replayed") for r in outcome.nodes if r.analysis_id in ("n", "n_dp")]
    kept = all(before[n].items() <= after[n].items() for n in before)
    rounds = {r.node: r.rounds for r in outcome.nodes if r.analysis_id == "risk"}
    once = all(len(after[n]) == 2 + rounds[n] for n in after)  # n, n_dp, then each GLM round
    row.observed = (
        f"charged before the kill {sorted(len(v) for v in before.values())}, after resuming "
        f"{sorted(len(v) for v in after.values())}; replayed {sum(map(bool, replayed))}/"
        f"{len(replayed)}"
    )
    row.ok = kept and once and all(replayed) and len(replayed) == 6
    return _finish(row, world, work, nodes, out, outcome)


def three_studies_at_once(world: World, work: Path) -> Row:
    row = Row(
        "3 studies at once on the same nodes",
        "each node answers all three; each permit is charged exactly its grant; every exact "
        "result equals the sequential (centralised) one",
    )
    nodes = [n.in_process() for n in world.nodes(work)]
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
        abs(sum(_ledger_rows(load_policy(n.policy).ledger_path).values()) - 3 * grant) < 1e-12
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
    import psutil

    first = 1
    names = []
    for i in range(count):
        name = f"node{i + 1}"
        people = pl.DataFrame({"person_id": range(first, first + 60)}).with_columns(
            gender_concept_id=pl.when(pl.col("person_id") % 2 == 0).then(8532).otherwise(8507),
            year_of_birth=1940 + pl.col("person_id") % 50,
            bleed=(pl.col("person_id") % 3 == 0) | (pl.col("person_id") % 7 == 0),
        )
        world.cdms.setdefault(name, write_ra_bleed_cdm(world.root / f"many-{name}.duckdb", people))
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
    return _finish(row, many, work, nodes, out, outcome)


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


class MemorySampler:
    """Peak resident (RSS) and proportional (PSS: shared pages split among the processes
    mapping them) memory per process kind among this process's descendants, every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak: dict[str, dict[str, float]] = {}
        self.total = {"rss": 0.0, "pss": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
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
    return _finish(row, world, work, nodes, out, recorded)


SCENARIOS: dict[str, Callable[[World, Path], Row]] = {
    "baseline": baseline,
    "truncated_cdm": truncated_cdm,
    "overwritten_cdm": overwritten_cdm,
    "rebuilt_cdm": rebuilt_cdm,
    "disk_full_ledger": disk_full_ledger,
    "disk_full_audit": disk_full_audit,
    "killed_after_charge": killed_after_charge,
    "clock_ahead": clock_ahead,
    "clock_behind": clock_behind,
    "coordinator_killed": coordinator_killed,
    "three_studies_at_once": three_studies_at_once,
    "many_nodes": many_nodes,
    "deployed_memory": deployed_memory,
}
COVERED_BY_TESTS = {
    "SuperNode killed mid-study": "tests/test_e2e_deployment.py::test_node_killed_mid_study_the_rest_finish",
    "node past the timeout": "tests/test_e2e_deployment.py::test_node_killed_mid_study_the_rest_finish (timeout status)",
    "SIGKILL between charge and release (gate)": "tests/test_gate.py::test_sigkill_between_charge_and_release_loses_no_charge",
    "interrupted run (SIGINT/SIGTERM)": "tests/test_processes.py",
}
NOT_YET = ["SuperLink restarted during a study"]


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


def table(rows: list[Row]) -> str:
    head = f"{'scenario':46} {'ok':3} {'lost':>4} {'drift':>6} {'gaps':>4} {'wall s':>6}  observed"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.scenario:46} {'yes' if r.ok else 'NO':3} {r.data_lost:>4} "
            f"{r.budget_drift:>6.3g} {r.audit_gaps:>4} {r.wall_s:>6.1f}  {r.observed}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--nodes", type=int, default=30, help="nodes of the many_nodes scenario")
    parser.add_argument(
        "--no-deployment", action="store_true", help="leave out the deployed SuperNodes' memory"
    )
    args = parser.parse_args()
    SCENARIOS["many_nodes"] = partial(many_nodes, count=args.nodes)
    if args.no_deployment:
        SCENARIOS.pop("deployed_memory")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    root = Path(tempfile.mkdtemp(prefix="bench_reliability_"))
    try:
        world = make_world(root)
        rows = []
        for name in args.only or list(SCENARIOS):
            work = root / name
            work.mkdir()
            tic = time.perf_counter()
            row = SCENARIOS[name](world, work)
            row.wall_s = round(time.perf_counter() - tic, 2)
            rows.append(row)
            print(f"{name}: {'ok' if row.ok else 'NOT OK'} ({row.wall_s} s)", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows), file=sys.stderr)
    report = {
        "scenarios": [asdict(r) for r in rows],
        "memory_per_process_mb": import_footprint(),
        "covered_by_tests": COVERED_BY_TESTS,
        "not_yet": NOT_YET,
    }
    print(json.dumps(report, indent=2))
    if not all(r.ok for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
