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
from node.messages import GateReply, GateRequest
from node.policy import Policy
from privacy.accounting import epsilon_to_rho, rho_to_epsilon
from privacy.disclosure import DisclosureRefusal, protect
from privacy.dp import DpError, noise_statistics
from privacy.ledger import Budget, BudgetExhausted, Ledger, Release
from studies.canonical import study_hash
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
from studies.runner import local_step
from studies.statistics import to_ipc

if TYPE_CHECKING:
    from privacy.dpsgd import RoundCharge

LOG = logging.getLogger("fedomop.node.gate")

REGRESSION_KINDS = frozenset({"glm", "cox"})
"""Analysis kinds whose value rows are model fits: DataSHIELD-style guards apply
(``privacy.disclosure.regression_guards``: a Cox model counts its ``event_sum`` rows).
"""
DP_TRAINING_KIND = "dp_sgd"
"""The analysis kind (and permit mechanism) whose weights are made DP by training itself."""
POOLED_KINDS = frozenset({"pooled_counts"})
"""Analysis kinds released in pooled mode (``privacy.secagg.pooled_release``): noise share and
masks for a secure sum, no per-node cell suppression (the coordinator suppresses the total)."""


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
        self._after_charge = after_charge
        self._cdm_lock = threading.Lock()
        self._cdm: tuple[tuple[int, ...], duckdb.DuckDBPyConnection] | None = None

    def _local_step(self, study: Study, analysis_id: str, state: Any) -> pl.DataFrame:
        """``local_step`` on a read-only CDM connection kept open while the file is unchanged.

        The open connection keeps the study's materialised cohorts, so the rounds of a GLM and
        repeated questions skip compiling them; a rebuilt CDM (``omop_etl.build.atomic_build``
        replaces the file) is reopened on the next request.
        """
        info = os.stat(self.policy.cdm_path)
        stamp = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        with self._cdm_lock:
            if self._cdm is None or self._cdm[0] != stamp:
                if self._cdm is not None:
                    self._cdm[1].close()
                self._cdm = (stamp, duckdb.connect(str(self.policy.cdm_path), read_only=True))
            return local_step(self._cdm[1], study, analysis_id, state, self.policy.node_name)

    def handle(self, request: GateRequest) -> GateReply:
        """Answer one request: released statistics or a refusal with its reason; always audited."""
        checked = _Checked()
        try:
            return self._answer(request, checked)
        except Refusal as refusal:
            reason = str(refusal)
        except Exception as err:  # an analysis or I/O failure: refuse, never leak a traceback
            LOG.exception("gate request failed")
            reason = f"node error while answering: {type(err).__name__}"
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
        checked.request_id = _request_id(permit, request, self.policy.node_name)
        stored = self.ledger.lookup(checked.request_id)
        if stored is not None:  # charged before a crash: release the same answer, never a new one
            return self._release(request, checked, stored, replayed=True)
        budget = self._budget(permit, grant)
        training = self._training_charge(permit, grant, spec, request.state)
        cost = grant.cost_rho() if training is None else training.rho
        self._check_budget_left(permit, grant, budget, cost)
        statistics, settings = self._compute(request, study, spec, grant, permit, training)
        fresh = self._new_release(request, checked, permit, statistics, settings)
        release = self._charge(fresh, budget, permit, training)
        if self._after_charge is not None:
            self._after_charge(checked.request_id)
        # a concurrent twin of this request may have been charged first: release its answer
        return self._release(request, checked, release, replayed=release is not fresh)

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
        return spec, grant

    def _budget(self, permit: PermitBody, grant: PermitAnalysis) -> Budget:
        """The tighter of the permit's grant and the node's own caps, in rho."""
        permit_rho = epsilon_to_rho(permit.epsilon, permit.delta)
        return Budget(
            permit_rho=min(permit_rho, self.policy.rho_per_permit()),
            year_rho=self.policy.rho_per_year(),
            max_releases=grant.max_releases,
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

        A ``dp_sgd`` analysis needs a ``dp_sgd`` grant and vice versa. The round's loss is
        Opacus's RDP accountant over the history kept in the ledger for this permit and analysis
        plus the steps this request trains (from the study alone, before any data is read);
        the grant's ``cost`` caps the analysis's total epsilon at the permit's delta.
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

        stored = self.ledger.accountant(permit.permit_id, grant.id)
        charge = round_charge(
            stored.state if stored else [], spec.accountant_step(state), permit.delta
        )
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
    ) -> tuple[pl.DataFrame, dict[str, Any]]:
        """Run the analysis locally, then disclosure control and noise; the settings say what.

        DP-SGD weights (``training``) are already DP: they get the regression guards and the
        cell suppression of their counts, no count noise.
        """
        min_cell = max(self.policy.min_cell_count, permit.min_cell_count)
        if spec.kind in POOLED_KINDS:
            return self._pooled(request, study, grant, permit, min_cell)
        raw = self._local_step(study, request.analysis_id, request.state)
        regression = spec.kind in REGRESSION_KINDS
        settings: dict[str, Any] = {"min_cell_count": min_cell, "mechanism": grant.mechanism}
        try:
            if training is not None:
                protected, disclosure = protect(raw, min_cell, regression=True)
                settings.update(training.settings())
            elif grant.mechanism == "none":
                protected, disclosure = protect(raw, min_cell, regression=regression)
                settings.update(noise_scale=0.0, rho_charged=0.0, epsilon_charged=0.0)
            else:  # noise first: suppressing on noisy counts is post-processing, DP stays intact
                noisy, noise = noise_statistics(raw, grant)
                protected, disclosure = protect(noisy, min_cell, regression=regression)
                settings.update(
                    noise_scale=noise.scale,
                    rho_charged=noise.rho,
                    epsilon_charged=rho_to_epsilon(noise.rho, permit.delta),
                    delta=permit.delta,
                    values_withheld=noise.values_withheld,
                )
        except (DisclosureRefusal, DpError) as err:
            raise Refusal(str(err)) from err
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
    ) -> tuple[pl.DataFrame, dict[str, Any]]:
        """Pooled mode's release policy: noise share, masks, charge; suppression at the total.

        The permit allows it by granting the pooled analysis mechanism ``gaussian``; the
        ephemeral key comes from a node secret kept beside the ledger. When the permit binds the
        nodes' pooling identities (``node_keys``), every roster key must be signed by them.
        """
        from privacy.secagg import SecAggError, node_secret, pooled_release

        secret = node_secret(self.policy.ledger_path.with_suffix(".secagg.key"))
        try:
            statistics, settings = pooled_release(
                lambda: self._local_step(study, request.analysis_id, request.state),
                request.state,
                grant,
                node=self.policy.node_name,
                secret=secret,
                context=f"{permit.permit_id}|{permit.study_hash}|{request.analysis_id}",
                analysis_id=request.analysis_id,
                min_cell_count=min_cell,
                permitted=permit.nodes,
                identities=permit.node_keys or None,
            )
        except (SecAggError, DpError) as err:
            raise Refusal(str(err)) from err
        rho = float(settings["rho_charged"])
        epsilon = rho_to_epsilon(rho, permit.delta)
        return statistics, settings | {
            "min_cell_count": min_cell,
            "mechanism": grant.mechanism,
            "epsilon_charged": epsilon,
            "delta": permit.delta,
        }

    def _new_release(
        self,
        request: GateRequest,
        checked: _Checked,
        permit: PermitBody,
        statistics: pl.DataFrame,
        settings: dict[str, Any],
    ) -> Release:
        payload = to_ipc(statistics)
        settings = {
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
        )

    def _charge(
        self, release: Release, budget: Budget, permit: PermitBody, training: RoundCharge | None
    ) -> Release:
        accountant = training.ledger_update() if training is not None else None
        try:
            return self.ledger.charge(
                release,
                budget,
                (permit.epsilon, permit.delta, permit.valid_until.isoformat()),
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
        return GateReply(
            node_name=self.policy.node_name,
            released=True,
            statistics=release.payload,
            settings={**release.settings, "replayed": replayed},
            audit_hash=entry["hash"],
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


def _request_id(permit: PermitBody, request: GateRequest, node_name: str) -> str:
    """Content id of a request: the same question on the same permit gets the same answer."""
    key = {
        "node": node_name,
        "permit_id": permit.permit_id,
        "study_hash": permit.study_hash,
        "analysis_id": request.analysis_id,
        "round": int(request.round),
        "state": request.state,
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
        "reason": reason,
        "rho_charged": 0.0,
        "payload_sha256": "",
    }
