"""The one format in which a node's ``local`` step hands statistics to the gate and the coordinator.

Every analysis returns a *statistics table*: a long polars DataFrame with the columns in
``STATISTICS_SCHEMA``. One shape for every analysis lets the node's gate apply disclosure control
and differential privacy without knowing what the analysis computes, and lets the transport ship
one Arrow IPC blob.

Columns
- ``cohort``: the study's cohort name the row is about ("" when not about one cohort).
- ``strata_name`` / ``strata_level``: ``"overall"``/``"overall"`` or e.g. ``"sex"``/``"Female"``;
  several strata joined by ``STRATA_SEP`` (`` &&& ``) as in summarised_result.
- ``variable_name`` / ``variable_level``: what is counted or measured (e.g. ``"age_group"``/``"18-64"``,
  ``"score"``/``"2"``, ``"information"``/``"1,2"``).
- ``estimate_name``: e.g. ``"count"``, ``"person_count"``, ``"sum_age"``, ``"n_risk"``, ``"n_event"``.
- ``release_class``: how the gate must treat the value:
  ``"count"`` — a number of persons or records: small-cell suppression, DP noise on counts;
  ``"sum"`` — a sum of per-person values with explicit bounds (``lower``/``upper``): noised as a sum,
  suppressed with the counts of its group;
  ``"value"`` — any other aggregate (GLM score and information, etc.): released only when every
  count of its group is releasable and the analysis's own guards (e.g. regression guards) pass.
- ``value``: float64; NaN marks a value that the gate suppressed.
- ``lower`` / ``upper``: float64 bounds of one *person's* contribution, what differential privacy
  needs (the neighbouring data set adds or removes one person):
  ``"sum"`` rows: the person's total lies in [lower, upper] (clamped in SQL);
  ``"count"`` rows: ``upper`` is the most one person adds to the count. NaN (the default) means a
  count of persons (each at most once, sensitivity 1); a finite ``upper`` k means records capped
  at k per person in SQL; ``inf`` (``studies.analyses.spec_fields.RECORDS_PER_PERSON``) means a count of
  records (cohort entries, events) of which one person may have any number. Exact releases treat
  all counts alike; a DP release noises person counts and capped counts with sensitivity
  ``upper`` and withholds (NaN) rows with an infinite bound, like ``"value"`` rows;
  ``"value"`` rows: NaN.

A *group* is the rows sharing (cohort, strata_name, strata_level, variable_name, variable_level):
when a count in a group is suppressed, every sum and value of that group is suppressed with it.

Keys from the data: a group whose key is a value found in the data (a concept id, a calendar
year) leaves the node only when it passes disclosure control; a withheld one leaves no row at
all, only a marker row per (cohort, strata_name) with ``variable_level`` ``WITHHELD_KEYS``, so
the coordinator knows that node's absent keys there may be withheld ones, never zeros.
"""

from __future__ import annotations

import io

import polars as pl

STATISTICS_SCHEMA: dict[str, pl.DataType] = {
    "cohort": pl.String(),
    "strata_name": pl.String(),
    "strata_level": pl.String(),
    "variable_name": pl.String(),
    "variable_level": pl.String(),
    "estimate_name": pl.String(),
    "release_class": pl.String(),
    "value": pl.Float64(),
    "lower": pl.Float64(),
    "upper": pl.Float64(),
}
RELEASE_CLASSES = frozenset({"count", "sum", "value"})
STRATA_SEP = " &&& "
"""Joins several strata names (and their levels) in one ``strata_name``, as summarised_result does."""
GROUP_KEYS = ["cohort", "strata_name", "strata_level", "variable_name", "variable_level"]
WITHHELD_KEYS = "<withheld keys>"
"""``variable_level`` of the marker row a gate leaves where it withheld rows keyed by data."""


def empty_statistics() -> pl.DataFrame:
    """A statistics table with no rows, for analyses that find nothing to report."""
    return pl.DataFrame(schema=STATISTICS_SCHEMA)


def make_statistics(frame: pl.DataFrame) -> pl.DataFrame:
    """Fill defaults, cast and order columns, and check ``release_class``: the constructor every analysis uses.

    Missing ``strata_*`` default to ``"overall"``, missing text columns to ``""``, and missing
    (or null) bounds to NaN, so analyses write only the columns that carry meaning for them.
    """
    defaults = {
        "cohort": pl.lit(""),
        "strata_name": pl.lit("overall"),
        "strata_level": pl.lit("overall"),
        "variable_name": pl.lit(""),
        "variable_level": pl.lit(""),
        "lower": pl.lit(float("nan")),
        "upper": pl.lit(float("nan")),
    }
    missing = [expr.alias(name) for name, expr in defaults.items() if name not in frame.columns]
    out = (
        frame.with_columns(missing)
        .select([pl.col(name).cast(dtype) for name, dtype in STATISTICS_SCHEMA.items()])
        .with_columns(pl.col("lower", "upper").fill_null(float("nan")))
    )
    validate_statistics(out)
    return out


def check_table(
    frame: pl.DataFrame,
    what: str,
    schema: dict[str, pl.DataType],
    column: str,
    allowed: frozenset[str],
) -> None:
    """Raise ``ValueError`` unless ``frame`` has exactly ``schema`` and every value of ``column``
    is ``allowed``: the shape rule of the tables analyses hand on (this statistics table, and
    ``studies.results``' summarised_result), stated once so both name a problem alike."""
    if dict(frame.schema) != schema:
        raise ValueError(f"{what} has columns {dict(frame.schema)}, expected {schema}")
    bad = set(frame[column].unique().to_list()) - allowed
    if bad:
        raise ValueError(f"{what} has unknown {column}(s) {sorted(bad)}; allowed {sorted(allowed)}")


def validate_statistics(frame: pl.DataFrame) -> None:
    """Raise ``ValueError`` naming the problem when ``frame`` is not a statistics table."""
    check_table(frame, "statistics table", STATISTICS_SCHEMA, "release_class", RELEASE_CLASSES)


def to_ipc(frame: pl.DataFrame) -> bytes:
    """Serialise a statistics table to Arrow IPC bytes for transport: equal tables, equal bytes.

    The bytes are what a node signs, so they must follow from the values alone. Polars' own
    string layout (string views) writes its buffers as they were filled, which depends on how
    a column was built: one 1M-person node gave the same characterization other bytes in
    another process. The oldest compatibility level writes plain offsets and data instead.
    """
    validate_statistics(frame)
    sink = io.BytesIO()
    frame.rechunk().write_ipc(sink, compat_level=pl.CompatLevel.oldest())
    return sink.getvalue()


def from_ipc(blob: bytes) -> pl.DataFrame:
    """Read a statistics table from Arrow IPC bytes and check its shape."""
    frame = pl.read_ipc(io.BytesIO(blob))
    validate_statistics(frame)
    return frame
