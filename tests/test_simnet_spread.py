"""simnet's per-node spread (metrics.csv, metrics.json, progress line) and the one-line
reason a failed run gives (``simnet.checks.why_failed``), on small real simulations."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from p2pfed.cli import main
from simnet.checks import QUANTILES, spread
from simnet.cli import progress_line
from simnet.report import metrics_csv, metrics_json
from simnet.scenario import parse_scenario
from simnet.simulation import ROW_FIELDS, SimulationResult, run_simulation

# the columns of metrics.csv before the spread was added, in their order: files and
# scripts that read them by position keep working
OLD_COLUMNS = [
    "round",
    "time",
    "live_nodes",
    "round_median",
    "consensus_max",
    "consensus_mean",
    "target_distance_max",
    "range_excess_max",
    "loss_mean",
    "accuracy_mean",
    "bytes",
    "chunks",
    "groups_completed",
    "groups_aborted",
    "conservation_error_max",
    "epsilon_max",
    "crashes",
    "restarts",
]


def scenario(nodes: int, rounds: int, duration: float, extra: str = "") -> str:
    return f"""
name = "spread"
seed = 3
rounds = {rounds}
duration = {duration}
[nodes]
count = {nodes}
[link]
latency_ms = 5
[task]
name = "tiny"
training = false
[task.settings]
params = 24
samples_min = 5
samples_max = 80
[protocol]
group_min = 3
group_max = 4
{extra}
"""


def run(tmp_path: Path, text: str) -> SimulationResult:
    return run_simulation(parse_scenario(text), tmp_path / "nodes")


def test_spread_quantiles() -> None:
    assert spread([]) == {name: None for name, _ in QUANTILES}
    assert spread([2.0]) == {"min": 2.0, "p10": 2.0, "p50": 2.0, "p90": 2.0, "max": 2.0}
    values = spread([float(v) for v in range(11)])
    assert values == {"min": 0.0, "p10": 1.0, "p50": 5.0, "p90": 9.0, "max": 10.0}


def test_rows_and_summary_hold_each_nodes_spread(tmp_path: Path) -> None:
    result = run(tmp_path, scenario(8, 4, 600))
    assert result.summary["completed"] and result.summary["why"] is None
    header = metrics_csv(result.rows).splitlines()[0].split(",")
    assert header[: len(OLD_COLUMNS)] == OLD_COLUMNS
    assert header[len(OLD_COLUMNS) :] == [
        *(f"loss_{q}" for q in ("min", "p10", "p50", "p90", "max")),
        *(f"accuracy_{q}" for q in ("min", "p10", "p50", "p90", "max")),
        *(f"consensus_{q}" for q in ("min", "p10", "p50", "p90")),
        "federation_accuracy",
        "federation_loss",
    ]
    table = list(csv.DictReader(io.StringIO(metrics_csv(result.rows))))
    assert len(table) == len(result.rows) >= 4
    for row in table:
        loss = [float(row[f"loss_{q}"]) for q in ("min", "p10", "p50", "p90", "max")]
        assert loss == sorted(loss) and loss[0] <= float(row["loss_mean"]) <= loss[-1]
        distance = [float(row[f"consensus_{q}"]) for q in ("min", "p10", "p50", "p90", "max")]
        assert distance == sorted(distance)
        assert distance[0] <= float(row["consensus_mean"]) <= distance[-1]
        assert row["accuracy_p50"] == ""  # the tiny task reports no accuracy
    # the models start apart: different nodes, different distances to the mean
    first = result.rows[0]
    assert first["consensus_min"] < first["consensus_max"]
    summary = json.loads(metrics_json(result))["summary"]
    assert summary["final_loss_min"] <= summary["final_loss_p50"] <= summary["final_loss_max"]
    assert summary["final_loss_min"] <= summary["final_loss_mean"] <= summary["final_loss_max"]
    assert summary["final_consensus_p50"] <= summary["final_consensus_max"]
    assert summary["final_accuracy_mean"] is None


def test_progress_line_shows_loss_and_accuracy_with_their_spread() -> None:
    row: dict[str, Any] = {name: None for name in ROW_FIELDS}
    row.update(
        round=3, time=1.5, live_nodes=10, round_median=3.0, consensus_max=0.5,
        groups_completed=9, groups_aborted=1, loss_mean=0.25, loss_min=0.125, loss_max=0.5,
        accuracy_mean=0.875, accuracy_min=0.75, accuracy_max=0.9375,
    )  # fmt: skip
    line = progress_line(row, 10, 2.0)
    assert "round   3/10" in line
    assert "acc 0.875 [0.750..0.938]" in line
    assert "loss 0.25 [0.125..0.5]" in line
    row.update(accuracy_mean=None, loss_mean=None)
    assert "acc" not in progress_line(row, None, 2.0)


def test_crashed_nodes_below_group_min_are_the_reason(tmp_path: Path) -> None:
    extra = '[[events]]\nat = 1.0\naction = "crash"\nnodes = [2, 3]\n'
    result = run(tmp_path, scenario(4, 50, 20, extra))
    assert not result.summary["completed"]
    why = result.summary["why"]
    assert why.startswith("round goal: only 2 nodes were live at the end")
    assert "group_min = 3" in why and "nodes 2, 3 crashed" in why


def test_a_partition_that_never_heals_is_the_reason(tmp_path: Path) -> None:
    extra = "[[partitions]]\nstart = 1.0\ngroups = [[0, 1]]\n"
    why = run(tmp_path, scenario(6, 50, 20, extra)).summary["why"]
    assert why.startswith("round goal: the partition from t=1s never healed")
    assert "nodes 0, 1 on one side" in why


def test_a_triangle_free_topology_is_the_reason(tmp_path: Path) -> None:
    extra = '[topology]\nkind = "ring"\n'
    result = run(tmp_path, scenario(6, 3, 10, extra))
    assert result.summary["groups_completed"] == 0
    assert "ring topology has no triangle" in result.summary["why"]


def test_rounds_too_slow_for_the_duration(tmp_path: Path) -> None:
    why = run(tmp_path, scenario(5, 100000, 2)).summary["why"]
    assert why.startswith("round goal: rounds too slow for the time limit")
    assert "100000 rounds need about" in why and "duration = 2s" in why


def test_cli_prints_the_reason_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "crash.toml"
    path.write_text(
        scenario(
            4,
            50,
            10,
            '[[events]]\nat = 1.0\naction = "crash"\nnodes = [1]\n'
            '[[events]]\nat = 1.5\naction = "crash"\nnodes = [3]\n',
        )
    )
    status = main(["simnet", "run", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert status == 1
    err = capsys.readouterr().err
    assert "; final loss " in err  # the end line: the live nodes' loss and its spread
    why = [line for line in err.splitlines() if line.startswith("simnet: why: ")]
    assert why == [
        "simnet: why: round goal: only 2 nodes were live at the end, fewer than group_min = 3,"
        " so no group could form: nodes 1, 3 crashed or stopped and never restarted"
        " (2 crashes, 0 restarts)"
    ]
