"""Fuzzed source CSVs through ``fedomop etl omop-csv`` (issue 15): wrong encodings, broken
quoting, other delimiters, impossible dates, huge fields, NUL bytes, truncated files.

Each load either succeeds (rows it cannot load quarantined with a reason, the new CDM file in
place) or stops with an ``error:`` line naming the problem and exit 1, leaving the previous
CDM file byte for byte as it was and nothing beside it; never a traceback.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path
from typing import Any

import duckdb
import pytest
from _fuzz import file_digest, fuzz_settings, outcome, tried
from conftest import GIBLEED_CSV
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedomop.cli import app

FILES = ("PERSON.csv", "OBSERVATION_PERIOD.csv", "CONDITION_OCCURRENCE.csv")
HOW = ["latin1", "utf16", "quote", "delimiter", "date", "huge", "nul", "truncate", "bom"]
N_CSV = 3
"""Examples per kind of breakage (each is a real load of three files: about 0.8 s)."""
PROPERTY = "source CSV via `etl omop-csv`"


pytestmark = pytest.mark.usefixtures("fuzz_counts")  # tests/conftest.py


def _rows(name: str, keep: Any) -> list[list[str]]:
    with (GIBLEED_CSV / name).open(newline="") as handle:
        rows = list(csv.reader(handle))
    return [rows[0], *[r for r in rows[1:] if keep(r)]]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> dict[str, bytes]:
    """20 GiBleed persons, their observation periods and 40 of their conditions, as bytes."""
    persons = _rows("PERSON.csv", lambda r: True)[:21]
    ids = {r[0] for r in persons[1:]}
    tables = {
        "PERSON.csv": persons,
        "OBSERVATION_PERIOD.csv": _rows("OBSERVATION_PERIOD.csv", lambda r: r[1] in ids),
        "CONDITION_OCCURRENCE.csv": _rows("CONDITION_OCCURRENCE.csv", lambda r: r[1] in ids)[:41],
    }
    out = {}
    for name, rows in tables.items():
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        out[name] = text.getvalue().encode()
    return out


@st.composite
def _corrupted(draw: st.DrawFn, source: dict[str, bytes], how: str) -> tuple[str, bytes]:
    """(file, bytes): one source file broken one way (``how``)."""
    name = draw(st.sampled_from(FILES))
    data = source[name]
    lines = data.split(b"\n")
    line = draw(st.integers(1, max(1, len(lines) - 2)))
    if how == "latin1":  # a non-UTF-8 byte in a text field
        lines[line] = lines[line] + b"\xe9"
    elif how == "utf16":
        return name, data.decode().encode("utf-16")
    elif how == "quote":
        at = draw(st.integers(0, len(lines[line])))
        lines[line] = lines[line][:at] + b'"' + lines[line][at:]
    elif how == "delimiter":
        return name, data.replace(b",", draw(st.sampled_from([b";", b"\t", b"|"])))
    elif how == "date":
        fields = lines[line].split(b",")
        value = draw(st.sampled_from([b"2010-02-30", b"31/12/2010", b"0000-00-00", b"99999-01-01"]))
        fields[min(3, len(fields) - 1)] = value
        lines[line] = b",".join(fields)
    elif how == "huge":
        fields = lines[line].split(b",")
        fields[-1] = b"x" * draw(st.sampled_from([100_000, 3_000_000]))
        lines[line] = b",".join(fields)
    elif how == "nul":
        at = draw(st.integers(0, len(data) - 1))
        return name, data[:at] + b"\x00" * draw(st.integers(1, 3)) + data[at:]
    elif how == "truncate":
        return name, data[: draw(st.integers(0, len(data) - 1))]
    else:
        return name, b"\xef\xbb\xbf" + data
    return name, b"\n".join(lines)


def _load(src: Path, db: Path) -> Any:
    result = CliRunner().invoke(app, ["etl", "omop-csv", str(src), "--db", str(db)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def previous(tmp_path_factory: pytest.TempPathFactory, source) -> Path:
    """A CDM built from the clean source: what every failed load must leave untouched."""
    src = tmp_path_factory.mktemp("clean_src")
    for name, data in source.items():
        (src / name).write_bytes(data)
    db = tmp_path_factory.mktemp("previous") / "cdm.duckdb"
    result = _load(src, db)
    assert result.exit_code == 0, result.output
    return db


@pytest.mark.parametrize("how", HOW)
@fuzz_settings(N_CSV)
@given(data=st.data())
def test_a_broken_source_csv_is_quarantined_or_refused_and_the_old_cdm_stays(
    tmp_path_factory, source, previous, how, data
) -> None:
    name, broken = data.draw(_corrupted(source, how))
    tried(PROPERTY, N_CSV * len(HOW))
    root = tmp_path_factory.mktemp("etl")
    src = root / "src"
    src.mkdir()
    for file, content in source.items():
        (src / file).write_bytes(broken if file == name else content)
    db = root / "out" / "cdm.duckdb"
    db.parent.mkdir()
    shutil.copy(previous, db)
    before = file_digest(db)
    result = _load(src, db)
    assert "Traceback" not in result.output
    outcome(PROPERTY, f"{how}: {'loaded' if result.exit_code == 0 else 'refused'}")
    if result.exit_code != 0:
        assert result.exit_code == 1 and "error:" in result.output, (how, result.output)
        assert file_digest(db) == before
        assert sorted(p.name for p in db.parent.iterdir()) == ["cdm.duckdb"]
        return
    con = duckdb.connect(str(db), read_only=True)
    try:  # a new CDM: every person and period read was loaded or quarantined with a reason
        persons = con.execute("SELECT count(*) FROM person").fetchone()[0]
        reasons = con.execute(
            "SELECT count(*) FROM etl_quarantine WHERE reason IS NULL OR reason = ''"
        ).fetchone()[0]
        control = _control_characters(con)  # a NUL in a text field: quarantined, not loaded
    finally:
        con.close()
    assert persons <= 20 and reasons == 0
    assert control == [], control


def _control_characters(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(table, column) of every loaded text value of ``FILES``' tables holding a C0 control
    character other than tab, line feed or carriage return."""
    found = []
    for table in ("person", "observation_period", "condition_occurrence"):
        columns = con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
            "AND data_type = 'VARCHAR'",
            [table],
        ).fetchall()
        for (column,) in columns:
            bad = con.execute(
                f'SELECT count(*) FROM {table} WHERE regexp_matches("{column}", '
                "'[\\x00-\\x08\\x0B\\x0C\\x0E-\\x1F]')"
            ).fetchone()[0]
            if bad:
                found.append((table, column))
    return found


@pytest.mark.parametrize("character", ["\x00", "\x01", "\x1b", "\x7f", "\t"])
def test_a_control_character_in_a_text_field_sends_its_row_to_the_quarantine(
    tmp_path: Path, source, character: str
) -> None:
    """A NUL byte (or another C0 control character but tab) inside a text field quarantines
    the row with its file, line and a reason naming the column; tab and DEL load as they are."""
    rows = list(csv.reader(io.StringIO(source["PERSON.csv"].decode())))
    column = rows[0].index("PERSON_SOURCE_VALUE")
    rows[4][column] = f"abc{character}def"  # line 5 of the file
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    src = tmp_path / "src"
    src.mkdir()
    for name, data in source.items():
        (src / name).write_bytes(text.getvalue().encode() if name == "PERSON.csv" else data)
    db = tmp_path / "cdm.duckdb"
    result = _load(src, db)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    con = duckdb.connect(str(db), read_only=True)
    try:
        quarantined = con.execute(
            "SELECT source_file, source_line, reason, raw->>'PERSON_SOURCE_VALUE' "
            "FROM etl_quarantine WHERE target_table = 'person'"
        ).fetchall()
        loaded = con.execute("SELECT person_source_value FROM person").fetchall()
        control = _control_characters(con)
    finally:
        con.close()
    assert control == []
    if character in ("\t", "\x7f"):
        assert quarantined == [] and (f"abc{character}def",) in loaded
        return
    assert quarantined == [
        ("PERSON.csv", 5, "control character in person_source_value", f"abc{character}def")
    ]
    assert len(loaded) == 19 and (f"abc{character}def",) not in loaded


def test_synthea_rows_with_a_control_character_in_a_text_field_are_quarantined(
    tmp_path: Path,
) -> None:
    """``etl synthea`` keeps the same policy: a NUL byte in a condition's code, an escape in a
    patient's race send the row to the quarantine naming file, line and column."""
    import polars as pl

    from omop_etl.synth import generate
    from omop_etl.synthea import load_synthea

    src = generate(tmp_path / "node", patients=40, seed=3, profile="urban_hospital")
    broken = {("conditions.csv", "CODE", 4): "4411\x003", ("patients.csv", "RACE", 2): "w\x1bte"}
    for (name, column, row), value in broken.items():
        frame = pl.read_csv(src / name, infer_schema=False)
        frame = frame.with_columns(
            pl.when(pl.int_range(pl.len()) == row).then(pl.lit(value)).otherwise(pl.col(column))
            .alias(column)
        )  # fmt: skip
        frame.write_csv(src / name)
    load_synthea(src, tmp_path / "cdm.duckdb", progress=False)
    con = duckdb.connect(str(tmp_path / "cdm.duckdb"), read_only=True)
    try:
        got = dict(
            ((f, line), reason)
            for f, line, reason in con.execute(
                "SELECT source_file, source_line, reason FROM etl_quarantine"
            ).fetchall()
        )
        control = _control_characters(con)
    finally:
        con.close()
    assert got[("conditions.csv", 6)] == "control character in CODE"
    assert got[("patients.csv", 4)] == "control character in RACE"
    assert set(got.values()) <= {
        "control character in CODE",
        "control character in RACE",
        "unknown person",
    }  # fmt: skip  (the quarantined patient's own events have no person)
    assert control == []
