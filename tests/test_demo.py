"""The user's commands: ``fedomop run --simulation`` with the demo study (equal to the in-process
reference, through real gates, with the report), and clear errors."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
from typer.testing import CliRunner

from coordinator.demo import (
    DEMO_STUDY,
    issue_permit,
    make_permit_body,
    node_identities,
    write_policy,
)
from coordinator.simulation import write_nodes_toml
from fedomop.cli import app
from studies.loading import load_study
from studies.results import ESTIMATE_KEYS
from studies.runner import run_local

runner = CliRunner()


def _said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


NAMES = ["urban", "rural", "elderly"]


def _pooled(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("cdm_name") == "federated").select(
        [*ESTIMATE_KEYS, "estimate_value"]
    )


@pytest.fixture
def permitted(synthetic_node_dbs, tmp_path):
    keys = make_permit_body(tmp_path / "permit_body")
    policies = [write_policy(tmp_path / n, n, cdm, keys.public)
                for n, cdm in zip(NAMES, synthetic_node_dbs, strict=True)]  # fmt: skip
    identities = node_identities(policies)
    issue_permit(
        load_study(DEMO_STUDY), NAMES, keys.private, tmp_path / "permit.json", node_keys=identities
    )
    return tmp_path, write_nodes_toml(tmp_path / "nodes.toml", policies)


@pytest.mark.slow
def test_run_simulation_writes_results_and_report(permitted, synthetic_node_dbs):
    folder, nodes = permitted
    out = folder / "results"
    result = runner.invoke(app, ["run", str(DEMO_STUDY), "--permit", str(folder / "permit.json"),
                                 "--simulation", str(nodes), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Study results" in result.output and "bleed_risk" in result.output
    for name in ("results.csv", "settings.csv", "nodes.csv", "federation.json", "report.html"):
        assert (out / name).is_file(), name
    _report_agrees_with_results(out)
    record = json.loads((out / "federation.json").read_text())
    assert [a["status"] for a in record["analyses"]] == ["finished"] * 5
    # Ray's start-up is timed on its own, before the first analysis (and releases nothing:
    # the audit logs below hold the study's releases only)
    assert record["phases"]["runtime_startup_s"] > 0
    assert "simulation start-up (Ray workers, node gates)" in _said(result)
    rounds = record["analyses"][-1]["rounds"]
    assert rounds >= 3  # Newton-Raphson ran several federated rounds
    assert (out / "plots").is_dir()

    # the same numbers as the in-process reference on the same files
    reference, _ = run_local(DEMO_STUDY, synthetic_node_dbs, folder / "ref", node_names=NAMES)
    joined = _pooled(pl.read_csv(out / "results.csv", infer_schema=False)).join(
        _pooled(reference.with_columns(pl.col("result_id").cast(pl.String))),
        on=ESTIMATE_KEYS,
        suffix="_ref",
    )
    overall = joined.filter(
        pl.col("result_id") == "1", pl.col("strata_name") == "overall",
        pl.col("estimate_name") == "count",
    )  # fmt: skip
    assert overall.height == 8
    assert (overall["estimate_value"] == overall["estimate_value_ref"]).all()
    coef = joined.filter(pl.col("result_id") == "5", pl.col("estimate_name") == "coefficient")
    assert coef.height == 4
    for got, want in zip(coef["estimate_value"], coef["estimate_value_ref"], strict=True):
        assert math.isclose(float(got), float(want), rel_tol=1e-8, abs_tol=1e-10)
    km = joined.filter(pl.col("result_id") == "4", pl.col("estimate_name") == "estimate")
    # yearly declared bins merged into the grid of the nodes' segments (0 or >= 10 events and
    # censorings each): time 0 and at least one more, every time a whole number of years
    assert km.height >= 2
    assert all(int(t) % 365 == 0 for t in km["additional_level"])
    # every node's audit log: one released entry per analysis round it answered (two for the
    # characterization: its top-N key list, then its counts)
    for name in NAMES:
        audit = (folder / name / "audit.jsonl").read_text().splitlines()
        assert [json.loads(line)["verdict"] for line in audit] == ["released"] * (5 + rounds)


def test_run_needs_exactly_one_transport(permitted, tmp_path_factory, monkeypatch):
    folder, nodes = permitted
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)  # where the default --out results would go
    base = ["run", str(DEMO_STUDY), "--permit", str(folder / "permit.json")]
    result = runner.invoke(app, base)
    assert result.exit_code == 1 and "exactly one of --simulation" in _said(result)
    both = base + ["--simulation", str(nodes), "--superlink", "127.0.0.1:1"]
    assert runner.invoke(app, both).exit_code == 1
    no_cert = base + ["--superlink", "127.0.0.1:1"]
    result = runner.invoke(app, no_cert)
    assert result.exit_code == 1 and "--root-cert" in _said(result)
    assert list(cwd.iterdir()) == []  # a refused run leaves no results folder behind


def test_bad_nodes_file_and_permit_are_named(permitted):
    folder, _ = permitted
    bad_nodes = folder / "bad.toml"
    bad_nodes.write_text('[[node]]\npolicy = "nowhere/node.toml"\n')
    permit = str(folder / "permit.json")
    result = runner.invoke(app, ["run", str(DEMO_STUDY), "--permit", permit,
                                 "--simulation", str(bad_nodes)])  # fmt: skip
    assert result.exit_code == 1 and "nowhere/node.toml" in _said(result)
    not_permit = folder / "not_permit.json"
    not_permit.write_text("[1, 2]")
    result = runner.invoke(app, ["run", str(DEMO_STUDY), "--permit", str(not_permit),
                                 "--simulation", str(bad_nodes)])  # fmt: skip
    assert result.exit_code == 1 and "not a signed permit" in _said(result)


def test_node_start_refuses_to_run_without_tls_material(permitted):
    folder, _ = permitted
    result = runner.invoke(app, ["node", "start", "--policy", str(folder / "urban" / "node.toml"),
                                 "--superlink", "127.0.0.1:1"])  # fmt: skip
    assert result.exit_code == 1 and "--root-cert" in _said(result)
    result = runner.invoke(app, ["coordinator", "start", "--port", "1"])
    assert result.exit_code == 1 and "--certs" in _said(result)


def _report_agrees_with_results(out) -> None:
    """The demo report's tables: every number shown is one of results.csv's released estimates
    (as the report formats it), and no withheld estimate of results.csv reads as a number."""
    from test_report_consistency import _cells

    from coordinator.report import format_estimate
    from studies.results import read_results

    results, _ = read_results(out)
    released = {
        format_estimate(r["estimate_value"], None, r["estimate_name"])[0]
        for r in results.iter_rows(named=True)
        if r["estimate_value"] not in ("NA", None)
    }
    cells = _cells((out / "report.html").read_text("utf-8"))
    numbers = [
        text for css, text in cells if css == "num" and text not in ("NA", "–", "not reached")
    ]
    assert numbers and set(numbers) <= released, sorted(set(numbers) - released)[:10]
    withheld = (results["estimate_value"] == "NA").sum()
    assert withheld == 0 or any(css == "suppressed" for css, _ in cells)
