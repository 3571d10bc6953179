"""Fuzz target: the group protocol (:class:`p2pfed.group.GroupProtocol`, spec/group.md)
driven only through its public API, with four nodes in memory.

Nodes 0-2 are honest; node 3 ("mallory") runs a genuine protocol core too, but the
fuzzer also speaks for it: it injects arbitrary decoded messages, and replays any
message seen on the wire, with a byte flipped or one field rewritten, as sent by
mallory. The fuzzer also schedules the network: it delivers messages in any order, drops
and duplicates them, advances time (every node polls) and breaks channels (``peer_lost``
on both ends). Every message crosses the real CBOR encoding. The input is read as that
program (:class:`fuzz._support.Reader`); a run ends with a drain in which everything is
delivered and time runs out every deadline.

Contract checked after every call:

* ``receive``, ``poll`` and ``peer_lost`` raise nothing: every message a peer can send
  decodes to something the protocol must handle;
* every action is one of the documented kinds; a node never sends to itself, and every
  message it sends encodes, and decodes at its receiver;
* the phase is a :class:`~p2pfed.group.Phase`; a node waiting (initiating, pending,
  running) always has a deadline (no deadlock); a node is IDLE exactly once its
  contribution has been consumed by a completed group, which happens at most once;
* a completed group lists the node, has an allowed size and a finite mean; if mallory is
  not a member (honest group) its total weight is exactly the members' weights (push-sum
  conservation, also over :meth:`~p2pfed.group.GroupCompleted.share`), its mean is
  their weighted mean, and every member that completes it agrees.

Run: ``python -m fuzz.group_protocol -atheris_runs=5000``.
"""

from __future__ import annotations

import functools
import random
import sys

import numpy as np

from fuzz._support import Reader, run
from p2pfed.encoding import encode
from p2pfed.errors import DecodeError
from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import (
    GroupAborted,
    GroupCompleted,
    GroupConfig,
    GroupProtocol,
    GroupStarted,
    Phase,
    Send,
    SitOut,
)
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.messages import Message, decode_message, encode_message

TARGET = "group_protocol"
D = 6
FINGERPRINT = bytes(range(32))
CONFIG = GroupConfig(
    group_min=3,
    group_max=4,
    invite_timeout=1.0,
    start_timeout=2.0,
    allreduce_timeout=5.0,
    initiate_delay=0.05,
    retry_backoff=0.3,
)
PARAMS = FixedPointParams.for_federation(64, 8.0, CONFIG.group_max)
IDENTITIES = [NodeIdentity.from_private_bytes(bytes([i + 1]) * 32) for i in range(4)]
MALLORY = IDENTITIES[3].node_id
HONEST = [identity.node_id for identity in IDENTITIES[:3]]
ALL = [identity.node_id for identity in IDENTITIES]
VECTORS = {
    node_id: np.linspace(-1.0 + i, 1.5 - i, D, dtype=np.float32) for i, node_id in enumerate(ALL)
}
MAX_STEPS = 120
DRAIN_ROUNDS = 12
WAITING = (Phase.INITIATING, Phase.PENDING, Phase.RUNNING)

last_run: dict[str, int] = {}
"""Counts of the latest run (completed groups, messages delivered, ...): for the corpus
generator and the tests, which check that seeds reach deep states."""


def _excludes(until: dict[NodeId, float], peer: NodeId, now: float) -> bool:
    return until.get(peer, -1.0) > now


class Net:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        seed = reader.byte()
        self.now = 0.0
        self.nodes: dict[NodeId, GroupProtocol] = {}
        self.weights: dict[NodeId, int] = {}
        # like the node, each excludes for a while the peers it blamed for a failed group
        self.blamed: dict[NodeId, dict[NodeId, float]] = {n: {} for n in ALL}
        for index, identity in enumerate(IDENTITIES):
            node_rng = random.Random(seed * 8 + index)
            until = self.blamed[identity.node_id]
            self.nodes[identity.node_id] = GroupProtocol(
                identity,
                CONFIG,
                PARAMS,
                fingerprint=FINGERPRINT,
                model_size=D,
                listen_port=7000 + index,
                rng=node_rng,
                randbytes=node_rng.randbytes,
                numpy_rng=np.random.default_rng(seed * 8 + index),
                excluded=functools.partial(_excludes, until),
            )
        for node in self.nodes.values():
            for other in IDENTITIES:
                node.register_peer(other.node_id, other.public_key)
        for node_id, node in self.nodes.items():
            # weights 0 to 300: zero weights (a node with nothing to add) included
            self.weights[node_id] = reader.below(4) * 100
            initiate = node_id != MALLORY or reader.byte() & 1 == 1
            node.set_contribution(
                VECTORS[node_id], self.weights[node_id], 1, self.now, initiate=initiate
            )
        self.queue: list[tuple[NodeId, NodeId, bytes]] = []
        self.wire: list[bytes] = []
        self.lost: set[frozenset[NodeId]] = set()
        self.done: dict[NodeId, GroupCompleted] = {}
        self.groups: dict[bytes, GroupCompleted] = {}
        self.stats = {"completed": 0, "aborted": 0, "delivered": 0, "injected": 0, "started": 0}

    # -- the network ---------------------------------------------------------------------

    def linked(self, a: NodeId, b: NodeId) -> bool:
        return frozenset((a, b)) not in self.lost

    def connected(self, node_id: NodeId) -> list[NodeId]:
        return [p for p in ALL if p != node_id and self.linked(node_id, p)]

    def deliver(self, index: int) -> None:
        sender, receiver, data = self.queue.pop(index)
        if not self.linked(sender, receiver):
            return
        self.stats["delivered"] += 1
        self.receive(sender, receiver, decode_message(data, borrow=True))

    def receive(self, sender: NodeId, receiver: NodeId, message: Message) -> None:
        self.handle(receiver, self.nodes[receiver].receive(sender, message, self.now))

    def poll(self) -> None:
        for node_id, node in self.nodes.items():
            self.handle(node_id, node.poll(self.now, self.connected(node_id)))

    def lose(self, a: NodeId, b: NodeId) -> None:
        self.lost.add(frozenset((a, b)))
        self.queue = [m for m in self.queue if self.linked(m[0], m[1])]
        self.handle(a, self.nodes[a].peer_lost(b, self.now))
        self.handle(b, self.nodes[b].peer_lost(a, self.now))

    # -- the checks ----------------------------------------------------------------------

    def handle(self, node_id: NodeId, actions: list) -> None:
        node = self.nodes[node_id]
        for action in actions:
            if isinstance(action, Send):
                assert action.peer != node_id, "a node sent a message to itself"
                # delivery decodes it: a message the receiver rejects fails the run there
                data = encode_message(action.message)
                self.wire.append(data)
                if action.peer in self.nodes and self.linked(node_id, action.peer):
                    self.queue.append((node_id, action.peer, data))
            elif isinstance(action, GroupCompleted):
                self.completed(node_id, action)
            elif isinstance(action, GroupStarted):
                assert node_id in action.members
                self.stats["started"] += 1
            elif isinstance(action, GroupAborted):
                self.stats["aborted"] += 1
                for peer in action.blame:
                    assert peer != node_id, "a node blamed itself"
                    self.blamed[node_id][peer] = self.now + CONFIG.exclusion
            else:
                assert isinstance(action, SitOut), f"undocumented action {action!r}"
        self.check(node_id, node)

    def completed(self, node_id: NodeId, done: GroupCompleted) -> None:
        assert node_id not in self.done, "a contribution was applied twice"
        self.done[node_id] = done
        self.stats["completed"] += 1
        members = done.members
        assert node_id in members
        assert list(members) == sorted(set(members)), "members unsorted or repeated"
        assert CONFIG.group_min <= len(members) <= CONFIG.group_max
        assert done.mean.shape == (D,) and np.isfinite(done.mean).all()
        assert done.total_weight >= 0
        if MALLORY in members or not set(members) <= set(ALL):
            return  # a dishonest member can make the sum anything the masks allow
        total = sum(self.weights[m] for m in members)
        assert done.total_weight == total, f"weights not conserved: {done.total_weight} != {total}"
        assert sum(done.share(m) for m in members) == total, "shares do not add up"
        if total:
            expected = sum(self.weights[m] * VECTORS[m].astype(np.float64) for m in members)
            np.testing.assert_allclose(done.mean, expected / total, atol=1e-5)
        else:
            np.testing.assert_array_equal(done.mean, VECTORS[node_id])
        first = self.groups.setdefault(done.group_id, done)
        assert first.members == members and first.total_weight == done.total_weight
        if total:
            np.testing.assert_array_equal(first.mean, done.mean)

    def check(self, node_id: NodeId, node: GroupProtocol) -> None:
        phase = node.phase
        assert phase in Phase
        if phase in WAITING:
            assert node.next_deadline() is not None, f"{phase} without a deadline"
        assert (phase is Phase.IDLE) == (node_id in self.done), (
            f"{phase} but {'a' if node_id in self.done else 'no'} completed group"
        )

    # -- the program ---------------------------------------------------------------------

    def step(self) -> None:
        reader = self.reader
        op = reader.below(11)
        if op <= 3:
            if self.queue:
                self.deliver(reader.below(min(len(self.queue), 3)))
        elif op == 4:
            self.now += (0.01, 0.1, 0.5, 1.0, 3.0)[reader.below(5)]
            self.poll()
        elif op == 5:
            if self.queue:
                self.queue.pop(reader.below(len(self.queue)))
        elif op == 6:
            if self.queue:
                self.queue.append(self.queue[reader.below(len(self.queue))])
        elif op in (7, 8, 10):
            target = HONEST[reader.below(3)]
            if op == 7:
                data = reader.take(reader.u16() % 4096)
            elif not self.wire:
                return
            else:
                data = self.wire[reader.below(len(self.wire))]
                data = self.flip(data) if op == 8 else self.rewrite(data)
            try:
                message = decode_message(data)
            except DecodeError:
                return
            if self.linked(MALLORY, target):
                self.stats["injected"] += 1
                self.receive(MALLORY, target, message)
        else:
            a = ALL[reader.below(4)]
            b = ALL[reader.below(4)]
            if a != b and self.linked(a, b):
                self.lose(a, b)

    def flip(self, data: bytes) -> bytes:
        reader = self.reader
        if reader.byte() & 1 and data:
            flipped = bytearray(data)
            flipped[reader.below(len(data))] ^= reader.byte() or 1
            return bytes(flipped)
        return data

    def rewrite(self, data: bytes) -> bytes:
        """``data`` (a message seen on the wire) with one field replaced by a fuzz-chosen
        value of the same CBOR type: a mutation that keeps the group id, so it reaches the
        code of a running group (a byte flip mostly makes messages that do not decode)."""
        reader = self.reader
        fields = decode_message(data).to_wire()
        keys = sorted(k for k in fields if k != 0)
        if not keys:
            return data
        key = keys[reader.below(len(keys))]
        old = fields[key]
        new: object
        if isinstance(old, bytes | bytearray | memoryview):
            size = (len(old), 0, 32, reader.byte())[reader.below(4)]
            new = reader.take(size).ljust(size, b"\x00")
        elif isinstance(old, str):
            # undecodable bytes become U+FFFD, three bytes each: long texts of few characters
            new = reader.chunk().decode("utf-8", "replace")
        elif isinstance(old, bool):
            new = not old
        elif isinstance(old, int):
            new = (0, 1, old + 1, max(old - 1, 0), reader.u16(), (1 << 64) - 1)[reader.below(6)]
        elif isinstance(old, list):
            new = old[: reader.below(len(old) + 1)] if reader.byte() & 1 else old + old[:1]
        else:
            return data
        fields[key] = new
        return encode(fields)

    def drain(self) -> None:
        for _ in range(DRAIN_ROUNDS):
            while self.queue:
                self.deliver(0)
            phases = [node.phase for node in self.nodes.values()]
            ready = sum(phase is Phase.READY for phase in phases)
            if not any(phase in WAITING for phase in phases) and ready < CONFIG.group_min:
                break  # no group can form any more: the rest would be refusals only
            self.now += 1.0  # twelve seconds in all: past every deadline of CONFIG
            self.poll()


def test_one_input(data: bytes) -> None:
    reader = Reader(data)
    net = Net(reader)
    steps = 0
    while reader.left and steps < MAX_STEPS:
        net.step()
        steps += 1
    net.drain()
    last_run.clear()
    last_run.update(net.stats)


def main() -> None:
    run(TARGET, test_one_input)


if __name__ == "__main__":
    main()
    sys.exit(0)
