"""``fedomop etl vocab`` and ``fedomop etl omop-csv``: load a vocabulary or an OMOP CSV export."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import typer
from rich.console import Console

from fedomop.ui import fail, interrupt_note
from omop_etl.build import atomic_build
from omop_etl.load import load_omop_csv
from omop_etl.quarantine import QUARANTINE_TABLE
from omop_etl.report import LoadReport
from omop_etl.schema import create_cdm_schema, quote, vocabulary_tables
from omop_etl.staging import EtlInputError
from omop_etl.vocab import load_vocabulary

console = Console()


def replace_vocabulary(db_path: Path, vocab_dir: Path) -> LoadReport:
    """Load ``vocab_dir`` into ``db_path`` (created if absent), replacing its vocabulary.

    The clinical tables of an existing CDM file are kept; the swap is atomic like every build.
    """
    started = time.perf_counter()
    report = LoadReport(db_path=db_path, source=f"vocab {vocab_dir.name}")
    with atomic_build(db_path, copy_existing=True) as con:
        has_cdm = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'concept'"
        ).fetchone()[0]
        if not has_cdm:
            create_cdm_schema(con)
        for name in vocabulary_tables():
            con.execute(f"DELETE FROM {quote(name)}")
        con.execute(
            f"DELETE FROM {QUARANTINE_TABLE} WHERE target_table IN "
            f"({', '.join('?' for _ in vocabulary_tables())})",
            list(vocabulary_tables()),
        )
        load_vocabulary(con, vocab_dir, report=report)
    report.seconds = time.perf_counter() - started
    return report


def _finish(report: LoadReport) -> None:
    report.print(console)
    for reason, n in report.quarantine_by_reason().items():
        console.print(f"quarantined: {n:,} rows, {reason}")
    console.print(f"[green]wrote[/] {report.db_path}")


def register(app: typer.Typer) -> None:
    """Attach ``vocab`` and ``omop-csv`` to the ``etl`` group."""

    @app.command("vocab")
    def vocab(
        vocab_dir: Path = typer.Argument(..., help="Athena vocabulary export folder"),
        db: Path = typer.Option(..., "--db", help="CDM DuckDB file (created or updated)"),
    ) -> None:
        """Load an Athena vocabulary export (tab-separated, as Athena ships it).

        Example: fedomop etl vocab path/to/athena_export --db cdm.duckdb
        """
        try:
            with interrupt_note(f"{db} left unchanged"):
                report = replace_vocabulary(db, vocab_dir)
        except (EtlInputError, duckdb.Error, OSError) as error:
            fail(f"{error}; {db} left unchanged")
        _finish(report)

    @app.command("omop-csv")
    def omop_csv(
        src_dir: Path = typer.Argument(..., help="folder with one CSV per CDM table (5.3/5.4)"),
        db: Path = typer.Option(..., "--db", help="CDM DuckDB file to build (replaced)"),
        vocab: Path | None = typer.Option(
            None, "--vocab", help="Athena vocabulary for tables the folder lacks"
        ),
        rekey_duplicates: bool = typer.Option(
            True,
            "--rekey-duplicates/--quarantine-duplicates",
            help="load rows that reuse an earlier row's id under a new id (logged in "
            "etl_rekeyed), or quarantine them",
        ),
    ) -> None:
        """Build a CDM 5.4 DuckDB file from an OMOP CDM exported as CSV files.

        Example: fedomop etl omop-csv export/ --db cdm.duckdb
        """
        try:
            with interrupt_note(f"{db} left unchanged"):
                report = load_omop_csv(
                    src_dir, db, vocab_dir=vocab, rekey_duplicates=rekey_duplicates
                )
        except (EtlInputError, duckdb.Error, OSError) as error:
            fail(f"{error}; {db} left unchanged")
        _finish(report)
