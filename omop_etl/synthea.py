"""Loading a Synthea CSV export into an OMOP CDM v5.4 DuckDB file, set-based in SQL.

Synthea writes one CSV per kind of record (patients, encounters, conditions, medications,
observations, procedures, immunizations, allergies) keyed by UUIDs and coded in SNOMED, RxNorm,
LOINC and CVX. The loader

- reads each file once, only the columns it maps, numbering rows by source line, and types and
  validates every row in one SQL statement; a row that cannot load goes to ``etl_quarantine``
  with its line, reason and all its raw columns (re-read with ``stage_csv`` only then);
- gives UUIDs deterministic integer ids: person_id and visit_occurrence_id are the source line
  minus one; an event row's id is ``FILE_TAG * 10**10 + line`` so every CDM row names its source;
- maps codes through ``concept`` and ``concept_relationship`` ('Maps to'; one code map per
  load, joined while the file is read), keeps ``*_source_value`` and ``*_source_concept_id``,
  gives unmapped codes concept 0 (counted per table), and routes each row to the table of its
  standard concept's domain (a SNOMED "history of" code in conditions.csv lands in
  observation, spirometry in measurement);
- derives observation_period (first to last recorded date per person), death, and
  condition_era / drug_era (OHDSI's 30-day persistence window; drugs at ingredient level).

It builds into a new file via ``atomic_build``: on any error the previous database is untouched.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
from rich.progress import Progress

from omop_etl.build import atomic_build
from omop_etl.quarantine import Reason, quarantine_rows
from omop_etl.report import LoadReport
from omop_etl.schema import create_cdm_indexes, create_cdm_schema, quote
from omop_etl.staging import OMOP_CSV, EtlInputError, find_table_file, read_header, stage_csv
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
    path: Path, required: tuple[str, ...], columns: Callable[[list[str]], dict[str, str]]
) -> tuple[str, list]:
    """SQL subquery (and its parameters) reading only the columns the mapping needs from
    ``path``, numbered by source line (``row_number() OVER ()`` keeps file order; header is
    line 1). Nothing is staged: the full raw rows are read again only if a row is rejected.

    ``columns`` builds alias -> SQL over the file's header. A missing required column is an
    ``EtlInputError`` naming the file.
    """
    header = read_header(path, OMOP_CSV)
    missing = [c for c in required if c not in header]
    if missing:
        raise EtlInputError(f"{path}: required column(s) {', '.join(missing)} missing")
    select = ", ".join(f"{sql} AS {quote(alias)}" for alias, sql in columns(header).items())
    sql = f"""(SELECT row_number() OVER () + 1 AS _line, {select} FROM read_csv(
        ?, header = true, auto_detect = false, columns = ?, delim = ',', quote = '"',
        escape = '"', strict_mode = true))"""
    return sql, [str(path), {h: "VARCHAR" for h in header}]


def _execute_reading(con: duckdb.DuckDBPyConnection, path: Path, sql: str, params: list) -> None:
    """Run a statement that reads ``path``; a CSV the reader rejects is an ``EtlInputError``."""
    try:
        con.execute(sql, params)
    except (duckdb.InvalidInputException, duckdb.ConversionException) as error:
        raise EtlInputError(f"{path}: not a readable CSV file: {error}") from error


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
    for table in targets:  # names from DOMAIN_TABLES / EVENT_FILES, never from input
        con.execute(
            f"""CREATE OR REPLACE TEMP VIEW _synthea_bad AS
                SELECT s.*, c._line, c._reason FROM (SELECT rowid + 2 AS _l, * FROM {_STAGE}) s
                JOIN (SELECT _line, _reason FROM {checked}
                      WHERE _reason IS NOT NULL AND {target_sql} = '{table}') c
                ON c._line = s._l"""
        )
        per_reason = quarantine_rows(
            con, "_synthea_bad", source_file=path.name, target_table=table, raw_columns=header
        )
        report.add_quarantine(table, per_reason)
    con.execute("DROP VIEW _synthea_bad")
    con.execute(f"DROP TABLE {_STAGE}")


def _keyed_rows(source: str, extra: str = "") -> str:
    """Source rows with typed dates and the first line of each duplicated source id."""
    return f"""WITH s AS (SELECT *, TRY_CAST(start_raw AS TIMESTAMP) AS start_ts,
                          TRY_CAST(stop_raw AS TIMESTAMP) AS stop_ts FROM {source}),
            dups AS (SELECT source_id, min(_line) AS first_line FROM s
                     WHERE source_id IS NOT NULL GROUP BY ALL HAVING count(*) > 1)
            SELECT s.*, dups.first_line {extra} FROM s LEFT JOIN dups USING (source_id)"""


_DUPLICATE = (Reason.DUPLICATE_KEY, "_line > first_line")


def _load_patients(con: duckdb.DuckDBPyConnection, path: Path, report: LoadReport) -> None:
    """patients.csv -> person (+ ``_person_map``: UUID -> person_id and death)."""
    source, params = _read_source(
        path, PATIENT_COLUMNS,
        lambda _: {"source_id": _raw("Id"), "start_raw": _raw("BIRTHDATE"),
                   "stop_raw": _raw("DEATHDATE"), "gender": _raw("GENDER"),
                   "race": _raw("RACE"), "ethnicity": _raw("ETHNICITY")},
    )  # fmt: skip
    checks = [(Reason.MISSING_REQUIRED, "source_id IS NULL OR start_raw IS NULL")]
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
        """CREATE TEMP TABLE _person_map AS SELECT source_id, _line - 1 AS person_id,
           stop_ts AS death_ts FROM _checked WHERE _reason IS NULL"""
    )
    _finish_keyed(con, path, report, "person")


def _finish_keyed(con: duckdb.DuckDBPyConnection, path: Path, report: LoadReport, table: str):
    counts = report.table(table)
    counts.read, counts.loaded = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE _reason IS NULL) FROM _checked"
    ).fetchone()
    _quarantine(con, "_checked", path, report, target=table)
    con.execute("DROP TABLE _checked")


def _load_encounters(con: duckdb.DuckDBPyConnection, path: Path, report: LoadReport) -> None:
    """encounters.csv -> visit_occurrence (+ ``_visit_map``: UUID -> visit id, person)."""
    visit = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in VISIT_CODES.items())
    source, params = _read_source(
        path, ENCOUNTER_COLUMNS,
        lambda _: {"source_id": _raw("Id"), "patient": _raw("PATIENT"),
                   "start_raw": _raw("START"), "stop_raw": _raw("STOP"),
                   "visit_code": f"CASE lower({_raw('ENCOUNTERCLASS')}) {visit} END"},
    )  # fmt: skip
    checks = [
        (Reason.MISSING_REQUIRED, "source_id IS NULL OR start_raw IS NULL OR patient IS NULL")
    ]
    checks += _date_reasons([("start_raw", "start_ts"), ("stop_raw", "stop_ts")])
    checks += [(Reason.END_BEFORE_START, "stop_ts < start_ts")]
    checks += [(Reason.UNKNOWN_PERSON, "person_id IS NULL"), _DUPLICATE]
    _execute_reading(
        con, path,
        f"""CREATE OR REPLACE TEMP TABLE _checked AS
        SELECT _line, source_id, person_id, start_ts, coalesce(stop_ts, start_ts) AS end_ts,
               coalesce(c.concept_id, 0) AS visit_concept_id, {_reason_case(checks)} AS _reason
        FROM ({_keyed_rows(source, ", m.person_id")}
              LEFT JOIN _person_map m ON m.source_id = s.patient)
        LEFT JOIN concept c ON c.vocabulary_id = 'Visit' AND c.concept_code = visit_code""",
        params,
    )  # fmt: skip
    con.execute(
        f"""INSERT INTO visit_occurrence (visit_occurrence_id, person_id, visit_concept_id,
                visit_start_date, visit_start_datetime, visit_end_date, visit_end_datetime,
                visit_type_concept_id, visit_source_value, visit_source_concept_id)
        SELECT _line - 1, person_id, visit_concept_id, CAST(start_ts AS DATE), start_ts,
               CAST(end_ts AS DATE), end_ts, {EHR}, source_id, 0
        FROM _checked WHERE _reason IS NULL"""
    )
    con.execute(
        """CREATE TEMP TABLE _visit_map AS SELECT source_id, _line - 1 AS visit_occurrence_id,
           person_id FROM _checked WHERE _reason IS NULL"""
    )
    con.execute(
        """INSERT INTO _dates SELECT person_id, min(start_ts), max(end_ts) FROM _checked
           WHERE _reason IS NULL GROUP BY ALL"""
    )
    report.table("visit_occurrence").unmapped = con.execute(
        "SELECT count(*) FROM _checked WHERE _reason IS NULL AND visit_concept_id = 0"
    ).fetchone()[0]
    _finish_keyed(con, path, report, "visit_occurrence")


def _vocabulary_expr(spec: EventFile, header: list[str]) -> str:
    """SQL giving each row's vocabulary: from a SYSTEM column when the file has one."""
    if "SYSTEM" not in header:
        return f"'{spec.vocabulary}'"
    cases = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in SYSTEMS.items())
    return f"CASE upper(trim({quote('SYSTEM')})) {cases} ELSE '{spec.vocabulary}' END"


def _create_code_map(con: duckdb.DuckDBPyConnection) -> None:
    """``_code_map``: every concept of the vocabularies Synthea codes in -> source concept,
    standard concept ('Maps to'; the lowest id if several) and the table of its domain (NULL:
    the file's default table). Built once per load, so each event file maps its codes in the
    same statement that reads it, and the CDM inserts read a plain table (DuckDB's parallel
    batch insert; an insert fed by a join is not)."""
    domains = " ".join(f"WHEN '{d}' THEN '{t}'" for d, t in DOMAIN_TABLES.items())
    vocabularies = sorted({*SYSTEMS.values(), *(spec.vocabulary for spec in EVENT_FILES)})
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE _code_map AS
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


def _load_events(
    con: duckdb.DuckDBPyConnection, spec: EventFile, path: Path, report: LoadReport
) -> None:
    """One event file: validate, map codes, route by domain, insert, quarantine the rest."""
    header = read_header(path, OMOP_CSV)
    source, params = _read_source(path, spec.required_columns(header), _event_source_columns(spec))
    checks = [(Reason.MISSING_REQUIRED, "patient IS NULL OR code IS NULL OR start_raw IS NULL")]
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
    _execute_reading(
        con, path,
        f"""CREATE OR REPLACE TEMP TABLE _events AS
        SELECT _line, person_id, visit_occurrence_id, start_ts, stop_ts, code,
               value_as_number, CASE WHEN NOT numeric THEN value_raw END AS value_as_string,
               value_raw, units, unit_concept_id, quantity, source_concept_id, concept_id,
               _target, {_reason_case(checks)} AS _reason
        FROM (
            SELECT s.*, TRY_CAST(s.start_raw AS TIMESTAMP) AS start_ts,
                   TRY_CAST(s.stop_raw AS TIMESTAMP) AS stop_ts,
                   p.person_id,
                   CASE WHEN v.person_id = p.person_id THEN v.visit_occurrence_id END
                       AS visit_occurrence_id,
                   CASE WHEN s.numeric THEN TRY_CAST(s.value_raw AS DOUBLE) END
                       AS value_as_number,
                   CASE WHEN s.units IS NOT NULL THEN coalesce(u.concept_id, 0) END
                       AS unit_concept_id,
                   TRY_CAST(s.quantity_raw AS DOUBLE) AS quantity,
                   coalesce(m.source_concept_id, 0) AS source_concept_id,
                   coalesce(m.concept_id, 0) AS concept_id,
                   coalesce(m._target, '{spec.table}') AS _target
            FROM {source} s
            LEFT JOIN _person_map p ON p.source_id = s.patient
            LEFT JOIN _visit_map v ON v.source_id = s.encounter
            LEFT JOIN concept u ON u.vocabulary_id = 'UCUM' AND u.concept_code = s.units
            LEFT JOIN _code_map m ON m.vocabulary_id = s.vocabulary_id AND m.code = s.code)""",
        params,
    )  # fmt: skip
    rows = con.execute(
        """SELECT _target, count(*), count(*) FILTER (WHERE _reason IS NULL),
                  count(*) FILTER (WHERE _reason IS NULL AND concept_id = 0)
           FROM _events GROUP BY ALL ORDER BY 1"""
    ).fetchall()
    for table, read, loaded, unmapped in rows:
        columns = _event_columns(table, spec.tag)
        con.execute(
            f"INSERT INTO {quote(table)} ({', '.join(map(quote, columns))}) "
            f"SELECT {', '.join(columns.values())} FROM _events "
            f"WHERE _reason IS NULL AND _target = ?",
            [table],
        )
        counts = report.table(table)
        counts.read += read
        counts.loaded += loaded
        counts.unmapped += unmapped
    _quarantine(con, "_events", path, report)
    con.execute(
        """INSERT INTO _dates SELECT person_id, min(start_ts), max(start_ts)
           FROM _events WHERE _reason IS NULL GROUP BY ALL"""
    )
    con.execute("DROP TABLE _events")


def _derive_periods_and_deaths(con: duckdb.DuckDBPyConnection, report: LoadReport) -> None:
    """observation_period: first to last recorded date per person; death from DEATHDATE."""
    con.execute(
        f"""INSERT INTO observation_period
        SELECT row_number() OVER (ORDER BY person_id), person_id, CAST(min(first) AS DATE),
               CAST(max(last) AS DATE), {EHR}
        FROM _dates GROUP BY person_id ORDER BY person_id"""
    )
    con.execute(
        f"""INSERT INTO death (person_id, death_date, death_datetime, death_type_concept_id)
        SELECT person_id, CAST(death_ts AS DATE), death_ts, {EHR} FROM _person_map
        WHERE death_ts IS NOT NULL ORDER BY person_id"""
    )
    for table in ("observation_period", "death"):
        n = con.execute(f"SELECT count(*) FROM {quote(table)}").fetchone()[0]
        report.table(table).loaded = n
    report.notes.append(
        "observation_period, death, condition_era and drug_era are derived (read counts 0)"
    )


ERA_PERSISTENCE_DAYS = 30  # OHDSI's era builder: gaps up to 30 days continue an era


def _insert_eras(con: duckdb.DuckDBPyConnection, era_table: str, events: str) -> None:
    """Build ``era_table`` from ``events`` (person_id, concept_id, s, e) the OHDSI way: spans of
    one concept per person whose gaps are at most ``ERA_PERSISTENCE_DAYS``, with the number of
    events (and, for drug eras, the days inside the era that no exposure covers)."""
    gap = ", greatest(0, datediff('day', min(s), max(e)) - sum(datediff('day', s, e)))"
    con.execute(
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
    )


def _derive_eras(con: duckdb.DuckDBPyConnection, report: LoadReport) -> None:
    """condition_era per standard condition, drug_era per RxNorm ingredient (concept_ancestor)."""
    _insert_eras(
        con,
        "condition_era",
        """SELECT person_id, condition_concept_id AS concept_id, condition_start_date AS s,
                  coalesce(condition_end_date, condition_start_date + 1) AS e
           FROM condition_occurrence WHERE condition_concept_id <> 0""",
    )
    _insert_eras(
        con,
        "drug_era",
        """SELECT d.person_id, a.ancestor_concept_id AS concept_id,
                  d.drug_exposure_start_date AS s, d.drug_exposure_end_date AS e
           FROM drug_exposure d
           JOIN concept_ancestor a ON a.descendant_concept_id = d.drug_concept_id
           JOIN concept c ON c.concept_id = a.ancestor_concept_id
           WHERE c.concept_class_id = 'Ingredient'
             AND c.vocabulary_id IN ('RxNorm', 'RxNorm Extension')""",
    )
    for table in ("condition_era", "drug_era"):
        report.table(table).loaded = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (DuckDB's workers included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_synthea(
    src_dir: str | Path,
    db_path: str | Path,
    *,
    vocab_dir: str | Path | None = None,
    progress: bool = True,
    memory_limit: str | None = None,
    timings: dict[str, float] | None = None,
) -> LoadReport:
    """Build the CDM file ``db_path`` from the Synthea CSV export in ``src_dir``.

    ``vocab_dir`` is an Athena vocabulary export (default: the shipped one). A missing file or
    required column raises ``EtlInputError`` and leaves the previous ``db_path`` untouched.
    ``memory_limit`` (e.g. '1GB') caps DuckDB's memory; ``timings``, if given, receives wall
    seconds per stage (vocabulary, load_map, index; ``load_map/<file>`` per source file) and the
    process's CPU seconds, DuckDB's threads included, under ``cpu_<stage>``.
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

    @contextmanager
    def clock(stage: str) -> Iterator[None]:
        t, cpu = time.perf_counter(), _cpu_seconds()
        yield
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t
        seconds[f"cpu_{stage}"] = seconds.get(f"cpu_{stage}", 0.0) + _cpu_seconds() - cpu

    with atomic_build(db_path) as con, Progress(disable=not progress, transient=True) as bar:
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        task = bar.add_task("vocabulary", total=len(files) + 3)

        def step(label: str) -> Callable[[], None]:
            bar.update(task, description=label)
            return lambda: bar.advance(task)

        with clock("vocabulary"):
            done = step(f"vocabulary {vocab}")
            create_cdm_schema(con, indexes=False)
            load_vocabulary(con, vocab)
            done()
        with clock("load_map"):
            # Joins below are written with the small side (id maps, code map, bad rows) on the
            # right, the hash-join build side. The optimizer cannot estimate a CSV scan and would
            # otherwise hash the whole file with all its columns (measured 1.5x slower).
            con.execute("SET disabled_optimizers = 'build_side_probe_side'")
            con.execute(
                "CREATE TEMP TABLE _dates (person_id BIGINT, first TIMESTAMP, last TIMESTAMP)"
            )
            _create_code_map(con)
            with clock("load_map/patients"):
                done = step(files["patients"].name)
                _load_patients(con, files["patients"], report)
                done()
            with clock("load_map/encounters"):
                done = step(files["encounters"].name)
                _load_encounters(con, files["encounters"], report)
                done()
            for spec in EVENT_FILES:
                with clock(f"load_map/{spec.name}"):
                    done = step(files[spec.name].name)
                    _load_events(con, spec, files[spec.name], report)
                    done()
            with clock("load_map/derived"):
                done = step("observation periods, deaths, eras")
                _derive_periods_and_deaths(con, report)
                _derive_eras(con, report)
                done()
        with clock("index"):
            done = step("indexes")
            create_cdm_indexes(con)
            done()
    report.seconds = time.perf_counter() - started
    return report


def source_rows(src_dir: str | Path) -> dict[str, int]:
    """Data rows per Synthea file the loader reads (for reports and benchmarks)."""
    files = _source_files(Path(src_dir))
    con = duckdb.connect()
    counts = {
        name: con.execute(
            "SELECT count(*) FROM read_csv(?, header = true, all_varchar = true, delim = ',', "
            "quote = '\"', escape = '\"')",
            [str(path)],
        ).fetchone()[0]
        for name, path in files.items()
    }
    con.close()
    return counts
