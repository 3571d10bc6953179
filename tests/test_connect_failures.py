"""Connection attempts that fail in every way a network can fail them, and the node that
must survive them all.

A *silent* address (one that drops connection attempts, as a firewall does) is made on
loopback only: a listening socket with a backlog of 0 whose accept queue is filled by one
connection nobody accepts. Linux then drops further SYNs, so a connect to it hangs until
its timeout. The fixture checks that this machine really behaves so.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from support.tiny_task import TinyTask

from p2pfed.config import NodeConfig
from p2pfed.federation import Federation
from p2pfed.identity import NodeIdentity
from p2pfed.network import Network, TcpNetwork
from p2pfed.node import Node, NodeOptions
from simnet.network import VirtualNetwork

CONNECT_TIMEOUT = 0.3


@pytest.fixture
def silent_address() -> Iterator[tuple[str, int]]:
    """A loopback ``(host, port)`` whose kernel drops every new connection attempt."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # Linux: room for one connection nobody accepts
        address = listener.getsockname()
        filler.connect(address)  # fills the accept queue
        probe.settimeout(CONNECT_TIMEOUT)
        try:
            probe.connect(address)
        except TimeoutError:
            pass  # the SYN was dropped: the address is silent, as wanted
        else:
            pytest.fail(
                "connecting to a listener whose accept queue is full did not hang on this "
                "machine, so this test cannot make an address that drops packets"
            )
        finally:
            probe.close()
        yield address
    finally:
        for sock in (probe, filler, listener):
            sock.close()


def _closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the network interface -------------------------------------------------------------


async def test_tcp_connect_timeout_is_an_oserror(silent_address: tuple[str, int]) -> None:
    network = TcpNetwork(mdns=False, connect_timeout=CONNECT_TIMEOUT)
    host, port = silent_address
    start = trio.current_time()
    with pytest.raises(TimeoutError) as info:  # an OSError, as Network.connect promises
        await network.connect(host, port)
    assert CONNECT_TIMEOUT <= trio.current_time() - start < CONNECT_TIMEOUT + 2
    assert info.value.errno == errno.ETIMEDOUT
    message = str(info.value)
    assert f"no answer from 127.0.0.1:{port} within {CONNECT_TIMEOUT:g} s" in message
    assert "firewall" in message  # says what to check


async def test_tcp_connect_refused_names_the_reason() -> None:
    network = TcpNetwork(mdns=False, connect_timeout=CONNECT_TIMEOUT)
    port = _closed_port()
    with pytest.raises(ConnectionRefusedError, match=rf"127\.0\.0\.1:{port}: Connection refused"):
        await network.connect("127.0.0.1", port)


async def test_tcp_connect_to_an_invalid_host_name_is_an_oserror() -> None:
    network = TcpNetwork(mdns=False, connect_timeout=CONNECT_TIMEOUT)
    # a DNS label of 64 characters cannot be encoded, so nothing is ever resolved or sent
    with pytest.raises(OSError, match="not a valid host name"):
        await network.connect("a" * 64 + ".example", 7447)


async def test_simnet_connect_timeout_is_an_oserror(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The virtual network keeps the same contract (simnet runs the same node code)."""
    world = VirtualNetwork(rng=random.Random(1))
    world.add_host("10.0.0.1")
    network: Network = world.network_for("10.0.0.1")
    start = trio.current_time()
    with pytest.raises(OSError) as info:
        await network.connect("10.0.0.99", 7447)  # no such host: the SYN is never answered
    assert info.value.errno == errno.ETIMEDOUT
    assert trio.current_time() - start == pytest.approx(world.connect_timeout)


# --- the node ----------------------------------------------------------------------------


def _node(tmp_path: Path, bootstrap: str, handshake_timeout: float = 10.0) -> Node:
    config = NodeConfig(
        listen_host="127.0.0.1",
        listen_port=0,
        mdns=False,
        bootstrap=(bootstrap,),
        handshake_timeout=handshake_timeout,
    )
    return Node(
        identity=NodeIdentity.generate(),
        federation=Federation.new("connect-failures"),
        config=config,
        node_dir=tmp_path,
        network=TcpNetwork(mdns=False, connect_timeout=CONNECT_TIMEOUT),
        task=TinyTask(),
        options=NodeOptions(training=False, task_config={"init": 1}),
    )


async def _run_until_logged(node: Node, caplog: pytest.LogCaptureFixture, text: str) -> str:
    """Run ``node`` until it logs a warning containing ``text``; check it keeps running
    after that, stop it, and return the warning."""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        with trio.fail_after(10):
            while not [r for r in caplog.records if text in r.getMessage()]:
                await trio.sleep(0.05)
        # the failure is behind it: the node still runs (before the fix it had crashed)
        await trio.sleep(2 * CONNECT_TIMEOUT)
        assert not node.finished.is_set()
        node.request_stop()
    assert node.finished.is_set()
    [record] = [r for r in caplog.records if text in r.getMessage()]
    assert record.levelno == logging.WARNING
    return record.getMessage()


async def test_node_survives_a_bootstrap_address_that_drops_packets(
    tmp_path: Path, silent_address: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfed")
    host, port = silent_address
    node = _node(tmp_path, f"{host}:{port}")
    message = await _run_until_logged(node, caplog, f"bootstrap {host}:{port} unreachable")
    assert f"within {CONNECT_TIMEOUT:g} s" in message
    assert message.endswith("next attempt in 5 s")
    [entry] = node.bootstrap_summary()
    assert entry["state"] == "failing" and entry["failed_attempts"] == 1


async def test_node_survives_a_bootstrap_address_that_never_completes_the_handshake(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that accepts the connection and then says nothing: the handshake times out."""
    caplog.set_level(logging.INFO, logger="p2pfed")
    async with trio.open_nursery() as nursery:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        held: list[trio.SocketStream] = []

        async def accept_and_stay_silent() -> None:
            while True:
                held.append(await listener.accept())

        nursery.start_soon(accept_and_stay_silent)
        node = _node(tmp_path, f"127.0.0.1:{port}", handshake_timeout=CONNECT_TIMEOUT)
        message = await _run_until_logged(node, caplog, f"bootstrap 127.0.0.1:{port} unreachable")
        assert "handshake failed" in message and "did not complete" in message
        nursery.cancel_scope.cancel()
    await listener.aclose()
    for stream in held:
        await stream.aclose()
