"""Pairwise masks of secure aggregation: seeds from X25519 + HKDF, words from ChaCha20.

Spec: spec/secure-aggregation.md, section "Mask derivation". Pure code: no I/O, no clock;
the only randomness is the ``randbytes`` of :func:`generate_mask_keypair` and the rounding
generator passed to :meth:`MaskingContext.masked_contribution`.

Every pair of group members ``(i, j)`` shares a 32-byte seed::

    seed = HKDF-SHA256(IKM = X25519(priv_i, pub_j), salt = group nonce (32 bytes),
                       info = b"p2pfed-mask-seed/v1" || round (u64 big-endian)
                              || id_low (32 bytes) || id_high (32 bytes), L = 32)

with ``id_low < id_high`` the two node ids compared as bytes, so both sides derive the same
seed. The mask is the ChaCha20 keystream of that seed (12-byte nonce all zero, 32-bit block
counter from 0) read as little-endian ``bits``-bit words; word ``m`` masks coordinate
``m``, so any coordinate range can be generated alone. Member ``i`` adds the mask it shares
with every member whose id sorts after its own and subtracts the others, modulo
``2**bits``; summed over the whole group every mask appears once with each sign and
cancels.

Example (three members mask their contributions; the ring sum decodes to the weighted
mean)::

    >>> import numpy as np
    >>> from p2pfed.fixedpoint import FixedPointParams, decode_group_sum
    >>> params = FixedPointParams()
    >>> keys = [generate_mask_keypair() for _ in range(3)]
    >>> ids = [bytes([n]) * 32 for n in (1, 2, 3)]
    >>> group = [GroupMember(i, pub) for i, (_, pub) in zip(ids, keys)]
    >>> nonce, rng = bytes(32), np.random.default_rng(0)
    >>> parts = [
    ...     MaskingContext(i, priv, group, nonce, 0, params).masked_contribution(
    ...         np.full(4, float(n), np.float32), 1, rng)
    ...     for n, (i, (priv, _)) in enumerate(zip(ids, keys))]
    >>> mean, weight = decode_group_sum(sum_contributions(parts), params)
    >>> mean.tolist(), weight
    ([1.0, 1.0, 1.0, 1.0], 3)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pfed.errors import SecureAggregationError, WeakMaskKeyError
from p2pfed.fixedpoint import FixedPointParams, contribution_buffer, iter_encode_into

__all__ = [
    "CHACHA20_NONCE",
    "GROUP_NONCE_BYTES",
    "MASK_SEED_INFO_PREFIX",
    "MIN_GROUP_SIZE",
    "NODE_ID_BYTES",
    "GroupMember",
    "MaskingContext",
    "generate_mask_keypair",
    "mask_public_key",
    "mask_seed_info",
    "mask_words",
    "max_mask_words",
    "pair_seed",
    "sum_contributions",
]

MASK_SEED_INFO_PREFIX = b"p2pfed-mask-seed/v1"
"""Domain-separation prefix of the HKDF ``info`` string of a pair seed."""
CHACHA20_NONCE = bytes(12)
"""The 12-byte ChaCha20 nonce of every mask: zero (each seed is used for one mask only)."""
NODE_ID_BYTES = 32
GROUP_NONCE_BYTES = 32
KEY_BYTES = 32
MIN_GROUP_SIZE = 3
"""A group of two would reveal the other member's contribution to each member."""
_BLOCK_BYTES = 64
_MAX_BLOCKS = 1 << 32  # the ChaCha20 block counter is 32 bits and must not wrap
_CHUNK_BYTES = 1 << 18
"""Keystream bytes generated per step: big enough to amortise calls, small enough for L2."""


def generate_mask_keypair(
    randbytes: Callable[[int], bytes] = os.urandom,
) -> tuple[bytes, bytes]:
    """A fresh X25519 mask key pair ``(private 32 bytes, public 32 bytes)``.

    Use a fresh pair per group (or at least per node start); the public half is announced
    to the group, the private half never leaves the node.
    """
    private = randbytes(KEY_BYTES)
    if len(private) != KEY_BYTES:
        raise SecureAggregationError(
            f"randbytes({KEY_BYTES}) returned {len(private)} bytes, expected {KEY_BYTES}"
        )
    return private, mask_public_key(private)


def mask_public_key(private_key: bytes) -> bytes:
    """The X25519 public key (32 bytes) of a raw 32-byte private key."""
    _check_bytes("mask private key", private_key, KEY_BYTES)
    key = X25519PrivateKey.from_private_bytes(private_key)
    return key.public_key().public_bytes_raw()


def mask_seed_info(round: int, id_a: bytes, id_b: bytes) -> bytes:
    """The HKDF ``info`` of a pair seed: prefix, round (u64 BE), lower id, higher id.

    The two ids may be given in either order.
    """
    _check_round(round)
    _check_bytes("node id", id_a, NODE_ID_BYTES)
    _check_bytes("node id", id_b, NODE_ID_BYTES)
    if id_a == id_b:
        raise SecureAggregationError("a pair seed needs two different node ids")
    low, high = sorted((id_a, id_b))
    return MASK_SEED_INFO_PREFIX + round.to_bytes(8, "big") + low + high


def pair_seed(
    my_private_key: bytes,
    my_id: bytes,
    peer_public_key: bytes,
    peer_id: bytes,
    nonce: bytes,
    round: int,
) -> bytes:
    """The 32-byte mask seed this member shares with one peer (equal on both sides).

    Raises :class:`~p2pfed.errors.WeakMaskKeyError` if the peer's public key has small
    order (an all-zero X25519 shared secret, which would make the mask public).
    """
    _check_bytes("mask private key", my_private_key, KEY_BYTES)
    _check_bytes("group nonce", nonce, GROUP_NONCE_BYTES)
    private = X25519PrivateKey.from_private_bytes(my_private_key)
    return _pair_seed(private, my_id, peer_public_key, peer_id, nonce, round)


def _pair_seed(
    private: X25519PrivateKey,
    my_id: bytes,
    peer_public_key: bytes,
    peer_id: bytes,
    nonce: bytes,
    round: int,
) -> bytes:
    """:func:`pair_seed` with the private key loaded (a group loads it once, not per pair)."""
    _check_bytes("mask public key", peer_public_key, KEY_BYTES)
    info = mask_seed_info(round, my_id, peer_id)
    weak = WeakMaskKeyError(
        f"the mask public key {peer_public_key.hex()} of member {peer_id.hex()} has small "
        "order (all-zero X25519 shared secret); the member is faulty or malicious: "
        "exclude it and regroup",
        peer_id,
    )
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError:  # OpenSSL refuses to output the all-zero secret
        raise weak from None
    if shared == bytes(len(shared)):
        raise weak
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=info)
    return hkdf.derive(shared)


def max_mask_words(bits: int) -> int:
    """The most mask words one seed yields: the 32-bit block counter allows 2**38 bytes."""
    _check_bits(bits)
    return _MAX_BLOCKS * _BLOCK_BYTES // (bits // 8)


def _keystream(seed: bytes, start: int, word_bytes: int) -> CipherContext:
    """A ChaCha20 encryptor whose next keystream byte is that of word ``start``."""
    block, skip = divmod(start * word_bytes, _BLOCK_BYTES)
    nonce16 = block.to_bytes(4, "little") + CHACHA20_NONCE
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce16), mode=None).encryptor()
    if skip:
        encryptor.update(bytes(skip))  # discard the leading part of a partial block
    return encryptor


def _check_range(start: int, stop: int, bits: int) -> None:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise SecureAggregationError(f"start must be a non-negative int, got {start!r}")
    if isinstance(stop, bool) or not isinstance(stop, int) or stop < start:
        raise SecureAggregationError(f"stop must be an int >= start={start}, got {stop!r}")
    limit = max_mask_words(bits)
    if stop > limit:
        raise SecureAggregationError(
            f"coordinates up to {stop} requested, but a {bits}-bit mask has at most {limit} "
            "words (the ChaCha20 block counter must not wrap); split the model"
        )


def mask_words(seed: bytes, start: int, stop: int, bits: int) -> np.ndarray:
    """Words ``[start, stop)`` of the mask expanded from ``seed``, as uint32/uint64.

    Word ``m`` is bytes ``[m*bits/8, (m+1)*bits/8)`` of the ChaCha20 keystream (key =
    seed, 12-byte nonce = zero, block counter from 0), read little-endian. Any range can
    be generated alone and equals the same slice of a longer expansion.

    >>> seed = bytes(32)
    >>> bool((mask_words(seed, 5, 9, 64) == mask_words(seed, 0, 9, 64)[5:]).all())
    True
    """
    _check_bytes("seed", seed, 32)
    _check_bits(bits)
    _check_range(start, stop, bits)
    word_bytes = bits // 8
    out = np.empty(stop - start, np.dtype(f"<u{word_bytes}"))
    if out.size:
        enc = _keystream(seed, start, word_bytes)
        enc.update_into(bytes(out.nbytes), out.view(np.uint8).data)
    return out.astype(np.dtype(f"u{word_bytes}"), copy=False)


@dataclass(frozen=True)
class GroupMember:
    """A group member as the masking needs it: 32-byte node id and X25519 mask public key."""

    node_id: bytes
    mask_public_key: bytes

    def __post_init__(self) -> None:
        _check_bytes("GroupMember.node_id", self.node_id, NODE_ID_BYTES)
        _check_bytes("GroupMember.mask_public_key", self.mask_public_key, KEY_BYTES)


class MaskingContext:
    """One member's masking state for one group and round.

    ``members`` is the whole group including this node, in any order; ids must be unique,
    the group size between 3 and ``params.max_group_size``, and ``my_private_key`` must
    match this node's announced ``mask_public_key``. ``nonce`` is the group's fresh
    32-byte nonce and ``round`` the aggregation round (``0 <= round < 2**64``). All pair
    seeds are derived at construction, so a small-order key fails here
    (:class:`~p2pfed.errors.WeakMaskKeyError` naming the member).
    """

    def __init__(
        self,
        my_id: bytes,
        my_private_key: bytes,
        members: Sequence[GroupMember],
        nonce: bytes,
        round: int,
        params: FixedPointParams,
    ) -> None:
        _check_bytes("my_id", my_id, NODE_ID_BYTES)
        _check_bytes("my_private_key", my_private_key, KEY_BYTES)
        _check_bytes("group nonce", nonce, GROUP_NONCE_BYTES)
        _check_round(round)
        if not isinstance(params, FixedPointParams):
            raise SecureAggregationError(
                f"params must be FixedPointParams, got {type(params).__name__}"
            )
        members = list(members)
        for member in members:
            if not isinstance(member, GroupMember):
                raise SecureAggregationError(
                    f"members must be GroupMember values, got {type(member).__name__}"
                )
        ids = [m.node_id for m in members]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise SecureAggregationError(f"node id {dup.hex()} appears twice in the group")
        if not MIN_GROUP_SIZE <= len(members) <= params.max_group_size:
            raise SecureAggregationError(
                f"a group must have between {MIN_GROUP_SIZE} and max_group_size="
                f"{params.max_group_size} members, got {len(members)}"
            )
        mine = [m for m in members if m.node_id == my_id]
        if not mine:
            raise SecureAggregationError(f"my id {my_id.hex()} is not a member of the group")
        private = X25519PrivateKey.from_private_bytes(my_private_key)
        if mine[0].mask_public_key != private.public_key().public_bytes_raw():
            raise SecureAggregationError(
                "my_private_key does not match my mask_public_key in the member list; "
                "announce the public key of the private key used here"
            )
        self._my_id = my_id
        self._params = params
        self._members = tuple(sorted(members, key=lambda m: m.node_id))
        # (peer id, +1 if the peer sorts after me else -1, seed), in id order
        self._pairs: list[tuple[bytes, int, bytes]] = [
            (
                m.node_id,
                1 if m.node_id > my_id else -1,
                _pair_seed(private, my_id, m.mask_public_key, m.node_id, nonce, round),
            )
            for m in self._members
            if m.node_id != my_id
        ]

    @property
    def params(self) -> FixedPointParams:
        """The fixed-point parameters (ring size) of this group."""
        return self._params

    @property
    def members(self) -> tuple[GroupMember, ...]:
        """The group, sorted by node id."""
        return self._members

    def pair_seeds(self) -> dict[bytes, bytes]:
        """Peer node id -> the 32-byte seed shared with that peer, in id order. Secret."""
        return {peer: seed for peer, _, seed in self._pairs}

    def mask_vector(self, length: int, start: int = 0) -> np.ndarray:
        """This member's total mask for coordinates ``[start, start + length)``.

        It is the ring sum of ``+mask(i, j)`` for peers ``j`` after this node in id order
        and ``-mask(i, j)`` for peers before it.
        """
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise SecureAggregationError(f"length must be a non-negative int, got {length!r}")
        _check_range(start, start + length, self._params.bits)
        out = np.zeros(length, self._params.dtype)
        self._apply(out, start)
        return out

    def mask_range(self, words: np.ndarray, start: int, *, in_place: bool = False) -> np.ndarray:
        """``words`` (coordinates ``[start, start + len(words))``) plus this member's mask.

        With ``in_place=True`` the array is modified and returned; otherwise a copy is.
        """
        if not isinstance(words, np.ndarray) or words.ndim != 1:
            raise SecureAggregationError("words must be a 1-D numpy array of ring elements")
        if words.dtype != self._params.dtype:
            raise SecureAggregationError(
                f"words must have dtype {self._params.dtype} for a {self._params.bits}-bit "
                f"ring, got {words.dtype}"
            )
        _check_range(start, start + words.shape[0], self._params.bits)
        target = words if in_place else words.copy()
        self._apply(target, start)
        return target

    def masked_contribution(
        self,
        x: np.ndarray,
        weight: int | np.integer[Any],
        rng: np.random.Generator,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Encode ``x`` with ``weight`` (see :func:`~p2pfed.fixedpoint.make_contribution`)
        and add this member's mask to all ``len(x) + 1`` words.

        ``out`` optionally supplies the result buffer (``len(x) + 1`` words), so that a
        node can reuse one buffer round after round.
        """
        if not isinstance(x, np.ndarray) or x.ndim != 1:
            raise SecureAggregationError(
                "expected a 1-D numpy float32 array; flatten the model with x.ravel()"
            )
        _check_range(0, x.shape[0] + 1, self._params.bits)
        words = contribution_buffer(x.shape[0], self._params, out)
        # same result as make_contribution + mask_range, but each chunk is masked right
        # after it is encoded, while it is still in cache
        chunks = iter_encode_into(x, weight, self._params, rng, words[:-1])
        stream = _MaskStream(self._pairs, 0, self._params.word_bytes)
        for a, b in chunks:
            stream.add_to(words[a:b])
        words[-1] = weight
        stream.add_to(words[-1:])
        return words

    def _apply(self, target: np.ndarray, start: int) -> None:
        """Add the signed pairwise masks to ``target`` (coordinates from ``start``) in place."""
        stream = _MaskStream(self._pairs, start, self._params.word_bytes)
        for a in range(0, target.shape[0], stream.chunk_words):
            stream.add_to(target[a : a + stream.chunk_words])


class _MaskStream:
    """The signed sum of pairwise masks, applied to consecutive slices of a vector.

    Each call masks the next ``len(part)`` coordinates: the keystream of every pair is
    generated into one cache-sized buffer and added to (or subtracted from) ``part``
    straight away, so ``part`` stays in cache across all pairs.
    """

    def __init__(self, pairs: Sequence[tuple[bytes, int, bytes]], start: int, word_bytes: int):
        self._streams = [(sign, _keystream(seed, start, word_bytes)) for _, sign, seed in pairs]
        self._word_bytes = word_bytes
        self.chunk_words = _CHUNK_BYTES // word_bytes
        self._zeros = memoryview(bytes(_CHUNK_BYTES))
        self._buf = np.empty(self.chunk_words, np.dtype(f"<u{word_bytes}"))
        self._raw = self._buf.view(np.uint8).data

    def add_to(self, part: np.ndarray) -> None:
        for a in range(0, part.shape[0], self.chunk_words):
            piece = part[a : a + self.chunk_words]
            m = piece.shape[0]
            nbytes = m * self._word_bytes
            words = self._buf[:m]
            for sign, enc in self._streams:
                enc.update_into(self._zeros[:nbytes], self._raw[:nbytes])
                if sign > 0:
                    np.add(piece, words, out=piece)
                else:
                    np.subtract(piece, words, out=piece)


def sum_contributions(contributions: Sequence[np.ndarray]) -> np.ndarray:
    """The ring sum (mod ``2**bits``) of equally long uint32 or uint64 vectors.

    Works on whole contributions or on any shard of them (the butterfly all-reduce sums
    one coordinate range of everyone's contribution).
    """
    if not contributions:
        raise SecureAggregationError("nothing to sum: no contributions given")
    first = contributions[0]
    for c in contributions:
        if not isinstance(c, np.ndarray) or c.ndim != 1 or c.dtype not in (np.uint32, np.uint64):
            raise SecureAggregationError("contributions must be 1-D uint32 or uint64 arrays")
        if c.dtype != first.dtype or c.shape != first.shape:
            raise SecureAggregationError(
                f"contributions differ in shape or ring: {first.dtype}{first.shape} vs "
                f"{c.dtype}{c.shape}"
            )
    total = first.copy()
    for c in contributions[1:]:
        np.add(total, c, out=total)
    return total


def _check_bytes(what: str, value: object, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise SecureAggregationError(f"{what} must be {length} bytes, got {got}")


def _check_round(round: object) -> None:
    if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round < 1 << 64:
        raise SecureAggregationError(f"round must be an int in [0, 2**64), got {round!r}")


def _check_bits(bits: object) -> None:
    if bits not in (32, 64) or isinstance(bits, bool):
        raise SecureAggregationError(f"bits must be 32 or 64, got {bits!r}")
