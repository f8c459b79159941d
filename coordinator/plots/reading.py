"""Reading a summarised_result for a plot: DARWIN EU names, suppressed and withheld cells.

The readers the report shares with the figures (``with_values``, ``pooled_rows``, ``norm``,
the estimate name lists); see the package docstring for the rules on suppressed cells.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import polars as pl

from studies.results import ROW_GROUP, SEP

POOLED_CDM_NAMES = ("pooled", "federated", "combined", "overall", "all")
PALETTE = ["#1f5f8b", "#d1495b", "#2a9d8f", "#edae49", "#6a4c93", "#8a817c", "#00798c", "#c0692a"]
SUPPRESSED_COLOR = "#bbbbbb"
DPI = 110

SURVIVAL_ESTIMATES = ("estimate", "survival", "survival_probability", "km_estimate")
AT_RISK_ESTIMATES = ("n_risk", "number_at_risk", "n_at_risk", "at_risk", "count_at_risk")
EVENT_ESTIMATES = ("n_event", "number_events", "n_events", "events")
INCIDENCE_ESTIMATES = (
    "incidence_100000_pys",
    "incidence_1000_pys",
    "incidence_100_pys",
    "incidence_rate",
    "incidence",
)
PREVALENCE_ESTIMATES = ("prevalence", "prevalence_proportion")
RATIO_ESTIMATES = (
    "odds_ratio",
    "rate_ratio",
    "incidence_rate_ratio",
    "risk_ratio",
    "hazard_ratio",
    "exp_coef",
    "exp_estimate",
)
COEF_ESTIMATES = ("coef", "coefficient", "beta", "log_odds", "estimate")
SE_ESTIMATES = ("std_error", "se", "standard_error")
PROPORTION_ESTIMATES = ("percentage", "percent", "proportion")
AGE_GROUP_NAMES = ("age_group", "age_band", "age_category")
TIME_NAMES = ("time", "days", "time_days", "follow_up_days", "t")
PERIOD_NAMES = (
    "incidence_start_date",
    "prevalence_start_date",
    "period",
    "year",
    "calendar_year",
    "start_date",
    "interval_start",
)
INTERCEPT_NAMES = ("intercept", "(intercept)", "const")
NOT_COVARIATES = AGE_GROUP_NAMES + (
    "sex",
    "age",
    "number_subjects",
    "number_records",
    "prior_observation",
    "future_observation",
    "cohort_start_date",
    "cohort_end_date",
    "days_in_cohort",
)
#: Estimates that are numbers of persons or records: a missing one was withheld by a gate.
COUNT_ESTIMATES = (
    ("count", "n", "persons", "records", "subjects") + AT_RISK_ESTIMATES + EVENT_ESTIMATES
)
#: Estimates flagging a pooled group that leaves out nodes whose gate withheld part of it
#: (``studies.analyses.pooling.partial_pool_rows``): they mark their row group, not a value.
PARTIAL_POOL_ESTIMATES = ("nodes_contributing", "nodes_withheld")
WITHHELD_MARK = "withheld"


class NothingToPlot(Exception):
    """The rows hold nothing this plot can draw; the message tells the reader why."""


# --------------------------------------------------------------------------------------------
# Reading a summarised_result
# --------------------------------------------------------------------------------------------


def norm(name: str | None) -> str:
    """Lower-case a name and turn spaces and hyphens into underscores, for loose matching."""
    return re.sub(r"[\s\-]+", "_", (name or "").strip().lower())


def norm_expr(column: str) -> pl.Expr:
    """``norm`` as a polars expression, for whole columns."""
    return (
        pl.col(column)
        .fill_null("")
        .str.strip_chars()
        .str.to_lowercase()
        .str.replace_all(r"[\s\-]+", "_")
    )


def split_pairs(names: str | None, levels: str | None) -> dict[str, str]:
    """``"sex &&& age_group", "Female &&& 18-64"`` -> ``{"sex": "Female", "age_group": "18-64"}``.

    ``overall``/``overall`` and empty pairs give an empty dict: they carry no stratum.
    """
    keys = [norm(n) for n in (names or "").split(SEP.strip())]
    values = [v.strip() for v in (levels or "").split(SEP.strip())]
    return {
        k: v for k, v in zip(keys, values, strict=False) if k and k != "overall" and v != "overall"
    }


def with_values(frame: pl.DataFrame, min_cell_count: int = 10) -> pl.DataFrame:
    """Add ``value`` (Float64; null when suppressed, missing or not numeric), ``suppressed`` and
    ``mark`` (how a suppressed cell reads: its own ``<10``, else ``<min_cell_count``).

    A cell is suppressed when it says so (``<10``, ``-``), when it is a missing count (``NA`` of
    an integer or count estimate: a count always exists, so a missing one was withheld), or when
    it is missing beside a suppressed count of the same row group (a percentage, mean or rate
    derived from it). Any other ``NA`` is "not estimable", not suppressed. A frame that already
    has these columns is returned as it is, so plots and their helpers can both call this.
    """
    if "suppressed" in frame.columns:
        return frame
    text = pl.col("estimate_value").cast(pl.String).str.strip_chars()
    missing = text.is_null() | text.str.to_lowercase().is_in(["", "na", "nan", "null", "none"])
    estimate = norm_expr("estimate_name")
    count_like = (
        estimate.is_in(COUNT_ESTIMATES)
        | estimate.str.ends_with("_count")
        | estimate.str.starts_with("n_")
        | (pl.col("estimate_type") == "integer")
    )
    marked = (text.str.starts_with("<") | (text == "-")).fill_null(False)
    withheld = marked | (missing & count_like)
    groups = [c for c in ROW_GROUP if c in frame.columns]
    partial = (estimate == "nodes_withheld").any().over(groups)  # pooled without some node
    suppressed = withheld | (missing & withheld.any().over(groups)) | partial
    number = text.cast(pl.Float64, strict=False)
    return frame.with_columns(
        suppressed=suppressed,
        mark=pl.when(suppressed).then(
            pl.when(marked & (text != "-"))
            .then(text)
            .when(partial)
            .then(pl.lit(WITHHELD_MARK))
            .otherwise(pl.lit(f"<{min_cell_count}"))
        ),
        # Inf (an open CI) is not drawable; a partial pool's number is not the pooled value
        value=pl.when(number.is_finite() & ~partial).then(number),
        _estimate=estimate,
        _variable=norm_expr("variable_name"),
    ).filter(~estimate.is_in(PARTIAL_POOL_ESTIMATES))


def pooled_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """Keep the pooled rows when per-node rows sit beside them (the plots show the federation)."""
    names = frame["cdm_name"].unique().to_list()
    if len(names) <= 1:
        return frame
    for pooled in POOLED_CDM_NAMES:
        matches = [n for n in names if norm(n) == pooled]
        if matches:
            return frame.filter(pl.col("cdm_name") == matches[0])
    return frame


def threshold_of(text: str | None, default: int = 10) -> int:
    """The number in a suppression mark (``"<10"`` -> 10), or ``default``."""
    match = re.search(r"\d+", text or "")
    return int(match.group()) if match else default


def _pick(frame: pl.DataFrame, names: Iterable[str]) -> tuple[str, pl.DataFrame]:
    """Rows of the first of ``names`` present as an estimate name (loosely matched)."""
    present = set(frame["_estimate"].to_list())
    for name in names:
        if name in present:
            return name, frame.filter(pl.col("_estimate") == name)
    return "", frame.clear()


def _bounds(frame: pl.DataFrame, point: str, keys: Sequence[str]) -> pl.DataFrame:
    """``keys`` + point, lower, upper and the point's suppression flag, one row per key."""
    lower = (f"{point}_95ci_lower", f"{point}_lower", "lower_95ci", "ci_lower", "lower")
    upper = (f"{point}_95ci_upper", f"{point}_upper", "upper_95ci", "ci_upper", "upper")
    out = (
        frame.filter(pl.col("_estimate") == point)
        .select(*keys, point=pl.col("value"), suppressed="suppressed", mark="mark")
        .unique(subset=list(keys), keep="first", maintain_order=True)
    )
    for column, names in (("lower", lower), ("upper", upper)):
        _, rows = _pick(frame, names)
        rows = rows.select(*keys, pl.col("value").alias(column)).unique(
            subset=list(keys), keep="first", maintain_order=True
        )
        out = out.join(rows, on=list(keys), how="left", nulls_equal=True)
    return out


def _axis_value(row: dict, names: Sequence[str]) -> str | None:
    """A row's value along an axis (time, period) from additional, strata or variable pairs."""
    for prefix in ("additional", "strata", "variable"):
        pairs = split_pairs(row.get(f"{prefix}_name"), row.get(f"{prefix}_level"))
        for name in names:
            if name in pairs:
                return pairs[name]
    if norm(row.get("variable_name")) in names:
        return row.get("variable_level")
    return None


def _with_axis(frame: pl.DataFrame, names: Sequence[str], column: str) -> pl.DataFrame:
    """Add ``column`` holding each row's axis value (null when the row has none)."""
    values = [_axis_value(row, names) for row in frame.iter_rows(named=True)]
    return frame.with_columns(pl.Series(column, values, dtype=pl.String))


def _with_curves(frame: pl.DataFrame, axis: Sequence[str]) -> pl.DataFrame:
    """Add ``_curve``: which line a row belongs to (cohort, strata, outcome), in words.

    Parts that every row shares (one outcome, one stratum) are left out of the labels, and so
    are the axis names themselves (a calendar-year stratum is the x axis, not a line).
    """
    keyed = []
    for row in frame.iter_rows(named=True):
        parts = {"group": (row.get("group_level") or "").replace(SEP, " / ")}
        strata = split_pairs(row.get("strata_name"), row.get("strata_level"))
        parts |= {k: v for k, v in strata.items() if k not in axis}
        variable = row.get("variable_level") or ""
        if (
            not re.fullmatch(r"[\d.\-]*|overall", variable)
            and norm(row["variable_name"]) not in axis
        ):
            parts["variable"] = variable
        keyed.append(parts)
    names = {k for parts in keyed for k in parts}
    varying = [k for k in names if len({parts.get(k) for parts in keyed}) > 1] or ["group"]
    order = [
        k for k in ("group", *sorted(names - {"group", "variable"}), "variable") if k in varying
    ]
    labels = [
        " · ".join(parts[k] for k in order if parts.get(k) not in (None, "", "overall"))
        or "overall"
        for parts in keyed
    ]
    return frame.with_columns(pl.Series("_curve", labels, dtype=pl.String))


def _first_int(text: str) -> float:
    """Sort key of an age band or period: its first number (``"65+"`` -> 65)."""
    match = re.search(r"\d+(\.\d+)?", text or "")
    return float(match.group()) if match else math.inf
