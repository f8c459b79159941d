"""cox: federated Newton–Raphson (Breslow ties) equals statsmodels PHReg on the pooled rows."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest
from _helpers import (
    MODEL_COVARIATES,
    MODEL_COVARIATES_AT_ENTRY,
    OUTCOME_AROUND_ENTRY,
    time_to_event,
)
from conftest import ANALYSIS_COHORT_SQL
from pydantic import ValidationError
from statsmodels.duration.hazard_regression import PHReg

from studies.analyses import REGISTRY
from studies.analysis import CombineInput

SPEC = {
    "id": "hazard",
    "kind": "cox",
    "cohort": "exposed",
    "outcome": "outcome",
    "covariates": MODEL_COVARIATES,
}


def _pooled_rows(path, bin_days: int, cohort_id: int = 1) -> pl.DataFrame:
    """Time to first outcome and covariates on the union, written independently."""
    con = duckdb.connect(str(path), read_only=True)
    con.execute(ANALYSIS_COHORT_SQL)
    frame = con.sql(
        f"""
        SELECT {MODEL_COVARIATES_AT_ENTRY},
               {OUTCOME_AROUND_ENTRY}
        FROM cohort t JOIN person p ON p.person_id = t.subject_id
        WHERE t.cohort_definition_id = {cohort_id}
        """
    ).pl()
    con.close()
    return time_to_event(frame, bin_days)


TERMS = ("age", "sex_male", "cohort_comparator")


def _terms(result: pl.DataFrame, name: str, terms: tuple[str, ...] = TERMS) -> np.ndarray:
    rows = result.filter(pl.col("estimate_name") == name)
    by_term = dict(zip(rows["variable_name"], rows["estimate_value"].cast(pl.Float64), strict=True))
    return np.array([by_term[t] for t in terms])


def _grid(spec: dict, open_analysis_cdm, paths) -> list[int]:
    """The merged grid that round 0's releases give (``combine`` of the node tables)."""
    analysis = REGISTRY["cox"]()
    parsed = analysis.Spec.model_validate(spec)
    cdms = [open_analysis_cdm(p) for p in paths]
    step = analysis.combine(
        CombineInput([analysis.local(c, parsed, None) for c in cdms], [c.cdm_name for c in cdms]),
        parsed,
        None,
    )
    return step.state["grid"]


def coarsened(rows: pl.DataFrame, grid: list[int]) -> pl.DataFrame:
    """Binned times rounded up to the first grid time at or after them (independently)."""
    target = np.asarray(grid)
    position = np.searchsorted(target, rows["time"].to_numpy(), side="left")
    assert position.max() < target.size  # the grid covers every time
    return rows.with_columns(pl.Series("time", target[position]))


@pytest.mark.parametrize(
    ("cohort", "cohort_id", "bin_days", "times"),
    [("exposed", 1, 30, 1), ("exposed", 1, 90, 2), ("population", 4, 30, 6)],
)
def test_federated_cox_equals_statsmodels_breslow_on_the_merged_grid(
    analysis_node_dbs, run_analysis, open_analysis_cdm, cohort, cohort_id, bin_days, times
):
    """The federated fit is the pooled Breslow fit with times coarsened to the merged grid,
    and on that grid every node has 0 or >= 10 events and 0 or >= 10 censorings per bin."""
    terms = TERMS if cohort == "exposed" else TERMS[:2]  # population: no comparator before
    spec = {**SPEC, "cohort": cohort, "time_bin_days": bin_days}
    spec["covariates"] = spec["covariates"][: len(terms)]
    fed, rounds = run_analysis(spec, analysis_node_dbs["nodes"])
    grid = _grid(spec, open_analysis_cdm, analysis_node_dbs["nodes"])
    assert len(grid) >= times
    for node in analysis_node_dbs["nodes"]:
        per_bin = (
            coarsened(_pooled_rows(node, bin_days, cohort_id), grid)
            .group_by("time")
            .agg(pl.col("event").sum().alias("events"), (~pl.col("event")).sum().alias("censored"))
        )
        for count in (*per_bin["events"], *per_bin["censored"]):
            assert count == 0 or count >= 10
    rows = coarsened(_pooled_rows(analysis_node_dbs["union"], bin_days, cohort_id), grid)
    x = rows.select(terms).to_numpy()
    ref = PHReg(
        rows["time"].to_numpy(), x, status=rows["event"].to_numpy().astype(float), ties="breslow"
    ).fit(tol=1e-12)
    np.testing.assert_allclose(_terms(fed, "coefficient", terms), ref.params, rtol=0, atol=1e-8)
    np.testing.assert_allclose(_terms(fed, "standard_error", terms), ref.bse, rtol=0, atol=1e-8)
    model = fed.filter(pl.col("variable_name") == "model")
    values = dict(zip(model["estimate_name"], model["estimate_value"], strict=True))
    assert float(values["log_partial_likelihood"]) == pytest.approx(ref.llf, rel=1e-10)
    assert int(values["number_events"]) == int(rows["event"].sum())
    assert int(values["number_records"]) == rows.height
    assert values["converged"] == "TRUE"
    assert int(values["iterations"]) == rounds - 1  # round 0 gathers the event-time grid
    assert np.all(np.isfinite(_terms(fed, "hazard_ratio_95CI_upper", terms)))


def test_withheld_risk_set_drops_that_time(analysis_node_dbs, open_analysis_cdm):
    """A time whose risk set one node withheld leaves the model; the others still fit."""
    from studies.analyses.cox import _score_information
    from studies.analyses.pooling import pool
    from studies.analysis import CombineInput, NextRound

    analysis = REGISTRY["cox"]()
    spec = analysis.Spec.model_validate({**SPEC, "time_bin_days": 90})
    cdms = [open_analysis_cdm(p) for p in analysis_node_dbs["nodes"]]
    state = analysis.combine(
        CombineInput([analysis.local(c, spec, None) for c in cdms]), spec, None
    )
    assert isinstance(state, NextRound) and len(state.state["grid"]) >= 2
    head = state.state["grid"][0]
    stats = [analysis.local(c, spec, state.state) for c in cdms]
    first = (pl.col("variable_name") == "time") & (pl.col("variable_level") == str(head))
    stats[0] = stats[0].with_columns(
        pl.when(first & (pl.col("estimate_name") == "s0"))
        .then(float("nan"))
        .otherwise(pl.col("value"))
        .alias("value")
    )
    grid = dict(zip(state.state["grid"], state.state["events"], strict=True))
    pooled = pool(CombineInput(stats))
    _, _, _, used = _score_information(pooled, state.state, 3)
    assert used == sum(grid.values()) - grid[head] > 0
    _, _, _, everything = _score_information(
        pool(CombineInput([analysis.local(c, spec, state.state) for c in cdms])), state.state, 3
    )
    assert everything == sum(grid.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"covariates": []}, "covariates"),
        ({"covariates": [{"type": "sex"}, {"type": "sex"}]}, "repeat"),
    ],
)
def test_bad_cox_spec(change, message):
    with pytest.raises(ValidationError, match=message):
        REGISTRY["cox"].Spec.model_validate({**SPEC, **change})
