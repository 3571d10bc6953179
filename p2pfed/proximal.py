"""FedProx's proximal term, for a task's training loop (Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020).

With non-IID data, many local steps pull each node's model towards its own optimum and
away from the others' ("client drift"). FedProx adds ``mu / 2 * ||w - w_global||^2`` to
the local loss, where ``w_global`` is the model the round started from: the gradient of
the term, ``mu * (w - w_global)``, pulls the weights back towards it. ``mu = 0`` is plain
FedAvg local training; Li et al. report ``mu`` in {0.001, 0.01, 0.1, 1} as useful, and 0.01
is a common first try.

In p2pfed the model the node puts into ``model`` before it calls the task's ``train`` *is*
``w_global`` (the round's start model: the last average, or the initial model). So take
the snapshot at the very start of ``train``, before any step, and add the term to every
mini-batch loss. Nothing else changes: the node still averages the trained models; with DP
on it still clips and noises ``trained - start``.

A complete ``train`` with FedProx (``[task] proximal_mu = 0.01`` in ``config.toml``)::

    import torch
    from p2pfed.proximal import ProximalTerm
    from p2pfed.task import TrainResult

    def train(self, model, data, config, generator, context):
        prox = ProximalTerm.from_config(model, config)  # snapshot of w_global, first
        opt = torch.optim.SGD(model.parameters(), lr=float(config.get("lr", 0.05)))
        x, y = data.train
        total = 0.0
        for batch in torch.randperm(len(y), generator=generator).split(32):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            total += loss.item() * len(batch)  # report the task's loss, without the term
            (loss + prox(model)).backward()
            opt.step()
        return TrainResult(samples=len(y), loss=total / len(y))

Example::

    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> prox = ProximalTerm(model, mu=0.5)
    >>> prox(model).item()  # zero at the start
    0.0
    >>> with torch.no_grad():
    ...     model.bias += 2.0
    >>> prox(model).item()  # 0.5 / 2 * 2.0**2
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from p2pfed.errors import ConfigError

__all__ = ["DEFAULT_MU", "ProximalTerm"]

DEFAULT_MU = 0.0
"""``mu`` when a task's config does not set ``proximal_mu``: FedProx off (plain FedAvg)."""


def _check_mu(mu: object, name: str) -> float:
    if isinstance(mu, bool) or not isinstance(mu, int | float) or not math.isfinite(mu) or mu < 0:
        raise ConfigError(
            f"{name} must be a finite number >= 0, got {mu!r}: it weighs FedProx's proximal "
            "term (0 disables it; 0.001 to 1 are usual, 0.01 is a good first try)"
        )
    return float(mu)


class ProximalTerm:
    """``mu / 2 * ||w - w_global||^2`` over a model's trainable parameters.

    Construct it with the model *before* training changes it: it keeps a detached copy of
    every parameter that requires a gradient (``w_global``). Calling it with the model
    returns the term as a 0-d tensor in the autograd graph, to add to the loss; with
    ``mu = 0`` it returns a constant zero and costs nothing.
    """

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        self.mu = _check_mu(mu, "mu")
        self._names = [name for name, p in model.named_parameters() if p.requires_grad]
        self._start = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    @classmethod
    def from_config(
        cls, model: torch.nn.Module, config: Mapping[str, Any], key: str = "proximal_mu"
    ) -> ProximalTerm:
        """The term with ``mu = config[key]`` (default :data:`DEFAULT_MU`, off).

        A bad value raises :class:`~p2pfed.errors.ConfigError` naming ``[task] key``.
        """
        mu = _check_mu(config.get(key, DEFAULT_MU), f"[task] {key}")
        return cls(model, mu)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        """The proximal term for the model's current parameters."""
        parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if [n for n, _ in parameters] != self._names:
            raise ValueError(
                "ProximalTerm called with a model whose trainable parameters differ from the "
                "one it was created with; create it from the same model at the start of train"
            )
        if self.mu == 0.0 or not parameters:
            return torch.zeros((), dtype=self._start[0].dtype if self._start else torch.float32)
        total = torch.zeros((), dtype=parameters[0][1].dtype, device=parameters[0][1].device)
        for (_, parameter), start in zip(parameters, self._start, strict=True):
            total = total + (parameter - start).pow(2).sum()
        return total * (self.mu / 2.0)
