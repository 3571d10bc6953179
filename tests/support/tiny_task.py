"""A tiny task for node tests: a linear model whose initial values differ per node.

``init`` (task setting) seeds the initial parameters, so that pure averaging has something
to average; ``samples`` sets the node's training-set size, hence its averaging weight.
Training and evaluation are simnet's tiny task's: every parameter moves halfway towards
``target``; the loss is the mean squared distance to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from p2pfed.task import NodeData
from simnet.tasks import TinyTask as SimnetTinyTask


class TinyTask(SimnetTinyTask):
    name = "tiny-linear-v1"

    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(int(config.get("init", config.get("seed", 0))))
        width = int(config.get("width", 8))
        model = torch.nn.Linear(width, width // 2)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        return model

    def load_data(self, config: Mapping[str, Any]) -> NodeData:
        samples = int(config.get("samples", 10))
        x = torch.ones(samples, int(config.get("width", 8)))
        return NodeData(train=x, test=x, num_train=samples, num_test=samples)


task = TinyTask()
