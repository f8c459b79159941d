"""Regression figures: the GLM/Cox forest plot and the meta-analysis forest plot."""

from __future__ import annotations

import matplotlib.patches
import matplotlib.ticker
import polars as pl
from matplotlib.figure import Figure

from .characterization import _short
from .figure import _note, _style, new_figure
from .reading import (
    COEF_ESTIMATES,
    INTERCEPT_NAMES,
    PALETTE,
    POOLED_CDM_NAMES,
    RATIO_ESTIMATES,
    SE_ESTIMATES,
    NothingToPlot,
    _bounds,
    _pick,
    norm,
    norm_expr,
    pooled_rows,
    with_values,
)


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
