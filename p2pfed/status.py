"""The node's status file (``<node dir>/status.json``) and the ``p2pfed status`` command.

A running node keeps a small JSON document describing itself up to date in its node
directory; ``p2pfed status`` (another process, any time) reads and prints it. The file is
replaced atomically (:mod:`p2pfed.atomicfile`), so a reader never sees half a document.

Writer side, in the node::

    status = StatusWriter(node_dir, node_id=str(identity.node_id), listen="0.0.0.0:7447")
    status.update(trio.current_time(), state="running")
    status.record_group(trio.current_time(), group_id=b"...", size=4,
                        outcome="completed", seconds=1.8)
    ...
    status.update(trio.current_time(), state="stopped")   # a state change is always written

Rules of this file: the writer never reads a clock for rate limiting: every call gets the
caller's monotonic ``now`` (trio's clock, or virtual time in a simulation), and writes at
most once per ``min_interval`` seconds; changes in between are kept and written by the next
call that is due, by :meth:`StatusWriter.poll` or by :meth:`StatusWriter.flush`. A change of
``state`` is written at once. Status is best effort: a failed write (disk full) is logged,
never raised, so it cannot stop training. Readers treat the file as untrusted text
(addresses come from peers): :func:`read_status` checks every key against
:data:`STATUS_DOCUMENT`, the declaration the writer checks its fields against
(:mod:`p2pfed.schema`), and :func:`format_status` escapes control characters.

The document (``schema`` 1), keys in this order; unknown values are ``null``::

    schema          1
    pid             process id of the node
    node_id         the node id (text form)
    state           "starting" | "running" | "stopping" | "stopped"
    started_at      ISO 8601 UTC, e.g. "2026-11-28T01:02:03Z"
    updated_at      ISO 8601 UTC of this write
    listen          listen address "host:port"
    round           current training round (int)
    accuracy        test accuracy 0..1 of the current model
    loss            test loss of the current model
    federation      the federation's figures, from every member's evaluation sums
                    (spec/group.md, "Federation metrics"): {"accuracy": 0..1, "loss":
                    float, "round": the round whose model the members evaluated (int),
                    "samples": test samples they evaluated on (int), or null when the
                    round that carried them was not exact}, or null (none yet, or off)
    federation_metrics  whether the node shares evaluation sums: "on", "off" (the
                    federation's ``federation_metrics = false``), "off-dp" (off because
                    differential privacy is on), or null (both absent in files written
                    before they existed)
    epsilon_spent   differential-privacy epsilon spent (distributed DP: the central epsilon,
                    against anyone who sees only group sums; the budget bounds it)
    epsilon_budget  configured epsilon budget
    local_epsilon_spent  distributed DP only: the weaker local epsilon, against members who
                    collude to strip the masks (spec/privacy.md 2B); null at other levels
                    or without DP (absent in files written before it existed: read as null)
    dp_enabled      whether updates are noised (bool)
    dp_exhausted    whether the node has stopped training because its privacy budget is
                    spent (bool; absent in files written before it existed: read as null)
    peers           [{"id": short id, "address": "host:port", "connected": bool}, ...]
    bootstrap       the configured bootstrap addresses, in configuration order:
                    [{"address": "host:port", "state": "connected" | "connecting" |
                    "failing" | "not connected", "id": short id of the node reached there
                    or null, "failed_attempts": failed attempts in a row (int),
                    "failing_since": ISO 8601 UTC of the first of them or null,
                    "next_attempt": ISO 8601 UTC or null (connected, or being dialed),
                    "error": the last failure or null}, ...] (absent in files written
                    before it existed: read as [])
    stall           why the node is not forming groups (too few responsive peers, and
                    what it knows of the others), or null when nothing stops it (absent in
                    files written before it existed: read as null)
    last_groups     the last 10 groups, oldest first: [{"id": short group id, "size": int,
                    "outcome": "completed" | "aborted" | "declined", "seconds": float,
                    "reason": str | null}, ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, cast

from p2pfed.atomicfile import atomic_write_text
from p2pfed.config import HOME_ENV_VAR, default_node_dir
from p2pfed.errors import StatusError
from p2pfed.metrics import GROUP_OUTCOMES
from p2pfed.schema import FieldError, Rule, Schema, unknown_keys_message

__all__ = [
    "BOOTSTRAP_STATES",
    "DEFAULT_MIN_INTERVAL",
    "FEDERATION_METRICS_MODES",
    "GROUP_HISTORY",
    "NODE_STATES",
    "STATUS_DOCUMENT",
    "STATUS_FILE_NAME",
    "STATUS_SCHEMA_VERSION",
    "BootstrapStatus",
    "GroupStatus",
    "PeerStatus",
    "StatusWriter",
    "add_status_parser",
    "cmd_status",
    "federation_metrics_mode",
    "format_status",
    "iso_utc",
    "pid_alive",
    "read_status",
]

log = logging.getLogger("p2pfed.status")

STATUS_FILE_NAME = "status.json"
STATUS_SCHEMA_VERSION = 1
NODE_STATES = ("starting", "running", "stopping", "stopped")
GROUP_HISTORY = 10
"""How many recent groups ``last_groups`` keeps."""
DEFAULT_MIN_INTERVAL = 0.25
"""Seconds between two writes of status.json (state changes excepted)."""
EXIT_NOT_RUNNING = 3
"""Exit status of ``p2pfed status`` when the node is not running (LSB "program is not running")."""

_MAX_STATUS_SIZE = 1024 * 1024
_GROUP_ID_HEX_CHARS = 12
_MAX_ERROR_CHARS = 300  # a bootstrap error may quote a peer: keep the file small
BOOTSTRAP_STATES = ("connected", "connecting", "failing", "not connected")
"""The states of a bootstrap address (:class:`p2pfed.peers.BootstrapEntry`)."""
FEDERATION_METRICS_MODES = ("on", "off", "off-dp")
"""Values of ``federation_metrics`` (see :func:`federation_metrics_mode`)."""


class PeerStatus(TypedDict):
    """One entry of ``peers``."""

    id: str
    address: str
    connected: bool


class BootstrapStatus(TypedDict):
    """One entry of ``bootstrap``."""

    address: str
    state: str
    id: str | None
    failed_attempts: int
    failing_since: str | None
    next_attempt: str | None
    error: str | None


class GroupStatus(TypedDict):
    """One entry of ``last_groups``."""

    id: str
    size: int
    outcome: str
    seconds: float
    reason: str | None


def iso_utc(timestamp: float) -> str:
    """Wall-clock seconds as the file writes times: ISO 8601 UTC, whole seconds.

    >>> iso_utc(1_795_000_000.4)
    '2026-11-18T11:06:40Z'
    """
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _measured(value: object) -> float | None:
    # JSON has no NaN: "not measured" is null
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number or null, got {value!r}")
    v = float(value)
    return v if math.isfinite(v) else None


def _count(value: object) -> int:
    # the node computes counts in floating point (sums divided by the fixed-point scale)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or value != int(value)
    ):
        raise ValueError(f"must be a whole number >= 0, got {value!r}")
    return int(value)


def _truncated(value: str) -> str:
    return value[:_MAX_ERROR_CHARS]  # may quote a peer: keep the file small


def _entries(schema: Schema, what: str) -> Callable[[object], list[dict[str, Any]]]:
    """A check of a list of mappings that each have exactly the keys of ``schema``."""
    keys = schema.keys()

    def check(value: object) -> list[dict[str, Any]]:
        if not isinstance(value, list | tuple):
            raise ValueError(f"must be a list of {what} entries, got {value!r}")
        entries = []
        for entry in value:
            if not isinstance(entry, Mapping) or set(entry) != set(keys):
                raise ValueError(
                    f"must be a list of entries, but a {what} entry must be a mapping with "
                    f"keys {', '.join(keys)}; got {entry!r}"
                )
            try:
                entries.append({key: schema.convert(key, entry[key]) for key in keys})
            except FieldError as exc:
                raise ValueError(f"has an entry whose {exc.key!r} {exc.problem}") from None
        return entries

    return check


def _figure(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping) or set(value) - set(_FIGURE.keys()) or _FIGURE.missing(value):
        raise ValueError(
            f"must be null or a mapping with accuracy, loss, round (and samples); got {value!r}"
        )
    try:
        return {key: _FIGURE.convert(key, value.get(key)) for key in _FIGURE.rules}
    except FieldError as exc:
        raise ValueError(f"has {exc.key!r} that {exc.problem}") from None


_PEER = Schema(
    {
        "id": Rule("str"),
        "address": Rule("str", optional=True),  # null: not known yet
        "connected": Rule("bool"),
    }
)
_BOOTSTRAP = Schema(
    {
        "address": Rule("str"),
        "state": Rule("str", choices=BOOTSTRAP_STATES),
        "id": Rule("str", optional=True),
        "failed_attempts": Rule("int", low=0),
        "failing_since": Rule("str", optional=True),
        "next_attempt": Rule("str", optional=True),
        "error": Rule("str", optional=True, check=_truncated),
    }
)
_FIGURE = Schema(
    {
        "accuracy": Rule("any", required=True, optional=True, check=_measured),
        "loss": Rule("any", required=True, optional=True, check=_measured),
        "samples": Rule("any", optional=True, check=_count),
        "round": Rule("any", required=True, optional=True, check=_count),
    }
)
_GROUP = Schema(
    {
        "id": Rule("str"),
        "size": Rule("int", low=0),
        "outcome": Rule("str", choices=GROUP_OUTCOMES),
        "seconds": Rule("float", low=0),
        "reason": Rule("str", optional=True),
    }
)

STATUS_DOCUMENT = Schema(
    {
        "schema": Rule("int", low=STATUS_SCHEMA_VERSION, high=STATUS_SCHEMA_VERSION),
        "pid": Rule("int", low=1),
        "node_id": Rule("str", optional=True),
        "state": Rule("str", choices=NODE_STATES),
        "started_at": Rule("str", optional=True),
        "updated_at": Rule("str", optional=True),
        "listen": Rule("str", optional=True),
        "round": Rule("int", optional=True, low=0),
        "accuracy": Rule("any", optional=True, check=_measured),
        "loss": Rule("any", optional=True, check=_measured),
        "federation": Rule("any", optional=True, check=_figure),
        "federation_metrics": Rule("str", optional=True, choices=FEDERATION_METRICS_MODES),
        "epsilon_spent": Rule("any", optional=True, check=_measured),
        "epsilon_budget": Rule("any", optional=True, check=_measured),
        "local_epsilon_spent": Rule("any", optional=True, check=_measured),
        "dp_enabled": Rule("bool", optional=True),
        "dp_exhausted": Rule("bool", optional=True),
        "peers": Rule("any", check=_entries(_PEER, "peer")),
        "bootstrap": Rule("any", check=_entries(_BOOTSTRAP, "bootstrap")),
        "stall": Rule("str", optional=True, check=_truncated),
        "masking": Rule("bool", optional=True),
        "last_groups": Rule("any", check=_entries(_GROUP, "group")),
    }
)
"""Every key of ``status.json``, in file order, with its rule: what the writer accepts in
:meth:`StatusWriter.update` and what :func:`read_status` accepts in a file. Keys added
after schema 1 may be absent (files of older nodes)."""
_WRITER_OWNED = ("schema", "updated_at", "last_groups")
"""Keys the writer sets itself (``last_groups`` through :meth:`StatusWriter.record_group`)."""


def federation_metrics_mode(federation_metrics: bool, dp_enabled: bool) -> str:
    """The ``federation_metrics`` status value for a federation's parameters.

    >>> federation_metrics_mode(True, True), federation_metrics_mode(True, False)
    ('off-dp', 'on')
    """
    if not federation_metrics:
        return "off"
    return "off-dp" if dp_enabled else "on"


def _short_group_id(group_id: bytes | str) -> str:
    if isinstance(group_id, bytes | bytearray):
        return bytes(group_id).hex()[:_GROUP_ID_HEX_CHARS]
    if isinstance(group_id, str):
        return group_id[:_GROUP_ID_HEX_CHARS]
    raise ValueError(f"group_id must be bytes or str; got {group_id!r}")


class StatusWriter:
    """Keeps ``<node_dir>/status.json`` up to date, at most once per ``min_interval`` seconds.

    ``wall_clock`` (default :func:`time.time`) gives ``started_at`` and ``updated_at``; the
    monotonic ``now`` of every call drives rate limiting. ``fields`` set initial values
    (``node_id``, ``listen``, ...). Nothing is written before the first call with ``now``.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> w = StatusWriter(d, node_id="abc", wall_clock=lambda: 0.0)
    >>> w.update(10.0, state="running"), w.update(10.1, round=1), w.pending
    (True, False, True)
    >>> w.poll(10.3), read_status(d)["round"]
    (True, 1)
    """

    def __init__(
        self,
        node_dir: str | os.PathLike[str],
        *,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        pid: int | None = None,
        wall_clock: Callable[[], float] = time.time,
        **fields: Any,
    ) -> None:
        if not (min_interval >= 0 and math.isfinite(min_interval)):
            raise ValueError(f"min_interval must be a finite number >= 0; got {min_interval!r}")
        self.path = Path(node_dir) / STATUS_FILE_NAME
        self.min_interval = min_interval
        self._wall_clock = wall_clock
        self._doc: dict[str, Any] = {
            "schema": STATUS_SCHEMA_VERSION,
            "pid": os.getpid() if pid is None else pid,
            "node_id": None,
            "state": "starting",
            "started_at": iso_utc(wall_clock()),
            "updated_at": None,
            "listen": None,
            "round": None,
            "accuracy": None,
            "loss": None,
            "federation": None,
            "federation_metrics": None,
            "epsilon_spent": None,
            "epsilon_budget": None,
            "local_epsilon_spent": None,
            "dp_enabled": None,
            "dp_exhausted": None,
            "peers": [],
            "bootstrap": [],
            "stall": None,
            "masking": None,
            "last_groups": [],
        }
        self._doc.update(self._validated({"pid": self._doc["pid"], **fields}))
        self._last_write: float | None = None
        self._pending = True
        self._failing = False

    @staticmethod
    def _validated(fields: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in fields.items():
            if name not in STATUS_DOCUMENT.rules or name in _WRITER_OWNED:
                known = ", ".join(sorted(set(STATUS_DOCUMENT.keys()) - set(_WRITER_OWNED)))
                hint = " (use record_group)" if name == "last_groups" else ""
                raise ValueError(f"unknown status field {name!r}{hint}; known fields: {known}")
            try:
                out[name] = STATUS_DOCUMENT.convert(name, value)
            except FieldError as exc:
                raise ValueError(f"status field {exc.key!r} {exc.problem}") from None
        return out

    @property
    def pending(self) -> bool:
        """Whether there are changes not yet written."""
        return self._pending

    @property
    def write_due_at(self) -> float | None:
        """The ``now`` at which pending changes may be written; None if nothing is pending."""
        if not self._pending:
            return None
        if self._last_write is None:
            return -math.inf
        return self._last_write + self.min_interval

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the current document (including unwritten changes)."""
        copy: dict[str, Any] = json.loads(json.dumps(self._doc))
        return copy

    def update(self, now: float, *, force: bool = False, **fields: Any) -> bool:
        """Merge ``fields`` into the status; write it if due (or ``force``, or ``state`` changed).

        Returns whether the file was written by this call. Raises :class:`ValueError` for an
        unknown field or a value of the wrong type (a bug in the caller, not a runtime event).
        """
        changes = self._validated(fields)
        state_changed = "state" in changes and changes["state"] != self._doc["state"]
        for name, value in changes.items():
            if self._doc[name] != value:
                self._doc[name] = value
                self._pending = True
        return self._maybe_write(now, force or state_changed)

    def record_group(
        self,
        now: float,
        *,
        group_id: bytes | str,
        size: int,
        outcome: str,
        seconds: float,
        reason: str | None = None,
    ) -> bool:
        """Append a group's outcome to ``last_groups`` (keeping the last 10); write if due."""
        if outcome not in GROUP_OUTCOMES:
            raise ValueError(f"unknown group outcome {outcome!r}; use one of {GROUP_OUTCOMES}")
        values = {
            "id": _short_group_id(group_id),
            "size": size,
            "outcome": outcome,
            "seconds": round(float(seconds), 3),
            "reason": reason,
        }
        try:
            entry = cast(GroupStatus, {k: _GROUP.convert(k, v) for k, v in values.items()})
        except FieldError as exc:
            raise ValueError(f"status field {exc.key!r} {exc.problem}") from None
        groups: list[GroupStatus] = [*self._doc["last_groups"], entry]
        self._doc["last_groups"] = groups[-GROUP_HISTORY:]
        self._pending = True
        return self._maybe_write(now, False)

    def poll(self, now: float) -> bool:
        """Write pending changes if the rate limit allows; returns whether it wrote."""
        return self._maybe_write(now, False)

    def flush(self, now: float) -> bool:
        """Write pending changes now, ignoring the rate limit (for shutdown)."""
        return self._maybe_write(now, True)

    def _maybe_write(self, now: float, force: bool) -> bool:
        if not self._pending:
            return False
        due = self._last_write is None or now - self._last_write >= self.min_interval
        if not (due or force):
            return False
        self._doc["updated_at"] = iso_utc(self._wall_clock())
        text = json.dumps(self._doc, indent=2, allow_nan=False) + "\n"
        try:
            # not fsynced: a status file is for humans and rewritten within seconds
            atomic_write_text(self.path, text, mode=0o600, durable=False)
        except OSError as exc:
            # Status is for humans; a full disk must not stop training. Retried when next due.
            if not self._failing:
                log.warning("cannot write %s: %s", self.path, exc)
            self._failing = True
            self._last_write = now
            return False
        self._failing = False
        self._last_write = now
        self._pending = False
        return True


# --- reading ---------------------------------------------------------------------------------


def read_status(node_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The status document a node wrote in ``node_dir``.

    Raises :class:`~p2pfed.errors.StatusError` if there is none (no node has run with this
    directory) or it is not a status document.
    """
    directory = Path(node_dir)
    path = directory / STATUS_FILE_NAME
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > _MAX_STATUS_SIZE:
                raise StatusError(
                    f"{path} is larger than {_MAX_STATUS_SIZE} bytes; not a status file"
                )
            data = f.read(_MAX_STATUS_SIZE + 1)
    except FileNotFoundError:
        raise StatusError(
            f"no {STATUS_FILE_NAME} in {directory}: is a node running with this directory?"
        ) from None
    except IsADirectoryError:
        raise StatusError(f"{path} is a directory, not a status file") from None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StatusError(
            f"{path} is not valid JSON ({exc}); a running node rewrites it on its next update"
        ) from None
    if not isinstance(doc, dict) or doc.get("schema") != STATUS_SCHEMA_VERSION:
        raise StatusError(
            f"{path} is not a p2pfed status document of schema {STATUS_SCHEMA_VERSION} "
            "(written by another p2pfed version?)"
        )
    # a node of another p2pfed version may have written it; the fix is the same
    fix = "written by another p2pfed version? use the p2pfed the node runs, or delete the file"
    unknown = STATUS_DOCUMENT.unknown(doc)
    if unknown:
        message = unknown_keys_message(unknown, STATUS_DOCUMENT.keys())
        raise StatusError(f"{path}: {message} ({fix})")
    try:
        return {key: STATUS_DOCUMENT.convert(key, value) for key, value in doc.items()}
    except FieldError as exc:
        raise StatusError(f"{path}: {exc.key} {exc.problem} ({fix})") from None


def pid_alive(pid: object) -> bool:
    """Whether a process with this id exists (and is not a zombie) on this machine."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False  # kill(0) or kill(-n) would test process groups, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False
    try:
        # An exited process that its parent has not reaped yet still answers kill(pid, 0).
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# --- formatting ------------------------------------------------------------------------------

# Status files may hold peer-supplied text: never let it drive the terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 0x7F)} | {
    c: f"\\x{c:02x}" for c in range(0x80, 0xA0)
}


def _clean(value: object) -> str:
    return str(value).translate(_CONTROL)


def _parse_iso(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _human_time(text: object) -> str:
    ts = _parse_iso(text)
    if ts is None:
        return _clean(text) if text is not None else "unknown"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _when(text: object, now: float | None, suffix: str) -> str:
    out = _human_time(text)
    ts = _parse_iso(text)
    if now is not None and ts is not None:
        out += f" ({_duration(now - ts)} {suffix})"
    return out


def _num(value: object, digits: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return f"{value:.{digits}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def format_status(
    status: Mapping[str, Any], *, alive: bool | None = None, now: float | None = None
) -> str:
    """A readable multi-line report of a status document (as :func:`read_status` returns).

    ``alive`` (from :func:`pid_alive`) adds whether the process still runs; ``now`` (wall
    clock seconds) adds how long ago things happened. Tolerates missing or odd fields.
    """
    state = status.get("state")
    pid = status.get("pid")
    if alive is False:
        how = "stopped cleanly" if state == "stopped" else f"last state {_clean(state)}"
        state_text = f"not running ({how}; was pid {_clean(pid)})"
    else:
        state_text = f"{_clean(state)} (pid {_clean(pid)})"
    lines = [
        f"node {_clean(status.get('node_id') or 'unknown')}",
        f"  state:      {state_text}",
        f"  listening:  {_clean(status.get('listen') or 'unknown')}",
        f"  started:    {_when(status.get('started_at'), now, 'ago')}",
        f"  updated:    {_when(status.get('updated_at'), now, 'ago')}",
        f"  round:      {_clean(status.get('round') if status.get('round') is not None else '-')}",
    ]
    accuracy: Any = status.get("accuracy")
    acc = _num(accuracy * 100, 2) if _num(accuracy, 4) is not None else None
    loss = _num(status.get("loss"), 4)
    lines.append(
        f"  model:      accuracy {acc + ' %' if acc else 'not measured yet'}, "
        f"loss {loss or 'not measured yet'}"
    )
    federation = _federation_line(status.get("federation"), status.get("federation_metrics"))
    if federation is not None:
        lines.append(f"  federation: {federation}")
    dp = status.get("dp_enabled")
    spent = _num(status.get("epsilon_spent"), 3)
    budget = _num(status.get("epsilon_budget"), 3)
    if dp is False:
        privacy = "differential privacy OFF (updates are not noised)"
    else:
        privacy = f"epsilon {spent or '0.000'} spent"
        if budget is not None:
            privacy += f" of {budget}"
            if float(budget) > 0:
                used = float(spent or 0.0)
                privacy += (
                    f" ({100 * used / float(budget):.0f} %), "
                    f"{max(0.0, float(budget) - used):.3f} remaining"
                )
    lines.append(f"  privacy:    {privacy}")
    local = _num(status.get("local_epsilon_spent"), 3)
    if dp is not False and local is not None:
        # distributed DP: the budget bounds the central epsilon; say what colluders get
        lines.append(
            f"              local epsilon {local} spent against members who collude to strip "
            "the masks (not budgeted; spec/privacy.md 2B)"
        )
    if dp is not False and status.get("dp_exhausted") is True:
        lines.append(
            "              BUDGET SPENT: this node has stopped training on its data; it only "
            "averages (spec/privacy.md 5.1)"
        )

    peers = status.get("peers")
    peers = [p for p in peers if isinstance(p, Mapping)] if isinstance(peers, list) else []
    connected = sum(1 for p in peers if p.get("connected") is True)
    lines.append("")
    lines.append(f"peers: {connected} connected, {len(peers)} known")
    if status.get("masking") is False:
        lines.append("SECURE AGGREGATION OFF (--insecure-no-masking): peers see this node's model")
    stall = status.get("stall")
    if isinstance(stall, str) and stall:
        lines.append(f"NOT FORMING GROUPS: {_clean(stall)}")
    if peers:
        rows = [
            [
                _clean(p.get("id", "?")),
                _clean(p.get("address", "?")),
                "yes" if p.get("connected") is True else "no",
            ]
            for p in peers
        ]
        lines.extend(_table(["ID", "ADDRESS", "CONNECTED"], rows))

    lines.extend(_bootstrap_lines(status.get("bootstrap"), now))

    groups = status.get("last_groups")
    groups = [g for g in groups if isinstance(g, Mapping)] if isinstance(groups, list) else []
    lines.append("")
    if groups:
        lines.append(f"last {len(groups)} groups (newest first):")
        rows = [
            [
                _clean(g.get("id", "?")),
                _clean(g.get("size", "?")),
                _clean(g.get("outcome", "?")),
                _num(g.get("seconds"), 2) or "?",
                _clean(g.get("reason") or ""),
            ]
            for g in reversed(groups)
        ]
        lines.extend(_table(["GROUP", "SIZE", "OUTCOME", "SECONDS", "REASON"], rows))
    else:
        lines.append("no groups yet")
    return "\n".join(lines) + "\n"


def _federation_line(figure: object, mode: object) -> str | None:
    """The ``federation:`` line: the federation's figures beside the node's own, or why
    there are none (None: a file from before the feature, nothing to say)."""
    if mode == "off":
        return "not shared (the federation sets federation_metrics = false)"
    if mode == "off-dp":
        return (
            "not shared (differential privacy is on: evaluation sums would leave the node "
            "without noise)"
        )
    if not isinstance(figure, Mapping):
        return "not measured yet" if mode == "on" else None
    accuracy = _num(figure.get("accuracy"), 4)
    acc = _num(float(accuracy) * 100, 2) if accuracy is not None else None
    loss = _num(figure.get("loss"), 4)
    round_ = figure.get("round")
    samples = figure.get("samples")
    where = f"model of round {_clean(round_)}" if round_ is not None else "an earlier model"
    if isinstance(samples, int) and not isinstance(samples, bool):
        where += f", over {samples} test samples of all members"
    else:
        where += ", over all members' test samples"
    return f"accuracy {acc + ' %' if acc else '-'}, loss {loss or '-'} ({where})"


def _ago(text: object, now: float | None) -> str:
    ts = _parse_iso(text)
    if text is None:
        return "-"
    if now is None or ts is None:
        return _human_time(text)
    return f"{_duration(now - ts)} ago"


def _until(text: object, now: float | None) -> str:
    ts = _parse_iso(text)
    if now is None or ts is None:
        return _human_time(text)
    return f"in {_duration(ts - now)}" if ts > now else "now"


def _bootstrap_lines(entries: object, now: float | None) -> list[str]:
    """The bootstrap section of the report (nothing when none is configured)."""
    rows = [e for e in entries if isinstance(e, Mapping)] if isinstance(entries, list) else []
    if not rows:
        return []
    connected = sum(1 for e in rows if e.get("state") == "connected")
    table = []
    for entry in rows:
        state = entry.get("state")
        if state == "connected":
            next_attempt = "-"
        elif entry.get("next_attempt") is None:
            next_attempt = "dialing"
        else:
            next_attempt = _until(entry.get("next_attempt"), now)
        table.append(
            [
                _clean(entry.get("address", "?")),
                _clean(state if state is not None else "?"),
                _clean(entry.get("id") or "-"),
                _clean(entry.get("failed_attempts", 0)),
                _ago(entry.get("failing_since"), now),
                next_attempt,
                _clean(entry.get("error") or ""),
            ]
        )
    lines = ["", f"bootstrap: {connected} of {len(rows)} connected"]
    lines.extend(
        _table(["ADDRESS", "STATE", "NODE", "FAILED", "FAILING SINCE", "NEXT TRY", "ERROR"], table)
    )
    return lines


# --- p2pfed status ---------------------------------------------------------------------------

# argparse's subparsers action type is private; see p2pfed.cli.
Subparsers = Any


def add_status_parser(subparsers: Subparsers) -> None:
    """``p2pfed status [DIR] [--json]``."""
    p = subparsers.add_parser(
        "status",
        help="show what the node of a node directory is doing",
        description=(
            "Print the status a node keeps in <node dir>/status.json: state, round, model "
            "quality, privacy budget, peers and recent groups. Exit status: 0 if the node is "
            f"running, {EXIT_NOT_RUNNING} if it is not, 1 if no node has run with DIR."
        ),
    )
    p.add_argument(
        "dir",
        nargs="?",
        metavar="DIR",
        help=f"node directory (default: ${HOME_ENV_VAR}, else ~/.p2pfed)",
    )
    p.add_argument("--json", action="store_true", help="print the raw status.json document")
    p.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """Print a node directory's status; 0 if its node runs, 3 if not."""
    directory = Path(args.dir).expanduser() if args.dir else default_node_dir()
    status = read_status(directory)
    alive = pid_alive(status.get("pid")) and status.get("state") != "stopped"
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if alive else EXIT_NOT_RUNNING
    now = time.time()
    if not alive:
        seen = _human_time(status.get("updated_at"))
        updated = _parse_iso(status.get("updated_at"))
        if updated is not None:
            seen += f", {_duration(now - updated)} ago"
        print(f"node not running (last seen {seen})")
        print()
    print(format_status(status, alive=alive, now=now), end="")
    return 0 if alive else EXIT_NOT_RUNNING
