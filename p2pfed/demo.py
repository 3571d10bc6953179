"""``p2pfed demo``: a small real federation on this machine, against centralized training.

The demo creates a federation and ``--nodes`` node directories, starts one real
``p2pfed node`` process per node (forked from one process that imported torch once, see
:mod:`p2pfed.launcher`, so co-located nodes share those pages; mDNS on the loopback
interface plus bootstrap addresses, Noise channels over TCP, secure aggregation), trains
the built-in digits task split non-IID across the nodes, and shows progress as rounds
complete. When every node has done ``--rounds`` rounds it stops them (SIGTERM: a clean
stop) and prints a table of each node's accuracy on the held-out test set next to the same
model trained centrally on the union of all nodes' data. A second federation then runs
with local differential privacy at ``--epsilon`` and its accuracy is reported too.

Example::

    $ p2pfed demo                 # 4 nodes, DP off then DP on
    $ p2pfed demo --nodes 6 --rounds 30 --no-dp
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from p2pfed.atomicfile import atomic_write_text
from p2pfed.errors import ConfigError, P2pfedError
from p2pfed.launcher import NodeLauncher, NodeProcess

if TYPE_CHECKING:
    from p2pfed.federation import Federation

__all__ = [
    "DemoRun",
    "add_demo_parser",
    "cmd_demo",
    "create_local_federation",
    "run_federation",
]

TASK = "p2pfed.tasks.digits:task"
DEFAULT_ROUNDS = 30
DEFAULT_EPSILON = 8.0
DEFAULT_DP_CLIP = 1.0
DELTA = 1e-5


def add_demo_parser(subparsers: Any) -> None:
    """``p2pfed demo [options]``."""
    p = subparsers.add_parser(
        "demo",
        help="run a small real federation on this machine and compare with central training",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--nodes", type=int, default=4, help="number of node processes (default 4)")
    p.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"training rounds (default {DEFAULT_ROUNDS})",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=DEFAULT_EPSILON,
        help=f"privacy budget of the DP run, at delta={DELTA:g} (default {DEFAULT_EPSILON:g})",
    )
    p.add_argument("--no-dp", action="store_true", help="skip the run with differential privacy")
    p.add_argument("--no-mdns", action="store_true", help="bootstrap addresses only, no mDNS")
    p.add_argument("--dir", type=Path, help="keep the node directories and logs here")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds per run"
    )
    p.set_defaults(handler=cmd_demo)


@dataclass
class DemoRun:
    """One federation run: per-node results and the settings used."""

    label: str
    dp: bool
    rounds: int
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    noise_multiplier: float | None = None
    epsilon: float | None = None
    seed: int = 0  # the federation's initial-model seed (the baseline starts from it too)


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


def _config_text(port: int, bootstrap: list[str], mdns: bool, task: str) -> str:
    return (
        "# written by p2pfed demo\n"
        'listen_host = "127.0.0.1"\n'
        f"listen_port = {port}\n"
        f"bootstrap = {json.dumps(bootstrap)}\n"
        f"mdns = {'true' if mdns else 'false'}\n"
        'mdns_interfaces = ["127.0.0.1"]\n'
        f'task = "{task}"\n'
    )


def create_local_federation(
    workdir: Path,
    federation: Federation,
    nodes: int,
    *,
    mdns: bool,
    task: str = TASK,
    bootstrap: bool = True,
) -> list[Path]:
    """Node directories for ``nodes`` nodes of ``federation`` on 127.0.0.1.

    Each gets a fresh identity, the federation file and a config listening on a free
    loopback port, with node 0 (node 1 for node 0) as bootstrap address unless
    ``bootstrap`` is false (then only mDNS can bring them together).
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
        atomic_write_text(node_dir / "config.toml", _config_text(ports[index], others, mdns, task))
        dirs.append(node_dir)
    return dirs


def _make_federation(
    workdir: Path, label: str, nodes: int, *, dp: bool, noise: float, epsilon: float, mdns: bool
) -> tuple[list[Path], int]:
    from p2pfed.federation import Federation, ProtocolParams
    from p2pfed.node import federation_seed

    # exact rounds (the default averaging): every round averages the whole federation,
    # as the digits task's calibration assumed (tests/test_tasks.py), in groups of 3 to 8
    params = ProtocolParams(
        min_nodes=nodes,  # the first round waits until every node of the demo is there
        dp_enabled=dp,
        dp_clip_norm=DEFAULT_DP_CLIP,
        dp_noise_multiplier=noise if dp else 1.0,
        dp_delta=DELTA,
        # a hair above the target so that float rounding never refuses the last round
        dp_epsilon_budget=epsilon * 1.0001 if dp else 10.0,
    )
    federation = dataclasses.replace(Federation.new(f"demo-{label}"), params=params)
    dirs = create_local_federation(workdir / label, federation, nodes, mdns=mdns)
    return dirs, federation_seed(federation)


class _Progress:
    """One status line per run, redrawn in place on a terminal, else printed sparsely."""

    def __init__(self, label: str, nodes: int, rounds: int, out: TextIO) -> None:
        self.label, self.rounds, self.out = label, rounds, out
        self.done = [0] * nodes
        self.accuracy: list[float | None] = [None] * nodes
        self.tty = out.isatty()
        self.last_printed = -1

    def update(self, index: int, round_: int, accuracy: float | None) -> None:
        self.done[index] = max(self.done[index], round_)
        if accuracy is not None:
            self.accuracy[index] = accuracy
        least = min(self.done)
        cells = " ".join(
            f"n{i}:{min(r, self.rounds)}" + (f"/{a:.2f}" if a is not None else "")
            for i, (r, a) in enumerate(zip(self.done, self.accuracy, strict=True))
        )
        line = f"[{self.label}] round {min(least, self.rounds)}/{self.rounds}  {cells}"
        if self.tty:
            self.out.write("\r" + line[:150].ljust(150))
            self.out.flush()
        elif least != self.last_printed:
            self.last_printed = least
            self.out.write(line + "\n")
            self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")


def run_federation(
    workdir: Path,
    label: str,
    nodes: int,
    rounds: int,
    *,
    dp: bool,
    epsilon: float,
    mdns: bool,
    timeout: float,
    out: TextIO = sys.stderr,
) -> DemoRun:
    """Start ``nodes`` node processes, wait for ``rounds`` rounds each, stop, collect."""
    noise = 1.0
    run = DemoRun(label=label, dp=dp, rounds=rounds)
    if dp:
        from p2pfed.accountant import noise_multiplier_for
        from p2pfed.dp import effective_noise_multiplier

        z = noise_multiplier_for(epsilon, rounds, DELTA)
        noise = z * 2.0  # sigma; node-level replacement halves it (spec/privacy.md)
        assert math.isclose(effective_noise_multiplier(noise), z)
        run.noise_multiplier, run.epsilon = noise, epsilon
    dirs, run.seed = _make_federation(
        workdir, label, nodes, dp=dp, noise=noise, epsilon=epsilon, mdns=mdns
    )
    progress = _Progress(label, nodes, rounds, out)
    # One fork server imports torch and the task once; the nodes share those pages.
    launcher = NodeLauncher(preload=["p2pfed.tasks.digits"])
    processes: list[NodeProcess] = []
    logs = []
    started = time.monotonic()
    try:
        for index, node_dir in enumerate(dirs):
            argv = [
                "node", str(node_dir), "--rounds", str(rounds), "--linger", "--log-json",
                "--set", f"node_index={index}", "--set", f"num_nodes={nodes}",
            ]  # fmt: skip
            processes.append(
                launcher.start(argv, stdout=node_dir / "node.out", stderr=node_dir / "node.log")
            )
            logs.append(open(node_dir / "node.log", encoding="utf-8"))  # noqa: SIM115
        positions = [0] * nodes
        while min(progress.done) < rounds:
            if time.monotonic() - started > timeout:
                raise P2pfedError(
                    f"the {label} federation did not finish {rounds} rounds in {timeout:g}s; "
                    f"logs are in {workdir / label}"
                )
            for index, process in enumerate(processes):
                if process.poll() is not None:
                    raise P2pfedError(
                        f"node {index} exited early (code {process.returncode}); see "
                        f"{dirs[index] / 'node.log'}"
                    )
                positions[index] = _read_progress(logs[index], positions[index], index, progress)
            time.sleep(0.2)
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
            result = json.loads(lines[-1])
            result["index"] = index
            run.results.append(result)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log_file in logs:
            log_file.close()
    run.seconds = time.monotonic() - started
    return run


def _read_progress(log_file: TextIO, position: int, index: int, progress: _Progress) -> int:
    log_file.seek(position)
    while True:
        line = log_file.readline()
        if not line.endswith("\n"):
            return position
        position += len(line.encode("utf-8"))
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "round":
            progress.update(index, int(record["round"]), record.get("accuracy"))


def centralized(seed: int, nodes: int, rounds: int) -> dict[str, float]:
    """The same initial model trained on the union of all nodes' data, as many epochs."""
    from p2pfed.tasks.digits import DEFAULT_TRAINING, task

    epochs = rounds * int(DEFAULT_TRAINING["local_epochs"])
    return task.centralized_baseline({"seed": seed, "num_nodes": nodes}, epochs)


def render_table(run: DemoRun, baseline: dict[str, float]) -> str:
    base = baseline["accuracy"]
    header = ("node", "node id", "rounds", "accuracy", "centralized", "diff")
    lines = ["{:<6} {:<12} {:>6} {:>9} {:>12} {:>7}".format(*header)]
    for result in sorted(run.results, key=lambda r: r["index"]):
        accuracy = result["metrics"].get("accuracy", float("nan"))
        lines.append(
            f"{result['index']:<6} {result['node_id'][:10]:<12} {result['round']:>6} "
            f"{accuracy:>9.4f} {base:>12.4f} {100 * (accuracy - base):>+6.2f}pt"
        )
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        raise ConfigError("--nodes must be at least 3 (the smallest secure group)")
    if args.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    keep = args.dir is not None
    workdir = Path(args.dir) if keep else Path(tempfile.mkdtemp(prefix="p2pfed-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    print(
        f"p2pfed demo: {args.nodes} node processes on this machine, digits task split non-IID, "
        f"{args.rounds} rounds, secure aggregation on\n  work directory: {workdir}",
        file=out,
    )
    try:
        print("\nfederation without differential privacy:", file=out, flush=True)
        plain = run_federation(
            workdir, "plain", args.nodes, args.rounds,
            dp=False, epsilon=args.epsilon, mdns=not args.no_mdns, timeout=args.timeout,
        )  # fmt: skip
        baseline = centralized(plain.seed, args.nodes, args.rounds)
        print(render_table(plain, baseline), file=out)
        gaps = [baseline["accuracy"] - r["metrics"].get("accuracy", 0.0) for r in plain.results]
        worst = max(gaps)
        verdict = "within" if worst <= 0.03 else "NOT within"
        print(
            f"every node {verdict} 3 points of centralized training (worst gap "
            f"{100 * worst:.2f} points); {plain.seconds:.1f}s",
            file=out,
        )
        if not args.no_dp:
            print(
                f"\nfederation with local differential privacy (epsilon={args.epsilon:g}, "
                f"delta={DELTA:g} per node over {args.rounds} rounds):",
                file=out,
                flush=True,
            )
            private = run_federation(
                workdir, "dp", args.nodes, args.rounds,
                dp=True, epsilon=args.epsilon, mdns=not args.no_mdns, timeout=args.timeout,
            )  # fmt: skip
            print(render_table(private, baseline), file=out)
            accuracies = [r["metrics"].get("accuracy", 0.0) for r in private.results]
            spent = max((r.get("epsilon_spent") or 0.0) for r in private.results)
            print(
                f"with DP: mean accuracy {sum(accuracies) / len(accuracies):.4f} at epsilon "
                f"spent {spent:.2f} (noise multiplier sigma={private.noise_multiplier:.2f}, "
                f"clip C={DEFAULT_DP_CLIP:g}); {private.seconds:.1f}s",
                file=out,
            )
        return 0 if worst <= 0.03 else 1
    finally:
        if not keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
