"""The gate's request checks: permit, dates, revocations, study hash, grant, policy, budget.

Each check raises ``Refusal`` with the reason the node sends back and audits. ``GateChecks``
holds the checks that need the node's policy and ledger; ``node.gate.Gate`` runs them in the
order the design fixes. Also here: the request's content id and its audit record.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from node.limits import bounded_text
from node.messages import GateRequest
from privacy.accounting import AccountingError, effective_delta, epsilon_to_rho, rho_to_epsilon
from privacy.dp import DpError, check_rows_per_person
from privacy.ledger import Budget, BudgetExhausted
from studies.canonical import study_hash
from studies.loading import study_from_data
from studies.model import Study, StudyError
from studies.permit import (
    PermitAnalysis,
    PermitBody,
    PermitError,
    canonical_json,
    verify_permit,
    verify_revocations,
)
from studies.permit import read_json as read_signed
from studies.rounds import profile_of

if TYPE_CHECKING:
    from privacy.dpsgd import RoundCharge


DP_TRAINING_KIND = "dp_sgd"
"""The analysis kind (and permit mechanism) whose weights are made DP by training itself."""


class Refusal(Exception):
    """A request the gate will not answer; the message is the reason sent back and audited."""


@dataclass
class _Checked:
    """What the checks established about a request, for the audit entry."""

    request_id: str = ""
    permit_id: str = ""
    study_hash: str = ""


class GateChecks:
    """The checks of ``Gate`` that read the node's policy and ledger (a mixin of ``Gate``)."""

    def _verified_permit(self, document: Any) -> PermitBody:
        try:
            return verify_permit(document, self.policy.keys)
        except PermitError as err:
            raise Refusal(f"permit refused: {err}") from err

    def _check_not_revoked(self, permit: PermitBody) -> None:
        for path in self.policy.trust.revocation_lists:
            try:
                revocations = verify_revocations(read_signed(path), self.policy.keys)
            except PermitError as err:  # fail closed: an unreadable list revokes everything
                raise Refusal(f"revocation list {path.name} unusable: {err}") from err
            same_issuer = revocations.issuer_key_id == permit.issuer_key_id
            if same_issuer and permit.permit_id in revocations.revoked_ids():
                raise Refusal(f"permit {permit.permit_id} has been revoked by its issuer")

    def _permitted_analysis(
        self, study: Study, permit: PermitBody, analysis_id: str
    ) -> tuple[Any, PermitAnalysis]:
        try:
            spec = study.analysis(analysis_id)
        except KeyError as err:
            raise Refusal(f"study has no analysis {analysis_id!r}") from err
        grant = permit.analysis(analysis_id)
        if grant is None:
            raise Refusal(f"permit {permit.permit_id} does not permit analysis {analysis_id!r}")
        if not self.policy.allows(spec.kind):
            raise Refusal(f"node policy does not allow analyses of kind {spec.kind!r}")
        try:  # the permit may raise the analysis's declared rows per person, never lower them
            check_rows_per_person(grant, profile_of(spec).rows_per_person)
        except DpError as err:
            raise Refusal(str(err)) from err
        if self.policy.privacy.require_dp and grant.mechanism == "none":
            raise Refusal(
                f"this node releases nothing exactly (policy require_dp): analysis {spec.id!r} "
                "needs a DP mechanism in the permit"
            )
        if self.policy.privacy.require_dp and profile_of(spec).pooled_exact:
            raise Refusal(  # a gaussian grant covers its guard sum only, not its exact sums
                f"this node releases nothing exactly (policy require_dp): analysis {spec.id!r} "
                "sums exact model statistics after its noisy guard sum"
            )
        self._check_granularity(spec)
        return spec, grant

    def _check_granularity(self, spec: Any) -> None:
        """Refuse cuts finer than the policy allows (age bands, time bins, calendar windows)."""
        cuts = profile_of(spec).granularity
        privacy = self.policy.privacy
        limits = (
            (cuts.age_band_years, privacy.min_age_band_years, "an age band", "year(s)"),
            (cuts.time_bin_days, privacy.min_time_bin_days, "a time bin", "day(s)"),
            (cuts.calendar_window_days, privacy.min_calendar_window_days, "a period", "day(s)"),
        )
        for cut, least, what, unit in limits:
            if cut is not None and cut < least:
                raise Refusal(
                    f"analysis {spec.id!r} cuts {what} of {cut} {unit}; this node's policy "
                    f"allows no less than {least} {unit}"
                )

    def _min_cell(self, permit: PermitBody) -> int:
        """The stricter of the policy's and the permit's minimum cell count."""
        return max(self.policy.min_cell_count, permit.min_cell_count)

    def _delta(self, permit: PermitBody) -> float:
        """The delta this node accounts OpenDP releases at: its policy's, which a permit may
        only lower (``privacy.accounting.effective_delta``)."""
        return effective_delta(self.policy.privacy.delta, permit.delta)

    def _budget(self, permit: PermitBody, grant: PermitAnalysis) -> Budget:
        """The tighter of the permit's grant and the node's own caps, in rho, at the node's
        delta (a permit may lower it, never raise it: ``effective_delta``)."""
        delta = self._delta(permit)
        permit_rho = epsilon_to_rho(permit.epsilon, delta)
        return Budget(
            permit_rho=min(permit_rho, self.policy.rho_per_permit()),
            year_rho=self.policy.rho_per_year(),
            max_releases=grant.max_releases,
            delta=delta,
        )

    def _check_budget_left(
        self, permit: PermitBody, grant: PermitAnalysis, budget: Budget, rho: float
    ) -> None:
        try:
            self.ledger.check(permit.permit_id, grant.id, rho, budget)
        except BudgetExhausted as err:
            raise Refusal(str(err)) from err

    def _training_charge(
        self, permit: PermitBody, grant: PermitAnalysis, spec: Any, state: Any
    ) -> RoundCharge | None:
        """DP-SGD's release path, the one place the gate treats it apart: None for others.

        A ``dp_sgd`` analysis needs a ``dp_sgd`` grant and vice versa. The release's loss is
        Opacus's RDP accountant over the history kept in the ledger for this permit and analysis
        plus what this request trains and the rho of its noisy counts (from the study alone,
        before any data is read), composed with the permit's other releases in one accountant
        at the node's delta (``privacy.dpsgd``); the grant's ``cost`` caps the analysis's own
        epsilon. The node trains at its own noise multiplier: the smallest whose planned rounds
        fit that cap and, after the permit's releases so far, the permit's and policy's epsilon,
        fixed in the ledger by the first round (``privacy.dpsgd.fixed_noise_multiplier``),
        unless the study states one; the node's yearly cap, after the year's releases under
        every permit, bounds it the same way (else a later round would be refused for the year).
        A loss that is negative or not finite is refused, never booked as free.

        Under a ``none`` grant a ``dp_sgd`` analysis is the non-private baseline: no charge here,
        only where the policy allows it (``_check_nonprivate_model``).
        """
        trains = spec.kind == DP_TRAINING_KIND
        if trains and grant.mechanism == "none":
            self._check_nonprivate_model(spec)
            return None  # the exact baseline: the regression guards decide (node.gate_release)
        if trains != (grant.mechanism == DP_TRAINING_KIND):
            raise Refusal(
                f"analysis {grant.id!r} of kind {spec.kind!r} cannot be released under "
                f"mechanism {grant.mechanism!r}: DP-SGD models need mechanism 'dp_sgd', "
                "and only they"
            )
        if not trains:
            return None
        from privacy.dpsgd import fixed_noise_multiplier, permit_entries, round_charge

        try:
            delta = self._delta(permit)
            zcdp, histories = self.ledger.permit_accountant(permit.permit_id)
            key = f"{permit.permit_id}|{grant.id}"
            previous = histories.pop(key, [])
            year_zcdp, year_histories = self.ledger.year_accountant(permit.permit_id)
            year_histories.pop(key, None)
            permit_cap = min(permit.epsilon, self.policy.privacy.max_epsilon_per_permit)
            sigma = fixed_noise_multiplier(
                previous,
                spec.noise_multiplier,
                spec.planned_history,
                grant.cost,
                delta,
                budgets=[  # what is left of the permit's and of the year's budget, both
                    (permit_cap, permit_entries(zcdp, list(histories.values()))),
                    (
                        rho_to_epsilon(self.policy.rho_per_year(), delta),
                        permit_entries(year_zcdp, list(year_histories.values())),
                    ),
                ],
            )
            charge = round_charge(
                previous,
                spec.accountant_step(state, sigma),
                spec.counts_rho(state),
                delta,
                permit_zcdp=zcdp,
                others=list(histories.values()),
            )
        except (AccountingError, ValueError) as err:
            raise Refusal(f"DP-SGD accounting refused: {err}") from err
        if charge.epsilon_after > grant.cost * (1 + 1e-9):
            raise Refusal(
                f"DP-SGD budget of analysis {grant.id!r} exhausted on this node: spent epsilon "
                f"{charge.epsilon_before:.4g} of {grant.cost:.4g}, this round would reach "
                f"{charge.epsilon_after:.4g}"
            )
        return charge

    def _check_nonprivate_model(self, spec: Any) -> None:
        """A model trained without noise leaves only where the policy opts in, and only as a
        logistic regression.

        Its release is exact, like a GLM's coefficients, so it passes the GLM's regression
        guards (``privacy.dpsgd.protect_nonprivate_round``). Those guards bound what a
        logistic model of few parameters gives away about a person (DataSHIELD's ``ds.glm``
        rules); they do not bound what a hidden layer memorises: a non-private MLP on a node
        that passes every guard still leaks membership measurably (``fedomop audit
        membership``, ``tests/test_dpsgd_baseline.py``), so an MLP trains only under DP-SGD.
        """
        if not self.policy.privacy.allow_nonprivate_models:
            raise Refusal(
                f"analysis {spec.id!r} asks for a model trained without noise (grant mechanism "
                "'none'); this node's policy does not allow non-private models "
                "([privacy] allow_nonprivate_models): DP-SGD models need mechanism 'dp_sgd'"
            )
        if spec.hidden:
            raise Refusal(
                f"analysis {spec.id!r} asks for a non-private MLP (hidden: {spec.hidden}): a "
                "hidden layer can memorise persons, which the regression guards do not bound; "
                "this node trains it only under mechanism 'dp_sgd' (a non-private baseline "
                "must be logistic, hidden: 0)"
            )

    def _snapshot(self) -> str:
        """An id of the CDM file as it is now (a rebuilt file gets another)."""
        info = os.stat(self.policy.cdm_path)
        stamp = f"{info.st_dev}:{info.st_ino}:{info.st_mtime_ns}:{info.st_size}"
        return hashlib.sha256(stamp.encode()).hexdigest()[:32]

    def _check_round_open(self, permit: PermitBody, request: GateRequest, request_id: str) -> None:
        """A round already released for another transcript stays closed (replays pass above)."""
        released = self.ledger.round_request(permit.permit_id, request.analysis_id, request.round)
        if released is not None and released != request_id:
            raise Refusal(
                f"round {request.round} of analysis {request.analysis_id!r} was released already "
                "under this permit for another transcript; a round is answered once"
            )


def _check_dates(permit: PermitBody, today: date) -> None:
    problem = permit.date_problem(today)
    if problem:
        raise Refusal(problem)


def _verified_study(raw: Any, permit: PermitBody) -> Study:
    """Validate the study in the message and check it is the one the permit was signed for."""
    try:
        study = study_from_data(raw)
    except StudyError as err:
        raise Refusal(f"study invalid: {err}") from err
    received = study_hash(study)
    if received != permit.study_hash:
        raise Refusal(
            f"study hash {received[:12]}... differs from the permit's {permit.study_hash[:12]}...: "
            "this is not the study that was permitted"
        )
    return study


def _round_limit(spec: Any, grant: PermitAnalysis) -> int:
    """Rounds the node answers: the analysis's declaration, lowered by the permit if it says so."""
    declared = profile_of(spec).max_rounds
    return min(declared, grant.max_rounds) if grant.max_rounds is not None else declared


def _request_id(
    permit: PermitBody,
    request: GateRequest,
    node_name: str,
    state: dict[str, Any] | None,
    basis: tuple[str, ...],
) -> str:
    """Content id of a request: the same question on the same permit gets the same answer.

    The question is the round on a state derived from the releases of ``basis``: the same
    transcript again is a replay; another transcript for the same round is another question.
    """
    key = {
        "node": node_name,
        "permit_id": permit.permit_id,
        "study_hash": permit.study_hash,
        "analysis_id": request.analysis_id,
        "round": int(request.round),
        "state": state,
        "basis": list(basis),
    }
    return hashlib.sha256(canonical_json(key)).hexdigest()


def _audit_record(
    request: GateRequest, checked: _Checked, *, verdict: str, reason: str
) -> dict[str, Any]:
    return {
        "request_id": checked.request_id,
        "permit_id": checked.permit_id,
        "study_hash": checked.study_hash,
        "analysis_id": str(request.analysis_id)[:200],
        "round": request.round if isinstance(request.round, int) else None,
        "verdict": verdict,
        "reason": bounded_text(reason),
        "rho_charged": 0.0,
        "payload_sha256": "",
    }
