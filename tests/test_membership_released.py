"""The membership audit attacks the released model: the final FedAvg weights of a federated run.

Two real gates train ``test_dpsgd_budget``'s model (noise fixed by each node from a grant of
epsilon 2) to its result; the result is written as a results folder the way the coordinator
writes one. ``fedomop audit membership --released`` on one node then attacks exactly those
weights with that node's training persons as members and its hold-out as non-members, and sets
the attacks' empirical lower bounds (95 %) beside the node's own accountant for the permit,
read from its ledger: the bounds never exceed it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_dpsgd import NODES, node_policy, permit, world
from test_dpsgd_budget import NODE_NOISE, SPEC
from typer.testing import CliRunner

from fedomop.cli import app
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from privacy.ledger import Ledger
from studies.analyses import REGISTRY
from studies.analyses.dpsgd import released_weights
from studies.results import bind_results, write_results
from studies.runner import drive
from studies.statistics import from_ipc

__all__ = ["world"]  # the module-scoped fixture, imported for pytest
TRAINING = ("node-a", "node-b")


def federated_run(tmp_path: Path, world: dict[str, Any]) -> tuple[Path, dict, dict[str, Path]]:
    """The model trained through real gates to its result; (results folder, permit, policies)."""
    document = permit(world, study=NODE_NOISE, cap=2.0)
    policies = {n: node_policy(tmp_path / n, world, n, min_nodes=2) for n in TRAINING}
    gates = {n: Gate(load_policy(p)) for n, p in policies.items()}
    sent: dict[str, Any] = {"transcript": None}

    def through_gates(state: Any, round_: int) -> dict:
        request = GateRequest(NODE_NOISE, document, "model", state, round_, sent["transcript"])
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
    tmp_path: Path, world
) -> None:
    assert set(TRAINING) <= set(NODES)
    results, document, policies = federated_run(tmp_path, world)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(NODE_NOISE))
    args = ["audit", "membership", str(study), "--analysis", "model", "--reference-models", "2"]
    args += ["--db", str(world["cdms"]["node-a"]), "--released", str(results)]
    out = tmp_path / "audit.json"
    ran = CliRunner().invoke(app, [*args, "--policy", str(policies["node-a"]), "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    report = json.loads(out.read_text())

    from studies.results import read_results

    released = released_weights(read_results(results)[0], SPEC)
    assert report["target"].startswith("released federated model")
    assert report["target_weights"] == released  # the attack's target is what was released
    kept = Ledger(load_policy(policies["node-a"]).ledger_path).accountant(
        document["body"]["permit_id"], "model"
    )
    assert report["accounted_epsilon_training"] == pytest.approx(kept.epsilon, rel=1e-9)
    assert report["accounted_epsilon_training"] <= 2.0  # the grant the node fixed its noise for
    assert report["noise_multiplier"] == next(s for s, q, _ in kept.state if q < 1)
    assert [a["attack"] for a in report["attacks"]] == ["loss_threshold", "lira"]
    for attack in report["attacks"]:
        assert attack["epsilon_lower_bound"] <= report["accounted_epsilon_training"], attack
    assert report["bound_within_accounted"] is True

    without = CliRunner().invoke(app, [*args])  # --released needs the node's ledger
    assert without.exit_code == 1 and "--released needs --policy" in without.output
