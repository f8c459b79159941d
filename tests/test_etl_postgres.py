"""``etl postgres`` against a real PostgreSQL server holding GiBleed (loaded by COPY): the result
equals ``etl omop-csv`` of the same CSVs, an incremental load equals a full one, and every bad
input stops with a clear message, a non-zero exit and the previous file intact."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from fedomop.cli import app
from omop_etl.postgres import check_dsn
from omop_etl.postgres_load import load_postgres
from omop_etl.schema import cdm_tables
from omop_etl.sources import EtlInputError
from omop_etl.sql import quote
from omop_etl.vocab import default_vocabulary_dir, replace_vocabulary
from tests.conftest import REPO
from tests.pg_server import (
    READER,
    READER_PASSWORD,
    PgServer,
    counters,
    reader_password,
    wait_for_counters,
)

pytestmark = pytest.mark.slow

# A small CDM cut from GiBleed: 120 persons and their events, a few orphan observation periods
# (quarantined as "unknown person") and the GiBleed vocabulary in a schema of its own.
MINI_SQL = """
DROP SCHEMA IF EXISTS {s} CASCADE; CREATE SCHEMA {s};
CREATE TABLE {s}.person AS SELECT * FROM cdm.person WHERE person_id IN
    (SELECT person_id FROM cdm.person ORDER BY person_id LIMIT 120);
CREATE TABLE {s}.observation_period AS SELECT * FROM cdm.observation_period
    WHERE person_id IN (SELECT person_id FROM {s}.person) OR observation_period_id % 997 = 0;
CREATE TABLE {s}.drug_exposure AS SELECT * FROM cdm.drug_exposure
    WHERE person_id IN (SELECT person_id FROM {s}.person);
CREATE TABLE {s}.measurement AS SELECT * FROM cdm.measurement
    WHERE person_id IN (SELECT person_id FROM {s}.person);
CREATE TABLE {s}.condition_occurrence AS SELECT * FROM cdm.condition_occurrence
    WHERE person_id IN (SELECT person_id FROM {s}.person);
CREATE TABLE {s}.cdm_source AS SELECT * FROM cdm.cdm_source;
"""
VOCAB_SQL = "DROP SCHEMA IF EXISTS vocab CASCADE; CREATE SCHEMA vocab;" + "".join(
    f"CREATE TABLE vocab.{t} AS SELECT * FROM cdm.{t};"
    for t in ("concept", "vocabulary", "domain", "concept_class", "concept_relationship",
              "relationship", "concept_synonym", "concept_ancestor", "drug_strength")
)  # fmt: skip


def _mini(server: PgServer, schema: str) -> str:
    server.execute(MINI_SQL.format(s=schema))
    server.create_reader([schema])
    return schema


@pytest.fixture(scope="module")
def pg(gibleed_pg: PgServer) -> PgServer:
    """GiBleed in ``cdm``, a small cut of it in ``mini`` and the vocabulary in ``vocab``."""
    gibleed_pg.execute(VOCAB_SQL)
    _mini(gibleed_pg, "mini")
    gibleed_pg.create_reader(["vocab"])
    return gibleed_pg


@pytest.fixture(scope="module")
def pg_gibleed_db(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GiBleed loaded from PostgreSQL schema ``cdm`` by ``load_postgres``."""
    db = tmp_path_factory.mktemp("pg") / "gibleed_pg.duckdb"
    with reader_password():
        load_postgres(pg.dsn(), "cdm", db, progress=False)
    return db


@pytest.fixture(scope="module")
def mini_db(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good load of ``mini``: the previous file every bad input must leave intact."""
    db = tmp_path_factory.mktemp("mini") / "mini.duckdb"
    with reader_password():
        load_postgres(pg.dsn(), "mini", db, vocab_schema="vocab", progress=False)
    return db


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def _differences(a: Path, b: Path, tables: list[str]) -> dict[str, tuple[int, int]]:
    """Per table, the rows only in ``a`` and only in ``b`` (as multisets)."""
    out = {}
    with duckdb.connect(str(a), read_only=True) as con:
        con.execute(f"ATTACH '{b}' AS other (READ_ONLY)")
        for t in tables:
            left, right = f"main.{quote(t)}", f"other.{quote(t)}"
            only_a = con.execute(
                f"SELECT count(*) FROM (FROM {left} EXCEPT ALL FROM {right})"
            ).fetchone()[0]
            only_b = con.execute(
                f"SELECT count(*) FROM (FROM {right} EXCEPT ALL FROM {left})"
            ).fetchone()[0]
            if only_a or only_b:
                out[t] = (only_a, only_b)
    return out


# --- the honest path -------------------------------------------------------------------------


def test_postgres_equals_omop_csv_table_by_table(gibleed_db: Path, pg_gibleed_db: Path) -> None:
    tables = list(cdm_tables())
    assert _differences(gibleed_db, pg_gibleed_db, tables) == {}
    count = "SELECT count(*) FROM {}"
    for t in ("person", "observation_period", "drug_exposure", "measurement", "concept"):
        n = _rows(pg_gibleed_db, count.format(t))[0][0]
        assert n == _rows(gibleed_db, count.format(t))[0][0] > 0
    assert _rows(pg_gibleed_db, count.format("drug_exposure"))[0][0] == 67_707
    # The same rows quarantined for the same reasons; a database row's line is its position
    # in the table (from 1), a CSV row's its line in the file (header = line 1).
    quarantine = (
        "SELECT target_table, reason, source_line - {}, raw->>'{}' FROM etl_quarantine ORDER BY ALL"
    )
    csv_rows = _rows(gibleed_db, quarantine.format(1, "PERSON_ID"))
    pg_rows = _rows(pg_gibleed_db, quarantine.format(0, "person_id"))
    assert pg_rows == csv_rows and len(pg_rows) == 2_649
    rekeyed = (
        "SELECT target_table, source_line - {}, source_id, new_id FROM etl_rekeyed ORDER BY ALL"
    )
    assert _rows(pg_gibleed_db, rekeyed.format(0)) == _rows(gibleed_db, rekeyed.format(1))
    assert len(_rows(pg_gibleed_db, rekeyed.format(0))) == 4_384 + 2_183 + 6
    assert _rows(pg_gibleed_db, "SELECT cdm_version FROM cdm_source") == [("5.4",)]


def test_cli_prints_summary_and_reads_password_from_service_and_password_files(
    pg: PgServer, tmp_path: Path
) -> None:
    service = tmp_path / "pg_service.conf"
    service.write_text(f"[node]\nhost=127.0.0.1\nport={pg.port}\ndbname=postgres\nuser={READER}\n")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg.port}:postgres:{READER}:{READER_PASSWORD}\n")
    passfile.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    env.update(PGSERVICEFILE=str(service), PGPASSFILE=str(passfile))
    db = tmp_path / "cdm.duckdb"
    command = [sys.executable, "-m", "fedomop.cli", "etl", "postgres", "--dsn", "service=node",
               "--cdm-schema", "mini", "--vocab-schema", "vocab", "--db", str(db)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "postgres postgres.mini -> cdm.duckdb" in result.stdout
    orphans = pg.execute(
        "SELECT count(*) FROM mini.observation_period WHERE person_id NOT IN "
        "(SELECT person_id FROM mini.person)"
    )[0][0]
    assert orphans > 0 and f"quarantined: {orphans} rows, unknown person" in result.stdout
    assert READER_PASSWORD not in result.stdout + result.stderr
    persons = _rows(db, "SELECT count(*) FROM person")[0][0]
    assert persons == 120
    vocab = _rows(db, "SELECT count(*) FROM concept")[0][0]
    assert vocab == pg.execute("SELECT count(*) FROM vocab.concept")[0][0]
    again = subprocess.run([*command, "--incremental"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "incremental: 0 tables rebuilt" in " ".join(again.stdout.split())


# --- incremental -----------------------------------------------------------------------------


def _load(pg: PgServer, schema: str, db: Path, **kwargs):
    with reader_password():
        return load_postgres(pg.dsn(), schema, db, vocab_schema="vocab", progress=False, **kwargs)


def _change(pg: PgServer, relation: str, sql: str) -> None:
    """Run ``sql`` and wait until PostgreSQL's counters of ``relation`` show it."""
    before = counters(pg, relation)
    pg.execute(sql)
    wait_for_counters(pg, relation, before)


def _all_tables(db: Path) -> list[str]:
    names = _rows(db, "SELECT table_name FROM duckdb_tables() ORDER BY 1")
    return [n for (n,) in names]


def test_incremental_rebuilds_only_changed_tables_and_equals_a_full_load(
    pg: PgServer, tmp_path: Path
) -> None:
    schema = _mini(pg, "inc")
    db, full = tmp_path / "inc.duckdb", tmp_path / "full.duckdb"
    _load(pg, schema, db)

    unchanged = _load(pg, schema, db, incremental=True)
    assert unchanged.tables == {}

    # A value changes, the row count does not: the counters see it.
    _change(pg, f"{schema}.measurement",
            f"UPDATE {schema}.measurement SET value_as_number = 42.5 "
            f"WHERE measurement_id = (SELECT min(measurement_id) FROM {schema}.measurement)")  # fmt: skip
    report = _load(pg, schema, db, incremental=True)
    assert set(report.tables) == {"measurement"}
    _load(pg, schema, full)
    assert _all_tables(db) == _all_tables(full)
    assert _differences(db, full, _all_tables(db)) == {}
    assert _rows(db, "SELECT count(*) FROM measurement WHERE value_as_number = 42.5")[0][0] == 1

    # A person leaves: every table checked against persons is rebuilt; their rows quarantined.
    _change(pg, f"{schema}.person",
            f"DELETE FROM {schema}.person WHERE person_id = (SELECT min(person_id) FROM "
            f"{schema}.person)")  # fmt: skip
    _change(pg, f"{schema}.drug_exposure",
            f"INSERT INTO {schema}.drug_exposure SELECT * FROM cdm.drug_exposure "
            f"WHERE person_id = (SELECT max(person_id) FROM {schema}.person)")  # fmt: skip
    report = _load(pg, schema, db, incremental=True)
    assert {"person", "drug_exposure", "observation_period", "measurement"} <= set(report.tables)
    assert "concept" not in report.tables
    _load(pg, schema, full)
    assert _differences(db, full, _all_tables(db)) == {}
    orphans = _rows(db, "SELECT count(*) FROM etl_quarantine WHERE reason = 'unknown person'")
    assert orphans[0][0] > 2

    # TRUNCATE counts no deleted rows; the table's new file shows it.
    pg.execute(f"TRUNCATE {schema}.condition_occurrence")
    report = _load(pg, schema, db, incremental=True)
    assert set(report.tables) == {"condition_occurrence"}
    assert _rows(db, "SELECT count(*) FROM condition_occurrence") == [(0,)]
    _load(pg, schema, full)
    assert _differences(db, full, _all_tables(db)) == {}


def test_incremental_without_previous_load_is_a_full_load(pg: PgServer, tmp_path: Path) -> None:
    report = _load(pg, "mini", tmp_path / "new.duckdb", incremental=True)
    assert "incremental: full load (no previous file new.duckdb)" in report.notes
    assert report.tables["person"].loaded == 120


@pytest.mark.parametrize("derive_only", [False, True], ids=["athena", "derive-ancestors"])
def test_incremental_after_a_vocabulary_replacement_is_a_full_load(
    pg: PgServer, tmp_path: Path, derive_only: bool
) -> None:
    """``etl vocab`` (a new vocabulary, or only concept_ancestor rebuilt) changes the file
    behind the markers' back: they are dropped with it."""
    db = tmp_path / "node.duckdb"
    _load(pg, "mini", db)
    replace_vocabulary(
        db, None if derive_only else default_vocabulary_dir(), derive_ancestors=derive_only
    )
    report = _load(pg, "mini", db, incremental=True)
    assert "incremental: full load (node.duckdb holds no markers of a PostgreSQL load)" in (
        report.notes
    )
    vocab = pg.execute("SELECT count(*) FROM vocab.concept")[0][0]
    assert _rows(db, "SELECT count(*) FROM concept") == [(vocab,)]


# --- bad input: clear message, non-zero exit, previous file intact ------------------------------


def _invoke_bad(mini_db: Path, tmp_path: Path, *args: str) -> str:
    db = tmp_path / "node.duckdb"
    db.write_bytes(mini_db.read_bytes())
    before = _digest(db)
    result = CliRunner().invoke(app, ["etl", "postgres", *args, "--db", str(db)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert _digest(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.duckdb"]
    assert "node.duckdb left unchanged" in result.output
    return " ".join(result.output.split())


def test_wrong_dsn(pg: PgServer, mini_db: Path, tmp_path: Path, reader_env: dict) -> None:
    closed = PgServer(pg.bin_dir, pg.root, 1, None).dsn()  # nothing listens on port 1
    message = _invoke_bad(mini_db, tmp_path, "--dsn", closed, "--cdm-schema", "mini")
    assert "cannot connect to PostgreSQL" in message and "Connection refused" in message
    os.environ["PGPASSWORD"] = "wrong"
    message = _invoke_bad(mini_db, tmp_path, "--dsn", pg.dsn(), "--cdm-schema", "mini")
    assert f'password authentication failed for user "{READER}"' in message


def test_password_in_dsn_is_refused(pg: PgServer, mini_db: Path, tmp_path: Path) -> None:
    with_password = pg.dsn(password=READER_PASSWORD)
    message = _invoke_bad(mini_db, tmp_path, "--dsn", with_password, "--cdm-schema", "mini")
    assert "the DSN holds a password" in message and "PGPASSWORD" in message
    assert READER_PASSWORD not in message
    for dsn in (f"postgresql://{READER}:secret@127.0.0.1/db", "postgres://h/db?password=x"):
        with pytest.raises(EtlInputError, match="holds a password"):
            check_dsn(dsn)
    check_dsn(f"postgresql://{READER}@127.0.0.1:5432/db")  # no password: accepted


def test_wrong_schema(pg: PgServer, mini_db: Path, tmp_path: Path, reader_env: dict) -> None:
    message = _invoke_bad(mini_db, tmp_path, "--dsn", pg.dsn(), "--cdm-schema", "no_such")
    assert "schema 'no_such' not found in the PostgreSQL database" in message


@pytest.mark.parametrize(
    ("schema", "breakage", "expected"),
    [
        ("no_periods", "DROP TABLE {s}.observation_period",
         "required table no_periods.observation_period is missing"),
        ("no_grant", f"REVOKE SELECT ON {{s}}.measurement FROM {READER}",
         "this role may not read no_grant.measurement (no SELECT grant)"),
        ("bad_type", "ALTER TABLE {s}.drug_exposure ALTER COLUMN drug_concept_id TYPE date "
         "USING DATE '2020-01-01' + (drug_concept_id % 1000)",
         "bad_type.drug_exposure.drug_concept_id is date, but CDM 5.4 "
         "drug_exposure.drug_concept_id is integer"),
    ],
    ids=["missing-table", "table-not-readable", "column-of-wrong-type"],
)  # fmt: skip
def test_broken_schema(
    pg: PgServer, mini_db: Path, tmp_path: Path, reader_env: dict, schema: str, breakage: str,
    expected: str,
) -> None:  # fmt: skip
    _mini(pg, schema)
    pg.execute(breakage.format(s=schema))
    message = _invoke_bad(mini_db, tmp_path, "--dsn", pg.dsn(), "--cdm-schema", schema)
    assert expected in message


STALL_SQL = """
CREATE OR REPLACE FUNCTION public.fedomop_stall(id bigint, at bigint) RETURNS boolean
LANGUAGE plpgsql AS $$ BEGIN IF id = at THEN PERFORM pg_sleep(300); END IF; RETURN true; END $$;
DROP SCHEMA IF EXISTS stall CASCADE; CREATE SCHEMA stall;
CREATE VIEW stall.person AS SELECT * FROM mini.person;
CREATE VIEW stall.observation_period AS SELECT * FROM mini.observation_period;
CREATE VIEW stall.measurement AS SELECT m.* FROM mini.measurement m
    WHERE public.fedomop_stall(m.measurement_id,
        (SELECT measurement_id FROM mini.measurement OFFSET 300 LIMIT 1));
"""


@pytest.mark.parametrize(
    ("schema", "waiting"),
    [
        # Before the copy of measurement starts: the loader waits for a lock on it.
        ("mini", "wait_event_type = 'Lock'"),
        # In the middle of it: the server has sent 300 rows and sleeps before the next one.
        ("stall", "wait_event = 'PgSleep'"),
    ],
    ids=["between-tables", "mid-copy"],
)
def test_connection_dropped_mid_load(
    pg: PgServer, mini_db: Path, tmp_path: Path, schema: str, waiting: str
) -> None:
    """The server ends the loader's connection (pg_terminate_backend) after person and other
    tables were copied, while it reads measurement: exit 1, the file as it was."""
    pg.execute(STALL_SQL)
    pg.create_reader(["stall"])
    db = tmp_path / "node.duckdb"
    db.write_bytes(mini_db.read_bytes())
    before = _digest(db)
    with pg.admin() as blocker, reader_password() as env:
        blocker.autocommit = False
        if schema == "mini":  # held until the end of the block
            blocker.execute("LOCK TABLE mini.measurement IN ACCESS EXCLUSIVE MODE")
        command = [sys.executable, "-m", "fedomop.cli", "etl", "postgres", "--dsn", pg.dsn(),
                   "--cdm-schema", schema, "--vocab-schema", "vocab", "--db", str(db)]  # fmt: skip
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            pid = _wait_for_loader(pg, process, waiting)
            assert pg.execute(f"SELECT pg_terminate_backend({pid})") == [(True,)]
            out, err = process.communicate(timeout=120)
        finally:
            process.kill()
            blocker.rollback()
    message = " ".join(err.split())
    assert process.returncode == 1, out
    assert f"{schema}.measurement: reading from PostgreSQL failed" in message
    assert "terminating connection due to administrator command" in message
    assert "node.duckdb left unchanged" in message and "Traceback" not in message
    assert _digest(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.duckdb"]


def _wait_for_loader(pg: PgServer, process: subprocess.Popen, waiting: str) -> int:
    """The backend pid of the loader once pg_stat_activity shows it ``waiting``."""
    deadline = time.monotonic() + 120
    while True:
        rows = pg.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'fedomop etl postgres' "
            f"AND {waiting}"
        )
        if rows:
            return rows[0][0]
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"the loader never got to {waiting}"
        time.sleep(0.1)


# --- the test setup itself and the benchmark ---------------------------------------------------


def test_reader_role_cannot_write(pg: PgServer) -> None:
    """The tests read through a role that cannot change the source."""
    import psycopg

    with psycopg.connect(pg.dsn(), password=READER_PASSWORD, autocommit=True) as con:
        for sql in ("DELETE FROM mini.person", "CREATE TABLE mini.x (a int)"):
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                con.execute(sql)
        con.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            con.execute("DELETE FROM mini.person")


def test_bench_postgres_source_reports_both_routes(tmp_path: Path, pg: PgServer) -> None:
    """bench/etl.py --source postgres on two small tables: counts equal, both rates given."""
    src = tmp_path / "csv"
    src.mkdir()
    persons = pg.execute("SELECT count(*) FROM mini.person")[0][0]
    periods = pg.execute("SELECT count(*) FROM mini.observation_period")[0][0]
    for table in ("person", "observation_period"):
        with pg.admin() as con, (src / f"{table.upper()}.csv").open("wb") as out:
            sql = f"COPY mini.{table} TO STDOUT (FORMAT csv, HEADER)"
            with con.cursor().copy(sql) as copy:
                for block in copy:
                    out.write(block)
    bench = REPO / "bench" / "etl.py"
    command = [sys.executable, str(bench), "--source", "postgres", "--csv-dir", str(src),
               "--repeat", "1"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(done.stdout)
    assert report["source_rows"] == persons + periods
    assert report["tables"] == 2 and report["table_row_counts_equal"] is True
    assert set(report["source_rows_per_s"]) == {"csv", "postgres"}
    assert report["ratio_postgres_over_csv_seconds"] > 0
    assert set(report["transfer_into_arrow"]) >= {"adbc_arrow", "psycopg_text_copy_pyarrow_csv"}
