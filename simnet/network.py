"""The virtual network: hosts, links, streams and mDNS in trio's (virtual) time.

:class:`VirtualNetwork` is the world every simulated node lives in; each node gets its
own :class:`SimNetwork`, a :class:`p2pfed.network.Network` bound to one host, so the real
:class:`p2pfed.node.Node` runs unchanged. Nothing here touches a socket: hosts are opaque
IP-like strings (``"10.0.0.7"``), and bytes move between :class:`VirtualStream` ends
through queues whose delivery times follow the link model. Run it under
``trio.testing.MockClock(autojump_threshold=0)`` and whole minutes of network time pass in
milliseconds.

Rules of this file (the link model):

* **Reachability.** ``routing="direct"``: a host reaches only its topology neighbours
  (plus itself), with the edge's :class:`LinkParams`. ``routing="shortest-path"``: every
  host reaches every host in the same connected component (Shadow's model); the path is
  the lowest-latency one, its latency and jitter the sums, its bandwidth the minimum and
  its loss ``1 - prod(1 - loss)`` along the path. No topology at all: every pair is
  linked with the default parameters.
* **Connect.** Takes one round trip (2 x latency). It fails with ``OSError`` after
  ``connect_timeout`` seconds if the destination is unreachable (no route, other side of a
  partition, or a lost SYN: probability ``connect_failure``), and after one round trip
  with "connection refused" if nothing listens on the port (a crashed node).
* **Data.** Each ``send_all`` is one chunk. It is serialised at the link bandwidth (and
  the sending host's ``uplink``, shared by all its streams). Like a kernel socket buffer,
  the stream holds ``send_buffer`` bytes that have not left yet: the sender returns once
  no more than that is left to serialise (at once for a small chunk on an idle link; with
  ``send_buffer=0``, when the last byte has left), which is the back-pressure a full
  socket buffer gives. The chunk
  arrives ``latency + U(0, jitter)`` later, never before an earlier chunk (TCP is in
  order). With probability ``loss`` a chunk stalls for a retransmission timeout
  (``max(rto, 2 * RTT)``); with probability ``reset`` the connection is reset instead
  (both ends get ``trio.BrokenResourceError``). A receiver that does not read holds back
  its sender once ``receive_window`` bytes are buffered.
* **Partitions.** :meth:`VirtualNetwork.partition` splits hosts into groups; until
  :meth:`VirtualNetwork.heal`, connects across the cut time out. Existing streams across
  the cut either *stall* (``mode="stall"``, the default: chunks sent meanwhile are held
  and delivered after the heal, as TCP retransmissions would be; the node's own keepalive
  and idle timeouts decide whether to give up), are *reset* at once (``mode="reset"``),
  or go *silent for good* (``mode="drop"``: whatever is sent on them is lost, also after
  the heal, and no end hears a reset, as when a router that kept the connections' state,
  a NAT or a stateful firewall, restarts; new connections work after the heal).
* **Vanishing.** :meth:`VirtualNetwork.vanish` takes a host off the network silently (a
  power cut, a pulled cable): its streams are not reset but go silent (what its peers
  send is lost, nothing more arrives from it, and its end's closing, as its node is
  cancelled, reaches nobody), connects to it time out instead of being refused, and its
  mDNS announcement expires like a crashed host's. :meth:`VirtualNetwork.restore`
  brings it back; its old streams are reset then (a rebooted host answers them so).
* **Crashes.** :meth:`VirtualNetwork.crash` takes a host down abruptly: every stream of the
  host is reset, its listeners vanish (connects are refused), and its mDNS announcement
  is withdrawn only when it expires (``mdns_ttl`` later), as no goodbye is sent. The
  caller cancels the node's tasks. :meth:`VirtualNetwork.restore` brings the host back.
* **mDNS.** Hosts on the same LAN *segment* see each other's announcements at once
  (:class:`p2pfed.discovery.PeerDiscovered` both ways) and a goodbye
  (:class:`p2pfed.discovery.PeerDeparted`) when a node stops cleanly. Hosts without a
  segment, or on different segments, must rely on bootstrap addresses and peer exchange.

Randomness comes from the ``rng`` given to :class:`VirtualNetwork` only; under
deterministic scheduling (:func:`simnet.determinism.deterministic_scheduling`) its draws
happen in the same order on every run.

Example::

    net = VirtualNetwork(rng=random.Random(1))
    net.add_host("10.0.0.1")
    net.add_host("10.0.0.2")
    a, b = net.network_for("10.0.0.1"), net.network_for("10.0.0.2")
    listener = await b.listen("10.0.0.2", 7447)
    stream = await a.connect("10.0.0.2", 7447)
"""

from __future__ import annotations

import errno
import heapq
import math
import operator
import random
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Literal

import trio

from p2pfed.alarms import Alarms
from p2pfed.discovery import DiscoveryEvent, PeerDeparted, PeerDiscovered
from p2pfed.identity import NodeId
from p2pfed.network import AbstractDiscovery, Network

__all__ = [
    "LinkParams",
    "NetworkStats",
    "PartitionMode",
    "Routing",
    "SimNetwork",
    "VirtualListener",
    "VirtualNetwork",
    "VirtualStream",
    "link_from",
]

Routing = Literal["direct", "shortest-path"]
PartitionMode = Literal["stall", "reset"]
_EPHEMERAL_PORTS = range(49152, 65536)


@dataclass(frozen=True)
class LinkParams:
    """One link's behaviour (seconds, bytes per second, probabilities).

    ``bandwidth`` and ``uplink`` may be ``math.inf`` (no serialisation delay).

    >>> LinkParams(latency=0.02).rtt
    0.04
    """

    latency: float = 0.005
    """One-way delay in seconds."""
    jitter: float = 0.0
    """Extra one-way delay, uniform in [0, jitter] seconds (order is still kept)."""
    bandwidth: float = 12.5e6
    """Bytes per second of each direction of each stream (default 100 Mbit/s)."""
    loss: float = 0.0
    """Probability that a chunk stalls for a retransmission timeout."""
    reset: float = 0.0
    """Probability that sending a chunk resets the connection."""
    connect_failure: float = 0.0
    """Probability that a connection attempt is lost (it times out)."""

    def __post_init__(self) -> None:
        for name in ("latency", "jitter"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"link {name} must be a finite number >= 0 seconds, got {value!r}")
        if not (isinstance(self.bandwidth, int | float) and self.bandwidth > 0):
            raise ValueError(
                f"link bandwidth must be > 0 bytes per second (or inf), got {self.bandwidth!r}"
            )
        for name in ("loss", "reset", "connect_failure"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < 1):
                raise ValueError(f"link {name} must be a probability in [0, 1), got {value!r}")

    @property
    def rtt(self) -> float:
        """The round-trip time without jitter."""
        return 2 * self.latency


@dataclass
class NetworkStats:
    """Counters of the whole virtual network (cumulative)."""

    chunks: int = 0
    """Chunks sent (one per ``send_all``: a batch of protocol frames)."""
    bytes: int = 0
    """Bytes sent on all streams."""
    connects: int = 0
    """Successful connections."""
    connect_failures: int = 0
    """Connection attempts that raised ``OSError``."""
    resets: int = 0
    """Streams reset (by loss, a crash or a partition)."""
    stalls: int = 0
    """Chunks delayed by a retransmission timeout."""


@dataclass
class _Host:
    name: str
    segment: str | None
    uplink: float
    up: bool = True
    silent: bool = False  # vanished: connects time out instead of being refused
    busy_until: float = 0.0
    listeners: dict[int, VirtualListener] = field(default_factory=dict)
    connections: dict[int, _Connection] = field(default_factory=dict)
    next_port: int = _EPHEMERAL_PORTS.start


@dataclass
class _Announcement:
    host: str
    node_id: NodeId
    tag: str
    port: int
    send: trio.MemorySendChannel[DiscoveryEvent]
    instance: str
    withdrawn: bool = False


def _ring(pipe: _Pipe, at: float) -> None:
    """The network's alarm for ``pipe`` at ``at``: wake its waiting reader, unless the
    alarm was superseded by an earlier one or is moot (the reader went away)."""
    if at == pipe.alarm_at:
        pipe.alarm_at = math.inf
        pipe.wake_reader()


class _Pipe:
    """One direction of a connection: chunks in flight, with their arrival times."""

    def __init__(self, alarms: Alarms[_Pipe] | None = None) -> None:
        self.chunks: deque[tuple[float, bytes | None]] = deque()  # None: end of stream
        self.held: list[bytes | None] = []  # sent across a stalled partition
        self.buffered = 0
        self.busy_until = 0.0
        self.last_arrival = 0.0
        self.eof_sent = False
        self.reader_closed = False
        # The waiting reader sleeps in this scope until its first chunk arrives: a new
        # chunk moves the scope's deadline to its arrival time, so the reader wakes once,
        # at arrival (not once when the chunk is sent and again when it arrives).
        self.reader: trio.CancelScope | None = None
        # Or, when the network's alarms run (one task wakes the readers at the arrival
        # times of their chunks, see p2pfed.alarms): the waiting reader's task, parked, and
        # when its alarm rings (inf: none set)
        self.alarms = alarms
        self.waiter: trio.lowlevel.Task | None = None
        self.alarm_at = math.inf
        self.abort_wait = self._abort_wait  # made once: a bound method per wait adds up
        self.writable = trio.Event()

    def arriving(self, arrival: float) -> None:
        """A chunk will arrive at ``arrival``: make a waiting reader wake by then."""
        if self.waiter is not None:
            if arrival < self.alarm_at:
                self.set_alarm(arrival)
            return
        reader = self.reader
        if reader is not None and arrival < reader.deadline:
            reader.deadline = arrival

    def set_alarm(self, at: float) -> None:
        """Wake the waiting reader at ``at`` (its earlier alarm, if any, is dropped)."""
        assert self.alarms is not None
        self.alarm_at = at
        self.alarms.set(self, at)

    def _abort_wait(self, _: object) -> trio.lowlevel.Abort:
        self.waiter = None  # cancelled: its alarm, if any, rings for nobody
        return trio.lowlevel.Abort.SUCCEEDED

    def wake_reader(self) -> None:
        task = self.waiter
        if task is not None:
            self.waiter = None
            self.alarm_at = math.inf
            trio.lowlevel.reschedule(task)

    def wake(self) -> None:
        self.wake_reader()
        if self.reader is not None:
            self.reader.cancel()
        self.writable.set()


class _Connection:
    def __init__(
        self, network: VirtualNetwork, ident: int, client: str, server: str, link: LinkParams
    ) -> None:
        self.network = network
        self.ident = ident
        self.client = client
        self.server = server
        self.link = link
        self.broken = False
        # black-holed (a vanished host, a "drop" partition): chunks are lost, no reset
        self.silent = False
        self.up = _Pipe(network._alarms)  # client to server
        self.down = _Pipe(network._alarms)  # server to client

    def crosses(self, groups: dict[str, int]) -> bool:
        return groups.get(self.client, -1) != groups.get(self.server, -1)

    def reset(self) -> None:
        if self.broken:
            return
        self.broken = True
        self.network.stats.resets += 1
        for pipe in (self.up, self.down):
            pipe.chunks.clear()
            pipe.held.clear()
            pipe.buffered = 0
            pipe.wake()
        self.detach()

    def detach(self) -> None:
        for name in (self.client, self.server):
            host = self.network._hosts.get(name)
            if host is not None:
                host.connections.pop(self.ident, None)


class VirtualStream(trio.abc.HalfCloseableStream):
    """One end of a virtual TCP connection (see the module rules for its timing)."""

    def __init__(
        self, connection: _Connection, outgoing: _Pipe, incoming: _Pipe, local: str, remote: str
    ) -> None:
        self._connection = connection
        self._out = outgoing
        self._in = incoming
        self.local_host = local
        self.remote_host = remote
        self._closed = False
        self._sending = False
        self._receiving = False

    def _check_send(self) -> None:
        if self._closed or self._out.eof_sent:
            raise trio.ClosedResourceError("this stream end is closed for sending")
        if self._connection.broken:
            raise trio.BrokenResourceError("connection reset")
        if self._out.reader_closed and not self._connection.silent:
            # the peer closed its end: TCP answers further data with a reset
            self._connection.reset()
            raise trio.BrokenResourceError("connection reset by peer")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            # one scheduling point per chunk (the wait for the last byte to leave, or a
            # plain checkpoint), but a cancelled task never sends
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            payload = bytes(data)
            if not payload:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            network = self._connection.network
            while self._out.buffered >= network.receive_window:
                self._out.writable = trio.Event()
                await self._out.writable.wait()
                self._check_send()
            release = network._transmit(self._connection, self._out, self.local_host, payload)
            if release is None:
                raise trio.BrokenResourceError("connection reset")
            if release > trio.current_time():
                await trio.sleep_until(release)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("this stream end is closed")

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("this stream end is closed")
        if self._out.eof_sent or self._connection.broken:
            return
        self._connection.network._send_eof(self._connection, self._out)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and operator.index(max_bytes) < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            pipe = self._in
            waited = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream end is closed")
                if self._connection.broken:
                    raise trio.BrokenResourceError("connection reset by peer")
                chunks = pipe.chunks
                if chunks and chunks[0][0] <= trio.current_time():
                    if not waited:  # a receive is a checkpoint: the wait below, or this
                        await trio.lowlevel.checkpoint()
                        if self._closed or self._connection.broken:
                            continue
                    return self._take(max_bytes)
                # sleep until the first chunk arrives (deadline moved by pipe.arriving()),
                # or until woken by a close, reset or end of stream (pipe.wake())
                alarms = pipe.alarms
                if alarms is not None:
                    if chunks:
                        pipe.set_alarm(chunks[0][0])
                    pipe.waiter = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(pipe.abort_wait)
                    waited = True
                    continue
                with trio.CancelScope(deadline=chunks[0][0] if chunks else math.inf) as wait:
                    pipe.reader = wait
                    try:
                        await trio.sleep_forever()
                    finally:
                        pipe.reader = None
                waited = True
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        pipe = self._in
        now = trio.current_time()
        limit = max_bytes if max_bytes is not None else 65536
        parts: list[bytes] = []
        size = 0
        while pipe.chunks and pipe.chunks[0][0] <= now and size < limit:
            arrival, data = pipe.chunks[0]
            if data is None:
                break  # end of stream: returned (as b"") by the next call
            room = limit - size
            if len(data) > room:
                parts.append(data[:room])
                pipe.chunks[0] = (arrival, data[room:])
                size += room
                break
            parts.append(data)
            size += len(data)
            pipe.chunks.popleft()
        pipe.buffered -= size
        pipe.writable.set()
        return b"".join(parts)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            connection = self._connection
            if not connection.broken:
                if not self._out.eof_sent:
                    connection.network._send_eof(connection, self._out)
                self._in.reader_closed = True
                self._in.chunks.clear()
                self._in.buffered = 0
                if self._out.reader_closed:
                    connection.detach()  # both ends closed: the connection is gone
            self._in.wake()
            self._out.wake()
        await trio.lowlevel.checkpoint()


class VirtualListener(trio.abc.Listener[trio.abc.Stream]):
    """Accepts virtual connections on one host and port."""

    def __init__(self, network: VirtualNetwork, host: str, port: int) -> None:
        self._network = network
        self.host = host
        self.port = port
        self._send, self._receive = trio.open_memory_channel[VirtualStream](math.inf)
        self.closed = False

    def _enqueue(self, stream: VirtualStream) -> None:
        self._send.send_nowait(stream)

    async def accept(self) -> trio.abc.Stream:
        if self.closed:
            raise trio.ClosedResourceError("listener is closed")
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener is closed") from None

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            host = self._network._hosts.get(self.host)
            if host is not None and host.listeners.get(self.port) is self:
                del host.listeners[self.port]
            self._send.close()
            while True:
                try:
                    pending = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                pending._connection.reset()
        await trio.lowlevel.checkpoint()


class _SimDiscovery(AbstractDiscovery):
    def __init__(
        self, network: VirtualNetwork, host: str, node_id: NodeId, tag: str, port: int
    ) -> None:
        self._network = network
        self._host = host
        self._node_id = node_id
        self._tag = tag
        self._port = port

    @asynccontextmanager
    async def events(self) -> AsyncIterator[trio.abc.ReceiveChannel[DiscoveryEvent]]:
        send, receive = trio.open_memory_channel[DiscoveryEvent](math.inf)
        announcement = self._network._announce(
            self._host, self._node_id, self._tag, self._port, send
        )
        try:
            async with receive:
                yield receive
        finally:
            self._network._withdraw(announcement)


class SimNetwork(Network):
    """The network as seen from one host of a :class:`VirtualNetwork`."""

    def __init__(self, world: VirtualNetwork, host: str) -> None:
        self.world = world
        self.host = host

    async def listen(self, host: str, port: int) -> trio.abc.Listener[trio.abc.Stream]:
        await trio.lowlevel.checkpoint()
        if host not in ("", "0.0.0.0", "::", self.host):
            raise OSError(errno.EADDRNOTAVAIL, f"{host} is not an address of host {self.host}")
        return self.world._listen(self.host, port)

    def listen_port(self, listener: trio.abc.Listener[trio.abc.Stream]) -> int:
        assert isinstance(listener, VirtualListener)
        return listener.port

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        return await self.world._connect(self.host, host, port)

    def peer_host(self, stream: trio.abc.Stream) -> str | None:
        return stream.remote_host if isinstance(stream, VirtualStream) else None

    def discover(self, own_id: NodeId, federation_tag: str, port: int) -> AbstractDiscovery:
        return _SimDiscovery(self.world, self.host, own_id, federation_tag, port)


class VirtualNetwork:
    """The simulated world: hosts, the links between them, partitions and crashes.

    ``rng`` drives jitter, loss and resets. Timers that outlive a call (the expiry of a
    crashed node's mDNS announcement) need a nursery: call :meth:`start` with one.
    """

    def __init__(
        self,
        *,
        rng: random.Random,
        default_link: LinkParams | None = None,
        routing: Routing = "direct",
        connect_timeout: float = 5.0,
        rto: float = 0.2,
        receive_window: int = 4 << 20,
        send_buffer: int = 64 << 10,
        mdns_ttl: float = 120.0,
    ) -> None:
        if routing not in ("direct", "shortest-path"):
            raise ValueError(f'routing must be "direct" or "shortest-path", got {routing!r}')
        self.rng = rng
        self.default_link = default_link or LinkParams()
        self.routing: Routing = routing
        self.connect_timeout = connect_timeout
        self.rto = rto
        self.receive_window = receive_window
        if send_buffer < 0:
            raise ValueError(f"send_buffer must be >= 0 bytes, got {send_buffer!r}")
        self.send_buffer = send_buffer
        self.mdns_ttl = mdns_ttl
        self.stats = NetworkStats()
        self._hosts: dict[str, _Host] = {}
        self._edges: dict[str, dict[str, LinkParams]] | None = None  # None: complete
        self._routes: dict[str, dict[str, LinkParams]] = {}
        self._groups: dict[str, int] | None = None
        self._partition_mode: PartitionMode = "stall"
        self._announcements: dict[str | None, list[_Announcement]] = {}
        self._next_connection = 0
        self._nursery: trio.Nursery | None = None
        self._alarms: Alarms[_Pipe] | None = None

    # -- building the world --------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Give the network a nursery for its timers (mDNS expiry, and the alarms that wake
        readers when their chunks arrive on connections made from now on)."""
        self._nursery = nursery
        if self._alarms is None:
            self._alarms = Alarms(nursery, _ring)

    def add_host(self, name: str, *, segment: str | None = None, uplink: float = math.inf) -> None:
        """Add a host (an opaque address string) on an optional mDNS LAN ``segment``.

        ``uplink`` (bytes per second) is shared by all the host's outgoing streams.
        """
        if name in self._hosts:
            raise ValueError(f"host {name!r} already exists")
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"a host name must be non-empty without spaces, got {name!r}")
        if not uplink > 0:
            raise ValueError(f"uplink must be > 0 bytes per second, got {uplink!r}")
        self._hosts[name] = _Host(name, segment, uplink)

    def add_link(self, a: str, b: str, params: LinkParams | None = None) -> None:
        """Link hosts ``a`` and ``b`` (both directions). The first link switches the
        network from "everyone reaches everyone" to "only along links"."""
        for name in (a, b):
            if name not in self._hosts:
                raise ValueError(f"cannot link unknown host {name!r}: add_host it first")
        if a == b:
            raise ValueError(f"a link needs two different hosts, got {a!r} twice")
        if self._edges is None:
            self._edges = {}
        link = params or self.default_link
        self._edges.setdefault(a, {})[b] = link
        self._edges.setdefault(b, {})[a] = link
        self._routes.clear()

    def network_for(self, host: str) -> SimNetwork:
        """The :class:`p2pfed.network.Network` a node on ``host`` uses."""
        if host not in self._hosts:
            raise ValueError(f"unknown host {host!r}")
        return SimNetwork(self, host)

    @property
    def hosts(self) -> list[str]:
        return list(self._hosts)

    def is_up(self, host: str) -> bool:
        return self._hosts[host].up

    # -- faults --------------------------------------------------------------------------

    def partition(self, groups: Sequence[Iterable[str]], mode: PartitionMode = "stall") -> None:
        """Split the network: hosts in different ``groups`` cannot reach each other.

        Hosts in no group form one more group together. See the module rules for
        ``mode``. A new partition replaces the current one.
        """
        if mode not in ("stall", "reset", "drop"):
            raise ValueError(f'partition mode must be "stall", "reset" or "drop", got {mode!r}')
        assignment: dict[str, int] = {}
        for index, group in enumerate(groups):
            for host in group:
                if host not in self._hosts:
                    raise ValueError(f"partition names unknown host {host!r}")
                if host in assignment:
                    raise ValueError(f"host {host!r} is in two partition groups")
                assignment[host] = index
        self._groups = {host: assignment.get(host, len(groups)) for host in self._hosts}
        self._partition_mode = mode
        if mode in ("reset", "drop"):
            for connection in self._all_connections():
                if connection.crosses(self._groups):
                    if mode == "reset":
                        connection.reset()
                    else:
                        connection.silent = True

    def heal(self) -> None:
        """End the partition; stalled chunks leave now and arrive a link latency later."""
        groups = self._groups
        self._groups = None
        if groups is None:
            return
        now = trio.current_time()
        for connection in self._all_connections():
            for pipe in (connection.up, connection.down):
                held, pipe.held = pipe.held, []
                for data in held:
                    self._deliver(connection, pipe, data, now)
                pipe.wake()

    def crash(self, host: str) -> None:
        """Take ``host`` down abruptly (see the module rules); cancel its node yourself."""
        record = self._hosts[host]
        record.up = False
        for connection in list(record.connections.values()):
            connection.reset()
        for listener in list(record.listeners.values()):
            listener.closed = True  # its accept() keeps waiting until the node is cancelled
        record.listeners.clear()
        for announcement in self._announcements.get(record.segment, []):
            if announcement.host == host and not announcement.withdrawn:
                self._expire_later(announcement)

    def vanish(self, host: str) -> None:
        """Take ``host`` off the network silently (see the module rules); cancel its node
        yourself: nothing of its shutdown reaches the network."""
        record = self._hosts[host]
        record.up = False
        record.silent = True
        for connection in record.connections.values():
            connection.silent = True
        for listener in list(record.listeners.values()):
            listener.closed = True
        record.listeners.clear()
        for announcement in self._announcements.get(record.segment, []):
            if announcement.host == host and not announcement.withdrawn:
                self._expire_later(announcement)

    def halt(self) -> None:
        """Reset every connection at once: the quick end of a run cut short (a benchmark's
        wall-clock limit), where closing tens of thousands of channels in order would cost
        more than the run's last minutes."""
        for connection in self._all_connections():
            connection.reset()

    def restore(self, host: str) -> None:
        """Bring a crashed or vanished host back up (its node is started again by the
        caller). A vanished host's old streams are reset: it no longer knows them."""
        record = self._hosts[host]
        record.up = True
        if record.silent:
            record.silent = False
            for connection in list(record.connections.values()):
                connection.reset()

    def reachable(self, a: str, b: str) -> bool:
        """Whether ``a`` can connect to ``b`` now (topology and partition)."""
        return self._route(a, b) is not None and not self._separated(a, b)

    # -- internals: routing --------------------------------------------------------------

    def _separated(self, a: str, b: str) -> bool:
        return self._groups is not None and self._groups.get(a) != self._groups.get(b)

    def _route(self, a: str, b: str) -> LinkParams | None:
        if a == b or self._edges is None:
            return self.default_link
        if self.routing == "direct":
            return self._edges.get(a, {}).get(b)
        routes = self._routes.get(a)
        if routes is None:
            routes = self._routes[a] = self._shortest_paths(a)
        return routes.get(b)

    def _shortest_paths(self, source: str) -> dict[str, LinkParams]:
        """Dijkstra by latency from ``source``, combining link parameters along paths."""
        assert self._edges is not None
        best: dict[str, LinkParams] = {source: LinkParams(latency=0.0, bandwidth=math.inf)}
        done: dict[str, None] = {}
        order = {name: i for i, name in enumerate(self._hosts)}  # deterministic tie-break
        heap: list[tuple[float, int, str]] = [(0.0, order[source], source)]
        while heap:
            _, _, here = heapq.heappop(heap)
            if here in done:
                continue
            done[here] = None
            path = best[here]
            for there, link in self._edges.get(here, {}).items():
                if there in done:
                    continue
                combined = LinkParams(
                    latency=path.latency + link.latency,
                    jitter=path.jitter + link.jitter,
                    bandwidth=min(path.bandwidth, link.bandwidth),
                    loss=1 - (1 - path.loss) * (1 - link.loss),
                    reset=1 - (1 - path.reset) * (1 - link.reset),
                    connect_failure=1 - (1 - path.connect_failure) * (1 - link.connect_failure),
                )
                known = best.get(there)
                if known is None or combined.latency < known.latency:
                    best[there] = combined
                    heapq.heappush(heap, (combined.latency, order[there], there))
        del best[source]
        return best

    def _all_connections(self) -> list[_Connection]:
        seen: dict[int, _Connection] = {}
        for host in self._hosts.values():
            for ident, connection in host.connections.items():
                seen.setdefault(ident, connection)
        return [seen[ident] for ident in sorted(seen)]

    # -- internals: connections ----------------------------------------------------------

    def _listen(self, host: str, port: int) -> VirtualListener:
        record = self._hosts[host]
        if not record.up:
            raise OSError(errno.ENETDOWN, f"host {host} is down")
        if port == 0:
            while record.next_port in record.listeners:
                record.next_port += 1
            port = record.next_port
            record.next_port += 1
        if port in record.listeners:
            raise OSError(errno.EADDRINUSE, f"{host}:{port} is already in use")
        listener = VirtualListener(self, host, port)
        record.listeners[port] = listener
        return listener

    async def _connect(self, source: str, host: str, port: int) -> VirtualStream:
        await trio.lowlevel.checkpoint()
        try:
            return await self._try_connect(source, host, port)
        except OSError:
            self.stats.connect_failures += 1
            raise

    async def _try_connect(self, source: str, host: str, port: int) -> VirtualStream:
        if not self._hosts[source].up:
            raise OSError(errno.ENETDOWN, f"host {source} is down")
        link = self._route(source, host) if host in self._hosts else None
        lost = (
            link is not None and link.connect_failure and self.rng.random() < link.connect_failure
        )
        silent = host in self._hosts and self._hosts[host].silent
        if link is None or lost or silent or self._separated(source, host):
            await trio.sleep(self.connect_timeout)
            raise OSError(errno.ETIMEDOUT, f"connecting to {host}:{port} timed out")
        await trio.sleep(link.rtt)
        target = self._hosts[host]
        if target.silent:  # vanished while the SYN was on its way
            await trio.sleep(max(0.0, self.connect_timeout - link.rtt))
            raise OSError(errno.ETIMEDOUT, f"connecting to {host}:{port} timed out")
        listener = target.listeners.get(port)
        if not target.up or listener is None or listener.closed:
            raise OSError(errno.ECONNREFUSED, f"connection to {host}:{port} refused")
        if self._separated(source, host) or not self._hosts[source].up:
            raise OSError(errno.ETIMEDOUT, f"connecting to {host}:{port} timed out")
        ident = self._next_connection
        self._next_connection += 1
        connection = _Connection(self, ident, source, host, link)
        self._hosts[source].connections[ident] = connection
        target.connections[ident] = connection
        client = VirtualStream(connection, connection.up, connection.down, source, host)
        server = VirtualStream(connection, connection.down, connection.up, host, source)
        listener._enqueue(server)
        self.stats.connects += 1
        return client

    def _transmit(
        self, connection: _Connection, pipe: _Pipe, sender: str, data: bytes
    ) -> float | None:
        """Queue ``data`` on ``pipe``; return when the sender may go on: when at most
        ``send_buffer`` bytes are left to serialise (None: the connection was reset)."""
        link = connection.link
        if not connection.silent and link.reset and self.rng.random() < link.reset:
            connection.reset()
            return None
        now = trio.current_time()
        host = self._hosts[sender]
        start = max(now, pipe.busy_until, host.busy_until if host.uplink < math.inf else now)
        rate = min(link.bandwidth, host.uplink)
        end = start + (len(data) / rate if rate < math.inf else 0.0)
        pipe.busy_until = end
        if host.uplink < math.inf:
            host.busy_until = end
        self.stats.chunks += 1
        self.stats.bytes += len(data)
        pipe.buffered += len(data)  # a silent pipe's: never acknowledged, they fill the window
        if connection.silent:
            pass  # lost
        elif self._groups is not None and connection.crosses(self._groups):
            if self._partition_mode == "drop":
                connection.silent = True
            else:
                pipe.held.append(data)
        else:
            self._deliver(connection, pipe, data, end)
        if rate < math.inf and self.send_buffer:
            return end - self.send_buffer / rate
        return end

    def _deliver(
        self, connection: _Connection, pipe: _Pipe, data: bytes | None, sent: float
    ) -> None:
        link = connection.link
        arrival = sent + link.latency
        if link.jitter:
            arrival += self.rng.uniform(0.0, link.jitter)
        if data is not None and link.loss and self.rng.random() < link.loss:
            self.stats.stalls += 1
            arrival += max(self.rto, 2 * link.rtt)
        arrival = max(arrival, pipe.last_arrival)
        pipe.last_arrival = arrival
        pipe.chunks.append((arrival, data))
        pipe.arriving(arrival)

    def _send_eof(self, connection: _Connection, pipe: _Pipe) -> None:
        pipe.eof_sent = True
        if connection.silent:
            return
        if self._groups is not None and connection.crosses(self._groups):
            pipe.held.append(None)
        else:
            self._deliver(connection, pipe, None, max(trio.current_time(), pipe.busy_until))

    # -- internals: mDNS -----------------------------------------------------------------

    def _announce(
        self,
        host: str,
        node_id: NodeId,
        tag: str,
        port: int,
        send: trio.MemorySendChannel[DiscoveryEvent],
    ) -> _Announcement:
        segment = self._hosts[host].segment
        instance = f"{node_id.short}._p2pfed._tcp.local."
        announcement = _Announcement(host, node_id, tag, port, send, instance)
        if segment is None:
            return announcement  # no LAN: nobody hears it
        peers = self._announcements.setdefault(segment, [])
        for other in peers:
            if other.withdrawn or other.tag != tag:
                continue
            self._notify(other, PeerDiscovered(node_id, host, port, instance))
            self._notify(
                announcement, PeerDiscovered(other.node_id, other.host, other.port, other.instance)
            )
        peers.append(announcement)
        return announcement

    def _withdraw(self, announcement: _Announcement) -> None:
        """The browser closed: a goodbye if the host is up, else expiry after the TTL."""
        announcement.send.close()
        if not self._hosts[announcement.host].up:
            return  # crash(): the announcement expires on its own
        self._remove(announcement)

    def _expire_later(self, announcement: _Announcement) -> None:
        if self._nursery is None:
            self._remove(announcement)
            return

        async def expire() -> None:
            await trio.sleep(self.mdns_ttl)
            self._remove(announcement)

        self._nursery.start_soon(expire)

    def _remove(self, announcement: _Announcement) -> None:
        if announcement.withdrawn:
            return
        announcement.withdrawn = True
        segment = self._hosts[announcement.host].segment
        peers = self._announcements.get(segment, [])
        if announcement in peers:
            peers.remove(announcement)
        if any(other.node_id == announcement.node_id for other in peers):
            return  # restarted meanwhile: its fresh announcement refreshed the records
        for other in peers:
            if other.tag == announcement.tag:
                self._notify(other, PeerDeparted(announcement.node_id, announcement.instance))

    @staticmethod
    def _notify(announcement: _Announcement, event: DiscoveryEvent) -> None:
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            announcement.send.send_nowait(event)


def link_from(params: dict[str, float], base: LinkParams) -> LinkParams:
    """``base`` with the fields named in ``params`` (already in seconds and bytes/s)."""
    values = {name: getattr(base, name) for name in LinkParams.__dataclass_fields__}
    for name, value in params.items():
        if name not in values:
            raise ValueError(f"unknown link parameter {name!r} (known: {', '.join(values)})")
        values[name] = value
    return LinkParams(**values)
