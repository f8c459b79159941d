"""The non-private baseline through the gate: a ``dp_sgd`` analysis under a ``none`` grant.

A node whose policy sets ``allow_nonprivate_models`` trains the same logistic model without
noise and releases its weights exactly, as a GLM releases coefficients: only when the GLM's
regression guards pass (rows, saturation, outcome and feature levels at least the minimum cell
count), nothing charged, audited. The attacks a hostile researcher would try (a feature one
person holds, a tiny cohort, two cohorts one person apart, a hidden layer that memorises) are
refused; without the gate the first gives that person's outcome away. The nodes and helpers
are ``test_dpsgd``'s: real CDM files and real gates.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from test_dpsgd import NODES, STUDY, node_policy, permit, world

from node.audit import AuditLog
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from privacy.dpsgd import GUARD_VARIABLES, NON_PRIVATE, protect_nonprivate_round
from studies.analyses import REGISTRY
from studies.analyses.dpsgd import held_out, released_weights
from studies.loading import study_from_data
from studies.runner import drive, local_step
from studies.statistics import from_ipc, make_statistics

__all__ = ["world"]  # the module-scoped fixture, imported for pytest

#: test_dpsgd's study, the model's noise left out (a none grant trains without any).
BASELINE: dict[str, Any] = copy.deepcopy(STUDY)
del BASELINE["analyses"][0]["noise_multiplier"]
SPEC = study_from_data(BASELINE).analysis("model")
ALLOW = {"allow_nonprivate_models": True}


def exact_permit(world: dict[str, Any], study: dict[str, Any] = BASELINE) -> dict[str, Any]:
    """A permit granting the model under mechanism none (no noise, no cost)."""
    return permit(world, study=study, mechanism="none", cost=0.0)


def through_gates(
    gates: dict[str, Gate], study: dict[str, Any], document: dict[str, Any]
) -> tuple[pl.DataFrame, dict[str, list]]:
    """The whole analysis through real gates, each round carrying the last one's signed
    releases; the result and every node's reply settings per round."""
    spec = study_from_data(study).analysis("model")
    settings: dict[str, list] = {name: [] for name in gates}
    sent: dict[str, Any] = {"transcript": None}

    def ask(state: Any, round_: int) -> dict[str, pl.DataFrame]:
        request = GateRequest(study, document, "model", state, round_, sent["transcript"])
        replies = {name: gate.handle(request) for name, gate in sorted(gates.items())}
        for name, reply in replies.items():
            assert reply.released, (name, round_, reply.reason)
            settings[name].append(reply.settings)
        sent["transcript"] = transcript_json(state, [signed_release(r) for r in replies.values()])
        return {name: from_ipc(r.statistics) for name, r in replies.items()}

    return drive(REGISTRY["dp_sgd"](), spec, ask), settings


def in_process(cdms: dict[str, Path], study: dict[str, Any]) -> pl.DataFrame:
    """The same non-private run without gates: every node's local step at ``NON_PRIVATE``."""
    spec = study_from_data(study).analysis("model")

    def ask(state: Any, _round: int) -> dict[str, pl.DataFrame]:
        return {
            name: local_step(path, study, "model", state, noise_multiplier=NON_PRIVATE)
            for name, path in cdms.items()
        }

    return drive(REGISTRY["dp_sgd"](), spec, ask)


def value(result: pl.DataFrame, variable: str, estimate: str) -> float:
    rows = result.filter(
        (pl.col("cdm_name") == "federated")
        & (pl.col("variable_name") == variable)
        & (pl.col("estimate_name") == estimate)
    )
    return float(rows["estimate_value"][0])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, world) -> dict[str, Any]:
    """One gated baseline run over the three nodes (policies that allow it), for this module."""
    root = tmp_path_factory.mktemp("baseline")
    policies = {name: node_policy(root / name, world, name, min_nodes=3, **ALLOW) for name in NODES}
    gates = {name: Gate(load_policy(policy)) for name, policy in policies.items()}
    document = exact_permit(world)
    result, settings = through_gates(gates, BASELINE, document)
    return {"result": result, "settings": settings, "document": document, "gates": gates,
            "policies": policies, "root": root}  # fmt: skip


def test_gated_baseline_equals_the_in_process_non_private_run(
    tmp_path: Path, world, baseline
) -> None:
    """Three nodes that allow non-private models: every round is released exactly (mechanism
    none, nothing charged, audited), without a guard count, and the FedAvg weights equal the
    same non-private run in process, weight for weight; the model learns the age effect."""
    result, settings = baseline["result"], baseline["settings"]
    document, gates = baseline["document"], baseline["gates"]
    reference = in_process(world["cdms"], BASELINE)
    assert released_weights(result, SPEC) == released_weights(reference, SPEC)
    assert value(result, "age", "weight") > 0.2
    assert value(result, "evaluation", "auc") > 0.65
    model = result.filter(pl.col("variable_name") == "model")
    assert "FedAvg" in model.filter(pl.col("estimate_name") == "estimand")["estimate_value"][0]
    permit_id = document["body"]["permit_id"]
    for name, gate in gates.items():
        assert [s["mechanism"] for s in settings[name]] == ["none"] * (SPEC.rounds + 1)
        assert all(s["rho_charged"] == 0.0 and s["noise_scale"] == 0.0 for s in settings[name])
        assert gate.ledger.spent(permit_id) == 0.0
        assert gate.ledger.accountant(permit_id, "model") is None
        verdicts = [e["verdict"] for e in AuditLog(gate.policy.audit_path).entries()]
        assert verdicts == ["released"] * (SPEC.rounds + 1)
    request = GateRequest(BASELINE, document, "model", None, 0, None)
    table = from_ipc(Gate(load_policy(node_policy(tmp_path / "x", world, "node-a", **ALLOW)))
                     .handle(request).statistics)  # fmt: skip
    assert not set(table["variable_name"]) & set(GUARD_VARIABLES)  # guards read, never released
    size = table.filter(pl.col("variable_name") == "size")["value"][0]
    ids = np.arange(1, NODES["node-a"][0] + 1)
    assert size == float((~held_out(ids, SPEC)).sum())  # exact, as a GLM's number of records


def test_a_node_audits_the_released_baseline_on_its_own_data(tmp_path: Path, world, baseline):
    """``fedomop audit membership --released --policy`` on a released baseline: the target is
    the released weights, attacked as a non-private model (no accounted epsilon: none was
    spent); the logistic model of two features on 240 training persons shows no membership
    leakage (measured: loss-threshold AUC 0.49, LiRA 0.56, empirical epsilon 0 at 95 %)."""
    import json

    import yaml
    from typer.testing import CliRunner

    from fedomop.cli import app
    from studies.results import bind_results, write_results

    setting = {"result_type": "dp_sgd", "analysis_id": "model"}
    setting["permit_id"] = baseline["document"]["body"]["permit_id"]
    results = write_results(tmp_path / "results", *bind_results([(baseline["result"], setting)]))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(BASELINE))
    out = tmp_path / "audit.json"
    args = ["audit", "membership", str(study), "--analysis", "model", "--reference-models", "2"]
    args += ["--db", str(world["cdms"]["node-a"]), "--released", str(results)]
    args += ["--policy", str(baseline["policies"]["node-a"]), "--out", str(out)]
    ran = CliRunner().invoke(app, args)
    assert ran.exit_code == 0, ran.output
    report = json.loads(out.read_text())
    assert report["target"].endswith("non-private baseline"), report["target"]
    assert report["target_weights"] == released_weights(baseline["result"], SPEC)
    assert report["private"] is False and report["accounted_epsilon_training"] is None
    for attack in report["attacks"]:
        assert attack["auc"] < 0.65 and attack["epsilon_lower_bound"] < 0.5, attack


def test_baseline_needs_the_policy_switch_and_an_exact_policy(tmp_path: Path, world) -> None:
    """By default (and under ``require_dp``) a node refuses the model under a none grant,
    audited, nothing released; the refusal names the switch."""
    document = exact_permit(world)
    request = GateRequest(BASELINE, document, "model", None, 0, None)
    for folder, privacy, reason in (
        ("off", {}, "allow_nonprivate_models"),
        ("dp", ALLOW | {"require_dp": True}, "require_dp"),
    ):
        gate = Gate(load_policy(node_policy(tmp_path / folder, world, "node-a", **privacy)))
        reply = gate.handle(request)
        assert not reply.released and reason in reply.reason, reply.reason
        assert reply.statistics == b""
        assert AuditLog(gate.policy.audit_path).entries()[-1]["verdict"] == "refused"


def _with_unique_elder(path: Path, bleed: bool) -> tuple[Path, int]:
    """A 300-person node (as test_dpsgd's) where one training person alone is 87 at index."""
    from _helpers import write_ra_bleed_cdm

    rng = np.random.default_rng(11)
    ids = np.arange(1, 301)
    elder = int(ids[~held_out(ids, SPEC)][0])  # a training row, not held out
    born = rng.integers(1930, 1990, 300)
    born[elder - 1] = 1925  # 87 in 2012; everyone else is 82 or younger
    bled = rng.random(300) < 0.4
    bled[elder - 1] = bleed
    people = pl.DataFrame(
        {
            "person_id": ids,
            "gender_concept_id": np.where(rng.random(300) < 0.5, 8507, 8532),
            "year_of_birth": born,
            "bleed": bled,
        }
    )
    return write_ra_bleed_cdm(path, people), elder


def test_a_feature_one_person_holds_is_refused_which_else_gives_their_outcome(
    tmp_path: Path, world
) -> None:
    """The attack: an age-group feature only one person falls in (87 at index). Without a
    gate the non-private weight of that feature moves only with that person's gradient, so its
    sign is their outcome (two nodes differing only in it give opposite signs). Through the
    gate the feature's level count (1) fails the GLM's guard: refused, nothing released."""
    hostile = copy.deepcopy(BASELINE)
    hostile["analyses"][0]["covariates"].append({"type": "age_group", "low": 87, "high": 87})
    spec = study_from_data(hostile).analysis("model")
    signs = {}
    for bleed in (True, False):
        cdm, _ = _with_unique_elder(tmp_path / f"elder_{bleed}.duckdb", bleed)
        weights = released_weights(in_process({"node-a": cdm}, hostile), spec)
        signs[bleed] = np.sign(weights[spec.terms.index("age_87_87")])
    assert signs == {True: 1.0, False: -1.0}  # the model alone says whether they bled

    gate = Gate(load_policy(node_policy(tmp_path / "g", world, "node-a", cdm=cdm, **ALLOW)))
    document = exact_permit(world, hostile)
    reply = gate.handle(GateRequest(hostile, document, "model", None, 0, None))
    assert not reply.released, "a one-person feature was released"
    assert "outcome/covariate level count(s) below 10" in reply.reason, reply.reason
    assert reply.statistics == b"" and gate.ledger.spent(document["body"]["permit_id"]) == 0.0
    assert AuditLog(gate.policy.audit_path).entries()[-1]["verdict"] == "refused"


def test_a_tiny_cohort_and_a_cohort_one_person_apart_are_refused(tmp_path: Path, world) -> None:
    """Two more attacks. A tiny cohort (16 persons, the study's least ``min_persons``): an
    outcome level below the minimum cell count, refused. Two cohorts one person apart (all
    persons, then all but the one aged 87): the second baseline's weights minus the first's
    would isolate that person, so the node's overlap record refuses it, naming the pair."""
    from _helpers import write_ra_bleed_cdm

    tiny = write_ra_bleed_cdm(
        tmp_path / "tiny.duckdb",
        pl.DataFrame(
            {
                "person_id": np.arange(1, 17),
                "gender_concept_id": [8507, 8532] * 8,
                "year_of_birth": [1950 + i for i in range(16)],
                "bleed": [True, False] * 8,
            }
        ),
    )
    small = copy.deepcopy(BASELINE)
    small["analyses"][0] |= {"min_persons": 10, "sample_rate": 0.5}
    gate = Gate(load_policy(node_policy(tmp_path / "t", world, "node-a", cdm=tiny, **ALLOW)))
    reply = gate.handle(GateRequest(small, exact_permit(world, small), "model", None, 0, None))
    assert not reply.released and "below the minimum" in reply.reason, reply.reason

    cdm, _ = _with_unique_elder(tmp_path / "elder.duckdb", True)
    gate = Gate(load_policy(node_policy(tmp_path / "o", world, "node-a", cdm=cdm, **ALLOW)))
    first = gate.handle(GateRequest(BASELINE, exact_permit(world), "model", None, 0, None))
    assert first.released, first.reason
    younger = copy.deepcopy(BASELINE)
    younger["cohorts"][0]["inclusion"] = {"age": {"max": 86}}
    reply = gate.handle(GateRequest(younger, exact_permit(world, younger), "model", None, 0, None))
    assert not reply.released and "differ" in reply.reason, reply.reason
    assert AuditLog(gate.policy.audit_path).entries()[-1]["verdict"] == "refused"


def test_a_non_private_mlp_is_refused_though_it_passes_the_guards(tmp_path: Path, world) -> None:
    """``hidden: 4`` under a none grant is refused even where the policy allows non-private
    models. The guards would not stop it: an MLP's statistics with fewer parameters than a
    third of the rows and every level large pass them (``protect_nonprivate_round``), and such
    a model memorises (``test_a_guard_passing_mlp_leaks_where_the_logistic_model_does_not``)."""
    mlp = copy.deepcopy(BASELINE)
    mlp["analyses"][0]["hidden"] = 4
    gate = Gate(load_policy(node_policy(tmp_path / "m", world, "node-a", **ALLOW)))
    reply = gate.handle(GateRequest(mlp, exact_permit(world, mlp), "model", None, 0, None))
    assert not reply.released and "non-private MLP" in reply.reason, reply.reason
    rows = [("records", "", 300.0), ("outcome", "1", 150.0), ("outcome", "0", 150.0)]
    rows += [("size", "", 300.0)]
    counts = pl.DataFrame(rows, schema=["variable_name", "variable_level", "value"], orient="row")
    weights = pl.DataFrame({"variable_name": "weight", "variable_level": [str(i) for i in range(97)],
                            "value": 0.1})  # fmt: skip
    frame = pl.concat(
        [
            counts.with_columns(estimate_name=pl.lit("count"), release_class=pl.lit("count")),
            weights.with_columns(estimate_name=pl.lit("weight"), release_class=pl.lit("value")),
        ],
        how="diagonal",
    ).with_columns(cohort=pl.lit("population"))
    released, _ = protect_nonprivate_round(make_statistics(frame), 10, 100)  # no refusal
    assert released.filter(pl.col("variable_name") == "weight").height == 97


@pytest.mark.slow
def test_a_guard_passing_mlp_leaks_where_the_logistic_model_does_not() -> None:
    """Why the baseline is logistic only: 600 persons, 10 standard-normal features, labels
    independent of them (anything beyond chance is memorisation), 300 training members. A
    non-private MLP of 8 hidden units has 97 weights, within the saturation guard (a third of
    300), and the loss-threshold attack shows it leaks (measured AUC 0.69, epsilon at least
    1.02 at 95 %); the logistic model of the same rows shows nothing (0.55, bound 0)."""
    from privacy.dpsgd import TrainingConfig, parameter_count
    from privacy.membership import audit

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 10)), (rng.random(600) < 0.5).astype(float)
    member = rng.permutation(600) < 300
    assert parameter_count(10, 8) == 97 <= 0.33 * 300
    found = {}
    for hidden in (8, 0):
        config = TrainingConfig(hidden, 1.0, 1.0, 0.5, 100, 1.0)
        _, results = audit(
            x, y, member, config, rounds=2, seed=0, private=False, delta=1e-5, reference_models=4
        )
        found[hidden] = {r.attack: r for r in results}["loss_threshold"]
    assert found[8].auc > 0.6 and found[8].epsilon_lower_bound > 0.5, found[8]
    assert found[0].auc < 0.6 and found[0].epsilon_lower_bound == 0.0, found[0]


def test_the_guards_count_the_levels_of_flags_and_record_counts_not_continuous_terms() -> None:
    """Which features' levels (persons with and without) the guards count: flags and capped
    record counts (a count one person holds names them as a flag does), not age or index
    year (continuous, as the GLM's guards leave age)."""
    from studies.analyses.features import level_features

    study = copy.deepcopy(BASELINE)
    study["analyses"][0]["covariates"] = [
        {"type": "age", "center": 50, "scale": 10},
        {"type": "sex"},
        {"type": "age_group", "low": 40, "high": 64},
        {"type": "index_year", "center": 2012, "scale": 5},
        {"type": "concept_count", "concept_set": "ra", "domain": "condition", "cap": 5},
        {"type": "cohort", "cohort": "bleed", "window": {"start": -365, "end": -1}},
    ]
    spec = study_from_data(study).analysis("model")
    assert level_features(spec.covariates) == [1, 2, 4, 5]


def test_exact_bins_only_at_weights_the_node_derived(tmp_path: Path, world) -> None:
    """The attack that exact risk bins invite: a coordinator asks for an evaluation at weights
    that put everyone but one (age, sex) cell at risk 0 or 1, so the bins give that cell's
    outcomes exactly. The node evaluates only the weights it derives from the signed training
    rounds: a chosen state at round 0, or after the honest training rounds with their signed
    transcript, is refused and nothing released; the derived weights are evaluated."""
    from test_dpsgd_budget import Honest

    gate = Gate(load_policy(node_policy(tmp_path / "p", world, "node-a", **ALLOW)))
    document = exact_permit(world)
    probe = {"phase": "evaluate", "round": 0, "weights": [30.0, -100.0, 0.0], "records": 1}
    reply = gate.handle(GateRequest(BASELINE, document, "model", probe, 0, None))
    assert not reply.released and "state" in reply.reason, reply.reason
    rounds = Honest(gate, document, BASELINE)
    assert all(rounds.run().released for _ in range(SPEC.rounds))
    forged = rounds.state | {"weights": probe["weights"]}
    request = GateRequest(BASELINE, document, "model", forged, rounds.round, rounds.transcript)
    reply = gate.handle(request)
    assert not reply.released and "not the one its transcript gives" in reply.reason, reply
    assert reply.statistics == b""
    honest = rounds.run()
    assert honest.released, honest.reason
    table = from_ipc(honest.statistics)
    assert set(table["variable_name"]) == {"risk_bin_1", "risk_bin_0"}  # exact, suppressed
