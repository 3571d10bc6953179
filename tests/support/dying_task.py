"""simnet's tiny task, except that building a model kills the process the first times.

For sweep retries: the worker process of a run dies the way a killed or out-of-memory
worker does (``os._exit``: no exception, no cleanup) ``die_times`` times (task setting), and runs
normally afterwards. A file in the folder ``die_marker`` (task setting) counts the
deaths across processes, one file per value of ``die_times``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from simnet.tasks import TinyTask


class DyingTask(TinyTask):
    def build_model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        times = int(config.get("die_times", 0))
        if times:
            path = Path(str(config["die_marker"])) / f"die_times={times}"
            deaths = len(path.read_text()) if path.exists() else 0
            if deaths < times:
                with path.open("a") as counter:
                    counter.write("x")
                os._exit(3)
        return super().build_model(config)


task = DyingTask()
