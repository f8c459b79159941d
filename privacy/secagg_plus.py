"""Dropout recovery for the secure sum: double masking with threshold-shared seeds.

Bonawitz et al. ("Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS
2017), the protocol Flower's SecAgg+ follows, on the building blocks of ``privacy.secagg``:

1. keys: each node publishes two X25519 public keys, one for the channel to its peers and one
   for pairwise masks, signed by its permit-bound identity;
2. shares: each node derives a self-mask seed ``b_i``, splits ``b_i`` and its mask private key
   into n Shamir shares with threshold t, and sends share k to peer k encrypted (AES-GCM, key
   from X25519 + HKDF, bound to the session and both names): the coordinator relays ciphertexts
   it cannot read; the senders make U1;
3. masked: each node of U1 releases ``x_i + PRG(b_i) + sum_j +-PRG(s_ij)`` over U1 (mod 2^48,
   with the check coordinate of ``privacy.secagg``); the senders make U2;
4. consistency: each node of U2 signs U2 with its identity;
5. unmask: each node that sees at least t valid signatures over the same U2 reveals, for every
   node of U1, EITHER its share of ``b_j`` (j in U2: its vector arrived) OR of j's mask key (j
   dropped), never both. The coordinator rebuilds each ``b_j`` of U2 and each dropped node's
   pairwise masks and is left with the noisy total of U2.

Why a node whose vector arrived is never unmasked: the coordinator would need t shares of both
``b_j`` and j's mask key. With c colluding nodes (who hold shares of both) it needs t - c more of
each from honest nodes, each of which reveals one kind per node and signs one U2 per session
(the ledger answers a round once); two views of U2 that both gather t signatures then need
2 (t - c) honest signers, which exceed the h = n - c honest nodes when t > (n + c) / 2, i.e.
``2 t > 2 n - h`` (``check_threshold``; Bonawitz et al.'s bound for an active server). A node's
policy states h (``min_honest_nodes``); the threshold comes from the study (so the permit binds
it) and a node refuses one too weak for its h. Dropouts tolerated: n - t.

Shamir sharing is Flower's ``flwr.common.secure_aggregation.crypto.shamir`` (pycryptodome's
GF(2^128) Shamir over 16-byte chunks), the code Flower's own SecAgg+ uses; encryption is
``cryptography``'s AES-GCM rather than Flower's Fernet helper, which takes EC (not X25519) keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

from privacy.secagg import (
    MIN_PARTIES,
    RING_BITS,
    SecAggError,
    check_weights,
    ephemeral_key,
    identity_key,
    mask_stream,
    pair_seed,
    public_hex,
    public_key,
    signed,
)

_INFO = b"fedomop-secagg-plus-v1"
PHASES = ("share", "masked", "consistency", "reveal")
"""The rounds after the keys (round 0), in order: what a round's ``state["phase"]`` names."""
SELF, PAIR = "self", "pair"
"""What a revealed share is of: a node's self-mask seed, or its mask private key."""


@dataclass(frozen=True)
class NodeKeys:
    """One node's two key pairs for one pooled analysis (``context``), from its node secret."""

    channel: X25519PrivateKey
    masking: X25519PrivateKey

    @classmethod
    def derive(cls, secret: bytes, context: str) -> NodeKeys:
        return cls(ephemeral_key(secret, context + "|channel"), ephemeral_key(secret, context))

    def public(self) -> dict[str, str]:
        return {"channel": public_hex(self.channel), "mask": public_hex(self.masking)}


# --- round 1: keys, signed -------------------------------------------------------------------------


def _keys_message(context: str, keys: dict[str, str]) -> bytes:
    return _INFO + b"|keys|" + context.encode() + b"|" + json.dumps(keys, sort_keys=True).encode()


def sign_keys(secret: bytes, context: str, keys: dict[str, str]) -> str:
    """The node identity's signature (hex) over its two public keys for ``context``."""
    return identity_key(secret).sign(_keys_message(context, keys)).hex()


def _verify(identity_hex: str, signature_hex: str, message: bytes) -> bool:
    try:
        identity = Ed25519PublicKey.from_public_bytes(bytes.fromhex(identity_hex))
        identity.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_roster(
    roster: dict[str, dict[str, str]],
    signatures: dict[str, str],
    identities: dict[str, str],
    context: str,
) -> None:
    """Every roster node's keys signed by its permit identity, or ``SecAggError`` naming it."""
    for name, keys in sorted(roster.items()):
        if name not in identities:
            raise SecAggError(f"the permit binds no pooling identity for roster node {name!r}")
        message = _keys_message(context, keys)
        if not _verify(identities[name], signatures.get(name, ""), message):
            raise SecAggError(f"the roster's keys for {name!r} are not signed by its identity")


def check_threshold(parties: int, threshold: int, min_honest: int) -> None:
    """Refuse a threshold too weak for this node's assumption of ``min_honest`` honest nodes.

    t > n / 2 (two disjoint halves cannot both rebuild a seed), t >= h (the t survivors' noise
    shares carry the permit's noise, ``privacy.secagg.noise_share_cost``), and 2 t > 2 n - h (a
    coalition of n - h nodes and the coordinator cannot unmask a node whose vector arrived).
    """
    n, t, h = parties, threshold, min(min_honest, parties)
    if n < MIN_PARTIES:
        raise SecAggError(f"a pooled sum needs at least {MIN_PARTIES} nodes, the roster has {n}")
    if not h <= t <= n or 2 * t <= n or 2 * t <= 2 * n - h:
        raise SecAggError(
            f"threshold {t} of {n} nodes is too weak for this node's policy "
            f"(min_honest_nodes {h}): it needs t > n/2, t >= {h} and 2t > 2n - {h}, "
            f"i.e. t >= {max(h, n - (h - 1) // 2)}"
        )


# --- round 2: shares of the self-mask seed and the mask key ----------------------------------------


def session_id(analysis_id: str, roster: dict[str, dict[str, str]], threshold: int) -> bytes:
    """What every party of one dropout-tolerant sum agrees on: analysis, roster, threshold."""
    text = json.dumps(
        {"analysis": analysis_id, "roster": roster, "threshold": threshold, "v": 2}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).digest()


def self_seed(secret: bytes, context: str, session: bytes) -> bytes:
    """``b_i``: the self-mask seed, derived (no state between rounds, a replay gives the same)."""
    return HKDF(
        hashes.SHA256(), 32, salt=session, info=_INFO + b"|self|" + context.encode()
    ).derive(secret)


def _channel(keys: NodeKeys, peer_hex: str, session: bytes, sender: str, recipient: str) -> AESGCM:
    shared = keys.channel.exchange(public_key(peer_hex, recipient))
    info = _INFO + b"|channel|" + json.dumps([sender, recipient]).encode()
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=session, info=info).derive(shared))


def share_secrets(
    secret: bytes, context: str, me: str, roster: dict, threshold: int, session: bytes
) -> dict[str, str]:
    """Recipient -> hex ciphertext of (share of ``b_me``, share of my mask key), one per node.

    Shares are numbered by the recipients' sorted names (1..n); each ciphertext is readable by
    its recipient only and bound to the session and both names (AES-GCM associated data). The
    nonce is random: Shamir's coefficients are, so a second call must never reuse one.
    """
    keys = NodeKeys.derive(secret, context)
    names = sorted(roster)
    seeds = create_shares(self_seed(secret, context, session), threshold, len(names))
    masks = create_shares(keys.masking.private_bytes_raw(), threshold, len(names))
    out = {}
    for name, seed_share, mask_share in zip(names, seeds, masks, strict=True):
        plain = len(seed_share).to_bytes(2, "big") + seed_share + mask_share
        nonce = os.urandom(12)
        aead = _channel(keys, roster[name]["channel"], session, me, name)
        out[name] = (nonce + aead.encrypt(nonce, plain, session + me.encode())).hex()
    return out


def open_shares(
    secret: bytes, context: str, me: str, roster: dict, sent: dict[str, str], session: bytes
) -> dict[str, tuple[bytes, bytes]]:
    """Sender -> (its seed share, its mask-key share) addressed to me; a forged one refused."""
    keys = NodeKeys.derive(secret, context)
    out = {}
    for sender, blob_hex in sorted(sent.items()):
        try:
            blob = bytes.fromhex(blob_hex)
            aead = _channel(keys, roster[sender]["channel"], session, sender, me)
            plain = aead.decrypt(blob[:12], blob[12:], session + sender.encode())
        except (InvalidTag, ValueError, KeyError) as err:
            raise SecAggError(f"the shares {sender!r} sent to {me!r} do not decrypt") from err
        size = int.from_bytes(plain[:2], "big")
        out[sender] = (plain[2 : 2 + size], plain[2 + size :])
    return out


# --- round 3: masked vector ------------------------------------------------------------------------


def masked_vector(
    values: list[int],
    secret: bytes,
    context: str,
    me: str,
    roster: dict,
    senders: list[str],
    session: bytes,
    bits: int = RING_BITS,
) -> list[int]:
    """``values`` + check coordinate + PRG(b_me) + pairwise masks with every node of U1, in
    Z / 2^bits (48 for counts; ``privacy.fixed_point`` for fixed-point sums of reals)."""
    modulus = 1 << bits
    weights = check_weights(session, len(values), bits)
    vector = [v % modulus for v in values]
    vector.append(sum(w * v for w, v in zip(weights, vector, strict=True)) % modulus)
    streams = [mask_stream(self_seed(secret, context, session), len(vector), bits)]
    keys = NodeKeys.derive(secret, context)
    for peer in sorted(senders):
        if peer != me:
            seed = pair_seed(keys.masking, public_key(roster[peer]["mask"], peer), session)
            stream = mask_stream(seed, len(vector), bits)
            streams.append(stream if me < peer else [-m for m in stream])
    return [(v + sum(s[i] for s in streams)) % modulus for i, v in enumerate(vector)]


# --- rounds 4 and 5: consistency, then reveal ------------------------------------------------------


def _survivors_message(session: bytes, survivors: list[str]) -> bytes:
    return _INFO + b"|survivors|" + session + json.dumps(sorted(survivors)).encode()


def sign_survivors(secret: bytes, session: bytes, survivors: list[str]) -> str:
    """The node's signature over U2 (whose masked vectors the coordinator says it has)."""
    return identity_key(secret).sign(_survivors_message(session, survivors)).hex()


def reveal(
    opened: dict[str, tuple[bytes, bytes]],
    senders: list[str],
    survivors: list[str],
    signatures: dict[str, str],
    identities: dict[str, str],
    threshold: int,
    session: bytes,
) -> dict[str, tuple[str, str]]:
    """Owner -> (``self`` or ``pair``, share hex): one kind per node of U1, after the checks.

    U2 must lie in U1, hold at least t nodes, and carry at least t valid identity signatures
    over this very U2; then a node of U2 gets its seed share revealed (its self-mask comes off,
    its pairwise masks cancel), a dropped node its mask-key share (its dangling pairwise masks
    come off), never both.
    """
    strangers = sorted(set(survivors) - set(senders))
    if strangers:
        raise SecAggError(f"U2 names nodes that sent no shares: {strangers}")
    if len(survivors) < threshold:
        raise SecAggError(
            f"only {len(survivors)} masked vectors arrived, the threshold is {threshold}: "
            "the pooled sum cannot be completed"
        )
    message = _survivors_message(session, survivors)
    good = [n for n in sorted(signatures) if n in survivors and n in identities]
    good = [n for n in good if _verify(identities[n], signatures[n], message)]
    if len(good) < threshold:
        raise SecAggError(
            f"{len(good)} valid signatures over U2, {threshold} needed: refusing to reveal"
        )
    return {
        owner: (SELF, opened[owner][0].hex())
        if owner in survivors
        else (PAIR, opened[owner][1].hex())
        for owner in sorted(senders)
        if owner in opened
    }


def unmask_total(
    masked: dict[str, list[int]],
    revealed: dict[str, dict[str, tuple[str, str]]],
    roster: dict,
    survivors: list[str],
    threshold: int,
    session: bytes,
    bits: int = RING_BITS,
) -> list[int]:
    """The noisy total of U2: self-masks and dropped nodes' pairwise masks rebuilt and removed.

    ``revealed``: revealer -> owner -> (kind, share hex). Each seed needs t shares of one kind;
    a node asked for both kinds of one owner, or a total that does not check, fails loudly.
    """
    width = len(next(iter(masked.values())))
    modulus = 1 << bits
    total = [sum(column) % modulus for column in zip(*masked.values(), strict=True)]
    owners = sorted({o for shares in revealed.values() for o in shares})
    for owner in owners:
        kinds = {shares[owner][0] for shares in revealed.values() if owner in shares}
        expected = SELF if owner in survivors else PAIR
        if kinds != {expected}:
            raise SecAggError(f"shares revealed for {owner!r} are of kind {sorted(kinds)}")
        parts = [bytes.fromhex(s[owner][1]) for s in revealed.values() if owner in s]
        if len(parts) < threshold:
            raise SecAggError(f"{len(parts)} shares for {owner!r}, {threshold} needed")
        secret = combine_shares(parts[:threshold])
        if owner in survivors:
            total = [
                (t - m) % modulus
                for t, m in zip(total, mask_stream(secret, width, bits), strict=True)
            ]
            continue
        dropped = X25519PrivateKey.from_private_bytes(secret)
        for peer in survivors:  # peer's vector holds +-PRG(s_peer,owner) that nothing cancels
            seed = pair_seed(dropped, public_key(roster[peer]["mask"], peer), session)
            sign = 1 if peer < owner else -1
            stream = mask_stream(seed, width, bits)
            total = [(t - sign * m) % modulus for t, m in zip(total, stream, strict=True)]
    missing = sorted(set(survivors) - set(owners))
    if missing:
        raise SecAggError(f"no shares revealed for the self-masks of {missing}")
    values, check = total[:-1], total[-1]
    weights = check_weights(session, len(values), bits)
    if sum(w * v for w, v in zip(weights, values, strict=True)) % modulus != check:
        raise SecAggError("the unmasked total does not check: a vector or share was altered")
    return [signed(v, bits) for v in values]
