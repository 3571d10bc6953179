"""``GroupProtocol(masking=False)``, the benchmarks' baseline: same result, no masks.

Several protocol cores are wired together in memory under a virtual clock, every message
going through the real CBOR encoding. The same group runs twice from the same seeds, once
masked and once not: the averages must be identical, and only the unmasked run may put
the plain fixed-point encoding of a member's model on the wire.
"""

from __future__ import annotations

import numpy as np
import pytest
from support.group_net import GroupNet

from p2pfed.fixedpoint import FixedPointParams, error_bound, make_contribution
from p2pfed.group import GroupConfig, shard_bounds
from p2pfed.identity import NodeId
from p2pfed.messages import Shard

D = 41
K = 4
PARAMS = FixedPointParams.for_federation(32, 8.0, K)


class Group(GroupNet):
    """``K`` protocol cores, all connected, exchanging encoded messages in memory."""

    def __init__(self, *, masking: bool, seed: int = 5) -> None:
        config = GroupConfig(group_min=K, group_max=K)
        super().__init__(K, config, PARAMS, D, seed=seed, masking=masking)

    def average(self, vectors: dict[NodeId, np.ndarray], weights: dict[NodeId, int]) -> None:
        """Offer the models once and run; ``results``: each node's completed group."""
        self.offer(vectors, weights)
        self.run(2.0)  # a node with nothing left to offer starts no other group
        self.results = {n: done[0] for n in self.nodes if (done := self.completed(n))}


def models(group: Group) -> tuple[dict[NodeId, np.ndarray], dict[NodeId, int]]:
    rng = np.random.default_rng(11)
    vectors = {n: rng.uniform(-3, 3, D).astype(np.float32) for n in sorted(group.nodes)}
    weights = {n: int(rng.integers(1, 200)) for n in sorted(group.nodes)}
    return vectors, weights


def run_group(masking: bool) -> Group:
    group = Group(masking=masking)
    group.average(*models(group))
    assert set(group.results) == set(group.nodes), "the group did not complete"
    return group


def test_unmasked_group_computes_the_same_average() -> None:
    masked, unmasked = run_group(masking=True), run_group(masking=False)
    assert set(masked.nodes) == set(unmasked.nodes)  # same seeds, same members
    vectors, weights = models(unmasked)
    expected = sum(weights[n] * vectors[n].astype(np.float64) for n in vectors) / sum(
        weights.values()
    )
    for node_id, outcome in unmasked.results.items():
        # stochastic rounding draws the same numbers with and without masks, and the
        # masks cancel exactly in the ring: the results are bit for bit the same
        np.testing.assert_array_equal(outcome.mean, masked.results[node_id].mean)
        assert outcome.total_weight == sum(weights.values())
        assert np.all(np.abs(outcome.mean - expected) <= error_bound(PARAMS, expected))


@pytest.mark.parametrize("masking", [True, False])
def test_a_shard_carries_the_plain_encoding_only_without_masking(masking: bool) -> None:
    group = run_group(masking=masking)
    vectors, weights = models(group)
    bounds = shard_bounds(D + 1, K)
    shards = group.sent(Shard)
    assert len(shards) == K * (K - 1)
    for sender, _receiver, shard in shards:
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
