"""The coordinator's view of a secure sum, simulated from the total alone (issue 11).

Security of a masked sum means: whatever the coordinator holds of one sum could have been made
from the unmasked total and public parameters only. The coordinator holds each node's masked
vector ``y_i`` and, after the reveal round, every survivor's self-mask seed ``b_i`` (rebuilt from
t shares), so it also holds ``z_i = y_i - PRG(b_i)``, the vector under the pairwise masks only.
``simulate`` makes that view from the total: fresh random seeds ``b_i``, ``z_i`` uniform in the
ring conditioned on summing to the total (its check coordinate included, from the public
session), ``y_i = z_i + PRG(b_i)``. Over many runs with per-node inputs that vary, a battery of
distinguishers (two-sample chi-square on the top and low bits of each coordinate, two-sample KS,
correlation of a node's ``y_i`` and ``z_i`` with its true vector, a search of a short seed
space) must not tell the real view (``privacy.secagg_plus.masked_vector`` as each gate runs it)
from the simulated one, in the 48-bit count ring and the 128-bit fixed-point ring; and the same
battery must tell apart two broken maskers (one node sending unmasked; masks from a one-byte
seed), so that the test can fail. Node secrets come from a seeded generator: the verdicts are
the same on every run (the statistics of a PRG-masked view are those of uniform draws).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats

from privacy.secagg import check_weights, mask_stream
from privacy.secagg_plus import NodeKeys, masked_vector, self_seed, session_id

CONTEXT = "pmt|study|sim"
NODES = ["node-a", "node-b", "node-c"]
LENGTH = 4
"""Values per node vector (the check coordinate makes 5)."""
RUNS = 400
ALPHA = 1e-3
"""Family-wise level of the battery (Bonferroni over every test of one comparison)."""
SHORT_SEEDS = 256
"""The seed space the seed-search distinguisher tries (a one-byte seed)."""


@dataclass
class View:
    """What the coordinator holds of RUNS sums: ``y[r][i]`` the masked vectors, ``z[r][i]`` the
    same less the revealed self-masks, and (for the distinguishers that know it, as a
    coordinator that guesses a node's input would) each node's true vector ``x[r][i]``."""

    y: list[list[list[int]]]
    z: list[list[list[int]]]
    x: list[list[list[int]]]


Masker = Callable[[list[int], bytes, str, dict, bytes, int], list[int]]


def real_masker(values, secret, me, roster, session, bits) -> list[int]:
    """What each gate sends (``node.pooled``): the SecAgg+ double-masked vector."""
    return masked_vector(values, secret, CONTEXT, me, roster, sorted(roster), session, bits)


def unmasked_node(values, secret, me, roster, session, bits) -> list[int]:
    """Broken: node-a forgets its masks (its peers still mask against it)."""
    if me == "node-a":
        weights = check_weights(session, len(values), bits)
        return [*values, sum(w * v for w, v in zip(weights, values, strict=True)) % (1 << bits)]
    return real_masker(values, secret, me, roster, session, bits)


def short_seed_masks(values, secret, me, roster, session, bits) -> list[int]:
    """Broken: node-a's masks come from a one-byte seed (a PRG keyed by too little entropy)."""
    if me != "node-a":
        return real_masker(values, secret, me, roster, session, bits)
    weights = check_weights(session, len(values), bits)
    vector = [*values, sum(w * v for w, v in zip(weights, values, strict=True)) % (1 << bits)]
    stream = mask_stream(secret[:1], len(vector), bits)
    return [(v + m) % (1 << bits) for v, m in zip(vector, stream, strict=True)]


def real_view(bits: int, masker: Masker, seed: int) -> View:
    """RUNS sums over three nodes with fresh secrets and random inputs, masked by ``masker``."""
    rng = random.Random(seed)
    modulus = 1 << bits
    view = View([], [], [])
    for _ in range(RUNS):
        secrets = {name: rng.randbytes(32) for name in NODES}
        roster = {name: NodeKeys.derive(s, CONTEXT).public() for name, s in secrets.items()}
        session = session_id("sim", roster, len(NODES))
        xs = [[rng.randrange(1000) for _ in range(LENGTH)] for _ in NODES]
        ys = [
            masker(x, secrets[name], name, roster, session, bits)
            for name, x in zip(NODES, xs, strict=True)
        ]
        selfs = [
            mask_stream(self_seed(secrets[n], CONTEXT, session), LENGTH + 1, bits) for n in NODES
        ]
        view.y.append(ys)
        view.z.append(
            [
                [(a - b) % modulus for a, b in zip(y, s, strict=True)]
                for y, s in zip(ys, selfs, strict=True)
            ]
        )
        view.x.append(xs)
    return view


def simulate(totals: list[list[int]], xs: list[list[list[int]]], bits: int, seed: int) -> View:
    """The simulator: each run's view from its total alone (and public parameters): pairwise
    parts uniform conditioned on the sum (check coordinate included), fresh self-mask seeds.
    ``xs`` rides along only for the distinguishers that correlate with the truth."""
    rng = random.Random(seed)
    modulus = 1 << bits
    view = View([], [], xs)
    for total in totals:
        session = rng.randbytes(32)  # public: a fresh roster's session
        weights = check_weights(session, LENGTH, bits)
        target = [t % modulus for t in total]
        target.append(sum(w * t for w, t in zip(weights, target, strict=True)) % modulus)
        zs = [[rng.randrange(modulus) for _ in target] for _ in NODES[1:]]
        zs.insert(
            0,
            [
                (t - sum(col)) % modulus
                for t, col in zip(target, zip(*zs, strict=True), strict=True)
            ],
        )
        selfs = [mask_stream(rng.randbytes(32), LENGTH + 1, bits) for _ in NODES]
        view.z.append(zs)
        view.y.append(
            [
                [(a + b) % modulus for a, b in zip(z, s, strict=True)]
                for z, s in zip(zs, selfs, strict=True)
            ]
        )
    return view


def totals_of(view: View) -> list[list[int]]:
    return [[sum(col) for col in zip(*xs, strict=True)] for xs in view.x]


def _entries(vectors: list[list[list[int]]], node: int, coordinate: int) -> list[int]:
    return [run[node][coordinate] for run in vectors]


def _bins(values: list[int], bits: int, low: bool) -> np.ndarray:
    """Counts of the top (or low) 3 bits: 8 bins."""
    keys = [v & 7 if low else v >> (bits - 3) for v in values]
    return np.bincount(keys, minlength=8)


def two_sample_rejections(a: View, b: View, bits: int, alpha: float) -> list[str]:
    """Per node, coordinate and vector (y, z): chi-square on the top 3 and low 3 bits and KS
    on the value, A against B; the tests that reject at ``alpha``."""
    out = []
    for name, va, vb in (("y", a.y, b.y), ("z", a.z, b.z)):
        for node in range(len(NODES)):
            for j in range(LENGTH + 1):
                ea, eb = _entries(va, node, j), _entries(vb, node, j)
                for low in (False, True):
                    table = np.vstack([_bins(ea, bits, low), _bins(eb, bits, low)])
                    if stats.chi2_contingency(table[:, table.sum(axis=0) > 0]).pvalue < alpha:
                        out.append(f"chi2 {'low' if low else 'top'} bits {name}[{node}][{j}]")
                scale = float(1 << bits)
                ks = stats.ks_2samp([v / scale for v in ea], [v / scale for v in eb])
                if ks.pvalue < alpha:
                    out.append(f"ks {name}[{node}][{j}]")
    return out


def truth_rejections(view: View, bits: int, alpha: float, seeds: list[list[int]]) -> list[str]:
    """Tests that use each node's true vector: correlation of its y and z entries with it, and
    a search of the one-byte seed space for a mask that leaves exactly the truth."""
    out = []
    scale = float(1 << bits)
    for name, vectors in (("y", view.y), ("z", view.z)):
        for node in range(len(NODES)):
            for j in range(LENGTH):
                masked = [v / scale for v in _entries(vectors, node, j)]
                truth = [float(v) for v in _entries(view.x, node, j)]
                if stats.pearsonr(masked, truth).pvalue < alpha:
                    out.append(f"correlation {name}[{node}][{j}]")
    modulus = 1 << bits
    for node in range(len(NODES)):
        found = sum(
            any(
                all(
                    (y - m) % modulus == x
                    for y, m, x in zip(
                        run_y[node][:LENGTH], stream[:LENGTH], run_x[node], strict=True
                    )
                )
                for stream in seeds
            )
            for run_y, run_x in zip(view.y, view.x, strict=True)
        )
        if found:
            out.append(f"short seed found for node {node} in {found} runs")
    return out


def distinguishers(real: View, simulated: View, bits: int) -> list[str]:
    """Every test of the battery that tells ``real`` from ``simulated`` (family-wise ALPHA)."""
    tests = 2 * len(NODES) * (LENGTH + 1) * 3 + 2 * 2 * len(NODES) * LENGTH
    alpha = ALPHA / tests
    seeds = [mask_stream(bytes([s]), LENGTH + 1, bits) for s in range(SHORT_SEEDS)]
    told = two_sample_rejections(real, simulated, bits, alpha)
    on_real = set(truth_rejections(real, bits, alpha, seeds))
    on_simulated = set(truth_rejections(simulated, bits, alpha, seeds))
    return told + sorted(on_real ^ on_simulated)


@pytest.mark.parametrize("bits", [48, 128])
def test_the_coordinators_view_is_simulated_from_the_total_alone(bits: int) -> None:
    real = real_view(bits, real_masker, seed=bits)
    simulated = simulate(totals_of(real), real.x, bits, seed=bits + 1)
    modulus = 1 << bits
    for view in (real, simulated):  # both views unmask to the total: the sum is all they hold
        for zs, total in zip(view.z, totals_of(real), strict=True):
            assert [sum(col) % modulus for col in zip(*zs, strict=True)][:LENGTH] == total
    assert distinguishers(real, simulated, bits) == []


@pytest.mark.parametrize("masker", [unmasked_node, short_seed_masks])
@pytest.mark.parametrize("bits", [48, 128])
def test_a_broken_masker_is_told_from_the_simulation(bits: int, masker: Masker) -> None:
    """The battery has power: one node unmasked, or masks from a one-byte seed, and the real
    view no longer looks like one made from the total alone."""
    broken = real_view(bits, masker, seed=bits)
    simulated = simulate(totals_of(broken), broken.x, bits, seed=bits + 1)
    told = distinguishers(broken, simulated, bits)
    assert told and all("[0]" in t or "node 0" in t for t in told), told
