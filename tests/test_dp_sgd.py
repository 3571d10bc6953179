"""Record-level DP: per-example gradients, DP-SGD, subsampled-Gaussian accounting, ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as GoogleRdpAccountant

from p2pfed.accountant import (
    DEFAULT_ORDERS,
    RdpAccountant,
    epsilon_for,
    noise_multiplier_for,
    sampled_gaussian_rdp,
)
from p2pfed.dp_sgd import _cross_entropy, dp_sgd, per_sample_gradients
from p2pfed.errors import ConfigError
from p2pfed.ledger import PrivacyLedger, ledger_path
from p2pfed.tasks.digits_cnn import task as digits_cnn


def _google_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    acc = GoogleRdpAccountant(list(DEFAULT_ORDERS))
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(
    ("z", "q", "steps", "delta"),
    [
        (1.1, 0.01, 1000, 1e-5),
        (0.8, 0.05, 500, 1e-5),
        (2.0, 0.002, 20_000, 1e-6),
        (1.14, 0.02, 5000, 1e-5),
        (4.0, 0.3, 100, 1e-3),
        (0.6, 0.001, 300, 1e-5),
    ],
)
def test_epsilon_matches_dp_accounting(z: float, q: float, steps: int, delta: float) -> None:
    ours = epsilon_for(z, steps, delta, sampling_rate=q)
    google = _google_epsilon(z, q, steps, delta)
    assert ours == pytest.approx(google, rel=0.01)  # the bar; in fact ~1e-9


def test_sampled_rdp_matches_dp_accounting_order_by_order() -> None:
    from dp_accounting.rdp.rdp_privacy_accountant import (
        _compute_rdp_poisson_subsampled_gaussian as google_rdp,
    )

    ours = sampled_gaussian_rdp(1.0, 0.02)
    theirs = np.asarray(google_rdp(0.02, 1.0, DEFAULT_ORDERS))
    assert np.allclose(ours, theirs, rtol=1e-8, atol=0)


def test_sampling_rate_one_is_the_plain_gaussian() -> None:
    assert np.array_equal(
        sampled_gaussian_rdp(1.7, 1.0), np.asarray(DEFAULT_ORDERS) / (2 * 1.7 * 1.7)
    )
    a, b = RdpAccountant(), RdpAccountant()
    a.add_gaussian(1.7, 5)
    b.add_sampled_gaussian(1.7, 1.0, 5)
    assert a.epsilon(1e-5) == b.epsilon(1e-5)


def test_subsampling_amplifies() -> None:
    assert epsilon_for(1.0, 100, 1e-5, sampling_rate=0.01) < epsilon_for(1.0, 100, 1e-5) / 10


def test_noise_multiplier_for_a_sampled_target() -> None:
    z = noise_multiplier_for(3.0, 2000, 1e-5, sampling_rate=0.02)
    assert epsilon_for(z, 2000, 1e-5, 0.02) <= 3.0
    assert epsilon_for(z * 0.999, 2000, 1e-5, 0.02) > 3.0
    assert _google_epsilon(z, 0.02, 2000, 1e-5) == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan])
def test_bad_sampling_rate_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="sampling_rate"):
        sampled_gaussian_rdp(1.0, bad)


def test_per_sample_gradients_match_a_loop_of_single_examples() -> None:
    torch.manual_seed(0)
    model = digits_cnn.build_model({"seed": 3})
    x, y = torch.randn(20, 64), torch.randint(0, 10, (20,))
    grads = per_sample_gradients(model, _cross_entropy, x, y)
    for i in range(len(x)):
        model.zero_grad()
        _cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None
            torch.testing.assert_close(grads[name][i], parameter.grad, rtol=1e-5, atol=1e-6)


def test_dp_sgd_clips_each_example() -> None:
    # with almost no noise, one step moves the model by at most lr * C * batch / (q n)
    model = torch.nn.Linear(4, 3)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    x, y = torch.randn(50, 4) * 1000, torch.randint(0, 3, (50,))  # huge gradients
    dp_sgd(
        model,
        (x, y),
        steps=1,
        sampling_rate=1.0,
        clip_norm=0.5,
        noise_multiplier=1e-9,
        lr=1.0,
        rng=np.random.default_rng(1),
    )
    moved = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - start
    assert float(moved.norm()) <= 0.5 * 50 / 50 + 1e-5


def test_dp_sgd_learns_a_separable_problem() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=generator)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(2, 2)
    report = dp_sgd(
        model,
        (x, y),
        steps=100,
        sampling_rate=0.05,
        clip_norm=1.0,
        noise_multiplier=1.0,
        lr=0.5,
        rng=np.random.default_rng(2),
    )
    assert report.steps == 100 and report.samples > 0
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.9


def test_dp_sgd_refuses_batch_norm() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match="BatchNorm1d"):
        dp_sgd(
            model,
            (torch.zeros(8, 2), torch.zeros(8, dtype=torch.long)),
            steps=1,
            sampling_rate=0.5,
            clip_norm=1.0,
            noise_multiplier=1.0,
            lr=0.1,
            rng=np.random.default_rng(0),
        )


def test_dp_sgd_needs_tensor_pairs() -> None:
    with pytest.raises(ConfigError, match="tuple"):
        dp_sgd(
            torch.nn.Linear(2, 2),
            torch.zeros(8, 2),
            steps=1,
            sampling_rate=0.5,
            clip_norm=1.0,
            noise_multiplier=1.0,
            lr=0.1,
            rng=np.random.default_rng(0),
        )


def test_ledger_records_dp_sgd_steps(tmp_path: Path) -> None:
    path = ledger_path(tmp_path)
    ledger = PrivacyLedger.create(path, epsilon_budget=8.0, delta=1e-5)
    for r in range(3):
        ledger.record_release(round=r, noise_multiplier=1.14, sampling_rate=0.02, steps=50)
    assert ledger.releases() == 3 and ledger.steps() == 150
    expected = epsilon_for(1.14, 150, 1e-5, sampling_rate=0.02)
    assert ledger.spent() == pytest.approx(expected, rel=1e-12)
    body = json.loads(path.read_bytes())["body"]
    assert body["version"] == 2 and body["releases"] == 3
    assert body["by_noise_multiplier"] == [
        {"count": 150, "noise_multiplier": 1.14, "sampling_rate": 0.02}
    ]
    assert body["recent"][-1] == {
        "noise_multiplier": 1.14,
        "round": 2,
        "sampling_rate": 0.02,
        "steps": 50,
    }
    again = PrivacyLedger.open(path)
    assert again.releases() == 3 and again.steps() == 150 and again.spent() == ledger.spent()
    assert again.last_release() == (2, 1.14, 0.02, 50)
    # 3 of the default federation's 100 rounds spent: the next one fits
    assert not again.would_exceed(1.14, 0.02, 50)


def test_ledger_mixing_node_and_record_releases(tmp_path: Path) -> None:
    ledger = PrivacyLedger.create(ledger_path(tmp_path), epsilon_budget=50.0, delta=1e-5)
    ledger.record_release(round=0, noise_multiplier=5.0)
    ledger.record_release(round=1, noise_multiplier=1.0, sampling_rate=0.01, steps=100)
    acc = RdpAccountant()
    acc.add_gaussian(5.0)
    acc.add_sampled_gaussian(1.0, 0.01, 100)
    assert ledger.spent() == pytest.approx(acc.epsilon(1e-5)[0], rel=1e-12)
    assert PrivacyLedger.open(ledger.path).spent() == pytest.approx(ledger.spent(), rel=1e-12)


def test_a_step_release_without_sampling_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger.create(ledger_path(tmp_path), epsilon_budget=50.0, delta=1e-5)
    with pytest.raises(ValueError, match="one step"):
        ledger.record_release(round=0, noise_multiplier=5.0, steps=2)
