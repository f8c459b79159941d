"""Secure aggregation: masks cancel for any K >= 2, shares look uniform, a missing or altered share
fails loudly, and the distributed noise has the variance and the charge it claims."""

from __future__ import annotations

import math
import os
import statistics

import polars as pl
import pytest

from privacy.secagg import (
    MODULUS,
    PooledNode,
    SecAggError,
    distributed_gaussian_rho,
    ephemeral_key,
    identity_key,
    identity_public_hex,
    mask,
    node_secret,
    noise_share_cost,
    pooled_charge,
    pooled_release,
    public_hex,
    session_id,
    sign_ephemeral,
    signed,
    unmask_sum,
    validate_roster,
)
from studies.permit import PermitAnalysis
from studies.statistics import make_statistics


def parties(k: int, context: str = "pmt|study|cf") -> tuple[dict, dict[str, str]]:
    """K nodes with fresh secrets: their ephemeral keys and the roster of public keys."""
    keys = {f"node-{i}": ephemeral_key(os.urandom(32), context) for i in range(k)}
    return keys, {name: public_hex(key) for name, key in keys.items()}


def shares(values: dict[str, list[int]], keys: dict, roster: dict, session: bytes) -> list:
    return [mask(values[n], n, keys[n], roster, session) for n in sorted(roster)]


def person_counts(values: list[float]) -> pl.DataFrame:
    """One cohort's person counts, one stratum level per value (what a pooled analysis counts)."""
    n = len(values)
    return make_statistics(
        pl.DataFrame(
            {
                "cohort": ["cf"] * n,
                "strata_level": [f"l{i}" for i in range(n)],
                "variable_name": ["Number subjects"] * n,
                "estimate_name": ["count"] * n,
                "kind": ["count"] * n,
                "value": values,
            }
        )
    )


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_masks_cancel_and_the_sum_is_exact(k: int) -> None:
    keys, roster = parties(k)
    session = session_id("cf", roster, 0)
    values = {n: [i + 1, 0, 7 - 3 * i, -(i + 2), 2**40] for i, n in enumerate(sorted(roster))}
    total = unmask_sum(shares(values, keys, roster, session), session)
    assert total == [sum(v[j] for v in values.values()) for j in range(5)]
    assert total[0] == k * (k + 1) // 2
    assert total[3] == -sum(range(2, k + 2))


def test_a_masked_share_looks_uniform_on_the_ring() -> None:
    keys, roster = parties(3)
    session = session_id("cf", roster, 0)
    true = [3] * 4000  # a handful of patients in every cell
    share = mask(true, "node-0", keys["node-0"], roster, session)
    assert len(share) == 4001  # one check coordinate
    assert sum(v == 3 for v in share) == 0
    assert all(0 <= v < MODULUS for v in share)
    # top 3 bits in 8 equal bins: 500 expected each; chi-square with 7 df far below 40
    bins = [0] * 8
    for v in share:
        bins[v >> 45] += 1
    chi2 = sum((b - 500.25) ** 2 / 500.25 for b in bins)
    assert chi2 < 40, bins
    assert abs(statistics.fmean(share) / MODULUS - 0.5) < 0.02


def test_missing_or_altered_share_fails_loudly() -> None:
    keys, roster = parties(4)
    session = session_id("cf", roster, 0)
    values = {n: [2, 5, 1] for n in roster}
    masked = shares(values, keys, roster, session)
    assert unmask_sum(masked, session) == [8, 20, 4]
    with pytest.raises(SecAggError, match="missing, altered"):
        unmask_sum(masked[:-1], session)
    tampered = [list(s) for s in masked]
    tampered[1][2] = (tampered[1][2] + 1) % MODULUS
    with pytest.raises(SecAggError, match="missing, altered"):
        unmask_sum(tampered, session)
    other = session_id("cf", roster, 1)  # one node masked for another attempt's session
    mixed = masked[:3] + [mask(values["node-3"], "node-3", keys["node-3"], roster, other)]
    with pytest.raises(SecAggError):
        unmask_sum(mixed, session)
    with pytest.raises(SecAggError, match="differ in length"):
        unmask_sum([masked[0], masked[1][:-1]], session)


def test_roster_checks_refuse_substitution_and_too_few_nodes() -> None:
    context = "pmt|study|cf"
    keys, roster, identities, signatures = signed_parties(3, context)
    me = keys["node-0"]
    check = {"identities": identities, "signatures": signatures, "context": context}
    validate_roster(roster, "node-0", me, **check)
    with pytest.raises(SecAggError, match="does not name"):
        validate_roster({k: v for k, v in roster.items() if k != "node-0"}, "node-0", me, **check)
    forged = {**roster, "node-0": public_hex(ephemeral_key(os.urandom(32), "x"))}
    with pytest.raises(SecAggError, match="not this node's key"):
        validate_roster(forged, "node-0", me, **check)
    two = {"node-0": roster["node-0"], "node-1": roster["node-1"]}
    with pytest.raises(SecAggError, match="at least 3"):
        validate_roster(two, "node-0", me, **check)
    with pytest.raises(SecAggError, match="permit does not: \\['node-2'\\]"):
        validate_roster(roster, "node-0", me, ["node-0", "node-1", "node-9"], **check)
    with pytest.raises(SecAggError, match="share a public key"):
        validate_roster({**roster, "node-2": roster["node-1"]}, "node-0", me, **check)


def test_ephemeral_key_is_stable_per_context_and_secret_is_owner_only(tmp_path) -> None:
    path = tmp_path / "ledger.secagg.key"
    secret = node_secret(path)
    assert node_secret(path) == secret and len(secret) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    one = public_hex(ephemeral_key(secret, "pmt-1|h|cf"))
    assert one == public_hex(ephemeral_key(secret, "pmt-1|h|cf"))
    assert one != public_hex(ephemeral_key(secret, "pmt-2|h|cf"))


def test_distributed_gaussian_charge_bounds_the_nominal_rho() -> None:
    # 3 rows per person, grant rho 0.5, h = 2 honest nodes: shares of variance sigma^2 / 2
    for k in (3, 8, 50):  # the share does not depend on the number of nodes
        share = noise_share_cost(0.5, k, 2)
        assert (share.parties, share.honest, share.share_cost) == (k, 2, pytest.approx(1.0))
    assert noise_share_cost(0.5, 3, 5).honest == 3  # never more honest nodes than parties
    assert noise_share_cost(0.5, 8, 1).share_cost == pytest.approx(0.5)
    scale = math.sqrt(3 / (2 * 1.0))
    rho = distributed_gaussian_rho(scale, 2, math.sqrt(3), 8)
    assert 0.5 < rho < 0.5 * (1 + 1e-3)
    # small shares: the tau term of Kairouz et al. grows and the charge with it
    assert distributed_gaussian_rho(0.6, 2, 1.0, 8) > 1.0 / (2 * 2 * 0.36) * 1.01
    with pytest.raises(SecAggError, match="below 1/2"):
        distributed_gaussian_rho(0.4, 2, 1.0, 8)
    with pytest.raises(SecAggError, match="at least 3"):
        noise_share_cost(0.5, 2, 2)
    with pytest.raises(SecAggError, match="at least 1"):
        noise_share_cost(0.5, 3, 0)


def pooled_node(name: str, secret: bytes, identities: dict, **changes) -> PooledNode:
    """A node as its gate describes it to ``pooled_release``: every peer's identity bound."""
    fields = {
        "name": name, "secret": secret, "context": "ctx", "analysis_id": "cf",
        "min_cell_count": 10, "permitted": sorted(identities), "identities": identities,
        "min_honest": 2,
    }  # fmt: skip
    return PooledNode(**(fields | changes))


def signed_round(
    k: int, grant: PermitAnalysis, **changes
) -> tuple[dict[str, PooledNode], dict[str, object]]:
    """K nodes' round 0 through ``pooled_release``: their descriptions and round 1's state."""
    secrets = {f"node-{i}": os.urandom(32) for i in range(k)}
    identities = {n: identity_public_hex(s) for n, s in secrets.items()}
    nodes = {n: pooled_node(n, s, identities, **changes) for n, s in secrets.items()}
    roster, signatures = {}, {}
    for name, node in nodes.items():
        keys, _ = pooled_release(
            lambda: pytest.fail("round 0 must not touch data"), None, grant, node
        )
        rows = dict(zip(keys["estimate_name"], keys["variable_level"], strict=True))
        roster[name], signatures[name] = rows["public_key"], rows["key_signature"]
    return nodes, {"phase": "masked", "roster": roster, "signatures": signatures, "attempt": 0}


def test_pooled_release_total_error_has_the_intended_variance() -> None:
    """Four gates' release policies, summed many times: mean ~ 0, variance sigma^2 K / h."""
    true = [4.0, 2.0, 0.0, 1.0, 3.0, 0.0, 0.0, 7.0]
    table = person_counts(true)
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5, max_rows_per_person=3)
    nodes, state = signed_round(4, grant)
    session = session_id("cf", state["roster"], 0)
    errors, charges = [], set()
    for _ in range(150):
        masked = []
        for name in sorted(nodes):
            out, settings = pooled_release(lambda: table, state, grant, nodes[name])
            masked.append([int(v) for v in out["value"]])
            charges.add(round(settings["rho_charged"], 12))
        total = unmask_sum(masked, session)
        errors += [t - 4 * v for t, v in zip(total, true, strict=True)]
    intended = 3 / (2 * 0.5) * 4 / 2  # sigma^2 = 3, times K / h
    assert len(errors) == 1200
    assert abs(statistics.fmean(errors)) < 4 * math.sqrt(intended / 1200)
    assert statistics.pvariance(errors) == pytest.approx(intended, rel=0.2)
    assert len(charges) == 1 and 0.5 <= charges.pop() < 0.5005


@pytest.mark.parametrize("k", [3, 8, 10])
@pytest.mark.parametrize("honest", [1, 2])
def test_booked_charge_is_the_true_loss_of_the_honest_shares(k: int, honest: int) -> None:
    """Issue 9's attack: at 10 names a share alone was rho 4.5 for a booked 2.02. Now each
    node books the zCDP of ``honest`` summed shares, computed here from the share's scale
    alone: a plain discrete Gaussian for one share (rows / (2 s^2)), Kairouz et al. for two;
    the same for every number of nodes, and what ``pooled_charge`` (``permit review``) shows."""
    true = [4.0, 2.0, 0.0, 1.0, 3.0, 0.0]
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5, max_rows_per_person=3)
    nodes, state = signed_round(k, grant, min_honest=honest)
    _, settings = pooled_release(lambda: person_counts(true), state, grant, nodes["node-1"])
    s = settings["noise_scale"]
    assert s == pytest.approx(math.sqrt(3 / (2 * 0.5 * honest)), rel=1e-12)
    share_alone = 3 / (2 * s * s)
    assert settings["rho_share_alone"] == pytest.approx(share_alone, rel=1e-9)
    true_loss = share_alone if honest == 1 else distributed_gaussian_rho(s, 2, math.sqrt(3), 6)
    assert settings["rho_charged"] == pytest.approx(true_loss, rel=1e-9)
    assert settings["rho_charged"] == pytest.approx(0.5, rel=1e-3)  # flat in k
    assert settings["min_honest_nodes"] == honest and settings["parties"] == k
    preview = pooled_charge(0.5, 3, 6, k, honest)
    assert preview.rho_booked == pytest.approx(settings["rho_charged"], rel=1e-9)
    assert preview.share_scale == pytest.approx(s, rel=1e-12)


def test_a_coalition_leaving_two_honest_nodes_sees_noise_worth_the_booked_charge() -> None:
    """The attack as a test: the coordinator and nodes 2 and 3 of four pool what they know
    (the colluders' own seeds and noisy counts) and strip them from the total; what is left is
    nodes 0 and 1's noisy sum. Its noise variance, measured, gives the loss these two honest
    nodes really suffer: it must not exceed what they booked (shares sized for K - 1 nodes, as
    before, booked 0.5 for a true 0.75)."""
    true = [4.0, 2.0, 0.0, 1.0, 3.0, 0.0, 0.0, 7.0]
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5, max_rows_per_person=3)
    nodes, state = signed_round(4, grant)
    roster = state["roster"]
    session = session_id("cf", roster, 0)
    colluders = ["node-2", "node-3"]
    errors, booked = [], set()
    for _ in range(150):
        masked = {}
        for name in sorted(nodes):
            out, settings = pooled_release(lambda: person_counts(true), state, grant, nodes[name])
            masked[name] = [int(v) for v in out["value"]]
            booked.add(settings["rho_charged"])
        total = unmask_sum(list(masked.values()), session)
        for name in colluders:  # a colluder's own masks, hence its own noisy counts
            key = ephemeral_key(nodes[name].secret, "ctx")
            masks = mask([0] * len(true), name, key, roster, session)
            own = [signed(v - m) for v, m in zip(masked[name], masks, strict=True)][:-1]
            total = [t - o for t, o in zip(total, own, strict=True)]
        errors += [t - 2 * v for t, v in zip(total, true, strict=True)]
    measured_rho = 3 / (2 * statistics.pvariance(errors))
    assert len(booked) == 1
    assert measured_rho == pytest.approx(0.5, rel=0.2)
    assert measured_rho < booked.pop() * 1.2


def test_pooled_release_round_zero_and_refusals() -> None:
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5)
    secret = os.urandom(32)
    identities = {n: identity_public_hex(os.urandom(32)) for n in ("b", "c")}
    node = pooled_node("a", secret, identities | {"a": identity_public_hex(secret)})
    node = PooledNode(**{**node.__dict__, "min_cell_count": 12})
    keys, settings = pooled_release(
        lambda: pytest.fail("round 0 must not touch data"), None, grant, node
    )
    assert settings["rho_charged"] == 0.0
    assert keys["variable_level"][0] == public_hex(ephemeral_key(secret, "ctx"))
    assert keys.filter(pl.col("estimate_name") == "min_cell_count")["value"].item() == 12.0
    with pytest.raises(SecAggError, match="mechanism 'gaussian'"):
        pooled_release(lambda: keys, None, PermitAnalysis(id="cf"), node)
    with pytest.raises(SecAggError, match="phase"):
        pooled_release(lambda: keys, {"roster": {}}, grant, node)
    # a permit that does not bind every node's identity: refused before any key is published
    for unbound in ({}, identities):
        bare = PooledNode(**{**node.__dict__, "identities": unbound})
        with pytest.raises(SecAggError, match="bind every node's pooling identity"):
            pooled_release(lambda: pytest.fail("no data"), None, grant, bare)


def signed_parties(k: int, context: str = "pmt|study|cf") -> tuple[dict, dict, dict, dict]:
    """K nodes with secrets: ephemeral keys, roster, permit identities and key signatures."""
    secrets = {f"node-{i}": os.urandom(32) for i in range(k)}
    keys = {n: ephemeral_key(s, context) for n, s in secrets.items()}
    roster = {n: public_hex(key) for n, key in keys.items()}
    identities = {n: identity_public_hex(s) for n, s in secrets.items()}
    signatures = {n: sign_ephemeral(secrets[n], context, keys[n]) for n in secrets}
    return keys, roster, identities, signatures


def test_identity_key_is_deterministic_and_distinct_from_the_ephemeral_keys() -> None:
    secret = os.urandom(32)
    hex_key = identity_public_hex(secret)
    assert len(hex_key) == 64 and int(hex_key, 16) >= 0
    assert hex_key == identity_public_hex(secret) != identity_public_hex(os.urandom(32))
    assert identity_key(secret).public_key().public_bytes_raw().hex() == hex_key
    assert hex_key != public_hex(ephemeral_key(secret, "ctx"))


def test_roster_keys_must_be_signed_by_the_permit_identities() -> None:
    context = "pmt|study|cf"
    keys, roster, identities, signatures = signed_parties(3, context)
    me = keys["node-0"]
    check = {"identities": identities, "signatures": signatures, "context": context}
    validate_roster(roster, "node-0", me, **check)
    # a coordinator's own key for node-1, sent with node-1's genuine signature (of its real key)
    mine = ephemeral_key(os.urandom(32), context)
    swapped = {**roster, "node-1": public_hex(mine)}
    with pytest.raises(SecAggError, match="key for 'node-1' is not signed by its permit identity"):
        validate_roster(swapped, "node-0", me, **check)
    # ... or signed by an identity of its own making
    forged = {**signatures, "node-1": sign_ephemeral(os.urandom(32), context, mine)}
    with pytest.raises(SecAggError, match="key for 'node-1' is not signed by its permit identity"):
        validate_roster(swapped, "node-0", me, **(check | {"signatures": forged}))
    # a signature for another permit/study/analysis does not carry over
    with pytest.raises(SecAggError, match="key for 'node-0' is not signed"):
        validate_roster(roster, "node-0", me, **(check | {"context": "pmt|study|other"}))
    unsigned = {n: s for n, s in signatures.items() if n != "node-2"}
    with pytest.raises(SecAggError, match="key for 'node-2' carries no signature"):
        validate_roster(roster, "node-0", me, **(check | {"signatures": unsigned}))
    garbled = {**signatures, "node-2": "zz"}
    with pytest.raises(SecAggError, match="key for 'node-2' is not signed"):
        validate_roster(roster, "node-0", me, **(check | {"signatures": garbled}))
    unbound = {n: i for n, i in identities.items() if n != "node-1"}
    with pytest.raises(SecAggError, match="no pooling identity for roster node 'node-1'"):
        validate_roster(roster, "node-0", me, **(check | {"identities": unbound}))
    with pytest.raises(SecAggError, match="no pooling identity"):  # no unauthenticated path
        validate_roster(swapped, "node-0", me, identities={}, signatures={}, context=context)


def test_pooled_release_signs_round_zero_and_checks_signatures_in_round_one() -> None:
    true = [4.0, 2.0, 0.0]
    table = person_counts(true)
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5, max_rows_per_person=3)
    nodes, state = signed_round(3, grant)
    roster = state["roster"]

    def release(name: str, state: dict) -> pl.DataFrame:
        return pooled_release(lambda: table, state, grant, nodes[name])[0]

    masked = [[int(v) for v in release(n, state)["value"]] for n in sorted(nodes)]
    total = unmask_sum(masked, session_id("cf", roster, 0))
    assert all(abs(t - 3 * v) < 40 for t, v in zip(total, true, strict=True))  # sd ~ 2.1
    swapped = {**roster, "node-1": public_hex(ephemeral_key(os.urandom(32), "ctx"))}
    for name in ("node-0", "node-2"):
        with pytest.raises(SecAggError, match="key for 'node-1' is not signed"):
            release(name, state | {"roster": swapped})
    with pytest.raises(SecAggError, match="carries no signature"):
        release("node-0", {k: v for k, v in state.items() if k != "signatures"})
    with pytest.raises(SecAggError, match="signatures must map"):
        release("node-0", state | {"signatures": ["x"]})
