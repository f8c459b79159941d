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

Study entry option ``threshold: t``: the sum completes when at least t nodes' masked vectors
arrive, so up to n - t nodes may drop after sharing their seeds (default: every node).

The rounds, through the gates (``node.pooled``, protocol in ``privacy.secagg_plus``): round 0
each node publishes two public keys signed by its pooling identity (``value`` rows, nothing from
the data); ``combine`` makes the roster and asks for the ``share`` round (each node checks the
signatures against the permit's ``node_keys`` and the threshold against its policy, then sends
encrypted Shamir shares of its seeds to its peers), then ``masked`` (noisy counts, double
masked: the only round charged), ``consistency`` (each survivor signs who survived) and
``reveal`` (one kind of share per node); ``combine`` rebuilds the self-masks and the dropped
nodes' pairwise masks, checks the sum, suppresses noisy totals below the largest minimum cell
count the nodes announced (zero and negative noisy totals too), and finishes. No complementary
suppression: every total carries its own noise, so a difference of released totals is a noisy
number too, never a person's exact count; and a noisy total of at least the minimum cell count
is never hidden. More dropouts than the threshold allows fail the analysis with a clear reason.
Without gates (``studies.runner.run_local``, the exact reference) the nodes answer round 0 with
their plain counts and ``combine`` sums them.

Counts are of persons at their first entry into the cohort, on a fixed grid (every cohort x
stratum level the study names, zeros too) so that every node's vector has the same rows and a
person touches at most ``1 + len(strata)`` rows per cohort (the declared ``rows_per_person``:
``len(cohorts) * (1 + len(strata))``). Levels the study does not name (an unknown sex, an age
outside every group: the ``None`` levels) are not released: they are noise around zero at best,
and a person without them is still counted in ``overall``. The calendar year (of the first entry:
the year of diagnosis) is a stratum when the study names its years (``years: [2000, 2024]``),
so that its levels are known before any data is read; entries in other years are in
``overall`` only.

summarised_result (result_type ``pooled_counts``): as ``counts``, variable ``Number subjects``,
estimate ``count``; suppressed totals are missing.
"""

from __future__ import annotations

from itertools import product
from typing import Any

import polars as pl

from privacy.secagg import KEY_VARIABLE, MIN_PARTIES, ROW_ORDER, SecAggError
from studies.analyses import node_sql, pooling
from studies.analyses.glm import covariate_columns
from studies.analyses.spec_fields import age_label, normalise_strata
from studies.analyses.specs import PooledCountsSpec
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.permit import DEFAULT_MIN_CELL_COUNT
from studies.registry import register
from studies.results import SEP, estimates
from studies.statistics import make_statistics

VARIABLE = "Number subjects"
SEXES = ("Female", "Male")
ROUNDS = 5
"""Keys, shares, masked vectors, consistency, reveal (``privacy.secagg_plus``)."""


def grid(spec: PooledCountsSpec) -> pl.DataFrame:
    """Every (cohort, strata_name, strata_level) the analysis reports, from the spec alone:
    only levels the study names (no ``None`` level)."""
    years = range(spec.years[0], spec.years[1] + 1) if spec.years else range(0)
    levels = {
        "sex": list(SEXES),
        "age_group": [age_label(b) for b in spec.age_groups],
        "calendar_year": [str(y) for y in years],
    }
    cells = [("overall", "overall", "")]
    for combo in normalise_strata(spec.strata):
        cells += [(SEP.join(combo), SEP.join(c), "") for c in product(*(levels[s] for s in combo))]
    cells += [("overall", "overall", c.term) for c in spec.characteristics]
    return pl.DataFrame(
        [(c, *cell) for c in spec.cohorts for cell in cells],
        schema=["cohort", "strata_name", "strata_level", "variable_level"],
        orient="row",
    )


FIRST_ENTRIES_CTE = f"""{node_sql.ENTRIES_CTE},
        e AS (
            SELECT * FROM entries
            QUALIFY row_number() OVER (
                PARTITION BY cohort_name, subject_id ORDER BY cohort_start_date) = 1
        )"""
"""Each person's first entry into each cohort (``e``): a person counts once per cohort."""


def first_entry_counts(cdm: CdmContext, spec: PooledCountsSpec) -> pl.DataFrame:
    """Persons per cohort and grid cell on this node, at their first cohort entry (zeros kept)."""
    grouping = node_sql.grouping_sets(["cohort_name"], normalise_strata(spec.strata))
    sql = f"""
        WITH {FIRST_ENTRIES_CTE}
        SELECT cohort_name, {grouping.select}, count(*) AS subjects
        FROM e GROUP BY {grouping.clause}
    """
    params = node_sql.entries_params(cdm, spec.cohorts, spec.age_groups)
    counted = node_sql.strata_columns(node_sql.query(cdm.con, sql, params), grouping).rename(
        {"cohort_name": "cohort"}
    )
    counted = pl.concat(
        [counted.with_columns(variable_level=pl.lit("")), _characteristic_counts(cdm, spec)],
        how="diagonal_relaxed",
    )
    cells = ["cohort", "strata_name", "strata_level", "variable_level"]
    return grid(spec).join(counted.select(*cells, "subjects"), on=cells, how="left")


def _characteristic_counts(cdm: CdmContext, spec: PooledCountsSpec) -> pl.DataFrame:
    """Persons per cohort with each characteristic at their first entry (SQL from the GLM's
    covariates: bound ids and windows, table names from the fixed domain map)."""
    if not spec.characteristics:
        return pl.DataFrame()
    columns, extra, _ = covariate_columns(cdm, spec.characteristics)
    sums = ", ".join(f"sum({col}) AS c{i}" for i, col in enumerate(columns))
    sql = f"""
        WITH {FIRST_ENTRIES_CTE}
        SELECT cohort_name AS cohort, {sums} FROM e GROUP BY cohort_name
    """
    params = node_sql.entries_params(cdm, spec.cohorts, spec.age_groups) | extra
    wide = node_sql.query(cdm.con, sql, params)
    names = {f"c{i}": c.term for i, c in enumerate(spec.characteristics)}
    return (
        wide.rename(names)
        .unpivot(index="cohort", variable_name="variable_level", value_name="subjects")
        .with_columns(strata_name=pl.lit("overall"), strata_level=pl.lit("overall"))
    )


@register
class PooledCounts:
    """Noisy persons per cohort and stratum, summed across nodes by secure aggregation.

    Each node adds a share of discrete Gaussian noise, only the noisy total is seen, and totals
    below the minimum cell count are suppressed. Needs mechanism gaussian and three nodes.
    """

    kind = "pooled_counts"
    Spec = PooledCountsSpec

    def profile(self, spec: PooledCountsSpec) -> ReleaseProfile:
        """Five rounds (keys, shares, masked, consistency, reveal); a person is in ``overall``
        and in at most one level of each stratum, per cohort."""
        per_cohort = 1 + len(normalise_strata(spec.strata)) + len(spec.characteristics)
        rows = len(spec.cohorts) * per_cohort
        # calendar years are the study's own (``years``), never keys found in the data
        return ReleaseProfile(
            max_rounds=ROUNDS, rows_per_person=rows, data_keyed_strata=frozenset(), pooled=True
        )

    def local(self, cdm: CdmContext, spec: PooledCountsSpec, state: dict | None) -> pl.DataFrame:
        counts = first_entry_counts(cdm, spec)
        return make_statistics(
            counts.select(
                "cohort",
                "strata_name",
                "strata_level",
                pl.lit(VARIABLE).alias("variable_name"),
                "variable_level",
                pl.lit("count").alias("estimate_name"),
                pl.lit("count").alias("release_class"),
                pl.col("subjects").fill_null(0).cast(pl.Float64).alias("value"),
            )
        )

    def combine(
        self, inputs: CombineInput, spec: PooledCountsSpec, state: dict | None
    ) -> Finished | NextRound:
        names = pooling.node_names(inputs)
        frames = {n: _protocol_rows(f) for n, f in zip(names, inputs.statistics, strict=True)}
        if state is None:
            if not any(rows.height for rows in frames.values()):  # no gates: the exact reference
                plain = dict(zip(names, inputs.statistics, strict=True))
                return Finished(_result(_exact_total(plain), spec))
            return NextRound(_roster_state(frames, spec))
        phase = state["phase"]
        if phase == "share":
            return NextRound(_senders_state(frames, state))
        if phase == "masked":
            vectors = dict(zip(names, inputs.statistics, strict=True))
            return NextRound(_survivors_state(vectors, state, spec))
        if phase == "consistency":
            return NextRound(_reveal_state(frames, state))
        total = unmasked_total(frames, state, spec)
        return Finished(_result(suppress_small_totals(total, int(state["min_cell_count"])), spec))


def suppress_small_totals(total: pl.DataFrame, min_cell: int) -> pl.DataFrame:
    """Noisy totals below the minimum cell count go missing, the rest stay, whatever they imply.

    Noise turns small true counts into any small number, zero and negatives included, so all of
    those go. Nothing else does: each total carries its own noise (DP covers every released
    total and their differences), so complementary suppression would only hide totals of at
    least ``min_cell`` (as it did when a near-zero ``None`` level forced it on real levels).
    """
    return total.with_columns(
        value=pl.when(pl.col("value") < min_cell).then(None).otherwise("value")
    )


def _protocol_rows(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("variable_name") == KEY_VARIABLE)


def _roster_state(keys: dict[str, pl.DataFrame], spec: PooledCountsSpec) -> dict[str, Any]:
    """The ``share`` round's state: every node's two public keys, their signature by the node's
    pooling identity (each node checks them against the permit), the threshold (the study's,
    else every node) and the largest minimum cell count announced."""
    roster, signatures, min_cells = {}, {}, [DEFAULT_MIN_CELL_COUNT]
    for name, rows in keys.items():
        found = dict(zip(rows["estimate_name"], rows["variable_level"], strict=True))
        if not {"channel_key", "mask_key", "key_signature"} <= set(found):
            raise SecAggError(f"node {name!r} sent no signed keys for pooled analysis {spec.id!r}")
        roster[name] = {"channel": found["channel_key"], "mask": found["mask_key"]}
        signatures[name] = found["key_signature"]
        min_cells += rows.filter(pl.col("estimate_name") == "min_cell_count")["value"].to_list()
    if len(roster) < MIN_PARTIES:
        raise SecAggError(
            f"pooled analysis {spec.id!r} needs {MIN_PARTIES} nodes, has {len(roster)}"
        )
    return {
        "phase": "share",
        "roster": roster,
        "signatures": signatures,
        "threshold": spec.threshold or len(roster),
        "colluders": spec.colluders,
        "min_cell_count": max(min_cells),
    }


def _senders_state(frames: dict[str, pl.DataFrame], state: dict[str, Any]) -> dict[str, Any]:
    """The ``masked`` round's state: U1 (who sent shares) and every ciphertext, by recipient."""
    shares = {
        name: dict(zip(rows["strata_level"], rows["variable_level"], strict=True))
        for name, rows in frames.items()
        if name in state["roster"]
    }
    _enough(len(shares), state["threshold"], "nodes shared their seeds")
    return {**state, "phase": "masked", "shares": shares}


def _survivors_state(
    vectors: dict[str, pl.DataFrame], state: dict[str, Any], spec: PooledCountsSpec
) -> dict[str, Any]:
    """The ``consistency`` round's state: U2 (whose masked vectors arrived) and those vectors."""
    stray = sorted(set(vectors) - set(state["shares"]))
    if stray:
        raise SecAggError(f"masked vectors from nodes that shared no seeds: {stray}")
    _enough(len(vectors), state["threshold"], "masked vectors arrived")
    expected = layout(spec)
    masked = {}
    for name, frame in vectors.items():
        is_check = pl.col("variable_name") == KEY_VARIABLE
        rows = frame.filter(~is_check).sort([*ROW_ORDER, "estimate_name"])
        if not rows.select(expected.columns).equals(expected) or frame.filter(is_check).height != 1:
            raise SecAggError(f"the masked vector of {name!r} does not have the study's rows")
        masked[name] = [int(v) for v in pl.concat([rows, frame.filter(is_check)])["value"]]
    return {**state, "phase": "consistency", "survivors": sorted(masked), "masked": masked}


def _reveal_state(frames: dict[str, pl.DataFrame], state: dict[str, Any]) -> dict[str, Any]:
    """The ``reveal`` round's state: the survivors' signatures over U2."""
    signatures = {
        name: rows["variable_level"].item()
        for name, rows in frames.items()
        if name in state["survivors"] and rows.height == 1
    }
    _enough(len(signatures), state["threshold"], "nodes signed the survivors")
    return {**state, "phase": "reveal", "survivor_signatures": signatures}


def unmasked_total(
    frames: dict[str, pl.DataFrame], state: dict[str, Any], spec: PooledCountsSpec
) -> pl.DataFrame:
    """The survivors' noisy total (before suppression) from the ``reveal`` round's shares."""
    from privacy.secagg_plus import session_id, unmask_total  # Flower's Shamir: not at validate

    revealed = {
        name: {
            owner: (kind, share)
            for owner, kind, share in rows.select(
                "strata_level", "estimate_name", "variable_level"
            ).iter_rows()
        }
        for name, rows in frames.items()
    }
    session = session_id(spec.id, state["roster"], state["threshold"])
    values = unmask_total(
        state["masked"], revealed, state["roster"], state["survivors"], state["threshold"], session
    )
    return layout(spec).with_columns(
        release_class=pl.lit("count"), value=pl.Series(values, dtype=pl.Float64)
    )


def _enough(count: int, threshold: int, what: str) -> None:
    """Fewer than the threshold: the sum cannot be completed; say so, release nothing."""
    if count < threshold:
        raise SecAggError(
            f"only {count} {what}, the threshold is {threshold}: the pooled sum cannot be "
            "completed (more nodes dropped than it tolerates)"
        )


def layout(spec: PooledCountsSpec) -> pl.DataFrame:
    """The rows of every node's vector, in the order every node sorts them (check row aside)."""
    return (
        grid(spec)
        .with_columns(variable_name=pl.lit(VARIABLE), estimate_name=pl.lit("count"))
        .sort([*ROW_ORDER, "estimate_name"])
    )


def _exact_total(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Plain counts summed (reference runs without gates, hence without noise or masks)."""
    keys = [*ROW_ORDER, "estimate_name", "release_class", "lower", "upper"]
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
