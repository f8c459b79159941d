"""The gate's release path: compute locally, protect (suppression, DP noise), charge, release.

``ReleaseSteps`` (a mixin of ``node.gate.Gate``) runs the analysis on the node's CDM, applies
disclosure control and OpenDP noise (or DP-SGD's own guarantee, or pooled mode's masked noise
shares), charges the ledger durably and writes the audit entry before anything leaves.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from node.gate_checks import DP_TRAINING_KIND, Refusal, _audit_record, _Checked
from node.messages import GateReply, GateRequest
from node.transcript import Claim, sign
from privacy.accounting import rho_to_epsilon
from privacy.disclosure import DisclosureRefusal, protect, withhold_keyed
from privacy.dp import DpError, noise_statistics, rows_per_person
from privacy.ledger import Budget, BudgetExhausted, Release
from studies.model import Study
from studies.permit import (
    PermitAnalysis,
    PermitBody,
)
from studies.results import SEP
from studies.rounds import profile_of
from studies.statistics import to_ipc

if TYPE_CHECKING:
    from privacy.dpsgd import RoundCharge

REGRESSION_KINDS = frozenset({"glm", "cox"})
"""Analysis kinds whose value rows are model fits: DataSHIELD-style guards apply
(``privacy.disclosure.regression_guards``: a Cox model counts its ``event_sum`` rows).
"""

SIGNED = "_signed"
"""Key of the node's signed claim in a stored release's settings (moved to the reply's fields)."""


class ReleaseSteps:
    """The release side of ``Gate``: compute, protect, charge, release."""

    def _compute(
        self,
        request: GateRequest,
        study: Study,
        spec: Any,
        grant: Any,
        permit: PermitBody,
        training: RoundCharge | None,
        state: dict[str, Any] | None,
    ) -> tuple[pl.DataFrame, dict[str, Any]]:
        """Run the analysis locally, then disclosure control and noise; the settings say what.

        DP-SGD weights (``training``) are already DP; the node takes part only if its exact
        counts pass the guards, and the counts it releases get OpenDP noise (``_protect_training``).
        A ``dp_sgd`` analysis without a charge is the non-private baseline (a ``none`` grant the
        policy allows): it trains without noise and is released exactly, as a GLM is.
        """
        min_cell = self._min_cell(permit)
        if profile_of(spec).pooled:  # masked noise shares, suppression at the total only
            return self._pooled(request, study, grant, permit, min_cell, state)
        from privacy.dpsgd import NON_PRIVATE

        baseline = training is None and spec.kind == DP_TRAINING_KIND  # a none grant (checked)
        sigma = training.noise_multiplier if training is not None and training.trains else None
        sigma = NON_PRIVATE if baseline else sigma
        raw = self._local_step(study, request.analysis_id, state, min_cell, sigma)
        if grant.mechanism == "none" and profile_of(spec).multi_round:
            _check_values_per_record(raw, request.round)
        regression = spec.kind in REGRESSION_KINDS
        settings: dict[str, Any] = {"min_cell_count": min_cell, "mechanism": grant.mechanism}
        try:
            if training is not None:
                protected, disclosure = _protect_training(raw, min_cell, spec, grant, training)
                settings.update(training.settings())
            elif baseline:  # an exact model: the GLM's regression guards, then suppression
                protected, disclosure = _protect_baseline(raw, min_cell, spec, state)
                settings.update(noise_scale=0.0, rho_charged=0.0, epsilon_charged=0.0)
            elif grant.mechanism == "none":
                protected, disclosure = protect(raw, min_cell, regression=regression)
                settings.update(noise_scale=0.0, rho_charged=0.0, epsilon_charged=0.0)
            else:  # noise first: suppressing on noisy counts is post-processing, DP stays intact
                rows = profile_of(spec).rows_per_person
                noisy, noise = noise_statistics(raw, grant, declared_rows=rows)
                protected, disclosure = protect(noisy, min_cell, regression=regression)
                settings.update(
                    noise_scale=noise.scale,
                    rho_charged=noise.rho,
                    epsilon_charged=rho_to_epsilon(noise.rho, self._delta(permit)),
                    delta=self._delta(permit),
                    rows_per_person=rows_per_person(rows, grant.max_rows_per_person),
                    values_withheld=noise.values_withheld,
                )
        except (DisclosureRefusal, DpError) as err:
            raise Refusal(str(err)) from err
        under_dp = training is None and grant.mechanism != "none"
        protected, keyed = withhold_keyed(
            protected, _keyed(spec, request.round), all_keyed=under_dp
        )
        if not under_dp:  # under DP even their number would tell how many keys exist
            settings["withheld_keyed_groups"] = keyed
        settings.update(
            suppressed_cells=disclosure.suppressed_cells + disclosure.complementary_cells,
            complementary_cells=disclosure.complementary_cells,
            suppressed_derived=disclosure.derived_rows,
        )
        return protected, settings

    def _pooled(
        self,
        request: GateRequest,
        study: Study,
        grant: PermitAnalysis,
        permit: PermitBody,
        min_cell: int,
        state: dict[str, Any] | None,
    ) -> tuple[pl.DataFrame, dict[str, Any]]:
        """Pooled mode's release policy: noise share, masks, charge; suppression at the total.

        The permit allows it by granting the pooled analysis mechanism ``gaussian`` and binding
        every node's pooling identity (``node_keys``), which every roster key must be signed
        by; the ephemeral key comes from a node secret kept beside the ledger. The charge is
        the loss of the policy's ``min_honest_nodes`` summed noise shares.
        """
        from node.pooled import PooledNode, pooled_release
        from privacy.secagg import SecAggError, node_secret

        node = PooledNode(
            name=self.policy.node_name,
            secret=node_secret(self.policy.secret_path),
            context=f"{permit.permit_id}|{permit.study_hash}|{request.analysis_id}",
            analysis_id=request.analysis_id,
            min_cell_count=min_cell,
            permitted=permit.nodes,
            identities=permit.node_keys,
            min_honest=self.policy.privacy.min_honest_nodes,
            declared_rows=profile_of(study.analysis(request.analysis_id)).rows_per_person,
            exact_allowed=profile_of(study.analysis(request.analysis_id)).pooled_exact,
        )
        try:
            statistics, settings = pooled_release(
                lambda: self._local_step(study, request.analysis_id, state),
                state,
                grant,
                node,
            )
        except (SecAggError, DpError) as err:
            raise Refusal(str(err)) from err
        rho = float(settings["rho_charged"])
        epsilon = rho_to_epsilon(rho, self._delta(permit))
        return statistics, settings | {
            "min_cell_count": min_cell,
            "mechanism": grant.mechanism,
            "epsilon_charged": epsilon,
            "delta": self._delta(permit),
        }

    def _new_release(
        self,
        request: GateRequest,
        checked: _Checked,
        permit: PermitBody,
        statistics: pl.DataFrame,
        settings: dict[str, Any],
        claim: Claim,
    ) -> Release:
        """The release to charge: payload, settings and the node's signed claim about it."""
        payload = to_ipc(statistics)
        settings = {
            SIGNED: {
                "claim": claim.to_json(),
                "signature": sign(self.policy.identity_key(), claim),
            },
            **settings,
            "permit_id": permit.permit_id,
            "study_hash": permit.study_hash,
            "node_name": self.policy.node_name,
            "request_id": checked.request_id,
        }
        return Release(
            request_id=checked.request_id,
            permit_id=permit.permit_id,
            analysis_id=request.analysis_id,
            rho=float(settings["rho_charged"]),
            charged_at=datetime.now(UTC).isoformat(),
            payload=payload,
            payload_hash=hashlib.sha256(payload).hexdigest(),
            settings=settings,
            round=request.round,
        )

    def _charge(
        self, release: Release, budget: Budget, permit: PermitBody, training: RoundCharge | None
    ) -> Release:
        accountant = training.ledger_update() if training is not None else None
        try:
            return self.ledger.charge(
                release,
                budget,
                (permit.epsilon, self._delta(permit), permit.valid_until.isoformat()),
                accountant,
            )
        except BudgetExhausted as err:
            raise Refusal(str(err)) from err

    def _release(
        self, request: GateRequest, checked: _Checked, release: Release, *, replayed: bool
    ) -> GateReply:
        record = _audit_record(request, checked, verdict="released", reason="")
        record.update(  # a replay charges nothing now; the ledger's charge is named with it
            rho_charged=0.0 if replayed else release.rho,
            payload_sha256=release.payload_hash,
            replayed=replayed,
            ledger_rho=release.rho,
            charged_at=release.charged_at,
        )
        entry = self.audit.append(record)
        settings = dict(release.settings)
        signed = settings.pop(SIGNED, {})
        return GateReply(
            node_name=self.policy.node_name,
            released=True,
            statistics=release.payload,
            settings={**settings, "replayed": replayed},
            audit_hash=entry["hash"],
            claim=signed.get("claim", {}),
            signature=signed.get("signature", ""),
        )


def _protect_training(
    raw: pl.DataFrame, min_cell: int, spec: Any, grant: PermitAnalysis, training: RoundCharge
) -> tuple[pl.DataFrame, Any]:
    """A DP-SGD release: participation guards, then DP weights and OpenDP-noised counts whose
    rho the charge already holds (``privacy.dpsgd.protect_round``)."""
    from privacy.dpsgd import protect_round
    from studies.analyses.dpsgd import accounting_rows

    noise = PermitAnalysis(
        id=grant.id, mechanism="gaussian", cost=training.count_rho, max_rows_per_person=1
    )
    min_rows = spec.min_persons if training.trains else min_cell  # hold-outs are smaller
    declared = profile_of(spec).rows_per_person
    released, report = protect_round(raw, min_cell, min_rows, noise, training.count_rho, declared)
    # the node's epsilon after this release, signed with it: the result's epsilon per round
    return pl.concat([released, accounting_rows(spec, training.settings())]), report


def _protect_baseline(
    raw: pl.DataFrame, min_cell: int, spec: Any, state: dict[str, Any] | None
) -> tuple[pl.DataFrame, Any]:
    """The non-private baseline's release: participation and the GLM's regression guards on
    the exact counts, then the weights and suppressed counts (``protect_nonprivate_round``)."""
    from privacy.dpsgd import protect_nonprivate_round
    from studies.analyses.specs import TRAIN, phase

    min_rows = spec.min_persons if phase(state) == TRAIN else min_cell  # hold-outs are smaller
    return protect_nonprivate_round(raw, min_cell, min_rows)


def _check_values_per_record(raw: pl.DataFrame, round_: int) -> None:
    """Exact model values over all rounds so far may not outnumber the records they summarise.

    Each round of an exact multi-round analysis releases sums (score, information, risk sets)
    at new coefficients; enough of them determine the records (Huth et al. 2023 reconstruct
    DataSHIELD ``ds.glm`` inputs this way), so the node stops before they could.
    """
    values = raw.filter(pl.col("release_class") == "value").height
    records = raw.filter(
        (pl.col("variable_name") == "records") & (pl.col("release_class") == "count")
    )
    if not values or records.is_empty():
        return
    total, n = (round_ + 1) * values, float(records["value"].sum())
    if total > n:
        raise Refusal(
            f"round {round_} would bring the model values released to {total}, more than the "
            f"{n:.0f} records they summarise: refused, as such a series can reconstruct them"
        )


def _keyed(spec: Any, round_: int) -> pl.Expr:
    """Rows whose key the analysis declares to come from the data (its release profile); after
    round 0 the analysis's variables are keyed by the state the transcript derives, not data."""
    profile = profile_of(spec)
    strata = pl.lit(False)
    for name in profile.data_keyed_strata:
        strata = strata | pl.col("strata_name").str.split(SEP).list.contains(name)
    variables = list(profile.data_keyed) if round_ == 0 else []
    return pl.col("variable_name").is_in(variables) | strata
