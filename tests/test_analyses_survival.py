"""survival: federated Kaplan–Meier and log-rank equal lifelines on the union of the nodes."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import polars as pl
import pytest
from _helpers import OUTCOME_AROUND_ENTRY, time_to_event
from conftest import ANALYSIS_COHORT_SQL
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test, multivariate_logrank_test
from lifelines.utils import median_survival_times

from studies.analyses import REGISTRY
from studies.analyses.time_axis import merged_grid, segment_table

SPEC = {
    "id": "km",
    "kind": "survival",
    "target_cohorts": ["population", "exposed"],
    "outcome": "outcome",
    "strata": [],
}
#: Cohort name -> id in the test cohort table (``conftest.ANALYSIS_COHORT_SQL``).
IDS = {"exposed": 1, "comparator": 2, "population": 4}


def _durations(path, bin_days: int = 1, washout: int | None = None) -> pl.DataFrame:
    """Time to first outcome on/after entry, censored at cohort end, written independently."""
    con = duckdb.connect(str(path), read_only=True)
    con.execute(ANALYSIS_COHORT_SQL)
    frame = con.sql(
        f"""
        SELECT t.cohort_definition_id AS id, t.subject_id,
               CASE WHEN p.gender_concept_id = 8507 THEN 'Male' ELSE 'Female' END AS sex,
               {OUTCOME_AROUND_ENTRY}
        FROM cohort t JOIN person p ON p.person_id = t.subject_id
        WHERE t.cohort_definition_id IN (1, 2, 4)
        """
    ).pl()
    con.close()
    return time_to_event(frame, bin_days, washout, name="duration")


def _curve(result: pl.DataFrame, cohort: str, stratum: str = "overall") -> pl.DataFrame:
    rows = result.filter(
        (pl.col("group_level") == cohort)
        & (pl.col("strata_level") == stratum)
        & (pl.col("additional_name") == "time")
    )
    return (
        rows.with_columns(
            pl.col("additional_level").cast(pl.Int64).alias("time"),
            pl.col("estimate_value").cast(pl.Float64),
        )
        .pivot(on="estimate_name", index="time", values="estimate_value")
        .sort("time")
    )


def _summary(result: pl.DataFrame, cohort: str, name: str) -> float:
    row = result.filter(
        (pl.col("group_level") == cohort)
        & (pl.col("strata_name") == "overall")
        & (pl.col("additional_name") == "overall")
        & (pl.col("estimate_name") == name)
    )
    return float(row["estimate_value"].item().replace("NA", "nan"))


def merged_grid_of(spec: dict, open_analysis_cdm, paths) -> list[int]:
    """The grid ``combine`` merges from the nodes' released segments (round 0)."""
    analysis = REGISTRY["survival"]()
    parsed = analysis.Spec.model_validate(spec)
    tables = [analysis.local(open_analysis_cdm(p), parsed, None) for p in paths]
    return merged_grid([segment_table(t)["end"].to_list() for t in tables])


def on_grid(rows: pl.DataFrame, grid: list[int]) -> pl.DataFrame:
    """``duration`` rounded up to the first grid time at or after it (independently)."""
    target = np.asarray(grid)
    position = np.searchsorted(target, rows["duration"].to_numpy(), side="left")
    assert position.max() < target.size
    return rows.with_columns(pl.Series("duration", target[position]))


@pytest.mark.parametrize("bin_days", [90])
def test_federated_km_equals_lifelines_on_the_merged_grid(
    analysis_node_dbs, run_analysis, open_analysis_cdm, bin_days
):
    """KM and log-rank equal lifelines on the union with times coarsened to the merged grid;
    on it every node has 0 or >= 10 events and censorings per cohort, stratum and bin."""
    spec = {**SPEC, "time_bin_days": bin_days}
    fed, _ = run_analysis(spec, analysis_node_dbs["nodes"])
    grid = merged_grid_of(spec, open_analysis_cdm, analysis_node_dbs["nodes"])
    assert len(grid) >= 2
    for node in analysis_node_dbs["nodes"]:
        rows = on_grid(_durations(node, bin_days), grid)
        rows = rows.filter(pl.col("id").is_in([IDS[c] for c in SPEC["target_cohorts"]]))
        cells = rows.group_by("id", "duration").agg(
            pl.col("event").sum().alias("d"), (~pl.col("event")).sum().alias("c")
        )
        assert all(n == 0 or n >= 10 for n in (*cells["d"], *cells["c"]))

    data = on_grid(_durations(analysis_node_dbs["union"], bin_days), grid)
    for cohort in SPEC["target_cohorts"]:
        rows = data.filter(pl.col("id") == IDS[cohort])
        kmf = KaplanMeierFitter().fit(rows["duration"].to_numpy(), rows["event"].to_numpy())
        curve = _curve(fed, cohort)
        assert curve["time"].to_list() == [int(t) for t in kmf.survival_function_.index]
        np.testing.assert_allclose(
            curve["estimate"], kmf.survival_function_.iloc[:, 0], rtol=0, atol=1e-12
        )
        ci = kmf.confidence_interval_.to_numpy()
        np.testing.assert_allclose(curve["estimate_95CI_lower"], ci[:, 0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(curve["estimate_95CI_upper"], ci[:, 1], rtol=0, atol=1e-12)
        table = kmf.event_table
        np.testing.assert_array_equal(curve["n_risk"], table["at_risk"])
        np.testing.assert_array_equal(curve["n_event"], table["observed"])
        np.testing.assert_array_equal(curve["n_censor"], table["censored"])
        median = _summary(fed, cohort, "median_survival")
        if math.isinf(kmf.median_survival_time_):
            assert math.isnan(median)
        else:
            assert median == kmf.median_survival_time_
        assert _summary(fed, cohort, "number_records") == rows.height

    a, b = (data.filter(pl.col("id") == IDS[c]) for c in SPEC["target_cohorts"])
    expected = logrank_test(a["duration"], b["duration"], a["event"], b["event"])
    test_row = fed.filter(
        (pl.col("variable_name") == "log_rank") & (pl.col("strata_name") == "overall")
    )
    got = dict(zip(test_row["estimate_name"], test_row["estimate_value"], strict=True))
    assert test_row["group_level"].unique().to_list() == ["population vs exposed"]
    assert float(got["chi_squared"]) == pytest.approx(expected.test_statistic, rel=1e-10)
    assert float(got["p_value"]) == pytest.approx(expected.p_value, rel=1e-9)


def test_strata_and_median_reached(analysis_node_dbs, run_analysis, open_analysis_cdm):
    """Per-sex curves match lifelines too; the long follow-up drives the curve below 0.5."""
    spec = {**SPEC, "target_cohorts": ["population"], "strata": ["sex"]}
    fed, _ = run_analysis(spec, analysis_node_dbs["nodes"])
    grid = merged_grid_of(spec, open_analysis_cdm, analysis_node_dbs["nodes"])
    con = duckdb.connect(str(analysis_node_dbs["union"]), read_only=True)
    con.execute(ANALYSIS_COHORT_SQL)
    data = con.sql(
        """
        SELECT sex, date_diff('day', start, coalesce(first_after, stop)) AS duration,
               first_after IS NOT NULL AS event
        FROM (
            SELECT CASE WHEN p.gender_concept_id = 8507 THEN 'Male' ELSE 'Female' END AS sex,
                   t.cohort_start_date AS start, t.cohort_end_date AS stop,
                   min(o.cohort_start_date) AS first_after
            FROM cohort t JOIN person p ON p.person_id = t.subject_id
            LEFT JOIN cohort o ON o.cohort_definition_id = 3 AND o.subject_id = t.subject_id
                 AND o.cohort_start_date >= t.cohort_start_date
                 AND o.cohort_start_date <= t.cohort_end_date
            WHERE t.cohort_definition_id = 4 GROUP BY ALL)
        """
    ).pl()
    con.close()
    data = on_grid(data.with_columns((pl.col("duration") / 30).ceil() * 30), grid)
    for sex in ("Female", "Male"):
        rows = data.filter(pl.col("sex") == sex)
        kmf = KaplanMeierFitter().fit(rows["duration"].to_numpy(), rows["event"].to_numpy())
        curve = _curve(fed, "population", sex)
        np.testing.assert_allclose(curve["estimate"], kmf.survival_function_.iloc[:, 0], atol=1e-12)
    overall = data
    kmf = KaplanMeierFitter().fit(overall["duration"].to_numpy(), overall["event"].to_numpy())
    assert _summary(fed, "population", "median_survival") == kmf.median_survival_time_
    assert math.isfinite(kmf.median_survival_time_)
    lower, upper = median_survival_times(kmf.confidence_interval_).to_numpy()[0]
    assert _summary(fed, "population", "median_survival_95CI_lower") == lower
    assert _summary(fed, "population", "median_survival_95CI_upper") == upper


def test_three_group_log_rank(analysis_node_dbs, run_analysis, open_analysis_cdm):
    spec = {**SPEC, "target_cohorts": ["exposed", "comparator", "population"], "time_bin_days": 90}
    fed, _ = run_analysis(spec, analysis_node_dbs["nodes"])
    assert fed.filter(pl.col("variable_name") == "log_rank")["group_level"].unique().to_list() == [
        "exposed vs comparator vs population"
    ]
    grid = merged_grid_of(spec, open_analysis_cdm, analysis_node_dbs["nodes"])
    data = on_grid(_durations(analysis_node_dbs["union"], 90), grid)
    three = multivariate_logrank_test(data["duration"], data["id"], data["event"])
    chi = fed.filter(
        (pl.col("variable_name") == "log_rank") & (pl.col("estimate_name") == "chi_squared")
    )
    assert float(chi["estimate_value"].item()) == pytest.approx(three.test_statistic, rel=1e-10)
