"""Federation files: the shared secret and parameters that make a set of nodes one federation.

An operator creates a federation once (``p2pfed federation new NAME``) and copies the file to
every member node as ``federation.toml``. The file holds the federation's name, a random
16-byte id, a random 32-byte secret (the Noise pre-shared key: a node without it cannot
complete a handshake with members), the protocol version and the protocol parameters every
member must agree on. Normative description: spec/identity.md, "Federation file".

Example::

    >>> fed = Federation.new("lab")
    >>> Federation.from_toml(fed.to_toml()) == fed
    True
    >>> len(fed.tag)
    16

Permissions: files are written with mode 0600. On loading, a file readable by group or others
is *accepted with a warning* (logged on ``p2pfed.federation``), unlike the identity key,
which is refused: the federation file is meant to be copied between machines by operators,
and a refusal would mostly punish a harmless ``cp``; the warning says to ``chmod 600``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from p2pfed.atomicfile import atomic_write_text
from p2pfed.errors import ConfigError
from p2pfed.tomlfile import toml_value

__all__ = [
    "FEDERATION_ID_SIZE",
    "FEDERATION_SECRET_SIZE",
    "FEDERATION_TAG_DOMAIN",
    "MODEL_FINGERPRINT_SIZE",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "Federation",
    "ProtocolParams",
    "load_federation",
    "save_federation",
    "task_model_fingerprint",
]

log = logging.getLogger("p2pfed.federation")

FEDERATION_ID_SIZE = 16
FEDERATION_SECRET_SIZE = 32
FEDERATION_TAG_DOMAIN = b"p2pfed-federation-tag:v1"
MODEL_FINGERPRINT_SIZE = 32
SUPPORTED_PROTOCOL_VERSIONS = frozenset({1})
# A federation file is about 2 KiB; refuse to read anything absurdly large.
_MAX_FILE_SIZE = 1024 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})*")
# Noise transport messages are at most 65535 bytes; a protocol message must at least hold one,
# and the application framing carries a 32-bit length.
_MIN_MESSAGE_SIZE = 65535
_MAX_MESSAGE_SIZE = 2**32 - 1
_MAX_GROUP = 64


class _ParamError(ValueError):
    """Internal: a parameter is invalid; converted to ConfigError naming the file."""


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ParamError(f"{name} must be an integer, got {value!r}")
    return value


def _float(name: str, value: Any) -> float:
    # TOML writes 8 and 8.0 differently; both mean the same parameter.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _ParamError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise _ParamError(f"{name} must be a finite number, got {value!r}")
    return result


@dataclass(frozen=True)
class ProtocolParams:
    """Protocol parameters every member of a federation must agree on.

    Validated at construction; an invalid value raises :class:`~p2pfed.errors.ConfigError`
    naming the parameter and the allowed range. ``[params]`` in the federation file.
    Whether ``fixed_point_bits``, ``clip`` and ``group_max`` leave enough fixed-point
    resolution is checked by the fixed-point encoding, which owns the scale.
    """

    group_min: int = 3
    """Smallest group that may aggregate. At least 3: in a group of 2, the sum minus your own
    contribution is the other member's model."""
    group_max: int = 8
    """Largest group (group_min <= group_max <= 64)."""
    max_message_size: int = 256 * 1024 * 1024
    """Largest application message in bytes (65535 .. 2^32-1); bounds every allocation."""
    fixed_point_bits: int = 64
    """Ring size of the secure-aggregation arithmetic: 32 or 64 bits."""
    clip: float = 8.0
    """Model values are clipped to [-clip, clip] before fixed-point encoding (> 0)."""
    dp_enabled: bool = True
    """Whether every contribution is clipped and noised (local differential privacy)."""
    dp_clip_norm: float = 1.0
    """L2 norm C to which a model update is clipped (> 0)."""
    dp_noise_multiplier: float = 12.76
    """sigma: the Gaussian noise added has standard deviation sigma * C (> 0 when enabled).
    The default is what ``p2pfed federation new --dp node`` calibrates for 100 rounds at
    epsilon 8, delta 1e-5 (:func:`p2pfed.dp.calibrate`)."""
    dp_delta: float = 1e-5
    """delta of the (epsilon, delta) guarantee, 0 < delta < 1."""
    dp_epsilon_budget: float = 8.0
    """Total epsilon a node may spend; it stops contributing once reached (> 0)."""
    dp_level: str = "node"
    """What one neighbouring change is (spec/privacy.md): "node" (a node's whole dataset:
    its round update is clipped and noised), "record" (one record: DP-SGD in local
    training, with ``dp_sample_rate`` and ``dp_steps``) or "distributed" (a node's whole
    dataset, the noise shared out among the members of a group: spec/privacy.md 2B)."""
    dp_sample_rate: float = 0.02
    """Record level: probability that a record joins a DP-SGD step's batch, in (0, 1]."""
    dp_steps: int = 50
    """Record level: DP-SGD steps per round (1 .. 1000000)."""
    averaging: str = "exact"
    """How groups are chosen (spec/group.md): "exact" (every round ends with every node
    holding the exact weighted average of all nodes' models, in a few steps of small
    groups; falls back to random groups for a round it cannot complete) or "random"
    (random groups, ``random_steps`` of them per round: for very large or churning
    federations)."""
    random_steps: int = 0
    """Random averaging: groups a node joins after each local training round (push-sum
    gossip: more steps, closer agreement). 0: enough for a federation of the size the node
    sees (``random_steps_for``); 1 .. 16: that many."""
    min_nodes: int = 0
    """Exact rounds: a fresh federation's first round starts only once a node sees at
    least this many nodes (itself included), like Flower's ``min_available_clients``
    (0: as soon as its peers stop changing)."""
    server_optimizer: str = "fedavg"
    """What every node does with a round's average (spec/server-optimizer.md): "fedavg"
    (adopt it), "fedavgm" (server momentum) or "fedadam" (Reddi et al. 2021)."""
    server_lr: float = 1.0
    """Server learning rate of fedavgm and fedadam (> 0)."""
    server_momentum: float = 0.9
    """fedavgm's momentum, fedadam's beta1, in [0, 1)."""
    server_beta2: float = 0.99
    """fedadam's beta2, in [0, 1)."""
    server_tau: float = 1e-3
    """fedadam's adaptivity tau (> 0)."""
    federation_metrics: bool = True
    """Append each member's evaluation sums (correct count, loss sum, sample count, each
    divided by its weight) to the averaged vector, so that every node learns the
    federation's accuracy and loss (spec/group.md, "Federation metrics"). Never with DP
    on: see :attr:`federation_metrics_active`."""

    AVERAGING_MODES: ClassVar[tuple[str, ...]] = ("exact", "random")
    DP_LEVELS: ClassVar[tuple[str, ...]] = ("node", "record", "distributed")

    FLOAT_FIELDS: ClassVar[tuple[str, ...]] = (
        "clip",
        "dp_clip_norm",
        "dp_noise_multiplier",
        "dp_delta",
        "dp_epsilon_budget",
        "dp_sample_rate",
        "server_lr",
        "server_momentum",
        "server_beta2",
        "server_tau",
    )

    def __post_init__(self) -> None:
        try:
            self._validate()
        except _ParamError as exc:
            raise ConfigError(f"invalid protocol parameter: {exc}") from None

    def _validate(self) -> None:
        for name in self.FLOAT_FIELDS:
            object.__setattr__(self, name, _float(name, getattr(self, name)))
        group_min = _int("group_min", self.group_min)
        group_max = _int("group_max", self.group_max)
        if group_min < 3:
            raise _ParamError(
                f"group_min must be at least 3 (a group of 2 reveals each member's model to "
                f"the other), got {group_min}"
            )
        if not group_min <= group_max <= _MAX_GROUP:
            raise _ParamError(
                f"group_max must be between group_min ({group_min}) and {_MAX_GROUP}, "
                f"got {group_max}"
            )
        size = _int("max_message_size", self.max_message_size)
        if not _MIN_MESSAGE_SIZE <= size <= _MAX_MESSAGE_SIZE:
            raise _ParamError(
                f"max_message_size must be between {_MIN_MESSAGE_SIZE} and {_MAX_MESSAGE_SIZE} "
                f"bytes, got {size}"
            )
        bits = _int("fixed_point_bits", self.fixed_point_bits)
        if bits not in (32, 64):
            raise _ParamError(f"fixed_point_bits must be 32 or 64, got {bits}")
        if self.clip <= 0:
            raise _ParamError(f"clip must be > 0, got {self.clip}")
        if not isinstance(self.dp_enabled, bool):
            raise _ParamError(f"dp_enabled must be true or false, got {self.dp_enabled!r}")
        if not isinstance(self.federation_metrics, bool):
            raise _ParamError(
                f"federation_metrics must be true or false, got {self.federation_metrics!r}"
            )
        if self.dp_clip_norm <= 0:
            raise _ParamError(f"dp_clip_norm must be > 0, got {self.dp_clip_norm}")
        if self.dp_noise_multiplier < 0 or (self.dp_enabled and self.dp_noise_multiplier == 0):
            raise _ParamError(
                f"dp_noise_multiplier must be > 0 when dp_enabled is true (0 would add no "
                f"noise and give no privacy), got {self.dp_noise_multiplier}"
            )
        if not 0 < self.dp_delta < 1:
            raise _ParamError(f"dp_delta must be strictly between 0 and 1, got {self.dp_delta}")
        if self.dp_epsilon_budget <= 0:
            raise _ParamError(f"dp_epsilon_budget must be > 0, got {self.dp_epsilon_budget}")
        if self.dp_level not in self.DP_LEVELS:
            raise _ParamError(
                f'dp_level must be "node", "record" or "distributed", got {self.dp_level!r}'
            )
        if not 0 < self.dp_sample_rate <= 1:
            raise _ParamError(f"dp_sample_rate must be in (0, 1], got {self.dp_sample_rate}")
        dp_steps = _int("dp_steps", self.dp_steps)
        if not 1 <= dp_steps <= 1_000_000:
            raise _ParamError(f"dp_steps must be between 1 and 1000000, got {dp_steps}")
        random_steps = _int("random_steps", self.random_steps)
        if not 0 <= random_steps <= 16:
            raise _ParamError(
                f"random_steps must be between 0 (automatic) and 16, got {random_steps}"
            )
        min_nodes = _int("min_nodes", self.min_nodes)
        if not 0 <= min_nodes <= 65536:
            raise _ParamError(f"min_nodes must be between 0 and 65536, got {min_nodes}")
        if self.averaging not in self.AVERAGING_MODES:
            raise _ParamError(f'averaging must be "exact" or "random", got {self.averaging!r}')
        self._validate_server_optimizer()

    def _validate_server_optimizer(self) -> None:
        # the optimiser owns its settings' rules (p2pfed/server_optimizer.py)
        from p2pfed.server_optimizer import ServerOptimizerSettings

        try:
            ServerOptimizerSettings.from_params(self)
        except ConfigError as exc:
            raise _ParamError(str(exc)) from None

    @property
    def federation_metrics_active(self) -> bool:
        """Whether contributions carry the evaluation words: ``federation_metrics``, and
        DP off (evaluation sums are data-dependent and would be released without noise or
        accounting, spec/group.md, "Federation metrics")."""
        return self.federation_metrics and not self.dp_enabled

    @classmethod
    def allowed_keys(cls) -> list[str]:
        """The keys of the ``[params]`` table, in file order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ProtocolParams:
        """Parameters from a ``[params]`` table; missing keys take their defaults."""
        unknown = sorted(set(values) - set(cls.allowed_keys()))
        if unknown:
            raise ConfigError(
                f"unknown protocol parameter(s) {', '.join(unknown)}; allowed keys are: "
                f"{', '.join(cls.allowed_keys())}"
            )
        return cls(**values)

    def as_dict(self) -> dict[str, int | float | bool | str]:
        """The parameters as a plain dict, in file order."""
        return {name: getattr(self, name) for name in self.allowed_keys()}


_PARAM_COMMENTS: dict[str, str] = {
    "group_min": "smallest group that may aggregate (>= 3: a group of 2 reveals the other's model)",
    "group_max": "largest group (group_min .. 64)",
    "max_message_size": "largest protocol message in bytes (65535 .. 4294967295)",
    "fixed_point_bits": "secure-aggregation ring size: 32 or 64",
    "clip": "model values are clipped to [-clip, clip] before fixed-point encoding",
    "dp_enabled": "local differential privacy: clip and noise every contribution",
    "dp_clip_norm": "C: L2 norm to which a model update is clipped",
    "dp_noise_multiplier": "sigma: Gaussian noise standard deviation is sigma * C",
    "dp_delta": "delta of the (epsilon, delta) privacy guarantee",
    "dp_epsilon_budget": "total epsilon a node may spend before it stops contributing",
    "dp_level": 'DP unit: "node" (whole local dataset), "record" (one record: DP-SGD) or '
    '"distributed" (whole dataset, noise shared by the group)',
    "dp_sample_rate": "record level: probability a record joins a DP-SGD step's batch",
    "dp_steps": "record level: DP-SGD steps per round",
    "averaging": 'groups: "exact" (the exact average every round) or "random"',
    "random_steps": "random averaging: groups per round (0: enough for the federation's size)",
    "min_nodes": "exact rounds: the first round waits for this many nodes (0: no minimum)",
    "server_optimizer": 'applied to each round\'s average: "fedavg", "fedavgm" or "fedadam"',
    "server_lr": "server learning rate (fedavgm, fedadam)",
    "server_momentum": "fedavgm momentum / fedadam beta1, in [0, 1)",
    "server_beta2": "fedadam beta2, in [0, 1)",
    "server_tau": "fedadam tau (> 0)",
    "federation_metrics": "share evaluation sums for federation-wide accuracy and loss "
    "(off while dp_enabled)",
}


def _hex_field(source: str, key: str, value: Any, size: int) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: federation.{key} must be a hex string, got {value!r}")
    # bytes.fromhex would also accept spaces; the format allows only hex digits.
    if not _HEX_RE.fullmatch(value):
        raise ConfigError(
            f"{source}: federation.{key} is not valid hex ({size * 2} hex digits expected)"
        )
    raw = bytes.fromhex(value)
    if len(raw) != size:
        raise ConfigError(
            f"{source}: federation.{key} must be {size} bytes ({size * 2} hex digits), "
            f"got {len(raw)} bytes"
        )
    return raw


@dataclass(frozen=True)
class Federation:
    """A federation: name, random id, shared secret, protocol version and parameters.

    The ``secret`` is the Noise pre-shared key of every connection between members; it is
    excluded from ``repr`` so it does not leak into logs.
    """

    name: str
    federation_id: bytes
    secret: bytes = field(repr=False)
    protocol_version: int = 1
    params: ProtocolParams = field(default_factory=ProtocolParams)
    model_fingerprint: bytes | None = None
    """The task's model fingerprint (p2pfed.model_vector.model_fingerprint) if the file
    names one: a node whose task builds another layout refuses to start."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ConfigError(
                f"invalid federation name {self.name!r}: use 1 to 63 characters from "
                "A-Z a-z 0-9 . _ -"
            )
        if not isinstance(self.federation_id, bytes) or len(self.federation_id) != (
            FEDERATION_ID_SIZE
        ):
            raise ConfigError(f"a federation id is exactly {FEDERATION_ID_SIZE} bytes")
        if not isinstance(self.secret, bytes) or len(self.secret) != FEDERATION_SECRET_SIZE:
            raise ConfigError(f"a federation secret is exactly {FEDERATION_SECRET_SIZE} bytes")
        if (
            isinstance(self.protocol_version, bool)
            or not isinstance(self.protocol_version, int)
            or self.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS
        ):
            raise ConfigError(
                f"protocol_version {self.protocol_version!r} is not supported by this p2pfed "
                f"(supported: {', '.join(map(str, sorted(SUPPORTED_PROTOCOL_VERSIONS)))}); "
                "upgrade p2pfed or recreate the federation"
            )
        if not isinstance(self.params, ProtocolParams):
            raise ConfigError("params must be a ProtocolParams")
        if self.model_fingerprint is not None and (
            not isinstance(self.model_fingerprint, bytes)
            or len(self.model_fingerprint) != MODEL_FINGERPRINT_SIZE
        ):
            raise ConfigError(f"a model fingerprint is exactly {MODEL_FINGERPRINT_SIZE} bytes")

    @classmethod
    def new(
        cls,
        name: str,
        randbytes: Callable[[int], bytes] = os.urandom,
        params: ProtocolParams | None = None,
    ) -> Federation:
        """A new federation with a random id and secret drawn from ``randbytes``."""
        federation_id = randbytes(FEDERATION_ID_SIZE)
        secret = randbytes(FEDERATION_SECRET_SIZE)
        return cls(
            name=name,
            federation_id=federation_id,
            secret=secret,
            params=params if params is not None else ProtocolParams(),
        )

    @property
    def tag(self) -> str:
        """16 hex chars: ``SHA-256(b"p2pfed-federation-tag:v1" || federation_id)[:8]``.

        Public (announced in mDNS TXT records) so that nodes ignore other federations
        without connecting; it reveals nothing about the secret.
        """
        return hashlib.sha256(FEDERATION_TAG_DOMAIN + self.federation_id).digest()[:8].hex()

    def to_toml(self) -> str:
        """The federation file text, with a comment explaining each field."""
        lines = [
            '# p2pfed federation file (spec/identity.md, "Federation file").',
            "#",
            "# Copy this file to every member node as <node dir>/federation.toml.",
            "# It contains the federation SECRET: anyone holding this file can join the",
            "# federation. Keep it readable only by you (chmod 600) and send it only over",
            "# channels you trust. Every member must use an identical copy.",
            "",
            "[federation]",
            "# Human-readable name: 1-63 characters from A-Z a-z 0-9 . _ -",
            f"name = {toml_value(self.name)}",
            f"# Random {FEDERATION_ID_SIZE}-byte federation id, hex. Public; its tag is "
            f"{self.tag}.",
            f"id = {toml_value(self.federation_id.hex())}",
            f"# Random {FEDERATION_SECRET_SIZE}-byte secret, hex: the Noise pre-shared key. "
            "KEEP IT SECRET.",
            f"secret = {toml_value(self.secret.hex())}",
            "# Version of the p2pfed wire protocol this federation speaks.",
            f"protocol_version = {toml_value(self.protocol_version)}",
        ]
        if self.model_fingerprint is not None:
            lines += [
                "# SHA-256 fingerprint of the task's model layout (tensor names, dtypes, "
                "shapes), hex:",
                "# a node whose task builds another layout refuses to start.",
                f"model_fingerprint = {toml_value(self.model_fingerprint.hex())}",
            ]
        lines += [
            "",
            "# Protocol parameters: every member must use the same values.",
            "[params]",
        ]
        for name, value in self.params.as_dict().items():
            lines.append(f"# {_PARAM_COMMENTS[name]}")
            lines.append(f"{name} = {toml_value(value)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> Federation:
        """Parse a federation file's text; ``source`` names the file in error messages."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not a valid TOML file: {exc}") from None
        unknown = sorted(set(doc) - {"federation", "params"})
        if unknown:
            raise ConfigError(
                f"{source}: unknown top-level key(s) {', '.join(unknown)}; a federation file "
                "has only the tables [federation] and [params]"
            )
        fed = doc.get("federation")
        if not isinstance(fed, dict):
            raise ConfigError(f"{source}: missing the [federation] table")
        allowed = ["name", "id", "secret", "protocol_version", "model_fingerprint"]
        unknown = sorted(set(fed) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) in [federation]: {', '.join(unknown)}; allowed keys "
                f"are: {', '.join(allowed)}"
            )
        for key in ("name", "id", "secret", "protocol_version"):
            if key not in fed:
                raise ConfigError(f"{source}: [federation] is missing the key {key!r}")
        params_table = doc.get("params", {})
        if not isinstance(params_table, dict):
            raise ConfigError(f"{source}: params must be a table ([params])")
        try:
            params = ProtocolParams.from_mapping(params_table)
            protocol_version = fed["protocol_version"]
            if isinstance(protocol_version, bool) or not isinstance(protocol_version, int):
                raise ConfigError(
                    f"federation.protocol_version must be an integer, got {protocol_version!r}"
                )
            return cls(
                name=fed["name"],
                federation_id=_hex_field(source, "id", fed["id"], FEDERATION_ID_SIZE),
                secret=_hex_field(source, "secret", fed["secret"], FEDERATION_SECRET_SIZE),
                protocol_version=protocol_version,
                params=params,
                model_fingerprint=(
                    _hex_field(
                        source,
                        "model_fingerprint",
                        fed["model_fingerprint"],
                        MODEL_FINGERPRINT_SIZE,
                    )
                    if "model_fingerprint" in fed
                    else None
                ),
            )
        except ConfigError as exc:
            message = str(exc)
            if message.startswith(f"{source}:"):
                raise
            raise ConfigError(f"{source}: {message}") from None


def task_model_fingerprint(
    task_spec: str, settings: Mapping[str, Any], federation: Federation
) -> bytes:
    """The model fingerprint of the task ``task_spec`` ("module:object") built with
    ``settings`` as a member of ``federation`` would build it (torch is imported here)."""
    from p2pfed.model_vector import model_fingerprint
    from p2pfed.node import federation_seed
    from p2pfed.task import load_task

    task = load_task(task_spec)
    config = {"device": "cpu", "seed": federation_seed(federation), **settings}
    return model_fingerprint(task.build_model(config), task.name)


def load_federation(path: str | os.PathLike[str]) -> Federation:
    """Read and validate the federation file at ``path``.

    Raises :class:`~p2pfed.errors.ConfigError` naming the file and the field on any problem.
    A file readable by group or others is accepted with a logged warning (see module doc).
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: no federation file; copy your federation's file here, or create a new "
            f"federation with `p2pfed federation new NAME -o {p}`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the federation file: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{p}: the federation file is not a regular file")
    if st.st_size > _MAX_FILE_SIZE:
        raise ConfigError(
            f"{p}: {st.st_size} bytes is far too large for a federation file "
            f"(limit {_MAX_FILE_SIZE}); is this the right file?"
        )
    if st.st_mode & 0o077:
        log.warning(
            "%s: permissions %04o let other users read the federation secret; run `chmod 600 %s`",
            p,
            stat.S_IMODE(st.st_mode),
            p,
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file; is this a federation file?") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the federation file: {exc.strerror}") from None
    return Federation.from_toml(text, source=str(p))


def save_federation(path: str | os.PathLike[str], fed: Federation, *, force: bool = False) -> None:
    """Write ``fed`` to ``path`` atomically with mode 0600.

    Refuses (ConfigError) to replace an existing file unless ``force``: replacing a
    federation file loses its secret, and every member would have to receive the new file.
    """
    p = Path(path)
    if not p.parent.is_dir():
        raise ConfigError(f"{p}: the directory {p.parent} does not exist; create it first")
    if not force and (p.exists() or p.is_symlink()):
        raise ConfigError(
            f"{p} already exists; refusing to overwrite it (its federation secret would be "
            "lost); choose another file or pass --force"
        )
    atomic_write_text(p, fed.to_toml(), mode=0o600)
