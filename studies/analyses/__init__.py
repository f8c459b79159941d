"""Every analysis kind, imported so that each registers itself in ``studies.registry``.

A study's analysis entry ``{"id": ..., "kind": ..., ...}`` is validated by ``REGISTRY[kind].Spec``
(a pydantic model with at least ``id`` and ``kind``), and run through ``REGISTRY[kind]()``.
"""

from __future__ import annotations

from studies.analyses import (  # noqa: F401
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
from studies.registry import REGISTRY, register

__all__ = ["REGISTRY", "register"]
