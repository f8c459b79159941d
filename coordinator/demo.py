"""The demo federation: synthetic nodes, a demo permit body, node policies, a signed permit.

``fedomop demo`` and the federation tests set up the same parts: each node a folder with its own
CDM (``cdm.duckdb``), policy (``node.toml``) and, beside the CDM, its ledger and audit log; one
permit body key pair whose public key every node trusts; one permit naming the nodes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from studies.canonical import study_hash
from studies.model import Study
from studies.permit import (
    PermitAnalysis,
    PermitBody,
    generate_keypair,
    issuer_fields,
    load_private_key,
    sign,
    write_json,
)

DEMO_DIR = Path(__file__).resolve().parents[1] / "examples" / "demo"
DEMO_STUDY = DEMO_DIR / "study.yaml"
#: (profile, patients, seed) per demo node, cycled when more nodes are asked for. Sized so that
#: every node alone has at least the minimum cell count (10) of GI bleeds per follow-up year
#: among its NSAID users: with fewer, each gate withholds its Kaplan–Meier counts and the
#: pooled curve cannot be drawn (about 1,000 patients per node give 1-5 bleeds a year).
DEMO_NODES = [
    ("urban_hospital", 12000, 11),
    ("rural_clinic", 8000, 12),
    ("elderly_care", 9000, 13),
    ("paediatric", 6000, 14),
]
ALL_KINDS = ["counts", "characterization", "incidence", "survival", "glm"]


@dataclass
class PermitBodyKeys:
    """The demo permit body's key pair."""

    private: Path
    public: Path


def make_permit_body(folder: Path) -> PermitBodyKeys:
    """A fresh permit body key pair in ``folder`` (reused when it is already there)."""
    private, public = folder / "permit_body.key", folder / "permit_body.pub"
    if not private.is_file():
        private, public, _ = generate_keypair(folder, "permit_body")
    return PermitBodyKeys(private, public)


def write_policy(
    node_dir: Path,
    name: str,
    cdm: Path,
    permit_body_pub: Path,
    min_cell_count: int = 10,
    *,
    kinds: list[str] = ALL_KINDS,
    max_epsilon: float = 1.0,
    allow_nonprivate_models: bool = False,
) -> Path:
    """A node policy (``node.toml``) trusting the permit body, with ledger and audit beside it
    (``kinds`` allowed, ``max_epsilon`` per permit and five times that per year; non-private
    models only when ``allow_nonprivate_models``)."""
    node_dir.mkdir(parents=True, exist_ok=True)
    allowed = ", ".join(f'"{k}"' for k in kinds)
    text = f"""# Policy of node {name} (written by fedomop demo).
[node]
name = "{name}"
cdm = "{cdm.resolve().as_posix()}"
ledger = "ledger.sqlite"
audit = "audit.jsonl"

[trust]
permit_body_keys = ["{permit_body_pub.resolve().as_posix()}"]

[privacy]
min_cell_count = {min_cell_count}
max_epsilon_per_permit = {max_epsilon:g}
max_epsilon_per_year = {5 * max_epsilon:g}
allow_nonprivate_models = {str(allow_nonprivate_models).lower()}

[analyses]
allowed = [{allowed}]
"""
    path = node_dir / "node.toml"
    path.write_text(text)
    return path


def issue_permit(
    study: Study,
    nodes: list[str],
    private_key: Path,
    out: Path,
    *,
    epsilon: float = 1.0,
    valid_days: int = 30,
    analyses: list[str] | None = None,
    node_keys: dict[str, str] | None = None,
    grants: list[PermitAnalysis] | None = None,
) -> dict[str, Any]:
    """Sign a permit for ``study`` at ``nodes`` (exact releases, disclosure control only, but
    for ``grants``), binding the nodes' identity keys (``node_keys``) that multi-round
    analyses need."""
    key = load_private_key(private_key)
    ids = analyses or [spec.id for spec in study.analyses]
    granted = {grant.id: grant for grant in grants or []}
    body = PermitBody(
        **issuer_fields(key),
        study_hash=study_hash(study),
        study_name=study.name,
        nodes=nodes,
        analyses=[granted.get(aid, PermitAnalysis(id=aid)) for aid in ids],
        epsilon=epsilon,
        valid_from=date.today(),
        valid_until=date.today() + timedelta(days=valid_days),
        purpose="fedomop demo",
        node_keys=node_keys or {},
    )
    document = sign(body, key)
    write_json(out, document)
    return document


def node_identities(policies: list[Path]) -> dict[str, str]:
    """Each node's identity key (hex) by name, as its operator hands it to the permit body."""
    from node.policy import load_policy

    loaded = [load_policy(path) for path in policies]
    return {policy.node_name: policy.identity_hex() for policy in loaded}


def build_demo_nodes(
    folder: Path,
    count: int,
    progress: Callable[[str], None] | None = None,
    patients: int | None = None,
    rare_patients: list[int] | None = None,
) -> list[tuple[str, Path]]:
    """``count`` heterogeneous synthetic nodes: Synthea-format CSVs -> OMOP CDM DuckDB each.

    Profiles (and default sizes) cycle through ``DEMO_NODES``; ``patients`` sets every size;
    ``rare_patients[i]``, when given, how many of node i's patients have the rare condition.
    Nodes already built in ``folder`` are reused. The generated Synthea CSVs are removed once
    the CDM is built (they are several times its size; ``fedomop etl synth`` makes them again).
    """
    from omop_etl.synth import generate
    from omop_etl.synthea import load_synthea

    say = progress or (lambda _text: None)
    nodes = []
    for i in range(count):
        profile, size, seed = DEMO_NODES[i % len(DEMO_NODES)]
        size = patients or size
        name = f"node{i + 1}-{profile.replace('_', '-')}"
        node_dir = folder / name
        cdm = node_dir / "cdm.duckdb"
        if cdm.is_file():
            say(f"{name}: reusing the node already built in {cdm} (remove it to rebuild)")
        else:
            say(f"{name}: generating {size} patients ({profile})")
            src = generate(
                node_dir / "synthea",
                patients=size,
                seed=seed + 100 * i,
                profile=_profile(profile, rare_patients[i] if rare_patients else None),
            )
            say(f"{name}: ETL to OMOP CDM")
            load_synthea(src, cdm, progress=False)
            shutil.rmtree(src)
        nodes.append((name, cdm))
    return nodes


def _profile(name: str, rare_patients: int | None) -> Any:
    """The generator profile ``name``, with ``rare_patients`` rare-condition patients if given."""
    from dataclasses import replace

    from omop_etl.profiles import get_profile

    profile = get_profile(name)
    return (
        profile
        if rare_patients is None
        else replace(profile, rare_condition_patients=rare_patients)
    )


def run_demo(
    out: Path, count: int, timeout_s: float, progress: Callable[[str], None] | None = None
) -> Any:
    """The whole demo: nodes, permit body, policies, permit, the study in Flower simulation."""
    from coordinator.simulation import run_simulated, write_nodes_toml
    from coordinator.study_runner import StudyPlan
    from studies.canonical import canonical_data
    from studies.loading import load_study

    out = out.resolve()
    nodes = build_demo_nodes(out / "nodes", count, progress)
    keys = make_permit_body(out / "permit_body")
    policies = [write_policy(cdm.parent, name, cdm, keys.public) for name, cdm in nodes]
    write_nodes_toml(out / "nodes.toml", policies)
    study = load_study(DEMO_STUDY)
    permit = issue_permit(
        study,
        [name for name, _ in nodes],
        keys.private,
        out / "permit.json",
        node_keys=node_identities(policies),
    )
    plan = StudyPlan(canonical_data(study), permit, str(out / "results"), 2, timeout_s)
    return run_simulated(plan, policies, progress)
