"""A node fixes DP-SGD's noise multiplier itself, from the permit's budget and the planned rounds.

The study states no noise multiplier; each node's gate takes the smallest whose whole planned
run (every round's DP-SGD steps and noisy counts, then the evaluation's counts) fits the grant
at the node's delta and the study's exact sample rate, keeps it in its ledger's accountant
history, and refuses the round that would exceed the permit's budget (audited). The nodes and
helpers are ``test_dpsgd``'s: three real CDM files and real gates.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_dpsgd import DELTA, EPOCHS, RATE, STEPS_PER_ROUND, STUDY, node_policy, permit, world

from node.audit import AuditLog
from node.gate import Gate
from node.messages import GateReply, GateRequest
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from privacy.dpsgd import (
    accountant_epsilon,
    fixed_noise_multiplier,
    planned_noise_multiplier,
)
from studies.loading import study_from_data
from studies.permit import PermitAnalysis
from studies.rounds import next_state
from studies.statistics import from_ipc

__all__ = ["world"]  # the module-scoped fixture, imported for pytest

#: test_dpsgd's study with the model's noise multiplier left to the nodes (and its evaluation
#: counts at a rho that leaves most of an epsilon of 2 to training).
NODE_NOISE: dict[str, Any] = copy.deepcopy(STUDY)
del NODE_NOISE["analyses"][0]["noise_multiplier"]
NODE_NOISE["analyses"][0]["evaluation_rho"] = 0.01
SPEC = study_from_data(NODE_NOISE).analysis("model")


def opacus_run(sigma: float, steps: int, rho: float, delta: float = DELTA) -> float:
    """One Opacus RDP accountant stepped once per DP-SGD step, as its optimiser steps it, with
    ``rho`` of zCDP counts added as the RDP curve rho * alpha (``privacy.accounting``)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=RATE)
    orders = np.array(accountant.DEFAULT_ALPHAS, dtype=float)
    rdp = rho * orders
    for s, q, n in accountant.history:
        rdp = rdp + compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def ask(gate: Gate, document: dict, analysis: str, state: Any, round_: int, transcript: Any):
    request = GateRequest(NODE_NOISE, document, analysis, state, round_, transcript)
    return gate.handle(request)


class Honest:
    """An honest coordinator's rounds of the model (of ``study``) through one node's real gate."""

    def __init__(
        self, gate: Gate, document: dict[str, Any], study: dict[str, Any] = NODE_NOISE
    ) -> None:
        self.gate, self.document = gate, document
        self.study, self.spec = study, study_from_data(study).analysis("model")
        self.state: dict[str, Any] | None = None
        self.round, self.transcript = 0, None

    def run(self) -> GateReply:
        request = GateRequest(
            self.study, self.document, "model", self.state, self.round, self.transcript
        )
        reply = self.gate.handle(request)
        if reply.released and self.round < self.spec.rounds:  # the evaluation round ends it
            self.transcript = transcript_json(self.state, [signed_release(reply)])
            self.state = next_state(self.spec, {"node-a": from_ipc(reply.statistics)}, self.state)
        self.round += reply.released
        return reply


def test_planned_noise_matches_opacus_search_and_is_the_smallest_that_fits() -> None:
    """Without counts the search finds Opacus's ``get_noise_multiplier`` (within its tolerance);
    with them, the smallest multiplier whose plan fits: 0.1 % less overruns; a smaller delta or
    more rounds need more noise; a budget no multiplier meets is a clear error."""
    from opacus.accountants.utils import get_noise_multiplier

    steps = 3 * STEPS_PER_ROUND
    theirs = get_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=RATE, steps=steps,
        epsilon_tolerance=0.001,
    )  # fmt: skip
    ours = planned_noise_multiplier(lambda s: [(s, RATE, steps)], 2.0, DELTA)
    assert ours == pytest.approx(theirs, rel=2e-3)
    sigma = planned_noise_multiplier(SPEC.planned_history, 2.0, DELTA)
    assert accountant_epsilon(SPEC.planned_history(sigma), DELTA) <= 2.0
    assert accountant_epsilon(SPEC.planned_history(sigma / 1.001), DELTA) > 2.0
    assert planned_noise_multiplier(SPEC.planned_history, 2.0, 1e-9) > sigma
    longer = SPEC.model_copy(update={"rounds": 6})
    assert planned_noise_multiplier(longer.planned_history, 2.0, DELTA) > sigma
    with pytest.raises(ValueError, match="cannot cover the planned rounds"):
        planned_noise_multiplier(SPEC.planned_history, 0.001, DELTA)
    # the ledger's first training entry fixes it; a stated one is used as stated
    kept = [[1.7, RATE, STEPS_PER_ROUND], [22.36, 1.0, 1]]
    assert fixed_noise_multiplier(kept, None, SPEC.planned_history, 2.0, DELTA) == 1.7
    assert fixed_noise_multiplier([], 1.2, SPEC.planned_history, 2.0, DELTA) == 1.2


def test_node_fixes_its_noise_from_the_grant_and_accounts_as_one_opacus_run(
    tmp_path: Path, world
) -> None:
    """Grant epsilon 3: the node trains every round at the smallest noise whose plan fits, its
    ledger keeps it, and after all rounds and the evaluation its epsilon equals one Opacus
    accountant stepped over the same steps (plus the counts) and spends the grant to 0.1 %."""
    gate = Gate(load_policy(node_policy(tmp_path / "a", world, "node-a")))
    document = permit(world, study=NODE_NOISE, cap=3.0)
    sigma = planned_noise_multiplier(SPEC.planned_history, 3.0, DELTA)
    rounds = Honest(gate, document)
    replies = [rounds.run() for _ in range(SPEC.rounds + 1)]
    assert all(r.released for r in replies), [r.reason for r in replies]
    assert [r.settings["noise_scale"] for r in replies] == [sigma] * 3 + [0.0]
    kept = gate.ledger.accountant(document["body"]["permit_id"], "model")
    assert [s for s in kept.state if s[1] < 1] == [[sigma, RATE, EPOCHS * 10]] * 3
    counts = SPEC.rounds * SPEC.size_rho + SPEC.evaluation_rho
    one_run = opacus_run(sigma, 3 * STEPS_PER_ROUND, counts)
    assert kept.epsilon == pytest.approx(one_run, rel=1e-9)
    assert replies[-1].settings["epsilon_total"] == pytest.approx(one_run, rel=1e-9)
    assert 3.0 * 0.999 < kept.epsilon <= 3.0


def test_budget_exhaustion_stops_training_and_the_refusal_is_audited(tmp_path: Path, world) -> None:
    """The permit's epsilon 3 is the model's whole plan; a noisy count released under the same
    permit after the first round uses part of it, so a later round would exceed the permit:
    the node refuses it before training (audited, nothing charged or released) and keeps
    refusing it, and its ledger holds only the rounds it trained."""
    counts = PermitAnalysis(id="counts", mechanism="gaussian", cost=0.05)
    document = permit(world, study=NODE_NOISE, epsilon=3.0, cap=3.0, counts=counts)
    permit_id = document["body"]["permit_id"]
    gate = Gate(load_policy(node_policy(tmp_path / "a", world, "node-a")))
    rounds = Honest(gate, document)
    assert rounds.run().released
    assert ask(gate, document, "counts", None, 0, None).released
    replies = [rounds.run() for _ in range(SPEC.rounds)]
    refused = [r for r in replies if not r.released]
    assert refused, [r.settings.get("epsilon_total") for r in replies]
    assert all("privacy budget of permit" in r.reason for r in refused), refused[0].reason
    assert all(r.statistics == b"" for r in refused)
    spent = gate.ledger.spent(permit_id)
    trained = gate.ledger.accountant(permit_id, "model")
    again = rounds.run()
    assert not again.released and "privacy budget of permit" in again.reason
    assert gate.ledger.spent(permit_id) == spent
    assert gate.ledger.accountant(permit_id, "model").state == trained.state
    entries = AuditLog(gate.policy.audit_path).entries()
    assert entries[-1]["verdict"] == "refused" and "privacy budget" in entries[-1]["reason"]
    assert sum(e["verdict"] == "refused" for e in entries) == len(refused) + 1
    assert rounds.round < SPEC.rounds + 1  # the model never reached its evaluation


def test_permit_review_shows_the_noise_a_node_fixes(tmp_path: Path) -> None:
    """`permit review` on a study without a noise multiplier prints, from the study alone, the
    one a node fixes for a grant of epsilon 8."""
    import yaml
    from typer.testing import CliRunner

    from fedomop.cli import app

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(NODE_NOISE))
    result = CliRunner().invoke(app, ["permit", "review", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    sigma = planned_noise_multiplier(SPEC.planned_history, 8.0, DELTA)
    assert f"{sigma:.4g} for a grant of epsilon 8" in result.output, result.output
    assert "each node fixes its noise multiplier" in result.output


def test_the_yearly_cap_bounds_the_noise_so_a_planned_run_completes(tmp_path: Path, world) -> None:
    """The node's yearly cap (epsilon 3.2) is below what the grant (3) leaves once another
    permit's noisy counts (rho 0.05) were released this year. Fitted to the grant alone (the
    former search), the run would reach 3.37 for the year and a later round is refused for the
    yearly cap; fitted to both, every planned round and the evaluation complete, the year's
    epsilon stays within the cap (to 0.1 %) and the model's equals one Opacus run over the same
    steps."""
    from privacy.dpsgd import compose, count_steps

    year, grant, other_rho = 3.2, 3.0, 0.05
    caps = {"max_epsilon_per_permit": grant, "max_epsilon_per_year": year}
    counts = PermitAnalysis(id="counts", mechanism="gaussian", cost=other_rho)
    spent = count_steps(other_rho)
    grant_only = planned_noise_multiplier(SPEC.planned_history, grant, DELTA)
    assert accountant_epsilon(compose(spent, SPEC.planned_history(grant_only)), DELTA) > year
    sigma = planned_noise_multiplier(lambda s: compose(spent, SPEC.planned_history(s)), year, DELTA)
    assert sigma > grant_only

    def node(folder: str, study: dict[str, Any]) -> tuple[Gate, list[GateReply]]:
        """A fresh node: another permit's counts this year, then the model's whole run."""
        gate = Gate(load_policy(node_policy(tmp_path / folder, world, "node-a", **caps)))
        other = permit(world, study=NODE_NOISE, counts=counts)
        assert ask(gate, other, "counts", None, 0, None).released
        document = permit(world, study=study, epsilon=grant, cap=grant)
        rounds = Honest(gate, document, study)
        return gate, [rounds.run() for _ in range(SPEC.rounds + 1)]

    before = copy.deepcopy(NODE_NOISE)  # the noise the grant-only search fixed
    before["analyses"][0]["noise_multiplier"] = grant_only
    _, replies = node("before", before)
    refused = [r for r in replies if not r.released]
    assert refused and "yearly privacy budget is exhausted" in refused[0].reason, replies

    gate, replies = node("after", NODE_NOISE)
    assert all(r.released for r in replies), [r.reason for r in replies]
    assert [r.settings["noise_scale"] for r in replies] == [sigma] * SPEC.rounds + [0.0]
    steps = SPEC.rounds * STEPS_PER_ROUND
    model_counts = SPEC.rounds * SPEC.size_rho + SPEC.evaluation_rho
    kept = gate.ledger.accountant(replies[-1].settings["permit_id"], "model")
    assert kept.epsilon == pytest.approx(opacus_run(sigma, steps, model_counts), rel=1e-9)
    year_epsilon = opacus_run(sigma, steps, model_counts + other_rho)
    assert year * 0.999 < year_epsilon <= year
