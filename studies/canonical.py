"""Canonical JSON, the one byte form of a JSON value that is signed or hashed, and the canonical
form of a study and its SHA-256: what a permit binds.

Canonical JSON = sorted keys, no insignificant whitespace, non-ASCII kept as UTF-8, NaN and
infinities refused (JSON has none). Permits, audit entries, transcripts and study hashes all use
``canonical_json``: one rule, so a value hashes and verifies the same wherever it is written.

A study's canonical form = the validated study with every default filled in (so leaving a default out or
writing it explicitly is the same study), Circe files inlined, keys sorted, no insignificant
whitespace, UTF-8. The same study written as YAML or JSON, in any key order, hashes the same;
any change that alters what a node would compute changes the hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from studies.model import Study


def canonical_data(study: Study) -> dict[str, Any]:
    """The study as plain JSON data with defaults filled (analyses dumped through their Spec)."""
    data = study.model_dump(mode="json")
    data["analyses"] = [spec.model_dump(mode="json") for spec in study.analyses]
    return data


def canonical_json(obj: Any) -> bytes:
    """The one byte string signed or hashed for a JSON value: sorted keys, no spaces, UTF-8,
    no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def canonical_study_json(study: Study) -> str:
    """``canonical_json`` of the study's canonical data, as text: one text per study."""
    return canonical_json(canonical_data(study)).decode("utf-8")


def study_hash(study: Study) -> str:
    """SHA-256 hex digest of the study's canonical JSON."""
    return hashlib.sha256(canonical_json(canonical_data(study))).hexdigest()
