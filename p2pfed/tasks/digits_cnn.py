"""A small CNN on scikit-learn's bundled digits, split non-IID: the learning-quality task.

Where :mod:`p2pfed.tasks.digits` is the demo (an MLP, local SGD with momentum), this task is
built to be *replayed*: a framework-free FedAvg simulation (``bench/convergence.py``), or a
Flower client, can train exactly the same local steps as a p2pfed node, so that any
difference in accuracy comes from the averaging, not from the data or the batches.

Rules of this file:

* **Data.** The 1797 8x8 images of ``sklearn.datasets.load_digits`` (read from the file
  scikit-learn ships, without importing scikit-learn; see :mod:`p2pfed.tasks.digits`).
  The held-out test set is that module's fixed stratified 20%
  (:func:`~p2pfed.tasks.digits.split_indices`): the *same* 359 images for every node, every
  partition and the centralized baseline, so accuracies are comparable. Only the other
  80% (the training pool) is partitioned.
* **Partition.** ``partition`` chooses a :mod:`p2pfed.partition` scheme over the training
  pool: ``"dirichlet"`` (default, label skew ``alpha``, default 0.5), ``"iid"`` or
  ``"shards"`` (``shards_per_node`` label shards). The split is a function of ``seed``,
  ``num_nodes`` and those settings only; node ``node_index`` takes its part.
* **Model.** Conv(1->8, 3x3) - ReLU - MaxPool(2) - Conv(8->16, 3x3) - ReLU - MaxPool(2) -
  Linear(64->32) - ReLU - Linear(32->10): 3,658 parameters, no buffers, initialised from
  ``seed`` with a local generator (torch's default bounds, +-1/sqrt(fan_in)).
* **Batch order.** Local training draws its mini-batch order from a ``torch.Generator``
  seeded with :func:`batch_seed` ``(seed, node_index, context.round)``, *not* from the
  ``generator`` the node passes in: anyone who knows the settings can replay the batches of
  node ``k`` in round ``r``. (This is no secret: the batch order is not private data.)
* **Training.** Plain SGD (``momentum`` 0 by default) for ``local_epochs`` passes with
  ``batch_size`` and ``lr``; the optimizer state is fresh every round. Torch runs on one
  thread, so a node process and a replay in another process compute the same floats.

``config`` keys (the ``[task]`` table; a runner sets the first three):

=====================  ==============  ==================================================
key                    default         meaning
=====================  ==============  ==================================================
``node_index``         required        this node's part, ``0 <= node_index < num_nodes``
``num_nodes``          required        number of parts the training pool is split into
``seed``               0               partition, initial model and batch orders
``partition``          ``"dirichlet"`` ``"dirichlet"``, ``"iid"`` or ``"shards"``
``alpha``              0.5             Dirichlet concentration (smaller = more skewed)
``shards_per_node``    2               label shards per node (``"shards"`` only)
``min_size``           8               fewest training images a Dirichlet part may get
``lr``                 0.1             SGD learning rate
``momentum``           0.0             SGD momentum within one round's local training
``local_epochs``       1               passes over the local data per round
``batch_size``         16              mini-batch size
=====================  ==============  ==================================================

Example::

    >>> from p2pfed.tasks.digits_cnn import task
    >>> from p2pfed.task import RoundContext
    >>> import torch
    >>> config = {"node_index": 0, "num_nodes": 16, "seed": 1}
    >>> data = task.load_data(config)
    >>> data.num_test
    359
    >>> model = task.build_model(config)
    >>> sum(p.numel() for p in model.parameters())
    3658
    >>> result = task.train(model, data, config, torch.Generator(), RoundContext(0, 0))
    >>> result.samples == data.num_train
    True
    >>> sorted(task.evaluate(model, data, config))
    ['accuracy', 'loss']
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from p2pfed import partition as partitioners
from p2pfed.errors import ConfigError
from p2pfed.task import NodeData, RoundContext, TrainResult
from p2pfed.tasks.digits import load_arrays, split_indices

__all__ = [
    "CENTRAL",
    "DEFAULTS",
    "PARTITIONS",
    "TASK_NAME",
    "DigitsCnnTask",
    "batch_seed",
    "node_parts",
    "sgd_epochs",
    "task",
]

TASK_NAME = "p2pfed-digits-cnn-v1"
PARTITIONS = ("dirichlet", "iid", "shards")
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "partition": "dirichlet",
    "alpha": 0.5,
    "shards_per_node": 2,
    "min_size": 8,
    "lr": 0.1,
    "momentum": 0.0,
    "local_epochs": 1,
    "batch_size": 16,
}
"""The settings a ``config`` does not set."""

_CLASSES = 10
_BATCH_SEED_DOMAIN = b"p2pfed-digits-cnn-batches:v1\x00"
CENTRAL = -1
"""The ``node_index`` :func:`batch_seed` uses for the centralized baseline's batches."""


def batch_seed(seed: int, node_index: int, round: int) -> int:
    """The seed of node ``node_index``'s batch order in federation round ``round`` (from 0).

    A hash, so that nearby arguments give unrelated generators; 63 bits, as
    ``torch.Generator.manual_seed`` takes.

    >>> batch_seed(0, 3, 7) == batch_seed(0, 3, 7) != batch_seed(0, 3, 8)
    True
    """
    text = f"{int(seed)}:{int(node_index)}:{int(round)}".encode()
    digest = hashlib.sha256(_BATCH_SEED_DOMAIN + text).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _setting(config: Mapping[str, Any], key: str) -> Any:
    if key in config:
        return config[key]
    if key in DEFAULTS:
        return DEFAULTS[key]
    raise ConfigError(
        f"the digits-cnn task needs the setting {key!r}: put {key} = N in the [task] table "
        f"of the node's config.toml, or pass --set {key}=N (p2pfed run sets node_index and "
        "num_nodes itself)"
    )


def _int(config: Mapping[str, Any], key: str, low: int) -> int:
    value = _setting(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"[task] {key} must be an integer >= {low}, got {value!r}")
    return value


def _float(config: Mapping[str, Any], key: str, low: float, *, strict: bool = False) -> float:
    value = _setting(config, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"[task] {key} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        bound = ">" if strict else ">="
        raise ConfigError(f"[task] {key} must be a finite number {bound} {low}, got {value!r}")
    return value


def node_parts(config: Mapping[str, Any]) -> list[np.ndarray]:
    """Every node's training images (indices into :func:`~p2pfed.tasks.digits.load_arrays`),
    as ``config`` splits the training pool: one sorted array per node, covering the pool.

    >>> parts = node_parts({"num_nodes": 4, "seed": 0})
    >>> sum(len(p) for p in parts)
    1438
    """
    num_nodes = _int(config, "num_nodes", 1)
    seed = _int(config, "seed", 0)
    scheme = _setting(config, "partition")
    pool, _ = split_indices()
    labels = load_arrays()[1][pool]
    if scheme == "dirichlet":
        alpha = _float(config, "alpha", 0.0, strict=True)
        parts = partitioners.dirichlet(
            labels, num_nodes, alpha, seed, min_size=_int(config, "min_size", 1)
        )
    elif scheme == "iid":
        parts = partitioners.iid(labels, num_nodes, seed)
    elif scheme == "shards":
        parts = partitioners.shards(labels, num_nodes, _int(config, "shards_per_node", 1), seed)
    else:
        raise ConfigError(
            f"[task] partition must be one of {', '.join(map(repr, PARTITIONS))}, got {scheme!r}"
        )
    return [pool[p] for p in parts]


def _data(train_indices: np.ndarray) -> NodeData:
    images, labels = load_arrays()
    _, test = split_indices()
    return NodeData(
        train=(
            torch.from_numpy(images[train_indices].copy()),
            torch.from_numpy(labels[train_indices].copy()),
        ),
        test=(torch.from_numpy(images[test].copy()), torch.from_numpy(labels[test].copy())),
        num_train=len(train_indices),
        num_test=len(test),
    )


@torch.no_grad()
def _sgd_step(
    parameters: Sequence[torch.Tensor],
    velocity: list[torch.Tensor | None],
    lr: float,
    momentum: float,
) -> None:
    """``torch.optim.SGD``'s update, written out: ``torch.optim`` imports TorchDynamo on its
    first step (~70 MB in every node process) for nothing this model needs."""
    for index, parameter in enumerate(parameters):
        grad = parameter.grad
        if grad is None:
            continue
        if momentum:
            buffer = velocity[index]
            if buffer is None:
                buffer = velocity[index] = grad.clone()
            else:
                buffer.mul_(momentum).add_(grad)
            grad = buffer
        parameter.add_(grad, alpha=-lr)


def sgd_epochs(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
) -> tuple[int, float]:
    """``epochs`` passes of mini-batch SGD over ``(x, y)`` in the order ``generator`` draws;
    returns the examples seen and their mean cross-entropy."""
    torch.set_num_threads(1)
    parameters = [p for p in model.parameters() if p.requires_grad]
    velocity: list[torch.Tensor | None] = [None] * len(parameters)
    model.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(batch_size):
            for parameter in parameters:
                parameter.grad = None
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            _sgd_step(parameters, velocity, lr, momentum)
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
    return seen, (total / seen if seen else 0.0)


class DigitsCnnTask:
    """The task of the module docstring; ``p2pfed.tasks.digits_cnn:task`` is an instance."""

    name = TASK_NAME

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        """The CNN (3,658 parameters), initialised from ``config["seed"]``."""
        generator = torch.Generator().manual_seed(_int(config, "seed", 0))
        model = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8, 8)),
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(64, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, _CLASSES),
        )
        with torch.no_grad():
            for layer in model:
                if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
                    fan_in = layer.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    torch.nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
                    assert layer.bias is not None
                    torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        return model

    def node_indices(self, config: Mapping[str, Any]) -> np.ndarray:
        """Indices (into :func:`~p2pfed.tasks.digits.load_arrays`) of this node's images."""
        num_nodes = _int(config, "num_nodes", 1)
        node_index = _int(config, "node_index", 0)
        if node_index >= num_nodes:
            raise ConfigError(
                f"[task] node_index must be < num_nodes ({num_nodes}), got {node_index}"
            )
        return node_parts(config)[node_index]

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        """This node's part of the training pool and the common held-out test set."""
        return _data(self.node_indices(config))

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext,
    ) -> TrainResult:
        """SGD for ``local_epochs`` passes in the batch order of :func:`batch_seed`
        ``(seed, node_index, context.round)``; ``generator`` is not used (module docstring)."""
        del generator  # the batch order must be replayable from the settings alone
        order = torch.Generator().manual_seed(
            batch_seed(_int(config, "seed", 0), _int(config, "node_index", 0), context.round)
        )
        x, y = data.train
        seen, loss = sgd_epochs(
            model,
            x,
            y,
            lr=_float(config, "lr", 0.0, strict=True),
            momentum=self._momentum(config),
            batch_size=_int(config, "batch_size", 1),
            epochs=_int(config, "local_epochs", 1),
            generator=order,
        )
        return TrainResult(samples=seen, loss=loss)

    @staticmethod
    def _momentum(config: Mapping[str, Any]) -> float:
        momentum = _float(config, "momentum", 0.0)
        if momentum >= 1.0:
            raise ConfigError(f"[task] momentum must be < 1, got {momentum}")
        return momentum

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        """Accuracy (fraction correct) and mean cross-entropy on the common test set."""
        torch.set_num_threads(1)
        x, y = data.test
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            accuracy = float((logits.argmax(dim=1) == y).double().mean())
        return {"accuracy": accuracy, "loss": loss}

    def centralized_baseline(
        self, config: Mapping[str, Any], epochs: int, *, every: int = 0
    ) -> list[dict[str, float]]:
        """The same initial model trained on the union of all nodes' data for ``epochs``.

        The union is the whole training pool (the parts cover it); batches are drawn from
        :func:`batch_seed` ``(seed, CENTRAL, epoch)``, with the nodes' ``lr``, ``momentum``
        and ``batch_size``. Returns the test metrics (with ``"epoch"``) after every
        ``every``-th epoch (0: only the last).
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        pool, _ = split_indices()
        data = _data(pool)
        model = self.build_model(config)
        seed = _int(config, "seed", 0)
        x, y = data.train
        history = []
        for epoch in range(epochs):
            sgd_epochs(
                model,
                x,
                y,
                lr=_float(config, "lr", 0.0, strict=True),
                momentum=self._momentum(config),
                batch_size=_int(config, "batch_size", 1),
                epochs=1,
                generator=torch.Generator().manual_seed(batch_seed(seed, CENTRAL, epoch)),
            )
            if (every and (epoch + 1) % every == 0) or epoch + 1 == epochs:
                history.append({"epoch": float(epoch + 1), **self.evaluate(model, data, config)})
        return history


task = DigitsCnnTask()
"""The task instance the setting ``task = "p2pfed.tasks.digits_cnn:task"`` names."""
