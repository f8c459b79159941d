"""Secure aggregation for pooled counts: pairwise masks that cancel in the sum, plus noise shares.

Why not Flower's SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` with
``flwr.client.mod.secaggplus_mod``): in Flower 1.41 the workflow needs a ``LegacyContext``
(strategy/FitIns/FitRes), the client mod masks the reply *after* the ClientApp has it (outside
the node's gate) and quantises float parameters with its own rounding. fedomop's nodes speak the
Message API with ``GateRequest``/``GateReply`` and release nothing except through the gate. So
this module implements a small pairwise-masking secure sum (Bonawitz et al. 2017, without the
dropout-recovery shares) with the ``cryptography`` package, and the gate applies it:

- round 0 (``keys``): each node publishes an ephemeral X25519 public key derived from a node
  secret (kept beside its ledger) and the permit/study/analysis, so a replay gives the same key,
  and that key's signature by the node's pooling identity (below);
- round 1 (``masked``): the coordinator sends the roster (node name -> public key) and the
  signatures; each node checks them against the permit's node keys when it binds any. Each pair
  (i, j) agrees on a seed (X25519 + HKDF-SHA256, bound to the roster's session id); node i adds
  the pair's SHAKE-256 mask stream when its name sorts before j's and subtracts it otherwise,
  over integers mod 2^48 (exact in a float64, the statistics table's value type). Each node's
  vector is its noisy counts plus masks: uniform on the ring to anyone without the seeds;
- the coordinator sums mod 2^48: the masks cancel and only the noisy total is left.

A check coordinate binds the vector: each node adds ``sum_j r_j x_j`` (``r_j`` odd, from the
session) to its vector; the total must satisfy the same relation, so a missing or altered share
(masks that do not cancel, a changed value) fails loudly (``SecAggError``), never a silent
wrong total (a false pass has probability 2^-48).

Threat model, honestly: the coordinator is honest-but-curious about the data and untrusted
with the keys; nodes run their own installed code. No dropout recovery: a node missing in round 1
fails the round and the coordinator retries with a roster without it (fresh session, fresh masks,
fresh noise, charged again). A roster may name only the permit's nodes, so the coordinator cannot
invent parties, and never a key for node i other than node i's own.

Authenticated keys: each node has a *pooling identity*, an Ed25519 key derived from the same node
secret (``identity_key``); its operator hands the public half to the permit body
(``fedomop node pooling-key``), which binds it in the permit (``PermitBody.node_keys``). In round
0 a node signs its ephemeral key with its identity (over ``_INFO|ephemeral|context|key``, so a
signature is good for one permit, study and analysis only); in round 1 every node checks every
roster member's signature against the permit's identity before masking. A coordinator that swaps
node j's key for one of its own (to learn the seed node i shares with j, and unmask i) is
refused by every honest node, which releases nothing. Permits that bind no node keys keep the
unauthenticated protocol: there a malicious coordinator could unmask node i's vector, and would
learn only its *noisy* counts: each share carries noise of variance sigma^2 / (K - 1)
(``noise_share_cost``), so a single share is still ((K - 1) * rho)-zCDP.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.dp import noise_statistics, rows_per_person
from studies.permit import PermitAnalysis
from studies.statistics import make_statistics

RING_BITS = 48
"""Masked values live in Z / 2^48: uniform masks, exactly representable as float64."""
MODULUS = 1 << RING_BITS
MIN_PARTIES = 3
"""Fewest nodes in a pooled sum: with two, each learns the other's noisy share from the total."""
_INFO = b"fedomop-secagg-v1"


class SecAggError(ValueError):
    """A secure sum that cannot be formed or does not check out; the message says why."""


# --- keys ------------------------------------------------------------------------------------------


def node_secret(path: Path) -> bytes:
    """The node's 32-byte secret for ephemeral keys, created owner-only on first use.

    Ephemeral keys are derived from it per permit, study and analysis, so a node needs no state
    between the rounds of a pooled analysis and a replayed request gets the same key.
    """
    path = Path(path)
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(os.urandom(32))
                out.flush()
                os.fsync(out.fileno())
    secret = path.read_bytes()
    if len(secret) != 32:
        raise SecAggError(f"secure-aggregation secret {path} is not 32 bytes")
    return secret


def ephemeral_key(secret: bytes, context: str) -> X25519PrivateKey:
    """The node's X25519 key for one pooled analysis (``context``: permit, study, analysis)."""
    raw = HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + b"|key|" + context.encode()).derive(
        secret
    )
    return X25519PrivateKey.from_private_bytes(raw)


def public_hex(key: X25519PrivateKey) -> str:
    """The public half of an ephemeral key as 64 hex digits (what round 0 publishes)."""
    return key.public_key().public_bytes_raw().hex()


def identity_key(secret: bytes) -> Ed25519PrivateKey:
    """The node's pooling identity: an Ed25519 key that signs its ephemeral keys.

    Derived from the node secret (no extra state to keep); its public half is what the permit
    body binds for this node (``PermitBody.node_keys``).
    """
    raw = HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + b"|identity").derive(secret)
    return Ed25519PrivateKey.from_private_bytes(raw)


def identity_public_hex(secret: bytes) -> str:
    """The pooling identity's public key as 64 hex digits (what the operator hands over)."""
    return identity_key(secret).public_key().public_bytes_raw().hex()


def _ephemeral_message(context: str, hex_key: str) -> bytes:
    """What an identity signs: the ephemeral key, bound to one permit, study and analysis."""
    return _INFO + b"|ephemeral|" + context.encode() + b"|" + bytes.fromhex(hex_key)


def sign_ephemeral(secret: bytes, context: str, key: X25519PrivateKey) -> str:
    """The node identity's signature (hex) over its ephemeral public key for ``context``."""
    return identity_key(secret).sign(_ephemeral_message(context, public_hex(key))).hex()


def _check_signatures(
    roster: dict[str, str], identities: dict[str, str], signatures: dict[str, str], context: str
) -> None:
    """Every roster key must be signed by its node's permit identity, or ``SecAggError``."""
    for name, hex_key in sorted(roster.items()):
        if name not in identities:
            raise SecAggError(f"the permit binds no pooling identity for roster node {name!r}")
        if name not in signatures:
            raise SecAggError(f"the roster's key for {name!r} carries no signature")
        try:
            identity = Ed25519PublicKey.from_public_bytes(bytes.fromhex(identities[name]))
            identity.verify(bytes.fromhex(signatures[name]), _ephemeral_message(context, hex_key))
        except (InvalidSignature, ValueError) as err:
            raise SecAggError(
                f"the roster's key for {name!r} is not signed by its permit identity"
            ) from err


def _public_key(hex_key: str, name: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except (ValueError, TypeError) as err:
        raise SecAggError(f"roster key of node {name!r} is not an X25519 public key") from err


def session_id(analysis_id: str, roster: dict[str, str], attempt: int) -> bytes:
    """What every party of one masked round agrees on: analysis, roster (names and keys), try."""
    text = json.dumps(
        {"analysis": analysis_id, "roster": roster, "attempt": attempt}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).digest()


# --- masks -----------------------------------------------------------------------------------------


def _stream(seed: bytes, n: int) -> list[int]:
    """``n`` uniform ring elements from SHAKE-256 keyed by ``seed`` (6 bytes each)."""
    width = RING_BITS // 8
    blob = hashlib.shake_256(seed).digest(n * width)
    return [int.from_bytes(blob[i * width : (i + 1) * width], "big") for i in range(n)]


def check_weights(session: bytes, n: int) -> list[int]:
    """Odd public weights ``r_j`` of the check coordinate (odd: invertible mod 2^48)."""
    return [w | 1 for w in _stream(session + b"|check", n)]


def _pair_seed(key: X25519PrivateKey, peer: X25519PublicKey, session: bytes) -> bytes:
    shared = key.exchange(peer)
    return HKDF(hashes.SHA256(), 32, salt=session, info=_INFO + b"|pair").derive(shared)


def validate_roster(
    roster: dict[str, str],
    me: str,
    my_key: X25519PrivateKey,
    permitted: list[str] | None = None,
    *,
    identities: dict[str, str] | None = None,
    signatures: dict[str, str] | None = None,
    context: str = "",
) -> None:
    """Refuse a roster that lacks this node, carries a key not its own, has too few parties,
    or names nodes the permit does not (``permitted``): invented parties would shrink each
    node's noise share (sized for the roster's K) while the coordinator removes their masks.

    ``identities`` (node -> Ed25519 public key hex, from the permit): when given, every roster
    key must carry a valid signature (``signatures``) by its node's identity over ``context``,
    so a coordinator cannot slip in keys of its own. None: keys are not authenticated.
    """
    strangers = sorted(set(roster) - set(permitted)) if permitted is not None else []
    if strangers:
        raise SecAggError(f"the roster names nodes the permit does not: {strangers}")
    if me not in roster:
        raise SecAggError(f"the roster does not name this node {me!r}")
    if roster[me] != public_hex(my_key):
        raise SecAggError(f"the roster's key for {me!r} is not this node's key")
    if len(roster) < MIN_PARTIES:
        raise SecAggError(
            f"a pooled sum needs at least {MIN_PARTIES} nodes, the roster names {len(roster)}"
        )
    if len(set(roster.values())) != len(roster):
        raise SecAggError("two nodes in the roster share a public key")
    if identities is not None:
        _check_signatures(roster, identities, signatures or {}, context)


def mask(
    values: list[int], me: str, key: X25519PrivateKey, roster: dict[str, str], session: bytes
) -> list[int]:
    """This node's share: ``values`` + check coordinate + pairwise masks, mod 2^48.

    ``values`` are integers (noisy counts, possibly negative); the result has one more element
    (the check coordinate) and each element is uniform on the ring to whoever lacks the seeds.
    """
    weights = check_weights(session, len(values))
    vector = [v % MODULUS for v in values]
    vector.append(sum(w * v for w, v in zip(weights, vector, strict=True)) % MODULUS)
    for peer, hex_key in sorted(roster.items()):
        if peer == me:
            continue
        stream = _stream(_pair_seed(key, _public_key(hex_key, peer), session), len(vector))
        sign = 1 if me < peer else -1
        vector = [(v + sign * m) % MODULUS for v, m in zip(vector, stream, strict=True)]
    return vector


def signed(value: int) -> int:
    """A ring element read as a signed integer in [-2^47, 2^47)."""
    value %= MODULUS
    return value - MODULUS if value >= MODULUS // 2 else value


def unmask_sum(shares: list[list[int]], session: bytes) -> list[int]:
    """The total of the nodes' values from their masked shares; loud when they do not check.

    Masks cancel only when every roster node's share is there and unaltered; otherwise the
    check coordinate fails (probability 1 - 2^-48) and ``SecAggError`` says so.
    """
    if not shares:
        raise SecAggError("no masked shares to sum")
    width = len(shares[0])
    if width < 2 or any(len(s) != width for s in shares):
        raise SecAggError(f"masked shares differ in length: {sorted({len(s) for s in shares})}")
    total = [sum(column) % MODULUS for column in zip(*shares, strict=True)]
    values, check = total[:-1], total[-1]
    weights = check_weights(session, len(values))
    if sum(w * v for w, v in zip(weights, values, strict=True)) % MODULUS != check:
        raise SecAggError(
            "the masked shares do not sum to a consistent total: a share is missing, altered "
            "or masked for another roster"
        )
    return [signed(v) for v in values]


# --- distributed noise -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseShare:
    """How one node's noise share is sized and what the pooled release costs it."""

    parties: int
    share_cost: float
    """rho handed to ``privacy.dp.noise_statistics`` for this node's share alone."""


def noise_share_cost(cost: float, parties: int) -> NoiseShare:
    """Each of K nodes adds discrete Gaussian noise of variance sigma^2 / (K - 1).

    sigma^2 is what the grant's ``cost`` (rho) asks for on the total. Sizing shares for K - 1
    (not K) nodes keeps the grant's rho on the total even when one node (say a colluding one)
    knows and removes its own share; the total then carries variance sigma^2 K / (K - 1).
    A share alone is ((K - 1) * cost)-zCDP, which is what noising it at ``share_cost`` means.
    """
    if parties < MIN_PARTIES:
        raise SecAggError(f"a pooled sum needs at least {MIN_PARTIES} nodes, got {parties}")
    return NoiseShare(parties=parties, share_cost=cost * (parties - 1))


def distributed_gaussian_rho(
    share_scale: float, summands: int, l2_sensitivity: float, dimension: int
) -> float:
    """zCDP of a sum of ``summands`` i.i.d. discrete Gaussian shares of scale ``share_scale``.

    A sum of discrete Gaussians is not exactly a discrete Gaussian (Canonne, Kamath, Steinke
    2020); Kairouz, Liu, Steinke ("The Distributed Discrete Gaussian Mechanism for Federated
    Learning with Secure Aggregation", ICML 2021, Theorem 1) bound it: the sum is
    (eps^2 / 2)-zCDP with eps = min(sqrt(D2^2 / (n s^2) + tau d / 2), D2 / (sqrt(n) s) + tau sqrt(d)),
    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1)), for s >= 1/2. The charge uses
    this bound, a hair above the nominal D2^2 / (2 n s^2).
    """
    if share_scale < 0.5:
        raise SecAggError(f"noise share scale {share_scale:.3g} below 1/2: bound does not hold")
    n, s, d = summands, share_scale, dimension
    tau = 10.0 * sum(math.exp(-2.0 * math.pi**2 * s * s * k / (k + 1)) for k in range(1, n))
    eps = min(
        math.sqrt(l2_sensitivity**2 / (n * s * s) + tau * d / 2.0),
        l2_sensitivity / (math.sqrt(n) * s) + tau * math.sqrt(d),
    )
    return eps * eps / 2.0


# --- the gate's release policy for pooled kinds ------------------------------------------------------

KEY_VARIABLE = "secagg"
"""``variable_name`` of the protocol's own rows (public key, its signature, min cell count, check
coordinate)."""
ROW_ORDER = ["cohort", "strata_name", "strata_level", "variable_name", "variable_level"]


def pooled_release(
    compute: Callable[[], pl.DataFrame],
    state: Any,
    grant: PermitAnalysis,
    *,
    node: str,
    secret: bytes,
    context: str,
    analysis_id: str,
    min_cell_count: int,
    permitted: list[str] | None = None,
    declared_rows: int | None,
    identities: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """What a node's gate releases for a pooled analysis: its key, or its masked noisy counts.

    Round 0 (state None): the ephemeral public key and the node's minimum cell count, nothing
    computed from data, nothing charged. Round 1 (state ``{"phase": "masked", "roster", "attempt"}``):
    ``compute()`` (the analysis's person counts), a discrete Gaussian noise share from OpenDP,
    then masks. No per-node small-cell suppression: the share reveals nothing alone and the
    coordinator suppresses the noisy total. The charge is the distributed discrete Gaussian's
    zCDP bound on the total (``distributed_gaussian_rho``). ``permitted``: the permit's nodes,
    the only names a roster may carry. ``identities``: the permit's node keys; when given,
    round 1 refuses a roster whose keys are not all signed by them (round 0 always signs).
    ``declared_rows``: the analysis's rows-per-person declaration (None: every row), which the
    grant's figure may raise, never lower (``privacy.dp.rows_per_person``).
    """
    if grant.mechanism != "gaussian":
        raise SecAggError(
            f"analysis {grant.id!r} is a pooled analysis: the permit must grant it mechanism "
            f"'gaussian' (noise shares summed under secure aggregation), not {grant.mechanism!r}"
        )
    key = ephemeral_key(secret, context)
    settings: dict[str, Any] = {"pooled": True, "suppressed_cells": 0, "complementary_cells": 0}
    if state is None:
        rows = pl.DataFrame(
            {
                "variable_name": [KEY_VARIABLE] * 3,
                "variable_level": [public_hex(key), sign_ephemeral(secret, context, key), ""],
                "estimate_name": ["public_key", "key_signature", "min_cell_count"],
                "kind": ["value"] * 3,
                "value": [0.0, 0.0, float(min_cell_count)],
            }
        )
        return make_statistics(rows), settings | {"rho_charged": 0.0, "noise_scale": 0.0}
    roster, attempt, signatures = _masked_state(state)
    validate_roster(
        roster, node, key, permitted, identities=identities, signatures=signatures, context=context
    )
    raw = _person_counts(compute())
    share = noise_share_cost(grant.cost, len(roster))
    noisy, noise = noise_statistics(
        raw, grant.model_copy(update={"cost": share.share_cost}), declared_rows=declared_rows
    )
    touched = min(
        rows_per_person(declared_rows, grant.max_rows_per_person) or raw.height, raw.height
    )
    rho = distributed_gaussian_rho(noise.scale, share.parties - 1, math.sqrt(touched), raw.height)
    session = session_id(analysis_id, roster, attempt)
    masked = mask([int(v) for v in noisy["value"]], node, key, roster, session)
    check = make_statistics(
        pl.DataFrame(
            {"variable_name": [KEY_VARIABLE], "estimate_name": ["check"], "kind": ["value"]}
        ).with_columns(value=pl.lit(0.0))
    )
    out = pl.concat([noisy.with_columns(kind=pl.lit("value")), check]).with_columns(
        value=pl.Series(masked, dtype=pl.Float64)
    )
    return out, settings | {
        "parties": share.parties,
        "noise_scale": noise.scale,
        "total_noise_sd": noise.scale * math.sqrt(share.parties),
        "rho_charged": rho,
        "rho_share_alone": noise.rho,
        "rows_noised": noise.rows_noised,
    }


def _masked_state(state: Any) -> tuple[dict[str, str], int, dict[str, str]]:
    """The roster, attempt and key signatures from an untrusted round-1 state, or a refusal."""
    if not isinstance(state, dict) or state.get("phase") != "masked":
        raise SecAggError("pooled round state must be {'phase': 'masked', 'roster', 'attempt'}")
    roster, attempt = state.get("roster"), state.get("attempt", 0)
    if not isinstance(roster, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in roster.items()
    ):
        raise SecAggError("pooled round state: roster must map node names to public keys")
    if not isinstance(attempt, int) or attempt < 0:
        raise SecAggError("pooled round state: attempt must be a non-negative integer")
    signatures = state.get("signatures", {})
    if not isinstance(signatures, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in signatures.items()
    ):
        raise SecAggError("pooled round state: signatures must map node names to hex signatures")
    return roster, attempt, signatures


def _person_counts(raw: pl.DataFrame) -> pl.DataFrame:
    """The analysis's rows in the canonical order, checked to be finite person counts."""
    bad = raw.filter(
        (pl.col("kind") != "count") | ~pl.col("value").is_finite() | ~pl.col("upper").is_nan()
    )
    if bad.height:
        raise SecAggError("a pooled release carries person counts only (finite, upper unset)")
    return raw.sort(ROW_ORDER + ["estimate_name"])
