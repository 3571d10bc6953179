"""The cross-device task of ``python -m bench.privacy``, as a p2pfed task for simnet.

Many nodes with a little data each: a generated 10-class problem (class centres in 20
dimensions, Gaussian noise of spread 1.6 around them), each node's labels skewed by its
own Dirichlet(1) mix of the classes, and a linear model (``Linear(20, 10)``, 210
parameters, starting at zero). This module is the *one* place the data comes from: the
benchmark's framework-free replay and its simnet runs call the same functions, so they see
the same records.

Everything derives from ``data_seed`` and the node's index alone (not from the order in
which nodes draw), so a node in a simnet process and the replay in another agree, and every
node holds the same test set (``test_records`` draws, shared by the whole federation). The
record-level part of the benchmark uses the same generator with more records per node.

Settings (``[task.settings]``): ``data_seed`` (default 0), ``records`` (per node, default
100), ``test_records`` (default 5000), ``batch`` (default 20) and ``lr`` (default 0.5):
local training is one epoch of mini-batch SGD a round, and record-level DP uses ``lr`` as
its DP-SGD step (p2pfed.task). The node adds ``node_index``.

Use it in a scenario as ``[task] name = "bench._crossdevice_task:task"`` (run from the
repository root, so that ``bench`` is importable).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from p2pfed.task import NodeData, RoundContext, TrainResult

__all__ = [
    "CLASSES",
    "FEATURES",
    "CrossDeviceTask",
    "centres",
    "node_records",
    "task",
    "test_records",
]

CLASSES = 10
FEATURES = 20
SPREAD = 1.6
"""Standard deviation of the records around their class centre."""
# stream labels: the centres, each node's records and the test set draw from distinct
# streams of one seed, so none depends on how many of the others were drawn before it
_CENTRES, _NODE, _TEST = 0, 1, 2


@functools.lru_cache(maxsize=8)
def centres(seed: int) -> np.ndarray:
    """The ``(CLASSES, FEATURES)`` class centres of data seed ``seed``."""
    return np.random.default_rng([seed, _CENTRES]).normal(0.0, 1.0, (CLASSES, FEATURES))


def _sample(
    seed: int, labels: np.ndarray, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    x = centres(seed)[labels] + rng.normal(0.0, SPREAD, (len(labels), FEATURES))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)


def node_records(seed: int, index: int, records: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node ``index``'s ``records`` training records: labels from its own Dirichlet(1) mix
    of the classes (label skew between nodes)."""
    rng = np.random.default_rng([seed, _NODE, index])
    mix = rng.dirichlet(np.ones(CLASSES))
    return _sample(seed, rng.choice(CLASSES, size=records, p=mix), rng)


@functools.lru_cache(maxsize=4)
def test_records(seed: int, count: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set every node (and the benchmark) evaluates on: balanced labels."""
    rng = np.random.default_rng([seed, _TEST])
    return _sample(seed, rng.integers(0, CLASSES, count), rng)


def _int_setting(config: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"[task] {key} must be an integer >= {low}, got {value!r}")
    return value


class CrossDeviceTask:
    """See the module docstring."""

    name = "bench-crossdevice-linear-v1"

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        model = torch.nn.Linear(FEATURES, CLASSES)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()  # the same start on every node, as the replay's
        return model

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        seed = _int_setting(config, "data_seed", 0, 0)
        records = _int_setting(config, "records", 100, 1)
        test = test_records(seed, _int_setting(config, "test_records", 5000, 1))
        train = node_records(seed, _int_setting(config, "node_index", 0, 0), records)
        return NodeData(train=train, test=test, num_train=records, num_test=len(test[1]))

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext | None = None,
    ) -> TrainResult:
        x, y = data.train
        batch = _int_setting(config, "batch", 20, 1)
        lr = float(config.get("lr", 0.5))
        parameters = list(model.parameters())
        total = 0.0
        # plain SGD by hand: constructing a torch.optim.SGD costs ~0.1 s of CPU (its
        # first-use machinery), which a 1,000-node simulation would pay every round
        for index in torch.randperm(len(y), generator=generator).split(batch):
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            grads = torch.autograd.grad(loss, parameters)
            with torch.no_grad():
                for parameter, grad in zip(parameters, grads, strict=True):
                    parameter.sub_(lr * grad)
            total += float(loss.detach()) * len(index)
        return TrainResult(samples=len(y), loss=total / len(y))

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        x, y = data.test
        with torch.no_grad():
            logits = model(x)
            return {
                "accuracy": float((logits.argmax(1) == y).float().mean()),
                "loss": float(torch.nn.functional.cross_entropy(logits, y)),
            }


task = CrossDeviceTask()
