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
    SecAggError,
    distributed_gaussian_rho,
    ephemeral_key,
    identity_key,
    identity_public_hex,
    mask,
    node_secret,
    noise_share_cost,
    pooled_release,
    public_hex,
    session_id,
    sign_ephemeral,
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
    keys, roster = parties(3)
    me = keys["node-0"]
    validate_roster(roster, "node-0", me)
    with pytest.raises(SecAggError, match="does not name"):
        validate_roster({k: v for k, v in roster.items() if k != "node-0"}, "node-0", me)
    forged = {**roster, "node-0": public_hex(ephemeral_key(os.urandom(32), "x"))}
    with pytest.raises(SecAggError, match="not this node's key"):
        validate_roster(forged, "node-0", me)
    with pytest.raises(SecAggError, match="at least 3"):
        validate_roster({"node-0": roster["node-0"], "node-1": roster["node-1"]}, "node-0", me)
    with pytest.raises(SecAggError, match="permit does not: \\['node-2'\\]"):
        validate_roster(roster, "node-0", me, permitted=["node-0", "node-1", "node-9"])
    with pytest.raises(SecAggError, match="share a public key"):
        validate_roster({**roster, "node-2": roster["node-1"]}, "node-0", me)


def test_ephemeral_key_is_stable_per_context_and_secret_is_owner_only(tmp_path) -> None:
    path = tmp_path / "ledger.secagg.key"
    secret = node_secret(path)
    assert node_secret(path) == secret and len(secret) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    one = public_hex(ephemeral_key(secret, "pmt-1|h|cf"))
    assert one == public_hex(ephemeral_key(secret, "pmt-1|h|cf"))
    assert one != public_hex(ephemeral_key(secret, "pmt-2|h|cf"))


def test_distributed_gaussian_charge_bounds_the_nominal_rho() -> None:
    # 3 rows per person, grant rho 0.5, K = 3: shares of variance sigma^2 / 2, 2 summands
    share = noise_share_cost(0.5, 3)
    assert share.share_cost == pytest.approx(1.0)
    scale = math.sqrt(3 / (2 * share.share_cost))
    rho = distributed_gaussian_rho(scale, 2, math.sqrt(3), 8)
    assert 0.5 < rho < 0.5 * (1 + 1e-3)
    # small shares: the tau term of Kairouz et al. grows and the charge with it
    assert distributed_gaussian_rho(0.6, 2, 1.0, 8) > 1.0 / (2 * 2 * 0.36) * 1.01
    with pytest.raises(SecAggError, match="below 1/2"):
        distributed_gaussian_rho(0.4, 2, 1.0, 8)
    with pytest.raises(SecAggError, match="at least 3"):
        noise_share_cost(0.5, 2)


def test_pooled_release_total_error_has_the_intended_variance() -> None:
    """Three gates' release policies, summed many times: mean ~ 0, variance sigma^2 K / (K-1)."""
    true = [4.0, 2.0, 0.0, 1.0, 3.0, 0.0, 0.0, 7.0]
    table = person_counts(true)
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5, max_rows_per_person=3)
    secrets = {f"node-{i}": os.urandom(32) for i in range(3)}
    roster = {n: public_hex(ephemeral_key(s, "ctx")) for n, s in secrets.items()}
    state = {"phase": "masked", "roster": roster, "attempt": 0}
    session = session_id("cf", roster, 0)
    errors, charges = [], set()
    for _ in range(150):
        masked = []
        for name, secret in sorted(secrets.items()):
            out, settings = pooled_release(
                lambda: table, state, grant, node=name, secret=secret, context="ctx",
                analysis_id="cf", min_cell_count=10, declared_rows=3,
            )  # fmt: skip
            masked.append([int(v) for v in out["value"]])
            charges.add(round(settings["rho_charged"], 12))
        total = unmask_sum(masked, session)
        errors += [t - 3 * v for t, v in zip(total, true, strict=True)]
    intended = 3 / (2 * 0.5) * 3 / 2  # sigma^2 = 3, times K / (K - 1)
    assert len(errors) == 1200
    assert abs(statistics.fmean(errors)) < 4 * math.sqrt(intended / 1200)
    assert statistics.pvariance(errors) == pytest.approx(intended, rel=0.2)
    assert len(charges) == 1 and 0.5 <= charges.pop() < 0.5005


def test_pooled_release_round_zero_and_refusals() -> None:
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5)
    secret = os.urandom(32)
    keys, settings = pooled_release(
        lambda: pytest.fail("round 0 must not touch data"), None, grant, node="a",
        secret=secret, context="ctx", analysis_id="cf", min_cell_count=12, declared_rows=3,
    )  # fmt: skip
    assert settings["rho_charged"] == 0.0
    assert keys["variable_level"][0] == public_hex(ephemeral_key(secret, "ctx"))
    assert keys.filter(pl.col("estimate_name") == "min_cell_count")["value"].item() == 12.0
    with pytest.raises(SecAggError, match="mechanism 'gaussian'"):
        pooled_release(
            lambda: keys, None, PermitAnalysis(id="cf"), node="a", secret=secret,
            context="ctx", analysis_id="cf", min_cell_count=10, declared_rows=3,
        )  # fmt: skip
    with pytest.raises(SecAggError, match="phase"):
        pooled_release(
            lambda: keys, {"roster": {}}, grant, node="a", secret=secret, context="ctx",
            analysis_id="cf", min_cell_count=10, declared_rows=3,
        )  # fmt: skip


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
    # no identities (a permit without node keys): keys unauthenticated, as before
    validate_roster(swapped, "node-0", me)
    validate_roster(swapped, "node-0", me, signatures={}, context=context)


def test_pooled_release_signs_round_zero_and_checks_signatures_in_round_one() -> None:
    true = [4.0, 2.0, 0.0]
    table = person_counts(true)
    grant = PermitAnalysis(id="cf", mechanism="gaussian", cost=0.5, max_rows_per_person=3)
    secrets = {f"node-{i}": os.urandom(32) for i in range(3)}
    identities = {n: identity_public_hex(s) for n, s in secrets.items()}
    roster, signatures = {}, {}
    for name, secret in secrets.items():
        keys, _ = pooled_release(
            lambda: pytest.fail("round 0 must not touch data"), None, grant, node=name,
            secret=secret, context="ctx", analysis_id="cf", min_cell_count=10, declared_rows=3,
            identities=identities,
        )  # fmt: skip
        rows = dict(zip(keys["estimate_name"], keys["variable_level"], strict=True))
        assert set(rows) == {"public_key", "key_signature", "min_cell_count"}
        roster[name], signatures[name] = rows["public_key"], rows["key_signature"]
    state = {"phase": "masked", "roster": roster, "signatures": signatures, "attempt": 0}

    def release(name: str, state: dict) -> pl.DataFrame:
        return pooled_release(
            lambda: table, state, grant, node=name, secret=secrets[name], context="ctx",
            analysis_id="cf", min_cell_count=10, identities=identities, declared_rows=3,
        )[0]  # fmt: skip

    masked = [[int(v) for v in release(n, state)["value"]] for n in sorted(secrets)]
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
