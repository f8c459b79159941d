"""The gate: the one code path through which anything leaves a node.

``Gate(policy).handle(request)`` checks, in order: the permit's signature (against the keys in the
node's own policy), its validity dates, the revocation lists, that it names this node, that the
study it carries hashes to the permit's study hash, that the analysis is permitted by the permit
and by the policy, and that budget is left. Only then does the node compile the study itself
(``studies.runner.local_step``), apply disclosure control and DP noise, charge the ledger
durably, write the audit entry, and release the statistics. Any failure is a refusal with a
reason, audited, with nothing released.

The request is untrusted: the study is re-validated and re-hashed here, the permit is parsed
strictly from its signed body, and nothing else in the message (state aside, which only the
analysis reads) influences what the gate does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from node.audit import AuditLog
from node.limits import bounded_text
from node.messages import GateReply, GateRequest
from node.overlap import (
    EntrySet,
    OverlapRecord,
    OverlapRefusal,
    check_pairs,
    cohort_entries,
    period_entries,
    released_strata,
    strata_entries,
)
from node.policy import Policy
from node.transcript import Claim, Expected, TranscriptError, sign, state_sha256
from node.transcript import verify as verify_transcript
from privacy.accounting import AccountingError, effective_delta, epsilon_to_rho, rho_to_epsilon
from privacy.disclosure import DisclosureRefusal, protect, withhold_keyed
from privacy.dp import DpError, check_rows_per_person, noise_statistics, rows_per_person
from privacy.ledger import Budget, BudgetExhausted, Ledger, Release
from studies.canonical import study_hash
from studies.cohorts import OverlappingPeriods, cohort_ids
from studies.model import Study, StudyError, study_from_data
from studies.permit import (
    PermitAnalysis,
    PermitBody,
    PermitError,
    canonical_json,
    verify_permit,
    verify_revocations,
)
from studies.permit import read_json as read_signed
from studies.results import SEP
from studies.rounds import RoundError, missing_identities, next_state, profile_of, states_agree
from studies.runner import local_step, prepare_cdm
from studies.statistics import from_ipc, to_ipc

if TYPE_CHECKING:
    from privacy.dpsgd import RoundCharge

LOG = logging.getLogger("fedomop.node.gate")

REGRESSION_KINDS = frozenset({"glm", "cox"})
"""Analysis kinds whose value rows are model fits: DataSHIELD-style guards apply
(``privacy.disclosure.regression_guards``: a Cox model counts its ``event_sum`` rows).
"""
DP_TRAINING_KIND = "dp_sgd"
"""The analysis kind (and permit mechanism) whose weights are made DP by training itself."""

SIGNED = "_signed"
"""Key of the node's signed claim in a stored release's settings (moved to the reply's fields)."""


class Refusal(Exception):
    """A request the gate will not answer; the message is the reason sent back and audited."""


@dataclass
class _Checked:
    """What the checks established about a request, for the audit entry."""

    request_id: str = ""
    permit_id: str = ""
    study_hash: str = ""


class Gate:
    """A node's gate, bound to its policy, ledger and audit log.

    ``after_charge`` is called with the request id once the ledger has committed a charge and
    before the audit and release; the crash tests use it to kill the process at that point.
    """

    def __init__(
        self, policy: Policy, *, after_charge: Callable[[str], None] | None = None
    ) -> None:
        self.policy = policy
        self.ledger = Ledger(policy.ledger_path)
        self.audit = AuditLog(policy.audit_path)
        self.overlap = OverlapRecord(policy.overlap_path)
        self._entry_cache: dict[tuple[str, str, str], list[EntrySet]] = {}
        self._after_charge = after_charge
        self._cdm_lock = threading.Lock()
        self._cdm: tuple[tuple[int, ...], duckdb.DuckDBPyConnection] | None = None

    def _local_step(
        self, study: Study, analysis_id: str, state: Any, min_cell: int | None = None
    ) -> pl.DataFrame:
        """``local_step`` on a read-only CDM connection kept open while the file is unchanged.

        The open connection keeps the study's materialised cohorts, so the rounds of a GLM and
        repeated questions skip compiling them; a rebuilt CDM (``omop_etl.build.atomic_build``
        replaces the file) is reopened on the next request.
        """
        with self._cdm_lock:
            con = self._connection()
            return local_step(
                con,
                study,
                analysis_id,
                state,
                self.policy.node_name,
                min_cell or self.policy.min_cell_count,  # hook (wt/cox): the time axis reads k
            )

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """The read-only CDM connection, reopened when the file was replaced (hold the lock)."""
        info = os.stat(self.policy.cdm_path)
        stamp = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        if self._cdm is None or self._cdm[0] != stamp:
            if self._cdm is not None:
                self._cdm[1].close()
            self._cdm = (stamp, duckdb.connect(str(self.policy.cdm_path), read_only=True))
        return self._cdm[1]

    def _entry_sets(self, study: Study, spec: Any) -> list[EntrySet]:
        """The sets of persons the analysis releases counts of (``node.overlap``): its cohorts,
        their strata, its prevalence periods; read once per analysis and CDM."""
        key = (study_hash(study), spec.id, self._snapshot())
        sets = self._entry_cache.get(key)
        if sets is None:
            named = {name for _, name in spec.cohort_references()}
            ids = {name: i for name, i in cohort_ids(study).items() if name in named}
            with self._cdm_lock:
                con = self._connection()
                prepare_cdm(con, study, self.policy.node_name)
                sets = cohort_entries(con, ids, study.name)
                sets += strata_entries(con, ids, spec, study.name)
                sets += period_entries(con, ids, spec, study.name)
            self._entry_cache = {key: sets}
        return sets

    def _check_overlap(
        self, sets: list[EntrySet], statistics: pl.DataFrame, min_cell: int
    ) -> list[EntrySet]:
        """The sets this release shows, checked against one another and every set released
        exactly before; refused when two overlap and differ by 1 to k-1 entries."""
        shown = released_strata(sets, statistics)
        try:
            check_pairs(shown, self.overlap.released(), min_cell)
        except OverlapRefusal as err:
            raise Refusal(str(err)) from err
        return shown

    def handle(self, request: GateRequest) -> GateReply:
        """Answer one request: released statistics or a refusal with its reason; always audited."""
        checked = _Checked()
        try:
            return self._answer(request, checked)
        except Refusal as refusal:
            reason = str(refusal)
        except AccountingError as err:  # a loss that is no loss (negative, NaN): never free
            reason = f"privacy accounting refused this release: {err}"
        except OverlappingPeriods as err:  # a cohort the declared bounds do not cover
            reason = f"study refused: {err}"
        except Exception as err:  # an analysis or I/O failure: refuse, never leak a traceback
            LOG.exception("gate request failed")
            reason = f"node error while answering: {type(err).__name__}"
        reason = bounded_text(reason)  # never echo a payload: head, length and SHA-256 only
        entry = self.audit.append(_audit_record(request, checked, verdict="refused", reason=reason))
        return GateReply(
            node_name=self.policy.node_name, released=False, reason=reason, audit_hash=entry["hash"]
        )

    # --- the checks, in the order the design fixes ---------------------------------------------

    def _answer(self, request: GateRequest, checked: _Checked) -> GateReply:
        permit = self._verified_permit(request.permit)
        checked.permit_id = permit.permit_id
        _check_dates(permit, datetime.now(UTC).date())
        self._check_not_revoked(permit)
        if self.policy.node_name not in permit.nodes:
            raise Refusal(f"permit {permit.permit_id} does not name node {self.policy.node_name!r}")
        study = _verified_study(request.study, permit)
        checked.study_hash = permit.study_hash
        spec, grant = self._permitted_analysis(study, permit, request.analysis_id)
        state, basis = self._derived_state(study, spec, grant, permit, request)
        checked.request_id = _request_id(permit, request, self.policy.node_name, state, basis)
        stored = self.ledger.lookup(checked.request_id)
        if stored is not None:  # charged before a crash: release the same answer, never a new one
            return self._release(request, checked, stored, replayed=True)
        self._check_round_open(permit, request, checked.request_id)
        budget = self._budget(permit, grant)
        training = self._training_charge(permit, grant, spec, state)
        cost = grant.cost_rho() if training is None else training.rho
        self._check_budget_left(permit, grant, budget, cost)
        exact = training is None and grant.mechanism == "none"
        statistics, settings = self._compute(request, study, spec, grant, permit, training, state)
        sets = self._entry_sets(study, spec) if exact else []
        shown = self._check_overlap(sets, statistics, self._min_cell(permit))
        claim = self._claim(permit, request, state, basis, statistics)
        fresh = self._new_release(request, checked, permit, statistics, settings, claim)
        release = self._charge(fresh, budget, permit, training)
        self.overlap.add(shown, permit.permit_id, checked.request_id)  # before it leaves
        if self._after_charge is not None:
            self._after_charge(checked.request_id)
        # a concurrent twin of this request may have been charged first: release its answer
        return self._release(request, checked, release, replayed=release is not fresh)

    # --- the round's state: derived here from the signed transcript, never taken on trust -------

    def _derived_state(
        self,
        study: Study,
        spec: Any,
        grant: PermitAnalysis,
        permit: PermitBody,
        request: GateRequest,
    ) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
        """The state this round computes on and the nodes whose releases gave it.

        Round 0's state comes from the study alone (none). A later round's request carries the
        previous round's transcript: the node verifies every signature and claim
        (``node.transcript.verify``), derives the state with the analysis's own ``combine``
        (``studies.rounds.next_state``) and refuses a request whose state differs.
        """
        round_ = request.round
        if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
            raise Refusal("the request's round must be a whole number >= 0")
        limit = _round_limit(spec, grant)
        if round_ >= limit:
            raise Refusal(
                f"analysis {spec.id!r} has at most {limit} round(s): round {round_} is refused"
            )
        missing = missing_identities(study, permit)
        if missing:
            raise Refusal(
                f"permit {permit.permit_id} grants a multi-round analysis but binds no identity "
                f"key for nodes {missing}: their releases could not be verified"
            )
        if round_ == 0:
            if request.state is not None or request.transcript is not None:
                raise Refusal("round 0's state comes from the study alone: the request sent one")
            return None, ()
        if request.transcript is None:
            raise Refusal(f"round {round_} needs the transcript of round {round_ - 1}")
        expected = Expected(
            permit.permit_id,
            permit.study_hash,
            spec.id,
            round_ - 1,
            self.policy.node_name,
            self._snapshot(),
            self.policy.privacy.min_nodes,
        )
        try:
            previous, released = verify_transcript(request.transcript, expected, permit.node_keys)
            tables = {node: from_ipc(payload) for node, payload in released.items()}
            derived = next_state(spec, tables, previous)
        except (TranscriptError, RoundError) as err:
            raise Refusal(f"transcript refused: {err}") from err
        except (ValueError, OSError) as err:  # unreadable Arrow bytes in a signed release
            raise Refusal(
                f"transcript refused: a release's statistics are unreadable: {err}"
            ) from err
        if not states_agree(derived, request.state):
            raise Refusal(
                f"the state sent for round {round_} is not the one its transcript gives: refused"
            )
        return request.state, tuple(sorted(released))

    def _min_cell(self, permit: PermitBody) -> int:
        """The stricter of the policy's and the permit's minimum cell count."""
        return max(self.policy.min_cell_count, permit.min_cell_count)

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

    def _claim(
        self,
        permit: PermitBody,
        request: GateRequest,
        state: dict[str, Any] | None,
        basis: tuple[str, ...],
        statistics: pl.DataFrame,
    ) -> Claim:
        return Claim(
            permit_id=permit.permit_id,
            study_hash=permit.study_hash,
            analysis_id=request.analysis_id,
            round=request.round,
            node=self.policy.node_name,
            state_sha256=state_sha256(state),
            basis=basis,
            snapshot=self._snapshot(),
            payload_sha256=hashlib.sha256(to_ipc(statistics)).hexdigest(),
        )

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
        epsilon. A loss that is negative or not finite is refused, never booked as free.
        """
        trains = spec.kind == DP_TRAINING_KIND
        if trains != (grant.mechanism == DP_TRAINING_KIND):
            raise Refusal(
                f"analysis {grant.id!r} of kind {spec.kind!r} cannot be released under "
                f"mechanism {grant.mechanism!r}: DP-SGD models need mechanism 'dp_sgd', "
                "and only they"
            )
        if not trains:
            return None
        from privacy.dpsgd import round_charge

        try:
            delta = self._delta(permit)
            zcdp, histories = self.ledger.permit_accountant(permit.permit_id)
            previous = histories.pop(f"{permit.permit_id}|{grant.id}", [])
            charge = round_charge(
                previous,
                spec.accountant_step(state),
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

    # --- compute, protect, charge, release -----------------------------------------------------

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
        """
        min_cell = self._min_cell(permit)
        if profile_of(spec).pooled:  # masked noise shares, suppression at the total only
            return self._pooled(request, study, grant, permit, min_cell, state)
        raw = self._local_step(study, request.analysis_id, state, min_cell)
        if grant.mechanism == "none" and profile_of(spec).multi_round:
            _check_values_per_record(raw, request.round)
        regression = spec.kind in REGRESSION_KINDS
        settings: dict[str, Any] = {"min_cell_count": min_cell, "mechanism": grant.mechanism}
        try:
            if training is not None:
                protected, disclosure = _protect_training(raw, min_cell, spec, grant, training)
                settings.update(training.settings())
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

    noise = PermitAnalysis(
        id=grant.id, mechanism="gaussian", cost=training.count_rho, max_rows_per_person=1
    )
    min_rows = spec.min_persons if training.trains else min_cell  # hold-outs are smaller
    declared = profile_of(spec).rows_per_person
    return protect_round(raw, min_cell, min_rows, noise, training.count_rho, declared)


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


def _check_values_per_record(raw: pl.DataFrame, round_: int) -> None:
    """Exact model values over all rounds so far may not outnumber the records they summarise.

    Each round of an exact multi-round analysis releases sums (score, information, risk sets)
    at new coefficients; enough of them determine the records (Huth et al. 2023 reconstruct
    DataSHIELD ``ds.glm`` inputs this way), so the node stops before they could.
    """
    values = raw.filter(pl.col("kind") == "value").height
    records = raw.filter((pl.col("variable_name") == "records") & (pl.col("kind") == "count"))
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
