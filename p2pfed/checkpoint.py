"""Crash-safe model checkpoints: where a node resumes after a crash or a restart.

Rules of this file:

* A checkpoint is written whole with :func:`~p2pfed.atomicfile.atomic_write_bytes` (temp
  file, fsync, rename, directory fsync; mode 0600), so after a SIGKILL or a power loss the
  path holds either the previous checkpoint or the new one, never a mix.
* The file describes itself and carries a checksum, so anything that slipped through
  (a truncated copy, a bad disk block, a hand edit, a file of another program) is detected
  on load and reported as :class:`~p2pfed.errors.CheckpointError`; a damaged checkpoint
  is never silently used.
* Only this node reads its checkpoints; they never travel over the network. The format is
  still fixed and versioned so that tools can read it and old files are recognised.

File layout (integers unsigned big-endian)::

    offset  size  field
    0       8     magic   "P2PFCKPT"
    8       2     version u16 = 1
    10      4     J       u32, length of the metadata (at most 1 MiB)
    14      J     metadata: UTF-8 JSON object, keys sorted, no whitespace:
                    {"extra": {...}, "fingerprint": "<64 hex>", "length": n,
                     "round": r, "trained": true|false, "weight": w}
    14+J    4n    the model: n float32 values, little-endian
    14+J+4n 32    SHA-256 of every byte before it (offsets 0 .. 14+J+4n-1)

``round`` is an integer >= 0, ``weight`` a finite number >= 0 (the node's averaging
weight), ``fingerprint`` the 32-byte :func:`~p2pfed.model_vector.model_fingerprint` of the
model, ``trained`` tells whether local training of ``round`` already happened, and
``extra`` is any JSON object the node wants to keep (e.g. the released update's round).

Example::

    >>> import tempfile, pathlib, numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.ckpt"
    >>> load_checkpoint(path) is None
    True
    >>> ckpt = Checkpoint(round=3, model=np.arange(4, dtype=np.float32), weight=1.0,
    ...                   fingerprint=bytes(32), trained=False, extra={"note": "x"})
    >>> save_checkpoint(path, ckpt)
    >>> loaded = load_checkpoint(path, expected_fingerprint=bytes(32))
    >>> loaded.round, loaded.model.tolist(), loaded.extra
    (3, [0.0, 1.0, 2.0, 3.0], {'note': 'x'})
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from p2pfed.atomicfile import atomic_write_bytes
from p2pfed.errors import CheckpointError

__all__ = [
    "CHECKPOINT_MAGIC",
    "CHECKPOINT_VERSION",
    "DEFAULT_MAX_CHECKPOINT_BYTES",
    "MAX_METADATA_BYTES",
    "Checkpoint",
    "decode_checkpoint",
    "encode_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_MAGIC = b"P2PFCKPT"
"""The first 8 bytes of every checkpoint file."""
CHECKPOINT_VERSION = 1
"""The format version this module writes and the only one it reads."""
MAX_METADATA_BYTES = 1 << 20
"""Largest metadata JSON accepted (1 MiB); ``extra`` must stay small."""
DEFAULT_MAX_CHECKPOINT_BYTES = 1 << 32
"""Largest file :func:`load_checkpoint` reads by default (4 GiB, a 1G-parameter model)."""

_HEADER = struct.Struct(">8sHI")
_DIGEST_BYTES = 32
_FINGERPRINT_BYTES = 32
_KEYS = frozenset({"extra", "fingerprint", "length", "round", "trained", "weight"})


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What a node needs to resume: its model vector and where it was in the protocol."""

    round: int
    model: np.ndarray
    weight: float
    fingerprint: bytes
    trained: bool
    extra: dict[str, Any] = field(default_factory=dict)


def _check(ckpt: Checkpoint) -> None:
    if not isinstance(ckpt, Checkpoint):
        raise TypeError(f"expected a Checkpoint, got {type(ckpt).__name__}")
    if isinstance(ckpt.round, bool) or not isinstance(ckpt.round, int) or ckpt.round < 0:
        raise ValueError(f"checkpoint round must be an integer >= 0, got {ckpt.round!r}")
    model = ckpt.model
    if not isinstance(model, np.ndarray) or model.dtype != np.float32 or model.ndim != 1:
        raise TypeError("checkpoint model must be a 1-D float32 numpy array (model_to_vector)")
    weight = ckpt.weight
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(f"checkpoint weight must be a finite number >= 0, got {weight!r}")
    if not isinstance(ckpt.fingerprint, bytes) or len(ckpt.fingerprint) != _FINGERPRINT_BYTES:
        raise ValueError("checkpoint fingerprint must be 32 bytes (model_fingerprint)")
    if not isinstance(ckpt.trained, bool):
        raise TypeError(f"checkpoint trained must be a bool, got {type(ckpt.trained).__name__}")
    if not isinstance(ckpt.extra, dict):
        raise TypeError(f"checkpoint extra must be a dict, got {type(ckpt.extra).__name__}")


def encode_checkpoint(ckpt: Checkpoint) -> bytes:
    """The exact bytes of the checkpoint file for ``ckpt`` (layout in the module docstring)."""
    _check(ckpt)
    meta = {
        "extra": ckpt.extra,
        "fingerprint": ckpt.fingerprint.hex(),
        "length": int(ckpt.model.shape[0]),
        "round": ckpt.round,
        "trained": ckpt.trained,
        "weight": float(ckpt.weight),
    }
    try:
        text = json.dumps(
            meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"checkpoint extra must hold only JSON values (str keys, finite numbers): {exc}"
        ) from exc
    meta_bytes = text.encode("ascii")
    if len(meta_bytes) > MAX_METADATA_BYTES:
        raise ValueError(
            f"checkpoint metadata is {len(meta_bytes)} bytes, more than {MAX_METADATA_BYTES}; "
            "keep extra small"
        )
    body = b"".join(
        (
            _HEADER.pack(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, len(meta_bytes)),
            meta_bytes,
            ckpt.model.astype("<f4", copy=False).tobytes(),
        )
    )
    return body + hashlib.sha256(body).digest()


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically and durably (mode 0600); returns once on disk."""
    atomic_write_bytes(path, encode_checkpoint(ckpt), mode=0o600)


def decode_checkpoint(data: bytes, source: str = "<bytes>") -> Checkpoint:
    """Parse and verify checkpoint bytes; :class:`CheckpointError` names ``source`` on failure."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {source} is unusable: {what}. Move it aside to start from the "
            "initial model (the privacy ledger, not the checkpoint, records the budget spent)"
        )

    view = memoryview(data)
    if len(view) < _HEADER.size or bytes(view[:8]) != CHECKPOINT_MAGIC:
        raise bad("it does not start with the checkpoint magic (not a p2pfed checkpoint)")
    _, version, meta_len = _HEADER.unpack_from(view)
    if version != CHECKPOINT_VERSION:
        raise bad(
            f"format version {version}, this p2pfed reads only version {CHECKPOINT_VERSION} "
            "(it was written by a different release)"
        )
    if meta_len > MAX_METADATA_BYTES:
        raise bad(f"metadata length {meta_len} exceeds {MAX_METADATA_BYTES}")
    if len(view) < _HEADER.size + meta_len + _DIGEST_BYTES:
        raise bad(f"truncated ({len(view)} bytes)")
    body, digest = view[:-_DIGEST_BYTES], bytes(view[-_DIGEST_BYTES:])
    if hashlib.sha256(body).digest() != digest:
        raise bad("SHA-256 checksum mismatch (truncated or corrupted)")
    try:
        meta = json.loads(bytes(view[_HEADER.size : _HEADER.size + meta_len]).decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or set(meta) != _KEYS:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise bad(f"metadata must have exactly the keys {sorted(_KEYS)}, got {keys}")
    length, rnd, weight = meta["length"], meta["round"], meta["weight"]
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise bad(f"length must be an integer >= 0, got {length!r}")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise bad(f"round must be an integer >= 0, got {rnd!r}")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise bad(f"weight must be a finite number >= 0, got {weight!r}")
    if not isinstance(meta["trained"], bool) or not isinstance(meta["extra"], dict):
        raise bad("trained must be a boolean and extra an object")
    try:
        fingerprint = bytes.fromhex(meta["fingerprint"])
    except (TypeError, ValueError):
        fingerprint = b""
    if len(fingerprint) != _FINGERPRINT_BYTES or meta["fingerprint"] != fingerprint.hex():
        raise bad("fingerprint must be 64 lowercase hex digits")
    vector_bytes = len(body) - _HEADER.size - meta_len
    if vector_bytes != 4 * length:
        raise bad(f"metadata says {length} values but {vector_bytes} bytes of model follow")
    model = np.frombuffer(body[_HEADER.size + meta_len :], dtype="<f4").astype(np.float32)
    return Checkpoint(
        round=rnd,
        model=model,
        weight=float(weight),
        fingerprint=fingerprint,
        trained=meta["trained"],
        extra=meta["extra"],
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    expected_fingerprint: bytes | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
) -> Checkpoint | None:
    """Read the checkpoint at ``path``; ``None`` if there is no such file.

    Raises :class:`~p2pfed.errors.CheckpointError` if the file is larger than
    ``max_bytes`` (checked before reading), corrupt, truncated, of another format version,
    or, when ``expected_fingerprint`` is given, of a different model.
    """
    target = Path(path)
    try:
        with open(target, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise CheckpointError(
                    f"checkpoint {target} is {size} bytes, more than the limit of {max_bytes}; "
                    "raise max_bytes if the model really is that large"
                )
            data = f.read(size + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise CheckpointError(f"checkpoint path {target} is a directory, not a file") from exc
    except PermissionError as exc:
        raise CheckpointError(f"checkpoint {target} is not readable: {exc}") from exc
    ckpt = decode_checkpoint(data, str(target))
    if expected_fingerprint is not None and ckpt.fingerprint != expected_fingerprint:
        raise CheckpointError(
            f"checkpoint {target} is of a different model (fingerprint "
            f"{ckpt.fingerprint.hex()[:16]}..., the task's model is "
            f"{expected_fingerprint.hex()[:16]}...): the task or its model changed; move the "
            "checkpoint aside to start from the new model"
        )
    return ckpt
