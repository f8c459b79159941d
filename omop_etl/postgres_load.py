"""``etl postgres``: build a node's CDM 5.4 file from an OMOP CDM held in PostgreSQL, in full or
incrementally (only the tables that changed since the last load).

The tables come from one read-only snapshot (``omop_etl.postgres``) and go through
``load.load_sources``, the code path of ``etl omop-csv``: upgrade from 5.3, validation,
quarantine with reasons, rekeying of reused ids, progress, and the atomic swap of the file.

An incremental load copies the previous file and rebuilds only the tables whose PostgreSQL
change marker (``PgRelation.marker``) differs from the one stored in ``etl_source_markers`` by
the previous load, plus every table that checks its rows against ``person`` when ``person``
changed. Anything else that would change the result (another database, schema or vocabulary
folder, another duplicate policy, a restarted server or reset counters) makes it a full load, so
its result always equals a full load's.

PostgreSQL publishes a session's counters shortly after its commit, not with it: when the session
goes idle (within 10 s) or ends, at most 60 s later while it stays busy. A load started a minute
after the refresh committed sees every change; one started sooner may rebuild a table one night
late (the marker it stores is the one it saw, so the next load catches up).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb

from omop_etl.build import atomic_build
from omop_etl.cdm import connect
from omop_etl.load import RENAMED_IN_54, REQUIRED_FILES, load_sources
from omop_etl.postgres import PgRelation, PgTable, check_types, snapshot, source_relations
from omop_etl.quarantine import MARKERS_TABLE, QUARANTINE_TABLE, REKEYED_TABLE
from omop_etl.report import LoadReport
from omop_etl.schema import cdm_tables, create_cdm_schema, create_table_sql
from omop_etl.sources import EtlInputError
from omop_etl.sql import quote
from omop_etl.vocab import default_vocabulary_dir

#: Bumped when a change of this loader makes old files differ from what it builds now.
MARKERS_FORMAT = 1


def _check_relations(relations: dict[str, PgRelation], schema: str) -> None:
    """Stop before copying anything when a required table is missing or a column's type
    cannot hold its CDM field."""
    for name in REQUIRED_FILES:
        if name not in relations:
            raise EtlInputError(f"schema '{schema}': required table {schema}.{name} is missing")
    for name, relation in relations.items():
        if name in cdm_tables():
            check_types(relation, RENAMED_IN_54.get(name, {}))


def _previous_markers(db_path: Path, origin: str) -> tuple[dict[str, str | None] | None, str]:
    """The markers the previous load of the same origin stored in ``db_path``, or None and why
    not (then the load is a full one)."""
    if not db_path.is_file():
        return None, f"no previous file {db_path.name}"
    with connect(db_path) as con:
        stored = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [MARKERS_TABLE]
        ).fetchone()[0]
        if not stored:
            return None, f"{db_path.name} holds no markers of a PostgreSQL load"
        rows = con.execute(f"SELECT table_name, marker, origin FROM {MARKERS_TABLE}").fetchall()
    if not rows or any(row[2] != origin for row in rows):
        return None, "another source, settings or server start than the previous load"
    return {name: marker for name, marker, _ in rows}, ""


def _changed(previous: dict[str, str | None], markers: dict[str, str | None]) -> set[str]:
    """Tables to rebuild: new, gone, changed or without a marker; with ``person`` every table
    whose rows are checked against persons."""
    changed = {
        name
        for name in previous.keys() | markers.keys()
        if previous.get(name) != markers.get(name) or (name in markers and markers[name] is None)
    }
    if "person" in changed:
        changed |= {t.name for t in cdm_tables().values() if t.has_person}
    return changed


def _reset_tables(con: duckdb.DuckDBPyConnection, names: set[str]) -> None:
    """Empty the tables an incremental load rebuilds, with their quarantined and rekeyed rows.
    A table is dropped and created anew so that its storage and indexes are a full load's."""
    has_rekeyed = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [REKEYED_TABLE]
    ).fetchone()[0]
    for name in sorted(names):
        if name in cdm_tables():
            con.execute(f"DROP TABLE IF EXISTS {quote(name)}")
            con.execute(create_table_sql(cdm_tables()[name]))
        con.execute(f"DELETE FROM {QUARANTINE_TABLE} WHERE target_table = ?", [name])
        if has_rekeyed:
            con.execute(f"DELETE FROM {REKEYED_TABLE} WHERE target_table = ?", [name])


def _store_markers(
    con: duckdb.DuckDBPyConnection, origin: str, relations: dict[str, PgRelation]
) -> None:
    con.execute(
        f"""CREATE OR REPLACE TABLE {MARKERS_TABLE} (table_name VARCHAR PRIMARY KEY,
            relation VARCHAR NOT NULL, marker VARCHAR, origin VARCHAR NOT NULL)"""
    )
    con.executemany(
        f"INSERT INTO {MARKERS_TABLE} VALUES (?, ?, ?, ?)",
        [[name, r.qualified, r.marker(), origin] for name, r in sorted(relations.items())],
    )


def load_postgres(
    dsn: str,
    cdm_schema: str,
    db_path: str | Path,
    *,
    vocab_schema: str | None = None,
    vocab_dir: str | Path | None = None,
    incremental: bool = False,
    progress: bool = True,
    rekey_duplicates: bool = True,
) -> LoadReport:
    """Build the CDM file ``db_path`` from the CDM in schema ``cdm_schema`` of ``dsn``.

    Vocabulary tables come from ``vocab_schema`` when given, else from ``cdm_schema``; those
    neither has come from ``vocab_dir`` (default: the shipped vocabulary). Tables of the schema
    that are no CDM 5.4 table go to the quarantine, as files do in ``load_omop_csv``. On any
    error (``EtlInputError``: connection, schema, table, type, a connection lost mid-copy) the
    previous ``db_path`` is untouched.
    """
    started = time.perf_counter()
    db_path = Path(db_path)
    vocab = Path(vocab_dir or default_vocabulary_dir()).resolve()
    report = LoadReport(db_path=db_path, source=f"postgres {cdm_schema}")
    with snapshot(dsn) as session:
        database, epoch = session.epoch()
        report.source = f"postgres {database}.{cdm_schema}"
        relations, notes = source_relations(session, cdm_schema, vocab_schema)
        report.notes.extend(notes)
        _check_relations(relations, cdm_schema)
        origin = json.dumps(
            {"database": database, "cdm_schema": cdm_schema, "vocab_schema": vocab_schema,
             "vocab_dir": str(vocab), "rekey_duplicates": rekey_duplicates, "epoch": epoch,
             "format": MARKERS_FORMAT},
            sort_keys=True,
        )  # fmt: skip
        changed = None
        if incremental:
            previous, why = _previous_markers(db_path, origin)
            if previous is None:
                report.notes.append(f"incremental: full load ({why})")
            else:
                changed = _changed(previous, {n: r.marker() for n, r in relations.items()})
                report.notes.append(
                    f"incremental: {len(changed)} tables rebuilt, the others unchanged since "
                    "the last load"
                )
        sources = {name: PgTable(session, relation) for name, relation in relations.items()}
        with atomic_build(db_path, copy_existing=changed is not None) as con:
            if changed is None:
                create_cdm_schema(con, indexes=False)
            else:
                _reset_tables(con, changed)
            load_sources(
                con, sources, vocab, report, progress=progress, rekey=rekey_duplicates,
                only=changed,
            )  # fmt: skip
            _store_markers(con, origin, relations)
    report.seconds = time.perf_counter() - started
    return report
