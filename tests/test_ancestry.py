"""CONCEPT_ANCESTOR: derived as Athena does, and incomplete descendant expansions reported to the
operator (load report, node log), never in a reply.

The vocabulary is built here: an ATC class (1) over two ingredients (2 ibuprofen, 7 naproxen);
ibuprofen is the ingredient of a clinical drug (3), which has a branded form (4, "Has tradename":
not hierarchical, no level). Class 1 also subsumes 3 directly, so 1 -> 3 is one level or two.
What Athena leaves out is here too: a non-standard concept (5), an invalid one (6), an invalid
relationship (7 -> 3) and a relationship that defines no ancestry ("Maps to" 5 -> 3).
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import pytest
from _helpers import signed_permit, write_node_policy
from typer.testing import CliRunner

from fedomop.cli import app
from node.gate import Gate
from node.messages import GateRequest
from node.policy import load_policy
from omop_etl.ancestry import ancestry_notes, derive_concept_ancestor, missing_links
from omop_etl.load import load_omop_csv
from omop_etl.schema import create_cdm_schema
from studies.canonical import study_hash
from studies.concepts import expansion_warnings, resolve_concept_sets
from studies.loading import study_from_data
from studies.model import ConceptSet
from studies.permit import PermitAnalysis, generate_keypair, load_private_key

CONCEPTS = [  # id, name, class, standard, invalid
    (1, "NSAIDs", "ATC 4th", "C", None),
    (2, "ibuprofen", "Ingredient", "S", None),
    (3, "ibuprofen 200 MG Oral Tablet", "Clinical Drug", "S", None),
    (4, "Advil 200 MG Oral Tablet", "Branded Drug", "S", None),
    (5, "ibuprofen (local code)", "Ingredient", None, None),
    (6, "ibuprofen 100 MG (retired)", "Clinical Drug", "S", "D"),
    (7, "naproxen", "Ingredient", "S", None),
]
RELATIONSHIPS = [  # id, is_hierarchical, defines_ancestry
    ("Subsumes", "1", "1"),
    ("RxNorm ing of", "1", "1"),
    ("Has tradename", "0", "1"),
    ("Maps to", "0", "0"),
]
CONCEPT_RELATIONSHIPS = [  # concept_id_1, concept_id_2, relationship, invalid
    (1, 2, "Subsumes", None),
    (1, 7, "Subsumes", None),
    (1, 3, "Subsumes", None),
    (2, 3, "RxNorm ing of", None),
    (3, 4, "Has tradename", None),
    (2, 5, "RxNorm ing of", None),
    (2, 6, "RxNorm ing of", None),
    (7, 3, "RxNorm ing of", "D"),
    (5, 3, "Maps to", None),
]
#: What Athena's derivation gives: (ancestor, descendant, min levels, max levels).
DERIVED = [
    (1, 1, 0, 0), (1, 2, 1, 1), (1, 3, 1, 2), (1, 4, 1, 2), (1, 7, 1, 1),
    (2, 2, 0, 0), (2, 3, 1, 1), (2, 4, 1, 1),
    (3, 3, 0, 0), (3, 4, 0, 0),
    (4, 4, 0, 0),
    (7, 7, 0, 0),
]  # fmt: skip
#: An ancestor table completed from another vocabulary: 1 -> 3 and everything under 4 missing.
INCOMPLETE = [row for row in DERIVED if row[:2] in {(1, 2), (2, 3), (1, 7)} or row[0] == row[1]]
DRUGS = {1: 3, 2: 4, 3: 7}  # person -> drug concept recorded


def _vocabulary_cdm(path: Path, ancestors: list[tuple[int, int, int, int]]) -> Path:
    """A CDM file with the module's vocabulary, ``ancestors`` as concept_ancestor and three
    persons, one drug exposure each (``DRUGS``)."""
    con = duckdb.connect(str(path))
    create_cdm_schema(con, indexes=False)
    con.executemany(
        "INSERT INTO concept VALUES (?, ?, 'Drug', 'RxNorm', ?, ?, ?, DATE '1970-01-01', "
        "DATE '2099-12-31', ?)",
        [(i, name, cls, std, f"c{i}", inv) for i, name, cls, std, inv in CONCEPTS],
    )
    con.executemany(
        "INSERT INTO relationship VALUES (?, ?, ?, ?, ?, 0)",
        [(r, r, hier, anc, r) for r, hier, anc in RELATIONSHIPS],
    )
    con.executemany(
        "INSERT INTO concept_relationship VALUES (?, ?, ?, DATE '1970-01-01', "
        "DATE '2099-12-31', ?)",
        CONCEPT_RELATIONSHIPS,
    )
    if ancestors:
        con.executemany("INSERT INTO concept_ancestor VALUES (?, ?, ?, ?)", ancestors)
    for person, drug in DRUGS.items():
        con.execute(
            "INSERT INTO person (person_id, gender_concept_id, year_of_birth, race_concept_id, "
            "ethnicity_concept_id) VALUES (?, 8532, 1960, 0, 0)",
            [person],
        )
        con.execute(
            "INSERT INTO observation_period VALUES (?, ?, DATE '2010-01-01', DATE '2020-12-31', "
            "32817)",
            [person, person],
        )
        con.execute(
            "INSERT INTO drug_exposure (drug_exposure_id, person_id, drug_concept_id, "
            "drug_exposure_start_date, drug_exposure_end_date, drug_type_concept_id) "
            "VALUES (?, ?, ?, DATE '2015-01-01', DATE '2015-01-10', 32817)",
            [person, person, drug],
        )
    con.close()
    return path


def _ancestors(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    return con.execute("SELECT * FROM concept_ancestor ORDER BY ALL").fetchall()


def test_derived_ancestors_are_athenas_closure_with_levels(tmp_path: Path) -> None:
    con = duckdb.connect(str(_vocabulary_cdm(tmp_path / "cdm.duckdb", INCOMPLETE)))
    assert derive_concept_ancestor(con) == len(DERIVED)
    assert _ancestors(con) == DERIVED
    assert missing_links(con) == 0 and ancestry_notes(con) == []


def test_missing_links_of_the_concepts_in_the_data(tmp_path: Path) -> None:
    con = duckdb.connect(str(_vocabulary_cdm(tmp_path / "cdm.duckdb", INCOMPLETE)))
    assert missing_links(con) == 4
    assert con.execute("SELECT * FROM _missing_ancestry").fetchall() == [
        (1, 3), (1, 4), (2, 4), (3, 4),
    ]  # fmt: skip
    (note,) = ancestry_notes(con)
    assert "lacks 4 ancestor link(s)" in note and "for 2 concept(s) in the data (e.g. 3, 4)" in note
    assert "--derive-ancestors" in note


def test_incomplete_expansions_are_named_per_concept_set(tmp_path: Path) -> None:
    con = duckdb.connect(str(_vocabulary_cdm(tmp_path / "cdm.duckdb", INCOMPLETE)))
    sets = [
        ConceptSet(name="ibuprofen", concepts=[2], include_descendants=True),
        ConceptSet(name="nsaids", concepts=[1], include_descendants=True),
        ConceptSet(name="ibuprofen_only", concepts=[2]),
        ConceptSet(name="nsaids_not_advil", concepts=[1], include_descendants=True, excludes=[4]),
        ConceptSet(name="naproxen", concepts=[7], include_descendants=True),
    ]
    resolve_concept_sets(con, sets)
    warnings = expansion_warnings(con, sets)
    assert [w.split(":")[0] for w in warnings] == [
        "concept set 'ibuprofen'", "concept set 'nsaids'", "concept set 'nsaids_not_advil'",
    ]  # fmt: skip
    assert "misses 1 concept(s)" in warnings[0] and warnings[0].endswith(
        "does not: 4 (rebuild concept_ancestor: fedomop etl vocab --db FILE --derive-ancestors)"
    )
    assert "misses 2 concept(s)" in warnings[1] and "does not: 3, 4 " in warnings[1]
    assert "does not: 3 " in warnings[2]
    derive_concept_ancestor(con)
    resolve_concept_sets(con, sets)
    assert expansion_warnings(con, sets) == []


def test_an_empty_concept_ancestor_is_reported(tmp_path: Path) -> None:
    con = duckdb.connect(str(_vocabulary_cdm(tmp_path / "cdm.duckdb", [])))
    (note,) = ancestry_notes(con)
    assert note.startswith("concept_ancestor is empty")
    sets = [ConceptSet(name="ibuprofen", concepts=[2], include_descendants=True)]
    resolve_concept_sets(con, sets)
    (warning,) = expansion_warnings(con, sets)
    assert "concept_ancestor is empty, so it matches only the concepts it lists" in warning


def test_cli_derives_ancestors_in_place_keeping_the_data(tmp_path: Path) -> None:
    db = _vocabulary_cdm(tmp_path / "cdm.duckdb", INCOMPLETE)
    runner = CliRunner()
    result = runner.invoke(app, ["etl", "vocab", "--db", str(db), "--derive-ancestors"])
    assert result.exit_code == 0, result.output
    with duckdb.connect(str(db), read_only=True) as con:
        assert _ancestors(con) == DERIVED
        assert con.execute("SELECT count(*) FROM drug_exposure").fetchone()[0] == 3
    assert "lacks" not in result.output
    refused = runner.invoke(app, ["etl", "vocab", "--db", str(db)])
    assert refused.exit_code == 1 and "--derive-ancestors" in refused.output


def test_omop_export_without_concept_ancestor_is_reported_at_load(tmp_path: Path) -> None:
    """The issue's case: an export brings CONCEPT and CONCEPT_RELATIONSHIP but no
    CONCEPT_ANCESTOR, which then comes from the shipped GiBleed vocabulary."""
    con = duckdb.connect(str(_vocabulary_cdm(tmp_path / "source.duckdb", [])))
    export = tmp_path / "export"
    export.mkdir()
    for table in ("person", "observation_period", "drug_exposure", "concept",
                  "concept_relationship", "relationship"):  # fmt: skip
        con.execute(f"COPY {table} TO '{export / (table.upper() + '.csv')}' (HEADER)")
    con.close()
    report = load_omop_csv(export, tmp_path / "cdm.duckdb", progress=False)
    notes = [n for n in report.notes if "concept_ancestor lacks" in n]
    assert len(notes) == 1
    assert "lacks 6 ancestor link(s)" in notes[0] and "for 3 concept(s)" in notes[0]


STUDY = {
    "name": "ibuprofen_users",
    "concept_sets": [{"name": "ibuprofen", "concepts": [2], "include_descendants": True}],
    "cohorts": [{"name": "users", "entry": {"domain": "drug", "concept_set": "ibuprofen"}}],
    "analyses": [{"id": "n", "kind": "counts", "cohorts": ["users"]}],
}


def test_the_gate_logs_an_incomplete_expansion_and_never_replies_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = _vocabulary_cdm(tmp_path / "cdm.duckdb", INCOMPLETE)
    private, public, _ = generate_keypair(tmp_path / "keys", "permit_body")
    policy = write_node_policy(
        tmp_path / "node", name="node-a", cdm=db, permit_body_key=public,
        privacy={"min_cell_count": 10, "max_epsilon_per_permit": 5.0,
                 "max_epsilon_per_year": 100.0},
        allowed=["*"],
    )  # fmt: skip
    permit = signed_permit(
        load_private_key(private), study_hash=study_hash(study_from_data(STUDY)),
        study_name=STUDY["name"], nodes=["node-a"], analyses=[PermitAnalysis(id="n")],
        epsilon=1.0,
    )  # fmt: skip
    gate = Gate(load_policy(policy))
    with caplog.at_level(logging.WARNING, logger="fedomop.studies.runner"):
        reply = gate.handle(GateRequest(study=STUDY, permit=permit, analysis_id="n"))
    assert reply.released, reply.reason
    logged = [r.getMessage() for r in caplog.records if r.name == "fedomop.studies.runner"]
    assert len(logged) == 1
    assert (
        "concept set 'ibuprofen': misses 1 concept(s)" in logged[0] and "does not: 4" in logged[0]
    )
    sent = repr(reply).encode() + reply.statistics + repr(reply.settings).encode()
    assert b"concept_ancestor" not in sent and b"misses" not in sent
