"""Shared fixtures: paths to ../shared data and session-scoped DuckDB CDMs built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GIBLEED_CSV = SHARED / "data" / "eunomia" / "GiBleed" / "csv"
EXPECTED = SHARED / "data" / "eunomia" / "expected_results"
COHORTS = SHARED / "data" / "eunomia" / "cohorts"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder beside the checkout (CI lays it there)."""
    if not GIBLEED_CSV.is_dir():
        pytest.fail(f"shared data not found at {SHARED}: clone the project beside ../shared")
    return SHARED
