"""The CDM tables a loader derives from the loaded ones: observation_period, condition_era and
drug_era (death comes from the source, so each loader brings its own step for it).

Apart from any one loader because the rules are OHDSI's, not the source's: a loader names its
event tables and its type concept, and gets the same periods and eras as every other loader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import duckdb

from omop_etl.parallel import Task
from omop_etl.sql import quote

ERA_PERSISTENCE_DAYS = 30  # OHDSI's era builder: gaps up to 30 days continue an era

CONDITION_ERA_EVENTS = """
    SELECT person_id, condition_concept_id AS concept_id, condition_start_date AS s,
           coalesce(condition_end_date, condition_start_date + 1) AS e
    FROM condition_occurrence WHERE condition_concept_id <> 0"""
#: drug_era is per RxNorm ingredient: exposures reach theirs through concept_ancestor.
DRUG_ERA_EVENTS = """
    SELECT d.person_id, a.ancestor_concept_id AS concept_id,
           d.drug_exposure_start_date AS s, d.drug_exposure_end_date AS e
    FROM drug_exposure d
    JOIN concept_ancestor a ON a.descendant_concept_id = d.drug_concept_id
    JOIN concept c ON c.concept_id = a.ancestor_concept_id
    WHERE c.concept_class_id = 'Ingredient'
      AND c.vocabulary_id IN ('RxNorm', 'RxNorm Extension')"""


def insert_observation_periods(
    cur: duckdb.DuckDBPyConnection, event_starts: Mapping[str, str], type_concept: int
) -> int:
    """observation_period: first to last recorded date per person, over the visits (start to
    end) and every event table (start). ``event_starts`` maps each event table to its start
    date column (whose ``_datetime`` twin is read)."""
    spans = [
        "SELECT person_id, min(visit_start_datetime) AS first, max(visit_end_datetime) AS last "
        "FROM visit_occurrence GROUP BY ALL"
    ]
    for table, start_date in event_starts.items():
        start = quote(start_date.replace("_date", "_datetime"))
        spans.append(
            f"SELECT person_id, min({start}), max({start}) FROM {quote(table)} GROUP BY ALL"
        )
    return cur.execute(
        f"""INSERT INTO observation_period
        SELECT row_number() OVER (ORDER BY person_id), person_id, CAST(min(first) AS DATE),
               CAST(max(last) AS DATE), {int(type_concept)}
        FROM ({" UNION ALL ".join(spans)}) GROUP BY person_id ORDER BY person_id"""
    ).fetchone()[0]


def insert_eras(con: duckdb.DuckDBPyConnection, era_table: str, events: str) -> int:
    """Build ``era_table`` from ``events`` (person_id, concept_id, s, e) the OHDSI way: spans of
    one concept per person whose gaps are at most ``ERA_PERSISTENCE_DAYS``, with the number of
    events (and, for drug eras, the days inside the era that no exposure covers)."""
    gap = ", greatest(0, datediff('day', min(s), max(e)) - sum(datediff('day', s, e)))"
    return con.execute(
        f"""INSERT INTO {quote(era_table)}
        WITH events AS ({events}),
        flagged AS (
            SELECT *, CASE WHEN s > max(e) OVER (PARTITION BY person_id, concept_id ORDER BY s, e
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
                           + INTERVAL {ERA_PERSISTENCE_DAYS} DAY THEN 1 ELSE 0 END AS starts
            FROM events),
        numbered AS (
            SELECT *, sum(starts) OVER (PARTITION BY person_id, concept_id ORDER BY s, e
                                       ROWS UNBOUNDED PRECEDING) AS era
            FROM flagged)
        SELECT row_number() OVER (ORDER BY person_id, concept_id, min(s)), person_id,
               concept_id, min(s), max(e), count(*)
               {gap if era_table == "drug_era" else ""}
        FROM numbered GROUP BY person_id, concept_id, era"""
    ).fetchone()[0]


def derived_tasks(
    event_starts: Mapping[str, str],
    type_concept: int,
    deaths: Callable[[duckdb.DuckDBPyConnection], int],
) -> list[Task]:
    """The tables derived from the loaded ones; independent, so they are built side by side.
    ``deaths`` is the loader's own death step (it reads the source's death dates)."""
    return [
        Task("observation_period", "observation_period",
             lambda cur: insert_observation_periods(cur, event_starts, type_concept)),
        Task("condition_era", "condition_era",
             lambda cur: insert_eras(cur, "condition_era", CONDITION_ERA_EVENTS)),
        Task("drug_era", "drug_era", lambda cur: insert_eras(cur, "drug_era", DRUG_ERA_EVENTS)),
        Task("death", "death", deaths),
    ]  # fmt: skip
