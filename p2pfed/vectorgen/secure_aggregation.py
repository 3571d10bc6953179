"""Test vectors of secure aggregation: mask seeds and words, fixed point, a masked group sum.

All byte strings are lowercase hex. Ring words are given in their wire form (each word
``bits/8`` bytes little-endian, concatenated). Stochastic rounding is local to a member
and not part of interoperability, so the vectors give the inputs *and* the rounded
integers ``q``; a verifier checks that each ``q`` is one of the two integers nearest to
``clip(x) * scale``, and checks everything downstream of ``q`` exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from fractions import Fraction
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from p2pfed.fixedpoint import (
    DEFAULT_PARAMS,
    FixedPointParams,
    contribution_to_bytes,
    decode_group_sum,
    make_contribution,
)
from p2pfed.masking import (
    GroupMember,
    MaskingContext,
    mask_public_key,
    mask_seed_info,
    mask_words,
    pair_seed,
    sum_contributions,
)

NAME = "secure_aggregation"
SECTION = "spec/secure-aggregation.md: Fixed-point encoding, Contribution layout, Mask derivation"
DESCRIPTION = (
    "pair seeds (X25519 + HKDF) and ChaCha20 mask words incl. a non-aligned range, "
    "fixed-point encode/decode, a complete 3-member masked group sum"
)

PARAMS_32 = FixedPointParams(bits=32, clip=4.0, scale_bits=15, max_group_size=32, max_weight=256)
"""Explicit parameters (not what a federation derives): kept to pin down another scale."""
#: what a federation derives from its parameters (spec/secure-aggregation.md, "Parameters"):
#: the defaults (clip 8, group_max 8) in both rings; these are the scales to copy
FEDERATION_PARAMS = {bits: FixedPointParams.for_federation(bits, 8.0, 8) for bits in (64, 32)}
_LABEL = b"p2pfed secure_aggregation vectors/"
_ROUND = 42
_FIRST_WORDS = 8
_RANGES = {64: (13, 21), 32: (27, 35)}  # word 13 of 64 bits starts 40 bytes into block 1


def _fixed(tag: str, i: int) -> bytes:
    return hashlib.sha256(_LABEL + tag.encode() + bytes([i])).digest()


def _params_dict(p: FixedPointParams) -> dict[str, Any]:
    return {
        "bits": p.bits,
        "clip": p.clip,
        "scale_bits": p.scale_bits,
        "max_group_size": p.max_group_size,
        "max_weight": p.max_weight,
    }


def _f32_hex(x: np.ndarray) -> str:
    return x.astype("<f4").tobytes().hex()


def _words_hex(words: np.ndarray, params: FixedPointParams) -> str:
    return contribution_to_bytes(words, params).hex()


def _members() -> tuple[list[bytes], list[bytes], list[GroupMember], bytes]:
    privs = [_fixed("mask-private-key", i) for i in range(3)]
    ids = [_fixed("node-id", i) for i in range(3)]
    members = [GroupMember(i, mask_public_key(p)) for i, p in zip(ids, privs, strict=True)]
    return privs, ids, members, _fixed("group-nonce", 0)


def _mask_expansion() -> list[dict[str, Any]]:
    privs, ids, members, nonce = _members()
    cases = []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        seed = pair_seed(privs[a], ids[a], members[b].mask_public_key, ids[b], nonce, _ROUND)
        case: dict[str, Any] = {
            "private_key_a": privs[a].hex(),
            "public_key_a": members[a].mask_public_key.hex(),
            "node_id_a": ids[a].hex(),
            "private_key_b": privs[b].hex(),
            "public_key_b": members[b].mask_public_key.hex(),
            "node_id_b": ids[b].hex(),
            "nonce": nonce.hex(),
            "round": _ROUND,
            "hkdf_info": mask_seed_info(_ROUND, ids[a], ids[b]).hex(),
            "seed": seed.hex(),
        }
        for bits in (64, 32):
            start, stop = _RANGES[bits]
            n = bits // 8
            first = mask_words(seed, 0, _FIRST_WORDS, bits)
            ranged = mask_words(seed, start, stop, bits)
            case[f"words{bits}_first_{_FIRST_WORDS}"] = first.astype(f"<u{n}").tobytes().hex()
            case[f"words{bits}_range"] = {
                "start": start,
                "stop": stop,
                "words": ranged.astype(f"<u{n}").tobytes().hex(),
            }
        cases.append(case)
    return cases


def _fixed_point() -> list[dict[str, Any]]:
    cases = []
    inputs = {
        64: [0.0, 1.0, -1.0, 0.5, -8.0, 9.5, -1000.0, 1e-3, -1e-3, 3.1415927, 2.0**-40, -7.99],
        32: [0.0, 1.0, -1.0, 0.25, 4.0, -5.0, 1e-3, -1e-3, 3.1415927, 1e-6, -3.999, 0.1],
    }
    inputs[8] = [0.0, 1.0, -1.0, 0.5, -8.0, 9.5, 1e-3, -1e-3, 3.1415927, 2.0**-20, -7.99, 0.1]
    sets = [
        ("explicit parameters", DEFAULT_PARAMS, inputs[64]),
        ("explicit parameters", PARAMS_32, inputs[32]),
        (
            "derived by a federation: clip 8, group_max 8, 64-bit ring",
            FEDERATION_PARAMS[64],
            inputs[8],
        ),
        (
            "derived by a federation: clip 8, group_max 8, 32-bit ring",
            FEDERATION_PARAMS[32],
            inputs[8],
        ),
    ]
    for origin, params, values in sets:
        x = np.array(values, np.float32)
        weight = 3
        contribution = make_contribution(x, weight, params, np.random.default_rng(2024))
        q = contribution[:-1]  # x encoded with the weight (section 2.1)
        mean, total = decode_group_sum(contribution, params)
        cases.append(
            {
                "params": _params_dict(params),
                "params_origin": origin,
                "x_f32": _f32_hex(x),
                "x": [float(v) for v in x],
                "q": [int(v) for v in q.view(params.signed_dtype)],
                "weight": weight,
                "contribution": _words_hex(contribution, params),
                "decoded_f32": _f32_hex(mean),
                "decoded_weight": total,
            }
        )
    return cases


def _group_sum() -> dict[str, Any]:
    privs, ids, members, nonce = _members()
    params = DEFAULT_PARAMS
    xs = np.array(
        [
            [0.25, -1.5, 3.0, 1e-3, 9.0],
            [0.75, 2.5, -3.0, -2e-3, 7.5],
            [-0.5, 0.125, 1.0, 5e-4, -8.5],
        ],
        np.float32,
    )
    weights = [10, 30, 60]
    members_out = []
    masked = []
    for i in range(3):
        ctx = MaskingContext(ids[i], privs[i], members, nonce, _ROUND, params)
        plain = make_contribution(xs[i], weights[i], params, np.random.default_rng(100 + i))
        m = ctx.masked_contribution(xs[i], weights[i], np.random.default_rng(100 + i))
        masked.append(m)
        members_out.append(
            {
                "node_id": ids[i].hex(),
                "private_key": privs[i].hex(),
                "public_key": members[i].mask_public_key.hex(),
                "x_f32": _f32_hex(xs[i]),
                "x": [float(v) for v in xs[i]],
                "weight": weights[i],
                "q": [int(v) for v in plain[:-1].view(np.int64)],
                "contribution": _words_hex(plain, params),
                "masked_contribution": _words_hex(m, params),
            }
        )
    total = sum_contributions(masked)
    mean, weight = decode_group_sum(total, params)
    return {
        "params": _params_dict(params),
        "nonce": nonce.hex(),
        "round": _ROUND,
        "members": members_out,
        "sum": _words_hex(total, params),
        "decoded_mean_f32": _f32_hex(mean),
        "decoded_mean": [float(v) for v in mean],
        "total_weight": weight,
    }


def generate() -> dict[str, Any]:
    """The vectors, computed by the reference implementation from fixed keys and seeds."""
    return {
        "description": DESCRIPTION,
        "note": (
            "Ring words are hex of their wire form (little-endian bits/8-byte words). "
            "Stochastic rounding is local: q is given, check q in {floor(y), ceil(y)} for "
            "y = clip(x) * 2^scale_bits, then check everything after q exactly."
        ),
        "mask_expansion": _mask_expansion(),
        "fixed_point": _fixed_point(),
        "group_sum": _group_sum(),
    }


# --- independent verification --------------------------------------------------------------


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()  # L = 32: one block


def _keystream_words(seed: bytes, count: int, bits: int) -> list[int]:
    n = bits // 8
    stream = (
        Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(count * n))
    )
    return [int.from_bytes(stream[i * n : (i + 1) * n], "little") for i in range(count)]


def _words(hex_text: str, bits: int) -> list[int]:
    data = bytes.fromhex(hex_text)
    n = bits // 8
    assert len(data) % n == 0
    return [int.from_bytes(data[i : i + n], "little") for i in range(0, len(data), n)]


def _f32(hex_text: str) -> list[float]:
    return [float(v) for v in np.frombuffer(bytes.fromhex(hex_text), "<f4")]


def _check_rounding(x: list[float], q: list[int], weight: int, params: dict[str, Any]) -> None:
    clip = Fraction(params["clip"])
    for xv, qv in zip(x, q, strict=True):
        y = weight * max(-clip, min(clip, Fraction(xv))) * (1 << params["scale_bits"])
        assert qv in (math.floor(y), math.ceil(y)), (xv, qv)


def _check_decoded(
    decoded: list[float], sums: list[int], weight: int, params: dict[str, Any]
) -> None:
    bits, scale = params["bits"], 1 << params["scale_bits"]
    for value, word in zip(decoded, sums, strict=True):
        signed = word - (1 << bits) if word >= 1 << (bits - 1) else word
        exact = Fraction(signed, scale * weight)
        # the decoding itself is exact up to float64 division and float32 rounding
        assert abs(Fraction(value) - exact) <= abs(exact) * Fraction(1, 2**23) + Fraction(
            1, 2**149
        ), (value, exact)


def verify(vectors: dict[str, Any]) -> None:
    """Recompute seeds (hmac HKDF), masks (ChaCha20 from block 0) and sums (Python ints)."""
    for case in vectors["mask_expansion"]:
        priv_a = bytes.fromhex(case["private_key_a"])
        pub_b = bytes.fromhex(case["public_key_b"])
        priv_b = bytes.fromhex(case["private_key_b"])
        pub_a = bytes.fromhex(case["public_key_a"])
        pk = X25519PrivateKey.from_private_bytes
        assert pk(priv_a).public_key().public_bytes_raw() == pub_a
        assert pk(priv_b).public_key().public_bytes_raw() == pub_b
        shared = pk(priv_a).exchange(X25519PublicKey.from_public_bytes(pub_b))
        assert shared == pk(priv_b).exchange(X25519PublicKey.from_public_bytes(pub_a))
        low, high = sorted((bytes.fromhex(case["node_id_a"]), bytes.fromhex(case["node_id_b"])))
        info = b"p2pfed-mask-seed/v1" + case["round"].to_bytes(8, "big") + low + high
        assert info.hex() == case["hkdf_info"]
        seed = _hkdf(shared, bytes.fromhex(case["nonce"]), info)
        assert seed.hex() == case["seed"]
        for bits in (64, 32):
            rng = case[f"words{bits}_range"]
            stream = _keystream_words(seed, rng["stop"], bits)
            assert _words(case[f"words{bits}_first_{_FIRST_WORDS}"], bits) == stream[:_FIRST_WORDS]
            assert _words(rng["words"], bits) == stream[rng["start"] : rng["stop"]]

    for case in vectors["fixed_point"]:
        params = case["params"]
        bits = params["bits"]
        x = _f32(case["x_f32"])
        assert x == case["x"]
        w = case["weight"]
        _check_rounding(x, case["q"], w, params)
        expected = [q % (1 << bits) for q in case["q"]] + [w]
        words = _words(case["contribution"], bits)
        assert words == expected
        assert case["decoded_weight"] == w
        _check_decoded(_f32(case["decoded_f32"]), words[:-1], w, params)

    group = vectors["group_sum"]
    params = group["params"]
    bits = params["bits"]
    modulus = 1 << bits
    nonce = bytes.fromhex(group["nonce"])
    members = group["members"]
    ids = [bytes.fromhex(m["node_id"]) for m in members]
    plain_sum = None
    masked_sum = None
    for i, member in enumerate(members):
        x = _f32(member["x_f32"])
        w = member["weight"]
        _check_rounding(x, member["q"], w, params)
        plain = _words(member["contribution"], bits)
        assert plain == [q % modulus for q in member["q"]] + [w]
        masked = list(plain)
        priv = X25519PrivateKey.from_private_bytes(bytes.fromhex(member["private_key"]))
        for j, other in enumerate(members):
            if j == i:
                continue
            shared = priv.exchange(
                X25519PublicKey.from_public_bytes(bytes.fromhex(other["public_key"]))
            )
            low, high = sorted((ids[i], ids[j]))
            info = b"p2pfed-mask-seed/v1" + group["round"].to_bytes(8, "big") + low + high
            mask = _keystream_words(_hkdf(shared, nonce, info), len(plain), bits)
            sign = 1 if ids[j] > ids[i] else -1
            masked = [(v + sign * k) % modulus for v, k in zip(masked, mask, strict=True)]
        assert _words(member["masked_contribution"], bits) == masked
        plain_sum = (
            plain if plain_sum is None else [a + b for a, b in zip(plain_sum, plain, strict=True)]
        )
        masked_sum = (
            masked
            if masked_sum is None
            else [a + b for a, b in zip(masked_sum, masked, strict=True)]
        )
    assert plain_sum is not None and masked_sum is not None
    total = [v % modulus for v in masked_sum]
    assert total == [v % modulus for v in plain_sum]
    assert _words(group["sum"], bits) == total
    assert group["total_weight"] == total[-1] == sum(m["weight"] for m in members)
    decoded = _f32(group["decoded_mean_f32"])
    assert decoded == group["decoded_mean"]
    _check_decoded(decoded, total[:-1], total[-1], params)
