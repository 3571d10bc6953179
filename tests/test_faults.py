"""Faults with real node processes: kill -9 one node of five in the middle of a group.

The survivors must abort that group (nobody applies a sum with masks left in it), regroup
without the dead node and keep completing rounds; every model stays finite and inside the
fixed-point range; the killed node, restarted, resumes from its checkpoint with its
privacy ledger intact, and rejoins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from p2pfed.checkpoint import load_checkpoint
from p2pfed.demo import create_local_federation
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.ledger import PrivacyLedger, ledger_path
from p2pfed.node import CHECKPOINT_FILE_NAME

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WIDTH = 1400  # a million parameters: an all-reduce lasts long enough to be caught in it


class NodeProcess:
    def __init__(self, node_dir: Path) -> None:
        self.node_dir = node_dir
        self.log_path = node_dir / "node.log"
        self.log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "p2pfed",
                "node",
                str(node_dir),
                "--log-json",
                "--set",
                f"width={WIDTH}",
                "--set",
                f"init={node_dir.name[-1]}",
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):  # a line being written
                    out.append(json.loads(line))
        return out

    def round(self) -> int:
        rounds = [r["round"] for r in self.records() if r.get("event") == "round"]
        return max(rounds, default=0)

    def stop(self) -> dict:
        self.process.send_signal(signal.SIGTERM)
        stdout, _ = self.process.communicate(timeout=60)
        self.log.close()
        assert self.process.returncode == 0, self.log_path.read_text()[-3000:]
        return json.loads(stdout.splitlines()[-1])

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_kill_9_mid_group_then_regroup_and_resume(tmp_path: Path) -> None:
    params = ProtocolParams(
        group_min=3,
        group_max=4,
        dp_enabled=True,
        dp_clip_norm=1.0,
        dp_noise_multiplier=0.05,
        dp_epsilon_budget=1e9,
    )
    federation = dataclasses.replace(Federation.new("faults"), params=params)
    dirs = create_local_federation(
        tmp_path, federation, 5, mdns=False, task="support.tiny_task:task"
    )
    nodes = [NodeProcess(d) for d in dirs]
    victim = nodes[2]
    try:
        wait_for(lambda: min(n.round() for n in nodes) >= 3, 120, "3 rounds everywhere")

        # kill once the victim and another member are both in an all-reduce: shards are
        # then in flight (killing at the victim's own start alone could land before its
        # GroupStart left, and the members would drop a group that never ran)
        def started(node: NodeProcess) -> set[str]:
            return {r["group"] for r in node.records() if r.get("event") == "group_started"}

        seen = started(victim)
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the victim never started another group"
            fresh = started(victim) - seen
            running = {g for g in fresh if any(g in started(n) for n in nodes if n is not victim)}
            if running:
                break
            time.sleep(0.005)
        victim.kill()
        interrupted = running  # the group (or, rarely, the last two) the victim was in
        killed_at = victim.round()
        survivors = [n for n in nodes if n is not victim]
        at_kill = {n.node_dir: n.round() for n in survivors}
        wait_for(
            lambda: all(n.round() >= at_kill[n.node_dir] + 3 for n in survivors),
            120,
            "survivors completing 3 more rounds",
        )
        aborted = [
            r
            for n in survivors
            for r in n.records()
            if r.get("event") == "group_aborted" and r.get("group") in interrupted
        ]
        assert aborted, "the kill did not interrupt the group it was in"

        # the killed node's state on disk is intact: checkpoint and ledger load
        checkpoint = load_checkpoint(victim.node_dir / CHECKPOINT_FILE_NAME)
        assert checkpoint is not None and checkpoint.round >= killed_at
        ledger = PrivacyLedger.open(ledger_path(victim.node_dir))
        releases_before = ledger.releases()
        # every round the victim completed began with a recorded release (kill -9 or not)
        completed = sum(1 for r in victim.records() if r.get("event") == "round")
        assert releases_before >= completed >= 1

        restarted = NodeProcess(victim.node_dir)
        nodes[2] = restarted
        wait_for(
            lambda: any(
                "resumed from checkpoint" in str(r.get("msg")) for r in restarted.records()
            ),
            60,
            "the restarted node to resume",
        )
        wait_for(lambda: restarted.round() > checkpoint.round, 120, "the restarted node rejoining")
        results = [n.stop() for n in nodes]
        assert PrivacyLedger.open(ledger_path(victim.node_dir)).releases() > releases_before
    finally:
        for n in nodes:
            if n.process.poll() is None:
                n.process.kill()
                n.process.wait()
    clip = params.clip
    for node_dir, result in zip(dirs, results, strict=True):
        state = load_checkpoint(node_dir / CHECKPOINT_FILE_NAME)
        assert state is not None
        # a model with residual masks would hold values of order 2**63 / scale: far outside
        assert np.all(np.isfinite(state.model))
        assert np.abs(state.model).max() <= clip
        assert result["round"] >= 3
