"""Data-quality report of a CDM DuckDB file: run every check, summarise, write dq.json and dq.html.

A node operator runs this before joining a network, so that what a study later counts is known
to be conformant, complete and plausible, and so that rows the ETL rejected at load time stay
visible: each check adds the quarantined rows it covers (``etl_quarantine``) to its violations.
Failed checks are findings, not errors; only a missing or non-CDM file is an error.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from string import Template
from typing import Literal

import duckdb
from pydantic import BaseModel, computed_field
from rich.progress import track

from omop_etl.cdm import connect
from omop_etl.dq_checks import all_checks
from omop_etl.dq_model import QUARANTINE, REKEYED, Check, CheckInfo
from omop_etl.quarantine import QUARANTINE_TABLE, REKEYED_TABLE
from omop_etl.schema import cdm_tables
from omop_etl.sql import quote

CATEGORIES = ("Conformance", "Completeness", "Plausibility")
MAX_EXAMPLES = 5
TEMPLATE = Path(__file__).with_name("dq_report.html")

Status = Literal["pass", "fail", "not_applicable"]


class DqError(Exception):
    """The file cannot be checked (missing, not DuckDB, not an OMOP CDM)."""


class CheckResult(CheckInfo):
    """The outcome of one check: the check's description, then what it found.
    ``example_ids`` holds ids only (row keys or quarantine ``file:line``), never row contents."""

    num_violated: int
    num_quarantined: int
    denominator: int
    pct: float
    status: Status
    example_ids: list[str]
    note: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "fail"


class CategorySummary(BaseModel):
    category: str
    passed: int
    failed: int
    not_applicable: int
    total: int


class DqReport(BaseModel):
    """Every check's result plus the metadata that says which CDM was checked, when, how fast."""

    db_path: str
    cdm_source_name: str
    cdm_version: str | None
    started_at: str
    seconds: float
    table_rows: dict[str, int]
    quarantined: dict[str, dict[str, int]]  # target table -> reason -> rows
    results: list[CheckResult]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def summary(self) -> list[CategorySummary]:
        """Pass/fail/not-applicable counts per DQD category, plus a total row."""
        rows = []
        for category in (*CATEGORIES, "Total"):
            mine = [r for r in self.results if category in (r.category, "Total")]
            rows.append(
                CategorySummary(
                    category=category,
                    passed=sum(r.status == "pass" for r in mine),
                    failed=sum(r.status == "fail" for r in mine),
                    not_applicable=sum(r.status == "not_applicable" for r in mine),
                    total=len(mine),
                )
            )
        return rows

    def failed(self) -> list[CheckResult]:
        """Failed checks, the largest share of violating rows first."""
        return sorted((r for r in self.results if r.failed), key=lambda r: (-r.pct, r.id))

    def result(self, check_id: str) -> CheckResult:
        return next(r for r in self.results if r.id == check_id)


# --- running ----------------------------------------------------------------------------------

Catalog = dict[str, dict[str, str]]  # table -> column -> DuckDB type, of the file's main schema


@dataclass
class _Cdm:
    """What every check consults: the open file, its catalog, row and quarantine counts."""

    con: duckdb.DuckDBPyConnection
    catalog: Catalog
    table_rows: dict[str, int]
    quarantined: dict[str, dict[str, int]]  # target table -> reason -> rows


def _open(db_path: Path) -> duckdb.DuckDBPyConnection:
    if not db_path.is_file():
        raise DqError(f"CDM file not found: {db_path}")
    try:
        return connect(db_path, read_only=True)
    except duckdb.Error as error:
        raise DqError(f"{db_path} is not a readable DuckDB file: {error}") from error


def _catalog(con: duckdb.DuckDBPyConnection, db_path: Path) -> Catalog:
    catalog: Catalog = {}
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = 'main'"
    ).fetchall()
    for table, column, data_type in rows:
        catalog.setdefault(table, {})[column] = data_type
    missing = [t for t in ("person", "observation_period") if t not in catalog]
    if missing:
        raise DqError(f"{db_path} is not an OMOP CDM: no {' or '.join(missing)} table")
    return catalog


def _prepare(con: duckdb.DuckDBPyConnection, db_path: Path) -> _Cdm:
    """Read the catalog and counts, and snapshot the quarantine into a temp table."""
    catalog = _catalog(con, db_path)
    if QUARANTINE_TABLE in catalog:
        source = (
            f"SELECT source_file, source_line, target_table, reason, raw FROM {QUARANTINE_TABLE}"
        )
    else:
        source = (
            "SELECT NULL::VARCHAR AS source_file, NULL::BIGINT AS source_line, "
            "NULL::VARCHAR AS target_table, NULL::VARCHAR AS reason, NULL::JSON AS raw WHERE FALSE"
        )
    con.execute(f"CREATE TEMP TABLE {QUARANTINE} AS {source}")
    rekeyed = (
        f"SELECT target_table, new_id FROM {REKEYED_TABLE}"
        if REKEYED_TABLE in catalog
        else "SELECT NULL::VARCHAR AS target_table, NULL::BIGINT AS new_id WHERE FALSE"
    )
    con.execute(f"CREATE TEMP TABLE {REKEYED} AS {rekeyed}")
    tables = [t for t in cdm_tables() if t in catalog]
    union = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {quote(t)}" for t in tables)
    quarantined: dict[str, dict[str, int]] = {}
    rows = con.execute(
        f"SELECT target_table, reason, count(*) FROM {QUARANTINE} GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    for table, reason, n in rows:
        quarantined.setdefault(table, {})[reason] = n
    return _Cdm(con, catalog, dict(con.execute(union).fetchall()), quarantined)


def _missing(check: Check, catalog: Catalog) -> str | None:
    for table, column in check.needs:
        if table not in catalog:
            return f"table {table} missing"
        if column is not None and column not in catalog[table]:
            return f"column {table}.{column} missing"
    return None


def _catalog_violations(check: Check, catalog: Catalog) -> int:
    """1 when the table, the column, or the column's type is not what the spec says."""
    columns = catalog.get(check.table)
    if columns is None or check.field is None:
        return int(columns is None)
    if check.type_pattern is None:
        return int(check.field not in columns)
    return int(re.match(check.type_pattern, columns[check.field]) is None)


def _check_sql(check: Check) -> str:
    """One query per check: violations, quarantined rows, denominator and example ids."""
    if check.quarantine:
        reasons = ", ".join("?" for _ in check.quarantine)
        quarantined = (
            f"SELECT source_file, source_line FROM {QUARANTINE} q "
            f"WHERE q.target_table = ? AND q.reason IN ({reasons}) AND ({check.quarantine_filter})"
        )
    else:
        quarantined = "SELECT NULL AS source_file, NULL AS source_line WHERE FALSE"
    return f"""
        WITH v AS ({check.violated_sql}), q AS ({quarantined})
        SELECT (SELECT count(*) FROM v), (SELECT count(*) FROM q), ({check.denominator_sql}),
            (SELECT list(CAST(id AS VARCHAR)) FROM (SELECT id FROM v ORDER BY id LIMIT {MAX_EXAMPLES})),
            (SELECT list(source_file || ':' || source_line) FROM
                (SELECT * FROM q ORDER BY source_file, source_line LIMIT {MAX_EXAMPLES}))"""


def _has_rows(check: Check, cdm: _Cdm) -> bool:
    """Whether the check has anything to test: rows in its table or matching quarantined rows."""
    rejected = cdm.quarantined.get(check.table, {})
    return cdm.table_rows.get(check.denominator_table or check.table, 0) > 0 or any(
        rejected.get(reason) for reason in check.quarantine
    )


def _measure(check: Check, cdm: _Cdm) -> tuple[int, int, int, list[str], str | None]:
    """(violated in the table, quarantined, rows tested, example ids, note) of one check."""
    missing = _missing(check, cdm.catalog)
    if missing:
        return 0, 0, 0, [], missing
    if check.violated_sql is None:
        return _catalog_violations(check, cdm.catalog), 0, 1, [], None
    if not _has_rows(check, cdm):
        return 0, 0, 0, [], "no rows"
    params = [check.table, *check.quarantine] if check.quarantine else []
    row = cdm.con.execute(_check_sql(check), params).fetchone()
    assert row is not None  # a SELECT without FROM returns one row
    examples = [*(row[3] or []), *(row[4] or [])][:MAX_EXAMPLES]
    return row[0], row[1], row[2] or 0, examples, None if row[2] or row[1] else "no rows"


def _run_check(check: Check, cdm: _Cdm) -> CheckResult:
    violated, quarantined, tested, examples, note = _measure(check, cdm)
    denominator = tested + quarantined
    pct = 100.0 * (violated + quarantined) / denominator if denominator else 0.0
    status: Status = (
        "not_applicable" if denominator == 0 else "fail" if pct > check.threshold else "pass"
    )
    return CheckResult(
        **{name: getattr(check, name) for name in CheckInfo.model_fields},
        num_violated=violated + quarantined,
        num_quarantined=quarantined,
        denominator=denominator,
        pct=round(pct, 4),
        status=status,
        example_ids=examples,
        note=note,
    )


def _cdm_source(cdm: _Cdm, db_path: Path) -> tuple[str, str | None]:
    if cdm.table_rows.get("cdm_source"):
        row = cdm.con.execute(
            "SELECT cdm_source_name, cdm_version FROM cdm_source ORDER BY ALL LIMIT 1"
        ).fetchone()
        if row:
            return row[0] or db_path.stem, row[1]
    return db_path.stem, None


def run_checks(
    db_path: str | Path, *, progress: bool = False, vocabulary: bool = False
) -> DqReport:
    """Run every data-quality check on the CDM file at ``db_path`` (opened read-only).

    The vocabulary tables are left out as DataQualityDashboard does by default; ``vocabulary``
    checks them too. ``progress`` shows a rich progress bar over the checks. Raises ``DqError``
    when the file is missing, not DuckDB or not an OMOP CDM.
    """
    db_path = Path(db_path)
    started, clock = datetime.now(UTC), time.perf_counter()
    con = _open(db_path)
    try:
        cdm = _prepare(con, db_path)
        checks = track(
            all_checks(vocabulary=vocabulary),
            description="Data-quality checks",
            disable=not progress,
        )
        results = [_run_check(check, cdm) for check in checks]
        name, version = _cdm_source(cdm, db_path)
        return DqReport(
            db_path=str(db_path),
            cdm_source_name=name,
            cdm_version=version,
            started_at=started.isoformat(timespec="seconds"),
            seconds=round(time.perf_counter() - clock, 3),
            table_rows=cdm.table_rows,
            quarantined=cdm.quarantined,
            results=results,
        )
    finally:
        con.close()


# --- writing ----------------------------------------------------------------------------------


def write_json(report: DqReport, out_dir: Path) -> Path:
    path = out_dir / "dq.json"
    path.write_text(json.dumps(report.model_dump(mode="json"), indent=1) + "\n")
    return path


def _cells(values: Iterable[object], tag: str = "td") -> str:
    return "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in values)


def _summary_rows(report: DqReport) -> str:
    return "\n".join(
        f'<tr class="{"bad" if s.failed else "good"}">'
        + _cells([s.category, s.passed, s.failed, s.not_applicable, s.total])
        + "</tr>"
        for s in report.summary
    )


def _failed_rows(report: DqReport) -> str:
    return "\n".join(
        "<tr>"
        + _cells(
            [
                r.id,
                r.category,
                r.level,
                r.description,
                f"{r.num_violated:,}",
                f"{r.num_quarantined:,}",
                f"{r.denominator:,}",
                f"{r.pct:.2f}",
                f"{r.threshold:g}",
                ", ".join(r.example_ids),
            ]
        )
        + "</tr>"
        for r in report.failed()
    )


def _meta_rows(report: DqReport) -> str:
    quarantined = sum(n for reasons in report.quarantined.values() for n in reasons.values())
    meta = {
        "CDM source": report.cdm_source_name,
        "CDM version": report.cdm_version or "unknown",
        "File": report.db_path,
        "Run at (UTC)": report.started_at,
        "Run time (s)": f"{report.seconds:.2f}",
        "Persons": f"{report.table_rows.get('person', 0):,}",
        "Rows in CDM tables": f"{sum(report.table_rows.values()):,}",
        "Rows quarantined at load": f"{quarantined:,}",
    }
    return "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in meta.items()
    )


def _quarantine_rows(report: DqReport) -> str:
    return (
        "\n".join(
            "<tr>" + _cells([table, reason, f"{n:,}"]) + "</tr>"
            for table, reasons in report.quarantined.items()
            for reason, n in reasons.items()
        )
        or '<tr><td colspan="3">none</td></tr>'
    )


def write_html(report: DqReport, out_dir: Path) -> Path:
    """A single self-contained page (inline CSS, no scripts, no external assets)."""
    path = out_dir / "dq.html"
    page = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=html.escape(f"Data quality: {report.cdm_source_name}"),
        meta_rows=_meta_rows(report),
        summary_rows=_summary_rows(report),
        failed_count=len(report.failed()),
        failed_rows=_failed_rows(report) or '<tr><td colspan="10">none</td></tr>',
        quarantine_rows=_quarantine_rows(report),
    )
    path.write_text(page, encoding="utf-8")
    return path


def write_report(report: DqReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write dq.json and dq.html into ``out_dir`` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_json(report, out_dir), write_html(report, out_dir)
