"""``pooled_glm``: the GLM of ``glm`` fitted on score and information sums nobody sees per node.

``glm``'s federated Newton–Raphson releases each node's own score ``U_i`` and information
``I_i`` every round (as DataSHIELD's ``ds.glm`` does); with a handful of patients per node those
say much about them. ``pooled_glm`` sums them under secure aggregation instead, each sum one
dropout-tolerant secure sum (``studies.analyses.secure_sum``, five rounds):

1. **The guard sum** (epoch 0) first: per node the persons of the regression guards (records,
   each outcome level, each level of every binary covariate: ``glm.guard_person_counts``) with a
   discrete Gaussian noise share (OpenDP, as ``pooled_counts``: the same gate path,
   ``node.pooled``), in the 48-bit ring; the only charged release of the analysis (the grant's
   ``cost`` is its rho on the total). Every node derives the noisy totals itself from the signed
   masked vectors and revealed shares (the transcript rule), and ``combine`` goes on only when
   each is at least the largest minimum cell count the nodes announced; else the analysis fails
   naming the guard, and no node ever computed a score or an information matrix. The totals are
   carried in the state (``guards``), where each node's gate checks them once more against its
   own minimum cell count before it sends any model sum.
2. **One exact sum per Newton step** (epochs 1, 2, ...): the vector (exact guard counts,
   ``U_i``, upper triangle of ``I_i``, deviance) in fixed point in the 128-bit ring
   (``privacy.fixed_point``), no noise, nothing charged. The next step's coefficients follow from
   the unmasked sum by ``glm.newton_raphson``, the plain GLM's own step, each node deriving them
   itself; a fresh sum (new keys, seeds and shares: ``epoch``) starts. The fit equals ``glm`` on
   the same nodes to fixed-point rounding (2^-32 per entry).

Granted with mechanism ``gaussian`` only: ``cost`` is the guard sum's rho (``fedomop permit
review`` shows its formula and the charge per node); the Newton sums are exact, so the
coordinator learns the pooled ``U`` and ``I`` at each step (what the fitted model releases
anyway) once the noisy guards passed. The model is released only when the exact pooled
records, each outcome level and each level of every binary covariate number 0 or at least that
minimum cell count; else the analysis fails naming the guard. Noise can lift a true level below
k over k (at most a few noise sd below), so the exact check stays: the model is then withheld,
but those Newton sums were seen; the noise sd the guard grant sets is the margin.

As ``glm``, plus optional ``threshold`` / ``colluders`` as ``pooled_counts``. Study entry::

    - id: cf_model_pooled
      kind: pooled_glm
      family: binomial
      cohort: patients
      outcome: cystic_fibrosis
      outcome_window: {start: 0, end: 36500}
      covariates:
        - {type: age, center: 40, scale: 10}
        - {type: sex}

summarised_result: as ``glm`` (``number_nodes``: the nodes summed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from privacy.fixed_point import RING_BITS, decode
from privacy.secagg import ROW_ORDER, SecAggError
from studies.analyses.glm import Glm, fitted_model, guard_person_counts, newton_raphson
from studies.analyses.secure_sum import (
    GUARDS,
    SumPlan,
    Total,
    advance,
    count_reader,
    has_protocol_rows,
    next_sum,
    wide_reader,
)
from studies.analyses.specs import GlmSpec, PooledGlmSpec
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.registry import register

ROUNDS_PER_STEP = 5
"""One secure sum per Newton step (and one for the guards): keys, shares, masked, consistency,
reveal."""


def vector_rows(spec: GlmSpec) -> list[tuple[str, str, str]]:
    """(variable_name, variable_level, estimate_name) of the summed vector, in the order every
    node sorts its ``glm`` statistics: fixed by the spec alone."""
    p = len(spec.terms)
    rows = [(name, level, "count") for name, level in _guard_names(spec)]
    rows += [("score", str(i), "score") for i in range(p)]
    rows += [("information", f"{i},{j}", "information") for i in range(p) for j in range(i, p)]
    rows.append(("deviance", "", "deviance"))
    ordered = _with_cohort(spec, rows).sort([*ROW_ORDER, "estimate_name"])
    return list(ordered.select("variable_name", "variable_level", "estimate_name").iter_rows())


def guard_layout(spec: GlmSpec) -> pl.DataFrame:
    """The guard sum's rows (records, outcome levels, binary covariate levels), in the order
    every node sorts them (check row aside)."""
    rows = [(name, level, "count") for name, level in _guard_names(spec)]
    return (
        _with_cohort(spec, rows)
        .select(*ROW_ORDER, "estimate_name")
        .sort([*ROW_ORDER, "estimate_name"])
    )


def _guard_names(spec: GlmSpec) -> list[tuple[str, str]]:
    first = 1 if spec.intercept else 0
    binary = [first + k for k, c in enumerate(spec.covariates) if c.type != "age"]
    levels = ("1", "0") if spec.family == "binomial" else ("any", "none")
    return [("records", ""), *(("outcome", lvl) for lvl in levels)] + [
        (spec.terms[i], lvl) for i in binary for lvl in "10"
    ]


def _with_cohort(spec: GlmSpec, rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    frame = pl.DataFrame(rows, schema=["variable_name", "variable_level", "estimate_name"],
                         orient="row")  # fmt: skip
    return frame.with_columns(
        cohort=pl.lit(spec.cohort), strata_name=pl.lit("overall"), strata_level=pl.lit("overall")
    )


def guards_passed(state: Any) -> bool:
    """Whether a state lies past the guard sum (it carries the noisy guard totals)."""
    return isinstance(state, dict) and GUARDS in state


@register
class PooledGlm:
    """Newton–Raphson on securely summed score and information, after a noisy guard sum.

    The guard counts' noisy secure sum first (charged), then exact fixed-point sums (128-bit
    ring) of each Newton step's score and information.
    """

    kind = "pooled_glm"
    Spec = PooledGlmSpec

    def profile(self, spec: PooledGlmSpec) -> ReleaseProfile:
        """Five rounds for the guard sum and per Newton step. A person is in ``records``, in at
        most both outcome levels and both levels of each binary covariate (over several cohort
        entries): the guard sum's rows per person."""
        covariate_levels = len(guard_layout(spec)) - 3
        return ReleaseProfile(
            max_rounds=ROUNDS_PER_STEP * (spec.max_iterations + 1),
            rows_per_person=3 + covariate_levels,
            pooled=True,
            pooled_exact=True,
        )

    def local(self, cdm: CdmContext, spec: PooledGlmSpec, state: dict | None) -> pl.DataFrame:
        """In the guard sum the guards' persons; then ``glm``'s statistics at the coefficients
        of the state's ``fit`` (the first step: zeros); without gates (no ``phase``) ``glm``'s."""
        if isinstance(state, dict) and "phase" in state and not guards_passed(state):
            return guard_person_counts(cdm, spec)
        return Glm().local(cdm, spec, (state or {}).get("fit"))

    def combine(
        self, inputs: CombineInput, spec: PooledGlmSpec, state: dict | None
    ) -> Finished | NextRound:
        if not has_protocol_rows(inputs) and (state or {}).get("phase") is None:
            return _reference(inputs, spec, state)  # no gates: plain sums, the exact reference
        if not guards_passed(state):
            plan = SumPlan(
                spec.id, spec.threshold, spec.colluders, count_reader(guard_layout(spec))
            )
            step = advance(inputs, state, plan)
            return step if isinstance(step, NextRound) else _after_guards(step, spec)
        plan = SumPlan(
            spec.id, spec.threshold, spec.colluders, wide_reader(len(vector_rows(spec)), RING_BITS),
            RING_BITS,
        )  # fmt: skip
        step = advance(inputs, state, plan)
        if isinstance(step, NextRound):
            return step
        return _newton_step(step, spec)


def _after_guards(total: Total, spec: PooledGlmSpec) -> NextRound:
    """The first Newton sum, only when every noisy pooled guard total is at least k."""
    layout = guard_layout(spec).select("variable_name", "variable_level").iter_rows()
    small = [
        f"{name}={level}" if level else name
        for (name, level), total_ in zip(layout, total.values, strict=True)
        if total_ < total.min_cell_count
    ]
    if small:
        raise SecAggError(
            f"pooled_glm {spec.id}: noisy pooled guard counts below the minimum cell count "
            f"{total.min_cell_count} for {small}: no score or information is summed, nothing "
            "more is released"
        )
    return NextRound(next_sum(total.state, **{GUARDS: list(total.values)}))


def _newton_step(total: Total, spec: PooledGlmSpec) -> Finished | NextRound:
    """The plain GLM's step on the unmasked sums: a fresh sum at the next coefficients, or the
    fitted model (after the pooled guard counts pass)."""
    values = dict(zip(vector_rows(spec), decode(total.values, len(total.survivors)), strict=True))
    p = len(spec.terms)
    score = np.array([values[("score", str(i), "score")] for i in range(p)])
    info = np.zeros((p, p))
    for i in range(p):
        for j in range(i, p):
            info[i, j] = info[j, i] = values[("information", f"{i},{j}", "information")]
    fit_state = total.state.get("fit")
    step = newton_raphson(
        f"pooled_glm {spec.id}",
        spec.terms,
        fit_state,
        score,
        info,
        values[("deviance", "", "deviance")],
        spec.tolerance,
        spec.max_iterations,
    )
    if isinstance(step, NextRound):
        return NextRound(next_sum(total.state, fit=step.state))
    counts = {k: round(v) for k, v in values.items() if k[2] == "count"}
    _check_guards(counts, total.min_cell_count, spec)
    records = counts[("records", "", "count")]
    return Finished(fitted_model(spec, step, records, len(total.survivors)))


def _check_guards(counts: dict[tuple[str, str, str], int], k: int, spec: PooledGlmSpec) -> None:
    """The pooled records, outcome levels and binary covariate levels: 0 or at least k."""
    small = [f"{name}={level}" for (name, level, _), n in counts.items() if 0 < n < k]
    if small:
        raise SecAggError(
            f"pooled_glm {spec.id}: pooled counts below the minimum cell count {k} for "
            f"{small}: the model is not released"
        )


def _reference(
    inputs: CombineInput, spec: PooledGlmSpec, state: dict | None
) -> Finished | NextRound:
    """Without gates the nodes answer plain ``glm`` statistics: ``glm``'s own combine on them."""
    outcome = Glm().combine(inputs, spec, (state or {}).get("fit"))
    if isinstance(outcome, NextRound):
        return NextRound({"fit": outcome.state})
    return outcome
