"""The secure channel over real loopback TCP: good peers, bad peers, limits and clocks.

Every misbehaving peer here speaks to a real listener through a real socket; after each
one the same listener must still serve a well-behaved client. The channel's clocks and
flow control (keepalive, idle, handshake and send timeouts, back-pressure) are tested in
virtual time over in-memory streams in tests/test_trio_channel_clock.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable

import pytest
import trio

from p2pfed.channel import ChannelConnection, Role
from p2pfed.errors import ChannelClosed, CloseCode, HandshakeError
from p2pfed.federation import Federation
from p2pfed.identity import NodeIdentity
from p2pfed.messages import Close, HandshakePayload, ModelState, decode_message
from p2pfed.trio_channel import (
    ChannelConfig,
    SecureChannel,
    open_secure_channel,
    serve_secure_channels,
)

FED = Federation.new("tcp-test")
SERVER_ID = NodeIdentity.generate()


def model(size: int, round_: int = 1) -> ModelState:
    return ModelState(round=round_, fingerprint=bytes(32), parameters=os.urandom(size))


async def echo(channel: SecureChannel) -> None:
    async for message in channel:
        await channel.send(message)


class Server:
    def __init__(self, port: int, received: list[ChannelClosed]) -> None:
        self.port = port
        self.ended = received

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    ended: list[ChannelClosed] = []

    async def handler(channel: SecureChannel) -> None:
        try:
            await echo(channel)
        except ChannelClosed as exc:
            ended.append(exc)
            raise

    # generous clocks: they are tested in virtual time (test_trio_channel_clock.py); here a
    # client starved of CPU on a loaded machine must not trip them
    config = ChannelConfig(
        max_message_size=8 << 20, handshake_timeout=30.0, keepalive_interval=1.0, idle_timeout=60.0
    )
    await nursery.start(serve_secure_channels, handler, listeners, SERVER_ID, FED, config)
    yield Server(listeners[0].socket.getsockname()[1], ended)


async def assert_still_serving(server: Server) -> None:
    stream = await server.connect()
    async with open_secure_channel(stream, Role.INITIATOR, NodeIdentity.generate(), FED) as ch:
        assert ch.peer_id == SERVER_ID.node_id
        sent = model(1000)
        await ch.send(sent)
        assert await ch.receive() == sent


async def test_round_trip_of_small_and_large_messages(server: Server) -> None:
    stream = await server.connect()
    client = NodeIdentity.generate()
    async with open_secure_channel(stream, Role.INITIATOR, client, FED) as channel:
        assert channel.peer_id == SERVER_ID.node_id
        assert channel.version == 2  # the highest version both speak
        for size in (0, 4, 65516, 6_000_000):
            sent = model(size)
            await channel.send(sent)
            assert await channel.receive() == sent


async def test_wrong_federation_secret_never_completes(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="p2pfed.channel")
    impostor = Federation(name=FED.name, federation_id=FED.federation_id, secret=os.urandom(32))
    stream = await server.connect()
    with pytest.raises(HandshakeError):
        async with open_secure_channel(stream, Role.INITIATOR, NodeIdentity.generate(), impostor):
            pytest.fail("a peer without the federation secret opened a channel")
    await assert_still_serving(server)
    assert any("failed authentication" in r.getMessage() for r in caplog.records)


async def test_other_federation_never_completes(server: Server) -> None:
    stream = await server.connect()
    with pytest.raises(HandshakeError):
        async with open_secure_channel(
            stream, Role.INITIATOR, NodeIdentity.generate(), Federation.new("other")
        ):
            pytest.fail("nodes of different federations completed a handshake")
    await assert_still_serving(server)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x20" + b"\x07" * 32,  # a well-framed message 1 of the wrong length
        os.urandom(5000),
    ],
    ids=["http", "wrong-length", "random"],
)
async def test_garbage_peer_is_dropped_and_listener_survives(
    server: Server, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="p2pfed.channel")
    stream = await server.connect()
    await stream.send_all(garbage)
    with trio.fail_after(5):
        while await stream.receive_some(65536):
            pass  # the server hangs up; anything it sent before is irrelevant
    await assert_still_serving(server)
    assert any("dropped peer" in r.getMessage() for r in caplog.records)


async def test_truncated_handshake_is_dropped(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="p2pfed.channel")
    conn = ChannelConnection(
        Role.INITIATOR,
        identity=NodeIdentity.generate(),
        federation_id=FED.federation_id,
        psk=FED.secret,
    )
    conn.start()
    stream = await server.connect()
    first = conn.data_to_send()
    await stream.send_all(first[: len(first) // 2])
    await stream.aclose()
    with trio.fail_after(5):
        while not any("dropped peer" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.01)
    await assert_still_serving(server)


async def _raw_client(server: Server, conn: ChannelConnection) -> trio.SocketStream:
    """Drive a (possibly doctored) client core through the handshake over real TCP."""
    stream = await server.connect()
    conn.start()
    with trio.fail_after(5):
        while not conn.is_open:
            await stream.send_all(conn.data_to_send())
            data = await stream.receive_some(65536)
            if not data:
                break
            conn.receive_data(data)
    return stream


async def _read_close(stream: trio.SocketStream, conn: ChannelConnection) -> Close | None:
    """Read until the server hangs up; return the Close it sent, if any."""
    closes = []
    with trio.fail_after(5):
        while data := await stream.receive_some(65536):
            for event in conn.receive_data(data):
                closes.append(event)
    return closes[-1] if closes else None  # type: ignore[return-value]


def _client(identity: NodeIdentity | None = None) -> ChannelConnection:
    return ChannelConnection(
        Role.INITIATOR,
        identity=identity or NodeIdentity.generate(),
        federation_id=FED.federation_id,
        psk=FED.secret,
        max_message_size=1 << 30,
    )


async def test_bad_identity_signature_is_dropped(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="p2pfed.channel")
    conn = _client()
    honest: Callable = conn._own_payload

    def forged(handshake):  # type: ignore[no-untyped-def]
        good = HandshakePayload.decode(honest(handshake))
        other = NodeIdentity.generate()  # signs with a key that is not the one presented
        return HandshakePayload(
            identity_key=good.identity_key,
            signature=other.sign(b"p2pfed-noise-static-key:v1\x00" + handshake.local_static_public),
            versions=good.versions,
            max_message_size=good.max_message_size,
        ).encode()

    conn._own_payload = forged  # type: ignore[method-assign]
    stream = await _raw_client(server, conn)
    assert not conn.is_open
    await stream.aclose()
    with trio.fail_after(5):
        while not any("signature" in r.getMessage() for r in caplog.records):
            await trio.sleep(0.01)
    await assert_still_serving(server)


async def test_frame_over_the_limit_is_refused_with_close(server: Server) -> None:
    conn = _client()
    stream = await _raw_client(server, conn)
    assert conn.is_open and conn.peer_max_message_size == 8 << 20
    conn.peer_max_message_size = 1 << 30  # ignore the limit the server announced
    batches = conn.send_message_batches(model(9 << 20))
    await stream.send_all(next(batches))  # the first batch carries the length header
    closed = await _read_close(stream, conn)
    assert closed is not None and closed.close_code is CloseCode.MESSAGE_TOO_LARGE  # type: ignore[attr-defined]
    await assert_still_serving(server)


async def test_invalid_cbor_is_refused_with_close(server: Server) -> None:
    conn = _client()
    stream = await _raw_client(server, conn)
    conn._queue_frame(b"\xbf\x00\x01\xff")  # indefinite map
    await stream.send_all(conn.data_to_send())
    closed = await _read_close(stream, conn)
    assert closed is not None and closed.close_code is CloseCode.MALFORMED_MESSAGE  # type: ignore[attr-defined]
    await assert_still_serving(server)


async def test_wrong_message_type_is_refused_with_close(server: Server) -> None:
    conn = _client()
    stream = await _raw_client(server, conn)
    conn._queue_frame(b"\xa1\x00\x18\x63")  # {0: 99}
    await stream.send_all(conn.data_to_send())
    closed = await _read_close(stream, conn)
    assert closed is not None and closed.close_code is CloseCode.MALFORMED_MESSAGE  # type: ignore[attr-defined]
    with pytest.raises(Exception):  # noqa: B017 - the body is not a message we know
        decode_message(b"\xa1\x00\x18\x63")
    await assert_still_serving(server)


async def test_concurrent_senders_never_interleave(server: Server) -> None:
    stream = await server.connect()
    async with open_secure_channel(stream, Role.INITIATOR, NodeIdentity.generate(), FED) as ch:
        messages = [model(300_000 + i * 4, round_=i) for i in range(6)]
        received = []

        async def receive_all() -> None:
            for _ in messages:
                received.append(await ch.receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_all)  # reads while sending, or the echo would stall
            for message in messages:
                nursery.start_soon(ch.send, message)
        assert sorted(received, key=lambda m: m.round) == messages  # type: ignore[attr-defined]
