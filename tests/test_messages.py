"""Message classes (p2pfed.messages): samples of every registered type checked against
spec/messages.cddl with pycddl, round trips, every schema rejection, and fuzzing of the
message decoders."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import cbor2
import pycddl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfed.encoding import DecodeLimits, encode
from p2pfed.errors import CloseCode, DecodeError, DecodeLimitError, LocalProtocolError
from p2pfed.messages import (
    BORROW_MIN,
    MASK_KEY_SIZE,
    SIGNATURE_SIZE,
    UINT64_MAX,
    Bool,
    Bytes,
    Close,
    FieldKind,
    Float,
    GroupAbort,
    GroupInvite,
    GroupMemberInfo,
    GroupPosition,
    GroupReply,
    GroupStart,
    HandshakePayload,
    Int,
    IpAddress,
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
    Text,
    UInt,
    UIntList,
    Welcome,
    decode_message,
    encode_message,
    encode_message_parts,
    message_types,
)

SPEC = Path(__file__).resolve().parent.parent / "spec"
CDDL = (SPEC / "messages.cddl").read_text(encoding="utf-8")
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _member(i: int, host: str = "", port: int = 0) -> GroupMemberInfo:
    """A group member with byte strings derived from ``i`` (keys need not be real here)."""
    return GroupMemberInfo(
        identity_key=bytes([i]) * 32,
        mask_key=bytes([255 - i]) * 32,
        key_signature=bytes([i ^ 0x5A]) * 64,
        host=host,
        port=port,
    )


_GID = bytes(range(16))
# a bulk shard big enough to be borrowed, not copied, by encode_message_parts
_BIG_WORDS = memoryview(bytearray(os.urandom(BORROW_MIN + 4))).toreadonly()


# Every record type and its samples. A newly registered message type must add samples here
# (test_every_registered_type_has_samples fails otherwise), including edge values.
SAMPLES: dict[type[Record], list[Record]] = {
    HandshakePayload: [
        HandshakePayload(
            identity_key=bytes(range(32)),
            signature=bytes(range(64)),
            versions=[1],
            max_message_size=1 << 24,
        ),
        HandshakePayload(
            identity_key=b"\xff" * 32,
            signature=bytes(64),
            versions=list(range(1, 17)),
            max_message_size=UINT64_MAX,
        ),
        HandshakePayload(
            identity_key=bytes(32),
            signature=bytes(64),
            versions=(0, UINT64_MAX),
            max_message_size=0,
        ),
    ],
    Welcome: [
        Welcome(version=1, max_message_size=1 << 28),
        Welcome(version=0, max_message_size=0),
        Welcome(version=UINT64_MAX, max_message_size=UINT64_MAX),
    ],
    Keepalive: [Keepalive()],
    Close: [
        Close(code=CloseCode.NORMAL, reason=""),
        Close(code=CloseCode.MALFORMED_MESSAGE, reason="CBOR map keys not in order at offset 3"),
        Close(code=UINT64_MAX, reason="x" * 256),
        Close(code=4000, reason="é" * 128),
        Close(code=7, reason="\U0001f600" * 64),
    ],
    ModelState: [
        ModelState(round=0, fingerprint=bytes(32), parameters=b""),
        ModelState(
            round=UINT64_MAX,
            fingerprint=b"\xff" * 32,
            parameters=struct.pack("<3f", 1.0, -2.5, float("inf")),
        ),
        ModelState(round=12, fingerprint=bytes(range(32)), parameters=os.urandom(4096)),
    ],
    PeerExchangeRequest: [PeerExchangeRequest(max_peers=1), PeerExchangeRequest(max_peers=64)],
    PeerList: [
        PeerList(peers=[]),
        PeerList(
            peers=[
                PeerInfo(node_id=bytes(range(32)), host="192.168.1.7", port=7447),
                PeerInfo(node_id=b"\xff" * 32, host="fd00::7", port=1),
                PeerInfo(node_id=bytes(32), host="::ffff:192.0.2.1", port=65535),
            ]
        ),
        PeerList(
            peers=[
                PeerInfo(node_id=bytes([i]) * 32, host=f"10.0.{i}.255", port=1024 + i)
                for i in range(64)
            ]
        ),
    ],
    NodeAnnounce: [
        NodeAnnounce(listen_port=0),
        NodeAnnounce(listen_port=7447),
        NodeAnnounce(listen_port=65535),
        NodeAnnounce(listen_port=7447, grid=(0, 8, 3)),
        NodeAnnounce(listen_port=7447, grid=tuple(range(16))),
    ],
    GroupInvite: [
        GroupInvite(group_id=bytes(16), priority=0, round=0, fingerprint=bytes(32), model_size=1),
        GroupInvite(
            group_id=b"\xff" * 16,
            priority=UINT64_MAX,
            round=UINT64_MAX,
            fingerprint=b"\xff" * 32,
            model_size=UINT64_MAX,
        ),
        GroupInvite(
            group_id=_GID,
            priority=1 << 63,
            round=3,
            fingerprint=bytes(range(32)),
            model_size=101_770,
        ),
    ],
    GroupReply: [
        GroupReply(
            group_id=_GID,
            accept=True,
            reason="",
            mask_key=bytes(range(32)),
            key_signature=bytes(range(64)),
            listen_port=7447,
        ),
        GroupReply(
            group_id=b"\xff" * 16,
            accept=True,
            reason="x" * 256,
            mask_key=b"\xff" * 32,
            key_signature=b"\xff" * 64,
            listen_port=0,
        ),
        GroupReply(
            group_id=_GID,
            accept=False,
            reason="busy: initiating a group",
            mask_key=b"",
            key_signature=b"",
            listen_port=65535,
        ),
        GroupReply(
            group_id=bytes(16),
            accept=False,
            reason="é" * 128,
            mask_key=memoryview(b""),  # type: ignore[arg-type]  # a non-bulk view: stored as bytes
            key_signature=b"",
            listen_port=0,
        ),
    ],
    GroupStart: [
        GroupStart(group_id=bytes(16), round=0, nonce=bytes(32), members=[]),
        GroupStart(
            group_id=_GID,
            round=5,
            nonce=bytes(range(32)),
            members=[
                _member(1),
                _member(2, "192.168.1.7", 7447),
                _member(3, "fd00::7", 65535),
            ],
        ),
        GroupStart(
            group_id=b"\xff" * 16,
            round=UINT64_MAX,
            nonce=b"\xff" * 32,
            members=[_member(i, "h" * 64 if i % 2 else "", i * 1000) for i in range(64)],
        ),
    ],
    GroupAbort: [
        GroupAbort(group_id=bytes(16), reason=""),
        GroupAbort(group_id=_GID, reason="member 3 lost: channel closed"),
        GroupAbort(group_id=b"\xff" * 16, reason="é" * 128),
        GroupAbort(group_id=_GID, reason="\U0001f600" * 64),
    ],
    Shard: [
        Shard(group_id=bytes(16), index=0, data=b""),
        Shard(group_id=_GID, index=63, data=os.urandom(4096)),
        Shard(group_id=_GID, index=7, data=memoryview(struct.pack("<3I", 0, 1, 2**32 - 1))),
        Shard(group_id=b"\xff" * 16, index=2, data=_BIG_WORDS),
    ],
    ReducedShard: [
        ReducedShard(group_id=bytes(16), index=0, data=b""),
        ReducedShard(group_id=b"\xff" * 16, index=63, data=b"\xff" * 4),
        ReducedShard(group_id=_GID, index=1, data=memoryview(bytes(range(256)))),
        ReducedShard(group_id=_GID, index=5, data=_BIG_WORDS),
    ],
    ModelRequest: [ModelRequest()],
    GroupPosition: [
        GroupPosition(round=0, step=0, key=(), size=1),
        GroupPosition(round=41, step=2, key=(3, 0), size=64),
        GroupPosition(round=2**64 - 1, step=15, key=tuple(range(15)), size=2**64 - 1),
    ],
}
ALL_SAMPLES = [(cls, sample) for cls, samples in SAMPLES.items() for sample in samples]
SAMPLE_IDS = [
    f"{cls.__name__}-{i}" for cls, samples in SAMPLES.items() for i in range(len(samples))
]


def rule_name(cls: type[Record]) -> str:
    """The CDDL rule of a record class: ModelState -> model-state."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", cls.__name__).lower()


def schema_for(cls: type[Record]) -> pycddl.Schema:
    return pycddl.Schema(f"root = {rule_name(cls)}\n{CDDL}")


MESSAGE_SCHEMA = pycddl.Schema(CDDL)  # the first rule is `message`
SCHEMAS = {cls: schema_for(cls) for cls in SAMPLES}


def encode_record(record: Record) -> bytes:
    return encode_message(record) if isinstance(record, Message) else encode(record.to_wire())


def decode_record(cls: type[Record], data: bytes) -> Record:
    return decode_message(data) if issubclass(cls, Message) else HandshakePayload.decode(data)


def cbor2_canonical(record: Record) -> bytes:
    """cbor2's canonical encoding of a record, as an independent check of ours (cbor2
    would write a memoryview as an array of integers, so bulk views become bytes first)."""

    def plain(value: object) -> object:
        if isinstance(value, memoryview):
            return value.tobytes()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return cbor2.dumps(plain(record.to_wire()), canonical=True)


# -- registry and samples ---------------------------------------------------------------


def test_every_registered_type_has_samples() -> None:
    for number, cls in message_types().items():
        assert SAMPLES.get(cls), f"message type {number} ({cls.__name__}) has no test samples"


def test_registry_contents() -> None:
    expected = {1: Welcome, 2: Keepalive, 3: Close, 16: ModelState}
    expected |= {17: PeerExchangeRequest, 18: PeerList, 19: NodeAnnounce}
    expected |= {20: GroupInvite, 21: GroupReply, 22: GroupStart, 23: GroupAbort}
    expected |= {24: Shard, 25: ReducedShard, 26: ModelRequest, 27: GroupPosition}
    assert message_types() == expected
    assert list(message_types()) == sorted(expected)
    for number, cls in message_types().items():
        assert number == cls.TYPE
        assert 1 <= number <= 63, "types 64.. are reserved (spec/encoding.md)"
        assert all(1 <= kind.key <= 23 for _, kind in cls.SCHEMA)


def test_registry_table_in_spec_lists_every_type() -> None:
    text = (SPEC / "encoding.md").read_text(encoding="utf-8")
    for number, cls in message_types().items():
        assert re.search(rf"^\| {number} \| {cls.__name__} \|", text, re.MULTILINE), (
            f"spec/encoding.md registry table lacks type {number} {cls.__name__}"
        )


def test_every_registered_type_has_a_cddl_rule_in_the_message_choice() -> None:
    # the `message` rule runs from "message = " to the first blank line
    choice = re.search(r"^message = (.*?)\n\n", CDDL, re.MULTILINE | re.DOTALL)
    assert choice is not None
    alternatives = {a.strip() for a in choice.group(1).split("/")}
    assert len(alternatives) == len(message_types())
    for cls in message_types().values():
        assert rule_name(cls) in alternatives
        assert re.search(rf"^{rule_name(cls)} = \{{", CDDL, re.MULTILINE)


@pytest.mark.parametrize(("cls", "sample"), ALL_SAMPLES, ids=SAMPLE_IDS)
def test_samples_match_the_cddl(cls: type[Record], sample: Record) -> None:
    data = encode_record(sample)
    SCHEMAS[cls].validate_cbor(data)
    if isinstance(sample, Message):
        MESSAGE_SCHEMA.validate_cbor(data)


@pytest.mark.parametrize(("cls", "sample"), ALL_SAMPLES, ids=SAMPLE_IDS)
def test_samples_round_trip(cls: type[Record], sample: Record) -> None:
    data = encode_record(sample)
    assert data == encode_record(sample)
    assert data == cbor2_canonical(sample)
    decoded = decode_record(cls, data)
    assert type(decoded) is cls
    assert decoded == sample
    assert encode_record(decoded) == data


def _member_wire(i: int, **changes: object) -> dict[int, object]:
    return {**_member(i).to_wire(), **{int(k[1:]): v for k, v in changes.items()}}


def _reply_wire(accept: object, key: bytes, signature: bytes) -> dict[object, object]:
    return {0: 21, 1: _GID, 2: accept, 3: "", 4: key, 5: signature, 6: 7447}


def _start_wire(members: list[dict[int, object]]) -> dict[object, object]:
    return {0: 22, 1: _GID, 2: 1, 3: bytes(32), 4: members}


def _invite_wire(**changes: object) -> dict[object, object]:
    wire: dict[object, object] = {0: 20, 1: _GID, 2: 9, 3: 1, 4: bytes(32), 5: 10}
    return {**wire, **{int(k[1:]): v for k, v in changes.items()}}


# Schema violations: the CDDL and the decoder must both reject them.
CDDL_VIOLATIONS: list[tuple[type[Record], dict[object, object]]] = [
    (Close, {0: 3, 1: 0, 2: 5}),  # wrong type
    (Close, {0: 3, 1: "1", 2: ""}),  # wrong type
    (Close, {0: 3, 1: -1, 2: ""}),  # negative code
    (Close, {0: 3, 1: 0}),  # missing field
    (Close, {0: 3, 2: "x"}),  # missing field
    (Close, {0: 3, 1: 0, 2: "", 3: 0}),  # unknown key
    (Close, {0: 3, 1: 0, 2: "x" * 257}),  # reason too long
    (Close, {0: 4, 1: 0, 2: ""}),  # wrong type number
    (Welcome, {0: 1, 1: 1.0, 2: 10}),  # float for uint
    (Welcome, {0: 1, 1: 1}),
    (Keepalive, {0: 2, 1: None}),
    (ModelState, {0: 16, 1: 0, 2: bytes(31), 3: b""}),  # fingerprint size
    (ModelState, {0: 16, 1: 0, 2: bytes(32), 3: "params"}),
    (HandshakePayload, {1: bytes(32), 2: bytes(64), 3: [], 4: 1}),  # no versions
    (HandshakePayload, {1: bytes(32), 2: bytes(64), 3: list(range(17)), 4: 1}),
    (HandshakePayload, {1: bytes(32), 2: bytes(63), 3: [1], 4: 1}),
    (HandshakePayload, {0: 1, 1: bytes(32), 2: bytes(64), 3: [1], 4: 1}),  # key 0
    (HandshakePayload, {1: bytes(32), 2: bytes(64), 3: [1]}),
    (NodeAnnounce, {0: 19}),
    (NodeAnnounce, {0: 19, 1: 65536}),
    (NodeAnnounce, {0: 19, 1: -1}),
    (NodeAnnounce, {0: 19, 1: 80}),  # grid is required (empty: not on a grid)
    (NodeAnnounce, {0: 19, 1: 80, 2: "10.0.0.1"}),  # grid must be an array
    (NodeAnnounce, {0: 19, 1: 80, 2: [64]}),  # coordinate beyond the largest side
    (NodeAnnounce, {0: 19, 1: 80, 2: list(range(17))}),  # more than 16 dimensions
    (NodeAnnounce, {0: 19, 1: 80, 2: [-1]}),
    (GroupInvite, _invite_wire(k1=bytes(15))),  # group id size
    (GroupInvite, _invite_wire(k5=0)),  # model_size 0
    (GroupInvite, _invite_wire(k4=bytes(33))),
    (GroupInvite, _invite_wire(k2=-1)),
    (GroupReply, _reply_wire(True, b"", b"")),  # acceptance without key
    (GroupReply, _reply_wire(False, bytes(32), bytes(64))),  # refusal with key
    (GroupReply, _reply_wire(True, bytes(32), b"")),
    (GroupReply, _reply_wire(False, b"", bytes(64))),
    (GroupReply, _reply_wire(True, bytes(31), bytes(64))),
    (GroupReply, _reply_wire(1, bytes(32), bytes(64))),  # int for bool
    (GroupReply, {**_reply_wire(False, b"", b""), 6: 65536}),
    (GroupReply, {**_reply_wire(False, b"", b""), 3: "x" * 257}),
    (GroupStart, {**_start_wire([_member_wire(1)]), 3: bytes(31)}),  # nonce size
    (GroupStart, _start_wire([_member_wire(i) for i in range(65)])),  # 65 members
    (GroupStart, _start_wire([_member_wire(1, k4="h" * 65)])),  # host of 65 bytes
    (GroupStart, _start_wire([_member_wire(1, k3=bytes(63))])),
    (GroupStart, _start_wire([_member_wire(1, k5=65536)])),
    (GroupStart, {0: 22, 1: _GID, 2: 1, 3: bytes(32)}),  # no members
    (GroupAbort, {0: 23, 1: _GID}),
    (GroupAbort, {0: 23, 1: _GID, 2: "x" * 257}),
    (Shard, {0: 24, 1: _GID, 2: 64, 3: b""}),  # index over 63
    (Shard, {0: 24, 1: _GID, 2: 0, 3: "data"}),
    (ReducedShard, {0: 25, 1: _GID, 2: 64, 3: b""}),
    (ReducedShard, {0: 25, 1: bytes(17), 2: 0, 3: b""}),
    (ModelRequest, {0: 26, 1: 0}),
    (GroupPosition, {0: 27, 1: 0, 2: 0, 3: []}),  # size is required
    (GroupPosition, {0: 27, 1: 0, 2: 0, 3: [], 4: 0}),  # size 0: no round has no nodes
    (GroupPosition, {0: 27, 1: 0, 2: 16, 3: [], 4: 3}),  # at most 16 steps
    (GroupPosition, {0: 27, 1: 0, 2: 1, 3: [64], 4: 3}),  # index beyond the largest group
    (GroupPosition, {0: 27, 1: 0, 2: 1, 3: list(range(16)), 4: 3}),  # key too long
]


@pytest.mark.parametrize(("cls", "wire"), CDDL_VIOLATIONS, ids=repr)
def test_cddl_and_decoder_reject_schema_violations(
    cls: type[Record], wire: dict[object, object]
) -> None:
    data = cbor2.dumps(wire, canonical=True)
    with pytest.raises(pycddl.ValidationError):
        SCHEMAS[cls].validate_cbor(data)
    with pytest.raises(DecodeError):
        decode_record(cls, data)


@pytest.mark.parametrize(
    ("message", "record", "item"),
    [
        (18, PeerInfo, {1: bytes(32), 2: "10.0.0.1", 3: 7447, 4: 0}),
        (22, GroupMemberInfo, _member_wire(1, k6=0)),
    ],
)
def test_nested_records_are_closed(
    message: int, record: type[Record], item: dict[int, object]
) -> None:
    wire = _start_wire([item]) if message == 22 else {0: 18, 1: [item]}
    with pytest.raises(DecodeError, match=f"item 0: {record.__name__}: unknown key"):
        decode_message(encode(wire))
    # pycddl 0.6 (cddl-rs) is lax about extra keys in a map nested in an array, so the
    # record's own rule is checked on its own
    with pytest.raises(pycddl.ValidationError):
        schema_for(record).validate_cbor(encode(item))


def test_cddl_message_choice_rejects_non_messages() -> None:
    # pycddl 0.6 (cddl-rs) is lax inside a choice of map types: it accepts some arrays
    # ([0, 2]) and extra keys ({0: 2, 1: 0}) for `message`. Each rule on its own rejects
    # them (test_cddl_and_decoder_reject_schema_violations), and so does the decoder.
    for wire in ({0: 99}, {1: 2}, {0: 3, 1: 0}, {0: 3, 1: 0, 2: 5}, {}):
        with pytest.raises(pycddl.ValidationError):
            MESSAGE_SCHEMA.validate_cbor(cbor2.dumps(wire, canonical=True))
    for cls in SAMPLES:
        with pytest.raises(pycddl.ValidationError):
            SCHEMAS[cls].validate_cbor(cbor2.dumps([0, 2]))


# -- decoding errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (
            {0: 3, 1: 0, 2: 5},
            "Close: field 'reason' (key 2) must be a text string of at most 256 bytes, got int",
        ),
        (
            {0: 3, 1: 0, 2: "x" * 300},
            "Close: field 'reason' (key 2) must be a text string of at most 256 bytes, "
            "got 300 bytes",
        ),
        ({0: 3, 1: 0}, "Close: missing required field 'reason' (key 2)"),
        ({0: 99}, "unknown message type 99"),
        ({0: 2, 5: 0}, "Keepalive: unknown key 5 (known keys: 0; version 1 schemas are closed)"),
        ({0: 2, "x": 0}, "unknown key 'x'"),
        ({1: 1}, "message has no type: key 0 is missing"),
        ({0: "close"}, "message type (key 0) must be an unsigned integer, got text string"),
        ({0: -3}, "message type (key 0) must be an unsigned integer, got -3"),
        ({0: True}, "message type (key 0) must be an unsigned integer, got bool"),
        ({0: 1.0}, "message type (key 0) must be an unsigned integer, got float"),
        ([0, 2], "a message must be a CBOR map with its type under key 0, got array"),
        (
            {0: 1, 1: True, 2: 0},
            "Welcome: field 'version' (key 1) must be an unsigned integer (0 to 2**64 - 1), "
            "got bool",
        ),
        (
            {0: 16, 1: 0, 2: bytes(32), 3: bytes(5)},
            "ModelState: field 'parameters' (key 3) must be a byte string whose length is a "
            "multiple of 4, got 5 bytes",
        ),
        (
            {0: 16, 1: 0, 2: b"", 3: b""},
            "ModelState: field 'fingerprint' (key 2) must be a byte string of exactly 32 bytes, "
            "got 0 bytes",
        ),
        (
            {0: 19, 1: 65536},
            "NodeAnnounce: field 'listen_port' (key 1) must be an unsigned integer from 0 to "
            "65535, got 65536",
        ),
        (
            _invite_wire(k5=0),
            "GroupInvite: field 'model_size' (key 5) must be an unsigned integer from 1 to "
            "18446744073709551615, got 0",
        ),
        (
            _reply_wire(True, b"", b""),
            "GroupReply: an acceptance carries a 32-byte mask key and a 64-byte signature, "
            "a refusal carries neither",
        ),
        (
            _start_wire([_member_wire(1), _member_wire(2), _member_wire(1)]),
            "GroupStart: field 'members' (key 4) must be an array of at most 64 GroupMemberInfo "
            "maps with distinct identity_keys, got a repeated identity_key at index 2",
        ),
        (
            _start_wire([_member_wire(1), _member_wire(2, k4="h" * 65)]),
            "GroupStart: field 'members' (key 4): item 1: GroupMemberInfo: field 'host' (key 4) "
            "must be a text string of at most 64 bytes, got 65 bytes",
        ),
        (
            {0: 24, 1: _GID, 2: 64, 3: b""},
            "Shard: field 'index' (key 2) must be an unsigned integer from 0 to 63, got 64",
        ),
        (
            {0: 25, 1: _GID, 2: 0, 3: bytes(3)},
            "ReducedShard: field 'data' (key 3) must be a byte string whose length is a "
            "multiple of 4, got 3 bytes",
        ),
    ],
    ids=repr,
)
def test_decode_message_errors(wire: object, message: str) -> None:
    data = cbor2.dumps(wire, canonical=True)
    with pytest.raises(DecodeError) as info:
        decode_message(data)
    assert message in str(info.value)
    assert info.value.code == CloseCode.MALFORMED_MESSAGE


def test_decode_message_rejects_bad_cbor_with_decode_error() -> None:
    with pytest.raises(DecodeError, match="non-shortest"):
        decode_message(bytes.fromhex("a1001802"))
    with pytest.raises(DecodeError, match="trailing"):
        decode_message(bytes.fromhex("a1000200"))


def test_decode_message_applies_limits() -> None:
    big = ModelState(round=1, fingerprint=bytes(32), parameters=bytes(1 << 20))
    data = encode_message(big)
    with pytest.raises(DecodeLimitError):
        decode_message(data, DecodeLimits(max_bytes=1 << 20))
    assert decode_message(data, DecodeLimits(max_bytes=2 << 20)) == big


def test_handshake_payload_is_not_a_message() -> None:
    payload = SAMPLES[HandshakePayload][0]
    assert isinstance(payload, HandshakePayload)
    with pytest.raises(LocalProtocolError, match="not a registered message type"):
        encode_message(payload)  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="no type"):
        decode_message(payload.encode())


def test_handshake_payload_ignores_reserved_keys_only() -> None:
    payload = SAMPLES[HandshakePayload][0]
    assert isinstance(payload, HandshakePayload)
    wire = payload.to_wire()
    extended = encode({**wire, 5: "future", 23: [1, {"a": None}]})
    SCHEMAS[HandshakePayload].validate_cbor(extended)
    assert HandshakePayload.decode(extended) == payload
    for key in (0, 24, 100):
        data = cbor2.dumps({**wire, key: 0}, canonical=True)
        with pytest.raises(DecodeError, match=f"unknown key {key}"):
            HandshakePayload.decode(data)
        with pytest.raises(pycddl.ValidationError):
            SCHEMAS[HandshakePayload].validate_cbor(data)
    with pytest.raises(DecodeError, match="unknown key 'x'"):
        mixed: dict[object, object] = {k: v for k, v in wire.items()}
        mixed["x"] = 1
        HandshakePayload.decode(cbor2.dumps(mixed, canonical=True))


def test_handshake_payload_versions_must_ascend_strictly() -> None:
    wire = SAMPLES[HandshakePayload][0].to_wire()
    for versions in ([2, 1], [1, 1], [1, 3, 2]):
        with pytest.raises(DecodeError, match="strictly ascending"):
            HandshakePayload.decode(encode({**wire, 3: versions}))


# -- node protocol rules that span fields or items ---------------------------------------


@pytest.mark.parametrize(
    ("accept", "key", "signature"),
    [
        (True, b"", b""),
        (False, bytes(32), bytes(64)),
        (True, bytes(32), b""),
        (True, b"", bytes(64)),
        (False, bytes(32), b""),
        (False, b"", bytes(64)),
    ],
)
def test_group_reply_key_and_signature_must_match_accept(
    accept: bool, key: bytes, signature: bytes
) -> None:
    rule = "an acceptance carries a 32-byte mask key and a 64-byte signature"
    with pytest.raises(LocalProtocolError, match=rule):
        GroupReply(
            group_id=_GID,
            accept=accept,
            reason="",
            mask_key=key,
            key_signature=signature,
            listen_port=1,
        )
    # The same rule, broken by a peer, is a decode error (close with MALFORMED_MESSAGE),
    # not a LocalProtocolError, and the CDDL rejects it too.
    data = encode(_reply_wire(accept, key, signature))
    with pytest.raises(DecodeError, match=rule) as info:
        decode_message(data)
    assert info.value.code == CloseCode.MALFORMED_MESSAGE
    assert not isinstance(info.value, LocalProtocolError)
    with pytest.raises(pycddl.ValidationError):
        SCHEMAS[GroupReply].validate_cbor(data)


def test_group_start_rejects_repeated_identity_keys() -> None:
    with pytest.raises(LocalProtocolError, match="repeated identity_key at index 1"):
        GroupStart(group_id=_GID, round=1, nonce=bytes(32), members=[_member(4), _member(4)])
    # same identity, different mask keys and addresses: still the same member twice
    twin = dataclasses.replace(_member(1), mask_key=bytes(32), host="10.0.0.2", port=9)
    with pytest.raises(LocalProtocolError, match="repeated identity_key at index 2"):
        GroupStart(group_id=_GID, round=1, nonce=bytes(32), members=[_member(1), _member(2), twin])
    data = encode(_start_wire([_member_wire(1), _member_wire(1)]))
    with pytest.raises(DecodeError, match="repeated identity_key at index 1"):
        decode_message(data)
    # CDDL cannot say "distinct": the rule lives in a comment, so pycddl accepts the bytes
    SCHEMAS[GroupStart].validate_cbor(data)


@pytest.mark.parametrize("cls", [Shard, ReducedShard])
def test_shards_must_hold_whole_words_and_a_valid_index(cls: type[Shard | ReducedShard]) -> None:
    for size in (1, 3, 5, 4099):
        for data in (bytes(size), memoryview(bytes(size))):
            with pytest.raises(LocalProtocolError, match=f"multiple of 4, got {size} bytes"):
                cls(group_id=_GID, index=0, data=data)
        data = encode({0: cls.TYPE, 1: _GID, 2: 0, 3: bytes(size)})
        with pytest.raises(DecodeError, match=f"multiple of 4, got {size} bytes"):
            decode_message(data)
        SCHEMAS[cls].validate_cbor(data)  # whole words are a rule in a CDDL comment
    for index in (64, 65, UINT64_MAX):
        with pytest.raises(LocalProtocolError, match=f"from 0 to 63, got {index}"):
            cls(group_id=_GID, index=index, data=b"")
        with pytest.raises(DecodeError, match=f"from 0 to 63, got {index}"):
            decode_message(encode({0: cls.TYPE, 1: _GID, 2: index, 3: b""}))
    with pytest.raises(LocalProtocolError, match="not a flat byte buffer"):
        cls(group_id=_GID, index=0, data=memoryview(bytes(8)).cast("I"))


def test_shard_parts_borrow_the_senders_buffer() -> None:
    words = bytearray(os.urandom(2 * BORROW_MIN))
    shard = Shard(group_id=_GID, index=3, data=memoryview(words).toreadonly())
    assert isinstance(shard.data, memoryview) and shard.data.readonly
    parts = encode_message_parts(shard)
    assert b"".join(parts) == encode_message(shard)
    assert any(isinstance(p, memoryview) and p.obj is words for p in parts)
    data = bytearray(encode_message(shard))
    borrowed = decode_message(data, DecodeLimits(max_bytes=len(data)), borrow=True)
    assert isinstance(borrowed, Shard) and isinstance(borrowed.data, memoryview)
    assert borrowed == shard


# -- construction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: Close(code=-1, reason=""),
        lambda: Close(code=0, reason="x" * 257),
        lambda: Close(code=0, reason="\ud800"),
        lambda: Close(code=1 << 64, reason=""),
        lambda: Close(code=0, reason=b"bytes"),  # type: ignore[arg-type]
        lambda: Welcome(version=True, max_message_size=1),
        lambda: Welcome(version=1.0, max_message_size=1),  # type: ignore[arg-type]
        lambda: ModelState(round=0, fingerprint=bytes(32), parameters=bytearray(4)),  # type: ignore[arg-type]
        lambda: ModelState(round=0, fingerprint=bytes(32), parameters=bytes(3)),
        lambda: ModelState(round=0, fingerprint=bytes(33), parameters=b""),
        lambda: HandshakePayload(
            identity_key=bytes(32), signature=bytes(64), versions=[], max_message_size=1
        ),
        lambda: HandshakePayload(
            identity_key=bytes(32), signature=bytes(64), versions=[3, 2], max_message_size=1
        ),
        lambda: HandshakePayload(
            identity_key=bytes(32), signature=bytes(64), versions=[-1], max_message_size=1
        ),
        lambda: NodeAnnounce(listen_port=65536),
        lambda: NodeAnnounce(listen_port=-1),
        lambda: GroupInvite(
            group_id=_GID, priority=0, round=0, fingerprint=bytes(32), model_size=0
        ),
        lambda: GroupInvite(
            group_id=bytes(8), priority=0, round=0, fingerprint=bytes(32), model_size=1
        ),
        lambda: GroupReply(
            group_id=_GID,
            accept=1,  # type: ignore[arg-type]
            reason="",
            mask_key=b"",
            key_signature=b"",
            listen_port=0,
        ),
        lambda: GroupStart(group_id=_GID, round=0, nonce=bytes(31), members=[]),
        lambda: GroupStart(
            group_id=_GID, round=0, nonce=bytes(32), members=[_member(i) for i in range(65)]
        ),
        lambda: GroupStart(
            group_id=_GID,
            round=0,
            nonce=bytes(32),
            members=[PeerInfo(node_id=bytes(32), host="10.0.0.1", port=1)],  # type: ignore[list-item]
        ),
        lambda: _member(1, host="h" * 65),
        lambda: _member(1, port=65536),
        lambda: GroupAbort(group_id=_GID, reason="x" * 257),
        lambda: Shard(group_id=_GID, index=64, data=b""),
        lambda: Shard(group_id=_GID, index=0, data=bytes(3)),
        lambda: ReducedShard(group_id=_GID, index=0, data=bytearray(4)),  # type: ignore[arg-type]
    ],
)
def test_invalid_construction_is_a_local_error(build: object) -> None:
    assert callable(build)
    with pytest.raises(LocalProtocolError):
        build()


def test_messages_are_frozen_and_normalized() -> None:
    close = Close(code=CloseCode.SHUTTING_DOWN, reason="bye")
    assert type(close.code) is int and close.code == 7
    with pytest.raises(AttributeError):
        close.code = 1  # type: ignore[misc]
    payload = HandshakePayload(
        identity_key=bytes(32), signature=bytes(64), versions=[1, 2], max_message_size=9
    )
    assert payload.versions == (1, 2)
    assert payload == HandshakePayload(
        identity_key=bytes(32), signature=bytes(64), versions=(1, 2), max_message_size=9
    )
    assert hash(payload) == hash(HandshakePayload.decode(payload.encode()))


def test_close_code_property() -> None:
    assert Close(code=3, reason="").close_code is CloseCode.MALFORMED_MESSAGE
    assert Close(code=4000, reason="").close_code is None
    assert decode_message(encode({0: 3, 1: 4000, 2: "new"})) == Close(code=4000, reason="new")


def test_repr_abbreviates_long_byte_strings() -> None:
    state = ModelState(round=1, fingerprint=bytes(32), parameters=bytes(1 << 20))
    text = repr(state)
    assert len(text) < 200
    assert "1048576 bytes" in text
    assert repr(Keepalive()) == "Keepalive()"


def test_64_mib_model_state_round_trips() -> None:
    params = os.urandom(64 * 1024 * 1024)
    state = ModelState(round=9, fingerprint=bytes(range(32)), parameters=params)
    data = encode_message(state)
    limits = DecodeLimits(max_bytes=len(data))
    assert decode_message(data, limits) == state
    assert decode_message(memoryview(data), limits) == state


# -- property-based tests ---------------------------------------------------------------


def _bytes_strategy(kind: Bytes) -> st.SearchStrategy[bytes | memoryview]:
    if kind.size is not None:
        return st.binary(min_size=kind.size, max_size=kind.size)
    unit = kind.multiple_of
    top = kind.max_size if kind.max_size is not None else 256
    values = st.integers(-(-kind.min_size // unit), top // unit).flatmap(
        lambda n: st.binary(min_size=n * unit, max_size=n * unit)
    )
    # bulk fields also take views, as senders pass views of their arrays
    views: st.SearchStrategy[bytes | memoryview] = values.map(lambda b: memoryview(b))
    return values | views if kind.bulk else values


def _text_strategy(kind: Text) -> st.SearchStrategy[str]:
    limit = kind.max_bytes
    return st.text(max_size=limit // 4) | st.text(
        alphabet="xé", min_size=limit // 2, max_size=limit
    ).filter(lambda s: len(s.encode("utf-8")) <= limit)


def strategy_for(kind: FieldKind) -> st.SearchStrategy[object]:
    """Valid values of a field kind; a new kind must be added here."""
    if isinstance(kind, UInt | Int):
        return st.integers(kind.min, kind.max)
    if isinstance(kind, Bool):
        return st.booleans()
    if isinstance(kind, Float):
        return st.floats(allow_nan=not kind.finite, allow_infinity=not kind.finite)
    if isinstance(kind, Bytes):
        return _bytes_strategy(kind)
    if isinstance(kind, Text):
        return _text_strategy(kind)
    if isinstance(kind, UIntList):
        items = st.lists(
            st.integers(0, kind.item_max),
            min_size=kind.min_len,
            max_size=kind.max_len,
            unique=kind.strictly_ascending,
        )
        return items.map(sorted) if kind.strictly_ascending else items
    if isinstance(kind, IpAddress):
        addresses = st.ip_addresses().filter(lambda a: not (a.is_unspecified or a.is_multicast))
        return addresses.map(str)
    if isinstance(kind, RecordList):
        unique_by = None if kind.unique is None else _attribute_getter(kind.unique)
        return st.lists(records(kind.record), max_size=kind.max_len, unique_by=unique_by)
    raise AssertionError(f"no hypothesis strategy for field kind {kind!r}")


def _attribute_getter(name: str) -> Callable[[object], object]:
    return lambda item: getattr(item, name)


def _fields(cls: type[Record]) -> dict[str, st.SearchStrategy[object]]:
    return {name: strategy_for(kind) for name, kind in cls.SCHEMA}


def _group_replies() -> st.SearchStrategy[Record]:
    """GroupReply's key and signature depend on ``accept``: both full-size, or both empty."""

    def reply(accept: bool) -> st.SearchStrategy[Record]:
        key, signature = (MASK_KEY_SIZE, SIGNATURE_SIZE) if accept else (0, 0)
        return st.builds(
            GroupReply,
            **{
                **_fields(GroupReply),
                "accept": st.just(accept),
                "mask_key": st.binary(min_size=key, max_size=key),
                "key_signature": st.binary(min_size=signature, max_size=signature),
            },
        )

    return st.booleans().flatmap(reply)


# Records with rules across fields (__post_init__) that per-field strategies cannot meet.
CROSS_FIELD_STRATEGIES: dict[type[Record], Callable[[], st.SearchStrategy[Record]]] = {
    GroupReply: _group_replies,
}


def records(cls: type[Record]) -> st.SearchStrategy[Record]:
    if cls in CROSS_FIELD_STRATEGIES:
        return CROSS_FIELD_STRATEGIES[cls]()
    return st.builds(cls, **_fields(cls))


any_record = st.sampled_from(sorted(SAMPLES, key=lambda c: c.__name__)).flatmap(records)


@FUZZ
@given(any_record)
def test_random_valid_records_round_trip_and_match_the_cddl(record: Record) -> None:
    cls = type(record)
    data = encode_record(record)
    assert data == cbor2_canonical(record)
    SCHEMAS[cls].validate_cbor(data)
    assert decode_record(cls, data) == record


@FUZZ
@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    for decoder in (decode_message, HandshakePayload.decode):
        with contextlib.suppress(DecodeError):
            decoder(data)


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 64), (1 << 64) - 1)
    | st.floats()
    | st.binary(max_size=70)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.integers(0, 23), children, max_size=4)
    ),
    max_leaves=10,
)


@FUZZ
@given(
    st.sampled_from([0, 1, 2, 3, *range(16, 27), 99]),
    st.dictionaries(st.integers(1, 23), wire_values, max_size=5),
)
def test_random_maps_decode_or_raise_decode_error(number: int, fields: dict[int, object]) -> None:
    data = encode({0: number, **fields})
    try:
        message = decode_message(data)
    except DecodeError:
        return
    assert encode_message(message) == data


@FUZZ
@given(any_record, st.data())
def test_mutated_messages_decode_or_raise_decode_error(record: Record, draw: st.DataObject) -> None:
    data = bytearray(encode_record(record))
    for _ in range(draw.draw(st.integers(1, 3))):
        if not data:
            break
        where = draw.draw(st.integers(0, len(data) - 1))
        action = draw.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if action == "flip":
            data[where] ^= 1 << draw.draw(st.integers(0, 7))
        elif action == "truncate":
            del data[where:]
        elif action == "insert":
            data[where:where] = draw.draw(st.binary(min_size=1, max_size=3))
        else:
            del data[where]
    mutated = bytes(data)
    try:
        message = decode_message(mutated)
    except DecodeError:
        pass
    else:  # anything accepted is a valid message in its one deterministic encoding
        assert encode_message(message) == mutated
    with contextlib.suppress(DecodeError):
        HandshakePayload.decode(mutated)


# -- zero-copy paths used by the secure channel ----------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, UINT64_MAX),
    st.binary(min_size=32, max_size=32),
    st.integers(0, 40_000).map(lambda n: n * 4),
)
def test_parts_concatenate_to_the_encoding(round_: int, fingerprint: bytes, size: int) -> None:
    message = ModelState(round=round_, fingerprint=fingerprint, parameters=bytes(size))
    parts = encode_message_parts(message)
    assert b"".join(parts) == encode_message(message)
    if size >= BORROW_MIN:  # the tensor itself is passed through, not copied
        assert any(isinstance(p, memoryview) and p.obj is message.parameters for p in parts)


def test_parts_of_every_registered_type() -> None:
    for cls in message_types().values():
        for sample in SAMPLES[cls]:
            assert isinstance(sample, Message)
            assert b"".join(encode_message_parts(sample)) == encode_message(sample), cls


def test_borrowed_decode_returns_read_only_views_of_the_input() -> None:
    params = bytes(range(256)) * (BORROW_MIN // 256 + 1)
    data = bytearray(encode_message(ModelState(round=1, fingerprint=bytes(32), parameters=params)))
    borrowed = decode_message(data, DecodeLimits(max_bytes=len(data)), borrow=True)
    copied = decode_message(bytes(data), DecodeLimits(max_bytes=len(data)))
    assert isinstance(borrowed, ModelState) and isinstance(copied, ModelState)
    assert isinstance(borrowed.parameters, memoryview) and borrowed.parameters.readonly
    assert isinstance(copied.parameters, bytes)
    assert borrowed == copied
    data[-1] ^= 0xFF  # a view: the caller must hand the buffer over, as documented
    assert borrowed.parameters[-1] != copied.parameters[-1]


def test_small_and_non_bulk_byte_fields_are_always_bytes() -> None:
    message = Close(code=0, reason="x")
    assert decode_message(encode_message(message), borrow=True) == message
    state = ModelState(round=1, fingerprint=memoryview(bytes(32)), parameters=b"")  # type: ignore[arg-type]
    assert type(state.fingerprint) is bytes  # non-bulk fields never keep a view
