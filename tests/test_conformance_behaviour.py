"""The conformance kit's behaviour checks (issue 16, item 13): peer exchange, keepalive
sending, formation with the node as initiator, abort forwarding, the all-reduce timeout,
exclusion, the shard word size of the ring, and GroupPosition (protocol version 2).

Each check passes against the real node and FAILS against a real node with exactly that
behaviour broken (a monkeypatched method of the node started in the test). The nodes are
real :class:`p2pfed.node.Node` objects in this process; they, the kit's probes and its
reference peers talk over a simnet :class:`~simnet.network.VirtualNetwork` in trio's
virtual time (MockClock), so the checks that wait out keepalive intervals and group
timeouts take no real time, and a slow machine cannot make them miss a deadline. The same
checks run against a real node process over loopback TCP in tests/test_conformance.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import p2pfed.channel_pool
import p2pfed.group
import p2pfed.group_driver
import p2pfed.node
from p2pfed.atomicfile import atomic_write_text
from p2pfed.conformance import ConformanceOptions, ConformanceReport, Status, run_conformance
from p2pfed.federation import Federation, ProtocolParams, save_federation
from p2pfed.group import GroupCompleted, GroupConfig, GroupProtocol, Send
from p2pfed.identity import IDENTITY_FILE_NAME, NodeIdentity, save_identity
from p2pfed.messages import GroupAbort, PeerInfo, PeerList
from p2pfed.node import Node, NodeOptions
from p2pfed.peers import PeerExchangeSession
from p2pfed.round_loop import RoundLoop
from p2pfed.trio_channel import SecureChannel
from simnet.network import SimNetwork, VirtualNetwork

TASK = "support.tiny_task:task"
NEW_CHECKS = [
    "pex-answer",
    "pex-rate-limit",
    "pex-per-channel",
    "keepalive-sent",
    "group-initiated",
    "group-start",
    "abort-forwarding",
    "group-timeout",
    "exclusion",
    "group-position",
    "group-weights",
]
# the reference peers listen on every address of their own virtual host
OPTIONS = ConformanceOptions(
    timeout=3.0, group_timeout=10.0, task=TASK, keepalive_interval=0.5, listen_host="0.0.0.0"
)
NODE_HOST = "10.0.0.1"
NODE_PORT = 7447


class World:
    """The virtual network of one test: the node's host and one host per kit network."""

    def __init__(self) -> None:
        self.network = VirtualNetwork(rng=random.Random(0))
        self.network.add_host(NODE_HOST)
        self._hosts = itertools.count(2)

    def new_host(self) -> SimNetwork:
        host = f"10.0.0.{next(self._hosts)}"
        self.network.add_host(host)
        return self.network.network_for(host)


@asynccontextmanager
async def running_node(
    tmp_path: Path,
    world: World,
    *,
    bits: int = 64,
    allreduce_timeout: float = 2.0,
    samples: int = 0,
) -> AsyncIterator[tuple[int, Federation]]:
    """A real node of a fresh federation (no DP) on the world's NODE_HOST: pure averaging,
    or with ``samples``, training on that many records (its FedAvg weight)."""
    node_dir = tmp_path / "node"
    node_dir.mkdir(mode=0o700)
    federation = dataclasses.replace(
        Federation.new("behaviour"),
        params=ProtocolParams(dp_enabled=False, fixed_point_bits=bits),
    )
    save_identity(node_dir / IDENTITY_FILE_NAME, NodeIdentity.generate())
    save_federation(node_dir / "federation.toml", federation)
    atomic_write_text(
        node_dir / "config.toml",
        f'listen_host = "{NODE_HOST}"\nlisten_port = {NODE_PORT}\nmdns = false\n'
        f'keepalive_interval = 0.5\n\n[task]\nname = "{TASK}"\n'
        + (f"samples = {samples}\n" if samples else ""),
    )
    node = Node.from_directory(
        node_dir,
        network=world.network.network_for(NODE_HOST),
        options=NodeOptions(
            training=bool(samples),
            threads=False,
            group=GroupConfig(allreduce_timeout=allreduce_timeout),
        ),
    )
    async with trio.open_nursery() as nursery:
        world.network.start(nursery)
        listen_port = await nursery.start(node.run)
        try:
            yield listen_port, federation
        finally:
            nursery.cancel_scope.cancel()


async def check(tmp_path: Path, names: list[str], **node: Any) -> ConformanceReport:
    """Run the kit's checks ``names`` against a node; the caller's test must run on
    trio's MockClock (the ``autojump_clock`` fixture): every wait here is virtual."""
    assert isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
    world = World()
    async with running_node(tmp_path, world, **node) as (port, federation):
        return await run_conformance(
            NODE_HOST, port, federation, OPTIONS, checks=names, network=world.new_host
        )


@pytest.mark.parametrize("bits", [64, 32])
async def test_every_new_check_passes_against_the_real_node(
    tmp_path: Path, bits: int, autojump_clock: trio.testing.MockClock
) -> None:
    report = await check(tmp_path, NEW_CHECKS, bits=bits)
    text = report.format_text()
    statuses = {r.name: r.status for r in report.results}
    assert set(NEW_CHECKS) <= set(statuses), text
    assert all(statuses[name] is Status.PASS for name in NEW_CHECKS), text
    assert f"{bits // 8}-byte words" in text, text


async def test_a_32_bit_node_with_a_weight_over_max_weight_completes_a_secure_group(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # issue 16 item 1: 628 training records in a 32-bit ring (max_weight 256)
    report = await check(tmp_path, ["secure-group"], bits=32, samples=628)
    assert report.ok, report.format_text()


async def test_the_group_check_fails_against_a_node_that_does_not_cap_its_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(RoundLoop, "_ring_cap", lambda self, weight: int(weight))
    report = await check(tmp_path, ["secure-group"], bits=32, samples=628)
    assert not report.ok, report.format_text()
    [_, group] = report.results
    assert group.status is Status.FAIL and "no group including the node" in group.detail
    assert "weight" in group.detail, group.detail  # the reference peers abort its groups


# -- broken nodes: one behaviour each ------------------------------------------------------


def _no_pex_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PeerExchangeSession, "request_received", lambda self, now: None)


def _pex_limit_per_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    # the reference's old bug: one clock for all of a peer's channels (the kit's probes
    # are one peer), so a request on a new channel counts against the old one
    last: list[float] = []
    original = PeerExchangeSession.request_received

    def per_peer(self: PeerExchangeSession, now: float) -> None:
        self._last_received = last[-1] if last else None
        original(self, now)
        last.append(now)

    monkeypatch.setattr(PeerExchangeSession, "request_received", per_peer)


def _pex_names_requester(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(peers: Any, message: Any, requester: Any, rng: Any, host: Any) -> PeerList:
        return PeerList(peers=[PeerInfo(node_id=requester.raw, host="127.0.0.1", port=9)])

    monkeypatch.setattr(p2pfed.channel_pool, "build_peer_list", build)


def _no_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    async def silent(self: SecureChannel) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(SecureChannel, "_send_keepalive", silent)


def _abort_to_decliners(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 16 item 4: a cancelled formation also "aborts" the invitee that declined
    original = GroupProtocol._on_reply

    def on_reply(self: GroupProtocol, peer: Any, reply: Any, now: float) -> list[Any]:
        actions = original(self, peer, reply, now)
        if not reply.accept:
            actions.append(Send(peer, GroupAbort(group_id=reply.group_id, reason="cancelled")))
        return actions

    monkeypatch.setattr(GroupProtocol, "_on_reply", on_reply)


def _no_abort_forwarding(monkeypatch: pytest.MonkeyPatch) -> None:
    original = GroupProtocol._on_abort

    def on_abort(self: GroupProtocol, peer: Any, abort: Any, now: float) -> list[Any]:
        actions = original(self, peer, abort, now)
        return [a for a in actions if not isinstance(a, Send)]

    monkeypatch.setattr(GroupProtocol, "_on_abort", on_abort)


def _no_exclusion_on_joins(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 16 item 3: blamed nodes were excluded only from groups the node initiated
    original = GroupProtocol._on_invite

    def on_invite(self: GroupProtocol, peer: Any, invite: Any, now: float) -> list[Any]:
        excluded = self._excluded
        self._excluded = lambda node, at: False
        try:
            return original(self, peer, invite, now)
        finally:
            self._excluded = excluded

    monkeypatch.setattr(GroupProtocol, "_on_invite", on_invite)


def _overlapping_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    def bounds(length: int, k: int) -> list[tuple[int, int]]:
        return [(j * length // k, min(length, (j + 1) * length // k + 1)) for j in range(k)]

    monkeypatch.setattr(p2pfed.group, "shard_bounds", bounds)


def _keeps_the_whole_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    # the node keeps the group's whole weight W instead of its share (version 1 sent
    # max(1, round(W / k)), which did not conserve W either)
    class Inflated(GroupCompleted):
        def share(self, member: Any) -> int:
            return self.total_weight

    original = RoundLoop._one_group

    async def one_group(self: RoundLoop, *args: Any, **kwargs: Any) -> Any:
        outcome = await original(self, *args, **kwargs)
        if type(outcome) is GroupCompleted:
            fields = {f.name: getattr(outcome, f.name) for f in dataclasses.fields(outcome)}
            return Inflated(**fields)
        return outcome

    monkeypatch.setattr(RoundLoop, "_one_group", one_group)


def _no_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p2pfed.group_driver, "POSITION_VERSION", 3)


def _positions_on_version_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p2pfed.group_driver, "POSITION_VERSION", 1)


BROKEN: list[tuple[str, Callable[[pytest.MonkeyPatch], None], dict[str, Any], str]] = [
    ("pex-rate-limit", _no_pex_limit, {}, "answered a ModelRequest"),
    ("pex-per-channel", _pex_limit_per_peer, {}, "per channel, never per peer"),
    ("pex-answer", _pex_names_requester, {}, "names the requester"),
    ("keepalive-sent", _no_keepalive, {}, "no Keepalive"),
    ("group-initiated", _abort_to_decliners, {}, "GroupAbort to an invitee that declined"),
    ("group-start", _overlapping_shards, {}, "expected index"),
    ("abort-forwarding", _no_abort_forwarding, {}, "did not send GroupAbort to the other"),
    ("group-timeout", lambda mp: None, {"allreduce_timeout": 1e6}, "did not abort"),
    ("exclusion", _no_exclusion_on_joins, {}, "accepted an invite from a member"),
    ("group-weights", _keeps_the_whole_weight, {}, "the node contributed weight"),
    ("group-position", _no_positions, {}, "no GroupPosition"),
    ("group-position", _positions_on_version_1, {}, "channel of protocol version 1"),
]


@pytest.mark.parametrize(
    ("name", "breaks", "node", "why"),
    BROKEN,
    ids=[f"{name}:{breaks.__name__.strip('_')}" for name, breaks, _, _ in BROKEN],
)
async def test_each_check_fails_against_a_node_with_that_behaviour_broken(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    breaks: Callable[[pytest.MonkeyPatch], None],
    node: dict[str, Any],
    why: str,
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaks(monkeypatch)
    report = await check(tmp_path, [name], **node)
    [handshake, result] = report.results
    assert handshake.status is Status.PASS, report.format_text()
    assert result.name == name
    assert result.status is Status.FAIL, report.format_text()
    assert why in result.detail, result.detail
