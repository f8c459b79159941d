"""``fedomop etl synthea`` (load a Synthea export) and ``fedomop etl synth`` (make one)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedomop.ui import fail, interrupt_note
from omop_etl.load_cli import input_errors
from omop_etl.profiles import PROFILES

console = Console()


def _print_files(out: Path) -> None:
    """Rows and size of each generated file."""
    from omop_etl.synthea import source_rows

    table = Table(title=f"Synthea-format CSV in {out}")
    table.add_column("file")
    table.add_column("rows", justify="right")
    table.add_column("MB", justify="right")
    for name, rows in source_rows(out).items():
        path = out / f"{name}.csv"
        table.add_row(path.name, f"{rows:,}", f"{path.stat().st_size / 1e6:.1f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Attach ``synthea`` and ``synth`` to the ``etl`` group."""

    @app.command("synthea")
    def synthea(
        src_dir: Path = typer.Argument(..., help="folder of a Synthea CSV export"),
        db: Path = typer.Option(..., "--db", help="CDM DuckDB file to build (replaced)"),
        vocab: Path | None = typer.Option(
            None, "--vocab", help="Athena vocabulary export (default: the shipped one)"
        ),
        workers: int | None = typer.Option(
            None, "--workers", min=1, help="files or file parts loaded at once (default: cores)"
        ),
    ) -> None:
        """Build a CDM 5.4 DuckDB file from a Synthea CSV export.

        Example: fedomop etl synthea src/ --db cdm.duckdb
        """
        from omop_etl.synthea import load_synthea

        try:
            with interrupt_note(f"{db} left unchanged"):
                report = load_synthea(src_dir, db, vocab_dir=vocab, workers=workers)
        except input_errors() as error:
            fail(f"{error}; {db} left unchanged")
        report.print(console)
        for reason, n in report.quarantine_by_reason().items():
            console.print(f"quarantined: {n:,} rows, {reason}")
        console.print(f"[green]wrote[/] {db}")

    @app.command("synth")
    def synth(
        patients: int = typer.Option(..., "--patients", min=1, help="number of patients"),
        seed: int = typer.Option(0, "--seed", help="random seed (same seed, same files)"),
        profile: str = typer.Option(
            ..., "--profile", help=f"node profile: {', '.join(sorted(PROFILES))}"
        ),
        rare_condition: str | None = typer.Option(
            None, "--rare-condition", help="SNOMED code of the rare condition (default 190905008)"
        ),
        out: Path = typer.Option(..., "--out", help="folder to write the CSV files into"),
    ) -> None:
        """Generate one synthetic node as Synthea-format CSV files.

        Example: fedomop etl synth --patients 2000 --seed 1 --profile urban_hospital --out src/
        """
        from omop_etl.synth import generate

        try:
            with console.status(f"generating {patients:,} patients ({profile}, seed {seed})"):
                generate(
                    out, patients=patients, seed=seed, profile=profile,
                    rare_condition=rare_condition,
                )  # fmt: skip
        except (ValueError, OSError) as error:
            fail(str(error))
        _print_files(out)
