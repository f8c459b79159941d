"""The canonical form of a study and its SHA-256: what a permit binds.

Canonical JSON = the validated study with every default filled in (so leaving a default out or
writing it explicitly is the same study), Circe files inlined, keys sorted, no insignificant
whitespace, UTF-8. The same study written as YAML or JSON, in any key order, hashes the same;
any change that alters what a node would compute changes the hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from studies.model import Study


def canonical_data(study: Study) -> dict[str, Any]:
    """The study as plain JSON data with defaults filled (analyses dumped through their Spec)."""
    data = study.model_dump(mode="json")
    data["analyses"] = [spec.model_dump(mode="json") for spec in study.analyses]
    return data


def canonical_json(study: Study) -> str:
    """Sorted keys, compact separators, non-ASCII kept as UTF-8: one text per study."""
    return json.dumps(
        canonical_data(study), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def study_hash(study: Study) -> str:
    """SHA-256 hex digest of ``canonical_json(study)``."""
    return hashlib.sha256(canonical_json(study).encode("utf-8")).hexdigest()
