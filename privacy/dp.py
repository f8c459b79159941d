"""Differential privacy on a statistics table with OpenDP's exact discrete samplers.

Counts and sums of a statistics table (``studies.statistics``) get discrete Gaussian (zCDP) or
discrete Laplace (pure DP) noise from ``opendp.measurements`` over vectors of integers. Noise
never comes from numpy's float samplers: those leak the true value through the low bits of the
float (Mironov 2012). Values (``kind == "value"``) cannot be protected this way and are
withheld from DP releases; means and rates are combined from the noisy sums and counts.

Contribution bounds are explicit:
- a count row counts each person at most once (person counts, ``upper`` NaN), or at most
  ``upper`` times when the analysis caps records per person in SQL and says so in the row's
  ``upper``; ``upper = inf`` marks a count of records (cohort entries, events) one person may
  add any number of: no finite noise covers it, so DP releases withhold it like a value;
- a sum row holds per-person contributions the analysis clamped in SQL to [lower, upper]
  (an infinite bound: withheld the same way);
- one person touches at most ``rows_per_person(declared, grant.max_rows_per_person)`` rows: the
  analysis's own declaration for the study at hand (``ReleaseProfile.rows_per_person``, passed
  in by the caller), which a permit may raise but never lower (every row when either says
  nothing).
Rows are grouped by per-row sensitivity ``c`` (1 for counts, ceil(max(|lower|, |upper|) /
resolution) for sums); each class is one OpenDP measurement with scale proportional to ``c`` and
a share of the release's cost proportional to the rows a person can touch in it. The loss
charged is what OpenDP's ``map`` reports for the sensitivities used, summed over classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import opendp.measurements as dpm
import polars as pl
from opendp.domains import atom_domain, vector_domain
from opendp.metrics import l1_distance, l2_distance
from opendp.mod import Measurement, enable_features

from privacy.accounting import pure_epsilon_to_rho
from privacy.grant import Grant

enable_features("contrib")  # the OpenDP modules, not its prelude: see privacy.accounting

_INT_VECTOR = vector_domain(atom_domain(T="i64"))


class DpError(ValueError):
    """A statistics table that cannot be released with the requested mechanism."""


@dataclass(frozen=True)
class NoiseReport:
    """What the noise step did, for the settings table and the ledger."""

    mechanism: str
    scale: float
    """Noise scale for unit-sensitivity rows (counts); class ``c`` rows get ``c * scale``."""
    rho: float
    """zCDP cost charged to the ledger (Laplace: epsilon^2 / 2)."""
    pure_epsilon: float | None
    """Laplace only: the pure-DP epsilon of the release."""
    rows_noised: int
    values_withheld: int


def make_mechanism(mechanism: str, scale: float) -> Measurement:
    """The OpenDP measurement adding integer noise of ``scale`` to a vector of i64.

    Gaussian works with the L2 distance and measures zCDP; Laplace with L1 and measures pure DP.
    Distances are f64 so that non-integer sensitivities (c * sqrt(k)) are mapped exactly.
    """
    if mechanism == "gaussian":
        return dpm.make_gaussian(_INT_VECTOR, l2_distance(T="f64"), scale=scale)
    if mechanism == "laplace":
        return dpm.make_laplace(_INT_VECTOR, l1_distance(T="f64"), scale=scale)
    raise DpError(f"unknown DP mechanism {mechanism!r}; expected 'gaussian' or 'laplace'")


def missing_as_nan(stats: pl.DataFrame) -> pl.DataFrame:
    """Read a null value or bound as NaN (missing), so no check mistakes it for a number."""
    return stats.with_columns(pl.col("value", "lower", "upper").fill_null(float("nan")))


def _row_sensitivity(stats: pl.DataFrame, resolution: float) -> pl.Expr:
    """Per-row change one person can cause, in integer units.

    Counts: 1, or their ``upper`` (records per person) when given; sums: bound / resolution.
    """
    bound = pl.max_horizontal(pl.col("lower").abs(), pl.col("upper").abs()) / resolution
    per_person = pl.when(pl.col("upper").is_finite()).then(pl.col("upper")).otherwise(1.0)
    return (
        pl.when(pl.col("release_class") == "count")
        .then(per_person.ceil())
        .otherwise(bound.ceil())
        .clip(lower_bound=1.0)
        .cast(pl.Int64)
    )


def rows_per_person(declared: int | None, permitted: int | None) -> int | None:
    """The rows one person may touch in a release: the analysis's declaration, raised by the
    permit's figure, never lowered; None (every row) when either gives none.

    A permit body's figure alone was trusted: ``max_rows_per_person=1`` on a study where each
    person touches 3 rows under-noised every release by sqrt(3).
    """
    if declared is None or permitted is None:
        return None
    return max(int(declared), int(permitted))


def check_rows_per_person(grant: Grant, declared: int | None) -> None:
    """Refuse a DP grant whose rows-per-person figure is below the analysis's declaration."""
    permitted = grant.max_rows_per_person
    if grant.mechanism in ("none", "dp_sgd") or permitted is None:
        return
    if declared is None or permitted < declared:
        says = "no bound (every row)" if declared is None else f"{declared}"
        raise DpError(
            f"analysis {grant.id!r}: the permit bounds rows per person at {permitted}, below "
            f"what the analysis declares for this study ({says}); a permit may raise the "
            "declaration, never lower it"
        )


def noise_statistics(
    stats: pl.DataFrame, grant: Grant, *, declared_rows: int | None
) -> tuple[pl.DataFrame, NoiseReport]:
    """Add the permit's noise to every count and sum row; withhold value rows (set NaN).

    ``declared_rows`` is the analysis's own rows-per-person declaration for the study
    (``studies.analysis.ReleaseProfile``; None: every row); the permit may only raise it.

    Rows without a finite per-person bound (``upper``/``lower`` infinite: record counts) are
    withheld too, and counted with the values in ``values_withheld``. Already-suppressed rows
    (NaN) stay NaN and are not noised. Noisy counts may be negative: they are released
    unclamped so that pooled totals across nodes stay unbiased.
    """
    if grant.mechanism == "none":
        raise DpError(f"analysis {grant.id!r} has no DP mechanism in the permit")
    stats = missing_as_nan(stats)
    unbounded = stats.filter(
        (pl.col("release_class") == "sum") & (pl.col("lower").is_nan() | pl.col("upper").is_nan())
    )
    if unbounded.height:
        raise DpError(
            f"sum row(s) {unbounded['estimate_name'].unique().to_list()} have no contribution "
            "bounds (lower/upper); a DP release needs them"
        )
    infinite = pl.col("upper").is_infinite() | (
        (pl.col("release_class") == "sum") & pl.col("lower").is_infinite()
    )
    indexed = stats.with_row_index("_row").with_columns(
        _withhold=(pl.col("release_class") == "value")
        | (pl.col("release_class").is_in(["count", "sum"]) & infinite)
    )
    noisy_rows = indexed.filter(
        pl.col("release_class").is_in(["count", "sum"])
        & pl.col("value").is_finite()
        & ~pl.col("_withhold")
    )
    noisy_rows = noisy_rows.with_columns(
        _c=_row_sensitivity(noisy_rows, grant.resolution),
        _units=(
            pl.col("value")
            / pl.when(pl.col("release_class") == "sum").then(grant.resolution).otherwise(1.0)
        )
        .round()
        .cast(pl.Int64),
    )
    classes = noisy_rows.group_by("_c").agg("_row", "_units").sort("_c")
    touched = rows_per_person(declared_rows, grant.max_rows_per_person) or noisy_rows.height
    touched = max(touched, 1)
    shares = [min(touched, len(rows)) for rows in classes["_row"].to_list()]
    total_share = max(sum(shares), 1)
    base_scale = _base_scale(grant, total_share)
    loss, released_rows, released_units = 0.0, [], []
    for c, rows, units, share in zip(
        classes["_c"].to_list(), classes["_row"], classes["_units"], shares, strict=True
    ):
        measurement = make_mechanism(grant.mechanism, c * base_scale)
        d_in = c * (math.sqrt(share) if grant.mechanism == "gaussian" else share)
        loss += float(measurement.map(float(d_in)))
        released_rows.extend(rows.to_list())
        released_units.extend(measurement(units.to_list()))
    noised = _write_back(indexed, released_rows, released_units, grant.resolution)
    rho = loss if grant.mechanism == "gaussian" else pure_epsilon_to_rho(loss)
    report = NoiseReport(
        mechanism=grant.mechanism,
        scale=base_scale,
        rho=rho,
        pure_epsilon=loss if grant.mechanism == "laplace" else None,
        rows_noised=len(released_rows),
        values_withheld=int(indexed["_withhold"].sum()),
    )
    return noised, report


def _base_scale(grant: Grant, total_share: int) -> float:
    """Scale for unit-sensitivity rows so that the whole release costs ``grant.cost``."""
    if grant.mechanism == "gaussian":  # rho = share / (2 scale^2) summed over classes
        return math.sqrt(total_share / (2.0 * grant.cost))
    return total_share / grant.cost  # laplace: epsilon = share / scale summed over classes


def _write_back(
    indexed: pl.DataFrame,
    rows: list[int],
    units: list[int],
    resolution: float,
) -> pl.DataFrame:
    """Put noisy integers back as values (sums rescaled), withhold the rows marked
    ``_withhold`` (values, unbounded rows), keep the order."""
    noisy = pl.DataFrame(
        {"_row": rows, "_noisy": units}, schema={"_row": pl.UInt32, "_noisy": pl.Int64}
    )
    scale_back = pl.when(pl.col("release_class") == "sum").then(resolution).otherwise(1.0)
    return (
        indexed.join(noisy, on="_row", how="left")
        .with_columns(
            value=pl.when(pl.col("_withhold"))
            .then(float("nan"))
            .when(pl.col("_noisy").is_not_null())
            .then(pl.col("_noisy").cast(pl.Float64) * scale_back)
            .otherwise(pl.col("value"))
        )
        .sort("_row")
        .drop("_row", "_withhold", "_noisy")
    )
