"""Overlap control: no two cohorts a node releases exactly may differ by 1 to k-1 entries.

Subtracting the results of two cohorts that differ by one person (men up to 84 years and men
up to 83) gives that person's values, although each result passed disclosure control. Before an
exact release the node compares the entry sets (person, start, end) of every cohort the
requested analysis names (its covariate and outcome cohorts included) with one another and with every cohort it released exactly before, under any permit
(its own record, beside the ledger, never released), and so are the age bands of an analysis
stratified by age group, and refuses when two that overlap differ
by 1 to k-1 entries counted on both sides (their symmetric difference), naming the pair (DataSHIELD's ``nfilter.subset`` compares a subset with
its parent; this goes across requests).

This is a mitigation, not a proof: a tracker chains queries that each pass a pairwise check.
A node that needs a guarantee requires DP for every release (``[privacy] require_dp``); DP
releases are bounded by their budget and not recorded here.

Entries are kept as sorted 64-bit hashes of (person, start, end) (DuckDB's ``hash``): a false
match needs a collision, about 1e-19 per pair of entries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from privacy.ledger import durable_sqlite

EPOCH = date(1970, 1, 1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS released_set (
    set_id      TEXT PRIMARY KEY,
    label       TEXT NOT NULL,
    permit_id   TEXT NOT NULL,
    released_at TEXT NOT NULL,
    entries     BLOB NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'cohort',
    span_start  INTEGER,
    span_end    INTEGER
);
"""


class OverlapRefusal(ValueError):
    """Two cohorts differ by too few entries; the message names them."""


@dataclass(frozen=True)
class EntrySet:
    """A set of entries (or persons) on this node, as sorted unique 64-bit hashes.

    ``kind`` says what it is, and sets are compared with their own kind only:
    - ``cohort``: a cohort's entries, compared within a request and across releases;
    - ``band``: an age band of a cohort, compared with the bands of other releases (its
      differences from cohorts are other bands, which every release's complementary
      suppression covers: a release of bands releases their cohort's total too);
    - ``period denominator`` / ``period outcome``: the persons a prevalence period counts, with
      the period's ``span`` (days since 1970), compared with overlapping periods only, within
      a request and across releases (nested periods one day apart count one day's diagnoses).
    """

    label: str
    entries: np.ndarray
    kind: str = "cohort"
    span: tuple[int, int] | None = None

    @property
    def set_id(self) -> str:
        return hashlib.sha256(self.kind.encode() + self.entries.tobytes()).hexdigest()

    def comparable(self, other: EntrySet) -> bool:
        """Same kind, and for periods overlapping spans."""
        if self.kind != other.kind or self.set_id == other.set_id:
            return False
        if self.span is None or other.span is None:
            return True
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


def band_entries(
    con: duckdb.DuckDBPyConnection, cohort_ids: dict[str, int], spec: Any, study_label: str
) -> list[EntrySet]:
    """The entry sets of each age band of each named cohort, when the analysis stratifies by
    age group: bands [0, 84] in one study and [0, 83] in another differ by the 84-year-olds."""
    from studies.analyses.common import ENTRIES_CTE, entries_params, normalise_strata
    from studies.analysis import CdmContext

    strata = normalise_strata(getattr(spec, "strata", None) or [])
    if not cohort_ids or not any("age_group" in names for names in strata):
        return []
    names = sorted(cohort_ids)
    params = entries_params(CdmContext(con, cohort_ids), names, getattr(spec, "age_groups", None))
    sql = f"""WITH {ENTRIES_CTE}
        SELECT cohort_name, age_group,
               hash(subject_id, cohort_start_date, cohort_end_date) AS entry FROM entries"""
    rows = con.sql(sql, params=params).pl()
    sets = []
    for (cohort, band), part in sorted(rows.group_by(["cohort_name", "age_group"])):
        entries = np.unique(part["entry"].to_numpy().astype(np.uint64))
        label = f"cohort {cohort!r} aged {band} of study {study_label}"
        sets.append(EntrySet(label, entries, kind="band"))
    return sets


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
    """Refuse when any two overlapping sets (within ``sets``, or one of ``sets`` and one of
    ``earlier``) differ by 1 to k-1 entries, counting the entries on either side (their
    symmetric difference): subtracting one result from the other then leaves those few.
    Disjoint sets, and sets far apart, have no difference that isolates anyone."""
    within = [s for s in sets if s.kind != "band"]
    pairs = [(a, b) for i, a in enumerate(within) for b in within[i + 1 :] if a.comparable(b)]
    pairs += [(a, b) for a in sets for b in earlier if a.comparable(b)]
    for a, b in pairs:
        if not a.entries.size or not b.entries.size:
            continue
        left, right = _gap(a.entries, b.entries)
        if left == a.entries.size:  # disjoint
            continue
        if 0 < left + right < k:
            raise OverlapRefusal(
                f"{a.label} and {b.label} differ by {left + right} entr(y/ies), fewer than {k}: "
                "subtracting their results would single out persons; refused"
            )


class OverlapRecord:
    """The entry sets this node released exactly, in a SQLite file beside its ledger."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self._connect() as con:
            con.executescript(_SCHEMA)

    def _connect(self) -> Any:
        return durable_sqlite(self.path)

    def released(self) -> list[EntrySet]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT label, entries, kind, span_start, span_end FROM released_set"
            ).fetchall()
        return [
            EntrySet(
                label,
                np.frombuffer(blob, dtype=np.uint64),
                kind,
                None if start is None else (start, end),
            )
            for label, blob, kind, start, end in rows
        ]

    def add(self, sets: list[EntrySet], permit_id: str) -> None:
        """Record sets as released (before the release leaves, in one transaction)."""
        now = datetime.now(UTC).isoformat()
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "INSERT OR IGNORE INTO released_set VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        s.set_id,
                        s.label,
                        permit_id,
                        now,
                        s.entries.tobytes(),
                        s.kind,
                        *(s.span or (None, None)),
                    )
                    for s in sets
                ],  # fmt: skip
            )
            con.execute("COMMIT")
