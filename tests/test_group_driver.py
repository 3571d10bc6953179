"""The group driver alone (p2pfed/group_driver.py): real group protocols, no channels.

Drivers send through an in-memory wire (the real CBOR encoding on the way, as in
tests/support/group_net.py) under trio's MockClock.
"""

from __future__ import annotations

import random

import numpy as np
import trio
import trio.testing

from p2pfed.exact_rounds import Position
from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import GroupCompleted, GroupConfig, GroupProtocol, Send
from p2pfed.group_driver import DriverLinks, GroupDriver
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.messages import GroupPosition, Message, ModelRequest, decode_message, encode_message
from p2pfed.peers import PeerTable

PARAMS = FixedPointParams.for_federation(64, 8.0, 8)
CONFIG = GroupConfig(group_min=3, group_max=3)
FINGERPRINT = bytes(range(32))


def identities(n: int) -> list[NodeIdentity]:
    rng = random.Random(5)
    return [NodeIdentity.from_private_bytes(rng.randbytes(32)) for _ in range(n)]


def protocol(identity: NodeIdentity, everyone: list[NodeIdentity], seed: int) -> GroupProtocol:
    rng = random.Random(seed)
    group = GroupProtocol(
        identity,
        CONFIG,
        PARAMS,
        fingerprint=FINGERPRINT,
        model_size=4,
        listen_port=7447,
        rng=rng,
        randbytes=rng.randbytes,
        numpy_rng=np.random.default_rng(seed),
    )
    for other in everyone:  # what every handshake tells
        if other is not identity:
            group.register_peer(other.node_id, other.public_key)
    return group


def test_three_drivers_complete_a_group_over_an_in_memory_wire() -> None:
    people = identities(3)
    ids = [p.node_id for p in people]
    vectors = [np.full(4, float(i), np.float32) for i in range(3)]
    outcomes: dict[NodeId, GroupCompleted | None] = {}
    seen: list[tuple[NodeId, float]] = []

    async def main() -> None:
        wire_send, wire = trio.open_memory_channel[tuple[NodeId, NodeId, bytes]](1000)
        drivers: dict[NodeId, GroupDriver] = {}
        for index, person in enumerate(people):
            me = person.node_id

            def send(peer: NodeId, message: Message, address: object, me: NodeId = me) -> None:
                wire_send.send_nowait((me, peer, encode_message(message)))

            def connected(me: NodeId = me) -> list[NodeId]:
                return [p for p in ids if p != me]

            def on_group(outcome: object, seconds: float, me: NodeId = me) -> None:
                seen.append((me, seconds))

            driver = GroupDriver(
                CONFIG,
                PeerTable(me),
                DriverLinks(send=send, connected=connected),
                current_round=lambda: 0,
                on_group=on_group,
            )
            driver.start(protocol(person, people, index))
            drivers[me] = driver

        async def pump() -> None:
            async for sender, receiver, data in wire:
                drivers[receiver].receive(sender, decode_message(data))

        async def member(index: int) -> None:
            outcome = await drivers[ids[index]].offer(vectors[index], 1, 0, initiate=True)
            assert outcome is None or isinstance(outcome, GroupCompleted)
            outcomes[ids[index]] = outcome

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            for driver in drivers.values():
                nursery.start_soon(driver.loop)
            async with trio.open_nursery() as members:
                for index in range(3):
                    members.start_soon(member, index)
            for driver in drivers.values():
                assert driver.groups_completed == 1 and driver.groups_aborted == 0
                assert len(driver.started_at) == 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    means = [outcomes[i].mean for i in ids]  # type: ignore[union-attr]
    for mean in means:
        np.testing.assert_allclose(mean, np.full(4, 1.0), atol=1e-5)
    # on_group heard of each group before the round took it
    assert sorted(m for m, _ in seen) == sorted(ids)


def test_actions_an_action_causes_run_after_the_batch_without_re_entry() -> None:
    """A send that makes the driver act again (the pool reporting a peer it cannot reach,
    which the protocol answers with more sends) queues those actions behind the batch
    under way instead of running them in the middle of it."""
    a, b, c = (p.node_id for p in identities(3))
    order: list[tuple[NodeId, int]] = []

    async def main() -> None:
        driver: GroupDriver

        def send(peer: NodeId, message: Message, address: object) -> None:
            order.append((peer, len(order)))
            if peer == a:
                driver.act([Send(c, ModelRequest())])  # re-enters, as peer_lost would

        driver = GroupDriver(CONFIG, PeerTable(b), DriverLinks(send=send), current_round=lambda: 0)
        driver.act([Send(a, ModelRequest()), Send(b, ModelRequest())])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [peer for peer, _ in order] == [a, b, c]


def test_a_later_round_among_peers_wakes_the_round_to_catch_up() -> None:
    people = identities(3)
    me, peers = people[0], [p.node_id for p in people[1:]]
    sent: list[tuple[NodeId, Message]] = []

    async def main() -> None:
        group = GroupProtocol(
            me,
            CONFIG,
            PARAMS,
            fingerprint=FINGERPRINT,
            model_size=4,
            listen_port=7447,
            rng=random.Random(1),
            exact=True,
        )
        for other in people[1:]:
            group.register_peer(other.node_id, other.public_key)
        driver = GroupDriver(
            CONFIG,
            PeerTable(me.node_id),
            DriverLinks(
                send=lambda peer, message, address: sent.append((peer, message)),
                connected=lambda: peers,
            ),
            current_round=lambda: 0,
        )
        driver.start(group)
        vector = np.zeros(4, np.float32)
        with trio.move_on_after(1.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(driver.loop)
                position = Position(0, 0, (), driver.class_count())
                # the peers announce round 1: this node's round 0 happened without it
                for peer in peers:
                    driver.receive(peer, GroupPosition(round=1, step=0, key=(), size=3))
                outcome = await driver.offer(vector, 1, 0, initiate=True, position=position)
                assert outcome is None and driver.behind
                nursery.cancel_scope.cancel()
        assert driver.behind

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # it announced its own position to both peers when it offered
    assert {peer for peer, m in sent if isinstance(m, GroupPosition)} == set(peers)
