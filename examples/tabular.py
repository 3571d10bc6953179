"""Example task: a tabular classifier (breast cancer diagnosis, 30 numeric features).

Run it on 3 local nodes (from this directory, or with it on PYTHONPATH)::

    p2pfed run --task tabular:task --nodes 3 --target-accuracy 0.95

The data is scikit-learn's bundled Wisconsin breast cancer table (569 rows; ``pip install
'p2pfed[demo]'``), read from its CSV file without importing scikit-learn. Each node gets
an IID share of 80% of the rows (:func:`p2pfed.partition.iid`) and tests on the other 20%.
A real deployment reads each node's own file instead (a ``[task] csv = "..."`` setting).

Features are standardised with constants every node knows in advance (here: computed from
the public table). Statistics computed from a node's private rows would have to be shared,
which is a release of private data like any other.

Settings: ``lr`` (0.1), ``hidden`` (16), ``local_epochs`` (2), ``batch_size`` (32).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from p2pfed import partition
from p2pfed.errors import ConfigError
from p2pfed.task import NodeData, RoundContext, TrainResult

TEST_SEED = 7


@functools.cache
def _table() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the tabular example needs scikit-learn: pip install 'p2pfed[demo]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/breast_cancer.csv"
    rows = np.loadtxt(path, delimiter=",", skiprows=1)
    x, y = rows[:, :-1], rows[:, -1].astype(np.int64)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    return x, y


class Tabular:
    name = "example-tabular-mlp-v1"

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        torch.manual_seed(int(config.get("seed", 0)))
        hidden = int(config.get("hidden", 16))
        return torch.nn.Sequential(
            torch.nn.Linear(30, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
        ).to(config.get("device", "cpu"))

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        x, y = _table()
        order = np.random.default_rng(TEST_SEED).permutation(len(y))
        test, pool = order[: len(y) // 5], order[len(y) // 5 :]
        parts = partition.iid(y[pool], int(config["num_nodes"]), int(config.get("seed", 0)))
        mine = pool[parts[int(config["node_index"])]]
        return NodeData(
            train=(torch.from_numpy(x[mine]), torch.from_numpy(y[mine])),
            test=(torch.from_numpy(x[test]), torch.from_numpy(y[test])),
            num_train=len(mine),
            num_test=len(test),
        )

    def train(
        self,
        model: torch.nn.Module,
        data: NodeData,
        config: Mapping[str, Any],
        generator: torch.Generator,
        context: RoundContext,
    ) -> TrainResult:
        device = config.get("device", "cpu")
        x, y = (t.to(device) for t in data.train)
        optimizer = torch.optim.SGD(model.parameters(), lr=float(config.get("lr", 0.1)))
        total, seen = 0.0, 0
        for _ in range(int(config.get("local_epochs", 2))):
            for batch in torch.randperm(len(y), generator=generator).split(
                int(config.get("batch_size", 32))
            ):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
        return TrainResult(samples=seen, loss=total / max(seen, 1))

    def evaluate(
        self, model: torch.nn.Module, data: NodeData, config: Mapping[str, Any]
    ) -> dict[str, float]:
        x, y = (t.to(config.get("device", "cpu")) for t in data.test)
        with torch.no_grad():
            logits = model(x)
        return {
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits, y)),
        }


task = Tabular()
