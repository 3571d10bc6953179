"""Fixed-point encoding of float vectors in the ring Z/2^bits, and weighted contributions.

This is the arithmetic half of secure aggregation (spec/secure-aggregation.md, sections
"Fixed-point encoding" and "Contribution layout"); the masks are in :mod:`p2pfed.masking`.
Everything here is pure: no I/O, no clock, and randomness only from the
``numpy.random.Generator`` the caller passes in.

A float ``x`` is clipped to ``[-clip, clip]``, multiplied by the member's weight ``w``
and by ``scale = 2**scale_bits`` (exact in binary64) and rounded *stochastically* to one
of the two nearest integers, so that ``E[q] = w * clip(x) * scale`` (exactly whenever the
fraction is a multiple of ``2**-32``, else within ``2**-32``). The integer is stored in
two's complement modulo ``2**bits``, where numpy's ``uint32``/``uint64`` arithmetic wraps
for free. A member's *contribution* is the vector ``[q_0, ..., q_{d-1}, w] mod 2**bits``:
the sample-count weight ``w`` scales every coordinate and is itself the last word, so the
ring sum over a group is ``[sum q_i, ..., sum w_i]`` from which the weighted mean follows.
Rounding after weighting, not before, makes a group's rounding error ``k`` units of the
ring (``k`` members) instead of up to ``W`` (the total weight).

:class:`FixedPointParams` refuses parameters for which a full group could overflow: for
every allowed input, ``|sum_i q_i| < 2**(bits-1)`` and ``sum_i w_i < 2**(bits-1)``, so
the signed reading of the ring sum is the true integer sum. The defaults (64-bit ring,
``clip = 8.0``, ``scale = 2**32``, up to 64 members of weight up to ``2**20``) reach at most
``2**61``. A federation derives its parameters with
:meth:`FixedPointParams.for_federation` (the largest safe scale for its ``group_max``).

Accuracy (clipping aside): per coordinate the decoded mean ``v`` of a group of ``k``
members with total weight ``W`` and the exact weighted mean ``m`` of the clipped inputs
satisfy ``|v - m| <= e + 2**-23 * (|m| + e) + 2**-149`` with ``e = k / (W * scale)``, at
most ``1/scale`` (see :func:`error_bound`): each ``q_i`` is within 1 of
``w_i * x_i * scale``, and the rest is float64 division and the final float32 rounding.

Example::

    >>> import numpy as np
    >>> params = FixedPointParams()
    >>> rng = np.random.default_rng(7)
    >>> a = make_contribution(np.array([0.5, -1.0], np.float32), 3, params, rng)
    >>> b = make_contribution(np.array([1.5, 2.0], np.float32), 1, params, rng)
    >>> mean, weight = decode_group_sum(a + b, params)   # uint64 addition wraps mod 2**64
    >>> mean.tolist(), weight
    ([0.75, -0.25], 4)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt

from p2pfed.errors import InvalidGroupSumError, SecureAggregationError

__all__ = [
    "DEFAULT_PARAMS",
    "MAX_WEIGHT",
    "FixedPointParams",
    "contribution_buffer",
    "contribution_from_bytes",
    "contribution_to_bytes",
    "decode_group_sum",
    "decode_sum",
    "encode",
    "error_bound",
    "iter_encode_into",
    "make_contribution",
]

_CHUNK = 1 << 15
"""Coordinates encoded per step: the scratch arrays of one step stay in the CPU cache."""

SUPPORTED_BITS = (32, 64)
MAX_WEIGHT = {64: 2**20, 32: 2**8}
"""Protocol constant: the largest contribution weight in each ring (larger counts are capped)."""


@dataclass(frozen=True)
class FixedPointParams:
    """Ring size, clipping and scale of the fixed-point encoding, checked for overflow.

    ``bits``
        ring modulus ``2**bits``; 32 or 64.
    ``clip``
        inputs are clipped to ``[-clip, clip]`` before scaling (a positive finite float).
    ``scale_bits``
        the scale is ``2**scale_bits``; the resolution of one member's value is
        ``2**-scale_bits``.
    ``max_group_size``
        the most members a group may have (at least 3).
    ``max_weight``
        the largest weight (sample count) one member may contribute.

    Construction raises :class:`~p2pfed.errors.SecureAggregationError` (a ``ValueError``)
    if a full group of ``max_group_size`` members, each with weight ``max_weight`` and
    every coordinate at ``+clip`` (or ``-clip``), could reach ``2**(bits-1)``; the message
    gives the bound and the largest ``scale_bits`` that would fit.

    The defaults are a 64-bit ring, ``clip=8.0``, ``scale_bits=32`` (resolution
    ``2.3e-10``, far below float32 precision at the clip), ``max_group_size=64`` and
    ``max_weight=2**20``: the worst-case group sum is ``64 * 2**20 * 8 * 2**32 = 2**61``.
    A 32-bit ring only fits much smaller groups, weights or scales, for example
    ``FixedPointParams(bits=32, clip=4.0, scale_bits=12, max_group_size=16, max_weight=256)``.
    """

    bits: int = 64
    clip: float = 8.0
    scale_bits: int = 32
    max_group_size: int = 64
    max_weight: int = 2**20

    def __post_init__(self) -> None:
        _require_int("bits", self.bits)
        if self.bits not in SUPPORTED_BITS:
            raise SecureAggregationError(
                f"FixedPointParams.bits must be 32 or 64, got {self.bits!r}"
            )
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)):
            raise SecureAggregationError(
                f"FixedPointParams.clip must be a positive finite number, got {self.clip!r}"
            )
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecureAggregationError(
                f"FixedPointParams.clip must be a positive finite number, got {self.clip!r}"
            )
        _require_int("scale_bits", self.scale_bits)
        if not 0 <= self.scale_bits <= self.bits - 2:
            raise SecureAggregationError(
                f"FixedPointParams.scale_bits must be in [0, {self.bits - 2}] for a "
                f"{self.bits}-bit ring, got {self.scale_bits}"
            )
        _require_int("max_group_size", self.max_group_size)
        if self.max_group_size < 3:
            raise SecureAggregationError(
                f"FixedPointParams.max_group_size must be at least 3 (a group of 2 reveals "
                f"the other member's model), got {self.max_group_size}"
            )
        _require_int("max_weight", self.max_weight)
        if self.max_weight < 1:
            raise SecureAggregationError(
                f"FixedPointParams.max_weight must be a positive integer, got {self.max_weight}"
            )
        limit = 1 << (self.bits - 1)
        if self.max_total_weight >= limit:
            raise SecureAggregationError(
                f"FixedPointParams can overflow: the total weight of a full group is up to "
                f"max_group_size * max_weight = {self.max_group_size} * {self.max_weight} = "
                f"{self.max_total_weight} (2^{math.log2(self.max_total_weight):.2f}), which "
                f"must be < 2^{self.bits - 1}; lower max_weight or max_group_size"
            )
        if self.max_abs_sum >= limit:
            fitting = _largest_scale_bits(self)
            hint = (
                f"lower scale_bits to at most {fitting}"
                if fitting is not None
                else "no scale_bits fits"
            )
            raise SecureAggregationError(
                f"FixedPointParams can overflow: a full group sums to |sum q| up to "
                f"max_group_size * max_weight * ceil(clip * 2^scale_bits) = "
                f"{self.max_group_size} * {self.max_weight} * {self.max_abs_encoded} = "
                f"{self.max_abs_sum} (2^{math.log2(self.max_abs_sum):.2f}), which must be "
                f"< 2^{self.bits - 1}; {hint}, or lower clip, max_weight or max_group_size"
            )

    @classmethod
    def for_federation(
        cls, bits: int, clip: float, group_max: int, max_weight: int | None = None
    ) -> FixedPointParams:
        """The parameters every member of a federation derives from its protocol parameters.

        ``scale_bits`` is the largest value for which a full group cannot overflow
        (spec/secure-aggregation.md, "Parameters"); ``max_weight`` defaults to the protocol
        constant of the ring, :data:`MAX_WEIGHT` ``[bits]``.

        >>> FixedPointParams.for_federation(64, 8.0, 8).scale_bits
        36
        """
        weight = MAX_WEIGHT.get(bits, 1) if max_weight is None else max_weight
        probe = cls(bits=bits, clip=clip, scale_bits=0, max_group_size=group_max, max_weight=weight)
        best = _largest_scale_bits(probe)
        assert best is not None  # the probe with scale_bits=0 was accepted
        return cls(bits, clip, best, group_max, weight)

    @property
    def scale(self) -> int:
        """The scale ``2**scale_bits`` by which clipped values are multiplied."""
        return 1 << self.scale_bits

    @property
    def word_bytes(self) -> int:
        """Bytes of one ring element on the wire (4 or 8)."""
        return self.bits // 8

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy unsigned dtype of ring elements in memory (``uint32`` or ``uint64``)."""
        return np.dtype(np.uint64 if self.bits == 64 else np.uint32)

    @property
    def signed_dtype(self) -> np.dtype[Any]:
        """The signed dtype used to read a ring element in two's complement."""
        return np.dtype(np.int64 if self.bits == 64 else np.int32)

    @property
    def max_abs_encoded(self) -> int:
        """The largest ``|q|`` of one encoded coordinate: ``ceil(clip * scale)``."""
        return math.ceil(Fraction(self.clip) * self.scale)

    @property
    def max_total_weight(self) -> int:
        """The largest total weight of a group: ``max_group_size * max_weight``."""
        return self.max_group_size * self.max_weight

    @property
    def max_abs_sum(self) -> int:
        """The largest ``|sum_i q_i|`` of a full group (always ``< 2**(bits-1)``)."""
        return self.max_total_weight * self.max_abs_encoded


def _require_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecureAggregationError(
            f"FixedPointParams.{name} must be an int, got {type(value).__name__} {value!r}"
        )


def _largest_scale_bits(params: FixedPointParams) -> int | None:
    limit = 1 << (params.bits - 1)
    best = None
    for sb in range(params.bits - 1):
        q = math.ceil(Fraction(params.clip) * (1 << sb))
        if params.max_total_weight * q < limit:
            best = sb
    return best


DEFAULT_PARAMS = FixedPointParams()
"""64-bit ring, clip 8.0, scale 2**32, groups of up to 64 with weights up to 2**20."""


def error_bound(
    params: FixedPointParams,
    mean: npt.ArrayLike,
    *,
    members: int | None = None,
    total_weight: int | None = None,
) -> npt.NDArray[np.float64]:
    """The guaranteed bound on ``|decoded - mean|`` per coordinate (clipping aside).

    ``mean`` is the exact weighted mean of the *clipped* inputs. The bound is
    ``e + 2**-23 * (|mean| + e) + 2**-149`` where ``e`` is the fixed-point error of the
    mean: stochastic rounding moves each member's scaled value by less than 1, so the sum
    is within ``members`` units and the mean within ``e = members / (total_weight *
    scale)``; without ``members`` and ``total_weight``, ``e = 1/scale``, which holds for
    every group because no member has weight below 1. Float64 division adds at most
    ``2**-52`` relative error and the float32 result at most ``2**-24`` relative (or
    ``2**-150`` absolute when subnormal).

    >>> float(error_bound(DEFAULT_PARAMS, 0.0, members=4, total_weight=4000)) < 2**-41
    True
    """
    if members is None or total_weight is None:
        inv = 1.0 / params.scale
    else:
        if not 1 <= members <= total_weight:
            raise SecureAggregationError(
                f"error_bound needs 1 <= members <= total_weight (every member has weight "
                f"at least 1), got members={members}, total_weight={total_weight}"
            )
        inv = members / (total_weight * params.scale)
    return np.asarray(inv + 2.0**-23 * (np.abs(np.asarray(mean, np.float64)) + inv) + 2.0**-149)


def _check_vector(x: object) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise SecureAggregationError(
            f"expected a 1-D numpy float32 array, got {type(x).__name__}; "
            "convert with np.asarray(x, dtype=np.float32)"
        )
    if x.ndim != 1:
        raise SecureAggregationError(
            f"expected a 1-D vector, got shape {x.shape}; flatten the model with x.ravel()"
        )
    if x.dtype != np.float32:
        raise SecureAggregationError(
            f"expected a float32 vector, got dtype {x.dtype}; convert with x.astype(np.float32)"
        )
    return x


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer (Python or numpy) but not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return None
    return operator.index(value)


def _check_weight(weight: object, params: FixedPointParams) -> int:
    w = _as_int(weight)
    if w is None or not 0 <= w <= params.max_weight:
        raise SecureAggregationError(
            f"weight must be an integer in [0, max_weight={params.max_weight}], got {weight!r}; "
            "cap the sample count at max_weight or raise max_weight in the parameters"
        )
    return w


def iter_encode_into(
    x: np.ndarray,
    weight: int | np.integer[Any],
    params: FixedPointParams,
    rng: np.random.Generator,
    out: np.ndarray,
) -> Iterator[tuple[int, int]]:
    """Write ``q mod 2**bits``, ``x`` encoded with ``weight``, into ``out``, in chunks.

    Yields ``(start, stop)`` as soon as ``out[start:stop]`` is written, so the caller can
    work on that slice while it is still in the CPU cache (the masking adds its keystream
    there). ``out`` is a 1-D ``params.dtype`` array as long as ``x``. The random draws are
    one uniform 32-bit integer per coordinate, taken in order from
    ``rng.bit_generator.random_raw`` (two per raw 64-bit output), whatever the chunking.
    Nothing is written until the generator is iterated; a non-finite value raises
    :class:`~p2pfed.errors.SecureAggregationError` when its chunk is reached.
    """
    x = _check_vector(x)
    weight = _check_weight(weight, params)
    if (
        not isinstance(out, np.ndarray)
        or out.ndim != 1
        or out.dtype != params.dtype
        or out.shape[0] != x.shape[0]
    ):
        raise SecureAggregationError(
            f"out must be a 1-D {params.dtype} array of length {x.shape[0]}"
        )
    return _encode_chunks(x, weight, params, rng, out)


def _clip_float32(clip: float) -> np.float32:
    """The largest float32 not above ``clip``: clipping a float32 to it equals clipping to
    ``clip`` (no float32 lies strictly between the two), and it can be done in float32."""
    c = np.float32(clip)
    if float(c) > clip:
        c = np.nextafter(c, np.float32(0))
    return c


def _encode_chunks(
    x: np.ndarray,
    weight: int,
    params: FixedPointParams,
    rng: np.random.Generator,
    out: np.ndarray,
) -> Iterator[tuple[int, int]]:
    # The weight is applied before rounding, y = w * clip(x) * scale, so the rounding error
    # of a member is below 1 of its w * scale units rather than w of them: a group's mean is
    # within k / (W * scale) instead of 1 / scale (k members, total weight W). Every float
    # step is exact binary64 arithmetic: a float32 times an integer below 2**21 times a
    # power of two has at most 45 significant bits; |y|, its floor and its fraction are
    # exact, and so is the fraction times 2**32. Rounding the magnitude and restoring the
    # sign has the same distribution as rounding y.
    n = x.shape[0]
    size = min(n, _CHUNK)
    y = np.empty(size, np.float64)
    fl = np.empty(size, np.float64)
    sign = np.empty(size, np.float64)
    threshold = np.empty(size, np.uint32)
    up = np.empty(size, np.bool_)
    q64 = None if params.bits == 64 else np.empty(size, np.int64)
    clip = _clip_float32(params.clip)
    scale = np.float64(weight * params.scale)  # exact: an integer below 2**21 times 2**k
    two32 = np.float64(2.0**32)
    draw = rng.bit_generator.random_raw
    for a in range(0, n, _CHUNK):
        b = min(a + _CHUNK, n)
        m = b - a
        xc, yc, flc, sc, tc, upc = x[a:b], y[:m], fl[:m], sign[:m], threshold[:m], up[:m]
        if not np.isfinite(xc).all():
            bad = a + int(np.flatnonzero(~np.isfinite(xc))[0])
            raise SecureAggregationError(
                f"cannot encode a non-finite value: x[{bad}] = {x[bad]}; "
                "the model diverged or was corrupted, do not contribute it"
            )
        np.clip(xc, -clip, clip, out=yc)  # float32 -> float64, exact
        np.multiply(yc, scale, out=yc)
        np.sign(yc, out=sc)
        np.abs(yc, out=yc)
        np.floor(yc, out=flc)
        np.subtract(yc, flc, out=yc)  # the fraction of |y|, in [0, 1)
        np.multiply(yc, two32, out=yc)
        np.copyto(tc, yc, casting="unsafe")  # floor(fraction * 2**32) < 2**32
        # one uniform 32-bit integer per coordinate (two per raw 64-bit output)
        r = draw((m + 1) // 2).view(np.uint32)[:m]
        np.less(r, tc, out=upc)  # round up with probability floor(fraction * 2**32) / 2**32
        np.add(flc, upc, out=flc)  # exact: an integer-valued binary64 below 2**(bits-1)
        np.multiply(flc, sc, out=flc)
        qc = out[a:b].view(np.int64) if q64 is None else q64[:m]
        np.copyto(qc, flc, casting="unsafe")  # |q| <= w * max_abs_encoded < 2**(bits-1)
        if q64 is not None:
            np.copyto(out[a:b], qc, casting="unsafe")  # int64 -> uint32 wraps mod 2**32
        yield a, b


def encode(x: np.ndarray, params: FixedPointParams, rng: np.random.Generator) -> np.ndarray:
    """Encode a float vector as ring elements: clip, scale, round stochastically, wrap.

    Returns an array of ``params.dtype`` with ``q = round(clip(x) * scale) mod 2**bits``,
    where each coordinate rounds up with probability equal to the fractional part of
    ``clip(x) * scale`` (to 32 bits: see spec/secure-aggregation.md, 2.1), so
    ``E[q] = clip(x) * scale``. Raises :class:`~p2pfed.errors.SecureAggregationError` for
    a non-finite value.

    >>> q = encode(np.array([1.0, -0.5], np.float32), FixedPointParams(), np.random.default_rng(0))
    >>> q.view(np.int64).tolist()
    [4294967296, -2147483648]
    """
    x = _check_vector(x)
    out = np.empty(x.shape[0], params.dtype)
    for _ in iter_encode_into(x, 1, params, rng, out):
        pass
    return out


def make_contribution(
    x: np.ndarray,
    weight: int | np.integer[Any],
    params: FixedPointParams,
    rng: np.random.Generator,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """A member's plaintext contribution ``[q_0, ..., q_{d-1}, w] mod 2**bits``.

    ``weight`` is the member's weight (spec/group.md, "Weights"), in
    ``[0, params.max_weight]``; weight 0 adds nothing to the group's mean. The result has
    ``len(x) + 1`` words of ``params.dtype``; the last word is the weight, so it is masked
    with everything else and the group learns only the total weight. Pass ``out`` (a
    ``params.dtype`` array of ``len(x) + 1`` words) to reuse a buffer across rounds.
    """
    x = _check_vector(x)
    w = _check_weight(weight, params)
    out = contribution_buffer(x.shape[0], params, out)
    for _ in iter_encode_into(x, w, params, rng, out[:-1]):
        pass
    out[-1] = w
    return out


def contribution_buffer(
    length: int, params: FixedPointParams, out: np.ndarray | None = None
) -> np.ndarray:
    """A buffer for the contribution of a ``length``-parameter model (``length + 1`` words).

    Returns ``out`` after checking it (1-D, ``params.dtype``, ``length + 1`` words), or a
    new array if ``out`` is None.
    """
    if out is None:
        return np.empty(length + 1, params.dtype)
    if (
        not isinstance(out, np.ndarray)
        or out.ndim != 1
        or out.dtype != params.dtype
        or out.shape[0] != length + 1
    ):
        got = (
            f"{out.dtype} array of shape {out.shape}"
            if isinstance(out, np.ndarray)
            else type(out).__name__
        )
        raise SecureAggregationError(
            f"out must be a 1-D {params.dtype} array of {length + 1} words (the model's "
            f"{length} parameters and the weight), got {got}"
        )
    return out


def _check_ring_vector(words: object, params: FixedPointParams, what: str) -> np.ndarray:
    if not isinstance(words, np.ndarray) or words.ndim != 1 or words.dtype != params.dtype:
        got = (
            f"{words.dtype} array of shape {words.shape}"
            if isinstance(words, np.ndarray)
            else type(words).__name__
        )
        raise SecureAggregationError(
            f"{what} must be a 1-D {params.dtype} array for a {params.bits}-bit ring, got {got}"
        )
    return words


def decode_sum(
    total: np.ndarray, total_weight: int | np.integer[Any], params: FixedPointParams
) -> np.ndarray:
    """Decode the ring sum of weighted coordinates into the float32 weighted mean.

    ``total`` holds ``sum_i q_i mod 2**bits`` per coordinate and ``total_weight`` is
    ``sum_i w_i``. Each word is read as a signed (two's complement) integer and divided by
    ``scale * total_weight``. A word whose magnitude exceeds ``total_weight *
    max_abs_encoded`` cannot come from honest contributions and raises
    :class:`~p2pfed.errors.InvalidGroupSumError` (the masks did not cancel).
    """
    total = _check_ring_vector(total, params, "the group sum")
    w = _as_int(total_weight)
    if w is None:
        raise SecureAggregationError(f"total_weight must be an integer, got {total_weight!r}")
    if not 1 <= w <= params.max_total_weight:
        raise SecureAggregationError(
            f"total_weight must be in [1, max_group_size * max_weight = "
            f"{params.max_total_weight}], got {w}"
        )
    signed = total.view(params.signed_dtype)
    if signed.size:
        limit = w * params.max_abs_encoded
        lo, hi = int(signed.min()), int(signed.max())
        if lo < -limit or hi > limit:
            bad = int(np.flatnonzero((signed < -limit) | (signed > limit))[0])
            raise InvalidGroupSumError(
                f"not a valid group sum: coordinate {bad} is {int(signed[bad])}, beyond "
                f"total_weight * max_abs_encoded = {limit}; the masks did not cancel (a "
                "contribution is missing or corrupted), abort the group"
            )
    return np.divide(signed, float(params.scale * w), dtype=np.float64).astype(np.float32)


def decode_group_sum(sum_vector: np.ndarray, params: FixedPointParams) -> tuple[np.ndarray, int]:
    """Decode the ring sum of a group's contributions: ``(weighted_mean, total_weight)``.

    ``sum_vector`` is the sum (mod ``2**bits``) of every member's contribution, masked or
    not (the masks cancel). Raises :class:`~p2pfed.errors.InvalidGroupSumError` if the
    weight word or a coordinate is out of the range honest contributions can produce,
    which is what a missing or corrupted contribution gives with overwhelming probability.
    """
    sum_vector = _check_ring_vector(sum_vector, params, "the group sum")
    if sum_vector.shape[0] < 1:
        raise SecureAggregationError("the group sum is empty; it must end with the weight word")
    weight = int(sum_vector[-1:].view(params.signed_dtype)[0])
    if not 1 <= weight <= params.max_total_weight:
        raise InvalidGroupSumError(
            f"not a valid group sum: the weight word reads {weight}, outside [1, "
            f"{params.max_total_weight}]; the masks did not cancel (a contribution is "
            "missing or corrupted), abort the group"
        )
    return decode_sum(sum_vector[:-1], weight, params), weight


def contribution_to_bytes(words: np.ndarray, params: FixedPointParams) -> bytes:
    """The wire form of ring words: each word as ``bits/8`` little-endian bytes, in order."""
    words = _check_ring_vector(words, params, "the contribution")
    return words.astype(params.dtype.newbyteorder("<"), copy=False).tobytes()


def contribution_from_bytes(data: bytes, params: FixedPointParams, length: int) -> np.ndarray:
    """Parse ``length`` little-endian ring words, checking the size before allocating.

    Raises :class:`~p2pfed.errors.SecureAggregationError` unless ``len(data)`` is exactly
    ``length * bits/8``.
    """
    if len(data) != length * params.word_bytes:
        raise SecureAggregationError(
            f"a contribution of {length} words of a {params.bits}-bit ring is "
            f"{length * params.word_bytes} bytes, got {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=params.dtype.newbyteorder("<")).astype(params.dtype)
