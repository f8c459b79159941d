"""``fedomop study validate|render|hash|run-local``: the researcher's and reviewer's commands."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedomop.ui import err_console, fail, say_error
from studies.model import Study, StudyError, load_study

console = Console()

StudyFile = typer.Argument(..., metavar="STUDY", help="Study definition (YAML or JSON).")


def _load(path: Path) -> Study:
    """The validated study, or a list of problems (field path: reason) and exit code 1."""
    try:
        return load_study(path)
    except StudyError as exc:
        say_error(f"{path}: invalid study")
        for where, reason in exc.problems:
            err_console.print(f"  {where}: {reason}", markup=False)
        raise typer.Exit(1) from None


def _check_cdm(path: Path) -> None:
    """Refuse a ``--db`` that is not a CDM DuckDB file, naming that path (not the study)."""
    import duckdb

    if not path.is_file():
        fail(f"--db {path}: no CDM database at that path")
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            tables = {
                row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()
            }
    except duckdb.Error as exc:
        fail(f"--db {path}: not a CDM DuckDB database ({str(exc).splitlines()[0]})")
    missing = sorted({"person", "observation_period"} - tables)
    if missing:
        fail(f"--db {path}: not an OMOP CDM file (no {', '.join(missing)} table)")


def validate(file: Path = StudyFile) -> None:
    """Check a study definition; errors name the field and the reason.

    Example: fedomop study validate examples/gibleed_glm/study.yaml
    """
    study = _load(file)
    console.print(
        f"[green]{file}: valid[/green] study {study.name!r}: {len(study.concept_sets)} concept "
        f"set(s), {len(study.cohorts)} cohort(s), {len(study.analyses)} analysis(es)"
    )


def render(file: Path = StudyFile) -> None:
    """Print the study in words for a permit review (cohorts, analyses, outputs, strata).

    Example: fedomop study render examples/gibleed_glm/study.yaml
    """
    from studies.render import render_study

    print(render_study(_load(file)), end="")


def hash_(file: Path = StudyFile) -> None:
    """Print the study's SHA-256 (of its canonical form): the value a permit binds.

    Example: fedomop study hash examples/gibleed_glm/study.yaml
    """
    from studies.canonical import study_hash

    print(study_hash(_load(file)))


def run_local(
    file: Path = StudyFile,
    db: list[Path] = typer.Option(..., "--db", help="A node's CDM DuckDB file (repeat per node)."),
    out: Path = typer.Option(..., "--out", help="Results folder to write."),
    name: list[str] = typer.Option(
        None, "--name", help="Node names, one per --db (default: file stems)."
    ),
) -> None:
    """Run a study on local CDM files, each as a separate node; write results.csv/settings.csv.

    No privacy gate runs here: this is for development and validation on data you may see.

    Example: fedomop study run-local study.yaml --db a.duckdb --db b.duckdb --out results/
    """
    import duckdb

    from studies.runner import run_local as run

    _load(file)
    for path in db:
        _check_cdm(path)
    try:
        with console.status("running study") as status:
            result, _settings = run(
                file, db, out, node_names=name or None, progress=lambda text: status.update(text)
            )
    except (ValueError, duckdb.Error) as exc:
        fail(f"{file}: {exc}")
    console.print(f"[green]wrote {result.height} result rows to {out}[/green]")


def register(app: typer.Typer) -> None:
    """Attach the ``study`` commands to ``app``."""
    app.command("validate")(validate)
    app.command("render")(render)
    app.command("hash")(hash_)
    app.command("run-local")(run_local)
