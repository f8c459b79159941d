"""Rounds of a multi-round analysis: how the next state follows from the released statistics.

One code path for the state of round t+1: ``next_state`` runs the analysis's own ``combine`` on
the statistics the nodes released in round t. The coordinator's round loop
(``studies.runner.drive``) uses it to move on, and every node uses it to check the state it is
asked to compute on (``node.gate``): a node computes only on a state it derived itself from
signed releases, never on one a coordinator chose.

``combine`` is therefore deterministic: the same tables, in node-name order, with the same spec
and previous state give the same next state on every machine (to rounding: ``states_agree``
compares within a relative 1e-12).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import polars as pl

from studies.analysis import CombineInput, Finished, NextRound, ReleaseProfile, release_profile

STATE_TOLERANCE = 1e-12
"""Relative difference within which two derivations of a state are the same state."""


class RoundError(ValueError):
    """A round that cannot follow from what was released; the message says why."""


def analysis_of(spec: Any) -> Any:
    """The registered analysis class instance for a validated analysis spec."""
    from studies.analyses import REGISTRY

    return REGISTRY[spec.kind]()


def profile_of(spec: Any) -> ReleaseProfile:
    """The release profile the analysis declares for this spec."""
    return release_profile(analysis_of(spec), spec)


def step(
    analysis: Any, spec: Any, released: Mapping[str, pl.DataFrame], state: dict[str, Any] | None
) -> Finished | NextRound:
    """``combine`` over the released tables, in node-name order (the order every party uses)."""
    names = sorted(released)
    inputs = CombineInput([released[name] for name in names], names)
    outcome = analysis.combine(inputs, spec, state)
    if not isinstance(outcome, Finished | NextRound):
        raise TypeError(f"{spec.kind}.combine returned {type(outcome).__name__}")
    return outcome


def next_state(
    spec: Any, released: Mapping[str, pl.DataFrame], state: dict[str, Any] | None
) -> dict[str, Any]:
    """The state of the round after the one that released ``released`` (computed on ``state``).

    Raises ``RoundError`` when the analysis is finished there (no further round exists) or its
    ``combine`` refuses the statistics.
    """
    try:
        outcome = step(analysis_of(spec), spec, released, state)
    except (ValueError, KeyError, ArithmeticError) as err:
        raise RoundError(f"analysis {spec.id!r}: no next round follows: {err}") from err
    if isinstance(outcome, Finished):
        raise RoundError(f"analysis {spec.id!r} is finished after that round: no next round")
    return outcome.state


def states_agree(a: Any, b: Any, rel: float = STATE_TOLERANCE) -> bool:
    """Whether two JSON-like states are equal, numbers within a relative ``rel``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rel, abs_tol=rel)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(states_agree(a[k], b[k], rel) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(states_agree(x, y, rel) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def multi_round_analyses(study: Any, ids: list[str] | None = None) -> list[str]:
    """Ids of the study's analyses (among ``ids``) with rounds after the first."""
    wanted = set(ids) if ids is not None else None
    return [
        spec.id
        for spec in study.analyses
        if (wanted is None or spec.id in wanted) and profile_of(spec).multi_round
    ]


def missing_identities(study: Any, permit: Any) -> list[str]:
    """Permitted nodes without a bound identity key when a granted analysis is multi-round.

    Rounds after the first carry the previous round's releases signed by each node; a node can
    check them only against keys the permit binds, so such a permit binds one for every node.
    """
    granted = [grant.id for grant in permit.analyses]
    if not multi_round_analyses(study, granted):
        return []
    return sorted(set(permit.nodes) - set(permit.node_keys))
