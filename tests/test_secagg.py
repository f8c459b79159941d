"""Secure aggregation at the gate: masked vectors look uniform, a pooled release's noise has
the variance it claims, and each node books the true loss of its honest nodes' noise shares.

The rounds run through each node's release policy (``node.pooled.pooled_release``) and the
pooled analysis's own ``combine``, as in a study; only the coordinator's bookkeeping is here."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

import polars as pl
import pytest

from node.pooled import PooledNode, pooled_release
from privacy.secagg import (
    MODULUS,
    SecAggError,
    distributed_gaussian_rho,
    ephemeral_key,
    identity_key,
    identity_public_hex,
    node_secret,
    noise_share_cost,
    pooled_charge,
    public_hex,
    signed,
)
from privacy.secagg_plus import NodeKeys, masked_vector, session_id
from studies.analyses import REGISTRY
from studies.analyses.pooled import layout, unmasked_total
from studies.analysis import CombineInput, Finished
from studies.permit import PermitAnalysis
from studies.statistics import make_statistics

SPEC = REGISTRY["pooled_counts"].Spec(
    id="cf", kind="pooled_counts", cohorts=["cf"], strata=["sex", "age_group"],
    age_groups=[[0, 17], [18, 39], [40, 150]],
)  # fmt: skip
ANALYSIS = REGISTRY["pooled_counts"]()
TRUE = [4.0, 2.0, 0.0, 1.0, 3.0, 0.0]
"""One node's counts on ``SPEC``'s six cells, in ``layout`` order."""


def counts(values: list[float]) -> pl.DataFrame:
    """A node's person counts on ``SPEC``'s grid (what its ``local`` returns)."""
    return make_statistics(
        layout(SPEC).with_columns(
            release_class=pl.lit("count"), value=pl.Series(values, dtype=pl.Float64)
        )
    )


def pooled_node(name: str, secret: bytes, identities: dict, **changes: Any) -> PooledNode:
    """A node as its gate describes it to ``pooled_release``: every peer's identity bound."""
    fields = {
        "name": name, "secret": secret, "context": "ctx", "analysis_id": "cf",
        "min_cell_count": 10, "permitted": sorted(identities), "identities": identities,
        "min_honest": 2, "declared_rows": ANALYSIS.profile(SPEC).rows_per_person,
    }  # fmt: skip
    return PooledNode(**(fields | changes))


def network(k: int, **changes: Any) -> dict[str, PooledNode]:
    secrets = {f"node-{i:02d}": os.urandom(32) for i in range(k)}
    identities = {n: identity_public_hex(s) for n, s in secrets.items()}
    return {n: pooled_node(n, s, identities, **changes) for n, s in secrets.items()}


def step(nodes: dict[str, PooledNode], state: Any, grant: PermitAnalysis, values=TRUE):
    """One round at every node and the coordinator's ``combine``: (next state or result,
    frames, settings by node)."""
    released = {n: pooled_release(lambda: counts(values), state, grant, nodes[n]) for n in nodes}
    frames = [released[n][0] for n in sorted(nodes)]
    out = ANALYSIS.combine(CombineInput(frames, sorted(nodes)), SPEC, state)
    settings = {n: r[1] for n, r in released.items()}
    return (out.result if isinstance(out, Finished) else out.state), frames, settings


def until(nodes: dict[str, PooledNode], grant: PermitAnalysis, phase: str) -> dict:
    """The state of the round named ``phase``, after the rounds before it."""
    state = None
    while state is None or state["phase"] != phase:
        state, _, _ = step(nodes, state, grant)
    return state


GRANT = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5, max_rows_per_person=3)


def test_a_masked_vector_looks_uniform_on_the_ring() -> None:
    secrets = {f"node-{i}": os.urandom(32) for i in range(3)}
    roster = {n: NodeKeys.derive(s, "ctx").public() for n, s in secrets.items()}
    session = session_id("cf", roster, 3)
    true = [3] * 4000  # a handful of patients in every cell
    share = masked_vector(true, secrets["node-0"], "ctx", "node-0", roster, sorted(roster), session)
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


def test_the_rounds_give_the_noisy_total_and_charge_only_the_masked_round() -> None:
    nodes = network(3)
    state, phases, charged = None, [], []
    while not isinstance(state, pl.DataFrame):
        phases.append(None if state is None else state["phase"])
        before = state
        state, frames, settings = step(nodes, state, GRANT)
        charged.append({round(s["rho_charged"], 9) for s in settings.values()})
    assert phases == [None, "share", "masked", "consistency", "reveal"]
    assert charged[:2] == [{0.0}, {0.0}] and charged[3:] == [{0.0}, {0.0}]
    assert charged[2] == {round(pooled_charge(0.5, 3, 6, 3, 2).rho_booked, 9)}
    total = unmasked_total({n: f for n, f in zip(sorted(nodes), frames, strict=True)}, before, SPEC)
    errors = [t - 3 * v for t, v in zip(total["value"], TRUE, strict=True)]
    assert all(abs(e) < 15 for e in errors)  # total sd 2.1


def survivors_total(nodes, grant, masked_state, reveal_frames, reveal_state) -> list[int]:
    """The coordinator's unmasked total for fresh masked vectors at a fixed reveal."""
    _, frames, _ = step(nodes, masked_state, grant)
    vectors = ANALYSIS.combine(CombineInput(frames, sorted(nodes)), SPEC, masked_state).state
    state = {**reveal_state, "masked": vectors["masked"]}
    by_node = dict(zip(sorted(nodes), reveal_frames, strict=True))
    return [int(v) for v in unmasked_total(by_node, state, SPEC)["value"]]


def fixed_reveal(nodes, grant):
    """The masked round's state, and the reveal round (its shares do not depend on the noise)."""
    masked = until(nodes, grant, "masked")
    reveal = until(nodes, grant, "reveal")
    _, frames, _ = step(nodes, reveal, grant)
    return masked, frames, reveal


def test_pooled_release_total_error_has_the_intended_variance() -> None:
    """Four gates' release policies, summed many times: mean ~ 0, variance sigma^2 K / h."""
    nodes = network(4)
    masked, frames, reveal = fixed_reveal(nodes, GRANT)
    errors = []
    for _ in range(200):
        total = survivors_total(nodes, GRANT, masked, frames, reveal)
        errors += [t - 4 * v for t, v in zip(total, TRUE, strict=True)]
    intended = 3 / (2 * 0.5) * 4 / 2  # sigma^2 = 3, times K / h
    assert len(errors) == 1200
    assert abs(statistics.fmean(errors)) < 4 * math.sqrt(intended / 1200)
    assert statistics.pvariance(errors) == pytest.approx(intended, rel=0.2)


@pytest.mark.parametrize("k", [3, 8, 10])
@pytest.mark.parametrize("honest", [1, 2])
def test_booked_charge_is_the_true_loss_of_the_honest_shares(k: int, honest: int) -> None:
    """Issue 9's attack: at 10 names a share alone was rho 4.5 for a booked 2.02. Now each
    node books the zCDP of ``honest`` summed shares, computed here from the share's scale
    alone: a plain discrete Gaussian for one share (rows / (2 s^2)), Kairouz et al. for two;
    the same for every number of nodes, and what ``pooled_charge`` (``permit review``) shows."""
    nodes = network(k, min_honest=honest)
    _, _, all_settings = step(nodes, until(nodes, GRANT, "masked"), GRANT)
    settings = all_settings["node-01"]
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
    (the colluders' own noisy counts: they made them) and strip them from the total; what is
    left is nodes 0 and 1's noisy sum. Its noise variance, measured, gives the loss these two
    honest nodes really suffer: it must not exceed what they booked (shares sized for K - 1
    nodes, as before, booked 0.5 for a true 0.75)."""
    nodes = network(4)
    colluders = ["node-02", "node-03"]
    honest = ["node-00", "node-01"]
    masked, frames, reveal = fixed_reveal(nodes, GRANT)
    errors, booked = [], set()
    for _ in range(200):
        _, vectors, settings = step(nodes, masked, GRANT)
        booked |= {s["rho_charged"] for s in settings.values()}
        state = ANALYSIS.combine(CombineInput(vectors, sorted(nodes)), SPEC, masked).state
        by_node = dict(zip(sorted(nodes), frames, strict=True))
        total = unmasked_total(by_node, {**reveal, "masked": state["masked"]}, SPEC)
        # each colluder's own noisy counts: its vector less its own masks (it knows its seeds)
        own = {n: colluder_counts(nodes[n], masked, state["masked"][n]) for n in colluders}
        errors += [
            int(t) - sum(own[c][i] for c in colluders) - len(honest) * v
            for i, (t, v) in enumerate(zip(total["value"], TRUE, strict=True))
        ]
    measured_rho = 3 / (2 * statistics.pvariance(errors))
    assert len(booked) == 1
    assert measured_rho == pytest.approx(0.5, rel=0.2)
    assert measured_rho < booked.pop() * 1.2


def colluder_counts(node: PooledNode, state: dict, vector: list[int]) -> list[int]:
    """What a colluding node knows of its own release: its vector without its masks."""
    roster = state["roster"]
    session = session_id("cf", roster, state["threshold"])
    zero = masked_vector(
        [0] * (len(vector) - 1), node.secret, "ctx", node.name, roster, sorted(state["shares"]),
        session,
    )  # fmt: skip
    return [signed(v - m) for v, m in zip(vector, zero, strict=True)][:-1]


def test_pooled_release_round_zero_and_refusals() -> None:
    secret = os.urandom(32)
    identities = {n: identity_public_hex(os.urandom(32)) for n in ("b", "c")}
    node = pooled_node("a", secret, identities | {"a": identity_public_hex(secret)})
    node = PooledNode(**{**node.__dict__, "min_cell_count": 12})
    keys, settings = pooled_release(
        lambda: pytest.fail("round 0 must not touch data"), None, GRANT, node
    )
    assert settings["rho_charged"] == 0.0
    rows = dict(zip(keys["estimate_name"], keys["variable_level"], strict=True))
    assert rows["mask_key"] == public_hex(ephemeral_key(secret, "ctx"))
    assert keys.filter(pl.col("estimate_name") == "min_cell_count")["value"].item() == 12.0
    with pytest.raises(SecAggError, match="mechanism 'gaussian'"):
        pooled_release(lambda: keys, None, PermitAnalysis(id="cf"), node)
    with pytest.raises(SecAggError, match="phase"):
        pooled_release(lambda: keys, {"roster": {}}, GRANT, node)
    # a permit that does not bind every node's identity: refused before any key is published
    for unbound in ({}, identities):
        bare = PooledNode(**{**node.__dict__, "identities": unbound})
        with pytest.raises(SecAggError, match="bind every node's pooling identity"):
            pooled_release(lambda: pytest.fail("no data"), None, GRANT, bare)


def test_rosters_with_foreign_keys_or_weak_thresholds_are_refused() -> None:
    """The coordinator's own keys under another node's name, a node's own keys forged, an
    invented node, too few nodes, a threshold below the node's policy: each refused, in every
    round after the keys, before any share or data leaves."""
    nodes = network(4)
    state = until(nodes, GRANT, "share")
    mine = NodeKeys.derive(os.urandom(32), "ctx").public()
    from privacy.secagg_plus import sign_keys

    attacks = [
        ({"roster": {**state["roster"], "node-01": mine}}, "keys for 'node-01' are not signed"),
        (
            {"roster": {**state["roster"], "node-01": mine},
             "signatures": {**state["signatures"], "node-01": sign_keys(os.urandom(32), "ctx", mine)}},
            "keys for 'node-01' are not signed",
        ),
        ({"roster": {**state["roster"], "node-00": mine}}, "not this node's keys"),
        ({"roster": {**state["roster"], "node-zz": mine}}, "permit does not"),
        ({"roster": {n: state["roster"][n] for n in ("node-00", "node-01")}}, "at least 3"),
        ({"threshold": 3}, "threshold 3 of 4 nodes is too weak"),
        ({"signatures": {}}, "not signed"),
    ]  # fmt: skip
    for change, why in attacks:
        for phase in ("share", "masked"):
            with pytest.raises(SecAggError, match=why):
                pooled_release(
                    lambda: pytest.fail("no data"), state | change | {"phase": phase}, GRANT,
                    nodes["node-00"],
                )  # fmt: skip


def test_a_forged_or_misaddressed_state_is_refused_before_any_release() -> None:
    """A node is asked to reveal for a U2 that leaves it out (its vector was sent), or to mask
    with shares that are not the ones its peers sent: refused."""
    nodes = network(3)
    reveal = until(nodes, GRANT, "reveal")
    me = nodes["node-00"]
    without_me = {**reveal, "survivors": ["node-01", "node-02"]}
    with pytest.raises(SecAggError, match="U2 does not name this node"):
        pooled_release(lambda: pytest.fail("no data"), without_me, GRANT, me)
    shares = {s: dict(b) for s, b in reveal["shares"].items()}
    blob = bytearray.fromhex(shares["node-01"]["node-00"])
    blob[-1] ^= 1
    shares["node-01"]["node-00"] = blob.hex()
    masked = {**reveal, "phase": "masked", "shares": shares}
    with pytest.raises(SecAggError, match="'node-01' sent to 'node-00' do not decrypt"):
        pooled_release(lambda: pytest.fail("no data"), masked, GRANT, me)
    no_mine = {
        **reveal,
        "phase": "masked",
        "shares": {s: b for s, b in shares.items() if s != "node-00"},
    }
    with pytest.raises(SecAggError, match="no shares from this node"):
        pooled_release(lambda: pytest.fail("no data"), no_mine, GRANT, me)


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


def test_identity_key_is_deterministic_and_distinct_from_the_ephemeral_keys() -> None:
    secret = os.urandom(32)
    hex_key = identity_public_hex(secret)
    assert len(hex_key) == 64 and int(hex_key, 16) >= 0
    assert hex_key == identity_public_hex(secret) != identity_public_hex(os.urandom(32))
    assert identity_key(secret).public_key().public_bytes_raw().hex() == hex_key
    assert hex_key != public_hex(ephemeral_key(secret, "ctx"))


@pytest.mark.parametrize(("colluders", "honest"), [(3, 3), (4, 2), (5, 1)])
def test_the_studys_tolerated_colluders_size_the_shares(colluders: int, honest: int) -> None:
    """Six nodes whose policies fear up to three colluders (h = 3): a study tolerating c >= 3
    colluders has shares sized for n - c honest nodes (more noise each, the same charge); one
    tolerating fewer than the policy fears is refused before any share leaves."""
    nodes = network(6, min_honest=3)
    masked = until(nodes, GRANT, "masked") | {"colluders": colluders}
    _, settings = pooled_release(lambda: counts(TRUE), masked, GRANT, nodes["node-00"])
    assert settings["min_honest_nodes"] == honest
    assert settings["noise_scale"] == pytest.approx(math.sqrt(3 / (2 * 0.5 * honest)))
    booked = pooled_charge(0.5, 3, 6, 6, honest).rho_booked
    assert settings["rho_charged"] == pytest.approx(booked, rel=1e-9)
    assert 0.5 <= booked < 0.5 * 1.01  # about the grant's rho, whatever h
    share = until(network(6, min_honest=3), GRANT, "share")
    for weak in (0, 2):
        with pytest.raises(SecAggError, match="needs colluders >= 3"):
            nodes = network(6, min_honest=3)
            state = until(nodes, GRANT, "share") | {"colluders": weak}
            pooled_release(lambda: pytest.fail("no data"), state, GRANT, nodes["node-00"])
    assert share["colluders"] is None  # the study names none: each node's policy decides
