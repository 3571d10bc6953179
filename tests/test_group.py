"""The group protocol core, many nodes wired together in memory under a virtual clock
(tests/support/group_net.py: every message through the real CBOR encoding)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from support.group_net import FINGERPRINT, GroupNet

from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import (
    GroupAborted,
    GroupCompleted,
    GroupConfig,
    Phase,
    Send,
    shard_bounds,
)
from p2pfed.identity import NodeId
from p2pfed.messages import (
    GroupAbort,
    GroupInvite,
    GroupReply,
    GroupStart,
    Message,
    Shard,
    encode_message,
)

D = 50
PARAMS = FixedPointParams.for_federation(64, 8.0, 8)


class Net(GroupNet):
    """``n`` nodes of the tests below, and a way to kill one mid all-reduce."""

    def __init__(self, n: int, config: GroupConfig, seed: int = 0) -> None:
        super().__init__(n, config, PARAMS, D, seed=seed)

    def kill_when_sending_a_shard(self, victim: NodeId) -> None:
        """The victim dies as it sends its first shard: mid all-reduce."""

        def kill(sender: NodeId, receiver: NodeId, message: Message) -> bool:
            if isinstance(message, Shard) and sender == victim:
                self.dead.add(victim)
                return True
            return False

        self.drop = kill


def random_models(net: Net, seed: int = 1) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    vectors = {n: rng.uniform(-2, 2, D).astype(np.float32) for n in net.nodes}
    weights = {n: int(rng.integers(1, 500)) for n in net.nodes}
    return vectors, weights


def completed(net: Net) -> dict[NodeId, GroupCompleted]:
    return {n: o for n, outs in net.outcomes.items() for o in outs if isinstance(o, GroupCompleted)}


def blamed_by(net: Net, nodes: list[NodeId]) -> set[NodeId]:
    aborts = [o for n in nodes for o in net.outcomes[n] if isinstance(o, GroupAborted)]
    return {b for o in aborts for b in o.blame}


def test_shard_bounds_cover_the_vector() -> None:
    for length in (1, 7, 51, 1000):
        for k in range(1, 9):
            bounds = shard_bounds(length, k)
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))


def test_three_nodes_form_a_group_and_agree_on_the_weighted_mean() -> None:
    net = Net(3, GroupConfig())
    vectors, weights = random_models(net)
    net.offer(vectors, weights)
    net.run(until=1.0)
    done = completed(net)
    assert set(done) == set(net.nodes), net.outcomes
    expected = sum(weights[n] * vectors[n].astype(np.float64) for n in net.nodes) / sum(
        weights.values()
    )
    means = [d.mean for d in done.values()]
    for mean in means:
        np.testing.assert_array_equal(mean, means[0])  # every member applies the same
        np.testing.assert_allclose(mean, expected, atol=1e-6)
    assert {d.total_weight for d in done.values()} == {sum(weights.values())}
    assert all(node.phase is Phase.IDLE for node in net.nodes.values())


def test_passive_nodes_never_initiate_but_join_an_active_one() -> None:
    net = Net(4, GroupConfig())
    vectors, weights = random_models(net)
    ids = list(net.nodes)
    for node_id in ids[1:]:  # finished nodes lingering: they only answer invites
        net.nodes[node_id].set_contribution(
            vectors[node_id], weights[node_id], 1, net.now, initiate=False
        )
    net.run(until=3.0)
    assert completed(net) == {}  # nobody initiated, even after many poll deadlines
    assert all(net.nodes[n].phase is Phase.READY for n in ids[1:])
    net.nodes[ids[0]].set_contribution(vectors[ids[0]], weights[ids[0]], 1, net.now)
    net.run(until=4.0)
    assert set(completed(net)) == set(ids), net.outcomes


@pytest.mark.parametrize("n", [6, 16])
def test_everyone_initiating_at_once_still_forms_groups(n: int) -> None:
    """No livelock: all nodes become ready at the same instant with zero delay."""
    config = GroupConfig(group_max=4, initiate_delay=0.0, retry_backoff=0.05)
    net = Net(n, config, seed=n)
    vectors, weights = random_models(net)
    net.offer(vectors, weights)
    net.run(until=3.0)
    done = completed(net)
    # every node ends in a completed group of allowed size, or (at most group_min - 1
    # leftovers) is still trying
    assert len(done) >= n - 2, {k.short: v for k, v in net.outcomes.items()}
    for outcome in done.values():
        assert 3 <= len(outcome.members) <= 4


def test_masked_contributions_never_leak_a_single_model() -> None:
    """What one member sends another is uniform-looking, not its encoded model."""
    net = Net(3, GroupConfig())
    vectors, weights = random_models(net)
    shards = []

    def spy(sender: NodeId, receiver: NodeId, message: Message) -> bool:
        if isinstance(message, Shard):
            shards.append(np.frombuffer(message.data, dtype="<u8"))
        return False

    net.drop = spy
    net.offer(vectors, weights)
    net.run(until=1.0)
    assert len(completed(net)) == 3 and shards
    top_bits = np.concatenate(shards) >> np.uint64(60)
    # an unmasked small fixed-point value has its top 4 bits all 0 or all 1
    assert len(np.unique(top_bits)) > 8


def test_member_dying_mid_allreduce_aborts_everyone_without_applying() -> None:
    config = GroupConfig(allreduce_timeout=1.0)
    net = Net(3, config)  # the victim is necessarily in the only possible group
    vectors, weights = random_models(net)
    victim = sorted(net.nodes)[1]
    net.kill_when_sending_a_shard(victim)
    net.offer(vectors, weights)
    net.run(until=3.0)
    survivors = [n for n in net.nodes if n != victim]
    assert not completed(net), "a member applied a sum that still contained masks"
    for n in survivors:
        aborts = [o for o in net.outcomes[n] if isinstance(o, GroupAborted)]
        assert aborts, f"{n.short} neither completed nor aborted"
    assert victim in blamed_by(net, survivors)
    # survivors keep their contribution and are ready to regroup
    assert all(
        net.nodes[n].phase in (Phase.READY, Phase.INITIATING, Phase.PENDING) for n in survivors
    )


def test_regrouping_after_an_abort_excluding_the_failed_member() -> None:
    config = GroupConfig(allreduce_timeout=0.5, group_max=4)
    net = Net(5, config, seed=3)
    vectors, weights = random_models(net)
    victim = sorted(net.nodes)[0]
    net.kill_when_sending_a_shard(victim)
    net.offer(vectors, weights)
    net.run(until=5.0)
    done = completed(net)
    assert victim not in done
    assert len(done) >= 3, net.outcomes
    for outcome in done.values():
        assert victim not in outcome.members


def test_model_mismatch_is_declined() -> None:
    net = Net(3, GroupConfig())
    vectors, weights = random_models(net)
    odd = sorted(net.nodes)[2]
    net.nodes[odd].fingerprint = bytes(32)
    net.offer(vectors, weights)
    net.run(until=2.0)
    invites = net.sent(GroupInvite)
    replies = {(m.group_id, s): (s, r, m) for s, r, m in net.sent(GroupReply)}
    # every invite that crossed the model boundary, either way, was refused for that reason
    crossing = [(s, r, m) for s, r, m in invites if odd in (s, r)]
    assert crossing, "nobody invited across the model boundary: the test saw nothing"
    assert {s for s, _, _ in crossing} >= {odd}, "the odd node never invited"
    for sender, receiver, invite in crossing:
        replier, to, reply = replies[invite.group_id, receiver]  # type: ignore[attr-defined]
        assert (replier, to) == (receiver, sender)
        assert not reply.accept  # type: ignore[attr-defined]
        assert reply.reason.startswith("model mismatch")  # type: ignore[attr-defined]
    # invites between the two compatible nodes were not refused for the model
    same = [(r, m) for s, r, m in invites if odd not in (s, r)]
    assert same
    for receiver, invite in same:
        reply = replies[invite.group_id, receiver][2]  # type: ignore[attr-defined]
        assert not reply.reason.startswith("model mismatch")  # type: ignore[attr-defined]
    # two compatible nodes are not enough for a group of 3: nothing started or completed
    assert not net.sent(GroupStart)
    assert not completed(net)


def test_malformed_shard_aborts_and_blames_the_sender() -> None:
    net = Net(3, GroupConfig())
    vectors, weights = random_models(net)
    liar = sorted(net.nodes)[0]

    def truncate(sender: NodeId, receiver: NodeId, message: Message) -> bool:
        if isinstance(message, Shard) and sender == liar:
            bad = Shard(group_id=message.group_id, index=message.index, data=bytes(8))
            net.queue.append((sender, receiver, encode_message(bad)))
            return True
        return False

    net.drop = truncate
    net.offer(vectors, weights)
    net.run(until=1.0)
    assert not completed(net)
    assert liar in blamed_by(net, list(net.nodes))


@pytest.mark.parametrize("stale", [True, False], ids=["stale", "current"])
def test_stale_abort_of_another_group_is_ignored(stale: bool) -> None:
    """A member mid all-reduce ignores an abort naming another group (a stale one) and its
    group completes; the same abort naming its own group aborts it (the control)."""
    net = Net(3, GroupConfig())
    vectors, weights = random_models(net)
    seen: list[tuple[bytes, Phase, list, Phase]] = []

    def abort_first_sender(sender: NodeId, receiver: NodeId, message: Message) -> bool:
        if isinstance(message, Shard) and not seen:
            # the sender of the first shard is in the all-reduce: a fellow member (the
            # shard's receiver) sends it an abort
            node = net.nodes[sender]
            group_id = bytes(16) if stale else message.group_id
            before = node.phase
            actions = node.receive(receiver, GroupAbort(group_id=group_id, reason="x"), net.now)
            seen.append((message.group_id, before, actions, node.phase))
            net.handle(sender, actions)
        return False

    net.drop = abort_first_sender
    net.offer(vectors, weights)
    net.run(until=2.0)
    [(running, before, actions, after)] = seen
    assert before is Phase.RUNNING
    first_completions = {n: net.completed(n)[0].group_id for n in net.nodes if net.completed(n)}
    if stale:
        assert actions == [] and after is Phase.RUNNING
        assert first_completions == dict.fromkeys(net.nodes, running)
    else:
        assert after is not Phase.RUNNING
        assert any(isinstance(a, GroupAborted) for a in actions)
        assert running not in first_completions.values()  # later groups may complete


def test_busy_node_declines_invites() -> None:
    net = Net(3, GroupConfig())
    a, b = sorted(net.nodes)[:2]
    invite = GroupInvite(
        group_id=bytes(16), priority=1, round=0, fingerprint=FINGERPRINT, model_size=D
    )
    [reply] = net.nodes[a].receive(b, invite, 0.0)  # IDLE: no contribution ready
    assert isinstance(reply, Send) and not reply.message.accept  # type: ignore[attr-defined]


def test_pure_averaging_converges_to_the_sample_weighted_global_mean() -> None:
    """Training off: repeated random groups conserve sum(w x) and sum(w) (push-sum)."""
    n = 12
    config = GroupConfig(group_max=4, initiate_delay=0.02, retry_backoff=0.05)
    net = Net(n, config, seed=7)
    vectors, weights = random_models(net, seed=3)
    target = sum(weights[k] * vectors[k].astype(np.float64) for k in net.nodes) / sum(
        weights.values()
    )
    models = {k: v.copy() for k, v in vectors.items()}
    push = dict(weights)
    start_spread = max(np.abs(m - target).max() for m in models.values())
    for round_ in range(12):
        for k, node in net.nodes.items():
            if node.phase is Phase.IDLE:
                node.set_contribution(models[k], push[k], round_, net.now)
        before = {k: len(v) for k, v in net.outcomes.items()}
        net.run(until=net.now + 1.0)
        for k, outs in net.outcomes.items():
            for outcome in outs[before[k] :]:
                if isinstance(outcome, GroupCompleted):
                    models[k] = outcome.mean
                    push[k] = outcome.share(k)
        # the integer shares conserve the total weight exactly (spec/group.md, "Weights"),
        # and with it the weighted sum, up to the fixed-point rounding of each mean
        assert sum(push.values()) == sum(weights.values())
        weighted = sum(push[k] * models[k].astype(np.float64) for k in net.nodes)
        assert np.allclose(weighted / sum(push.values()), target, atol=1e-5)
    spread = max(np.abs(m - target).max() for m in models.values())
    assert spread < start_spread / 50, (start_spread, spread)
    assert spread < 0.05


def test_pending_member_declines_even_a_higher_priority_invite() -> None:
    """A member that accepted stays with that group (spec/group.md, rule 3): leaving
    for a later, higher-priority invite would abort a group whose start may be on its way."""
    net = Net(3, GroupConfig())
    a, b, c = sorted(net.nodes)
    node = net.nodes[a]
    node.set_contribution(np.zeros(D, np.float32), 1, 0, 0.0)

    def invite(priority: int, group: int) -> GroupInvite:
        return GroupInvite(
            group_id=bytes([group]) * 16,
            priority=priority,
            round=0,
            fingerprint=FINGERPRINT,
            model_size=D,
        )

    [accept] = node.receive(b, invite(1, 1), 0.0)
    assert accept.message.accept and node.phase is Phase.PENDING  # type: ignore[union-attr]
    [decline] = node.receive(c, invite(1 << 63, 2), 0.1)
    assert isinstance(decline, Send) and decline.peer == c
    assert not decline.message.accept  # type: ignore[attr-defined]
    assert node.phase is Phase.PENDING and node.busy_with() == {b}


def test_a_start_that_arrives_after_the_pending_timeout_is_refused_at_once() -> None:
    """spec/group.md section 3: a node not pending for a group refuses its GroupStart with
    GroupAbort to every listed member, also when its own wait for that start has timed out
    (it is READY again), so the others abort now rather than at the all-reduce deadline."""
    config = GroupConfig(allreduce_timeout=30.0)
    net = Net(3, config)
    vectors, weights = random_models(net)
    late = sorted(net.nodes)[2]
    held: list[tuple[NodeId, NodeId, Message]] = []

    def hold_start(sender: NodeId, receiver: NodeId, message: Message) -> bool:
        if isinstance(message, GroupStart) and receiver == late and not held:
            held.append((sender, receiver, message))
            return True
        return False

    net.drop = hold_start
    net.offer(vectors, weights)
    pending_wait = config.invite_timeout + config.start_timeout
    net.run(until=pending_wait + 0.5)
    assert held, "the late member was never sent a start"
    assert net.nodes[late].phase is not Phase.PENDING  # its wait expired
    others = [n for n in net.nodes if n != late]
    # before the late start arrives, the other members are still in the all-reduce
    assert all(not blamed_by(net, [n]) and not completed(net) for n in others)
    sender, receiver, start = held[0]
    net.queue.append((sender, receiver, encode_message(start)))
    net.run(until=net.now + 0.1)
    refusals = [(s, r) for s, r, m in net.sent(GroupAbort) if s == late]
    assert {r for _, r in refusals} == set(others), refusals
    for n in others:
        aborted = [o for o in net.outcomes[n] if isinstance(o, GroupAborted)]
        assert aborted and aborted[0].formed, f"{n.short} still waits for the late member"
    assert not completed(net)


def _invite(group: int, priority: int = 1) -> GroupInvite:
    return GroupInvite(
        group_id=bytes([group]) * 16,
        priority=priority,
        round=0,
        fingerprint=FINGERPRINT,
        model_size=D,
    )


def test_a_cancelled_formation_aborts_only_the_invitees_that_accepted() -> None:
    """spec/group.md section 3: GroupAbort goes to the invitees whose acceptance arrived;
    an acceptance that arrives after the cancel is answered with GroupAbort, a decline
    with nothing."""
    config = GroupConfig(group_max=4, initiate_delay=0.0)
    net = Net(5, config)
    a, b, c, d, e = sorted(net.nodes)
    node = net.nodes[a]
    node.set_contribution(np.zeros(D, np.float32), 1, 0, 0.0)
    invites = node.poll(0.0, [b, c, d])
    assert node.phase is Phase.INITIATING and {s.peer for s in invites} == {b, c, d}  # type: ignore[union-attr]
    group_id = invites[0].message.group_id  # type: ignore[union-attr]
    helpers = {p: net.nodes[p] for p in (b, c, d)}
    for p in (b, c, d):
        helpers[p].set_contribution(np.zeros(D, np.float32), 1, 0, 0.0)
    [accept_b] = helpers[b].receive(a, invites[0].message, 0.01)  # type: ignore[union-attr]
    [accept_d] = helpers[d].receive(a, invites[2].message, 0.01)  # type: ignore[union-attr]
    assert node.receive(b, accept_b.message, 0.02) == []  # type: ignore[union-attr]
    # a higher-priority invite preempts the formation before c and d have answered
    actions = node.receive(e, _invite(9, priority=(1 << 64) - 1), 0.03)
    aborts = [s for s in actions if isinstance(s, Send) and isinstance(s.message, GroupAbort)]
    assert [s.peer for s in aborts] == [b]
    assert aborts[0].message.group_id == group_id  # type: ignore[attr-defined]
    # d's acceptance was on its way: it gets a GroupAbort when it arrives, and leaves
    [answer] = node.receive(d, accept_d.message, 0.04)  # type: ignore[union-attr]
    assert isinstance(answer, Send) and answer.peer == d
    assert isinstance(answer.message, GroupAbort) and answer.message.group_id == group_id
    assert helpers[d].phase is Phase.PENDING
    helpers[d].receive(a, answer.message, 0.05)
    assert helpers[d].phase is Phase.READY
    # a decline that arrives late needs no answer
    decline = GroupReply(
        group_id=group_id,
        accept=False,
        reason="busy",
        mask_key=b"",
        key_signature=b"",
        listen_port=7000,
    )
    assert node.receive(c, decline, 0.06) == []


def test_a_node_joins_no_group_with_a_node_it_excludes() -> None:
    """spec/group.md section 6: exclusion holds for groups a node joins. It declines an
    invite from a node it excludes and refuses a start that lists one."""
    net = Net(4, GroupConfig(group_max=4, initiate_delay=0.0))
    a, b, c, d = sorted(net.nodes)
    net.nodes[a]._excluded = lambda peer, now: peer == b  # type: ignore[method-assign]
    node = net.nodes[a]
    vectors, weights = random_models(net)
    node.set_contribution(vectors[a], weights[a], 0, 0.0, initiate=False)
    [reply] = node.receive(b, _invite(1), 0.0)
    assert isinstance(reply, Send) and not reply.message.accept  # type: ignore[attr-defined]
    assert "excluded" in reply.message.reason  # type: ignore[attr-defined]
    assert node.phase is Phase.READY
    # c invites a, b and d; a accepts (it cannot know who else is invited) and refuses
    # the start once it sees b among the members
    for p in (b, d):
        net.nodes[p].set_contribution(vectors[p], weights[p], 0, 0.0, initiate=False)
    net.nodes[c].set_contribution(vectors[c], weights[c], 0, 0.0)
    net.run(until=0.5)
    start = next(m for s, r, m in net.sent(GroupStart) if r == a)
    assert b in {NodeId.from_public_key(m.identity_key) for m in start.members}  # type: ignore[attr-defined]
    refusals = [
        (r, m)
        for s, r, m in net.sent(GroupAbort)
        if s == a and m.group_id == start.group_id  # type: ignore[attr-defined]
    ]
    assert {r for r, _ in refusals} == {b, c, d}
    assert all("excluded" in m.reason for _, m in refusals)  # type: ignore[attr-defined]
    assert not completed(net)
