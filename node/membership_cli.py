"""``fedomop audit membership``: a node attacks a DP-SGD model trained on its own data.

Run by the node operator on the node, never through the gate: it reads the node's CDM and
attacks a model with ``privacy.membership`` (loss threshold, LiRA with a few reference models)
using the node's training persons as members and its hold-out persons as non-members. It
prints the attacks' AUC, TPR at low FPR and the empirical epsilon lower bound beside the
accounted epsilon, as JSON. Nothing leaves the node.

Which model: with ``--released RESULTS`` (the federated run's results folder) the target is
the released model, the final FedAvg weights of the analysis's summarised_result, and the
accounted epsilon is this node's own accountant for that permit and analysis in its ledger
(``--policy``): every round's DP-SGD steps and noisy counts. The released model depends on this
node's persons only through this node's DP releases (the other nodes' rounds are
post-processing of them), so that epsilon bounds what any attack on it can learn about them.
Without ``--released`` the node trains the study's model on its own training persons exactly
as one node's rounds do and accounts those steps only.
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
    released: Path | None = typer.Option(
        None, "--released", help="results folder of the federated run: attack its final model"
    ),
    policy: Path | None = typer.Option(
        None, "--policy", help="this node's policy: its ledger accounts the released model"
    ),
) -> None:
    """Membership-inference audit of the study's DP-SGD model on this node's own data.

    Prints the attacks' AUC, TPR at low FPR and the empirical epsilon lower bound beside the
    epsilon DP-SGD accounts for, as JSON; nothing leaves the node.

    Example: fedomop audit membership examples/gibleed_dp_training/study.yaml --db cdm.duckdb
    --analysis bleed_model
    """
    target = _released(released, policy, analysis) if released is not None else None
    report = _audit(study, db, analysis, reference_models, not non_private, delta, target)
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    typer.echo(text)


def _released(results: Path, policy_path: Path | None, analysis_id: str) -> dict:
    """The released model's result rows, its permit and this node's ledger accountant for it."""
    from node.policy import PolicyError, load_policy
    from privacy.ledger import Ledger
    from studies.results import read_results

    if policy_path is None:
        fail("--released needs --policy: the node's ledger accounts the released model")
    try:
        result, settings = read_results(results)
        policy = load_policy(policy_path)
    except (FileNotFoundError, PolicyError) as err:
        fail(str(err))
    rows = settings.filter(settings["analysis_id"] == analysis_id)
    if not rows.height:
        fail(f"{results}: no released result of analysis {analysis_id!r}")
    result_id, permit_id = int(rows["result_id"][0]), str(rows["permit_id"][0])
    ledger = Ledger(policy.ledger_path)
    kept = ledger.accountant(permit_id, analysis_id)
    if kept is None and not _released_exactly(ledger, permit_id, analysis_id):
        fail(f"this node's ledger holds no accountant for permit {permit_id}, {analysis_id!r}")
    return {
        "result": result.filter(result["result_id"] == result_id),
        "permit_id": permit_id,
        "accountant": kept,  # None: the non-private baseline, released exactly
    }


def _released_exactly(ledger, permit_id: str, analysis_id: str) -> bool:
    """Whether this node released the analysis's first round under a ``none`` grant (the
    non-private baseline): nothing is accounted, the audit attacks it as non-private."""
    request_id = ledger.round_request(permit_id, analysis_id, 0)
    release = ledger.lookup(request_id) if request_id is not None else None
    return release is not None and release.settings.get("mechanism") == "none"


def _audit(
    study_path: Path,
    db: Path,
    analysis_id: str,
    k: int,
    private: bool,
    delta: float,
    released: dict | None = None,
) -> dict:
    from omop_etl.cdm import connect
    from privacy.dpsgd import NON_PRIVATE, accountant_epsilon
    from privacy.membership import audit
    from studies.analyses.dpsgd import _rows, held_out, released_weights
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
    with connect(db) as con:
        ids, x, y = _rows(prepare_cdm(con, study, db.stem), spec)
    member = ~held_out(ids, spec)
    target, sigma, accounted, what = None, spec.noise_multiplier, None, "node-local training"
    if released is not None:
        try:
            target = released_weights(released["result"], spec)
        except ValueError as err:
            fail(str(err))
        what = f"released federated model (permit {released['permit_id']})"
        if released["accountant"] is None:  # the gated non-private baseline: no epsilon
            private, sigma = False, NON_PRIVATE
            what += ", non-private baseline"
        else:
            history = released["accountant"].state
            sigma = next((float(s) for s, q, _ in history if float(q) < 1.0), sigma)
            accounted = accountant_epsilon(history, delta)
    if sigma is None:
        fail(f"{analysis_id!r} states no noise_multiplier: give --released and --policy")
    config = spec.training(sigma)
    if member.sum() < config.steps_per_epoch or (~member).sum() < 10:
        fail(f"{len(y)} persons in the cohort: too few to train and hold out")
    _, results = audit(
        x, y, member, config, rounds=spec.rounds, seed=spec.seed, private=private,
        delta=delta, reference_models=k, target=target,
    )  # fmt: skip
    if accounted is None and private:
        accounted = accountant_epsilon([config.accountant_step()] * spec.rounds, delta)
    return {
        "audit": "membership",
        "analysis_id": analysis_id,
        "target": what,
        "private": private,
        "delta": delta,
        "noise_multiplier": sigma,
        "accounted_epsilon_training": accounted,
        "target_weights": target,
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
