"""The secure channel protocol as a pure state machine (no sockets, no clock).

One :class:`ChannelConnection` is one side of one p2pfed channel (spec/transport.md). Bytes
from the peer go in through :meth:`~ChannelConnection.receive_data`, which returns events;
everything this side must send accumulates until :meth:`~ChannelConnection.data_to_send`
takes it. Large messages can instead be encrypted lazily, batch by batch, with
:meth:`~ChannelConnection.send_message_batches`, so a driver can stream them with bounded
memory. Time (handshake timeout, keepalive, idle timeout) belongs to the driver.

Rules of this file:

* The wire is a sequence of Noise messages, each behind a 2-byte big-endian length.
  The first three are the ``Noise_XXpsk3_25519_ChaChaPoly_SHA256`` handshake; every later
  one is a transport message whose plaintexts, concatenated, form the *frame stream*:
  ``u32be length || deterministic CBOR message``, repeated.
* Allowed transitions are the :data:`TRANSITIONS` table; anything else is a protocol error
  naming role, state and input.
* A :class:`~p2pfed.errors.RemoteProtocolError` means the peer broke the protocol. Before it
  propagates, the connection moves to ``CLOSED`` and, if transport keys exist, queues a
  Close message carrying the error's code, so the driver only has to flush and hang up.

Example, two connections wired back to back in memory::

    a = ChannelConnection(Role.INITIATOR, identity=alice, federation_id=fid, psk=psk)
    b = ChannelConnection(Role.RESPONDER, identity=bob, federation_id=fid, psk=psk)
    a.start()
    while not (a.is_open and b.is_open):
        b.receive_data(a.data_to_send())
        a.receive_data(b.data_to_send())
    a.send_message(some_message)
    [event] = b.receive_data(a.data_to_send())   # MessageReceived(some_message)
"""

from __future__ import annotations

import enum
import functools
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from p2pfed.encoding import DecodeLimits
from p2pfed.errors import (
    CloseCode,
    DecodeError,
    HandshakeError,
    LocalProtocolError,
    MessageTooLargeError,
    NoiseDecryptError,
    NoiseError,
    ProtocolError,
    RemoteProtocolError,
)
from p2pfed.identity import NodeId, NodeIdentity, verify_signature
from p2pfed.messages import (
    Close,
    HandshakePayload,
    Keepalive,
    Message,
    Welcome,
    decode_message,
    encode_message,
    encode_message_parts,
)
from p2pfed.noise import HandshakeState, NoiseTransport, generate_keypair

__all__ = [
    "MAX_CLOSE_REASON",
    "MAX_HANDSHAKE_MESSAGE",
    "MAX_NOISE_MESSAGE",
    "MAX_TRANSPORT_PLAINTEXT",
    "NOISE_PROTOCOL_NAME",
    "SIGNATURE_CONTEXT",
    "SUPPORTED_VERSIONS",
    "TRANSITIONS",
    "ChannelConnection",
    "ConnectionClosed",
    "Event",
    "HandshakeComplete",
    "MessageReceived",
    "ReassemblyBudget",
    "Role",
    "State",
    "StaticKey",
    "prologue",
    "static_key_signature_input",
]

NOISE_PROTOCOL_NAME = "Noise_XXpsk3_25519_ChaChaPoly_SHA256"
PROLOGUE_PREFIX = b"p2pfed-channel/v1\x00"
SIGNATURE_CONTEXT = b"p2pfed-noise-static-key:v1\x00"
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2)
MAX_NOISE_MESSAGE = 65535
MAX_TRANSPORT_PLAINTEXT = MAX_NOISE_MESSAGE - 16  # ChaChaPoly tag
MAX_HANDSHAKE_MESSAGE = 1024
MAX_CLOSE_REASON = 256
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024
MIN_MAX_MESSAGE_SIZE = 1024
"""The smallest ``max_message_size`` a node may announce (spec/transport.md, section 3):
below it no control message could be sent to it, and every send would fail locally."""
FRAME_HEADER = 4
LAZY_FRAME_SIZE = 64 * 1024
"""Frame bodies above this size are not allocated from the header: their memory is
committed page by page as body bytes arrive (spec/transport.md, section 8)."""


class ReassemblyBudget:
    """Body bytes received into unfinished large frames, over every channel sharing it.

    A frame header alone costs nothing (large bodies are committed as their bytes arrive),
    so what a peer can make a node hold is what it actually sent. This counter bounds
    that over all channels: while :attr:`exhausted`, a driver reads on only for the
    channel holding the most (it can finish its frame and give the bytes back; the others
    wait), see spec/transport.md, section 8. Pure bookkeeping, no I/O: a driver may
    subclass it to learn of releases (:meth:`_released`).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a reassembly budget must be positive")
        self.limit = limit
        self.used = 0
        self._held: dict[int, int] = {}  # id of a connection -> bytes it holds

    @property
    def exhausted(self) -> bool:
        return self.used >= self.limit

    def hold(self, owner: object, size: int) -> None:
        """``owner`` now holds ``size`` bytes (0: none)."""
        key = id(owner)
        before = self._held.pop(key, 0)
        if size:
            self._held[key] = size
        self.used += size - before
        if size < before:
            self._released()

    def may_grow(self, owner: object) -> bool:
        """Whether ``owner`` may receive more now: the budget has room, or ``owner``
        holds the most (so one frame always progresses and no set of channels can wait
        on each other forever)."""
        if not self.exhausted:
            return True
        mine = self._held.get(id(owner), 0)
        return mine > 0 and mine >= max(self._held.values())

    def _released(self) -> None:
        """Called when some owner gave bytes back."""


def _frame_buffer(length: int) -> memoryview:
    """A zeroed, writable buffer for a frame body of ``length`` bytes.

    Above :data:`LAZY_FRAME_SIZE` it is an anonymous mapping: the kernel commits (and
    zeroes) its pages on first write, so a header announcing 256 MiB costs one page until
    the body arrives, where ``bytearray(length)`` would zero, and so commit, all of it.
    """
    if length <= LAZY_FRAME_SIZE:
        return memoryview(bytearray(length))
    return memoryview(mmap.mmap(-1, length))


def prologue(federation_id: bytes) -> bytes:
    """The Noise prologue: binds the handshake to the protocol and to one federation."""
    return PROLOGUE_PREFIX + federation_id


def static_key_signature_input(noise_static_public: bytes) -> bytes:
    """What a node signs with its Ed25519 identity to vouch for its Noise static key."""
    return SIGNATURE_CONTEXT + noise_static_public


@functools.lru_cache(maxsize=4096)
def _static_key_signed(identity_key: bytes, signature: bytes, static: bytes) -> bool:
    """Whether ``signature`` by ``identity_key`` vouches for the Noise static key ``static``.

    A pure function, cached: a node keeps one static key for all its channels, so when
    many nodes share a process (simnet) the same signature comes by once per connection.
    """
    return verify_signature(identity_key, signature, static_key_signature_input(static))


@dataclass(frozen=True)
class StaticKey:
    """A node's Noise static key pair and its identity's signature over the public key.

    spec/transport.md lets the static key be fresh per process start: making it once per
    node and handing it to every channel saves a key generation and a signature per
    connection (a busy node opens hundreds).
    """

    private: bytes
    public: bytes
    signature: bytes

    @classmethod
    def generate(
        cls, identity: NodeIdentity, randbytes: Callable[[int], bytes] = os.urandom
    ) -> StaticKey:
        private, public = generate_keypair("25519", randbytes)
        return cls(private, public, identity.sign(static_key_signature_input(public)))


@functools.lru_cache(maxsize=8192)
def _payload_bytes(
    identity_key: bytes, signature: bytes, versions: tuple[int, ...], max_message_size: int
) -> bytes:
    """A node's encoded handshake payload: the same for every channel with one static key
    (cached like the signature checks: simnet runs thousands of nodes in one process)."""
    return HandshakePayload(
        identity_key=identity_key,
        signature=signature,
        versions=list(versions),
        max_message_size=max_message_size,
    ).encode()


def _chunks(parts: list[bytes | memoryview], size: int) -> Iterator[bytes | memoryview]:
    """The concatenation of ``parts`` cut into pieces of ``size`` bytes (the last shorter).

    A piece inside one part is a view of it; only pieces that straddle parts are copied.
    """
    carry = b""
    for part in parts:
        view = memoryview(part).cast("B")
        position = 0
        if carry:
            position = size - len(carry)
            carry += view[:position]
            if len(carry) < size:
                continue
            yield carry
            carry = b""
        while len(view) - position >= size:
            yield view[position : position + size]
            position += size
        carry = bytes(view[position:])
    if carry:
        yield carry


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(enum.Enum):
    """Where a connection is. The handshake states name what we wait for next."""

    START = "start"
    AWAIT_HANDSHAKE_1 = "await-handshake-1"  # responder: waiting for -> e
    AWAIT_HANDSHAKE_2 = "await-handshake-2"  # initiator: waiting for <- e, ee, s, es
    AWAIT_HANDSHAKE_3 = "await-handshake-3"  # responder: waiting for -> s, se, psk
    AWAIT_WELCOME = "await-welcome"  # initiator: handshake sent, waiting for Welcome
    OPEN = "open"
    CLOSED = "closed"


class Input(enum.Enum):
    """What can happen to a connection: local calls and arrivals from the peer."""

    START = "start()"
    HANDSHAKE_MESSAGE = "handshake message"
    WELCOME = "Welcome"
    KEEPALIVE = "Keepalive"
    CLOSE = "Close"
    MESSAGE = "node message"
    SEND = "send_message()"
    LOCAL_CLOSE = "close()"


_I, _R = Role.INITIATOR, Role.RESPONDER

#: ``TRANSITIONS[role][state][input] -> next state``. No entry: a protocol error.
TRANSITIONS: dict[Role, dict[State, dict[Input, State]]] = {
    _I: {
        State.START: {Input.START: State.AWAIT_HANDSHAKE_2, Input.LOCAL_CLOSE: State.CLOSED},
        State.AWAIT_HANDSHAKE_2: {
            Input.HANDSHAKE_MESSAGE: State.AWAIT_WELCOME,
            Input.LOCAL_CLOSE: State.CLOSED,
        },
        State.AWAIT_WELCOME: {
            Input.WELCOME: State.OPEN,
            Input.CLOSE: State.CLOSED,
            Input.LOCAL_CLOSE: State.CLOSED,
        },
        State.OPEN: {
            Input.KEEPALIVE: State.OPEN,
            Input.MESSAGE: State.OPEN,
            Input.SEND: State.OPEN,
            Input.CLOSE: State.CLOSED,
            Input.LOCAL_CLOSE: State.CLOSED,
        },
        State.CLOSED: {Input.LOCAL_CLOSE: State.CLOSED},
    },
    _R: {
        State.START: {Input.START: State.AWAIT_HANDSHAKE_1, Input.LOCAL_CLOSE: State.CLOSED},
        State.AWAIT_HANDSHAKE_1: {
            Input.HANDSHAKE_MESSAGE: State.AWAIT_HANDSHAKE_3,
            Input.LOCAL_CLOSE: State.CLOSED,
        },
        State.AWAIT_HANDSHAKE_3: {
            Input.HANDSHAKE_MESSAGE: State.OPEN,
            Input.LOCAL_CLOSE: State.CLOSED,
        },
        State.OPEN: {
            Input.KEEPALIVE: State.OPEN,
            Input.MESSAGE: State.OPEN,
            Input.SEND: State.OPEN,
            Input.CLOSE: State.CLOSED,
            Input.LOCAL_CLOSE: State.CLOSED,
        },
        State.CLOSED: {Input.LOCAL_CLOSE: State.CLOSED},
    },
}


_HANDSHAKE_STEP = {
    State.AWAIT_HANDSHAKE_1: 1,
    State.AWAIT_HANDSHAKE_2: 2,
    State.AWAIT_HANDSHAKE_3: 3,
}


@dataclass(frozen=True)
class HandshakeComplete:
    """The channel is open: the peer proved its identity and a version was agreed."""

    peer_id: NodeId
    peer_identity_key: bytes
    version: int
    peer_max_message_size: int


@dataclass(frozen=True)
class MessageReceived:
    """A node-protocol message arrived (channel control messages are handled inside)."""

    message: Message


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the channel with a Close message."""

    code: int
    reason: str

    @property
    def close_code(self) -> CloseCode | None:
        try:
            return CloseCode(self.code)
        except ValueError:
            return None


Event = HandshakeComplete | MessageReceived | ConnectionClosed


class ChannelConnection:
    """One side of a p2pfed secure channel, as a sans-IO state machine.

    ``identity`` is this node's Ed25519 identity; ``federation_id`` and ``psk`` come from the
    federation file; ``max_message_size`` is the largest message this side accepts (announced
    to the peer). ``noise_static`` is this node's X25519 private key for Noise, or a
    :class:`StaticKey` (which also holds the signature for it); a fresh one if omitted.
    ``randbytes`` supplies the handshake's ephemeral keys.
    """

    def __init__(
        self,
        role: Role,
        *,
        identity: NodeIdentity,
        federation_id: bytes,
        psk: bytes,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        versions: Sequence[int] = SUPPORTED_VERSIONS,
        noise_static: bytes | StaticKey | None = None,
        noise_ephemeral: bytes | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
        budget: ReassemblyBudget | None = None,
    ) -> None:
        if len(psk) != 32:
            raise LocalProtocolError(f"the federation secret must be 32 bytes, got {len(psk)}")
        if not MIN_MAX_MESSAGE_SIZE <= max_message_size <= 0xFFFF_FFFF:
            raise LocalProtocolError(
                f"max_message_size must be between {MIN_MAX_MESSAGE_SIZE} and 2**32 - 1 bytes"
            )
        if not versions or list(versions) != sorted(set(versions)):
            raise LocalProtocolError("versions must be a non-empty strictly ascending list")
        self.role = role
        self.state = State.START
        self._identity = identity
        self._versions = tuple(versions)
        self.max_message_size = max_message_size
        self._static_signature: tuple[bytes, bytes] | None = None  # (public, signature)
        if isinstance(noise_static, StaticKey):
            self._static_signature = (noise_static.public, noise_static.signature)
            noise_static = noise_static.private
        elif noise_static is None:
            noise_static, _ = generate_keypair("25519", randbytes)
        self._handshake: HandshakeState | None = HandshakeState(
            NOISE_PROTOCOL_NAME,
            initiator=role is Role.INITIATOR,
            prologue=prologue(federation_id),
            s=noise_static,
            e=noise_ephemeral,
            psks=[psk],
            randbytes=randbytes,
        )
        self._transport: NoiseTransport | None = None
        self._limits = DecodeLimits(max_bytes=max_message_size)
        self._inbuf = bytearray()  # an incomplete Noise message (with its length prefix)
        self._outbuf: list[bytes] = []
        # frame reassembly: the header bytes seen so far, then the body being filled
        self._frame_header = bytearray()
        self._frame_body: memoryview | None = None
        self._frame_filled = 0
        self._budget = budget
        self._peer_payload: HandshakePayload | None = None
        self.peer_id: NodeId | None = None
        self.peer_identity_key: bytes | None = None
        self.peer_max_message_size: int | None = None
        self.version: int | None = None
        self.handshake_hash: bytes | None = None

    # -- state machine -------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    def _transition(self, event: Input, *, remote: bool) -> None:
        try:
            self.state = TRANSITIONS[self.role][self.state][event]
        except KeyError:
            text = f"{self.role.value} in state {self.state.value} cannot handle {event.value}"
            if remote:
                self._fail(RemoteProtocolError(text, CloseCode.UNEXPECTED_MESSAGE))
            raise LocalProtocolError(text) from None

    def _fail(self, error: ProtocolError) -> NoReturn:
        """Close because of ``error`` (queue a Close if we can still encrypt), then raise it."""
        if self.state is not State.CLOSED and self._transport is not None:
            reason = str(error).encode("utf-8")[:MAX_CLOSE_REASON].decode("utf-8", "ignore")
            self._queue_message(Close(code=int(error.code), reason=reason))
        self.state = State.CLOSED
        self.discard_buffers()
        raise error

    # -- local calls ---------------------------------------------------------------------

    def start(self) -> None:
        """Begin the handshake: the initiator queues handshake message 1."""
        self._transition(Input.START, remote=False)
        if self.role is Role.INITIATOR:
            self._write_handshake(b"")

    def send_message(self, message: Message) -> None:
        """Queue a node-protocol message (use :meth:`send_message_batches` for big ones)."""
        for batch in self.send_message_batches(message):
            self._outbuf.append(bytes(batch))

    def send_message_batches(
        self, message: Message, batch_size: int = 1 << 20
    ) -> Iterator[memoryview]:
        """Encrypt ``message`` and yield the wire bytes in batches of about ``batch_size``.

        The encryption happens as the iterator is consumed, into one reused buffer: each
        batch is only valid until the next is requested, so write it out first (as a
        driver does anyway). Consume the iterator completely before sending anything else.
        """
        return self.send_messages_batches((message,), batch_size)

    def send_messages_batches(
        self, messages: Sequence[Message], batch_size: int = 1 << 20
    ) -> Iterator[memoryview]:
        """Like :meth:`send_message_batches` for several messages in order: their frames
        are packed together, so small messages share Noise messages (and the driver's
        writes) instead of taking one each. One message gives exactly the bytes
        :meth:`send_message_batches` gives."""
        self._transition(Input.SEND, remote=False)
        limit = self.peer_max_message_size or 0
        stream: list[bytes | memoryview] = []
        for message in messages:
            parts = encode_message_parts(message)
            size = sum(len(part) for part in parts)
            if size > limit:
                raise LocalProtocolError(
                    f"{type(message).__name__} encodes to {size} bytes but the peer accepts "
                    f"at most {limit}; send less per message"
                )
            stream.append(size.to_bytes(FRAME_HEADER, "big"))
            stream += parts
        if not stream:
            return iter(())
        return self._encrypt_stream(stream, batch_size)

    def send_keepalive(self) -> None:
        """Queue a Keepalive (the driver sends one when it has been quiet for a while)."""
        if self.state is State.OPEN:
            self._queue_message(Keepalive())

    def close(self, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        """Queue a Close message (if the channel can still send one) and stop."""
        can_send = self.state is not State.CLOSED and self._transport is not None
        self._transition(Input.LOCAL_CLOSE, remote=False)
        if can_send:
            reason_bytes = reason.encode("utf-8")[:MAX_CLOSE_REASON]
            self._queue_message(
                Close(code=int(code), reason=reason_bytes.decode("utf-8", "ignore"))
            )

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call (maybe empty)."""
        data = b"".join(self._outbuf)
        self._outbuf.clear()
        return data

    # -- bytes from the peer -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes received from the peer; return the events they complete.

        Raises :class:`~p2pfed.errors.RemoteProtocolError` (after queueing a Close where
        possible) if the peer broke the protocol; the connection is then ``CLOSED``.
        """
        if self.state is State.CLOSED:
            return []
        if self.state is State.START:
            raise LocalProtocolError("call start() before receive_data()")
        events: list[Event] = []
        view = memoryview(data).cast("B")
        if self._inbuf:
            # finish the Noise message that the previous data left incomplete, copying
            # only its missing bytes (bulk data must not be copied through this buffer)
            buf = self._inbuf
            if len(buf) < 2:
                take = 2 - len(buf)
                buf += view[:take]
                view = view[take:]
                if len(buf) < 2:
                    return events
            length = self._check_length(int.from_bytes(buf[:2], "big"))
            take = 2 + length - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) < 2 + length:
                return events
            self._inbuf = bytearray()
            self._read_noise_message(memoryview(buf)[2:], events)
        offset = 0
        while len(view) - offset >= 2 and self.state is not State.CLOSED:
            length = self._check_length(int.from_bytes(view[offset : offset + 2], "big"))
            if len(view) - offset < 2 + length:
                break
            self._read_noise_message(view[offset + 2 : offset + 2 + length], events)
            offset += 2 + length
        if offset < len(view) and self.state is not State.CLOSED:
            self._inbuf = bytearray(view[offset:])
        return events

    def _check_length(self, length: int) -> int:
        """Vet a Noise message length prefix before waiting for (and buffering) its body."""
        if length == 0:
            self._fail(RemoteProtocolError("empty Noise message"))
        if self._transport is None and length > MAX_HANDSHAKE_MESSAGE:
            self._fail(
                HandshakeError(
                    f"handshake message of {length} bytes is longer than the "
                    f"{MAX_HANDSHAKE_MESSAGE}-byte limit (not a p2pfed peer?)",
                    CloseCode.PROTOCOL_ERROR,
                )
            )
        return length

    def _read_noise_message(self, message: memoryview, events: list[Event]) -> None:
        if self._transport is None:
            events.extend(self._read_handshake(bytes(message)))
        else:
            events.extend(self._read_transport(message))

    # -- handshake -----------------------------------------------------------------------

    def _own_payload(self, handshake: HandshakeState) -> bytes:
        static = handshake.local_static_public
        assert static is not None
        known = self._static_signature
        if known is not None and known[0] == static:
            signature = known[1]
        else:
            signature = self._identity.sign(static_key_signature_input(static))
        return _payload_bytes(
            self._identity.public_key, signature, self._versions, self.max_message_size
        )

    def _write_handshake(self, payload: bytes) -> None:
        assert self._handshake is not None
        message = self._handshake.write_message(payload)
        self._outbuf.append(len(message).to_bytes(2, "big") + message)

    def _read_handshake(self, noise_message: bytes) -> list[Event]:
        handshake = self._handshake
        assert handshake is not None
        step = _HANDSHAKE_STEP.get(self.state)
        if step is None:
            self._transition(Input.HANDSHAKE_MESSAGE, remote=True)
            raise AssertionError("unreachable: no handshake message is valid here")
        try:
            payload = handshake.read_message(noise_message)
        except NoiseDecryptError:
            hint = (
                " (the peer does not hold this federation's secret: wrong federation file?)"
                if step == 3
                else ""
            )
            self._fail(HandshakeError(f"handshake message {step} failed authentication{hint}"))
        except NoiseError as exc:
            self._fail(HandshakeError(f"handshake message {step} is malformed: {exc}"))
        if step == 1:
            if payload:
                self._fail(HandshakeError("handshake message 1 must carry an empty payload"))
            self._transition(Input.HANDSHAKE_MESSAGE, remote=True)
            self._write_handshake(self._own_payload(handshake))
            return []
        peer = self._verify_peer(handshake, payload, step)
        if step == 2:
            self._transition(Input.HANDSHAKE_MESSAGE, remote=True)
            self._write_handshake(self._own_payload(handshake))
            self._finish_handshake(handshake)
            return []
        # step 3: the responder picks the highest common version and welcomes the peer
        self._finish_handshake(handshake)
        common = sorted(set(self._versions) & set(peer.versions))
        if not common:
            self._fail(
                RemoteProtocolError(
                    f"no common protocol version: we speak {list(self._versions)}, "
                    f"the peer speaks {peer.versions}",
                    CloseCode.UNSUPPORTED_VERSION,
                )
            )
        self.version = common[-1]
        self._transition(Input.HANDSHAKE_MESSAGE, remote=True)
        self._queue_message(Welcome(version=self.version, max_message_size=self.max_message_size))
        return [self._handshake_complete()]

    def _verify_peer(
        self, handshake: HandshakeState, payload: bytes, step: int
    ) -> HandshakePayload:
        try:
            peer = HandshakePayload.decode(payload, DecodeLimits(max_bytes=MAX_HANDSHAKE_MESSAGE))
        except DecodeError as exc:
            self._fail(HandshakeError(f"handshake message {step} payload is invalid: {exc}"))
        static = handshake.remote_static
        assert static is not None
        if not _static_key_signed(bytes(peer.identity_key), bytes(peer.signature), bytes(static)):
            self._fail(
                HandshakeError(
                    f"handshake message {step}: the identity signature over the peer's Noise "
                    "static key does not verify"
                )
            )
        if peer.identity_key == self._identity.public_key:
            self._fail(HandshakeError("the peer presents our own identity (connected to self?)"))
        if peer.max_message_size < MIN_MAX_MESSAGE_SIZE:
            self._fail(
                HandshakeError(
                    f"handshake message {step}: the peer accepts messages of at most "
                    f"{peer.max_message_size} bytes, below the protocol's minimum "
                    f"{MIN_MAX_MESSAGE_SIZE}"
                )
            )
        self._peer_payload = peer
        self.peer_identity_key = peer.identity_key
        self.peer_id = NodeId.from_public_key(peer.identity_key)
        self.peer_max_message_size = peer.max_message_size
        return peer

    def _finish_handshake(self, handshake: HandshakeState) -> None:
        self._transport = handshake.transport()
        self.handshake_hash = handshake.handshake_hash
        self._handshake = None

    def _handshake_complete(self) -> HandshakeComplete:
        assert self.peer_id is not None and self.peer_identity_key is not None
        assert self.version is not None and self.peer_max_message_size is not None
        return HandshakeComplete(
            peer_id=self.peer_id,
            peer_identity_key=self.peer_identity_key,
            version=self.version,
            peer_max_message_size=self.peer_max_message_size,
        )

    # -- transport -----------------------------------------------------------------------

    def _queue_message(self, message: Message) -> None:
        self._queue_frame(encode_message(message))

    def _queue_frame(self, payload: bytes) -> None:
        stream: list[bytes | memoryview] = [len(payload).to_bytes(FRAME_HEADER, "big"), payload]
        for batch in self._encrypt_stream(stream, 1 << 20):
            self._outbuf.append(bytes(batch))  # batches share one buffer: copy to keep

    def _encrypt_stream(
        self, parts: list[bytes | memoryview], batch_size: int
    ) -> Iterator[memoryview]:
        """Encrypt the frame-stream bytes ``parts`` (frame headers included), yielding wire
        bytes in batches: Noise messages filled to the largest plaintext, the last shorter.

        Every batch is a view of one reused buffer, valid until the next one is asked for:
        encrypting in place saves allocating (and page-faulting) a fresh ciphertext per
        64 KiB, which is most of the cost of a big message on a fast link. Plaintext chunks
        are views of the parts, so a model is never copied before encryption either.
        """
        transport = self._transport
        assert transport is not None
        encrypt_into = transport.send.encrypt_into
        total = sum(len(part) for part in parts)
        if total <= MAX_TRANSPORT_PLAINTEXT:
            # one Noise message (nearly every message but a big model): the same bytes as
            # below, without cutting the parts into chunks one small piece at a time
            length = total + 16
            wire = memoryview(bytearray(2 + length))
            wire[:2] = length.to_bytes(2, "big")
            encrypt_into(b"", b"".join(parts), wire[2:])
            yield wire
            return
        chunks = _chunks(parts, MAX_TRANSPORT_PLAINTEXT)
        slot = MAX_NOISE_MESSAGE + 2
        count = -(-total // MAX_TRANSPORT_PLAINTEXT)
        # only as large as the wire bytes need: a small message (a keepalive) must not pay
        # for zeroing a whole 64 KiB slot, the largest cost of sending it
        size = min(max(1, batch_size // slot) * slot, total + count * (2 + 16))
        buffer = memoryview(bytearray(size))
        filled = 0
        for chunk in chunks:
            length = len(chunk) + 16
            if filled + 2 + length > len(buffer):
                yield buffer[:filled]
                filled = 0
            buffer[filled : filled + 2] = length.to_bytes(2, "big")
            encrypt_into(b"", chunk, buffer[filled + 2 : filled + 2 + length])
            filled += 2 + length
        yield buffer[:filled]

    def _read_transport(self, noise_message: memoryview) -> list[Event]:
        transport = self._transport
        assert transport is not None
        receive = transport.receive
        size = len(noise_message) - 16
        body = self._frame_body
        try:
            if size < 1:
                self._fail(RemoteProtocolError("a transport message must carry at least 1 byte"))
            if body is not None and len(body) - self._frame_filled >= size:
                # bulk path: decrypt straight into the message under reassembly
                start = self._frame_filled
                receive.decrypt_into(b"", noise_message, body[start : start + size])
                self._frame_filled += size
                if self._frame_filled < len(body):
                    self._charge_frame()
                    return []
                self._frame_done()
                event = self._handle_frame(body)
                return [] if event is None else [event]
            plaintext = receive.decrypt_with_ad(b"", noise_message)
        except NoiseDecryptError:
            self._fail(RemoteProtocolError("a transport message failed authentication"))
        except NoiseError as exc:
            self._fail(RemoteProtocolError(f"bad transport message: {exc}"))
        return self._read_frames(memoryview(plaintext))

    def _read_frames(self, view: memoryview) -> list[Event]:
        """Split decrypted frame-stream bytes into frames (any split is allowed)."""
        events: list[Event] = []
        position = 0
        while position < len(view) and self.state is not State.CLOSED:
            body = self._frame_body
            if body is None:
                take = FRAME_HEADER - len(self._frame_header)
                self._frame_header += view[position : position + take]
                position += take
                if len(self._frame_header) < FRAME_HEADER:
                    break
                length = int.from_bytes(self._frame_header, "big")
                self._frame_header.clear()
                if length > self.max_message_size:
                    self._fail(
                        MessageTooLargeError(
                            f"the peer announced a {length}-byte message; this node accepts at "
                            f"most {self.max_message_size} bytes"
                        )
                    )
                if length == 0:
                    self._fail(DecodeError("empty frame (a message must not be empty)"))
                self._frame_body = _frame_buffer(length)
                self._frame_filled = 0
                continue
            take = min(len(body) - self._frame_filled, len(view) - position)
            body[self._frame_filled : self._frame_filled + take] = view[position : position + take]
            position += take
            self._frame_filled += take
            if self._frame_filled == len(body):
                self._frame_done()
                event = self._handle_frame(body)
                if event is not None:
                    events.append(event)
        if self._frame_body is not None:
            self._charge_frame()
        return events

    @property
    def reassembling(self) -> int:
        """Body bytes received so far of a large frame under reassembly (0: none)."""
        body = self._frame_body
        return self._frame_filled if body is not None and len(body) > LAZY_FRAME_SIZE else 0

    def _charge_frame(self) -> None:
        if self._budget is not None:
            self._budget.hold(self, self.reassembling)

    def _frame_done(self) -> None:
        """The frame under reassembly is complete (or abandoned): it no longer counts."""
        self._frame_body = None
        if self._budget is not None:
            self._budget.hold(self, 0)

    def may_receive(self) -> bool:
        """Whether the node's reassembly budget lets this channel read more now (always
        true without a budget, or without a large frame under reassembly)."""
        return self._budget is None or not self.reassembling or self._budget.may_grow(self)

    def discard_buffers(self) -> None:
        """Drop a frame under reassembly (the driver closed the channel): give back its
        memory and its share of the budget."""
        self._frame_done()
        self._inbuf = bytearray()

    def _handle_frame(self, body: memoryview) -> Event | None:
        try:
            # the body buffer is handed over to the message: big tensors are not copied
            message = decode_message(body, self._limits, borrow=True)
        except DecodeError as exc:
            self._fail(exc)
        if isinstance(message, Welcome):
            self._transition(Input.WELCOME, remote=True)
            if message.version not in self._versions:
                self._fail(
                    RemoteProtocolError(
                        f"the peer chose protocol version {message.version}, which we did not "
                        "offer",
                        CloseCode.UNSUPPORTED_VERSION,
                    )
                )
            if message.max_message_size < MIN_MAX_MESSAGE_SIZE:
                self._fail(
                    RemoteProtocolError(
                        f"the peer's Welcome announces max_message_size "
                        f"{message.max_message_size}, below the protocol's minimum "
                        f"{MIN_MAX_MESSAGE_SIZE}"
                    )
                )
            self.version = message.version
            self.peer_max_message_size = min(
                self.peer_max_message_size or message.max_message_size, message.max_message_size
            )
            return self._handshake_complete()
        if isinstance(message, Keepalive):
            self._transition(Input.KEEPALIVE, remote=True)
            return None
        if isinstance(message, Close):
            self._transition(Input.CLOSE, remote=True)
            return ConnectionClosed(code=message.code, reason=message.reason)
        self._transition(Input.MESSAGE, remote=True)
        return MessageReceived(message)
