"""Analyses meeting what a gate releases: per-person DP bounds, withheld and empty groups,
partial pools flagged, exact float pooling, concept-set covariates, Cox through the guards."""

from __future__ import annotations

import html
import math
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from _helpers import count_statistics
from conftest import ANALYSIS_COHORT_SQL, ANALYSIS_COHORTS

from privacy.disclosure import DisclosureRefusal, regression_guards
from privacy.dp import noise_statistics
from studies.analyses import REGISTRY
from studies.analyses.pooling import pool
from studies.analysis import CdmContext, CombineInput, Finished
from studies.permit import PermitAnalysis
from studies.statistics import make_statistics

SPECS = {
    "counts": {"id": "n", "kind": "counts", "cohorts": ["exposed"], "strata": ["sex"]},
    "characterization": {
        "id": "baseline",
        "kind": "characterization",
        "cohorts": ["exposed"],
        "domains": ["condition"],
        "top_n": 3,
    },
    "incidence": {
        "id": "rate",
        "kind": "incidence",
        "denominator_cohort": "exposed",
        "outcome": "outcome",
        "strata": ["sex"],
    },
    "prevalence": {
        "id": "share",
        "kind": "prevalence",
        "type": "point",
        "denominator_cohort": "exposed",
        "outcome": "outcome",
        "dates": ["2010-01-01"],
        "strata": ["sex"],
    },
    "survival": {
        "id": "km",
        "kind": "survival",
        "target_cohorts": ["exposed"],
        "outcome": "outcome",
        "time_bin_days": 365,
    },
    "glm": {
        "id": "risk",
        "kind": "glm",
        "family": "binomial",
        "cohort": "exposed",
        "outcome": "outcome",
        "covariates": [{"type": "sex"}],
    },
    "cox": {
        "id": "hazard",
        "kind": "cox",
        "cohort": "exposed",
        "outcome": "outcome",
        "time_bin_days": 365,
        "covariates": [{"type": "sex"}],
    },
    "meta": {
        "id": "rate_meta",
        "kind": "meta",
        "measure": "log_incidence_rate",
        "target": "exposed",
        "outcome": "outcome",
    },
}
#: Models cannot be fitted on nothing: they say so, naming the analysis.
NOTHING_TO_FIT = {
    "glm": "glm risk: cohort 'exposed' has no entries",
    "cox": "cox hazard: no outcome events",
    "meta": "meta rate_meta: no node released an estimate",
}


@pytest.fixture
def cdms(analysis_node_dbs):
    """``open(empty=False)`` -> the three test nodes; ``empty`` points 'exposed' at no rows."""
    opened = []

    def _open(empty: bool = False) -> list[CdmContext]:
        out = []
        for path in analysis_node_dbs["nodes"]:
            con = duckdb.connect(str(path), read_only=True)
            con.execute(ANALYSIS_COHORT_SQL)
            opened.append(con)
            ids = dict(ANALYSIS_COHORTS) | ({"exposed": 99} if empty else {})
            out.append(CdmContext(con=con, cohort_ids=ids, cdm_name=path.stem))
        return out

    yield _open
    for con in opened:
        con.close()


def _run(spec: dict, cdms: list[CdmContext], gate=lambda i, stats: stats) -> pl.DataFrame:
    """The round loop, every node's table passed through ``gate(node index, table)``."""
    analysis = REGISTRY[spec["kind"]]()
    parsed = analysis.Spec.model_validate(spec)
    state = None
    for _ in range(60):
        stats = [gate(i, analysis.local(c, parsed, state)) for i, c in enumerate(cdms)]
        step = analysis.combine(CombineInput(stats, [c.cdm_name for c in cdms]), parsed, state)
        if isinstance(step, Finished):
            return step.result
        state = step.state
    raise AssertionError(f"{spec['id']} did not finish")


def _estimate(result: pl.DataFrame, **where: str) -> list[str]:
    mask = pl.lit(True)
    for column, value in where.items():
        mask = mask & (pl.col(column) == value)
    return result.filter(mask)["estimate_value"].to_list()


# --- 1. DP bounds: record counts withheld, capped counts noised with their cap ----------------


def test_count_rows_declare_persons_or_records(cdms) -> None:
    """Counts of persons keep NaN (one each); counts of entries/events carry inf."""
    nodes = cdms()
    analysis = REGISTRY["counts"]()
    stats = analysis.local(nodes[0], analysis.Spec.model_validate(SPECS["counts"]), None)
    upper = dict(zip(stats["variable_name"], stats["upper"], strict=False))
    assert math.isnan(upper["Number subjects"]) and upper["Number records"] == math.inf
    for kind in ("survival", "cox", "glm"):
        analysis = REGISTRY[kind]()
        stats = analysis.local(nodes[0], analysis.Spec.model_validate(SPECS[kind]), None)
        assert (stats.filter(pl.col("release_class") == "count")["upper"] == math.inf).all(), kind
    analysis = REGISTRY["prevalence"]()
    stats = analysis.local(nodes[0], analysis.Spec.model_validate(SPECS["prevalence"]), None)
    assert stats["upper"].is_nan().all()  # prevalence counts persons


def test_dp_withholds_unbounded_counts_and_scales_noise_by_the_cap() -> None:
    """inf-bounded rows leave as NaN; a count capped at 3 records per person gets 3x the noise
    of a person count (empirically, over many rows), and the release costs the grant."""
    n = 4000
    stats = make_statistics(
        pl.DataFrame(
            {
                "variable_name": [f"v{i}" for i in range(2 * n + 2)],
                "estimate_name": "count",
                "release_class": "count",
                "value": 1000.0,
                "upper": [float("nan")] * n + [3.0] * n + [math.inf, math.inf],
            }
        )
    )
    grant = PermitAnalysis(id="n", mechanism="gaussian", cost=0.5, max_rows_per_person=1)
    noisy, report = noise_statistics(stats, grant, declared_rows=1)
    assert report.values_withheld == 2 and report.rows_noised == 2 * n
    assert noisy["value"].tail(2).is_nan().all()
    assert report.rho == pytest.approx(0.5, rel=1e-9)
    noise = noisy["value"].head(2 * n).to_numpy() - 1000.0
    ratio = noise[n:].std() / noise[:n].std()
    assert ratio == pytest.approx(3.0, rel=0.08)
    assert noise[:n].std() == pytest.approx(report.scale, rel=0.08)


# --- 2. exact float pooling ------------------------------------------------------------------


def test_pool_sums_floats_exactly_in_any_order() -> None:
    """fsum: 1e16 + 1 - 1e16 is 1, whichever node comes first (a plain sum gives 0 or 2)."""
    tables = [
        make_statistics(
            pl.DataFrame({"estimate_name": ["s"], "release_class": ["value"], "value": [v]})
        )
        for v in (1e16, 1.0, -1e16)
    ]
    for order in ([0, 1, 2], [1, 0, 2], [0, 2, 1]):
        pooled = pool(CombineInput([tables[i] for i in order]))
        assert pooled["value"].item() == 1.0


def test_cox_statistics_are_bit_identical_across_runs_and_threads(cdms) -> None:
    analysis = REGISTRY["cox"]()
    spec = analysis.Spec.model_validate(
        {**SPECS["cox"], "time_bin_days": 1, "covariates": [{"type": "age"}, {"type": "sex"}]}
    )
    node = cdms()[2]
    state = analysis.combine(CombineInput([analysis.local(node, spec, None)]), spec, None).state
    state["beta"] = [0.013, -0.21]
    runs = []
    for threads in (1, 4, 1):
        node.con.execute(f"SET threads = {threads}")
        runs.append(analysis.local(node, spec, state))
    assert runs[0].equals(runs[1]) and runs[0].equals(runs[2])


# --- 3. empty cohorts and withheld groups, every kind ------------------------------------------


@pytest.mark.parametrize("kind", list(SPECS))
def test_empty_cohort_gives_a_result_or_a_clear_error(cdms, kind: str) -> None:
    nodes = cdms(empty=True)
    if kind in NOTHING_TO_FIT:
        with pytest.raises(ValueError, match=NOTHING_TO_FIT[kind]):
            _run(SPECS[kind], nodes)
        return
    result = _run(SPECS[kind], nodes)
    zero = {
        "counts": {"variable_name": "Number subjects", "strata_name": "overall"},
        "characterization": {"variable_name": "Number subjects"},
        "incidence": {"estimate_name": "denominator_count", "strata_name": "overall"},
        "prevalence": {"estimate_name": "denominator_count", "strata_name": "overall"},
        "survival": {"estimate_name": "number_records", "strata_name": "overall"},
    }[kind]
    assert _estimate(result, **zero) == ["0"]


def _withhold_small(limit: float):
    """A stand-in for node 1's gate: counts below ``limit`` suppressed, with their groups."""
    from privacy.disclosure import protect

    def gate(i: int, stats: pl.DataFrame) -> pl.DataFrame:
        return protect(stats, int(limit))[0] if i == 1 else stats

    return gate


@pytest.mark.parametrize("kind", ["counts", "characterization", "incidence", "survival"])
def test_withheld_groups_pool_the_others_and_are_flagged(cdms, kind: str) -> None:
    """Node 1's gate suppresses small cells: the pooled groups it withheld sum the other nodes
    and carry ``nodes_contributing`` (at most 2: a group only node 1 had pools nothing) and
    ``nodes_withheld`` = node 1's name."""
    nodes = cdms()
    result = _run(SPECS[kind], nodes, _withhold_small(60))
    flags = result.filter(pl.col("estimate_name") == "nodes_withheld")
    assert flags.height > 0
    assert set(flags["estimate_value"]) == {nodes[1].cdm_name}
    contributing = result.filter(pl.col("estimate_name") == "nodes_contributing")
    assert contributing["estimate_value"].cast(pl.Int64).max() == 2
    assert contributing.height == flags.height
    assert "NA" not in set(flags["estimate_value"])


def test_a_count_one_node_withheld_is_withheld_in_the_pool(cdms) -> None:
    """No partial pools: the sum of nodes 0 and 2 would understate the cell node 1 withheld, so
    the pooled cell is NA, with node 1 named as the reason."""
    nodes = cdms()
    gated = _run(SPECS["counts"], nodes, _withhold_small(10_000))  # node 1 withholds everything
    key = {"variable_name": "Number subjects", "strata_level": "Female"}
    assert _estimate(gated, **key, estimate_name="count") == ["NA"]
    assert _estimate(gated, **key, estimate_name="nodes_withheld") == [nodes[1].cdm_name]


def test_glm_names_a_left_out_node(cdms) -> None:
    nodes = cdms()

    def gate(i: int, stats: pl.DataFrame) -> pl.DataFrame:
        nan = (
            pl.when(pl.col("release_class") == "value")
            .then(float("nan"))
            .otherwise(pl.col("value"))
        )
        return stats.with_columns(nan.alias("value")) if i == 2 else stats

    result = _run(SPECS["glm"], nodes, gate)
    assert _estimate(result, variable_name="model", estimate_name="nodes_withheld") == [
        nodes[2].cdm_name
    ]
    assert _estimate(result, variable_name="model", estimate_name="number_nodes") == ["2"]


def test_report_flags_partial_pools(cdms, tmp_path: Path) -> None:
    from coordinator.report import write_report
    from studies.results import bind_results, write_results

    nodes = cdms()
    result = _run(SPECS["counts"], nodes, _withhold_small(60))
    setting = {"result_type": "counts", "analysis_id": "n", "min_cell_count": 60}
    write_results(tmp_path, *bind_results([(result, setting)]))
    page = html.unescape(write_report(tmp_path).read_text("utf-8"))
    assert "partial pools" in page and f"not pooled without {nodes[1].cdm_name}" in page


# --- 5. concept-set covariates -----------------------------------------------------------------


def test_concept_set_covariate_equals_the_same_events_as_a_cohort(cdms) -> None:
    """A covariate naming a concept set (drug 1002, resolved into study_codeset) fits exactly as
    a cohort covariate over the same drug records."""
    nodes = cdms()
    for node in nodes:
        node.con.execute(
            "CREATE OR REPLACE TEMP TABLE study_codeset AS SELECT 7 AS codeset_id, 1002 AS concept_id;"
            "INSERT INTO cohort SELECT 5, person_id, drug_exposure_start_date,"
            " drug_exposure_start_date FROM drug_exposure WHERE drug_concept_id = 1002"
        )
        node.cohort_ids["drug_b"] = 5
        node.concept_sets["drug_b"] = 7
    window = {"start": -3650, "end": 0}
    fits = {}
    for covariate in (
        {"type": "cohort", "cohort": "drug_b", "window": window},
        {"type": "concept_set", "concept_set": "drug_b", "domain": "drug", "window": window},
    ):
        spec = {**SPECS["glm"], "id": "b", "covariates": [{"type": "sex"}, covariate]}
        result = _run(spec, nodes)
        coefficients = result.filter(pl.col("estimate_name") == "coefficient")
        fits[covariate["type"]] = coefficients["estimate_value"].cast(pl.Float64).to_numpy()
    assert fits["cohort"][2] != 0
    np.testing.assert_allclose(fits["concept_set"], fits["cohort"], rtol=1e-12)


def test_unknown_concept_set_is_named(cdms) -> None:
    analysis = REGISTRY["glm"]()
    spec = analysis.Spec.model_validate(
        {
            **SPECS["glm"],
            "covariates": [{"type": "concept_set", "concept_set": "nope", "domain": "drug"}],
        }
    )
    with pytest.raises(KeyError, match="concept set 'nope'"):
        analysis.local(cdms()[0], spec, None)


# --- 6. Cox through the regression guards --------------------------------------------------------


def test_regression_guards_count_cox_parameters_not_times() -> None:
    """3 covariates on 20 rows pass; 60 per-time value rows are not 60 parameters."""
    rows = [("records", "", "count", "count", 20.0)]
    rows += [("event_sum", str(i), "event_sum", "value", 1.0) for i in range(3)]
    rows += [("time", str(t), "s0", "value", 1.0) for t in range(60)]
    rows += [("time", str(t), "n_risk", "count", 2.0) for t in range(60)]
    stats = make_statistics(
        pl.DataFrame(
            rows,
            schema=["variable_name", "variable_level", "estimate_name", "release_class", "value"],
            orient="row",
        )
    )
    regression_guards(stats, 10, small_cells=0)
    few = stats.with_columns(
        pl.when(pl.col("variable_name") == "records").then(9.0).otherwise("value").alias("value")
    )
    with pytest.raises(DisclosureRefusal, match="saturated regression: 3 parameters"):
        regression_guards(few, 5, small_cells=0)


def test_study_concept_set_covariate_through_the_runner(gibleed_db: Path) -> None:
    """``local_step`` fills ``CdmContext.concept_sets`` from the study: on GiBleed a covariate
    naming the diclofenac concept set (drug eras starting at index) fits exactly as the
    example's cohort covariate built from the same eras."""
    import yaml
    from conftest import REPO

    from studies.loading import study_from_data
    from studies.runner import drive, local_step

    study = yaml.safe_load((REPO / "examples" / "gibleed_glm" / "study.yaml").read_text())
    [analysis] = study["analyses"]
    by_set = {"type": "concept_set", "concept_set": "diclofenac", "domain": "drug_era"}
    by_set["window"] = analysis["covariates"][2]["window"]
    study["analyses"].append(
        {**analysis, "id": "by_set", "covariates": [*analysis["covariates"][:2], by_set]}
    )
    study = study_from_data(study)
    fits = {}
    with duckdb.connect(str(gibleed_db), read_only=True) as con:
        for analysis_id in ("bleed_risk", "by_set"):
            spec = study.analysis(analysis_id)

            def ask(state, _round, analysis_id=analysis_id):
                return {"gibleed": local_step(con, study, analysis_id, state)}

            result = drive(REGISTRY["glm"](), spec, ask)
            fits[analysis_id] = result.filter(pl.col("estimate_name") == "coefficient")
    terms = fits["by_set"]["variable_name"].to_list()
    assert terms[-1] == "concept_set_diclofenac"
    cohort, concept_set = (
        fits[a]["estimate_value"].cast(pl.Float64).to_numpy() for a in ("bleed_risk", "by_set")
    )
    assert cohort[-1] != 0
    np.testing.assert_allclose(concept_set, cohort, rtol=1e-12)


def test_a_key_a_node_withheld_is_withheld_in_the_pool() -> None:
    """Node b withheld rows keyed by the data (its marker) and sent no row for concept X: X
    may be the one it withheld, so the pool withholds X, naming b; node c sent no marker, so
    its absent Y is a zero and Y pools."""
    from studies.analyses.pooling import pool
    from studies.analysis import CombineInput
    from studies.statistics import WITHHELD_KEYS

    def table(rows: list[tuple[str, str, float]]) -> pl.DataFrame:
        return count_statistics(
            rows, release_class=["value" if r[1] == WITHHELD_KEYS else "count" for r in rows]
        )

    a = table([("Conditions", "X", 20.0), ("Conditions", "Y", 30.0)])
    b = table([("Conditions", "Y", 15.0), ("", WITHHELD_KEYS, float("nan"))])
    c = table([("Conditions", "X", 11.0)])
    pooled = pool(CombineInput([a, b, c], ["a", "b", "c"]))
    value = dict(zip(pooled["variable_level"], pooled["value"], strict=True))
    withheld = dict(zip(pooled["variable_level"], pooled["withheld"], strict=True))
    assert value["X"] is None and withheld["X"] == "b"
    assert value["Y"] == 45.0 and withheld["Y"] == ""
    assert WITHHELD_KEYS not in value
