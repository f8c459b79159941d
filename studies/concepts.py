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


def expansion_warnings(con: duckdb.DuckDBPyConnection, concept_sets: list[ConceptSet]) -> list[str]:
    """One line per concept set whose descendant expansion on this node is incomplete.

    After ``resolve_concept_sets``: a set with descendants misses a concept the node's data
    records when concept_relationship places it under one of the set's concepts (a
    defines_ancestry relationship, e.g. "RxNorm ing of") but concept_ancestor lacks the link,
    as in an export whose own CONCEPT table was completed with another vocabulary's
    CONCEPT_ANCESTOR. These lines are for the node operator's log: they name concepts of the
    node's data, so they never go into a reply.
    """
    from omop_etl.ancestry import missing_links

    wanted = [cs for cs in concept_sets if cs.include_descendants and cs.concepts]
    if not wanted:
        return []
    if not con.execute("SELECT count(*) FROM concept_ancestor").fetchone()[0]:
        return [
            f"concept set {cs.name!r}: concept_ancestor is empty, so it matches only the "
            f"concepts it lists (rebuild it: fedomop etl vocab --db FILE --derive-ancestors)"
            for cs in wanted
        ]
    if not missing_links(con, "_study_missing_ancestry"):
        return []
    ids = codeset_ids(concept_sets)
    names = [cs.name for cs in wanted for _ in cs.concepts + cs.excludes]
    rows = [
        (ids[cs.name], concept_id, excluded)
        for cs in wanted
        for excluded, concepts in ((False, cs.concepts), (True, cs.excludes))
        for concept_id in concepts
    ]
    found = con.execute(
        """WITH listed AS (
            SELECT unnest(?::INTEGER[]) AS codeset_id, unnest(?::BIGINT[]) AS concept_id,
                   unnest(?::BOOLEAN[]) AS excluded, unnest(?::VARCHAR[]) AS name),
        reached AS (
            SELECT l.name, l.codeset_id, l.excluded, m.descendant AS concept_id
            FROM listed l JOIN _study_missing_ancestry m ON m.ancestor = l.concept_id)
        SELECT name, list(DISTINCT r.concept_id ORDER BY r.concept_id) FROM reached r
        WHERE NOT r.excluded
          AND r.concept_id NOT IN (SELECT concept_id FROM study_codeset c
                                   WHERE c.codeset_id = r.codeset_id)
          AND r.concept_id NOT IN (SELECT concept_id FROM reached x
                                   WHERE x.excluded AND x.codeset_id = r.codeset_id)
          AND r.concept_id NOT IN (SELECT concept_id FROM listed x
                                   WHERE x.excluded AND x.codeset_id = r.codeset_id)
        GROUP BY name ORDER BY name""",
        [[r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], names],
    ).fetchall()
    con.execute("DROP TABLE _study_missing_ancestry")
    return [
        f"concept set {name!r}: misses {len(missing)} concept(s) recorded in this node's data "
        f"that concept_relationship places under its concepts but concept_ancestor does not: "
        f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''} (rebuild "
        "concept_ancestor: fedomop etl vocab --db FILE --derive-ancestors)"
        for name, missing in found
    ]
