"""The node's privacy budget ledger: a SQLite file beside the CDM, charged before anything leaves.

Every release is one row, keyed by its request id, written in one ``BEGIN IMMEDIATE``
transaction that also checks the budget, so concurrent requests cannot overspend. The row holds
the released payload: a request retried after a crash (charged, not yet released) gets the same
payload back without a second charge, so a crash neither refunds nor releases twice. The file
runs in WAL mode with ``synchronous=FULL``, so a committed charge survives a process kill or a
power cut.

Spending is kept in rho (zCDP); budgets come from the permit and the node policy.

Each release also holds its round: one request id per (permit, analysis, round), so a node
answers a round once; asking it again with the same transcript replays the answer, with
another transcript is refused (``RoundReleased``).

Mechanisms whose loss depends on everything released before (DP-SGD's RDP accountant,
``privacy.dpsgd``) keep their accountant state here too, per permit and analysis, written in the
same transaction as the charge it justifies, so a restarted node composes onto it.

One accountant per permit. A permit's zCDP releases (rows of analyses without an accountant
state: their ``rho`` is their zCDP cost) and its DP-SGD histories compose in Opacus's RDP
accountant (``privacy.accounting.permit_epsilon``: zCDP rho enters as the RDP curve
rho * alpha), and the budget checks compare that loss, never a sum of epsilons. A DP-SGD row's
``rho`` is the increase of the permit's rho-equivalent it caused (what its audit entry names).
The yearly cap composes the same way over the year's zCDP releases and the full histories of
the DP-SGD analyses released under a permit this year (older steps included: conservative).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privacy.accounting import AccountingError, checked_loss, permit_rho_equivalent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS release (
    request_id   TEXT PRIMARY KEY,
    permit_id    TEXT NOT NULL,
    analysis_id  TEXT NOT NULL,
    rho          REAL NOT NULL CHECK (rho >= 0),
    charged_at   TEXT NOT NULL,
    payload      BLOB NOT NULL,
    payload_hash TEXT NOT NULL,
    settings     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS release_permit ON release (permit_id);
CREATE TABLE IF NOT EXISTS accountant (
    permit_id    TEXT NOT NULL,
    analysis_id  TEXT NOT NULL,
    state        TEXT NOT NULL,
    epsilon      REAL NOT NULL,
    delta        REAL NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (permit_id, analysis_id)
);
CREATE TABLE IF NOT EXISTS round_release (
    permit_id    TEXT NOT NULL,
    analysis_id  TEXT NOT NULL,
    round        INTEGER NOT NULL,
    request_id   TEXT NOT NULL,
    PRIMARY KEY (permit_id, analysis_id, round)
);
CREATE TABLE IF NOT EXISTS permit (
    permit_id    TEXT PRIMARY KEY,
    rho_budget   REAL NOT NULL,
    epsilon      REAL NOT NULL,
    delta        REAL NOT NULL,
    valid_until  TEXT NOT NULL
);
"""


class BudgetExhausted(RuntimeError):
    """The charge would exceed a budget; nothing was charged."""


class InvalidCharge(BudgetExhausted):
    """The charge is no privacy loss (negative, NaN, infinite): refused, nothing charged."""


class RoundReleased(BudgetExhausted):
    """This round of the analysis was released already, for another request; nothing charged."""


class StaleAccountant(BudgetExhausted):
    """The accountant state changed since the charge was computed (a concurrent round)."""


@dataclass(frozen=True)
class AccountantState:
    """A mechanism's accountant after a release: its state (JSON) and the epsilon at delta."""

    state: Any
    epsilon: float
    delta: float


@dataclass(frozen=True)
class AccountantUpdate:
    """Replace the accountant state ``previous`` (None: none yet) by ``new`` with a charge."""

    previous: Any
    new: AccountantState


@dataclass(frozen=True)
class Release:
    """One charged release as the ledger holds it."""

    request_id: str
    permit_id: str
    analysis_id: str
    rho: float
    charged_at: str
    payload: bytes
    payload_hash: str
    settings: dict[str, Any]
    round: int | None = None
    """The analysis round it answers (the gate's releases); None: not keyed by round."""


@dataclass(frozen=True)
class Budget:
    """The limits a charge must respect: budgets in rho, and the permit's cap on releases."""

    permit_rho: float
    year_rho: float
    max_releases: int | None = None
    delta: float = 1e-6
    """The node's accounting delta (``privacy.accounting.effective_delta``); the default is
    the node policy's default."""


@contextmanager
def durable_sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to a node's record file whose commits survive a kill or a power cut (WAL,
    ``synchronous=FULL``), in autocommit mode so callers open their own transactions."""
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        yield con
    finally:
        con.close()


class Ledger:
    """Budget ledger of one node, in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.executescript(_SCHEMA)

    def _connect(self) -> Any:
        return durable_sqlite(self.path)

    def lookup(self, request_id: str) -> Release | None:
        """The release already charged for this request id, if any (for replay after a crash)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT request_id, permit_id, analysis_id, rho, charged_at, payload, "
                "payload_hash, settings FROM release WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        return _release(row) if row else None

    def round_request(self, permit_id: str, analysis_id: str, round_: int) -> str | None:
        """The request id released for this round of the analysis under the permit, if any."""
        with self._connect() as con:
            row = con.execute(
                "SELECT request_id FROM round_release "
                "WHERE permit_id = ? AND analysis_id = ? AND round = ?",
                (permit_id, analysis_id, round_),
            ).fetchone()
        return row[0] if row else None

    def spent(self, permit_id: str) -> float:
        """Rho spent on one permit."""
        with self._connect() as con:
            return _spent_permit(con, permit_id)

    def check(self, permit_id: str, analysis_id: str, rho: float, budget: Budget) -> None:
        """Raise ``BudgetExhausted`` if a release would break a limit now (before computing it;
        ``charge`` checks again atomically)."""
        with self._connect() as con:
            _check(con, permit_id, analysis_id, rho, budget)

    def permit_accountant(self, permit_id: str) -> tuple[float, dict[str, Any]]:
        """The permit's zCDP rho (releases without an accountant) and its DP-SGD histories."""
        with self._connect() as con:
            return _permit_zcdp(con, permit_id), _histories(con, [permit_id])

    def year_accountant(
        self, permit_id: str, now: datetime | None = None
    ) -> tuple[float, dict[str, Any]]:
        """What the yearly cap composes for a release under ``permit_id`` now: the zCDP rho of
        the year's releases and the DP-SGD histories of the year's permits and this one (the
        composition ``_check`` refuses over)."""
        now = now or datetime.now(UTC)
        with self._connect() as con:
            permits = sorted({*_permits_in_year(con, now), permit_id})
            return _zcdp_year(con, now), _histories(con, permits)

    def accountant(self, permit_id: str, analysis_id: str) -> AccountantState | None:
        """The accountant state kept for an analysis under a permit, if any."""
        with self._connect() as con:
            row = _accountant_row(con, permit_id, analysis_id)
        return None if row is None else AccountantState(json.loads(row[0]), row[1], row[2])

    def spent_this_year(self, now: datetime | None = None) -> float:
        """Rho spent on all permits in the current calendar year (UTC)."""
        with self._connect() as con:
            return _spent_year(con, now or datetime.now(UTC))

    def charge(
        self,
        release: Release,
        budget: Budget,
        permit_terms: tuple[float, float, str],
        accountant: AccountantUpdate | None = None,
    ) -> Release:
        """Record a release durably unless it would overspend; return what the ledger holds.

        If the request id is already charged, nothing changes and the stored release comes back
        (the caller must release that payload, not a fresh one). ``permit_terms`` is the permit's
        (epsilon, delta, valid_until) kept for ``fedomop node budget``. ``accountant`` stores the
        release's accountant state in the same transaction; ``StaleAccountant`` (nothing charged)
        when the stored state is no longer the ``previous`` the charge was computed from.
        """
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                existing = con.execute(
                    "SELECT request_id, permit_id, analysis_id, rho, charged_at, payload, "
                    "payload_hash, settings FROM release WHERE request_id = ?",
                    (release.request_id,),
                ).fetchone()
                if existing:
                    con.execute("ROLLBACK")
                    return _release(existing)
                _check(con, release.permit_id, release.analysis_id, release.rho, budget, accountant)
                _claim_round(con, release)
                if accountant is not None:
                    _store_accountant(con, release, accountant)
                con.execute(
                    "INSERT OR IGNORE INTO permit VALUES (?, ?, ?, ?, ?)",
                    # the delta kept is the one the permit is accounted at: the node's
                    (
                        release.permit_id,
                        budget.permit_rho,
                        permit_terms[0],
                        budget.delta,
                        permit_terms[2],
                    ),
                )
                con.execute(
                    "INSERT INTO release VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        release.request_id,
                        release.permit_id,
                        release.analysis_id,
                        release.rho,
                        release.charged_at,
                        release.payload,
                        release.payload_hash,
                        json.dumps(release.settings, sort_keys=True),
                    ),
                )
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        return release

    def summary(self) -> list[dict[str, Any]]:
        """Per permit: budget, spent (the one accountant's loss as rho-equivalent at the
        delta the permit is accounted at), the permit's epsilon, releases."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT p.permit_id, p.rho_budget, p.epsilon, p.delta, p.valid_until, "
                "COALESCE(SUM(r.rho), 0), COUNT(r.request_id) "
                "FROM permit p LEFT JOIN release r USING (permit_id) "
                "GROUP BY p.permit_id ORDER BY p.permit_id"
            ).fetchall()
            rows = [(*row[:5], _permit_spent(con, row[0], row[3]), row[6]) for row in rows]
        keys = [
            "permit_id",
            "rho_budget",
            "epsilon",
            "delta",
            "valid_until",
            "rho_spent",
            "releases",
        ]
        return [dict(zip(keys, row, strict=True)) for row in rows]


def _claim_round(con: sqlite3.Connection, release: Release) -> None:
    """Record the release as its round's answer, or ``RoundReleased`` if another one is."""
    if release.round is None:
        return
    key = (release.permit_id, release.analysis_id, release.round)
    row = con.execute(
        "SELECT request_id FROM round_release WHERE permit_id = ? AND analysis_id = ? "
        "AND round = ?",
        key,
    ).fetchone()
    if row is not None and row[0] != release.request_id:
        raise RoundReleased(
            f"round {release.round} of analysis {release.analysis_id!r} was released already "
            "under this permit for another transcript; a round is answered once"
        )
    con.execute(
        "INSERT OR IGNORE INTO round_release VALUES (?, ?, ?, ?)", (*key, release.request_id)
    )


def _check(
    con: sqlite3.Connection,
    permit_id: str,
    analysis_id: str,
    rho: float,
    budget: Budget,
    accountant: AccountantUpdate | None = None,
) -> None:
    """Raise ``BudgetExhausted`` when one more release breaks a limit.

    ``rho`` is a zCDP release's cost; a release with an ``accountant`` update (DP-SGD) is
    charged by its new history instead. Permits holding RDP histories are checked in one
    accountant (module docstring).
    """
    try:
        checked_loss(rho, "charge rho")
    except AccountingError as err:
        raise InvalidCharge(f"release refused, its charge is invalid: {err}") from err
    capped = budget.max_releases is not None
    if capped and _releases(con, permit_id, analysis_id) >= budget.max_releases:
        raise BudgetExhausted(
            f"permit {permit_id} allows {budget.max_releases} release(s) of analysis "
            f"{analysis_id!r}; all were given"
        )
    if rho <= 0.0 and accountant is None:
        return
    zcdp = 0.0 if accountant is not None else rho
    histories = _histories(con, [permit_id])
    if accountant is not None:
        histories[f"{permit_id}|{analysis_id}"] = accountant.new.state
    _refuse_over(
        _permit_zcdp(con, permit_id) + zcdp,
        histories,
        budget.delta,
        budget.permit_rho,
        f"privacy budget of permit {permit_id} exhausted on this node: spent rho "
        f"{_spent_permit(con, permit_id):.4g} of {budget.permit_rho:.4g}",
    )
    now = datetime.now(UTC)
    year_permits = sorted({*_permits_in_year(con, now), permit_id})
    _refuse_over(
        _zcdp_year(con, now) + zcdp,
        _histories(con, year_permits) | histories,
        budget.delta,
        budget.year_rho,
        f"this node's yearly privacy budget is exhausted: spent rho "
        f"{_spent_year(con, now):.4g} of {budget.year_rho:.4g}",
    )


def _refuse_over(
    zcdp: float, histories: dict[str, Any], delta: float, limit: float, exhausted: str
) -> None:
    """Raise ``BudgetExhausted`` (``exhausted``, with the total) when the zCDP charges and the
    RDP histories, composed, exceed ``limit``: one rule for the permit's and the year's budget."""
    spent = permit_rho_equivalent(zcdp, list(histories.values()), delta)
    if spent > limit * (1 + 1e-9):
        raise BudgetExhausted(f"{exhausted}, with this release {spent:.4g}")


_ZCDP = (
    "NOT EXISTS (SELECT 1 FROM accountant a "
    "WHERE a.permit_id = r.permit_id AND a.analysis_id = r.analysis_id)"
)
"""Releases whose rho is their zCDP cost: those of analyses that keep no accountant state."""


def _permit_spent(con: sqlite3.Connection, permit_id: str, delta: float) -> float:
    """The permit's loss in one accountant, as its rho-equivalent at ``delta``."""
    histories = list(_histories(con, [permit_id]).values())
    return permit_rho_equivalent(_permit_zcdp(con, permit_id), histories, delta)


def _permit_zcdp(con: sqlite3.Connection, permit_id: str) -> float:
    row = con.execute(
        f"SELECT COALESCE(SUM(rho), 0) FROM release r WHERE permit_id = ? AND {_ZCDP}",
        (permit_id,),
    ).fetchone()
    return float(row[0])


def _zcdp_year(con: sqlite3.Connection, now: datetime) -> float:
    row = con.execute(
        f"SELECT COALESCE(SUM(rho), 0) FROM release r WHERE substr(charged_at, 1, 4) = ? "
        f"AND {_ZCDP}",
        (f"{now.year:04d}",),
    ).fetchone()
    return float(row[0])


def _permits_in_year(con: sqlite3.Connection, now: datetime) -> list[str]:
    rows = con.execute(
        "SELECT DISTINCT permit_id FROM release WHERE substr(charged_at, 1, 4) = ?",
        (f"{now.year:04d}",),
    ).fetchall()
    return [r[0] for r in rows]


def _histories(con: sqlite3.Connection, permit_ids: list[str]) -> dict[str, Any]:
    """``permit|analysis`` -> RDP accountant history, for the given permits."""
    out: dict[str, Any] = {}
    for permit_id in permit_ids:
        rows = con.execute(
            "SELECT analysis_id, state FROM accountant WHERE permit_id = ?", (permit_id,)
        ).fetchall()
        out |= {f"{permit_id}|{analysis}": json.loads(state) for analysis, state in rows}
    return out


def _accountant_row(
    con: sqlite3.Connection, permit_id: str, analysis_id: str
) -> tuple[str, float, float] | None:
    return con.execute(
        "SELECT state, epsilon, delta FROM accountant WHERE permit_id = ? AND analysis_id = ?",
        (permit_id, analysis_id),
    ).fetchone()


def _store_accountant(con: sqlite3.Connection, release: Release, update: AccountantUpdate) -> None:
    """Compare-and-swap the accountant state of the release's permit and analysis."""
    row = _accountant_row(con, release.permit_id, release.analysis_id)
    stored = None if row is None else json.loads(row[0])
    if json.dumps(stored) != json.dumps(update.previous):
        raise StaleAccountant(
            f"accountant of analysis {release.analysis_id!r} under permit {release.permit_id} "
            "changed while this round was computed (a concurrent round); nothing was charged"
        )
    con.execute(
        "INSERT OR REPLACE INTO accountant VALUES (?, ?, ?, ?, ?, ?)",
        (
            release.permit_id,
            release.analysis_id,
            json.dumps(update.new.state),
            update.new.epsilon,
            update.new.delta,
            release.charged_at,
        ),
    )


def _releases(con: sqlite3.Connection, permit_id: str, analysis_id: str) -> int:
    row = con.execute(
        "SELECT count(*) FROM release WHERE permit_id = ? AND analysis_id = ?",
        (permit_id, analysis_id),
    ).fetchone()
    return int(row[0])


def _spent_permit(con: sqlite3.Connection, permit_id: str) -> float:
    row = con.execute(
        "SELECT COALESCE(SUM(rho), 0) FROM release WHERE permit_id = ?", (permit_id,)
    ).fetchone()
    return float(row[0])


def _spent_year(con: sqlite3.Connection, now: datetime) -> float:
    row = con.execute(
        "SELECT COALESCE(SUM(rho), 0) FROM release WHERE substr(charged_at, 1, 4) = ?",
        (f"{now.year:04d}",),
    ).fetchone()
    return float(row[0])


def _release(row: tuple[Any, ...]) -> Release:
    *head, settings = row
    return Release(*head, settings=json.loads(settings))
