"""The fault scenario at test size: a share of the nodes crashes every round, one
partition heals, and the run still ends with sound models and continued progress.

``simnet/scenarios/faults_1000.toml`` is the same kind of scenario at 1000 nodes (too slow
for the suite: simnet/README.md gives its wall time); here 60 nodes run a few rounds. The
checks are :func:`simnet.checks.run_checks`, the verdicts ``p2pfed simnet run`` prints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from p2pfed.cli import main
from p2pfed.node import RoundReport
from simnet.checks import run_checks
from simnet.determinism import deterministic_scheduling
from simnet.scenario import load_scenario, parse_scenario
from simnet.simulation import Simulation, run_simulation

SCENARIOS = Path(__file__).resolve().parent.parent / "simnet" / "scenarios"


CHECKS = "rounds_after_heal = 3\nconsensus_drop = 2.0"
"""At 60 nodes and 5 global rounds (about 6 median rounds) the consensus distance ends
about 6x below the initial models'; faults_1000.toml asks for 5x."""


def faults_text(nodes: int, rounds: int, *, seed: int = 4, checks: str = CHECKS) -> str:
    """faults_1000.toml's kind of scenario, at ``nodes`` nodes and a 40-parameter model."""
    return f"""
name = "faults-small"
seed = {seed}
rounds = {rounds}
duration = 300
[nodes]
count = {nodes}
[topology]
kind = "random-regular"
degree = 6
routing = "shortest-path"
[link]
latency_ms = 5
jitter_ms = 1
[task]
name = "tiny"
training = false
evaluate_every = 0
[task.settings]
params = 40
samples_min = 5
samples_max = 50
[protocol]
group_min = 3
group_max = 5
allreduce_timeout = 2.0
[churn]
model = "per-round"
per_round = 0.1
downtime_rounds = 1
[[partitions]]
start = 0.8
end = 1.6
split = 0.5
[checks]
{checks}
"""


def test_ten_percent_crash_per_round_and_a_healed_partition(tmp_path: Path) -> None:
    scenario = parse_scenario(faults_text(60, 5))
    result = run_simulation(scenario, tmp_path)
    summary = result.summary
    verdicts = {c.name: c for c in result.checks}
    assert set(verdicts) == {
        "round goal",
        "models finite",
        "models uncorrupted",
        "conservation",
        "progress after heal",
        "consensus",
        "consensus after heal",
    }
    assert all(c.passed for c in result.checks), [c.line() for c in result.checks]
    assert summary["checks"] == dict.fromkeys(verdicts, "pass")
    # 6 crashes (10% of 60) each time the median round advanced, and restarts one round later
    assert summary["crashes"] >= 6 * 5 and summary["crashes"] % 6 == 0
    assert summary["restarts"] >= summary["crashes"] - 6 * 2
    assert all(r["round"] == r["round_at_crash"] for r in result.restarted)
    # global rounds kept completing after the heal at t=1.6
    after = [row for row in result.rows if row["time"] > 1.6]
    assert len(after) >= 3 and after[-1]["round"] >= after[0]["round"] + 2
    assert summary["groups_audited"] > 50 and summary["conservation_failures"] == 0
    assert summary["range_excess_max"] == 0.0 or summary["range_excess_max"] < 1e-5
    assert summary["final_consensus_max"] < summary["initial_consensus_max"] / 2
    assert summary["final_consensus_max"] < result.rows[0]["consensus_max"]
    assert summary["live_nodes"] >= 60 - 6 * 2


class _Corrupting(Simulation):
    """A simulation in which node 0's model is garbled after its first round."""

    def _on_round(self, slot: Any, report: RoundReport) -> None:
        node = slot.node
        if slot.index == 0 and report.round == 1:
            # what adopting a sum whose masks did not cancel looks like (within the clip)
            node.model = node.model + np.float32(4.0)
        super()._on_round(slot, report)


def test_the_checks_catch_a_corrupted_model(tmp_path: Path) -> None:
    text = faults_text(10, 4).replace('model = "per-round"', 'model = "none"')
    simulation = _Corrupting(parse_scenario(text), tmp_path)
    with deterministic_scheduling(1):
        result = trio.run(simulation.run, clock=trio.testing.MockClock(autojump_threshold=0))
    verdicts = {c.name: c for c in result.checks}
    assert not verdicts["models uncorrupted"].passed
    assert verdicts["models uncorrupted"].line().startswith("FAIL models uncorrupted")
    # by the next row node 0 has averaged the garbage into a group: still far out of range
    assert result.summary["range_excess_max"] > 0.1
    # the protocol itself averaged what node 0 held: the audit has nothing to object to
    assert verdicts["conservation"].passed and verdicts["models finite"].passed


def test_run_checks_thresholds() -> None:
    scenario = parse_scenario(faults_text(10, 4, checks=CHECKS + "\nconsensus_max = 0.5"))
    rows = [
        {"round": 1, "time": 0.5, "consensus_max": 4.0, "groups_completed": 3},
        {"round": 2, "time": 1.2, "consensus_max": 3.0, "groups_completed": 5},
        {"round": 4, "time": 2.5, "consensus_max": 0.2, "groups_completed": 9},
    ]
    summary = {
        "simulated_seconds": 2.5,
        "completed": True,
        "live_nodes": 9,
        "all_models_finite": True,
        "range_excess_max": 0.0,
        "rounds_max": 7,
        "groups_audited": 9,
        "conservation_failures": 0,
        "conservation_error_max": 1e-8,
        "groups_completed": 12,
        "initial_consensus_max": 4.0,
        "final_consensus_max": 0.2,
        "final_consensus_mean": 0.1,
    }
    verdicts = {c.name: c for c in run_checks(scenario, rows, summary)}
    # the last row before the heal at 1.6 is round 2: 4 - 2 = 2 rounds after it, 3 needed
    assert not verdicts["progress after heal"].passed
    assert "+2, need 3" in verdicts["progress after heal"].detail
    # 4.0 initially; 0.2 at the end is 20x below it and under consensus_max; and below
    # the 3.0 of the last row before the heal
    assert verdicts["consensus"].passed and verdicts["consensus after heal"].passed
    summary["final_consensus_max"] = 2.5  # 1.6x below the initial: not the 2x asked
    verdicts = {c.name: c for c in run_checks(scenario, rows, summary)}
    assert not verdicts["consensus"].passed and verdicts["consensus after heal"].passed
    summary["final_consensus_max"] = 3.0  # no lower than before the heal
    assert not {c.name: c for c in run_checks(scenario, rows, summary)}[
        "consensus after heal"
    ].passed
    summary["range_excess_max"] = 1e-3  # far beyond 8 rounds of 64-bit rounding
    assert not {c.name: c for c in run_checks(scenario, rows, summary)}["models uncorrupted"].passed
    summary["completed"], summary["all_models_finite"] = False, False
    failed = {c.name for c in run_checks(scenario, rows, summary) if not c.passed}
    assert {"round goal", "models finite"} <= failed
    assert math.isinf(parse_scenario(faults_text(10, 4)).checks.consensus_max)


def test_simnet_run_prints_the_checks_and_fails_on_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "faults.toml"
    scenario.write_text(faults_text(12, 3, checks="consensus_drop = 1.0"))
    assert main(["simnet", "run", str(scenario), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "PASS conservation:" in out and "PASS progress after heal:" in out
    assert "FAIL" not in out and "all 7 checks passed" in err
    # an unreachable consensus bound: the same run now fails, and says which check
    scenario.write_text(faults_text(12, 3, checks="consensus_max = 1e-12"))
    assert main(["simnet", "run", str(scenario), "--out", str(tmp_path / "b"), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "FAIL consensus:" in out and "1 of 7 checks FAILED: consensus" in err


def test_the_1000_node_fault_scenario_is_what_the_issue_asks() -> None:
    scenario = load_scenario(SCENARIOS / "faults_1000.toml")
    assert scenario.nodes.count == 1000 and scenario.task.settings["params"] == 1000
    assert scenario.protocol.masking and not scenario.task.training
    assert scenario.churn.model == "per-round" and scenario.churn.per_round == 0.1
    assert scenario.churn.fraction == 1.0 and scenario.churn.downtime_rounds >= 1
    (partition,) = scenario.partitions
    assert partition.end is not None and partition.end < scenario.duration
    assert scenario.checks.rounds_after_heal >= 1 and scenario.checks.consensus_drop > 1
