"""The fixed-point ring of pooled model sums: 1M-person nodes fit, overflow is refused, never
wrapped, and a masked sum at the bound comes out exact."""

from __future__ import annotations

import os

import numpy as np
import pytest

from privacy.fixed_point import (
    MAX_NODES,
    NODE_BOUND,
    RING_BITS,
    SCALE,
    FixedPointOverflow,
    decode,
    encode,
)
from privacy.secagg import identity_public_hex
from privacy.secagg_plus import (
    NodeKeys,
    masked_vector,
    open_shares,
    reveal,
    session_id,
    share_secrets,
    sign_survivors,
    unmask_total,
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
    secrets = {f"n{i}": os.urandom(32) for i in range(4)}
    identities = {n: identity_public_hex(s) for n, s in secrets.items()}
    roster = {n: NodeKeys.derive(s, "fp").public() for n, s in secrets.items()}
    names = sorted(secrets)
    threshold = 3
    session = session_id("fp", roster, threshold)
    values = {"n0": [NODE_BOUND - 1, 5], "n1": [NODE_BOUND - 1, -7], "n2": [-(NODE_BOUND - 1), 1]}
    sent = {n: share_secrets(secrets[n], "fp", n, roster, threshold, session) for n in names}
    survivors = ["n0", "n1", "n2"]  # n3 shared its seeds, then dropped
    masked = {
        n: masked_vector(values[n], secrets[n], "fp", n, roster, names, session, RING_BITS)
        for n in survivors
    }
    signatures = {n: sign_survivors(secrets[n], session, survivors) for n in survivors}
    revealed = {}
    for n in survivors:
        inbox = {sender: blobs[n] for sender, blobs in sent.items()}
        opened = open_shares(secrets[n], "fp", n, roster, inbox, session)
        revealed[n] = reveal(opened, names, survivors, signatures, identities, threshold, session)
    total = unmask_total(masked, revealed, roster, survivors, threshold, session, RING_BITS)
    assert total == [NODE_BOUND - 1, -1]
