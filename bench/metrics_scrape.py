"""The metrics endpoint scraped while other clients hold connections open.

Run from the repository root::

    python -m bench.metrics_scrape [--idle 1000] [--scrapes 20]

A child process serves a node's metrics (:func:`p2pfed.metrics.serve_metrics`, default
settings) on 127.0.0.1; this process times ``--scrapes`` scrapes (connect, GET /metrics,
read to the end) with no other client, then while ``--idle`` connections are held open
without a byte, then while as many send half a request and stop (slowloris). The last
line is one JSON object: the median scrape time in seconds and the number of failed
scrapes for each case. Target (issue 15): no failed scrape.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time

_SERVER = """
import sys, trio
from p2pfed.metrics import NodeMetrics, serve_metrics
async def main():
    metrics = NodeMetrics()
    metrics.rounds_total.inc(3)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, metrics.registry, "127.0.0.1", 0)
        print(port, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
        nursery.cancel_scope.cancel()
trio.run(main)
"""


def _scrape(port: int) -> float | None:
    """Seconds for one complete scrape, or None if it failed."""
    began = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    if not data.startswith(b"HTTP/1.1 200") or b"p2pfed_rounds_total 3.0" not in data:
        return None
    return time.perf_counter() - began


def _scrapes(port: int, count: int) -> dict[str, float | int | None]:
    times = [_scrape(port) for _ in range(count)]
    done = [t for t in times if t is not None]
    return {
        "median_s": round(statistics.median(done), 6) if done else None,
        "failed": len(times) - len(done),
    }


def run(args: argparse.Namespace) -> dict[str, object]:
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    held: list[socket.socket] = []
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        result: dict[str, object] = {"idle_connections": args.idle}
        result["quiet"] = _scrapes(port, args.scrapes)
        for case, opening in (("idle", b""), ("slowloris", b"GET /metrics HTTP/1.1\r\nHo")):
            for _ in range(args.idle):
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                if opening:
                    sock.sendall(opening)
                held.append(sock)
            result[case] = _scrapes(port, args.scrapes)
            for sock in held:
                sock.close()
            held.clear()
        return result
    finally:
        for sock in held:
            sock.close()
        if server.stdin is not None:
            with contextlib.suppress(OSError):
                server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_scrape", description=__doc__)
    parser.add_argument("--idle", type=int, default=1000, help="connections held open")
    parser.add_argument("--scrapes", type=int, default=20, help="scrapes timed per case")
    print(json.dumps(run(parser.parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
