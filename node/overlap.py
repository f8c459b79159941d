"""Overlap control: no two sets of persons a node releases exactly may differ by 1 to k-1.

Subtracting the results of two cohorts that differ by one person (men up to 84 years and men
up to 83) gives that person's values, although each result passed disclosure control. Before an
exact release the node compares, with one another and with every set it released exactly before
under any permit (its own record beside the ledger, never released):
- the entry sets (person, start, end) of every cohort the analysis names, covariate and outcome
  cohorts included (a cohort's calendar window changes its entries);
- the subsets of each cohort by stratum (sex, age group, calendar year) whose counts it releases;
- the persons each prevalence period counts (denominator and outcome), for overlapping periods.
It refuses when two that overlap differ by 1 to k-1 entries counted on both sides (their
symmetric difference), naming the pair. DataSHIELD's ``nfilter.subset`` compares a subset with
its parent; this goes across requests. A pair released together before is not compared again:
a set equal to one of an earlier release adds nothing to what that release's sets gave.

This is a mitigation, not a proof: a tracker chains queries that each pass a pairwise check.
A node that needs a guarantee requires DP for every release (``[privacy] require_dp``); DP
releases are bounded by their budget and not recorded here.

Entries are kept as sorted 64-bit hashes of (person, start, end) (DuckDB's ``hash``): a false
match needs a collision, about 1e-19 per pair of entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from privacy.ledger import durable_sqlite

EPOCH = date(1970, 1, 1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS released_set (
    set_id      TEXT NOT NULL,
    label       TEXT NOT NULL,
    permit_id   TEXT NOT NULL,
    released_at TEXT NOT NULL,
    entries     BLOB NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'cohort',
    span_start  INTEGER,
    span_end    INTEGER,
    release     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (set_id, release)
);
"""


class OverlapRefusal(ValueError):
    """Two cohorts differ by too few entries; the message names them."""


@dataclass(frozen=True)
class EntrySet:
    """A set of entries (or persons) on this node, as sorted unique 64-bit hashes.

    ``kind``: ``cohort`` (a cohort's entries), ``stratum`` (a cohort's entries in one stratum
    level, ``stratum`` naming it as its statistics rows do), or ``period denominator`` /
    ``period outcome`` (the persons a prevalence period counts, with its ``span`` in days
    since 1970). Cohorts and strata are compared with one another, periods with overlapping
    periods only. ``release`` names the release an earlier set came with.
    """

    label: str
    entries: np.ndarray
    kind: str = "cohort"
    span: tuple[int, int] | None = None
    stratum: tuple[str, str, str] | None = None
    release: str = ""
    digest: bytes = field(default=b"", repr=False, compare=False)
    """The entries' SHA-256, computed once when not given: comparing a request's sets with every
    earlier release by their bytes copied each array once per pair (megabytes at 1M persons);
    the overlap record hands the digest it keeps per distinct set to each row of it."""

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(self.entries.tobytes()).digest())

    @property
    def set_id(self) -> str:
        return hashlib.sha256(self.kind.encode() + self.entries.tobytes()).hexdigest()

    @property
    def is_period(self) -> bool:
        return self.kind.startswith("period")

    def comparable(self, other: EntrySet) -> bool:
        """Persons of cohorts and strata with each other; periods with overlapping periods."""
        if self.is_period != other.is_period or self.digest == other.digest:
            return False
        if not self.is_period:
            return True
        if self.kind != other.kind or self.span is None or other.span is None:
            return False
        return self.span[0] <= other.span[1] and other.span[0] <= self.span[1]


def cohort_entries(
    con: duckdb.DuckDBPyConnection, cohort_ids: dict[str, int], study_label: str
) -> list[EntrySet]:
    """The entry sets of the study's materialised cohorts (temp table ``cohort``)."""
    sets = []
    for name, cohort_id in sorted(cohort_ids.items()):
        rows = con.execute(
            "SELECT DISTINCT hash(subject_id, cohort_start_date, cohort_end_date) FROM cohort "
            "WHERE cohort_definition_id = ?",
            [cohort_id],
        ).fetchnumpy()
        values = next(iter(rows.values())) if rows else np.array([], dtype=np.uint64)
        entries = np.unique(np.asarray(values, dtype=np.uint64))
        sets.append(EntrySet(f"cohort {name!r} of study {study_label}", entries))
    return sets


STRATA = ("sex", "age_group", "calendar_year")
"""The strata whose subsets of a cohort the node records (one stratum at a time)."""


def strata_entries(
    con: duckdb.DuckDBPyConnection, cohort_ids: dict[str, int], spec: Any, study_label: str
) -> list[EntrySet]:
    """The entry sets of each level of each single stratum the analysis cuts its cohorts by:
    bands [0, 84] in one study and [0, 83] in another differ by the 84-year-olds."""
    from studies.analyses.node_sql import ENTRIES_CTE, entries_params, query
    from studies.analyses.spec_fields import normalise_strata
    from studies.analysis import CdmContext

    cut = [names[0] for names in normalise_strata(getattr(spec, "strata", None) or [])]
    cut = [name for name in STRATA if name in cut]
    if not cohort_ids or not cut:
        return []
    names = sorted(cohort_ids)
    params = entries_params(CdmContext(con, cohort_ids), names, getattr(spec, "age_groups", None))
    sql = f"""WITH {ENTRIES_CTE}
        SELECT cohort_name, {", ".join(cut)},
               hash(subject_id, cohort_start_date, cohort_end_date) AS entry FROM entries"""
    rows = query(con, sql, params)
    sets = []
    for stratum in cut:
        for (cohort, level), part in sorted(rows.group_by(["cohort_name", stratum])):
            entries = np.unique(part["entry"].to_numpy().astype(np.uint64))
            label = f"cohort {cohort!r} at {stratum} {level} of study {study_label}"
            sets.append(EntrySet(label, entries, "stratum", stratum=(cohort, stratum, level)))
    return sets


def released_strata(sets: list[EntrySet], statistics: Any) -> list[EntrySet]:
    """The sets whose counts the release holds: every cohort and period set, and each stratum
    set only where its stratum's count rows came through disclosure control."""
    import polars as pl

    shown = statistics.filter(
        (pl.col("release_class") == "count") & pl.col("value").is_finite() & (pl.col("value") > 0)
    ).select("cohort", "strata_name", "strata_level")
    keys = set(shown.unique().iter_rows())
    return [s for s in sets if s.stratum is None or s.stratum in keys]


def period_entries(
    con: duckdb.DuckDBPyConnection, cohort_ids: dict[str, int], spec: Any, study_label: str
) -> list[EntrySet]:
    """The persons each period of a prevalence analysis counts (denominator, and outcome)."""
    if getattr(spec, "kind", "") != "prevalence":
        return []
    from studies.analyses.prevalence import period_persons
    from studies.analysis import CdmContext

    rows = period_persons(CdmContext(con, cohort_ids), spec)
    sets = []
    for (start, end), part in sorted(rows.group_by(["p_start", "p_end"])):
        span = ((start - EPOCH).days, (end - EPOCH).days)
        label = f"period {start} to {end} of analysis {spec.id!r} of study {study_label}"
        for kind, chosen in (("denominator", part), ("outcome", part.filter("has_outcome"))):
            persons = np.unique(chosen["person"].to_numpy().astype(np.uint64))
            sets.append(EntrySet(f"{label} ({kind})", persons, f"period {kind}", span))
    return sets


def _gap(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Entries of a not in b, and of b not in a."""
    return (
        int(np.setdiff1d(a, b, assume_unique=True).size),
        int(np.setdiff1d(b, a, assume_unique=True).size),
    )


def check_pairs(sets: list[EntrySet], earlier: list[EntrySet], k: int) -> None:
    """Refuse when two comparable overlapping sets (cohorts of the request with one another,
    periods with one another, any of them with an earlier release's) differ by 1 to k-1 entries
    counted on both sides: subtracting one result from the other then leaves those few.
    A cohort's own strata in one release are complementary suppression's concern, and a pair
    an earlier release held together is not compared again."""
    within = [s for s in sets if s.kind != "stratum"]
    pairs = [(a, b) for i, a in enumerate(within) for b in within[i + 1 :] if a.comparable(b)]
    for a in sets:
        seen = {e.release for e in earlier if e.digest == a.digest}
        pairs += _earlier_pairs(a, [b for b in earlier if b.release not in seen])
    for a, b in pairs:
        if not a.entries.size or not b.entries.size or abs(a.entries.size - b.entries.size) >= k:
            continue  # sizes k or more apart: their difference counts at least k entries
        left, right = _gap(a.entries, b.entries)
        if left == a.entries.size:  # disjoint
            continue
        if 0 < left + right < k:
            raise OverlapRefusal(
                f"{a.label} and {b.label} differ by {left + right} entr(y/ies), fewer than {k}: "
                "subtracting their results would single out persons; refused"
            )


def _earlier_pairs(a: EntrySet, earlier: list[EntrySet]) -> list[tuple[EntrySet, EntrySet]]:
    """``a`` with each earlier set it is comparable with, each distinct set once (the first
    release that held it): the same request asked under a new permit records the same sets
    again, and comparing them again would decide nothing new."""
    pairs, compared = [], set()
    for b in earlier:
        key = (b.digest, b.kind, b.span)
        if key not in compared and a.comparable(b):
            compared.add(key)
            pairs.append((a, b))
    return pairs


class OverlapRecord:
    """The entry sets this node released exactly, in a SQLite file beside its ledger."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, tuple[np.ndarray, bytes]] = {}
        with self._connect() as con:
            con.executescript(_SCHEMA)

    def _connect(self) -> Any:
        return durable_sqlite(self.path)

    def released(self) -> list[EntrySet]:
        """Every set recorded, in the order recorded; one array per distinct set.

        A set released again (the same study under a new permit) is a row without entries
        (``add``), so the record and this list grow by a label per release, not by the
        persons: a 1M-person cohort asked 100 times held 100 copies of 8 MB before. The
        arrays and their digests are kept between calls (a set id is the hash of its entries:
        never stale), so a request hashes no earlier set again (0.35 s a request after 60
        releases of four 262k-entry cohorts, before).
        """
        with self._connect() as con:
            rows = con.execute(
                "SELECT set_id, label, kind, span_start, span_end, release FROM released_set "
                "ORDER BY rowid"
            ).fetchall()
            missing = {row[0] for row in rows} - self._entries.keys()
            for set_id in sorted(missing):
                (blob,) = con.execute(
                    "SELECT entries FROM released_set WHERE set_id = ? "
                    "ORDER BY length(entries) DESC LIMIT 1",
                    [set_id],
                ).fetchone()
                entries = np.frombuffer(blob, dtype=np.uint64)
                self._entries[set_id] = (entries, hashlib.sha256(blob).digest())
        sets = []
        for set_id, label, kind, start, end, release in rows:
            entries, digest = self._entries[set_id]
            span = None if start is None else (start, end)
            sets.append(EntrySet(label, entries, kind, span, release=release, digest=digest))
        return sets

    def add(self, sets: list[EntrySet], permit_id: str, release: str) -> None:
        """Record sets as released together in ``release`` (before it leaves, one
        transaction): a set released again is recorded with each release it came with, its
        entries stored with the first only."""
        now = datetime.now(UTC).isoformat()
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            stored = {
                row[0]
                for row in con.execute(
                    "SELECT DISTINCT set_id FROM released_set WHERE length(entries) > 0"
                )
            }
            rows = [
                (s.set_id, s.label, permit_id, now,
                 b"" if s.set_id in stored else s.entries.tobytes(),
                 s.kind, *(s.span or (None, None)), release)
                for s in sets
            ]  # fmt: skip
            con.executemany(
                "INSERT OR IGNORE INTO released_set VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            con.execute("COMMIT")
