"""Secure aggregation's building blocks for pooled mode: keys, mask streams, noise shares.

Why not Flower's SecAgg+ workflow (``flwr.server.workflow.SecAggPlusWorkflow`` with
``flwr.client.mod.secaggplus_mod``): in Flower 1.41 the workflow needs a ``LegacyContext``
(strategy/FitIns/FitRes), the client mod masks the reply *after* the ClientApp has it (outside
the node's gate) and quantises float parameters with its own rounding. fedomop's nodes speak the
Message API with ``GateRequest``/``GateReply`` and release nothing except through the gate. So
the protocol (Bonawitz et al. 2017, with dropout recovery: ``privacy.secagg_plus``) runs as
rounds of a pooled analysis, through the gate (``privacy.pooled``), on these pieces:

- a node secret (beside the ledger) from which every key of one pooled analysis is derived
  (``ephemeral_key``: permit, study and analysis in the context), so a node keeps no state
  between rounds and a replay gives the same keys;
- the node's *pooling identity* (``identity_key``), an Ed25519 key derived from the same secret:
  its operator hands the public half to the permit body (``fedomop node pooling-key``), which
  binds it in the permit (``PermitBody.node_keys``). Pooled mode refuses a permit that does not
  bind every node's (``require_node_keys``): without them a coordinator could place keys of its
  own under the other nodes' names and read one node's own noisy counts;
- mask streams (SHAKE-256 from a seed, uniform on Z / 2^48, exact in a float64, the statistics
  table's value type), pairwise seeds (X25519 + HKDF-SHA256 bound to a session id), and a check
  coordinate (``sum_j r_j x_j`` with odd public ``r_j``) so that a missing or altered vector
  fails loudly (a false pass has probability 2^-48), never a silent wrong total.

What a node is charged (``noise_share_cost``): the coordinator may collude with nodes, which
then hand over their seeds and noise shares. Each node's policy states the fewest honest nodes
it assumes (``[privacy] min_honest_nodes``, h, itself included); against any coalition that
leaves h honest nodes, what is learnt about this node's data is the sum of h honest noisy
vectors, which carries h noise shares. So each node adds noise of variance sigma^2 / h (sigma^2:
what the grant's rho asks for on the total) and books the zCDP of h summed shares (Kairouz et
al.'s bound, ``distributed_gaussian_rho``; for h = 1 the share alone, OpenDP's own map): about
the grant's rho whatever the number of nodes n, while the total over n nodes carries variance
sigma^2 n / h >= sigma^2, at least the permit's noise.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.statistics import GROUP_KEYS

RING_BITS = 48
"""Masked values live in Z / 2^48: uniform masks, exactly representable as float64."""
MODULUS = 1 << RING_BITS
MIN_PARTIES = 3
"""Fewest nodes in a pooled sum: with two, each learns the other's noisy share from the total."""
_INFO = b"fedomop-secagg-v1"
KEY_VARIABLE = "secagg"
"""``variable_name`` of the protocol's own rows (keys, shares, signatures, check coordinate)."""
ROW_ORDER = GROUP_KEYS
"""The order of a pooled vector's rows (then ``estimate_name``), the same at every node."""


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


def public_key(hex_key: str, name: str) -> X25519PublicKey:
    """Node ``name``'s X25519 public key from the hex a round released, or a refusal naming it."""
    try:
        return X25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except (ValueError, TypeError) as err:
        raise SecAggError(f"roster key of node {name!r} is not an X25519 public key") from err


def mask_stream(seed: bytes, n: int, bits: int = RING_BITS) -> list[int]:
    """``n`` uniform elements of Z / 2^bits from SHAKE-256 keyed by ``seed`` (bits / 8 bytes
    each; ``bits`` a multiple of 8: 48 for counts, ``privacy.fixed_point.RING_BITS`` for sums
    of reals)."""
    width = bits // 8
    blob = hashlib.shake_256(seed).digest(n * width)
    return [int.from_bytes(blob[i * width : (i + 1) * width], "big") for i in range(n)]


def check_weights(session: bytes, n: int, bits: int = RING_BITS) -> list[int]:
    """Odd public weights ``r_j`` of the check coordinate (odd: invertible mod 2^bits)."""
    return [w | 1 for w in mask_stream(session + b"|check", n, bits)]


def pair_seed(key: X25519PrivateKey, peer: X25519PublicKey, session: bytes) -> bytes:
    """The seed two nodes share for one session: X25519 agreement, HKDF salted by the session
    (so a retry or another roster never reuses a mask)."""
    shared = key.exchange(peer)
    return HKDF(hashes.SHA256(), 32, salt=session, info=_INFO + b"|pair").derive(shared)


def require_node_keys(permitted: list[str], identities: dict[str, str]) -> None:
    """Pooled mode only under a permit that binds every node's pooling identity.

    Unbound keys let a coordinator stand in for the other nodes and unmask one node's share,
    whose noise alone is far weaker than what its ledger books under the honest-node
    assumption; so a permit without them is refused before anything is published.
    """
    unbound = sorted(set(permitted) - set(identities))
    if unbound:
        raise SecAggError(
            f"pooled mode needs the permit to bind every node's pooling identity "
            f"(permit issue --node-key NAME=HEX); none for {unbound}"
        )


def signed(value: int, bits: int = RING_BITS) -> int:
    """A ring element read as a signed integer in [-2^(bits-1), 2^(bits-1))."""
    modulus = 1 << bits
    value %= modulus
    return value - modulus if value >= modulus // 2 else value


# --- distributed noise -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseShare:
    """How one node's noise share is sized and under which honest-node assumption."""

    parties: int
    honest: int
    """h: honest nodes assumed (the policy's ``min_honest_nodes``, at most the roster's n)."""
    share_cost: float
    """rho handed to ``privacy.dp.noise_statistics`` for this node's share alone."""


def noise_share_cost(cost: float, parties: int, min_honest: int) -> NoiseShare:
    """Each node adds discrete Gaussian noise of variance sigma^2 / h, h honest nodes assumed.

    sigma^2 is what the grant's ``cost`` (rho) asks for on the total. Any coalition of the
    coordinator with nodes that leaves h honest nodes sees this node's data under the sum of h
    shares, variance sigma^2: the grant's rho, whatever the number of nodes. A share alone is
    (h * cost)-zCDP, which is what noising it at ``share_cost`` means. The total over n nodes
    carries sigma^2 n / h, at least the grant's noise (h <= n).
    """
    if parties < MIN_PARTIES:
        raise SecAggError(f"a pooled sum needs at least {MIN_PARTIES} nodes, got {parties}")
    if min_honest < 1:
        raise SecAggError(f"min_honest_nodes must be at least 1 (this node), got {min_honest}")
    honest = min(min_honest, parties)
    return NoiseShare(parties=parties, honest=honest, share_cost=cost * honest)


def honest_nodes_rho(
    share_scale: float, honest: int, l2_sensitivity: float, dimension: int, share_rho: float
) -> float:
    """What a node books: the zCDP of ``honest`` summed shares of scale ``share_scale``.

    ``share_rho`` is OpenDP's own map for the share alone: for h = 1 that is the loss (the
    share is one discrete Gaussian); for h >= 2 the sum is bounded by Kairouz et al.
    (``distributed_gaussian_rho``), never more than the share alone.
    """
    if honest == 1:
        return share_rho
    return min(share_rho, distributed_gaussian_rho(share_scale, honest, l2_sensitivity, dimension))


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


@dataclass(frozen=True)
class PooledCharge:
    """A pooled release's noise and per-node charge, computed from the grant alone."""

    share_scale: float
    total_sd: float
    rho_booked: float


def pooled_charge(
    cost: float, rows_per_person: int, dimension: int, parties: int, min_honest: int
) -> PooledCharge:
    """The share scale, total noise sd and per-node charge a gate will report (a preview).

    The scale is what ``privacy.dp.noise_statistics`` picks for the share's rho (one class of
    unit-sensitivity rows): sqrt(rows / (2 h rho)); the charge is ``honest_nodes_rho`` of it.
    ``permit review`` and the benchmark print it; a test checks it equals a gate's booking.
    """
    share = noise_share_cost(cost, parties, min_honest)
    rows = min(rows_per_person, dimension)
    scale = math.sqrt(rows / (2.0 * share.share_cost))
    alone = rows / (2.0 * scale * scale)
    rho = honest_nodes_rho(scale, share.honest, math.sqrt(rows), dimension, alone)
    return PooledCharge(scale, scale * math.sqrt(parties), rho)
