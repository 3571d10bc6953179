"""The model-layout fingerprint in the federation file (spec/identity.md, "Federation
file", "Model fingerprint"): written by ``p2pfed federation new --task``, checked by a node
at start against the model its task builds, with real files and real node processes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pfed import cli
from p2pfed.atomicfile import atomic_write_text
from p2pfed.demo import free_ports
from p2pfed.errors import ConfigError
from p2pfed.federation import (
    Federation,
    ProtocolParams,
    load_federation,
    save_federation,
    task_model_fingerprint,
)
from p2pfed.identity import IDENTITY_FILE_NAME, NodeIdentity, save_identity
from p2pfed.network import TcpNetwork
from p2pfed.node import Node, NodeOptions

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}
TASK = "support.tiny_task:task"


def p2pfed_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfed", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def make_node_dir(root: Path, federation: Federation, settings: str = "") -> Path:
    node_dir = root / "node"
    node_dir.mkdir(mode=0o700)
    save_identity(node_dir / IDENTITY_FILE_NAME, NodeIdentity.generate())
    save_federation(node_dir / "federation.toml", federation)
    [port] = free_ports(1)
    atomic_write_text(
        node_dir / "config.toml",
        f'listen_host = "127.0.0.1"\nlisten_port = {port}\nmdns = false\n\n'
        f'[task]\nname = "{TASK}"\n{settings}',
    )
    return node_dir


def test_the_key_round_trips_and_is_optional() -> None:
    fed = Federation.new("fp")
    assert fed.model_fingerprint is None
    assert "model_fingerprint" not in fed.to_toml()  # files without a task stay as they were
    with_key = dataclasses.replace(fed, model_fingerprint=bytes(range(32)))
    text = with_key.to_toml()
    assert f'model_fingerprint = "{bytes(range(32)).hex()}"' in text
    assert Federation.from_toml(text) == with_key
    assert Federation.from_toml(fed.to_toml()) == fed


@pytest.mark.parametrize("value", ['"abcd"', '"zz' + "0" * 62 + '"', "12"])
def test_a_malformed_fingerprint_is_refused_naming_the_key(value: str) -> None:
    text = (
        Federation.new("fp")
        .to_toml()
        .replace("[params]", f"model_fingerprint = {value}\n\n[params]", 1)
    )
    # the key belongs to [federation]: insert it there, above the [params] table
    text = text.replace("\n\nmodel_fingerprint", "\nmodel_fingerprint", 1)
    with pytest.raises(ConfigError, match="model_fingerprint"):
        Federation.from_toml(text, "f.toml")


def test_federation_new_with_a_task_records_its_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the command line in this process (tests/test_cli.py does the same): a process per
    # command would only add interpreter starts; the node test below runs one
    path = tmp_path / "fp.federation.toml"
    new = ["federation", "new", "fp", "-o", str(path), "--dp", "off"]
    assert cli.main([*new, "--task", TASK, "--set", "width=6"]) == 0, capsys.readouterr().err
    fed = load_federation(path)
    assert fed.model_fingerprint == task_model_fingerprint(TASK, {"width": 6}, fed)
    assert fed.model_fingerprint != task_model_fingerprint(TASK, {}, fed)
    capsys.readouterr()
    assert cli.main(["federation", "show", str(path)]) == 0
    assert fed.model_fingerprint.hex() in capsys.readouterr().out
    # --set without --task would shape nothing: a usage error, not a silent no-op
    # (--dp off: `federation new` calibrates DP, seconds of CPU, before it checks --set)
    bad = ["federation", "new", "x", "-o", str(tmp_path / "x"), "--dp", "off", "--set", "width=6"]
    assert cli.main(bad) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("p2pfed: error: --set")
    assert not (tmp_path / "x").exists()


def test_a_node_whose_task_builds_another_layout_refuses_to_start(tmp_path: Path) -> None:
    fed = Federation.new("fp", params=ProtocolParams(dp_enabled=False))
    fed = dataclasses.replace(fed, model_fingerprint=task_model_fingerprint(TASK, {}, fed))
    node_dir = make_node_dir(tmp_path, fed, settings="width = 6\n")  # another shape
    result = p2pfed_cli("node", str(node_dir), "--no-train")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("p2pfed: error: "), result.stderr
    assert "model_fingerprint" in last and "federation.toml" in last, last
    assert "Traceback" not in result.stderr


async def test_a_node_of_the_recorded_layout_starts(tmp_path: Path) -> None:
    fed = Federation.new("fp", params=ProtocolParams(dp_enabled=False))
    fed = dataclasses.replace(fed, model_fingerprint=task_model_fingerprint(TASK, {}, fed))
    node = Node.from_directory(
        make_node_dir(tmp_path, fed),
        network=TcpNetwork(mdns=False),
        options=NodeOptions(training=False, threads=False),
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(node.run)
        assert port > 0
        assert node.fingerprint == fed.model_fingerprint
        node.request_stop()
        with trio.fail_after(30):
            await node.finished.wait()
        nursery.cancel_scope.cancel()


async def test_a_node_object_checks_the_layout_before_listening(tmp_path: Path) -> None:
    fed = Federation.new("fp", params=ProtocolParams(dp_enabled=False))
    fed = dataclasses.replace(fed, model_fingerprint=bytes(32))
    node = Node.from_directory(
        make_node_dir(tmp_path, fed),
        network=TcpNetwork(mdns=False),
        options=NodeOptions(training=False, threads=False),
    )
    with pytest.raises(ConfigError, match="model_fingerprint is 0000000000000000"):
        await node.run()
    assert node.listen_port == 0  # it never listened
