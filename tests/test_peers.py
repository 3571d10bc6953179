"""The peer table (p2pfed.peers): bounds under a flood, eviction, exclusion, backoff, expiry,
deterministic order, and peer-exchange handling of received PeerLists."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfed.encoding import encode
from p2pfed.errors import CloseCode, DecodeError, LocalProtocolError, RemoteProtocolError
from p2pfed.identity import NodeId
from p2pfed.messages import (
    MAX_PEX_PEERS,
    PeerExchangeRequest,
    PeerInfo,
    PeerList,
    decode_message,
    encode_message,
)
from p2pfed.peers import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    PEX_MIN_INTERVAL,
    PEX_REQUEST_TOLERANCE,
    PeerExchangeSession,
    PeerSource,
    PeerTable,
    build_peer_list,
    handle_peer_list,
)

ME = NodeId(bytes(32))


def nid(i: int) -> NodeId:
    return NodeId(i.to_bytes(4, "big") + bytes([0xA5]) * 28)


def peer_list(*entries: tuple[NodeId, str, int]) -> PeerList:
    return PeerList(peers=[PeerInfo(node_id=n.raw, host=h, port=p) for n, h, p in entries])


# -- observing -----------------------------------------------------------------------------


def test_observe_new_and_updated_peers() -> None:
    table = PeerTable(ME)
    assert table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=1.0)
    assert not table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=5.0)  # nothing new
    record = table.get(nid(1))
    assert record is not None
    assert (record.first_seen, record.last_seen, record.source) == (1.0, 5.0, "mdns")
    assert table.observe(nid(1), "10.0.0.9", 7447, "mdns", now=6.0)  # moved
    assert table.get(nid(1)).address == ("10.0.0.9", 7447)  # type: ignore[union-attr]
    assert nid(1) in table and nid(2) not in table and len(table) == 1


def test_own_id_is_never_stored() -> None:
    table = PeerTable(ME)
    sources: list[PeerSource] = ["mdns", "bootstrap", "pex", "inbound"]
    for source in sources:
        assert not table.observe(ME, "10.0.0.1", 7447, source, now=0.0)
    assert len(table) == 0 and ME not in table
    with pytest.raises(LocalProtocolError, match="itself"):
        table.mark_connected(ME, now=0.0)


def test_pex_never_overrides_a_first_hand_address_nor_refreshes_it() -> None:
    table = PeerTable(ME)
    table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=0.0)
    assert not table.observe(nid(1), "203.0.113.66", 1, "pex", now=50.0)
    record = table.get(nid(1))
    assert record is not None
    assert record.address == ("10.0.0.1", 7447) and record.last_seen == 0.0
    # a second-hand peer gets first-hand confirmation: the better address wins
    table.observe(nid(2), "203.0.113.7", 7447, "pex", now=0.0)
    assert table.observe(nid(2), "10.0.0.2", 7447, "mdns", now=1.0)
    assert table.get(nid(2)).source == "mdns"  # type: ignore[union-attr]


def test_inbound_peer_without_port_gets_an_address_later() -> None:
    table = PeerTable(ME)
    assert table.observe(nid(1), "10.0.0.1", None, "inbound", now=0.0)
    table.mark_connected(nid(1), now=0.0)
    assert table.get(nid(1)).address is None  # type: ignore[union-attr]
    table.mark_disconnected(nid(1), now=1.0)
    assert table.candidates(now=2.0) == []  # nothing to dial
    assert table.observe(nid(1), None, 7447, "mdns", now=3.0)
    assert [r.address for r in table.candidates(now=3.0)] == [("10.0.0.1", 7447)]


@pytest.mark.parametrize(
    ("host", "port", "source"),
    [("", 1, "mdns"), (" 10.0.0.1", 1, "mdns"), ("10.0.0.1", 0, "mdns"),
     ("10.0.0.1", 65536, "mdns"), ("10.0.0.1", True, "mdns"), ("10.0.0.1", 1, "carrier-pigeon")],
)  # fmt: skip
def test_observe_rejects_bad_input(host: str, port: int, source: str) -> None:
    with pytest.raises(LocalProtocolError):
        PeerTable(ME).observe(nid(1), host, port, source, now=0.0)  # type: ignore[arg-type]


def test_max_peers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_peers"):
        PeerTable(ME, max_peers=0)


# -- bounds and eviction -------------------------------------------------------------------


def test_a_pex_flood_is_bounded_and_cannot_displace_first_hand_peers() -> None:
    table = PeerTable(ME, max_peers=32)
    for i in range(1, 11):
        table.observe(nid(i), f"10.0.0.{i}", 7447, "mdns", now=float(i))
    flooder = nid(999_999)
    table.mark_connected(flooder, now=0.0)
    learned = 0
    rng = random.Random(7)
    for round_ in range(200):  # 200 PeerLists of 64 fresh random ids
        msg = PeerList(
            peers=[
                PeerInfo(node_id=rng.randbytes(32), host="198.51.100.1", port=7447)
                for _ in range(MAX_PEX_PEERS)
            ]
        )
        learned += handle_peer_list(table, msg, flooder, now=100.0 + round_)
        assert len(table) <= 32 + 1  # + the connected flooder
    assert learned > 22  # the free slots did fill
    for i in range(1, 11):
        assert nid(i) in table, "a first-hand peer was displaced by PEX"
    assert flooder in table.connected()


def test_eviction_takes_the_least_recently_seen_unconnected_peer() -> None:
    table = PeerTable(ME, max_peers=3)
    table.observe(nid(1), "10.0.0.1", 1, "mdns", now=1.0)
    table.observe(nid(2), "10.0.0.2", 1, "mdns", now=2.0)
    table.observe(nid(3), "10.0.0.3", 1, "mdns", now=3.0)
    table.mark_connected(nid(1), now=4.0)  # oldest, but connected: never evicted
    assert table.observe(nid(4), "10.0.0.4", 1, "bootstrap", now=5.0)
    assert [r.node_id for r in table.records()] == [nid(1), nid(3), nid(4)]
    # first-hand arrivals evict second-hand entries before older first-hand ones
    small = PeerTable(ME, max_peers=2)
    small.observe(nid(1), "10.0.0.1", 1, "mdns", now=1.0)
    small.observe(nid(2), "10.0.0.2", 1, "pex", now=9.0)
    assert small.observe(nid(3), "10.0.0.3", 1, "mdns", now=10.0)
    assert nid(2) not in small and nid(1) in small
    # a PEX entry cannot evict a first-hand one: dropped instead
    assert not small.observe(nid(4), "10.0.0.4", 1, "pex", now=11.0)
    assert nid(4) not in small


def test_connected_peers_beyond_the_bound_are_kept() -> None:
    table = PeerTable(ME, max_peers=2)
    for i in range(1, 5):
        table.mark_connected(nid(i), now=float(i))
    assert table.connected() == [nid(1), nid(2), nid(3), nid(4)]
    assert not table.observe(nid(9), "10.0.0.9", 1, "pex", now=9.0)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 40),
            st.sampled_from(["mdns", "bootstrap", "pex", "inbound", "connect", "disconnect",
                             "fail", "remove"]),
        ),
        max_size=120,
    ),
    st.integers(1, 12),
)  # fmt: skip
def test_random_operations_keep_the_bound(ops: list[tuple[int, str]], max_peers: int) -> None:
    table = PeerTable(ME, max_peers=max_peers)
    for step, (i, op) in enumerate(ops):
        before = len(table)
        now = float(step)
        if op == "connect":
            table.mark_connected(nid(i), now)
        elif op == "disconnect":
            table.mark_disconnected(nid(i), now)
        elif op == "fail":
            table.record_failure(nid(i), now)
        elif op == "remove":
            table.remove(nid(i))
        else:
            table.observe(nid(i), f"10.0.{i}.1", 7447, op, now)  # type: ignore[arg-type]
        assert len(table) <= max(max_peers, len(table.connected()), before)
        if op != "connect":
            assert len(table) <= max(max_peers, before)
        assert [r.node_id for r in table.records()] == sorted(r.node_id for r in table.records())


# -- backoff, exclusion, expiry ------------------------------------------------------------


def test_failures_back_off_exponentially_and_success_resets() -> None:
    table = PeerTable(ME)
    table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=0.0)
    now = 0.0
    for n in range(1, 12):
        table.record_failure(nid(1), now)
        delay = min(BACKOFF_BASE * 2 ** (n - 1), BACKOFF_MAX)
        assert table.candidates(now + delay - 0.001) == []
        assert [r.node_id for r in table.candidates(now + delay)] == [nid(1)]
        now += delay
    assert table.get(nid(1)).failures == 11  # type: ignore[union-attr]
    table.mark_connected(nid(1), now)
    table.mark_disconnected(nid(1), now)
    record = table.get(nid(1))
    assert record is not None and record.failures == 0 and record.backoff_until == 0.0
    assert table.candidates(now) == [record]


def test_a_new_address_clears_the_backoff() -> None:
    table = PeerTable(ME)
    table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=0.0)
    table.record_failure(nid(1), now=0.0)
    assert table.candidates(now=1.0) == []
    table.observe(nid(1), "10.0.0.2", 7447, "mdns", now=1.0)
    assert [r.address for r in table.candidates(now=1.0)] == [("10.0.0.2", 7447)]


def test_exclusion_survives_forgetting_and_expires() -> None:
    table = PeerTable(ME)
    table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=0.0)
    table.exclude(nid(1), until=100.0)
    table.exclude(nid(1), until=50.0)  # never shortened
    assert table.get(nid(1)).excluded_until == 100.0  # type: ignore[union-attr]
    assert table.candidates(now=10.0) == [] and table.is_excluded(nid(1), now=10.0)
    assert table.remove(nid(1))  # mDNS departure ...
    table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=20.0)  # ... and return
    assert table.candidates(now=20.0) == []
    assert [r.node_id for r in table.candidates(now=100.0)] == [nid(1)]
    table.expire(now=101.0, max_age=1000.0)
    assert not table.is_excluded(nid(1), now=0.0)  # lifted for good


def test_exclusions_are_bounded() -> None:
    table = PeerTable(ME, max_peers=4)
    for i in range(1, 20):
        table.exclude(nid(i), until=float(i))
    assert [i for i in range(1, 20) if table.is_excluded(nid(i), now=0.0)] == [16, 17, 18, 19]


def test_expire_forgets_stale_unconnected_peers() -> None:
    table = PeerTable(ME)
    table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=0.0)
    table.observe(nid(2), "10.0.0.2", 7447, "mdns", now=0.0)
    table.observe(nid(3), "10.0.0.3", 7447, "mdns", now=50.0)
    table.mark_connected(nid(2), now=0.0)
    assert table.expire(now=100.0, max_age=60.0) == [nid(1)]
    assert sorted(r.node_id for r in table.records()) == [nid(2), nid(3)]
    table.mark_disconnected(nid(2), now=100.0)
    assert table.expire(now=150.0, max_age=60.0) == [nid(3)]


def test_remove_keeps_connected_peers() -> None:
    table = PeerTable(ME)
    table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=0.0)
    table.mark_connected(nid(1), now=0.0)
    assert not table.remove(nid(1)) and nid(1) in table
    assert not table.remove(nid(2))


def test_order_is_by_node_id_whatever_the_insertion_order() -> None:
    ids = [nid(i) for i in range(50)]
    orders = []
    for seed in range(3):
        shuffled = ids[:]
        random.Random(seed).shuffle(shuffled)
        table = PeerTable(ME)
        for n in shuffled:
            table.observe(n, "10.0.0.1", 7447, "mdns", now=0.0)
            table.mark_connected(n, now=0.0) if n.raw[3] % 2 else None
        orders.append(
            ([r.node_id for r in table.records()], table.connected(),
             [r.node_id for r in table.candidates(now=0.0)],
             [r.node_id for r in table.sample_for_exchange(10, random.Random(1))])
        )  # fmt: skip
    assert orders[0] == orders[1] == orders[2]
    assert orders[0][0] == sorted(ids)


# -- peer exchange -------------------------------------------------------------------------


def test_sample_for_exchange_shares_only_verified_addresses() -> None:
    table = PeerTable(ME)
    table.observe(nid(1), "10.0.0.1", 7447, "mdns", now=0.0)  # first-hand
    table.observe(nid(2), "10.0.0.2", 7447, "pex", now=0.0)  # hearsay: not repeated
    table.observe(nid(3), "10.0.0.3", 7447, "pex", now=0.0)
    table.mark_connected(nid(3), now=1.0)  # ... unless we reached it
    table.observe(nid(4), "10.0.0.4", None, "inbound", now=0.0)  # no port: nothing to share
    table.observe(nid(5), "10.0.0.5", 7447, "bootstrap", now=0.0)
    table.record_failure(nid(5), now=1.0)  # last attempt failed
    table.observe(nid(6), "10.0.0.6", 7447, "mdns", now=0.0)
    table.exclude(nid(6), until=1e9)
    rng = random.Random(0)
    assert [r.node_id for r in table.sample_for_exchange(64, rng)] == [nid(1), nid(3)]
    assert [r.node_id for r in table.sample_for_exchange(64, rng, exclude=[nid(1)])] == [nid(3)]
    for i in range(10, 40):
        table.observe(nid(i), f"10.0.1.{i}", 7447, "mdns", now=0.0)
    first = table.sample_for_exchange(5, random.Random(42))
    assert len(first) == 5 and first == sorted(first, key=lambda r: r.node_id)
    assert first == table.sample_for_exchange(5, random.Random(42))  # rng decides, nothing else


def test_build_peer_list_round_trip_into_another_table() -> None:
    a, b = nid(100), nid(200)
    table_a = PeerTable(a)
    table_a.observe(nid(1), "192.168.1.1", 7447, "mdns", now=0.0)
    table_a.observe(nid(2), "fd00::2", 7448, "mdns", now=0.0)
    table_a.observe(nid(3), "seed.example.org", 7447, "bootstrap", now=0.0)  # a host name
    table_a.observe(b, "192.168.1.200", 7447, "mdns", now=0.0)  # the asker itself
    table_a.observe(nid(4), "127.0.0.1", 7449, "mdns", now=0.0)  # loopback
    request = PeerExchangeRequest(max_peers=64)
    answer = build_peer_list(table_a, request, b, random.Random(0), requester_host="192.168.1.200")
    assert [NodeId(p.node_id) for p in answer.peers] == [nid(1), nid(2)]
    on_loopback = build_peer_list(table_a, request, b, random.Random(0), requester_host="127.0.0.1")
    assert nid(4) in [NodeId(p.node_id) for p in on_loopback.peers]
    received = decode_message(encode_message(answer))
    assert isinstance(received, PeerList)
    table_b = PeerTable(b)
    assert handle_peer_list(table_b, received, a, now=5.0) == 2
    assert handle_peer_list(table_b, received, a, now=6.0) == 0  # nothing new
    assert [(r.node_id, r.address, r.source) for r in table_b.records()] == [
        (nid(1), ("192.168.1.1", 7447), "pex"),
        (nid(2), ("fd00::2", 7448), "pex"),
    ]
    small = build_peer_list(table_a, PeerExchangeRequest(max_peers=1), b, random.Random(0))
    assert len(small.peers) == 1


def test_handle_peer_list_drops_own_id_and_the_sender() -> None:
    sender = nid(7)
    table = PeerTable(ME)
    msg = peer_list((ME, "10.0.0.1", 7447), (sender, "10.0.0.7", 7447), (nid(1), "10.0.0.2", 1))
    assert handle_peer_list(table, msg, sender, now=0.0) == 1
    assert [r.node_id for r in table.records()] == [nid(1)]


@pytest.mark.parametrize(
    ("peers", "problem"),
    [
        ([{1: nid(1).raw, 2: "10.0.0.1", 3: 1}] * 2, "repeated node_id"),
        ([{1: nid(1).raw, 2: "evil.example", 3: 1}], "not an IP address literal"),
        ([{1: nid(1).raw, 2: "10.0.0.1:80", 3: 1}], "not an IP address literal"),
        ([{1: nid(1).raw, 2: "0.0.0.0", 3: 1}], "unspecified or multicast"),
        ([{1: nid(1).raw, 2: "ff02::1", 3: 1}], "unspecified or multicast"),
        ([{1: nid(1).raw, 2: "fe80::1%eth0", 3: 1}], "zone"),
        ([{1: nid(1).raw, 2: "10.0.0.1", 3: 0}], "port"),
        ([{1: nid(1).raw[:31], 2: "10.0.0.1", 3: 1}], "node_id"),
        ([{1: nid(1).raw, 2: "10.0.0.1", 3: 1, 4: "x"}], "unknown key 4"),
        ([{1: nid(i).raw, 2: "10.0.0.1", 3: 1} for i in range(65)], "65 items"),
        ([[nid(1).raw, "10.0.0.1", 1]], "expected a CBOR map"),
    ],
)
def test_junk_peer_lists_are_malformed(peers: list[object], problem: str) -> None:
    with pytest.raises(DecodeError, match=problem) as info:
        decode_message(encode({0: 18, 1: peers}))
    assert info.value.code == CloseCode.MALFORMED_MESSAGE


def test_pex_session_rate_limits_and_matches_answers() -> None:
    asker, answerer = PeerExchangeSession(max_peers=2), PeerExchangeSession()
    assert asker.may_request(now=0.0)
    request = asker.make_request(now=0.0)
    assert request.max_peers == 2
    assert not asker.may_request(now=PEX_MIN_INTERVAL)  # unanswered
    answerer.request_received(now=0.0)
    with pytest.raises(LocalProtocolError):
        asker.make_request(now=1.0)
    with pytest.raises(RemoteProtocolError) as too_many:
        asker.list_received(peer_list(*[(nid(i), "10.0.0.1", 1) for i in range(3)]))
    assert too_many.value.code == CloseCode.PROTOCOL_ERROR
    asker.list_received(peer_list((nid(1), "10.0.0.1", 1)))
    with pytest.raises(RemoteProtocolError) as unsolicited:
        asker.list_received(peer_list())
    assert unsolicited.value.code == CloseCode.UNEXPECTED_MESSAGE
    assert not asker.may_request(now=PEX_MIN_INTERVAL - 1)
    assert asker.may_request(now=PEX_MIN_INTERVAL)
    # the answerer tolerates jitter, but not a peer asking twice within the tolerance
    answerer.request_received(now=PEX_REQUEST_TOLERANCE)
    with pytest.raises(RemoteProtocolError) as flood:
        answerer.request_received(now=PEX_REQUEST_TOLERANCE + 1)
    assert flood.value.code == CloseCode.PROTOCOL_ERROR
    with pytest.raises(ValueError):
        PeerExchangeSession(max_peers=65)
