"""SQL text helpers every loader shares.

A leaf module: the schema, the quarantine and the loaders all quote identifiers, and putting
``quote`` here (not in ``schema``) keeps ``quarantine`` from importing ``schema`` while
``schema`` creates the quarantine table.
"""

from __future__ import annotations


def quote(identifier: str) -> str:
    """Quote an identifier for DuckDB SQL (names here come from the spec, never from users)."""
    return '"' + identifier.replace('"', '""') + '"'


def quote_text(text: str) -> str:
    """A SQL string literal of ``text`` (a reason or label the loader writes, never user SQL)."""
    return "'" + text.replace("'", "''") + "'"
