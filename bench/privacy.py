"""What record-level DP costs in accuracy: ``python -m bench.privacy``.

A 16-node cross-silo federation with a few thousand records per node (a generated
10-class problem with label skew between nodes, a small MLP), trained with FedAvg:

* ``nonprivate``: each node runs one epoch of plain mini-batch SGD per round;
* ``record``: each node runs DP-SGD (:func:`p2pfed.dp_sgd.dp_sgd`: Poisson sampling,
  per-record clipping, Gaussian noise) for one expected epoch per round, the noise
  calibrated with p2pfed's accountant so that all rounds spend epsilon at delta 1e-5;
* ``central``: DP-SGD on the union of all nodes' data (what a trusted curator could do),
  the same number of expected epochs, calibrated to the same epsilon;
* ``node_level``: node-level DP, each node clips its round update and adds all the
  Gaussian noise itself (:func:`p2pfed.dp.clip_and_noise`);
* ``distributed``: node-level DP at the same (central) epsilon, each node adding only a
  Skellam share in the secure-aggregation ring (:class:`p2pfed.skellam.DistributedDP`,
  groups of at least ``group_min`` = 4); the ring sum of all nodes' words is what an
  exact round's carried group sums add up to. ``distributed_local_epsilon`` is the
  weaker guarantee against members who strip the masks.

This is a framework-free replay (no sockets): the same DP-SGD code and accountant a node
uses, with the federation's averaging done in a loop, as in ``bench/_fedsim.py``.
Hyper-parameters (clip norm 1, lr, batch sizes) were chosen on a *different* seed of the
generated data, i.e. on public data, so the tuning costs no privacy budget. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from p2pfed import dp
from p2pfed.accountant import distributed_epsilon_for
from p2pfed.dp_sgd import dp_sgd
from p2pfed.fixedpoint import FixedPointParams, decode_group_sum
from p2pfed.skellam import DistributedDP, nominal_noise_multipliers, required_clip

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
CLASSES = 10
FEATURES = 20


@dataclass(frozen=True)
class Setup:
    nodes: int = 16
    records: int = 2000
    rounds: int = 20
    batch: int = 64
    central_batch: int = 512
    lr: float = 0.1
    dp_lr: float = 1.0
    clip: float = 1.0
    seed: int = 0
    group_min: int = 4


def make_data(
    setup: Setup,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Per-node training sets with label skew (Dirichlet 1.0), and a common test set."""
    rng = np.random.default_rng(setup.seed)
    centres = rng.normal(0.0, 1.0, (CLASSES, FEATURES))

    def sample(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = centres[labels] + rng.normal(0.0, 1.6, (len(labels), FEATURES))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)

    parts = []
    for _ in range(setup.nodes):
        mix = rng.dirichlet(np.ones(CLASSES))
        parts.append(sample(rng.choice(CLASSES, size=setup.records, p=mix)))
    test = sample(rng.integers(0, CLASSES, 5000))
    return parts, test


def build_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES)
    )


def accuracy(model: torch.nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(test[0]).argmax(1) == test[1]).float().mean())


def _vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _sgd_epoch(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    setup: Setup,
    g: torch.Generator,
) -> None:
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=setup.lr)
    for index in torch.randperm(len(y), generator=g).split(setup.batch):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        opt.step()


def federated(
    setup: Setup,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    epsilon: float | None,
) -> float:
    """FedAvg (equal weights, as p2pfed uses with DP on); DP-SGD locally if ``epsilon``."""
    model = build_model(setup.seed)
    q = setup.batch / setup.records
    steps = round(1 / q)
    sigma = (
        dp.calibrate(
            "record",
            epsilon=epsilon,
            delta=DELTA,
            rounds=setup.rounds,
            sampling_rate=q,
            steps=steps,
        )
        if epsilon is not None
        else 0.0
    )
    rng = np.random.default_rng(setup.seed + 1)
    g = torch.Generator().manual_seed(setup.seed + 2)
    for _ in range(setup.rounds):
        start = _vector(model)
        total = torch.zeros_like(start)
        for data in parts:
            torch.nn.utils.vector_to_parameters(start, model.parameters())
            if epsilon is None:
                _sgd_epoch(model, data, setup, g)
            else:
                dp_sgd(
                    model,
                    data,
                    steps=steps,
                    sampling_rate=q,
                    clip_norm=setup.clip,
                    noise_multiplier=sigma,
                    lr=setup.dp_lr,
                    rng=rng,
                )
            total += _vector(model)
        torch.nn.utils.vector_to_parameters(total / len(parts), model.parameters())
    return accuracy(model, test)


def node_level(
    setup: Setup,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    epsilon: float,
    *,
    distributed: bool,
) -> float:
    """FedAvg with node-level DP on each round's update: all the noise added by each node,
    or (``distributed``) a Skellam share of it added in the ring."""
    level = "distributed" if distributed else "node"
    sigma = dp.calibrate(level, epsilon=epsilon, delta=DELTA, rounds=setup.rounds)
    model = build_model(setup.seed)
    size = len(_vector(model))
    fixed_point = FixedPointParams.for_federation(
        64, required_clip(setup.clip, sigma, setup.group_min), max(8, setup.group_min)
    )
    shares = DistributedDP(setup.clip, sigma, setup.group_min, size, fixed_point)
    rng = np.random.default_rng(setup.seed + 4)
    g = torch.Generator().manual_seed(setup.seed + 5)
    for _ in range(setup.rounds):
        start = _vector(model).numpy()
        ring = np.zeros(size + 1, fixed_point.dtype)
        total = np.zeros(size, np.float64)
        for data in parts:
            torch.nn.utils.vector_to_parameters(torch.from_numpy(start), model.parameters())
            _sgd_epoch(model, data, setup, g)
            update = _vector(model).numpy() - start
            if distributed:
                ring += shares.encode_release(start, update, rng)[0]
            else:
                total += start + dp.clip_and_noise(update, setup.clip, sigma, rng)
        mean = (
            decode_group_sum(ring, fixed_point)[0]
            if distributed
            else (total / len(parts)).astype(np.float32)
        )
        torch.nn.utils.vector_to_parameters(torch.from_numpy(mean), model.parameters())
    return accuracy(model, test)


def central(
    setup: Setup,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    epsilon: float,
) -> float:
    """DP-SGD on the union of the data, as many expected epochs as the federation's rounds."""
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    q = setup.central_batch / len(y)
    steps = setup.rounds * round(1 / q)
    sigma = dp.calibrate(
        "record", epsilon=epsilon, delta=DELTA, rounds=1, sampling_rate=q, steps=steps
    )
    model = build_model(setup.seed)
    dp_sgd(
        model,
        (x, y),
        steps=steps,
        sampling_rate=q,
        clip_norm=setup.clip,
        noise_multiplier=sigma,
        lr=setup.dp_lr,
        rng=np.random.default_rng(setup.seed + 3),
    )
    return accuracy(model, test)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=Setup.rounds)
    parser.add_argument("--records", type=int, default=Setup.records)
    parser.add_argument("--seed", type=int, default=Setup.seed)
    parser.add_argument("--nodes", type=int, default=Setup.nodes)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(rounds=args.rounds, records=args.records, seed=args.seed, nodes=args.nodes)
    parts, test = make_data(setup)
    began = time.monotonic()
    result: dict[str, object] = {
        "bench": "privacy",
        "task": f"{setup.nodes} nodes x {setup.records} records, 10-class generated, MLP",
        "rounds": setup.rounds,
        "delta": DELTA,
        "nonprivate": round(federated(setup, parts, test, None), 4),
    }
    record, union = {}, {}
    for epsilon in EPSILONS:
        record[f"{epsilon:g}"] = round(federated(setup, parts, test, epsilon), 4)
        union[f"{epsilon:g}"] = round(central(setup, parts, test, epsilon), 4)
        print(
            f"epsilon {epsilon:g}: record {record[f'{epsilon:g}']}, central {union[f'{epsilon:g}']}"
        )
    result["record_level"] = record
    result["central_dp_sgd"] = union
    node, shared, local = {}, {}, {}
    for epsilon in EPSILONS:
        key = f"{epsilon:g}"
        node[key] = round(node_level(setup, parts, test, epsilon, distributed=False), 4)
        shared[key] = round(node_level(setup, parts, test, epsilon, distributed=True), 4)
        sigma = dp.calibrate("distributed", epsilon=epsilon, delta=DELTA, rounds=setup.rounds)
        local_z = nominal_noise_multipliers(sigma, setup.group_min)[1]
        local[key] = round(distributed_epsilon_for(local_z, setup.rounds, DELTA), 3)
        print(f"epsilon {epsilon:g}: node {node[key]}, distributed {shared[key]}")
    result["node_level"] = node
    result["distributed"] = shared
    result["distributed_group_min"] = setup.group_min
    result["distributed_local_epsilon"] = local
    result["seconds"] = round(time.monotonic() - began, 1)
    result["chance"] = round(1 / CLASSES, 2)
    assert all(math.isfinite(float(v)) for v in record.values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
