"""The privacy accountant: Renyi DP of repeated Gaussian releases, converted to (epsilon, delta).

Rules of this file (normative text: spec/privacy.md, "Accountant"):

* Every release is the Gaussian mechanism with noise multiplier ``z`` (noise std divided by
  L2 sensitivity) applied to the node's whole dataset, without subsampling. Its RDP at
  order ``alpha`` is ``alpha / (2 z^2)`` (Mironov 2017, Proposition 7).
* RDP composes by addition, order by order, also under adaptive composition.
* Conversion to (epsilon, delta) uses the bound of Balle et al. 2020 (Theorem 21), as in
  Opacus' ``get_privacy_spent``::

      eps(alpha) = rdp(alpha) + log1p(-1/alpha) - (log(delta) + log(alpha)) / (alpha - 1)
      epsilon    = max(0, min over the order grid of eps(alpha))

  Every order gives a valid bound; the grid only decides how tight it is.
  :data:`DEFAULT_ORDERS` is fine enough that the grid minimum is within 1% of the minimum
  over all real ``alpha > 1`` for the parameters p2pfed meets (tests check it).

Example::

    >>> acc = RdpAccountant()
    >>> acc.add_gaussian(1.0, count=10)
    >>> eps, order = acc.epsilon(1e-5)
    >>> round(eps, 3), order
    (19.054, 2.5)
    >>> z = noise_multiplier_for(eps, releases=10, delta=1e-5)
    >>> abs(z - 1.0) < 1e-6
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "check_count",
    "check_delta",
    "check_noise_multiplier",
    "check_sampling_rate",
    "conversion_terms",
    "distributed_epsilon_for",
    "distributed_noise_multiplier_for",
    "epsilon_floor",
    "epsilon_for",
    "integer_order_gaussian_rdp",
    "noise_multiplier_for",
    "sampled_gaussian_rdp",
    "skellam_gaussian_equivalent",
    "skellam_rdp",
]


def _default_orders() -> tuple[float, ...]:
    # Each order is the binary64 value nearest to a decimal number: k/100 and k/10 are
    # correctly rounded divisions of exact integers, so any implementation gets the same
    # floats by the same rule (spec/privacy.md, "Order grid").
    orders: list[float] = [k / 100 for k in range(101, 200)]  # 1.01 .. 1.99
    orders += [k / 10 for k in range(20, 200)]  # 2.0 .. 19.9
    orders += [float(k) for k in range(20, 257)]  # 20 .. 256
    orders += [float(k) for k in range(264, 1025, 8)]  # 264 .. 1024
    orders += [float(k) for k in range(1088, 4097, 64)]  # 1088 .. 4096
    return tuple(orders)


DEFAULT_ORDERS: tuple[float, ...] = _default_orders()
"""The RDP order grid p2pfed uses (660 orders from 1.01 to 4096; spec/privacy.md)."""

_MAX_ORDERS = 100_000
# Bisection stops when the bracket is this narrow (relative); the API promises 1e-6.
_BISECTION_RELATIVE_WIDTH = 1e-10
_SAMPLED_RELATIVE_WIDTH = 1e-6
_BRACKET_LIMIT = 2.0**200


def check_noise_multiplier(noise_multiplier: float) -> float:
    if isinstance(noise_multiplier, bool) or not isinstance(
        noise_multiplier, int | float | np.floating | np.integer
    ):
        raise TypeError(
            f"noise_multiplier must be a real number, got {type(noise_multiplier).__name__}"
        )
    z = float(noise_multiplier)
    if not math.isfinite(z) or z <= 0.0:
        raise ValueError(
            f"noise_multiplier must be a finite number > 0, got {z!r}: "
            "z = 0 means no noise, which has no differential privacy guarantee"
        )
    return z


def check_count(name: str, count: int, minimum: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {type(count).__name__}")
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {count}")
    return int(count)


def check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float | np.floating):
        raise TypeError(f"delta must be a real number, got {type(delta).__name__}")
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(
            f"delta must be strictly between 0 and 1, got {d!r}; "
            "choose it well below 1/(number of nodes), e.g. 1e-5"
        )
    return d


def _check_orders(orders: Sequence[float] | np.ndarray) -> np.ndarray:
    try:
        count = len(orders)
    except TypeError:
        raise TypeError("orders must be a sequence of numbers") from None
    if count == 0:
        raise ValueError("orders must contain at least one order > 1")
    if count > _MAX_ORDERS:
        raise ValueError(f"orders has {count} entries; at most {_MAX_ORDERS} are allowed")
    vec = np.array(orders, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(vec)) or not np.all(vec > 1.0):
        raise ValueError("every RDP order must be a finite number > 1")
    return vec


def conversion_terms(orders: np.ndarray, delta: float) -> np.ndarray:
    """``log1p(-1/alpha) - (log(delta) + log(alpha)) / (alpha - 1)``: eps(alpha) minus rdp."""
    return np.log1p(-1.0 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1.0)


def check_sampling_rate(sampling_rate: float) -> float:
    if isinstance(sampling_rate, bool) or not isinstance(
        sampling_rate, int | float | np.floating | np.integer
    ):
        raise TypeError(f"sampling_rate must be a real number, got {type(sampling_rate).__name__}")
    q = float(sampling_rate)
    if not 0.0 < q <= 1.0:
        raise ValueError(
            f"sampling_rate must be in (0, 1], got {q!r}: it is the probability with which "
            "each record joins a step's batch (Poisson sampling); 1 means no subsampling"
        )
    return q


# The fractional-order series converges within a few hundred terms for the parameters
# p2pfed meets; dp_accounting gives up after 1000 terms, and so do we (the order is then
# dropped from the minimum, which only makes epsilon larger: the safe direction).
_FRAC_CHUNK = 128
_FRAC_MAX_TERMS = 1000


def _gammaln(x: float | np.ndarray) -> np.ndarray:
    # log|Gamma(x)| in float64; torch has it vectorised and is a dependency anyway, so the
    # accountant does not need scipy
    return torch.lgamma(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _log_ndtr(x: np.ndarray) -> np.ndarray:
    return torch.special.log_ndtr(torch.as_tensor(x, dtype=torch.float64)).numpy()


def _log_a_int(q: float, z: float, alpha: int) -> float:
    i = np.arange(alpha + 1, dtype=np.float64)
    log_comb = _gammaln(alpha + 1.0) - _gammaln(i + 1.0) - _gammaln(alpha - i + 1.0)
    terms = log_comb + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * z * z)
    top = float(np.max(terms))
    return top + math.log(float(np.sum(np.exp(terms - top))))


def _log_erfc(x: np.ndarray) -> np.ndarray:
    return math.log(2.0) + _log_ndtr(-x * math.sqrt(2.0))


def _log_a_frac(q: float, z: float, alpha: float) -> float:
    # Mironov, Talwar and Zhang 2019 (arXiv:1908.10530), section 3.3, evaluated as
    # dp_accounting does, including its stopping rule, so the two agree term for term.
    z0 = z * z * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    i = np.arange(_FRAC_MAX_TERMS, dtype=np.float64)
    j = alpha - i
    log_comb = _gammaln(alpha + 1.0) - _gammaln(i + 1.0) - _gammaln(j + 1.0)
    log_s0 = (
        log_comb
        + i * log_q
        + j * log_1mq
        + (i * i - i) / (2 * z * z)
        + math.log(0.5)
        + _log_erfc((i - z0) / (math.sqrt(2.0) * z))
    )
    log_s1 = (
        log_comb
        + j * log_q
        + i * log_1mq
        + (j * j - j) / (2 * z * z)
        + math.log(0.5)
        + _log_erfc((z0 - j) / (math.sqrt(2.0) * z))
    )
    total = np.logaddexp.accumulate(np.logaddexp(log_s0, log_s1))
    done = np.zeros(_FRAC_MAX_TERMS, dtype=bool)
    done[1:] = (
        (log_s0[1:] < log_s0[:-1])
        & (log_s1[1:] < log_s1[:-1])
        & (np.maximum(log_s0[1:], log_s1[1:]) < total[1:] - 30.0)
    )
    hits = np.flatnonzero(done)
    return float(total[hits[0]]) if hits.size else math.inf


def sampled_gaussian_rdp(
    noise_multiplier: float,
    sampling_rate: float,
    orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS,
) -> np.ndarray:
    """RDP at each order of one step of the Poisson-subsampled Gaussian mechanism.

    Each record joins the step's batch independently with probability ``sampling_rate``
    ``q``; the sum of the batch's (clipped) contributions gets Gaussian noise of std ``z``
    times the sensitivity. With ``q = 1`` this is ``alpha / (2 z^2)``, the plain Gaussian.
    Otherwise it is the bound of Mironov, Talwar and Zhang 2019 (integer orders: exact
    binomial sum; fractional orders: their convergent series), as in dp_accounting and
    Opacus. An order whose series does not converge is ``inf`` (dropped from the minimum).

    >>> float(sampled_gaussian_rdp(2.0, 1.0, [2.0])[0])
    0.25
    >>> round(float(sampled_gaussian_rdp(1.0, 0.01, [2.0])[0]), 8)
    0.00017181
    """
    z = check_noise_multiplier(noise_multiplier)
    q = check_sampling_rate(sampling_rate)
    vec = _check_orders(orders)
    if q == 1.0:
        return vec / (2.0 * z * z)
    out = np.empty_like(vec)
    for k, alpha in enumerate(vec.tolist()):
        if float(alpha).is_integer():
            log_a = _log_a_int(q, z, int(alpha))
        else:
            log_a = _log_a_frac(q, z, alpha)
        out[k] = log_a / (alpha - 1.0)
    return out


class RdpAccountant:
    """Accumulates the RDP of Gaussian releases over a fixed grid of orders.

    >>> acc = RdpAccountant(orders=[2.0, 4.0])
    >>> acc.add_gaussian(2.0, count=3)
    >>> acc.rdp().tolist()
    [0.75, 1.5]
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self._orders = _check_orders(orders)
        self._rdp = np.zeros_like(self._orders)
        self._releases = 0

    @property
    def orders(self) -> np.ndarray:
        """A copy of the order grid."""
        return self._orders.copy()

    @property
    def releases(self) -> int:
        """How many releases were added."""
        return self._releases

    def add_gaussian(self, noise_multiplier: float, count: int = 1) -> None:
        """Compose ``count`` releases of the Gaussian mechanism with noise multiplier ``z``.

        ``z`` is the noise standard deviation divided by the L2 sensitivity (for p2pfed's
        node-level neighbouring notion, :func:`p2pfed.dp.effective_noise_multiplier` of
        sigma). ``count`` may be 0 (no-op).
        """
        z = check_noise_multiplier(noise_multiplier)
        n = check_count("count", count, 0)
        if n == 0:
            return
        self._rdp = self._rdp + n * (self._orders / (2.0 * z * z))
        self._releases += n

    def add_sampled_gaussian(
        self, noise_multiplier: float, sampling_rate: float, count: int = 1
    ) -> None:
        """Compose ``count`` steps of the Poisson-subsampled Gaussian mechanism.

        Each step samples every record with probability ``sampling_rate`` and adds noise
        with noise multiplier ``z`` (:func:`sampled_gaussian_rdp`); DP-SGD's steps are
        these. ``sampling_rate`` 1 is :meth:`add_gaussian`.
        """
        z = check_noise_multiplier(noise_multiplier)
        q = check_sampling_rate(sampling_rate)
        n = check_count("count", count, 0)
        if n == 0:
            return
        self._rdp = self._rdp + n * sampled_gaussian_rdp(z, q, self._orders)
        self._releases += n

    def rdp(self) -> np.ndarray:
        """The accumulated RDP at each order (a copy)."""
        return self._rdp.copy()

    def epsilon(self, delta: float) -> tuple[float, float]:
        """``(epsilon, best order)`` of everything composed so far, at ``delta``.

        With no release composed the answer is ``(0.0, nan)``: nothing was released, so
        nothing was spent. Otherwise epsilon may be ``inf`` (an astronomically small
        ``z``), never negative.
        """
        d = check_delta(delta)
        if self._releases == 0:
            return 0.0, math.nan
        eps = self._rdp + conversion_terms(self._orders, d)
        best = int(np.argmin(eps))  # first minimum: deterministic tie-break
        return max(0.0, float(eps[best])), float(self._orders[best])


def epsilon_for(
    noise_multiplier: float, releases: int, delta: float, sampling_rate: float = 1.0
) -> float:
    """Epsilon after ``releases`` Gaussian releases with noise multiplier ``z``, at ``delta``.

    Uses :data:`DEFAULT_ORDERS`. ``releases`` may be 0 (epsilon 0). With ``sampling_rate``
    below 1 the releases are steps of the Poisson-subsampled Gaussian (DP-SGD).

    >>> round(epsilon_for(1.0, 10, 1e-5), 3)
    19.054
    """
    acc = RdpAccountant()
    acc.add_sampled_gaussian(noise_multiplier, sampling_rate, releases)
    return acc.epsilon(delta)[0]


def epsilon_floor(delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """The infimum of epsilon as ``z`` grows without bound, for this ``delta`` and grid.

    A target epsilon at or below this value cannot be reached with the grid, whatever the
    noise: the conversion term alone exceeds it.
    """
    terms = conversion_terms(_check_orders(orders), check_delta(delta))
    return max(0.0, float(np.min(terms)))


def _smallest_fitting(fits: Callable[[float], bool], width: float, target: float) -> float:
    """Bisection on a log scale for the smallest noise multiplier ``z`` with ``fits(z)``
    (``fits`` is monotone: more noise, less epsilon), to relative ``width``; the upper
    end, which fits, is returned."""
    hi = 1.0
    while not fits(hi):
        hi *= 2.0
        if hi > _BRACKET_LIMIT:  # pragma: no cover - excluded by the callers' floor check
            raise ValueError(f"no noise multiplier reaches epsilon {target!r}")
    lo = hi / 2.0
    while fits(lo):
        lo /= 2.0
        if lo < 1.0 / _BRACKET_LIMIT:  # pragma: no cover - epsilon grows without bound
            raise ValueError(f"target_epsilon {target!r} is too large to invert")
    while hi - lo > width * hi:
        mid = math.sqrt(lo * hi)
        if mid <= lo or mid >= hi:  # pragma: no cover - floats exhausted
            break
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def noise_multiplier_for(
    target_epsilon: float, releases: int, delta: float, sampling_rate: float = 1.0
) -> float:
    """The smallest noise multiplier ``z`` whose ``releases`` releases spend ``target_epsilon``.

    ``sampling_rate`` below 1: the releases are Poisson-subsampled Gaussian steps (DP-SGD);
    the bisection then stops at 1e-6 relative (each evaluation costs ~50 ms), again
    returning the upper end.

    Found by bisection on ``log z`` (epsilon strictly decreases as ``z`` grows) until the
    bracket is narrower than 1e-10 relative; the upper end is returned, so
    ``epsilon_for(z, releases, delta) <= target_epsilon`` always holds and ``z`` is within
    1e-6 relative of the exact answer. Raises ``ValueError`` if the target is not above
    :func:`epsilon_floor` (no amount of noise reaches it with this grid).

    >>> z = noise_multiplier_for(1.0, releases=1, delta=1e-5)
    >>> epsilon_for(z, 1, 1e-5) <= 1.0, round(z, 4)
    (True, 4.0451)
    """
    if isinstance(target_epsilon, bool) or not isinstance(
        target_epsilon, int | float | np.floating | np.integer
    ):
        raise TypeError(f"target_epsilon must be a real number, got {type(target_epsilon)}")
    target = float(target_epsilon)
    if not math.isfinite(target) or target <= 0.0:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target!r}")
    n = check_count("releases", releases, 1)
    d = check_delta(delta)
    q = check_sampling_rate(sampling_rate)
    width = _BISECTION_RELATIVE_WIDTH if q == 1.0 else _SAMPLED_RELATIVE_WIDTH
    floor = epsilon_floor(d)
    if target <= floor:
        raise ValueError(
            f"target_epsilon {target!r} is not above {floor:.6g}, the smallest epsilon "
            f"reachable at delta={d!r} with the order grid; raise the target or delta"
        )

    def fits(z: float) -> bool:
        return epsilon_for(z, n, d, q) <= target

    return _smallest_fitting(fits, width, target)


# -- the Skellam mechanism (distributed DP, spec/privacy.md section 2B) ------------------


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return v


def skellam_rdp(
    variance: float,
    l1_sensitivity: float,
    l2_sensitivity: float,
    orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS,
) -> np.ndarray:
    """RDP bound at each order of the Skellam mechanism with noise variance ``variance``.

    The noise on every coordinate is ``Poisson(mu/2) - Poisson(mu/2)`` (variance ``mu``),
    the query integer-valued with L1 and L2 sensitivities ``Delta1``, ``Delta2`` (in the
    same integer units). Agarwal, Kairouz and Liu 2021 ("The Skellam Mechanism for
    Differentially Private Federated Learning", Theorem 3.5 / Corollary 3.6) bound it at
    integer orders ``alpha > 1`` by::

        alpha Delta2^2 / (2 mu)
          + min(((2 alpha - 1) Delta2^2 + 6 Delta1) / (4 mu^2), 3 Delta1 / (2 mu))

    A fractional order takes the bound of the next integer order: Renyi divergence does not
    decrease with the order (van Erven and Harremoes 2014, Theorem 3), so that is valid.

    >>> [round(float(v), 6) for v in skellam_rdp(100.0, 1.0, 1.0, [2.0, 2.5])]
    [0.010225, 0.015275]
    """
    mu = _check_positive("variance", variance)
    d1 = _check_positive("l1_sensitivity", l1_sensitivity)
    d2 = _check_positive("l2_sensitivity", l2_sensitivity)
    alpha = np.ceil(_check_orders(orders))
    lead = alpha * d2 * d2 / (2.0 * mu)
    extra = np.minimum(
        ((2.0 * alpha - 1.0) * d2 * d2 + 6.0 * d1) / (4.0 * mu * mu), 3.0 * d1 / (2.0 * mu)
    )
    return lead + extra


def integer_order_gaussian_rdp(
    noise_multiplier: float, orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS
) -> np.ndarray:
    """``ceil(alpha) / (2 z^2)``: the RDP the ledger charges for a Skellam release whose
    Gaussian-equivalent noise multiplier is ``z`` (:func:`skellam_gaussian_equivalent`).

    >>> integer_order_gaussian_rdp(1.0, [2.0, 2.5]).tolist()
    [1.0, 1.5]
    """
    z = check_noise_multiplier(noise_multiplier)
    return np.ceil(_check_orders(orders)) / (2.0 * z * z)


def skellam_gaussian_equivalent(
    variance: float, l1_sensitivity: float, l2_sensitivity: float
) -> float:
    """The largest ``z`` with ``skellam_rdp <= ceil(alpha) / (2 z^2)`` at every order.

    At an integer order ``alpha >= 2``: ``(2 alpha - 1) Delta2^2 / (4 mu^2) <= alpha
    Delta2^2 / (2 mu^2)`` and ``6 Delta1 / (4 mu^2) <= alpha 3 Delta1 / (2 mu^2)``, so the
    bound is at most ``alpha / (2 z^2)`` with::

        1 / z^2 = Delta2^2 / mu + Delta2^2 / mu^2 + 3 Delta1 / mu^2

    Only the first term remains as ``mu`` grows: ``z`` tends to ``sqrt(mu) / Delta2``, the
    noise multiplier of the Gaussian with the same variance.

    >>> round(skellam_gaussian_equivalent(1e12, 1e3, 1e3), 6)
    1000.0
    """
    mu = _check_positive("variance", variance)
    d1 = _check_positive("l1_sensitivity", l1_sensitivity)
    d2 = _check_positive("l2_sensitivity", l2_sensitivity)
    inverse = d2 * d2 / mu + d2 * d2 / (mu * mu) + 3.0 * d1 / (mu * mu)
    return 1.0 / math.sqrt(inverse)


def distributed_epsilon_for(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` distributed releases whose Gaussian-equivalent noise
    multiplier is ``z`` (charged at integer orders, :func:`integer_order_gaussian_rdp`).

    >>> round(distributed_epsilon_for(1.0, 10, 1e-5), 3)
    19.802
    """
    n = check_count("releases", releases, 0)
    d = check_delta(delta)
    if n == 0:
        return 0.0
    orders = np.array(DEFAULT_ORDERS)
    eps = n * integer_order_gaussian_rdp(noise_multiplier, orders) + conversion_terms(orders, d)
    return max(0.0, float(np.min(eps)))


def distributed_noise_multiplier_for(target_epsilon: float, releases: int, delta: float) -> float:
    """The smallest ``z`` whose ``releases`` distributed releases spend ``target_epsilon``
    (bisection as in :func:`noise_multiplier_for`; the upper end is returned)."""
    target = _check_positive("target_epsilon", target_epsilon)
    n = check_count("releases", releases, 1)
    d = check_delta(delta)
    floor = epsilon_floor(d)
    if target <= floor:
        raise ValueError(
            f"target_epsilon {target!r} is not above {floor:.6g}, the smallest epsilon "
            f"reachable at delta={d!r} with the order grid; raise the target or delta"
        )

    def fits(z: float) -> bool:
        return distributed_epsilon_for(z, n, d) <= target

    return _smallest_fitting(fits, _BISECTION_RELATIVE_WIDTH, target)
