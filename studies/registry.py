"""The registry of analysis kinds: ``kind`` -> the class with ``local``/``combine`` and a ``Spec``.

Why a leaf module: every kind registers itself here at import, and the study schema looks kinds
up here; with the registry in the package ``studies.analyses`` (which imports every kind) each
kind imported its own package back, a circle. ``studies.analyses`` imports the kinds and
re-exports ``REGISTRY``, so importing it is what fills the registry.
"""

from __future__ import annotations

from typing import Any, TypeVar

REGISTRY: dict[str, Any] = {}
"""Every registered analysis kind, by its ``kind`` name."""

AnalysisClass = TypeVar("AnalysisClass", bound=type)


def register(cls: AnalysisClass) -> AnalysisClass:
    """Class decorator: add an analysis class to the registry under its ``kind``.

    A second class under a kind already taken is refused (``ValueError`` naming both), as
    Flower's app decorators refuse a second handler: silently replacing a kind would run other
    code than the study's reviewers read.
    """
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{cls.__qualname__} has no 'kind' to register under")
    taken = REGISTRY.get(kind)
    if taken is not None and taken is not cls:
        raise ValueError(
            f"analysis kind {kind!r} is already registered by "
            f"{taken.__module__}.{taken.__qualname__}; cannot register "
            f"{cls.__module__}.{cls.__qualname__} under it"
        )
    REGISTRY[kind] = cls
    return cls
