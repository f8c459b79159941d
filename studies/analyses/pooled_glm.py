"""``pooled_glm``: the GLM of ``glm`` fitted on score and information sums nobody sees per node.

``glm``'s federated Newton–Raphson releases each node's own score ``U_i`` and information
``I_i`` every round (as DataSHIELD's ``ds.glm`` does); with a handful of patients per node those
say much about them. ``pooled_glm`` sums them under secure aggregation instead: each Newton step
is one dropout-tolerant secure sum (``studies.analyses.secure_sum``, five rounds) of the vector
(guard counts, ``U_i``, upper triangle of ``I_i``, deviance) in fixed point in the 128-bit ring
(``privacy.fixed_point``), so the coordinator sees uniform masked vectors and the sum, nothing
else. The next step's coefficients follow from the unmasked sum by ``glm.newton_raphson``, the
plain GLM's own step: each node derives them itself from the signed masked vectors and the
revealed shares (the transcript rule), and a fresh sum (new keys, seeds and shares: ``epoch``)
starts. The fit equals ``glm`` on the same nodes to fixed-point rounding (2^-32 per entry).

Granted without noise only (mechanism ``none``): the sums are exact, the coordinator learns the
pooled ``U`` and ``I`` at each step (what the fitted model releases anyway) and the pooled guard
counts. The model is released only when the pooled records, each outcome level and each level
of every binary covariate number 0 or at least the largest minimum cell count the nodes
announced; else the analysis fails naming the guard.

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

import numpy as np
import polars as pl

from privacy.fixed_point import RING_BITS, decode
from privacy.secagg import ROW_ORDER, SecAggError
from studies.analyses.glm import Glm, fitted_model, newton_raphson
from studies.analyses.secure_sum import (
    SumPlan,
    Total,
    advance,
    has_protocol_rows,
    next_sum,
    wide_reader,
)
from studies.analyses.specs import GlmSpec, PooledGlmSpec
from studies.analysis import CdmContext, CombineInput, Finished, NextRound, ReleaseProfile
from studies.registry import register

ROUNDS_PER_STEP = 5
"""One secure sum per Newton step: keys, shares, masked, consistency, reveal."""


def vector_rows(spec: GlmSpec) -> list[tuple[str, str, str]]:
    """(variable_name, variable_level, estimate_name) of the summed vector, in the order every
    node sorts its ``glm`` statistics: fixed by the spec alone."""
    p = len(spec.terms)
    first = 1 if spec.intercept else 0
    binary = [first + k for k, c in enumerate(spec.covariates) if c.type != "age"]
    levels = ("1", "0") if spec.family == "binomial" else ("any", "none")
    rows = [("records", "", "count")] + [("outcome", lvl, "count") for lvl in levels]
    rows += [(spec.terms[i], lvl, "count") for i in binary for lvl in "10"]
    rows += [("score", str(i), "score") for i in range(p)]
    rows += [("information", f"{i},{j}", "information") for i in range(p) for j in range(i, p)]
    rows.append(("deviance", "", "deviance"))
    frame = pl.DataFrame(rows, schema=["variable_name", "variable_level", "estimate_name"],
                         orient="row")  # fmt: skip
    ordered = frame.with_columns(
        cohort=pl.lit(spec.cohort), strata_name=pl.lit("overall"), strata_level=pl.lit("overall")
    ).sort([*ROW_ORDER, "estimate_name"])
    return list(ordered.select("variable_name", "variable_level", "estimate_name").iter_rows())


@register
class PooledGlm:
    """Newton–Raphson on securely summed score and information (fixed point, 128-bit ring)."""

    kind = "pooled_glm"
    Spec = PooledGlmSpec

    def profile(self, spec: PooledGlmSpec) -> ReleaseProfile:
        """Five rounds per Newton step; exact grants only (the coordinator sees the sums)."""
        return ReleaseProfile(
            max_rounds=ROUNDS_PER_STEP * spec.max_iterations, pooled=True, pooled_exact=True
        )

    def local(self, cdm: CdmContext, spec: PooledGlmSpec, state: dict | None) -> pl.DataFrame:
        """``glm``'s statistics at the coefficients of the state's ``fit`` (step 0: zeros)."""
        return Glm().local(cdm, spec, (state or {}).get("fit"))

    def combine(
        self, inputs: CombineInput, spec: PooledGlmSpec, state: dict | None
    ) -> Finished | NextRound:
        if not has_protocol_rows(inputs) and (state or {}).get("phase") is None:
            return _reference(inputs, spec, state)  # no gates: plain sums, the exact reference
        plan = SumPlan(
            spec.id, spec.threshold, spec.colluders, wide_reader(len(vector_rows(spec)), RING_BITS),
            RING_BITS,
        )  # fmt: skip
        step = advance(inputs, state, plan)
        if isinstance(step, NextRound):
            return step
        return _newton_step(step, spec)


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
