"""The user's commands: ``fedomop run --simulation`` with the demo study, and clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from coordinator.demo import DEMO_STUDY, issue_permit, make_permit_body, write_policy
from coordinator.simulation import write_nodes_toml
from fedomop.cli import app
from studies.model import load_study

runner = CliRunner()


@pytest.fixture
def permitted(synthetic_node_dbs, tmp_path):
    keys = make_permit_body(tmp_path / "permit_body")
    names = ["urban", "rural", "elderly"]
    policies = [write_policy(tmp_path / n, n, cdm, keys.public)
                for n, cdm in zip(names, synthetic_node_dbs, strict=True)]  # fmt: skip
    issue_permit(load_study(DEMO_STUDY), names, keys.private, tmp_path / "permit.json")
    return tmp_path, write_nodes_toml(tmp_path / "nodes.toml", policies)


@pytest.mark.slow
def test_run_simulation_writes_results_and_report(permitted):
    folder, nodes = permitted
    out = folder / "results"
    result = runner.invoke(app, ["run", str(DEMO_STUDY), "--permit", str(folder / "permit.json"),
                                 "--simulation", str(nodes), "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Study results" in result.output and "bleed_risk" in result.output
    for name in ("results.csv", "settings.csv", "nodes.csv", "federation.json", "report.html"):
        assert (out / name).is_file(), name
    record = json.loads((out / "federation.json").read_text())
    assert [a["status"] for a in record["analyses"]] == ["finished"] * 5
    assert record["analyses"][-1]["rounds"] >= 3
    assert (out / "plots").is_dir()


def test_run_needs_exactly_one_transport(permitted):
    folder, nodes = permitted
    base = ["run", str(DEMO_STUDY), "--permit", str(folder / "permit.json")]
    result = runner.invoke(app, base)
    assert result.exit_code == 1 and "exactly one of --simulation" in result.output
    both = base + ["--simulation", str(nodes), "--superlink", "127.0.0.1:1"]
    assert runner.invoke(app, both).exit_code == 1
    no_cert = base + ["--superlink", "127.0.0.1:1"]
    result = runner.invoke(app, no_cert)
    assert result.exit_code == 1 and "--root-cert" in result.output


def test_bad_nodes_file_and_permit_are_named(permitted):
    folder, _ = permitted
    bad_nodes = folder / "bad.toml"
    bad_nodes.write_text('[[node]]\npolicy = "nowhere/node.toml"\n')
    permit = str(folder / "permit.json")
    result = runner.invoke(app, ["run", str(DEMO_STUDY), "--permit", permit,
                                 "--simulation", str(bad_nodes)])  # fmt: skip
    assert result.exit_code == 1 and "nowhere/node.toml" in result.output
    not_permit = folder / "not_permit.json"
    not_permit.write_text("[1, 2]")
    result = runner.invoke(app, ["run", str(DEMO_STUDY), "--permit", str(not_permit),
                                 "--simulation", str(bad_nodes)])  # fmt: skip
    assert result.exit_code == 1 and "not a signed permit" in result.output


def test_node_start_refuses_to_run_without_tls_material(permitted):
    folder, _ = permitted
    result = runner.invoke(app, ["node", "start", "--policy", str(folder / "urban" / "node.toml"),
                                 "--superlink", "127.0.0.1:1"])  # fmt: skip
    assert result.exit_code == 1 and "--root-cert" in result.output
    result = runner.invoke(app, ["coordinator", "start", "--port", "1"])
    assert result.exit_code == 1 and "--certs" in result.output
