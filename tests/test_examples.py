"""Every example in examples/ runs: the two tasks under ``p2pfed run``, the topology in simnet."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from p2pfed.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_cnn_on_a_dirichlet_split_runs_from_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(EXAMPLES)  # found like `python -m` would: no PYTHONPATH needed
    code = main(
        ["run", "--task", "cnn_dirichlet:task", "--nodes", "3", "--rounds", "3", "--set",
         "alpha=0.3", "--dir", str(tmp_path / "cnn"), "--no-mdns", "--timeout", "240"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "cnn" / "summary.json").read_text())
    assert summary["goal_round"] == 3 and summary["settings"] == {"alpha": 0.3}
    assert summary["accuracy_min"] > 0.5  # after 3 rounds; chance is 0.1


def test_cnn_example_splits_with_label_skew() -> None:
    import sys

    sys.path.insert(0, str(EXAMPLES))
    try:
        from cnn_dirichlet import task
    finally:
        sys.path.remove(str(EXAMPLES))
    from p2pfed.partition import label_skew

    parts = [task.load_data({"num_nodes": 4, "node_index": i, "alpha": 0.1}) for i in range(4)]
    labels = [p.train[1].numpy() for p in parts]
    assert sum(p.num_train for p in parts) == 1438
    import numpy as np

    positions = np.cumsum([0, *(len(x) for x in labels)])
    skew = label_skew(
        np.concatenate(labels), [np.arange(a, b) for a, b in itertools.pairwise(positions)]
    )
    assert skew > 0.3


def test_tabular_reaches_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(EXAMPLES)
    code = main(
        ["run", "--task", "tabular:task", "--nodes", "3", "--target-accuracy", "0.93",
         "--dir", str(tmp_path / "tab"), "--no-mdns", "--timeout", "240"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "tab" / "summary.json").read_text())
    assert summary["accuracy_min"] >= 0.93


def test_custom_simnet_topology(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the scenario's task is examples/tabular.py
    scenario = EXAMPLES / "simnet_campuses" / "scenario.toml"
    code = main(["simnet", "run", str(scenario), "--out", str(tmp_path / "sim")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "PASS round goal" in captured.out
    rows = json.loads((tmp_path / "sim" / "metrics.json").read_text())["rows"]
    assert rows[-1]["round"] == 5
