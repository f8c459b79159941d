"""Dropout recovery (``privacy.secagg_plus``): the sum completes with up to n - t nodes lost
after key sharing, fails clearly beyond, and no node whose vector arrived is ever unmasked."""

from __future__ import annotations

import os

import pytest

from privacy.secagg import SecAggError, identity_public_hex
from privacy.secagg_plus import (
    PAIR,
    RING_BITS,
    SELF,
    NodeKeys,
    check_roster,
    check_threshold,
    masked_vector,
    open_shares,
    reveal,
    session_id,
    share_secrets,
    sign_keys,
    sign_survivors,
    unmask_total,
)

CONTEXT = "pmt|study|cf"


class Network:
    """n nodes' secrets, keys and identities, and the protocol's rounds run honestly."""

    def __init__(
        self,
        n: int,
        threshold: int,
        values: dict[str, list[int]] | None = None,
        bits: int = RING_BITS,
    ) -> None:
        self.bits = bits
        self.secrets = {f"node-{i}": os.urandom(32) for i in range(n)}
        self.identities = {m: identity_public_hex(s) for m, s in self.secrets.items()}
        self.roster = {m: NodeKeys.derive(s, CONTEXT).public() for m, s in self.secrets.items()}
        self.signatures = {
            m: sign_keys(s, CONTEXT, self.roster[m]) for m, s in self.secrets.items()
        }
        self.threshold = threshold
        self.session = session_id("cf", self.roster, threshold)
        self.values = values or {
            m: [i + 1, 2 * i, 5, 0] for i, m in enumerate(sorted(self.secrets))
        }

    def shares(self, senders: list[str]) -> dict[str, dict[str, str]]:
        """Round 2: sender -> recipient -> ciphertext."""
        return {
            m: share_secrets(self.secrets[m], CONTEXT, m, self.roster, self.threshold, self.session)
            for m in senders
        }

    def opened(self, me: str, sent: dict[str, dict[str, str]]) -> dict:
        inbox = {sender: blobs[me] for sender, blobs in sent.items()}
        return open_shares(self.secrets[me], CONTEXT, me, self.roster, inbox, self.session)

    def masked(self, senders: list[str], survivors: list[str]) -> dict[str, list[int]]:
        return {
            m: masked_vector(
                self.values[m],
                self.secrets[m],
                CONTEXT,
                m,
                self.roster,
                senders,
                self.session,
                self.bits,
            )  # fmt: skip
            for m in survivors
        }

    def run(self, senders: list[str], survivors: list[str], revealers: list[str]) -> list[int]:
        sent = self.shares(senders)
        masked = self.masked(senders, survivors)
        signed = {m: sign_survivors(self.secrets[m], self.session, survivors) for m in survivors}
        revealed = {
            m: reveal(
                self.opened(m, sent), senders, survivors, signed, self.identities,
                self.threshold, self.session,
            )
            for m in revealers
        }  # fmt: skip
        return unmask_total(
            masked, revealed, self.roster, survivors, self.threshold, self.session, self.bits
        )

    def truth(self, survivors: list[str]) -> list[int]:
        return [sum(self.values[m][i] for m in survivors) for i in range(4)]


def test_no_dropout_gives_the_exact_sum() -> None:
    net = Network(5, 4)
    names = sorted(net.secrets)
    assert net.run(names, names, names) == net.truth(names)
    check_roster(net.roster, net.signatures, net.identities, CONTEXT)


@pytest.mark.parametrize("lost", [1, 2])
def test_nodes_lost_after_key_sharing_leave_the_sum_of_the_rest(lost: int) -> None:
    """8 nodes, threshold 6: one or two nodes send their shares, then vanish; the survivors'
    sum comes out exact, the vanished nodes' dangling pairwise masks rebuilt from shares."""
    net = Network(8, 6)
    names = sorted(net.secrets)
    survivors = names[lost:]
    assert net.run(names, survivors, survivors) == net.truth(survivors)
    # a revealer may vanish too, as long as t of them remain
    assert net.run(names, survivors, survivors[: net.threshold]) == net.truth(survivors)


def test_more_dropouts_than_the_threshold_allows_fail_clearly() -> None:
    net = Network(8, 6)
    names = sorted(net.secrets)
    with pytest.raises(SecAggError, match="only 5 masked vectors arrived, the threshold is 6"):
        net.run(names, names[3:], names[3:])
    sent = net.shares(names)  # too few revealers: the coordinator cannot rebuild a seed
    survivors = names[1:]
    masked = net.masked(names, survivors)
    signed = {m: sign_survivors(net.secrets[m], net.session, survivors) for m in survivors}
    revealed = {
        m: reveal(net.opened(m, sent), names, survivors, signed, net.identities, 6, net.session)
        for m in survivors[:5]
    }
    with pytest.raises(SecAggError, match="5 shares for 'node-0', 6 needed"):
        unmask_total(masked, revealed, net.roster, survivors, 6, net.session)


def test_a_node_whose_vector_arrived_is_never_unmasked() -> None:
    """The attack: tell some nodes that node-0 dropped (to get its mask-key shares) while its
    vector arrived (and the others reveal its seed shares). Each honest node reveals one kind
    per node, and only for a U2 that t identities signed: the coordinator, holding node-0's
    vector, cannot collect t signatures over a U2 without node-0 from nodes that signed the
    true one, and a share of the other kind is refused when unmasking."""
    net = Network(5, 4)
    names = sorted(net.secrets)
    sent = net.shares(names)
    true_u2 = names
    signed = {m: sign_survivors(net.secrets[m], net.session, true_u2) for m in true_u2}
    opened = net.opened("node-1", sent)
    shown = reveal(opened, names, true_u2, signed, net.identities, 4, net.session)
    assert {kind for kind, _ in shown.values()} == {SELF}  # seeds only: nobody dropped
    fake_u2 = names[1:]  # node-0 "dropped": the true signatures do not cover this U2
    with pytest.raises(SecAggError, match="0 valid signatures over U2, 4 needed"):
        reveal(opened, names, fake_u2, signed, net.identities, 4, net.session)
    forged = {m: sign_survivors(os.urandom(32), net.session, fake_u2) for m in fake_u2}
    with pytest.raises(SecAggError, match="0 valid signatures over U2"):
        reveal(opened, names, fake_u2, forged, net.identities, 4, net.session)
    # a U2 signed by only 3 of the 4 nodes it names (the most an attacker gets if 3 sign twice)
    few = {m: sign_survivors(net.secrets[m], net.session, fake_u2) for m in fake_u2[:3]}
    with pytest.raises(SecAggError, match="3 valid signatures over U2, 4 needed"):
        reveal(opened, names, fake_u2, few, net.identities, 4, net.session)
    # mixed kinds for one node at the coordinator: refused, nothing unmasked
    masked = net.masked(names, names)
    revealed = {
        m: reveal(net.opened(m, sent), names, true_u2, signed, net.identities, 4, net.session)
        for m in names
    }
    revealed["node-2"]["node-0"] = (PAIR, net.opened("node-2", sent)["node-0"][1].hex())
    with pytest.raises(SecAggError, match="shares revealed for 'node-0' are of kind"):
        unmask_total(masked, revealed, net.roster, true_u2, 4, net.session)


def test_forged_shares_keys_and_vectors_are_refused() -> None:
    net = Network(4, 4)
    names = sorted(net.secrets)
    sent = net.shares(names)
    blob = bytearray.fromhex(sent["node-2"]["node-0"])
    blob[-1] ^= 1
    sent["node-2"]["node-0"] = blob.hex()
    with pytest.raises(SecAggError, match="the shares 'node-2' sent to 'node-0' do not decrypt"):
        net.opened("node-0", sent)
    swapped = {**net.roster, "node-3": NodeKeys.derive(os.urandom(32), CONTEXT).public()}
    with pytest.raises(SecAggError, match="keys for 'node-3' are not signed"):
        check_roster(swapped, net.signatures, net.identities, CONTEXT)
    sent = net.shares(names)
    masked = net.masked(names, names)
    masked["node-1"][0] += 1  # an altered vector: the check coordinate catches it
    signed = {m: sign_survivors(net.secrets[m], net.session, names) for m in names}
    revealed = {
        m: reveal(net.opened(m, sent), names, names, signed, net.identities, 4, net.session)
        for m in names
    }
    with pytest.raises(SecAggError, match="does not check"):
        unmask_total(masked, revealed, net.roster, names, 4, net.session)


@pytest.mark.parametrize(
    ("n", "h", "weakest"),
    [(3, 2, 3), (8, 2, 8), (8, 3, 7), (8, 4, 7), (8, 6, 6), (20, 10, 16), (5, 5, 5)],
)
def test_threshold_must_match_the_nodes_honest_assumption(n: int, h: int, weakest: int) -> None:
    """t > n/2, t >= h and 2t > 2n - h (Bonawitz et al.'s t > (n + c)/2 with c = n - h)."""
    check_threshold(n, weakest, h)
    with pytest.raises(SecAggError, match=f"i.e. t >= {weakest}"):
        check_threshold(n, weakest - 1, h)
    with pytest.raises(SecAggError):
        check_threshold(n, n + 1, h)


def test_the_ring_holds_the_totals_of_million_person_nodes() -> None:
    """Counts live in Z / 2^48 read as signed integers in [-2^47, 2^47): five nodes of a million
    persons each and negative noisy counts sum exactly. The bound is |total| < 2^47 ~ 1.4e14:
    50 nodes of a million persons (5e7) fit about 2.8 million times over."""
    net = Network(5, 5)
    names = sorted(net.secrets)
    net.values = {m: [1_000_000, -3, 999_999 - i, 0] for i, m in enumerate(names)}
    assert net.run(names, names, names) == net.truth(names)
    assert 50 * 1_000_000 * 2_800_000 < 2**47


def test_the_coordinators_view_is_simulated_from_the_total_alone() -> None:
    """The masked vectors the coordinator holds, against a simulator that knows only the total
    (n - 1 uniform ring vectors, the last one making up the total): a distinguisher comparing
    each coordinate's top bits and the vectors' pairwise agreement of top bits cannot tell the
    real view from the simulated one, whatever the nodes' own counts were (masks from a PRG)."""
    import random
    import statistics as stats

    from privacy.secagg import MODULUS

    def features(view: list[list[int]]) -> list[float]:
        top = [[v >> 45 for v in vector] for vector in view]  # 3 top bits, uniform on 0..7
        means = [stats.fmean(vector) for vector in top]
        agree = [
            sum(a == b for a, b in zip(top[i], top[j], strict=True)) / len(top[i])
            for i in range(len(top))
            for j in range(i + 1, len(top))
        ]
        return means + agree

    net = Network(4, 4)
    names = sorted(net.secrets)
    net.values = {m: [3 if i % 2 else 0] * 3000 for i, m in enumerate(names)}  # skewed data
    real = list(net.masked(names, names).values())
    total = [sum(column) % (1 << 48) for column in zip(*real, strict=True)]
    rng = random.Random(7)
    simulated = [[rng.randrange(MODULUS) for _ in total] for _ in range(3)]
    simulated.append([(t - sum(c)) % MODULUS for t, *c in zip(total, *simulated, strict=True)])
    for view in (real, simulated):
        f = features(view)
        # means of 3001 uniform 0..7 values: 3.5 +- 0.042 (sd); agreement 1/8 +- 0.006
        assert all(abs(m - 3.5) < 0.25 for m in f[:4]), f
        assert all(abs(a - 0.125) < 0.035 for a in f[4:]), f
    gap = [abs(a - b) for a, b in zip(features(real), features(simulated), strict=True)]
    assert max(gap[:4]) < 0.3 and max(gap[4:]) < 0.05
