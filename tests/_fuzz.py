"""What the property-based (hypothesis) tests share: one settings profile, strategies that
mutate a valid document, the node-state snapshot a refusal must leave unchanged, and the
per-property example counts written to ``test-artifacts/fuzz.json``.

Examples are derandomized and no example database is kept, so CI replays the same inputs on
every run; counts are modest so the whole fuzz suite stays within about a minute on 2 cores.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
FUZZ_FILE = ARTIFACTS / "fuzz.json"

EXAMPLES: Counter[str] = Counter()
"""Examples run per property (test name), written to ``FUZZ_FILE`` by ``write_counts``."""
LIMITS: dict[str, int] = {}
CURRENT: list[str] = [""]
"""The property whose example runs now (what a node test notes its outcome under)."""
OUTCOMES: dict[str, Counter[str]] = {}
"""What the examples of a property ended in (e.g. ``utf16: refused``), for the artifact."""


def fuzz_settings(max_examples: int) -> settings:
    """The one profile: reproducible (derandomized, no database), no deadline (a loaded CI
    machine is slow), fixture reuse allowed (each example checks state before and after)."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def fuzzed(
    name: str, max_examples: int, **strategies: st.SearchStrategy[Any]
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A property test named ``name``: the one profile, ``given(**strategies)``, and every
    example counted (``tried``) and made ``CURRENT``, so no property forgets its count."""

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(test)
        def counted(*args: Any, **kwargs: Any) -> None:
            tried(name, max_examples)
            CURRENT[0] = name
            test(*args, **kwargs)

        return fuzz_settings(max_examples)(given(**strategies)(counted))

    return decorate


def tried(name: str, limit: int) -> None:
    """Count one example of property ``name`` (run under ``max_examples=limit``)."""
    EXAMPLES[name] += 1
    LIMITS[name] = limit


def outcome(name: str, what: str) -> None:
    """Note what one example of property ``name`` ended in."""
    OUTCOMES.setdefault(name, Counter())[what] += 1


def write_counts() -> None:
    """Merge this module's counts into ``test-artifacts/fuzz.json`` (other modules' stay)."""
    ARTIFACTS.mkdir(exist_ok=True)
    table = json.loads(FUZZ_FILE.read_text()) if FUZZ_FILE.exists() else {}
    for name, count in EXAMPLES.items():
        table[name] = {"examples": count, "max_examples": LIMITS[name]}
        if name in OUTCOMES:
            table[name]["outcomes"] = dict(sorted(OUTCOMES[name].items()))
    FUZZ_FILE.write_text(json.dumps(dict(sorted(table.items())), indent=2) + "\n")


# --- strategies ----------------------------------------------------------------------------------

NASTY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "x'; DROP TABLE person; --",
        '"; SELECT 1; --',
        "@cdm_database_schema",
        "{{ 7*7 }}",
        "\x00",
        "é\u202e\ufeff",
        "../../etc/passwd",
        "1e309",
        "NaN",
        "2024-02-30",
        "a" * 70,
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | NASTY_TEXT
)


def documents(
    scalars: st.SearchStrategy[Any], *, size: int, key_size: int, leaves: int
) -> st.SearchStrategy[Any]:
    """Nested lists and tables of ``scalars`` (JSON, TOML: one shape, the format's scalars)."""
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=size)
            | st.dictionaries(st.text(max_size=key_size), inner, max_size=size)
        ),
        max_leaves=leaves,
    )


JSON_VALUES = documents(SCALARS, size=4, key_size=8, leaves=10)


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep (deep nesting without recursion in the strategy)."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def paths(document: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document (the root excluded)."""
    found: list[tuple[Any, ...]] = []
    items = (
        document.items()
        if isinstance(document, dict)
        else enumerate(document)
        if isinstance(document, list)
        else []
    )
    for key, value in items:
        found.append((*prefix, key))
        found += paths(value, (*prefix, key))
    return found


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        document = document[key]
    return document


@st.composite
def mutated(draw: st.DrawFn, base: Any, values: st.SearchStrategy[Any] = JSON_VALUES) -> Any:
    """A copy of ``base`` with one to three changes: a value replaced (by any JSON value, deep
    nesting, an oversized string, the same value as text), a key removed or added."""
    document = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        where = paths(document)
        if not where:
            break
        path = draw(st.sampled_from(where))
        parent = _parent(document, path)
        operation = draw(st.sampled_from(["replace", "remove", "add", "deep", "huge", "as_text"]))
        if operation == "remove":
            del parent[path[-1]]
        elif operation == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
        elif operation == "deep":
            parent[path[-1]] = nested(draw(st.integers(20, 200)))
        elif operation == "huge":
            parent[path[-1]] = "x" * draw(st.sampled_from([10_000, 1_000_000]))
        elif operation == "as_text":
            parent[path[-1]] = json.dumps(parent[path[-1]], default=str)
        else:
            parent[path[-1]] = draw(values)
    return document


# --- what a refusal must leave unchanged ---------------------------------------------------------


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes ('' when absent)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def sqlite_digest(path: Path) -> str:
    """SHA-256 of a SQLite file's logical content (its SQL dump): WAL checkpoints change the
    bytes on disk without changing a row, so the bytes are not what is compared."""
    if not path.exists():
        return ""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
    finally:
        con.close()


@dataclass(frozen=True)
class NodeState:
    """A node's durable state: its CDM's bytes, its ledger's and overlap record's rows, and
    its audit log's entries (how many, and whether the chain verifies)."""

    cdm: str
    ledger: str
    overlap: str
    audit_entries: int
    audit_problems: int

    @classmethod
    def of(cls, policy: Any) -> NodeState:
        from node.audit import AuditLog

        audit = AuditLog(policy.audit_path)
        return cls(
            cdm=file_digest(policy.cdm_path),
            ledger=sqlite_digest(policy.ledger_path),
            overlap=sqlite_digest(policy.overlap_path),
            audit_entries=len(audit.entries()),
            audit_problems=len(audit.verify()),
        )


def assert_refused_cleanly(reply: Any, before: NodeState, policy: Any) -> None:
    """A refusal: nothing released, a clear reason (not an unexpected exception inside the
    node), one more audit entry saying so, the chain intact, CDM and ledger unchanged."""
    from node.audit import AuditLog

    after = NodeState.of(policy)
    assert not reply.released and not reply.statistics
    assert reply.reason and not reply.reason.startswith("node error"), reply.reason
    assert after.cdm == before.cdm
    assert after.ledger == before.ledger and after.overlap == before.overlap
    assert after.audit_entries == before.audit_entries + 1
    assert after.audit_problems == 0
    entry = AuditLog(policy.audit_path).entries()[-1]
    assert entry["verdict"] == "refused" and entry["reason"] == reply.reason
    assert entry["hash"] == reply.audit_hash


def assert_answered_cleanly(reply: Any, before: NodeState, policy: Any) -> None:
    """A release or a clean refusal; a release changes the CDM never, the audit by one entry."""
    if not reply.released:
        assert_refused_cleanly(reply, before, policy)
        return
    after = NodeState.of(policy)
    assert after.cdm == before.cdm
    assert after.audit_entries == before.audit_entries + 1 and after.audit_problems == 0
