"""Node metrics in the Prometheus text exposition format 0.0.4, and a tiny HTTP server for them.

Why not ``prometheus_client``: its default registry is process-global and it starts
threads; a simulation runs many nodes in one process and each needs its own registry. So a
:class:`MetricsRegistry` here is a plain object owned by one node; :class:`NodeMetrics`
creates the node's metrics in it; :func:`serve_metrics` exposes ``GET /metrics`` over HTTP.

Example::

    >>> reg = MetricsRegistry()
    >>> m = NodeMetrics(reg)
    >>> m.rounds_total.inc()
    >>> m.groups_total.labels(outcome="completed").inc()
    >>> "p2pfed_rounds_total 1" in reg.render().splitlines()
    True

Rules of this file: rendering is deterministic (metrics sorted by name, series by label
values, histogram buckets by bound) so two registries with equal values render to equal
bytes; updates and rendering take the registry's lock, so a worker thread (training runs
in ``trio.to_thread``) may update a metric while the server renders; the HTTP server
answers exactly one request per connection, bounds its size, time and concurrency, and
never lets one client's bytes or errors stop it.

Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/ ("Text-based
format"): ``# HELP name text`` (``\\`` and newline escaped), ``# TYPE name kind``, then
``name{label="value",...} number`` lines, label values escaping ``\\``, ``"`` and newline;
numbers are Go floats (``+Inf``, ``-Inf``, ``NaN``).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, Literal, TypeVar

import trio

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_METRICS_PORT",
    "GROUP_OUTCOMES",
    "GROUP_SECONDS_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricsRegistry",
    "NodeMetrics",
    "handle_http_request",
    "serve_metrics",
]

log = logging.getLogger("p2pfed.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Content-Type of the text exposition format 0.0.4."""
DEFAULT_METRICS_PORT = 9464
"""The port :func:`serve_metrics` listens on by default (OpenTelemetry's Prometheus port)."""

_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_DEFAULT_MAX_SERIES = 1000

MetricType = Literal["counter", "gauge", "histogram"]


# --- values and escaping ---------------------------------------------------------------------


def format_value(value: float) -> str:
    """A sample value as Go's ``strconv.ParseFloat`` (Prometheus' parser) reads it.

    Integral values print without a fraction (``3``, not ``3.0``) so counters stay readable.

    >>> [format_value(v) for v in (3, 0.5, float("inf"), float("-inf"), float("nan"))]
    ['3', '0.5', '+Inf', '-Inf', 'NaN']
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


# --- metric families -------------------------------------------------------------------------


class CounterChild:
    """One series of a :class:`Counter`: a number that only goes up."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (finite and >= 0: a counter never goes down)."""
        if not (amount >= 0 and math.isfinite(amount)):
            raise ValueError(f"a counter can only increase; got inc({amount!r})")
        with self._lock:
            self._value += amount

    @property
    def value(self) -> float:
        """The current value."""
        return self._value


class GaugeChild:
    """One series of a :class:`Gauge`: a number that goes up and down (NaN = unknown)."""

    def __init__(self, lock: threading.Lock, initial: float) -> None:
        self._lock = lock
        self._value: float = initial

    def set(self, value: float) -> None:
        """Set the value (NaN means "not known yet", for example accuracy before evaluation)."""
        with self._lock:
            self._value = value

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (may be negative)."""
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount``."""
        with self._lock:
            self._value -= amount

    @property
    def value(self) -> float:
        """The current value."""
        return self._value


class HistogramChild:
    """One series of a :class:`Histogram`: counts of observations per upper bound, sum, count."""

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self._bounds = bounds
        self._bucket_counts = [0] * len(bounds)  # non-cumulative; the last bound is +Inf
        self._sum: float = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        """Record one observation (any number but NaN)."""
        if math.isnan(value):
            raise ValueError("cannot observe NaN in a histogram")
        with self._lock:
            for i, bound in enumerate(self._bounds):
                if value <= bound:
                    self._bucket_counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        """How many observations were recorded."""
        return self._count

    @property
    def sum(self) -> float:
        """The sum of every observation."""
        return self._sum

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """``[(upper bound, observations <= bound), ...]`` ending with ``(inf, count)``."""
        out = []
        running = 0
        for bound, n in zip(self._bounds, self._bucket_counts, strict=True):
            running += n
            out.append((bound, running))
        return out


ChildT = TypeVar("ChildT", CounterChild, GaugeChild, HistogramChild)


class _Family(Generic[ChildT]):
    """A named metric with zero or more label names; one child (series) per label-value tuple."""

    metric_type: MetricType

    def __init__(
        self,
        registry: MetricsRegistry,
        name: str,
        help: str,
        labelnames: Sequence[str],
        max_series: int,
    ) -> None:
        self.name: str = name
        self.help: str = help
        self.labelnames: tuple[str, ...] = tuple(labelnames)
        self._lock: threading.Lock = registry._lock
        self._max_series: int = max_series
        self._children: dict[tuple[str, ...], ChildT] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> ChildT:
        raise NotImplementedError

    def sample_names(self) -> tuple[str, ...]:
        """Every sample name this family writes (a histogram writes three)."""
        return (self.name,)

    def labels(self, *values: str, **kwargs: str) -> ChildT:
        """The series with these label values (created at zero on first use).

        Give values in label-name order or by name: ``m.labels("completed")`` or
        ``m.labels(outcome="completed")``.
        """
        if not self.labelnames:
            raise ValueError(f"metric {self.name} has no labels; update it directly")
        if values and kwargs:
            raise ValueError("give label values either by position or by name, not both")
        if kwargs:
            if set(kwargs) != set(self.labelnames):
                raise ValueError(
                    f"metric {self.name} has labels {list(self.labelnames)}; got {sorted(kwargs)}"
                )
            values = tuple(kwargs[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(
                f"metric {self.name} has {len(self.labelnames)} label(s) "
                f"{list(self.labelnames)}; got {len(values)} value(s)"
            )
        for v in values:
            if not isinstance(v, str):
                raise TypeError(f"label values must be str; got {v!r} for metric {self.name}")
        key = tuple(values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                # Labels from unbounded sets (peer ids, addresses) would grow memory forever.
                if len(self._children) >= self._max_series:
                    raise ValueError(
                        f"metric {self.name} already has {self._max_series} series; label "
                        "values must come from a small fixed set"
                    )
                child = self._new_child()
                self._children[key] = child
        return child

    def _only_child(self) -> ChildT:
        if self.labelnames:
            raise ValueError(
                f"metric {self.name} has labels {list(self.labelnames)}; use .labels(...) first"
            )
        return self._children[()]

    def _samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render_lines(self) -> Iterator[str]:
        """``# HELP``, ``# TYPE`` and sample lines (caller holds the registry lock)."""
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.metric_type}"
        yield from self._samples()

    def _sorted_children(self) -> list[tuple[tuple[str, ...], ChildT]]:
        return sorted(self._children.items())


class Counter(_Family[CounterChild]):
    """A monotonically increasing count; name it ``..._total``."""

    metric_type: MetricType = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild(self._lock)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to an unlabelled counter."""
        self._only_child().inc(amount)

    @property
    def value(self) -> float:
        """The value of an unlabelled counter."""
        return self._only_child().value

    def _samples(self) -> Iterator[str]:
        for values, child in self._sorted_children():
            yield f"{self.name}{_labels_text(self.labelnames, values)} {format_value(child.value)}"


class Gauge(_Family[GaugeChild]):
    """A value that goes up and down; ``initial`` is the value of every new series."""

    metric_type: MetricType = "gauge"

    def __init__(
        self,
        registry: MetricsRegistry,
        name: str,
        help: str,
        labelnames: Sequence[str],
        max_series: int,
        initial: float = 0.0,
    ) -> None:
        self._initial = initial
        super().__init__(registry, name, help, labelnames, max_series)

    def _new_child(self) -> GaugeChild:
        return GaugeChild(self._lock, self._initial)

    def set(self, value: float) -> None:
        """Set an unlabelled gauge."""
        self._only_child().set(value)

    def inc(self, amount: float = 1) -> None:
        """Add to an unlabelled gauge."""
        self._only_child().inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Subtract from an unlabelled gauge."""
        self._only_child().dec(amount)

    @property
    def value(self) -> float:
        """The value of an unlabelled gauge."""
        return self._only_child().value

    def _samples(self) -> Iterator[str]:
        for values, child in self._sorted_children():
            yield f"{self.name}{_labels_text(self.labelnames, values)} {format_value(child.value)}"


class Histogram(_Family[HistogramChild]):
    """Observations counted in cumulative buckets (``_bucket{le=...}``, ``_sum``, ``_count``)."""

    metric_type: MetricType = "histogram"

    def __init__(
        self,
        registry: MetricsRegistry,
        name: str,
        help: str,
        labelnames: Sequence[str],
        max_series: int,
        buckets: Sequence[float],
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()  # +Inf is always added; accept it given explicitly too
        if not bounds:
            raise ValueError(f"histogram {name} needs at least one finite bucket bound")
        if any(not math.isfinite(b) for b in bounds):
            raise ValueError(f"histogram {name}: bucket bounds must be finite; got {buckets!r}")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(
                f"histogram {name}: bucket bounds must increase strictly; got {buckets!r}"
            )
        if "le" in labelnames:
            raise ValueError(f"histogram {name}: 'le' is reserved for bucket bounds")
        self._bounds = (*bounds, math.inf)
        super().__init__(registry, name, help, labelnames, max_series)

    @property
    def bounds(self) -> tuple[float, ...]:
        """Bucket upper bounds, ending with +inf."""
        return self._bounds

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._lock, self._bounds)

    def sample_names(self) -> tuple[str, ...]:
        return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")

    def observe(self, value: float) -> None:
        """Record an observation in an unlabelled histogram."""
        self._only_child().observe(value)

    @property
    def count(self) -> int:
        """Observations in an unlabelled histogram."""
        return self._only_child().count

    @property
    def sum(self) -> float:
        """Sum of the observations in an unlabelled histogram."""
        return self._only_child().sum

    def _samples(self) -> Iterator[str]:
        names = (*self.labelnames, "le")
        for values, child in self._sorted_children():
            for bound, running in child.cumulative_buckets():
                labels = _labels_text(names, (*values, format_value(bound)))
                yield f"{self.name}_bucket{labels} {running}"
            labels = _labels_text(self.labelnames, values)
            yield f"{self.name}_sum{labels} {format_value(child.sum)}"
            yield f"{self.name}_count{labels} {child.count}"


# --- registry --------------------------------------------------------------------------------


class MetricsRegistry:
    """The metrics of one node, rendered together by :meth:`render`.

    Not global: create one per node (simulations run many nodes in one process).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        self._sample_names: set[str] = set()

    def _check_new(self, name: str, help: str, labelnames: Iterable[str]) -> tuple[str, ...]:
        if not isinstance(name, str) or not _METRIC_NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}; use [a-zA-Z_:][a-zA-Z0-9_:]*")
        if not isinstance(help, str) or not help:
            raise ValueError(f"metric {name} needs a help text")
        names = tuple(labelnames)
        for label in names:
            if not isinstance(label, str) or not _LABEL_NAME_RE.match(label):
                raise ValueError(f"metric {name}: invalid label name {label!r}")
            if label.startswith("__"):
                raise ValueError(f"metric {name}: label names starting '__' are reserved")
        if len(set(names)) != len(names):
            raise ValueError(f"metric {name}: duplicate label names {list(names)}")
        return names

    def _add(self, family: Counter | Gauge | Histogram) -> None:
        with self._lock:
            clash = self._sample_names.intersection(family.sample_names())
            if family.name in self._families or clash:
                raise ValueError(
                    f"metric {family.name} clashes with a metric already in this registry "
                    f"({sorted(clash) or family.name})"
                )
            self._families[family.name] = family
            self._sample_names.update(family.sample_names())

    def counter(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        max_series: int = _DEFAULT_MAX_SERIES,
    ) -> Counter:
        """Create and register a counter."""
        labels = self._check_new(name, help, labelnames)
        metric = Counter(self, name, help, labels, max_series)
        self._add(metric)
        return metric

    def gauge(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        initial: float = 0.0,
        max_series: int = _DEFAULT_MAX_SERIES,
    ) -> Gauge:
        """Create and register a gauge whose series start at ``initial``."""
        labels = self._check_new(name, help, labelnames)
        metric = Gauge(self, name, help, labels, max_series, initial)
        self._add(metric)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
        *,
        max_series: int = _DEFAULT_MAX_SERIES,
    ) -> Histogram:
        """Create and register a histogram with these finite upper bounds (+Inf is added)."""
        labels = self._check_new(name, help, labelnames)
        metric = Histogram(self, name, help, labels, max_series, buckets)
        self._add(metric)
        return metric

    def render(self) -> str:
        """Every metric in the text exposition format 0.0.4, sorted; ends with a newline."""
        with self._lock:
            lines: list[str] = []
            for name in sorted(self._families):
                lines.extend(self._families[name].render_lines())
        return "\n".join(lines) + "\n" if lines else ""


# --- the node's metrics ----------------------------------------------------------------------

GROUP_OUTCOMES = ("completed", "aborted", "declined")
"""Values of the ``outcome`` label of ``p2pfed_groups_total``."""
GROUP_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds (seconds) of ``p2pfed_group_seconds`` buckets: a LAN group takes ~0.1-10 s."""


class NodeMetrics:
    """The metrics a node exports, created in ``registry``.

    Accuracy and loss gauges start at NaN ("not measured yet") rather than a misleading 0.
    Every ``outcome`` series of ``p2pfed_groups_total`` exists from the start (at 0), so rates
    over them work before the first group of that kind.
    """

    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.registry = registry
        self.rounds_total = r.counter("p2pfed_rounds_total", "Training rounds completed.")
        self.groups_total = r.counter(
            "p2pfed_groups_total",
            "Averaging groups this node took part in, by outcome (completed, aborted, declined).",
            ["outcome"],
        )
        for outcome in GROUP_OUTCOMES:
            self.groups_total.labels(outcome=outcome)
        self.bytes_sent_total = r.counter(
            "p2pfed_bytes_sent_total", "Application bytes sent to peers (before encryption)."
        )
        self.bytes_received_total = r.counter(
            "p2pfed_bytes_received_total",
            "Application bytes received from peers (after decryption).",
        )
        self.epsilon_spent = r.gauge(
            "p2pfed_epsilon_spent",
            "Differential-privacy epsilon spent so far (at the ledger delta).",
        )
        self.epsilon_budget = r.gauge(
            "p2pfed_epsilon_budget", "Differential-privacy epsilon budget configured."
        )
        self.epsilon_remaining = r.gauge(
            "p2pfed_epsilon_remaining",
            "Differential-privacy epsilon left: budget minus spent (NaN without DP).",
            initial=math.nan,
        )
        self.privacy_budget_exhausted = r.gauge(
            "p2pfed_privacy_budget_exhausted",
            "1 once the node has stopped training because its privacy budget is spent.",
        )
        self.train_loss = r.gauge(
            "p2pfed_train_loss",
            "Training loss of the last local round (NaN until measured).",
            initial=math.nan,
        )
        self.round_coverage = r.gauge(
            "p2pfed_round_coverage_ratio",
            "Exact rounds: the share of the round's nodes the last round's average can "
            "include (1: exact; NaN with random groups).",
            initial=math.nan,
        )
        self.test_accuracy = r.gauge(
            "p2pfed_test_accuracy",
            "Accuracy of the current model on the local test set, 0..1 (NaN until measured).",
            initial=math.nan,
        )
        self.test_loss = r.gauge(
            "p2pfed_test_loss",
            "Loss of the current model on the local test set (NaN until measured).",
            initial=math.nan,
        )
        self.peers_connected = r.gauge("p2pfed_peers_connected", "Peers with an open channel.")
        self.round = r.gauge("p2pfed_round", "Current training round number.")
        self.group_seconds = r.histogram(
            "p2pfed_group_seconds",
            "Duration of averaging groups in seconds, from formation to outcome.",
            GROUP_SECONDS_BUCKETS,
        )

    def group_finished(self, outcome: str, seconds: float) -> None:
        """Count a group's ``outcome`` (one of :data:`GROUP_OUTCOMES`) and observe its duration."""
        if outcome not in GROUP_OUTCOMES:
            raise ValueError(f"unknown group outcome {outcome!r}; use one of {GROUP_OUTCOMES}")
        self.groups_total.labels(outcome=outcome).inc()
        self.group_seconds.observe(seconds)


# --- HTTP ------------------------------------------------------------------------------------

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_MAX_HEADERS = 64
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}


class _HttpError(Exception):
    """A request we answer with an error status (never leaves this module)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra_headers),
    ]
    head = ("\r\n".join(headers) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body


def _error_response(status: int, detail: str) -> bytes:
    return _response(status, f"{status} {_REASONS[status]}: {detail}\n".encode())


def _is_token(data: bytes) -> bool:
    return bool(data) and all(b in _TCHAR for b in data)


def _parse_head(head: bytes) -> tuple[bytes, str]:
    """Validate a request head (without the final empty line); return (method, path)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _HttpError(400, "the request line must be 'METHOD TARGET HTTP/1.1'")
    method, target, version = parts
    if not _is_token(method):
        raise _HttpError(400, "invalid method")
    if not target or any(b <= 0x20 or b >= 0x7F for b in target):
        raise _HttpError(400, "invalid request target")
    if not re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
        raise _HttpError(400, "invalid HTTP version")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise _HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    header_lines = lines[1:]
    if len(header_lines) > _MAX_HEADERS:
        raise _HttpError(431, f"more than {_MAX_HEADERS} header fields")
    hosts = 0
    for line in header_lines:
        name, colon, value = line.partition(b":")
        if not colon or not _is_token(name):
            # Also rejects obsolete line folding (a line starting with a space): RFC 9112 5.2.
            raise _HttpError(400, "malformed header field line")
        if any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
            raise _HttpError(400, "control character in a header field value")
        lname = name.lower()
        if lname == b"host":
            hosts += 1
        elif lname == b"transfer-encoding" or (
            lname == b"content-length" and value.strip() != b"0"
        ):
            raise _HttpError(400, "a request body is not accepted")
    if version == b"HTTP/1.1" and hosts != 1:
        # RFC 9112 3.2: an HTTP/1.1 request without exactly one Host field gets a 400.
        raise _HttpError(400, "an HTTP/1.1 request needs exactly one Host header field")
    text = target.decode("ascii")
    if not text.startswith("/"):
        if not (text.startswith("http://") or text.startswith("https://")):
            raise _HttpError(400, "the request target must be a path such as /metrics")
        text = urllib.parse.urlsplit(text).path or "/"  # absolute-form (RFC 9112 3.2.2)
    return method, text.split("?", 1)[0]


def handle_http_request(head: bytes, registry: MetricsRegistry) -> bytes:
    """The complete HTTP response (bytes) to one request head, for :func:`serve_metrics`.

    ``head`` is the request line and header lines separated by CRLF, without the empty line
    that ends them. ``GET /metrics`` (and ``HEAD``) -> 200 with the exposition text; another
    path -> 404; another method on /metrics -> 405; anything malformed -> 400. Pure: no I/O.

    >>> handle_http_request(b"GET /nope HTTP/1.0", MetricsRegistry()).split(b"\\r\\n")[0]
    b'HTTP/1.1 404 Not Found'
    """
    try:
        method, path = _parse_head(head)
    except _HttpError as exc:
        return _error_response(exc.status, exc.detail)
    if path != "/metrics":
        return _error_response(404, "only /metrics is served here")
    if method not in (b"GET", b"HEAD"):
        return _response(
            405,
            b"405 Method Not Allowed: use GET\n",
            extra_headers=[("Allow", "GET, HEAD")],
        )
    body = registry.render().encode("utf-8")
    return _response(200, body, content_type=CONTENT_TYPE, head_only=method == b"HEAD")


async def _read_head(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes | None:
    """The request head without its final CRLF CRLF; None if the client closed first."""
    buf = bytearray()
    scan_from = 0
    while True:
        chunk = await stream.receive_some(max_bytes + 4 - len(buf))
        if not chunk:
            return None
        buf += chunk
        end = buf.find(b"\r\n\r\n", max(0, scan_from - 3))
        if end >= 0:
            if end > max_bytes:
                raise _HttpError(431, f"the request head is longer than {max_bytes} bytes")
            return bytes(buf[:end])
        if len(buf) >= max_bytes + 4:
            raise _HttpError(431, f"the request head is longer than {max_bytes} bytes")
        scan_from = len(buf)


async def _serve_one(
    stream: trio.SocketStream,
    registry: MetricsRegistry,
    read_timeout: float,
    max_request_bytes: int,
) -> None:
    response: bytes | None = None
    with trio.move_on_after(read_timeout) as scope:
        try:
            head = await _read_head(stream, max_request_bytes)
        except _HttpError as exc:
            response = _error_response(exc.status, exc.detail)
        else:
            if head is None:
                return  # the client hung up without asking anything
            response = handle_http_request(head, registry)
    if scope.cancelled_caught:
        response = _error_response(408, f"no complete request within {read_timeout:g} s")
    assert response is not None
    with trio.move_on_after(read_timeout):
        await stream.send_all(response)
        # Lingering close: drain what the client still sends (a too-long request) for a
        # moment, so the kernel does not reset the connection and discard our response.
        await stream.send_eof()
        drained = 0
        while drained < 65536:
            data = await stream.receive_some(4096)
            if not data:
                break
            drained += len(data)


async def serve_metrics(
    registry: MetricsRegistry,
    host: str = "127.0.0.1",
    port: int = DEFAULT_METRICS_PORT,
    *,
    read_timeout: float = 5.0,
    max_request_bytes: int = 8192,
    max_connections: int = 16,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` over HTTP/1.1 on ``host:port`` until cancelled.

    One request per connection, then the connection is closed. A request head longer than
    ``max_request_bytes`` gets 431, one not complete within ``read_timeout`` seconds 408;
    at most ``max_connections`` are served at once (more are closed unanswered). No client
    can stop the server: errors of one connection are logged and that connection dropped.

    Start it with ``port = await nursery.start(serve_metrics, registry, host, port)``: the
    start value is the bound port (useful with ``port=0``; with a host name that resolves
    to several addresses, the port of the first listener).
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be 0..65535; got {port}")
    if max_request_bytes < 64 or read_timeout <= 0 or max_connections < 1:
        raise ValueError("max_request_bytes >= 64, read_timeout > 0 and max_connections >= 1")
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except (OSError, UnicodeError) as exc:
        from p2pfed.network import listen_error  # (network imports zeroconf: only here)

        setting = "metrics_port (and metrics_host) in config.toml"
        raise listen_error("the metrics endpoint", host, port, exc, setting) from exc
    bound_port = int(listeners[0].socket.getsockname()[1])
    slots = trio.Semaphore(max_connections)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                log.warning("metrics: too many connections; closing one unanswered")
                return
            try:
                await _serve_one(stream, registry, read_timeout, max_request_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("metrics: connection error: %s", exc)
            except Exception:
                log.exception("metrics: unexpected error serving a request")
            finally:
                slots.release()

    log.info("serving metrics", extra={"url": f"http://{_url_host(host)}:{bound_port}/metrics"})
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started(bound_port)
    finally:
        # serve_listeners leaves its listeners open; free the port when we are cancelled.
        for listener in listeners:
            await trio.aclose_forcefully(listener)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
