"""Pairwise masks (p2pfed.masking): seeds, keystream words, cancellation, uniformity."""

from __future__ import annotations

import hashlib
import hmac
import itertools
from statistics import NormalDist

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfed.errors import InvalidGroupSumError, SecureAggregationError, WeakMaskKeyError
from p2pfed.fixedpoint import (
    DEFAULT_PARAMS,
    FixedPointParams,
    contribution_to_bytes,
    decode_group_sum,
    error_bound,
    make_contribution,
)
from p2pfed.masking import (
    GroupMember,
    MaskingContext,
    generate_mask_keypair,
    mask_public_key,
    mask_seed_info,
    mask_words,
    max_mask_words,
    pair_seed,
    sum_contributions,
)

PARAMS_32 = FixedPointParams(bits=32, clip=4.0, scale_bits=15, max_group_size=32, max_weight=256)
NONCE = bytes(range(32))


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 written out with hmac, independent of the cryptography package."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def make_group(
    k: int, label: bytes = b"group"
) -> tuple[list[bytes], list[bytes], list[GroupMember]]:
    """k members with private keys and ids derived from ``label`` (ids in random order)."""
    privs = [hashlib.sha256(label + b"/key/" + bytes([i])).digest() for i in range(k)]
    ids = [hashlib.sha256(label + b"/id/" + bytes([i])).digest() for i in range(k)]
    members = [GroupMember(i, mask_public_key(p)) for i, p in zip(ids, privs, strict=True)]
    return ids, privs, members


def contexts(
    k: int,
    params: FixedPointParams = DEFAULT_PARAMS,
    label: bytes = b"group",
    nonce: bytes = NONCE,
    round: int = 7,
) -> list[MaskingContext]:
    ids, privs, members = make_group(k, label)
    return [
        MaskingContext(i, p, members, nonce, round, params) for i, p in zip(ids, privs, strict=True)
    ]


def chi2_threshold(df: int, p: float = 1e-6) -> float:
    """The upper p-quantile of the chi-square distribution (scipy, else Wilson-Hilferty)."""
    try:
        from scipy.stats import chi2  # type: ignore[import-untyped]
    except ImportError:  # Wilson-Hilferty: accurate to a fraction of a percent for df >= 15
        z = NormalDist().inv_cdf(1 - p)
        return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3
    return float(chi2.isf(p, df))


def chi2_statistic(values: np.ndarray, bins: int) -> float:
    counts = np.bincount(values.astype(np.int64), minlength=bins)
    expected = values.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


# --- keys and seeds ---------------------------------------------------------------------


def test_generate_mask_keypair_uses_the_injected_randomness() -> None:
    private, public = generate_mask_keypair(lambda n: b"\x07" * n)
    assert private == b"\x07" * 32 and public == mask_public_key(private)
    other_private, other_public = generate_mask_keypair()
    assert len(other_private) == len(other_public) == 32 and other_public != public
    with pytest.raises(SecureAggregationError, match="returned 3 bytes"):
        generate_mask_keypair(lambda n: b"abc")


def test_pair_seed_is_symmetric_and_matches_an_independent_hkdf() -> None:
    ids, privs, members = make_group(2)
    a = pair_seed(privs[0], ids[0], members[1].mask_public_key, ids[1], NONCE, 9)
    b = pair_seed(privs[1], ids[1], members[0].mask_public_key, ids[0], NONCE, 9)
    assert a == b
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    shared = X25519PrivateKey.from_private_bytes(privs[0]).exchange(
        X25519PublicKey.from_public_bytes(members[1].mask_public_key)
    )
    low, high = sorted(ids)
    info = b"p2pfed-mask-seed/v1" + (9).to_bytes(8, "big") + low + high
    assert len(info) == 19 + 8 + 64
    assert mask_seed_info(9, ids[1], ids[0]) == info
    assert a == hkdf_sha256(shared, NONCE, info)


def test_context_seeds_are_symmetric_across_the_group() -> None:
    ids = make_group(5)[0]
    seeds = {
        (my_id, peer): seed
        for my_id, ctx in zip(ids, contexts(5), strict=True)
        for peer, seed in ctx.pair_seeds().items()
    }
    assert len(seeds) == 20
    for (i, j), seed in seeds.items():
        assert seeds[(j, i)] == seed
    assert len(set(seeds.values())) == 10  # one distinct seed per unordered pair


def test_seed_changes_with_nonce_round_and_ids() -> None:
    ids, privs, members = make_group(3)
    pub1 = members[1].mask_public_key

    def seed(
        nonce: bytes = NONCE, round: int = 1, my_id: bytes = ids[0], peer: bytes = ids[1]
    ) -> bytes:
        return pair_seed(privs[0], my_id, pub1, peer, nonce, round)

    variants = {
        seed(),
        seed(nonce=bytes(32)),
        seed(round=2),
        seed(round=2**64 - 1),
        seed(my_id=ids[2]),
        seed(peer=ids[2]),
    }
    assert len(variants) == 6


@pytest.mark.parametrize(
    "public_hex",
    [
        "00" * 32,  # the point 0
        "01" + "00" * 31,  # u = 1, order 4
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",  # order 8
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # p - 1
    ],
)
def test_small_order_public_key_is_rejected_naming_the_member(public_hex: str) -> None:
    ids, privs, members = make_group(3)
    bad_id = ids[2]
    members[2] = GroupMember(bad_id, bytes.fromhex(public_hex))
    with pytest.raises(WeakMaskKeyError, match="small order") as info:
        MaskingContext(ids[0], privs[0], members, NONCE, 0, DEFAULT_PARAMS)
    assert info.value.node_id == bad_id
    assert bad_id.hex() in str(info.value)


# --- keystream words ----------------------------------------------------------------------


def test_mask_words_are_the_rfc8439_chacha20_keystream() -> None:
    # RFC 8439 appendix A.1, test vectors 1 and 2: zero key, zero nonce, counter 0 and 1
    block0 = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28")
    block1 = bytes.fromhex("9f07e7be5551387a98ba977c732d080d")
    seed = bytes(32)
    assert mask_words(seed, 0, 2, 64).tolist() == [
        int.from_bytes(block0[:8], "little"),
        int.from_bytes(block0[8:], "little"),
    ]
    assert mask_words(seed, 16, 18, 32).tolist() == [
        int.from_bytes(block1[:4], "little"),
        int.from_bytes(block1[4:8], "little"),
    ]


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    start=st.integers(0, 600),
    length=st.integers(0, 300),
    seed=st.binary(min_size=32, max_size=32),
)
def test_a_range_of_mask_words_equals_the_slice_of_the_full_mask(
    bits: int, start: int, length: int, seed: bytes
) -> None:
    full_bytes = (
        Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None)
        .encryptor()
        .update(bytes(900 * bits // 8))
    )
    full = np.frombuffer(full_bytes, np.dtype(f"<u{bits // 8}"))
    words = mask_words(seed, start, start + length, bits)
    assert words.dtype == np.dtype(f"u{bits // 8}")
    assert np.array_equal(words, full[start : start + length])


def test_mask_range_limits_are_checked_before_allocating() -> None:
    assert max_mask_words(64) == 2**35 and max_mask_words(32) == 2**36
    with pytest.raises(SecureAggregationError, match="block counter must not wrap"):
        mask_words(bytes(32), 2**35 - 1, 2**35 + 1, 64)
    # the last words below the limit are fine (they use block counter 2**32 - 1)
    assert mask_words(bytes(32), 2**35 - 2, 2**35, 64).shape == (2,)
    with pytest.raises(SecureAggregationError, match="stop must be"):
        mask_words(bytes(32), 5, 4, 64)
    with pytest.raises(SecureAggregationError, match="bits must be 32 or 64"):
        mask_words(bytes(32), 0, 4, 16)
    with pytest.raises(SecureAggregationError, match="seed must be 32 bytes"):
        mask_words(bytes(31), 0, 4, 64)


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, PARAMS_32], ids=["64", "32"])
def test_mask_vector_ranges_equal_slices_across_chunk_boundaries(params: FixedPointParams) -> None:
    ctx = contexts(4, params)[1]
    n = 150_001  # several internal chunks
    full = ctx.mask_vector(n)
    for start, stop in [(0, 1), (1, 9), (32_767, 32_770), (65_531, 140_003), (149_990, n)]:
        assert np.array_equal(ctx.mask_vector(stop - start, start), full[start:stop])


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, PARAMS_32], ids=["64", "32"])
def test_masks_of_a_whole_group_cancel(params: FixedPointParams) -> None:
    ctxs = contexts(6, params)
    masks = [c.mask_vector(70_001, start=123) for c in ctxs]
    assert all(np.any(m != 0) for m in masks)
    assert not np.any(sum_contributions(masks))


def test_sharded_masking_equals_masking_the_whole_contribution() -> None:
    # the butterfly all-reduce masks and sends one shard at a time
    ctx = contexts(5)[2]
    x = np.random.default_rng(3).standard_normal(10_007).astype(np.float32)
    whole = ctx.masked_contribution(x, 12, np.random.default_rng(5))
    plain = make_contribution(x, 12, DEFAULT_PARAMS, np.random.default_rng(5))
    bounds = [int(b) for b in np.linspace(0, plain.size, 6)]
    shards = [ctx.mask_range(plain[a:b], a) for a, b in itertools.pairwise(bounds)]
    assert np.array_equal(np.concatenate(shards), whole)
    untouched = make_contribution(x, 12, DEFAULT_PARAMS, np.random.default_rng(5))
    assert np.array_equal(plain, untouched)  # mask_range copies unless in_place=True
    assert ctx.mask_range(plain, 0, in_place=True) is plain
    assert np.array_equal(plain, whole)


# --- the group property -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(params=st.sampled_from([DEFAULT_PARAMS, PARAMS_32]), data=st.data())
def test_masked_contributions_sum_to_the_plaintext_sum(
    params: FixedPointParams, data: st.DataObject
) -> None:
    k = data.draw(st.integers(3, 32), label="k")
    d = data.draw(st.integers(1, 40), label="d")
    label = data.draw(st.binary(min_size=1, max_size=8), label="label")
    round = data.draw(st.integers(0, 2**64 - 1), label="round")
    nonce = data.draw(st.binary(min_size=32, max_size=32), label="nonce")
    bound = float(np.float32(params.clip * 1.25))
    xs = data.draw(
        hnp.arrays(np.float32, (k, d), elements=st.floats(-bound, bound, width=32)), label="xs"
    )
    weights = data.draw(
        st.lists(st.integers(1, params.max_weight), min_size=k, max_size=k), label="weights"
    )
    seeds = data.draw(st.lists(st.integers(0, 2**32), min_size=k, max_size=k), label="seeds")

    ctxs = contexts(k, params, label, nonce, round)
    masked = [
        c.masked_contribution(xs[i], weights[i], np.random.default_rng(seeds[i]))
        for i, c in enumerate(ctxs)
    ]
    plain = [
        make_contribution(xs[i], weights[i], params, np.random.default_rng(seeds[i]))
        for i in range(k)
    ]
    for m, p in zip(masked, plain, strict=True):
        assert not np.array_equal(m, p)
    total = sum_contributions(masked)
    assert np.array_equal(total, sum_contributions(plain))  # exact integer equality

    mean, weight = decode_group_sum(total, params)
    assert weight == sum(weights)
    clipped = np.clip(xs.astype(np.float64), -params.clip, params.clip)
    w = np.array(weights, np.float64)
    expected = (w[:, None] * clipped).sum(axis=0) / w.sum()
    # numpy's float64 sum of k products adds at most k * 2**-52 relative rounding
    slack = k * 2.0**-52 * (np.abs(w[:, None] * clipped).sum(axis=0) / w.sum())
    assert np.all(
        np.abs(mean.astype(np.float64) - expected) <= error_bound(params, expected) + slack
    )


def test_a_dropped_contribution_leaves_garbage() -> None:
    ctxs = contexts(5)
    rng = np.random.default_rng(8)
    xs = rng.standard_normal((5, 1000)).astype(np.float32)
    masked = [
        c.masked_contribution(xs[i], 10, np.random.default_rng(i)) for i, c in enumerate(ctxs)
    ]
    plain = [
        make_contribution(xs[i], 10, DEFAULT_PARAMS, np.random.default_rng(i)) for i in range(5)
    ]
    partial = sum_contributions(masked[:4])  # member 4 dropped out
    # the masks member 4 shared with the others do not cancel: every word is off
    assert np.count_nonzero(partial == sum_contributions(plain[:4])) == 0
    with pytest.raises(InvalidGroupSumError, match="abort the group"):
        decode_group_sum(partial, DEFAULT_PARAMS)
    # the complete group decodes fine
    decode_group_sum(sum_contributions(masked), DEFAULT_PARAMS)


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, PARAMS_32], ids=["64", "32"])
def test_a_single_masked_contribution_looks_uniform(params: FixedPointParams) -> None:
    bits = params.bits
    x = (np.random.default_rng(4).standard_normal(2**16 - 1) * 0.1).astype(np.float32)
    # small values make the top 4 bits of every plaintext word 0 or 15: an obvious pattern
    plain = make_contribution(x, 16, params, np.random.default_rng(1))
    masked = contexts(3, params)[0].masked_contribution(x, 16, np.random.default_rng(1))
    top4 = lambda v: v >> np.array(bits - 4, v.dtype)  # noqa: E731
    low4 = lambda v: v & np.array(15, v.dtype)  # noqa: E731
    as_bytes = lambda v: np.frombuffer(contribution_to_bytes(v, params), np.uint8)  # noqa: E731
    for extract, bins in [(top4, 16), (low4, 16), (as_bytes, 256)]:
        threshold = chi2_threshold(bins - 1)
        assert chi2_statistic(extract(masked), bins) < threshold
    for extract, bins in [(top4, 16), (as_bytes, 256)]:
        # power: the same test rejects the unmasked encoding by a wide margin (its low bits
        # are those of stochastically rounded values, nearly uniform already)
        assert chi2_statistic(extract(plain), bins) > 10 * chi2_threshold(bins - 1)


# --- validation -----------------------------------------------------------------------------


def test_context_validation() -> None:
    ids, privs, members = make_group(4)

    def build(**kw: object) -> MaskingContext:
        args: dict[str, object] = {
            "my_id": ids[0],
            "my_private_key": privs[0],
            "members": members,
            "nonce": NONCE,
            "round": 0,
            "params": DEFAULT_PARAMS,
        }
        args.update(kw)
        return MaskingContext(**args)  # type: ignore[arg-type]

    build()
    with pytest.raises(SecureAggregationError, match="not a member"):
        build(my_id=bytes(32))
    with pytest.raises(SecureAggregationError, match="appears twice"):
        build(members=[*members, GroupMember(ids[1], members[2].mask_public_key)])
    with pytest.raises(SecureAggregationError, match="between 3 and"):
        build(members=members[:2])
    small = FixedPointParams(max_group_size=3)
    with pytest.raises(SecureAggregationError, match="max_group_size=3 members, got 4"):
        build(params=small)
    with pytest.raises(SecureAggregationError, match="does not match"):
        build(my_private_key=privs[1])
    with pytest.raises(SecureAggregationError, match="group nonce must be 32 bytes"):
        build(nonce=bytes(16))
    for bad_round in (-1, 2**64, True):
        with pytest.raises(SecureAggregationError, match="round"):
            build(round=bad_round)
    with pytest.raises(SecureAggregationError, match="node_id must be 32 bytes"):
        GroupMember(b"short", bytes(32))
    with pytest.raises(SecureAggregationError, match="GroupMember values"):
        build(members=[(m.node_id, m.mask_public_key) for m in members])


def test_members_are_sorted_and_seeds_are_in_id_order() -> None:
    ctx = contexts(6)[3]
    ids = [m.node_id for m in ctx.members]
    assert ids == sorted(ids)
    assert list(ctx.pair_seeds()) == [i for i in ids if i in ctx.pair_seeds()]


def test_mask_inputs_are_checked() -> None:
    ctx = contexts(3)[0]
    with pytest.raises(SecureAggregationError, match="dtype uint64"):
        ctx.mask_range(np.zeros(3, np.uint32), 0)
    with pytest.raises(SecureAggregationError, match="length"):
        ctx.mask_vector(-1)
    with pytest.raises(SecureAggregationError, match="at most"):
        ctx.mask_vector(2, 2**35 - 1)
    with pytest.raises(SecureAggregationError, match="differ"):
        sum_contributions([np.zeros(3, np.uint64), np.zeros(4, np.uint64)])
    with pytest.raises(SecureAggregationError, match="nothing to sum"):
        sum_contributions([])
    assert ctx.mask_vector(0).shape == (0,)


def test_masked_contribution_can_reuse_a_buffer() -> None:
    ctx = contexts(3)[1]
    x = np.random.default_rng(6).standard_normal(40_000).astype(np.float32)
    fresh = ctx.masked_contribution(x, 4, np.random.default_rng(9))
    buffer = np.full(x.size + 1, 12345, np.uint64)  # stale content must not leak through
    reused = ctx.masked_contribution(x, 4, np.random.default_rng(9), out=buffer)
    assert reused is buffer
    assert np.array_equal(reused, fresh)
    with pytest.raises(SecureAggregationError, match="40001 words"):
        ctx.masked_contribution(x, 4, np.random.default_rng(9), out=np.empty(x.size, np.uint64))
    with pytest.raises(SecureAggregationError, match="1-D"):
        ctx.masked_contribution(x.reshape(200, 200), 4, np.random.default_rng(9))
