"""The Noise Protocol Framework, revision 34 (2018-07-11), sans-IO.

This module is a direct transcription of the spec's processing rules
(https://noiseprotocol.org/noise.html): :class:`CipherState`, :class:`SymmetricState` and
:class:`HandshakeState` follow sections 5.1-5.3 function by function, with the pre-shared
key rules of section 9. It does no I/O and reads no clock; the only randomness (ephemeral
keys) comes from the injected ``randbytes`` callable.

Supported protocol names, ``Noise_<pattern>_<dh>_<cipher>_<hash>``:

* DH functions: ``25519`` (X25519), ``448`` (X448);
* ciphers: ``ChaChaPoly`` (ChaCha20-Poly1305, nonce = 4 zero bytes then the 64-bit
  counter little-endian), ``AESGCM`` (AES-256-GCM, nonce = 4 zero bytes then the counter
  big-endian);
* hashes: ``SHA256``, ``SHA512``, ``BLAKE2s``, ``BLAKE2b``;
* patterns: the one-way ``N K X``, the fundamental interactive
  ``NN NK NX KN KK KX XN XK XX IN IK IX`` and the deferred ``NK1 NX1 X1N X1K XK1 X1K1 X1X
  XX1 X1X1 K1N K1K KK1 K1K1 K1X KX1 K1X1 I1N I1K IK1 I1K1 I1X IX1 I1X1`` (section 7);
* modifiers: any combination of ``psk0`` ... ``pskN`` joined by ``+`` (``NNpsk0+psk2``).

Not supported (``NoiseError`` from :meth:`NoiseProtocol.from_name`): ``fallback``,
``hfs`` and any other modifier, other DH, cipher or hash names.

A handshake, then transport messages::

    >>> i_priv, i_pub = generate_keypair()
    >>> r_priv, r_pub = generate_keypair()
    >>> psk = bytes(32)
    >>> ini = HandshakeState("Noise_XXpsk3_25519_ChaChaPoly_SHA256", initiator=True,
    ...                      s=i_priv, psks=[psk])
    >>> res = HandshakeState("Noise_XXpsk3_25519_ChaChaPoly_SHA256", initiator=False,
    ...                      s=r_priv, psks=[psk])
    >>> res.read_message(ini.write_message())
    b''
    >>> ini.read_message(res.write_message(b"hello"))
    b'hello'
    >>> res.read_message(ini.write_message())
    b''
    >>> ini.complete and res.complete and ini.remote_static == r_pub
    True
    >>> a, b = ini.transport(), res.transport()
    >>> b.decrypt(a.encrypt(b"model bytes"))
    b'model bytes'

Errors: :class:`~p2pfed.errors.NoiseError` for misuse, invalid state, unsupported names and
malformed (too long, too short) messages; :class:`~p2pfed.errors.NoiseDecryptError` (a
subclass) when a ciphertext fails authentication. After any error in
:meth:`HandshakeState.read_message` or :meth:`HandshakeState.write_message` the handshake
has failed (spec section 5.3) and every later call on it raises ``NoiseError``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x448 import X448PrivateKey, X448PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from p2pfed.errors import NoiseDecryptError, NoiseError

__all__ = [
    "KEY_LEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "MAX_PLAINTEXT_LEN",
    "NOISE_REVISION",
    "PATTERNS",
    "PSK_LEN",
    "TAG_LEN",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "NoiseProtocol",
    "NoiseTransport",
    "SymmetricState",
    "generate_keypair",
    "public_key",
]

NOISE_REVISION = 34
MAX_MESSAGE_LEN = 65535
"""Largest Noise message, handshake or transport, in bytes (spec section 3)."""
TAG_LEN = 16
"""Authentication tag appended by every AEAD encryption."""
MAX_PLAINTEXT_LEN = MAX_MESSAGE_LEN - TAG_LEN
"""Largest plaintext one transport message can carry (65519 bytes)."""
KEY_LEN = 32
"""Cipher key length of every Noise cipher."""
PSK_LEN = 32
"""Pre-shared keys are exactly 32 bytes (spec section 9.1)."""
MAX_NONCE = 2**64 - 1
"""Reserved nonce: never used to encrypt a message, only by :meth:`CipherState.rekey`."""
MAX_PROTOCOL_NAME_LEN = 255

RandBytes = Callable[[int], bytes]
BytesLike = bytes | bytearray | memoryview
"""Inputs may be any contiguous byte buffer (a memoryview slice avoids a copy)."""


# --------------------------------------------------------------------------------------
# Crypto function tables (spec section 4). Adding an algorithm means adding a row here.
# --------------------------------------------------------------------------------------


def _x25519_exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    return private.exchange(X25519PublicKey.from_public_bytes(public))


def _x448_exchange(private: X448PrivateKey, public: bytes) -> bytes:
    return private.exchange(X448PublicKey.from_public_bytes(public))


def _public_of(private: Any) -> bytes:
    return private.public_key().public_bytes_raw()


@dataclass(frozen=True)
class _DhSpec:
    dhlen: int
    # Loading a private key computes its public key (about half the cost of a DH), so a
    # handshake loads each of its private keys once and keeps the key object.
    load: Callable[[bytes], Any]
    # DH(loaded private key, public key bytes) -> shared secret (spec section 4.1)
    exchange: Callable[[Any, bytes], bytes]
    public_of: Callable[[Any], bytes]

    def public(self, private: bytes) -> bytes:
        return self.public_of(self.load(private))


@dataclass(frozen=True)
class _CipherSpec:
    aead: Callable[[bytes], ChaCha20Poly1305 | AESGCM]
    # The 96-bit nonce: 32 zero bits then the 64-bit counter, in the cipher's byte order.
    pack_nonce: Callable[[int], bytes]


@dataclass(frozen=True)
class _HashSpec:
    hashlen: int
    new: Callable[..., Any]  # hashlib constructor, also the HMAC digestmod


_DH: dict[str, _DhSpec] = {
    "25519": _DhSpec(32, X25519PrivateKey.from_private_bytes, _x25519_exchange, _public_of),
    "448": _DhSpec(56, X448PrivateKey.from_private_bytes, _x448_exchange, _public_of),
}
_CIPHERS: dict[str, _CipherSpec] = {
    "ChaChaPoly": _CipherSpec(ChaCha20Poly1305, struct.Struct("<4xQ").pack),
    "AESGCM": _CipherSpec(AESGCM, struct.Struct(">4xQ").pack),
}
_HASHES: dict[str, _HashSpec] = {
    "SHA256": _HashSpec(32, hashlib.sha256),
    "SHA512": _HashSpec(64, hashlib.sha512),
    "BLAKE2s": _HashSpec(32, hashlib.blake2s),
    "BLAKE2b": _HashSpec(64, hashlib.blake2b),
}


@functools.lru_cache(maxsize=8192)
def _load_static(dh_name: str, private: bytes) -> Any:
    """A static private key as a key object, kept across handshakes.

    A node uses one static key for all its channels (p2pfed.channel.StaticKey); loading
    it once saves a scalar multiplication per handshake. The cache is large because
    simnet runs thousands of nodes in one process. Ephemeral keys are never cached.
    """
    return _DH[dh_name].load(private)


def _dh_spec(dh_name: str) -> _DhSpec:
    spec = _DH.get(dh_name)
    if spec is None:
        raise NoiseError(f"unsupported Noise DH function {dh_name!r}; supported: {sorted(_DH)}")
    return spec


def public_key(dh_name: str, private: bytes) -> bytes:
    """The public key (``dhlen`` bytes) of a private key for DH function ``dh_name``.

    RFC 7748 section 6.1, Alice's key pair:

    >>> alice = bytes.fromhex(
    ...     "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    >>> public_key("25519", alice).hex()
    '8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a'
    """
    spec = _dh_spec(dh_name)
    if len(private) != spec.dhlen:
        raise NoiseError(
            f"a {dh_name} private key is {spec.dhlen} bytes, got {len(private)}; "
            "pass the raw private key bytes"
        )
    return spec.public(bytes(private))


def generate_keypair(
    dh_name: str = "25519", randbytes: RandBytes = os.urandom
) -> tuple[bytes, bytes]:
    """A fresh ``(private, public)`` key pair for DH function ``dh_name``.

    >>> priv, pub = generate_keypair("25519")
    >>> len(priv), len(pub), public_key("25519", priv) == pub
    (32, 32, True)
    """
    spec = _dh_spec(dh_name)
    private = randbytes(spec.dhlen)
    if len(private) != spec.dhlen:
        raise NoiseError(f"randbytes({spec.dhlen}) returned {len(private)} bytes")
    return private, public_key(dh_name, private)


# --------------------------------------------------------------------------------------
# Handshake patterns (spec section 7), written as in the spec:
# name: (initiator pre-message, responder pre-message, message 1, message 2, ...).
# Messages alternate, initiator first.
# --------------------------------------------------------------------------------------

_PATTERN_TEXT: dict[str, tuple[str, ...]] = {
    # One-way (7.4)
    "N": ("", "s", "e, es"),
    "K": ("s", "s", "e, es, ss"),
    "X": ("", "s", "e, es, s, ss"),
    # Fundamental interactive (7.5)
    "NN": ("", "", "e", "e, ee"),
    "NK": ("", "s", "e, es", "e, ee"),
    "NX": ("", "", "e", "e, ee, s, es"),
    "KN": ("s", "", "e", "e, ee, se"),
    "KK": ("s", "s", "e, es, ss", "e, ee, se"),
    "KX": ("s", "", "e", "e, ee, se, s, es"),
    "XN": ("", "", "e", "e, ee", "s, se"),
    "XK": ("", "s", "e, es", "e, ee", "s, se"),
    "XX": ("", "", "e", "e, ee, s, es", "s, se"),
    "IN": ("", "", "e, s", "e, ee, se"),
    "IK": ("", "s", "e, es, s, ss", "e, ee, se"),
    "IX": ("", "", "e, s", "e, ee, se, s, es"),
    # Deferred (7.6)
    "NK1": ("", "s", "e", "e, ee, es"),
    "NX1": ("", "", "e", "e, ee, s", "es"),
    "X1N": ("", "", "e", "e, ee", "s", "se"),
    "X1K": ("", "s", "e, es", "e, ee", "s", "se"),
    "XK1": ("", "s", "e", "e, ee, es", "s, se"),
    "X1K1": ("", "s", "e", "e, ee, es", "s", "se"),
    "X1X": ("", "", "e", "e, ee, s, es", "s", "se"),
    "XX1": ("", "", "e", "e, ee, s", "es, s, se"),
    "X1X1": ("", "", "e", "e, ee, s", "es, s", "se"),
    "K1N": ("s", "", "e", "e, ee", "se"),
    "K1K": ("s", "s", "e, es", "e, ee", "se"),
    "KK1": ("s", "s", "e", "e, ee, se, es"),
    "K1K1": ("s", "s", "e", "e, ee, es", "se"),
    "K1X": ("s", "", "e", "e, ee, s, es", "se"),
    "KX1": ("s", "", "e", "e, ee, se, s", "es"),
    "K1X1": ("s", "", "e", "e, ee, s", "se, es"),
    "I1N": ("", "", "e, s", "e, ee", "se"),
    "I1K": ("", "s", "e, es, s", "e, ee", "se"),
    "IK1": ("", "s", "e, s", "e, ee, se, es"),
    "I1K1": ("", "s", "e, s", "e, ee, es", "se"),
    "I1X": ("", "", "e, s", "e, ee, s, es", "se"),
    "IX1": ("", "", "e, s", "e, ee, se, s", "es"),
    "I1X1": ("", "", "e, s", "e, ee, s", "se, es"),
}
_ONE_WAY = frozenset({"N", "K", "X"})


class HandshakePattern(NamedTuple):
    """A handshake pattern: pre-message tokens of each side and the message token lists."""

    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",")) if text else ()


PATTERNS: dict[str, HandshakePattern] = {
    name: HandshakePattern(_tokens(ipre), _tokens(rpre), tuple(_tokens(m) for m in msgs))
    for name, (ipre, rpre, *msgs) in _PATTERN_TEXT.items()
}
"""Every supported base pattern (without modifiers), by name."""

_PSK_MODIFIER = re.compile(r"psk(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class NoiseProtocol:
    """A parsed Noise protocol name, with its pattern expanded (psk tokens inserted).

    >>> p = NoiseProtocol.from_name("Noise_NNpsk0+psk2_448_AESGCM_BLAKE2b")
    >>> p.pattern_name, p.dh_name, p.cipher_name, p.hash_name, p.dhlen, p.hashlen
    ('NNpsk0+psk2', '448', 'AESGCM', 'BLAKE2b', 56, 64)
    >>> p.messages
    (('psk', 'e'), ('e', 'ee', 'psk'))
    """

    name: str
    pattern_name: str
    dh_name: str
    cipher_name: str
    hash_name: str
    dhlen: int
    hashlen: int
    base_pattern: str
    psk_count: int
    one_way: bool
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    @classmethod
    def from_name(cls, name: str) -> NoiseProtocol:
        """Parse ``Noise_<pattern>_<dh>_<cipher>_<hash>``; ``NoiseError`` if unsupported."""
        if len(name.encode("utf-8")) > MAX_PROTOCOL_NAME_LEN:
            raise NoiseError(f"Noise protocol name longer than {MAX_PROTOCOL_NAME_LEN} bytes")
        parts = name.split("_")
        if len(parts) != 5 or parts[0] != "Noise":
            raise NoiseError(
                f"{name!r} is not a Noise protocol name; expected "
                "Noise_<pattern>_<dh>_<cipher>_<hash>, e.g. Noise_XX_25519_ChaChaPoly_SHA256"
            )
        _, pattern_name, dh_name, cipher_name, hash_name = parts
        dh = _dh_spec(dh_name)
        if cipher_name not in _CIPHERS:
            raise NoiseError(
                f"unsupported Noise cipher {cipher_name!r}; supported: {sorted(_CIPHERS)}"
            )
        hash_spec = _HASHES.get(hash_name)
        if hash_spec is None:
            raise NoiseError(f"unsupported Noise hash {hash_name!r}; supported: {sorted(_HASHES)}")

        # The base pattern is upper-case letters and digits; modifiers start lower-case.
        split = next((i for i, c in enumerate(pattern_name) if c.islower()), len(pattern_name))
        base, modifier_text = pattern_name[:split], pattern_name[split:]
        pattern = PATTERNS.get(base)
        if pattern is None:
            raise NoiseError(
                f"unsupported Noise handshake pattern {base!r} in {name!r}; "
                f"supported: {' '.join(PATTERNS)}"
            )
        messages = [list(m) for m in pattern.messages]
        seen: set[int] = set()
        for modifier in modifier_text.split("+") if modifier_text else ():
            match = _PSK_MODIFIER.fullmatch(modifier)
            if match is None:
                raise NoiseError(
                    f"unsupported Noise pattern modifier {modifier!r} in {name!r}; "
                    "only psk0, psk1, ... are supported"
                )
            position = int(match.group(1))
            if position in seen:
                raise NoiseError(f"modifier {modifier!r} appears twice in {name!r}")
            if position > len(messages):
                raise NoiseError(
                    f"modifier {modifier!r} in {name!r}: pattern {base} has only "
                    f"{len(messages)} message(s)"
                )
            seen.add(position)
            # Section 9.2: psk0 opens the first message, pskN closes message N.
            if position == 0:
                messages[0].insert(0, "psk")
            else:
                messages[position - 1].append("psk")
        return cls(
            name=name,
            pattern_name=pattern_name,
            dh_name=dh_name,
            cipher_name=cipher_name,
            hash_name=hash_name,
            dhlen=dh.dhlen,
            hashlen=hash_spec.hashlen,
            base_pattern=base,
            psk_count=len(seen),
            one_way=base in _ONE_WAY,
            initiator_pre=pattern.initiator_pre,
            responder_pre=pattern.responder_pre,
            messages=tuple(tuple(m) for m in messages),
        )


@functools.lru_cache(maxsize=64)
def _protocol_named(name: str) -> NoiseProtocol:
    """:meth:`NoiseProtocol.from_name`, parsed once per name: every handshake names its
    protocol, and parsing it was a measurable share of a channel's set-up."""
    return NoiseProtocol.from_name(name)


# --------------------------------------------------------------------------------------
# CipherState (spec 5.1)
# --------------------------------------------------------------------------------------


class CipherState:
    """A cipher key ``k`` (possibly empty) and a 64-bit nonce ``n`` (spec section 5.1).

    The AEAD object is built once per key, so encrypting a message costs one nonce pack
    and one AEAD call.

    >>> c = CipherState("ChaChaPoly")
    >>> c.initialize_key(bytes(32))
    >>> d = CipherState("ChaChaPoly")
    >>> d.initialize_key(bytes(32))
    >>> d.decrypt_with_ad(b"ad", c.encrypt_with_ad(b"ad", b"hi"))
    b'hi'
    """

    __slots__ = ("_aead", "_cipher_name", "_key", "_n", "_pack_nonce", "_spec")

    def __init__(self, cipher_name: str = "ChaChaPoly") -> None:
        spec = _CIPHERS.get(cipher_name)
        if spec is None:
            raise NoiseError(
                f"unsupported Noise cipher {cipher_name!r}; supported: {sorted(_CIPHERS)}"
            )
        self._spec = spec
        self._cipher_name = cipher_name
        self._pack_nonce = spec.pack_nonce
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | AESGCM | None = None
        self._n = 0

    @property
    def cipher_name(self) -> str:
        """The cipher this state uses (``ChaChaPoly`` or ``AESGCM``)."""
        return self._cipher_name

    def initialize_key(self, key: bytes | None) -> None:
        """Set ``k`` (32 bytes, or ``None`` for empty) and reset the nonce to 0."""
        if key is None:
            self._key = None
            self._aead = None
        else:
            if len(key) != KEY_LEN:
                raise NoiseError(f"a Noise cipher key is {KEY_LEN} bytes, got {len(key)}")
            self._key = bytes(key)
            self._aead = self._spec.aead(self._key)
        self._n = 0

    def has_key(self) -> bool:
        """Whether ``k`` is non-empty (otherwise encryption is the identity)."""
        return self._aead is not None

    def set_nonce(self, nonce: int) -> None:
        """Set ``n``, e.g. for out-of-order transport messages (spec section 11.4)."""
        if not 0 <= nonce <= MAX_NONCE:
            raise NoiseError(f"a Noise nonce is in [0, 2^64-1], got {nonce}")
        self._n = nonce

    @property
    def nonce(self) -> int:
        """The nonce the next encryption or decryption will use."""
        return self._n

    def _next_nonce(self) -> int:
        n = self._n
        if n >= MAX_NONCE:
            raise NoiseError(
                "Noise nonce exhausted (2^64-1 messages under one key); "
                "this session must be replaced by a new handshake"
            )
        return n

    @staticmethod
    def _check_plaintext(plaintext: BytesLike) -> None:
        if len(plaintext) > MAX_PLAINTEXT_LEN:
            raise NoiseError(
                f"plaintext of {len(plaintext)} bytes exceeds the Noise limit of "
                f"{MAX_PLAINTEXT_LEN}; split it into several messages"
            )

    @staticmethod
    def _check_ciphertext(ciphertext: BytesLike) -> None:
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise NoiseError(
                f"ciphertext of {len(ciphertext)} bytes exceeds the Noise limit of "
                f"{MAX_MESSAGE_LEN}"
            )
        if len(ciphertext) < TAG_LEN:
            raise NoiseDecryptError(
                f"ciphertext of {len(ciphertext)} bytes is shorter than the "
                f"{TAG_LEN}-byte authentication tag (truncated message)"
            )

    @staticmethod
    def _not_authentic(n: int) -> NoiseDecryptError:
        return NoiseDecryptError(
            f"Noise ciphertext failed authentication at nonce {n} "
            "(wrong key, tampered or reordered message)"
        )

    def encrypt_with_ad(self, ad: BytesLike, plaintext: BytesLike) -> bytes:
        """``ENCRYPT(k, n++, ad, plaintext)``, or ``plaintext`` itself if ``k`` is empty."""
        aead = self._aead
        if aead is None:
            return bytes(plaintext)
        n = self._next_nonce()
        self._check_plaintext(plaintext)
        ciphertext = aead.encrypt(self._pack_nonce(n), plaintext, ad)
        self._n = n + 1
        return ciphertext

    def encrypt_into(self, ad: BytesLike, plaintext: BytesLike, out: memoryview) -> int:
        """:meth:`encrypt_with_ad` writing into ``out`` (``len(plaintext) + 16`` bytes).

        For bulk transfer: the caller reuses one buffer instead of allocating a new
        ciphertext per message. Requires a key. Returns the number of bytes written.
        """
        aead = self._aead
        if aead is None:
            raise NoiseError("encrypt_into needs a cipher key (the handshake is not done)")
        n = self._next_nonce()
        self._check_plaintext(plaintext)
        written = aead.encrypt_into(self._pack_nonce(n), plaintext, ad, out)
        self._n = n + 1
        return written

    def decrypt_with_ad(self, ad: BytesLike, ciphertext: BytesLike) -> bytes:
        """``DECRYPT(k, n++, ad, ciphertext)``, or ``ciphertext`` itself if ``k`` is empty.

        Raises :class:`~p2pfed.errors.NoiseDecryptError` if authentication fails; the
        nonce is then not advanced.
        """
        aead = self._aead
        if aead is None:
            return bytes(ciphertext)
        n = self._next_nonce()
        self._check_ciphertext(ciphertext)
        try:
            plaintext = aead.decrypt(self._pack_nonce(n), ciphertext, ad)
        except InvalidTag:
            raise self._not_authentic(n) from None
        self._n = n + 1
        return plaintext

    def decrypt_into(self, ad: BytesLike, ciphertext: BytesLike, out: memoryview) -> int:
        """:meth:`decrypt_with_ad` writing the plaintext into ``out`` (``len - 16`` bytes).

        Lets a receiver decrypt straight into the buffer of the message being reassembled.
        If authentication fails, ``out`` holds garbage and ``NoiseDecryptError`` is raised.
        """
        aead = self._aead
        if aead is None:
            raise NoiseError("decrypt_into needs a cipher key (the handshake is not done)")
        n = self._next_nonce()
        self._check_ciphertext(ciphertext)
        try:
            written = aead.decrypt_into(self._pack_nonce(n), ciphertext, ad, out)
        except InvalidTag:
            raise self._not_authentic(n) from None
        self._n = n + 1
        return written

    def rekey(self) -> None:
        """``k = REKEY(k)``: the first 32 bytes of encrypting 32 zeros at nonce 2^64-1.

        The nonce is unchanged (spec section 11.3); both sides must rekey at the same
        point of their message streams.
        """
        aead = self._aead
        if aead is None:
            raise NoiseError("cannot rekey a CipherState that has no key")
        new_key = aead.encrypt(self._pack_nonce(MAX_NONCE), bytes(32), b"")[:KEY_LEN]
        self._key = new_key
        self._aead = self._spec.aead(new_key)


# --------------------------------------------------------------------------------------
# SymmetricState (spec 5.2)
# --------------------------------------------------------------------------------------


class SymmetricState:
    """Chaining key ``ck``, handshake hash ``h`` and a :class:`CipherState` (spec 5.2)."""

    def __init__(self, protocol: NoiseProtocol) -> None:
        self._protocol = protocol
        self._hash = _HASHES[protocol.hash_name].new
        self._hashlen = protocol.hashlen
        name = protocol.name.encode("ascii")
        if len(name) <= self._hashlen:
            self._h = name + bytes(self._hashlen - len(name))
        else:
            self._h = self._hash(name).digest()
        self._ck = self._h
        self.cipher_state = CipherState(protocol.cipher_name)

    @property
    def h(self) -> bytes:
        """The handshake hash so far."""
        return self._h

    def _hkdf(self, input_key_material: bytes, outputs: int) -> list[bytes]:
        # Section 4.3: HKDF built from HMAC-HASH with the chaining key as salt, no info.
        temp_key = hmac.digest(self._ck, input_key_material, self._hash)
        out: list[bytes] = []
        previous = b""
        for i in range(1, outputs + 1):
            previous = hmac.digest(temp_key, previous + bytes([i]), self._hash)
            out.append(previous)
        return out

    def mix_key(self, input_key_material: bytes) -> None:
        """``ck, temp_k = HKDF(ck, ikm, 2)``; key the cipher with ``temp_k[:32]``."""
        self._ck, temp_k = self._hkdf(input_key_material, 2)
        self.cipher_state.initialize_key(temp_k[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        """``h = HASH(h || data)``."""
        self._h = self._hash(self._h + data).digest()

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """``ck, temp_h, temp_k = HKDF(ck, ikm, 3)``; ``MixHash(temp_h)``; key the cipher."""
        self._ck, temp_h, temp_k = self._hkdf(input_key_material, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(temp_k[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: BytesLike) -> bytes:
        """Encrypt with ``h`` as associated data, then mix the ciphertext into ``h``."""
        ciphertext = self.cipher_state.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with ``h`` as associated data, then mix the ciphertext into ``h``."""
        plaintext = self.cipher_state.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Two transport CipherStates: (initiator to responder, responder to initiator)."""
        temp_k1, temp_k2 = self._hkdf(b"", 2)
        c1 = CipherState(self._protocol.cipher_name)
        c1.initialize_key(temp_k1[:KEY_LEN])
        c2 = CipherState(self._protocol.cipher_name)
        c2.initialize_key(temp_k2[:KEY_LEN])
        return c1, c2


# --------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------


class NoiseTransport:
    """The two CipherStates of one side after the handshake: ``send`` and ``receive``.

    Transport messages use empty associated data. In a one-way pattern (N, K, X) only the
    initiator sends; the responder's :meth:`encrypt` and the initiator's :meth:`decrypt`
    raise ``NoiseError``.
    """

    __slots__ = ("_can_receive", "_can_send", "receive", "send")

    def __init__(
        self,
        send: CipherState,
        receive: CipherState,
        *,
        can_send: bool = True,
        can_receive: bool = True,
    ) -> None:
        self.send = send
        self.receive = receive
        self._can_send = can_send
        self._can_receive = can_receive

    def encrypt(self, plaintext: BytesLike) -> bytes:
        """One transport message (at most :data:`MAX_PLAINTEXT_LEN` bytes of plaintext)."""
        if not self._can_send:
            raise NoiseError("the responder of a one-way Noise pattern cannot send")
        return self.send.encrypt_with_ad(b"", plaintext)

    def decrypt(self, ciphertext: BytesLike) -> bytes:
        """The plaintext of one transport message; ``NoiseDecryptError`` if not authentic."""
        if not self._can_receive:
            raise NoiseError("the initiator of a one-way Noise pattern cannot receive")
        return self.receive.decrypt_with_ad(b"", ciphertext)


# --------------------------------------------------------------------------------------
# HandshakeState (spec 5.3)
# --------------------------------------------------------------------------------------

_DH_TOKENS = frozenset({"ee", "es", "se", "ss"})
# For a DH token "xy" the initiator combines its key x with the responder's key y, and the
# responder its key y with the initiator's key x: both compute the same shared secret.


class HandshakeState:
    """One side of a Noise handshake (spec section 5.3).

    Keys are raw bytes: ``s`` and ``e`` are this side's PRIVATE keys, ``rs`` and ``re``
    the peer's PUBLIC keys, given only where the pattern's pre-messages need them (for
    example ``rs`` for the initiator of ``IK``). ``e`` fixes the ephemeral key and exists
    for test vectors only. ``psks`` are the 32-byte pre-shared keys in the order the
    pattern's psk tokens use them.
    """

    def __init__(
        self,
        protocol: str | NoiseProtocol,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
        randbytes: RandBytes = os.urandom,
    ) -> None:
        proto = protocol if isinstance(protocol, NoiseProtocol) else _protocol_named(protocol)
        self._protocol = proto
        self._initiator = initiator
        self._dhspec = _DH[proto.dh_name]
        self._randbytes = randbytes
        role = "initiator" if initiator else "responder"

        self._loaded: dict[str, Any] = {}  # "s", "e": the private keys as key objects
        self._s = self._private_key(s, "s") if s is not None else None
        self._s_pub = self._dhspec.public_of(self._key_object("s")) if s is not None else None
        self._e = self._private_key(e, "e") if e is not None else None
        self._rs = self._public_key(rs, "rs") if rs is not None else None
        self._re = self._public_key(re, "re") if re is not None else None

        if isinstance(psks, bytes | bytearray | memoryview):
            raise NoiseError("psks= takes a sequence of 32-byte keys, e.g. psks=[psk], not a key")
        psk_list = [bytes(p) for p in psks]
        if len(psk_list) != proto.psk_count:
            raise NoiseError(
                f"{proto.name} uses {proto.psk_count} pre-shared key(s), {len(psk_list)} given"
            )
        for p in psk_list:
            if len(p) != PSK_LEN:
                raise NoiseError(f"a Noise pre-shared key is {PSK_LEN} bytes, got {len(p)}")
        self._psks = psk_list
        self._next_psk = 0

        self._check_keys(role)

        self._symmetric = SymmetricState(proto)
        self._symmetric.mix_hash(bytes(prologue))
        # Pre-messages: the initiator's first, then the responder's (section 5.3).
        for pre_tokens, from_initiator in (
            (proto.initiator_pre, True),
            (proto.responder_pre, False),
        ):
            local = from_initiator == initiator
            for token in pre_tokens:
                if token == "s":
                    key = self._s_pub if local else self._rs
                elif local:  # "e"
                    key = self._dhspec.public_of(self._key_object("e")) if self._e else None
                else:
                    key = self._re
                assert key is not None  # guaranteed by _check_keys
                self._symmetric.mix_hash(key)
                if token == "e" and proto.psk_count:
                    self._symmetric.mix_key(key)

        self._message_index = 0
        self._failed: str | None = None
        self._split: tuple[CipherState, CipherState] | None = None
        self._transport: NoiseTransport | None = None

    # -- key handling ------------------------------------------------------------------

    def _private_key(self, key: bytes, what: str) -> bytes:
        if len(key) != self._dhspec.dhlen:
            raise NoiseError(
                f"{what}: a {self._protocol.dh_name} private key is {self._dhspec.dhlen} bytes, "
                f"got {len(key)}"
            )
        return bytes(key)

    def _public_key(self, key: bytes, what: str) -> bytes:
        if len(key) != self._dhspec.dhlen:
            raise NoiseError(
                f"{what}: a {self._protocol.dh_name} public key is {self._dhspec.dhlen} bytes, "
                f"got {len(key)}"
            )
        return bytes(key)

    def _key_object(self, which: str) -> Any:
        """This side's private key ``"s"`` or ``"e"``, loaded once per handshake."""
        key = self._loaded.get(which)
        if key is None:
            private = self._s if which == "s" else self._e
            assert private is not None  # callers check
            if which == "s":
                key = _load_static(self._protocol.dh_name, private)
            else:
                key = self._dhspec.load(private)
            self._loaded[which] = key
        return key

    def _check_keys(self, role: str) -> None:
        """Fail at construction, not mid-handshake, when a needed key is missing."""
        proto = self._protocol
        mine_pre, theirs_pre = (
            (proto.initiator_pre, proto.responder_pre)
            if self._initiator
            else (proto.responder_pre, proto.initiator_pre)
        )
        if "s" in mine_pre and self._s is None:
            raise NoiseError(f"{proto.name}: the {role} needs its static key: pass s=")
        if "e" in mine_pre and self._e is None:
            raise NoiseError(f"{proto.name}: the {role} needs its ephemeral key: pass e=")
        if "s" in theirs_pre and self._rs is None:
            raise NoiseError(
                f"{proto.name}: the {role} must know the peer's static public key: pass rs="
            )
        if "e" in theirs_pre and self._re is None:
            raise NoiseError(
                f"{proto.name}: the {role} must know the peer's ephemeral public key: pass re="
            )
        if self._rs is not None and "s" not in theirs_pre:
            raise NoiseError(
                f"{proto.name}: rs= was given, but in this pattern the peer's static key is "
                "not known in advance (it is sent during the handshake); read it from "
                "remote_static after the handshake instead"
            )
        if self._re is not None and "e" not in theirs_pre:
            raise NoiseError(f"{proto.name}: re= was given, but no pre-message carries it")
        # This side's static key is used if it sends "s" or takes part in a DH with it.
        side = 0 if self._initiator else 1
        my_messages = proto.messages[side::2]
        uses_static = any("s" in tokens for tokens in my_messages) or any(
            token in _DH_TOKENS and token[side] == "s"
            for tokens in proto.messages
            for token in tokens
        )
        if uses_static and self._s is None:
            raise NoiseError(f"{proto.name}: the {role} needs a static key: pass s=")

    def _dh(self, token: str) -> bytes:
        local_name, remote_name = (token[0], token[1]) if self._initiator else (token[1], token[0])
        local = self._s if local_name == "s" else self._e
        remote = self._rs if remote_name == "s" else self._re
        if local is None or remote is None:
            # Unreachable for the built-in patterns and checked keys; kept as a clear error.
            raise NoiseError(f"token {token!r}: a key it needs is not available yet")
        try:
            return self._dhspec.exchange(self._key_object(local_name), remote)
        except ValueError as exc:
            raise NoiseError(
                f"DH for token {token!r} failed: the peer sent an invalid (low-order) public key"
            ) from exc

    # -- state ---------------------------------------------------------------------------

    @property
    def protocol(self) -> NoiseProtocol:
        """The parsed protocol this handshake runs."""
        return self._protocol

    @property
    def initiator(self) -> bool:
        """Whether this side is the initiator."""
        return self._initiator

    @property
    def complete(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._message_index >= len(self._protocol.messages)

    @property
    def is_my_turn(self) -> bool:
        """Whether the next handshake step is :meth:`write_message` (False once complete)."""
        if self.complete:
            return False
        return (self._message_index % 2 == 0) == self._initiator

    @property
    def handshake_hash(self) -> bytes:
        """``h``: after completion, a unique identifier of this session (channel binding)."""
        return self._symmetric.h

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static PUBLIC key, once known (pre-message or received)."""
        return self._rs

    @property
    def local_static_public(self) -> bytes | None:
        """This side's static PUBLIC key, if it has one."""
        return self._s_pub

    def _check_can_act(self, writing: bool) -> None:
        if self._failed is not None:
            raise NoiseError(
                f"this Noise handshake already failed ({self._failed}); start a new one"
            )
        role = "initiator" if self._initiator else "responder"
        if self.complete:
            raise NoiseError(
                f"the Noise handshake is complete; use transport() for further messages "
                f"({role} tried to {'write' if writing else 'read'} a handshake message)"
            )
        if writing != self.is_my_turn:
            action, expected = ("write", "read") if writing else ("read", "write")
            raise NoiseError(
                f"not the {role}'s turn to {action}: handshake message "
                f"{self._message_index + 1} of {len(self._protocol.messages)} is for the "
                f"{role} to {expected}"
            )

    def _layout(self, tokens: tuple[str, ...]) -> tuple[int, bool]:
        """Bytes the tokens occupy and whether the payload gets encrypted.

        Whether a key exists at each point depends only on the tokens (any DH or psk
        token keys the cipher, and so does "e" in a PSK handshake), so lengths are known
        before anything is processed.
        """
        has_key = self._symmetric.cipher_state.has_key()
        dhlen = self._protocol.dhlen
        psk = self._protocol.psk_count > 0
        size = 0
        for token in tokens:
            if token == "e":
                size += dhlen
                has_key = has_key or psk
            elif token == "s":
                size += dhlen + (TAG_LEN if has_key else 0)
            else:  # DH tokens and "psk"
                has_key = True
        return size, has_key

    # -- messages ------------------------------------------------------------------------

    def write_message(self, payload: BytesLike = b"") -> bytes:
        """The next handshake message, carrying ``payload`` (encrypted once a key exists)."""
        self._check_can_act(writing=True)
        tokens = self._protocol.messages[self._message_index]
        size, encrypted = self._layout(tokens)
        total = size + len(payload) + (TAG_LEN if encrypted else 0)
        if total > MAX_MESSAGE_LEN:
            raise NoiseError(
                f"handshake message would be {total} bytes, over the Noise limit of "
                f"{MAX_MESSAGE_LEN}; send a smaller payload"
            )
        try:
            out = bytearray()
            sym = self._symmetric
            for token in tokens:
                if token == "e":
                    if self._e is None:
                        self._e = self._private_key(self._randbytes(self._dhspec.dhlen), "e")
                    e_pub = self._dhspec.public_of(self._key_object("e"))
                    out += e_pub
                    sym.mix_hash(e_pub)
                    if self._protocol.psk_count:
                        sym.mix_key(e_pub)
                elif token == "s":
                    assert self._s_pub is not None  # guaranteed by _check_keys
                    out += sym.encrypt_and_hash(self._s_pub)
                elif token == "psk":
                    sym.mix_key_and_hash(self._psks[self._next_psk])
                    self._next_psk += 1
                else:
                    sym.mix_key(self._dh(token))
            out += sym.encrypt_and_hash(payload)
        except NoiseError as exc:
            self._failed = str(exc)
            raise
        self._message_index += 1
        return bytes(out)

    def read_message(self, message: BytesLike) -> bytes:
        """Process the peer's next handshake message; return its payload.

        Raises ``NoiseError`` if the message is too long or too short for its tokens, and
        ``NoiseDecryptError`` if it fails authentication. Either way the handshake has
        failed.
        """
        self._check_can_act(writing=False)
        if len(message) > MAX_MESSAGE_LEN:
            self._failed = "received message over the size limit"
            raise NoiseError(
                f"handshake message of {len(message)} bytes exceeds the Noise limit of "
                f"{MAX_MESSAGE_LEN}"
            )
        tokens = self._protocol.messages[self._message_index]
        size, encrypted = self._layout(tokens)
        minimum = size + (TAG_LEN if encrypted else 0)
        if len(message) < minimum:
            self._failed = "received a truncated message"
            raise NoiseError(
                f"handshake message {self._message_index + 1} of {self._protocol.name} is "
                f"{len(message)} bytes, shorter than the {minimum} its tokens "
                f"({', '.join(tokens)}) need: truncated or not a Noise message"
            )
        dhlen = self._dhspec.dhlen
        sym = self._symmetric
        view = memoryview(message)
        offset = 0
        try:
            for token in tokens:
                if token == "e":
                    if self._re is not None:
                        raise NoiseError("received a second ephemeral key from the peer")
                    self._re = bytes(view[offset : offset + dhlen])
                    offset += dhlen
                    sym.mix_hash(self._re)
                    if self._protocol.psk_count:
                        sym.mix_key(self._re)
                elif token == "s":
                    if self._rs is not None:
                        raise NoiseError("received a second static key from the peer")
                    length = dhlen + (TAG_LEN if sym.cipher_state.has_key() else 0)
                    self._rs = sym.decrypt_and_hash(bytes(view[offset : offset + length]))
                    offset += length
                elif token == "psk":
                    sym.mix_key_and_hash(self._psks[self._next_psk])
                    self._next_psk += 1
                else:
                    sym.mix_key(self._dh(token))
            payload = sym.decrypt_and_hash(bytes(view[offset:]))
        except NoiseError as exc:
            self._failed = str(exc)
            raise
        self._message_index += 1
        return payload

    # -- after the handshake -------------------------------------------------------------

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport CipherStates (initiator to responder, responder to initiator).

        Computed once: later calls return the same objects, so nonces are never reused.
        """
        if self._split is None:
            if self._failed is not None:
                raise NoiseError(f"this Noise handshake failed ({self._failed})")
            if not self.complete:
                raise NoiseError(
                    f"the Noise handshake is not complete ({self._message_index} of "
                    f"{len(self._protocol.messages)} messages processed); cannot split"
                )
            self._split = self._symmetric.split()
            self._e = None  # the ephemeral private key is no longer needed
        return self._split

    def transport(self) -> NoiseTransport:
        """This side's send and receive CipherStates, after the handshake is complete."""
        if self._transport is None:
            c1, c2 = self.split()
            one_way = self._protocol.one_way
            if self._initiator:
                self._transport = NoiseTransport(c1, c2, can_receive=not one_way)
            else:
                self._transport = NoiseTransport(c2, c1, can_send=not one_way)
        return self._transport
