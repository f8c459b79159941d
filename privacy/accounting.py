"""Privacy accounting in one currency: zero-concentrated DP (rho), shown to people as (epsilon, delta).

Budgets are granted in (epsilon, delta) because that is what permit bodies and operators read;
the ledger adds rho because zCDP composes by summation. Pure-DP (Laplace) releases enter the
ledger as rho = epsilon^2 / 2 (pure epsilon-DP implies this zCDP bound). The rho -> (epsilon, delta)
conversion is OpenDP's (``make_zCDP_to_approxDP``), tighter than the textbook
epsilon = rho + 2 sqrt(rho ln(1/delta)).
"""

from __future__ import annotations

import math
from functools import lru_cache

# OpenDP's modules, not ``opendp.prelude``: the prelude also imports ``opendp.extras`` and with
# it scikit-learn (1.2 s of every command's start-up, for nothing this package uses).
import opendp.combinators as dpc
import opendp.measurements as dpm
from opendp.domains import atom_domain
from opendp.metrics import absolute_distance
from opendp.mod import OpenDPException, enable_features

enable_features("contrib")


class AccountingError(ValueError):
    """A privacy loss or delta that is no privacy loss at all (negative, NaN, infinite)."""


def checked_loss(value: float, name: str) -> float:
    """``value`` as a float when it is a finite, non-negative privacy loss; else refuse.

    A negative loss (Opacus returns one at a large delta) or a NaN once read as 0 or slipped
    past ``<=`` comparisons, so a release was booked free; every conversion and charge goes
    through here instead.
    """
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise AccountingError(f"{name} {value!r} is not a number") from err
    if not math.isfinite(number) or number < 0.0:
        raise AccountingError(f"{name} {number!r} is not a privacy loss (finite and >= 0)")
    return number


def checked_delta(delta: float) -> float:
    """``delta`` when it lies in (0, 1), the range every (epsilon, delta) statement needs."""
    number = float(delta)
    if not (0.0 < number < 1.0):
        raise AccountingError(f"delta {number!r} must lie strictly between 0 and 1")
    return number


def effective_delta(policy_delta: float, permit_delta: float) -> float:
    """The delta a node accounts at: its policy's, lowered (never raised) by the permit's.

    A permit's delta near 1 would make any epsilon a large rho budget (and DP-SGD's epsilon
    negative); the node's own delta is the one it promised its data subjects.
    """
    return min(checked_delta(policy_delta), checked_delta(permit_delta))


@lru_cache(maxsize=1024)
def rho_to_epsilon(rho: float, delta: float) -> float:
    """Epsilon such that a rho-zCDP release is (epsilon, delta)-DP (OpenDP's conversion)."""
    rho, delta = checked_loss(rho, "rho"), checked_delta(delta)
    if rho == 0.0:
        return 0.0
    # A unit-sensitivity Gaussian with scale 1/sqrt(2 rho) is exactly rho-zCDP at d_in = 1.
    measurement = dpm.make_gaussian(
        atom_domain(T="i64"), absolute_distance(T="f64"), scale=1.0 / math.sqrt(2.0 * rho)
    )
    profile = dpc.make_zCDP_to_approxDP(measurement).map(1.0)
    try:
        return float(profile.epsilon(delta))
    except OpenDPException:  # OpenDP's conversion overflows for huge rho: use the upper bound
        return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


@lru_cache(maxsize=1024)
def epsilon_to_rho(epsilon: float, delta: float) -> float:
    """The largest rho whose (epsilon, delta) conversion stays within ``epsilon`` (bisection)."""
    epsilon, delta = checked_loss(epsilon, "epsilon"), checked_delta(delta)
    if epsilon == 0.0:
        return 0.0
    low, high = 0.0, epsilon  # rho <= epsilon always, since epsilon(rho) >= rho
    for _ in range(80):
        mid = (low + high) / 2.0
        if rho_to_epsilon(mid, delta) <= epsilon:
            low = mid
        else:
            high = mid
    return low


def pure_epsilon_to_rho(epsilon: float) -> float:
    """The zCDP cost of an epsilon-DP (pure) release: rho = epsilon^2 / 2."""
    epsilon = checked_loss(epsilon, "epsilon")
    return epsilon * epsilon / 2.0
