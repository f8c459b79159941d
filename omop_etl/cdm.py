"""Opening a node's CDM DuckDB file."""

from __future__ import annotations

from pathlib import Path

import duckdb


def connect(path: str | Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the CDM file at ``path``; read-only by default because analyses never write.

    A missing file is an error rather than a silently created empty database.
    """
    path = Path(path)
    if read_only and not path.is_file():
        raise FileNotFoundError(f"CDM database not found: {path}")
    return duckdb.connect(str(path), read_only=read_only)
