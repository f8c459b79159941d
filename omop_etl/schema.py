"""OMOP CDM v5.4 schema generated from the official field-level specification.

The DDL is derived from the packaged copy of ``OMOP_CDMv5.4_Field_Level.csv`` (OHDSI
CommonDataModel) rather than typed by hand, so the tables, types, primary keys and required
fields follow the specification exactly. DuckDB cannot add foreign keys after the fact and would
slow every insert with them, so foreign keys stay in the spec and the data-quality checks test them.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import duckdb

from omop_etl.quarantine import create_quarantine_table
from omop_etl.sql import quote

SPEC_DIR = Path(__file__).resolve().parent / "spec"
FIELD_SPEC = {
    "5.4": SPEC_DIR / "OMOP_CDMv5.4_Field_Level.csv",
    "5.3": SPEC_DIR / "OMOP_CDMv5.3_Field_Level.csv",
}
TABLE_SPEC = SPEC_DIR / "OMOP_CDMv5.4_Table_Level.csv"

_ID_COLUMN = re.compile(r"_id(_\d)?$")


@dataclass(frozen=True)
class CdmField:
    """One column of a CDM table as the specification describes it."""

    name: str
    cdm_datatype: str
    required: bool
    primary_key: bool
    fk_table: str | None
    fk_field: str | None
    fk_domain: str | None
    guidance: str = dataclasses.field(default="", compare=False)
    """The specification's user guidance (what the column holds), for data dictionaries."""

    @property
    def kind(self) -> str:
        """Coarse type used by the loaders: integer, float, date, datetime or varchar."""
        datatype = self.cdm_datatype.lower()
        return "varchar" if datatype.startswith("varchar") else datatype

    @property
    def sql_type(self) -> str:
        """DuckDB type: identifiers are BIGINT so that generated ids never overflow."""
        if self.kind == "integer":
            return "BIGINT" if _ID_COLUMN.search(self.name) else "INTEGER"
        return {"float": "DOUBLE", "date": "DATE", "datetime": "TIMESTAMP"}.get(
            self.kind, "VARCHAR"
        )


@dataclass(frozen=True)
class CdmTable:
    """One CDM table: its fields in specification order and its schema group."""

    name: str
    schema: str  # CDM, VOCAB or RESULTS
    fields: tuple[CdmField, ...]

    @property
    def primary_key(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.primary_key)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> CdmField:
        return next(f for f in self.fields if f.name == name)

    @property
    def has_person(self) -> bool:
        """Whether rows belong to a person (person_id references person)."""
        return self.name != "person" and any(
            f.name == "person_id" and f.fk_table == "person" for f in self.fields
        )

    @property
    def date_ranges(self) -> tuple[tuple[str, str], ...]:
        """Pairs (start, end) of date columns whose end must not precede the start."""
        names = set(self.columns)
        return tuple(
            (f.name, f.name.replace("_start_date", "_end_date"))
            for f in self.fields
            if f.name.endswith("_start_date")
            and f.name.replace("_start_date", "_end_date") in names
        )

    @property
    def index_columns(self) -> tuple[str, ...]:
        """Columns the analyses filter or join on: person_id and the domain concept column."""
        wanted = ["person_id", *INDEXED_CONCEPT_COLUMNS.get(self.name, ())]
        return tuple(c for c in wanted if c in self.columns and (c,) != self.primary_key)


# The concept column by which cohorts and analyses select rows of each event table, plus the
# vocabulary look-ups that mapping and descendant expansion use.
INDEXED_CONCEPT_COLUMNS: dict[str, tuple[str, ...]] = {
    "visit_occurrence": ("visit_concept_id",),
    "visit_detail": ("visit_detail_concept_id",),
    "condition_occurrence": ("condition_concept_id",),
    "drug_exposure": ("drug_concept_id",),
    "procedure_occurrence": ("procedure_concept_id",),
    "device_exposure": ("device_concept_id",),
    "measurement": ("measurement_concept_id",),
    "observation": ("observation_concept_id",),
    "specimen": ("specimen_concept_id",),
    "note": ("note_type_concept_id",),
    "drug_era": ("drug_concept_id",),
    "dose_era": ("drug_concept_id",),
    "condition_era": ("condition_concept_id",),
    "episode": ("episode_concept_id",),
    "concept": ("concept_code",),
    "concept_relationship": ("concept_id_1",),
    "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id"),
    "concept_synonym": ("concept_id",),
    "drug_strength": ("drug_concept_id",),
}


def _na(value: str) -> str | None:
    return None if value in ("", "NA") else value.lower()


@cache
def spec_fields(version: str = "5.4") -> dict[str, tuple[CdmField, ...]]:
    """Fields per table (lower-case names, spec order) of CDM ``version`` (5.3 or 5.4)."""
    tables: dict[str, list[CdmField]] = {}
    with FIELD_SPEC[version].open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            field = CdmField(
                name=row["cdmFieldName"].strip('"').lower(),  # the spec writes "offset"
                cdm_datatype=row["cdmDatatype"],
                required=row["isRequired"] == "Yes",
                primary_key=row["isPrimaryKey"] == "Yes",
                fk_table=_na(row["fkTableName"]),
                fk_field=_na(row["fkFieldName"]),
                fk_domain=row["fkDomain"] if row["fkDomain"] not in ("", "NA") else None,
                guidance=row["userGuidance"].strip() if row["userGuidance"] != "NA" else "",
            )
            tables.setdefault(row["cdmTableName"].lower(), []).append(field)
    return {name: tuple(fields) for name, fields in tables.items()}


@cache
def cdm_tables() -> dict[str, CdmTable]:
    """Every CDM v5.4 table, in the table-level specification's order (person first)."""
    fields = spec_fields("5.4")
    with TABLE_SPEC.open(newline="", encoding="utf-8") as handle:
        order = [(r["cdmTableName"].lower(), r["schema"]) for r in csv.DictReader(handle)]
    return {name: CdmTable(name, schema, fields[name]) for name, schema in order}


def vocabulary_tables() -> tuple[str, ...]:
    """The tables an Athena export provides (source_to_concept_map is site-made, not Athena)."""
    return tuple(
        t.name
        for t in cdm_tables().values()
        if t.schema == "VOCAB" and t.name != "source_to_concept_map"
    )


def create_table_sql(
    table: CdmTable, *, primary_key: bool = True, compression: Mapping[str, str] | None = None
) -> str:
    """CREATE TABLE statement with NOT NULL for required fields and the declared primary key
    (left out with ``primary_key=False``, for ``index_statements`` after a bulk load).

    ``compression`` maps column names to a DuckDB compression method (``create_cdm_schema``)."""
    compression = compression or {}
    lines = [
        f"    {quote(f.name)} {f.sql_type}{' NOT NULL' if f.required else ''}"
        f"{f' USING COMPRESSION {compression[f.name]}' if f.name in compression else ''}"
        for f in table.fields
    ]
    if table.primary_key and primary_key:
        lines.append(f"    PRIMARY KEY ({', '.join(map(quote, table.primary_key))})")
    return f"CREATE TABLE {quote(table.name)} (\n" + ",\n".join(lines) + "\n)"


def index_statements(table: CdmTable, *, primary_key: bool = False) -> list[str]:
    """The statements creating ``table``'s secondary indexes, after its declared primary key
    when ``primary_key`` (for tables created with ``primary_keys=False``).

    OHDSI's own DDL ships the primary keys as a separate script to run after the load: one bulk
    build of each key index costs a third of keeping it up to date row by row (measured on 5M
    measurement rows), and concurrent appends to a table need no key checks. A duplicate key
    still fails the load there, and the previous database stays in place.
    """
    statements = []
    if primary_key and table.primary_key:
        statements.append(
            f"ALTER TABLE {quote(table.name)} "
            f"ADD PRIMARY KEY ({', '.join(map(quote, table.primary_key))})"
        )
    statements += [
        f"CREATE INDEX IF NOT EXISTS {quote(f'idx_{table.name}_{column}')} "
        f"ON {quote(table.name)} ({quote(column)})"
        for column in table.index_columns
    ]
    return statements


def create_cdm_indexes(con: duckdb.DuckDBPyConnection) -> None:
    """Create the secondary indexes; cheaper once after a bulk load than during it."""
    for table in cdm_tables().values():
        for statement in index_statements(table):
            con.execute(statement)


def create_cdm_schema(
    con: duckdb.DuckDBPyConnection,
    *,
    indexes: bool = True,
    primary_keys: bool = True,
    compression: Mapping[str, str] | None = None,
) -> None:
    """Create every CDM v5.4 table (empty) and the ``etl_quarantine`` table in ``con``.

    Loaders that bulk-insert pass ``indexes=False`` and call ``create_cdm_indexes`` at the end;
    with ``primary_keys=False`` they add the keys too (``index_statements``).
    ``compression`` maps ``table.column`` to a DuckDB compression method, for a loader that
    knows its data better than the analysis DuckDB runs on every row group does (e.g. random
    UUIDs: string compression gains 2x on them but its analysis costs 40% of the row's insert).
    """
    for table in cdm_tables().values():
        prefix = f"{table.name}."
        methods = {c.removeprefix(prefix): m for c, m in (compression or {}).items()
                   if c.startswith(prefix)}  # fmt: skip
        con.execute(create_table_sql(table, primary_key=primary_keys, compression=methods))
    create_quarantine_table(con)
    if indexes:
        create_cdm_indexes(con)
