"""Own-form cohorts on GiBleed reproduce the published numbers; study text never becomes SQL."""

from __future__ import annotations

import json
from typing import get_args

import duckdb
import pytest
from conftest import EXPECTED

from studies.cdm_tables import CDM_DOMAIN_TABLES
from studies.cohorts import cohort_sql, materialise_cohorts
from studies.concepts import ConceptSetError, codeset_ids
from studies.model import Domain, Study

CONCEPT_SETS = [
    {"name": "celecoxib", "concepts": [1118084]},
    {"name": "diclofenac", "concepts": [1124300]},
    {"name": "gi_bleed", "concepts": [192671], "include_descendants": True},
    {"name": "nsaids", "concepts": [1118084, 1124300], "include_descendants": True},
    {"name": "ra", "concepts": [80809], "include_descendants": True},
    {"name": "ankle_sprain", "concepts": [81151]},
    {"name": "ankle_fracture", "concepts": [4059173]},
    {"name": "forearm_fracture", "concepts": [4278672]},
    {"name": "hip_fracture", "concepts": [4230399]},
    {"name": "warfarin", "concepts": [1310149], "include_descendants": True},
    {"name": "morphine", "concepts": [1110410], "include_descendants": True},
]
EVENT_END = {"type": "fixed_offset", "anchor": "end"}


def all_events(domain: str, concept_set: str, within_observation: bool = True) -> dict:
    """CDMConnector generateConceptCohortSet(limit='all', end='event_end_date') / Eunomia SQL."""
    entry = {"domain": domain, "concept_set": concept_set, "events": "all"}
    return {"entry": entry | {"within_observation": within_observation}, "exit": EVENT_END}


COHORTS = {
    # Eunomia createCohorts (inst/sql/CreateCohortTable.sql): plain rows, no observation check
    "eunomia_celecoxib": all_events("drug_era", "celecoxib", within_observation=False),
    "eunomia_diclofenac": all_events("drug_era", "diclofenac", within_observation=False),
    "eunomia_gi_bleed": all_events("condition", "gi_bleed", within_observation=False),
    "eunomia_nsaids": {
        "entry": {"domain": "drug", "concept_set": "nsaids", "within_observation": False},
        "exit": EVENT_END,
    },
    # CDMConnector vignette (Capr): GI bleed, no RA at any time, exit at end of observation
    "gi_bleed_no_ra": {
        "entry": {"domain": "condition", "concept_set": "gi_bleed"},
        "inclusion": {"events": [{"domain": "condition", "concept_set": "ra", "max_count": 0}]},
    },
    # CohortCharacteristics injuries and medications
    "ankle_sprain": all_events("condition", "ankle_sprain"),
    "ankle_fracture": all_events("condition", "ankle_fracture"),
    "forearm_fracture": all_events("condition", "forearm_fracture"),
    "hip_fracture": all_events("condition", "hip_fracture"),
    "warfarin": all_events("drug", "warfarin"),
    "morphine": all_events("drug", "morphine"),
    # CohortGenerator celecoxib cohorts, written in the own form instead of Circe
    "cg_celecoxib": {"entry": {"domain": "drug_era", "concept_set": "celecoxib"}},
    "cg_celecoxib_age40": {
        "entry": {"domain": "drug_era", "concept_set": "celecoxib"},
        "inclusion": {"age": {"min": 41}},
    },
    "cg_celecoxib_age40_male": {
        "entry": {"domain": "drug_era", "concept_set": "celecoxib"},
        "inclusion": {"age": {"min": 41}, "sex": ["male"]},
    },
    "cg_celecoxib_censored": {  # Circe's censor window, as the own form's calendar
        "entry": {"domain": "drug_era", "concept_set": "celecoxib"},
        "calendar": {"start": "2000-01-01"},
    },
}


def _expected() -> dict[str, tuple[int, int]]:
    published = {
        e["id"]: e["value"]
        for e in json.loads((EXPECTED / "gibleed_expected_results.json").read_text())["expected"]
    }
    eunomia = published["eunomia_createCohorts"]
    injuries = published["cohortcharacteristics_injuries"]
    meds = published["cohortcharacteristics_meds_overlap"]
    generator = published["cohortgenerator_counts"]
    no_ra = published["cdmconnector_vignette_gibleed_no_RA"]
    return {
        "eunomia_celecoxib": (eunomia["1_Celecoxib"],) * 2,
        "eunomia_diclofenac": (eunomia["2_Diclofenac"],) * 2,
        "eunomia_gi_bleed": (eunomia["3_GiBleed"],) * 2,
        "eunomia_nsaids": (eunomia["4_NSAIDs"],) * 2,
        "gi_bleed_no_ra": (no_ra["number_records"], no_ra["number_subjects"]),
        "ankle_sprain": tuple(injuries["ankle_sprain_81151"]),
        "ankle_fracture": tuple(injuries["ankle_fracture_4059173"]),
        "forearm_fracture": tuple(injuries["forearm_fracture_4278672"]),
        "hip_fracture": tuple(injuries["hip_fracture_4230399"]),
        "warfarin": tuple(meds["warfarin_11289"]),
        "morphine": tuple(meds["morphine_7052"]),
        "cg_celecoxib": tuple(generator["1_celecoxib"]),
        "cg_celecoxib_age40": tuple(generator["2_celecoxibAge40"]),
        "cg_celecoxib_age40_male": tuple(generator["3_celecoxibAge40Male"]),
        "cg_celecoxib_censored": tuple(generator["4_celecoxibCensored"]),
    }


def make_study(cohorts: dict[str, dict], concept_sets: list[dict] | None = None) -> Study:
    """A study holding these own-form cohorts and a counts analysis over them."""
    return Study.model_validate(
        {
            "name": "test_study",
            "concept_sets": CONCEPT_SETS if concept_sets is None else concept_sets,
            "cohorts": [{"name": name, **body} for name, body in cohorts.items()],
            "analyses": [{"id": "n", "kind": "counts", "cohorts": list(cohorts)}],
        }
    )


def cohort_counts(con: duckdb.DuckDBPyConnection, ids: dict[str, int]) -> dict[str, tuple]:
    rows = con.execute(
        "SELECT cohort_definition_id, count(*), count(DISTINCT subject_id) FROM cohort GROUP BY 1"
    ).fetchall()
    by_id = {cid: (n, persons) for cid, n, persons in rows}
    return {name: by_id.get(cid, (0, 0)) for name, cid in ids.items()}


def test_gibleed_published_counts(gibleed):
    """Eunomia, CDMConnector, CohortCharacteristics and CohortGenerator numbers, own form."""
    ids = materialise_cohorts(gibleed, make_study(COHORTS))
    assert cohort_counts(gibleed, ids) == _expected()


def test_periods_are_collapsed_and_inside_observation(gibleed):
    """No overlapping periods per subject; exits never pass the observation period end."""
    materialise_cohorts(gibleed, make_study(COHORTS))
    overlaps, outside = gibleed.execute(
        """
        SELECT
          (SELECT count(*) FROM cohort a JOIN cohort b USING (cohort_definition_id, subject_id)
           WHERE a.cohort_start_date < b.cohort_start_date
             AND a.cohort_end_date >= b.cohort_start_date),
          (SELECT count(*) FROM cohort c JOIN observation_period op ON op.person_id = c.subject_id
             AND c.cohort_start_date BETWEEN op.observation_period_start_date
                                         AND op.observation_period_end_date
           WHERE c.cohort_end_date > op.observation_period_end_date)
        """
    ).fetchall()[0]
    assert (overlaps, outside) == (0, 0)


def test_exit_strategies_match_direct_sql(gibleed):
    """Fixed offset, drug era end with a gap, censoring, prior observation, value range."""
    study = make_study(
        {
            "celecoxib_30d": {
                "entry": {"domain": "drug_era", "concept_set": "celecoxib"},
                "exit": {"type": "fixed_offset", "offset_days": 30},
            },
            "celecoxib_era": {
                "entry": {"domain": "drug", "concept_set": "celecoxib", "events": "all"},
                "exit": {"type": "drug_era_end", "gap_days": 30},
            },
            "celecoxib_censored_by_bleed": {
                "entry": {"domain": "drug_era", "concept_set": "celecoxib"},
                "exit": {"censor": [{"domain": "condition", "concept_set": "gi_bleed"}]},
            },
            "celecoxib_365_prior": {
                "entry": {"domain": "drug_era", "concept_set": "celecoxib"},
                "inclusion": {"prior_observation_days": 365},
            },
            "nsaid_no_bleed_before": {
                "entry": {"domain": "drug", "concept_set": "nsaids"},
                "inclusion": {
                    "events": [
                        {
                            "domain": "condition",
                            "concept_set": "gi_bleed",
                            "window": {"end": -1},
                            "max_count": 0,
                        }
                    ]
                },
            },
        }
    )
    ids = materialise_cohorts(gibleed, study)
    first_era = """
        SELECT d.person_id, min(d.drug_era_start_date) AS s, any_value(op.observation_period_start_date) AS ops,
               any_value(op.observation_period_end_date) AS ope
        FROM drug_era d JOIN observation_period op ON op.person_id = d.person_id
          AND d.drug_era_start_date BETWEEN op.observation_period_start_date
                                        AND op.observation_period_end_date
        WHERE d.drug_concept_id = 1118084 GROUP BY d.person_id
    """
    direct = gibleed.execute(
        f"""
        WITH f AS ({first_era}),
        bleed AS (SELECT person_id, condition_start_date AS d FROM condition_occurrence
                  WHERE condition_concept_id IN (SELECT descendant_concept_id FROM
                  concept_ancestor WHERE ancestor_concept_id = 192671))
        SELECT
          (SELECT sum(least(s + 30, ope) - s) FROM f),
          (SELECT sum(least(ope, coalesce((SELECT min(d) FROM bleed b WHERE b.person_id = f.person_id
                                                AND b.d >= f.s), ope)) - s) FROM f),
          (SELECT count(*) FROM f WHERE s - ops >= 365)
        """
    ).fetchall()[0]
    got = gibleed.execute(
        """
        SELECT
          (SELECT sum(cohort_end_date - cohort_start_date) FROM cohort WHERE cohort_definition_id = ?),
          (SELECT sum(cohort_end_date - cohort_start_date) FROM cohort WHERE cohort_definition_id = ?),
          (SELECT count(*) FROM cohort WHERE cohort_definition_id = ?)
        """,
        [ids["celecoxib_30d"], ids["celecoxib_censored_by_bleed"], ids["celecoxib_365_prior"]],
    ).fetchall()[0]
    assert got == direct
    # drug eras rebuilt from exposures with a 30-day gap never have overlapping periods and cover
    # every exposure start
    uncovered = gibleed.execute(
        """
        SELECT count(*) FROM drug_exposure x
        JOIN observation_period op ON op.person_id = x.person_id
          AND x.drug_exposure_start_date BETWEEN op.observation_period_start_date
                                             AND op.observation_period_end_date
        WHERE x.drug_concept_id = 1118084 AND NOT EXISTS (
          SELECT 1 FROM cohort c WHERE c.cohort_definition_id = ? AND c.subject_id = x.person_id
            AND x.drug_exposure_start_date BETWEEN c.cohort_start_date AND c.cohort_end_date)
        """,
        [ids["celecoxib_era"]],
    ).fetchall()[0][0]
    assert uncovered == 0
    counts = cohort_counts(gibleed, ids)
    assert 0 < counts["nsaid_no_bleed_before"][0] < 2694
    exposed = gibleed.execute(
        "SELECT count(DISTINCT x.person_id) FROM drug_exposure x JOIN observation_period op"
        " ON op.person_id = x.person_id AND x.drug_exposure_start_date BETWEEN"
        " op.observation_period_start_date AND op.observation_period_end_date"
        " WHERE x.drug_concept_id = 1118084"
    ).fetchall()[0][0]
    assert counts["celecoxib_era"][1] == exposed


def test_calendar_cuts_merged_periods(gibleed):
    """Periods are cut to the calendar's dates; those left empty are dropped."""
    uncut = {"entry": {"domain": "condition", "concept_set": "gi_bleed", "events": "all"}}
    cut = uncut | {"calendar": {"start": "2000-01-01", "end": "2005-12-31"}}
    ids = materialise_cohorts(gibleed, make_study({"uncut": uncut, "cut": cut}))
    expected = gibleed.execute(
        """SELECT count(*), min(greatest(cohort_start_date, DATE '2000-01-01')),
                  max(least(cohort_end_date, DATE '2005-12-31'))
           FROM cohort WHERE cohort_definition_id = ? AND cohort_start_date <= DATE '2005-12-31'
             AND cohort_end_date >= DATE '2000-01-01'""",
        [ids["uncut"]],
    ).fetchone()
    got = gibleed.execute(
        "SELECT count(*), min(cohort_start_date), max(cohort_end_date) FROM cohort "
        "WHERE cohort_definition_id = ?",
        [ids["cut"]],
    ).fetchone()
    assert got == expected and got[0] > 0
    with pytest.raises(ValueError, match="calendar start 2006-01-01 is after its end"):
        make_study({"bad": uncut | {"calendar": {"start": "2006-01-01", "end": "2005-12-31"}}})


def test_measurement_value_range(gibleed):
    """GiBleed's value_as_number is always NULL: a value range keeps nobody, none keeps many."""
    study = make_study(
        {
            "any_value": {"entry": {"domain": "measurement", "concept_set": "m"}},
            "in_range": {
                "entry": {"domain": "measurement", "concept_set": "m", "value": {"min": 0}}
            },
        },
        concept_sets=[{"name": "m", "concepts": [3006322]}],
    )
    ids = materialise_cohorts(gibleed, study)
    direct = gibleed.execute(
        "SELECT count(DISTINCT m.person_id) FROM measurement m JOIN observation_period op"
        " ON op.person_id = m.person_id AND m.measurement_date BETWEEN"
        " op.observation_period_start_date AND op.observation_period_end_date"
        " WHERE measurement_concept_id = 3006322"
    ).fetchall()[0][0]
    assert direct > 0
    assert cohort_counts(gibleed, ids) == {"any_value": (direct, direct), "in_range": (0, 0)}


def test_unknown_concept_names_the_set(gibleed):
    study = make_study(
        {"x": {"entry": {"domain": "condition", "concept_set": "mystery"}}},
        concept_sets=[{"name": "mystery", "concepts": [192671, 999999999]}],
    )
    with pytest.raises(ConceptSetError, match=r"concept set 'mystery'.*999999999"):
        materialise_cohorts(gibleed, study)


INJECTION = "x'); DROP TABLE person; --"


def test_study_text_never_becomes_sql(gibleed):
    """Free text travels only in descriptions and names; neither appears in the compiled SQL."""
    cohorts = {
        "Zq_marker_cohort": {
            "description": INJECTION,
            "entry": {"domain": "condition", "concept_set": "Zq_marker_set", "events": "all"},
            "inclusion": {
                "age": {"min": 18},
                "sex": ["female"],
                "events": [
                    {"domain": "drug", "concept_set": "Zq_marker_set", "window": {"start": -30}}
                ],
            },
            "exit": {"censor": [{"domain": "death"}]},
        }
    }
    study = make_study(cohorts, [{"name": "Zq_marker_set", "concepts": [192671]}])
    sql = cohort_sql(study.cohorts[0], 1, codeset_ids(study.concept_sets))
    for text in ("Zq_marker", "DROP", "'", ";"):
        assert text not in sql.text
    assert sql.params == [1, 1, -30, 1, 18, 8532, 0, 1]
    materialise_cohorts(gibleed, study)
    assert gibleed.execute("SELECT count(*) FROM person").fetchall()[0][0] == 2694


def test_every_value_is_a_bound_parameter():
    """One ``?`` per parameter in every compiled cohort, and no quote in any SQL text."""
    study = make_study(COHORTS)
    codesets = codeset_ids(study.concept_sets)
    for i, cohort in enumerate(study.cohorts, start=1):
        sql = cohort_sql(cohort, i, codesets)
        assert sql.text.count("?") == len(sql.params), cohort.name
        assert "'" not in sql.text and '"' not in sql.text and ";" not in sql.text


def test_injection_in_names_is_refused():
    from studies.loading import study_from_data
    from studies.model import StudyError

    raw = {
        "name": "s",
        "concept_sets": [{"name": "cs", "concepts": [1]}],
        "cohorts": [{"name": INJECTION, "entry": {"domain": "condition", "concept_set": "cs"}}],
        "analyses": [{"id": "n", "kind": "counts", "cohorts": [INJECTION]}],
    }
    with pytest.raises(StudyError) as err:
        study_from_data(raw)
    assert "cohorts.0.name" in str(err.value)


def test_domain_tables_are_whitelisted_cdm_columns():
    """Every identifier the compiler writes is a CDM 5.4 table/column; every domain is mapped."""
    from omop_etl.schema import cdm_tables

    assert set(CDM_DOMAIN_TABLES) == set(get_args(Domain))
    tables = cdm_tables()
    for domain in CDM_DOMAIN_TABLES.values():
        columns = set(tables[domain.table].columns)
        named = {domain.concept, domain.start} | ({domain.value} if domain.value else set())
        assert named <= columns, domain
