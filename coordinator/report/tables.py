"""The report's HTML pieces: estimate tables (suppressed cells as ``<N``), key-value tables,
embedded figures.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from coordinator import plots

MAX_TABLE_ROWS = 100


@dataclass
class Figure:
    """One plot in the report: its PNG file and a caption, or the reason it was skipped."""

    name: str
    caption: str
    png: bytes | None = None
    note: str = ""


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
