"""Example task: a small CNN on 8x8 digits, split across nodes with Dirichlet label skew.

Run it on 4 local nodes (from this directory, or with it on PYTHONPATH)::

    p2pfed run --task cnn_dirichlet:task --nodes 4 --rounds 20 --set alpha=0.3

Settings (the ``[task]`` table, or ``--set``): ``alpha`` (Dirichlet concentration, default
0.5: smaller = more skewed), ``lr`` (0.05), ``momentum`` (0.9; fresh every round),
``local_epochs`` (2), ``batch_size`` (16).
``node_index``, ``num_nodes`` come from ``p2pfed run``; ``seed`` and ``device`` from the
node. The data is scikit-learn's bundled digits (``pip install 'p2pfed[demo]'``); any
labelled data set works the same way: load it, call a :mod:`p2pfed.partition` function
with the labels, keep part ``node_index``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from p2pfed import partition
from p2pfed.task import NodeData, RoundContext, TrainResult
from p2pfed.tasks.digits import load_arrays, split_indices


class CnnDirichlet:
    name = "example-cnn-dirichlet-v1"  # part of the model fingerprint

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        torch.manual_seed(int(config.get("seed", 0)))  # same initial model on every node
        model = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8, 8)),
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),  # 8 x 4 x 4
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),  # 16 x 2 x 2
            torch.nn.Flatten(),
            torch.nn.Linear(64, 10),
        )
        return model.to(config.get("device", "cpu"))

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        images, labels = load_arrays()
        pool, test = split_indices()  # a fixed 20% test set, the rest is shared out
        parts = partition.dirichlet(
            labels[pool],
            num_nodes=int(config["num_nodes"]),
            alpha=float(config.get("alpha", 0.5)),
            seed=int(config.get("seed", 0)),
            min_size=10,
        )
        mine = pool[parts[int(config["node_index"])]]
        return NodeData(
            train=(torch.from_numpy(images[mine].copy()), torch.from_numpy(labels[mine].copy())),
            test=(torch.from_numpy(images[test].copy()), torch.from_numpy(labels[test].copy())),
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
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=float(config.get("lr", 0.05)),
            momentum=float(config.get("momentum", 0.9)),
        )
        model.train()
        total, seen = 0.0, 0
        for _ in range(int(config.get("local_epochs", 2))):
            order = torch.randperm(len(y), generator=generator)
            for batch in order.split(int(config.get("batch_size", 16))):
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
        model.eval()
        with torch.no_grad():
            logits = model(x)
        return {
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits, y)),
        }


task = CnnDirichlet()
