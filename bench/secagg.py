"""Secure-aggregation maths benchmark: encode + mask one contribution, sum a group.

Run from the repository root::

    .venv/bin/python -m bench.secagg            # d = 10**6 and 10**7, group of 8
    .venv/bin/python -m bench.secagg --quick    # d = 10**5 only, for a smoke test

What is measured, per model size ``d`` and a group of ``k = 8`` members (64-bit ring,
default :class:`~p2pfed.fixedpoint.FixedPointParams`), each as the median of a few
repetitions on one core:

``member_encode_mask_s``
    one member's whole step: :meth:`MaskingContext.masked_contribution` (clip, scale,
    stochastic rounding, times the weight, then ``k - 1 = 7`` pairwise ChaCha20 masks
    added or subtracted over all ``d + 1`` words). Beside it ``plain_weighted_s``, the
    plaintext equivalent ``x * w`` in float32.
``member_encode_mask_reused_buffer_s``, ``ratio_reused_buffer``
    the same step writing into a buffer kept from the previous round (``out=``), which
    saves the page faults of a fresh allocation (about 20k for an 80 MB contribution).
``member_encode_s`` / ``member_mask_s``
    the two halves of that step measured alone (:func:`make_contribution`, then
    :meth:`MaskingContext.mask_range` in place), to show where the time goes.
``sum_masked_s``
    the ring sum of the 8 masked contributions (:func:`sum_contributions`), beside
    ``sum_plain_float32_s``, the same additions on the float32 vectors.
``raw_keystream_bytes_per_s``
    ChaCha20 keystream throughput of ``cryptography`` alone (``update_into`` of 256 KiB
    blocks into one buffer), producing the same number of bytes one member's masking
    needs: ``7 * (d + 1) * 8``. This is the ceiling.
``masking_bytes_per_s`` and ``ratio``
    keystream bytes consumed per second of the whole encode + mask step, and its ratio to
    the raw keystream throughput (target: at least 0.5).

Where the time goes: the keystream dominates (7 words of keystream per coordinate). The
masking adds one in-cache numpy add per pair and chunk, because the keystream is generated
into a 256 KiB buffer that stays in L2 and is added to the matching slice of the
contribution right away. Encoding costs roughly ten vectorised passes over cache-sized
chunks, of which drawing the stochastic-rounding uniforms (``Generator.random``) is the
largest. Summing is memory-bound: one pass over each contribution, as for float32 but
with words twice as wide.

Progress goes to stderr; the last line of stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from bench.results import report
from p2pfed.fixedpoint import DEFAULT_PARAMS, make_contribution
from p2pfed.masking import GroupMember, MaskingContext, mask_public_key, sum_contributions

GROUP_SIZE = 8
_KEYSTREAM_BLOCK = 1 << 18


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _group(k: int) -> list[MaskingContext]:
    privs = [hashlib.sha256(b"bench-key-%d" % i).digest() for i in range(k)]
    ids = [hashlib.sha256(b"bench-id-%d" % i).digest() for i in range(k)]
    members = [GroupMember(i, mask_public_key(p)) for i, p in zip(ids, privs, strict=True)]
    nonce = hashlib.sha256(b"bench-nonce").digest()
    return [
        MaskingContext(i, p, members, nonce, 1, DEFAULT_PARAMS)
        for i, p in zip(ids, privs, strict=True)
    ]


def _raw_keystream(total_bytes: int) -> None:
    encryptor = Cipher(algorithms.ChaCha20(bytes(32), bytes(16)), mode=None).encryptor()
    zeros = memoryview(bytes(_KEYSTREAM_BLOCK))
    out = memoryview(bytearray(_KEYSTREAM_BLOCK))
    for _ in range(total_bytes // _KEYSTREAM_BLOCK):
        encryptor.update_into(zeros, out)
    rest = total_bytes % _KEYSTREAM_BLOCK
    if rest:
        encryptor.update_into(zeros[:rest], out[:rest])


def bench_size(d: int, repeats: int) -> dict[str, Any]:
    """Every number for one model size ``d``."""
    k = GROUP_SIZE
    _log(f"d={d}: preparing {k} members")
    ctxs = _group(k)
    data_rng = np.random.default_rng(12345)
    xs = [(data_rng.standard_normal(d) * 0.05).astype(np.float32) for _ in range(k)]
    weights = [100 + 17 * i for i in range(k)]
    rng = np.random.default_rng(1)
    keystream_bytes = (k - 1) * (d + 1) * DEFAULT_PARAMS.word_bytes

    _log(f"d={d}: raw ChaCha20 keystream, {keystream_bytes / 1e6:.0f} MB per repetition")
    t_raw = _median_time(lambda: _raw_keystream(keystream_bytes), repeats)

    _log(f"d={d}: encode + mask one contribution")
    t_member = _median_time(lambda: ctxs[0].masked_contribution(xs[0], weights[0], rng), repeats)
    buffer = np.empty(d + 1, DEFAULT_PARAMS.dtype)
    t_member_reused = _median_time(
        lambda: ctxs[0].masked_contribution(xs[0], weights[0], rng, out=buffer), repeats
    )
    t_encode = _median_time(
        lambda: make_contribution(xs[0], weights[0], DEFAULT_PARAMS, rng), repeats
    )
    words = make_contribution(xs[0], weights[0], DEFAULT_PARAMS, rng)
    t_mask = _median_time(lambda: ctxs[0].mask_range(words, 0, in_place=True), repeats)
    w0 = np.float32(weights[0])
    t_plain_weighted = _median_time(lambda: xs[0] * w0, repeats)

    _log(f"d={d}: masking all {k} contributions and summing")
    parts = [c.masked_contribution(x, w, rng) for c, x, w in zip(ctxs, xs, weights, strict=True)]
    t_sum = _median_time(lambda: sum_contributions(parts), repeats)

    def plain_sum() -> np.ndarray:
        total = xs[0].copy()
        for x in xs[1:]:
            np.add(total, x, out=total)
        return total

    t_plain_sum = _median_time(plain_sum, repeats)

    masking_bps = keystream_bytes / t_member
    raw_bps = keystream_bytes / t_raw
    result = {
        "d": d,
        "group_size": k,
        "repeats": repeats,
        "keystream_bytes_per_member": keystream_bytes,
        "member_encode_mask_s": t_member,
        "member_encode_mask_reused_buffer_s": t_member_reused,
        "member_encode_s": t_encode,
        "member_mask_s": t_mask,
        "plain_weighted_s": t_plain_weighted,
        "sum_masked_s": t_sum,
        "sum_plain_float32_s": t_plain_sum,
        "raw_keystream_s": t_raw,
        "raw_keystream_bytes_per_s": raw_bps,
        "masking_bytes_per_s": masking_bps,
        "ratio": masking_bps / raw_bps,
        "ratio_reused_buffer": (keystream_bytes / t_member_reused) / raw_bps,
    }
    _log(
        f"d={d}: encode+mask {t_member * 1e3:.1f} ms (reused buffer "
        f"{t_member_reused * 1e3:.1f}; encode {t_encode * 1e3:.1f}, mask "
        f"{t_mask * 1e3:.1f}; plain x*w {t_plain_weighted * 1e3:.1f}), sum of {k} "
        f"{t_sum * 1e3:.1f} ms (float32 {t_plain_sum * 1e3:.1f}), keystream "
        f"{raw_bps / 1e9:.2f} GB/s raw vs {masking_bps / 1e9:.2f} GB/s in the step, "
        f"ratio {masking_bps / raw_bps:.2f}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="d = 10**5 only (smoke test)")
    parser.add_argument("--record", action="store_true", help="store the result in bench/results/")
    args = parser.parse_args(argv)
    sizes = [(10**5, 3)] if args.quick else [(10**6, 7), (10**7, 5)]
    started = time.perf_counter()
    results = [bench_size(d, repeats) for d, repeats in sizes]
    summary = {
        "benchmark": "secagg",
        "params": {
            "bits": DEFAULT_PARAMS.bits,
            "clip": DEFAULT_PARAMS.clip,
            "scale_bits": DEFAULT_PARAMS.scale_bits,
        },
        "target_ratio": 0.5,
        "min_ratio": min(r["ratio"] for r in results),
        "sizes": results,
        "wall_s": time.perf_counter() - started,
    }
    print(json.dumps(report("secagg", summary, record=args.record and not args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
