"""The privacy budget cannot be reset by deleting files (issue 14, item 4), and a federation
whose first release already exceeds its budget is refused at node start (item 1).

Real `p2pfed node` processes on real node directories: a node releases once, is stopped,
loses its ledger and checkpoint, and must refuse to start again.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from p2pfed.demo import create_local_federation
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.identity import (
    IDENTITY_FILE_NAME,
    NodeIdentity,
    has_ledger_marker,
    load_identity,
    mark_ledger_required,
    save_identity,
)
from p2pfed.ledger import PrivacyLedger, ledger_path
from p2pfed.node import CHECKPOINT_FILE_NAME

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}
TASK = "support.tiny_task:task"


def _node(node_dir: Path, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--rounds", "5"],
        stdout=subprocess.PIPE,
        stderr=open(log, "w", encoding="utf-8"),
        text=True,
        env=ENV,
    )


def _releases(node_dir: Path) -> int:
    try:
        return PrivacyLedger.open(ledger_path(node_dir)).releases()
    except Exception:  # not written yet
        return 0


def _single_node(tmp_path: Path, params: ProtocolParams) -> Path:
    federation = dataclasses.replace(Federation.new("ledger-test"), params=params)
    [node_dir] = create_local_federation(tmp_path, federation, 1, mdns=False, task=TASK)
    return node_dir


def test_marker_keeps_the_key_and_is_idempotent(tmp_path: Path) -> None:
    key = tmp_path / IDENTITY_FILE_NAME
    identity = NodeIdentity.generate()
    save_identity(key, identity)
    assert not has_ledger_marker(key)
    mark_ledger_required(key)
    once = key.read_bytes()
    mark_ledger_required(key)
    assert key.read_bytes() == once and has_ledger_marker(key)
    assert load_identity(key).node_id == identity.node_id
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_deleting_ledger_and_checkpoint_does_not_reset_the_budget(tmp_path: Path) -> None:
    node_dir = _single_node(tmp_path, ProtocolParams(group_max=3))  # default: node-level DP
    process = _node(node_dir, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 60
        # alone, the node trains and releases once, then waits for a group that never forms
        while _releases(node_dir) < 1:
            assert process.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert has_ledger_marker(node_dir / IDENTITY_FILE_NAME)

    ledger_path(node_dir).unlink()
    (node_dir / CHECKPOINT_FILE_NAME).unlink(missing_ok=True)
    again = subprocess.run(
        [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--rounds", "5"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert again.returncode == 1, again.stderr[-2000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("p2pfed: error: privacy ledger missing"), again.stderr[-2000:]
    assert "restore it from backup" in last and "p2pfed init" in last
    assert not ledger_path(node_dir).exists()  # and no fresh ledger was started


def test_a_federation_whose_first_release_exceeds_the_budget_is_refused(tmp_path: Path) -> None:
    # the old defaults: one release costs epsilon 10.73 against a budget of 10
    params = ProtocolParams(dp_noise_multiplier=1.0, dp_epsilon_budget=10.0)
    node_dir = _single_node(tmp_path, params)
    result = subprocess.run(
        [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--rounds", "5"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("p2pfed: error: ") and "10.73" in last, result.stderr[-2000:]
    assert "p2pfed federation new" in last
    assert not ledger_path(node_dir).exists()
