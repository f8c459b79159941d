"""The hand-written plausibility checks no spec column describes: events inside an observation
period and before death, start before end, plausible ages, values and date ranges; the rules as
tables, the checks generated from them.
"""

from __future__ import annotations

from collections.abc import Iterator

from omop_etl.dq_model import (
    ATEMPORAL,
    COMPLETENESS,
    CONCEPT,
    PLAUSIBILITY,
    TABLE,
    TEMPORAL,
    Check,
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

# Plausible measurement.value_as_number per measurement concept (generous physiological bounds
# in the units these concepts are usually recorded in); the concepts the shipped vocabulary has.
MEASUREMENT_RANGES: dict[int, tuple[str, float, float]] = {
    3006322: ("Oral temperature", 25, 45),
    3000963: ("Hemoglobin", 1, 25),
    3009542: ("Hematocrit", 5, 75),
    3016723: ("Creatinine serum/plasma", 0, 40),
    3023103: ("Potassium serum/plasma", 1, 12),
    3019550: ("Sodium serum/plasma", 90, 200),
    3014576: ("Chloride serum/plasma", 50, 160),
    3004501: ("Glucose", 10, 2000),
    3006906: ("Calcium serum/plasma", 1, 25),
    3013682: ("Urea nitrogen serum/plasma", 0, 300),
    3010813: ("White blood cell count", 0, 500),
    3007461: ("Platelet count", 0, 2000),
    3011505: ("FEV1/FVC", 0, 150),
    3049273: ("DXA T-score", -10, 10),
}

DEATH_SLACK_DAYS = 60  # DQD allows records up to 60 days after death (claims lag)
VISIT_DATE_SLACK_DAYS = 7  # DQD's withinVisitDates tolerance
EARLIEST_DATE = "1850-01-01"


def temporal_field_checks(table: CdmTable, field: CdmField) -> Iterator[Check]:
    """plausibleDateRange, plausibleAfterBirth and plausibleBeforeDeath for a person's dates."""
    t, f = table.name, quote(field.name)
    base = {
        "denominator_sql": count_sql(t, f"t.{f} IS NOT NULL"),
    }
    yield field_check(
        "plausibleDateRange",
        t,
        field.name,
        dqd=ATEMPORAL,
        description=f"Rows of {t} whose {field.name} lies before {EARLIEST_DATE} or in the future.",
        threshold=0.0,
        violated_sql=ids_sql(table, f"t.{f} < DATE '{EARLIEST_DATE}' OR t.{f} > current_date"),
        needs=((t, field.name),),
        **base,
    )
    yield field_check(
        "plausibleAfterBirth",
        t,
        field.name,
        dqd=TEMPORAL,
        description=f"Rows of {t} whose {field.name} precedes the person's birth.",
        threshold=1.0,
        violated_sql=ids_sql(
            table, f"t.{f} < {birth_date_sql()}", "JOIN person p ON p.person_id = t.person_id"
        ),
        needs=((t, field.name), ("person", "birth_datetime")),
        **base,
    )
    if t == "death":
        return
    yield field_check(
        "plausibleBeforeDeath",
        t,
        field.name,
        dqd=TEMPORAL,
        description=f"Rows of {t} whose {field.name} is more than "
        f"{DEATH_SLACK_DAYS} days after the person's death.",
        threshold=1.0,
        violated_sql=ids_sql(
            table,
            f"t.{f} > d.death_date + INTERVAL {DEATH_SLACK_DAYS} DAY",
            "JOIN (SELECT person_id, min(death_date) AS death_date FROM death GROUP BY 1) d "
            "ON d.person_id = t.person_id",
        ),
        needs=((t, field.name), ("death", "death_date")),
        **base,
    )


def start_before_end_checks(table: CdmTable) -> Iterator[Check]:
    pairs = (*table.date_ranges, *EXTRA_DATE_RANGES.get(table.name, ()))
    for start, end in pairs:
        t = table.name
        yield field_check(
            "plausibleStartBeforeEnd",
            t,
            start,
            dqd=TEMPORAL,
            description=f"Rows of {t} whose {end} precedes {start}.",
            threshold=0.0,
            violated_sql=ids_sql(table, f"t.{quote(end)} < t.{quote(start)}"),
            denominator_sql=count_sql(t, f"t.{quote(end)} IS NOT NULL"),
            needs=((t, start), (t, end)),
            # one date pair per table, so the table's end-before-start rejections are this pair's
            quarantine=(Reason.END_BEFORE_START,),
        )


def event_checks(table: CdmTable) -> Iterator[Check]:
    """Events inside an observation period and, where a visit is named, inside its dates."""
    t, date = table.name, EVENT_DATES[table.name]
    d = quote(date)
    yield field_check(
        "plausibleDuringObservation",
        t,
        date,
        dqd=TEMPORAL,
        description=f"Rows of {t} whose {date} lies outside every observation period "
        "of the person (invisible to cohort logic).",
        threshold=0.0,
        violated_sql=ids_sql(
            table,
            "NOT EXISTS (SELECT 1 FROM observation_period op WHERE op.person_id = t.person_id "
            f"AND t.{d} BETWEEN op.observation_period_start_date "
            "AND op.observation_period_end_date)",
        ),
        denominator_sql=count_sql(t),
        needs=((t, date), ("observation_period", "observation_period_end_date")),
    )
    if t == "visit_occurrence" or "visit_occurrence_id" not in table.columns:
        return
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
            "JOIN visit_occurrence v ON v.visit_occurrence_id = t.visit_occurrence_id",
        ),
        denominator_sql=f"SELECT count(*) FROM {quote(t)} t JOIN visit_occurrence v "
        "ON v.visit_occurrence_id = t.visit_occurrence_id",
        needs=((t, date), (t, "visit_occurrence_id"), ("visit_occurrence", "visit_end_date")),
    )


def value_range_checks() -> Iterator[Check]:
    tables = cdm_tables()
    for (t, field), (low, high) in FIELD_RANGES.items():
        table, f = tables[t], quote(field)
        for name, bound, test, words in (
            ("plausibleValueLow", low, "<", "below"),
            ("plausibleValueHigh", high, ">", "above"),
        ):
            if bound is None:
                continue
            yield field_check(
                name,
                t,
                field,
                dqd=ATEMPORAL,
                description=f"Rows of {t} with {field} {words} {bound}.",
                threshold=1.0,
                violated_sql=ids_sql(table, f"t.{f} {test} {bound}"),
                denominator_sql=count_sql(t, f"t.{f} IS NOT NULL"),
                needs=((t, field),),
            )


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
    for concept_id, (label, low, high) in MEASUREMENT_RANGES.items():
        for name, test, bound, words in (
            ("plausibleValueLow", "<", low, "below"),
            ("plausibleValueHigh", ">", high, "above"),
        ):
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
