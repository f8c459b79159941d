"""``pooled_counts``: persons per cohort and stratum, pooled where no node alone may report them.

Rare-disease teams need totals that no single node could release: each node holds a handful of
patients, below any minimum cell count. In pooled mode (design: "Pooled mode for small numbers")
each node's gate adds its share of discrete Gaussian noise and masks its counts for a secure sum
(``privacy.secagg``), so the coordinator learns only the noisy total; the minimum cell count
then applies to that total, here in ``combine``, not to each node.

Study entry::

    - id: cf_by_sex_age
      kind: pooled_counts
      cohorts: [cystic_fibrosis]
      strata: [sex, age_group, [sex, age_group]]
      age_groups: [[0, 17], [18, 39], [40, 150]]

The rounds, through the gates: round 0 each node publishes an ephemeral public key and its
signature by the node's pooling identity (``value`` rows, nothing from the data); ``combine``
makes the roster (keys and signatures) and asks for round 1, in which each node checks the
signatures against the permit's ``node_keys`` (when it binds any) and returns its masked noisy
counts; ``combine`` sums them mod 2^48, checks the sum, suppresses
noisy totals below the largest minimum cell count the nodes announced (zero and negative noisy
totals too; complementary suppression as at a node), and finishes. A node
missing in round 1 makes the round fail; it is retried without it (a fresh session) up to
``MAX_ATTEMPTS`` times. Without gates (``studies.runner.run_local``, the exact reference) the
nodes answer round 0 with their plain counts and ``combine`` sums them.

Counts are of persons at their first entry into the cohort, on a fixed grid (every cohort x
stratum level, ``None`` levels included, zeros too) so that every node's vector has the same rows
and a person touches exactly ``1 + len(strata)`` rows per cohort (the profile declares
``len(cohorts) * (1 + len(strata))`` rows per person; a permit's ``max_rows_per_person`` may
raise it, never lower it). Calendar year is not a
stratum here: its levels are not known in advance.

summarised_result (result_type ``pooled_counts``): as ``counts``, variable ``Number subjects``,
estimate ``count``; suppressed totals are missing.
"""

from __future__ import annotations

from itertools import product
from typing import Any, Literal

import polars as pl
from pydantic import Field

from privacy.disclosure import protect
from privacy.secagg import (
    KEY_VARIABLE,
    MIN_PARTIES,
    ROW_ORDER,
    SecAggError,
    session_id,
    unmask_sum,
)
from studies.analyses import register
from studies.analyses.common import (
    ENTRIES_CTE,
    AgeGroups,
    Name,
    PersonStrata,
    SpecBase,
    age_label,
    entries_params,
    grouping_sets,
    node_names,
    normalise_strata,
    query,
    strata_columns,
    strata_rows_per_person,
)
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.permit import DEFAULT_MIN_CELL_COUNT
from studies.results import SEP, estimates
from studies.statistics import make_statistics

VARIABLE = "Number subjects"
SEXES = ("Female", "Male", "None")
MAX_ATTEMPTS = 3
"""Masked rounds tried (each without the nodes missing from the previous one) before failing."""


class PooledCountsSpec(SpecBase):
    """Which cohorts to count and by which strata (sex and age group)."""

    kind: Literal["pooled_counts"]
    cohorts: list[Name] = Field(min_length=1)
    strata: PersonStrata
    age_groups: AgeGroups


def grid(spec: PooledCountsSpec) -> pl.DataFrame:
    """Every (cohort, strata_name, strata_level) the analysis reports, from the spec alone."""
    levels = {"sex": list(SEXES), "age_group": [age_label(b) for b in spec.age_groups] + ["None"]}
    cells = [("overall", "overall")]
    for combo in normalise_strata(spec.strata):
        cells += [(SEP.join(combo), SEP.join(c)) for c in product(*(levels[s] for s in combo))]
    return pl.DataFrame(
        [(c, name, level) for c in spec.cohorts for name, level in cells],
        schema=["cohort", "strata_name", "strata_level"],
        orient="row",
    )


def first_entry_counts(cdm: CdmContext, spec: PooledCountsSpec) -> pl.DataFrame:
    """Persons per cohort and grid cell on this node, at their first cohort entry (zeros kept)."""
    grouping = grouping_sets(["cohort_name"], normalise_strata(spec.strata))
    sql = f"""
        WITH {ENTRIES_CTE},
        first_entries AS (
            SELECT * FROM entries
            QUALIFY row_number() OVER (
                PARTITION BY cohort_name, subject_id ORDER BY cohort_start_date) = 1
        )
        SELECT cohort_name, {grouping.select}, count(*) AS subjects
        FROM first_entries GROUP BY {grouping.clause}
    """
    params = entries_params(cdm, spec.cohorts, spec.age_groups)
    counted = strata_columns(query(cdm.con, sql, params), grouping).rename(
        {"cohort_name": "cohort"}
    )
    return grid(spec).join(counted, on=["cohort", "strata_name", "strata_level"], how="left")


@register
class PooledCounts:
    """Noisy persons per cohort and stratum, summed across nodes by secure aggregation.

    Each node adds a share of discrete Gaussian noise, only the noisy total is seen, and totals
    below the minimum cell count are suppressed. Needs mechanism gaussian and three nodes.
    """

    kind = "pooled_counts"
    Spec = PooledCountsSpec

    def profile(self, spec: PooledCountsSpec) -> ReleaseProfile:
        """Keys, then masked vectors, each retry of a roster without missing nodes one more;
        a person counts once per cohort and strata combination (first entry)."""
        cells = strata_rows_per_person(spec.strata, spec.age_groups, per_entry=False)
        return ReleaseProfile(
            max_rounds=1 + MAX_ATTEMPTS, rows_per_person=len(spec.cohorts) * cells
        )

    def local(self, cdm: CdmContext, spec: PooledCountsSpec, state: dict | None) -> pl.DataFrame:
        counts = first_entry_counts(cdm, spec)
        return make_statistics(
            counts.select(
                "cohort",
                "strata_name",
                "strata_level",
                pl.lit(VARIABLE).alias("variable_name"),
                pl.lit("count").alias("estimate_name"),
                pl.lit("count").alias("kind"),
                pl.col("subjects").fill_null(0).cast(pl.Float64).alias("value"),
            )
        )

    def combine(
        self, inputs: CombineInput, spec: PooledCountsSpec, state: dict | None
    ) -> Finished | NextRound:
        names = node_names(inputs)
        frames = dict(zip(names, inputs.statistics, strict=True))
        if state is None:
            keys = {name: _protocol_rows(f) for name, f in frames.items()}
            if not any(rows.height for rows in keys.values()):  # no gates: the exact reference
                return Finished(_result(_exact_total(frames), spec))
            return NextRound(_roster_state(keys, spec))
        roster: dict[str, str] = state["roster"]
        missing = sorted(set(roster) - set(frames))
        if missing:
            return NextRound(_retry(state, missing))
        stray = sorted(set(frames) - set(roster))
        if stray:
            raise SecAggError(f"masked shares from nodes outside the roster: {stray}")
        session = session_id(spec.id, roster, state["attempt"])
        layout, shares = _aligned_shares([frames[n] for n in sorted(roster)])
        total = layout.with_columns(
            kind=pl.lit("count"), value=pl.Series(unmask_sum(shares, session), dtype=pl.Float64)
        )
        min_cell = int(state["min_cell_count"])
        protected, _ = protect(total, min_cell)
        # noise turns small true counts into any small number, zero and negatives included
        below = pl.col("value") < min_cell
        return Finished(
            _result(
                protected.with_columns(value=pl.when(below).then(None).otherwise("value")), spec
            )
        )


def _protocol_rows(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("variable_name") == KEY_VARIABLE)


def _roster_state(keys: dict[str, pl.DataFrame], spec: PooledCountsSpec) -> dict[str, Any]:
    """Round 1's state: every node's public key, its signature by the node's pooling identity
    (each node checks them against the permit) and the largest minimum cell count announced."""
    roster, signatures, min_cells = {}, {}, [DEFAULT_MIN_CELL_COUNT]
    for name, rows in keys.items():
        key = rows.filter(pl.col("estimate_name") == "public_key")["variable_level"]
        if key.len() != 1:
            raise SecAggError(f"node {name!r} sent no public key for pooled analysis {spec.id!r}")
        roster[name] = key.item()
        signature = rows.filter(pl.col("estimate_name") == "key_signature")["variable_level"]
        if signature.len() == 1:
            signatures[name] = signature.item()
        min_cells += rows.filter(pl.col("estimate_name") == "min_cell_count")["value"].to_list()
    if len(roster) < MIN_PARTIES:
        raise SecAggError(
            f"pooled analysis {spec.id!r} needs {MIN_PARTIES} nodes, has {len(roster)}"
        )
    return {
        "phase": "masked",
        "roster": roster,
        "signatures": signatures,
        "attempt": 0,
        "min_cell_count": max(min_cells),
    }


def _retry(state: dict[str, Any], missing: list[str]) -> dict[str, Any]:
    """The masks cannot cancel without the missing nodes: a fresh round without them."""
    roster = {n: k for n, k in state["roster"].items() if n not in missing}
    signatures = {n: s for n, s in state.get("signatures", {}).items() if n in roster}
    attempt = state["attempt"] + 1
    if attempt >= MAX_ATTEMPTS or len(roster) < MIN_PARTIES:
        raise SecAggError(
            f"masked shares missing from {missing}; {len(roster)} node(s) left after "
            f"{attempt} attempt(s): the pooled sum cannot be formed"
        )
    return {**state, "roster": roster, "signatures": signatures, "attempt": attempt}


def _aligned_shares(frames: list[pl.DataFrame]) -> tuple[pl.DataFrame, list[list[int]]]:
    """Every node's masked vector in one row order (check coordinate last), rows identical."""
    order = [*ROW_ORDER, "estimate_name"]
    layouts, shares = [], []
    for frame in frames:
        is_check = pl.col("variable_name") == KEY_VARIABLE
        rows = pl.concat([frame.filter(~is_check).sort(order), frame.filter(is_check)])
        layouts.append(rows.filter(~is_check).drop("value", "kind"))
        shares.append([int(v) for v in rows["value"]])
    if any(not layout.equals(layouts[0]) for layout in layouts[1:]):
        raise SecAggError("the nodes' masked shares do not have the same rows")
    return layouts[0], shares


def _exact_total(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Plain counts summed (reference runs without gates, hence without noise or masks)."""
    keys = [*ROW_ORDER, "estimate_name", "kind", "lower", "upper"]
    return pl.concat(frames.values()).group_by(keys, maintain_order=True).agg(pl.col("value").sum())


def _result(total: pl.DataFrame, spec: PooledCountsSpec) -> pl.DataFrame:
    table = total.select(
        pl.lit("cohort_name").alias("group_name"),
        pl.col("cohort").alias("group_level"),
        "strata_name",
        "strata_level",
        "variable_name",
        "variable_level",
        pl.col("value").fill_nan(None).alias("count"),
    )
    return estimates(table, {"count": "integer"})
