"""The gate end to end on real DuckDB CDMs: every check refuses what it must, and audits it.

The node's CDM is a small OMOP CDM built here with the real schema (``omop_etl.schema``): every
person is observed 2010-2020 and enters ``population`` on 2012-01-01; every third person has a
GI bleed on 2015-06-01 (``bleed``). The study runs counts, a Kaplan-Meier curve and a logistic
regression through ``studies.runner.local_step``, exactly as a node does.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from _helpers import (
    RA_BLEED_COHORTS,
    RA_BLEED_CONCEPT_SETS,
    RA_BLEED_COUNTS,
    RA_BLEED_RISK,
    gate_message,
    gated_rounds,
    ra_bleed_study,
    signed_permit,
    write_node_setup,
    write_ra_bleed_cdm,
)

from node.audit import AuditLog
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from privacy.accounting import epsilon_to_rho
from privacy.disclosure import protect
from privacy.ledger import Ledger
from privacy.secagg import identity_public_hex
from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.permit import (
    PermitAnalysis,
    PermitBody,
    generate_keypair,
    load_private_key,
    revoke,
    write_json,
)
from studies.rounds import next_state, profile_of
from studies.runner import drive, local_step
from studies.statistics import from_ipc

REPO = Path(__file__).resolve().parents[1]
TODAY = date.today()

STUDY: dict[str, Any] = ra_bleed_study(
    "gate_test",
    [
        RA_BLEED_COUNTS,
        {
            "id": "km",
            "kind": "survival",
            "target_cohorts": ["population"],
            "outcome": "bleed",
            "time_bin_days": 3650,
        },
        RA_BLEED_RISK,
        {
            "id": "baseline",
            "kind": "characterization",
            "cohorts": ["population"],
            "window": {"start": -365, "end": -1},
            "domains": ["condition"],
        },
        {
            "id": "rate",
            "kind": "incidence",
            "denominator_cohort": "population",
            "outcome": "bleed",
            "strata": ["sex"],
        },
        {
            "id": "share",
            "kind": "prevalence",
            "type": "point",
            "denominator_cohort": "population",
            "outcome": "bleed",
            "dates": ["2016-01-01"],
        },
        {
            "id": "hazard",
            "kind": "cox",
            "cohort": "population",
            "outcome": "bleed",
            "time_bin_days": 3650,
            "covariates": [{"type": "sex"}],
        },
    ],
)
STUDY_HASH = study_hash(study_from_data(STUDY))
REPEATS = 10
#: The counts of ``n`` asked ten times under other ids (``n0``...``n9``): each analysis is
#: answered once per permit, so repeated questions are repeated analyses a permit must grant.
REPEATED: dict[str, Any] = {
    **STUDY,
    "name": "gate_test_repeated",
    "analyses": [{**STUDY["analyses"][0], "id": f"n{i}"} for i in range(REPEATS)],
}
REPEATED_HASH = study_hash(study_from_data(REPEATED))


def build_cdm(path: Path, females: int, males: int, *, extra_person: bool = False) -> Path:
    """A real OMOP CDM file with ``females + males`` persons (see the module docstring).

    ``extra_person`` adds one more woman (person 9999, born 1970; as every third person, she
    has a bleed): the neighbouring data set.
    """
    people = pl.DataFrame({"person_id": range(1, females + males + 1)}).with_columns(
        gender_concept_id=pl.when(pl.col("person_id") <= females).then(8532).otherwise(8507),
        year_of_birth=1950 + pl.col("person_id") % 40,
    )
    if extra_person:
        woman = pl.DataFrame({"person_id": [9999], "gender_concept_id": [8532]})
        people = pl.concat([people, woman.with_columns(year_of_birth=1970)], how="vertical_relaxed")
    return write_ra_bleed_cdm(path, people.with_columns(bleed=pl.col("person_id") % 3 == 0))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys of a trusted and an untrusted permit body, and two CDMs differing by one person."""
    root = tmp_path_factory.mktemp("gate")
    trusted = generate_keypair(root / "keys", "permit_body")
    rogue = generate_keypair(root / "rogue", "rogue")
    return {
        "root": root,
        "secrets": {"node-a": os.urandom(32), "node-b": os.urandom(32)},
        "key": load_private_key(trusted[0]),
        "pub": trusted[1],
        "rogue": load_private_key(rogue[0]),
        "cdm": build_cdm(root / "cdm.duckdb", 60, 50),
        "cdm_plus_one": build_cdm(root / "cdm_plus_one.duckdb", 60, 50, extra_person=True),
    }


def write_policy(
    folder: Path,
    world: dict[str, Any],
    *,
    cdm: Path | None = None,
    name: str = "node-a",
    **privacy: Any,
) -> Path:
    """A node policy for node-a in ``folder`` with its own ledger, audit log and the identity
    the permits bind (a lone node: rounds may build on its own release)."""
    settings = {
        "min_cell_count": 10,
        "max_epsilon_per_permit": 5.0,
        "max_epsilon_per_year": 1000.0,
        "min_nodes": 1,
    }
    settings |= privacy
    allowed = settings.pop("allowed", ["*"])
    policy = write_node_setup(
        folder,
        world,
        name=name,
        cdm=cdm or world["cdm"],
        privacy=settings,
        allowed=allowed,
        revocation_lists=["revocations.json"],
    )
    if not (folder / "revocations.json").exists():
        write_json(folder / "revocations.json", revoke(None, "pmt-none", world["key"]))
    return policy


def permit(world: dict[str, Any], signer: str = "key", **overrides: Any) -> dict[str, Any]:
    """A signed permit for STUDY on node-a; ``overrides`` replace body fields."""
    body = {
        "study_hash": STUDY_HASH,
        "study_name": "gate_test",
        "nodes": ["node-a", "node-b"],
        "analyses": [PermitAnalysis(id=a["id"]) for a in STUDY["analyses"]],
        "epsilon": 1.0,
        "purpose": "testing the gate",
        "node_keys": {name: identity_public_hex(s) for name, s in world["secrets"].items()},
    } | overrides
    return signed_permit(world[signer], **body)


@pytest.fixture
def node(tmp_path: Path, world: dict[str, Any]) -> Gate:
    return Gate(load_policy(write_policy(tmp_path / "node", world)))


def ask(gate: Gate, document: dict[str, Any], analysis_id: str = "n", **kw: Any):
    study = kw.pop("study", STUDY)
    return gate.handle(GateRequest(study=study, permit=document, analysis_id=analysis_id, **kw))


def ask_repeat(gate: Gate, document: dict[str, Any], i: int):
    """The ``i``-th repeat of the counts (``REPEATED``)."""
    return ask(gate, document, f"n{i}", study=REPEATED)


def repeat_permit(world: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """An exact permit for every repeat of the counts."""
    grants = [PermitAnalysis(id=f"n{i}") for i in range(REPEATS)]
    return permit(world, study_hash=REPEATED_HASH, analyses=grants, **overrides)


def last_audit(gate: Gate) -> dict[str, Any]:
    return AuditLog(gate.policy.audit_path).entries()[-1]


# --- releases -------------------------------------------------------------------------------------


def test_counts_released_exactly_with_settings_and_audit(node: Gate, world) -> None:
    document = permit(world)
    reply = ask(node, document)
    assert reply.released, reply.reason
    released = from_ipc(reply.statistics)
    expected = local_step(world["cdm"], STUDY, "n")
    assert released.equals(expected)  # no cell below 10: exact, untouched
    subjects = released.filter(
        (pl.col("variable_name") == "Number subjects") & (pl.col("strata_level") == "Female")
    )
    assert subjects.filter(pl.col("cohort") == "population")["value"].item() == 60.0
    assert subjects.filter(pl.col("cohort") == "bleed")["value"].item() == 20.0
    assert reply.settings["min_cell_count"] == 10
    assert reply.settings["suppressed_cells"] == 0
    assert reply.settings["rho_charged"] == 0.0
    assert reply.settings["permit_id"] == document["body"]["permit_id"]
    entry = last_audit(node)
    assert entry["verdict"] == "released" and entry["hash"] == reply.audit_hash
    assert entry["study_hash"] == STUDY_HASH and entry["analysis_id"] == "n"
    import hashlib

    assert entry["payload_sha256"] == hashlib.sha256(reply.statistics).hexdigest()
    assert AuditLog(node.policy.audit_path).verify() == []


@pytest.mark.parametrize("analysis_id", [a["id"] for a in STUDY["analyses"]])
def test_every_analysis_kind_leaves_only_through_the_gate(node: Gate, world, analysis_id) -> None:
    """Every installed analysis kind, round by round, through the gate: the coordinator's loop
    over gate replies equals the loop over the raw local steps (nothing here is below 10)."""
    from studies.analyses import REGISTRY

    study = study_from_data(STUDY)
    spec = study.analysis(analysis_id)
    document = permit(world)

    through_gate = gated_rounds({"node-a": node}, STUDY, document, analysis_id)

    def direct(state, round_):
        return {"node-a": local_step(world["cdm"], study, analysis_id, state)}

    analysis = REGISTRY[spec.kind]()
    gated, reference = drive(analysis, spec, through_gate), drive(analysis, spec, direct)
    assert gated.drop("estimate_value").equals(reference.drop("estimate_value"))
    assert gated.height > 0
    # equal up to float summation order (DuckDB's parallel sums are not bit-reproducible)
    as_number = pl.col("estimate_value").cast(pl.Float64, strict=False)
    numbers = gated.select(as_number)["estimate_value"].to_numpy()
    expected = reference.select(as_number)["estimate_value"].to_numpy()
    assert numbers == pytest.approx(expected, rel=1e-9, abs=1e-12, nan_ok=True)
    texts = gated.filter(as_number.is_null())["estimate_value"]
    assert texts.equals(reference.filter(as_number.is_null())["estimate_value"])
    verdicts = [e["verdict"] for e in AuditLog(node.policy.audit_path).entries()]
    assert verdicts and set(verdicts) == {"released"}


def test_rebuilt_cdm_is_read_on_the_next_request(tmp_path: Path, world) -> None:
    """The gate keeps its CDM connection open, but a replaced file is reopened."""
    cdm = build_cdm(tmp_path / "cdm.duckdb", 60, 50)
    gate = Gate(load_policy(write_policy(tmp_path / "n", world, cdm=cdm)))
    document = repeat_permit(world)

    def overall(i: int) -> float:
        reply = ask_repeat(gate, document, i)
        frame = from_ipc(reply.statistics).filter(
            (pl.col("cohort") == "population") & (pl.col("strata_name") == "overall")
        )
        return frame["value"][0]

    assert overall(0) == 110.0
    # 140 more persons: no cohort or stratum moves by fewer than 10 (overlap control)
    os.replace(build_cdm(tmp_path / "rebuilt.duckdb", 200, 50), cdm)  # as atomic_build does
    assert overall(1) == 250.0


def test_flower_client_app_answers_through_the_gate(tmp_path: Path, world) -> None:
    """The Flower entry point: a message in, the gate's reply out, audited."""
    from node.client_app import answer
    from node.messages import content_to_reply, request_to_content

    policy = write_policy(tmp_path / "flower", world)
    request = GateRequest(study=STUDY, permit=permit(world), analysis_id="n")
    message = gate_message(request_to_content(request))
    reply = content_to_reply(answer(message, policy).content)
    assert reply.released and reply.node_name == "node-a"
    assert from_ipc(reply.statistics).height == 12
    assert AuditLog(tmp_path / "flower" / "audit.jsonl").entries()[-1]["hash"] == reply.audit_hash


def test_gibleed_celecoxib_count_through_the_gate_is_the_published_one(
    tmp_path: Path, world, gibleed_db: Path
) -> None:
    """GiBleed's CohortGenerator celecoxib cohort (Circe JSON): 1800 persons, as published."""
    from conftest import COHORTS

    circe = json.loads((COHORTS / "CohortGenerator" / "celecoxib.json").read_text())
    study = {
        "name": "gibleed_gate",
        "cohorts": [{"name": "celecoxib", "circe": circe}],
        "analyses": [{"id": "n", "kind": "counts", "cohorts": ["celecoxib"], "strata": ["sex"]}],
    }
    digest = study_hash(study_from_data(study))
    gate = Gate(load_policy(write_policy(tmp_path / "gib", world, cdm=gibleed_db)))
    document = permit(world, study_hash=digest, study_name="gibleed_gate")
    reply = gate.handle(GateRequest(study=study, permit=document, analysis_id="n"))
    assert reply.released, reply.reason
    released = from_ipc(reply.statistics)
    subjects = released.filter(pl.col("variable_name") == "Number subjects")
    by_level = dict(zip(subjects["strata_level"], subjects["value"], strict=True))
    assert by_level["overall"] == 1800.0
    assert by_level["Female"] + by_level["Male"] == 1800.0


# --- refusals -------------------------------------------------------------------------------------


def _forged(world) -> dict[str, Any]:
    document = permit(world)
    document["body"]["epsilon"] = 100.0  # altered after signing
    return document


def _revoked(world, gate: Gate) -> dict[str, Any]:
    document = permit(world)
    lists = gate.policy.trust.revocation_lists[0]
    existing = json.loads(lists.read_text())
    write_json(lists, revoke(existing, document["body"]["permit_id"], world["key"], "withdrawn"))
    return document


REFUSALS = {
    "forged": (_forged, "signature does not verify"),
    "expired": (
        lambda w: permit(
            w, valid_from=TODAY - timedelta(days=30), valid_until=TODAY - timedelta(days=1)
        ),
        "expired",
    ),
    "not yet valid": (
        lambda w: permit(
            w, valid_from=TODAY + timedelta(days=2), valid_until=TODAY + timedelta(days=9)
        ),
        "not valid before",
    ),
    "wrong node": (
        lambda w: permit(
            w, nodes=["node-b"], node_keys={"node-b": identity_public_hex(w["secrets"]["node-b"])}
        ),
        "does not name node 'node-a'",
    ),
    "wrong study": (lambda w: permit(w, study_hash="0" * 64), "differs from the permit's"),
    "unknown issuer": (lambda w: permit(w, signer="rogue"), "unknown issuer key"),
    "analysis not permitted": (
        lambda w: permit(w, analyses=[PermitAnalysis(id="km")]),
        "does not permit analysis 'n'",
    ),
    "not a permit": (lambda w: {"body": {"permit_id": "x"}}, "not a signed document"),
}


@pytest.mark.parametrize("case", [*REFUSALS, "revoked", "study changed", "kind not allowed"])
def test_refusals_release_nothing_and_are_audited(tmp_path: Path, world, case: str) -> None:
    gate = Gate(
        load_policy(
            write_policy(
                tmp_path / "node",
                world,
                **({"allowed": ["survival"]} if case == "kind not allowed" else {}),
            )
        )
    )
    study = STUDY
    if case == "revoked":
        document, reason = _revoked(world, gate), "has been revoked"
    elif case == "study changed":  # the permit is genuine, the study in the message is not
        document, reason = permit(world), "differs from the permit's"
        study = json.loads(json.dumps(STUDY))
        study["cohorts"][1]["entry"]["events"] = "all"
    elif case == "kind not allowed":
        document, reason = permit(world), "does not allow analyses of kind 'counts'"
    else:
        make, reason = REFUSALS[case]
        document = make(world)
    reply = gate.handle(GateRequest(study=study, permit=document, analysis_id="n"))
    assert not reply.released
    assert reason in reply.reason
    assert reply.statistics == b"" and reply.settings == {}
    entries = AuditLog(gate.policy.audit_path).entries()
    assert [(e["verdict"], e["reason"]) for e in entries] == [("refused", reply.reason)]
    assert entries[0]["hash"] == reply.audit_hash
    assert Ledger(gate.policy.ledger_path).summary() == []


def test_unreadable_revocation_list_fails_closed(tmp_path: Path, world) -> None:
    gate = Gate(load_policy(write_policy(tmp_path / "node", world)))
    gate.policy.trust.revocation_lists[0].write_text('{"body": {}, "signature": {}}')
    reply = ask(gate, permit(world))
    assert not reply.released and "revocation list" in reply.reason


def test_permit_signed_with_lower_min_cell_count_is_refused(node: Gate, world) -> None:
    """Even correctly signed, a body below the floor of 10 does not parse."""
    import base64

    from studies.permit import canonical_json

    body = permit(world)["body"] | {"min_cell_count": 3}
    raw = world["key"].sign(canonical_json(body))
    document = {
        "body": body,
        "signature": {
            "algorithm": "Ed25519",
            "key_id": body["issuer_key_id"],
            "value": base64.b64encode(raw).decode(),
        },
    }
    reply = ask(node, document)
    assert not reply.released and "min_cell_count" in reply.reason


@pytest.mark.parametrize(("node_min", "permit_min", "effective"), [(15, 10, 15), (10, 25, 25)])
def test_effective_min_cell_count_is_the_stricter(
    tmp_path: Path, world, node_min: int, permit_min: int, effective: int
) -> None:
    """A permit may raise the node's minimum cell count but never lower it."""
    gate = Gate(load_policy(write_policy(tmp_path / "n", world, min_cell_count=node_min)))
    reply = ask(gate, permit(world, min_cell_count=permit_min))
    assert reply.released and reply.settings["min_cell_count"] == effective
    released = from_ipc(reply.statistics)
    raw = local_step(world["cdm"], STUDY, "n")
    expected, report = protect(raw, effective)
    assert released.equals(expected)
    # bleed has 20 females and 16 males (every third of 60 and of 50)
    bleed = released.filter(
        (pl.col("cohort") == "bleed") & (pl.col("variable_name") == "Number subjects")
    )
    values = dict(zip(bleed["strata_level"], bleed["value"], strict=True))
    if effective == 15:
        assert values == {"overall": 36.0, "Female": 20.0, "Male": 16.0}
        assert reply.settings["suppressed_cells"] == 0
    else:  # 20 and 16 < 25 and the overall 36 is kept
        assert values["overall"] == 36.0
        assert math.isnan(values["Female"]) and math.isnan(values["Male"])
        assert reply.settings["suppressed_cells"] == report.suppressed_cells > 0


def test_regression_guard_refuses_small_covariate_level(tmp_path: Path, world) -> None:
    """The outcome level 'bleed = 1' has 36 rows: below a minimum cell count of 40 the
    regression is refused as a whole (its score and information would describe them)."""
    gate = Gate(load_policy(write_policy(tmp_path / "n", world, min_cell_count=40)))
    reply = ask(gate, permit(world), "risk")
    assert not reply.released
    assert "below 40" in reply.reason


def test_cox_is_released_exactly_within_the_regression_guards(tmp_path: Path, world) -> None:
    """Cox is guarded like glm: with 36 events and 50 men it leaves exactly, round by round,
    with its guard counts; its per-time rows are not counted as parameters."""
    gate = Gate(load_policy(write_policy(tmp_path / "n", world)))
    document = permit(world)
    study = study_from_data(STUDY)
    state, transcript = None, None
    for round_ in range(2):
        reply = ask(gate, document, "hazard", state=state, round=round_, transcript=transcript)
        assert reply.released, reply.reason
        released = from_ipc(reply.statistics)
        assert released.equals(local_step(world["cdm"], study, "hazard", state))
        guards = released.filter(pl.col("variable_name").is_in(["records", "outcome", "sex_male"]))
        names = guards["variable_name"] + guards["variable_level"]
        assert dict(zip(names, guards["value"], strict=True)) == {
            "records": 110.0,
            "outcome1": 36.0,
            "outcome0": 74.0,
            "sex_male1": 50.0,
            "sex_male0": 60.0,
        }
        transcript = transcript_json(state, [signed_release(reply)])
        state = next_state(study.analysis("hazard"), {"node-a": released}, state)


def test_cox_refused_when_a_level_is_below_the_cell_count(tmp_path: Path, world) -> None:
    """At a minimum cell count of 55, the 36 events and the 50 men refuse the whole model."""
    gate = Gate(load_policy(write_policy(tmp_path / "n", world, min_cell_count=55)))
    reply = ask(gate, permit(world), "hazard")
    assert not reply.released
    assert "2 outcome/covariate level count(s) below 55" in reply.reason


# --- budget, ledger, crash ------------------------------------------------------------------------


def dp_permit(world, cost_share: float = 1 / 3, **overrides: Any) -> dict[str, Any]:
    """A permit releasing every repeat of ``n`` with the discrete Gaussian; each release costs a
    share of the budget."""
    rho = epsilon_to_rho(1.0, 1e-6)
    grants = [
        PermitAnalysis(
            id=f"n{i}", mechanism="gaussian", cost=rho * cost_share, max_rows_per_person=8
        )
        for i in range(REPEATS)
    ]
    return permit(world, study_hash=REPEATED_HASH, analyses=grants, **overrides)


def test_budget_exhaustion_refuses_the_next_query(node: Gate, world) -> None:
    document = dp_permit(world)
    replies = [ask_repeat(node, document, i) for i in range(4)]
    assert [r.released for r in replies] == [True, True, True, False]
    assert "budget" in replies[3].reason and "exhausted" in replies[3].reason
    rho = epsilon_to_rho(1.0, 1e-6)
    spent = Ledger(node.policy.ledger_path).spent(document["body"]["permit_id"])
    assert spent == pytest.approx(rho, rel=1e-9)
    assert replies[0].settings["rho_charged"] == pytest.approx(rho / 3, rel=1e-9)
    assert replies[0].settings["epsilon_charged"] < 1.0
    noisy = from_ipc(replies[0].statistics)["value"].to_numpy()
    exact = local_step(world["cdm"], STUDY, "n")["value"].to_numpy()
    released = noisy[~np.isnan(noisy)]  # small noisy counts are suppressed after the noise
    assert (released == np.round(released)).all() and (released != exact[~np.isnan(noisy)]).any()
    assert [e["verdict"] for e in AuditLog(node.policy.audit_path).entries()] == [
        "released",
        "released",
        "released",
        "refused",
    ]


def test_retry_of_a_charged_request_replays_without_new_charge_or_noise(node: Gate, world) -> None:
    document = dp_permit(world)
    first, again = ask_repeat(node, document, 0), ask_repeat(node, document, 0)
    assert first.released and again.released
    assert again.statistics == first.statistics  # same noise, no second look at the data
    assert again.settings["replayed"] and not first.settings["replayed"]
    spent = Ledger(node.policy.ledger_path).spent(document["body"]["permit_id"])
    assert spent == pytest.approx(first.settings["rho_charged"], rel=1e-12)


def test_release_cap_ends_an_exact_glm_after_its_honest_rounds(node: Gate, world) -> None:
    """Each round on the derived coefficients is a new answer; the permit's cap ends them, and
    a retry of a released round replays it."""
    document = permit(world, analyses=[PermitAnalysis(id="risk", max_releases=3)])
    spec = study_from_data(STUDY).analysis("risk")
    state, transcript, released = None, None, []
    for round_ in range(4):
        reply = ask(node, document, "risk", state=state, round=round_, transcript=transcript)
        released.append(reply.released)
        if not reply.released:
            break
        transcript = transcript_json(state, [signed_release(reply)])
        state = next_state(spec, {"node-a": from_ipc(reply.statistics)}, state)
    assert released == [True, True, True, False]
    assert "allows 3 release(s) of analysis 'risk'" in reply.reason
    again = ask(node, document, "risk", round=0)
    assert again.released and again.settings["replayed"]  # a retry is not a new answer


def test_policy_cap_tighter_than_permit_budget(tmp_path: Path, world) -> None:
    """A node allowing epsilon 0.5 per permit stops a permit granting 1.0 early."""
    gate = Gate(load_policy(write_policy(tmp_path / "n", world, max_epsilon_per_permit=0.5)))
    document = dp_permit(world, cost_share=1 / 8)  # the permit alone allows 8 releases
    released = [ask_repeat(gate, document, i).released for i in range(8)]
    cost = epsilon_to_rho(1.0, 1e-6) / 8
    allowed = math.floor(epsilon_to_rho(0.5, 1e-6) / cost)
    assert allowed == 2
    assert released == [True] * allowed + [False] * (8 - allowed)


CRASH_SCRIPT = """
import os, sys, time
from pathlib import Path
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
import json

policy, marker, request = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())

def pause(request_id):
    marker.write_text(request_id)
    time.sleep(600)

Gate(load_policy(Path(policy)), after_charge=pause).handle(GateRequest(**request))
"""


def test_sigkill_between_charge_and_release_loses_no_charge(tmp_path: Path, world) -> None:
    policy = write_policy(tmp_path / "n", world)
    document = dp_permit(world)
    request_file = tmp_path / "request.json"
    request_file.write_text(
        json.dumps({"study": REPEATED, "permit": document, "analysis_id": "n0"}, default=str)
    )
    marker = tmp_path / "charged"
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(policy), str(marker), str(request_file)], cwd=REPO
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the gate never reached the charge"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    gate = Gate(load_policy(policy))
    ledger = Ledger(gate.policy.ledger_path)
    permit_id = document["body"]["permit_id"]
    charged = ledger.spent(permit_id)
    assert charged == pytest.approx(epsilon_to_rho(1.0, 1e-6) / 3, rel=1e-9)
    assert AuditLog(gate.policy.audit_path).entries() == []  # killed before audit and release
    stored = ledger.lookup(marker.read_text())
    retry = ask_repeat(gate, document, 0)
    assert retry.released and retry.settings["replayed"]
    assert retry.statistics == stored.payload
    assert ledger.spent(permit_id) == charged  # no refund, no second charge
    [entry] = AuditLog(gate.policy.audit_path).entries()
    assert entry["replayed"] and entry["rho_charged"] == 0.0
    assert entry["ledger_rho"] == pytest.approx(charged, rel=1e-12)  # the charge is on record


# --- differencing attack --------------------------------------------------------------------------

ATTACKED = (
    (pl.col("cohort") == "population")
    & pl.col("strata_level").is_in(["overall", "Female"])
    & (pl.col("variable_name") == "Number subjects")
)
"""The two rows the extra woman changes by one (subjects, overall and female); record counts
have no per-person bound, so DP releases withhold them."""
BASELINE = 110 + 60


def _guess(released: list[pl.DataFrame]) -> int:
    """The attacker's test: is the mean of the attacked rows' sum above the midpoint?"""
    sums = [frame.filter(ATTACKED)["value"].sum() for frame in released]
    return int(sum(sums) / len(sums) > BASELINE + 1)


def _attack_through_gate(gates: dict[int, Gate], world, secret: int, dp: bool) -> tuple[int, int]:
    """Ask for the counts until the gate refuses; return (guess, answers released)."""
    document = dp_permit(world, cost_share=1 / 2) if dp else repeat_permit(world)
    released = []
    for i in range(10 if dp else 1):
        reply = ask_repeat(gates[secret], document, i)
        if not reply.released:
            break
        released.append(from_ipc(reply.statistics))
    return _guess(released), len(released)


@pytest.mark.slow
def test_differencing_attack_through_the_gate_stops_at_the_budget(tmp_path: Path, world) -> None:
    """Without noise one query tells the person's presence; with DP the budget ends the attack."""
    gates = {
        secret: Gate(load_policy(write_policy(tmp_path / f"n{secret}", world, cdm=cdm)))
        for secret, cdm in ((0, world["cdm"]), (1, world["cdm_plus_one"]))
    }
    assert [_attack_through_gate(gates, world, s, dp=False) for s in (0, 1)] == [(0, 1), (1, 1)]
    runs = [(s, *_attack_through_gate(gates, world, s, dp=True)) for s in (0, 1) * 15]
    assert {answers for _, _, answers in runs} == {2}  # two releases, then the budget is spent
    correct = sum(guess == secret for secret, guess, _ in runs)
    assert correct / len(runs) <= math.e / (1 + math.e) + 1e-6 + 3 * math.sqrt(0.25 / len(runs))


DECLARED_ROWS = profile_of(study_from_data(STUDY).analysis("n")).rows_per_person
"""Rows per person the counts analysis ``n`` declares (4: two cohorts, overall and sex)."""


def test_differencing_attack_success_bounded_over_many_runs(world) -> None:
    """Many attacks on the gate's own noise and suppression path, with the gate's grant.

    Each run spends the whole permit (2 releases of half the budget). For (epsilon, delta)-DP,
    guessing the person's presence with a fair-coin prior succeeds with probability at most
    e^eps / (1 + e^eps) + delta = 0.731 at epsilon 1. This attacker's optimum is
    Phi(sqrt(rho / 6)): the extra woman moves 2 subject rows by one; the 6 subject rows are
    the ones noised (record counts are withheld), each release costing rho / 2.
    """
    from scipy.stats import norm

    from privacy.dp import noise_statistics

    grant = PermitBody(**dp_permit(world, cost_share=1 / 2)["body"]).analysis("n0")
    runs = 2000
    secrets = [run % 2 for run in range(runs)]
    tables = {s: local_step(world["cdm_plus_one" if s else "cdm"], STUDY, "n") for s in (0, 1)}
    # one statistics table per run, stacked; the cohort label keeps runs apart in suppression
    stacked = pl.concat(
        [tables[s].with_columns(pl.col("cohort") + f"#{run}") for run, s in enumerate(secrets)]
    )
    sums = []
    for _ in range(2):
        noisy, report = noise_statistics(stacked, grant, declared_rows=DECLARED_ROWS)
        assert report.rho == pytest.approx(grant.cost, rel=1e-9)
        released = protect(noisy, 10)[0].with_columns(
            run=pl.col("cohort").str.extract(r"#(\d+)$").cast(pl.Int64),
            cohort=pl.col("cohort").str.replace(r"#\d+$", ""),
        )
        per_run = released.filter(ATTACKED).group_by("run").agg(pl.col("value").sum())
        sums.append(per_run.sort("run")["value"].to_numpy())
    guesses = ((sums[0] + sums[1]) / 2 > BASELINE + 1).astype(int).tolist()
    accuracy = sum(g == s for g, s in zip(guesses, secrets, strict=True)) / runs
    margin = 4 * math.sqrt(0.25 / runs)  # 4 standard errors: a false alarm 1 in 15,000
    assert accuracy <= math.e / (1 + math.e) + 1e-6 + margin
    rho = epsilon_to_rho(1.0, 1e-6)
    assert accuracy == pytest.approx(norm.cdf(math.sqrt(rho / 6)), abs=margin)
    assert released.filter(pl.col("variable_name") == "Number records")["value"].is_nan().all()


# --- keys from the data ---------------------------------------------------------------------------

KEYED: dict[str, Any] = {
    **STUDY,
    "name": "keyed",
    "analyses": [
        {
            "id": "later",
            "kind": "characterization",
            "cohorts": ["population"],
            "window": {"start": 0, "end": 3650},
            "domains": ["condition"],
        },
        {"id": "years", "kind": "counts", "cohorts": ["bleed"], "strata": ["calendar_year"]},
    ],
}


def test_a_withheld_row_keyed_by_the_data_leaves_no_key(tmp_path: Path, world) -> None:
    """Five persons, one with a GI bleed after entry: the concept row (1 person) is withheld
    without its concept id, as is the bleed cohort's calendar year; one marker each says rows
    were withheld. Under DP no row keyed by the data leaves at all (presence is not noised)."""
    cdm = build_cdm(tmp_path / "five.duckdb", 3, 2)
    gate = Gate(load_policy(write_policy(tmp_path / "n", world, cdm=cdm)))
    digest = study_hash(study_from_data(KEYED))
    exact = permit(
        world, study_hash=digest, analyses=[PermitAnalysis(id="later"), PermitAnalysis(id="years")]
    )
    raw = local_step(cdm, KEYED, "later")
    assert raw.filter(pl.col("variable_level") == "192671 GI bleed")["value"].to_list() == [1.0]
    reply = ask(gate, exact, "later", study=KEYED)
    released = from_ipc(reply.statistics)
    assert reply.released and not released["variable_level"].str.contains("192671").any()
    assert released.filter(pl.col("variable_name") == "Conditions").is_empty()
    assert released.filter(pl.col("variable_level") == "<withheld keys>").height == 1
    assert reply.settings["withheld_keyed_groups"] >= 1
    years = from_ipc(ask(gate, exact, "years", study=KEYED).statistics)
    assert "2015" not in years["strata_level"].to_list()
    assert years.filter(pl.col("strata_name") == "calendar_year")["variable_level"].to_list() == [
        "<withheld keys>"
    ]

    rho = epsilon_to_rho(1.0, 1e-6)
    noisy = [  # calendar years bound no rows per person: no figure, every row (the safe bound)
        PermitAnalysis(id=a, mechanism="gaussian", cost=rho / 2) for a in ("later", "years")
    ]
    dp = permit(world, study_hash=digest, analyses=noisy)
    dp_gate = Gate(load_policy(write_policy(tmp_path / "dp", world, cdm=cdm)))
    reply = ask(dp_gate, dp, "years", study=KEYED)
    assert reply.released, reply.reason
    released = from_ipc(reply.statistics)
    assert set(released["strata_level"]) == {"overall"}  # no year, not even a noisy one
    assert "withheld_keyed_groups" not in reply.settings


FINE: dict[str, Any] = {
    **STUDY,
    "name": "fine_cuts",
    "analyses": [
        {
            "id": "one_year_band",
            "kind": "counts",
            "cohorts": ["population"],
            "strata": [["age_group", "sex"]],
            "age_groups": [[0, 84], [85, 85], [86, 150]],
        },
        {
            "id": "daily_km",
            "kind": "survival",
            "target_cohorts": ["population"],
            "outcome": "bleed",
            "time_bin_days": 1,
        },
        {
            "id": "daily_periods",
            "kind": "prevalence",
            "type": "period",
            "denominator_cohort": "population",
            "outcome": "bleed",
            "periods": [{"start": "2015-06-01", "end": "2015-06-01"}],
        },
    ],
}


@pytest.mark.parametrize(
    ("analysis_id", "reason"),
    [
        (
            "one_year_band",
            "cuts an age band of 1 year(s); this node's policy allows no less than 5",
        ),
        ("daily_km", "cuts a time bin of 1 day(s); this node's policy allows no less than 30"),
        ("daily_periods", "cuts a period of 1 day(s); this node's policy allows no less than 30"),
    ],
)
def test_cuts_finer_than_the_policy_are_refused(node: Gate, world, analysis_id, reason) -> None:
    """The one 85-year-old man's own band, daily event times, a one-day period: refused before
    the CDM is read, whatever the permit grants."""
    digest = study_hash(study_from_data(FINE))
    grants = [PermitAnalysis(id=a["id"]) for a in FINE["analyses"]]
    reply = ask(node, permit(world, study_hash=digest, analyses=grants), analysis_id, study=FINE)
    assert not reply.released and reason in reply.reason
    assert last_audit(node)["verdict"] == "refused"


# --- overlap control ------------------------------------------------------------------------------


def _aged(name: str, oldest: int) -> dict[str, Any]:
    """The RA population up to ``oldest`` years at entry (born 1950-1989, entry 2012)."""
    return {**RA_BLEED_COHORTS[0], "name": name, "inclusion": {"age": {"max": oldest}}}


def _counts_study(name: str, cohorts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "concept_sets": RA_BLEED_CONCEPT_SETS,
        "cohorts": cohorts,
        "analyses": [{"id": "n", "kind": "counts", "cohorts": [c["name"] for c in cohorts]}],
    }


def _ask_counts(gate: Gate, world, study: dict[str, Any], **overrides: Any):
    digest = study_hash(study_from_data(study))
    document = permit(world, study_hash=digest, analyses=[PermitAnalysis(id="n")], **overrides)
    return ask(gate, document, "n", study=study)


def test_two_cohorts_a_few_persons_apart_are_refused(node: Gate, world) -> None:
    """Up to 61 and up to 60 years: the 61-year-olds (2 or 3 of 110) are their difference,
    each count is large, yet subtracting them singles those persons out. Refused, named."""
    study = _counts_study("nested", [_aged("to_61", 61), _aged("to_60", 60)])
    reply = _ask_counts(node, world, study)
    assert not reply.released
    assert "cohort 'to_60' of study nested and cohort 'to_61' of study nested differ by" in (
        reply.reason
    )
    far = _counts_study("apart", [_aged("to_61", 61), _aged("to_40", 40)])
    assert _ask_counts(node, world, far).released  # dozens apart: released


def test_a_cohort_a_few_persons_from_one_released_before_is_refused(node: Gate, world) -> None:
    """The same pair asked as two studies under two permits: the node remembers the first
    release and refuses the second. A DP release is not held back (its budget bounds it)."""
    first = _ask_counts(node, world, _counts_study("first", [_aged("to_61", 61)]))
    assert first.released, first.reason
    second = _ask_counts(node, world, _counts_study("second", [_aged("to_60", 60)]))
    assert not second.released
    assert "cohort 'to_60' of study second and cohort 'to_61' of study first" in second.reason
    again = _ask_counts(node, world, _counts_study("again", [_aged("to_61", 61)]))
    assert again.released, again.reason  # the same set again differences nothing


def test_a_node_may_require_dp_for_every_release(tmp_path: Path, world) -> None:
    gate = Gate(load_policy(write_policy(tmp_path / "n", world, require_dp=True)))
    reply = ask(gate, permit(world))
    assert not reply.released and "releases nothing exactly (policy require_dp)" in reply.reason
    noisy = ask_repeat(gate, dp_permit(world), 0)
    assert noisy.released, noisy.reason


def test_top_n_is_the_unions_and_round_1_releases_only_the_n(tmp_path: Path, world) -> None:
    """Round 0 releases the concepts that pass (RA 110, bleed 36); the key list derived from it
    names the top 1 (RA); round 1 answers for exactly that key, and the result shows it."""
    study = {**KEYED, "analyses": [{**KEYED["analyses"][0], "top_n": 1}]}
    digest = study_hash(study_from_data(study))
    document = permit(world, study_hash=digest, analyses=[PermitAnalysis(id="later")])
    gate = Gate(load_policy(write_policy(tmp_path / "n", world)))
    spec = study_from_data(study).analysis("later")
    first = ask(gate, document, "later", study=study)
    concepts = from_ipc(first.statistics).filter(pl.col("variable_name") == "Conditions")
    assert sorted(concepts["value"].to_list()) == [36.0, 110.0]
    state = next_state(spec, {"node-a": from_ipc(first.statistics)}, None)
    assert [key[2] for key in state["top"]] == [80809]
    transcript = transcript_json(None, [signed_release(first)])
    second = ask(gate, document, "later", study=study, state=state, round=1, transcript=transcript)
    assert second.released, second.reason
    answered = from_ipc(second.statistics).filter(pl.col("variable_name") == "Conditions")
    assert answered["variable_level"].to_list() == ["80809 Rheumatoid arthritis"]
    assert answered["value"].to_list() == [110.0]


def test_age_bands_a_few_persons_apart_across_studies_are_refused(node: Gate, world) -> None:
    """Bands up to 39 and 40+ in one study (both released: about 50 and 60 persons), up to 40
    and 41+ in the next: each band is wide, but the two lower bands differ by the 40-year-olds
    (2 or 3 persons). The second is refused; the same bands again are not. Bands withheld by
    disclosure control are not recorded: they released nothing to subtract."""

    def banded(name: str, cut: int) -> dict[str, Any]:
        study = _counts_study(name, [RA_BLEED_COHORTS[0]])
        study["analyses"][0] |= {
            "strata": ["age_group"],
            "age_groups": [[0, cut - 1], [cut, 150]],
        }
        return study

    first = _ask_counts(node, world, banded("first", 40))
    assert first.released, first.reason
    second = _ask_counts(node, world, banded("second", 41))
    assert not second.released
    assert "at age_group 0 to 40 of study second" in second.reason
    again = _ask_counts(node, world, banded("again", 40))
    assert again.released, again.reason


def test_overlapping_prevalence_periods_are_compared_by_their_persons(node: Gate, world) -> None:
    """A period prevalence release records the persons of each period; a later period that
    overlaps one and counts 1 to 9 persons more or fewer is refused, a disjoint one is not
    compared (yearly prevalence is honest)."""
    import numpy as np

    from node.overlap import EntrySet, OverlapRefusal, check_pairs

    study = {**FINE, "name": "periods", "analyses": [
        {**FINE["analyses"][2], "id": "p", "periods": [{"start": "2015-01-01", "end": "2015-12-31"}]}
    ]}  # fmt: skip
    digest = study_hash(study_from_data(study))
    reply = ask(
        node, permit(world, study_hash=digest, analyses=[PermitAnalysis(id="p")]), "p", study=study
    )
    assert reply.released, reply.reason
    kinds = {s.kind for s in node.overlap.released()}
    assert {"period denominator", "period outcome"} <= kinds
    [outcome] = [s for s in node.overlap.released() if s.kind == "period outcome"]
    assert outcome.entries.size == 36  # every third of 110 persons had the bleed that year
    one_more = EntrySet(
        "a later period", np.union1d(outcome.entries, [7]), "period outcome", (16436, 16801)
    )
    with pytest.raises(OverlapRefusal, match="differ by 1 entr"):
        check_pairs([one_more], node.overlap.released(), 10)
    disjoint = EntrySet("the next year", one_more.entries, "period outcome", (16801 + 1, 17166))
    check_pairs([disjoint], node.overlap.released(), 10)  # no overlap: not compared
