"""The conformance kit: check any p2pfed node implementation against spec/ over TCP.

``p2pfed conformance HOST:PORT --federation FILE`` connects to a running node, of any
implementation, with the federation's secret and runs a list of checks. Each check is a small
async function tied to the spec section it verifies; it opens its own fresh connection, waits
at most the configured timeout for anything, and explains a failure in terms of the spec.
The report groups the results by section; the exit code is 0 only if no check failed.

Rules of this file:

* The kit speaks the protocol through :class:`_Probe`, a deliberately flexible initiator
  built straight on :class:`p2pfed.noise.HandshakeState`: it follows spec/transport.md unless
  a check tells it to break one rule (wrong secret, wrong federation id, forged signature, an
  oversized length, a malformed message). The reference channel (:mod:`p2pfed.channel`) is
  not used for probing because it refuses, rightly, to send anything invalid.
* A check returns a :class:`CheckResult` with one of four statuses: ``PASS``; ``FAIL`` (a
  MUST of the spec is broken, or the node did not answer in time); ``WARN`` (a SHOULD is not
  met, e.g. the node hung up without the Close the spec recommends); ``SKIP`` (not
  applicable, or a prerequisite failed). Only ``FAIL`` makes the run fail.
* Every check that provokes an error then verifies that the node *keeps serving*
  (spec/transport.md section 7): a fresh handshake must still complete.
* Reference peers for the group check are real :class:`p2pfed.node.Node` objects in this
  process; torch and the node are imported only when that check runs.
* The checks of groups the node initiates (group.md §3 to §6) use the kit's own members
  (:class:`_Member`): fresh identities on version-1 channels that keep their channel
  alive, answer at the message level (signed mask keys, declines, aborts, invites) and
  never send a Shard. Each such check is shown, in tests/test_conformance_behaviour.py,
  to fail against a real node with exactly that behaviour broken.

Example::

    $ p2pfed conformance 127.0.0.1:7447 --federation ~/.p2pfed/federation.toml
    $ p2pfed conformance 10.0.0.5:7447 --federation lab.federation.toml \\
          --task mytasks.mnist:task --listen-host 10.0.0.9 --json
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import math
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pfed.channel import (
    MAX_HANDSHAKE_MESSAGE,
    MAX_TRANSPORT_PLAINTEXT,
    NOISE_PROTOCOL_NAME,
    prologue,
    static_key_signature_input,
)
from p2pfed.config import parse_host_port
from p2pfed.encoding import DecodeLimits
from p2pfed.errors import CloseCode, ConfigError, DecodeError, NoiseError
from p2pfed.federation import Federation, load_federation
from p2pfed.group import mask_key_signature_input, shard_bounds
from p2pfed.identity import NodeId, NodeIdentity, verify_signature
from p2pfed.messages import (
    Close,
    GroupAbort,
    GroupInvite,
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
    PeerList,
    ReducedShard,
    Shard,
    Welcome,
    decode_message,
    encode_message,
)
from p2pfed.noise import HandshakeState, NoiseTransport, generate_keypair

if TYPE_CHECKING:  # the node's modules (and zeroconf) load only when a check needs them
    from p2pfed.network import Network

__all__ = [
    "CHECKS",
    "DEFAULT_TASK",
    "SECTIONS",
    "Check",
    "CheckResult",
    "ConformanceOptions",
    "ConformanceReport",
    "Status",
    "add_conformance_parser",
    "cmd_conformance",
    "run_conformance",
]

log = logging.getLogger("p2pfed.conformance")

DEFAULT_TASK = "p2pfed.tasks.digits:task"
KIT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""What the kit announces as its own max_message_size (the node must not send more)."""
FRAME_HEADER = 4

SECTIONS: dict[str, str] = {
    "transport.md §1": "Noise protocol",
    "transport.md §2": "Handshake messages",
    "transport.md §3": "Handshake payload and identity binding",
    "transport.md §4": "Version negotiation and the Welcome",
    "transport.md §5": "Framing",
    "transport.md §6": "Channel control messages",
    "transport.md §7": "Error handling",
    "encoding.md": "Deterministic CBOR, envelope and closed schemas",
    "discovery.md §4": "Peer exchange",
    "discovery.md §4.5": "NodeAnnounce",
    "group.md": "Formation and secure all-reduce with reference peers",
    "group.md §1": "Weights",
    "group.md §3": "Formation with the node as initiator",
    "group.md §5": "Timeouts",
    "group.md §6": "Abort and exclusion",
    "group.md exact": "Protocol version 2: GroupPosition",
}
"""The report's sections, in report order: spec file and section, and its title."""


class Status(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    WARN = "WARN"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``detail`` says what was seen (and, on failure, why that
    breaks the spec)."""

    name: str
    section: str
    summary: str
    status: Status
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True)
class ConformanceOptions:
    """How the kit probes (seconds unless said otherwise).

    ``timeout`` bounds every single wait of a check (an answer, a close); ``idle`` is how long
    the keepalive check keeps an idle channel open; ``group_timeout`` how long the reference
    peers wait for a group that includes the node, and the kit for the node's invites and
    for its all-reduce timeout. ``keepalive_interval``, if given, is the node's configured
    keepalive interval: the keepalive-sent check then requires a Keepalive within it (plus
    ``timeout``); the spec's interval, 1 s, by default. ``task`` and ``task_settings`` define the
    reference peers' model, which must have the node's fingerprint. ``listen_host`` is where
    the reference peers accept connections (an address the node can reach).
    """

    timeout: float = 5.0
    idle: float = 3.0
    group_timeout: float = 60.0
    task: str = DEFAULT_TASK
    task_settings: dict[str, Any] = field(default_factory=dict)
    listen_host: str = "127.0.0.1"
    keepalive_interval: float | None = 1.0
    node_trains: bool = False
    """The node trains between groups (its weight is reset to its training weight each
    round): the group-weights check, which needs the weight it holds, is skipped."""

    def __post_init__(self) -> None:
        if self.keepalive_interval is not None:
            value = self.keepalive_interval
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"conformance option keepalive_interval must be a positive number of "
                    f"seconds, got {value!r}"
                )
        for name in ("timeout", "idle", "group_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"conformance option {name} must be a positive number of seconds, got {value!r}"
                )


@dataclass
class ConformanceReport:
    """All results of one run against ``target``; ``ok`` if no check failed."""

    target: str
    federation: str
    peer_id: NodeId | None = None
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.status is not Status.FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s.value: sum(r.status is s for r in self.results) for s in Status}

    def format_text(self) -> str:
        """The human-readable report, grouped by spec section."""
        lines = [f"p2pfed conformance report: {self.target} (federation {self.federation})"]
        lines.append(f"node id: {self.peer_id if self.peer_id else '(handshake failed)'}")
        width = max((len(r.name) for r in self.results), default=0)
        for section, title in SECTIONS.items():
            rows = [r for r in self.results if r.section == section]
            if not rows:
                continue
            lines += ["", f"{section}  {title}"]
            for r in rows:
                lines.append(f"  {r.status.value}  {r.name:<{width}}  {r.summary}")
                if r.status is not Status.PASS or r.detail:
                    for part in r.detail.splitlines() or [""]:
                        lines.append(f"        {'':<{width}}  {part}".rstrip())
        counts = self.counts()
        verdict = "CONFORMANT" if self.ok else "NOT CONFORMANT"
        lines += [
            "",
            f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['WARN']} warnings, "
            f"{counts['SKIP']} skipped: {verdict}",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "federation": self.federation,
            "node_id": str(self.peer_id) if self.peer_id else None,
            "ok": self.ok,
            "counts": self.counts(),
            "results": [
                {
                    "name": r.name,
                    "section": r.section,
                    "summary": r.summary,
                    "status": r.status.value,
                    "detail": r.detail,
                    "seconds": round(r.seconds, 3),
                }
                for r in self.results
            ],
        }


# -- the probe: a flexible initiator --------------------------------------------------------


class _Violation(Exception):
    """The node broke the spec in a way that ends the check; the message says how."""


class _Hangup(Exception):
    """The node closed (or reset) the connection."""


class _Wire:
    """Buffered exact reads and writes on a stream; a closed or reset connection is _Hangup."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Hangup(f"connection lost while sending: {exc!r}") from None

    async def read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _Hangup(f"connection reset: {exc!r}") from None
            if not data:
                raise _Hangup("connection closed")
            self._buffer += data
        out = bytes(self._buffer[:count])
        del self._buffer[:count]
        return out

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@dataclass
class _Opened:
    """What a completed handshake showed about the node."""

    payload: HandshakePayload
    signature_ok: bool
    welcome: Welcome
    message_2_size: int

    @property
    def peer_id(self) -> NodeId:
        return NodeId.from_public_key(self.payload.identity_key)


class _Probe:
    """One connection to the node as an initiator that can be told to break one rule."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        identity: NodeIdentity,
        federation_id: bytes,
        psk: bytes,
        randbytes: Callable[[int], bytes],
    ) -> None:
        self.wire = _Wire(stream)
        self.identity = identity
        static, _ = generate_keypair("25519", randbytes)
        self._handshake = HandshakeState(
            NOISE_PROTOCOL_NAME,
            initiator=True,
            prologue=prologue(federation_id),
            s=static,
            psks=[psk],
            randbytes=randbytes,
        )
        self._transport: NoiseTransport | None = None
        self._frames = bytearray()
        self._limits = DecodeLimits(max_bytes=KIT_MAX_MESSAGE_SIZE)

    # handshake --------------------------------------------------------------------------

    async def send_handshake_1(self) -> None:
        message = self._handshake.write_message(b"")
        await self.wire.send(len(message).to_bytes(2, "big") + message)

    async def read_handshake_2(self) -> tuple[HandshakePayload, bool, int]:
        """Message 2: the node's payload, whether its signature verifies, the wire size."""
        length = int.from_bytes(await self.wire.read_exactly(2), "big")
        if length == 0 or length > MAX_HANDSHAKE_MESSAGE:
            raise _Violation(
                f"handshake message 2 announces {length} bytes; spec/transport.md §2 allows 1 "
                f"to {MAX_HANDSHAKE_MESSAGE}"
            )
        body = await self.wire.read_exactly(length)
        try:
            raw = self._handshake.read_message(body)
        except NoiseError as exc:
            raise _Violation(
                f"handshake message 2 fails Noise processing ({exc}): not "
                f"{NOISE_PROTOCOL_NAME} with this federation's prologue?"
            ) from None
        try:
            payload = HandshakePayload.decode(raw, DecodeLimits(max_bytes=MAX_HANDSHAKE_MESSAGE))
        except DecodeError as exc:
            raise _Violation(
                f"the payload of handshake message 2 is not a valid handshake-payload "
                f"(spec/transport.md §3, spec/encoding.md): {exc}"
            ) from None
        static = self._handshake.remote_static
        assert static is not None
        ok = verify_signature(
            payload.identity_key, payload.signature, static_key_signature_input(static)
        )
        return payload, ok, length

    async def send_handshake_3(
        self, *, versions: Sequence[int] = (1,), forge_signature: bool = False
    ) -> None:
        static = self._handshake.local_static_public
        assert static is not None
        signed = static_key_signature_input(static)
        if forge_signature:  # a valid signature, but over a different static key
            signed = static_key_signature_input(bytes(b ^ 0xFF for b in static))
        payload = HandshakePayload(
            identity_key=self.identity.public_key,
            signature=self.identity.sign(signed),
            versions=list(versions),
            max_message_size=KIT_MAX_MESSAGE_SIZE,
        ).encode()
        message = self._handshake.write_message(payload)
        await self.wire.send(len(message).to_bytes(2, "big") + message)
        self._transport = self._handshake.transport()

    async def handshake(
        self, *, versions: Sequence[int] = (1,), forge_signature: bool = False
    ) -> tuple[HandshakePayload, bool, int]:
        """Messages 1 to 3 (the Welcome, or the node's refusal, is still to be read)."""
        await self.send_handshake_1()
        payload, ok, size = await self.read_handshake_2()
        await self.send_handshake_3(versions=versions, forge_signature=forge_signature)
        return payload, ok, size

    async def open(self, *, versions: Sequence[int] = (1,)) -> _Opened:
        """A complete, correct handshake up to and including the node's Welcome."""
        payload, ok, size = await self.handshake(versions=versions)
        first = await self.receive()
        if isinstance(first, Close):
            raise _Violation(
                f"the node refused a correct handshake with Close {_code_name(first.code)}: "
                f"{first.reason!r}"
            )
        if not isinstance(first, Welcome):
            raise _Violation(
                f"the node's first transport message is {type(first).__name__}, not Welcome "
                "(spec/transport.md §4)"
            )
        return _Opened(payload, ok, first, size)

    # transport --------------------------------------------------------------------------

    async def send_plaintext(self, plaintext: bytes) -> None:
        """Frame-stream bytes as they come, cut into Noise transport messages."""
        assert self._transport is not None
        out = bytearray()
        for start in range(0, len(plaintext), MAX_TRANSPORT_PLAINTEXT):
            ciphertext = self._transport.encrypt(plaintext[start : start + MAX_TRANSPORT_PLAINTEXT])
            out += len(ciphertext).to_bytes(2, "big") + ciphertext
        await self.wire.send(bytes(out))

    async def send_frame(self, body: bytes) -> None:
        await self.send_plaintext(len(body).to_bytes(FRAME_HEADER, "big") + body)

    async def send_message(self, message: Message) -> None:
        await self.send_frame(encode_message(message))

    async def send_noise_raw(self, noise_message: bytes) -> None:
        """A Noise message as given (e.g. a forged ciphertext), behind its length prefix."""
        await self.wire.send(len(noise_message).to_bytes(2, "big") + noise_message)

    async def receive(self) -> Message:
        """The node's next message (Keepalive and Close included); _Hangup at the end."""
        assert self._transport is not None
        while True:
            if len(self._frames) >= FRAME_HEADER:
                length = int.from_bytes(self._frames[:FRAME_HEADER], "big")
                if length == 0 or length > KIT_MAX_MESSAGE_SIZE:
                    raise _Violation(
                        f"the node sent a frame of {length} bytes; the kit announced a "
                        f"max_message_size of {KIT_MAX_MESSAGE_SIZE} and frames are never "
                        "empty (spec/transport.md §5)"
                    )
                if len(self._frames) >= FRAME_HEADER + length:
                    body = bytes(self._frames[FRAME_HEADER : FRAME_HEADER + length])
                    del self._frames[: FRAME_HEADER + length]
                    try:
                        return decode_message(body, self._limits)
                    except DecodeError as exc:
                        raise _Violation(
                            f"the node sent a message the kit cannot accept: {exc} "
                            f"(bytes {body[:32].hex()}...)"
                        ) from None
            length = int.from_bytes(await self.wire.read_exactly(2), "big")
            if length == 0:
                raise _Violation("the node sent an empty Noise message (spec/transport.md §1)")
            ciphertext = await self.wire.read_exactly(length)
            try:
                plaintext = self._transport.decrypt(ciphertext)
            except NoiseError as exc:
                raise _Violation(
                    f"a transport message from the node fails to decrypt: {exc}"
                ) from None
            if not plaintext:
                raise _Violation(
                    "the node sent a transport message with no plaintext (spec/transport.md §5)"
                )
            self._frames += plaintext


# -- checks ---------------------------------------------------------------------------------


@dataclass
class _Context:
    host: str
    port: int
    federation: Federation
    options: ConformanceOptions
    identity: NodeIdentity
    randbytes: Callable[[int], bytes]
    network: Callable[[], Network] | None = None
    """Makes the network of the kit's probes (once) and of each reference peer; None:
    real TCP."""
    probes: Network | None = None
    peer: _Opened | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    """Outcomes one expensive scenario computes for several checks (e.g. a timeout and
    the exclusion that follows it)."""

    async def connect(self) -> trio.abc.Stream:
        with trio.fail_after(self.options.timeout):
            if self.network is None:
                return await trio.open_tcp_stream(self.host, self.port)
            if self.probes is None:
                self.probes = self.network()
            return await self.probes.connect(self.host, self.port)

    async def probe(
        self,
        *,
        federation_id: bytes | None = None,
        psk: bytes | None = None,
        identity: NodeIdentity | None = None,
    ) -> _Probe:
        return _Probe(
            await self.connect(),
            identity=self.identity if identity is None else identity,
            federation_id=self.federation.federation_id if federation_id is None else federation_id,
            psk=self.federation.secret if psk is None else psk,
            randbytes=self.randbytes,
        )

    async def opened_probe(
        self, *, identity: NodeIdentity | None = None, versions: Sequence[int] = (1,)
    ) -> tuple[_Probe, _Opened]:
        """A probe past a correct handshake and the Welcome, having sent its NodeAnnounce."""
        probe = await self.probe(identity=identity)
        try:
            with trio.fail_after(self.options.timeout):
                opened = await probe.open(versions=versions)
                await probe.send_message(NodeAnnounce(listen_port=0))
        except BaseException:
            await probe.wire.aclose()
            raise
        return probe, opened


Outcome = tuple[Status, str]
CheckFunction = Callable[[_Context], Awaitable[Outcome]]


@dataclass(frozen=True)
class Check:
    """One conformance check: ``name`` (for ``--check``), its spec section and summary."""

    name: str
    section: str
    summary: str
    function: CheckFunction
    needs_handshake: bool = True


CHECKS: list[Check] = []
"""Every check, in the order they run."""


def _check(
    name: str, section: str, summary: str, *, needs_handshake: bool = True
) -> Callable[[CheckFunction], CheckFunction]:
    assert section in SECTIONS, section

    def register(function: CheckFunction) -> CheckFunction:
        CHECKS.append(Check(name, section, summary, function, needs_handshake))
        return function

    return register


def _code_name(code: int) -> str:
    try:
        return f"{CloseCode(code).name} ({code})"
    except ValueError:
        return f"code {code} (unknown)"


async def _still_serving(ctx: _Context) -> str | None:
    """None if a fresh handshake completes, else why not (spec/transport.md §7)."""
    try:
        probe, _ = await ctx.opened_probe()
    except (_Violation, _Hangup, trio.TooSlowError, OSError) as exc:
        what = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc) or repr(exc)
        return (
            f"afterwards a fresh handshake failed ({what}): a node MUST keep serving other "
            "connections after dropping one (spec/transport.md §7)"
        )
    await probe.wire.aclose()
    return None


async def _await_refusal(
    probe: _Probe, timeout: float, answered: type[Message] | None
) -> tuple[str, Any]:
    """Read until the node closes: ("close", Close) | ("hangup", text) | ("open", None) |
    ("answered", message) when a message of type ``answered`` arrives first."""
    with trio.move_on_after(timeout):
        try:
            while True:
                message = await probe.receive()
                if isinstance(message, Close):
                    return "close", message
                if answered is not None and isinstance(message, answered):
                    return "answered", message
        except _Hangup as exc:
            return "hangup", str(exc)
    return "open", None


async def _provoke(
    ctx: _Context,
    action: Callable[[_Probe], Awaitable[None]],
    what: str,
    expected: CloseCode,
) -> Outcome:
    """Open a channel, do ``action``, and judge the node's reaction against ``expected``.

    After the action the kit sends a ModelRequest: a node that answers it with a ModelState
    has evidently gone on processing instead of closing the channel.
    """
    probe, _ = await ctx.opened_probe()
    try:
        try:
            await action(probe)
            await probe.send_message(ModelRequest())
        except _Hangup:
            pass  # the node may hang up while we are still sending; read what it said
        kind, value = await _await_refusal(probe, ctx.options.timeout, ModelState)
    finally:
        await probe.wire.aclose()
    wanted = _code_name(expected)
    status, detail = Status.FAIL, ""
    if kind == "close" and value.code == expected:
        status, detail = Status.PASS, f"Close {wanted}: {value.reason!r}"
    elif kind == "close":
        got = _code_name(value.code)
        detail = f"expected Close {wanted} after {what}, got Close {got}: {value.reason!r}"
    elif kind == "hangup":
        status = Status.WARN
        detail = (
            f"the node hung up after {what} without a Close message ({value}); "
            f"spec/transport.md §7: it SHOULD send Close {wanted} first"
        )
    elif kind == "answered":
        detail = (
            f"the node answered a ModelRequest sent after {what}: it accepted the input "
            f"instead of closing the channel with {wanted}"
        )
    else:
        detail = (
            f"the node neither sent a Close nor closed the connection within "
            f"{ctx.options.timeout:g}s after {what}; expected Close {wanted}"
        )
    if status is not Status.FAIL:
        problem = await _still_serving(ctx)
        if problem is not None:
            return Status.FAIL, f"{detail}; but {problem}"
    return status, detail


async def _expect_hangup(ctx: _Context, probe: _Probe, what: str) -> Outcome:
    """The node must close the connection without sending anything more."""
    try:
        with trio.move_on_after(ctx.options.timeout):
            try:
                data = await probe.wire.read_exactly(1)
            except _Hangup as exc:
                problem = await _still_serving(ctx)
                if problem is not None:
                    return Status.FAIL, f"refused ({exc}); but {problem}"
                return Status.PASS, f"the node closed the connection ({exc})"
            return Status.FAIL, (
                f"the node answered {what} (first byte {data.hex()}) instead of closing the "
                "connection"
            )
        return Status.FAIL, (
            f"the node neither answered nor closed the connection within "
            f"{ctx.options.timeout:g}s after {what}; it MUST close it (spec/transport.md §7)"
        )
    finally:
        await probe.wire.aclose()


# transport.md §1 --------------------------------------------------------------------------


@_check(
    "handshake",
    "transport.md §1",
    "handshake completes with the federation secret",
    needs_handshake=False,
)
async def check_handshake(ctx: _Context) -> Outcome:
    probe, opened = await ctx.opened_probe()
    await probe.wire.aclose()
    ctx.peer = opened
    return Status.PASS, f"node id {opened.peer_id}"


@_check("wrong-psk", "transport.md §1", "a handshake with a wrong federation secret is refused")
async def check_wrong_psk(ctx: _Context) -> Outcome:
    wrong = bytes(b ^ 0x5A for b in ctx.federation.secret)
    probe = await ctx.probe(psk=wrong)
    with trio.fail_after(ctx.options.timeout):
        await probe.handshake()
    return await _expect_hangup(ctx, probe, "handshake message 3 made with a wrong secret")


@_check(
    "wrong-federation",
    "transport.md §1",
    "a handshake for another federation id (prologue) is refused at message 1",
)
async def check_wrong_federation(ctx: _Context) -> Outcome:
    other = bytes(b ^ 0xA5 for b in ctx.federation.federation_id)
    probe = await ctx.probe(federation_id=other)
    await probe.send_handshake_1()
    return await _expect_hangup(
        ctx, probe, "handshake message 1 with another federation's prologue"
    )


# transport.md §2 --------------------------------------------------------------------------


@_check(
    "handshake-size-limit",
    "transport.md §2",
    f"a handshake message announced over {MAX_HANDSHAKE_MESSAGE} bytes is refused",
)
async def check_handshake_size(ctx: _Context) -> Outcome:
    probe = await ctx.probe()
    # only the length prefix: the node must refuse before reading (or waiting for) the body
    await probe.wire.send((MAX_HANDSHAKE_MESSAGE + 1).to_bytes(2, "big"))
    return await _expect_hangup(
        ctx, probe, f"a handshake length prefix of {MAX_HANDSHAKE_MESSAGE + 1} bytes"
    )


# transport.md §3 --------------------------------------------------------------------------


@_check("identity-binding", "transport.md §3", "the node's handshake payload and signature verify")
async def check_identity_binding(ctx: _Context) -> Outcome:
    probe, opened = await ctx.opened_probe()
    await probe.wire.aclose()
    payload = opened.payload
    if not opened.signature_ok:
        return Status.FAIL, (
            "the Ed25519 signature in handshake message 2 does not verify over "
            '"p2pfed-noise-static-key:v1" || 0x00 || the Noise static key the node used'
        )
    if 1 not in payload.versions:
        return Status.FAIL, f"the node's versions {list(payload.versions)} do not include 1"
    return Status.PASS, (
        f"identity key {payload.identity_key.hex()[:16]}..., versions {list(payload.versions)}, "
        f"max_message_size {payload.max_message_size}, message 2 of {opened.message_2_size} bytes"
    )


@_check(
    "forged-signature",
    "transport.md §3",
    "an initiator whose identity signature does not verify is refused",
)
async def check_forged_signature(ctx: _Context) -> Outcome:
    probe = await ctx.probe()
    try:
        with trio.fail_after(ctx.options.timeout):
            await probe.handshake(forge_signature=True)
        kind, value = await _await_refusal(probe, ctx.options.timeout, Welcome)
    finally:
        await probe.wire.aclose()
    if kind == "answered":
        return Status.FAIL, "the node sent a Welcome to a peer whose identity signature is forged"
    if kind == "open":
        return Status.FAIL, (
            f"the node neither refused nor closed within {ctx.options.timeout:g}s after a "
            "forged identity signature in handshake message 3"
        )
    if kind == "close" and value.code != CloseCode.AUTHENTICATION_FAILED:
        return Status.FAIL, (
            f"expected AUTHENTICATION_FAILED (5) or a plain hang-up, got Close "
            f"{_code_name(value.code)}: {value.reason!r}"
        )
    problem = await _still_serving(ctx)
    if problem is not None:
        return Status.FAIL, f"refused; but {problem}"
    how = "Close AUTHENTICATION_FAILED (5)" if kind == "close" else "the connection closed"
    return Status.PASS, f"refused: {how}"


# transport.md §4 --------------------------------------------------------------------------


@_check("welcome", "transport.md §4", "the Welcome carries version 1 and the announced size limit")
async def check_welcome(ctx: _Context) -> Outcome:
    probe, opened = await ctx.opened_probe()
    await probe.wire.aclose()
    welcome = opened.welcome
    if welcome.version != 1:
        return Status.FAIL, f"Welcome chose version {welcome.version}; the kit offered only [1]"
    if welcome.max_message_size != opened.payload.max_message_size:
        return Status.FAIL, (
            f"Welcome max_message_size {welcome.max_message_size} differs from the handshake "
            f"payload's {opened.payload.max_message_size} (they MUST be equal)"
        )
    return Status.PASS, f"version 1, max_message_size {welcome.max_message_size}"


@_check(
    "no-common-version",
    "transport.md §4",
    "an initiator without a common version gets Close UNSUPPORTED_VERSION",
)
async def check_no_common_version(ctx: _Context) -> Outcome:
    assert ctx.peer is not None
    unknown = max(ctx.peer.payload.versions) + 1
    probe = await ctx.probe()
    try:
        with trio.fail_after(ctx.options.timeout):
            await probe.handshake(versions=[unknown])
        kind, value = await _await_refusal(probe, ctx.options.timeout, Welcome)
    finally:
        await probe.wire.aclose()
    if kind == "close" and value.code == CloseCode.UNSUPPORTED_VERSION:
        return Status.PASS, f"Close UNSUPPORTED_VERSION (4): {value.reason!r}"
    if kind == "answered":
        return (
            Status.FAIL,
            f"the node sent a Welcome (version {value.version}) to an initiator "
            f"that offered only [{unknown}]",
        )
    if kind == "close":
        return Status.FAIL, f"expected Close UNSUPPORTED_VERSION (4), got {_code_name(value.code)}"
    if kind == "hangup":
        return Status.WARN, (
            "the node hung up without a Close; spec/transport.md §4: it sends Close "
            "UNSUPPORTED_VERSION (4)"
        )
    return Status.FAIL, f"no answer within {ctx.options.timeout:g}s to versions [{unknown}]"


# transport.md §5 --------------------------------------------------------------------------


@_check(
    "frame-size-limit",
    "transport.md §5",
    "a frame over the node's max_message_size gets Close MESSAGE_TOO_LARGE",
)
async def check_frame_size(ctx: _Context) -> Outcome:
    assert ctx.peer is not None
    limit = ctx.peer.welcome.max_message_size
    if limit >= 0xFFFF_FFFF:
        return Status.SKIP, "the node accepts 2^32 - 1 bytes: no frame length can exceed it"

    async def oversized(probe: _Probe) -> None:
        # the header alone: the node must refuse it before any body byte arrives
        await probe.send_plaintext((limit + 1).to_bytes(FRAME_HEADER, "big"))

    return await _provoke(
        ctx, oversized, f"a frame header announcing {limit + 1} bytes", CloseCode.MESSAGE_TOO_LARGE
    )


# transport.md §6 --------------------------------------------------------------------------


@_check(
    "keepalive",
    "transport.md §6",
    "an idle channel stays open (or the node sends Keepalive)",
)
async def check_keepalive(ctx: _Context) -> Outcome:
    probe, _ = await ctx.opened_probe()
    started = trio.current_time()
    keepalives = 0
    try:
        with trio.move_on_after(ctx.options.idle):
            try:
                while True:
                    message = await probe.receive()
                    if isinstance(message, Keepalive):
                        keepalives += 1
                    elif isinstance(message, Close):
                        elapsed = trio.current_time() - started
                        return Status.FAIL, (
                            f"the node closed an idle channel after {elapsed:.1f}s with Close "
                            f"{_code_name(message.code)}: {message.reason!r} (the idle timeout "
                            "defaults to 60s)"
                        )
            except _Hangup as exc:
                elapsed = trio.current_time() - started
                return Status.FAIL, f"the node dropped an idle channel after {elapsed:.1f}s ({exc})"
    finally:
        await probe.wire.aclose()
    if keepalives:
        return Status.PASS, f"open for {ctx.options.idle:g}s, {keepalives} Keepalive(s) received"
    return Status.PASS, (
        f"open for {ctx.options.idle:g}s while idle (no Keepalive within that time; the "
        "keepalive-sent check judges them)"
    )


@_check(
    "keepalive-sent",
    "transport.md §6",
    "the node sends Keepalive on a quiet channel within its keepalive interval",
)
async def check_keepalive_sent(ctx: _Context) -> Outcome:
    interval = ctx.options.keepalive_interval
    if interval is None:
        return Status.SKIP, (
            "the node's keepalive interval is unknown: pass --keepalive-interval S (the "
            "spec's is 1) to check it"
        )
    probe, _ = await ctx.opened_probe()
    started = trio.current_time()
    try:
        # after its NodeAnnounce (and GroupPosition) the node has nothing to say: a
        # Keepalive is due one interval after its last message
        with trio.move_on_after(interval + ctx.options.timeout):
            while True:
                message = await probe.receive()
                if isinstance(message, Keepalive):
                    elapsed = trio.current_time() - started
                    return Status.PASS, f"Keepalive after {elapsed:.1f}s (interval {interval:g}s)"
                if isinstance(message, Close):
                    return Status.FAIL, (
                        f"the node closed a quiet channel with Close {_code_name(message.code)}: "
                        f"{message.reason!r}"
                    )
    except _Hangup as exc:
        return Status.FAIL, f"the node dropped a quiet channel ({exc})"
    finally:
        await probe.wire.aclose()
    return Status.FAIL, (
        f"no Keepalive within {interval + ctx.options.timeout:g}s on a channel where the node "
        f"sent nothing else, with a keepalive interval of {interval:g}s (spec/transport.md §6)"
    )


# transport.md §7 --------------------------------------------------------------------------


@_check(
    "forged-transport-message",
    "transport.md §7",
    "a transport message that fails authentication gets Close PROTOCOL_ERROR",
)
async def check_forged_transport(ctx: _Context) -> Outcome:
    async def forged(probe: _Probe) -> None:
        await probe.send_noise_raw(ctx.randbytes(48))

    return await _provoke(
        ctx, forged, "a transport message with a forged tag", CloseCode.PROTOCOL_ERROR
    )


# encoding.md ------------------------------------------------------------------------------

# Frame bodies that break one rule of spec/encoding.md each; the comment gives the rule.
_MALFORMED: list[tuple[str, str, str]] = [
    ("invalid-cbor", "a2001101", "truncated: a map of 2 pairs whose second value is missing"),
    ("trailing-bytes", "a100181a00", "a ModelRequest followed by a trailing byte"),
    ("indefinite-length", "bf00181aff", "an indefinite-length map (ModelRequest)"),
    ("unsorted-keys", "a201080011", "PeerExchangeRequest with map keys out of order (1 before 0)"),
    ("non-shortest-int", "a20011011808", "PeerExchangeRequest with max_peers 8 as 18 08"),
    ("unknown-type", "a1001863", "a message of unassigned type 99"),
    ("unknown-key", "a200181a0500", "a ModelRequest with an extra key 5"),
    ("missing-field", "a10011", "a PeerExchangeRequest without max_peers"),
    ("wrong-field-type", "a20011016138", 'PeerExchangeRequest with max_peers "8" (a text)'),
]


def _malformed_check(name: str, body_hex: str, description: str) -> None:
    body = bytes.fromhex(body_hex)

    async def check(ctx: _Context) -> Outcome:
        async def send(probe: _Probe) -> None:
            await probe.send_frame(body)

        what = f"{description} (frame body {body_hex})"
        return await _provoke(ctx, send, what, CloseCode.MALFORMED_MESSAGE)

    check.__name__ = f"check_{name.replace('-', '_')}"
    _check(name, "encoding.md", f"{description}: Close MALFORMED_MESSAGE")(check)


for _name, _hex, _description in _MALFORMED:
    _malformed_check(_name, _hex, _description)


# discovery.md §4 --------------------------------------------------------------------------


async def _next_of(probe: _Probe, kind: type[Message], timeout: float) -> Message | None:
    """The node's next message of type ``kind`` or its Close, skipping anything else
    (NodeAnnounce, GroupPosition, Keepalive); None if neither arrives in time."""
    with trio.move_on_after(timeout):
        while True:
            message = await probe.receive()
            if isinstance(message, kind | Close):
                return message
    return None


async def _peer_list(ctx: _Context, probe: _Probe, what: str) -> PeerList:
    """Ask on ``probe`` and return the PeerList; _Violation for anything else."""
    await probe.send_message(PeerExchangeRequest(max_peers=1))
    answer = await _next_of(probe, PeerList, ctx.options.timeout)
    if isinstance(answer, Close):
        raise _Violation(
            f"the node closed the channel after {what} with Close {_code_name(answer.code)}: "
            f"{answer.reason!r}; it MUST answer an accepted request with a PeerList "
            "(spec/discovery.md 4.3)"
        )
    if not isinstance(answer, PeerList):
        raise _Violation(
            f"no PeerList within {ctx.options.timeout:g}s after {what} (spec/discovery.md 4.3: "
            "every accepted request gets exactly one PeerList)"
        )
    return answer


@_check("pex-answer", "discovery.md §4", "a PeerExchangeRequest is answered with a PeerList")
async def check_pex_answer(ctx: _Context) -> Outcome:
    probe, _ = await ctx.opened_probe()
    try:
        answer = await _peer_list(ctx, probe, "a PeerExchangeRequest for 1 peer")
    finally:
        await probe.wire.aclose()
    if len(answer.peers) > 1:
        return Status.FAIL, f"the PeerList has {len(answer.peers)} entries; the kit asked for 1"
    if any(p.node_id == ctx.identity.node_id.raw for p in answer.peers):
        return Status.FAIL, "the PeerList names the requester itself (spec/discovery.md 4.3)"
    return Status.PASS, f"PeerList of {len(answer.peers)} entr{'y' if answer.peers else 'ies'}"


@_check(
    "pex-rate-limit",
    "discovery.md §4",
    "a second PeerExchangeRequest on one channel within 30 s gets Close PROTOCOL_ERROR",
)
async def check_pex_rate_limit(ctx: _Context) -> Outcome:
    async def twice(probe: _Probe) -> None:
        await _peer_list(ctx, probe, "the first PeerExchangeRequest")
        await probe.send_message(PeerExchangeRequest(max_peers=1))

    return await _provoke(
        ctx,
        twice,
        "a second PeerExchangeRequest on the channel right after the first was answered",
        CloseCode.PROTOCOL_ERROR,
    )


@_check(
    "pex-per-channel",
    "discovery.md §4",
    "the request limit counts per channel: a second channel of the same peer may ask at once",
)
async def check_pex_per_channel(ctx: _Context) -> Outcome:
    first, _ = await ctx.opened_probe()
    try:
        await _peer_list(ctx, first, "a PeerExchangeRequest on the first channel")
        # a second channel of the same identity while the first stays open: a duplicate,
        # which the node MUST keep (spec/discovery.md section 5) and count on its own
        second, _ = await ctx.opened_probe()
        try:
            await second.send_message(PeerExchangeRequest(max_peers=1))
            answer = await _next_of(second, PeerList, ctx.options.timeout)
        except _Hangup as exc:
            return Status.FAIL, f"the node dropped a second channel of the same peer ({exc})"
        finally:
            await second.wire.aclose()
    finally:
        await first.wire.aclose()
    if isinstance(answer, PeerList):
        return Status.PASS, "answered on a second channel of the same identity at once"
    if isinstance(answer, Close) and answer.code == CloseCode.NORMAL:
        return Status.FAIL, (
            f"the node closed a second channel of the same peer with Close NORMAL: "
            f"{answer.reason!r}; a node MUST NOT close a channel only because it is a "
            "duplicate (spec/discovery.md section 5)"
        )
    if isinstance(answer, Close):
        return Status.FAIL, (
            f"a request on a second channel, right after one on the first channel of the same "
            f"identity, got Close {_code_name(answer.code)}: {answer.reason!r}; the 30 s "
            "limit is per channel, never per peer (spec/discovery.md 4.3)"
        )
    return Status.FAIL, (
        f"no PeerList within {ctx.options.timeout:g}s on a second channel of the same identity"
    )


# discovery.md §4.5 ------------------------------------------------------------------------


@_check("node-announce", "discovery.md §4.5", "NodeAnnounce is the node's first node message")
async def check_node_announce(ctx: _Context) -> Outcome:
    probe, _ = await ctx.opened_probe()
    try:
        with trio.move_on_after(ctx.options.timeout):
            while True:
                message = await probe.receive()
                if isinstance(message, Keepalive):
                    continue
                if isinstance(message, NodeAnnounce):
                    return Status.PASS, f"NodeAnnounce listen_port {message.listen_port}"
                return Status.FAIL, (
                    f"the node's first node message is {type(message).__name__}; a node MUST "
                    "send NodeAnnounce first"
                )
    except _Hangup as exc:
        return Status.FAIL, f"the node hung up before sending NodeAnnounce ({exc})"
    finally:
        await probe.wire.aclose()
    return Status.FAIL, f"no NodeAnnounce within {ctx.options.timeout:g}s of the Welcome"


# group.md ---------------------------------------------------------------------------------


@_check(
    "secure-group",
    "group.md",
    "a secure group of the node and reference peers completes",
)
async def check_secure_group(ctx: _Context) -> Outcome:
    # the node (torch) is imported only here: every other check is pure protocol
    from p2pfed.config import NodeConfig
    from p2pfed.group import GroupAborted, GroupCompleted
    from p2pfed.model_vector import model_fingerprint
    from p2pfed.network import TcpNetwork
    from p2pfed.node import Node, NodeOptions
    from p2pfed.task import load_task

    assert ctx.peer is not None
    target = ctx.peer.peer_id
    count = ctx.federation.params.group_min - 1
    task = load_task(ctx.options.task)
    fingerprint = model_fingerprint(task.build_model(dict(ctx.options.task_settings)), task.name)
    theirs = await _model_fingerprint_of(ctx)
    if theirs is not None and theirs != fingerprint:
        return Status.FAIL, (
            f"the node's model fingerprint (in its ModelState) is {theirs.hex()[:16]}..., the "
            f"reference task {task.name} has {fingerprint.hex()[:16]}...: no group can form. "
            "Pass --task with the node's model (and --set for its settings)"
        )
    host = f"[{ctx.host}]" if ":" in ctx.host else ctx.host
    done = trio.Event()
    completed: list[GroupCompleted] = []
    aborted: list[str] = []

    def on_group(outcome: GroupCompleted | GroupAborted, seconds: float) -> None:
        if isinstance(outcome, GroupAborted):
            aborted.append(outcome.reason)
        elif target in outcome.members:
            completed.append(outcome)
            done.set()

    nodes: list[Node] = []
    with tempfile.TemporaryDirectory(prefix="p2pfed-conformance-") as tmp:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                node_dir = Path(tmp) / f"reference{index}"
                node_dir.mkdir()
                settings = {"node_index": index, "num_nodes": count, **ctx.options.task_settings}
                node = Node(
                    identity=NodeIdentity.generate(ctx.randbytes),
                    federation=ctx.federation,
                    config=NodeConfig(
                        listen_host=ctx.options.listen_host,
                        listen_port=0,
                        mdns=False,
                        bootstrap=(f"{host}:{ctx.port}",),
                    ),
                    node_dir=node_dir,
                    network=TcpNetwork(mdns=False) if ctx.network is None else ctx.network(),
                    task=task,
                    # on a virtual network (simnet, MockClock) worker threads would let the
                    # virtual clock jump while they run: every wait then times out at once
                    options=NodeOptions(
                        training=False,
                        task_config=settings,
                        sync_timeout=0.5,
                        threads=ctx.network is None,
                    ),
                    randbytes=ctx.randbytes,
                    on_group=on_group,
                )
                await nursery.start(node.run)
                nodes.append(node)
            started = trio.current_time()
            with trio.move_on_after(ctx.options.group_timeout):
                await done.wait()
            elapsed = trio.current_time() - started
            for node in nodes:
                node.request_stop()
            with trio.move_on_after(ctx.options.timeout):
                for node in nodes:
                    await node.finished.wait()
            nursery.cancel_scope.cancel()
    if completed:
        group = completed[0]
        return Status.PASS, (
            f"group of {len(group.members)} completed in {elapsed:.1f}s with the node and "
            f"{count} reference peer(s) (task {task.name}; {len(aborted)} aborted attempt(s))"
        )
    hint = "; last abort: " + aborted[-1] if aborted else ""
    return Status.FAIL, (
        f"no group including the node completed within {ctx.options.group_timeout:g}s "
        f"({len(aborted)} aborted{hint}). The reference peers run task {task.name} "
        f"(fingerprint {fingerprint.hex()[:16]}...): pass --task if the node runs another model"
    )


async def _model_fingerprint_of(ctx: _Context) -> bytes | None:
    """The fingerprint in the node's answer to a ModelRequest (None: no answer in time)."""
    probe, _ = await ctx.opened_probe()
    try:
        await probe.send_message(ModelRequest())
        with trio.move_on_after(ctx.options.timeout):
            while True:
                message = await probe.receive()
                if isinstance(message, ModelState):
                    return message.fingerprint
                if isinstance(message, Close):
                    return None
    except _Hangup:
        return None
    finally:
        await probe.wire.aclose()
    return None


# group.md §3, §5, §6: the kit's own members ------------------------------------------------
#
# These checks make the node the initiator of a group whose other members are the kit's
# identities, each on a channel of protocol version 1 (so a node of an exact-rounds
# federation counts none of them and groups by the random rules, spec/group.md "Exact
# rounds", Degradation). The kit answers at the message level only: it accepts with real
# signed mask keys but never sends a Shard, which is all that formation, abort and timeout
# rules need. They assume the node has no other peers (it chooses its invitees among all).

_KIT_PRIORITY = 2**64 - 1  # the kit's own invites outrank any group the node forms


class _Member:
    """One kit identity on its own channel; a background task collects what the node sends."""

    def __init__(self, probe: _Probe, identity: NodeIdentity, fingerprint: bytes) -> None:
        self.probe = probe
        self.identity = identity
        self.fingerprint = fingerprint
        self.version = 1
        self.inbox: list[Message] = []
        self._sending = trio.Lock()
        self.ended: str | None = None
        self._arrived = trio.Event()

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    async def pump(self) -> None:
        try:
            while True:
                message = await self.probe.receive()
                if isinstance(message, ModelRequest):
                    # a fresh node asks its peers for their aggregate before its first
                    # round and waits for every answer: the kit has none (spec/group.md §7)
                    state = ModelState(round=0, fingerprint=self.fingerprint, parameters=b"")
                    await self.send(state)
                    continue
                self.inbox.append(message)
                self._arrived.set()
                self._arrived = trio.Event()
        except (_Hangup, _Violation) as exc:
            self.ended = str(exc) or type(exc).__name__
            self._arrived.set()

    async def next(
        self, kind: type[Message], timeout: float, where: Callable[[Any], bool] | None = None
    ) -> Any:
        """Take the first message of ``kind`` (matching ``where``) that arrived or arrives
        within ``timeout``; None if none does (or the channel ended)."""
        with trio.move_on_after(timeout):
            while True:
                arrived = self._arrived
                for index, message in enumerate(self.inbox):
                    if isinstance(message, kind) and (where is None or where(message)):
                        del self.inbox[index]
                        return message
                if self.ended is not None:
                    return None
                await arrived.wait()
        return None

    async def keep_alive(self) -> None:
        """Keepalives well within the spec's 1 s: a peer silent for 3 s is unresponsive,
        and a node never invites one (spec/transport.md §6)."""
        with contextlib.suppress(_Violation):
            while self.ended is None:
                await trio.sleep(0.5)
                await self.send(Keepalive())

    async def send(self, message: Message) -> None:
        try:
            async with self._sending:
                await self.probe.send_message(message)
        except _Hangup as exc:
            raise _Violation(
                f"the node dropped the channel of kit member {self.node_id.short}: {exc}"
            ) from None

    async def accept(self, invite: GroupInvite) -> None:
        mask_private = X25519PrivateKey.generate()
        mask_key = mask_private.public_key().public_bytes_raw()
        signature = self.identity.sign(mask_key_signature_input(invite.group_id, mask_key))
        await self.send(
            GroupReply(
                group_id=invite.group_id,
                accept=True,
                reason="",
                mask_key=mask_key,
                key_signature=signature,
                listen_port=0,
            )
        )

    async def decline(self, group_id: bytes) -> None:
        await self.send(
            GroupReply(
                group_id=group_id,
                accept=False,
                reason="conformance kit declines",
                mask_key=b"",
                key_signature=b"",
                listen_port=0,
            )
        )

    async def invite(self, like: GroupInvite) -> bytes:
        """Invite the node to a group of the kit (same round, fingerprint and size as the
        node's own invite ``like``); returns the group id."""
        group_id = secrets.token_bytes(16)
        await self.send(
            GroupInvite(
                group_id=group_id,
                priority=_KIT_PRIORITY,
                round=like.round,
                fingerprint=like.fingerprint,
                model_size=like.model_size,
            )
        )
        return group_id


@contextlib.asynccontextmanager
async def _kit_members(
    ctx: _Context, count: int, versions: Sequence[int] = (1,)
) -> AsyncIterator[list[_Member]]:
    """``count`` fresh kit identities, each on an open channel to the node offering
    ``versions`` (version 1 by default)."""
    members: list[_Member] = []
    fingerprint = await _node_fingerprint(ctx)
    async with trio.open_nursery() as nursery:
        try:
            for _ in range(count):
                identity = NodeIdentity.generate(ctx.randbytes)
                probe, opened = await ctx.opened_probe(identity=identity, versions=versions)
                member = _Member(probe, identity, fingerprint)
                member.version = opened.welcome.version
                members.append(member)
                nursery.start_soon(member.pump)
                nursery.start_soon(member.keep_alive)
            yield members
        finally:
            for member in members:
                await member.probe.wire.aclose()
            nursery.cancel_scope.cancel()


async def _node_fingerprint(ctx: _Context) -> bytes:
    """The node's model fingerprint (from its ModelState), for the kit's own ModelStates."""
    if "fingerprint" not in ctx.shared:
        ctx.shared["fingerprint"] = await _model_fingerprint_of(ctx) or bytes(32)
    fingerprint: bytes = ctx.shared["fingerprint"]
    return fingerprint


def _of_group(group_id: bytes) -> Callable[[Any], bool]:
    """A filter for :meth:`_Member.next`: messages of the group ``group_id``."""
    return lambda message: bool(message.group_id == group_id)


async def _invited(ctx: _Context, members: Sequence[_Member]) -> GroupInvite:
    """The node's next invite, sent to every member (older invites are declined)."""
    deadline = trio.current_time() + ctx.options.group_timeout
    while True:
        left = deadline - trio.current_time()
        invite = await members[0].next(GroupInvite, max(left, 0.0))
        if invite is None:
            raise _Violation(
                f"the node sent no GroupInvite within {ctx.options.group_timeout:g}s to "
                f"{len(members)} connected peers while it needs group_min - 1 = "
                f"{ctx.federation.params.group_min - 1} (spec/group.md §3, Initiating)"
            )
        others = [
            await m.next(GroupInvite, ctx.options.timeout, _of_group(invite.group_id))
            for m in members[1:]
        ]
        if all(other is not None for other in others):
            return invite
        # an invite to only some of the kit's members: a node with other peers, or an
        # earlier attempt; decline it and wait for the next
        for member in members:
            await member.decline(invite.group_id)


async def _started(ctx: _Context, members: Sequence[_Member], invite: GroupInvite) -> GroupStart:
    """Every member accepts ``invite``; the node's GroupStart (checked) to all of them."""
    for member in members:
        await member.accept(invite)
    starts = [
        await m.next(GroupStart, ctx.options.timeout, lambda s: s.group_id == invite.group_id)
        for m in members
    ]
    if any(start is None for start in starts):
        raise _Violation(
            f"the node did not send GroupStart to every member within {ctx.options.timeout:g}s "
            "after all its invitees accepted (spec/group.md §3, Starting)"
        )
    start: GroupStart = starts[0]
    assert ctx.peer is not None
    listed = [NodeId.from_public_key(m.identity_key) for m in start.members]
    wanted = sorted([ctx.peer.peer_id, *(m.node_id for m in members)], key=lambda n: n.raw)
    if listed != wanted:
        raise _Violation(
            f"GroupStart lists {[str(n) for n in listed]}; it must list every member, the "
            f"initiator included, sorted by node id: {[str(n) for n in wanted]} "
            "(spec/group.md §3, Starting)"
        )
    for info in start.members:
        if not verify_signature(
            info.identity_key,
            info.key_signature,
            mask_key_signature_input(start.group_id, info.mask_key),
        ):
            raise _Violation(
                f"the mask-key signature of member {info.identity_key.hex()[:16]}... in "
                "GroupStart does not verify (spec/group.md §3, Answering rule 5)"
            )
    if start.round != invite.round:
        raise _Violation(f"GroupStart round {start.round} differs from the invite's {invite.round}")
    return start


@_check(
    "group-initiated",
    "group.md §3",
    "the node initiates a group; on a decline it cancels with GroupAbort to acceptors only",
)
async def check_group_initiated(ctx: _Context) -> Outcome:
    async with _kit_members(ctx, 2) as (accepting, declining):
        invite = await _invited(ctx, [accepting, declining])
        theirs = await _model_fingerprint_of(ctx)
        if theirs is not None and theirs != invite.fingerprint:
            return Status.FAIL, (
                "the invite's fingerprint differs from the one in the node's ModelState "
                "(spec/group.md §1, Model fingerprint)"
            )
        await accepting.accept(invite)
        await declining.decline(invite.group_id)
        same = lambda m: m.group_id == invite.group_id  # noqa: E731
        abort = await accepting.next(GroupAbort, ctx.options.timeout, same)
        if abort is None:
            return Status.FAIL, (
                f"one invitee accepted and one declined; within {ctx.options.timeout:g}s the "
                "node sent no GroupAbort to the one that accepted (spec/group.md §3: an "
                "initiator that cancels sends GroupAbort to the invitees whose acceptance "
                "has arrived)"
            )
        start = await declining.next(GroupStart, 0.0, same)
        wrong = await declining.next(GroupAbort, ctx.options.timeout, same)
        if start is not None:
            return Status.FAIL, "the node sent GroupStart to an invitee that declined"
        if wrong is not None:
            return Status.FAIL, (
                "the node sent GroupAbort to an invitee that declined; spec/group.md §3: "
                "only invitees whose acceptance has arrived get one (a decline needs no answer)"
            )
    return Status.PASS, (
        f"invite of round {invite.round} (model size {invite.model_size}) to both kit "
        f"members; GroupAbort {abort.reason!r} to the one that accepted only"
    )


@_check(
    "group-start",
    "group.md §3",
    "GroupStart lists the sorted members; the node's shards have bits/8-byte words",
)
async def check_group_start(ctx: _Context) -> Outcome:
    bits = ctx.federation.params.fixed_point_bits
    async with _kit_members(ctx, 2) as members:
        invite = await _invited(ctx, members)
        start = await _started(ctx, members, invite)
        keys = [m.identity_key for m in start.members]
        words = invite.model_size + 1  # the weight word last (spec/group.md §4)
        bounds = shard_bounds(words, len(keys))
        problems = []
        for member in members:
            index = keys.index(member.identity.public_key)
            shard = await member.next(
                Shard, ctx.options.timeout, lambda s: s.group_id == start.group_id
            )
            if shard is None:
                problems.append(f"no Shard to member {index} within {ctx.options.timeout:g}s")
                continue
            low, high = bounds[index]
            expected = (high - low) * bits // 8
            if shard.index != index or len(shard.data) != expected:
                problems.append(
                    f"the Shard to member {index} has index {shard.index} and {len(shard.data)} "
                    f"bytes; expected index {index} and {high - low} words of {bits // 8} bytes "
                    f"= {expected} (a {bits}-bit ring, spec/group.md §4)"
                )
        for member in members:
            await member.send(GroupAbort(group_id=start.group_id, reason="conformance kit"))
    if problems:
        return Status.FAIL, "; ".join(problems)
    return Status.PASS, (
        f"GroupStart of {len(keys)} members, signatures verify; shards of "
        f"{bits // 8}-byte words ({bits}-bit ring, {words} words in {len(keys)} shards)"
    )


@_check(
    "abort-forwarding",
    "group.md §6",
    "a member's GroupAbort of a running group is passed on to the other members",
)
async def check_abort_forwarding(ctx: _Context) -> Outcome:
    async with _kit_members(ctx, 2) as (aborting, other):
        invite = await _invited(ctx, [aborting, other])
        start = await _started(ctx, [aborting, other], invite)
        await aborting.send(GroupAbort(group_id=start.group_id, reason="conformance kit aborts"))
        forwarded = await other.next(
            GroupAbort, ctx.options.timeout, lambda a: a.group_id == start.group_id
        )
    if forwarded is None:
        return Status.FAIL, (
            f"one member sent GroupAbort for the running group; within {ctx.options.timeout:g}s "
            "the node did not send GroupAbort to the other member (spec/group.md §6, rule 1: "
            "also when the abort was caused by a GroupAbort it received)"
        )
    return Status.PASS, f"forwarded: {forwarded.reason!r}"


async def _timeout_scenario(ctx: _Context) -> tuple[Outcome, Outcome]:
    """A started group whose members send no shards: the node must abort it at its
    all-reduce timeout (group.md §5) and then exclude them (group.md §6): one of them is
    declined, a fresh identity is not. Run once for the two checks that report it."""
    cached = ctx.shared.get("timeout-scenario")
    if cached is not None:
        return cached
    excluded: Outcome
    async with _kit_members(ctx, 2) as (silent, other):
        invite = await _invited(ctx, [silent, other])
        start = await _started(ctx, [silent, other], invite)
        started = trio.current_time()
        same = lambda a: a.group_id == start.group_id  # noqa: E731
        abort = await silent.next(GroupAbort, ctx.options.group_timeout, same)
        elapsed = trio.current_time() - started
        if abort is None:
            timeout: Outcome = (
                Status.FAIL,
                f"the kit's members sent no shards, and within {ctx.options.group_timeout:g}s "
                "the node did not abort the group (spec/group.md §5: every wait has a "
                "deadline; a member missing shards at allreduce_timeout aborts)",
            )
            excluded = (Status.SKIP, "skipped: the node did not abort the group (group-timeout)")
        else:
            timeout = (Status.PASS, f"GroupAbort after {elapsed:.1f}s: {abort.reason!r}")
            excluded = await _exclusion(ctx, silent, invite)
    ctx.shared["timeout-scenario"] = (timeout, excluded)
    return timeout, excluded


async def _exclusion(ctx: _Context, blamed: _Member, like: GroupInvite) -> Outcome:
    group_id = await blamed.invite(like)
    reply = await blamed.next(GroupReply, ctx.options.timeout, lambda r: r.group_id == group_id)
    if reply is None:
        return Status.FAIL, f"no GroupReply to an invite within {ctx.options.timeout:g}s"
    if reply.accept:
        await blamed.send(GroupAbort(group_id=group_id, reason="conformance kit withdraws"))
        return Status.FAIL, (
            "the node accepted an invite from a member it had just blamed (its shards were "
            'missing at the timeout); spec/group.md §3 rule 1 and §6: decline ("excluded")'
        )
    # a fresh identity must be accepted, or the decline proved nothing about exclusion
    async with _kit_members(ctx, 1) as (fresh,):
        control = await fresh.invite(like)
        answer = await fresh.next(GroupReply, ctx.options.timeout, lambda r: r.group_id == control)
        if answer is not None and answer.accept:
            await fresh.send(GroupAbort(group_id=control, reason="conformance kit withdraws"))
    if answer is None or not answer.accept:
        why = "no reply" if answer is None else f"declined {answer.reason!r}"
        return Status.WARN, (
            f"the blamed member was declined ({reply.reason!r}), but so was a fresh identity "
            f"({why}): cannot tell exclusion from a busy node"
        )
    return Status.PASS, f"the blamed member was declined: {reply.reason!r}; a fresh one accepted"


@_check(
    "group-timeout",
    "group.md §5",
    "a started group whose members send no shards is aborted at the all-reduce timeout",
)
async def check_group_timeout(ctx: _Context) -> Outcome:
    timeout, _ = await _timeout_scenario(ctx)
    return timeout


@_check(
    "exclusion",
    "group.md §6",
    "a member blamed for a failed group is declined when it invites the node",
)
async def check_exclusion(ctx: _Context) -> Outcome:
    _, excluded = await _timeout_scenario(ctx)
    return excluded


@_check(
    "group-weights",
    "group.md §1",
    "a random group's weight shares add up to its total: the node's next contribution "
    "carries its share",
)
async def check_group_weights(ctx: _Context) -> Outcome:
    # The kit's members run the reference group protocol core (sans-IO), contributing
    # zero models with known weights; shards between two kit members stay in this process.
    # The node's weight is visible only in a group sum: with the node's share s of a first
    # group of total W, a second group of the same members must have total W again
    # (spec/group.md §1, Weights, rule 2: the shares add up to W; a node that does not
    # train contributes the weight it holds).
    import numpy as np

    from p2pfed.fixedpoint import FixedPointParams
    from p2pfed.group import GroupAborted, GroupCompleted, GroupConfig, GroupProtocol, Send

    assert ctx.peer is not None
    if ctx.options.node_trains:
        return Status.SKIP, (
            "the node trains (--node-trains): its weight is reset to its training weight "
            "every round; run this check against a node that does not train"
        )
    node = ctx.peer.peer_id
    params = ctx.federation.params
    count = params.group_min - 1
    async with _kit_members(ctx, count) as members:
        invite = await _invited(ctx, members)  # to learn the model's size; declined
        for member in members:
            await member.decline(invite.group_id)
        fixed = FixedPointParams.for_federation(
            params.fixed_point_bits, params.clip, params.group_max
        )
        engines = {
            m.node_id: GroupProtocol(
                m.identity,
                GroupConfig(group_min=params.group_min, group_max=params.group_max),
                fixed,
                fingerprint=invite.fingerprint,
                model_size=invite.model_size,
                listen_port=0,
                randbytes=ctx.randbytes,
                sit_out=False,
            )
            for m in members
        }
        by_id = {m.node_id: m for m in members}
        zeros = np.zeros(invite.model_size, np.float32)
        now = trio.current_time()
        for index, member in enumerate(members):
            engines[member.node_id].set_contribution(
                zeros, 3 + 2 * index, invite.round, now, initiate=False
            )
        totals: list[GroupCompleted] = []
        aborts: list[str] = []

        async def act(sender: NodeId, actions: list[Any]) -> None:
            for action in actions:
                if isinstance(action, Send):
                    if action.peer == node:
                        await by_id[sender].send(action.message)
                    elif action.peer in engines:
                        again = engines[action.peer].receive(
                            sender, action.message, trio.current_time()
                        )
                        await act(action.peer, again)
                elif isinstance(action, GroupCompleted) and sender == members[0].node_id:
                    totals.append(action)
                elif isinstance(action, GroupAborted) and sender == members[0].node_id:
                    aborts.append(action.reason)
                if isinstance(action, GroupCompleted):
                    # the next contribution: the mean with this member's share
                    engines[sender].set_contribution(
                        action.mean,
                        action.share(sender),
                        action.round,
                        trio.current_time(),
                        initiate=False,
                    )

        group_kinds = (GroupInvite, GroupStart, GroupAbort, Shard, ReducedShard, GroupReply)
        with trio.move_on_after(ctx.options.group_timeout):
            while len(totals) < 2:
                for member in members:
                    while True:
                        message = next(
                            (m for m in member.inbox if isinstance(m, group_kinds)), None
                        )
                        if message is None:
                            break
                        member.inbox.remove(message)
                        engine = engines[member.node_id]
                        await act(
                            member.node_id,
                            engine.receive(node, message, trio.current_time()),
                        )
                    connected = [node, *(m.node_id for m in members if m is not member)]
                    await act(
                        member.node_id,
                        engines[member.node_id].poll(trio.current_time(), connected),
                    )
                await trio.sleep(0.01)
    if len(totals) < 2:
        last = f"; last abort: {aborts[-1]}" if aborts else ""
        return Status.FAIL, (
            f"{len(totals)} of 2 groups of the node and {count} kit members completed within "
            f"{ctx.options.group_timeout:g}s ({len(aborts)} aborted{last})"
        )
    first, second = totals
    share = first.share(node)
    if second.total_weight != first.total_weight:
        implied = second.total_weight - sum(first.share(m.node_id) for m in members)
        return Status.FAIL, (
            f"the first group's total weight was {first.total_weight} (the node's share "
            f"{share}); in the next group of the same members the node contributed weight "
            f"{implied}, so the total became {second.total_weight}. spec/group.md §1, "
            "Weights, rule 2: shares add up to W, and a node that does not train contributes "
            "the weight it holds (pass --node-trains if the node trains between groups)"
        )
    return Status.PASS, (
        f"two groups of total weight {first.total_weight}; the node's share {share} came back "
        "as its contribution"
    )


# group.md, Exact rounds (protocol version 2) ---------------------------------------------


async def _until_model_state(probe: _Probe, timeout: float) -> list[Message]:
    """Send a ModelRequest and collect the node's messages up to its ModelState; _Violation
    if the channel closes or no ModelState comes in time."""
    await probe.send_message(ModelRequest())
    seen: list[Message] = []
    with trio.move_on_after(timeout):
        while True:
            message = await probe.receive()
            if isinstance(message, Close):
                raise _Violation(
                    f"the node closed the channel with Close {_code_name(message.code)}: "
                    f"{message.reason!r}"
                )
            if isinstance(message, ModelState):
                return seen
            seen.append(message)
    raise _Violation(f"no ModelState within {timeout:g}s of a ModelRequest")


def _closed(member: _Member) -> str:
    closes = [m for m in member.inbox if isinstance(m, Close)]
    if closes:
        return f"Close {_code_name(closes[0].code)}: {closes[0].reason!r}"
    return member.ended or "no answer"


@_check(
    "group-position",
    "group.md exact",
    "version 2 is chosen when offered; GroupPosition is sent and accepted on version-2 "
    "channels only",
)
async def check_group_position(ctx: _Context) -> Outcome:
    assert ctx.peer is not None
    if 2 not in ctx.peer.payload.versions:
        return Status.SKIP, f"the node speaks versions {list(ctx.peer.payload.versions)} only"
    exact = ctx.federation.params.averaging == "exact"
    warning = ""
    # a kit member: it keeps the channel alive and answers the node's ModelRequests (a
    # node entering its first round asks its peers for their aggregate and waits)
    async with _kit_members(ctx, 1, versions=(1, 2)) as (member,):
        if member.version != 2:
            return Status.FAIL, (
                f"offered [1, 2], the node's Welcome chose version {member.version}; the "
                "responder picks the highest common version (spec/transport.md §4)"
            )
        # a node that is still training has no position yet: wait as for a group
        wait = ctx.options.group_timeout if exact else ctx.options.timeout
        position = await member.next(GroupPosition, wait)
        if position is None and exact:
            return Status.FAIL, (
                f"no GroupPosition within {wait:g}s on a new version-2 channel of an "
                "exact-rounds federation (spec/group.md, Exact rounds: a node sends its "
                "position on every new channel after NodeAnnounce, and whenever it changes; "
                f"the channel: {_closed(member)})"
            )
        if position is not None and position.step == 0 and position.size < 2:
            # the first may be sent before the node counted this channel: its update
            # follows when it waits at step 0 (a training node sends it later)
            update = await member.next(GroupPosition, ctx.options.timeout)
            if update is not None:
                position = update
            else:
                warning = (
                    f"; WARNING: its step-0 count stayed {position.size} (a READY node counts "
                    "itself and every peer with a version-2 channel, the kit's included)"
                )
        if position is not None:
            # the kit takes the same place: the node must accept it and keep serving
            await member.send(position)
            shown = (
                f"GroupPosition round {position.round} step {position.step} key "
                f"{list(position.key)} size {position.size}"
            )
        else:
            await member.send(GroupPosition(round=0, step=0, key=(), size=2))
            shown = "no GroupPosition (random averaging)"
        await member.send(ModelRequest())
        if await member.next(ModelState, ctx.options.timeout) is None:
            return Status.FAIL, (
                f"after the kit's GroupPosition the node did not answer a ModelRequest "
                f"({_closed(member)})"
            )
        # and on a version-1 channel, opened while the node has a position, there is none
        # (GroupPosition does not exist in version 1: spec/README.md, Version 2)
        old, _ = await ctx.opened_probe(identity=NodeIdentity.generate(ctx.randbytes))
        try:
            before = await _until_model_state(old, ctx.options.timeout)
        finally:
            await old.wire.aclose()
        if any(isinstance(m, GroupPosition) for m in before):
            return Status.FAIL, "the node sent GroupPosition on a channel of protocol version 1"
    status = Status.WARN if warning else Status.PASS
    return status, f"version 2; {shown}; the kit's GroupPosition was accepted{warning}"


# -- the runner -----------------------------------------------------------------------------


def _budget(check: Check, options: ConformanceOptions) -> float:
    """An outer bound on one check (its inner waits are bounded by ``options.timeout``)."""
    if check.name == "secure-group":
        return options.group_timeout + 6 * options.timeout + 30
    if check.name in ("group-timeout", "exclusion"):
        return 2 * options.group_timeout + 12 * options.timeout
    if check.name in (
        "group-initiated",
        "group-start",
        "abort-forwarding",
        "group-position",
        "group-weights",
    ):
        return options.group_timeout + 12 * options.timeout
    if check.name == "keepalive":
        return options.idle + 4 * options.timeout
    if check.name == "keepalive-sent":
        return (options.keepalive_interval or 0) + 4 * options.timeout
    return 6 * options.timeout


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


async def _run_one(check: Check, ctx: _Context) -> CheckResult:
    started = trio.current_time()
    try:
        with trio.fail_after(_budget(check, ctx.options)):
            try:
                status, detail = await check.function(ctx)
            except BaseExceptionGroup as group:
                # a check with background readers (the kit's members) raises through a
                # nursery: judge its first failure as if raised alone
                raise _first_leaf(group) from None
    except _Violation as exc:
        status, detail = Status.FAIL, str(exc)
    except _Hangup as exc:
        status, detail = Status.FAIL, f"the node hung up unexpectedly ({exc})"
    except trio.TooSlowError:
        status, detail = Status.FAIL, (f"the node did not answer within {ctx.options.timeout:g}s")
    except OSError as exc:
        status, detail = Status.FAIL, f"cannot connect to {ctx.host}:{ctx.port}: {exc}"
    except Exception as exc:  # a node must never crash the kit: report and go on
        log.debug("check %s raised", check.name, exc_info=True)
        status, detail = Status.FAIL, f"the check could not run: {exc!r}"
    return CheckResult(
        check.name, check.section, check.summary, status, detail, trio.current_time() - started
    )


async def run_conformance(
    host: str,
    port: int,
    federation: Federation,
    options: ConformanceOptions | None = None,
    *,
    checks: Sequence[str] | None = None,
    randbytes: Callable[[int], bytes] = os.urandom,
    on_result: Callable[[CheckResult], None] | None = None,
    network: Callable[[], Network] | None = None,
) -> ConformanceReport:
    """Run the checks named in ``checks`` (default: all, in :data:`CHECKS` order) against
    the node at ``host:port``. The handshake check always runs first: the others need what
    it learns. ``on_result`` sees each result as soon as it is known. ``network``, if
    given, makes the network the kit's probes use (called once) and that of each
    reference peer (called once per peer), instead of real TCP: tests run the kit and a
    node on one simnet ``VirtualNetwork`` in virtual time.

    >>> report = trio.run(run_conformance, "127.0.0.1", 7447, federation)  # doctest: +SKIP
    >>> report.ok
    True
    """
    options = options or ConformanceOptions()
    known = {check.name for check in CHECKS}
    wanted = set(known if checks is None else checks)
    unknown = sorted(wanted - known)
    if unknown:
        raise ConfigError(
            f"unknown conformance check(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    wanted.add("handshake")
    ctx = _Context(
        host, port, federation, options, NodeIdentity.generate(randbytes), randbytes, network
    )
    report = ConformanceReport(target=f"{host}:{port}", federation=federation.name)
    for check in CHECKS:
        if check.name not in wanted:
            continue
        if check.needs_handshake and ctx.peer is None:
            result = CheckResult(
                check.name,
                check.section,
                check.summary,
                Status.SKIP,
                "skipped: the handshake with the federation secret did not complete",
            )
        else:
            result = await _run_one(check, ctx)
        if check.name == "handshake" and ctx.peer is not None:
            report.peer_id = ctx.peer.peer_id
        report.results.append(result)
        if on_result is not None:
            on_result(result)
    return report


# -- command line ---------------------------------------------------------------------------


def add_conformance_parser(subparsers: Any) -> None:
    """``p2pfed conformance HOST:PORT --federation FILE [options]``."""
    p = subparsers.add_parser(
        "conformance",
        help="check a running node (any implementation) against the protocol specification",
        description=(
            "Connect to the node at HOST:PORT with the federation's secret and check it "
            "against spec/: handshake, refusal of a wrong secret or federation, limits, "
            "refusal of malformed messages, keepalive, peer exchange, NodeAnnounce, a secure "
            "group with reference peers started by this command, and groups the node "
            "initiates with the kit's own members (formation, abort forwarding, the "
            "all-reduce timeout, exclusion, the ring's word size, GroupPosition). Prints a "
            "pass/fail report per spec section; exits 0 only if no check failed."
        ),
    )
    p.add_argument("target", metavar="HOST:PORT", help="the node to check")
    p.add_argument("--federation", required=True, metavar="FILE", help="the node's federation file")
    p.add_argument(
        "--task",
        default=DEFAULT_TASK,
        metavar="MODULE:OBJ",
        help=f"the model the node runs, for the reference peers (default {DEFAULT_TASK})",
    )
    p.add_argument(
        "--set",
        dest="task_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task setting for the reference peers (repeatable)",
    )
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for any answer (default 5)"
    )
    p.add_argument(
        "--idle", type=float, default=3.0, help="seconds the keepalive check idles (default 3)"
    )
    p.add_argument(
        "--keepalive-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="the node's keepalive interval: it must send a Keepalive on a quiet channel "
        "within S seconds plus --timeout (default 1, the spec's)",
    )
    p.add_argument(
        "--group-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a secure group with the node (default 60)",
    )
    p.add_argument(
        "--listen-host",
        default="127.0.0.1",
        help="address the reference peers listen on; the node must reach it (default 127.0.0.1)",
    )
    p.add_argument(
        "--check",
        dest="checks",
        action="append",
        metavar="NAME",
        help=f"run only this check (repeatable): {', '.join(c.name for c in CHECKS)}",
    )
    p.add_argument(
        "--node-trains",
        action="store_true",
        help="the node trains between groups: skip the check that needs its weight to stay "
        "as the last group left it (group-weights); best run against a node that does not "
        "train (p2pfed node --no-train)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--log-level", default="ERROR", help="log level of the reference peers")
    p.set_defaults(handler=cmd_conformance)


def cmd_conformance(args: argparse.Namespace) -> int:
    """Run the kit; exit status 0 if every check passed (warnings and skips allowed)."""
    from p2pfed.daemon import parse_task_settings
    from p2pfed.logs import setup_logging

    try:
        host, port = parse_host_port(args.target)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    federation = load_federation(args.federation)
    options = ConformanceOptions(
        timeout=args.timeout,
        idle=args.idle,
        group_timeout=args.group_timeout,
        keepalive_interval=args.keepalive_interval,
        node_trains=args.node_trains,
        task=args.task,
        task_settings=parse_task_settings(args.task_settings),
        listen_host=args.listen_host,
    )
    setup_logging("text", args.log_level)

    def progress(result: CheckResult) -> None:
        if not args.json:
            print(f"{result.status.value}  {result.name}", file=sys.stderr)

    report = trio.run(
        lambda: run_conformance(
            host, port, federation, options, checks=args.checks, on_result=progress
        )
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.format_text())
    return 0 if report.ok else 1
