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

``Gate`` runs the steps in that order; the steps live by concern: the request checks in
``node.gate_checks``, the round's state from the signed transcript in ``node.gate_transcript``,
compute, protect, charge and release in ``node.gate_release``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import duckdb
import polars as pl

from node.audit import AuditLog
from node.gate_checks import (
    GateChecks,
    Refusal,
    _audit_record,
    _check_dates,
    _Checked,
    _request_id,
    _verified_study,
)
from node.gate_release import ReleaseSteps
from node.gate_transcript import TranscriptDerivation
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
from omop_etl.cdm import connect
from privacy.accounting import AccountingError
from privacy.ledger import Ledger
from studies.canonical import study_hash
from studies.cohorts import OverlappingPeriods, cohort_ids
from studies.model import Study
from studies.runner import local_step, prepare_cdm

LOG = logging.getLogger("fedomop.node.gate")


class Gate(GateChecks, TranscriptDerivation, ReleaseSteps):
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
        self,
        study: Study,
        analysis_id: str,
        state: Any,
        min_cell: int | None = None,
        noise_multiplier: float | None = None,
    ) -> pl.DataFrame:
        """``local_step`` on a read-only CDM connection kept open while the file is unchanged.

        The open connection keeps the study's materialised cohorts, so the rounds of a GLM and
        repeated questions skip compiling them; a rebuilt CDM (``omop_etl.build.atomic_build``
        replaces the file) is reopened on the next request.
        """
        with self._cdm_lock:
            con = self._connection()
            try:
                return local_step(
                    con,
                    study,
                    analysis_id,
                    state,
                    self.policy.node_name,
                    min_cell or self.policy.min_cell_count,  # hook (wt/cox): time axis reads k
                    noise_multiplier,  # DP-SGD trains at the noise this gate fixed and charged
                )
            except duckdb.IOException as err:  # a truncated or damaged file; its text names
                raise _cdm_unreadable(err) from err  # offsets and paths: the type name only

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """The read-only CDM connection, reopened when the file was replaced (hold the lock)."""
        info = os.stat(self.policy.cdm_path)
        stamp = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        if self._cdm is None or self._cdm[0] != stamp:
            if self._cdm is not None:
                self._cdm[1].close()
                self._cdm = None
            try:
                con = connect(self.policy.cdm_path)
                self.policy.compute.apply(con)  # the policy's memory bound
                self._cdm = (stamp, con)
            except duckdb.Error as err:  # truncated or not a DuckDB file: the operator's to fix
                raise _cdm_unreadable(err) from err
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
        except (OSError, sqlite3.Error) as err:  # a full disk, an unwritable ledger or record
            LOG.exception("gate storage failed")
            reason = f"node storage error, nothing released: {type(err).__name__} ({_cause(err)})"
        except Exception as err:  # an analysis or I/O failure: refuse, never leak a traceback
            LOG.exception("gate request failed")
            reason = f"node error while answering: {type(err).__name__}"
        reason = bounded_text(reason)  # never echo a payload: head, length and SHA-256 only
        try:
            record = _audit_record(request, checked, verdict="refused", reason=reason)
            audit_hash = self.audit.append(record)["hash"]
        except OSError as err:  # nothing was released, and the log is as it was (AuditLog)
            LOG.exception("audit log not writable")
            reason = bounded_text(f"{reason}; the refusal could not be audited: {_cause(err)}")
            audit_hash = ""
        return GateReply(
            node_name=self.policy.node_name, released=False, reason=reason, audit_hash=audit_hash
        )

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


def _cdm_unreadable(err: BaseException) -> Refusal:
    return Refusal(
        f"node cannot read its CDM file ({type(err).__name__}): its operator must check or "
        "rebuild it"
    )


def _cause(err: BaseException) -> str:
    """What failed, without paths or data: the OS's text for an errno, SQLite's message."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)[:120]
