"""Fuzzed requests at a real node (issue 15): what its gate and its Flower ClientApp receive.

One node (a real OMOP CDM file, policy, ledger, overlap record and audit log) answers
mutated studies, permits (altered, or altered and re-signed by the trusted permit body),
requests with fields of the wrong type, wire records with missing, extra, oversized or deeply
nested fields, and revocation lists that are broken on disk. Each is answered without an
exception: a refusal with a reason that is not an unexpected error inside the node, audited,
the chain intact, the CDM, the ledger and the overlap record unchanged; or, where the fuzzed
input still means the permitted request, its release.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from _fuzz import (
    CURRENT,
    JSON_VALUES,
    NodeState,
    assert_answered_cleanly,
    fuzzed,
    mutated,
    outcome,
)
from _helpers import (
    RA_BLEED_COUNTS,
    RA_BLEED_RISK,
    gate_message,
    ra_bleed_study,
    signed_permit,
    write_node_policy,
    write_node_secret,
    write_ra_bleed_cdm,
)
from hypothesis import assume
from hypothesis import strategies as st

from node.client_app import answer
from node.gate import Gate
from node.messages import GateRequest, content_to_reply, request_to_content
from node.policy import load_policy
from privacy.secagg import identity_public_hex
from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.permit import (
    PermitAnalysis,
    canonical_json,
    generate_keypair,
    key_id,
    load_private_key,
    revoke,
    write_json,
)

STUDY: dict[str, Any] = ra_bleed_study(
    "fuzz_node",
    [
        RA_BLEED_COUNTS,
        RA_BLEED_RISK,
    ],
)
SECRET = b"fuzz-node-secret".ljust(32, b"\0")


pytestmark = pytest.mark.usefixtures("fuzz_counts")  # tests/conftest.py


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The node, its trusted permit-body key, and a permit for STUDY answered once already
    (so a fuzzed input that still means that request replays instead of charging again)."""
    root = tmp_path_factory.mktemp("fuzz_node")
    private, public, _ = generate_keypair(root / "keys")
    key = load_private_key(private)
    people = pl.DataFrame({"person_id": range(1, 121)}).with_columns(
        gender_concept_id=pl.when(pl.col("person_id") <= 60).then(8532).otherwise(8507),
        year_of_birth=1950 + pl.col("person_id") % 40,
        bleed=pl.col("person_id") % 3 == 0,
    )
    cdm = write_ra_bleed_cdm(root / "cdm.duckdb", people)
    folder = root / "node"
    write_node_secret(folder, SECRET)
    policy_path = write_node_policy(
        folder,
        name="node-a",
        cdm=cdm,
        permit_body_key=public,
        privacy={"max_epsilon_per_permit": 5.0, "max_epsilon_per_year": 100.0, "min_nodes": 1},
        allowed=["*"],
        revocation_lists=["revocations.json"],
    )
    revocations = folder / "revocations.json"
    write_json(revocations, revoke(None, "pmt-none", key))
    permit = signed_permit(
        key,
        study_hash=study_hash(study_from_data(STUDY)),
        nodes=["node-a"],
        node_keys={"node-a": identity_public_hex(SECRET)},
        analyses=[PermitAnalysis(id="n"), PermitAnalysis(id="risk")],
        epsilon=1.0,
    )
    gate = Gate(load_policy(policy_path))
    first = gate.handle(GateRequest(STUDY, permit, "n"))
    assert first.released, first.reason
    return {
        "gate": gate,
        "key": key,
        "permit": permit,
        "policy_path": policy_path,
        "revocations": revocations,
        "revocations_text": revocations.read_bytes(),
    }


def _note(reply: Any) -> None:
    fresh = "replayed" if reply.settings.get("replayed") else "charged anew"
    outcome(CURRENT[0], f"released, {fresh}" if reply.released else "refused")


def _ask(node: dict[str, Any], request: GateRequest) -> tuple[Any, NodeState]:
    gate = node["gate"]
    before = NodeState.of(gate.policy)
    return gate.handle(request), before


# --- the gate ----------------------------------------------------------------------------------

N_STUDY = 60


@fuzzed("gate: study in a request", N_STUDY, study=mutated(STUDY))
def test_a_mutated_study_in_a_request_is_refused_cleanly(node, study) -> None:
    reply, before = _ask(node, GateRequest(study, node["permit"], "n"))
    assert_answered_cleanly(reply, before, node["gate"].policy)
    _note(reply)
    if reply.released:  # only a study that canonically is the permitted one
        assert reply.settings["replayed"]


N_PERMIT = 60


@fuzzed("gate: permit in a request", N_PERMIT, data=st.data())
def test_a_mutated_permit_is_refused_cleanly(node, data) -> None:
    permit = data.draw(mutated(node["permit"]))
    reply, before = _ask(node, GateRequest(STUDY, permit, "n"))
    assert_answered_cleanly(reply, before, node["gate"].policy)
    _note(reply)
    if reply.released:
        assert reply.settings["replayed"]


def _resigned(key: Any, body: Any) -> dict[str, Any]:
    """``body`` signed as it is by the trusted key: what a careless permit body could issue."""
    value = base64.b64encode(key.sign(canonical_json(body))).decode()
    return {
        "body": body,
        "signature": {"algorithm": "Ed25519", "key_id": key_id(key.public_key()), "value": value},
    }


N_SIGNED = 60


@fuzzed("gate: re-signed permit body", N_SIGNED, data=st.data())
def test_a_strange_permit_signed_by_the_trusted_body_is_refused_or_answered(node, data) -> None:
    body = data.draw(mutated(node["permit"]["body"]))
    try:
        permit = _resigned(node["key"], body)
    except (ValueError, TypeError):  # NaN or infinity has no canonical JSON: cannot be signed
        assume(False)
    analysis = data.draw(st.sampled_from(["n", "risk"]))
    reply, before = _ask(node, GateRequest(STUDY, permit, analysis))
    assert_answered_cleanly(reply, before, node["gate"].policy)
    _note(reply)


N_FIELDS = 80


@fuzzed(
    "gate: analysis id, state, round, transcript",
    N_FIELDS,
    analysis_id=st.one_of(st.sampled_from(["n", "risk", "", "N"]), JSON_VALUES),
    state=JSON_VALUES,
    round_=st.one_of(st.integers(-3, 5), JSON_VALUES),
    transcript=JSON_VALUES,
)
def test_request_fields_of_any_type_are_refused_cleanly(
    node, analysis_id, state, round_, transcript
) -> None:
    request = GateRequest(STUDY, node["permit"], analysis_id, state, round_, transcript)
    reply, before = _ask(node, request)
    assert_answered_cleanly(reply, before, node["gate"].policy)
    _note(reply)
    if reply.released:
        assert reply.settings["replayed"] and analysis_id == "n"


N_REVOCATIONS = 40


@st.composite
def _revocation_file(draw: st.DrawFn, original: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "bytes", "latin1", "mutate"]))
    if how == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "latin1":
        return original.replace(b'"', b"\xab", 1)
    document = draw(mutated(json.loads(original)))
    return json.dumps(document, default=str).encode()


@fuzzed("gate: revocation list on disk", N_REVOCATIONS, data=st.data())
def test_a_broken_revocation_list_fails_closed_and_cleanly(node, data) -> None:
    node["revocations"].write_bytes(data.draw(_revocation_file(node["revocations_text"])))
    try:
        reply, before = _ask(node, GateRequest(STUDY, node["permit"], "n"))
    finally:
        node["revocations"].write_bytes(node["revocations_text"])
    assert_answered_cleanly(reply, before, node["gate"].policy)
    _note(reply)
    if not reply.released:
        assert "revocation list" in reply.reason


# --- the Flower ClientApp: the wire record --------------------------------------------------------

WIRE_VALUES = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=30)
    | st.binary(max_size=30)
    | st.booleans()
    | st.lists(st.integers(-5, 5), max_size=3)
    | st.lists(st.text(max_size=5), max_size=3)
)
FIELDS = ["study", "permit", "analysis_id", "state", "round", "transcript"]


@st.composite
def _wire_record(draw: st.DrawFn, honest: dict[str, Any]) -> dict[str, Any]:
    """The honest record with fields removed, added, or replaced by any wire value, JSON text
    of a mutated value, text nested too deep or over its size limit."""
    record = dict(honest)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*FIELDS, "extra"]))
        how = draw(st.sampled_from(["drop", "value", "json", "deep", "huge"]))
        if how == "drop":
            record.pop(name, None)
        elif how == "value":
            record[name] = draw(WIRE_VALUES)
        elif how == "json":
            record[name] = json.dumps(draw(JSON_VALUES))
        elif how == "deep":
            record[name] = "[" * 5000 + "]" * 5000
        else:
            record[name] = "x" * (33 * 1024 * 1024 if name == "transcript" else 5 * 1024 * 1024)
    return record


def _message(record: dict[str, Any]) -> Any:
    from flwr.app import ConfigRecord, RecordDict

    return gate_message(RecordDict({"gate_request": ConfigRecord(record)}))


N_WIRE = 60


@fuzzed("ClientApp: wire record", N_WIRE, data=st.data())
def test_a_malformed_wire_record_gets_a_refusal_from_the_client_app(node, data) -> None:
    honest = request_to_content(GateRequest(STUDY, node["permit"], "n"))
    record = data.draw(_wire_record(dict(honest.config_records["gate_request"])))
    policy = node["gate"].policy
    before = NodeState.of(policy)
    reply = content_to_reply(answer(_message(copy.deepcopy(record)), node["policy_path"]).content)
    assert reply.node_name == "node-a"
    after = NodeState.of(policy)
    if after.audit_entries == before.audit_entries:  # refused at the door, before the gate
        assert not reply.released and reply.reason.startswith("malformed gate request")
        assert len(reply.reason) <= 500 and after == before
    else:
        assert_answered_cleanly(reply, before, policy)


def test_the_fuzzed_node_answers_the_honest_request(node) -> None:
    """The base the mutations start from is answered (replayed), so a refusal is the fuzz's."""
    reply, _ = _ask(node, GateRequest(STUDY, node["permit"], "n"))
    assert reply.released and reply.settings["replayed"]
    assert isinstance(Path(node["policy_path"]), Path)
