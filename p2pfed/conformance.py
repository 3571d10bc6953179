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

Example::

    $ p2pfed conformance 127.0.0.1:7447 --federation ~/.p2pfed/federation.toml
    $ p2pfed conformance 10.0.0.5:7447 --federation lab.federation.toml \\
          --task mytasks.mnist:task --listen-host 10.0.0.9 --json
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

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
from p2pfed.identity import NodeId, NodeIdentity, verify_signature
from p2pfed.messages import (
    Close,
    HandshakePayload,
    Keepalive,
    Message,
    ModelRequest,
    ModelState,
    NodeAnnounce,
    Welcome,
    decode_message,
    encode_message,
)
from p2pfed.noise import HandshakeState, NoiseTransport, generate_keypair

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
    "discovery.md §4.5": "NodeAnnounce",
    "group.md": "Formation and secure all-reduce with reference peers",
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
    peers wait for a group that includes the node. ``task`` and ``task_settings`` define the
    reference peers' model, which must have the node's fingerprint. ``listen_host`` is where
    the reference peers accept connections (an address the node can reach).
    """

    timeout: float = 5.0
    idle: float = 3.0
    group_timeout: float = 60.0
    task: str = DEFAULT_TASK
    task_settings: dict[str, Any] = field(default_factory=dict)
    listen_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
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

    async def open(self) -> _Opened:
        """A complete, correct handshake up to and including the node's Welcome."""
        payload, ok, size = await self.handshake()
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
    peer: _Opened | None = None

    async def connect(self) -> trio.abc.Stream:
        with trio.fail_after(self.options.timeout):
            return await trio.open_tcp_stream(self.host, self.port)

    async def probe(
        self, *, federation_id: bytes | None = None, psk: bytes | None = None
    ) -> _Probe:
        return _Probe(
            await self.connect(),
            identity=self.identity,
            federation_id=self.federation.federation_id if federation_id is None else federation_id,
            psk=self.federation.secret if psk is None else psk,
            randbytes=self.randbytes,
        )

    async def opened_probe(self) -> tuple[_Probe, _Opened]:
        """A probe past a correct handshake and the Welcome, having sent its NodeAnnounce."""
        probe = await self.probe()
        try:
            with trio.fail_after(self.options.timeout):
                opened = await probe.open()
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
        f"open for {ctx.options.idle:g}s while idle (no Keepalive yet: the default interval is "
        "15s; pass --idle 20 to see one)"
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
                    network=TcpNetwork(mdns=False),
                    task=task,
                    options=NodeOptions(training=False, task_config=settings, sync_timeout=0.5),
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


# -- the runner -----------------------------------------------------------------------------


def _budget(check: Check, options: ConformanceOptions) -> float:
    """An outer bound on one check (its inner waits are bounded by ``options.timeout``)."""
    if check.name == "secure-group":
        return options.group_timeout + 6 * options.timeout + 30
    if check.name == "keepalive":
        return options.idle + 4 * options.timeout
    return 6 * options.timeout


async def _run_one(check: Check, ctx: _Context) -> CheckResult:
    started = trio.current_time()
    try:
        with trio.fail_after(_budget(check, ctx.options)):
            status, detail = await check.function(ctx)
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
) -> ConformanceReport:
    """Run the checks named in ``checks`` (default: all, in :data:`CHECKS` order) against
    the node at ``host:port``. The handshake check always runs first: the others need what
    it learns. ``on_result`` sees each result as soon as it is known.

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
    ctx = _Context(host, port, federation, options, NodeIdentity.generate(randbytes), randbytes)
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
            "refusal of malformed messages, keepalive, NodeAnnounce, and a secure group with "
            "reference peers started by this command. Prints a pass/fail report per spec "
            "section; exits 0 only if no check failed."
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
