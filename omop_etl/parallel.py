"""Running load statements on several DuckDB connections at once.

A load statement that numbers source rows (``row_number() OVER ()``) runs on one core: the
number is what keeps ids and quarantine lines tied to the file. So a load keeps every core busy
by running several such statements at once, each on its own connection to the same database:
different files, or parts of one large file (see ``sources.Part``).

Every task is one transaction. Tasks that append to the same table commit in the order they were
queued, so a rerun writes every table in the same row order; the heavy work happens before the
commit, which only publishes it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import duckdb

from omop_etl.cdm import without_progress_bar


@dataclass(frozen=True)
class Task:
    """Statements run in one transaction on a connection of their own; ``run`` returns a count."""

    label: str
    table: str  # the table it appends to: commits to one table follow the queue order
    run: Callable[[duckdb.DuckDBPyConnection], int]


class _Commits:
    """Commits each finished task once the task queued before it on the same table has
    committed; whichever thread finishes work commits what became ready, so no worker waits."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        last: dict[str, int] = {}
        self.before: list[int | None] = []
        for i, task in enumerate(tasks):
            self.before.append(last.get(task.table))
            last[task.table] = i
        self.open: dict[int, duckdb.DuckDBPyConnection] = {}
        self.done: set[int] = set()
        self.lock = threading.Lock()

    def finished(self, i: int, cursor: duckdb.DuckDBPyConnection) -> None:
        """Task ``i``'s work is done in ``cursor``'s open transaction: commit what is ready."""
        with self.lock:
            self.open[i] = cursor
            progress = True
            while progress:
                ready = [j for j in sorted(self.open) if self.before[j] in (None, *self.done)]
                for j in ready:
                    self.open.pop(j).execute("COMMIT")
                    self.done.add(j)
                progress = bool(ready)

    def roll_back(self) -> None:
        """Undo every transaction still waiting for its turn (after a failure)."""
        with self.lock:
            for cursor in self.open.values():
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")
            self.open.clear()


def run_tasks(
    con: duckdb.DuckDBPyConnection,
    tasks: Sequence[Task],
    *,
    workers: int,
    settings: Sequence[str] = (),
    on_done: Callable[[Task, float], None] = lambda task, seconds: None,
) -> list[int]:
    """Run ``tasks`` on up to ``workers`` connections of ``con``'s database; their counts.

    ``settings`` (``SET ...`` statements) apply to each task's connection. ``on_done`` gets each
    finished task and its wall seconds. The first failure (or Ctrl-C) interrupts the statements
    still running, so a bad row in one part stops the load at once; the error is raised once
    all have stopped, tasks not yet committed roll back, and the caller's build is discarded.
    """
    commits = _Commits(tasks)
    failed = threading.Event()
    cursors: list[duckdb.DuckDBPyConnection] = []

    def stop_all() -> None:
        if not failed.is_set():
            failed.set()
            for cursor in list(cursors):
                cursor.interrupt()

    def run(i: int) -> int:
        if failed.is_set():
            return 0
        started, cursor = time.perf_counter(), without_progress_bar(con.cursor())
        cursors.append(cursor)  # list.append is atomic
        try:
            for statement in settings:
                cursor.execute(statement)
            cursor.execute("BEGIN TRANSACTION")
            count = tasks[i].run(cursor)
        except BaseException:
            stop_all()
            with contextlib.suppress(duckdb.Error):  # an error may have ended it already
                cursor.execute("ROLLBACK")
            raise
        commits.finished(i, cursor)
        on_done(tasks[i], time.perf_counter() - started)
        return count

    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="fedomop-load")
    try:
        futures = [pool.submit(run, i) for i in range(len(tasks))]
        # short waits: a Ctrl-C delivered to a worker thread runs its Python handler only
        # when the main thread is back in the interpreter
        while wait(futures, timeout=0.1).not_done:
            pass
    except BaseException:  # Ctrl-C while waiting
        stop_all()
        raise
    finally:
        pool.shutdown(wait=True)
        if failed.is_set():
            commits.roll_back()
        for cursor in cursors:
            cursor.close()
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    causes = [e for e in errors if not isinstance(e, duckdb.InterruptException)]
    if errors:
        raise (causes or errors)[0]
    return [f.result() for f in futures]
