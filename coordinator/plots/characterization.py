"""Characterization figures: age/sex pyramid, demographics, top covariates, standardised
differences.
"""

from __future__ import annotations

import re

import matplotlib.patches
import matplotlib.ticker
import polars as pl
from matplotlib.figure import Figure

from .figure import _note, _style, new_figure
from .reading import (
    AGE_GROUP_NAMES,
    NOT_COVARIATES,
    PALETTE,
    PROPORTION_ESTIMATES,
    SEP,
    SUPPRESSED_COLOR,
    NothingToPlot,
    _first_int,
    _pick,
    norm,
    pooled_rows,
    split_pairs,
    threshold_of,
    with_values,
)


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
