"""Broken OMOP CSV input: row failures go to the quarantine, file failures stop the run cleanly,
and no failed or killed run ever changes the previous database file."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

import omop_etl.load
from fedomop.cli import app
from omop_etl.cdm import connect
from omop_etl.load import load_omop_csv
from omop_etl.quarantine import Reason
from omop_etl.report import LoadReport
from omop_etl.sources import OMOP_CSV, EtlInputError
from omop_etl.staging import quarantine_file
from tests.conftest import GIBLEED_CSV, REPO


def _read(name: str) -> tuple[list[str], list[list[str]]]:
    with (GIBLEED_CSV / name).open(newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


# (DRUG_EXPOSURE column, value) that breaks one row each, with the reason expected for it.
CORRUPTIONS = [
    ("DRUG_EXPOSURE_START_DATE", "31/12/2010", "unparseable date"),
    ("DRUG_EXPOSURE_END_DATE", "2010-02-30", "impossible date"),
    ("DRUG_EXPOSURE_END_DATE", "2009-01-01", "end before start"),
    ("PERSON_ID", "999999999", "unknown person"),
    ("QUANTITY", "12,5", "malformed number"),
    ("DRUG_CONCEPT_ID", "", "missing required field"),
]


@pytest.fixture
def broken_dir(tmp_path: Path, shared_dir: Path) -> Path:
    """20 GiBleed persons with their observation periods, and one drug_exposure row per
    failure kind between good rows (lines 2 and 9), plus a duplicate of the first id (line 10)."""
    src = tmp_path / "src"
    src.mkdir()
    header, persons = _read("PERSON.csv")
    persons = persons[:20]
    _write(src / "PERSON.csv", header, persons)
    person_ids = {p[0] for p in persons}
    header, periods = _read("OBSERVATION_PERIOD.csv")
    _write(src / "OBSERVATION_PERIOD.csv", header, [r for r in periods if r[1] in person_ids])
    header, drugs = _read("DRUG_EXPOSURE.csv")
    good = next(r for r in drugs if r[1] in person_ids)
    col = {name: i for i, name in enumerate(header)}
    good[col["DRUG_EXPOSURE_START_DATE"]], good[col["DRUG_EXPOSURE_END_DATE"]] = (
        "2010-01-01",
        "2010-01-31",
    )
    rows = []
    for drug_id, (column, value, _) in enumerate([(None, None, None), *CORRUPTIONS], start=1):
        row = [str(drug_id), *good[1:]]
        if column:
            row[col[column]] = value
        rows.append(row)
    rows.append(["8", *good[1:]])
    rows.append(["1", *good[1:3], "2010-01-15", *good[4:]])  # duplicate id 1, other date
    _write(src / "DRUG_EXPOSURE.csv", header, rows)
    return src


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def previous_db(broken_dir: Path, tmp_path: Path) -> Path:
    """``tmp_path/cdm.duckdb`` loaded from ``broken_dir``: the database a failed load must keep."""
    db = tmp_path / "cdm.duckdb"
    load_omop_csv(broken_dir, db, progress=False)
    return db


@contextmanager
def _kept(db: Path) -> Iterator[None]:
    """Assert that ``db`` is byte for byte what it was before the block."""
    before = _digest(db)
    yield
    assert _digest(db) == before


def _load_without_rekeying(
    folder: Path, tmp_path: Path, columns: str
) -> tuple[Path, LoadReport, list[tuple]]:
    """Load ``folder`` with duplicate ids quarantined (not re-keyed); the database, the report
    and the quarantine's ``columns`` in source-line order."""
    db = tmp_path / "cdm.duckdb"
    report = load_omop_csv(folder, db, progress=False, rekey_duplicates=False)
    with connect(db) as con:
        quarantined = con.execute(
            f"SELECT {columns} FROM etl_quarantine ORDER BY source_line"
        ).fetchall()
    return db, report, quarantined


def test_each_broken_row_is_quarantined_with_reason_and_line(
    broken_dir: Path, tmp_path: Path
) -> None:
    db, report, quarantined = _load_without_rekeying(
        broken_dir, tmp_path, "source_file, source_line, reason, raw->>'DRUG_EXPOSURE_ID'"
    )
    with connect(db) as con:
        loaded = con.execute(
            "SELECT drug_exposure_id, drug_exposure_start_date FROM drug_exposure"
        ).fetchall()
    expected = [
        ("DRUG_EXPOSURE.csv", line, reason, str(line - 1))
        for line, (_, _, reason) in enumerate(CORRUPTIONS, start=3)
    ]
    expected.append(("DRUG_EXPOSURE.csv", 10, "duplicate primary key", "1"))
    assert quarantined == expected
    assert [(i, str(d)) for i, d in loaded] == [(1, "2010-01-01"), (8, "2010-01-01")]
    assert report.tables["drug_exposure"].read == 9
    assert report.tables["drug_exposure"].loaded == 2
    assert report.quarantine_by_reason() == {reason: 1 for _, _, reason in CORRUPTIONS} | {
        "duplicate primary key": 1
    }


def _invoke(src: Path, db: Path):
    return CliRunner().invoke(app, ["etl", "omop-csv", str(src), "--db", str(db)])


def test_cli_prints_counts_per_reason(broken_dir: Path, tmp_path: Path) -> None:
    result = _invoke(broken_dir, tmp_path / "cdm.duckdb")
    assert result.exit_code == 0, result.output
    for _, _, reason in CORRUPTIONS:
        assert f"quarantined: 1 rows, {reason}" in result.output


def test_missing_column_fails_naming_it_and_keeps_previous_db(
    broken_dir: Path, tmp_path: Path, previous_db: Path
) -> None:
    header, rows = _read("DRUG_EXPOSURE.csv")
    drop = header.index("DRUG_TYPE_CONCEPT_ID")
    _write(
        broken_dir / "DRUG_EXPOSURE.csv",
        header[:drop] + header[drop + 1 :],
        [r[:drop] + r[drop + 1 :] for r in rows[:5]],
    )
    with _kept(previous_db):
        result = _invoke(broken_dir, previous_db)
    assert result.exit_code == 1
    assert "DRUG_EXPOSURE.csv" in result.output
    assert "required column 'drug_type_concept_id'" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdm.duckdb", "src"]


def test_missing_file_fails_naming_it_and_keeps_previous_db(
    broken_dir: Path, previous_db: Path
) -> None:
    (broken_dir / "OBSERVATION_PERIOD.csv").unlink()
    with _kept(previous_db):
        result = _invoke(broken_dir, previous_db)
    assert result.exit_code == 1
    assert "required file OBSERVATION_PERIOD.csv is missing" in result.output


def test_unreadable_csv_fails_naming_the_file_and_line(broken_dir: Path, tmp_path: Path) -> None:
    header, rows = _read("DRUG_EXPOSURE.csv")
    _write(broken_dir / "DRUG_EXPOSURE.csv", header, [rows[0], rows[1] + ["extra"]])
    result = _invoke(broken_dir, tmp_path / "cdm.duckdb")
    assert result.exit_code == 1
    message = (
        f"DRUG_EXPOSURE.csv: not a readable CSV file: line 3: {len(header) + 1} fields where "
        f"the header has {len(header)}"
    )
    assert message in result.output
    assert "Possible fixes" not in result.output and "strict_mode" not in result.output
    assert not (tmp_path / "cdm.duckdb").exists()


def test_rows_with_too_few_fields_are_quarantined_and_later_lines_keep_theirs(
    broken_dir: Path, tmp_path: Path
) -> None:
    """A short row (line 3, and the last line) is quarantined like a bad date, instead of the
    parser stopping the load; the rows after it keep their line numbers."""
    with (broken_dir / "DRUG_EXPOSURE.csv").open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    rows[1] = rows[1][:5]
    rows.append(["11", "1"])
    _write(broken_dir / "DRUG_EXPOSURE.csv", header, rows)
    db, report, quarantined = _load_without_rekeying(
        broken_dir, tmp_path, "source_line, reason, raw->>'DRUG_EXPOSURE_ID', raw->>'QUANTITY'"
    )
    assert quarantined[0] == (3, "too few fields", "2", None)
    assert [(line, reason) for line, reason, _, _ in quarantined[1:]] == [
        *((line, reason) for line, (_, _, reason) in enumerate(CORRUPTIONS[1:], start=4)),
        (10, "duplicate primary key"),
        (11, "too few fields"),
    ]
    counts = report.tables["drug_exposure"]
    assert (counts.read, counts.loaded, counts.quarantined) == (10, 2, 8)
    result = _invoke(broken_dir, db)
    assert result.exit_code == 0, result.output
    assert "quarantined: 2 rows, too few fields" in result.output


def test_exception_mid_load_keeps_previous_db(
    broken_dir: Path, tmp_path: Path, previous_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = omop_etl.load.load_table

    def failing(con, table, path, *args, **kwargs):
        if table.name == "drug_exposure":
            raise EtlInputError("injected failure")
        return real(con, table, path, *args, **kwargs)

    monkeypatch.setattr(omop_etl.load, "load_table", failing)
    with _kept(previous_db), pytest.raises(EtlInputError, match="injected"):
        load_omop_csv(broken_dir, previous_db, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdm.duckdb", "src"]


@pytest.mark.slow
def test_sigkill_mid_load_keeps_previous_db(
    broken_dir: Path, tmp_path: Path, previous_db: Path
) -> None:
    db = previous_db
    before = _digest(db)
    process = subprocess.Popen(
        [sys.executable, "-m", "fedomop.cli", "etl", "omop-csv", str(GIBLEED_CSV), "--db", str(db)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".cdm.duckdb.build-*/cdm.duckdb")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # into the table loads
    assert process.poll() is None, "load finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert _digest(db) == before
    with connect(db) as con:
        assert con.execute("SELECT count(*) FROM person").fetchone()[0] == 20
    # the next build removes the killed build's folder
    load_omop_csv(broken_dir, db, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdm.duckdb", "src"]


def test_rekey_duplicates_loads_reused_ids_under_new_ids(broken_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "cdm.duckdb"
    report = load_omop_csv(broken_dir, db, progress=False, rekey_duplicates=True)
    with connect(db) as con:
        loaded = con.execute(
            "SELECT drug_exposure_id, drug_exposure_start_date FROM drug_exposure"
        ).fetchall()
        rekeyed = con.execute("SELECT * FROM etl_rekeyed").fetchall()
        reasons = con.execute("SELECT reason FROM etl_quarantine ORDER BY source_line").fetchall()
    assert [(i, str(d)) for i, d in loaded] == [
        (1, "2010-01-01"),
        (8, "2010-01-01"),
        (9, "2010-01-15"),
    ]
    assert rekeyed == [("DRUG_EXPOSURE.csv", 10, "drug_exposure", "1", 9)]
    assert [r for (r,) in reasons] == [reason for _, _, reason in CORRUPTIONS]
    assert report.tables["drug_exposure"].rekeyed == 1


def test_quarantined_rows_keep_the_line_they_start_on(tmp_path: Path) -> None:
    path = tmp_path / "note.csv"
    path.write_text('note_id,note_text\n1,"a\nb"\n2,c\n3,"d\n\ne"\n4,f\n')
    con = duckdb.connect()
    assert quarantine_file(con, path, OMOP_CSV, Reason.NO_CDM_TABLE) == 4
    lines = con.execute("SELECT source_line FROM etl_quarantine ORDER BY ALL").fetchall()
    assert lines == [(2,), (4,), (5,), (8,)]
    path.write_text("note_id,note_text\n1,a\n2,b\n")  # no line break inside a field
    con.execute("DELETE FROM etl_quarantine")
    assert quarantine_file(con, path, OMOP_CSV, Reason.NO_CDM_TABLE) == 2
    assert con.execute("SELECT source_line FROM etl_quarantine ORDER BY ALL").fetchall() == [
        (2,),
        (3,),
    ]
