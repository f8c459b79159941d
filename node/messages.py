"""What crosses between coordinator and node: a request into the gate, a reply out of it.

The transport (Flower or in-process) carries these as plain JSON-able dicts and bytes; the node
rebuilds them here and trusts nothing in them until the gate has checked the permit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
