"""Run a permitted study over any transport: ask nodes, tolerate failures, combine, write results.

Rounds after the first carry the previous round's transcript: its state and the releases the
contributing nodes signed (``node.transcript``), from which every node derives the next state
itself; the runner only forwards what the nodes released.

The runner does not know Flower: a ``Transport`` knows which nodes are connected and can send each
one a ``GateRequest`` and wait (bounded) for its ``GateReply``. The runner drives each analysis of
the study round by round (``local`` on the nodes through their gates, ``combine`` here) and keeps a
record of every node: which contributed, which refused (with the gate's reason), which timed out
or failed. An analysis goes on as long as at least ``min_nodes`` nodes released statistics.

The results folder gets ``results.csv``/``settings.csv`` (+ Parquet twins, ``studies.results``),
``nodes.csv`` (one row per node and analysis: status, reason, rounds, audit hash, and what its
gate reported: mechanism, noise scale, suppressed cells, privacy charged) and ``federation.json``
(the same record plus timings and a one-line key result per analysis), then the report.

Privacy spend: ``NodeRecord.settings`` is the gate's settings of a node's last reply, with the
charges of *every* round composed in: ``rho_charged`` is the sum over rounds (zCDP composes by
adding rho) and ``epsilon_charged`` that sum converted to (epsilon, delta) once; for DP-SGD,
whose accountant reports epsilon itself, the per-round epsilons (which telescope to the
accountant's total) are added. ``suppressed_cells`` is the most any round withheld.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from coordinator.headlines import key_result, shown_epsilon
from node.messages import GateReply, GateRequest
from node.transcript import SignedRelease, signed_release, transcript_json
from studies.loading import study_from_data
from studies.runner import drive, settings_row
from studies.statistics import from_ipc

DEFAULT_DELTA = 1e-6
"""The permit's default delta (``studies.permit``), for a gate reply that names none."""
#: Gate settings that nodes.csv lists per node and analysis (the rest stay in federation.json).
NODE_SETTINGS = ("mechanism", "noise_scale", "suppressed_cells", "rho_charged", "epsilon_charged")


class Transport(Protocol):
    """How the runner reaches nodes (Flower grid in simulation or deployment, or in-process)."""

    def node_ids(self) -> list[int]:
        """The nodes connected now."""
        ...

    def ask(self, requests: dict[int, GateRequest], timeout: float) -> dict[int, GateReply | str]:
        """Send each node its request; return its reply, or a text saying why none came."""
        ...


@dataclass
class StudyPlan:
    """What the coordinator runs: plain JSON-able values, so it travels in a Flower run config."""

    study: dict[str, Any]
    permit: dict[str, Any]
    out_dir: str
    min_nodes: int = 2
    timeout_s: float = 120.0
    report: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StudyPlan:
        return cls(**json.loads(text))

    def save(self) -> Path:
        """Write the plan into its results folder before anything runs, so a coordinator that
        was killed can resume it (``resumed``): the same requests again, which each node
        answers from its ledger (same request id) without a second charge."""
        path = Path(self.out_dir) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def resumed(cls, out_dir: Path) -> StudyPlan:
        """The plan a run saved in ``out_dir``; ``ValueError`` naming the file when unusable."""
        path = Path(out_dir) / PLAN_FILE
        try:
            plan = cls.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"cannot resume from {out_dir}: {path.name} unreadable ({err})"
            ) from err
        plan.out_dir = str(Path(out_dir).resolve())
        return plan


PLAN_FILE = "plan.json"
"""The plan of a run, kept in its results folder for ``fedomop run --resume``."""


@dataclass
class NodeRecord:
    """What one node did for one analysis."""

    analysis_id: str
    node: str
    status: str  # contributed | refused | timeout | error | dropped (failed before)
    reason: str = ""
    rounds: int = 0
    audit_hashes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def add_release(self, round_: int, settings: dict[str, Any]) -> None:
        """Take a released round's gate settings, composing its charges with earlier rounds'."""
        rho = _number(self.settings.get("rho_charged")) + _number(settings.get("rho_charged"))
        epsilon = _number(self.settings.get("epsilon_charged"))
        suppressed = max(
            _number(self.settings.get("suppressed_cells")),
            _number(settings.get("suppressed_cells")),
        )
        self.rounds, self.settings = round_ + 1, dict(settings)
        self.settings["rho_charged"] = rho
        self.settings["suppressed_cells"] = int(suppressed)
        if settings.get("accountant") == "rdp":  # DP-SGD: the accountant's own epsilons add up
            self.settings["epsilon_charged"] = epsilon + _number(settings.get("epsilon_charged"))
        else:
            self.settings["epsilon_charged"] = shown_epsilon(
                rho, _number(settings.get("delta")) or DEFAULT_DELTA
            )


def _number(value: Any) -> float:
    """A gate setting as a number (missing or unreadable: 0)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if number == number else 0.0


@dataclass
class AnalysisRecord:
    """How one analysis went: finished or failed, rounds, seconds per round."""

    analysis_id: str
    kind: str
    status: str  # finished | failed
    reason: str = ""
    rounds: int = 0
    round_seconds: list[float] = field(default_factory=list)
    combine_seconds: float = 0.0
    key_result: str = ""


@dataclass
class StudyOutcome:
    """The whole run: per analysis and per node, where the results went."""

    out_dir: str
    analyses: list[AnalysisRecord] = field(default_factory=list)
    nodes: list[NodeRecord] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    report: str = ""

    @property
    def contributors(self) -> dict[str, list[str]]:
        """analysis id -> names of the nodes whose statistics went into its result."""
        out: dict[str, list[str]] = {}
        for rec in self.nodes:
            if rec.status == "contributed":
                out.setdefault(rec.analysis_id, []).append(rec.node)
        return out


Progress = Callable[[str], None]


class TooFewNodes(RuntimeError):
    """Fewer than ``min_nodes`` nodes released statistics in a round."""


def run_study(
    plan: StudyPlan,
    transport: Transport,
    progress: Progress | None = None,
    phases: dict[str, float] | None = None,
) -> StudyOutcome:
    """Run every analysis of the plan's study over ``transport`` and write the results folder;
    ``phases`` timed before it (the runtime's start-up) go into the record as they are."""
    say = progress or (lambda _text: None)
    started = time.perf_counter()
    study = study_from_data(plan.study)
    permitted = set(plan.permit.get("body", {}).get("nodes", []))
    outcome = StudyOutcome(out_dir=plan.out_dir, phases=dict(phases or {}))
    names: dict[int, str] = {}
    dropped: set[int] = set()
    parts: list[tuple[pl.DataFrame, dict[str, Any]]] = []
    for spec in study.analyses:
        say(f"analysis {spec.id} ({spec.kind})")
        asked = [
            nid
            for nid in transport.node_ids()
            if nid not in dropped and (nid not in names or not permitted or names[nid] in permitted)
        ]
        result, record, nodes = _drive_analysis(plan, spec, asked, transport, names, say)
        record.key_result = key_result(spec.kind, result)
        nodes += [
            NodeRecord(spec.id, names.get(nid, f"node-{nid}"), "dropped", "failed earlier in study")
            for nid in sorted(dropped)
        ]
        outcome.analyses.append(record)
        outcome.nodes.extend(nodes)
        failed = {r.node for r in nodes if r.status in ("timeout", "error")}
        dropped |= {nid for nid in asked if names.get(nid, f"node-{nid}") in failed}
        if result is not None:
            parts.append((result, _settings_row(plan, study, spec, nodes)))
    outcome.phases["analyses_s"] = time.perf_counter() - started
    _write(plan, outcome, parts, say)
    outcome.phases["total_s"] = time.perf_counter() - started
    _write_federation_record(outcome)
    return outcome


def _drive_analysis(
    plan: StudyPlan,
    spec: Any,
    node_ids: list[int],
    transport: Transport,
    names: dict[int, str],
    say: Progress,
) -> tuple[pl.DataFrame | None, AnalysisRecord, list[NodeRecord]]:
    """One analysis through ``studies.runner.drive``: each round asks the nodes still answering."""
    from studies.analyses import REGISTRY

    record = AnalysisRecord(analysis_id=spec.id, kind=spec.kind, status="failed")
    nodes: dict[str, NodeRecord] = {}
    active = list(node_ids)
    transcript: dict[str, Any] | None = None  # the last round's state and signed releases

    def ask(state: dict[str, Any] | None, round_: int) -> dict[str, pl.DataFrame]:
        nonlocal active, transcript
        tic = time.perf_counter()
        requests = {
            nid: GateRequest(plan.study, plan.permit, spec.id, state, round_, transcript)
            for nid in active
        }
        answers = transport.ask(requests, plan.timeout_s)
        record.round_seconds.append(time.perf_counter() - tic)
        record.rounds = round_ + 1
        signed: list[SignedRelease] = []
        released = _sort_answers(spec.id, round_, active, answers, names, nodes, signed)
        transcript = transcript_json(state, signed)
        active = [nid for nid in active if names.get(nid) in released]
        say(f"  round {round_}: {len(released)}/{len(requests)} nodes released")
        if len(released) < plan.min_nodes:
            raise TooFewNodes(
                f"round {round_}: only {len(released)} node(s) released statistics, "
                f"the study needs at least {plan.min_nodes}"
            )
        return released

    tic = time.perf_counter()
    try:
        result = drive(REGISTRY[spec.kind](), spec, ask)
        record.status = "finished"
    except (TooFewNodes, RuntimeError) as err:
        result, record.reason = None, str(err)
    except Exception as err:  # one analysis's failure must not lose the others' results
        result, record.reason = None, f"combine failed: {type(err).__name__}: {err}"
    record.combine_seconds = time.perf_counter() - tic - sum(record.round_seconds)
    return result, record, list(nodes.values())


def _sort_answers(
    analysis_id: str,
    round_: int,
    asked: list[int],
    answers: dict[int, GateReply | str],
    names: dict[int, str],
    nodes: dict[str, NodeRecord],
    signed: list[SignedRelease],
) -> dict[str, pl.DataFrame]:
    """Record each node's answer; return the released statistics by node name (in name order)
    and add each release with its node's signed claim to ``signed`` (the next transcript)."""
    released: dict[str, pl.DataFrame] = {}
    for nid in asked:
        answer = answers.get(nid, "timeout: no reply before the deadline")
        if isinstance(answer, GateReply) and answer.node_name:
            names[nid] = answer.node_name
        name = names.get(nid, f"node-{nid}")
        rec = nodes.setdefault(name, NodeRecord(analysis_id, name, "contributed"))
        if isinstance(answer, str):
            rec.status = "timeout" if answer.startswith("timeout") else "error"
            rec.reason = f"round {round_}: {answer}"
            continue
        if answer.audit_hash:
            rec.audit_hashes.append(answer.audit_hash)
        if not answer.released:
            rec.status, rec.reason = "refused", f"round {round_}: {answer.reason}"
            continue
        try:
            table, release = from_ipc(answer.statistics), signed_release(answer)
        except (ValueError, OSError) as err:
            rec.status, rec.reason = "error", f"round {round_}: unreadable release: {err}"
            continue
        released[name] = table
        signed.append(release)
        rec.add_release(round_, answer.settings)
    return dict(sorted(released.items()))


def _settings_row(
    plan: StudyPlan, study: Any, spec: Any, nodes: list[NodeRecord]
) -> dict[str, Any]:
    """The settings row of one analysis: what produced it, who contributed, privacy spent."""
    contributed = sorted((r for r in nodes if r.status == "contributed"), key=lambda r: r.node)
    row = settings_row(study, spec, [r.node for r in contributed])
    spent = [_number(r.settings.get("epsilon_charged")) for r in contributed]
    min_cells = [
        int(r.settings["min_cell_count"]) for r in contributed if "min_cell_count" in r.settings
    ]
    permit = plan.permit.get("body", {})
    row.update(
        permit_id=permit.get("permit_id"),
        min_cell_count=max(min_cells) if min_cells else None,
        epsilon_spent=max(spent) if spent else None,
        epsilon_permitted=permit.get("epsilon"),
        delta=permit.get("delta", DEFAULT_DELTA),
        nodes_contributing=";".join(r.node for r in contributed),
        nodes_missing=";".join(f"{r.node} ({r.status})" for r in nodes if r not in contributed),
    )
    return row


def _write(
    plan: StudyPlan,
    outcome: StudyOutcome,
    parts: list[tuple[pl.DataFrame, dict[str, Any]]],
    say: Progress,
) -> None:
    """Results folder: summarised_result + settings, node record, then the report."""
    from studies.results import bind_results, write_results

    tic = time.perf_counter()
    result, settings = bind_results(parts)
    out = write_results(plan.out_dir, result, settings)
    _nodes_frame(outcome).write_csv(out / "nodes.csv")
    outcome.phases["write_s"] = time.perf_counter() - tic
    if plan.report:
        tic = time.perf_counter()
        say("writing the report")
        from coordinator.report import write_report

        outcome.report = str(write_report(out))
        outcome.phases["report_s"] = time.perf_counter() - tic


def _nodes_frame(outcome: StudyOutcome) -> pl.DataFrame:
    """nodes.csv: per node and analysis its status and what its gate reported (null if none)."""
    rows = [
        {
            **asdict(r),
            "audit_hashes": ";".join(r.audit_hashes),
            **{k: r.settings.get(k) for k in NODE_SETTINGS},
        }
        for r in outcome.nodes
    ]
    schema = {
        "analysis_id": pl.String,
        "node": pl.String,
        "status": pl.String,
        "reason": pl.String,
        "rounds": pl.Int64,
        "mechanism": pl.String,
        "noise_scale": pl.Float64,
        "suppressed_cells": pl.Int64,
        "rho_charged": pl.Float64,
        "epsilon_charged": pl.Float64,
        "audit_hashes": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def _write_federation_record(outcome: StudyOutcome) -> None:
    path = Path(outcome.out_dir) / "federation.json"
    path.write_text(json.dumps(asdict(outcome), indent=2, sort_keys=True))
