"""Message classes (p2pfed.messages): samples of every registered type checked against
spec/messages.cddl with pycddl, round trips, every schema rejection, and fuzzing of the
message decoders."""

from __future__ import annotations

import contextlib
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
    UINT64_MAX,
    Bool,
    Bytes,
    Close,
    FieldKind,
    Float,
    HandshakePayload,
    Int,
    IpAddress,
    Keepalive,
    Message,
    ModelState,
    PeerExchangeRequest,
    PeerInfo,
    PeerList,
    Record,
    RecordList,
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
}
ALL_SAMPLES = [(cls, sample) for cls, samples in SAMPLES.items() for sample in samples]


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


# -- registry and samples ---------------------------------------------------------------


def test_every_registered_type_has_samples() -> None:
    for number, cls in message_types().items():
        assert SAMPLES.get(cls), f"message type {number} ({cls.__name__}) has no test samples"


def test_registry_contents() -> None:
    expected = {1: Welcome, 2: Keepalive, 3: Close, 16: ModelState}
    expected |= {17: PeerExchangeRequest, 18: PeerList}
    assert {n: c for n, c in message_types().items() if n in expected} == expected
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
    choice = re.search(r"^message = (.*)$", CDDL, re.MULTILINE)
    assert choice is not None
    alternatives = {a.strip() for a in choice.group(1).split("/")}
    for cls in message_types().values():
        assert rule_name(cls) in alternatives
        assert re.search(rf"^{rule_name(cls)} = \{{", CDDL, re.MULTILINE)


@pytest.mark.parametrize(("cls", "sample"), ALL_SAMPLES, ids=repr)
def test_samples_match_the_cddl(cls: type[Record], sample: Record) -> None:
    data = encode_record(sample)
    SCHEMAS[cls].validate_cbor(data)
    if isinstance(sample, Message):
        MESSAGE_SCHEMA.validate_cbor(data)


@pytest.mark.parametrize(("cls", "sample"), ALL_SAMPLES, ids=repr)
def test_samples_round_trip(cls: type[Record], sample: Record) -> None:
    data = encode_record(sample)
    assert data == encode_record(sample)
    assert data == cbor2.dumps(sample.to_wire(), canonical=True)
    decoded = decode_record(cls, data)
    assert type(decoded) is cls
    assert decoded == sample
    assert encode_record(decoded) == data


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


def _bytes_strategy(kind: Bytes) -> st.SearchStrategy[bytes]:
    if kind.size is not None:
        return st.binary(min_size=kind.size, max_size=kind.size)
    unit = kind.multiple_of
    top = kind.max_size if kind.max_size is not None else 256
    return st.integers(-(-kind.min_size // unit), top // unit).flatmap(
        lambda n: st.binary(min_size=n * unit, max_size=n * unit)
    )


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


def records(cls: type[Record]) -> st.SearchStrategy[Record]:
    return st.builds(cls, **{name: strategy_for(kind) for name, kind in cls.SCHEMA})


any_record = st.sampled_from(sorted(SAMPLES, key=lambda c: c.__name__)).flatmap(records)


@FUZZ
@given(any_record)
def test_random_valid_records_round_trip_and_match_the_cddl(record: Record) -> None:
    cls = type(record)
    data = encode_record(record)
    assert data == cbor2.dumps(record.to_wire(), canonical=True)
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
    st.sampled_from([0, 1, 2, 3, 16, 17, 99]),
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
    state = ModelState(round=1, fingerprint=memoryview(bytes(32)), parameters=b"")
    assert type(state.fingerprint) is bytes  # non-bulk fields never keep a view
