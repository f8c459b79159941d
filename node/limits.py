"""Bounded input and bounded output at a node's door: field sizes, JSON nesting, reason text.

A request's fields arrive as JSON text (``node.messages``). Each is checked against its
limit (``FIELD_LIMITS``) and its nesting depth (``MAX_JSON_DEPTH``) before
``json.loads`` sees it, so a 20 MB key id or a state nested 100,000 deep is refused for the
cost of one length check and one linear scan. Everything a node writes back or into its audit
log about a refusal passes ``bounded_text``: an over-long reason keeps its head and names the
SHA-256 and length of the whole, never the payload itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import numpy as np

# Size limits of a request's fields, checked on the raw text BEFORE it is parsed
# (``parse_json_field``), so an oversized or deeply nested field costs the node a
# length check and one linear scan, never a parse, a validation or an echo.
MIB = 1024 * 1024
#: A study definition (YAML/JSON mapping; inlined Circe cohorts are a few kB each).
MAX_STUDY_BYTES = 1 * MIB
#: A signed permit (one key id, a few node keys and grants).
MAX_PERMIT_BYTES = 64 * 1024
#: A round's state (GLM/Cox coefficients, pooled roster, DP-SGD weights).
MAX_STATE_BYTES = 4 * MIB
#: The signed releases of the previous round forwarded to each node.
MAX_TRANSCRIPT_BYTES = 32 * MIB
#: Per-field limits by the wire record's key (``node.messages``).
FIELD_LIMITS: dict[str, int] = {
    "study": MAX_STUDY_BYTES,
    "permit": MAX_PERMIT_BYTES,
    "state": MAX_STATE_BYTES,
    "transcript": MAX_TRANSCRIPT_BYTES,
}
#: Deepest nesting of JSON arrays and objects in any field (a study needs about 10).
MAX_JSON_DEPTH = 32
#: Longest analysis id (study ids are at most 64 characters).
MAX_ANALYSIS_ID_CHARS = 200
#: Longest refusal reason a reply or audit entry carries; longer ones are cut and hashed.
MAX_REASON_CHARS = 500


#: A JSON string literal, escapes included (the unrolled form: no backtracking per character).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
#: +1 for an opening bracket, -1 for a closing one, by byte value.
_STEP = np.zeros(256, dtype=np.int64)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1
_CHUNK = 1 << 20


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, without parsing or recursion.

    String literals and everything but brackets are removed first, then the running sum of +1
    per ``[``/``{`` and -1 per ``]``/``}`` is taken with numpy in chunks: linear in the text,
    no Python-level loop per character, bounded memory. Malformed text gets some number here
    and is refused by the parser afterwards.
    """
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", raw))
    codes = np.frombuffer(brackets, dtype=np.uint8)
    deepest, level = 0, 0
    for start in range(0, codes.size, _CHUNK):
        running = np.cumsum(_STEP[codes[start : start + _CHUNK]]) + level
        deepest, level = max(deepest, int(running.max())), int(running[-1])
    return deepest


def parse_json_field(name: str, text: Any, max_bytes: int) -> Any:
    """``json.loads(text)`` once its size and nesting are within bounds; ``ValueError`` names
    the field and the limit (never the content) otherwise."""
    if not isinstance(text, str | bytes):
        raise ValueError(f"field {name!r} must be JSON text, not {type(text).__name__}")
    size = len(text.encode("utf-8")) if isinstance(text, str) else len(text)
    if size > max_bytes:
        raise ValueError(f"field {name!r} is {size} bytes, over its limit of {max_bytes} bytes")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"field {name!r} nests {depth} deep, over the limit of {MAX_JSON_DEPTH}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(
            f"field {name!r} is not valid JSON: {bounded_text(str(err), 200)}"
        ) from err


def bounded_text(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` if it fits in ``limit`` characters, else its head and the SHA-256 and length of
    the whole, so a refusal stays identifiable without carrying what was refused."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
    tail = f"... [{len(text)} chars, sha256 {digest}]"
    return text[: max(limit - len(tail), 0)] + tail


def bounded_id(value: Any) -> str:
    """An analysis id from the wire: text of at most ``MAX_ANALYSIS_ID_CHARS`` characters."""
    if not isinstance(value, str):
        raise ValueError(f"analysis_id must be text, not {type(value).__name__}")
    if len(value) > MAX_ANALYSIS_ID_CHARS:
        raise ValueError(
            f"analysis_id is {len(value)} characters, over the limit of {MAX_ANALYSIS_ID_CHARS}"
        )
    return value
