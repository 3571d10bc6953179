"""A torch model as one flat float32 vector, and the fingerprint that says which model it is.

Rules of this file:

* The vector of a model is the concatenation of its **parameters only**, in the order of
  ``model.named_parameters()`` (registration order, the order of the parameters in
  ``state_dict()``; a parameter shared by several modules appears once, under its first
  name), each flattened in row-major (C) order, as float32. Buffers (BatchNorm running
  statistics, step counters) are *not* part of the vector: they are never averaged and
  never leave the node. That is deliberate: everything that leaves a node goes through
  the DP mechanism of spec/privacy.md, which only covers the vector, and running
  statistics computed from local data would otherwise escape un-noised. Models with
  batch normalisation therefore keep local statistics (as in FedBN).
* Every parameter must be float32: p2pfed averages float32 vectors, and silently rounding
  a float64 model would change it. A model with another dtype is a task error
  (:class:`~p2pfed.errors.ConfigError`) that says to call ``model.float()``.
* The fingerprint is SHA-256 over the canonical description below, so two nodes whose
  models differ in task, parameter names, order, dtypes or shapes get different
  fingerprints and refuse to average. It does not cover parameter *values*.

Fingerprint input (``||`` is concatenation, integers unsigned big-endian, strings UTF-8
without terminator)::

    "p2pfed-model-fingerprint-v1" || 0x00
    || u16(len(task_name)) || task_name
    || u32(P)                                 P = number of parameters
    || for each parameter, in vector order:
         u16(len(name)) || name               e.g. "0.weight"
         || u8(len(dtype)) || dtype           "float32" (the only dtype version 1 allows)
         || u8(ndim) || u64(dim_0) || ... || u64(dim_{ndim-1})

``model_fingerprint`` returns the 32-byte digest of that byte string. Names longer than
65535 bytes, more than 2^32 - 1 parameters or more than 255 dimensions are rejected.

Example::

    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> vector = model_to_vector(model)
    >>> vector.dtype, vector.shape, num_parameters(model)
    (dtype('float32'), (8,), 8)
    >>> vector_to_model(model, vector * 0)
    >>> float(model.weight.abs().sum())
    0.0
    >>> len(model_fingerprint(model, "demo"))
    32
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

from p2pfed.errors import ConfigError

__all__ = [
    "FINGERPRINT_DOMAIN",
    "fingerprint_input",
    "model_fingerprint",
    "model_to_vector",
    "num_parameters",
    "vector_to_model",
]

FINGERPRINT_DOMAIN = b"p2pfed-model-fingerprint-v1\x00"
"""The domain-separation prefix of the fingerprint input (including its 0x00 terminator)."""

_DTYPE_NAME = "float32"
_MAX_NAME_BYTES = 0xFFFF
_MAX_NDIM = 0xFF
_MAX_PARAMETERS = 0xFFFFFFFF


def _parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.named_parameters())
    for name, param in params:
        if param.dtype != torch.float32:
            raise ConfigError(
                f"model parameter {name!r} has dtype {param.dtype}; p2pfed averages float32 "
                "models: return model.float() from the task's build_model"
            )
    return params


def num_parameters(model: torch.nn.Module) -> int:
    """The length of the model's vector: the number of scalars in all its parameters."""
    return sum(p.numel() for _, p in _parameters(model))


def model_to_vector(model: torch.nn.Module) -> np.ndarray:
    """A new 1-D float32 numpy array holding every parameter of ``model`` (see module rules).

    The array is a copy: changing it does not change the model, and training the model
    afterwards does not change the array.
    """
    params = _parameters(model)
    if not params:
        return np.zeros(0, dtype=np.float32)
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).to("cpu") for _, p in params])
    return flat.numpy().astype(np.float32, copy=True)


def vector_to_model(model: torch.nn.Module, vector: np.ndarray) -> None:
    """Overwrite the parameters of ``model`` in place with ``vector`` (inverse of model_to_vector).

    ``vector`` must be a 1-D float32 array of exactly :func:`num_parameters` elements;
    anything else raises ``TypeError``/``ValueError`` before the model is touched. Buffers
    and the optimizer state are left alone.
    """
    if not isinstance(vector, np.ndarray):
        raise TypeError(f"vector must be a numpy array, got {type(vector).__name__}")
    if vector.dtype != np.float32 or vector.ndim != 1:
        raise TypeError(
            f"vector must be a 1-D float32 array, got dtype {vector.dtype} with shape "
            f"{vector.shape}; build it with model_to_vector or np.asarray(v, np.float32)"
        )
    params = _parameters(model)
    expected = sum(p.numel() for _, p in params)
    if vector.shape[0] != expected:
        raise ValueError(
            f"vector has {vector.shape[0]} elements but the model has {expected} parameters; "
            "it belongs to a different model (compare model fingerprints)"
        )
    source = torch.from_numpy(np.ascontiguousarray(vector))
    offset = 0
    with torch.no_grad():
        for _, param in params:
            n = param.numel()
            param.copy_(source[offset : offset + n].view(param.shape))
            offset += n


def _u(fmt: str, value: int) -> bytes:
    return struct.pack(">" + fmt, value)


def _short_string(what: str, text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > _MAX_NAME_BYTES:
        raise ValueError(f"{what} is {len(data)} bytes long in UTF-8; at most 65535 allowed")
    return _u("H", len(data)) + data


def fingerprint_input(model: torch.nn.Module, task_name: str) -> bytes:
    """The exact bytes :func:`model_fingerprint` hashes (layout in the module docstring)."""
    if not isinstance(task_name, str):
        raise TypeError(f"task_name must be a str, got {type(task_name).__name__}")
    params = _parameters(model)
    if len(params) > _MAX_PARAMETERS:
        raise ValueError(f"model has {len(params)} parameter tensors; at most 2^32 - 1 allowed")
    parts = [FINGERPRINT_DOMAIN, _short_string("task name", task_name), _u("I", len(params))]
    dtype = _DTYPE_NAME.encode("ascii")
    for name, param in params:
        shape = tuple(param.shape)
        if len(shape) > _MAX_NDIM:
            raise ValueError(f"parameter {name!r} has {len(shape)} dimensions; at most 255")
        parts.append(_short_string(f"parameter name {name[:40]!r}", name))
        parts.append(_u("B", len(dtype)) + dtype)
        parts.append(_u("B", len(shape)) + b"".join(_u("Q", d) for d in shape))
    return b"".join(parts)


def model_fingerprint(model: torch.nn.Module, task_name: str) -> bytes:
    """The 32-byte SHA-256 fingerprint of the model's architecture under ``task_name``.

    Two nodes may average only if their fingerprints are equal. Stable across processes,
    machines and torch versions (it depends only on names, dtypes and shapes).
    """
    return hashlib.sha256(fingerprint_input(model, task_name)).digest()
