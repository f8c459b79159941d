"""The data-quality checks, as data: each one is a SQL query that lists the offending row ids.

Most checks are generated from the CDM 5.4 specification (``omop_etl.schema.cdm_tables``) the way
OHDSI's DataQualityDashboard (DQD) generates its own: ``isRequired`` from required fields,
``isPrimaryKey`` from primary keys, ``isForeignKey`` from foreign keys, ``fkDomain`` and
``isStandardValidConcept`` from concept fields with a domain. The temporal and value plausibility
checks that no spec column describes (events inside an observation period, plausible ages and
measurement values, date ranges) are written by hand below, in tables of rules rather than code.

A check never returns patient rows: ``violated_sql`` selects one column ``id`` (the row's primary
key, or person_id where a table has none) and the runner keeps at most a handful of them.
Identifiers in the SQL come from the specification, never from users.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict

from omop_etl.quarantine import Reason
from omop_etl.schema import CdmField, CdmTable, cdm_tables, quote

CONFORMANCE, COMPLETENESS, PLAUSIBILITY = "Conformance", "Completeness", "Plausibility"
TABLE, FIELD, CONCEPT = "table", "field", "concept"

# The temp table the runner creates before the checks run: etl_quarantine, or an empty
# stand-in for CDM files that another tool built.
QUARANTINE = "dq_quarantine"
# Likewise for etl_rekeyed: rows loaded under a new id because the source reused their id.
REKEYED = "dq_rekeyed"


class CheckInfo(BaseModel):
    """What a check tests and its DQD classification: the fields a check and its result
    (``omop_etl.dq.CheckResult``) share."""

    id: str
    name: str
    category: str
    subcategory: str
    level: str
    table: str
    field: str | None
    concept_id: int | None = None
    description: str
    threshold: float


class Check(CheckInfo):
    """One data-quality check: what it tests, its DQD classification and how to count violations.

    ``threshold`` is the percentage of violating rows allowed (DQD semantics: the check fails
    when pct > threshold). ``violated_sql`` lists the offending ids and ``denominator_sql`` counts
    the rows tested, which are rows of ``denominator_table`` (default ``table``); a check with no
    SQL is a catalog check (table exists, column exists, column type matches ``type_pattern``),
    answered from the file's catalog. ``needs`` lists the (table, column) pairs the SQL reads; a
    check whose table or column is absent is not applicable (the catalog checks report that).
    ``quarantine`` names the load-time rejection reasons that count as violations of this check,
    with an optional SQL filter on the quarantined row (``q.raw`` is the source row as JSON).
    """

    model_config = ConfigDict(frozen=True)

    violated_sql: str | None = None
    denominator_sql: str | None = None
    denominator_table: str | None = None
    type_pattern: str | None = None
    needs: tuple[tuple[str, str | None], ...] = ()
    quarantine: tuple[str, ...] = ()
    quarantine_filter: str = "TRUE"


def _check(name: str, table: str, field: str | None, **details: Any) -> Check:
    """A check with DQD's id: ``name.table.field``, or ``name.table`` for a table-level check."""
    check_id = f"{name}.{table}" if field is None else f"{name}.{table}.{field}"
    return Check(id=check_id, name=name, table=table, field=field, **details)


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


# --- SQL building blocks ---------------------------------------------------------------------


def _row_id(table: CdmTable) -> str:
    """The column that names a row in examples: the primary key, else person_id, else rowid."""
    if len(table.primary_key) == 1:
        return quote(table.primary_key[0])
    return "person_id" if "person_id" in table.columns else "rowid"


def _count(table: str, where: str = "TRUE") -> str:
    return f"SELECT count(*) FROM {quote(table)} t WHERE {where}"


def _ids(table: CdmTable, where: str, joins: str = "") -> str:
    return f"SELECT t.{_row_id(table)} AS id FROM {quote(table.name)} t {joins} WHERE {where}"


def _birth_date() -> str:
    """Birth date as DQD takes it: birth_datetime, else 1 January of the year of birth."""
    return "COALESCE(CAST(p.birth_datetime AS DATE), make_date(p.year_of_birth, 1, 1))"


# --- generators -------------------------------------------------------------------------------


def _table_checks(table: CdmTable) -> Iterator[Check]:
    name = table.name
    yield _check(
        "cdmTable",
        name,
        None,
        category=CONFORMANCE,
        subcategory="Relational",
        level=TABLE,
        description=f"The table {name} exists.",
        threshold=0.0,
    )
    yield _check(
        "loadQuarantine",
        name,
        None,
        category=COMPLETENESS,
        subcategory="Load",
        level=TABLE,
        description=f"Source rows meant for {name} that the ETL quarantined (any reason).",
        threshold=0.0,
        violated_sql="SELECT NULL AS id WHERE FALSE",
        denominator_sql=_count(name),
        needs=((name, None),),
        quarantine=tuple(Reason),
    )
    if name in PERSON_COMPLETENESS:
        yield _check(
            "measurePersonCompleteness",
            name,
            None,
            category=COMPLETENESS,
            subcategory="",
            level=TABLE,
            description=f"Persons with no record in {name}.",
            threshold=PERSON_COMPLETENESS[name],
            violated_sql="SELECT p.person_id AS id FROM person p WHERE NOT EXISTS "
            f"(SELECT 1 FROM {quote(name)} t WHERE t.person_id = p.person_id)",
            denominator_sql="SELECT count(*) FROM person",
            denominator_table="person",
            needs=((name, "person_id"), ("person", "person_id")),
        )


def _catalog_field_checks(table: CdmTable, field: CdmField) -> Iterator[Check]:
    t, f = table.name, field.name
    yield _check(
        "cdmField",
        t,
        f,
        category=CONFORMANCE,
        subcategory="Relational",
        level=FIELD,
        description=f"The column {t}.{f} exists.",
        threshold=0.0,
        needs=((t, None),),
    )
    yield _check(
        "cdmDatatype",
        t,
        f,
        category=CONFORMANCE,
        subcategory="Value",
        level=FIELD,
        description=f"The column {t}.{f} has a type that holds the spec's {field.cdm_datatype}.",
        threshold=0.0,
        needs=((t, f),),
        type_pattern=_TYPE_PATTERNS[field.kind],
    )


_TYPE_PATTERNS = {
    "integer": "^(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT)$",
    "float": "^(FLOAT|DOUBLE|DECIMAL.*|REAL)$",
    "date": "^DATE$",
    "datetime": "^TIMESTAMP.*",
    "varchar": "^VARCHAR.*",
}


def _spec_field_checks(table: CdmTable, field: CdmField) -> Iterator[Check]:
    """isRequired, isPrimaryKey, isForeignKey, fkDomain, isStandardValidConcept and
    standardConceptRecordCompleteness, each where the spec marks the field for it."""
    t, f = table.name, quote(field.name)
    base = {"needs": ((t, field.name),)}
    if field.required:
        yield _check(
            "isRequired",
            t,
            field.name,
            category=CONFORMANCE,
            subcategory="Relational",
            level=FIELD,
            description=f"Rows of {t} with a NULL in the required field {field.name}.",
            threshold=0.0,
            violated_sql=_ids(table, f"t.{f} IS NULL"),
            denominator_sql=_count(t),
            quarantine=(Reason.MISSING_REQUIRED,),
            # the reason names no field: count a rejected row here when its raw source row has
            # this column (any letter case) and the value is empty
            quarantine_filter="EXISTS (SELECT 1 FROM (SELECT unnest(json_keys(q.raw)) AS k) "
            f"WHERE lower(k) = '{field.name}' AND COALESCE(q.raw ->> k, '') = '')",
            **base,
        )
    if field.primary_key and len(table.primary_key) == 1:
        yield _check(
            "isPrimaryKey",
            t,
            field.name,
            category=CONFORMANCE,
            subcategory="Relational",
            level=FIELD,
            description=f"Rows of {t} repeating an earlier row's {field.name} (duplicate keys), "
            "in the table or in the source (re-keyed at load).",
            threshold=0.0,
            violated_sql=f"SELECT id FROM (SELECT t.{f} AS id, row_number() OVER "
            f"(PARTITION BY t.{f}) AS copy FROM {quote(t)} t WHERE t.{f} IS NOT NULL) "
            f"WHERE copy > 1 UNION ALL SELECT new_id FROM {REKEYED} WHERE target_table = '{t}'",
            denominator_sql=_count(t),
            quarantine=(Reason.DUPLICATE_KEY,),
            **base,
        )
    if field.fk_table and field.fk_field:
        yield _foreign_key_check(table, field, base)
    if field.fk_domain and field.fk_table == "concept":
        yield from _concept_field_checks(table, field, base)


def _foreign_key_check(table: CdmTable, field: CdmField, base: dict) -> Check:
    t, f = table.name, quote(field.name)
    fk_table, fk_field = field.fk_table or "", field.fk_field or ""
    return _check(
        "isForeignKey",
        t,
        field.name,
        category=CONFORMANCE,
        subcategory="Relational",
        level=FIELD,
        description=f"Rows of {t} whose {field.name} is not a {fk_table}.{fk_field}.",
        threshold=0.0,
        violated_sql=_ids(
            table,
            f"t.{f} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {quote(fk_table)} r "
            f"WHERE r.{quote(fk_field)} = t.{f})",
        ),
        denominator_sql=_count(t),
        quarantine=(Reason.UNKNOWN_PERSON,) if fk_table == "person" else (),
        **{**base, "needs": (*base["needs"], (fk_table, fk_field))},
    )


def _concept_field_checks(table: CdmTable, field: CdmField, base: dict) -> Iterator[Check]:
    t, f = table.name, quote(field.name)
    domains = [d.strip() for d in (field.fk_domain or "").split(",")]
    domain_list = ", ".join(f"'{d}'" for d in domains)
    concept_join = f"JOIN concept c ON c.concept_id = t.{f}"
    needs = (*base["needs"], ("concept", "domain_id"))
    yield _check(
        "fkDomain",
        t,
        field.name,
        category=CONFORMANCE,
        subcategory="Value",
        level=FIELD,
        description=f"Rows of {t} whose {field.name} is a concept outside the "
        f"{' or '.join(domains)} domain.",
        threshold=0.0,
        violated_sql=_ids(
            table, f"c.concept_id <> 0 AND c.domain_id NOT IN ({domain_list})", concept_join
        ),
        denominator_sql=_count(t),
        **{**base, "needs": needs},
    )
    if field.name.endswith("_source_concept_id"):
        return
    yield _check(
        "isStandardValidConcept",
        t,
        field.name,
        category=CONFORMANCE,
        subcategory="Value",
        level=FIELD,
        description=f"Rows of {t} whose {field.name} is not a standard, valid concept.",
        threshold=0.0,
        violated_sql=_ids(
            table,
            "c.concept_id <> 0 AND (c.standard_concept IS DISTINCT FROM 'S' "
            "OR c.invalid_reason IS NOT NULL)",
            concept_join,
        ),
        denominator_sql=_count(t),
        **{**base, "needs": needs},
    )
    if not field.required:
        return  # an optional concept field may well be 0 ("no information"), e.g. route
    yield _check(
        "standardConceptRecordCompleteness",
        t,
        field.name,
        category=COMPLETENESS,
        subcategory="",
        level=FIELD,
        description=f"Rows of {t} whose {field.name} is 0 (source code not mapped).",
        threshold=5.0,
        violated_sql=_ids(table, f"t.{f} = 0"),
        denominator_sql=_count(t),
        **base,
    )


def _source_value_check(table: CdmTable, field: CdmField) -> Check | None:
    """sourceValueCompleteness: distinct source values that map to no standard concept."""
    concept = field.name.replace("_source_value", "_concept_id")
    if not field.name.endswith("_source_value") or concept not in table.columns:
        return None
    if table.field(concept).fk_domain is None or not table.field(concept).required:
        return None
    t, sv, c = table.name, quote(field.name), quote(concept)
    return _check(
        "sourceValueCompleteness",
        t,
        field.name,
        category=COMPLETENESS,
        subcategory="",
        level=FIELD,
        description=f"Distinct {field.name} values of {t} mapped to concept 0 "
        "(example ids: one row per unmapped value).",
        threshold=10.0,
        violated_sql=f"SELECT min(t.{_row_id(table)}) AS id FROM {quote(t)} t "
        f"WHERE t.{c} = 0 AND t.{sv} IS NOT NULL GROUP BY t.{sv}",
        denominator_sql=f"SELECT count(DISTINCT t.{sv}) FROM {quote(t)} t",
        needs=((t, field.name), (t, concept)),
    )


def _temporal_field_checks(table: CdmTable, field: CdmField) -> Iterator[Check]:
    """plausibleDateRange, plausibleAfterBirth and plausibleBeforeDeath for a person's dates."""
    t, f = table.name, quote(field.name)
    base = {
        "category": PLAUSIBILITY,
        "level": FIELD,
        "denominator_sql": _count(t, f"t.{f} IS NOT NULL"),
    }
    yield _check(
        "plausibleDateRange",
        t,
        field.name,
        subcategory="Atemporal",
        description=f"Rows of {t} whose {field.name} lies before {EARLIEST_DATE} or in the future.",
        threshold=0.0,
        violated_sql=_ids(table, f"t.{f} < DATE '{EARLIEST_DATE}' OR t.{f} > current_date"),
        needs=((t, field.name),),
        **base,
    )
    yield _check(
        "plausibleAfterBirth",
        t,
        field.name,
        subcategory="Temporal",
        description=f"Rows of {t} whose {field.name} precedes the person's birth.",
        threshold=1.0,
        violated_sql=_ids(
            table, f"t.{f} < {_birth_date()}", "JOIN person p ON p.person_id = t.person_id"
        ),
        needs=((t, field.name), ("person", "birth_datetime")),
        **base,
    )
    if t == "death":
        return
    yield _check(
        "plausibleBeforeDeath",
        t,
        field.name,
        subcategory="Temporal",
        description=f"Rows of {t} whose {field.name} is more than "
        f"{DEATH_SLACK_DAYS} days after the person's death.",
        threshold=1.0,
        violated_sql=_ids(
            table,
            f"t.{f} > d.death_date + INTERVAL {DEATH_SLACK_DAYS} DAY",
            "JOIN (SELECT person_id, min(death_date) AS death_date FROM death GROUP BY 1) d "
            "ON d.person_id = t.person_id",
        ),
        needs=((t, field.name), ("death", "death_date")),
        **base,
    )


def _start_before_end_checks(table: CdmTable) -> Iterator[Check]:
    pairs = (*table.date_ranges, *EXTRA_DATE_RANGES.get(table.name, ()))
    for start, end in pairs:
        t = table.name
        yield _check(
            "plausibleStartBeforeEnd",
            t,
            start,
            category=PLAUSIBILITY,
            subcategory="Temporal",
            level=FIELD,
            description=f"Rows of {t} whose {end} precedes {start}.",
            threshold=0.0,
            violated_sql=_ids(table, f"t.{quote(end)} < t.{quote(start)}"),
            denominator_sql=_count(t, f"t.{quote(end)} IS NOT NULL"),
            needs=((t, start), (t, end)),
            # one date pair per table, so the table's end-before-start rejections are this pair's
            quarantine=(Reason.END_BEFORE_START,),
        )


def _event_checks(table: CdmTable) -> Iterator[Check]:
    """Events inside an observation period and, where a visit is named, inside its dates."""
    t, date = table.name, EVENT_DATES[table.name]
    d = quote(date)
    yield _check(
        "plausibleDuringObservation",
        t,
        date,
        category=PLAUSIBILITY,
        subcategory="Temporal",
        level=FIELD,
        description=f"Rows of {t} whose {date} lies outside every observation period "
        "of the person (invisible to cohort logic).",
        threshold=0.0,
        violated_sql=_ids(
            table,
            "NOT EXISTS (SELECT 1 FROM observation_period op WHERE op.person_id = t.person_id "
            f"AND t.{d} BETWEEN op.observation_period_start_date "
            "AND op.observation_period_end_date)",
        ),
        denominator_sql=_count(t),
        needs=((t, date), ("observation_period", "observation_period_end_date")),
    )
    if t == "visit_occurrence" or "visit_occurrence_id" not in table.columns:
        return
    yield _check(
        "withinVisitDates",
        t,
        date,
        category=PLAUSIBILITY,
        subcategory="Temporal",
        level=FIELD,
        description=f"Rows of {t} whose {date} is more than {VISIT_DATE_SLACK_DAYS} days "
        "outside the dates of the visit they name.",
        threshold=5.0,
        violated_sql=_ids(
            table,
            f"t.{d} < v.visit_start_date - INTERVAL {VISIT_DATE_SLACK_DAYS} DAY "
            f"OR t.{d} > v.visit_end_date + INTERVAL {VISIT_DATE_SLACK_DAYS} DAY",
            "JOIN visit_occurrence v ON v.visit_occurrence_id = t.visit_occurrence_id",
        ),
        denominator_sql=f"SELECT count(*) FROM {quote(t)} t JOIN visit_occurrence v "
        "ON v.visit_occurrence_id = t.visit_occurrence_id",
        needs=((t, date), (t, "visit_occurrence_id"), ("visit_occurrence", "visit_end_date")),
    )


def _value_range_checks() -> Iterator[Check]:
    tables = cdm_tables()
    for (t, field), (low, high) in FIELD_RANGES.items():
        table, f = tables[t], quote(field)
        for name, bound, test, words in (
            ("plausibleValueLow", low, "<", "below"),
            ("plausibleValueHigh", high, ">", "above"),
        ):
            if bound is None:
                continue
            yield _check(
                name,
                t,
                field,
                category=PLAUSIBILITY,
                subcategory="Atemporal",
                level=FIELD,
                description=f"Rows of {t} with {field} {words} {bound}.",
                threshold=1.0,
                violated_sql=_ids(table, f"t.{f} {test} {bound}"),
                denominator_sql=_count(t, f"t.{f} IS NOT NULL"),
                needs=((t, field),),
            )


def _age_check() -> Check:
    return _check(
        "plausibleAge",
        "person",
        "year_of_birth",
        category=PLAUSIBILITY,
        subcategory="Atemporal",
        level=FIELD,
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


def _condition_era_check() -> Check:
    return _check(
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


def _measurement_concept_checks() -> Iterator[Check]:
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
                violated_sql=_ids(
                    table,
                    f"t.measurement_concept_id = {concept_id} AND t.value_as_number {test} {bound}",
                ),
                denominator_sql=_count(
                    table.name,
                    f"t.measurement_concept_id = {concept_id} AND t.value_as_number IS NOT NULL",
                ),
                needs=(("measurement", "value_as_number"),),
            )


#: Tables DataQualityDashboard leaves out by default (``executeDqChecks(tablesToExclude=)``): the
#: vocabulary comes from Athena, not from the node's ETL, and a reduced vocabulary (like the
#: shipped one) lacks the metadata concepts its own foreign keys point to.
VOCABULARY_TABLES = frozenset({
    "concept", "vocabulary", "concept_ancestor", "concept_relationship", "concept_class",
    "concept_synonym", "relationship", "domain",
})  # fmt: skip


def all_checks(*, vocabulary: bool = False) -> list[Check]:
    """Every check, generated from the CDM 5.4 specification plus the hand-written rules;
    with ``vocabulary`` also the checks of ``VOCABULARY_TABLES``."""
    checks: list[Check] = []
    for table in cdm_tables().values():
        if table.name in VOCABULARY_TABLES and not vocabulary:
            continue
        checks.extend(_table_checks(table))
        for field in table.fields:
            checks.extend(_catalog_field_checks(table, field))
            checks.extend(_spec_field_checks(table, field))
            source_value = _source_value_check(table, field)
            if source_value:
                checks.append(source_value)
            if table.has_person and field.kind == "date":
                checks.extend(_temporal_field_checks(table, field))
        checks.extend(_start_before_end_checks(table))
        if table.name in EVENT_DATES:
            checks.extend(_event_checks(table))
    checks.extend(_value_range_checks())
    checks.append(_age_check())
    checks.append(_condition_era_check())
    checks.extend(_measurement_concept_checks())
    return checks
