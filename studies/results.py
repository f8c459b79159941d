"""Results in DARWIN EU's ``summarised_result`` form, plus its settings table, on disk.

Every analysis's ``combine`` ends in a ``summarised_result`` (the 13 columns of omopgenerics),
so the coordinator, the report and any DARWIN EU tool read one shape. Name/level pairs hold
several names joined by `` &&& `` (e.g. ``strata_name="sex &&& age_group"``).

- ``result_id``: one per analysis run; ``settings`` holds one row per ``result_id``.
- ``cdm_name``: ``"federated"`` (``POOLED``) for pooled estimates, a node name for per-node rows.
- ``group_*``: the cohort(s) the row is about (``cohort_name``), ``strata_*``: strata,
  ``variable_*``: what is estimated, ``estimate_*``: the estimate, its type and its value as text,
  ``additional_*``: extra keys such as ``time`` on a survival curve.

Estimate names follow omopgenerics/CohortCharacteristics/IncidencePrevalence/CohortSurvival
(``count``, ``percentage``, ``mean``, ``sd``, ``median``, ``estimate_95CI_lower``...); each analysis
module documents the ``variable_name``/``estimate_name`` values it emits.

The settings table has one row per ``result_id`` with ``result_type`` (the analysis kind),
``analysis_id``, ``package_name``, ``package_version``, ``study_hash``, ``permit_id``,
``min_cell_count``, ``epsilon_spent`` and any analysis-specific settings, all as text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from privacy.statistics import STRATA_SEP, check_table

SEP = STRATA_SEP
POOLED = "federated"
RESULT_COLUMNS: dict[str, pl.DataType] = {
    "result_id": pl.Int64(),
    "cdm_name": pl.String(),
    "group_name": pl.String(),
    "group_level": pl.String(),
    "strata_name": pl.String(),
    "strata_level": pl.String(),
    "variable_name": pl.String(),
    "variable_level": pl.String(),
    "estimate_name": pl.String(),
    "estimate_type": pl.String(),
    "estimate_value": pl.String(),
    "additional_name": pl.String(),
    "additional_level": pl.String(),
}
#: The columns that say what a row is about (all but its estimate): the estimates of one row
#: group describe the same thing, so a reader shows them together.
ROW_GROUP = [c for c in RESULT_COLUMNS if not c.startswith("estimate_")]
#: The columns naming one estimate whichever node gave it (``cdm_name``): what a pooled row and
#: its reference are joined on (``group_name`` follows from ``result_id``).
ESTIMATE_KEYS = [
    c
    for c in RESULT_COLUMNS
    if c not in ("cdm_name", "group_name", "estimate_type", "estimate_value")
]
SETTINGS_COLUMNS = [
    "result_id",
    "result_type",
    "analysis_id",
    "package_name",
    "package_version",
    "study_hash",
    "permit_id",
    "min_cell_count",
    "epsilon_spent",
]
ESTIMATE_TYPES = frozenset({"integer", "numeric", "percentage", "character", "logical", "date"})
_DEFAULTS = {
    "result_id": 1,
    "cdm_name": POOLED,
    "group_name": "overall",
    "group_level": "overall",
    "strata_name": "overall",
    "strata_level": "overall",
    "variable_name": "",
    "variable_level": "",
    "estimate_type": "numeric",
    "additional_name": "overall",
    "additional_level": "overall",
}


def format_estimate(value: Any) -> str:
    """Text for ``estimate_value``: integers without a decimal point, floats so they round-trip.

    Missing numbers (a suppressed cell, an undefined ratio) become ``"NA"`` as omopgenerics writes
    them, so a reader can tell "not released" from zero.
    """
    if value is None:
        return "NA"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NA"
        if math.isinf(value):
            return "Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


def summarised_result(frame: pl.DataFrame) -> pl.DataFrame:
    """Build a ``summarised_result`` from a frame holding at least ``estimate_name`` and
    ``estimate_value``; other columns take their defaults (``overall``, ``numeric``, ``POOLED``).

    ``estimate_value`` may be numeric (formatted with ``format_estimate``) or text.
    """
    if "estimate_name" not in frame.columns or "estimate_value" not in frame.columns:
        raise ValueError("summarised_result needs columns estimate_name and estimate_value")
    unknown = set(frame.columns) - set(RESULT_COLUMNS)
    if unknown:
        raise ValueError(f"summarised_result got unknown columns {sorted(unknown)}")
    if frame["estimate_value"].dtype != pl.String:
        frame = frame.with_columns(
            pl.col("estimate_value").map_elements(format_estimate, return_dtype=pl.String)
        )
    missing = [pl.lit(v).alias(k) for k, v in _DEFAULTS.items() if k not in frame.columns]
    out = frame.with_columns(missing).select(
        [pl.col(name).cast(dtype) for name, dtype in RESULT_COLUMNS.items()]
    )
    validate_result(out)
    return out


def estimates(frame: pl.DataFrame, columns: Mapping[str, str], **keys: Any) -> pl.DataFrame:
    """Melt wide numeric estimate columns into summarised_result rows.

    ``columns`` maps a column of ``frame`` to its estimate_type, e.g. ``{"count": "integer",
    "percentage": "percentage"}``; the column name becomes ``estimate_name``. The remaining
    result columns of ``frame`` are kept as keys; ``keys`` adds constant columns.
    """
    key_cols = [c for c in frame.columns if c in RESULT_COLUMNS and c not in columns]
    parts = []
    for name, estimate_type in columns.items():
        if estimate_type not in ESTIMATE_TYPES:
            raise ValueError(f"unknown estimate_type {estimate_type!r} for {name}")
        values = frame[name]
        if estimate_type == "integer":
            text = [format_estimate(None if _missing(v) else int(v)) for v in values.to_list()]
        else:
            text = [format_estimate(v) for v in values.to_list()]
        values_part = pl.DataFrame(
            {
                "estimate_name": [name] * frame.height,
                "estimate_type": [estimate_type] * frame.height,
                "estimate_value": text,
            },
            schema={
                "estimate_name": pl.String,
                "estimate_type": pl.String,
                "estimate_value": pl.String,
            },
        )
        parts.append(frame.select(key_cols).hstack(values_part) if key_cols else values_part)
    if not parts:
        raise ValueError("estimates needs at least one estimate column")
    out = pl.concat(parts, how="vertical").with_columns(
        [pl.lit(v).alias(k) for k, v in keys.items()]
    )
    return summarised_result(out)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def validate_result(frame: pl.DataFrame) -> None:
    """Raise ``ValueError`` naming the problem when ``frame`` is not a summarised_result."""
    check_table(frame, "summarised_result", RESULT_COLUMNS, "estimate_type", ESTIMATE_TYPES)
    for name, level in (
        ("group_name", "group_level"),
        ("strata_name", "strata_level"),
        ("additional_name", "additional_level"),
    ):
        pairs = frame.select(
            (
                pl.col(name).str.count_matches(SEP, literal=True)
                != pl.col(level).str.count_matches(SEP, literal=True)
            ).any()
        ).item()
        if pairs:
            raise ValueError(
                f"summarised_result: {name} and {level} hold different numbers of parts"
            )


def settings_table(rows: list[Mapping[str, Any]]) -> pl.DataFrame:
    """One settings row per ``result_id``; every value is stored as text (``NA`` when missing).

    Known columns come first in ``SETTINGS_COLUMNS`` order; analysis-specific keys follow sorted.
    """
    extra = sorted({k for row in rows for k in row} - set(SETTINGS_COLUMNS))
    columns = SETTINGS_COLUMNS + extra
    data: dict[str, list[Any]] = {c: [] for c in columns}
    for row in rows:
        if "result_id" not in row:
            raise ValueError("every settings row needs a result_id")
        for c in columns:
            data[c].append(int(row[c]) if c == "result_id" else format_estimate(row.get(c)))
    schema = {c: (pl.Int64 if c == "result_id" else pl.String) for c in columns}
    return pl.DataFrame(data, schema=schema)


def bind_results(
    parts: list[tuple[pl.DataFrame, Mapping[str, Any]]],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Stack several analyses' results, numbering ``result_id`` 1..n in order, and their settings.

    Each part is (summarised_result of one analysis, its settings without ``result_id``).
    """
    results, settings = [], []
    for result_id, (result, setting) in enumerate(parts, start=1):
        validate_result(result)
        results.append(result.with_columns(pl.lit(result_id, dtype=pl.Int64).alias("result_id")))
        settings.append({**setting, "result_id": result_id})
    if not results:
        return pl.DataFrame(schema=RESULT_COLUMNS), settings_table([])
    return pl.concat(results, how="vertical"), settings_table(settings)


def write_results(out_dir: Path | str, result: pl.DataFrame, settings: pl.DataFrame) -> Path:
    """Write ``results.csv``, ``settings.csv`` and their ``.parquet`` twins into ``out_dir``.

    Every ``result_id`` in the results must have a settings row, so a reader never meets an
    estimate without knowing which analysis, study and permit produced it.
    """
    validate_result(result)
    missing = set(result["result_id"].unique().to_list()) - set(settings["result_id"].to_list())
    if missing:
        raise ValueError(f"results have result_id(s) {sorted(missing)} without a settings row")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("results", result), ("settings", settings)):
        frame.write_csv(out / f"{name}.csv")
        frame.write_parquet(out / f"{name}.parquet")
    return out


def read_results(out_dir: Path | str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read (results, settings) back from a results folder, preferring the Parquet twins."""
    folder = Path(out_dir)
    frames = []
    for name in ("results", "settings"):
        parquet, csv = folder / f"{name}.parquet", folder / f"{name}.csv"
        if parquet.is_file():
            frames.append(pl.read_parquet(parquet))
        elif csv.is_file():
            frames.append(
                pl.read_csv(csv, infer_schema=False, empty_string_is_null=False).with_columns(
                    pl.col("result_id").cast(pl.Int64)
                )
            )
        else:
            raise FileNotFoundError(f"no {name}.parquet or {name}.csv in {folder}")
    result, settings = frames
    validate_result(result)
    return result, settings
