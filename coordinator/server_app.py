"""The coordinator's Flower ServerApp: a study plan in, the study runner over Flower's grid.

In deployment the plan (study, permit, results folder, ``min_nodes``, timeout) arrives as the run
config key ``plan`` (JSON) from ``fedomop run --superlink``; in simulation ``make_server_app``
binds it directly. Nodes are reached with one ``query.gate`` message each per round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode
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
# Flower's errors for a node that did not answer (no heartbeat, a reply that never finished
# uploading): the node timed out, as when no reply came at all, not a node that answered wrongly
NO_REPLY_CODES = {
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
}


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
        for nid, reply in self._exchange(messages, timeout).items():
            if isinstance(reply, str):
                answers[nid] = reply
            elif reply.has_error():
                silent = reply.error.code in NO_REPLY_CODES
                answers[nid] = f"{'timeout' if silent else 'error'}: {reply.error.reason}"
            else:
                try:
                    answers[nid] = content_to_reply(reply.content)
                except (KeyError, TypeError, ValueError) as err:
                    answers[nid] = f"error: malformed reply: {err}"
        return answers

    def _exchange(self, messages: list[Message], timeout: float) -> dict[int, Message | str]:
        """Push, then wait up to ``timeout`` for each node's reply, pulled on a thread of its own.

        One pull per node, not one for all: Flower retries pulling a reply whose objects never
        finished uploading (a node killed mid-reply) for up to its object-push session's 180 s,
        and inside one batched pull that held every other node's reply past the round's
        deadline, so the whole round timed out. Flower's ``send_and_receive`` pulls every 3 s in
        deployment, the floor of every round; a short interval costs a few small requests.
        """
        ids = list(self.grid.push_messages(messages))
        deadline = time.monotonic() + timeout
        interval = self.poll_s * max(1.0, len(ids) / 4)  # about 80 pulls a second at most
        replies: dict[int, Message | str] = {}
        lock = threading.Lock()
        waiters = []
        for message, message_id in zip(messages, ids, strict=True):
            node = message.metadata.dst_node_id
            if not message_id:
                replies[node] = "error: the SuperLink did not take the message"
                continue
            args = (message_id, node, deadline, interval, replies, lock)
            waiters.append(threading.Thread(target=self._await_reply, args=args, daemon=True))
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join(max(0.0, deadline - time.monotonic()))
        with lock:
            return dict(replies)

    def _await_reply(
        self,
        message_id: str,
        node: int,
        deadline: float,
        interval: float,
        replies: dict[int, Message | str],
        lock: threading.Lock,
    ) -> None:
        """Pull one message's reply until it came or ``deadline`` passed (a daemon thread: one
        stuck in Flower's object pull past the deadline is left behind, its reply unused)."""
        while time.monotonic() < deadline:
            try:
                got = list(self.grid.pull_messages([message_id]))
            except Exception as err:  # the transport failed for this node only
                got = [f"error: reply could not be pulled: {type(err).__name__}: {err}"]
            if got:
                with lock:
                    if time.monotonic() < deadline:
                        replies[node] = got[0]
                return
            time.sleep(interval)


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
