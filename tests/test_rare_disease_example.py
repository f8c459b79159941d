"""``fedomop demo --rare-disease``: 8 generated nodes with 1 to 6 cases each. Per-node reporting
releases nothing; the pooled totals come out within their noise of the truth, the model is
fitted, and each node's ledger holds the epsilon the report states."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from coordinator.rare_disease import RARE_PATIENTS
from fedomop.cli import app
from privacy.accounting import rho_to_epsilon
from privacy.ledger import Ledger


@pytest.mark.slow
def test_demo_rare_disease_pools_what_per_node_reporting_suppresses(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "--rare-disease", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "rare_disease.json").read_text())
    assert sorted(summary["true_per_node"].values()) == sorted(RARE_PATIENTS)
    assert all(1 <= n <= 6 for n in summary["true_per_node"].values())
    assert summary["true_overall"] == sum(RARE_PATIENTS) == 26
    # per-node reporting: every node's counts suppressed, nothing released
    assert summary["per_node_values_released"] == {"cf_feasibility": 0}
    # pooled: the noisy total within five standard deviations of the truth (sd sqrt(3/2 * 8/2)))
    sd = summary["noise_sd"]["cf_pooled"]
    assert sd == pytest.approx(math.sqrt(3 / (2 * 0.5 * 2)) * math.sqrt(8))
    assert abs(summary["pooled_overall"] - 26) <= 5 * sd
    assert summary["failures"] == {} and summary["model_fitted"]
    # the epsilon each node's report states is what its own ledger booked
    permit_id = json.loads((tmp_path / "permit.json").read_text())["body"]["permit_id"]
    for name, epsilon in summary["epsilon_per_node"].items():
        rho = Ledger(tmp_path / "nodes" / name / "ledger.sqlite").spent(permit_id)
        assert epsilon == pytest.approx(rho_to_epsilon(rho, 1e-6)) and 0 < epsilon < 20
    report = (tmp_path / "report.md").read_text()
    assert "nothing but its masked, noisy share" in report
    assert "| node | cases (own, not released)" in report and "cases, overall" in report
