"""CONCEPT_ANCESTOR as Athena derives it, and where a CDM's own CONCEPT_ANCESTOR falls short.

A concept set "with descendants" is expanded through CONCEPT_ANCESTOR. Athena derives that table
from CONCEPT_RELATIONSHIP: every relationship whose RELATIONSHIP.defines_ancestry is 1 ("Subsumes",
"RxNorm ing of", ...) is an edge from concept_id_1 (ancestor) to concept_id_2 (descendant) between
valid standard or classification concepts; the table is the transitive closure of those edges,
each pair with the fewest and the most hierarchical steps (edges whose relationship is not
hierarchical, e.g. "Has tradename", add none), plus every such concept as its own ancestor.

An export that brings its own CONCEPT table but no CONCEPT_ANCESTOR is completed from the shipped
GiBleed vocabulary (``omop_etl.load``), and its ancestor table then misses the links of concepts
GiBleed lacks: a concept set with descendants silently misses records. ``missing_links`` finds
them (the concepts the data uses that the relationships place under an ancestor that
CONCEPT_ANCESTOR does not), ``ancestry_notes`` says so in a load report, and
``derive_concept_ancestor`` rebuilds the table (``fedomop etl vocab --derive-ancestors``).
"""

from __future__ import annotations

import duckdb

from omop_etl.schema import INDEXED_CONCEPT_COLUMNS, cdm_tables
from omop_etl.sql import quote

#: Most hierarchical steps followed: stops a (broken) vocabulary whose hierarchy has a cycle.
MAX_LEVELS = 100
_STANDARD = "standard_concept IN ('S', 'C') AND invalid_reason IS NULL"

#: Edges ancestor -> descendant with the levels they add (1 if the relationship is hierarchical).
ANCESTRY_EDGES = f"""
    SELECT r.concept_id_1 AS ancestor, r.concept_id_2 AS descendant,
           CASE WHEN rel.is_hierarchical = '1' THEN 1 ELSE 0 END AS step
    FROM concept_relationship r
    JOIN relationship rel ON rel.relationship_id = r.relationship_id
    WHERE rel.defines_ancestry = '1' AND r.invalid_reason IS NULL
      AND r.concept_id_1 <> r.concept_id_2
      AND r.concept_id_1 IN (SELECT concept_id FROM concept WHERE {_STANDARD})
      AND r.concept_id_2 IN (SELECT concept_id FROM concept WHERE {_STANDARD})"""


def derived_ancestors_sql() -> str:
    """SELECT of CONCEPT_ANCESTOR's four columns as Athena derives them (module docstring)."""
    return f"""
    WITH RECURSIVE edges AS ({ANCESTRY_EDGES}),
    paths(ancestor, descendant, levels) AS (
        SELECT ancestor, descendant, step FROM edges
        UNION
        SELECT p.ancestor, e.descendant, p.levels + e.step
        FROM paths p JOIN edges e ON e.ancestor = p.descendant
        WHERE p.levels + e.step <= {MAX_LEVELS}
    )
    SELECT ancestor, descendant, min(levels), max(levels) FROM paths
    WHERE ancestor <> descendant GROUP BY ALL
    UNION ALL
    SELECT concept_id, concept_id, 0, 0 FROM concept WHERE {_STANDARD}"""


def derive_concept_ancestor(con: duckdb.DuckDBPyConnection) -> int:
    """Replace CONCEPT_ANCESTOR by the closure of the defines_ancestry relationships; the rows."""
    con.execute("DELETE FROM concept_ancestor")
    return con.execute(
        f"INSERT INTO concept_ancestor {derived_ancestors_sql()} ORDER BY ALL"
    ).fetchone()[0]


def _used_concepts_sql(con: duckdb.DuckDBPyConnection) -> str:
    """SELECT of the distinct concept ids the clinical tables of ``con`` record."""
    present = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    parts = [
        f"SELECT {quote(INDEXED_CONCEPT_COLUMNS[t.name][0])} AS concept_id FROM {quote(t.name)}"
        for t in cdm_tables().values()
        if t.has_person and t.name in INDEXED_CONCEPT_COLUMNS and t.name in present
    ]
    return f"SELECT DISTINCT concept_id FROM ({' UNION ALL '.join(parts)}) WHERE concept_id <> 0"


def missing_links(con: duckdb.DuckDBPyConnection, into: str = "_missing_ancestry") -> int:
    """Temp table ``into`` (ancestor, descendant): every concept the data records, paired with
    each ancestor the defines_ancestry relationships give it that CONCEPT_ANCESTOR lacks.
    Walks up from the recorded concepts only, so a full Athena vocabulary costs the ancestors
    of the concepts in use, not its whole closure. Returns the number of pairs."""
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {quote(into)} AS
        WITH RECURSIVE edges AS ({ANCESTRY_EDGES}),
        up(ancestor, descendant) AS (
            SELECT e.ancestor, e.descendant FROM edges e
            WHERE e.descendant IN ({_used_concepts_sql(con)})
            UNION
            SELECT e.ancestor, up.descendant FROM up JOIN edges e ON e.descendant = up.ancestor
        )
        SELECT ancestor, descendant FROM up
        WHERE ancestor <> descendant AND NOT EXISTS (
            SELECT 1 FROM concept_ancestor a
            WHERE a.ancestor_concept_id = up.ancestor AND a.descendant_concept_id = up.descendant)
        ORDER BY ALL"""
    )
    return con.execute(f"SELECT count(*) FROM {quote(into)}").fetchone()[0]


def ancestry_notes(con: duckdb.DuckDBPyConnection) -> list[str]:
    """What a load report says about CONCEPT_ANCESTOR: empty, or missing links of concepts the
    data records (with the fix); nothing when it is complete for the data."""
    if not con.execute("SELECT count(*) FROM concept_ancestor").fetchone()[0]:
        return [
            "concept_ancestor is empty: concept sets with descendants will match only the "
            "concepts they list; rebuild it with `fedomop etl vocab --db FILE --derive-ancestors`"
        ]
    pairs = missing_links(con)
    if not pairs:
        return []
    concepts, examples = con.execute(
        """SELECT count(DISTINCT descendant), list(DISTINCT descendant ORDER BY descendant)[:5]
        FROM _missing_ancestry"""
    ).fetchone()
    con.execute("DROP TABLE _missing_ancestry")
    return [
        f"concept_ancestor lacks {pairs:,} ancestor link(s) that concept_relationship defines "
        f"for {concepts:,} concept(s) in the data (e.g. {', '.join(map(str, examples))}): "
        "concept sets with descendants will miss them; rebuild it with "
        "`fedomop etl vocab --db FILE --derive-ancestors`"
    ]
