"""Node operator commands: ``fedomop etl ...`` (load data into OMOP CDM) and ``fedomop dq``."""

from __future__ import annotations

import typer

etl_app = typer.Typer(
    help="Convert source data into an OMOP CDM v5.4 DuckDB file.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Attach the ETL group and the ``dq`` command to the root command."""
    app.add_typer(etl_app, name="etl")
