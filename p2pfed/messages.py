"""Every p2pfed message type: its number, its fields and their constraints (spec/encoding.md).

Rules of this file:

* A message is a frozen dataclass. Each field is declared with ``Annotated[type, Kind]``,
  where the kind (:class:`UInt`, :class:`Bytes`, :class:`Text`, ...) gives the field's CBOR
  map key and every constraint on its value. Nothing else describes the wire format: the
  encoder, the decoder, the error messages and the test strategies all read these kinds.
* On the wire a message is a deterministic CBOR map with unsigned integer keys: key 0 holds
  the message type number, keys 1..23 the fields. Every field is required, and a version 1
  receiver rejects unknown keys and unknown message types (the schemas are closed; new
  fields and types come with a new protocol version, negotiated in the handshake).
* :class:`HandshakePayload` is the one map without key 0: it travels inside Noise handshake
  messages, before any version is agreed, so it tolerates unknown keys 5..23 (a later version
  may add handshake fields without breaking negotiation with version 1 nodes).
* To add a message type: take the next free number of its range in spec/encoding.md's
  registry, declare the class below with ``@_message``, add its CDDL rule to
  spec/messages.cddl, samples to tests/test_messages.py and vectors to
  p2pfed/vectorgen/messages.py (the tests fail until all of these exist).
* Building a message with an invalid value raises
  :class:`~p2pfed.errors.LocalProtocolError` (our bug); decoding one raises
  :class:`~p2pfed.errors.DecodeError` naming the message type, the field and its key.

Example::

    >>> msg = Close(code=CloseCode.NORMAL, reason="bye")
    >>> encode_message(msg).hex()
    'a3000301000263627965'
    >>> decode_message(bytes.fromhex("a3000301000263627965"))
    Close(code=0, reason='bye')
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import itertools
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from p2pfed.encoding import DEFAULT_LIMITS, DecodeLimits, decode, encode
from p2pfed.errors import CloseCode, DecodeError, LocalProtocolError

__all__ = [
    "BORROW_MIN",
    "FINGERPRINT_SIZE",
    "GROUP_ID_SIZE",
    "IDENTITY_KEY_SIZE",
    "MASK_KEY_SIZE",
    "MAX_CLOSE_REASON_BYTES",
    "MAX_GRID_DIMS",
    "MAX_GROUP_MEMBERS",
    "MAX_PEER_HOST_BYTES",
    "MAX_PEX_PEERS",
    "MAX_REASON_BYTES",
    "MAX_VERSIONS",
    "NONCE_SIZE",
    "SIGNATURE_SIZE",
    "UINT64_MAX",
    "Bool",
    "Bytes",
    "Close",
    "FieldKind",
    "Float",
    "GroupAbort",
    "GroupInvite",
    "GroupMemberInfo",
    "GroupPosition",
    "GroupReply",
    "GroupStart",
    "HandshakePayload",
    "Int",
    "IpAddress",
    "Keepalive",
    "Message",
    "ModelRequest",
    "ModelState",
    "NodeAnnounce",
    "PeerExchangeRequest",
    "PeerInfo",
    "PeerList",
    "Record",
    "RecordList",
    "ReducedShard",
    "Shard",
    "Text",
    "UInt",
    "UIntList",
    "Welcome",
    "decode_message",
    "encode_message",
    "encode_message_parts",
    "is_address_literal",
    "message_types",
]

UINT64_MAX = (1 << 64) - 1
IDENTITY_KEY_SIZE = 32
SIGNATURE_SIZE = 64
FINGERPRINT_SIZE = 32
MAX_VERSIONS = 16
MAX_CLOSE_REASON_BYTES = 256
MAX_PEX_PEERS = 64
"""Most peers one PeerList may carry (and most a PeerExchangeRequest may ask for)."""
MAX_PEER_HOST_BYTES = 64
BORROW_MIN = 64 * 1024
"""Bulk byte strings at least this long are borrowed, not copied (see :class:`Bytes`)."""
_MAX_FIELD_KEY = 23


def _type_name(value: object) -> str:
    """The CBOR name of a decoded Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, bytes | bytearray | memoryview):
        return "byte string"
    if isinstance(value, str):
        return "text string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- field kinds -----------------------------------------------------------------------


@dataclass(frozen=True)
class FieldKind:
    """A field's CBOR map key and the constraints on its value.

    Subclasses implement :meth:`describe` (what a valid value is, for error messages) and
    :meth:`problem` (``None`` for a valid value, else what was found instead).
    """

    key: int

    def describe(self) -> str:
        """What a valid value is, completing 'must be ...'."""
        raise NotImplementedError

    def problem(self, value: object) -> str | None:
        """``None`` if ``value`` is valid, else a short description of what it is."""
        raise NotImplementedError

    def normalize(self, value: Any) -> Any:
        """The canonical Python form of a valid value (stored in the message)."""
        return value

    def to_wire(self, value: Any) -> object:
        """The value as given to the CBOR encoder."""
        return value

    def from_wire(self, value: object) -> object:
        """The decoded CBOR value as checked by :meth:`problem` and given to the constructor.

        Only kinds holding nested records convert here (maps become :class:`Record`
        objects); they raise :class:`~p2pfed.errors.DecodeError` for an invalid nested record.
        """
        return value


@dataclass(frozen=True)
class UInt(FieldKind):
    """An unsigned integer in ``[min, max]`` (CDDL ``uint``)."""

    min: int = 0
    max: int = UINT64_MAX

    def describe(self) -> str:
        if (self.min, self.max) == (0, UINT64_MAX):
            return "an unsigned integer (0 to 2**64 - 1)"
        return f"an unsigned integer from {self.min} to {self.max}"

    def problem(self, value: object) -> str | None:
        if not _is_int(value):
            return _type_name(value)
        assert isinstance(value, int)
        return None if self.min <= value <= self.max else str(value)

    def normalize(self, value: Any) -> Any:
        return int(value)  # an IntEnum such as CloseCode becomes a plain int


@dataclass(frozen=True)
class Int(FieldKind):
    """A signed integer in ``[min, max]`` (CDDL ``int``)."""

    min: int = -(1 << 64)
    max: int = UINT64_MAX

    def describe(self) -> str:
        return f"an integer from {self.min} to {self.max}"

    def problem(self, value: object) -> str | None:
        if not _is_int(value):
            return _type_name(value)
        assert isinstance(value, int)
        return None if self.min <= value <= self.max else str(value)

    def normalize(self, value: Any) -> Any:
        return int(value)


@dataclass(frozen=True)
class Bool(FieldKind):
    """``true`` or ``false`` (CDDL ``bool``)."""

    def describe(self) -> str:
        return "a bool"

    def problem(self, value: object) -> str | None:
        return None if isinstance(value, bool) else _type_name(value)


@dataclass(frozen=True)
class Float(FieldKind):
    """A floating-point number, finite unless ``finite=False`` (CDDL ``float``)."""

    finite: bool = True

    def describe(self) -> str:
        return "a finite float" if self.finite else "a float"

    def problem(self, value: object) -> str | None:
        if not isinstance(value, float):
            return _type_name(value)
        return None if math.isfinite(value) or not self.finite else repr(value)


@dataclass(frozen=True)
class Bytes(FieldKind):
    """A byte string of exactly ``size`` bytes, or of ``min_size`` to ``max_size`` bytes
    whose length is a multiple of ``multiple_of`` (CDDL ``bstr .size ...``).

    A ``bulk`` field (model tensors) may hold a read-only ``memoryview`` instead of
    ``bytes``: received messages then borrow the frame buffer instead of copying tens of
    megabytes, and senders may pass views of their arrays. Other fields always hold bytes.
    """

    size: int | None = None
    min_size: int = 0
    max_size: int | None = None
    multiple_of: int = 1
    bulk: bool = False

    def describe(self) -> str:
        if self.size is not None:
            return f"a byte string of exactly {self.size} bytes"
        text = "a byte string"
        if self.max_size is not None:
            text += f" of {self.min_size} to {self.max_size} bytes"
        elif self.min_size:
            text += f" of at least {self.min_size} bytes"
        if self.multiple_of != 1:
            text += f" whose length is a multiple of {self.multiple_of}"
        return text

    def problem(self, value: object) -> str | None:
        if isinstance(value, memoryview):
            if value.format != "B" or value.ndim != 1 or not value.c_contiguous:
                return "a memoryview that is not a flat byte buffer"
        elif not isinstance(value, bytes):
            return _type_name(value)
        n = len(value)
        ok = (
            (n == self.size if self.size is not None else True)
            and n >= self.min_size
            and (self.max_size is None or n <= self.max_size)
            and n % self.multiple_of == 0
        )
        return None if ok else f"{n} bytes"

    def normalize(self, value: Any) -> Any:
        if isinstance(value, memoryview):
            return value.toreadonly() if self.bulk else value.tobytes()
        return value


@dataclass(frozen=True)
class Text(FieldKind):
    """A text string of at most ``max_bytes`` bytes of UTF-8 (CDDL ``tstr .size (0..N)``)."""

    max_bytes: int = 4096

    def describe(self) -> str:
        return f"a text string of at most {self.max_bytes} bytes"

    def problem(self, value: object) -> str | None:
        if not isinstance(value, str):
            return _type_name(value)
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            return "a text string with unpaired surrogates (not encodable as UTF-8)"
        return None if n <= self.max_bytes else f"{n} bytes"


@dataclass(frozen=True)
class UIntList(FieldKind):
    """An array of ``min_len`` to ``max_len`` unsigned integers up to ``item_max``,
    optionally in strictly ascending order (CDDL ``[min*max uint]``)."""

    max_len: int = 16
    min_len: int = 0
    item_max: int = UINT64_MAX
    strictly_ascending: bool = False

    def describe(self) -> str:
        item = "unsigned integers" + (
            f" up to {self.item_max}" if self.item_max != UINT64_MAX else ""
        )
        order = " in strictly ascending order" if self.strictly_ascending else ""
        return f"an array of {self.min_len} to {self.max_len} {item}{order}"

    def problem(self, value: object) -> str | None:
        if not isinstance(value, list | tuple):
            return _type_name(value)
        if not self.min_len <= len(value) <= self.max_len:
            return f"an array of {len(value)} items"
        for item in value:
            if not _is_int(item) or not 0 <= item <= self.item_max:
                return f"an array holding {item!r}"
        if self.strictly_ascending and any(a >= b for a, b in itertools.pairwise(value)):
            return f"{list(value)!r}, which is not strictly ascending"
        return None

    def normalize(self, value: Any) -> Any:
        return tuple(int(v) for v in value)

    def to_wire(self, value: Any) -> object:
        return list(value)


@dataclass(frozen=True)
class IpAddress(FieldKind):
    """An IPv4 or IPv6 address literal of at most ``max_bytes`` bytes, such as
    ``"192.168.1.7"`` or ``"fe80::1"``: no host name, no zone (``%eth0``), no port, and not
    an unspecified (``0.0.0.0``, ``::``) or multicast address, which no peer listens on
    (CDDL ``tstr .size (1..N)``; the rest is stated in comments)."""

    max_bytes: int = MAX_PEER_HOST_BYTES

    def describe(self) -> str:
        return (
            f"an IPv4 or IPv6 address literal of at most {self.max_bytes} bytes "
            "(not unspecified, multicast or zoned)"
        )

    def problem(self, value: object) -> str | None:
        if not isinstance(value, str):
            return _type_name(value)
        if len(value) > self.max_bytes:  # every character takes at least one byte
            return f"a text string of more than {self.max_bytes} bytes"
        if not value.isascii():
            return f"{value!r}, which is not an IP address literal"
        if "%" in value:
            return f"{value!r}, which has a zone"
        return _address_literal_problem(value)


def is_address_literal(host: str) -> bool:
    """Whether ``host`` is an address a PeerList may carry (spec/encoding.md, PeerList):
    an IPv4 or IPv6 literal, no zone, not unspecified or multicast. GroupStart member
    hosts follow the same rule since protocol version 2 (spec/group.md, "Starting").

    >>> is_address_literal("192.0.2.7"), is_address_literal("node.example")
    (True, False)
    """
    return host.isascii() and "%" not in host and _address_literal_problem(host) is None


@functools.lru_cache(maxsize=4096)
def _address_literal_problem(value: str) -> str | None:
    # cached: a node sees the same few thousand peer addresses in every peer list and
    # group start, and parsing one costs microseconds
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r}, which is not an IP address literal"
    if address.is_unspecified or address.is_multicast:
        return f"{value!r}, which is an unspecified or multicast address"
    return None


@dataclass(frozen=True)
class RecordList(FieldKind):
    """An array of at most ``max_len`` nested records of class ``record`` (each a CBOR map
    with its own closed schema), whose ``unique`` field, if given, differs between items
    (CDDL ``[0*N rule]``; uniqueness is stated in a comment)."""

    record: type[Record]
    max_len: int = 16
    unique: str | None = None

    def describe(self) -> str:
        text = f"an array of at most {self.max_len} {self.record.__name__} maps"
        if self.unique is not None:
            text += f" with distinct {self.unique}s"
        return text

    def problem(self, value: object) -> str | None:
        if not isinstance(value, list | tuple):
            return _type_name(value)
        if len(value) > self.max_len:
            return f"an array of {len(value)} items"
        for item in value:
            if type(item) is not self.record:
                return f"an array holding {_type_name(item)}"
        if self.unique is not None:
            seen = set()
            for index, item in enumerate(value):
                key = getattr(item, self.unique)
                if key in seen:
                    return f"a repeated {self.unique} at index {index}"
                seen.add(key)
        return None

    def normalize(self, value: Any) -> Any:
        return tuple(value)

    def to_wire(self, value: Any) -> object:
        return [item.to_wire() for item in value]

    def from_wire(self, value: object) -> object:
        # Convert only an array within the length limit; anything else is left for
        # problem() to describe, so no work is spent on an oversized array.
        if not isinstance(value, list) or len(value) > self.max_len:
            return value
        items = []
        for index, item in enumerate(value):
            try:
                items.append(self.record.from_wire(item))
            except DecodeError as exc:
                raise DecodeError(f"item {index}: {exc}") from None
        return items


# -- records and messages --------------------------------------------------------------

R = TypeVar("R", bound="Record")


class Record:
    """A CBOR map with a fixed schema: the base of :class:`Message` and
    :class:`HandshakePayload`. Subclasses are frozen dataclasses decorated with
    :func:`_record` (or :func:`_message`, which also registers the type number)."""

    SCHEMA: ClassVar[tuple[tuple[str, FieldKind], ...]] = ()
    """``(python name, kind)`` for every field, in declaration order."""
    EXTENSION_KEYS: ClassVar[frozenset[int]] = frozenset()
    """Keys a decoder ignores (reserved for later versions); all others must be known."""
    ENVELOPE: ClassVar[bool] = False
    """Whether key 0 holds the message type number."""

    def __post_init__(self) -> None:
        for name, kind in self.SCHEMA:
            value = getattr(self, name)
            found = kind.problem(value)
            if found is not None:
                raise LocalProtocolError(_field_error(type(self), name, kind, found))
            object.__setattr__(self, name, kind.normalize(value))

    def __repr__(self) -> str:
        # A model's parameters run to many megabytes: abbreviate long byte strings.
        parts = []
        for name, _ in self.SCHEMA:
            value = getattr(self, name)
            if isinstance(value, bytes) and len(value) > 16:
                shown = f"<{len(value)} bytes {value[:8].hex()}...>"
            else:
                shown = repr(value)
            parts.append(f"{name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_wire(self) -> dict[int, object]:
        """The CBOR map of this record, ready for :func:`p2pfed.encoding.encode`."""
        wire: dict[int, object] = {}
        if self.ENVELOPE:
            wire[0] = typing.cast(Message, self).TYPE
        for name, kind in self.SCHEMA:
            wire[kind.key] = kind.to_wire(getattr(self, name))
        return wire

    @classmethod
    def from_wire(cls: type[R], obj: object) -> R:
        """Build the record from a decoded CBOR value, checking every constraint.

        Raises :class:`~p2pfed.errors.DecodeError` naming the record type and the field.
        """
        name = cls.__name__
        if not isinstance(obj, dict):
            raise DecodeError(f"{name}: expected a CBOR map, got {_type_name(obj)}")
        known = _KNOWN_KEYS.get(cls)
        if known is None:
            # (every message decoded asks: made once per record type)
            keys = {kind.key for _, kind in cls.SCHEMA} | ({0} if cls.ENVELOPE else set())
            known = _KNOWN_KEYS[cls] = frozenset(keys)
        for key in obj:
            if key not in known and key not in cls.EXTENSION_KEYS:
                raise DecodeError(f"{name}: unknown key {key!r} ({cls._known_keys_text()})")
        values: dict[str, object] = {}
        for field_name, kind in cls.SCHEMA:
            # fields are checked once, by __post_init__; before reporting a problem with
            # this one, report any in the fields before it (the first problem in field order)
            if kind.key not in obj:
                cls._check_fields(values)
                raise DecodeError(f"{name}: missing required field '{field_name}' (key {kind.key})")
            try:
                values[field_name] = kind.from_wire(obj[kind.key])
            except DecodeError as exc:
                cls._check_fields(values)
                raise DecodeError(f"{name}: field '{field_name}' (key {kind.key}): {exc}") from None
        try:
            return cls(**values)
        except LocalProtocolError as exc:
            # a field or a rule across fields broken by the peer, not by us
            raise DecodeError(str(exc)) from None

    @classmethod
    def _check_fields(cls, values: dict[str, object]) -> None:
        for field_name, kind in cls.SCHEMA:
            if field_name in values:
                found = kind.problem(values[field_name])
                if found is not None:
                    raise DecodeError(_field_error(cls, field_name, kind, found))

    @classmethod
    def _known_keys_text(cls) -> str:
        known = sorted({kind.key for _, kind in cls.SCHEMA} | ({0} if cls.ENVELOPE else set()))
        text = "known keys: " + (", ".join(map(str, known)) or "none")
        if cls.EXTENSION_KEYS:
            text += (
                f"; {min(cls.EXTENSION_KEYS)}..{max(cls.EXTENSION_KEYS)} are reserved and ignored"
            )
        else:
            text += "; version 1 schemas are closed"
        return text


_KNOWN_KEYS: dict[type[Record], frozenset[int]] = {}
"""The keys of each record type's schema (with 0, the type, for a message)."""


def _field_error(cls: type[Record], name: str, kind: FieldKind, found: str) -> str:
    return f"{cls.__name__}: field '{name}' (key {kind.key}) must be {kind.describe()}, got {found}"


class Message(Record):
    """Base class of every enveloped message (a CBOR map whose key 0 is :attr:`TYPE`)."""

    TYPE: ClassVar[int]
    """The message type number (registry: spec/encoding.md, "Message type registry")."""
    ENVELOPE: ClassVar[bool] = True

    def encode(self) -> bytes:
        """Same as :func:`encode_message` (``self``)."""
        return encode_message(self)


_REGISTRY: dict[int, type[Message]] = {}

C = TypeVar("C", bound=type[Record])


def _record(cls: C) -> C:
    """Read the ``Annotated`` field kinds of a dataclass into ``cls.SCHEMA``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass (apply @dataclass first)")
    hints = typing.get_type_hints(cls, include_extras=True)
    schema = []
    for field in dataclasses.fields(cls):
        kinds = [
            m for m in getattr(hints[field.name], "__metadata__", ()) if isinstance(m, FieldKind)
        ]
        if len(kinds) != 1:
            raise TypeError(f"{cls.__name__}.{field.name} needs exactly one FieldKind annotation")
        schema.append((field.name, kinds[0]))
    keys = [kind.key for _, kind in schema]
    if len(set(keys)) != len(keys) or not all(1 <= k <= _MAX_FIELD_KEY for k in keys):
        raise TypeError(f"{cls.__name__}: field keys {keys} must be distinct and in 1..23")
    cls.SCHEMA = tuple(schema)
    return cls


def _message(cls: C) -> C:
    """:func:`_record`, and register ``cls.TYPE`` in the message type registry."""
    _record(cls)
    assert issubclass(cls, Message)
    number = cls.TYPE
    if not 1 <= number <= UINT64_MAX or number in _REGISTRY:
        raise TypeError(f"message type {number} of {cls.__name__} is invalid or already taken")
    _REGISTRY[number] = cls
    return cls


def message_types() -> dict[int, type[Message]]:
    """The message type registry: type number -> class, in ascending order."""
    return dict(sorted(_REGISTRY.items()))


def _check_registered(msg: Message) -> None:
    if not isinstance(msg, Message) or _REGISTRY.get(type(msg).TYPE) is not type(msg):
        raise LocalProtocolError(
            f"cannot encode {type(msg).__name__} as a message: not a registered message type"
        )


def encode_message(msg: Message) -> bytes:
    """The deterministic CBOR encoding of ``msg`` (a map with its type under key 0).

    >>> encode_message(Keepalive()).hex()
    'a10002'
    """
    _check_registered(msg)
    return encode(msg.to_wire())


def encode_message_parts(msg: Message) -> list[bytes | memoryview]:
    """:func:`encode_message` as a list of pieces whose concatenation is the encoding.

    Bulk byte strings of :data:`BORROW_MIN` bytes or more are not copied: their piece is
    the caller's own buffer. A sender streams the pieces (the secure channel encrypts them
    in place), which saves copying a model once per message.

    >>> b"".join(encode_message_parts(Keepalive())) == encode_message(Keepalive())
    True
    """
    _check_registered(msg)
    wire = msg.to_wire()
    parts: list[bytes | memoryview] = []
    # keys 0..23 in ascending order are the deterministic order (spec/encoding.md), so each
    # value can be encoded on its own and the pieces concatenated
    pending = bytearray(_cbor_header(5, len(wire)))
    for key in sorted(wire):
        value = wire[key]
        pending += encode(key)
        if isinstance(value, bytes | memoryview) and len(value) >= BORROW_MIN:
            view = memoryview(value).cast("B")
            pending += _cbor_header(2, len(view))
            parts.append(bytes(pending))
            parts.append(view)
            pending = bytearray()
        else:
            pending += encode(value)
    if pending:
        parts.append(bytes(pending))
    return parts


def _cbor_header(major: int, argument: int) -> bytes:
    """A CBOR item header in its shortest form (e.g. major 2: a byte string's length)."""
    if argument < 24:
        return bytes([major << 5 | argument])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if argument < 1 << (8 * size):
            return bytes([major << 5 | info]) + argument.to_bytes(size, "big")
    raise LocalProtocolError(f"CBOR argument {argument} does not fit in 64 bits")


def decode_message(
    data: bytes | bytearray | memoryview,
    limits: DecodeLimits = DEFAULT_LIMITS,
    *,
    borrow: bool = False,
) -> Message:
    """Decode and validate one message; raise :class:`~p2pfed.errors.DecodeError` if invalid.

    With ``borrow``, big ``bulk`` byte fields become read-only views of ``data`` instead of
    copies; the caller hands ``data`` over to the message (never modifies it again).

    >>> decode_message(bytes.fromhex("a10002"))
    Keepalive()
    """
    obj = decode(data, limits, borrow_min=BORROW_MIN if borrow else None)
    if not isinstance(obj, dict):
        raise DecodeError(
            f"a message must be a CBOR map with its type under key 0, got {_type_name(obj)}"
        )
    if 0 not in obj:
        raise DecodeError("message has no type: key 0 is missing")
    number = obj[0]
    if not _is_int(number) or number < 0:
        raise DecodeError(
            "message type (key 0) must be an unsigned integer, got "
            + (str(number) if _is_int(number) else _type_name(number))
        )
    cls = _REGISTRY.get(number)
    if cls is None:
        raise DecodeError(f"unknown message type {number}")
    return cls.from_wire(obj)


# -- the messages ----------------------------------------------------------------------


@_record
@dataclass(frozen=True, repr=False)
class HandshakePayload(Record):
    """What each side proves and offers inside Noise handshake messages 2 and 3 (no key 0).

    ``signature`` is the identity key's Ed25519 signature binding the Noise static key (its
    input is defined in spec/transport.md); ``versions`` are the protocol versions this node
    speaks, strictly ascending; ``max_message_size`` is the largest message, in bytes, this
    node accepts.
    """

    EXTENSION_KEYS: ClassVar[frozenset[int]] = frozenset(range(5, _MAX_FIELD_KEY + 1))

    identity_key: Annotated[bytes, Bytes(1, size=IDENTITY_KEY_SIZE)]
    signature: Annotated[bytes, Bytes(2, size=SIGNATURE_SIZE)]
    versions: Annotated[
        Sequence[int], UIntList(3, min_len=1, max_len=MAX_VERSIONS, strictly_ascending=True)
    ]
    max_message_size: Annotated[int, UInt(4)]

    def encode(self) -> bytes:
        """The deterministic CBOR encoding of this payload."""
        return encode(self.to_wire())

    @classmethod
    def decode(
        cls, data: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS
    ) -> HandshakePayload:
        """Decode and validate a payload; raise :class:`~p2pfed.errors.DecodeError`."""
        return cls.from_wire(decode(data, limits))


@_message
@dataclass(frozen=True, repr=False)
class Welcome(Message):
    """The responder's first transport message: the chosen version and its size limit."""

    TYPE: ClassVar[int] = 1
    version: Annotated[int, UInt(1)]
    max_message_size: Annotated[int, UInt(2)]


@_message
@dataclass(frozen=True, repr=False)
class Keepalive(Message):
    """Sent when the channel was idle for a while; proves the peer is alive."""

    TYPE: ClassVar[int] = 2


@_message
@dataclass(frozen=True, repr=False)
class Close(Message):
    """The last message on a channel: why it is closed. ``code`` may be any unsigned
    integer (unknown codes are allowed); :attr:`close_code` maps it to :class:`CloseCode`."""

    TYPE: ClassVar[int] = 3
    code: Annotated[int, UInt(1)]
    reason: Annotated[str, Text(2, max_bytes=MAX_CLOSE_REASON_BYTES)]

    @property
    def close_code(self) -> CloseCode | None:
        """The code as a :class:`CloseCode`, or ``None`` if this version does not know it."""
        try:
            return CloseCode(self.code)
        except ValueError:
            return None


@_message
@dataclass(frozen=True, repr=False)
class ModelState(Message):
    """A whole model: ``parameters`` are little-endian float32 values, concatenated."""

    TYPE: ClassVar[int] = 16
    round: Annotated[int, UInt(1)]
    fingerprint: Annotated[bytes, Bytes(2, size=FINGERPRINT_SIZE)]
    parameters: Annotated[bytes | memoryview, Bytes(3, multiple_of=4, bulk=True)]


@_record
@dataclass(frozen=True, repr=False)
class PeerInfo(Record):
    """One peer in a :class:`PeerList`: its node id and the address it accepts
    connections on. Only a candidate: the Noise handshake proves the id (spec/discovery.md)."""

    node_id: Annotated[bytes, Bytes(1, size=IDENTITY_KEY_SIZE)]
    host: Annotated[str, IpAddress(2)]
    port: Annotated[int, UInt(3, min=1, max=65535)]


@_message
@dataclass(frozen=True, repr=False)
class PeerExchangeRequest(Message):
    """Asks the peer for up to ``max_peers`` peers it knows (peer exchange, at most once
    per minute per channel; spec/discovery.md)."""

    TYPE: ClassVar[int] = 17
    max_peers: Annotated[int, UInt(1, min=1, max=MAX_PEX_PEERS)]


@_message
@dataclass(frozen=True, repr=False)
class PeerList(Message):
    """The answer to a :class:`PeerExchangeRequest`: at most the requested number of
    peers, with distinct node ids (spec/discovery.md)."""

    TYPE: ClassVar[int] = 18
    peers: Annotated[
        Sequence[PeerInfo], RecordList(1, record=PeerInfo, max_len=MAX_PEX_PEERS, unique="node_id")
    ]


# -- group protocol (spec/group.md) ----------------------------------------------------

GROUP_ID_SIZE = 16
MASK_KEY_SIZE = 32
NONCE_SIZE = 32
MAX_GROUP_MEMBERS = 64
MAX_REASON_BYTES = 256
MAX_GRID_DIMS = 16
"""Most dimensions a grid coordinate may have (NodeAnnounce); each coordinate is below
:data:`MAX_GROUP_MEMBERS`, since a grid line is one group."""


@_message
@dataclass(frozen=True, repr=False)
class GroupInvite(Message):
    """An initiator asks a peer to join a new group (spec/group.md, "Formation")."""

    TYPE: ClassVar[int] = 20
    group_id: Annotated[bytes, Bytes(1, size=GROUP_ID_SIZE)]
    priority: Annotated[int, UInt(2)]
    round: Annotated[int, UInt(3)]
    fingerprint: Annotated[bytes, Bytes(4, size=FINGERPRINT_SIZE)]
    model_size: Annotated[int, UInt(5, min=1)]


@_message
@dataclass(frozen=True, repr=False)
class GroupReply(Message):
    """The answer to a :class:`GroupInvite`. An acceptance carries a fresh X25519 mask key
    signed by the member's identity; a refusal carries empty key and signature."""

    TYPE: ClassVar[int] = 21
    group_id: Annotated[bytes, Bytes(1, size=GROUP_ID_SIZE)]
    accept: Annotated[bool, Bool(2)]
    reason: Annotated[str, Text(3, max_bytes=MAX_REASON_BYTES)]
    mask_key: Annotated[bytes, Bytes(4, max_size=MASK_KEY_SIZE)]
    key_signature: Annotated[bytes, Bytes(5, max_size=SIGNATURE_SIZE)]
    listen_port: Annotated[int, UInt(6, max=65535)]

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = (MASK_KEY_SIZE, SIGNATURE_SIZE) if self.accept else (0, 0)
        if (len(self.mask_key), len(self.key_signature)) != sizes:
            raise LocalProtocolError(
                "GroupReply: an acceptance carries a 32-byte mask key and a 64-byte signature, "
                "a refusal carries neither"
            )


@_record
@dataclass(frozen=True, repr=False)
class GroupMemberInfo(Record):
    """One member in a :class:`GroupStart`: identity, signed mask key, listen address
    (``host`` empty where the initiator does not know it)."""

    identity_key: Annotated[bytes, Bytes(1, size=IDENTITY_KEY_SIZE)]
    mask_key: Annotated[bytes, Bytes(2, size=MASK_KEY_SIZE)]
    key_signature: Annotated[bytes, Bytes(3, size=SIGNATURE_SIZE)]
    host: Annotated[str, Text(4, max_bytes=MAX_PEER_HOST_BYTES)]
    port: Annotated[int, UInt(5, max=65535)]


@_message
@dataclass(frozen=True, repr=False)
class GroupStart(Message):
    """The initiator fixes the group: members sorted by node id, the fresh nonce, the round."""

    TYPE: ClassVar[int] = 22
    group_id: Annotated[bytes, Bytes(1, size=GROUP_ID_SIZE)]
    round: Annotated[int, UInt(2)]
    nonce: Annotated[bytes, Bytes(3, size=NONCE_SIZE)]
    members: Annotated[
        Sequence[GroupMemberInfo],
        RecordList(4, record=GroupMemberInfo, max_len=MAX_GROUP_MEMBERS, unique="identity_key"),
    ]


@_message
@dataclass(frozen=True, repr=False)
class GroupAbort(Message):
    """Cancels a forming group, withdraws an acceptance, or aborts an all-reduce."""

    TYPE: ClassVar[int] = 23
    group_id: Annotated[bytes, Bytes(1, size=GROUP_ID_SIZE)]
    reason: Annotated[str, Text(2, max_bytes=MAX_REASON_BYTES)]


@_message
@dataclass(frozen=True, repr=False)
class Shard(Message):
    """Member ``index``'s share of the sender's masked contribution (little-endian words)."""

    TYPE: ClassVar[int] = 24
    group_id: Annotated[bytes, Bytes(1, size=GROUP_ID_SIZE)]
    index: Annotated[int, UInt(2, max=MAX_GROUP_MEMBERS - 1)]
    data: Annotated[bytes | memoryview, Bytes(3, multiple_of=4, bulk=True)]


@_message
@dataclass(frozen=True, repr=False)
class ReducedShard(Message):
    """Shard ``index`` summed over every member's contribution, from member ``index``."""

    TYPE: ClassVar[int] = 25
    group_id: Annotated[bytes, Bytes(1, size=GROUP_ID_SIZE)]
    index: Annotated[int, UInt(2, max=MAX_GROUP_MEMBERS - 1)]
    data: Annotated[bytes | memoryview, Bytes(3, multiple_of=4, bulk=True)]


@_message
@dataclass(frozen=True, repr=False)
class ModelRequest(Message):
    """Asks a peer for its latest aggregated model (answered with :class:`ModelState`)."""

    TYPE: ClassVar[int] = 26


@_message
@dataclass(frozen=True, repr=False)
class GroupPosition(Message):
    """A node's place in exact rounds (spec/group.md, "Exact rounds"), sent to every
    connected peer whenever it changes: the round and step its contribution is for, the
    indices its groups of this round gave it so far (its key) and the number of nodes of
    the round. Protocol version 2."""

    TYPE: ClassVar[int] = 27
    round: Annotated[int, UInt(1)]
    step: Annotated[int, UInt(2, max=MAX_GRID_DIMS - 1)]
    key: Annotated[
        tuple[int, ...], UIntList(3, max_len=MAX_GRID_DIMS - 1, item_max=MAX_GROUP_MEMBERS - 1)
    ]
    size: Annotated[int, UInt(4, min=1)]


@_message
@dataclass(frozen=True, repr=False)
class NodeAnnounce(Message):
    """The first node message on a channel: the port this node accepts connections on
    (0: none), so that the peer can share a dialable address in peer exchange, and the
    node's grid coordinate (empty: not on a grid; spec/group.md, "Grid grouping")."""

    TYPE: ClassVar[int] = 19
    listen_port: Annotated[int, UInt(1, max=65535)]
    grid: Annotated[
        tuple[int, ...], UIntList(2, max_len=MAX_GRID_DIMS, item_max=MAX_GROUP_MEMBERS - 1)
    ] = ()
