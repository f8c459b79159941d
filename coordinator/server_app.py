"""The coordinator's Flower ServerApp: a study plan in, the study runner over Flower's grid.

In deployment the plan (study, permit, results folder, ``min_nodes``, timeout) arrives as the run
config key ``plan`` (JSON) from ``fedomop run --superlink``; in simulation ``make_server_app``
binds it directly. Nodes are reached with one ``query.gate`` message each per round.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.study_runner import Progress, StudyOutcome, StudyPlan, run_study
from node.messages import (
    MESSAGE_TYPE,
    GateReply,
    GateRequest,
    content_to_reply,
    request_to_content,
)

PLAN_KEY = "plan"
EXPECTED_NODES_KEY = "expected-nodes"
NODE_WAIT_KEY = "node-wait-s"
PULL_KEY = "pull-s"
WARMUP_TYPE = "query.warmup"


class GridTransport:
    """The study runner's transport over a Flower ``Grid`` (simulation or deployment)."""

    def __init__(
        self, grid: Grid, expected_nodes: int = 0, node_wait_s: float = 60.0, poll_s: float = 0.05
    ) -> None:
        self.grid = grid
        self.poll_s = poll_s
        self.expected_nodes = expected_nodes
        self.node_wait_s = node_wait_s

    def node_ids(self) -> list[int]:
        """Connected nodes; at first waits (bounded) until ``expected_nodes`` have connected."""
        deadline = time.monotonic() + self.node_wait_s
        ids = sorted(self.grid.get_node_ids())
        while len(ids) < self.expected_nodes and time.monotonic() < deadline:
            time.sleep(0.2)
            ids = sorted(self.grid.get_node_ids())
        self.expected_nodes = 0  # wait once; later calls take whoever is connected
        return ids

    def warm_up(self, timeout: float) -> float:
        """One empty ``query.warmup`` message per node, before the study: in simulation the
        first message starts Ray's workers, seconds that would otherwise be counted as the
        first analysis's first round. Returns the seconds it took (the start-up)."""
        tic = time.perf_counter()
        messages = [
            Message(RecordDict(), dst_node_id=nid, message_type=WARMUP_TYPE)
            for nid in self.node_ids()
        ]
        self._exchange(messages, timeout)
        return time.perf_counter() - tic

    def ask(self, requests: dict[int, GateRequest], timeout: float) -> dict[int, GateReply | str]:
        """One message per node, wait up to ``timeout`` s; errors and silences become reasons."""
        messages = [
            Message(
                request_to_content(req),
                dst_node_id=nid,
                message_type=MESSAGE_TYPE,
                group_id=f"{req.analysis_id}:{req.round}",
            )
            for nid, req in requests.items()
        ]
        answers: dict[int, GateReply | str] = {}
        for reply in self._exchange(messages, timeout):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                answers[nid] = f"error: {reply.error.reason}"
                continue
            try:
                answers[nid] = content_to_reply(reply.content)
            except (KeyError, TypeError, ValueError) as err:
                answers[nid] = f"error: malformed reply: {err}"
        return answers

    def _exchange(self, messages: list[Message], timeout: float) -> list[Message]:
        """Push, then pull replies every ``poll_s`` until all came or ``timeout`` passed.

        Flower's ``send_and_receive`` pulls every 3 s in deployment, which made that the floor
        of every round; a short pull interval costs only a few small HTTP requests.
        """
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while pending and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if pending:
                time.sleep(self.poll_s)
        return replies


def make_server_app(
    plan: StudyPlan | None = None,
    *,
    expected_nodes: int = 0,
    sink: Callable[[StudyOutcome], None] | None = None,
    progress: Progress | None = None,
    warm_up: bool = False,
) -> ServerApp:
    """A ServerApp running ``plan`` (or the run config's plan when ``None``); with
    ``warm_up`` (simulation) the runtime's start-up is timed apart from the analyses."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_plan = plan or StudyPlan.from_json(str(context.run_config[PLAN_KEY]))
        expected = expected_nodes or int(context.run_config.get(EXPECTED_NODES_KEY, 0))
        wait = float(context.run_config.get(NODE_WAIT_KEY, 60.0))
        pull = float(context.run_config.get(PULL_KEY, 0.05))
        transport = GridTransport(grid, expected, wait, pull)
        phases = {}
        if warm_up:
            if progress is not None:
                progress("starting the simulation (Ray workers, node gates)")
            phases["runtime_startup_s"] = transport.warm_up(run_plan.timeout_s)
        outcome = run_study(run_plan, transport, progress, phases)
        if sink is not None:
            sink(outcome)

    return app


app = make_server_app()
