"""OpenDP noise: the right distribution, the right scale, the right cost, and nothing from floats."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from privacy.accounting import epsilon_to_rho, pure_epsilon_to_rho, rho_to_epsilon
from privacy.dp import DpError, make_mechanism, noise_statistics
from studies.permit import PermitAnalysis
from studies.statistics import make_statistics

NAN = float("nan")


def _goodness_of_fit(samples: np.ndarray, log_pmf, support: int) -> float:
    """Chi-square p-value of integer samples against a pmf on [-support, support] + two tails."""
    xs = np.arange(-support, support + 1)
    weights = np.exp(log_pmf(xs.astype(float)))
    # the mass outside [-support, support] (symmetric), summed far enough to be exact here
    tail_xs = np.arange(support + 1, 40 * support)
    tail = np.exp(log_pmf(tail_xs.astype(float))).sum()
    total = weights.sum() + 2 * tail
    expected = np.r_[tail, weights, tail] / total * samples.size
    clipped = np.clip(samples, -support - 1, support + 1)
    observed = np.array([(clipped == x).sum() for x in range(-support - 1, support + 2)])
    return float(stats.chisquare(observed, expected).pvalue)


def _count_cells(cells: int, value: float) -> pl.DataFrame:
    """A statistics table of ``cells`` count rows, each ``value``: the noise of many cells
    shows the mechanism's distribution."""
    return make_statistics(
        pl.DataFrame(
            {
                "variable_level": [str(i) for i in range(cells)],
                "estimate_name": "count",
                "release_class": "count",
                "value": value,
            }
        )
    )


@pytest.mark.parametrize(
    ("mechanism", "scale", "log_pmf"),
    [
        ("gaussian", 3.0, lambda x: -(x**2) / (2 * 3.0**2)),
        ("laplace", 2.5, lambda x: -np.abs(x) / 2.5),
    ],
)
def test_noise_follows_the_intended_discrete_distribution(mechanism, scale, log_pmf) -> None:
    """Discrete Gaussian pmf ~ exp(-x^2 / 2s^2), discrete Laplace pmf ~ exp(-|x| / s)."""
    samples = np.array(make_mechanism(mechanism, scale)([0] * 20_000))
    assert samples.dtype.kind == "i"  # integers: no float noise anywhere
    p_value = _goodness_of_fit(samples, log_pmf, support=int(4 * scale))
    assert p_value > 1e-4
    wrong_scale = _goodness_of_fit(samples, lambda x: log_pmf(x * 0.8), support=int(4 * scale))
    assert wrong_scale < 1e-6  # the test can tell a 25% wider distribution apart


def test_released_counts_carry_that_noise_at_the_reported_scale() -> None:
    """The gate's noise step: released - true follows the discrete Gaussian of the report."""
    table = _count_cells(4000, 1000.0)
    grant = PermitAnalysis(id="a", mechanism="gaussian", cost=0.5, max_rows_per_person=1)
    noisy, report = noise_statistics(table, grant, declared_rows=1)
    assert report.scale == pytest.approx(1.0)  # rho = 1 / (2 s^2) = 0.5
    assert report.rho == pytest.approx(0.5)
    noise = (noisy["value"] - 1000.0).cast(pl.Int64).to_numpy()
    assert _goodness_of_fit(noise, lambda x: -(x**2) / 2.0, support=4) > 1e-4
    assert noisy["value"].to_numpy() == pytest.approx(np.round(noisy["value"].to_numpy()))


def test_sums_are_noised_in_proportion_to_their_bounds_and_values_withheld() -> None:
    table = make_statistics(
        pl.DataFrame(
            {
                "variable_level": ["a", "a", "a"],
                "estimate_name": ["count", "sum_age", "beta"],
                "release_class": ["count", "sum", "value"],
                "value": [500.0, 25_000.0, 0.7],
                "lower": [NAN, 0.0, NAN],
                "upper": [NAN, 120.0, NAN],
            }
        )
    )
    grant = PermitAnalysis(id="a", mechanism="laplace", cost=1.0, max_rows_per_person=2)
    noisy, report = noise_statistics(table, grant, declared_rows=1)
    # one person moves the count by 1 and the sum by at most 120: two classes, shares 1 + 1
    assert report.scale == pytest.approx(2.0)  # epsilon = 1/s + 120/(120 s) = 1
    assert report.pure_epsilon == pytest.approx(1.0)
    assert report.rho == pytest.approx(pure_epsilon_to_rho(1.0))
    assert report.values_withheld == 1 and math.isnan(noisy["value"][2])
    assert noisy["value"][1] % 1 == 0


def test_record_counts_with_a_per_person_cap_get_proportional_noise() -> None:
    """A count row whose ``upper`` says 5 records per person has sensitivity 5, not 1."""
    table = make_statistics(
        pl.DataFrame(
            {
                "variable_name": ["Number subjects", "Number records"],
                "estimate_name": "count",
                "release_class": "count",
                "value": [100.0, 300.0],
                "upper": [NAN, 5.0],
            }
        )
    )
    grant = PermitAnalysis(id="a", mechanism="gaussian", cost=0.5, max_rows_per_person=2)
    _, report = noise_statistics(table, grant, declared_rows=1)
    # two classes (c=1 and c=5), one row each: rho = 1/(2 s^2) + 25/(2 (5 s)^2) = 1/s^2
    assert report.scale == pytest.approx(math.sqrt(2.0))
    assert report.rho == pytest.approx(0.5)


@pytest.mark.parametrize("missing", [NAN, None])
def test_unbounded_sum_cannot_be_released_with_dp(missing) -> None:
    table = make_statistics(
        pl.DataFrame(
            {
                "estimate_name": ["sum_x"],
                "release_class": ["sum"],
                "value": [10.0],
                "upper": [missing],
            },
            schema_overrides={"upper": pl.Float64},
        )
    )
    with pytest.raises(DpError, match="no contribution bounds"):
        noise_statistics(
            table, PermitAnalysis(id="a", mechanism="gaussian", cost=0.1), declared_rows=1
        )


def test_default_contribution_bound_is_every_row() -> None:
    """Without max_rows_per_person a person may touch all rows: scale grows with sqrt(rows)."""
    table = _count_cells(9, 50.0)
    grant = PermitAnalysis(id="a", mechanism="gaussian", cost=0.5)
    _, report = noise_statistics(table, grant, declared_rows=1)
    assert report.scale == pytest.approx(3.0)  # rho = 9 / (2 s^2) = 0.5


def test_rho_epsilon_conversion_is_opendps_and_tighter_than_the_textbook() -> None:
    rho, delta = 0.125, 1e-6
    textbook = rho + 2 * math.sqrt(rho * math.log(1 / delta))
    assert rho_to_epsilon(rho, delta) == pytest.approx(2.419093, abs=1e-5)
    assert rho_to_epsilon(rho, delta) < textbook
    assert rho_to_epsilon(0.0, delta) == 0.0
    for epsilon in (0.1, 1.0, 5.0):
        rho = epsilon_to_rho(epsilon, delta)
        assert rho_to_epsilon(rho, delta) == pytest.approx(epsilon, rel=1e-9)
    assert epsilon_to_rho(1.0, 1e-6) == pytest.approx(0.0243560, rel=1e-4)
    assert rho_to_epsilon(1e5, delta) > 1e5  # huge budgets fall back to the upper bound
