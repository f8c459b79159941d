"""Fixed-point encoding of real sums (GLM score, information, deviance) for the secure sum.

A masked sum works in a ring Z / 2^bits, so reals are sent as integers ``round(x * 2^F)``. The
ring must hold the sum over every node without wrapping, or the total comes out wrong by a
multiple of 2^bits with no error; so each node refuses to encode a value outside a per-node
bound that leaves room for the largest roster. The numbers:

- ring ``RING_BITS`` = 128, fraction ``FRACTION_BITS`` = 32 (a resolution of 2^-32 = 2.3e-10
  per node and entry: a pooled GLM lands within 1e-8 of the plain federated fit);
- at most ``MAX_NODES`` = 1024 nodes, so each node's encoded |value| stays below
  ``NODE_BOUND`` = 2^127 / 1024 = 2^117 and any sum of 1024 of them below 2^127: a signed total
  that never wraps;
- in real units a node may send |x| < 2^85 = 3.9e25. A 1M-person node's information entry is at
  most 0.25 * 10^6 * max|x_j x_k|, so covariates up to |x| = 1.2e10 fit (age in years at
  scale 1 is 150; ``tests/test_fixed_point.py`` checks a 1M-person node's entries and that one
  past the bound is refused).

Not ``numpy``: Python integers are exact at 128 bits, and the masks (``privacy.secagg``) are
Python integers already.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from privacy.secagg import SecAggError

RING_BITS = 128
FRACTION_BITS = 32
MAX_NODES = 1024
NODE_BOUND = (1 << (RING_BITS - 1)) // MAX_NODES
"""Largest |encoded value| one node may send: MAX_NODES of them sum below 2^127."""
SCALE = 1 << FRACTION_BITS
WIDE_VECTOR = "masked_vector"
"""``estimate_name`` of the one protocol row that carries a wide-ring masked vector as hex."""


class FixedPointOverflow(SecAggError):
    """A value the ring cannot carry for this many nodes: refused, never wrapped."""


def encode(values: Sequence[float]) -> list[int]:
    """``round(x * 2^32)`` for each value, or ``FixedPointOverflow`` naming the first too large
    (or not finite) one: a wrapped value would make a wrong total that still checks."""
    out = []
    for i, x in enumerate(values):
        if not math.isfinite(x):
            raise FixedPointOverflow(f"value {i} of the pooled sum is not finite ({x})")
        scaled = round(x * SCALE)
        if abs(scaled) >= NODE_BOUND:
            raise FixedPointOverflow(
                f"value {i} of the pooled sum ({x:.6g}) exceeds the fixed-point bound "
                f"{NODE_BOUND / SCALE:.3g} (ring 2^{RING_BITS}, {MAX_NODES} nodes at most)"
            )
        out.append(scaled)
    return out


def decode(values: Sequence[int], nodes: int) -> list[float]:
    """The reals a total of ``nodes`` encoded vectors stands for (refused past ``MAX_NODES``,
    where the bound that keeps the sum from wrapping no longer holds)."""
    if nodes > MAX_NODES:
        raise FixedPointOverflow(f"{nodes} nodes: a fixed-point sum holds {MAX_NODES} at most")
    return [v / SCALE for v in values]
