"""A hostile coordinator against the transcript: every round's state is derived by the node.

Two nodes (``node-a``, ``node-b``) answer a GLM on the gate tests' CDM. Each attack is a
request a coordinator can make (it chooses every message, state and roster); each is refused by
the honest gate with a reason, audited, and charges nothing, while the honest path still runs
the model to the pooled fit.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from _helpers import gated_rounds
from test_gate import STUDY, permit, world, write_policy  # noqa: F401 - world is a fixture

from node.audit import AuditLog
from node.gate import Gate
from node.messages import GateReply, GateRequest
from node.policy import load_policy
from node.transcript import signed_release, transcript_json
from privacy.ledger import Ledger
from studies.loading import study_from_data
from studies.permit import PermitAnalysis
from studies.rounds import next_state
from studies.runner import drive, local_step
from studies.statistics import from_ipc, to_ipc

SPEC = study_from_data(STUDY).analysis("risk")


@pytest.fixture
def gates(tmp_path: Path, world) -> dict[str, Gate]:  # noqa: F811
    """node-a and node-b, each needing releases of both nodes to go on (``min_nodes = 2``)."""
    return {
        name: Gate(load_policy(write_policy(tmp_path / name, world, name=name, min_nodes=2)))
        for name in ("node-a", "node-b")
    }


def ask(gate: Gate, document: dict[str, Any], **kw: Any) -> GateReply:
    return gate.handle(GateRequest(study=STUDY, permit=document, analysis_id="risk", **kw))


def honest_round(
    gates: dict[str, Gate], document: dict[str, Any], state: Any, round_: int, transcript: Any
) -> tuple[dict[str, GateReply], dict[str, Any], Any]:
    """One round as an honest coordinator runs it: replies, next transcript, next state."""
    replies = {
        name: ask(gate, document, state=state, round=round_, transcript=transcript)
        for name, gate in gates.items()
    }
    assert all(r.released for r in replies.values()), {n: r.reason for n, r in replies.items()}
    tables = {name: from_ipc(r.statistics) for name, r in replies.items()}
    following = transcript_json(state, [signed_release(r) for r in replies.values()])
    return replies, following, next_state(SPEC, tables, state)


def two_rounds(gates: dict[str, Gate], document: dict[str, Any]) -> tuple[Any, Any]:
    """Round 0 answered by both nodes: the transcript and state a round-1 request needs."""
    _, transcript, state = honest_round(gates, document, None, 0, None)
    return transcript, state


def refused_without_charge(gate: Gate, reply: GateReply, reason: str, document) -> None:
    """Refused with ``reason``, audited as refused, and the ledger holds no charge for it."""
    assert not reply.released and reason in reply.reason, reply.reason
    assert reply.statistics == b"" and reply.signature == ""
    assert AuditLog(gate.policy.audit_path).entries()[-1]["verdict"] == "refused"
    assert Ledger(gate.policy.ledger_path).spent(document["body"]["permit_id"]) == 0.0


def test_honest_rounds_reach_the_pooled_fit(gates: dict[str, Gate], world) -> None:  # noqa: F811
    """Both gates verify every transcript; the fit equals the loop over the raw local steps."""
    from studies.analyses import REGISTRY

    analysis = REGISTRY["glm"]()
    gated = drive(analysis, SPEC, gated_rounds(gates, STUDY, permit(world), "risk"))

    def direct(state: Any, _round: int) -> dict[str, pl.DataFrame]:
        return {name: local_step(world["cdm"], STUDY, "risk", state) for name in gates}

    reference = drive(analysis, SPEC, direct)
    number = pl.col("estimate_value").cast(pl.Float64, strict=False)
    assert gated.drop("estimate_value").equals(reference.drop("estimate_value"))
    values = gated.select(number)["estimate_value"].to_numpy()
    expected = reference.select(number)["estimate_value"].to_numpy()
    assert values == pytest.approx(expected, rel=1e-9, nan_ok=True)
    rounds = [e["round"] for e in AuditLog(gates["node-a"].policy.audit_path).entries()]
    assert rounds == list(range(len(rounds))) and len(rounds) >= 3


def test_a_chosen_state_is_refused(gates: dict[str, Gate], world) -> None:  # noqa: F811
    """Coefficients of the coordinator's choice (the information-matrix attack on persons of
    one age) with a genuine transcript: not the state the transcript gives."""
    document = permit(world)
    transcript, state = two_rounds(gates, document)
    chosen = state | {"beta": [-40.0, 40.0]}
    reply = ask(gates["node-a"], document, state=chosen, round=1, transcript=transcript)
    assert not reply.released and "not the one its transcript gives" in reply.reason
    honest = ask(gates["node-a"], document, state=state, round=1, transcript=transcript)
    assert honest.released, honest.reason


def test_round_zero_takes_no_state_and_later_rounds_need_a_transcript(
    gates: dict[str, Gate],
    world,  # noqa: F811
) -> None:
    document = permit(world)
    gate = gates["node-a"]
    reply = ask(gate, document, state={"beta": [1.0, 2.0]}, round=0)
    refused_without_charge(gate, reply, "round 0's state comes from the study alone", document)
    reply = ask(gate, document, state={"beta": [1.0, 2.0]}, round=1)
    refused_without_charge(gate, reply, "needs the transcript of round 0", document)


def _tamper(transcript: dict[str, Any], node: str, **changes: Any) -> dict[str, Any]:
    """A copy of the transcript whose release of ``node`` has ``changes`` (claim fields under
    ``claim``, or ``signature``/``statistics``)."""
    releases = []
    for release in transcript["releases"]:
        release = {**release, "claim": dict(release["claim"])}
        if release["claim"]["node"] == node:
            release["claim"] |= changes.pop("claim", {})
            release |= changes
        releases.append(release)
    return {**transcript, "releases": releases}


def test_a_forged_or_altered_release_is_refused_by_every_node(
    gates: dict[str, Gate],
    world,  # noqa: F811
) -> None:
    """One forged signature, one altered payload, one release of another round: each refused
    by both honest nodes, nothing released."""
    document = permit(world)
    transcript, state = two_rounds(gates, document)
    signature = transcript["releases"][1]["signature"]
    forged = _tamper(
        transcript, "node-b", signature=("0" if signature[0] != "0" else "1") + signature[1:]
    )
    other_round = _tamper(transcript, "node-b", claim={"round": 3})
    table = from_ipc(base64.b64decode(transcript["releases"][1]["statistics"]))
    bigger = table.with_columns(pl.col("value") * 2)
    altered = _tamper(
        transcript,
        "node-b",
        statistics=base64.b64encode(to_ipc(bigger)).decode("ascii"),
    )
    cases = {
        "not signed by its permit identity": forged,
        "not one of round 0": other_round,
        "does not match its claimed payload hash": altered,
    }
    for reason, bad in cases.items():
        for name, gate in gates.items():
            reply = ask(gate, document, state=state, round=1, transcript=bad)
            assert not reply.released and reason in reply.reason, (name, reply.reason)


def test_a_state_off_by_1e_9_is_refused_rounding_is_not(
    gates: dict[str, Gate],
    world,  # noqa: F811
) -> None:
    document = permit(world)
    transcript, state = two_rounds(gates, document)
    off = state | {"beta": [b * (1 + 1e-9) for b in state["beta"]]}
    reply = ask(gates["node-a"], document, state=off, round=1, transcript=transcript)
    assert not reply.released and "not the one its transcript gives" in reply.reason
    rounding = state | {"beta": [b * (1 + 1e-14) for b in state["beta"]]}
    reply = ask(gates["node-a"], document, state=rounding, round=1, transcript=transcript)
    assert reply.released, reply.reason


def test_rounds_beyond_the_maximum_are_refused(gates: dict[str, Gate], world) -> None:  # noqa: F811
    """The permit lowers the declared rounds to 1: round 1 is refused, whatever it carries."""
    document = permit(world, analyses=[PermitAnalysis(id="risk", max_rounds=1)])
    transcript, state = two_rounds(gates, document)
    reply = ask(gates["node-a"], document, state=state, round=1, transcript=transcript)
    assert not reply.released and "at most 1 round(s)" in reply.reason
    declared = SPEC.max_iterations
    reply = ask(gates["node-a"], permit(world), state=state, round=declared, transcript=transcript)
    assert not reply.released and f"at most {declared} round(s)" in reply.reason


def test_a_roster_below_min_nodes_or_without_this_node_is_refused(
    gates: dict[str, Gate],
    world,  # noqa: F811
) -> None:
    """The coordinator drops node-b's release: node-a (policy: 2 nodes) refuses to go on alone,
    node-b refuses a transcript without its own release."""
    document = permit(world)
    transcript, state = two_rounds(gates, document)
    alone = {**transcript, "releases": [transcript["releases"][0]]}
    tables = {"node-a": from_ipc(base64.b64decode(alone["releases"][0]["statistics"]))}
    state_alone = next_state(SPEC, tables, None)
    reply = ask(gates["node-a"], document, state=state_alone, round=1, transcript=alone)
    refused_without_charge(gates["node-a"], reply, "needs at least 2", document)
    reply = ask(gates["node-b"], document, state=state_alone, round=1, transcript=alone)
    refused_without_charge(gates["node-b"], reply, "lacks this node's release", document)


def test_a_round_is_answered_once(tmp_path: Path, world) -> None:  # noqa: F811
    """Round 1 released on both nodes' transcript; the same round again on node-a's alone (a
    fork to see a second information matrix) is refused, the honest retry replays."""
    gates = {
        name: Gate(load_policy(write_policy(tmp_path / name, world, name=name, min_nodes=1)))
        for name in ("node-a", "node-b")
    }
    document = permit(world)
    transcript, state = two_rounds(gates, document)
    first = ask(gates["node-a"], document, state=state, round=1, transcript=transcript)
    assert first.released, first.reason
    alone = {**transcript, "releases": [transcript["releases"][0]]}
    tables = {"node-a": from_ipc(base64.b64decode(alone["releases"][0]["statistics"]))}
    fork = next_state(SPEC, tables, None)
    reply = ask(gates["node-a"], document, state=fork, round=1, transcript=alone)
    assert not reply.released and "released already" in reply.reason
    again = ask(gates["node-a"], document, state=state, round=1, transcript=transcript)
    assert again.released and again.settings["replayed"]
    assert again.statistics == first.statistics and again.signature == first.signature


def test_a_permit_without_identities_is_refused_for_any_analysis(
    gates: dict[str, Gate],
    world,  # noqa: F811
) -> None:
    """A permit granting a multi-round analysis must bind every node's identity."""
    document = permit(world, node_keys={})
    reply = ask(gates["node-a"], document, round=0)
    refused_without_charge(gates["node-a"], reply, "binds no identity key", document)


def test_exact_model_values_never_outnumber_the_records(tmp_path: Path, world) -> None:  # noqa: F811
    """A GLM that never converges (tolerance 1e-300) asks round after round: with 3 terms each
    round releases 10 model values (3 score, 6 information, the deviance) from 110 records, so
    the node answers rounds 0-10 (110 values) and refuses round 11, before they outnumber them."""
    study = {
        **STUDY,
        "name": "many_rounds",
        "analyses": [
            {
                **STUDY["analyses"][2],
                "covariates": [{"type": "age", "center": 50, "scale": 10}, {"type": "sex"}],
                "tolerance": 1e-300,
            }
        ],
    }
    spec = study_from_data(study).analysis("risk")
    from studies.canonical import study_hash

    document = permit(
        world,
        study_hash=study_hash(study_from_data(study)),
        analyses=[PermitAnalysis(id="risk")],
    )
    gate = Gate(load_policy(write_policy(tmp_path / "n", world, min_nodes=1)))
    state, transcript, released = None, None, 0
    for round_ in range(12):
        request = GateRequest(study, document, "risk", state, round_, transcript)
        reply = gate.handle(request)
        if not reply.released:
            break
        released += 1
        transcript = transcript_json(state, [signed_release(reply)])
        state = next_state(spec, {"node-a": from_ipc(reply.statistics)}, state)
    assert released == 11
    assert "to 120, more than the 110 records" in reply.reason
