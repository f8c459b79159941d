"""Concurrent load statements: commit order per table, failures, file parts and line counts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb
import pytest

from omop_etl.parallel import Task, run_tasks
from omop_etl.sources import WHOLE_FILE, Part, count_data_lines


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "t.duckdb"))
    con.execute("CREATE TABLE a (v INTEGER)")
    con.execute("CREATE TABLE b (v INTEGER)")
    yield con
    con.close()


def _append(table: str, value: int, delay: float = 0.0, seen: list | None = None):
    def run(cur: duckdb.DuckDBPyConnection) -> int:
        time.sleep(delay)
        if seen is not None:
            seen.append(threading.current_thread().name)
        return cur.execute(f"INSERT INTO {table} VALUES ({value})").fetchone()[0]

    return run


def test_tasks_on_one_table_commit_in_queue_order_without_holding_workers(con) -> None:
    # the first task is slow: the second finishes first but commits after it, and its worker
    # meanwhile takes the third task (on another table) instead of waiting
    seen: list[str] = []
    tasks = [
        Task("slow", "a", _append("a", 1, delay=0.4)),
        Task("fast", "a", _append("a", 2)),
        Task("other", "b", _append("b", 3, seen=seen)),
    ]
    started = time.perf_counter()
    assert run_tasks(con, tasks, workers=2) == [1, 1, 1]
    assert time.perf_counter() - started < 0.4 + 0.3  # the third did not wait for the first
    assert con.execute("SELECT v FROM a").fetchall() == [(1,), (2,)]  # physical order = queue
    assert con.execute("SELECT v FROM b").fetchall() == [(3,)]


def test_a_failing_task_raises_its_error_and_its_table_rolls_back(con) -> None:
    def fail(cur: duckdb.DuckDBPyConnection) -> int:
        time.sleep(0.1)
        raise ValueError("bad part")

    tasks = [Task("bad", "a", fail), Task("after", "a", _append("a", 2))]
    with pytest.raises(ValueError, match="bad part"):
        run_tasks(con, tasks, workers=2)
    # the second task finished its work but never committed: its predecessor failed
    assert con.execute("SELECT count(*) FROM a").fetchone()[0] == 0


def test_a_failure_interrupts_the_statements_still_running(con) -> None:
    """A bad part stops the load at once: the other parts' queries are interrupted, and the
    error raised is the failing part's own, not the interruption it caused."""
    seen: list[BaseException] = []

    def fail(cur: duckdb.DuckDBPyConnection) -> int:
        time.sleep(0.3)
        raise ValueError("ragged row in part 1")

    def long_query(cur: duckdb.DuckDBPyConnection) -> int:
        try:  # minutes of work unless interrupted
            return cur.execute(
                "SELECT count(*) FROM range(1000000000000) WHERE range % 7 = 3"
            ).fetchone()[0]
        except duckdb.InterruptException as stopped:
            seen.append(stopped)
            raise

    with pytest.raises(ValueError, match="ragged row in part 1"):
        run_tasks(con, [Task("p1", "a", fail), Task("p2", "a", long_query)], workers=2)
    assert len(seen) == 1 and isinstance(seen[0], duckdb.InterruptException)


def test_settings_apply_to_every_task_connection(con) -> None:
    def setting(cur: duckdb.DuckDBPyConnection) -> int:
        return int(
            cur.execute("SELECT lower(current_setting('default_order')) = 'desc'").fetchone()[0]
        )

    tasks = [Task(str(i), f"t{i}", setting) for i in range(3)]
    assert run_tasks(con, tasks, workers=2, settings=["SET default_order = 'desc'"]) == [1, 1, 1]


def test_parts_cover_the_file_and_balance_their_cost() -> None:
    assert WHOLE_FILE.split(1000, 1) == [WHOLE_FILE]
    assert WHOLE_FILE.split(1000, 2) == [Part(2, 502), Part(502, None)]
    parts = WHOLE_FILE.split(1000, 3, skip_cost=0.2)
    assert parts[0].first == 2 and parts[-1].stop is None
    assert all(p.stop == q.first for p, q in zip(parts, parts[1:], strict=False))
    # cost of a part = 0.2 * rows passed over + rows loaded: equal for every part
    costs = [0.2 * (p.first - 2) + ((p.stop or 1002) - p.first) for p in parts]
    assert max(costs) - min(costs) <= 1
    assert parts[0].stop - parts[0].first > parts[1].stop - parts[1].first


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        (b"h\n1\n2\n", 2),
        (b"h\n1\n2", 2),  # no newline at the end
        (b"h\r\n1\r\n", 1),
        (b"h\n", 0),
        (b'h\n"a\nb"\n2\n', 3),  # a quoted line break counts: an upper bound on the rows
    ],
)
def test_data_lines_counted(tmp_path: Path, text: bytes, lines: int) -> None:
    path = tmp_path / "f.csv"
    path.write_bytes(text)
    assert count_data_lines(path, chunk=3) == lines  # chunks smaller than a line too
