"""Set-based loading of one source (a CSV or Parquet file, a database table) into one CDM
table, with row-level validation in SQL.

Every source is read as text into a staging table (``omop_etl.sources``), so that nothing is lost
to a type sniffer. One SQL statement then types every column with strict patterns plus TRY_CAST and
gives each row its first failing reason (too few fields, missing required field, malformed
number, unparseable or impossible date, end before start, unknown person, duplicate primary
key). Good rows go into
the CDM table in source-line order (reruns give identical tables); the others go to the
quarantine with their source line. No Python loop ever touches a row.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import duckdb

from omop_etl.quarantine import (
    Reason,
    control_character_check,
    log_rekeyed,
    quarantine_rows,
    reason_case,
)
from omop_etl.report import TableCounts
from omop_etl.schema import INDEXED_CONCEPT_COLUMNS, CdmField, CdmTable
from omop_etl.sources import (
    STAGE_TABLE,
    CsvDialect,
    EtlInputError,
    TableSource,
    drop_stage,
    file_source,
)
from omop_etl.sql import quote

_CHECKED = "_etl_checked"
_INTEGER = r"[+-]?\d+(\.0*)?"
_FLOAT = r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"
_DATE = r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z?)?|\d{8}"


def _raw(source: str | None, field: CdmField) -> str:
    """SQL text of the raw value (NULL when blank): trimmed unless it is free text."""
    if source is None:
        return "CAST(NULL AS VARCHAR)"
    return f"NULLIF({source}, '')" if field.kind == "varchar" else f"NULLIF(trim({source}), '')"


def _timestamp(raw: str) -> str:
    return (
        f"CASE WHEN regexp_full_match({raw}, '\\d{{8}}') THEN try_strptime({raw}, '%Y%m%d') "
        f"ELSE TRY_CAST(rtrim({raw}, 'Z') AS TIMESTAMP) END"
    )


def _typed(raw: str, field: CdmField) -> str:
    """SQL text converting the raw text to the field's DuckDB type (NULL if it cannot)."""
    if field.kind == "integer":
        return f"TRY_CAST({raw} AS {field.sql_type})"
    if field.kind == "float":
        return f"TRY_CAST({raw} AS DOUBLE)"
    if field.kind in ("date", "datetime"):
        return f"CAST({_timestamp(raw)} AS {field.sql_type})"
    return raw


def _failures(
    raw: str, typed: str, field: CdmField
) -> list[tuple[Reason, str] | tuple[Reason, str, str]]:
    """(reason, SQL condition) pairs that reject a row because of this field."""
    checks: list[tuple[Reason, str] | tuple[Reason, str, str]] = []
    if field.kind == "varchar":
        checks.append(control_character_check(raw, field.name))
    if field.required:
        checks.append((Reason.MISSING_REQUIRED, f"{raw} IS NULL"))
    if field.kind in ("integer", "float"):
        pattern = _INTEGER if field.kind == "integer" else _FLOAT
        checks.append(
            (
                Reason.MALFORMED_NUMBER,
                f"({raw} IS NOT NULL AND (NOT regexp_full_match({raw}, '{pattern}') "
                f"OR {typed} IS NULL))",
            )
        )
    if field.kind in ("date", "datetime"):
        checks.append((Reason.UNPARSEABLE_DATE, f"NOT regexp_full_match({raw}, '{_DATE}')"))
        checks.append((Reason.IMPOSSIBLE_DATE, f"({raw} IS NOT NULL AND {typed} IS NULL)"))
    return checks


def _integer_key(table: CdmTable) -> bool:
    """Whether the table has a one-column integer primary key (which can be given new ids)."""
    return len(table.primary_key) == 1 and table.field(table.primary_key[0]).kind == "integer"


def _checked_sql(
    table: CdmTable,
    sources: Mapping[str, str | None],
    person_check: bool,
    rekey_duplicates: bool = False,
    complete: str = "true",
    first_line: int = 2,
) -> str:
    """SELECT giving, per staged row, the line, raw columns, typed columns and the reason.

    ``complete`` is the SQL condition that the staged row has all its fields
    (``TableSource.complete``); ``first_line`` turns the staged row's ``rowid`` into its line
    (``TableSource.first_line``).

    Raw (``__raw__<field>``) and typed (``__<field>``) values are computed once in an inner
    query; the reason CASE then only tests those columns. A row whose primary key repeats an
    earlier valid row's (``_dup``) is quarantined, or with ``rekey_duplicates`` loaded under a
    new id above the file's largest.
    """
    values = [f"{complete} AS _complete"]
    checks: list[tuple[Reason, str] | tuple[Reason, str, str]] = [
        (Reason.TOO_FEW_FIELDS, "NOT _complete")
    ]
    for field in table.fields:
        raw, typed = quote("__raw__" + field.name), quote("__" + field.name)
        raw_sql = _raw(sources.get(field.name), field)
        values.append(f"{raw_sql} AS {raw}, {_typed(raw_sql, field)} AS {typed}")
        checks.extend(_failures(raw, typed, field))
    for start, end in table.date_ranges:
        checks.append((Reason.END_BEFORE_START, f"{quote('__' + end)} < {quote('__' + start)}"))
    reason = reason_case(checks)
    sql = f"""SELECT *, {reason} AS _reason FROM (
        SELECT rowid + {first_line:d} AS _line, *, {", ".join(values)} FROM {STAGE_TABLE}) AS typed"""
    if person_check:
        sql = f"""SELECT c.* REPLACE (CASE WHEN c._reason IS NULL AND p.person_id IS NULL
                  THEN '{Reason.UNKNOWN_PERSON.value}' ELSE c._reason END AS _reason)
                  FROM ({sql}) AS c LEFT JOIN person AS p ON p.person_id = c.__person_id"""
    if table.primary_key:
        key = [quote("__" + k) for k in table.primary_key]
        sql = f"""SELECT *, (_reason IS NULL AND row_number() OVER (
                  PARTITION BY {", ".join(key)}, _reason IS NULL ORDER BY _line) > 1) AS _dup
                  FROM ({sql})"""
        if rekey_duplicates and _integer_key(table):
            sql = f"""SELECT * REPLACE (CASE WHEN _dup THEN max({key[0]}) OVER ()
                      + row_number() OVER (PARTITION BY _dup ORDER BY _line)
                      ELSE {key[0]} END AS {key[0]}) FROM ({sql})"""
        else:
            sql = f"""SELECT * REPLACE (CASE WHEN _dup THEN '{Reason.DUPLICATE_KEY.value}'
                      ELSE _reason END AS _reason) FROM ({sql})"""
    return sql


def map_columns(
    source: str | Path,
    header: list[str],
    table: CdmTable,
    renames: Mapping[str, str],
    fills: Mapping[str, str],
) -> tuple[dict[str, str | None], list[str]]:
    """Match the file's columns to the table's fields (case-insensitive, after renames).

    Returns the SQL source per field (a quoted staged column, a fill expression or None) and the
    source's columns that the table does not have. A required field that is neither in the
    source nor filled is an ``EtlInputError`` naming the source (``source``) and the column.
    """
    by_field = {renames.get(h.lower(), h.lower()): h for h in header}
    sources: dict[str, str | None] = {}
    for field in table.fields:
        if field.name in by_field:
            sources[field.name] = quote(by_field[field.name])
        elif field.name in fills:
            sources[field.name] = fills[field.name]
        elif field.required:
            raise EtlInputError(
                f"{source}: required column '{field.name}' of table {table.name} is missing"
            )
        else:
            sources[field.name] = None
    extra = [h for f, h in by_field.items() if f not in sources]
    return sources, extra


def load_csv_table(
    con: duckdb.DuckDBPyConnection,
    table: CdmTable,
    path: Path,
    dialect: CsvDialect,
    **options: Any,
) -> tuple[TableCounts, dict[str, int], list[str]]:
    """Load the file ``path`` (CSV in ``dialect``, or Parquet) into ``table`` (``load_table``'s
    options)."""
    return load_table(con, table, file_source(path, dialect), **options)


def load_table(
    con: duckdb.DuckDBPyConnection,
    table: CdmTable,
    source: TableSource,
    *,
    renames: Mapping[str, str] | None = None,
    fills: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
    rekey_duplicates: bool = False,
) -> tuple[TableCounts, dict[str, int], list[str]]:
    """Load ``source`` into ``table``; quarantine what cannot load.

    ``renames`` maps (lower-case) source column names to CDM field names; ``fills`` gives SQL
    expressions (over the staged columns and ``_line``) for fields the source lacks, and
    ``overrides`` expressions that replace a field whether or not the source has it.
    ``rekey_duplicates`` loads rows that reuse an earlier row's id under a new id and logs
    them in ``etl_rekeyed`` (for sources whose ids are only unique per person).
    Returns the counts, quarantined rows per reason and the ignored source columns.
    """
    header = source.stage(con)
    sources, extra = map_columns(source.name, header, table, renames or {}, fills or {})
    sources.update(overrides or {})
    con.execute(f"DROP TABLE IF EXISTS {_CHECKED}")
    checked = _checked_sql(
        table,
        sources,
        table.has_person,
        rekey_duplicates,
        source.complete(header),
        first_line=source.first_line,
    )
    con.execute(f"CREATE TEMP TABLE {_CHECKED} AS {checked}")
    columns = ", ".join(quote(c) for c in table.columns)
    typed = ", ".join(quote("__" + c) for c in table.columns)
    con.execute(
        f"INSERT INTO {quote(table.name)} ({columns}) "
        f"SELECT {typed} FROM {_CHECKED} WHERE _reason IS NULL ORDER BY _line"
    )
    bad = con.execute(f"SELECT count(*) FROM {_CHECKED} WHERE _reason IS NOT NULL").fetchone()[0]
    per_reason = quarantine_rows(
        con, _CHECKED, source_file=source.name, target_table=table.name, raw_columns=header,
        source_lines=source.source_lines(con, header) if bad else None,
    )  # fmt: skip
    counts = _counts(con, table)
    counts.quarantined = sum(per_reason.values())
    if rekey_duplicates and _integer_key(table):
        counts.rekeyed = log_rekeyed(
            con,
            _CHECKED,
            source_file=source.name,
            target_table=table.name,
            source_id=sources[table.primary_key[0]] or "NULL",
            new_id=quote("__" + table.primary_key[0]),
        )
    con.execute(f"DROP TABLE {_CHECKED}")
    drop_stage(con)
    return counts, per_reason, extra


def quarantine_file(
    con: duckdb.DuckDBPyConnection, path: Path, dialect: CsvDialect, reason: Reason
) -> int:
    """Put every data row of ``path`` into the quarantine with ``reason``; return the count."""
    return quarantine_source(con, file_source(path, dialect), path.stem.lower(), reason)


def quarantine_source(
    con: duckdb.DuckDBPyConnection, source: TableSource, target_table: str, reason: Reason
) -> int:
    """Put every row of ``source`` into the quarantine with ``reason``; return the count."""
    header = source.stage(con)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {_CHECKED} AS "
        f"SELECT rowid + {source.first_line:d} AS _line, *, '{reason.value}' AS _reason "
        f"FROM {STAGE_TABLE}"
    )
    per_reason = quarantine_rows(
        con, _CHECKED, source_file=source.name, target_table=target_table, raw_columns=header,
        source_lines=source.source_lines(con, header),
    )  # fmt: skip
    con.execute(f"DROP TABLE {_CHECKED}")
    drop_stage(con)
    return sum(per_reason.values())


def _counts(con: duckdb.DuckDBPyConnection, table: CdmTable) -> TableCounts:
    """Rows read and loaded; loaded rows whose domain concept is 0 count as unmapped."""
    concept = INDEXED_CONCEPT_COLUMNS.get(table.name, ("",))[0]
    unmapped = (
        f"count(*) FILTER (WHERE _reason IS NULL AND {quote('__' + concept)} = 0)"
        if concept.endswith("_concept_id")
        else "0"
    )
    read, loaded, n_unmapped = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE _reason IS NULL), {unmapped} FROM {_CHECKED}"
    ).fetchone()
    return TableCounts(read=read, loaded=loaded, unmapped=n_unmapped)
