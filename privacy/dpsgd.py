"""DP-SGD at a node with Opacus: a small model, one round of local training, and its accounting.

A node trains a logistic regression (or a one-hidden-layer MLP) on its own rows with Opacus:
Poisson sampling at ``sample_rate``, per-example gradients clipped to ``max_grad_norm``, Gaussian
noise of ``noise_multiplier * max_grad_norm`` added to each summed batch gradient. Only the
weights leave the node; they are differentially private for the node's training rows.

Accounting. Opacus's RDP accountant keeps a history of ``(noise_multiplier, sample_rate, steps)``
entries. The history is kept in the node's ledger, keyed by permit and analysis, so a later
round (or a restarted gate) composes onto it. The node fixes the noise multiplier itself
(``fixed_noise_multiplier``): from the grant's epsilon and the study's planned rounds, at the
node's delta and the exact sample rate, the smallest whose whole run fits (unless the study
states one); its first round's history entry keeps it for the later rounds. Everything else a
round costs is fixed by the study (sample rate, epochs, the rho of its noisy counts), so the
gate computes the charge and checks the budget before it reads any data, and charges it
durably before the weights are released. The sample rate is accounted exactly as the study gives it (Opacus's own engine
records ``1 / int(1 / rate)``, which over-charges rates that are not a unit fraction: 0.256 is
recorded as 1/3); the steps are the batches the loader runs, ``epochs * int(1 / rate)``.

What a DP-SGD release carries besides the weights is counted too: its number of training rows
(FedAvg's weight) or, in the evaluation round, the hold-out counts per outcome and predicted-risk
bin, are OpenDP discrete Gaussian counts whose rho (``count_rho``, ``evaluation_rho`` in the
study) enters the same history as the RDP entry of a rho-zCDP release (``privacy.accounting``).
The exact counts only decide whether the node takes part: fewer training rows than the study's
minimum, or an outcome level (zero included) below the minimum cell count, refuses the round.

One accountant per permit: the permit's OpenDP releases and all its DP-SGD histories compose in
Opacus's RDP accountant (``privacy.accounting.permit_epsilon``), converted to (epsilon, delta)
once, at the node's delta (the policy's; a permit may only lower it). The ledger's rho for a
round is the increase of the permit's rho-equivalent; the grant's ``cost`` caps the analysis's
own epsilon. A negative or non-finite epsilon (Opacus at a large delta) is refused, never booked.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from privacy.accounting import (
    Step,
    epsilon_to_rho,
    permit_epsilon,
    rdp_epsilon,
    zcdp_step,
)
from privacy.disclosure import ROW_COUNT_VARIABLE, DisclosureRefusal, DisclosureReport, protect
from privacy.ledger import AccountantState, AccountantUpdate

SECURE_MODE: bool = importlib.util.find_spec("torchcsprng") is not None
"""Opacus's secure_mode (CSPRNG noise and sampling) whenever torchcsprng is installed."""

OUTCOME_VARIABLE = "outcome"
"""The exact outcome-level count rows a local step reports; used for the guards, never released."""
LEVEL_VARIABLE = "feature_level"
"""The exact count rows of each binary (or count) feature's present and absent level, as the
GLM's regression guards count its binary covariates; used for the guards, never released."""
GUARD_VARIABLES = (ROW_COUNT_VARIABLE, OUTCOME_VARIABLE, LEVEL_VARIABLE)
"""The exact guard counts of a local step: read by the gate, dropped before any release."""

NON_PRIVATE = 0.0
"""The noise multiplier a gate passes for the non-private baseline (a ``none`` grant, where its
policy allows non-private models): the model trains without clipping or noise. No study can
state it (a stated one is at least ``NOISE_RANGE[0]``)."""


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
        """Opacus's Poisson loader runs ``int(1 / sample_rate)`` batches per epoch."""
        return int(1 / self.sample_rate)

    def accountant_step(self) -> Step:
        """The RDP history entry of one round: every batch is a Poisson sample at the study's
        exact rate, with noise multiplier ``noise_multiplier``."""
        return (
            float(self.noise_multiplier),
            float(self.sample_rate),
            self.epochs * self.steps_per_epoch,
        )


# --- accounting ------------------------------------------------------------------------------


def compose(history: list[Any], steps: list[Step] | Step | None) -> list[Step]:
    """``history`` followed by ``steps``, merged as Opacus's ``RDPAccountant.step`` merges
    consecutive entries with the same noise multiplier and sample rate."""
    out: list[Step] = [(float(s), float(q), int(n)) for s, q, n in history]
    if steps is None:
        return out
    for step in [steps] if isinstance(steps, tuple) else steps:
        if out and out[-1][:2] == step[:2]:
            out[-1] = (step[0], step[1], out[-1][2] + step[2])
        else:
            out.append(step)
    return out


def accountant_epsilon(history: list[Step], delta: float) -> float:
    """Epsilon at ``delta`` of an RDP accountant history (Opacus's own conversion)."""
    return rdp_epsilon(compose(history, None), delta)


@dataclass(frozen=True)
class RoundCharge:
    """The privacy loss of one DP-SGD release at a node, composed onto the permit's accountant.

    ``previous``/``history``: this analysis's RDP history before and after; ``epsilon_*``: its
    own epsilon (what the grant's cost caps); ``permit_*``: the whole permit's loss in one
    accountant (its other DP-SGD histories and its zCDP releases included).
    """

    previous: list[Step]
    history: list[Step]
    delta: float
    epsilon_before: float
    epsilon_after: float
    permit_epsilon_before: float
    permit_epsilon_after: float
    count_rho: float
    noise_multiplier: float
    """The round's DP-SGD noise multiplier; 0 when it trains nothing (evaluation)."""

    @property
    def trains(self) -> bool:
        """Whether the release trains (else it evaluates on the hold-out)."""
        return self.noise_multiplier > 0.0

    @property
    def rho(self) -> float:
        """The ledger's charge: the increase of the permit's rho-equivalent."""
        after = epsilon_to_rho(self.permit_epsilon_after, self.delta)
        return max(after - epsilon_to_rho(self.permit_epsilon_before, self.delta), 0.0)

    def ledger_update(self) -> AccountantUpdate:
        """The ledger's compare-and-swap of the history."""
        new = AccountantState(self.history, self.epsilon_after, self.delta)
        return AccountantUpdate(self.previous or None, new)

    def settings(self) -> dict[str, Any]:
        """What the gate reports with the release."""
        return {
            "noise_scale": self.noise_multiplier,
            "rho_charged": self.rho,
            "count_rho": self.count_rho,
            "epsilon_charged": self.permit_epsilon_after - self.permit_epsilon_before,
            "epsilon_analysis": self.epsilon_after,
            "epsilon_total": self.permit_epsilon_after,
            "delta": self.delta,
            "accountant": "rdp",  # Opacus RDP; zCDP counts enter as rho * alpha
            "accountant_steps": sum(n for _, q, n in self.history if q < 1.0),
            "opacus_secure_mode": SECURE_MODE,
        }


def round_charge(
    previous: list[Any],
    train: Step | None,
    count_rho: float,
    delta: float,
    *,
    permit_zcdp: float = 0.0,
    others: list[list[Any]] | None = None,
) -> RoundCharge:
    """The charge of a release that trains ``train`` (None: evaluation only) and releases counts
    of zCDP cost ``count_rho``, composed onto this analysis's ``previous`` history, the permit's
    zCDP rho and its other DP-SGD histories (``others``)."""
    before = compose(previous, None)
    after = compose(before, ([train] if train else []) + count_steps(count_rho))
    others = [compose(h, None) for h in others or []]
    return RoundCharge(
        previous=before,
        history=after,
        delta=delta,
        epsilon_before=accountant_epsilon(before, delta),
        epsilon_after=accountant_epsilon(after, delta),
        permit_epsilon_before=permit_epsilon(permit_zcdp, [*others, before], delta),
        permit_epsilon_after=permit_epsilon(permit_zcdp, [*others, after], delta),
        count_rho=count_rho,
        noise_multiplier=float(train[0]) if train else 0.0,
    )


#: The noise multipliers a node may fix (the study's bounds on a stated one).
NOISE_RANGE = (0.3, 100.0)


def planned_noise_multiplier(
    plan: Callable[[float], list[Step]], epsilon: float, delta: float, tolerance: float = 1e-3
) -> float:
    """The smallest noise multiplier (to relative ``tolerance``, rounded up) at which the whole
    planned run ``plan(sigma)``, every round's DP-SGD steps and noisy counts, costs at most
    ``epsilon`` at ``delta`` in the node's accountant.

    Opacus's ``get_noise_multiplier`` searches the same way but over one ``(sigma, rate, steps)``
    entry only; the plan also holds the zCDP counts each release carries, which it cannot add,
    so this bisects (on the log scale) with the accountant the gate charges with. Raises
    ``ValueError`` when even the largest multiplier overruns the budget.
    """
    low, high = NOISE_RANGE
    if accountant_epsilon(plan(high), delta) > epsilon:
        raise ValueError(
            f"epsilon {epsilon:.4g} at delta {delta:g} cannot cover the planned rounds even at "
            f"noise multiplier {high:g}: fewer rounds or steps, or a larger grant"
        )
    if accountant_epsilon(plan(low), delta) <= epsilon:
        return low
    while high / low > 1 + tolerance:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if accountant_epsilon(plan(mid), delta) > epsilon else (low, mid)
    return high


def fixed_noise_multiplier(
    previous: list[Any],
    stated: float | None,
    plan: Callable[[float], list[Step]],
    cap: float,
    delta: float,
    *,
    budgets: list[tuple[float, list[Step]]] | None = None,
) -> float:
    """The noise multiplier a node trains every round with: the one its ledger's history
    already holds (fixed by its first round, so a changed policy or grant never changes it
    mid-run), else the study's stated one, else the smallest at which the whole plan fits the
    analysis's ``cap`` (its grant) and every one of ``budgets``: (epsilon, what is spent of it
    already as accountant history entries), e.g. the permit's budget after its other releases
    and the node's yearly cap after the year's releases under every permit. The tightest wins,
    so a planned run that fits at all completes.

    Releases that come after the first round are not foreseen: when they use up a budget, the
    round that would exceed it is refused (``node.gate``)."""
    trained = [float(s) for s, q, _ in previous if float(q) < 1.0]
    if trained:
        return trained[0]
    if stated is not None:
        return float(stated)
    sigma = planned_noise_multiplier(plan, cap, delta)
    for epsilon, spent in budgets or []:
        if math.isfinite(epsilon):
            whole = planned_noise_multiplier(
                lambda s, spent=list(spent): compose(spent, plan(s)), epsilon, delta
            )
            sigma = max(sigma, whole)
    return sigma


def permit_entries(zcdp_rho: float, histories: list[list[Any]]) -> list[Step]:
    """What a permit has spent as one accountant's history entries: its DP-SGD histories and
    its zCDP releases (``privacy.accounting.permit_epsilon``'s composition)."""
    entries = [(float(s), float(q), int(n)) for h in histories for s, q, n in h]
    return entries + count_steps(zcdp_rho)


def count_steps(rho: float) -> list[Step]:
    """The history entry of a release's noisy counts of total zCDP cost ``rho`` (none at 0)."""
    return [zcdp_step(rho)] if rho > 0.0 else []


# --- what a round releases -------------------------------------------------------------------


def participation_guard(raw: pl.DataFrame, min_cell_count: int, min_rows: int) -> None:
    """Refuse a node that should not take part: too few rows, or an outcome level (zero
    included: a node without events only adds noise to FedAvg) below the minimum cell count.

    Reads the exact counts of the local step; they are never released.
    """
    counts = raw.filter(pl.col("release_class") == "count")
    rows = counts.filter(pl.col("variable_name") == ROW_COUNT_VARIABLE)["value"]
    n = float(rows[0]) if rows.len() else 0.0
    if n < max(min_rows, min_cell_count):
        raise DisclosureRefusal(
            f"a model trained on {n:g} rows, below the minimum of {max(min_rows, min_cell_count)}: "
            "this node does not take part"
        )
    levels = counts.filter(pl.col("variable_name") == OUTCOME_VARIABLE)["value"].to_list()
    if len(levels) < 2 or min(levels) < min_cell_count:
        raise DisclosureRefusal(
            f"a model with an outcome level of {min(levels, default=0):g} rows, below the minimum "
            f"cell count {min_cell_count}: this node does not take part"
        )


def protect_round(
    raw: pl.DataFrame,
    min_cell_count: int,
    min_rows: int,
    noise: Any,
    expected_rho: float,
    declared_rows: int | None,
) -> tuple[pl.DataFrame, DisclosureReport]:
    """A DP-SGD release: guards on the exact counts, then only DP values leave.

    The weights (value rows) are DP by DP-SGD; every released count row gets OpenDP discrete
    Gaussian noise under ``noise`` (a ``gaussian`` grant of ``expected_rho`` with one row per
    person, as the analysis declares: ``declared_rows``), then cell suppression
    (post-processing). The exact guard counts (rows, outcome and feature levels) are dropped:
    what a release counts is in its own rows, one per person.
    Raises ``DisclosureRefusal`` when the node must not take part or the noise would cost other
    than what was charged.
    """
    from privacy.dp import noise_statistics

    participation_guard(raw, min_cell_count, min_rows)
    released = raw.filter(~pl.col("variable_name").is_in(GUARD_VARIABLES))
    counts = released.filter(pl.col("release_class") == "count")
    values = released.filter(pl.col("release_class") != "count")
    noisy, report = noise_statistics(counts, noise, declared_rows=declared_rows)
    if not math.isclose(report.rho, expected_rho, rel_tol=1e-9):
        raise DisclosureRefusal(
            f"DP-SGD counts would cost rho {report.rho:.4g}, {expected_rho:.4g} was charged"
        )
    protected, disclosure = protect(noisy, min_cell_count)
    return pl.concat([protected, values], how="vertical"), disclosure


def protect_nonprivate_round(
    raw: pl.DataFrame, min_cell_count: int, min_rows: int
) -> tuple[pl.DataFrame, DisclosureReport]:
    """The non-private baseline's release (a ``none`` grant): an exact model, so the exact
    GLM's disclosure control decides, through its one code path.

    The node takes part as under DP (``participation_guard``). Then the regression guards run
    on the guard counts and the weights exactly as on a GLM's table (``protect`` with
    ``regression=True``: rows at least the minimum cell count, parameters at most a third of
    the rows, no outcome or feature level below the minimum cell count), refusing the whole
    release when one fails. What is released: the weights, the exact training size and the
    hold-out risk-bin counts, small cells suppressed (``protect``); the guard counts are
    dropped. Raises ``DisclosureRefusal``.
    """
    participation_guard(raw, min_cell_count, min_rows)
    guarded = pl.col("variable_name").is_in(GUARD_VARIABLES) | (pl.col("release_class") == "value")
    protect(raw.filter(guarded), min_cell_count, regression=True)  # raises when a guard fails
    return protect(raw.filter(~pl.col("variable_name").is_in(GUARD_VARIABLES)), min_cell_count)


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
    """Round 0's weights, the same at every node: zeros for the logistic model (its loss is
    convex; a random start made the untrained model anti-predictive, AUC 0.33 on the example,
    and short DP runs kept it there), torch's default initialisation under ``seed`` for the MLP
    (whose hidden units need distinct starts).

    The global torch generator is forked, so the seed leaks into nothing else.
    """
    import torch

    if hidden == 0:
        return [0.0] * parameter_count(n_features, hidden)
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
    x: np.ndarray,
    y: np.ndarray,
    weights: list[float],
    config: TrainingConfig,
    *,
    private: bool = True,
    seed: int | None = None,
) -> list[float]:
    """One round of local DP-SGD from ``weights``; returns the new weights.

    ``private=False`` trains the same model on Poisson batches at the same rate without
    clipping or noise: the non-private baseline (of benchmarks, and behind a gate under a
    ``none`` grant). Its batches come from ``seed`` when given, so a gated baseline equals the
    same run in process (a non-private model gains no privacy from secret batches; its release
    is exact and guarded as such); DP-SGD never takes a seed (its batches must stay secret).

    Raises ``RuntimeError`` if Opacus's accountant recorded anything other than
    ``config.accountant_step()``, the step the gate charged before training. Runs on one torch
    thread: the models are tiny, and intra-op threads only contend for a busy node's cores
    (measured 14x slower with 2 threads on a loaded 2-core machine, ``bench/dpsgd.py``).
    """
    import torch

    if private and seed is not None:
        raise ValueError("DP-SGD batches and noise are never seeded: they must stay secret")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if private:
            return _train(x, y, weights, config)
        return _train_plain(x, y, weights, config, seed)
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
    _check_recorded(engine.accountant.history, loader, config)
    return _flat(model)


def _train_plain(
    x: np.ndarray, y: np.ndarray, weights: list[float], config: TrainingConfig, seed: int | None
) -> list[float]:
    """``_train`` without Opacus: plain SGD on the mean loss of each Poisson batch (batches
    from ``seed``, else secret)."""
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    model = _with_weights(x.shape[1], config.hidden, weights)
    dataset = TensorDataset(
        torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    )
    if seed is None:
        generator = _secret_generator()
    else:
        generator = torch.Generator()
        generator.manual_seed(seed)
    loader = DPDataLoader(dataset, sample_rate=config.sample_rate, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(config.epochs):
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            optimizer.zero_grad()
            loss_fn(model(xb), yb).backward()
            optimizer.step()
    return _flat(model)


def _check_recorded(history: list[Any], loader: Any, config: TrainingConfig) -> None:
    """Raise ``RuntimeError`` unless Opacus ran what the gate charged: the same noise
    multiplier and number of steps (its engine records the rate as ``1 / len(loader)``), and
    a loader that Poisson-samples at the study's exact rate."""
    sigma, rate, steps = config.accountant_step()
    recorded = compose(history, None)
    ran = [(s, n) for s, _, n in recorded]
    if ran != [(sigma, steps)] or float(loader.sample_rate) != rate:
        raise RuntimeError(
            f"Opacus ran {recorded} at rate {loader.sample_rate}, the gate charged "
            f"{[config.accountant_step()]}"
        )


def predicted_risk(x: np.ndarray, weights: list[float], hidden: int) -> np.ndarray:
    """The model's predicted risk for each row."""
    import torch

    model = _with_weights(x.shape[1], hidden, weights)
    with torch.no_grad():
        logits = model(torch.tensor(x, dtype=torch.float32)).squeeze(1).double().numpy()
    return 1 / (1 + np.exp(-logits))


def risk_bins(
    x: np.ndarray, y: np.ndarray, weights: list[float], hidden: int, edges: list[float]
) -> list[tuple[float, float]]:
    """Hold-out counts (outcome 1, outcome 0) per predicted-risk bin (``edges`` from the study):
    each person is in one bin, so one person changes one count by one."""
    bins = np.searchsorted(np.asarray(edges), predicted_risk(x, weights, hidden), side="right")
    k = len(edges) + 1
    events = np.bincount(bins[y == 1], minlength=k)
    others = np.bincount(bins[y != 1], minlength=k)
    return [(float(a), float(b)) for a, b in zip(events, others, strict=True)]
