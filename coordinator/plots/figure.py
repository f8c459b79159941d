"""A figure's canvas and its saving: one size, one style, PNG bytes for the report."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .reading import DPI

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
