"""summarised_result and settings: shape, formatting, binding, and the results folder round trip."""

from __future__ import annotations

import math

import polars as pl
import pytest

from studies.results import (
    RESULT_COLUMNS,
    SETTINGS_COLUMNS,
    bind_results,
    estimates,
    format_estimate,
    read_results,
    settings_table,
    summarised_result,
    write_results,
)


def _counts() -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "group_name": ["cohort_name"] * 2,
            "group_level": ["celecoxib", "diclofenac"],
            "variable_name": ["Number subjects"] * 2,
            "count": [1800.0, float("nan")],
            "percentage": [12.5, None],
        }
    )
    return estimates(frame, {"count": "integer", "percentage": "percentage"})


def test_estimates_melts_and_formats():
    result = _counts()
    assert list(result.columns) == list(RESULT_COLUMNS)
    assert result.height == 4
    values = dict(
        zip(
            zip(result["group_level"], result["estimate_name"], strict=True),
            result["estimate_value"],
            strict=True,
        )
    )
    assert values == {
        ("celecoxib", "count"): "1800",
        ("diclofenac", "count"): "NA",
        ("celecoxib", "percentage"): "12.5",
        ("diclofenac", "percentage"): "NA",
    }
    assert set(result["strata_name"]) == {"overall"} and set(result["cdm_name"]) == {"federated"}


def test_format_estimate_round_trips_floats():
    x = 0.1 + 0.2
    assert float(format_estimate(x)) == x
    assert format_estimate(3) == "3"
    assert format_estimate(True) == "TRUE"
    assert format_estimate(math.inf) == "Inf"
    assert format_estimate(None) == "NA"


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pl.DataFrame({"estimate_name": ["x"]}), "estimate_value"),
        (
            pl.DataFrame({"estimate_name": ["x"], "estimate_value": ["1"], "colour": ["red"]}),
            "colour",
        ),
        (
            pl.DataFrame(
                {"estimate_name": ["x"], "estimate_value": ["1"], "estimate_type": ["float"]}
            ),
            "estimate_type",
        ),
        (
            pl.DataFrame(
                {
                    "estimate_name": ["x"],
                    "estimate_value": ["1"],
                    "strata_name": ["sex &&& age"],
                    "strata_level": ["Male"],
                }
            ),
            "strata_name and strata_level",
        ),
    ],
)
def test_invalid_results_are_refused(frame, message):
    with pytest.raises(ValueError, match=message):
        summarised_result(frame)


def test_bind_write_and_read_back(tmp_path):
    other = summarised_result(
        pl.DataFrame({"estimate_name": ["chi_squared"], "estimate_value": [3.5]})
    )
    result, settings = bind_results(
        [
            (
                _counts(),
                {
                    "result_type": "counts",
                    "analysis_id": "feasibility",
                    "study_hash": "ab12",
                    "min_cell_count": 10,
                },
            ),
            (
                other,
                {
                    "result_type": "survival",
                    "analysis_id": "km",
                    "epsilon_spent": 0.5,
                    "time_bin_days": 30,
                },
            ),
        ]
    )
    assert result["result_id"].unique().sort().to_list() == [1, 2]
    assert settings.columns[: len(SETTINGS_COLUMNS)] == SETTINGS_COLUMNS
    assert settings.row(1, named=True)["time_bin_days"] == "30"
    assert settings.row(0, named=True)["permit_id"] == "NA"

    out = write_results(tmp_path / "results", result, settings)
    assert sorted(p.name for p in out.iterdir()) == [
        "results.csv",
        "results.parquet",
        "settings.csv",
        "settings.parquet",
    ]
    back, back_settings = read_results(out)
    assert back.equals(result) and back_settings.equals(settings)
    (out / "results.parquet").unlink()
    (out / "settings.parquet").unlink()
    csv_back, csv_settings = read_results(out)
    assert csv_back.equals(result)
    assert csv_settings["analysis_id"].to_list() == ["feasibility", "km"]


def test_write_refuses_results_without_settings(tmp_path):
    with pytest.raises(ValueError, match="without a settings row"):
        write_results(tmp_path, _counts(), settings_table([]))
    with pytest.raises(FileNotFoundError, match="results"):
        read_results(tmp_path / "missing")
