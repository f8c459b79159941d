"""The node's Flower ClientApp: every message becomes a ``GateRequest`` and goes through the gate.

Nothing in a message tells the node where its data, policy, ledger or audit log live: the node
finds its policy TOML from its own configuration (the SuperNode's ``--node-config policy=...``,
the ``FEDOMOP_NODE_POLICY`` environment variable, or the pinned node runner's ``--policy``), and
the policy names everything else. The reply carries only the ``GateReply`` fields.

Every field is checked against its size limit and the JSON nesting limit before it is parsed
(``node.limits``; the limits are constants in ``node.messages``).

Wire format (one ``ConfigRecord`` each way, plain JSON text and bytes, so nothing is unpickled):
request ``gate_request`` = {study: JSON, permit: JSON, analysis_id, state: JSON, round,
transcript: JSON}; reply ``gate_reply`` = {node_name, released, reason, statistics: Arrow IPC
bytes, settings: JSON, audit_hash, claim: JSON, signature}.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from node.limits import bounded_id, bounded_text, parse_json_field
from node.messages import FIELD_LIMITS, GateReply, GateRequest

MESSAGE_TYPE = "query.gate"
REQUEST_KEY = "gate_request"
REPLY_KEY = "gate_reply"
POLICY_ENV = "FEDOMOP_NODE_POLICY"
POLICY_NODE_CONFIG = "policy"


def request_to_content(request: GateRequest) -> RecordDict:
    """Pack a gate request for the wire (the coordinator side)."""
    record = ConfigRecord(
        {
            "study": json.dumps(request.study, sort_keys=True),
            "permit": json.dumps(request.permit, sort_keys=True),
            "analysis_id": request.analysis_id,
            "state": json.dumps(request.state),
            "round": int(request.round),
            "transcript": json.dumps(request.transcript),
        }
    )
    return RecordDict({REQUEST_KEY: record})


def content_to_request(content: RecordDict) -> GateRequest:
    """Rebuild a gate request from a message; raise ``ValueError`` naming what is malformed."""
    if REQUEST_KEY not in content.config_records:
        raise ValueError(f"message has no '{REQUEST_KEY}' record")
    record = content.config_records[REQUEST_KEY]
    try:  # sizes and nesting before parsing (node.messages.FIELD_LIMITS), ids bounded
        study, permit, state = (
            parse_json_field(name, record[name], FIELD_LIMITS[name])
            for name in ("study", "permit", "state")
        )
        transcript = (
            parse_json_field("transcript", record["transcript"], FIELD_LIMITS["transcript"])
            if "transcript" in record
            else None
        )
        analysis_id, round_ = bounded_id(record["analysis_id"]), int(record["round"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed gate request: {bounded_text(str(err))}") from err
    if not isinstance(study, dict) or not isinstance(permit, dict):
        raise ValueError("malformed gate request: study and permit must be JSON objects")
    if state is not None and not isinstance(state, dict):
        raise ValueError("malformed gate request: state must be a JSON object or null")
    if transcript is not None and not isinstance(transcript, dict):
        raise ValueError("malformed gate request: transcript must be a JSON object or null")
    return GateRequest(study, permit, analysis_id, state, round_, transcript)


def reply_to_content(reply: GateReply) -> RecordDict:
    """Pack a gate reply: exactly its fields, nothing else leaves the node."""
    record = ConfigRecord(
        {
            "node_name": reply.node_name,
            "released": bool(reply.released),
            "reason": reply.reason,
            "statistics": bytes(reply.statistics),
            "settings": json.dumps(reply.settings, sort_keys=True, default=str),
            "audit_hash": reply.audit_hash,
            "claim": json.dumps(reply.claim, sort_keys=True),
            "signature": reply.signature,
        }
    )
    return RecordDict({REPLY_KEY: record})


def content_to_reply(content: RecordDict) -> GateReply:
    """Rebuild a gate reply on the coordinator."""
    record = content.config_records[REPLY_KEY]
    return GateReply(
        node_name=str(record["node_name"]),
        released=bool(record["released"]),
        reason=str(record["reason"]),
        statistics=bytes(record["statistics"]),
        settings=json.loads(str(record["settings"])),
        audit_hash=str(record["audit_hash"]),
        claim=json.loads(str(record["claim"])) if "claim" in record else {},
        signature=str(record["signature"]) if "signature" in record else "",
    )


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


app = ClientApp()


@app.query("gate")
def query(message: Message, context: Context) -> Message:
    """Flower entry point: the node's policy from its own configuration, then the gate."""
    return answer(message, policy_path_from(context))
