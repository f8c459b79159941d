"""glm: federated Newton–Raphson equals statsmodels GLM on the pooled rows (1e-8)."""

from __future__ import annotations

import duckdb
import numpy as np
import polars as pl
import pytest
import statsmodels.api as sm
from _helpers import MODEL_COVARIATES, MODEL_COVARIATES_AT_ENTRY
from conftest import ANALYSIS_COHORT_SQL
from pydantic import ValidationError

from studies.analyses import REGISTRY

LOGISTIC = {
    "id": "risk",
    "kind": "glm",
    "family": "binomial",
    "cohort": "exposed",
    "outcome": "outcome",
    "outcome_window": {"start": 1, "end": 1825},
    "covariates": MODEL_COVARIATES,
}
POISSON = {**LOGISTIC, "id": "rate", "family": "poisson", "offset": True}


def _pooled_rows(path, spec: dict) -> pl.DataFrame:
    """The design rows of the union, built with independent SQL."""
    con = duckdb.connect(str(path), read_only=True)
    con.execute(ANALYSIS_COHORT_SQL)
    cohort_id = {"exposed": 1, "population": 4}[spec["cohort"]]
    w = spec["outcome_window"]
    frame = con.sql(
        f"""
        SELECT {MODEL_COVARIATES_AT_ENTRY},
               (SELECT count(*) FROM cohort o WHERE o.cohort_definition_id = 3
                  AND o.subject_id = t.subject_id
                  AND o.cohort_start_date - t.cohort_start_date BETWEEN {w["start"]} AND {w["end"]})
                 AS events,
               least(t.cohort_start_date + {w["end"]}, op.observation_period_end_date)
                 - (t.cohort_start_date + {w["start"]}) + 1 AS days
        FROM cohort t JOIN person p ON p.person_id = t.subject_id
        JOIN observation_period op ON op.person_id = t.subject_id
        WHERE t.cohort_definition_id = {cohort_id}
        """
    ).pl()
    con.close()
    return frame


def _coefficients(result: pl.DataFrame, name: str) -> np.ndarray:
    rows = result.filter(pl.col("estimate_name") == name)
    order = ["(Intercept)", "age", "sex_male", "cohort_comparator"]
    by_term = dict(zip(rows["variable_name"], rows["estimate_value"].cast(pl.Float64), strict=True))
    return np.array([by_term[t] for t in order])


def _model(result: pl.DataFrame, name: str) -> str:
    return result.filter((pl.col("variable_name") == "model") & (pl.col("estimate_name") == name))[
        "estimate_value"
    ].item()


@pytest.mark.parametrize("spec", [LOGISTIC, POISSON], ids=["logistic", "poisson"])
def test_federated_glm_equals_statsmodels_on_union(analysis_node_dbs, run_analysis, spec):
    fed, rounds = run_analysis(spec, analysis_node_dbs["nodes"])
    rows = _pooled_rows(analysis_node_dbs["union"], spec)
    x = sm.add_constant(rows.select("age", "sex_male", "cohort_comparator").to_numpy())
    if spec["family"] == "binomial":
        y = (rows["events"] > 0).cast(pl.Float64).to_numpy()
        model = sm.GLM(y, x, family=sm.families.Binomial())
    else:
        rows = rows.filter(pl.col("days") > 0)
        x = sm.add_constant(rows.select("age", "sex_male", "cohort_comparator").to_numpy())
        y = rows["events"].cast(pl.Float64).to_numpy()
        offset = np.log(rows["days"].to_numpy() / 365.25)
        model = sm.GLM(y, x, family=sm.families.Poisson(), offset=offset)
    ref = model.fit(tol=1e-14, maxiter=200)
    np.testing.assert_allclose(_coefficients(fed, "coefficient"), ref.params, rtol=0, atol=1e-8)
    np.testing.assert_allclose(_coefficients(fed, "standard_error"), ref.bse, rtol=0, atol=1e-8)
    np.testing.assert_allclose(_coefficients(fed, "p_value"), ref.pvalues, rtol=1e-6, atol=1e-12)
    ci = ref.conf_int()
    np.testing.assert_allclose(_coefficients(fed, "coefficient_95CI_lower"), ci[:, 0], atol=1e-8)
    assert float(_model(fed, "deviance")) == pytest.approx(ref.deviance, rel=1e-9)
    assert int(_model(fed, "number_records")) == len(y)
    assert _model(fed, "converged") == "TRUE"
    assert int(_model(fed, "iterations")) == rounds
    assert 3 <= rounds <= 15
    assert abs(_coefficients(fed, "coefficient")[2]) > 0.1  # the simulated male effect shows up


def test_local_returns_aggregates_and_guards(analysis_node_dbs, open_analysis_cdm):
    cdm = open_analysis_cdm(analysis_node_dbs["nodes"][1])
    spec = REGISTRY["glm"].Spec.model_validate(LOGISTIC)
    stats = REGISTRY["glm"]().local(cdm, spec, {"beta": [0.1, 0.2, 0.3, 0.4]})
    counts = stats.filter(pl.col("release_class") == "count")
    by_key = {
        (r["variable_name"], r["variable_level"]): r["value"] for r in counts.iter_rows(named=True)
    }
    n = by_key[("records", "")]
    assert by_key[("outcome", "1")] + by_key[("outcome", "0")] == n
    assert by_key[("sex_male", "1")] + by_key[("sex_male", "0")] == n
    assert ("age", "1") not in by_key  # continuous covariates have no level counts
    values = stats.filter(pl.col("release_class") == "value")
    assert values.height == 4 + 10 + 1  # score, upper-triangle information, deviance
    assert stats.height == 1 + 2 + 4 + 15


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"family": "gamma"}, "family"),
        ({"offset": True}, "offset is only for family 'poisson'"),
        ({"covariates": [{"type": "sex"}, {"type": "sex"}]}, "repeat a term"),
        ({"covariates": [{"type": "bmi"}]}, "covariates"),
        ({"covariates": [{"type": "age", "scale": 0}]}, "scale"),
        ({"outcome_window": {"start": 5, "end": 1}}, "window start"),
    ],
)
def test_bad_spec(change, message):
    with pytest.raises(ValidationError, match=message):
        REGISTRY["glm"].Spec.model_validate({**LOGISTIC, **change})
