"""Moshpit grid grouping: exact global mean after ``d`` rounds; random regrouping decays.

Two levels. The sans-IO group protocol (:class:`p2pfed.group.GroupProtocol` with a
:class:`~p2pfed.group.GridPosition`) wired together in memory checks the rules of
spec/group.md "Grid grouping": only the lowest mate initiates, only whole lines start,
non-mates are declined, and a stranded node falls back to random grouping. Then whole
simulated deployments (the real Node, Noise and masking in simnet, training off) check the
protocol property of issue 5: a full grid of ``side ** d`` nodes holds the exact global
mean (up to float32 rounding of the model) after exactly ``d`` rounds and not before,
while random regrouping only shrinks the consensus distance exponentially.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from support.group_net import FINGERPRINT, GroupNet

from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import GroupConfig
from p2pfed.identity import NodeId
from p2pfed.messages import GroupInvite, GroupReply
from simnet.checks import (
    consensus_decay,
    grid_rounds_to_exact_mean,
    random_regrouping_factor,
    weighted_mean,
)
from simnet.scenario import load_scenario, parse_scenario
from simnet.simulation import run_simulation
from simnet.topology import grid_coordinate, grid_mates

D = 16
SCENARIOS = Path(__file__).resolve().parent.parent / "simnet" / "scenarios"


# -- the sans-IO protocol ------------------------------------------------------------------


class GridNet(GroupNet):
    """``side ** dims`` grid nodes, all connected."""

    def __init__(self, side: int, dims: int, config: GroupConfig, seed: int = 0) -> None:
        params = FixedPointParams.for_federation(64, 8.0, config.group_max)
        super().__init__(side**dims, config, params, D, seed=seed, grid=(side, dims))

    def line(self, node_id: NodeId, round_: int) -> set[NodeId]:
        """The node's grid line of ``round_``: the nodes differing only in that axis."""
        axis = round_ % len(self.coordinate[node_id])
        mine = self.coordinate[node_id]
        return {
            other
            for other, c in self.coordinate.items()
            if all(a == b for i, (a, b) in enumerate(zip(c, mine, strict=True)) if i != axis)
        }


CONFIG = GroupConfig(group_min=3, group_max=4)


def test_grid_lines_reach_the_exact_weighted_mean_after_d_rounds() -> None:
    side, dims = 3, 2
    net = GridNet(side, dims, CONFIG, seed=1)
    rng = np.random.default_rng(2)
    models = {n: rng.uniform(-2, 2, D).astype(np.float32) for n in net.nodes}
    # weights a line can split evenly, so the push-sum weights stay integers
    weights = {n: 3 * int(rng.integers(1, 50)) for n in net.nodes}
    target = weighted_mean(list(models.values()), [weights[n] for n in models])
    for round_ in range(dims):
        net.offer(models, weights, round_)
        net.run(net.now + 3.0)
        for node_id in net.nodes:
            done = net.completed(node_id)
            assert len(done) == round_ + 1, f"{node_id.short} completed {len(done)} groups"
            assert set(done[-1].members) == net.line(node_id, round_)
            models[node_id] = done[-1].mean
            weights[node_id] = done[-1].share(node_id)
        spread = max(float(np.abs(m - target).max()) for m in models.values())
        if round_ < dims - 1:
            assert spread > 0.01  # one line averaged: not yet the global mean
        else:
            assert spread < 1e-6  # float32 rounding of the mean
    # one initiator per line and round, the lowest node id of the line
    for sender, _, invite in net.sent(GroupInvite):
        assert sender == min(net.line(sender, invite.round))  # type: ignore[attr-defined]


def test_invites_from_outside_the_grid_line_are_declined() -> None:
    net = GridNet(3, 2, CONFIG, seed=3)
    ids = list(net.nodes)
    a = ids[0]
    row_mate = next(p for p in ids if p != a and p in net.line(a, 0))
    other = next(p for p in ids if p not in net.line(a, 0))
    node = net.nodes[a]
    node.set_contribution(np.zeros(D, np.float32), 1, 0, 0.0)

    def invite(round_: int) -> GroupInvite:
        return GroupInvite(
            group_id=bytes(16), priority=1, round=round_, fingerprint=FINGERPRINT, model_size=D
        )

    for peer, round_ in ((other, 0), (row_mate, 1)):  # not a mate; a mate of another round
        [reply] = [x.message for x in node.receive(peer, invite(round_), 0.01)]
        assert isinstance(reply, GroupReply) and not reply.accept
        assert "grid group of round 0" in reply.reason
    [reply] = [x.message for x in node.receive(row_mate, invite(0), 0.02)]
    assert isinstance(reply, GroupReply) and reply.accept


def test_a_missing_mate_strands_its_lines_until_random_grouping_takes_over() -> None:
    side, dims = 4, 2
    net = GridNet(side, dims, CONFIG, seed=5)
    victim = next(iter(net.nodes))
    net.dead.add(victim)
    stranded = net.line(victim, 0) - {victim}  # its row: three nodes
    rng = np.random.default_rng(6)
    models = {n: rng.uniform(-2, 2, D).astype(np.float32) for n in net.nodes}
    net.offer(models, dict.fromkeys(net.nodes, 4), 0)
    fallback = CONFIG.invite_timeout + CONFIG.start_timeout
    net.run(fallback - 0.05)
    for node_id in set(net.nodes) - {victim}:
        groups = net.completed(node_id)
        if node_id in stranded:
            assert not groups  # no partial line: it would lose the exact mean
        else:
            assert len(groups) == 1 and set(groups[0].members) == net.line(node_id, 0)
    net.run(fallback + 10.0)
    # random grouping takes over: the three stranded row mates (everyone else is idle)
    # find each other as a random group of three, which is no grid line
    for node_id in stranded:
        [group] = net.completed(node_id)
        assert set(group.members) == stranded


# -- whole simulated deployments -----------------------------------------------------------


def grid_scenario(side: int, dims: int, rounds: int, grouping: str = "grid", seed: int = 1) -> str:
    grid = f"grid_side = {side}\ngrid_dims = {dims}" if grouping == "grid" else ""
    return f"""
name = "grid-test"
seed = {seed}
rounds = {rounds}
duration = 600
[nodes]
count = {side**dims}
[link]
latency_ms = 5
jitter_ms = 2
[task]
name = "tiny"
training = false
[task.settings]
params = 24
samples = 12
[protocol]
group_min = 3
group_max = {side}
grouping = "{grouping}"
{grid}
"""


@pytest.mark.parametrize(("side", "dims"), [(3, 3), (4, 2)])
def test_a_full_grid_holds_the_exact_mean_after_exactly_d_rounds(
    side: int, dims: int, tmp_path: Path
) -> None:
    n = side**dims
    d = grid_rounds_to_exact_mean(n, side)
    assert d == dims
    result = run_simulation(parse_scenario(grid_scenario(side, dims, d + 1)), tmp_path)
    assert result.summary["completed"] and not result.audit.failures
    rows = {row["round"]: row for row in result.rows}
    assert set(rows) == set(range(1, d + 2)), "every node does one group per round"
    first = rows[1]["target_distance_max"]
    assert first > 0.5
    # after d - 1 rounds, some node still holds only a partial mean ...
    assert rows[d - 1]["target_distance_max"] > 0.01 * first
    assert rows[d - 1]["consensus_max"] > 0.01 * first
    # ... after d rounds every node holds the global mean: equal samples, so the
    # push-sum weights stay exact integers and only float32 rounding of the model remains
    for r in (d, d + 1):
        assert rows[r]["target_distance_max"] < 1e-6
        assert rows[r]["consensus_max"] < 1e-6
    # every group was a full line: d rounds of n / side groups
    assert rows[d]["groups_completed"] >= d * n // side
    assert rows[d]["groups_aborted"] == 0


def test_a_crashed_grid_node_does_not_stall_the_others(tmp_path: Path) -> None:
    # node 13, the centre of the 3 x 3 x 3 grid, crashes before its first group: its
    # line mates of every round fall back to random grouping and everyone progresses
    crash = '[[events]]\nat = 0.0\naction = "crash"\nnodes = [13]\n'
    result = run_simulation(parse_scenario(grid_scenario(3, 3, 4) + crash), tmp_path)
    assert result.summary["completed"] and not result.audit.failures
    rows = result.rows
    assert [row["live_nodes"] for row in rows] == [26] * len(rows)
    assert rows[-1]["round"] >= 4
    assert rows[-1]["consensus_max"] < 0.5 * rows[0]["consensus_max"]
    assert result.summary["all_models_finite"]


def test_random_regrouping_shrinks_the_distance_exponentially(tmp_path: Path) -> None:
    rounds = 10
    result = run_simulation(
        parse_scenario(grid_scenario(3, 3, rounds, grouping="random", seed=2)), tmp_path
    )
    assert result.summary["completed"] and not result.audit.failures
    rows = [row for row in result.rows if row["round"] <= rounds]
    factor, r2 = consensus_decay(
        [row["round"] for row in rows], [row["consensus_mean"] for row in rows]
    )
    # groups of 3: theory says the distance shrinks by 1 / sqrt(3) = 0.58 per round;
    # generous bounds for asynchrony and small n
    assert abs(factor - random_regrouping_factor(3)) < 0.25, f"shrinks by {factor:.2f}/round"
    assert r2 > 0.8, f"log distance is not linear in the round (r^2 = {r2:.2f})"
    # and unlike the grid, random groups are not exact after d = 3 rounds
    assert rows[2]["consensus_max"] > 1e-3


def test_grid_mates_and_coordinates() -> None:
    assert grid_coordinate(728, 9, 3) == (8, 8, 8)
    mates = grid_mates(0, 9, 3)
    assert len(mates) == 3 * 8 and 1 in mates and 9 in mates and 81 in mates and 10 not in mates
    with pytest.raises(ValueError):
        grid_coordinate(27, 3, 3)


def test_the_moshpit_scenario_is_a_full_grid_of_729() -> None:
    scenario = load_scenario(SCENARIOS / "moshpit_grid.toml")
    protocol = scenario.protocol
    assert protocol.grouping == "grid"
    assert protocol.grid_side**protocol.grid_dims == scenario.nodes.count == 729
    assert grid_rounds_to_exact_mean(729, protocol.grid_side) == protocol.grid_dims == 3
    assert not scenario.task.training


def test_grid_scenarios_are_validated() -> None:
    with pytest.raises(Exception, match="count = 27"):
        parse_scenario(grid_scenario(3, 3, 3).replace("count = 27", "count = 26"))
    with pytest.raises(Exception, match="grid_side"):
        parse_scenario(grid_scenario(3, 3, 3).replace("grid_side = 3", "grid_side = 5"))
    with pytest.raises(Exception, match="grouping"):
        parse_scenario(grid_scenario(3, 3, 3).replace('grouping = "grid"', 'grouping = "x"'))


def test_consensus_decay_fit_and_theory() -> None:
    factor, r2 = consensus_decay(range(1, 8), [3.0 * 0.6**r for r in range(1, 8)])
    assert math.isclose(factor, 0.6) and math.isclose(r2, 1.0)
    noisy = [3.0 * 0.6**r * (1.3 if r % 2 else 0.7) for r in range(1, 8)]
    assert consensus_decay(range(1, 8), noisy)[1] < 0.99
    assert math.isclose(random_regrouping_factor(9), 1 / 3)
    with pytest.raises(ValueError):
        consensus_decay([1, 2, 3], [1.0, 0.0, 0.5])
