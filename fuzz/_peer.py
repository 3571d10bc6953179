"""A second implementation of the p2pfed channel handshake, from the Noise layer up.

The handshake and channel harnesses need a peer the *fuzzer* controls after a genuine
handshake: one that can put any payload into its handshake messages and encrypt any
frame-stream bytes with real transport keys. :class:`~p2pfed.channel.ChannelConnection`
deliberately offers neither, so this peer rebuilds the wire format of spec/transport.md
on :class:`~p2pfed.noise.HandshakeState` (its keys are the spec's transport vector keys,
so every run is deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path

from p2pfed.channel import (
    NOISE_PROTOCOL_NAME,
    ChannelConnection,
    Role,
    StaticKey,
    prologue,
    static_key_signature_input,
)
from p2pfed.encoding import encode
from p2pfed.identity import NodeIdentity
from p2pfed.messages import Message, encode_message
from p2pfed.noise import HandshakeState, NoiseTransport, public_key

_VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "transport.json"
_KEYS = {k: bytes.fromhex(v) for k, v in json.loads(_VECTORS.read_text())["keys"].items()}

FEDERATION_ID = _KEYS["federation_id"]
PSK = _KEYS["federation_secret"]
MAX_MESSAGE_SIZE = 1 << 20
"""The node under test accepts messages up to 1 MiB: large enough that frame bodies take
the lazily committed path (over 64 KiB), small enough for libFuzzer's memory limit."""


def _side(role: str) -> tuple[NodeIdentity, StaticKey, bytes]:
    identity = NodeIdentity.from_private_bytes(_KEYS[f"{role}_identity_seed"])
    private = _KEYS[f"{role}_static"]
    static_public = public_key("25519", private)
    signature = identity.sign(static_key_signature_input(static_public))
    return identity, StaticKey(private, static_public, signature), _KEYS[f"{role}_ephemeral"]


SIDES = {Role.INITIATOR: _side("initiator"), Role.RESPONDER: _side("responder")}


def node(role: Role) -> ChannelConnection:
    """The node under test, started, with the vector keys of ``role``."""
    identity, static, ephemeral = SIDES[role]
    conn = ChannelConnection(
        role,
        identity=identity,
        federation_id=FEDERATION_ID,
        psk=PSK,
        max_message_size=MAX_MESSAGE_SIZE,
        noise_static=static,
        noise_ephemeral=ephemeral,
    )
    conn.start()
    return conn


def wire(noise_message: bytes) -> bytes:
    """A Noise message with its 2-byte length prefix."""
    return len(noise_message).to_bytes(2, "big") + noise_message


def frame(payload: bytes) -> bytes:
    """Frame-stream bytes of one message body (4-byte length, then the body)."""
    return len(payload).to_bytes(4, "big") + payload


def payload_fields(
    role: Role, versions: object = (1, 2), max_message_size: object = MAX_MESSAGE_SIZE
) -> bytes:
    """A handshake payload of ``role``'s genuine identity and signature, with the given
    (possibly invalid: they are not validated) versions and size limit."""
    identity, static, _ = SIDES[role]
    versions = list(versions) if isinstance(versions, tuple) else versions
    return encode({1: identity.public_key, 2: static.signature, 3: versions, 4: max_message_size})


class RawPeer:
    """The other side of a channel with the node under test, at the Noise level."""

    def __init__(self, role: Role, *, psk: bytes = PSK, federation_id: bytes = FEDERATION_ID):
        _, static, ephemeral = SIDES[role]
        self.role = role
        self.handshake: HandshakeState | None = HandshakeState(
            NOISE_PROTOCOL_NAME,
            initiator=role is Role.INITIATOR,
            prologue=prologue(federation_id),
            s=static.private,
            e=ephemeral,
            psks=[psk],
        )
        self.transport: NoiseTransport | None = None

    def write_handshake(self, payload: bytes) -> bytes:
        """The next handshake message (with length prefix) carrying ``payload``."""
        assert self.handshake is not None
        message = self.handshake.write_message(payload)
        self._maybe_split()
        return wire(message)

    def read_handshake(self, data: bytes) -> bytes:
        """Read one length-prefixed handshake message; return its payload."""
        assert self.handshake is not None
        length = int.from_bytes(data[:2], "big")
        assert len(data) == 2 + length, "expected exactly one handshake message"
        payload = self.handshake.read_message(data[2:])
        self._maybe_split()
        return payload

    def _maybe_split(self) -> None:
        assert self.handshake is not None
        if self.handshake.complete:
            self.transport = self.handshake.transport()
            self.handshake = None

    def encrypt(self, plaintext: bytes) -> bytes:
        """Frame-stream bytes as transport messages on the wire (at most 65519 per message)."""
        assert self.transport is not None
        out = []
        for start in range(0, max(len(plaintext), 1), 65519):
            out.append(wire(self.transport.encrypt(plaintext[start : start + 65519])))
        return b"".join(out)

    def send(self, message: Message) -> bytes:
        return self.encrypt(frame(encode_message(message)))

    def decrypt_all(self, data: bytes) -> bytes:
        """The frame-stream plaintext of everything the node sent (whole Noise messages)."""
        assert self.transport is not None
        plain = []
        position = 0
        while position < len(data):
            length = int.from_bytes(data[position : position + 2], "big")
            plain.append(self.transport.decrypt(data[position + 2 : position + 2 + length]))
            position += 2 + length
        return b"".join(plain)


def handshake_with(conn: ChannelConnection, peer: RawPeer, *, welcome: bool = True) -> bytes:
    """Run the whole handshake between the node ``conn`` and ``peer`` with genuine payloads;
    return what the node sent after it (its Welcome, if it is the responder). A responder
    ``peer`` sends its Welcome only if ``welcome``."""
    from p2pfed.messages import Welcome

    if peer.role is Role.RESPONDER:
        peer.read_handshake(conn.data_to_send())
        conn.receive_data(peer.write_handshake(payload_fields(Role.RESPONDER)))
        peer.read_handshake(conn.data_to_send())
        if welcome:
            conn.receive_data(peer.send(Welcome(version=2, max_message_size=MAX_MESSAGE_SIZE)))
        return conn.data_to_send()
    conn.receive_data(peer.write_handshake(b""))
    peer.read_handshake(conn.data_to_send())
    conn.receive_data(peer.write_handshake(payload_fields(Role.INITIATOR)))
    return conn.data_to_send()
