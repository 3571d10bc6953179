"""Exact rounds and FedAvg weighting (spec/group.md, "Exact rounds" and "Weights").

Three levels: the pure plan / index / class arithmetic of :mod:`p2pfed.exact_rounds`;
whole simulated federations of real nodes (simnet: real Node, Noise, masking) that must
hold the exact sample-weighted mean after one round, where random groups do not; and a
training federation whose every node must follow a framework-free FedAvg replay, which
fails if weights decay to equal (the old ``W / k`` rule) or the average is not exact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from p2pfed.config import NodeConfig
from p2pfed.exact_rounds import (
    Position,
    class_chunks,
    member_indices,
    plan_sizes,
    round_plan,
    sitting_out,
)
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.identity import NodeIdentity
from p2pfed.network import TcpNetwork
from p2pfed.node import Node, NodeOptions
from simnet.scenario import parse_scenario
from simnet.simulation import run_simulation
from simnet.tasks import samples_of, target_of, task

# -- the arithmetic -----------------------------------------------------------------------


@given(st.integers(1, 5000), st.integers(3, 6), st.integers(0, 8))
def test_a_plan_multiplies_to_n_with_allowed_sizes_in_the_fewest_steps(
    n: int, low: int, extra: int
) -> None:
    high = low + extra
    sizes = plan_sizes(n, group_min=low, group_max=high)
    if not sizes:
        # no factorisation of n into allowed sizes, with any number of steps
        assert n < low or not _factorisable(n, low, high)
        return
    assert math.prod(sizes) == n
    assert all(low <= m <= high for m in sizes)
    assert list(sizes) == sorted(sizes, reverse=True)
    assert not any(_factorisable(n, low, high, steps) for steps in range(1, len(sizes)))


def _factorisable(n: int, low: int, high: int, steps: int | None = None) -> bool:
    """Whether ``n`` is a product of ``steps`` (any number if None) factors in [low, high]."""
    if steps == 1 or (steps is None and low <= n <= high):
        return low <= n <= high
    if steps is not None and steps < 1:
        return False
    rest = None if steps is None else steps - 1
    return any(n % m == 0 and _factorisable(n // m, low, high, rest) for m in range(low, high + 1))


def test_plans_for_common_sizes() -> None:
    assert plan_sizes(16, group_min=3, group_max=8) == (4, 4)
    assert plan_sizes(8, group_min=3, group_max=8) == (8,)
    assert plan_sizes(27, group_min=3, group_max=4) == (3, 3, 3)
    assert plan_sizes(8, group_min=3, group_max=4) == ()  # 4 x 2: a group of 2 is not allowed
    assert plan_sizes(11, group_min=3, group_max=8) == ()


@given(st.binary(min_size=16, max_size=16), st.integers(3, 16))
def test_member_indices_are_a_permutation_every_member_computes_alike(
    group_id: bytes, k: int
) -> None:
    members = [bytes([i]) * 32 for i in range(k)]
    indices = member_indices(group_id, members)
    assert sorted(indices.values()) == list(range(k))
    assert member_indices(group_id, list(reversed(members))) == indices


def test_the_nodes_that_sit_out_change_from_round_to_round() -> None:
    members = [bytes([i]) * 32 for i in range(11)]
    chosen = [frozenset(sitting_out(r, members, 2)) for r in range(20)]
    assert all(len(c) == 2 and c <= set(members) for c in chosen)
    assert len(set(chosen)) > 10  # a rotation, not the same two every round
    assert sitting_out(3, list(reversed(members)), 2) == chosen[3]  # order does not matter


def test_a_class_is_cut_into_runs_and_counts_members_that_moved_on() -> None:
    assert class_chunks(list(range(8)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    here = Position(5, 1, (2,), 16)
    assert Position(5, 1, (2,), 16).within(here)
    assert Position(5, 2, (2, 3), 16).within(here)  # stood here, then moved on
    assert not Position(5, 1, (3,), 16).within(here)  # another class
    assert not Position(6, 0, (), 16).within(here)  # the next round
    assert not Position(5, 1, (2,), 15).within(here)  # another count of nodes
    assert here.expected_class_size(16, (4, 4)) == 4


# -- whole federations in simnet -----------------------------------------------------------


def _scenario(count: int, group_max: int, grouping: str, rounds: int, **task: object) -> str:
    settings = {"params": 50, "samples_min": 10, "samples_max": 300, **task}
    table = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in settings.items())
    training = "true" if task.get("target_spread") is not None else "false"
    return f"""
name = "exact-{count}-{grouping}"
seed = 3
rounds = {rounds}
[nodes]
count = {count}
lan_size = {count}
[topology]
kind = "complete"
[link]
latency_ms = 2
jitter_ms = 1
bandwidth_mbit = 100
[task]
name = "tiny"
training = {training}
[task.settings]
{table}
[protocol]
group_min = 3
group_max = {group_max}
grouping = "{grouping}"
"""


@pytest.mark.parametrize(("count", "group_max"), [(16, 4), (27, 4), (12, 4)])
def test_one_exact_round_holds_the_sample_weighted_mean(
    tmp_path: Path, count: int, group_max: int
) -> None:
    """Pure averaging (training off): after one round every node holds the weighted mean."""
    scenario = parse_scenario(_scenario(count, group_max, "exact", 2))
    result = run_simulation(scenario, tmp_path)
    first = result.rows[0]
    assert first["round"] == 1
    assert first["target_distance_max"] < 1e-6  # float32 rounding of values of size ~1
    assert first["consensus_max"] < 1e-6
    assert first["groups_aborted"] == 0
    # the plan's groups and no more: (16 / 4) * 2 steps, 9 * 3, 3 + 4
    sizes = plan_sizes(count, group_min=3, group_max=group_max)
    assert first["groups_completed"] == sum(count // m for m in sizes)


def test_random_groups_are_not_exact_after_one_round(tmp_path: Path) -> None:
    """The contrast that shows the exact-round test can fail."""
    scenario = parse_scenario(_scenario(16, 4, "random", 1))
    result = run_simulation(scenario, tmp_path)
    assert result.rows[0]["target_distance_max"] > 1e-2


def test_training_follows_a_framework_free_fedavg_replay(tmp_path: Path) -> None:
    """Training on, node-specific targets and sample counts: every node's model after each
    round equals sample-weighted FedAvg computed directly (each node trains from the last
    average, the average weighs each trained model by its sample count)."""
    count, rounds = 16, 4
    settings = {"target_spread": 2.0, "seed": 7}
    scenario = parse_scenario(_scenario(count, 4, "exact", rounds, **settings))
    result = run_simulation(scenario, tmp_path)
    # the replay: the same initial models, targets and weights, in float64
    configs = [{**scenario.task.settings, "node_index": i} for i in range(count)]
    initial = [_vector(task.build_model(c)) for c in configs]
    weights = np.array([samples_of(c) for c in configs], np.float64)
    targets = np.array([target_of(c) for c in configs], np.float64)

    def train(x: np.ndarray, i: int) -> np.ndarray:
        return 0.5 * x + 0.5 * targets[i]

    models = [train(initial[i], i) for i in range(count)]
    expected = []
    for _ in range(rounds):
        mean = sum(w * m for w, m in zip(weights, models, strict=True)) / weights.sum()
        expected.append(mean)
        models = [train(mean, i) for i in range(count)]
    final = [node.model for node in result.nodes if node.model is not None]
    assert len(final) == count
    for model in final:
        assert np.abs(model - expected[-1]).max() < 1e-5
    # equal weights would give another fixed point: the test can tell them apart
    unweighted = targets.mean()
    assert abs(float(np.mean(expected[-1])) - unweighted) > 1e-2


def test_a_crash_in_the_middle_of_a_round_degrades_and_the_rest_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node crashing at step 1 (of round 2: the rounds of this scenario take about 33
    simulated ms from t = 1.29 s) strands its class until the fallback; the round completes
    among the rest, says it was not exact, and the 15 left (5 x 3) are exact again."""
    caplog.set_level(logging.WARNING, logger="p2pfed.node")
    text = (
        _scenario(16, 5, "exact", 6)
        + """
[[events]]
at = 1.31
action = "crash"
nodes = [5]
"""
    )
    result = run_simulation(parse_scenario(text), tmp_path)
    assert result.rows[-1]["round"] >= 6
    assert any("was not exact" in r.getMessage() for r in caplog.records)
    assert result.rows[-1]["consensus_max"] < 1e-6
    assert result.rows[-1]["live_nodes"] == 15


def _loopback_node(
    node_dir: Path, federation: Federation, bootstrap_port: int, options: NodeOptions
) -> Node:
    """A node of simnet's tiny task on real loopback TCP, bootstrapping from
    ``bootstrap_port`` (0: none, the first node)."""
    node_dir.mkdir()
    return Node(
        identity=NodeIdentity.generate(),
        federation=federation,
        config=NodeConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            mdns=False,
            bootstrap=(f"127.0.0.1:{bootstrap_port}",) if bootstrap_port else (),
        ),
        node_dir=node_dir,
        network=TcpNetwork(mdns=False),
        task=task,
        options=options,
    )


def _vector(model: object) -> np.ndarray:
    import torch

    assert isinstance(model, torch.nn.Module)
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()]).astype(
        np.float64
    )


@pytest.mark.parametrize(
    ("optimizer", "settings"),
    [
        ("fedavg", {}),
        ("fedavgm", {"server_lr": 1.0, "server_momentum": 0.9}),
        ("fedadam", {"server_lr": 0.05, "server_momentum": 0.9, "server_beta2": 0.99}),
    ],
)
async def test_real_nodes_follow_a_framework_free_replay(
    tmp_path: Path, optimizer: str, settings: dict[str, float]
) -> None:
    """The same task on 6 real nodes (loopback TCP, Noise, one trio process) gives, round
    for round, the model of a framework-free replay: sample-weighted FedAvg (what simnet
    matches above, so a user measures in simnet what deployed nodes compute), and the same
    with server momentum or Adam applied identically in every node (Reddi et al. 2021)."""
    count, rounds = 6, 4
    # scale 0: every node starts from the same (zero) model, as a real task's nodes do
    task_settings = {"params": 20, "samples_min": 10, "samples_max": 300, "target_spread": 2.0}
    configs = [{**task_settings, "scale": 0.0, "seed": 7, "node_index": i} for i in range(count)]
    federation = Federation.new("replay")
    params = ProtocolParams(dp_enabled=False, group_max=8, server_optimizer=optimizer, **settings)
    federation = dataclasses.replace(federation, params=params)
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:
        port = 0
        for i in range(count):
            options = NodeOptions(max_rounds=rounds, task_config=configs[i])
            node = _loopback_node(tmp_path / f"n{i}", federation, port, options)
            listening = await nursery.start(node.run)
            port = port or listening
            nodes.append(node)
        with trio.fail_after(60):
            while not all(n.finished.is_set() for n in nodes):
                await trio.sleep(0.05)
    weights = np.array([samples_of(c) for c in configs], np.float64)
    targets = np.array([target_of(c) for c in configs], np.float64)
    x = _vector(task.build_model(configs[0]))
    assert not x.any()
    m, v = np.zeros_like(x), np.zeros_like(x)
    lr, beta = params.server_lr, params.server_momentum
    for _ in range(rounds):
        trained = [0.5 * x + 0.5 * targets[i] for i in range(count)]
        average = sum(w * t for w, t in zip(weights, trained, strict=True)) / weights.sum()
        d = average - x
        if optimizer == "fedavgm":
            m = beta * m + d
            x = x + lr * m
        elif optimizer == "fedadam":
            m = beta * m + (1 - beta) * d
            v = params.server_beta2 * v + (1 - params.server_beta2) * d * d
            x = x + lr * m / (np.sqrt(v) + params.server_tau)
        else:
            x = average
    for node in nodes:
        assert node.round == rounds and node.model is not None
        assert np.abs(node.model - x).max() < 1e-4, optimizer
    assert all(np.array_equal(n.model, nodes[0].model) for n in nodes)  # bit-identical


def test_a_count_without_a_plan_sits_a_few_nodes_out_in_rotation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """11 nodes (prime, above group_max): 9 take part in groups of 3, 2 sit each round out
    and adopt its average, and every node ends each round with the same model."""
    caplog.set_level(logging.INFO, logger="p2pfed.node")
    assert round_plan(11, group_min=3, group_max=8).participants == 9
    scenario = parse_scenario(_scenario(11, 8, "exact", 4, target_spread=2.0, seed=7))
    result = run_simulation(scenario, tmp_path)
    models = [node.model for node in result.nodes if node.model is not None]
    assert len(models) == 11
    assert max(float(np.abs(m - models[0]).max()) for m in models) < 1e-6
    sat = [r for r in caplog.records if r.getMessage().startswith("sat round")]
    assert all("adopted its average" in r.getMessage() for r in sat)
    assert len(sat) >= 2 * 3  # two nodes in each of (at least) rounds 1 to 3
    exact = [r for r in caplog.records if "was exact over 9 of 11 nodes" in r.getMessage()]
    assert exact


async def test_the_first_round_waits_for_min_nodes(tmp_path: Path) -> None:
    """With min_nodes = 4, three nodes never start round 0 among themselves; once the
    fourth arrives, all four train round 0 and average it together (nobody catches up by
    adopting an average it did not contribute to)."""
    federation = dataclasses.replace(
        Federation.new("min-nodes"), params=ProtocolParams(dp_enabled=False, min_nodes=4)
    )
    settings = {"params": 8, "samples": 10}

    def make(i: int, port: int) -> Node:
        options = NodeOptions(max_rounds=2, task_config={**settings, "node_index": i})
        return _loopback_node(tmp_path / f"n{i}", federation, port, options)

    async with trio.open_nursery() as nursery:
        first = make(0, 0)
        port = await nursery.start(first.run)
        nodes = [first]
        for i in (1, 2):
            nodes.append(make(i, port))
            await nursery.start(nodes[-1].run)
        await trio.sleep(4.0)  # three nodes, connected and settled: still no round
        assert all(n.round == 0 and n.groups_completed == 0 for n in nodes)
        nodes.append(make(3, port))
        await nursery.start(nodes[-1].run)
        with trio.fail_after(30):
            while not all(n.finished.is_set() for n in nodes):
                await trio.sleep(0.05)
    assert all(n.round == 2 and n.local_rounds == 2 for n in nodes)


def test_an_exact_round_ends_with_the_one_big_group_sum_bit_for_bit(tmp_path: Path) -> None:
    """After step 0 each member sends its group's integer ring sum on unchanged (spec/
    group.md, "Exact rounds"), so the last step adds up every node's own encoding: all 16
    nodes end with exactly what one group of all 16 would give, the correctly rounded
    weighted mean of the initial models (their encodings are exact here: every value is a
    multiple of 2**-scale_bits). Re-encoding each block's float32 mean instead (the old
    rule) rounds to float32 once more in the middle and misses it in some coordinates."""
    from p2pfed.fixedpoint import FixedPointParams

    scenario = parse_scenario(_scenario(16, 4, "exact", 1))
    result = run_simulation(scenario, tmp_path)
    configs = [node.options.task_config for node in result.nodes]  # seeded as each node was
    initial = [_vector(task.build_model(c)).astype(np.float32) for c in configs]
    weights = [samples_of(c) for c in configs]
    scale = 2 ** FixedPointParams.for_federation(64, 8.0, 4).scale_bits
    encoded = [[float(v) * scale for v in x] for x in initial]
    assert all(q == int(q) for x in encoded for q in x)  # the premise: exact encodings
    total_weight = sum(weights)
    expected = np.array(
        [
            sum(w * int(x[j]) for w, x in zip(weights, encoded, strict=True))
            / (scale * total_weight)
            for j in range(len(initial[0]))
        ],
        np.float32,
    )
    models = [node.model for node in result.nodes if node.model is not None]
    assert len(models) == 16
    for model in models:
        assert model.tobytes() == expected.tobytes()


def test_a_carried_sum_must_be_the_ring_words_of_its_weight() -> None:
    from p2pfed.fixedpoint import FixedPointParams
    from p2pfed.group import GroupConfig, GroupProtocol

    identity = NodeIdentity.generate()
    params = FixedPointParams.for_federation(64, 8.0, 4)
    protocol = GroupProtocol(
        identity,
        GroupConfig(group_min=3, group_max=4),
        params,
        fingerprint=b"f" * 32,
        model_size=3,
        listen_port=7447,
        exact=True,
    )
    vector = np.zeros(3, np.float32)
    good = np.array([1, 2, 3, 7], np.uint64)
    protocol.set_contribution(vector, 7, 0, 0.0, carried=good)
    for bad, weight in [
        (good, 8),  # the weight word must be the weight
        (good[:3], 7),  # one word per coordinate, then the weight
        (good.astype(np.int64), 7),  # ring words
        (np.array([0, 0, 0, params.max_weight + 1], np.uint64), params.max_weight + 1),
    ]:
        with pytest.raises(ValueError, match="carried sum"):
            protocol.set_contribution(vector, weight, 0, 0.0, carried=bad)
