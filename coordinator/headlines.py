"""One line per analysis that says what it found, for the summary a run prints.

``key_result(kind, result)`` reads the pooled summarised_result of one analysis (as its
``combine`` returned it) and picks the numbers a reader looks at first: cohort sizes for counts
and characterization, the overall rate for incidence, the median and the end of the curve for
Kaplan–Meier, the ratios for a regression. A value a gate withheld stays as the result says it
(``NA``, ``<10``); nothing is recomputed here, so the line and the results file always agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import polars as pl

#: Estimates of a regression's terms, by the ratio each reports (first found wins).
RATIOS = (
    ("odds_ratio", "OR"),
    ("hazard_ratio", "HR"),
    ("rate_ratio", "RR"),
    ("exp_coefficient", "exp(b)"),
    ("coefficient", "b"),
)


def shown_epsilon(rho: float, delta: float) -> float:
    """(epsilon, delta)-DP of a rho-zCDP spend as a figure to show (``privacy.accounting``'s
    ``rho_to_epsilon``): a node's non-finite figure is shown as it is, where the accountant
    would refuse it, and exact releases (rho 0) skip loading OpenDP."""
    if not math.isfinite(rho):
        return math.inf if rho > 0 else math.nan
    if rho <= 0.0:
        return 0.0
    from privacy.accounting import rho_to_epsilon

    return rho_to_epsilon(rho, delta)


def key_result(kind: str, result: pl.DataFrame | None) -> str:
    """The one-line key result of an analysis of ``kind`` (empty when there is none to give)."""
    if result is None or result.is_empty() or "estimate_name" not in result.columns:
        return ""
    line = LINES.get(kind)
    try:
        text = line(_overall(result)) if line else ""
    except (KeyError, ValueError, IndexError):  # a summary line must never fail a study run
        return ""
    partial = result.filter(pl.col("estimate_name") == "nodes_withheld").height
    if text and partial:
        text += f" [{partial} group(s) withheld: a node's gate withheld part of them]"
    return text


def _overall(result: pl.DataFrame) -> pl.DataFrame:
    """Rows of the unstratified result (all of them when it has no strata columns)."""
    if "strata_name" not in result.columns:
        return result
    return result.filter(pl.col("strata_name") == "overall")


def _value(rows: pl.DataFrame, estimate: str) -> str | None:
    values = rows.filter(pl.col("estimate_name") == estimate)["estimate_value"]
    return None if values.is_empty() else str(values[0])


def _number(text: str | None, digits: int = 0) -> str:
    """A result cell for people: ``1234`` -> ``1,234``; NA and suppression marks stay as they are."""
    try:
        number = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return text or "NA"
    if not math.isfinite(number):
        return "NA"
    return f"{number:,.{digits}f}"


def _by_group(rows: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    if "group_level" not in rows.columns:
        return [("", rows)]
    return [(str(key[0]), part) for key, part in rows.group_by("group_level", maintain_order=True)]


def _cohort_sizes(rows: pl.DataFrame) -> str:
    """``celecoxib 1,234 · diclofenac 987``: persons per cohort (records where no persons)."""
    parts = []
    for cohort, part in _by_group(rows):
        part = part.filter(pl.col("variable_name").str.to_lowercase().str.starts_with("number"))
        persons = part.filter(pl.col("variable_name").str.to_lowercase() == "number subjects")
        cell = _value(persons if persons.height else part, "count")
        if cell is not None:
            parts.append(f"{cohort} {_number(cell)}")
    return ("persons: " + " · ".join(parts)) if parts else ""


def _incidence(rows: pl.DataFrame) -> str:
    """``14 events / 726 PY: 19.3 per 1,000 PY (10.5–32.4)`` per denominator/outcome pair."""
    parts = []
    for group, part in _by_group(rows):
        rate = _value(part, "incidence_1000_pys")
        if rate is None:
            continue
        low = _value(part, "incidence_1000_pys_95CI_lower")
        high = _value(part, "incidence_1000_pys_95CI_upper")
        events = _number(_value(part, "outcome_count"))
        years = _number(_value(part, "person_years"))
        name = group.replace(" &&& ", " → ")
        parts.append(
            f"{name}: {events} events / {years} PY, {_number(rate, 1)} per 1,000 PY "
            f"(95% CI {_number(low, 1)}–{_number(high, 1)})"
        )
    return "; ".join(parts)


def _survival(rows: pl.DataFrame) -> str:
    """``nsaid_users: 1,234 entries, 456 events, median 720 d; S(1800 d) 0.62 (0.60–0.64)``."""
    parts = []
    for cohort, part in _by_group(rows):
        summary = part.filter(pl.col("additional_name") == "overall")
        if summary.is_empty():
            continue
        median = _value(summary, "median_survival")
        median_text = (
            "median not reached" if _number(median) == "NA" else f"median {_number(median)} d"
        )
        text = (
            f"{cohort}: {_number(_value(summary, 'number_records'))} entries, "
            f"{_number(_value(summary, 'n_events'))} events, {median_text}"
        )
        curve = part.filter(
            (pl.col("additional_name") == "time") & (pl.col("estimate_name") == "estimate")
        )
        if curve.height:
            last = curve.with_columns(
                pl.col("additional_level").cast(pl.Int64, strict=False).alias("_t")
            ).sort("_t")[-1]
            at = last["additional_level"][0]
            keys = ("estimate_95CI_lower", "estimate_95CI_upper")
            low, high = (_value(part.filter(pl.col("additional_level") == at), k) for k in keys)
            text += (
                f"; S({at} d) {_number(last['estimate_value'][0], 2)} "
                f"(95% CI {_number(low, 2)}–{_number(high, 2)})"
            )
        parts.append(text)
    return "; ".join(parts)


def _regression(rows: pl.DataFrame) -> str:
    """``OR age 1.31 (1.21–1.42), sex_male 0.96 (0.69–1.32)``: every term but the intercept."""
    names = set(rows["estimate_name"].to_list())
    ratio, label = next(((r, lab) for r, lab in RATIOS if r in names), (None, ""))
    if ratio is None:
        return ""
    terms = rows.filter(
        (pl.col("estimate_name") == ratio) & ~pl.col("variable_name").str.contains("(?i)intercept")
    )
    parts = []
    for term in terms["variable_name"].unique(maintain_order=True).to_list():
        own = rows.filter(pl.col("variable_name") == term)
        low = _value(own, f"{ratio}_95CI_lower")
        high = _value(own, f"{ratio}_95CI_upper")
        parts.append(
            f"{term} {_number(_value(own, ratio), 2)} (95% CI {_number(low, 2)}–{_number(high, 2)})"
        )
    return f"{label} " + ", ".join(parts) if parts else ""


LINES: dict[str, Callable[[pl.DataFrame], str]] = {
    "counts": _cohort_sizes,
    "characterization": _cohort_sizes,
    "incidence": _incidence,
    "survival": _survival,
    "glm": _regression,
    "cox": _regression,
}
