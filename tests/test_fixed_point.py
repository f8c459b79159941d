"""The fixed-point ring of pooled model sums: 1M-person nodes fit, overflow is refused, never
wrapped, and a masked sum at the bound comes out exact."""

from __future__ import annotations

import numpy as np
import pytest
from test_secagg_plus import Network

from privacy.fixed_point import (
    MAX_NODES,
    NODE_BOUND,
    RING_BITS,
    SCALE,
    FixedPointOverflow,
    decode,
    encode,
)

MILLION = 1_000_000


def test_a_million_person_nodes_information_fits_the_ring() -> None:
    """The largest information entry a 1M-person node can have with |x| <= 150 (age in years
    at scale 1): 0.25 * 10^6 * 150^2, and its score (10^6 * 150): both encode, and 1024 such
    nodes sum below 2^127 (no wrap-around)."""
    information = 0.25 * MILLION * 150.0**2
    score = MILLION * 150.0
    encoded = encode([information, score, -information])
    assert all(abs(v) < NODE_BOUND for v in encoded)
    assert MAX_NODES * max(abs(v) for v in encoded) < 1 << (RING_BITS - 1)
    assert decode(encoded, 1) == pytest.approx([information, score, -information], abs=1e-9)
    # the headroom in real units: covariates up to |x| = 1.2e10 still fit at 1M persons
    assert 0.25 * MILLION * 1.2e10**2 < NODE_BOUND / SCALE


def test_overflow_and_non_finite_values_are_refused_not_wrapped() -> None:
    limit = NODE_BOUND / SCALE
    with pytest.raises(FixedPointOverflow, match="value 1 of the pooled sum"):
        encode([1.0, limit * 1.0001])
    with pytest.raises(FixedPointOverflow, match="not finite"):
        encode([float("nan")])
    with pytest.raises(FixedPointOverflow, match="not finite"):
        encode([float("inf")])
    with pytest.raises(FixedPointOverflow, match="1024 at most"):
        decode([0], MAX_NODES + 1)


def test_resolution_is_two_to_the_minus_32() -> None:
    rng = np.random.default_rng(3)
    values = list(rng.normal(0, 1e4, 50))
    back = decode(encode(values), 1)
    assert max(abs(a - b) for a, b in zip(values, back, strict=True)) <= 0.5 / SCALE


def test_a_masked_sum_of_values_at_the_bound_is_exact() -> None:
    """Three nodes each at the per-node bound (and one at minus it): the secure sum in the
    128-bit ring gives the exact signed total, with one node dropped after sharing too."""
    bound = NODE_BOUND - 1
    values = {"node-0": [bound, 5], "node-1": [bound, -7], "node-2": [-bound, 1]}
    net = Network(4, 3, values, RING_BITS)
    survivors = ["node-0", "node-1", "node-2"]  # node-3 shared its seeds, then dropped
    total = net.run(sorted(net.secrets), survivors, survivors)
    assert total == [bound, -1]
