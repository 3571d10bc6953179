"""The digits demo task: its non-IID split; federated averaging vs the centralized baseline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfed.errors import ConfigError
from p2pfed.model_vector import model_fingerprint, model_to_vector, vector_to_model
from p2pfed.task import Task
from p2pfed.tasks import digits
from p2pfed.tasks.digits import (
    CALIBRATED_ROUNDS,
    DEFAULT_TRAINING,
    MIN_SAMPLES_PER_NODE,
    load_arrays,
    partition,
    split_indices,
    task,
)


def config(node_index: int = 0, num_nodes: int = 4, seed: int = 0, **extra: object) -> dict:
    return {"node_index": node_index, "num_nodes": num_nodes, "seed": seed, **extra}


def test_is_a_task() -> None:
    assert isinstance(task, Task)


def test_test_set_is_fixed_stratified_and_disjoint() -> None:
    images, labels = load_arrays()
    assert images.shape == (1797, 64) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    train, test = split_indices()
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    per_class = np.bincount(labels[test], minlength=10)
    assert np.array_equal(per_class, np.round(0.2 * np.bincount(labels)).astype(int))
    a, b = task.load_data(config(0, 4, seed=1)), task.load_data(config(3, 7, seed=2))
    assert torch.equal(a.test[0], b.test[0]) and torch.equal(a.test[1], b.test[1])
    assert a.num_test == len(test) == per_class.sum()


@pytest.mark.parametrize("num_nodes", [1, 2, 4, 8, 30])
def test_partition_is_disjoint_covering_and_deterministic(num_nodes: int) -> None:
    train, _ = split_indices()
    pool_labels = load_arrays()[1][train]
    parts = partition(pool_labels, num_nodes, seed=3)
    assert len(parts) == num_nodes
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(pool_labels)  # disjoint, covering
    assert min(len(p) for p in parts) >= MIN_SAMPLES_PER_NODE
    again = partition(pool_labels, num_nodes, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


def test_partition_depends_on_seed_and_node_count() -> None:
    labels = load_arrays()[1][split_indices()[0]]
    base = partition(labels, 4, seed=0)
    assert not np.array_equal(base[0], partition(labels, 4, seed=1)[0])
    assert not np.array_equal(base[0], partition(labels, 5, seed=0)[0])


def test_nodes_load_their_own_parts() -> None:
    pool, _ = split_indices()
    datas = [task.load_data(config(i, 4)) for i in range(4)]
    assert sum(d.num_train for d in datas) == len(pool)
    seen = torch.cat([d.train[0] for d in datas])
    assert seen.shape == (len(pool), 64)
    for i, d in enumerate(datas):
        assert np.array_equal(
            task.node_indices(config(i, 4)), np.sort(task.node_indices(config(i, 4)))
        )
        assert len(d.train[0]) == len(d.train[1]) == d.num_train


def label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each part's label distribution and the pool's."""
    overall = np.bincount(labels, minlength=10) / len(labels)
    distances = []
    for p in parts:
        hist = np.bincount(labels[p], minlength=10) / len(p)
        distances.append(0.5 * np.abs(hist - overall).sum())
    return float(np.mean(distances))


def test_split_is_label_skewed() -> None:
    labels = load_arrays()[1][split_indices()[0]]
    skewed = label_skew(partition(labels, 4, seed=0), labels)
    nearly_iid = label_skew(partition(labels, 4, seed=0, alpha=1000.0), labels)
    assert skewed > 0.25 > 0.05 > nearly_iid
    # some node misses a digit almost entirely
    parts = partition(labels, 4, seed=0)
    assert min(np.bincount(labels[p], minlength=10).min() for p in parts) <= 5


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"num_nodes": 4, "seed": 0}, "needs the setting 'node_index'"),
        ({"node_index": 0, "seed": 0}, "needs the setting 'num_nodes'"),
        (config(4, 4), "node_index must be < num_nodes"),
        (config(0, 0), "num_nodes must be an integer >= 1"),
        (config(0, 200), "use at most 143 nodes"),
        (config(0, 4, dirichlet_alpha=0), "dirichlet_alpha must be a finite number > 0"),
        (config(0, 4, seed="x"), "seed must be an integer"),
    ],
)
def test_bad_config_is_a_config_error(settings: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        task.load_data(settings)


def test_bad_training_settings() -> None:
    data = task.load_data(config())
    model = task.build_model(config())
    for key, value in [("lr", 0), ("batch_size", 0), ("momentum", 1.0), ("local_epochs", 1.5)]:
        with pytest.raises(ConfigError, match=key):
            task.train(model, data, config(**{key: value}), torch.Generator())


def test_missing_scikit_learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes "import sklearn" fail
    with pytest.raises(ConfigError, match=r"pip install 'p2pfed\[demo\]'"):
        digits._digits_file()


def test_loading_the_data_does_not_import_scikit_learn() -> None:
    """Node processes read the bundled CSV directly: importing scikit-learn and SciPy
    would add ~70 MB to every node."""
    code = (
        "import sys; from p2pfed.tasks.digits import load_arrays; x, y = load_arrays(); "
        "assert x.shape == (1797, 64) and 'sklearn' not in sys.modules and 'scipy' not in "
        "sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_model_is_the_same_on_every_node_and_small() -> None:
    a, b = task.build_model(config(0)), task.build_model(config(3))
    assert np.array_equal(model_to_vector(a), model_to_vector(b))
    assert model_fingerprint(a, task.name) == model_fingerprint(b, task.name)
    assert len(model_to_vector(a)) == 64 * 32 + 32 + 32 * 10 + 10
    assert not np.array_equal(model_to_vector(a), model_to_vector(task.build_model(config(seed=1))))


def test_training_is_deterministic_given_the_generator() -> None:
    data = task.load_data(config(1))
    results = []
    for _ in range(2):
        model = task.build_model(config(1))
        result = task.train(model, data, config(1), torch.Generator().manual_seed(42))
        results.append((model_to_vector(model), result))
    assert np.array_equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    epochs = int(DEFAULT_TRAINING["local_epochs"])
    assert results[0][1].samples == epochs * data.num_train
    model = task.build_model(config(1))
    task.train(model, data, config(1), torch.Generator().manual_seed(43))
    assert not np.array_equal(model_to_vector(model), results[0][0])


def test_federated_averaging_matches_the_centralized_baseline() -> None:
    """The calibration of DEFAULT_TRAINING and CALIBRATED_ROUNDS (see the module docstring).

    4 nodes with the non-IID split; each round every node trains from the global model and
    the results are averaged weighted by num_train. After CALIBRATED_ROUNDS rounds every
    node's accuracy with the global model must be within 3 points of the same model trained
    centrally on the union of the nodes' data for 60 epochs (more passes over the data
    than the federation made: the baseline is not handicapped).
    """
    num_nodes = 4
    configs = [config(i, num_nodes, seed=0) for i in range(num_nodes)]
    datas = [task.load_data(c) for c in configs]
    weights = np.array([d.num_train for d in datas], dtype=np.float64)
    weights /= weights.sum()
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(num_nodes)]
    model = task.build_model(configs[0])
    global_vector = model_to_vector(model)
    first_round_accuracy = None
    for _ in range(CALIBRATED_ROUNDS):
        trained = []
        for node in range(num_nodes):
            vector_to_model(model, global_vector)
            task.train(model, datas[node], configs[node], generators[node])
            trained.append(model_to_vector(model).astype(np.float64))
        global_vector = np.sum([w * v for w, v in zip(weights, trained, strict=True)], axis=0)
        global_vector = global_vector.astype(np.float32)
        if first_round_accuracy is None:
            vector_to_model(model, global_vector)
            first_round_accuracy = task.evaluate(model, datas[0], configs[0])["accuracy"]
    baseline = task.centralized_baseline(configs[0], epochs=60)
    assert baseline["num_train"] == sum(d.num_train for d in datas)
    assert baseline["accuracy"] > 0.95  # the task is learnable at all
    vector_to_model(model, global_vector)
    for node in range(num_nodes):
        accuracy = task.evaluate(model, datas[node], configs[node])["accuracy"]
        assert accuracy >= baseline["accuracy"] - 0.03, (node, accuracy, baseline)
    assert first_round_accuracy is not None and first_round_accuracy < baseline["accuracy"] - 0.03


def test_training_step_is_torch_sgd_without_its_import_cost() -> None:
    """The hand-written momentum SGD makes exactly torch.optim.SGD's updates, and training
    does not pull in TorchDynamo (which torch.optim imports on its first step: ~70 MB)."""
    settings = {**config(0), "local_epochs": 2}
    ours, reference = task.build_model(settings), task.build_model(settings)
    data = task.load_data(settings)
    task.train(ours, data, settings, torch.Generator().manual_seed(3))
    x, y = data.train
    optimizer = torch.optim.SGD(
        reference.parameters(),
        lr=float(DEFAULT_TRAINING["lr"]),
        momentum=float(DEFAULT_TRAINING["momentum"]),
    )
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        for batch in torch.randperm(len(y), generator=generator).split(
            int(DEFAULT_TRAINING["batch_size"])
        ):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
            optimizer.step()
    assert np.array_equal(model_to_vector(ours), model_to_vector(reference))
    code = (
        "import sys, torch; from p2pfed.tasks.digits import task; "
        "c = {'node_index': 0, 'num_nodes': 4}; m = task.build_model(c); "
        "task.train(m, task.load_data(c), c, torch.Generator().manual_seed(0)); "
        "assert 'torch._dynamo' not in sys.modules, 'training imported torch._dynamo'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
