"""The channel pool alone (p2pfed/channel_pool.py): no node, no group protocol.

Pools run on simnet's virtual network under trio's MockClock, with real Noise channels;
their owner hooks only record what they are told.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
import trio.testing

from p2pfed.channel_pool import LIVENESS_DEADLINE, ChannelPool, PoolHooks
from p2pfed.config import NodeConfig
from p2pfed.federation import Federation
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.messages import Message, ModelRequest, NodeAnnounce
from p2pfed.peers import PeerTable
from p2pfed.trio_channel import ChannelConfig, SecureChannel, SharedBudget
from simnet.network import LinkParams, VirtualNetwork

FED = Federation.new("pool-test")
PORT = 7447


@dataclass
class Owner:
    """Hooks that record what the pool reports, and a pool that calls them."""

    identity: NodeIdentity
    host: str
    pool: ChannelPool | None = None
    opened: list[NodeId] = field(default_factory=list)
    received: list[tuple[NodeId, Message]] = field(default_factory=list)
    gone: list[NodeId] = field(default_factory=list)
    undeliverable: list[NodeId] = field(default_factory=list)
    busy: set[NodeId] = field(default_factory=set)

    def greet(self, peer: NodeId, channel: SecureChannel) -> list[Message]:
        self.opened.append(peer)
        return [NodeAnnounce(listen_port=PORT, grid=())]


def make_pool(world: VirtualNetwork, host: str, seed: int, max_connections: int = 8) -> Owner:
    rng = random.Random(seed)
    identity = NodeIdentity.from_private_bytes(rng.randbytes(32))
    owner = Owner(identity, host)
    world.add_host(host)
    owner.pool = ChannelPool(
        identity=identity,
        federation=FED,
        config=NodeConfig(
            listen_host=host, listen_port=PORT, mdns=False, max_connections=max_connections
        ),
        channel_config=ChannelConfig(),
        network=world.network_for(host),
        peers=PeerTable(identity.node_id),
        rng=rng,
        randbytes=rng.randbytes,
        budget=lambda: SharedBudget(64 << 20),
        target_peers=8,
        group_min=2,
        hooks=PoolHooks(
            opened=owner.greet,
            received=lambda peer, message: owner.received.append((peer, message)),
            gone=owner.gone.append,
            undeliverable=owner.undeliverable.append,
            busy=lambda: owner.busy,
        ),
    )
    return owner


def run_world(
    count: int, scene: Callable[[VirtualNetwork, list[Owner]], Awaitable[None]], **kwargs: int
) -> list[Owner]:
    """Start ``count`` pools listening (no connector: the scene dials), run ``scene``."""

    async def main() -> list[Owner]:
        world = VirtualNetwork(rng=random.Random(1), default_link=LinkParams(latency=0.005))
        owners = [make_pool(world, f"10.0.0.{i + 1}", i, **kwargs) for i in range(count)]
        async with trio.open_nursery() as nursery:
            world.start(nursery)
            for owner in owners:
                assert owner.pool is not None
                listener = await owner.pool.network.listen(owner.host, PORT)
                owner.pool.bind(nursery)
                await nursery.start(owner.pool.serve, listener)
            await scene(world, owners)
            for owner in owners:
                assert owner.pool is not None
                owner.pool.stopping = True
                await owner.pool.close_all()
            nursery.cancel_scope.cancel()
        return owners

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_message_to_an_unconnected_peer_dials_it_and_arrives_after_the_greeting() -> None:
    async def scene(world: VirtualNetwork, owners: list[Owner]) -> None:
        a, b = (o.pool for o in owners)
        assert a is not None and b is not None
        a.send(b.node_id, ModelRequest(), (owners[1].host, PORT))
        await trio.sleep(1.0)
        assert a.connected() == [b.node_id] and b.connected() == [a.node_id]
        assert a.unresponsive_peers() == [] and a.traffic()[0] > 0

    a, b = run_world(2, scene)
    # the receiver's owner sees the greeting first, then what was queued before the dial
    assert [type(m) for _, m in b.received] == [NodeAnnounce, ModelRequest]
    assert a.opened == [b.identity.node_id] and b.opened == [a.identity.node_id]
    # closing every channel reports each peer gone once, on both sides
    assert a.gone == [b.identity.node_id] and b.gone == [a.identity.node_id]
    assert a.undeliverable == []


def test_a_peer_without_an_address_is_undeliverable() -> None:
    stranger = NodeIdentity.from_private_bytes(bytes(range(32))).node_id

    async def scene(world: VirtualNetwork, owners: list[Owner]) -> None:
        assert owners[0].pool is not None
        owners[0].pool.send(stranger, ModelRequest())

    (a,) = run_world(1, scene)
    assert a.undeliverable == [stranger]


def test_a_failed_dial_gives_up_what_was_queued() -> None:
    async def scene(world: VirtualNetwork, owners: list[Owner]) -> None:
        a, b = owners
        assert a.pool is not None
        a.pool.send(b.identity.node_id, ModelRequest(), (b.host, PORT + 1))  # refused
        await trio.sleep(30.0)

    a, b = run_world(2, scene)
    assert a.undeliverable == [b.identity.node_id] and a.opened == []


def test_a_silent_peer_is_unresponsive_but_still_linked() -> None:
    async def scene(world: VirtualNetwork, owners: list[Owner]) -> None:
        a, b = (o.pool for o in owners)
        assert a is not None and b is not None
        a.send(b.node_id, ModelRequest(), (owners[1].host, PORT))
        await trio.sleep(1.0)
        world.partition([[owners[0].host], [owners[1].host]], mode="stall")
        await trio.sleep(LIVENESS_DEADLINE + 1.5)
        assert a.connected() == [] and a.unresponsive_peers() == [b.node_id]
        since = a.silent_since(b.node_id)
        assert since is not None and since <= trio.current_time()
        world.heal()
        await trio.sleep(2.0)
        assert a.connected() == [b.node_id]

    run_world(2, scene)


def test_abandon_ends_every_channel_without_cancelling_it() -> None:
    """abandon() ends the node's channels by itself (each writer ends and closes its
    stream), so tearing a halted network down unwinds no Cancelled per channel; with
    ``streams_reset`` the streams are left to the caller, who resets the connections."""

    async def scene(world: VirtualNetwork, owners: list[Owner]) -> None:
        a, b, c = (o.pool for o in owners)
        assert a is not None and b is not None and c is not None
        a.send(b.node_id, ModelRequest(), (owners[1].host, PORT))
        c.send(b.node_id, ModelRequest(), (owners[1].host, PORT))
        await trio.sleep(1.0)
        assert b.connected() == sorted([a.node_id, c.node_id], key=lambda p: p.raw)
        a.abandon()
        await trio.testing.wait_all_tasks_blocked()
        assert a.links == {}  # at once, and nothing was cancelled: the channel tasks ended
        await trio.sleep(1.0)
        assert b.connected() == [c.node_id]  # b saw the connection end
        c.abandon(streams_reset=True)
        await trio.sleep(1.0)
        # c's channel ended, but its stream is the caller's to reset: b still has it
        assert b.connected() == [c.node_id]
        world.halt()
        await trio.testing.wait_all_tasks_blocked()
        assert c.links == {} and b.links == {}

    owners = run_world(3, scene)
    assert owners[0].gone == [] and owners[2].gone == []  # abandoned: not told


def test_channels_beyond_the_limit_are_trimmed_but_never_busy_ones() -> None:
    async def scene(world: VirtualNetwork, owners: list[Owner]) -> None:
        hub = owners[0]
        assert hub.pool is not None
        first = owners[1].identity.node_id
        hub.busy.add(first)  # say, a member of the hub's current group
        for owner in owners[1:]:
            assert owner.pool is not None
            owner.pool.send(hub.identity.node_id, ModelRequest(), (hub.host, PORT))
            await trio.sleep(1.0)
        # the third peer's arrival is one beyond the limit: it trimmed the longest-idle
        # channel that is neither busy (the first) nor just opened (the third's)
        third = owners[3].identity.node_id
        assert hub.pool.channels_trimmed == 1
        assert hub.pool.connected() == sorted([first, third], key=lambda p: p.raw)

    # (inbound channels are capped at twice max_connections: room for the third peer)
    owners = run_world(4, scene, max_connections=2)
    # the peers it trimmed were told by a Close, and each side reported the loss
    assert len(owners[0].gone) == 3


def test_connected_follows_liveness_both_ways_between_link_changes() -> None:
    """connected() keeps its answer between calls: a peer that goes silent with no link
    opening or closing must still drop out, and come back when it is heard again."""

    async def scene(world: VirtualNetwork, owners: list[Owner]) -> None:
        a, b = (o.pool for o in owners)
        assert a is not None and b is not None
        a.send(b.node_id, ModelRequest(), (owners[1].host, PORT))
        await trio.sleep(1.0)
        assert a.connected() == [b.node_id]
        world.partition([[owners[0].host], [owners[1].host]], mode="stall")
        seen = []
        for _ in range(12):  # asked every half second, as the group loop would
            await trio.sleep(0.5)
            seen.append(a.connected())
        assert seen[0] == [b.node_id] and seen[-1] == []
        world.heal()
        await trio.sleep(2.0)
        assert a.connected() == [b.node_id]

    run_world(2, scene)


def test_abandoned_channels_go_without_a_goodbye_or_a_report() -> None:
    """abandon() (simnet halting a network): the owner hears of no lost peer, nothing is
    dialled for later messages, and the peer sees the connection end without a Close."""

    async def scene(world: VirtualNetwork, owners: list[Owner]) -> None:
        a, b = owners[0].pool, owners[1].pool
        assert a is not None and b is not None
        a.send(b.node_id, ModelRequest(), (owners[1].host, PORT))
        await trio.sleep(1.0)
        assert a.connected() == [b.node_id]
        a.abandon()
        a.send(owners[2].identity.node_id, ModelRequest(), (owners[2].host, PORT))
        for links in a.links.values():
            for link in links:
                link.outbox.close()  # the writers close their channels (no Close: abandoned)
        await trio.sleep(2.0)
        assert a.links == {} and b.links == {}

    owners = run_world(3, scene)
    assert owners[0].gone == []  # abandoned: not told
    assert owners[1].gone == [owners[0].identity.node_id]  # the peer saw the link end
    assert owners[2].opened == []  # nothing dialled after abandon()
