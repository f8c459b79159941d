"""Registry of analysis kinds: each kind is a class with ``local``/``combine`` and a ``Spec`` model.

A study's analysis entry ``{"id": ..., "kind": ..., ...}`` is validated by ``REGISTRY[kind].Spec``
(a pydantic model with at least ``id`` and ``kind``), and run through ``REGISTRY[kind]()``.
"""

from __future__ import annotations

from typing import Any

REGISTRY: dict[str, Any] = {}


def register(cls: Any) -> Any:
    """Class decorator: add an analysis class to the registry under its ``kind``."""
    REGISTRY[cls.kind] = cls
    return cls


# Import every kind's module last, so each can ``from studies.analyses import register``.
from studies.analyses import (  # noqa: E402, F401
    characterization,
    counts,
    cox,
    dpsgd,
    glm,
    incidence,
    meta,
    pooled,
    pooled_glm,
    pooled_survival,
    prevalence,
    survival,
)
