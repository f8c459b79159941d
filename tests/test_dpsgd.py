"""Federated DP-SGD through real node gates: Opacus accounting kept in the ledger across rounds.

Three real OMOP CDM files (``omop_etl.schema``): every person enters ``population`` (a
rheumatoid-arthritis diagnosis) on 2012-01-01, and has a GI bleed on 2015-06-01 with probability
``sigmoid(-0.3 + 0.08 (age - 50))``: the outcome depends on age, so a model learns something.
"""

from __future__ import annotations

import json
import math
import os
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from _helpers import (
    RA_BLEED_COHORTS,
    RA_BLEED_CONCEPT_SETS,
    signed_permit,
    write_node_policy,
    write_node_secret,
    write_ra_bleed_cdm,
)

from node.audit import AuditLog
from node.gate import Gate
from node.messages import GateReply, GateRequest
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from privacy.accounting import rho_to_epsilon
from privacy.ledger import (
    AccountantState,
    AccountantUpdate,
    Budget,
    Ledger,
    Release,
    StaleAccountant,
)
from privacy.secagg import identity_public_hex
from studies.analyses import REGISTRY
from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.permit import (
    PermitAnalysis,
    PermitBody,
    generate_keypair,
    load_private_key,
    new_permit_id,
    sign,
)
from studies.rounds import next_state
from studies.runner import drive
from studies.statistics import from_ipc

TODAY = date.today()
NODES = {"node-a": (300, 1), "node-b": (240, 2), "node-c": (360, 3)}
DELTA = 1e-6
SIGMA, RATE, EPOCHS = 1.0, 0.1, 2
STEPS_PER_ROUND = EPOCHS * 10
MODEL = {
    "id": "model",
    "kind": "dp_sgd",
    "cohort": "population",
    "outcome": "bleed",
    "outcome_window": {"start": 1, "end": 3650},
    "covariates": [{"type": "age", "center": 50, "scale": 10}, {"type": "sex"}],
    "rounds": 3,
    "epochs": EPOCHS,
    "sample_rate": RATE,
    "noise_multiplier": SIGMA,
    "max_grad_norm": 1.0,
    "learning_rate": 1.0,
    "seed": 7,
    "evaluation_edges": [0.35, 0.5, 0.65],
    "evaluation_rho": 0.2,
}
STUDY: dict[str, Any] = {
    "name": "dpsgd_test",
    "concept_sets": RA_BLEED_CONCEPT_SETS,
    "cohorts": RA_BLEED_COHORTS,
    "analyses": [
        MODEL,
        {"id": "counts", "kind": "counts", "cohorts": ["population"]},
    ],
}


def build_cdm(path: Path, persons: int, seed: int) -> Path:
    """A real CDM file whose outcome risk rises with age (see the module docstring)."""
    rng = np.random.default_rng(seed)
    year_of_birth = rng.integers(1930, 1990, persons)
    age = 2012 - year_of_birth
    bleed = rng.random(persons) < 1 / (1 + np.exp(-(-0.3 + 0.08 * (age - 50))))
    people = pl.DataFrame(
        {
            "person_id": np.arange(1, persons + 1),
            "gender_concept_id": np.where(rng.random(persons) < 0.5, 8507, 8532),
            "year_of_birth": year_of_birth,
            "bleed": bleed,
        }
    )
    return write_ra_bleed_cdm(path, people)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The permit body's key, one CDM file per node and each node's secret (its identity)."""
    root = tmp_path_factory.mktemp("dpsgd")
    private, public, _ = generate_keypair(root / "keys", "permit_body")
    cdms = {name: build_cdm(root / f"{name}.duckdb", n, s) for name, (n, s) in NODES.items()}
    secrets = {name: os.urandom(32) for name in NODES}
    return {"key": load_private_key(private), "pub": public, "cdms": cdms, "secrets": secrets}


def node_policy(
    folder: Path,
    world: dict[str, Any],
    name: str,
    *,
    min_nodes: int = 1,
    cdm: Path | None = None,
    **privacy: Any,
) -> Path:
    """A policy for ``name`` with its own ledger, audit log and identity secret in ``folder``;
    one node's releases suffice to go on (``min_nodes``) unless told otherwise."""
    write_node_secret(folder, world["secrets"][name])
    return write_node_policy(
        folder,
        name=name,
        cdm=cdm or world["cdms"][name],
        permit_body_key=world["pub"],
        privacy={"max_epsilon_per_permit": 50.0, "max_epsilon_per_year": 1000.0}
        | {"min_nodes": min_nodes}
        | privacy,
        allowed=["dp_sgd", "counts"],
    )


def permit(
    world: dict[str, Any],
    *,
    epsilon: float = 20.0,
    cap: float = 20.0,
    study: dict[str, Any] = STUDY,
    delta: float = DELTA,
    counts: PermitAnalysis | None = None,
    **grant: Any,
) -> dict[str, Any]:
    """A signed permit for ``study`` on every node (identities bound), the model under
    mechanism dp_sgd."""
    return signed_permit(
        world["key"],
        study_hash=study_hash(study_from_data(study)),
        nodes=list(NODES),
        node_keys={name: identity_public_hex(s) for name, s in world["secrets"].items()},
        analyses=[
            PermitAnalysis(id="model", **({"mechanism": "dp_sgd", "cost": cap} | grant)),
            counts or PermitAnalysis(id="counts"),
        ],
        epsilon=epsilon,
        delta=delta,
    )


class Rounds:
    """An honest coordinator's rounds of the model through real gates: round t+1's request
    carries round t's state and signed releases; ``ask`` may send another state instead."""

    def __init__(self, gates: dict[str, Gate], document: dict[str, Any]) -> None:
        self.gates, self.document = gates, document
        self.spec = study_from_data(STUDY).analysis("model")
        self.state: dict[str, Any] | None = None
        self.round, self.transcript = 0, None

    def ask(self, state: Any = "honest") -> dict[str, GateReply]:
        """Every gate's reply to this round's request (the honest state unless one is given)."""
        sent = self.state if state == "honest" else state
        request = GateRequest(STUDY, self.document, "model", sent, self.round, self.transcript)
        return {name: gate.handle(request) for name, gate in sorted(self.gates.items())}

    def run(self) -> dict[str, GateReply]:
        """One honest round; moves on to the next when every node released."""
        replies = self.ask()
        if all(r.released for r in replies.values()):
            tables = {name: from_ipc(r.statistics) for name, r in replies.items()}
            self.transcript = transcript_json(
                self.state, [signed_release(r) for r in replies.values()]
            )
            self.state = next_state(self.spec, tables, self.state)
            self.round += 1
        return replies


def opacus_epsilon(steps: int, rho: float = 0.0, delta: float = DELTA, rate: float = RATE) -> float:
    """Opacus's RDP accountant after ``steps`` DP-SGD steps, stepped the way the optimiser does,
    with ``rho`` of zCDP releases added as the RDP curve rho * alpha (the stated conversion)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=SIGMA, sample_rate=rate)
    if rho == 0.0:
        return accountant.get_epsilon(delta=delta)
    orders = np.array(accountant.DEFAULT_ALPHAS, dtype=float)
    rdp = rho * orders
    for sigma, q, n in accountant.history:
        rdp = rdp + compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def round_rho(rounds: int) -> float:
    """The zCDP rho of the noisy counts that ``rounds`` training rounds release (sizes)."""
    return rounds * study_from_data(STUDY).analysis("model").size_rho


def ask(gate: Gate, document: dict, state: Any = None, round_: int = 0, analysis: str = "model"):
    request = GateRequest(STUDY, document, analysis, state=state, round=round_)
    return gate.handle(request)


def test_federated_dp_sgd_through_gates_charges_opacus_epsilon(tmp_path: Path, world) -> None:
    """Three nodes, three rounds and an evaluation round, each round through a freshly started
    gate: the model learns the age effect, the pooled hold-out AUC comes from noisy bins, and
    each node's ledger holds Opacus's epsilon over its DP-SGD steps and its noisy counts."""
    document = permit(world)
    policies = {name: node_policy(tmp_path / name, world, name, min_nodes=3) for name in NODES}
    replies: dict[str, list] = {name: [] for name in NODES}
    sent: dict[str, Any] = {"transcript": None}

    def through_gates(state: Any, round_: int) -> dict[str, pl.DataFrame]:
        released = {}
        request = GateRequest(STUDY, document, "model", state, round_, sent["transcript"])
        answers = []
        for name, policy in policies.items():
            reply = Gate(load_policy(policy)).handle(request)  # a restarted node each round
            assert reply.released, reply.reason
            replies[name].append(reply.settings)
            released[name] = from_ipc(reply.statistics)
            answers.append(signed_release(reply))
        sent["transcript"] = transcript_json(state, answers)
        return released

    spec = study_from_data(STUDY).analysis("model")
    result = drive(REGISTRY["dp_sgd"](), spec, through_gates)

    value = {
        (r["cdm_name"], r["variable_name"], r["estimate_name"]): r["estimate_value"]
        for r in result.iter_rows(named=True)
    }
    # a constant model scores 0.5; 4-bin AUC of noisy pooled counts: runs gave 0.74-0.89
    assert float(value[("federated", "evaluation", "auc")]) > 0.65
    assert float(value[("federated", "age", "weight")]) > 0.2
    assert ("federated", "age", "odds_ratio") not in value  # a prediction model, not effects
    assert float(value[("federated", "age", "weight_spread_between_nodes")]) > 0.0
    assert value[("federated", "model", "estimand")].startswith("prediction model")
    assert value[("federated", "model", "number_nodes")] == "3"
    held = float(value[("federated", "evaluation", "number_records")])
    assert 0.1 * 900 < held < 0.3 * 900  # 20 % of 900 held out, counted with noise

    eval_rho = spec.evaluation_rho
    totals = [opacus_epsilon(STEPS_PER_ROUND * r, round_rho(r)) for r in (1, 2, 3)]
    totals.append(opacus_epsilon(3 * STEPS_PER_ROUND, round_rho(3) + eval_rho))
    assert totals[0] < totals[1] < totals[2] < totals[3]
    for name in NODES:
        settings = replies[name]
        assert [s["mechanism"] for s in settings] == ["dp_sgd"] * 4
        assert [s["epsilon_total"] for s in settings] == pytest.approx(totals, rel=1e-9)
        assert settings[-1]["rho_charged"] > 0.0  # the evaluation round is charged too
        assert settings[-1]["count_rho"] == eval_rho and settings[-1]["noise_scale"] == 0.0
        assert sum(s["epsilon_charged"] for s in settings) == pytest.approx(totals[-1])
        assert settings[0]["opacus_secure_mode"] is False  # no torchcsprng in this install
        ledger = Ledger(load_policy(policies[name]).ledger_path)
        kept = ledger.accountant(document["body"]["permit_id"], "model")
        size_step = [1 / math.sqrt(2 * spec.size_rho), 1.0, 1]
        eval_step = [1 / math.sqrt(2 * eval_rho), 1.0, 1]
        assert kept.state == [[SIGMA, RATE, STEPS_PER_ROUND], size_step] * 3 + [eval_step]
        assert kept.epsilon == pytest.approx(totals[-1], rel=1e-9)
        spent = ledger.spent(document["body"]["permit_id"])
        assert rho_to_epsilon(spent, DELTA) == pytest.approx(totals[-1], rel=1e-6)
        verdicts = [
            e["verdict"] for e in AuditLog(load_policy(policies[name]).audit_path).entries()
        ]
        assert verdicts == ["released"] * 4


def test_budget_refuses_the_round_that_would_exceed_it(tmp_path: Path, world) -> None:
    """A permit whose epsilon covers two rounds: the third is refused before training, nothing
    is charged or released, and the analysis's own cap (grant cost) refuses the same way."""
    two_rounds = opacus_epsilon(2 * STEPS_PER_ROUND, round_rho(2))
    gate = Gate(load_policy(node_policy(tmp_path / "a", world, "node-a")))
    for limits, refusal in (
        ({"epsilon": two_rounds * 1.001}, "privacy budget of permit"),
        ({"cap": two_rounds * 1.001}, "DP-SGD budget of analysis 'model' exhausted"),
    ):
        document = permit(world, **limits)
        permit_id = document["body"]["permit_id"]
        rounds = Rounds({"node-a": gate}, document)
        first = [rounds.run()["node-a"] for _ in range(2)]
        assert all(r.released for r in first), [r.reason for r in first]
        spent = gate.ledger.spent(permit_id)
        third = rounds.run()["node-a"]
        assert not third.released and refusal in third.reason, third.reason
        assert third.statistics == b""
        assert gate.ledger.spent(permit_id) == spent
        kept = gate.ledger.accountant(permit_id, "model")
        assert [s for s in kept.state if s[1] < 1] == [[SIGMA, RATE, STEPS_PER_ROUND]] * 2
        assert kept.epsilon == pytest.approx(two_rounds, rel=1e-9)
        assert AuditLog(gate.policy.audit_path).entries()[-1]["verdict"] == "refused"


def test_weights_leave_only_under_the_dp_sgd_mechanism(tmp_path: Path, world) -> None:
    """DP-SGD weights are never released as an exact analysis, nor is a count under dp_sgd."""
    gate = Gate(load_policy(node_policy(tmp_path / "a", world, "node-a")))
    exact = permit(world, mechanism="none", cost=0.0)
    reply = ask(gate, exact)
    assert not reply.released and "need mechanism 'dp_sgd'" in reply.reason
    body = permit(world)["body"] | {"permit_id": new_permit_id()}
    body["analyses"] = [{"id": "counts", "mechanism": "dp_sgd", "cost": 1.0}]
    counts_as_training = sign(PermitBody(**body), world["key"])
    reply = ask(gate, counts_as_training, analysis="counts")
    assert not reply.released and "cannot be released under mechanism 'dp_sgd'" in reply.reason


def test_noise_is_not_reproducible_from_the_study_seed(world) -> None:
    """The seed fixes the initial weights and the split; the noise and batches are secret."""
    from privacy.dpsgd import TrainingConfig, initial_weights, train_round

    assert initial_weights(2, 4, 7) == initial_weights(2, 4, 7)
    assert initial_weights(2, 4, 7) != initial_weights(2, 4, 8)
    assert initial_weights(2, 0, 7) == [0.0, 0.0, 0.0]  # logistic: zeros
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 2)), (rng.random(200) < 0.5).astype(float)
    config = TrainingConfig(0, SIGMA, 1.0, RATE, 1, 0.5)
    start = initial_weights(2, 0, 7)
    assert train_round(x, y, start, config) != train_round(x, y, start, config)


def test_ledger_refuses_a_stale_accountant(tmp_path: Path) -> None:
    """Two rounds composed onto the same history: the second charge is refused, not lost."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(permit_rho=10.0, year_rho=10.0)

    def release(request_id: str) -> Release:
        return Release(request_id, "pmt-1", "model", 0.1, "2026-01-01", b"x", "h", {})

    first = AccountantUpdate(None, AccountantState([[1.0, 0.1, 20]], 1.5, DELTA))
    ledger.charge(release("r1"), budget, (1.0, DELTA, "2026-12-31"), first)
    with pytest.raises(StaleAccountant):
        ledger.charge(release("r2"), budget, (1.0, DELTA, "2026-12-31"), first)
    assert ledger.spent("pmt-1") == pytest.approx(0.1)
    assert ledger.accountant("pmt-1", "model") == AccountantState([[1.0, 0.1, 20]], 1.5, DELTA)
    assert json.loads(json.dumps(ledger.summary()))[0]["releases"] == 1
    assert math.isclose(ledger.accountant("pmt-1", "model").epsilon, 1.5)


def test_small_mlp_trains_in_process_and_reports_every_weight(world) -> None:
    """``hidden: 4``: one hidden layer; FedAvg over the nodes without a gate (run_local's path)."""
    from privacy.dpsgd import parameter_count
    from studies.runner import local_step

    study = STUDY | {"analyses": [MODEL | {"hidden": 4, "rounds": 1, "epochs": 1}]}
    spec = study_from_data(study).analysis("model")

    def direct(state: Any, _round: int) -> dict[str, pl.DataFrame]:
        return {
            name: local_step(path, study, "model", state) for name, path in world["cdms"].items()
        }

    result = drive(REGISTRY["dp_sgd"](), spec, direct)
    weights = result.filter(
        (pl.col("variable_name") == "parameter") & (pl.col("estimate_name") == "weight")
    )
    assert weights.height == parameter_count(2, 4) == 4 * 3 + 4 + 1
    assert weights["estimate_value"].cast(pl.Float64).is_finite().all()
    evaluation = result.filter(pl.col("variable_name") == "evaluation")
    assert sorted(evaluation["cdm_name"].unique()) == sorted([*NODES, "federated"])
    with pytest.raises(ValueError, match="unknown dp_sgd phase 'probe'"):
        spec.accountant_step({"phase": "probe"})


# --- issue 9: what a hostile coordinator or a loose permit could get for free -----------------


def test_accounting_is_at_the_node_delta_and_never_negative(tmp_path: Path, world) -> None:
    """A permit at delta 0.9 cannot loosen the node's delta 1e-6: the booked epsilon is Opacus's
    own at the node's delta (before: the permit's delta, where Opacus returns a negative epsilon
    that was booked as rho 0, 17 rounds for free). A node whose own delta is that large is
    refused (negative epsilon), nothing charged."""
    gate = Gate(load_policy(node_policy(tmp_path / "a", world, "node-a")))
    loose = permit(world, delta=0.9)
    reply = ask(gate, loose)
    assert reply.released, reply.reason
    booked = reply.settings["epsilon_total"]
    assert reply.settings["delta"] == DELTA
    assert booked == pytest.approx(opacus_epsilon(STEPS_PER_ROUND, round_rho(1)), rel=1e-9)
    assert booked > 1.0  # at the permit's delta 0.9 Opacus gives a negative epsilon
    assert opacus_epsilon(STEPS_PER_ROUND, delta=0.9) < 0
    assert reply.settings["rho_charged"] > 0.0
    spent = gate.ledger.spent(loose["body"]["permit_id"])
    assert rho_to_epsilon(spent, DELTA) == pytest.approx(booked, rel=1e-6)

    gate = Gate(load_policy(node_policy(tmp_path / "b", world, "node-a", delta=0.9)))
    reply = ask(gate, loose)
    assert not reply.released and "is not a privacy loss" in reply.reason, reply.reason
    assert gate.ledger.spent(loose["body"]["permit_id"]) == 0.0
    assert AuditLog(gate.policy.audit_path).entries()[-1]["verdict"] == "refused"


def test_evaluation_runs_only_on_derived_weights_and_is_charged(tmp_path: Path, world) -> None:
    """The attack: the coordinator never trains and asks for evaluations at weights that make
    p = 0 or 1 for everyone but one (age, sex) cell, reading that cell's hold-out size and
    outcomes from exact metrics (33 releases charged 0 under an epsilon-1 permit). Now a node
    evaluates only the weights it derived from the signed training rounds, and the evaluation
    releases OpenDP-noised risk-bin counts only, charged to the permit's one accountant."""
    gates = {
        name: Gate(load_policy(node_policy(tmp_path / name, world, name, min_nodes=2)))
        for name in ("node-a", "node-b")
    }
    document = permit(world, epsilon=8.0, cap=8.0)
    permit_id = document["body"]["permit_id"]
    rounds = Rounds(gates, document)
    spec = rounds.spec
    probe = {"phase": "evaluate", "round": 3, "weights": [30.0, -100.0, 0.0], "records": 1}
    for round_ in range(3):  # at every round: evaluation at chosen weights is refused
        replies = rounds.ask(probe | {"round": round_})
        assert not any(r.released for r in replies.values())
        assert all("state" in r.reason for r in replies.values()), replies
        assert all(r.released for r in rounds.run().values())
    spent = {name: g.ledger.spent(permit_id) for name, g in gates.items()}
    assert rounds.state["phase"] == "evaluate"
    replies = rounds.ask(rounds.state | {"weights": [30.0, -100.0, 0.0]})
    assert all("not the one its transcript gives" in r.reason for r in replies.values())
    assert {name: g.ledger.spent(permit_id) for name, g in gates.items()} == spent
    honest = rounds.ask()  # the derived final weights: released, charged, noisy bins only
    for name, reply in honest.items():
        assert reply.released, reply.reason
        assert reply.settings["rho_charged"] > 0 and reply.settings["count_rho"] == 0.2
        table = from_ipc(reply.statistics)
        assert set(table["variable_name"]) == {"risk_bin_1", "risk_bin_0"}
        assert set(table["release_class"]) == {"count"}
        assert gates[name].ledger.spent(permit_id) > spent[name]
        assert reply.settings["epsilon_total"] == pytest.approx(
            opacus_epsilon(3 * STEPS_PER_ROUND, round_rho(3) + spec.evaluation_rho), rel=1e-9
        )


def test_opendp_and_dp_sgd_releases_compose_in_one_accountant(tmp_path: Path, world) -> None:
    """A permit granting noisy counts (OpenDP, rho 0.05) and the DP-SGD model: the permit's loss
    is one RDP accountant over both (rho * alpha added to Opacus's curve), below the sum of the
    two epsilons, and the permit's budget refuses the round that would pass it."""
    gate = Gate(load_policy(node_policy(tmp_path / "a", world, "node-a")))
    counts_rho = 0.05
    one_round = opacus_epsilon(STEPS_PER_ROUND, round_rho(1) + counts_rho)
    document = permit(
        world,
        epsilon=one_round * 1.0001,
        counts=PermitAnalysis(id="counts", mechanism="gaussian", cost=counts_rho),
    )
    counts = ask(gate, document, analysis="counts")
    assert counts.released, counts.reason
    assert counts.settings["rho_charged"] == pytest.approx(counts_rho)
    rounds = Rounds({"node-a": gate}, document)
    first = rounds.run()["node-a"]
    assert first.released, first.reason
    assert first.settings["epsilon_total"] == pytest.approx(one_round, rel=1e-9)
    added = rho_to_epsilon(counts_rho, DELTA) + opacus_epsilon(STEPS_PER_ROUND, round_rho(1))
    assert one_round < 0.85 * added  # 5.15 vs 6.40: composing beats adding epsilons
    [row] = gate.ledger.summary()  # what `fedomop node budget` shows: the one accountant's loss
    assert row["delta"] == DELTA
    assert rho_to_epsilon(row["rho_spent"], DELTA) == pytest.approx(one_round, rel=1e-6)
    second = rounds.run()["node-a"]
    assert not second.released and "privacy budget of permit" in second.reason, second.reason
    zcdp, histories = gate.ledger.permit_accountant(document["body"]["permit_id"])
    assert zcdp == pytest.approx(counts_rho) and list(histories) == [
        f"{document['body']['permit_id']}|model"
    ]


def test_hold_out_is_a_per_person_function() -> None:
    """Adding one person moves no one else between training and hold-out (a seeded permutation
    of rows moved 44-280 others), and about ``holdout`` of the persons are held out."""
    from studies.analyses.dpsgd import held_out

    spec = study_from_data(STUDY).analysis("model")
    ids = np.arange(1, 5001)
    before = held_out(ids, spec)
    for newcomer in (0, 2501, 10**9):
        after = held_out(np.sort(np.append(ids, newcomer)), spec)
        assert (np.delete(after, np.searchsorted(np.sort(np.append(ids, newcomer)), newcomer))
                == before).all()  # fmt: skip
    assert before.mean() == pytest.approx(spec.holdout, abs=0.02)
    other = study_from_data(STUDY | {"analyses": [MODEL | {"seed": 8}]}).analysis("model")
    assert (held_out(ids, other) != before).mean() > 0.2  # the key is the id's and seed's
    tuned = study_from_data(STUDY | {"analyses": [MODEL | {"epochs": 9}]}).analysis("model")
    assert (held_out(ids, tuned) == before).all()  # training settings keep the split


def test_accountant_uses_the_exact_sample_rate() -> None:
    """Rate 0.256: Opacus's engine records 1/int(1/0.256) = 1/3 (26 % over-charged); the node
    accounts the loader's true Poisson rate, and the engine's steps and noise are checked."""
    from privacy.dpsgd import TrainingConfig, accountant_epsilon, initial_weights, train_round

    config = TrainingConfig(0, SIGMA, 1.0, 0.256, 2, 0.5)
    assert config.accountant_step() == (SIGMA, 0.256, 6)
    exact = accountant_epsilon([config.accountant_step()], DELTA)
    assert exact == pytest.approx(opacus_epsilon(6, rate=0.256), rel=1e-12)
    assert exact < 0.85 * opacus_epsilon(6, rate=1 / 3)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 2)), (rng.random(300) < 0.5).astype(float)
    assert len(train_round(x, y, initial_weights(2, 0, 1), config)) == 3  # engine check passed


def test_a_node_without_events_takes_no_part(tmp_path: Path, world) -> None:
    """A node whose cohort has no outcome events refuses the round (audited, nothing charged)
    instead of being averaged into FedAvg; so does one below the study's minimum size."""
    people = pl.DataFrame(
        {
            "person_id": np.arange(1, 301),
            "gender_concept_id": [8507, 8532] * 150,
            "year_of_birth": [1950 + i % 30 for i in range(300)],
            "bleed": [False] * 300,
        }
    )
    cdm = write_ra_bleed_cdm(tmp_path / "none.duckdb", people)
    gate = Gate(load_policy(node_policy(tmp_path / "n", world, "node-a", cdm=cdm)))
    document = permit(world)
    reply = ask(gate, document)
    assert not reply.released and "outcome level of 0 rows" in reply.reason, reply.reason
    assert gate.ledger.spent(document["body"]["permit_id"]) == 0.0
    assert AuditLog(gate.policy.audit_path).entries()[-1]["verdict"] == "refused"
    small = STUDY | {"analyses": [MODEL | {"min_persons": 1000}]}
    big = Gate(load_policy(node_policy(tmp_path / "b", world, "node-b")))
    request = GateRequest(small, permit(world, study=small), "model", state=None, round=0)
    reply = big.handle(request)
    assert not reply.released and "below the minimum of 1000" in reply.reason, reply.reason


def test_loss_trace_evaluates_every_rounds_derived_weights(tmp_path: Path, world) -> None:
    """``trace: true``: each training round also bins the hold-out at its incoming weights; the
    trace starts at the zero model (every risk 0.5: one bin, AUC 0.5) and ends trained; each
    traced round's counts are charged at the evaluation's rho."""
    from studies.runner import local_step

    study = STUDY | {"analyses": [MODEL | {"trace": True}]}
    spec = study_from_data(study).analysis("model")
    assert spec.counts_rho({"phase": "train"}) == spec.evaluation_rho

    def direct(state: Any, _round: int) -> dict[str, pl.DataFrame]:
        return {
            name: local_step(path, study, "model", state) for name, path in world["cdms"].items()
        }

    result = drive(REGISTRY["dp_sgd"](), spec, direct)
    trace = result.filter(pl.col("variable_name") == "trace")
    auc = {
        int(r["variable_level"]): float(r["estimate_value"])
        for r in trace.filter(pl.col("estimate_name") == "auc").iter_rows(named=True)
    }
    assert sorted(auc) == [0, 1, 2]
    assert auc[0] == 0.5 and auc[2] > 0.65, auc
    held = trace.filter(pl.col("estimate_name") == "number_records")["estimate_value"]
    assert held.cast(pl.Float64).n_unique() == 1  # the same hold-out persons every round

    gate = Gate(load_policy(node_policy(tmp_path / "a", world, "node-a")))
    request = GateRequest(study, permit(world, study=study), "model", state=None, round=0)
    reply = gate.handle(request)  # through a gate: noisy sizes and bins, one person one row
    assert reply.released, reply.reason
    assert reply.settings["count_rho"] == spec.evaluation_rho
    table = from_ipc(reply.statistics)
    counted = set(table.filter(pl.col("release_class") == "count")["variable_name"])
    assert counted == {"size", "risk_bin_1", "risk_bin_0"}


def test_permit_review_shows_the_models_whole_epsilon(tmp_path: Path) -> None:
    """`permit review` prints, from the study alone, the epsilon a node's one accountant will
    reach over all rounds and counts: what the dp_sgd grant's cost must cover."""
    import yaml
    from typer.testing import CliRunner

    from fedomop.cli import app

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    result = CliRunner().invoke(app, ["permit", "review", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    spec = study_from_data(STUDY).analysis("model")
    whole = opacus_epsilon(3 * STEPS_PER_ROUND, round_rho(3) + spec.evaluation_rho)
    assert f"epsilon {whole:.4g} at delta 1e-06 on each node" in result.output, result.output


@pytest.mark.slow
def test_dp_model_at_epsilon_8_against_non_private_and_the_exact_glm(world) -> None:
    """On the three test nodes (900 persons, risk rising with age): the exact pooled GLM, the
    same model trained by FedAvg without privacy, and DP-SGD at epsilon 8 (noise multiplier
    from the accountant, the study's other settings); AUCs on the pooled hold-out. DP noise is
    not seeded, so the DP figure is the median of three runs (measured: GLM 0.824, non-private
    0.822-0.824, DP at epsilon 8, noise multiplier 1.0: 0.824)."""
    import duckdb
    import statsmodels.api as sm
    from sklearn.metrics import roc_auc_score

    from privacy.accounting import permit_epsilon, zcdp_step
    from privacy.dpsgd import TrainingConfig, initial_weights, predicted_risk, train_round
    from studies.analyses.dpsgd import _rows, held_out
    from studies.runner import prepare_cdm

    study = study_from_data(STUDY)
    spec = study.analysis("model")
    rows = []
    for path in world["cdms"].values():
        with duckdb.connect(str(path), read_only=True) as con:
            ids, x, y = _rows(prepare_cdm(con, study), spec)
        held = held_out(ids, spec)
        rows.append((x[~held], y[~held], x[held], y[held]))
    xh, yh = np.vstack([r[2] for r in rows]), np.concatenate([r[3] for r in rows])

    def auc(weights: list[float]) -> float:
        return float(roc_auc_score(yh, predicted_risk(xh, weights, 0)))

    def fedavg(config: TrainingConfig, private: bool) -> list[float]:
        weights = initial_weights(2, 0, 0)
        for _ in range(spec.rounds):
            updates = [(len(y), np.array(train_round(x, y, weights, config, private=private)))
                       for x, y, _, _ in rows]  # fmt: skip
            weights = (sum(n * w for n, w in updates) / sum(n for n, _ in updates)).tolist()
        return weights

    x = np.vstack([r[0] for r in rows])
    fit = sm.Logit(np.concatenate([r[1] for r in rows]), sm.add_constant(x)).fit(disp=0)
    glm = float(roc_auc_score(yh, fit.predict(sm.add_constant(xh))))
    steps = spec.rounds * spec.epochs * int(1 / spec.sample_rate)
    counts = spec.rounds * spec.size_rho + spec.evaluation_rho
    low, high = 0.3, 50.0  # the smallest noise multiplier whose whole run fits epsilon 8
    for _ in range(30):
        mid = (low + high) / 2
        spent = permit_epsilon(0.0, [[(mid, spec.sample_rate, steps), zcdp_step(counts)]], DELTA)
        low, high = (mid, high) if spent > 8.0 else (low, mid)
    config = TrainingConfig(0, high, spec.max_grad_norm, spec.sample_rate, spec.epochs, 1.0)
    plain = auc(fedavg(config, private=False))
    private = sorted(auc(fedavg(config, private=True)) for _ in range(3))[1]
    assert glm > 0.75
    assert abs(plain - glm) < 0.03, (plain, glm)
    assert private > glm - 0.05, (private, glm)
