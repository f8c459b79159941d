"""Cohorts compiled to DuckDB SQL on the node: parameterised, with whitelisted identifiers only.

Every table and column name in the SQL below comes from ``CDM_DOMAIN_TABLES`` and the fixed text of
this module; a study contributes values only, bound as ``?`` parameters (concept set ids, days,
ages, counts, value bounds) or as rows of the temp table ``study_codeset`` (concept ids). Which
fragments appear depends on the study's *structure* (is there an age bound? how many inclusion
rules?), never on its text.

Semantics follow OHDSI Circe where Circe has an equivalent:
- entry events of the domain (end date as Circe derives it), optionally only those inside an
  observation period, then the first per person or all of them; the entry's start is the index;
- inclusion: age (year of index minus year of birth), sex, days of observation before and after
  index, and per event rule the number of matching events starting in the window must lie within
  [min_count, max_count];
- exit: end of observation, fixed offset from the entry's start or end, or end of the drug era
  built from the entry drug's records with ``gap_days``; cut at the first censoring event on or
  after index and at the end of the observation period;
- periods of a person that overlap (or lie within ``collapse_days``) are merged, so a cohort has no
  overlapping periods per subject, as in the OMOP cohort table;
- the merged periods are cut to the cohort's ``calendar`` dates (Circe's censor window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from studies.cdm_tables import CDM_DOMAIN_TABLES
from studies.circe import circe_concept_ids, materialise_circe
from studies.concepts import check_known_concepts, codeset_ids, resolve_concept_sets
from studies.loading import inline_circe, load_study, study_from_data
from studies.model import SEX_CONCEPTS, CirceCohort, Cohort, EventCriterion, Events, Study

COHORT_TABLE_DDL = (
    "CREATE OR REPLACE TEMP TABLE cohort (cohort_definition_id INTEGER, subject_id BIGINT, "
    "cohort_start_date DATE, cohort_end_date DATE)"
)


@dataclass
class Sql:
    """SQL text built from this module's fixed fragments, with its ``?`` parameters in order."""

    text: str = ""
    params: list[Any] = field(default_factory=list)

    def add(self, text: str, *params: Any) -> Sql:
        self.text += text
        self.params.extend(params)
        return self

    def extend(self, other: Sql) -> Sql:
        return self.add(other.text, *other.params)


def events_sql(events: Events, codesets: dict[str, int]) -> Sql:
    """``SELECT person_id, start_date, end_date`` of one domain's matching records."""
    domain = CDM_DOMAIN_TABLES[events.domain]
    sql = Sql(
        f"SELECT person_id, {domain.start} AS start_date, {domain.end} AS end_date "
        f"FROM {domain.table} WHERE {domain.start} IS NOT NULL",
    )
    if events.concept_set is not None:
        sql.add(
            f" AND {domain.concept} IN (SELECT concept_id FROM study_codeset WHERE codeset_id = ?)",
            codesets[events.concept_set],
        )
    if events.value is not None and domain.value is not None:
        if events.value.min is not None:
            sql.add(f" AND {domain.value} >= ?", events.value.min)
        if events.value.max is not None:
            sql.add(f" AND {domain.value} <= ?", events.value.max)
    return sql


def islands_sql(source: str, gap_days: int) -> Sql:
    """Group each person's periods in ``source`` into islands: a period starting no later than
    ``gap_days`` after every earlier period's end joins them (``island`` numbers them)."""
    return Sql().add(
        f"""SELECT *, sum(is_start) OVER (PARTITION BY person_id ORDER BY start_date, end_date
                ROWS UNBOUNDED PRECEDING) AS island
        FROM (
            SELECT *, CASE WHEN start_date <= max(end_date) OVER (
                PARTITION BY person_id ORDER BY start_date, end_date
                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) + CAST(? AS INTEGER)
                THEN 0 ELSE 1 END AS is_start
            FROM {source}
        )""",
        gap_days,
    )


def _entry_ctes(cohort: Cohort, codesets: dict[str, int]) -> Sql:
    entry = cohort.entry
    sql = Sql("entry_events AS (SELECT e.person_id, e.start_date, e.end_date, ")
    sql.add(
        "op.observation_period_start_date AS op_start, op.observation_period_end_date AS op_end,"
        " row_number() OVER (PARTITION BY e.person_id ORDER BY e.start_date, e.end_date)"
        " AS ordinal FROM ("
    )
    sql.extend(events_sql(entry, codesets))
    sql.add(
        ") e LEFT JOIN observation_period op ON op.person_id = e.person_id AND e.start_date"
        " BETWEEN op.observation_period_start_date AND op.observation_period_end_date"
    )
    if entry.within_observation:
        sql.add(" WHERE op.person_id IS NOT NULL")
    sql.add("),\nqualified AS (SELECT row_number() OVER () AS event_id, * FROM entry_events")
    if entry.events == "first":
        sql.add(" WHERE ordinal = 1")
    return sql.add(")")


def _rule_cte(k: int, rule: EventCriterion, codesets: dict[str, int]) -> Sql:
    sql = Sql(f",\nrule_{k} AS (SELECT q.event_id FROM qualified q LEFT JOIN (")
    sql.extend(events_sql(rule, codesets))
    sql.add(") x ON x.person_id = q.person_id")
    if rule.window.start is not None:
        sql.add(" AND x.start_date >= q.start_date + CAST(? AS INTEGER)", rule.window.start)
    if rule.window.end is not None:
        sql.add(" AND x.start_date <= q.start_date + CAST(? AS INTEGER)", rule.window.end)
    if rule.within_observation:
        sql.add(" AND x.start_date BETWEEN q.op_start AND q.op_end")
    sql.add(" GROUP BY q.event_id HAVING count(x.person_id) >= ?", rule.min_count)
    if rule.max_count is not None:
        sql.add(" AND count(x.person_id) <= ?", rule.max_count)
    return sql.add(")")


def _included_cte(cohort: Cohort, codesets: dict[str, int]) -> Sql:
    inclusion = cohort.inclusion
    sql = Sql()
    for k, rule in enumerate(inclusion.events):
        sql.extend(_rule_cte(k, rule, codesets))
    sql.add(
        ",\nincluded AS (SELECT q.* FROM qualified q LEFT JOIN person p"
        " ON p.person_id = q.person_id WHERE TRUE"
    )
    if inclusion.age is not None and inclusion.age.min is not None:
        sql.add(" AND year(q.start_date) - p.year_of_birth >= ?", inclusion.age.min)
    if inclusion.age is not None and inclusion.age.max is not None:
        sql.add(" AND year(q.start_date) - p.year_of_birth <= ?", inclusion.age.max)
    if inclusion.sex:
        genders = [SEX_CONCEPTS[sex] for sex in inclusion.sex]
        sql.add(" AND p.gender_concept_id IN (" + ", ".join("?" * len(genders)) + ")", *genders)
    if inclusion.prior_observation_days:
        sql.add(" AND q.start_date - q.op_start >= ?", inclusion.prior_observation_days)
    if inclusion.post_observation_days:
        sql.add(" AND q.op_end - q.start_date >= ?", inclusion.post_observation_days)
    for k in range(len(inclusion.events)):
        sql.add(f" AND q.event_id IN (SELECT event_id FROM rule_{k})")
    return sql.add(")")


def _exit_ctes(cohort: Cohort, codesets: dict[str, int]) -> Sql:
    """``exits(person_id, start_date, end_date)``: one period per included entry event."""
    exit_ = cohort.exit
    sql = Sql()
    if exit_.type == "drug_era_end":
        sql.add(",\nera_events AS (").extend(events_sql(cohort.entry, codesets)).add(")")
        sql.add(",\nera_islands AS (").extend(islands_sql("era_events", exit_.gap_days))
        sql.add(
            "),\neras AS (SELECT person_id, min(start_date) AS era_start, max(end_date) AS era_end"
            " FROM era_islands GROUP BY person_id, island)"
        )
    if exit_.censor:
        sql.add(",\ncensor_events AS (")
        for j, censor in enumerate(exit_.censor):
            sql.add(" UNION ALL " if j else "").extend(events_sql(censor, codesets))
        sql.add(
            "),\ncensored AS (SELECT i.event_id, min(c.start_date) AS censor_date FROM included i"
            " JOIN censor_events c ON c.person_id = i.person_id AND c.start_date >= i.start_date"
            " GROUP BY i.event_id)"
        )
    sql.add(",\nexits AS (SELECT i.person_id, i.start_date, least(")
    if exit_.type == "end_of_observation":
        sql.add("i.op_end")
    elif exit_.type == "fixed_offset":
        anchor = "i.start_date" if exit_.anchor == "start" else "i.end_date"
        sql.add(f"{anchor} + CAST(? AS INTEGER)", exit_.offset_days)
    else:
        sql.add("e.era_end + CAST(? AS INTEGER)", exit_.offset_days)
    sql.add(", i.op_end")
    if exit_.censor:
        sql.add(", c.censor_date")
    sql.add(") AS end_date FROM included i")
    if exit_.type == "drug_era_end":
        # eras of a person do not overlap, so the index date lies in exactly one
        sql.add(
            " LEFT JOIN eras e ON e.person_id = i.person_id"
            " AND i.start_date BETWEEN e.era_start AND e.era_end"
        )
    if exit_.censor:
        sql.add(" LEFT JOIN censored c ON c.event_id = i.event_id")
    return sql.add(")")


def cohort_sql(cohort: Cohort, cohort_id: int, codesets: dict[str, int]) -> Sql:
    """One INSERT that adds this cohort's collapsed periods to the temp table ``cohort``."""
    sql = Sql("INSERT INTO cohort WITH ").extend(_entry_ctes(cohort, codesets))
    sql.extend(_included_cte(cohort, codesets)).extend(_exit_ctes(cohort, codesets))
    sql.add(",\nperiods AS (SELECT person_id, start_date, end_date FROM exits")
    sql.add(" WHERE end_date >= start_date)")
    if cohort.entry.events == "first":  # one period per person: nothing to collapse
        sql.add(",\nmerged AS (SELECT person_id, start_date, end_date FROM periods)")
    else:
        sql.add(",\nislands AS (").extend(islands_sql("periods", cohort.collapse_days))
        sql.add(
            "),\nmerged AS (SELECT person_id, min(start_date) AS start_date, max(end_date) AS"
            " end_date FROM islands GROUP BY person_id, island)"
        )
    return sql.extend(_calendar_cut(cohort, cohort_id))


def _calendar_cut(cohort: Cohort, cohort_id: int) -> Sql:
    """The final SELECT: merged periods cut to the cohort's calendar, empty ones dropped."""
    sql = Sql(",\ncut AS (SELECT person_id, ")
    if cohort.calendar.start is not None:
        sql.add("greatest(start_date, CAST(? AS DATE))", cohort.calendar.start)
    else:
        sql.add("start_date")
    sql.add(" AS start_date, ")
    if cohort.calendar.end is not None:
        sql.add("least(end_date, CAST(? AS DATE))", cohort.calendar.end)
    else:
        sql.add("end_date")
    sql.add(" AS end_date FROM merged)")
    return sql.add(
        "\nSELECT CAST(? AS INTEGER), person_id, start_date, end_date FROM cut"
        " WHERE start_date <= end_date",
        cohort_id,
    )


def cohort_ids(study: Study) -> dict[str, int]:
    """Cohort name -> cohort_definition_id (1-based, in study order)."""
    return {cohort.name: i for i, cohort in enumerate(study.cohorts, start=1)}


def materialise_cohorts(
    con: duckdb.DuckDBPyConnection,
    study: Study | dict[str, Any] | str | Path,
    base_dir: Path | None = None,
) -> dict[str, int]:
    """Create temp table ``cohort`` holding every cohort of ``study``; return name -> id.

    ``study`` is a validated Study (what a node has), a dict (validated here; ``circe: path``
    entries are inlined from ``base_dir`` only when one is given) or a study file path.
    Works on read-only connections: only temp tables are written.
    """
    if isinstance(study, str | Path):
        study = load_study(study)
    elif isinstance(study, dict):
        study = study_from_data(inline_circe(study, base_dir) if base_dir else study)
    resolve_concept_sets(con, study.concept_sets)
    codesets = codeset_ids(study.concept_sets)
    ids = cohort_ids(study)
    con.execute(COHORT_TABLE_DDL)
    for cohort in study.cohorts:
        if isinstance(cohort, CirceCohort):
            check_known_concepts(con, circe_concept_ids(cohort.circe))
            materialise_circe(con, cohort.circe, ids[cohort.name])
        else:
            sql = cohort_sql(cohort, ids[cohort.name], codesets)
            con.execute(sql.text, sql.params)
    check_disjoint_periods(con, {i: name for name, i in ids.items()})
    return ids


class OverlappingPeriods(ValueError):
    """A cohort gave one person overlapping periods; the analyses' bounds assume none."""


OVERLAPPING_PERIODS_SQL = """
SELECT DISTINCT cohort_definition_id FROM (
    SELECT cohort_definition_id, subject_id,
           cohort_start_date <= max(cohort_end_date) OVER (
               PARTITION BY cohort_definition_id, subject_id
               ORDER BY cohort_start_date, cohort_end_date
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS overlapping
    FROM cohort
) WHERE overlapping ORDER BY cohort_definition_id
"""


def check_disjoint_periods(con: duckdb.DuckDBPyConnection, names: dict[int, str]) -> None:
    """Refuse cohorts in which one person's periods overlap.

    The OMOP cohort table holds no overlapping periods per subject, and the analyses' declared
    bounds (person-time per person, rows per person) rest on it. Both cohort forms merge
    overlapping periods (own form: ``collapse_days`` >= 0; Circe: ``EraPad`` >= 0, checked in
    ``studies.circe``); this checks the result whatever produced it.
    """
    found = con.execute(OVERLAPPING_PERIODS_SQL).fetchall()
    if found:  # names only: how many persons overlap is the node's data, not a reason
        cohorts = ", ".join(str(names.get(cid, cid)) for (cid,) in found)
        raise OverlappingPeriods(
            f"cohort periods overlap within one person in {cohorts}: refused, as the analyses' "
            "per-person bounds assume non-overlapping periods"
        )
