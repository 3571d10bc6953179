"""A peer that vanishes without closing its connections (issue 15, items 2 and 8).

In simnet, a partition in "stall" mode is a cut cable: nothing arrives across it and no
connection is reset. One node of four is cut that way; the other three must notice within
seconds (keepalives every second, a 3 s liveness deadline, spec/transport.md section 6)
and keep forming groups among themselves at close to their earlier pace, instead of
inviting and waiting for the vanished node until the 60 s idle timeout.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from p2pfed.group import GroupCompleted
from p2pfed.node import LIVENESS_DEADLINE
from simnet.determinism import deterministic_scheduling
from simnet.scenario import parse_scenario
from simnet.simulation import Simulation, derive_seed

CUT = 20.0
END = 60.0

SCENARIO = f"""
name = "silent-vanish"
seed = 3
duration = {END}
rounds = 100000
[nodes]
count = 4
lan_size = 4
[link]
latency_ms = 50
[task]
name = "tiny"
training = false
evaluate_every = 0
[task.settings]
params = 16
[protocol]
group_min = 3
group_max = 3
[[partitions]]
start = {CUT}
groups = [[3]]
mode = "stall"
"""


def _group_times(tmp_path: Path) -> list[tuple[float, int]]:
    """(time, members) of every group completed, as the surviving nodes saw them."""
    simulation = Simulation(parse_scenario(SCENARIO), tmp_path)
    completed: list[tuple[float, int]] = []
    record = simulation._on_group

    def observe(slot, outcome) -> None:  # type: ignore[no-untyped-def]
        if isinstance(outcome, GroupCompleted) and slot.index != 3:
            completed.append((trio.current_time(), len(outcome.members)))
        record(slot, outcome)

    simulation._on_group = observe  # type: ignore[method-assign]

    async def main() -> None:
        await simulation.run()

    with (
        deterministic_scheduling(derive_seed(simulation.scenario.seed, "scheduler")),
        simulation.collections,
    ):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return completed


def test_the_others_keep_their_pace_when_a_node_vanishes_silently(tmp_path: Path) -> None:
    completed = _group_times(tmp_path)
    settled = [t for t, _ in completed if 10.0 <= t < CUT]
    # the first seconds after the cut may still hold a group that waits for the vanished
    # node; from LIVENESS_DEADLINE plus an invite timeout on, it is out of every group
    after = [t for t, _ in completed if CUT + LIVENESS_DEADLINE + 5.0 <= t < END]
    rate_before = len(settled) / (CUT - 10.0)
    rate_after = len(after) / (END - CUT - LIVENESS_DEADLINE - 5.0)
    assert rate_before > 0
    # before the fix: the vanished node counted as connected until the 60 s idle timeout
    # and most groups waited for it
    assert rate_after >= 0.8 * rate_before, (rate_before, rate_after)


def test_a_node_short_of_peers_says_why(tmp_path: Path) -> None:
    # issue 15 item 10: alone, with mDNS off and no bootstrap address, a node used to log
    # nothing and `p2pfed status` gave no reason
    import dataclasses
    import os
    import subprocess
    import sys
    import time

    from p2pfed.demo import create_local_federation
    from p2pfed.errors import StatusError
    from p2pfed.federation import Federation, ProtocolParams
    from p2pfed.status import read_status

    tests = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)]),
        "PYTHONUNBUFFERED": "1",
    }
    params = ProtocolParams(dp_enabled=False, group_min=3, group_max=3)
    federation = dataclasses.replace(Federation.new("stall-test"), params=params)
    [node_dir] = create_local_federation(
        tmp_path, federation, 1, mdns=False, task="support.tiny_task:task", bootstrap=False
    )
    log_path = tmp_path / "node.log"
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--listen", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=env,
        )
    try:
        deadline = time.monotonic() + 90
        stall = None
        while stall is None:
            assert time.monotonic() < deadline, log_path.read_text()
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.2)
            try:
                stall = read_status(node_dir).get("stall")
            except StatusError:  # not written yet
                continue
        assert "0 responsive peers" in stall and "group_min" in stall
        assert "mDNS is off and no bootstrap address" in stall
        report = subprocess.run(
            [sys.executable, "-m", "p2pfed", "status", str(node_dir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        ).stdout
        assert "NOT FORMING GROUPS" in report
        while "not forming groups" not in log_path.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.2)
        warnings = [line for line in log_path.read_text().splitlines() if "not forming" in line]
        assert len(warnings) == 1, warnings  # once per change, not once per pass
    finally:
        process.terminate()
        process.wait(timeout=60)
