"""``p2pfed run``: real node processes from the fork server, results, plots, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from p2pfed.cli import main
from p2pfed.errors import ConfigError
from p2pfed.run import RunOptions, parse_params
from p2pfed.tasks.digits import task as digits

TASK = "p2pfed.tasks.digits:task"


def _table(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("node  node id"))
    rows = []
    for line in lines[start + 1 :]:
        if not line[:1].isdigit():
            break
        rows.append(line.split())
    return rows


def test_run_rounds_writes_results_plots_and_an_exportable_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "fed"
    code = main(
        ["run", "--task", TASK, "--nodes", "3", "--rounds", "4", "--dir", str(work),
         "--no-mdns", "--set", "hidden=16", "--timeout", "240"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = _table(captured.out)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert all(r[2] == "4" for r in rows)  # the round column is the goal, never beyond it
    assert "round 4/4" in captured.err and "accuracy min" in captured.err

    # every node's config.toml holds its settings in the [task] table
    config = (work / "node2" / "config.toml").read_text()
    assert 'name = "p2pfed.tasks.digits:task"' in config and "node_index = 2" in config
    assert "hidden = 16" in config and "num_nodes = 3" in config

    with open(work / "rounds.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert {(r["node"], r["round"]) for r in records} == {
        (str(n), str(r)) for n in range(3) for r in range(1, 5)
    }
    summary = json.loads((work / "summary.json").read_text())
    assert summary["goal_round"] == 4 and len(summary["nodes_table"]) == 3
    assert summary["accuracy_min"] == pytest.approx(float(rows[0][3]), abs=1e-4)
    for name in ("accuracy.png", "loss.png"):
        assert (work / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the exported model is the node's final model: it scores what the node reported last
    model_path = tmp_path / "model.pt"
    assert main(["export", str(work / "node0"), "-o", str(model_path)]) == 0
    final = json.loads((work / "node0" / "node.out").read_text().strip().splitlines()[-1])
    config_dict = {"node_index": 0, "num_nodes": 3, "hidden": 16}
    model = digits.build_model(config_dict)
    model.load_state_dict(torch.load(model_path, weights_only=True))
    metrics = digits.evaluate(model, digits.load_data(config_dict), config_dict)
    assert metrics["accuracy"] == pytest.approx(final["metrics"]["accuracy"], abs=1e-6)


def test_run_until_target_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "fed"
    code = main(
        ["run", "--task", TASK, "--nodes", "3", "--target-accuracy", "0.85", "--dir",
         str(work), "--no-mdns", "--timeout", "240"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((work / "summary.json").read_text())
    goal = summary["goal_round"]
    assert goal >= 1 and summary["accuracy_min"] >= 0.85
    rows = _table(captured.out)
    assert all(r[2] == str(goal) and float(r[3]) >= 0.85 for r in rows)
    # and not a round later than needed: some node was below the target the round before
    with open(work / "rounds.csv", newline="") as f:
        before = [float(r["accuracy"]) for r in csv.DictReader(f) if r["round"] == str(goal - 1)]
    assert goal == 1 or min(before) < 0.85


def test_a_node_that_fails_is_reported_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["run", "--task", TASK, "--nodes", "3", "--rounds", "2", "--dir", str(tmp_path / "f"),
         "--no-mdns", "--set", "hidden=0", "--timeout", "120"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("p2pfed: error: node ")
    assert "exited early (code 1): [task] hidden must be an integer >= 1, got 0" in err[-1]


def test_bad_task_fails_before_any_node_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["run", "--task", "nosuch.module:task", "--nodes", "3", "--dir", str(tmp_path)])
    assert code == 1
    assert "module 'nosuch.module' not found" in capsys.readouterr().err
    assert not (tmp_path / "node0").exists()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (RunOptions(TASK, 2), "at least 3"),
        (RunOptions(TASK, 3, rounds=None), "--rounds or --target-accuracy"),
        (RunOptions(TASK, 3, rounds=None, target_accuracy=1.5), "fraction in (0, 1]"),
        (RunOptions(TASK, 3, rounds=None, target_accuracy=0.9, epsilon=4.0), "needs --rounds"),
        (RunOptions(TASK, 3, settings={"node_index": 1}), "the runner sets node_index"),
    ],
)
def test_options_that_cannot_run(options: RunOptions, fragment: str) -> None:
    with pytest.raises(ConfigError, match=pytest.importorskip("re").escape(fragment)):
        options.check()


def test_protocol_params_from_the_command_line() -> None:
    params = parse_params(["averaging=random", "group_max=4", "server_lr=0.5"])
    assert params == {"averaging": "random", "group_max": 4, "server_lr": 0.5}
    built = RunOptions(TASK, 4, params=params).protocol_params()
    assert (built.averaging, built.group_max, built.min_nodes, built.dp_enabled) == (
        "random",
        4,
        4,
        False,
    )
    with pytest.raises(ConfigError, match="--param group_size: not a protocol parameter"):
        RunOptions(TASK, 4, params={"group_size": 3}).protocol_params()
    private = RunOptions(TASK, 4, rounds=10, epsilon=8.0).protocol_params()
    assert private.dp_enabled and private.dp_epsilon_budget == pytest.approx(8.0, rel=1e-3)


@pytest.mark.parametrize("level", ["node", "record", "distributed"])
def test_epsilon_calibrates_for_the_chosen_dp_level(level: str) -> None:
    """``--epsilon`` calibrates the noise of the federation's own DP level (and, for
    distributed DP, makes room for the noise in the fixed-point range): the whole run's
    rounds then spend exactly the budget, which the node's own check accepts."""
    from p2pfed.dp import check_budget, release_cost

    params = RunOptions(
        TASK, 4, rounds=10, epsilon=3.0, params={"dp_level": level}
    ).protocol_params()
    assert params.dp_level == level
    check_budget(params)  # refuses a federation whose rounds cannot fit, or no headroom
    spent = release_cost(params).epsilon(10, params.dp_delta)
    assert spent == pytest.approx(3.0, rel=0.02) and spent <= params.dp_epsilon_budget


def test_record_level_dp_trains_real_nodes_and_spends_what_the_accountant_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dp_level = "record": every node runs DP-SGD on the digits task's tensors (the task's
    own train is not called) and its ledger spends exactly the subsampled-Gaussian epsilon
    of rounds x dp_steps steps at dp_sample_rate; the federation still learns."""
    from p2pfed.accountant import epsilon_for

    work = tmp_path / "fed"
    code = main(
        ["run", "--task", TASK, "--nodes", "3", "--rounds", "3", "--dir", str(work),
         "--no-mdns", "--timeout", "240", "--param", "dp_enabled=true",
         "--param", "dp_level=record", "--param", "dp_noise_multiplier=1.0",
         "--param", "dp_epsilon_budget=100"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((work / "summary.json").read_text())
    expected = epsilon_for(1.0, 3 * 50, 1e-5, 0.02)  # the defaults: 50 steps, q = 0.02
    for row in summary["nodes_table"]:
        assert row["round"] == 3
        assert row["epsilon_spent"] == pytest.approx(expected, rel=1e-6)
    assert summary["accuracy_min"] > 0.2  # chance is 0.1
    for n in range(3):
        assert (work / f"node{n}" / "privacy-ledger.json").exists()
