"""Faults: one node of five killed in the middle of a group.

In simnet (virtual time, deterministic) the node crashes while it is in an all-reduce:
the other members must abort that group (nobody applies a sum with masks left in it),
regroup without the dead node and keep completing rounds; the node, restarted, resumes
from its checkpoint and rejoins. With real node processes, ``kill -9`` at an arbitrary
moment of a running federation must leave the killed node's checkpoint and privacy ledger
intact on disk; restarted, it resumes from them and rejoins, and every model stays finite
and inside the fixed-point range.
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
from typing import Any

import numpy as np
import trio
import trio.testing

from p2pfed.checkpoint import load_checkpoint
from p2pfed.demo import create_local_federation
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.group import GroupAborted, GroupCompleted, Phase
from p2pfed.identity import NodeId
from p2pfed.ledger import PrivacyLedger, ledger_path
from p2pfed.node import CHECKPOINT_FILE_NAME
from simnet.determinism import deterministic_scheduling
from simnet.scenario import Scenario, parse_scenario
from simnet.simulation import Simulation, derive_seed

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WIDTH = 64  # small: the real-process test is about files on disk, not the all-reduce


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


KILL_SCENARIO = """
name = "kill-mid-group"
seed = 1
rounds = 30
duration = 120
[nodes]
count = 5
[topology]
kind = "complete"
[task]
name = "tiny"
training = false
evaluate_every = 0
[task.settings]
params = 40
[protocol]
group_min = 3
group_max = 4
allreduce_timeout = 5.0
[[events]]
at = 0.5
action = "crash"
in_group = true
nodes = [2]
[[events]]
at = 3.0
action = "restart"
nodes = [2]
"""
"""Node 2 crashes at the first moment after t=0.5 s that it is in an all-reduce (rounds take
tens of milliseconds here: it is a few rounds in), and restarts at t=3 s, before the
others' allreduce_timeout would have ended a group still waiting for it: only noticing
the loss lets them regroup in between. 30 rounds keep everybody busy past the restart."""

VICTIM = 2
RESTART_AT = 3.0


class _Recording(Simulation):
    """Records every group outcome of every node, and the victim's group when it crashes."""

    def __init__(self, scenario: Scenario, work_dir: Path) -> None:
        super().__init__(scenario, work_dir)
        self.outcomes: list[tuple[float, int, GroupCompleted | GroupAborted]] = []
        self.crash: tuple[float, Phase, set[NodeId]] | None = None

    def _crash(self, slot: Any, *, silent: bool = False) -> None:
        if slot.index == VICTIM and slot.live and slot.node is not None:
            group = slot.node.group
            assert group is not None
            self.crash = (trio.current_time(), group.phase, group.busy_with())
        super()._crash(slot, silent=silent)

    def _on_group(self, slot: Any, outcome: GroupCompleted | GroupAborted) -> None:
        self.outcomes.append((trio.current_time(), slot.index, outcome))
        super()._on_group(slot, outcome)


def test_crash_mid_group_then_regroup_and_resume(tmp_path: Path) -> None:
    scenario = parse_scenario(KILL_SCENARIO)
    simulation = _Recording(scenario, tmp_path)
    with (
        deterministic_scheduling(derive_seed(scenario.seed, "scheduler")),
        simulation.collections,
    ):
        result = trio.run(simulation.run, clock=trio.testing.MockClock(autojump_threshold=0))
    assert simulation.crash is not None, "the victim never crashed"
    crashed_at, phase, busy_with = simulation.crash
    assert phase is Phase.RUNNING and crashed_at < RESTART_AT
    ids = [node.node_id for node in result.nodes]
    members = {ids.index(member) for member in busy_with} - {VICTIM}
    assert len(members) >= scenario.protocol.group_min - 1

    def after_crash(index: int) -> list[GroupCompleted | GroupAborted]:
        return [o for t, i, o in simulation.outcomes if i == index and crashed_at <= t]

    # every other member of the victim's group aborts that group (during the all-reduce)
    # as its next outcome, and nobody applies it
    interrupted = {after_crash(i)[0].group_id for i in members}
    assert len(interrupted) == 1
    for index in members:
        first = after_crash(index)[0]
        assert isinstance(first, GroupAborted) and first.formed, first
    assert not interrupted & simulation.completed_groups
    # the survivors regroup without the dead node: 3 more rounds each before it is back
    for index in set(range(scenario.nodes.count)) - {VICTIM}:
        done = [
            o
            for t, i, o in simulation.outcomes
            if i == index and crashed_at < t < RESTART_AT and isinstance(o, GroupCompleted)
        ]
        assert len(done) >= 3, (index, done)
        assert all(ids[VICTIM] not in o.members for o in done)
    # restarted, the victim resumes from its checkpoint and rejoins
    [restart] = result.restarted
    assert restart["node"] == VICTIM and restart["round"] == restart["round_at_crash"] >= 1
    rejoined = [
        o
        for t, i, o in simulation.outcomes
        if i == VICTIM and t > RESTART_AT and isinstance(o, GroupCompleted)
    ]
    assert rejoined and result.nodes[VICTIM].round > restart["round"]
    # every model finite and inside the initial range (no residual masks), weights conserved
    assert all(c.passed for c in result.checks), [c.line() for c in result.checks]
    assert {c.name for c in result.checks} >= {
        "models finite",
        "models uncorrupted",
        "conservation",
    }


def test_kill_9_keeps_checkpoint_and_ledger_then_resume(tmp_path: Path) -> None:
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
        tmp_path, federation, 4, mdns=False, task="support.tiny_task:task"
    )
    nodes = [NodeProcess(d) for d in dirs]
    victim = nodes[2]
    checkpoint_path = victim.node_dir / CHECKPOINT_FILE_NAME
    try:
        wait_for(lambda: min(n.round() for n in nodes) >= 3, 120, "3 rounds everywhere")
        # a checkpoint is written beside the next round: wait until one is on disk, so that
        # the kill lands in a running federation with something to lose
        wait_for(
            lambda: (c := load_checkpoint(checkpoint_path)) is not None and c.round >= 2,
            60,
            "the victim's checkpoint of round 2",
        )
        on_disk = load_checkpoint(checkpoint_path)
        assert on_disk is not None
        victim.kill()

        # the killed node's state on disk is intact: checkpoint and ledger load
        checkpoint = load_checkpoint(checkpoint_path)
        assert checkpoint is not None and checkpoint.round >= on_disk.round
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
