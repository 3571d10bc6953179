"""mDNS / DNS-SD discovery (p2pfed.discovery): the TXT record rules without a network, then
real zeroconf traffic on 127.0.0.1, in this process and between separate processes.

Every network wait is bounded (fail_after), so a broken multicast setup fails the test
instead of hanging CI. Each test uses fresh random federation tags and node ids, so
other test runs on the same machine (which share loopback multicast) are ignored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from zeroconf import ServiceInfo, Zeroconf

from p2pfed.discovery import (
    SERVICE_TYPE,
    AnnouncementIgnored,
    DiscoveryEvent,
    IgnoreReason,
    MdnsDiscovery,
    PeerDeparted,
    PeerDiscovered,
    choose_host,
    classify_announcement,
    instance_name,
    local_addresses,
    parse_txt,
    txt_record,
)
from p2pfed.identity import NodeId, NodeIdentity

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ["127.0.0.1"]
WAIT = 20.0  # seconds: mDNS probing takes about 2 s, resolving well under 1 s on loopback


def fresh_id() -> NodeId:
    return NodeIdentity.generate().node_id


def fresh_tag() -> str:
    return os.urandom(8).hex()


def txt_bytes(pairs: list[bytes]) -> bytes:
    return b"".join(bytes([len(p)]) + p for p in pairs)


def announcement(node_id: NodeId, tag: str, **override: bytes | None) -> bytes:
    fields: dict[str, bytes | None] = {k: v.encode() for k, v in txt_record(node_id, tag).items()}
    fields.update(override)
    return txt_bytes([k.encode() + (b"" if v is None else b"=" + v) for k, v in fields.items()])


# -- the pure part -------------------------------------------------------------------------


def test_txt_record_is_small_and_exact() -> None:
    node_id, tag = fresh_id(), fresh_tag()
    txt = txt_record(node_id, tag)
    assert txt == {"v": "1,2", "fed": tag, "id": str(node_id)}
    assert all(len(k) <= 9 for k in txt)
    wire = txt_bytes([f"{k}={v}".encode() for k, v in txt.items()])
    assert len(wire) < 200
    assert parse_txt(wire) == {k: v.encode() for k, v in txt.items()}
    for bad in ("", "0123456789ABCDEF", "0123456789abcde", "x" * 16):
        with pytest.raises(ValueError, match="16 lowercase hex"):
            txt_record(node_id, bad)


def test_txt_wire_bytes_match_the_spec_example() -> None:
    # spec/discovery.md, section 1.2: node id of 32 zero bytes, federation id of 16 zero
    # bytes (tag from spec/identity.md, section 4.1)
    node_id, tag = NodeId(bytes(32)), "11f7d077f4e91d08"
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{instance_name(node_id)}.{SERVICE_TYPE}",
        port=7447,
        properties=txt_record(node_id, tag),
        parsed_addresses=LOOPBACK,
    )
    expected = bytes.fromhex(
        "05763d312c32146665643d31316637643037376634653931643038" + "37" + "69643d"
    )
    assert info.text == expected + b"a" * 52
    assert len(info.text) == 83


def test_instance_name_is_a_short_dns_label() -> None:
    node_id = fresh_id()
    assert instance_name(node_id) == node_id.short
    assert len(instance_name(node_id).encode()) <= 63


def test_parse_txt_follows_rfc_6763() -> None:
    assert parse_txt(b"") == {}
    assert parse_txt(b"\x00") == {}  # an empty TXT record is one empty string
    data = txt_bytes([b"V=1", b"v=2", b"flag", b"empty=", b"=nokey", b"fed=a=b"])
    assert parse_txt(data) == {"v": b"1", "flag": None, "empty": b"", "fed": b"a=b"}
    assert parse_txt(txt_bytes([b"v=1"]) + b"\x09id=ab") == {"v": b"1"}  # truncated
    assert parse_txt(txt_bytes([b"\xff=1", b"v=1"])) == {"v": b"1"}


def test_choose_host_prefers_routable_ipv4() -> None:
    assert choose_host(["fd00::7", "192.168.1.7"]) == "192.168.1.7"
    assert choose_host(["::1", "fd00::7", "127.0.0.1"]) == "fd00::7"
    assert choose_host(["::1", "127.0.0.1"]) == "::1"
    assert choose_host(["fe80::1", "0.0.0.0", "224.0.0.251", "junk"]) is None
    assert choose_host([]) is None


def test_classify_accepts_our_federation() -> None:
    me, peer, tag = fresh_id(), fresh_id(), fresh_tag()
    event = classify_announcement("x", announcement(peer, tag), ["10.0.0.7"], 7447, me, tag)
    assert event == PeerDiscovered(peer, "10.0.0.7", 7447, "x")
    # unknown keys are ignored, a list of versions including ours is accepted
    txt = announcement(peer, tag, v=b"1,2", extra=b"later")
    assert isinstance(classify_announcement("x", txt, ["10.0.0.7"], 1, me, tag), PeerDiscovered)


@pytest.mark.parametrize(
    ("override", "addresses", "port", "reason"),
    [
        ({"fed": b"0000000000000000"}, ["10.0.0.7"], 7447, IgnoreReason.OTHER_FEDERATION),
        ({"v": b"3"}, ["10.0.0.7"], 7447, IgnoreReason.UNSUPPORTED_VERSION),
        ({"v": b"3,4"}, ["10.0.0.7"], 7447, IgnoreReason.UNSUPPORTED_VERSION),
        ({"v": None}, ["10.0.0.7"], 7447, IgnoreReason.MALFORMED),
        ({"v": b"01"}, ["10.0.0.7"], 7447, IgnoreReason.MALFORMED),
        ({"v": b"1,"}, ["10.0.0.7"], 7447, IgnoreReason.MALFORMED),
        ({"fed": b"0123456789ABCDEF"}, ["10.0.0.7"], 7447, IgnoreReason.MALFORMED),
        ({"fed": None}, ["10.0.0.7"], 7447, IgnoreReason.MALFORMED),
        ({"id": b"abc"}, ["10.0.0.7"], 7447, IgnoreReason.MALFORMED),
        ({"id": None}, ["10.0.0.7"], 7447, IgnoreReason.MALFORMED),
        ({}, ["10.0.0.7"], 0, IgnoreReason.MALFORMED),
        ({}, ["fe80::1"], 7447, IgnoreReason.NO_ADDRESS),
        ({}, [], 7447, IgnoreReason.NO_ADDRESS),
    ],
)
def test_classify_ignores(
    override: dict[str, bytes | None], addresses: list[str], port: int, reason: str
) -> None:
    me, peer, tag = fresh_id(), fresh_id(), fresh_tag()
    event = classify_announcement(
        "x", announcement(peer, tag, **override), addresses, port, me, tag
    )
    assert isinstance(event, AnnouncementIgnored)
    assert event.reason == reason, event


def test_classify_ignores_own_and_non_canonical_ids() -> None:
    me, tag = fresh_id(), fresh_tag()
    own = classify_announcement("x", announcement(me, tag), ["10.0.0.7"], 1, me, tag)
    assert own == AnnouncementIgnored("x", IgnoreReason.OWN)
    upper = announcement(fresh_id(), tag, id=str(fresh_id()).upper().encode())
    event = classify_announcement("x", upper, ["10.0.0.7"], 1, me, tag)
    assert isinstance(event, AnnouncementIgnored) and event.reason == IgnoreReason.MALFORMED


def test_local_addresses() -> None:
    assert local_addresses(["127.0.0.1"]) == ["127.0.0.1"]
    found = local_addresses()
    assert found, "this machine has at least a loopback address"
    with pytest.raises(ValueError):
        local_addresses(["eth0"])


def test_discovery_rejects_bad_arguments() -> None:
    me, tag = fresh_id(), fresh_tag()
    with pytest.raises(ValueError, match="port"):
        MdnsDiscovery(me, tag, 0, LOOPBACK, LOOPBACK)
    with pytest.raises(ValueError, match="tag"):
        MdnsDiscovery(me, "nope", 7447, LOOPBACK, LOOPBACK)
    with pytest.raises(ValueError):
        MdnsDiscovery(me, tag, 7447, ["not-an-ip"], LOOPBACK)


# -- real mDNS, in this process ------------------------------------------------------------


async def wait_for(
    events: trio.MemoryReceiveChannel[DiscoveryEvent],
    predicate: Callable[[DiscoveryEvent], bool],
    seen: list[DiscoveryEvent],
) -> DiscoveryEvent:
    """The first event matching ``predicate`` (every event read is appended to ``seen``)."""
    with trio.fail_after(WAIT):
        async for event in events:
            seen.append(event)
            if predicate(event):
                return event
    raise AssertionError("event channel closed")


@pytest.mark.multicast
async def test_own_announcement_is_ignored() -> None:
    me, tag = fresh_id(), fresh_tag()
    discovery = MdnsDiscovery(me, tag, 7447, LOOPBACK, LOOPBACK, report_ignored=True)
    seen: list[DiscoveryEvent] = []
    async with discovery as events:
        assert discovery.instance is not None
        assert discovery.instance.startswith(me.short)
        own = await wait_for(
            events,
            lambda e: isinstance(e, AnnouncementIgnored) and e.instance == discovery.instance,
            seen,
        )
        assert isinstance(own, AnnouncementIgnored) and own.reason == IgnoreReason.OWN
    assert not any(isinstance(e, PeerDiscovered) and e.node_id == me for e in seen)


def _register_raw(zc: Zeroconf, label: str, txt: dict[str, str | None], port: int) -> ServiceInfo:
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=port,
        properties=txt,
        server=f"{label}.local.",
        parsed_addresses=LOOPBACK,
    )
    zc.register_service(info)
    return info


@pytest.mark.multicast
async def test_foreign_announcements_on_the_wire_are_ignored_and_peers_found() -> None:
    me, peer, tag = fresh_id(), fresh_id(), fresh_tag()
    suffix = os.urandom(3).hex()
    # label -> (TXT, expected reason), announced by plain zeroconf
    bad: dict[str, tuple[dict[str, str | None], str]] = {
        f"t-other-fed-{suffix}": ({"v": "1", "fed": fresh_tag(), "id": str(fresh_id())},
                                  IgnoreReason.OTHER_FEDERATION),
        f"t-version-{suffix}": ({"v": "7", "fed": tag, "id": str(fresh_id())},
                                IgnoreReason.UNSUPPORTED_VERSION),
        f"t-bad-id-{suffix}": ({"v": "1", "fed": tag, "id": "not-a-node-id"},
                               IgnoreReason.MALFORMED),
        f"t-no-fed-{suffix}": ({"v": "1", "id": str(fresh_id())}, IgnoreReason.MALFORMED),
    }  # fmt: skip
    good = f"t-good-{suffix}"
    zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=LOOPBACK))
    try:
        services: dict[str, tuple[dict[str, str | None], int]] = {
            label: (txt, 9000) for label, (txt, _) in bad.items()
        }
        services[good] = (dict(txt_record(peer, tag)), 9001)
        infos: dict[str, ServiceInfo] = {}

        async def register(label: str) -> None:  # in parallel: probing takes ~2 s each
            txt, port = services[label]
            infos[label] = await trio.to_thread.run_sync(_register_raw, zc, label, txt, port)

        async with trio.open_nursery() as nursery:
            for label in services:
                nursery.start_soon(register, label)
        discovery = MdnsDiscovery(me, tag, 7447, LOOPBACK, LOOPBACK, report_ignored=True)
        seen: list[DiscoveryEvent] = []
        async with discovery as events:
            pending = {f"{label}.{SERVICE_TYPE}": reason for label, (_, reason) in bad.items()}
            pending[f"{good}.{SERVICE_TYPE}"] = "discovered"
            with trio.fail_after(WAIT):
                async for event in events:
                    seen.append(event)
                    name = getattr(event, "instance", "")
                    if isinstance(event, AnnouncementIgnored) and name in pending:
                        assert event.reason == pending.pop(name), event
                    elif isinstance(event, PeerDiscovered) and name in pending:
                        assert event == PeerDiscovered(peer, "127.0.0.1", 9001, name)
                        del pending[name]
                    if not pending:
                        break
            assert not any(
                isinstance(e, PeerDiscovered) and e.instance != f"{good}.{SERVICE_TYPE}"
                and e.instance.startswith("t-") and e.instance.endswith(f"{suffix}.{SERVICE_TYPE}")
                for e in seen
            )  # fmt: skip
            # withdrawing the good service is a departure
            await trio.to_thread.run_sync(zc.unregister_service, infos[good])
            gone = await wait_for(events, lambda e: isinstance(e, PeerDeparted), seen)
            assert gone == PeerDeparted(peer, f"{good}.{SERVICE_TYPE}")
    finally:
        await trio.to_thread.run_sync(zc.close)


@pytest.mark.multicast
async def test_run_in_a_nursery() -> None:
    a, b, tag = fresh_id(), fresh_id(), fresh_tag()
    send, receive = trio.open_memory_channel[DiscoveryEvent](16)
    async with trio.open_nursery() as nursery:
        await nursery.start(MdnsDiscovery(a, tag, 1111, LOOPBACK, LOOPBACK).run, send)
        async with MdnsDiscovery(b, tag, 2222, LOOPBACK, LOOPBACK):
            found = await wait_for(
                receive, lambda e: isinstance(e, PeerDiscovered) and e.node_id == b, []
            )
            assert isinstance(found, PeerDiscovered)
            assert found == PeerDiscovered(b, "127.0.0.1", 2222, found.instance)
        nursery.cancel_scope.cancel()
    with pytest.raises(trio.EndOfChannel):
        while True:  # run() closed its channel on the way out
            receive.receive_nowait()


# -- real mDNS, between separate processes -------------------------------------------------

PEER_SCRIPT = r"""
import json, sys, trio
from p2pfed.discovery import AnnouncementIgnored, MdnsDiscovery, PeerDeparted, PeerDiscovered
from p2pfed.identity import NodeId

node_id, tag, port = NodeId.parse(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def emit(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    discovery = MdnsDiscovery(node_id, tag, port, ["127.0.0.1"], ["127.0.0.1"],
                              report_ignored=True)
    async with discovery as events, trio.open_nursery() as nursery:
        emit(kind="ready", instance=discovery.instance)

        async def stop_on_stdin_eof():
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_stdin_eof)
        async for event in events:
            if isinstance(event, PeerDiscovered):
                emit(kind="discovered", id=str(event.node_id), host=event.host,
                     port=event.port, instance=event.instance)
            elif isinstance(event, PeerDeparted):
                emit(kind="departed", id=str(event.node_id), instance=event.instance)
            elif isinstance(event, AnnouncementIgnored):
                emit(kind="ignored", instance=event.instance, reason=event.reason)
    emit(kind="stopped")

trio.run(main)
"""


class PeerProcess:
    """One node's discovery in a child process, speaking JSON lines on stdout."""

    def __init__(self, process: trio.Process, node_id: NodeId, port: int) -> None:
        self.process = process
        self.node_id = node_id
        self.port = port
        self.events: list[dict[str, object]] = []
        self.instance = ""
        self._buffer = b""

    @classmethod
    async def start(cls, node_id: NodeId, tag: str, port: int) -> PeerProcess:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", PEER_SCRIPT, str(node_id), tag, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return cls(process, node_id, port)

    async def next_event(self) -> dict[str, object]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"peer process exited ({self.process.returncode})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        event = json.loads(line)
        self.events.append(event)
        if event["kind"] == "ready":
            self.instance = str(event["instance"])
        return event

    async def until(self, predicate: Callable[[dict[str, object]], bool]) -> dict[str, object]:
        for event in self.events:
            if predicate(event):
                return event
        with trio.fail_after(WAIT):
            while True:
                event = await self.next_event()
                if predicate(event):
                    return event

    async def stop(self) -> None:
        """Close stdin: the child unregisters (goodbye packets) and exits."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        await self.until(lambda e: e["kind"] == "stopped")
        with trio.fail_after(WAIT):
            assert await self.process.wait() == 0


def discovered(peer: PeerProcess) -> Callable[[dict[str, object]], bool]:
    return lambda e: e["kind"] == "discovered" and e["id"] == str(peer.node_id)


@pytest.mark.multicast
async def test_separate_processes_find_each_other_ignore_strangers_and_see_departures() -> None:
    tag, other_tag = fresh_tag(), fresh_tag()
    peers: list[PeerProcess] = []
    try:
        a = await PeerProcess.start(fresh_id(), tag, 40001)
        peers.append(a)
        b = await PeerProcess.start(fresh_id(), tag, 40002)
        peers.append(b)
        stranger = await PeerProcess.start(fresh_id(), other_tag, 40003)
        peers.append(stranger)
        for peer in peers:
            await peer.until(lambda e: e["kind"] == "ready")

        # A and B discover each other, with the right node id and port
        found_b = await a.until(discovered(b))
        found_a = await b.until(discovered(a))
        assert (found_b["host"], found_b["port"]) == ("127.0.0.1", 40002)
        assert (found_a["host"], found_a["port"]) == ("127.0.0.1", 40001)

        # the stranger's announcement reaches everyone, and is ignored as another federation
        def ignored(instance: str) -> Callable[[dict[str, object]], bool]:
            return lambda e: e["kind"] == "ignored" and e["instance"] == instance

        for peer in (a, b):
            event = await peer.until(ignored(stranger.instance))
            assert event["reason"] == IgnoreReason.OTHER_FEDERATION
        for peer in (a, b):
            event = await stranger.until(ignored(peer.instance))
            assert event["reason"] == IgnoreReason.OTHER_FEDERATION

        # B leaves: A notices the departure
        await b.stop()
        peers.remove(b)
        departed = await a.until(lambda e: e["kind"] == "departed" and e["id"] == str(b.node_id))
        assert departed["instance"] == b.instance

        for peer in (a, stranger):
            await peer.stop()
        peers.clear()
        all_events = a.events + b.events + stranger.events
        assert not [e for e in all_events if discovered(stranger)(e)]
        assert not [e for e in stranger.events if e["kind"] == "discovered"]
    finally:
        for peer in peers:
            if peer.process.returncode is None:
                peer.process.kill()
            with trio.move_on_after(5):
                await peer.process.wait()
