"""The daemon's settings reach the node whole, privacy off never passes unnoticed, and
a node that cannot form groups says why in its status."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pfed.config import load_config
from p2pfed.demo import create_local_federation
from p2pfed.errors import StatusError
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.network import TcpNetwork
from p2pfed.node import Node
from p2pfed.status import format_status, read_status

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}", "PYTHONUNBUFFERED": "1"}


def _node_dir(tmp_path: Path) -> Path:
    federation = dataclasses.replace(
        Federation.new("settings"), params=ProtocolParams(dp_enabled=False)
    )
    [node_dir] = create_local_federation(
        tmp_path, federation, 1, mdns=False, task="support.tiny_task:task", bootstrap=False
    )
    return node_dir


def test_channels_are_built_from_the_config_the_daemon_passes(tmp_path: Path) -> None:
    """The node builds its channel settings when it is constructed: the config with the
    command line's overrides must be given then (assigning it afterwards, as the daemon
    once did, left the channels on the file's settings)."""
    node_dir = _node_dir(tmp_path)
    config = dataclasses.replace(load_config(node_dir), idle_timeout=41.0, send_timeout=17.0)
    node = Node.from_directory(node_dir, network=TcpNetwork(mdns=False), config=config)
    assert node.config is config
    assert node.channel_config.idle_timeout == 41.0
    assert node.channel_config.send_timeout == 17.0
    plain = Node.from_directory(node_dir, network=TcpNetwork(mdns=False))
    assert plain.channel_config.idle_timeout == load_config(node_dir).idle_timeout


@dataclasses.dataclass(frozen=True)
class LoneDaemon:
    """A `p2pfed node` process alone in its federation (no mDNS, no bootstrap address)."""

    node_dir: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.node_dir / "node.log").read_text(encoding="utf-8")

    def status_when(self, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The node's status.json, once ``ready`` holds for it (its writes are atomic)."""
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, self.log[-2000:]
            try:
                status = read_status(self.node_dir)
            except StatusError:  # not written yet
                status = {}
            if ready(status):
                return status
            assert time.monotonic() < deadline, (status, self.log[-2000:])
            time.sleep(0.1)


@pytest.fixture(scope="module")
def lone_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoneDaemon]:
    """One node process for the tests below: it starts with privacy off, and can never
    form a group. (Module-scoped: tests/conftest.py keeps these tests on one worker.)"""
    node_dir = _node_dir(tmp_path_factory.mktemp("lone"))
    with open(node_dir / "node.log", "w", encoding="utf-8") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--insecure-no-masking",
             "--listen", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=err, env=ENV,
        )  # fmt: skip
    try:
        yield LoneDaemon(node_dir, process)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_insecure_no_masking_warns_on_start_and_shows_in_status(lone_daemon: LoneDaemon) -> None:
    status = lone_daemon.status_when(lambda status: status.get("masking") is False)
    assert "secure aggregation is OFF" in lone_daemon.log
    assert "SECURE AGGREGATION OFF" in format_status(status, now=time.time())


def test_a_node_short_of_peers_says_why_in_its_status(lone_daemon: LoneDaemon) -> None:
    # issue 15 item 10: alone, with mDNS off and no bootstrap address, a node used to log
    # nothing and `p2pfed status` gave no reason (the log line, once after a grace period
    # and not once per pass: tests/test_liveness.py, in virtual time)
    status = lone_daemon.status_when(lambda status: bool(status.get("stall")))
    stall = status["stall"]
    assert "0 responsive peers" in stall and "group_min" in stall
    assert "mDNS is off and no bootstrap address" in stall
    report = subprocess.run(
        [sys.executable, "-m", "p2pfed", "status", str(lone_daemon.node_dir)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    assert f"NOT FORMING GROUPS: {stall}" in report.stdout


def test_a_node_with_masking_says_nothing_of_it(tmp_path: Path) -> None:
    status = {"state": "running", "masking": True, "peers": []}
    assert "SECURE AGGREGATION OFF" not in format_status(status, now=time.time())
