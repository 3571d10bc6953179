"""Defaults that train and tools to choose (issue 14, item 1): calibration, federation new."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from p2pfed import dp
from p2pfed.accountant import epsilon_for
from p2pfed.cli import main
from p2pfed.errors import ConfigError
from p2pfed.federation import ProtocolParams, load_federation


def test_the_default_parameters_can_release() -> None:
    # the old defaults (sigma 1, budget 10) cost 10.73 per release: no node ever trained
    params = ProtocolParams()
    one = epsilon_for(dp.effective_noise_multiplier(params.dp_noise_multiplier), 1, 1e-5)
    assert one <= params.dp_epsilon_budget
    dp.check_budget(params)
    # and they are what `federation new --dp node` calibrates: 100 rounds at epsilon 8
    assert dp.release_cost(params).epsilon(100, params.dp_delta) <= params.dp_epsilon_budget
    assert params.dp_noise_multiplier == dp.calibrate("node", epsilon=8.0, delta=1e-5, rounds=100)


def test_a_first_release_above_the_budget_is_refused() -> None:
    params = ProtocolParams(dp_noise_multiplier=1.0, dp_epsilon_budget=10.0)
    with pytest.raises(ConfigError, match=r"costs epsilon 10\.73.*p2pfed federation new"):
        dp.check_budget(params, "lab.toml")
    dp.check_budget(dataclasses.replace(params, dp_enabled=False))  # no DP: nothing to check


@pytest.mark.parametrize(
    ("level", "epsilon", "rounds", "q", "steps"),
    [
        ("node", 8.0, 100, 1.0, 1),
        ("node", 1.0, 10, 1.0, 1),
        ("record", 8.0, 100, 0.02, 50),
        ("record", 1.0, 60, 0.01, 40),
    ],
)
def test_calibration_fits_the_budget_tightly(
    level: str, epsilon: float, rounds: int, q: float, steps: int
) -> None:
    sigma = dp.calibrate(
        level, epsilon=epsilon, delta=1e-5, rounds=rounds, sampling_rate=q, steps=steps
    )
    params = ProtocolParams(
        dp_level=level,
        dp_noise_multiplier=sigma,
        dp_epsilon_budget=epsilon,
        dp_sample_rate=q,
        dp_steps=steps,
    )
    spent = dp.release_cost(params).epsilon(rounds, 1e-5)
    assert 0.97 * epsilon < spent <= epsilon
    assert dp.release_cost(params).epsilon(rounds + 1, 1e-5) > spent


def test_calibration_refuses_an_unreachable_target() -> None:
    with pytest.raises(ConfigError, match="cannot calibrate"):
        dp.calibrate("node", epsilon=1e-4, delta=1e-5, rounds=10)


def _new(tmp_path: Path, *args: str) -> tuple[int, Path]:
    path = tmp_path / "fed.toml"
    return main(["federation", "new", "lab", "-o", str(path), *args]), path


def test_federation_new_defaults_to_calibrated_record_level_dp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, path = _new(tmp_path)
    assert code == 0
    params = load_federation(path).params
    assert params.dp_enabled and params.dp_level == "record"
    assert params.dp_epsilon_budget == 8.0 and params.dp_delta == 1e-5
    spent = dp.release_cost(params).epsilon(100, 1e-5)
    assert 7.8 < spent <= 8.0
    assert "record level" in capsys.readouterr().out


def test_federation_new_node_level_with_options(tmp_path: Path) -> None:
    code, path = _new(tmp_path, "--dp", "node", "--epsilon", "3", "--rounds", "40")
    assert code == 0
    params = load_federation(path).params
    assert params.dp_level == "node" and params.dp_epsilon_budget == 3.0
    assert 2.9 < dp.release_cost(params).epsilon(40, 1e-5) <= 3.0


def test_federation_new_without_dp(tmp_path: Path) -> None:
    code, path = _new(tmp_path, "--dp", "off")
    assert code == 0 and not load_federation(path).params.dp_enabled


@pytest.mark.parametrize(
    "args",
    [["--epsilon", "0.0001"], ["--rounds", "0"], ["--delta", "2"], ["--sample-rate", "0"]],
)
def test_federation_new_bad_privacy_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, path = _new(tmp_path, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("p2pfed: error: ")
    assert not path.exists()


def test_status_says_plainly_when_the_budget_is_spent(tmp_path: Path) -> None:
    from p2pfed.status import StatusWriter, format_status, read_status

    writer = StatusWriter(tmp_path, node_id="n", wall_clock=lambda: 0.0, pid=1)
    writer.update(
        1.0,
        force=True,
        state="running",
        dp_enabled=True,
        epsilon_budget=8.0,
        epsilon_spent=7.9,
        dp_exhausted=True,
    )
    text = format_status(read_status(tmp_path), now=0.0)
    assert "7.900 spent of 8.000 (99 %), 0.100 remaining" in text
    assert "BUDGET SPENT: this node has stopped training" in text
