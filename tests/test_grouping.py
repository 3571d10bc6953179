"""Grouping policies on their own (p2pfed/grouping.py): the decisions a READY node carries
out, and the node choosing its policy once, at construction."""

from __future__ import annotations

import random

import numpy as np
from support.group_net import GroupNet

from p2pfed.exact_rounds import Position
from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import GridPosition, GroupConfig
from p2pfed.grouping import (
    AwaitInvite,
    ExactGrouping,
    FallBack,
    GridGrouping,
    Invite,
    LookAgain,
    Offer,
    RandomGrouping,
    SitOutRound,
    WaitUntil,
)
from p2pfed.identity import NodeId

CONFIG = GroupConfig(group_min=3, group_max=4)
IDS = [NodeId(bytes([i]) * 32) for i in range(1, 17)]


def test_random_grouping_waits_for_enough_peers_then_samples_them() -> None:
    policy = RandomGrouping(IDS[0], CONFIG)
    offer = Offer(1, None, until=0.0)
    assert policy.initiate(offer, IDS[1:2], 0.0, random.Random(1)) == LookAgain()
    decision = policy.initiate(offer, IDS[1:10], 0.0, random.Random(1))
    assert isinstance(decision, Invite) and not decision.full
    assert len(decision.peers) == CONFIG.group_max - 1 and set(decision.peers) <= set(IDS[1:10])
    assert not policy.structured(offer, 0.0) and policy.decline(offer, IDS[5], 7, 0.0) is None


def test_grid_grouping_lets_the_lowest_mate_invite_the_full_line() -> None:
    me, mate, other, stranger = IDS[1], IDS[0], IDS[2], IDS[3]
    table = {mate: (1, 0), other: (2, 0), stranger: (1, 1)}
    policy = GridGrouping(me, CONFIG, GridPosition(3, (0, 0)), table)
    offer = Offer(0, None, until=5.0)  # round 0: the line along dimension 0
    assert policy.mates([mate, other, stranger], 0) == [mate, other]
    # a mate with a lower id initiates: wait for its invite until the fallback
    assert policy.initiate(offer, [mate, other, stranger], 1.0, random.Random()) == WaitUntil(5.0)
    lowest = GridGrouping(mate, CONFIG, GridPosition(3, (1, 0)), {me: (0, 0), other: (2, 0)})
    assert lowest.initiate(offer, [me], 1.0, random.Random()) == LookAgain()  # one mate missing
    assert lowest.initiate(offer, [me, other], 1.0, random.Random()) == Invite((me, other), True)
    assert policy.decline(offer, stranger, 0, 1.0) == "not in this node's grid group of round 0"
    assert policy.decline(offer, mate, 0, 1.0) is None
    assert policy.decline(offer, stranger, 0, 5.0) is None  # fallen back: anyone may invite


def test_exact_grouping_invites_its_run_and_falls_back_where_the_plan_cannot() -> None:
    position = Position(2, 0, (), 12)  # 12 nodes: runs of 4, then 3
    table = {p: position for p in IDS[:12]}
    offer = Offer(2, position, until=30.0)
    first = ExactGrouping(IDS[0], CONFIG, table, sit_out=True)
    assert first.initiate(offer, IDS[1:8], 1.0, random.Random()) == LookAgain()  # class missing
    assert first.initiate(offer, IDS[1:12], 1.0, random.Random()) == Invite(tuple(IDS[1:4]), True)
    second = ExactGrouping(IDS[1], CONFIG, table, sit_out=True)
    assert second.initiate(offer, IDS[:12], 1.0, random.Random()) == AwaitInvite(
        CONFIG.invite_timeout * 2
    )
    beyond = Offer(2, Position(2, 5, (0, 0, 0, 0, 0), 12), until=30.0)
    assert first.initiate(beyond, IDS[1:12], 1.0, random.Random()) == FallBack()
    assert first.decline(offer, IDS[13], 2, 1.0) == "not in this node's class of its round"
    assert first.decline(offer, IDS[5], 2, 1.0) is None


def test_a_count_without_a_plan_sits_some_nodes_out() -> None:
    position = Position(0, 0, (), 11)  # 11: a prime above group_max
    table = {p: position for p in IDS[:11]}
    offer = Offer(0, position, until=30.0)
    decisions = [
        ExactGrouping(me, CONFIG, table, sit_out=True).initiate(
            offer, [p for p in IDS[:11] if p != me], 1.0, random.Random()
        )
        for me in IDS[:11]
    ]
    out = [d for d in decisions if isinstance(d, SitOutRound)]
    assert out and all(d.participants + len(out) == 11 for d in out)
    assert not ExactGrouping(IDS[0], CONFIG, table, sit_out=False).structured(offer, 1.0)


def test_the_node_chooses_its_policy_at_construction() -> None:
    params = FixedPointParams.for_federation(64, 8.0, 8)
    random_net = GroupNet(3, CONFIG, params, 4)
    grid_net = GroupNet(9, CONFIG, params, 4, grid=(3, 2))
    assert all(type(n._grouping) is RandomGrouping for n in random_net.nodes.values())
    assert all(type(n._grouping) is GridGrouping for n in grid_net.nodes.values())
    node = next(iter(grid_net.nodes.values()))
    node.set_contribution(np.zeros(4, np.float32), 1, 0, 0.0)
    assert len(node.grid_mates(list(grid_net.nodes), 0)) == 2  # the line of a 3 x 3 grid
