"""Federation figures: per-node contributions and the privacy budget each node spent."""

from __future__ import annotations

import matplotlib.patches
import matplotlib.ticker
import polars as pl
from matplotlib.figure import Figure

from .figure import _note, _style, new_figure
from .reading import PALETTE, NothingToPlot, norm

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
