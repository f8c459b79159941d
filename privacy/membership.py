"""Membership-inference audit of a trained model on a node's own data: how much does it leak?

The accounted epsilon of DP-SGD is an upper bound on what any attack can learn about whether a
person was in the training rows. This module runs two attacks and turns their success into an
empirical lower bound on epsilon, so an operator can see the two side by side:

- **loss threshold** (Yeom et al. 2018): a person is guessed a member when the model's loss on
  their row is low;
- **LiRA, online, few reference models** (Carlini et al. 2022): ``reference_models`` models are
  trained like the target on random halves of the candidates (members and non-members); for each
  person the logit-scaled confidence ``log(p_y / (1 - p_y))`` of the models that saw them and of
  those that did not are fitted by two Gaussians, and the target model's confidence is scored by
  their likelihood ratio.

Empirical epsilon (Jagielski et al. 2020; Nasr et al. 2021): a guess rule with true-positive rate
TPR and false-positive rate FPR on an (epsilon, delta)-DP mechanism satisfies
``TPR <= e^epsilon FPR + delta`` and ``1 - FPR <= e^epsilon (1 - TPR) + delta``. With
Clopper-Pearson bounds (a lower bound for the rate in the numerator, an upper bound for the one in
the denominator) at ``confidence``, Bonferroni-corrected over the thresholds tried, the largest
``log((TPR_low - delta) / FPR_high)`` (and its mirror) is a lower bound on the true epsilon that
holds with that confidence. It can only be as large as the number of persons allows (about
``log(n)``), so it shows leakage, it does not certify privacy: the accounted epsilon does that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from privacy.dpsgd import TrainingConfig, initial_weights, predicted_risk, train_round

THRESHOLD_QUANTILES = tuple(np.linspace(0.05, 0.95, 19))
"""Score quantiles tried as guess thresholds (each costs the Bonferroni correction)."""


@dataclass(frozen=True)
class AttackResult:
    """One attack's success on members vs non-members."""

    attack: str
    auc: float
    tpr_at_fpr_0_1: float
    tpr_at_fpr_0_01: float
    epsilon_lower_bound: float
    confidence: float
    members: int
    non_members: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def confidences(x: np.ndarray, y: np.ndarray, weights: list[float], hidden: int) -> np.ndarray:
    """Logit-scaled confidence in the true label, ``log(p_y / (1 - p_y))`` (LiRA's statistic)."""
    p = np.clip(predicted_risk(x, weights, hidden), 1e-12, 1 - 1e-12)
    p_y = np.where(y == 1, p, 1 - p)
    return np.log(p_y) - np.log1p(-p_y)


def losses(x: np.ndarray, y: np.ndarray, weights: list[float], hidden: int) -> np.ndarray:
    """Binary cross-entropy of each row under the model."""
    p = np.clip(predicted_risk(x, weights, hidden), 1e-12, 1 - 1e-12)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _roc(scores_in: np.ndarray, scores_out: np.ndarray) -> tuple[float, float, float]:
    """AUC (ties half) and TPR at FPR 0.1 and 0.01 of 'member when the score is high'."""
    both = np.concatenate([scores_in, scores_out])
    ranks = _ranks(both)
    n1, n0 = len(scores_in), len(scores_out)
    auc = (ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)

    def tpr_at(fpr: float) -> float:
        threshold = np.quantile(scores_out, 1 - fpr, method="higher")
        return float(np.mean(scores_in > threshold))

    return float(auc), tpr_at(0.1), tpr_at(0.01)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided lower and upper bounds, each at level ``alpha``, of a binomial rate k / n."""
    from scipy.stats import beta

    low = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return low, high


def epsilon_lower_bound(
    scores_in: np.ndarray, scores_out: np.ndarray, delta: float, confidence: float = 0.95
) -> float:
    """The largest epsilon that the guesses 'member when score > t' prove at ``confidence``
    (module docstring), over the thresholds ``THRESHOLD_QUANTILES`` of all scores."""
    both = np.concatenate([scores_in, scores_out])
    thresholds = np.unique(np.quantile(both, THRESHOLD_QUANTILES))
    # two rates per threshold and two directions: each one-sided bound at alpha / (4 k)
    alpha = (1 - confidence) / (4 * len(thresholds))
    best = 0.0
    n1, n0 = len(scores_in), len(scores_out)
    for t in thresholds:
        tp, fp = int(np.sum(scores_in > t)), int(np.sum(scores_out > t))
        tpr_low = _clopper_pearson(tp, n1, alpha)[0]
        fpr_high = _clopper_pearson(fp, n0, alpha)[1]
        if tpr_low - delta > 0 and fpr_high > 0:  # TPR <= e^eps FPR + delta
            best = max(best, math.log((tpr_low - delta) / fpr_high))
        tnr_low, fnr_high = 1 - fpr_high, 1 - tpr_low  # TNR <= e^eps FNR + delta
        if tnr_low - delta > 0 and fnr_high > 0:
            best = max(best, math.log((tnr_low - delta) / fnr_high))
    return best


def _result(
    name: str, scores_in: np.ndarray, scores_out: np.ndarray, delta: float, confidence: float
) -> AttackResult:
    auc, tpr_10, tpr_1 = _roc(scores_in, scores_out)
    return AttackResult(
        attack=name,
        auc=auc,
        tpr_at_fpr_0_1=tpr_10,
        tpr_at_fpr_0_01=tpr_1,
        epsilon_lower_bound=epsilon_lower_bound(scores_in, scores_out, delta, confidence),
        confidence=confidence,
        members=len(scores_in),
        non_members=len(scores_out),
    )


def train_model(
    x: np.ndarray, y: np.ndarray, config: TrainingConfig, rounds: int, seed: int, private: bool
) -> list[float]:
    """A model trained as one node trains it: ``rounds`` rounds of ``train_round`` in a row."""
    weights = initial_weights(x.shape[1], config.hidden, seed)
    for _ in range(rounds):
        weights = train_round(x, y, weights, config, private=private)
    return weights


def audit(
    x: np.ndarray,
    y: np.ndarray,
    member: np.ndarray,
    config: TrainingConfig,
    *,
    rounds: int,
    seed: int,
    private: bool,
    delta: float,
    reference_models: int = 4,
    confidence: float = 0.95,
    rng: np.random.Generator | None = None,
    target: list[float] | None = None,
) -> tuple[list[float], list[AttackResult]]:
    """Attack ``target`` (default: a model trained here on the ``member`` rows) with both
    attacks; return its weights and the attacks' results. ``rng`` draws the reference models'
    halves (not private).

    A released federated model (``target``: FedAvg over every node's rounds) was trained on
    other nodes' rows too, which this node cannot retrain: LiRA's reference models are then
    this node's own ``rounds`` of training on halves of its candidates, an approximation of the
    target's training; the loss attack needs no reference."""
    rng = rng or np.random.default_rng()
    if target is None:
        target = train_model(x[member], y[member], config, rounds, seed, private)
    in_scores = -losses(x[member], y[member], target, config.hidden)
    out_scores = -losses(x[~member], y[~member], target, config.hidden)
    results = [_result("loss_threshold", in_scores, out_scores, delta, confidence)]
    if reference_models >= 2:
        lira = _lira_scores(x, y, target, config, rounds, seed, private, reference_models, rng)
        results.append(_result("lira", lira[member], lira[~member], delta, confidence))
    return target, results


def _lira_scores(
    x: np.ndarray,
    y: np.ndarray,
    target: list[float],
    config: TrainingConfig,
    rounds: int,
    seed: int,
    private: bool,
    k: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Online LiRA: likelihood ratio of the target's confidence under IN vs OUT Gaussians."""
    from scipy.stats import norm

    n = len(y)
    seen = np.zeros((k, n), dtype=bool)
    conf = np.zeros((k, n))
    for i in range(k):
        half = rng.permutation(n) < n // 2
        weights = train_model(x[half], y[half], config, rounds, seed, private)
        seen[i], conf[i] = half, confidences(x, y, weights, config.hidden)
    observed = confidences(x, y, target, config.hidden)
    scores = np.zeros(n)
    for j in range(n):
        inside, outside = conf[seen[:, j], j], conf[~seen[:, j], j]
        # one spread over all reference models: LiRA's choice when the models are few
        spread = np.std(conf[:, j]) + 1e-6
        mu_in = inside.mean() if inside.size else observed[j]
        mu_out = outside.mean() if outside.size else observed[j]
        scores[j] = norm.logpdf(observed[j], mu_in, spread) - norm.logpdf(
            observed[j], mu_out, spread
        )
    return scores
