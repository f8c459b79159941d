"""The coordinator-side pooling every analysis kind shares: stacking node tables, wide
frames, ratio estimates and normal-theory intervals."""

from __future__ import annotations

import math

import polars as pl

from studies.analyses.spec_fields import EXACT_INTEGERS
from studies.analysis import CombineInput
from studies.results import SEP, estimates
from studies.statistics import GROUP_KEYS, WITHHELD_KEYS


def pool(inputs: CombineInput) -> pl.DataFrame:
    """Sum every count and sum over nodes, per group and estimate: exact for integer counts.

    No partial pools: a group (``GROUP_KEYS``) in which any node's gate suppressed a cell (NaN)
    is withheld in the pool as a whole (``value`` null), since a sum over the other nodes would
    understate the cell and a ratio of such sums mislead; ``withheld`` names the nodes that
    withheld it (``;``-joined, empty when none did) and ``partial_pool_rows`` reports them.
    ``nodes`` says how many nodes released the whole group (a node that sent no row of a group
    has none of it: a declared key it does not hold is zero there).

    Sums use ``math.fsum`` in node order, so a pooled float (GLM/Cox sums) is the correctly
    rounded total and the same in every run, whatever order polars groups rows in.
    """
    schema = {
        **{k: pl.String for k in GROUP_KEYS},
        "estimate_name": pl.String,
        "value": pl.Float64,
        "nodes": pl.UInt32,
        "withheld": pl.String,
    }
    names = node_names(inputs)
    frames = [
        f.with_columns(pl.lit(i).alias("_node"), pl.lit(names[i]).alias("_name"))
        for i, f in enumerate(inputs.statistics)
        if f.height
    ]
    if not frames:
        return pl.DataFrame(schema=schema)
    stacked = pl.concat(frames, how="vertical").with_columns(pl.col("value").fill_nan(None))
    stacked = _absent_keys_withheld(stacked)
    released = stacked.with_columns(
        pl.col("value").is_null().any().over([*GROUP_KEYS, "_node"]).alias("_withheld")
    ).with_columns(
        pl.when(pl.col("_withheld")).then(None).otherwise(pl.col("value")).alias("value")
    )
    summed = (
        released.sort("_node", maintain_order=True)
        .group_by([*GROUP_KEYS, "estimate_name"], maintain_order=True)
        .agg(
            pl.col("value").sum(),
            pl.col("value").drop_nulls().alias("_values"),
            (
                (pl.col("value") != pl.col("value").round()).any()
                | (pl.col("value").abs().sum() >= EXACT_INTEGERS)
            ).alias("_inexact"),
            pl.col("value").count().alias("nodes"),
            pl.col("_name").filter(pl.col("_withheld")).unique(maintain_order=True).alias("_w"),
        )
        .with_row_index("_order")
    )
    # integers whose absolute sum is below 2^53 add exactly in any order; others need fsum
    inexact = summed.filter(pl.col("_inexact")).with_columns(
        pl.col("_values").map_elements(math.fsum, return_dtype=pl.Float64).alias("value")
    )
    return (
        pl.concat([summed.filter(~pl.col("_inexact")), inexact])
        .sort("_order")
        .with_columns(
            pl.when((pl.col("nodes") > 0) & (pl.col("_w").list.len() == 0))
            .then(pl.col("value"))
            .alias("value"),
            pl.col("_w").list.join(";").alias("withheld"),
        )
        .sort([*GROUP_KEYS, "estimate_name"])
        .select(list(schema))
    )


def _absent_keys_withheld(stacked: pl.DataFrame) -> pl.DataFrame:
    """Where a node's gate withheld rows keyed by the data (its ``WITHHELD_KEYS`` marker for a
    cohort and strata), the groups there it did not send may be withheld ones, not zeros: add
    them for that node as withheld (null), so ``pool`` withholds them. Markers go."""
    marker = pl.col("variable_level") == WITHHELD_KEYS
    scope = ["cohort", "strata_name"]
    marks = stacked.filter(marker).select(*scope, "_node", "_name").unique()
    rows = stacked.filter(~marker)
    if marks.is_empty():
        return rows
    groups = rows.select(*scope, *GROUP_KEYS[2:], "estimate_name", "release_class").unique()
    absent = groups.join(marks, on=scope).join(
        rows.select(*GROUP_KEYS, "estimate_name", "_node"),
        on=[*GROUP_KEYS, "estimate_name", "_node"],
        how="anti",
    )
    filler = absent.with_columns(value=pl.lit(None, dtype=pl.Float64))
    return pl.concat([rows, filler], how="diagonal_relaxed")


def node_names(inputs: CombineInput) -> list[str]:
    """The nodes' names, or ``node1``, ``node2``... when the transport gave none."""
    return inputs.node_names or [f"node{i + 1}" for i in range(len(inputs.statistics))]


def partial_pool_rows(pooled: pl.DataFrame, **keys: pl.Expr | str) -> pl.DataFrame:
    """summarised_result rows saying why a pooled group is withheld (see ``pool``).

    For every group that a node sent with part of it withheld by its gate, two estimates:
    ``nodes_contributing`` (integer: nodes that released the whole group) and
    ``nodes_withheld`` (character: the nodes that withheld part of it, ``;``-joined), so a
    reader (and the report) sees why the pooled cell is not shown. ``keys`` map the
    group's statistics columns to the analysis's result columns (``group_level=pl.col("cohort")``
    or a constant text); strata pass through unless given. No rows when every pool is complete.
    """
    partial = (
        pooled.filter(pl.col("withheld") != "")
        .group_by(GROUP_KEYS, maintain_order=True)
        .agg(pl.col("nodes").min().alias("nodes_contributing"), pl.col("withheld").first())
    )
    exprs = {k: pl.lit(v) if isinstance(v, str) else v for k, v in keys.items()}
    exprs = {"strata_name": pl.col("strata_name"), "strata_level": pl.col("strata_level")} | exprs
    table = partial.select(
        *[e.alias(k) for k, e in exprs.items()],
        pl.col("nodes_contributing").cast(pl.Int64),
        pl.col("withheld").alias("nodes_withheld"),
    )
    return estimates(table, {"nodes_contributing": "integer", "nodes_withheld": "character"})


def wide(
    pooled: pl.DataFrame, keys: list[str] | None = None, names: list[str] | None = None
) -> pl.DataFrame:
    """Pooled long statistics -> one row per group with a column per estimate_name.

    ``names`` are the estimates the analysis reads: each becomes a column even when no node
    sent it (an empty cohort, everything withheld), holding null. Groups merged by coarser
    ``keys`` add up, and stay withheld (null) when any of them is: never a sum of the rest.
    """
    index = keys if keys is not None else GROUP_KEYS
    complete = pl.when(pl.element().null_count() > 0).then(None).otherwise(pl.element().sum())
    table = pooled.pivot(
        on="estimate_name", index=index, values="value", aggregate_function=complete
    )
    missing = [n for n in names or [] if n not in table.columns]
    return table.with_columns(pl.lit(None, dtype=pl.Float64).alias(n) for n in missing)


#: ``group_name`` of a ratio of outcome to denominator cohort (incidence, prevalence).
DENOMINATOR_OUTCOME = "denominator_cohort_name" + SEP + "outcome_cohort_name"


def with_zero_overall(
    table: pl.DataFrame, cohort: str, variable_name: str, levels: list[str], names: list[str]
) -> pl.DataFrame:
    """Add overall rows of zeros (``names`` columns) for the ``levels`` (variable_level) at
    which no node had anyone in the denominator ``cohort``, so an empty cohort still reports."""
    present = table.filter(pl.col("strata_name") == "overall")["variable_level"].to_list()
    missing = [level for level in levels if level not in present]
    if not missing:
        return table
    zeros = pl.DataFrame(
        {
            "cohort": cohort,
            "strata_name": "overall",
            "strata_level": "overall",
            "variable_name": variable_name,
            "variable_level": missing,
        }
        | dict.fromkeys(names, 0.0)
    )
    return pl.concat([table, zeros.select(table.columns)], how="vertical_relaxed")


def ratio_result(
    table: pl.DataFrame,
    pooled: pl.DataFrame,
    denominator: dict[str, str],
    measure: str,
    **keys: pl.Expr | str,
) -> pl.DataFrame:
    """summarised_result rows of an outcome-to-denominator ratio (incidence, prevalence), one
    concept in one place: ``denominator`` columns (name -> estimate_type) under variable_name
    ``Denominator``; under ``Outcome`` the outcome count and ``measure`` with its 95CI bounds;
    then the partial-pool rows of ``pooled`` (``keys``: the group's result columns beyond
    ``group_name``, see ``partial_pool_rows``). The result columns of ``table`` are the keys."""
    outcome = {"outcome_count": "integer"} | dict.fromkeys(
        (measure, f"{measure}_95CI_lower", f"{measure}_95CI_upper"), "numeric"
    )
    flags = partial_pool_rows(
        pooled, group_name=DENOMINATOR_OUTCOME, variable_name="Outcome", **keys
    )
    return pl.concat(
        [
            estimates(table, denominator, variable_name="Denominator"),
            estimates(table, outcome, variable_name="Outcome"),
            flags,
        ],
        how="vertical",
    )


def z_value(level: float = 0.95) -> float:
    """Two-sided normal quantile for a confidence level (1.959963984540054 for 95 %)."""
    from scipy import stats  # here, not at the top: a study validates without scipy

    return float(stats.norm.ppf(1 - (1 - level) / 2))


def normal_p_value(z: float) -> float:
    """Two-sided p-value of a standard normal statistic."""
    from scipy import stats  # here, not at the top: a study validates without scipy

    return float(2 * stats.norm.sf(abs(z))) if math.isfinite(z) else math.nan
