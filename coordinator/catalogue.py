"""A national access point's catalogue: the nodes' HealthDCAT-AP descriptions in one dcat:Catalog.

``fedomop coordinator catalogue NODES... --out catalogue.ttl`` reads each node's description
(Turtle or JSON-LD, as ``fedomop node describe`` writes it), checks each conforms on its own,
refuses two descriptions of the same dataset, and adds a ``dcat:Catalog`` that lists every
dataset and access service, published by the coordinator's organisation under the EHDS. The
merged graph is validated the same way before it is written. Nothing is computed here: every
number in the catalogue is one a node released.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from rdflib import BNode, Graph, Literal, URIRef
from rdflib.exceptions import ParserError
from rdflib.namespace import DCAT, DCTERMS, FOAF, RDF, XSD

from studies import dcat


class CatalogueError(ValueError):
    """A description that cannot join the catalogue, or a catalogue that does not conform."""


@dataclass(frozen=True)
class CatalogueText:
    """The coordinator's text for the catalogue record."""

    title: str
    description: str
    publisher: str
    publisher_email: str
    iri: str | None = None
    language: str = "en"


def read_node_description(path: Path, extra_shapes: list[Path] = ()) -> Graph:
    """One node's description, parsed and validated; ``CatalogueError`` names what is wrong."""
    try:
        graph = dcat.read_description(path)
    except (OSError, ParserError, ValueError, SyntaxError) as err:
        raise CatalogueError(
            f"{path}: not a readable Turtle or JSON-LD description: {err}"
        ) from err
    datasets = list(graph.subjects(RDF.type, DCAT.Dataset))
    if not datasets:
        raise CatalogueError(f"{path}: describes no dcat:Dataset")
    violations = dcat.validate(graph, list(extra_shapes))
    if violations:
        raise CatalogueError(
            f"{path}: does not conform to HealthDCAT-AP: " + "; ".join(map(str, violations))
        )
    return graph


def merge(
    paths: list[Path], text: CatalogueText, today: date, extra_shapes: list[Path] = ()
) -> Graph:
    """The catalogue graph: every description plus a ``dcat:Catalog`` listing their datasets."""
    catalogue = dcat.new_graph()
    seen: dict[URIRef, Path] = {}
    for path in paths:
        graph = read_node_description(path, extra_shapes)
        for dataset in graph.subjects(RDF.type, DCAT.Dataset):
            if dataset in seen:
                raise CatalogueError(
                    f"{path}: dataset {dataset} is already described by {seen[dataset]}"
                )
            seen[dataset] = path
        catalogue += graph
    root = URIRef(text.iri or _catalogue_iri(sorted(seen)))
    _catalogue_record(catalogue, root, text, today, sorted(seen))
    violations = dcat.validate(catalogue, list(extra_shapes))
    if violations:
        raise CatalogueError(
            "the merged catalogue does not conform: " + "; ".join(map(str, violations))
        )
    return catalogue


def _catalogue_iri(datasets: list[URIRef]) -> str:
    """A stable IRI for a catalogue of these datasets when the coordinator gives none."""
    digest = hashlib.sha256("\n".join(map(str, datasets)).encode()).hexdigest()[:16]
    return f"urn:fedomop:catalogue:{digest}"


def _catalogue_record(
    g: Graph, root: URIRef, text: CatalogueText, today: date, datasets: list[URIRef]
) -> None:
    lang = text.language
    g.add((root, RDF.type, DCAT.Catalog))
    g.add((root, DCTERMS.title, Literal(text.title, lang=lang)))
    g.add((root, DCTERMS.description, Literal(text.description, lang=lang)))
    g.add((root, DCTERMS.modified, Literal(today, datatype=XSD.date)))
    g.add((root, dcat.DCATAP.applicableLegislation, dcat.EHDS_REGULATION))
    g.add((dcat.EHDS_REGULATION, RDF.type, dcat.ELI.LegalResource))
    publisher, contact = BNode(), BNode()
    g.add((root, DCTERMS.publisher, publisher))
    g.add((publisher, RDF.type, FOAF.Agent))
    g.add((publisher, FOAF.name, Literal(text.publisher)))
    g.add((publisher, FOAF.mbox, URIRef(f"mailto:{text.publisher_email}")))
    g.add((publisher, dcat.CV.contactPoint, contact))
    g.add((contact, RDF.type, dcat.CV.ContactPoint))
    g.add((contact, dcat.CV.email, Literal(text.publisher_email)))
    for dataset in datasets:
        g.add((root, DCAT.dataset, dataset))
    for service in sorted(set(g.subjects(RDF.type, DCAT.DataService))):
        g.add((root, DCAT.service, service))


def write_catalogue(graph: Graph, out: Path) -> None:
    """Write Turtle, or JSON-LD when ``out`` ends in .jsonld; replace the file only when done."""
    fmt = "json-ld" if out.suffix.lower() in {".jsonld", ".json"} else "turtle"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(graph.serialize(format=fmt), encoding="utf-8")
    os.replace(tmp, out)
