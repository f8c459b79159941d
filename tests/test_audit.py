"""The audit log's hash chain catches changed, removed, reordered and truncated entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.audit import GENESIS, AuditLog, entry_hash


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    audit = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        audit.append(
            {
                "permit_id": "pmt-a",
                "analysis_id": f"a{i}",
                "verdict": "released" if i % 2 else "refused",
                "reason": "" if i % 2 else "budget exhausted",
                "rho_charged": 0.01 * i,
            }
        )
    return audit


def _lines(audit: AuditLog) -> list[str]:
    return audit.path.read_text().splitlines()


def _write(audit: AuditLog, lines: list[str]) -> None:
    audit.path.write_text("\n".join(lines) + "\n")


def test_intact_log_verifies_and_chains(log: AuditLog) -> None:
    entries = log.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    assert all(e["hash"] == entry_hash(e) for e in entries)
    assert log.verify() == []


def test_changed_entry_is_detected(log: AuditLog) -> None:
    lines = _lines(log)
    entry = json.loads(lines[1])
    assert entry["verdict"] == "released"
    entry["verdict"] = "refused"  # hide a release
    lines[1] = json.dumps(entry)
    _write(log, lines)
    assert [(p.line, "changed" in p.problem) for p in log.verify()] == [(2, True)]


def test_rehashed_change_still_breaks_the_next_link(log: AuditLog) -> None:
    lines = _lines(log)
    entry = json.loads(lines[1])
    entry["rho_charged"] = 0.0
    entry["hash"] = entry_hash(entry)  # a careful forger recomputes the hash
    lines[1] = json.dumps(entry)
    _write(log, lines)
    problems = log.verify()
    assert [p.line for p in problems] == [3]
    assert "previous-hash link broken" in problems[0].problem


def test_removed_entry_is_detected(log: AuditLog) -> None:
    lines = _lines(log)
    del lines[1]
    _write(log, lines)
    lines_with_problems = {p.line for p in log.verify()}
    assert lines_with_problems == {2}


def test_reordered_entries_are_detected(log: AuditLog) -> None:
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    assert {p.line for p in log.verify()} >= {2, 3}


def test_truncated_tail_is_detected_by_the_head(log: AuditLog) -> None:
    _write(log, _lines(log)[:3])
    [problem] = log.verify()
    assert "removed from the end" in problem.problem


def test_appends_continue_the_chain_after_reopening(log: AuditLog) -> None:
    reopened = AuditLog(log.path)
    entry = reopened.append({"verdict": "released"})
    assert entry["seq"] == 6 and entry["prev_hash"] == log.entries()[4]["hash"]
    assert reopened.verify() == []


def test_long_log_chains_from_its_tail(tmp_path: Path) -> None:
    """Appends read only the end of the file; the chain stays intact over many blocks."""
    audit = AuditLog(tmp_path / "long.jsonl")
    for i in range(300):
        audit.append({"verdict": "refused", "reason": "x" * (i % 50)})
    assert audit.path.stat().st_size > 4 * 4096
    assert audit.entries()[-1]["seq"] == 300
    assert audit.verify() == []


APPENDER = """
import sys
from node.audit import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[2])):
    log.append({"verdict": "released", "request_id": str(i), "statistics": "x" * 200_000})
"""


def test_a_reader_beside_a_running_node_sees_whole_entries_and_an_intact_chain(
    tmp_path: Path,
) -> None:
    """A monitor (or the reliability bench) reads the log while the node appends to it: every
    read is of whole entries with their head, so it never reports a break that is not there."""
    import subprocess
    import sys

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append({"verdict": "refused", "reason": "first"})
    appender = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(path), "150"], cwd=Path(__file__).parents[1]
    )
    reads = 0
    try:
        while appender.poll() is None:
            assert log.verify() == []
            entries = log.entries()
            assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
            reads += 1
    finally:
        appender.wait(timeout=60)
    assert appender.returncode == 0 and reads > 10
    assert len(log.entries()) == 151 and log.verify() == []
