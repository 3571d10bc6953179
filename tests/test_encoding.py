"""Deterministic CBOR (p2pfed.encoding): RFC 8949 vectors, every rejection rule, limits,
large byte strings, and property-based fuzzing of the decoder."""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import struct
import tracemalloc

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pfed.encoding import DecodeLimits, decode, encode
from p2pfed.errors import (
    CloseCode,
    ConfigError,
    DecodeError,
    DecodeLimitError,
    LocalProtocolError,
    MessageTooLargeError,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROOMY = DecodeLimits(max_bytes=1 << 30, max_depth=64, max_items=1 << 20, max_text=1 << 20)

# RFC 8949 Appendix A examples whose first listed encoding is the deterministic one.
RFC8949_EXAMPLES: list[tuple[object, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (0.0, "f90000"),
    (-0.0, "f98000"),
    (1.0, "f93c00"),
    (1.1, "fb3ff199999999999a"),
    (1.5, "f93e00"),
    (65504.0, "f97bff"),
    (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"),
    (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"),
    (0.00006103515625, "f90400"),
    (-4.0, "f9c400"),
    (-4.1, "fbc010666666666666"),
    (math.inf, "f97c00"),
    (-math.inf, "f9fc00"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]


@pytest.mark.parametrize(("value", "expected"), RFC8949_EXAMPLES, ids=lambda v: repr(v)[:30])
def test_rfc8949_examples_encode_and_decode(value: object, expected: str) -> None:
    data = bytes.fromhex(expected)
    assert encode(value) == data
    assert decode(data) == value
    if isinstance(value, float):  # -0.0 == 0.0, so check the sign survives too
        decoded = decode(data)
        assert isinstance(decoded, float)
        assert math.copysign(1.0, decoded) == math.copysign(1.0, value)


def test_nan_is_f97e00_both_ways() -> None:
    assert encode(math.nan) == bytes.fromhex("f97e00")
    decoded = decode(bytes.fromhex("f97e00"))
    assert isinstance(decoded, float) and math.isnan(decoded)


def test_text_keys_sorted_bytewise_by_encoding() -> None:
    # "b" (61 62) sorts before "aa" (62 61 61): shorter encodings first.
    assert encode({"aa": 2, "b": 1}) == bytes.fromhex("a261620162616102")
    assert decode(bytes.fromhex("a261620162616102")) == {"b": 1, "aa": 2}


def test_bytes_like_values_encode_as_byte_strings() -> None:
    expected = bytes.fromhex("83430102034301020343010203")
    raw = b"\x01\x02\x03"
    assert encode([raw, bytearray(raw), memoryview(raw)]) == expected
    # A memoryview of wider items is written as its raw bytes.
    wide = memoryview(bytearray(8)).cast("I")
    assert encode(wide) == bytes.fromhex("480000000000000000")
    assert encode((1, 2)) == encode([1, 2])


def test_int_enum_encodes_as_its_value() -> None:
    assert encode({0: CloseCode.MALFORMED_MESSAGE}) == bytes.fromhex("a10003")


def _cycle() -> list[object]:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    return cyclic


@pytest.mark.parametrize(
    "value",
    [
        {24: 1},
        {-1: 1},
        {0: 1, "a": 2},
        {True: 1},
        {b"k": 1},
        {(1,): 1},
        1 << 64,
        -(1 << 64) - 1,
        {1, 2},
        frozenset(),
        cbor2.CBORTag(1, 0),
        datetime.datetime(2024, 1, 1),
        object(),
        [[[{0: {1}}]]],
        _cycle(),
    ],
    # object()'s repr holds its address: ids must match across pytest-xdist workers
    ids=lambda value: "object()" if type(value) is object else repr(value),
)
def test_encode_rejects_values_outside_the_data_model(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode(value)


# Each: hex input, a fragment of the expected error message.
REJECTED: list[tuple[str, str]] = [
    ("", "empty input"),
    ("1801", "non-shortest argument"),
    ("190017", "non-shortest argument"),
    ("1a0000ffff", "non-shortest argument"),
    ("1b00000000ffffffff", "non-shortest argument"),
    ("3817", "non-shortest argument"),
    ("5800", "non-shortest argument"),
    ("7801", "non-shortest argument"),
    ("9800", "non-shortest argument"),
    ("b800", "non-shortest argument"),
    ("5f4100ff", "indefinite-length byte string"),
    ("7f6161ff", "indefinite-length text string"),
    ("9f01ff", "indefinite-length array"),
    ("bf0001ff", "indefinite-length map"),
    ("ff", "break"),
    ("1f", "additional information 31"),
    ("3f", "additional information 31"),
    ("df", "additional information 31"),
    ("1c", "reserved additional information value 28"),
    ("5d", "reserved additional information value 29"),
    ("fe", "reserved additional information value 30"),
    ("c0636162", "tag"),
    ("d8ff00", "tag"),
    ("f7", "undefined"),
    ("f0", "simple value 16"),
    ("f818", "simple value 24"),
    ("f8ff", "simple value 255"),
    ("f814", "simple value 20"),  # false in the two-byte form
    ("fa3fc00000", "shortest float"),  # 1.5 as float32
    ("fb3ff8000000000000", "shortest float"),  # 1.5 as float64
    ("fb47efffffe0000000", "shortest float"),  # float32 max as float64
    ("fa7f800000", "shortest float"),  # infinity as float32
    ("fb8000000000000000", "shortest float"),  # -0.0 as float64
    ("fa7fc00000", "NaN"),
    ("fb7ff8000000000000", "NaN"),
    ("f97e01", "NaN"),
    ("f9fe00", "NaN"),  # negative quiet NaN
    ("f97c01", "NaN"),  # signalling NaN
    ("62c328", "UTF-8"),
    ("62c0af", "UTF-8"),  # overlong "/"
    ("63eda080", "UTF-8"),  # a UTF-16 surrogate
    ("64f4908080", "UTF-8"),  # above U+10FFFF
    ("a201020003", "not in deterministic order"),
    ("a2616201616102", "not in deterministic order"),
    ("a2626161016162a0", "not in deterministic order"),  # "aa" before "b"
    ("a2200100a0", "not in deterministic order"),  # -1 (20) before 0 (00)
    ("a201020103", "duplicate"),
    ("a2616101616102", "duplicate"),
    ("a1f400", "map key"),
    ("a1410000", "map key"),
    ("a18000", "map key"),
    ("a1f93c0000", "map key"),
    ("0000", "trailing"),
    ("a10002ff", "trailing"),
    ("18", "truncated"),
    ("1900", "truncated"),
    ("1b000000000000", "truncated"),
    ("43010203"[:-2], "truncated"),
    ("6461", "truncated"),
    ("82", "truncated"),
    ("8201", "truncated"),
    ("a1", "truncated"),
    ("a100", "truncated"),
    ("5b0000010000000000", "truncated"),
    ("7b0000010000000000", "truncated"),
    ("fa3fc000", "truncated"),
]


@pytest.mark.parametrize(
    ("hex_input", "fragment"), REJECTED, ids=[h or "empty" for h, _ in REJECTED]
)
def test_decode_rejects(hex_input: str, fragment: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(bytes.fromhex(hex_input))
    assert fragment in str(info.value)
    assert info.value.code in (CloseCode.MALFORMED_MESSAGE, CloseCode.MESSAGE_TOO_LARGE)
    if hex_input:
        assert "offset" in str(info.value)


def test_error_names_the_offset_of_the_bad_key() -> None:
    # {0: 1, 2: 3, 1: 4}: the out-of-order key 1 is at byte 5.
    with pytest.raises(DecodeError, match="not in deterministic order at offset 5"):
        decode(bytes.fromhex("a3000102030104"))


def test_huge_length_claim_fails_fast_without_allocating() -> None:
    # A 20-byte input whose byte string claims 2**40 bytes.
    data = bytes.fromhex("a2000203") + b"\x5b" + (1 << 40).to_bytes(8, "big") + bytes(7)
    assert len(data) == 20
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="truncated"):
            decode(data, DecodeLimits(max_bytes=1 << 62))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_huge_count_claims_fail_fast() -> None:
    with pytest.raises(DecodeError):
        decode(b"\x9b" + (1 << 62).to_bytes(8, "big"))
    with pytest.raises(DecodeError):
        decode(b"\xbb" + (1 << 62).to_bytes(8, "big") + b"\x00\x00")


def test_deep_nesting_is_rejected_without_recursion() -> None:
    data = b"\x81" * 10_000 + b"\x00"
    with pytest.raises(DecodeError, match="nests deeper than the limit of 8"):
        decode(data)
    # Even with a huge depth limit the pre-scan is iterative and cbor2 is never reached
    # with more nesting than the limit allows.
    with pytest.raises(DecodeError):
        decode(data, DecodeLimits(max_depth=1_000_000))


def test_depth_limit_is_exact() -> None:
    eight = b"\x81" * 8 + b"\x00"
    assert decode(eight) == [[[[[[[[0]]]]]]]]
    with pytest.raises(DecodeError, match="deeper"):
        decode(b"\x81" + eight)
    with pytest.raises(DecodeError, match="deeper"):
        decode(b"\x81" * 8 + b"\x80")  # an empty array still counts as a level
    assert decode(b"\xa1\x00\x80", DecodeLimits(max_depth=2)) == {0: []}


def test_item_limit() -> None:
    limits = DecodeLimits(max_items=4)
    assert decode(encode([1, 2, [3]]), limits) == [1, 2, [3]]  # 3 + 1 items
    with pytest.raises(DecodeLimitError, match="item count"):
        decode(encode([1, 2, [3, 4]]), limits)
    with pytest.raises(DecodeLimitError):
        decode(encode({0: 1, 1: 2, 2: {0: 0, 1: 1}}), limits)
    with pytest.raises(DecodeLimitError):
        decode(encode([0] * 4097))
    assert decode(encode([0] * 4096)) == [0] * 4096


def test_size_limit_is_checked_first() -> None:
    data = encode(b"x" * 100)
    assert decode(data, DecodeLimits(max_bytes=len(data))) == b"x" * 100
    with pytest.raises(DecodeLimitError, match="over the limit"):
        decode(data, DecodeLimits(max_bytes=len(data) - 1))


def test_text_limit() -> None:
    assert decode(encode("é" * 2048)) == "é" * 2048
    with pytest.raises(DecodeLimitError, match="4097 bytes"):
        decode(encode("é" * 2048 + "x"))


def test_limit_errors_are_both_decode_and_too_large_errors() -> None:
    with pytest.raises(DecodeLimitError) as info:
        decode(encode([0] * 10), DecodeLimits(max_items=2))
    assert isinstance(info.value, DecodeError)
    assert isinstance(info.value, MessageTooLargeError)
    assert info.value.code == CloseCode.MESSAGE_TOO_LARGE


def test_decode_limits_validate_their_fields() -> None:
    with pytest.raises(ConfigError, match="max_depth"):
        DecodeLimits(max_depth=-1)
    with pytest.raises(ConfigError, match="max_bytes"):
        DecodeLimits(max_bytes=True)


def test_decode_accepts_bytes_like_inputs() -> None:
    data = encode({0: 16, 1: [b"abc", "d"]})
    expected = {0: 16, 1: [b"abc", "d"]}
    assert decode(bytearray(data)) == expected
    assert decode(memoryview(data)) == expected
    framed = b"\xff\xff" + data + b"\xff"
    assert decode(memoryview(framed)[2:-1]) == expected
    assert decode(memoryview(bytearray(data)).cast("b")) == expected


def test_decode_rejects_non_bytes_input() -> None:
    with pytest.raises(DecodeError):
        decode("a10002")  # type: ignore[arg-type]


def test_64_mib_byte_string_round_trips_in_about_two_copies() -> None:
    size = 64 * 1024 * 1024
    blob = os.urandom(size)
    message = {0: 16, 1: 3, 2: bytes(32), 3: blob}
    limits = DecodeLimits(max_bytes=size + 1024)

    tracemalloc.start()
    try:
        data = encode(message)
        _, encode_peak = tracemalloc.get_traced_memory()
        assert data == cbor2.dumps(message, canonical=True)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        decoded = decode(data, limits)
        _, decode_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base_view, _ = tracemalloc.get_traced_memory()
        decoded_view = decode(memoryview(data), limits)
        _, view_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(decoded, dict) and decoded[3] == blob
    assert isinstance(decoded_view, dict) and decoded_view[3] == blob
    # Encoding holds one output copy; decoding bytes one copy of the blob; decoding a
    # memoryview one more (it is copied to bytes for cbor2's fast path).
    assert encode_peak < 1.3 * size
    assert decode_peak - base < 1.3 * size
    assert view_peak - base_view < 2.3 * size


# -- property-based tests ---------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(width=16)
    | st.floats(width=32)
    | st.binary(max_size=40)
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.integers(0, 23), children, max_size=6)
        | st.dictionaries(st.text(max_size=6), children, max_size=6)
    ),
    max_leaves=25,
)


def same(a: object, b: object) -> bool:
    """Equality for decoded values: NaN equals NaN, float signs matter, tuples are lists."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, list | tuple) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@FUZZ
@given(values)
def test_valid_values_round_trip(value: object) -> None:
    data = encode(value)
    assert data == encode(value)  # deterministic
    assert data == cbor2.dumps(value, canonical=True)
    decoded = decode(data, ROOMY)
    assert same(value, decoded)
    assert encode(decoded) == data


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        decoded = decode(data)
    except DecodeError:
        return
    # Whatever is accepted is deterministic: re-encoding gives the same bytes (unless it
    # uses map keys outside the encoder's sets, which decoding allows).
    try:
        again = encode(decoded)
    except LocalProtocolError:
        return
    assert again == data


@FUZZ
@given(values, st.data())
def test_mutated_encodings_decode_or_raise_decode_error(value: object, draw: st.DataObject) -> None:
    data = bytearray(encode(value))
    kind = draw.draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    where = draw.draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        data[where] ^= 1 << draw.draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[where:]
    elif kind == "insert":
        data[where:where] = draw.draw(st.binary(min_size=1, max_size=4))
    else:
        data[where] = draw.draw(st.integers(0, 255))
    try:
        decoded = decode(bytes(data), ROOMY)
    except DecodeError:
        return
    with contextlib.suppress(LocalProtocolError):  # keys outside the encoder's sets
        assert encode(decoded) == bytes(data)


@FUZZ
@given(st.floats(allow_nan=False))
def test_floats_use_the_shortest_exact_width(value: float) -> None:
    data = encode(value)
    head = data[0]
    for fmt, code in (("e", 0xF9), ("f", 0xFA)):
        try:
            fits = struct.unpack(fmt, struct.pack(fmt, value))[0] == value
        except OverflowError:
            fits = False
        if fits:
            assert head == code
            break
    else:
        assert head == 0xFB
    assert same(decode(data), value)
