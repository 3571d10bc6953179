"""The Noise implementation against the public cacophony vectors, and its error behaviour.

The vectors (``spec/vectors/noise/cacophony.txt``, a copy of the file published with the
``snow`` Rust implementation; provenance and licence in ``spec/vectors/noise/README.md``)
were produced by implementations independent of ours: every vector whose protocol name
:mod:`p2pfed.noise` supports is run, checking every handshake and transport ciphertext,
the handshake hash and both sides' decryption. The file is part of the repository, so its
absence is a failure, never a skip: a skipped vector test would let a checkout silently
run without the only check against other implementations.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pfed.errors import NoiseDecryptError, NoiseError
from p2pfed.noise import (
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    MAX_PLAINTEXT_LEN,
    PATTERNS,
    CipherState,
    HandshakeState,
    NoiseProtocol,
    NoiseTransport,
    generate_keypair,
    public_key,
)

VECTOR_FILE = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "noise" / "cacophony.txt"
VECTOR_SHA256 = "3bde7c09a6f349ee11c825c50fcc02649f8f02a47c857a459206b357f9386cae"
"""The digest of snow's tests/vectors/cacophony.txt that was copied (its README says so)."""
VECTOR_COUNT = 944
MISSING_REASON = (
    f"Noise test vectors not found at {VECTOR_FILE}: they are part of the repository; "
    "restore spec/vectors/noise/cacophony.txt from git (or from snow's tests/vectors/, see "
    "spec/vectors/noise/README.md)"
)
REQUIRED = (
    "Noise_XX_25519_ChaChaPoly_SHA256",
    "Noise_XXpsk3_25519_ChaChaPoly_SHA256",
    "Noise_NN_25519_ChaChaPoly_SHA256",
)


def _is_supported(name: str) -> bool:
    try:
        NoiseProtocol.from_name(name)
    except NoiseError:
        return False
    return True


def _load_vectors() -> list[dict[str, Any]] | None:
    if not VECTOR_FILE.exists():
        return None
    vectors: list[dict[str, Any]] = json.loads(VECTOR_FILE.read_text(encoding="utf-8"))["vectors"]
    return vectors


ALL_VECTORS = _load_vectors()
SUPPORTED = [(i, v) for i, v in enumerate(ALL_VECTORS or []) if _is_supported(v["protocol_name"])]
UNSUPPORTED_NAMES = sorted(
    {v["protocol_name"] for v in ALL_VECTORS or [] if not _is_supported(v["protocol_name"])}
)

if ALL_VECTORS is None:
    # one test case that fails (see test_cacophony_vector), rather than none at all
    VECTOR_PARAMS = [pytest.param(None, id="vector-file-missing")]
else:
    VECTOR_PARAMS = [pytest.param(v, id=f"{v['protocol_name']}-{i}") for i, v in SUPPORTED]


def _no_randomness(n: int) -> bytes:
    raise AssertionError("a vector test must use the fixed ephemeral keys, not randbytes")


def _hex(vector: dict[str, Any], key: str) -> bytes | None:
    value = vector.get(key)
    return None if value is None else bytes.fromhex(value)


def _side(vector: dict[str, Any], prefix: str, initiator: bool) -> HandshakeState:
    return HandshakeState(
        vector["protocol_name"],
        initiator=initiator,
        prologue=bytes.fromhex(vector[f"{prefix}_prologue"]),
        s=_hex(vector, f"{prefix}_static"),
        e=_hex(vector, f"{prefix}_ephemeral"),
        rs=_hex(vector, f"{prefix}_remote_static"),
        psks=[bytes.fromhex(p) for p in vector.get(f"{prefix}_psks", [])],
        randbytes=_no_randomness,
    )


# ---------------------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------------------


def test_vector_file_is_the_published_one() -> None:
    if not VECTOR_FILE.exists():
        pytest.fail(MISSING_REASON)
    digest = hashlib.sha256(VECTOR_FILE.read_bytes()).hexdigest()
    assert digest == VECTOR_SHA256, (
        f"{VECTOR_FILE} differs from the copy of snow's vectors recorded in its README; "
        "it is third-party data: restore it from git rather than editing it"
    )
    assert ALL_VECTORS is not None and len(ALL_VECTORS) == VECTOR_COUNT


def test_required_vectors_are_present_and_supported() -> None:
    if ALL_VECTORS is None:
        pytest.fail(MISSING_REASON)
    run_names = {v["protocol_name"] for _, v in SUPPORTED}
    for name in REQUIRED:
        assert name in run_names, f"vector for {name} missing from {VECTOR_FILE} or unsupported"
    # The inventory, for the record: this file holds only names we support.
    print(
        f"cacophony: {len(SUPPORTED)} of {len(ALL_VECTORS)} vectors run "
        f"({len(run_names)} protocol names); unsupported names: {UNSUPPORTED_NAMES}"
    )
    assert len(SUPPORTED) + sum(
        1 for v in ALL_VECTORS if v["protocol_name"] in UNSUPPORTED_NAMES
    ) == len(ALL_VECTORS)


@pytest.mark.parametrize("vector", VECTOR_PARAMS)
def test_cacophony_vector(vector: dict[str, Any] | None) -> None:
    if vector is None:
        pytest.fail(MISSING_REASON)
    ini = _side(vector, "init", initiator=True)
    res = _side(vector, "resp", initiator=False)
    one_way = ini.protocol.one_way
    ini_t: NoiseTransport | None = None
    res_t: NoiseTransport | None = None
    for index, message in enumerate(vector["messages"]):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        if not ini.complete:
            writer, reader = (ini, res) if index % 2 == 0 else (res, ini)
            assert writer.is_my_turn and not reader.is_my_turn
            assert writer.write_message(payload) == expected, f"message {index} ciphertext"
            assert reader.read_message(expected) == payload, f"message {index} payload"
            if ini.complete:
                assert res.complete
                assert ini.handshake_hash == bytes.fromhex(vector["handshake_hash"])
                assert res.handshake_hash == ini.handshake_hash
                ini_t, res_t = ini.transport(), res.transport()
            continue
        assert ini_t is not None and res_t is not None
        # One-way patterns only ever send from initiator to responder.
        sender, receiver = (ini_t, res_t) if one_way or index % 2 == 0 else (res_t, ini_t)
        assert sender.encrypt(payload) == expected, f"transport message {index} ciphertext"
        assert receiver.decrypt(expected) == payload, f"transport message {index} payload"
    assert ini.complete and res.complete
    # Static keys were learnt (or pre-known) correctly on both sides.
    if ini.local_static_public is not None:
        assert res.remote_static == ini.local_static_public
    if res.local_static_public is not None:
        assert ini.remote_static == res.local_static_public


# ---------------------------------------------------------------------------------------
# Protocol names
# ---------------------------------------------------------------------------------------


def test_protocol_name_parsing() -> None:
    p = NoiseProtocol.from_name("Noise_XXpsk0+psk3_25519_AESGCM_SHA512")
    assert (p.pattern_name, p.dh_name, p.cipher_name, p.hash_name) == (
        "XXpsk0+psk3",
        "25519",
        "AESGCM",
        "SHA512",
    )
    assert (p.dhlen, p.hashlen, p.psk_count, p.base_pattern) == (32, 64, 2, "XX")
    assert p.messages == (("psk", "e"), ("e", "ee", "s", "es"), ("s", "se", "psk"))
    assert NoiseProtocol.from_name("Noise_X1X1_448_ChaChaPoly_BLAKE2s").dhlen == 56


@pytest.mark.parametrize(
    "name",
    [
        "Noise_XXfallback_25519_ChaChaPoly_SHA256",
        "Noise_XXhfs_25519+Kyber1024_ChaChaPoly_SHA256",
        "Noise_XX_P256_ChaChaPoly_SHA256",
        "Noise_XX_25519_AESGCM128_SHA256",
        "Noise_XX_25519_ChaChaPoly_MD5",
        "Noise_ZZ_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk4_25519_ChaChaPoly_SHA256",
        "Noise_NNpsk0+psk0_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk01_25519_ChaChaPoly_SHA256",
        "NoiseXX_25519_ChaChaPoly_SHA256",
        "Noise_XX_25519_ChaChaPoly",
        "",
    ],
)
def test_unsupported_names_raise(name: str) -> None:
    with pytest.raises(NoiseError):
        NoiseProtocol.from_name(name)


def test_every_pattern_table_entry_alternates_and_uses_known_tokens() -> None:
    known = {"e", "s", "ee", "es", "se", "ss"}
    for name, pattern in PATTERNS.items():
        assert set(pattern.initiator_pre) <= {"e", "s"}, name
        assert set(pattern.responder_pre) <= {"e", "s"}, name
        for tokens in pattern.messages:
            assert tokens and set(tokens) <= known, name
        # Each party sends its e and s at most once (spec section 7.3).
        for side in (0, 1):
            sent = [t for m in pattern.messages[side::2] for t in m if t in ("e", "s")]
            assert len(sent) == len(set(sent)), name
        dhs = [t for m in pattern.messages for t in m if len(t) == 2]
        assert len(dhs) == len(set(dhs)), name


# ---------------------------------------------------------------------------------------
# Handshakes with random keys
# ---------------------------------------------------------------------------------------


def _handshake(
    name: str,
    *,
    ini_psks: list[bytes] | None = None,
    res_psks: list[bytes] | None = None,
    randbytes: Callable[[int], bytes] = os.urandom,
) -> tuple[HandshakeState, HandshakeState]:
    dh = NoiseProtocol.from_name(name).dh_name
    i_priv, _ = generate_keypair(dh, randbytes)
    r_priv, _ = generate_keypair(dh, randbytes)
    ini = HandshakeState(
        name, initiator=True, s=i_priv, psks=ini_psks or [], prologue=b"p2pfed", randbytes=randbytes
    )
    res = HandshakeState(
        name,
        initiator=False,
        s=r_priv,
        psks=res_psks or [],
        prologue=b"p2pfed",
        randbytes=randbytes,
    )
    return ini, res


def _run(ini: HandshakeState, res: HandshakeState) -> None:
    while not (ini.complete and res.complete):
        writer, reader = (ini, res) if ini.is_my_turn else (res, ini)
        reader.read_message(writer.write_message(b"payload"))


def test_xxpsk3_full_handshake_then_transport_both_ways() -> None:
    psk = os.urandom(32)
    ini, res = _handshake("Noise_XXpsk3_25519_ChaChaPoly_SHA256", ini_psks=[psk], res_psks=[psk])
    assert ini.is_my_turn and not res.is_my_turn
    m1 = ini.write_message(b"")
    # e, then the empty payload's tag: in a PSK handshake "e" also keys the cipher.
    assert len(m1) == 32 + 16
    assert res.read_message(m1) == b""
    assert ini.read_message(res.write_message(b"hello initiator")) == b"hello initiator"
    assert res.read_message(ini.write_message(b"hello responder")) == b"hello responder"
    assert ini.complete and res.complete
    assert not ini.is_my_turn and not res.is_my_turn
    assert ini.handshake_hash == res.handshake_hash
    assert ini.remote_static == res.local_static_public
    assert res.remote_static == ini.local_static_public

    a, b = ini.transport(), res.transport()
    assert a is ini.transport()  # cached: nonces are never reused by a second call
    assert ini.split() == (a.send, a.receive)
    for size in (0, 1, 1000, MAX_PLAINTEXT_LEN):
        data = os.urandom(size)
        ct = a.encrypt(data)
        assert len(ct) == size + 16 and len(ct) <= MAX_MESSAGE_LEN
        assert b.decrypt(ct) == data
        assert a.decrypt(b.encrypt(data)) == data
    assert a.send.nonce == 4 and b.receive.nonce == 4
    # Any byte buffer works as input, e.g. a memoryview slice of a large model.
    big = bytearray(os.urandom(3 * MAX_PLAINTEXT_LEN))
    view = memoryview(big)
    assert b.decrypt(memoryview(a.encrypt(view[:MAX_PLAINTEXT_LEN]))) == big[:MAX_PLAINTEXT_LEN]


@pytest.mark.parametrize(
    "name",
    [
        "Noise_XX_448_AESGCM_BLAKE2b",
        "Noise_NNpsk0+psk2_25519_AESGCM_SHA512",
        "Noise_XXpsk0+psk1+psk2+psk3_448_ChaChaPoly_BLAKE2s",
    ],
)
def test_other_suites_and_multiple_psks(name: str) -> None:
    count = NoiseProtocol.from_name(name).psk_count
    psks = [os.urandom(32) for _ in range(count)]
    ini, res = _handshake(name, ini_psks=psks, res_psks=psks)
    _run(ini, res)
    assert ini.handshake_hash == res.handshake_hash
    assert res.transport().decrypt(ini.transport().encrypt(b"x")) == b"x"


def test_wrong_psk_fails_decryption() -> None:
    ini, res = _handshake(
        "Noise_XXpsk3_25519_ChaChaPoly_SHA256", ini_psks=[bytes(32)], res_psks=[b"\x01" * 32]
    )
    res.read_message(ini.write_message())
    ini.read_message(res.write_message())
    # The psk is mixed in at the end of message 3, so its payload fails to authenticate.
    with pytest.raises(NoiseDecryptError):
        res.read_message(ini.write_message(b"secret"))
    # The handshake is dead afterwards.
    with pytest.raises(NoiseError, match="already failed"):
        res.write_message()
    with pytest.raises(NoiseError):
        res.transport()


def test_wrong_psk_at_psk0_fails_on_first_message() -> None:
    name = "Noise_NNpsk0_25519_ChaChaPoly_SHA256"
    ini = HandshakeState(name, initiator=True, psks=[bytes(32)])
    res = HandshakeState(name, initiator=False, psks=[b"\x02" * 32])
    with pytest.raises(NoiseDecryptError):
        res.read_message(ini.write_message(b""))


def test_tampered_handshake_message_fails() -> None:
    ini, res = _handshake("Noise_XX_25519_ChaChaPoly_SHA256")
    res.read_message(ini.write_message())
    msg = bytearray(res.write_message(b"hi"))
    msg[40] ^= 1  # inside the encrypted static key
    with pytest.raises(NoiseDecryptError):
        ini.read_message(bytes(msg))


def test_tampered_transport_message_fails_and_nonce_does_not_advance() -> None:
    ini, res = _handshake("Noise_NN_25519_ChaChaPoly_SHA256")
    _run(ini, res)
    a, b = ini.transport(), res.transport()
    ct = a.encrypt(b"model weights")
    for i in (0, len(ct) // 2, len(ct) - 1):
        bad = bytearray(ct)
        bad[i] ^= 0x80
        with pytest.raises(NoiseDecryptError):
            b.decrypt(bytes(bad))
    with pytest.raises(NoiseDecryptError):
        b.decrypt(ct[:-1])
    with pytest.raises(NoiseDecryptError):
        b.decrypt(ct[:15])
    assert b.receive.nonce == 0
    assert b.decrypt(ct) == b"model weights"
    # A replayed message is rejected: the nonce moved on.
    with pytest.raises(NoiseDecryptError):
        b.decrypt(ct)


@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_nonce_exhaustion_raises(cipher: str) -> None:
    enc, dec = CipherState(cipher), CipherState(cipher)
    key = os.urandom(32)
    enc.initialize_key(key)
    dec.initialize_key(key)
    enc.set_nonce(MAX_NONCE - 1)
    dec.set_nonce(MAX_NONCE - 1)
    assert dec.decrypt_with_ad(b"", enc.encrypt_with_ad(b"", b"last")) == b"last"
    assert enc.nonce == MAX_NONCE
    with pytest.raises(NoiseError, match="exhausted"):
        enc.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(NoiseError, match="exhausted"):
        dec.decrypt_with_ad(b"", bytes(32))
    with pytest.raises(NoiseError):
        enc.set_nonce(MAX_NONCE + 1)


def test_cipherstate_without_key_is_identity_and_rekey_agrees() -> None:
    c = CipherState()
    assert not c.has_key()
    assert c.encrypt_with_ad(b"ad", b"clear") == b"clear"
    with pytest.raises(NoiseError):
        c.rekey()
    with pytest.raises(NoiseError):
        c.initialize_key(bytes(31))
    with pytest.raises(NoiseError):
        CipherState("DES")
    a, b = CipherState("AESGCM"), CipherState("AESGCM")
    a.initialize_key(bytes(32))
    b.initialize_key(bytes(32))
    before = a.encrypt_with_ad(b"", b"m")
    assert b.decrypt_with_ad(b"", before) == b"m"
    a.rekey()
    after = a.encrypt_with_ad(b"", b"m")
    stale = CipherState("AESGCM")
    stale.initialize_key(bytes(32))
    stale.set_nonce(1)
    with pytest.raises(NoiseDecryptError):
        stale.decrypt_with_ad(b"", after)  # the old key no longer works
    b.rekey()
    assert b.decrypt_with_ad(b"", after) == b"m"
    # Rekeying keeps the nonce (spec section 11.3).
    assert a.nonce == b.nonce == 2


def test_out_of_turn_write_raises() -> None:
    ini, res = _handshake("Noise_XX_25519_ChaChaPoly_SHA256")
    with pytest.raises(NoiseError, match="not the responder's turn to write"):
        res.write_message(b"")
    with pytest.raises(NoiseError, match="not the initiator's turn to read"):
        ini.read_message(b"\x00" * 32)
    m1 = ini.write_message()
    with pytest.raises(NoiseError, match="not the initiator's turn to write"):
        ini.write_message()
    res.read_message(m1)
    ini.read_message(res.write_message())
    res.read_message(ini.write_message())
    with pytest.raises(NoiseError, match="complete"):
        ini.write_message()
    with pytest.raises(NoiseError, match="complete"):
        res.read_message(b"")
    # An out-of-turn call is a misuse, not a failure: the handshake stays usable.
    assert res.transport().decrypt(ini.transport().encrypt(b"ok")) == b"ok"


def test_truncated_messages_raise_noise_error() -> None:
    ini, res = _handshake("Noise_XX_25519_ChaChaPoly_SHA256")
    m1 = ini.write_message()
    for n in (0, 1, 31):
        fresh = HandshakeState(
            "Noise_XX_25519_ChaChaPoly_SHA256", initiator=False, s=generate_keypair()[0]
        )
        with pytest.raises(NoiseError, match="shorter than"):
            fresh.read_message(m1[:n])
    res.read_message(m1)
    m2 = res.write_message(b"")
    # e (32) + encrypted s (48) + payload tag (16) = 96 bytes at least.
    assert len(m2) == 96
    for n in (0, 32, 79, 95):
        ini2, res2 = _handshake("Noise_XX_25519_ChaChaPoly_SHA256")
        res2.read_message(ini2.write_message())
        with pytest.raises(NoiseError):
            ini2.read_message(res2.write_message(b"")[:n])


def test_message_size_limits() -> None:
    ini, res = _handshake("Noise_NN_25519_ChaChaPoly_SHA256")
    # Message 1 is e (32 bytes) plus a cleartext payload.
    with pytest.raises(NoiseError, match="over the Noise limit"):
        ini.write_message(bytes(MAX_MESSAGE_LEN - 31))
    assert ini.is_my_turn  # rejected before any state changed
    m1 = ini.write_message(bytes(MAX_MESSAGE_LEN - 32))
    assert len(m1) == MAX_MESSAGE_LEN
    assert res.read_message(m1) == bytes(MAX_MESSAGE_LEN - 32)
    with pytest.raises(NoiseError, match="exceeds"):
        ini.read_message(bytes(MAX_MESSAGE_LEN + 1))
    ini2, res2 = _handshake("Noise_NN_25519_ChaChaPoly_SHA256")
    _run(ini2, res2)
    with pytest.raises(NoiseError, match="plaintext"):
        ini2.transport().encrypt(bytes(MAX_PLAINTEXT_LEN + 1))
    with pytest.raises(NoiseError, match="exceeds"):
        res2.transport().decrypt(bytes(MAX_MESSAGE_LEN + 1))


def test_missing_or_misplaced_keys_are_rejected_up_front() -> None:
    priv, pub = generate_keypair()
    with pytest.raises(NoiseError, match="pass s="):
        HandshakeState("Noise_XX_25519_ChaChaPoly_SHA256", initiator=True)
    with pytest.raises(NoiseError, match="pass rs="):
        HandshakeState("Noise_IK_25519_ChaChaPoly_SHA256", initiator=True, s=priv)
    with pytest.raises(NoiseError, match="rs= was given"):
        HandshakeState("Noise_XX_25519_ChaChaPoly_SHA256", initiator=True, s=priv, rs=pub)
    with pytest.raises(NoiseError, match="pre-shared key"):
        HandshakeState("Noise_XXpsk3_25519_ChaChaPoly_SHA256", initiator=True, s=priv)
    with pytest.raises(NoiseError, match="32 bytes"):
        HandshakeState(
            "Noise_XXpsk3_25519_ChaChaPoly_SHA256", initiator=True, s=priv, psks=[bytes(16)]
        )
    with pytest.raises(NoiseError, match="sequence"):
        HandshakeState(
            "Noise_XXpsk3_25519_ChaChaPoly_SHA256",
            initiator=True,
            s=priv,
            psks=bytes(32),  # type: ignore[arg-type]
        )
    with pytest.raises(NoiseError, match="private key is 56 bytes"):
        HandshakeState("Noise_XX_448_ChaChaPoly_SHA256", initiator=True, s=priv)
    with pytest.raises(NoiseError, match="public key is 32 bytes"):
        HandshakeState("Noise_NK_25519_ChaChaPoly_SHA256", initiator=True, rs=pub[:31])


def test_ik_with_known_responder_key() -> None:
    i_priv, i_pub = generate_keypair()
    r_priv, r_pub = generate_keypair()
    name = "Noise_IK_25519_ChaChaPoly_BLAKE2s"
    ini = HandshakeState(name, initiator=True, s=i_priv, rs=r_pub)
    res = HandshakeState(name, initiator=False, s=r_priv)
    assert res.read_message(ini.write_message(b"0-RTT")) == b"0-RTT"
    assert res.remote_static == i_pub
    ini.read_message(res.write_message())
    assert ini.complete and res.complete and ini.handshake_hash == res.handshake_hash
    # The initiator aimed at a different responder key: the first message cannot be read.
    _, other_pub = generate_keypair()
    ini2 = HandshakeState(name, initiator=True, s=i_priv, rs=other_pub)
    res2 = HandshakeState(name, initiator=False, s=r_priv)
    with pytest.raises(NoiseDecryptError):
        res2.read_message(ini2.write_message())


def test_low_order_public_key_is_rejected() -> None:
    name = "Noise_NN_25519_ChaChaPoly_SHA256"
    res = HandshakeState(name, initiator=False)
    # The all-zero point has small order: X25519 with it gives the all-zero secret.
    res.read_message(bytes(32))
    with pytest.raises(NoiseError, match="invalid"):
        res.write_message()


def test_one_way_pattern_transport_directions() -> None:
    r_priv, r_pub = generate_keypair()
    name = "Noise_N_25519_ChaChaPoly_SHA256"
    ini = HandshakeState(name, initiator=True, rs=r_pub)
    res = HandshakeState(name, initiator=False, s=r_priv)
    assert res.read_message(ini.write_message(b"sealed")) == b"sealed"
    assert ini.complete and res.complete
    assert res.transport().decrypt(ini.transport().encrypt(b"more")) == b"more"
    with pytest.raises(NoiseError, match="one-way"):
        res.transport().encrypt(b"reply")
    with pytest.raises(NoiseError, match="one-way"):
        ini.transport().decrypt(bytes(16))


def test_split_before_completion_raises() -> None:
    ini, _ = _handshake("Noise_XX_25519_ChaChaPoly_SHA256")
    with pytest.raises(NoiseError, match="not complete"):
        ini.split()


def test_injected_randomness_makes_handshakes_reproducible() -> None:
    def seeded(seed: int) -> Callable[[int], bytes]:
        counter = 0

        def randbytes(n: int) -> bytes:
            nonlocal counter
            counter += 1
            return bytes((seed + counter + i) % 256 for i in range(n))

        return randbytes

    transcripts = []
    for _ in range(2):
        ini, res = _handshake("Noise_XX_25519_ChaChaPoly_SHA256", randbytes=seeded(7))
        _run(ini, res)
        transcripts.append(ini.handshake_hash)
    assert transcripts[0] == transcripts[1]


def test_public_key_matches_rfc7748() -> None:
    # RFC 7748 section 6.1 (Bob's key pair) and section 6.2 (Alice's X448 key pair).
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert public_key("25519", bob).hex() == (
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    )
    alice448 = bytes.fromhex(
        "9a8f4925d1519f5775cf46b04b5800d4ee9ee8bae8bc5565d498c28dd9c9baf5"
        "74a9419744897391006382a6f127ab1d9ac2d8c0a598726b"
    )
    assert public_key("448", alice448).hex() == (
        "9b08f7cc31b7e3e67d22d5aea121074a273bd2b83de09c63faa73d2c22c5d9bb"
        "c836647241d953d40c5b12da88120d53177f80e532c41fa0"
    )
    with pytest.raises(NoiseError):
        public_key("25519", bob[:31])
    with pytest.raises(NoiseError):
        generate_keypair("P256")


def test_into_variants_match_the_allocating_ones() -> None:
    """encrypt_into/decrypt_into (the channel's bulk path) are the same cipher operations."""
    key = bytes(range(32))
    for cipher in ("ChaChaPoly", "AESGCM"):
        a, b, c = CipherState(cipher), CipherState(cipher), CipherState(cipher)
        for state in (a, b, c):
            state.initialize_key(key)
        for size in (0, 1, 1000, MAX_PLAINTEXT_LEN):
            plaintext = bytes(i % 251 for i in range(size))
            out = memoryview(bytearray(size + 16))
            assert a.encrypt_into(b"ad", memoryview(plaintext), out) == size + 16
            expected = b.encrypt_with_ad(b"ad", plaintext)
            assert out.tobytes() == expected
            back = memoryview(bytearray(size))
            assert c.decrypt_into(b"ad", out, back) == size
            assert back.tobytes() == plaintext
        tampered = bytearray(a.encrypt_with_ad(b"", b"secret"))
        tampered[0] ^= 1
        with pytest.raises(NoiseDecryptError):
            c.decrypt_into(b"", bytes(tampered), memoryview(bytearray(6)))
        assert c.nonce == b.nonce  # a failed decryption does not advance the nonce
    with pytest.raises(NoiseError, match="needs a cipher key"):
        CipherState().encrypt_into(b"", b"x", memoryview(bytearray(17)))
