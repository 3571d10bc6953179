"""A benchmark task: one flat float32 parameter tensor of any size, and no data.

Used by :mod:`bench.allreduce` (node processes load it as ``bench.bigmodel:task``, run with
the repository root as working directory and on ``PYTHONPATH``). Only the group all-reduce
matters there, so the task is as cheap as a task can be:

* the model is one parameter of ``size`` values (task setting, default 10**7), uniform in
  [-1, 1) and seeded per node by the setting ``init`` (default: the federation seed), so
  that averaging has something to average;
* ``load_data`` returns no data but counts ``samples`` training examples (default 100): in
  a federation without DP that count is the node's averaging weight, and a 32-bit ring
  caps weights at 256 (:data:`p2pfed.fixedpoint.MAX_WEIGHT`);
* ``train`` does nothing (the benchmark runs with training off) and ``evaluate`` reports
  zeros.

Example::

    >>> model = task.build_model({"size": 5, "init": 1})
    >>> sum(p.numel() for p in model.parameters())
    5
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from p2pfed.errors import ConfigError
from p2pfed.task import NodeData, RoundContext, TrainResult

__all__ = ["DEFAULT_SAMPLES", "DEFAULT_SIZE", "MAX_SIZE", "BigModelTask", "task"]

DEFAULT_SIZE = 10_000_000
DEFAULT_SAMPLES = 100
MAX_SIZE = 1 << 30
"""Refuse models over 4 GiB of float32 (a typo in ``size`` should not exhaust memory)."""


class _FlatModel(torch.nn.Module):
    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.flat = torch.nn.Parameter(values)


def _int_setting(config: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"bench.bigmodel: task setting {key} must be an integer in [{low}, {high}], "
            f"got {value!r}"
        )
    return value


class BigModelTask:
    """See the module docstring; settings ``size``, ``init``, ``samples``."""

    name = "p2pfed-bench-bigmodel-v1"

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        size = _int_setting(config, "size", DEFAULT_SIZE, 1, MAX_SIZE)
        seed = _int_setting(config, "init", int(config.get("seed", 0)), 0, 2**63 - 1)
        generator = torch.Generator().manual_seed(seed)
        values = torch.rand(size, generator=generator, dtype=torch.float32)
        return _FlatModel(values.mul_(2.0).sub_(1.0))

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        samples = _int_setting(config, "samples", DEFAULT_SAMPLES, 1, 256)
        return NodeData(train=None, test=None, num_train=samples, num_test=0)

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext | None = None,
    ) -> TrainResult:
        return TrainResult(samples=0, loss=0.0)

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        return {"accuracy": 0.0, "loss": 0.0}


task = BigModelTask()
