"""DuckDB connections print nothing: its progress bar, on by default, writes into standard
output for any query over two seconds, even when that is a pipe, a log or a JSON channel
(a 1M-person node's replies to the bench came back with it inside)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from omop_etl.cdm import connect, without_progress_bar

#: A query long enough to draw the bar once its wait (set to 1 ms here) has passed.
SLOW = "SELECT count(*) FROM range(60000000) t(x) WHERE x % 7 = 3"


def _printed(con: duckdb.DuckDBPyConnection, capfd: pytest.CaptureFixture[str]) -> str:
    capfd.readouterr()
    assert con.execute(SLOW).fetchone() == (8571429,)
    return capfd.readouterr().out


def _bar_on(con: duckdb.DuckDBPyConnection) -> bool:
    return con.execute("SELECT current_setting('enable_progress_bar')").fetchone()[0]


def test_the_setting_silences_the_bar(capfd: pytest.CaptureFixture[str]) -> None:
    """DuckDB alone writes the bar into stdout; with ``without_progress_bar`` nothing.
    (Setting ``progress_bar_time`` turns the bar on again, so it is set first.)"""
    con = duckdb.connect()
    con.execute("SET progress_bar_time = 1")
    assert "%" in _printed(con, capfd)
    assert _printed(without_progress_bar(con), capfd) == ""


def test_every_connection_has_no_bar(tmp_path: Path) -> None:
    assert not _bar_on(connect())
    assert not _bar_on(connect(tmp_path / "cdm.duckdb", read_only=False))
    assert not _bar_on(connect(tmp_path / "cdm.duckdb"))
    assert not _bar_on(without_progress_bar(connect().cursor()))  # a cursor: its own


def test_a_missing_cdm_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no CDM database at"):
        connect(tmp_path / "absent.duckdb")
    assert not (tmp_path / "absent.duckdb").exists()
