"""The study report: one self-contained HTML page and PNG plots from a results folder.

``write_report(results_dir)`` reads ``results.csv`` and ``settings.csv`` (DARWIN EU
summarised_result and its settings table) and writes ``report.html`` (CSS inline, plots embedded
as base64 PNG, so it opens offline and can be mailed as one file) and ``plots/*.png``.

A report is for a reader, so it never fails on the data it is given: a plot whose rows are
missing or suppressed is skipped with a note, and a folder with any subset of analysis kinds
renders. Suppressed cells are shown as ``<N`` (never as 0).

What it reads besides the summarised_result (every part optional):
- settings (one row per ``result_id``): ``result_type`` (the analysis kind, which picks the
  plots), ``analysis_id`` (names the section), ``study_name``, ``study_hash``, ``permit_id``,
  ``package_name``, ``package_version``, ``min_cell_count``; node lists ``nodes_contributing``
  / ``cdm_names`` and ``nodes_missing`` (``node (status)`` or ``node: reason`` separated by
  ``;``), or ``nodes_<status>`` columns; ``epsilon_spent`` and ``epsilon_permitted`` as a
  number, ``node=value; ...`` or a JSON object.
- ``federation.json`` (the coordinator's record: per node and analysis its status, reason and
  the gate's reply settings ``suppressed_cells``, ``rho_charged``, ``epsilon_charged``,
  ``delta``), else ``nodes.csv``: who contributed, what each gate suppressed and charged. The
  privacy spend per node composes the gates' rho charges (zCDP) and converts once to epsilon.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib import resources
from pathlib import Path
from string import Template

import polars as pl

from coordinator import plots, training_plots
from privacy.defaults import DEFAULT_MIN_CELL_COUNT
from studies.results import RESULT_COLUMNS as SUMMARISED_RESULT_COLUMNS

#: The 13 summarised_result columns, read as text (the report never needs their types).
RESULT_COLUMNS = list(SUMMARISED_RESULT_COLUMNS)
MAX_TABLE_ROWS = 100

# Kind keyword (matched inside the settings' result_type) -> section title and plots to draw.
KINDS: list[tuple[str, str]] = [
    ("count", "Counts"),
    ("character", "Characterization"),
    ("incidence", "Incidence"),
    ("prevalence", "Prevalence"),
    ("surviv", "Survival"),
    ("glm", "Regression"),
    ("cox", "Regression"),
    ("regression", "Regression"),
    ("meta", "Meta-analysis"),
]
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
# A federated prediction model (dp_sgd): its figures live in coordinator.training_plots.
KINDS.append(("dp_sgd", "Prediction model"))
PLOTS["Prediction model"] = training_plots.PLOTS
CAPTIONS |= training_plots.CAPTIONS
OPTIONAL_PLOTS |= {("Prediction model", name) for name in training_plots.OPTIONAL}


@dataclass
class Figure:
    """One plot in the report: its PNG file and a caption, or the reason it was skipped."""

    name: str
    caption: str
    png: bytes | None = None
    note: str = ""


@dataclass
class Section:
    """One analysis (one ``result_id``) in the report."""

    anchor: str
    title: str
    kind: str
    meta: dict[str, str]
    figures: list[Figure] = field(default_factory=list)
    table: str = ""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_summarised(results_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(results, settings)`` as text columns; a missing settings file gives an empty table."""
    results_path = results_dir / "results.csv"
    if not results_path.is_file():
        raise FileNotFoundError(f"no results.csv in {results_dir}: not a study results folder")
    results = pl.read_csv(results_path, infer_schema=False)
    missing = [c for c in RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise ValueError(f"{results_path} is not a summarised_result: columns {missing} missing")
    results = results.with_columns(pl.col(RESULT_COLUMNS).fill_null(""))
    settings_path = results_dir / "settings.csv"
    settings = (
        pl.read_csv(settings_path, infer_schema=False)
        if settings_path.is_file()
        else pl.DataFrame(schema={"result_id": pl.String})
    )
    return results, settings


def settings_by_result(settings: pl.DataFrame) -> dict[str, dict[str, str]]:
    """Settings row of each result_id, without empty values."""
    if "result_id" not in settings.columns:
        return {}
    return {
        str(row["result_id"]): {k: v for k, v in row.items() if v not in (None, "", "NA")}
        for row in settings.iter_rows(named=True)
    }


def kind_of(setting: dict[str, str], rows: pl.DataFrame) -> str:
    """The section kind of one result: from its settings, else guessed from its estimates."""
    declared = " ".join(setting.get(k, "") for k in ("result_type", "kind", "analysis_kind"))
    for keyword, kind in KINDS:
        if keyword in declared.lower():
            return kind
    estimates = {plots.norm(e) for e in rows["estimate_name"].unique().to_list()}
    guesses = [
        ("Survival", plots.SURVIVAL_ESTIMATES[1:] + plots.AT_RISK_ESTIMATES),
        ("Incidence", plots.INCIDENCE_ESTIMATES),
        ("Prevalence", plots.PREVALENCE_ESTIMATES),
        ("Regression", plots.RATIO_ESTIMATES + plots.SE_ESTIMATES),
        ("Characterization", plots.PROPORTION_ESTIMATES),
    ]
    for kind, names in guesses:
        if estimates & set(names):
            return kind
    return "Counts" if estimates <= {"count", "person_count", "record_count"} else "Other"


def min_cell_count_of(setting: dict[str, str]) -> int:
    """The result's minimum cell count (the design's default 10 when not stated)."""
    try:
        return int(float(setting.get("min_cell_count", DEFAULT_MIN_CELL_COUNT)))
    except ValueError:
        return DEFAULT_MIN_CELL_COUNT


def split_nodes(text: str | None) -> list[tuple[str, str]]:
    """Node lists in settings: ``"a; b (timeout); c: budget exhausted"`` ->
    ``[("a", ""), ("b", "timeout"), ("c", "budget exhausted")]``."""
    items = [item.strip() for item in re.split(r"[;\n]", text or "") if item.strip()]
    out = []
    for item in items:
        match = re.fullmatch(r"([^:(]+?)\s*(?:\((.*)\)|:\s*(.*))?", item)
        name, reason = (
            (match.group(1), match.group(2) or match.group(3) or "") if match else (item, "")
        )
        out.append((name.strip(), reason.strip()))
    return out


def per_node_numbers(text: str | None) -> dict[str, float] | float | None:
    """An epsilon cell: a number (same for every node), ``a=0.5; b=1`` or a JSON object."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            return {str(k): float(v) for k, v in parsed.items()}
    except (ValueError, TypeError):
        pass
    pairs = [p.split("=", 1) for p in re.split(r"[;,]", text) if "=" in p]
    try:
        return {k.strip(): float(v) for k, v in pairs} or None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Federation: who contributed, what their gates suppressed and charged
# --------------------------------------------------------------------------------------------

NODE_RECORD_SCHEMA = {
    "analysis": pl.String,
    "node": pl.String,
    "status": pl.String,
    "reason": pl.String,
    "suppressed": pl.Int64,
    "rho": pl.Float64,
    "epsilon": pl.Float64,
    "delta": pl.Float64,
}
#: Settings columns that list the nodes whose statistics went into a result.
CONTRIBUTOR_COLUMNS = ("nodes_contributing", "nodes_contributed", "cdm_names")


def node_records(
    results_dir: Path, results: pl.DataFrame, settings: dict[str, dict[str, str]]
) -> pl.DataFrame:
    """One row per node and analysis: status, reason and what the node's gate reported.

    The coordinator's own record (``federation.json``, else ``nodes.csv``) is preferred; a
    results folder without one (an in-process run) falls back to the settings' node lists.
    """
    records = (
        _federation_records(results_dir / "federation.json")
        or _nodes_csv_records(results_dir / "nodes.csv")
        or _settings_records(results, settings)
    )
    return pl.DataFrame(records, schema=NODE_RECORD_SCHEMA, orient="row")


def _node_row(analysis: str, node: str, status: str, reason: str, gate: dict) -> dict:
    return {
        "analysis": analysis,
        "node": node,
        "status": plots.node_status(status),
        "reason": reason or "",
        "suppressed": _int(gate.get("suppressed_cells")),
        "rho": _number(gate.get("rho_charged")),
        "epsilon": _number(gate.get("epsilon_charged")),
        "delta": _number(gate.get("delta")),
    }


def _federation_records(path: Path) -> list[dict]:
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return []
    return [
        _node_row(
            str(r.get("analysis_id", "")),
            str(r.get("node", "")),
            str(r.get("status", "")),
            str(r.get("reason", "")),
            r.get("settings") or {},
        )
        for r in doc.get("nodes", [])
        if isinstance(r, dict)
    ]


def _nodes_csv_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    table = pl.read_csv(path, infer_schema=False)
    if not {"analysis_id", "node", "status"} <= set(table.columns):
        return []
    return [
        _node_row(r["analysis_id"], r["node"], r["status"], r.get("reason") or "", r)
        for r in table.iter_rows(named=True)
    ]


def _settings_records(results: pl.DataFrame, settings: dict[str, dict[str, str]]) -> list[dict]:
    rows = []
    for result_id in _result_ids(results, settings):
        setting = settings.get(result_id, {})
        statuses: dict[str, tuple[str, str]] = {}
        for column, value in setting.items():
            if column.startswith("nodes_") and column not in CONTRIBUTOR_COLUMNS:
                status = column.removeprefix("nodes_")
                for node, reason in split_nodes(value):
                    statuses[node] = (reason if status == "missing" else status, reason)
        for column in CONTRIBUTOR_COLUMNS:
            for node, _ in split_nodes(setting.get(column)):
                statuses.setdefault(node, ("contributed", ""))
        cdm_names = results.filter(pl.col("result_id") == result_id)["cdm_name"].unique()
        for node in cdm_names.to_list():
            if plots.norm(node) not in _POOLED and cdm_names.len() > 1:
                statuses.setdefault(node, ("contributed", ""))
        for node, _ in split_nodes(setting.get("nodes")):
            statuses.setdefault(node, ("no answer", ""))
        analysis = _analysis_name(result_id, setting)
        rows += [_node_row(analysis, n, st, why, {}) for n, (st, why) in statuses.items()]
    return rows


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number == number else None


def _int(value: object) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


_POOLED = set(plots.POOLED_CDM_NAMES)


def privacy_budget(records: pl.DataFrame, settings: dict[str, dict[str, str]]) -> pl.DataFrame:
    """``node, epsilon_spent, epsilon_permitted`` for the whole study, per node.

    With the gates' zCDP charges (rho) the spend is composed as zCDP does, by adding rho, then
    converted to (epsilon, delta) once; with epsilons only, they are added (basic composition,
    an upper bound). Settings' ``epsilon_spent`` is the fallback (a number per analysis counts
    for each contributing node). ``epsilon_permitted`` (or ``permit_epsilon``) is the permit's
    budget per node.
    """
    spent = _spent_from_records(records) or _spent_from_settings(records, settings)
    contributors = records.filter(pl.col("status") == "contributed")["node"].unique().to_list()
    permitted: dict[str, float] = {}
    for setting in settings.values():
        for column in ("epsilon_permitted", "permit_epsilon", "epsilon_budget"):
            numbers = per_node_numbers(setting.get(column))
            if isinstance(numbers, float):
                numbers = dict.fromkeys(contributors or list(spent), numbers)
            for node, number in (numbers or {}).items():
                permitted[node] = max(permitted.get(node, 0.0), number)
    nodes = sorted(set(spent) | set(permitted))
    return pl.DataFrame(
        {
            "node": nodes,
            "epsilon_spent": [spent.get(n) for n in nodes],
            "epsilon_permitted": [permitted.get(n) for n in nodes],
        },
        schema={"node": pl.String, "epsilon_spent": pl.Float64, "epsilon_permitted": pl.Float64},
    )


def _spent_from_records(records: pl.DataFrame) -> dict[str, float]:
    charged = records.filter(pl.col("status") == "contributed")
    by_rho = (
        charged.drop_nulls("rho")
        .group_by("node")
        .agg(pl.col("rho").sum(), pl.col("delta").max().fill_null(1e-6))
    )
    if by_rho.height:
        return {r["node"]: _epsilon(r["rho"], r["delta"]) for r in by_rho.iter_rows(named=True)}
    by_epsilon = charged.drop_nulls("epsilon").group_by("node").agg(pl.col("epsilon").sum())
    return dict(by_epsilon.iter_rows())


def _epsilon(rho: float, delta: float) -> float:
    """(epsilon, delta) of a zCDP spend; exact releases (rho 0) skip loading OpenDP."""
    if not math.isfinite(rho):  # a node's figure, shown as it is (accounting refuses it)
        return math.inf if rho > 0 else math.nan
    if rho <= 0.0:
        return 0.0
    from privacy.accounting import rho_to_epsilon

    return rho_to_epsilon(rho, delta)


def _spent_from_settings(
    records: pl.DataFrame, settings: dict[str, dict[str, str]]
) -> dict[str, float]:
    spent: dict[str, float] = {}
    for result_id, setting in settings.items():
        numbers = per_node_numbers(setting.get("epsilon_spent"))
        if isinstance(numbers, float):
            analysis = _analysis_name(result_id, setting)
            nodes = records.filter(
                (pl.col("analysis") == analysis) & (pl.col("status") == "contributed")
            )["node"]
            numbers = dict.fromkeys(nodes.to_list(), numbers)
        for node, number in (numbers or {}).items():
            spent[node] = spent.get(node, 0.0) + number
    return spent


def _result_ids(results: pl.DataFrame, settings: dict[str, dict[str, str]]) -> list[str]:
    """Result ids in the order the study lists them (settings first, then any others)."""
    ids = list(settings)
    ids += [r for r in results["result_id"].unique(maintain_order=True).to_list() if r not in ids]
    return ids


def _analysis_name(result_id: str, setting: dict[str, str]) -> str:
    return setting.get("analysis_id") or setting.get("result_type") or f"result {result_id}"


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def format_estimate(value: str, mark: str | None = None, name: str = "") -> tuple[str, str]:
    """``(text, css class)`` of one cell: suppressed -> its mark (``<10``), numbers tidied,
    p-values as journals print them (``<0.001``)."""
    value = (value or "").strip()
    if mark:
        return mark, "suppressed"
    median = name.startswith("median")  # a survival median (or its CI bound) never reached
    if value.upper() in ("NA", "NAN"):
        return ("not reached" if median else "NA"), "num"
    try:
        number = float(value)
    except ValueError:
        return (value or "–"), ""
    if number != number:  # NaN: not estimable
        return ("not reached" if median else "–"), "num"
    if "p_value" in name:
        return ("<0.001" if number < 0.001 else f"{number:.3f}"), "num"
    if "person_years" in name or "person_days" in name:  # 234,300 person-years, not 234300.17
        return (f"{number:,.0f}" if abs(number) >= 100 else f"{number:,.1f}"), "num"
    if name == "smd" or name.startswith("smd_"):
        return f"{number:.3f}", "num"
    if abs(number) < 1e-12:  # floating-point dust of a zero (a CI bound at 0)
        return "0", "num"
    if number.is_integer() and abs(number) < 1e15:
        return f"{int(number):,}", "num"
    return (f"{number:.4g}" if abs(number) < 1e-2 or abs(number) >= 1e4 else f"{number:.3f}"), "num"


def estimates_table(
    rows: pl.DataFrame, min_cell_count: int, by_variable: bool = False, limit: int = MAX_TABLE_ROWS
) -> str:
    """One analysis's result as HTML tables: a row per variable, a column per estimate.

    Rows that carry different estimates (a survival summary and a log-rank test) go to separate
    tables, so no table is mostly empty. ``by_variable`` makes a column per variable instead
    (counts: "Number records", "Number subjects").
    """
    if rows.is_empty():
        return '<p class="note">This analysis returned no rows.</p>'
    candidates = ["cdm_name", "group_level", "strata_level", "variable_name", "variable_level"]
    if by_variable:
        candidates = candidates[:3]
    if not by_variable and _one_variable_per_estimate(rows):
        candidates = candidates[:3]  # the estimates name their variable (incidence, survival)
    keys = [c for c in candidates if rows[c].n_unique() > 1]
    if rows["additional_level"].n_unique() > 1:
        keys.append("additional_level")
    if not keys:  # one row: label it with the most specific non-empty column
        keys = [
            next((c for c in reversed(candidates) if rows[c].str.len_chars().max()), "cdm_name")
        ]
    column = pl.col("variable_name") if by_variable else pl.col("estimate_name")
    cells = plots.with_values(rows, min_cell_count).with_columns(
        _column=column,
        _cell=pl.struct("estimate_value", "mark", "estimate_name").map_elements(
            lambda c: "\x1f".join(
                format_estimate(c["estimate_value"], c["mark"], c["estimate_name"])
            ),
            return_dtype=pl.String,
        ),
    )
    wide = cells.pivot(on="_column", index=keys, values="_cell", aggregate_function="first")
    if "strata_level" in keys:  # overall first, strata after, each in the analysis's order
        wide = wide.sort(pl.col("strata_level") != "overall", maintain_order=True)
    estimates = [c for c in wide.columns if c not in keys]
    additional = rows.filter(pl.col("additional_name") != "overall")["additional_name"]
    headings = {
        "additional_level": _level(additional[0]).replace("_", " ") if len(additional) else ""
    }
    shape = pl.concat_str([pl.col(c).is_null().cast(pl.String) for c in estimates])
    parts = wide.with_columns(_shape=shape).partition_by("_shape", maintain_order=True)
    return "".join(
        _html_table(
            part, keys, [c for c in estimates if part[c].is_not_null().any()], limit, headings
        )
        for part in parts
    )


def _one_variable_per_estimate(rows: pl.DataFrame) -> bool:
    per_estimate = rows.group_by("estimate_name").agg(
        pl.struct("variable_name", "variable_level").n_unique().alias("n")
    )
    return bool((per_estimate["n"] == 1).all())


def _html_table(
    wide: pl.DataFrame, keys: list[str], estimates: list[str], limit: int, headings: dict
) -> str:
    header = "".join(
        f"<th>{html.escape(headings.get(c) or _heading(c))}</th>" for c in keys + estimates
    )
    body = []
    for row in wide.head(limit).iter_rows(named=True):
        tds = [f"<td>{html.escape(_level(row[k]))}</td>" for k in keys]
        for name in estimates:
            text, css = (row[name] or "–\x1f").split("\x1f")
            tds.append(f'<td class="{css}">{html.escape(text)}</td>')
        body.append(f"<tr>{''.join(tds)}</tr>")
    more = (
        f'<p class="meta">First {limit} of {wide.height} rows; all rows are in results.csv.</p>'
        if wide.height > limit
        else ""
    )
    return (
        f'<div class="scroll"><table><thead><tr>{header}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{more}"
    )


def _heading(column: str) -> str:
    names = {
        "cdm_name": "node",
        "group_level": "cohort",
        "strata_level": "stratum",
        "variable_name": "variable",
        "variable_level": "level",
        "additional_level": "additional",
    }
    return names.get(column, column.replace("_", " "))


def _level(text: str | None) -> str:
    """A group, stratum or level as the plots label it (``Female / 65+``)."""
    return plots.age_label((text or "").replace(plots.SEP, " / "))


def key_value_table(pairs: list[tuple[str, str]], css: str = "summary") -> str:
    """A two-column table of labelled values (study summary, analysis settings)."""
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td{_hash_class(k)}>{html.escape(v)}</td></tr>"
        for k, v in pairs
    )
    return f'<table class="{css}"><tbody>{rows}</tbody></table>'


def _hash_class(label: str) -> str:
    return ' class="hash"' if "hash" in label or "id" in label.split() else ""


def frame_table(frame: pl.DataFrame) -> str:
    """A small polars frame as an HTML table (contributions, budget)."""
    header = "".join(f"<th>{html.escape(_heading(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in frame.iter_rows()
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def draw(name: str, caption: str, plot: Callable[[], object], plots_dir: Path) -> Figure:
    """Draw one plot into ``plots_dir/name.png``; a plot that cannot be drawn becomes a note."""
    try:
        fig = plot()
    except plots.NothingToPlot as reason:
        return Figure(name, caption, note=str(reason))
    except Exception as error:  # noqa: BLE001 - a report must render whatever one plot does
        return Figure(name, caption, note=f"could not draw it ({type(error).__name__}: {error})")
    return Figure(name, caption, png=plots.save_png(fig, plots_dir / f"{name}.png"))


def figure_html(figure: Figure) -> str:
    """An embedded PNG (base64) with caption, or the note saying why it is missing."""
    caption = figure.caption
    if figure.png is None:
        return (
            f'<p class="note">{html.escape(caption)}: not shown — {html.escape(figure.note)}.</p>'
        )
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)} (plots/{html.escape(figure.name)}.png)</figcaption>"
        "</figure>"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "result"


# --------------------------------------------------------------------------------------------
# Sections and page
# --------------------------------------------------------------------------------------------


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
#: (``studies.analyses.common.partial_pool_rows``; GLM/Cox/meta name them in their model rows).
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


def federation_html(
    records: pl.DataFrame,
    results: pl.DataFrame,
    settings: dict[str, dict[str, str]],
    plots_dir: Path,
) -> str:
    """Node contributions (with suppression marks) and the privacy budget spent per node."""
    pooled_suppressed = {
        _analysis_name(rid, settings.get(rid, {})): int(
            plots.with_values(results.filter(pl.col("result_id") == rid))["suppressed"].sum()
        )
        for rid in _result_ids(results, settings)
    }
    contributions = draw(
        "contributions",
        "Node contributions per analysis",
        partial(plots.plot_contributions, records, result_suppressed=pooled_suppressed),
        plots_dir,
    )
    parts = [figure_html(contributions)]
    missing = records.filter(pl.col("status") != "contributed")
    if not missing.is_empty():
        parts.append("<h3>Nodes that did not contribute</h3>")
        parts.append(frame_table(missing.select("analysis", "node", "status", "reason")))
    parts.append(
        '<p class="meta">Cells below the minimum cell count are shown as &lt;N, never as 0; '
        "percentages, means and rates derived from them are withheld with them.</p>"
    )
    suppression = pl.DataFrame(
        {
            "analysis": list(pooled_suppressed),
            "suppressed in the result": list(pooled_suppressed.values()),
        },
        schema={"analysis": pl.String, "suppressed in the result": pl.Int64},
    )
    per_node = records.drop_nulls("suppressed")
    if per_node.height:
        by_node = per_node.sort("node").pivot(
            on="node", index="analysis", values="suppressed", aggregate_function="sum"
        )
        suppression = suppression.join(by_node, on="analysis", how="left")
    parts.append(frame_table(suppression))
    budget = privacy_budget(records, settings)
    parts.append('<h3 id="privacy">Privacy budget</h3>')
    figure = draw(
        "privacy_budget",
        "Privacy budget (ε) spent per node",
        partial(plots.plot_privacy_budget, budget),
        plots_dir,
    )
    parts.append(figure_html(figure))
    if not budget.is_empty():
        parts.append(frame_table(budget))
    return "\n".join(parts)


def render_page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The page from ``(anchor, heading, html)`` sections, with a navigation bar."""
    template = Template(
        resources.files("coordinator").joinpath("templates/report.html").read_text("utf-8")
    )
    nav = "".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h, _ in sections)
    body = "\n".join(
        f'<section id="{a}"><h2>{html.escape(h)}</h2>\n{content}</section>'
        for a, h, content in sections
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return template.substitute(
        title=html.escape(title),
        subtitle=html.escape(subtitle),
        nav=nav,
        body=body,
        footer=f"Generated by fedomop on {generated} from results.csv and settings.csv "
        "(DARWIN EU summarised_result). Aggregates only; no row-level data.",
    )


def write_report(results_dir: Path) -> Path:
    """Write ``results_dir/report.html`` and ``results_dir/plots/*.png``; return the HTML path."""
    results_dir = Path(results_dir)
    results, settings_frame = read_summarised(results_dir)
    settings = settings_by_result(settings_frame)
    plots_dir = results_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    records = node_records(results_dir, results, settings)
    summary = study_summary(results, settings, records)
    sections = [("summary", "Study summary", key_value_table(summary))]
    for section in analysis_sections(results, settings, plots_dir):
        meta = " · ".join(f"{k}: {v}" for k, v in section.meta.items())
        content = [f'<p class="meta">{html.escape(meta)}</p>']
        content += [figure_html(f) for f in section.figures]
        content.append(section.table)
        sections.append((section.anchor, f"{section.title} — {section.kind}", "\n".join(content)))
    sections.append(
        (
            "federation",
            "Nodes, suppression and privacy",
            federation_html(records, results, settings, plots_dir),
        )
    )
    study = summary[0][1]
    path = results_dir / "report.html"
    path.write_text(
        render_page(
            f"Study report: {study}",
            f"study hash {summary[1][1]} · permit {summary[2][1]}",
            sections,
        ),
        encoding="utf-8",
    )
    return path
