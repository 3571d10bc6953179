"""Server optimisers applied to each round's average: FedAvg, FedAvgM and FedAdam (sans-IO).

In exact averaging mode every node ends a round holding the same exact sample-weighted
average of all nodes' models (spec/group.md, "Exact rounds"). A *server optimiser* then
runs in every node, on identical inputs and identical state, so every node computes the
same new model and the federation stays in agreement with no server (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021). The normative text, with the exact order of
operations, is spec/server-optimizer.md.

With ``x`` the model the round started from (``previous``), ``a`` the round's average and
``d = a - x`` (the negative of Reddi et al.'s pseudo-gradient):

* ``fedavg``: ``x_new = a`` (state-free; the default).
* ``fedavgm``: ``m = momentum * m + d``; ``x_new = x + lr * m``. Evaluated as
  ``a - (d - lr * m)`` (the same value in exact arithmetic), so that ``lr = 1,
  momentum = 0`` gives back the average bit for bit, i.e. FedAvg.
* ``fedadam``: ``m = b1 * m + (1 - b1) * d``; ``v = b2 * v + (1 - b2) * d * d``;
  ``x_new = x + lr * m / (sqrt(v) + tau)`` with ``b1 = momentum``, ``b2 = beta2``; no
  bias correction, as in Reddi et al. and Flower's FedAdam.

``m`` and ``v`` start at zero. Typical settings: FedAvgM ``lr = 1.0, momentum = 0.9``
(Hsu et al. 2019); FedAdam ``lr`` between 0.01 and 0.1 with ``momentum = 0.9``,
``beta2 = 0.99`` and ``tau = 1e-3`` (Reddi et al.).

Rules of this file:

* **Bit-identical results.** Models are IEEE 754 binary32 (float32); the state and the
  arithmetic are binary64 (float64): the float32 inputs are widened exactly, every
  operation is one element-wise numpy ufunc on float64 arrays (each result rounded to
  float64, no fused multiply-add, no reduction, no threads, no random numbers) in the fixed
  order of the spec, and the new model is rounded to float32 once, at the end. ``sqrt``
  and division are correctly rounded in IEEE 754, so any platform with IEEE binary64 and
  round-to-nearest-even (subnormals not flushed) computes the same bits from the same
  inputs; two nodes with equal state and equal inputs stay equal forever.
* **Why binary64.** A float32 momentum rounds every round and the rounding accumulates:
  on the digits CNN of ``bench.convergence`` a float32 FedAvgM drifted 1.7 points from the
  textbook (float64) replay by round 60, while nudging that replay's model by one float32
  ulp moved no 10th-round accuracy at all. In binary64 the replay and the spec agree at
  every 10th round through round 100.
* **Durable state.** :meth:`ServerOptimizer.save` writes the state with
  :func:`~p2pfed.atomicfile.atomic_write_bytes` (temp file in the same directory, fsync,
  rename, directory fsync); :meth:`ServerOptimizer.load` verifies the file completely and
  raises :class:`ServerOptimizerStateError` (a :class:`~p2pfed.errors.CheckpointError`)
  for anything corrupt, truncated or of another optimiser or model size.
* **Rounds.** The state carries the round of the last average it was applied to
  (:attr:`ServerOptimizer.round`, 0 before the first step), so a restarted node can tell
  whether the state file belongs with its checkpoint.

State file layout (integers unsigned big-endian, like the checkpoint's)::

    offset   size  field
    0        8     magic    "P2PFSOPT"
    8        2     version  u16 = 2 (version 1, float32 vectors, is still read)
    10       8     name     ASCII optimiser name, padded with 0x00 ("fedadam\\0")
    18       32    settings lr, momentum, beta2, tau: 4 x binary64 big-endian
    50       8     round    u64, the round of the last average applied (0: none)
    58       8     n        u64, number of model parameters
    66       1     k        u8, number of state vectors (fedavg 0, fedavgm 1, fedadam 2)
    67       8kn   state    m (then v), each n binary64 little-endian (version 1: 4kn,
                            float32, widened exactly when read)
    67+8kn   32    SHA-256 of every byte before it

Example::

    >>> import numpy as np
    >>> settings = ServerOptimizerSettings(name="fedavgm", lr=1.0, momentum=0.5)
    >>> opt = ServerOptimizer(settings, size=2)
    >>> x = np.array([1.0, 2.0], dtype=np.float32)
    >>> x = opt.step(x, np.array([2.0, 2.5], dtype=np.float32))  # m = d = [1, 0.5]
    >>> x.tolist(), opt.round
    ([2.0, 2.5], 1)
    >>> x = opt.step(x, np.array([3.0, 3.0], dtype=np.float32))  # m = 0.5 m + [1, 0.5]
    >>> x.tolist(), opt.momentum_vector.tolist()
    ([3.5, 3.25], [1.5, 0.75])
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2pfed.atomicfile import atomic_write_bytes
from p2pfed.errors import CheckpointError, ConfigError

__all__ = [
    "OPTIMIZERS",
    "STATE_MAGIC",
    "STATE_VERSION",
    "ServerOptimizer",
    "ServerOptimizerSettings",
    "ServerOptimizerStateError",
]

OPTIMIZERS: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam")
"""The server optimisers, by the name the ``server_optimizer`` parameter uses."""
STATE_MAGIC = b"P2PFSOPT"
"""The first 8 bytes of every server optimiser state file."""
STATE_VERSION = 2
"""The state file format this module writes (binary64 vectors). Version 1 (float32
vectors, written before the arithmetic became binary64) is read and widened exactly."""
_READABLE_VERSIONS = {1: "<f4", 2: "<f8"}

_HEADER = struct.Struct(">8sH8s4dQQB")
_DIGEST_BYTES = 32
_VECTORS = {"fedavg": 0, "fedavgm": 1, "fedadam": 2}
# The federation parameter behind each settings field: error messages name what to edit.
_PARAMS = {
    "name": "server_optimizer",
    "lr": "server_lr",
    "momentum": "server_momentum",
    "beta2": "server_beta2",
    "tau": "server_tau",
}


class ServerOptimizerStateError(CheckpointError):
    """A server optimiser state file is corrupt, truncated, or of another optimiser or model.

    A :class:`~p2pfed.errors.CheckpointError`, so code that handles damaged checkpoints
    handles this too. The message names the file and says what to do.
    """


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """Which server optimiser a federation runs and its hyperparameters (validated).

    The fields are the federation parameters ``server_optimizer``, ``server_lr``,
    ``server_momentum``, ``server_beta2`` and ``server_tau``. Typical values: FedAvgM
    ``lr=1.0, momentum=0.9``; FedAdam ``lr`` 0.01 to 0.1, ``momentum=0.9``,
    ``beta2=0.99``, ``tau=1e-3``. ``fedavg`` ignores the hyperparameters.

    Example::

        >>> ServerOptimizerSettings.from_params({"server_optimizer": "fedadam", "server_lr": 0.05})
        ServerOptimizerSettings(name='fedadam', lr=0.05, momentum=0.9, beta2=0.99, tau=0.001)
        >>> ServerOptimizerSettings(momentum=1.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        p2pfed.errors.ConfigError: server_momentum must be in [0, 1), got 1.5: ...
    """

    name: str = "fedavg"
    """``"fedavg"``, ``"fedavgm"`` or ``"fedadam"``."""
    lr: float = 1.0
    """Server learning rate ``eta`` of fedavgm and fedadam (> 0)."""
    momentum: float = 0.9
    """fedavgm's momentum ``beta``, fedadam's ``beta1``, in [0, 1)."""
    beta2: float = 0.99
    """fedadam's ``beta2``, in [0, 1)."""
    tau: float = 1e-3
    """fedadam's adaptivity ``tau`` (> 0): bounds the step where ``v`` is tiny."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in OPTIMIZERS:
            raise ConfigError(
                f"server_optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}: "
                'use "fedavg" to adopt each round\'s average as it is'
            )
        for field in ("lr", "momentum", "beta2", "tau"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"{_PARAMS[field]} must be a number, got {type(value).__name__} {value!r}"
                )
            object.__setattr__(self, field, float(value))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(
                f"server_lr must be a finite number > 0, got {self.lr}: "
                "typical values are 1.0 for fedavgm and 0.01 to 0.1 for fedadam"
            )
        roles = {
            "momentum": "fedavgm's momentum / fedadam's beta1, typical 0.9",
            "beta2": "fedadam's beta2, typical 0.99",
        }
        for field, role in roles.items():
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{_PARAMS[field]} must be in [0, 1), got {value}: it is {role}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(
                f"server_tau must be a finite number > 0, got {self.tau}: typical value 1e-3"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | object) -> ServerOptimizerSettings:
        """Settings from federation parameters: a mapping such as the ``[params]`` table
        (or ``ProtocolParams.as_dict()``), or an object with the parameters as attributes
        (``ProtocolParams`` itself). Missing keys take the defaults; other keys are ignored.

        Example::

            >>> ServerOptimizerSettings.from_params({"group_min": 3}).name
            'fedavg'
        """
        values: dict[str, Any] = {}
        for field, key in _PARAMS.items():
            if isinstance(params, Mapping):
                if key in params:
                    values[field] = params[key]
            elif hasattr(params, key):
                values[field] = getattr(params, key)
        return cls(**values)

    def as_params(self) -> dict[str, str | float]:
        """The settings as federation parameters (the inverse of :meth:`from_params`)."""
        return {key: getattr(self, field) for field, key in _PARAMS.items()}


def _vector(value: np.ndarray, what: str, size: int) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.ndim != 1:
        raise TypeError(f"{what} must be a 1-D float32 numpy array (model_to_vector)")
    if value.shape[0] != size:
        raise ValueError(f"{what} has {value.shape[0]} values, the optimiser's model has {size}")
    if not np.isfinite(value).all():
        raise ValueError(f"{what} contains NaN or an infinity")
    return value


def _round_number(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {value!r}")
    return value


class ServerOptimizer:
    """One node's server optimiser: its settings, its state and the round of that state.

    ``size`` is the number of model parameters; ``round`` the round of the last average
    the state has seen (0: fresh). Every node of a federation builds it from the same
    :class:`ServerOptimizerSettings` and applies :meth:`step` to every completed exact
    round, so all nodes hold equal state (see the module docstring).
    """

    def __init__(self, settings: ServerOptimizerSettings, size: int, *, round: int = 0) -> None:
        if not isinstance(settings, ServerOptimizerSettings):
            raise TypeError(f"expected ServerOptimizerSettings, got {type(settings).__name__}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an integer >= 0, got {size!r}")
        self.settings = settings
        self.size = size
        self.round = _round_number(round, "round")
        self._lr = np.float64(settings.lr)
        self._b1 = np.float64(settings.momentum)
        self._b2 = np.float64(settings.beta2)
        self._tau = np.float64(settings.tau)
        # complements in binary64 arithmetic, as the spec says (exact for b >= 0.5)
        self._c1 = np.float64(1) - self._b1
        self._c2 = np.float64(1) - self._b2
        self._m: np.ndarray | None = None
        self._v: np.ndarray | None = None
        self.reset(self.round)

    @property
    def name(self) -> str:
        """The optimiser's name, as in ``server_optimizer``."""
        return self.settings.name

    @property
    def momentum_vector(self) -> np.ndarray | None:
        """The first moment ``m`` (fedavgm, fedadam; float64), or ``None`` for fedavg.
        Read-only view."""
        return None if self._m is None else self._readonly(self._m)

    @property
    def second_moment(self) -> np.ndarray | None:
        """fedadam's second moment ``v`` (float64), else ``None``. Read-only view."""
        return None if self._v is None else self._readonly(self._v)

    @staticmethod
    def _readonly(array: np.ndarray) -> np.ndarray:
        view = array.view()
        view.flags.writeable = False
        return view

    def reset(self, round: int = 0) -> None:
        """Zero the state and set its round: a fresh start, e.g. after adopting a peer's
        model, or when the saved state does not belong with the node's checkpoint."""
        self.round = _round_number(round, "round")
        vectors = _VECTORS[self.name]
        self._m = np.zeros(self.size, dtype=np.float64) if vectors >= 1 else None
        self._v = np.zeros(self.size, dtype=np.float64) if vectors >= 2 else None

    def step(
        self, previous: np.ndarray, average: np.ndarray, *, round: int | None = None
    ) -> np.ndarray:
        """The new model from the round's start model ``previous`` and its ``average``.

        Updates the state, and its round: to ``round`` if given (the node's round after this
        one completes), else one more than before. Both inputs are 1-D float32 vectors of
        :attr:`size` finite values; the result is a new float32 vector.
        """
        _vector(previous, "previous", self.size)
        _vector(average, "average", self.size)
        new_round = self.round + 1 if round is None else _round_number(round, "round")
        if self.name == "fedavgm":
            result = self._fedavgm(previous, average)
        elif self.name == "fedadam":
            result = self._fedadam(previous, average)
        else:
            result = average.copy()
        self.round = new_round
        return result

    # Each line is one binary64 operation of spec/server-optimizer.md, in the spec's order;
    # in-place ufuncs round exactly like the out-of-place ones they replace. The float32
    # inputs are widened exactly, and the result is rounded to float32 once.

    def _fedavgm(self, x32: np.ndarray, a32: np.ndarray) -> np.ndarray:
        assert self._m is not None
        x, a = x32.astype(np.float64), a32.astype(np.float64)
        d = np.subtract(a, x)  # d = a - x
        m = self._m
        np.multiply(m, self._b1, out=m)  # m = beta * m
        np.add(m, d, out=m)  # m = m + d
        t = np.multiply(m, self._lr)  # t = lr * m
        np.subtract(d, t, out=t)  # t = d - t
        return np.subtract(a, t).astype(np.float32)  # x_new = a - t, rounded to float32

    def _fedadam(self, x32: np.ndarray, a32: np.ndarray) -> np.ndarray:
        assert self._m is not None and self._v is not None
        x, a = x32.astype(np.float64), a32.astype(np.float64)
        d = np.subtract(a, x)  # d = a - x
        m, v = self._m, self._v
        t = np.multiply(d, self._c1)  # t = (1 - b1) * d
        np.multiply(m, self._b1, out=m)  # m = b1 * m
        np.add(m, t, out=m)  # m = m + t
        np.multiply(d, d, out=t)  # s = d * d
        np.multiply(t, self._c2, out=t)  # s = (1 - b2) * s
        np.multiply(v, self._b2, out=v)  # v = b2 * v
        np.add(v, t, out=v)  # v = v + s
        q = np.sqrt(v)  # q = sqrt(v)
        np.add(q, self._tau, out=q)  # q = q + tau
        np.multiply(m, self._lr, out=t)  # u = lr * m
        np.divide(t, q, out=t)  # u = u / q
        return np.add(x, t).astype(np.float32)  # x_new = x + u, rounded to float32

    # -- durable state ---------------------------------------------------------------------

    def encode(self) -> bytes:
        """The exact bytes of the state file (layout in the module docstring)."""
        s = self.settings
        header = _HEADER.pack(
            STATE_MAGIC,
            STATE_VERSION,
            s.name.encode("ascii"),
            s.lr,
            s.momentum,
            s.beta2,
            s.tau,
            self.round,
            self.size,
            _VECTORS[s.name],
        )
        vectors = [
            v.astype("<f8", copy=False).tobytes() for v in (self._m, self._v) if v is not None
        ]
        body = b"".join((header, *vectors))
        return body + hashlib.sha256(body).digest()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to ``path`` atomically and durably (mode 0600); returns once on disk.

        Save it whenever the node checkpoints its model: the round in the file is how a
        restarted node knows the two belong together.
        """
        atomic_write_bytes(path, self.encode(), mode=0o600)

    @classmethod
    def decode(
        cls,
        data: bytes,
        expected_size: int,
        settings: ServerOptimizerSettings | None = None,
        *,
        source: str = "<bytes>",
    ) -> ServerOptimizer:
        """Parse and verify state file bytes; :class:`ServerOptimizerStateError` on failure.

        ``settings`` are the ones the node runs with now: the file must be of the same
        optimiser (its hyperparameters may have been retuned since; the state stays valid).
        Without ``settings``, the settings stored in the file are used.
        """

        def bad(what: str) -> ServerOptimizerStateError:
            return ServerOptimizerStateError(
                f"server optimiser state {source} is unusable: {what}. Move it aside to start "
                "the optimiser from zero state (in exact averaging this node's model then "
                "differs slightly from its peers' until the old momentum has decayed)"
            )

        view = memoryview(data)
        if len(view) < 10 or bytes(view[:8]) != STATE_MAGIC:
            raise bad("it does not start with the state magic (not a p2pfed optimiser state)")
        (version,) = struct.unpack_from(">H", view, 8)
        if version not in _READABLE_VERSIONS:
            raise bad(
                f"format version {version}, this p2pfed reads versions "
                f"{', '.join(map(str, sorted(_READABLE_VERSIONS)))} "
                "(it was written by a newer release)"
            )
        dtype = _READABLE_VERSIONS[version]
        width = np.dtype(dtype).itemsize
        if len(view) < _HEADER.size + _DIGEST_BYTES:
            raise bad(f"truncated ({len(view)} bytes)")
        body, digest = view[:-_DIGEST_BYTES], bytes(view[-_DIGEST_BYTES:])
        if hashlib.sha256(body).digest() != digest:
            raise bad("SHA-256 checksum mismatch (truncated or corrupted)")
        _, _, raw_name, lr, momentum, beta2, tau, rnd, size, count = _HEADER.unpack_from(view)
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        if name not in _VECTORS or raw_name != name.encode("ascii").ljust(8, b"\0"):
            raise bad(f"unknown optimiser name {raw_name!r}")
        if count != _VECTORS[name]:
            raise bad(f"{name} keeps {_VECTORS[name]} state vectors, the file has {count}")
        if size != expected_size:
            raise bad(
                f"it is for a model of {size} parameters, this node's model has {expected_size} "
                "(the task's model changed)"
            )
        if len(body) - _HEADER.size != width * count * size:
            raise bad(
                f"{count} vectors of {size} values announced, {len(body) - _HEADER.size} bytes "
                "of state follow"
            )
        try:
            stored = ServerOptimizerSettings(name, lr, momentum, beta2, tau)
        except ConfigError as exc:
            raise bad(f"stored settings are invalid ({exc})") from None
        if settings is not None and settings.name != name:
            raise bad(
                f"it is the state of {name}, but the federation's server_optimizer is "
                f"{settings.name}"
            )
        opt = cls(settings or stored, size, round=rnd)
        state = np.frombuffer(body[_HEADER.size :], dtype=dtype).astype(np.float64)
        if count >= 1:
            opt._m = state[:size].copy()
        if count >= 2:
            opt._v = state[size:].copy()
        if not np.isfinite(state).all() or (opt._v is not None and (opt._v < 0).any()):
            raise bad("the state holds NaN, an infinity or a negative second moment")
        return opt

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_size: int,
        settings: ServerOptimizerSettings | None = None,
    ) -> ServerOptimizer | None:
        """Read the state saved at ``path``; ``None`` if there is no such file.

        Raises :class:`ServerOptimizerStateError` if the file is corrupt, truncated, of
        another format version or optimiser, or for a model of a size other than
        ``expected_size`` (its length is checked before it is read). Compare the returned
        optimiser's :attr:`round` with the checkpoint's round: if they differ (a crash
        between the two writes), :meth:`reset` it instead of using the state.
        """
        target = Path(path)
        try:
            with open(target, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                vectors = max(_VECTORS.values())
                limit = _HEADER.size + 8 * vectors * max(expected_size, 0) + _DIGEST_BYTES
                if size > limit:
                    raise ServerOptimizerStateError(
                        f"server optimiser state {target} is {size} bytes, more than any "
                        f"state of a {expected_size}-parameter model ({limit}); move it aside"
                    )
                data = f.read(size + 1)
        except FileNotFoundError:
            return None
        except IsADirectoryError as exc:
            raise ServerOptimizerStateError(f"state path {target} is a directory") from exc
        except PermissionError as exc:
            raise ServerOptimizerStateError(f"state {target} is not readable: {exc}") from exc
        return cls.decode(data, expected_size, settings, source=str(target))
