"""Statistical disclosure control on a statistics table, applied by the gate before anything leaves.

Three layers, in the spirit of OHDSI/DARWIN EU result suppression and DataSHIELD's guards:

1. Small cells: a count with 0 < value < min_cell_count is suppressed (value set to NaN; the
   results show it as ``<N`` from the min cell count in the settings). Zero is released.
2. Complementary suppression: where a total and its parts are both released, one suppressed
   part could be recomputed (total minus the others). In every margin set with exactly one
   suppressed cell, the smallest other released cell is suppressed too, until no set has exactly
   one. Margin sets are the levels of one strata plus its ``overall`` row, and the levels of one
   variable (its total usually released elsewhere, e.g. as the cohort count).
3. Linked values: the rows of a group (``GROUP_KEYS``: n_risk, n_event and n_censor at one
   time; numerator and denominator; a count and its percentage) are functions of one another,
   so a group is suppressed as a whole, zeros included, when any of its counts is small or two
   of its counts differ by 1 to min_cell_count - 1 (their difference, e.g. records - events or
   denominator - outcome, would be a small cell). Every sum and value of the group goes with it,
   so a mean or percentage never gives its count back.
4. Small strata: a stratum level (cohort, strata_name, strata_level) whose largest count is
   1 to min_cell_count - 1 releases nothing but its suppression marks.

Regression analyses are refused outright (nothing released) when the DataSHIELD-style guards fail:
too few rows, a saturated model (parameters > 0.33 x N) or a binary level below the cell count.
Parameters are the ``score`` (GLM) or ``event_sum`` (Cox) rows; counts on a time axis (Cox risk
sets per time) are suppressed when small, not a reason to refuse.
With nothing below the threshold a table passes unchanged, so exact methods stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from privacy.dp import missing_as_nan
from privacy.statistics import GROUP_KEYS, STRATA_SEP, WITHHELD_KEYS

SATURATION_RATIO = 0.33
"""DataSHIELD's nfilter.glm: refuse when parameters exceed this fraction of the rows."""
ROW_COUNT_VARIABLE = "records"
"""The count row (``variable_name``) a regression's local step reports its number of rows under."""
PARAMETER_ESTIMATES = ("score", "event_sum")
"""Value rows of a regression, one per model parameter: a GLM's score, a Cox model's covariate
sums over events (its per-time risk-set sums are not parameters)."""
TIME_VARIABLE = "time"
"""Count rows on a time axis (Cox numbers at risk and events per time): small ones are
suppressed like any cell, and the model drops those times; they do not refuse the release."""

_KEY_JOIN = "\x1f"
"""Joins key columns into one helper key; a control character no strata or level contains."""


class DisclosureRefusal(ValueError):
    """The table cannot be released at all (a regression guard failed); the message says which."""


@dataclass(frozen=True)
class DisclosureReport:
    """What disclosure control did, for the settings table."""

    min_cell_count: int
    suppressed_cells: int
    """Counts suppressed as small cells."""
    complementary_cells: int
    """Counts suppressed so that a margin cannot give a small cell back."""
    derived_rows: int
    """Sums and values suppressed with a count of their group."""


def protect(
    stats: pl.DataFrame, min_cell_count: int, *, regression: bool = False
) -> tuple[pl.DataFrame, DisclosureReport]:
    """Suppress small, recoverable and derived cells; run regression guards when asked."""
    stats = missing_as_nan(stats)
    marked = stats.with_row_index("_row").with_columns(
        _sup=(pl.col("release_class") == "count")
        & pl.col("value").is_finite()
        & (pl.col("value") > 0)
        & (pl.col("value") < min_cell_count)
    )
    marked = marked.with_columns(_sup=pl.col("_sup") | _small_difference(min_cell_count))
    primary = int(marked["_sup"].sum())
    if regression:
        on_time_axis = pl.col("variable_name") == TIME_VARIABLE
        small = int(marked.filter(pl.col("_sup") & ~on_time_axis).height)
        regression_guards(stats, min_cell_count, small_cells=small)
    marked = _complementary(marked)
    complementary = int(marked["_sup"].sum()) - primary
    marked = _small_strata(_derived(marked), min_cell_count)
    derived = int(marked["_sup"].sum()) - primary - complementary
    out = marked.with_columns(
        value=pl.when(pl.col("_sup")).then(float("nan")).otherwise(pl.col("value"))
    ).select(stats.columns)
    return out, DisclosureReport(min_cell_count, primary, complementary, derived)


def round_counts(stats: pl.DataFrame, base: int) -> pl.DataFrame:
    """Round every released count to the nearest multiple of ``base`` (suppressed stay NaN).

    For figures published without a permit (a node's catalogue description): after ``protect``
    no released count is below the minimum cell count, so with ``base`` at most that count no
    rounded value falls below it either, and most small changes between two publications do not
    show. Rounding is not differential privacy: a change that crosses a rounding boundary shows.
    """
    if base < 1:
        raise ValueError(f"rounding base must be at least 1, got {base}")
    count = (pl.col("release_class") == "count") & pl.col("value").is_finite()
    rounded = (pl.col("value") / base + 0.5).floor() * base
    return stats.with_columns(value=pl.when(count).then(rounded).otherwise(pl.col("value")))


def regression_guards(stats: pl.DataFrame, min_cell_count: int, *, small_cells: int) -> None:
    """Refuse a regression release that would disclose individuals (DataSHIELD-style checks)."""
    rows = stats.filter(
        (pl.col("release_class") == "count") & (pl.col("variable_name") == ROW_COUNT_VARIABLE)
    )
    if rows.height == 0:
        raise DisclosureRefusal(
            f"regression statistics carry no row count (count row '{ROW_COUNT_VARIABLE}')"
        )
    n = float(rows["value"].min())
    values = stats.filter(pl.col("release_class") == "value")
    scores = values.filter(pl.col("estimate_name").is_in(PARAMETER_ESTIMATES)).height
    parameters = scores or values["variable_level"].n_unique()
    if n < min_cell_count:
        raise DisclosureRefusal(f"regression on {n:g} rows, below the minimum cell count")
    if parameters > SATURATION_RATIO * n:
        raise DisclosureRefusal(
            f"saturated regression: {parameters} parameters > {SATURATION_RATIO} x {n:g} rows"
        )
    if small_cells:
        raise DisclosureRefusal(
            f"regression with {small_cells} outcome/covariate level count(s) below {min_cell_count}"
        )


def _complementary(marked: pl.DataFrame) -> pl.DataFrame:
    """Suppress more cells until no margin set has exactly one suppressed cell."""
    while True:
        extra = _complement_candidates(marked)
        if extra.is_empty():
            return marked
        marked = marked.with_columns(_sup=pl.col("_sup") | pl.col("_row").is_in(extra.implode()))


def _margin_sets(counts: pl.DataFrame) -> pl.DataFrame:
    """Membership of count cells in margin sets: (_row, _set, _is_total, value, _sup).

    For a strata ``a &&& b`` at levels ``x &&& y``, the cells varying ``a`` with ``b = y`` fixed
    sum to the ``b = y`` cell (the ``overall`` row once no stratum is left); the levels of one
    variable form a set of their own.
    """
    base = pl.concat_str(
        ["cohort", "variable_name", "variable_level", "estimate_name"], separator=_KEY_JOIN
    )
    counts = counts.with_columns(_base=base)
    columns = ["_row", "_set", "_is_total", "value", "_sup"]
    members = []
    for strata_name in counts["strata_name"].unique().to_list():
        names = strata_name.split(STRATA_SEP)
        if strata_name == "overall":
            continue
        for i in range(len(names)):
            kept = [j for j in range(len(names)) if j != i]
            total_name = STRATA_SEP.join(names[j] for j in kept) or "overall"
            kept_levels = (
                pl.col("strata_level").str.split(STRATA_SEP).list.gather(kept).list.join(STRATA_SEP)
            )
            parts = counts.filter(pl.col("strata_name") == strata_name).with_columns(
                _key=pl.concat_str(
                    [pl.col("_base"), kept_levels if kept else pl.lit("overall")],
                    separator=_KEY_JOIN,
                ),
                _is_total=pl.lit(False),
            )
            parts = parts.with_columns(
                _set=pl.concat_str(
                    [pl.lit(f"{strata_name}{_KEY_JOIN}{i}"), "_key"], separator=_KEY_JOIN
                )
            )
            totals = (
                counts.filter(pl.col("strata_name") == total_name)
                .with_columns(_key=pl.concat_str(["_base", "strata_level"], separator=_KEY_JOIN))
                .join(parts.select("_key", "_set").unique(), on="_key")
                .with_columns(_is_total=pl.lit(True))
            )
            members += [parts.select(columns), totals.select(columns)]
    levels = counts.with_columns(
        _set=pl.concat_str(
            [
                pl.lit("v"),
                "cohort",
                "strata_name",
                "strata_level",
                "variable_name",
                "estimate_name",
            ],
            separator=_KEY_JOIN,
        ),
        _is_total=pl.lit(False),
    ).filter(pl.len().over("_set") > 1)
    return pl.concat([*members, levels.select(columns)])


def _complement_candidates(marked: pl.DataFrame) -> pl.Series:
    """Rows to suppress next: the smallest released cell of each set with one suppressed cell."""
    members = _margin_sets(marked.filter(pl.col("release_class") == "count"))
    exposed = members.filter(pl.col("_sup").sum().over("_set") == 1)
    return (
        exposed.filter(~pl.col("_sup") & pl.col("value").is_finite() & (pl.col("value") > 0))
        .sort(["_set", "_is_total", "value", "_row"])
        .group_by("_set", maintain_order=True)
        .first()["_row"]
        .unique()
    )


def _small_difference(min_cell_count: int) -> pl.Expr:
    """Counts of a group two of which differ by 1 to min_cell_count - 1 (all of them flagged).

    The largest and smallest count of a group bound every pairwise gap only loosely, so the
    sorted counts are compared neighbour to neighbour: some gap is small exactly when a pair of
    neighbours is.
    """
    is_count = (pl.col("release_class") == "count") & pl.col("value").is_finite()
    counts = pl.when(is_count).then(pl.col("value"))
    ordered = counts.sort(nulls_last=True)
    gaps = ordered.diff()
    small = ((gaps > 0) & (gaps < min_cell_count)).any()
    return is_count & small.over(GROUP_KEYS)


def _derived(marked: pl.DataFrame) -> pl.DataFrame:
    """Suppress every row (counts, zeros included, sums, values) of a group with a suppressed
    count: its rows are functions of one another."""
    group_hit = (pl.col("_sup") & (pl.col("release_class") == "count")).any().over(GROUP_KEYS)
    return marked.with_columns(_sup=pl.col("_sup") | group_hit)


def _small_strata(marked: pl.DataFrame, min_cell_count: int) -> pl.DataFrame:
    """Suppress every row of a stratum level whose largest count is 1 to min_cell_count - 1
    (an empty stratum, all zeros, shows its zeros: it holds no one)."""
    stratum = ["cohort", "strata_name", "strata_level"]
    is_count = (pl.col("release_class") == "count") & pl.col("value").is_finite()
    largest = pl.when(is_count).then(pl.col("value")).max().over(stratum)
    small = (pl.col("strata_name") != "overall") & (largest > 0) & (largest < min_cell_count)
    return marked.with_columns(_sup=pl.col("_sup") | small.fill_null(False))


def withhold_keyed(
    stats: pl.DataFrame, keyed: pl.Expr, *, all_keyed: bool
) -> tuple[pl.DataFrame, int]:
    """Drop the groups keyed by the data (``keyed``) that are withheld, or all of them
    (``all_keyed``, for DP releases, where presence is not noised); return the table and the
    number of groups dropped.

    A withheld row's key alone (a concept id, a year) says someone is there, so the row leaves
    no trace but one marker per (cohort, strata_name): ``variable_level`` ``WITHHELD_KEYS``.
    """
    suppressed = pl.col("value").is_nan().any().over(GROUP_KEYS)
    drop = keyed & (pl.lit(True) if all_keyed else suppressed)
    marked = stats.with_columns(_drop=drop)
    dropped = marked.filter(pl.col("_drop"))
    if dropped.is_empty():
        return stats, 0
    groups = dropped.select(GROUP_KEYS).unique().height
    markers = (
        dropped.select("cohort", "strata_name")
        .unique(maintain_order=True)
        .with_columns(
            strata_level=pl.lit("overall"),
            variable_name=pl.lit(""),
            variable_level=pl.lit(WITHHELD_KEYS),
            estimate_name=pl.lit("withheld_keys"),
            release_class=pl.lit("value"),
            value=pl.lit(float("nan")),
            lower=pl.lit(float("nan")),
            upper=pl.lit(float("nan")),
        )
    )
    kept = marked.filter(~pl.col("_drop")).drop("_drop")
    return pl.concat([kept, markers.select(stats.columns)], how="vertical"), groups
