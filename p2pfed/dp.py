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

import numpy as np

__all__ = [
    "SEED_BYTES",
    "clip_and_noise",
    "clip_update",
    "effective_noise_multiplier",
    "l2_norm",
    "noise_generator",
]

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
