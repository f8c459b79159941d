"""Hold-out evaluation of a prediction model from counts per predicted-risk bin.

A node releases, for its hold-out persons, the noisy number with and without the outcome in
each of the study's declared risk bins (``evaluation_edges``); everything here is computed from
those counts alone (post-processing): AUC with ties within a bin counted half and its
Hanley-McNeil interval, Brier score and logistic calibration at each bin's representative risk,
and the per-bin rows the report draws ROC curves and calibration plots from. The metrics are
binned approximations of the person-level ones.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from studies.results import estimates


def mid_risks(spec: Any) -> np.ndarray:
    """Each risk bin's representative risk: the midpoint of its edges on the logit scale (the
    open end bins reach one edge-width beyond their edge)."""
    logit = np.log(np.array(spec.evaluation_edges) / (1 - np.array(spec.evaluation_edges)))
    width = np.diff(logit).mean() if logit.size > 1 else 2.0
    bounds = np.concatenate([[logit[0] - width], logit, [logit[-1] + width]])
    mids = (bounds[:-1] + bounds[1:]) / 2
    return 1 / (1 + np.exp(-mids))


def evaluation_metrics(bins: np.ndarray, spec: Any) -> dict[str, float]:
    """AUC (ties within a bin count half) with Hanley-McNeil's 95 % interval, Brier score and
    logistic calibration (intercept, slope on the logit of the bin's risk) from binned counts."""
    events, others = bins[:, 0], bins[:, 1]
    n1, n0 = float(events.sum()), float(others.sum())
    risk = mid_risks(spec)
    out = {"number_records": n1 + n0, "number_events": n1}
    if n1 <= 0 or n0 <= 0:
        return out | dict.fromkeys(
            ["auc", "auc_lower", "auc_upper", "brier_score", "calibration_intercept",
             "calibration_slope"], math.nan)  # fmt: skip
    below = np.concatenate([[0.0], np.cumsum(others)[:-1]])
    auc = float(np.sum(events * (below + 0.5 * others)) / (n1 * n0))
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)
    half = 1.959963984540054 * math.sqrt(max(var, 0.0))
    brier = float(np.sum(events * (1 - risk) ** 2 + others * risk**2) / (n1 + n0))
    intercept, slope = _calibration(events, others, risk)
    return out | {
        "auc": auc,
        "auc_lower": max(auc - half, 0.0),
        "auc_upper": min(auc + half, 1.0),
        "brier_score": brier,
        "calibration_intercept": intercept,
        "calibration_slope": slope,
    }


def _calibration(events: np.ndarray, others: np.ndarray, risk: np.ndarray) -> tuple[float, float]:
    """Logistic recalibration y ~ a + b logit(risk) on binned counts (Newton-Raphson)."""
    z = np.log(risk / (1 - risk))
    design = np.column_stack([np.ones_like(z), z])
    total = events + others
    beta = np.array([0.0, 1.0])
    for _ in range(50):
        p = 1 / (1 + np.exp(-(design @ beta)))
        score = design.T @ (events - total * p)
        info = (design * (total * p * (1 - p))[:, None]).T @ design
        try:
            step = np.linalg.solve(info, score)
        except np.linalg.LinAlgError:
            return math.nan, math.nan
        beta = beta + step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[0]), float(beta[1])


def calibration_rows(
    bins: np.ndarray, risk: np.ndarray, spec: Any, keys: dict[str, str]
) -> pl.DataFrame:
    """Per risk bin: hold-out persons, events, observed and expected risk (the ROC curve's and
    the calibration plot's points; post-processing of the released noisy counts)."""
    total = bins.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.where(total > 0, bins[:, 0] / total, np.nan)
    calibration = pl.DataFrame(
        {
            "variable_level": bin_levels(spec),
            "number_records": total,
            "number_events": bins[:, 0],
            "observed_risk": observed,
            "expected_risk": risk,
        }
    )
    columns = ["number_records", "number_events", "observed_risk", "expected_risk"]
    return estimates(
        calibration, dict.fromkeys(columns, "numeric"), variable_name="calibration", **keys
    )


def bin_levels(spec: Any) -> list[str]:
    """The risk bins' levels: one more than the edges."""
    return [str(b) for b in range(len(spec.evaluation_edges) + 1)]
