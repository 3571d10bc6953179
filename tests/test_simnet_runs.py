"""Whole simulated deployments: the real Node, Noise and masking on the virtual network.

Each run is a few simulated seconds of up to 20 nodes; the checks are protocol properties
(push-sum conservation, convergence to the sample-weighted mean, recovery after faults)
and byte-identical metrics for the same seed.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np

from p2pfed.model_vector import model_to_vector
from p2pfed.node import federation_seed
from simnet.checks import weighted_mean
from simnet.report import metrics_csv, metrics_json, write_metrics
from simnet.scenario import load_scenario, parse_scenario
from simnet.simulation import run_simulation
from simnet.tasks import samples_of, task
from simnet.topology import load_topology_file

SCENARIOS = Path(__file__).resolve().parent.parent / "simnet" / "scenarios"


def scenario_text(nodes: int, rounds: int, extra: str = "", seed: int = 1) -> str:
    return f"""
name = "test"
seed = {seed}
rounds = {rounds}
duration = 600
[nodes]
count = {nodes}
[link]
latency_ms = 5
jitter_ms = 2
[task]
name = "tiny"
training = false
[task.settings]
params = 24
samples_min = 5
samples_max = 80
[protocol]
group_min = 3
group_max = 5
{extra}
"""


def test_twenty_nodes_converge_to_the_sample_weighted_mean(tmp_path: Path) -> None:
    threshold = gc.get_threshold()
    result = run_simulation(parse_scenario(scenario_text(20, 12)), tmp_path)
    # simnet tunes the garbage collector for the run only (simulation._FullCollections)
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == 0
    nodes = sorted(result.nodes, key=lambda n: n.options.task_config["node_index"])
    # the target, computed here from the task alone: the nodes' initial models and sizes
    seed = federation_seed(nodes[0].federation)
    configs = [
        {"seed": seed, "node_index": i, "params": 24, "samples_min": 5, "samples_max": 80}
        for i in range(20)
    ]
    initial = [model_to_vector(task.build_model(c)) for c in configs]
    target = weighted_mean(initial, [samples_of(c) for c in configs])
    spread = max(float(np.linalg.norm(x - target)) for x in initial)
    assert result.summary["completed"]
    assert result.audit.checked >= 10 and not result.audit.failures
    for node in nodes:
        assert node.model is not None and np.all(np.isfinite(node.model))
        assert node.round >= 12
        assert np.linalg.norm(node.model - target) < spread / 10
    first, last = result.rows[0], result.rows[-1]
    assert last["consensus_max"] < first["consensus_max"]
    assert last["target_distance_max"] < spread / 10


def test_partition_that_heals(tmp_path: Path) -> None:
    extra = """
[[partitions]]
start = 0.0
end = 1.0
groups = [[0, 1, 2, 3, 4]]
"""
    text = scenario_text(10, 0, extra).replace("duration = 600", "duration = 8")  # no round goal
    result = run_simulation(parse_scenario(text), tmp_path)
    assert not result.audit.failures and result.audit.checked > 0
    during = [row for row in result.rows if row["time"] < 1.0]
    assert during
    # each side averages within itself, but the two sides' means stay apart until the heal
    gap = min(row["consensus_max"] for row in during)
    assert gap > 0.1
    # after the heal, channels across are dialled again and the whole network agrees
    assert result.summary["final_consensus_max"] < gap / 1000
    assert result.summary["simulated_seconds"] == 8.0


def test_crash_and_restart_resume_from_the_checkpoint(tmp_path: Path) -> None:
    extra = """
[[events]]
at = 0.5
action = "crash"
nodes = [3, 4]
[[events]]
at = 1.5
action = "restart"
nodes = [3, 4]
"""
    result = run_simulation(parse_scenario(scenario_text(8, 40, extra)), tmp_path)
    assert result.summary["crashes"] == 2 and result.summary["restarts"] == 2
    assert result.summary["completed"] and result.summary["all_models_finite"]
    assert not result.audit.failures
    restarted = [n for n in result.nodes if n.options.task_config["node_index"] in (3, 4)]
    for node in restarted:
        assert (node.node_dir / "checkpoint.bin").exists()
        assert node.round >= 40
        assert node.groups_completed >= 1  # this incarnation averaged with the others
    # each restarted node came back at the round of its last checkpoint, not at round 0
    assert [r["node"] for r in result.restarted] == [3, 4]
    assert all(r["round"] >= 1 and r["round"] == r["round_at_crash"] for r in result.restarted)


def test_same_seed_gives_byte_identical_metrics(tmp_path: Path) -> None:
    faults = """
[[events]]
at = 0.5
action = "crash"
fraction = 0.2
[[events]]
at = 4.0
action = "restart"
fraction = 1.0
"""
    text = scenario_text(10, 6, faults, seed=7).replace(
        "jitter_ms = 2", "jitter_ms = 2\nloss = 0.02\nconnect_failure = 0.05"
    )
    outputs = []
    for run in ("a", "b"):
        result = run_simulation(parse_scenario(text), tmp_path / run)
        assert result.summary["crashes"] == 2 and result.summary["stalls"] > 0
        paths = write_metrics(result, tmp_path / f"out-{run}")
        outputs.append([p.read_bytes() for p in paths])
    assert outputs[0] == outputs[1]
    other = run_simulation(parse_scenario(text.replace("seed = 7", "seed = 8")), tmp_path / "c")
    assert metrics_json(other).encode() != outputs[0][1]
    assert metrics_csv(other.rows).encode() != outputs[0][0]


def test_topology_from_an_edge_list_file(tmp_path: Path) -> None:
    topology = load_topology_file(SCENARIOS / "edges_example.txt")
    assert topology.n == 8 and topology.edges is not None and len(topology.edges) == 13
    wan = topology.edges.index((3, 4))
    assert topology.links[wan] == {"latency": 0.06, "bandwidth": 1.25e6, "loss": 0.01}
    scenario = load_scenario(SCENARIOS / "two_sites.toml")
    result = run_simulation(scenario, tmp_path)
    assert result.summary["nodes"] == 8 and result.summary["completed"]
    assert not result.audit.failures
    assert result.rows[-1]["consensus_max"] < result.rows[0]["consensus_max"]
