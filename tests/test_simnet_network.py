"""The virtual network on its own: trio's stream conformance checks, the link model,
partitions, crashes and simulated mDNS, all in virtual time (MockClock)."""

from __future__ import annotations

import math
import random

import pytest
import trio
import trio.testing

from p2pfed.discovery import PeerDeparted, PeerDiscovered
from p2pfed.identity import NodeIdentity
from simnet.network import LinkParams, SimNetwork, VirtualNetwork


def two_hosts(
    send_buffer: int = 64 << 10, **link: float
) -> tuple[VirtualNetwork, SimNetwork, SimNetwork]:
    net = VirtualNetwork(
        rng=random.Random(5), default_link=LinkParams(**link), send_buffer=send_buffer
    )
    net.add_host("10.0.0.1")
    net.add_host("10.0.0.2")
    return net, net.network_for("10.0.0.1"), net.network_for("10.0.0.2")


async def connected_pair(
    a: SimNetwork, b: SimNetwork
) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    listener = await b.listen(b.host, 7447)
    client = await a.connect(b.host, 7447)
    server = await listener.accept()
    assert isinstance(client, trio.abc.HalfCloseableStream)
    assert isinstance(server, trio.abc.HalfCloseableStream)
    return client, server


async def test_streams_pass_trios_half_closeable_stream_checks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def maker() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
        _, a, b = two_hosts(latency=0.002, jitter=0.001, bandwidth=1e6)
        return await connected_pair(a, b)

    await trio.testing.check_half_closeable_stream(maker, None)


async def test_delivery_time_is_latency_plus_serialisation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, a, b = two_hosts(send_buffer=0, latency=0.05, bandwidth=1000.0)
    start = trio.current_time()
    client, server = await connected_pair(a, b)
    assert trio.current_time() - start == pytest.approx(0.1)  # one round trip
    sent_at = trio.current_time()
    await client.send_all(b"x" * 500)
    # without a send buffer the sender is held until the last byte has left: 500 bytes
    # at 1000 B/s
    assert trio.current_time() - sent_at == pytest.approx(0.5)
    received = b""
    while len(received) < 500:
        received += await server.receive_some()
    assert trio.current_time() - sent_at == pytest.approx(0.55)
    assert received == b"x" * 500


async def test_send_buffer_releases_the_sender_early_not_the_data(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, a, b = two_hosts(send_buffer=200, latency=0.05, bandwidth=1000.0)
    client, server = await connected_pair(a, b)
    sent_at = trio.current_time()
    await client.send_all(b"x" * 100)  # fits the buffer: the sender goes on at once
    assert trio.current_time() == sent_at
    await client.send_all(b"y" * 500)  # held until 200 of the 600 bytes are left
    assert trio.current_time() - sent_at == pytest.approx(0.4)
    received = b""
    while len(received) < 600:
        received += await server.receive_some()
    # the data still takes serialisation plus latency: 600 bytes at 1000 B/s, then 50 ms
    assert trio.current_time() - sent_at == pytest.approx(0.65)
    assert received == b"x" * 100 + b"y" * 500


async def test_order_is_kept_under_jitter_and_loss(autojump_clock: trio.testing.MockClock) -> None:
    net, a, b = two_hosts(latency=0.01, jitter=0.05, loss=0.3, bandwidth=math.inf)
    client, server = await connected_pair(a, b)
    payload = [bytes([i]) * 10 for i in range(100)]
    for chunk in payload:
        await client.send_all(chunk)
    await client.send_eof()
    received = b""
    while chunk := await server.receive_some():
        received += chunk
    assert received == b"".join(payload)
    assert net.stats.stalls > 0


async def test_reset_breaks_both_ends(autojump_clock: trio.testing.MockClock) -> None:
    _, a, b = two_hosts(reset=0.5)
    client, server = await connected_pair(a, b)
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):
            await client.send_all(b"data")
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()


async def test_partition_stalls_then_heals(autojump_clock: trio.testing.MockClock) -> None:
    net, a, b = two_hosts(latency=0.01)
    client, server = await connected_pair(a, b)
    net.partition([["10.0.0.1"]])
    with pytest.raises(OSError, match="timed out"):
        await a.connect("10.0.0.2", 7447)
    await client.send_all(b"held")
    with trio.move_on_after(30) as scope:
        await server.receive_some()
    assert scope.cancelled_caught  # nothing crosses the cut
    healed_at = trio.current_time()
    net.heal()
    assert await server.receive_some() == b"held"
    assert trio.current_time() - healed_at == pytest.approx(0.01)


async def test_reset_mode_partition_breaks_crossing_streams(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, a, b = two_hosts()
    client, _ = await connected_pair(a, b)
    net.partition([["10.0.0.1"]], mode="reset")
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")


async def test_topology_restricts_reach(autojump_clock: trio.testing.MockClock) -> None:
    net = VirtualNetwork(rng=random.Random(1))
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        net.add_host(host)
    net.add_link("10.0.0.1", "10.0.0.2", LinkParams(latency=0.01))
    net.add_link("10.0.0.2", "10.0.0.3", LinkParams(latency=0.02))
    await net.network_for("10.0.0.3").listen("10.0.0.3", 7447)
    with pytest.raises(OSError):
        await net.network_for("10.0.0.1").connect("10.0.0.3", 7447)
    routed = VirtualNetwork(rng=random.Random(1), routing="shortest-path")
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        routed.add_host(host)
    routed.add_link("10.0.0.1", "10.0.0.2", LinkParams(latency=0.01))
    routed.add_link("10.0.0.2", "10.0.0.3", LinkParams(latency=0.02))
    await routed.network_for("10.0.0.3").listen("10.0.0.3", 7447)
    start = trio.current_time()
    await routed.network_for("10.0.0.1").connect("10.0.0.3", 7447)
    assert trio.current_time() - start == pytest.approx(0.06)  # round trip over two hops


async def test_crash_resets_streams_and_refuses_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, a, b = two_hosts()
    client, _server = await connected_pair(a, b)
    net.crash("10.0.0.2")
    with pytest.raises(trio.BrokenResourceError):
        await client.receive_some()
    with pytest.raises(OSError, match="refused"):
        await a.connect("10.0.0.2", 7447)
    net.restore("10.0.0.2")
    await b.listen("10.0.0.2", 7447)
    await a.connect("10.0.0.2", 7447)


async def test_mdns_only_within_a_segment(autojump_clock: trio.testing.MockClock) -> None:
    net = VirtualNetwork(rng=random.Random(1))
    net.add_host("10.0.0.1", segment="lan0")
    net.add_host("10.0.0.2", segment="lan0")
    net.add_host("10.0.0.3", segment="lan1")
    ids = [NodeIdentity.from_private_bytes(bytes([i]) * 32).node_id for i in range(1, 4)]
    first = net.network_for("10.0.0.1").discover(ids[0], "tag", 7447)
    second = net.network_for("10.0.0.2").discover(ids[1], "tag", 7447)
    other = net.network_for("10.0.0.3").discover(ids[2], "tag", 7447)
    async with first.events() as events, other.events() as far:
        async with second.events() as events2:
            seen = await events.receive()
            assert seen == PeerDiscovered(ids[1], "10.0.0.2", 7447, seen.instance)
            assert (await events2.receive()).node_id == ids[0]
        departed = await events.receive()
        assert isinstance(departed, PeerDeparted) and departed.node_id == ids[1]
        with pytest.raises(trio.WouldBlock):
            far.receive_nowait()  # another segment hears nothing
