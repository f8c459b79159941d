"""``etl omop-csv`` reads an OMOP CDM as CSV or Parquet files, in a folder or a zip, with the same
checks and the same accounting (rows loaded + quarantined = rows read) whatever the format."""

from __future__ import annotations

import zipfile
from pathlib import Path

import duckdb
from typer.testing import CliRunner

from fedomop.cli import app
from omop_etl.cdm import connect
from omop_etl.load import load_omop_csv
from omop_etl.report import LoadReport
from tests.test_etl_bad_input import CORRUPTIONS, broken_dir  # noqa: F401 (fixture)

TABLES = ("person", "observation_period", "drug_exposure")


def _zip(folder: Path, archive: Path, inner: str = "export/") -> Path:
    """``folder``'s files in a zip, under a folder of the archive (as exports often are)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(folder.iterdir()):
            handle.write(path, inner + path.name)
        handle.writestr("__MACOSX/._PERSON.csv", b"not data")  # ignored: a hidden file
    return archive


def _to_parquet(folder: Path, out: Path, *, typed: bool) -> Path:
    """Every CSV of ``folder`` as Parquet: all text, or with the types DuckDB detects."""
    out.mkdir()
    con = duckdb.connect()
    for path in sorted(folder.glob("*.csv")):
        target = out / f"{path.stem.lower()}.parquet"
        con.execute(
            f"COPY (SELECT * FROM read_csv(?, all_varchar = {str(not typed).lower()})) "
            f"TO '{target}' (FORMAT parquet)",
            [str(path)],
        )
    con.close()
    return out


def _contents(db: Path) -> dict[str, list]:
    with connect(db) as con:
        found = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES}
        found["quarantine"] = con.execute(
            "SELECT source_file, source_line, target_table, reason FROM etl_quarantine ORDER BY ALL"
        ).fetchall()
    return found


def _assert_accounted(report: LoadReport) -> None:
    for name, counts in report.tables.items():
        assert counts.read == counts.loaded + counts.quarantined, name
    assert report.totals.read == report.totals.loaded + report.totals.quarantined


def test_a_zip_of_the_csv_files_loads_as_the_folder_does(broken_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    folder_report = load_omop_csv(broken_dir, tmp_path / "folder.duckdb", progress=False)
    archive = _zip(broken_dir, tmp_path / "export.zip")
    result = CliRunner().invoke(
        app, ["etl", "omop-csv", str(archive), "--db", str(tmp_path / "zip.duckdb")]
    )
    assert result.exit_code == 0, result.output
    assert _contents(tmp_path / "zip.duckdb") == _contents(tmp_path / "folder.duckdb")
    assert folder_report.tables["drug_exposure"].quarantined == len(CORRUPTIONS)
    _assert_accounted(folder_report)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # unpacked: gone


def test_parquet_files_go_through_the_same_checks(broken_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    csv_report = load_omop_csv(broken_dir, tmp_path / "csv.duckdb", progress=False)
    parquet = _to_parquet(broken_dir, tmp_path / "parquet", typed=False)
    report = load_omop_csv(parquet, tmp_path / "parquet.duckdb", progress=False)
    _assert_accounted(report)
    csv_found, found = _contents(tmp_path / "csv.duckdb"), _contents(tmp_path / "parquet.duckdb")
    for table in TABLES:
        assert found[table] == csv_found[table], table
    # the same rows quarantined for the same reasons; a Parquet row is numbered from 1
    assert found["quarantine"] == [
        (file.replace(".csv", ".parquet").lower(), line - 1, table, reason)
        for file, line, table, reason in csv_found["quarantine"]
    ]
    assert {k: (c.read, c.loaded, c.quarantined) for k, c in report.tables.items()} == {
        k: (c.read, c.loaded, c.quarantined) for k, c in csv_report.tables.items()
    }


def test_typed_parquet_in_a_zip_loads_the_same_values(broken_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    (broken_dir / "DRUG_EXPOSURE.csv").unlink()  # its corrupt rows cannot be typed
    load_omop_csv(broken_dir, tmp_path / "csv.duckdb", progress=False)
    parquet = _to_parquet(broken_dir, tmp_path / "typed", typed=True)
    with duckdb.connect() as con:  # the writer typed ids and dates
        types = dict(
            con.execute(
                "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet(?))",
                [str(parquet / "observation_period.parquet")],
            ).fetchall()
        )
    assert types["OBSERVATION_PERIOD_START_DATE"] == "DATE"
    assert types["PERSON_ID"] == "BIGINT"
    archive = _zip(parquet, tmp_path / "typed.zip", "")
    report = load_omop_csv(archive, tmp_path / "p.duckdb", progress=False)
    _assert_accounted(report)
    assert report.tables["person"].loaded == 20
    csv_found, found = _contents(tmp_path / "csv.duckdb"), _contents(tmp_path / "p.duckdb")
    assert found == csv_found


def test_a_file_that_is_no_zip_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "export.zip"
    bad.write_text("PERSON_ID\n1\n")
    result = CliRunner().invoke(app, ["etl", "omop-csv", str(bad), "--db", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "not a folder or a readable zip file" in result.output
    assert not (tmp_path / "x").exists()
