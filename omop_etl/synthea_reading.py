"""Reading a Synthea CSV: one SQL source per file part, rows typed and checked, reasons for the
rows that cannot load, and their way into ``etl_quarantine`` with all their raw columns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb

from omop_etl.quarantine import Reason, quarantine_rows
from omop_etl.report import LoadReport
from omop_etl.sources import (
    NO_NULL_TEXT,
    OMOP_CSV,
    PADDED_READ,
    WHOLE_FILE,
    EtlInputError,
    Part,
    complete_row,
    csv_error,
    drop_stage,
    find_table_file,
    read_header,
    stage_csv,
    staged_source_lines,
)
from omop_etl.sql import quote
from omop_etl.synthea_spec import EVENT_FILES

_STAGE = "_etl_stage"  # the table stage_csv fills
_DATE = r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z?)?"
_FIRST_DAY, _LAST_DAY = "1850-01-01", "2100-12-31"  # outside: an impossible date


def raw(column: str) -> str:
    """A source column, empty text as NULL. Not trimmed: a padded id or date is bad input and
    is quarantined (casts accept surrounding blanks), and trimming every field costs time."""
    return f"NULLIF({quote(column)}, '')"


def date_reasons(dates: list[tuple[str, str]]) -> list[tuple[Reason, str]]:
    """(reason, condition) for raw/typed date pairs: text that is no date at all, or a date
    that cannot exist (Feb 30) or lies outside 1850-2100. The pattern is only tested on values
    that failed to cast, so valid rows pay for a NULL test only."""
    failed = [(raw, typed, f"{raw} IS NOT NULL AND {typed} IS NULL") for raw, typed in dates]
    checks = [
        (Reason.UNPARSEABLE_DATE, f"({bad} AND NOT regexp_full_match({raw}, '{_DATE}'))")
        for raw, _, bad in failed
    ]
    checks += [
        (
            Reason.IMPOSSIBLE_DATE,
            f"({bad} OR {typed} < TIMESTAMP '{_FIRST_DAY}' OR {typed} > TIMESTAMP '{_LAST_DAY}')",
        )
        for _, typed, bad in failed
    ]
    return checks


def source_files(src_dir: Path) -> dict[str, Path]:
    """Every file the loader needs; a missing one is an ``EtlInputError`` naming it."""
    files = {}
    for name in ("patients", "encounters", *(f.name for f in EVENT_FILES)):
        path = find_table_file(src_dir, name)
        if path is None:
            raise EtlInputError(f"{src_dir}: Synthea file {name}.csv is missing")
        files[name] = path
    return files


def read_source(
    path: Path,
    required: tuple[str, ...],
    columns: Callable[[list[str]], dict[str, str]],
    part: Part = WHOLE_FILE,
) -> tuple[str, list]:
    """SQL subquery (and its parameters) reading only the columns the mapping needs from
    ``path``, numbered by source line (``row_number() OVER ()`` keeps file order; header is
    line 1), limited to the lines of ``part``. Nothing is staged: the full raw rows are read
    again only if a row is rejected.

    ``columns`` builds alias -> SQL over the file's header. A missing required column is an
    ``EtlInputError`` naming the file.
    """
    header = read_header(path, OMOP_CSV)
    missing = [c for c in required if c not in header]
    if missing:
        raise EtlInputError(f"{path}: required column(s) {', '.join(missing)} missing")
    aliases = {**columns(header), "_complete": complete_row(header)}
    select = ", ".join(f"{sql} AS {quote(alias)}" for alias, sql in aliases.items())
    first = int(part.first)
    limit = f"LIMIT {int(part.stop) - first}" if part.stop is not None else ""  # stops there
    # skip counts CSV rows (a quoted line break stays inside its row), as row_number does; one
    # thread reads (a statement that numbers rows runs on one core anyway, and DuckDB's
    # parallel reader cannot pad short rows once a quoted field spans lines)
    sql = f"""(SELECT row_number() OVER () + {first - 1} AS _line, {select} FROM read_csv(
        ?, header = false, skip = {first - 1}, auto_detect = false, columns = ?, delim = ',',
        quote = '"', escape = '"', {PADDED_READ}, parallel = false) {limit})"""
    return sql, [str(path), {h: "VARCHAR" for h in header}, NO_NULL_TEXT]


def execute_reading(
    con: duckdb.DuckDBPyConnection, path: Path, sql: str, params: list
) -> duckdb.DuckDBPyConnection:
    """Run a statement that reads ``path``; a CSV the reader rejects is an ``EtlInputError``."""
    try:
        return con.execute(sql, params)
    except (duckdb.InvalidInputException, duckdb.ConversionException) as error:
        raise csv_error(path, error) from error


def quarantine_checked(
    con: duckdb.DuckDBPyConnection,
    checked: str,
    path: Path,
    report: LoadReport,
    target: str | None = None,
) -> None:
    """Move the source rows that ``checked`` rejects, with all their raw columns, into the
    quarantine under the table each was meant for (``target`` or the row's ``_target``)."""
    target_sql = f"'{target}'" if target else "_target"
    targets = [
        row[0]
        for row in con.execute(
            f"SELECT DISTINCT {target_sql} FROM {checked} WHERE _reason IS NOT NULL ORDER BY 1"
        ).fetchall()
    ]
    if not targets:
        return
    header = stage_csv(con, path, OMOP_CSV)
    lines = staged_source_lines(con, path, header)
    for table in targets:  # names from DOMAIN_ROUTES / EVENT_FILES, never from input
        con.execute(
            f"""CREATE OR REPLACE TEMP VIEW _synthea_bad AS
                SELECT s.*, c._line, c._reason FROM (SELECT rowid + 2 AS _l, * FROM {_STAGE}) s
                JOIN (SELECT _line, _reason FROM {checked}
                      WHERE _reason IS NOT NULL AND {target_sql} = '{table}') c
                ON c._line = s._l"""
        )
        per_reason = quarantine_rows(
            con, "_synthea_bad", source_file=path.name, target_table=table, raw_columns=header,
            source_lines=lines,
        )  # fmt: skip
        report.add_quarantine(table, per_reason)
    con.execute("DROP VIEW _synthea_bad")
    drop_stage(con)


def keyed_rows(source: str, extra: str = "") -> str:
    """Source rows with typed dates and the first line of each duplicated source id."""
    return f"""WITH s AS (SELECT *, TRY_CAST(start_raw AS TIMESTAMP) AS start_ts,
                          TRY_CAST(stop_raw AS TIMESTAMP) AS stop_ts FROM {source}),
            dups AS (SELECT source_id, min(_line) AS first_line FROM s
                     WHERE source_id IS NOT NULL GROUP BY ALL HAVING count(*) > 1)
            SELECT s.*, dups.first_line {extra} FROM s LEFT JOIN dups USING (source_id)"""


DUPLICATE = (Reason.DUPLICATE_KEY, "_line > first_line")
#: A row with fewer fields than the header (``read_source``'s ``_complete``).
TOO_FEW_FIELDS = (Reason.TOO_FEW_FIELDS, "NOT _complete")
