"""HealthDCAT-AP: a node's dataset description, its disclosure control, the coordinator's catalogue.

Descriptions come from the real command (``fedomop node describe``) on real DuckDB CDMs (GiBleed,
the generated analysis nodes, small CDMs built here) and are validated with pyshacl against the
DCAT-AP 3 SHACL in ../shared and the HealthDCAT-AP shapes fedomop ships.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest
from rdflib import Graph, Literal, URIRef
from rdflib import namespace as ns
from typer.testing import CliRunner

from fedomop.cli import app
from node.audit import AuditLog
from node.catalogue import DESCRIPTION_ANALYSIS, RECORD_TABLES
from node.policy import PolicyError, load_policy
from studies import dcat
from studies.canonical import study_hash
from studies.loading import load_study
from studies.permit import PermitAnalysis, generate_keypair, load_private_key
from tests._helpers import signed_permit, write_node_policy
from tests.conftest import ANALYSIS_CDM_DDL, SHARED

REPO = Path(__file__).resolve().parents[1]
DCAT_AP_SHACL = SHARED / "data" / "dcat-ap-3" / "dcat-ap-SHACL.ttl"
CATALOGUE_SECTION = (REPO / "examples" / "node.toml").read_text().split("[catalogue]", 1)[1]
H = dcat.HEALTH
runner = CliRunner()


def _invoke(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _node(folder: Path, cdm: Path, name: str = "node-a", min_cell: int = 10) -> Path:
    """A node policy for ``cdm`` with the example's [catalogue] text, its own dataset IRI."""
    _, public, _ = generate_keypair(folder / "keys", "permit_body")
    policy = write_node_policy(
        folder,
        name=name,
        cdm=cdm,
        permit_body_key=public,
        privacy={"min_cell_count": min_cell},
        allowed=["counts"],
    )
    section = CATALOGUE_SECTION.replace("hospital-a-omop", f"{name}-omop")
    policy.write_text(policy.read_text() + "\n[catalogue]" + section)
    return policy


def _describe(folder: Path, cdm: Path, **node: object) -> Graph:
    """Run ``fedomop node describe`` and return the Turtle it wrote, checked against the JSON-LD."""
    code, out = _invoke(
        "node", "describe", "--policy", _node(folder, cdm, **node), "--out", folder / "out"
    )
    assert code == 0, out
    turtle = dcat.read_description(folder / "out" / "dataset.ttl")
    jsonld = dcat.read_description(folder / "out" / "dataset.jsonld")
    from rdflib.compare import isomorphic

    assert isomorphic(turtle, jsonld)
    return turtle


def _dataset(graph: Graph) -> URIRef:
    (dataset,) = graph.subjects(ns.RDF.type, ns.DCAT.Dataset)
    return dataset


def _number(graph: Graph, prop: URIRef) -> int | None:
    value = graph.value(_dataset(graph), prop)
    return None if value is None else int(value)


def _small_cdm(
    path: Path,
    ages: list[int],
    *,
    obs_years: list[tuple[int, int]] | None = None,
    icd10_persons: int = 0,
) -> Path:
    """A CDM whose persons have these ages at the end of observation (2020 unless ``obs_years``);
    every person has a SNOMED condition, the first ``icd10_persons`` an ICD10 source code."""
    con = duckdb.connect(str(path))
    con.execute(ANALYSIS_CDM_DDL)
    years = obs_years or [(2010, 2020)] * len(ages)
    for pid, (age, (start, end)) in enumerate(zip(ages, years, strict=True), start=1):
        con.execute("INSERT INTO person VALUES (?, 8507, ?, 1, 1, NULL)", [pid, end - age])
        con.execute(
            "INSERT INTO observation_period VALUES (?, ?, make_date(?, 1, 1), make_date(?, 6, 30), 32817)",
            [pid, pid, start, end],
        )
        con.execute(
            "INSERT INTO condition_occurrence VALUES (?, ?, 201826, DATE '2015-03-01', NULL)",
            [pid, pid],
        )
    con.execute("ALTER TABLE condition_occurrence ADD COLUMN condition_source_concept_id INTEGER")
    con.execute(
        f"UPDATE condition_occurrence SET condition_source_concept_id = 45576876 WHERE person_id <= {icd10_persons}"
    )
    con.execute(
        """INSERT INTO concept VALUES
        (201826, 'Type 2 diabetes mellitus', 'Condition', 'SNOMED', 'Clinical Finding', 'S', '44054006'),
        (45576876, 'Type 2 diabetes mellitus', 'Condition', 'ICD10', 'ICD10 code', NULL, 'E11')"""
    )
    con.close()
    return path


# --- a real node conforms, and its numbers are the protected ones -------------------------------


def test_gibleed_description_conforms_and_publishes_protected_numbers(
    tmp_path: Path, gibleed_db: Path
) -> None:
    graph = _describe(tmp_path, gibleed_db)
    assert dcat.validate(graph, [DCAT_AP_SHACL]) == []
    ds = _dataset(graph)
    con = duckdb.connect(str(gibleed_db), read_only=True)
    persons = con.execute("SELECT count(*) FROM person").fetchone()[0]
    records = sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in RECORD_TABLES)
    ages = con.execute(
        """SELECT year(max(observation_period_end_date)) - any_value(year_of_birth)
           FROM person JOIN observation_period USING (person_id) GROUP BY person_id"""
    ).fetchnumpy()
    ages = next(iter(ages.values()))
    con.close()
    assert persons == 2694
    assert _number(graph, H.numberOfUniqueIndividuals) == 2690  # rounded to the cell count
    assert _number(graph, H.numberOfRecords) == math.floor(records / 10 + 0.5) * 10
    low = np.quantile(ages, 0.05, method="inverted_cdf")
    high = np.quantile(ages, 0.95, method="inverted_cdf")
    assert _number(graph, H.minTypicalAge) == (low // 5) * 5
    assert _number(graph, H.maxTypicalAge) == -(-high // 5) * 5
    assert _number(graph, H.minTypicalAge) > ages.min()
    assert _number(graph, H.maxTypicalAge) < ages.max()
    systems = {str(s).rsplit("/", 1)[1] for s in graph.objects(ds, H.hasCodingSystem)}
    assert {"SNOMED-CT", "RXNORM", "OHDSI-VOCAB"} <= systems
    assert graph.value(ds, ns.DCTERMS.accessRights) == dcat.NON_PUBLIC
    assert graph.value(ds, dcat.DCATAP.applicableLegislation) == dcat.EHDS_REGULATION
    assert set(graph.objects(ds, ns.DCTERMS.conformsTo)) == {
        dcat.OMOP_CDM_STANDARD,
        dcat.OMOP_CDM_54,
    }
    service = graph.value(graph.value(ds, ns.DCAT.distribution), ns.DCAT.accessService)
    assert (service, ns.RDF.type, ns.DCAT.DataService) in graph
    assert graph.value(ds, dcat.DPV.hasPurpose) == dcat.DPV.ScientificResearch
    tables = {str(graph.value(t, ns.DCTERMS.title)) for t in graph.objects(None, ns.CSVW.table)}
    assert {"person", "observation_period", "condition_occurrence", "drug_exposure"} <= tables
    # audited as a release, with the hash of what was written
    entry = AuditLog(tmp_path / "audit.jsonl").entries()[-1]
    ttl = (tmp_path / "out" / "dataset.ttl").read_bytes()
    jsonld = (tmp_path / "out" / "dataset.jsonld").read_bytes()
    assert entry["verdict"] == "released" and entry["analysis_id"] == DESCRIPTION_ANALYSIS
    assert entry["payload_sha256"] == hashlib.sha256(ttl).hexdigest()
    assert entry["payload_files"]["dataset.jsonld"] == hashlib.sha256(jsonld).hexdigest()
    assert AuditLog(tmp_path / "audit.jsonl").verify() == []


def test_generated_node_conforms(tmp_path: Path, analysis_node_dbs: dict) -> None:
    graph = _describe(tmp_path, analysis_node_dbs["nodes"][0])
    assert dcat.validate(graph, [DCAT_AP_SHACL]) == []
    assert _number(graph, H.numberOfUniqueIndividuals) == 700
    # its test vocabulary is no HealthDCAT-AP coding system: only the OMOP vocabulary is named
    assert set(graph.objects(_dataset(graph), H.hasCodingSystem)) == {dcat.OHDSI_VOCABULARY}


# --- the shapes report what is missing or mistyped ----------------------------------------------


@pytest.fixture(scope="module")
def conformant(tmp_path_factory: pytest.TempPathFactory, analysis_node_dbs: dict) -> Graph:
    return _describe(
        tmp_path_factory.mktemp("shapes"), analysis_node_dbs["nodes"][1], name="node-b"
    )


@pytest.mark.parametrize(
    "prop",
    [H.hdab, H.healthCategory, H.hasStructuredData, dcat.DPV.hasPurpose, ns.DCTERMS.accessRights],
)
def test_missing_mandatory_property_is_reported(conformant: Graph, prop: URIRef) -> None:
    graph = Graph() + conformant
    graph.remove((_dataset(graph), prop, None))
    violations = dcat.validate(graph)
    assert [(v.path, v.constraint) for v in violations] == [
        (graph.namespace_manager.normalizeUri(prop), "sh:MinCountConstraintComponent")
    ]


@pytest.mark.parametrize(
    ("prop", "wrong"),
    [
        (H.numberOfUniqueIndividuals, Literal("500", datatype=ns.XSD.string)),
        (H.numberOfRecords, Literal(-3, datatype=ns.XSD.integer)),
        (H.minTypicalAge, Literal(35.5)),
        (H.hasStructuredData, Literal("yes")),
    ],
)
def test_wrong_datatype_is_reported(conformant: Graph, prop: URIRef, wrong: Literal) -> None:
    graph = Graph() + conformant
    graph.set((_dataset(graph), prop, wrong))
    violations = dcat.validate(graph)
    assert (graph.namespace_manager.normalizeUri(prop), "sh:DatatypeConstraintComponent") in [
        (v.path, v.constraint) for v in violations
    ]


def test_structured_data_without_variables_is_reported(conformant: Graph) -> None:
    graph = Graph() + conformant
    graph.remove((_dataset(graph), H.hasVariables, None))
    (violation,) = dcat.validate(graph)
    assert violation.constraint == "sh:OrConstraintComponent"
    assert "healthdcatap:hasVariables" in violation.message
    graph.set((_dataset(graph), H.hasStructuredData, Literal(False)))
    assert dcat.validate(graph) == []


def test_min_age_above_max_age_is_reported(conformant: Graph) -> None:
    graph = Graph() + conformant
    graph.set((_dataset(graph), H.minTypicalAge, Literal(95, datatype=ns.XSD.nonNegativeInteger)))
    (violation,) = dcat.validate(graph)
    assert violation.constraint == "sh:LessThanOrEqualsConstraintComponent"


def test_hdab_without_contact_point_is_reported(conformant: Graph) -> None:
    graph = Graph() + conformant
    hdab = graph.value(_dataset(graph), H.hdab)
    graph.remove((hdab, dcat.CV.contactPoint, None))
    (violation,) = dcat.validate(graph)
    assert violation.path == "healthdcatap:hdab"
    assert violation.constraint == "sh:NodeConstraintComponent"
    assert "the agent has exactly one cv:contactPoint" in violation.message


# --- disclosure control: what a small node, an outlier or a rare code give away ----------------


def _integers(graph: Graph) -> list[int]:
    return [
        int(o)
        for o in graph.objects()
        if isinstance(o, Literal) and o.datatype == ns.XSD.nonNegativeInteger
    ]


def test_node_below_min_cell_publishes_no_count_and_no_age(tmp_path: Path) -> None:
    graph = _describe(tmp_path, _small_cdm(tmp_path / "tiny.duckdb", [30, 41, 52, 63, 74, 85, 96]))
    assert dcat.validate(graph, [DCAT_AP_SHACL]) == []
    assert _number(graph, H.numberOfUniqueIndividuals) is None
    assert _number(graph, H.numberOfRecords) is None  # 7 condition rows
    assert _number(graph, H.minTypicalAge) is None and _number(graph, H.maxTypicalAge) is None
    assert graph.value(_dataset(graph), ns.DCTERMS.temporal) is None  # 7 persons a year
    assert all(n >= 10 for n in _integers(graph))


def test_counts_are_rounded_at_the_policy_cell_count(tmp_path: Path) -> None:
    graph = _describe(tmp_path, _small_cdm(tmp_path / "c.duckdb", [50] * 35), min_cell=20)
    assert _number(graph, H.numberOfUniqueIndividuals) == 40  # 35 -> nearest multiple of 20
    assert _number(graph, H.minTypicalAge) is None  # 35 < two cells of 20: no percentiles


def test_typical_ages_hide_an_outlier(tmp_path: Path) -> None:
    """Attack: read the oldest person's age from maxTypicalAge, or from the difference between
    the descriptions with and without them."""
    rng = np.random.default_rng(7)
    ages = [int(a) for a in rng.integers(40, 61, 200)]
    without = _describe(tmp_path / "a", _small_cdm(tmp_path / "a.duckdb", ages))
    with_outlier = _describe(tmp_path / "b", _small_cdm(tmp_path / "b.duckdb", [*ages, 101]))
    for graph in (without, with_outlier):
        assert _number(graph, H.maxTypicalAge) <= 65 and _number(graph, H.minTypicalAge) >= 40
        assert 101 not in _integers(graph)
    for prop in (H.minTypicalAge, H.maxTypicalAge, H.numberOfUniqueIndividuals):
        assert _number(without, prop) == _number(with_outlier, prop)


def test_temporal_coverage_and_coding_systems_hide_a_small_group(tmp_path: Path) -> None:
    """Attack: learn that someone was observed in 1950, or that a few persons carry ICD-10 codes."""
    years = [(1950, 2020)] * 3 + [(2005, 2020)] * 40
    cdm = _small_cdm(tmp_path / "c.duckdb", [60] * 43, obs_years=years, icd10_persons=3)
    graph = _describe(tmp_path, cdm)
    period = graph.value(_dataset(graph), ns.DCTERMS.temporal)
    assert str(graph.value(period, ns.DCAT.startDate)) == "2005-01-01"
    systems = set(graph.objects(_dataset(graph), H.hasCodingSystem))
    assert dcat.coding_system("ICD-10") not in systems
    assert dcat.coding_system("SNOMED-CT") in systems
    many = _describe(tmp_path / "m", _small_cdm(tmp_path / "m.duckdb", [60] * 43, icd10_persons=12))
    assert dcat.coding_system("ICD-10") in set(many.objects(_dataset(many), H.hasCodingSystem))


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ('health_categories = ["EHRS"]', 'health_categories = ["EHR"]'),
            "unknown health category",
        ),
        (("retention_end = 2034-12-31", "retention_end = 2020-12-31"), "retention_end is before"),
        (('purposes = ["ScientificResearch"]', 'purposes = ["Marketing"]'), "unknown DPV purpose"),
        (('country = "BEL"', 'country = "Belgium"'), "catalogue.country"),
        (
            ('email = "permits@hdab.example.org"\nhomepage = "https://hdab.example.org"', ""),
            "catalogue.hdab",
        ),
    ],
)
def test_bad_catalogue_section_names_the_field(
    tmp_path: Path, gibleed_db: Path, edit: tuple[str, str], message: str
) -> None:
    policy = _node(tmp_path, gibleed_db)
    text = policy.read_text()
    assert edit[0] in text
    policy.write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(PolicyError, match=message):
        load_policy(policy)
    code, out = _invoke("node", "describe", "--policy", policy, "--out", tmp_path / "out")
    assert code == 1 and message in out and not (tmp_path / "out").exists()


def test_unreadable_cdm_is_refused_and_nothing_written(tmp_path: Path) -> None:
    cdm = tmp_path / "not-a-cdm.duckdb"
    with duckdb.connect(str(cdm)) as con:
        con.execute("CREATE TABLE patients (id INTEGER)")
    code, out = _invoke(
        "node", "describe", "--policy", _node(tmp_path, cdm), "--out", tmp_path / "out"
    )
    assert code == 1 and "cannot read CDM" in out and "person" in out
    assert not (tmp_path / "out").exists()


def test_policy_without_catalogue_section_is_refused(tmp_path: Path, gibleed_db: Path) -> None:
    policy = _node(tmp_path, gibleed_db)
    policy.write_text(policy.read_text().split("\n[catalogue]")[0])
    code, out = _invoke("node", "describe", "--policy", policy, "--out", tmp_path / "out")
    assert code == 1 and "no [catalogue] section" in out
    assert AuditLog(tmp_path / "audit.jsonl").entries() == []


# --- the coordinator's catalogue and the study render -------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, analysis_node_dbs: dict) -> list[Path]:
    folder = tmp_path_factory.mktemp("catalogue")
    for i, name in enumerate(("node-a", "node-b")):
        _describe(folder / name, analysis_node_dbs["nodes"][i], name=name)
    return [folder / "node-a" / "out" / "dataset.ttl", folder / "node-b" / "out" / "dataset.jsonld"]


def _catalogue(out: Path, *nodes: Path) -> tuple[int, str]:
    return _invoke(
        "coordinator", "catalogue", *nodes, "--out", out, "--publisher", "National access point",
        "--publisher-email", "nap@example.org", "--shapes", DCAT_AP_SHACL,
    )  # fmt: skip


def test_catalogue_merges_descriptions_and_conforms(tmp_path: Path, two_nodes: list[Path]) -> None:
    code, out = _catalogue(tmp_path / "catalogue.ttl", *two_nodes)
    assert code == 0, out
    graph = dcat.read_description(tmp_path / "catalogue.ttl")
    assert dcat.validate(graph, [DCAT_AP_SHACL]) == []
    (catalog,) = graph.subjects(ns.RDF.type, ns.DCAT.Catalog)
    datasets = set(graph.objects(catalog, ns.DCAT.dataset))
    assert {str(d).rsplit("/", 1)[1] for d in datasets} == {"node-a-omop", "node-b-omop"}
    assert len(set(graph.objects(catalog, ns.DCAT.service))) == 2
    assert sorted(d.node for d in dcat.catalogue_datasets(graph)) == ["node-a", "node-b"]
    assert {_number_of(graph, d) for d in datasets} == {700, 500}


def _number_of(graph: Graph, dataset: URIRef) -> int:
    return int(graph.value(dataset, H.numberOfUniqueIndividuals))


def test_catalogue_refuses_duplicates_and_nonconformant_descriptions(
    tmp_path: Path, two_nodes: list[Path]
) -> None:
    out = tmp_path / "catalogue.ttl"
    code, message = _catalogue(out, two_nodes[0], two_nodes[0])
    assert code == 1 and "already described by" in message and not out.exists()
    broken = dcat.read_description(two_nodes[1])
    broken.remove((_dataset(broken), H.hdab, None))
    broken.serialize(tmp_path / "broken.ttl", format="turtle")
    code, message = _catalogue(out, two_nodes[0], tmp_path / "broken.ttl")
    assert code == 1 and "broken.ttl" in message and "healthdcatap:hdab" in message
    (tmp_path / "garbage.ttl").write_text("this is not turtle <")
    code, message = _catalogue(out, tmp_path / "garbage.ttl")
    assert code == 1 and "not a readable" in message and not out.exists()


def test_study_render_links_catalogue_datasets(tmp_path: Path, two_nodes: list[Path]) -> None:
    import json

    _catalogue(tmp_path / "catalogue.ttl", *two_nodes)
    study = REPO / "examples" / "gibleed_glm" / "study.yaml"
    code, out = _invoke("study", "render", study, "--catalogue", tmp_path / "catalogue.ttl")
    assert code == 0, out
    assert "Candidate datasets" in out
    assert "node-a-omop] at node node-a" in out and "node-b-omop] at node node-b" in out
    private, _, _ = generate_keypair(tmp_path / "body", "permit_body")
    permit = signed_permit(
        load_private_key(private),
        study_hash=study_hash(load_study(study)),
        nodes=["node-b", "node-c"],
        analyses=[PermitAnalysis(id="bleed_risk")],
        epsilon=1.0,
    )
    (tmp_path / "permit.json").write_text(json.dumps(permit))
    code, out = _invoke(
        "study", "render", study, "--catalogue", tmp_path / "catalogue.ttl",
        "--permit", tmp_path / "permit.json",
    )  # fmt: skip
    assert code == 0, out
    assert "node-b-omop] at node node-b" in out and "node-a-omop" not in out
    assert "no catalogue dataset for node(s): node-c" in out
    code, out = _invoke("study", "render", study, "--permit", tmp_path / "permit.json")
    assert code == 1 and "only used with --catalogue" in out
    code, out = _invoke("study", "render", study, "--catalogue", tmp_path / "permit.json")
    assert code == 1 and "not a readable catalogue" in out


def test_round_counts_rounds_released_counts_only() -> None:
    import polars as pl

    from privacy.disclosure import round_counts
    from studies.statistics import make_statistics

    stats = make_statistics(
        pl.DataFrame(
            {
                "variable_name": ["a", "b", "c", "d", "e"],
                "estimate_name": ["n", "n", "n", "n", "mean"],
                "release_class": ["count", "count", "count", "count", "value"],
                "value": [10.0, 14.0, 15.0, float("nan"), 14.0],
            }
        )
    )
    out = round_counts(stats, 10)["value"].to_list()
    assert out[:3] == [10.0, 10.0, 20.0] and math.isnan(out[3]) and out[4] == 14.0
    with pytest.raises(ValueError, match="at least 1"):
        round_counts(stats, 0)


def test_missing_cdm_is_refused_not_created(tmp_path: Path) -> None:
    cdm = tmp_path / "absent.duckdb"
    code, out = _invoke(
        "node", "describe", "--policy", _node(tmp_path, cdm), "--out", tmp_path / "out"
    )
    assert code == 1 and "does not exist" in out and "Traceback" not in out
    assert not cdm.exists() and not (tmp_path / "out").exists()
