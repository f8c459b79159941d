"""GiBleed (OMOP CDM 5.3 CSV) into CDM 5.4 DuckDB: every row accounted for, quirks recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from fedomop.cli import app
from omop_etl.cdm import connect
from omop_etl.load import load_omop_csv
from omop_etl.schema import cdm_tables
from omop_etl.sql import quote
from tests.conftest import GIBLEED_CSV

# The README's quirks: the rows that cannot enter a 5.4 CDM, and why (orphan periods) ...
EXPECTED_QUARANTINE = {("observation_period", "unknown person"): 2_649}
# ... and the distinct records whose source reused an id: loaded under new ids, logged.
EXPECTED_REKEYED = {"drug_exposure": 4_384, "measurement": 2_183, "observation": 6}


@pytest.fixture
def cdm_con(gibleed_db: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the GiBleed CDM file the session loaded."""
    with connect(gibleed_db) as con:
        yield con


def _csv_rows() -> dict[str, int]:
    con = duckdb.connect()
    return {
        p.stem.lower(): con.execute(
            "SELECT count(*) FROM read_csv(?, all_varchar = true, header = true)", [str(p)]
        ).fetchone()[0]
        for p in sorted(GIBLEED_CSV.glob("*.csv"))
    }


def _table_rows(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return {t: con.execute(f"SELECT count(*) FROM {quote(t)}").fetchone()[0] for t in cdm_tables()}


def test_person_count(cdm_con: duckdb.DuckDBPyConnection) -> None:
    assert cdm_con.execute("SELECT count(*) FROM person").fetchone()[0] == 2_694
    assert cdm_con.execute("SELECT count(*) FROM observation_period").fetchone()[0] == 2_694


def test_every_csv_row_is_loaded_or_quarantined(cdm_con: duckdb.DuckDBPyConnection) -> None:
    csv_rows = _csv_rows()
    assert len(csv_rows) == 37
    loaded = _table_rows(cdm_con)
    quarantined = dict(
        cdm_con.execute("SELECT target_table, count(*) FROM etl_quarantine GROUP BY 1").fetchall()
    )
    for table, n in csv_rows.items():
        assert loaded.get(table, 0) + quarantined.get(table, 0) == n, table
    assert loaded["drug_exposure"] == 67_707
    assert loaded["condition_occurrence"] == 65_332


def test_quarantine_reasons_match_the_readme_quirks(cdm_con: duckdb.DuckDBPyConnection) -> None:
    counts = cdm_con.execute(
        "SELECT target_table, reason, count(*) FROM etl_quarantine GROUP BY ALL"
    ).fetchall()
    orphan = cdm_con.execute(
        "SELECT source_file, source_line, raw->>'PERSON_ID' FROM etl_quarantine "
        "WHERE target_table = 'observation_period' ORDER BY source_line LIMIT 1"
    ).fetchone()
    is_person = cdm_con.execute(
        "SELECT count(*) FROM person WHERE person_id = ?", [int(orphan[2])]
    ).fetchone()[0]
    assert {(t, r): n for t, r, n in counts} == EXPECTED_QUARANTINE
    assert orphan[0] == "OBSERVATION_PERIOD.csv" and orphan[1] >= 2 and is_person == 0


def test_duplicates_keep_the_first_row_under_the_source_id(
    cdm_con: duckdb.DuckDBPyConnection,
) -> None:
    """The first row of a reused id keeps it; later rows get new ids, logged in etl_rekeyed."""
    cdm_con.execute(
        "CREATE TEMP TABLE src AS SELECT row_number() OVER () + 1 AS line, * "
        "FROM read_csv(?, all_varchar = true)",
        [str(GIBLEED_CSV / "OBSERVATION.csv")],
    )
    mismatches = cdm_con.execute(
        """SELECT count(*) FROM (
             SELECT observation_id, arg_min(observation_concept_id, line) AS first_concept,
                    arg_min(observation_date, line) AS first_date
             FROM src GROUP BY 1 HAVING count(*) > 1) d
           JOIN observation o ON o.observation_id = CAST(d.observation_id AS BIGINT)
           WHERE o.observation_concept_id <> CAST(d.first_concept AS BIGINT)
              OR o.observation_date <> CAST(d.first_date AS DATE)"""
    ).fetchone()[0]
    rekeyed = dict(
        cdm_con.execute("SELECT target_table, count(*) FROM etl_rekeyed GROUP BY 1").fetchall()
    )
    moved = cdm_con.execute(
        """SELECT count(*) FROM etl_rekeyed r JOIN src s ON s.line = r.source_line
           JOIN observation o ON o.observation_id = r.new_id
           WHERE r.target_table = 'observation'
             AND o.observation_concept_id = CAST(s.observation_concept_id AS BIGINT)
             AND o.person_id = CAST(s.person_id AS BIGINT)"""
    ).fetchone()[0]
    assert mismatches == 0
    assert rekeyed == EXPECTED_REKEYED
    assert moved == 6


def test_dangling_visit_ids_stay_for_the_quality_checks(cdm_con: duckdb.DuckDBPyConnection) -> None:
    dangling = cdm_con.execute(
        "SELECT count(*) FROM condition_occurrence c WHERE visit_occurrence_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM visit_occurrence v "
        "WHERE v.visit_occurrence_id = c.visit_occurrence_id)"
    ).fetchone()[0]
    assert dangling == 64_717


def test_53_upgraded_to_54(cdm_con: duckdb.DuckDBPyConnection) -> None:
    source = cdm_con.execute(
        "SELECT cdm_version, cdm_version_concept_id, cdm_holder FROM cdm_source"
    ).fetchall()
    admitted = cdm_con.execute(
        "SELECT count(admitted_from_concept_id), count(discharged_to_concept_id) "
        "FROM visit_occurrence"
    ).fetchone()
    types = dict(
        cdm_con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'drug_exposure'"
        ).fetchall()
    )
    assert source == [("5.4", 756265, "OHDSI Community")]
    assert admitted == (1_037, 1_037)  # 5.3 admitting_source_* / discharge_to_* renamed
    assert types["drug_exposure_start_date"] == "DATE"
    assert types["drug_exposure_start_datetime"] == "TIMESTAMP"


def _contents(path: Path) -> dict[str, list[tuple]]:
    with connect(path) as con:
        tables = [*cdm_tables(), "etl_quarantine"]
        return {t: con.execute(f"SELECT * FROM {quote(t)}").fetchall() for t in tables}


@pytest.mark.slow
def test_cli_rerun_gives_identical_tables(gibleed_db: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.duckdb"
    result = CliRunner().invoke(app, ["etl", "omop-csv", str(GIBLEED_CSV), "--db", str(again)])
    assert result.exit_code == 0, result.output
    assert "2,649 rows, unknown person" in result.output
    assert "duplicate primary key" not in result.output
    assert _contents(again) == _contents(gibleed_db)


def test_54_export_lower_case_any_column_order_round_trips(
    gibleed_db: Path, tmp_path: Path
) -> None:
    """A 5.4 export with lower-case file names and reversed columns loads back unchanged."""
    src = tmp_path / "cdm54"
    src.mkdir()
    tables = ["person", "observation_period", "visit_occurrence", "observation", "cdm_source"]
    with connect(gibleed_db) as con:
        for table in tables:
            columns = ", ".join(quote(c) for c in reversed(cdm_tables()[table].columns))
            con.execute(
                f"COPY (SELECT {columns} FROM {quote(table)}) TO '{src / (table + '.csv')}' "
                "(HEADER, DELIMITER ',')"
            )
        expected = {t: con.execute(f"SELECT * FROM {quote(t)}").fetchall() for t in tables}
    report = load_omop_csv(src, tmp_path / "rt.duckdb", progress=False)
    assert report.totals.quarantined == 0
    assert report.tables["observation"].loaded == 1_477
    with connect(tmp_path / "rt.duckdb") as con:
        for table in tables:
            assert con.execute(f"SELECT * FROM {quote(table)}").fetchall() == expected[table]
        # vocabulary not in the folder: taken from the shipped one
        assert con.execute("SELECT count(*) FROM concept").fetchone()[0] == 458


@pytest.mark.slow
def test_quarantine_duplicates_option_drops_reused_ids(tmp_path: Path) -> None:
    """With rekeying off, rows reusing an earlier id go to the quarantine, counted per table."""
    db = tmp_path / "strict.duckdb"
    report = load_omop_csv(GIBLEED_CSV, db, progress=False, rekey_duplicates=False)
    assert report.quarantine == {
        **EXPECTED_QUARANTINE,
        **{(t, "duplicate primary key"): n for t, n in EXPECTED_REKEYED.items()},
    }
    with connect(db) as con:
        loaded = _table_rows(con)
    assert (loaded["drug_exposure"], loaded["measurement"], loaded["observation"]) == (
        67_707 - 4_384,
        44_053 - 2_183,
        1_477 - 6,
    )
