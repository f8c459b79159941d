"""Reading one source (a CSV or Parquet file, Arrow batches from a database) into the staging
table, every column as text (``all_varchar``) so that nothing is lost to a type sniffer: the
CSV dialects, file parts for parallel reads, line counts and headers, and the clear
``EtlInputError`` a malformed file gives.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import duckdb
import numpy as np

from omop_etl.sql import quote

STAGE_TABLE = "_etl_stage"
STAGE_LINES_TABLE = "_etl_stage_lines"


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


#: Read options that let a row with too few fields reach the quarantine instead of aborting the
#: load: ``null_padding`` pads it with NULLs, and ``nullstr`` is a value no CSV field holds, so an
#: empty field reads as '' and only a field the row lacks reads as NULL (``complete_row``). Its
#: one parameter is ``NO_NULL_TEXT``.
PADDED_READ = "strict_mode = true, null_padding = true, nullstr = ?"
NO_NULL_TEXT = "\x01"


def complete_row(header: list[str]) -> str:
    """SQL condition over a row read with ``PADDED_READ``: it has every field of ``header``
    (the reader pads only on the right, so the last field tells)."""
    return f"{quote(header[-1])} IS NOT NULL"


def csv_error(path: Path, error: duckdb.Error) -> EtlInputError:
    """The reader's error as one line naming the file and the line, without the reader's dump of
    its options and suggested fixes (options of DuckDB that fedomop does not expose)."""
    text = str(error)
    line = re.search(r"CSV Error on Line: (\d+)", text)
    columns = re.search(r"Expected Number of Columns: (\d+) Found: (\d+)", text)
    if columns:
        detail = f"{columns[2]} fields where the header has {columns[1]}"
    elif "state machine reached an invalid state" in text:
        detail = "not RFC 4180 CSV (mixed line endings, or a quote inside an unquoted field?)"
    else:  # the explanation is the paragraph before DuckDB's "Possible fixes"
        paragraphs = [p.strip() for p in text.split("Possible fixes")[0].split("\n\n")]
        detail = [p for p in paragraphs if p][-1].splitlines()[-1]
        detail = detail.removeprefix("Invalid Input Error: ").rstrip(".")
    where = f" line {line[1]}:" if line else ""
    return EtlInputError(f"{path}: not a readable CSV file:{where} {detail}")


def stage_csv(con: duckdb.DuckDBPyConnection, path: Path, dialect: CsvDialect) -> list[str]:
    """Read ``path`` as text into the temp table ``_etl_stage``; return its column names.

    The staging table keeps file order, so ``rowid + 2`` is the source line (header is line 1;
    exact while no quoted field spans lines). Empty fields are '' and the fields a short row
    lacks NULL (``PADDED_READ``). DuckDB's parallel reader cannot pad rows once a quoted field
    spans lines; such a file is read again by one thread.
    """
    header = read_header(path, dialect)
    if len({h.lower() for h in header}) != len(header):
        raise EtlInputError(f"{path}: duplicate column names in header {header}")
    con.execute(f"DROP TABLE IF EXISTS {STAGE_TABLE}")
    sql = f"""CREATE TEMP TABLE {STAGE_TABLE} AS SELECT * FROM read_csv(
        ?, header = true, auto_detect = false, columns = ?, delim = ?, quote = ?, escape = ?,
        {PADDED_READ}, parallel = ?)"""
    params = [str(path), {h: "VARCHAR" for h in header}, dialect.delimiter, dialect.quote,
              dialect.quote, NO_NULL_TEXT]  # fmt: skip
    try:
        try:
            con.execute(sql, [*params, True])
        except duckdb.Error as error:
            if "quoted new lines" not in str(error):
                raise
            con.execute(sql, [*params, False])
    except duckdb.Error as error:
        raise csv_error(path, error) from error
    return header


def is_parquet(path: Path) -> bool:
    """Whether ``path`` is a Parquet file (by its name), rather than a CSV file."""
    return path.suffix.lower() == ".parquet"


def _parquet_types(path: Path) -> dict[str, str]:
    """Column name -> DuckDB type of a Parquet file, in the file's order."""
    try:
        rows = duckdb.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
    except duckdb.Error as error:
        raise EtlInputError(f"{path}: not a readable Parquet file: {error}") from error
    return {str(row[0]): str(row[1]) for row in rows}


def stage_parquet(con: duckdb.DuckDBPyConnection, path: Path) -> list[str]:
    """Read a Parquet file into ``_etl_stage`` as text, in file order (``rowid + 1`` is the row
    number), so that its rows go through the same checks as a CSV file's: a value the CDM
    type cannot hold is quarantined, not cast away. Timestamps with a time zone are written
    in UTC without it, as the CDM's datetimes are."""
    types = _parquet_types(path)
    header = list(types)
    if len({h.lower() for h in header}) != len(header):
        raise EtlInputError(f"{path}: duplicate column names {header}")
    columns = ", ".join(
        f"CAST(timezone('UTC', {quote(h)}) AS VARCHAR) AS {quote(h)}"
        if t == "TIMESTAMP WITH TIME ZONE"
        else f"CAST({quote(h)} AS VARCHAR) AS {quote(h)}"
        for h, t in types.items()
    )
    con.execute(f"DROP TABLE IF EXISTS {STAGE_TABLE}")
    try:
        con.execute(
            f"CREATE TEMP TABLE {STAGE_TABLE} AS SELECT {columns} FROM read_parquet(?)", [str(path)]
        )
    except duckdb.Error as error:
        raise EtlInputError(f"{path}: not a readable Parquet file: {error}") from error
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
    con.execute(f"DROP TABLE IF EXISTS {STAGE_TABLE}")
    con.register(view, batches)
    try:
        text = ", ".join(f"CAST({quote(h)} AS VARCHAR) AS {quote(h)}" for h in header)
        con.execute(f"CREATE TEMP TABLE {STAGE_TABLE} AS SELECT {text} FROM {view}")
    finally:
        con.unregister(view)
    return header


def drop_stage(con: duckdb.DuckDBPyConnection) -> None:
    """Drop what ``stage_csv`` and ``staged_source_lines`` built."""
    con.execute(f"DROP TABLE IF EXISTS {STAGE_LINES_TABLE}")
    con.execute(f"DROP TABLE IF EXISTS {STAGE_TABLE}")


def staged_source_lines(
    con: duckdb.DuckDBPyConnection, path: Path, header: list[str]
) -> str | None:
    """``_etl_stage_lines`` (``_line``, ``_source_line``): the line each row of ``stage_csv``
    starts on, when a quoted field of ``path`` spans lines; None when none does (then the row
    number + 2 is the line). Only the quarantine needs it, so it is built only there."""
    rows = con.execute(f"SELECT count(*) FROM {STAGE_TABLE}").fetchone()[0]
    if count_data_lines(path) == rows:
        return None
    breaks = " + ".join(
        f"coalesce(length({quote(c)}) - length(replace({quote(c)}, chr(10), '')), 0)"
        for c in header
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {STAGE_LINES_TABLE} AS
        SELECT rowid + 2 AS _line, rowid + 2 + coalesce(sum({breaks}) OVER (
                   ORDER BY rowid ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
               AS _source_line
        FROM {STAGE_TABLE}"""
    )
    return STAGE_LINES_TABLE


class TableSource(Protocol):
    """Where the rows of one table come from: a CSV or Parquet file, or a table of a database.

    Every loader stages its source as text in ``_etl_stage`` (in source order) and hands it to
    ``load_table``, so the validation, the quarantine and the counts are one code path whatever
    the source is."""

    #: What the quarantine's ``source_file`` records (``PERSON.csv``, ``cdm.person``).
    name: str
    #: The number ``_line`` gives the first staged row: 2 in a CSV file (its header is line 1),
    #: 1 for the first row of a Parquet file or a database table.
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

    def complete(self, header: list[str]) -> str:
        """SQL condition over a staged row: it has every field of ``header`` (a CSV row can have
        too few; a typed source's rows always have all, ``'true'``)."""
        ...


class FileSource:
    """The part of a ``TableSource`` every file source shares: it is named by its file name (in
    quarantine rows and messages)."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class CsvSource(FileSource):
    """One CSV file as a ``TableSource``."""

    path: Path
    dialect: CsvDialect
    first_line: int = 2

    def header(self) -> list[str]:
        return read_header(self.path, self.dialect)

    def stage(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        return stage_csv(con, self.path, self.dialect)

    def source_lines(self, con: duckdb.DuckDBPyConnection, header: list[str]) -> str | None:
        return staged_source_lines(con, self.path, header)

    def complete(self, header: list[str]) -> str:
        return complete_row(header)


class TypedSource:
    """The part of a ``TableSource`` every source of typed records shares (a Parquet file, a
    database table): a row's position is its number, and a row has every column."""

    def source_lines(self, con: duckdb.DuckDBPyConnection, header: list[str]) -> str | None:
        return None  # a row's position is its number

    def complete(self, header: list[str]) -> str:
        return "true"  # a typed record has every column


@dataclass(frozen=True)
class ParquetSource(FileSource, TypedSource):
    """One Parquet file as a ``TableSource`` (typed columns staged as text, rows numbered
    from 1)."""

    path: Path
    first_line: int = 1

    def header(self) -> list[str]:
        return list(_parquet_types(self.path))

    def stage(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        return stage_parquet(con, self.path)


def file_source(path: Path, dialect: CsvDialect) -> TableSource:
    """The ``TableSource`` of a data file: Parquet by its name, else CSV in ``dialect``."""
    return ParquetSource(path) if is_parquet(path) else CsvSource(path, dialect)
