"""Atomic construction of a CDM file: build beside the target, swap in only on success.

A load that fails half way (bad input, exception, SIGKILL) must never damage the database that a
node is serving, so every build writes a fresh DuckDB file in a private folder next to the target
and ``os.replace`` moves it over the target in one step once it is complete and checkpointed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import psutil

from fedomop.lifecycle import on_interrupt
from omop_etl.cdm import connect

_BUILD_MARK = ".build-"


def _remove_stale_builds(db_path: Path) -> None:
    """Delete build folders left by killed builds of the same target (their process is gone)."""
    for folder in db_path.parent.glob(f".{db_path.name}{_BUILD_MARK}*"):
        pid = folder.name.rsplit(_BUILD_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def atomic_build(
    db_path: str | Path, *, copy_existing: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Yield a connection to a new DuckDB file that replaces ``db_path`` on success.

    The new file is empty, or with ``copy_existing`` a copy of the current ``db_path`` (to
    change part of a CDM, e.g. its vocabulary). On any exception the new file is deleted, the
    exception propagates, and ``db_path`` keeps its previous content byte for byte; so on SIGINT
    or SIGTERM, which ``fedomop.lifecycle`` turns into an exception.
    """
    db_path = Path(db_path).resolve()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(db_path)
    folder = Path(
        tempfile.mkdtemp(prefix=f".{db_path.name}{_BUILD_MARK}{os.getpid()}-", dir=db_path.parent)
    )
    temp_db = folder / db_path.name
    if copy_existing and db_path.is_file():
        shutil.copyfile(db_path, temp_db)
    con = connect(temp_db, read_only=False)
    try:
        with on_interrupt(con.interrupt):  # SIGINT/SIGTERM stop a query running in C at once
            yield con
        con.execute("CHECKPOINT")
        con.close()
        os.replace(temp_db, db_path)
        # A write-ahead log beside the target belongs to the replaced file; never replay it.
        db_path.with_name(db_path.name + ".wal").unlink(missing_ok=True)
    finally:
        con.close()
        shutil.rmtree(folder, ignore_errors=True)
