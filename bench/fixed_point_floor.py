"""How far secure aggregation's fixed point alone moves a federation's accuracy curve:
``python -m bench.fixed_point_floor``.

``bench.convergence`` compares p2pfed's exact rounds with a framework-free replay that
averages in float64. p2pfed averages in the secure-aggregation ring instead: every member
encodes its model in fixed point with *stochastic* rounding (resolution ``2**-scale_bits``,
``scale_bits`` = 37 for the benchmark's 64-bit ring and groups of up to 4;
spec/secure-aggregation.md), and the decoded mean then differs from the float64 mean by
one float32 ulp in the few coordinates whose mean lies close to a rounding boundary, a
different few in every round and every run. Training is chaotic enough that this moves
accuracy by a test image or a few.

This benchmark isolates that effect with no p2pfed networking at all: the replay of
``bench._fedsim`` (same task, data, initial model and batch order as
``bench.convergence``), once with the float64 mean and once per seed with the mean passed
through p2pfed's own fixed-point code (:func:`p2pfed.fixedpoint.make_contribution` for
each client, the ring sum, :func:`p2pfed.fixedpoint.decode_group_sum`), the exact integer
sum an exact round computes. It prints, per server optimiser and seed, the difference in
accuracy points from the float64 replay at every 10th round. Where a seed's differences
equal those ``bench.convergence`` records for p2pfed, p2pfed's gap to the reference is the
fixed point's, not the protocol's.

Recorded 2026-12-03 with the encoding of that day (each member rounded ``x * scale`` and
multiplied the integer by its weight, so a group's sum was off by up to the total weight
in units of ``2**-scale_bits``): FedAvgM moved by up to 1.67 points in one seed of three
(+0.28, +0.56, +0.56, -1.67, -0.56, -0.56 at rounds 30 to 80: the very numbers
``bench.convergence`` recorded for p2pfed that day), FedAvg by -0.28 and +0.56 at rounds
70 and 80 in two seeds of three. Since then a member rounds ``w * x * scale`` (the weight
applied before rounding; spec/secure-aggregation.md, 2.1), so the sum is off by less than
one unit per member, thousands of times less with these sample counts. Recorded again the
same day with that encoding: no accuracy difference at any 10th round in any seed, for
both optimisers, and 0 to 2 differing coordinates (``differing_coordinates``: coordinates
of all 100 rounds' means, out of 365,800, where the ring's float32 mean differs from the
float32-rounded float64 mean of the same models).
The last line printed is one JSON object; ``--record`` stores it in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from bench import _fedsim as fs
from bench.convergence import GROUP_MAX, OPTIMIZERS, TASK_SETTINGS, checkpoints
from bench.results import report
from p2pfed.fixedpoint import FixedPointParams, decode_group_sum, make_contribution


def ring_mean(
    models: list[np.ndarray], weights: list[int], params: FixedPointParams, seed: int
) -> np.ndarray:
    """The weighted mean as an exact round decodes it: the ring sum of every client's
    fixed-point contribution (stochastic rounding drawn from ``seed``)."""
    rng = np.random.default_rng(seed)
    total: np.ndarray | None = None
    for model, weight in zip(models, weights, strict=True):
        words = make_contribution(model.astype(np.float32), weight, params, rng)
        total = words.copy() if total is None else total + words  # uint wraps: the ring
    assert total is not None
    mean, _ = decode_group_sum(total, params)
    return mean.astype(np.float32)


def curve(setup: fs.Setup, optimizer: str, seed: int | None) -> tuple[list[float], int]:
    """Accuracy after every round, float64 mean (``seed`` None) or the ring's, and how many
    coordinates of all rounds' ring means differed from the float64 mean of the same
    models (0 for the float64 curve)."""
    datasets = fs.client_data(setup)
    weights = [d.num_train for d in datasets]
    params = FixedPointParams.for_federation(64, 8.0, GROUP_MAX)
    x, state, accuracy, differing = fs.initial_model(setup), fs.ServerState(), [], 0
    for r in range(setup.rounds):
        models = [fs.local_update(setup, d, k, r, x) for k, d in enumerate(datasets)]
        mean = fs.weighted_mean(models, weights)
        if seed is not None:
            ring = ring_mean(models, weights, params, seed * 1_000_003 + r)
            differing += int(np.count_nonzero(ring != mean))
            mean = ring
        x = fs.server_step(OPTIMIZERS[optimizer], state, x, mean)
        accuracy.append(fs.evaluate(setup, datasets[0], x)["accuracy"])
    return accuracy, differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fixed_point_floor", description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--optimizers", default="fedavg,fedavgm")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    setup = fs.Setup(num_nodes=16, rounds=args.rounds, seed=7, task_settings=dict(TASK_SETTINGS))
    marks = checkpoints(args.rounds)
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict[str, Any] = {
        "benchmark": "fixed_point_floor",
        "rounds": args.rounds,
        "scale_bits": FixedPointParams.for_federation(64, 8.0, GROUP_MAX).scale_bits,
        "model_size": int(fs.initial_model(setup).size),
        "differences_points": {},
    }
    started = time.perf_counter()
    for optimizer in args.optimizers.split(","):
        print(f"[{optimizer}] float64 replay, {args.rounds} rounds", file=sys.stderr)
        base, _ = curve(setup, optimizer, None)
        by_seed: dict[str, dict[str, float]] = {}
        differing: dict[str, int] = {}
        for seed in seeds:
            print(f"[{optimizer}] fixed-point replay, seed {seed}", file=sys.stderr)
            ring, differing[str(seed)] = curve(setup, optimizer, seed)
            by_seed[str(seed)] = {
                str(r): round(100 * (ring[r - 1] - base[r - 1]), 3) for r in marks
            }
        result["differences_points"][optimizer] = {
            "by_seed": by_seed,
            "max_abs": max(abs(v) for d in by_seed.values() for v in d.values()),
            "differing_coordinates": differing,
        }
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report("fixed_point_floor", result, record=args.record)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
