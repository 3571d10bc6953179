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
from p2pfed.schema import (
    FieldError,
    Rule,
    Schema,
    check_fields,
    rules_of,
    setting,
    unknown_keys_message,
)
from p2pfed.tomlfile import toml_value

__all__ = [
    "FEDERATION_ID_SIZE",
    "FEDERATION_SECRET_SIZE",
    "FEDERATION_TAG_DOMAIN",
    "MODEL_FINGERPRINT_SIZE",
    "RECORD_LEVEL_DEFAULTS",
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


_AVERAGING_MODES = ("exact", "random")
_DP_LEVELS = ("node", "record", "distributed")

RECORD_LEVEL_DEFAULTS: Mapping[str, float | int | str] = {
    "dp_sample_rate": 0.25,
    "dp_steps": 2,
    "server_optimizer": "fedavgm",
    "server_momentum": 0.9,
}
"""What ``p2pfed federation new --dp record`` chooses unless told otherwise: few DP-SGD steps
a round on large Poisson batches (a quarter of a node's records), with server momentum to
carry the small clipped steps across rounds. Large batches need less noise per record for
the same epsilon, which matters because each node's release must be private on its own.
Chosen on public data (``python -m bench.dp_defaults``: scikit-learn's digits, 3 nodes,
100 rounds at epsilon 8; bench/privacy.py's generated data), not on any federation's
data, so no tuning is charged to a budget. A file that omits these keys still takes the
:class:`ProtocolParams` defaults (spec/identity.md)."""


def _ring_bits(value: int) -> int:
    if value not in (32, 64):
        raise ValueError(f"must be 32 or 64, got {value}")
    return value


@dataclass(frozen=True)
class ProtocolParams:
    """Protocol parameters every member of a federation must agree on.

    ``[params]`` in the federation file. Each field declares its key once
    (:func:`p2pfed.schema.setting`): type, range, default and the comment
    :meth:`Federation.to_toml` writes above it. Validated at construction; an invalid value
    raises :class:`~p2pfed.errors.ConfigError` naming the parameter and the allowed range.
    Whether ``fixed_point_bits``, ``clip`` and ``group_max`` leave enough fixed-point
    resolution is checked by the fixed-point encoding, which owns the scale; the ranges of
    the server optimiser's settings are checked by :mod:`p2pfed.server_optimizer`.
    """

    group_min: int = setting(
        3,
        "int",
        low=3,
        why="a group of 2 reveals each member's model to the other",
        help="smallest group that may aggregate (>= 3: a group of 2 reveals the other's model)",
    )
    """Smallest group that may aggregate. At least 3: in a group of 2, the sum minus your own
    contribution is the other member's model."""
    group_max: int = setting(
        8, "int", low=3, high=_MAX_GROUP, help="largest group (group_min .. 64)"
    )
    """Largest group (group_min <= group_max <= 64)."""
    max_message_size: int = setting(
        256 * 1024 * 1024,
        "int",
        low=_MIN_MESSAGE_SIZE,
        high=_MAX_MESSAGE_SIZE,
        unit="bytes",
        help="largest protocol message in bytes (65535 .. 4294967295)",
    )
    """Largest application message in bytes (65535 .. 2^32-1); bounds every allocation."""
    fixed_point_bits: int = setting(
        64, "int", check=_ring_bits, help="secure-aggregation ring size: 32 or 64"
    )
    """Ring size of the secure-aggregation arithmetic: 32 or 64 bits."""
    clip: float = setting(
        8.0,
        "float",
        low=0,
        low_open=True,
        help="model values are clipped to [-clip, clip] before fixed-point encoding",
    )
    """Model values are clipped to [-clip, clip] before fixed-point encoding (> 0)."""
    dp_enabled: bool = setting(
        True, "bool", help="local differential privacy: clip and noise every contribution"
    )
    """Whether every contribution is clipped and noised (local differential privacy)."""
    dp_clip_norm: float = setting(
        1.0,
        "float",
        low=0,
        low_open=True,
        help="C: L2 norm to which a model update is clipped",
    )
    """L2 norm C to which a model update is clipped (> 0)."""
    dp_noise_multiplier: float = setting(
        12.76, "float", help="sigma: Gaussian noise standard deviation is sigma * C"
    )
    """sigma: the Gaussian noise added has standard deviation sigma * C (> 0 when enabled).
    The default is what ``p2pfed federation new --dp node`` calibrates for 100 rounds at
    epsilon 8, delta 1e-5 (:func:`p2pfed.dp.calibrate`)."""
    dp_delta: float = setting(
        1e-5,
        "float",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
        help="delta of the (epsilon, delta) privacy guarantee",
    )
    """delta of the (epsilon, delta) guarantee, 0 < delta < 1."""
    dp_epsilon_budget: float = setting(
        8.0,
        "float",
        low=0,
        low_open=True,
        help="total epsilon a node may spend before it stops contributing",
    )
    """Total epsilon a node may spend; it stops contributing once reached (> 0)."""
    dp_level: str = setting(
        "node",
        "str",
        choices=_DP_LEVELS,
        help='DP unit: "node" (whole local dataset), "record" (one record: DP-SGD) or '
        '"distributed" (whole dataset, noise shared by the group)',
    )
    """What one neighbouring change is (spec/privacy.md): "node" (a node's whole dataset:
    its round update is clipped and noised), "record" (one record: DP-SGD in local
    training, with ``dp_sample_rate`` and ``dp_steps``) or "distributed" (a node's whole
    dataset, the noise shared out among the members of a group: spec/privacy.md 2B)."""
    dp_sample_rate: float = setting(
        0.02,
        "float",
        low=0,
        high=1,
        low_open=True,
        help="record level: probability a record joins a DP-SGD step's batch",
    )
    """Record level: probability that a record joins a DP-SGD step's batch, in (0, 1]."""
    dp_steps: int = setting(
        50, "int", low=1, high=1_000_000, help="record level: DP-SGD steps per round"
    )
    """Record level: DP-SGD steps per round (1 .. 1000000)."""
    averaging: str = setting(
        "exact",
        "str",
        choices=_AVERAGING_MODES,
        help='groups: "exact" (the exact average every round) or "random"',
    )
    """How groups are chosen (spec/group.md): "exact" (every round ends with every node
    holding the exact weighted average of all nodes' models, in a few steps of small
    groups; falls back to random groups for a round it cannot complete) or "random"
    (random groups, ``random_steps`` of them per round: for very large or churning
    federations)."""
    random_steps: int = setting(
        0,
        "int",
        low=0,
        high=16,
        why="0: automatic",
        help="random averaging: groups per round (0: enough for the federation's size)",
    )
    """Random averaging: groups a node joins after each local training round (push-sum
    gossip: more steps, closer agreement). 0: enough for a federation of the size the node
    sees (``random_steps_for``); 1 .. 16: that many."""
    min_nodes: int = setting(
        0,
        "int",
        low=0,
        high=65536,
        help="exact rounds: the first round waits for this many nodes (0: no minimum)",
    )
    """Exact rounds: a fresh federation's first round starts only once a node sees at
    least this many nodes (itself included), like Flower's ``min_available_clients``
    (0: as soon as its peers stop changing)."""
    server_optimizer: str = setting(
        "fedavg",
        "str",
        help='applied to each round\'s average: "fedavg", "fedavgm" or "fedadam"',
    )
    """What every node does with a round's average (spec/server-optimizer.md): "fedavg"
    (adopt it), "fedavgm" (server momentum) or "fedadam" (Reddi et al. 2021)."""
    server_lr: float = setting(1.0, "float", help="server learning rate (fedavgm, fedadam)")
    """Server learning rate of fedavgm and fedadam (> 0)."""
    server_momentum: float = setting(
        0.9, "float", help="fedavgm momentum / fedadam beta1, in [0, 1)"
    )
    """fedavgm's momentum, fedadam's beta1, in [0, 1)."""
    server_beta2: float = setting(0.99, "float", help="fedadam beta2, in [0, 1)")
    """fedadam's beta2, in [0, 1)."""
    server_tau: float = setting(1e-3, "float", help="fedadam tau (> 0)")
    """fedadam's adaptivity tau (> 0)."""
    federation_metrics: bool = setting(
        True,
        "bool",
        help="share evaluation sums for federation-wide accuracy and loss (off while dp_enabled)",
    )
    """Append each member's evaluation sums (correct count, loss sum, sample count, each
    divided by its weight) to the averaged vector, so that every node learns the
    federation's accuracy and loss (spec/group.md, "Federation metrics"). Never with DP
    on: see :attr:`federation_metrics_active`."""

    AVERAGING_MODES: ClassVar[tuple[str, ...]] = _AVERAGING_MODES
    DP_LEVELS: ClassVar[tuple[str, ...]] = _DP_LEVELS

    def __post_init__(self) -> None:
        try:
            check_fields(self)
            self._check_together()
        except FieldError as exc:
            raise ConfigError(f"invalid protocol parameter: {exc.key} {exc.problem}") from None
        self._check_server_optimizer()

    def _check_together(self) -> None:
        if not self.group_min <= self.group_max:
            raise FieldError(
                "group_max",
                f"must be between group_min ({self.group_min}) and {_MAX_GROUP}, "
                f"got {self.group_max}",
            )
        if self.dp_noise_multiplier < 0 or (self.dp_enabled and self.dp_noise_multiplier == 0):
            raise FieldError(
                "dp_noise_multiplier",
                "must be > 0 when dp_enabled is true (0 would add no noise and give no "
                f"privacy), got {self.dp_noise_multiplier}",
            )

    def _check_server_optimizer(self) -> None:
        # the optimiser owns its settings' rules (p2pfed/server_optimizer.py)
        from p2pfed.server_optimizer import ServerOptimizerSettings

        try:
            ServerOptimizerSettings.from_params(self)
        except ConfigError as exc:
            raise ConfigError(f"invalid protocol parameter: {exc}") from None

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
                unknown_keys_message(unknown, cls.allowed_keys(), "protocol parameter")
            )
        return cls(**values)

    def as_dict(self) -> dict[str, int | float | bool | str]:
        """The parameters as a plain dict, in file order."""
        return {name: getattr(self, name) for name in self.allowed_keys()}


def _hex(size: int) -> Callable[[Any], bytes]:
    """A check turning a hex string of ``size`` bytes into bytes."""

    def convert(value: Any) -> bytes:
        if not isinstance(value, str):
            raise ValueError(f"must be a hex string, got {value!r}")
        # bytes.fromhex would also accept spaces; the format allows only hex digits.
        if not _HEX_RE.fullmatch(value):
            raise ValueError(f"is not valid hex ({size * 2} hex digits expected)")
        raw = bytes.fromhex(value)
        if len(raw) != size:
            raise ValueError(f"must be {size} bytes ({size * 2} hex digits), got {len(raw)} bytes")
        return raw

    return convert


_FEDERATION_TABLE = Schema(
    {
        # the name's and version's rules belong to Federation (files and code alike)
        "name": Rule("any", required=True),
        "id": Rule("any", required=True, check=_hex(FEDERATION_ID_SIZE)),
        "secret": Rule("any", required=True, check=_hex(FEDERATION_SECRET_SIZE)),
        "protocol_version": Rule("int", required=True),
        "model_fingerprint": Rule("any", optional=True, check=_hex(MODEL_FINGERPRINT_SIZE)),
    }
)
"""The keys of a federation file's ``[federation]`` table."""


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
        helps = rules_of(ProtocolParams)
        for name, value in self.params.as_dict().items():
            lines.append(f"# {helps[name].help}")
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
        unknown = _FEDERATION_TABLE.unknown(fed)
        if unknown:
            message = unknown_keys_message(unknown, _FEDERATION_TABLE.keys())
            raise ConfigError(f"{source}: {message.replace('(s)', '(s) in [federation]:', 1)}")
        for key in _FEDERATION_TABLE.missing(fed):
            raise ConfigError(f"{source}: [federation] is missing the key {key!r}")
        params_table = doc.get("params", {})
        if not isinstance(params_table, dict):
            raise ConfigError(f"{source}: params must be a table ([params])")
        try:
            values = {key: _FEDERATION_TABLE.convert(key, value) for key, value in fed.items()}
        except FieldError as exc:
            raise ConfigError(f"{source}: federation.{exc.key} {exc.problem}") from None
        try:
            return cls(
                name=values["name"],
                federation_id=values["id"],
                secret=values["secret"],
                protocol_version=values["protocol_version"],
                params=ProtocolParams.from_mapping(params_table),
                model_fingerprint=values.get("model_fingerprint"),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


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
