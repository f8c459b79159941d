"""Commands of this module are attached to the ``fedomop`` command by ``register``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this module's commands to ``app``."""
