"""The built-in demo task: handwritten digits (scikit-learn's bundled 8x8 images), non-IID.

The data set is ``sklearn.datasets.load_digits``: 1797 grey-scale 8x8 images of the digits
0-9, shipped inside scikit-learn (``pip install 'p2pfed[demo]'``), so nothing is
downloaded at run time. Pixels (0..16) are scaled to [0, 1].

Rules of this file:

* **Test set.** A fixed, stratified 20% of the images (:func:`split_indices`, seed
  :data:`TEST_SPLIT_SEED`, independent of any configuration) is the held-out test set of
  *every* node and of :meth:`DigitsTask.centralized_baseline`, so accuracies are
  comparable across nodes and with the baseline.
* **Non-IID training data.** The other 80% (the *training pool*, 1438 images) is split
  among ``num_nodes`` nodes by :func:`partition`: for each digit, node proportions are
  drawn from a symmetric Dirichlet(``alpha``) distribution (default alpha 0.5: strong
  label skew, each node sees a few digits often and others rarely or never) and that
  digit's images are dealt out accordingly. The draw is repeated until every node has at
  least :data:`MIN_SAMPLES_PER_NODE` images. It depends only on ``seed``, ``num_nodes`` and
  ``alpha``, so all nodes of a demo compute the same split and each takes part
  ``node_index``. Parts are disjoint and cover the training pool.
* **Model.** An MLP 64-32-10 with ReLU (2410 parameters), initialised from ``seed`` with a
  local generator, so every node starts from the same model.
* **Training.** Local SGD (momentum 0.9) over shuffled mini-batches drawn from the
  ``torch.Generator`` the node passes in; deterministic given that generator. Torch uses
  the node's ``torch_threads`` (config.toml; 1 by default) and ``config["device"]``
  (config.toml's ``device``; the model and each batch are moved there).

``config`` keys (the ``[task]`` table of config.toml; ``p2pfed run`` and the demo write the
first two, the node sets ``seed`` from the federation unless it is set):

========================  ==========  ===============================================
key                       default     meaning
========================  ==========  ===============================================
``node_index``            required    this node's part, ``0 <= node_index < num_nodes``
``num_nodes``             required    number of parts the training pool is split into
``seed``                  0           seed of the partition and of the initial model
``dirichlet_alpha``       0.5         label skew (smaller = more skewed)
``lr``                    see below   SGD learning rate
``momentum``              see below   SGD momentum (the optimizer is fresh every round)
``local_epochs``          see below   passes over the local data per round
``batch_size``            see below   mini-batch size
========================  ==========  ===============================================

The training defaults (:data:`DEFAULT_TRAINING`) were calibrated with an offline
federated-averaging simulation (``tests/test_tasks.py``): 4 nodes, every node trains from
the global model each round, the models are averaged weighted by ``num_train``; after
:data:`CALIBRATED_ROUNDS` rounds every node's model is within 3 accuracy points of the
centralized baseline.

Example::

    >>> from p2pfed.tasks.digits import task
    >>> import torch
    >>> config = {"node_index": 0, "num_nodes": 4, "seed": 1}
    >>> data = task.load_data(config)
    >>> model = task.build_model(config)
    >>> result = task.train(model, data, config, torch.Generator().manual_seed(0))
    >>> sorted(task.evaluate(model, data, config))
    ['accuracy', 'loss']
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfed import partition as partitioners
from p2pfed.errors import ConfigError
from p2pfed.task import NodeData, RoundContext, TrainResult

__all__ = [
    "CALIBRATED_ROUNDS",
    "DEFAULT_ALPHA",
    "DEFAULT_TRAINING",
    "MIN_SAMPLES_PER_NODE",
    "TEST_FRACTION",
    "TEST_SPLIT_SEED",
    "DigitsTask",
    "load_arrays",
    "partition",
    "split_indices",
    "task",
]

TASK_NAME = "p2pfed-digits-mlp-v1"
TEST_FRACTION = 0.2
"""Fraction of each digit's images held out as the common test set."""
TEST_SPLIT_SEED = 20240601
"""Seed of the held-out split: a constant, so every node and the baseline agree."""
DEFAULT_ALPHA = 0.5
"""Dirichlet concentration of the non-IID label split."""
MIN_SAMPLES_PER_NODE = 10
"""Every node gets at least this many training images."""

DEFAULT_TRAINING: dict[str, float | int] = {
    "lr": 0.1,
    "momentum": 0.9,
    "local_epochs": 3,
    "batch_size": 32,
}
"""Training hyper-parameters used when ``config`` does not set them (calibrated)."""
CALIBRATED_ROUNDS = 17
"""Rounds of 4-node federated averaging after which the calibration test checks accuracy."""

_HIDDEN = 32
_INPUTS = 64
_CLASSES = 10


def _digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn.

    ``sklearn.datasets.load_digits`` reads this very file; importing scikit-learn (and with
    it SciPy) would add ~70 MB to every node process for nothing else.
    """
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):  # ValueError: a stub in sys.modules without a spec
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the digits demo task needs scikit-learn, which is not installed: "
            "pip install 'p2pfed[demo]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.exists():
        raise ConfigError(f"scikit-learn's digits data is missing ({path}); reinstall scikit-learn")
    return path


@functools.cache
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float64)
    images = (table[:, :-1] / 16.0).astype(np.float32)
    labels = table[:, -1].astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 images as float32 ``(1797, 64)`` in [0, 1] and labels as int64 (read-only)."""
    return _arrays()


@functools.cache
def _split() -> tuple[np.ndarray, np.ndarray]:
    _, labels = _arrays()
    rng = np.random.Generator(np.random.PCG64(TEST_SPLIT_SEED))
    train_parts, test_parts = [], []
    for digit in range(_CLASSES):
        members = np.flatnonzero(labels == digit)
        members = members[rng.permutation(len(members))]
        n_test = round(TEST_FRACTION * len(members))
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    train = np.sort(np.concatenate(train_parts))
    test = np.sort(np.concatenate(test_parts))
    train.setflags(write=False)
    test.setflags(write=False)
    return train, test


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices (into :func:`load_arrays`) of the training pool and of the held-out test set.

    Stratified: for each digit, :data:`TEST_FRACTION` of its images (rounded) go to the test
    set, chosen by a generator seeded with :data:`TEST_SPLIT_SEED`. Sorted, disjoint, and
    together all 1797 images.
    """
    return _split()


def partition(
    labels: np.ndarray,
    num_nodes: int,
    seed: int,
    alpha: float = DEFAULT_ALPHA,
    min_samples: int = MIN_SAMPLES_PER_NODE,
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` among ``num_nodes`` nodes with Dirichlet label skew.

    For every label value (in increasing order) the positions holding it are shuffled and
    cut into ``num_nodes`` consecutive runs whose sizes follow proportions drawn from
    Dirichlet(``alpha``, ..., ``alpha``). If some node ends up with fewer than
    ``min_samples`` positions, the whole draw is repeated (with the same generator, so the
    result is still a function of the arguments). Returns one sorted index array per node;
    they are disjoint and cover every position.
    """
    labels = np.asarray(labels)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"dirichlet_alpha must be a finite number > 0, got {alpha!r}")
    if num_nodes * min_samples > len(labels):
        raise ConfigError(
            f"cannot give each of {num_nodes} nodes at least {min_samples} of the "
            f"{len(labels)} training examples; use at most {len(labels) // min_samples} nodes"
        )
    try:
        # the reusable partitioner draws exactly what this task was calibrated with
        return partitioners.dirichlet(labels, num_nodes, alpha, seed, min_size=min_samples)
    except ConfigError as exc:
        raise ConfigError(
            f"no Dirichlet(alpha={alpha}) split gave each of {num_nodes} nodes at least "
            f"{min_samples} examples in {partitioners.MAX_DIRICHLET_DRAWS} draws; raise "
            "dirichlet_alpha or use fewer nodes"
        ) from exc


def _int_setting(config: Mapping[str, Any], key: str, default: int | None, low: int) -> int:
    value = config.get(key, default)
    if value is None:
        raise ConfigError(
            f"the digits task needs the setting {key!r}: put {key} = N in the [task] table "
            f"of the node's config.toml, or pass --set {key}=N (p2pfed run and the demo set "
            "node_index and num_nodes themselves)"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"[task] {key} must be an integer >= {low}, got {value!r}")
    return value


def _device(config: Mapping[str, Any]) -> torch.device:
    return torch.device(str(config.get("device", "cpu")))


def _float_setting(config: Mapping[str, Any], key: str, default: float, low: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"[task] {key} must be a number, got {value!r}")
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"[task] {key} must be a finite number >= {low}, got {value!r}")
    return float(value)


class DigitsTask:
    """The demo task (module docstring); ``p2pfed.tasks.digits:task`` is an instance."""

    name = TASK_NAME

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        """MLP 64-``hidden``-10 (``hidden`` defaults to 32: 2410 parameters), initialised
        from ``config["seed"]`` like ``torch.nn.Linear``'s default."""
        seed = _int_setting(config, "seed", 0, 0)
        hidden = _int_setting(config, "hidden", _HIDDEN, 1)
        generator = torch.Generator().manual_seed(seed)
        first = torch.nn.Linear(_INPUTS, hidden)
        second = torch.nn.Linear(hidden, _CLASSES)
        with torch.no_grad():
            for layer in (first, second):
                bound = 1.0 / math.sqrt(layer.in_features)
                torch.nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
                torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        return torch.nn.Sequential(first, torch.nn.ReLU(), second).to(_device(config))

    def node_indices(self, config: Mapping[str, Any]) -> np.ndarray:
        """Indices (into :func:`load_arrays`) of this node's training images."""
        num_nodes = _int_setting(config, "num_nodes", None, 1)
        node_index = _int_setting(config, "node_index", None, 0)
        if node_index >= num_nodes:
            raise ConfigError(
                f"[task] node_index must be < num_nodes ({num_nodes}), got {node_index}"
            )
        seed = _int_setting(config, "seed", 0, 0)
        alpha = _float_setting(config, "dirichlet_alpha", DEFAULT_ALPHA, 0.0)
        pool, _ = split_indices()
        _, labels = load_arrays()
        parts = partition(labels[pool], num_nodes, seed, alpha)
        return pool[parts[node_index]]

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        """This node's Dirichlet share of the training pool and the common test set."""
        return _node_data(self.node_indices(config))

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext | None = None,
    ) -> TrainResult:
        """SGD with momentum over shuffled mini-batches for ``local_epochs`` passes."""
        lr = _float_setting(config, "lr", float(DEFAULT_TRAINING["lr"]), 1e-12)
        momentum = _float_setting(config, "momentum", float(DEFAULT_TRAINING["momentum"]), 0.0)
        epochs = _int_setting(config, "local_epochs", int(DEFAULT_TRAINING["local_epochs"]), 1)
        batch_size = _int_setting(config, "batch_size", int(DEFAULT_TRAINING["batch_size"]), 1)
        if momentum >= 1.0:
            raise ConfigError(f"[task] momentum must be < 1, got {momentum}")
        device = _device(config)
        x, y = (t.to(device) for t in data.train)
        parameters = [p for p in model.parameters() if p.requires_grad]
        velocity: list[torch.Tensor | None] = [None] * len(parameters)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        total, seen = 0.0, 0
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            for batch in order.split(batch_size):
                for parameter in parameters:
                    parameter.grad = None
                loss = loss_fn(model(x[batch]), y[batch])
                loss.backward()
                _sgd_step(parameters, velocity, lr, momentum)
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
        return TrainResult(samples=seen, loss=total / seen if seen else 0.0)

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        """Accuracy (fraction correct) and mean cross-entropy on the held-out test set."""
        x, y = (t.to(_device(config)) for t in data.test)
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            accuracy = float((logits.argmax(dim=1) == y).double().mean())
        return {"accuracy": accuracy, "loss": loss}

    def centralized_baseline(self, config: Mapping[str, Any], epochs: int) -> dict[str, float]:
        """Train the same initial model on the union of all nodes' training data.

        The union is the whole training pool (the nodes' parts cover it), evaluated on the
        same held-out test set. Uses the same ``lr``, ``momentum`` and ``batch_size`` as the
        nodes and a generator seeded from ``seed``. Returns ``accuracy``, ``loss``,
        ``epochs``, ``num_train`` and ``num_test``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
        settings = dict(config)
        settings["local_epochs"] = epochs
        pool, _ = split_indices()
        data = _node_data(pool)
        model = self.build_model(settings)
        generator = torch.Generator().manual_seed(_int_setting(settings, "seed", 0, 0))
        self.train(model, data, settings, generator)
        metrics = self.evaluate(model, data, settings)
        return {
            **metrics,
            "epochs": float(epochs),
            "num_train": float(data.num_train),
            "num_test": float(data.num_test),
        }


@torch.no_grad()
def _sgd_step(
    parameters: Sequence[torch.Tensor],
    velocity: list[torch.Tensor | None],
    lr: float,
    momentum: float,
) -> None:
    """One step of SGD with momentum, the same update as ``torch.optim.SGD``.

    Written out because ``torch.optim`` imports TorchDynamo on its first step (817 modules,
    ~70 MB of RSS in every node process) for nothing this model needs.
    """
    for index, parameter in enumerate(parameters):
        grad = parameter.grad
        if grad is None:
            continue
        buffer = velocity[index]
        if buffer is None:
            buffer = velocity[index] = grad.clone()
        else:
            buffer.mul_(momentum).add_(grad)
        parameter.add_(buffer, alpha=-lr)


def _node_data(train_indices: np.ndarray) -> NodeData:
    images, labels = load_arrays()
    _, test = split_indices()
    train_x = torch.from_numpy(images[train_indices].copy())
    train_y = torch.from_numpy(labels[train_indices].copy())
    test_x = torch.from_numpy(images[test].copy())
    test_y = torch.from_numpy(labels[test].copy())
    return NodeData(
        train=(train_x, train_y),
        test=(test_x, test_y),
        num_train=len(train_indices),
        num_test=len(test),
    )


task = DigitsTask()
"""The task instance the setting ``task = "p2pfed.tasks.digits:task"`` names."""
