"""The hand-written plausibility checks no spec column describes: events inside an observation
period and before death, start before end, plausible ages, values and date ranges; the rules as
tables, the checks generated from them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from omop_etl.dq_model import (
    ATEMPORAL,
    COMPLETENESS,
    CONCEPT,
    PLAUSIBILITY,
    TABLE,
    TEMPORAL,
    Check,
    RowRule,
    birth_date_sql,
    count_sql,
    field_check,
    ids_sql,
    make_check,
)
from omop_etl.quarantine import Reason
from omop_etl.schema import CdmField, CdmTable, cdm_tables
from omop_etl.sql import quote

# --- hand-written rules (thresholds follow DQD's defaults where DQD has the check) ------------

# Tables whose records a person is expected to have, with the % of persons allowed to have none.
PERSON_COMPLETENESS = {
    "observation_period": 0.0,
    "visit_occurrence": 95.0,
    "condition_occurrence": 95.0,
    "drug_exposure": 95.0,
    "procedure_occurrence": 95.0,
    "measurement": 95.0,
    "observation": 95.0,
}

# Clinical event tables and the date that places the event in time.
EVENT_DATES = {
    "visit_occurrence": "visit_start_date",
    "visit_detail": "visit_detail_start_date",
    "condition_occurrence": "condition_start_date",
    "drug_exposure": "drug_exposure_start_date",
    "procedure_occurrence": "procedure_date",
    "device_exposure": "device_exposure_start_date",
    "measurement": "measurement_date",
    "observation": "observation_date",
    "note": "note_date",
    "specimen": "specimen_date",
}

# CDM 5.4 added procedure_end_date beside procedure_date, which the *_start/_end naming misses.
EXTRA_DATE_RANGES = {"procedure_occurrence": (("procedure_date", "procedure_end_date"),)}

# Plausible value bounds of numeric fields, as SQL expressions (None: no bound on that side).
FIELD_RANGES: dict[tuple[str, str], tuple[str | None, str | None]] = {
    ("person", "year_of_birth"): ("1850", "year(current_date)"),
    ("person", "month_of_birth"): ("1", "12"),
    ("person", "day_of_birth"): ("1", "31"),
    ("drug_exposure", "days_supply"): ("0", "365"),
    ("drug_exposure", "refills"): ("0", "24"),
    ("drug_exposure", "quantity"): ("0", None),
    ("procedure_occurrence", "quantity"): ("0", None),
    ("device_exposure", "quantity"): ("0", None),
    ("condition_era", "condition_occurrence_count"): ("1", None),
    ("drug_era", "drug_exposure_count"): ("1", None),
    ("drug_era", "gap_days"): ("0", None),
}

#: Plausible measurement.value_as_number per measurement concept (generous physiological bounds
#: in the units these concepts are usually recorded in; the concepts the shipped vocabulary has),
#: kept as DQD keeps its own: a concept-level threshold file (``plausibleValueLow/High``).
CONCEPT_LEVEL = Path(__file__).resolve().parent / "spec" / "dq_concept_level.csv"

DEATH_SLACK_DAYS = 60  # DQD allows records up to 60 days after death (claims lag)
VISIT_DATE_SLACK_DAYS = 7  # DQD's withinVisitDates tolerance
EARLIEST_DATE = "1850-01-01"


def temporal_field_checks(table: CdmTable, field: CdmField) -> Iterator[Check]:
    """plausibleDateRange, plausibleAfterBirth and plausibleBeforeDeath for a person's dates."""
    t, f, name = table.name, quote(field.name), field.name
    known = f"t.{f} IS NOT NULL"
    first_death = "JOIN (SELECT person_id, min(death_date) AS death_date FROM death GROUP BY 1) d"
    rules = [
        RowRule(
            "plausibleDateRange",
            ATEMPORAL,
            0.0,
            f"Rows of {t} whose {name} lies before {EARLIEST_DATE} or in the future.",
            f"t.{f} < DATE '{EARLIEST_DATE}' OR t.{f} > current_date",
            tested=known,
        ),
        RowRule(
            "plausibleAfterBirth",
            TEMPORAL,
            1.0,
            f"Rows of {t} whose {name} precedes the person's birth.",
            f"t.{f} < {birth_date_sql()}",
            joins="JOIN person p ON p.person_id = t.person_id",
            tested=known,
            reads=(("person", "birth_datetime"),),
        ),
    ]
    if t != "death":
        rules.append(
            RowRule(
                "plausibleBeforeDeath",
                TEMPORAL,
                1.0,
                f"Rows of {t} whose {name} is more than "
                f"{DEATH_SLACK_DAYS} days after the person's death.",
                f"t.{f} > d.death_date + INTERVAL {DEATH_SLACK_DAYS} DAY",
                joins=f"{first_death} ON d.person_id = t.person_id",
                tested=known,
                reads=(("death", "death_date"),),
            )
        )
    for rule in rules:
        yield rule.check(table, name)


def start_before_end_checks(table: CdmTable) -> Iterator[Check]:
    t = table.name
    for start, end in (*table.date_ranges, *EXTRA_DATE_RANGES.get(t, ())):
        rule = RowRule(
            "plausibleStartBeforeEnd",
            TEMPORAL,
            0.0,
            f"Rows of {t} whose {end} precedes {start}.",
            f"t.{quote(end)} < t.{quote(start)}",
            tested=f"t.{quote(end)} IS NOT NULL",
            reads=((t, end),),
        )
        # one date pair per table, so the table's end-before-start rejections are this pair's
        yield rule.check(table, start, quarantine=(Reason.END_BEFORE_START,))


def event_checks(table: CdmTable) -> Iterator[Check]:
    """Events inside an observation period and, where a visit is named, inside its dates."""
    t, date = table.name, EVENT_DATES[table.name]
    d = quote(date)
    yield RowRule(
        "plausibleDuringObservation",
        TEMPORAL,
        0.0,
        f"Rows of {t} whose {date} lies outside every observation period "
        "of the person (invisible to cohort logic).",
        "NOT EXISTS (SELECT 1 FROM observation_period op WHERE op.person_id = t.person_id "
        f"AND t.{d} BETWEEN op.observation_period_start_date "
        "AND op.observation_period_end_date)",
        reads=(("observation_period", "observation_period_end_date"),),
    ).check(table, date)
    if t == "visit_occurrence" or "visit_occurrence_id" not in table.columns:
        return
    visit_join = "JOIN visit_occurrence v ON v.visit_occurrence_id = t.visit_occurrence_id"
    yield field_check(
        "withinVisitDates",
        t,
        date,
        dqd=TEMPORAL,
        description=f"Rows of {t} whose {date} is more than {VISIT_DATE_SLACK_DAYS} days "
        "outside the dates of the visit they name.",
        threshold=5.0,
        violated_sql=ids_sql(
            table,
            f"t.{d} < v.visit_start_date - INTERVAL {VISIT_DATE_SLACK_DAYS} DAY "
            f"OR t.{d} > v.visit_end_date + INTERVAL {VISIT_DATE_SLACK_DAYS} DAY",
            visit_join,
        ),
        # the rows tested are those whose visit exists: count them through the same join
        denominator_sql=f"SELECT count(*) FROM {quote(t)} t {visit_join}",
        needs=((t, date), (t, "visit_occurrence_id"), ("visit_occurrence", "visit_end_date")),
    )


#: The two sides of a plausible value range: check name, SQL comparison, words.
BOUND_SIDES = (("plausibleValueLow", "<", "below"), ("plausibleValueHigh", ">", "above"))


def value_range_checks() -> Iterator[Check]:
    tables = cdm_tables()
    for (t, field), bounds in FIELD_RANGES.items():
        f = quote(field)
        for (name, test, words), bound in zip(BOUND_SIDES, bounds, strict=True):
            if bound is None:
                continue
            yield RowRule(
                name,
                ATEMPORAL,
                1.0,
                f"Rows of {t} with {field} {words} {bound}.",
                f"t.{f} {test} {bound}",
                tested=f"t.{f} IS NOT NULL",
            ).check(tables[t], field)


def age_check() -> Check:
    return field_check(
        "plausibleAge",
        "person",
        "year_of_birth",
        dqd=ATEMPORAL,
        description="Persons whose age at the end of their last observation period "
        "(today if they have none) is below 0 or above 120 years.",
        threshold=0.0,
        violated_sql="SELECT p.person_id AS id FROM person p LEFT JOIN (SELECT person_id, "
        "max(observation_period_end_date) AS last_day FROM observation_period GROUP BY 1) op "
        "ON op.person_id = p.person_id "
        "WHERE year(COALESCE(op.last_day, current_date)) - p.year_of_birth NOT BETWEEN 0 AND 120",
        denominator_sql="SELECT count(*) FROM person",
        needs=(("person", "year_of_birth"), ("observation_period", "observation_period_end_date")),
    )


def condition_era_check() -> Check:
    return make_check(
        "measureConditionEraCompleteness",
        "condition_era",
        None,
        category=COMPLETENESS,
        subcategory="",
        level=TABLE,
        description="Persons with a condition occurrence but no condition era.",
        threshold=0.0,
        violated_sql="SELECT DISTINCT c.person_id AS id FROM condition_occurrence c "
        "WHERE NOT EXISTS (SELECT 1 FROM condition_era e WHERE e.person_id = c.person_id)",
        denominator_sql="SELECT count(DISTINCT person_id) FROM condition_occurrence",
        denominator_table="condition_occurrence",
        needs=(("condition_era", "person_id"), ("condition_occurrence", "person_id")),
    )


def measurement_concept_checks() -> Iterator[Check]:
    table = cdm_tables()["measurement"]
    with CONCEPT_LEVEL.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        concept_id, label = int(row["conceptId"]), row["conceptName"]
        low, high = row["plausibleValueLow"], row["plausibleValueHigh"]
        for (name, test, words), bound in zip(BOUND_SIDES, (low, high), strict=True):
            yield Check(
                id=f"{name}.measurement.{concept_id}",
                name=name,
                category=PLAUSIBILITY,
                subcategory="Atemporal",
                level=CONCEPT,
                table="measurement",
                field="value_as_number",
                concept_id=concept_id,
                description=f"{label} ({concept_id}) measurements with value_as_number "
                f"{words} {bound}.",
                threshold=1.0,
                violated_sql=ids_sql(
                    table,
                    f"t.measurement_concept_id = {concept_id} AND t.value_as_number {test} {bound}",
                ),
                denominator_sql=count_sql(
                    table.name,
                    f"t.measurement_concept_id = {concept_id} AND t.value_as_number IS NOT NULL",
                ),
                needs=(("measurement", "value_as_number"),),
            )
