"""The node operator's policy (TOML): what this node trusts and the limits it sets for itself.

The policy is the one thing besides its installed code that a node trusts: the permit-body public
keys it accepts, the revocation lists it honours, its minimum cell count (never below the default
10, design: "policies may tighten, nobody may loosen"), the most privacy budget it grants per
permit and per year, the fewest nodes a multi-round analysis may go on with, and the analysis
kinds it runs. Paths are relative to the policy file.

Example (``examples/node.toml``)::

    [node]
    name = "node-a"
    cdm = "cdm.duckdb"
    ledger = "cdm.ledger.sqlite"   # default: beside the CDM
    audit = "audit.jsonl"          # default: beside the CDM

    [trust]
    permit_body_keys = ["keys/permit_body.pub"]
    revocation_lists = ["revocations.json"]

    [privacy]
    min_cell_count = 10
    max_epsilon_per_permit = 1.0
    max_epsilon_per_year = 5.0
    delta = 1e-6
    min_nodes = 2                  # rounds after the first build on at least this many nodes
    min_age_band_years = 5         # narrowest age band a study may cut
    min_time_bin_days = 30         # smallest time-to-event bin
    min_calendar_window_days = 30  # narrowest prevalence period
    min_honest_nodes = 2           # pooled mode: honest nodes assumed, this one included
    require_dp = false             # true: every release needs a DP grant (no exact releases)
    allow_nonprivate_models = false  # true: dp_sgd under a none grant: a logistic model, exact

    [analyses]
    allowed = ["counts", "characterization", "survival", "glm"]

    [compute]
    memory_limit = "1GB"           # DuckDB's memory for this node's queries (its default: 80 % of RAM)
    threads = 2                    # DuckDB threads (its default: one per core)

An optional ``[catalogue]`` section holds the operator's text for the node's HealthDCAT-AP
description (``fedomop node describe``, see ``node.catalogue``); the numbers come from the CDM.
"""

from __future__ import annotations

import tomllib
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from privacy.accounting import epsilon_to_rho
from studies.fields import fields_in_order
from studies.permit import DEFAULT_MIN_CELL_COUNT, trusted_keys


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    name: Annotated[str, Field(min_length=1)]
    cdm: Path
    ledger: Path | None = None
    audit: Path | None = None


class TrustSection(_Section):
    permit_body_keys: Annotated[list[Path], Field(min_length=1)]
    revocation_lists: list[Path] = []


class PrivacySection(_Section):
    min_cell_count: int = Field(default=DEFAULT_MIN_CELL_COUNT, ge=DEFAULT_MIN_CELL_COUNT)
    max_epsilon_per_permit: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    max_epsilon_per_year: float = Field(default=5.0, ge=0.0, allow_inf_nan=False)
    delta: float = Field(default=1e-6, gt=0.0, lt=1.0, allow_inf_nan=False)
    min_nodes: int = Field(
        default=2,
        ge=1,
        description="fewest nodes whose releases a round after the first may build on",
    )
    min_age_band_years: int = Field(default=5, ge=1, description="narrowest age band allowed")
    min_time_bin_days: int = Field(default=30, ge=1, description="smallest time-to-event bin")
    min_calendar_window_days: int = Field(
        default=30, ge=1, description="narrowest prevalence period allowed"
    )
    min_honest_nodes: int = Field(default=2, ge=1)
    """Pooled mode: the fewest honest nodes (this one included) the node assumes in a secure
    sum. Its noise share is sized so that h honest shares carry the permit's noise, and it books
    the loss of h summed shares (``privacy.secagg.noise_share_cost``). 2, not a share of n: a
    node cannot know who else joins, so its assumption must not grow with the roster; 1 trusts
    no other node at all (its share alone carries the whole noise)."""
    require_dp: bool = Field(
        default=False, description="release nothing exactly: every analysis needs a DP grant"
    )
    allow_nonprivate_models: bool = Field(
        default=False,
        description="a dp_sgd analysis under a none grant may release a logistic model "
        "trained without noise, exactly, under the GLM's regression guards (never an MLP)",
    )

    _year_covers_permit = fields_in_order("max_epsilon_per_permit", "max_epsilon_per_year", "below")


class ComputeSection(_Section):
    """What the node's DuckDB connection may take (one per node process, ``node.gate``).

    DuckDB's own default is 80 % of the machine's memory and a thread per core, for each
    connection: a node beside other services (or three on one machine) would let each take
    nearly all of it. ``memory_limit`` caps DuckDB's buffer pool and the intermediates of a
    query (beyond it DuckDB spills to ``<cdm>.tmp`` or, if it cannot, refuses the query);
    ``threads`` also bounds how many hash tables a query builds at once.
    """

    memory_limit: Annotated[
        str, Field(pattern=r"^\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
    ] = "1GB"
    threads: int = Field(default=2, ge=1, le=1024)

    def apply(self, con: Any) -> None:
        """Set both on a DuckDB connection. ``SET``, not ``connect(config=...)``: DuckDB refuses
        a second connection to an open file with another configuration, and a process may hold
        one already (a test's reference, ``study run-local``). The pattern above admits no
        quote, so the value can be written into the statement."""
        con.execute(f"SET memory_limit = '{self.memory_limit}'")
        con.execute(f"SET threads = {int(self.threads)}")


class AnalysesSection(_Section):
    allowed: Annotated[list[str], Field(min_length=1)]


class AgentSection(_Section):
    """An organisation named in the description (publisher, health data access body)."""

    name: Annotated[str, Field(min_length=1)]
    email: Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")] | None = None
    homepage: AnyHttpUrl | None = None

    @model_validator(mode="after")
    def _reachable(self) -> AgentSection:
        if self.email is None and self.homepage is None:
            raise ValueError("give an email or a homepage so the agent can be contacted")
        return self


def _codes(values: list[str], vocabulary: str, what: str) -> list[str]:
    """Check codes against a ``studies.dcat`` code list (imported here: rdflib only when used)."""
    from studies import dcat

    allowed = frozenset(getattr(dcat, vocabulary))
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; allowed: {sorted(allowed)}")
    return values


class CatalogueSection(_Section):
    """The operator's text for the HealthDCAT-AP description; every number comes from the CDM."""

    title: Annotated[str, Field(min_length=1)]
    description: Annotated[str, Field(min_length=1)]
    identifier: AnyHttpUrl
    """The dataset's IRI in the national catalogue (also its ``dct:identifier``)."""
    language: Annotated[str, Field(pattern=r"^[a-z]{2}$")] = "en"
    keywords: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    country: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    """EU country table code of the spatial coverage (``BEL``, ``FRA``, ...)."""
    health_categories: Annotated[list[str], Field(min_length=1)] = ["EHRS"]
    population_coverage: Annotated[str, Field(min_length=1)]
    provenance: Annotated[str, Field(min_length=1)]
    legal_basis: Annotated[list[str], Field(min_length=1)] = ["PublicInterest"]
    purposes: Annotated[list[str], Field(min_length=1)] = ["ScientificResearch"]
    retention_start: date
    retention_end: date
    access_url: AnyHttpUrl
    """Where a researcher requests access (the HDAB's data permit application page)."""
    service_url: AnyHttpUrl
    """The federated access service's endpoint (the coordinator's SuperLink)."""
    contact: AgentSection
    publisher: AgentSection
    hdab: AgentSection

    @field_validator("health_categories")
    @classmethod
    def _categories(cls, values: list[str]) -> list[str]:
        return _codes(values, "HEALTH_CATEGORIES", "health category code(s)")

    @field_validator("legal_basis")
    @classmethod
    def _legal_basis(cls, values: list[str]) -> list[str]:
        return _codes(values, "LEGAL_BASES", "DPV legal basis")

    @field_validator("purposes")
    @classmethod
    def _purposes(cls, values: list[str]) -> list[str]:
        return _codes(values, "PURPOSES", "DPV purpose(s)")

    _retention_in_order = fields_in_order("retention_start", "retention_end")


class Policy(_Section):
    """A validated node policy with paths resolved against the policy file's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    node: NodeSection
    trust: TrustSection
    privacy: PrivacySection = PrivacySection()
    analyses: AnalysesSection
    compute: ComputeSection = ComputeSection()
    catalogue: CatalogueSection | None = None

    @property
    def node_name(self) -> str:
        return self.node.name

    @property
    def cdm_path(self) -> Path:
        return self.node.cdm

    @property
    def ledger_path(self) -> Path:
        return self.node.ledger or self.node.cdm.with_name(self.node.cdm.name + ".ledger.sqlite")

    @property
    def audit_path(self) -> Path:
        return self.node.audit or self.node.cdm.with_name(self.node.cdm.name + ".audit.jsonl")

    @property
    def overlap_path(self) -> Path:
        """The record of entry sets released exactly (``node.overlap``), beside the ledger."""
        return self.ledger_path.with_suffix(".overlap.sqlite")

    @property
    def secret_path(self) -> Path:
        """The node secret (beside the ledger) its identity and pooled-mode keys derive from."""
        return self.ledger_path.with_suffix(".secagg.key")

    def identity_key(self) -> Ed25519PrivateKey:
        """The node's identity: it signs every release; the permit binds its public half."""
        from privacy.secagg import identity_key, node_secret

        return identity_key(node_secret(self.secret_path))

    def identity_hex(self) -> str:
        """The identity's public key as 64 hex digits (what the permit body binds)."""
        from privacy.secagg import identity_public_hex, node_secret

        return identity_public_hex(node_secret(self.secret_path))

    @property
    def min_cell_count(self) -> int:
        return self.privacy.min_cell_count

    @cached_property
    def keys(self) -> dict[str, Ed25519PublicKey]:
        """Key id -> public key of every permit body this node trusts."""
        return trusted_keys(self.trust.permit_body_keys)

    def rho_per_permit(self) -> float:
        """The node's cap on one permit's spending, in rho."""
        return epsilon_to_rho(self.privacy.max_epsilon_per_permit, self.privacy.delta)

    def rho_per_year(self) -> float:
        """The node's cap on a calendar year's spending over all permits, in rho."""
        return epsilon_to_rho(self.privacy.max_epsilon_per_year, self.privacy.delta)

    def allows(self, analysis_kind: str) -> bool:
        """Whether this node runs analyses of this kind at all."""
        return analysis_kind in self.analyses.allowed or "*" in self.analyses.allowed


def load_policy(path: Path) -> Policy:
    """Read and validate a policy TOML; raise ``PolicyError`` naming the file and field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"cannot read policy {path}: {err}") from err
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise PolicyError(f"policy {path}: {problems}") from err
    return _resolve(policy, path.parent.resolve())


def _resolve(policy: Policy, base: Path) -> Policy:
    """Make every path absolute, relative to the policy file's folder."""

    def at(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    node = policy.node.model_copy(
        update={
            "cdm": at(policy.node.cdm),
            "ledger": at(policy.node.ledger),
            "audit": at(policy.node.audit),
        }
    )
    trust = TrustSection(
        permit_body_keys=[at(p) for p in policy.trust.permit_body_keys],
        revocation_lists=[at(p) for p in policy.trust.revocation_lists],
    )
    return policy.model_copy(update={"node": node, "trust": trust})


def check_policy(policy: Policy) -> list[str]:
    """Problems that make the policy unusable at run time (missing files, unreadable keys)."""
    problems = []
    if not _is_file(policy.cdm_path):
        problems.append(f"CDM file {policy.cdm_path} does not exist")
    for key in policy.trust.permit_body_keys:
        if not _is_file(key):
            problems.append(f"permit-body key {key} does not exist")
    if not problems:
        try:
            policy.keys  # noqa: B018 - loading the keys is the check
        except ValueError as err:
            problems.append(str(err))
    for revocations in policy.trust.revocation_lists:
        if not _is_file(revocations):
            problems.append(f"revocation list {revocations} does not exist")
    return problems


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a path the system cannot even look up (a name over the
    file system's length limit raises instead of answering)."""
    try:
        return path.is_file()
    except OSError:
        return False
