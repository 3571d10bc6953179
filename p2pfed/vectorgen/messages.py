"""Vectors for spec/encoding.md: the exact bytes of every message type, and rejections.

``valid`` lists, for each message type and for the handshake payload, fixed field values
(in JSON form: byte strings as lowercase hex, arrays as lists) with their deterministic
CBOR encoding. ``extensions`` lists handshake payloads with reserved keys 5..23, which a
decoder ignores. ``invalid`` lists encodings a decoder MUST reject, with the reason and
the error class (``DecodeLimitError`` closes with MESSAGE_TOO_LARGE, ``DecodeError`` with
MALFORMED_MESSAGE).
"""

from __future__ import annotations

import struct
from typing import Any

import cbor2

from p2pfed.encoding import decode, encode
from p2pfed.errors import CloseCode, DecodeError, DecodeLimitError
from p2pfed.messages import (
    UINT64_MAX,
    Bytes,
    Close,
    GroupAbort,
    GroupInvite,
    GroupMemberInfo,
    GroupPosition,
    GroupReply,
    GroupStart,
    HandshakePayload,
    Keepalive,
    Message,
    ModelRequest,
    ModelState,
    NodeAnnounce,
    PeerExchangeRequest,
    PeerInfo,
    PeerList,
    Record,
    RecordList,
    ReducedShard,
    Shard,
    UIntList,
    Welcome,
    decode_message,
    message_types,
)

NAME = "messages"
SECTION = "spec/encoding.md, Encoding and Message type registry"
DESCRIPTION = "deterministic CBOR bytes of every message type and encodings that must be rejected"

_IDENTITY_KEY = bytes(range(32))
_SIGNATURE = bytes(range(64, 128))
_FINGERPRINT = bytes.fromhex("5f" * 16 + "a0" * 16)
_GROUP_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
_MASK_KEY = bytes(range(128, 160))
_NONCE = bytes(range(160, 192))


def _member(i: int, host: str, port: int) -> GroupMemberInfo:
    """Member ``i`` of the GroupStart vectors: fixed bytes, not real keys (the encoding
    does not check signatures; spec/group.md's vectors do)."""
    return GroupMemberInfo(
        identity_key=bytes([i]) * 32,
        mask_key=bytes([0x80 + i]) * 32,
        key_signature=bytes([0x40 + i]) * 64,
        host=host,
        port=port,
    )


def _samples() -> list[tuple[str, Record]]:
    return [
        (
            "handshake-payload",
            HandshakePayload(
                identity_key=_IDENTITY_KEY,
                signature=_SIGNATURE,
                versions=[1],
                max_message_size=16 * 1024 * 1024,
            ),
        ),
        (
            "handshake-payload-max",
            HandshakePayload(
                identity_key=bytes(32),
                signature=b"\xff" * 64,
                versions=list(range(1, 17)),
                max_message_size=UINT64_MAX,
            ),
        ),
        ("welcome", Welcome(version=1, max_message_size=256 * 1024 * 1024)),
        ("welcome-edges", Welcome(version=0, max_message_size=UINT64_MAX)),
        ("keepalive", Keepalive()),
        ("close-normal-empty", Close(code=CloseCode.NORMAL, reason="")),
        ("close-malformed", Close(code=CloseCode.MALFORMED_MESSAGE, reason="bad CBOR")),
        ("close-unknown-code-utf8", Close(code=4000, reason="fermé ✓")),
        ("close-max-reason", Close(code=CloseCode.SHUTTING_DOWN, reason="é" * 128)),
        (
            "model-state",
            ModelState(
                round=7,
                fingerprint=_FINGERPRINT,
                parameters=struct.pack("<4f", 1.0, -2.5, 0.0, 3.25),
            ),
        ),
        ("model-state-empty", ModelState(round=0, fingerprint=bytes(32), parameters=b"")),
        ("peer-exchange-request", PeerExchangeRequest(max_peers=16)),
        ("peer-list-empty", PeerList(peers=[])),
        (
            "peer-list",
            PeerList(
                peers=[
                    PeerInfo(node_id=_IDENTITY_KEY, host="192.168.1.7", port=7447),
                    PeerInfo(node_id=_FINGERPRINT, host="fd00::7", port=65535),
                ]
            ),
        ),
        ("node-announce", NodeAnnounce(listen_port=7447)),
        ("node-announce-not-listening", NodeAnnounce(listen_port=0)),
        ("node-announce-max", NodeAnnounce(listen_port=65535)),
        ("node-announce-grid", NodeAnnounce(listen_port=7447, grid=(0, 8, 3))),
        (
            "group-invite",
            GroupInvite(
                group_id=_GROUP_ID,
                priority=0x0123456789ABCDEF,
                round=3,
                fingerprint=_FINGERPRINT,
                model_size=101_770,
            ),
        ),
        (
            "group-invite-edges",
            GroupInvite(
                group_id=bytes(16),
                priority=UINT64_MAX,
                round=0,
                fingerprint=bytes(32),
                model_size=1,
            ),
        ),
        (
            "group-reply-accept",
            GroupReply(
                group_id=_GROUP_ID,
                accept=True,
                reason="",
                mask_key=_MASK_KEY,
                key_signature=_SIGNATURE,
                listen_port=7447,
            ),
        ),
        (
            "group-reply-decline",
            GroupReply(
                group_id=_GROUP_ID,
                accept=False,
                reason="busy: initiating a group",
                mask_key=b"",
                key_signature=b"",
                listen_port=0,
            ),
        ),
        (
            "group-start",
            GroupStart(
                group_id=_GROUP_ID,
                round=3,
                nonce=_NONCE,
                members=[
                    _member(1, "", 7447),
                    _member(2, "192.168.1.7", 7448),
                    _member(3, "fd00::7", 65535),
                ],
            ),
        ),
        ("group-start-empty", GroupStart(group_id=bytes(16), round=0, nonce=bytes(32), members=[])),
        ("group-abort", GroupAbort(group_id=_GROUP_ID, reason="member lost: channel closed")),
        ("group-abort-empty", GroupAbort(group_id=bytes(16), reason="")),
        (
            "shard",
            Shard(group_id=_GROUP_ID, index=1, data=struct.pack("<3I", 1, 0x80000000, 0xFFFFFFFF)),
        ),
        ("shard-empty-max-index", Shard(group_id=_GROUP_ID, index=63, data=b"")),
        (
            "reduced-shard",
            ReducedShard(group_id=_GROUP_ID, index=0, data=struct.pack("<2I", 7, 0xDEADBEEF)),
        ),
        ("model-request", ModelRequest()),
        ("group-position-step-0", GroupPosition(round=0, step=0, key=(), size=16)),
        ("group-position-step-1", GroupPosition(round=7, step=1, key=(2,), size=16)),
    ]


def to_json(record: Record) -> dict[str, Any]:
    """A record's fields in JSON form: byte strings as hex, arrays as lists."""
    out: dict[str, Any] = {}
    for name, kind in record.SCHEMA:
        value = getattr(record, name)
        if isinstance(kind, Bytes):
            value = value.hex()
        elif isinstance(kind, UIntList):
            value = list(value)
        elif isinstance(kind, RecordList):
            value = [to_json(item) for item in value]
        out[name] = value
    return out


def from_json(cls: type[Record], fields: dict[str, Any]) -> Record:
    """The inverse of :func:`to_json`."""
    values = {}
    for name, kind in cls.SCHEMA:
        value = fields[name]
        if isinstance(kind, Bytes):
            value = bytes.fromhex(value)
        elif isinstance(kind, RecordList):
            value = [from_json(kind.record, item) for item in value]
        values[name] = value
    return cls(**values)


def _peer(host: str) -> dict[int, object]:
    return {1: _IDENTITY_KEY, 2: host, 3: 7447}


def _hp_wire() -> dict[int, object]:
    return dict(_samples()[0][1].to_wire())


def _reply(accept: object, key: bytes, signature: bytes) -> dict[int, object]:
    return {0: 21, 1: _GROUP_ID, 2: accept, 3: "", 4: key, 5: signature, 6: 7447}


def _start(members: list[dict[int, object]]) -> dict[int, object]:
    return {0: 22, 1: _GROUP_ID, 2: 3, 3: _NONCE, 4: members}


def _invalid() -> list[dict[str, str]]:
    hp = _hp_wire()
    cases: list[tuple[str, str, bytes, str, type[DecodeError]]] = [
        ("non-shortest-int", "message", bytes.fromhex("a1001802"),
         "type 2 encoded in a 1-byte argument (0x18 0x02) instead of 0x02", DecodeError),
        ("unsorted-keys", "message", bytes.fromhex("a3000102010101"),
         "map keys 0, 2, 1 are not in bytewise order", DecodeError),
        ("duplicate-key", "message", bytes.fromhex("a200020002"),
         "key 0 appears twice", DecodeError),
        ("indefinite-map", "message", bytes.fromhex("bf0002ff"),
         "indefinite-length map", DecodeError),
        ("trailing-bytes", "message", bytes.fromhex("a1000200"),
         "a byte after the item", DecodeError),
        ("truncated", "message", bytes.fromhex("a300030100026562"),
         "text string claims 5 bytes, 1 present", DecodeError),
        ("huge-length-claim", "message",
         bytes.fromhex("a2000203") + b"\x5b" + (1 << 40).to_bytes(8, "big"),
         "byte string header claims 2**40 bytes in a 13-byte input", DecodeError),
        ("tag", "message", bytes.fromhex("c1a10002"), "tags are not used", DecodeError),
        ("undefined", "message", bytes.fromhex("a2000201f7"),
         "simple value undefined", DecodeError),
        ("non-shortest-float", "message", bytes.fromhex("fa3fc00000"),
         "1.5 as float32 instead of float16 f93e00", DecodeError),
        ("non-canonical-nan", "message", bytes.fromhex("fb7ff8000000000000"),
         "NaN must be f97e00", DecodeError),
        ("invalid-utf8", "message", bytes.fromhex("a30003010002628080"),
         "reason is not UTF-8", DecodeError),
        ("too-deep", "message", bytes.fromhex("a2000201818181818181818100"),
         "nesting depth 9 over the default limit 8", DecodeError),
        ("unknown-type", "message", encode({0: 99}), "unknown message type 99", DecodeError),
        ("type-not-uint", "message", encode({0: "close"}), "key 0 must be a uint", DecodeError),
        ("no-type", "message", encode({1: 1, 2: 2}), "key 0 missing", DecodeError),
        ("not-a-map", "message", encode([0, 2]), "a message is a map", DecodeError),
        ("unknown-key", "message", encode({0: 2, 5: 0}),
         "Keepalive has no key 5 (schemas are closed)", DecodeError),
        ("missing-field", "message", encode({0: 3, 1: 0}), "Close without reason", DecodeError),
        ("wrong-type", "message", encode({0: 3, 1: 0, 2: 7}), "Close reason is an int",
         DecodeError),
        ("negative-code", "message", encode({0: 3, 1: -1, 2: ""}), "Close code -1 is not a uint",
         DecodeError),
        ("float-for-uint", "message", encode({0: 1, 1: 1.0, 2: 1024}),
         "Welcome version 1.0 is a float", DecodeError),
        ("reason-too-long", "message", encode({0: 3, 1: 0, 2: "x" * 257}),
         "Close reason of 257 bytes", DecodeError),
        ("fingerprint-size", "message", encode({0: 16, 1: 0, 2: bytes(31), 3: b""}),
         "ModelState fingerprint of 31 bytes", DecodeError),
        ("parameters-not-float32", "message", encode({0: 16, 1: 0, 2: bytes(32), 3: bytes(6)}),
         "ModelState parameters of 6 bytes (not a multiple of 4)", DecodeError),
        ("pex-request-zero", "message", encode({0: 17, 1: 0}),
         "PeerExchangeRequest max_peers 0 (1..64)", DecodeError),
        ("pex-request-65", "message", encode({0: 17, 1: 65}),
         "PeerExchangeRequest max_peers 65 (1..64)", DecodeError),
        ("peer-list-host-name", "message", encode({0: 18, 1: [_peer("node.example")]}),
         "PeerList host is a host name, not an IP address literal", DecodeError),
        ("peer-list-host-port", "message", encode({0: 18, 1: [_peer("10.0.0.1:7447")]}),
         "PeerList host carries a port", DecodeError),
        ("peer-list-host-zone", "message", encode({0: 18, 1: [_peer("fe80::1%eth0")]}),
         "PeerList host has an IPv6 zone", DecodeError),
        ("peer-list-host-unspecified", "message", encode({0: 18, 1: [_peer("0.0.0.0")]}),
         "PeerList host is the unspecified address", DecodeError),
        ("peer-list-host-multicast", "message", encode({0: 18, 1: [_peer("224.0.0.251")]}),
         "PeerList host is a multicast address", DecodeError),
        ("peer-list-port-zero", "message", encode({0: 18, 1: [{**_peer("10.0.0.1"), 3: 0}]}),
         "PeerList port 0 (1..65535)", DecodeError),
        ("peer-list-duplicate-id", "message", encode({0: 18, 1: [_peer("10.0.0.1")] * 2}),
         "PeerList names one node id twice", DecodeError),
        ("peer-list-65", "message",
         encode({0: 18, 1: [{**_peer("10.0.0.1"), 1: bytes([i]) * 32} for i in range(65)]}),
         "PeerList of 65 peers (at most 64)", DecodeError),
        ("peer-list-extra-key", "message", encode({0: 18, 1: [{**_peer("10.0.0.1"), 4: 0}]}),
         "peer-info has no key 4", DecodeError),
        ("node-announce-port-65536", "message", encode({0: 19, 1: 65536, 2: []}),
         "NodeAnnounce listen_port 65536 (0..65535)", DecodeError),
        ("node-announce-without-grid", "message", encode({0: 19, 1: 7447}),
         "NodeAnnounce without its grid field (key 2; empty when not on a grid)", DecodeError),
        ("node-announce-grid-coordinate-64", "message", encode({0: 19, 1: 7447, 2: [0, 64]}),
         "NodeAnnounce grid coordinate 64 (each at most 63)", DecodeError),
        ("node-announce-grid-17-dims", "message", encode({0: 19, 1: 7447, 2: [0] * 17}),
         "NodeAnnounce grid of 17 dimensions (at most 16)", DecodeError),
        ("group-invite-model-size-zero", "message",
         encode({0: 20, 1: _GROUP_ID, 2: 1, 3: 0, 4: _FINGERPRINT, 5: 0}),
         "GroupInvite model_size 0 (at least 1)", DecodeError),
        ("group-invite-group-id-size", "message",
         encode({0: 20, 1: bytes(15), 2: 1, 3: 0, 4: _FINGERPRINT, 5: 1}),
         "GroupInvite group_id of 15 bytes (exactly 16)", DecodeError),
        ("group-reply-accept-without-key", "message", encode(_reply(True, b"", b"")),
         "GroupReply accepts but carries no mask key and signature", DecodeError),
        ("group-reply-decline-with-key", "message",
         encode(_reply(False, _MASK_KEY, _SIGNATURE)),
         "GroupReply declines but carries a mask key and signature", DecodeError),
        ("group-reply-accept-without-signature", "message", encode(_reply(True, _MASK_KEY, b"")),
         "GroupReply accepts with a mask key but no signature", DecodeError),
        ("group-start-repeated-member", "message",
         encode(_start([_member(1, "", 7447).to_wire()] * 2)),
         "GroupStart names one identity key twice", DecodeError),
        ("group-start-65-members", "message",
         encode(_start([_member(i, "", 1).to_wire() for i in range(65)])),
         "GroupStart of 65 members (at most 64)", DecodeError),
        ("group-start-member-host-65", "message",
         encode(_start([{**_member(1, "", 1).to_wire(), 4: "h" * 65}])),
         "group-member-info host of 65 bytes (at most 64)", DecodeError),
        ("group-start-member-extra-key", "message",
         encode(_start([{**_member(1, "", 1).to_wire(), 6: 0}])),
         "group-member-info has no key 6", DecodeError),
        ("shard-3-bytes", "message", encode({0: 24, 1: _GROUP_ID, 2: 0, 3: bytes(3)}),
         "Shard data of 3 bytes (not a multiple of 4)", DecodeError),
        ("shard-index-64", "message", encode({0: 24, 1: _GROUP_ID, 2: 64, 3: b""}),
         "Shard index 64 (0..63)", DecodeError),
        ("reduced-shard-6-bytes", "message", encode({0: 25, 1: _GROUP_ID, 2: 0, 3: bytes(6)}),
         "ReducedShard data of 6 bytes (not a multiple of 4)", DecodeError),
        ("model-request-extra-key", "message", encode({0: 26, 1: 0}),
         "ModelRequest has no fields", DecodeError),
        ("text-over-limit", "message", encode({0: 3, 1: 0, 2: "x" * 4097}),
         "text string of 4097 bytes over the default max_text 4096", DecodeLimitError),
        ("payload-with-type", "handshake-payload", encode({**hp, 0: 1}),
         "key 0 is not allowed in the handshake payload", DecodeError),
        ("payload-key-24", "handshake-payload", cbor2.dumps({**hp, 24: 0}, canonical=True),
         "key 24 is neither a field nor a reserved extension key", DecodeError),
        ("payload-versions-unsorted", "handshake-payload", encode({**hp, 3: [2, 1]}),
         "versions not strictly ascending", DecodeError),
        ("payload-versions-empty", "handshake-payload", encode({**hp, 3: []}),
         "at least one version", DecodeError),
        ("payload-versions-17", "handshake-payload", encode({**hp, 3: list(range(1, 18))}),
         "at most 16 versions", DecodeError),
        ("payload-key-size", "handshake-payload", encode({**hp, 1: bytes(33)}),
         "identity key of 33 bytes", DecodeError),
    ]  # fmt: skip
    return [
        {"name": name, "decoder": decoder, "cbor": data.hex(), "reason": reason,
         "error": error.__name__}
        for name, decoder, data, reason, error in cases
    ]  # fmt: skip


def generate() -> dict:
    """The vectors (see the module docstring)."""
    valid = []
    for name, record in _samples():
        number = record.TYPE if isinstance(record, Message) else None
        valid.append(
            {
                "name": name,
                "type": number,
                "class": type(record).__name__,
                "fields": to_json(record),
                "cbor": encode(record.to_wire()).hex(),
            }
        )
    hp = _samples()[0][1]
    extensions = [
        {
            "name": "payload-extension-keys",
            "cbor": encode({**_hp_wire(), 5: "later", 23: [1, {"a": None}]}).hex(),
            "fields": to_json(hp),
            "cbor_without_extensions": encode(hp.to_wire()).hex(),
        }
    ]
    return {
        "description": DESCRIPTION,
        "valid": valid,
        "extensions": extensions,
        "invalid": _invalid(),
        "registry": {str(n): cls.__name__ for n, cls in message_types().items()},
    }


def _decode_as(decoder: str, data: bytes) -> Record:
    if decoder == "handshake-payload":
        return HandshakePayload.decode(data)
    return decode_message(data)


def verify(vectors: dict) -> None:
    """Decode every valid vector, rebuild it from its fields, and check every rejection."""
    classes: dict[str, type[Record]] = {c.__name__: c for c in message_types().values()}
    classes["HandshakePayload"] = HandshakePayload
    for vector in vectors["valid"]:
        data = bytes.fromhex(vector["cbor"])
        cls = classes[vector["class"]]
        decoded = _decode_as("message" if vector["type"] is not None else "handshake-payload", data)
        assert type(decoded) is cls, (vector["name"], decoded)
        assert to_json(decoded) == vector["fields"], vector["name"]
        assert encode(decoded.to_wire()) == data, vector["name"]
        assert encode(from_json(cls, vector["fields"]).to_wire()) == data, vector["name"]
        # The wire bytes are deterministic CBOR on their own, independent of the schema.
        assert encode(decode(data)) == data, vector["name"]
    for vector in vectors["extensions"]:
        decoded = HandshakePayload.decode(bytes.fromhex(vector["cbor"]))
        assert to_json(decoded) == vector["fields"], vector["name"]
        assert decoded.encode().hex() == vector["cbor_without_extensions"], vector["name"]
    for vector in vectors["invalid"]:
        try:
            _decode_as(vector["decoder"], bytes.fromhex(vector["cbor"]))
        except DecodeError as exc:
            assert type(exc).__name__ == vector["error"], (vector["name"], exc)
        else:
            raise AssertionError(f"invalid vector {vector['name']} was accepted")
    assert vectors["registry"] == {str(n): c.__name__ for n, c in message_types().items()}
    covered = {vector["class"] for vector in vectors["valid"]}
    missing = set(classes) - covered
    assert not missing, f"no valid vectors for {sorted(missing)}: add samples to _samples()"
