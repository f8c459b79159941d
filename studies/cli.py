"""Researcher and permit-body commands: ``fedomop study ...`` and ``fedomop permit ...``."""

from __future__ import annotations

import typer

study_app = typer.Typer(
    help="Validate, render, hash and run study definitions.", no_args_is_help=True
)
permit_app = typer.Typer(
    help="Data permit body: keys, review, issue, verify, revoke.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Attach the ``study`` and ``permit`` groups to the root command."""
    app.add_typer(study_app, name="study")
    app.add_typer(permit_app, name="permit")
