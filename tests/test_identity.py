"""Node identities: node id derivation and text forms, signatures, the key file."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from p2pfed.errors import ConfigError, NodeIdError
from p2pfed.identity import NodeId, NodeIdentity, load_identity, save_identity, verify_signature


def _seeded(seed: int) -> NodeIdentity:
    return NodeIdentity.from_private_bytes(hashlib.sha256(seed.to_bytes(4, "big")).digest())


# --- node ids ---------------------------------------------------------------------------------


def test_node_id_is_domain_separated_sha256_of_public_key() -> None:
    ident = _seeded(1)
    expected = hashlib.sha256(b"p2pfed-node-id:v1" + ident.public_key).digest()
    assert ident.node_id.raw == expected
    assert NodeId.from_public_key(ident.public_key) == ident.node_id


def test_node_id_text_round_trip_and_short_form() -> None:
    for seed in range(20):
        nid = _seeded(seed).node_id
        text = str(nid)
        assert len(text) == 52
        assert text == text.lower()
        assert "=" not in text
        assert base64.b32decode(text.upper() + "====") == nid.raw
        assert NodeId.parse(text) == nid
        assert NodeId.parse(text.upper()) == nid
        assert NodeId.parse(f"  {text}\n") == nid
        assert nid.short == text[:10]
        assert nid.short in repr(nid)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "52 base32 characters"),
        ("abc", "52 base32 characters"),
        ("a" * 53, "52 base32 characters"),
        ("a" * 10, "short id"),
        ("a" * 51 + "1", "a-z and 2-7"),
        ("a" * 51 + "!", "a-z and 2-7"),
        ("a" * 51 + "b", "non-zero unused bits"),  # 'b' = 00001: a trailing bit set
    ],
)
def test_node_id_parse_rejects_bad_text(text: str, fragment: str) -> None:
    with pytest.raises(NodeIdError, match=fragment):
        NodeId.parse(text)


def test_node_id_error_is_a_value_error_and_config_error() -> None:
    with pytest.raises(ValueError):
        NodeId.parse("nope")
    with pytest.raises(ConfigError):
        NodeId.parse("nope")


def test_node_id_requires_32_bytes() -> None:
    with pytest.raises(NodeIdError):
        NodeId(b"\x00" * 31)


def test_node_ids_are_ordered_by_bytes_and_hashable() -> None:
    ids = [_seeded(s).node_id for s in range(30)]
    assert [n.raw for n in sorted(ids)] == sorted(n.raw for n in ids)
    assert len(set(ids)) == 30
    assert len({*ids, *(NodeId(n.raw) for n in ids)}) == 30
    assert NodeId(bytes(32)) < NodeId(b"\x00" * 31 + b"\x01")


def test_node_id_is_immutable() -> None:
    nid = _seeded(0).node_id
    with pytest.raises(AttributeError):
        nid.raw = bytes(32)  # type: ignore[misc]


# --- keys and signatures ----------------------------------------------------------------------


def test_generate_uses_injected_randomness() -> None:
    seed = bytes(range(32))
    a = NodeIdentity.generate(lambda n: seed[:n])
    assert a.private_bytes() == seed
    assert NodeIdentity.from_private_bytes(seed).node_id == a.node_id
    assert NodeIdentity.generate().node_id != NodeIdentity.generate().node_id


def test_from_private_bytes_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NodeIdentity.from_private_bytes(b"short")


def test_repr_does_not_leak_private_key() -> None:
    ident = _seeded(3)
    assert ident.private_bytes().hex() not in repr(ident)
    assert ident.node_id.short in repr(ident)


def test_signature_verifies() -> None:
    ident = _seeded(4)
    sig = ident.sign(b"model update")
    assert len(sig) == 64
    assert verify_signature(ident.public_key, sig, b"model update")


def test_signature_rejects_tampered_data() -> None:
    ident = _seeded(5)
    sig = ident.sign(b"model update")
    assert not verify_signature(ident.public_key, sig, b"model updatE")
    assert not verify_signature(ident.public_key, sig, b"")


def test_signature_rejects_wrong_key() -> None:
    sig = _seeded(6).sign(b"data")
    assert not verify_signature(_seeded(7).public_key, sig, b"data")


def test_signature_rejects_garbage_without_raising() -> None:
    ident = _seeded(8)
    sig = bytearray(ident.sign(b"data"))
    sig[10] ^= 1
    assert not verify_signature(ident.public_key, bytes(sig), b"data")
    assert not verify_signature(ident.public_key, b"\x00" * 64, b"data")
    assert not verify_signature(ident.public_key, b"\xff" * 64, b"data")
    assert not verify_signature(ident.public_key, b"", b"data")
    assert not verify_signature(ident.public_key, ident.sign(b"data") + b"x", b"data")
    assert not verify_signature(b"\xff" * 32, ident.sign(b"data"), b"data")
    assert not verify_signature(b"", ident.sign(b"data"), b"data")
    assert not verify_signature(ident.public_key[:31], ident.sign(b"data"), b"data")


# --- key file ---------------------------------------------------------------------------------


def test_save_and_load_round_trip_with_mode_0600(tmp_path: Path) -> None:
    ident = _seeded(9)
    path = tmp_path / "identity.key"
    save_identity(path, ident)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----")
    loaded = load_identity(path)
    assert loaded.private_bytes() == ident.private_bytes()
    assert loaded.node_id == ident.node_id
    # The file is standard PKCS#8: other tools can read it.
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert (
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        == ident.public_key
    )


def test_load_missing_file_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="p2pfed init"):
        load_identity(tmp_path / "identity.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_load_refuses_loose_permissions(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, _seeded(10))
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=re.escape(f"chmod 600 {path}")):
        load_identity(path)


def test_load_accepts_owner_only_read(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, _seeded(11))
    os.chmod(path, 0o400)
    assert load_identity(path).node_id == _seeded(11).node_id


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        bytes(range(200)),
    ],
)
def test_load_corrupted_key_file_gives_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        load_identity(path)


def test_load_truncated_key_file_gives_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, _seeded(12))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="corrupt"):
        load_identity(path)


def test_load_refuses_non_ed25519_key(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="must be an Ed25519 key"):
        load_identity(path)


def test_load_refuses_huge_file_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    with open(path, "wb") as f:
        f.truncate(10 * 1024 * 1024)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="too large"):
        load_identity(path)


def test_load_refuses_directory(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_identity(path)


def test_node_ids_hash_and_compare_by_their_bytes_only() -> None:
    from p2pfed.identity import NodeId

    a, b, c = NodeId(bytes(32)), NodeId(bytes(32)), NodeId(bytes(31) + b"\x01")
    assert a == b and a is not b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != c and a < c and sorted([c, a]) == [b, c]
    assert a != bytes(32) and bytes(32) != a  # not equal to its raw bytes
