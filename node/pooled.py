"""Pooled mode's release policy at a node's gate: the five rounds of a dropout-tolerant sum.

``pooled_release(compute, state, grant, node)`` is what the gate runs for a pooled analysis
(``ReleaseProfile.pooled``). The state names the round (``phase``) and carries what earlier
rounds released (keys, encrypted shares, the senders, the survivors and their signatures); under
the transcript design each node derives it from the signed releases, and the checks below hold
it to the protocol in any case (``privacy.secagg_plus``):

- round 0 (state None): two public keys signed by the node's permit-bound identity, and the
  node's minimum cell count. Nothing from the data, nothing charged;
- ``share``: the roster's keys checked against the permit's identities, the threshold against
  the node's ``min_honest_nodes``; Shamir shares of the self-mask seed and mask key, encrypted
  to each peer. Nothing charged;
- ``masked``: the person counts (``compute()``), a discrete Gaussian noise share from OpenDP
  sized for the honest nodes (``privacy.secagg.noise_share_cost``), double-masked. Charged: the
  zCDP of h summed shares (``honest_nodes_rho``);
- ``consistency``: the node signs the survivors U2 (those whose vectors arrived);
- ``reveal``: with t signatures over U2, one kind of share per node (seed or mask key).

No per-node small-cell suppression: a share reveals nothing alone and the coordinator suppresses
the noisy total. Pooled mode needs every node's identity bound in the permit.

Every pooled grant is ``gaussian``: counts always carry a noise share. An analysis whose profile
allows it (``pooled_exact``: ``pooled_glm`` only) also sums model statistics exactly (a GLM's
score, information, deviance and exact guard counts: ``release_class`` value rows), in fixed
point in the 128-bit ring (``privacy.fixed_point``; a value past its bound is refused) as one
hex row, nothing charged; but only after its noisy guard sum: the state (derived by the node
from signed releases, like the rest) must carry the noisy pooled guard totals (``GUARDS``) of
an earlier sum, each at least this node's own minimum cell count, else the node sends no model
sum. So a coordinator that skips, forges or reorders the guard sum gets a refusal, never a
score. A state's ``epoch`` (the sums done before, derived by the node like the rest of the
state) enters the key context, so each sum of a multi-sum analysis has fresh keys, seeds and
shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import polars as pl

from privacy import secagg_plus
from privacy.dp import noise_statistics, rows_per_person
from privacy.fixed_point import RING_BITS as FIXED_BITS
from privacy.fixed_point import WIDE_VECTOR, encode
from privacy.secagg import (
    KEY_VARIABLE,
    MIN_PARTIES,
    ROW_ORDER,
    SecAggError,
    honest_nodes_rho,
    noise_share_cost,
    require_node_keys,
)
from studies.analyses.secure_sum import GUARDS
from studies.permit import PermitAnalysis
from studies.statistics import make_statistics


@dataclass(frozen=True)
class PooledNode:
    """Who is releasing, under which permit: what pooled mode needs besides the data.

    ``permitted``: the permit's nodes, the only names a roster may carry; ``identities``: the
    permit's node keys (every permitted node's, ``require_node_keys``); ``min_honest``: the
    node policy's ``min_honest_nodes``; ``context``: permit id, study hash and analysis id.
    """

    name: str
    secret: bytes
    context: str
    analysis_id: str
    min_cell_count: int
    permitted: list[str]
    identities: dict[str, str]
    min_honest: int
    declared_rows: int | None = None
    """The analysis's rows-per-person declaration; a grant's figure may raise it, never lower."""
    exact_allowed: bool = False
    """The analysis sums model statistics exactly after a noisy guard sum
    (``ReleaseProfile.pooled_exact``): the coordinator then learns their exact total, nothing
    per node."""


def pooled_release(
    compute: Callable[[], pl.DataFrame], state: Any, grant: PermitAnalysis, node: PooledNode
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """What a node's gate releases for one round of a pooled analysis, and its settings."""
    if grant.mechanism != "gaussian":
        raise SecAggError(
            f"analysis {grant.id!r} is a pooled analysis: the permit must grant it mechanism "
            f"'gaussian' (noise shares summed under secure aggregation), not {grant.mechanism!r}"
        )
    require_node_keys(node.permitted, node.identities)
    node = replace(node, context=sum_context(node.context, state))
    settings: dict[str, Any] = {"pooled": True, "suppressed_cells": 0, "complementary_cells": 0}
    free = settings | {"rho_charged": 0.0, "noise_scale": 0.0}
    if state is None or (isinstance(state, dict) and state.get("phase") == "keys"):
        keys = secagg_plus.NodeKeys.derive(node.secret, node.context).public()
        signature = secagg_plus.sign_keys(node.secret, node.context, keys)
        rows = [("", keys["channel"], "channel_key"), ("", keys["mask"], "mask_key")]
        rows += [("", signature, "key_signature"), ("", "", "min_cell_count")]
        return _rows(rows, [0.0, 0.0, 0.0, float(node.min_cell_count)]), free
    round_ = ProtocolState.parse(state, node)
    if round_.phase == "share":
        shares = secagg_plus.share_secrets(
            node.secret, node.context, node.name, round_.roster, round_.threshold, round_.session
        )
        return _rows([(to, blob, "share") for to, blob in shares.items()]), free
    round_.check_senders(node.name)
    opened = secagg_plus.open_shares(
        node.secret, node.context, node.name, round_.roster, round_.inbox(node.name), round_.session
    )
    if round_.phase == "masked":
        if node.exact_allowed:
            check_guard_sum(state, node)  # before compute: a skipped guard sum reads nothing
        raw = compute()
        if _is_model_sums(raw):  # fixed-point reals in the wide ring, never noised
            if not node.exact_allowed or GUARDS not in state:
                raise SecAggError(
                    f"analysis {grant.id!r} sums model statistics: only an analysis with a "
                    "noisy guard sum before them (pooled_glm) may, and only after it"
                )
            return _masked_sums(raw, node, round_, free)
        return _masked(raw, grant, node, round_, settings)
    round_.check_survivors(node.name)
    if round_.phase == "consistency":
        signature = secagg_plus.sign_survivors(node.secret, round_.session, round_.survivors)
        return _rows([("", signature, "survivors_signature")]), free
    shown = secagg_plus.reveal(
        opened,
        round_.senders,
        round_.survivors,
        round_.survivor_signatures,
        node.identities,
        round_.threshold,
        round_.session,
    )
    return _rows([(owner, share, kind) for owner, (kind, share) in shown.items()]), free


def sum_context(context: str, state: Any) -> str:
    """The key context of one sum: the analysis's, plus the sum's ``epoch`` after the first
    (a multi-sum analysis such as ``pooled_glm`` derives fresh keys and seeds for each sum)."""
    epoch = state.get("epoch", 0) if isinstance(state, dict) else 0
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise SecAggError("pooled round state: epoch must be a whole number")
    return context if epoch == 0 else f"{context}|sum{epoch}"


def check_guard_sum(state: dict[str, Any], node: PooledNode) -> None:
    """The noisy guard sum of a multi-sum analysis (``pooled_glm``) happened and passed here.

    Its masked round (epoch 0, no ``GUARDS`` yet) sums noisy counts; every later masked round
    sums exact model statistics, so its state must carry the guard sum's noisy totals, each at
    least this node's own minimum cell count, from an earlier epoch. The state is the one this
    node derived from signed releases (``node.gate_transcript``): a coordinator cannot skip,
    forge or reorder the guard sum without the derivation failing first; this is the node's own
    reading of it, with its own k, whatever the other nodes announced.
    """
    if GUARDS not in state:
        if state.get("epoch", 0) != 0:
            raise SecAggError("a sum after the first carries no guard totals: refused")
        return
    totals = state[GUARDS]
    if state.get("epoch", 0) < 1:
        raise SecAggError("guard totals in the guard sum's own epoch: refused")
    if (
        not isinstance(totals, list)
        or not totals
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in totals)
    ):
        raise SecAggError("the state's guard totals are not a list of whole numbers")
    small = [t for t in totals if t < node.min_cell_count]
    if small:
        raise SecAggError(
            f"{len(small)} noisy pooled guard total(s) below this node's minimum cell count "
            f"{node.min_cell_count}: no model sums are sent"
        )


def _mask(values: list[int], node: PooledNode, round_: ProtocolState, bits: int) -> list[int]:
    """This node's vector under its pairwise and self masks, in a ring of ``bits`` bits."""
    return secagg_plus.masked_vector(
        values,
        node.secret,
        node.context,
        node.name,
        round_.roster,
        round_.senders,
        round_.session,
        bits,
    )


def _is_model_sums(raw: pl.DataFrame) -> bool:
    return bool(raw.height) and bool((raw["release_class"] == "value").any())


def _masked_sums(
    raw: pl.DataFrame, node: PooledNode, round_: ProtocolState, settings: dict[str, Any]
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Model sums (and their guard counts) in fixed point, masked in the wide ring, as one hex
    row: the coordinator sees a uniform string, never this node's score or information."""
    values = raw.sort(ROW_ORDER + ["estimate_name"])["value"].fill_nan(None).to_list()
    if any(v is None for v in values):
        raise SecAggError("a pooled model sum carries a missing value")
    vector = _mask(encode(values), node, round_, FIXED_BITS)
    blob = b"".join(v.to_bytes(FIXED_BITS // 8, "big") for v in vector).hex()
    return _rows([("", blob, WIDE_VECTOR)]), settings | {
        "parties": len(round_.senders),
        "threshold": round_.threshold,
        "fixed_point_bits": FIXED_BITS,
    }


def _masked(
    raw: pl.DataFrame,
    grant: PermitAnalysis,
    node: PooledNode,
    round_: ProtocolState,
    settings: dict[str, Any],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The noisy counts, double-masked, and the charge of the honest nodes' summed shares."""
    raw = _person_counts(raw)
    parties = len(round_.senders)
    share = noise_share_cost(grant.cost, parties, round_.honest)
    noisy, noise = noise_statistics(
        raw,
        grant.model_copy(update={"cost": share.share_cost}),
        declared_rows=node.declared_rows,
    )
    rows = rows_per_person(node.declared_rows, grant.max_rows_per_person)
    touched = min(rows or raw.height, raw.height)
    rho = honest_nodes_rho(noise.scale, share.honest, math.sqrt(touched), raw.height, noise.rho)
    charge = {
        "noise_scale": noise.scale,
        "total_noise_sd": noise.scale * math.sqrt(parties),
        "rho_charged": rho,
        "rho_share_alone": noise.rho,
        "rows_noised": noise.rows_noised,
    }
    vector = _mask([int(v) for v in noisy["value"]], node, round_, secagg_plus.RING_BITS)
    check = _rows([("", "", "check")])
    out = pl.concat([noisy.with_columns(release_class=pl.lit("value")), check]).with_columns(
        value=pl.Series(vector, dtype=pl.Float64)
    )
    return out, settings | charge | {
        "parties": parties,
        "threshold": round_.threshold,
        "min_honest_nodes": min(round_.honest, parties),
    }


def _rows(rows: list[tuple[str, str, str]], values: list[float] | None = None) -> pl.DataFrame:
    """Protocol rows: (strata_level: a node's name or "", variable_level: hex, estimate)."""
    return make_statistics(
        pl.DataFrame(
            {
                "strata_level": [r[0] or "overall" for r in rows],
                "variable_name": [KEY_VARIABLE] * len(rows),
                "variable_level": [r[1] for r in rows],
                "estimate_name": [r[2] for r in rows],
                "release_class": ["value"] * len(rows),
                "value": values if values is not None else [0.0] * len(rows),
            },
            schema_overrides={"value": pl.Float64},
        )
    )


@dataclass(frozen=True)
class ProtocolState:
    """A round's state, parsed strictly and checked against the permit and this node's keys."""

    phase: str
    roster: dict[str, dict[str, str]]
    threshold: int
    honest: int
    """h: honest nodes assumed, the fewer of the policy's and what the study's ``colluders``
    leave (n - c): shares and threshold are sized for it."""
    session: bytes
    shares: dict[str, dict[str, str]]
    survivors: list[str]
    survivor_signatures: dict[str, str]

    @property
    def senders(self) -> list[str]:
        """U1: the nodes whose encrypted shares the state carries."""
        return sorted(self.shares)

    def inbox(self, me: str) -> dict[str, str]:
        """The ciphertexts addressed to ``me``, by sender."""
        return {sender: blobs[me] for sender, blobs in self.shares.items() if me in blobs}

    @classmethod
    def parse(cls, state: Any, node: PooledNode) -> ProtocolState:
        if not isinstance(state, dict) or state.get("phase") not in secagg_plus.PHASES:
            raise SecAggError(
                f"pooled round state must name a phase among {list(secagg_plus.PHASES)}"
            )
        roster = _string_map(state.get("roster"), "roster", nested=True)
        threshold = state.get("threshold")
        if not isinstance(threshold, int) or isinstance(threshold, bool):
            raise SecAggError("pooled round state: threshold must be an integer")
        _check_roster(roster, node)
        secagg_plus.check_roster(roster, _string_map(state.get("signatures", {}), "signatures"),
                     node.identities, node.context)  # fmt: skip
        honest = _honest_nodes(state.get("colluders"), len(roster), node.min_honest)
        secagg_plus.check_threshold(len(roster), threshold, honest)
        phase = state["phase"]
        later = secagg_plus.PHASES.index(phase) >= secagg_plus.PHASES.index("masked")
        shares = _string_map(state.get("shares", {}), "shares", nested=True) if later else {}
        survivors = state.get("survivors", []) if phase in ("consistency", "reveal") else []
        if not isinstance(survivors, list) or not all(isinstance(s, str) for s in survivors):
            raise SecAggError("pooled round state: survivors must be a list of node names")
        signatures = state.get("survivor_signatures", {}) if phase == "reveal" else {}
        return cls(
            phase=phase,
            roster=roster,
            threshold=threshold,
            honest=honest,
            session=secagg_plus.session_id(node.analysis_id, roster, threshold),
            shares=shares,
            survivors=sorted(set(survivors)),
            survivor_signatures=_string_map(signatures, "survivor_signatures"),
        )

    def check_senders(self, me: str) -> None:
        """U1 lies in the roster, holds this node and at least t nodes."""
        _nested(
            self.senders,
            self.roster,
            me,
            "shares from nodes outside the roster",
            f"the state carries no shares from this node {me!r}",
        )
        if len(self.senders) < self.threshold:
            raise SecAggError(
                f"only {len(self.senders)} nodes shared their seeds, the threshold is "
                f"{self.threshold}: the pooled sum cannot be completed"
            )

    def check_survivors(self, me: str) -> None:
        """U2 lies in U1 and holds this node (``reveal`` checks its size and signatures)."""
        _nested(
            self.survivors,
            self.senders,
            me,
            "U2 names nodes that sent no shares",
            f"U2 does not name this node {me!r}, whose vector was sent",
        )


def _nested(inner: list[str], outer: list[str], me: str, outside: str, absent: str) -> None:
    """SecAgg+'s rule for its shrinking node sets (roster, U1, U2): each lies in the one before
    and still holds this node ``me``; ``outside`` and ``absent`` say which rule a state broke."""
    strangers = sorted(set(inner) - set(outer))
    if strangers:
        raise SecAggError(f"{outside}: {strangers}")
    if me not in inner:
        raise SecAggError(absent)


def _honest_nodes(colluders: Any, parties: int, min_honest: int) -> int:
    """The honest nodes to size for: the study's tolerated colluders c leave n - c; a study
    that tolerates fewer colluders than this node's policy fears (n - c > h) is refused."""
    if colluders is None:
        return min_honest
    if not isinstance(colluders, int) or isinstance(colluders, bool) or colluders < 0:
        raise SecAggError("pooled round state: colluders must be a whole number")
    if parties - colluders > min_honest:
        raise SecAggError(
            f"the study tolerates {colluders} colluding node(s) of {parties}, leaving "
            f"{parties - colluders} honest: this node's policy assumes only {min_honest} "
            f"(min_honest_nodes), so it needs colluders >= {parties - min_honest}"
        )
    if parties - colluders < 1:
        raise SecAggError(f"the study tolerates {colluders} colluders of {parties} nodes")
    return parties - colluders


def _check_roster(roster: dict[str, dict[str, str]], node: PooledNode) -> None:
    """The roster names permitted nodes only, this node with its own keys, three at least."""
    strangers = sorted(set(roster) - set(node.permitted))
    if strangers:
        raise SecAggError(f"the roster names nodes the permit does not: {strangers}")
    if roster.get(node.name) != secagg_plus.NodeKeys.derive(node.secret, node.context).public():
        raise SecAggError(f"the roster's keys for {node.name!r} are not this node's keys")
    if len(roster) < MIN_PARTIES:
        raise SecAggError(
            f"a pooled sum needs at least {MIN_PARTIES} nodes, the roster names {len(roster)}"
        )
    masks = [keys.get("mask") for keys in roster.values()]
    if len(set(masks)) != len(masks):
        raise SecAggError("two nodes in the roster share a public key")


def _string_map(value: Any, what: str, *, nested: bool = False) -> dict[str, Any]:
    """A JSON object of strings (or, ``nested``, of objects of strings), else a refusal."""

    def ok(v: Any) -> bool:
        if nested:
            return isinstance(v, dict) and all(
                isinstance(a, str) and isinstance(b, str) for a, b in v.items()
            )
        return isinstance(v, str)

    if not isinstance(value, dict) or not all(
        isinstance(k, str) and ok(v) for k, v in value.items()
    ):
        raise SecAggError(f"pooled round state: {what} is not a map of node names")
    return value


def _person_counts(raw: pl.DataFrame) -> pl.DataFrame:
    """The analysis's rows in the canonical order, checked to be finite person counts."""
    bad = raw.filter(
        (pl.col("release_class") != "count")
        | ~pl.col("value").is_finite()
        | ~pl.col("upper").is_nan()
    )
    if bad.height:
        raise SecAggError("a pooled release carries person counts only (finite, upper unset)")
    return raw.sort(ROW_ORDER + ["estimate_name"])
