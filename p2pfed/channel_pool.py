"""The channel pool: this node's secure channels to its peers, and keeping them open.

One job: hold the links per peer (dial, serve, one writer task a channel, the reader loop),
deliver messages to peers (queueing and dialling when there is no channel yet), trim
channels beyond ``max_connections``, tell responsive peers from silent ones
(spec/transport.md, section 6), and keep ``target_peers`` channels open from bootstrap
addresses, peer exchange and mDNS (spec/discovery.md). Peer exchange is answered here;
every other message goes to the owner through :class:`PoolHooks`.

The pool knows nothing of groups or rounds: what a new channel is greeted with, what a
message means, what a lost peer costs, and which peers must not be trimmed (the current
group's) are the owner's hooks. Like the node, it never reads the wall clock or opens
sockets itself: it runs on trio's clock and a :class:`~p2pfed.network.Network`, so a test
drives it over simnet's virtual network (tests/test_channel_pool.py).

Example (what :class:`p2pfed.node.Node` does)::

    pool = ChannelPool(identity, federation, config, channel_config, network, peers,
                       rng=rng, randbytes=os.urandom, hooks=hooks, ...)
    pool.bind(nursery)
    await nursery.start(pool.serve, listener)
    nursery.start_soon(pool.connector_loop)
    nursery.start_soon(pool.discovery_loop)
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import math
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pfed.channel import Role, StaticKey
from p2pfed.config import NodeConfig, parse_host_port
from p2pfed.errors import ChannelClosed, CloseCode, RemoteProtocolError
from p2pfed.federation import Federation
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.messages import Message, NodeAnnounce, PeerExchangeRequest, PeerList
from p2pfed.network import Network, PeerDeparted, PeerDiscovered
from p2pfed.peers import (
    EXPLORE_INTERVAL,
    BootstrapDialer,
    PeerExchangeSession,
    PeerSource,
    PeerTable,
    build_peer_list,
    format_address,
    handle_peer_list,
)
from p2pfed.trio_channel import (
    ChannelClock,
    ChannelConfig,
    SecureChannel,
    SharedBudget,
    open_secure_channel,
    serve_secure_channels,
)

__all__ = [
    "LIVENESS_DEADLINE",
    "PEER_MAX_AGE",
    "STALL_GRACE",
    "ChannelPool",
    "Link",
    "PoolHooks",
]

log = logging.getLogger("p2pfed.node")  # the node's log: operators filter on one name

LIVENESS_DEADLINE = 3.0
"""A peer with nothing received for this long is unresponsive (spec/transport.md, 6)."""
STALL_GRACE = 10.0
"""Seconds after start before a node says why it forms no groups (finding peers takes a
moment; saying so at every start would be noise)."""
PEER_MAX_AGE = 600.0  # forget an unconnected peer not seen (announced, listed) for this long
_id_bytes = operator.attrgetter("raw")


@dataclass
class Link:
    """One open channel to a peer, with its outbox (drained by the channel's writer)."""

    channel: SecureChannel
    outbox: trio.MemorySendChannel[Message]
    # how the writer closes the channel once the outbox is closed and drained
    close_code: CloseCode = CloseCode.SHUTTING_DOWN
    close_reason: str = "node stopping"
    # peer exchange is per channel (spec/discovery.md 4.2-4.4): a second channel to the
    # same peer has its own request and its own rate limit
    pex: PeerExchangeSession = field(default_factory=PeerExchangeSession)
    initiated: bool = False  # this node dialed it (spec/discovery.md, "Duplicate channels")


def _nothing(*_: Any) -> None:
    return None


@dataclass
class PoolHooks:
    """What the pool asks of its owner (each runs synchronously, inside the pool's call).

    Ordering contract: ``opened`` runs after the link is registered and the peer marked
    connected, before anything is sent on it; its messages go out first, then what was
    queued for the peer, then a peer-exchange request. ``gone`` runs after the peer's
    last channel has closed and it is marked disconnected."""

    opened: Callable[[NodeId, SecureChannel], list[Message]] = lambda peer, channel: []
    """A channel to ``peer`` is open: the messages to greet it with."""
    received: Callable[[NodeId, Message], None] = _nothing
    """A message other than peer exchange arrived (NodeAnnounce is passed on too, after
    the pool has noted the peer's listen address)."""
    gone: Callable[[NodeId], None] = _nothing
    """The peer's last channel closed."""
    undeliverable: Callable[[NodeId], None] = _nothing
    """What was sent to the peer cannot be delivered (no address, or the dial failed)."""
    busy: Callable[[], set[NodeId]] = set
    """Peers whose channels must not be trimmed now (the current group's)."""


class ChannelPool:
    """This node's channels (see the module docstring)."""

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        federation: Federation,
        config: NodeConfig,
        channel_config: ChannelConfig,
        network: Network,
        peers: PeerTable,
        rng: random.Random,
        randbytes: Callable[[int], bytes],
        budget: Callable[[], SharedBudget],
        target_peers: int,
        group_min: int,
        hooks: PoolHooks | None = None,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.federation = federation
        self.config = config
        self.channel_config = channel_config
        self.network = network
        self.peers = peers
        self.target_peers = target_peers
        self.group_min = group_min
        self.hooks = hooks or PoolHooks()
        self._rng = rng
        self._randbytes = randbytes
        self._budget = budget
        # one Noise static key for all this node's channels (spec/transport.md allows it)
        self._static_key = StaticKey.generate(identity, randbytes)
        self.links: dict[NodeId, list[Link]] = {}
        self._last_active: dict[NodeId, float] = {}  # a message sent or received (not keepalive)
        self._closing: set[NodeId] = set()  # channels being closed by trim
        self.channels_trimmed = 0  # channels closed for the connection limit
        self._dialling: set[tuple[str, int]] = set()
        self._stall_logged: str | None = None  # the stall reason last logged
        self._host_of: dict[NodeId, str] = {}  # remote address of each peer's channel
        self._links_changed = trio.Event()
        self._queued: dict[NodeId, list[Message]] = {}
        self._connector_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._clock: ChannelClock | None = None  # the channels' keepalives and timeouts
        # connected(), kept until a link changes or a peer's liveness may have: the peers,
        # the links of the unresponsive ones, and the oldest last arrival of the others
        self._responsive: tuple[list[NodeId], list[Link], float] | None = None
        self._abandoned = False
        self.listen_port = 0
        self.stopping = False
        """Set when the node stops: no new connections are made for messages."""
        self.bytes_sent = 0  # on channels closed so far
        self.bytes_received = 0

    def bind(self, nursery: trio.Nursery) -> None:
        """The nursery dials and their channels run in (the node's: one nursery for all),
        with one :class:`~p2pfed.trio_channel.ChannelClock` for all their keepalives and
        timeouts (a pool never bound gives each channel a clock task of its own)."""
        self._nursery = nursery
        self._clock = ChannelClock(nursery)

    # -- peers and liveness --------------------------------------------------------------

    def connected(self) -> list[NodeId]:
        """Peers with an open channel that are responsive: something arrived from them
        within LIVENESS_DEADLINE (spec/transport.md, section 6). A peer that vanished
        without closing (a cut cable, a router down) drops out within seconds, so group
        formation neither invites it nor waits for it, though its channel lingers until
        the idle timeout; it is back as soon as anything arrives from it again."""
        # This runs on every wake of the group loop, so the answer is kept until a link
        # opens, closes or is being closed (_links_moved), a responsive peer's last
        # arrival may be older than the deadline, or an unresponsive one's channel heard
        # something (arrivals only move forward, so nothing else can change it).
        now = trio.current_time()
        heard_since = now - LIVENESS_DEADLINE
        cached = self._responsive
        if cached is not None:
            peers, silent, oldest = cached
            if oldest >= heard_since and all(
                link.channel.last_received < heard_since for link in silent
            ):
                return list(peers)
        closing = self._closing
        responsive: list[NodeId] = []
        silent = []
        oldest = math.inf
        for peer, links in self.links.items():
            if closing and peer in closing:
                continue
            # (one link nearly always: no generator per peer, each time a link moves)
            if len(links) == 1:
                last = links[0].channel.last_received
            else:
                last = max((link.channel.last_received for link in links), default=-math.inf)
            if last >= heard_since:
                responsive.append(peer)
                oldest = min(oldest, last)
            else:
                silent.extend(links)
        # sorted by the id bytes directly: NodeId's generated __lt__ is slow
        responsive.sort(key=_id_bytes)
        self._responsive = (responsive, silent, oldest)
        return list(responsive)

    def _links_moved(self) -> None:
        """A link opened, closed or began closing: connected() looks again."""
        self._responsive = None

    # A busy node's links open and close all the time (groups connect their members), and
    # connected() is asked on every wake of the group loop: the two common moves, a peer's
    # first link opening and its last closing, update the kept answer instead of
    # discarding it (a full look is a pass over every link and a sort).

    def _first_link_opened(self, peer: NodeId, last_received: float) -> None:
        cached = self._responsive
        if cached is None:
            return
        if last_received < trio.current_time() - LIVENESS_DEADLINE:
            self._responsive = None
            return
        peers, silent, oldest = cached
        bisect.insort(peers, peer, key=_id_bytes)
        self._responsive = (peers, silent, min(oldest, last_received))

    def _last_link_closed(self, peer: NodeId) -> None:
        """Before ``peer`` leaves ``links`` and ``_closing``."""
        cached = self._responsive
        if cached is None or peer in self._closing:
            return  # (a closing peer is in neither list)
        peers = cached[0]
        index = bisect.bisect_left(peers, peer.raw, key=_id_bytes)
        if index < len(peers) and peers[index] == peer:
            del peers[index]  # (the oldest arrival of the rest is no older: still a bound)
        else:
            self._responsive = None  # it was unresponsive: its links are in the other list

    def unresponsive_peers(self) -> list[NodeId]:
        """Peers with an open channel but nothing received for LIVENESS_DEADLINE."""
        responsive = set(self.connected())
        return sorted(
            (p for p, links in self.links.items() if links and p not in responsive),
            key=_id_bytes,
        )

    def version(self, peer: NodeId) -> int:
        """The protocol version of the peer's first channel (0: no channel)."""
        links = self.links.get(peer)
        return links[0].channel.version if links else 0

    def silent_since(self, peer: NodeId) -> float | None:
        """When the peer becomes silent (its last arrival plus LIVENESS_DEADLINE), or None
        without a channel (its loss was handled when the channel closed)."""
        links = self.links.get(peer)
        if not links:
            return None
        return max(link.channel.last_received for link in links) + LIVENESS_DEADLINE

    def traffic(self) -> tuple[int, int]:
        """Bytes sent and received on all channels so far, open and closed."""
        sent, received = self.bytes_sent, self.bytes_received
        for links in self.links.values():
            for link in links:
                sent += link.channel.bytes_sent
                received += link.channel.bytes_received
        return sent, received

    def address_of(self, peer: NodeId) -> tuple[str, int] | None:
        record = self.peers.get(peer)
        return record.address if record is not None else None

    def stall_reason(self) -> str | None:
        """Why this node cannot form groups now, or None: too few responsive peers for
        ``group_min``, and what it knows of the others (for the log and the status)."""
        group_min = self.group_min
        responsive = len(self.connected())
        if self.stopping or responsive + 1 >= group_min:
            return None
        parts = [
            f"{responsive} responsive peer{'' if responsive == 1 else 's'}, but a group needs "
            f"{group_min} nodes (the federation's group_min)"
        ]
        silent = len(self.unresponsive_peers())
        if silent:
            parts.append(f"{silent} connected but silent for over {LIVENESS_DEADLINE:g} s")
        linked = set(self.links)
        known = [r for r in self.peers.records() if r.node_id not in linked and r.address]
        if known:
            parts.append(f"{len(known)} known but not connected (dialing them with backoff)")
        failing = [e for e in self.bootstrap.entries() if e.state == "failing"]
        for entry in failing[:3]:
            # (its error has warnings of its own: the reason changes with the state only)
            parts.append(f"bootstrap {entry.label} failing")
        if not known and not silent and not failing:
            if not self.config.bootstrap and not self.config.mdns:
                parts.append(
                    "no peer known: mDNS is off and no bootstrap address is configured "
                    "(add --bootstrap HOST:PORT, or bootstrap in config.toml)"
                )
            elif not self.config.bootstrap:
                parts.append(
                    "no peer found by mDNS yet (other nodes must be on this network segment, "
                    "in the same federation; on one machine, mdns_interfaces = ['127.0.0.1'])"
                )
        return "; ".join(parts)

    def _log_stall(self) -> None:
        """Log when the reason the node cannot form groups changes (once per change)."""
        reason = self.stall_reason()
        if reason == self._stall_logged:
            return
        if reason is not None:
            # info, the daemon's default level: a stall is a state, not a fault (its causes,
            # such as a failing bootstrap address, warn on their own)
            log.info("not forming groups: %s", reason, extra={"event": "stalled"})
        elif self._stall_logged is not None:
            log.info("enough responsive peers to form groups again", extra={"event": "unstalled"})
        self._stall_logged = reason

    # -- sending -------------------------------------------------------------------------

    def send(self, peer: NodeId, message: Message, address: tuple[str, int] | None = None) -> None:
        """Queue ``message`` for ``peer``: on its channel, or dial it (``address``, else
        the one the peer table knows) and send it once the channel is open. A peer that
        cannot be reached is reported to ``hooks.undeliverable``."""
        links = self.links.get(peer)
        if links:
            self._last_active[peer] = trio.current_time()
            try:
                links[0].outbox.send_nowait(message)
                return
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        if self.stopping:
            return  # stopping: no new connections
        # no channel yet: queue and dial (group members may not have met before)
        self._queued.setdefault(peer, []).append(message)
        target = address or self.address_of(peer)
        if target is None or not target[0] or not target[1]:
            self._queued.pop(peer, None)
            self.hooks.undeliverable(peer)
            return
        self.dial(target, expect=peer)

    def trim(self, keep: NodeId | None) -> None:
        """Close the longest-idle channels beyond ``max_connections`` (spec/discovery.md,
        "Connection limit"): never ``keep`` (a channel just opened), a busy peer (the
        current group's), or one with messages queued; what is left over is trimmed when
        the group ends. Groups open channels between all their members, so without this a
        node's channel count only grows; and a node that made newcomers wait for a free
        slot instead stalled every group that needed it.
        """
        excess = len(self.links) - len(self._closing) - self.config.max_connections
        if excess <= 0:
            return
        busy = self.hooks.busy()
        idle = sorted(
            (
                p
                for p in self.links
                if p != keep and p not in busy and p not in self._queued and p not in self._closing
            ),
            key=lambda p: (self._last_active.get(p, 0.0), p.raw),
        )
        for peer in idle[:excess]:
            log.debug("closing idle channel to %s: connection limit", peer.short)
            self._closing.add(peer)
            self._links_moved()
            self.channels_trimmed += 1
            for link in self.links.get(peer, []):
                link.close_code = CloseCode.NORMAL
                link.close_reason = "connection limit: closing the longest-idle channel"
                link.outbox.close()

    # -- serving and dialling ------------------------------------------------------------

    async def serve(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept inbound channels on ``listener`` until cancelled."""

        async def inbound(channel: SecureChannel) -> None:
            await self._serve_channel(channel)

        await serve_secure_channels(
            inbound,
            [listener],  # type: ignore[list-item]
            self.identity,
            self.federation,
            self.channel_config,
            # a hard cap on inbound channels and handshakes in progress: trim keeps the
            # node at max_connections by closing idle channels, so an inbound peer need
            # not wait (in the backlog, past its handshake timeout) for a slot
            max_connections=2 * self.config.max_connections,
            # handshakes are limited per source address (spec/transport.md, section 8):
            # the network knows the address, simnet's virtual streams included
            source_of=self.network.peer_host,
            randbytes=self._randbytes,
            static_key=self._static_key,
            budget=self._budget(),
            clock=self._clock,
            task_status=task_status,  # type: ignore[arg-type]
        )

    async def _serve_channel(self, channel: SecureChannel, *, initiated: bool = False) -> None:
        """Run one channel: its writer task, its reader loop, and the bookkeeping."""
        peer = channel.peer_id
        send, outbox = trio.open_memory_channel[Message](math.inf)
        link = Link(channel, send, initiated=initiated)
        now = trio.current_time()
        if not self.links.get(peer):
            self.peers.pardon(peer)  # back after a failure: it may join groups again
        host = self.network.peer_host(channel.stream)
        if host:
            self._host_of[peer] = host
        first = not self.links.get(peer) and peer not in self._closing
        self.links.setdefault(peer, []).append(link)
        self._closing.discard(peer)  # a new channel to a peer whose old one is closing
        if first:
            self._first_link_opened(peer, channel.last_received)
        else:
            self._links_moved()
        self._last_active[peer] = now
        self.trim(keep=peer)
        self.peers.mark_connected(peer, now)
        for message in self.hooks.opened(peer, channel):
            send.send_nowait(message)
        for message in self._queued.pop(peer, []):
            send.send_nowait(message)
        # ask for more peers only while short of them (spec/discovery.md: a node SHOULD ask
        # only when it wants more): group members connect to each other, so a busy node
        # opens many channels, and a PeerList on each one was a large part of their cost
        session = link.pex
        if session.may_request(now) and len(self.links) <= self.target_peers:
            send.send_nowait(session.make_request(now))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, link, outbox)
                try:
                    # receive() directly, not `async for` over the channel: the async
                    # generator's machinery per message was a cost of its own
                    while True:
                        try:
                            message = await channel.receive()
                        except ChannelClosed as exc:
                            if exc.orderly:
                                break
                            raise
                        self._dispatch(peer, message, link)
                except RemoteProtocolError as exc:
                    log.warning("closing channel to %s: %s", peer.short, exc)
                    await channel.aclose(exc.code, str(exc))
                except ChannelClosed as exc:
                    log.info("channel to %s ended: %s", peer.short, exc)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.bytes_sent += channel.bytes_sent
            self.bytes_received += channel.bytes_received
            links = self.links.get(peer, [])
            if link in links:
                links.remove(link)
            send.close()
            self._links_changed.set()
            if links:
                self._links_moved()  # (its newest arrival may be older now)
            else:
                self._last_link_closed(peer)
                self.links.pop(peer, None)
                self._last_active.pop(peer, None)
                self._closing.discard(peer)
                if not self._abandoned:  # (abandoned: the peer table stays as it was)
                    self.peers.mark_disconnected(peer, trio.current_time())
                    self.hooks.gone(peer)

    async def _writer(self, link: Link, outbox: trio.MemoryReceiveChannel[Message]) -> None:
        channel = link.channel
        try:
            async for message in outbox:
                # everything queued meanwhile goes out with it, packed into one write
                batch = [message]
                while True:
                    try:
                        batch.append(outbox.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await channel.send_many(batch)
            # the outbox was closed (the node is stopping, or trimming this channel) and
            # everything queued is sent
            await channel.aclose(link.close_code, link.close_reason)
        except ChannelClosed:
            pass

    def _dispatch(self, peer: NodeId, message: Message, link: Link) -> None:
        now = trio.current_time()
        self._last_active[peer] = now
        if isinstance(message, PeerExchangeRequest):
            link.pex.request_received(now)
            requester = self._host_of.get(peer)
            reply = build_peer_list(self.peers, message, peer, self._rng, requester)
            # on the channel the request came on: the requester checks it there
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                link.outbox.send_nowait(reply)
            return
        if isinstance(message, PeerList):
            link.pex.list_received(message)
            if handle_peer_list(self.peers, message, peer, now):
                self.wake_connector()
            return
        self.hooks.received(peer, message)
        if isinstance(message, NodeAnnounce):
            host = self._host_of.get(peer)
            if host and message.listen_port:
                self.peers.observe(peer, host, message.listen_port, "inbound", now)

    def dial(self, address: tuple[str, int], expect: NodeId | None = None) -> bool:
        """Dial ``address`` in the background (``expect``: the node id claimed there; None
        for a bootstrap address). Returns False if it is being dialed already."""
        if address in self._dialling or self._nursery is None:
            return False
        self._dialling.add(address)
        self._nursery.start_soon(self._connect, address, expect)
        return True

    async def _connect(self, address: tuple[str, int], expect: NodeId | None) -> None:
        """One outgoing connection: connect, handshake, then serve the channel until it
        ends. Never raises (but for cancellation): a failure is a failed dial."""
        host, port = address
        where = format_address(host, port)
        try:
            try:
                stream = await self.network.connect(host, port)
            except OSError as exc:
                # the Network contract: every way a connection attempt fails is an OSError,
                # a timeout included
                log.debug("cannot reach %s: %s", where, exc)
                self._dial_failed(expect, address, exc.strerror or str(exc))
                return
            try:
                async with open_secure_channel(
                    stream,
                    Role.INITIATOR,
                    self.identity,
                    self.federation,
                    self.channel_config,
                    randbytes=self._randbytes,
                    static_key=self._static_key,
                    budget=self._budget(),
                    clock=self._clock,
                ) as channel:
                    if expect is not None and channel.peer_id != expect:
                        log.warning(
                            "%s:%d is %s, not %s", host, port, channel.peer_id.short, expect.short
                        )
                    source: PeerSource = "bootstrap" if expect is None else "pex"
                    now = trio.current_time()
                    self.peers.observe(channel.peer_id, host, port, source, now)
                    self._dialling.discard(address)
                    if expect is None:
                        self._bootstrap_reached(address, channel.peer_id, now)
                    await self._serve_channel(channel, initiated=True)
            except RemoteProtocolError as exc:
                # a handshake timeout is one too (HandshakeError); a bootstrap address
                # gets its own warning from _dial_failed
                if expect is not None:
                    log.warning("handshake with %s failed: %s", where, exc)
                self._dial_failed(expect, address, f"handshake failed: {exc}")
            except ChannelClosed:
                pass
        except Exception:
            # Not a failure the code above expects (a bug, or a Network breaking its
            # contract). One connection must not end the node: inbound channels are
            # handled alike (serve_secure_channels logs the error and drops the channel).
            log.exception("connection to %s failed unexpectedly", where)
            self._dial_failed(expect, address, "unexpected error (see the log)")
        finally:
            self._dialling.discard(address)
            if expect is None:
                self.bootstrap.attempt_ended(address)

    def _dial_failed(
        self, expect: NodeId | None, address: tuple[str, int] | None = None, reason: str = ""
    ) -> None:
        """A dial failed: back off from the peer (or from the bootstrap ``address`` when
        ``expect`` is None), and give up on what was queued for it."""
        now = trio.current_time()
        if expect is None:
            if address is not None:
                self._bootstrap_failed(address, reason, now)
            return
        self.peers.record_failure(expect, now)
        if self._queued.pop(expect, None):
            self.hooks.undeliverable(expect)

    # -- bootstrap, discovery, the connector ---------------------------------------------

    @functools.cached_property
    def bootstrap(self) -> BootstrapDialer:
        """The configured bootstrap addresses and how dialing each goes (made on first
        use, when the node starts connecting)."""
        return BootstrapDialer(parse_host_port(entry) for entry in self.config.bootstrap)

    def bootstrap_summary(self) -> list[dict[str, Any]]:
        """The bootstrap addresses for the status report, in configuration order.

        Each: ``address``, ``state`` (connected, connecting, failing, not connected), ``id``
        (short id of the node reached there, None before a handshake), ``failed_attempts``
        (in a row), and in trio's clock ``failing_since`` and ``next_attempt`` (None when
        not failing, or when connected or being dialed), and the last ``error``.
        """
        self._refresh_bootstrap()
        rows = []
        for entry in self.bootstrap.entries():
            waiting = not entry.connected and not entry.dialling
            rows.append(
                {
                    "address": entry.label,
                    "state": entry.state,
                    "id": entry.node_id.short if entry.node_id is not None else None,
                    "failed_attempts": entry.failures,
                    "failing_since": entry.failing_since,
                    "next_attempt": entry.next_attempt if waiting else None,
                    "error": entry.last_error,
                }
            )
        return rows

    def _refresh_bootstrap(self) -> None:
        """Tell the bootstrap dialer which bootstrap addresses have an open channel."""
        connected = set(self.connected())
        known = {r.address for r in self.peers.records() if r.node_id in connected and r.address}
        self.bootstrap.update_connected(connected, known)

    def _bootstrap_reached(self, address: tuple[str, int], peer: NodeId, now: float) -> None:
        failed = self.bootstrap.attempt_succeeded(address, peer, now)
        if failed:
            log.info(
                "bootstrap %s reachable again (node %s) after %d failed attempts",
                format_address(*address),
                peer.short,
                failed,
            )

    def _bootstrap_failed(self, address: tuple[str, int], reason: str, now: float) -> None:
        delay = self.bootstrap.attempt_failed(address, now, reason)
        if delay is None:
            return  # no attempt in progress: this failure was counted and reported already
        # once per backoff step (each failure starts the next, longer step): an operator
        # sees an address that never answers without a line every few seconds
        log.warning(
            "bootstrap %s unreachable: %s; next attempt in %s",
            format_address(*address),
            reason,
            f"{delay:g} s",
        )

    def wake_connector(self) -> None:
        self._connector_wake.set()

    async def connector_loop(self) -> None:
        """Keep ``target_peers`` channels open: bootstrap first, then known candidates."""
        bootstrap = self.bootstrap
        next_explore: float | None = None  # set when the node first reaches its target
        started = trio.current_time()
        while True:
            now = trio.current_time()
            self.peers.expire(now, max_age=PEER_MAX_AGE)
            connected = set(self.connected())
            self._refresh_bootstrap()
            if now - started >= STALL_GRACE:
                self._log_stall()
            # an unconnected bootstrap address is redialed when its backoff allows
            # (spec/discovery.md sections 3 and 5: 5 s doubling to 600 s), not on every pass
            for entry in bootstrap.due(now):
                if self.dial(entry.address):
                    bootstrap.attempt_started(entry.address, now)
            if len(connected) < self.target_peers:
                for record in self.peers.candidates(now):
                    if record.node_id in connected or record.address is None:
                        continue
                    self.dial(record.address, expect=record.node_id)
                    if len(connected) + len(self._dialling) >= self.target_peers:
                        break
            elif next_explore is None:
                next_explore = now + self._rng.uniform(*EXPLORE_INTERVAL)
            elif now >= next_explore:
                # at target: still dial one known-but-unconnected peer now and then
                # (spec/discovery.md, "Exploration"), or two halves that never met, say
                # sites that booted before the link between them was up, stay apart
                # after the link comes up: every node is content with its own side
                next_explore = now + self._rng.uniform(*EXPLORE_INTERVAL)
                explore = self.peers.exploration_candidate(now, self._rng)
                if (
                    explore is not None
                    and explore.address is not None
                    and len(connected) < self.config.max_connections
                ):
                    self.dial(explore.address, expect=explore.node_id)
            # wake when the next bootstrap attempt is due, so that it happens when the
            # warning said; else within 2 s anyway (a bootstrap address skipped because
            # another dial to it was under way is retried then)
            wait = 2.0
            due = bootstrap.next_attempt_at(now)
            if due is not None:
                wait = min(wait, due - now)
            with trio.move_on_after(wait):
                await self._connector_wake.wait()
            self._connector_wake = trio.Event()

    async def discovery_loop(self) -> None:
        """Note the peers the network's discovery (mDNS) finds, and forget departed ones."""
        discovery = self.network.discover(self.node_id, self.federation.tag, self.listen_port)
        async with discovery.events() as events:
            async for event in events:
                now = trio.current_time()
                if isinstance(event, PeerDiscovered):
                    if self.peers.observe(event.node_id, event.host, event.port, "mdns", now):
                        self.wake_connector()
                elif isinstance(event, PeerDeparted) and event.node_id not in self.links:
                    self.peers.remove(event.node_id)

    def abandon(self, *, streams_reset: bool = False) -> None:
        """Give every channel up at once, without a goodbye: the node and its network are
        being torn down together (simnet halting a whole simulated network at the end of
        a run), so nothing sent now could arrive. No Close is encoded, no new connection
        is made, and the owner hears of no lost peer (``hooks.gone``) while the channels
        unwind; what the node recorded before stays as it was.

        The writers are told to end (their outboxes closed) rather than left to be
        cancelled: a task that wakes and returns unwinds no ``Cancelled``.
        ``streams_reset``: the caller resets every connection itself (see
        :meth:`SecureChannel.abandon`)."""
        self.stopping = True
        self._abandoned = True
        for links in self.links.values():
            for link in links:
                link.channel.abandon("node halted", stream_reset=streams_reset)
                link.outbox.close()

    async def close_all(self) -> None:
        """Close every channel, letting each writer send what is queued first (our last
        reduced shard, the aborts just queued), then a Close message."""
        for links in self.links.values():
            for link in links:
                link.outbox.close()
        with trio.move_on_after(2.0):
            while self.links:
                await self._links_changed.wait()
                self._links_changed = trio.Event()
        for links in list(self.links.values()):
            for link in list(links):
                await link.channel.aclose(CloseCode.SHUTTING_DOWN, "node stopping")
