"""Distributed differential privacy under secure aggregation: Skellam noise shares in the ring.

Rules of this file (normative text: spec/privacy.md, section 2B):

* A member clips its update ``u`` to L2 norm ``C``, scales it onto the integer lattice of
  step ``2**-b`` (:attr:`DistributedDP.lattice_bits`), rounds each coordinate
  stochastically (up with probability equal to the fraction) and adds a *Skellam share*,
  ``Poisson(v/2) - Poisson(v/2)`` per coordinate with ``v = (sigma * C * 2**b)**2 /
  group_min``. Independent Skellam variables add up to a Skellam variable, so the
  integer sum of the shares of any ``k >= group_min`` members carries exactly Skellam
  noise of variance ``k v >= (sigma * C * 2**b)**2``, the noise of the central
  mechanism.
* The noisy lattice vector, times ``2**(scale_bits - b)``, is added in the ring to the
  fixed-point encoding of the round start model (clipped to ``+-model_bound``, so that
  noise cannot take an honest group sum out of the range the group protocol accepts).
  The weight word is 1. The result is handed to the group as its contribution
  (``GroupProtocol.set_contribution(..., carried=words)``).
* Two guarantees: against anyone who sees only group sums, the Skellam mechanism with
  variance ``(sigma * C * 2**b)**2`` (central); against members who strip the masks (one
  share alone), variance ``v`` (local). :attr:`DistributedDP.central_noise_multiplier`
  and :attr:`DistributedDP.local_noise_multiplier` are Gaussian-equivalent noise
  multipliers that bound the Skellam RDP at every integer order (accountant.py).
* Randomness only from the ``numpy.random.Generator`` passed in.

Example::

    >>> import numpy as np
    >>> from p2pfed.fixedpoint import FixedPointParams
    >>> fp = FixedPointParams.for_federation(64, 128.0, 8)
    >>> ddp = DistributedDP(clip_norm=1.0, noise_multiplier=4.0, group_min=3,
    ...                     model_size=4, fixed_point=fp)
    >>> ddp.lattice_bits, round(ddp.model_bound, 3)
    (11, 111.0)
    >>> words, model = ddp.encode_release(np.zeros(4, np.float32), np.ones(4, np.float32),
    ...                                   np.random.default_rng(0))
    >>> words.shape, int(words[-1]), model.dtype
    ((5,), 1, dtype('float32'))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from p2pfed.accountant import skellam_gaussian_equivalent
from p2pfed.dp import clip_update
from p2pfed.errors import ConfigError
from p2pfed.fixedpoint import FixedPointParams, encode

if TYPE_CHECKING:
    from p2pfed.federation import ProtocolParams

__all__ = [
    "SLACK",
    "TAIL_SIGMAS",
    "DistributedDP",
    "check_headroom",
    "nominal_noise_multipliers",
    "required_clip",
    "skellam_share",
    "stochastic_round",
]

SLACK = 2.0**-8
"""eta: the lattice is fine enough that rounding and discreteness cost at most a factor
``1 + eta`` in the noise multiplier; the ledger charges ``sigma / (2 (1 + eta))``."""
TAIL_SIGMAS = 12
"""Headroom in the ring for this many standard deviations of a group's summed noise."""
MIN_LOCAL_VARIANCE = 2.0**16
"""Smallest share variance (lattice units): the discreteness terms stay below ``eta / 8``."""
_MAX_POISSON_MEAN = 2.0**60  # numpy's sampler refuses means near 2**63


def nominal_noise_multipliers(noise_multiplier: float, group_min: int) -> tuple[float, float]:
    """``(central, local)`` noise multipliers the ledger charges for one distributed release.

    ``central = sigma / (2 (1 + eta))`` (replacement of a node's dataset moves the clipped
    update by up to 2C; the sum of at least ``group_min`` shares has std ``sigma C``);
    ``local = central / sqrt(group_min)`` (one share alone has std ``sigma C /
    sqrt(group_min)``). :class:`DistributedDP` checks that its exact Gaussian-equivalent
    values are at least these.

    >>> [round(z, 6) for z in nominal_noise_multipliers(4.0, 4)]
    [1.992218, 0.996109]
    """
    central = float(noise_multiplier) / (2.0 * (1.0 + SLACK))
    return central, central / math.sqrt(group_min)


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round float64 ``values`` to int64, up with probability equal to the fraction.

    One ``rng.random()`` double per coordinate, in order. ``E[result] = values`` and every
    coordinate moves by less than 1.
    """
    low = np.floor(values)
    up = rng.random(values.shape[0]) < (values - low)
    return low.astype(np.int64) + up


def skellam_share(variance: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` independent ``Poisson(variance/2) - Poisson(variance/2)`` draws (int64).

    The first ``size`` Poisson draws are the minuends, the next ``size`` the subtrahends.
    Variance ``variance``; a sum of such shares is again Skellam, with the summed variance.
    """
    lam = variance / 2.0
    if not 0.0 < lam <= _MAX_POISSON_MEAN:
        raise ValueError(f"Skellam variance must be in (0, 2^61], got {variance!r}")
    plus = rng.poisson(lam, size)
    minus = rng.poisson(lam, size)
    return plus - minus


@dataclass(frozen=True)
class DistributedDP:
    """The distributed-DP parameters of one federation and model size, checked for headroom.

    ``noise_multiplier`` is the federation's ``dp_noise_multiplier`` sigma: the sum of any
    ``group_min`` members' shares has standard deviation ``sigma * C`` per coordinate.
    Construction raises :class:`~p2pfed.errors.ConfigError` when the ring cannot hold the
    noise (``clip`` too small for it, the lattice finer than the ring's resolution, a noise
    variance numpy cannot sample), with what to change.
    """

    clip_norm: float
    noise_multiplier: float
    group_min: int
    model_size: int
    fixed_point: FixedPointParams

    def __post_init__(self) -> None:
        fp = self.fixed_point
        if self.lattice_bits > fp.scale_bits:
            raise ConfigError(
                f"distributed DP needs a lattice of step 2^-{self.lattice_bits} for a model of "
                f"{self.model_size} parameters with dp_clip_norm {self.clip_norm:g}, finer than "
                f"the ring's resolution 2^-{fp.scale_bits} (use fixed_point_bits = 64, a "
                "smaller clip or group_max, or a larger dp_clip_norm)"
            )
        if self.share_variance / 2.0 > _MAX_POISSON_MEAN:
            raise ConfigError(
                f"distributed DP noise is too large to sample (share variance "
                f"{self.share_variance:.3g} lattice units; lower dp_noise_multiplier)"
            )
        if self.model_bound < fp.clip / 2.0:
            needed = 2.0 * (fp.clip - self.model_bound)
            raise ConfigError(
                f"the ring has no headroom for distributed DP noise: with clip {fp.clip:g}, "
                f"dp_clip_norm {self.clip_norm:g}, dp_noise_multiplier "
                f"{self.noise_multiplier:g} and group_min {self.group_min}, model values "
                f"would have to be clipped to +-{self.model_bound:.4g} (set clip to at least "
                f"{_next_power_of_two(needed):g} in the federation's [params])"
            )
        central, local = nominal_noise_multipliers(self.noise_multiplier, self.group_min)
        if self.central_noise_multiplier < central or self.local_noise_multiplier < local:
            raise AssertionError("the lattice rule missed its slack; this is a bug")

    @cached_property
    def lattice_bits(self) -> int:
        """``b``: the smallest ``b >= 0`` with ``sqrt(d) <= (eta / 4) C 2^b`` and share
        variance ``(sigma C 2^b)^2 / group_min >= MIN_LOCAL_VARIANCE``."""
        b = 0
        root_d = math.sqrt(self.model_size)
        while (
            root_d > SLACK / 4.0 * self.clip_norm * 2.0**b
            or (self.noise_multiplier * self.clip_norm * 2.0**b) ** 2 / self.group_min
            < MIN_LOCAL_VARIANCE
        ):
            b += 1
            if b > 200:
                raise ConfigError("dp_clip_norm is too small for distributed DP")
        return b

    @property
    def share_variance(self) -> float:
        """Variance of one member's Skellam share per coordinate, in lattice units."""
        return (self.noise_multiplier * self.clip_norm * 2.0**self.lattice_bits) ** 2 / (
            self.group_min
        )

    @property
    def central_variance(self) -> float:
        """Variance of the noise in a sum of ``group_min`` shares (lattice units)."""
        return self.share_variance * self.group_min

    @property
    def l2_sensitivity(self) -> float:
        """``2 (C 2^b + sqrt(d))``: replacing the dataset moves the rounded update this far."""
        return 2.0 * (self.clip_norm * 2.0**self.lattice_bits + math.sqrt(self.model_size))

    @property
    def l1_sensitivity(self) -> float:
        """``min(sqrt(d) Delta2, Delta2^2)`` (integer vectors: ``|x|_1 <= |x|_2^2``)."""
        d2 = self.l2_sensitivity
        return min(math.sqrt(self.model_size) * d2, d2 * d2)

    @property
    def central_noise_multiplier(self) -> float:
        """Gaussian-equivalent ``z`` of a group sum (at least ``group_min`` shares)."""
        return skellam_gaussian_equivalent(
            self.central_variance, self.l1_sensitivity, self.l2_sensitivity
        )

    @property
    def local_noise_multiplier(self) -> float:
        """Gaussian-equivalent ``z`` of one share alone (members who strip the masks)."""
        return skellam_gaussian_equivalent(
            self.share_variance, self.l1_sensitivity, self.l2_sensitivity
        )

    @property
    def model_bound(self) -> float:
        """The round start model is clipped to ``+-model_bound`` before encoding:
        ``clip - C - 2^-b - 2^-scale_bits - TAIL_SIGMAS sigma C / group_min``, so an honest
        group of ``k >= group_min`` members stays within ``k clip`` unless its summed noise
        exceeds ``TAIL_SIGMAS`` standard deviations."""
        fp = self.fixed_point
        tail = TAIL_SIGMAS * self.noise_multiplier * self.clip_norm / self.group_min
        return fp.clip - self.clip_norm - 2.0**-self.lattice_bits - 2.0**-fp.scale_bits - tail

    def encode_release(
        self, start: np.ndarray, update: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ring words this member contributes, and the float32 model they decode to.

        ``start`` and ``update`` are float32 vectors of ``model_size`` values. Draws, in
        order from ``rng``: the start model's fixed-point rounding, the update's lattice
        rounding, then the Skellam share. The words are ``model_size + 1`` ring words, the
        last one the weight 1.
        """
        fp = self.fixed_point
        d = self.model_size
        if start.shape != (d,) or update.shape != (d,):
            raise ValueError(f"start and update must be vectors of {d} values")
        bound = np.float32(self.model_bound)
        if float(bound) > self.model_bound:
            bound = np.nextafter(bound, np.float32(0))
        base = encode(np.clip(start.astype(np.float32), -bound, bound), fp, rng)
        clipped, _ = clip_update(update.astype(np.float32), self.clip_norm)
        lattice = stochastic_round(clipped.astype(np.float64) * 2.0**self.lattice_bits, rng)
        lattice += skellam_share(self.share_variance, d, rng)
        shift = fp.scale_bits - self.lattice_bits
        words = np.empty(d + 1, fp.dtype)
        # int64 -> ring dtype wraps modulo 2**bits, as the ring addition needs
        np.add(base, (lattice << shift).astype(fp.dtype), out=words[:-1])
        words[-1] = 1
        model = np.divide(
            words[:-1].view(fp.signed_dtype), float(fp.scale), dtype=np.float64
        ).astype(np.float32)
        return words, model


def _next_power_of_two(value: float) -> float:
    return 2.0 ** math.ceil(math.log2(value))


def required_clip(clip_norm: float, noise_multiplier: float, group_min: int) -> float:
    """The smallest power of two, at least 8, that is a ``clip`` with enough headroom
    (:attr:`DistributedDP.model_bound` at least ``clip / 2``) for any model size.

    >>> required_clip(1.0, 12.82, 3)
    128.0
    """
    tail = TAIL_SIGMAS * noise_multiplier * clip_norm / group_min
    return max(8.0, _next_power_of_two(2.0 * (clip_norm + tail + 1.0)))


def check_headroom(params: ProtocolParams) -> None:
    """Refuse (``ConfigError``) distributed-DP parameters without ring headroom for the
    noise, whatever the model size (the lattice term at its largest, ``2^0``)."""
    fp = FixedPointParams.for_federation(params.fixed_point_bits, params.clip, params.group_max)
    tail = TAIL_SIGMAS * params.dp_noise_multiplier * params.dp_clip_norm / params.group_min
    bound = fp.clip - params.dp_clip_norm - 1.0 - 2.0**-fp.scale_bits - tail
    if bound < fp.clip / 2.0:
        needed = required_clip(params.dp_clip_norm, params.dp_noise_multiplier, params.group_min)
        raise ConfigError(
            f"the ring has no headroom for distributed DP noise: with clip {fp.clip:g}, "
            f"dp_clip_norm {params.dp_clip_norm:g}, dp_noise_multiplier "
            f"{params.dp_noise_multiplier:g} and group_min {params.group_min}, a group's "
            f"noise could exceed the range of the fixed-point encoding (set clip = "
            f"{needed:g} in the federation's [params], or raise group_min)"
        )
