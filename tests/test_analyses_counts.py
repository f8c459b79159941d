"""counts: federated persons/records per stratum equal the same counts on the union, exactly."""

from __future__ import annotations

import duckdb
import polars as pl
import pytest
from conftest import ANALYSIS_COHORT_SQL
from pydantic import ValidationError

from studies.analyses import REGISTRY

SPEC = {
    "id": "feasibility",
    "kind": "counts",
    "cohorts": ["exposed", "comparator", "outcome"],
    "strata": ["sex", "age_group", "calendar_year", ["sex", "age_group"]],
}


def _union_counts(path) -> pl.DataFrame:
    """The same counts computed directly on the union with independent SQL."""
    con = duckdb.connect(str(path), read_only=True)
    con.execute(ANALYSIS_COHORT_SQL)
    frame = con.sql(
        """
        WITH e AS (
          SELECT c.cohort_definition_id AS id, c.subject_id,
                 CASE WHEN p.gender_concept_id = 8507 THEN 'Male' ELSE 'Female' END AS sex,
                 year(c.cohort_start_date) - p.year_of_birth
                   - CASE WHEN (month(c.cohort_start_date), day(c.cohort_start_date))
                               < (p.month_of_birth, p.day_of_birth) THEN 1 ELSE 0 END AS age
          FROM cohort c JOIN person p ON p.person_id = c.subject_id)
        SELECT id, sex, CASE WHEN age <= 17 THEN '0 to 17' WHEN age <= 64 THEN '18 to 64'
                             ELSE '65 to 150' END AS age_group,
               count(*) AS records, count(DISTINCT subject_id) AS subjects
        FROM e GROUP BY ALL
        """
    ).pl()
    con.close()
    return frame


def test_federated_counts_equal_union(analysis_node_dbs, run_analysis):
    fed, rounds = run_analysis(SPEC, analysis_node_dbs["nodes"])
    union, _ = run_analysis(SPEC, [analysis_node_dbs["union"]])
    assert rounds == 1
    key = ["group_level", "strata_name", "strata_level", "variable_name", "estimate_name"]
    assert fed.sort(key).drop("cdm_name").equals(union.sort(key).drop("cdm_name"))
    assert set(fed["strata_name"]) == {
        "overall",
        "sex",
        "age_group",
        "calendar_year",
        "sex &&& age_group",
    }

    direct = _union_counts(analysis_node_dbs["union"])
    names = {1: "exposed", 2: "comparator", 3: "outcome"}
    cell = fed.filter(pl.col("strata_name") == "sex &&& age_group")
    for row in direct.filter(pl.col("id") <= 3).iter_rows(named=True):
        level = f"{row['sex']} &&& {row['age_group']}"
        got = cell.filter(
            (pl.col("group_level") == names[row["id"]]) & (pl.col("strata_level") == level)
        )
        by_var = dict(zip(got["variable_name"], got["estimate_value"], strict=True))
        assert by_var == {
            "Number records": str(row["records"]),
            "Number subjects": str(row["subjects"]),
        }
    overall = fed.filter(
        (pl.col("strata_name") == "overall") & (pl.col("variable_name") == "Number records")
    )
    totals = direct.group_by("id").agg(pl.col("records").sum())
    for row in totals.filter(pl.col("id") <= 3).iter_rows(named=True):
        assert overall.filter(pl.col("group_level") == names[row["id"]])[
            "estimate_value"
        ].item() == str(row["records"])


def test_outcome_records_exceed_subjects(analysis_node_dbs, run_analysis):
    """The outcome cohort has repeated entries: records > subjects, as the data was built."""
    fed, _ = run_analysis(SPEC, analysis_node_dbs["nodes"])
    overall = fed.filter(
        (pl.col("group_level") == "outcome") & (pl.col("strata_name") == "overall")
    )
    values = dict(zip(overall["variable_name"], overall["estimate_value"].cast(int), strict=True))
    assert values["Number records"] > values["Number subjects"] > 100


def test_empty_cohort_reports_zero(analysis_node_dbs, open_analysis_cdm):
    cdm = open_analysis_cdm(analysis_node_dbs["nodes"][0])
    cdm.cohort_ids["nobody"] = 99
    spec = REGISTRY["counts"].Spec.model_validate({**SPEC, "cohorts": ["nobody"]})
    stats = REGISTRY["counts"]().local(cdm, spec, None)
    assert stats["value"].to_list() == [0.0, 0.0]
    assert set(stats["release_class"]) == {"count"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cohorts": []}, "cohorts"),
        ({"cohorts": ["x'; DROP TABLE person; --"]}, "cohorts"),
        ({"strata": ["postcode"]}, "strata"),
        ({"age_groups": [[0, 20], [18, 64]]}, "age_groups"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_spec_names_field(change, field):
    with pytest.raises(ValidationError) as err:
        REGISTRY["counts"].Spec.model_validate({**SPEC, **change})
    assert field in str(err.value)


def test_unknown_cohort_is_named(analysis_node_dbs, open_analysis_cdm):
    cdm = open_analysis_cdm(analysis_node_dbs["nodes"][0])
    spec = REGISTRY["counts"].Spec.model_validate({**SPEC, "cohorts": ["missing"]})
    with pytest.raises(KeyError, match="missing"):
        REGISTRY["counts"]().local(cdm, spec, None)
