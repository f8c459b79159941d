"""meta: per-node estimates are the nodes' own 2x2/rate estimates; pooling equals statsmodels."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import polars as pl
import pytest
from _helpers import odds_ratio_meta
from conftest import ANALYSIS_COHORT_SQL
from pydantic import ValidationError
from statsmodels.stats.meta_analysis import combine_effects

from studies.analyses import REGISTRY
from studies.analyses.meta import dersimonian_laird

ODDS = odds_ratio_meta(730)
RATE = {
    "id": "ir_meta",
    "kind": "meta",
    "measure": "log_incidence_rate",
    "target": "exposed",
    "outcome": "outcome",
}


def _table(path) -> tuple[int, int, int, int]:
    """Direct 2x2 table on one node: (a, b, c, d) = target events/non-events, comparator ..."""
    con = duckdb.connect(str(path), read_only=True)
    con.execute(ANALYSIS_COHORT_SQL)
    rows = con.sql(
        """SELECT t.cohort_definition_id AS id, count(*) AS n,
                  count(*) FILTER (EXISTS (SELECT 1 FROM cohort o WHERE o.cohort_definition_id = 3
                      AND o.subject_id = t.subject_id
                      AND o.cohort_start_date - t.cohort_start_date BETWEEN 1 AND 730)) AS e
           FROM cohort t WHERE t.cohort_definition_id IN (1, 2) GROUP BY 1"""
    ).fetchall()
    con.close()
    cells = {r[0]: (r[2], r[1] - r[2]) for r in rows}
    return (*cells[1], *cells[2])


def _get(result: pl.DataFrame, variable: str, estimate: str, cdm: str = "federated") -> float:
    row = result.filter(
        (pl.col("variable_name") == variable)
        & (pl.col("estimate_name") == estimate)
        & (pl.col("cdm_name") == cdm)
    )
    return float(row["estimate_value"].item())


def test_meta_log_odds_ratio_matches_statsmodels(analysis_node_dbs, run_analysis):
    fed, _ = run_analysis(ODDS, analysis_node_dbs["nodes"])
    ys, variances = [], []
    for path in analysis_node_dbs["nodes"]:
        a, b, c, d = _table(path)
        y, se = math.log(a * d / (b * c)), math.sqrt(1 / a + 1 / b + 1 / c + 1 / d)
        assert _get(fed, "log_odds_ratio", "estimate", path.stem) == pytest.approx(y, rel=1e-12)
        assert _get(fed, "log_odds_ratio", "standard_error", path.stem) == pytest.approx(
            se, rel=1e-12
        )
        ys.append(y)
        variances.append(se**2)
    ref = combine_effects(np.array(ys), np.array(variances), method_re="dl")
    frame = ref.summary_frame()
    assert _get(fed, "fixed_effect", "estimate") == pytest.approx(
        frame.loc["fixed effect", "eff"], rel=1e-12
    )
    assert _get(fed, "fixed_effect", "standard_error") == pytest.approx(
        frame.loc["fixed effect", "sd_eff"], rel=1e-12
    )
    assert _get(fed, "heterogeneity", "q") == pytest.approx(ref.q, rel=1e-12)
    # statsmodels' "dl" does not truncate a negative tau^2 at 0; DerSimonian-Laird does
    assert _get(fed, "heterogeneity", "tau_squared") == pytest.approx(max(ref.tau2, 0.0), abs=1e-15)
    assert _get(fed, "heterogeneity", "i_squared") == pytest.approx(max(ref.i2, 0) * 100, abs=1e-12)
    if ref.tau2 <= 0:
        assert _get(fed, "random_effects", "estimate") == _get(fed, "fixed_effect", "estimate")
    else:
        assert _get(fed, "random_effects", "estimate") == pytest.approx(
            frame.loc["random effect", "eff"], rel=1e-12
        )
    assert _get(fed, "heterogeneity", "number_nodes") == 3
    group = fed["group_level"].unique().to_list()
    assert group == ["exposed &&& comparator"]


def test_heterogeneous_hand_formula():
    """A textbook case with clear heterogeneity: DL τ² and I² by hand."""
    y, se = np.array([0.0, 1.0, 2.0]), np.array([0.2, 0.2, 0.2])
    out = dersimonian_laird(y, se, 0.95)
    w = 1 / 0.04
    q = w * ((0 - 1) ** 2 + 0 + (2 - 1) ** 2)  # 50
    tau2 = (q - 2) / (3 * w - 3 * w**2 / (3 * w))
    assert out["heterogeneity"]["q"] == pytest.approx(q)
    assert out["heterogeneity"]["tau_squared"] == pytest.approx(tau2)
    assert out["heterogeneity"]["i_squared"] == pytest.approx((q - 2) / q * 100)
    assert out["random_effects"]["standard_error"] == pytest.approx(math.sqrt((0.04 + tau2) / 3))
    y2, se2 = np.array([0.1, 0.3, 0.9, -0.2]), np.array([0.1, 0.15, 0.2, 0.12])
    ref = combine_effects(y2, se2**2, method_re="dl").summary_frame()
    out = dersimonian_laird(y2, se2, 0.95)["random_effects"]
    assert out["estimate"] == pytest.approx(ref.loc["random effect", "eff"], rel=1e-12)
    assert out["standard_error"] == pytest.approx(ref.loc["random effect", "sd_eff"], rel=1e-12)
    assert out["estimate_95CI_upper"] == pytest.approx(
        ref.loc["random effect", "ci_upp"], rel=1e-12
    )


def test_meta_log_incidence_rate(analysis_node_dbs, run_analysis):
    fed, _ = run_analysis(RATE, analysis_node_dbs["nodes"])
    incidence = {
        "id": "ir",
        "kind": "incidence",
        "denominator_cohort": "exposed",
        "outcome": "outcome",
    }
    ys, variances = [], []
    for path in analysis_node_dbs["nodes"]:
        node, _ = run_analysis(incidence, [path])
        value = dict(zip(node["estimate_name"], node["estimate_value"], strict=True))
        y = math.log(float(value["incidence_1000_pys"]))
        assert _get(fed, "log_incidence_rate", "estimate", path.stem) == pytest.approx(y, rel=1e-12)
        ys.append(y)
        variances.append(1 / float(value["outcome_count"]))
    ref = combine_effects(np.array(ys), np.array(variances), method_re="dl")
    row = "random effect" if ref.tau2 > 0 else "fixed effect"
    expected = ref.summary_frame().loc[row, "eff"]
    assert _get(fed, "random_effects", "estimate") == pytest.approx(expected, rel=1e-12)
    assert _get(fed, "random_effects", "exp_estimate") == pytest.approx(math.exp(expected))


def test_suppressed_node_left_out(analysis_node_dbs, open_analysis_cdm):
    """A node whose gate withheld the estimate (NaN) drops out of the pooling."""
    analysis = REGISTRY["meta"]()
    spec = analysis.Spec.model_validate(ODDS)
    stats = [analysis.local(open_analysis_cdm(p), spec, None) for p in analysis_node_dbs["nodes"]]
    stats[1] = stats[1].with_columns(pl.lit(float("nan")).alias("value"))
    from studies.analysis import CombineInput

    result = analysis.combine(CombineInput(stats, ["a", "b", "c"]), spec, None).result
    assert _get(result, "heterogeneity", "number_nodes") == 2
    assert set(result["cdm_name"]) == {"a", "c", "federated"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"comparator": None}, "needs a 'comparator'"),
        ({"comparator": "exposed"}, "must differ"),
        ({"measure": "hazard_ratio"}, "measure"),
    ],
)
def test_bad_meta_spec(change, message):
    with pytest.raises(ValidationError, match=message):
        REGISTRY["meta"].Spec.model_validate({**ODDS, **change})
