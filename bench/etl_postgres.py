"""``bench/etl.py --source postgres``: the same OMOP CDM loaded from CSV files and from PostgreSQL.

Starts a PostgreSQL server of its own in a temporary folder on 127.0.0.1
(``omop_etl/local_postgres.py``), copies the CSV folder into schema ``cdm`` with ``COPY``, then
runs ``load_omop_csv`` and ``load_postgres`` alternately ``--repeat`` times (alternating, so that a
busy period of the shared machine hits both) and reports the median seconds and source rows/s of
each, side by side, with their ratio. It also times the bare transfer of every table into Arrow
three ways, the measurement behind choosing ADBC: ADBC's PostgreSQL driver, psycopg text ``COPY``
parsed by pyarrow's CSV reader, and psycopg binary ``COPY`` decoded row by row (medians over
``--repeat`` rounds, the three taking turns). Wall seconds include the server's work on the same 2
cores; CPU seconds are this process's alone.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(function, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result)."""
    started, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, time.process_time() - cpu, result


def _transferred_rows(connect, per_table, dsn: str, tables: list[str]) -> int:
    """Rows of every table moved out of the server by ``per_table(connection, query)``, over one
    connection ``connect(dsn)``: the loop the three ways share, so only the transfer differs."""
    with connect(dsn) as con:
        return sum(per_table(con, f'SELECT * FROM cdm."{table}"') for table in tables)


def _adbc_arrow(con, query: str) -> int:
    with con.cursor() as cur:
        cur.execute(query)
        return cur.fetch_arrow_table().num_rows


def _psycopg_text_copy(con, query: str) -> int:
    import pyarrow.csv as pacsv

    buffer = io.BytesIO()
    with con.cursor().copy(f"COPY ({query}) TO STDOUT (FORMAT csv, HEADER)") as copy:
        for block in copy:
            buffer.write(block)
    buffer.seek(0)
    return pacsv.read_csv(buffer).num_rows


def _psycopg_binary_rows(con, query: str) -> int:
    cur = con.cursor()
    cur.execute(f"{query} LIMIT 0")
    types = [d.type_code for d in cur.description]
    with cur.copy(f"COPY ({query}) TO STDOUT (FORMAT binary)") as cp:
        cp.set_types(types)
        return sum(1 for _ in cp.rows())


def _transfer_ways() -> dict:
    """The ways into Arrow (or Python rows), by the name the JSON reports."""
    import psycopg
    from adbc_driver_postgresql import dbapi

    ways = {
        "adbc_arrow": (dbapi.connect, _adbc_arrow),
        "psycopg_text_copy_pyarrow_csv": (psycopg.connect, _psycopg_text_copy),
        "psycopg_binary_copy_row_by_row": (psycopg.connect, _psycopg_binary_rows),
    }
    return {
        name: lambda dsn, tables, c=connect, t=per_table: _transferred_rows(c, t, dsn, tables)
        for name, (connect, per_table) in ways.items()
    }


def _table_rows(db: Path) -> dict[str, int]:
    from omop_etl.cdm import connect
    from omop_etl.schema import cdm_tables
    from omop_etl.sql import quote

    with connect(db) as con:
        return {
            t: con.execute(f"SELECT count(*) FROM {quote(t)}").fetchone()[0] for t in cdm_tables()
        }


def _transfers(dsn: str, tables: list[str], rows: int, repeat: int) -> dict:
    """Median wall and CPU seconds of each way into Arrow, the ways taking turns each round."""
    ways = _transfer_ways()
    walls: dict[str, list[float]] = {name: [] for name in ways}
    cpus: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeat):
        for name, function in ways.items():
            wall, cpu, got = _timed(function, dsn, tables)
            assert got == rows, (name, got, rows)
            walls[name].append(wall)
            cpus[name].append(cpu)
    out: dict = {}
    for name in ways:
        wall = statistics.median(walls[name])
        out[name] = {"seconds": round(wall, 3), "cpu_seconds": round(statistics.median(cpus[name]), 3),
                     "rows_per_s": round(rows / wall)}  # fmt: skip
    for name in list(ways)[1:]:
        out[f"ratio_{name}_over_adbc"] = round(
            out[name]["seconds"] / out["adbc_arrow"]["seconds"], 2
        )
    return out


def run(csv_dir: Path, repeat: int) -> dict:
    """Start the server, load ``csv_dir`` into it, time both routes; the JSON document."""
    from omop_etl.load import load_omop_csv
    from omop_etl.local_postgres import CDM_SCHEMA, load_csv_schema, reader_password, start_server
    from omop_etl.postgres_load import load_postgres

    with start_server() as server, tempfile.TemporaryDirectory(prefix="fedomop-bench-") as tmp:
        copy_in, _, _ = _timed(load_csv_schema, server, CDM_SCHEMA, csv_dir)
        server.create_reader([CDM_SCHEMA])
        tables = [t for (t,) in server.execute(
            f"SELECT relname FROM pg_stat_user_tables WHERE schemaname = '{CDM_SCHEMA}' ORDER BY 1"
        )]  # fmt: skip
        rows = sum(server.execute(f'SELECT count(*) FROM cdm."{t}"')[0][0] for t in tables)
        csv_db, pg_db = Path(tmp) / "csv.duckdb", Path(tmp) / "pg.duckdb"
        runs: dict[str, list[float]] = {"csv": [], "postgres": []}
        cpu: dict[str, list[float]] = {"csv": [], "postgres": []}
        with reader_password():
            for _ in range(repeat):
                wall, used, _ = _timed(load_omop_csv, csv_dir, csv_db, progress=False)
                runs["csv"].append(wall)
                cpu["csv"].append(used)
                wall, used, _ = _timed(load_postgres, server.dsn(), CDM_SCHEMA, pg_db,
                                       progress=False)  # fmt: skip
                runs["postgres"].append(wall)
                cpu["postgres"].append(used)
            transfer = _transfers(server.dsn(), tables, rows, repeat)
        equal = _table_rows(csv_db) == _table_rows(pg_db)
    median = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "source": "postgres",
        "data": str(csv_dir),
        "cpus": len(os.sched_getaffinity(0)),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "tables": len(tables),
        "source_rows": rows,
        "postgres_copy_in_seconds": round(copy_in, 2),
        "repeat": repeat,
        "wall_seconds_median": {k: round(v, 2) for k, v in median.items()},
        "wall_seconds_runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "cpu_seconds_median": {k: round(statistics.median(v), 2) for k, v in cpu.items()},
        "source_rows_per_s": {k: round(rows / v) for k, v in median.items()},
        "ratio_postgres_over_csv_seconds": round(median["postgres"] / median["csv"], 2),
        "table_row_counts_equal": equal,
        "transfer_into_arrow": transfer,
    }


def main(csv_dir: Path, repeat: int) -> None:
    print(json.dumps(run(csv_dir, repeat), indent=2))
