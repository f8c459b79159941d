"""What a Synthea export is to the loader: its files, columns and codes, and where they go in the
CDM. Data only, so every step of the load reads the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass

EHR = 32817  # Type Concept "EHR": where every Synthea record comes from
ID_BLOCK = 10**10  # event id = FILE_TAG * ID_BLOCK + source line
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
DOMAIN_ROUTES = {
    "Condition": "condition_occurrence",
    "Drug": "drug_exposure",
    "Measurement": "measurement",
    "Observation": "observation",
    "Procedure": "procedure_occurrence",
}


#: The in-memory database attached for the load: the id and code maps every worker reads. The
#: build file's own database is named after the file, and no file name holds a "/".
MAPS = '"fedomop/maps"'
#: Columns filled with Synthea's random UUIDs: stored plain (``create_cdm_schema``).
PLAIN_COLUMNS = ("person.person_source_value", "visit_occurrence.visit_source_value")
#: visit_occurrence columns the load fills (the rest stay NULL).
VISIT_COLUMNS = (
    "visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date",
    "visit_start_datetime", "visit_end_date", "visit_end_datetime", "visit_type_concept_id",
    "visit_source_value", "visit_source_concept_id",
)  # fmt: skip


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


#: Per routable table: (id column, prefix of its concept/type/source columns, start date column).
EVENT_TABLES = {
    "condition_occurrence": ("condition_occurrence_id", "condition", "condition_start_date"),
    "drug_exposure": ("drug_exposure_id", "drug", "drug_exposure_start_date"),
    "measurement": ("measurement_id", "measurement", "measurement_date"),
    "observation": ("observation_id", "observation", "observation_date"),
    "procedure_occurrence": ("procedure_occurrence_id", "procedure", "procedure_date"),
}


#: Event table -> its start date column (``derived.insert_observation_periods``).
EVENT_STARTS = {table: start for table, (_, _, start) in EVENT_TABLES.items()}
