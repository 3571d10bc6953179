"""What ``p2pfed federation new --dp record`` should default to, measured on the digits task.

``python -m bench.dp_defaults [--nodes N] [--rounds R] [--epsilon E] [--seed S] [--sweep]``
(about 8 minutes on the shared 2-core machine; ``--sweep`` adds the other candidates tried)
replays a federation of N digits nodes (p2pfed.tasks.digits, the README's ``p2pfed node
... --task p2pfed.tasks.digits:task``, non-IID split) in one process: every round each
node runs the node's own DP-SGD (:func:`p2pfed.dp_sgd.dp_sgd`, learning rate 0.1: what a
node uses when the operator sets no ``lr``), the federation averages the releases exactly
(weight 1 each, as exact rounds do under DP) and applies its server optimiser
(:class:`p2pfed.server_optimizer.ServerOptimizer`). The noise is calibrated by
:func:`p2pfed.dp.calibrate` for R rounds at E, delta 1e-5, as ``federation new`` does.
The non-private federation (the task's own training, fedavg) is the reference.

Tuning here is on public data (scikit-learn's digits, its held-out test split): the chosen
defaults are not charged to any federation's budget. Prints one JSON object as its last
line. No networking: the nodes' DP-SGD, averaging and server optimiser are the code real
nodes run; group formation and secure aggregation (exact sums) are left out.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from p2pfed import dp_sgd
from p2pfed.dp import calibrate
from p2pfed.federation import RECORD_LEVEL_DEFAULTS
from p2pfed.model_vector import model_to_vector, vector_to_model
from p2pfed.server_optimizer import ServerOptimizer, ServerOptimizerSettings
from p2pfed.tasks.digits import task

DELTA = 1e-5
LR = 0.1
"""The node's DP-SGD learning rate when the operator sets no ``lr`` (p2pfed/node.py)."""

DEFAULT = "federation new --dp record (q 0.25, 2 steps, fedavgm 0.9)"
FORMER = "former defaults (q 0.02, 50 steps, fedavg)"
NO_DP = "no DP (the task's own training, fedavg)"
WITHIN = 0.05
"""Target: the default within this accuracy of the federation without DP."""

CANDIDATES: dict[str, dict[str, Any]] = {
    DEFAULT: dict(RECORD_LEVEL_DEFAULTS),
    FORMER: {"dp_sample_rate": 0.02, "dp_steps": 50, "server_optimizer": "fedavg"},
}
"""Run by default: the chosen defaults and the former ones."""
SWEEP: dict[str, dict[str, Any]] = {
    "q 0.25, 2 steps, fedavgm 0.7 (bench/privacy.py's momentum)": {
        "dp_sample_rate": 0.25,
        "dp_steps": 2,
        "server_optimizer": "fedavgm",
        "server_momentum": 0.7,
    },
    "q 0.25, 5 steps, fedavgm 0.9": {
        "dp_sample_rate": 0.25,
        "dp_steps": 5,
        "server_optimizer": "fedavgm",
        "server_momentum": 0.9,
    },
    "q 0.5, 1 step, fedavgm 0.9": {
        "dp_sample_rate": 0.5,
        "dp_steps": 1,
        "server_optimizer": "fedavgm",
        "server_momentum": 0.9,
    },
    "q 0.25, 2 steps, fedavgm 0.9, server lr 2": {
        "dp_sample_rate": 0.25,
        "dp_steps": 2,
        "server_optimizer": "fedavgm",
        "server_momentum": 0.9,
        "server_lr": 2.0,
    },
}
"""The other candidates tried (``--sweep``)."""


def _settings(params: dict[str, Any]) -> ServerOptimizerSettings:
    return ServerOptimizerSettings.from_params(
        {
            "server_optimizer": params.get("server_optimizer", "fedavg"),
            "server_lr": params.get("server_lr", 1.0),
            "server_momentum": params.get("server_momentum", 0.9),
            "server_beta2": 0.99,
            "server_tau": 1e-3,
        }
    )


def replay(
    params: dict[str, Any] | None, *, nodes: int, rounds: int, epsilon: float, seed: int = 0
) -> dict[str, Any]:
    """Accuracy of a ``nodes``-node digits federation after ``rounds`` rounds (every 10)."""
    configs = [{"node_index": i, "num_nodes": nodes, "seed": seed} for i in range(nodes)]
    data = [task.load_data(c) for c in configs]
    model = task.build_model(configs[0])
    x = model_to_vector(model)
    optimizer = ServerOptimizer(_settings(params or {}), x.size)
    sigma = None
    if params is not None:
        sigma = calibrate(
            "record",
            epsilon=epsilon,
            delta=DELTA,
            rounds=rounds,
            sampling_rate=params["dp_sample_rate"],
            steps=params["dp_steps"],
        )
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for r in range(1, rounds + 1):
        released = []
        for d in data:
            vector_to_model(model, x)
            if params is None:
                task.train(model, d, {}, generator)
            else:
                assert sigma is not None
                dp_sgd.dp_sgd(
                    model,
                    d.train,
                    steps=params["dp_steps"],
                    sampling_rate=params["dp_sample_rate"],
                    clip_norm=params.get("dp_clip_norm", 1.0),
                    noise_multiplier=sigma,
                    lr=LR,
                    rng=rng,
                )
            released.append(model_to_vector(model))
        average = np.asarray(np.mean(released, axis=0, dtype=np.float64), dtype=np.float32)
        x = optimizer.step(x, average)
        if r % 10 == 0 or r == rounds:
            vector_to_model(model, x)
            curve.append(round(task.evaluate(model, data[0], {})["accuracy"], 4))
    return {"noise_multiplier": sigma, "accuracy": curve[-1], "every_10_rounds": curve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true", help="also the other candidates tried")
    parser.add_argument(
        "--only", action="append", help="run only candidates whose name contains this"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    began = time.monotonic()
    runs: dict[str, dict[str, Any] | None] = {NO_DP: None}
    runs.update(CANDIDATES)
    if args.sweep:
        runs.update(SWEEP)
    for name, params in runs.items():
        if args.only and not any(part in name for part in args.only):
            continue
        start = time.monotonic()
        results[name] = replay(
            params, nodes=args.nodes, rounds=args.rounds, epsilon=args.epsilon, seed=args.seed
        )
        results[name]["seconds"] = round(time.monotonic() - start, 1)
        print(name, results[name], flush=True)
    print(
        json.dumps(
            {
                "benchmark": "dp_defaults",
                "task": "p2pfed.tasks.digits:task (public data)",
                "nodes": args.nodes,
                "rounds": args.rounds,
                "epsilon": args.epsilon,
                "seed": args.seed,
                "delta": DELTA,
                "lr": LR,
                "results": results,
                "met": DEFAULT in results
                and NO_DP in results
                and results[NO_DP]["accuracy"] - results[DEFAULT]["accuracy"] <= WITHIN,
                "seconds": round(time.monotonic() - began, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
