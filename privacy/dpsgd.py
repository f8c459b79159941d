"""DP-SGD at a node with Opacus: a small model, one round of local training, and its accounting.

A node trains a logistic regression (or a one-hidden-layer MLP) on its own rows with Opacus:
Poisson sampling at ``sample_rate``, per-example gradients clipped to ``max_grad_norm``, Gaussian
noise of ``noise_multiplier * max_grad_norm`` added to each summed batch gradient. Only the
weights leave the node; they are differentially private for the node's training rows.

Accounting. Opacus's RDP accountant keeps a history of ``(noise_multiplier, sample_rate, steps)``
entries; its epsilon at the permit's delta is the privacy loss of all the training this node has
done for the permit's analysis. The history is kept in the node's ledger, keyed by permit and
analysis, so a later round (or a restarted gate) composes onto it: round ``r`` is charged
``epsilon(history + round r) - epsilon(history)``. Everything a round costs is fixed by the study
(noise multiplier, sample rate, epochs), so the gate computes the charge and checks the budget
before it reads any data, and charges it durably before the weights are released.

The ledger counts in rho (zCDP); a DP-SGD round enters it as the increment of
``epsilon_to_rho(epsilon)`` (``privacy.accounting``), so the permit's rho spent on the analysis
converts back to exactly Opacus's epsilon and the permit's epsilon budget caps it exactly. This is
an epsilon-equivalent, not a zCDP guarantee (subsampled Gaussian mechanisms are not tightly
zCDP): when one permit mixes DP-SGD with OpenDP-noised counts, the sum is bookkeeping in one
currency, not a proven composition; a permit body wanting a proven bound gives DP-SGD its own
permit.

Why the noise comes from Opacus (torch), while counts use OpenDP. DP-SGD adds continuous Gaussian
noise to float gradients inside the optimiser; OpenDP has no mechanism for that, and Opacus is
the audited implementation. Two weaknesses of float noise are handled as follows:
- Floating-point attacks (Mironov 2012; Jin et al. 2022 for Opacus): Opacus's ``secure_mode``
  sums four Gaussian draws per coordinate (arXiv:2107.10138), and takes them and the Poisson
  sampling from a CSPRNG (``torchcsprng``). ``SECURE_MODE`` turns it on whenever ``torchcsprng``
  is installed.
- Without ``torchcsprng`` (the default install: it has no wheels for current torch) noise and
  Poisson sampling come from torch's Mersenne Twister, seeded here from ``os.urandom`` for every
  round: never from the study's ``seed`` (the study is public, so noise or batches derived from it
  could be subtracted, and subsampling would no longer amplify privacy). That generator is not
  cryptographically secure and the single-draw float noise is open to the floating-point attack
  in principle; this is the honest limit of the default install, reported in every release's
  settings (``opacus_secure_mode``). The study's ``seed`` fixes only the initial weights and the
  train/hold-out split, which are not private.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from privacy.accounting import epsilon_to_rho
from privacy.ledger import AccountantState, AccountantUpdate

SECURE_MODE: bool = importlib.util.find_spec("torchcsprng") is not None
"""Opacus's secure_mode (CSPRNG noise and sampling) whenever torchcsprng is installed."""

#: One entry of Opacus's RDP accountant history: (noise_multiplier, sample_rate, steps).
Step = tuple[float, float, int]


@dataclass(frozen=True)
class TrainingConfig:
    """What one round of local DP-SGD does; every number comes from the study."""

    hidden: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    epochs: int
    learning_rate: float

    @property
    def steps_per_epoch(self) -> int:
        """Opacus's Poisson sampler takes ``int(1 / sample_rate)`` batches per epoch."""
        return int(1 / self.sample_rate)

    def accountant_step(self) -> Step:
        """The history entry Opacus's accountant records for one round.

        Opacus accounts a loader of ``k`` batches at rate ``1 / k`` (at least the sampling
        rate, so the accounting is never below the truth).
        """
        k = self.steps_per_epoch
        return (float(self.noise_multiplier), 1 / k, self.epochs * k)


# --- accounting ------------------------------------------------------------------------------


def compose(history: list[Any], step: Step | None) -> list[Step]:
    """``history`` followed by ``step``, merged as Opacus's ``RDPAccountant.step`` merges
    consecutive entries with the same noise multiplier and sample rate."""
    out: list[Step] = [(float(s), float(q), int(n)) for s, q, n in history]
    if step is None:
        return out
    if out and out[-1][:2] == step[:2]:
        out[-1] = (step[0], step[1], out[-1][2] + step[2])
    else:
        out.append(step)
    return out


def accountant_epsilon(history: list[Step], delta: float) -> float:
    """Epsilon at ``delta`` of an RDP accountant history (Opacus's own conversion)."""
    return _epsilon(tuple(compose(history, None)), delta)


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[Step, ...], delta: float) -> float:
    """Cached: Opacus's RDP over its fractional orders takes a noticeable fraction of a second."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


@dataclass(frozen=True)
class RoundCharge:
    """The privacy loss of one DP-SGD round at a node, composed onto the ledger's history."""

    previous: list[Step]
    history: list[Step]
    delta: float
    epsilon_before: float
    epsilon_after: float

    @property
    def rho(self) -> float:
        """The ledger's charge: the increment of the epsilon-equivalent rho."""
        after = epsilon_to_rho(self.epsilon_after, self.delta)
        return max(after - epsilon_to_rho(self.epsilon_before, self.delta), 0.0)

    def ledger_update(self) -> AccountantUpdate | None:
        """The ledger's compare-and-swap of the history; None when the round trains nothing."""
        if self.history == self.previous:
            return None
        new = AccountantState(self.history, self.epsilon_after, self.delta)
        return AccountantUpdate(self.previous or None, new)

    def settings(self) -> dict[str, Any]:
        """What the gate reports with the release."""
        trained = self.history != self.previous
        return {
            "noise_scale": self.history[-1][0] if trained else 0.0,
            "rho_charged": self.rho,
            "epsilon_charged": self.epsilon_after - self.epsilon_before,
            "epsilon_total": self.epsilon_after,
            "delta": self.delta,
            "accountant": "rdp",
            "accountant_steps": sum(n for _, _, n in self.history),
            "opacus_secure_mode": SECURE_MODE,
        }


def round_charge(previous: list[Any], step: Step | None, delta: float) -> RoundCharge:
    """The charge of a round adding ``step`` (None: no training) to the ``previous`` history."""
    before = compose(previous, None)
    after = compose(before, step)
    return RoundCharge(
        previous=before,
        history=after,
        delta=delta,
        epsilon_before=accountant_epsilon(before, delta),
        epsilon_after=accountant_epsilon(after, delta),
    )


# --- the model -------------------------------------------------------------------------------


def _model(n_features: int, hidden: int) -> Any:
    import torch

    if hidden == 0:
        return torch.nn.Sequential(torch.nn.Linear(n_features, 1))
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
    )


def _with_weights(n_features: int, hidden: int, weights: list[float]) -> Any:
    import torch

    model = _model(n_features, hidden)
    vector = torch.tensor(weights, dtype=torch.float32)
    expected = sum(p.numel() for p in model.parameters())
    if vector.numel() != expected:
        raise ValueError(f"state has {vector.numel()} weights, the model has {expected}")
    torch.nn.utils.vector_to_parameters(vector, model.parameters())
    return model


def _flat(model: Any) -> list[float]:
    import torch

    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().tolist()


def initial_weights(n_features: int, hidden: int, seed: int) -> list[float]:
    """Round 0's weights: torch's default initialisation under ``seed``, the same at every node.

    The global torch generator is forked, so the seed leaks into nothing else.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _flat(_model(n_features, hidden))


def parameter_count(n_features: int, hidden: int) -> int:
    """Number of weights of the model (logistic: one per feature plus the intercept)."""
    if hidden == 0:
        return n_features + 1
    return hidden * (n_features + 1) + hidden + 1


def _secret_generator() -> Any:
    """A torch generator seeded from the OS's entropy: noise and batches no one can replay."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return generator


def train_round(
    x: np.ndarray, y: np.ndarray, weights: list[float], config: TrainingConfig
) -> list[float]:
    """One round of local DP-SGD from ``weights``; returns the new weights.

    Raises ``RuntimeError`` if Opacus's accountant recorded anything other than
    ``config.accountant_step()``, the step the gate charged before training. Runs on one torch
    thread: the models are tiny, and intra-op threads only contend for a busy node's cores
    (measured 14x slower with 2 threads on a loaded 2-core machine, ``bench/dpsgd.py``).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, y, weights, config)
    finally:
        torch.set_num_threads(threads)


def _train(
    x: np.ndarray, y: np.ndarray, weights: list[float], config: TrainingConfig
) -> list[float]:
    import torch
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    if len(x) < config.steps_per_epoch:
        raise ValueError(
            f"{len(x)} training rows are fewer than the {config.steps_per_epoch} batches per epoch"
        )
    model = _with_weights(x.shape[1], config.hidden, weights)
    dataset = TensorDataset(
        torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    )
    with warnings.catch_warnings():  # the missing secure RNG is documented above and in settings
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant="rdp", secure_mode=SECURE_MODE)
    generator = engine.secure_rng if SECURE_MODE else _secret_generator()
    loader = DPDataLoader(dataset, sample_rate=config.sample_rate, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    with warnings.catch_warnings():  # Opacus's hooks on inputs that need no gradient: harmless
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        private, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=config.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples, from our generator
            noise_generator=None if SECURE_MODE else generator,
        )
        loss_fn = torch.nn.BCEWithLogitsLoss()
        private.train()
        for _ in range(config.epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                loss_fn(private(xb), yb).backward()
                optimizer.step()
    recorded = compose(engine.accountant.history, None)
    if recorded != [config.accountant_step()]:
        raise RuntimeError(
            f"Opacus accounted {recorded}, the gate charged {[config.accountant_step()]}"
        )
    return _flat(model)


def evaluate(x: np.ndarray, y: np.ndarray, weights: list[float], hidden: int) -> dict[str, float]:
    """AUC, accuracy (at 0.5) and Brier score of the model on rows it was not trained on."""
    import torch
    from sklearn.metrics import roc_auc_score

    model = _with_weights(x.shape[1], hidden, weights)
    with torch.no_grad():
        p = torch.sigmoid(model(torch.tensor(x, dtype=torch.float32))).squeeze(1).double().numpy()
    both = 0 < y.sum() < len(y)
    return {
        "auc": float(roc_auc_score(y, p)) if both else math.nan,
        "accuracy": float(np.mean((p >= 0.5) == (y == 1))) if len(y) else math.nan,
        "brier_score": float(np.mean((p - y) ** 2)) if len(y) else math.nan,
    }
