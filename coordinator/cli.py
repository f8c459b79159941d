"""Coordinator commands: ``fedomop coordinator ...``, ``fedomop run`` and ``fedomop demo``."""

from __future__ import annotations

import typer

from coordinator import commands


def register(app: typer.Typer) -> None:
    """Attach the ``coordinator`` group and the ``run``/``demo`` commands to the root command."""
    coordinator_app = typer.Typer(
        help="Run the coordinator (Flower SuperLink) and permitted studies.", no_args_is_help=True
    )
    commands.register(app, coordinator_app)
    app.add_typer(coordinator_app, name="coordinator")
