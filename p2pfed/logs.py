"""Log output of the node daemon: readable text lines by default, JSON lines on request.

Code logs through the standard :mod:`logging` module with loggers named ``p2pfed.<module>``
and attaches structured fields with ``extra=``::

    log = logging.getLogger("p2pfed.node")
    log.info("group done", extra={"group": "ab12", "round": 3})

:func:`setup_logging` installs one handler on the root logger that renders each record as

* text (default), one line per record, time in UTC with milliseconds::

      2026-11-28 01:02:03.123 INFO  p2pfed.node: group done group=ab12 round=3

* JSON lines (``--log-json``), one object per line, for log collectors::

      {"ts": "2026-11-28T01:02:03.123Z", "level": "INFO", "logger": "p2pfed.node",
       "msg": "group done", "group": "ab12", "round": 3}

Rules of this file: times are always UTC (logs of several nodes must sort together); a log
line is always exactly one line (control characters from peers are escaped, so a remote
string cannot forge a line); structured fields never overwrite the four fixed JSON keys
(a clashing field is written as ``extra.<name>``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any, Literal, TextIO

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "ThrottledLog",
    "record_extras",
    "setup_logging",
]

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # Python >= 3.12
}
_JSON_KEYS = ("ts", "level", "logger", "msg")
# Marks the handler setup_logging installed, so a second call replaces it instead of adding one.
_HANDLER_MARK = "_p2pfed_log_handler"
# Control characters (and the line/paragraph separators some viewers split on) escaped in text.
_ESCAPES = {c: f"\\x{c:02x}" for c in range(32)} | {
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x7F: "\\x7f",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
_JSON_RESIDUAL_ESCAPES = {0x7F: "\\u007f", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def record_extras(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields given with ``extra=`` on a record, in the order given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


def _utc_parts(created: float) -> tuple[str, str, int]:
    seconds = int(created)
    millis = min(int((created - seconds) * 1000), 999)
    tm = time.gmtime(seconds)
    return time.strftime("%Y-%m-%d", tm), time.strftime("%H:%M:%S", tm), millis


def _json_default(value: object) -> object:
    # bytes (ids, nonces) are shown in hex; anything else unknown by its str().
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, set | frozenset):
        return sorted(str(v) for v in value)
    return str(value)


def _text_value(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, str):
        # Quote only when needed, so ``key=value`` stays easy to grep and to split.
        if value == "" or any(c.isspace() or c in '"=\\' or ord(c) in _ESCAPES for c in value):
            # json.dumps escapes C0 controls, quotes and backslashes; the rest is ours.
            return json.dumps(value, ensure_ascii=False).translate(_JSON_RESIDUAL_ESCAPES)
        return value
    if isinstance(value, float):
        return repr(value)
    return str(value).translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``2026-11-28 01:02:03.123 INFO  p2pfed.node: message key=value ...`` (UTC)."""

    def format(self, record: logging.LogRecord) -> str:
        day, clock, millis = _utc_parts(record.created)
        message = record.getMessage().translate(_ESCAPES)
        parts = [f"{day} {clock}.{millis:03d} {record.levelname:<5} {record.name}: {message}"]
        parts.extend(f"{key}={_text_value(value)}" for key, value in record_extras(record).items())
        line = " ".join(parts)
        # A traceback is the one multi-line exception to "one record, one line": it is ours,
        # not a peer's, and it is far more readable unescaped. Each line is indented.
        trace = self._trace(record)
        if trace:
            line += "\n" + "\n".join("    " + t for t in trace.splitlines())
        return line

    def _trace(self, record: logging.LogRecord) -> str:
        text = ""
        if record.exc_info:
            text = self.formatException(record.exc_info)
        elif record.exc_text:
            text = record.exc_text
        if record.stack_info:
            text = (text + "\n" if text else "") + self.formatStack(record.stack_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``msg``, extras.

    Exceptions add ``exc`` (the formatted traceback), stack info adds ``stack``. Values JSON
    cannot represent are written as hex (bytes) or ``str()``; NaN and infinities as strings.
    """

    def format(self, record: logging.LogRecord) -> str:
        day, clock, millis = _utc_parts(record.created)
        obj: dict[str, Any] = {
            "ts": f"{day}T{clock}.{millis:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record_extras(record).items():
            name = f"extra.{key}" if key in obj else key
            obj[name] = _finite_or_text(value)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii keeps U+2028/U+2029 escaped, so the line is one line for every reader.
        return json.dumps(obj, default=_json_default, ensure_ascii=True, allow_nan=False)


def _finite_or_text(value: object) -> object:
    # Strict JSON has no NaN/Infinity; a gauge-like extra may well be NaN.
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return repr(value)
    return value


def _parse_level(level: str | int) -> int:
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        value = logging.getLevelName(level.strip().upper())
        if isinstance(value, int):
            return value
    raise ValueError(
        f"unknown log level {level!r}; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    )


def setup_logging(
    format: LogFormat = "text",
    level: str | int = "INFO",
    stream: TextIO | None = None,
) -> None:
    """Send log records of ``level`` and above to ``stream`` (default: stderr) as text or JSON.

    Installs one handler on the root logger (so library warnings, such as zeroconf's, are
    shown too) and sets the root level. Calling it again replaces that handler: it never
    duplicates lines. Handlers installed by others (pytest's ``caplog``, for instance) are
    left alone.

    >>> import io
    >>> out = io.StringIO()
    >>> setup_logging("json", "DEBUG", out)
    >>> logging.getLogger("p2pfed.doc").debug("hi", extra={"n": 1})
    >>> json.loads(out.getvalue())["n"]
    1
    """
    if format not in ("text", "json"):
        raise ValueError(f"unknown log format {format!r}; use 'text' or 'json'")
    numeric_level = _parse_level(level)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)


def _default_clock() -> float:
    # trio's clock when running under trio (simnet's virtual time), else a monotonic one
    try:
        import trio

        return trio.current_time()
    except (ImportError, RuntimeError):
        return time.monotonic()


class ThrottledLog:
    """At most one line per ``key`` (say, a source address) per ``interval`` seconds.

    Lines suppressed in between are counted, and the next line for that key says how many
    there were: a connect storm from one address costs one line a minute, not one per
    connection, and the operator still sees its size. At most ``max_keys`` keys are
    remembered (the oldest are forgotten first), so many sources cannot grow it either.

    >>> throttled = ThrottledLog(logging.getLogger("p2pfed.doc"), clock=lambda: 0.0)
    >>> throttled.warning("10.0.0.9", "handshake from %s failed", "10.0.0.9")
    True
    >>> throttled.warning("10.0.0.9", "handshake from %s failed", "10.0.0.9")
    False
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        *,
        clock: Callable[[], float] | None = None,
        max_keys: int = 4096,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock or _default_clock
        self._max_keys = max_keys
        self._keys: dict[Hashable, list[float]] = {}  # key -> [quiet until, suppressed]

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at warning level unless ``key`` logged within the interval."""
        return self.log(logging.WARNING, key, msg, *args)

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log unless throttled; True if a line was written."""
        now = self._clock()
        entry = self._keys.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return False
        suppressed = int(entry[1]) if entry is not None else 0
        self._keys.pop(key, None)
        if len(self._keys) >= self._max_keys:
            self._forget(now)
        self._keys[key] = [now + self.interval, 0]
        if suppressed:
            msg += " (and %d more like it in the last %gs)"
            args = (*args, suppressed, self.interval)
        self.logger.log(level, msg, *args)
        return True

    def _forget(self, now: float) -> None:
        expired = [k for k, (until, count) in self._keys.items() if until <= now and not count]
        for key in expired:
            del self._keys[key]
        while len(self._keys) >= self._max_keys:
            del self._keys[next(iter(self._keys))]
