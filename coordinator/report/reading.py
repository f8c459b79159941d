"""Reading a results folder: the summarised_result, its settings, the node lists in them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl

from coordinator import plots
from privacy.defaults import DEFAULT_MIN_CELL_COUNT
from studies.results import RESULT_COLUMNS as SUMMARISED_RESULT_COLUMNS

#: The 13 summarised_result columns, read as text (the report never needs their types).
RESULT_COLUMNS = list(SUMMARISED_RESULT_COLUMNS)

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
