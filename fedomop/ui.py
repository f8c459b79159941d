"""How every ``fedomop`` command reports a problem: one prefix, on stderr, then a non-zero exit.

One helper for all command modules, so that a user (and a script reading stderr) sees the same
``error: ...`` line whichever role's command failed. Messages are printed as plain text, never as
Rich markup: a study path such as ``analyses[bleed_risk]`` must not be read as a style tag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from fedomop.lifecycle import Interrupted, received_signal

err_console = Console(stderr=True, highlight=False, soft_wrap=True)

#: Exit statuses shared by the commands (documented in README.md, "Exit codes").
EXIT_ERROR = 1
EXIT_NO_RESULT = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def add_commands(app: typer.Typer, commands: Mapping[str, Callable[..., None]]) -> None:
    """Attach each command to ``app`` under its name: a room's commands are declared as one
    table, so ``fedomop --help`` lists them in that order."""
    for name, command in commands.items():
        app.command(name)(command)


def error_line(message: str) -> Text:
    """``error: message`` with the prefix in red and the message verbatim."""
    return Text.assemble(("error:", "red"), " ", message)


def say_error(message: str) -> None:
    """Print one ``error:`` line on stderr without exiting (when several problems follow)."""
    err_console.print(error_line(message))


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code`` (1 unless told otherwise).

    An error caused by an interruption (DuckDB's "Query interrupted" after Ctrl-C) is the
    interruption: it is re-raised as such, for the one line the console script prints.
    """
    signum = received_signal()
    if signum is not None:
        raise Interrupted(signum)
    say_error(message)
    raise typer.Exit(code)


_notes: list[str] = []


@contextmanager
def interrupt_note(text: str) -> Iterator[None]:
    """Add ``text`` (e.g. "cdm.duckdb left unchanged") to the line an interruption prints."""
    try:
        yield
    except BaseException:
        if received_signal() is not None:
            _notes.append(text)
        raise


def interrupted_line(signal_name: str) -> None:
    """The one line printed when a signal ended the command."""
    notes = "".join(f"; {note}" for note in _notes)
    err_console.print(Text.assemble(("interrupted", "yellow"), f" by {signal_name}{notes}"))
