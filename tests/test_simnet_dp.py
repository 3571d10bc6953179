"""simnet scenarios at each DP level (``[dp] level``): real nodes on the virtual network,
their ledgers checked against the accountant, distributed noise measured in the average."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pfed.accountant import distributed_epsilon_for, epsilon_for
from p2pfed.errors import ConfigError
from p2pfed.skellam import nominal_noise_multipliers
from simnet.scenario import parse_scenario
from simnet.simulation import SimulationResult, run_simulation

# bench/ is a directory of the repository, not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NODES = 16  # exact rounds: two steps of groups of 4
GROUP = 4
DELTA = 1e-5
SIGMA = 8.0
# tiny against the noise: the average of the clipped updates moves the model by at most
# CLIP in L2 (0.0007 RMS per coordinate), so the final model is essentially the noise
CLIP = 0.01
MODEL_SIZE = 210  # bench._crossdevice_task's Linear(20, 10)


def _scenario(rounds: int, dp: str) -> str:
    return f"""
name = "dp-levels"
seed = 3
rounds = {rounds}
[nodes]
count = {NODES}
[task]
name = "bench._crossdevice_task:task"
training = true
evaluate_every = 0
[task.settings]
records = 40
[protocol]
group_min = {GROUP}
group_max = {GROUP}
grouping = "exact"
{dp}
"""


def _run(tmp_path: Path, rounds: int, dp: str) -> SimulationResult:
    result = run_simulation(parse_scenario(_scenario(rounds, dp)), tmp_path)
    assert result.summary["completed"], result.summary["why"]
    return result


def _dp(level: str, **extra: object) -> str:
    lines = [
        "[dp]",
        "enabled = true",
        f'level = "{level}"',
        f"clip_norm = {CLIP}",
        f"noise_multiplier = {SIGMA}",
        f"delta = {DELTA}",
        "epsilon_budget = 100.0",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    return "\n".join(lines)


def _final_models(result: SimulationResult) -> list[np.ndarray]:
    return [n.model.astype(np.float64) for n in result.nodes if n.model is not None]


def _spent(result: SimulationResult) -> tuple[list[float], list[int]]:
    ledgers = [n.ledger for n in result.nodes if n.ledger is not None]
    assert len(ledgers) == NODES
    return [ledger.spent() for ledger in ledgers], [ledger.releases() for ledger in ledgers]


def _noise_rms(models: list[np.ndarray]) -> float:
    # exact rounds: every node holds the same average, so one model is the federation's
    for model in models[1:]:
        np.testing.assert_allclose(model, models[0], atol=1e-6)
    return float(np.sqrt(np.mean(models[0] ** 2)))


def test_distributed_level_ledger_and_noise_in_the_average(tmp_path: Path) -> None:
    result = _run(tmp_path, 1, _dp("distributed"))
    spent, releases = _spent(result)
    assert releases == [1] * NODES
    central, local = nominal_noise_multipliers(SIGMA, GROUP)
    expected = distributed_epsilon_for(central, 1, DELTA)
    assert spent == pytest.approx([expected] * NODES, rel=1e-9)
    ledger = result.nodes[0].ledger
    assert ledger is not None
    assert ledger.local_spent() == pytest.approx(distributed_epsilon_for(local, 1, DELTA))
    assert result.rows[-1]["epsilon_max"] == pytest.approx(expected)
    # each member adds a share of std sigma C / sqrt(group_min): the average of 16 nodes
    # (4 groups of 4) carries std sigma C / sqrt(16 group_min); a share that the group
    # sum lost, or one counted twice, would be off by far more than the tolerance
    calibrated = SIGMA * CLIP / math.sqrt(NODES * GROUP)
    rms = _noise_rms(_final_models(result))
    assert rms == pytest.approx(calibrated, rel=0.2)


def test_node_level_ledger_and_local_noise(tmp_path: Path) -> None:
    result = _run(tmp_path, 2, _dp("node"))
    spent, releases = _spent(result)
    assert releases == [2] * NODES
    # replacing a node's dataset moves its clipped update by 2C: z = sigma / 2
    assert spent == pytest.approx([epsilon_for(SIGMA / 2, 2, DELTA)] * NODES, rel=1e-9)
    # every node adds all the noise (std sigma C): 16 of them average to sigma C / 4 a
    # round, twice as much as the distributed shares above; two rounds add up
    rms = _noise_rms(_final_models(result))
    assert rms == pytest.approx(SIGMA * CLIP / math.sqrt(NODES) * math.sqrt(2), rel=0.2)


def test_record_level_ledger_counts_dp_sgd_steps(tmp_path: Path) -> None:
    result = _run(tmp_path, 1, _dp("record", sample_rate=0.25, steps=3))
    spent, releases = _spent(result)
    assert releases == [1] * NODES
    # three subsampled steps, not one release of the Gaussian: a ledger that charged the
    # node-level cost would be far off
    expected = epsilon_for(SIGMA, 3, DELTA, 0.25)
    assert spent == pytest.approx([expected] * NODES, rel=1e-9)
    assert expected < epsilon_for(SIGMA / 2, 1, DELTA) / 2
    ledger = result.nodes[0].ledger
    assert ledger is not None and ledger.steps() == 3


@pytest.mark.parametrize(
    ("dp", "message"),
    [
        ('[dp]\nenabled = true\nlevel = "central"', "[dp] level"),
        ('[dp]\nlevel = "distributed"', "need enabled = true"),
        ("[dp]\nenabled = true\nsample_rate = 0.1\nnoise_multiplier = 5.0", 'level = "record"'),
        (
            '[dp]\nenabled = true\nlevel = "distributed"\nnoise_multiplier = 5.0\n'
            "[protocol]\nmasking = false",
            "masking = true",
        ),
        # the ring cannot hold the noise: the message names the scenario's key
        (
            '[dp]\nenabled = true\nlevel = "distributed"\nnoise_multiplier = 100.0',
            "[protocol]",
        ),
    ],
)
def test_invalid_dp_settings_are_refused(dp: str, message: str) -> None:
    text = f"[nodes]\ncount = 16\n[task]\ntraining = true\n{dp}\n"
    with pytest.raises(ConfigError) as caught:
        parse_scenario(text)
    assert message in str(caught.value)


def test_record_level_needs_training() -> None:
    with pytest.raises(ConfigError, match="training = true"):
        parse_scenario(
            '[nodes]\ncount = 16\n[dp]\nenabled = true\nlevel = "record"\nnoise_multiplier = 1.0'
        )


def test_scenarios_without_a_level_stay_node_level() -> None:
    scenario = parse_scenario("[nodes]\ncount = 16\n[dp]\nenabled = true\nnoise_multiplier = 5.0\n")
    assert scenario.dp.level == "node"
    assert scenario.federation_params().dp_level == "node"
