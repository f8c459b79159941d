"""The quarantine: rows that cannot enter the CDM, kept with the reason and where they came from.

Nothing a node operator hands to an ETL is dropped silently. A rejected row is stored in
``etl_quarantine`` of the same CDM file, with its source file and line, the table it was meant
for, a reason from ``Reason`` and the raw source values as JSON, so it can be fixed and reloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import duckdb

from omop_etl.sql import quote, quote_text

QUARANTINE_TABLE = "etl_quarantine"
REKEYED_TABLE = "etl_rekeyed"
#: The PostgreSQL route's change marker of each source table (``omop_etl.postgres_load``); any
#: other change of the file's tables must drop it, so that the next incremental load is a full one.
MARKERS_TABLE = "etl_source_markers"


class Reason(StrEnum):
    """Why a row was quarantined (the values are what the table and the console show)."""

    TOO_FEW_FIELDS = "too few fields"
    CONTROL_CHARACTER = "control character"
    MISSING_REQUIRED = "missing required field"
    MALFORMED_NUMBER = "malformed number"
    UNPARSEABLE_DATE = "unparseable date"
    IMPOSSIBLE_DATE = "impossible date"
    END_BEFORE_START = "end before start"
    UNKNOWN_PERSON = "unknown person"
    DUPLICATE_KEY = "duplicate primary key"
    NO_CDM_TABLE = "no CDM 5.4 table"


#: C0 control characters a text field may not hold (an RE2 class): NUL and the rest, except tab,
#: line feed and carriage return (a quoted CSV field may span lines). DuckDB keeps a NUL byte as
#: it is, and it would leave the node in a source value, a report, a released label.
CONTROL_CHARACTERS = r"[\x00-\x08\x0B\x0C\x0E-\x1F]"


def control_character_check(raw: str, column: str) -> tuple[Reason, str, str]:
    """(reason, SQL condition, reason text naming ``column``) rejecting a row whose text value
    ``raw`` (SQL) holds a ``CONTROL_CHARACTERS`` character."""
    condition = f"coalesce(regexp_matches({raw}, '{CONTROL_CHARACTERS}'), false)"
    return Reason.CONTROL_CHARACTER, condition, f"{Reason.CONTROL_CHARACTER.value} in {column}"


def reason_case(checks: Sequence[tuple[Reason, str] | tuple[Reason, str, str]]) -> str:
    """First failing reason (in ``Reason`` order) as a SQL CASE, NULL when the row loads; a
    check's third element, when it has one, is the text stored (a reason naming its column)."""
    order = list(Reason)
    ranked = sorted(checks, key=lambda check: order.index(check[0]))
    whens = (f"WHEN {c[1]} THEN {quote_text(c[2] if len(c) > 2 else c[0].value)}" for c in ranked)
    return "CASE " + " ".join(whens) + " END"


def create_quarantine_table(con: duckdb.DuckDBPyConnection) -> None:
    """Create ``etl_quarantine`` if it is not there yet."""
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {QUARANTINE_TABLE} (
            source_file VARCHAR NOT NULL,
            source_line BIGINT,
            target_table VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            raw JSON
        )"""
    )


def quarantine_rows(
    con: duckdb.DuckDBPyConnection,
    relation: str,
    *,
    source_file: str,
    target_table: str,
    raw_columns: Sequence[str],
    line_column: str = "_line",
    reason_column: str = "_reason",
    source_lines: str | None = None,
) -> dict[str, int]:
    """Move every row of ``relation`` whose ``reason_column`` is set into the quarantine.

    ``relation`` is a table or view holding the raw source columns, the source line and the
    reason (NULL for rows that load). One INSERT ... SELECT, in line order so reruns match.
    ``source_lines`` (``_line``, ``_source_line``), when a quoted field of the file spans lines,
    gives the line each row starts on (``sources.staged_source_lines``).
    Returns the number of quarantined rows per reason.
    """
    create_quarantine_table(con)
    raw = ", ".join(f"{quote(c)} := {quote(c)}" for c in raw_columns)
    raw_json = f"to_json(struct_pack({raw}))" if raw_columns else "NULL"
    line, reason = quote(line_column), quote(reason_column)
    source_line, lines_join = f"r.{line}", ""
    if source_lines:
        source_line = f"coalesce(l._source_line, r.{line})"
        lines_join = f"LEFT JOIN {quote(source_lines)} l ON l._line = r.{line}"
    con.execute(
        f"""INSERT INTO {QUARANTINE_TABLE}
            SELECT ?, {source_line}, ?, r.{reason}, {raw_json}
            FROM {quote(relation)} r {lines_join} WHERE r.{reason} IS NOT NULL
            ORDER BY r.{line}""",
        [source_file, target_table],
    )
    rows = con.execute(
        f"SELECT {reason}, count(*) FROM {quote(relation)} WHERE {reason} IS NOT NULL "
        "GROUP BY ALL ORDER BY 1"
    ).fetchall()
    return dict(rows)


def log_rekeyed(
    con: duckdb.DuckDBPyConnection,
    relation: str,
    *,
    source_file: str,
    target_table: str,
    source_id: str,
    new_id: str,
) -> int:
    """Record in ``etl_rekeyed`` the rows of ``relation`` flagged ``_dup`` that were loaded
    under a new id (``new_id``) instead of their source id (``source_id``, SQL expressions)."""
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {REKEYED_TABLE} (source_file VARCHAR NOT NULL,
            source_line BIGINT, target_table VARCHAR NOT NULL, source_id VARCHAR,
            new_id BIGINT NOT NULL)"""
    )
    con.execute(
        f"""INSERT INTO {REKEYED_TABLE} SELECT ?, _line, ?, {source_id}, {new_id}
            FROM {quote(relation)} WHERE _dup ORDER BY _line""",
        [source_file, target_table],
    )
    return con.execute(f"SELECT count(*) FROM {quote(relation)} WHERE _dup").fetchone()[0]


def quarantine_counts(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], int]:
    """Quarantined rows per (target table, reason) in the CDM file of ``con``."""
    rows = con.execute(
        f"SELECT target_table, reason, count(*) FROM {QUARANTINE_TABLE} GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    return {(table, reason): n for table, reason, n in rows}
