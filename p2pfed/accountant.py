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
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "epsilon_floor",
    "epsilon_for",
    "noise_multiplier_for",
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
_BRACKET_LIMIT = 2.0**200


def _check_noise_multiplier(noise_multiplier: float) -> float:
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


def _check_count(name: str, count: int, minimum: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {type(count).__name__}")
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {count}")
    return int(count)


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float | np.floating):
        raise TypeError(f"delta must be a real number, got {type(delta).__name__}")
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(
            f"delta must be strictly between 0 and 1, got {d!r}; "
            "choose it well below 1/(number of nodes), e.g. 1e-5"
        )
    return d


def _check_orders(orders: Sequence[float]) -> np.ndarray:
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


def _conversion_terms(orders: np.ndarray, delta: float) -> np.ndarray:
    """``log1p(-1/alpha) - (log(delta) + log(alpha)) / (alpha - 1)``: eps(alpha) minus rdp."""
    return np.log1p(-1.0 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1.0)


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
        z = _check_noise_multiplier(noise_multiplier)
        n = _check_count("count", count, 0)
        if n == 0:
            return
        self._rdp = self._rdp + n * (self._orders / (2.0 * z * z))
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
        d = _check_delta(delta)
        if self._releases == 0:
            return 0.0, math.nan
        eps = self._rdp + _conversion_terms(self._orders, d)
        best = int(np.argmin(eps))  # first minimum: deterministic tie-break
        return max(0.0, float(eps[best])), float(self._orders[best])


def epsilon_for(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon after ``releases`` Gaussian releases with noise multiplier ``z``, at ``delta``.

    Uses :data:`DEFAULT_ORDERS`. ``releases`` may be 0 (epsilon 0).

    >>> round(epsilon_for(1.0, 10, 1e-5), 3)
    19.054
    """
    acc = RdpAccountant()
    acc.add_gaussian(noise_multiplier, releases)
    return acc.epsilon(delta)[0]


def epsilon_floor(delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """The infimum of epsilon as ``z`` grows without bound, for this ``delta`` and grid.

    A target epsilon at or below this value cannot be reached with the grid, whatever the
    noise: the conversion term alone exceeds it.
    """
    terms = _conversion_terms(_check_orders(orders), _check_delta(delta))
    return max(0.0, float(np.min(terms)))


def noise_multiplier_for(target_epsilon: float, releases: int, delta: float) -> float:
    """The smallest noise multiplier ``z`` whose ``releases`` releases spend ``target_epsilon``.

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
    n = _check_count("releases", releases, 1)
    d = _check_delta(delta)
    floor = epsilon_floor(d)
    if target <= floor:
        raise ValueError(
            f"target_epsilon {target!r} is not above {floor:.6g}, the smallest epsilon "
            f"reachable at delta={d!r} with the order grid; raise the target or delta"
        )

    def fits(z: float) -> bool:
        return epsilon_for(z, n, d) <= target

    hi = 1.0
    while not fits(hi):
        hi *= 2.0
        if hi > _BRACKET_LIMIT:  # pragma: no cover - excluded by the floor check above
            raise ValueError(f"no noise multiplier reaches epsilon {target!r}")
    lo = hi / 2.0
    while fits(lo):
        lo /= 2.0
        if lo < 1.0 / _BRACKET_LIMIT:  # pragma: no cover - epsilon grows without bound
            raise ValueError(f"target_epsilon {target!r} is too large to invert")
    while hi - lo > _BISECTION_RELATIVE_WIDTH * hi:
        mid = math.sqrt(lo * hi)
        if mid <= lo or mid >= hi:  # pragma: no cover - floats exhausted
            break
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi
