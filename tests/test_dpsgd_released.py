"""The released model of a federated DP-SGD run: its membership audit and its report.

Two real gates train ``test_dpsgd_budget``'s model (noise fixed by each node from a grant of
epsilon 8) to its result, written as a results folder the way the coordinator writes one.
- ``fedomop audit membership --released`` on one node attacks exactly the final FedAvg weights
  with that node's training persons as members and its hold-out as non-members, and sets the
  attacks' empirical lower bounds (95 %) beside the node's own accountant for the permit, read
  from its ledger: the bounds never exceed it.
- The report draws the model's ROC curves, calibration, epsilon per node and round and loss
  trace from the result; the ROC curve's area is the released AUC, the epsilon per round each
  gate's accountant.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_dpsgd import NODES, build_cdm, node_policy, permit
from test_dpsgd_budget import NODE_NOISE
from typer.testing import CliRunner

from fedomop.cli import app
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from privacy.ledger import Ledger
from studies.analyses import REGISTRY
from studies.analyses.dpsgd import ACCOUNTING_ESTIMATES, released_weights
from studies.loading import study_from_data
from studies.results import bind_results, write_results
from studies.runner import drive
from studies.statistics import from_ipc

TRAINING = ("node-a", "node-b")
#: The node-noise study with its loss trace on (each round evaluates its incoming weights), and
#: a hold-out in two risk bins, counted at a noise that leaves them above 10.
TRACED: dict[str, Any] = copy.deepcopy(NODE_NOISE)
TRACED["analyses"][0] |= {"trace": True, "evaluation_edges": [0.45], "evaluation_rho": 0.1}
CAP = 8.0
SPEC = study_from_data(TRACED).analysis("model")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``test_dpsgd``'s nodes five times larger: hold-out bins whose noisy counts clear the
    minimum cell count (at 300 persons a node, one bin's events near 10 were withheld)."""
    import os

    from studies.permit import generate_keypair, load_private_key

    root = tmp_path_factory.mktemp("dpsgd_released")
    private, public, _ = generate_keypair(root / "keys", "permit_body")
    cdms = {n: build_cdm(root / f"{n}.duckdb", 5 * size, s) for n, (size, s) in NODES.items()}
    secrets = {name: os.urandom(32) for name in NODES}
    return {"key": load_private_key(private), "pub": public, "cdms": cdms, "secrets": secrets}


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory, world) -> tuple[Path, dict, dict]:
    """One federated run for this module's tests (training is the costly part)."""
    return federated_run(tmp_path_factory.mktemp("released"), world)


def federated_run(tmp_path: Path, world: dict[str, Any]) -> tuple[Path, dict, dict[str, Path]]:
    """The model trained through real gates to its result; (results folder, permit, policies)."""
    document = permit(world, study=TRACED, cap=CAP)
    policies = {n: node_policy(tmp_path / n, world, n, min_nodes=2) for n in TRAINING}
    gates = {n: Gate(load_policy(p)) for n, p in policies.items()}
    sent: dict[str, Any] = {"transcript": None}

    def through_gates(state: Any, round_: int) -> dict:
        request = GateRequest(TRACED, document, "model", state, round_, sent["transcript"])
        replies = {n: gate.handle(request) for n, gate in gates.items()}
        assert all(r.released for r in replies.values()), [r.reason for r in replies.values()]
        sent["transcript"] = transcript_json(state, [signed_release(r) for r in replies.values()])
        return {n: from_ipc(r.statistics) for n, r in replies.items()}

    result = drive(REGISTRY["dp_sgd"](), SPEC, through_gates)
    setting = {"result_type": "dp_sgd", "analysis_id": "model"}
    setting["permit_id"] = document["body"]["permit_id"]
    folder = write_results(tmp_path / "results", *bind_results([(result, setting)]))
    return folder, document, policies


@pytest.mark.slow
def test_audit_attacks_the_released_fedavg_model_within_its_accounting(
    tmp_path: Path, world, released
) -> None:
    assert set(TRAINING) <= set(NODES)
    results, document, policies = released
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(TRACED))
    args = ["audit", "membership", str(study), "--analysis", "model", "--reference-models", "2"]
    args += ["--db", str(world["cdms"]["node-a"]), "--released", str(results)]
    out = tmp_path / "audit.json"
    ran = CliRunner().invoke(app, [*args, "--policy", str(policies["node-a"]), "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    report = json.loads(out.read_text())

    from studies.results import read_results

    weights = released_weights(read_results(results)[0], SPEC)
    assert report["target"].startswith("released federated model")
    assert report["target_weights"] == weights  # the attack's target is what was released
    kept = Ledger(load_policy(policies["node-a"]).ledger_path).accountant(
        document["body"]["permit_id"], "model"
    )
    assert report["accounted_epsilon_training"] == pytest.approx(kept.epsilon, rel=1e-9)
    assert report["accounted_epsilon_training"] <= CAP  # the grant the node fixed its noise for
    assert report["noise_multiplier"] == next(s for s, q, _ in kept.state if q < 1)
    assert [a["attack"] for a in report["attacks"]] == ["loss_threshold", "lira"]
    for attack in report["attacks"]:
        assert attack["epsilon_lower_bound"] <= report["accounted_epsilon_training"], attack
    assert report["bound_within_accounted"] is True

    without = CliRunner().invoke(app, [*args])  # --released needs the node's ledger
    assert without.exit_code == 1 and "--released needs --policy" in without.output


@pytest.mark.slow
def test_report_draws_roc_calibration_and_epsilon_per_node_and_round(released) -> None:
    import numpy as np
    import polars as pl

    from coordinator.plots.prediction import _wide, roc_points
    from coordinator.report import write_report
    from studies.results import read_results

    results, document, policies = released
    page = write_report(results).read_text()
    for name in ("roc", "calibration", "epsilon_rounds", "loss_trace"):
        assert (results / "plots" / f"model_{name}.png").stat().st_size > 5000, name
        assert f"plots/model_{name}.png" in page
    result = read_results(results)[0]
    pooled = _wide(result, "calibration")["federated"]
    fpr, tpr = roc_points(pooled)
    auc = result.filter(
        (pl.col("variable_name") == "evaluation") & (pl.col("cdm_name") == "federated")
        & (pl.col("estimate_name") == "auc")
    )["estimate_value"]  # fmt: skip
    assert np.trapezoid(tpr, fpr) == pytest.approx(float(auc[0]), abs=1e-12)
    from coordinator.headlines import key_result

    line = key_result("dp_sgd", result)
    assert line.startswith(f"prediction model: hold-out AUC {float(auc[0]):.2f} (95% CI "), line
    spent = _wide(result, "privacy")
    assert sorted(spent) == sorted(TRAINING)
    # the attack's question: do the gate's accounting rows tell anything of a node's data? Two
    # nodes with other persons under one grant and delta sign the same numbers, round by round
    a, b = (spent[n].select(list(ACCOUNTING_ESTIMATES)) for n in TRAINING)
    assert a.equals(b)
    for node in TRAINING:
        kept = Ledger(load_policy(policies[node]).ledger_path).accountant(
            document["body"]["permit_id"], "model"
        )
        epsilons = spent[node]["epsilon"].to_list()
        assert len(epsilons) == SPEC.rounds + 1 and epsilons == sorted(epsilons)
        assert epsilons[-1] == pytest.approx(kept.epsilon, rel=1e-12)  # its whole accountant
