"""Curves over time: incidence and prevalence by period, Kaplan–Meier with its risk table."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import matplotlib.patches
import matplotlib.ticker
import polars as pl
from matplotlib.figure import Figure

from .characterization import _short
from .figure import _note, _style, new_figure
from .reading import (
    AT_RISK_ESTIMATES,
    INCIDENCE_ESTIMATES,
    PALETTE,
    PERIOD_NAMES,
    PREVALENCE_ESTIMATES,
    SURVIVAL_ESTIMATES,
    TIME_NAMES,
    NothingToPlot,
    _bounds,
    _first_int,
    _pick,
    _with_axis,
    _with_curves,
    pooled_rows,
    with_values,
)


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
