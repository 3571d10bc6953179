"""Fuzz target: message decoding and validation (:func:`p2pfed.messages.decode_message`,
:meth:`p2pfed.messages.HandshakePayload.decode`; spec/encoding.md, spec/messages.cddl).

Contract checked on every input:

* only :class:`~p2pfed.errors.DecodeError` escapes;
* an accepted message re-encodes to exactly the input (closed schemas, deterministic
  CBOR), with and without zero-copy decoding, and its repr works (logs print it);
* an accepted handshake payload re-encodes (its reserved extension keys dropped) to bytes
  that decode to the same payload;
* the first input byte picks the decoder, the rest is the CBOR item; tight decode limits
  never accept what the defaults reject.

Run: ``python -m fuzz.message_decode -atheris_runs=100000``.
"""

from __future__ import annotations

import sys

from fuzz._support import run
from p2pfed.encoding import DecodeLimits
from p2pfed.errors import DecodeError
from p2pfed.messages import HandshakePayload, Message, decode_message, encode_message

TARGET = "message_decode"
TIGHT = DecodeLimits(max_bytes=1024, max_depth=3, max_items=64, max_text=64)
HANDSHAKE_PAYLOAD = 1
"""Selector byte (mod 4) for the handshake payload decoder; any other value: messages."""


def _check_message(data: bytes) -> None:
    try:
        message = decode_message(data)
    except DecodeError:
        accepted = False
    else:
        accepted = True
        assert isinstance(message, Message)
        again = encode_message(message)
        assert again == data, f"{message!r} re-encodes to {again.hex()}, input {data.hex()}"
        borrowed = decode_message(data, borrow=True)
        assert encode_message(borrowed) == data, "zero-copy decoding changed the message"
        repr(message)
    try:
        decode_message(data, TIGHT)
    except DecodeError:
        pass
    else:
        assert accepted, "tight limits accepted a message the default limits reject"


def _check_payload(data: bytes) -> None:
    try:
        payload = HandshakePayload.decode(data)
    except DecodeError:
        return
    encoded = payload.encode()
    again = HandshakePayload.decode(encoded)
    assert again == payload, f"{payload!r} does not survive re-encoding"
    repr(payload)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 4 == HANDSHAKE_PAYLOAD:
        _check_payload(data[1:])
    else:
        _check_message(data[1:])


def main() -> None:
    run(TARGET, test_one_input)


if __name__ == "__main__":
    main()
    sys.exit(0)
