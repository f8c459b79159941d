"""``fedomop study validate|render|hash|run-local``: the researcher's and reviewer's commands."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from studies.model import Study, StudyError, load_study

console = Console()
errors = Console(stderr=True)

StudyFile = typer.Argument(..., help="Study definition (YAML or JSON).")


def _fail(message: str) -> None:
    errors.print(message, style="red", markup=False, highlight=False)


def _load(path: Path) -> Study:
    """The validated study, or a red list of problems (field path: reason) and exit code 1."""
    try:
        return load_study(path)
    except StudyError as exc:
        _fail(f"{path}: invalid study")
        for where, reason in exc.problems:
            _fail(f"  {where}: {reason}")
        raise typer.Exit(1) from None


def validate(file: Path = StudyFile) -> None:
    """Check a study definition; errors name the field and the reason."""
    study = _load(file)
    console.print(
        f"[green]{file}: valid[/green] study {study.name!r}: {len(study.concept_sets)} concept "
        f"set(s), {len(study.cohorts)} cohort(s), {len(study.analyses)} analysis(es)"
    )


def render(
    file: Path = StudyFile,
    catalogue: Path | None = typer.Option(
        None, help="HealthDCAT-AP catalogue (from `coordinator catalogue`): list its datasets"
    ),
    permit: Path | None = typer.Option(
        None,
        help="with --catalogue: only the datasets of the nodes this permit names "
        "(its signature is not checked here; `permit verify` does that)",
    ),
) -> None:
    """Print the study in words for a permit review (cohorts, analyses, outputs, strata)."""
    from studies.render import render_datasets, render_study

    study = _load(file)
    if permit is not None and catalogue is None:
        _fail("--permit is only used with --catalogue (to pick the datasets of its nodes)")
        raise typer.Exit(1)
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
        _fail(f"{catalogue}: not a readable catalogue: {err}")
        raise typer.Exit(1) from None
    if not datasets:
        _fail(f"{catalogue}: not a readable catalogue: it lists no dcat:Dataset")
        raise typer.Exit(1)
    if permit is None:
        return datasets, None
    try:
        body = PermitBody.model_validate(read_json(permit)["body"])
    except (PermitError, KeyError, TypeError, ValueError) as err:
        _fail(f"{permit}: not a permit: {err}")
        raise typer.Exit(1) from None
    return datasets, list(body.nodes)


def hash_(file: Path = StudyFile) -> None:
    """Print the study's SHA-256 (of its canonical form): the value a permit binds."""
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
    """
    import duckdb

    from studies.runner import run_local as run

    _load(file)
    missing = [str(p) for p in db if not p.is_file()]
    if missing:
        _fail(f"no CDM database at: {', '.join(missing)}")
        raise typer.Exit(1)
    try:
        with console.status("running study") as status:
            result, _settings = run(
                file, db, out, node_names=name or None, progress=lambda text: status.update(text)
            )
    except (ValueError, duckdb.Error) as exc:
        _fail(f"{file}: {exc}")
        raise typer.Exit(1) from None
    console.print(f"[green]wrote {result.height} result rows to {out}[/green]")


def register(app: typer.Typer) -> None:
    """Attach the ``study`` commands to ``app``."""
    app.command("validate")(validate)
    app.command("render")(render)
    app.command("hash")(hash_)
    app.command("run-local")(run_local)
