"""What differential privacy costs in accuracy: ``python -m bench.privacy``.

**Record level** (cross-silo): 16 nodes with a few thousand records each (a generated
10-class problem with label skew between nodes, a small MLP):

* ``nonprivate``: FedAvg, each node runs one epoch of plain mini-batch SGD per round;
* ``federated``: each node runs ``dp_steps`` DP-SGD steps a round
  (:func:`p2pfed.dp_sgd.dp_sgd`: Poisson sampling, per-record clipping, Gaussian noise),
  the noise calibrated with p2pfed's accountant so that all rounds spend epsilon at
  delta 1e-5, and the average goes through FedAvgM (server momentum);
* ``central_dp_sgd``: DP-SGD on the union of all nodes' data (a trusted curator), at the
  same epsilon.

Each node's release must be private on its own, so the federation's average carries the
noise of 16 independent DP-SGD runs: ``sqrt(16) = 4`` times the noise multiplier a
curator needs for the same batch. Large Poisson batches, few steps and few rounds are what
narrows that gap (they lower the noise per unit of signal; see README).

**Node level** (cross-device): 1,000 nodes with 100 records each and a linear model
(:mod:`bench._crossdevice_task`, the one place the data comes from); no DP vs
``distributed`` (``[dp] level = "distributed"``: each node adds a Skellam share of the
noise in the secure-aggregation ring, :class:`p2pfed.skellam.DistributedDP`) vs ``local``
(``level = "node"``: each node adds all the Gaussian noise), at epsilon 1, 3 and 8, then
at epsilon 8 for 16, 64 and 256 nodes: where node-level DP starts to pay.
``distributed_local_epsilon`` is the weaker guarantee against members who strip masks.

By default (``--node-level simnet``, the recorded result) each setting is a simnet
scenario (:func:`scenario_text`) run through simnet's Python API, two processes at a time
(``--jobs``): real nodes with secure aggregation, their own DP release and privacy ledger,
in exact rounds (groups of ``group_min`` = 4 to ``group_size`` = 8; every round ends
with every node holding the federation's exact average, then FedAvgM), the noise
calibrated with p2pfed's accountant so that the ``rounds`` releases spend epsilon at delta
1e-5 (``runs`` reports what the ledgers spent). *Accuracy* is the mean over the nodes of
their own final model's accuracy on the shared test set (exact rounds: every node holds the
same model, so it is also the accuracy of the average, reported beside it). A 1,000-node
run takes many minutes; ``--runs-cache FILE`` keeps finished runs so an interrupted
benchmark resumes. ``--node-level replay`` computes the same settings framework-free
(:func:`cross_device`: the node's clipping, Skellam and fixed-point code, the averaging in
a loop, random groups of 8 for the noise), as the epsilon-8 sweep over node counts does by
default (``--sweep-simnet-max N`` runs the counts up to N in simnet; each entry's ``how``
says which).

The record level is a framework-free replay (as in ``bench/_fedsim.py``): the same DP-SGD,
clipping and accountant a node uses, the federation's averaging done in a loop. Every
hyper-parameter was chosen on *public* data, the same generator drawn with
``seed + 1000``: record level by an offline grid (the values in :class:`Setup`), node level
by the replay's grid in :func:`tune_cross_device`; so the tuning costs no privacy budget.
``met`` says which of issue #14's targets hold. ``--record`` stores the result in
``bench/results/privacy.json``. Progress goes to stderr.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._crossdevice_task import CLASSES, FEATURES, node_records, test_records
from bench.results import report
from p2pfed import dp
from p2pfed.accountant import distributed_epsilon_for
from p2pfed.dp_sgd import dp_sgd
from p2pfed.fixedpoint import FixedPointParams, decode_group_sum
from p2pfed.skellam import DistributedDP, nominal_noise_multipliers, required_clip

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
PUBLIC_SEED_OFFSET = 1000
"""Hyper-parameters are chosen on data drawn with ``seed + PUBLIC_SEED_OFFSET``."""
NODE_CLIPS = (0.1, 0.3, 1.0)
MOMENTA = (0.0, 0.5, 0.9)
DP_MOMENTUM = 0.9


@dataclass(frozen=True)
class Setup:
    nodes: int = 16
    records: int = 2000
    rounds: int = 10
    batch: int = 64
    lr: float = 0.1
    seed: int = 0
    # DP-SGD, chosen on public data (module docstring): large Poisson batches (a quarter
    # of a node's records), two steps a round, ten rounds and server momentum; 20 rounds
    # of one expected epoch each (the previous setting) trailed central DP-SGD by 13 points
    # at epsilon 1, this by 4 on the public draw
    dp_batch: int = 500
    dp_steps: int = 2
    dp_lr: float = 2.0
    clip: float = 1.0
    server_momentum: float = 0.7
    central_batch: int = 512
    central_steps: int = 620
    central_lr: float = 1.0


def make_data(
    setup: Setup,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Per-node training sets with label skew (Dirichlet 1.0), and a common test set: the
    generator of :mod:`bench._crossdevice_task` (one place for both parts and simnet)."""
    parts = [node_records(setup.seed, i, setup.records) for i in range(setup.nodes)]
    return parts, test_records(setup.seed)


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
    """FedAvg (equal weights, as p2pfed uses with DP on); with ``epsilon``, ``dp_steps``
    DP-SGD steps a round on every node and FedAvgM (server momentum, post-processing)."""
    model = build_model(setup.seed)
    q = setup.dp_batch / setup.records
    sigma = (
        dp.calibrate(
            "record",
            epsilon=epsilon,
            delta=DELTA,
            rounds=setup.rounds,
            sampling_rate=q,
            steps=setup.dp_steps,
        )
        if epsilon is not None
        else 0.0
    )
    rng = np.random.default_rng(setup.seed + 1)
    g = torch.Generator().manual_seed(setup.seed + 2)
    momentum = setup.server_momentum if epsilon is not None else 0.0
    weights = _vector(model)
    velocity = torch.zeros_like(weights)
    for _ in range(setup.rounds):
        total = torch.zeros_like(weights)
        for data in parts:
            # a copy: vector_to_parameters makes the parameters views of its argument
            torch.nn.utils.vector_to_parameters(weights.clone(), model.parameters())
            if epsilon is None:
                _sgd_epoch(model, data, setup, g)
            else:
                dp_sgd(
                    model,
                    data,
                    steps=setup.dp_steps,
                    sampling_rate=q,
                    clip_norm=setup.clip,
                    noise_multiplier=sigma,
                    lr=setup.dp_lr,
                    rng=rng,
                )
            total += _vector(model) - weights
        velocity = momentum * velocity + total / len(parts)
        weights = weights + velocity
    torch.nn.utils.vector_to_parameters(weights, model.parameters())
    return accuracy(model, test)


def central(
    setup: Setup,
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    test: tuple[torch.Tensor, torch.Tensor],
    epsilon: float,
) -> float:
    """DP-SGD on the union of the data (what a trusted curator could do), its batch, steps
    and learning rate chosen on the same public data as the federation's."""
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    q = setup.central_batch / len(y)
    sigma = dp.calibrate(
        "record",
        epsilon=epsilon,
        delta=DELTA,
        rounds=1,
        sampling_rate=q,
        steps=setup.central_steps,
    )
    model = build_model(setup.seed)
    dp_sgd(
        model,
        (x, y),
        steps=setup.central_steps,
        sampling_rate=q,
        clip_norm=setup.clip,
        noise_multiplier=sigma,
        lr=setup.central_lr,
        rng=np.random.default_rng(setup.seed + 3),
    )
    return accuracy(model, test)


# ---- node-level DP at 1,000 nodes (cross-device) -------------------------------------


@dataclass(frozen=True)
class CrossDevice:
    """The cross-device task: many nodes with a little data each, a linear model."""

    nodes: int = 1000
    records: int = 100
    # 5, not the replay's former 10: a 1,000-node simnet run costs about 0.7 CPU s per
    # node to start and 0.12-0.2 per node and round (measured at 64 nodes), so each
    # round is ~3 CPU minutes of the benchmark; 5 rounds of FedAvgM still converge
    rounds: int = 5
    batch: int = 20
    lr: float = 0.5
    group_min: int = 4
    group_size: int = 8
    seed: int = 0


@dataclass(frozen=True)
class ServerTuning:
    """What the public-data grid chooses: the node-level clip norm and FedAvgM's momentum."""

    clip: float
    momentum: float


def _cross_device_data(
    cfg: CrossDevice,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs (N, n, F), labels (N, n), test)``: the records the simnet task's nodes
    load (:mod:`bench._crossdevice_task`), ``cfg.records`` per node."""
    parts, test = make_data(Setup(nodes=cfg.nodes, records=cfg.records, seed=cfg.seed))
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), test


def _linear_accuracy(w: np.ndarray, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    weight = torch.from_numpy(w[: CLASSES * FEATURES].reshape(CLASSES, FEATURES))
    logits = test[0] @ weight.T + torch.from_numpy(w[CLASSES * FEATURES :])
    return float((logits.argmax(1) == test[1]).float().mean())


def _local_updates(
    start: np.ndarray, xs: torch.Tensor, ys: torch.Tensor, cfg: CrossDevice, g: torch.Generator
) -> np.ndarray:
    """One epoch of mini-batch SGD on every node at once (a batched ``Linear(F, CLASSES)``,
    parameters laid out as ``parameters_to_vector`` does); ``(N, d)`` float32 updates."""
    n_nodes, n = ys.shape
    w0 = torch.from_numpy(start)
    weight = w0[: CLASSES * FEATURES].reshape(CLASSES, FEATURES).expand(n_nodes, -1, -1).clone()
    bias = w0[CLASSES * FEATURES :].expand(n_nodes, -1).clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    order = torch.argsort(torch.rand(n_nodes, n, generator=g), dim=1)
    rows = torch.arange(n_nodes)[:, None]
    for index in order.split(cfg.batch, dim=1):
        x, y = xs[rows, index], ys[rows, index]
        logits = torch.einsum("nbf,ncf->nbc", x, weight) + bias[:, None, :]
        # the sum over nodes of each node's mean loss: node i's gradient is its own
        loss = (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, CLASSES), y.reshape(-1), reduction="sum"
            )
            / index.shape[1]
        )
        gw, gb = torch.autograd.grad(loss, (weight, bias))
        with torch.no_grad():
            weight -= cfg.lr * gw
            bias -= cfg.lr * gb
    trained = torch.cat([weight.detach().reshape(n_nodes, -1), bias.detach()], dim=1)
    return (trained - w0).numpy().astype(np.float32)


def cross_device(
    cfg: CrossDevice,
    data: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
    level: str,
    epsilon: float | None,
    tuning: ServerTuning,
) -> float:
    """FedAvgM over ``cfg.nodes`` nodes; ``level`` "off", "node" (each node adds all the
    Gaussian noise: local DP) or "distributed" (Skellam shares summed in groups of
    ``cfg.group_size``, each group sum decoded as the group protocol does)."""
    xs, ys, test = data
    size = CLASSES * FEATURES + CLASSES
    w = np.zeros(size, np.float32)
    velocity = np.zeros(size, np.float64)
    rng = np.random.default_rng(cfg.seed + 7)
    g = torch.Generator().manual_seed(cfg.seed + 8)
    sigma = 0.0
    if level != "off":
        assert epsilon is not None
        sigma = dp.calibrate(level, epsilon=epsilon, delta=DELTA, rounds=cfg.rounds)
    if level == "distributed":
        fixed_point = FixedPointParams.for_federation(
            64, required_clip(tuning.clip, sigma, cfg.group_min), cfg.group_size
        )
        shares = DistributedDP(tuning.clip, sigma, cfg.group_min, size, fixed_point)
    for _ in range(cfg.rounds):
        updates = _local_updates(w, xs, ys, cfg, g)
        if level == "off":
            mean = updates.astype(np.float64).mean(0)
        elif level == "node":
            mean = np.mean(
                [dp.clip_and_noise(u, tuning.clip, sigma, rng) for u in updates],
                axis=0,
                dtype=np.float64,
            )
        else:
            groups = rng.permutation(cfg.nodes).reshape(-1, cfg.group_size)
            total = np.zeros(size, np.float64)
            for members in groups:
                ring = np.zeros(size + 1, fixed_point.dtype)
                for i in members:
                    ring += shares.encode_release(w, updates[i], rng)[0]
                group_mean, weight = decode_group_sum(ring, fixed_point)
                total += weight * (group_mean.astype(np.float64) - w)
            mean = total / cfg.nodes
        velocity = tuning.momentum * velocity + mean
        w = (w + velocity).astype(np.float32)
    return _linear_accuracy(w, test)


def tune_cross_device(
    cfg: CrossDevice, level: str, epsilon: float | None
) -> tuple[ServerTuning, float]:
    """The best of a small grid on *public* data (another seed of the generator), so the
    choice costs no privacy budget; returns it and its public accuracy."""
    public = replace(cfg, seed=cfg.seed + PUBLIC_SEED_OFFSET)
    data = _cross_device_data(public)
    grid = (
        [ServerTuning(1.0, m) for m in MOMENTA]
        if level == "off"
        else [ServerTuning(c, DP_MOMENTUM) for c in NODE_CLIPS]
    )
    scored = [(cross_device(public, data, level, epsilon, t), t) for t in grid]
    best = max(scored, key=lambda item: item[0])
    return best[1], best[0]


# ---- the node-level settings as simnet scenarios ---------------------------------------


@dataclass(frozen=True)
class SimnetRun:
    """One node-level setting run as a simnet scenario: real nodes (secure aggregation,
    the node's own DP release and ledger, exact rounds) on the virtual network."""

    cfg: CrossDevice
    level: str
    """"off", "node" (local DP) or "distributed"."""
    epsilon: float | None
    tuning: ServerTuning

    @property
    def label(self) -> str:
        name = {"off": "nonprivate", "node": "local", "distributed": "distributed"}[self.level]
        at = "" if self.epsilon is None else f" epsilon {self.epsilon:g}"
        return f"simnet {self.cfg.nodes} nodes, {name}{at}"


def scenario_text(run: SimnetRun) -> str:
    """The scenario of ``run``: exact rounds (every round ends with every node holding the
    federation's exact average, as the replay computes it) in groups of ``group_min`` ..
    ``group_size``, FedAvgM with the tuned momentum, ``[dp]`` calibrated with the
    accountant so that ``cfg.rounds`` releases spend ``epsilon`` at delta 1e-5."""
    cfg = run.cfg
    protocol = [
        f"group_min = {cfg.group_min}",
        f"group_max = {cfg.group_size}",
        'grouping = "exact"',
        'server_optimizer = "fedavgm"',
        f"server_momentum = {run.tuning.momentum}",
    ]
    dp_lines = ["enabled = false"]
    if run.level != "off":
        assert run.epsilon is not None
        sigma = dp.calibrate(run.level, epsilon=run.epsilon, delta=DELTA, rounds=cfg.rounds)
        dp_lines = [
            "enabled = true",
            f'level = "{run.level}"',
            f"clip_norm = {run.tuning.clip}",
            f"noise_multiplier = {sigma}",
            f"delta = {DELTA}",
            f"epsilon_budget = {run.epsilon}",
        ]
        if run.level == "distributed":
            # the ring must hold the group's summed noise (p2pfed.skellam.check_headroom)
            protocol.append(f"clip = {required_clip(run.tuning.clip, sigma, cfg.group_min)}")
    lines = [
        f'name = "privacy-{run.level}-{run.epsilon or 0:g}"',
        f"seed = {cfg.seed}",
        f"rounds = {cfg.rounds}",
        "duration = 1e9",
        "[nodes]",
        f"count = {cfg.nodes}",
        "[task]",
        'name = "bench._crossdevice_task:task"',
        "training = true",
        "evaluate_every = 0",  # evaluated here at the end, on the same test set
        "[task.settings]",
        f"data_seed = {cfg.seed}",
        f"records = {cfg.records}",
        f"batch = {cfg.batch}",
        f"lr = {cfg.lr}",
        "[protocol]",
        *protocol,
        "[dp]",
        *dp_lines,
    ]
    return "\n".join(lines) + "\n"


def _accuracies(models: np.ndarray, test: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """Each row of ``models`` (``Linear(F, CLASSES)`` as parameters_to_vector lays it
    out) evaluated on ``test``."""
    m = torch.from_numpy(models.astype(np.float32))
    weight = m[:, : CLASSES * FEATURES].reshape(-1, CLASSES, FEATURES)
    logits = torch.einsum("tf,ncf->ntc", test[0], weight) + m[:, None, CLASSES * FEATURES :]
    return (logits.argmax(2) == test[1][None, :]).float().mean(1).numpy()


def run_in_simnet(run: SimnetRun) -> dict[str, Any]:
    """Run ``run``'s scenario in this process; the figures of its end (module docstring).

    ``accuracy``: the mean over the nodes of their own final model's accuracy on the
    shared test set (what each member holds); ``accuracy_of_average``: the accuracy of the
    mean of those models (the same up to float rounding with exact rounds)."""
    import tempfile
    from pathlib import Path

    from simnet.scenario import parse_scenario
    from simnet.simulation import run_simulation

    torch.set_num_threads(1)
    scenario = parse_scenario(scenario_text(run), where=run.label)
    began = time.monotonic()

    def progress(row: dict[str, Any]) -> None:
        print(
            f"{run.label}: round {row['round']}/{run.cfg.rounds} "
            f"({time.monotonic() - began:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="bench-privacy-") as work:
        result = run_simulation(scenario, Path(work), progress=progress)
    nodes = [n for n in result.nodes if n.model is not None]
    models = np.stack([m for n in nodes if (m := n.model) is not None]).astype(np.float64)
    test = test_records(run.cfg.seed)
    each = _accuracies(models, test)
    ledgers = [n.ledger for n in nodes if n.ledger is not None]
    out: dict[str, Any] = {
        "accuracy": round(float(each.mean()), 4),
        "accuracy_min": round(float(each.min()), 4),
        "accuracy_of_average": round(float(_accuracies(models.mean(0)[None], test)[0]), 4),
        "consensus_max": result.summary["final_consensus_max"],
        "completed": bool(result.summary["completed"]),
        "rounds_min": result.summary["rounds_min"],
        "nodes": len(nodes),
        "wall_seconds": round(result.wall_seconds, 1),
    }
    if ledgers:
        out["epsilon_spent_max"] = round(max(ledger.spent() for ledger in ledgers), 4)
        out["releases_min"] = min(ledger.releases() for ledger in ledgers)
        if run.level == "distributed":
            out["local_epsilon_spent_max"] = round(
                max(ledger.local_spent() for ledger in ledgers), 3
            )
    print(f"{run.label}: {out}", file=sys.stderr, flush=True)
    return out


def run_all_in_simnet(
    runs: list[SimnetRun], jobs: int, cache: Path | None = None
) -> list[dict[str, Any]]:
    """``runs`` in up to ``jobs`` fresh local processes (spawned: no state of one run
    reaches another, and torch and trio threads are not forked mid-operation).

    With ``cache`` (a JSON-lines file), each finished run is appended as its scenario
    text and figures, and a run whose exact scenario text is there already is not run
    again: a long benchmark interrupted on a busy machine resumes where it stopped (the
    same scenario gives the same figures: simnet is deterministic)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    done: dict[str, dict[str, Any]] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            done[entry["scenario"]] = entry["result"]
    texts = [scenario_text(run) for run in runs]
    todo = [(run, text) for run, text in zip(runs, texts, strict=True) if text not in done]
    if todo:
        print(f"{len(todo)} simnet runs to do, {jobs} at a time", file=sys.stderr)

    def finished(text: str, result: dict[str, Any]) -> None:
        done[text] = result
        if cache is not None:
            with cache.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"scenario": text, "result": result}) + "\n")

    if jobs <= 1:
        for run, text in todo:
            finished(text, run_in_simnet(run))
    elif todo:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, max_tasks_per_child=1) as pool:
            pending: dict[Future[dict[str, Any]], str] = {
                pool.submit(run_in_simnet, run): text for run, text in todo
            }
            while pending:
                ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in ready:
                    finished(pending.pop(future), future.result())
    return [done[text] for text in texts]


def node_level_part(
    cfg: CrossDevice,
    sweep: tuple[int, ...],
    *,
    how: str = "simnet",
    sweep_simnet_max: int = 0,
    jobs: int = 2,
    cache: Path | None = None,
) -> dict[str, Any]:
    """No DP vs distributed vs local node-level DP at ``cfg.nodes``, then at epsilon 8
    for each node count in ``sweep`` (where node-level DP starts to pay). ``how``:
    "simnet" (scenarios, the recorded result) or "replay" (:func:`cross_device`); the
    sweep runs in simnet up to ``sweep_simnet_max`` nodes and is replayed above that
    (each entry says which). The hyper-parameters come from the replay's public-data
    grid (:func:`tune_cross_device`) either way."""

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    tuning: dict[str, dict[str, Any]] = {}
    off_tuning, _ = tune_cross_device(cfg, "off", None)
    tuning["off"] = asdict(off_tuning)
    chosen: dict[tuple[str, float], ServerTuning] = {}
    for level, name in (("distributed", "distributed"), ("node", "local")):
        for epsilon in EPSILONS:
            best, _ = tune_cross_device(cfg, level, epsilon)
            chosen[level, epsilon] = best
            tuning[f"{name} {epsilon:g}"] = asdict(best)
    say(f"tuned on public data: {tuning}")
    # the targets' settings (epsilon 8) first: a run cut short has them in its cache
    settings: list[tuple[str, float | None, ServerTuning]] = [("off", None, off_tuning)]
    settings += [
        (level, e, chosen[level, e]) for e in EPSILONS[::-1] for level in ("distributed", "node")
    ]
    # the sweep at epsilon 8, the simnet part of it run with the main settings
    small: list[tuple[int, str, float | None, ServerTuning]] = [
        (count, level, eps, chosen[level, 8.0] if level != "off" else off_tuning)
        for count in sweep
        for level, eps in (("off", None), ("distributed", 8.0), ("node", 8.0))
    ]
    simnet_small = [s for s in small if how == "simnet" and s[0] <= sweep_simnet_max]
    figures: dict[tuple[int, str, float | None], dict[str, Any]] = {}
    if how == "simnet":
        runs = [SimnetRun(cfg, level, eps, t) for level, eps, t in settings]
        runs += [SimnetRun(replace(cfg, nodes=c), lv, e, t) for c, lv, e, t in simnet_small]
        for run, got in zip(runs, run_all_in_simnet(runs, jobs, cache), strict=True):
            figures[run.cfg.nodes, run.level, run.epsilon] = got
    else:
        data = _cross_device_data(cfg)
        for level, eps, t in settings:
            acc = cross_device(cfg, data, level, eps, t)
            figures[cfg.nodes, level, eps] = {"accuracy": round(acc, 4)}
            say(f"replay {cfg.nodes} nodes, {level} {eps}: {acc:.4f}")
    out: dict[str, Any] = {
        "how": how,
        "task": (
            f"{cfg.nodes} nodes x {cfg.records} records, 10-class generated "
            "(bench/_crossdevice_task.py), linear model "
            f"({CLASSES * FEATURES + CLASSES} parameters), 1 local epoch a round"
        ),
        "accuracy": (
            "mean over the nodes of each node's final model's accuracy on the shared test "
            "set (exact rounds: every node holds the same model)"
            if how == "simnet"
            else "accuracy of the replayed federation's model on the shared test set"
        ),
        "rounds": cfg.rounds,
        "grouping": "exact rounds" if how == "simnet" else "random groups for the noise",
        "group_min": cfg.group_min,
        "group_size": cfg.group_size,
        "nonprivate": figures[cfg.nodes, "off", None]["accuracy"],
    }
    for level, name in (("distributed", "distributed"), ("node", "local")):
        out[name] = {f"{e:g}": figures[cfg.nodes, level, e]["accuracy"] for e in EPSILONS}
    local_eps = {}
    for epsilon in EPSILONS:
        sigma = dp.calibrate("distributed", epsilon=epsilon, delta=DELTA, rounds=cfg.rounds)
        local_z = nominal_noise_multipliers(sigma, cfg.group_min)[1]
        local_eps[f"{epsilon:g}"] = round(distributed_epsilon_for(local_z, cfg.rounds, DELTA), 3)
    out["distributed_local_epsilon"] = local_eps
    if how == "simnet":
        out["runs"] = {
            f"{'nonprivate' if lv == 'off' else lv} {e or ''}".strip(): figures[cfg.nodes, lv, e]
            for lv, e, _ in settings
        }
    out["tuning"] = tuning
    by_nodes: dict[str, dict[str, Any]] = {}
    for count in sweep:
        entry: dict[str, Any] = {}
        small_cfg = replace(cfg, nodes=count)
        small_data = None
        for level, eps, name in (
            ("off", None, "nonprivate"),
            ("distributed", 8.0, "distributed"),
            ("node", 8.0, "local"),
        ):
            if (count, level, eps) in figures:
                entry[name] = figures[count, level, eps]["accuracy"]
                entry["how"] = "simnet"
                continue
            if small_data is None:
                small_data = _cross_device_data(small_cfg)
            t = off_tuning if level == "off" else chosen[level, 8.0]
            entry[name] = round(cross_device(small_cfg, small_data, level, eps, t), 4)
            entry["how"] = "replay"
        by_nodes[str(count)] = entry
        say(f"epsilon 8 at {count} nodes: {entry}")
    out["epsilon_8_by_nodes"] = by_nodes
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=Setup.rounds)
    parser.add_argument("--records", type=int, default=Setup.records)
    parser.add_argument("--seed", type=int, default=Setup.seed)
    parser.add_argument("--nodes", type=int, default=Setup.nodes)
    parser.add_argument("--device-nodes", type=int, default=CrossDevice.nodes)
    parser.add_argument("--device-rounds", type=int, default=CrossDevice.rounds)
    parser.add_argument("--skip-record", action="store_true", help="only the node-level part")
    parser.add_argument(
        "--node-level",
        choices=("simnet", "replay"),
        default="simnet",
        help="run the node-level settings as simnet scenarios (default) or replay them",
    )
    parser.add_argument("--jobs", type=int, default=2, help="simnet runs at a time")
    parser.add_argument(
        "--sweep-simnet-max",
        type=int,
        default=0,
        help="the epsilon-8 sweep runs in simnet up to this many nodes, replayed above",
    )
    parser.add_argument(
        "--runs-cache",
        type=Path,
        default=None,
        help="JSON-lines file of finished simnet runs: reused, and appended to",
    )
    parser.add_argument("--record", action="store_true", help="store in bench/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.monotonic()
    result: dict[str, Any] = {
        "bench": "privacy",
        "delta": DELTA,
        "tuned_on": (
            f"public data: the same generator with seed + {PUBLIC_SEED_OFFSET} (record level: "
            "offline grid, values in Setup; node level: the grid in tune_cross_device); "
            "no tuning on the measured data, so none is charged to the budget"
        ),
        "chance": round(1 / CLASSES, 2),
    }
    met: dict[str, bool] = {}
    # the node level first: its simnet runs are the long part (and the new one)
    cfg = CrossDevice(nodes=args.device_nodes, rounds=args.device_rounds, seed=args.seed)
    sweep = tuple(n for n in (16, 64, 256) if n < cfg.nodes)
    node = node_level_part(
        cfg,
        sweep,
        how=args.node_level,
        sweep_simnet_max=args.sweep_simnet_max,
        jobs=args.jobs,
        cache=args.runs_cache,
    )
    result["node_level"] = node
    # which figures are simnet's: the targets are judged on them
    met["node_level_in_simnet"] = node["how"] == "simnet"
    met["distributed_eps8_within_10_of_nonprivate"] = (
        node["nonprivate"] - node["distributed"]["8"] <= 0.10
    )
    met["distributed_clearly_ahead_of_local_eps8"] = (
        node["distributed"]["8"] - node["local"]["8"] >= 0.05
    )
    if not args.skip_record:
        setup = Setup(rounds=args.rounds, records=args.records, seed=args.seed, nodes=args.nodes)
        parts, test = make_data(setup)
        record, union = {}, {}
        nonprivate = federated(setup, parts, test, None)
        for epsilon in EPSILONS:
            key = f"{epsilon:g}"
            record[key] = round(federated(setup, parts, test, epsilon), 4)
            union[key] = round(central(setup, parts, test, epsilon), 4)
            print(f"epsilon {key}: record {record[key]}, central {union[key]}", file=sys.stderr)
        result["record_level"] = {
            "task": f"{setup.nodes} nodes x {setup.records} records, 10-class generated, MLP",
            "rounds": setup.rounds,
            "nonprivate": round(nonprivate, 4),
            "federated": record,
            "central_dp_sgd": union,
            "setup": asdict(setup),
        }
        met["record_eps8_within_5_of_nonprivate"] = nonprivate - record["8"] <= 0.05
        met["record_within_5_of_central_every_epsilon"] = all(
            union[k] - record[k] <= 0.05 for k in record
        )
    result["met"] = met
    result["seconds"] = round(time.monotonic() - began, 1)
    assert all(math.isfinite(float(v)) for v in node["distributed"].values())
    print(json.dumps(report("privacy", result, record=args.record)))


if __name__ == "__main__":
    main()
