"""Scenario files, topologies and the ``p2pfed simnet run`` command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from p2pfed.cli import main
from p2pfed.errors import ConfigError
from simnet.checks import consensus_distance, grid_rounds_to_exact_mean
from simnet.scenario import load_scenario, parse_scenario
from simnet.simulation import ROW_FIELDS
from simnet.topology import build_topology, load_topology_file, parse_edge_list

SCENARIOS = Path(__file__).resolve().parent.parent / "simnet" / "scenarios"


@pytest.mark.parametrize(
    "path",
    sorted(p for p in SCENARIOS.glob("*.toml") if not p.name.endswith(".sweep.toml")),
    ids=lambda p: p.stem,
)
def test_example_scenarios_parse(path: Path) -> None:
    scenario = load_scenario(path)
    # a scenario that measures the pace during a fault has no round goal: it runs for its
    # duration (nodes past the goal would stop initiating groups and slow the pace)
    assert scenario.name and (scenario.rounds or scenario.checks.pace)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nodes]\ncount = 3\ncolour = 1", "colour"),
        ("[nodes]\ncount = 3\n[topology]\nkind = 'hypercube'", "hypercube"),
        ("[nodes]\ncount = 3\n[link]\nloss = 1.5", "loss"),
        ("[nodes]\ncount = 3\n[protocol]\ngroup_min = 2", "group_min"),
        ("[nodes]\ncount = 3\n[[events]]\nat = 1\naction = 'explode'\nnodes = [1]", "action"),
        ("[nodes]\ncount = 3\n[[partitions]]\nstart = 5\nend = 2\nsplit = 0.5", "end"),
        ("[topology]\nkind = 'ring'", "count"),
        ("seed = 'x'\n[nodes]\ncount = 3", "seed"),
    ],
)
def test_bad_scenarios_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_scenario(text)


def degrees(n: int, edges: tuple[tuple[int, int], ...] | None) -> list[int]:
    assert edges is not None
    count = [0] * n
    for a, b in edges:
        count[a] += 1
        count[b] += 1
    return count


def test_topology_families() -> None:
    assert build_topology("complete", 5, seed=0).edges is None
    assert degrees(6, build_topology("ring", 6, seed=0).edges) == [2] * 6
    grid = build_topology("grid", 12, seed=0, rows=3, cols=4)
    assert grid.edges is not None and len(grid.edges) == 3 * 3 + 2 * 4
    assert degrees(16, build_topology("torus", 16, seed=0).edges) == [4] * 16
    assert degrees(20, build_topology("random-regular", 20, seed=1, degree=5 - 1).edges) == [4] * 20
    scale_free = build_topology("scale-free", 30, seed=2, m=2)
    assert scale_free.edges is not None and len(scale_free.edges) == 2 * (30 - 2)
    small = build_topology("small-world", 30, seed=3, degree=4, p=0.2)
    assert small.edges is not None and len(small.edges) == 30 * 4 // 2
    again = build_topology("erdos-renyi", 30, seed=4, p=0.2)
    assert again == build_topology("erdos-renyi", 30, seed=4, p=0.2)
    with pytest.raises(ValueError, match="degree"):
        build_topology("random-regular", 5, seed=0, degree=3)


def test_edge_list_errors_name_the_line() -> None:
    with pytest.raises(ValueError, match="<edge list>:2"):
        parse_edge_list("0 1\n1 1\n")
    with pytest.raises(ValueError, match="unknown link key 'speed'"):
        parse_edge_list("0 1 speed=3")


def test_gml_topology_with_shadow_style_units(tmp_path: Path) -> None:
    path = tmp_path / "net.gml"
    path.write_text(
        "graph [\n directed 0\n node [ id 10 ]\n node [ id 20 ]\n node [ id 30 ]\n"
        ' edge [ source 10 target 20 latency "50 ms" packet_loss 0.01 ]\n'
        ' edge [ source 20 target 30 latency "2 ms" bandwidth "10 Mbit" ]\n'
        ' edge [ source 30 target 30 latency "1 ms" ]\n]\n'
    )
    topology = load_topology_file(path)
    assert topology.n == 3 and topology.edges == ((0, 1), (1, 2))
    assert topology.links[0] == {"latency": 0.05, "loss": 0.01}
    assert topology.links[1] == {"latency": 0.002, "bandwidth": 1.25e6}


def test_checks_helpers() -> None:
    assert grid_rounds_to_exact_mean(729, 9) == 3
    assert grid_rounds_to_exact_mean(10, 3) == 3
    import numpy as np

    assert consensus_distance([np.ones(3)] * 4) == (0.0, 0.0)


def test_simnet_run_command_writes_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "small.toml"
    scenario.write_text(
        'name = "cli"\nseed = 2\nrounds = 3\n[nodes]\ncount = 6\n[task.settings]\nparams = 8\n'
    )
    out = tmp_path / "out"
    assert main(["simnet", "run", str(scenario), "--out", str(out)]) == 0
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and tuple(rows[0]) == ROW_FIELDS
    data = json.loads((out / "metrics.json").read_text())
    assert data["summary"]["completed"] and data["summary"]["nodes"] == 6
    assert len(data["rows"]) == len(rows)
    err = capsys.readouterr().err
    assert "round" in err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in err
    else:
        assert (out / "consensus.png").read_bytes().startswith(b"\x89PNG")


def test_simnet_run_reports_a_bad_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "bad.toml"
    scenario.write_text("[nodes]\ncount = 3\n[link]\nlatency_ms = -1\n")
    assert main(["simnet", "run", str(scenario)]) == 1
    assert "latency" in capsys.readouterr().err
