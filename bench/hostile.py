"""A real node under attack from other processes, while a legitimate peer joins.

Run from the repository root::

    python -m bench.hostile [--idle 1000] [--storm-rate 200] [--frames 64]

One ``p2pfed node`` process (tiny task, no mDNS) listens on 127.0.0.1. Each attack runs in
a process of its own, from a source address of its own in 127.0.0.0/8 (all loopback on
Linux), as a separate host would; the legitimate joiner connects from 127.0.0.1 and times
a full join: TCP connect, Noise handshake as a federation member, and the answer to a
ModelRequest (so the node did serve it). Attacks:

* ``idle``: ``--idle`` TCP connections opened and held without a byte (slowloris);
* ``storm``: connections opened at ``--storm-rate`` a second, each sending a few bytes of
  garbage and hanging up (issue 15 measured 10,800 a minute = 180/s);
* ``frames``: an authenticated member (it holds the federation file) opens ``--frames``
  channels and on each sends a frame header announcing the largest message the node
  accepts, plus one body byte, and holds them; the node's RSS growth is measured.

Then a **silent vanish**: four ``p2pfed node`` processes (tiny task) average in groups of
three; after ``--window`` seconds one of them is frozen with SIGSTOP, so its sockets stay
open and the kernel still accepts their bytes but nothing comes back (a frozen host, or a
cut cable as the others see it); the other three's completed rounds per second during the
next ``--window`` seconds are compared with the window before.

The last line is one JSON object: join times in seconds (median of ``--joins``) without
attack and under each attack, the largest of them, the node's RSS growth in MB under the
frame attack, and the survivors' rounds per second before and during the vanish. Targets
(issue 15): joins under attack within 2 s of the join without, RSS growth at most 64 MB,
and during the vanish the survivors keep at least 80% of their rounds per second (the
slowest of the three counts).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from p2pfed.channel import Role
from p2pfed.demo import create_local_federation, free_ports
from p2pfed.federation import Federation, ProtocolParams, load_federation
from p2pfed.identity import NodeIdentity
from p2pfed.messages import ModelRequest
from p2pfed.trio_channel import ChannelConfig, SecureChannel, open_secure_channel

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"


# -- attackers (each runs as `python -m bench.hostile --attack NAME ...`) -----------------


def attack_idle(port: int, count: int) -> None:
    held = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        held.append(sock)
    print("ready", flush=True)
    # hold them; reopen what the node closed, as the attacker did
    while True:
        time.sleep(0.5)
        for i, sock in enumerate(held):
            sock.setblocking(False)
            try:
                closed = sock.recv(1) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                sock.close()
                fresh = socket.socket()
                fresh.bind(("127.0.0.2", 0))
                with contextlib.suppress(OSError):
                    fresh.connect(("127.0.0.1", port))
                held[i] = fresh


def attack_storm(port: int, rate: float) -> None:
    print("ready", flush=True)
    interval = 1.0 / rate
    next_at = time.monotonic()
    while True:
        sock = socket.socket()
        sock.bind(("127.0.0.3", 0))
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"\x00\x07garbage")
        except OSError:
            pass
        sock.close()
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def attack_frames(port: int, federation_file: str, channels: int) -> None:
    federation = load_federation(federation_file)
    size = federation.params.max_message_size

    # the node admits a few handshakes per source address at a time (spec/transport.md,
    # 8.1): a member opens its channels a few at a time, as a real node would
    handshakes = trio.CapacityLimiter(4)

    async def hold_one(identity: NodeIdentity, opened: trio.Event) -> None:
        config = ChannelConfig(keepalive_interval=3600.0, idle_timeout=7200.0)
        await handshakes.acquire_on_behalf_of(identity)
        held = True
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with open_secure_channel(
                stream, Role.INITIATOR, identity, federation, config
            ) as ch:
                handshakes.release_on_behalf_of(identity)
                held = False
                await _hold(ch, opened)
        finally:
            if held:
                handshakes.release_on_behalf_of(identity)

    async def _hold(ch: SecureChannel, opened: trio.Event) -> None:
        frame = size.to_bytes(4, "big") + b"\xa1"
        wire = b"".join(bytes(b) for b in ch._conn._encrypt_stream([frame], 1 << 20))
        async with ch._send_lock:
            await ch.stream.send_all(wire)
        opened.set()
        await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            events = []
            for _ in range(channels):
                opened = trio.Event()
                events.append(opened)
                # a fresh identity per channel: a member can make as many as it likes
                nursery.start_soon(hold_one, NodeIdentity.generate(), opened)
            for opened in events:
                await opened.wait()
            print("ready", flush=True)

    trio.run(main)


# -- the benchmark ------------------------------------------------------------------------


async def _join_once(port: int, federation: Federation) -> float:
    started = time.perf_counter()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    config = ChannelConfig(handshake_timeout=60.0)
    identity = NodeIdentity.generate()
    async with open_secure_channel(stream, Role.INITIATOR, identity, federation, config) as ch:
        await ch.send(ModelRequest())
        while True:  # the node announces itself first; its ModelState answers the request
            if type(await ch.receive()).__name__ == "ModelState":
                break
    return time.perf_counter() - started


def join_time(port: int, federation: Federation, joins: int) -> float:
    async def main() -> list[float]:
        times = []
        for _ in range(joins):
            with trio.fail_after(120):
                times.append(await _join_once(port, federation))
            await trio.sleep(0.2)
        return times

    return statistics.median(trio.run(main))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _start_attack(*args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.hostile", "--attack", *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        raise RuntimeError(f"attacker {args[0]} did not start")
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()


def _round_times(log: Path) -> list[float]:
    """Wall-clock times of the rounds a node logged (``--log-json``)."""
    import datetime

    times = []
    for line in log.read_text(errors="replace").splitlines():
        if '"event": "round"' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError):
            record = json.loads(line)
            times.append(datetime.datetime.fromisoformat(record["ts"]).timestamp())
    return times


def vanish_pace(work: Path, window: float) -> dict[str, object]:
    """Four nodes; freeze one (SIGSTOP) and compare the others' rounds per second."""
    import signal

    params = ProtocolParams(dp_enabled=False, group_min=3, group_max=3, min_nodes=4)
    federation = dataclasses.replace(Federation.new("vanish-bench"), params=params)
    dirs = create_local_federation(
        work / "vanish", federation, 4, mdns=False, task="support.tiny_task:task"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "p2pfed", "node", str(d), "--log-json"],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "node.log", "w"),  # noqa: SIM115
            env=env,
        )
        for d in dirs
    ]
    frozen = nodes[3]
    try:
        deadline = time.monotonic() + 120
        while min(len(_round_times(d / "node.log")) for d in dirs) < 5:
            if time.monotonic() > deadline or any(n.poll() is not None for n in nodes):
                raise RuntimeError("the four vanish-bench nodes did not start their rounds")
            time.sleep(0.2)
        start = time.time()
        time.sleep(window)
        cut = time.time()
        os.kill(frozen.pid, signal.SIGSTOP)
        time.sleep(window)
        end = time.time()
        os.kill(frozen.pid, signal.SIGCONT)
        alive = all(n.poll() is None for n in nodes[:3])
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGCONT)
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
    before, during = [], []
    for d in dirs[:3]:
        times = _round_times(d / "node.log")
        before.append(sum(start <= t < cut for t in times) / (cut - start))
        during.append(sum(cut <= t < end for t in times) / (end - cut))
    kept = min(b and d / b for b, d in zip(before, during, strict=True))
    return {
        "vanish_window_s": window,
        "vanish_rounds_per_s_before": [round(v, 2) for v in before],
        "vanish_rounds_per_s_during": [round(v, 2) for v in during],
        "vanish_kept_fraction": round(kept, 3),
        "vanish_survivors_alive": alive,
        "vanish_target_met": alive and kept >= 0.8,
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="p2pfed-hostile-"))
    params = ProtocolParams(dp_enabled=False, group_min=3, group_max=3)
    federation = dataclasses.replace(Federation.new("hostile-bench"), params=params)
    [node_dir] = create_local_federation(
        work, federation, 1, mdns=False, task="support.tiny_task:task", bootstrap=False
    )
    [port] = free_ports(1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    node = subprocess.Popen(
        [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "node.log", "w"),  # noqa: SIM115
        env=env,
    )
    federation_file = str(node_dir / "federation.toml")
    result: dict[str, object] = {}
    try:
        deadline = time.monotonic() + 60
        while "listening on port" not in (work / "node.log").read_text():
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "node.log").read_text()[-2000:])
            time.sleep(0.1)
        baseline = join_time(port, federation, args.joins)
        idle = _start_attack("idle", "--port", str(port), "--idle", str(args.idle))
        try:
            under_idle = join_time(port, federation, args.joins)
        finally:
            _stop(idle)
        storm = _start_attack("storm", "--port", str(port), "--storm-rate", str(args.storm_rate))
        try:
            time.sleep(1.0)
            under_storm = join_time(port, federation, args.joins)
        finally:
            _stop(storm)
        time.sleep(1.0)
        rss_before = _rss(node.pid)
        frames = _start_attack(
            "frames", "--port", str(port), "--fed", federation_file, "--frames", str(args.frames)
        )
        try:
            time.sleep(2.0)
            under_frames = join_time(port, federation, args.joins)
            rss_after = _rss(node.pid)
        finally:
            _stop(frames)
        alive = node.poll() is None
        worst = max(under_idle, under_storm, under_frames)
        result = {
            "benchmark": "hostile",
            "join_s": round(baseline, 4),
            "join_idle_s": round(under_idle, 4),
            "join_storm_s": round(under_storm, 4),
            "join_frames_s": round(under_frames, 4),
            "worst_extra_join_s": round(worst - baseline, 4),
            "idle_connections": args.idle,
            "storm_per_s": args.storm_rate,
            "frame_attack_channels": args.frames,
            "max_message_size": federation.params.max_message_size,
            "rss_growth_mb": round((rss_after - rss_before) / 1e6, 2),
            "node_alive": alive,
            "join_target_met": worst - baseline <= 2.0,
            "rss_target_met": rss_after - rss_before <= 64e6,
        }
        result.update(vanish_pace(work, args.window))
    finally:
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--idle", type=int, default=1000, help="idle connections (1000)")
    parser.add_argument("--storm-rate", type=float, default=200.0, help="connects a second")
    parser.add_argument("--frames", type=int, default=64, help="channels of the frame attack")
    parser.add_argument("--joins", type=int, default=5, help="joins timed per phase (median)")
    parser.add_argument(
        "--window", type=float, default=20.0, help="seconds before and during the vanish (20)"
    )
    parser.add_argument("--attack", choices=("idle", "storm", "frames"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fed", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attack == "idle":
        attack_idle(args.port, args.idle)
    elif args.attack == "storm":
        attack_storm(args.port, args.storm_rate)
    elif args.attack == "frames":
        attack_frames(args.port, args.fed, args.frames)
    else:
        print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
