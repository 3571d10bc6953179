"""Node configuration: ``config.toml`` in the node directory, and where node directories live.

A node directory (``$P2PFED_HOME``, else ``~/.p2pfed``) holds ``identity.key`` (the node's
Ed25519 key, see :mod:`p2pfed.identity`), ``config.toml`` (this module) and
``federation.toml`` (see :mod:`p2pfed.federation`). Every key of ``config.toml`` is optional;
a missing ``config.toml`` means all defaults. Unknown keys are errors (a typo must not silently
fall back to a default).

The training task is named either by a top-level ``task = "package.module:object"`` or by
a ``[task]`` table whose ``name`` key names it and whose every other key is a *task
setting*, handed to the task as its ``config`` dict (see :mod:`p2pfed.task`)::

    [task]
    name = "p2pfed.tasks.digits:task"
    node_index = 0
    num_nodes = 3

(TOML allows only one of the two forms in a file: a key ``task`` and a table ``[task]``
would define the same key twice.)

Example::

    >>> parse_config("listen_port = 9000\\nbootstrap = ['10.0.0.2:7447']").listen_port
    9000
    >>> c = parse_config('[task]\\nname = "mytasks.mnist:task"\\nlr = 0.05')
    >>> c.task, c.task_settings
    ('mytasks.mnist:task', {'lr': 0.05})
    >>> parse_config(default_config_text()) == NodeConfig()
    True
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from p2pfed.errors import ConfigError
from p2pfed.federation import ProtocolParams
from p2pfed.schema import FieldError, check_fields, rules_of, setting, unknown_keys_message
from p2pfed.tomlfile import toml_value

if TYPE_CHECKING:
    from p2pfed.group import GridPosition

__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_PORT",
    "FEDERATION_FILE_NAME",
    "HOME_ENV_VAR",
    "TASK_NAME_KEY",
    "NodeConfig",
    "default_config_text",
    "default_node_dir",
    "load_config",
    "parse_config",
    "parse_host_port",
    "task_table_text",
]

CONFIG_FILE_NAME = "config.toml"
FEDERATION_FILE_NAME = "federation.toml"
HOME_ENV_VAR = "P2PFED_HOME"
DEFAULT_PORT = 7447
_MAX_FILE_SIZE = 1024 * 1024
_TASK_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_DEVICE_RE = re.compile(r"[a-z][a-z0-9_]*(:[0-9]+)?")
TASK_NAME_KEY = "name"
"""The key of the ``[task]`` table that names the task; every other key is a setting."""


def default_node_dir() -> Path:
    """``$P2PFED_HOME`` if set and non-empty, else ``~/.p2pfed``."""
    home = os.environ.get(HOME_ENV_VAR)
    return Path(home).expanduser() if home else Path.home() / ".p2pfed"


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[ipv6]:port"`` into host and port (1..65535).

    >>> parse_host_port("[::1]:7447")
    ('::1', 7447)
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a 'host:port' string, got {text!r}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not '[ipv6-address]:port'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not 'host:port' (for example '192.168.1.7:7447')")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, '[{host}]:port'")
    if any(c.isspace() for c in host):
        raise ValueError(f"{text!r}: the host contains whitespace")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def _host(value: Any) -> Any:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"must be a host name or IP address, got {value!r}")
    return value


def _bootstrap_entries(value: tuple[str, ...]) -> tuple[str, ...]:
    for entry in value:
        parse_host_port(entry)
    return value


def _interface_addresses(value: tuple[str, ...]) -> tuple[str, ...]:
    for entry in value:
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an IP address; give the interface's address "
                "(e.g. 192.168.1.10), not its name"
            ) from None
    return value


def _grid_side(value: int) -> int:
    # p2pfed.group imports numpy and the protocol: load it only when a grid is configured
    from p2pfed.group import MAX_GRID_SIDE

    if not 2 <= value <= MAX_GRID_SIDE:
        raise ValueError(f"must be between 2 and {MAX_GRID_SIDE}, got {value}")
    return value


def _task_name(value: Any) -> Any:
    if not isinstance(value, str) or not _TASK_RE.fullmatch(value):
        raise ValueError(
            f'must be "package.module:object" (e.g. "mytasks.mnist:task"), got {value!r}'
        )
    return value


def _device(value: Any) -> Any:
    if not isinstance(value, str) or not _DEVICE_RE.fullmatch(value):
        raise ValueError(f'must be a torch device such as "cpu" or "cuda:0", got {value!r}')
    return value


@dataclass(frozen=True)
class NodeConfig:
    """A node's settings (``config.toml``), validated at construction.

    Each field declares its key once (:func:`p2pfed.schema.setting`): type, range, default
    and the help text :func:`default_config_text` writes above it; the field order is the
    file order. Invalid values raise :class:`~p2pfed.errors.ConfigError` naming the key.
    Lists are stored as tuples so the object stays immutable and hashable.
    """

    listen_host: str = setting(
        "0.0.0.0",
        check=_host,
        help="Address to accept connections on (0.0.0.0 = all IPv4 interfaces).",
    )
    listen_port: int = setting(
        DEFAULT_PORT,
        "int",
        low=0,
        high=65535,
        help="TCP port to accept connections on (0 = any free port).",
    )
    # setting() is a dataclasses.field() with the key's rule: not a shared mutable default
    federation_file: Path = setting(  # noqa: RUF009
        Path(FEDERATION_FILE_NAME),
        "path",
        help="Federation file, relative to this directory unless absolute.",
    )
    bootstrap: tuple[str, ...] = setting(
        (),
        "strs",
        check=_bootstrap_entries,
        help='Peers to connect to at start, as "host:port" (or "[ipv6]:port").',
    )
    mdns: bool = setting(True, "bool", help="Find peers on the local network with mDNS / DNS-SD.")
    mdns_interfaces: tuple[str, ...] = setting(
        (),
        "strs",
        check=_interface_addresses,
        help='IP addresses of the interfaces mDNS uses, e.g. ["192.168.1.10"]; empty = all.',
    )
    handshake_timeout: float = setting(
        10.0,
        "float",
        low=0,
        low_open=True,
        unit="seconds",
        help="Seconds a connection may take to complete its Noise handshake.",
    )
    keepalive_interval: float = setting(
        1.0,
        "float",
        low=0,
        low_open=True,
        unit="seconds",
        help="Seconds of silence after which a keepalive is sent (the node sends\n"
        "one after at most 1 s, so that a vanished peer is noticed within 3 s).",
    )
    idle_timeout: float = setting(
        15.0,
        "float",
        low=0,
        low_open=True,
        unit="seconds",
        help="Seconds without hearing from a peer before the connection is dropped\n"
        "(a peer that is up sends a keepalive every second; a channel silent this long is\n"
        "dead, and a peer reachable again is dialled anew).",
    )
    send_timeout: float = setting(
        60.0,
        "float",
        low=0,
        low_open=True,
        unit="seconds",
        help="Seconds a single message may take to send before the peer is dropped.",
    )
    max_message_size: int | None = setting(
        None,
        "int",
        optional=True,
        low=65535,
        high=2**32 - 1,
        example=64 * 1024 * 1024,
        help="Largest message accepted, in bytes: at most the federation's\n"
        "max_message_size (unset = the federation's).",
    )
    max_connections: int = setting(
        64, "int", low=1, high=65535, help="Most simultaneous peer connections."
    )
    log_format: Literal["text", "json"] = setting(
        "text",
        "str",
        choices=("text", "json"),
        help='Log output: "text" for humans, "json" for one JSON object per line.',
    )
    metrics: bool = setting(False, "bool", help="Serve Prometheus metrics over HTTP.")
    metrics_port: int = setting(
        9464, "int", low=0, high=65535, help="TCP port of the metrics endpoint."
    )
    metrics_host: str = setting(
        "127.0.0.1",
        check=_host,
        help="Address of the metrics endpoint (127.0.0.1 = this machine only).",
    )
    grid_side: int | None = setting(
        None,
        "int",
        optional=True,
        check=_grid_side,
        example=9,
        help="Grid grouping (Moshpit, spec/group.md): the side of the federation's grid;\n"
        "every node of the federation then sets the same side and its own grid_coordinate\n"
        "(unset = random grouping).",
    )
    grid_coordinate: tuple[int, ...] | None = setting(
        None,
        "ints",
        optional=True,
        example=[0, 4, 2],
        help="This node's cell on the grid, one integer in 0..grid_side-1 per\n"
        "dimension, e.g. [0, 4, 2] on a 9x9x9 grid; a round averages along one dimension.",
    )
    torch_threads: int = setting(
        1,
        "int",
        low=0,
        high=1024,
        help="Threads torch may use for training and evaluation (0 = torch's default,\n"
        "one per core). 1 by default: nodes are often co-located on one machine, and several\n"
        "processes that each start a thread per core slow each other down.",
    )
    device: str = setting(
        "cpu",
        check=_device,
        help='Where the task should train: "cpu", "cuda", "cuda:1", "mps". The node checks\n'
        'that torch can use it and passes it to the task as config["device"]; the task moves\n'
        "its model and batches there (the built-in tasks do).",
    )
    task: str | None = setting(
        None,
        optional=True,
        check=_task_name,
        help='The training task, as "package.module:object" (or a [task] table).',
    )
    task_settings: dict[str, Any] = setting(  # noqa: RUF009
        default_factory=dict,
        kind="table",
        hash=False,
        help="The [task] table without its name: the task's settings.",
    )
    """The ``[task]`` table without its ``name``: the task's settings."""

    def __post_init__(self) -> None:
        try:
            check_fields(self)
            self._check_together()
        except FieldError as exc:
            raise ConfigError(str(exc)) from None

    def _check_together(self) -> None:
        if self.keepalive_interval >= self.idle_timeout:
            raise FieldError(
                "keepalive_interval",
                f"must be less than idle_timeout ({self.idle_timeout}), or idle peers would be "
                f"dropped before a keepalive is sent; got {self.keepalive_interval}",
            )
        if self.grid_side is None:
            if self.grid_coordinate is not None:
                raise FieldError("grid_coordinate", "is set but grid_side is not; set both")
        else:
            if self.grid_coordinate is None:
                raise FieldError("grid_side", "is set but grid_coordinate is not; set both")
            try:
                self.grid_position()
            except (TypeError, ValueError) as exc:
                raise FieldError("grid_coordinate", str(exc)) from None

    @classmethod
    def allowed_keys(cls) -> list[str]:
        """The keys ``config.toml`` may contain, in file order (``task`` may be a table)."""
        return [f.name for f in fields(cls) if f.name != "task_settings"]

    def grid_position(self) -> GridPosition | None:
        """The node's place on the grid, or ``None`` for random grouping."""
        from p2pfed.group import GridPosition

        if self.grid_side is None or self.grid_coordinate is None:
            return None
        return GridPosition(self.grid_side, self.grid_coordinate)

    def federation_path(self, node_dir: str | os.PathLike[str]) -> Path:
        """The federation file's path: ``federation_file`` resolved against ``node_dir``."""
        return Path(node_dir).expanduser() / self.federation_file.expanduser()

    def bootstrap_addresses(self) -> list[tuple[str, int]]:
        """The bootstrap peers as (host, port) pairs."""
        return [parse_host_port(entry) for entry in self.bootstrap]

    def effective_max_message_size(self, params: ProtocolParams) -> int:
        """The message size limit to enforce: this node's override, else the federation's.

        An override larger than the federation's limit is an error: a member must accept
        every message the federation allows.
        """
        if self.max_message_size is None:
            return params.max_message_size
        if self.max_message_size > params.max_message_size:
            raise ConfigError(
                f"max_message_size: {self.max_message_size} exceeds the federation's "
                f"max_message_size ({params.max_message_size}); lower it or remove it"
            )
        return self.max_message_size


_TASK_TEXT = """\
# The training task, as "package.module:object" (p2pfed --task overrides it). Either this
# one line (above any table), for a task without settings:
# task = "mypackage.tasks:task"
# or a [task] table (at the end of the file) whose "name" is the task and whose other keys
# are its settings, handed to it as its config (p2pfed node --set KEY=VALUE overrides one):
#   [task]
#   name = "mypackage.tasks:task"
#   lr = 0.05
#   data_dir = "/data/mine"
"""


def task_table_text(task: str, settings: dict[str, Any]) -> str:
    """A ``[task]`` table naming ``task`` with ``settings``, to append to ``config.toml``.

    Values may be booleans, numbers, strings and lists of them.

    >>> print(task_table_text("p2pfed.tasks.digits:task", {"node_index": 0, "lr": 0.05}))
    [task]
    name = "p2pfed.tasks.digits:task"
    node_index = 0
    lr = 0.05
    <BLANKLINE>
    """
    if TASK_NAME_KEY in settings:
        raise ConfigError(
            f"{TASK_NAME_KEY!r} is the key of the [task] table that names the task; a task "
            "setting cannot be called that"
        )
    lines = ["[task]", f"{TASK_NAME_KEY} = {toml_value(task)}"]
    for key, value in settings.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ConfigError(f"task setting name {key!r}: use letters, digits, _ and - only")
        try:
            lines.append(f"{key} = {toml_value(value)}")
        except TypeError:
            raise ConfigError(
                f"task setting {key} = {value!r}: only booleans, numbers, strings and lists "
                "can go into config.toml"
            ) from None
    return "\n".join(lines) + "\n"


def default_config_text() -> str:
    """A fully commented ``config.toml``: every key with an explanation and its default.

    Keys whose default is "unset" are present as commented-out examples. The text parses
    back to ``NodeConfig()``.
    """
    defaults = NodeConfig()
    lines = [
        "# p2pfed node configuration. Every key is optional; the values below are the defaults.",
        "# Unknown keys are errors. Durations are in seconds.",
        "",
    ]
    for name, rule in rules_of(NodeConfig).items():
        if name in ("task", "task_settings"):
            continue  # written last: a [task] table must follow every top-level key
        lines.extend(f"# {line}" for line in rule.help.splitlines())
        value = getattr(defaults, name)
        if value is None:
            lines.append(f"# {name} = {toml_value(rule.example)}")
        else:
            lines.append(f"{name} = {toml_value(value)}")
        lines.append("")
    lines.extend(_TASK_TEXT.splitlines())
    lines.append("")
    return "\n".join(lines)


def parse_config(text: str, source: str = "<string>") -> NodeConfig:
    """Parse ``config.toml`` text; ``source`` names the file in error messages.

    Relative paths stay relative (see :meth:`NodeConfig.federation_path`).
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not a valid TOML file: {exc}") from None
    allowed = NodeConfig.allowed_keys()
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise ConfigError(f"{source}: {unknown_keys_message(unknown, allowed)}")
    if isinstance(doc.get("task"), dict):
        settings = dict(doc.pop("task"))
        name = settings.pop(TASK_NAME_KEY, None)
        try:
            rules_of(NodeConfig)["task"].convert(name)
        except ValueError as exc:
            raise ConfigError(f"{source}: [task] {TASK_NAME_KEY}: {exc}") from None
        doc["task"], doc["task_settings"] = name, settings
    try:
        return NodeConfig(**doc)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(node_dir: str | os.PathLike[str]) -> NodeConfig:
    """Read ``<node_dir>/config.toml`` (all defaults if the file does not exist).

    Raises :class:`~p2pfed.errors.ConfigError` naming the file and key on any problem, and
    when ``node_dir`` itself does not exist.
    """
    directory = Path(node_dir).expanduser()
    if not directory.is_dir():
        raise ConfigError(
            f"{directory}: no node directory here; run `p2pfed init {directory}` to create one"
        )
    path = directory / CONFIG_FILE_NAME
    try:
        st = path.stat()
    except FileNotFoundError:
        return NodeConfig()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    if st.st_size > _MAX_FILE_SIZE:
        raise ConfigError(
            f"{path}: {st.st_size} bytes is far too large for a configuration file "
            f"(limit {_MAX_FILE_SIZE})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    return parse_config(text, source=str(path))
