"""How every ``fedomop`` command reports a problem: one prefix, on stderr, then a non-zero exit.

One helper for all command modules, so that a user (and a script reading stderr) sees the same
``error: ...`` line whichever role's command failed. Messages are printed as plain text, never as
Rich markup: a study path such as ``analyses[bleed_risk]`` must not be read as a style tag.
"""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

#: Exit statuses shared by the commands (documented in README.md, "Exit codes").
EXIT_ERROR = 1
EXIT_NO_RESULT = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def error_line(message: str) -> Text:
    """``error: message`` with the prefix in red and the message verbatim."""
    return Text.assemble(("error:", "red"), " ", message)


def say_error(message: str) -> None:
    """Print one ``error:`` line on stderr without exiting (when several problems follow)."""
    err_console.print(error_line(message))


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (1 unless told otherwise)."""
    say_error(message)
    raise typer.Exit(code)
