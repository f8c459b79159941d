"""Plots of a summarised_result, one function per picture, each taking a polars frame.

One module per figure family (``characterization``, ``survival``, ``regression``,
``federation``) over the shared readers (``reading``) and canvas (``figure``); this package
re-exports what the report and notebooks call.

Every ``plot_*`` function takes rows of a DARWIN EU summarised_result (the 13 columns, values as
text) and returns a matplotlib ``Figure``; when the rows hold nothing it can draw it raises
``NothingToPlot`` with a sentence for the reader, so a report can say why a picture is missing
instead of failing. Of fedomop, only the summarised_result's column names are imported
(``studies.results``, which needs polars alone); else only matplotlib and polars: tests and
notebooks call these directly.

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

import matplotlib

matplotlib.use("Agg")  # before any family module imports pyplot: no display needed

from .characterization import (  # noqa: E402
    age_label,
    plot_age_sex_pyramid,
    plot_demographics,
    plot_smd,
    plot_top_covariates,
    standardised_differences,
)
from .federation import (  # noqa: E402
    STATUS_COLORS,
    node_status,
    plot_contributions,
    plot_privacy_budget,
)
from .figure import (  # noqa: E402
    figure_png,
    new_figure,
    save_png,
)
from .reading import (  # noqa: E402
    AGE_GROUP_NAMES,
    AT_RISK_ESTIMATES,
    COEF_ESTIMATES,
    COUNT_ESTIMATES,
    DPI,
    EVENT_ESTIMATES,
    INCIDENCE_ESTIMATES,
    INTERCEPT_NAMES,
    NOT_COVARIATES,
    PALETTE,
    PARTIAL_POOL_ESTIMATES,
    PERIOD_NAMES,
    POOLED_CDM_NAMES,
    PREVALENCE_ESTIMATES,
    PROPORTION_ESTIMATES,
    RATIO_ESTIMATES,
    ROW_GROUP,
    SE_ESTIMATES,
    SEP,
    SUPPRESSED_COLOR,
    SURVIVAL_ESTIMATES,
    TIME_NAMES,
    WITHHELD_MARK,
    NothingToPlot,
    norm,
    norm_expr,
    pooled_rows,
    split_pairs,
    threshold_of,
    with_values,
)
from .regression import (  # noqa: E402
    glm_ratios,
    meta_estimates,
    plot_forest,
    plot_meta_forest,
)
from .survival import (  # noqa: E402
    _at_risk,
    estimate_label,
    plot_incidence,
    plot_kaplan_meier,
    risk_ticks,
)

__all__ = [
    "AGE_GROUP_NAMES",
    "AT_RISK_ESTIMATES",
    "COEF_ESTIMATES",
    "COUNT_ESTIMATES",
    "DPI",
    "EVENT_ESTIMATES",
    "INCIDENCE_ESTIMATES",
    "INTERCEPT_NAMES",
    "NOT_COVARIATES",
    "NothingToPlot",
    "PALETTE",
    "PARTIAL_POOL_ESTIMATES",
    "PERIOD_NAMES",
    "POOLED_CDM_NAMES",
    "PREVALENCE_ESTIMATES",
    "PROPORTION_ESTIMATES",
    "RATIO_ESTIMATES",
    "ROW_GROUP",
    "SEP",
    "SE_ESTIMATES",
    "STATUS_COLORS",
    "SUPPRESSED_COLOR",
    "SURVIVAL_ESTIMATES",
    "TIME_NAMES",
    "WITHHELD_MARK",
    "_at_risk",
    "age_label",
    "estimate_label",
    "figure_png",
    "glm_ratios",
    "meta_estimates",
    "new_figure",
    "node_status",
    "norm",
    "norm_expr",
    "plot_age_sex_pyramid",
    "plot_contributions",
    "plot_demographics",
    "plot_forest",
    "plot_incidence",
    "plot_kaplan_meier",
    "plot_meta_forest",
    "plot_privacy_budget",
    "plot_smd",
    "plot_top_covariates",
    "pooled_rows",
    "risk_ticks",
    "save_png",
    "split_pairs",
    "standardised_differences",
    "threshold_of",
    "with_values",
]
