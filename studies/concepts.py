"""Concept sets resolved on the node, against the node's own vocabulary (concept_ancestor).

The study lists concept ids; which concepts they expand to depends on the vocabulary at each node,
so resolution happens where the data is. The result is the temp table ``study_codeset(codeset_id,
concept_id)`` that cohort SQL joins on: concept ids reach SQL only as rows of that table.
"""

from __future__ import annotations

import duckdb

from studies.model import ConceptSet


class ConceptSetError(ValueError):
    """A concept set that names concept ids the node's vocabulary does not hold."""


def codeset_ids(concept_sets: list[ConceptSet]) -> dict[str, int]:
    """Concept set name -> codeset_id in ``study_codeset`` (1-based, in study order)."""
    return {concept_set.name: i for i, concept_set in enumerate(concept_sets, start=1)}


def resolve_concept_sets(con: duckdb.DuckDBPyConnection, concept_sets: list[ConceptSet]) -> None:
    """Create temp table ``study_codeset`` from the study's concept sets.

    Each listed concept, plus its descendants when ``include_descendants``, minus the excludes
    (expanded the same way). Raises ``ConceptSetError`` naming each set with unknown concept ids.
    """
    check_known_concepts(con, {cs.name: cs.concepts + cs.excludes for cs in concept_sets})
    ids = codeset_ids(concept_sets)
    rows = [
        (ids[cs.name], concept_id, excluded, cs.include_descendants)
        for cs in concept_sets
        for excluded, concepts in ((False, cs.concepts), (True, cs.excludes))
        for concept_id in concepts
    ]
    con.execute(
        "CREATE OR REPLACE TEMP TABLE study_concept_input ("
        "codeset_id INTEGER, concept_id BIGINT, excluded BOOLEAN, descendants BOOLEAN)"
    )
    if rows:
        con.executemany("INSERT INTO study_concept_input VALUES (?, ?, ?, ?)", rows)
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE study_codeset AS
        WITH expanded AS (
            SELECT codeset_id, excluded, concept_id FROM study_concept_input
            UNION
            SELECT i.codeset_id, i.excluded, a.descendant_concept_id
            FROM study_concept_input i
            JOIN concept_ancestor a ON a.ancestor_concept_id = i.concept_id
            WHERE i.descendants
        )
        SELECT codeset_id, concept_id FROM expanded WHERE NOT excluded
        EXCEPT
        SELECT codeset_id, concept_id FROM expanded WHERE excluded
        """
    )
    con.execute("DROP TABLE study_concept_input")


def check_known_concepts(con: duckdb.DuckDBPyConnection, sets: dict[str, list[int]]) -> None:
    """Raise ``ConceptSetError`` naming every set whose ids this node's concept table lacks."""
    names = [name for name, ids in sets.items() for _ in ids]
    ids = [concept_id for concept_ids in sets.values() for concept_id in concept_ids]
    unknown = con.execute(
        """
        SELECT s.name, list(DISTINCT s.concept_id ORDER BY s.concept_id)
        FROM (SELECT unnest(?::VARCHAR[]) AS name, unnest(?::BIGINT[]) AS concept_id) s
        WHERE s.concept_id NOT IN (SELECT concept_id FROM concept)
        GROUP BY s.name ORDER BY s.name
        """,
        [names, ids],
    ).fetchall()
    if unknown:
        raise ConceptSetError(
            "; ".join(
                f"concept set {name!r}: unknown concept id(s) {missing} "
                "(not in this node's concept table)"
                for name, missing in unknown
            )
        )
