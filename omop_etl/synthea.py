"""Loading a Synthea CSV export into an OMOP CDM v5.4 DuckDB file, set-based in SQL.

Synthea writes one CSV per kind of record (patients, encounters, conditions, medications,
observations, procedures, immunizations, allergies) keyed by UUIDs and coded in SNOMED, RxNorm,
LOINC and CVX. The loader

- reads each file with one SQL statement per part that numbers rows by source line, types,
  validates, maps and inserts them straight into the CDM table; a row that cannot load goes to
  ``etl_quarantine`` with its line, reason and all its raw columns (re-read only then);
- runs those statements at once on separate connections (``parallel.run_tasks``): a statement
  that numbers rows runs on one core, so large files are split into parts (``sources.Part``)
  and the event files load side by side once the visits are in;
- reads a file a second time only when its first pass did not land every line
  (``count_data_lines``): the second pass collects the rows to route to another table or to
  quarantine, and they are applied one file after another, so reruns give identical tables;
- gives UUIDs deterministic integer ids: person_id and visit_occurrence_id are the source line
  minus one; an event row's id is ``FILE_TAG * 10**10 + line`` so every CDM row names its source;
- maps codes through ``concept`` and ``concept_relationship`` ('Maps to'; one code map per
  load, joined while the file is read), keeps ``*_source_value`` and ``*_source_concept_id``,
  gives unmapped codes concept 0 (counted per table), and routes each row to the table of its
  standard concept's domain (a SNOMED "history of" code in conditions.csv lands in
  observation, spirometry in measurement);
- derives observation_period (first to last recorded date per person), death, and
  condition_era / drug_era (OHDSI's 30-day persistence window; drugs at ingredient level);
- adds primary keys and indexes once at the end, as OHDSI's DDL scripts do.

It builds into a new file via ``atomic_build``: on any error the previous database is untouched.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import duckdb
from rich.progress import Progress

from omop_etl.ancestry import ancestry_notes
from omop_etl.build import atomic_build
from omop_etl.cdm import connect
from omop_etl.derived import derived_tasks
from omop_etl.parallel import Task, run_tasks
from omop_etl.report import LoadReport
from omop_etl.schema import cdm_tables, create_cdm_schema, index_statements
from omop_etl.sources import WHOLE_FILE, EtlInputError, count_data_lines
from omop_etl.sql import quote
from omop_etl.synthea_events import (
    apply_exceptions,
    collect_exceptions,
    create_code_map,
    event_columns,
    insert_events,
)
from omop_etl.synthea_persons import (
    encounter_rows,
    finish_visits,
    insert_deaths,
    insert_visits,
    load_patients,
)
from omop_etl.synthea_reading import execute_reading, quarantine_checked, read_source, source_files
from omop_etl.synthea_spec import (
    EHR,
    EVENT_FILES,
    EVENT_STARTS,
    EVENT_TABLES,
    MAPS,
    PLAIN_COLUMNS,
    TARGET_TABLES,
    VISIT_COLUMNS,
)
from omop_etl.vocab import default_vocabulary_dir, load_vocabulary

SPLIT_ROWS = 1_000_000  # a file with more data rows is read in parts, one per worker
#: Passing over a CSV row costs about a fifth of loading it (measured: 0.29-0.38 against
#: 1.65-1.79 microseconds), so the first parts of a split file get more rows.
SKIP_COST = 0.2
#: Settings of every connection that loads: the joins below are written with the small side
#: (id maps, code map) on the right, the hash-join build side. The optimizer cannot estimate a
#: CSV scan and would otherwise hash the whole file with all its columns (measured 1.5x slower).
LOAD_SETTINGS = ("SET disabled_optimizers = 'build_side_probe_side'",)


def _index_tasks(con: duckdb.DuckDBPyConnection) -> list[Task]:
    """Each table's primary key and indexes, one task per table, the largest tables first."""
    tables = [t for t in cdm_tables().values() if index_statements(t, primary_key=True)]
    rows = {
        t.name: con.execute(f"SELECT count(*) FROM {quote(t.name)}").fetchone()[0] for t in tables
    }

    def build(statements: list[str]) -> Callable[[duckdb.DuckDBPyConnection], int]:
        def run(cur: duckdb.DuckDBPyConnection) -> int:
            for statement in statements:
                cur.execute(statement)
            return len(statements)

        return run

    return [
        Task(t.name, t.name, build(index_statements(t, primary_key=True)))
        for t in sorted(tables, key=lambda t: -rows[t.name])
    ]


def _storage_hints() -> dict[str, str]:
    """Compression for columns whose content the load knows: random UUIDs plain, and RLE for the
    fixed-width columns of the visit and event tables it never fills (all NULL: DuckDB would
    otherwise analyse every row group of them with every method, 9% of an insert)."""
    filled = {t: set(event_columns(t, 0)) for t in EVENT_TABLES}
    filled["visit_occurrence"] = set(VISIT_COLUMNS)
    hints = {
        f"{name}.{f.name}": "rle"
        for name, columns in filled.items()
        for f in cdm_tables()[name].fields
        if f.name not in columns and f.kind != "varchar"
    }
    return hints | {column: "uncompressed" for column in PLAIN_COLUMNS}


def _count_rows(con: duckdb.DuckDBPyConnection, report: LoadReport) -> None:
    """Rows per table, from the tables themselves: loaded, read (= loaded + quarantined for
    the tables fed from source rows) and unmapped (concept 0)."""
    concept = {t: f"{prefix}_concept_id" for t, (_, prefix, _) in EVENT_TABLES.items()}
    concept["visit_occurrence"] = "visit_concept_id"
    for table in TARGET_TABLES:
        counts = report.table(table)
        unmapped = (
            f"count(*) FILTER (WHERE {quote(concept[table])} = 0)" if table in concept else "0"
        )
        counts.loaded, counts.unmapped = con.execute(
            f"SELECT count(*), {unmapped} FROM {quote(table)}"
        ).fetchone()
        if table in concept or table == "person":
            counts.read = counts.loaded + counts.quarantined
    report.notes.append(
        "observation_period, death, condition_era and drug_era are derived (read counts 0)"
    )


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (DuckDB's workers included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _part_count(lines: int, workers: int) -> int:
    """How many parts a file of ``lines`` data lines is read in (each parses the lines before
    its own, so only large files are split)."""
    return max(1, min(workers, lines // SPLIT_ROWS))


def _load_visits(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    lines: int,
    workers: int,
    report: LoadReport,
    on_done: Callable[[Task, float], None],
) -> str:
    """encounters.csv -> visit_occurrence in concurrent parts; then its bad rows to the
    quarantine (a second pass, only if some line did not land), and ``visit_map`` (returns its
    key function)."""
    parts = WHOLE_FILE.split(lines, _part_count(lines, workers), SKIP_COST)
    tasks = [
        Task(f"encounters {i}/{len(parts)}", "visit_occurrence",
             lambda cur, part=part: insert_visits(cur, path, part))
        for i, part in enumerate(parts, 1)
    ]  # fmt: skip
    landed = sum(run_tasks(con, tasks, workers=workers, settings=LOAD_SETTINGS, on_done=on_done))
    if landed != lines:
        rows, params = encounter_rows(path, WHOLE_FILE)
        execute_reading(
            con, path,
            f"CREATE TEMP TABLE _checked AS SELECT * FROM ({rows}) WHERE _reason IS NOT NULL",
            params,
        )  # fmt: skip
        quarantine_checked(con, "_checked", path, report, target="visit_occurrence")
        con.execute("DROP TABLE _checked")
    return finish_visits(con, path, report)


def _load_event_files(
    con: duckdb.DuckDBPyConnection,
    files: dict[str, Path],
    lines: dict[str, int],
    workers: int,
    report: LoadReport,
    on_done: Callable[[Task, float], None],
    visit_key: str,
) -> None:
    """Every event file, largest first, side by side: the first passes (a task per part, which
    also collects its file's exceptions when it is the only part), then the exceptions of
    each file in ``EVENT_FILES`` order."""
    tasks, owners = [], []
    for spec in sorted(EVENT_FILES, key=lambda s: -lines[s.name]):
        path, n = files[spec.name], lines[spec.name]
        parts = WHOLE_FILE.split(n, _part_count(n, workers), SKIP_COST)
        for i, part in enumerate(parts, 1):

            def run(cur, spec=spec, path=path, part=part, n=n, whole=len(parts) == 1) -> int:
                landed = insert_events(cur, spec, path, part, visit_key)
                if whole:
                    collect_exceptions(cur, spec, path, n, landed)
                return landed

            tasks.append(Task(f"{spec.name} {i}/{len(parts)}", spec.table, run))
            owners.append((spec, len(parts)))
    landed: dict[str, int] = {}
    counts = run_tasks(con, tasks, workers=workers, settings=LOAD_SETTINGS, on_done=on_done)
    for (spec, _), count in zip(owners, counts, strict=True):
        landed[spec.name] = landed.get(spec.name, 0) + count
    for spec, parts in dict(owners).items():
        if parts > 1:
            collect_exceptions(con, spec, files[spec.name], lines[spec.name], landed[spec.name])
    for spec in EVENT_FILES:
        if landed[spec.name] != lines[spec.name]:  # what made collect_exceptions collect
            apply_exceptions(con, spec, files[spec.name], report, visit_key)


def load_synthea(
    src_dir: str | Path,
    db_path: str | Path,
    *,
    vocab_dir: str | Path | None = None,
    progress: bool = True,
    memory_limit: str | None = None,
    workers: int | None = None,
    timings: dict[str, float] | None = None,
) -> LoadReport:
    """Build the CDM file ``db_path`` from the Synthea CSV export in ``src_dir``.

    ``vocab_dir`` is an Athena vocabulary export (default: the shipped one). A missing file or
    required column raises ``EtlInputError`` and leaves the previous ``db_path`` untouched.
    ``memory_limit`` (e.g. '1GB') caps DuckDB's memory; ``workers`` is how many files or parts
    load at once (default: DuckDB's ``threads``, the number of cores). ``timings``, if given,
    receives wall seconds per stage (vocabulary, load_map, index; ``load_map/<file>`` per
    source file, summed over its parts, which overlap) and the process's CPU seconds, DuckDB's
    threads included, under ``cpu_<stage>``.
    """
    started = time.perf_counter()
    src, db_path = Path(src_dir), Path(db_path)
    if not src.is_dir():
        raise EtlInputError(f"Synthea folder not found: {src}")
    files = source_files(src)
    vocab = Path(vocab_dir) if vocab_dir else default_vocabulary_dir()
    report = LoadReport(db_path=db_path, source=f"synthea {src.name}")
    for table in TARGET_TABLES:
        report.table(table)
    seconds = timings if timings is not None else {}
    lock = threading.Lock()

    def record(stage: str, wall: float, cpu: float | None = None) -> None:
        with lock:
            seconds[stage] = seconds.get(stage, 0.0) + wall
            if cpu is not None:
                seconds[f"cpu_{stage}"] = seconds.get(f"cpu_{stage}", 0.0) + cpu

    @contextmanager
    def clock(stage: str) -> Iterator[None]:
        t, cpu = time.perf_counter(), _cpu_seconds()
        yield
        record(stage, time.perf_counter() - t, _cpu_seconds() - cpu)

    with (
        ThreadPoolExecutor(1, thread_name_prefix="fedomop-count") as counter,
        atomic_build(db_path) as con,
        Progress(disable=not progress, transient=True) as bar,
    ):
        # encounters and the largest files first: their line counts decide how to split them
        by_size = sorted(
            (n for n in files if n != "patients"), key=lambda n: -files[n].stat().st_size
        )
        counting: dict[str, Future[int]] = {
            n: counter.submit(count_data_lines, files[n]) for n in by_size
        }
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        workers = workers or int(con.execute("SELECT current_setting('threads')").fetchone()[0])
        task = bar.add_task("vocabulary", total=4)  # + one step per file part

        def on_done(done: Task, wall: float) -> None:
            record(f"load_map/{done.label.split()[0]}", wall)
            bar.advance(task)

        with clock("vocabulary"):
            bar.update(task, description=f"vocabulary {vocab}")
            create_cdm_schema(con, indexes=False, primary_keys=False, compression=_storage_hints())
            load_vocabulary(con, vocab)
            bar.advance(task)
        with clock("load_map"):
            for statement in LOAD_SETTINGS:
                con.execute(statement)
            con.execute(f"ATTACH ':memory:' AS {MAPS}")
            create_code_map(con)
            with clock("load_map/patients"):
                bar.update(task, description=files["patients"].name)
                load_patients(con, files["patients"], report)
                bar.advance(task)
            lines = {name: future.result() for name, future in counting.items()}
            bar.update(task, total=4 + sum(_part_count(n, workers) for n in lines.values()))
            bar.update(task, description="encounters")
            visit_key = _load_visits(
                con, files["encounters"], lines["encounters"], workers, report, on_done
            )
            bar.update(task, description="conditions, medications, observations, ...")
            _load_event_files(con, files, lines, workers, report, on_done, visit_key)
            with clock("load_map/derived"):
                bar.update(task, description="observation periods, deaths, eras")
                derived = derived_tasks(EVENT_STARTS, EHR, insert_deaths)
                run_tasks(con, derived, workers=workers, settings=LOAD_SETTINGS)
                bar.advance(task)
            con.execute(f"DETACH {MAPS}")
        with clock("index"):
            bar.update(task, description="primary keys and indexes")
            run_tasks(con, _index_tasks(con), workers=workers)
            bar.advance(task)
        _count_rows(con, report)
        report.notes.extend(ancestry_notes(con))
    report.seconds = time.perf_counter() - started
    return report


def source_rows(src_dir: str | Path) -> dict[str, int]:
    """Data rows per Synthea file the loader reads (for reports and benchmarks), rows with too
    few fields included, as the loader reads them."""
    files = source_files(Path(src_dir))
    con = connect(read_only=False)
    counts = {}
    for name, path in files.items():
        source, params = read_source(path, (), lambda _: {})
        counts[name] = con.execute(f"SELECT count(*) FROM {source}", params).fetchone()[0]
    con.close()
    return counts
