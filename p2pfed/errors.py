"""Every exception p2pfed raises, in one hierarchy.

The split follows h11: a :class:`LocalProtocolError` means *we* were asked to do something
the protocol forbids (a bug or misuse on this side); a :class:`RemoteProtocolError` means
the *peer* sent something the protocol forbids, and the right reaction is to close that
peer's channel with the error's :attr:`~RemoteProtocolError.code` and keep serving others.

Catch at the depth you need::

    try:
        events = conn.receive_data(data)
    except RemoteProtocolError as exc:
        log.warning("closing %s: %s", peer, exc)   # exc.code goes into the Close message

The numeric codes are the wire error-code registry of spec/transport.md ("Error codes").
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterable


class CloseCode(enum.IntEnum):
    """Reason codes carried in a Close message (registry: spec/transport.md)."""

    NORMAL = 0
    """Orderly close, nothing wrong."""
    PROTOCOL_ERROR = 1
    """The peer broke a protocol rule not covered by a more specific code."""
    MESSAGE_TOO_LARGE = 2
    """A frame announced a length above the receiver's limit."""
    MALFORMED_MESSAGE = 3
    """A message was not valid deterministic CBOR or did not match its schema."""
    UNSUPPORTED_VERSION = 4
    """The two nodes share no protocol version."""
    AUTHENTICATION_FAILED = 5
    """A handshake signature or identity did not verify."""
    IDLE_TIMEOUT = 6
    """Nothing was received for longer than the idle timeout."""
    SHUTTING_DOWN = 7
    """The node is stopping."""
    INTERNAL_ERROR = 8
    """The sender hit a bug; the peer did nothing wrong."""
    UNEXPECTED_MESSAGE = 9
    """A well-formed message arrived in a state where it is not allowed."""


class P2pfedError(Exception):
    """Base class of every error p2pfed raises on purpose."""


class ConfigError(P2pfedError):
    """A configuration, federation or identity file is missing, unreadable or invalid.

    The message names the file and the field, and says how to fix it.
    """


class ProtocolError(P2pfedError):
    """Base class of protocol violations, local or remote.

    ``code`` is the :class:`CloseCode` that a channel closed because of this error sends.
    """

    code: CloseCode = CloseCode.PROTOCOL_ERROR

    def __init__(self, message: str, code: CloseCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow (a bug or misuse)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow; close its channel."""


class DecodeError(RemoteProtocolError):
    """Bytes from the network are not a valid message: bad CBOR, wrong schema, over a limit."""

    code = CloseCode.MALFORMED_MESSAGE


class MessageTooLargeError(RemoteProtocolError):
    """A length prefix or item count exceeds the configured limit (checked before allocating)."""

    code = CloseCode.MESSAGE_TOO_LARGE


class HandshakeError(RemoteProtocolError):
    """The Noise handshake failed: wrong federation key, bad signature, garbage, timeout."""

    code = CloseCode.AUTHENTICATION_FAILED


class NoiseError(P2pfedError):
    """Base class of Noise Protocol Framework errors (see :mod:`p2pfed.noise`)."""


class NoiseDecryptError(NoiseError):
    """A Noise ciphertext failed authentication: wrong key, tampering or truncation."""


class ChannelClosed(P2pfedError):
    """The secure channel is closed; no more messages can be sent or received on it.

    ``code`` and ``reason`` say why (``CloseCode.NORMAL`` for an orderly close by either
    side); ``by_peer`` tells whether the peer closed it.
    """

    def __init__(self, code: CloseCode, reason: str, *, by_peer: bool) -> None:
        who = "peer" if by_peer else "local side"
        super().__init__(f"channel closed by {who}: {code.name} ({reason})")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer

    @property
    def orderly(self) -> bool:
        """An intended end (a normal close or a shutdown, by either side), not a failure."""
        return self.code in (CloseCode.NORMAL, CloseCode.SHUTTING_DOWN)


class PrivacyBudgetExceeded(P2pfedError):
    """Releasing another noisy update would spend more privacy budget than configured."""


class LedgerError(P2pfedError):
    """The privacy ledger is missing, corrupt or unwritable; the node must not start."""


class NodeIdError(ConfigError, ValueError):
    """A node id's text form is malformed: wrong length, characters or trailing bits."""


class SecureAggregationError(P2pfedError, ValueError):
    """Secure-aggregation input is invalid (see :mod:`p2pfed.fixedpoint`, :mod:`p2pfed.masking`).

    Raised for fixed-point parameters that could overflow, a malformed group, a vector that
    cannot be encoded; the message names the value and says what to change.
    """


class InvalidGroupSumError(SecureAggregationError):
    """A group sum cannot be a sum of every member's contribution: the masks did not cancel.

    A contribution is missing, duplicated or corrupted. The group must abort (everyone
    keeps its own model) and regroup with fresh seeds; never try to repair the sum.
    """


class WeakMaskKeyError(RemoteProtocolError):
    """A member's X25519 mask public key has small order (the shared secret is all zero).

    ``node_id`` is the offending member; close its channel and regroup without it.
    """

    def __init__(self, message: str, node_id: bytes) -> None:
        super().__init__(message, CloseCode.PROTOCOL_ERROR)
        self.node_id = node_id


class DecodeLimitError(DecodeError, MessageTooLargeError):
    """A received CBOR item exceeds a decode limit (total size, item count, text length).

    It is both a :class:`DecodeError` (so ``except DecodeError`` around a decoder catches
    every way a message can be rejected) and a :class:`MessageTooLargeError` (so the channel
    closes with ``MESSAGE_TOO_LARGE``). Raised by :func:`p2pfed.encoding.decode`.
    """

    code = CloseCode.MESSAGE_TOO_LARGE


class CheckpointError(P2pfedError):
    """A model checkpoint is corrupt, truncated, of an unknown version or of another model.

    Raised by :func:`p2pfed.checkpoint.load_checkpoint`; the message names the file and
    says what is wrong. A checkpoint is only a cache of training progress: moving the file
    aside lets the node start from the federation's initial model (the privacy ledger,
    not the checkpoint, remembers the budget spent).
    """


class StatusError(P2pfedError):
    """A node directory's ``status.json`` is missing, unreadable or invalid.

    Raised by :func:`p2pfed.status.read_status`; the message names the file and says
    whether a node has ever run with that directory.
    """


class ListenError(P2pfedError):
    """The node (or its metrics endpoint) cannot listen on its address: the port is in use,
    the address is not this host's, or binding is not permitted."""


class TaskError(P2pfedError):
    """The user's task raised an exception (its cause is the original exception)."""


def raised_in(error: BaseException, files: Iterable[str]) -> bool:
    """Whether any frame of ``error``'s traceback runs code from one of ``files``."""
    wanted = {os.path.realpath(f) for f in files}
    tb = error.__traceback__
    while tb is not None:
        if os.path.realpath(tb.tb_frame.f_code.co_filename) in wanted:
            return True
        tb = tb.tb_next
    return False


def leaf_errors(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order; ``[error]`` if it is
    not a group. trio wraps an error escaping a task in one group per nursery it crosses."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaf_errors(inner)]
    return [error]


def main_error(error: BaseException) -> BaseException:
    """The one exception a fatal ``error`` (maybe nested groups) is best reported by.

    A user's interrupt wins, then an error of ours (it says what to do), then an
    ``OSError`` (the environment), then the first one. Cancellations that merely
    accompany the real error are never chosen.
    """
    leaves = [e for e in leaf_errors(error) if type(e).__name__ != "Cancelled"] or [error]
    for kind in (KeyboardInterrupt, P2pfedError, OSError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


_ADVICE: list[tuple[type[BaseException], str]] = [
    (
        CheckpointError,
        "move the checkpoint aside to start from the federation's initial model; the privacy "
        "ledger, not the checkpoint, keeps the budget spent",
    ),
    (
        LedgerError,
        "restore the ledger from a backup; never delete it, it is the record of the privacy "
        "budget this node has spent",
    ),
    (TaskError, "fix the task; the traceback is in the log at debug level"),
]
"""What to do, for errors whose messages only say what is wrong (the others, configuration
errors above all, already say how to fix it in their own words)."""


def fatal_message(error: BaseException) -> str:
    """One line ``WHAT (WHAT TO DO)`` for a fatal ``error`` (after :func:`main_error`)."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and not isinstance(error, P2pfedError):
        where = f" {error.filename}" if error.filename else ""
        what = error.strerror or text or type(error).__name__
        if error.errno == errno.ENOSPC:
            return (
                f"cannot write{where or ' a file'}: the disk is full (free space on it and "
                "restart the node, which resumes from its last checkpoint)"
            )
        if error.errno in (errno.EACCES, errno.EPERM):
            return f"{what}:{where} (check the permissions of that path)"
        return f"{what}{':' if where else ''}{where} (check the path, the disk and the network)"
    if isinstance(error, P2pfedError):
        if _disk_full(error):
            # whatever the file, the remedy is the same, and not the one the error's own
            # advice (written for a damaged file) would give
            text = text.split(" (", 1)[0] if text.endswith(")") else text
            return (
                f"{text} (the disk is full: free space on it and restart the node, which "
                "resumes from its last checkpoint)"
            )
        if text.endswith(")"):
            return text
        for kind, advice in _ADVICE:
            if isinstance(error, kind):
                return f"{text} ({advice})"
        return text
    return (
        f"unexpected {type(error).__name__}: {text or 'no message'} (a bug: please report it "
        "with the log; --log-level DEBUG shows the traceback)"
    )


def _disk_full(error: BaseException) -> bool:
    """Whether ``error`` was caused (directly or down its chain) by a full disk."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        current = current.__cause__ or current.__context__
    return False
