"""Local differential privacy: the Gaussian mechanism applied to a node's model update.

Rules of this file (normative text: spec/privacy.md, "Mechanism"):

* The update is ``trained - start`` as float32. It is scaled down so that its L2 norm,
  computed in float64, is at most the clip norm ``C``; the float32 result is checked again
  so that rounding can never push it above ``C``.
* Independent Gaussian noise ``N(0, (sigma * C)^2)`` is added to every coordinate, the sum
  is computed in float64 and rounded once to float32.
* Neighbouring inputs differ in the *entire* local dataset of one node (node-level
  replacement). Both clipped updates lie in the ball of radius ``C``, so the L2
  sensitivity is ``2C`` and the noise multiplier the accountant must use is
  ``z = sigma * C / (2C) = sigma / 2`` (:func:`effective_noise_multiplier`).
* Randomness is injected: noise comes from a :class:`numpy.random.Generator` the caller
  passes in; :func:`noise_generator` builds one from 32 bytes of ``os.urandom`` (or any
  injected ``randbytes``). Nothing here touches global random state.

Example::

    >>> import numpy as np
    >>> rng = noise_generator(lambda n: bytes(n))        # fixed seed, for the example only
    >>> update = np.full(4, 3.0, dtype=np.float32)        # norm 6
    >>> clipped, norm = clip_update(update, clip_norm=1.0)
    >>> round(norm, 6), float(np.linalg.norm(clipped.astype(np.float64))) <= 1.0
    (6.0, True)
    >>> noisy = clip_and_noise(update, clip_norm=1.0, noise_multiplier=1.1, rng=rng)
    >>> noisy.dtype, noisy.shape
    (dtype('float32'), (4,))
    >>> effective_noise_multiplier(1.1)
    0.55
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from p2pfed.errors import ConfigError

if TYPE_CHECKING:
    from p2pfed.federation import ProtocolParams

__all__ = [
    "DP_MODES",
    "SEED_BYTES",
    "ReleaseCost",
    "calibrate",
    "check_budget",
    "clip_and_noise",
    "clip_update",
    "effective_noise_multiplier",
    "l2_norm",
    "noise_generator",
    "release_cost",
]

DP_MODES = ("off", "record", "node", "distributed")
"""``p2pfed federation new --dp``: no DP, record-level DP-SGD, node-level update noise,
node-level noise shared out among the members of a secure-aggregation group."""

SEED_BYTES = 32
"""Bytes of fresh entropy that seed one noise generator (256 bits)."""

# Each retry shrinks the scale factor by 2^-22 relative, four times float32's half-ulp
# (2^-24), so one retry suffices for any rounding the float32 cast can introduce; the
# bound only guards against a logic error looping forever.
_SHRINK = 1.0 - 2.0**-22
_MAX_SHRINK_STEPS = 64


def _check_positive_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_update(update: np.ndarray) -> None:
    if not isinstance(update, np.ndarray):
        raise TypeError(f"update must be a numpy array, got {type(update).__name__}")
    if update.dtype != np.float32:
        raise TypeError(
            f"update must be a float32 array, got dtype {update.dtype}; "
            "convert it with update.astype(np.float32)"
        )
    if not np.all(np.isfinite(update)):
        raise ValueError(
            "update contains NaN or infinite values; training diverged, "
            "do not release this update (lower the learning rate or restart from the model)"
        )


def l2_norm(update: np.ndarray) -> float:
    """The L2 norm of ``update``, accumulated in float64 (the norm the clip bound refers to)."""
    flat = np.asarray(update).reshape(-1).astype(np.float64)
    return float(math.sqrt(float(np.dot(flat, flat))))


def clip_update(update: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``update`` to L2 norm at most ``clip_norm``; return it and the norm before clipping.

    The returned array is a new float32 array of the same shape whose float64 L2 norm is
    ``<= clip_norm`` exactly (not just up to rounding). An update already inside the ball
    is returned unchanged (as a copy). The second value is the original norm, for logs: a
    norm often far above ``clip_norm`` means the clip norm or the learning rate is badly
    chosen and most of the signal is being cut.

    Raises ``TypeError`` for a non-float32 array, ``ValueError`` for NaN/inf values or a
    ``clip_norm`` that is not a finite number > 0.
    """
    _check_update(update)
    bound = _check_positive_finite("clip_norm", clip_norm)
    norm = l2_norm(update)
    if norm <= bound:
        return update.copy(), norm
    wide = update.astype(np.float64)
    factor = bound / norm
    for _ in range(_MAX_SHRINK_STEPS):
        clipped = (wide * factor).astype(np.float32)
        if l2_norm(clipped) <= bound:
            return clipped, norm
        factor *= _SHRINK  # float32 rounding pushed the norm just above the bound
    raise AssertionError("clip_update failed to reach the bound; this is a bug")  # pragma: no cover


def clip_and_noise(
    update: np.ndarray,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Clip ``update`` to L2 norm ``clip_norm`` and add Gaussian noise of std ``sigma * C``.

    ``noise_multiplier`` is sigma, the ratio of the noise standard deviation to the clip
    norm; the accountant needs :func:`effective_noise_multiplier` of it. ``rng`` supplies
    the noise; in production pass :func:`noise_generator` ``()``. Returns a new float32
    array of the same shape; ``update`` is not modified.

    Only the returned value may leave the node, and only after the privacy ledger has
    recorded the release (spec/privacy.md, "Budget and ledger").
    """
    sigma = _check_positive_finite("noise_multiplier", noise_multiplier)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (use dp.noise_generator()), "
            f"got {type(rng).__name__}"
        )
    clipped, _ = clip_update(update, clip_norm)
    std = sigma * float(clip_norm)
    noise = rng.standard_normal(size=clipped.shape, dtype=np.float64)
    noise *= std
    noise += clipped
    return noise.astype(np.float32)


def effective_noise_multiplier(sigma: float, sensitivity_factor: float = 2.0) -> float:
    """The noise multiplier ``z`` the accountant uses: noise std divided by L2 sensitivity.

    With noise std ``sigma * C`` and sensitivity ``sensitivity_factor * C``, ``z = sigma /
    sensitivity_factor``. The default 2.0 is p2pfed's neighbouring notion (replacing one
    node's whole dataset: two updates in the ball of radius C can be 2C apart); 1.0 would
    be the add/remove notion, which p2pfed does not use.

    >>> effective_noise_multiplier(2.0)
    1.0
    """
    s = _check_positive_finite("sigma", sigma)
    factor = _check_positive_finite("sensitivity_factor", sensitivity_factor)
    return s / factor


def noise_generator(randbytes: Callable[[int], bytes] = os.urandom) -> np.random.Generator:
    """A noise generator seeded with ``SEED_BYTES`` bytes from ``randbytes``.

    The 256-bit seed is expanded by :class:`numpy.random.SeedSequence` into the key of a
    Philox4x64-10 counter-based generator. Philox is not a proven cryptographic generator
    and numpy's Gaussian sampler works in floating point; spec/privacy.md ("Security
    considerations") explains the consequences and what a stronger implementation does.

    >>> g1 = noise_generator(lambda n: b"\\x01" * n)
    >>> g2 = noise_generator(lambda n: b"\\x01" * n)
    >>> bool(g1.standard_normal() == g2.standard_normal())
    True
    """
    seed = randbytes(SEED_BYTES)
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        got = len(seed) if isinstance(seed, bytes | bytearray) else type(seed).__name__
        raise ValueError(f"randbytes({SEED_BYTES}) must return {SEED_BYTES} bytes, got {got}")
    entropy = int.from_bytes(bytes(seed), "little")
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(entropy)))


@dataclass(frozen=True)
class ReleaseCost:
    """What one release of a federation's DP mechanism costs the ledger.

    ``noise_multiplier`` is the accounting ``z``; the release is ``steps`` steps of the
    Gaussian mechanism subsampled at ``sampling_rate`` (1 and 1 at node level). A
    distributed release (Skellam shares, :mod:`p2pfed.skellam`) also has
    ``local_noise_multiplier``: ``noise_multiplier`` is then its central Gaussian-equivalent
    ``z`` and both are charged at integer orders.
    """

    noise_multiplier: float
    sampling_rate: float = 1.0
    steps: int = 1
    local_noise_multiplier: float | None = None

    def epsilon(self, releases: int, delta: float, *, local: bool = False) -> float:
        """Epsilon of ``releases`` such releases at ``delta`` (``local``: against members
        who strip the masks; the same as central unless the release is distributed)."""
        from p2pfed.accountant import distributed_epsilon_for, epsilon_for

        if self.local_noise_multiplier is None:
            return epsilon_for(
                self.noise_multiplier, releases * self.steps, delta, self.sampling_rate
            )
        z = self.local_noise_multiplier if local else self.noise_multiplier
        return distributed_epsilon_for(z, releases, delta)


def release_cost(params: ProtocolParams) -> ReleaseCost:
    """The cost of one release under ``params`` (which must have DP enabled).

    Node level: one Gaussian release with ``z = sigma / 2`` (replacement of a whole
    dataset). Record level: ``dp_steps`` DP-SGD steps sampled at ``dp_sample_rate`` with
    ``z = sigma`` (add/remove one record: the clipped sum moves by at most C). Distributed:
    the nominal central and local multipliers of :func:`p2pfed.skellam.nominal_noise_multipliers`.
    """
    if params.dp_level == "record":
        return ReleaseCost(params.dp_noise_multiplier, params.dp_sample_rate, params.dp_steps)
    if params.dp_level == "distributed":
        from p2pfed.skellam import nominal_noise_multipliers

        central, local = nominal_noise_multipliers(params.dp_noise_multiplier, params.group_min)
        return ReleaseCost(central, local_noise_multiplier=local)
    return ReleaseCost(effective_noise_multiplier(params.dp_noise_multiplier))


def _round_up(value: float, digits: int = 4) -> float:
    # a federation file is read by people: 4 significant digits, rounded towards more noise
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def calibrate(
    level: str,
    *,
    epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float = 1.0,
    steps: int = 1,
) -> float:
    """The noise multiplier sigma (a federation's ``dp_noise_multiplier``) with which
    ``rounds`` releases at ``level`` ("node", "record" or "distributed") spend at most
    ``epsilon`` (the central epsilon, for "distributed").

    Bisection on the RDP accountant (:func:`p2pfed.accountant.noise_multiplier_for`),
    rounded up to 4 significant digits, so the budget always holds. Raises
    ``ConfigError`` when no noise reaches ``epsilon``.

    >>> calibrate("node", epsilon=8.0, delta=1e-5, rounds=100)
    12.76
    >>> calibrate("distributed", epsilon=8.0, delta=1e-5, rounds=100)
    12.82
    """
    from p2pfed.accountant import (
        distributed_epsilon_for,
        distributed_noise_multiplier_for,
        epsilon_for,
        noise_multiplier_for,
    )

    if level not in ("node", "record", "distributed"):
        raise ConfigError(f'DP level must be "node", "record" or "distributed", got {level!r}')
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"the expected number of rounds must be an integer >= 1, got {rounds!r}")
    if level == "distributed":
        from p2pfed.skellam import SLACK

        try:
            z = distributed_noise_multiplier_for(epsilon, rounds, delta)
        except ValueError as exc:
            raise ConfigError(f"cannot calibrate the noise: {exc}") from None
        sigma = _round_up(2.0 * (1.0 + SLACK) * z)
        z_used = sigma / (2.0 * (1.0 + SLACK))
        if distributed_epsilon_for(z_used, rounds, delta) > epsilon:  # pragma: no cover
            raise AssertionError("calibrated noise exceeds the target; this is a bug")
        return sigma
    q = sampling_rate if level == "record" else 1.0
    n = rounds * steps if level == "record" else rounds
    try:
        z = noise_multiplier_for(epsilon, n, delta, q)
    except ValueError as exc:
        raise ConfigError(f"cannot calibrate the noise: {exc}") from None
    sigma = _round_up(z if level == "record" else 2.0 * z)
    z_used = sigma if level == "record" else sigma / 2.0
    if epsilon_for(z_used, n, delta, q) > epsilon:  # pragma: no cover - rounding is upwards
        raise AssertionError("calibrated noise exceeds the target; this is a bug")
    return sigma


def check_budget(params: ProtocolParams, source: str = "the federation") -> None:
    """Refuse (``ConfigError``) DP parameters whose first release already exceeds the budget:
    such a federation would never train (every node would stop before its first round)."""
    if not params.dp_enabled:
        return
    if params.dp_level == "distributed":
        from p2pfed.skellam import check_headroom

        try:
            check_headroom(params)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    cost = release_cost(params)
    one = cost.epsilon(1, params.dp_delta)
    if one > params.dp_epsilon_budget:
        raise ConfigError(
            f"{source}: one round of {params.dp_level}-level DP costs epsilon {one:.4g}, more "
            f"than the whole budget dp_epsilon_budget = {params.dp_epsilon_budget:g}, so no "
            "node could ever train (create the federation again with `p2pfed federation new "
            "--epsilon E --rounds R`, which calibrates dp_noise_multiplier to the budget)"
        )
