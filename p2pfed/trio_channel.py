"""The secure channel over any trio stream: handshake, messages, keepalive, close.

This is the thin driver around :class:`p2pfed.channel.ChannelConnection`: it moves bytes
between a :class:`trio.abc.Stream` and the sans-IO core and owns the clocks (handshake
timeout, keepalive interval, idle timeout, send timeout). Reading is pull-based: bytes are
read from the stream only while someone waits in :meth:`SecureChannel.receive`, so a slow
consumer pushes back on the peer through TCP flow control and memory stays bounded by one
read plus one message under reassembly.

Example::

    async with open_secure_channel(stream, Role.INITIATOR, identity, federation) as channel:
        await channel.send(ModelState(round=1, fingerprint=fp, parameters=blob))
        reply = await channel.receive()

and on the accepting side :func:`serve_secure_channels` runs a handler per peer, logging
and dropping peers that fail the handshake or break the protocol while it keeps serving
the others.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Literal

import trio

from p2pfed.alarms import Alarms
from p2pfed.channel import (
    ChannelConnection,
    ConnectionClosed,
    Event,
    HandshakeComplete,
    MessageReceived,
    ReassemblyBudget,
    Role,
    StaticKey,
)
from p2pfed.errors import ChannelClosed, CloseCode, HandshakeError, RemoteProtocolError
from p2pfed.federation import Federation
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.logs import ThrottledLog
from p2pfed.messages import Message

__all__ = [
    "ChannelClock",
    "ChannelConfig",
    "HandshakeAdmission",
    "SecureChannel",
    "SharedBudget",
    "open_secure_channel",
    "serve_secure_channels",
]

log = logging.getLogger("p2pfed.channel")

_Due = Literal["idle", "send", "keepalive"]
"""What a channel's clocks ask for now (:meth:`SecureChannel._clock_due`)."""


@dataclass(frozen=True)
class ChannelConfig:
    """Limits and clocks of a secure channel (seconds and bytes)."""

    max_message_size: int = 256 * 1024 * 1024
    handshake_timeout: float = 10.0
    keepalive_interval: float = 1.0
    idle_timeout: float = 15.0
    send_timeout: float = 60.0
    read_size: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.idle_timeout <= self.keepalive_interval:
            raise ValueError(
                f"idle_timeout ({self.idle_timeout}s) must exceed keepalive_interval "
                f"({self.keepalive_interval}s), or healthy peers would be dropped"
            )
        for name in ("handshake_timeout", "keepalive_interval", "send_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class SharedBudget(ReassemblyBudget):
    """A :class:`~p2pfed.channel.ReassemblyBudget` that channels can wait on."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._event = trio.Event()

    def _released(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_released(self) -> None:
        """Return when some channel gave bytes back."""
        await self._event.wait()


class SecureChannel:
    """An open, authenticated, encrypted message channel to one peer.

    Obtain one from :func:`open_secure_channel` or :func:`serve_secure_channels`. Only one
    task may receive at a time; any number may send (messages never interleave).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: ChannelConnection,
        config: ChannelConfig,
        peer: HandshakeComplete,
        pending: deque[Event],
        budget: SharedBudget | None = None,
    ) -> None:
        self._stream = stream
        self._budget = budget
        self._conn = connection
        self._config = config
        self._pending = pending
        self._send_lock = trio.StrictFIFOLock()
        self._receiving = False
        self._closed: ChannelClosed | None = None
        self._stream_closed = False
        self._last_send = trio.current_time()
        self.last_received = self._last_send  # when bytes last arrived (trio's clock)
        # The clocks of the channel live in a ChannelClock (the node's, or one of its
        # own), not in a cancel scope around every read and send: a scope per message was
        # a large share of a big simulation's time. A read or send in progress records
        # when it began; the clock closes the channel when one has waited too long.
        self._read_since: float | None = None
        self._send_since: float | None = None
        # the ChannelClock keeping this channel: when it looks at the channel next (inf:
        # not scheduled), and the scope of what it is doing for the channel now
        self._shared: ChannelClock | None = None
        self._clock_at = math.inf
        self._clock_action: trio.CancelScope | None = None
        self.peer_id: NodeId = peer.peer_id
        self.peer_identity_key: bytes = peer.peer_identity_key
        self.version: int = peer.version
        self.peer_max_message_size: int = peer.peer_max_message_size
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"<SecureChannel peer={self.peer_id.short} v{self.version}>"

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def stream(self) -> trio.abc.Stream:
        """The underlying stream (for its addresses; never read or write it directly)."""
        return self._stream

    # -- sending ---------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send one message; returns once it is handed to the stream.

        Raises :class:`~p2pfed.errors.ChannelClosed` if the channel is (or becomes) closed,
        including when the peer stops reading for longer than the send timeout.
        """
        await self.send_many((message,))

    async def send_many(self, messages: Sequence[Message]) -> None:
        """Send ``messages`` in order, small ones packed together into as few Noise
        messages and stream writes as possible (spec/transport.md allows several frames in
        one Noise message). Same errors as :meth:`send`."""
        self._raise_if_closed()
        lock = self._send_lock
        try:
            # the writer task is nearly always the only sender: taking the free lock needs
            # no schedule point of its own (the stream's send_all is one)
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            self._raise_if_closed()
            self._send_started(trio.current_time())
            try:
                for batch in self._conn.send_messages_batches(messages):
                    await self._stream.send_all(batch)
                    self.bytes_sent += len(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                # (after a send timeout the clock task closed the stream: _closed says so)
                await self._abort(CloseCode.PROTOCOL_ERROR, f"send failed: {exc!r}")
            finally:
                self._send_since = None
            self._last_send = trio.current_time()
        finally:
            lock.release()
        self._raise_if_closed()

    def _send_started(self, now: float) -> None:
        self._send_since = now
        self._wake_clock(now + self._config.send_timeout)

    def _wake_clock(self, deadline: float) -> None:
        """Make the clock look again by ``deadline`` (a new wait began)."""
        shared = self._shared
        if shared is None or self.closed or self._clock_action is not None:
            return  # (while the clock acts for this channel it looks again when done)
        if deadline < self._clock_at:
            shared.schedule(self, deadline)

    async def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data:
            await self._stream.send_all(data)
            self.bytes_sent += len(data)
            self._last_send = trio.current_time()

    def _clock_due(self, now: float) -> float | _Due:
        """What the clocks ask for at ``now``, else the time to look again (asked by the
        channel's :class:`ChannelClock`): ``"keepalive"`` when nothing was sent for
        ``keepalive_interval`` seconds; ``"idle"`` (close with ``IDLE_TIMEOUT``, sending a
        Close first) when a receive waited ``idle_timeout`` seconds without data; ``"send"``
        when a send waited ``send_timeout`` seconds for the peer to accept data."""
        config = self._config
        interval = config.keepalive_interval
        read_since, send_since = self._read_since, self._send_since
        if read_since is not None and now >= read_since + config.idle_timeout:
            return "idle"
        if send_since is not None and now >= send_since + config.send_timeout:
            return "send"
        # a send in progress is traffic: the keepalive is due an interval after it
        # (comparing with the deadline slept to: (t + i) - t < i can hold in floats,
        # and under a virtual clock that would spin forever at one instant)
        keepalive_at = now + interval if send_since is not None else self._last_send + interval
        if now >= keepalive_at:
            return "keepalive"
        deadline = keepalive_at
        if read_since is not None:
            deadline = min(deadline, read_since + config.idle_timeout)
        if send_since is not None:
            deadline = min(deadline, send_since + config.send_timeout)
        return deadline

    async def _send_keepalive(self) -> None:
        async with self._send_lock:
            if (
                self.closed
                or trio.current_time() < self._last_send + self._config.keepalive_interval
            ):
                return  # closed, or a message went out while we waited for the lock
            self._conn.send_keepalive()
            try:
                with trio.fail_after(self._config.send_timeout):
                    await self._flush()
            except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                await self._abort(CloseCode.IDLE_TIMEOUT, f"keepalive failed: {exc!r}")
            # even if the core had nothing to send (the peer's Close arrived and is not read
            # yet): the next attempt is an interval away, never at this same instant
            self._last_send = trio.current_time()

    async def _expire_receive(self) -> None:
        """A receive waited ``idle_timeout``: tell the peer why, then hang up. The waiting
        reader sees the stream closed and raises the recorded ChannelClosed."""
        reason = f"nothing received for {self._config.idle_timeout}s"
        log.info("closing channel to %s: %s", self.peer_id.short, reason)
        self._closed = ChannelClosed(CloseCode.IDLE_TIMEOUT, reason, by_peer=False)
        self._conn.close(CloseCode.IDLE_TIMEOUT, reason)
        await self._try_flush()
        # nothing is unread (the reader was waiting all along), so closing cannot make the
        # kernel reset the connection and destroy the Close
        with trio.move_on_after(1.0):
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                if isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
        await self._close_stream()

    async def _expire_send(self) -> None:
        """A send waited ``send_timeout``: the peer stopped reading. Drop the connection;
        the blocked sender sees the stream closed and raises the recorded ChannelClosed."""
        await self._abort(
            CloseCode.IDLE_TIMEOUT, f"peer did not accept data for {self._config.send_timeout}s"
        )

    # -- receiving -------------------------------------------------------------------------

    async def receive(self) -> Message:
        """Wait for the next message from the peer.

        Raises :class:`~p2pfed.errors.ChannelClosed` when the channel ends: an orderly
        close by either side (``code`` is ``NORMAL``), a protocol violation by the peer (we
        sent it a Close with the reason), the idle timeout, or a lost connection.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this channel")
        self._receiving = True
        try:
            while True:
                while self._pending:
                    event = self._pending.popleft()
                    if isinstance(event, MessageReceived):
                        return event.message
                    if isinstance(event, ConnectionClosed):
                        code = event.close_code
                        if code is None:  # a code from a later version: treat as an error
                            code = CloseCode.PROTOCOL_ERROR
                        self._closed = ChannelClosed(code, event.reason, by_peer=True)
                        await self._close_stream()
                self._raise_if_closed()
                await self._read_more()
        finally:
            self._receiving = False

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        """Messages until the channel closes in order; abnormal ends still raise."""
        while True:
            try:
                yield await self.receive()
            except ChannelClosed as exc:
                if exc.orderly:
                    return
                raise

    async def _read_more(self) -> None:
        budget = self._budget
        if budget is not None and not self._conn.may_receive():
            await self._wait_for_budget(budget)
            if self.closed:
                return
        # the clock task enforces the idle timeout (see __init__); a new read starts the
        # clock's idle deadline no earlier than before, so it needs no wake-up
        self._read_since = trio.current_time()
        try:
            data = await self._stream.receive_some(self._config.read_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # (after an idle timeout the clock task closed the stream: _closed says so)
            await self._abort(CloseCode.PROTOCOL_ERROR, f"connection lost: {exc!r}")
            return
        finally:
            self._read_since = None
        if not data:
            await self._abort(CloseCode.PROTOCOL_ERROR, "connection closed without a Close message")
            return
        self.bytes_received += len(data)
        self.last_received = trio.current_time()
        try:
            self._pending.extend(self._conn.receive_data(data))
        except RemoteProtocolError as exc:
            log.warning("closing channel to %s: %s", self.peer_id.short, exc)
            await self._abort(exc.code, str(exc), send_close=True)

    async def _wait_for_budget(self, budget: SharedBudget) -> None:
        """The node's reassembly memory is full and this channel holds part of a large
        frame: stop reading (TCP pushes back on the peer) until another channel gives
        bytes back. A channel that cannot go on within the idle timeout is closed, which
        frees its part: memory stays bounded even if every holder stalls."""
        with trio.move_on_after(self._config.idle_timeout):
            while not self._conn.may_receive():
                await budget.wait_released()
            return
        reason = (
            f"the node's memory for messages under reassembly ({budget.limit} bytes) stayed "
            f"full for {self._config.idle_timeout}s"
        )
        log.info("closing channel to %s: %s", self.peer_id.short, reason)
        self._conn.close(CloseCode.IDLE_TIMEOUT, reason)
        await self._abort(CloseCode.IDLE_TIMEOUT, reason, send_close=True)

    # -- closing ---------------------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self._closed is not None:
            raise self._closed

    async def _close_stream(self) -> None:
        """Close the stream forcefully, once: a channel that ended with an error closes it
        then and again when its block ends, and a halted simulation has tens of thousands
        of channels, each second close a cancel scope and a ``Cancelled`` unwound."""
        if self._stream_closed:
            return
        self._stream_closed = True
        await trio.aclose_forcefully(self._stream)

    async def _try_flush(self, timeout: float = 1.0) -> bool:
        """Best effort: deliver what the core queued (a Close), waiting at most ``timeout``.
        False if the connection is gone (nothing more can reach the peer)."""
        with trio.move_on_after(timeout):
            try:
                async with self._send_lock:
                    await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return False
        return True

    async def _linger(self, timeout: float = 1.0, limit: int = 16 << 20) -> None:
        """Half-close and discard what the peer still sends, so our Close is not lost.

        Closing a TCP socket with unread data makes the kernel send a reset, which can
        destroy the Close we just sent before the peer reads it. Like HTTP servers, we shut
        down our sending side and drain (bounded in time and bytes) until the peer hangs up.
        """
        with trio.move_on_after(timeout):
            try:
                if isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
                while limit > 0:
                    data = await self._stream.receive_some(65536)
                    if not data:
                        break
                    limit -= len(data)
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.BusyResourceError,
                OSError,
            ):
                pass

    async def _abort(self, code: CloseCode, reason: str, *, send_close: bool = False) -> None:
        """Record why the channel ended and drop the connection (best-effort final Close)."""
        if self._closed is None:
            self._closed = ChannelClosed(code, reason, by_peer=False)
        self._conn.discard_buffers()
        if send_close:
            await self._try_flush()
            await self._linger()
        await self._close_stream()

    def abandon(self, reason: str = "abandoned", *, stream_reset: bool = False) -> None:
        """Give the channel up without a goodbye: its connection is gone, or about to be
        (a whole simulated network halted at once). A later :meth:`aclose` then only
        closes the stream, and sends and receives raise ``ChannelClosed``.

        ``stream_reset``: the caller resets the connection itself (simnet's network
        halt), so the channel never closes its stream: a forceful close per channel end
        (a cancel scope and a ``Cancelled`` each) was a third of a halted simulation's
        unwinding, for streams that were dead already."""
        if self._closed is None:
            self._closed = ChannelClosed(CloseCode.SHUTTING_DOWN, reason, by_peer=False)
        if stream_reset:
            self._stream_closed = True
        self._conn.discard_buffers()

    async def _close_at_exit(self) -> None:
        """The end of :func:`open_secure_channel`'s block: close in order, shielded from
        cancellation, unless the stream is closed already (the peer's Close, an error, an
        abandoned channel): then nothing is left to send or wait for, and a shielded scope
        per channel was much of the time a halted simulation took to unwind."""
        if self._stream_closed:
            self.abandon()  # (closed already: this only frees the buffers)
            return
        with trio.CancelScope(shield=True):
            await self.aclose()

    async def aclose(self, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the channel in order: send a Close message, then close the stream."""
        if self._closed is None:
            self._closed = ChannelClosed(code, reason or "closed", by_peer=False)
            self._conn.close(code, reason)
            # a connection already lost (reset, or closed under us) has no Close to protect:
            # lingering would only wait on a dead stream (thousands of them when a whole
            # simulated network is halted)
            if await self._try_flush() and not self._receiving:
                await self._linger()
        self._conn.discard_buffers()
        await self._close_stream()


async def _handshake(
    stream: trio.abc.Stream,
    role: Role,
    identity: NodeIdentity,
    federation: Federation,
    config: ChannelConfig,
    randbytes: Callable[[int], bytes],
    static_key: StaticKey | None = None,
    budget: SharedBudget | None = None,
    timeout: float | None = None,
) -> SecureChannel:
    """The handshake on ``stream``, within ``timeout`` (else the configured one)."""
    if timeout is None:
        timeout = config.handshake_timeout
    conn = ChannelConnection(
        role,
        identity=identity,
        federation_id=federation.federation_id,
        psk=federation.secret,
        max_message_size=config.max_message_size,
        noise_static=static_key,
        randbytes=randbytes,
        budget=budget,
    )
    conn.start()
    pending: deque[Event] = deque()
    try:
        with trio.fail_after(timeout):
            while True:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)
                while pending:
                    event = pending.popleft()
                    if isinstance(event, HandshakeComplete):
                        return SecureChannel(stream, conn, config, event, pending, budget)
                    if isinstance(event, ConnectionClosed):
                        raise HandshakeError(f"peer refused the channel: {event.reason}")
                received = await stream.receive_some(config.read_size)
                if not received:
                    raise HandshakeError(
                        "peer closed the connection during the handshake (wrong federation "
                        "secret, or not a p2pfed node?)"
                    )
                pending.extend(conn.receive_data(received))
    except trio.TooSlowError:
        raise HandshakeError(f"handshake did not complete within {timeout}s") from None
    except RemoteProtocolError:
        # the core queued a Close if it could; tell the peer why before hanging up
        with trio.move_on_after(1.0):
            try:
                data = conn.data_to_send()
                if data:
                    await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        raise
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise HandshakeError(f"connection failed during the handshake: {exc!r}") from exc


@asynccontextmanager
async def open_secure_channel(
    stream: trio.abc.Stream,
    role: Role,
    identity: NodeIdentity,
    federation: Federation,
    config: ChannelConfig | None = None,
    *,
    randbytes: Callable[[int], bytes] = os.urandom,
    static_key: StaticKey | None = None,
    budget: SharedBudget | None = None,
    clock: ChannelClock | None = None,
) -> AsyncIterator[SecureChannel]:
    """Run the handshake on ``stream`` and yield the open channel.

    ``static_key``: this node's Noise static key, made once and reused (a fresh one per
    channel if omitted). ``budget``: the node's reassembly memory, shared by its channels.
    ``clock``: the node's :class:`ChannelClock`, which keeps the time of all its channels
    (a clock of the channel's own if omitted).

    The keepalive runs in the background while the block runs; leaving the block closes
    the channel in order. Raises :class:`~p2pfed.errors.HandshakeError` (or another
    :class:`~p2pfed.errors.RemoteProtocolError`) if the handshake fails; the stream is then
    closed.
    """
    config = config or ChannelConfig()
    try:
        channel = await _handshake(
            stream, role, identity, federation, config, randbytes, static_key, budget
        )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    async with _running(channel, clock):
        yield channel


class ChannelClock:
    """The clocks of many channels (a node's) in one task instead of a task per channel.

    Each channel is looked at when its next deadline comes (a keepalive due, a read or a
    send waiting too long, see :meth:`SecureChannel._clock_due`); a keepalive or a
    timeout runs as a task of its own in ``nursery``, so a slow peer holds up no other
    channel. The clock's own task starts in ``nursery`` with the first channel; nothing
    else changes for a channel, but a node with hundreds of channels keeps one sleeping
    task instead of hundreds (each with its cancel scope and nursery to set up and unwind).
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._alarms: Alarms[SecureChannel] = Alarms(nursery, self._ring)

    def watch(self, channel: SecureChannel) -> None:
        """Keep ``channel``'s clocks from now until :meth:`forget`."""
        channel._shared = self
        self._look(channel, trio.current_time())

    def forget(self, channel: SecureChannel) -> None:
        """Stop keeping ``channel``'s clocks (it is closing); a keepalive or timeout in
        progress is cancelled, as the channel's own clock task would be."""
        channel._shared = None
        channel._clock_at = math.inf  # its entry in the heap is dropped when it comes up
        if channel._clock_action is not None:
            channel._clock_action.cancel()

    def schedule(self, channel: SecureChannel, at: float) -> None:
        """Look at ``channel`` again at ``at`` (its earlier entry, if any, is dropped)."""
        channel._clock_at = at
        self._alarms.set(channel, at)

    def _ring(self, channel: SecureChannel, at: float) -> None:
        if at == channel._clock_at:  # else: superseded, or the channel forgotten
            channel._clock_at = math.inf
            self._look(channel, trio.current_time())

    def _look(self, channel: SecureChannel, now: float) -> None:
        if channel.closed or channel._shared is not self:
            return
        due = channel._clock_due(now)
        if isinstance(due, float):
            self.schedule(channel, due)
        else:
            # busy from now (not from when the task starts): no second action meanwhile
            channel._clock_at = math.inf
            channel._clock_action = trio.CancelScope()
            self._nursery.start_soon(self._act, channel, due, channel._clock_action)

    async def _act(self, channel: SecureChannel, due: _Due, scope: trio.CancelScope) -> None:
        with scope:
            try:
                if due == "idle":
                    await channel._expire_receive()
                    return
                if due == "send":
                    await channel._expire_send()
                    return
                await channel._send_keepalive()
            finally:
                channel._clock_action = None
        if not scope.cancelled_caught:
            self._look(channel, trio.current_time())


@asynccontextmanager
async def _running(
    channel: SecureChannel, clock: ChannelClock | None = None
) -> AsyncIterator[None]:
    """Run the clocks of an open channel while the block runs; then close it in order."""
    if clock is not None:
        clock.watch(channel)
        try:
            yield
        finally:
            clock.forget(channel)
            await channel._close_at_exit()
        return
    # No node's clock: one for this channel alone. The caller's exception is carried out
    # of the clock's nursery by hand so that it arrives as itself, not wrapped in an
    # ExceptionGroup.
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            own = ChannelClock(nursery)
            own.watch(channel)
            try:
                yield
            except BaseException as exc:
                body_error = exc
            finally:
                own.forget(channel)
                nursery.cancel_scope.cancel()
    finally:
        await channel._close_at_exit()
    if body_error is not None:
        raise body_error


MAX_HANDSHAKES = 64
"""Default: connections whose handshake may run at once (the rest wait for a slot)."""
MAX_HANDSHAKES_PER_SOURCE = 8
"""Default: handshakes from one source address that may run at once."""
MAX_WAITING_PER_SOURCE = 32
"""Default: unauthenticated connections from one source that may wait for a slot; a
connection beyond that is closed at once (spec/transport.md, section 8)."""


@functools.lru_cache(maxsize=16384)
def source_key(host: str | None) -> str | None:
    """The source an unauthenticated connection is counted against: its IPv4 address, or
    the /64 of its IPv6 address (one host usually owns a whole /64, so counting single
    IPv6 addresses would let it open unlimited connections). None: not limited."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class HandshakeAdmission:
    """Who may handshake now: at most ``max_handshakes`` at once, ``per_source`` of them
    from one source, and ``waiting_per_source`` more from that source waiting in line.

    A slowloris (connections that never send) or a connect storm from one address then
    occupies at most ``per_source`` slots, each for at most the handshake deadline, and
    everything it opens beyond ``per_source + waiting_per_source`` is closed on arrival;
    other addresses keep their slots. Waiting for a slot counts against the connection's
    handshake deadline, so nothing waits forever.
    """

    def __init__(
        self,
        max_handshakes: int = MAX_HANDSHAKES,
        per_source: int = MAX_HANDSHAKES_PER_SOURCE,
        waiting_per_source: int = MAX_WAITING_PER_SOURCE,
    ) -> None:
        self._slots = trio.CapacityLimiter(max_handshakes)
        self._per_source = per_source
        self._waiting_per_source = waiting_per_source
        self._present: dict[str, int] = {}  # source -> connections waiting or handshaking
        self._sources: dict[str, trio.CapacityLimiter] = {}
        self.rejected = 0  # connections closed on arrival (source over its limits)
        self.expired = 0  # connections whose deadline passed while waiting for a slot

    def present(self, source: str) -> int:
        """Unauthenticated connections from ``source`` now (waiting or handshaking)."""
        return self._present.get(source, 0)

    def admit(self, source: str | None) -> bool:
        """Count a new connection from ``source``; False: close it now (over the limit)."""
        if source is None:
            return True
        count = self._present.get(source, 0)
        if count >= self._per_source + self._waiting_per_source:
            self.rejected += 1
            return False
        self._present[source] = count + 1
        return True

    def leave(self, source: str | None) -> None:
        """The connection counted by :meth:`admit` authenticated or ended."""
        if source is None:
            return
        count = self._present.get(source, 0) - 1
        if count <= 0:
            self._present.pop(source, None)
            self._sources.pop(source, None)
        else:
            self._present[source] = count

    async def acquire(self, source: str | None, token: object) -> None:
        """Wait for a handshake slot (and one of the source's) for ``token``."""
        limiter = None
        if source is not None:
            limiter = self._sources.get(source)
            if limiter is None:
                limiter = self._sources[source] = trio.CapacityLimiter(self._per_source)
            await limiter.acquire_on_behalf_of(token)
        try:
            await self._slots.acquire_on_behalf_of(token)
        except BaseException:
            if limiter is not None:
                limiter.release_on_behalf_of(token)
            raise

    def release(self, source: str | None, token: object) -> None:
        """Give back the slots :meth:`acquire` took for ``token``."""
        self._slots.release_on_behalf_of(token)
        limiter = self._sources.get(source) if source is not None else None
        if limiter is not None:
            limiter.release_on_behalf_of(token)


async def serve_secure_channels(
    handler: Callable[[SecureChannel], Awaitable[None]],
    listeners: list[trio.SocketListener],
    identity: NodeIdentity,
    federation: Federation,
    config: ChannelConfig | None = None,
    *,
    max_connections: int | float = math.inf,
    admission: HandshakeAdmission | None = None,
    source_of: Callable[[trio.abc.Stream], str | None] | None = None,
    randbytes: Callable[[int], bytes] = os.urandom,
    static_key: StaticKey | None = None,
    budget: SharedBudget | None = None,
    clock: ChannelClock | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept peers forever, running ``handler(channel)`` for each one that authenticates.

    A peer that fails the handshake or breaks the protocol is logged with the reason
    (throttled per source address) and dropped; an exception escaping ``handler`` is logged
    too. Neither stops the listener. At most ``max_connections`` authenticated peers are
    served at once. Before that, every connection must finish its handshake within
    ``config.handshake_timeout`` of being accepted, time spent waiting for a handshake slot
    included, and ``admission`` limits handshakes in all and per source address
    (``source_of(stream)``, the remote address by default). ``clock``: the node's
    :class:`ChannelClock` for the channels' keepalives and timeouts (else a task each).
    """
    config = config or ChannelConfig()
    limiter = trio.CapacityLimiter(max_connections)
    admission = admission or HandshakeAdmission()
    source_of = source_of or _remote_host
    warnings = ThrottledLog(log)

    async def serve_one(stream: trio.abc.Stream) -> None:
        # Every path of handle_one closes the stream but a cancellation before the
        # channel owns it. (trio.serve_listeners closed every stream again after its
        # handler: at a simulated network's halt, a cancel scope and a Cancelled per
        # inbound channel for a stream closed already.)
        try:
            await handle_one(stream)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def handle_one(stream: trio.abc.Stream) -> None:
        peer = _describe(stream)
        source = source_key(source_of(stream))
        who = source or peer
        if not admission.admit(source):
            warnings.warning(
                who,
                "refused a connection from %s: too many unauthenticated connections from that "
                "address",
                peer,
            )
            await trio.aclose_forcefully(stream)
            return
        deadline = trio.current_time() + config.handshake_timeout
        token = object()
        stage = "a handshake slot"
        holding: list[str] = []  # what to give back: "handshake", "connection"
        try:
            # the waits for a handshake slot and for a connection slot count against the
            # handshake deadline: a connection never queues forever
            with trio.move_on_at(deadline):
                await admission.acquire(source, token)
                holding.append("handshake")
                stage = "a connection slot"
                await limiter.acquire_on_behalf_of(token)
                holding.append("connection")
                stage = ""
            if stage:
                admission.expired += 1
                warnings.warning(
                    who,
                    "dropped peer %s: no free %s within the %gs handshake deadline",
                    peer,
                    stage,
                    config.handshake_timeout,
                )
                await trio.aclose_forcefully(stream)
                return
            remaining = max(deadline - trio.current_time(), 1e-3)
            try:
                channel = await _handshake(
                    stream,
                    Role.RESPONDER,
                    identity,
                    federation,
                    config,
                    randbytes,
                    static_key,
                    budget,
                    timeout=remaining,
                )
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            finally:
                holding.remove("handshake")
                admission.release(source, token)
                admission.leave(source)
                source = None  # counted out already
            async with _running(channel, clock):
                log.debug("channel open with %s at %s", channel.peer_id.short, peer)
                await handler(channel)
        except HandshakeError as exc:
            warnings.warning(who, "dropped peer %s: %s", peer, exc)
        except RemoteProtocolError as exc:
            log.warning("dropped peer %s: %s", peer, exc)
        except ChannelClosed as exc:
            if not exc.orderly:
                log.info("channel with %s ended: %s", peer, exc)
        except Exception:
            log.exception("handler for peer %s failed", peer)
        finally:
            if "handshake" in holding:
                admission.release(source, token)
            if "connection" in holding:
                limiter.release_on_behalf_of(token)
            admission.leave(source)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, nursery, serve_one)
        task_status.started(listeners)


_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""accept() errors that mean the system is overloaded for now (as trio.serve_listeners)."""


async def _accept_loop(
    listener: trio.abc.Listener[trio.abc.Stream],
    nursery: trio.Nursery,
    serve_one: Callable[[trio.abc.Stream], Awaitable[None]],
) -> None:
    """``trio.serve_listeners``' loop for one listener, without its close of each stream
    after the handler (``serve_one`` closes every stream itself)."""
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed (%s); retrying in 0.1 s", exc, exc_info=True)
                await trio.sleep(0.1)
            else:
                nursery.start_soon(serve_one, stream)


def _remote_host(stream: trio.abc.Stream) -> str | None:
    try:
        return str(stream.socket.getpeername()[0])  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None


def _describe(stream: trio.abc.Stream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return "<stream>"
    return f"{host}:{port}"
