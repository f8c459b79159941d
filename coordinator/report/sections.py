"""One report section per analysis: its kind, its plots (by kind), its estimates table, and
the study summary at the top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import polars as pl

from coordinator import plots
from coordinator.report.federation import CONTRIBUTOR_COLUMNS, _analysis_name, _result_ids
from coordinator.report.reading import kind_of, min_cell_count_of, split_nodes
from coordinator.report.tables import Figure, _slug, draw, estimates_table
from privacy.defaults import DEFAULT_MIN_CELL_COUNT

PLOTS: dict[str, list[tuple[str, Callable[..., object]]]] = {
    "Counts": [
        ("age_sex_pyramid", plots.plot_age_sex_pyramid),
        ("demographics", plots.plot_demographics),
    ],
    "Characterization": [
        ("age_sex_pyramid", plots.plot_age_sex_pyramid),
        ("demographics", plots.plot_demographics),
        ("top_covariates", plots.plot_top_covariates),
        ("smd", plots.plot_smd),
    ],
    "Incidence": [("incidence", partial(plots.plot_incidence, kind="incidence"))],
    "Prevalence": [("prevalence", partial(plots.plot_incidence, kind="prevalence"))],
    "Survival": [("kaplan_meier", plots.plot_kaplan_meier)],
    "Regression": [("forest", plots.plot_forest)],
    "Meta-analysis": [("forest", plots.plot_meta_forest)],
}
SPLIT_BY_STRATA = {"kaplan_meier", "incidence", "prevalence"}
#: What each plot draws, for its caption (and nothing it does not draw).
CAPTIONS = {
    "age_sex_pyramid": "persons per age group, men to the left and women to the right, per cohort",
    "demographics": "persons by sex and by age group, per cohort",
    "top_covariates": "share of each cohort's persons with its most frequent covariates",
    "smd": "standardised mean difference of each covariate between the two cohorts",
    "incidence": "incidence per 1,000 person-years with its 95% confidence interval",
    "prevalence": "prevalence with its 95% confidence interval",
    "kaplan_meier": "Kaplan–Meier survival with 95% confidence bands and the numbers at risk",
    "forest": "estimates with 95% confidence intervals on a log scale",
}
# Drawn only when the data allow, without a note otherwise: (kind, plot name).
OPTIONAL_PLOTS = {
    ("Characterization", "smd"),
    ("Characterization", "age_sex_pyramid"),
    ("Counts", "age_sex_pyramid"),
    ("Counts", "demographics"),
}
# A plot drawn only when the one it stands in for was not (marginals when nothing is crossed).
STANDS_IN_FOR = {"demographics": "age_sex_pyramid"}


@dataclass
class Section:
    """One analysis (one ``result_id``) in the report."""

    anchor: str
    title: str
    kind: str
    meta: dict[str, str]
    figures: list[Figure] = field(default_factory=list)
    table: str = ""


def analysis_sections(
    results: pl.DataFrame, settings: dict[str, dict[str, str]], plots_dir: Path
) -> list[Section]:
    """One section per result_id: its plots (by kind) and its main table."""
    sections = []
    for result_id in _result_ids(results, settings):
        setting = settings.get(result_id, {})
        everything = results.filter(pl.col("result_id") == result_id)
        rows = everything.filter(~pl.col("estimate_name").is_in(PARTIAL_POOL_ESTIMATES))
        kind = kind_of(setting, rows)
        name = _analysis_name(result_id, setting)
        slug = _slug(name)
        section = Section(
            anchor=f"a-{slug}",
            title=name,
            kind=kind,
            meta=_section_meta(result_id, setting, kind) | _partial_pools(everything),
        )
        mcc = min_cell_count_of(setting)
        units = {"units": _covariate_units(setting)} if kind == "Regression" else {}
        for plot_name, plot in PLOTS.get(kind, []):
            stood_in = STANDS_IN_FOR.get(plot_name)
            if stood_in and any(f.png and f.name.endswith(stood_in) for f in section.figures):
                continue
            figures = [
                draw(
                    "_".join(filter(None, (slug, plot_name, _slug(suffix) if suffix else ""))),
                    f"{name}: {CAPTIONS.get(plot_name, plot_name.replace('_', ' '))} {suffix}".rstrip(),
                    partial(plot, subset, min_cell_count=mcc, **units),
                    plots_dir,
                )
                for suffix, subset in _plot_subsets(everything, plot_name)  # flags mark withheld
            ]
            drawn = [f for f in figures if f.png is not None]
            if drawn or (kind, plot_name) in OPTIONAL_PLOTS:
                section.figures += drawn  # strata without an axis to draw are no loss
            else:
                section.figures.append(figures[0])
        section.table = estimates_table(_table_rows(rows), mcc, by_variable=kind == "Counts")
        sections.append(section)
    return sections


#: Estimates flagging a pooled value that leaves out nodes whose gate withheld part of its group
#: (``studies.analyses.pooling.partial_pool_rows``; GLM/Cox/meta name them in their model rows).
PARTIAL_POOL_ESTIMATES = plots.PARTIAL_POOL_ESTIMATES


def _covariate_units(setting: dict[str, str]) -> dict[str, str]:
    """Term -> its unit (``{"age": "per 10 years"}``) from the settings' ``covariate_units``
    (``studies.runner.covariate_units``), for the forest plot's labels."""
    pairs = (part.partition(":") for part in (setting.get("covariate_units") or "").split(";"))
    return {term.strip(): unit.split(",")[0].strip() for term, _, unit in pairs if unit.strip()}


def _partial_pools(rows: pl.DataFrame) -> dict[str, str]:
    """``{"partial pools": ...}`` when some pooled estimates are withheld because a node's gate
    withheld part of them (a pool is complete or not shown)."""
    withheld = rows.filter(pl.col("estimate_name") == "nodes_withheld")["estimate_value"]
    nodes = sorted({n for text in withheld.to_list() for n in (text or "").split(";") if n})
    if not nodes:
        return {}
    return {
        "partial pools": f"{withheld.len()} estimate group(s) withheld: not pooled without "
        f"{', '.join(nodes)} (their gate withheld part of the group)"
    }


def _plot_subsets(rows: pl.DataFrame, plot_name: str) -> list[tuple[str, pl.DataFrame]]:
    """Curves drawn once per strata name (overall, by sex, ...), so no plot holds a tangle."""
    if plot_name not in SPLIT_BY_STRATA or rows["strata_name"].n_unique() < 2:
        return [("", rows)]
    return [
        ("" if strata == "overall" else f"by {strata.replace(plots.SEP, ' and ')}", part)
        for (strata,), part in rows.group_by("strata_name", maintain_order=True)
    ]


def _table_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """The rows of an analysis's main table: curve points over time are left to the plot."""
    summary = rows.filter(pl.col("additional_name") != "time")
    return summary if summary.height else rows


def _section_meta(result_id: str, setting: dict[str, str], kind: str) -> dict[str, str]:
    """The analysis's own settings in words; study-wide ones are in the summary."""
    shown = {"result id": result_id, "kind": setting.get("result_type", kind)}
    contributors = next((setting[c] for c in CONTRIBUTOR_COLUMNS if setting.get(c)), "")
    if contributors:
        shown["nodes"] = ", ".join(n for n, _ in split_nodes(contributors))
    skip = {"result_id", "result_type", "analysis_id", "study_hash", "study_name", "permit_id"}
    skip |= {"package_name", "package_version", *CONTRIBUTOR_COLUMNS}
    shown |= {k.replace("_", " "): v for k, v in setting.items() if k not in skip}
    return shown


def study_summary(
    results: pl.DataFrame, settings: dict[str, dict[str, str]], records: pl.DataFrame
) -> list[tuple[str, str]]:
    """Study name, hash, permit, nodes, minimum cell count, package — from the settings, and
    the nodes from the node records."""

    def values(*columns: str) -> str:
        found = [s[c] for s in settings.values() for c in columns if s.get(c)]
        return ", ".join(dict.fromkeys(found)) or "not stated"

    nodes = set(records["node"].to_list())
    package = " ".join(
        x for x in (values("package_name"), values("package_version")) if x != "not stated"
    )
    return [
        ("study", values("study_name", "study_id")),
        ("study hash", values("study_hash")),
        ("permit id", values("permit_id")),
        ("nodes", ", ".join(sorted(nodes)) or "not stated"),
        (
            "minimum cell count",
            values("min_cell_count") if settings else str(DEFAULT_MIN_CELL_COUNT),
        ),
        ("package", package or "not stated"),
        ("analyses", str(len(_result_ids(results, settings)))),
    ]
