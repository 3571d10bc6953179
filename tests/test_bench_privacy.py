"""The privacy benchmark's node-level replay (bench/privacy.py) on a few nodes: its batched
local training is the per-node training it stands for, and its distributed path really
decodes the Skellam-noised group sums to the average; the simnet runs of the benchmark
share the replay's data and spend what the accountant calibrated (the 1,000-node runs are
too slow for the suite)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# bench/ is a directory of the repository, not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.privacy import (
    CLASSES,
    FEATURES,
    CrossDevice,
    ServerTuning,
    _cross_device_data,
    _local_updates,
    cross_device,
)


def test_batched_local_training_equals_each_node_training_alone() -> None:
    cfg = CrossDevice(nodes=5, records=40, batch=8, lr=0.5)
    xs, ys, _ = _cross_device_data(cfg)
    start = np.random.default_rng(0).normal(0, 0.1, CLASSES * FEATURES + CLASSES)
    start = start.astype(np.float32)
    batched = _local_updates(start, xs, ys, cfg, torch.Generator().manual_seed(3))
    # the same shuffles, drawn the way the batched code draws them
    order = torch.argsort(
        torch.rand(cfg.nodes, cfg.records, generator=torch.Generator().manual_seed(3)), 1
    )
    for node in range(cfg.nodes):
        model = torch.nn.Linear(FEATURES, CLASSES)
        torch.nn.utils.vector_to_parameters(torch.from_numpy(start.copy()), model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        for index in order[node].split(cfg.batch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[node, index]), ys[node, index])
            loss.backward()
            opt.step()
        alone = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy() - start
        np.testing.assert_allclose(batched[node], alone, atol=1e-5)


def test_distributed_replay_decodes_group_sums_and_learns() -> None:
    cfg = CrossDevice(nodes=64, records=50, rounds=3, group_size=8, group_min=4)
    data = _cross_device_data(cfg)
    tuning = ServerTuning(clip=1.0, momentum=0.0)
    plain = cross_device(cfg, data, "off", None, tuning)
    # at a huge epsilon the Skellam shares are tiny: the decoded group sums must give
    # back (nearly) the non-private average, which a wrong decoding or weight would not
    distributed = cross_device(cfg, data, "distributed", 1e4, tuning)
    assert plain > 0.5
    assert abs(distributed - plain) < 0.05


def test_record_level_federation_averages_independent_local_runs() -> None:
    # every node must start the round from the same model: vector_to_parameters makes the
    # parameters views of its argument, so training without a copy chains the nodes
    from bench.privacy import (
        Setup,
        _sgd_epoch,
        _vector,
        accuracy,
        build_model,
        federated,
        make_data,
    )

    setup = Setup(nodes=3, records=200, rounds=1)
    parts, test = make_data(setup)
    got = federated(setup, parts, test, None)
    g = torch.Generator().manual_seed(setup.seed + 2)
    start = _vector(build_model(setup.seed))
    finals = []
    for data in parts:
        model = build_model(setup.seed)
        _sgd_epoch(model, data, setup, g)
        finals.append(_vector(model))
    model = build_model(setup.seed)
    mean = start + torch.stack([f - start for f in finals]).mean(0)
    torch.nn.utils.vector_to_parameters(mean, model.parameters())
    assert got == accuracy(model, test)


def test_replay_and_simnet_task_see_the_same_records() -> None:
    # one generator (bench/_crossdevice_task.py): node i's records depend on the seed and
    # i alone, so a simnet node loading its data agrees with the replay's batch of nodes
    from bench._crossdevice_task import task

    cfg = CrossDevice(nodes=6, records=30, seed=4)
    xs, ys, test = _cross_device_data(cfg)
    for index in (0, 5):
        data = task.load_data({"node_index": index, "data_seed": 4, "records": 30})
        assert torch.equal(data.train[0], xs[index]) and torch.equal(data.train[1], ys[index])
        assert torch.equal(data.test[0], test[0]) and torch.equal(data.test[1], test[1])
    # and a bigger federation only appends nodes: the first ones keep their data
    more, _, _ = _cross_device_data(CrossDevice(nodes=9, records=30, seed=4))
    assert torch.equal(more[:6], xs)


def test_simnet_run_of_a_setting_spends_its_budget_and_learns(tmp_path: Path) -> None:
    from bench.privacy import SimnetRun, run_in_simnet, scenario_text
    from simnet.scenario import parse_scenario

    cfg = CrossDevice(nodes=16, records=50, rounds=2)
    run = SimnetRun(cfg, "distributed", 8.0, ServerTuning(clip=1.0, momentum=0.5))
    scenario = parse_scenario(scenario_text(run))
    assert scenario.dp.level == "distributed" and scenario.protocol.grouping == "exact"
    got = run_in_simnet(run)
    assert got["completed"] and got["nodes"] == 16 and got["releases_min"] == 2
    # the accountant's calibration: both releases fit the budget, and nearly fill it
    assert 7.9 < got["epsilon_spent_max"] <= 8.0
    # exact rounds: the nodes agree, so the mean of their accuracies is the average's
    assert got["accuracy"] == pytest.approx(got["accuracy_of_average"], abs=1e-3)
    assert 0.0 <= got["accuracy"] <= 1.0
