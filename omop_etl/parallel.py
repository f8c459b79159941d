"""Running load statements on several DuckDB connections at once.

A load statement that numbers source rows (``row_number() OVER ()``) runs on one core: the
number is what keeps ids and quarantine lines tied to the file. So a load keeps every core busy
by running several such statements at once, each on its own connection to the same database:
different files, or parts of one large file (see ``staging.Part``).

Every task is one transaction. Tasks that append to the same table commit in the order they were
queued, so a rerun writes every table in the same row order; the heavy work happens before the
commit, which only publishes it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import duckdb


@dataclass(frozen=True)
class Task:
    """Statements run in one transaction on a worker's connection; ``run`` returns a count."""

    label: str
    table: str  # the table it appends to: commits to one table follow the queue order
    run: Callable[[duckdb.DuckDBPyConnection], int]


class _Cancelled(Exception):
    """A task gave up because an earlier one failed (the earlier error is the one raised)."""


def run_tasks(
    con: duckdb.DuckDBPyConnection,
    tasks: Sequence[Task],
    *,
    workers: int,
    settings: Sequence[str] = (),
    on_done: Callable[[Task, float], None] = lambda task, seconds: None,
) -> list[int]:
    """Run ``tasks`` on up to ``workers`` connections of ``con``'s database; their counts.

    ``settings`` (``SET ...`` statements) apply to each worker connection. ``on_done`` gets each
    finished task and its wall seconds. The first task error is raised once all have stopped;
    tasks not yet committed then roll back, and the caller's build is discarded.
    """
    local = threading.local()
    cursors: list[duckdb.DuckDBPyConnection] = []
    lock = threading.Lock()
    committed = [threading.Event() for _ in tasks]
    failed = threading.Event()
    last_writer: dict[str, int] = {}
    predecessor: list[int | None] = []
    for i, task in enumerate(tasks):
        predecessor.append(last_writer.get(task.table))
        last_writer[task.table] = i

    def connection() -> duckdb.DuckDBPyConnection:
        if not hasattr(local, "cursor"):
            local.cursor = con.cursor()
            for statement in settings:
                local.cursor.execute(statement)
            with lock:
                cursors.append(local.cursor)
        return local.cursor

    def wait_turn(i: int) -> None:
        before = predecessor[i]
        while before is not None and not committed[before].wait(0.02):
            if failed.is_set():
                raise _Cancelled

    def run(i: int) -> int:
        if failed.is_set():
            raise _Cancelled
        started, cursor = time.perf_counter(), connection()
        cursor.execute("BEGIN TRANSACTION")
        try:
            count = tasks[i].run(cursor)
            wait_turn(i)
            cursor.execute("COMMIT")
        except BaseException:
            failed.set()
            with contextlib.suppress(duckdb.Error):  # an error may have ended it already
                cursor.execute("ROLLBACK")
            raise
        committed[i].set()
        on_done(tasks[i], time.perf_counter() - started)
        return count

    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="fedomop-load") as pool:
            futures = [pool.submit(run, i) for i in range(len(tasks))]
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e and not isinstance(e, _Cancelled)), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]
    finally:
        for cursor in cursors:
            cursor.close()
