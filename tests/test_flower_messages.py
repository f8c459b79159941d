"""The wire format between coordinator and node, and the pinned app bundle."""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile

import polars as pl
import pytest
from flwr.app import ConfigRecord, RecordDict

from node.flower_runtime import APP_DIR, fab_bytes, pinned_fab_hash
from node.messages import (
    REQUEST_KEY,
    GateReply,
    GateRequest,
    content_to_reply,
    content_to_request,
    reply_to_content,
    request_to_content,
)
from node.runner import refusal_text
from studies.statistics import from_ipc, make_statistics, to_ipc


def test_request_round_trips_with_exact_floats():
    state = {"beta": [0.1, -2.5e-17, 1 / 3], "iteration": 4}
    request = GateRequest(
        {"name": "s", "analyses": []}, {"body": {}, "signature": {}}, "glm", state, 4
    )
    back = content_to_request(request_to_content(request))
    assert back == request
    assert back.state["beta"][2] == 1 / 3


def test_reply_carries_exactly_the_gate_reply_fields():
    stats = make_statistics(
        pl.DataFrame({"estimate_name": ["count"], "release_class": ["count"], "value": [12.0]})
    )
    reply = GateReply("site1", True, "", to_ipc(stats), {"min_cell_count": 10}, "ab" * 32)
    content = reply_to_content(reply)
    assert list(content) == ["gate_reply"]
    assert set(content["gate_reply"]) == {
        "node_name", "released", "reason", "statistics", "settings", "audit_hash", "claim",
        "signature",
    }  # fmt: skip
    back = content_to_reply(content)
    assert back == reply
    assert from_ipc(back.statistics)["value"].to_list() == [12.0]


@pytest.mark.parametrize(
    "record, problem",
    [
        ({}, "malformed gate request"),
        ({"study": "[]", "permit": "{}", "state": "null", "analysis_id": "a", "round": 0},
         "must be JSON objects"),
        ({"study": "{}", "permit": "{}", "state": "[1]", "analysis_id": "a", "round": 0},
         "state must be"),
        ({"study": "{", "permit": "{}", "state": "null", "analysis_id": "a", "round": 0},
         "malformed gate request"),
    ],
)  # fmt: skip
def test_malformed_requests_are_named(record, problem):
    with pytest.raises(ValueError, match=problem):
        content_to_request(RecordDict({REQUEST_KEY: ConfigRecord(record)}))
    with pytest.raises(ValueError, match="no 'gate_request' record"):
        content_to_request(RecordDict())


def test_app_bundle_is_deterministic_and_names_installed_code_only():
    fab = fab_bytes()
    assert hashlib.sha256(fab).hexdigest() == pinned_fab_hash() == pinned_fab_hash()
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert not [n for n in names if n.endswith(".py")]  # no code travels: both ends import theirs
    manifest = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert manifest["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "coordinator.server_app:app",
        "clientapp": "node.client_app:app",
    }
    text = refusal_text("f" * 64, {pinned_fab_hash()})
    assert "f" * 64 in text and pinned_fab_hash() in text


def test_equal_statistics_are_equal_bytes():
    """What a node signs follows from the values alone: the same table built two ways (long
    strings filled into polars' buffers in another order, two chunks against one) encodes to
    the same bytes; polars' own string-view layout gave a 1M-person node's characterization
    other bytes in another process."""
    names = ["condition_occurrence: gastrointestinal hemorrhage", "drug_exposure: celecoxib"]

    def table(variables: list[str]) -> pl.DataFrame:
        return make_statistics(pl.DataFrame({
            "variable_name": variables, "estimate_name": ["count", "count"],
            "release_class": ["count", "count"], "value": [12.0, 30.0],
        }))  # fmt: skip

    one = table(names)
    other = table(names[::-1]).reverse().with_columns(pl.Series("value", [12.0, 30.0]))
    two_chunks = pl.concat([one.head(1), one.tail(1)], rechunk=False)
    assert one.equals(other) and one.equals(two_chunks) and two_chunks.n_chunks() == 2
    assert to_ipc(one) == to_ipc(other) == to_ipc(two_chunks)
    assert from_ipc(to_ipc(other)).equals(one)
