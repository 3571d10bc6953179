"""Secure group averaging of a big model among 8 node processes, against the same unmasked.

Run from the repository root::

    .venv/bin/python -m bench.allreduce [--params 10000000] [--record]

Two modes run alternately (``--repeats`` times each), each run with fresh node processes
(``p2pfed node --no-train --rounds 1 --linger --log-json``) on 127.0.0.1, bootstrap
addresses only (no mDNS), the task :mod:`bench.bigmodel` (one float32 tensor of
``--params`` values, seeded differently on every node) and the protocol parameters
``group_min = group_max = 8`` (so exactly one group of all 8 forms),
``fixed_point_bits = 32`` and DP off:

* secure: the real protocol (fixed-point encoding, 7 pairwise ChaCha20 masks per member);
* plain: the same with ``--insecure-no-masking`` (encoded, not masked; the same messages).

Both use the Noise channels; only the masking differs. The all-reduce time of a member is
the time between its ``group_started`` and its ``round`` log records; a run reports the
median over the 8 members, the benchmark the median over the runs, and the slowest member
of any run. ``group_seconds`` is the span from the first ``group_started`` to the last
``round``. Caveats: a member logs ``group_started`` after it has encoded (and masked) its
contribution, so the member times exclude each member's own encoding (but not the others',
which compete for the same cores); a ``round`` record follows the decoding, the checkpoint
(the whole model, written and fsynced) and a no-op evaluation, a tail both modes share.

When every member has logged its round, all are stopped with SIGTERM and each prints
``bytes_sent``: the ciphertext bytes of all its channels, so the Noise handshakes, peer
exchange, model-sync requests and keepalives (a few KiB) are included. The bound is the
butterfly's ``2(k-1)/k`` model sizes; with a 32-bit ring a ring word has the 4 bytes of a
float32 parameter, so the bound is unambiguously ``2 * (k-1)/k * 4 * d`` bytes (a 64-bit
ring doubles the words' bytes). Above the bound a member sends one weight word, CBOR and
frame headers and the 16-byte tag of every 64 KiB Noise message (0.02%).

The JSON object on the last line of stdout has both times, ``ratio`` = secure / plain
(target: <= 1.5) and ``bytes_ratio`` = bytes sent per member / bound (target: <= 1.1),
with the last recorded result (``--record`` stores this one in bench/results/allreduce.json).
Progress goes to stderr. Three runs of each mode take about 2.5 minutes on 2 cores.

Measuring one all-reduce only: with ``--linger`` a member that has finished its round
offers its model again at once, so a second group of all 8 can form within milliseconds of
the last member's ``round`` record, before SIGTERM arrives (seen in about one run in four,
even with the signal sent 1-2 ms after that record); its traffic would be counted. The
benchmark checks every member's log for a second ``group_started`` (and the final report
for aborted groups) and repeats such a run (``--retries``, reported as ``runs_repeated``).
Stopping members earlier (without ``--linger``, or each as soon as it finishes) is not
safe: ``Node._shutdown`` closes the channels without draining their outgoing queues, so a
slower member could miss the reduced shard of one that stopped, and abort.

Where the time goes (2-core VM, d = 10**7, k = 8; recorded: secure 5.2 s, plain 4.6 s per
member, ratio 1.1, with +-20% between single runs; bytes 1.0004 x the bound):

* The CPU is saturated for the whole all-reduce (both cores busy, sampled from /proc/stat),
  about half of it in the kernel. ``perf`` over the window: 23% zeroing fresh pages (page
  faults on new buffers: each received 5 MB shard body, numpy temporaries of encoding and
  decoding, the float64 quotient of the decoding) plus the loopback TCP copies; the
  channels' ChaCha20-Poly1305 only about 5%; the Python interpreter about 16%.
* Much of that interpreter time is a busy loop: ``Node._act`` always sets ``_wake``, also
  when ``Node._group_loop`` itself calls it, so the group loop never sleeps and every node
  process uses a whole core even when idle (a lone node with no peers: 95% of a core). Eight
  spinning processes share the two cores with the real work. With that one line changed
  (the event re-armed after ``_act``; tried on a scratch copy, not in this repository) the
  same benchmark gave 3.1-3.8 s secure and 3.4-4.1 s plain.
* The masking itself is small: on one core, encoding 10**7 parameters takes 60 ms and
  encoding plus 7 masks 138 ms, so the group spends 8 x 80 ms = 0.6 CPU-s more in the
  secure mode, about 0.3 s on two cores, under 10% of the all-reduce. Summing a shard of 8
  (4 ms), decoding (50 ms) and the checkpoint (140 ms, mostly fsync) are the same in both.
* Encoding runs synchronously inside the trio loop, and an initiator sends GroupStart only
  after encoding and masking its own contribution, so the other members start encoding
  only then: ``start_spread_seconds`` (first to last ``group_started``, ~1.2 s secure and
  ~0.9 s plain) is mostly that serialisation plus seven members encoding on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.bigmodel import DEFAULT_SIZE
from bench.results import report

REPO = Path(__file__).resolve().parent.parent
TASK = "bench.bigmodel:task"
MEMBERS = 8
RING_BITS = 32
TARGET_RATIO = 1.5
TARGET_BYTES_RATIO = 1.1
POLL_SECONDS = 0.02


class BenchmarkError(RuntimeError):
    """A run could not be measured (a node failed, or the group never completed)."""


@dataclass
class Member:
    """One node process of a run and what its log said."""

    index: int
    node_dir: Path
    process: subprocess.Popen[str]
    group_started: list[float] = field(default_factory=list)
    round_at: float | None = None
    aborted: int = 0
    final: dict[str, Any] | None = None

    def observe(self, line: str) -> bool:
        """Note one JSON log line; True if it is this member's first ``round`` record."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        event = record.get("event")
        if event == "group_started":
            self.group_started.append(_timestamp(record["ts"]))
        elif event == "group_aborted":
            self.aborted += 1
        elif event == "round" and self.round_at is None:
            self.round_at = _timestamp(record["ts"])
            return True
        return False


def _timestamp(ts: str) -> float:
    """Seconds since the epoch of a log record's ``ts`` (UTC, millisecond resolution)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _federation(label: str, members: int) -> Any:
    from p2pfed.federation import Federation, ProtocolParams

    params = ProtocolParams(
        group_min=members,
        group_max=members,
        fixed_point_bits=RING_BITS,
        dp_enabled=False,
    )
    return dataclasses.replace(Federation.new(f"bench-allreduce-{label}"), params=params)


class _Stopper:
    """SIGTERMs every member the moment the last one logs its round.

    One thread per member reads its log (stderr) line by line, so the signal follows the
    last ``round`` record within milliseconds: the members linger, and the sooner they stop,
    the less likely a second group forms first (see the module docstring).
    """

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._finished = 0
        self._threads = [
            threading.Thread(target=self._read, args=(m,), daemon=True) for m in members
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, member: Member) -> None:
        stream = member.process.stderr
        assert stream is not None
        with open(member.node_dir / "node.log", "w", encoding="utf-8", buffering=1) as log:
            for line in stream:
                log.write(line)
                with self._lock:
                    if member.observe(line):
                        self._finished += 1
                        if self._finished == len(self.members):
                            for m in self.members:
                                m.process.send_signal(signal.SIGTERM)
                            self.done.set()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=30)


def run_once(rundir: Path, label: str, size: int, members: int, timeout: float) -> list[Member]:
    """Start ``members`` node processes, wait for their round, stop them; their records."""
    from p2pfed.demo import create_local_federation

    dirs = create_local_federation(
        rundir, _federation(label, members), members, mdns=False, task=TASK
    )
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
    nodes: list[Member] = []
    started = time.monotonic()
    try:
        for index, node_dir in enumerate(dirs):
            command = [
                sys.executable, "-m", "p2pfed", "node", str(node_dir),
                "--no-train", "--rounds", "1", "--linger", "--log-json",
                "--set", f"size={size}", "--set", f"init={index + 1}",
                "--set", f"samples={50 + 10 * index}",
            ]  # fmt: skip
            if label == "plain":
                command.append("--insecure-no-masking")
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            nodes.append(Member(index, node_dir, process))
        stopper = _Stopper(nodes)
        while not stopper.done.wait(0.2):
            if time.monotonic() - started > timeout:
                raise BenchmarkError(
                    f"{label}: not every member finished its round within {timeout:g}s; "
                    f"logs in {rundir} (use --keep DIR to keep them)"
                )
            for member in nodes:
                if member.process.poll() is not None:
                    raise BenchmarkError(
                        f"{label}: node {member.index} exited early (code "
                        f"{member.process.returncode}); see {member.node_dir / 'node.log'}"
                    )
        for member in nodes:
            assert member.process.stdout is not None
            stdout = member.process.stdout.read()
            member.process.wait(timeout=120)
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if member.process.returncode != 0 or not lines:
                raise BenchmarkError(
                    f"{label}: node {member.index} did not stop cleanly (code "
                    f"{member.process.returncode}); see {member.node_dir / 'node.log'}"
                )
            member.final = json.loads(lines[-1])
        stopper.join()
    finally:
        for member in nodes:
            if member.process.poll() is None:
                member.process.kill()
                member.process.wait()
    return nodes


def _clean(nodes: list[Member]) -> bool:
    """True if exactly one group ran on every member (no second, lingering group)."""
    return all(
        len(m.group_started) == 1
        and m.aborted == 0
        and m.final is not None
        and m.final.get("groups_completed") == 1
        and m.final.get("groups_aborted") == 0
        for m in nodes
    )


@dataclass
class RunSummary:
    """What one clean run of one mode measured."""

    seconds: float  # median over the members of group_started -> round
    seconds_max: float
    group_seconds: float  # first group_started to last round
    start_spread: float  # first to last group_started
    bytes_sent: float  # median over the members
    bytes_sent_max: int

    @classmethod
    def of(cls, nodes: list[Member]) -> RunSummary:
        starts = [m.group_started[0] for m in nodes]
        ends = [m.round_at for m in nodes if m.round_at is not None]
        seconds = [end - start for start, end in zip(starts, ends, strict=True)]
        sent = [int(m.final["bytes_sent"]) for m in nodes if m.final is not None]
        return cls(
            seconds=statistics.median(seconds),
            seconds_max=max(seconds),
            group_seconds=max(ends) - min(starts),
            start_spread=max(starts) - min(starts),
            bytes_sent=statistics.median(sent),
            bytes_sent_max=max(sent),
        )


class Runner:
    """Runs the two modes, repeating a run in which a second group started."""

    def __init__(self, workdir: Path, size: int, timeout: float, retries: int) -> None:
        self.workdir, self.size, self.timeout = workdir, size, timeout
        self.retries_left = retries
        self.retried = 0
        self.runs = 0

    def run(self, label: str) -> RunSummary:
        while True:
            self.runs += 1
            began = time.monotonic()
            rundir = self.workdir / f"run{self.runs}-{label}"
            nodes = run_once(rundir, label, self.size, MEMBERS, self.timeout)
            summary = RunSummary.of(nodes)
            clean = _clean(nodes)
            print(
                f"run {self.runs} ({label}): all-reduce median {summary.seconds:.2f}s max "
                f"{summary.seconds_max:.2f}s, group {summary.group_seconds:.2f}s, bytes sent "
                f"median {summary.bytes_sent:,.0f}; {time.monotonic() - began:.1f}s wall"
                f"{'' if clean else '; a second group started, repeating'}",
                file=sys.stderr,
            )
            if clean:
                return summary
            if not self.retries_left:
                raise BenchmarkError(
                    f"a second group started before the members stopped in {self.retried + 1} "
                    "runs; the bytes would not be those of one all-reduce (raise --retries)"
                )
            self.retries_left -= 1
            self.retried += 1


def _median(runs: list[RunSummary], key: str) -> float:
    return float(statistics.median(getattr(r, key) for r in runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.allreduce",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--params", type=int, default=DEFAULT_SIZE, help="model parameters (default 10^7)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each mode, interleaved (default 3)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="runs repeated at most because a second group started (default 3)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep node directories here")
    parser.add_argument("--record", action="store_true", help="store the result in bench/results/")
    args = parser.parse_args(argv)
    if args.params < MEMBERS:
        parser.error(f"--params must be at least {MEMBERS} (one word per shard)")
    if args.repeats < 1 or args.retries < 0:
        parser.error("--repeats must be at least 1 and --retries at least 0")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="p2pfed-bench-allreduce-"))
    workdir.mkdir(parents=True, exist_ok=True)
    k, d = MEMBERS, args.params
    print(
        f"{k} node processes, {d:,} parameters, {RING_BITS}-bit ring, {args.repeats} runs "
        f"of each mode; in {workdir}",
        file=sys.stderr,
    )
    runner = Runner(workdir, d, args.timeout, args.retries)
    secure: list[RunSummary] = []
    plain: list[RunSummary] = []
    try:
        for _ in range(args.repeats):
            secure.append(runner.run("secure"))
            plain.append(runner.run("plain"))
    finally:
        if args.keep is None:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
    bound = 2 * (k - 1) / k * (RING_BITS // 8) * d
    secure_s, plain_s = _median(secure, "seconds"), _median(plain, "seconds")
    secure_g, plain_g = _median(secure, "group_seconds"), _median(plain, "group_seconds")
    sent = _median(secure, "bytes_sent")
    result = {
        "benchmark": "allreduce",
        "parameters": d,
        "members": k,
        "ring_bits": RING_BITS,
        "repeats": args.repeats,
        "secure_seconds": round(secure_s, 3),
        "plain_seconds": round(plain_s, 3),
        "ratio": round(secure_s / plain_s, 3),
        "target_ratio": TARGET_RATIO,
        "secure_seconds_max": round(max(r.seconds_max for r in secure), 3),
        "plain_seconds_max": round(max(r.seconds_max for r in plain), 3),
        "secure_group_seconds": round(secure_g, 3),
        "plain_group_seconds": round(plain_g, 3),
        "group_ratio": round(secure_g / plain_g, 3),
        "bytes_sent_per_member": round(sent),
        "bytes_sent_per_member_max": max(r.bytes_sent_max for r in secure),
        "plain_bytes_sent_per_member": round(_median(plain, "bytes_sent")),
        "bound_bytes": round(bound),
        "bytes_ratio": round(sent / bound, 4),
        "target_bytes_ratio": TARGET_BYTES_RATIO,
        "secure_runs_seconds": [round(r.seconds, 3) for r in secure],
        "plain_runs_seconds": [round(r.seconds, 3) for r in plain],
        "start_spread_seconds": {
            "secure": round(_median(secure, "start_spread"), 3),
            "plain": round(_median(plain, "start_spread"), 3),
        },
        "runs_repeated": runner.retried,
        "notes": (
            "seconds: a member's group_started to round log records, median over the "
            "members, then median over the runs (max: the slowest member of any run); "
            "group_seconds: first group_started to last round; both include decoding and "
            "the checkpoint and exclude each member's own encoding, which precedes its "
            "group_started record. bytes: ciphertext sent on all channels, including "
            "handshakes, peer exchange and keepalives; bound: 2(k-1)/k x 4d bytes, a "
            "32-bit ring word being the size of a float32 parameter"
        ),
    }
    print(json.dumps(report("allreduce", result, record=args.record)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
