"""A PostgreSQL server of its own, for tests, benchmarks and trials of the PostgreSQL source
route (``omop_etl.postgres``): started in a temporary folder on 127.0.0.1, torn down always.

Debian's ``postgresql`` package puts its binaries under /usr/lib/postgresql/<version>/bin
(``.ci/run`` installs it when missing). ``initdb`` refuses to run as root, so under root the
server runs as the ``postgres`` system user in a folder that user owns. The superuser
``postgres`` connects over the server's own Unix socket (trust, only this folder can reach it);
every other role connects over TCP with a SCRAM password, as a node's ETL would. Here, not
under ``tests/``, because ``bench/etl_postgres.py`` starts the same server (bench code never
imports the test suite); ``tests/pg_server.py`` holds the pytest fixtures over it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READER, READER_PASSWORD = "fedomop_reader", "reader-secret-for-tests"
CDM_SCHEMA = "cdm"

# CDM 5.3 datatypes as the OHDSI PostgreSQL DDL writes them.
_PG_TYPES = {"integer": "integer", "float": "numeric", "date": "date", "datetime": "timestamp"}


def _pg_type(field) -> str:
    """The OHDSI DDL's type for a CDM 5.3 field; text for a column the spec does not know."""
    return _PG_TYPES.get(field.kind, "text") if field is not None else "text"


def pg_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binary folder, or None when none is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return Path(found[-1]).parent if found else None


def _version(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    """A running server: its folder, port and socket, and how to reach it."""

    bin_dir: Path
    root: Path
    port: int
    run_as: str | None  # system user the server runs as (None: the current one)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def admin_conninfo(self, dbname: str = "postgres") -> str:
        """The superuser's connection string (the Unix socket in ``root``, no password)."""
        return f"host={self.root} port={self.port} user=postgres dbname={dbname}"

    def dsn(self, user: str = READER, dbname: str = "postgres", **extra: str) -> str:
        """A TCP connection string without a password (libpq takes it from PGPASSWORD)."""
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": user, "dbname": dbname}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def admin(self, dbname: str = "postgres"):
        """A psycopg connection as superuser, autocommit."""
        import psycopg

        return psycopg.connect(self.admin_conninfo(dbname), autocommit=True)

    def execute(self, sql: str, dbname: str = "postgres") -> list[tuple]:
        """Run ``sql`` as superuser; return the rows of its last statement (if any)."""
        with self.admin(dbname) as con, con.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []

    def _command(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.run_as, "--"] if self.run_as else []
        return prefix + list(args)

    def start(self) -> None:
        """initdb (first time) and start; returns once the server accepts connections."""
        ctl = str(self.bin_dir / "pg_ctl")
        if not (self.data_dir / "PG_VERSION").is_file():
            subprocess.run(
                self._command(
                    str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                    "--locale=C.UTF-8",
                ),
                check=True, capture_output=True,
            )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            self._command(ctl, "-D", str(self.data_dir), "-o", options, "-l",
                          str(self.root / "server.log"), "-w", "-t", "60", "start"),
            check=True, capture_output=True,
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast shutdown; immediate if that hangs)."""
        ctl = str(self.bin_dir / "pg_ctl")
        for mode in ("fast", "immediate"):
            result = subprocess.run(
                self._command(ctl, "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop"),
                capture_output=True,
            )
            if result.returncode == 0 or not (self.data_dir / "postmaster.pid").exists():
                return

    def create_reader(self, schemas: list[str], dbname: str = "postgres") -> None:
        """The read-only role ``fedomop_reader``: may read ``schemas``, may write nothing."""
        grants = "".join(
            f"GRANT USAGE ON SCHEMA {s} TO {READER};"
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {READER};"
            for s in schemas
        )
        self.execute(
            f"""DO $$ BEGIN
                  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READER}') THEN
                    CREATE ROLE {READER} LOGIN PASSWORD '{READER_PASSWORD}';
                  END IF; END $$;
                ALTER ROLE {READER} SET default_transaction_read_only = on;
                REVOKE CREATE ON SCHEMA public FROM PUBLIC; {grants}""",
            dbname,
        )


def load_csv_schema(server: PgServer, schema: str, csv_dir: Path, dbname: str = "postgres") -> None:
    """Create ``schema`` with one table per CSV of ``csv_dir`` (columns as in its header, CDM 5.3
    types where the spec has the column, else text) and fill each with ``COPY ... FROM STDIN``."""
    import csv

    from omop_etl.schema import spec_fields

    fields = {t: {f.name: f for f in fs} for t, fs in spec_fields("5.3").items()}
    with server.admin(dbname) as con:
        con.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        con.execute(f"CREATE SCHEMA {schema}")
        for path in sorted(csv_dir.glob("*.csv")):
            table = path.stem.lower()
            with path.open(newline="") as handle:
                header = [h.strip().lower() for h in next(csv.reader(handle))]
            known = fields.get(table, {})
            columns = ", ".join(f'"{c}" {_pg_type(known.get(c))}' for c in header)
            con.execute(f"CREATE TABLE {schema}.{table} ({columns})")
            names = ", ".join(f'"{c}"' for c in header)
            sql = f"COPY {schema}.{table} ({names}) FROM STDIN (FORMAT csv, HEADER)"
            with con.cursor().copy(sql) as copy, path.open("rb") as data:
                while block := data.read(1 << 20):
                    copy.write(block)
        con.execute("ANALYZE")


@contextmanager
def start_server() -> Iterator[PgServer]:
    """Start a server in a new temporary folder at a free port; stop it and delete the folder
    when the block ends, whatever happens (``bench/etl_postgres.py`` uses it too)."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin")
    run_as = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="fedomop-pg-"))
    if run_as:
        entry = pwd.getpwnam(run_as)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PgServer(bin_dir=bin_dir, root=root, port=_free_port(), run_as=run_as)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def reader_password() -> Iterator[dict[str, str]]:
    """PGPASSWORD of ``fedomop_reader`` in this process's environment while the block runs
    (libpq reads it at connect time); yields the environment to hand a child process."""
    before = os.environ.get("PGPASSWORD")
    os.environ["PGPASSWORD"] = READER_PASSWORD
    try:
        yield dict(os.environ)
    finally:
        if before is None:
            del os.environ["PGPASSWORD"]
        else:
            os.environ["PGPASSWORD"] = before
