"""The node's audit log: append-only JSON lines chained by hashes, one entry per gate request.

Each entry holds the hash of the entry before it and its own hash over its canonical JSON, so a
changed, removed or reordered entry breaks the chain. The last entry's sequence number and hash
are also written to a head file beside the log, so cutting entries off the end is caught too
(and the coordinator keeps each reply's ``audit_hash`` as an outside receipt). Appends hold an
exclusive file lock and are fsync'd before the gate releases anything; reads hold a shared one,
so a reader beside a running node sees whole entries with their head.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from studies.permit import canonical_json

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditProblem:
    """One break in the chain: the line (1-based) and what is wrong there."""

    line: int
    problem: str


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of an entry without its own ``hash`` field."""
    return hashlib.sha256(
        canonical_json({k: v for k, v in entry.items() if k != "hash"})
    ).hexdigest()


class AuditLog:
    """Append-only, hash-chained JSON lines file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Add one entry (sequence number, time and chain fields added here); return it."""
        with open(self.path, "a+", encoding="utf-8") as log:
            fcntl.flock(log, fcntl.LOCK_EX)
            try:
                seq, prev = self._last(log)
                entry = {
                    **record,
                    "seq": seq + 1,
                    "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "prev_hash": prev,
                }
                entry["hash"] = entry_hash(entry)
                self._write_entry(log, entry)
            finally:
                fcntl.flock(log, fcntl.LOCK_UN)
        return entry

    def _write_entry(self, log: Any, entry: dict[str, Any]) -> None:
        """Append one line and move the head to it, or leave both as they were.

        A full disk (or a file-size limit) can cut a line part-way; the part would break the
        chain for every later entry. So on any write error the log is cut back to where this
        line began (shrinking needs no space) and the error raised: the entry is not written.
        """
        fd = log.fileno()  # unbuffered writes: no text-layer buffer left to flush on close
        start = os.lseek(fd, 0, os.SEEK_END)
        line = memoryview((json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
        try:
            while line:
                line = line[os.write(fd, line) :]
            os.fsync(fd)
            self._write_head(entry)
        except OSError:
            os.ftruncate(fd, start)
            os.fsync(fd)
            self.head_path.with_suffix(".tmp").unlink(missing_ok=True)
            raise

    def _last(self, log: Any) -> tuple[int, str]:
        """Sequence number and hash of the last entry, read from the end of the file."""
        log.seek(0, os.SEEK_END)
        end, block = log.tell(), 4096
        while True:
            start = max(0, end - block)
            log.seek(start)
            tail = log.buffer.read(end - start).decode("utf-8").splitlines()
            lines = [line for line in (tail if start == 0 else tail[1:]) if line.strip()]
            if lines or start == 0:
                break
            block *= 2
        if not lines:
            return 0, GENESIS
        entry = json.loads(lines[-1])
        return int(entry["seq"]), str(entry["hash"])

    def _write_head(self, entry: dict[str, Any]) -> None:
        tmp = self.head_path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as head:
            json.dump({"seq": entry["seq"], "hash": entry["hash"]}, head)
            head.flush()
            os.fsync(head.fileno())
        os.replace(tmp, self.head_path)

    def _snapshot(self) -> tuple[list[str], str | None]:
        """The log's lines and the head file's text as one append left them.

        Read under a shared lock: a reader beside a running node (``fedomop node audit``, a
        monitor) would otherwise see a line part-written, or a new line with the old head, and
        report a break that is not there."""
        if not self.path.exists():  # a head without its log is a removed log: verify says so
            return [], self._head_text()
        with open(self.path, encoding="utf-8") as log:
            fcntl.flock(log, fcntl.LOCK_SH)
            try:
                return log.read().splitlines(), self._head_text()
            finally:
                fcntl.flock(log, fcntl.LOCK_UN)

    def _head_text(self) -> str | None:
        return self.head_path.read_text(encoding="utf-8") if self.head_path.exists() else None

    def entries(self) -> list[dict[str, Any]]:
        """All entries, in file order."""
        lines, _ = self._snapshot()
        return [json.loads(line) for line in lines if line.strip()]

    def verify(self) -> list[AuditProblem]:
        """Every break in the chain; an empty list means the log is intact."""
        problems: list[AuditProblem] = []
        prev, seq = GENESIS, 0
        lines, head = self._snapshot()
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                problems.append(AuditProblem(number, "not valid JSON"))
                continue
            problems.extend(AuditProblem(number, p) for p in _entry_problems(entry, prev, seq + 1))
            prev, seq = str(entry.get("hash", "")), int(entry.get("seq", seq + 1))
        problems.extend(_head_problems(head, len(lines), seq, prev))
        return problems


def _head_problems(text: str | None, lines: int, seq: int, last_hash: str) -> list[AuditProblem]:
    """The head file (``text``) against the log's last entry: entries cut off the end."""
    if text is None:
        return [AuditProblem(lines, "head file missing")] if lines else []
    head = json.loads(text)
    if head.get("seq") != seq or head.get("hash") != last_hash:
        return [
            AuditProblem(
                lines,
                f"log ends at entry {seq} but the head records entry {head.get('seq')}: "
                "entries were removed from the end or the head was changed",
            )
        ]
    return []


def _entry_problems(entry: dict[str, Any], prev: str, seq: int) -> list[str]:
    problems = []
    if entry.get("seq") != seq:
        problems.append(f"sequence number {entry.get('seq')} where {seq} was expected")
    if entry.get("prev_hash") != prev:
        problems.append("previous-hash link broken (an entry was removed or reordered)")
    if entry.get("hash") != entry_hash(entry):
        problems.append("entry hash does not match its content (the entry was changed)")
    return problems
