"""``fedomop study validate|render|hash|run-local``: the researcher's and reviewer's commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from fedomop.ui import add_commands, err_console, fail, say_error

if TYPE_CHECKING:
    from studies.model import Study

console = Console()

StudyFile = typer.Argument(..., metavar="STUDY", help="Study definition (YAML or JSON).")


def _load(path: Path) -> Study:
    """The validated study, or a list of problems (field path: reason) and exit code 1."""
    from studies.loading import load_study
    from studies.model import StudyError

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

    from omop_etl.cdm import connect

    if not path.is_file():
        fail(f"--db {path}: no CDM database at that path")
    try:
        with connect(path) as con:
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


def render(
    file: Path = StudyFile,
    catalogue: Path | None = typer.Option(
        None, help="HealthDCAT-AP catalogue (from fedomop coordinator catalogue): list its datasets"
    ),
    permit: Path | None = typer.Option(
        None,
        help="With --catalogue: only the datasets of the nodes this permit names "
        "(its signature is not checked here; fedomop permit verify does that).",
    ),
) -> None:
    """Print the study in words for a permit review (cohorts, analyses, outputs, strata).

    With --catalogue, also the catalogue's datasets the study would use (with --permit, only
    those of the nodes the permit names).

    Example: fedomop study render examples/gibleed_glm/study.yaml
    --catalogue catalogue.ttl --permit permit.json
    """
    from studies.render import render_datasets, render_study

    study = _load(file)
    if permit is not None and catalogue is None:
        fail("--permit is only used with --catalogue (to pick the datasets of its nodes)")
    datasets = _catalogue_datasets(catalogue, permit) if catalogue is not None else None
    print(render_study(study), end="")
    if datasets is not None:
        print(render_datasets(*datasets), end="")


def _catalogue_datasets(catalogue: Path, permit: Path | None) -> tuple[list, list[str] | None]:
    """The catalogue's datasets and the permit's node names (None: no permit given)."""
    from rdflib.exceptions import ParserError

    from studies.dcat import catalogue_datasets, read_description
    from studies.permit import PermitBody, PermitError, read_json

    try:
        datasets = catalogue_datasets(read_description(catalogue))
    except (OSError, ParserError, ValueError, SyntaxError) as err:
        fail(f"{catalogue}: not a readable catalogue: {err}")
    if not datasets:
        fail(f"{catalogue}: not a readable catalogue: it lists no dcat:Dataset")
    if permit is None:
        return datasets, None
    try:
        body = PermitBody.model_validate(read_json(permit)["body"])
    except (PermitError, KeyError, TypeError, ValueError) as err:
        fail(f"{permit}: not a permit: {err}")
    return datasets, list(body.nodes)


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
    add_commands(
        app, {"validate": validate, "render": render, "hash": hash_, "run-local": run_local}
    )
