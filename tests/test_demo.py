"""``p2pfed demo``: ``p2pfed run`` with the digits task, against centralized training."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfed.cli import main


def test_demo_table_stops_at_its_rounds_and_matches_centralized(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["demo", "--nodes", "3", "--rounds", "20", "--no-dp", "--no-mdns", "--dir",
         str(tmp_path), "--timeout", "240"]
    )  # fmt: skip
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("node  node id"))
    assert lines[header].split()[:8] == [
        "node", "node", "id", "round", "accuracy", "loss", "centralized", "diff"
    ]  # fmt: skip
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    # lingering nodes average on after their 20th round: the table still shows round 20
    assert [row[2] for row in rows] == ["20", "20", "20"]
    assert "every node within 3 points of centralized training" in out
    assert code == 0
    assert (tmp_path / "plain" / "accuracy.png").exists()
    assert (tmp_path / "plain" / "node0" / "checkpoint.bin").exists()
