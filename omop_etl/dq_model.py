"""What a data-quality check is (``Check``: DQD's classification and the SQL that counts its
violations) and the SQL building blocks the generated and the hand-written checks share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from omop_etl.schema import CdmTable
from omop_etl.sql import quote

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


def make_check(name: str, table: str, field: str | None, **details: Any) -> Check:
    """A check with DQD's id: ``name.table.field``, or ``name.table`` for a table-level check."""
    check_id = f"{name}.{table}" if field is None else f"{name}.{table}.{field}"
    return Check(id=check_id, name=name, table=table, field=field, **details)


#: DQD's (category, subcategory) of the field-level checks, for ``field_check``.
RELATIONAL = (CONFORMANCE, "Relational")
VALUE = (CONFORMANCE, "Value")
COMPLETE = (COMPLETENESS, "")
TEMPORAL = (PLAUSIBILITY, "Temporal")
ATEMPORAL = (PLAUSIBILITY, "Atemporal")


def field_check(name: str, table: str, field: str, dqd: tuple[str, str], **details: Any) -> Check:
    """A field-level check classified as DQD does: ``dqd`` is its (category, subcategory)."""
    category, subcategory = dqd
    return make_check(
        name, table, field, category=category, subcategory=subcategory, level=FIELD, **details
    )


# --- SQL building blocks ---------------------------------------------------------------------


def row_id_sql(table: CdmTable) -> str:
    """The column that names a row in examples: the primary key, else person_id, else rowid."""
    if len(table.primary_key) == 1:
        return quote(table.primary_key[0])
    return "person_id" if "person_id" in table.columns else "rowid"


def count_sql(table: str, where: str = "TRUE") -> str:
    return f"SELECT count(*) FROM {quote(table)} t WHERE {where}"


def ids_sql(table: CdmTable, where: str, joins: str = "") -> str:
    return f"SELECT t.{row_id_sql(table)} AS id FROM {quote(table.name)} t {joins} WHERE {where}"


def birth_date_sql() -> str:
    """Birth date as DQD takes it: birth_datetime, else 1 January of the year of birth."""
    return "COALESCE(CAST(p.birth_datetime AS DATE), make_date(p.year_of_birth, 1, 1))"


@dataclass(frozen=True)
class RowRule:
    """A field-level check that counts rows of one table, as one row of a rule table: DQD, too,
    declares its checks as table rows (check name, threshold, SQL template) and generates the
    SQL, so the rules below read as a table and ``check`` is the one place that builds them.

    ``where``: the SQL condition on the table's rows ``t`` (and ``joins``) that a violating row
    meets; ``tested``: the rows the denominator counts; ``reads``: what the SQL reads besides
    the checked field (a check with any of it absent is not applicable).
    """

    name: str
    dqd: tuple[str, str]
    threshold: float
    description: str
    where: str
    joins: str = ""
    tested: str = "TRUE"
    reads: tuple[tuple[str, str], ...] = ()

    def check(self, table: CdmTable, field: str, **details: Any) -> Check:
        """The check of ``field`` of ``table``; ``details``: its quarantine reasons, if any."""
        return field_check(
            self.name,
            table.name,
            field,
            self.dqd,
            description=self.description,
            threshold=self.threshold,
            violated_sql=ids_sql(table, self.where, self.joins),
            denominator_sql=count_sql(table.name, self.tested),
            needs=((table.name, field), *self.reads),
            **details,
        )
