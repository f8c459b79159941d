"""The registry of analysis kinds: ``kind`` -> the class with ``local``/``combine`` and a ``Spec``.

Why a leaf module: every kind registers itself here at import, and the study schema looks kinds
up here; with the registry in the package ``studies.analyses`` (which imported every kind) each
kind imported its own package back, a circle.

Why lazy: validating a study needs each kind's ``Spec`` only (pydantic, in
``studies.analyses.specs``), while the analysis classes import polars, DuckDB and numpy. So the
registry knows every shipped kind by where it lives (``SHIPPED``) and imports an analysis module
the first time ``REGISTRY[kind]`` is asked for; ``REGISTRY.spec(kind)`` imports the Spec's module
alone. Importing the module registers its class (``@register``), which refuses a duplicate.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

#: The analysis kinds fedomop ships: kind -> (its Spec, its analysis class) as ``module:name``.
SHIPPED: dict[str, tuple[str, str]] = {
    kind: (f"studies.analyses.specs:{spec}", f"studies.analyses.{module}:{analysis}")
    for kind, spec, module, analysis in (
        ("characterization", "CharacterizationSpec", "characterization", "Characterization"),
        ("counts", "CountsSpec", "counts", "Counts"),
        ("cox", "CoxSpec", "cox", "Cox"),
        ("dp_sgd", "DpSgdSpec", "dpsgd", "DpSgd"),
        ("glm", "GlmSpec", "glm", "Glm"),
        ("incidence", "IncidenceSpec", "incidence", "Incidence"),
        ("meta", "MetaSpec", "meta", "Meta"),
        ("pooled_counts", "PooledCountsSpec", "pooled", "PooledCounts"),
        ("prevalence", "PrevalenceSpec", "prevalence", "Prevalence"),
        ("survival", "SurvivalSpec", "survival", "Survival"),
    )
}


def _resolve(path: str) -> Any:
    """The object a ``module:name`` path names, importing its module."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Registry(Mapping[str, Any]):
    """``kind`` -> analysis class, the shipped kinds imported on first use; ``spec(kind)``
    without importing the analysis."""

    def __init__(self, shipped: dict[str, tuple[str, str]]) -> None:
        self._shipped = shipped
        self._classes: dict[str, Any] = {}

    def __getitem__(self, kind: str) -> Any:
        if kind not in self._classes and kind in self._shipped:
            _resolve(self._shipped[kind][1])  # importing the module registers the class
        return self._classes[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shipped | self._classes)

    def __len__(self) -> int:
        return len(self._shipped.keys() | self._classes.keys())

    def __contains__(self, kind: object) -> bool:
        return kind in self._shipped or kind in self._classes

    def spec(self, kind: str) -> Any:
        """The pydantic ``Spec`` an analysis of ``kind`` is validated by (``KeyError`` if no
        such kind); a shipped kind's analysis module is not imported for it."""
        if kind in self._classes:
            return self._classes[kind].Spec
        return _resolve(self._shipped[kind][0])

    def add(self, cls: Any) -> None:
        """Record ``cls`` under its ``kind``; a kind taken by another class is refused."""
        kind = getattr(cls, "kind", None)
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"{cls.__qualname__} has no 'kind' to register under")
        name = f"{cls.__module__}.{cls.__qualname__}"
        taken = self._classes.get(kind)
        shipped = self._shipped[kind][1].replace(":", ".") if kind in self._shipped else None
        owner = f"{taken.__module__}.{taken.__qualname__}" if taken is not None else shipped
        if (taken is not None and taken is not cls) or owner not in (None, name):
            raise ValueError(
                f"analysis kind {kind!r} is already registered by {owner}; cannot register "
                f"{name} under it"
            )
        self._classes[kind] = cls

    def discard(self, kind: str) -> None:
        """Forget a kind registered at run time (tests); the shipped table is not changed."""
        self._classes.pop(kind, None)


REGISTRY = Registry(SHIPPED)
"""Every analysis kind, by its ``kind`` name."""

AnalysisClass = TypeVar("AnalysisClass", bound=type)


def register(cls: AnalysisClass) -> AnalysisClass:
    """Class decorator: add an analysis class to the registry under its ``kind``.

    A second class under a kind already taken (registered, or shipped from another module) is
    refused (``ValueError`` naming both), as Flower's app decorators refuse a second handler:
    silently replacing a kind would run other code than the study's reviewers read.
    """
    REGISTRY.add(cls)
    return cls
