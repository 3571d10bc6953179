"""The conformance kit against p2pfed's own node (every check passes) and against a
deliberately broken responder (the kit blames the right spec sections).

The node under test is a real ``p2pfed node`` process (tiny task, no training) on loopback;
the broken responder is a small trio server around the reference channel core that
completes handshakes correctly but, once a channel is open, swallows protocol errors
instead of closing, and never sends NodeAnnounce. The broken responder and the kit talk
over a simnet virtual network in trio's virtual time (MockClock): the kit's many short
timeouts against it then take no real time and cannot race a slow machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pfed.atomicfile import atomic_write_text
from p2pfed.channel import ChannelConnection, Role
from p2pfed.conformance import (
    CHECKS,
    SECTIONS,
    ConformanceOptions,
    ConformanceReport,
    Status,
    run_conformance,
)
from p2pfed.demo import free_ports
from p2pfed.errors import RemoteProtocolError
from p2pfed.federation import Federation, ProtocolParams, load_federation, save_federation
from p2pfed.identity import IDENTITY_FILE_NAME, NodeIdentity, load_identity, save_identity
from p2pfed.messages import NodeAnnounce
from simnet.network import VirtualNetwork

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "PYTHONUNBUFFERED": "1"}
TASK = "support.tiny_task:task"
SLOW = {"group-timeout", "exclusion"}
"""They wait out the node's all-reduce timeout (30 s here); test_conformance_behaviour.py
runs them against a node with a short one."""
WITH_A_NODE = {
    "pex-answer",
    "pex-rate-limit",
    "pex-per-channel",
    "keepalive-sent",
    "secure-group",
    "group-initiated",
    "group-start",
    "abort-forwarding",
    "group-position",
    "group-weights",
    *SLOW,
}
"""Checks that need a node behind the channel (the broken responder is only a channel)."""


def p2pfed_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m p2pfed ARGS`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "p2pfed", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


@dataclasses.dataclass(frozen=True)
class RunningNode:
    port: int
    node_dir: Path

    @property
    def federation_file(self) -> Path:
        return self.node_dir / "federation.toml"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A `p2pfed node --no-train` process of a fresh federation, listening on loopback."""
    node_dir = tmp_path_factory.mktemp("conformance") / "node"
    node_dir.mkdir(mode=0o700)
    federation = dataclasses.replace(
        Federation.new("conformance-test"), params=ProtocolParams(dp_enabled=False)
    )
    save_identity(node_dir / IDENTITY_FILE_NAME, NodeIdentity.generate())
    save_federation(node_dir / "federation.toml", federation)
    [port] = free_ports(1)
    atomic_write_text(
        node_dir / "config.toml",
        f'listen_host = "127.0.0.1"\nlisten_port = {port}\nmdns = false\ntask = "{TASK}"\n',
    )
    log = node_dir / "node.log"
    with open(log, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--no-train"],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=ENV,
        )
    try:
        deadline = time.monotonic() + 60
        while "listening on port" not in log.read_text(encoding="utf-8"):
            assert process.poll() is None, log.read_text(encoding="utf-8")
            assert time.monotonic() < deadline, log.read_text(encoding="utf-8")
            time.sleep(0.05)
        yield RunningNode(port, node_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_every_check_passes_against_the_reference_node(node: RunningNode) -> None:
    options = ConformanceOptions(timeout=5.0, idle=1.0, group_timeout=40.0, task=TASK)
    federation = load_federation(node.federation_file)
    names = [c.name for c in CHECKS if c.name not in SLOW]
    report = await run_conformance("127.0.0.1", node.port, federation, options, checks=names)
    text = report.format_text()
    assert [r.name for r in report.results] == names
    assert all(r.status is Status.PASS for r in report.results), text
    assert report.ok
    assert report.peer_id == load_identity(node.node_dir / IDENTITY_FILE_NAME).node_id
    # the report covers every section that has checks, and says which node it checked
    assert {r.section for r in report.results} <= set(SECTIONS)
    assert str(report.peer_id) in text and "CONFORMANT" in text


CLI_CHECKS = ["welcome", "keepalive", "invalid-cbor", "pex-answer", "node-announce"]
"""A quick check of each kind for the command line test (every check, and the slow group
ones, pass against the same node in test_every_check_passes_against_the_reference_node)."""


def test_cli_exit_code_and_json_report(node: RunningNode) -> None:
    result = p2pfed_cli(
        "conformance",
        f"127.0.0.1:{node.port}",
        "--federation",
        str(node.federation_file),
        "--idle",
        "0.5",
        "--json",
        *(f"--check={name}" for name in CLI_CHECKS),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["counts"]["FAIL"] == 0
    # the handshake always runs first: the others need what it learns
    assert [r["name"] for r in report["results"]] == ["handshake", *CLI_CHECKS]
    assert all(r["status"] == "PASS" for r in report["results"]), report


def test_cli_fails_when_nothing_listens(tmp_path: Path) -> None:
    federation_file = tmp_path / "federation.toml"
    save_federation(federation_file, Federation.new("nobody"))
    [port] = free_ports(1)  # free: nothing listens there
    result = p2pfed_cli(
        "conformance",
        f"127.0.0.1:{port}",
        "--federation",
        str(federation_file),
        "--check",
        "welcome",
        "--timeout",
        "2",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  handshake" in result.stdout
    assert "cannot connect" in result.stdout
    assert "SKIP  welcome" in result.stdout
    assert "NOT CONFORMANT" in result.stdout


def test_unknown_check_name_is_a_usage_error(tmp_path: Path) -> None:
    federation_file = tmp_path / "federation.toml"
    save_federation(federation_file, Federation.new("nobody"))
    result = p2pfed_cli(
        "conformance",
        "127.0.0.1:9",
        "--federation",
        str(federation_file),
        "--check",
        "no-such-check",
    )
    assert result.returncode == 1
    assert "unknown conformance check(s) no-such-check" in result.stderr


async def serve_broken_responder(
    stream: trio.abc.Stream,
    identity: NodeIdentity,
    federation: Federation,
    *,
    sloppy: bool = False,
) -> None:
    """Correct until the channel is open; then it ignores errors and never announces.

    ``sloppy``: a milder fault instead: it announces itself, and on an error after the
    handshake it hangs up without the Close that spec/transport.md §7 recommends.
    """
    conn = ChannelConnection(
        Role.RESPONDER,
        identity=identity,
        federation_id=federation.federation_id,
        psk=federation.secret,
        max_message_size=1 << 20,
    )
    conn.start()
    swallowing = False
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            if swallowing:
                continue
            was_open = conn.is_open
            try:
                conn.receive_data(data)
            except RemoteProtocolError:
                if not was_open:  # handshake failures are handled as the spec says
                    await stream.send_all(conn.data_to_send())
                    return
                conn.data_to_send()  # the bug: drop the Close...
                if sloppy:
                    return  # ... and hang up
                swallowing = True  # ... and keep the connection as if nothing happened
                continue
            if sloppy and conn.is_open and not was_open:
                conn.send_message(NodeAnnounce(listen_port=0))
            await stream.send_all(conn.data_to_send())
    except trio.BrokenResourceError:
        return  # the kit reset the connection (after a check, on purpose or not)
    finally:
        await trio.aclose_forcefully(stream)


async def check_broken_responder(
    federation: Federation, identity: NodeIdentity, *, sloppy: bool
) -> ConformanceReport:
    """Every check but the group one, against a broken responder on a virtual network
    (the caller's test runs on the ``autojump_clock``)."""
    assert isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)

    async def handler(stream: trio.abc.Stream) -> None:
        await serve_broken_responder(stream, identity, federation, sloppy=sloppy)

    world = VirtualNetwork(rng=random.Random(0))
    for host in ("10.0.0.1", "10.0.0.2"):
        world.add_host(host)
    listener = await world.network_for("10.0.0.1").listen("10.0.0.1", 7447)
    async with trio.open_nursery() as nursery:
        world.start(nursery)
        await nursery.start(trio.serve_listeners, handler, [listener])
        options = ConformanceOptions(timeout=0.5, idle=0.5)
        checks = [c.name for c in CHECKS if c.name not in WITH_A_NODE]
        report = await run_conformance(
            "10.0.0.1",
            7447,
            federation,
            options,
            checks=checks,
            network=functools.partial(world.network_for, "10.0.0.2"),
        )
        nursery.cancel_scope.cancel()
    return report


async def test_the_kit_blames_the_right_sections_of_a_broken_node(
    autojump_clock: trio.testing.MockClock,
) -> None:
    federation = Federation.new("broken")
    identity = NodeIdentity.generate()
    report = await check_broken_responder(federation, identity, sloppy=False)

    text = report.format_text()
    by_status = {r.name: r.status for r in report.results}
    failed_sections = {r.section for r in report.results if r.status is Status.FAIL}
    assert failed_sections == {
        "transport.md §5",
        "transport.md §7",
        "encoding.md",
        "discovery.md §4.5",
    }, text
    for result in report.results:
        if result.section.startswith(("transport.md §1", "transport.md §2", "transport.md §3")):
            assert result.status is Status.PASS, text
        if result.section == "encoding.md":
            assert "neither sent a Close nor closed the connection" in result.detail, text
    assert by_status["no-common-version"] is Status.PASS, text
    assert by_status["keepalive"] is Status.PASS, text
    assert report.peer_id == identity.node_id
    assert not report.ok
    assert "NOT CONFORMANT" in text


async def test_a_missing_close_is_a_warning_not_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    federation = Federation.new("sloppy")
    report = await check_broken_responder(federation, NodeIdentity.generate(), sloppy=True)
    text = report.format_text()
    warned = {r.section for r in report.results if r.status is Status.WARN}
    assert warned == {"transport.md §5", "transport.md §7", "encoding.md"}, text
    for result in report.results:
        if result.status is Status.WARN:
            assert "without a Close message" in result.detail, text
        else:
            assert result.status is Status.PASS, text
    assert report.ok, text
