"""Opening DuckDB databases: a node's CDM file, a build's file, an in-memory scratch database.

Every connection the project opens comes from here (``tests/test_layout.py`` checks it), so
that what each must have is set in one place: no progress bar.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

IN_MEMORY = ":memory:"


def without_progress_bar(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """``con`` with DuckDB's progress bar off.

    DuckDB draws it on the process's standard output for any query over two seconds, even when
    that is a pipe or a log file: a 1M-person node's queries wrote it into the node's log, a
    command's JSON output (``study run-local``, the benches) and the bench's request channel.
    The setting is local to a connection and a cursor is a new one: set it on each.
    """
    con.execute("SET enable_progress_bar = false")
    return con


def connect(path: str | Path = IN_MEMORY, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the database at ``path`` (in memory when not given); read-only by default because
    analyses never write.

    A missing file is an error rather than a silently created empty database.
    """
    if str(path) == IN_MEMORY:
        return without_progress_bar(duckdb.connect())
    path = Path(path)
    if read_only and not path.is_file():
        raise FileNotFoundError(f"no CDM database at {path}")
    return without_progress_bar(duckdb.connect(str(path), read_only=read_only))
