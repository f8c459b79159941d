"""The node's HealthDCAT-AP dataset description (``fedomop node describe``), released like a result.

The description is the one thing a node publishes without a permit, so the numbers in it pass the
gate's rules before anything is written: every count (persons, records, persons per coding system,
persons observed per calendar year) goes through ``privacy.disclosure.protect`` at the node's
minimum cell count and is then rounded (``privacy.disclosure.round_counts``); a suppressed count
is left out of the description, never written as a small number. Ages are percentiles that leave
at least a minimum cell of persons beyond them (the 5th and 95th, or further in when the node is
small), widened to five-year bounds, so no one person's age is published; a node too small for
that publishes no ages. Temporal coverage runs over the calendar years in which at least a
minimum cell of persons is observed. The description is validated against the HealthDCAT-AP
shapes, audited as a release (with the hash of each file written) and only then written.

The text (title, publisher, HDAB, purposes, ...) is the operator's, from the policy's
``[catalogue]`` section.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
from rdflib import BNode, Graph, Literal, URIRef
from rdflib.namespace import CSVW, DCAT, DCTERMS, FOAF, RDF, RDFS, SKOS, XSD

from node.audit import AuditLog
from node.policy import AgentSection, CatalogueSection, Policy
from omop_etl.cdm import connect
from omop_etl.schema import cdm_tables
from privacy.disclosure import protect, round_counts
from studies import dcat
from studies.statistics import make_statistics

RECORD_TABLES = (
    "visit_occurrence",
    "visit_detail",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "device_exposure",
    "measurement",
    "observation",
    "death",
    "note",
    "specimen",
)
"""Person-level clinical event tables whose rows are the dataset's records (eras and periods
are derived from them, so they are not counted again)."""

CODED_EVENT_TABLES = (
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
    "device_exposure",
)
CONCEPT_COLUMNS = {
    table: (f"{domain}_concept_id", f"{domain}_source_concept_id")
    for table in CODED_EVENT_TABLES
    for domain in [table.split("_")[0]]
}
"""Where a person's coded facts are: standard and source concepts of the event tables (the
CDM names both after the table's domain, the first word of its name)."""

AGE_TAIL = 0.05
"""Typical ages are the 5th and 95th percentiles (or further in, see ``_typical_ages``)."""
AGE_STEP = 5
"""Typical ages are widened to multiples of this many years."""
DESCRIPTION_ANALYSIS = "catalogue-description"
"""The ``analysis_id`` of the description's audit entries."""
PERSONAL_DATA = ("Age", "Gender", "HealthRecord")
"""DPV personal-data categories every OMOP CDM holds (year of birth, gender, clinical events)."""
DPV_PD = "https://w3id.org/dpv/pd#"


class DescribeError(ValueError):
    """The description cannot be made: no ``[catalogue]`` section, unreadable CDM, or it does
    not conform to the shapes (the message names what)."""


@dataclass
class CdmFacts:
    """What the description publishes from the CDM, after disclosure control (None: withheld)."""

    persons: int | None
    records: int | None
    min_age: int | None
    max_age: int | None
    first_year: int | None
    last_year: int | None
    coding_systems: list[str]
    tables: list[str] = field(default_factory=list)
    """The CDM 5.4 clinical tables the file holds (the schema, not a number from the data)."""
    withheld: list[str] = field(default_factory=list)
    """What was suppressed and why, for the audit entry and the operator."""


# --- the numbers, computed on the node and passed through disclosure control --------------------


def cdm_facts(con: duckdb.DuckDBPyConnection, min_cell_count: int) -> CdmFacts:
    """Counts, ages, years and coding systems of a CDM, as the gate's rules allow them out."""
    tables = {
        r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    rows = _count_rows(con, tables)
    protected, _report = protect(make_statistics(pl.DataFrame(rows)), min_cell_count)
    released = round_counts(protected, min_cell_count)
    value = {
        (r["variable_name"], r["variable_level"], r["estimate_name"]): r["value"]
        for r in released.iter_rows(named=True)
    }
    withheld = [
        f"{name} {level}".strip()
        for (name, level, estimate), v in value.items()
        if estimate.endswith("count") and math.isnan(v)
    ]
    ages = _typical_ages(con, min_cell_count) if "observation_period" in tables else None
    if ages is None:
        withheld.append("typical ages (too few persons for percentiles beyond the minimum cell)")
    years = sorted(int(level) for level in _released(value, "year"))
    return CdmFacts(
        persons=_int(value.get(("persons", "", "person_count"))),
        records=_int(value.get(("records", "", "record_count"))),
        min_age=ages[0] if ages else None,
        max_age=ages[1] if ages else None,
        first_year=years[0] if years else None,
        last_year=years[-1] if years else None,
        coding_systems=sorted({dcat.CODING_SYSTEMS[v] for v in _released(value, "coding_system")}),
        tables=[t for t, spec in cdm_tables().items() if spec.schema == "CDM" and t in tables],
        withheld=sorted(withheld),
    )


def _released(value: dict[tuple[str, str, str], float], what: str) -> list[str]:
    """The levels of ``what`` (``year``, ``coding_system``) whose person count was released."""
    return [
        name.split(" ", 1)[1]
        for (name, _level, _estimate), v in value.items()
        if name.startswith(what + " ") and not math.isnan(v) and v > 0
    ]


def _int(value: float | None) -> int | None:
    return None if value is None or math.isnan(value) else int(value)


def _count_rows(con: duckdb.DuckDBPyConnection, tables: set[str]) -> list[dict]:
    """The statistics rows. Each count is its own variable: persons per year or per coding
    system overlap (one person is in many), so they are no margin set whose total would give a
    suppressed cell back, and complementary suppression must not hide a well-populated one."""
    persons = con.execute("SELECT count(*) FROM person").fetchone()[0]
    records = sum(
        con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in RECORD_TABLES if t in tables
    )
    rows = [
        _count("persons", "", "person_count", persons),
        _count("records", "", "record_count", records, upper=math.inf),
    ]
    rows += [
        _count(f"coding_system {v}", "", "person_count", n)
        for v, n in _vocabulary_persons(con, tables)
    ]
    if "observation_period" in tables:
        rows += [_count(f"year {y}", "", "person_count", n) for y, n in _persons_per_year(con)]
    return rows


def _count(name: str, level: str, estimate: str, value: int, upper: float = math.nan) -> dict:
    return {
        "variable_name": name,
        "variable_level": level,
        "estimate_name": estimate,
        "release_class": "count",
        "value": float(value),
        "upper": upper,
    }


def _vocabulary_persons(con: duckdb.DuckDBPyConnection, tables: set[str]) -> list[tuple[str, int]]:
    """Persons with at least one fact coded in each mapped vocabulary (concept table joined)."""
    if "concept" not in tables:
        return []
    columns: dict[str, set[str]] = {}
    for table, column in con.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
    ).fetchall():
        columns.setdefault(table, set()).add(column)
    used = [
        f"SELECT person_id, {column} AS concept_id FROM {table}"
        for table, wanted in CONCEPT_COLUMNS.items()
        if table in tables
        for column in wanted
        if column in columns[table]
    ]
    if not used:
        return []
    return con.execute(
        f"""
        WITH used AS ({" UNION ALL ".join(used)})
        SELECT c.vocabulary_id, count(DISTINCT u.person_id)
        FROM used u JOIN concept c ON c.concept_id = u.concept_id
        WHERE c.vocabulary_id IN (SELECT unnest(?::VARCHAR[]))
        GROUP BY 1 ORDER BY 1
        """,
        [sorted(dcat.CODING_SYSTEMS)],
    ).fetchall()


def _persons_per_year(con: duckdb.DuckDBPyConnection) -> list[tuple[int, int]]:
    """Persons observed in each calendar year (any observation period touching it)."""
    return con.execute(
        """
        WITH years AS (
            SELECT person_id, unnest(range(year(observation_period_start_date),
                                           year(observation_period_end_date) + 1)) AS y
            FROM observation_period
            WHERE observation_period_end_date >= observation_period_start_date
        )
        SELECT y, count(DISTINCT person_id) FROM years GROUP BY y ORDER BY y
        """
    ).fetchall()


def _typical_ages(con: duckdb.DuckDBPyConnection, min_cell_count: int) -> tuple[int, int] | None:
    """Rounded low and high age percentiles, each with at least ``min_cell_count`` persons beyond.

    Age is at the end of a person's last observation period. The percentiles are the 5th and
    95th, moved inwards when fewer than a minimum cell of persons would lie beyond them; the low
    one is rounded down and the high one up to a multiple of ``AGE_STEP`` years. A node with
    fewer than two minimum cells of persons gets none.
    """
    ages = con.execute(
        """
        SELECT year(max(op.observation_period_end_date)) - any_value(p.year_of_birth) AS age
        FROM person p JOIN observation_period op ON op.person_id = p.person_id
        WHERE p.year_of_birth IS NOT NULL
        GROUP BY p.person_id
        """
    ).fetchnumpy()["age"]
    n = len(ages)
    if n < 2 * min_cell_count:
        return None
    ordered = np.sort(ages.astype(np.int64))
    k = max(math.ceil(AGE_TAIL * n), min_cell_count)  # persons at or beyond each percentile
    low, high = int(ordered[k - 1]), int(ordered[n - k])
    return max(0, (low // AGE_STEP) * AGE_STEP), -(-high // AGE_STEP) * AGE_STEP


# --- the RDF graph ------------------------------------------------------------------------------


def description_graph(policy: Policy, facts: CdmFacts, today: date) -> Graph:
    """The node's dataset as HealthDCAT-AP: DCAT-AP 3 core plus the health properties."""
    text = policy.catalogue
    if text is None:
        raise DescribeError("the policy has no [catalogue] section (see examples/node.toml)")
    g = dcat.new_graph()
    ds = URIRef(str(text.identifier))
    lang = text.language
    g.add((ds, RDF.type, DCAT.Dataset))
    g.add((ds, dcat.NODE, Literal(policy.node_name)))
    g.add((ds, DCTERMS.title, Literal(text.title, lang=lang)))
    g.add((ds, DCTERMS.description, Literal(text.description, lang=lang)))
    g.add((ds, DCTERMS.identifier, Literal(str(text.identifier))))
    g.add((ds, DCTERMS.modified, Literal(today, datatype=XSD.date)))
    for keyword in text.keywords:
        g.add((ds, DCAT.keyword, Literal(keyword, lang=lang)))
    _concept(g, ds, DCAT.theme, dcat.HEALTH_THEME, "Health")
    _concept(g, ds, DCTERMS.type, dcat.PERSONAL_DATA_TYPE, "Personal data")
    _typed(g, ds, DCTERMS.accessRights, dcat.NON_PUBLIC, DCTERMS.RightsStatement)
    _typed(g, ds, dcat.DCATAP.applicableLegislation, dcat.EHDS_REGULATION, dcat.ELI.LegalResource)
    _typed(g, ds, DCTERMS.conformsTo, dcat.OMOP_CDM_STANDARD, DCTERMS.Standard)
    _typed(g, ds, DCTERMS.conformsTo, dcat.OMOP_CDM_54, DCTERMS.Standard)
    g.add((dcat.OMOP_CDM_54, RDFS.label, Literal("OMOP Common Data Model v5.4", lang="en")))
    _typed(g, ds, DCTERMS.spatial, dcat.country(text.country), DCTERMS.Location)
    provenance = BNode()
    g.add((ds, DCTERMS.provenance, provenance))
    g.add((provenance, RDF.type, DCTERMS.ProvenanceStatement))
    g.add((provenance, RDFS.label, Literal(text.provenance, lang=lang)))
    g.add((ds, DCAT.contactPoint, _contact_point(g, text.contact)))
    g.add((ds, DCTERMS.publisher, _agent(g, text.publisher)))
    g.add((ds, dcat.HEALTH.hdab, _agent(g, text.hdab)))
    if facts.first_year is not None:
        period = _period(g, date(facts.first_year, 1, 1), date(facts.last_year, 12, 31))
        g.add((ds, DCTERMS.temporal, period))
    g.add((ds, DCAT.distribution, _distribution(g, ds, text)))
    _health_properties(g, ds, text, facts)
    return g


def _health_properties(g: Graph, ds: URIRef, text: CatalogueSection, facts: CdmFacts) -> None:
    health = dcat.HEALTH
    for code in text.health_categories:
        label = dcat.HEALTH_CATEGORIES[code]
        _concept(g, ds, health.healthCategory, dcat.health_category(code), label)
    for code in [*facts.coding_systems, "OHDSI-VOCAB"]:
        _typed(g, ds, health.hasCodingSystem, dcat.coding_system(code), DCTERMS.Standard)
    numbers = {
        health.numberOfUniqueIndividuals: facts.persons,
        health.numberOfRecords: facts.records,
        health.minTypicalAge: facts.min_age,
        health.maxTypicalAge: facts.max_age,
    }
    for prop, number in numbers.items():
        if number is not None:
            g.add((ds, prop, Literal(number, datatype=XSD.nonNegativeInteger)))
    g.add((ds, health.populationCoverage, Literal(text.population_coverage, lang=text.language)))
    g.add((ds, health.retentionPeriod, _period(g, text.retention_start, text.retention_end)))
    g.add((ds, health.hasStructuredData, Literal(True)))
    g.add((ds, health.hasVariables, _variables(g, ds, facts.tables)))
    for basis in text.legal_basis:
        g.add((ds, dcat.DPV.hasLegalBasis, dcat.DPV[basis]))
    for purpose in text.purposes:
        g.add((ds, dcat.DPV.hasPurpose, dcat.DPV[purpose]))
    for category in PERSONAL_DATA:
        g.add((ds, dcat.DPV.hasPersonalData, URIRef(DPV_PD + category)))


CSVW_DATATYPES = {
    "integer": "integer",
    "float": "double",
    "date": "date",
    "datetime": "dateTime",
    "varchar": "string",
}
"""CDM field datatype -> CSVW built-in datatype name."""


def _variables(g: Graph, ds: URIRef, tables: list[str]) -> URIRef:
    """The CDM tables and columns as a CSVW table group, from the CDM 5.4 field specification."""
    group = URIRef(f"{ds}#variables")
    g.add((group, RDF.type, CSVW.TableGroup))
    g.add((group, DCTERMS.title, Literal("OMOP CDM 5.4 clinical data tables", lang="en")))
    specs = cdm_tables()
    for name in tables:
        table = URIRef(f"{ds}#table-{name}")
        g.add((group, CSVW.table, table))
        g.add((table, RDF.type, CSVW.Table))
        g.add((table, DCTERMS.title, Literal(name)))
        for spec in specs[name].fields:
            column = URIRef(f"{ds}#column-{name}-{spec.name}")
            g.add((table, CSVW.column, column))
            g.add((column, RDF.type, CSVW.Column))
            g.add((column, CSVW.name, Literal(spec.name)))
            g.add((column, CSVW.title, Literal(spec.name.replace("_", " "), lang="en")))
            g.add((column, DCTERMS.description, Literal(spec.guidance or spec.name, lang="en")))
            g.add((column, CSVW.datatype, Literal(CSVW_DATATYPES.get(spec.kind, "string"))))
    return group


def _typed(g: Graph, subject: URIRef, prop: URIRef, value: URIRef, cls: URIRef) -> None:
    """``subject prop value`` and ``value a cls``: DCAT-AP's range shapes check the class."""
    g.add((subject, prop, value))
    g.add((value, RDF.type, cls))


def _concept(g: Graph, subject: URIRef, prop: URIRef, value: URIRef, label: str) -> None:
    """A controlled-vocabulary value as a ``skos:Concept`` with its label, as DCAT-AP wants."""
    _typed(g, subject, prop, value, SKOS.Concept)
    g.add((value, SKOS.prefLabel, Literal(label, lang="en")))


def _resource(g: Graph, subject: URIRef, prop: URIRef, url: object) -> None:
    """A web address value (access or endpoint URL), typed as DCAT-AP's range shape checks."""
    _typed(g, subject, prop, URIRef(str(url)), RDFS.Resource)


def _period(g: Graph, start: date, end: date) -> BNode:
    period = BNode()
    g.add((period, RDF.type, DCTERMS.PeriodOfTime))
    g.add((period, DCAT.startDate, Literal(start, datatype=XSD.date)))
    g.add((period, DCAT.endDate, Literal(end, datatype=XSD.date)))
    return period


def _agent(g: Graph, agent: AgentSection) -> BNode:
    """A foaf:Agent with one cv:ContactPoint (HealthDCAT-AP) and foaf contact details."""
    node, contact = BNode(), BNode()
    g.add((node, RDF.type, FOAF.Agent))
    g.add((node, RDF.type, FOAF.Organization))
    g.add((node, FOAF.name, Literal(agent.name)))
    g.add((node, dcat.CV.contactPoint, contact))
    g.add((contact, RDF.type, dcat.CV.ContactPoint))
    if agent.email:
        g.add((node, FOAF.mbox, URIRef(f"mailto:{agent.email}")))
        g.add((contact, dcat.CV.email, Literal(agent.email)))
    if agent.homepage:
        g.add((node, FOAF.homepage, URIRef(str(agent.homepage))))
        g.add((contact, dcat.CV.contactPage, URIRef(str(agent.homepage))))
    return node


def _contact_point(g: Graph, agent: AgentSection) -> BNode:
    node = BNode()
    g.add((node, RDF.type, dcat.VCARD.Kind))
    g.add((node, RDF.type, dcat.VCARD.Organization))
    g.add((node, dcat.VCARD.fn, Literal(agent.name)))
    if agent.email:
        g.add((node, dcat.VCARD.hasEmail, URIRef(f"mailto:{agent.email}")))
    if agent.homepage:
        g.add((node, dcat.VCARD.hasURL, URIRef(str(agent.homepage))))
    return node


def _distribution(g: Graph, ds: URIRef, text: CatalogueSection) -> URIRef:
    """The one way to the data: federated analysis under a data permit, through fedomop."""
    dist, service = URIRef(f"{ds}#federated-access"), URIRef(f"{ds}#federated-service")
    lang = text.language
    g.add((dist, RDF.type, DCAT.Distribution))
    g.add((dist, DCTERMS.title, Literal("Federated analysis under an EHDS data permit", lang="en")))
    g.add(
        (
            dist,
            DCTERMS.description,
            Literal(
                "No data leave the node: permitted declarative studies run on it through the "
                "fedomop federated access service, and only aggregates that pass the node's "
                "disclosure control are released.",
                lang="en",
            ),
        )
    )
    _resource(g, dist, DCAT.accessURL, text.access_url)
    g.add((dist, DCAT.accessService, service))
    g.add((dist, dcat.DCATAP.applicableLegislation, dcat.EHDS_REGULATION))
    rights = BNode()
    g.add((dist, DCTERMS.rights, rights))
    g.add((rights, RDF.type, DCTERMS.RightsStatement))
    g.add(
        (rights, RDFS.label, Literal("Access only under a data permit (EHDS Art. 68).", lang="en"))
    )
    g.add((service, RDF.type, DCAT.DataService))
    g.add((service, DCTERMS.title, Literal(f"fedomop federated access: {text.title}", lang=lang)))
    _resource(g, service, DCAT.endpointURL, text.service_url)
    g.add((service, DCAT.servesDataset, ds))
    g.add((service, DCTERMS.accessRights, dcat.NON_PUBLIC))
    g.add((service, dcat.DCATAP.applicableLegislation, dcat.EHDS_REGULATION))
    return dist


# --- release: validate, audit, write ------------------------------------------------------------


@dataclass(frozen=True)
class Description:
    """What ``describe`` wrote: the files, their hashes, the audit entry and the facts."""

    files: dict[str, Path]
    hashes: dict[str, str]
    audit_hash: str
    facts: CdmFacts


def describe(policy: Policy, out_dir: Path, *, today: date | None = None) -> Description:
    """Compute, protect, validate, audit and write the node's description (Turtle and JSON-LD)."""
    if policy.catalogue is None:
        raise DescribeError("the policy has no [catalogue] section (see examples/node.toml)")
    min_cell = policy.min_cell_count
    try:
        with connect(policy.cdm_path) as con:
            facts = cdm_facts(con, min_cell)
    except duckdb.Error as err:
        raise DescribeError(f"cannot read CDM {policy.cdm_path}: {err}") from err
    graph = description_graph(policy, facts, today or datetime.now(UTC).date())
    audit = AuditLog(policy.audit_path)
    violations = dcat.validate(graph)
    if violations:
        reason = "the description does not conform to HealthDCAT-AP: " + "; ".join(
            str(v) for v in violations
        )
        audit.append(_audit_record(policy, facts, {}, reason=reason))
        raise DescribeError(reason)
    context = {prefix: str(namespace) for prefix, namespace in dcat.PREFIXES.items()}
    payloads = {
        "dataset.ttl": graph.serialize(format="turtle").encode("utf-8"),
        "dataset.jsonld": graph.serialize(format="json-ld", context=context, indent=2).encode(),
    }
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in payloads.items()}
    entry = audit.append(_audit_record(policy, facts, hashes))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, data in payloads.items():
        files[name] = out_dir / name
        tmp = files[name].with_suffix(files[name].suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, files[name])
    return Description(files=files, hashes=hashes, audit_hash=entry["hash"], facts=facts)


def _audit_record(
    policy: Policy, facts: CdmFacts, hashes: dict[str, str], reason: str = ""
) -> dict:
    """An entry in the gate's shape: no permit, nothing charged, the payloads' hashes; a
    description that does not conform is refused (nothing written), with the reason."""
    payload = hashes.get("dataset.ttl", "")
    return {
        "request_id": hashlib.sha256(
            f"{policy.node_name}|{DESCRIPTION_ANALYSIS}|{payload or reason}".encode()
        ).hexdigest(),
        "permit_id": "",
        "study_hash": "",
        "analysis_id": DESCRIPTION_ANALYSIS,
        "round": None,
        "verdict": "refused" if reason else "released",
        "reason": reason[:2000],
        "rho_charged": 0.0,
        "payload_sha256": payload,
        "payload_files": hashes,
        "min_cell_count": policy.min_cell_count,
        "withheld": facts.withheld,
    }
