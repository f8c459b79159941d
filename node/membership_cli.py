"""``fedomop audit membership``: a node attacks a DP-SGD model trained on its own data.

Run by the node operator on the node, never through the gate: it reads the node's CDM, trains
the study's model on the node's training persons exactly as one node's rounds do, and attacks
it with ``privacy.membership`` (loss threshold, LiRA with a few reference models) using those
training persons as members and the node's hold-out persons as non-members. It prints the
attacks' AUC, TPR at low FPR and the empirical epsilon lower bound beside the epsilon that
DP-SGD accounts for the same training (its steps only; the gate adds the noisy counts of
each release), as JSON. Nothing leaves the node.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedomop.ui import fail


def membership_command(
    study: Path = typer.Argument(..., metavar="STUDY", help="study definition (YAML or JSON)"),
    db: Path = typer.Option(..., "--db", help="this node's CDM DuckDB file"),
    analysis: str = typer.Option(..., "--analysis", help="id of a dp_sgd analysis"),
    reference_models: int = typer.Option(
        4, "--reference-models", min=0, max=64, help="models LiRA trains without each person"
    ),
    non_private: bool = typer.Option(False, "--non-private", help="audit without DP (baseline)"),
    delta: float = typer.Option(
        1e-6, "--delta", min=1e-12, max=0.1, help="delta of the epsilon bound and accounting"
    ),
    out: Path | None = typer.Option(None, "--out", help="also write the JSON here"),
) -> None:
    """Membership-inference audit of the study's DP-SGD model on this node's own data.

    Prints the attacks' AUC, TPR at low FPR and the empirical epsilon lower bound beside the
    epsilon DP-SGD accounts for, as JSON; nothing leaves the node.

    Example: fedomop audit membership examples/gibleed_dp_training/study.yaml --db cdm.duckdb
    --analysis bleed_model
    """
    report = _audit(study, db, analysis, reference_models, not non_private, delta)
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    typer.echo(text)


def _audit(
    study_path: Path, db: Path, analysis_id: str, k: int, private: bool, delta: float
) -> dict:
    import duckdb

    from privacy.dpsgd import accountant_epsilon
    from privacy.membership import audit
    from studies.analyses.dpsgd import _rows, held_out
    from studies.loading import load_study
    from studies.model import StudyError
    from studies.runner import prepare_cdm

    try:
        study = load_study(study_path)
    except StudyError as err:
        fail(f"{study_path}: {err}")
    try:
        spec = study.analysis(analysis_id)
    except KeyError as err:  # its message names the study's analysis ids
        fail(f"{study_path}: {err.args[0]}")
    if spec.kind != "dp_sgd":
        fail(f"analysis {analysis_id!r} is of kind {spec.kind!r}, not dp_sgd")
    if not db.is_file():
        fail(f"no CDM database at {db}")
    with duckdb.connect(str(db), read_only=True) as con:
        ids, x, y = _rows(prepare_cdm(con, study, db.stem), spec)
    member = ~held_out(ids, spec)
    if member.sum() < spec.training().steps_per_epoch or (~member).sum() < 10:
        fail(f"{len(y)} persons in the cohort: too few to train and hold out")
    config = spec.training()
    _, results = audit(
        x, y, member, config, rounds=spec.rounds, seed=spec.seed, private=private,
        delta=delta, reference_models=k,
    )  # fmt: skip
    accounted = (
        accountant_epsilon([config.accountant_step()] * spec.rounds, delta) if private else None
    )
    return {
        "audit": "membership",
        "analysis_id": analysis_id,
        "private": private,
        "delta": delta,
        "accounted_epsilon_training": accounted,
        "members": int(member.sum()),
        "non_members": int((~member).sum()),
        "attacks": [r.as_dict() for r in results],
        "bound_within_accounted": None
        if accounted is None
        else all(r.epsilon_lower_bound <= accounted for r in results),
    }


def register(app: typer.Typer) -> None:
    """Attach the ``audit`` group (``membership``) to the root command."""
    audit_app = typer.Typer(
        help="Privacy audits a node runs on its own data.", no_args_is_help=True
    )
    audit_app.command("membership")(membership_command)
    app.add_typer(audit_app, name="audit")
