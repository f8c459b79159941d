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


# --- one accountant for a permit: OpenDP's zCDP releases and Opacus's RDP histories -----------
#
# A permit's releases compose as Renyi DP. A rho-zCDP release (every OpenDP Gaussian or Laplace
# release here) is (alpha, rho * alpha)-RDP at every order alpha > 1 (Bun & Steinke 2016), which
# is exactly the RDP curve of a Gaussian mechanism with noise multiplier 1 / sqrt(2 rho) at
# sampling rate 1: Opacus's ``compute_rdp`` returns alpha / (2 sigma^2) = rho * alpha for q = 1.
# So a zCDP release enters Opacus's RDP accountant history as the entry
# ``(1 / sqrt(2 rho), 1.0, 1)``, DP-SGD rounds as their ``(noise_multiplier, sample_rate,
# steps)``, the curves add per order (RDP composition), and the total converts to (epsilon,
# delta) once with Opacus's ``get_privacy_spent`` (Balle et al. 2020) over its default orders.
# Where a permit holds zCDP releases only, OpenDP's tighter zCDP -> (epsilon, delta) conversion
# (``rho_to_epsilon``) of the summed rho is used: both are valid bounds of the same releases.

#: One entry of Opacus's RDP accountant history: (noise_multiplier, sample_rate, steps).
Step = tuple[float, float, int]


def zcdp_step(rho: float) -> Step:
    """The RDP history entry of a rho-zCDP release: a Gaussian at rate 1 with RDP rho * alpha."""
    return (1.0 / math.sqrt(2.0 * rho), 1.0, 1)


def rdp_epsilon(history: list[Step] | tuple[Step, ...], delta: float) -> float:
    """Epsilon at ``delta`` of an Opacus RDP accountant history (Opacus's own conversion)."""
    return _rdp_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), delta)


@lru_cache(maxsize=4096)
def _rdp_epsilon(history: tuple[Step, ...], delta: float) -> float:
    """Cached: Opacus's RDP over its fractional orders takes a noticeable fraction of a second."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    # Opacus returns a negative epsilon at a large delta (0.9): refused, never booked as free
    return checked_loss(float(accountant.get_epsilon(delta=delta)), "RDP accountant epsilon")


def permit_epsilon(zcdp_rho: float, histories: list[list[Step]], delta: float) -> float:
    """The (epsilon, delta) loss of everything released under one permit, in one accountant.

    ``zcdp_rho``: the summed rho of the permit's zCDP (OpenDP) releases; ``histories``: the RDP
    accountant histories of its DP-SGD analyses. See the comment above for the conversion.
    """
    entries = [tuple(step) for history in histories for step in history]
    if not entries:
        return rho_to_epsilon(zcdp_rho, delta)
    if zcdp_rho > 0.0:
        entries.append(zcdp_step(zcdp_rho))
    return rdp_epsilon(entries, delta)


def permit_rho_equivalent(zcdp_rho: float, histories: list[list[Step]], delta: float) -> float:
    """The ledger's currency for a permit's loss: the rho whose zCDP conversion at ``delta``
    gives ``permit_epsilon`` (exactly ``zcdp_rho`` when the permit holds no RDP history)."""
    if not any(histories):
        return zcdp_rho
    return epsilon_to_rho(permit_epsilon(zcdp_rho, histories, delta), delta)
