"""The coordinator's (and every node's) side of one dropout-tolerant secure sum, as rounds.

Every pooled analysis (``pooled_counts``, ``pooled_survival``, ``pooled_glm``) sums one vector
per node through the same five rounds (``privacy.secagg_plus``; the gate's side is
``node.pooled``): keys, shares, masked, consistency, reveal. ``advance`` is the step from one
round's released tables to the next round's state, or to the unmasked total after ``reveal``.
It is deterministic (the transcript rule: every node re-derives each state with it from the
signed releases), and it is the only place the protocol's states are built, so the analyses
differ only in what their vector holds and how they read it (``SumPlan.read``).

A multi-round analysis (``pooled_glm``: one sum per Newton step) starts a fresh sum with
``next_sum``: phase ``keys`` and ``epoch`` + 1, so every node derives new keys, seeds and
shares for it (``node.pooled``); reusing one sum's seeds for the next would let a coordinator
that learnt a node's self-mask seed in one sum (the node survived) ask for its mask key in the
next (call it dropped) and so unmask it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from privacy.defaults import DEFAULT_MIN_CELL_COUNT
from privacy.fixed_point import WIDE_VECTOR
from privacy.secagg import KEY_VARIABLE, MIN_PARTIES, RING_BITS, ROW_ORDER, SecAggError
from studies.analyses.pooling import node_names
from studies.analysis import CombineInput, NextRound

PROTOCOL_KEYS = (
    "phase",
    "roster",
    "signatures",
    "threshold",
    "colluders",
    "min_cell_count",
    "shares",
    "survivors",
    "masked",
    "survivor_signatures",
)
"""State keys the protocol owns; anything else (``epoch``, a model's ``fit``) is carried."""
GUARDS = "guards"
"""State key of the noisy pooled guard totals of a multi-sum analysis whose exact sums follow
a noisy guard sum (``pooled_glm``): carried into every later sum, where each node's gate
checks them against its own minimum cell count before it sends an exact sum (``node.pooled``)."""


@dataclass(frozen=True)
class SumPlan:
    """What one analysis's secure sum needs beyond the protocol: its id (the session's), the
    study's threshold and colluders, the ring, and how to read a node's masked vector (checked
    against the rows the study fixes, or a ``SecAggError`` naming the node)."""

    analysis_id: str
    threshold: int | None
    colluders: int | None
    read: Callable[[str, pl.DataFrame], list[int]]
    bits: int = RING_BITS


@dataclass(frozen=True)
class Total:
    """The unmasked total after ``reveal``: signed ring integers in the vector's order, the
    nodes it sums (U2), the largest minimum cell count they announced, and the state (carried
    keys included)."""

    values: list[int]
    survivors: list[str]
    min_cell_count: int
    state: dict[str, Any]


def has_protocol_rows(inputs: CombineInput) -> bool:
    """Whether the nodes answered through gates (protocol rows) rather than plain statistics
    (the gateless reference, ``studies.runner.run_local``)."""
    return any(protocol_rows(frame).height for frame in inputs.statistics)


def advance(inputs: CombineInput, state: dict[str, Any] | None, plan: SumPlan) -> NextRound | Total:
    """The next round's state of the sum, or its ``Total`` once the ``reveal`` round is in."""
    names = node_names(inputs)
    tables = dict(zip(names, inputs.statistics, strict=True))
    frames = {name: protocol_rows(frame) for name, frame in tables.items()}
    phase = (state or {}).get("phase", "keys")
    if phase == "keys":
        return NextRound(_roster_state(frames, state or {}, plan))
    if phase == "share":
        return NextRound(_senders_state(frames, state))
    if phase == "masked":
        return NextRound(_survivors_state(tables, state, plan))
    if phase == "consistency":
        return NextRound(_reveal_state(frames, state))
    if phase != "reveal":
        raise SecAggError(f"pooled analysis {plan.analysis_id!r}: unknown phase {phase!r}")
    values = unmask_frames(frames, state, plan)
    return Total(values, list(state["survivors"]), int(state["min_cell_count"]), state)


def next_sum(state: dict[str, Any], **carry: Any) -> dict[str, Any]:
    """The ``keys`` state of a fresh sum after this one: new epoch, the carried keys updated."""
    kept = {k: v for k, v in state.items() if k not in PROTOCOL_KEYS}
    return kept | carry | {"phase": "keys", "epoch": int(state.get("epoch", 0)) + 1}


def protocol_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows of the protocol itself (keys, shares, signatures, wide vectors, check)."""
    return frame.filter(pl.col("variable_name") == KEY_VARIABLE)


def count_reader(expected: pl.DataFrame) -> Callable[[str, pl.DataFrame], list[int]]:
    """A reader of 48-bit vectors sent as value rows: the rows must be ``expected`` (sorted as
    every node sorts them) plus the one check row."""

    def read(name: str, frame: pl.DataFrame) -> list[int]:
        is_check = pl.col("variable_name") == KEY_VARIABLE
        rows = frame.filter(~is_check).sort([*ROW_ORDER, "estimate_name"])
        if not rows.select(expected.columns).equals(expected) or frame.filter(is_check).height != 1:
            raise SecAggError(f"the masked vector of {name!r} does not have the study's rows")
        return [int(v) for v in pl.concat([rows, frame.filter(is_check)])["value"]]

    return read


def wide_reader(length: int, bits: int) -> Callable[[str, pl.DataFrame], list[int]]:
    """A reader of wide-ring vectors sent as one hex row (``length`` values and the check)."""
    width = bits // 8

    def read(name: str, frame: pl.DataFrame) -> list[int]:
        rows = frame.filter(pl.col("estimate_name") == WIDE_VECTOR)
        try:
            single = rows.height == 1 and frame.height == 1
            blob = bytes.fromhex(rows["variable_level"].item()) if single else b""
        except (ValueError, TypeError):
            blob = b""
        if len(blob) != (length + 1) * width:
            raise SecAggError(f"the masked vector of {name!r} does not have the study's length")
        return [int.from_bytes(blob[i : i + width], "big") for i in range(0, len(blob), width)]

    return read


def _roster_state(
    keys: dict[str, pl.DataFrame], state: dict[str, Any], plan: SumPlan
) -> dict[str, Any]:
    """The ``share`` round's state: every node's two public keys, their signature by the node's
    pooling identity (each node checks them against the permit), the threshold (the study's,
    else every node) and the largest minimum cell count announced; carried keys kept."""
    roster, signatures, min_cells = {}, {}, [DEFAULT_MIN_CELL_COUNT]
    for name, rows in keys.items():
        found = dict(zip(rows["estimate_name"], rows["variable_level"], strict=True))
        if not {"channel_key", "mask_key", "key_signature"} <= set(found):
            raise SecAggError(
                f"node {name!r} sent no signed keys for pooled analysis {plan.analysis_id!r}"
            )
        roster[name] = {"channel": found["channel_key"], "mask": found["mask_key"]}
        signatures[name] = found["key_signature"]
        min_cells += rows.filter(pl.col("estimate_name") == "min_cell_count")["value"].to_list()
    if len(roster) < MIN_PARTIES:
        raise SecAggError(
            f"pooled analysis {plan.analysis_id!r} needs {MIN_PARTIES} nodes, has {len(roster)}"
        )
    carried = {k: v for k, v in state.items() if k not in PROTOCOL_KEYS}
    return carried | {
        "phase": "share",
        "roster": roster,
        "signatures": signatures,
        "threshold": plan.threshold or len(roster),
        "colluders": plan.colluders,
        "min_cell_count": max(min_cells),
    }


def _senders_state(frames: dict[str, pl.DataFrame], state: dict[str, Any]) -> dict[str, Any]:
    """The ``masked`` round's state: U1 (who sent shares) and every ciphertext, by recipient."""
    shares = {
        name: dict(zip(rows["strata_level"], rows["variable_level"], strict=True))
        for name, rows in frames.items()
        if name in state["roster"]
    }
    _enough(len(shares), state["threshold"], "nodes shared their seeds")
    return {**state, "phase": "masked", "shares": shares}


def _survivors_state(
    vectors: dict[str, pl.DataFrame], state: dict[str, Any], plan: SumPlan
) -> dict[str, Any]:
    """The ``consistency`` round's state: U2 (whose masked vectors arrived) and those vectors
    (wide-ring ones as hex, so that two derivations of the state compare exactly)."""
    stray = sorted(set(vectors) - set(state["shares"]))
    if stray:
        raise SecAggError(f"masked vectors from nodes that shared no seeds: {stray}")
    _enough(len(vectors), state["threshold"], "masked vectors arrived")
    masked: dict[str, Any] = {name: plan.read(name, frame) for name, frame in vectors.items()}
    if plan.bits != RING_BITS:
        masked = {name: [format(v, "x") for v in vector] for name, vector in masked.items()}
    return {**state, "phase": "consistency", "survivors": sorted(masked), "masked": masked}


def _reveal_state(frames: dict[str, pl.DataFrame], state: dict[str, Any]) -> dict[str, Any]:
    """The ``reveal`` round's state: the survivors' signatures over U2."""
    signatures = {
        name: rows["variable_level"].item()
        for name, rows in frames.items()
        if name in state["survivors"] and rows.height == 1
    }
    _enough(len(signatures), state["threshold"], "nodes signed the survivors")
    return {**state, "phase": "reveal", "survivor_signatures": signatures}


def unmask_frames(
    frames: dict[str, pl.DataFrame], state: dict[str, Any], plan: SumPlan
) -> list[int]:
    """The survivors' total (signed integers) from the ``reveal`` round's shares."""
    from privacy.secagg_plus import session_id, unmask_total  # Flower's Shamir: not at validate

    revealed = {
        name: {
            owner: (kind, share)
            for owner, kind, share in rows.select(
                "strata_level", "estimate_name", "variable_level"
            ).iter_rows()
        }
        for name, rows in frames.items()
    }
    masked = {
        name: [int(v, 16) if isinstance(v, str) else int(v) for v in vector]
        for name, vector in state["masked"].items()
    }
    session = session_id(plan.analysis_id, state["roster"], state["threshold"])
    return unmask_total(
        masked,
        revealed,
        state["roster"],
        state["survivors"],
        state["threshold"],
        session,
        plan.bits,
    )


def _enough(count: int, threshold: int, what: str) -> None:
    """Fewer than the threshold: the sum cannot be completed; say so, release nothing."""
    if count < threshold:
        raise SecAggError(
            f"only {count} {what}, the threshold is {threshold}: the pooled sum cannot be "
            "completed (more nodes dropped than it tolerates)"
        )
