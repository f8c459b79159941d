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

#: Where every shipped kind's Spec is: ``SPECS`` of this module, keyed by the Spec's ``kind``.
SPECS_MODULE = "studies.analyses.specs"

#: The analysis kinds fedomop ships: kind -> the module (in ``studies.analyses``) whose class
#: registers it; most kinds live in the module of their name.
SHIPPED: dict[str, str] = {
    kind: kind
    for kind in ("characterization", "counts", "cox", "glm", "incidence", "meta", "prevalence")
} | {
    "survival": "survival",
    "dp_sgd": "dpsgd",
    "pooled_counts": "pooled",
    "pooled_glm": "pooled_glm",
    "pooled_survival": "pooled_survival",
}


class Registry(Mapping[str, Any]):
    """``kind`` -> analysis class, the shipped kinds imported on first use; ``spec(kind)``
    without importing the analysis."""

    def __init__(self, shipped: dict[str, str]) -> None:
        self._shipped = shipped
        self._classes: dict[str, Any] = {}

    def __getitem__(self, kind: str) -> Any:
        if kind not in self._classes and kind in self._shipped:
            importlib.import_module(self._module(kind))  # importing it registers the class
        return self._classes[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shipped | self._classes)

    def __len__(self) -> int:
        return len(self._shipped.keys() | self._classes.keys())

    def __contains__(self, kind: object) -> bool:
        """Whether ``kind`` names an analysis; a study's kind may be any JSON value (a list is
        unhashable), and only text names one."""
        return isinstance(kind, str) and (kind in self._shipped or kind in self._classes)

    def spec(self, kind: str) -> Any:
        """The pydantic ``Spec`` an analysis of ``kind`` is validated by (``KeyError`` if no
        such kind); a shipped kind's analysis module is not imported for it."""
        if kind in self._classes:
            return self._classes[kind].Spec
        if kind not in self._shipped:
            raise KeyError(kind)
        return importlib.import_module(SPECS_MODULE).SPECS[kind]

    def _module(self, kind: str) -> str:
        return f"studies.analyses.{self._shipped[kind]}"

    def add(self, cls: Any) -> None:
        """Record ``cls`` under its ``kind``; a kind taken by another class is refused."""
        kind = getattr(cls, "kind", None)
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"{cls.__qualname__} has no 'kind' to register under")
        taken = self._classes.get(kind)
        home = self._module(kind) if kind in self._shipped else cls.__module__
        if taken not in (None, cls) or cls.__module__ != home:
            owner = home if taken is None else f"{taken.__module__}.{taken.__qualname__}"
            raise ValueError(
                f"analysis kind {kind!r} is already registered by {owner}; cannot register "
                f"{cls.__module__}.{cls.__qualname__} under it"
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
