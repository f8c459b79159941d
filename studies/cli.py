"""Researcher and permit-body commands: ``fedomop study ...`` and ``fedomop permit ...``."""

from __future__ import annotations

import typer

from studies import permit_cli, study_cli


def register(app: typer.Typer) -> None:
    """Attach the ``study`` and ``permit`` groups to the root command."""
    study_app = typer.Typer(
        help="Validate, render, hash and run study definitions.", no_args_is_help=True
    )
    study_cli.register(study_app)
    app.add_typer(study_app, name="study")
    permit_app = typer.Typer(
        help="Data permit body: keys, review, issue, verify, revoke.", no_args_is_help=True
    )
    permit_cli.register(permit_app)
    app.add_typer(permit_app, name="permit")
