"""Nodes started by the fork-server launcher: real processes that share their imports."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.node_logs import rounds_logged

import p2pfed.launcher as launcher_module
from p2pfed.demo import create_local_federation
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.launcher import WARM_MODULES, NodeLauncher


def private_and_resident(pid: int) -> tuple[int, int]:
    """(USS, RSS) of a process in kB: pages only it maps, and all its resident pages."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0])
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Rss"]


@pytest.mark.proc
def test_launched_nodes_federate_share_torch_and_stop_cleanly(tmp_path: Path) -> None:
    federation = dataclasses.replace(
        Federation.new("launcher-test"),
        params=ProtocolParams(dp_enabled=False, group_min=3, group_max=3),
    )
    dirs = create_local_federation(
        tmp_path, federation, 3, mdns=False, task="support.tiny_task:task"
    )
    launcher = NodeLauncher(preload=["support.tiny_task"])
    nodes = [
        launcher.start(
            ["node", str(d), "--log-json", "--rounds", "3", "--linger"],
            stdout=d / "node.out",
            stderr=d / "node.log",
        )
        for d in dirs
    ]
    try:
        deadline = time.monotonic() + 90
        while min(rounds_logged(d / "node.log") for d in dirs) < 3:
            assert time.monotonic() < deadline, [(d / "node.log").read_text()[-2000:] for d in dirs]
            assert all(n.poll() is None for n in nodes), "a node exited early"
            time.sleep(0.1)
        for node in nodes:
            private, resident = private_and_resident(node.pid)
            # torch and the node code come from the fork server's pages: a node started as a
            # fresh interpreter has most of its ~200 MB private; these have a small fraction.
            assert private < 0.35 * resident, (private, resident)
        for node in nodes:
            node.terminate()
        assert [node.wait(60) for node in nodes] == [0, 0, 0]
    finally:
        launcher.stop_all(timeout=10)
    for d in dirs:
        final = json.loads((d / "node.out").read_text().splitlines()[-1])
        assert final["round"] >= 3


def test_exit_status_and_error_output_reach_the_caller(tmp_path: Path) -> None:
    launcher = NodeLauncher()
    process = launcher.start(
        ["node", str(tmp_path / "missing")], stdout=tmp_path / "out", stderr=tmp_path / "err"
    )
    assert process.wait(60) == 1
    assert "is not a node directory" in (tmp_path / "err").read_text()
    assert process.poll() == 1


def _write_imported(path: str, names: list[str]) -> None:
    """Body of a forked process: which of ``names`` it has without importing anything."""
    Path(path).write_text(json.dumps([name for name in names if name in sys.modules]))


def test_fork_server_preloads_what_local_training_imports(tmp_path: Path) -> None:
    # A task's first torch.optim optimizer imports TorchDynamo (~800 modules, over a second
    # of CPU per node): the fork server imports it once so that every node inherits it.
    launcher = NodeLauncher()
    out = tmp_path / "imported.json"
    names = ["torch._dynamo", "numpy.random", "p2pfed.server_optimizer", "p2pfed.proximal"]
    assert set(names) <= set(WARM_MODULES)
    process = launcher._context.Process(target=_write_imported, args=(str(out), names))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert json.loads(out.read_text()) == names


def test_warm_preload_skips_modules_this_installation_lacks(monkeypatch: Any) -> None:
    monkeypatch.setattr(launcher_module, "WARM_MODULES", ("p2pfed.no_such_module", "json"))
    launcher_module.preload(warm=True)
    assert "p2pfed.no_such_module" not in sys.modules
