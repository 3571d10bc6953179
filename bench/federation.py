"""Speed and footprint of a whole federation: N real node processes on loopback.

Run from the repository root::

    python -m bench.federation [--nodes 16] [--rounds 12] [--record]

Two phases, each with fresh processes and the built-in digits task widened to a
64-64-10 MLP (4,810 parameters, "about 5,000"), secure aggregation on, DP off:

* **averaging**: ``--no-train``: every round is pure secure averaging (formation and
  all-reduce only);
* **training**: the demo task trains locally (3 epochs of SGD) before each contribution.

From each node's JSON log (one ``round`` record per completed round, with the time spent
training, forming the group and in the all-reduce) it reports the median and 90th
percentile of the round time, the split into formation and all-reduce, and in the
training phase the median training time beside the round time. At the end of each phase it
reads every node process's memory from ``/proc`` (see :mod:`bench.memory` for the
definitions): per-node RSS (max, median) and USS (private pages), and for the whole
federation ``rss_total_mb``, its resident set (every distinct physical page resident in
any node process or the fork server, counted once; needs root, else PSS is the
stand-in), the PSS total, and the plain sum of per-process RSS (which counts a shared page
once per process). The first two rounds of every node are warm-up (connections, first
groups) and are left out. ``--launch exec`` starts each node as a fresh interpreter instead
of forking it from the fork server, for comparison. ``startup_seconds`` is the time from
the first node's launch to the moment the *last* node logged its first completed round
(log times, so the 0.25 s polling does not count); the averaging phase's includes starting
the fork server, which the training phase reuses. The top-level value is the larger one.

The last line is one JSON object; ``last_recorded`` holds the previous ``--record``.

What we learned (16 nodes on the 2-core development machine, 2026-11-28):

* Rounds are fast: pure secure averaging takes 0.07 s per round (median, p90 0.16 s, on
  a quiet machine; 0.12 s while other work ran), about half of it forming the group
  (invite, replies, start: three message latencies on CPUs shared by 16 Python processes)
  and a quarter in the all-reduce itself; with training on, a round costs the training
  (0.01-0.03 s) plus 0.06-0.16 s. Everything is event driven:
  the only delays on the path are the random initiation jitter (at most 50 ms) and, after
  a failed formation, the retry backoff.
* A group loop that woke itself after every action made idle nodes spin at a full core
  (found by bench.allreduce); with the fix, idle nodes use no CPU.
* Memory: ``import torch`` alone is ~190 MB of RSS, most of it *private* (relocated
  library data, the operator registry, Python objects of the torch API: 157 of 243 MB of a
  fresh node-like interpreter are private dirty pages). Started as fresh interpreters
  (``--launch exec``), 16 nodes sat at 258-262 MB RSS each, 4.1 GB summed RSS and 2.6 GB
  PSS. The digits task already avoided scikit-learn/SciPy (-70 MB per node) and
  torch.optim/TorchDynamo (-70 MB once training starts).
* The fix is structural: co-located nodes are forked from one fork server that imported
  torch, the node and the task once and froze those objects out of the GC
  (:mod:`p2pfed.launcher`, also used by ``p2pfed demo``). Each node is still its own
  process; only the imported pages are shared copy-on-write. Measured with 16 nodes (other
  work sharing the machine): RSS 197 MB per node averaging and 203 MB training (target
  250), of which only ~26 MB is private (USS); the federation's resident memory, every
  distinct page of the 16 nodes and the fork server counted once, is 0.68 GB (PSS total
  0.63 GB; target 2 GB). Summing the 16 RSS values gives 3.2 GB because each shared
  page is counted in every process that maps it; the JSON reports that sum too
  (``rss_summed_mb``), but it is not memory the machine spends.
* Start-up (2026-12-03, 16 nodes, random averaging to leave the exact-round start-up
  out, launch to the last node's first round): a task training with ``torch.optim``
  took 10.7 s, because each node imported TorchDynamo at its first optimizer (1.2 s of
  CPU, 16 at once on 2 cores: "training 12 s" in round 1). With TorchDynamo and the other
  late imports preloaded in the fork server (``p2pfed.launcher.WARM_MODULES``): 3.5 s.
  The price: the fork server starts ~1 s later, so the digits task (no ``torch.optim``)
  went from 2.7 to 3.4 s, and its nodes' RSS grows by ~70 MB of *shared* pages (USS
  unchanged, 5 MB in a bare forked process); an optimizer-using node's private memory
  drops from 111 to 6 MB. With ``averaging = "exact"`` the slowest node's first round
  came 40-50 s after launch in those runs: a round stranded until ``class_timeout`` (fixed
  since: a node's count of nodes now includes every version-2 peer, and a fresh node
  waits for its peers to settle), and a node whose bootstrap peer was not yet listening
  waited 5 s to redial (node 0, everyone's bootstrap, is now started first).
* Round times with the fork server are unchanged: recorded run (bench/results/), 0.07 s
  median averaging (p90 0.17 s) and 0.09 s with 0.012 s of training; 0.10 s and 0.15 s in
  a run that shared the machine with three other jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from bench.memory import memory_summary
from bench.results import report
from p2pfed.launcher import NodeLauncher, NodeProcess

REPO = Path(__file__).resolve().parent.parent
TASK = "p2pfed.tasks.digits:task"
WARMUP_ROUNDS = 2


@dataclasses.dataclass
class NodeRun:
    """One node process, its log file and the ``round`` records read from it so far."""

    index: int
    node_dir: Path
    process: NodeProcess | subprocess.Popen[bytes]
    log: TextIO
    rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _partial: str = ""

    def read_log(self) -> None:
        """Collect the ``round`` records the node logged since the last call."""
        text = self._partial + self.log.read()
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            if '"event": "round"' in line:
                try:
                    self.rounds.append(json.loads(line))
                except json.JSONDecodeError:
                    continue


def _start_nodes(
    dirs: list[Path], nodes: int, *, training: bool, launcher: NodeLauncher | None
) -> list[NodeRun]:
    runs = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for index, node_dir in enumerate(dirs):
        argv = [
            "node", str(node_dir), "--log-json", "--linger",
            "--set", f"node_index={index}", "--set", f"num_nodes={nodes}", "--set", "hidden=64",
        ]  # fmt: skip
        if not training:
            argv.append("--no-train")
        log_path = node_dir / "node.log"
        process: NodeProcess | subprocess.Popen[bytes]
        if launcher is not None:
            process = launcher.start(argv, stdout=node_dir / "node.out", stderr=log_path)
        else:
            with open(log_path, "w") as log_out, open(node_dir / "node.out", "w") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "p2pfed", *argv],
                    cwd=REPO, env=env, stdout=out, stderr=log_out, start_new_session=True,
                )  # fmt: skip
        runs.append(NodeRun(index, node_dir, process, open(log_path, encoding="utf-8")))  # noqa: SIM115
        if index == 0:
            # node 0 is everyone's bootstrap address: a node dialing it before it listens
            # is refused and redials 5 s later (spec/discovery.md's backoff), missing the
            # first rounds; a deployment's bootstrap node is up first too
            wait_listening(log_path, process)
    return runs


def wait_listening(log_path: Path, process: Any, timeout: float = 30.0) -> None:
    """Wait until the node logging to ``log_path`` says it listens (or has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if "listening on port" in log_path.read_text(encoding="utf-8", errors="replace"):
            return
        time.sleep(0.02)


def run_phase(
    workdir: Path,
    label: str,
    nodes: int,
    rounds: int,
    *,
    training: bool,
    timeout: float,
    launcher: NodeLauncher | None,
) -> dict[str, Any]:
    """Run one federation until every node has ``rounds`` measured rounds; summarise."""
    from p2pfed.demo import create_local_federation
    from p2pfed.federation import Federation, ProtocolParams

    params = ProtocolParams(group_min=3, group_max=4, dp_enabled=False, min_nodes=nodes)
    federation = dataclasses.replace(Federation.new(f"bench-{label}"), params=params)
    dirs = create_local_federation(workdir / label, federation, nodes, mdns=False, task=TASK)
    started = time.monotonic()
    want = rounds + WARMUP_ROUNDS
    runs: list[NodeRun] = []
    try:
        launched = time.time()  # wall clock: compared with the UTC times of the nodes' logs
        runs = _start_nodes(dirs, nodes, training=training, launcher=launcher)
        shown = -1
        while True:
            for run in runs:
                run.read_log()
            done = min(len(r.rounds) for r in runs)
            if done != shown:
                shown = done
                print(f"[{label}] rounds done by the slowest node: {done}/{want}", file=sys.stderr)
            if done >= want:
                break
            if time.monotonic() - started > timeout:
                raise SystemExit(f"\n{label}: not finished within {timeout:g}s; see {workdir}")
            for run in runs:
                if run.process.poll() is not None:
                    raise SystemExit(f"\n{label}: node {run.index} exited; see {run.node_dir}")
            time.sleep(0.25)
        pids = [r.process.pid for r in runs]
        # The fork server holds the pages its children share: it is part of the footprint.
        servers = {Path(f"/proc/{pid}/stat").read_text().split()[3] for pid in pids}
        extra = [int(p) for p in servers if int(p) != os.getpid()]
        memory = memory_summary(pids, extra)
    finally:
        for run in runs:
            if run.process.poll() is None:
                run.process.send_signal(signal.SIGTERM)
        for run in runs:
            try:
                run.process.wait(timeout=60)
            except (subprocess.TimeoutExpired, TimeoutError):
                run.process.kill()
                run.process.wait()
            run.log.close()
    measured = [rec for r in runs for rec in r.rounds[WARMUP_ROUNDS:want]]
    startup = max(_log_time(r.rounds[0]["ts"]) for r in runs) - launched
    return _summary(label, measured, memory, startup)


def _log_time(stamp: str) -> float:
    """Seconds since the epoch of a JSON log line's ``ts`` ("2026-11-28T01:02:03.123Z")."""
    parsed = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    return parsed.replace(tzinfo=datetime.UTC).timestamp()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(
    label: str,
    records: list[dict[str, Any]],
    memory: dict[str, Any],
    startup: float,
) -> dict:
    rounds = [r["seconds"] for r in records]
    result = {
        "startup_seconds": round(startup, 2),
        "round_median_s": round(statistics.median(rounds), 4),
        "round_p90_s": round(_quantile(rounds, 0.9), 4),
        "formation_median_s": round(statistics.median(r["formation_seconds"] for r in records), 4),
        "allreduce_median_s": round(statistics.median(r["allreduce_seconds"] for r in records), 4),
        "train_median_s": round(statistics.median(r["train_seconds"] for r in records), 4),
        "rounds_measured": len(records),
        **memory,
    }
    print(f"{label}: {json.dumps(result)}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.federation", description=__doc__)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=12, help="measured rounds per node")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per phase")
    parser.add_argument(
        "--launch",
        choices=["fork-server", "exec"],
        default="fork-server",
        help="start nodes from one fork server that preloaded torch (default, as `p2pfed demo` "
        "does) or each as a fresh `python -m p2pfed node` process",
    )
    parser.add_argument("--record", action="store_true", help="store the result in bench/results/")
    args = parser.parse_args(argv)
    phases: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="p2pfed-bench-") as tmp:
        for label, train in (("averaging", False), ("training", True)):
            launcher = None
            if args.launch == "fork-server":
                launcher = NodeLauncher(preload=[TASK.partition(":")[0]])
            phases[label] = run_phase(
                Path(tmp), label, args.nodes, args.rounds,
                training=train, timeout=args.timeout, launcher=launcher,
            )  # fmt: skip
    averaging, training = phases["averaging"], phases["training"]
    result = {
        "benchmark": "federation",
        "nodes": args.nodes,
        "launch": args.launch,
        "parameters": 64 * 64 + 64 + 64 * 10 + 10,  # 4,810
        "averaging": averaging,
        "training": training,
        "training_overhead_s": round(training["round_median_s"] - training["train_median_s"], 4),
        "startup_seconds": max(averaging["startup_seconds"], training["startup_seconds"]),
        "targets": {
            "startup_seconds": 5.0,
            "averaging_round_median_s": 0.3,
            "training_round_median_minus_train_s": 0.3,
            "rss_per_node_mb": 250,
            "rss_total_mb": 2048,
        },
    }
    targets = result["targets"]
    result["met"] = {
        "startup_seconds": result["startup_seconds"] <= targets["startup_seconds"],
        "averaging_round_median_s": averaging["round_median_s"]
        <= targets["averaging_round_median_s"],
        "training_round_median_minus_train_s": result["training_overhead_s"]
        <= targets["training_round_median_minus_train_s"],
        "rss_per_node_mb": max(averaging["rss_max_mb"], training["rss_max_mb"])
        <= targets["rss_per_node_mb"],
        "rss_total_mb": max(averaging["rss_total_mb"], training["rss_total_mb"])
        <= targets["rss_total_mb"],
    }
    print(json.dumps(report("federation", result, record=args.record)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
