"""Test vectors of node identities and federation tags (spec/identity.md).

The three Ed25519 seeds are those of RFC 8032 section 7.1, TEST 1 to TEST 3, so the public
keys can be checked against the RFC as well as against this code.
"""

from __future__ import annotations

import hashlib
import tomllib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pfed.federation import Federation
from p2pfed.identity import NodeIdentity

NAME = "identity"
SECTION = 'spec/identity.md, "Identity and federations"'
DESCRIPTION = "node id, text and short forms, Ed25519 signatures, federation tags and file"

# RFC 8032 section 7.1, TEST 1..3: (private key seed, public key).
_RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
    ),
]
# RFC 8032 TEST 1 signs the empty message; this signature is in the RFC.
_RFC8032_TEST1_EMPTY_SIGNATURE = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
MESSAGE = b"p2pfed identity test vector"
FEDERATION_IDS = [bytes(16), bytes(range(1, 17)), b"\xff" * 16]


def _counter_randbytes(seed: bytes) -> Any:
    """Deterministic bytes for the example federation (SHA-256 in counter mode)."""
    counter = 0

    def randbytes(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
            counter += 1
        return out[:n]

    return randbytes


def generate() -> dict:
    nodes = []
    for seed_hex, _ in _RFC8032:
        ident = NodeIdentity.from_private_bytes(bytes.fromhex(seed_hex))
        nodes.append(
            {
                "private_key_seed": seed_hex,
                "public_key": ident.public_key.hex(),
                "node_id": ident.node_id.hex,
                "node_id_text": str(ident.node_id),
                "node_id_short": ident.node_id.short,
                "message": MESSAGE.hex(),
                "signature": ident.sign(MESSAGE).hex(),
            }
        )
    tags = [
        {"federation_id": fid.hex(), "tag": Federation("x", fid, bytes(32)).tag}
        for fid in FEDERATION_IDS
    ]
    example = Federation.new("example-federation", _counter_randbytes(b"p2pfed vector"))
    return {
        "node_id_domain": b"p2pfed-node-id:v1".hex(),
        "federation_tag_domain": b"p2pfed-federation-tag:v1".hex(),
        "nodes": nodes,
        "federation_tags": tags,
        "federation_file": {
            "name": example.name,
            "federation_id": example.federation_id.hex(),
            "secret": example.secret.hex(),
            "tag": example.tag,
            "toml": example.to_toml(),
        },
    }


def _base32_lower_nopad(data: bytes) -> str:
    """RFC 4648 base32, written out bit by bit (independent of the base64 module)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    bits = len(data) * 8
    chars = -(-bits // 5)
    value = int.from_bytes(data, "big") << (chars * 5 - bits)
    return "".join(alphabet[(value >> (5 * (chars - 1 - i))) & 31] for i in range(chars))


def verify(vectors: dict) -> None:
    node_domain = bytes.fromhex(vectors["node_id_domain"])
    tag_domain = bytes.fromhex(vectors["federation_tag_domain"])
    assert node_domain == b"p2pfed-node-id:v1"
    assert tag_domain == b"p2pfed-federation-tag:v1"
    assert [n["private_key_seed"] for n in vectors["nodes"]] == [s for s, _ in _RFC8032]
    for node, (_, rfc_public) in zip(vectors["nodes"], _RFC8032, strict=True):
        public = bytes.fromhex(node["public_key"])
        assert node["public_key"] == rfc_public, "public key differs from RFC 8032"
        node_id = hashlib.sha256(node_domain + public).digest()
        assert node["node_id"] == node_id.hex()
        text = _base32_lower_nopad(node_id)
        assert len(text) == 52
        assert node["node_id_text"] == text
        assert node["node_id_short"] == text[:10]
        # Raises InvalidSignature on a mismatch.
        Ed25519PublicKey.from_public_bytes(public).verify(
            bytes.fromhex(node["signature"]), bytes.fromhex(node["message"])
        )
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(_RFC8032[0][1])).verify(
        bytes.fromhex(_RFC8032_TEST1_EMPTY_SIGNATURE), b""
    )
    for entry in vectors["federation_tags"]:
        fid = bytes.fromhex(entry["federation_id"])
        assert entry["tag"] == hashlib.sha256(tag_domain + fid).digest()[:8].hex()
    example = vectors["federation_file"]
    doc = tomllib.loads(example["toml"])
    assert set(doc) == {"federation", "params"}
    assert doc["federation"] == {
        "name": example["name"],
        "id": example["federation_id"],
        "secret": example["secret"],
        "protocol_version": 1,
    }
    fid = bytes.fromhex(example["federation_id"])
    assert example["tag"] == hashlib.sha256(tag_domain + fid).digest()[:8].hex()
    assert doc["params"] == {
        "group_min": 3,
        "group_max": 8,
        "max_message_size": 268435456,
        "fixed_point_bits": 64,
        "clip": 8.0,
        "dp_enabled": True,
        "dp_clip_norm": 1.0,
        "dp_noise_multiplier": 12.76,
        "dp_delta": 1e-5,
        "dp_epsilon_budget": 8.0,
        "dp_level": "node",
        "dp_sample_rate": 0.02,
        "dp_steps": 50,
        "averaging": "exact",
        "random_steps": 0,
        "min_nodes": 0,
        "server_optimizer": "fedavg",
        "server_lr": 1.0,
        "server_momentum": 0.9,
        "server_beta2": 0.99,
        "server_tau": 0.001,
        "federation_metrics": True,
    }
