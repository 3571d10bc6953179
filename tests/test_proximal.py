"""FedProx's proximal term: value, gradient, disabled at mu = 0, config errors."""

from __future__ import annotations

import pytest
import torch

from p2pfed.errors import ConfigError
from p2pfed.proximal import ProximalTerm


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_zero_at_the_start_with_zero_gradient() -> None:
    net = model()
    prox = ProximalTerm(net, mu=0.1)
    term = prox(net)
    assert term.item() == 0.0
    term.backward()
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())


def test_gradient_is_mu_times_the_distance_to_the_start() -> None:
    net = model()
    start = [p.detach().clone() for p in net.parameters()]
    prox = ProximalTerm(net, mu=0.3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    term = prox(net)
    term.backward()
    distance = sum(
        ((p.detach() - s) ** 2).sum().item() for p, s in zip(net.parameters(), start, strict=True)
    )
    expected = 0.3 / 2 * distance
    assert term.item() == pytest.approx(expected, rel=1e-6)
    for p, s in zip(net.parameters(), start, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, 0.3 * (p.detach() - s))


def test_the_term_pulls_training_back_towards_the_start() -> None:
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(2))

    def drift(mu: float) -> float:
        net = model()
        start = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        prox = ProximalTerm(net, mu)
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        for _ in range(50):
            opt.zero_grad()
            (torch.nn.functional.cross_entropy(net(x), y) + prox(net)).backward()
            opt.step()
        return float((torch.cat([p.detach().flatten() for p in net.parameters()]) - start).norm())

    assert drift(1.0) < 0.8 * drift(0.0)


def test_mu_zero_disables_it() -> None:
    net = model()
    prox = ProximalTerm(net, mu=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    term = prox(net)
    assert term.item() == 0.0 and not term.requires_grad
    assert ProximalTerm.from_config(net, {}).mu == 0.0


def test_from_config() -> None:
    net = model()
    assert ProximalTerm.from_config(net, {"proximal_mu": 0.01}).mu == 0.01
    assert ProximalTerm.from_config(net, {"mu": 2}, key="mu").mu == 2.0


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_bad_mu_is_a_config_error(mu: object) -> None:
    with pytest.raises(ConfigError, match="mu must be a finite number >= 0"):
        ProximalTerm(model(), mu)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\[task\] proximal_mu must be"):
        ProximalTerm.from_config(model(), {"proximal_mu": mu})


def test_another_model_is_refused() -> None:
    prox = ProximalTerm(model(), 0.1)
    with pytest.raises(ValueError, match="same model"):
        prox(torch.nn.Linear(4, 2))
