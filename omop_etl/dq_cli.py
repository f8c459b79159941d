"""``fedomop dq FILE --out DIR``: the data-quality report of a node's CDM file."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from omop_etl.dq import DqError, DqReport, run_checks, write_report

FAILED_SHOWN = 15  # the console lists the worst failures; dq.html lists them all


def _summary_table(report: DqReport) -> Table:
    table = Table(title=f"Data quality of {report.cdm_source_name} ({report.seconds:.1f} s)")
    for column in ("Category", "Passed", "Failed", "Not applicable", "Total"):
        table.add_column(column, justify="left" if column == "Category" else "right")
    for s in report.summary:
        failed = f"[red]{s.failed}[/red]" if s.failed else "[green]0[/green]"
        table.add_row(s.category, str(s.passed), failed, str(s.not_applicable), str(s.total))
    return table


def _failed_table(report: DqReport) -> Table:
    failed = report.failed()
    table = Table(title=f"Failed checks ({len(failed)}, worst first)")
    for column in ("Check", "Violated", "of rows", "%", "Threshold %"):
        if column == "Check":
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, justify="right")
    for r in failed[:FAILED_SHOWN]:
        table.add_row(
            r.id, f"{r.num_violated:,}", f"{r.denominator:,}", f"{r.pct:.2f}", f"{r.threshold:g}"
        )
    return table


def dq(
    file: Path = typer.Argument(..., help="The CDM DuckDB file to check."),
    out: Path = typer.Option(..., "--out", help="Folder for dq.json and dq.html."),
) -> None:
    """Run the data-quality checks on a CDM file and write dq.json and dq.html.

    Failed checks are findings (exit code 0); a missing or non-CDM file is an error (exit 1).
    """
    console = Console()
    try:
        report = run_checks(file, progress=True)
    except DqError as error:
        console.print(f"[red]fedomop dq: {error}[/red]")
        raise typer.Exit(1) from error
    json_path, html_path = write_report(report, out)
    console.print(_summary_table(report))
    if report.failed():
        console.print(_failed_table(report))
        hidden = len(report.failed()) - FAILED_SHOWN
        if hidden > 0:
            console.print(f"... and {hidden} more in {html_path}")
    console.print(f"Wrote {json_path} and {html_path}")


def register(app: typer.Typer) -> None:
    """Attach the top-level ``dq`` command to ``app``."""
    app.command("dq")(dq)
