"""characterization: pooled demographics, top-N concepts and SMDs equal the union's, exactly."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest
from conftest import ANALYSIS_COHORT_SQL
from pydantic import ValidationError

from studies.analyses import REGISTRY

SPEC = {
    "id": "baseline",
    "kind": "characterization",
    "cohorts": ["exposed", "comparator"],
    "window": {"start": -365, "end": -1},
    "top_n": 5,
    "comparison": ["exposed", "comparator"],
}


def _union(path, sql: str) -> pl.DataFrame:
    con = duckdb.connect(str(path), read_only=True)
    con.execute(ANALYSIS_COHORT_SQL)
    frame = con.sql(sql).pl()
    con.close()
    return frame


def _estimate(result, cohort, variable, estimate, level="") -> float:
    row = result.filter(
        (pl.col("group_level") == cohort)
        & (pl.col("variable_name") == variable)
        & (pl.col("variable_level") == level)
        & (pl.col("estimate_name") == estimate)
    )
    return float(row["estimate_value"].item())


def test_federated_equals_union_exactly(analysis_node_dbs, run_analysis):
    fed, _ = run_analysis(SPEC, analysis_node_dbs["nodes"])
    union, _ = run_analysis(SPEC, [analysis_node_dbs["union"]])
    key = ["group_level", "variable_name", "variable_level", "estimate_name", "additional_level"]
    assert fed.drop("cdm_name").sort(key).equals(union.drop("cdm_name").sort(key))


def test_demographics_and_smd_match_direct_computation(analysis_node_dbs, run_analysis):
    fed, _ = run_analysis(SPEC, analysis_node_dbs["nodes"])
    people = _union(
        analysis_node_dbs["union"],
        """SELECT c.cohort_definition_id AS id, p.gender_concept_id = 8532 AS female,
                  year(c.cohort_start_date) - p.year_of_birth
                    - CASE WHEN (month(c.cohort_start_date), day(c.cohort_start_date))
                                < (p.month_of_birth, p.day_of_birth) THEN 1 ELSE 0 END AS age,
                  c.cohort_start_date - op.observation_period_start_date AS prior
           FROM cohort c JOIN person p ON p.person_id = c.subject_id
           JOIN observation_period op ON op.person_id = c.subject_id
           WHERE c.cohort_definition_id IN (1, 2)""",
    )
    stats_by = {}
    for cohort, cid in (("exposed", 1), ("comparator", 2)):
        rows = people.filter(pl.col("id") == cid)
        age = rows["age"].to_numpy().astype(float)
        assert _estimate(fed, cohort, "Age", "mean") == pytest.approx(age.mean(), rel=1e-12)
        assert _estimate(fed, cohort, "Age", "sd") == pytest.approx(age.std(ddof=1), rel=1e-10)
        prior = rows["prior"].to_numpy().astype(float)
        assert _estimate(fed, cohort, "Prior observation", "mean") == pytest.approx(
            prior.mean(), rel=1e-12
        )
        female = rows["female"].sum()
        assert _estimate(fed, cohort, "Sex", "count", "Female") == female
        assert _estimate(fed, cohort, "Sex", "percentage", "Female") == pytest.approx(
            100 * female / rows.height, rel=1e-12
        )
        assert _estimate(fed, cohort, "Number records", "count") == rows.height
        stats_by[cohort] = (age.mean(), age.var(ddof=1), female / rows.height)
    (m1, v1, p1), (m0, v0, p0) = stats_by["exposed"], stats_by["comparator"]
    pair = "exposed &&& comparator"
    assert _estimate(fed, pair, "Age", "smd") == pytest.approx(
        (m1 - m0) / np.sqrt((v1 + v0) / 2), rel=1e-10
    )
    assert _estimate(fed, pair, "Sex", "smd", "Female") == pytest.approx(
        (p1 - p0) / np.sqrt((p1 * (1 - p1) + p0 * (1 - p0)) / 2), rel=1e-10
    )


def test_top_concepts_are_chosen_on_pooled_counts(analysis_node_dbs, run_analysis):
    fed, _ = run_analysis(SPEC, analysis_node_dbs["nodes"])
    direct = _union(
        analysis_node_dbs["union"],
        """SELECT co.condition_concept_id AS concept_id,
                  count(DISTINCT (c.subject_id, c.cohort_start_date)) AS n
           FROM cohort c JOIN condition_occurrence co ON co.person_id = c.subject_id
            AND co.condition_start_date BETWEEN c.cohort_start_date - 365 AND c.cohort_start_date - 1
           WHERE c.cohort_definition_id = 1 GROUP BY 1 ORDER BY n DESC, concept_id LIMIT 5""",
    )
    shown = fed.filter(
        (pl.col("group_level") == "exposed")
        & (pl.col("variable_name") == "Conditions")
        & (pl.col("estimate_name") == "count")
    )
    ids = [int(level.split(" &&& ")[0]) for level in shown["additional_level"]]
    assert ids == direct["concept_id"].to_list()
    assert shown["estimate_value"].cast(pl.Int64).to_list() == direct["n"].to_list()
    assert shown["variable_level"].to_list() == [f"concept {i}" for i in ids]
    assert set(shown["additional_name"]) == {"concept_id &&& window"}
    # every domain gets its own top 5
    domains = fed.filter(
        (pl.col("group_level") == "exposed") & (pl.col("estimate_name") == "count")
    )
    assert domains.group_by("variable_name").len().filter(
        pl.col("variable_name").is_in(["Conditions", "Drugs", "Procedures", "Measurements"])
    )["len"].to_list() == [5, 5, 5, 5]


def test_local_returns_all_concepts_and_per_person_bounds(analysis_node_dbs, open_analysis_cdm):
    """Every row but ``Number subjects`` is over cohort entries, of which one person may have
    many: their per-person bound is infinite, so a DP release withholds them."""
    cdm = open_analysis_cdm(analysis_node_dbs["nodes"][0])
    spec = REGISTRY["characterization"].Spec.model_validate(SPEC)
    stats = REGISTRY["characterization"]().local(cdm, spec, None)
    conditions = stats.filter(
        (pl.col("cohort") == "exposed") & (pl.col("variable_name") == "Conditions")
    )
    assert conditions.height > spec.top_n  # nodes send all concepts; the coordinator picks top N
    sums = stats.filter(pl.col("release_class") == "sum")
    assert sums.height == 2 * 3 * 2  # cohorts x continuous variables x (sum, sum of squares)
    assert sums["lower"].to_list() == [0.0] * sums.height
    subjects = pl.col("variable_name") == "Number subjects"
    assert stats.filter(subjects)["upper"].is_nan().all()
    assert (stats.filter(~subjects)["upper"] == float("inf")).all()
    assert set(stats["release_class"]) == {"count", "sum"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"comparison": ["exposed"]}, "exactly two"),
        ({"comparison": ["exposed", "outcome"]}, "not in 'cohorts'"),
        ({"domains": ["device"]}, "domains"),
        ({"top_n": 0}, "top_n"),
    ],
)
def test_bad_spec(change, message):
    with pytest.raises(ValidationError, match=message):
        REGISTRY["characterization"].Spec.model_validate({**SPEC, **change})
