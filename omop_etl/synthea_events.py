"""Synthea's event files (conditions, medications, observations, procedures, immunizations,
allergies): the code map, the first pass that inserts straight into the CDM table, and the
second pass that routes rows to their standard concept's domain table or to the quarantine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import duckdb

from omop_etl.quarantine import Reason, control_character_check, reason_case
from omop_etl.report import LoadReport
from omop_etl.sources import OMOP_CSV, WHOLE_FILE, Part, read_header
from omop_etl.sql import quote
from omop_etl.synthea_persons import key_expr
from omop_etl.synthea_reading import (
    TOO_FEW_FIELDS,
    date_reasons,
    execute_reading,
    quarantine_checked,
    raw,
    read_source,
)
from omop_etl.synthea_spec import (
    DOMAIN_ROUTES,
    EHR,
    EVENT_FILES,
    EVENT_TABLES,
    ID_BLOCK,
    MAPS,
    SYSTEMS,
    EventFile,
)


def _vocabulary_expr(spec: EventFile, header: list[str]) -> str:
    """SQL giving each row's vocabulary: from a SYSTEM column when the file has one."""
    if "SYSTEM" not in header:
        return f"'{spec.vocabulary}'"
    cases = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in SYSTEMS.items())
    return f"CASE upper(trim({quote('SYSTEM')})) {cases} ELSE '{spec.vocabulary}' END"


def create_code_map(con: duckdb.DuckDBPyConnection) -> None:
    """``code_map``: every concept of the vocabularies Synthea codes in -> source concept,
    standard concept ('Maps to'; the lowest id if several) and the table of its domain (NULL:
    the file's default table). Built once per load, so each event file maps its codes in the
    same statement that reads it."""
    domains = " ".join(f"WHEN '{d}' THEN '{t}'" for d, t in DOMAIN_ROUTES.items())
    vocabularies = sorted({*SYSTEMS.values(), *(spec.vocabulary for spec in EVENT_FILES)})
    con.execute(
        f"""CREATE TABLE {MAPS}.code_map AS
        WITH maps AS (SELECT concept_id_1, min(concept_id_2) AS concept_id_2
                      FROM concept_relationship
                      WHERE relationship_id = 'Maps to' AND invalid_reason IS NULL GROUP BY ALL)
        SELECT src.vocabulary_id, src.concept_code AS code, src.concept_id AS source_concept_id,
               coalesce(std.concept_id, 0) AS concept_id,
               CASE std.domain_id {domains} END AS _target
        FROM concept src
        LEFT JOIN maps ON maps.concept_id_1 = src.concept_id
        LEFT JOIN concept std ON std.concept_id = maps.concept_id_2
        WHERE src.vocabulary_id IN ({", ".join("?" for _ in vocabularies)})""",
        vocabularies,
    )


def event_columns(table: str, tag: int) -> dict[str, str]:
    """CDM column -> SQL over ``_events`` for the rows routed to ``table``."""
    id_column, prefix, start_date = EVENT_TABLES[table]
    columns = {
        id_column: f"{tag} * {ID_BLOCK} + _line",
        "person_id": "person_id",
        f"{prefix}_concept_id": "concept_id",
        start_date: "CAST(start_ts AS DATE)",
        start_date.replace("_date", "_datetime"): "start_ts",
        f"{prefix}_type_concept_id": str(EHR),
        "visit_occurrence_id": "visit_occurrence_id",
        f"{prefix}_source_value": "code",
        f"{prefix}_source_concept_id": "source_concept_id",
    }
    if table == "drug_exposure":
        columns.update(
            drug_exposure_end_date="CAST(coalesce(stop_ts, start_ts) AS DATE)",
            drug_exposure_end_datetime="coalesce(stop_ts, start_ts)",
            verbatim_end_date="CAST(stop_ts AS DATE)",
            quantity="quantity",
        )
    elif table in ("condition_occurrence", "procedure_occurrence"):
        columns[f"{prefix}_end_date"] = "CAST(stop_ts AS DATE)"
        columns[f"{prefix}_end_datetime"] = "stop_ts"
    else:
        columns.update(
            value_as_number="value_as_number",
            unit_concept_id="unit_concept_id",
            unit_source_value="units",
            value_source_value="value_raw",
        )
        if table == "observation":
            columns["value_as_string"] = "value_as_string"
    return columns


def _event_source_columns(spec: EventFile) -> Callable[[list[str]], dict[str, str]]:
    """alias -> SQL of the columns an event file contributes (NULL where it has none)."""
    none = "CAST(NULL AS VARCHAR)"

    def columns(header: list[str]) -> dict[str, str]:
        return {
            "patient": raw("PATIENT"),
            "encounter": raw("ENCOUNTER"),
            "code": raw("CODE"),
            "vocabulary_id": _vocabulary_expr(spec, header),
            "start_raw": raw(spec.start_column(header)),
            "stop_raw": raw(spec.stop) if spec.stop else none,
            "value_raw": raw("VALUE") if spec.numeric_value else none,
            "units": raw("UNITS") if spec.numeric_value else none,
            "numeric": f"lower({raw('TYPE')}) = 'numeric'" if spec.numeric_value else "false",
            "quantity_raw": raw(spec.quantity) if spec.quantity else none,
        }

    return columns


def _event_rows(
    spec: EventFile, path: Path, part: Part, *, visit_key: str | None
) -> tuple[str, list]:
    """Every row of ``part`` typed, mapped and routed, with its ``_target`` and ``_reason``.

    ``visit_key`` is ``visit_map``'s key function (``finish_visits``). None leaves
    ``visit_occurrence_id`` NULL and keeps the ``encounter`` reference instead: a second pass
    skips building the visit lookup for the whole file and looks up only the rows it keeps
    (``_with_visits``)."""
    visits = visit_key is not None
    visit_id = (
        "CASE WHEN v.person_id = p.person_id THEN v.visit_occurrence_id END"
        if visits
        else "CAST(NULL AS BIGINT)"
    )
    visit_join = (
        f"LEFT JOIN {MAPS}.visit_map v ON v.encounter_key = {key_expr(visit_key, 's.encounter')}"
        if visits
        else ""
    )
    header = read_header(path, OMOP_CSV)
    source, params = read_source(
        path, spec.required_columns(header), _event_source_columns(spec), part
    )
    checks = [
        TOO_FEW_FIELDS,
        (Reason.MISSING_REQUIRED, "patient IS NULL OR code IS NULL OR start_raw IS NULL"),
    ]
    not_a_number = "NOT coalesce(isfinite({}), false)"
    checks += [
        (
            Reason.MALFORMED_NUMBER,
            f"(numeric AND value_raw IS NOT NULL AND {not_a_number.format('value_as_number')})",
        ),
        (
            Reason.MALFORMED_NUMBER,
            f"(quantity_raw IS NOT NULL AND {not_a_number.format('quantity')})",
        ),
    ]
    checks += date_reasons([("start_raw", "start_ts"), ("stop_raw", "stop_ts")])
    checks += [(Reason.END_BEFORE_START, "stop_ts < start_ts")]
    checks += [(Reason.UNKNOWN_PERSON, "person_id IS NULL")]
    checks += [control_character_check(alias, column) for alias, column in
               [("code", "CODE"), ("value_raw", "VALUE"), ("units", "UNITS")]]  # fmt: skip
    sql = f"""SELECT _line, person_id, encounter, visit_occurrence_id, start_ts, stop_ts, code,
               value_as_number, CASE WHEN NOT numeric THEN value_raw END AS value_as_string,
               value_raw, units, unit_concept_id, quantity, source_concept_id, concept_id,
               _target, {reason_case(checks)} AS _reason
        FROM (
            SELECT s.*, TRY_CAST(s.start_raw AS TIMESTAMP) AS start_ts,
                   TRY_CAST(s.stop_raw AS TIMESTAMP) AS stop_ts,
                   p.person_id, {visit_id} AS visit_occurrence_id,
                   CASE WHEN s.numeric THEN TRY_CAST(s.value_raw AS DOUBLE) END
                       AS value_as_number,
                   CASE WHEN s.units IS NOT NULL THEN coalesce(u.concept_id, 0) END
                       AS unit_concept_id,
                   TRY_CAST(s.quantity_raw AS DOUBLE) AS quantity,
                   coalesce(m.source_concept_id, 0) AS source_concept_id,
                   coalesce(m.concept_id, 0) AS concept_id,
                   coalesce(m._target, '{spec.table}') AS _target
            FROM {source} s
            LEFT JOIN {MAPS}.person_map p ON p.source_id = s.patient
            {visit_join}
            LEFT JOIN concept u ON u.vocabulary_id = 'UCUM' AND u.concept_code = s.units
            LEFT JOIN {MAPS}.code_map m
                 ON m.vocabulary_id = s.vocabulary_id AND m.code = s.code)"""
    return sql, params


def _insert_routed(
    cur: duckdb.DuckDBPyConnection, path: Path, table: str, tag: int, rows: str, params: list
) -> int:
    """The ``rows`` (from ``_event_rows``) bound for ``table`` that load -> ``table``."""
    columns = event_columns(table, tag)
    return execute_reading(
        cur, path,
        f"INSERT INTO {quote(table)} ({', '.join(map(quote, columns))}) "
        f"SELECT {', '.join(columns.values())} FROM ({rows}) "
        f"WHERE _reason IS NULL AND _target = '{table}'",
        params,
    ).fetchone()[0]  # fmt: skip


def insert_events(
    cur: duckdb.DuckDBPyConnection, spec: EventFile, path: Path, part: Part, visit_key: str
) -> int:
    """First pass over ``part`` of an event file: the rows that load and stay in the file's
    own table go straight in; the number inserted."""
    rows, params = _event_rows(spec, path, part, visit_key=visit_key)
    return _insert_routed(cur, path, spec.table, spec.tag, rows, params)


def _exceptions_table(spec: EventFile) -> str:
    """Where a file's second pass collects its rows: a table of the CDM file being built (one
    transaction writes one database) that is dropped once applied."""
    return f"_etl_exceptions_{spec.name}"


def collect_exceptions(
    cur: duckdb.DuckDBPyConnection, spec: EventFile, path: Path, lines: int, landed: int
) -> None:
    """When the first pass did not land every line of the file, its second pass: the rows to
    route to another table or to quarantine."""
    if landed == lines:
        return
    rows, params = _event_rows(spec, path, WHOLE_FILE, visit_key=None)
    execute_reading(
        cur, path,
        f"""CREATE TABLE {_exceptions_table(spec)} AS SELECT * FROM ({rows})
        WHERE _reason IS NOT NULL OR _target <> '{spec.table}'""",
        params,
    )  # fmt: skip


def _with_visits(table: str, visit_key: str) -> str:
    """The rows of ``table`` (a second pass's) with their visit ids, in line order: the small
    table is the hash join's build side, the visit lookup is only scanned."""
    return f"""SELECT e.* EXCLUDE (visit_occurrence_id),
               CASE WHEN v.person_id = e.person_id THEN v.visit_occurrence_id END
                   AS visit_occurrence_id
        FROM {MAPS}.visit_map v RIGHT JOIN {table} e
             ON v.encounter_key = {key_expr(visit_key, "e.encounter")}
        ORDER BY e._line"""


def apply_exceptions(
    con: duckdb.DuckDBPyConnection, spec: EventFile, path: Path, report: LoadReport, visit_key: str
) -> None:
    """Insert the rows a file's second pass collected into the tables of their domain,
    quarantine the rest."""
    table = _exceptions_table(spec)
    targets = con.execute(
        f"SELECT DISTINCT _target FROM {table} WHERE _reason IS NULL ORDER BY 1"
    ).fetchall()
    for (target,) in targets:
        assert target in EVENT_TABLES  # from DOMAIN_ROUTES, never from input
        _insert_routed(con, path, target, spec.tag, _with_visits(table, visit_key), [])
    quarantine_checked(con, table, path, report)
    con.execute(f"DROP TABLE {table}")
