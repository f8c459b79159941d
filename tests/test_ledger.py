"""The budget ledger: durable, never overspent under concurrency, idempotent per request."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from privacy.ledger import Budget, BudgetExhausted, Ledger, Release

TERMS = (1.0, 1e-6, "2030-01-01")


def release(request_id: str, rho: float = 1.0, permit_id: str = "pmt-a") -> Release:
    return Release(
        request_id=request_id,
        permit_id=permit_id,
        analysis_id="n",
        rho=rho,
        charged_at=datetime.now(UTC).isoformat(),
        payload=request_id.encode(),
        payload_hash="h-" + request_id,
        settings={"rho_charged": rho},
    )


def test_charges_add_up_and_stop_at_the_budget(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(permit_rho=2.5, year_rho=100.0)
    for i in range(2):
        ledger.charge(release(f"r{i}"), budget, TERMS)
    with pytest.raises(BudgetExhausted, match="budget of permit pmt-a exhausted"):
        ledger.charge(release("r2"), budget, TERMS)
    assert ledger.spent("pmt-a") == 2.0
    ledger.charge(release("r3", rho=0.5), budget, TERMS)  # what is left still fits
    assert ledger.spent("pmt-a") == 2.5
    assert ledger.lookup("r2") is None
    [row] = ledger.summary()
    assert (row["rho_spent"], row["rho_budget"], row["releases"]) == (2.5, 2.5, 3)


def test_yearly_budget_spans_permits(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(permit_rho=10.0, year_rho=3.0)
    for i, permit in enumerate(["pmt-a", "pmt-b", "pmt-c"]):
        ledger.charge(release(f"r{i}", permit_id=permit), budget, TERMS)
    with pytest.raises(BudgetExhausted, match="yearly"):
        ledger.charge(release("r9", permit_id="pmt-d"), budget, TERMS)
    assert ledger.spent_this_year() == 3.0


def test_release_cap_counts_answers_per_analysis(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(permit_rho=100.0, year_rho=100.0, max_releases=2)
    for i in range(2):
        ledger.charge(release(f"r{i}", rho=0.0), budget, TERMS)
    with pytest.raises(BudgetExhausted, match="allows 2 release"):
        ledger.check("pmt-a", "n", 0.0, budget)
    with pytest.raises(BudgetExhausted, match="allows 2 release"):
        ledger.charge(release("r2", rho=0.0), budget, TERMS)
    ledger.charge(release("r3", rho=0.0, permit_id="pmt-b"), budget, TERMS)  # per permit


def test_same_request_is_charged_once_and_returns_the_stored_release(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    budget = Budget(permit_rho=5.0, year_rho=5.0)
    first = ledger.charge(release("same"), budget, TERMS)
    changed = Release(**{**release("same").__dict__, "payload": b"another answer"})
    again = ledger.charge(changed, budget, TERMS)
    assert again.payload == first.payload == b"same"
    assert ledger.spent("pmt-a") == 1.0


def test_ledger_is_wal_with_full_sync_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path).charge(release("r0"), Budget(5.0, 5.0), TERMS)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert Ledger(path).spent("pmt-a") == 1.0


def _charge_many(path: str, worker: int) -> int:
    ledger, granted = Ledger(Path(path)), 0
    for i in range(10):
        try:
            ledger.charge(release(f"w{worker}-{i}"), Budget(permit_rho=25.0, year_rho=1e9), TERMS)
            granted += 1
        except BudgetExhausted:
            pass
    return granted


def test_concurrent_processes_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    with ProcessPoolExecutor(max_workers=4) as pool:
        granted = list(pool.map(_charge_many, [str(path)] * 4, range(4)))
    assert sum(granted) == 25
    assert Ledger(path).spent("pmt-a") == 25.0
