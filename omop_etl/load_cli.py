"""``fedomop etl vocab`` and ``fedomop etl omop-csv``: load a vocabulary or an OMOP CSV export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from fedomop.ui import fail, interrupt_note

if TYPE_CHECKING:  # the loaders (DuckDB, numpy) are imported by the commands that run them
    from omop_etl.report import LoadReport

console = Console()


#: ``--rekey-duplicates/--quarantine-duplicates`` of the commands that load an OMOP CDM.
REKEY_OPTION = typer.Option(
    True,
    "--rekey-duplicates/--quarantine-duplicates",
    help="load rows that reuse an earlier row's id under a new id (logged in etl_rekeyed), "
    "or quarantine them",
)


def input_errors() -> tuple[type[Exception], ...]:
    """What a load raises on bad input (reported in one line, the previous file kept)."""
    import duckdb

    from omop_etl.sources import EtlInputError

    return (EtlInputError, duckdb.Error, OSError)


def finish(report: LoadReport) -> None:
    """Print the run report, the quarantine per reason and where the file is."""
    report.print(console)
    for reason, n in report.quarantine_by_reason().items():
        console.print(f"quarantined: {n:,} rows, {reason}")
    console.print(f"[green]wrote[/] {report.db_path}")


def register(app: typer.Typer) -> None:
    """Attach ``vocab`` and ``omop-csv`` to the ``etl`` group."""

    @app.command("vocab")
    def vocab(
        vocab_dir: Path | None = typer.Argument(
            None, help="Athena vocabulary export folder (none: keep the file's vocabulary)"
        ),
        db: Path = typer.Option(..., "--db", help="CDM DuckDB file (created or updated)"),
        derive_ancestors: bool = typer.Option(
            False,
            "--derive-ancestors",
            help="rebuild concept_ancestor from concept_relationship as Athena does (the "
            "closure of the relationships whose defines_ancestry is 1)",
        ),
    ) -> None:
        """Load an Athena vocabulary export (tab-separated, as Athena ships it).

        Without a folder, --derive-ancestors rebuilds the concept_ancestor table of --db only.

        Example: fedomop etl vocab path/to/athena_export --db cdm.duckdb
        """
        from omop_etl.vocab import replace_vocabulary

        if vocab_dir is None and not derive_ancestors:
            fail("give an Athena vocabulary folder, or --derive-ancestors")
        try:
            with interrupt_note(f"{db} left unchanged"):
                report = replace_vocabulary(db, vocab_dir, derive_ancestors=derive_ancestors)
        except input_errors() as error:
            fail(f"{error}; {db} left unchanged")
        finish(report)

    @app.command("omop-csv")
    def omop_csv(
        src_dir: Path = typer.Argument(
            ..., help="folder or .zip with one CSV or Parquet file per CDM table (5.3/5.4)"
        ),
        db: Path = typer.Option(..., "--db", help="CDM DuckDB file to build (replaced)"),
        vocab: Path | None = typer.Option(
            None, "--vocab", help="Athena vocabulary for tables the folder lacks"
        ),
        rekey_duplicates: bool = REKEY_OPTION,
    ) -> None:
        """Build a CDM 5.4 DuckDB file from an OMOP CDM exported as CSV or Parquet files.

        Example: fedomop etl omop-csv export/ --db cdm.duckdb
        """
        from omop_etl.load import load_omop_csv

        try:
            with interrupt_note(f"{db} left unchanged"):
                report = load_omop_csv(
                    src_dir, db, vocab_dir=vocab, rekey_duplicates=rekey_duplicates
                )
        except input_errors() as error:
            fail(f"{error}; {db} left unchanged")
        finish(report)
