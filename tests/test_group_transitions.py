"""The group protocol's transition table (issue #13): the code changes phase only through
it, every row of it is reachable, and spec/group.md shows exactly it.

The coverage check drives nodes through a hostile in-memory network (tests/support/
group_net.py, real CBOR and real crypto) with a fixed seed: delays that reorder messages,
losses, tampered replies, starts and shards, crashes, withdrawals and new contributions
at any moment. Every phase change is recorded as it passes the choke point; one not in the
table raises there, and one in the table that the drive never produces is a dead row.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random

import numpy as np
import pytest
from support.group_net import GroupNet

from p2pfed.errors import LocalProtocolError
from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import (
    GROUP_EVENT_MEANING,
    GROUP_TRANSITIONS,
    GroupConfig,
    GroupEvent,
    GroupProtocol,
    Phase,
    Send,
    _Idle,
)
from p2pfed.identity import NodeId
from p2pfed.messages import GroupReply, GroupStart, Message, Shard, encode_message
from p2pfed.spec_document import GENERATED, SPEC, fill_generated

D = 8
PARAMS = FixedPointParams.for_federation(64, 8.0, 8)
CONFIG = GroupConfig(
    group_min=3,
    group_max=4,
    invite_timeout=0.4,
    start_timeout=0.4,
    allreduce_timeout=1.5,
    initiate_delay=0.05,
    retry_backoff=0.2,
)


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + bytes(data[1:])


class HostileNet(GroupNet):
    """Messages arrive after a random delay (so out of order), some never, some altered;
    nodes crash and come back, withdraw and offer new contributions at random."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, CONFIG, PARAMS, D, seed=seed)
        self.rng = random.Random(seed)
        self.inflight: list[tuple[float, int, NodeId, NodeId, bytes]] = []
        self.counter = itertools.count()
        self.round = 1

    def tamper(self, message: Message) -> Message:
        roll = self.rng.random()
        if isinstance(message, GroupReply) and message.accept and roll < 0.04:
            # the initiator's own start then fails to verify this member's mask key
            return dataclasses.replace(message, key_signature=_flip(message.key_signature))
        if isinstance(message, GroupStart) and roll < 0.04:
            first = message.members[0]
            bad = dataclasses.replace(first, key_signature=_flip(first.key_signature))
            return dataclasses.replace(message, members=[bad, *message.members[1:]])
        if isinstance(message, Shard) and roll < 0.02:
            return dataclasses.replace(message, data=bytes(message.data)[:-4])
        return message

    def handle(self, sender: NodeId, actions: list) -> None:
        for action in actions:
            if not isinstance(action, Send):
                self.outcomes[sender].append(action)
                continue
            if sender in self.dead or self.rng.random() < 0.03:
                continue
            data = encode_message(self.tamper(action.message))
            arrival = self.now + self.rng.uniform(0.0, 0.25)
            heapq.heappush(self.inflight, (arrival, next(self.counter), sender, action.peer, data))

    def offer_one(self, node_id: NodeId) -> None:
        vector = np.array([self.rng.uniform(-1, 1) for _ in range(D)], np.float32)
        self.nodes[node_id].set_contribution(
            vector, self.rng.randrange(1, 100), self.round, self.now
        )

    def chaos(self) -> None:
        for node_id, node in self.nodes.items():
            roll = self.rng.random()
            if node_id in self.dead:
                if roll < 0.02:
                    self.dead.discard(node_id)
                continue
            if roll < 0.004:
                self.dead.add(node_id)
                for other_id, other in self.nodes.items():
                    if other_id not in self.dead:
                        self.handle(other_id, other.peer_lost(node_id, self.now))
            elif roll < 0.012:
                self.handle(node_id, node.withdraw())
            elif roll < 0.03 or (node.phase is Phase.IDLE and roll < 0.2):
                self.offer_one(node_id)

    def drive(self, until: float, step: float = 0.01) -> None:
        from p2pfed.messages import decode_message

        while self.now < until:
            self.chaos()
            for node_id, node in self.nodes.items():
                if node_id not in self.dead:
                    self.handle(node_id, node.poll(self.now, self.connected(node_id)))
            while self.inflight and self.inflight[0][0] <= self.now:
                _, _, sender, receiver, data = heapq.heappop(self.inflight)
                if receiver in self.dead or sender in self.dead:
                    continue
                message = decode_message(data, borrow=True)
                self.handle(receiver, self.nodes[receiver].receive(sender, message, self.now))
            self.now += step


def test_every_phase_change_is_a_row_of_the_table_and_every_row_happens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[tuple[Phase, GroupEvent], int] = {}
    original = GroupProtocol._transition

    def recording(self: GroupProtocol, event: GroupEvent, state: object) -> None:
        key = (self.phase, event)
        original(self, event, state)  # type: ignore[arg-type]
        seen[key] = seen.get(key, 0) + 1

    monkeypatch.setattr(GroupProtocol, "_transition", recording)
    for seed in range(3):
        net = HostileNet(7, seed)
        net.drive(until=25.0)
    assert set(seen) <= set(GROUP_TRANSITIONS)  # else _transition would have raised
    missing = sorted(f"{p.name} + {e.name}" for p, e in set(GROUP_TRANSITIONS) - set(seen))
    assert not missing, f"rows of GROUP_TRANSITIONS the drive never produced: {missing}"


def test_a_change_outside_the_table_is_refused() -> None:
    net = GroupNet(3, CONFIG, PARAMS, D)
    node = next(iter(net.nodes.values()))
    with pytest.raises(LocalProtocolError, match="phase idle cannot take"):
        node._transition(GroupEvent.COMPLETE, _Idle())  # COMPLETE from IDLE is not a row
    assert node.phase is Phase.IDLE
    node.set_contribution(np.zeros(D, np.float32), 1, 1, 0.0)
    with pytest.raises(LocalProtocolError, match="phase ready cannot take"):
        node._transition(GroupEvent.WITHDRAW, node._state)  # READY + WITHDRAW is IDLE
    assert node.phase is Phase.READY


def test_every_event_is_explained_and_every_phase_has_a_way_out() -> None:
    assert set(GROUP_EVENT_MEANING) == set(GroupEvent)
    assert {e for _, e in GROUP_TRANSITIONS} == set(GroupEvent)
    for phase in Phase:
        assert any(p is phase and after is not phase for (p, _), after in GROUP_TRANSITIONS.items())


def test_the_spec_shows_the_table_the_code_checks() -> None:
    for name in {file for file, _ in GENERATED}:
        text = (SPEC / name).read_text(encoding="utf-8")
        assert fill_generated(name, text) == text, (
            f"spec/{name} is stale: run python -m p2pfed.spec_document"
        )
    text = (SPEC / "group.md").read_text(encoding="utf-8")
    for (before, event), after in GROUP_TRANSITIONS.items():
        assert f"| {before.name} | {event.value} | {after.name} |" in text
