"""The Gaussian mechanism on model updates: clipping bound, noise distribution, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from p2pfed.dp import (
    SEED_BYTES,
    clip_and_noise,
    clip_update,
    effective_noise_multiplier,
    l2_norm,
    noise_generator,
)

# Statistical checks allow six standard errors of the estimator: a correct implementation
# fails one with probability about 2e-9, a wrong scale by a few percent fails every time.
SIGMAS = 6.0


def seeded(byte: int) -> np.random.Generator:
    return noise_generator(lambda n: bytes([byte]) * n)


def norm64(x: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64).reshape(-1)))


def test_noise_has_the_promised_distribution() -> None:
    n = 1_000_000
    clip, sigma = 0.5, 1.3
    update = np.zeros(n, dtype=np.float32)  # inside the ball: the output is pure noise
    noise = clip_and_noise(update, clip, sigma, seeded(7)).astype(np.float64)
    std_true = sigma * clip

    # mean: standard error std/sqrt(n)
    assert abs(noise.mean()) < SIGMAS * std_true / math.sqrt(n)
    # sample std of a Gaussian: standard error about std/sqrt(2n)
    assert abs(noise.std() - std_true) < SIGMAS * std_true / math.sqrt(2 * n)
    # shape, not only scale: the mass within one std is 0.682689 for a Gaussian
    # (0.577 for a uniform of the same std), binomial standard error
    p = math.erf(1 / math.sqrt(2))
    within = float(np.mean(np.abs(noise) < std_true))
    assert abs(within - p) < SIGMAS * math.sqrt(p * (1 - p) / n)
    # coordinates are independent: lag-1 correlation has standard error 1/sqrt(n)
    corr = float(np.corrcoef(noise[:-1], noise[1:])[0, 1])
    assert abs(corr) < SIGMAS / math.sqrt(n)


def test_noise_is_added_to_the_clipped_update_in_float64_then_rounded_once() -> None:
    rng_update = np.random.default_rng(1)
    update = rng_update.normal(size=1000).astype(np.float32)
    update *= np.float32(0.1 / norm64(update))  # norm 0.1 < C: left unchanged by clipping
    clip, sigma = 1.0, 0.8
    noisy = clip_and_noise(update, clip, sigma, seeded(3))
    expected_noise = seeded(3).standard_normal(size=1000, dtype=np.float64) * (sigma * clip)
    assert np.array_equal(noisy, (update.astype(np.float64) + expected_noise).astype(np.float32))


def test_clip_and_noise_keeps_shape_and_input() -> None:
    update = np.ones((3, 4), dtype=np.float32)
    before = update.copy()
    noisy = clip_and_noise(update, 1.0, 1.0, seeded(1))
    assert noisy.shape == (3, 4) and noisy.dtype == np.float32
    assert np.array_equal(update, before)


def test_large_update_is_clipped_before_noise() -> None:
    n = 200_000
    update = np.full(n, 10.0, dtype=np.float32)  # norm ~4472, far outside C
    clip, sigma = 2.0, 0.5
    noisy = clip_and_noise(update, clip, sigma, seeded(9)).astype(np.float64)
    clipped, norm = clip_update(update, clip)
    residual = noisy - clipped.astype(np.float64)
    assert norm == pytest.approx(10.0 * math.sqrt(n))
    assert abs(residual.mean()) < SIGMAS * sigma * clip / math.sqrt(n)
    assert abs(residual.std() - sigma * clip) < SIGMAS * sigma * clip / math.sqrt(2 * n)


def test_clipping_bound_holds_exactly_over_many_shapes_and_scales() -> None:
    rng = np.random.default_rng(2024)
    for trial in range(300):
        size = int(rng.integers(1, 5000))
        scale = 10.0 ** float(rng.uniform(-3, 30))
        update = (rng.standard_normal(size) * scale).astype(np.float32)
        if not np.all(np.isfinite(update)) or not np.any(update):
            continue
        clip = 10.0 ** float(rng.uniform(-6, 3))
        clipped, norm = clip_update(update, clip)
        assert norm == pytest.approx(norm64(update), rel=1e-12)
        assert l2_norm(clipped) <= clip, (trial, size, scale, clip)
        assert norm64(clipped) <= clip * (1 + 1e-15)
        if norm > clip:
            # scaled, not distorted: the direction is kept and the norm is at the bound
            assert l2_norm(clipped) >= clip * (1 - 1e-6)
            cos = float(
                np.dot(clipped.astype(np.float64), update.astype(np.float64))
                / (l2_norm(clipped) * norm)
            )
            assert cos > 1 - 1e-6
        else:
            assert np.array_equal(clipped, update)


def test_small_update_is_unchanged_and_copied() -> None:
    update = np.array([0.3, -0.4], dtype=np.float32)  # norm 0.5
    clipped, norm = clip_update(update, 1.0)
    assert np.array_equal(clipped, update)
    assert clipped is not update
    assert norm == pytest.approx(0.5)
    on_the_bound, _ = clip_update(update, l2_norm(update))
    assert np.array_equal(on_the_bound, update)


def test_zero_update_is_not_divided_by_zero() -> None:
    clipped, norm = clip_update(np.zeros(5, dtype=np.float32), 1.0)
    assert norm == 0.0 and not np.any(clipped)


def test_different_seeds_give_different_noise_same_seed_same_noise() -> None:
    update = np.zeros(1000, dtype=np.float32)
    a = clip_and_noise(update, 1.0, 1.0, seeded(1))
    b = clip_and_noise(update, 1.0, 1.0, seeded(2))
    c = clip_and_noise(update, 1.0, 1.0, seeded(1))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, c)
    fresh1 = clip_and_noise(update, 1.0, 1.0, noise_generator())
    fresh2 = clip_and_noise(update, 1.0, 1.0, noise_generator())
    assert not np.array_equal(fresh1, fresh2)


def test_noise_generator_takes_its_seed_from_randbytes() -> None:
    calls: list[int] = []
    seed = bytes(range(SEED_BYTES))

    def randbytes(n: int) -> bytes:
        calls.append(n)
        return seed

    gen = noise_generator(randbytes)
    assert calls == [SEED_BYTES]
    # spec/privacy.md: the seed is the little-endian integer of the 32 bytes, expanded
    # by numpy's SeedSequence into a Philox key
    reference = np.random.Generator(
        np.random.Philox(np.random.SeedSequence(int.from_bytes(seed, "little")))
    )
    assert np.array_equal(gen.standard_normal(100), reference.standard_normal(100))
    assert isinstance(gen.bit_generator, np.random.Philox)


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "x" * 32])
def test_noise_generator_rejects_a_bad_seed(bad: object) -> None:
    with pytest.raises(ValueError, match="must return 32 bytes"):
        noise_generator(lambda n: bad)  # type: ignore[arg-type, return-value]


def test_bad_inputs_are_refused_with_clear_errors() -> None:
    good = np.ones(3, dtype=np.float32)
    rng = seeded(0)
    with pytest.raises(TypeError, match="float32"):
        clip_and_noise(np.ones(3), 1.0, 1.0, rng)
    with pytest.raises(TypeError, match="numpy array"):
        clip_update([1.0, 2.0], 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip_update(np.array([1.0, np.nan], dtype=np.float32), 1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip_update(np.array([np.inf], dtype=np.float32), 1.0)
    for bad_clip in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="clip_norm"):
            clip_update(good, bad_clip)
    for bad_sigma in (0.0, -0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="noise_multiplier"):
            clip_and_noise(good, 1.0, bad_sigma, rng)
    with pytest.raises(TypeError, match="Generator"):
        clip_and_noise(good, 1.0, 1.0, np.random.RandomState(0))  # type: ignore[arg-type]


def test_effective_noise_multiplier_is_sigma_over_sensitivity_factor() -> None:
    assert effective_noise_multiplier(2.0) == 1.0
    assert effective_noise_multiplier(3.0, sensitivity_factor=1.0) == 3.0
    with pytest.raises(ValueError, match="sigma"):
        effective_noise_multiplier(0.0)
    with pytest.raises(ValueError, match="sensitivity_factor"):
        effective_noise_multiplier(1.0, sensitivity_factor=-2.0)
