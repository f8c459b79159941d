"""Node operator commands: ``fedomop etl ...`` (load data into OMOP CDM) and ``fedomop dq``."""

from __future__ import annotations

import typer

from omop_etl import dq_cli, load_cli, postgres_cli, synthea_cli


def register(app: typer.Typer) -> None:
    """Attach the ``etl`` group and the ``dq`` command to the root command."""
    etl_app = typer.Typer(
        help="Convert source data into an OMOP CDM v5.4 DuckDB file.", no_args_is_help=True
    )
    load_cli.register(etl_app)
    postgres_cli.register(etl_app)
    synthea_cli.register(etl_app)
    app.add_typer(etl_app, name="etl")
    dq_cli.register(app)
