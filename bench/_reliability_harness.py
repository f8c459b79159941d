"""The reliability bench's harness (``bench/reliability.py``): three real nodes (gates on real
CDM files, ledgers and audit logs) answering in this process or in a child process of their own,
the study they answer, and the three numbers every scenario must keep at 0 (data lost, budget
drift, audit gaps). Kept apart from the scenarios so that a fault reads as the fault alone.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fedomop's rooms, also from a checkout not installed

import polars as pl  # noqa: E402
import yaml  # noqa: E402

from coordinator.fixtures import (  # noqa: E402
    RA_BLEED_COUNTS,
    RA_BLEED_RISK,
    ra_bleed_study,
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
STUDY: dict[str, Any] = ra_bleed_study(
    "reliability",
    [
        RA_BLEED_COUNTS,
        {"id": "n_dp", "kind": "counts", "cohorts": ["population"], "strata": ["sex"]},
        RA_BLEED_RISK,
    ],
)
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
    #: What a scenario measured beyond the three numbers (its test asserts them).
    facts: dict[str, Any] = field(default_factory=dict)


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


def people(first: int, size: int) -> pl.DataFrame:
    """``size`` persons from id ``first``: half women, births over 50 years, a third bleeding."""
    return pl.DataFrame({"person_id": range(first, first + size)}).with_columns(
        gender_concept_id=pl.when(pl.col("person_id") % 2 == 0).then(8532).otherwise(8507),
        year_of_birth=1940 + pl.col("person_id") % 50,
        bleed=(pl.col("person_id") % 3 == 0) | (pl.col("person_id") % 7 == 0),
    )


def make_world(root: Path) -> World:
    private, public, _ = generate_keypair(root / "keys")
    cdms = {}
    first = 1
    for name, size in SIZES.items():
        cdms[name] = write_ra_bleed_cdm(root / f"{name}.duckdb", people(first, size))
        first += 10_000
    return World(root, load_private_key(private), public, cdms)


# --- measuring -----------------------------------------------------------------------------------


def ledger_rows(path: Path) -> dict[str, float]:
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
        for request_id, rho in ledger_rows(policy.ledger_path).items():
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


def finish(row: Row, world: World, work: Path, nodes: list[Node], out: Path, outcome: Any) -> Row:
    """The row's three numbers measured; ``ok`` only if every analysis finished and all are 0."""
    row.data_lost = data_lost(world, out, outcome, work)
    row.budget_drift = round(budget_drift(nodes), 12)
    row.audit_gaps = audit_gaps(nodes)
    finished = [a.status for a in outcome.analyses]
    row.ok = row.ok and finished == ["finished"] * len(STUDY["analyses"])
    row.ok = row.ok and row.data_lost == 0 and row.budget_drift == 0 and row.audit_gaps == 0
    return row
