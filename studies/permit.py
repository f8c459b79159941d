"""Data permits: the document a permit body signs, its canonical bytes, signing and verification.

A permit fixes what may be computed on a study (by its hash), on which nodes, with which privacy
budget, minimum cell count and validity dates. It travels as ``{"body": ..., "signature": ...}``:
the signature is detached from the body (computed over the body's canonical JSON) so anyone
holding the permit body's public key can check it, and nothing outside ``body`` is trusted.

Revocation lists use the same envelope: a permit body signs the list of permit ids it has
withdrawn, and nodes honour a list only when it verifies against a key they trust and only for
permits issued by that same key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from privacy.defaults import DEFAULT_MIN_CELL_COUNT
from privacy.grant import Mechanism
from studies.canonical import canonical_json
from studies.fields import fields_in_order


class PermitError(ValueError):
    """A permit, revocation list or key that cannot be trusted; the message says why."""


class PermitAnalysis(BaseModel):
    """How one analysis of the study may be released.

    ``mechanism`` "none" releases with disclosure control only (exact methods stay exact);
    "gaussian" (discrete Gaussian, zCDP) or "laplace" (discrete Laplace, pure DP) add OpenDP noise
    to every count and sum row. ``cost`` is the privacy loss of one release: rho for gaussian,
    epsilon for laplace. "dp_sgd" (the ``dp_sgd`` analysis kind only) releases model weights
    trained with Opacus DP-SGD at the node; each round's loss comes from the node's accountant
    (``privacy.dpsgd``) and ``cost`` caps the analysis's total epsilon at the permit's delta. ``max_rows_per_person`` bounds how many count (and sum) rows one person
    can touch; None means every row (the safe default when the permit body cannot bound it).
    ``resolution`` is the unit sums are rounded to before integer noise. ``max_releases`` caps
    the answers a node gives for this analysis under the permit (every round counts), so a
    coordinator cannot probe an exact analysis, e.g. a GLM at chosen coefficients, without end.
    ``max_rounds`` lowers the rounds the analysis declares (``studies.rounds.profile_of``); it
    can never raise them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    mechanism: Mechanism = "none"
    cost: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    max_rows_per_person: int | None = Field(default=None, ge=1)
    resolution: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    max_releases: int | None = Field(default=None, ge=1)
    max_rounds: int | None = Field(default=None, ge=1)

    @model_serializer(mode="wrap")
    def _omit_unset_rounds(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No ``max_rounds`` key when the permit keeps the declared rounds: permits signed before
        the field existed keep their canonical bytes, hence their signatures."""
        data = handler(self)
        if self.max_rounds is None:
            data.pop("max_rounds", None)
        return data

    @model_validator(mode="after")
    def _cost_matches_mechanism(self) -> PermitAnalysis:
        if self.mechanism == "none" and self.cost != 0.0:
            raise ValueError(f"analysis {self.id!r}: cost given without a DP mechanism")
        if self.mechanism != "none" and self.cost <= 0.0:
            raise ValueError(f"analysis {self.id!r}: mechanism {self.mechanism} needs cost > 0")
        return self

    def cost_rho(self) -> float:
        """The zCDP cost of one release (pure epsilon enters as epsilon^2 / 2).

        DP-SGD has no fixed cost per release: 0 here; the gate charges each round from the
        node's accountant and checks the budget with that (``node.gate``).
        """
        if self.mechanism == "dp_sgd":
            return 0.0
        from privacy.accounting import pure_epsilon_to_rho  # OpenDP: not when a study validates

        return pure_epsilon_to_rho(self.cost) if self.mechanism == "laplace" else self.cost


class PermitBody(BaseModel):
    """What a permit body grants; every field is covered by the signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    permit_id: str = Field(min_length=1)
    issuer_key_id: str = Field(min_length=1)
    study_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    study_name: str = ""
    nodes: list[str] = Field(min_length=1)
    analyses: list[PermitAnalysis] = Field(min_length=1)
    epsilon: float = Field(
        ge=0.0, allow_inf_nan=False, description="privacy budget per permitted node"
    )
    delta: float = Field(default=1e-6, gt=0.0, lt=1.0, allow_inf_nan=False)
    min_cell_count: int = Field(default=DEFAULT_MIN_CELL_COUNT, ge=DEFAULT_MIN_CELL_COUNT)
    valid_from: date
    valid_until: date
    purpose: str = ""
    issued_at: datetime
    node_keys: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=dict,
        description="node name -> pooling identity (Ed25519 public key hex) for pooled mode",
    )

    _dates_in_order = fields_in_order("valid_from", "valid_until")

    @model_validator(mode="after")
    def _node_keys_for_permitted_nodes(self) -> PermitBody:
        strangers = sorted(set(self.node_keys) - set(self.nodes))
        if strangers:
            raise ValueError(f"node_keys names nodes the permit does not: {strangers}")
        return self

    @model_serializer(mode="wrap")
    def _omit_empty_node_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """No ``node_keys`` key when none are bound: permits signed before the field existed
        keep their canonical bytes, hence their signatures."""
        data = handler(self)
        if not self.node_keys:
            data.pop("node_keys", None)
        return data

    def date_problem(self, today: date) -> str | None:
        """Why the permit cannot be used on ``today`` (not yet valid, or expired), else None.

        The one date rule: the gate refuses with it, and the coordinator and ``permit verify``
        say it before anything runs.
        """
        if today < self.valid_from:
            return f"permit {self.permit_id} is not valid before {self.valid_from}"
        if today > self.valid_until:
            return f"permit {self.permit_id} expired on {self.valid_until}"
        return None

    def analysis(self, analysis_id: str) -> PermitAnalysis | None:
        """The grant for one analysis id, or None when the permit does not cover it."""
        return next((a for a in self.analyses if a.id == analysis_id), None)


class Revocation(BaseModel):
    """One withdrawn permit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    permit_id: str
    revoked_at: datetime
    reason: str = ""


class RevocationList(BaseModel):
    """The permits one permit body has withdrawn; nodes refuse them whatever their dates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    issuer_key_id: str
    updated_at: datetime
    revoked: list[Revocation] = Field(default_factory=list)

    def revoked_ids(self) -> set[str]:
        """The ids of the withdrawn permits."""
        return {r.permit_id for r in self.revoked}


class Signature(BaseModel):
    """A detached Ed25519 signature over the canonical JSON of a body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["Ed25519"] = "Ed25519"
    key_id: str
    value: str


# --- keys ----------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path, name: str = "permit_body") -> tuple[Path, Path, str]:
    """Write ``name.key`` (PKCS#8 PEM, owner-only) and ``name.pub`` (PEM); return both and the id."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if private_path.exists():
        raise PermitError(f"{private_path} exists; refusing to overwrite a signing key")
    private_key = Ed25519PrivateKey.generate()
    private_path.touch(mode=0o600)
    private_path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path, key_id(private_key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key written by ``generate_keypair``."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise PermitError(f"cannot read private key {path}: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise PermitError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise PermitError(f"cannot read public key {path}: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise PermitError(f"{path} is not an Ed25519 public key")
    return key


def trusted_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key for the permit bodies a node trusts."""
    keys = [load_public_key(p) for p in paths]
    return {key_id(k): k for k in keys}


# --- signing and verification --------------------------------------------------------------------

Body = TypeVar("Body", bound=BaseModel)


def sign(body: BaseModel, private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signed envelope ``{"body", "signature"}`` of a permit or revocation list."""
    body_json = body.model_dump(mode="json")
    signature = Signature(
        key_id=key_id(private_key.public_key()),
        value=base64.b64encode(private_key.sign(canonical_json(body_json))).decode("ascii"),
    )
    return {"body": body_json, "signature": signature.model_dump(mode="json")}


def verify(
    document: Any, model: type[Body], keys: dict[str, Ed25519PublicKey], issuer_field: str
) -> Body:
    """Check a signed envelope against trusted keys and return its parsed body.

    The body must parse strictly (unknown fields refused), be signed by a trusted key, and name
    that same key as its issuer in ``issuer_field``; anything else raises ``PermitError``.
    """
    if not isinstance(document, dict) or set(document) != {"body", "signature"}:
        raise PermitError("not a signed document: expected exactly the keys 'body' and 'signature'")
    try:
        body = model.model_validate(document["body"])
        signature = Signature.model_validate(document["signature"])
    except ValidationError as err:
        raise PermitError(f"malformed {model.__name__}: {_first_error(err)}") from err
    public_key = keys.get(signature.key_id)
    if public_key is None:
        raise PermitError(f"signed by unknown issuer key {signature.key_id!r}")
    if getattr(body, issuer_field) != signature.key_id:
        raise PermitError(
            f"{issuer_field} {getattr(body, issuer_field)!r} does not match the signing key"
        )
    try:
        raw = base64.b64decode(signature.value, validate=True)
        public_key.verify(raw, canonical_json(body.model_dump(mode="json")))
    except (InvalidSignature, ValueError) as err:
        raise PermitError("signature does not verify: the document was altered or forged") from err
    return body


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def verify_permit(document: Any, keys: dict[str, Ed25519PublicKey]) -> PermitBody:
    """The permit body, once its signature verifies against one of ``keys``."""
    return verify(document, PermitBody, keys, "issuer_key_id")


def verify_revocations(document: Any, keys: dict[str, Ed25519PublicKey]) -> RevocationList:
    """The revocation list, once its signature verifies against one of ``keys``."""
    return verify(document, RevocationList, keys, "issuer_key_id")


def new_permit_id() -> str:
    """A fresh, unguessable permit id."""
    return f"pmt-{secrets.token_hex(8)}"


def now_utc() -> datetime:
    """The current time in UTC, whole seconds (what permits and lists record)."""
    return datetime.now(UTC).replace(microsecond=0)


def issuer_fields(private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The body fields a permit body fills in itself at each issue, whatever it grants: a fresh
    permit id, the fingerprint of the key that signs, and the time of issue."""
    return {
        "permit_id": new_permit_id(),
        "issuer_key_id": key_id(private_key.public_key()),
        "issued_at": now_utc(),
    }


def revoke(
    existing: dict[str, Any] | None,
    permit_id: str,
    private_key: Ed25519PrivateKey,
    reason: str = "",
) -> dict[str, Any]:
    """Add ``permit_id`` to a permit body's signed revocation list (a new list when None)."""
    issuer = key_id(private_key.public_key())
    current = (
        verify_revocations(existing, {issuer: private_key.public_key()})
        if existing is not None
        else RevocationList(issuer_key_id=issuer, updated_at=now_utc())
    )
    revoked = list(current.revoked)
    if permit_id not in current.revoked_ids():
        revoked.append(Revocation(permit_id=permit_id, revoked_at=now_utc(), reason=reason))
    updated = RevocationList(issuer_key_id=issuer, updated_at=now_utc(), revoked=revoked)
    return sign(updated, private_key)


def read_json(path: Path) -> Any:
    """Read a JSON document, naming the file when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:  # not UTF-8: unreadable
        raise PermitError(f"cannot read {path}: {err}") from err


def write_json(path: Path, document: Any) -> None:
    """Write a signed document readably (the signature covers the canonical form, not the layout)."""
    Path(path).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
