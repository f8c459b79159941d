"""Synthea's patients and encounters: person, visit_occurrence, death, and the id maps
(``person_map``, ``visit_map``) the event files join.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from omop_etl.quarantine import Reason, control_character_check, reason_case
from omop_etl.report import LoadReport
from omop_etl.sources import Part
from omop_etl.synthea_reading import (
    DUPLICATE,
    TOO_FEW_FIELDS,
    date_reasons,
    execute_reading,
    keyed_rows,
    quarantine_checked,
    raw,
    read_source,
)
from omop_etl.synthea_spec import (
    EHR,
    ENCOUNTER_COLUMNS,
    ETHNICITY_CODES,
    MAPS,
    PATIENT_COLUMNS,
    RACE_CODES,
    VISIT_CODES,
    VISIT_COLUMNS,
)


def load_patients(con: duckdb.DuckDBPyConnection, path: Path, report: LoadReport) -> None:
    """patients.csv -> person (+ ``person_map``: UUID -> person_id and death). Small: one
    statement validates every row, duplicated ids included, before anything is inserted."""
    source, params = read_source(
        path, PATIENT_COLUMNS,
        lambda _: {"source_id": raw("Id"), "start_raw": raw("BIRTHDATE"),
                   "stop_raw": raw("DEATHDATE"), "gender": raw("GENDER"),
                   "race": raw("RACE"), "ethnicity": raw("ETHNICITY")},
    )  # fmt: skip
    checks = [TOO_FEW_FIELDS, (Reason.MISSING_REQUIRED, "source_id IS NULL OR start_raw IS NULL")]
    checks += date_reasons([("start_raw", "start_ts"), ("stop_raw", "stop_ts")])
    checks += [(Reason.END_BEFORE_START, "stop_ts < start_ts"), DUPLICATE]
    checks += [control_character_check(alias, column) for alias, column in
               [("source_id", "Id"), ("gender", "GENDER"), ("race", "RACE"),
                ("ethnicity", "ETHNICITY")]]  # fmt: skip
    race = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in RACE_CODES.items())
    ethnicity = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in ETHNICITY_CODES.items())
    execute_reading(
        con, path,
        f"""CREATE OR REPLACE TEMP TABLE _checked AS
        SELECT *, {reason_case(checks)} AS _reason FROM ({keyed_rows(source)})""",
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
    quarantine_checked(con, "_checked", path, report, target="person")
    con.execute("DROP TABLE _checked")


def encounter_rows(path: Path, part: Part) -> tuple[str, list]:
    """Every encounter of ``part``, typed, with its person, visit concept and ``_reason``."""
    visit = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in VISIT_CODES.items())
    source, params = read_source(
        path, ENCOUNTER_COLUMNS,
        lambda _: {"source_id": raw("Id"), "patient": raw("PATIENT"),
                   "start_raw": raw("START"), "stop_raw": raw("STOP"),
                   "visit_code": f"CASE lower({raw('ENCOUNTERCLASS')}) {visit} END"},
        part,
    )  # fmt: skip
    checks = [
        TOO_FEW_FIELDS,
        (Reason.MISSING_REQUIRED, "source_id IS NULL OR start_raw IS NULL OR patient IS NULL"),
    ]
    checks += date_reasons([("start_raw", "start_ts"), ("stop_raw", "stop_ts")])
    checks += [(Reason.END_BEFORE_START, "stop_ts < start_ts")]
    checks += [(Reason.UNKNOWN_PERSON, "person_id IS NULL")]
    sql = f"""SELECT _line, source_id, person_id, start_ts, coalesce(stop_ts, start_ts) AS end_ts,
               visit_concept_id, {reason_case(checks)} AS _reason
        FROM (SELECT s.*, TRY_CAST(s.start_raw AS TIMESTAMP) AS start_ts,
                     TRY_CAST(s.stop_raw AS TIMESTAMP) AS stop_ts, m.person_id,
                     coalesce(c.concept_id, 0) AS visit_concept_id
              FROM {source} s
              LEFT JOIN {MAPS}.person_map m ON m.source_id = s.patient
              LEFT JOIN concept c ON c.vocabulary_id = 'Visit' AND c.concept_code = s.visit_code)"""
    return sql, params


def insert_visits(cur: duckdb.DuckDBPyConnection, path: Path, part: Part) -> int:
    """The good encounters of ``part`` -> visit_occurrence; the number inserted."""
    rows, params = encounter_rows(path, part)
    return execute_reading(
        cur, path,
        f"""INSERT INTO visit_occurrence ({", ".join(VISIT_COLUMNS)})
        SELECT _line - 1, person_id, visit_concept_id, CAST(start_ts AS DATE), start_ts,
               CAST(end_ts AS DATE), end_ts, {EHR}, source_id, 0
        FROM ({rows}) WHERE _reason IS NULL""",
        params,
    ).fetchone()[0]  # fmt: skip


def finish_visits(con: duckdb.DuckDBPyConnection, path: Path, report: LoadReport) -> str:
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
    key = lookup_key(visits, hashes)
    if key != "hash":
        build(key)
    return key


def key_expr(function: str, column: str) -> str:
    """An encounter reference as ``visit_map``'s key; NULL stays NULL (hash(NULL) is a number)."""
    return f"CASE WHEN {column} IS NOT NULL THEN {function}({column}) END"


def lookup_key(visits: int, distinct_hashes: int) -> str:
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
    quarantine_checked(con, "_repeated", path, report, target="visit_occurrence")
    con.execute("DROP TABLE _repeated")


def insert_deaths(cur: duckdb.DuckDBPyConnection) -> int:
    """death from the patients' DEATHDATE."""
    return cur.execute(
        f"""INSERT INTO death (person_id, death_date, death_datetime, death_type_concept_id)
        SELECT person_id, CAST(death_ts AS DATE), death_ts, {EHR} FROM {MAPS}.person_map
        WHERE death_ts IS NOT NULL ORDER BY person_id"""
    ).fetchone()[0]
