"""The convergence benchmark's yardsticks: the FedAvg / FedAvgM / FedAdam reference, the
digits-CNN task it replays, and the benchmark's bookkeeping (bench/convergence.py), on a
few clients and rounds (the 16-process run itself is too slow for the suite)."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# bench/ is a directory of the repository, not an installed package: `python -m pytest`
# finds it from the working directory, a bare `pytest` does not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import convergence
from bench._fedsim import (
    History,
    RandomGroups,
    ServerOptimizer,
    ServerState,
    Setup,
    client_data,
    evaluate,
    initial_model,
    local_update,
    random_replay,
    replay,
    round_schedule,
    server_step,
    weighted_mean,
)
from p2pfed.errors import ConfigError
from p2pfed.model_vector import model_fingerprint
from p2pfed.task import RoundContext, Task
from p2pfed.tasks.digits_cnn import batch_seed, node_parts, task

SETTINGS = {"lr": 0.1, "batch_size": 16}


def small(num_nodes: int = 3, rounds: int = 1, **settings: object) -> Setup:
    return Setup(num_nodes=num_nodes, rounds=rounds, seed=5, task_settings={**SETTINGS, **settings})


# -- the reference -------------------------------------------------------------------------


def test_fedavg_one_round_equals_a_hand_computation() -> None:
    setup = small(num_nodes=3, rounds=1)
    datasets = client_data(setup)
    x0 = initial_model(setup)
    trained = [local_update(setup, d, k, 0, x0) for k, d in enumerate(datasets)]
    n = [d.num_train for d in datasets]
    assert len(set(n)) > 1  # unequal weights, so a plain mean would be wrong
    by_hand = (
        n[0] * trained[0].astype(np.float64)
        + n[1] * trained[1].astype(np.float64)
        + n[2] * trained[2].astype(np.float64)
    ) / (n[0] + n[1] + n[2])
    history = replay(setup, ServerOptimizer("fedavg"), datasets=datasets)
    assert history.final_model is not None
    np.testing.assert_allclose(history.final_model, by_hand, rtol=0, atol=1e-7)
    assert not np.allclose(history.final_model, np.mean(trained, axis=0), atol=1e-6)
    assert history.accuracy == [
        pytest.approx(evaluate(setup, datasets[0], by_hand.astype(np.float32))["accuracy"])
    ]


def test_server_optimisers_follow_reddi_et_al() -> None:
    assert weighted_mean([np.array([1.0, 0.0]), np.array([4.0, 3.0])], [2, 1]).tolist() == [2, 1]
    x = np.array([1.0, -1.0], np.float32)
    mean = np.array([2.0, -3.0], np.float32)  # delta = (1, -2)
    momentum = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)
    state = ServerState()
    x1 = server_step(momentum, state, x, mean)  # m = delta
    np.testing.assert_allclose(x1, [1.5, -2.0])
    x2 = server_step(momentum, state, x1, x1 + 1)  # m = 0.9 * (1, -2) + 1
    np.testing.assert_allclose(x2, x1 + 0.5 * np.array([1.9, -0.8]), rtol=1e-6)
    adam = ServerOptimizer("fedadam", lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    state = ServerState()
    m = 0.1 * np.array([1.0, -2.0])
    v = 0.01 * np.array([1.0, 4.0])
    np.testing.assert_allclose(
        server_step(adam, state, x, mean), x + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-6
    )
    assert server_step(ServerOptimizer("fedavg"), ServerState(), x, mean).tolist() == [2, -3]
    with pytest.raises(ValueError, match="server optimizer"):
        ServerOptimizer("fedsgd")


def test_fedavgm_without_momentum_at_lr_1_is_fedavg() -> None:
    setup = small(num_nodes=3, rounds=3)
    datasets = client_data(setup)
    plain = replay(setup, ServerOptimizer("fedavg"), datasets=datasets)
    momentum = replay(setup, ServerOptimizer("fedavgm", lr=1.0, momentum=0.0), datasets=datasets)
    assert plain.final_model is not None and momentum.final_model is not None
    np.testing.assert_allclose(momentum.final_model, plain.final_model, rtol=0, atol=1e-6)
    assert momentum.accuracy == pytest.approx(plain.accuracy, abs=1e-9)
    with_momentum = replay(setup, ServerOptimizer("fedavgm", momentum=0.9), datasets=datasets)
    assert with_momentum.final_model is not None
    assert not np.allclose(with_momentum.final_model, plain.final_model, atol=1e-4)


def test_random_groups_with_one_group_for_everyone_are_fedavg() -> None:
    """Four clients and groups of up to four: each step is one group of all, FedAvg."""
    setup = small(num_nodes=4, rounds=2)
    datasets = client_data(setup)
    fedavg = replay(setup, ServerOptimizer("fedavg"), datasets=datasets)
    groups = random_replay(setup, RandomGroups(steps=1, group_max=4), datasets=datasets)
    assert groups.final_model is not None and fedavg.final_model is not None
    np.testing.assert_allclose(groups.final_model, fedavg.final_model, rtol=0, atol=1e-6)
    assert groups.accuracy == pytest.approx(fedavg.accuracy, abs=1e-9)
    assert groups.spread == [0.0, 0.0]


@pytest.mark.parametrize("ready_spread", [0.0, 3.0])
def test_random_groups_conserve_the_weighted_mean(ready_spread: float) -> None:
    """Push-sum: after one round of small groups (synchronous partitions, or groups
    formed as clients become free) the weighted mean of the clients' models is FedAvg's
    round-1 model, though the clients disagree."""
    setup = small(num_nodes=7, rounds=1)
    datasets = client_data(setup)
    fedavg = replay(setup, ServerOptimizer("fedavg"), datasets=datasets)
    groups = RandomGroups(steps=2, ready_spread=ready_spread, seed=3)
    mixed = random_replay(setup, groups, datasets=datasets)
    assert mixed.final_model is not None and fedavg.final_model is not None
    np.testing.assert_allclose(mixed.final_model, fedavg.final_model, rtol=0, atol=1e-5)


def test_asynchronous_groups_reach_fewer_clients_than_partitions() -> None:
    """What bench/convergence.py's real nodes showed (spec/group.md, "Random rounds"):
    groups formed among the clients free at the time spread each client's model to
    fewer others per step than random partitions do. Every client is done once, after
    its ``steps`` groups."""
    rng = np.random.default_rng(5)

    def mean_reach(groups: RandomGroups) -> float:
        reach = []
        for _ in range(100):
            known = [{k} for k in range(16)]
            if groups.ready_spread > 0:
                schedule = round_schedule(16, groups, rng)
                done = [part[0] for kind, part in schedule if kind == "done"]
                assert sorted(done) == list(range(16))
            else:
                cuts = [3, 6, 9, 12]  # groups of 3, 3, 3, 3 and 4
                schedule = [
                    ("group", [int(k) for k in part])
                    for _ in range(groups.steps)
                    for part in np.array_split(rng.permutation(16), cuts)
                ]
            for kind, part in schedule:
                if kind == "done":
                    reach.append(len(known[part[0]]))
                else:
                    union = set().union(*(known[k] for k in part))
                    for k in part:
                        known[k] = set(union)
            if groups.ready_spread <= 0:
                reach.extend(len(s) for s in known)
        return float(np.mean(reach))

    partitions = mean_reach(RandomGroups(steps=3))
    asynchronous = mean_reach(RandomGroups(steps=3, ready_spread=2.0))
    assert asynchronous < partitions - 1.0, (asynchronous, partitions)


# -- the task --------------------------------------------------------------------------------


def test_cnn_task_trains_evaluates_and_replays_its_batches() -> None:
    assert isinstance(task, Task)
    config = {"node_index": 1, "num_nodes": 4, "seed": 3, **SETTINGS}
    data = task.load_data(config)
    model = task.build_model(config)
    assert sum(p.numel() for p in model.parameters()) == 3658
    assert model_fingerprint(model, task.name) == model_fingerprint(
        task.build_model(config), task.name
    )  # every node builds the same model from the same seed
    before = task.evaluate(model, data, config)
    start = [p.detach().clone() for p in model.parameters()]
    for r in range(8):
        result = task.train(model, data, config, torch.Generator(), RoundContext(r, r))
        assert result.samples == data.num_train and result.weight is None
    after = task.evaluate(model, data, config)
    assert after["loss"] < before["loss"] and after["accuracy"] > before["accuracy"]

    def once(round_index: int, generator_seed: int) -> list[torch.Tensor]:
        replica = task.build_model(config)
        with torch.no_grad():
            for p, q in zip(replica.parameters(), start, strict=True):
                p.copy_(q)
        generator = torch.Generator().manual_seed(generator_seed)
        task.train(replica, data, config, generator, RoundContext(round_index, 0))
        return [p.detach() for p in replica.parameters()]

    same = once(4, 1), once(4, 2)  # the node's generator does not matter ...
    assert all(torch.equal(a, b) for a, b in zip(*same, strict=True))
    other = once(5, 1)  # ... the round does
    assert not all(torch.equal(a, b) for a, b in zip(same[0], other, strict=True))
    assert batch_seed(3, 1, 4) != batch_seed(3, 2, 4)


def test_cnn_task_data_split_and_settings() -> None:
    parts = node_parts({"num_nodes": 16, "seed": 7})
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == 1438  # the training pool, exactly once
    test_a = task.load_data({"node_index": 0, "num_nodes": 16, "seed": 7}).test
    test_b = task.load_data({"node_index": 2, "num_nodes": 3, "seed": 1, "partition": "iid"}).test
    assert torch.equal(test_a[1], test_b[1])  # one common held-out test set
    shards = node_parts({"num_nodes": 8, "seed": 1, "partition": "shards"})
    assert sum(len(p) for p in shards) == 1438
    for bad, message in [
        ({"partition": "zipf"}, "partition must be one of"),
        ({"alpha": 0}, "alpha"),
        ({"node_index": 4}, "node_index must be < num_nodes"),
        ({"lr": -1}, "lr"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config = {"node_index": 0, "num_nodes": 4, **bad}
            task.train(
                task.build_model(config),
                task.load_data(config),
                config,
                torch.Generator(),
                RoundContext(0, 0),
            )
    with pytest.raises(ConfigError, match="num_nodes"):
        task.load_data({"node_index": 0})


# -- the benchmark's bookkeeping -------------------------------------------------------------


def test_curve_helpers() -> None:
    assert convergence.rounds_to_target([0.5, 0.9, 0.95], 0.9) == 2
    assert convergence.rounds_to_target([0.5], 0.9) is None
    assert convergence.checkpoints(100) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    gap = convergence.gap_points([0.5, 0.58], [0.5, 0.6], [1, 2])
    assert gap["by_round"] == {"1": 0.0, "2": -2.0} and gap["max_abs"] == 2.0
    assert gap["first_differing_round"] == 2 and gap["mean_abs_all_rounds"] == 1.0


def test_variants_blocked_by_missing_parameters_or_node_support() -> None:
    legacy = ["group_min", "group_max", "dp_enabled"]
    assert convergence.variant_blocker("random-fedavg", legacy, "") is None
    blocked = convergence.variant_blocker("exact-fedavg", legacy, "")
    assert blocked is not None and "'averaging'" in blocked
    every = [*legacy, "averaging", "server_optimizer", "server_lr", "server_momentum"]
    every += ["server_beta2", "server_tau"]
    assert convergence.variant_blocker("exact-fedavg", every, "") is None
    lazy = convergence.variant_blocker("exact-fedadam", every, "self.server_optimizer = None")
    assert lazy is not None and "does not apply it" in lazy
    wired = "if params.server_optimizer != 'fedavg': ..."
    assert convergence.variant_blocker("exact-fedadam", every, wired) is None
    assert convergence.federation_params("exact-fedadam")["server_lr"] == 0.03


def test_node_logs_are_summarised_per_round(tmp_path: Path) -> None:
    def node(index: int, rounds: dict[int, float]) -> convergence._Node:
        lines = [
            json.dumps(
                {
                    "ts": f"2026-12-01T00:00:{r:02d}.000Z",
                    "event": "round",
                    "round": r,
                    "accuracy": acc,
                    "seconds": 1.0,
                    "steps": r,
                    "nodes": 3,
                    "coverage": 3 if r != 2 else 1,
                }
            )
            for r, acc in rounds.items()
        ]
        lines.append(json.dumps({"event": "caught_up", "level": "WARNING"}))
        return convergence._Node(index, tmp_path, None, io.StringIO("\n".join(lines) + "\n"))  # type: ignore[arg-type]

    nodes = [node(0, {1: 0.2, 2: 0.4, 3: 0.6}), node(1, {1: 0.4, 3: 0.6})]
    for n in nodes:
        n.read()
    summary = convergence._summarise_nodes(nodes, 3)
    assert summary["curve"] == pytest.approx([0.3, 0.4, 0.6])
    assert summary["wall_s_per_round"] == 1.0
    assert summary["node_accuracy_spread_max_points"] == pytest.approx(20.0)
    assert summary["rounds_not_logged_by_node"] == {"1": [2]}
    assert summary["inexact_round_records"] == 1
    assert summary["steps_per_round"] == {"mean": 2.0, "min": 1, "max": 3}
    assert summary["events"] == {"caught_up": 2}


def test_tiny_end_to_end_result_and_targets() -> None:
    """References on 4 clients x 3 rounds, then the JSON with a p2pfed run that matches the
    reference and one that drifts: the targets must tell them apart."""
    setup = small(num_nodes=4, rounds=3)
    references = convergence.run_references(setup, ["fedavg", "fedavgm"], extra=False)
    assert set(references) == {"fedavg", "fedavgm", "centralized"}
    fedavg = references["fedavg"].accuracy
    assert len(fedavg) == 3 and len(references["centralized"].accuracy) == 3
    first = evaluate(setup, client_data(setup)[0], initial_model(setup))["loss"]
    assert references["fedavg"].loss[-1] < first  # learning happens
    assert references["centralized"].accuracy[-1] > fedavg[-1]
    runs = {
        "exact-fedavg": {"curve": list(fedavg), "wall_s_per_round": 0.2},
        "random-fedavg": {"curve": [a - 0.05 for a in fedavg], "wall_s_per_round": 0.1},
        "exact-fedavgm": {"curve": list(fedavg), "wall_s_per_round": 0.2},
    }
    flower = {"curve": list(fedavg), "wall_s_per_round": 0.4}
    result, curves = convergence.build_result(
        setup, 0.9, references, runs, {"exact-fedadam": "not yet"}, flower, None
    )
    met = result["met"]
    assert met["exact-fedavg_within_0.5pt_of_reference"] is True
    assert met["random-fedavg_within_3pt_of_reference"] is False  # 5 points off
    assert met["exact-fedavgm_within_1pt_of_reference"] == (
        max(abs(a - b) for a, b in zip(fedavg, references["fedavgm"].accuracy, strict=True)) <= 0.01
    )
    assert met["p2pfed_wall_per_round_le_flower"] is True
    assert result["wall_s_per_round_p2pfed_over_flower"] == {
        "variant": "exact-fedavg",
        "ratio": 0.5,
    }
    assert result["skipped"] == {"exact-fedadam": "not yet"}
    assert set(curves) >= {"reference-fedavg", "p2pfed-exact-fedavg", "flower-fedavg"}
    json.dumps(result)  # the benchmark prints it
    table = convergence.accuracy_table(curves, 3)
    assert "p2pfed-random-fedavg" in table and len(table.splitlines()) == 1 + len(curves)

    incomplete = dict(runs["exact-fedavg"], curve=fedavg[:2])
    partial, _ = convergence.build_result(
        setup, 0.9, references, {"exact-fedavg": incomplete}, {}, None, "--no-flower"
    )
    assert partial["met"]["exact-fedavg_within_0.5pt_of_reference"] is False  # unfinished
    assert partial["flower"] == {"skipped": "--no-flower"}


def test_random_variant_gets_its_model_curve() -> None:
    """A run with a random variant also replays push-sum over random groups (the
    automatic number of steps: 7 for 16 nodes), and reports it against FedAvg."""
    assert convergence.random_model(Setup(num_nodes=16)).steps == 7
    assert convergence.random_model(Setup(num_nodes=16), random_steps=2).steps == 2
    setup = small(num_nodes=5, rounds=2)
    groups = convergence.random_model(setup)
    references = convergence.run_references(setup, ["fedavg"], extra=False, random_groups=groups)
    model = references["random-fedavg-model"]
    assert len(model.accuracy) == 2 and len(model.spread) == 2
    runs = {"random-fedavg": {"curve": list(model.accuracy), "wall_s_per_round": 0.1}}
    result, curves = convergence.build_result(setup, 0.9, references, runs, {}, None, "x")
    gap = result["differences_points"]["random-fedavg-model_vs_reference_fedavg"]
    assert set(gap["by_round"]) == {"2"}
    assert "reference-random-fedavg-model" in curves


def test_centralized_history_has_one_point_per_round() -> None:
    setup = dataclasses.replace(
        small(num_nodes=4, rounds=2), task_settings={**SETTINGS, "local_epochs": 2}
    )
    history = convergence.centralized(setup)
    assert isinstance(history, History) and len(history.accuracy) == 2
