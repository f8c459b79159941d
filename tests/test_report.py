"""The study report: self-contained HTML, PNG plots, suppression shown as <N, any subset renders."""

from __future__ import annotations

import html
import math
import re
import struct
from pathlib import Path

import polars as pl
import pytest
from _helpers import odds_ratio_meta

from coordinator import plots
from coordinator.report import RESULT_COLUMNS, write_report

STUDY_HASH = "a3f5" * 16
AGES = ["0-17", "18-39", "40-64", "65+"]


def rows(result_id: int, cohort: str, entries: list[dict]) -> list[dict]:
    """summarised_result rows with defaults: one cohort, overall strata, no additional."""
    base = {
        "result_id": str(result_id),
        "cdm_name": "federated",
        "group_name": "cohort_name",
        "group_level": cohort,
        "strata_name": "overall",
        "strata_level": "overall",
        "variable_level": "",
        "estimate_type": "integer",
        "additional_name": "overall",
        "additional_level": "overall",
    }
    return [base | {k: str(v) for k, v in e.items()} for e in entries]


def counts_rows() -> list[dict]:
    return rows(
        1,
        "gi_bleed",
        [
            {"variable_name": "Number subjects", "estimate_name": "count", "estimate_value": 479},
            {"variable_name": "Number records", "estimate_name": "count", "estimate_value": 479},
        ],
    ) + rows(
        1,
        "rare_disease",
        [{"variable_name": "Number subjects", "estimate_name": "count", "estimate_value": "<10"}],
    )


def characterization_rows() -> list[dict]:
    out = []
    for c, cohort in enumerate(["gi_bleed", "celecoxib"]):
        for a, age in enumerate(AGES):
            for s, sex in enumerate(["Male", "Female"]):
                value = "<10" if (a == 0 and s == 1) else 40 + 30 * a + 7 * s + 11 * c
                out += rows(
                    2,
                    cohort,
                    [
                        {
                            "strata_name": "sex",
                            "strata_level": sex,
                            "variable_name": "age_group",
                            "variable_level": age,
                            "estimate_name": "count",
                            "estimate_value": value,
                        }
                    ],
                )
        for k, condition in enumerate(["Hypertension", "Osteoarthritis", "Asthma", "Obesity"]):
            pct = 70 - 15 * k + 10 * c
            out += rows(
                2,
                cohort,
                [
                    {"variable_name": condition, "estimate_name": "count", "estimate_value": pct},
                    {
                        "variable_name": condition,
                        "estimate_name": "percentage",
                        "estimate_type": "percentage",
                        "estimate_value": pct,
                    },
                ],
            )
    return out


def incidence_rows() -> list[dict]:
    out = []
    for year in range(2010, 2020):
        rate = 120 + 8 * (year - 2010)
        estimates = {
            "denominator_count": 900,
            "outcome_count": "<10" if year == 2015 else 30,
            "incidence_100000_pys": "<10" if year == 2015 else rate,
            "incidence_100000_pys_95CI_lower": rate * 0.8,
            "incidence_100000_pys_95CI_upper": rate * 1.2,
        }
        out += rows(
            3,
            "gi_bleed",
            [
                {
                    "variable_name": "Outcome cohort",
                    "variable_level": "gi_bleed",
                    "estimate_name": name,
                    "estimate_value": value,
                    "additional_name": "incidence_start_date &&& incidence_end_date",
                    "additional_level": f"{year}-01-01 &&& {year}-12-31",
                }
                for name, value in estimates.items()
            ],
        )
    return out


def survival_rows() -> list[dict]:
    out = []
    for g, cohort in enumerate(["celecoxib", "diclofenac"]):
        for t in range(0, 400, 20):
            s = math.exp(-t / (300 + 200 * g))
            estimates = {
                "estimate": s,
                "estimate_95CI_lower": s * 0.9,
                "estimate_95CI_upper": min(1.0, s * 1.1),
                "n_risk": "<10" if t >= 300 else 500 - t,
            }
            out += rows(
                4,
                cohort,
                [
                    {
                        "variable_name": "survival_probability",
                        "variable_level": "gi_bleed",
                        "estimate_name": name,
                        "estimate_value": value,
                        "additional_name": "time",
                        "additional_level": t,
                    }
                    for name, value in estimates.items()
                ],
            )
    return out


def glm_rows() -> list[dict]:
    terms = {"(Intercept)": (0.1, 0.05), "age": (0.03, 0.01), "sex: Male": (0.4, 0.15)}
    return rows(
        5,
        "gi_bleed",
        [
            {"variable_name": term, "estimate_name": name, "estimate_value": value}
            for term, (beta, se) in terms.items()
            for name, value in (
                ("coefficient", beta),
                ("std_error", se),
                ("odds_ratio", math.exp(beta)),
                ("odds_ratio_95CI_lower", math.exp(beta - 1.96 * se)),
                ("odds_ratio_95CI_upper", math.exp(beta + 1.96 * se)),
            )
        ],
    )


KIND_ROWS = {
    "cohort_count": (1, "counts", counts_rows),
    "summarise_characteristics": (2, "baseline", characterization_rows),
    "incidence": (3, "gi_bleed_incidence", incidence_rows),
    "survival": (4, "km_gi_bleed", survival_rows),
    "glm": (5, "logistic_gi_bleed", glm_rows),
}


def write_folder(folder: Path, kinds: list[str], **extra_settings: str) -> Path:
    """A results folder holding the given analysis kinds, as write_results would lay it out."""
    folder.mkdir(parents=True, exist_ok=True)
    result = pl.DataFrame(
        [r for kind in kinds for r in KIND_ROWS[kind][2]()],
        schema=dict.fromkeys(RESULT_COLUMNS, pl.String),
    )
    result.write_csv(folder / "results.csv")
    settings = pl.DataFrame(
        [
            {
                "result_id": str(KIND_ROWS[kind][0]),
                "result_type": kind,
                "analysis_id": KIND_ROWS[kind][1],
                "package_name": "fedomop",
                "package_version": "0.1.0",
                "min_cell_count": "10",
                "study_name": "GI bleed demo",
                "study_hash": STUDY_HASH,
                "permit_id": "permit-2026-001",
                "nodes": "node_a; node_b; node_c",
                "nodes_contributed": "node_a; node_b",
                "nodes_refused": "node_c: budget exhausted",
                **extra_settings,
            }
            for kind in kinds
        ]
    )
    settings.write_csv(folder / "settings.csv")
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG header, checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> Path:
    folder = write_folder(
        tmp_path_factory.mktemp("full"),
        list(KIND_ROWS),
        epsilon_spent="node_a=0.25; node_b=0.5",
        epsilon_permitted="node_a=2; node_b=2",
    )
    return write_report(folder)


def test_report_is_self_contained_and_names_the_study(full_report: Path) -> None:
    page = full_report.read_text("utf-8")
    assert full_report == full_report.parent / "report.html"
    assert STUDY_HASH in page
    assert "permit-2026-001" in page
    external = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert external == []
    assert "<link" not in page and "<script" not in page
    for analysis in (
        "counts",
        "baseline",
        "gi_bleed_incidence",
        "km_gi_bleed",
        "logistic_gi_bleed",
    ):
        assert f'id="a-{analysis}"' in page
    # every plot is embedded as a base64 PNG
    assert page.count('src="data:image/png;base64,') == 8


def test_expected_pngs_are_valid_images(full_report: Path) -> None:
    folder = full_report.parent / "plots"
    expected = {
        "baseline_age_sex_pyramid",
        "baseline_top_covariates",
        "baseline_smd",
        "gi_bleed_incidence_incidence",
        "km_gi_bleed_kaplan_meier",
        "logistic_gi_bleed_forest",
        "contributions",
        "privacy_budget",
    }
    assert {p.stem for p in folder.glob("*.png")} == expected
    for png in folder.glob("*.png"):
        width, height = png_size(png)
        assert width > 300 and height > 200, png
        assert png.stat().st_size > 10_000, png


def test_suppressed_cells_show_as_below_threshold(full_report: Path) -> None:
    page = html.unescape(full_report.read_text("utf-8"))
    cells = re.findall(r'<td class="suppressed">([^<]*<?[^<]*)</td>', page)
    assert cells and set(cells) == {"<10"}
    # rare_disease's count (1), the pyramid cell per cohort (2), an incidence year's count and rate
    # (2), and the km risk numbers from day 300 for both cohorts (10)
    assert len(cells) == 15
    # the refused node and its reason are reported
    assert "budget exhausted" in page


def test_counts_only_folder_renders(tmp_path: Path) -> None:
    report = write_report(write_folder(tmp_path, ["cohort_count"]))
    page = html.unescape(report.read_text("utf-8"))
    assert STUDY_HASH in page and 'id="a-counts"' in page
    assert "479" in page and "<10" in page
    assert "no privacy budget spent is reported" in page
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} == {"contributions"}


def test_folder_without_settings_renders(tmp_path: Path) -> None:
    write_folder(tmp_path, ["survival"]).joinpath("settings.csv").unlink()
    page = write_report(tmp_path).read_text("utf-8")
    assert "Survival" in page and "not stated" in page
    assert (tmp_path / "plots" / "result_4_kaplan_meier.png").is_file()


def test_missing_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="results.csv"):
        write_report(tmp_path)


def frame(kind: str) -> pl.DataFrame:
    return pl.DataFrame(KIND_ROWS[kind][2](), schema=dict.fromkeys(RESULT_COLUMNS, pl.String))


def test_pyramid_draws_suppressed_cells_as_marks_not_zero() -> None:
    fig = plots.plot_age_sex_pyramid(frame("summarise_characteristics"))
    ax = fig.axes[0]
    marks = [t.get_text() for t in ax.texts]
    assert marks == ["<10"]
    widths = sorted(abs(p.get_width()) for p in ax.patches)
    assert 10 in widths and 0 not in widths  # the <10 cell is drawn up to 10, hatched
    assert [t.get_text() for t in ax.get_yticklabels()] == AGES  # "65 to 150" would read "65+"


def test_plots_skip_with_a_reason_when_data_is_missing() -> None:
    empty = pl.DataFrame(schema=dict.fromkeys(RESULT_COLUMNS, pl.String))
    counts = frame("cohort_count")
    for plot in (
        plots.plot_age_sex_pyramid,
        plots.plot_top_covariates,
        plots.plot_smd,
        plots.plot_incidence,
        plots.plot_kaplan_meier,
        plots.plot_forest,
    ):
        for data in (empty, counts):
            with pytest.raises(plots.NothingToPlot):
                plot(data)


def test_forest_plot_leaves_out_the_intercept_and_uses_log_scale() -> None:
    name, ratios = plots.glm_ratios(frame("glm"))
    assert name == "odds_ratio"
    assert ratios["term"].to_list() == ["age", "sex: Male"]
    assert ratios["ratio"][1] == pytest.approx(math.exp(0.4))
    assert plots.plot_forest(frame("glm")).axes[0].get_xscale() == "log"


def test_smd_of_two_cohorts() -> None:
    smd = plots.standardised_differences(frame("summarise_characteristics"))
    row = smd.filter(pl.col("covariate") == "Hypertension").row(0, named=True)
    p1, p2 = 0.80, 0.70  # celecoxib, gi_bleed (cohorts sorted by name)
    assert row["smd"] == pytest.approx((p1 - p2) / math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / 2))


def test_kaplan_meier_has_ci_bands_and_risk_table() -> None:
    fig = plots.plot_kaplan_meier(frame("survival"))
    curve_ax, risk_ax = fig.axes
    assert len(curve_ax.collections) == 2  # one CI band per cohort
    numbers = [t.get_text() for t in risk_ax.texts]
    assert "500" in numbers and "<10" in numbers and "0" not in numbers


def test_kaplan_meier_axis_ends_at_one_and_risk_ticks_sit_on_bins() -> None:
    fig = plots.plot_kaplan_meier(frame("survival"))
    curve_ax, risk_ax = fig.axes
    assert curve_ax.get_ylim()[1] == 1.0
    times = sorted(set(plots._at_risk(frame("survival"))["t"].to_list()))
    assert set(risk_ax.get_xticks()) <= set(times) | {times[0] + k * 30 for k in range(500)}
    assert plots.risk_ticks([float(t) for t in range(0, 3400, 30)], 6) == [
        0, 600, 1200, 1800, 2400, 3000,
    ]  # fmt: skip
    assert plots.risk_ticks(list(range(0, 3651, 365)), 6) == [0, 1095, 2190, 3285]


def test_forest_labels_carry_the_covariate_unit() -> None:
    fig = plots.plot_forest(frame("glm"), units={"age": "per 10 years"})
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert any(label.startswith("age per 10 years  ") for label in labels)


def test_top_covariates_labels_and_legend_never_overlap() -> None:
    """Twenty long covariate names over three cohorts: no two labels overlap, and the legend
    stands beside the bars rather than over them."""
    rows = [
        {c: "" for c in RESULT_COLUMNS}
        | {
            "result_id": "1", "cdm_name": "federated", "group_name": "cohort_name",
            "group_level": cohort, "strata_name": "overall", "strata_level": "overall",
            "variable_name": "Drugs", "estimate_name": "percentage", "estimate_type": "numeric",
            "variable_level": f"tetanus and diphtheria toxoids, adsorbed, preservative free {i}",
            "estimate_value": str(40 - i - k), "additional_name": "overall",
            "additional_level": "overall",
        }
        for i in range(20)
        for k, cohort in enumerate(("celecoxib", "diclofenac", "naproxen"))
    ]  # fmt: skip
    fig = plots.plot_top_covariates(pl.DataFrame(rows, schema=dict.fromkeys(RESULT_COLUMNS)))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.get_yticklabels()]
    assert len(boxes) == 20
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_numbers_are_formatted_for_people() -> None:
    from coordinator.report import format_estimate

    assert format_estimate("234300.172", name="person_years") == ("234,300", "num")
    assert format_estimate("3.6", name="person_years") == ("3.6", "num")
    assert format_estimate("-0.001132", name="smd") == ("-0.001", "num")
    assert format_estimate("0.2931", name="smd") == ("0.293", "num")
    assert format_estimate("NA", name="median_survival") == ("not reached", "num")
    assert format_estimate("NaN", name="median_survival_95CI_upper") == ("not reached", "num")
    assert format_estimate("NA", name="estimate") == ("NA", "num")
    assert plots.age_label("Female / 65 to 150") == "Female / 65+"
    assert plots.age_label("Age group: 65 to 150") == "Age group: 65+"
    assert plots.age_label("18 to 64") == "18 to 64"


def test_missing_counts_and_what_derives_from_them_are_suppressed() -> None:
    data = pl.DataFrame(
        rows(
            1,
            "exposed",
            [
                {"variable_name": "Asthma", "estimate_name": "count", "estimate_value": "NA"},
                {
                    "variable_name": "Asthma",
                    "estimate_name": "percentage",
                    "estimate_type": "percentage",
                    "estimate_value": "NA",
                },
                {
                    "variable_name": "age",
                    "estimate_name": "sd",
                    "estimate_type": "numeric",
                    "estimate_value": "NA",
                },
                {"variable_name": "age", "estimate_name": "count", "estimate_value": "12"},
                {
                    "variable_name": "rate",
                    "estimate_name": "rate_95CI_upper",
                    "estimate_type": "numeric",
                    "estimate_value": "Inf",
                },
            ],
        ),
        schema=dict.fromkeys(RESULT_COLUMNS, pl.String),
    )
    flagged = plots.with_values(data, min_cell_count=5)
    assert flagged["suppressed"].to_list() == [True, True, False, False, False]
    assert flagged["mark"].to_list() == ["<5", "<5", None, None, None]
    assert flagged["value"].to_list() == [None, None, None, 12.0, None]  # Inf is not drawable


#: One analysis of each kind over the three analysis test nodes (``conftest``).
EVERY_KIND = [
    {
        "id": "feasibility",
        "kind": "counts",
        "cohorts": ["exposed", "comparator"],
        "strata": [["sex", "age_group"]],
    },
    {
        "id": "baseline",
        "kind": "characterization",
        "cohorts": ["exposed", "comparator"],
        "window": {"start": -365, "end": -1},
        "domains": ["condition", "drug"],
        "top_n": 5,
        "comparison": ["exposed", "comparator"],
    },
    {
        "id": "bleed_incidence",
        "kind": "incidence",
        "denominator_cohort": "exposed",
        "outcome": "outcome",
        "strata": ["calendar_year"],
    },
    {
        "id": "bleed_prevalence",
        "kind": "prevalence",
        "type": "point",
        "denominator_cohort": "population",
        "outcome": "outcome",
        "dates": ["2010-01-01", "2012-01-01", "2014-01-01"],
    },
    {
        "id": "km",
        "kind": "survival",
        "target_cohorts": ["exposed", "comparator"],
        "outcome": "outcome",
        "time_bin_days": 30,
        "strata": ["sex"],
    },
    {
        "id": "risk",
        "kind": "glm",
        "family": "binomial",
        "cohort": "exposed",
        "outcome": "outcome",
        "covariates": [{"type": "age", "center": 50, "scale": 10}, {"type": "sex"}],
    },
    {
        "id": "hazard",
        "kind": "cox",
        "cohort": "exposed",
        "outcome": "outcome",
        "time_bin_days": 30,
        "covariates": [{"type": "age", "center": 50, "scale": 10}, {"type": "sex"}],
    },
    odds_ratio_meta(365),
]


def write_every_kind(folder: Path, nodes: list[Path], run_analysis) -> list:
    """Run ``EVERY_KIND`` over ``nodes`` and write its results and settings into ``folder``."""
    from studies.analyses import REGISTRY
    from studies.results import bind_results, write_results
    from studies.runner import covariate_units

    parts = []
    for spec in EVERY_KIND:
        result, _ = run_analysis(spec, nodes)
        units = covariate_units(REGISTRY[spec["kind"]].Spec.model_validate(spec))
        setting = {"result_type": spec["kind"], "analysis_id": spec["id"], "min_cell_count": 10}
        setting |= {"covariate_units": units} if units else {}
        parts.append(
            (result, setting | {"study_hash": STUDY_HASH, "cdm_names": "node0;node1;node2"})
        )
    write_results(folder, *bind_results(parts))
    return parts


def test_report_of_real_runs_of_every_kind(analysis_node_dbs, run_analysis, tmp_path: Path) -> None:
    """Results of each analysis kind, run over the three test nodes, render with their plots."""
    parts = write_every_kind(tmp_path, analysis_node_dbs["nodes"], run_analysis)
    page = html.unescape(write_report(tmp_path).read_text("utf-8"))
    for spec in EVERY_KIND:
        assert f'id="a-{spec["id"]}"' in page
    assert "not shown" not in page.split('id="federation"')[0]  # every analysis plot was drawn
    result = parts[0][0]
    subjects = result.filter(
        (pl.col("group_level") == "exposed")
        & (pl.col("strata_name") == "overall")
        & (pl.col("variable_name") == "Number subjects")
    )["estimate_value"].item()
    assert f'<td class="num">{int(subjects):,}</td>' in page
    expected = {
        "feasibility_age_sex_pyramid",
        "baseline_demographics",
        "baseline_top_covariates",
        "baseline_smd",
        "bleed_incidence_incidence_by_calendar_year",
        "bleed_prevalence_prevalence",
        "km_kaplan_meier",
        "km_kaplan_meier_by_sex",
        "risk_forest",
        "hazard_forest",
        "or_meta_forest",
        "contributions",
    }
    pngs = {p.stem: p for p in (tmp_path / "plots").glob("*.png")}
    assert set(pngs) == expected
    for png in pngs.values():
        assert min(png_size(png)) > 200 and png.stat().st_size > 10_000, png


@pytest.mark.slow
def test_report_of_a_local_run_on_synthetic_nodes(synthetic_node_dbs, tmp_path: Path) -> None:
    """studies.runner.run_local over the three synthetic nodes, then the report of that folder."""
    from studies.canonical import study_hash
    from studies.loading import load_study
    from studies.runner import run_local

    study = tmp_path / "study.yaml"
    study.write_text(SYNTHETIC_STUDY)
    out = tmp_path / "results"
    result, _ = run_local(study, synthetic_node_dbs, out)
    page = html.unescape(write_report(out).read_text("utf-8"))
    assert study_hash(load_study(study)) in page
    for analysis in ("feasibility", "baseline", "bleed_incidence", "time_to_bleed", "bleed_risk"):
        assert f'id="a-{analysis}"' in page
    for node in synthetic_node_dbs:
        assert node.stem in page
    celecoxib = result.filter(
        (pl.col("result_id") == 1)
        & (pl.col("group_level") == "celecoxib")
        & (pl.col("strata_name") == "overall")
        & (pl.col("variable_name") == "Number subjects")
    )["estimate_value"].item()
    assert int(celecoxib) > 100 and f"{int(celecoxib):,}" in page
    assert {p.stem for p in (out / "plots").glob("*.png")} >= {
        "feasibility_age_sex_pyramid",
        "baseline_top_covariates",
        "bleed_incidence_incidence_by_calendar_year",
        "time_to_bleed_kaplan_meier",
        "bleed_risk_forest",
    }


#: Drug concepts as the synthetic generator records them (no ingredient roll-up needed).
SYNTHETIC_STUDY = """
schema_version: 1
name: report_synthetic
concept_sets:
  - {name: celecoxib, concepts: [1118088]}
  - {name: diclofenac, concepts: [40162359]}
  - {name: gi_bleed, concepts: [192671]}
cohorts:
  - {name: celecoxib, entry: {domain: drug, concept_set: celecoxib, events: first}}
  - {name: diclofenac, entry: {domain: drug, concept_set: diclofenac, events: first}}
  - {name: gi_bleed, entry: {domain: condition, concept_set: gi_bleed, events: all}}
analyses:
  - {id: feasibility, kind: counts, cohorts: [celecoxib, diclofenac], strata: [[sex, age_group]]}
  - {id: baseline, kind: characterization, cohorts: [celecoxib, diclofenac],
     window: {start: -365, end: -1}, domains: [condition, drug], top_n: 10,
     comparison: [celecoxib, diclofenac]}
  - {id: bleed_incidence, kind: incidence, denominator_cohort: celecoxib, outcome: gi_bleed,
     strata: [calendar_year]}
  - {id: time_to_bleed, kind: survival, target_cohorts: [celecoxib, diclofenac],
     outcome: gi_bleed, follow_up_days: 1825, time_bin_days: 30}
  - {id: bleed_risk, kind: glm, family: binomial, cohort: celecoxib, outcome: gi_bleed,
     outcome_window: {start: 1, end: 365},
     covariates: [{type: age, center: 50, scale: 10}, {type: sex}]}
"""


def test_budget_and_contributions_from_the_coordinators_record(tmp_path: Path) -> None:
    """federation.json as the study runner writes it: zCDP charges compose by adding rho."""
    import json

    from coordinator.report import node_records, privacy_budget, settings_by_result
    from privacy.accounting import rho_to_epsilon

    write_folder(tmp_path, ["cohort_count", "glm"], epsilon_permitted="1.5")

    def node(analysis: str, name: str, status: str, rho: float, reason: str = "") -> dict:
        gate = {"rho_charged": rho, "delta": 1e-6, "suppressed_cells": 2, "min_cell_count": 10}
        return {
            "analysis_id": analysis,
            "node": name,
            "status": status,
            "reason": reason,
            "rounds": 1,
            "audit_hashes": [],
            "settings": gate if status == "contributed" else {},
        }

    record = {
        "out_dir": str(tmp_path),
        "nodes": [
            node("counts", "node_a", "contributed", 0.01),
            node("counts", "node_b", "contributed", 0.02),
            node("logistic_gi_bleed", "node_a", "contributed", 0.03),
            node("logistic_gi_bleed", "node_b", "timeout", 0.0, "round 2: timeout"),
        ],
    }
    (tmp_path / "federation.json").write_text(json.dumps(record))
    results = pl.read_csv(tmp_path / "results.csv", infer_schema=False)
    settings = settings_by_result(pl.read_csv(tmp_path / "settings.csv", infer_schema=False))
    records = node_records(tmp_path, results, settings)
    assert records.filter(pl.col("node") == "node_b")["status"].to_list() == [
        "contributed",
        "timeout",
    ]
    budget = privacy_budget(records, settings)
    assert budget["node"].to_list() == ["node_a", "node_b"]
    assert budget["epsilon_spent"].to_list() == pytest.approx(
        [rho_to_epsilon(0.04, 1e-6), rho_to_epsilon(0.02, 1e-6)]
    )
    assert budget["epsilon_permitted"].to_list() == [1.5, 1.5]
    page = html.unescape(write_report(tmp_path).read_text("utf-8"))
    assert "round 2: timeout" in page
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} >= {
        "contributions",
        "privacy_budget",
    }


def test_node_lists_as_the_study_runner_writes_them() -> None:
    from coordinator.report import split_nodes

    assert split_nodes("node_a;node_b (timeout); node_c: round 0: refused, budget spent") == [
        ("node_a", ""),
        ("node_b", "timeout"),
        ("node_c", "round 0: refused, budget spent"),
    ]


def test_fully_suppressed_results_render_with_notes(tmp_path: Path) -> None:
    """Every estimate withheld (NA): each plot says why it is missing, tables show <10."""
    write_folder(tmp_path, list(KIND_ROWS))
    results = pl.read_csv(tmp_path / "results.csv", infer_schema=False)
    results.with_columns(estimate_value=pl.lit("NA")).write_csv(tmp_path / "results.csv")
    page = html.unescape(write_report(tmp_path).read_text("utf-8"))
    notes = re.findall(r'<p class="note">([^<]*)</p>', page)
    assert len(notes) >= 5  # pyramid, covariates, incidence, KM, forest, budget
    assert all("not shown" in n for n in notes)
    assert "could not draw" not in page  # skipped on purpose, never by an error
    assert page.count('<td class="suppressed"><10</td>') > 20
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} == {"contributions"}


def test_plot_functions_need_only_the_result_columns_of_fedomop() -> None:
    """The plots package renders from a polars frame alone: notebooks and other tools can call
    it (its modules import each other relatively; of fedomop, only the summarised_result's
    column names from ``studies.results``, which needs polars and the statistics table alone)."""
    source = "".join(p.read_text("utf-8") for p in Path(plots.__file__).parent.glob("*.py"))
    imported = set(re.findall(r"^(?:from|import) ([a-z_][a-z_.]*)", source, re.M))
    assert {name.split(".")[0] for name in imported} <= {
        "__future__", "math", "re", "collections", "io", "pathlib", "matplotlib", "polars", "studies"
    }  # fmt: skip
    assert {name for name in imported if name.startswith("studies")} == {"studies.results"}


#: Appended to a copy of report.html: after load, writes what overflows the page as JSON into
#: ``<pre id="layout-check">`` (elements inside a horizontally scrolling box, such as wide
#: tables, stay inside it and are not counted).
LAYOUT_CHECK = """<script>
addEventListener('load', () => {
  const root = document.documentElement, width = root.clientWidth;
  const clipped = e => { for (let p = e.parentElement; p; p = p.parentElement) {
      if (getComputedStyle(p).overflowX !== 'visible') return true; } return false; };
  const over = [...document.body.querySelectorAll('*')]
    .filter(e => e.getBoundingClientRect().right > width + 0.5 && !clipped(e))
    .map(e => e.tagName.toLowerCase() + ' ' + (e.textContent || '').trim().slice(0, 40));
  const nav = document.querySelector('nav'), body = document.body;
  const pre = document.createElement('pre');
  pre.id = 'layout-check';
  pre.textContent = JSON.stringify({width, height: root.scrollHeight, overflowing: over,
    body: [body.scrollWidth, body.clientWidth], root: [root.scrollWidth, root.clientWidth],
    nav: [nav.scrollWidth, nav.clientWidth], navTop: [...nav.children].map(a => a.offsetTop)});
  body.appendChild(pre);
});
</script>"""
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _chromium(*args: str) -> str:
    """Run Debian's headless Chromium; its stdout."""
    import shutil
    import subprocess

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "needs Chromium (Debian: apt-get install chromium; .ci/run installs it)"
    done = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return done.stdout


@pytest.mark.slow
def test_report_fits_a_1400_px_browser_window(analysis_node_dbs, run_analysis, tmp_path: Path):
    """report.html in a real Chromium at 1400 px: nothing runs off the page (the navigation
    wraps), and a screenshot of the whole page is kept in test-artifacts/ for people to look."""
    import json

    write_every_kind(tmp_path, analysis_node_dbs["nodes"], run_analysis)
    page = write_report(tmp_path)
    probe = page.with_name("layout-probe.html")
    probe.write_text(page.read_text("utf-8").replace("</body>", LAYOUT_CHECK + "</body>"))
    dom = _chromium("--window-size=1400,1000", "--virtual-time-budget=5000", "--dump-dom",
                    probe.as_uri())  # fmt: skip
    found = re.search(r'<pre id="layout-check">(.*?)</pre>', dom, re.S)
    assert found, "the layout check did not run"
    layout = json.loads(html.unescape(found[1]))
    assert layout["width"] == 1400
    assert layout["overflowing"] == []
    assert layout["body"][0] <= layout["body"][1] and layout["root"][0] <= layout["root"][1]
    assert layout["nav"][0] <= layout["nav"][1]
    assert len(set(layout["navTop"])) > 1  # nine analyses' links: the navigation wraps
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-1400.png"
    _chromium(f"--window-size=1400,{layout['height']}", f"--screenshot={shot}", page.as_uri())
    assert png_size(shot) == (1400, layout["height"])
    text = html.unescape(page.read_text("utf-8"))
    assert "age per 10 years" not in text  # units are drawn in the plot, named in the settings
    assert "age: per 10 years, centred at 50" in text
    assert "65 to 150" not in text and "65+" in text
