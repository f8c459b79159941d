"""Disclosure control: small cells, complementary and derived suppression, regression guards."""

from __future__ import annotations

import math

import polars as pl
import pytest
from _helpers import count_statistics

from privacy.disclosure import DisclosureRefusal, protect
from studies.statistics import make_statistics

NAN = float("nan")


def counts(rows: list[tuple[str, str, float]], estimate: str = "count") -> pl.DataFrame:
    """A statistics table of (strata_name, strata_level, value) count rows."""
    return count_statistics(
        rows,
        ("strata_name", "strata_level"),
        variable_name="Number subjects",
        estimate_name=estimate,
    )


def values(frame: pl.DataFrame) -> dict[str, float]:
    return dict(zip(frame["strata_level"], frame["value"], strict=True))


def test_nothing_below_threshold_passes_unchanged() -> None:
    table = counts([("overall", "overall", 100.0), ("sex", "F", 60.0), ("sex", "M", 40.0)])
    out, report = protect(table, 10)
    assert out.equals(table)
    assert (report.suppressed_cells, report.complementary_cells, report.derived_rows) == (0, 0, 0)


def test_small_cell_and_its_complement_suppressed_zero_kept() -> None:
    table = counts(
        [
            ("overall", "overall", 60.0),
            ("sex", "F", 3.0),
            ("sex", "M", 40.0),
            ("sex", "U", 17.0),
            ("age", "young", 0.0),
            ("age", "old", 60.0),
        ]
    )
    out, report = protect(table, 10)
    got = values(out)
    assert math.isnan(got["F"])
    assert math.isnan(got["U"])  # 60 - 40 - U would give F back: the smallest other goes
    assert got["M"] == 40.0 and got["overall"] == 60.0
    assert got["young"] == 0.0  # zero is not a small cell
    assert (report.suppressed_cells, report.complementary_cells) == (1, 1)


def test_complementary_suppression_in_a_two_way_table() -> None:
    """One small cell of sex x age: row and column margins force a rectangle of four."""
    table = counts(
        [
            ("overall", "overall", 100.0),
            ("sex", "F", 50.0),
            ("sex", "M", 50.0),
            ("age", "young", 40.0),
            ("age", "old", 60.0),
            ("sex &&& age", "F &&& young", 5.0),
            ("sex &&& age", "F &&& old", 45.0),
            ("sex &&& age", "M &&& young", 35.0),
            ("sex &&& age", "M &&& old", 15.0),
        ]
    )
    out, report = protect(table, 10)
    cells = out.filter(pl.col("strata_name") == "sex &&& age")["value"]
    assert cells.is_nan().all()
    assert out.filter(pl.col("strata_name") != "sex &&& age")["value"].is_nan().sum() == 0
    assert (report.suppressed_cells, report.complementary_cells) == (1, 3)


def test_every_recoverable_cell_is_gone() -> None:
    """No margin set is left with exactly one suppressed cell (differencing cannot recover it)."""
    table = counts(
        [("overall", "overall", 200.0)]
        + [("region", f"r{i}", v) for i, v in enumerate([4.0, 50.0, 60.0, 86.0])]
    )
    out, _ = protect(table, 10)
    parts = out.filter(pl.col("strata_name") == "region")["value"]
    assert parts.is_nan().sum() == 2
    assert math.isnan(values(out)["r0"]) and math.isnan(values(out)["r1"])  # 50 is the smallest


def test_sums_and_values_of_a_suppressed_group_go_with_it() -> None:
    table = make_statistics(
        pl.DataFrame(
            {
                "strata_name": ["overall", "overall", "overall", "sex", "sex", "sex", "sex"],
                "strata_level": ["overall"] * 3 + ["F", "F", "M", "M"],
                "estimate_name": ["count", "sum_age", "mean_age", "count", "sum_age"] * 1
                + ["count", "sum_age"],
                "release_class": ["count", "sum", "value", "count", "sum", "count", "sum"],
                "value": [40.0, 2000.0, 50.0, 4.0, 180.0, 36.0, 1820.0],
                "lower": [NAN, 0.0, NAN, NAN, 0.0, NAN, 0.0],
                "upper": [NAN, 120.0, NAN, NAN, 120.0, NAN, 120.0],
            }
        )
    )
    out, report = protect(table, 10)
    suppressed = out.filter(pl.col("value").is_nan())
    assert sorted(zip(suppressed["strata_level"], suppressed["estimate_name"], strict=True)) == [
        ("F", "count"),
        ("F", "sum_age"),
        ("M", "count"),
        ("M", "sum_age"),
    ]
    assert report.derived_rows == 2


def glm_statistics(records: float, outcome: tuple[float, float], parameters: int) -> pl.DataFrame:
    """The rows a glm local step returns (see studies.analyses.glm)."""
    rows = [("records", "", "count", "count", records)]
    rows += [("outcome", "1", "count", "count", outcome[0])]
    rows += [("outcome", "0", "count", "count", outcome[1])]
    rows += [("score", str(i), "score", "value", 0.1 * i) for i in range(parameters)]
    rows += [("information", f"{i},{i}", "information", "value", 2.0) for i in range(parameters)]
    frame = pl.DataFrame(
        rows,
        schema=["variable_name", "variable_level", "estimate_name", "release_class", "value"],
        orient="row",
    )
    return make_statistics(frame)


def test_regression_that_passes_the_guards_is_exact() -> None:
    table = glm_statistics(200.0, (50.0, 150.0), parameters=3)
    out, _ = protect(table, 10, regression=True)
    assert out.equals(table)


@pytest.mark.parametrize(
    ("records", "outcome", "parameters", "reason"),
    [
        (8.0, (0.0, 8.0), 1, "below the minimum cell count"),
        (30.0, (12.0, 18.0), 11, "saturated regression: 11 parameters > 0.33 x 30"),
        (200.0, (3.0, 197.0), 3, "1 outcome/covariate level count(s) below 10"),
    ],
)
def test_regression_guards_refuse(records, outcome, parameters, reason) -> None:
    with pytest.raises(DisclosureRefusal, match=reason.replace("(", r"\(").replace(")", r"\)")):
        protect(glm_statistics(records, outcome, parameters), 10, regression=True)


def test_regression_without_row_count_is_refused() -> None:
    table = glm_statistics(100.0, (40.0, 60.0), 2).filter(pl.col("variable_name") != "records")
    with pytest.raises(DisclosureRefusal, match="no row count"):
        protect(table, 10, regression=True)


def test_linked_counts_go_together_zeros_and_small_differences_included() -> None:
    """The lone 85-year-old man: at his censoring day n_risk 1, n_event 0, n_censor 1. The
    zero would say he had no event; the whole time row goes. Records 1242 and events 1241 are
    both large, but their difference is one person: the group goes too."""
    rows = [
        ("km", "age_group &&& sex", "85 to 85 &&& Male", "time", "1655", "n_risk", 1.0),
        ("km", "age_group &&& sex", "85 to 85 &&& Male", "time", "1655", "n_event", 0.0),
        ("km", "age_group &&& sex", "85 to 85 &&& Male", "time", "1655", "n_censor", 1.0),
        ("meta", "overall", "overall", "ratio", "", "records", 1242.0),
        ("meta", "overall", "overall", "ratio", "", "events", 1241.0),
        ("big", "overall", "overall", "ratio", "", "records", 1242.0),
        ("big", "overall", "overall", "ratio", "", "events", 1200.0),
    ]
    table = make_statistics(
        pl.DataFrame(
            rows,
            schema=["cohort", "strata_name", "strata_level", "variable_name", "variable_level",
                    "estimate_name", "value"],
            orient="row",
        ).with_columns(release_class=pl.lit("count"))
    )  # fmt: skip
    out, _ = protect(table, 10)
    released = dict(zip(out["cohort"] + out["estimate_name"], out["value"], strict=True))
    assert all(math.isnan(released[f"km{e}"]) for e in ("n_risk", "n_event", "n_censor"))
    assert math.isnan(released["metarecords"]) and math.isnan(released["metaevents"])
    assert (released["bigrecords"], released["bigevents"]) == (1242.0, 1200.0)


def test_a_small_stratum_releases_only_its_marks() -> None:
    """A stratum level whose largest count is 1-9 hides every row, its zeros too; an empty
    stratum (all zeros) keeps its zeros."""
    table = counts(
        [("overall", "overall", 50.0), ("sex", "M", 3.0), ("sex", "F", 47.0), ("age", "x", 0.0)]
    )
    zero_beside = make_statistics(
        pl.DataFrame(
            {
                "cohort": ["c", "c"],
                "strata_name": ["sex", "sex"],
                "strata_level": ["M", "M"],
                "variable_name": ["outcome", "other"],
                "estimate_name": ["count", "count"],
                "release_class": ["count", "count"],
                "value": [0.0, 4.0],
            }
        )
    )
    out, _ = protect(pl.concat([table, zero_beside]), 10)
    hidden = out.filter(pl.col("strata_level") == "M")["value"].to_list()
    assert all(math.isnan(v) for v in hidden)
    assert out.filter(pl.col("strata_level") == "x")["value"].to_list() == [0.0]
