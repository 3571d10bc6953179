"""A partition that exists from the very start heals, and the two halves then merge.

Two sites that boot before the link between them is up know of each other (here by
mDNS, in a deployment also by peer exchange) but every dial across the cut fails and backs
off; each node fills its ``target_peers`` channels on its own side and, without
exploration (spec/discovery.md, "Exploration"), would never dial across again once the
link is up: the halves would each average to their own mean and stay apart.
"""

from __future__ import annotations

import random
from pathlib import Path

from p2pfed.identity import NodeId
from p2pfed.peers import PeerTable
from simnet.scenario import parse_scenario
from simnet.simulation import run_simulation

HEAL = 10.0

SCENARIO = f"""
name = "heal-from-start"
seed = 1
rounds = 20
duration = 400
[nodes]
count = 40
lan_size = 40
bootstrap = "none"
target_peers = 8
[topology]
kind = "random-regular"
degree = 6
routing = "shortest-path"
[link]
latency_ms = 200
[task]
name = "tiny"
training = false
evaluate_every = 0
[task.settings]
params = 20
[protocol]
group_min = 3
group_max = 5
[[partitions]]
start = 0.0
end = {HEAL}
split = 0.5
"""
"""40 nodes on one mDNS segment, halves cut from t=0 until well past the first dials'
connect timeout (so they fail and back off) and the first groups. 200 ms links make a
round take seconds, so the run spans several exploration intervals in 20 rounds."""


def test_halves_partitioned_from_the_start_merge_after_the_heal(tmp_path: Path) -> None:
    result = run_simulation(parse_scenario(SCENARIO), tmp_path)
    rows = result.rows
    assert rows[-1]["round"] >= 20
    assert rows[-1]["time"] > HEAL + 60.0  # the run spans exploration intervals after the heal
    initial = result.summary["initial_consensus_max"]
    after_heal = [row for row in rows if row["time"] > HEAL]
    final = result.summary["final_consensus_max"]
    # merged: far below the first row after the heal (2.5) and the initial spread (6.3).
    # Without exploration this run ends with final_consensus_max 0.28 (the halves still
    # apart: each side near its own mean); with it, 0.011 before keepalives every second
    # and liveness (spec/transport.md 6) changed the run's timing, 0.022 since.
    assert final < after_heal[0]["consensus_max"] / 50
    assert final < initial / 200


def test_exploration_prefers_peers_never_connected_and_never_failed() -> None:
    me, old, failed, fresh = (NodeId(bytes([i]) * 32) for i in range(4))
    table = PeerTable(me)
    for i, peer in enumerate((old, failed, fresh), start=2):
        table.observe(peer, f"10.0.0.{i}", 7447, "mdns", now=0.0)
    table.mark_connected(old, now=0.0)
    table.mark_disconnected(old, now=1.0)
    table.record_failure(failed, now=1.0)
    rng = random.Random(0)
    assert {table.exploration_candidate(10.0, rng) for _ in range(20)} == {table.get(fresh)}
    table.mark_connected(fresh, now=10.0)  # connected: no longer a candidate
    assert table.exploration_candidate(11.0, rng) == table.get(old)
    table.record_failure(old, now=11.0)  # every candidate failed: any not backing off
    assert table.exploration_candidate(11.0, rng) == table.get(failed)  # old backs off
    assert {table.exploration_candidate(100.0, rng) for _ in range(20)} == {
        table.get(old),
        table.get(failed),
    }
    table.record_failure(failed, now=100.0)
    table.record_failure(old, now=100.0)
    assert table.exploration_candidate(101.0, rng) is None  # all backing off
