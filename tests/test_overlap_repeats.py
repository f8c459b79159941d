"""Overlap control over many repeats: a node asked the same study under fresh permits (the
reliability bench's 1M-person node answers 100 requests in a row) keeps each released set's
entries once, and still compares every new set with everything released before.

The record used to store a set's entries with every release: 8 MB per 1M-person cohort per
request, all read back and compared (bytes copied per pair) at the next request, so memory and
time grew with the number of requests.
"""

from __future__ import annotations

import hashlib
import sqlite3

import numpy as np
from test_gate import _aged, _ask_counts, _counts_study, node, world  # noqa: F401 (fixtures)

from node.gate import Gate
from node.overlap import EntrySet, OverlapRefusal, check_pairs

REPEATS = 12


def _record(gate: Gate) -> tuple[int, int, int]:
    """Rows, rows holding entries, and bytes of entries in the node's overlap record."""
    con = sqlite3.connect(gate.policy.overlap_path)
    try:
        rows, stored, size = con.execute(
            "SELECT count(*), sum(length(entries) > 0), sum(length(entries)) FROM released_set"
        ).fetchone()
    finally:
        con.close()
    return rows, stored, size


def test_a_set_released_again_keeps_its_entries_once(node: Gate, world) -> None:  # noqa: F811
    """The same counts under REPEATS fresh permits: a row per release, the entries once; the
    released list shares one array per set."""
    study = _counts_study("same", [_aged("to_61", 61)])
    first = _ask_counts(node, world, study)
    assert first.released, first.reason
    once = _record(node)
    for _ in range(REPEATS - 1):
        reply = _ask_counts(node, world, study)
        assert reply.released, reply.reason
    rows, stored, size = _record(node)
    assert rows == REPEATS * once[0]
    assert (stored, size) == (once[1], once[2])
    assert size > 0
    released = node.overlap.released()
    assert len(released) == rows
    assert np.shares_memory(released[0].entries, released[-1].entries)
    # each row's digest is the record's, kept once per set, and is its entries' own
    assert all(s.digest == hashlib.sha256(s.entries.tobytes()).digest() for s in released)
    assert released[0].digest is released[-1].digest


def test_differencing_after_repeats_is_still_refused(node: Gate, world) -> None:  # noqa: F811
    """The attack: release a cohort many times, then ask for one that differs from it by the
    61-year-olds (2 or 3 persons). Refused, naming the cohort released first; a cohort dozens
    apart is released."""
    same = _counts_study("same", [_aged("to_61", 61)])
    for _ in range(REPEATS):
        assert _ask_counts(node, world, same).released
    near = _ask_counts(node, world, _counts_study("near", [_aged("to_60", 60)]))
    assert not near.released
    assert "cohort 'to_60' of study near and cohort 'to_61' of study same differ by" in near.reason
    far = _ask_counts(node, world, _counts_study("far", [_aged("to_40", 40)]))
    assert far.released, far.reason


def test_sets_whose_sizes_differ_by_k_are_not_refused_but_by_k_minus_1_are() -> None:
    """The size shortcut is exact: two sets whose sizes differ by k or more differ by at least
    k entries; by k - 1 (one set inside the other) they are refused."""
    base = np.arange(1000, dtype=np.uint64)
    earlier = [EntrySet("earlier", base, release="r1")]
    check_pairs([EntrySet("k apart", base[:-10])], earlier, 10)
    try:
        check_pairs([EntrySet("k-1 apart", base[:-9])], earlier, 10)
    except OverlapRefusal as err:
        assert "differ by 9 entr" in str(err)
    else:
        raise AssertionError("a set 9 entries inside an earlier one was released")
