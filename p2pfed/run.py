"""``p2pfed run``: your task on a federation of real node processes on this machine.

``p2pfed run --task MODULE:OBJECT --nodes N`` creates a federation and ``N`` node
directories under ``--dir``, starts one real ``p2pfed node`` process per node (forked from
one fork server that imported torch and the task once, :mod:`p2pfed.launcher`; mDNS on the
loopback interface plus bootstrap addresses, Noise channels over TCP, secure aggregation),
shows one progress line (the round every node has reached, the spread of the nodes'
accuracy, epsilon spent), and stops the nodes (SIGTERM, a clean stop) when every node has
done ``--rounds`` rounds or, with ``--target-accuracy A``, when every node's accuracy on its
own test data is at least ``A`` in the same round. It then prints a table per node and
writes into ``--dir``:

* ``node<i>/``: each node's directory (identity, federation file, ``config.toml`` whose
  ``[task]`` table holds the task, ``node_index``, ``num_nodes`` and every ``--set``
  setting, ``checkpoint.bin``, ``node.log`` with its JSON log lines). ``p2pfed export
  DIR/node0 -o model.pt`` writes the trained model.
* ``rounds.csv``: per node and round, test accuracy and loss, training loss, epsilon.
* ``consensus.csv``: per round, the largest L2 distance of a node's model from the nodes'
  mean (read from the checkpoints; only rounds the runner saw every node's checkpoint of,
  and only for models of at most :data:`CONSENSUS_MAX_BYTES` in all).
* ``summary.json``: the settings, the per-node table and the run's duration.
* ``accuracy.png``, ``loss.png``, ``consensus.png``: one line per node (needs matplotlib).

The task gets, in its ``config``, ``node_index`` (0 .. N-1) and ``num_nodes`` (N), so that
it can take its share of a data set (:mod:`p2pfed.partition`), plus the ``--set`` settings.
``--param KEY=VALUE`` sets the federation's protocol parameters (``averaging = "random"``,
``server_optimizer = "fedadam"``; see ``p2pfed federation show``), and ``--epsilon E`` turns
on local differential privacy with a budget of ``E`` over ``--rounds`` rounds.

The task's module is looked up on ``PYTHONPATH`` and, as with ``python -m``, in the current
directory. ``p2pfed demo`` is this runner with the built-in digits task (:mod:`p2pfed.demo`).

Example::

    $ p2pfed run --task p2pfed.tasks.digits_cnn:task --nodes 6 --rounds 20 --dir /tmp/cnn
    $ p2pfed run --task mytasks.tabular:task --nodes 4 --target-accuracy 0.9 --set lr=0.05
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import re
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from p2pfed.atomicfile import atomic_write_text
from p2pfed.config import task_table_text
from p2pfed.errors import ConfigError, P2pfedError
from p2pfed.launcher import NodeLauncher, NodeProcess
from p2pfed.tomlfile import toml_line

if TYPE_CHECKING:
    from p2pfed.federation import Federation, ProtocolParams

__all__ = [
    "CONSENSUS_MAX_BYTES",
    "DEFAULT_ROUNDS",
    "FederationRun",
    "RunOptions",
    "add_run_parser",
    "cmd_run",
    "create_local_federation",
    "free_ports",
    "render_table",
    "run_federation",
    "write_report",
]

DEFAULT_ROUNDS = 30
DELTA = 1e-5
DEFAULT_DP_CLIP = 1.0
CONSENSUS_MAX_BYTES = 256 * 1024 * 1024
"""Consensus distances are measured only when all nodes' models fit in this many bytes."""
_POLL = 0.1  # seconds between looks at the nodes' logs


# --- node directories ----------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound and released; the nodes bind them next)."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _config_text(
    port: int, bootstrap: list[str], mdns: bool, task: str, settings: dict[str, Any] | None
) -> str:
    data: dict[str, Any] = {
        "listen_host": "127.0.0.1",
        "listen_port": port,
        "bootstrap": bootstrap,
        "mdns": mdns,
        "mdns_interfaces": ["127.0.0.1"],
    }
    if settings is None:
        data["task"] = task
    text = "# written by p2pfed run\n" + "".join(f"{toml_line(k, v)}\n" for k, v in data.items())
    if settings is None:
        return text
    return text + "\n" + task_table_text(task, settings)


def create_local_federation(
    workdir: Path,
    federation: Federation,
    nodes: int,
    *,
    mdns: bool,
    task: str = "p2pfed.tasks.digits:task",
    bootstrap: bool = True,
    settings: Callable[[int], dict[str, Any]] | None = None,
) -> list[Path]:
    """Node directories ``workdir/node<i>`` for ``nodes`` nodes of ``federation`` on 127.0.0.1.

    Each gets a fresh identity, the federation file and a config listening on a free
    loopback port, with node 0 (node 1 for node 0) as bootstrap address unless
    ``bootstrap`` is false (then only mDNS can bring them together). With ``settings``,
    node ``i``'s config.toml gets a ``[task]`` table with ``settings(i)``; without, a
    ``task = ...`` line (settings then come from ``p2pfed node --set``).
    """
    from p2pfed.federation import save_federation
    from p2pfed.identity import IDENTITY_FILE_NAME, NodeIdentity, save_identity

    ports = free_ports(nodes)
    dirs = []
    for index in range(nodes):
        node_dir = workdir / f"node{index}"
        node_dir.mkdir(parents=True, mode=0o700)
        save_identity(node_dir / IDENTITY_FILE_NAME, NodeIdentity.generate())
        save_federation(node_dir / "federation.toml", federation)
        others: list[str] = []
        if bootstrap and nodes > 1:
            others = [f"127.0.0.1:{ports[0 if index else 1]}"]
        text = _config_text(
            ports[index], others, mdns, task, settings(index) if settings is not None else None
        )
        atomic_write_text(node_dir / "config.toml", text)
        dirs.append(node_dir)
    return dirs


# --- running -------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """What to run: the task, how many nodes, when to stop, and the federation's settings."""

    task: str
    nodes: int
    rounds: int | None = DEFAULT_ROUNDS
    """Stop when every node has done this many rounds (``None``: see target_accuracy)."""
    target_accuracy: float | None = None
    """Stop when every node's accuracy reaches this in one round (with rounds None)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Task settings for every node (``--set``); node_index and num_nodes are added."""
    params: dict[str, Any] = field(default_factory=dict)
    """Protocol parameters of the federation (``--param``), over the runner's defaults."""
    epsilon: float | None = None
    """Local DP with this budget over ``rounds`` (``None``: DP off)."""
    mdns: bool = True
    timeout: float = 600.0
    label: str = "run"

    def check(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot run."""
        if self.nodes < 3:
            raise ConfigError(
                f"--nodes must be at least 3 (the smallest secure group), got {self.nodes}"
            )
        if self.rounds is None and self.target_accuracy is None:
            raise ConfigError("give --rounds or --target-accuracy")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.target_accuracy is not None and not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError(
                f"--target-accuracy must be a fraction in (0, 1], got {self.target_accuracy}"
            )
        if self.epsilon is not None:
            if self.rounds is None:
                raise ConfigError(
                    "--epsilon needs --rounds: the noise is set so that the budget lasts "
                    "that many rounds"
                )
            if not (math.isfinite(self.epsilon) and self.epsilon > 0):
                raise ConfigError(f"--epsilon must be a positive number, got {self.epsilon}")
        if self.timeout <= 0:
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        for key in ("node_index", "num_nodes"):
            if key in self.settings:
                raise ConfigError(f"--set {key}=...: the runner sets {key} for every node")

    def protocol_params(self) -> ProtocolParams:
        """The federation's parameters: the runner's defaults, ``params``, then DP."""
        from p2pfed.dp import calibrate
        from p2pfed.federation import ProtocolParams
        from p2pfed.skellam import required_clip

        # every node is there before the first round; DP only when asked for
        values: dict[str, Any] = {"min_nodes": self.nodes, "dp_enabled": False}
        values.update(self.params)
        if self.epsilon is not None:
            assert self.rounds is not None
            defaults = ProtocolParams()
            level = str(values.get("dp_level", defaults.dp_level))
            sigma = calibrate(
                level,
                epsilon=self.epsilon,
                delta=DELTA,
                rounds=self.rounds,
                sampling_rate=float(values.get("dp_sample_rate", defaults.dp_sample_rate)),
                steps=int(values.get("dp_steps", defaults.dp_steps)),
            )
            clip_norm = float(values.get("dp_clip_norm", DEFAULT_DP_CLIP))
            values.update(
                dp_enabled=True,
                dp_clip_norm=clip_norm,
                dp_noise_multiplier=sigma,
                dp_delta=DELTA,
                # a hair above the target so that float rounding never refuses the last round
                dp_epsilon_budget=self.epsilon * 1.0001,
            )
            if level == "distributed":
                # the group sum's noise needs headroom in the fixed-point range
                group_min = int(values.get("group_min", defaults.group_min))
                needed = required_clip(clip_norm, sigma, group_min)
                values["clip"] = max(float(values.get("clip", defaults.clip)), needed)
        allowed = {f.name for f in dataclasses.fields(ProtocolParams)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ConfigError(
                f"--param {unknown[0]}: not a protocol parameter; the parameters are "
                f"{', '.join(sorted(allowed))}"
            )
        return ProtocolParams(**values)


@dataclass
class FederationRun:
    """A finished run: what every node reported, round by round and at the end."""

    options: RunOptions
    workdir: Path
    dirs: list[Path]
    history: list[dict[int, dict[str, float]]]
    """Per node: round -> that round's log record (accuracy, loss, train_loss, ...)."""
    finals: list[dict[str, Any]] = field(default_factory=list)
    """Per node: the JSON line ``p2pfed node`` printed when it stopped."""
    consensus: dict[int, float] = field(default_factory=dict)
    """Round -> largest L2 distance of a node's model from the mean of all nodes'."""
    goal_round: int = 0
    """The round the stopping rule looked at: ``rounds``, or where the target was met."""
    seconds: float = 0.0
    seed: int = 0
    """The federation's initial-model seed (``seed`` in the tasks' config)."""
    noise_multiplier: float | None = None
    checked_round: int = 0
    """The last round the stopping rule has looked at."""

    def row(self, index: int) -> dict[str, Any]:
        """Node ``index``'s figures at :attr:`goal_round` (its last record up to it)."""
        history = self.history[index]
        rounds = [r for r in history if r <= self.goal_round] or list(history)
        record = history[max(rounds)] if rounds else {}
        final = self.finals[index] if index < len(self.finals) else {}
        metrics = record or final.get("metrics", {})
        return {
            "node": index,
            "node_id": final.get("node_id", ""),
            "round": max(rounds) if rounds else final.get("round", 0),
            "accuracy": metrics.get("accuracy"),
            "loss": metrics.get("loss"),
            "epsilon_spent": record.get("epsilon_spent", final.get("epsilon_spent")),
            "groups_completed": final.get("groups_completed"),
            "groups_aborted": final.get("groups_aborted"),
        }

    def kept_history(self) -> list[dict[int, dict[str, float]]]:
        """:attr:`history` up to :attr:`goal_round`: the rounds after it are the lingering
        of nodes that waited, without training, for the others to finish."""
        return [{r: v for r, v in h.items() if r <= self.goal_round} for h in self.history]

    def kept_consensus(self) -> dict[int, float]:
        """:attr:`consensus` up to :attr:`goal_round`."""
        return {r: d for r, d in self.consensus.items() if r <= self.goal_round}

    def rows(self) -> list[dict[str, Any]]:
        return [self.row(i) for i in range(len(self.dirs))]


class _Progress:
    """One status line, redrawn in place on a terminal, else printed once per round."""

    def __init__(self, label: str, nodes: int, rounds: int | None, out: TextIO) -> None:
        self.label, self.rounds, self.out = label, rounds, out
        self.latest = [0] * nodes
        self.accuracy: list[float | None] = [None] * nodes
        self.epsilon: float | None = None
        self.tty = out.isatty()
        self.last_printed = -1
        self.started = time.monotonic()

    def update(self, index: int, round_: int, record: dict[str, Any]) -> None:
        self.latest[index] = max(self.latest[index], round_)
        if record.get("accuracy") is not None:
            self.accuracy[index] = float(record["accuracy"])
        if record.get("epsilon_spent") is not None:
            self.epsilon = max(self.epsilon or 0.0, float(record["epsilon_spent"]))

    def line(self) -> str:
        least = min(self.latest)
        if self.rounds is not None:
            shown = f"round {min(least, self.rounds)}/{self.rounds}"
        else:
            shown = f"round {least}"
        known = [a for a in self.accuracy if a is not None]
        spread = (
            f"accuracy min {min(known):.3f} median {statistics.median(known):.3f} "
            f"max {max(known):.3f}"
            if known
            else "accuracy -"
        )
        epsilon = f"  epsilon {self.epsilon:.2f}" if self.epsilon is not None else ""
        return f"[{self.label}] {shown}  {spread}{epsilon}  {time.monotonic() - self.started:.0f}s"

    def show(self) -> None:
        least = min(self.latest)
        if self.tty:
            self.out.write("\r" + self.line()[:150].ljust(110))
            self.out.flush()
        elif least != self.last_printed:
            self.last_printed = least
            self.out.write(self.line() + "\n")
            self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


class _Consensus:
    """Reads the nodes' checkpoints as their rounds advance; distances of complete rounds."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self.pending: dict[int, dict[int, np.ndarray]] = {}
        self.distances: dict[int, float] = {}
        self.enabled = True

    def read(self, index: int) -> None:
        from p2pfed.checkpoint import load_checkpoint
        from p2pfed.node import CHECKPOINT_FILE_NAME

        if not self.enabled:
            return
        try:
            checkpoint = load_checkpoint(self.dirs[index] / CHECKPOINT_FILE_NAME)
        except P2pfedError:
            return  # being replaced this very moment: the next round's is read instead
        if checkpoint is None:
            return
        if checkpoint.model.nbytes * len(self.dirs) > CONSENSUS_MAX_BYTES:
            self.enabled = False
            return
        models = self.pending.setdefault(checkpoint.round, {})
        models[index] = checkpoint.model
        if len(models) == len(self.dirs):
            from simnet.checks import consensus_distance

            self.distances[checkpoint.round] = consensus_distance(list(models.values()))[0]
            del self.pending[checkpoint.round]
        for stale in [r for r in self.pending if r < checkpoint.round - 8]:
            del self.pending[stale]


def _last_error(log_path: Path) -> str:
    """The ``p2pfed: error: ...`` line a node printed last, if any."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("p2pfed: error: ")]
    if errors:
        return errors[-1][len("p2pfed: error: ") :]
    # a traceback (an error raised inside the node's task nursery): its last line
    last = [line.strip(" |") for line in lines if line.strip(" |+-")]
    if not last:
        return ""
    return re.sub(r"^p2pfed\.errors\.\w+: ", "", last[-1])[:300]


def _goal_met(run: FederationRun, latest: list[int]) -> bool:
    options = run.options
    least = min(latest)
    if options.rounds is not None:
        if least >= options.rounds:
            run.goal_round = options.rounds
            return True
        return False
    assert options.target_accuracy is not None
    # every round all nodes have reached, in order: the runner may see several at once
    while run.checked_round < least:
        round_ = run.checked_round = run.checked_round + 1
        accuracies = []
        for history in run.history:
            rounds = [r for r in history if r <= round_ and "accuracy" in history[r]]
            if rounds:
                accuracies.append(history[max(rounds)]["accuracy"])
        if len(accuracies) == len(run.history) and min(accuracies) >= options.target_accuracy:
            run.goal_round = round_
            return True
    return False


def run_federation(workdir: Path, options: RunOptions, out: TextIO | None = None) -> FederationRun:
    """Create the federation in ``workdir``, run it until its goal, stop it, collect.

    The progress line goes to ``out`` (default: standard error)."""
    from p2pfed.federation import Federation, task_model_fingerprint
    from p2pfed.node import federation_seed
    from p2pfed.task import load_task

    options.check()
    load_task(options.task)  # a clear error now, rather than N failed node processes
    params = options.protocol_params()
    if options.nodes < params.group_min:
        raise ConfigError(
            f"--nodes {options.nodes} is fewer than the federation's group_min "
            f"({params.group_min}): no secure group could form"
        )
    federation = dataclasses.replace(Federation.new(f"{options.label}-federation"), params=params)
    # the layout goes into the file: a node started with other settings refuses to run
    node_settings = {**options.settings, "node_index": 0, "num_nodes": options.nodes}
    try:
        fingerprint = task_model_fingerprint(options.task, node_settings, federation)
    except Exception:
        # a task that cannot build its model: every node says why in its one error line
        fingerprint = None
    federation = dataclasses.replace(federation, model_fingerprint=fingerprint)
    dirs = create_local_federation(
        workdir,
        federation,
        options.nodes,
        mdns=options.mdns,
        task=options.task,
        settings=lambda i: {**options.settings, "node_index": i, "num_nodes": options.nodes},
    )
    run = FederationRun(
        options=options,
        workdir=workdir,
        dirs=dirs,
        history=[{} for _ in dirs],
        seed=federation_seed(federation),
        noise_multiplier=params.dp_noise_multiplier if params.dp_enabled else None,
    )
    progress = _Progress(options.label, options.nodes, options.rounds, out or sys.stderr)
    consensus = _Consensus(dirs)
    # One fork server imports torch and the task once; the nodes share those pages.
    launcher = NodeLauncher(preload=[options.task.partition(":")[0]])
    processes: list[NodeProcess] = []
    logs: list[TextIO] = []
    started = time.monotonic()
    try:
        for node_dir in dirs:
            argv = ["node", str(node_dir), "--log-json"]
            if options.rounds is not None:
                # lingering nodes keep answering groups until every node has its rounds
                argv += ["--rounds", str(options.rounds), "--linger"]
            processes.append(
                launcher.start(argv, stdout=node_dir / "node.out", stderr=node_dir / "node.log")
            )
            logs.append(open(node_dir / "node.log", encoding="utf-8"))  # noqa: SIM115
        positions = [0] * len(dirs)
        while True:
            for index, process in enumerate(processes):
                if process.poll() is not None:
                    reason = _last_error(dirs[index] / "node.log")
                    raise P2pfedError(
                        f"node {index} exited early (code {process.returncode})"
                        + (f": {reason}" if reason else "")
                        + f"; its log is {dirs[index] / 'node.log'}"
                    )
                before = progress.latest[index]
                positions[index] = _read_rounds(logs[index], positions[index], index, run, progress)
                if progress.latest[index] > before:
                    consensus.read(index)
            progress.show()
            if _goal_met(run, progress.latest):
                break
            if time.monotonic() - started > options.timeout:
                goal = (
                    f"{options.rounds} rounds"
                    if options.rounds is not None
                    else f"accuracy {options.target_accuracy:g} on every node"
                )
                raise P2pfedError(
                    f"the federation did not reach {goal} in {options.timeout:g}s (round "
                    f"{min(progress.latest)} reached; {progress.line()}); raise --timeout, "
                    f"or read the logs in {workdir}"
                )
            time.sleep(_POLL)
        progress.finish()
        for process in processes:
            process.terminate()
        for index, process in enumerate(processes):
            code = process.wait(timeout=120)
            stdout = (dirs[index] / "node.out").read_text(encoding="utf-8")
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if code != 0 or not lines:
                raise P2pfedError(
                    f"node {index} did not stop cleanly (code {code}); see "
                    f"{dirs[index] / 'node.log'}"
                )
            run.finals.append(json.loads(lines[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log_file in logs:
            log_file.close()
    run.seconds = time.monotonic() - started
    run.consensus = dict(sorted(consensus.distances.items()))
    return run


_RECORD_KEYS = ("accuracy", "loss", "train_loss", "epsilon_spent", "seconds")


def _read_rounds(
    log_file: TextIO, position: int, index: int, run: FederationRun, progress: _Progress
) -> int:
    log_file.seek(position)
    while True:
        line = log_file.readline()
        if not line.endswith("\n"):
            return position
        position += len(line.encode("utf-8"))
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "round":
            round_ = int(record["round"])
            kept = {k: float(record[k]) for k in _RECORD_KEYS if record.get(k) is not None}
            run.history[index][round_] = kept
            progress.update(index, round_, kept)


# --- results -------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def render_table(run: FederationRun, baseline: float | None = None) -> str:
    """Per node: id, round, accuracy and loss at the goal round, epsilon, groups; with
    ``baseline`` (centralized accuracy) also the difference to it."""
    header = ["node", "node id", "round", "accuracy", "loss", "epsilon", "groups ok/aborted"]
    if baseline is not None:
        header[5:5] = ["centralized", "diff"]
    rows = []
    for row in run.rows():
        cells = [
            str(row["node"]),
            str(row["node_id"])[:10],
            str(row["round"]),
            _cell(row["accuracy"], ".4f"),
            _cell(row["loss"], ".4f"),
            _cell(row["epsilon_spent"], ".2f"),
            f"{row['groups_completed'] or 0}/{row['groups_aborted'] or 0}",
        ]
        if baseline is not None:
            accuracy = row["accuracy"]
            diff = "-" if accuracy is None else f"{100 * (accuracy - baseline):+.2f}pt"
            cells[5:5] = [f"{baseline:.4f}", diff]
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = []
    for cells in [header, *rows]:
        parts = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _summary(run: FederationRun) -> dict[str, Any]:
    accuracies = [r["accuracy"] for r in run.rows() if r["accuracy"] is not None]
    return {
        "task": run.options.task,
        "nodes": run.options.nodes,
        "rounds": run.options.rounds,
        "target_accuracy": run.options.target_accuracy,
        "goal_round": run.goal_round,
        "settings": run.options.settings,
        "params": run.options.params,
        "epsilon": run.options.epsilon,
        "noise_multiplier": run.noise_multiplier,
        "seconds": round(run.seconds, 3),
        "accuracy_min": min(accuracies) if accuracies else None,
        "accuracy_median": statistics.median(accuracies) if accuracies else None,
        "accuracy_max": max(accuracies) if accuracies else None,
        "consensus_rounds": len(run.kept_consensus()),
        "nodes_table": run.rows(),
    }


def write_report(run: FederationRun, out_dir: Path) -> tuple[list[Path], str | None]:
    """``rounds.csv``, ``consensus.csv``, ``summary.json`` and the plots in ``out_dir``.

    Returns the files written and, when the plots were skipped, why.
    """
    written = []
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["node", "round", *_RECORD_KEYS])
    for index, history in enumerate(run.kept_history()):
        for round_, record in sorted(history.items()):
            writer.writerow([index, round_, *(record.get(k, "") for k in _RECORD_KEYS)])
    atomic_write_text(out_dir / "rounds.csv", table.getvalue())
    written.append(out_dir / "rounds.csv")
    consensus = run.kept_consensus()
    if consensus:
        text = "round,consensus_distance_max\n" + "".join(
            f"{r},{d!r}\n" for r, d in consensus.items()
        )
        atomic_write_text(out_dir / "consensus.csv", text)
        written.append(out_dir / "consensus.csv")
    atomic_write_text(out_dir / "summary.json", json.dumps(_summary(run), indent=1) + "\n")
    written.append(out_dir / "summary.json")
    plots, skipped = _plots(run, out_dir)
    return written + plots, skipped


def _plots(run: FederationRun, out_dir: Path) -> tuple[list[Path], str | None]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], (
            "matplotlib is not installed: plots skipped (pip install matplotlib); the CSV "
            "files hold the same numbers"
        )
    written = []
    histories = run.kept_history()
    legend = len(histories) <= 16
    for name, key, label in (
        ("accuracy.png", "accuracy", "test accuracy (fraction correct)"),
        ("loss.png", "loss", "test loss"),
    ):
        figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
        drawn = False
        for index, history in enumerate(histories):
            points = [(r, rec[key]) for r, rec in sorted(history.items()) if key in rec]
            if points:
                drawn = True
                axes.plot(*zip(*points, strict=True), linewidth=1, label=f"node {index}")
        if not drawn:
            plt.close(figure)
            continue
        axes.set_xlabel("round")
        axes.set_ylabel(label)
        axes.set_title(f"{run.options.task}: {key} of each node on its test data")
        axes.grid(True, alpha=0.3)
        if legend:
            axes.legend(fontsize="small", ncol=2)
        figure.tight_layout()
        figure.savefig(out_dir / name)
        plt.close(figure)
        written.append(out_dir / name)
    consensus = run.kept_consensus()
    if consensus:
        figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
        rounds = list(consensus)
        values = [max(d, 1e-12) for d in consensus.values()]
        axes.plot(rounds, values, marker="o", linewidth=1)
        axes.set_yscale("log")
        axes.set_xlabel("round")
        axes.set_ylabel("largest L2 distance of a node's model from the mean")
        axes.set_title(f"{run.options.task}: consensus distance")
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(out_dir / "consensus.png")
        plt.close(figure)
        written.append(out_dir / "consensus.png")
    return written, None


# --- command line --------------------------------------------------------------------------


def add_run_parser(subparsers: Any) -> None:
    """``p2pfed run --task MODULE:OBJECT --nodes N [...]``."""
    p = subparsers.add_parser(
        "run",
        help="run your task on a federation of N real node processes on this machine",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--task", required=True, metavar="MODULE:OBJECT", help="the task to train")
    p.add_argument("--nodes", type=int, required=True, metavar="N", help="number of nodes")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument(
        "--rounds", type=int, metavar="R", help=f"stop after R rounds (default {DEFAULT_ROUNDS})"
    )
    goal.add_argument(
        "--target-accuracy",
        type=float,
        metavar="A",
        help="stop when every node's accuracy is at least A (a fraction) in the same round",
    )
    add_common_arguments(p)
    p.add_argument(
        "--set",
        dest="task_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task setting for every node (repeatable; numbers are converted)",
    )
    p.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a protocol parameter of the federation, e.g. averaging=random (repeatable)",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        metavar="E",
        help=f"local differential privacy: a budget of E (delta {DELTA:g}) over --rounds",
    )
    p.add_argument(
        "--dir",
        type=Path,
        help="where the node directories and results go (default ./p2pfed-run-TIMESTAMP)",
    )
    p.set_defaults(handler=cmd_run)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options ``p2pfed run`` and ``p2pfed demo`` share."""
    p.add_argument("--no-mdns", action="store_true", help="bootstrap addresses only, no mDNS")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds per run"
    )


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` protocol parameters; values are read as TOML (strings may go bare)."""
    import tomllib

    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param takes KEY=VALUE, got {pair!r}")
        try:
            params[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            params[key] = text
    return params


def _search_current_directory() -> None:
    """Find task modules in the current directory, as ``python -m`` does (the launcher
    hands this ``sys.path`` on to the node processes)."""
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)


def cmd_run(args: argparse.Namespace) -> int:
    from p2pfed.daemon import parse_task_settings

    rounds = args.rounds
    if rounds is None and args.target_accuracy is None:
        rounds = DEFAULT_ROUNDS
    options = RunOptions(
        task=args.task,
        nodes=args.nodes,
        rounds=rounds,
        target_accuracy=args.target_accuracy,
        settings=parse_task_settings(args.task_settings),
        params=parse_params(args.params),
        epsilon=args.epsilon,
        mdns=not args.no_mdns,
        timeout=args.timeout,
    )
    options.check()
    _search_current_directory()
    workdir = args.dir or Path(f"p2pfed-run-{time.strftime('%Y%m%d-%H%M%S')}")
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"{workdir} is not empty; choose a new --dir")
    workdir.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    goal = (
        f"{rounds} rounds"
        if rounds is not None
        else f"accuracy {args.target_accuracy:g} on every node"
    )
    print(
        f"p2pfed run: {args.task} on {args.nodes} node processes on this machine until "
        f"{goal}, secure aggregation on"
        + (f", local DP at epsilon {args.epsilon:g}" if args.epsilon is not None else "")
        + f"\n  directory: {workdir}",
        file=out,
        flush=True,
    )
    run = run_federation(workdir, options)
    print(render_table(run), file=out)
    summary = _summary(run)
    if summary["accuracy_min"] is not None:
        print(
            f"accuracy at round {run.goal_round}: min {summary['accuracy_min']:.4f}, median "
            f"{summary['accuracy_median']:.4f}, max {summary['accuracy_max']:.4f}; "
            f"{run.seconds:.1f}s",
            file=out,
        )
    written, skipped = write_report(run, workdir)
    print(f"results: {', '.join(p.name for p in written)} in {workdir}", file=out)
    if skipped:
        print(f"  ({skipped})", file=out)
    print(f"the model: p2pfed export {run.dirs[0]} -o model.pt", file=out)
    return 0
