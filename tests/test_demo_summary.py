"""The demo's summary and record: key result lines, privacy charges composed over rounds, and
withheld (partially pooled) times drawn as withheld, never as "no event"."""

from __future__ import annotations

import math

import polars as pl
import pytest

from coordinator.headlines import key_result
from coordinator.plots import plot_kaplan_meier, with_values
from coordinator.study_runner import NodeRecord, StudyOutcome, _nodes_frame
from privacy.accounting import rho_to_epsilon
from studies.results import estimates


def _rows(table: list[dict], columns: dict[str, str], **keys: str) -> pl.DataFrame:
    return estimates(pl.DataFrame(table), columns, **keys)


def test_key_results_name_the_numbers_of_each_kind() -> None:
    counts = _rows(
        [{"group_level": c, "strata_name": "overall", "strata_level": "overall",
          "variable_name": v, "count": n}
         for c, n in (("celecoxib", 1234), ("diclofenac", 987))
         for v in ("Number records", "Number subjects")],
        {"count": "integer"}, group_name="cohort_name",
    )  # fmt: skip
    assert key_result("counts", counts) == "persons: celecoxib 1,234 · diclofenac 987"

    incidence = _rows(
        [{"group_level": "patients &&& gi_bleed", "strata_name": "overall",
          "strata_level": "overall", "outcome_count": 14, "person_years": 726.4,
          "incidence_1000_pys": 19.27, "incidence_1000_pys_95CI_lower": 10.54,
          "incidence_1000_pys_95CI_upper": 32.34}],
        {"outcome_count": "integer", "person_years": "numeric", "incidence_1000_pys": "numeric",
         "incidence_1000_pys_95CI_lower": "numeric", "incidence_1000_pys_95CI_upper": "numeric"},
        group_name="denominator_cohort_name &&& outcome_cohort_name",
    )  # fmt: skip
    assert key_result("incidence", incidence) == (
        "patients → gi_bleed: 14 events / 726 PY, 19.3 per 1,000 PY (95% CI 10.5–32.3)"
    )

    glm = _rows(
        [{"variable_name": t, "odds_ratio": r, "odds_ratio_95CI_lower": lo,
          "odds_ratio_95CI_upper": hi, "strata_name": "overall", "strata_level": "overall"}
         for t, r, lo, hi in (("(Intercept)", 0.04, 0.03, 0.05), ("age", 1.3075, 1.2076, 1.4157))],
        {"odds_ratio": "numeric", "odds_ratio_95CI_lower": "numeric",
         "odds_ratio_95CI_upper": "numeric"},
        group_name="cohort_name", group_level="patients",
    )  # fmt: skip
    assert key_result("glm", glm) == "OR age 1.31 (95% CI 1.21–1.42)"
    assert key_result("dp_sgd", glm) == "" and key_result("glm", None) == ""


def _km_rows(withheld_at: str | None) -> pl.DataFrame:
    """A pooled Kaplan–Meier result over three yearly times, optionally one flagged withheld."""
    curve = _rows(
        [{"group_level": "nsaid_users", "strata_name": "overall", "strata_level": "overall",
          "additional_level": str(t), "estimate": s, "estimate_95CI_lower": s - 0.02,
          "estimate_95CI_upper": min(s + 0.02, 1.0), "n_risk": n, "n_event": d, "n_censor": 0}
         for t, s, n, d in ((0, 1.0, 1000, 0), (365, 0.95, 1000, 50), (730, 0.95, 950, 0))],
        {"estimate": "numeric", "estimate_95CI_lower": "numeric",
         "estimate_95CI_upper": "numeric", "n_risk": "integer", "n_event": "integer",
         "n_censor": "integer"},
        group_name="target_cohort", variable_name="outcome", variable_level="gi_bleed",
        additional_name="time",
    )  # fmt: skip
    frame = curve.with_columns(
        pl.lit("1").alias("result_id"), pl.lit("federated").alias("cdm_name")
    )
    if withheld_at is None:
        return frame
    flag = frame.filter(
        (pl.col("additional_level") == withheld_at) & (pl.col("estimate_name") == "n_event")
    ).with_columns(
        estimate_name=pl.lit("nodes_withheld"), estimate_type=pl.lit("character"),
        estimate_value=pl.lit("node2"),
    )  # fmt: skip
    return pl.concat([frame, flag.select(frame.columns)])


def test_a_partially_pooled_time_is_withheld_not_a_number() -> None:
    marked = with_values(_km_rows("730"))
    assert "nodes_withheld" not in marked["estimate_name"].to_list()
    at = marked.filter(pl.col("additional_level") == "730")
    assert at["suppressed"].all() and at["value"].is_null().all()
    assert set(at["mark"].to_list()) == {"withheld"}
    before = marked.filter(
        pl.col("additional_level") == "365", pl.col("estimate_name") == "estimate"
    )
    assert before["value"].to_list() == [0.95] and not before["suppressed"].any()


@pytest.mark.parametrize("withheld_at", [None, "730"])
def test_kaplan_meier_stops_at_the_first_withheld_time(withheld_at: str | None) -> None:
    fig = plot_kaplan_meier(_km_rows(withheld_at))
    steps = [line for line in fig.axes[0].get_lines() if line.get_drawstyle().startswith("steps")]
    assert len(steps) == 1
    drawn_times = list(steps[0].get_xdata())
    notes = " ".join(t.get_text() for t in fig.texts)
    if withheld_at is None:
        assert drawn_times == [0, 365, 730] and "withheld" not in notes
    else:
        assert drawn_times == [0, 365]  # never a flat step through the withheld year
        assert "withheld" in notes and "from day 730" in notes


def test_privacy_charges_add_up_over_rounds_and_convert_once() -> None:
    record = NodeRecord("bleed_risk", "node1", "contributed")
    for round_, (rho, suppressed) in enumerate(((0.01, 2), (0.02, 0), (0.03, 1))):
        record.add_release(
            round_,
            {"mechanism": "gaussian", "noise_scale": 3.5, "rho_charged": rho, "delta": 1e-6,
             "epsilon_charged": rho_to_epsilon(rho, 1e-6), "suppressed_cells": suppressed},
        )  # fmt: skip
    assert record.rounds == 3
    assert math.isclose(record.settings["rho_charged"], 0.06)
    assert math.isclose(record.settings["epsilon_charged"], rho_to_epsilon(0.06, 1e-6))
    assert record.settings["epsilon_charged"] < 3 * rho_to_epsilon(0.02, 1e-6)  # not basic sums
    assert record.settings["suppressed_cells"] == 2
    exact = NodeRecord("feasibility", "node1", "contributed")
    exact.add_release(0, {"mechanism": "none", "rho_charged": 0.0, "suppressed_cells": 6})
    nodes = _nodes_frame(StudyOutcome(out_dir="x", nodes=[record, exact]))
    assert nodes.select("mechanism", "suppressed_cells", "noise_scale").rows() == [
        ("gaussian", 2, 3.5),
        ("none", 6, None),
    ]
    assert nodes["epsilon_charged"].to_list()[1] == 0.0


def test_dp_sgd_epsilons_come_from_its_accountant() -> None:
    record = NodeRecord("train", "node1", "contributed")
    for round_, epsilon in enumerate((0.3, 0.2)):
        record.add_release(
            round_, {"accountant": "rdp", "rho_charged": 0.01, "epsilon_charged": epsilon}
        )
    assert math.isclose(record.settings["epsilon_charged"], 0.5)
    assert math.isclose(record.settings["rho_charged"], 0.02)


def test_progress_in_a_log_has_the_messages_and_no_spinner_frames(capsys) -> None:
    """Without a terminal (output to a file or CI log) the progress is plain lines: no
    spinner glyphs, no elapsed-time frame left at the end."""
    from coordinator.commands import progress_reporter

    with progress_reporter("demo") as say:
        say("analysis feasibility (counts)")
        say("  round 0: 2/2 nodes released")
        say("writing the report")
    out = capsys.readouterr().out
    assert out.splitlines() == ["analysis feasibility (counts)", "writing the report"]
    assert not any("\u2800" <= ch <= "\u28ff" for ch in out)  # braille spinner glyphs


def test_demo_says_when_it_reuses_the_nodes_in_its_folder(tmp_path) -> None:
    from coordinator.demo import build_demo_nodes

    first: list[str] = []
    nodes = build_demo_nodes(tmp_path, 2, first.append, patients=120)
    assert not any("reusing" in line for line in first)
    again: list[str] = []
    assert build_demo_nodes(tmp_path, 2, again.append, patients=120) == nodes
    assert again == [
        f"{name}: reusing the node already built in {cdm} (remove it to rebuild)"
        for name, cdm in nodes
    ]
