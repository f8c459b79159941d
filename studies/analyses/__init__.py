"""The analysis kinds: each kind's ``Spec`` in ``studies.analyses.specs`` (pydantic only), its
computation (``local``/``combine``) in a module of its own, registered in ``studies.registry``.

A study's analysis entry ``{"id": ..., "kind": ..., ...}`` is validated by
``REGISTRY.spec(kind)`` and run through ``REGISTRY[kind]()``. Importing this package loads no
kind: the registry imports a kind's module the first time it runs, so validating a study never
loads polars, DuckDB or numpy.
"""

from __future__ import annotations

from studies.registry import REGISTRY, register

__all__ = ["REGISTRY", "register"]
