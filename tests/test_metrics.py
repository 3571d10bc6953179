"""Metrics registry, the text exposition format 0.0.4, and the HTTP server over loopback.

The exposition text is checked by parsing it back with a strict parser written here from
the format's description (https://prometheus.io/docs/instrumenting/exposition_formats/),
independent of the renderer.
"""

from __future__ import annotations

import math
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing

from p2pfed.metrics import (
    CONTENT_TYPE,
    GROUP_OUTCOMES,
    MetricsRegistry,
    NodeMetrics,
    format_value,
    handle_http_request,
    serve_metrics,
)

# --- an independent parser of the text format ------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE_RE = re.compile(rf"({_NAME})(\{{.*\}})? (\S+)( -?\d+)?")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"(?:,|\Z)')


@dataclass
class Family:
    name: str
    help: str | None = None
    type: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _unescape(text: str, quote: bool) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "n":
                out.append("\n")
            elif nxt == "\\" or (quote and nxt == '"'):
                out.append(nxt)
            else:
                out.append(c + nxt)
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _go_float(text: str) -> float:
    special = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}
    if text in special:
        return special[text]
    assert re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text), f"bad value {text!r}"
    return float(text)


def parse_exposition(text: str) -> dict[str, Family]:
    """Parse text format 0.0.4 strictly; every sample must follow its family's TYPE line."""
    assert text == "" or text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            kind, rest = line[2:6], line[7:]
            name, _, value = rest.partition(" ")
            assert re.fullmatch(_NAME, name), line
            fam = families.setdefault(name, Family(name))
            assert not fam.samples, f"{kind} after samples of {name}"
            if kind == "HELP":
                assert fam.help is None, f"second HELP for {name}"
                fam.help = _unescape(value, quote=False)
            else:
                assert fam.type is None, f"second TYPE for {name}"
                assert value in ("counter", "gauge", "histogram", "summary", "untyped"), line
                fam.type = value
            current = fam
            continue
        assert line and not line.startswith("#"), f"unexpected line {line!r}"
        m = _SAMPLE_RE.fullmatch(line)
        assert m, f"bad sample line {line!r}"
        name, label_text, value = m.group(1), m.group(2), m.group(3)
        labels: dict[str, str] = {}
        if label_text:
            inner, pos = label_text[1:-1], 0
            while pos < len(inner):
                lm = _LABEL_RE.match(inner, pos)
                assert lm, f"bad labels in {line!r}"
                assert lm.group(1) not in labels, f"duplicate label in {line!r}"
                labels[lm.group(1)] = _unescape(lm.group(2), quote=True)
                pos = lm.end()
        assert current is not None, f"sample before any TYPE: {line!r}"
        allowed = {current.name}
        if current.type == "histogram":
            allowed = {f"{current.name}_{s}" for s in ("bucket", "sum", "count")}
        assert name in allowed, f"sample {name} is not part of family {current.name}"
        current.samples.append((name, labels, _go_float(value)))
    return families


def value_of(families: dict[str, Family], name: str, **labels: str) -> float:
    for fam in families.values():
        for sample_name, sample_labels, value in fam.samples:
            if sample_name == name and sample_labels == labels:
                return value
    raise KeyError((name, labels))


# --- registry and rendering ------------------------------------------------------------------


def test_empty_registry_renders_nothing() -> None:
    assert MetricsRegistry().render() == ""


def test_counter_gauge_histogram_round_trip() -> None:
    reg = MetricsRegistry()
    c = reg.counter("app_requests_total", "Requests served.", ["code", "method"])
    g = reg.gauge("app_temperature", "Temperature in C.")
    h = reg.histogram("app_latency_seconds", "Latency.", [0.1, 1, 10])
    c.labels("200", "GET").inc()
    c.labels(code="200", method="GET").inc(2)
    c.labels(method="POST", code="500").inc(0.5)
    g.set(-3.25)
    for v in (0.05, 0.1, 0.7, 5, 50, 1e6):
        h.observe(v)

    fams = parse_exposition(reg.render())
    assert list(fams) == ["app_latency_seconds", "app_requests_total", "app_temperature"]
    assert fams["app_requests_total"].type == "counter"
    assert fams["app_requests_total"].help == "Requests served."
    assert value_of(fams, "app_requests_total", code="200", method="GET") == 3
    assert value_of(fams, "app_requests_total", code="500", method="POST") == 0.5
    assert fams["app_temperature"].type == "gauge"
    assert value_of(fams, "app_temperature") == -3.25

    hist = fams["app_latency_seconds"]
    assert hist.type == "histogram"
    buckets = [(s[1]["le"], s[2]) for s in hist.samples if s[0].endswith("_bucket")]
    # Cumulative, in increasing bound order, ending with +Inf = count.
    assert [float(le) for le, _ in buckets] == [0.1, 1, 10, math.inf]
    assert [n for _, n in buckets] == [2, 3, 4, 6]
    assert value_of(fams, "app_latency_seconds_count") == 6
    assert value_of(fams, "app_latency_seconds_sum") == pytest.approx(
        0.05 + 0.1 + 0.7 + 5 + 50 + 1e6
    )
    assert (h.count, h.sum) == (6, pytest.approx(1000055.85))


def test_label_values_and_help_are_escaped() -> None:
    reg = MetricsRegistry()
    tricky = 'back\\slash "quoted"\nnew line, {braces}=x'
    c = reg.counter("esc_total", 'Help with \\ backslash\nand "quotes".', ["v"])
    c.labels(v=tricky).inc()
    c.labels(v="").inc(4)
    text = reg.render()
    assert len(text.splitlines()) == 4  # the newline in the value did not split a line
    fams = parse_exposition(text)
    assert fams["esc_total"].help == 'Help with \\ backslash\nand "quotes".'
    assert value_of(fams, "esc_total", v=tricky) == 1
    assert value_of(fams, "esc_total", v="") == 4


def test_output_is_sorted_and_deterministic() -> None:
    def build(order: list[str]) -> str:
        reg = MetricsRegistry()
        counters = {name: reg.counter(name, f"{name} help", ["k"]) for name in order}
        for name in order:
            for k in reversed(order):
                counters[name].labels(k=k).inc(len(k))
        return reg.render()

    names = ["b_total", "a_total", "c_total"]
    text = build(names)
    assert text == build(list(reversed(names)))
    fams = parse_exposition(text)
    assert list(fams) == sorted(names)
    for fam in fams.values():
        keys = [s[1]["k"] for s in fam.samples]
        assert keys == sorted(keys)


def test_value_formatting() -> None:
    assert format_value(3) == "3"
    assert format_value(3.0) == "3"
    assert format_value(-0.0) == "0"
    assert format_value(0.1) == "0.1"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("-inf")) == "-Inf"
    assert format_value(float("nan")) == "NaN"
    assert _go_float(format_value(1e300)) == 1e300
    assert _go_float(format_value(2.0**60)) == 2.0**60
    assert format_value(2**70) == str(2**70)  # ints stay exact


def test_counter_only_goes_up() -> None:
    c = MetricsRegistry().counter("x_total", "x")
    c.inc(0)
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(ValueError, match="only increase"):
            c.inc(bad)
    assert c.value == 0


def test_gauge_set_inc_dec_and_initial() -> None:
    reg = MetricsRegistry()
    g = reg.gauge("g", "g", initial=math.nan)
    assert math.isnan(g.value)
    g.set(2)
    g.inc(0.5)
    g.dec(3)
    assert g.value == -0.5
    assert value_of(parse_exposition(reg.render()), "g") == -0.5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: r.counter("1bad", "h"), "invalid metric name"),
        (lambda r: r.counter("ok_total", ""), "help"),
        (lambda r: r.counter("ok_total", "h", ["bad-label"]), "invalid label name"),
        (lambda r: r.counter("ok_total", "h", ["__reserved"]), "reserved"),
        (lambda r: r.counter("ok_total", "h", ["a", "a"]), "duplicate"),
        (lambda r: r.histogram("h", "h", []), "at least one"),
        (lambda r: r.histogram("h", "h", [1, 1]), "increase strictly"),
        (lambda r: r.histogram("h", "h", [math.nan]), "finite"),
        (lambda r: r.histogram("h", "h", [1], ["le"]), "reserved"),
    ],
)
def test_invalid_definitions_are_rejected(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(MetricsRegistry())  # type: ignore[operator]


def test_name_clashes_are_rejected() -> None:
    reg = MetricsRegistry()
    reg.counter("dup_total", "x")
    with pytest.raises(ValueError, match="clashes"):
        reg.gauge("dup_total", "x")
    reg.histogram("lat", "x", [1])
    with pytest.raises(ValueError, match="clashes"):
        reg.counter("lat_count", "x")  # would collide with the histogram's _count samples


def test_label_misuse_is_rejected() -> None:
    reg = MetricsRegistry()
    c = reg.counter("c_total", "c", ["a", "b"])
    plain = reg.counter("p_total", "p")
    with pytest.raises(ValueError, match="has labels"):
        c.inc()
    with pytest.raises(ValueError, match="got 1 value"):
        c.labels("x")
    with pytest.raises(ValueError, match="has labels"):
        c.labels(a="x", c="y")
    with pytest.raises(ValueError, match="not both"):
        c.labels("x", b="y")
    with pytest.raises(TypeError, match="must be str"):
        c.labels("x", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no labels"):
        plain.labels("x")


def test_series_count_is_bounded() -> None:
    c = MetricsRegistry().counter("peer_total", "p", ["peer"], max_series=3)
    for i in range(3):
        c.labels(peer=str(i)).inc()
    c.labels(peer="0").inc()  # existing series are fine
    with pytest.raises(ValueError, match="small fixed set"):
        c.labels(peer="3")


def test_updates_from_threads_are_not_lost() -> None:
    reg = MetricsRegistry()
    c = reg.counter("t_total", "t")
    h = reg.histogram("t_seconds", "t", [0.5])

    def work() -> None:
        for i in range(5000):
            c.inc()
            h.observe(1.0)
            if i % 1000 == 0:
                parse_exposition(reg.render())  # rendering meanwhile sees consistent text

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value == 20000
    assert h.count == 20000
    assert value_of(parse_exposition(reg.render()), "t_seconds_bucket", le="+Inf") == 20000


def test_node_metrics_has_every_metric() -> None:
    reg = MetricsRegistry()
    m = NodeMetrics(reg)
    m.rounds_total.inc()
    m.bytes_sent_total.inc(1000)
    m.bytes_received_total.inc(2000)
    m.epsilon_spent.set(0.75)
    m.epsilon_budget.set(8)
    m.train_loss.set(0.25)
    m.test_accuracy.set(0.875)
    m.peers_connected.set(3)
    m.round.set(7)
    m.group_finished("completed", 1.5)
    m.group_finished("aborted", 30)
    with pytest.raises(ValueError, match="unknown group outcome"):
        m.group_finished("exploded", 1)

    fams = parse_exposition(reg.render())
    expected_types = {
        "p2pfed_rounds_total": "counter",
        "p2pfed_groups_total": "counter",
        "p2pfed_bytes_sent_total": "counter",
        "p2pfed_bytes_received_total": "counter",
        "p2pfed_epsilon_spent": "gauge",
        "p2pfed_epsilon_budget": "gauge",
        "p2pfed_epsilon_remaining": "gauge",
        "p2pfed_privacy_budget_exhausted": "gauge",
        "p2pfed_train_loss": "gauge",
        "p2pfed_round_coverage_ratio": "gauge",
        "p2pfed_test_accuracy": "gauge",
        "p2pfed_test_loss": "gauge",
        "p2pfed_peers_connected": "gauge",
        "p2pfed_round": "gauge",
        "p2pfed_group_seconds": "histogram",
    }
    assert {name: fam.type for name, fam in fams.items()} == expected_types
    assert all(fam.help for fam in fams.values())
    assert value_of(fams, "p2pfed_rounds_total") == 1
    assert value_of(fams, "p2pfed_bytes_sent_total") == 1000
    assert value_of(fams, "p2pfed_test_accuracy") == 0.875
    assert math.isnan(value_of(fams, "p2pfed_test_loss"))  # not measured yet
    assert value_of(fams, "p2pfed_round") == 7
    outcomes = {o: value_of(fams, "p2pfed_groups_total", outcome=o) for o in GROUP_OUTCOMES}
    assert outcomes == {"completed": 1, "aborted": 1, "declined": 0}
    assert value_of(fams, "p2pfed_group_seconds_count") == 2
    assert value_of(fams, "p2pfed_group_seconds_sum") == 31.5


def test_two_nodes_have_independent_registries() -> None:
    a, b = MetricsRegistry(), MetricsRegistry()
    NodeMetrics(a).rounds_total.inc(5)
    NodeMetrics(b)
    assert value_of(parse_exposition(a.render()), "p2pfed_rounds_total") == 5
    assert value_of(parse_exposition(b.render()), "p2pfed_rounds_total") == 0


# --- HTTP: the pure request handler ----------------------------------------------------------


def _status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def _split_response(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    version, code, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    return int(code), headers, body


def test_handler_serves_metrics() -> None:
    reg = MetricsRegistry()
    reg.counter("hits_total", "h").inc()
    code, headers, body = _split_response(
        handle_http_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*", reg)
    )
    assert code == 200
    assert headers["content-type"] == CONTENT_TYPE
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    assert body.decode() == reg.render()

    code, headers, body = _split_response(handle_http_request(b"HEAD /metrics HTTP/1.0", reg))
    assert (code, body) == (200, b"")
    assert int(headers["content-length"]) == len(reg.render().encode())

    ok = handle_http_request(b"GET /metrics?x=1 HTTP/1.0", reg)
    absolute = handle_http_request(b"GET http://h:1/metrics HTTP/1.1\r\nHost: h:1", reg)
    assert _status_line(ok) == _status_line(absolute) == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x", 404),
        (b"GET /metricsx HTTP/1.1\r\nHost: x", 404),
        (b"POST /metrics HTTP/1.1\r\nHost: x", 405),
        (b"", 400),
        (b"GET /metrics", 400),  # HTTP/0.9
        (b"GET  /metrics HTTP/1.1\r\nHost: x", 400),
        (b"GET /metrics HTTP/1.1 extra\r\nHost: x", 400),
        (b"G(T /metrics HTTP/1.1\r\nHost: x", 400),
        (b"GET metrics HTTP/1.1\r\nHost: x", 400),
        (b"GET /m\xffx HTTP/1.1\r\nHost: x", 400),
        (b"GET /metrics HTTX/1.1\r\nHost: x", 400),
        (b"GET /metrics HTTP/2.0\r\nHost: x", 505),
        (b"GET /metrics HTTP/1.1", 400),  # no Host
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded: line", 400),
        (b"GET /metrics HTTP/1.1\r\nHost : x", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\x00y", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x" + b"\r\nX: y" * 100, 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
    ],
)
def test_handler_rejects_bad_requests(head: bytes, status: int) -> None:
    code, headers, body = _split_response(handle_http_request(head, MetricsRegistry()))
    assert code == status
    assert body.startswith(str(status).encode())
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


# --- HTTP: the server over loopback ----------------------------------------------------------


async def _raw_exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _http_get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def test_server_get_metrics_over_loopback() -> None:
    reg = MetricsRegistry()
    m = NodeMetrics(reg)
    m.rounds_total.inc(3)
    m.groups_total.labels(outcome="declined").inc()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, reg, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}"
        code, ctype, body = await trio.to_thread.run_sync(_http_get, base + "/metrics")
        assert (code, ctype) == (200, CONTENT_TYPE)
        fams = parse_exposition(body.decode("utf-8"))
        assert value_of(fams, "p2pfed_rounds_total") == 3
        assert value_of(fams, "p2pfed_groups_total", outcome="declined") == 1

        m.rounds_total.inc()  # every request renders the current values
        _, _, body = await trio.to_thread.run_sync(_http_get, base + "/metrics")
        assert value_of(parse_exposition(body.decode()), "p2pfed_rounds_total") == 4

        code, _, body = await trio.to_thread.run_sync(_http_get, base + "/")
        assert code == 404
        code, _, body = await trio.to_thread.run_sync(_http_get, base + "/metrics", "HEAD")
        assert (code, body) == (200, b"")
        code, _, _ = await trio.to_thread.run_sync(_http_get, base + "/metrics", "DELETE")
        assert code == 405
        nursery.cancel_scope.cancel()


async def test_server_survives_malformed_requests() -> None:
    reg = MetricsRegistry()
    reg.counter("alive_total", "a").inc()
    async with trio.open_nursery() as nursery:
        serve = partial(serve_metrics, read_timeout=0.5, max_request_bytes=1024)
        port = await nursery.start(serve, reg, "127.0.0.1", 0)
        bad = [
            b"GARBAGE\r\n\r\n",
            b"\x00\xff" * 100 + b"\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n\r\n",  # no Host
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 5000 + b"\r\n\r\n",
            b"x" * 100_000,  # never ends its head; far over the limit
        ]
        for data in bad:
            response = await _raw_exchange(port, data)
            assert _split_response(response)[0] in (400, 431), response[:100]

        # A client that connects and hangs up without a word gets nothing and harms nothing.
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()

        # A client that never finishes its request gets 408 after the read timeout.
        response = await _raw_exchange(port, b"GET /metrics HTTP/1.1\r\nHost:")
        assert _split_response(response)[0] == 408

        response = await _raw_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        code, _, body = _split_response(response)
        assert code == 200
        assert value_of(parse_exposition(body.decode()), "alive_total") == 1
        nursery.cancel_scope.cancel()


async def test_server_bounds_concurrent_connections() -> None:
    reg = MetricsRegistry()
    async with trio.open_nursery() as nursery:
        serve = partial(serve_metrics, read_timeout=30, max_connections=1)
        port = await nursery.start(serve, reg, "127.0.0.1", 0)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        await idle.send_all(b"GET /metrics HTTP/1.1\r\n")  # holds the only slot
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert await _raw_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        await idle.send_all(b"Host: x\r\n\r\n")
        response = b""
        while chunk := await idle.receive_some(65536):
            response += chunk
        assert _split_response(response)[0] == 200
        await idle.aclose()
        # The slot is free again.
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        response = await _raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert _split_response(response)[0] == 200
        nursery.cancel_scope.cancel()


async def test_server_rejects_bad_port() -> None:
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        await serve_metrics(MetricsRegistry(), "127.0.0.1", 70000)


async def test_server_frees_its_port_when_cancelled() -> None:
    reg = MetricsRegistry()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, reg, "127.0.0.1", 0)
        nursery.cancel_scope.cancel()
    # Binding the same port again works only if the listening socket was closed.
    async with trio.open_nursery() as nursery:
        again = await nursery.start(serve_metrics, reg, "127.0.0.1", port)
        assert again == port
        response = await _raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert _split_response(response)[0] == 200
        nursery.cancel_scope.cancel()
