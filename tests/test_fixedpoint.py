"""Fixed-point encoding, weighted contributions and their decoding (p2pfed.fixedpoint)."""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfed.errors import InvalidGroupSumError, SecureAggregationError
from p2pfed.fixedpoint import (
    DEFAULT_PARAMS,
    MAX_WEIGHT,
    FixedPointParams,
    contribution_from_bytes,
    contribution_to_bytes,
    decode_group_sum,
    decode_sum,
    encode,
    error_bound,
    make_contribution,
)

PARAMS_32 = FixedPointParams(bits=32, clip=4.0, scale_bits=15, max_group_size=32, max_weight=256)
"""A 32-bit ring at its limit: 32 * 256 * 4 * 2**15 = 2**30 < 2**31."""


def reference_mean(xs: np.ndarray, weights: list[int], clip: float) -> np.ndarray:
    """The weighted mean of the clipped inputs, correctly rounded sums (math.fsum)."""
    clipped = np.clip(xs.astype(np.float64), -clip, clip)
    total = sum(weights)
    return np.array(
        [
            math.fsum(w * float(v) for w, v in zip(weights, clipped[:, j], strict=True)) / total
            for j in range(xs.shape[1])
        ]
    )


def reference_tolerance(params: FixedPointParams, mean: np.ndarray) -> np.ndarray:
    # the documented bound, plus the reference's own rounding (fsum then one division)
    return error_bound(params, mean) + 2.0**-51 * np.abs(mean)


# --- parameters -------------------------------------------------------------------------


def test_default_parameters_are_the_documented_ones() -> None:
    p = DEFAULT_PARAMS
    assert (p.bits, p.clip, p.scale, p.max_group_size, p.max_weight) == (
        64,
        8.0,
        2**32,
        64,
        2**20,
    )
    assert p.max_abs_encoded == 2**35
    assert p.max_abs_sum == 2**61 < 2**63
    assert p.dtype == np.uint64 and p.signed_dtype == np.int64 and p.word_bytes == 8


def test_overflow_prone_scale_is_rejected_with_the_bound_and_the_fix() -> None:
    with pytest.raises(SecureAggregationError) as info:
        FixedPointParams(scale_bits=34)
    message = str(info.value)
    assert "overflow" in message
    assert str(64 * 2**20 * 8 * 2**34) in message  # the computed bound
    assert "scale_bits to at most 33" in message  # what to change


def test_overflow_prone_total_weight_is_rejected() -> None:
    with pytest.raises(SecureAggregationError, match="lower max_weight or max_group_size"):
        FixedPointParams(bits=32, clip=1.0, scale_bits=0, max_group_size=64, max_weight=2**30)


def test_default_group_and_weight_limits_do_not_fit_a_32_bit_ring() -> None:
    with pytest.raises(
        SecureAggregationError, match="must be < 2\\^31; lower scale_bits to at most 1,"
    ):
        FixedPointParams(bits=32, scale_bits=8)


def test_a_clip_too_large_for_any_scale_is_rejected() -> None:
    with pytest.raises(SecureAggregationError, match="no scale_bits fits, or lower clip"):
        FixedPointParams(bits=32, clip=2.0**26, scale_bits=0, max_group_size=64, max_weight=1)


@pytest.mark.parametrize(
    ("bits", "clip", "group_max", "scale_bits"),
    # 2^3 * 2^20 * 0.1 * 2^43 = 2^62.68 < 2^63, the next scale would reach 2^63.68
    [(64, 8.0, 8, 36), (64, 8.0, 64, 33), (32, 8.0, 8, 16), (64, 0.1, 8, 43)],
)
def test_federation_parameters_take_the_largest_safe_scale(
    bits: int, clip: float, group_max: int, scale_bits: int
) -> None:
    p = FixedPointParams.for_federation(bits, clip, group_max)
    assert (p.bits, p.clip, p.max_group_size, p.max_weight) == (
        bits,
        clip,
        group_max,
        MAX_WEIGHT[bits],
    )
    assert p.scale_bits == scale_bits
    with pytest.raises(SecureAggregationError, match="overflow"):
        FixedPointParams(bits, clip, scale_bits + 1, group_max, MAX_WEIGHT[bits])


@pytest.mark.parametrize("bits", [32, 64])
def test_bound_is_strict_at_the_edge(bits: int) -> None:
    # 4 members of weight 1 at clip 1.0: the sum reaches 4 * 2**scale_bits
    edge = bits - 4
    ok = FixedPointParams(bits=bits, clip=1.0, scale_bits=edge, max_group_size=4, max_weight=1)
    assert ok.max_abs_sum == 2 ** (bits - 2)
    with pytest.raises(SecureAggregationError, match=f"at most {edge}"):
        FixedPointParams(bits=bits, clip=1.0, scale_bits=edge + 1, max_group_size=4, max_weight=1)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("bits", 16, "32 or 64"),
        ("bits", 64.0, "must be an int"),
        ("clip", float("nan"), "positive finite"),
        ("clip", float("inf"), "positive finite"),
        ("clip", -1.0, "positive finite"),
        ("clip", 0.0, "positive finite"),
        ("clip", True, "positive finite"),
        ("scale_bits", -1, "scale_bits must be in"),
        ("scale_bits", True, "must be an int"),
        ("max_group_size", 2, "at least 3"),
        ("max_weight", 0, "positive integer"),
    ],
)
def test_invalid_parameters_are_rejected(field: str, value: object, fragment: str) -> None:
    with pytest.raises(SecureAggregationError, match=fragment):
        FixedPointParams(**{field: value})  # type: ignore[arg-type]


def test_parameter_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        FixedPointParams(scale_bits=40)


# --- the adversarial extremes -----------------------------------------------------------


def _largest_fitting_scale(bits: int, clip: float, group: int, weight: int) -> FixedPointParams:
    """The parameters with the most scale bits that still pass validation."""
    for scale_bits in range(bits - 2, -1, -1):
        try:
            return FixedPointParams(bits, clip, scale_bits, group, weight)
        except SecureAggregationError:
            continue
    raise AssertionError("no scale fits")


@pytest.mark.parametrize(
    "params",
    [
        DEFAULT_PARAMS,
        PARAMS_32,
        # clip * scale is not an integer here, so coordinates round up to ceil(clip*scale)
        _largest_fitting_scale(64, 0.1, 8, 1000),
        _largest_fitting_scale(32, 0.3, 5, 7),
    ],
    ids=["default", "32bit", "64bit-clip0.1", "32bit-clip0.3"],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_full_group_at_the_clip_with_max_weight_does_not_overflow(
    params: FixedPointParams, sign: float
) -> None:
    rng = np.random.default_rng(11)
    # far beyond the clip: every coordinate is clipped to +-clip, then scaled and rounded
    x = np.full(16, sign * 1e30, np.float32)
    parts = [
        make_contribution(x, params.max_weight, params, rng) for _ in range(params.max_group_size)
    ]
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    signed = total[:-1].view(params.signed_dtype).astype(object)
    assert all(abs(v) <= params.max_abs_sum < 2 ** (params.bits - 1) for v in signed)
    assert all((v > 0) == (sign > 0) for v in signed)  # no wrap-around changed the sign
    mean, weight = decode_group_sum(total, params)
    assert weight == params.max_total_weight
    expected = sign * params.clip
    assert np.all(np.abs(mean - expected) <= error_bound(params, expected))


# --- encoding -----------------------------------------------------------------------------


def test_exactly_representable_values_encode_exactly() -> None:
    x = np.array([1.0, -1.0, 0.5, -8.0, 8.0, 0.0, 2.0**-32, -(2.0**-32)], np.float32)
    q = encode(x, DEFAULT_PARAMS, np.random.default_rng(0)).view(np.int64)
    assert q.tolist() == [2**32, -(2**32), 2**31, -(2**35), 2**35, 0, 1, -1]


def test_clipping_and_twos_complement_in_a_32_bit_ring() -> None:
    x = np.array([100.0, -100.0, -1.0], np.float32)
    q = encode(x, PARAMS_32, np.random.default_rng(0))
    assert q.dtype == np.uint32
    assert q.tolist() == [4 * 2**15, 2**32 - 4 * 2**15, 2**32 - 2**15]


def test_encoding_matches_an_unchunked_reference_and_rounds_to_a_neighbour() -> None:
    # longer than one internal chunk (and odd), so chunk boundaries are crossed
    n = 3 * (1 << 15) + 17
    x = (np.random.default_rng(1).standard_normal(n) * 3).astype(np.float32)
    x[:5] = [1e-30, -1e-30, 2.0**-40, 100.0, -100.0]  # tiny and clipped values too
    params = FixedPointParams(scale_bits=20)
    q = encode(x, params, np.random.default_rng(99)).view(np.int64)
    # reference: the documented algorithm in float64, in one go: y = clip(x) * scale,
    # |q| = floor(|y|) + [r < floor(frac(|y|) * 2**32)] for a uniform 32-bit r taken in
    # order from the generator's raw 64-bit outputs (low half first), q = sign(y) * |q|
    y = np.clip(x.astype(np.float64), -params.clip, params.clip) * params.scale
    floor = np.floor(np.abs(y))
    threshold = np.floor((np.abs(y) - floor) * 2.0**32)
    raw = np.random.default_rng(99).bit_generator.random_raw((n + 1) // 2)
    r = raw.view(np.uint32)[:n].astype(np.float64)
    expected = (np.sign(y) * (floor + (r < threshold))).astype(np.int64)
    assert np.array_equal(q, expected)
    assert np.all((q == np.floor(y)) | (q == np.ceil(y)))


def test_a_groups_sum_is_within_one_unit_per_member_of_the_exact_weighted_sum() -> None:
    # The weight multiplies before rounding: each member's words are within 1 of
    # w * x * scale, so a group's sum is within k units (k members) of the exact weighted
    # sum, whatever the weights. (Rounding x * scale first and then multiplying by w would
    # put a member up to w units off.)
    params = FixedPointParams.for_federation(64, 8.0, 8)
    rng = np.random.default_rng(5)
    xs = rng.normal(0, 0.3, (4, 2000)).astype(np.float32)
    weights = [1000, 3, 517, 2**20]
    total = sum(make_contribution(x, w, params, rng) for x, w in zip(xs, weights, strict=True))
    signed = total[:-1].view(np.int64)
    for j in range(0, 2000, 7):
        exact = sum(w * Fraction(float(x[j])) for x, w in zip(xs, weights, strict=True))
        assert abs(int(signed[j]) - exact * params.scale) < len(weights)
    mean, weight = decode_group_sum(total, params)
    expected = reference_mean(xs, weights, params.clip)
    bound = error_bound(params, expected, members=4, total_weight=weight)
    assert np.all(np.abs(mean - expected) <= bound + 2.0**-51 * np.abs(expected))


def test_stochastic_rounding_is_unbiased() -> None:
    # scale 1 so that every value has a large fractional part; each value is repeated
    # many times in one vector and the mean of its encodings is compared with x * scale
    params = FixedPointParams(scale_bits=0, clip=100.0)
    values = np.linspace(-3.7, 3.7, 41, dtype=np.float32)
    repeats = 20_000
    q = encode(np.tile(values, repeats), params, np.random.default_rng(2024)).view(np.int64)
    means = q.reshape(repeats, values.size).mean(axis=0)
    target = values.astype(np.float64) * params.scale
    frac = target - np.floor(target)
    # q - floor is Bernoulli(frac): standard error sqrt(frac (1 - frac) / repeats);
    # family-wise false-alarm probability 1e-6 over all values (Bonferroni, two-sided)
    z = NormalDist().inv_cdf(1 - 1e-6 / (2 * values.size))
    tolerance = z * np.sqrt(frac * (1 - frac) / repeats)
    assert np.all(np.abs(means - target) <= tolerance)
    # and the test has power: plain round-to-nearest would fail it
    nearest = np.round(target)
    assert np.any(np.abs(nearest - target) > tolerance)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected_with_their_index(bad: float) -> None:
    x = np.zeros(70_000, np.float32)
    x[66_000] = bad
    with pytest.raises(SecureAggregationError, match=r"x\[66000\]"):
        encode(x, DEFAULT_PARAMS, np.random.default_rng(0))


@pytest.mark.parametrize(
    "x",
    [[1.0, 2.0], np.zeros((2, 2), np.float32), np.zeros(3, np.int32), np.zeros(3)],
    ids=["list", "2-D", "int", "float64"],
)
def test_wrong_vector_types_are_rejected(x: object) -> None:
    with pytest.raises(SecureAggregationError, match="expected"):
        encode(x, DEFAULT_PARAMS, np.random.default_rng(0))  # type: ignore[arg-type]


def test_weight_zero_adds_nothing_to_the_group_mean() -> None:
    """Protocol version 2: a member may contribute weight 0 (spec/group.md, "Weights")."""
    rng = np.random.default_rng(0)
    zero = make_contribution(np.array([5.0, -5.0], np.float32), 0, DEFAULT_PARAMS, rng)
    assert not zero.any()
    other = make_contribution(np.array([0.5, 1.0], np.float32), 3, DEFAULT_PARAMS, rng)
    mean, weight = decode_group_sum(zero + other, DEFAULT_PARAMS)
    assert weight == 3 and mean.tolist() == [0.5, 1.0]


@pytest.mark.parametrize("weight", [-1, 2**20 + 1, True, 1.5, "3"])
def test_invalid_weights_are_rejected(weight: object) -> None:
    with pytest.raises(SecureAggregationError, match="weight"):
        make_contribution(
            np.zeros(2, np.float32),
            weight,  # type: ignore[arg-type]
            DEFAULT_PARAMS,
            np.random.default_rng(0),
        )


def test_numpy_integer_weight_is_accepted() -> None:
    c = make_contribution(
        np.zeros(2, np.float32), np.int64(7), DEFAULT_PARAMS, np.random.default_rng()
    )
    assert c.tolist() == [0, 0, 7]


# --- contributions and decoding ------------------------------------------------------------


def test_contribution_layout() -> None:
    x = np.array([1.0, -0.5, 0.25], np.float32)
    c = make_contribution(x, 3, DEFAULT_PARAMS, np.random.default_rng(0))
    assert c.dtype == np.uint64 and c.shape == (4,)
    assert c.view(np.int64).tolist() == [3 * 2**32, -3 * 2**31, 3 * 2**30, 3]


@settings(max_examples=60, deadline=None)
@given(
    params=st.sampled_from([DEFAULT_PARAMS, PARAMS_32]),
    data=st.data(),
)
def test_decoded_group_sum_is_within_the_documented_bound(
    params: FixedPointParams, data: st.DataObject
) -> None:
    k = data.draw(st.integers(3, params.max_group_size), label="k")
    d = data.draw(st.integers(1, 24), label="d")
    bound = float(np.float32(params.clip * 1.5))
    xs = data.draw(
        hnp.arrays(np.float32, (k, d), elements=st.floats(-bound, bound, width=32)), label="xs"
    )
    weights = data.draw(
        st.lists(st.integers(1, params.max_weight), min_size=k, max_size=k), label="weights"
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32), label="seed"))
    parts = [make_contribution(xs[i], weights[i], params, rng) for i in range(k)]
    total = np.sum(parts, axis=0, dtype=params.dtype)  # wraps modulo 2**bits
    mean, weight = decode_group_sum(total, params)
    assert weight == sum(weights)
    assert mean.dtype == np.float32
    expected = reference_mean(xs, weights, params.clip)
    assert np.all(
        np.abs(mean.astype(np.float64) - expected) <= reference_tolerance(params, expected)
    )


def test_decode_sum_reads_twos_complement() -> None:
    total = np.array([2**64 - 3 * 2**32, 6 * 2**31], np.uint64)
    assert decode_sum(total, 3, DEFAULT_PARAMS).tolist() == [-1.0, 1.0]


def test_group_sum_with_a_bad_weight_word_is_rejected() -> None:
    for weight_word in (0, 2**64 - 1, DEFAULT_PARAMS.max_total_weight + 1):
        total = np.array([0, weight_word], np.uint64)
        with pytest.raises(InvalidGroupSumError, match="weight word"):
            decode_group_sum(total, DEFAULT_PARAMS)


def test_group_sum_with_an_impossible_coordinate_is_rejected() -> None:
    # weight 2 allows at most |sum w q| <= 2 * 2**35; one more is impossible
    total = np.array([0, 2 * 2**35 + 1, 2], np.uint64)
    with pytest.raises(InvalidGroupSumError, match="coordinate 1"):
        decode_group_sum(total, DEFAULT_PARAMS)
    total[1] = 2 * 2**35
    assert decode_group_sum(total, DEFAULT_PARAMS)[0].tolist() == [0.0, 8.0]


def test_decode_rejects_the_wrong_ring_and_bad_weights() -> None:
    with pytest.raises(SecureAggregationError, match="uint64"):
        decode_sum(np.zeros(2, np.uint32), 1, DEFAULT_PARAMS)
    with pytest.raises(SecureAggregationError, match="total_weight"):
        decode_sum(np.zeros(2, np.uint64), 0, DEFAULT_PARAMS)
    with pytest.raises(SecureAggregationError, match="empty"):
        decode_group_sum(np.zeros(0, np.uint64), DEFAULT_PARAMS)


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, PARAMS_32], ids=["64", "32"])
def test_wire_form_is_little_endian_words(params: FixedPointParams) -> None:
    words = np.array([1, 2 ** (params.bits - 1) + 5, 0], params.dtype)
    data = contribution_to_bytes(words, params)
    n = params.word_bytes
    assert data == b"".join(int(v).to_bytes(n, "little") for v in words.tolist())
    assert np.array_equal(contribution_from_bytes(data, params, 3), words)
    with pytest.raises(SecureAggregationError, match=f"{3 * n} bytes, got {3 * n - 1}"):
        contribution_from_bytes(data[:-1], params, 3)


def test_error_bound_formula() -> None:
    inv = 2.0**-32
    assert float(error_bound(DEFAULT_PARAMS, 0.0)) == inv + 2.0**-23 * inv + 2.0**-149
    assert float(error_bound(DEFAULT_PARAMS, -8.0)) == pytest.approx(inv + 2.0**-23 * (8 + inv))
