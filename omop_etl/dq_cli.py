"""``fedomop dq FILE --out DIR``: the data-quality report of a node's CDM file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from fedomop.ui import fail

if TYPE_CHECKING:  # the checks (DuckDB, pydantic) are imported when the command runs
    from omop_etl.dq import CheckResult, DqReport

WORST_SHOWN = 3  # failed checks shown per check kind on the console; dq.html lists them all


def _summary_table(report: DqReport) -> Table:
    table = Table(title=f"Data quality of {report.cdm_source_name} ({report.seconds:.1f} s)")
    for column in ("Category", "Passed", "Failed", "Not applicable", "Total"):
        table.add_column(column, justify="left" if column == "Category" else "right")
    for s in report.summary:
        failed = f"[red]{s.failed}[/red]" if s.failed else "[green]0[/green]"
        table.add_row(s.category, str(s.passed), failed, str(s.not_applicable), str(s.total))
    return table


def _target(r: CheckResult) -> str:
    where = ".".join(str(p) for p in (r.table, r.field, r.concept_id) if p is not None)
    return f"{where}: {r.num_violated:,} ({r.pct:.1f}%)"


def _failed_table(report: DqReport) -> Table:
    """One line per failed check kind, its worst targets first: short even when many fail."""
    from omop_etl.dq import CATEGORIES

    by_name: dict[str, list[CheckResult]] = {}
    for r in report.failed():
        by_name.setdefault(r.name, []).append(r)
    table = Table(title=f"Failed checks ({len(report.failed())}); all of them are in dq.html")
    table.add_column("Check")
    table.add_column("Failed", justify="right")
    table.add_column("Worst: violated rows (%)", overflow="fold")
    order = sorted(by_name.items(), key=lambda kv: (CATEGORIES.index(kv[1][0].category), kv[0]))
    for name, failed in order:
        worst = [_target(r) for r in failed[:WORST_SHOWN]]
        if len(failed) > WORST_SHOWN:
            worst.append(f"+{len(failed) - WORST_SHOWN} more")
        table.add_row(
            f"{name}\n[dim]{failed[0].category}[/dim]", str(len(failed)), "\n".join(worst)
        )
    return table


def dq(
    file: Path = typer.Argument(..., metavar="CDM", help="The CDM DuckDB file to check."),
    out: Path = typer.Option(..., "--out", help="Folder for dq.json and dq.html."),
    vocabulary: bool = typer.Option(
        False, "--vocabulary", help="Check the vocabulary tables too (DQD leaves them out)."
    ),
) -> None:
    """Run the data-quality checks on a CDM file and write dq.json and dq.html.

    Failed checks are findings (exit code 0); a missing or non-CDM file is an error (exit 1).

    Example: fedomop dq cdm.duckdb --out dq/
    """
    from omop_etl.dq import DqError, run_checks, write_report

    console = Console()
    try:
        report = run_checks(file, progress=True, vocabulary=vocabulary)
    except DqError as error:
        fail(str(error))
    json_path, html_path = write_report(report, out)
    console.print(_summary_table(report))
    if report.failed():
        console.print(_failed_table(report))
    console.print(f"Wrote {json_path} and {html_path}")


def register(app: typer.Typer) -> None:
    """Attach the top-level ``dq`` command to ``app``."""
    app.command("dq")(dq)
