"""Where each study domain's events live in the OMOP CDM: the whitelist of table and column names.

Why its own module: cohort SQL (``studies.cohorts``) and covariate SQL (``studies.analyses.glm``)
both read it, and neither should import the other for it. Every identifier in a node's SQL comes
from here or from fixed module text; a study contributes values only. (Not to be confused with
``omop_etl``'s map from a source's files to CDM tables: that one is about loading.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DomainTable:
    """Where a domain's events live; ``end`` is a fixed SQL expression over that table."""

    table: str
    concept: str
    start: str
    end: str
    value: str | None = None


CDM_DOMAIN_TABLES: dict[str, DomainTable] = {
    "condition": DomainTable(
        "condition_occurrence",
        "condition_concept_id",
        "condition_start_date",
        "coalesce(condition_end_date, condition_start_date + 1)",
    ),
    "drug": DomainTable(
        "drug_exposure",
        "drug_concept_id",
        "drug_exposure_start_date",
        "coalesce(drug_exposure_end_date, drug_exposure_start_date + CAST(days_supply AS INTEGER),"
        " drug_exposure_start_date + 1)",
    ),
    "drug_era": DomainTable(
        "drug_era", "drug_concept_id", "drug_era_start_date", "drug_era_end_date"
    ),
    "measurement": DomainTable(
        "measurement",
        "measurement_concept_id",
        "measurement_date",
        "measurement_date + 1",
        "value_as_number",
    ),
    "procedure": DomainTable(
        "procedure_occurrence", "procedure_concept_id", "procedure_date", "procedure_date + 1"
    ),
    "observation": DomainTable(
        "observation",
        "observation_concept_id",
        "observation_date",
        "observation_date + 1",
        "value_as_number",
    ),
    "visit": DomainTable(
        "visit_occurrence",
        "visit_concept_id",
        "visit_start_date",
        "coalesce(visit_end_date, visit_start_date + 1)",
    ),
    "death": DomainTable("death", "cause_concept_id", "death_date", "death_date + 1"),
    "observation_period": DomainTable(
        "observation_period",
        "period_type_concept_id",
        "observation_period_start_date",
        "observation_period_end_date",
    ),
}
