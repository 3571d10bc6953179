"""Deterministic CBOR: the byte encoding of every p2pfed message (spec/encoding.md).

Rules of this file:

* :func:`encode` produces RFC 8949 section 4.2.1 *core deterministic encoding*: shortest
  argument forms, definite lengths only, map keys in bytewise order of their encodings,
  floats in the shortest of float16/float32/float64 that keeps the value, NaN as
  ``f9 7e00``. It accepts only p2pfed's data model (below) and raises
  :class:`~p2pfed.errors.LocalProtocolError` for anything else: that is our own bug.
* :func:`decode` accepts *only* deterministic encodings inside the configured
  :class:`DecodeLimits`. It walks the item once in pure Python, checking each header before
  anything it claims is allocated (byte-string contents are sliced, never scanned) and
  building the value as it goes. It does not use cbor2: a strict validator has to visit
  every header anyway, and building in the same pass lets big byte strings (model
  tensors) come back as zero-copy views of the received frame. Every rejection is a
  :class:`~p2pfed.errors.DecodeError` (:class:`~p2pfed.errors.DecodeLimitError`, which is
  also a :class:`~p2pfed.errors.MessageTooLargeError`, for size and count limits) whose
  message says what is wrong and at which byte offset. No other exception escapes.

Data model: integers in [-2**64, 2**64 - 1] (not bool), ``bytes``/``bytearray``/
``memoryview`` (decoded as ``bytes``), ``str``, ``list``/``tuple`` (decoded as ``list``),
``dict`` whose keys are all integers 0..23 or all text strings, ``bool``, ``None`` and
``float``. No tags, no other simple values.

Why the key restriction: cbor2's ``canonical=True`` orders map keys length-first (the RFC
7049 rule). For keys that are all small unsigned integers, or all text strings, that order
is the same as RFC 8949's bytewise order, so restricting keys makes cbor2's output
deterministic in the RFC 8949 sense without re-implementing the encoder.

Example::

    >>> encode({0: 2}).hex()
    'a10002'
    >>> decode(bytes.fromhex("a10002"))
    {0: 2}
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import cbor2

from p2pfed.errors import ConfigError, DecodeError, DecodeLimitError, LocalProtocolError

__all__ = ["DEFAULT_LIMITS", "MAX_ENCODE_DEPTH", "DecodeLimits", "decode", "encode"]

MAX_ENCODE_DEPTH = 64
"""Deepest nesting :func:`encode` accepts (deeper means a bug, most likely a cycle)."""

_UINT64_MAX = (1 << 64) - 1
_NINT64_MIN = -(1 << 64)
_MAX_SMALL_KEY = 23


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds that :func:`decode` enforces before allocating anything.

    The defaults suit control messages; a channel that accepts models passes a larger
    ``max_bytes`` (its negotiated maximum message size).
    """

    max_bytes: int = 16 * 1024 * 1024
    """Largest whole encoded item, in bytes."""
    max_depth: int = 8
    """Deepest nesting of arrays and maps (a top-level map has depth 1)."""
    max_items: int = 4096
    """Most array elements plus map pairs, summed over the whole item."""
    max_text: int = 4096
    """Longest text string, in bytes of UTF-8."""

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth", "max_items", "max_text"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"DecodeLimits.{name} must be a non-negative int, got {value!r}")


DEFAULT_LIMITS = DecodeLimits()
"""The limits :func:`decode` uses when none are given."""


# -- encoding --------------------------------------------------------------------------


def _encode_memoryview(encoder: cbor2.CBOREncoder, value: memoryview) -> None:
    # cbor2 would encode a memoryview as an array of ints; write it as a byte string
    # without copying it first.
    flat = value if value.format == "B" and value.ndim == 1 else value.cast("B")
    encoder.encode_length(2, flat.nbytes)
    encoder.write(flat)  # type: ignore[arg-type]  # any buffer works; the stub says bytes


_ENCODERS: dict[type, Any] = {memoryview: _encode_memoryview}


def _check_encodable(obj: object, depth: int) -> None:
    """Raise LocalProtocolError if ``obj`` is outside p2pfed's CBOR data model."""
    if obj is None or isinstance(obj, bool | float | str | bytes | bytearray):
        return
    if isinstance(obj, int):
        if not _NINT64_MIN <= obj <= _UINT64_MAX:
            raise LocalProtocolError(
                f"cannot encode integer {obj}: CBOR integers without tags are limited to "
                f"[-2**64, 2**64 - 1]"
            )
        return
    if isinstance(obj, memoryview):
        if not obj.c_contiguous:
            raise LocalProtocolError("cannot encode a non-contiguous memoryview; copy it first")
        return
    if depth >= MAX_ENCODE_DEPTH:
        raise LocalProtocolError(
            f"cannot encode: nesting deeper than {MAX_ENCODE_DEPTH} (a cyclic structure?)"
        )
    if isinstance(obj, list | tuple):
        for item in obj:
            _check_encodable(item, depth + 1)
        return
    if isinstance(obj, dict):
        keys = list(obj)
        if keys and not (
            all(
                isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= _MAX_SMALL_KEY
                for k in keys
            )
            or all(isinstance(k, str) for k in keys)
        ):
            raise LocalProtocolError(
                f"cannot encode map with keys {keys!r}: p2pfed maps use either only integer "
                f"keys 0..{_MAX_SMALL_KEY} or only text-string keys (deterministic key order)"
            )
        for value in obj.values():
            _check_encodable(value, depth + 1)
        return
    raise LocalProtocolError(
        f"cannot encode {type(obj).__name__}: p2pfed's CBOR data model has only int, bytes, "
        "str, list/tuple, dict, bool, None and float (no tags, sets or other types)"
    )


_SMALL_UINTS = tuple(bytes([value]) for value in range(24))


def encode(obj: object) -> bytes:
    """Encode ``obj`` as deterministic CBOR (RFC 8949 section 4.2.1).

    Raises :class:`~p2pfed.errors.LocalProtocolError` if ``obj`` is outside the data model
    (see the module docstring). Byte strings are copied once, into the result.

    >>> encode([1, -1, b"\\x00", "a", 1.5, None]).hex()
    '86012041006161f93e00f6'
    """
    if type(obj) is int and 0 <= obj < 24:
        # the commonest item (every map key, most small fields): one byte, no checks needed
        return _SMALL_UINTS[obj]
    _check_encodable(obj, 0)
    try:
        return cbor2.dumps(obj, canonical=True, encoders=_ENCODERS)
    except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {type(obj).__name__}: {exc}") from exc


# -- decoding ------------------------------------------------------------

_MAJOR_NAMES = (
    "unsigned integer",
    "negative integer",
    "byte string",
    "text string",
    "array",
    "map",
    "tag",
    "simple value or float",
)
_ARG_SIZES = {24: 1, 25: 2, 26: 4, 27: 8}
_SHORTEST_MIN = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}
_CANONICAL_NAN16 = 0x7E00
_SIMPLE = {20: False, 21: True, 22: None}


def _same_float(a: float, b: float) -> bool:
    # Compares values bit-exactly (so -0.0 != 0.0); NaN is handled by the caller.
    return struct.pack(">d", a) == struct.pack(">d", b)


def _fits(value: float, fmt: str) -> bool:
    """Whether ``value`` survives a round trip through the narrower IEEE format ``fmt``."""
    try:
        narrowed: float = struct.unpack(fmt, struct.pack(fmt, value))[0]
    except (OverflowError, struct.error):
        return False
    return _same_float(narrowed, value)


class _Container:
    """An array or map whose items the decoder is still reading."""

    __slots__ = ("is_map", "key", "previous_key", "remaining", "value")

    def __init__(self, is_map: bool, remaining: int) -> None:
        self.is_map = is_map
        self.remaining = remaining  # data items still to read (two per map pair)
        self.previous_key: bytes | None = None  # encoded form, for the order check
        self.key: object = None  # decoded key waiting for its value
        self.value: list[object] | dict[object, object] = {} if is_map else []

    def add(self, item: object, is_key: bool) -> None:
        value = self.value
        if isinstance(value, list):
            value.append(item)
        elif is_key:
            self.key = item
        else:
            value[self.key] = item


def _scan(buf: memoryview, limits: DecodeLimits, borrow_min: int | None) -> object:
    """Decode ``buf`` as exactly one deterministic CBOR item within ``limits``.

    One pass: every header is checked before anything it claims is allocated, and the
    value is built as the walk goes. Byte strings of at least ``borrow_min`` bytes come
    back as read-only views of ``buf`` instead of copies.
    """
    end = len(buf)
    if end == 0:
        raise DecodeError("empty input: expected one CBOR data item")
    pos = 0
    items = 0
    stack: list[_Container] = []
    while True:
        start = pos
        parent = stack[-1] if stack else None
        is_key = parent is not None and parent.is_map and parent.remaining % 2 == 0
        if pos >= end:
            raise DecodeError(f"CBOR input truncated at offset {pos}: expected a data item")
        initial = buf[pos]
        major = initial >> 5
        info = initial & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info in _ARG_SIZES:
            size = _ARG_SIZES[info]
            if pos + size > end:
                raise DecodeError(
                    f"CBOR input truncated at offset {start}: the {_MAJOR_NAMES[major]} header "
                    f"needs {size} more bytes, {end - pos} left"
                )
            arg = int.from_bytes(buf[pos : pos + size], "big")
            pos += size
            if major != 7 and arg < _SHORTEST_MIN[info]:
                raise DecodeError(
                    f"CBOR {_MAJOR_NAMES[major]} at offset {start} has a non-shortest argument "
                    f"encoding (value {arg} in a {size}-byte argument); deterministic CBOR "
                    "requires the shortest form"
                )
        elif info == 31:
            if major in (2, 3, 4, 5):
                raise DecodeError(
                    f"CBOR indefinite-length {_MAJOR_NAMES[major]} at offset {start}: only "
                    "definite lengths are allowed"
                )
            if major == 7:
                raise DecodeError(f"unexpected CBOR break code (0xff) at offset {start}")
            raise DecodeError(
                f"malformed CBOR at offset {start}: additional information 31 is invalid "
                f"for a {_MAJOR_NAMES[major]}"
            )
        else:
            raise DecodeError(
                f"malformed CBOR at offset {start}: reserved additional information value {info}"
            )

        if is_key and major not in (0, 1, 3):
            raise DecodeError(
                f"CBOR map key at offset {start} is a {_MAJOR_NAMES[major]}: p2pfed map keys "
                "must be integers or text strings"
            )

        value: object = arg
        if major == 1:
            value = -1 - arg
        elif major == 2 or major == 3:
            if arg > end - pos:
                raise DecodeError(
                    f"CBOR input truncated at offset {start}: {_MAJOR_NAMES[major]} claims "
                    f"{arg} bytes but only {end - pos} remain"
                )
            if major == 2:
                chunk = buf[pos : pos + arg]
                borrow = borrow_min is not None and arg >= borrow_min
                value = chunk.toreadonly() if borrow else chunk.tobytes()
            else:
                if arg > limits.max_text:
                    raise DecodeLimitError(
                        f"CBOR text string at offset {start} is {arg} bytes long, over the "
                        f"limit of {limits.max_text}"
                    )
                try:
                    value = str(buf[pos : pos + arg], "utf-8")
                except UnicodeDecodeError as exc:
                    raise DecodeError(
                        f"CBOR text string at offset {start} is not valid UTF-8 (byte "
                        f"{pos + exc.start}: {exc.reason})"
                    ) from None
            pos += arg
        elif major == 4 or major == 5:
            if len(stack) >= limits.max_depth:
                raise DecodeError(
                    f"CBOR {_MAJOR_NAMES[major]} at offset {start} nests deeper than the limit "
                    f"of {limits.max_depth}"
                )
            children = arg if major == 4 else 2 * arg
            if children > end - pos:
                raise DecodeError(
                    f"CBOR input truncated at offset {start}: {_MAJOR_NAMES[major]} claims "
                    f"{arg} {'elements' if major == 4 else 'pairs'} but only {end - pos} "
                    "bytes remain"
                )
            items += arg
            if items > limits.max_items:
                raise DecodeLimitError(
                    f"CBOR {_MAJOR_NAMES[major]} at offset {start} brings the item count to "
                    f"{items}, over the limit of {limits.max_items}"
                )
            if children:
                stack.append(_Container(major == 5, children))
                continue  # this container completes when its last child does
            value = {} if major == 5 else []
        elif major == 6:
            raise DecodeError(f"CBOR tag {arg} at offset {start}: p2pfed does not use tags")
        elif major == 7:
            if info in (20, 21, 22):
                value = _SIMPLE[info]
            elif info == 25:
                if (arg & 0x7C00) == 0x7C00 and (arg & 0x03FF) and arg != _CANONICAL_NAN16:
                    raise DecodeError(
                        f"CBOR NaN at offset {start} is not encoded as f97e00, the only NaN "
                        "deterministic CBOR allows"
                    )
                value = struct.unpack(">e", buf[start + 1 : pos])[0]
            elif info in (26, 27):
                fmt, narrower, name = (
                    (">f", ">e", "float32") if info == 26 else (">d", ">f", "float64")
                )
                value = number = struct.unpack(fmt, buf[start + 1 : pos])[0]
                if math.isnan(number):
                    raise DecodeError(
                        f"CBOR {name} NaN at offset {start}: NaN must be encoded as f97e00"
                    )
                if _fits(number, ">e") or _fits(number, narrower):
                    raise DecodeError(
                        f"CBOR {name} {number!r} at offset {start} is not in the shortest float "
                        "form that preserves its value"
                    )
            else:
                what = "undefined" if info == 23 else f"simple value {arg}"
                raise DecodeError(
                    f"CBOR {what} at offset {start}: only false, true and null are allowed"
                )

        if is_key:
            assert parent is not None
            key = bytes(buf[start:pos])
            previous = parent.previous_key
            if previous is not None and key <= previous:
                if key == previous:
                    raise DecodeError(f"duplicate CBOR map key at offset {start}")
                raise DecodeError(f"CBOR map keys not in deterministic order at offset {start}")
            parent.previous_key = key

        # The item at ``start`` is complete: hand it to its container, and close (and hand
        # up) every container that it completes.
        while stack:
            container = stack[-1]
            container.add(value, is_key)
            container.remaining -= 1
            if container.remaining:
                break
            stack.pop()
            value = container.value
            is_key = bool(stack) and stack[-1].is_map and stack[-1].remaining % 2 == 0
        if not stack:
            break
    if pos != end:
        raise DecodeError(
            f"{end - pos} trailing bytes after the CBOR data item at offset {pos}: a message "
            "is exactly one item"
        )
    return value


def decode(
    data: bytes | bytearray | memoryview,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    borrow_min: int | None = None,
) -> object:
    """Decode one deterministic CBOR item, rejecting anything else.

    Raises :class:`~p2pfed.errors.DecodeError` (:class:`~p2pfed.errors.DecodeLimitError`
    for a size or count limit) and nothing else. Byte strings come back as ``bytes``,
    arrays as ``list``, maps as ``dict``; with ``borrow_min``, byte strings of at least
    that many bytes come back as read-only ``memoryview`` slices of ``data`` (zero-copy:
    ``data`` must then stay unmodified while they are in use).

    >>> decode(b"\\x82\\x01\\x42hi")
    [1, b'hi']
    >>> decode(b"\\x18\\x01")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    p2pfed.errors.DecodeError: CBOR unsigned integer at offset 0 has a non-shortest ...
    """
    try:
        view = memoryview(data)
    except TypeError:
        raise DecodeError(f"cannot decode {type(data).__name__}: expected bytes") from None
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    if len(view) > limits.max_bytes:
        raise DecodeLimitError(
            f"CBOR item of {len(view)} bytes is over the limit of {limits.max_bytes} bytes"
        )
    return _scan(view, limits, borrow_min)
