"""CDM 5.4 schema from the packaged spec, the shipped vocabulary, atomic builds."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import duckdb
import pytest

from omop_etl.build import atomic_build
from omop_etl.cdm import connect
from omop_etl.load import upgrade_gaps
from omop_etl.schema import SPEC_DIR, cdm_tables, create_cdm_schema, vocabulary_tables
from omop_etl.vocab import default_vocabulary_dir, derive_vocabulary, load_vocabulary
from tests.conftest import GIBLEED_CSV, SHARED


@pytest.fixture(scope="module")
def schema_con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    create_cdm_schema(con)
    return con


def _spec_rows() -> list[dict[str, str]]:
    with (SPEC_DIR / "OMOP_CDMv5.4_Field_Level.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_packaged_spec_is_the_shared_one(shared_dir: Path) -> None:
    for name in ("OMOP_CDMv5.4_Field_Level.csv", "OMOP_CDMv5.4_Table_Level.csv"):
        assert (SPEC_DIR / name).read_bytes() == (
            shared_dir / "data" / "omop_cdm_5.4" / name
        ).read_bytes()


def test_every_spec_field_is_a_column_with_its_type(schema_con) -> None:
    rows = _spec_rows()
    columns = {
        (t, c): (ty, nullable)
        for t, c, ty, nullable in schema_con.execute(
            "SELECT table_name, column_name, data_type, is_nullable "
            "FROM information_schema.columns WHERE table_schema = 'main'"
        ).fetchall()
    }
    assert len(cdm_tables()) == 39
    assert len([k for k in columns if k[0] != "etl_quarantine"]) == len(rows) == 432
    expected = {"float": "DOUBLE", "date": "DATE", "datetime": "TIMESTAMP"}
    for row in rows:
        table, field = row["cdmTableName"], row["cdmFieldName"].strip('"')
        sql_type, nullable = columns[(table, field)]
        kind = row["cdmDatatype"].lower()
        if kind == "integer":
            assert sql_type == ("BIGINT" if "_id" in field else "INTEGER"), (table, field)
        else:
            assert sql_type == expected.get(kind, "VARCHAR"), (table, field)
        assert (nullable == "NO") == (row["isRequired"] == "Yes"), (table, field)


def test_primary_keys_and_indexes(schema_con) -> None:
    pks = dict(
        schema_con.execute(
            "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
            "WHERE constraint_type = 'PRIMARY KEY'"
        ).fetchall()
    )
    spec_pks = {r["cdmTableName"]: [r["cdmFieldName"]] for r in _spec_rows() if r["isPrimaryKey"] == "Yes"}  # fmt: skip
    assert pks == spec_pks
    assert len(pks) == 28
    schema_con.execute("INSERT INTO person (person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id) VALUES (1, 0, 1970, 0, 0)")  # fmt: skip
    with pytest.raises(duckdb.ConstraintException):
        schema_con.execute("INSERT INTO person (person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id) VALUES (1, 0, 1971, 0, 0)")  # fmt: skip
    indexed = set(
        schema_con.execute("SELECT table_name, expressions FROM duckdb_indexes()").fetchall()
    )
    for table, column in [
        ("condition_occurrence", "person_id"),
        ("condition_occurrence", "condition_concept_id"),
        ("drug_exposure", "drug_concept_id"),
        ("measurement", "person_id"),
        ("concept_ancestor", "ancestor_concept_id"),
    ]:
        assert (table, f"[{column}]") in indexed


def test_53_to_54_upgrade_loses_no_column() -> None:
    assert upgrade_gaps() == {}


def test_shipped_vocabulary_is_small_and_loads() -> None:
    folder = default_vocabulary_dir()
    files = sorted(p.name for p in folder.glob("*.csv"))
    assert files == sorted(f"{t.upper()}.csv" for t in vocabulary_tables())
    assert sum(p.stat().st_size for p in folder.iterdir()) < 3_000_000
    con = duckdb.connect()
    create_cdm_schema(con, indexes=False)
    load_vocabulary(con, folder)
    counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in vocabulary_tables()}  # fmt: skip
    assert counts["concept"] == 444 + 14
    assert counts["concept_ancestor"] == 65_708 + 2  # + ADDED_ANCESTORS
    assert counts["domain"] == 45 and counts["relationship"] == 480
    assert con.execute("SELECT count(*) FROM etl_quarantine").fetchone()[0] == 0
    named = dict(con.execute("SELECT concept_id, concept_name FROM concept WHERE concept_id IN (32817, 8507, 8532, 756265)").fetchall())  # fmt: skip
    assert named == {32817: "EHR", 8507: "MALE", 8532: "FEMALE", 756265: "OMOP CDM Version 5.4.0"}  # fmt: skip
    # every standard concept maps to itself, as in any Athena export
    assert (
        con.execute(
            "SELECT count(*) FROM concept c WHERE standard_concept = 'S' AND NOT EXISTS (SELECT 1 "
            "FROM concept_relationship r WHERE r.concept_id_1 = c.concept_id "
            "AND r.concept_id_2 = c.concept_id AND r.relationship_id = 'Maps to')"
        ).fetchone()[0]
        == 0
    )
    # GiBleed's ICD10CM code K92.2 maps to its standard SNOMED concept
    assert con.execute(
        "SELECT concept_id_2 FROM concept_relationship WHERE concept_id_1 = 35208414 "
        "AND relationship_id = 'Maps to'"
    ).fetchall() == [(192671,)]


def test_derivation_reproduces_the_shipped_vocabulary(shared_dir: Path, tmp_path: Path) -> None:
    derive_vocabulary(GIBLEED_CSV, tmp_path)
    for shipped in default_vocabulary_dir().glob("*.csv"):
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_build_swaps_on_success_and_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "cdm.duckdb"
    with atomic_build(target) as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
    before = _digest(target)
    with pytest.raises(RuntimeError, match="injected"), atomic_build(target) as con:
        con.execute("CREATE TABLE u AS SELECT range AS x FROM range(1000)")
        raise RuntimeError("injected")
    assert _digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdm.duckdb"]
    with atomic_build(target, copy_existing=True) as con:
        con.execute("INSERT INTO t VALUES (2)")
    with connect(target) as con:
        assert con.execute("SELECT sum(x) FROM t").fetchone()[0] == 3


def test_connect_read_only_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.duckdb"):
        connect(tmp_path / "missing.duckdb")
    assert SHARED.is_dir()


def test_vocab_command_reads_athena_as_shipped(tmp_path: Path) -> None:
    """Tab-separated, quotes are ordinary characters, YYYYMMDD dates; reloading replaces."""
    from typer.testing import CliRunner

    from fedomop.cli import app

    athena = tmp_path / "athena"
    athena.mkdir()
    concept = (
        "concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\t"
        "standard_concept\tconcept_code\tvalid_start_date\tvalid_end_date\tinvalid_reason\n"
        '4\t"Quoted" name, with comma\tCondition\tSNOMED\tDisorder\tS\t1\t20020131\t20991231\t\n'
        "5\tBad date\tCondition\tSNOMED\tDisorder\tS\t2\t20021331\t20991231\t\n"
    )
    (athena / "CONCEPT.csv").write_text(concept)
    db = tmp_path / "v.duckdb"
    result = CliRunner().invoke(app, ["etl", "vocab", str(athena), "--db", str(db)])
    assert result.exit_code == 0, result.output
    with connect(db) as con:
        rows = con.execute("SELECT concept_id, concept_name, valid_start_date FROM concept").fetchall()  # fmt: skip
        bad = con.execute("SELECT source_line, reason FROM etl_quarantine").fetchall()
    assert [(i, n, str(d)) for i, n, d in rows] == [(4, '"Quoted" name, with comma', "2002-01-31")]
    assert bad == [(3, "impossible date")]
    result = CliRunner().invoke(
        app, ["etl", "vocab", str(default_vocabulary_dir()), "--db", str(db)]
    )
    assert result.exit_code == 0, result.output
    with connect(db) as con:
        assert con.execute("SELECT count(*) FROM concept").fetchone()[0] == 458
        assert con.execute("SELECT count(*) FROM etl_quarantine").fetchone()[0] == 0
