"""Field rules every part of a study shares: names, and ordered bounds.

Why one module: the study schema (``studies.model``) and every analysis spec
(``studies.analyses``) name things and bound intervals; with one definition each their rules
and messages cannot drift apart. Pydantic only, so specs import it without any compute library.
The permit and the node policy order their paired fields (dates, budgets) with the same module's
``fields_in_order``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, model_validator

NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
"""A name a study gives (study, concept set, cohort, analysis): a letter, then letters, digits,
``_`` or ``-``, at most 64 characters."""


def check_name(value: str) -> str:
    """Refuse anything but a plain identifier, so a name can never smuggle SQL or markup."""
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use letters, digits, '_' or '-', "
            "starting with a letter, at most 64 characters"
        )
    return value


Name = Annotated[str, AfterValidator(check_name)]


def check_ordered(
    what: str,
    start: Any,
    end: Any,
    words: tuple[str, str] = ("start", "end"),
    relation: str = "is after",
) -> None:
    """Refuse an interval whose ``start`` lies after its ``end`` (a missing bound is open).

    The one "start <= end" rule of study fields: windows, calendar periods, value ranges
    (``words`` names the bounds and ``relation`` their order, e.g. ``("min", "max")`` and
    ``"is greater than"``).
    """
    if start is not None and end is not None and start > end:
        raise ValueError(f"{what} {words[0]} {start} {relation} its {words[1]} {end}")


def fields_in_order(low: str, high: str, relation: str = "before") -> Any:
    """A pydantic "after" model validator refusing a model whose field ``high`` lies below its
    field ``low`` (``"{high} is {relation} {low}"``): the same rule for a permit's validity
    dates and a node policy's budgets and retention dates. Assign it in the class body."""

    def check(model: Any) -> Any:
        if getattr(model, high) < getattr(model, low):
            raise ValueError(f"{high} is {relation} {low}")
        return model

    return model_validator(mode="after")(check)
