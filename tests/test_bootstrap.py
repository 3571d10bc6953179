"""Bootstrap addresses that fail: the backoff of spec/discovery.md, the warnings an operator
sees (one per backoff step), and the bootstrap section of ``p2pfed status``.

The node tests run a real :class:`~p2pfed.node.Node` on simnet's virtual network under
trio's MockClock, so twenty minutes of redialing take well under a second.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import trio
import trio.testing
from support.tiny_task import TinyTask

from p2pfed.config import NodeConfig
from p2pfed.daemon import bootstrap_status
from p2pfed.federation import Federation
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.node import Node, NodeOptions
from p2pfed.peers import BACKOFF_MAX, BootstrapDialer, backoff_delay
from p2pfed.status import StatusWriter, format_status, read_status
from simnet.network import SimNetwork, VirtualNetwork

SCHEDULE = [5, 10, 20, 40, 80, 160, 320, 600, 600, 600]
"""spec/discovery.md section 5: after the n-th failure, min(5 * 2^(n-1), 600) seconds."""
ADDRESS = ("10.0.0.2", 7447)
WALL = 1_795_000_000.0  # 2026-11-18T11:06:40Z


def nid(n: int) -> NodeId:
    return NodeId(bytes([n]) * 32)


# --- the schedule and the dialer (sans-IO) ---------------------------------------------


def test_backoff_schedule_follows_the_spec() -> None:
    assert [backoff_delay(n) for n in range(1, 11)] == SCHEDULE
    assert backoff_delay(10_000) == BACKOFF_MAX  # no overflow after weeks of failures
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="integer >= 1"):
            backoff_delay(bad)  # type: ignore[arg-type]


def test_dialer_backs_off_per_address_and_counts_each_attempt_once() -> None:
    dialer = BootstrapDialer([ADDRESS, ("seed.example", 1), ADDRESS])  # repeated: once
    assert [e.label for e in dialer.entries()] == ["10.0.0.2:7447", "seed.example:1"]
    entry = dialer.get(ADDRESS)
    assert entry is not None and entry.state == "not connected"
    now = 0.0
    for step, delay in enumerate(SCHEDULE, start=1):
        assert entry in dialer.due(now)
        dialer.attempt_started(ADDRESS, now)
        assert entry not in dialer.due(now) and entry.dialling
        now += 0.5  # the attempt takes a while
        assert dialer.attempt_failed(ADDRESS, now, "refused") == delay
        # a second report of the same attempt is neither counted nor to be logged
        assert dialer.attempt_failed(ADDRESS, now, "refused") is None
        assert (entry.failures, entry.failing_since, entry.state) == (step, 0.5, "failing")
        assert entry.next_attempt == now + delay
        assert entry not in dialer.due(now + delay - 0.01)
        assert dialer.next_attempt_at(now) == now + delay
        now += delay
    # success resets the count; once the channel is gone it is redialed at once
    dialer.attempt_started(ADDRESS, now)
    assert dialer.attempt_succeeded(ADDRESS, nid(2), now) == len(SCHEDULE)
    assert (entry.failures, entry.failing_since, entry.state) == (0, None, "connected")
    dialer.update_connected(peers=set(), addresses=set())
    assert entry.state == "not connected" and entry in dialer.due(now)
    dialer.attempt_started(ADDRESS, now)
    assert dialer.attempt_failed(ADDRESS, now, "refused") == SCHEDULE[0]


def test_dialer_sees_a_bootstrap_node_connected_by_id_or_address() -> None:
    dialer = BootstrapDialer([ADDRESS])
    [entry] = dialer.entries()
    dialer.attempt_started(ADDRESS, 0.0)
    dialer.attempt_failed(ADDRESS, 0.0, "refused")
    # the bootstrap node connected to us first, from the address we dial
    dialer.update_connected(peers={nid(2)}, addresses={ADDRESS})
    assert entry.state == "connected" and entry.failures == 0  # an open channel resets
    assert dialer.due(1000.0) == []
    dialer.attempt_started(ADDRESS, 10.0)
    dialer.attempt_succeeded(ADDRESS, nid(2), 10.0)
    # it moved to another port: still connected to the node reached there
    dialer.update_connected(peers={nid(2)}, addresses=set())
    assert entry.state == "connected"


# --- a node on a virtual network ------------------------------------------------------


class CountingNetwork(SimNetwork):
    """A host of the virtual network that records when it dials ``ADDRESS``."""

    def __init__(self, world: VirtualNetwork, host: str) -> None:
        super().__init__(world, host)
        self.dials: list[float] = []

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        if (host, port) == ADDRESS:
            self.dials.append(trio.current_time())
        return await super().connect(host, port)


def _sim_node(
    tmp_path: Path, name: str, network: SimNetwork, federation: Federation, bootstrap: tuple
) -> Node:
    node_dir = tmp_path / name
    node_dir.mkdir()
    return Node(
        identity=NodeIdentity.generate(),
        federation=federation,
        config=NodeConfig(
            listen_host=network.host, listen_port=ADDRESS[1], mdns=False, bootstrap=bootstrap
        ),
        node_dir=node_dir,
        network=network,
        task=TinyTask(),
        options=NodeOptions(training=False, threads=False, task_config={"init": 1}),
        rng=random.Random(1),
    )


def _warnings(caplog: pytest.LogCaptureFixture) -> list[tuple[float, str]]:
    return [
        (record.__dict__["virtual_time"], record.getMessage())
        for record in caplog.records
        if record.levelno == logging.WARNING and "bootstrap" in record.getMessage()
    ]


class _VirtualTime(logging.Filter):
    """Stamps each record with trio's (virtual) time, to compare warnings with dials."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.virtual_time = trio.current_time()
        return True


async def test_node_redials_a_failing_bootstrap_with_backoff_and_warns_once_per_step(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="p2pfed")
    stamp = _VirtualTime()
    caplog.handler.addFilter(stamp)
    world = VirtualNetwork(rng=random.Random(1))
    for host in ("10.0.0.1", ADDRESS[0]):
        world.add_host(host)
    network = CountingNetwork(world, "10.0.0.1")
    federation = Federation.new("bootstrap-test")
    node = _sim_node(tmp_path, "a", network, federation, ("10.0.0.2:7447",))
    rtt = world.default_link.rtt  # a refused connect takes one round trip
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            start = trio.current_time()
            # nothing listens at 10.0.0.2:7447 yet: every dial is refused
            await trio.sleep(sum(SCHEDULE[:9]) + 1)
            gaps = [b - a for a, b in zip(network.dials, network.dials[1:], strict=False)]
            assert gaps == pytest.approx([rtt + d for d in SCHEDULE[:9]], abs=1e-6)
            assert network.dials[0] - start < 1
            warnings = _warnings(caplog)
            # one warning per failed attempt, when it failed, with the wait that follows
            assert [t for t, _ in warnings] == pytest.approx(
                [t + rtt for t in network.dials], abs=1e-6
            )
            for (_, message), delay in zip(warnings, SCHEDULE, strict=False):
                assert message == (
                    "bootstrap 10.0.0.2:7447 unreachable: connection to 10.0.0.2:7447 "
                    f"refused; next attempt in {delay} s"
                )
            [row] = node.bootstrap_summary()
            assert row["state"] == "failing" and row["failed_attempts"] == len(network.dials)
            assert row["failing_since"] == pytest.approx(network.dials[0] + rtt)
            assert row["next_attempt"] == pytest.approx(network.dials[-1] + rtt + 600)
            assert "refused" in row["error"]

            # the bootstrap node comes up: the next attempt (not an earlier one) reaches it
            other = _sim_node(tmp_path, "b", world.network_for(ADDRESS[0]), federation, ())
            await nursery.start(other.run)
            dials = len(network.dials)
            await trio.sleep(row["next_attempt"] - trio.current_time() + 1)
            assert len(network.dials) == dials + 1
            [row] = node.bootstrap_summary()
            assert row["state"] == "connected" and row["id"] == other.node_id.short
            assert (row["failed_attempts"], row["failing_since"], row["error"]) == (0, None, None)
            assert any("reachable again" in r.getMessage() for r in caplog.records)

            # it goes away again: redialed at once, and the backoff starts over at 5 s
            caplog.clear()
            other.request_stop()
            await other.finished.wait()
            await trio.sleep(10)
            assert [m for _, m in _warnings(caplog)][:1] == [
                "bootstrap 10.0.0.2:7447 unreachable: connection to 10.0.0.2:7447 refused; "
                "next attempt in 5 s"
            ]
            node.request_stop()
    finally:
        caplog.handler.removeFilter(stamp)


async def test_status_shows_a_failing_bootstrap_address(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    world = VirtualNetwork(rng=random.Random(1))
    world.add_host("10.0.0.1")
    network = CountingNetwork(world, "10.0.0.1")
    # 10.0.0.2 does not exist: attempts time out after the virtual connect timeout (5 s)
    node = _sim_node(tmp_path, "a", network, Federation.new("status"), ("10.0.0.2:7447",))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        start = trio.current_time()
        await trio.sleep(31)  # attempts at 0, 10 and 25 s fail at 5, 15 and 30 s
        assert [t - start for t in network.dials] == [0, 10, 25]
        now = trio.current_time()
        offset = WALL + 0.5 - now  # this moment is half a second after WALL
        status = StatusWriter(tmp_path, node_id=str(node.node_id), wall_clock=lambda: WALL)
        status.update(now, state="running", bootstrap=bootstrap_status(node, offset))
        node.request_stop()
    doc = read_status(tmp_path)
    [entry] = doc["bootstrap"]
    assert entry == {
        "address": "10.0.0.2:7447",
        "state": "failing",
        "id": None,
        "failed_attempts": 3,
        "failing_since": "2026-11-18T11:06:14Z",  # 26 s ago: the first attempt timed out
        "next_attempt": "2026-11-18T11:06:59Z",  # in 19 s: 20 s after the third failure
        "error": entry["error"],
    }
    assert "timed out" in entry["error"]
    text = format_status(doc, alive=True, now=WALL)
    assert "bootstrap: 0 of 1 connected" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["ADDRESS", "STATE"])
    assert lines[header + 1].split()[:9] == [
        "10.0.0.2:7447",
        "failing",
        "-",
        "3",
        "26",
        "s",
        "ago",
        "in",
        "19",
    ]
    json.dumps(doc)  # still plain JSON
