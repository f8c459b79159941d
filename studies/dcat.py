"""HealthDCAT-AP: the vocabulary a node's dataset description and a national catalogue share.

One module for the IRIs, so that a node writing its description (``node.catalogue``), the
coordinator merging descriptions into a catalogue (``coordinator.catalogue``) and a study render
that links a study to catalogue datasets all speak the same terms. It lives in ``studies/``
because both roles and the study commands use it, and dependencies point from ``node/`` and
``coordinator/`` to ``studies/``.

Sources of the terms (HealthDCAT-AP releases 6-8 of the HealthDCAT-AP working group, DCAT-AP 3):
the health namespace ``http://healthdataportal.eu/ns/health#``; its controlled vocabularies
(health categories = EHDS Art. 51 codes, coding systems, standards) on the HealthData@EU
production base ``https://hdeu-dcat.data.health.europa.eu/resource/authority/``; the EU
Publications Office authority tables (access rights, countries, data themes, file types); the
EHDS regulation's ELI; and DPV (``https://w3id.org/dpv#``) for legal basis and purpose.

Validation runs pyshacl against the HealthDCAT-AP shapes shipped here (``shapes/``), plus any
further shapes files given (the DCAT-AP 3 SHACL, for instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rdflib import Graph, Namespace, URIRef
from rdflib.namespace import DCAT, DCTERMS, FOAF, RDF, RDFS, SKOS, XSD

HEALTH = Namespace("http://healthdataportal.eu/ns/health#")
DCATAP = Namespace("http://data.europa.eu/r5r/")
DPV = Namespace("https://w3id.org/dpv#")
ELI = Namespace("http://data.europa.eu/eli/ontology#")
CV = Namespace("http://data.europa.eu/m8g/")
VCARD = Namespace("http://www.w3.org/2006/vcard/ns#")
SH = Namespace("http://www.w3.org/ns/shacl#")

PREFIXES: dict[str, Namespace] = {
    "dcat": DCAT,
    "dct": DCTERMS,
    "dcatap": DCATAP,
    "healthdcatap": HEALTH,
    "dpv": DPV,
    "eli": ELI,
    "cv": CV,
    "foaf": FOAF,
    "vcard": VCARD,
    "skos": SKOS,
    "rdfs": RDFS,
    "xsd": XSD,
}

EU_AUTHORITY = "http://publications.europa.eu/resource/authority/"
HEALTH_AUTHORITY = "https://hdeu-dcat.data.health.europa.eu/resource/authority/"

NON_PUBLIC = URIRef(EU_AUTHORITY + "access-right/NON_PUBLIC")
"""EU access-rights table: data that only a data permit makes available (EHDS Art. 68)."""
HEALTH_THEME = URIRef(EU_AUTHORITY + "data-theme/HEAL")
EHDS_REGULATION = URIRef("http://data.europa.eu/eli/reg/2025/327/oj")
"""ELI of Regulation (EU) 2025/327 establishing the European Health Data Space."""
PERSONAL_DATA_TYPE = URIRef(EU_AUTHORITY + "dataset-type/PERSONAL_DATA")
OMOP_CDM_STANDARD = URIRef(HEALTH_AUTHORITY + "standard/OMOP-CDM")
"""The HealthDCAT-AP standard vocabulary's entry for the OMOP CDM (the data model)."""
OMOP_CDM_54 = URIRef("https://ohdsi.github.io/CommonDataModel/cdm54.html")
"""The OMOP CDM 5.4 specification, the version a node's CDM file follows."""
OHDSI_VOCABULARY = URIRef(HEALTH_AUTHORITY + "coding-system/OHDSI-VOCAB")

HEALTH_CATEGORIES: dict[str, str] = {
    "EHRS": "Electronic health data from electronic health records",
    "DIOH": "Data on factors impacting on health",
    "NRPE": "Aggregated data on healthcare needs, resources, provision and expenditure",
    "RPDG": "Data on pathogens that impact human health",
    "HRAD": "Healthcare-related administrative data",
    "HGPD": "Human genetic, epigenomic and genomic data",
    "HPML": "Other human molecular data",
    "PGEH": "Personal health data automatically generated through medical devices",
    "WELA": "Data from wellness applications",
    "IDHP": "Data on health professionals involved in treatment",
    "PHDR": "Data from population-based health data registries",
    "MRMR": "Data from medical registries and mortality registries",
    "EHCT": "Data from clinical trials, studies and investigations",
    "EMRD": "Other health data from medical devices",
    "RMMD": "Data from registries for medicinal products and medical devices",
    "RQSH": "Data from research cohorts, questionnaires and surveys",
    "EINS": "Health data from biobanks and associated databases",
}
"""EHDS Art. 51(1) data categories: codes of the HealthDCAT-AP health-category vocabulary and a
short English label (DCAT-AP wants a ``skos:prefLabel`` on every concept a description uses)."""

CODING_SYSTEMS: dict[str, str] = {
    "SNOMED": "SNOMED-CT",
    "RxNorm": "RXNORM",
    "LOINC": "LOINC",
    "ICD10": "ICD-10",
    "ICD10CM": "ICD-10",
}
"""OMOP ``vocabulary_id`` -> code in the HealthDCAT-AP coding-system vocabulary."""

LEGAL_BASES = frozenset(
    {
        "Consent",
        "Contract",
        "LegalObligation",
        "LegitimateInterest",
        "OfficialAuthority",
        "PublicInterest",
        "VitalInterest",
    }
)
"""DPV legal bases (``dpv:hasLegalBasis``) a policy may name."""
PURPOSES = frozenset(
    {
        "AcademicResearch",
        "CommercialResearch",
        "NonCommercialResearch",
        "ResearchAndDevelopment",
        "ScientificResearch",
        "PublicBenefit",
    }
)
"""DPV purposes (``dpv:hasPurpose``) a policy may name: the research and benefit branch."""

FEDOMOP = Namespace("urn:fedomop:")
NODE = FEDOMOP.node
"""Not a HealthDCAT-AP term: fedomop's own annotation naming the node (as permits and policies
name it) that holds a dataset, so a study render can match catalogue datasets to its nodes."""

SHAPES = "healthdcat-ap.ttl"


def health_category(code: str) -> URIRef:
    return URIRef(HEALTH_AUTHORITY + "healthcategories/" + code)


def coding_system(code: str) -> URIRef:
    return URIRef(HEALTH_AUTHORITY + "coding-system/" + code)


def country(code: str) -> URIRef:
    return URIRef(EU_AUTHORITY + "country/" + code)


def new_graph() -> Graph:
    """An empty graph with the prefixes bound, so Turtle output reads with short names."""
    graph = Graph()
    for prefix, namespace in PREFIXES.items():
        graph.bind(prefix, namespace)
    graph.bind("fedomop", FEDOMOP)
    return graph


def shipped_shapes() -> Graph:
    """The HealthDCAT-AP health-property shapes packaged with fedomop."""
    text = resources.files("studies").joinpath("shapes", SHAPES).read_text(encoding="utf-8")
    return Graph().parse(data=text, format="turtle")


@dataclass(frozen=True)
class Violation:
    """One SHACL result: the node it is about, the property path, and the shape's message."""

    focus: str
    path: str
    message: str
    constraint: str

    def __str__(self) -> str:
        return f"{self.focus} {self.path}: {self.message}"


def validate(data: Graph, extra_shapes: list[Path] = ()) -> list[Violation]:
    """Every violation of the shipped shapes and of ``extra_shapes`` (empty: conformant).

    Results of nested shapes (``sh:node``) are folded into the result that refers to them, so
    each problem is reported once, at the property where it is.
    """
    from pyshacl import validate as shacl

    shapes = shipped_shapes()
    for path in extra_shapes:
        shapes.parse(str(path), format="turtle")
    _conforms, report, _text = shacl(data, shacl_graph=shapes)
    violations = []
    for result in report.subjects(RDF.type, SH.ValidationResult):
        if (None, SH.detail, result) in report:
            continue  # a nested shape's result: its message is joined to its parent's
        if report.value(result, SH.resultSeverity) != SH.Violation:
            continue  # warnings and infos (shapes given with ``extra_shapes`` may have them)
        message = str(report.value(result, SH.resultMessage) or "")
        details = sorted(
            str(report.value(d, SH.resultMessage)) for d in report.objects(result, SH.detail)
        )
        if details:
            message += f" ({'; '.join(details)})"
        violations.append(
            Violation(
                focus=str(report.value(result, SH.focusNode)),
                path=_short(data, report.value(result, SH.resultPath)),
                message=message,
                constraint=_short(data, report.value(result, SH.sourceConstraintComponent)),
            )
        )
    return sorted(violations, key=lambda v: (v.focus, v.path, v.message))


def _short(graph: Graph, term: object) -> str:
    if term is None:
        return ""
    if isinstance(term, URIRef):
        return graph.namespace_manager.normalizeUri(term)
    return str(term)


def read_description(path: Path) -> Graph:
    """A description or catalogue file as a graph: Turtle (``.ttl``) or JSON-LD (``.jsonld``)."""
    fmt = "json-ld" if path.suffix.lower() in {".jsonld", ".json"} else "turtle"
    graph = new_graph()
    graph.parse(str(path), format=fmt)
    return graph


@dataclass(frozen=True)
class CatalogueDataset:
    """What a study render shows of a catalogue dataset."""

    iri: str
    identifier: str
    title: str
    node: str


def catalogue_datasets(graph: Graph) -> list[CatalogueDataset]:
    """The datasets of a catalogue (or description) graph, sorted by node and title."""
    found = []
    for dataset in set(graph.subjects(RDF.type, DCAT.Dataset)):
        found.append(
            CatalogueDataset(
                iri=str(dataset),
                identifier=str(graph.value(dataset, DCTERMS.identifier) or dataset),
                title=str(graph.value(dataset, DCTERMS.title) or ""),
                node=str(graph.value(dataset, NODE) or ""),
            )
        )
    return sorted(found, key=lambda d: (d.node, d.title, d.iri))
