"""Random rounds (spec/group.md, "Random rounds"): push-sum over several random groups.

With one random group per training round, 16 non-IID nodes disagree so much that the
federation trails FedAvg by 25-33 points at round 20 (bench/convergence.py); a few groups
per round bring every node close to the weighted mean. These tests run real nodes in
simnet and check what the steps buy: agreement and the weighted mean, never a fixed count
of groups alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pfed.errors import ConfigError
from p2pfed.exact_rounds import random_steps_for
from p2pfed.federation import ProtocolParams
from simnet.scenario import parse_scenario
from simnet.simulation import run_simulation


@given(st.integers(1, 100_000), st.integers(2, 64))
def test_automatic_steps_are_ceil_log_k_n_plus_one(n: int, k: int) -> None:
    steps = random_steps_for(n, group_max=k)
    if n <= k:
        assert steps == 1
    else:
        exact = math.ceil(math.log(n) / math.log(k) - 1e-12)
        assert steps == min(exact + 1, 16)
        assert k ** (steps - 2) < n <= k ** (steps - 1) or steps == 16


def test_random_steps_is_a_checked_federation_parameter() -> None:
    assert ProtocolParams(random_steps=4).random_steps == 4
    with pytest.raises(ConfigError, match="random_steps"):
        ProtocolParams(random_steps=17)
    with pytest.raises(ConfigError, match="random_steps"):
        ProtocolParams(random_steps=-1)


def _scenario(steps: int) -> str:
    return f"""
name = "random-steps-{steps}"
seed = 5
rounds = 3
[nodes]
count = 16
lan_size = 16
[topology]
kind = "complete"
[link]
latency_ms = 2
jitter_ms = 1
bandwidth_mbit = 100
[task]
name = "tiny"
training = false
[task.settings]
params = 50
samples_min = 10
samples_max = 300
[protocol]
group_min = 3
group_max = 4
grouping = "random"
random_steps = {steps}
"""


def test_more_random_steps_per_round_bring_nodes_to_the_weighted_mean(tmp_path: Path) -> None:
    """After three rounds, three push-sum steps per round leave the nodes far closer to
    each other than one step does (the automatic rule picks 3 for 16 nodes in groups of 4);
    the weighted sum is conserved, so it is the sample-weighted mean they approach."""
    distance = {}
    for steps in (1, 3):
        result = run_simulation(parse_scenario(_scenario(steps)), tmp_path / str(steps))
        row = result.rows[-1]
        assert row["round"] == 3
        distance[steps] = row["consensus_mean"]  # mean distance of a node to their mean
    assert random_steps_for(16, group_max=4) == 3
    assert distance[3] < distance[1] / 3, distance
