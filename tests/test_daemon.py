"""`p2pfed node` processes found by real mDNS only, observed as an operator would.

Three node processes on this machine, with no bootstrap address: they must find each
other by mDNS/DNS-SD on the loopback interface, then train. One serves Prometheus metrics;
`p2pfed status` reads a running node; SIGTERM stops every node cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.node_logs import rounds_logged

from p2pfed.demo import create_local_federation, free_ports
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.status import read_status

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}


@pytest.mark.multicast
def test_mdns_discovery_metrics_status_and_clean_stop(tmp_path: Path) -> None:
    federation = dataclasses.replace(
        Federation.new("daemon-test"), params=ProtocolParams(dp_enabled=False, group_max=3)
    )
    dirs = create_local_federation(
        tmp_path, federation, 3, mdns=True, task="support.tiny_task:task", bootstrap=False
    )
    [metrics_port] = free_ports(1)
    with open(dirs[0] / "config.toml", "a", encoding="utf-8") as config:
        config.write(f"metrics = true\nmetrics_port = {metrics_port}\n")
    processes = []
    logs = [d / "node.log" for d in dirs]
    try:
        for node_dir, log in zip(dirs, logs, strict=True):
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "p2pfed",
                        "node",
                        str(node_dir),
                        "--log-json",
                        "--rounds",
                        "3",
                        "--linger",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=open(log, "w", encoding="utf-8"),  # noqa: SIM115
                    text=True,
                    env=ENV,
                )
            )
        deadline = time.monotonic() + 90
        while min(rounds_logged(log) for log in logs) < 3:
            assert time.monotonic() < deadline, [log.read_text()[-2000:] for log in logs]
            assert all(p.poll() is None for p in processes), "a node exited early"
            time.sleep(0.1)

        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert values[("p2pfed_rounds_total", ())] >= 3
        assert values[("p2pfed_groups_total", (("outcome", "completed"),))] >= 3
        assert values[("p2pfed_group_seconds_count", ())] >= 3
        assert values[("p2pfed_bytes_sent_total", ())] > 0
        assert values[("p2pfed_peers_connected", ())] == 2
        assert values[("p2pfed_train_loss", ())] >= 0
        assert values[("p2pfed_test_loss", ())] >= 0
        assert not [name for name, _ in values if name.startswith("p2pfed_epsilon")]  # DP off
        # every series has a value, but those that need an accuracy: the tiny task has none
        unknown = {name for (name, _), v in values.items() if math.isnan(v)}
        needs_accuracy = {"p2pfed_test_accuracy"} | {
            name for name, _ in values if name.startswith("p2pfed_federation_")
        }
        assert unknown <= needs_accuracy, unknown

        # status.json is rewritten at most every 0.25 s and refreshed every second, so it
        # may lag the log: wait for it here (a `p2pfed status` process per poll took over
        # 10 s on a loaded machine), then read it once as an operator would
        deadline = time.monotonic() + 60
        while (read_status(dirs[1]).get("round") or 0) < 3:
            assert time.monotonic() < deadline, read_status(dirs[1])
            time.sleep(0.2)
        status = subprocess.run(
            [sys.executable, "-m", "p2pfed", "status", str(dirs[1]), "--json"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["round"] >= 3, report
        assert report["state"] == "running"
        assert sum(1 for peer in report["peers"] if peer["connected"]) == 2

        for process in processes:
            process.send_signal(signal.SIGTERM)
        finals = []
        for process in processes:
            stdout, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            finals.append(json.loads(stdout.splitlines()[-1]))
        assert all(final["round"] >= 3 for final in finals)
        stopped = subprocess.run(
            [sys.executable, "-m", "p2pfed", "status", str(dirs[1])],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=30,
        )
        assert stopped.returncode == 3 and "not running" in stopped.stdout
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
