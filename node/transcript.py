"""Signed releases and the transcript that carries them from one round to the next.

Every release a node makes is signed with its identity key (Ed25519, derived from the node
secret beside its ledger; the permit binds its public half in ``PermitBody.node_keys``). The
signature covers a *claim*: permit id, study hash, analysis id, round, node, the SHA-256 of the
state the node computed on, the nodes whose releases produced that state (``basis``), a snapshot
id of the node's CDM and the SHA-256 of the released statistics.

Round t+1's request carries the transcript of round t: the state of round t and the signed
releases of the nodes that contributed. A node verifies the transcript (``verify``) before it
derives the next state from it (``studies.rounds.next_state``): every signature against the
permit's keys, every claim about the same permit, study, analysis, round and state, its own
release present with its current CDM snapshot, the signers a subset of round t's basis and at
least the policy's minimum. A coordinator that drops, swaps, alters or invents a release, or
sends another round's, is refused by every honest node.

What the transcript shows a node: the other nodes' released statistics, which already passed
their gates and go to the researcher anyway; never anything unreleased.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.messages import GateReply
from studies.permit import canonical_json

_CONTEXT = b"fedomop-release-v1|"
"""Domain separation: a release signature can never be read as any other signed message."""


class TranscriptError(ValueError):
    """A transcript a node cannot verify; the message says which release and why."""


def state_sha256(state: Any) -> str:
    """The hash a claim names for the state a node computed on (``null`` for round 0)."""
    return hashlib.sha256(canonical_json(state)).hexdigest()


@dataclass(frozen=True)
class Claim:
    """What a node's signature on a release asserts."""

    permit_id: str
    study_hash: str
    analysis_id: str
    round: int
    node: str
    state_sha256: str
    basis: tuple[str, ...]
    snapshot: str
    payload_sha256: str

    def message(self) -> bytes:
        """The bytes signed: the claim's canonical JSON behind a domain-separation prefix."""
        return _CONTEXT + canonical_json(self.to_json())

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"basis": list(self.basis)}

    @classmethod
    def from_json(cls, data: Any) -> Claim:
        """A claim from an untrusted mapping, or ``TranscriptError`` naming what is off."""
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise TranscriptError("a release claim must have exactly the claim's fields")
        basis = data["basis"]
        if not isinstance(basis, list) or not all(isinstance(n, str) for n in basis):
            raise TranscriptError("a release claim's basis must be a list of node names")
        if not isinstance(data["round"], int) or isinstance(data["round"], bool):
            raise TranscriptError("a release claim's round must be an integer")
        texts = [k for k in cls.__dataclass_fields__ if k not in ("round", "basis")]
        if not all(isinstance(data[k], str) for k in texts):
            raise TranscriptError("a release claim's fields must be text")
        return cls(**(data | {"basis": tuple(basis)}))


@dataclass(frozen=True)
class SignedRelease:
    """One node's released statistics (Arrow IPC bytes) with its claim and signature."""

    claim: Claim
    statistics: bytes
    signature: str

    def to_json(self) -> dict[str, Any]:
        """The transcript entry: JSON-able, statistics in base64."""
        return {
            "claim": self.claim.to_json(),
            "statistics": base64.b64encode(self.statistics).decode("ascii"),
            "signature": self.signature,
        }

    @classmethod
    def from_json(cls, data: Any) -> SignedRelease:
        if not isinstance(data, dict) or set(data) != {"claim", "statistics", "signature"}:
            raise TranscriptError("a transcript release must hold claim, statistics, signature")
        if not isinstance(data["statistics"], str) or not isinstance(data["signature"], str):
            raise TranscriptError("a transcript release's statistics and signature must be text")
        try:
            statistics = base64.b64decode(data["statistics"], validate=True)
        except ValueError as err:
            raise TranscriptError("a transcript release's statistics are not base64") from err
        return cls(Claim.from_json(data["claim"]), statistics, data["signature"])


def sign(key: Ed25519PrivateKey, claim: Claim) -> str:
    """The node's signature (hex) over a claim."""
    return key.sign(claim.message()).hex()


def check_signature(release: SignedRelease, public_hex: str) -> None:
    """The release's signature verifies against ``public_hex`` and its payload matches."""
    node = release.claim.node
    if hashlib.sha256(release.statistics).hexdigest() != release.claim.payload_sha256:
        raise TranscriptError(f"the release of {node!r} does not match its claimed payload hash")
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(bytes.fromhex(release.signature), release.claim.message())
    except (ValueError, InvalidSignature) as err:
        raise TranscriptError(
            f"the release of {node!r} is not signed by its permit identity"
        ) from err


@dataclass(frozen=True)
class Expected:
    """What every claim of a round-t transcript must say, from the node's own point of view."""

    permit_id: str
    study_hash: str
    analysis_id: str
    round: int
    me: str
    snapshot: str
    min_nodes: int


def parse(transcript: Any) -> tuple[Any, list[SignedRelease]]:
    """The transcript's state and releases, from an untrusted JSON value."""
    if not isinstance(transcript, dict) or set(transcript) != {"state", "releases"}:
        raise TranscriptError("a transcript must hold exactly 'state' and 'releases'")
    releases = transcript["releases"]
    if not isinstance(releases, list):
        raise TranscriptError("a transcript's releases must be a list")
    return transcript["state"], [SignedRelease.from_json(r) for r in releases]


def verify(
    transcript: Any, expected: Expected, identities: dict[str, str]
) -> tuple[Any, dict[str, bytes]]:
    """Check a round's transcript; return its state and the released statistics by node.

    ``identities`` maps every permitted node to its bound identity key (hex).
    """
    state, releases = parse(transcript)
    digest = state_sha256(state)
    released: dict[str, bytes] = {}
    bases = set()
    for release in releases:
        claim = release.claim
        node = claim.node
        if node not in identities:
            raise TranscriptError(f"the transcript holds a release of {node!r}, not a permit node")
        if node in released:
            raise TranscriptError(f"the transcript holds two releases of {node!r}")
        _check_claim(claim, expected, digest)
        check_signature(release, identities[node])
        released[node] = release.statistics
        bases.add(claim.basis)
        if node == expected.me and claim.snapshot != expected.snapshot:
            raise TranscriptError(
                f"this node's CDM changed since round {expected.round}: the study must start again"
            )
    _check_roster(released, bases, expected)
    return state, released


def _check_claim(claim: Claim, expected: Expected, digest: str) -> None:
    """The claim is about this permit, study, analysis, round and state."""
    mismatched = [
        field
        for field, want in (
            ("permit_id", expected.permit_id),
            ("study_hash", expected.study_hash),
            ("analysis_id", expected.analysis_id),
            ("round", expected.round),
            ("state_sha256", digest),
        )
        if getattr(claim, field) != want
    ]
    if mismatched:
        raise TranscriptError(
            f"the release of {claim.node!r} is not one of round {expected.round} of this "
            f"analysis on this state ({', '.join(mismatched)} differ)"
        )


def _check_roster(
    released: dict[str, bytes], bases: set[tuple[str, ...]], expected: Expected
) -> None:
    """This node's release is in; the signers only drop from the round's basis; enough remain."""
    if expected.me not in released:
        raise TranscriptError(f"the transcript of round {expected.round} lacks this node's release")
    if len(bases) != 1:
        raise TranscriptError("the transcript's releases disagree on the round's contributors")
    (basis,) = bases
    if basis and not set(released) <= set(basis):
        extra = sorted(set(released) - set(basis))
        raise TranscriptError(
            f"nodes {extra} joined after round 0: later rounds may only drop nodes"
        )
    if len(released) < expected.min_nodes:
        raise TranscriptError(
            f"only {len(released)} node(s) in the transcript of round {expected.round}; "
            f"this node's policy needs at least {expected.min_nodes}"
        )


def signed_release(reply: GateReply) -> SignedRelease:
    """A released gate reply as a transcript entry (``TranscriptError`` if it has no claim)."""
    return SignedRelease(Claim.from_json(reply.claim), reply.statistics, reply.signature)


def transcript_json(state: Any, releases: list[SignedRelease]) -> dict[str, Any]:
    """The transcript a coordinator sends with the next round (releases in node-name order)."""
    ordered = sorted(releases, key=lambda r: r.claim.node)
    return {"state": state, "releases": [r.to_json() for r in ordered]}
