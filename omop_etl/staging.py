"""Set-based loading of one CSV file into one CDM table, with row-level validation in SQL.

Every file is read as text (``all_varchar``) into a staging table, so that nothing is lost to a
type sniffer. One SQL statement then types every column with strict patterns plus TRY_CAST and
gives each row its first failing reason (missing required field, malformed number, unparseable
or impossible date, end before start, unknown person, duplicate primary key). Good rows go into
the CDM table in source-line order (reruns give identical tables); the others go to the
quarantine with their source line. No Python loop ever touches a row.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import duckdb
import numpy as np

from omop_etl.quarantine import Reason, log_rekeyed, quarantine_rows
from omop_etl.report import TableCounts
from omop_etl.schema import INDEXED_CONCEPT_COLUMNS, CdmField, CdmTable, quote

_STAGE = "_etl_stage"
_LINES = "_etl_stage_lines"
_CHECKED = "_etl_checked"
_INTEGER = r"[+-]?\d+(\.0*)?"
_FLOAT = r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"
_DATE = r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z?)?|\d{8}"


class EtlInputError(Exception):
    """The input cannot be loaded at all (missing file or column, unreadable CSV)."""


@dataclass(frozen=True)
class CsvDialect:
    """How a family of CSV files is written."""

    delimiter: str
    quote: str  # empty: quotes are ordinary characters (Athena)


OMOP_CSV = CsvDialect(delimiter=",", quote='"')
ATHENA = CsvDialect(delimiter="\t", quote="")


@dataclass(frozen=True)
class Part:
    """The data rows numbered [first, stop) of a CSV file (``stop`` None: to its end).

    Rows are numbered from the top of the file (header = 1, as ``rowid + 2`` of ``stage_csv``),
    so a part of a large file can be read by its own statement on its own core and still give
    every row the number the whole file would."""

    first: int = 2
    stop: int | None = None

    def split(self, rows: int, parts: int, skip_cost: float = 0.0) -> list[Part]:
        """``parts`` consecutive parts covering a file of about ``rows`` data rows; the last one
        runs to the end, so a low estimate loses nothing.

        A part passes over the rows before its own; ``skip_cost`` is what that costs per row
        relative to loading one, and earlier parts get more rows so that all finish together:
        part i, starting at row s_i with n_i rows, costs ``skip_cost * s_i + n_i``.
        """
        if parts <= 1:
            return [self]
        keep = 1.0 - skip_cost
        if skip_cost > 0:
            each = rows * skip_cost / (1.0 - keep**parts)
            starts = [each * (1.0 - keep**i) / skip_cost for i in range(parts)]
        else:
            starts = [rows * i / parts for i in range(parts)]
        bounds = [2 + round(start) for start in starts] + [None]
        return [Part(bounds[i], bounds[i + 1]) for i in range(parts)]


WHOLE_FILE = Part()


def count_data_lines(path: Path, chunk: int = 1 << 24) -> int:
    """Lines after the header, counted at memory speed (numpy, no parsing).

    An upper bound on the file's rows: a quoted field that spans lines or a blank line adds one.
    So a load that lands exactly this many rows from a file has nothing left to route or
    quarantine, and any other count sends it down the full path.
    """
    newlines, last = 0, b"\n"
    buffer = bytearray(chunk)
    with path.open("rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            newlines += int(np.count_nonzero(np.frombuffer(buffer, np.uint8, size) == 10))
            last = bytes(buffer[size - 1 : size])
    return newlines - 1 + (last != b"\n")


def find_table_file(folder: Path, table: str) -> Path | None:
    """The ``<table>.csv`` file of ``folder`` whatever the case of its name, or None."""
    matches = sorted(p for p in folder.glob("*") if p.name.lower() == f"{table}.csv")
    return matches[0] if matches else None


def read_header(path: Path, dialect: CsvDialect) -> list[str]:
    """Column names of ``path`` as written in its first line."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(
                handle,
                delimiter=dialect.delimiter,
                quoting=csv.QUOTE_MINIMAL if dialect.quote else csv.QUOTE_NONE,
            )
            header = next(reader, None)
    except UnicodeDecodeError as error:
        raise EtlInputError(f"{path}: not UTF-8 text ({error})") from error
    if not header or not any(name.strip() for name in header):
        raise EtlInputError(f"{path}: no header line (empty file)")
    return [name.strip() for name in header]


def stage_csv(con: duckdb.DuckDBPyConnection, path: Path, dialect: CsvDialect) -> list[str]:
    """Read ``path`` as text into the temp table ``_etl_stage``; return its column names.

    The staging table keeps file order, so ``rowid + 2`` is the source line (header is line 1;
    exact while no quoted field spans lines).
    """
    header = read_header(path, dialect)
    if len({h.lower() for h in header}) != len(header):
        raise EtlInputError(f"{path}: duplicate column names in header {header}")
    con.execute(f"DROP TABLE IF EXISTS {_STAGE}")
    try:
        con.execute(
            f"""CREATE TEMP TABLE {_STAGE} AS SELECT * FROM read_csv(
                ?, header = true, auto_detect = false, columns = ?, delim = ?, quote = ?,
                escape = ?, strict_mode = true)""",
            [str(path), {h: "VARCHAR" for h in header}, dialect.delimiter, dialect.quote,
             dialect.quote],
        )  # fmt: skip
    except duckdb.Error as error:
        raise EtlInputError(f"{path}: not a readable CSV file: {error}") from error
    return header


def stage_arrow(con: duckdb.DuckDBPyConnection, batches: Any, name: str) -> list[str]:
    """Read an Arrow stream (``pyarrow.RecordBatchReader``) as text into ``_etl_stage``, in
    stream order; return its column names.

    Typed values become the text that the CSV route would stage (DuckDB's casts print dates,
    timestamps and numbers in the ISO and shortest round-trip forms that ``_checked_sql``
    parses back to the same values), so a database source is validated like a file. ``name``
    says in messages which source it is."""
    header = [field.name for field in batches.schema]
    if len({h.lower() for h in header}) != len(header):
        raise EtlInputError(f"{name}: duplicate column names {header}")
    view = "_etl_arrow_source"
    con.execute(f"DROP TABLE IF EXISTS {_STAGE}")
    con.register(view, batches)
    try:
        text = ", ".join(f"CAST({quote(h)} AS VARCHAR) AS {quote(h)}" for h in header)
        con.execute(f"CREATE TEMP TABLE {_STAGE} AS SELECT {text} FROM {view}")
    finally:
        con.unregister(view)
    return header


def drop_stage(con: duckdb.DuckDBPyConnection) -> None:
    """Drop what ``stage_csv`` and ``staged_source_lines`` built."""
    con.execute(f"DROP TABLE IF EXISTS {_LINES}")
    con.execute(f"DROP TABLE IF EXISTS {_STAGE}")


def staged_source_lines(
    con: duckdb.DuckDBPyConnection, path: Path, header: list[str]
) -> str | None:
    """``_etl_stage_lines`` (``_line``, ``_source_line``): the line each row of ``stage_csv``
    starts on, when a quoted field of ``path`` spans lines; None when none does (then the row
    number + 2 is the line). Only the quarantine needs it, so it is built only there."""
    rows = con.execute(f"SELECT count(*) FROM {_STAGE}").fetchone()[0]
    if count_data_lines(path) == rows:
        return None
    breaks = " + ".join(
        f"coalesce(length({quote(c)}) - length(replace({quote(c)}, chr(10), '')), 0)"
        for c in header
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {_LINES} AS
        SELECT rowid + 2 AS _line, rowid + 2 + coalesce(sum({breaks}) OVER (
                   ORDER BY rowid ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
               AS _source_line
        FROM {_STAGE}"""
    )
    return _LINES


class TableSource(Protocol):
    """Where the rows of one table come from: a CSV file, or a table of a database.

    Every loader stages its source as text in ``_etl_stage`` (in source order) and hands it to
    ``load_table``, so the validation, the quarantine and the counts are one code path whatever
    the source is."""

    #: What the quarantine's ``source_file`` records (``PERSON.csv``, ``cdm.person``).
    name: str
    #: The number ``_line`` gives the first staged row: 2 in a CSV file (its header is line 1),
    #: 1 for the first row of a database table.
    first_line: int

    def header(self) -> list[str]:
        """The source's column names as written, without staging anything."""
        ...

    def stage(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        """Fill ``_etl_stage`` with the source's rows as text, in source order; its columns."""
        ...

    def source_lines(self, con: duckdb.DuckDBPyConnection, header: list[str]) -> str | None:
        """A relation (``_line``, ``_source_line``) correcting ``_line`` (None: none needed)."""
        ...


@dataclass(frozen=True)
class CsvSource:
    """One CSV file as a ``TableSource``."""

    path: Path
    dialect: CsvDialect
    first_line: int = 2

    @property
    def name(self) -> str:
        return self.path.name

    def header(self) -> list[str]:
        return read_header(self.path, self.dialect)

    def stage(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        return stage_csv(con, self.path, self.dialect)

    def source_lines(self, con: duckdb.DuckDBPyConnection, header: list[str]) -> str | None:
        return staged_source_lines(con, self.path, header)


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


def _failures(raw: str, typed: str, field: CdmField) -> list[tuple[Reason, str]]:
    """(reason, SQL condition) pairs that reject a row because of this field."""
    checks = []
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
    first_line: int = 2,
) -> str:
    """SELECT giving, per staged row, the line, raw columns, typed columns and the reason.

    Raw (``__raw__<field>``) and typed (``__<field>``) values are computed once in an inner
    query; the reason CASE then only tests those columns. A row whose primary key repeats an
    earlier valid row's (``_dup``) is quarantined, or with ``rekey_duplicates`` loaded under a
    new id above the file's largest.
    """
    values, checks = [], []
    for field in table.fields:
        raw, typed = quote("__raw__" + field.name), quote("__" + field.name)
        raw_sql = _raw(sources.get(field.name), field)
        values.append(f"{raw_sql} AS {raw}, {_typed(raw_sql, field)} AS {typed}")
        checks.extend(_failures(raw, typed, field))
    for start, end in table.date_ranges:
        checks.append((Reason.END_BEFORE_START, f"{quote('__' + end)} < {quote('__' + start)}"))
    order = list(Reason)
    checks.sort(key=lambda check: order.index(check[0]))
    reason = "CASE " + " ".join(f"WHEN {cond} THEN '{r.value}'" for r, cond in checks) + " END"
    sql = f"""SELECT *, {reason} AS _reason FROM (
        SELECT rowid + {first_line:d} AS _line, *, {", ".join(values)} FROM {_STAGE}) AS typed"""
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
    """Load the CSV file ``path`` into ``table`` (``load_table``'s options)."""
    return load_table(con, table, CsvSource(path, dialect), **options)


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
        table, sources, table.has_person, rekey_duplicates, first_line=source.first_line
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
    return quarantine_source(con, CsvSource(path, dialect), path.stem.lower(), reason)


def quarantine_source(
    con: duckdb.DuckDBPyConnection, source: TableSource, target_table: str, reason: Reason
) -> int:
    """Put every row of ``source`` into the quarantine with ``reason``; return the count."""
    header = source.stage(con)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {_CHECKED} AS "
        f"SELECT rowid + {source.first_line:d} AS _line, *, '{reason.value}' AS _reason "
        f"FROM {_STAGE}"
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
