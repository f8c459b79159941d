"""Prediction-model figures: the report's pictures of a federated prediction model (``dp_sgd``): ROC curves, calibration,
epsilon spent per node and round, and the loss trace.

Everything is drawn from the analysis's summarised_result alone (``studies.analyses.dpsgd``):
the ROC curves and the calibration plot from its ``calibration`` rows (hold-out persons and
events per predicted-risk bin, pooled and per node: post-processing of the nodes' noisy,
gate-released counts), the AUC in each legend from its ``evaluation`` rows, the epsilon from its
``privacy`` rows (what each node's gate signed after each round), the trace from its ``trace``
rows. The bins are the study's declared ones, so the ROC curve has one point per bin edge: an
honest picture of what was released, not a person-level curve.
"""

from __future__ import annotations

import polars as pl
from matplotlib.figure import Figure

from .figure import new_figure
from .reading import PALETTE, NothingToPlot

POOLED = "federated"


def _numbers(frame: pl.DataFrame, variable: str) -> pl.DataFrame:
    """The rows of ``variable`` with a Float64 ``value`` (null where withheld or missing)."""
    rows = frame.filter(pl.col("variable_name") == variable)
    return rows.with_columns(
        value=pl.col("estimate_value").cast(pl.String).cast(pl.Float64, strict=False)
    )


def _wide(frame: pl.DataFrame, variable: str) -> dict[str, pl.DataFrame]:
    """Per cdm_name (pooled first), one row per ``variable_level`` with one column per
    estimate, ordered by the level read as a number."""
    rows = _numbers(frame, variable)
    if not rows.height:
        return {}
    wide = rows.pivot(
        on="estimate_name", index=["cdm_name", "variable_level"], values="value",
        aggregate_function="first",
    ).sort(pl.col("variable_level").cast(pl.Int64, strict=False))  # fmt: skip
    names = sorted(wide["cdm_name"].unique().to_list(), key=lambda n: (n != POOLED, n))
    return {n: wide.filter(pl.col("cdm_name") == n) for n in names}


def roc_points(bins: pl.DataFrame) -> tuple[list[float], list[float]]:
    """(FPR, TPR) from hold-out persons and events per risk bin, thresholds from the highest
    bin down; ties within a bin are the straight segment between its two points."""
    counts = bins.select(
        total=pl.col("number_records").fill_nan(None).fill_null(0.0),
        events=pl.col("number_events").fill_nan(None).fill_null(0.0),
    ).with_columns(events=pl.col("events").clip(0.0, pl.col("total")))
    counts = counts.with_columns(others=pl.col("total") - pl.col("events")).reverse()
    events, others = counts["events"].sum(), counts["others"].sum()
    if events <= 0 or others <= 0:
        return [], []
    tpr = [0.0, *(counts["events"].cum_sum() / events).to_list()]
    fpr = [0.0, *(counts["others"].cum_sum() / others).to_list()]
    return fpr, tpr


def _auc_label(frame: pl.DataFrame, name: str) -> str:
    rows = _numbers(frame, "evaluation").filter(pl.col("cdm_name") == name)
    value = dict(zip(rows["estimate_name"].to_list(), rows["value"].to_list(), strict=True))
    auc, low, high = (value.get(k) for k in ("auc", "auc_lower", "auc_upper"))
    if auc is None:
        return name
    interval = f", 95% CI {low:.2f}–{high:.2f}" if low is not None and high is not None else ""
    return f"{name} (AUC {auc:.3f}{interval})"


def plot_roc(frame: pl.DataFrame, min_cell_count: int = 10) -> Figure:
    """ROC curves of the hold-out, pooled (bold) and per node, with each AUC and its CI."""
    curves = {n: roc_points(b) for n, b in _wide(frame, "calibration").items()}
    curves = {n: c for n, c in curves.items() if c[0]}
    if not curves:
        raise NothingToPlot("no hold-out counts per risk bin with both outcomes")
    fig = new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        pooled = name == POOLED
        ax.plot(fpr, tpr, marker="o", markersize=3 if pooled else 2,
                linewidth=2.2 if pooled else 1.0, alpha=1.0 if pooled else 0.7,
                color=PALETTE[i % len(PALETTE)], label=_auc_label(frame, name))  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def plot_calibration(frame: pl.DataFrame, min_cell_count: int = 10) -> Figure:
    """Observed against predicted risk per risk bin, pooled (sized by persons) and per node."""
    tables = _wide(frame, "calibration")
    if not tables or POOLED not in tables:
        raise NothingToPlot("no pooled calibration rows")
    fig = new_figure(5.6, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    highest = 0.0
    for i, (name, rows) in enumerate(tables.items()):
        shown = rows.filter(pl.col("observed_risk").is_not_null() & (pl.col("number_records") > 0))
        if not shown.height:
            continue
        expected, observed = shown["expected_risk"].to_numpy(), shown["observed_risk"].to_numpy()
        highest = max(highest, float(expected.max()), float(observed.max()))
        pooled = name == POOLED
        size = 12 + 120 * shown["number_records"].to_numpy() / max(rows["number_records"].max(), 1)
        ax.scatter(expected, observed, s=size if pooled else 10, alpha=0.9 if pooled else 0.5,
                   color=PALETTE[i % len(PALETTE)], label=name, zorder=3 if pooled else 2)  # fmt: skip
        if pooled:
            ax.plot(expected, observed, color=PALETTE[0], linewidth=1)
    top = min(1.0, highest * 1.1 or 1.0)
    ax.plot([0, top], [0, top], color="#999999", linestyle=":", linewidth=1)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="predicted risk (bin)", ylabel="observed risk")
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def plot_epsilon_rounds(frame: pl.DataFrame, min_cell_count: int = 10) -> Figure:
    """Each node's epsilon after each round (its gate's accountant), the last the evaluation."""
    tables = _wide(frame, "privacy")
    if not tables:
        raise NothingToPlot("no epsilon per round (the model did not run through gates)")
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, rows) in enumerate(tables.items()):
        rounds = rows["variable_level"].cast(pl.Int64, strict=False).to_numpy()
        ax.plot(rounds, rows["epsilon"].to_numpy(), marker="o", markersize=3, linewidth=1.2,
                color=PALETTE[i % len(PALETTE)], label=name)  # fmt: skip
    ax.set(xlabel="round (the last is the evaluation)", ylabel="epsilon spent on the node")
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def plot_trace(frame: pl.DataFrame, min_cell_count: int = 10) -> Figure:
    """The loss trace: hold-out Brier score and AUC of each round's incoming weights."""
    tables = _wide(frame, "trace")
    if POOLED not in tables:
        raise NothingToPlot("no loss trace (the study's trace is off)")
    rows = tables[POOLED]
    rounds = rows["variable_level"].cast(pl.Int64, strict=False).to_numpy()
    fig = new_figure(6.0, 3.2)
    left = fig.add_subplot(1, 2, 1)
    left.plot(rounds, rows["brier_score"].to_numpy(), marker="o", color=PALETTE[0])
    left.set(xlabel="round", ylabel="Brier score (hold-out)")
    right = fig.add_subplot(1, 2, 2)
    right.plot(rounds, rows["auc"].to_numpy(), marker="o", color=PALETTE[1])
    right.set(xlabel="round", ylabel="AUC (hold-out)")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig
