"""The reliability bench's fault scenarios (``bench/reliability.py``): a broken or rebuilt CDM,
a full disk at the ledger and at the audit log, a node killed between charge and release, a
node's clock a day off, the coordinator killed and its run resumed. Each returns its table row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from _reliability_harness import (
    FAKETIME,
    STUDY,
    Node,
    Row,
    Transport,
    World,
    finish,
    ledger_rows,
    run,
    statuses,
)
from _reliability_load import _Recorded

from coordinator.local_federation import start_local_federation
from coordinator.study_runner import StudyPlan, run_study
from node.audit import AuditLog
from node.gate import Gate
from node.messages import GateReply, GateRequest
from node.policy import load_policy
from studies.canonical import canonical_data
from studies.loading import study_from_data


def baseline(world: World, work: Path) -> Row:
    row = Row("no fault", "3 nodes answer every analysis")
    nodes = [n.in_process() for n in world.nodes(work)]
    out, outcome = run(world, work, nodes, world.permit(nodes))
    contributors = outcome.contributors
    row.ok = all(len(contributors.get(a["id"], [])) == 3 for a in STUDY["analyses"])
    row.observed = f"contributors {sorted(len(v) for v in contributors.values())}"
    return finish(row, world, work, nodes, out, outcome)


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
    return finish(row, world, work, nodes, out, outcome)


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
    return finish(row, world, work, nodes, out, outcome)


@dataclass
class FaultyRun:
    """A study run whose node1 answered in a child process with a fault (``Node.child``)."""

    world: World
    work: Path
    nodes: list[Node]
    permit: dict[str, Any]
    out: Path
    outcome: Any

    @property
    def seen(self) -> dict[str, str]:
        """node1's status per analysis."""
        return statuses(self.outcome, "node1")

    def charged(self) -> dict[str, float]:
        """node1's ledger now: request id -> rho."""
        return ledger_rows(load_policy(self.nodes[0].policy).ledger_path)

    def retry(self, analysis: str) -> GateReply:
        """node1's round-0 request of ``analysis`` again, once the fault is gone."""
        study = canonical_data(study_from_data(STUDY))
        gate = Gate(load_policy(self.nodes[0].policy))
        return gate.handle(GateRequest(study, self.permit, analysis))

    def retry_all(self) -> list[GateReply]:
        """Every analysis's round-0 request again: what a coordinator resuming the study asks."""
        return [self.retry(a["id"]) for a in STUDY["analyses"]]

    def finish(self, row: Row) -> Row:
        return finish(row, self.world, self.work, self.nodes, self.out, self.outcome)


def run_with_faulty_node1(
    world: World,
    work: Path,
    nodes: list[Node] | None = None,
    dates: dict[str, Any] | None = None,
    **fault: Any,
) -> FaultyRun:
    """The study over fresh nodes (or ``nodes``), node1 with ``fault``, the rest in process."""
    nodes = nodes or world.nodes(work)
    nodes[0].child(**fault)
    for node in nodes[1:]:
        node.in_process()
    permit = world.permit(nodes, **(dates or {}))
    out, outcome = run(world, work, nodes, permit)
    return FaultyRun(world, work, nodes, permit, out, outcome)


def disk_full_ledger(world: World, work: Path) -> Row:
    row = Row(
        "disk full at the ledger",
        "node1 refuses (storage error, nothing charged); the study completes on node2, node3; "
        "once space is back the request is charged once",
    )
    faulty = run_with_faulty_node1(world, work, fsize=4096)  # below one SQLite WAL frame
    charged = faulty.charged()
    retries = faulty.retry_all()
    after = faulty.charged()
    released = sum(r.released and not r.settings["replayed"] for r in retries)
    row.observed = f"{faulty.seen.get('n_dp', '')[:90]}; retries charged {len(after)}/{released}"
    refused = all("storage error" in s for s in faulty.seen.values())
    row.ok = refused and not charged and released == len(retries) == len(after)
    return faulty.finish(row)


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
    room = policy.audit_path.stat().st_size + 200  # room for no more entries
    faulty = run_with_faulty_node1(world, work, nodes, fsize=room)
    charged = faulty.charged()
    retries = faulty.retry_all()
    replayed = sum(r.released and r.settings["replayed"] for r in retries)
    row.observed = (
        f"{faulty.seen.get('n_dp', '')[:70]}; charged before retry {len(charged)}, "
        f"retries replayed {replayed}"
    )
    unchanged = faulty.charged() == charged  # the retries replayed, charging nothing
    row.ok = (
        unchanged
        and len(charged) == replayed == len(retries)
        and all(s.startswith("refused") for s in faulty.seen.values())
    )
    return faulty.finish(row)


def killed_after_charge(world: World, work: Path) -> Row:
    faulty = run_with_faulty_node1(world, work, kill=True)
    charged = faulty.charged()
    retry = faulty.retry("n")
    row = Row(
        "node process killed between charge and release",
        "node1 gives no answer; the study completes on node2, node3; the retry replays the "
        "stored release with no second charge",
    )
    row.observed = f"charged {len(charged)}, retry replayed={retry.settings.get('replayed')}"
    row.ok = (
        len(charged) == 1
        and retry.released
        and retry.settings.get("replayed") is True
        and faulty.charged() == charged
    )
    return faulty.finish(row)


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
    today = date.today()
    one_day = {"valid_from": today, "valid_until": today}  # one day of validity
    faulty = run_with_faulty_node1(world, work, dates=one_day, clock=offset)
    row.observed = "; ".join(sorted(set(faulty.seen.values())))[:160]
    row.ok = all(problem in s for s in faulty.seen.values()) and not faulty.charged()
    return faulty.finish(row)


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
    before = {n.name: ledger_rows(load_policy(n.policy).ledger_path) for n in nodes}
    outcome = run_study(StudyPlan.resumed(out), Transport(nodes))
    after = {n.name: ledger_rows(load_policy(n.policy).ledger_path) for n in nodes}
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
    return finish(row, world, work, nodes, out, outcome)


def _released(nodes: list[Node]) -> dict[str, list[dict[str, Any]]]:
    """Each node's audited releases, in order."""
    return {
        n.name: [e for e in AuditLog(load_policy(n.policy).audit_path).entries()
                 if e.get("verdict") == "released"]
        for n in nodes
    }  # fmt: skip


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    tic = time.monotonic()
    while not condition():
        if time.monotonic() - tic > timeout_s:
            raise TimeoutError(f"{what} not within {timeout_s:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - tic


def _reconnected_after(log: Path, offset: int) -> float | None:
    """Seconds a SuperNode took to reach the SuperLink again, as Flower's retry logs it in the
    node's log after ``offset``: 0.0 when no call of the node failed while the SuperLink was
    down (a node busy answering makes no call for a second or two, and the outage can fit in
    that gap); ``None`` when calls failed and none has succeeded since."""
    text = log.read_bytes()[offset:].decode(errors="replace")
    found = re.findall(r"Connection successful after ([0-9.]+) seconds", text)
    if found:
        return max(map(float, found))
    return None if "Connection attempt failed" in text else 0.0


def superlink_restarted(world: World, work: Path) -> Row:
    row = Row(
        "SuperLink killed mid-study and restarted",
        "the SuperNodes reconnect by themselves; `fedomop run` ends with a clear error naming "
        "--resume; the resumed run completes, each node replaying what it released, no round "
        "charged twice",
    )
    nodes = world.nodes(work)
    study, permit, out = work / "study.yaml", work / "permit.json", work / "results"
    study.write_text(yaml.safe_dump(STUDY))
    permit.write_text(json.dumps(world.permit(nodes), default=str))
    fed = start_local_federation(work / "deploy", {n.name: n.policy for n in nodes}, state=True)
    fedomop = str(Path(sys.executable).parent / "fedomop")
    base = [fedomop, "run", "--superlink", fed.address, "--root-cert", str(fed.ca_cert),
            "--expected-nodes", "3", "--timeout", "60"]  # fmt: skip
    first = subprocess.Popen(
        [*base, str(study), "--permit", str(permit), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=fed.env,
    )  # fmt: skip
    try:
        # n, n_dp and the GLM's round 0 released by node1: the kill falls between GLM rounds
        _wait_for(lambda: len(_released(nodes)["node1"]) >= 3, 300, "node1's third release")
        pids = {n.name: fed.processes[n.name].pid for n in nodes}
        logs = {n.name: fed.root / f"{n.name}.log" for n in nodes}
        offsets = {k: log.stat().st_size for k, log in logs.items()}
        fed.restart_superlink()
        said, _ = first.communicate(timeout=300)
        before = {n.name: ledger_rows(load_policy(n.policy).ledger_path) for n in nodes}
        released_before = {k: {e["request_id"] for e in v} for k, v in _released(nodes).items()}
        reconnect_s = {k: _reconnected_after(log, offsets[k]) for k, log in logs.items()}
        same = all(fed.processes[k].pid == pid and fed.processes[k].poll() is None
                   for k, pid in pids.items())  # fmt: skip
        resumed = subprocess.run(
            [*base, "--resume", str(out)], capture_output=True, text=True, env=fed.env, timeout=600
        )
    finally:
        if first.poll() is None:  # the scenario failed before the run ended: no orphan
            first.kill()
            first.wait()
        fed.stop()
    after = {n.name: ledger_rows(load_policy(n.policy).ledger_path) for n in nodes}
    record = json.loads((out / "federation.json").read_text())
    rounds = {r["node"]: r["rounds"] for r in record["nodes"] if r["analysis_id"] == "risk"}
    entries = _released(nodes)
    replayed = {k: {e["request_id"] for e in v if e.get("replayed")} for k, v in entries.items()}
    fresh = [e["request_id"] for v in entries.values() for e in v if not e.get("replayed")]
    row.facts = {
        "first_exit": first.returncode,
        "first_said": said.strip().splitlines()[-1][:300] if said.strip() else "",
        "nodes_kept_running": same,
        "reconnect_s": reconnect_s,
        "fewest_contributors": min(len(v) for v in _Recorded(record).contributors.values()),
        "resumed_exit": resumed.returncode,
        "charged_before": sum(map(len, before.values())),
        "charges_kept": all(before[k].items() <= after[k].items() for k in before),
        "replayed_all_released_before": all(released_before[k] <= replayed[k] for k in before),
        "charged_twice": len(fresh) - len(set(fresh)),
        "one_charge_per_round": all(len(after[k]) == 2 + rounds[k] for k in after),
    }
    slowest = max((s for s in reconnect_s.values() if s is not None), default=None)
    noticed = sum(bool(s) for s in reconnect_s.values())
    row.observed = (
        f"run exit {first.returncode} naming --resume: {'--resume' in said}; nodes back after "
        f"{slowest} s ({noticed} of {len(nodes)} saw the outage) without a restart: {same}; "
        f"resumed exit {resumed.returncode}, "
        f"replayed {sum(map(len, replayed.values()))} of {row.facts['charged_before']} charged"
    )
    facts = row.facts
    row.ok = (
        facts["first_exit"] == 1 and "--resume" in said and same and resumed.returncode == 0
        and None not in reconnect_s.values() and facts["fewest_contributors"] == 3
        and facts["charges_kept"] and facts["replayed_all_released_before"]
        and facts["charged_twice"] == 0 and facts["one_charge_per_round"]
    )  # fmt: skip
    return finish(row, world, work, nodes, out, _Recorded(record))
