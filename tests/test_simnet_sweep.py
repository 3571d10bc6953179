"""``p2pfed simnet sweep``: expansion and validation of sweep files, and real parallel runs
(local processes, and Ray when it is installed) whose per-run metrics are byte-identical
to ``p2pfed simnet run`` of the same expanded scenario, with a worker death retried.
"""

from __future__ import annotations

import csv
import json
import socket
import sys
from pathlib import Path

import pytest

from p2pfed.cli import main
from p2pfed.errors import ConfigError
from simnet.scenario import parse_scenario
from simnet.sweep import (
    MAX_RUNS,
    LocalRunner,
    RayRunner,
    RunJob,
    Sweep,
    load_sweep,
    run_job,
    run_sweep,
)

SCENARIOS = Path(__file__).resolve().parent.parent / "simnet" / "scenarios"

# the smallest useful scenario: 5 nodes, 2 rounds of pure averaging of 10 parameters
BASE = """
name = "tiny-sweep"
seed = 1
rounds = 2
duration = 300
[nodes]
count = 5
[task]
name = "tiny"
[task.settings]
params = 10
[protocol]
group_min = 3
group_max = 4
"""


def write_sweep(tmp_path: Path, sweep: str, base: str = BASE) -> Path:
    (tmp_path / "base.toml").write_text(base)
    path = tmp_path / "test.sweep.toml"
    path.write_text(sweep)
    return path


def sweep_of(tmp_path: Path, table: str, base: str = BASE) -> Sweep:
    return load_sweep(write_sweep(tmp_path, f'base = "base.toml"\n[sweep]\n{table}\n', base))


# -- expansion and validation ---------------------------------------------------------------


def test_expansion_is_the_cartesian_product_with_seeds_innermost(tmp_path: Path) -> None:
    sweep = sweep_of(
        tmp_path, '"protocol.group_max" = [3, 4]\n"link.latency_ms" = [5, 50.5]\nseeds = [7, 8]'
    )
    assert sweep.name == "test"
    assert sweep.keys == ("protocol.group_max", "link.latency_ms")
    assert len(sweep.runs) == 8
    assert [(r.params, r.seed) for r in sweep.runs[:3]] == [
        ((("protocol.group_max", 3), ("link.latency_ms", 5)), 7),
        ((("protocol.group_max", 3), ("link.latency_ms", 5)), 8),
        ((("protocol.group_max", 3), ("link.latency_ms", 50.5)), 7),
    ]
    last = parse_scenario(sweep.runs[-1].scenario_toml)
    assert (last.protocol.group_max, last.link.latency_ms, last.seed) == (4, 50.5, 8)
    # everything else is the base's, the name (which seeds the federation) included
    assert last.name == "tiny-sweep" and last.nodes.count == 5 and last.rounds == 2
    assert sweep.runs[-1].dirname == "008-group_max=4-latency_ms=50.5-seed=8"
    assert len({r.dirname for r in sweep.runs}) == 8


def test_nested_tables_task_settings_and_default_seed(tmp_path: Path) -> None:
    sweep = sweep_of(
        tmp_path, "[sweep.task.settings]\nparams = [3, 4]\n[sweep.dp]\nenabled = [true]"
    )
    assert sweep.keys == ("task.settings.params", "dp.enabled")
    assert sweep.seeds == (1,)  # the base scenario's
    scenario = parse_scenario(sweep.runs[1].scenario_toml)
    assert scenario.task.settings["params"] == 4 and scenario.dp.enabled


def test_topology_file_path_is_made_absolute(tmp_path: Path) -> None:
    (tmp_path / "graph").mkdir()
    (tmp_path / "graph" / "edges.txt").write_text("0 1\n1 2\n2 3\n3 4\n4 0\n")
    base = BASE.replace("[nodes]\ncount = 5", '[topology]\nkind = "file"\nfile = "graph/edges.txt"')
    sweep = sweep_of(tmp_path, "seeds = [1]", base)
    assert f'file = "{tmp_path / "graph" / "edges.txt"}"' in sweep.runs[0].scenario_toml


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('"protocol.group_maxx" = [4]', "'protocol.group_maxx' is not a scenario key"),
        ('"protocl.group_max" = [4]', "the scenario has no [protocl]"),
        ('"rounds_goal" = [4]', "'rounds_goal' is not a scenario key"),
        ('"protocol.group_max" = []', "protocol.group_max is an empty list"),
        ('"protocol.group_max" = 4', "must be a list of values (write protocol.group_max = [4])"),
        ('"protocol.group_max" = [4, 4]', "lists a value twice"),
        ("seed = [1, 2]", "sweeps seeds with seeds = [..]"),
        ('name = ["a"]', "cannot sweep name"),
        ("events = [1]", "cannot sweep [[events]]"),
        ('"task.settings" = [1]', "task settings are task.settings.NAME"),
        ("seeds = []", "seeds is an empty list"),
        ('seeds = [1, "2"]', "seeds must be integers"),
        # each run is validated before any starts, and the error names the run
        (
            '"protocol.group_max" = [4, 2]',
            "run group_max=2 seed=1: [protocol] group_max must be between 3 and 64",
        ),
        ('"topology.kind" = ["ring", "moebius"]', "run kind=moebius seed=1: [topology] kind"),
    ],
)
def test_bad_sweep_tables_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        sweep_of(tmp_path, table)
    assert message in str(caught.value)


def test_bad_sweep_files(tmp_path: Path) -> None:
    def error(text: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_sweep(write_sweep(tmp_path, text))
        return str(caught.value)

    assert 'no base scenario (add base = "SCENARIO.toml"' in error("[sweep]\nseeds = [1]\n")
    assert "cannot read the base scenario" in error('base = "missing.toml"\n[sweep]\nseeds = [1]')
    assert "no [sweep] table" in error('base = "base.toml"\n')
    assert "unknown top-level key 'seeds'" in error('base = "base.toml"\nseeds = [1]\n[sweep]')
    assert "not valid TOML" in error('base = "base.toml"\n[sweep\n')
    huge = ", ".join(str(i) for i in range(101))
    assert f"expands to {101 * 101} runs; the limit is {MAX_RUNS}" in error(
        f'base = "base.toml"\n[sweep]\n"link.latency_ms" = [{huge}]\nseeds = [{huge}]'
    )
    with pytest.raises(ConfigError, match="cannot read sweep file"):
        load_sweep(tmp_path / "nothing.sweep.toml")


def test_cli_reports_a_bad_sweep_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_sweep(tmp_path, 'base = "base.toml"\n[sweep]\n"protocol.group_max" = []\n')
    assert main(["simnet", "sweep", str(path), "--local", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"p2pfed: error: {path}: [sweep] protocol.group_max is an empty list (give at "
                   "least one value)"]  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_address_without_ray_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import ray` fail as it does where Ray is not installed
    monkeypatch.setitem(sys.modules, "ray", None)
    path = write_sweep(tmp_path, 'base = "base.toml"\n[sweep]\nseeds = [1]\n')
    assert main(["simnet", "sweep", str(path), "--address", "auto"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("p2pfed: error: Ray is not installed (pip install 'p2pfed[sweep]'")
    assert len(err) == 1


def test_unreachable_ray_address_fails_fast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    path = write_sweep(tmp_path, 'base = "base.toml"\n[sweep]\nseeds = [1]\n')
    assert main(["simnet", "sweep", str(path), "--address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"p2pfed: error: cannot reach the Ray cluster at 127.0.0.1:{port}")


def test_a_run_that_raises_is_an_error_row() -> None:
    # a topology file is read when the run starts: a missing one fails the run, not the sweep
    text = BASE.replace("[nodes]\ncount = 5", '[topology]\nkind = "file"\nfile = "missing.txt"')
    outcome = run_job(RunJob(0, "broken", text, "/nonexistent"))
    assert outcome.status == "ERROR" and "missing.txt" in outcome.error
    assert outcome.files == {}


def test_the_example_sweep_files_are_valid() -> None:
    examples = sorted(SCENARIOS.glob("*.sweep.toml"))
    assert examples
    for path in examples:
        assert len(load_sweep(path).runs) >= 2


# -- real runs ------------------------------------------------------------------------------


def alone(scenario: Path, out: Path) -> Path:
    """``p2pfed simnet run`` of one scenario, in this process."""
    main(["simnet", "run", str(scenario), "--out", str(out), "--quiet"])
    return out


def assert_identical_to_alone(out: Path, row: dict[str, str], tmp_path: Path) -> None:
    """A run's deterministic files (simnet/report.py: no wall time in them) are the bytes
    that running its scenario.toml alone writes."""
    folder = out / row["dir"]
    single = alone(folder / "scenario.toml", tmp_path / "alone" / folder.name)
    for name in ("metrics.csv", "metrics.json"):
        assert (folder / name).read_bytes() == (single / name).read_bytes(), (row["dir"], name)


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "sweep.csv").open() as table:
        return list(csv.DictReader(table))


def test_local_sweep_runs_match_running_each_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # where Ray is not installed the sweep runs in local processes (no --local needed)
    monkeypatch.setitem(sys.modules, "ray", None)
    path = write_sweep(
        tmp_path, 'base = "base.toml"\n[sweep]\n"protocol.group_max" = [3, 4]\nseeds = [1, 2]\n'
    )
    out = tmp_path / "out"
    code = main(["simnet", "sweep", str(path), "--jobs", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "on 2 local processes" in err
    assert sum(1 for line in err.splitlines() if "] PASS group_max=" in line) == 4
    assert "simnet: sweep test: 4 runs: 4 PASS" in err
    rows = read_rows(out)
    assert [(r["protocol.group_max"], r["seed"], r["status"]) for r in rows] == [
        ("3", "1", "PASS"),
        ("3", "2", "PASS"),
        ("4", "1", "PASS"),
        ("4", "2", "PASS"),
    ]
    assert all(r["check: round goal"] == "PASS" and r["attempts"] == "1" for r in rows)
    assert all(int(r["rounds_min"]) >= 2 and r["final_consensus_max"] for r in rows)
    document = json.loads((out / "sweep.json").read_text())
    assert document["keys"] == ["protocol.group_max"] and len(document["runs"]) == 4
    assert document["runs"][3]["rounds_min"] == int(rows[3]["rounds_min"])
    assert (out / "sweep-final_consensus_max-by-group_max.png").stat().st_size > 0
    for row in rows:
        assert_identical_to_alone(out, row, tmp_path)
    # different seeds really are different runs
    assert (out / rows[0]["dir"] / "metrics.csv").read_bytes() != (
        out / rows[1]["dir"] / "metrics.csv"
    ).read_bytes()


DYING_BASE = BASE.replace('name = "tiny"', 'name = "support.dying_task:task"')


def dying_sweep(tmp_path: Path, die_times: list[int]) -> Sweep:
    """A run per value of ``die_times``: building its models kills its process that many
    times (then it runs normally)."""
    base = DYING_BASE.replace("params = 10", f'params = 10\ndie_marker = "{tmp_path}"')
    return sweep_of(tmp_path, f'"task.settings.die_times" = {die_times}', base)


def test_a_run_whose_worker_died_is_retried_once(tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "out"
    rows = run_sweep(dying_sweep(tmp_path, [0, 1, 5]), out, LocalRunner(2), progress=lines.append)
    assert [(r["status"], r["attempts"]) for r in rows] == [("PASS", 1), ("PASS", 2), ("DIED", 2)]
    assert (tmp_path / "die_times=1").read_text() == "x"
    assert (tmp_path / "die_times=5").read_text() == "xx"  # not a third time
    assert sum("its worker process died; retrying" in line for line in lines) == 2
    assert rows[2]["why"] == "the worker process died in each of 2 attempts"
    assert [r["status"] for r in read_rows(out)] == ["PASS", "PASS", "DIED"]
    # the retried run is the run it would have been
    assert_identical_to_alone(out, {k: str(v) for k, v in rows[1].items()}, tmp_path)


def test_ray_sweep_retries_and_matches_running_alone(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        lines: list[str] = []
        out = tmp_path / "out"
        rows = run_sweep(dying_sweep(tmp_path, [0, 1]), out, RayRunner(), progress=lines.append)
    finally:
        ray.shutdown()
    assert [(r["status"], r["attempts"]) for r in rows] == [("PASS", 1), ("PASS", 2)]
    assert sum("its Ray worker died" in line for line in lines) == 1
    for row in rows:
        assert_identical_to_alone(out, {k: str(v) for k, v in row.items()}, tmp_path)
