"""Node identities: an Ed25519 signing key, the node id derived from it, and the key file.

Normative description: spec/identity.md, "Identity and federations". In short:

* a node's identity is an Ed25519 key pair (RFC 8032);
* its node id is ``SHA-256(b"p2pfed-node-id:v1" || public_key)``, 32 bytes, ordered as bytes;
* the text form of a node id is the lowercase RFC 4648 base32 of those 32 bytes without
  padding (52 characters), and the short form is its first 10 characters;
* the private key lives in ``identity.key`` as an unencrypted PKCS#8 PEM file with mode 0600,
  and a key file readable by group or others is refused, as ssh refuses loose private keys.

Example::

    >>> ident = NodeIdentity.from_private_bytes(bytes(32))
    >>> sig = ident.sign(b"hello")
    >>> verify_signature(ident.public_key, sig, b"hello")
    True
    >>> NodeId.parse(str(ident.node_id)) == ident.node_id
    True
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from p2pfed.atomicfile import atomic_write_bytes
from p2pfed.errors import ConfigError, NodeIdError

__all__ = [
    "IDENTITY_FILE_NAME",
    "NODE_ID_DOMAIN",
    "NODE_ID_SHORT_LENGTH",
    "NODE_ID_SIZE",
    "NODE_ID_TEXT_LENGTH",
    "NodeId",
    "NodeIdError",
    "NodeIdentity",
    "has_ledger_marker",
    "load_identity",
    "mark_ledger_required",
    "save_identity",
    "verify_signature",
]

NODE_ID_DOMAIN = b"p2pfed-node-id:v1"
"""Prefix hashed before the public key, so a node id is never confused with another hash."""
NODE_ID_SIZE = 32
NODE_ID_TEXT_LENGTH = 52
"""ceil(256 / 5) base32 characters, no padding."""
NODE_ID_SHORT_LENGTH = 10
"""Characters of the short form: 50 bits, plenty to tell the nodes of one federation apart."""
IDENTITY_FILE_NAME = "identity.key"
"""File name of the identity key inside a node directory."""

PUBLIC_KEY_SIZE = 32
PRIVATE_KEY_SIZE = 32
SIGNATURE_SIZE = 64
# A PKCS#8 PEM Ed25519 key is 119 bytes; anything far larger is not a key file.
_MAX_KEY_FILE_SIZE = 16 * 1024
_BASE32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


@dataclass(frozen=True, order=True)
class NodeId:
    """The 32-byte id of a node: ``SHA-256(b"p2pfed-node-id:v1" || ed25519_public_key)``.

    Immutable, hashable and ordered by its bytes (the group protocol orders members by id).
    ``str(node_id)`` is the 52-character lowercase base32 text form; ``node_id.short`` its
    first 10 characters, for logs and humans.

    >>> nid = NodeId(bytes(32))
    >>> str(nid)
    'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'
    >>> nid.short
    'aaaaaaaaaa'
    """

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != NODE_ID_SIZE:
            raise NodeIdError(
                f"a node id is exactly {NODE_ID_SIZE} bytes, got "
                f"{len(self.raw) if isinstance(self.raw, bytes) else type(self.raw).__name__}"
            )

    # Node ids key every peer table, link map and group roster: the generated methods
    # build a tuple per call (hash and compare were 1.6% of a 1000-node simulation)
    def __hash__(self) -> int:
        return hash(self.raw)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is NodeId:
            return self.raw == other.raw
        return NotImplemented

    @classmethod
    def from_public_key(cls, public_key: bytes) -> NodeId:
        """The node id of a raw 32-byte Ed25519 public key."""
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise ValueError(
                f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}"
            )
        return cls(hashlib.sha256(NODE_ID_DOMAIN + bytes(public_key)).digest())

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse the 52-character text form (case-insensitive, surrounding spaces ignored).

        Only the canonical encoding is accepted: the 4 unused bits of the last character
        must be zero, so every node id has exactly one text form.
        """
        cleaned = text.strip().lower()
        if len(cleaned) != NODE_ID_TEXT_LENGTH:
            hint = (
                " (that looks like a short id: give the full id printed by `p2pfed id`)"
                if len(cleaned) == NODE_ID_SHORT_LENGTH
                else ""
            )
            raise NodeIdError(
                f"a node id is {NODE_ID_TEXT_LENGTH} base32 characters, got "
                f"{len(cleaned)}: {text!r}{hint}"
            )
        bad = sorted(set(cleaned) - _BASE32_ALPHABET)
        if bad:
            raise NodeIdError(
                f"a node id uses only the characters a-z and 2-7, {text!r} contains "
                f"{''.join(bad)!r}"
            )
        raw = base64.b32decode(cleaned.upper() + "====")
        node_id = cls(raw)
        if str(node_id) != cleaned:
            raise NodeIdError(
                f"{text!r} is not a canonical node id: its last character has non-zero "
                "unused bits (was it mistyped?)"
            )
        return node_id

    def __str__(self) -> str:
        return base64.b32encode(self.raw).decode("ascii").rstrip("=").lower()

    def __repr__(self) -> str:
        return f"NodeId({self.short}…)"

    @property
    def short(self) -> str:
        """The first 10 characters of the text form, for logs (not unique: never parse it)."""
        return str(self)[:NODE_ID_SHORT_LENGTH]

    @property
    def hex(self) -> str:
        """The 32 bytes as lowercase hex (the form used in test vectors)."""
        return self.raw.hex()


class NodeIdentity:
    """A node's Ed25519 signing key.

    >>> ident = NodeIdentity.generate()
    >>> len(ident.public_key), len(ident.sign(b"x"))
    (32, 64)
    """

    __slots__ = ("_key", "_node_id", "_public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public_key = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._node_id = NodeId.from_public_key(self._public_key)

    @classmethod
    def generate(cls, randbytes: Callable[[int], bytes] = os.urandom) -> NodeIdentity:
        """A fresh identity from 32 bytes of ``randbytes`` (the RFC 8032 private key seed)."""
        return cls.from_private_bytes(randbytes(PRIVATE_KEY_SIZE))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> NodeIdentity:
        """The identity whose RFC 8032 32-byte private key (seed) is ``raw``."""
        if len(raw) != PRIVATE_KEY_SIZE:
            raise ValueError(f"an Ed25519 private key is {PRIVATE_KEY_SIZE} bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(raw)))

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key (seed). Secret: never log or send it."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def node_id(self) -> NodeId:
        """This node's id, derived from :attr:`public_key`."""
        return self._node_id

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data`` (deterministic, RFC 8032)."""
        return self._key.sign(data)

    def __repr__(self) -> str:
        # Never include key material: reprs end up in logs and tracebacks.
        return f"NodeIdentity({self._node_id.short}…)"


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``.

    Returns False (never raises) for a key or signature of the wrong length, an invalid
    key encoding, or a signature that does not verify.
    """
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes(public_key))
        key.verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


def _private_key_pem(identity: NodeIdentity) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(identity.private_bytes())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


LEDGER_MARKER = (
    b"p2pfed-privacy-ledger: required. This identity has released data under differential "
    b"privacy; the node refuses to start without its privacy-ledger.json (spec/privacy.md, "
    b"section 5.3).\n"
)
"""Explanatory text (RFC 7468, section 5.2) written before the PEM block of ``identity.key``
when the node first releases under DP: it binds "this node has spent privacy budget" to the
identity, so deleting the ledger (and the checkpoint) cannot reset the budget."""


def has_ledger_marker(path: str | os.PathLike[str]) -> bool:
    """Whether the identity key file at ``path`` carries :data:`LEDGER_MARKER`."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE_SIZE + 1)
    except FileNotFoundError:
        return False
    return data.startswith(LEDGER_MARKER)


def mark_ledger_required(path: str | os.PathLike[str]) -> None:
    """Put :data:`LEDGER_MARKER` into the identity key file (atomically, durably, mode 0600).

    Idempotent. The key itself is unchanged: it is read back and checked before the file is
    rewritten, so a failure leaves the old file in place.
    """
    if has_ledger_marker(path):
        return
    identity = load_identity(path)
    atomic_write_bytes(path, LEDGER_MARKER + _private_key_pem(identity), mode=0o600)


def save_identity(path: str | os.PathLike[str], identity: NodeIdentity) -> None:
    """Write ``identity`` to ``path`` as unencrypted PKCS#8 PEM, mode 0600, atomically.

    An existing file is replaced: callers that must not lose an identity check first
    (``p2pfed init`` refuses without ``--force``).
    """
    atomic_write_bytes(path, _private_key_pem(identity), mode=0o600)


def load_identity(path: str | os.PathLike[str]) -> NodeIdentity:
    """Read the identity key file at ``path``.

    Raises :class:`~p2pfed.errors.ConfigError`, saying what to do, when the file is missing,
    is readable or writable by group or others (like ssh, a private key with loose
    permissions is refused: ``chmod 600 PATH``), or is not a PEM Ed25519 private key.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(
            f"{p}: no identity key file; run `p2pfed init {p.parent}` to create one"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the identity key file: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{p}: the identity key file is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{p}: permissions {stat.S_IMODE(st.st_mode):04o} are too open: the private key "
            f"must be readable only by its owner; run `chmod 600 {p}`"
        )
    if st.st_size > _MAX_KEY_FILE_SIZE:
        raise ConfigError(
            f"{p}: {st.st_size} bytes is far too large for an Ed25519 key file; "
            f"is this the right file? (`p2pfed init --force` makes a new identity)"
        )
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the identity key file: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{p}: not an unencrypted PEM (PKCS#8) Ed25519 private key; the file is corrupt "
            f"or is not a p2pfed identity. Restore it from a backup, or run "
            f"`p2pfed init --force {p.parent}` to make a new identity (the node id will change)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"{p}: the key is a {type(key).__name__.lstrip('_')}, but a p2pfed identity must be "
            f"an Ed25519 key; run `p2pfed init --force {p.parent}` to make one"
        )
    return NodeIdentity(key)
