"""Learning quality: p2pfed against a framework-free FedAvg reference, centralized training
and Flower, on the same data, initial model and batch order.

Run from the repository root::

    python -m bench.convergence [--rounds 100] [--variants exact-fedavg,random-fedavg]
                                [--no-flower] [--record] [--curves FILE]

Progress goes to stderr; the last line of stdout is one JSON object.

The task is ``p2pfed.tasks.digits_cnn`` (a 3,658-parameter CNN on scikit-learn's 8x8
digits), split over 16 clients with a Dirichlet(0.5) label skew (non-IID: most clients hold
a few digits mostly), one local epoch of plain SGD (lr 0.1, batches of 16) per round, and
accuracy measured on the common held-out test set (359 images). Every system below uses
the same partition, initial model (``seed``) and per-(client, round) batch order (the task
draws it from ``(seed, client, round)``), so their curves differ only by how they average.

* **p2pfed**: 16 real node processes forked from the fork-server launcher
  (:class:`p2pfed.launcher.NodeLauncher`), secure aggregation on, DP off, one federation
  run per variant, chosen by federation parameters (``[params]``):
  ``exact-fedavg`` (``averaging = "exact"``), ``exact-fedavgm`` and ``exact-fedadam``
  (``server_optimizer``), ``random-fedavg`` (``averaging = "random"``: push-sum over random
  groups of 3-4, ``random_steps`` of them per round, 5 for 16 nodes by the automatic
  rule). A variant whose parameter keys this p2pfed does not know, or whose server
  optimiser the node does not apply yet, is skipped with the reason in the JSON. The curve
  is the mean over nodes of each node's logged test accuracy after round ``r``. In random
  variants every node evaluates every round (nodes hold different models); in exact
  variants, where every node ends each round with the same model, node 0 evaluates every
  round, as Flower's server does once per round, and the others every 10th round, which
  checks that they agree (``node_accuracy_spread_max_points``).
* **reference** (:mod:`bench._fedsim`): the textbook algorithm in a loop in this process,
  sample-weighted FedAvg and the FedAvgM / FedAdam server optimisers of Reddi et al. 2021
  with the same hyper-parameters as the p2pfed variants; plus a **centralized** model
  trained on the union of the clients' data for as many epochs; and the **chaos floor**:
  each reference again with one coordinate of its model moved by one float32 ulp after
  round 10 (``differences_points.reference_<optimizer>_nudged_one_ulp``). Training is
  chaotic: any implementation whose sums differ from the reference's in the last bit
  (Flower's float32 sums) drifts from it by about this much, however exact its averaging.
  p2pfed's exact rounds sum in fixed point with the weight applied before rounding
  (spec/secure-aggregation.md, 2.1), fine enough that the decoded mean equals the
  float64 mean rounded to float32 in all but at most 2 of the 365,800 coordinates of 100
  rounds (``python -m bench.fixed_point_floor``); recorded 2026-12-03, all three exact variants
  equalled their references at every one of the 100 rounds.
* **model of random groups** (with a random variant, ``random-fedavg-model``):
  :func:`bench._fedsim.random_replay` with the node's number of steps and groups formed as
  clients become free (:func:`bench._fedsim.round_schedule`), the curve the random variant
  should follow: random groups mix less per step than the reference's exact average, and
  this is how much less (spec/group.md, "Random rounds").
* **Flower** (optional extra ``peers``): Flower's ``FedAvg`` with a real server and 16
  client processes over gRPC on 127.0.0.1 (:mod:`bench._flower`).

Reported per system: accuracy per round (every 10th and the last in the JSON; all with
``--curves``), rounds to the target accuracy, wall seconds per round (rounds 2..R: start-up
excluded), CPU seconds (all processes of the system: rounds 2..R and per round, read
while every process is up, Flower's at its last round but one since its clients' shutdown
after the last round costs seconds; and in all), and memory
(node processes' RSS as ``bench/federation.py`` reads it). ``met`` holds one boolean per
target: exact FedAvg within 0.5 points of the reference at every 10th round, each server
optimiser within 1 point of its own reference, random groups within 3 points, and p2pfed's
wall seconds per round no more than Flower's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._fedsim import (
    History,
    RandomGroups,
    ServerOptimizer,
    Setup,
    centralized,
    client_data,
    random_replay,
    replay,
)
from bench.federation import wait_listening
from bench.memory import memory_summary
from bench.results import report
from p2pfed.exact_rounds import random_steps_for

REPO = Path(__file__).resolve().parent.parent
TASK_MODULE = "p2pfed.tasks.digits_cnn"
TASK = f"{TASK_MODULE}:task"
TARGET_ACCURACY = 0.9
EVERY = 10

TASK_SETTINGS: dict[str, Any] = {
    "partition": "dirichlet",
    "alpha": 0.5,
    "lr": 0.1,
    "batch_size": 16,
    "local_epochs": 1,
}
"""The task settings of every system (what ``--set`` gives each node)."""

OPTIMIZERS: dict[str, ServerOptimizer] = {
    "fedavg": ServerOptimizer("fedavg"),
    # Hsu et al. 2019's usual server momentum; effective server step lr / (1 - beta) = 10
    "fedavgm": ServerOptimizer("fedavgm", lr=1.0, momentum=0.9),
    # Reddi et al. 2021's defaults for beta1, beta2, tau; lr chosen on this task (0.01-0.1)
    "fedadam": ServerOptimizer("fedadam", lr=0.03, momentum=0.9, beta2=0.99, tau=1e-3),
}

VARIANTS: dict[str, tuple[str, str]] = {
    "exact-fedavg": ("exact", "fedavg"),
    "exact-fedavgm": ("exact", "fedavgm"),
    "exact-fedadam": ("exact", "fedadam"),
    "random-fedavg": ("random", "fedavg"),
}
"""p2pfed variants: (averaging, server optimiser)."""

NUDGE_ROUND = 10
"""After this round the chaos-floor replay moves one coordinate of the model by one ulp."""

GROUP_MIN, GROUP_MAX = 3, 4
"""The p2pfed federations' group sizes."""

TOLERANCE_POINTS = {"exact-fedavg": 0.5, "exact-fedavgm": 1.0, "exact-fedadam": 1.0}
RANDOM_TOLERANCE_POINTS = 3.0

# What a p2pfed without the new parameters does: random groups, adopt the average.
_LEGACY_BEHAVIOUR = {"averaging": "random", "server_optimizer": "fedavg"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- comparing curves ------------------------------------------------------------------


def rounds_to_target(curve: Sequence[float], target: float) -> int | None:
    """The first round (from 1) whose accuracy reaches ``target``, or None.

    >>> rounds_to_target([0.2, 0.85, 0.91, 0.89], 0.9)
    3
    """
    return next((i + 1 for i, value in enumerate(curve) if value >= target), None)


def checkpoints(rounds: int, every: int = EVERY) -> list[int]:
    """Rounds at which curves are compared: every ``every``-th and the last.

    >>> checkpoints(25)
    [10, 20, 25]
    """
    marks = list(range(every, rounds + 1, every))
    if rounds and (not marks or marks[-1] != rounds):
        marks.append(rounds)
    return marks


def gap_points(curve: Sequence[float], reference: Sequence[float], rounds: Sequence[int]) -> dict:
    """``curve - reference`` in accuracy points at ``rounds`` (those both curves reach) and
    the largest absolute gap there; over *all* rounds, the largest and mean absolute gap and
    the first round that differs (by more than the 6 decimals a node logs), which tell float
    rounding that grows over many rounds apart from a difference from the start.

    >>> gap = gap_points([0.5, 0.61], [0.5, 0.6], [1, 2])
    >>> gap["by_round"], gap["max_abs"], gap["first_differing_round"]
    ({'1': 0.0, '2': 1.0}, 1.0, 2)
    """
    by_round = {
        str(r): round(100 * (curve[r - 1] - reference[r - 1]), 3)
        for r in rounds
        if r <= len(curve) and r <= len(reference)
    }
    worst = max((abs(v) for v in by_round.values()), default=float("nan"))
    gaps = [100 * abs(a - b) for a, b in zip(curve, reference, strict=False)]
    return {
        "by_round": by_round,
        "max_abs": worst,
        "max_abs_all_rounds": round(max(gaps), 3) if gaps else None,
        "mean_abs_all_rounds": round(sum(gaps) / len(gaps), 3) if gaps else None,
        "first_differing_round": next((i + 1 for i, g in enumerate(gaps) if g > 1e-3), None),
    }


def sampled(curve: Sequence[float], rounds: int) -> dict[str, float]:
    """The curve at the checkpoints, rounded for the JSON."""
    return {str(r): round(curve[r - 1], 4) for r in checkpoints(rounds) if r <= len(curve)}


def describe(curve: Sequence[float], rounds: int, target: float) -> dict[str, Any]:
    """Accuracy summary of one curve."""
    return {
        "accuracy": sampled(curve, rounds),
        "final_accuracy": round(curve[-1], 4) if curve else None,
        "best_accuracy": round(max(curve), 4) if curve else None,
        "rounds_to_target": rounds_to_target(curve, target),
        "rounds_done": len(curve),
    }


# -- the reference ---------------------------------------------------------------------


def random_model(setup: Setup, random_steps: int = 0) -> RandomGroups:
    """The framework-free model of a random variant (``bench._fedsim.round_schedule``):
    the node's automatic number of steps (or ``random_steps``), groups formed as clients
    become free over two group durations, which reproduced the real nodes' curve (with 3
    steps: 4.8 points behind FedAvg on average over rounds 11-30, the nodes 4.9 and 5.0)."""
    steps = random_steps or random_steps_for(
        setup.num_nodes, group_max=GROUP_MAX, group_min=GROUP_MIN
    )
    return RandomGroups(
        steps=steps, group_min=GROUP_MIN, group_max=GROUP_MAX, ready_spread=2.0, seed=setup.seed
    )


def run_references(
    setup: Setup,
    optimizers: Sequence[str],
    *,
    extra: bool = True,
    random_groups: RandomGroups | None = None,
) -> dict[str, History]:
    """The reference replay for each server optimiser, the centralized baseline, and (with
    ``extra``) FedAvg with twice the client learning rate, to tell what momentum gains
    over simply stepping further; with ``random_groups``, also the replay of push-sum over
    random groups (``random-fedavg-model``: what the random variant should show)."""
    datasets = client_data(setup)
    histories: dict[str, History] = {}
    for name in optimizers:
        log(f"[reference {name}] {setup.rounds} rounds")
        histories[name] = replay(setup, OPTIMIZERS[name], datasets=datasets)
    if random_groups is not None:
        log(f"[model of random groups, {random_groups.steps} steps] {setup.rounds} rounds")
        histories["random-fedavg-model"] = random_replay(setup, random_groups, datasets=datasets)
    if extra:
        doubled = dict(setup.task_settings)
        doubled["lr"] = 2 * float(doubled.get("lr", TASK_SETTINGS["lr"]))
        log(f"[reference fedavg, client lr {doubled['lr']:g}] {setup.rounds} rounds")
        histories["fedavg-client-lr-x2"] = replay(
            dataclasses.replace(setup, task_settings=doubled), OPTIMIZERS["fedavg"]
        )
    for name in optimizers if extra else ():
        log(f"[reference {name}, one ulp nudged after round {NUDGE_ROUND}] {setup.rounds} rounds")
        histories[f"{name}-nudged"] = replay(
            setup, OPTIMIZERS[name], datasets=datasets, nudge_round=NUDGE_ROUND
        )
    log(f"[centralized] {setup.rounds} epochs")
    histories["centralized"] = centralized(setup)
    return histories


def history_summary(history: History, rounds: int, target: float) -> dict[str, Any]:
    return {
        **describe(history.accuracy, rounds, target),
        "wall_s_per_round": round(history.wall_seconds / max(1, rounds), 4),
        "cpu_seconds": round(history.cpu_seconds, 2),
    }


# -- p2pfed ----------------------------------------------------------------------------


def variant_blocker(variant: str, allowed: Sequence[str], node_source: str) -> str | None:
    """Why ``variant`` cannot run on this p2pfed (None: it can).

    ``allowed`` is ``ProtocolParams.allowed_keys()``; ``node_source`` the text of
    ``p2pfed/node.py`` and ``p2pfed/round_loop.py`` (a server optimiser the node never
    reads would silently be FedAvg).

    >>> variant_blocker("random-fedavg", ["group_min"], "")
    >>> variant_blocker("exact-fedavg", ["group_min"], "")[:40]
    'this p2pfed has no federation parameter '
    """
    optimizer = VARIANTS[variant][1]
    for key, value in federation_params(variant).items():
        if key not in allowed and _LEGACY_BEHAVIOUR.get(key) != value:
            return (
                f"this p2pfed has no federation parameter {key!r} (ProtocolParams."
                "allowed_keys()); update p2pfed, or run the other variants with --variants"
            )
    applied = "params.server_optimizer" in node_source or re.search(
        r"self\.server_optimizer\s*=\s*(?!None\b)\S", node_source
    )
    if optimizer != "fedavg" and not applied:
        return (
            "the federation parameter server_optimizer exists, but the node does not "
            "apply it yet (it never sets self.server_optimizer): the run would be plain "
            "FedAvg; pass --force to run it anyway"
        )
    return None


def federation_params(variant: str, random_steps: int = 0) -> dict[str, Any]:
    """The ``[params]`` entries that select ``variant``."""
    averaging, optimizer = VARIANTS[variant]
    params: dict[str, Any] = {"averaging": averaging, "server_optimizer": optimizer}
    if averaging == "random" and random_steps:
        params["random_steps"] = random_steps
    if optimizer != "fedavg":
        opt = OPTIMIZERS[optimizer]
        params.update(server_lr=opt.lr, server_momentum=opt.momentum)
        if optimizer == "fedadam":
            params.update(server_beta2=opt.beta2, server_tau=opt.tau)
    return params


@dataclasses.dataclass
class _Node:
    index: int
    directory: Path
    process: Any
    log: Any
    records: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    events: dict[str, int] = dataclasses.field(default_factory=dict)
    partial: str = ""

    def read(self) -> None:
        text = self.partial + self.log.read()
        lines = text.split("\n")
        self.partial = lines.pop()
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            event = record.get("event")
            if event == "round":
                self.records.setdefault(int(record["round"]), record)
            elif isinstance(event, str):
                self.events[event] = self.events.get(event, 0) + 1
            if record.get("level") in ("ERROR", "CRITICAL"):
                self.events["errors"] = self.events.get("errors", 0) + 1

    @property
    def done(self) -> int:
        return max(self.records, default=0)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timestamp(record: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(record["ts"]).timestamp()


def run_p2pfed(
    variant: str,
    setup: Setup,
    workdir: Path,
    launcher: Any,
    *,
    timeout: float,
    random_steps: int = 0,
) -> dict[str, Any]:
    """One federation of ``setup.num_nodes`` node processes for ``setup.rounds`` rounds."""
    from p2pfed.demo import create_local_federation
    from p2pfed.federation import Federation, ProtocolParams

    allowed = set(ProtocolParams.allowed_keys())
    extra = {k: v for k, v in federation_params(variant, random_steps).items() if k in allowed}
    params = ProtocolParams(
        group_min=GROUP_MIN,
        group_max=GROUP_MAX,
        dp_enabled=False,
        min_nodes=setup.num_nodes,
        **extra,
    )
    federation = dataclasses.replace(Federation.new(f"conv-{variant}"), params=params)
    dirs = create_local_federation(
        workdir / variant, federation, setup.num_nodes, mdns=False, task=TASK
    )
    nodes: list[_Node] = []
    rounds = setup.rounds
    started = time.monotonic()
    failure: str | None = None
    cpu_at_round1: float | None = None
    cpu_total = 0.0
    memory: dict[str, Any] = {}
    try:
        for index, node_dir in enumerate(dirs):
            settings = {**setup.config(index)}
            argv = ["node", str(node_dir), "--rounds", str(rounds), "--linger", "--log-json"]
            if VARIANTS[variant][0] == "exact" and index:
                # every node of an exact round holds the same model: node 0 evaluates it
                # each round, as Flower's server does once; the others every 10th round,
                # which measures that they agree (node_accuracy_spread_max_points)
                argv += ["--evaluate-every", str(EVERY)]
            for key, value in settings.items():
                argv += ["--set", f"{key}={value}"]
            process = launcher.start(
                argv, stdout=node_dir / "node.out", stderr=node_dir / "node.log"
            )
            nodes.append(
                _Node(index, node_dir, process, open(node_dir / "node.log", encoding="utf-8"))  # noqa: SIM115
            )
            if index == 0:
                # node 0 is everyone's bootstrap address: a node that dials it before it
                # listens is refused and retries 5 s later (spec/discovery.md's backoff),
                # missing the first rounds; a deployment's bootstrap node is up first too
                wait_listening(node_dir / "node.log", process)
        shown = -1
        while True:
            for node in nodes:
                node.read()
            slowest = min(node.done for node in nodes)
            if cpu_at_round1 is None and slowest >= 1:
                cpu_at_round1 = sum(_cpu_seconds(n.process.pid) for n in nodes)
            if slowest != shown and (slowest % 10 == 0 or slowest >= rounds):
                shown = slowest
                accuracy = [n.records.get(slowest, {}).get("accuracy") for n in nodes]
                mean = _mean([a for a in accuracy if a is not None])
                log(f"[p2pfed {variant}] round {slowest}/{rounds}, mean accuracy {mean:.4f}")
            if slowest >= rounds:
                break
            exited = [n.index for n in nodes if n.process.poll() is not None]
            if exited:
                failure = f"node(s) {exited} exited early; see {dirs[exited[0]] / 'node.log'}"
                break
            if time.monotonic() - started > timeout:
                failure = (
                    f"not finished within {timeout:g}s: the slowest node logged {slowest} of "
                    f"{rounds} rounds"
                )
                break
            time.sleep(0.25)
        live = [n for n in nodes if n.process.poll() is None]
        pids = [n.process.pid for n in live]
        if pids:
            cpu_total = sum(_cpu_seconds(pid) for pid in pids)
            servers = {
                Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] for pid in pids
            }
            fork_servers = [int(p) for p in servers if int(p) != os.getpid()]
            memory = memory_summary(pids, fork_servers)
    finally:
        for node in nodes:
            if node.process.poll() is None:
                node.process.terminate()
        for node in nodes:
            try:
                node.process.wait(60)
            except TimeoutError:
                node.process.kill()
                node.process.wait(10)
            node.log.close()
    result = _summarise_nodes(nodes, rounds)
    result.update(
        variant=variant,
        federation_params={k: v for k, v in extra.items()},
        memory=memory,
        cpu_seconds=round(cpu_total, 2),
        cpu_seconds_rounds_2_to_r=round(cpu_total - cpu_at_round1, 2)
        if cpu_at_round1 is not None
        else None,
        cpu_seconds_per_round=round((cpu_total - cpu_at_round1) / (rounds - 1), 4)
        if cpu_at_round1 is not None and rounds > 1
        else None,
        elapsed_s=round(time.monotonic() - started, 2),
    )
    if failure:
        result["failure"] = failure
        log(f"[p2pfed {variant}] FAILED: {failure}")
    return result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _summarise_nodes(nodes: list[_Node], rounds: int) -> dict[str, Any]:
    """Mean accuracy per round over the nodes that logged it; timing and agreement.

    A node that started late, or fell behind, adopts its peers' round ("caught_up") and
    never logs the rounds it skipped; those rounds average over the nodes that did.
    """
    curve: list[float] = []
    spread: list[float] = []
    ends: list[float] = []
    for r in range(1, rounds + 1):
        records = [n.records[r] for n in nodes if r in n.records]
        accuracy = [float(rec["accuracy"]) for rec in records if "accuracy" in rec]
        if not accuracy:
            break
        curve.append(_mean(accuracy))
        spread.append(max(accuracy) - min(accuracy))
        ends.append(max(_timestamp(rec) for rec in records))
    missing = {
        str(n.index): [r for r in range(1, rounds + 1) if r not in n.records]
        for n in nodes
        if any(r not in n.records for r in range(1, rounds + 1))
    }
    seconds = [float(rec["seconds"]) for n in nodes for r, rec in n.records.items() if r > 1]
    # random rounds: the groups each node completed per round (fewer than its rule's
    # number only when it was stopping); exact rounds log their plan's steps
    steps = [int(rec["steps"]) for n in nodes for rec in n.records.values() if "steps" in rec]
    inexact = sum(
        1
        for n in nodes
        for r, rec in n.records.items()
        if r <= rounds and rec.get("nodes") and rec.get("coverage") != rec.get("nodes")
    )
    events: dict[str, int] = {}
    for n in nodes:
        for name, count in n.events.items():
            events[name] = events.get(name, 0) + count
    return {
        "curve": curve,
        "wall_s_per_round": round((ends[-1] - ends[0]) / (len(ends) - 1), 4)
        if len(ends) > 1
        else None,
        "node_round_median_s": round(statistics.median(seconds), 4) if seconds else None,
        "steps_per_round": {"mean": round(_mean(steps), 3), "min": min(steps), "max": max(steps)}
        if steps
        else None,
        "node_accuracy_spread_max_points": round(100 * max(spread), 3) if spread else None,
        "inexact_round_records": inexact,
        "rounds_not_logged_by_node": missing,
        "events": events,
    }


# -- Flower ----------------------------------------------------------------------------


def flower_available() -> str | None:
    """Flower's version, or None when it is not installed (``pip install 'p2pfed[peers]'``)."""
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:
        return None


def _wait4(process: subprocess.Popen[bytes], timeout: float) -> tuple[float, float] | None:
    """Reap ``process``: (CPU seconds, peak RSS in MB) from the kernel's accounting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
        time.sleep(0.1)
    return None


def run_flower(setup: Setup, workdir: Path, *, timeout: float) -> dict[str, Any]:
    """Flower's FedAvg: a server and ``setup.num_nodes`` client processes over gRPC."""
    from p2pfed.demo import free_ports

    workdir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_ports(1)[0]}"
    spec = json.dumps(dataclasses.asdict(setup))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bench._flower"]
    out_path = workdir / "server.out"
    started = time.monotonic()
    with open(out_path, "wb") as out, open(workdir / "server.err", "wb") as err:
        server = subprocess.Popen(
            [*command, "server", "--address", address, "--setup", spec],
            cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True,
        )  # fmt: skip
    clients: list[subprocess.Popen[bytes]] = []
    lines: list[dict[str, Any]] = []
    failure: str | None = None
    memory: dict[str, Any] = {}
    cpu_at_round1: float | None = None
    cpu_at_last: float | None = None
    first_done = last_done = 1
    usage: dict[int, tuple[float, float] | None] = {}
    try:
        while not lines and server.poll() is None:  # round 0: the server is up
            time.sleep(0.2)
            lines = _flower_lines(out_path)
        for index in range(setup.num_nodes):
            with open(workdir / f"client{index}.log", "wb") as log_file:
                clients.append(
                    subprocess.Popen(
                        [
                            *command,
                            "client",
                            "--address",
                            address,
                            "--setup",
                            spec,
                            "--index",
                            str(index),
                        ],
                        cwd=REPO,
                        env=env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        shown = -1
        pids = [server.pid, *(c.pid for c in clients)]
        while True:
            exited = _exited(server.pid)  # before reading: its last lines are in
            lines = _flower_lines(out_path)
            by_round = {int(x["round"]): x for x in lines if "round" in x}
            done = max(by_round, default=0)
            if cpu_at_round1 is None and done >= 1:
                cpu_at_round1 = sum(_cpu_seconds(pid) for pid in pids)
                first_done = last_done = done
            if cpu_at_round1 is not None and last_done < done < setup.rounds and not exited:
                # the latest round seen before the last: once the server has its last
                # round it shuts down, and the clients then spent seconds of CPU on
                # 2 cores (12.8 CPU-s in one 30-round run) that are no round's
                with contextlib.suppress(OSError):  # a process exited meanwhile
                    cpu_at_last, last_done = sum(_cpu_seconds(pid) for pid in pids), done
            if done >= setup.rounds - 1 and not memory and setup.rounds > 1:
                try:  # before the clients are told to disconnect
                    memory = memory_summary(pids, [])
                except OSError:
                    memory = {}
            if done != shown and (done % 10 == 0 or done >= setup.rounds):
                shown = done
                accuracy = by_round[done]["accuracy"] if done in by_round else float("nan")
                log(f"[flower] round {done}/{setup.rounds}, accuracy {accuracy:.4f}")
            if any(x.get("done") for x in lines) or done >= setup.rounds:
                break
            if exited:
                failure = f"the Flower server exited early; see {workdir / 'server.err'}"
                break
            if time.monotonic() - started > timeout:
                failure = f"not finished within {timeout:g}s ({done} of {setup.rounds} rounds)"
                break
            time.sleep(0.2)
    finally:
        for process in [server, *clients]:
            if failure and not _exited(process.pid):
                process.send_signal(signal.SIGTERM)
        for process in [server, *clients]:
            usage[process.pid] = _wait4(process, 60) if process.returncode is None else None
            if process.returncode is None:
                process.kill()
                process.wait()
    rounds_seen = {int(x["round"]): x for x in lines if "round" in x}
    curve = [
        float(rounds_seen[r]["accuracy"]) for r in range(1, setup.rounds + 1) if r in rounds_seen
    ]
    times = [float(rounds_seen[r]["time"]) for r in range(1, len(curve) + 1)]
    reaped = [u for u in usage.values() if u is not None]
    cpu_total = sum(u[0] for u in reaped)
    result: dict[str, Any] = {
        "curve": curve,
        "mode": "real server + client processes over gRPC (flwr.server.start_server / "
        "flwr.client.start_client), FedAvg, replies sorted by client index before "
        "aggregation",
        "wall_s_per_round": round((times[-1] - times[0]) / (len(times) - 1), 4)
        if len(times) > 1
        else None,
        "cpu_seconds": round(cpu_at_last if cpu_at_last is not None else cpu_total, 2),
        "cpu_seconds_rounds_2_to_r": round(cpu_at_last - cpu_at_round1, 2)
        if cpu_at_round1 is not None and cpu_at_last is not None
        else None,
        "cpu_rounds_measured": f"{first_done + 1}..{last_done}"
        if cpu_at_last is not None
        else None,
        "cpu_seconds_per_round": round((cpu_at_last - cpu_at_round1) / (last_done - first_done), 4)
        if cpu_at_round1 is not None and cpu_at_last is not None
        else None,
        "peak_rss_max_mb": round(max((u[1] for u in reaped), default=0.0), 1),
        "memory": memory,
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    if failure:
        result["failure"] = failure
        log(f"[flower] FAILED: {failure}")
    return result


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (``poll`` would, and its CPU
    and peak memory would be lost to :func:`_wait4`)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _flower_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return lines


# -- putting it together ---------------------------------------------------------------


def build_result(
    setup: Setup,
    target: float,
    references: dict[str, History],
    p2pfed_runs: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    flower: dict[str, Any] | None,
    flower_note: str | None,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """The JSON result and the full per-round curves of every system."""
    rounds = setup.rounds
    marks = checkpoints(rounds)
    curves: dict[str, list[float]] = {}
    result: dict[str, Any] = {
        "benchmark": "convergence",
        "task": TASK,
        "task_settings": setup.task_settings,
        "nodes": setup.num_nodes,
        "rounds": rounds,
        "seed": setup.seed,
        "target_accuracy": target,
        "server_optimizers": {k: dataclasses.asdict(v) for k, v in OPTIMIZERS.items()},
        "reference": {},
        "p2pfed": {},
        "skipped": skipped,
        "differences_points": {},
    }
    for name, history in references.items():
        result["reference"][name] = history_summary(history, rounds, target)
        curves[f"reference-{name}"] = history.accuracy
    met: dict[str, bool | None] = {}
    for variant, run in p2pfed_runs.items():
        curve = run.pop("curve")
        curves[f"p2pfed-{variant}"] = curve
        result["p2pfed"][variant] = {**describe(curve, rounds, target), **run}
        optimizer = VARIANTS[variant][1]
        reference = references.get(optimizer)
        if reference is None:
            continue
        gap = gap_points(curve, reference.accuracy, marks)
        result["differences_points"][f"{variant}_vs_reference_{optimizer}"] = gap
        tolerance = TOLERANCE_POINTS.get(variant, RANDOM_TOLERANCE_POINTS)
        complete = len(curve) >= rounds and "failure" not in run
        met[f"{variant}_within_{tolerance:g}pt_of_reference"] = (
            complete and gap["max_abs"] <= tolerance
        )
    model, plain = references.get("random-fedavg-model"), references.get("fedavg")
    if model is not None and plain is not None:
        # what the random variant's curve should be, were its groups formed as modelled
        result["differences_points"]["random-fedavg-model_vs_reference_fedavg"] = gap_points(
            model.accuracy, plain.accuracy, marks
        )
    for name in OPTIMIZERS:
        nudged, plain = references.get(f"{name}-nudged"), references.get(name)
        if nudged is not None and plain is not None:
            # the chaos floor: the reference against itself with one coordinate one ulp
            # off (any other float arithmetic, Flower's included, drifts about as much)
            result["differences_points"][f"reference_{name}_nudged_one_ulp"] = gap_points(
                nudged.accuracy, plain.accuracy, marks
            )
    if flower is not None:
        curve = flower.pop("curve")
        curves["flower-fedavg"] = curve
        result["flower"] = {"version": flower_available(), **describe(curve, rounds, target)}
        result["flower"].update(flower)
        if "fedavg" in references:
            result["differences_points"]["flower_vs_reference_fedavg"] = gap_points(
                curve, references["fedavg"].accuracy, marks
            )
        # compare the FedAvg variant that ran, exact groups first
        ours = next(
            (
                (name, result["p2pfed"][name].get("wall_s_per_round"))
                for name in ("exact-fedavg", "random-fedavg")
                if name in result["p2pfed"]
            ),
            None,
        )
        theirs = flower.get("wall_s_per_round")
        if ours is not None and ours[1] and theirs:
            result["wall_s_per_round_p2pfed_over_flower"] = {
                "variant": ours[0],
                "ratio": round(ours[1] / theirs, 3),
            }
            met["p2pfed_wall_per_round_le_flower"] = ours[1] <= theirs
            ours_cpu = result["p2pfed"][ours[0]].get("cpu_seconds_per_round")
            theirs_cpu = flower.get("cpu_seconds_per_round")
            if ours_cpu and theirs_cpu:
                result["cpu_s_per_round_p2pfed_over_flower"] = {
                    "variant": ours[0],
                    "ratio": round(ours_cpu / theirs_cpu, 3),
                }
    else:
        result["flower"] = {"skipped": flower_note}
    result["momentum_gain"] = _momentum_gain(references, target)
    result["met"] = met
    return result, curves


def _momentum_gain(references: dict[str, History], target: float) -> dict[str, Any]:
    """What the server optimisers buy on this task, in the reference (no p2pfed noise)."""
    gain: dict[str, Any] = {}
    base = references.get("fedavg")
    if base is None:
        return gain
    for name in ("fedavgm", "fedadam", "fedavg-client-lr-x2"):
        other = references.get(name)
        if other is None:
            continue
        gain[name] = {
            "rounds_to_target": rounds_to_target(other.accuracy, target),
            "fedavg_rounds_to_target": rounds_to_target(base.accuracy, target),
            "final_accuracy_gain_points": round(100 * (other.accuracy[-1] - base.accuracy[-1]), 2),
        }
    return gain


def accuracy_table(curves: dict[str, list[float]], rounds: int) -> str:
    """A text table of every curve at the checkpoints (stderr, and for the report)."""
    marks = checkpoints(rounds)
    width = max([len(name) for name in curves] + [8])
    lines = [f"{'system':<{width}} " + " ".join(f"{r:>6}" for r in marks)]
    for name, curve in curves.items():
        cells = [f"{curve[r - 1]:>6.3f}" if r <= len(curve) else f"{'-':>6}" for r in marks]
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.convergence",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--rounds", type=int, default=100, help="federation rounds (default 100)")
    parser.add_argument("--nodes", type=int, default=16, help="clients / node processes")
    parser.add_argument("--seed", type=int, default=7, help="partition, model and batch seed")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"p2pfed variants, comma-separated, or 'none' (default: {','.join(VARIANTS)})",
    )
    parser.add_argument(
        "--random-steps",
        type=int,
        default=0,
        help="random variants: groups per round (default 0: the node's automatic rule)",
    )
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower run")
    parser.add_argument(
        "--force", action="store_true", help="run variants even if the node seems to lack them"
    )
    parser.add_argument("--target", type=float, default=TARGET_ACCURACY)
    parser.add_argument("--timeout", type=float, help="seconds per federation run")
    parser.add_argument("--curves", type=Path, help="write every system's per-round accuracy")
    parser.add_argument("--keep", type=Path, help="keep node directories and logs here")
    parser.add_argument("--record", action="store_true", help="store the result in bench/results/")
    args = parser.parse_args(argv)
    variants = [] if args.variants == "none" else [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.rounds < 1 or args.nodes < 3:
        parser.error("--rounds must be >= 1 and --nodes >= 3 (the smallest secure group)")
    timeout = args.timeout or max(180.0, 6.0 * args.rounds)
    setup = Setup(
        num_nodes=args.nodes, rounds=args.rounds, seed=args.seed, task_settings=TASK_SETTINGS
    )
    result, curves = run_all(setup, variants, args, timeout)
    log("\n" + accuracy_table(curves, setup.rounds))
    if args.curves:
        args.curves.write_text(json.dumps(curves) + "\n", encoding="utf-8")
    print(json.dumps(report("convergence", result, record=args.record)))
    return 0


def run_all(
    setup: Setup, variants: list[str], args: argparse.Namespace, timeout: float
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Every system in turn; the JSON result and the curves."""
    from p2pfed.federation import ProtocolParams
    from p2pfed.launcher import NodeLauncher

    # the round loop applies the server optimiser (before it, p2pfed/node.py did)
    node_source = "".join(
        path.read_text(encoding="utf-8")
        for path in (REPO / "p2pfed" / "node.py", REPO / "p2pfed" / "round_loop.py")
        if path.exists()
    )
    skipped: dict[str, str] = {}
    runnable = []
    for variant in variants:
        blocker = variant_blocker(variant, ProtocolParams.allowed_keys(), node_source)
        if blocker and not (args.force and "--force" in blocker):
            skipped[variant] = blocker
            log(f"[p2pfed {variant}] skipped: {blocker}")
        else:
            runnable.append(variant)
    optimizers = ["fedavg", "fedavgm", "fedadam"]
    random_groups = (
        random_model(setup, args.random_steps)
        if any(VARIANTS[v][0] == "random" for v in runnable)
        else None
    )
    references = run_references(setup, optimizers, random_groups=random_groups)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="p2pfed-convergence-") as tmp:
        workdir = args.keep or Path(tmp)
        if runnable:
            launcher = NodeLauncher(preload=[TASK_MODULE])
            for variant in runnable:
                try:
                    runs[variant] = run_p2pfed(
                        variant,
                        setup,
                        workdir,
                        launcher,
                        timeout=timeout,
                        random_steps=args.random_steps,
                    )
                except Exception as exc:  # one broken run must not lose the others' numbers
                    log(f"[p2pfed {variant}] crashed: {exc!r}")
                    runs[variant] = {"curve": [], "failure": f"benchmark error: {exc!r}"}
        flower: dict[str, Any] | None = None
        note = None
        if args.no_flower:
            note = "--no-flower"
        elif flower_available() is None:
            note = "Flower is not installed: pip install 'p2pfed[peers]'"
        else:
            try:
                flower = run_flower(setup, workdir / "flower", timeout=timeout)
            except Exception as exc:
                log(f"[flower] crashed: {exc!r}")
                flower = {"curve": [], "failure": f"benchmark error: {exc!r}"}
        if note:
            log(f"[flower] skipped: {note}")
    return build_result(setup, args.target, references, runs, skipped, flower, note)


if __name__ == "__main__":
    raise SystemExit(main())
