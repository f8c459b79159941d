"""Coordinator commands: ``fedomop coordinator ...``, ``fedomop run`` and ``fedomop demo``."""

from __future__ import annotations

import typer

coordinator_app = typer.Typer(
    help="Run the coordinator (Flower SuperLink) and permitted studies.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Attach the ``coordinator`` group and the ``run``/``demo`` commands to the root command."""
    app.add_typer(coordinator_app, name="coordinator")
