"""A framework-free federated-learning reference: FedAvg, FedAvgM and FedAdam in a loop.

This is the yardstick ``bench/convergence.py`` holds p2pfed (and Flower) against. It shares
nothing with p2pfed's node code: no group protocol, no fixed point, no node. Only the task
is shared (``p2pfed.tasks.digits_cnn``: model, data partition, local training with its
replayable batch order), exactly as a Flower client would share it.

Rules of this file:

* **The textbook algorithm.** Every round, every client starts from the global model ``x``,
  trains locally (``task.train`` with ``RoundContext(round=r)``), and the server forms the
  sample-weighted mean of the client models, weights ``n_k`` = the client's number of
  training examples (McMahan et al. 2017). Sums run in float64 in client order 0, 1, ...
  (Flower sorts replies too, so the order is fixed), and the result is cast to float32.
* **Server optimisers** (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) act on
  the pseudo-gradient ``delta = mean - x``: FedAvg ``x = mean``; FedAvgM
  ``m = beta * m + delta; x = x + lr * m``; FedAdam ``m = b1 * m + (1 - b1) * delta,
  v = b2 * v + (1 - b2) * delta**2, x = x + lr * m / (sqrt(v) + tau)``, ``m`` and ``v``
  starting at 0 and kept in float64.
* Torch on one thread, as in a node process, so the local steps give the same floats.

Example::

    >>> setup = Setup(num_nodes=4, rounds=2, task_settings={"lr": 0.05})
    >>> history = replay(setup, ServerOptimizer("fedavg"))
    >>> len(history.accuracy)          # after rounds 1 and 2
    2
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from p2pfed.task import NodeData, RoundContext
from p2pfed.tasks.digits_cnn import task

__all__ = [
    "History",
    "RandomGroups",
    "ServerOptimizer",
    "ServerState",
    "Setup",
    "centralized",
    "client_data",
    "random_partition",
    "random_replay",
    "replay",
    "round_schedule",
    "weighted_mean",
]

OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


@dataclass(frozen=True)
class Setup:
    """One learning problem: the clients, the task settings and the number of rounds."""

    num_nodes: int = 16
    rounds: int = 100
    seed: int = 7
    task_settings: dict[str, Any] = field(default_factory=dict)

    def config(self, node_index: int = 0) -> dict[str, Any]:
        """The task ``config`` of client ``node_index`` (what a node gets from ``--set``)."""
        return {
            **self.task_settings,
            "node_index": node_index,
            "num_nodes": self.num_nodes,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class ServerOptimizer:
    """Which server optimiser, with its hyper-parameters (FedAvg ignores them)."""

    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    """FedAvgM's beta, FedAdam's beta1."""
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"server optimizer must be one of {OPTIMIZERS}, got {self.kind!r}")


@dataclass
class ServerState:
    """The server optimiser's moments (float64, zero at the start)."""

    m: np.ndarray | None = None
    v: np.ndarray | None = None


def weighted_mean(models: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """FedAvg's average: ``sum(n_k * x_k) / sum(n_k)`` in float64, in the given order.

    >>> weighted_mean([np.array([1.0, 0.0]), np.array([4.0, 3.0])], [2, 1])
    array([2., 1.], dtype=float32)
    """
    total = np.zeros(len(models[0]), dtype=np.float64)
    for model, weight in zip(models, weights, strict=True):
        total += float(weight) * model.astype(np.float64)
    return (total / float(sum(weights))).astype(np.float32)


def server_step(
    optimizer: ServerOptimizer, state: ServerState, x_prev: np.ndarray, mean: np.ndarray
) -> np.ndarray:
    """The new global model from the previous one and the round's client mean.

    >>> opt, state = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5), ServerState()
    >>> x = np.zeros(1, np.float32)
    >>> x = server_step(opt, state, x, np.ones(1, np.float32)); x        # m = 1
    array([1.], dtype=float32)
    >>> server_step(opt, state, x, np.full(1, 2.0, np.float32))          # m = 0.5 + 1
    array([2.5], dtype=float32)
    """
    if optimizer.kind == "fedavg":
        return mean.copy()
    delta = mean.astype(np.float64) - x_prev.astype(np.float64)
    if state.m is None:
        state.m = np.zeros_like(delta)
    if optimizer.kind == "fedavgm":
        state.m = optimizer.momentum * state.m + delta
        step = optimizer.lr * state.m
    else:  # fedadam
        if state.v is None:
            state.v = np.zeros_like(delta)
        state.m = optimizer.momentum * state.m + (1.0 - optimizer.momentum) * delta
        state.v = optimizer.beta2 * state.v + (1.0 - optimizer.beta2) * delta * delta
        step = optimizer.lr * state.m / (np.sqrt(state.v) + optimizer.tau)
    return (x_prev.astype(np.float64) + step).astype(np.float32)


def _to_vector(model: torch.nn.Module) -> np.ndarray:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy().copy()


def _load_vector(model: torch.nn.Module, vector: np.ndarray) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.from_numpy(vector.copy()), model.parameters())


def client_data(setup: Setup) -> list[NodeData]:
    """Every client's data, as the task gives it to node ``k``."""
    return [task.load_data(setup.config(k)) for k in range(setup.num_nodes)]


@dataclass
class History:
    """Test metrics of the global model after each round, and what the run cost."""

    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    final_model: np.ndarray | None = None
    spread: list[float] = field(default_factory=list)
    """Random replays: the largest minus the smallest node's accuracy after each round."""
    consensus_accuracy: list[float] = field(default_factory=list)
    """Random replays: the accuracy of the weighted mean of the nodes' models (what exact
    averaging would have given every node) after each round."""


def initial_model(setup: Setup) -> np.ndarray:
    """The initial global model, as every node builds it."""
    return _to_vector(task.build_model(setup.config(0)))


def local_update(
    setup: Setup, data: NodeData, node_index: int, round_index: int, x: np.ndarray
) -> np.ndarray:
    """Client ``node_index``'s model after local training from ``x`` in round ``round_index``
    (0-based), as a node computes it."""
    model = task.build_model(setup.config(node_index))
    _load_vector(model, x)
    context = RoundContext(round=round_index, local_round=round_index)
    task.train(model, data, setup.config(node_index), torch.Generator(), context)
    return _to_vector(model)


def evaluate(setup: Setup, data: NodeData, x: np.ndarray) -> dict[str, float]:
    """Test metrics of the model ``x`` (the test set is common to all clients)."""
    model = task.build_model(setup.config(0))
    _load_vector(model, x)
    return task.evaluate(model, data, setup.config(0))


def replay(
    setup: Setup,
    optimizer: ServerOptimizer,
    *,
    datasets: list[NodeData] | None = None,
    progress: Any = None,
    nudge_round: int | None = None,
) -> History:
    """Run ``setup.rounds`` rounds of federated training with ``optimizer``; the accuracy
    and loss of the global model on the common test set after every round.

    ``nudge_round`` (1-based): after that round, move the global model's largest
    coordinate by one float32 ulp, the size of difference any other summation order or
    number format makes; how far the curve then moves is the chaos floor of the task."""
    torch.set_num_threads(1)
    datasets = datasets if datasets is not None else client_data(setup)
    weights = [d.num_train for d in datasets]
    x = initial_model(setup)
    state = ServerState()
    history = History()
    wall, cpu = time.perf_counter(), time.process_time()
    for r in range(setup.rounds):
        models = [local_update(setup, d, k, r, x) for k, d in enumerate(datasets)]
        x = server_step(optimizer, state, x, weighted_mean(models, weights))
        if nudge_round is not None and r + 1 == nudge_round:
            i = int(np.argmax(np.abs(x)))
            x[i] = np.nextafter(x[i], np.float32(np.inf))
        metrics = evaluate(setup, datasets[0], x)
        history.accuracy.append(metrics["accuracy"])
        history.loss.append(metrics["loss"])
        if progress is not None:
            progress(r + 1, metrics["accuracy"])
    history.wall_seconds = time.perf_counter() - wall
    history.cpu_seconds = time.process_time() - cpu
    history.final_model = x
    return history


def centralized(setup: Setup) -> History:
    """One model trained on the union of all clients' data, ``rounds x local_epochs``
    epochs; the accuracy after each epoch group that corresponds to one round."""
    torch.set_num_threads(1)
    epochs_per_round = int(setup.config().get("local_epochs", 1))
    wall, cpu = time.perf_counter(), time.process_time()
    records = task.centralized_baseline(
        setup.config(), setup.rounds * epochs_per_round, every=epochs_per_round
    )
    history = History(
        accuracy=[r["accuracy"] for r in records],
        loss=[r["loss"] for r in records],
        wall_seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
    )
    return history


def with_rounds(setup: Setup, rounds: int) -> Setup:
    """``setup`` with another number of rounds."""
    return dataclasses.replace(setup, rounds=rounds)


# -- random groups ------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomGroups:
    """Push-sum over random groups, as p2pfed's ``averaging = "random"`` runs it
    (spec/group.md, "Random rounds"), idealised: every round all clients train from their
    own model, each with weight ``n_k``; then ``steps`` times the clients split into random
    groups whose members all adopt the group's weighted mean and an equal share of its
    weight. The model each client holds is the one it trains from and is evaluated.

    ``large_groups``: the probability that a group has ``group_max`` members rather than
    ``group_min`` (p2pfed's initiator invites ``group_max - 1`` peers and starts with those
    that accept; on 16 busy nodes about 30% of its groups are of 4)."""

    steps: int = 3
    group_min: int = 3
    group_max: int = 4
    large_groups: float = 1.0
    seed: int = 0
    ready_spread: float = 0.0
    """0: synchronous steps, each a random partition of all clients. Above 0: groups form
    as on real nodes (:func:`round_schedule`): clients finish training at uniformly random
    times in ``[0, ready_spread]`` group durations, and groups form among the clients free
    at the time."""
    late_nodes: int = 0
    """How many clients (the last ones) miss round 1 and adopt a round-1 model of one of
    the others instead, as p2pfed nodes that come up after the first ones have run round 1
    do (``_sync_model``)."""

    def __post_init__(self) -> None:
        if not 1 <= self.group_min <= self.group_max or self.steps < 1:
            raise ValueError("need 1 <= group_min <= group_max and steps >= 1")


def random_partition(n: int, groups: RandomGroups, rng: np.random.Generator) -> list[list[int]]:
    """``range(n)`` cut into random groups of ``group_min..group_max`` members (a group of
    fewer only when ``n < group_min``).

    >>> parts = random_partition(16, RandomGroups(), np.random.default_rng(0))
    >>> sorted(len(p) for p in parts), sorted(i for p in parts for i in p) == list(range(16))
    ([4, 4, 4, 4], True)
    """
    order = [int(i) for i in rng.permutation(n)]
    low, high = groups.group_min, groups.group_max
    parts: list[list[int]] = []
    while order:
        left = len(order)
        if left <= high:
            size = left
        else:
            size = high if rng.random() < groups.large_groups else low
            if 0 < left - size < low:  # leave a remainder that can still form a group
                size = left - low if left - low >= low else left
        parts.append(order[:size])
        order = order[size:]
    return parts


def round_schedule(
    n: int, groups: RandomGroups, rng: np.random.Generator
) -> list[tuple[str, list[int]]]:
    """One round of random groups, asynchronously as p2pfed's nodes form them: a list of
    ``("group", members)`` in the order they form and ``("done", [k])`` when client ``k``
    has joined ``groups.steps`` groups (and is evaluated).

    Time is counted in mean group durations. Client ``k`` becomes free (trained) at a
    uniformly random time in ``[0, ready_spread]``. The client with steps left that has
    waited longest initiates, as ``p2pfed.grouping.RandomGrouping`` does: it invites
    ``group_max - 1`` clients at random; those free accept, whether they have steps left
    or are done and waiting for the round's end (spec/group.md, "Random rounds", pace:
    they answer invites), those still training or in another group decline. With at least
    ``group_min - 1`` acceptances the group forms and keeps its members busy for 0.7 to
    1.3 durations; with fewer the initiator tries again 0.05 to 0.3 durations later (as
    it does 0.05 to 0.3 after becoming free). So
    the clients that finish training first group mostly among themselves and may be done
    before the last ones have trained. (``large_groups`` plays no part: the sizes follow
    from the acceptances.)

    >>> schedule = round_schedule(16, RandomGroups(ready_spread=2.0), np.random.default_rng(1))
    >>> sorted(k for kind, (k, *_) in schedule if kind == "done") == list(range(16))
    True
    """
    free_at = rng.uniform(0.0, groups.ready_spread, n)
    next_try = free_at + rng.uniform(0.05, 0.3, n)  # initiators do not all invite at once
    steps = [0] * n
    events: list[tuple[str, list[int]]] = []
    invites = min(groups.group_max - 1, n - 1)
    while True:
        stepping = [k for k in range(n) if steps[k] < groups.steps]
        if not stepping:
            return events
        initiator = min(stepping, key=lambda k: (next_try[k], k))
        now = next_try[initiator]
        peers = [k for k in range(n) if k != initiator]
        invited = [int(k) for k in rng.choice(peers, invites, replace=False)]
        accepted = [k for k in invited if free_at[k] <= now]
        if len(accepted) < groups.group_min - 1:
            next_try[initiator] = now + rng.uniform(0.05, 0.3)
            continue
        members = [initiator, *accepted]
        events.append(("group", members))
        busy = now + rng.uniform(0.7, 1.3)
        for k in members:
            free_at[k] = busy
            next_try[k] = busy + rng.uniform(0.05, 0.3)
            if steps[k] < groups.steps:
                steps[k] += 1
                if steps[k] == groups.steps:
                    events.append(("done", [k]))


def random_replay(
    setup: Setup,
    groups: RandomGroups,
    *,
    datasets: list[NodeData] | None = None,
    progress: Any = None,
) -> History:
    """Federated training with push-sum over random groups instead of a server: the mean
    over clients of each client's test accuracy after every round (what
    ``bench/convergence.py`` reports for p2pfed's random variants), the spread between
    clients, and the accuracy of their weighted mean model."""
    torch.set_num_threads(1)
    datasets = datasets if datasets is not None else client_data(setup)
    n = len(datasets)
    rng = np.random.default_rng(groups.seed)
    models = [initial_model(setup) for _ in range(n)]
    history = History()
    wall, cpu = time.perf_counter(), time.process_time()
    for r in range(setup.rounds):
        up = n - groups.late_nodes if r == 0 else n
        models[:up] = [local_update(setup, datasets[k], k, r, models[k]) for k in range(up)]
        weights = [float(d.num_train) for d in datasets]
        accuracy = [0.0] * n
        if groups.ready_spread > 0:
            schedule = round_schedule(up, groups, rng)
        else:
            schedule = [
                ("group", part)
                for _ in range(groups.steps)
                for part in random_partition(up, groups, rng)
            ]
        for kind, part in schedule:
            if kind == "done":
                accuracy[part[0]] = evaluate(setup, datasets[0], models[part[0]])["accuracy"]
                continue
            mean = weighted_mean([models[k] for k in part], [weights[k] for k in part])
            total = sum(weights[k] for k in part)
            for k in part:
                models[k], weights[k] = mean, total / len(part)
        if groups.ready_spread <= 0:
            accuracy[:up] = [evaluate(setup, datasets[0], m)["accuracy"] for m in models[:up]]
        for k in range(up, n):  # the late: a peer's model of round 1, their own weight
            models[k] = models[int(rng.integers(up))].copy()
            accuracy[k] = evaluate(setup, datasets[0], models[k])["accuracy"]
        history.accuracy.append(float(np.mean(accuracy)))
        history.spread.append(max(accuracy) - min(accuracy))
        consensus = weighted_mean(models, weights)
        history.consensus_accuracy.append(evaluate(setup, datasets[0], consensus)["accuracy"])
        if progress is not None:
            progress(r + 1, history.accuracy[-1])
    history.wall_seconds = time.perf_counter() - wall
    history.cpu_seconds = time.process_time() - cpu
    history.final_model = weighted_mean(models, weights)
    return history
