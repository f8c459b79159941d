"""What a release mechanism needs to know of a permit's grant for one analysis.

Why here: a grant is a privacy notion, and privacy/ sits below studies/. The permit's
``studies.permit.PermitAnalysis`` satisfies ``Grant`` structurally, so privacy's mechanisms
(``privacy.dp``) take any grant without importing the permit model.
"""

from __future__ import annotations

from typing import Literal, Protocol

Mechanism = Literal["none", "gaussian", "laplace", "dp_sgd"]
"""How an analysis may be released: disclosure control only, OpenDP noise, or DP-SGD."""


class Grant(Protocol):
    """The release terms a permit grants one analysis (read-only)."""

    @property
    def id(self) -> str: ...
    @property
    def mechanism(self) -> Mechanism: ...
    @property
    def cost(self) -> float: ...
    @property
    def max_rows_per_person(self) -> int | None: ...
    @property
    def resolution(self) -> float: ...
