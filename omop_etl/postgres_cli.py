"""``fedomop etl postgres``: build a CDM 5.4 file from an OMOP CDM held in PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import typer

from fedomop.ui import fail, interrupt_note
from omop_etl.load_cli import REKEY_OPTION, finish, input_errors

_HELP = """Build a CDM 5.4 DuckDB file from an OMOP CDM (5.3 or 5.4) in a PostgreSQL schema.

Same guarantees as fedomop etl omop-csv: 5.3 upgraded, every row loaded or quarantined with its reason,
the file replaced only when the whole load succeeded. All tables are read in one read-only
snapshot; use a role that may only read (SELECT on the schemas). Tables of the schema that are
no CDM 5.4 table go whole to the quarantine (no CDM 5.4 table), as files do in fedomop etl omop-csv.

The password never goes on the command line (a DSN with one is refused): libpq reads it from
PGPASSWORD, a password file (PGPASSFILE, default ~/.pgpass) or a service file (PGSERVICEFILE
with --dsn service=NAME).

Example: fedomop etl postgres --dsn "host=db.example.org dbname=ohdsi user=reader"
--cdm-schema cdm --vocab-schema vocab --db cdm.duckdb
"""


def register(app: typer.Typer) -> None:
    """Attach ``postgres`` to the ``etl`` group."""

    @app.command("postgres", help=_HELP)
    def postgres(
        dsn: str = typer.Option(
            ...,
            "--dsn",
            help="libpq connection string or URI without password, e.g. "
            "'host=db.example.org dbname=ohdsi user=reader' or 'service=cdm'",
        ),
        cdm_schema: str = typer.Option(..., "--cdm-schema", help="schema holding the CDM tables"),
        db: Path = typer.Option(..., "--db", help="CDM DuckDB file to build (replaced)"),
        vocab_schema: str | None = typer.Option(
            None, "--vocab-schema", help="schema holding the vocabulary tables (default: the CDM's)"
        ),
        vocab: Path | None = typer.Option(
            None, "--vocab", help="Athena vocabulary for tables neither schema has"
        ),
        incremental: bool = typer.Option(
            False,
            "--incremental",
            help="rebuild only the tables that PostgreSQL's counters (pg_stat_user_tables) "
            "show changed since the last load of this file; the result equals a full load",
        ),
        rekey_duplicates: bool = REKEY_OPTION,
    ) -> None:
        from omop_etl.postgres_load import load_postgres

        try:
            with interrupt_note(f"{db} left unchanged"):
                report = load_postgres(
                    dsn, cdm_schema, db, vocab_schema=vocab_schema, vocab_dir=vocab,
                    incremental=incremental, rekey_duplicates=rekey_duplicates,
                )  # fmt: skip
        except input_errors() as error:
            fail(f"{error}; {db} left unchanged")
        finish(report)
