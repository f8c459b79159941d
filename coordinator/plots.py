"""Plots of a summarised_result, one function per picture, each taking a polars frame.

Every ``plot_*`` function takes rows of a DARWIN EU summarised_result (the 13 columns, values as
text) and returns a matplotlib ``Figure``; when the rows hold nothing it can draw it raises
``NothingToPlot`` with a sentence for the reader, so a report can say why a picture is missing
instead of failing. Nothing here imports fedomop: tests and notebooks call these directly.

Suppressed cells never become zeros. A cell is *suppressed* when its ``estimate_value`` says so
(``<10``, ``-``), when it is a count written ``NA`` (what ``studies.results`` writes for a cell the
gates withheld), or when it is ``NA`` beside such a count (a percentage or rate derived from it);
see ``with_values``. Bars of suppressed counts are drawn hatched up to the threshold and labelled
``<10``; suppressed points are left out of lines (a gap, never bridged) and counted in a note.
A pooled group that some node's gate withheld part of (flagged by a ``nodes_withheld`` row of
the same row group) is *withheld* too: its value counts no events for that node, so it is shown
as withheld, never as a number (let alone as "no event").

Names are matched loosely (case, spaces, hyphens ignored) and follow DARWIN EU conventions:
confidence bounds are ``<estimate>_95CI_lower`` / ``<estimate>_95CI_upper``; several names or
levels in one column are joined by `` &&& ``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SEP = " &&& "
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
#: (``studies.analyses.common.partial_pool_rows``): they mark their row group, not a value.
PARTIAL_POOL_ESTIMATES = ("nodes_contributing", "nodes_withheld")
WITHHELD_MARK = "withheld"
#: Columns that make one row group: the estimates of a group are about the same thing.
ROW_GROUP = [
    "result_id",
    "cdm_name",
    "group_name",
    "group_level",
    "strata_name",
    "strata_level",
    "variable_name",
    "variable_level",
    "additional_name",
    "additional_level",
]


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


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    """A figure in the report's house style (white, readable fonts)."""
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    fig.patch.set_facecolor("white")
    return fig


def figure_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes and close it (figures are not kept open)."""
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buffer.getvalue()


def save_png(fig: Figure, path: Path) -> bytes:
    """Write a figure to ``path`` as PNG and return the bytes (the report embeds them)."""
    data = figure_png(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)


def _note(fig: Figure, text: str) -> None:
    """A small grey sentence under the figure (what was suppressed or left out)."""
    if text:
        fig.text(0.01, -0.02, text, fontsize=8, color="#666666", ha="left", va="top", wrap=True)


# --------------------------------------------------------------------------------------------
# Age/sex pyramid
# --------------------------------------------------------------------------------------------


def _age_sex_counts(frame: pl.DataFrame) -> list[dict]:
    """Rows ``{group, age, sex, value, mark}`` of person counts by age group and sex."""
    rows = with_values(pooled_rows(frame)).filter(pl.col("_estimate").is_in(["count", "n"]))
    if rows["_variable"].is_in(["number_subjects"]).any():  # persons, not records
        rows = rows.filter(pl.col("_variable") == "number_subjects")
    out = []
    for row in rows.iter_rows(named=True):
        pairs = split_pairs(row["strata_name"], row["strata_level"])
        pairs |= split_pairs(row["variable_name"], row["variable_level"])
        if norm(row["variable_name"]) in AGE_GROUP_NAMES:
            pairs.setdefault(norm(row["variable_name"]), row["variable_level"])
        age = next((pairs[n] for n in AGE_GROUP_NAMES if n in pairs), None)
        sex = pairs.get("sex")
        if age is None or sex is None:
            continue
        out.append(
            {
                "group": row["group_level"] or "overall",
                "age": age,
                "sex": sex,
                "value": row["value"],
                "mark": row["mark"],
            }
        )
    return out


def plot_age_sex_pyramid(frame: pl.DataFrame, min_cell_count: int = 10) -> Figure:
    """Persons by age group, men to the left and women to the right, one panel per cohort."""
    frame = with_values(frame, min_cell_count)
    counts = _age_sex_counts(frame)
    sexes = {norm(c["sex"]) for c in counts}
    if not counts or not ({"male", "female"} <= sexes):
        raise NothingToPlot("no person counts by age group and sex (male and female) to draw")
    if all(c["value"] is None for c in counts):
        raise NothingToPlot("every cell is below the minimum cell count (suppressed)")
    groups = sorted({c["group"] for c in counts})
    ages = sorted({c["age"] for c in counts}, key=lambda a: (_first_int(a), a))
    fig = new_figure(4.2 * len(groups) + 0.6, 0.35 * len(ages) + 1.6)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    suppressed = 0
    for ax, group in zip(axes, groups, strict=True):
        cells = {(c["age"], norm(c["sex"])): c for c in counts if c["group"] == group}
        widest = max([c["value"] or 0 for c in cells.values()] + [min_cell_count])
        for sex, sign, color in (("male", -1, PALETTE[0]), ("female", 1, PALETTE[1])):
            for y, age in enumerate(ages):
                cell = cells.get((age, sex))
                if cell is None:
                    continue
                if cell["value"] is not None:
                    ax.barh(y, sign * cell["value"], color=color, height=0.8)
                    continue
                suppressed += 1
                width = threshold_of(cell["mark"], min_cell_count)
                ax.barh(
                    y,
                    sign * width,
                    height=0.8,
                    color="white",
                    edgecolor=SUPPRESSED_COLOR,
                    hatch="///",
                )
                ax.text(
                    sign * (width + widest * 0.02),
                    y,
                    cell["mark"] or f"<{min_cell_count}",
                    va="center",
                    ha="right" if sign < 0 else "left",
                    fontsize=8,
                    color="#555555",
                )
        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.set_yticks(range(len(ages)), [age_label(a) for a in ages])
        ax.set_xlim(-widest * 1.25, widest * 1.25)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{abs(x):,.0f}"))
        ax.set_title(group, fontsize=10)
        ax.set_xlabel("persons  (men ◀ │ ▶ women)", fontsize=9)
        _style(ax)
    axes[0].set_ylabel("age group", fontsize=9)
    if suppressed:
        _note(fig, f"Hatched bars: {suppressed} cell(s) below the minimum cell count, shown as <N.")
    fig.tight_layout()
    return fig


def _demographic_counts(frame: pl.DataFrame) -> list[dict]:
    """``{dimension, level, group, value, mark}`` persons by sex and by age group, separately:
    from variables ``Sex``/``Age group`` (characterization) or one-key strata (counts)."""
    rows = with_values(pooled_rows(frame)).filter(pl.col("_estimate").is_in(["count", "n"]))
    out = []
    for row in rows.iter_rows(named=True):
        strata = split_pairs(row["strata_name"], row["strata_level"])
        if row["_variable"] in ("sex", *AGE_GROUP_NAMES) and not strata:
            dimension, level = row["_variable"], row["variable_level"]
        elif len(strata) == 1 and row["_variable"] == "number_subjects":
            ((dimension, level),) = strata.items()
        else:
            continue
        if dimension not in ("sex", *AGE_GROUP_NAMES):
            continue
        dimension = "sex" if dimension == "sex" else "age group"
        out.append(
            {
                "dimension": dimension,
                "level": level,
                "group": row["group_level"] or "overall",
                "value": row["value"],
                "mark": row["mark"],
            }
        )
    return out


def plot_demographics(frame: pl.DataFrame, min_cell_count: int = 10) -> Figure:
    """Persons by sex and by age group per cohort, when the result holds them only separately
    (a pyramid needs them crossed)."""
    frame = with_values(frame, min_cell_count)
    cells = _demographic_counts(frame)
    if not cells:
        raise NothingToPlot("no person counts by sex or age group to draw")
    if all(c["value"] is None for c in cells):
        raise NothingToPlot("every cell is below the minimum cell count (suppressed)")
    dimensions = [d for d in ("sex", "age group") if any(c["dimension"] == d for c in cells)]
    groups = sorted({c["group"] for c in cells})
    levels = {
        d: sorted(
            {c["level"] for c in cells if c["dimension"] == d}, key=lambda v: (_first_int(v), v)
        )
        for d in dimensions
    }
    tallest = max(len(v) for v in levels.values())
    fig = new_figure(4.6 * len(dimensions) + 0.6, 0.32 * tallest * len(groups) + 1.8)
    axes = fig.subplots(1, len(dimensions), squeeze=False)[0]
    height = 0.8 / len(groups)
    suppressed = 0
    for ax, dimension in zip(axes, dimensions, strict=True):
        names = levels[dimension]
        widest = max(
            [c["value"] or 0 for c in cells if c["dimension"] == dimension] + [min_cell_count]
        )
        for g, group in enumerate(groups):
            found = {
                c["level"]: c for c in cells if c["dimension"] == dimension and c["group"] == group
            }
            for y, level in enumerate(names):
                cell = found.get(level)
                if cell is None:
                    continue
                offset = y + (g - (len(groups) - 1) / 2) * height  # y axis runs downwards
                color = PALETTE[g % len(PALETTE)]
                label = group if y == 0 or level not in found else None
                if cell["value"] is not None:
                    ax.barh(offset, cell["value"], height=height, color=color, label=label)
                    continue
                suppressed += 1
                width = threshold_of(cell["mark"], min_cell_count)
                ax.barh(offset, width, height=height, color="white", edgecolor=color, hatch="///")
                ax.text(width + widest * 0.02, offset, cell["mark"], va="center", fontsize=7)
        ax.set_yticks(range(len(names)), [age_label(n) for n in names])
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(f"by {dimension}", fontsize=10)
        ax.set_xlabel("count", fontsize=9)
        _style(ax)
    if len(groups) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=False))
        axes[-1].legend(unique.values(), unique.keys(), fontsize=8, frameon=False)
    if suppressed:
        _note(fig, f"Hatched bars: {suppressed} cell(s) below the minimum cell count, shown as <N.")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Covariates: proportions and standardised mean differences
# --------------------------------------------------------------------------------------------


def _covariate_proportions(frame: pl.DataFrame) -> pl.DataFrame:
    """``group, covariate, proportion (0-1 or null), mark`` for binary covariates."""
    rows = with_values(pooled_rows(frame))
    name, rows = _pick(rows, PROPORTION_ESTIMATES)
    if not name:
        return pl.DataFrame(
            schema={
                "group": pl.String,
                "covariate": pl.String,
                "proportion": pl.Float64,
                "mark": pl.String,
            }
        )
    scale = 100.0 if name in ("percentage", "percent") else 1.0
    rows = rows.filter(
        ~pl.col("_variable").is_in(NOT_COVARIATES)
        & (pl.col("strata_name").fill_null("overall") == "overall")
    )
    covariate = (
        pl.when(pl.col("variable_level").fill_null("").is_in(["", "overall"]))
        .then(pl.col("variable_name"))
        .otherwise(pl.col("variable_name") + ": " + pl.col("variable_level"))
    )
    return rows.select(
        group=pl.col("group_level").fill_null("overall"),
        covariate=covariate,
        proportion=pl.col("value") / scale,
        mark="mark",
    ).unique(subset=["group", "covariate"], keep="first", maintain_order=True)


def plot_top_covariates(frame: pl.DataFrame, top: int = 20, min_cell_count: int = 10) -> Figure:
    """The ``top`` most frequent covariates as horizontal bars of proportions, per cohort."""
    frame = with_values(frame, min_cell_count)
    props = _covariate_proportions(frame)
    if props.is_empty():
        raise NothingToPlot("no covariate proportions (percentage estimates) to draw")
    if props["proportion"].is_null().all():
        raise NothingToPlot("every cell is below the minimum cell count (suppressed)")
    ranking = (
        props.group_by("covariate")
        .agg(pl.col("proportion").max().fill_null(0.0).alias("best"))
        .sort(["best", "covariate"], descending=[True, False])
        .head(top)["covariate"]
        .to_list()
    )
    groups = sorted(props["group"].unique().to_list())
    fig = new_figure(8.5, 0.32 * len(ranking) * max(1, min(len(groups), 3) * 0.6) + 1.4)
    ax = fig.add_subplot()
    height = 0.8 / len(groups)
    suppressed = 0
    for g, group in enumerate(groups):
        cells = {
            r["covariate"]: r for r in props.filter(pl.col("group") == group).iter_rows(named=True)
        }
        for y, covariate in enumerate(reversed(ranking)):
            cell = cells.get(covariate)
            if cell is None:
                continue
            offset = y - (g - (len(groups) - 1) / 2) * height
            if cell["proportion"] is None:
                suppressed += 1
                ax.text(0.002, offset, cell["mark"] or "suppressed", fontsize=7, va="center")
                continue
            ax.barh(offset, cell["proportion"], height=height, color=PALETTE[g % len(PALETTE)])
    ax.set_yticks(
        range(len(ranking)), [_short(age_label(c)) for c in reversed(ranking)], fontsize=8
    )
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("proportion of persons in cohort", fontsize=9)
    ax.set_title(f"Top {len(ranking)} covariates", fontsize=10)
    if len(groups) > 1:  # one key per cohort, whether or not its first bar was withheld
        keys = [
            matplotlib.patches.Patch(color=PALETTE[g % len(PALETTE)], label=group)
            for g, group in enumerate(groups)
        ]
        # beside the bars, never over them (a low-ranked covariate may be long in one cohort)
        ax.legend(
            handles=keys, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
        )
    _style(ax)
    notes = ["No bar: not among the concepts reported for that cohort."] if len(groups) > 1 else []
    if suppressed:
        notes.append(f"{suppressed} proportion(s) suppressed (from a count below threshold).")
    _note(fig, " ".join(notes))
    fig.tight_layout()
    return fig


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def age_label(text: str) -> str:
    """An age band as people write it: the open top band ``65 to 150`` reads ``65+`` (in a
    stratum, a level or a covariate name alike); the plots and the report's tables both use it."""
    return re.sub(r"\b(\d+) to 150\b", r"\1+", text or "")


def standardised_differences(frame: pl.DataFrame) -> pl.DataFrame:
    """``covariate, smd, comparison``: SMDs the analysis reported (its first comparison), else
    computed for binary covariates between the first two cohorts as
    (p1 - p2) / sqrt((p1(1-p1) + p2(1-p2)) / 2), the usual one for proportions.
    """
    rows = with_values(pooled_rows(frame))
    name, reported = _pick(rows, ("smd", "standardised_mean_difference", "std_diff"))
    if name:
        first = reported["group_level"][0]
        return (
            reported.filter(pl.col("group_level") == first)
            .select(
                covariate=pl.col("variable_name")
                + pl.when(pl.col("variable_level").fill_null("").is_in(["", "overall"]))
                .then(pl.lit(""))
                .otherwise(": " + pl.col("variable_level")),
                smd=pl.col("value"),
                comparison=pl.lit(first.replace(SEP, " vs ")),
            )
            .drop_nulls("smd")
        )
    props = _covariate_proportions(frame)
    groups = sorted(props["group"].unique().to_list())
    if len(groups) < 2:
        return pl.DataFrame(
            schema={"covariate": pl.String, "smd": pl.Float64, "comparison": pl.String}
        )
    left, right = (
        props.filter(pl.col("group") == g).select("covariate", pl.col("proportion").alias(g))
        for g in groups[:2]
    )
    p1, p2 = pl.col(groups[0]), pl.col(groups[1])
    pooled_var = (p1 * (1 - p1) + p2 * (1 - p2)) / 2
    return (
        left.join(right, on="covariate")
        .drop_nulls()
        .select(
            "covariate",
            smd=pl.when(pooled_var > 0).then((p1 - p2) / pooled_var.sqrt()),
            comparison=pl.lit(f"{groups[0]} vs {groups[1]}"),
        )
        .drop_nulls()
    )


def plot_smd(frame: pl.DataFrame, top: int = 25, min_cell_count: int = 10) -> Figure:
    """Standardised mean differences between two cohorts, largest first, with the 0.1 line."""
    frame = with_values(frame, min_cell_count)
    smd = standardised_differences(frame)
    if smd.is_empty():
        raise NothingToPlot("SMD needs covariate proportions for two cohorts")
    title = smd["comparison"][0]
    smd = smd.sort(pl.col("smd").abs(), descending=True).head(top).reverse()
    fig = new_figure(7.5, 0.28 * smd.height + 1.5)
    ax = fig.add_subplot()
    colors = [PALETTE[1] if abs(v) > 0.1 else PALETTE[0] for v in smd["smd"]]
    ax.scatter(smd["smd"], range(smd.height), color=colors, zorder=3, s=22)
    ax.hlines(range(smd.height), 0, smd["smd"], color="#999999", linewidth=0.8)
    for x in (-0.1, 0.1):
        ax.axvline(x, color=PALETTE[1], linestyle="--", linewidth=0.8)
    ax.axvline(0, color="#333333", linewidth=0.8)
    ax.set_yticks(
        range(smd.height), [_short(age_label(c), 40) for c in smd["covariate"]], fontsize=8
    )
    ax.set_title(f"Standardised mean difference: {title}", fontsize=10)
    ax.set_xlabel("SMD (|SMD| > 0.1 in red)", fontsize=9)
    _style(ax)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Incidence and prevalence over time
# --------------------------------------------------------------------------------------------


def _series(frame: pl.DataFrame, estimates: Sequence[str], axis: Sequence[str]) -> tuple:
    """``(estimate name, rows with x, curve, point, lower, upper, suppressed)`` for line plots."""
    rows = with_values(pooled_rows(frame))
    name, _ = _pick(rows, estimates)
    if not name:
        return "", pl.DataFrame()
    rows = _with_axis(rows, axis, "_x").filter(pl.col("_x").is_not_null())
    return name, _bounds(_with_curves(rows, axis), name, ["_curve", "_x"])


def plot_incidence(
    frame: pl.DataFrame, kind: str = "incidence", min_cell_count: int = 10
) -> Figure:
    """Incidence (or prevalence) per period with its 95% CI band, one line per cohort/stratum."""
    frame = with_values(frame, min_cell_count)
    estimates = INCIDENCE_ESTIMATES if kind == "incidence" else PREVALENCE_ESTIMATES
    name, series = _series(frame, estimates, PERIOD_NAMES)
    if not name or series.is_empty():
        raise NothingToPlot(f"no {kind} estimates per period to draw")
    if series["point"].is_null().all():
        raise NothingToPlot("every cell is below the minimum cell count (suppressed)")
    fig = new_figure(8.0, 4.2)
    ax = fig.add_subplot()
    periods = sorted(series["_x"].unique().to_list(), key=lambda p: (_first_int(p), p))
    position = {p: i for i, p in enumerate(periods)}
    suppressed = series.filter(pl.col("suppressed")).height
    not_estimable = series.filter(pl.col("point").is_null() & ~pl.col("suppressed")).height
    for c, curve in enumerate(sorted(series["_curve"].unique().to_list())):
        line = (
            series.filter(pl.col("_curve") == curve)  # one line per cohort and stratum
            .with_columns(pos=pl.col("_x").replace_strict(position, return_dtype=pl.Int64))
            .sort("pos")
        )
        if line["point"].is_null().all():
            continue
        color = PALETTE[c % len(PALETTE)]
        # a suppressed period is a gap (NaN), never a zero and never bridged
        point = line["point"].fill_null(float("nan"))
        shown = (
            line["point"].is_not_null() & line["lower"].is_not_null() & line["upper"].is_not_null()
        )
        ax.plot(line["pos"], point, marker="o", ms=3.5, color=color, label=curve)
        ax.fill_between(
            line["pos"],
            line["lower"].fill_null(float("nan")),
            line["upper"].fill_null(float("nan")),
            where=shown.to_list(),
            color=color,
            alpha=0.2,
        )
        for row in line.filter(pl.col("suppressed")).iter_rows(named=True):
            ax.annotate(
                row["mark"],
                (row["pos"], 0),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color=color,
            )
    step = max(1, len(periods) // 12)
    ax.set_xticks(
        range(0, len(periods), step), [p[:10] for p in periods[::step]], rotation=45, ha="right"
    )
    ax.set_ylabel(estimate_label(name), fontsize=9)
    clipped = _clip_bands(ax, series)
    if name in ("prevalence", "prevalence_proportion"):
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(f"{kind.capitalize()} over time (95% CI)", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
    notes = []
    if suppressed:
        notes.append(f"{suppressed} period(s) suppressed (counts below threshold) are not drawn.")
    if not_estimable:
        notes.append(f"{not_estimable} period(s) without an estimate (no person-time) are gaps.")
    if clipped:
        notes.append("Wide confidence bands (small person-time) are cut at the top.")
    _note(fig, " ".join(notes))
    fig.tight_layout()
    return fig


def _clip_bands(ax, series: pl.DataFrame) -> bool:
    """Keep the estimates readable: cut bands that reach far above every estimate (0 below)."""
    top_point = series["point"].max() or 0.0
    top_band = series["upper"].max() or 0.0
    if top_point <= 0.0:  # nothing observed: show the bands as they are, or a unit axis
        ax.set_ylim(0, (top_band or 1.0) * 1.05)
        return False
    limit = top_point * 2.0
    ax.set_ylim(0, min(max(top_band, top_point), limit) * 1.05)
    return top_band > limit


def estimate_label(name: str) -> str:
    """Words for an estimate name: ``incidence_1000_pys`` -> "incidence per 1,000 person-years"."""
    match = re.fullmatch(r"incidence_(\d+)_pys", name)
    if match:
        return f"incidence per {int(match.group(1)):,} person-years"
    return name.replace("_", " ")


# --------------------------------------------------------------------------------------------
# Kaplan–Meier
# --------------------------------------------------------------------------------------------


def plot_kaplan_meier(
    frame: pl.DataFrame, risk_table_points: int = 6, min_cell_count: int = 10
) -> Figure:
    """Kaplan–Meier step curves with 95% CI bands, and the numbers at risk under them."""
    frame = with_values(frame, min_cell_count)
    name, series = _series(frame, SURVIVAL_ESTIMATES, TIME_NAMES)
    if not name or series.is_empty():
        raise NothingToPlot("no survival estimates over time to draw")
    series = series.with_columns(t=pl.col("_x").cast(pl.Float64, strict=False)).drop_nulls("t")
    if series.is_empty():
        raise NothingToPlot("survival estimates have no numeric time")
    if series["point"].is_null().all():
        raise NothingToPlot("every cell is below the minimum cell count (suppressed)")
    risk = _at_risk(frame)
    curves = sorted(series["_curve"].unique().to_list())
    fig = new_figure(8.0, 4.6 + 0.25 * len(curves) if risk is not None else 4.4)
    grid = fig.add_gridspec(2 if risk is not None else 1, 1, height_ratios=_ratios(risk, curves))
    ax = fig.add_subplot(grid[0])
    withheld = series.filter(pl.col("point").is_null() | pl.col("suppressed"))
    stops = []
    for c, curve in enumerate(curves):
        line = series.filter(pl.col("_curve") == curve).sort("t")
        color = PALETTE[c % len(PALETTE)]
        stop = withheld.filter(pl.col("_curve") == curve)["t"].min()
        if stop is not None:  # the product-limit needs every time before: stop at the first gap
            stops.append(stop)
            line = line.filter(pl.col("t") < stop)
            gaps = withheld.filter(pl.col("_curve") == curve)["t"]
            ax.plot(gaps, [0.0] * gaps.len(), "x", color=color, ms=5, clip_on=False)
        ax.step(line["t"], line["point"], where="post", color=color, label=curve, linewidth=1.6)
        band = line.drop_nulls(["lower", "upper"])
        if not band.is_empty():
            ax.fill_between(
                band["t"], band["lower"], band["upper"], step="post", color=color, alpha=0.2
            )
    ax.set_ylim(_survival_floor(series), 1.0)  # the curves start at 1: the axis ends there
    ax.set_ylabel("survival probability", fontsize=9)
    ax.set_title("Kaplan–Meier (95% CI)", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    _style(ax)
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
    if risk is None:
        ax.set_xlabel("days", fontsize=9)
    else:
        _risk_table(fig.add_subplot(grid[1], sharex=ax), risk, curves, risk_table_points)
        ax.tick_params(axis="x", labelbottom=False)
    if stops:
        _note(
            fig,
            f"{withheld.height} time(s) (×) withheld by a node's gate (counts below "
            f"{min_cell_count}): a curve stops at its first one (from day {min(stops):,.0f}), since "
            "later estimates would count no events there; numbers at risk leave out the "
            "withheld entries.",
        )
    fig.tight_layout()
    return fig


def _survival_floor(series: pl.DataFrame) -> float:
    """Bottom of the survival axis: 0, or a round step below the lowest band for rare outcomes
    (a curve ending at 0.94 reads as flat on a 0-1 axis); the ticks say where it starts."""
    low = series.select(pl.min_horizontal("point", "lower").min()).item()
    if low is None or low < 0.5:
        return 0.0
    return math.floor((low - 0.02) * 20) / 20


def _ratios(risk: pl.DataFrame | None, curves: list[str]) -> list[float] | None:
    return None if risk is None else [4.0, 0.45 + 0.3 * len(curves)]


def _at_risk(frame: pl.DataFrame) -> pl.DataFrame | None:
    """``_curve, t, n, mark`` numbers at risk over time, or None when the result has none."""
    rows = with_values(pooled_rows(frame))
    name, rows = _pick(rows, AT_RISK_ESTIMATES)
    if not name:
        return None
    rows = _with_axis(rows, TIME_NAMES, "_x").filter(pl.col("_x").is_not_null())
    rows = _with_curves(rows, TIME_NAMES)
    return (
        rows.with_columns(t=pl.col("_x").cast(pl.Float64, strict=False))
        .drop_nulls("t")
        .select("_curve", "t", n=pl.col("value"), mark="mark")
    )


def risk_ticks(times: list[float], points: int) -> list[float]:
    """About ``points`` times at which the numbers at risk are shown, on the result's time bins:
    a round step (as an axis would choose) made a multiple of the bin width, so every tick is
    the start of a bin and each number shown is one the nodes released for that bin."""
    times = sorted(set(times))
    if len(times) < 2:
        return times
    start, end = times[0], times[-1]
    width = min(b - a for a, b in zip(times, times[1:], strict=False))
    ticks = matplotlib.ticker.MaxNLocator(nbins=points, integer=True).tick_values(start, end)
    step = width * math.ceil((ticks[1] - ticks[0]) / width)
    return [start + i * step for i in range(int((end - start) // step) + 1)]


def _risk_table(ax, risk: pl.DataFrame, curves: list[str], points: int) -> None:
    """Numbers at risk at the times the result reports them (``risk_ticks``)."""
    ticks = risk_ticks(risk["t"].to_list(), points)
    for c, curve in enumerate(curves):
        rows = risk.filter(pl.col("_curve") == curve).sort("t")
        for tick in ticks:
            before = rows.filter(pl.col("t") <= tick)
            text = "" if before.is_empty() else _count_text(before.row(-1, named=True))
            ax.text(tick, c, text, ha="center", va="center", fontsize=8)
    ax.set_yticks(range(len(curves)), [_short(c, 24) for c in curves], fontsize=8)
    ax.set_ylim(len(curves) - 0.5, -0.5)
    ax.set_xticks(ticks, [f"{t:,.0f}" for t in ticks], fontsize=8)
    ax.set_xlabel("days", fontsize=9)
    ax.set_title("number at risk", fontsize=8, loc="left")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="y", length=0)


def _count_text(row: dict) -> str:
    if row["n"] is None:
        return row["mark"] or "–"
    return f"{row['n']:,.0f}"


# --------------------------------------------------------------------------------------------
# GLM forest plot
# --------------------------------------------------------------------------------------------


def glm_ratios(frame: pl.DataFrame) -> tuple[str, pl.DataFrame]:
    """``(ratio name, term, ratio, lower, upper)``: reported ratios, else exp(coef ± 1.96 SE)."""
    rows = with_values(pooled_rows(frame))
    rows = rows.with_columns(
        term=pl.when(pl.col("variable_level").fill_null("").is_in(["", "overall"]))
        .then(pl.col("variable_name"))
        .otherwise(pl.col("variable_name") + ": " + pl.col("variable_level"))
    )
    rows = rows.filter(~pl.col("term").map_elements(_is_intercept, return_dtype=pl.Boolean))
    name, _ = _pick(rows, RATIO_ESTIMATES)
    if name:
        return name, _bounds(rows, name, ["term"]).rename({"point": "ratio"})
    coef, _ = _pick(rows, COEF_ESTIMATES)
    se_name, se = _pick(rows, SE_ESTIMATES)
    if not coef or not se_name:
        return "", pl.DataFrame()
    beta = _bounds(rows, coef, ["term"])
    se = se.select("term", se=pl.col("value")).unique("term", keep="first")
    return "exp(coefficient)", beta.join(se, on="term", how="left").select(
        "term",
        ratio=pl.col("point").exp(),
        lower=pl.coalesce(pl.col("lower"), pl.col("point") - 1.96 * pl.col("se")).exp(),
        upper=pl.coalesce(pl.col("upper"), pl.col("point") + 1.96 * pl.col("se")).exp(),
        suppressed="suppressed",
    )


def _is_intercept(term: str) -> bool:
    return norm(term.split(":")[0]) in INTERCEPT_NAMES


def _log_ticks(ax, low: float, high: float) -> None:
    """Ticks at 1-2-5 steps on a log axis, labelled plainly (0.5, 1, 2), none of 2x10^0."""
    steps = [m * 10.0**e for e in range(-4, 5) for m in (1, 2, 5)]
    ticks = [t for t in steps if low / 1.5 <= t <= high * 1.5] or [1.0]
    ax.set_xlim(min(low, ticks[0]) / 1.15, max(high, ticks[-1]) * 1.15)
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_forest(
    frame: pl.DataFrame, min_cell_count: int = 10, units: dict[str, str] | None = None
) -> Figure:
    """Odds/rate ratios with 95% CI on a log scale, the null line at 1; ``units`` names what one
    unit of a covariate is (``{"age": "per 10 years"}``), as a ratio means nothing without it."""
    units = units or {}
    frame = with_values(frame, min_cell_count)
    name, ratios = glm_ratios(frame)
    if not name or ratios.is_empty():
        raise NothingToPlot("no ratios or coefficients with standard errors to draw")
    shown = ratios.filter(pl.col("ratio").is_not_null() & (pl.col("ratio") > 0)).reverse()
    if shown.is_empty():
        raise NothingToPlot("every coefficient was suppressed")
    fig = new_figure(7.5, 0.4 * shown.height + 1.5)
    ax = fig.add_subplot()
    y = list(range(shown.height))
    lower = shown["lower"].fill_null(shown["ratio"])
    upper = shown["upper"].fill_null(shown["ratio"])
    ax.errorbar(
        shown["ratio"],
        y,
        xerr=[shown["ratio"] - lower, upper - shown["ratio"]],
        fmt="s",
        color=PALETTE[0],
        ecolor="#555555",
        capsize=3,
        ms=5,
    )
    ax.axvline(1.0, color=PALETTE[1], linestyle="--", linewidth=0.9)
    ax.set_xscale("log")
    _log_ticks(ax, min(lower.min(), 1.0), max(upper.max(), 1.0))
    ax.set_ylim(-0.7, shown.height - 0.3)
    labels = [
        f"{_short(f'{t} {units[t]}' if t in units else t, 36)}  {r:.2f} ({lo:.2f}–{hi:.2f})"
        for t, r, lo, hi in zip(shown["term"], shown["ratio"], lower, upper, strict=True)
    ]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(f"{name.replace('_', ' ')} (95% CI, log scale)", fontsize=9)
    title = f"{name.replace('_', ' ').capitalize()}s" if "ratio" in name else "Coefficients"
    ax.set_title(f"{title} (95% CI)", fontsize=10)
    _style(ax)
    hidden = ratios.height - shown.height
    if hidden:
        _note(fig, f"{hidden} term(s) suppressed or not estimable are not drawn.")
    fig.tight_layout()
    return fig


def meta_estimates(frame: pl.DataFrame) -> tuple[str, pl.DataFrame]:
    """``(measure, rows)``: each node's estimate and the fixed/random pooled ones, on the ratio
    scale (``log_`` measures exponentiated), with ``label, point, lower, upper, weight, pooled``."""
    rows = with_values(frame)
    pooled_names = {"fixed_effect", "random_effects"}
    per_node = rows.filter(
        ~norm_expr("cdm_name").is_in(POOLED_CDM_NAMES)
        & ~pl.col("_variable").is_in([*pooled_names, "heterogeneity"])
    )
    if per_node.is_empty():
        return "", pl.DataFrame()
    measure = per_node["_variable"][0]
    scale = (lambda c: c.exp()) if measure.startswith("log_") else (lambda c: c)
    nodes = _bounds(per_node.with_columns(_label=pl.col("cdm_name")), "estimate", ["_label"])
    weights = _pick(per_node, ("weight_random", "weight_fixed"))[1].select(
        "cdm_name", weight=pl.col("value")
    )
    nodes = nodes.join(weights, left_on="_label", right_on="cdm_name", how="left").with_columns(
        pooled=pl.lit(False)
    )
    pooled_rows_ = rows.filter(pl.col("_variable").is_in(pooled_names)).with_columns(
        _label=pl.col("variable_name").str.replace("_", " ")
    )
    pooled = _bounds(pooled_rows_, "estimate", ["_label"]).with_columns(
        weight=pl.lit(None, pl.Float64), pooled=pl.lit(True)
    )
    both = pl.concat([nodes.select(pooled.columns), pooled], how="vertical")
    return measure, both.with_columns(
        scale(pl.col("point")), scale(pl.col("lower")), scale(pl.col("upper"))
    ).rename({"_label": "label"})


def plot_meta_forest(frame: pl.DataFrame, min_cell_count: int = 10) -> Figure:
    """Meta-analysis forest plot: each node's estimate (square sized by weight) with its 95% CI,
    then the fixed-effect and random-effects estimates as diamonds; log scale."""
    frame = with_values(frame, min_cell_count)
    measure, rows = meta_estimates(frame)
    if not measure or rows.filter(pl.col("point").is_not_null()).is_empty():
        raise NothingToPlot("no per-node estimates to draw")
    n = rows.height
    fig = new_figure(7.5, 0.42 * n + 1.7)
    ax = fig.add_subplot()
    drawn = rows.drop_nulls(["point"])
    labels = []
    for i, row in enumerate(rows.iter_rows(named=True)):
        y = n - 1 - i + (0 if row["pooled"] else 0.6)
        point, lower, upper = row["point"], row["lower"], row["upper"]
        if point is None:
            labels.append((y, f"{row['label']}  withheld ({row['mark'] or 'suppressed'})"))
            continue
        labels.append(
            (y, f"{row['label']}  {point:.2f} ({lower or point:.2f}–{upper or point:.2f})")
        )
        if row["pooled"]:
            ax.fill(
                [lower or point, point, upper or point, point],
                [y, y + 0.25, y, y - 0.25],
                color=PALETTE[1],
            )
            continue
        ax.plot([lower or point, upper or point], [y, y], color="#555555", linewidth=1.2)
        size = 20 + 2.5 * (row["weight"] or 10)
        ax.scatter([point], [y], marker="s", s=size, color=PALETTE[0], zorder=3)
    ax.axvline(1.0, color="#999999", linestyle="--", linewidth=0.9)
    ax.set_xscale("log")
    low = min(drawn["lower"].fill_null(drawn["point"]).min(), 1.0)
    high = max(drawn["upper"].fill_null(drawn["point"]).max(), 1.0)
    _log_ticks(ax, low, high)
    ax.set_yticks([y for y, _ in labels], [t for _, t in labels], fontsize=8)
    ax.set_ylim(-0.7, n + 0.3)
    name = measure.removeprefix("log_").replace("_", " ")
    ax.set_xlabel(f"{name} (95% CI, log scale)", fontsize=9)
    ax.set_title(f"Meta-analysis of per-node {name}s", fontsize=10)
    _style(ax)
    _note(fig, _heterogeneity(frame))
    fig.tight_layout()
    return fig


def _heterogeneity(frame: pl.DataFrame) -> str:
    rows = frame.filter(pl.col("_variable") == "heterogeneity")
    values = dict(zip(rows["_estimate"], rows["value"], strict=True))
    if values.get("i_squared") is None:
        return ""
    text = f"Heterogeneity: I² = {values['i_squared']:.0f}%"
    if values.get("tau_squared") is not None:
        text += f", τ² = {values['tau_squared']:.3g}"
    if values.get("q_p_value") is not None:
        text += f", Q test p = {values['q_p_value']:.3g}"
    return text + "."


# --------------------------------------------------------------------------------------------
# Federation: per-node contributions and privacy budget
# --------------------------------------------------------------------------------------------

STATUS_COLORS = {
    "contributed": "#2a9d8f",
    "refused": "#d1495b",
    "timeout": "#edae49",
    "failed": "#8a817c",
    "not asked": "#f2f2f2",
}


def plot_contributions(
    contributions: pl.DataFrame, result_suppressed: dict[str, int] | None = None
) -> Figure:
    """Which node contributed to which analysis; refusals and timeouts in their own colours.

    ``contributions`` has columns ``analysis, node, status`` (a word of ``STATUS_COLORS``; other
    text reads as "failed") and optionally ``suppressed``: cells that node's gate withheld, written
    in its square. ``result_suppressed`` (analysis -> cells withheld in the pooled result) is
    written beside each row.
    """
    if contributions.is_empty():
        raise NothingToPlot("the results do not say which nodes contributed")
    analyses = contributions["analysis"].unique(maintain_order=True).to_list()
    nodes = sorted(contributions["node"].unique().to_list())
    fig = new_figure(1.4 * len(nodes) + 4.4, 0.5 * len(analyses) + 1.6)
    ax = fig.add_subplot()
    cells = {(r["analysis"], r["node"]): r for r in contributions.iter_rows(named=True)}
    for y, analysis in enumerate(analyses):
        for x, node in enumerate(nodes):
            cell = cells.get((analysis, node))
            status = node_status(cell["status"]) if cell else "not asked"
            ax.add_patch(
                matplotlib.patches.Rectangle(
                    (x - 0.45, y - 0.4), 0.9, 0.8, color=STATUS_COLORS[status], linewidth=0
                )
            )
            withheld = (cell or {}).get("suppressed")
            text = status + (f"\n{withheld} cell(s) <N" if withheld else "")
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color=_ink(status))
        if (result_suppressed or {}).get(analysis):
            ax.text(
                len(nodes) - 0.4,
                y,
                f"  result: {result_suppressed[analysis]} cell(s) <N",
                va="center",
                fontsize=8,
                color="#555555",
            )
    ax.set_xlim(-0.6, len(nodes) + 1.2)
    ax.set_ylim(len(analyses) - 0.5, -0.5)
    ax.set_xticks(range(len(nodes)), nodes, fontsize=8, rotation=30, ha="right")
    ax.set_yticks(range(len(analyses)), analyses, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title("Node contributions per analysis", fontsize=10)
    fig.tight_layout()
    return fig


def node_status(text: str | None) -> str:
    """Map a node's status in the results to one of the legend's words (``STATUS_COLORS``)."""
    word = norm(text)
    if word in ("contributed", "ok", "released", "success", "not_asked", "not asked"):
        return word.replace("_", " ") if word.startswith("not") else "contributed"
        return "contributed"
    if "time" in word:
        return "timeout"
    if "refus" in word or "denied" in word:
        return "refused"
    return "failed" if word else "not asked"


def _ink(status: str) -> str:
    return "#333333" if status in ("not asked", "timeout") else "white"


def plot_privacy_budget(budget: pl.DataFrame) -> Figure:
    """Epsilon spent against epsilon permitted per node (a bar inside its allowance).

    ``budget`` has columns ``node, epsilon_spent`` and optionally ``epsilon_permitted``.
    """
    if budget.is_empty() or "epsilon_spent" not in budget.columns:
        raise NothingToPlot("no privacy budget spent is reported (no DP in this study)")
    budget = budget.sort("node")
    if "epsilon_permitted" not in budget.columns:
        budget = budget.with_columns(epsilon_permitted=pl.lit(None, pl.Float64))
    y = list(range(budget.height))
    spent = budget["epsilon_spent"].fill_null(0.0)
    permitted = budget["epsilon_permitted"]
    fig = new_figure(7.5, 0.45 * budget.height + 1.5)
    ax = fig.add_subplot()
    if permitted.is_not_null().any():
        ax.barh(
            y,
            permitted.fill_null(0.0),
            color="white",
            edgecolor="#555555",
            height=0.7,
            label="ε permitted",
        )
    over = [p is not None and s > p for s, p in zip(spent, permitted, strict=True)]
    ax.barh(
        y,
        spent,
        color=[PALETTE[1] if o else PALETTE[0] for o in over],
        height=0.5,
        label="ε spent",
    )
    widest = max(spent.max() or 0.0, permitted.max() or 0.0) or 1.0  # all zero: exact releases
    for i, (s, p) in enumerate(zip(spent, permitted, strict=True)):
        text = f"{s:.3g}" + (f" / {p:.3g}" if p is not None else "")
        ax.text(max(s, p or 0.0) + widest * 0.02, i, text, va="center", fontsize=8)
    ax.set_xlim(0, widest * 1.2)
    ax.set_yticks(y, budget["node"].to_list(), fontsize=8)
    ax.set_ylim(budget.height - 0.5, -0.5)
    ax.set_xlabel("ε (differential privacy budget)", fontsize=9)
    ax.set_title("Privacy budget per node", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    notes = ["Red: more ε spent than permitted."] if any(over) else []
    if (spent.max() or 0.0) == 0.0:
        notes.append("No ε spent: every release was exact (disclosure control, no DP noise).")
    _note(fig, " ".join(notes))
    _style(ax)
    fig.tight_layout()
    return fig
