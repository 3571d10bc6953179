"""Fuzz target: :func:`p2pfed.encoding.decode` (spec/encoding.md).

Contract checked on every input:

* only :class:`~p2pfed.errors.DecodeError` escapes (``DecodeLimitError`` included);
* an accepted item is deterministic CBOR, so re-encoding it gives the input back
  byte for byte (unless it lies outside what :func:`~p2pfed.encoding.encode` accepts:
  map keys other than 0..23 or all text, which the decoder lets the schemas reject);
* cbor2, an independent decoder, reads the same value from an accepted input;
* zero-copy decoding (``borrow_min``) gives the same value as copying;
* tighter limits never accept what the default limits reject, and agree when both accept;
* memory: the decoder's peak allocation stays within a constant factor of the input
  size (:data:`BYTES_PER_INPUT_BYTE`), whatever the item claims to hold.

Run: ``python -m fuzz.cbor_decode -atheris_runs=100000``.
"""

from __future__ import annotations

import math
import sys
import tracemalloc

import cbor2

from fuzz._support import run
from p2pfed.encoding import DecodeLimits, decode, encode
from p2pfed.errors import DecodeError, LocalProtocolError

TARGET = "cbor_decode"
TIGHT = DecodeLimits(max_bytes=4096, max_depth=3, max_items=64, max_text=64)
BYTES_PER_INPUT_BYTE = 160
"""Most bytes of Python objects one input byte may become. The costliest one-byte items
are an empty map (a 64-byte dict) and a one-byte text string (a 50-byte str), plus a list
slot or dict entry each; 160 leaves room for allocator rounding."""
FIXED_ALLOWANCE = 64 * 1024
"""Allocations that do not scale with the input: lazily built caches, a tracer's first
visit to a function (coverage.py), the decoder's own frame."""


def _same(a: object, b: object) -> bool:
    """Structural equality where NaN equals NaN and -0.0 differs from 0.0."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
        )
    if isinstance(a, memoryview):
        a = a.tobytes()
    if isinstance(b, memoryview):
        b = b.tobytes()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _decode_measured(data: bytes) -> tuple[object, int]:
    """Decode ``data`` and return the value and the peak of memory traced meanwhile."""
    if not tracemalloc.is_tracing():
        # started once and left on: starting and stopping it for every input leaks
        # memory inside tracemalloc itself (measured: 7 MB per 10,000 inputs)
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        value = decode(data)
    finally:
        _, peak = tracemalloc.get_traced_memory()
    return value, peak - base


def test_one_input(data: bytes) -> None:
    try:
        value, peak = _decode_measured(data)
    except DecodeError:
        value, peak = None, 0
        accepted = False
    else:
        accepted = True
    limit = BYTES_PER_INPUT_BYTE * len(data) + FIXED_ALLOWANCE
    assert peak <= limit, f"decoding {len(data)} bytes allocated {peak} bytes (limit {limit})"

    try:
        tight = decode(data, TIGHT)
    except DecodeError:
        pass
    else:
        assert accepted, "tighter limits accepted an input the default limits reject"
        assert _same(tight, value), "tighter limits decoded a different value"
    if not accepted:
        return

    borrowed = decode(data, borrow_min=0)
    assert _same(borrowed, value), "zero-copy decoding gave a different value"

    try:
        other = cbor2.loads(data)
    except Exception as exc:
        raise AssertionError(f"p2pfed accepted an item cbor2 rejects: {exc!r}") from exc
    assert _same(value, other), f"p2pfed decoded {value!r}, cbor2 decoded {other!r}"

    try:
        again = encode(value)
    except LocalProtocolError:
        return  # outside the encoder's data model (checked by the message schemas)
    assert again == data, f"re-encoding gave {again.hex()}, input was {data.hex()}"


def main() -> None:
    run(TARGET, test_one_input)


if __name__ == "__main__":
    main()
    sys.exit(0)
