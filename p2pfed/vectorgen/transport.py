"""A complete channel transcript between two nodes with fixed keys (spec/transport.md)."""

from __future__ import annotations

import hashlib

from p2pfed.channel import (
    NOISE_PROTOCOL_NAME,
    ChannelConnection,
    Role,
    prologue,
    static_key_signature_input,
)
from p2pfed.errors import CloseCode
from p2pfed.identity import NodeId, NodeIdentity, verify_signature
from p2pfed.messages import (
    Close,
    HandshakePayload,
    Keepalive,
    Message,
    ModelState,
    Welcome,
    decode_message,
    encode_message,
)
from p2pfed.noise import HandshakeState, public_key

NAME = "transport"
SECTION = "spec/transport.md, sections 1-6"
DESCRIPTION = (
    "every wire byte of a handshake, Welcome, ModelState, Keepalive and Close, and the "
    "decrypted frames of each transport message"
)


def _fixed(label: str) -> bytes:
    return hashlib.sha256(b"p2pfed test vector: " + label.encode()).digest()


KEYS = {
    "initiator_identity_seed": _fixed("initiator identity"),
    "responder_identity_seed": _fixed("responder identity"),
    "initiator_static": _fixed("initiator noise static"),
    "responder_static": _fixed("responder noise static"),
    "initiator_ephemeral": _fixed("initiator noise ephemeral"),
    "responder_ephemeral": _fixed("responder noise ephemeral"),
    "federation_id": _fixed("federation id")[:16],
    "federation_secret": _fixed("federation secret"),
}
MAX_MESSAGE_SIZE = 1 << 20
MODEL = ModelState(round=3, fingerprint=_fixed("fingerprint"), parameters=bytes(range(40)))


def _connection(role: Role) -> ChannelConnection:
    side = "initiator" if role is Role.INITIATOR else "responder"
    return ChannelConnection(
        role,
        identity=NodeIdentity.from_private_bytes(KEYS[f"{side}_identity_seed"]),
        federation_id=KEYS["federation_id"],
        psk=KEYS["federation_secret"],
        max_message_size=MAX_MESSAGE_SIZE,
        noise_static=KEYS[f"{side}_static"],
        noise_ephemeral=KEYS[f"{side}_ephemeral"],
    )


def generate() -> dict:
    initiator, responder = _connection(Role.INITIATOR), _connection(Role.RESPONDER)
    initiator.start()
    responder.start()
    wire = []

    def move(
        sender: ChannelConnection,
        receiver: ChannelConnection,
        what: str,
        message: Message | None = None,
    ) -> None:
        data = sender.data_to_send()
        step: dict = {"from": sender.role.value, "what": what, "bytes": data.hex()}
        if message is not None:
            # the decrypted frame stream: 4-byte length, then the message's CBOR
            body = encode_message(message)
            step["plaintext"] = (len(body).to_bytes(4, "big") + body).hex()
        wire.append(step)
        receiver.receive_data(data)

    move(initiator, responder, "handshake message 1")
    move(responder, initiator, "handshake message 2")
    move(initiator, responder, "handshake message 3")
    move(responder, initiator, "Welcome", Welcome(version=2, max_message_size=MAX_MESSAGE_SIZE))
    initiator.send_message(MODEL)
    move(initiator, responder, "ModelState", MODEL)
    responder.send_keepalive()
    move(responder, initiator, "Keepalive", Keepalive())
    initiator.close(CloseCode.SHUTTING_DOWN, "bye")
    move(initiator, responder, "Close", Close(code=int(CloseCode.SHUTTING_DOWN), reason="bye"))
    assert initiator.handshake_hash is not None
    return {
        "protocol_name": NOISE_PROTOCOL_NAME,
        "prologue": prologue(KEYS["federation_id"]).hex(),
        "keys": {name: value.hex() for name, value in KEYS.items()},
        "max_message_size": MAX_MESSAGE_SIZE,
        "model_state": {
            "round": MODEL.round,
            "fingerprint": MODEL.fingerprint.hex(),
            "parameters": MODEL.parameters.hex(),
        },
        "handshake_hash": initiator.handshake_hash.hex(),
        "initiator_node_id": str(
            NodeIdentity.from_private_bytes(KEYS["initiator_identity_seed"]).node_id
        ),
        "responder_node_id": str(
            NodeIdentity.from_private_bytes(KEYS["responder_identity_seed"]).node_id
        ),
        "wire": wire,
    }


def _noise_messages(data: bytes) -> list[bytes]:
    out = []
    while data:
        length = int.from_bytes(data[:2], "big")
        out.append(data[2 : 2 + length])
        data = data[2 + length :]
    return out


def verify(vectors: dict) -> None:
    """Replay the transcript with the Noise layer alone and check every rule of the spec."""
    keys = {name: bytes.fromhex(value) for name, value in vectors["keys"].items()}
    ini = HandshakeState(
        vectors["protocol_name"],
        initiator=True,
        prologue=bytes.fromhex(vectors["prologue"]),
        s=keys["initiator_static"],
        e=keys["initiator_ephemeral"],
        psks=[keys["federation_secret"]],
    )
    res = HandshakeState(
        vectors["protocol_name"],
        initiator=False,
        prologue=bytes.fromhex(vectors["prologue"]),
        s=keys["responder_static"],
        e=keys["responder_ephemeral"],
        psks=[keys["federation_secret"]],
    )
    wire = [bytes.fromhex(step["bytes"]) for step in vectors["wire"]]
    [m1], [m2], [m3] = (_noise_messages(w) for w in wire[:3])
    assert ini.write_message(b"") == m1
    assert res.read_message(m1) == b""
    # message 2: the responder's payload, signed over its static key
    payload2 = ini.read_message(m2)
    assert res.write_message(payload2) == m2
    responder = HandshakePayload.decode(payload2)
    assert ini.remote_static == public_key("25519", keys["responder_static"])
    assert verify_signature(
        responder.identity_key, responder.signature, static_key_signature_input(ini.remote_static)
    )
    assert str(NodeId.from_public_key(responder.identity_key)) == vectors["responder_node_id"]
    # message 3: rebuild the initiator's payload from its identity key (Ed25519 is deterministic)
    identity = NodeIdentity.from_private_bytes(keys["initiator_identity_seed"])
    initiator_static = public_key("25519", keys["initiator_static"])
    payload3 = HandshakePayload(
        identity_key=identity.public_key,
        signature=identity.sign(static_key_signature_input(initiator_static)),
        versions=[1, 2],  # the reference node speaks versions 1 and 2
        max_message_size=vectors["max_message_size"],
    ).encode()
    assert ini.write_message(payload3) == m3
    assert res.read_message(m3) == payload3
    assert str(identity.node_id) == vectors["initiator_node_id"]
    assert ini.handshake_hash.hex() == res.handshake_hash.hex() == vectors["handshake_hash"]
    to_initiator = ini.transport().receive
    to_responder = res.transport().receive

    def frames(receiver, data: bytes) -> list:  # type: ignore[no-untyped-def]
        stream = b"".join(receiver.decrypt_with_ad(b"", m) for m in _noise_messages(data))
        step = vectors["wire"][wire.index(data)]
        assert stream.hex() == step["plaintext"], step["what"]  # the decrypted contents
        out = []
        while stream:
            length = int.from_bytes(stream[:4], "big")
            out.append(decode_message(stream[4 : 4 + length]))
            stream = stream[4 + length :]
        return out

    assert frames(to_initiator, wire[3]) == [
        Welcome(version=2, max_message_size=vectors["max_message_size"])
    ]
    model = vectors["model_state"]
    assert frames(to_responder, wire[4]) == [
        ModelState(
            round=model["round"],
            fingerprint=bytes.fromhex(model["fingerprint"]),
            parameters=bytes.fromhex(model["parameters"]),
        )
    ]
    assert frames(to_initiator, wire[5]) == [Keepalive()]
    assert frames(to_responder, wire[6]) == [Close(code=int(CloseCode.SHUTTING_DOWN), reason="bye")]
