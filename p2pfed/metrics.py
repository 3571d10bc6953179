"""Node metrics for Prometheus: ``prometheus_client`` metrics, served by a small trio server.

:class:`NodeMetrics` creates a node's metrics in its own
``prometheus_client.CollectorRegistry`` (never the library's process-global default: a
simulation runs many nodes in one process) and updates them from the node
(:meth:`NodeMetrics.node_started`, :meth:`~NodeMetrics.round_completed`,
:meth:`~NodeMetrics.group_finished`, :meth:`~NodeMetrics.refresh`). :func:`serve_metrics`
answers ``GET /metrics`` on a trio listener; :class:`MetricsExchange` is its sans-IO core:
bytes in, the response out, parsed by ``h11``, rendered by ``prometheus_client``.

Example::

    >>> m = NodeMetrics()
    >>> m.group_finished("completed", 0.5)
    >>> m.registry.get_sample_value("p2pfed_groups_total", {"outcome": "completed"})
    1.0
    >>> b"p2pfed_groups_total" in render(m.registry)[0]
    True

Rules of this file: a value that is not known yet is NaN (accuracy before the first
evaluation); a metric that cannot apply to this node (privacy budget without DP, the local
epsilon without distributed DP, federation figures with DP, coverage without exact rounds,
test figures with evaluation off) is unregistered at start, so that after a round every
exported series has a real value. The HTTP server answers one request per connection and
bounds each connection's request size and time; when all its connection slots are taken, a
new connection evicts one that only waits (an answered client that has not closed, else the
one waiting longest for its request), so idle connections, however many, cannot lock a
scraper out. prometheus_client's metrics take their own locks, so training threads may
update them while the server renders.
"""

from __future__ import annotations

import contextlib
import http
import itertools
import logging
import math
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import h11
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from p2pfed.logs import ThrottledLog

if TYPE_CHECKING:
    from p2pfed.node import Node, RoundReport

__all__ = [
    "DEFAULT_METRICS_PORT",
    "FEDERATION_FIGURES",
    "GROUP_OUTCOMES",
    "GROUP_SECONDS_BUCKETS",
    "MetricsExchange",
    "NodeMetrics",
    "handle_http_request",
    "render",
    "serve_metrics",
]

log = logging.getLogger("p2pfed.metrics")

DEFAULT_METRICS_PORT = 9464
"""The port :func:`serve_metrics` listens on by default (OpenTelemetry's Prometheus port)."""

GROUP_OUTCOMES = ("completed", "aborted", "declined")
"""Values of the ``outcome`` label of ``p2pfed_groups_total``."""
GROUP_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Upper bounds (seconds) of ``p2pfed_group_seconds`` buckets: a LAN group takes ~0.1-10 s."""

FEDERATION_FIGURES = {
    "accuracy": ("p2pfed_federation_accuracy", "Federation-wide test accuracy, 0..1."),
    "loss": ("p2pfed_federation_loss", "Federation-wide test loss."),
    "samples": ("p2pfed_federation_samples", "Test samples behind the federation figures."),
    "round": ("p2pfed_federation_round", "Round of the federation figures."),
}
"""Keys of ``Node.federation_metrics`` -> (gauge name, help): the federation-wide figures
the node learns from its groups (NaN until it has them; not exported with DP on)."""


def render(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The exposition of ``registry`` and its Content-Type, in the format ``accept`` (an HTTP
    Accept header) asks for: OpenMetrics or Prometheus text (the default)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class NodeMetrics:
    """The metrics a node exports, in ``registry`` (a new one by default).

    Accuracy and loss gauges start at NaN ("not measured yet") rather than a misleading 0.
    Every ``outcome`` series of ``p2pfed_groups_total`` exists from the start (at 0), so rates
    over them work before the first group of that kind.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.rounds_total = Counter("p2pfed_rounds_total", "Training rounds completed.", registry=r)
        self.groups_total = Counter(
            "p2pfed_groups_total",
            "Averaging groups this node took part in, by outcome (completed, aborted, declined).",
            ["outcome"],
            registry=r,
        )
        for outcome in GROUP_OUTCOMES:
            self.groups_total.labels(outcome=outcome)
        self.bytes_sent_total = Counter(
            "p2pfed_bytes_sent_total",
            "Application bytes sent to peers (before encryption).",
            registry=r,
        )
        self.bytes_received_total = Counter(
            "p2pfed_bytes_received_total",
            "Application bytes received from peers (after decryption).",
            registry=r,
        )
        self.epsilon_spent = Gauge(
            "p2pfed_epsilon_spent",
            "Differential-privacy epsilon spent so far (at the ledger delta).",
            registry=r,
        )
        self.epsilon_budget = _nan_gauge(
            r, "p2pfed_epsilon_budget", "Differential-privacy epsilon budget configured."
        )
        self.epsilon_remaining = _nan_gauge(
            r,
            "p2pfed_epsilon_remaining",
            "Differential-privacy epsilon left: budget minus spent.",
        )
        self.local_epsilon_spent = Gauge(
            "p2pfed_privacy_local_epsilon_spent",
            "Distributed DP: epsilon spent against members who collude to strip the masks "
            "(the budget bounds p2pfed_epsilon_spent, the guarantee against observers of "
            "group sums).",
            registry=r,
        )
        self.privacy_budget_exhausted = Gauge(
            "p2pfed_privacy_budget_exhausted",
            "1 once the node has stopped training because its privacy budget is spent.",
            registry=r,
        )
        self.train_loss = _nan_gauge(
            r, "p2pfed_train_loss", "Training loss of the last local round (NaN until measured)."
        )
        self.round_coverage = _nan_gauge(
            r,
            "p2pfed_round_coverage_ratio",
            "Exact rounds: the share of the round's nodes the last round's average can "
            "include (1: exact).",
        )
        self.test_accuracy = _nan_gauge(
            r,
            "p2pfed_test_accuracy",
            "Accuracy of the current model on the local test set, 0..1 (NaN until measured).",
        )
        self.test_loss = _nan_gauge(
            r,
            "p2pfed_test_loss",
            "Loss of the current model on the local test set (NaN until measured).",
        )
        self.federation = {
            key: _nan_gauge(r, name, text + " NaN until known.")
            for key, (name, text) in FEDERATION_FIGURES.items()
        }
        self.peers_connected = Gauge(
            "p2pfed_peers_connected", "Peers with an open channel.", registry=r
        )
        self.round = Gauge("p2pfed_round", "Current training round number.", registry=r)
        self.group_seconds = Histogram(
            "p2pfed_group_seconds",
            "Duration of averaging groups in seconds, from formation to outcome.",
            buckets=GROUP_SECONDS_BUCKETS,
            registry=r,
        )
        self._counted = (0, 0)  # traffic already added to the byte counters

    def group_finished(self, outcome: str, seconds: float) -> None:
        """Count a group's ``outcome`` (one of :data:`GROUP_OUTCOMES`) and observe its duration."""
        if outcome not in GROUP_OUTCOMES:
            raise ValueError(f"unknown group outcome {outcome!r}; use one of {GROUP_OUTCOMES}")
        self.groups_total.labels(outcome=outcome).inc()
        self.group_seconds.observe(seconds)

    def node_started(self, node: Node) -> None:
        """Fit the metrics to the running ``node``: drop those that cannot apply to it, and
        take what it already knows (a resumed round, the ledger's spending)."""
        unused = []
        if node.ledger is None:
            unused += [self.epsilon_spent, self.epsilon_budget, self.epsilon_remaining]
        if node.ledger is None or not _distributed(node):
            # only distributed DP has a second, weaker guarantee; elsewhere it would be a
            # copy of epsilon_spent that reads as if it meant something else
            unused.append(self.local_epsilon_spent)
        if not node.exact:
            unused.append(self.round_coverage)
        if not node.options.evaluate_every or node.task is None:
            unused += [self.test_accuracy, self.test_loss]
        # federation figures exist only with DP off (spec/group.md, "Federation metrics");
        # the sample count only from exact rounds' integer sums
        if not getattr(node.federation.params, "federation_metrics_active", False):
            unused += list(self.federation.values())
        elif not node.exact:
            unused.append(self.federation["samples"])
        for metric in unused:
            with contextlib.suppress(KeyError):  # started twice
                self.registry.unregister(metric)
        self._privacy(node)
        self.refresh(node)

    def round_completed(self, report: RoundReport, node: Node) -> None:
        """Record one completed round of ``node`` (its ``on_round`` callback)."""
        self.record_report(report)
        self._privacy(node)
        self.refresh(node)

    def record_report(self, report: RoundReport) -> None:
        """Take what one round's report says (:meth:`round_completed` without the node)."""
        self.rounds_total.inc()
        self.round.set(report.round)
        _set_known(self.test_accuracy, report.metrics.get("accuracy"))
        _set_known(self.test_loss, report.metrics.get("loss"))
        _set_known(self.train_loss, report.train_loss)
        if report.nodes:
            self.round_coverage.set(min(1.0, report.coverage / report.nodes))

    def refresh(self, node: Node) -> None:
        """Take the figures that change between rounds: traffic, peers, federation figures."""
        sent, received = node.traffic()
        self.bytes_sent_total.inc(max(0, sent - self._counted[0]))
        self.bytes_received_total.inc(max(0, received - self._counted[1]))
        self._counted = (max(sent, self._counted[0]), max(received, self._counted[1]))
        self.peers_connected.set(sum(1 for p in node.peer_summary() if p["connected"]))
        self.round.set(node.round)
        _set_known(self.test_accuracy, node.last_metrics.get("accuracy"))
        _set_known(self.test_loss, node.last_metrics.get("loss"))
        # read with getattr: the figures are an optional part of the node
        figures: Mapping[str, float] | None = getattr(node, "federation_metrics", None)
        if figures:
            for key, gauge in self.federation.items():
                _set_known(gauge, figures.get(key))

    def _privacy(self, node: Node) -> None:
        self.privacy_budget_exhausted.set(1.0 if node.budget_exhausted else 0.0)
        ledger = node.ledger
        if ledger is not None:
            self.epsilon_budget.set(ledger.epsilon_budget)
            self.epsilon_spent.set(ledger.spent())
            self.epsilon_remaining.set(ledger.remaining())
            if _distributed(node):
                self.local_epsilon_spent.set(ledger.local_spent())


def _distributed(node: Node) -> bool:
    return getattr(node.federation.params, "dp_level", None) == "distributed"


def _nan_gauge(registry: CollectorRegistry, name: str, help: str) -> Gauge:
    gauge = Gauge(name, help, registry=registry)
    gauge.set(math.nan)
    return gauge


def _set_known(gauge: Gauge, value: float | None) -> None:
    """Set ``gauge`` to ``value`` unless it is missing or NaN: an unknown figure (a task that
    reports no loss) must not wipe out the last known one."""
    if value is not None and not math.isnan(value):
        gauge.set(value)


# --- HTTP ------------------------------------------------------------------------------------

_MAX_HEADERS = 64


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> list[h11.Response | h11.Data | h11.EndOfMessage]:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *extra_headers,
    ]
    reason = http.HTTPStatus(status).phrase.encode("ascii")
    return [
        h11.Response(status_code=status, headers=headers, reason=reason),
        h11.Data(data=body),
        h11.EndOfMessage(),
    ]


def _error(status: int, detail: str) -> list[h11.Response | h11.Data | h11.EndOfMessage]:
    phrase = http.HTTPStatus(status).phrase
    return _response(status, f"{status} {phrase}: {detail}\n".encode())


class MetricsExchange:
    """One HTTP request for a registry's metrics and its response, without I/O.

    Feed the client's bytes to :meth:`receive` (``b""`` when the client closed its side)
    until it returns the response to send, then close the connection. ``GET /metrics`` (and
    ``HEAD``) -> 200 with the exposition; another path -> 404; another method -> 405;
    anything malformed -> 400; a request head over ``max_request_bytes`` -> 431.

    >>> x = MetricsExchange(NodeMetrics().registry)
    >>> x.receive(b"GET /metrics HTTP/1.1\\r\\n") is None
    True
    >>> x.receive(b"Host: localhost\\r\\n\\r\\n").split(b"\\r\\n")[0]
    b'HTTP/1.1 200 OK'
    """

    def __init__(self, registry: CollectorRegistry, max_request_bytes: int = 8192) -> None:
        self._registry = registry
        self._max_request_bytes = max_request_bytes
        self._received = 0
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=max_request_bytes)

    def receive(self, data: bytes) -> bytes | None:
        """The response once the request is complete (``b""``: the client left without a
        request; close silently), or None while more bytes are needed."""
        self._received += len(data)
        self._http.receive_data(data)
        try:
            event = self._http.next_event()
        except h11.RemoteProtocolError as exc:
            return self._send(_error(exc.error_status_hint, str(exc)))
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.ConnectionClosed):
            return b""
        assert isinstance(event, h11.Request)
        # h11 bounds only an incomplete head: one that arrives whole in a chunk is not
        head_bytes = self._received - len(self._http.trailing_data[0])
        if head_bytes > self._max_request_bytes:
            detail = f"the request head is longer than {self._max_request_bytes} bytes"
            return self._send(_error(431, detail))
        return self._send(self._answer(event))

    def timed_out(self, seconds: float) -> bytes:
        """The response to a client whose request did not arrive in time."""
        return self._send(_error(408, f"no complete request within {seconds:g} s"))

    def _send(self, events: list[h11.Response | h11.Data | h11.EndOfMessage]) -> bytes:
        return b"".join(self._http.send(event) or b"" for event in events)

    def _answer(self, request: h11.Request) -> list[h11.Response | h11.Data | h11.EndOfMessage]:
        if request.http_version not in (b"1.0", b"1.1"):
            return _error(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        if len(request.headers) > _MAX_HEADERS:
            return _error(431, f"more than {_MAX_HEADERS} header fields")
        headers = dict(request.headers)
        if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
            return _error(400, "a request body is not accepted")
        path = urllib.parse.urlsplit(request.target.decode("ascii")).path
        if path != "/metrics":
            return _error(404, "only /metrics is served here")
        if request.method not in (b"GET", b"HEAD"):
            body = b"405 Method Not Allowed: use GET\n"
            return _response(405, body, extra_headers=(("Allow", "GET, HEAD"),))
        accept = headers.get(b"accept", b"").decode("latin-1")
        body, content_type = render(self._registry, accept)
        # for HEAD, h11 keeps Content-Length and drops the body
        events = _response(200, body, content_type=content_type)
        return events if request.method == b"GET" else [events[0], events[2]]


def handle_http_request(head: bytes, registry: CollectorRegistry) -> bytes:
    """The complete HTTP response to one request head (request line and header lines
    separated by CRLF, without the empty line that ends them). Pure: no I/O.

    >>> handle_http_request(b"GET /nope HTTP/1.0", CollectorRegistry()).split(b"\\r\\n")[0]
    b'HTTP/1.1 404 Not Found'
    """
    exchange = MetricsExchange(registry)
    response = exchange.receive(head + b"\r\n\r\n")
    if response is None:
        response = exchange.receive(b"")  # the client's end: a request it never finished
    return response or b""


async def _read_request(stream: trio.SocketStream, exchange: MetricsExchange) -> bytes:
    while True:
        response = exchange.receive(await stream.receive_some(4096))
        if response is not None:
            return response


async def _drain(stream: trio.SocketStream) -> None:
    """Lingering close: read what the client still sends (a too-long request) until it
    closes, so the kernel does not reset the connection and discard our response."""
    drained = 0
    while drained < 65536:
        data = await stream.receive_some(4096)
        if not data:
            return
        drained += len(data)


class _Slots:
    """The server's connection slots. A connection that waits (for its request, or for the
    client to close after the response) can be evicted to make room for a new one: those
    that have their answer already go first, then the one that has waited longest for its
    request."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._ids = itertools.count()
        self._open: set[int] = set()
        self.evicted: set[int] = set()
        # evictable connections, oldest first (dicts keep insertion order)
        self._lingering: dict[int, trio.CancelScope] = {}
        self._reading: dict[int, trio.CancelScope] = {}

    def take(self) -> int | None:
        """A slot for a new connection (None: every slot is busy sending a response)."""
        if len(self._open) >= self._limit:
            for queue in (self._lingering, self._reading):
                if queue:
                    victim, scope = next(iter(queue.items()))
                    del queue[victim]
                    self._open.discard(victim)
                    self.evicted.add(victim)
                    scope.cancel()
                    break
            else:
                return None
        slot = next(self._ids)
        self._open.add(slot)
        return slot

    @contextlib.contextmanager
    def evictable(
        self, slot: int, deadline: float, *, answered: bool
    ) -> Iterator[trio.CancelScope]:
        """A cancel scope for a wait of ``slot`` that ends at ``deadline``, or earlier if a
        new connection needs the slot."""
        queue = self._lingering if answered else self._reading
        with trio.CancelScope(deadline=deadline) as scope:
            queue[slot] = scope
            try:
                yield scope
            finally:
                queue.pop(slot, None)

    def release(self, slot: int) -> None:
        self._open.discard(slot)
        self.evicted.discard(slot)


async def serve_metrics(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = DEFAULT_METRICS_PORT,
    *,
    read_timeout: float = 5.0,
    max_request_bytes: int = 8192,
    max_connections: int = 64,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` over HTTP/1.1 on ``host:port`` until cancelled.

    One request per connection, then the connection is closed. A request head longer than
    ``max_request_bytes`` gets 431, one not complete within ``read_timeout`` seconds 408.
    At most ``max_connections`` are open at once: a new one beyond that evicts an open
    connection that is only waiting, one already answered first, else the one that has
    waited longest for its request (a scraper sends its request as soon as it connects, so
    the longest-waiting connection is the least likely to be one); only when every slot is
    busy sending a response is the new one closed unanswered. No
    client can stop the server: errors of one connection are logged and that connection
    dropped.

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
    slots = _Slots(max_connections)
    refusals = ThrottledLog(log)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            slot = slots.take()
            if slot is None:
                refusals.warning("busy", "metrics: every connection is busy; closing one")
                return
            try:
                await serve(stream, slot)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("metrics: connection error: %s", exc)
            except Exception:
                log.exception("metrics: unexpected error serving a request")
            finally:
                slots.release(slot)

    async def serve(stream: trio.SocketStream, slot: int) -> None:
        exchange = MetricsExchange(registry, max_request_bytes)
        response = b""
        deadline = trio.current_time() + read_timeout
        with slots.evictable(slot, deadline, answered=False) as reading:
            response = await _read_request(stream, exchange)
        if slot in slots.evicted:
            return  # its slot went to a newer connection
        if reading.cancelled_caught:
            response = exchange.timed_out(read_timeout)
        if not response:
            return  # the client hung up without asking anything
        deadline = trio.current_time() + read_timeout
        with trio.move_on_at(deadline):
            await stream.send_all(response)
            await stream.send_eof()
        with slots.evictable(slot, deadline, answered=True):
            await _drain(stream)

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
