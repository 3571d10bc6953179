"""The peer table: every peer a node knows of, how it learned of it, and whether to dial it;
and the peer-exchange (PEX) rules that feed it. Normative text: spec/discovery.md.

Rules of this file:

* Sans-IO. Nothing here reads a clock, opens a socket or draws global randomness: every
  method takes ``now`` (seconds, any monotonic origin) and randomness comes in as a
  ``random.Random``. The node owns time; simnet replays runs.
* Deterministic. Every list returned is sorted by node id bytes (bootstrap entries: in
  configuration order); no result depends on dict insertion order or set hashing.
* Bounded. The table holds at most ``max_peers`` peers (more only while more than that
  are connected: an open channel is never forgotten).
  An address learned second-hand (``"pex"``) can only displace another second-hand entry,
  so however many PeerLists a peer sends, it cannot push out the peers this node found
  itself (mDNS, bootstrap, inbound connections).
* An address is only a candidate. Whoever answers at it must prove the node id in the
  Noise handshake; the table records what was claimed, the node decides what to trust.

Example::

    >>> from p2pfed.identity import NodeId
    >>> me, peer = NodeId(bytes(32)), NodeId(bytes([1]) * 32)
    >>> table = PeerTable(me)
    >>> table.observe(peer, "192.168.1.7", 7447, "mdns", now=0.0)
    True
    >>> table.observe(me, "192.168.1.5", 7447, "mdns", now=0.0)  # never ourselves
    False
    >>> [r.node_id for r in table.candidates(now=1.0)] == [peer]
    True
    >>> table.record_failure(peer, now=1.0)
    >>> table.candidates(now=2.0)  # backing off
    []
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import operator
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final, Literal, get_args

from p2pfed.errors import CloseCode, LocalProtocolError, RemoteProtocolError
from p2pfed.identity import NodeId
from p2pfed.messages import MAX_PEX_PEERS, PeerExchangeRequest, PeerInfo, PeerList

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_MAX",
    "DEFAULT_MAX_PEERS",
    "EXPLORE_INTERVAL",
    "PEX_MIN_INTERVAL",
    "PEX_REQUEST_TOLERANCE",
    "BootstrapDialer",
    "BootstrapEntry",
    "BootstrapState",
    "PeerExchangeSession",
    "PeerRecord",
    "PeerSource",
    "PeerTable",
    "backoff_delay",
    "build_peer_list",
    "format_address",
    "handle_peer_list",
]

PeerSource = Literal["mdns", "bootstrap", "pex", "inbound"]
"""How the current address of a peer was learned."""
_SOURCES: Final = frozenset(get_args(PeerSource))

DEFAULT_MAX_PEERS = 256
BACKOFF_BASE = 5.0
"""Seconds to wait before redialing a peer after its first failed connection attempt."""
BACKOFF_MAX = 600.0
"""The longest wait between attempts: the backoff doubles per failure up to this."""
EXPLORE_INTERVAL = (30.0, 60.0)
"""While a node holds its target number of channels, it dials one more candidate every
this many seconds (uniformly random in the range, so nodes do not explore in lockstep)."""
PEX_MIN_INTERVAL = 60.0
"""Seconds between two PeerExchangeRequests a node sends on one channel."""
PEX_REQUEST_TOLERANCE = 30.0
"""A request arriving sooner than this after the previous one on a channel is a protocol
violation: half the interval, so that network jitter never trips an honest sender."""
_MAX_HOST_CHARS = 253  # a DNS name (bootstrap entries may be host names)


_node_id_bytes = operator.attrgetter("raw")
"""Sort key of node ids: their bytes (the same order as ``NodeId.__lt__``, much faster)."""


def _rank(source: PeerSource) -> int:
    """Trust in how an address was learned: first-hand (1) beats second-hand PEX (0)."""
    return 0 if source == "pex" else 1


def _firsthand(record: PeerRecord) -> bool:
    """Whether this node has its own evidence that the peer exists."""
    return record.source != "pex" or record.ever_connected


@dataclass(frozen=True)
class PeerRecord:
    """What the table knows about one peer (immutable: the table replaces records).

    ``host``/``port`` is the address to dial, ``None`` when unknown (an inbound connection
    shows the peer's host but not the port it listens on). ``source`` says how that address
    was learned. ``last_seen`` is the last first-hand evidence that the peer exists (an mDNS
    announcement, a bootstrap or inbound connection, an open channel); second-hand PEX
    mentions never refresh it. ``failures`` counts connection attempts that failed since the
    last success; ``backoff_until`` is when the next attempt is allowed. ``excluded_until``
    is set by the group protocol (:meth:`PeerTable.exclude`).
    """

    node_id: NodeId
    host: str | None
    port: int | None
    source: PeerSource
    first_seen: float
    last_seen: float
    failures: int = 0
    excluded_until: float = 0.0
    backoff_until: float = 0.0
    connected: bool = False
    ever_connected: bool = False

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` if both are known, else ``None``."""
        if self.host is None or self.port is None:
            return None
        return (self.host, self.port)


class PeerTable:
    """Every peer this node knows, at most ``max_peers`` of them.

    ``own_id`` is never stored. Connected peers are never evicted; when the table is full a
    new peer replaces the least recently seen unconnected one, second-hand (PEX) entries
    first, and a PEX-learned peer can only replace another PEX-learned one.
    """

    def __init__(self, own_id: NodeId, max_peers: int = DEFAULT_MAX_PEERS) -> None:
        if not isinstance(max_peers, int) or max_peers < 1:
            raise ValueError(f"max_peers must be a positive integer, got {max_peers!r}")
        self.own_id = own_id
        self.max_peers = max_peers
        self._peers: dict[NodeId, PeerRecord] = {}
        # Exclusions outlive the record (expiry, eviction, mDNS departure), so a peer that
        # failed a group cannot come back by being forgotten and learned again.
        self._excluded: dict[NodeId, float] = {}

    # -- queries ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._peers

    def get(self, node_id: NodeId) -> PeerRecord | None:
        """The record of ``node_id``, or ``None`` if the table does not hold it."""
        record = self._peers.get(node_id)
        return None if record is None else self._with_exclusion(record)

    def records(self) -> list[PeerRecord]:
        """Every record, sorted by node id."""
        peers = self._peers
        return [self._with_exclusion(peers[n]) for n in sorted(peers, key=_node_id_bytes)]

    def _with_exclusion(self, record: PeerRecord) -> PeerRecord:
        """``record`` as callers see it: with its current exclusion. Stored records keep
        the default; a copy is made only for an excluded peer (lookups are hot)."""
        until = self._excluded.get(record.node_id)
        if until is None or until == record.excluded_until:
            return record
        return dataclasses.replace(record, excluded_until=until)

    def connected(self) -> list[NodeId]:
        """The node ids of connected peers, sorted."""
        return sorted((n for n, r in self._peers.items() if r.connected), key=_node_id_bytes)

    def is_excluded(self, node_id: NodeId, now: float) -> bool:
        """Whether the group protocol excluded ``node_id`` until after ``now``."""
        return self._excluded.get(node_id, 0.0) > now

    def candidates(self, now: float) -> list[PeerRecord]:
        """Peers worth dialing now: not connected, with a known address, not excluded and
        not backing off after a failure. Sorted by node id."""
        return [
            r
            for r in self.records()
            if not r.connected
            and r.address is not None
            and r.excluded_until <= now
            and r.backoff_until <= now
        ]

    def exploration_candidate(self, now: float, rng: random.Random) -> PeerRecord | None:
        """One peer to dial while at the target channel count (spec/discovery.md,
        "Exploration"), or ``None``: a random candidate (:meth:`candidates`) among those
        never connected and never failed if there are any, else among those that have not
        failed since their last success, else among all candidates.

        Exploration turns knowledge of peers this node never reached (an mDNS peer behind
        a partition that has since healed, a PeerList entry) into a channel; preferring
        never-connected peers is what mixes two halves that only met after a heal.
        """
        pool = self.candidates(now)
        for keep in (lambda r: not r.ever_connected and r.failures == 0, lambda r: r.failures == 0):
            preferred = [r for r in pool if keep(r)]
            if preferred:
                return rng.choice(preferred)
        return rng.choice(pool) if pool else None

    def sample_for_exchange(
        self, k: int, rng: random.Random, exclude: Collection[NodeId] = ()
    ) -> list[PeerRecord]:
        """Up to ``k`` peers to share in a PeerList, chosen uniformly by ``rng``.

        Only peers whose address is worth passing on: connected now, or known first-hand
        (mDNS, bootstrap), or reached successfully before; never a peer whose last
        connection attempt failed, an excluded peer, or one in ``exclude`` (the asker). A
        second-hand address this node never verified is not repeated, so junk does not
        spread from peer to peer. The result is sorted by node id.
        """
        if k < 0:
            raise ValueError(f"k must be non-negative, got {k}")
        excluded = frozenset(exclude)
        pool = [
            r
            for r in self.records()
            if r.address is not None
            and r.node_id not in excluded
            and r.failures == 0
            and r.node_id not in self._excluded
            and (r.connected or _firsthand(r))
        ]
        if len(pool) > k:
            pool = rng.sample(pool, k)
        return sorted(pool, key=lambda r: r.node_id.raw)

    # -- updates ----------------------------------------------------------------------

    def observe(
        self,
        node_id: NodeId,
        host: str | None,
        port: int | None,
        source: PeerSource,
        now: float,
    ) -> bool:
        """Record that ``node_id`` was seen at ``host:port`` through ``source``.

        Returns True if the peer is new or its address changed (worth a dial), False
        otherwise: own id, nothing new, or no room (a full table of connected or first-hand
        peers has no room for a PEX-learned one).

        A PEX address never replaces one learned first-hand, and a PEX mention does not
        refresh ``last_seen``. ``None`` for ``host`` or ``port`` keeps what is known.
        """
        _check_address(host, port, source)
        if node_id == self.own_id:
            return False
        record = self._peers.get(node_id)
        if record is None:
            if not self._make_room(source):
                return False
            self._peers[node_id] = PeerRecord(
                node_id=node_id,
                host=host,
                port=port,
                source=source,
                first_seen=now,
                last_seen=now,
            )
            return True
        changes: dict[str, object] = {}
        if _rank(source) > 0:  # second-hand mentions never keep a peer alive
            changes["last_seen"] = max(record.last_seen, now)
        new_host = record.host if host is None else host
        new_port = record.port if port is None else port
        if (new_host, new_port) != (record.host, record.port) and (
            _rank(source) >= _rank(record.source) or record.address is None
        ):
            changes.update(host=new_host, port=new_port, source=source)
            # a new address deserves a fresh try
            changes.update(failures=0, backoff_until=0.0)
        self._peers[node_id] = dataclasses.replace(record, **changes)  # type: ignore[arg-type]
        return "host" in changes

    def mark_connected(self, node_id: NodeId, now: float) -> None:
        """A channel to ``node_id`` is open (the handshake proved its id).

        Resets failures and backoff. An unknown peer is added (source ``"inbound"``, no
        address), evicting an unconnected peer if the table is full; connected peers are
        never evicted, so the table holds more than ``max_peers`` entries only while more
        than ``max_peers`` peers are connected.
        """
        if node_id == self.own_id:
            raise LocalProtocolError("mark_connected: a node does not connect to itself")
        record = self._peers.get(node_id)
        if record is None:
            self._make_room("inbound")
            record = PeerRecord(node_id, None, None, "inbound", first_seen=now, last_seen=now)
        self._peers[node_id] = dataclasses.replace(
            record,
            connected=True,
            ever_connected=True,
            last_seen=max(record.last_seen, now),
            failures=0,
            backoff_until=0.0,
        )

    def mark_disconnected(self, node_id: NodeId, now: float) -> None:
        """The channel to ``node_id`` closed; the peer stays known (``last_seen = now``)."""
        record = self._peers.get(node_id)
        if record is not None:
            self._peers[node_id] = dataclasses.replace(
                record, connected=False, last_seen=max(record.last_seen, now)
            )

    def record_failure(self, node_id: NodeId, now: float) -> None:
        """A connection attempt to ``node_id`` failed: back off exponentially.

        The n-th consecutive failure forbids another attempt for
        ``min(BACKOFF_BASE * 2**(n-1), BACKOFF_MAX)`` seconds.
        """
        record = self._peers.get(node_id)
        if record is None:
            return
        failures = record.failures + 1
        self._peers[node_id] = dataclasses.replace(
            record, failures=failures, backoff_until=now + backoff_delay(failures)
        )

    def exclude(self, node_id: NodeId, until: float) -> None:
        """Do not dial or share ``node_id`` before ``until`` (the group protocol excludes a
        peer that failed a group). Extends, never shortens, an existing exclusion.

        Exclusions are kept apart from the records (at most ``max_peers``; when full the
        exclusion ending first is dropped) so forgetting a peer does not lift its exclusion.
        """
        if node_id == self.own_id:
            return
        self._excluded[node_id] = max(until, self._excluded.get(node_id, until))
        if len(self._excluded) > self.max_peers:
            soonest = min(self._excluded, key=lambda n: (self._excluded[n], n))
            del self._excluded[soonest]

    def pardon(self, node_id: NodeId) -> None:
        """Lift an exclusion: the peer came back on a fresh channel (it restarted), which
        is the evidence of health that the exclusion was waiting for."""
        self._excluded.pop(node_id, None)

    def remove(self, node_id: NodeId) -> bool:
        """Forget ``node_id`` (its mDNS announcement was withdrawn). A connected peer is
        kept: its open channel is better evidence than a departure. Returns whether the
        peer was removed."""
        record = self._peers.get(node_id)
        if record is None or record.connected:
            return False
        del self._peers[node_id]
        return True

    def expire(self, now: float, max_age: float) -> list[NodeId]:
        """Forget unconnected peers not seen for more than ``max_age`` seconds, and lift
        exclusions that ended. Returns the forgotten node ids, sorted."""
        stale = sorted(
            n for n, r in self._peers.items() if not r.connected and now - r.last_seen > max_age
        )
        for node_id in stale:
            del self._peers[node_id]
        for node_id in sorted(n for n, until in self._excluded.items() if until <= now):
            del self._excluded[node_id]
        return stale

    def _make_room(self, source: PeerSource) -> bool:
        """Evict one entry if the table is full; False if nothing may be evicted."""
        if len(self._peers) < self.max_peers:
            return True
        unconnected = [r for r in self._peers.values() if not r.connected]
        if _rank(source) == 0:
            unconnected = [r for r in unconnected if not _firsthand(r)]
        if not unconnected:
            return False
        victim = min(unconnected, key=lambda r: (_firsthand(r), r.last_seen, r.node_id))
        del self._peers[victim.node_id]
        return True


def backoff_delay(failures: int) -> float:
    """Seconds to wait after the ``failures``-th consecutive failed connection attempt
    before the next one (spec/discovery.md section 5, "Backoff"):
    ``min(BACKOFF_BASE * 2**(failures - 1), BACKOFF_MAX)``.

    >>> [backoff_delay(n) for n in range(1, 10)]
    [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0, 600.0]
    """
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
        raise ValueError(f"failures must be an integer >= 1, got {failures!r}")
    # the exponent is capped so that a peer failing for weeks cannot overflow the float
    return min(BACKOFF_BASE * 2 ** min(failures - 1, 30), BACKOFF_MAX)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets (the form config files use).

    >>> format_address("::1", 7447), format_address("10.0.0.2", 7447)
    ('[::1]:7447', '10.0.0.2:7447')
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_address(host: str | None, port: int | None, source: str) -> None:
    if source not in _SOURCES:
        raise LocalProtocolError(f"unknown peer source {source!r}; use one of {sorted(_SOURCES)}")
    if host is not None and (
        not isinstance(host, str) or not 0 < len(host) <= _MAX_HOST_CHARS or host != host.strip()
    ):
        raise LocalProtocolError(f"peer host must be an address or host name, got {host!r}")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
    ):
        raise LocalProtocolError(f"peer port must be an integer from 1 to 65535, got {port!r}")


# -- bootstrap addresses ------------------------------------------------------------------

BootstrapState = Literal["connected", "connecting", "failing", "not connected"]
"""How dialing a bootstrap address goes, as ``p2pfed status`` shows it."""


@dataclass
class BootstrapEntry:
    """One configured bootstrap address and the state of dialing it.

    ``failures`` counts consecutive failed attempts (connect or handshake) since the last
    success; ``failing_since`` is when the first of them failed; ``next_attempt`` is when
    the address may be dialed again. ``node_id`` is whom the last completed handshake
    reached there (an address has no node id before that).
    """

    host: str
    port: int
    node_id: NodeId | None = None
    connected: bool = False
    dialling: bool = False
    failures: int = 0
    failing_since: float | None = None
    next_attempt: float = 0.0
    last_error: str | None = None

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` as dialed."""
        return (self.host, self.port)

    @property
    def label(self) -> str:
        """The address as an operator wrote it (``host:port``, ``[ipv6]:port``)."""
        return format_address(self.host, self.port)

    @property
    def state(self) -> BootstrapState:
        """Connected, failing (the last attempt failed, even while it is redialed),
        connecting (a first attempt in progress) or not connected (not tried yet, or the
        channel just closed)."""
        if self.connected:
            return "connected"
        if self.failures:
            return "failing"
        return "connecting" if self.dialling else "not connected"


class BootstrapDialer:
    """When to dial each bootstrap address (spec/discovery.md sections 3 and 5), sans-IO.

    A bootstrap address that fails is redialed with the backoff of :func:`backoff_delay`,
    counted per address; a completed handshake there (or any open channel to the node it
    reached) resets the count. The node asks :meth:`due` what to dial, reports each
    attempt's outcome, and tells :meth:`update_connected` which peers it has channels to.
    An outcome is taken only for an attempt in progress, so each failure is counted, and
    warned about, once per backoff step.

    >>> dialer = BootstrapDialer([("10.0.0.9", 7447)])
    >>> [e.label for e in dialer.due(now=0.0)]
    ['10.0.0.9:7447']
    >>> dialer.attempt_started(("10.0.0.9", 7447), now=0.0)
    >>> dialer.attempt_failed(("10.0.0.9", 7447), now=5.0, reason="refused")
    5.0
    >>> dialer.attempt_failed(("10.0.0.9", 7447), now=5.0, reason="refused")  # no attempt
    >>> dialer.due(now=9.0), dialer.next_attempt_at(now=9.0)
    ([], 10.0)
    """

    def __init__(self, addresses: Iterable[tuple[str, int]]) -> None:
        self._entries: dict[tuple[str, int], BootstrapEntry] = {}
        for host, port in addresses:  # configuration order; a repeated address counts once
            self._entries.setdefault((host, port), BootstrapEntry(host, port))

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[BootstrapEntry]:
        """Every bootstrap address, in configuration order."""
        return list(self._entries.values())

    def get(self, address: tuple[str, int]) -> BootstrapEntry | None:
        """The entry of ``address``, if it is a bootstrap address."""
        return self._entries.get(address)

    def update_connected(
        self, peers: Collection[NodeId], addresses: Collection[tuple[str, int]]
    ) -> None:
        """Mark which entries have an open channel: to the node reached there before, or
        to a peer known at exactly that address (it may have connected to us first). An
        open channel ends a failure streak."""
        for entry in self._entries.values():
            entry.connected = (
                entry.node_id is not None and entry.node_id in peers
            ) or entry.address in addresses
            if entry.connected:
                entry.failures = 0
                entry.failing_since = None
                entry.last_error = None

    def due(self, now: float) -> list[BootstrapEntry]:
        """Entries to dial now: not connected, not being dialed, backoff over."""
        return [
            e
            for e in self._entries.values()
            if not e.connected and not e.dialling and e.next_attempt <= now
        ]

    def next_attempt_at(self, now: float) -> float | None:
        """The earliest future time (after ``now``) an entry becomes due, if any: the
        node sleeps until then at most."""
        waiting = [
            e.next_attempt
            for e in self._entries.values()
            if not e.connected and not e.dialling and e.next_attempt > now
        ]
        return min(waiting, default=None)

    def attempt_started(self, address: tuple[str, int], now: float) -> None:
        """The node began dialing ``address``."""
        entry = self._entries.get(address)
        if entry is not None:
            entry.dialling = True

    def attempt_failed(self, address: tuple[str, int], now: float, reason: str) -> float | None:
        """The attempt in progress failed: back off. Returns the seconds until the next
        attempt, or None if no attempt was in progress (an outcome reported twice, or a
        channel failing after its handshake completed): nothing to count or log then."""
        entry = self._entries.get(address)
        if entry is None or not entry.dialling:
            return None
        entry.dialling = False
        entry.failures += 1
        if entry.failing_since is None:
            entry.failing_since = now
        delay = backoff_delay(entry.failures)
        entry.next_attempt = now + delay
        entry.last_error = reason
        return delay

    def attempt_succeeded(self, address: tuple[str, int], node_id: NodeId, now: float) -> int:
        """The handshake completed: ``node_id`` answers at ``address``. Resets the backoff
        and returns how many attempts had failed in a row before (0: none)."""
        entry = self._entries.get(address)
        if entry is None:
            return 0
        failed = entry.failures
        entry.dialling = False
        entry.connected = True
        entry.node_id = node_id
        entry.failures = 0
        entry.failing_since = None
        entry.last_error = None
        entry.next_attempt = now  # after a clean close, redial at once
        return failed

    def attempt_ended(self, address: tuple[str, int]) -> None:
        """The dialing task ended (its channel closed, or it was cancelled): no attempt
        is in progress any more."""
        entry = self._entries.get(address)
        if entry is not None:
            entry.dialling = False


# -- peer exchange ------------------------------------------------------------------------


def build_peer_list(
    table: PeerTable,
    request: PeerExchangeRequest,
    requester: NodeId,
    rng: random.Random,
    requester_host: str | None = None,
) -> PeerList:
    """The answer to ``requester``'s ``request``: a sample of shareable peers
    (:meth:`PeerTable.sample_for_exchange`), never the requester itself, and only peers
    whose host is an IP address literal (a bootstrap host name is not sent).

    If ``requester_host`` (the address the requester's channel comes from) is not a
    loopback address, loopback and link-local addresses are left out: they would name
    the requester's own machine or link, not the peer.
    """
    share_local = requester_host is None or _is_local(requester_host)
    infos = []
    for record in table.sample_for_exchange(request.max_peers, rng, exclude=(requester,)):
        assert record.host is not None and record.port is not None
        if not share_local and _is_local(record.host):
            continue
        try:
            infos.append(PeerInfo(node_id=record.node_id.raw, host=record.host, port=record.port))
        except LocalProtocolError:
            continue  # a host name, or an address no peer could dial
    return PeerList(peers=infos)


@functools.lru_cache(maxsize=4096)
def _is_local(host: str) -> bool:
    """Whether ``host`` is a loopback or link-local IP literal (meaningless elsewhere)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local


def handle_peer_list(table: PeerTable, msg: PeerList, source_peer: NodeId, now: float) -> int:
    """Add the peers of a received PeerList to ``table`` as PEX candidates; return how
    many were new.

    The message is already schema-valid (distinct ids, IP literals: a PeerList breaking
    those never decodes). Here entries naming this node or the sender are skipped; they are
    harmless (the sender may not know how we see ourselves), so they are not errors.
    """
    learned = 0
    for info in msg.peers:
        node_id = NodeId(info.node_id)
        if node_id in (table.own_id, source_peer):
            continue
        is_new = node_id not in table
        if table.observe(node_id, info.host, info.port, "pex", now) and is_new:
            learned += 1
    return learned


class PeerExchangeSession:
    """The PEX rules of one channel (spec/discovery.md, "Peer exchange"), sans-IO.

    The node asks with :meth:`make_request` when :meth:`may_request` allows, checks each
    received message with :meth:`request_received` / :meth:`list_received` (which raise
    :class:`~p2pfed.errors.RemoteProtocolError` carrying the close code when the peer broke
    a rule), and answers requests with :func:`build_peer_list`.

    >>> session = PeerExchangeSession()
    >>> request = session.make_request(now=0.0)
    >>> session.may_request(now=30.0)
    False
    """

    def __init__(self, max_peers: int = MAX_PEX_PEERS) -> None:
        if not 1 <= max_peers <= MAX_PEX_PEERS:
            raise ValueError(f"max_peers must be from 1 to {MAX_PEX_PEERS}, got {max_peers}")
        self.max_peers = max_peers
        self._last_sent: float | None = None
        self._outstanding: int | None = None  # max_peers of the unanswered request
        self._last_received: float | None = None

    def may_request(self, now: float) -> bool:
        """Whether a request may be sent now: none unanswered, and at least
        :data:`PEX_MIN_INTERVAL` seconds since the previous one."""
        if self._outstanding is not None:
            return False
        return self._last_sent is None or now - self._last_sent >= PEX_MIN_INTERVAL

    def make_request(self, now: float) -> PeerExchangeRequest:
        """The request to send now; raises LocalProtocolError if :meth:`may_request` is
        False (asking more often would make the peer close the channel)."""
        if not self.may_request(now):
            raise LocalProtocolError(
                "a PeerExchangeRequest is unanswered or was sent less than "
                f"{PEX_MIN_INTERVAL:g} s ago; wait for may_request()"
            )
        self._last_sent = now
        self._outstanding = self.max_peers
        return PeerExchangeRequest(max_peers=self.max_peers)

    def request_received(self, now: float) -> None:
        """Check a received PeerExchangeRequest; the node then answers it.

        Raises RemoteProtocolError (PROTOCOL_ERROR) if it came less than
        :data:`PEX_REQUEST_TOLERANCE` seconds after the previous one.
        """
        previous = self._last_received
        if previous is not None and now - previous < PEX_REQUEST_TOLERANCE:
            raise RemoteProtocolError(
                f"PeerExchangeRequest {now - previous:.1f} s after the previous one on this "
                f"channel; requests on one channel must be at least "
                f"{PEX_REQUEST_TOLERANCE:g} s apart",
                CloseCode.PROTOCOL_ERROR,
            )
        self._last_received = now

    def list_received(self, msg: PeerList) -> None:
        """Check a received PeerList against our request.

        Raises RemoteProtocolError: UNEXPECTED_MESSAGE if no request is unanswered,
        PROTOCOL_ERROR if it holds more peers than requested.
        """
        if self._outstanding is None:
            raise RemoteProtocolError(
                "PeerList without an unanswered PeerExchangeRequest",
                CloseCode.UNEXPECTED_MESSAGE,
            )
        if len(msg.peers) > self._outstanding:
            raise RemoteProtocolError(
                f"PeerList of {len(msg.peers)} peers answers a request for at most "
                f"{self._outstanding}",
                CloseCode.PROTOCOL_ERROR,
            )
        self._outstanding = None
