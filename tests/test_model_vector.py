"""Model vectors and fingerprints: exact round trips, the documented fingerprint layout."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch

from p2pfed.errors import ConfigError
from p2pfed.model_vector import (
    FINGERPRINT_DOMAIN,
    fingerprint_input,
    model_fingerprint,
    model_to_vector,
    num_parameters,
    vector_to_model,
)


def mlp(hidden: int = 5, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():  # seeded default init without leaking global RNG state
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3)
        )


def test_vector_is_parameters_in_order() -> None:
    model = mlp()
    vector = model_to_vector(model)
    expected = np.concatenate([p.detach().numpy().reshape(-1) for p in model.parameters()])
    assert vector.dtype == np.float32 and vector.ndim == 1
    assert len(vector) == num_parameters(model) == 4 * 5 + 5 + 5 * 3 + 3
    np.testing.assert_array_equal(vector, expected)


def test_round_trip_is_exact_and_vector_is_a_copy() -> None:
    source, target = mlp(seed=1), mlp(seed=2)
    vector = model_to_vector(source)
    assert not np.array_equal(vector, model_to_vector(target))
    vector_to_model(target, vector)
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)
    vector[0] = 1234.0  # the array does not alias the model
    assert float(source[0].weight.detach()[0, 0]) != 1234.0
    x = torch.randn(7, 4)
    assert torch.equal(source(x), target(x))


def test_buffers_are_not_in_the_vector() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    assert num_parameters(model) == 3 * 2 + 2 + 2 + 2  # BatchNorm weight and bias, no stats
    model.train()
    model(torch.randn(8, 3))  # moves the running statistics
    before = model[1].running_mean.clone()
    vector_to_model(model, np.zeros(num_parameters(model), dtype=np.float32))
    assert torch.equal(model[1].running_mean, before)


def test_shared_parameter_counted_once() -> None:
    layer = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(layer, layer)
    assert num_parameters(model) == 6
    vector_to_model(model, np.arange(6, dtype=np.float32))
    assert layer.bias.tolist() == [4.0, 5.0]


@pytest.mark.parametrize(
    ("vector", "error", "match"),
    [
        (np.zeros(5, dtype=np.float32), ValueError, "5 elements but the model has"),
        (np.zeros(43, dtype=np.float64), TypeError, "float32"),
        (np.zeros((43, 1), dtype=np.float32), TypeError, "1-D"),
        ([0.0] * 43, TypeError, "numpy array"),
    ],
)
def test_vector_to_model_rejects_bad_vectors(vector: object, error: type, match: str) -> None:
    model = mlp()
    before = model_to_vector(model)
    with pytest.raises(error, match=match):
        vector_to_model(model, vector)  # type: ignore[arg-type]
    np.testing.assert_array_equal(model_to_vector(model), before)


def test_non_float32_model_is_a_task_error() -> None:
    with pytest.raises(ConfigError, match=r"float64.*model\.float\(\)"):
        model_to_vector(mlp().double())


def test_fingerprint_matches_the_documented_layout() -> None:
    model = mlp(hidden=5)
    # an independent encoding of the layout written in the module docstring
    expected = b"p2pfed-model-fingerprint-v1\x00"
    expected += struct.pack(">H", 4) + b"demo" + struct.pack(">I", 4)
    for name, shape in [
        ("0.weight", (5, 4)),
        ("0.bias", (5,)),
        ("2.weight", (3, 5)),
        ("2.bias", (3,)),
    ]:
        expected += struct.pack(">H", len(name)) + name.encode()
        expected += b"\x07float32" + struct.pack(">B", len(shape))
        expected += b"".join(struct.pack(">Q", d) for d in shape)
    assert FINGERPRINT_DOMAIN == b"p2pfed-model-fingerprint-v1\x00"
    assert fingerprint_input(model, "demo") == expected
    assert model_fingerprint(model, "demo") == hashlib.sha256(expected).digest()


def test_fingerprint_is_stable_and_ignores_values() -> None:
    a, b = mlp(seed=1), mlp(seed=2)
    fp = model_fingerprint(a, "t")
    assert len(fp) == 32
    assert model_fingerprint(a, "t") == fp == model_fingerprint(b, "t")


def test_fingerprint_changes_with_shape_name_order_and_task() -> None:
    base = model_fingerprint(mlp(hidden=5), "t")
    assert model_fingerprint(mlp(hidden=6), "t") != base  # shape
    assert model_fingerprint(mlp(hidden=5), "u") != base  # task name
    renamed = torch.nn.Sequential()
    renamed.add_module("first", torch.nn.Linear(4, 5))
    renamed.add_module("act", torch.nn.ReLU())
    renamed.add_module("second", torch.nn.Linear(5, 3))
    assert num_parameters(renamed) == num_parameters(mlp(hidden=5))
    assert model_fingerprint(renamed, "t") != base  # names
    # same total length, different split between tensors
    reshaped = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    reshaped[0].weight = torch.nn.Parameter(torch.zeros(4, 5))
    assert model_fingerprint(reshaped, "t") != base


def test_fingerprint_task_name_is_length_prefixed() -> None:
    # without length prefixes "ab" + "c..." and "a" + "bc..." could collide
    model = torch.nn.Linear(1, 1)
    assert fingerprint_input(model, "ab") != fingerprint_input(model, "a")
    assert model_fingerprint(model, "ab") != model_fingerprint(model, "a")
