"""The daemon's settings reach the node whole, and privacy off never passes unnoticed."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2pfed.config import load_config
from p2pfed.demo import create_local_federation
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.network import TcpNetwork
from p2pfed.node import Node
from p2pfed.status import format_status

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


def test_insecure_no_masking_warns_on_start_and_shows_in_status(tmp_path: Path) -> None:
    node_dir = _node_dir(tmp_path)
    log = node_dir / "node.log"
    with open(log, "w", encoding="utf-8") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--insecure-no-masking",
             "--listen", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=err, env=ENV,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        status: dict = {}
        while status.get("masking") is not False:
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
            try:
                status = json.loads((node_dir / "status.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                status = {}
        assert "secure aggregation is OFF" in log.read_text()
        assert "SECURE AGGREGATION OFF" in format_status(status, now=time.time())
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_a_node_with_masking_says_nothing_of_it(tmp_path: Path) -> None:
    status = {"state": "running", "masking": True, "peers": []}
    assert "SECURE AGGREGATION OFF" not in format_status(status, now=time.time())
