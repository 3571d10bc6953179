"""simnet's built-in ``tiny`` task: one parameter vector per node, for protocol studies.

Each node's initial vector is drawn from ``seed`` and its ``node_index`` (so pure averaging
has something to average) and its sample count, hence its averaging weight, from
``samples`` (one number for everyone) or from ``samples_min``/``samples_max`` by node
index. Training moves every parameter halfway towards the node's target; evaluation
reports the mean squared distance to ``target`` as ``loss``. Settings
(``[task.settings]``): ``params`` (vector length, default 100), ``samples`` /
``samples_min`` / ``samples_max``, ``target`` (default 0.5), ``target_spread`` (default 0:
every node's target is ``target``; else node ``i``'s target is ``target`` plus a value in
``[-spread/2, spread/2]`` drawn from ``i``, so that how nodes are weighted shows in the
result), ``scale`` (spread of the initial values, default 1.0).

Example::

    >>> model = task.build_model({"params": 4, "node_index": 0, "seed": 1})
    >>> sum(p.numel() for p in model.parameters())
    4
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from p2pfed.task import NodeData, RoundContext, TrainResult

__all__ = ["BUILTIN_TASKS", "TinyTask", "samples_of", "target_of", "task"]

BUILTIN_TASKS = {"tiny": "simnet.tasks:task", "digits": "p2pfed.tasks.digits:task"}


class _Vector(torch.nn.Module):
    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = torch.nn.Parameter(values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.values


def samples_of(config: Mapping[str, Any]) -> int:
    """The training-set size of the node ``config`` describes (its averaging weight)."""
    if "samples" in config:
        return int(config["samples"])
    low = int(config.get("samples_min", 10))
    high = int(config.get("samples_max", low))
    if high < low:
        raise ValueError(f"samples_max ({high}) is below samples_min ({low})")
    index = int(config.get("node_index", 0))
    return low + (index * 2654435761) % (high - low + 1)  # Knuth's multiplicative spread


def target_of(config: Mapping[str, Any]) -> float:
    """The value the node ``config`` describes trains its parameters towards."""
    target = float(config.get("target", 0.5))
    spread = float(config.get("target_spread", 0.0))
    index = int(config.get("node_index", 0))
    return target + spread * (((index * 7919) % 101) / 100 - 0.5)


class TinyTask:
    """See the module docstring."""

    name = "simnet-tiny-v1"

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        size = int(config.get("params", 100))
        if not 1 <= size <= 100_000_000:
            raise ValueError(f"params must be between 1 and 100000000, got {size}")
        seed = int(config.get("seed", 0)) * 1_000_003 + int(config.get("node_index", 0))
        generator = torch.Generator().manual_seed(seed)
        scale = float(config.get("scale", 1.0))
        return _Vector(scale * torch.randn(size, generator=generator))

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        samples = samples_of(config)
        x = torch.ones(1, 1)
        return NodeData(train=x, test=x, num_train=samples, num_test=samples)

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext | None = None,
    ) -> TrainResult:
        target = target_of(config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(0.5).add_(0.5 * target)
        return TrainResult(samples=data.num_train, loss=0.0)

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        target = float(config.get("target", 0.5))
        values = torch.cat([p.detach().flatten() for p in model.parameters()])
        return {"loss": float(((values - target) ** 2).mean())}


task = TinyTask()
