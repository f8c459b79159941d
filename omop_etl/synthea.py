"""Loading a Synthea CSV export into an OMOP CDM v5.4 DuckDB file, set-based in SQL.

Synthea writes one CSV per kind of record (patients, encounters, conditions, medications,
observations, procedures, immunizations, allergies) keyed by UUIDs and coded in SNOMED, RxNorm,
LOINC and CVX. The loader

- reads each file with one SQL statement per part that numbers rows by source line, types,
  validates, maps and inserts them straight into the CDM table; a row that cannot load goes to
  ``etl_quarantine`` with its line, reason and all its raw columns (re-read only then);
- runs those statements at once on separate connections (``parallel.run_tasks``): a statement
  that numbers rows runs on one core, so large files are split into parts (``staging.Part``)
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
from dataclasses import dataclass
from pathlib import Path

import duckdb
from rich.progress import Progress

from omop_etl.ancestry import ancestry_notes
from omop_etl.build import atomic_build
from omop_etl.parallel import Task, run_tasks
from omop_etl.quarantine import Reason, quarantine_rows
from omop_etl.report import LoadReport
from omop_etl.schema import cdm_tables, create_cdm_schema, index_statements, quote
from omop_etl.staging import (
    NO_NULL_TEXT,
    OMOP_CSV,
    PADDED_READ,
    WHOLE_FILE,
    EtlInputError,
    Part,
    complete_row,
    count_data_lines,
    csv_error,
    drop_stage,
    find_table_file,
    read_header,
    stage_csv,
    staged_source_lines,
)
from omop_etl.vocab import default_vocabulary_dir, load_vocabulary

EHR = 32817  # Type Concept "EHR": where every Synthea record comes from
ID_BLOCK = 10**10  # event id = FILE_TAG * ID_BLOCK + source line
_STAGE = "_etl_stage"  # the table stage_csv fills
_DATE = r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z?)?"
_FIRST_DAY, _LAST_DAY = "1850-01-01", "2100-12-31"  # outside: an impossible date

#: Synthea's ENCOUNTERCLASS -> Visit vocabulary code (ETL-Synthea's convention).
VISIT_CODES = {
    "inpatient": "IP",
    "emergency": "ER",
    "urgentcare": "ER",
    "ambulatory": "OP",
    "outpatient": "OP",
    "wellness": "OP",
}
#: Synthea RACE / ETHNICITY -> concept_code in the Race / Ethnicity vocabularies.
RACE_CODES = {"american indian": "1", "native": "1", "asian": "2", "black": "3",
              "hawaiian": "4", "white": "5"}  # fmt: skip
ETHNICITY_CODES = {"hispanic": "Hispanic", "nonhispanic": "Not Hispanic"}
#: SYSTEM column values (allergies, conditions of Synthea >= 3.3) -> vocabulary_id.
SYSTEMS = {"SNOMED-CT": "SNOMED", "SNOMED": "SNOMED", "HTTP://SNOMED.INFO/SCT": "SNOMED",
           "RXNORM": "RxNorm", "HTTP://WWW.NLM.NIH.GOV/RESEARCH/UMLS/RXNORM": "RxNorm",
           "LOINC": "LOINC", "HTTP://LOINC.ORG": "LOINC", "CVX": "CVX"}  # fmt: skip
#: Standard concept domain -> the CDM table its rows belong in.
DOMAIN_TABLES = {
    "Condition": "condition_occurrence",
    "Drug": "drug_exposure",
    "Measurement": "measurement",
    "Observation": "observation",
    "Procedure": "procedure_occurrence",
}


#: The in-memory database attached for the load: the id and code maps every worker reads. The
#: build file's own database is named after the file, and no file name holds a "/".
MAPS = '"fedomop/maps"'
SPLIT_ROWS = 1_000_000  # a file with more data rows is read in parts, one per worker
#: Passing over a CSV row costs about a fifth of loading it (measured: 0.29-0.38 against
#: 1.65-1.79 microseconds), so the first parts of a split file get more rows.
SKIP_COST = 0.2
#: Columns filled with Synthea's random UUIDs: stored plain (``create_cdm_schema``).
PLAIN_COLUMNS = ("person.person_source_value", "visit_occurrence.visit_source_value")
#: visit_occurrence columns the load fills (the rest stay NULL).
VISIT_COLUMNS = (
    "visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date",
    "visit_start_datetime", "visit_end_date", "visit_end_datetime", "visit_type_concept_id",
    "visit_source_value", "visit_source_concept_id",
)  # fmt: skip
#: Settings of every connection that loads: the joins below are written with the small side
#: (id maps, code map) on the right, the hash-join build side. The optimizer cannot estimate a
#: CSV scan and would otherwise hash the whole file with all its columns (measured 1.5x slower).
LOAD_SETTINGS = ("SET disabled_optimizers = 'build_side_probe_side'",)


@dataclass(frozen=True)
class EventFile:
    """How one Synthea event file maps: its default table, vocabulary and columns."""

    name: str
    tag: int
    table: str  # where rows go when their code does not map
    vocabulary: str
    start: tuple[str, ...]  # start column, first present wins (Synthea versions differ)
    stop: str | None = None
    numeric_value: bool = False  # observations: VALUE typed by TYPE
    quantity: str | None = None

    def start_column(self, header: list[str]) -> str:
        for name in self.start:
            if name in header:
                return name
        return self.start[0]

    def required_columns(self, header: list[str]) -> tuple[str, ...]:
        cols = ["PATIENT", "ENCOUNTER", "CODE", self.start_column(header)]
        cols += [c for c in (self.stop, self.quantity) if c]
        if self.numeric_value:
            cols += ["VALUE", "UNITS", "TYPE"]
        return tuple(cols)


EVENT_FILES: tuple[EventFile, ...] = (
    EventFile("conditions", 3, "condition_occurrence", "SNOMED", ("START",), "STOP"),
    EventFile("medications", 4, "drug_exposure", "RxNorm", ("START",), "STOP",
              quantity="DISPENSES"),
    EventFile("observations", 5, "measurement", "LOINC", ("DATE",), numeric_value=True),
    EventFile("procedures", 6, "procedure_occurrence", "SNOMED", ("START", "DATE"), "STOP"),
    EventFile("immunizations", 7, "drug_exposure", "CVX", ("DATE",)),
    EventFile("allergies", 8, "observation", "SNOMED", ("START",), "STOP"),
)  # fmt: skip
PATIENT_COLUMNS = ("Id", "BIRTHDATE", "DEATHDATE", "RACE", "ETHNICITY", "GENDER")
ENCOUNTER_COLUMNS = ("Id", "START", "STOP", "PATIENT", "ENCOUNTERCLASS")
#: Tables a Synthea load fills, in the order the summary shows them.
TARGET_TABLES = (
    "person", "observation_period", "visit_occurrence", "condition_occurrence", "drug_exposure",
    "measurement", "observation", "procedure_occurrence", "death", "condition_era", "drug_era",
)  # fmt: skip


def _raw(column: str) -> str:
    """A source column, empty text as NULL. Not trimmed: a padded id or date is bad input and
    is quarantined (casts accept surrounding blanks), and trimming every field costs time."""
    return f"NULLIF({quote(column)}, '')"


def _date_reasons(dates: list[tuple[str, str]]) -> list[tuple[Reason, str]]:
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


def _reason_case(checks: list[tuple[Reason, str]]) -> str:
    """First failing reason (in ``Reason`` order) as a SQL CASE, NULL when the row loads."""
    order = list(Reason)
    checks = sorted(checks, key=lambda check: order.index(check[0]))
    return "CASE " + " ".join(f"WHEN {cond} THEN '{r.value}'" for r, cond in checks) + " END"


def _source_files(src_dir: Path) -> dict[str, Path]:
    """Every file the loader needs; a missing one is an ``EtlInputError`` naming it."""
    files = {}
    for name in ("patients", "encounters", *(f.name for f in EVENT_FILES)):
        path = find_table_file(src_dir, name)
        if path is None:
            raise EtlInputError(f"{src_dir}: Synthea file {name}.csv is missing")
        files[name] = path
    return files


def _read_source(
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


def _execute_reading(
    con: duckdb.DuckDBPyConnection, path: Path, sql: str, params: list
) -> duckdb.DuckDBPyConnection:
    """Run a statement that reads ``path``; a CSV the reader rejects is an ``EtlInputError``."""
    try:
        return con.execute(sql, params)
    except (duckdb.InvalidInputException, duckdb.ConversionException) as error:
        raise csv_error(path, error) from error


def _quarantine(
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
    for table in targets:  # names from DOMAIN_TABLES / EVENT_FILES, never from input
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


def _keyed_rows(source: str, extra: str = "") -> str:
    """Source rows with typed dates and the first line of each duplicated source id."""
    return f"""WITH s AS (SELECT *, TRY_CAST(start_raw AS TIMESTAMP) AS start_ts,
                          TRY_CAST(stop_raw AS TIMESTAMP) AS stop_ts FROM {source}),
            dups AS (SELECT source_id, min(_line) AS first_line FROM s
                     WHERE source_id IS NOT NULL GROUP BY ALL HAVING count(*) > 1)
            SELECT s.*, dups.first_line {extra} FROM s LEFT JOIN dups USING (source_id)"""


_DUPLICATE = (Reason.DUPLICATE_KEY, "_line > first_line")
#: A row with fewer fields than the header (``_read_source``'s ``_complete``).
_TOO_FEW_FIELDS = (Reason.TOO_FEW_FIELDS, "NOT _complete")


def _load_patients(con: duckdb.DuckDBPyConnection, path: Path, report: LoadReport) -> None:
    """patients.csv -> person (+ ``person_map``: UUID -> person_id and death). Small: one
    statement validates every row, duplicated ids included, before anything is inserted."""
    source, params = _read_source(
        path, PATIENT_COLUMNS,
        lambda _: {"source_id": _raw("Id"), "start_raw": _raw("BIRTHDATE"),
                   "stop_raw": _raw("DEATHDATE"), "gender": _raw("GENDER"),
                   "race": _raw("RACE"), "ethnicity": _raw("ETHNICITY")},
    )  # fmt: skip
    checks = [_TOO_FEW_FIELDS, (Reason.MISSING_REQUIRED, "source_id IS NULL OR start_raw IS NULL")]
    checks += _date_reasons([("start_raw", "start_ts"), ("stop_raw", "stop_ts")])
    checks += [(Reason.END_BEFORE_START, "stop_ts < start_ts"), _DUPLICATE]
    race = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in RACE_CODES.items())
    ethnicity = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in ETHNICITY_CODES.items())
    _execute_reading(
        con, path,
        f"""CREATE OR REPLACE TEMP TABLE _checked AS
        SELECT *, {_reason_case(checks)} AS _reason FROM ({_keyed_rows(source)})""",
        params,
    )  # fmt: skip
    con.execute(
        f"""INSERT INTO person (person_id, gender_concept_id, year_of_birth, month_of_birth,
                day_of_birth, birth_datetime, race_concept_id, ethnicity_concept_id,
                person_source_value, gender_source_value, race_source_value,
                ethnicity_source_value)
        SELECT p._line - 1,
               CASE upper(p.gender) WHEN 'M' THEN 8507 WHEN 'F' THEN 8532 ELSE 0 END,
               year(p.start_ts), month(p.start_ts), day(p.start_ts), p.start_ts,
               coalesce(r.concept_id, 0), coalesce(e.concept_id, 0),
               p.source_id, p.gender, p.race, p.ethnicity
        FROM _checked p
        LEFT JOIN concept r ON r.vocabulary_id = 'Race'
             AND r.concept_code = CASE lower(p.race) {race} END
        LEFT JOIN concept e ON e.vocabulary_id = 'Ethnicity'
             AND e.concept_code = CASE lower(p.ethnicity) {ethnicity} END
        WHERE p._reason IS NULL ORDER BY p._line"""
    )
    con.execute(
        f"""CREATE TABLE {MAPS}.person_map AS SELECT source_id, _line - 1 AS person_id,
           stop_ts AS death_ts FROM _checked WHERE _reason IS NULL"""
    )
    _quarantine(con, "_checked", path, report, target="person")
    con.execute("DROP TABLE _checked")


def _encounter_rows(path: Path, part: Part) -> tuple[str, list]:
    """Every encounter of ``part``, typed, with its person, visit concept and ``_reason``."""
    visit = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in VISIT_CODES.items())
    source, params = _read_source(
        path, ENCOUNTER_COLUMNS,
        lambda _: {"source_id": _raw("Id"), "patient": _raw("PATIENT"),
                   "start_raw": _raw("START"), "stop_raw": _raw("STOP"),
                   "visit_code": f"CASE lower({_raw('ENCOUNTERCLASS')}) {visit} END"},
        part,
    )  # fmt: skip
    checks = [
        _TOO_FEW_FIELDS,
        (Reason.MISSING_REQUIRED, "source_id IS NULL OR start_raw IS NULL OR patient IS NULL"),
    ]
    checks += _date_reasons([("start_raw", "start_ts"), ("stop_raw", "stop_ts")])
    checks += [(Reason.END_BEFORE_START, "stop_ts < start_ts")]
    checks += [(Reason.UNKNOWN_PERSON, "person_id IS NULL")]
    sql = f"""SELECT _line, source_id, person_id, start_ts, coalesce(stop_ts, start_ts) AS end_ts,
               visit_concept_id, {_reason_case(checks)} AS _reason
        FROM (SELECT s.*, TRY_CAST(s.start_raw AS TIMESTAMP) AS start_ts,
                     TRY_CAST(s.stop_raw AS TIMESTAMP) AS stop_ts, m.person_id,
                     coalesce(c.concept_id, 0) AS visit_concept_id
              FROM {source} s
              LEFT JOIN {MAPS}.person_map m ON m.source_id = s.patient
              LEFT JOIN concept c ON c.vocabulary_id = 'Visit' AND c.concept_code = s.visit_code)"""
    return sql, params


def _insert_visits(cur: duckdb.DuckDBPyConnection, path: Path, part: Part) -> int:
    """The good encounters of ``part`` -> visit_occurrence; the number inserted."""
    rows, params = _encounter_rows(path, part)
    return _execute_reading(
        cur, path,
        f"""INSERT INTO visit_occurrence ({", ".join(VISIT_COLUMNS)})
        SELECT _line - 1, person_id, visit_concept_id, CAST(start_ts AS DATE), start_ts,
               CAST(end_ts AS DATE), end_ts, {EHR}, source_id, 0
        FROM ({rows}) WHERE _reason IS NULL""",
        params,
    ).fetchone()[0]  # fmt: skip


def _finish_visits(con: duckdb.DuckDBPyConnection, path: Path, report: LoadReport) -> str:
    """``visit_map``: how events find their visit. An encounter id used again on a later line
    is quarantined there and the first one kept. Returns the lookup key's SQL function.

    The map is keyed by the 64-bit hash of the encounter id once the hashes are shown distinct:
    every event file builds its own hash table of all visits, and an integer key builds in half
    the time of the 36-character id. An event's id can then only match its own visit, or, if it
    names no visit at all, one of another id with the same hash and the same person (about 1e-18
    per dangling id). Should two ids ever share a hash, the ids themselves are the key.
    """

    def build(key: str) -> tuple[int, int]:
        con.execute(
            f"""CREATE OR REPLACE TABLE {MAPS}.visit_map AS
            SELECT {key}(visit_source_value) AS encounter_key, visit_occurrence_id, person_id
            FROM visit_occurrence"""
        )
        return con.execute(
            f"SELECT count(*), count(DISTINCT encounter_key) FROM {MAPS}.visit_map"
        ).fetchone()

    visits, hashes = build("hash")  # each id read and hashed once
    if visits != hashes:
        _quarantine_repeated_visits(con, path, report)
        visits, hashes = build("hash")
    key = _lookup_key(visits, hashes)
    if key != "hash":
        build(key)
    return key


def _key(function: str, column: str) -> str:
    """An encounter reference as ``visit_map``'s key; NULL stays NULL (hash(NULL) is a number)."""
    return f"CASE WHEN {column} IS NOT NULL THEN {function}({column}) END"


def _lookup_key(visits: int, distinct_hashes: int) -> str:
    """``visit_map``'s key function: the hash when every visit's is its own, else the id."""
    return "hash" if visits == distinct_hashes else ""


def _quarantine_repeated_visits(
    con: duckdb.DuckDBPyConnection, path: Path, report: LoadReport
) -> None:
    """Quarantine every visit whose encounter id an earlier line already used."""
    con.execute(
        f"""CREATE TEMP TABLE _repeated AS
        SELECT visit_occurrence_id + 1 AS _line, '{Reason.DUPLICATE_KEY.value}' AS _reason
        FROM (SELECT visit_occurrence_id, row_number() OVER (
                  PARTITION BY visit_source_value ORDER BY visit_occurrence_id) AS copy
              FROM visit_occurrence)
        WHERE copy > 1"""
    )
    con.execute(
        "DELETE FROM visit_occurrence WHERE visit_occurrence_id IN (SELECT _line - 1 FROM _repeated)"
    )
    _quarantine(con, "_repeated", path, report, target="visit_occurrence")
    con.execute("DROP TABLE _repeated")


def _vocabulary_expr(spec: EventFile, header: list[str]) -> str:
    """SQL giving each row's vocabulary: from a SYSTEM column when the file has one."""
    if "SYSTEM" not in header:
        return f"'{spec.vocabulary}'"
    cases = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in SYSTEMS.items())
    return f"CASE upper(trim({quote('SYSTEM')})) {cases} ELSE '{spec.vocabulary}' END"


def _create_code_map(con: duckdb.DuckDBPyConnection) -> None:
    """``code_map``: every concept of the vocabularies Synthea codes in -> source concept,
    standard concept ('Maps to'; the lowest id if several) and the table of its domain (NULL:
    the file's default table). Built once per load, so each event file maps its codes in the
    same statement that reads it."""
    domains = " ".join(f"WHEN '{d}' THEN '{t}'" for d, t in DOMAIN_TABLES.items())
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


#: Per routable table: (id column, prefix of its concept/type/source columns, start date column).
_EVENT_TABLES = {
    "condition_occurrence": ("condition_occurrence_id", "condition", "condition_start_date"),
    "drug_exposure": ("drug_exposure_id", "drug", "drug_exposure_start_date"),
    "measurement": ("measurement_id", "measurement", "measurement_date"),
    "observation": ("observation_id", "observation", "observation_date"),
    "procedure_occurrence": ("procedure_occurrence_id", "procedure", "procedure_date"),
}


def _event_columns(table: str, tag: int) -> dict[str, str]:
    """CDM column -> SQL over ``_events`` for the rows routed to ``table``."""
    id_column, prefix, start_date = _EVENT_TABLES[table]
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
            "patient": _raw("PATIENT"),
            "encounter": _raw("ENCOUNTER"),
            "code": _raw("CODE"),
            "vocabulary_id": _vocabulary_expr(spec, header),
            "start_raw": _raw(spec.start_column(header)),
            "stop_raw": _raw(spec.stop) if spec.stop else none,
            "value_raw": _raw("VALUE") if spec.numeric_value else none,
            "units": _raw("UNITS") if spec.numeric_value else none,
            "numeric": f"lower({_raw('TYPE')}) = 'numeric'" if spec.numeric_value else "false",
            "quantity_raw": _raw(spec.quantity) if spec.quantity else none,
        }

    return columns


def _event_rows(
    spec: EventFile, path: Path, part: Part, *, visit_key: str | None
) -> tuple[str, list]:
    """Every row of ``part`` typed, mapped and routed, with its ``_target`` and ``_reason``.

    ``visit_key`` is ``visit_map``'s key function (``_finish_visits``). None leaves
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
        f"LEFT JOIN {MAPS}.visit_map v ON v.encounter_key = {_key(visit_key, 's.encounter')}"
        if visits
        else ""
    )
    header = read_header(path, OMOP_CSV)
    source, params = _read_source(
        path, spec.required_columns(header), _event_source_columns(spec), part
    )
    checks = [
        _TOO_FEW_FIELDS,
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
    checks += _date_reasons([("start_raw", "start_ts"), ("stop_raw", "stop_ts")])
    checks += [(Reason.END_BEFORE_START, "stop_ts < start_ts")]
    checks += [(Reason.UNKNOWN_PERSON, "person_id IS NULL")]
    sql = f"""SELECT _line, person_id, encounter, visit_occurrence_id, start_ts, stop_ts, code,
               value_as_number, CASE WHEN NOT numeric THEN value_raw END AS value_as_string,
               value_raw, units, unit_concept_id, quantity, source_concept_id, concept_id,
               _target, {_reason_case(checks)} AS _reason
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
    columns = _event_columns(table, tag)
    return _execute_reading(
        cur, path,
        f"INSERT INTO {quote(table)} ({', '.join(map(quote, columns))}) "
        f"SELECT {', '.join(columns.values())} FROM ({rows}) "
        f"WHERE _reason IS NULL AND _target = '{table}'",
        params,
    ).fetchone()[0]  # fmt: skip


def _insert_events(
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


def _collect_exceptions(
    cur: duckdb.DuckDBPyConnection, spec: EventFile, path: Path, lines: int, landed: int
) -> None:
    """When the first pass did not land every line of the file, its second pass: the rows to
    route to another table or to quarantine."""
    if landed == lines:
        return
    rows, params = _event_rows(spec, path, WHOLE_FILE, visit_key=None)
    _execute_reading(
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
             ON v.encounter_key = {_key(visit_key, "e.encounter")}
        ORDER BY e._line"""


def _apply_exceptions(
    con: duckdb.DuckDBPyConnection, spec: EventFile, path: Path, report: LoadReport, visit_key: str
) -> None:
    """Insert the rows a file's second pass collected into the tables of their domain,
    quarantine the rest."""
    table = _exceptions_table(spec)
    targets = con.execute(
        f"SELECT DISTINCT _target FROM {table} WHERE _reason IS NULL ORDER BY 1"
    ).fetchall()
    for (target,) in targets:
        assert target in _EVENT_TABLES  # from DOMAIN_TABLES, never from input
        _insert_routed(con, path, target, spec.tag, _with_visits(table, visit_key), [])
    _quarantine(con, table, path, report)
    con.execute(f"DROP TABLE {table}")


def _insert_periods(cur: duckdb.DuckDBPyConnection) -> int:
    """observation_period: first to last recorded date per person, over the visits (start to
    end) and every event table (start)."""
    spans = [
        "SELECT person_id, min(visit_start_datetime) AS first, max(visit_end_datetime) AS last "
        "FROM visit_occurrence GROUP BY ALL"
    ]
    for table, (_, _, start_date) in _EVENT_TABLES.items():
        start = quote(start_date.replace("_date", "_datetime"))
        spans.append(
            f"SELECT person_id, min({start}), max({start}) FROM {quote(table)} GROUP BY ALL"
        )
    return cur.execute(
        f"""INSERT INTO observation_period
        SELECT row_number() OVER (ORDER BY person_id), person_id, CAST(min(first) AS DATE),
               CAST(max(last) AS DATE), {EHR}
        FROM ({" UNION ALL ".join(spans)}) GROUP BY person_id ORDER BY person_id"""
    ).fetchone()[0]


def _insert_deaths(cur: duckdb.DuckDBPyConnection) -> int:
    """death from the patients' DEATHDATE."""
    return cur.execute(
        f"""INSERT INTO death (person_id, death_date, death_datetime, death_type_concept_id)
        SELECT person_id, CAST(death_ts AS DATE), death_ts, {EHR} FROM {MAPS}.person_map
        WHERE death_ts IS NOT NULL ORDER BY person_id"""
    ).fetchone()[0]


ERA_PERSISTENCE_DAYS = 30  # OHDSI's era builder: gaps up to 30 days continue an era


def _insert_eras(con: duckdb.DuckDBPyConnection, era_table: str, events: str) -> int:
    """Build ``era_table`` from ``events`` (person_id, concept_id, s, e) the OHDSI way: spans of
    one concept per person whose gaps are at most ``ERA_PERSISTENCE_DAYS``, with the number of
    events (and, for drug eras, the days inside the era that no exposure covers)."""
    gap = ", greatest(0, datediff('day', min(s), max(e)) - sum(datediff('day', s, e)))"
    return con.execute(
        f"""INSERT INTO {quote(era_table)}
        WITH events AS ({events}),
        flagged AS (
            SELECT *, CASE WHEN s > max(e) OVER (PARTITION BY person_id, concept_id ORDER BY s, e
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                           + INTERVAL {ERA_PERSISTENCE_DAYS} DAY THEN 1 ELSE 0 END AS starts
            FROM events),
        numbered AS (
            SELECT *, sum(starts) OVER (PARTITION BY person_id, concept_id ORDER BY s, e
                                       ROWS UNBOUNDED PRECEDING) AS era
            FROM flagged)
        SELECT row_number() OVER (ORDER BY person_id, concept_id, min(s)), person_id,
               concept_id, min(s), max(e), count(*)
               {gap if era_table == "drug_era" else ""}
        FROM numbered GROUP BY person_id, concept_id, era"""
    ).fetchone()[0]


CONDITION_ERA_EVENTS = """
    SELECT person_id, condition_concept_id AS concept_id, condition_start_date AS s,
           coalesce(condition_end_date, condition_start_date + 1) AS e
    FROM condition_occurrence WHERE condition_concept_id <> 0"""
#: drug_era is per RxNorm ingredient: exposures reach theirs through concept_ancestor.
DRUG_ERA_EVENTS = """
    SELECT d.person_id, a.ancestor_concept_id AS concept_id,
           d.drug_exposure_start_date AS s, d.drug_exposure_end_date AS e
    FROM drug_exposure d
    JOIN concept_ancestor a ON a.descendant_concept_id = d.drug_concept_id
    JOIN concept c ON c.concept_id = a.ancestor_concept_id
    WHERE c.concept_class_id = 'Ingredient'
      AND c.vocabulary_id IN ('RxNorm', 'RxNorm Extension')"""


def _derived_tasks() -> list[Task]:
    """The tables derived from the loaded ones; independent, so they are built side by side."""
    return [
        Task("observation_period", "observation_period", _insert_periods),
        Task("condition_era", "condition_era",
             lambda cur: _insert_eras(cur, "condition_era", CONDITION_ERA_EVENTS)),
        Task("drug_era", "drug_era", lambda cur: _insert_eras(cur, "drug_era", DRUG_ERA_EVENTS)),
        Task("death", "death", _insert_deaths),
    ]  # fmt: skip


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
    filled = {t: set(_event_columns(t, 0)) for t in _EVENT_TABLES}
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
    concept = {t: f"{prefix}_concept_id" for t, (_, prefix, _) in _EVENT_TABLES.items()}
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
             lambda cur, part=part: _insert_visits(cur, path, part))
        for i, part in enumerate(parts, 1)
    ]  # fmt: skip
    landed = sum(run_tasks(con, tasks, workers=workers, settings=LOAD_SETTINGS, on_done=on_done))
    if landed != lines:
        rows, params = _encounter_rows(path, WHOLE_FILE)
        _execute_reading(
            con, path,
            f"CREATE TEMP TABLE _checked AS SELECT * FROM ({rows}) WHERE _reason IS NOT NULL",
            params,
        )  # fmt: skip
        _quarantine(con, "_checked", path, report, target="visit_occurrence")
        con.execute("DROP TABLE _checked")
    return _finish_visits(con, path, report)


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
                landed = _insert_events(cur, spec, path, part, visit_key)
                if whole:
                    _collect_exceptions(cur, spec, path, n, landed)
                return landed

            tasks.append(Task(f"{spec.name} {i}/{len(parts)}", spec.table, run))
            owners.append((spec, len(parts)))
    landed: dict[str, int] = {}
    counts = run_tasks(con, tasks, workers=workers, settings=LOAD_SETTINGS, on_done=on_done)
    for (spec, _), count in zip(owners, counts, strict=True):
        landed[spec.name] = landed.get(spec.name, 0) + count
    for spec, parts in dict(owners).items():
        if parts > 1:
            _collect_exceptions(con, spec, files[spec.name], lines[spec.name], landed[spec.name])
    for spec in EVENT_FILES:
        if landed[spec.name] != lines[spec.name]:  # what made _collect_exceptions collect
            _apply_exceptions(con, spec, files[spec.name], report, visit_key)


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
    files = _source_files(src)
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
            _create_code_map(con)
            with clock("load_map/patients"):
                bar.update(task, description=files["patients"].name)
                _load_patients(con, files["patients"], report)
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
                run_tasks(con, _derived_tasks(), workers=workers, settings=LOAD_SETTINGS)
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
    files = _source_files(Path(src_dir))
    con = duckdb.connect()
    counts = {}
    for name, path in files.items():
        source, params = _read_source(path, (), lambda _: {})
        counts[name] = con.execute(f"SELECT count(*) FROM {source}", params).fetchone()[0]
    con.close()
    return counts
