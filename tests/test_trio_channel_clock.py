"""The secure channel's clocks and flow control, over in-memory streams in virtual time.

What these tests check is protocol logic (keepalives, idle and handshake timeouts, send
timeouts, back-pressure, one receiver at a time), not the kernel's sockets: so the peers
talk through trio's in-memory streams and every timeout runs on trio's MockClock, which
jumps ahead whenever every task waits. Real crypto and the real listener loop
(``serve_secure_channels``) still run; tests/test_trio_channel.py covers real TCP.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import trio
import trio.testing

from p2pfed.channel import ChannelConnection, Role
from p2pfed.errors import ChannelClosed, CloseCode
from p2pfed.federation import Federation
from p2pfed.identity import NodeIdentity
from p2pfed.messages import ModelState
from p2pfed.trio_channel import (
    ChannelClock,
    ChannelConfig,
    HandshakeAdmission,
    SecureChannel,
    open_secure_channel,
    serve_secure_channels,
)

FED = Federation.new("clock-test")
SERVER_ID = NodeIdentity.generate()
SERVER_CONFIG = ChannelConfig(
    max_message_size=8 << 20, handshake_timeout=2.0, keepalive_interval=0.2, idle_timeout=1.5
)


def model(size: int, round_: int = 1) -> ModelState:
    return ModelState(round=round_, fingerprint=bytes(32), parameters=os.urandom(size))


class _Pipe:
    """One direction of a connection: a buffer of ``capacity`` bytes, like a socket's.

    trio.testing's memory streams either buffer without limit (memory_stream_pair) or not
    at all (lockstep_stream_pair, which also cannot take a send after a cancelled one), so
    neither shows back-pressure the way TCP does.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data = bytearray()
        self.writer_closed = False
        self.reader_closed = False
        self.changed = trio.lowlevel.ParkingLot()


class _PipeSend(trio.abc.SendStream):
    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        pipe = self._pipe
        await trio.lowlevel.checkpoint()
        view = memoryview(data)
        while True:
            if pipe.writer_closed:
                raise trio.ClosedResourceError
            if pipe.reader_closed:
                raise trio.BrokenResourceError
            if not view:
                return
            room = pipe.capacity - len(pipe.data)
            if room == 0:
                await pipe.changed.park()
                continue
            pipe.data += view[:room]
            view = view[room:]
            pipe.changed.unpark_all()

    async def wait_send_all_might_not_block(self) -> None:
        while len(self._pipe.data) >= self._pipe.capacity and not self._pipe.reader_closed:
            await self._pipe.changed.park()

    async def aclose(self) -> None:
        self._pipe.writer_closed = True
        self._pipe.changed.unpark_all()
        await trio.lowlevel.checkpoint()


class _PipeReceive(trio.abc.ReceiveStream):
    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        pipe = self._pipe
        await trio.lowlevel.checkpoint()
        while not pipe.data and not pipe.writer_closed:
            if pipe.reader_closed:
                raise trio.ClosedResourceError
            await pipe.changed.park()
        if pipe.reader_closed:
            raise trio.ClosedResourceError
        count = len(pipe.data) if max_bytes is None else min(max_bytes, len(pipe.data))
        chunk = bytes(pipe.data[:count])
        del pipe.data[:count]
        pipe.changed.unpark_all()
        return chunk

    async def aclose(self) -> None:
        self._pipe.reader_closed = True
        self._pipe.changed.unpark_all()
        await trio.lowlevel.checkpoint()


def stream_pair(capacity: int = 64 << 10) -> tuple[trio.StapledStream, trio.StapledStream]:
    """Two connected in-memory streams, each direction buffering ``capacity`` bytes."""
    there, back = _Pipe(capacity), _Pipe(capacity)
    return (
        trio.StapledStream(_PipeSend(there), _PipeReceive(back)),
        trio.StapledStream(_PipeSend(back), _PipeReceive(there)),
    )


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are in-memory stream pairs made by :meth:`connect`."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)

    def connect(self) -> trio.abc.Stream:
        """The client end of a new connection."""
        client, server = stream_pair()
        self._send.send_nowait(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()


class Server:
    """A listener serving ``handler``; each handler run is recorded in ``outcomes``."""

    def __init__(self, listener: MemoryListener) -> None:
        self.listener = listener
        self.outcomes: list[str | BaseException] = []
        self.ended = trio.Event()

    async def echo(self, channel: SecureChannel) -> None:
        try:
            async for message in channel:
                await channel.send(message)
        except BaseException as exc:
            self.outcomes.append(exc)
            raise
        else:
            self.outcomes.append("ended")
        finally:
            self.ended.set()


async def start_server(
    nursery: trio.Nursery,
    handler: str = "echo",
    config: ChannelConfig = SERVER_CONFIG,
    clock: ChannelClock | None = None,
) -> Server:
    listener = MemoryListener()
    server = Server(listener)

    async def lazy(channel: SecureChannel) -> None:
        await trio.sleep_forever()  # never reads

    chosen = server.echo if handler == "echo" else lazy
    serve = functools.partial(
        serve_secure_channels,
        chosen,
        [listener],  # type: ignore[list-item]  # any trio Listener serves
        SERVER_ID,
        FED,
        config,
        clock=clock,
    )
    await nursery.start(serve)
    return server


async def assert_still_serving(server: Server) -> None:
    stream = server.listener.connect()
    async with open_secure_channel(stream, Role.INITIATOR, NodeIdentity.generate(), FED) as ch:
        assert ch.peer_id == SERVER_ID.node_id
        sent = model(1000)
        await ch.send(sent)
        assert await ch.receive() == sent


async def test_orderly_close_ends_the_peers_iteration(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    stream = server.listener.connect()
    async with open_secure_channel(stream, Role.INITIATOR, NodeIdentity.generate(), FED) as ch:
        await ch.send(model(8))
        await ch.receive()
    with trio.fail_after(10):  # virtual seconds: the handler's end, not a guess at a delay
        await server.ended.wait()
    # the server's `async for` ended by itself, without an error
    assert server.outcomes == ["ended"]


async def test_keepalive_holds_an_idle_channel_open(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    stream = server.listener.connect()
    config = ChannelConfig(keepalive_interval=0.2, idle_timeout=1.5)
    async with open_secure_channel(
        stream, Role.INITIATOR, NodeIdentity.generate(), FED, config
    ) as ch:
        start = trio.current_time()
        await trio.sleep(30.0)  # 20 times the server's idle timeout, with no messages
        assert trio.current_time() - start >= 30.0
        sent = model(16)
        await ch.send(sent)
        assert await ch.receive() == sent
    with trio.fail_after(10):
        await server.ended.wait()
    assert server.outcomes == ["ended"]


async def test_silent_peer_is_dropped_after_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    stream = server.listener.connect()
    # never sends keepalives on its own (interval far beyond the server's idle timeout)
    quiet = ChannelConfig(keepalive_interval=100.0, idle_timeout=200.0)
    async with open_secure_channel(
        stream, Role.INITIATOR, NodeIdentity.generate(), FED, quiet
    ) as ch:
        start = trio.current_time()
        with pytest.raises(ChannelClosed) as info, trio.fail_after(10):
            await ch.receive()
        assert info.value.by_peer
        assert info.value.code is CloseCode.IDLE_TIMEOUT
        # dropped by the server's idle timeout (1.5 s), not by anything later
        assert 1.5 <= trio.current_time() - start < 100.0
    await assert_still_serving(server)


async def test_silent_client_hits_the_handshake_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    stream = server.listener.connect()
    start = trio.current_time()
    with trio.fail_after(10):
        assert await stream.receive_some(100) == b""
    assert trio.current_time() - start == pytest.approx(SERVER_CONFIG.handshake_timeout)
    await assert_still_serving(server)


async def test_truncated_length_prefix_then_silence_is_dropped_at_the_handshake_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    stream = server.listener.connect()
    start = trio.current_time()
    await stream.send_all(b"\x00")
    with trio.fail_after(10):
        while await stream.receive_some(65536):
            pass
    assert trio.current_time() - start == pytest.approx(SERVER_CONFIG.handshake_timeout)
    await assert_still_serving(server)


async def test_handshake_slower_than_the_timeout_is_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that completes each step, but too slowly, loses the connection."""
    server = await start_server(nursery)
    conn = ChannelConnection(
        Role.INITIATOR,
        identity=NodeIdentity.generate(),
        federation_id=FED.federation_id,
        psk=FED.secret,
    )
    conn.start()
    stream = server.listener.connect()
    await stream.send_all(conn.data_to_send())
    conn.receive_data(await stream.receive_some(65536))  # the server's reply
    await trio.sleep(SERVER_CONFIG.handshake_timeout + 0.1)
    assert not conn.is_open
    with trio.fail_after(10):
        assert await stream.receive_some(65536) == b""  # hung up, nothing more said
    await assert_still_serving(server)


async def test_slow_reader_pushes_back_on_the_sender(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A receiver that stops reading stalls the sender instead of growing buffers."""
    server = await start_server(nursery, handler="lazy")
    stream = server.listener.connect()
    sent = 0
    config = ChannelConfig(send_timeout=60.0, keepalive_interval=0.2, idle_timeout=100.0)
    async with open_secure_channel(
        stream, Role.INITIATOR, NodeIdentity.generate(), FED, config
    ) as ch:
        with trio.move_on_after(30.0):
            for _ in range(1000):
                await ch.send(model(1 << 20))
                sent += 1
        # nothing reads and nothing buffers in between: not even one whole MiB got out
        assert sent == 0


async def test_send_timeout_closes_a_stalled_channel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, handler="lazy")
    stream = server.listener.connect()
    config = ChannelConfig(send_timeout=0.5, keepalive_interval=0.2, idle_timeout=10.0)
    async with open_secure_channel(
        stream, Role.INITIATOR, NodeIdentity.generate(), FED, config
    ) as ch:
        start = trio.current_time()
        with pytest.raises(ChannelClosed) as info, trio.fail_after(30):
            await ch.send(model(1 << 20))
        assert info.value.code is CloseCode.IDLE_TIMEOUT
        assert trio.current_time() - start == pytest.approx(config.send_timeout)


async def test_second_receiver_is_refused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    stream = server.listener.connect()
    async with (
        open_secure_channel(stream, Role.INITIATOR, NodeIdentity.generate(), FED) as ch,
        trio.open_nursery() as inner,
    ):
        inner.start_soon(ch.receive)
        await trio.testing.wait_all_tasks_blocked()  # the first receiver is waiting now
        with pytest.raises(trio.BusyResourceError):
            await ch.receive()
        inner.cancel_scope.cancel()


# -- one clock for many channels (ChannelClock, as a node's channel pool uses) ------------


async def test_shared_clocks_keep_many_idle_channels_open(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The clients keep their channels' time in one task: without its keepalives, the
    server's idle timeout (1.5 s) would drop every channel within the 30 s."""
    server = await start_server(nursery)
    config = ChannelConfig(keepalive_interval=0.2, idle_timeout=1.5)
    clients = ChannelClock(nursery)
    async with (
        open_secure_channel(
            server.listener.connect(),
            Role.INITIATOR,
            NodeIdentity.generate(),
            FED,
            config,
            clock=clients,
        ) as first,
        open_secure_channel(
            server.listener.connect(),
            Role.INITIATOR,
            NodeIdentity.generate(),
            FED,
            config,
            clock=clients,
        ) as second,
    ):
        await trio.sleep(30.0)
        for ch in (first, second):
            sent = model(16)
            await ch.send(sent)
            assert await ch.receive() == sent
    with trio.fail_after(10):
        await server.ended.wait()
    assert server.outcomes[:2] == ["ended", "ended"]


async def test_shared_clock_drops_a_silent_peer_after_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, clock=ChannelClock(nursery))
    quiet = ChannelConfig(keepalive_interval=100.0, idle_timeout=200.0)
    async with open_secure_channel(
        server.listener.connect(), Role.INITIATOR, NodeIdentity.generate(), FED, quiet
    ) as ch:
        start = trio.current_time()
        with pytest.raises(ChannelClosed) as info, trio.fail_after(10):
            await ch.receive()
        assert info.value.by_peer
        assert info.value.code is CloseCode.IDLE_TIMEOUT
        assert 1.5 <= trio.current_time() - start < 100.0
    await assert_still_serving(server)


async def test_shared_clock_closes_a_stalled_send(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, handler="lazy")
    config = ChannelConfig(send_timeout=0.5, keepalive_interval=0.2, idle_timeout=10.0)
    async with open_secure_channel(
        server.listener.connect(),
        Role.INITIATOR,
        NodeIdentity.generate(),
        FED,
        config,
        clock=ChannelClock(nursery),
    ) as ch:
        start = trio.current_time()
        with pytest.raises(ChannelClosed) as info, trio.fail_after(30):
            await ch.send(model(1 << 20))
        assert info.value.code is CloseCode.IDLE_TIMEOUT
        assert trio.current_time() - start == pytest.approx(config.send_timeout)


async def test_an_abandoned_channel_ends_without_a_close(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """abandon(): no Close goes out (the peer sees the connection end unannounced), and
    the channel refuses to send."""
    server = await start_server(nursery)
    async with open_secure_channel(
        server.listener.connect(), Role.INITIATOR, NodeIdentity.generate(), FED
    ) as ch:
        await ch.send(model(8))
        await ch.receive()
        ch.abandon("halted")
        with pytest.raises(ChannelClosed):
            await ch.send(model(8))
    with trio.fail_after(10):
        await server.ended.wait()
    (outcome,) = server.outcomes
    assert isinstance(outcome, ChannelClosed) and not outcome.orderly


async def test_serving_cancelled_closes_the_connections_it_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """serve_secure_channels closes every stream itself (it does not use
    trio.serve_listeners, which closed each stream again after its handler): a connection
    in its handshake and one waiting for a handshake slot are closed when serving ends."""
    listener = MemoryListener()

    async def never(channel: SecureChannel) -> None:
        raise AssertionError("no connection completes a handshake here")

    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_secure_channels,
            never,
            [listener],  # type: ignore[list-item]
            SERVER_ID,
            FED,
            SERVER_CONFIG,
            admission=HandshakeAdmission(max_handshakes=1),
        )
        await nursery.start(serve)
        handshaking, waiting = listener.connect(), listener.connect()  # both silent
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    for client in (handshaking, waiting):
        with trio.fail_after(1):
            assert await client.receive_some(100) == b""  # the server hung up
