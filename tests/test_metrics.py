"""Node metrics (prometheus_client) and their HTTP endpoint, over real loopback sockets.

Every exposition is read back with prometheus_client's own parsers, and the metrics of
real nodes (three in one process, real Noise over TCP, DP on) are checked after rounds:
every exported series must carry a value, none a NaN.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import trio
import trio.testing
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from support.tiny_task import TinyTask

from p2pfed.config import NodeConfig
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.group import GroupConfig
from p2pfed.identity import NodeIdentity
from p2pfed.metrics import (
    FEDERATION_FIGURES,
    GROUP_OUTCOMES,
    MetricsExchange,
    NodeMetrics,
    handle_http_request,
    render,
    serve_metrics,
)
from p2pfed.network import TcpNetwork
from p2pfed.node import Node, NodeOptions, RoundReport
from p2pfed.task import NodeData

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The names operators' dashboards use (README, docs/howto.md): renaming one breaks them.
EXPECTED_TYPES = {
    "p2pfed_rounds": "counter",
    "p2pfed_groups": "counter",
    "p2pfed_bytes_sent": "counter",
    "p2pfed_bytes_received": "counter",
    "p2pfed_epsilon_spent": "gauge",
    "p2pfed_epsilon_budget": "gauge",
    "p2pfed_epsilon_remaining": "gauge",
    "p2pfed_privacy_local_epsilon_spent": "gauge",
    "p2pfed_privacy_budget_exhausted": "gauge",
    "p2pfed_train_loss": "gauge",
    "p2pfed_round_coverage_ratio": "gauge",
    "p2pfed_test_accuracy": "gauge",
    "p2pfed_test_loss": "gauge",
    "p2pfed_federation_accuracy": "gauge",
    "p2pfed_federation_loss": "gauge",
    "p2pfed_federation_samples": "gauge",
    "p2pfed_federation_round": "gauge",
    "p2pfed_peers_connected": "gauge",
    "p2pfed_round": "gauge",
    "p2pfed_group_seconds": "histogram",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def families(text: str) -> dict[str, str]:
    """Family name -> type, without prometheus_client's ``_created`` companions."""
    found = {f.name: f.type for f in text_string_to_metric_families(text)}
    return {name: kind for name, kind in found.items() if not name.endswith("_created")}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def exposition(metrics: NodeMetrics) -> str:
    return render(metrics.registry)[0].decode("utf-8")


# --- the node's metrics ----------------------------------------------------------------------


def test_node_metrics_names_types_and_updates() -> None:
    m = NodeMetrics()
    m.rounds_total.inc()
    m.bytes_sent_total.inc(1000)
    m.test_accuracy.set(0.875)
    m.group_finished("completed", 1.5)
    m.group_finished("aborted", 30)
    with pytest.raises(ValueError, match="unknown group outcome"):
        m.group_finished("exploded", 1)

    text = exposition(m)
    assert families(text) == EXPECTED_TYPES
    assert value(text, "p2pfed_rounds_total") == 1
    assert value(text, "p2pfed_bytes_sent_total") == 1000
    assert value(text, "p2pfed_test_accuracy") == 0.875
    assert math.isnan(value(text, "p2pfed_test_loss"))  # not measured yet
    assert math.isnan(value(text, "p2pfed_train_loss"))
    outcomes = {o: value(text, "p2pfed_groups_total", outcome=o) for o in GROUP_OUTCOMES}
    assert outcomes == {"completed": 1, "aborted": 1, "declined": 0}
    assert value(text, "p2pfed_group_seconds_count") == 2
    assert value(text, "p2pfed_group_seconds_sum") == 31.5
    assert value(text, "p2pfed_group_seconds_bucket", le="5.0") == 1
    assert value(text, "p2pfed_group_seconds_bucket", le="+Inf") == 2


def test_each_node_has_its_own_registry() -> None:
    a, b = NodeMetrics(), NodeMetrics()  # twice the same names: no clash
    a.rounds_total.inc(5)
    assert value(exposition(a), "p2pfed_rounds_total") == 5
    assert value(exposition(b), "p2pfed_rounds_total") == 0
    # the library's process-global registry is left alone
    assert prometheus_client.REGISTRY.get_sample_value("p2pfed_rounds_total") is None


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    m = NodeMetrics()
    m.rounds_total.inc(2)
    body, content_type = render(m.registry, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    found = {s.name: s.value for f in openmetrics_families(text) for s in f.samples}
    assert found["p2pfed_rounds_total"] == 2
    body, content_type = render(m.registry, "text/plain")
    assert content_type == TEXT_CONTENT_TYPE
    assert value(body.decode(), "p2pfed_rounds_total") == 2


# --- real nodes ------------------------------------------------------------------------------


class ScoredTinyTask(TinyTask):
    """The tiny task with an accuracy too (the node's test gauges need both figures)."""

    def evaluate(self, model: Any, data: NodeData, config: Mapping[str, Any]) -> dict[str, float]:
        figures = super().evaluate(model, data, config)
        return {**figures, "accuracy": 1.0 / (1.0 + figures["loss"])}


GROUP = GroupConfig(group_min=3, group_max=3, initiate_delay=0.02, retry_backoff=0.1)


async def _federation_with_metrics(
    tmp_path: Path, federation: Federation, rounds: int
) -> tuple[list[Node], list[str]]:
    """Three nodes with the daemon's metrics wiring; every node's metrics are scraped over
    HTTP while the nodes still run (once each has completed ``rounds`` rounds)."""
    nodes: list[Node] = []
    all_metrics: list[NodeMetrics] = []
    texts: list[str] = []
    async with trio.open_nursery() as nursery:
        bootstrap: tuple[str, ...] = ()
        for index in range(3):
            node_dir = tmp_path / f"node{index}"
            node_dir.mkdir()
            metrics = NodeMetrics()

            def on_round(report: RoundReport, m: NodeMetrics = metrics, i: int = index) -> None:
                m.round_completed(report, nodes[i])

            def on_group(outcome: Any, seconds: float, m: NodeMetrics = metrics) -> None:
                completed = type(outcome).__name__ == "GroupCompleted"
                m.group_finished("completed" if completed else "aborted", seconds)

            node = Node(
                identity=NodeIdentity.generate(),
                federation=federation,
                config=NodeConfig(
                    listen_host="127.0.0.1", listen_port=0, mdns=False, bootstrap=bootstrap
                ),
                node_dir=node_dir,
                network=TcpNetwork(mdns=False),
                task=ScoredTinyTask(),
                options=NodeOptions(
                    training=True,
                    max_rounds=rounds,
                    linger=True,
                    task_config={"init": index + 1, "samples": 10 + index},
                    group=GROUP,
                    sync_timeout=0.5,
                ),
                on_round=on_round,
                on_group=on_group,
            )
            nodes.append(node)
            all_metrics.append(metrics)
            port = await nursery.start(node.run)
            metrics.node_started(node)
            if not bootstrap:
                bootstrap = (f"127.0.0.1:{port}",)
        with trio.fail_after(180):
            while min(node.round for node in nodes) < rounds:
                await trio.sleep(0.05)
        for node, metrics in zip(nodes, all_metrics, strict=True):
            metrics.refresh(node)  # the daemon does this every second
            scraper = await nursery.start(serve_metrics, metrics.registry, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{scraper}/metrics"
            code, ctype, body = await trio.to_thread.run_sync(_http_get, url)
            assert (code, ctype) == (200, TEXT_CONTENT_TYPE)
            texts.append(body.decode("utf-8"))
        for node in nodes:
            node.request_stop()
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        nursery.cancel_scope.cancel()  # the metrics servers
    return nodes, texts


def _no_nan(text: str) -> None:
    unknown = [key for key, v in samples(text).items() if math.isnan(v)]
    assert not unknown, f"series without a value after rounds: {unknown}"


# distributed: the noise share of 12.82 needs the fixed-point room of clip 128 (dp.required_clip)
DP_LEVEL_PARAMS: dict[str, dict[str, Any]] = {
    "node": {},
    "distributed": {"dp_level": "distributed", "dp_noise_multiplier": 12.82, "clip": 128.0},
}


@pytest.mark.parametrize("level", DP_LEVEL_PARAMS)
async def test_every_metric_has_a_value_after_real_rounds_with_dp(
    tmp_path: Path, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfed.node")
    fed = Federation.new("metrics-test")
    params = ProtocolParams(dp_enabled=True, group_max=3, **DP_LEVEL_PARAMS[level])
    fed = dataclasses.replace(fed, params=params)
    rounds = 2
    nodes, texts = await _federation_with_metrics(tmp_path, fed, rounds)
    federation_gauges = {name for name, _ in FEDERATION_FIGURES.values()}
    for node, text in zip(nodes, texts, strict=True):
        expected = {n: t for n, t in EXPECTED_TYPES.items() if n not in federation_gauges}
        if level != "distributed":
            # one guarantee only: no local epsilon, rather than a copy of the central one
            del expected["p2pfed_privacy_local_epsilon_spent"]
        if not node.exact:
            del expected["p2pfed_round_coverage_ratio"]  # random groups: no coverage
        # DP on: no federation figures (they would be released without noise)
        assert families(text) == expected
        _no_nan(text)
        assert value(text, "p2pfed_rounds_total") >= rounds
        assert value(text, "p2pfed_round") >= rounds
        assert value(text, "p2pfed_groups_total", outcome="completed") >= rounds
        assert value(text, "p2pfed_group_seconds_count") >= rounds
        assert value(text, "p2pfed_bytes_sent_total") > 0
        assert value(text, "p2pfed_bytes_received_total") > 0
        assert value(text, "p2pfed_peers_connected") == 2
        assert value(text, "p2pfed_train_loss") >= 0
        assert 0 < value(text, "p2pfed_test_accuracy") <= 1
        assert value(text, "p2pfed_test_loss") >= 0
        assert node.ledger is not None
        spent = value(text, "p2pfed_epsilon_spent")
        assert spent == pytest.approx(node.ledger.spent()) and spent > 0
        assert value(text, "p2pfed_epsilon_budget") == fed.params.dp_epsilon_budget
        assert value(text, "p2pfed_epsilon_remaining") == pytest.approx(
            fed.params.dp_epsilon_budget - spent
        )
        assert value(text, "p2pfed_privacy_budget_exhausted") == 0
        rounds_logged = [r for r in caplog.records if getattr(r, "event", None) == "round"]
        assert rounds_logged
        # the per-round log line (JSON with --log-json) carries the same guarantees
        assert all(
            hasattr(r, "local_epsilon_spent") == (level == "distributed") for r in rounds_logged
        )
        if level == "distributed":
            local = value(text, "p2pfed_privacy_local_epsilon_spent")
            # the weaker guarantee against mask-stripping members: larger than the central one
            assert local == pytest.approx(node.ledger.local_spent()) and local > spent
        if node.exact:
            assert value(text, "p2pfed_round_coverage_ratio") == 1


async def test_without_dp_federation_figures_replace_the_privacy_budget(tmp_path: Path) -> None:
    fed = Federation.new("metrics-test")
    fed = dataclasses.replace(fed, params=ProtocolParams(dp_enabled=False, group_max=3))
    nodes, texts = await _federation_with_metrics(tmp_path, fed, 2)
    for node, text in zip(nodes, texts, strict=True):
        expected = {
            n: t
            for n, t in EXPECTED_TYPES.items()
            if not n.startswith("p2pfed_epsilon") and n != "p2pfed_privacy_local_epsilon_spent"
        }
        assert families(text) == expected
        _no_nan(text)
        assert node.ledger is None
        assert value(text, "p2pfed_privacy_budget_exhausted") == 0
        assert value(text, "p2pfed_train_loss") >= 0
        figures = node.federation_metrics
        assert figures is not None
        for key, (name, _) in FEDERATION_FIGURES.items():
            assert value(text, name) == pytest.approx(figures[key]), key
        assert 0 < value(text, "p2pfed_federation_accuracy") <= 1
        # every node's test set counts: 10 + 11 + 12 samples
        assert value(text, "p2pfed_federation_samples") == 33


def test_an_unknown_figure_keeps_the_last_known_value() -> None:
    m = NodeMetrics()

    def report(round: int, train_loss: float | None, **figures: float) -> RoundReport:
        return RoundReport(
            round=round,
            group_size=3,
            seconds=1.0,
            train_seconds=0.5,
            formation_seconds=0.1,
            allreduce_seconds=0.4,
            metrics=figures,
            epsilon_spent=None,
            train_loss=train_loss,
        )

    m.record_report(report(1, 0.25, loss=0.5))
    m.record_report(report(2, math.nan))  # a task that reports no loss; no evaluation
    m.record_report(report(3, None))  # a round without training
    text = exposition(m)
    assert value(text, "p2pfed_rounds_total") == 3
    assert value(text, "p2pfed_round") == 3
    assert value(text, "p2pfed_train_loss") == 0.25
    assert value(text, "p2pfed_test_loss") == 0.5
    assert math.isnan(value(text, "p2pfed_test_accuracy"))


# --- HTTP: the sans-IO exchange --------------------------------------------------------------


def _status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def _split_response(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    version, code, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, val = line.partition(": ")
        headers[name.lower()] = val
    return int(code), headers, body


def test_handler_serves_metrics() -> None:
    m = NodeMetrics()
    m.rounds_total.inc()
    code, headers, body = _split_response(
        handle_http_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*", m.registry)
    )
    assert code == 200
    assert headers["content-type"] == TEXT_CONTENT_TYPE
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    assert value(body.decode(), "p2pfed_rounds_total") == 1

    code, headers, body = _split_response(
        handle_http_request(b"HEAD /metrics HTTP/1.0", m.registry)
    )
    assert (code, body) == (200, b"")
    assert int(headers["content-length"]) > 1000

    ok = handle_http_request(b"GET /metrics?x=1 HTTP/1.0", m.registry)
    absolute = handle_http_request(b"GET http://h:1/metrics HTTP/1.1\r\nHost: h:1", m.registry)
    assert _status_line(ok) == _status_line(absolute) == b"HTTP/1.1 200 OK"


def test_exchange_answers_when_the_request_is_complete() -> None:
    exchange = MetricsExchange(NodeMetrics().registry)
    assert exchange.receive(b"GET /metr") is None
    assert exchange.receive(b"ics HTTP/1.1\r\nHost: x\r\n") is None
    assert _status_line(exchange.receive(b"\r\n") or b"") == b"HTTP/1.1 200 OK"
    assert MetricsExchange(NodeMetrics().registry).receive(b"") == b""  # left without a word
    late = MetricsExchange(NodeMetrics().registry)
    assert late.receive(b"GET /metrics HTTP/1.1\r\n") is None
    assert _split_response(late.timed_out(5))[0] == 408


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
        (b"GET metrics HTTP/1.1\r\nHost: x", 404),
        (b"GET /m\xffx HTTP/1.1\r\nHost: x", 400),
        (b"GET /metrics HTTX/1.1\r\nHost: x", 400),
        (b"GET /metrics HTTP/2.0\r\nHost: x", 505),
        (b"GET /metrics HTTP/1.1", 400),  # no Host
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here", 400),
        (b"GET /metrics HTTP/1.1\r\nHost : x", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\x00y", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x" + b"\r\nX: y" * 100, 431),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 9000, 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
    ],
)
def test_handler_rejects_bad_requests(head: bytes, status: int) -> None:
    code, headers, body = _split_response(handle_http_request(head, NodeMetrics().registry))
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
    m = NodeMetrics()
    m.rounds_total.inc(3)
    m.groups_total.labels(outcome="declined").inc()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, m.registry, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}"
        code, ctype, body = await trio.to_thread.run_sync(_http_get, base + "/metrics")
        assert (code, ctype) == (200, TEXT_CONTENT_TYPE)
        assert value(body.decode(), "p2pfed_rounds_total") == 3
        assert value(body.decode(), "p2pfed_groups_total", outcome="declined") == 1

        m.rounds_total.inc()  # every request renders the current values
        _, _, body = await trio.to_thread.run_sync(_http_get, base + "/metrics")
        assert value(body.decode(), "p2pfed_rounds_total") == 4

        code, _, body = await trio.to_thread.run_sync(_http_get, base + "/")
        assert code == 404
        code, _, body = await trio.to_thread.run_sync(_http_get, base + "/metrics", "HEAD")
        assert (code, body) == (200, b"")
        code, _, _ = await trio.to_thread.run_sync(_http_get, base + "/metrics", "DELETE")
        assert code == 405
        nursery.cancel_scope.cancel()


async def test_server_survives_malformed_requests() -> None:
    m = NodeMetrics()
    m.rounds_total.inc()
    async with trio.open_nursery() as nursery:
        serve = partial(serve_metrics, read_timeout=0.5, max_request_bytes=1024)
        port = await nursery.start(serve, m.registry, "127.0.0.1", 0)
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
        assert value(body.decode(), "p2pfed_rounds_total") == 1
        nursery.cancel_scope.cancel()


async def test_a_scrape_succeeds_while_200_idle_connections_are_open() -> None:
    m = NodeMetrics()
    m.rounds_total.inc(7)
    async with trio.open_nursery() as nursery:
        # a read timeout far beyond the test's guard: only eviction can serve the scraper
        serve = partial(serve_metrics, read_timeout=600)
        port = await nursery.start(serve, m.registry, "127.0.0.1", 0)
        idle = []
        for i in range(200):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            if i % 2:
                await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # never finished
            idle.append(stream)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        with trio.fail_after(60):  # a guard, far above a scrape's time on any machine
            for _ in range(3):
                response = await _raw_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                code, _, body = _split_response(response)
                assert code == 200
                assert value(body.decode(), "p2pfed_rounds_total") == 7
        for stream in idle:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_server_evicts_the_longest_idle_connection_when_full() -> None:
    m = NodeMetrics()
    async with trio.open_nursery() as nursery:
        serve = partial(serve_metrics, read_timeout=600, max_connections=2)
        port = await nursery.start(serve, m.registry, "127.0.0.1", 0)
        oldest = await trio.open_tcp_stream("127.0.0.1", port)
        await oldest.send_all(b"GET /metrics HTTP/1.1\r\n")
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        newer = await trio.open_tcp_stream("127.0.0.1", port)
        await newer.send_all(b"GET /metrics HTTP/1.1\r\n")
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)

        response = await _raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert _split_response(response)[0] == 200
        with trio.fail_after(30):
            assert await oldest.receive_some(100) == b""  # evicted, unanswered
        # the newer one kept its slot and is answered when its request completes
        await newer.send_all(b"Host: x\r\n\r\n")
        answer = b""
        while chunk := await newer.receive_some(65536):
            answer += chunk
        assert _split_response(answer)[0] == 200
        await oldest.aclose()
        await newer.aclose()
        nursery.cancel_scope.cancel()


async def test_answered_clients_that_never_close_cannot_hold_every_slot() -> None:
    m = NodeMetrics()
    async with trio.open_nursery() as nursery:
        serve = partial(serve_metrics, read_timeout=600, max_connections=2)
        port = await nursery.start(serve, m.registry, "127.0.0.1", 0)
        holders = []
        for _ in range(2):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some(65536):  # until the server's EOF
                answer += chunk
            assert _split_response(answer)[0] == 200
            holders.append(stream)  # answered, but it never closes its side
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        with trio.fail_after(30):
            response = await _raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert _split_response(response)[0] == 200
        for stream in holders:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_server_rejects_bad_port() -> None:
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        await serve_metrics(NodeMetrics().registry, "127.0.0.1", 70000)


async def test_server_frees_its_port_when_cancelled() -> None:
    registry = NodeMetrics().registry
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, registry, "127.0.0.1", 0)
        nursery.cancel_scope.cancel()
    # Binding the same port again works only if the listening socket was closed.
    async with trio.open_nursery() as nursery:
        again = await nursery.start(serve_metrics, registry, "127.0.0.1", port)
        assert again == port
        response = await _raw_exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert _split_response(response)[0] == 200
        nursery.cancel_scope.cancel()
