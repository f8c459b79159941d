"""End to end over real Flower processes on 127.0.0.1: one SuperLink, three SuperNodes.

TLS and SuperNode authentication are on; each node runs ``fedomop node start`` (SuperNode in
process isolation + the pinned runner + the gate) on its own generated CDM. The tests run in file
order; the last one kills a node.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import yaml

from coordinator import deploy, local_federation
from coordinator.commands import run_deployed
from coordinator.demo import (
    DEMO_STUDY,
    issue_permit,
    make_permit_body,
    node_identities,
    write_policy,
)
from coordinator.study_runner import StudyPlan
from node import flower_runtime
from node.runner import refusal_text
from studies.canonical import canonical_data
from studies.loading import load_study
from studies.permit import PermitBody, load_private_key, sign
from studies.results import ESTIMATE_KEYS
from studies.runner import run_local
from studies.statistics import STATISTICS_SCHEMA, from_ipc

pytestmark = pytest.mark.slow
REPLY_FIELDS = {
    "node_name", "released", "reason", "statistics", "settings", "audit_hash", "claim", "signature"
}  # fmt: skip


@dataclass
class Federation:
    """The running federation (``coordinator.local_federation.LocalFederation``) and the files it uses."""

    processes: local_federation.LocalFederation
    study_path: Path
    permit: dict
    names: list[str]
    cdms: list[Path]
    permit_key: Path
    identities: dict[str, str]

    def fresh_permit(self) -> dict:
        """Another permit for the same study and nodes: a study run again (with fewer nodes)
        needs one, since each node answers a round of a permit's analysis once."""
        study = load_study(self.study_path)
        return issue_permit(
            study, self.names, self.permit_key, self.processes.root / "permit2.json",
            node_keys=self.identities,
        )  # fmt: skip

    def plan(self, name: str, **kw) -> StudyPlan:
        study = kw.pop("study", canonical_data(load_study(self.study_path)))
        permit = kw.pop("permit", self.permit)
        return StudyPlan(study, permit, str(self.processes.root / name), report=False, **kw)

    def outbox(self, name: str) -> Path:
        return self.processes.root / name / "outbox"

    def audit(self, name: str) -> list[dict]:
        path = self.processes.root / name / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def federation(synthetic_node_dbs, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    keys = make_permit_body(root / "permit_body")
    names = ["urban", "rural", "elderly"]
    policies = {
        n: write_policy(root / n, n, cdm, keys.public)
        for n, cdm in zip(names, synthetic_node_dbs, strict=True)
    }
    identities = node_identities(list(policies.values()))
    permit = issue_permit(
        load_study(DEMO_STUDY), names, keys.private, root / "permit.json", node_keys=identities
    )
    processes = local_federation.start_local_federation(root, policies, outbox=True)
    try:
        yield Federation(
            processes, DEMO_STUDY, permit, names, list(synthetic_node_dbs), keys.private, identities
        )
    finally:
        processes.stop()  # restores FLWR_HOME too


def _pooled(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("cdm_name") == "federated").select(
        [*ESTIMATE_KEYS, "estimate_value"]
    )


def test_deployed_study_equals_reference_and_sends_only_audited_aggregates(federation, tmp_path):
    fed = federation
    record = run_deployed(
        fed.plan("run1"), fed.processes.address, fed.processes.ca_cert, False, 3, wait_s=400
    )
    assert [a["status"] for a in record["analyses"]] == ["finished"] * 5, record["analyses"]
    glm = record["analyses"][-1]
    assert glm["rounds"] >= 3
    contributors = {(n["analysis_id"], n["node"]) for n in record["nodes"]
                    if n["status"] == "contributed"}  # fmt: skip
    assert len(contributors) == 15  # every node in every analysis

    reference, _ = run_local(fed.study_path, fed.cdms, tmp_path / "ref", node_names=fed.names)
    federated = pl.read_csv(fed.processes.root / "run1" / "results.csv", infer_schema=False)
    joined = _pooled(federated).join(
        _pooled(reference.with_columns(pl.col("result_id").cast(pl.String))),
        on=ESTIMATE_KEYS,
        suffix="_ref",
    )
    counts = joined.filter(
        pl.col("estimate_name") == "count", pl.col("estimate_value") != "NA"
    ).with_columns(pl.col("estimate_value", "estimate_value_ref").cast(pl.Int64))
    # a cell a node suppressed is left out of the pooled sum: never more than the reference
    assert (counts["estimate_value"] <= counts["estimate_value_ref"]).all()
    overall = counts.filter(pl.col("result_id") == "1", pl.col("strata_name") == "overall")
    assert overall.height == 8  # 4 cohorts x records, subjects: released at every node
    assert (overall["estimate_value"] == overall["estimate_value_ref"]).all()
    coef = joined.filter(pl.col("result_id") == "5", pl.col("estimate_name") == "coefficient")
    assert coef.height == 4  # intercept, age, sex, NSAID use
    for got, want in zip(coef["estimate_value"], coef["estimate_value_ref"], strict=True):
        assert math.isclose(float(got), float(want), rel_tol=1e-8, abs_tol=1e-10)

    # every payload a node sent holds only a gate reply; released statistics are aggregates
    # whose SHA-256 the gate wrote to the node's audit log before release
    for name in fed.names:
        audit = fed.audit(name)
        released_hashes = {e["payload_sha256"] for e in audit if e["verdict"] == "released"}
        entry_hashes = {e["hash"] for e in audit}
        sent = [json.loads(p.read_text()) for p in sorted(fed.outbox(name).glob("*.json"))]
        assert len(sent) == 5 + glm["rounds"] == len(audit)  # characterization: two rounds
        for message in sent:
            assert message["error"] is None
            assert message["array_records"] == [] and message["metric_records"] == []
            assert set(message["config_records"]) == {"gate_reply"}
            reply = message["config_records"]["gate_reply"]
            assert set(reply) == REPLY_FIELDS and reply["released"] is True
            assert reply["node_name"] == name and reply["audit_hash"] in entry_hashes
            payload = base64.b64decode(reply["statistics"]["base64"])
            assert hashlib.sha256(payload).hexdigest() in released_hashes
            stats = from_ipc(payload)
            assert dict(stats.schema) == STATISTICS_SCHEMA
            small = stats.filter(pl.col("release_class") == "count", pl.col("value") > 0,
                                 pl.col("value") < 10)  # fmt: skip
            assert small.height == 0  # small cells never leave the node


def test_forged_permit_is_refused_by_every_node_and_audited(federation):
    fed = federation
    # a key no node trusts signs the same body
    forger = make_permit_body(fed.processes.root / "forger")
    forged = sign(PermitBody.model_validate(fed.permit["body"]), load_private_key(forger.private))
    before = {n: len(fed.audit(n)) for n in fed.names}
    study = canonical_data(load_study(fed.study_path))
    study["analyses"] = study["analyses"][:1]
    record = run_deployed(
        fed.plan("forged", study=study, permit=forged),
        fed.processes.address,
        fed.processes.ca_cert,
        False,
        3,
        200,
    )
    assert [a["status"] for a in record["analyses"]] == ["failed"]
    assert {(n["node"], n["status"]) for n in record["nodes"]} == {
        (n, "refused") for n in fed.names
    }
    for name in fed.names:
        new = fed.audit(name)[before[name] :]
        assert len(new) == 1 and new[0]["verdict"] == "refused"
        assert "permit refused" in new[0]["reason"]


def test_modified_node_code_is_refused(federation, tmp_path):
    """The coordinator ships an app bundle whose ClientApp dumps the person table: no node runs it."""
    fed = federation
    app = tmp_path / "evil_app"
    app.mkdir()
    marker = tmp_path / "evil_ran"
    (app / "pyproject.toml").write_text(
        (flower_runtime.APP_DIR / "pyproject.toml").read_text()
        .replace('clientapp = "node.client_app:app"', 'clientapp = "evil_client:app"')
    )  # fmt: skip
    (app / "evil_client.py").write_text(
        "from pathlib import Path\nfrom flwr.clientapp import ClientApp\napp = ClientApp()\n"
        "@app.query('gate')\ndef query(message, context):\n"
        f"    Path({str(marker)!r}).write_text('node code replaced')\n    raise SystemExit\n"
    )
    fab = flower_runtime.fab_bytes(app)
    assert hashlib.sha256(fab).hexdigest() != flower_runtime.pinned_fab_hash()
    before = {n: len(list(fed.outbox(n).glob("*.json"))) for n in fed.names}
    plan = fed.plan("evil")
    client = deploy.control_client(fed.processes.address, fed.processes.ca_cert)
    try:
        run_id = deploy.start_run(client, {"plan": plan.to_json(), "expected-nodes": 3}, fab=fab)
        sub_status, _ = deploy.wait_run(client, run_id, 300)
    finally:
        client.close()
    assert sub_status == "completed"
    assert not marker.exists()
    record = json.loads((fed.processes.root / "evil" / "federation.json").read_text())
    assert all(a["status"] == "failed" for a in record["analyses"])
    first = [n for n in record["nodes"] if n["analysis_id"] == "feasibility"]
    assert {n["status"] for n in first} == {"error"} and len(first) == 3
    assert all("node refuses app bundle" in n["reason"] for n in first)
    for name in fed.names:  # the refusal is what each node sent, nothing else
        sent = sorted(fed.outbox(name).glob("*.json"))[before[name] :]
        assert len(sent) == 1
        message = json.loads(sent[0].read_text())
        assert message["config_records"] == {}
        assert message["error"] == refusal_text(hashlib.sha256(fab).hexdigest(),
                                                {flower_runtime.pinned_fab_hash()})  # fmt: skip


def test_node_killed_mid_study_the_rest_finish(federation):
    fed = federation
    study = yaml.safe_load(fed.study_path.read_text())
    victim = fed.names[0]
    before = len(fed.audit(victim))
    # a fresh permit: under the first one every round was answered with all three nodes
    # 90 s a round: a busy CI machine may take 30 s for a round at the live nodes
    plan = fed.plan("killed", permit=fed.fresh_permit(), min_nodes=2, timeout_s=90)
    client = deploy.control_client(fed.processes.address, fed.processes.ca_cert)
    try:
        run_id = deploy.start_run(client, {"plan": plan.to_json(), "expected-nodes": 3})
        deadline = time.monotonic() + 120
        while len(fed.audit(victim)) < before + 2:  # two analyses answered: kill it
            assert time.monotonic() < deadline, "the victim never answered"
            time.sleep(0.2)
        fed.processes.kill(victim)
        sub_status, details = deploy.wait_run(client, run_id, 400)
    finally:
        client.close()
    assert sub_status == "completed", details
    record = json.loads((fed.processes.root / "killed" / "federation.json").read_text())
    assert [a["status"] for a in record["analyses"]] == ["finished"] * len(study["analyses"]), [
        (n["analysis_id"], n["node"], n["status"], n["reason"]) for n in record["nodes"]
    ]
    last = [n for n in record["nodes"] if n["analysis_id"] == "bleed_risk"]
    assert {n["node"]: n["status"] for n in last}[fed.names[1]] == "contributed"
    victim_rows = [n for n in record["nodes"] if n["node"] == victim]
    assert victim_rows[0]["status"] == "contributed"
    # Flower's "Node Unavailable" once its heartbeat lapsed, or no reply at all (killed mid-upload)
    assert victim_rows[1]["status"] == "timeout", victim_rows[1]
    assert {n["status"] for n in victim_rows[2:]} == {"dropped"}
    settings = pl.read_csv(fed.processes.root / "killed" / "settings.csv", infer_schema=False)
    glm = settings.filter(pl.col("analysis_id") == "bleed_risk")
    assert glm["nodes_contributing"][0] == ";".join(sorted(fed.names[1:]))  # sorted by name
    assert f"{victim} (dropped)" in glm["nodes_missing"][0]
