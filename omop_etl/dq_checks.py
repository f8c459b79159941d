"""The data-quality checks, as data: each one is a SQL query that lists the offending row ids.

Most checks are generated from the CDM 5.4 specification (``omop_etl.schema.cdm_tables``) the way
OHDSI's DataQualityDashboard (DQD) generates its own: ``isRequired`` from required fields,
``isPrimaryKey`` from primary keys, ``isForeignKey`` from foreign keys, ``fkDomain`` and
``isStandardValidConcept`` from concept fields with a domain. The temporal and value plausibility
checks that no spec column describes (events inside an observation period, plausible ages and
measurement values, date ranges) are written by hand (``dq_rules``), in tables of rules rather
than code.

A check never returns patient rows: ``violated_sql`` selects one column ``id`` (the row's primary
key, or person_id where a table has none) and the runner keeps at most a handful of them.
Identifiers in the SQL come from the specification, never from users.
"""

from __future__ import annotations

from omop_etl.dq_model import Check
from omop_etl.dq_rules import (
    EVENT_DATES,
    age_check,
    condition_era_check,
    event_checks,
    measurement_concept_checks,
    start_before_end_checks,
    temporal_field_checks,
    value_range_checks,
)
from omop_etl.dq_spec_checks import (
    catalog_field_checks,
    source_value_check,
    spec_field_checks,
    table_checks,
)
from omop_etl.schema import cdm_tables

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
        checks.extend(table_checks(table))
        for field in table.fields:
            checks.extend(catalog_field_checks(table, field))
            checks.extend(spec_field_checks(table, field))
            source_value = source_value_check(table, field)
            if source_value:
                checks.append(source_value)
            if table.has_person and field.kind == "date":
                checks.extend(temporal_field_checks(table, field))
        checks.extend(start_before_end_checks(table))
        if table.name in EVENT_DATES:
            checks.extend(event_checks(table))
    checks.extend(value_range_checks())
    checks.append(age_check())
    checks.append(condition_era_check())
    checks.extend(measurement_concept_checks())
    return checks
