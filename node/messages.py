"""What crosses between coordinator and node: a request into the gate, a reply out of it.

The transport (Flower or in-process) carries these as plain JSON-able dicts and bytes; the node
rebuilds them here and trusts nothing in them until the gate has checked the permit. Every field
is checked against its size limit and the JSON nesting limit before it is parsed (``node.limits``).

Wire format (one ``ConfigRecord`` each way, plain JSON text and bytes, so nothing is unpickled):
request ``gate_request`` = {study: JSON, permit: JSON, analysis_id, state: JSON, round,
transcript: JSON}; reply ``gate_reply`` = {node_name, released, reason, statistics: Arrow IPC
bytes, settings: JSON, audit_hash, claim: JSON, signature}. Both ends use this codec: the
coordinator imports it without building the node's ClientApp.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from node.limits import FIELD_LIMITS, bounded_id, bounded_text, parse_json_field

MESSAGE_TYPE = "query.gate"
REQUEST_KEY = "gate_request"
REPLY_KEY = "gate_reply"


@dataclass
class GateRequest:
    """One analysis step asked of a node.

    ``study`` is the declarative study definition (the parsed YAML/JSON mapping, never SQL),
    ``permit`` the signed permit document (with its signature), ``analysis_id`` the id of one analysis
    in the study, ``state`` the coordinator's state for multi-round analyses (e.g. GLM coefficients),
    ``round`` its round number (0 for single-round analyses). ``transcript`` (rounds after the
    first) holds the previous round's state and the contributing nodes' signed releases
    (``node.transcript``), from which the node derives the state itself; ``state`` must agree.
    """

    study: dict[str, Any]
    permit: dict[str, Any]
    analysis_id: str
    state: dict[str, Any] | None = None
    round: int = 0
    transcript: dict[str, Any] | None = None


@dataclass
class GateReply:
    """The node's answer: released statistics (Arrow IPC bytes of a statistics table) or a refusal.

    ``released`` is False on any refusal, with ``reason`` saying why and ``statistics`` empty.
    ``settings`` carries what the gate applied (min cell count, suppressed cells, noise scale,
    epsilon/rho charged) for the results' settings table; ``audit_hash`` is the node's audit entry.
    ``claim`` and ``signature``: what the node's identity key signed about this release
    (``node.transcript.Claim``), for the next round's transcript.
    """

    node_name: str
    released: bool
    reason: str = ""
    statistics: bytes = b""
    settings: dict[str, Any] = field(default_factory=dict)
    audit_hash: str = ""
    claim: dict[str, Any] = field(default_factory=dict)
    signature: str = ""


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
    try:  # sizes and nesting before parsing (node.limits.FIELD_LIMITS), ids bounded
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
