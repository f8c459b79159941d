"""The checks generated from the CDM 5.4 specification, as DataQualityDashboard generates its
own: table and field conformance, required fields, primary and foreign keys, concept domains
and standard concepts, source values.
"""

from __future__ import annotations

from collections.abc import Iterator

from omop_etl.dq_model import (
    COMPLETE,
    COMPLETENESS,
    CONFORMANCE,
    REKEYED,
    RELATIONAL,
    TABLE,
    VALUE,
    Check,
    RowRule,
    count_sql,
    field_check,
    make_check,
    row_id_sql,
)
from omop_etl.dq_rules import PERSON_COMPLETENESS
from omop_etl.quarantine import Reason
from omop_etl.schema import CdmField, CdmTable
from omop_etl.sql import quote


def table_checks(table: CdmTable) -> Iterator[Check]:
    name = table.name
    yield make_check(
        "cdmTable",
        name,
        None,
        category=CONFORMANCE,
        subcategory="Relational",
        level=TABLE,
        description=f"The table {name} exists.",
        threshold=0.0,
    )
    yield make_check(
        "loadQuarantine",
        name,
        None,
        category=COMPLETENESS,
        subcategory="Load",
        level=TABLE,
        description=f"Source rows meant for {name} that the ETL quarantined (any reason).",
        threshold=0.0,
        violated_sql="SELECT NULL AS id WHERE FALSE",
        denominator_sql=count_sql(name),
        needs=((name, None),),
        quarantine=tuple(Reason),
    )
    if name in PERSON_COMPLETENESS:
        yield make_check(
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


def catalog_field_checks(table: CdmTable, field: CdmField) -> Iterator[Check]:
    """cdmField and cdmDatatype: answered from the file's catalog, no SQL."""
    t, f = table.name, field.name
    exists = f"The column {t}.{f} exists."
    holds = f"The column {t}.{f} has a type that holds the spec's {field.cdm_datatype}."
    yield field_check(
        "cdmField", t, f, RELATIONAL, description=exists, threshold=0.0, needs=((t, None),)
    )
    yield field_check(
        "cdmDatatype",
        t,
        f,
        VALUE,
        description=holds,
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


def spec_field_checks(table: CdmTable, field: CdmField) -> Iterator[Check]:
    """isRequired, isPrimaryKey, isForeignKey, fkDomain, isStandardValidConcept and
    standardConceptRecordCompleteness, each where the spec marks the field for it."""
    t, f = table.name, quote(field.name)
    if field.required:
        yield RowRule(
            "isRequired",
            RELATIONAL,
            0.0,
            f"Rows of {t} with a NULL in the required field {field.name}.",
            f"t.{f} IS NULL",
        ).check(
            table,
            field.name,
            quarantine=(Reason.MISSING_REQUIRED,),
            # the reason names no field: count a rejected row here when its raw source row has
            # this column (any letter case) and the value is empty
            quarantine_filter="EXISTS (SELECT 1 FROM (SELECT unnest(json_keys(q.raw)) AS k) "
            f"WHERE lower(k) = '{field.name}' AND COALESCE(q.raw ->> k, '') = '')",
        )
    if field.primary_key and len(table.primary_key) == 1:
        yield field_check(
            "isPrimaryKey",
            t,
            field.name,
            dqd=RELATIONAL,
            description=f"Rows of {t} repeating an earlier row's {field.name} (duplicate keys), "
            "in the table or in the source (re-keyed at load).",
            threshold=0.0,
            violated_sql=f"SELECT id FROM (SELECT t.{f} AS id, row_number() OVER "
            f"(PARTITION BY t.{f}) AS copy FROM {quote(t)} t WHERE t.{f} IS NOT NULL) "
            f"WHERE copy > 1 UNION ALL SELECT new_id FROM {REKEYED} WHERE target_table = '{t}'",
            denominator_sql=count_sql(t),
            needs=((t, field.name),),
            quarantine=(Reason.DUPLICATE_KEY,),
        )
    if field.fk_table and field.fk_field:
        yield _foreign_key_check(table, field)
    if field.fk_domain and field.fk_table == "concept":
        yield from _concept_field_checks(table, field)


def _foreign_key_check(table: CdmTable, field: CdmField) -> Check:
    t, f = table.name, quote(field.name)
    fk_table, fk_field = field.fk_table or "", field.fk_field or ""
    rule = RowRule(
        "isForeignKey",
        RELATIONAL,
        0.0,
        f"Rows of {t} whose {field.name} is not a {fk_table}.{fk_field}.",
        f"t.{f} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {quote(fk_table)} r "
        f"WHERE r.{quote(fk_field)} = t.{f})",
        reads=((fk_table, fk_field),),
    )
    return rule.check(
        table, field.name, quarantine=(Reason.UNKNOWN_PERSON,) if fk_table == "person" else ()
    )


def _concept_field_checks(table: CdmTable, field: CdmField) -> Iterator[Check]:
    t, f, name = table.name, quote(field.name), field.name
    domains = [d.strip() for d in (field.fk_domain or "").split(",")]
    domain_list = ", ".join(f"'{d}'" for d in domains)
    concept = {
        "joins": f"JOIN concept c ON c.concept_id = t.{f}",
        "reads": (("concept", "domain_id"),),
    }
    rules = [
        RowRule(
            "fkDomain",
            VALUE,
            0.0,
            f"Rows of {t} whose {name} is a concept outside the {' or '.join(domains)} domain.",
            f"c.concept_id <> 0 AND c.domain_id NOT IN ({domain_list})",
            **concept,
        ),
    ]
    if not name.endswith("_source_concept_id"):
        rules.append(
            RowRule(
                "isStandardValidConcept",
                VALUE,
                0.0,
                f"Rows of {t} whose {name} is not a standard, valid concept.",
                "c.concept_id <> 0 AND (c.standard_concept IS DISTINCT FROM 'S' "
                "OR c.invalid_reason IS NOT NULL)",
                **concept,
            )
        )
        # an optional concept field may well be 0 ("no information"), e.g. route
        if field.required:
            rules.append(
                RowRule(
                    "standardConceptRecordCompleteness",
                    COMPLETE,
                    5.0,
                    f"Rows of {t} whose {name} is 0 (source code not mapped).",
                    f"t.{f} = 0",
                )
            )
    for rule in rules:
        yield rule.check(table, name)


def source_value_check(table: CdmTable, field: CdmField) -> Check | None:
    """sourceValueCompleteness: distinct source values that map to no standard concept."""
    concept = field.name.replace("_source_value", "_concept_id")
    if not field.name.endswith("_source_value") or concept not in table.columns:
        return None
    if table.field(concept).fk_domain is None or not table.field(concept).required:
        return None
    t, sv, c = table.name, quote(field.name), quote(concept)
    return field_check(
        "sourceValueCompleteness",
        t,
        field.name,
        dqd=COMPLETE,
        description=f"Distinct {field.name} values of {t} mapped to concept 0 "
        "(example ids: one row per unmapped value).",
        threshold=10.0,
        violated_sql=f"SELECT min(t.{row_id_sql(table)}) AS id FROM {quote(t)} t "
        f"WHERE t.{c} = 0 AND t.{sv} IS NOT NULL GROUP BY t.{sv}",
        denominator_sql=f"SELECT count(DISTINCT t.{sv}) FROM {quote(t)} t",
        needs=((t, field.name), (t, concept)),
    )
