"""Model fingerprints (spec/group.md, "Model fingerprint"): the bytes hashed and the digest."""

from __future__ import annotations

import hashlib
import struct

import torch

from p2pfed.model_vector import fingerprint_input, model_fingerprint
from p2pfed.tasks.digits import task as digits

NAME = "model_fingerprint"
SECTION = 'spec/group.md, "Model fingerprint"'
DESCRIPTION = "fingerprint input bytes and SHA-256 digest for fixed model layouts"


def _models() -> list[tuple[str, str, torch.nn.Module]]:
    return [
        ("linear 3->2", "demo", torch.nn.Linear(3, 2)),
        ("digits demo MLP", digits.name, digits.build_model({"seed": 0})),
        (
            "conv + linear, unicode task name",
            "tâche-v2",
            torch.nn.Sequential(
                torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 1)
            ),
        ),
    ]


def generate() -> dict:
    cases = []
    for label, task_name, model in _models():
        cases.append(
            {
                "label": label,
                "task_name": task_name,
                "parameters": [
                    {"name": name, "dtype": "float32", "shape": list(param.shape)}
                    for name, param in model.named_parameters()
                ],
                "input": fingerprint_input(model, task_name).hex(),
                "fingerprint": model_fingerprint(model, task_name).hex(),
            }
        )
    return {"cases": cases}


def verify(vectors: dict) -> None:
    """Rebuild each input from the listed names and shapes alone, as another language would."""
    for case in vectors["cases"]:
        task = case["task_name"].encode()
        data = b"p2pfed-model-fingerprint-v1\x00" + struct.pack(">H", len(task)) + task
        data += struct.pack(">I", len(case["parameters"]))
        for parameter in case["parameters"]:
            name = parameter["name"].encode()
            dtype = parameter["dtype"].encode()
            data += struct.pack(">H", len(name)) + name + struct.pack(">B", len(dtype)) + dtype
            data += struct.pack(">B", len(parameter["shape"]))
            data += b"".join(struct.pack(">Q", d) for d in parameter["shape"])
        assert data.hex() == case["input"], case["label"]
        assert hashlib.sha256(data).hexdigest() == case["fingerprint"], case["label"]
