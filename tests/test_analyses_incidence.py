"""incidence and prevalence: federated results equal direct SQL on the union; exact CIs."""

from __future__ import annotations

import duckdb
import polars as pl
import pytest
from _helpers import period_prevalence
from conftest import ANALYSIS_COHORT_SQL
from pydantic import ValidationError
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from studies.analyses import REGISTRY

INCIDENCE = {
    "id": "ir",
    "kind": "incidence",
    "denominator_cohort": "exposed",
    "outcome": "outcome",
    "outcome_washout": 180,
    "strata": ["sex", "calendar_year"],
}
PERIOD = period_prevalence(
    "prev", [("2010-01-01", "2010-12-31"), ("2012-01-01", "2012-06-30")], ["sex"]
)
POINT = {
    **PERIOD,
    "id": "point",
    "type": "point",
    "outcome": "exposed",
    "periods": [],
    "dates": ["2009-07-01", "2013-03-15"],
}


def _sql(path, sql: str, params: dict | None = None) -> pl.DataFrame:
    con = duckdb.connect(str(path), read_only=True)
    con.execute(ANALYSIS_COHORT_SQL)
    frame = con.sql(sql, params=params).pl()
    con.close()
    return frame


def _value(result: pl.DataFrame, estimate: str, strata: str = "overall", **where) -> float:
    rows = result.filter((pl.col("estimate_name") == estimate) & (pl.col("strata_level") == strata))
    for column, value in where.items():
        rows = rows.filter(pl.col(column) == value)
    return float(rows["estimate_value"].item())


AT_RISK = """
WITH f AS (
  SELECT t.subject_id, t.cohort_start_date AS start, t.cohort_end_date AS stop,
         CASE WHEN p.gender_concept_id = 8507 THEN 'Male' ELSE 'Female' END AS sex,
         (SELECT min(o.cohort_start_date) FROM cohort o WHERE o.cohort_definition_id = 3
            AND o.subject_id = t.subject_id AND o.cohort_start_date >= t.cohort_start_date) AS ev,
         (SELECT max(o.cohort_start_date) FROM cohort o WHERE o.cohort_definition_id = 3
            AND o.subject_id = t.subject_id AND o.cohort_start_date < t.cohort_start_date) AS prior
  FROM cohort t JOIN person p ON p.person_id = t.subject_id WHERE t.cohort_definition_id = 1)
SELECT subject_id, sex, start, coalesce(ev <= stop, false) AS event,
       CASE WHEN ev <= stop THEN ev ELSE stop END AS tar_end
FROM f WHERE prior IS NULL OR start - prior > 180
"""


def test_federated_incidence_equals_direct_sql_on_union(analysis_node_dbs, run_analysis):
    fed, _ = run_analysis(INCIDENCE, analysis_node_dbs["nodes"])
    union, _ = run_analysis(INCIDENCE, [analysis_node_dbs["union"]])
    key = ["group_level", "strata_name", "strata_level", "variable_name", "estimate_name"]
    assert fed.sort(key)["estimate_value"].equals(union.sort(key)["estimate_value"])

    direct = _sql(
        analysis_node_dbs["union"],
        f"""SELECT sex, count(DISTINCT subject_id) AS persons, count(*) FILTER (event) AS events,
                   CAST(sum(tar_end - start + 1) AS BIGINT) AS days
            FROM ({AT_RISK}) GROUP BY ROLLUP (sex)""",
    )
    for row in direct.iter_rows(named=True):
        stratum = row["sex"] or "overall"
        assert _value(fed, "outcome_count", stratum) == row["events"]
        assert _value(fed, "person_days", stratum) == row["days"]
        assert _value(fed, "denominator_count", stratum) == row["persons"]
        years = row["days"] / 365.25
        assert _value(fed, "incidence_1000_pys", stratum) == pytest.approx(
            row["events"] / years * 1000, rel=1e-12
        )
        lower = stats.gamma.ppf(0.025, row["events"]) / years * 1000
        upper = stats.gamma.ppf(0.975, row["events"] + 1) / years * 1000
        assert _value(fed, "incidence_1000_pys_95CI_lower", stratum) == pytest.approx(
            lower, rel=1e-9
        )
        assert _value(fed, "incidence_1000_pys_95CI_upper", stratum) == pytest.approx(
            upper, rel=1e-9
        )

    # person-time is split by the calendar year it was lived in
    in_2012 = _sql(
        analysis_node_dbs["union"],
        f"""SELECT count(*) FILTER (event AND year(tar_end) = 2012) AS events,
                   CAST(sum(least(tar_end, DATE '2012-12-31') - greatest(start, DATE '2012-01-01') + 1) AS BIGINT)
                     AS days
            FROM ({AT_RISK}) WHERE start <= DATE '2012-12-31' AND tar_end >= DATE '2012-01-01'""",
    ).row(0, named=True)
    assert _value(fed, "outcome_count", "2012") == in_2012["events"]
    assert _value(fed, "person_days", "2012") == in_2012["days"]
    years = fed.filter(
        (pl.col("strata_name") == "calendar_year") & (pl.col("estimate_name") == "person_days")
    )
    assert (
        years["estimate_value"].cast(pl.Int64).sum()
        == direct.filter(pl.col("sex").is_null())["days"].item()
    )


def test_incidence_statistics_kinds(analysis_node_dbs, open_analysis_cdm):
    cdm = open_analysis_cdm(analysis_node_dbs["nodes"][0])
    stats_ = REGISTRY["incidence"]().local(
        cdm, REGISTRY["incidence"].Spec.model_validate(INCIDENCE), None
    )
    kinds = dict(stats_.select("estimate_name", "release_class").unique().iter_rows())
    assert kinds == {"denominator_count": "count", "outcome_count": "count", "person_days": "sum"}
    days = stats_.filter(pl.col("release_class") == "sum")
    assert days["lower"].unique().to_list() == [0.0] and days["upper"].min() > 36500


@pytest.mark.parametrize("spec", [PERIOD, POINT], ids=["period", "point"])
def test_federated_prevalence_equals_direct_sql(analysis_node_dbs, run_analysis, spec):
    fed, _ = run_analysis(spec, analysis_node_dbs["nodes"])
    intervals = (
        [(p["start"], p["end"]) for p in spec["periods"]]
        if spec["type"] == "period"
        else [(d, d) for d in spec["dates"]]
    )
    for start, end in intervals:
        row = _sql(
            analysis_node_dbs["union"],
            """
            SELECT count(DISTINCT d.subject_id) AS n,
                   count(DISTINCT d.subject_id) FILTER (EXISTS (
                       SELECT 1 FROM cohort o WHERE o.cohort_definition_id = $outcome
                         AND o.subject_id = d.subject_id
                         AND o.cohort_start_date <= least(d.cohort_end_date, $end::DATE)
                         AND o.cohort_end_date >= greatest(d.cohort_start_date, $start::DATE))) AS x
            FROM cohort d WHERE d.cohort_definition_id = 4
              AND d.cohort_start_date <= $end::DATE AND d.cohort_end_date >= $start::DATE
            """,
            {"start": start, "end": end, "outcome": {"outcome": 3, "exposed": 1}[spec["outcome"]]},
        ).row(0, named=True)
        where = {"additional_level": f"{start} &&& {end}"}
        assert _value(fed, "denominator_count", **where) == row["n"]
        assert _value(fed, "outcome_count", **where) == row["x"]
        assert _value(fed, "prevalence", **where) == pytest.approx(row["x"] / row["n"], rel=1e-12)
        lower, upper = proportion_confint(row["x"], row["n"], method="wilson")
        assert _value(fed, "prevalence_95CI_lower", **where) == pytest.approx(lower, rel=1e-9)
        assert _value(fed, "prevalence_95CI_upper", **where) == pytest.approx(upper, rel=1e-9)
        assert row["n"] > 100 and row["x"] > 5
    by_sex = fed.filter(
        (pl.col("strata_name") == "sex") & (pl.col("estimate_name") == "denominator_count")
    )
    overall = fed.filter(
        (pl.col("strata_name") == "overall") & (pl.col("estimate_name") == "denominator_count")
    )
    assert (
        by_sex["estimate_value"].cast(pl.Int64).sum()
        == overall["estimate_value"].cast(pl.Int64).sum()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dates": ["2010-01-01"]}, "no 'dates'"),
        ({"periods": []}, "needs 'periods'"),
        ({"periods": [{"start": "2011-01-01", "end": "2010-01-01"}]}, "after its end"),
        ({"strata": ["calendar_year"]}, "strata"),
    ],
)
def test_bad_prevalence_spec(change, message):
    with pytest.raises(ValidationError, match=message):
        REGISTRY["prevalence"].Spec.model_validate({**PERIOD, **change})


def test_withheld_cells_leave_the_whole_group_out(analysis_node_dbs, open_analysis_cdm):
    """A node whose gate withheld a stratum's outcome count withholds the pooled stratum: no
    sum of the other nodes (it would understate the cell), NA with the node named, never 0."""
    from studies.analysis import CombineInput

    analysis = REGISTRY["incidence"]()
    spec = analysis.Spec.model_validate(INCIDENCE)
    stats_ = [analysis.local(open_analysis_cdm(p), spec, None) for p in analysis_node_dbs["nodes"]]
    male = (pl.col("strata_level") == "Male") & (pl.col("estimate_name") == "outcome_count")
    withheld = stats_[0].with_columns(
        pl.when(male).then(float("nan")).otherwise(pl.col("value")).alias("value")
    )
    result = analysis.combine(CombineInput([withheld, *stats_[1:]]), spec, None).result
    for estimate in ("person_days", "outcome_count", "denominator_count", "incidence_1000_pys"):
        row = result.filter(
            (pl.col("strata_level") == "Male") & (pl.col("estimate_name") == estimate)
        )
        assert row["estimate_value"].to_list() == ["NA"], estimate
    flag = result.filter(
        (pl.col("strata_level") == "Male") & (pl.col("estimate_name") == "nodes_withheld")
    )
    assert flag["estimate_value"].to_list() == ["node1"]
    full = pl.concat(stats_).filter(pl.col("strata_level") == "Female")
    assert (
        _value(result, "person_days", "Female")
        == full.filter(pl.col("estimate_name") == "person_days")["value"].sum()
    )
