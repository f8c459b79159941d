"""The node's Flower ClientApp: every message becomes a ``GateRequest`` and goes through the gate.

Nothing in a message tells the node where its data, policy, ledger or audit log live: the node
finds its policy TOML from its own configuration (the SuperNode's ``--node-config policy=...``,
the ``FEDOMOP_NODE_POLICY`` environment variable, or the pinned node runner's ``--policy``), and
the policy names everything else. The reply carries only the ``GateReply`` fields.

The wire codec (what a message holds, each field size-checked before it is parsed) is
``node.messages``, shared with the coordinator, which never imports this ClientApp.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from node.messages import GateReply, content_to_request, reply_to_content

POLICY_ENV = "FEDOMOP_NODE_POLICY"
POLICY_NODE_CONFIG = "policy"


@lru_cache(maxsize=64)
def open_gate(policy_path: str) -> Any:
    """The node's gate for its policy file, built once per process (policy, CDM, ledger, audit)."""
    from node.gate import Gate
    from node.policy import load_policy

    return Gate(load_policy(Path(policy_path)))


def answer(message: Message, policy_path: str | Path) -> Message:
    """Run one message through the node's gate and reply with the gate's answer only."""
    gate = open_gate(str(Path(policy_path).resolve()))
    try:
        request = content_to_request(message.content)
    except ValueError as err:
        reply = GateReply(node_name=gate_node_name(gate), released=False, reason=str(err))
    else:
        reply = gate.handle(request)
    return Message(reply_to_content(reply), reply_to=message)


def gate_node_name(gate: Any) -> str:
    """The node's own name as its policy states it (for refusals before the gate runs)."""
    return str(getattr(getattr(gate, "policy", None), "node_name", ""))


def policy_path_from(context: Context) -> str:
    """Where this node's policy lives, from the node's own configuration (never the message)."""
    configured = context.node_config.get(POLICY_NODE_CONFIG) or os.environ.get(POLICY_ENV)
    if not configured:
        raise RuntimeError(
            f"node has no policy configured: start the SuperNode with --node-config "
            f"'{POLICY_NODE_CONFIG}=\"/path/node.toml\"' or set {POLICY_ENV}"
        )
    return str(configured)


def make_client_app(
    policy_for: Callable[[Context], str] = policy_path_from, *, warm_up: bool = False
) -> ClientApp:
    """The node's ClientApp: every ``query.gate`` message through the gate of the policy that
    ``policy_for`` finds in the node's own context. With ``warm_up`` (simulation, where virtual
    nodes share one process and one policy list) an empty ``query.warmup`` reply opens the gate
    (policy, CDM, ledger) before the study, so its first round is not timed with that start-up;
    nothing is released."""
    app = ClientApp()

    @app.query("gate")
    def query(message: Message, context: Context) -> Message:
        """Flower entry point: the node's policy from its own configuration, then the gate."""
        return answer(message, policy_for(context))

    if warm_up:

        @app.query("warmup")
        def warmup(message: Message, context: Context) -> Message:
            open_gate(str(Path(policy_for(context)).resolve()))
            return Message(RecordDict(), reply_to=message)

    return app


app = make_client_app()
