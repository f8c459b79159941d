"""Node operator commands: ``fedomop node ...`` (policy, budget, audit, start)."""

from __future__ import annotations

import typer

node_app = typer.Typer(
    help="Run and inspect a data node: policy, budget ledger, audit log.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Attach the ``node`` group to the root command."""
    app.add_typer(node_app, name="node")
