"""What crosses between coordinator and node: a request into the gate, a reply out of it.

The transport (Flower or in-process) carries these as plain JSON-able dicts and bytes; the node
rebuilds them here and trusts nothing in them until the gate has checked the permit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Size limits of a request's fields, checked on the raw text BEFORE it is parsed
# (``node.limits.parse_json_field``), so an oversized or deeply nested field costs the node a
# length check and one linear scan, never a parse, a validation or an echo.
MIB = 1024 * 1024
#: A study definition (YAML/JSON mapping; inlined Circe cohorts are a few kB each).
MAX_STUDY_BYTES = 1 * MIB
#: A signed permit (one key id, a few node keys and grants).
MAX_PERMIT_BYTES = 64 * 1024
#: A round's state (GLM/Cox coefficients, pooled roster, DP-SGD weights).
MAX_STATE_BYTES = 4 * MIB
#: The signed releases of the previous round forwarded to each node.
MAX_TRANSCRIPT_BYTES = 32 * MIB
#: Per-field limits by the wire record's key (``node.client_app``).
FIELD_LIMITS: dict[str, int] = {
    "study": MAX_STUDY_BYTES,
    "permit": MAX_PERMIT_BYTES,
    "state": MAX_STATE_BYTES,
    "transcript": MAX_TRANSCRIPT_BYTES,
}
#: Deepest nesting of JSON arrays and objects in any field (a study needs about 10).
MAX_JSON_DEPTH = 32
#: Longest analysis id (study ids are at most 64 characters).
MAX_ANALYSIS_ID_CHARS = 200
#: Longest refusal reason a reply or audit entry carries; longer ones are cut and hashed.
MAX_REASON_CHARS = 500


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
