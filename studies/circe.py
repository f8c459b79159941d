"""OHDSI ATLAS/Circe cohort expressions, compiled on the node through ohdsi-circepy.

Route: Circe JSON -> ``circe.api.build_cohort_query`` (OHDSI SQL, the same templates as Java
Circe-BE, so CohortGenerator's counts reproduce) -> ``circe.sqlrender.render`` ->
``translate(..., "duckdb")`` -> statements run one by one. circepy's ibis route is not used: it
breaks on duckdb 2.0.

Circe writes what it finds in the expression into SQL text. Numbers and dates pass through
``int()``/``float()`` and concept ids are validated integers, but text filters (``StopReason``,
``ValueAsString``, ...) are pasted into ``LIKE '...'`` literals, and SqlRender would even expand
``@parameters`` inside them. So before anything is compiled, ``check_expression`` inspects every
string in the JSON: free text that Circe only displays (names, titles, concept captions) is dropped,
a few closed vocabularies (operators, limit types) and ISO dates are allowed, anything else is
refused with its JSON path.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a connection is only handed in: validating a Circe study loads no DuckDB
    import duckdb

# circepy (and the pandas, ibis and scipy it loads: ~0.6 s) is imported by the functions that
# parse or compile an expression, so that studies without Circe cohorts never load it.

# Display-only text: Circe never puts these in SQL. Dropped before compiling (keys lower-cased).
DISPLAY_KEYS = frozenset(
    {
        "name",
        "title",
        "description",
        "concept_name",
        "concept_code",
        "domain_id",
        "vocabulary_id",
        "concept_class_id",
        "standard_concept",
        "standard_concept_caption",
        "invalid_reason",
        "invalid_reason_caption",
        "valid_start_date",
        "valid_end_date",
        "cdmversionrange",
    }
)
# Closed vocabularies Circe maps through its own tables (keys lower-cased, values lower-cased).
ENUM_VALUES = {
    "op": frozenset({"lt", "lte", "eq", "!eq", "gt", "gte", "bt", "!bt"}),
    "type": frozenset({"all", "first", "last", "any", "at_least", "at_most"}),
    "collapsetype": frozenset({"era"}),
    "datefield": frozenset({"startdate", "enddate"}),
    "startwith": frozenset({"start_date", "end_date"}),
    "endwith": frozenset({"start_date", "end_date"}),
}
DATE_KEYS = frozenset({"value", "extent", "startdate", "enddate"})
#: Day counts (keys lower-cased) bounded like the own form's gaps, windows and observation
#: days: whole numbers, never negative. A negative ``EraPad`` leaves overlapping periods
#: unmerged (181 per person were made), so a person could add many times the declared bound.
NON_NEGATIVE_DAYS = frozenset(
    {"erapad", "gapdays", "priordays", "postdays", "days", "dayssupplyoverride", "count"}
)
#: Window bounds' direction: before (-1) or after (+1) the index.
COEFFICIENTS = frozenset({-1, 1})
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
#: Scratch tables that circepy's SQL creates (its own fixed names, e.g. ``Inclusion_0``).
TEMP_TABLE_RE = re.compile(r"CREATE TEMP TABLE ([A-Za-z_][A-Za-z0-9_]*)")


class CirceError(ValueError):
    """A Circe expression that fedomop refuses to compile; the message names the JSON path."""


def check_expression(expression: dict[str, Any]) -> None:
    """Refuse free text that would reach SQL, then check that Circe itself accepts the JSON."""
    clean = _strip_display_text(expression)
    try:
        from circe.api import cohort_expression_from_json

        cohort_expression_from_json(json.dumps(clean))
    except ValueError as exc:
        raise CirceError(f"not a valid Circe cohort expression: {exc}") from None
    if not expression.get("PrimaryCriteria"):
        raise CirceError("PrimaryCriteria: a Circe cohort needs primary (entry) criteria")
    try:  # circepy's parser accepts shapes its SQL builder fails on (a concept set without
        compile_circe(expression, 0)  # an expression): refuse them here, not on the node
    except CirceError:
        raise
    except Exception as exc:  # third-party code on untrusted input: any failure is a refusal
        reason = f"{type(exc).__name__}: {exc}"[:200]
        raise CirceError(f"Circe cannot compile this cohort expression ({reason})") from None


def _strip_display_text(node: Any, path: str = "") -> Any:
    """A copy of ``node`` without display text; raises ``CirceError`` on any other free text."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            lower = str(key).lower()
            if isinstance(value, str):
                if lower not in DISPLAY_KEYS:
                    out[key] = _check_string(lower, value, where)
            elif lower in NON_NEGATIVE_DAYS or lower == "coeff":
                out[key] = _check_setting(lower, value, where)
            else:
                out[key] = _strip_display_text(value, where)
        return out
    if isinstance(node, list):
        return [_strip_display_text(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        raise CirceError(f"{path}: free text {node!r} is not accepted in a Circe expression")
    return node


def _check_setting(key: str, value: Any, where: str) -> Any:
    """A numeric setting within the own form's bounds (``NON_NEGATIVE_DAYS``, ``COEFFICIENTS``)."""
    if value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise CirceError(f"{where}: {value!r} must be a whole number")
    if key == "coeff" and value not in COEFFICIENTS:
        raise CirceError(f"{where}: {value} must be -1 (before index) or 1 (after index)")
    if key != "coeff" and value < 0:
        raise CirceError(
            f"{where}: {value} must not be negative (a negative day count lets one person's "
            "periods overlap or windows invert, as the own form forbids)"
        )
    return value


def _check_string(key: str, value: str, where: str) -> str:
    if key in ENUM_VALUES:
        if value.lower() not in ENUM_VALUES[key]:
            raise CirceError(
                f"{where}: {value!r} is not one of {sorted(ENUM_VALUES[key])} "
                "(text filters are not supported: their text would become SQL)"
            )
        return value
    if key in DATE_KEYS and DATE_RE.fullmatch(value):
        return value
    raise CirceError(
        f"{where}: free text {value!r} is not accepted (only ISO dates, operators and limit "
        "types; text filters are not supported because their text would become SQL)"
    )


def compile_circe(expression: dict[str, Any], cohort_id: int) -> list[str]:
    """DuckDB statements that insert this cohort into the temp table ``cohort`` as ``cohort_id``.

    Schema and table names are fixed here; the expression contributes only validated numbers and
    dates (display text is dropped first, see ``check_expression``).
    """
    clean = _strip_display_text(expression)
    from circe.api import build_cohort_query, cohort_expression_from_json
    from circe.cohortdefinition import BuildExpressionQueryOptions
    from circe.sqlrender import render, split_sql, translate

    parsed = cohort_expression_from_json(json.dumps(clean))
    options = BuildExpressionQueryOptions()
    options.cdm_schema = "main"
    options.vocabulary_schema = "main"
    options.result_schema = "main"
    options.target_table = "cohort"
    options.cohort_id = int(cohort_id)
    sql = translate(render(build_cohort_query(parsed, options)), "duckdb")
    if "@" in sql:
        raise CirceError("Circe SQL still holds an unrendered @parameter; refusing to run it")
    return [statement for statement in split_sql(sql) if statement.strip()]


def circe_concept_ids(expression: dict[str, Any]) -> dict[str, list[int]]:
    """Concept ids per Circe concept set (keyed by set name or id), for the unknown-concept check."""
    sets: dict[str, list[int]] = {}
    for concept_set in expression.get("ConceptSets", []):
        label = str(concept_set.get("name") or concept_set.get("id"))
        items = (concept_set.get("expression") or {}).get("items", [])
        sets[label] = [
            int(item["concept"]["CONCEPT_ID"])
            for item in items
            if isinstance(item.get("concept"), dict) and "CONCEPT_ID" in item["concept"]
        ]
    return sets


def materialise_circe(
    con: duckdb.DuckDBPyConnection, expression: dict[str, Any], cohort_id: int
) -> None:
    """Run one Circe cohort on ``con``; rows land in the temp table ``cohort``.

    Circe's scratch tables (``Codesets``, ``qualified_events``...) are dropped first, so a run
    that failed half-way on this connection does not block the next one.
    """
    statements = compile_circe(expression, cohort_id)
    for table in sorted({m for s in statements for m in TEMP_TABLE_RE.findall(s)}):
        con.execute(f"DROP TABLE IF EXISTS temp.main.{table}")
    for statement in statements:
        con.execute(statement)
