"""Commands of the coordinator role, attached to the ``fedomop`` command by ``register``."""

from __future__ import annotations

import typer


def register(app: typer.Typer, coordinator_app: typer.Typer) -> None:
    """Attach ``run``/``demo`` to ``app`` and the deployment commands to ``coordinator_app``."""
