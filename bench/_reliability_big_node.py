"""The reliability bench's big node (``bench/reliability.py --big-node``): one node over a CDM of
1M generated persons (``_big_cdm``, cached) answering 100 requests in a row.

The node is a process of its own that imports what ``fedomop node start``'s process does (the
pinned runner, Flower) and answers each request through the deployed path: a Flower
``query.gate`` message into ``node.client_app.answer`` (the gate, opened once and kept, as the
runner keeps it). The coordinator is ``run_study`` over the demo study (counts,
characterization, incidence, survival, GLM rounds), one fresh permit per pass, passes until 100
gate requests are answered. Measured: seconds per request (p50, p95, by analysis), the node
process's RSS and PSS after every request and at its peak (sampled every 0.2 s), RSS at the
end of each pass (the same last GLM round each time: after the last pass within 10 % of after
the second, memory must not grow with the requests; the first pass warms the process, loading
modules and filling caches: a 2,000-person node held 248 MB after it, 273 MB after the second,
then 261-280 MB for 18 passes more), and the modules it loaded.

The reference: the same requests, in the same order (overlap control makes a refusal depend on
what was released before), each answered by a fresh process on a second node (its own ledger,
overlap record and audit log, the same identity key so the signed claims match): no cache a
long-lived node keeps may change an answer. Every reply must be equal (released, reason,
statistics, settings, claim).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from _big_cdm import big_cdm
from _reliability_harness import REPO, Row, World
from _sampling import Sampler

from coordinator.fixtures import signed_permit, write_node_policy
from coordinator.study_runner import StudyPlan, run_study
from node.flower_runtime import FLOWER_ENV
from node.messages import GateReply, GateRequest
from node.policy import load_policy
from studies.canonical import canonical_data, study_hash
from studies.loading import load_study
from studies.permit import PermitAnalysis

DEMO_STUDY = REPO / "examples" / "demo" / "study.yaml"
HEAVY = ("torch", "opacus", "sklearn", "scipy", "pandas", "pyarrow", "matplotlib", "statsmodels",
         "lifelines", "polars", "duckdb", "opendp", "flwr")  # fmt: skip

#: The node process: reads one JSON request per line, answers it through the ClientApp's
#: ``answer`` (the gate), writes one JSON reply per line with its seconds, RSS and PSS. The
#: replies go out on a copy of stdout; stdout itself is pointed at stderr, so nothing else the
#: process prints (a library's C code writes to file descriptor 1) lands in the channel.
NODE_SERVER = r"""
import base64, json, os, sys, time
channel = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
import psutil
import node.runner  # what `fedomop node start` loads: the pinned runner and Flower
from flwr.app import Message, Metadata
from node.client_app import answer
from node.messages import GateRequest, content_to_reply, request_to_content

policy, heavy = sys.argv[1], sys.argv[2].split(",")
me = psutil.Process()
for line in sys.stdin:
    request = GateRequest(**json.loads(line))
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1,
                    reply_to_message_id="", group_id="", created_at=time.time(), ttl=600.0,
                    message_type="query.gate")
    tic = time.perf_counter()
    reply = content_to_reply(answer(Message(request_to_content(request), metadata=meta), policy).content)
    seconds = time.perf_counter() - tic
    info = me.memory_full_info()
    out = reply.__dict__ | {"statistics": base64.b64encode(reply.statistics).decode()}
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
    print(json.dumps({"reply": out, "seconds": seconds, "rss": info.rss, "pss": info.pss,
                      "modules": loaded}, default=str), file=channel, flush=True)
"""


class NodeProcess:
    """One node process answering requests over its stdin and stdout."""

    def __init__(self, policy: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", NODE_SERVER, str(policy), ",".join(HEAVY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=os.environ | {"PYTHONPATH": str(REPO), **FLOWER_ENV},
        )

    def ask(self, request: GateRequest) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(asdict(request), default=str) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"node process ended with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class PeakMemory(Sampler):
    """Peak RSS and PSS (MB) of one process, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.process = psutil.Process(pid)
        self.rss = self.pss = 0.0

    def sample(self) -> None:
        try:
            info = self.process.memory_full_info()
        except psutil.Error:
            return
        self.rss = max(self.rss, info.rss / 2**20)
        self.pss = max(self.pss, info.pss / 2**20)


class RecordingTransport:
    """``run_study``'s transport over one node process; keeps every request and answer."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.requests: list[GateRequest] = []
        self.answers: list[dict[str, Any]] = []

    def node_ids(self) -> list[int]:
        return [0]

    def ask(self, requests: dict[int, GateRequest], timeout: float) -> dict[int, GateReply | str]:
        request = requests[0]
        answered = self.node.ask(request)
        self.requests.append(request)
        self.answers.append(answered)
        return {0: _reply(answered)}


def _reply(answered: dict[str, Any]) -> GateReply:
    fields = dict(answered["reply"])
    fields["statistics"] = base64.b64decode(fields["statistics"])
    return GateReply(**fields)


def _node(folder: Path, cdm: Path, world: World, secret: Path | None = None) -> Path:
    """A node named ``big`` over ``cdm`` with its own ledger, audit log and overlap record."""
    policy = write_node_policy(
        folder,
        name="big",
        cdm=cdm,
        permit_body_key=world.public,
        privacy={"max_epsilon_per_permit": 5.0, "max_epsilon_per_year": 500.0, "min_nodes": 1},
        allowed=["*"],
    )
    if secret is not None:  # the same identity: its signed claims are the same bytes
        shutil.copy(secret, load_policy(policy).secret_path)
    return policy


def _compared(answered: dict[str, Any]) -> dict[str, Any]:
    """What must be equal between the two runs (the audit hash chains a time stamp)."""
    reply = dict(answered["reply"])
    reply.pop("audit_hash")
    return reply


def _percentile(values: list[float], q: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, round(q * (len(ranked) - 1)))]


@dataclass
class Answered:
    """One node process's run of study passes: the requests in order, their answers, the
    process's peak memory (MB) and the number of requests answered at the end of each pass."""

    transport: RecordingTransport
    peak: PeakMemory
    pass_ends: list[int]
    seconds: float


def _answer(world: World, work: Path, policy: Path, requests: int) -> Answered:
    """The demo study run over one node process, one fresh permit per pass, passes until
    ``requests`` gate requests are answered."""
    study = canonical_data(load_study(DEMO_STUDY))
    analyses = [PermitAnalysis(id=a["id"]) for a in study["analyses"]]
    identity = {"big": load_policy(policy).identity_hex()}
    node = NodeProcess(policy)
    transport = RecordingTransport(node)
    pass_ends: list[int] = []
    tic = time.perf_counter()
    with PeakMemory(node.process.pid) as peak:
        try:
            while len(transport.requests) < requests:
                permit = signed_permit(world.key, nodes=["big"], node_keys=identity,
                                       analyses=analyses, epsilon=1.0,
                                       study_hash=study_hash(load_study(DEMO_STUDY)))  # fmt: skip
                out = work / f"results-{len(pass_ends)}"
                run_study(StudyPlan(study, permit, str(out), 1, 600.0, False), transport)
                pass_ends.append(len(transport.requests))
        finally:
            node.close()
    return Answered(transport, peak, pass_ends, time.perf_counter() - tic)


def memory_limits(world: World, work: Path, cdm: Path, limits: list[str]) -> dict[str, Any]:
    """One study pass per DuckDB memory limit (``[compute] memory_limit``), each on a node of
    its own: the node process's peak RSS and PSS and the pass's seconds, side by side."""
    out: dict[str, Any] = {}
    for limit in limits:
        policy = _node(work / f"limit-{limit}", cdm, world)
        policy.write_text(policy.read_text() + f'\n[compute]\nmemory_limit = "{limit}"\n')
        run = _answer(world, work / f"limit-{limit}", policy, requests=1)
        out[limit] = {
            "requests": len(run.transport.answers),
            "refused": sum(not a["reply"]["released"] for a in run.transport.answers),
            "pass_s": round(run.seconds, 1),
            "peak_mb": {"rss": round(run.peak.rss), "pss": round(run.peak.pss)},
        }
    return out


def big_node(
    world: World,
    work: Path,
    persons: int = 1_000_000,
    requests: int = 100,
    limits: tuple[str, ...] = (),
) -> Row:
    row = Row(
        f"1 node of {persons:,} persons, {requests} requests in a row",
        "every request answered; RSS after the last study pass within 10 % of after the second; "
        "every reply equals the same request answered by a fresh process in the same order",
    )
    cdm, built = big_cdm(persons)
    policy = _node(work / "big", cdm, world)
    run = _answer(world, work, policy, requests)
    transport, peak = run.transport, run.peak
    answers = transport.answers
    reference = _reference(work, cdm, world, policy, transport.requests)
    differing = [
        (i, sorted(k for k in _compared(a) if _compared(a)[k] != _compared(b).get(k)))
        for i, (a, b) in enumerate(zip(answers, reference, strict=True))
        if _compared(a) != _compared(b)
    ]
    differ = len(differing)
    reasons: dict[str, int] = {}
    for request, answered in zip(transport.requests, answers, strict=True):
        if not answered["reply"]["released"]:
            key = f"{request.analysis_id}: {answered['reply']['reason'][:160]}"
            reasons[key] = reasons.get(key, 0) + 1
    seconds = [a["seconds"] for a in answers]
    rss = [a["rss"] / 2**20 for a in answers]
    by_kind: dict[str, list[float]] = {}
    for request, answered in zip(transport.requests, answers, strict=True):
        by_kind.setdefault(request.analysis_id, []).append(answered["seconds"])
    after_pass = [rss[end - 1] for end in run.pass_ends]
    warm = after_pass[min(1, len(after_pass) - 1)]
    refused = sum(not a["reply"]["released"] for a in answers)
    row.memory = {
        "cdm": {"persons": persons, **built},
        "requests": len(answers),
        "study_passes": len(run.pass_ends),
        "refused": refused,
        "seconds_per_request": {
            "p50": round(statistics.median(seconds), 3),
            "p95": round(_percentile(seconds, 0.95), 3),
            "max": round(max(seconds), 3),
        },
        "seconds_by_analysis_p50": {k: round(statistics.median(v), 3) for k, v in by_kind.items()},
        "node_peak_mb": {"rss": round(peak.rss), "pss": round(peak.pss)},
        "node_rss_mb_after_pass": [round(mb) for mb in after_pass],
        "modules_loaded": answers[-1]["modules"],
        "refusals": reasons,
        "replies_differing_from_fresh_process": differ,
        "differing": [
            {"request": i, "analysis": transport.requests[i].analysis_id, "fields": f}
            for i, f in differing[:10]
        ],
    }
    if limits:
        row.memory["memory_limits"] = memory_limits(world, work, cdm, list(limits))
    row.observed = (
        f"{len(answers)} requests ({refused} refused), p50 {row.memory['seconds_per_request']['p50']}"
        f" s, p95 {row.memory['seconds_per_request']['p95']} s; peak RSS {peak.rss:.0f} MB, PSS "
        f"{peak.pss:.0f} MB; RSS {warm:.0f} MB after the second pass, "
        f"{after_pass[-1]:.0f} MB after the last; {differ} replies differ from a fresh process's"
    )
    row.data_lost = differ
    row.ok = len(answers) >= requests and after_pass[-1] <= 1.1 * warm and differ == 0
    return row


def _reference(
    work: Path, cdm: Path, world: World, policy: Path, requests: list[GateRequest]
) -> list[dict[str, Any]]:
    """Each request answered by a fresh process of a second node, in the same order."""
    secret = load_policy(policy).secret_path
    fresh = _node(work / "reference", cdm, world, secret)
    out = []
    for request in requests:
        node = NodeProcess(fresh)
        try:
            out.append(node.ask(request))
        finally:
            node.close()
    return out
