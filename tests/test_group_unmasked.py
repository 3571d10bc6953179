"""``GroupProtocol(masking=False)``, the benchmarks' baseline: same result, no masks.

Several protocol cores are wired together in memory under a virtual clock, every message
going through the real CBOR encoding. The same group runs twice from the same seeds, once
masked and once not: the averages must be identical, and only the unmasked run may put
the plain fixed-point encoding of a member's model on the wire.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest

from p2pfed.fixedpoint import FixedPointParams, error_bound, make_contribution
from p2pfed.group import GroupCompleted, GroupConfig, GroupProtocol, Send, shard_bounds
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.messages import Shard, decode_message, encode_message

D = 41
K = 4
FINGERPRINT = bytes(range(32))
PARAMS = FixedPointParams.for_federation(32, 8.0, K)


class Group:
    """``K`` protocol cores, all connected, exchanging encoded messages in memory."""

    def __init__(self, *, masking: bool, seed: int = 5) -> None:
        rng = random.Random(seed)
        self.numpy_seeds: dict[NodeId, int] = {}
        self.nodes: dict[NodeId, GroupProtocol] = {}
        self.shards: list[tuple[NodeId, NodeId, Shard]] = []  # (sender, receiver, shard)
        self.completed: dict[NodeId, GroupCompleted] = {}
        self.queue: deque[tuple[NodeId, NodeId, bytes]] = deque()
        identities = [NodeIdentity.from_private_bytes(rng.randbytes(32)) for _ in range(K)]
        for identity in identities:
            numpy_seed = rng.randrange(1 << 30)
            self.numpy_seeds[identity.node_id] = numpy_seed
            self.nodes[identity.node_id] = GroupProtocol(
                identity,
                GroupConfig(group_min=K, group_max=K),
                PARAMS,
                fingerprint=FINGERPRINT,
                model_size=D,
                listen_port=7000,
                rng=random.Random(rng.random()),
                randbytes=rng.randbytes,
                numpy_rng=np.random.default_rng(numpy_seed),
                masking=masking,
            )
        for node in self.nodes.values():
            for other in identities:
                node.register_peer(other.node_id, other.public_key)

    def handle(self, sender: NodeId, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.queue.append((sender, action.peer, encode_message(action.message)))
            elif isinstance(action, GroupCompleted):
                self.completed[sender] = action

    def run(self, vectors: dict[NodeId, np.ndarray], weights: dict[NodeId, int]) -> None:
        now = 0.0
        for node_id, node in self.nodes.items():
            node.set_contribution(vectors[node_id], weights[node_id], 1, now)
        while now < 2.0 and len(self.completed) < K:
            for node_id, node in self.nodes.items():
                peers = [p for p in self.nodes if p != node_id]
                self.handle(node_id, node.poll(now, peers))
            while self.queue:
                sender, receiver, data = self.queue.popleft()
                message = decode_message(data)
                if isinstance(message, Shard):
                    self.shards.append((sender, receiver, message))
                self.handle(receiver, self.nodes[receiver].receive(sender, message, now))
            now += 0.01


def models(group: Group) -> tuple[dict[NodeId, np.ndarray], dict[NodeId, int]]:
    rng = np.random.default_rng(11)
    vectors = {n: rng.uniform(-3, 3, D).astype(np.float32) for n in sorted(group.nodes)}
    weights = {n: int(rng.integers(1, 200)) for n in sorted(group.nodes)}
    return vectors, weights


def run_group(masking: bool) -> Group:
    group = Group(masking=masking)
    group.run(*models(group))
    assert set(group.completed) == set(group.nodes), "the group did not complete"
    return group


def test_unmasked_group_computes_the_same_average() -> None:
    masked, unmasked = run_group(masking=True), run_group(masking=False)
    assert set(masked.nodes) == set(unmasked.nodes)  # same seeds, same members
    vectors, weights = models(unmasked)
    expected = sum(weights[n] * vectors[n].astype(np.float64) for n in vectors) / sum(
        weights.values()
    )
    for node_id, outcome in unmasked.completed.items():
        # stochastic rounding draws the same numbers with and without masks, and the
        # masks cancel exactly in the ring: the results are bit for bit the same
        np.testing.assert_array_equal(outcome.mean, masked.completed[node_id].mean)
        assert outcome.total_weight == sum(weights.values())
        assert np.all(np.abs(outcome.mean - expected) <= error_bound(PARAMS, expected))


@pytest.mark.parametrize("masking", [True, False])
def test_a_shard_carries_the_plain_encoding_only_without_masking(masking: bool) -> None:
    group = run_group(masking=masking)
    vectors, weights = models(group)
    bounds = shard_bounds(D + 1, K)
    assert len(group.shards) == K * (K - 1)
    for sender, _receiver, shard in group.shards:
        # the contribution the sender encodes: same model, weight and rounding draws
        rng = np.random.default_rng(group.numpy_seeds[sender])
        plain = make_contribution(vectors[sender], weights[sender], PARAMS, rng)
        a, b = bounds[shard.index]
        words = np.frombuffer(shard.data, dtype="<u4")
        assert len(words) == b - a  # the wire format does not depend on masking
        if masking:
            assert not np.array_equal(words, plain[a:b])
        else:
            np.testing.assert_array_equal(words, plain[a:b])
