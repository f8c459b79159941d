"""The Synthea loader: every source row accounted for, mapping, routing, bad input, reruns."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
from typer.testing import CliRunner

from fedomop.cli import app
from omop_etl import synthea, synthea_persons, synthea_spec
from omop_etl.profiles import LOCAL_CODE_PREFIX
from omop_etl.schema import cdm_tables
from omop_etl.sources import EtlInputError
from omop_etl.synth import generate
from omop_etl.synthea import load_synthea, source_rows
from omop_etl.synthea_spec import EVENT_FILES, ID_BLOCK

EVENT_TABLES = {
    "condition_occurrence": "condition_occurrence_id",
    "drug_exposure": "drug_exposure_id",
    "measurement": "measurement_id",
    "observation": "observation_id",
    "procedure_occurrence": "procedure_occurrence_id",
}
FEDOMOP = str(Path(sys.executable).parent / "fedomop")
CDM_TABLES = (
    "person", "observation_period", "visit_occurrence", *EVENT_TABLES, "death",
)  # fmt: skip


def _landed(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """CDM rows per source file: person/visit by table, events by the file tag in their id."""
    landed = {
        "patients": con.execute("SELECT count(*) FROM person").fetchone()[0],
        "encounters": con.execute("SELECT count(*) FROM visit_occurrence").fetchone()[0],
    }
    union = " UNION ALL ".join(f"SELECT {col} AS id FROM {t}" for t, col in EVENT_TABLES.items())
    by_tag = dict(
        con.execute(f"SELECT id // {ID_BLOCK}, count(*) FROM ({union}) GROUP BY 1").fetchall()
    )
    for spec in EVENT_FILES:
        landed[spec.name] = by_tag.get(spec.tag, 0)
    return landed


def _quarantined(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    rows = con.execute(
        "SELECT source_file, count(*) FROM etl_quarantine GROUP BY 1"
    ).fetchall()  # fmt: skip
    return {name.removesuffix(".csv"): n for name, n in rows}


def _assert_accounted(src: Path, db: Path) -> dict[str, int]:
    """Source rows of each file == CDM rows from it + its quarantined rows."""
    con = duckdb.connect(str(db), read_only=True)
    landed, quarantined = _landed(con), _quarantined(con)
    con.close()
    for name, n in source_rows(src).items():
        assert n == landed[name] + quarantined.get(name, 0), (src.name, name)
    return quarantined


def test_synthetic_nodes_round_trip(
    synthea_node_dirs: list[Path], synthetic_node_dbs: list[Path]
) -> None:
    for src, db in zip(synthea_node_dirs, synthetic_node_dbs, strict=True):
        assert _assert_accounted(src, db) == {}
        con = duckdb.connect(str(db), read_only=True)
        persons, periods, deaths = con.execute(
            "SELECT (SELECT count(*) FROM person), (SELECT count(*) FROM observation_period), "
            "(SELECT count(*) FROM death)"
        ).fetchone()
        assert persons == periods == 2000
        assert deaths > 50
        outside = con.execute(
            """SELECT count(*) FROM condition_occurrence c JOIN observation_period p USING
               (person_id) WHERE c.condition_start_date NOT BETWEEN
               p.observation_period_start_date AND p.observation_period_end_date"""
        ).fetchone()[0]
        assert outside == 0
        era_rows, mapped_rows, persons_without_era = con.execute(
            """SELECT (SELECT sum(condition_occurrence_count) FROM condition_era),
                      (SELECT count(*) FROM condition_occurrence WHERE condition_concept_id <> 0),
                      (SELECT count(DISTINCT person_id) FROM condition_occurrence
                       WHERE person_id NOT IN (SELECT person_id FROM condition_era))"""
        ).fetchone()
        assert era_rows == mapped_rows and persons_without_era == 0
        classes = con.execute(
            "SELECT DISTINCT c.concept_class_id FROM drug_era d JOIN concept c "
            "ON c.concept_id = d.drug_concept_id"
        ).fetchall()
        assert classes == [("Ingredient",)]
        keys = con.execute(
            "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
            "WHERE constraint_type = 'PRIMARY KEY'"
        ).fetchall()
        declared = {t.name: list(t.primary_key) for t in cdm_tables().values() if t.primary_key}
        assert dict(keys) == declared  # added after the load, as OHDSI's DDL does
        indexes = con.execute("SELECT count(*) FROM duckdb_indexes()").fetchone()[0]
        assert indexes == sum(len(t.index_columns) for t in cdm_tables().values())
        storage = dict(
            con.execute(
                "SELECT column_name, list(DISTINCT compression ORDER BY compression) "
                "FROM pragma_storage_info('visit_occurrence') WHERE segment_type <> 'VALIDITY' "
                "AND column_name IN ('visit_source_value', 'provider_id') GROUP BY ALL"
            ).fetchall()
        )  # storage hints: random UUIDs plain, never-filled columns constant
        assert storage == {"visit_source_value": ["Uncompressed"], "provider_id": ["Constant"]}
        con.close()


def test_unmapped_codes_counted_and_kept_as_source(tmp_path: Path) -> None:
    src = generate(tmp_path / "rural", patients=800, seed=5, profile="rural_clinic")
    report = load_synthea(src, tmp_path / "rural.duckdb", progress=False)
    local = pl.read_csv(src / "medications.csv", infer_schema=False).filter(
        pl.col("CODE").str.starts_with(LOCAL_CODE_PREFIX)
    )
    assert local.height > 10
    con = duckdb.connect(str(tmp_path / "rural.duckdb"), read_only=True)
    zero = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE drug_source_value LIKE 'LOCAL-%') "
        "FROM drug_exposure WHERE drug_concept_id = 0"
    ).fetchone()
    assert zero == (local.height, local.height)
    assert report.table("drug_exposure").unmapped == local.height
    assert report.totals.unmapped == local.height
    celecoxib = con.execute(
        "SELECT DISTINCT drug_concept_id, drug_source_concept_id FROM drug_exposure "
        "WHERE drug_source_value = '213469'"
    ).fetchall()
    assert celecoxib == [(1118088, 1118088)]
    con.close()


def _routed(con: duckdb.DuckDBPyConnection, table: str, code: str) -> tuple[int, int, int]:
    """Rows of ``table`` (measurement, observation) with source code ``code``: how many, their
    concept, and the tag of the file they came from (``id // ID_BLOCK``)."""
    return con.execute(
        f"SELECT count(*), min({table}_concept_id), min({table}_id // ?) FROM {table} "
        f"WHERE {table}_source_value = ?",
        [ID_BLOCK, code],
    ).fetchone()


def test_rows_routed_by_the_domain_of_their_standard_concept(synthetic_node_dbs) -> None:
    con = duckdb.connect(str(synthetic_node_dbs[0]), read_only=True)
    history = _routed(con, "observation", "428251008")
    assert history[0] > 0 and history[1:] == (4323208, 3)  # conditions.csv -> observation
    spirometry = _routed(con, "measurement", "127783003")
    assert spirometry[0] > 0 and spirometry[1:] == (4133840, 6)  # procedures.csv -> measurement
    # rows routed by the second pass keep their visit, as rows of the first pass do
    with_visit = con.execute(
        "SELECT count(*) FROM measurement m JOIN visit_occurrence v USING (visit_occurrence_id) "
        "WHERE m.measurement_source_value = '127783003' AND v.person_id = m.person_id"
    ).fetchone()[0]
    assert with_visit == spirometry[0]
    in_wrong_table = con.execute(
        "SELECT count(*) FROM condition_occurrence WHERE condition_source_value = '428251008'"
    ).fetchone()[0]
    assert in_wrong_table == 0
    hb = con.execute(
        "SELECT count(*), avg(value_as_number) FROM measurement WHERE measurement_concept_id = "
        "3000963 AND unit_source_value = 'g/dL'"
    ).fetchone()
    assert hb[0] > 100 and 11 < hb[1] < 16
    con.close()


def _digest(db: Path) -> str:
    con = duckdb.connect(str(db), read_only=True)
    digest = hashlib.sha256()
    for table in (*CDM_TABLES, "etl_quarantine"):
        rows = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        digest.update(repr(rows).encode())
    con.close()
    return digest.hexdigest()


def test_same_input_same_database(tmp_path: Path, synthea_node_dirs: list[Path]) -> None:
    src = synthea_node_dirs[1]
    load_synthea(src, tmp_path / "a.duckdb", progress=False)
    load_synthea(src, tmp_path / "b.duckdb", progress=False)
    assert _digest(tmp_path / "a.duckdb") == _digest(tmp_path / "b.duckdb")


def _corrupt(folder: Path, name: str, row: int, **values: str | None) -> int:
    """Set columns of data row ``row`` of ``name``.csv; return its source line."""
    path = folder / f"{name}.csv"
    frame = pl.read_csv(path, infer_schema=False)
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == row).then(pl.lit(v)).otherwise(pl.col(c)).alias(c)
        for c, v in values.items()
    )
    frame.write_csv(path)
    return row + 2


@pytest.fixture
def small_node(tmp_path: Path) -> Path:
    return generate(tmp_path / "node", patients=300, seed=9, profile="urban_hospital")


def test_bad_rows_quarantined_with_file_line_and_reason(tmp_path: Path, small_node: Path) -> None:
    numeric = pl.read_csv(small_node / "observations.csv", infer_schema=False)
    numeric_row = numeric.with_row_index().filter(pl.col("TYPE") == "numeric")["index"][3]
    patients = pl.read_csv(small_node / "patients.csv", infer_schema=False)
    expected = {
        ("conditions.csv", _corrupt(small_node, "conditions", 5, START="yesterday")):
            "unparseable date",
        ("conditions.csv", _corrupt(small_node, "conditions", 6, START="2019-02-30")):
            "impossible date",
        ("conditions.csv", _corrupt(small_node, "conditions", 7, CODE=None)):
            "missing required field",
        ("conditions.csv", _corrupt(
            small_node, "conditions", 8, START="2019-05-01", STOP="2019-04-01")):
            "end before start",
        ("medications.csv", _corrupt(
            small_node, "medications", 2, PATIENT="00000000-0000-4000-8000-000000000000")):
            "unknown person",
        ("medications.csv", _corrupt(small_node, "medications", 3, DISPENSES="two")):
            "malformed number",
        ("observations.csv", _corrupt(small_node, "observations", numeric_row, VALUE="12,5x")):
            "malformed number",
        ("encounters.csv", _corrupt(
            small_node, "encounters", 4, START="2015-01-02T10:00:00Z",
            STOP="2015-01-01T10:00:00Z")):
            "end before start",
        ("patients.csv", _corrupt(small_node, "patients", 1, Id=patients["Id"][0])):
            "duplicate primary key",
    }  # fmt: skip
    report = load_synthea(small_node, tmp_path / "cdm.duckdb", progress=False)
    con = duckdb.connect(str(tmp_path / "cdm.duckdb"), read_only=True)
    rows = con.execute(
        "SELECT source_file, source_line, reason, raw FROM etl_quarantine"
    ).fetchall()  # fmt: skip
    got = {(f, line): reason for f, line, reason, _ in rows}
    # the duplicated patient's second row also orphans that patient's own events
    orphans = {k: v for k, v in got.items() if k not in expected}
    assert set(orphans.values()) <= {"unknown person"}
    assert {k: got.get(k) for k in expected} == expected
    raw = next(r for f, line, _, r in rows if (f, line) == ("conditions.csv", 7))
    assert '"START":"yesterday"' in raw.replace(" ", "")
    con.close()
    assert report.totals.quarantined == len(rows)
    assert sum(report.quarantine_by_reason().values()) == len(rows)
    _assert_accounted(small_node, tmp_path / "cdm.duckdb")


def test_missing_file_or_column_is_a_clear_error_and_keeps_the_old_db(
    tmp_path: Path, small_node: Path
) -> None:
    db = tmp_path / "cdm.duckdb"
    load_synthea(small_node, db, progress=False)
    before = hashlib.sha256(db.read_bytes()).hexdigest()

    no_column = shutil.copytree(small_node, tmp_path / "no_column")
    pl.read_csv(no_column / "procedures.csv", infer_schema=False).drop("CODE").write_csv(
        no_column / "procedures.csv"
    )
    with pytest.raises(EtlInputError, match=r"procedures\.csv: required column\(s\) CODE"):
        load_synthea(no_column, db, progress=False)

    ragged = shutil.copytree(small_node, tmp_path / "ragged")
    with (ragged / "observations.csv").open("a") as handle:
        handle.write("2019-01-01T00:00:00Z,a,b,c,d,e,f,g,h,i,j,k\n")
    with pytest.raises(EtlInputError, match=r"observations\.csv: not a readable CSV file"):
        load_synthea(ragged, db, progress=False)

    no_file = shutil.copytree(small_node, tmp_path / "no_file")
    (no_file / "allergies.csv").unlink()
    result = CliRunner().invoke(app, ["etl", "synthea", str(no_file), "--db", str(db)])
    assert result.exit_code == 1
    assert "allergies.csv is missing" in result.output
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_cli_generates_and_loads(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "node"
    result = runner.invoke(
        app,
        ["etl", "synth", "--patients", "200", "--seed", "2", "--profile", "paediatric",
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "patients.csv" in result.output
    result = runner.invoke(
        app, ["etl", "synthea", str(out), "--db", str(tmp_path / "p.duckdb"), "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "person" in result.output and "200" in result.output
    bad = runner.invoke(app, ["etl", "synth", "--patients", "5", "--profile", "x", "--out", "o"])
    assert bad.exit_code == 1 and "unknown profile" in bad.output


def test_parts_and_workers_give_the_same_database(
    tmp_path: Path, small_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files read in concurrent parts (a quoted line break before a split point included) give
    the database a one-part, one-worker load gives."""
    _corrupt(small_node, "observations", 3, DESCRIPTION="two\nlines")
    _corrupt(small_node, "encounters", 3, DESCRIPTION="two\nlines")
    load_synthea(small_node, tmp_path / "whole.duckdb", progress=False, workers=1)
    monkeypatch.setattr(synthea, "SPLIT_ROWS", 1_500)
    report = load_synthea(small_node, tmp_path / "parts.duckdb", progress=False, workers=3)
    assert report.totals.quarantined == 0
    assert _digest(tmp_path / "parts.duckdb") == _digest(tmp_path / "whole.duckdb")
    _assert_accounted(small_node, tmp_path / "parts.duckdb")


def test_visits_looked_up_by_id_when_hashes_collide(
    tmp_path: Path, small_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_synthea(small_node, tmp_path / "hash.duckdb", progress=False)
    monkeypatch.setattr(synthea_persons, "lookup_key", lambda visits, distinct_hashes: "")
    load_synthea(small_node, tmp_path / "id.duckdb", progress=False)
    assert _digest(tmp_path / "id.duckdb") == _digest(tmp_path / "hash.duckdb")


def test_repeated_encounter_id_quarantined_and_events_keep_the_first_visit(
    tmp_path: Path, small_node: Path
) -> None:
    encounters = pl.read_csv(small_node / "encounters.csv", infer_schema=False)
    first, later = encounters["Id"][3], encounters["Id"][10]
    line = _corrupt(small_node, "encounters", 10, Id=first, PATIENT=encounters["PATIENT"][3])
    load_synthea(small_node, tmp_path / "cdm.duckdb", progress=False)
    con = duckdb.connect(str(tmp_path / "cdm.duckdb"), read_only=True)
    assert con.execute(
        "SELECT source_file, source_line, reason FROM etl_quarantine"
    ).fetchall() == [("encounters.csv", line, "duplicate primary key")]
    visits = con.execute(
        "SELECT visit_occurrence_id FROM visit_occurrence WHERE visit_source_value = ?", [first]
    ).fetchall()
    assert visits == [(3 + 2 - 1,)]  # the first line's visit
    measurements = pl.read_csv(small_node / "observations.csv", infer_schema=False)
    expected = {
        uuid: measurements.filter(pl.col("ENCOUNTER") == uuid).height for uuid in (first, later)
    }
    got = con.execute(
        "SELECT count(*) FILTER (WHERE visit_occurrence_id = 4), "
        "count(*) FILTER (WHERE visit_occurrence_id = 11) FROM measurement"
    ).fetchone()
    assert expected[first] > 0 and expected[later] > 0
    assert got == (expected[first], 0)  # the later visit's own events lost their visit
    con.close()
    _assert_accounted(small_node, tmp_path / "cdm.duckdb")


def test_quarantine_names_the_line_a_row_starts_on_after_a_field_spanning_lines(
    tmp_path: Path, small_node: Path
) -> None:
    _corrupt(small_node, "conditions", 2, DESCRIPTION="three\nphysical\nlines")
    _corrupt(small_node, "conditions", 6, START="yesterday")
    text = (small_node / "conditions.csv").read_text().splitlines()
    line = next(i for i, row in enumerate(text, 1) if "yesterday" in row)
    assert line == 6 + 2 + 2  # two line breaks inside a quoted field above it
    load_synthea(small_node, tmp_path / "cdm.duckdb", progress=False)
    con = duckdb.connect(str(tmp_path / "cdm.duckdb"), read_only=True)
    assert con.execute(
        "SELECT source_file, source_line, reason FROM etl_quarantine"
    ).fetchall() == [("conditions.csv", line, "unparseable date")]
    con.close()


def test_the_load_maps_never_clash_with_the_cdm_file_name(tmp_path: Path, small_node: Path) -> None:
    """The load attaches an in-memory database for its maps; DuckDB names the build file's own
    database after the file, so the maps' name is one no file can have."""
    assert "/" in synthea_spec.MAPS
    report = load_synthea(small_node, tmp_path / "maps.duckdb", progress=False)
    assert report.totals.quarantined == 0 and report.table("person").loaded == 300


def test_an_event_without_encounter_loads_without_a_visit(tmp_path: Path, small_node: Path) -> None:
    """ENCOUNTER is optional in an event file: the row loads, with no visit."""
    line = _corrupt(small_node, "observations", 4, ENCOUNTER=None)
    load_synthea(small_node, tmp_path / "cdm.duckdb", progress=False)
    con = duckdb.connect(str(tmp_path / "cdm.duckdb"), read_only=True)
    row = con.execute(
        "SELECT visit_occurrence_id FROM measurement WHERE measurement_id = ?",
        [5 * ID_BLOCK + line],
    ).fetchall()
    con.close()
    assert row == [(None,)]


def _cut(folder: Path, name: str, line: int, fields: int) -> None:
    """Keep only the first ``fields`` fields of source line ``line`` of ``name``.csv."""
    path = folder / f"{name}.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = ",".join(lines[line - 1].split(",")[:fields]) + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize("split_rows", [synthea.SPLIT_ROWS, 700])
def test_rows_with_too_few_fields_are_quarantined_and_later_rows_keep_their_lines(
    tmp_path: Path, small_node: Path, monkeypatch: pytest.MonkeyPatch, split_rows: int
) -> None:
    """A short row does not stop the load (DuckDB's parser would); it is quarantined with its
    line, every later row keeps its own line and id, in one part or in several."""
    later = _corrupt(small_node, "conditions", 9, START="yesterday")
    _cut(small_node, "conditions", 7, 3)  # START,STOP,PATIENT: no CODE and beyond
    _cut(small_node, "encounters", 5, 6)
    _cut(small_node, "observations", 1_600, 2)  # in a later part when files are split
    monkeypatch.setattr(synthea, "SPLIT_ROWS", split_rows)
    report = load_synthea(small_node, tmp_path / "cdm.duckdb", progress=False, workers=2)
    con = duckdb.connect(str(tmp_path / "cdm.duckdb"), read_only=True)
    rows = con.execute(
        "SELECT source_file, source_line, reason, raw->>'CODE' FROM etl_quarantine ORDER BY ALL"
    ).fetchall()
    next_condition = (
        con.execute(
            "SELECT count(*) FROM condition_occurrence WHERE condition_occurrence_id = ?",
            [3 * ID_BLOCK + 8],
        ).fetchone()[0]
        + con.execute(
            "SELECT count(*) FROM observation WHERE observation_id = ?", [3 * ID_BLOCK + 8]
        ).fetchone()[0]
    )
    con.close()
    assert rows == [
        ("conditions.csv", 7, "too few fields", None),
        ("conditions.csv", later, "unparseable date", rows[1][3]),
        ("encounters.csv", 5, "too few fields", None),
        ("observations.csv", 1_600, "too few fields", None),
    ]
    assert next_condition == 1  # line 8 still has id 3e10 + 8
    assert report.quarantine_by_reason() == {"too few fields": 3, "unparseable date": 1}
    _assert_accounted(small_node, tmp_path / "cdm.duckdb")


def test_cli_reports_rows_with_too_few_fields(tmp_path: Path, small_node: Path) -> None:
    _cut(small_node, "medications", 4, 5)
    result = CliRunner().invoke(
        app, ["etl", "synthea", str(small_node), "--db", str(tmp_path / "cdm.duckdb")]
    )
    assert result.exit_code == 0, result.output
    assert "quarantined: 1 rows, too few fields" in result.output


@pytest.fixture(scope="module")
def loaded_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Synthea export made by ``fedomop etl synth`` (large enough that its load takes
    seconds) and the CDM file a first ``fedomop etl synthea`` built from it."""
    root = tmp_path_factory.mktemp("interrupted")
    src, db = root / "src", root / "cdm.duckdb"
    for args in (
        ["etl", "synth", "--patients", "3000", "--seed", "5", "--profile", "urban_hospital",
         "--out", str(src)],
        ["etl", "synthea", str(src), "--db", str(db)],
    ):  # fmt: skip
        subprocess.run([FEDOMOP, *args], check=True, capture_output=True, timeout=300)
    return src, db


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "name"), [(signal.SIGINT, 130, "SIGINT"),
                                                      (signal.SIGTERM, 143, "SIGTERM")])  # fmt: skip
def test_an_interrupted_load_keeps_the_previous_file_and_leaves_no_build_folder(
    loaded_export: tuple[Path, Path], signum: int, code: int, name: str
) -> None:
    """A signal mid-load (a real ``fedomop etl synthea`` process): one line on stderr, exit
    128 + signal, the previous CDM file byte for byte, the hidden build folder removed."""
    src, db = loaded_export
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    process = subprocess.Popen(
        [FEDOMOP, "etl", "synthea", str(src), "--db", str(db)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(db.parent.glob(f".{db.name}.build-*/{db.name}")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # into the table loads
    assert process.poll() is None, "load finished before it could be interrupted"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code
    assert stderr.strip().splitlines() == [f"interrupted by {name}; {db} left unchanged"]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["cdm.duckdb", "src"]
