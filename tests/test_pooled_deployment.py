"""Pooled mode over real Flower processes: a node killed after key sharing, the sum completes.

One SuperLink and four SuperNodes (``fedomop node start``, TLS and node authentication) on
127.0.0.1; the fourth node serves a copy of the first node's CDM. The study's pooled analysis
has threshold 3 and every policy assumes 3 honest nodes, so one node may drop after it shared
its seeds: the test kills its process as soon as its audit log shows the share round released.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import polars as pl
import pytest
from _helpers import signed_permit, write_node_policy

from coordinator import deploy
from coordinator.demo import make_permit_body, node_identities
from coordinator.local_federation import start_local_federation
from coordinator.study_runner import StudyPlan
from privacy.ledger import Ledger
from studies.canonical import canonical_data, study_hash
from studies.loading import load_study, study_from_data
from studies.permit import PermitAnalysis, load_private_key
from studies.runner import local_step

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STUDY_PATH = REPO / "examples" / "rare_disease" / "study.yaml"
NAMES = ["rare-a", "rare-b", "rare-c", "rare-d"]
COST = 2.0


def tolerant_study() -> object:
    """The example study with ``threshold: 3`` on its pooled analysis."""
    data = load_study(STUDY_PATH).model_dump(mode="json", exclude_none=True)
    for analysis in data["analyses"]:
        if analysis["id"] == "cf_pooled":
            analysis["threshold"] = 3
    return study_from_data(data)


def audit(root: Path, name: str) -> list[dict]:
    path = root / name / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_node_killed_after_key_sharing_leaves_the_sum_of_the_rest(
    synthetic_node_dbs, tmp_path
) -> None:
    root = tmp_path
    keys = make_permit_body(root / "permit_body")
    copy = root / "rare-d.duckdb"
    shutil.copy(synthetic_node_dbs[0], copy)
    dbs = [*synthetic_node_dbs, copy]
    policies = {
        name: write_node_policy(
            root / name, name=name, cdm=db, permit_body_key=keys.public,
            privacy={"max_epsilon_per_permit": 100.0, "max_epsilon_per_year": 1000.0,
                     "min_honest_nodes": 3},
            allowed=["counts", "pooled_counts"],
        )
        for name, db in zip(NAMES, dbs, strict=True)
    }  # fmt: skip
    study = tolerant_study()
    grant = PermitAnalysis(id="cf_pooled", mechanism="gaussian", cost=COST, max_rows_per_person=3)
    permit = signed_permit(
        load_private_key(keys.private), study_hash=study_hash(study), study_name=study.name,
        nodes=NAMES, analyses=[PermitAnalysis(id="cf_feasibility"), grant], epsilon=60.0,
        node_keys=node_identities(list(policies.values())),
    )  # fmt: skip
    plan = StudyPlan(  # 40 s a round: a busy CI machine starts four ClientApps at once
        canonical_data(study), permit, str(root / "out"), min_nodes=2, timeout_s=40, report=False
    )
    victim = "rare-d"
    processes = start_local_federation(root, policies)
    try:
        client = deploy.control_client(processes.address, processes.ca_cert)
        try:
            run_id = deploy.start_run(client, {"plan": plan.to_json(), "expected-nodes": 4})
            deadline = time.monotonic() + 300
            while not any(
                e["analysis_id"] == "cf_pooled" and e["round"] == 1 and e["verdict"] == "released"
                for e in audit(root, victim)
            ):  # the share round released: kill it before it masks
                assert time.monotonic() < deadline, "the victim never shared its seeds"
                time.sleep(0.05)
            processes.kill(victim)
            sub_status, details = deploy.wait_run(client, run_id, 400)
        finally:
            client.close()
    finally:
        processes.stop()  # restores FLWR_HOME too
    assert sub_status == "completed", details
    record = json.loads((root / "out" / "federation.json").read_text())
    status = {a["analysis_id"]: a["status"] for a in record["analyses"]}
    assert status["cf_pooled"] == "finished", record["analyses"]
    pooled = {n["node"]: n for n in record["nodes"] if n["analysis_id"] == "cf_pooled"}
    assert pooled[victim]["status"] == "timeout"
    assert all(pooled[n]["status"] == "contributed" for n in NAMES[:3])

    results = pl.read_csv(root / "out" / "results.csv", infer_schema=False)
    settings = pl.read_csv(root / "out" / "settings.csv", infer_schema=False)
    pooled_id = settings.filter(pl.col("result_type") == "pooled_counts")["result_id"].item()
    overall = results.filter(pl.col("result_id") == pooled_id, pl.col("strata_name") == "overall")
    truth = sum(
        local_step(db, study, "cf_pooled")
        .filter(pl.col("strata_name") == "overall")["value"]
        .item()
        for db in synthetic_node_dbs
    )  # the three survivors
    assert abs(int(overall["estimate_value"].item()) - truth) <= 6  # total sd ~0.75
    permit_id = permit["body"]["permit_id"]
    spent = {n: Ledger(root / n / "ledger.sqlite").spent(permit_id) for n in NAMES}
    assert spent[victim] == 0.0  # killed before its masked round: never charged
    assert all(spent[n] > COST for n in NAMES[:3])
    for n in NAMES[:3]:  # each survivor released every round once, and was charged once
        rounds = [e["round"] for e in audit(root, n) if e["analysis_id"] == "cf_pooled"]
        assert sorted(rounds) == [0, 1, 2, 3, 4]
