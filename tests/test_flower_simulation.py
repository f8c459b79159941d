"""Studies through Flower's simulation runtime equal the in-process reference, through real gates."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from coordinator.simulation import load_nodes, run_simulated, write_nodes_toml
from coordinator.study_runner import StudyPlan
from studies.canonical import canonical_data
from studies.model import load_study
from studies.runner import run_local
from tests.flower_helpers import full_cdms, set_up_federation

KEYS = [
    "result_id",
    "group_level",
    "strata_name",
    "strata_level",
    "variable_name",
    "variable_level",
    "estimate_name",
    "additional_name",
    "additional_level",
]


def _pooled(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("cdm_name") == "federated").select([*KEYS, "estimate_value"])


@pytest.mark.slow
def test_simulated_study_equals_in_process_reference(analysis_node_dbs, tmp_path):
    cdms = full_cdms(analysis_node_dbs["nodes"], tmp_path / "cdms")
    study_path, permit, policies, names = set_up_federation(tmp_path / "fed", cdms)
    nodes_toml = write_nodes_toml(tmp_path / "fed" / "nodes.toml", policies)
    assert load_nodes(nodes_toml) == [p.resolve() for p in policies]

    plan = StudyPlan(
        study=canonical_data(load_study(study_path)),
        permit=permit,
        out_dir=str(tmp_path / "out"),
        min_nodes=2,
        timeout_s=120,
        report=False,
    )
    outcome = run_simulated(plan, load_nodes(nodes_toml))
    assert [a.status for a in outcome.analyses] == ["finished"] * 3, outcome.nodes
    assert {k: sorted(v) for k, v in outcome.contributors.items()} == {
        aid: names for aid in ("feasibility", "km", "risk")
    }
    glm = next(a for a in outcome.analyses if a.analysis_id == "risk")
    assert glm.rounds >= 3  # Newton-Raphson ran several federated rounds

    reference, _ = run_local(study_path, cdms, tmp_path / "ref", node_names=names)
    federated = pl.read_csv(tmp_path / "out" / "results.csv", infer_schema=False)
    joined = _pooled(federated).join(
        _pooled(reference.with_columns(pl.col("result_id").cast(pl.String))),
        on=KEYS,
        how="inner",
        suffix="_ref",
    )
    assert joined.height > 100
    # counts: exact wherever the gate released the cell (suppressed cells are NA)
    counts = joined.filter(pl.col("estimate_name") == "count", pl.col("estimate_value") != "NA")
    assert counts.height > 0
    assert (counts["estimate_value"] == counts["estimate_value_ref"]).all()
    # GLM coefficients: the same Newton-Raphson fit on the union
    coef = joined.filter(pl.col("result_id") == "3", pl.col("estimate_name") == "coefficient")
    assert coef.height == 3
    for got, want in zip(coef["estimate_value"], coef["estimate_value_ref"], strict=True):
        assert math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12)

    nodes = pl.read_csv(tmp_path / "out" / "nodes.csv")
    assert set(nodes["status"]) == {"contributed"}
    record = json.loads((tmp_path / "out" / "federation.json").read_text())
    assert record["analyses"][2]["rounds"] == glm.rounds
    # every node's audit log holds one released entry per analysis round it answered
    for policy in policies:
        audit = [
            json.loads(line) for line in (policy.parent / "audit.jsonl").read_text().splitlines()
        ]
        assert {e["verdict"] for e in audit} == {"released"}
        assert len(audit) == 1 + 1 + glm.rounds
