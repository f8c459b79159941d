"""A real PostgreSQL server for tests (``omop_etl.local_postgres``: a temporary folder on
127.0.0.1, torn down always), and the fixtures over it.

Fixtures (registered for every test through ``tests/conftest.py``):

- ``pg_server``: the session's ``PgServer``;
- ``gibleed_pg``: that server with GiBleed's CSVs loaded by ``COPY`` into schema ``cdm`` (the CDM
  5.3 types of the OHDSI DDL) and a read-only role ``fedomop_reader`` that may read it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from omop_etl.local_postgres import CDM_SCHEMA as CDM_SCHEMA
from omop_etl.local_postgres import READER as READER
from omop_etl.local_postgres import READER_PASSWORD as READER_PASSWORD
from omop_etl.local_postgres import PgServer as PgServer
from omop_etl.local_postgres import load_csv_schema, pg_bin_dir, start_server
from omop_etl.local_postgres import reader_password as reader_password
from tests.conftest import GIBLEED_CSV


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server of its own for this test session, on 127.0.0.1 at a free port."""
    if pg_bin_dir() is None:
        why = "PostgreSQL binaries not found under /usr/lib/postgresql/*/bin"
        if os.environ.get("CI"):  # .ci/run installs them: their absence there is a failure
            pytest.fail(f"{why}: .ci/run should have installed postgresql")
        pytest.skip(f"{why} (apt-get install postgresql; .ci/run does)")
    pytest.importorskip("psycopg", reason="psycopg is a test dependency: pip install -e '.[test]'")
    with start_server() as server:
        yield server


@pytest.fixture(scope="session")
def gibleed_pg(pg_server: PgServer) -> PgServer:
    """The session server with GiBleed in schema ``cdm`` and the read-only ``fedomop_reader``."""
    started = time.perf_counter()
    load_csv_schema(pg_server, CDM_SCHEMA, GIBLEED_CSV)
    pg_server.create_reader([CDM_SCHEMA])
    pg_server.gibleed_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return pg_server


@pytest.fixture
def reader_env() -> Iterator[dict[str, str]]:
    """``reader_password`` for one test."""
    with reader_password() as env:
        yield env


def wait_for_counters(server: PgServer, relation: str, before: tuple, timeout: float = 30) -> None:
    """Wait until PostgreSQL's statistics show a change of ``relation`` made by another session
    (a backend publishes its counters up to a few seconds after its commit)."""
    deadline = time.monotonic() + timeout
    while counters(server, relation) == before:
        if time.monotonic() > deadline:
            raise AssertionError(f"{relation}: counters still {before} after {timeout} s")
        time.sleep(0.2)


def counters(server: PgServer, relation: str) -> tuple:
    """(n_tup_ins, n_tup_upd, n_tup_del) of ``schema.table``."""
    schema, table = relation.split(".")
    rows = server.execute(
        "SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
        f"WHERE schemaname = '{schema}' AND relname = '{table}'"
    )
    return tuple(rows[0]) if rows else ()
