"""Node operator commands: ``fedomop node ...`` (policy, budget, audit, start)."""

from __future__ import annotations

import typer

from node import agent_cli, policy_cli


def register(app: typer.Typer) -> None:
    """Attach the ``node`` group to the root command."""
    node_app = typer.Typer(
        help="Run and inspect a data node: policy, budget ledger, audit log.", no_args_is_help=True
    )
    policy_cli.register(node_app)
    agent_cli.register(node_app)
    app.add_typer(node_app, name="node")
