"""Fuzz target: the channel after a genuine handshake: Noise transport messages, frame
reassembly and message dispatch (:class:`p2pfed.channel.ChannelConnection`,
spec/transport.md sections 5-8).

The node under test (either role, with a 1 MiB message limit and a reassembly budget)
completes a real handshake with a :class:`fuzz._peer.RawPeer`; an initiator maybe never
gets its Welcome. Then the input is a program of steps: frame-stream bytes the peer
encrypts (so any framing, split anywhere, reaches the reassembler), valid messages split
across transport messages, large frame headers with part of their body, raw unencrypted
bytes, replayed or flipped ciphertexts, and local calls (keepalive, send, close).

Contract checked after every step:

* :meth:`~p2pfed.channel.ChannelConnection.receive_data` raises nothing but
  :class:`~p2pfed.errors.RemoteProtocolError`; afterwards the connection is closed,
  yields no events, holds no frame and has given its budget back, and what it sent
  decrypts to a Close carrying the error's code;
* every :class:`~p2pfed.channel.MessageReceived` holds a message that re-encodes to
  what the peer framed, in order;
* memory: a frame under reassembly never holds more body bytes than the peer sent, and
  the reassembly budget accounts exactly for it.

Run: ``python -m fuzz.channel_frames -atheris_runs=20000``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fuzz._peer import MAX_MESSAGE_SIZE, RawPeer, frame, handshake_with, node, wire
from fuzz._support import Reader, run
from p2pfed.channel import (
    SUPPORTED_VERSIONS,
    ConnectionClosed,
    HandshakeComplete,
    MessageReceived,
    ReassemblyBudget,
    Role,
    State,
)
from p2pfed.encoding import DecodeLimits
from p2pfed.errors import DecodeError, RemoteProtocolError
from p2pfed.messages import (
    Close,
    Keepalive,
    ModelRequest,
    Welcome,
    decode_message,
    encode_message,
)

TARGET = "channel_frames"
_VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "messages.json"
MESSAGES = [
    bytes.fromhex(v["cbor"])
    for v in json.loads(_VECTORS.read_text())["valid"]
    if v.get("class") != "HandshakePayload"
]
"""Valid encodings of every message type (spec/vectors/messages.json)."""
MAX_STEPS = 64


class Model:
    """A reference for what the channel must make of authentic frame-stream bytes: a
    reassembler written from spec/transport.md alone, predicting the events in order,
    or that the channel must fail."""

    def __init__(self, welcomed: bool, role: Role) -> None:
        self.buffer = b""
        self.awaiting_welcome = not welcomed
        self.role = role
        self.closed = False
        self.failed = False

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Events the channel must give for ``data``: ``("message", encoding)``,
        ``("closed", encoding)`` or ``("welcome", b"version/peer size limit")``; sets
        :attr:`failed`."""
        events: list[tuple[str, bytes]] = []
        if self.closed or self.failed:
            return events
        self.buffer += data
        while len(self.buffer) >= 4 and not (self.closed or self.failed):
            length = int.from_bytes(self.buffer[:4], "big")
            if length == 0 or length > MAX_MESSAGE_SIZE:
                self.failed = True
                break
            if len(self.buffer) < 4 + length:
                break
            body, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
            try:
                message = decode_message(body, DecodeLimits(max_bytes=MAX_MESSAGE_SIZE))
            except DecodeError:
                self.failed = True
                break
            if self.awaiting_welcome:
                if isinstance(message, Welcome) and message.version in SUPPORTED_VERSIONS:
                    self.awaiting_welcome = False
                    # the handshake payload announced MAX_MESSAGE_SIZE: the smaller counts
                    size = min(MAX_MESSAGE_SIZE, message.max_message_size)
                    events.append(("welcome", f"{message.version}/{size}".encode()))
                elif isinstance(message, Close):
                    self.closed = True
                    events.append(("closed", body))
                else:
                    self.failed = True
            elif isinstance(message, Welcome):
                self.failed = True
            elif isinstance(message, Close):
                self.closed = True
                events.append(("closed", body))
            elif not isinstance(message, Keepalive):
                events.append(("message", body))
        return events


class Session:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        role = Role.RESPONDER if reader.byte() & 1 else Role.INITIATOR
        self.budget = ReassemblyBudget(256 * 1024)
        self.conn = node(role)
        self.conn._budget = self.budget  # node() builds it without one
        other = Role.INITIATOR if role is Role.RESPONDER else Role.RESPONDER
        self.peer = RawPeer(other)
        welcome = reader.below(8) != 0
        sent = handshake_with(self.conn, self.peer, welcome=welcome)
        if sent:
            self.peer.decrypt_all(sent)
        assert self.conn.is_open or not welcome
        self.model = Model(welcome or role is Role.RESPONDER, role)
        self.failed: RemoteProtocolError | None = None
        self.locally_closed = False
        self.desynced = False  # unauthenticated bytes went in: nothing more may arrive
        self.fed = 0  # body and header bytes the channel was given, as plaintext
        self.last_ciphertext = b""

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Give wire bytes to the node in fuzz-chosen pieces; the events, as the model
        writes them."""
        reader = self.reader
        position = 0
        events: list[tuple[str, bytes]] = []
        while position < len(data):
            step = len(data) - position if reader.below(4) == 0 else reader.u16() + 1
            events += self._receive(data[position : position + step])
            position += step
        return events

    def _receive(self, piece: bytes) -> list[tuple[str, bytes]]:
        conn = self.conn
        if conn.state is State.CLOSED:
            assert conn.receive_data(piece) == [], "a closed channel produced events"
            return []
        try:
            events = conn.receive_data(piece)
        except RemoteProtocolError as exc:
            self.failed = exc
            self._check_failed()
            return []
        seen: list[tuple[str, bytes]] = []
        for event in events:
            if isinstance(event, MessageReceived):
                seen.append(("message", encode_message(event.message)))
            elif isinstance(event, ConnectionClosed):
                assert conn.state is State.CLOSED
                seen.append(("closed", encode_message(Close(event.code, event.reason))))
            else:
                assert isinstance(event, HandshakeComplete), repr(event)
                text = f"{event.version}/{event.peer_max_message_size}"
                seen.append(("welcome", text.encode()))
        assert 0 <= conn.reassembling <= self.fed, (conn.reassembling, self.fed)
        assert self.budget.used == conn.reassembling, (self.budget.used, conn.reassembling)
        return seen

    def _check_failed(self) -> None:
        conn = self.conn
        assert conn.state is State.CLOSED
        assert conn.reassembling == 0 and self.budget.used == 0, "frame kept after failure"
        sent = conn.data_to_send()
        if not sent:
            return
        plain = self.peer.decrypt_all(sent)
        messages = []
        while plain:
            length = int.from_bytes(plain[:4], "big")
            messages.append(decode_message(plain[4 : 4 + length]))
            plain = plain[4 + length :]
        last = messages[-1]
        assert self.failed is not None
        assert isinstance(last, Close) and last.code == int(self.failed.code), (self.failed, last)

    def plaintext(self, data: bytes) -> None:
        """Frame-stream bytes from the peer, encrypted in fuzz-chosen transport messages;
        check the events (or the failure) against the model."""
        reader = self.reader
        self.fed += len(data)
        pieces: list[bytes] = []
        position = 0
        while position < len(data) or not pieces:
            size = 65519 if reader.below(2) == 0 else reader.u16() % 65519 + 1
            pieces.append(wire(self.peer_encrypt(data[position : position + size])))
            position += size
        was_done = self.conn.state is State.CLOSED
        events = self.feed(b"".join(pieces))
        if self.desynced or was_done:
            assert not events, f"events after the stream lost sync: {events}"
            return
        if not data:
            assert self.failed is not None, "an empty transport message was accepted"
            return
        expected = self.model.feed(data)
        if self.model.failed:
            assert self.failed is not None, "the channel accepted what the model rejects"
            assert events == expected[: len(events)]
            return
        assert self.failed is None, f"the channel failed ({self.failed!r}) on a valid stream"
        assert events == expected, f"channel events {events}, model {expected}"
        if self.model.closed:
            assert self.conn.state is State.CLOSED

    def peer_encrypt(self, chunk: bytes) -> bytes:
        assert self.peer.transport is not None
        self.last_ciphertext = self.peer.transport.encrypt(chunk)
        return self.last_ciphertext

    def unauthenticated(self, data: bytes) -> None:
        if data:
            self.desynced = True
        events = self.feed(data)
        assert not events, f"unauthenticated bytes gave events: {events}"

    def step(self) -> None:
        reader, conn = self.reader, self.conn
        op = reader.below(8)
        if op in (0, 1):
            self.plaintext(reader.chunk())
        elif op == 2:
            self.plaintext(frame(MESSAGES[reader.below(len(MESSAGES))]))
        elif op == 3:
            # a large frame announced, part of its body sent: the lazily committed path
            length = [MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1, 70000, (1 << 32) - 1]
            header = length[reader.below(4)].to_bytes(4, "big")
            self.plaintext(header + bytes(reader.u16()))
        elif op == 4:
            self.unauthenticated(reader.chunk())
        elif op == 5:
            if self.last_ciphertext:
                data = bytearray(self.last_ciphertext)
                if reader.byte() & 1:
                    data[reader.below(len(data))] ^= reader.byte() or 1
                self.unauthenticated(wire(bytes(data)))
        elif op == 6:
            action = reader.below(3)
            if action == 0:
                conn.send_keepalive()
            elif action == 1 and conn.is_open:
                conn.send_message(ModelRequest())
            elif action == 2:
                conn.close()
                self.locally_closed = True
            sent = conn.data_to_send()
            if sent:
                self.peer.decrypt_all(sent)  # what the node sends is always authentic
        else:
            message = [Keepalive(), Close(code=reader.byte(), reason="bye")][reader.below(2)]
            self.plaintext(frame(encode_message(message)))


def test_one_input(data: bytes) -> None:
    reader = Reader(data)
    session = Session(reader)
    steps = 0
    while reader.left and steps < MAX_STEPS:
        session.step()
        steps += 1


def main() -> None:
    run(TARGET, test_one_input)


if __name__ == "__main__":
    main()
    sys.exit(0)
