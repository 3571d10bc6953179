"""Distributed node-level DP: Skellam shares in the secure-aggregation ring (spec/privacy.md 2B)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]

from p2pfed.accountant import (
    DEFAULT_ORDERS,
    distributed_epsilon_for,
    epsilon_for,
    integer_order_gaussian_rdp,
    skellam_gaussian_equivalent,
    skellam_rdp,
)
from p2pfed.dp import calibrate, check_budget, release_cost
from p2pfed.errors import ConfigError, LedgerError
from p2pfed.federation import ProtocolParams
from p2pfed.fixedpoint import FixedPointParams, decode_group_sum
from p2pfed.ledger import PrivacyLedger
from p2pfed.skellam import (
    SLACK,
    DistributedDP,
    nominal_noise_multipliers,
    required_clip,
    skellam_share,
)

# -- accountant ---------------------------------------------------------------------------


def _paper_bound(alpha: int, mu: float, d1: float, d2: float) -> float:
    # Agarwal, Kairouz, Liu 2021, evaluated independently in plain Python floats
    first = alpha * d2**2 / (2 * mu)
    second = min(((2 * alpha - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu))
    return first + second


@pytest.mark.parametrize(("mu", "d1", "d2"), [(10.0, 1.0, 1.0), (1e4, 30.0, 5.0), (1e9, 1e5, 1e3)])
def test_skellam_rdp_is_the_papers_bound_at_integer_orders(mu: float, d1: float, d2: float) -> None:
    orders = [float(a) for a in range(2, 65)]
    ours = skellam_rdp(mu, d1, d2, orders)
    for a, value in zip(orders, ours, strict=True):
        assert value == pytest.approx(_paper_bound(int(a), mu, d1, d2), rel=1e-12)


def test_fractional_orders_take_the_next_integer_order() -> None:
    ours = skellam_rdp(50.0, 2.0, 2.0, [2.01, 2.5, 3.0, 3.99])
    assert ours.tolist() == pytest.approx(
        [_paper_bound(3, 50.0, 2.0, 2.0)] * 3 + [_paper_bound(4, 50.0, 2.0, 2.0)]
    )


def _exact_skellam_renyi(alpha: int, mu: float, shift: int) -> float:
    """D_alpha(Sk + shift || Sk) for Sk = Poisson(mu/2) - Poisson(mu/2), summed over the
    support in log space from scipy's pmf (an independent computation)."""
    # beyond 20 standard deviations the terms are far below float64 resolution of the sum
    width = int(20 * math.sqrt(mu)) + 40 + abs(shift)
    k = np.arange(-width, width + 1)
    dist = stats.skellam(mu / 2, mu / 2)
    log_p = dist.logpmf(k - shift)
    log_q = dist.logpmf(k)
    finite = np.isfinite(log_p) & np.isfinite(log_q)
    terms = alpha * log_p[finite] + (1 - alpha) * log_q[finite]
    top = float(np.max(terms))
    return (top + math.log(float(np.sum(np.exp(terms - top))))) / (alpha - 1)


@pytest.mark.parametrize(("mu", "shift"), [(5.0, 1), (50.0, 1), (50.0, 3), (400.0, 2)])
def test_the_bound_holds_for_the_exact_divergence_and_is_tight_for_large_noise(
    mu: float, shift: int
) -> None:
    for alpha in range(2, 9):
        exact = _exact_skellam_renyi(alpha, mu, shift)
        bound = float(skellam_rdp(mu, float(shift), float(shift), [float(alpha)])[0])
        assert exact <= bound * (1 + 1e-9)
        if mu >= 50:
            assert exact >= 0.9 * bound  # not a vacuous bound


def test_skellam_approaches_the_gaussian_as_the_noise_grows() -> None:
    orders = [2.0, 8.0, 32.0]
    gaussian = [a / (2 * 1.0**2) for a in orders]  # z = sqrt(mu) / Delta2 = 1
    gaps = []
    for mu in (1e2, 1e4, 1e6, 1e8):
        d2 = math.sqrt(mu)
        ours = skellam_rdp(mu, d2, d2, orders)
        gaps.append(max(abs(o / g - 1) for o, g in zip(ours, gaussian, strict=True)))
        assert skellam_gaussian_equivalent(mu, d2, d2) == pytest.approx(1.0, rel=3 / math.sqrt(mu))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-6


@pytest.mark.parametrize(("mu", "d1", "d2"), [(3.0, 2.0, 1.0), (1e3, 50.0, 7.0), (1e12, 1e9, 1e6)])
def test_the_gaussian_equivalent_dominates_the_skellam_bound(
    mu: float, d1: float, d2: float
) -> None:
    z = skellam_gaussian_equivalent(mu, d1, d2)
    charged = integer_order_gaussian_rdp(z, DEFAULT_ORDERS)
    assert np.all(skellam_rdp(mu, d1, d2, DEFAULT_ORDERS) <= charged * (1 + 1e-12))


def test_distributed_epsilon_is_close_to_the_gaussian_and_never_below() -> None:
    for z, n in [(1.0, 10), (5.0, 100), (0.7, 1)]:
        gaussian = epsilon_for(z, n, 1e-5)
        ours = distributed_epsilon_for(z, n, 1e-5)
        assert gaussian <= ours <= gaussian * 1.05


def test_calibration_meets_the_target_on_the_central_guarantee() -> None:
    sigma = calibrate("distributed", epsilon=4.0, delta=1e-5, rounds=50)
    central, local = nominal_noise_multipliers(sigma, 5)
    assert central == pytest.approx(sigma / (2 * (1 + SLACK)))
    assert local == pytest.approx(central / math.sqrt(5))
    spent = distributed_epsilon_for(central, 50, 1e-5)
    assert 3.99 < spent <= 4.0


# -- noise shares ---------------------------------------------------------------------------


def _chi_square_p(samples: np.ndarray, dist: stats.rv_discrete) -> float:
    lo, hi = int(dist.ppf(0.001)), int(dist.ppf(0.999))
    edges = np.arange(lo, hi + 1)
    observed = np.array(
        [np.sum(samples < lo)] + [np.sum(samples == k) for k in edges] + [np.sum(samples > hi)]
    )
    expected = np.array([dist.cdf(lo - 1), *dist.pmf(edges), dist.sf(hi)]) * len(samples)
    return float(stats.chisquare(observed, expected).pvalue)


def test_the_sum_of_k_shares_is_skellam_with_the_summed_variance() -> None:
    rng = np.random.default_rng(20260512)
    k, total_variance, n = 5, 40.0, 200_000
    summed = sum(skellam_share(total_variance / k, n, rng) for _ in range(k))
    assert isinstance(summed, np.ndarray) and summed.dtype == np.int64
    right = stats.skellam(total_variance / 2, total_variance / 2)
    assert _chi_square_p(summed, right) > 1e-3
    # the test has the power to see a 10% error in the variance
    wrong = stats.skellam(1.1 * total_variance / 2, 1.1 * total_variance / 2)
    assert _chi_square_p(summed, wrong) < 1e-6


def _ddp(
    clip: float = 128.0, sigma: float = 12.82, group_min: int = 3, d: int = 64
) -> DistributedDP:
    fp = FixedPointParams.for_federation(64, clip, 8)
    return DistributedDP(
        clip_norm=1.0, noise_multiplier=sigma, group_min=group_min, model_size=d, fixed_point=fp
    )


def test_exact_noise_multipliers_are_at_least_what_the_ledger_charges() -> None:
    for d in (1, 1000, 10**7):
        ddp = _ddp(d=d)
        central, local = nominal_noise_multipliers(12.82, 3)
        assert ddp.central_noise_multiplier >= central
        assert ddp.local_noise_multiplier >= local
        assert ddp.central_noise_multiplier <= 12.82 / 2  # rounding only adds sensitivity


def test_group_of_extreme_members_decodes_without_wrap_around() -> None:
    """group_min members at the worst corner: start at the model bound, the whole clip norm
    on one coordinate, the real noise. The ring sum decodes (no wrap, inside the range the
    group accepts) to the mean within the noise's spread."""
    ddp = _ddp()
    d, k = ddp.model_size, ddp.group_min
    rng = np.random.default_rng(5)
    for sign in (1.0, -1.0):
        start = np.full(d, sign * 1e6, np.float32)  # far beyond the bound: clipped to it
        update = np.zeros(d, np.float32)
        update[0] = sign * 50.0  # L2-clipped to C = 1
        total = np.zeros(d + 1, np.uint64)
        for _ in range(k):
            words, _ = ddp.encode_release(start, update, rng)
            assert words.dtype == np.uint64 and int(words[-1]) == 1
            total += words
        mean, weight = decode_group_sum(total, ddp.fixed_point)
        assert weight == k
        expected = np.full(d, sign * ddp.model_bound)
        expected[0] += sign * 1.0
        spread = 12.82 * 1.0 / k * 6  # std of the mean's noise is sigma C / sqrt(k gmin)
        assert np.all(np.abs(mean - expected) < spread)
        assert float(np.max(np.abs(mean))) < ddp.fixed_point.clip


def test_the_released_model_is_what_the_words_decode_to_and_unbiased() -> None:
    ddp = _ddp(clip=8.0, sigma=0.01, d=16)
    rng = np.random.default_rng(11)
    start = np.linspace(-1, 1, 16).astype(np.float32)
    update = np.full(16, 0.05, np.float32)  # norm 0.2 < C: not clipped
    draws = []
    for _ in range(400):
        words, model = ddp.encode_release(start, update, rng)
        decoded, _ = decode_group_sum(words, ddp.fixed_point)
        np.testing.assert_array_equal(decoded, model)
        draws.append(model.astype(np.float64))
    mean = np.mean(draws, axis=0)
    # noise std per draw is 0.01 / sqrt(3); 400 draws: 5 standard errors
    assert np.all(np.abs(mean - (start + update)) < 5 * 0.01 / math.sqrt(3) / 20 + 1e-6)


def test_no_headroom_is_refused_with_the_clip_to_use() -> None:
    with pytest.raises(ConfigError, match=r"set clip to at least 128"):
        _ddp(clip=8.0)
    params = ProtocolParams(dp_level="distributed", dp_noise_multiplier=12.82)
    with pytest.raises(ConfigError, match=r"set clip = 128"):
        check_budget(params)
    check_budget(ProtocolParams(dp_level="distributed", dp_noise_multiplier=12.82, clip=128.0))
    assert required_clip(1.0, 12.82, 3) == 128.0
    assert required_clip(1.0, 0.1, 3) == 8.0


def test_a_lattice_finer_than_the_ring_is_refused() -> None:
    fp = FixedPointParams.for_federation(32, 8.0, 8)  # scale_bits is small in a 32-bit ring
    with pytest.raises(ConfigError, match="lattice"):
        DistributedDP(
            clip_norm=1.0, noise_multiplier=0.5, group_min=3, model_size=10**6, fixed_point=fp
        )


# -- ledger ---------------------------------------------------------------------------------


def test_the_ledger_records_both_guarantees(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    params = ProtocolParams(
        dp_level="distributed", dp_noise_multiplier=6.0, clip=64.0, dp_epsilon_budget=50.0
    )
    cost = release_cost(params)
    assert cost.local_noise_multiplier is not None
    ledger = PrivacyLedger.create(path, epsilon_budget=50.0, delta=1e-5)
    for r in range(4):
        ledger.record_release(
            round=r,
            noise_multiplier=cost.noise_multiplier,
            local_noise_multiplier=cost.local_noise_multiplier,
        )
    central = distributed_epsilon_for(cost.noise_multiplier, 4, 1e-5)
    local = distributed_epsilon_for(cost.local_noise_multiplier, 4, 1e-5)
    assert ledger.spent() == pytest.approx(central, rel=1e-12)
    assert ledger.local_spent() == pytest.approx(local, rel=1e-12)
    assert local > central
    assert cost.epsilon(4, 1e-5) == pytest.approx(central, rel=1e-12)
    assert cost.epsilon(4, 1e-5, local=True) == pytest.approx(local, rel=1e-12)
    body = json.loads(path.read_bytes()[len(b'{"body":') : -len(',"sha256":""}\n') - 64])
    assert body["version"] == 3
    assert body["skellam"] == [
        {
            "noise_multiplier": cost.noise_multiplier,
            "local_noise_multiplier": cost.local_noise_multiplier,
            "count": 4,
        }
    ]
    assert body["local_epsilon_spent"] == pytest.approx(local, rel=1e-11)
    again = PrivacyLedger.open(path)
    assert (again.spent(), again.local_spent(), again.releases()) == (
        ledger.spent(),
        ledger.local_spent(),
        4,
    )
    assert again.last_release() == (3, cost.noise_multiplier, 1.0, 1)


def test_ledger_mixing_gaussian_and_distributed_releases(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger.create(path, epsilon_budget=100.0, delta=1e-5)
    ledger.record_release(round=0, noise_multiplier=2.0)
    before = path.read_bytes()
    assert b'"version":1' in before  # unchanged until the first distributed release
    ledger.record_release(round=1, noise_multiplier=2.0, local_noise_multiplier=1.0)
    assert ledger.local_spent() > ledger.spent() > 0
    assert ledger.exhausted is False
    reopened = PrivacyLedger.open(path)
    assert reopened.local_spent() == ledger.local_spent()
    assert reopened.recent_releases() == [(0, 2.0), (1, 2.0)]
    with pytest.raises(ValueError, match="one step"):
        ledger.record_release(
            round=2, noise_multiplier=2.0, local_noise_multiplier=1.0, sampling_rate=0.5
        )


def test_a_tampered_local_epsilon_is_detected(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger.create(path, epsilon_budget=100.0, delta=1e-5)
    ledger.record_release(round=0, noise_multiplier=3.0, local_noise_multiplier=1.5)
    data = path.read_bytes()
    body = json.loads(data[len(b'{"body":') : -len(',"sha256":""}\n') - 64])
    body["local_epsilon_spent"] = 0.01
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(raw).hexdigest().encode()
    path.write_bytes(b'{"body":' + raw + b',"sha256":"' + digest + b'"}\n')
    with pytest.raises(LedgerError, match="local_epsilon_spent"):
        PrivacyLedger.open(path)


# -- end to end -----------------------------------------------------------------------------


def test_distributed_dp_trains_real_nodes_and_records_both_guarantees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dp_level = "distributed": three real node processes add Skellam shares in the ring,
    the group of three carries the central noise, every ledger records both epsilons and
    the federation still learns."""
    from p2pfed.cli import main

    work = tmp_path / "fed"
    code = main(
        ["run", "--task", "p2pfed.tasks.digits:task", "--nodes", "3", "--rounds", "3",
         "--dir", str(work), "--no-mdns", "--timeout", "240", "--param", "dp_enabled=true",
         "--param", "dp_level=distributed", "--param", "dp_noise_multiplier=0.2",
         "--param", "dp_epsilon_budget=100000"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((work / "summary.json").read_text())
    cost = release_cost(ProtocolParams(dp_level="distributed", dp_noise_multiplier=0.2))
    assert cost.local_noise_multiplier is not None
    central = distributed_epsilon_for(cost.noise_multiplier, 3, 1e-5)
    local = distributed_epsilon_for(cost.local_noise_multiplier, 3, 1e-5)
    for row in summary["nodes_table"]:
        assert row["round"] == 3
        assert row["epsilon_spent"] == pytest.approx(central, rel=1e-9)
    for n in range(3):
        ledger = PrivacyLedger.open(work / f"node{n}" / "privacy-ledger.json")
        assert ledger.releases() == 3
        assert ledger.local_spent() == pytest.approx(local, rel=1e-9)
    assert summary["accuracy_min"] > 0.2  # chance is 0.1


def test_federation_new_calibrates_distributed_dp_and_makes_room_in_the_ring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pfed.cli import main
    from p2pfed.federation import load_federation

    path = tmp_path / "f.toml"
    argv = ["federation", "new", "lab", "-o", str(path), "--dp", "distributed"]
    assert main([*argv, "--epsilon", "8", "--rounds", "100"]) == 0
    out = capsys.readouterr().out
    params = load_federation(path).params
    assert params.dp_level == "distributed"
    assert params.dp_noise_multiplier == calibrate(
        "distributed", epsilon=8.0, delta=1e-5, rounds=100
    )
    assert params.clip == required_clip(1.0, params.dp_noise_multiplier, params.group_min)
    check_budget(params)  # the node's start-up check passes
    cost = release_cost(params)
    assert f"local epsilon {cost.epsilon(100, 1e-5, local=True):.3g}" in out
    assert cost.epsilon(100, 1e-5) <= 8.0
