"""``bench/secagg.py`` at its smallest: the sums it times are exact and the charge it reports
per node stays flat as nodes join (the figures the benchmark README quotes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_secagg_benchmark_reports_a_flat_charge_per_node() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "secagg.py"), "--quick", "--repeat", "1"],
        capture_output=True, text=True, timeout=300, check=True, cwd=REPO,
    )  # fmt: skip
    report = json.loads(out.stdout)
    charges = {row["nodes"]: row for row in report["charge_per_node"]}
    assert sorted(charges) == [3, 8, 20, 50]
    booked = {n: row["rho_booked_per_node"] for n, row in charges.items()}
    assert all(rho == pytest.approx(0.5, rel=1e-4) for rho in booked.values())
    assert len(set(booked.values())) == 1
    # the previous sizing: a share alone worth (n - 1) rho, booked as if it were about rho
    assert charges[8]["previous_rho_share_alone"] == pytest.approx(3.5)
    assert charges[20]["previous_rho_booked"] is None
    assert charges[8]["total_noise_sd"] == pytest.approx((8 * 3 / (2 * 0.5) / 2) ** 0.5)
