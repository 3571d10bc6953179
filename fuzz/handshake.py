"""Fuzz target: the channel handshake (:class:`p2pfed.channel.ChannelConnection` in both
roles, over :class:`p2pfed.noise.HandshakeState`; spec/transport.md sections 1-4).

The first input byte picks a mode:

0. raw bytes fed to a responder, in fuzz-chosen pieces;
1. raw bytes fed to an initiator after its first message;
2. a genuine peer (:class:`fuzz._peer.RawPeer`) whose every handshake message carries a
   fuzz-chosen payload (genuine, raw bytes, or genuine identity with fuzzed versions and
   size limit), maybe with the wrong federation secret, each message maybe mutated
   (a byte flipped, cut short or extended) and split into pieces; then a Welcome with
   fuzzed fields and raw frame-stream bytes;
3. the Noise layer alone: a :class:`~p2pfed.noise.HandshakeState` of a fuzz-chosen
   protocol (:data:`NOISE_NAMES`: patterns, DH, ciphers, hashes, psk modifiers), either
   role, writes fuzz payloads when it is its turn and reads fuzz bytes otherwise, then
   decrypts fuzz bytes as transport messages. Only :class:`~p2pfed.errors.NoiseError`
   may escape, and a failed handshake must refuse every later call.

Contract checked on every input:

* :meth:`~p2pfed.channel.ChannelConnection.receive_data` raises nothing but
  :class:`~p2pfed.errors.RemoteProtocolError`; after one the connection is closed and
  ignores further bytes;
* events are only those documented, and a :class:`~p2pfed.channel.HandshakeComplete`
  names the peer's genuine identity (the fuzzer holds no other key that could sign, so
  any other identity would be an authentication bypass) and a version both offered;
* after an error in the transport phase, what the node sent decrypts to a Close with
  that error's code.

Run: ``python -m fuzz.handshake -atheris_runs=20000``.
"""

from __future__ import annotations

import contextlib
import sys

from fuzz._peer import PSK, SIDES, RawPeer, frame, node, payload_fields
from fuzz._support import Reader, run
from p2pfed.channel import (
    SUPPORTED_VERSIONS,
    ChannelConnection,
    ConnectionClosed,
    HandshakeComplete,
    MessageReceived,
    Role,
    State,
)
from p2pfed.encoding import encode
from p2pfed.errors import NoiseError, RemoteProtocolError
from p2pfed.messages import Close, Message, decode_message
from p2pfed.noise import HandshakeState, NoiseProtocol, public_key

TARGET = "handshake"
_OTHER = {Role.INITIATOR: Role.RESPONDER, Role.RESPONDER: Role.INITIATOR}


class Victim:
    """The node under test and the checks on everything it does."""

    def __init__(self, role: Role) -> None:
        self.conn = node(role)
        self.peer_role = _OTHER[role]
        self.failed: RemoteProtocolError | None = None

    def feed(self, data: bytes, reader: Reader) -> None:
        """Give ``data`` to the node in pieces the fuzzer chooses."""
        position = 0
        while position < len(data):
            size = reader.below(4)
            step = len(data) - position if size == 0 else reader.byte() + 1
            self._receive(data[position : position + step])
            position += step

    def _receive(self, piece: bytes) -> None:
        conn = self.conn
        if self.failed is not None:
            assert conn.state is State.CLOSED
            assert conn.receive_data(piece) == [], "a closed connection produced events"
            return
        try:
            events = conn.receive_data(piece)
        except RemoteProtocolError as exc:
            assert conn.state is State.CLOSED, f"{conn.state} after {exc!r}"
            self.failed = exc
            return
        for event in events:
            if isinstance(event, HandshakeComplete):
                genuine = SIDES[self.peer_role][0]
                assert event.peer_identity_key == genuine.public_key, "forged identity accepted"
                assert event.peer_id == genuine.node_id
                assert event.version in SUPPORTED_VERSIONS
                # later bytes of the same call may already have closed it (a Close)
                assert conn.is_open or isinstance(events[-1], ConnectionClosed)
            else:
                assert isinstance(event, MessageReceived | ConnectionClosed), repr(event)
                assert conn.handshake_hash is not None


def _raw(role: Role, reader: Reader) -> None:
    victim = Victim(role)
    victim.conn.data_to_send()
    victim.feed(reader.rest(), reader)


def _payload(role: Role, step: int, reader: Reader) -> bytes:
    choice = reader.below(4)
    if choice == 1:
        return reader.chunk()
    if step == 1:
        return b"" if choice != 2 else reader.chunk()
    if choice == 2:
        versions: object = [reader.below(4) for _ in range(reader.below(5))]
        if reader.below(8) == 0:
            versions = reader.chunk()  # not even a list
        size = [0, 1, 1 << 20, (1 << 64) - 1, reader.u16()][reader.below(5)]
        return payload_fields(role, versions, size)
    if choice == 3:
        extra = encode({1: b"", 2: b"", 3: [1], 4: 0, reader.below(24): reader.below(256)})
        return extra if reader.byte() & 1 else payload_fields(role)
    return payload_fields(role)


def _mutate(data: bytes, reader: Reader) -> bytes:
    kind = reader.below(8)
    if kind == 6 and data:
        position = reader.below(len(data))
        flip = reader.byte() or 1
        return data[:position] + bytes([data[position] ^ flip]) + data[position + 1 :]
    if kind == 7:
        cut = reader.below(len(data) + 1)
        return data[:cut] + reader.chunk()
    return data


def _peer_writes(victim: Victim, peer: RawPeer, step: int, reader: Reader) -> bool:
    """The peer sends handshake message ``step``; whether the handshake goes on."""
    try:
        message = peer.write_handshake(_payload(peer.role, step, reader))
    except NoiseError:
        return False  # the fuzzer made the peer itself misbehave (e.g. payload too long)
    victim.feed(_mutate(message, reader), reader)
    return victim.failed is None


def _peer_reads(victim: Victim, peer: RawPeer) -> bool:
    data = victim.conn.data_to_send()
    if victim.failed is not None or not data:
        return False
    try:
        peer.read_handshake(data)
    except NoiseError:
        # the node accepted a mutated message: its transcript now differs from the peer's
        # (a flipped bit X25519 ignores, say), so the peer cannot go on
        return False
    return True


def _structured(reader: Reader) -> None:
    role = Role.RESPONDER if reader.byte() & 1 else Role.INITIATOR
    victim = Victim(role)
    psk = PSK if reader.below(8) else bytes(32)
    peer = RawPeer(_OTHER[role], psk=psk)
    if role is Role.RESPONDER:
        ok = _peer_writes(victim, peer, 1, reader)
        ok = ok and _peer_reads(victim, peer)
        ok = ok and _peer_writes(victim, peer, 3, reader)
    else:
        ok = _peer_reads(victim, peer)
        ok = ok and _peer_writes(victim, peer, 2, reader)
        ok = ok and _peer_reads(victim, peer)
    if not ok or peer.transport is None:
        return
    if role is Role.INITIATOR and reader.below(4):
        welcome = encode({0: 1, 1: reader.below(4), 2: [0, 1, 1 << 20][reader.below(3)]})
        victim.feed(_mutate(peer.encrypt(frame(welcome)), reader), reader)
    while reader.left and victim.failed is None:
        victim.feed(peer.encrypt(reader.chunk() or b"\x00"), reader)
    sent = victim.conn.data_to_send()
    if victim.failed is not None and sent:
        plain = peer.decrypt_all(sent)
        last = _last_frame(plain)
        assert isinstance(last, Close) and last.code == int(victim.failed.code), repr(last)


def _last_frame(stream: bytes) -> Message | None:
    position, message = 0, None
    while position < len(stream):
        length = int.from_bytes(stream[position : position + 4], "big")
        message = decode_message(stream[position + 4 : position + 4 + length])
        position += 4 + length
    return message


NOISE_NAMES = [
    f"Noise_{pattern}_{dh}_{cipher}_{hash_}"
    for pattern in ("XXpsk3", "XX", "NN", "IK", "KK", "NK1", "X1X1", "NNpsk0+psk2", "N", "IX")
    for dh, cipher, hash_ in (
        ("25519", "ChaChaPoly", "SHA256"),
        ("448", "AESGCM", "BLAKE2b"),
        ("25519", "AESGCM", "SHA512"),
        ("448", "ChaChaPoly", "BLAKE2s"),
    )
]
"""Noise protocols of mode 3 (the channel uses only the first)."""


def _noise_keys(protocol: NoiseProtocol, initiator: bool) -> dict[str, bytes]:
    """Fixed keys for whatever the pattern's pre-messages need."""
    private = bytes(range(1, protocol.dhlen + 1))
    mine, theirs = (
        (protocol.initiator_pre, protocol.responder_pre)
        if initiator
        else (protocol.responder_pre, protocol.initiator_pre)
    )
    keys = {"s": private}
    if "e" in mine:
        keys["e"] = bytes(range(2, protocol.dhlen + 2))
    remote = public_key(protocol.dh_name, bytes(range(3, protocol.dhlen + 3)))
    if "s" in theirs:
        keys["rs"] = remote
    if "e" in theirs:
        keys["re"] = remote
    return keys


def _noise(reader: Reader) -> None:
    protocol = NoiseProtocol.from_name(NOISE_NAMES[reader.below(len(NOISE_NAMES))])
    initiator = reader.byte() & 1 == 1
    keys = _noise_keys(protocol, initiator)
    psks = [bytes(32)] * protocol.psk_count
    e, rs, re = keys.get("e"), keys.get("rs"), keys.get("re")
    try:
        state = HandshakeState(
            protocol, initiator=initiator, psks=psks, s=keys["s"], e=e, rs=rs, re=re
        )
    except NoiseError:  # a pattern where this side has no static key
        state = HandshakeState(protocol, initiator=initiator, psks=psks, e=e, rs=rs, re=re)
    failed = False
    while not state.complete and reader.left:
        try:
            if state.is_my_turn:
                state.write_message(reader.chunk())
            else:
                state.read_message(reader.take(reader.u16() % 2048))
        except NoiseError:
            failed = True
            break
    if failed:
        for call in (lambda: state.read_message(b"x" * 64), lambda: state.write_message(b"")):
            try:
                call()
            except NoiseError:
                continue
            raise AssertionError("a failed handshake accepted another call")
        return
    if not state.complete:
        return
    transport = state.transport()
    while reader.left:
        with contextlib.suppress(NoiseError):
            transport.decrypt(reader.take(reader.u16() % 2048))


def test_one_input(data: bytes) -> None:
    reader = Reader(data)
    mode = reader.below(4)
    if mode == 0:
        _raw(Role.RESPONDER, reader)
    elif mode == 1:
        _raw(Role.INITIATOR, reader)
    elif mode == 2:
        _structured(reader)
    else:
        _noise(reader)


def check_connection(conn: ChannelConnection) -> None:
    """Shared with the channel harness: a connection's public state is consistent."""
    assert conn.state in State
    if conn.is_open:
        assert conn.version in SUPPORTED_VERSIONS and conn.peer_id is not None


def main() -> None:
    run(TARGET, test_one_input)


if __name__ == "__main__":
    main()
    sys.exit(0)
