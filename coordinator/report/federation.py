"""The report's federation section: who contributed, what each gate suppressed and charged,
the privacy budget each node spent (zCDP rho composed, converted to epsilon once).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import polars as pl

from coordinator import plots
from coordinator.headlines import shown_epsilon
from coordinator.report.reading import per_node_numbers, split_nodes
from coordinator.report.tables import draw, figure_html, frame_table

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
        return {
            r["node"]: shown_epsilon(r["rho"], r["delta"]) for r in by_rho.iter_rows(named=True)
        }
    by_epsilon = charged.drop_nulls("epsilon").group_by("node").agg(pl.col("epsilon").sum())
    return dict(by_epsilon.iter_rows())


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
