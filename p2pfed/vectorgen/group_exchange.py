"""A whole group exchange: every message of a 3-member group, in both rings, and how a
contribution is split into shards among k members (spec/group.md, "All-reduce").

The three members run the reference state machine (:class:`p2pfed.group.GroupProtocol`)
from fixed identity seeds, a fixed byte source for group ids, nonces and mask keys, and
fixed rounding seeds, delivering messages in a fixed order. The vector lists every message
with its sender, receiver and CBOR encoding, the members' inputs and what each applied.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from fractions import Fraction
from typing import Any

import numpy as np

from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import (
    GroupCompleted,
    GroupConfig,
    GroupProtocol,
    Send,
    mask_key_signature_input,
    shard_bounds,
)
from p2pfed.identity import NodeId, NodeIdentity, verify_signature
from p2pfed.messages import (
    GroupStart,
    ReducedShard,
    Shard,
    decode_message,
    encode_message,
)

NAME = "group_exchange"
SECTION = 'spec/group.md: "Starting", "All-reduce" (shard bounds, Shard, ReducedShard)'
DESCRIPTION = (
    "shard bounds for k members, and every message of a complete 3-member group "
    "(invite to reduced shards) in the 64-bit and the 32-bit ring"
)

_LABEL = b"p2pfed group_exchange vectors/"
_FINGERPRINT = hashlib.sha256(_LABEL + b"model").digest()
_VECTORS = np.array(
    [[0.25, -1.5, 3.0, 1e-3, 7.0], [0.75, 2.5, -3.0, -2e-3, 7.5], [-0.5, 0.125, 1.0, 5e-4, -7.5]],
    np.float32,
)
_WEIGHTS = [10, 30, 60]
_SPLITS = [(6, 3), (7, 3), (13, 4), (9, 8), (1001, 8), (3, 3)]


def _byte_source(tag: bytes):  # type: ignore[no-untyped-def]
    """Deterministic stand-in for os.urandom: SHA-256 in counter mode."""
    counter = 0
    buffer = b""

    def randbytes(n: int) -> bytes:
        nonlocal counter, buffer
        while len(buffer) < n:
            buffer += hashlib.sha256(_LABEL + tag + counter.to_bytes(8, "big")).digest()
            counter += 1
        out, buffer = buffer[:n], buffer[n:]
        return out

    return randbytes


def _exchange(bits: int) -> dict[str, Any]:
    params = FixedPointParams.for_federation(bits, 8.0, 8)
    config = GroupConfig(group_min=3, group_max=8, initiate_delay=0.0)
    seeds = [hashlib.sha256(_LABEL + b"identity" + bytes([i])).digest() for i in range(3)]
    identities = [NodeIdentity.from_private_bytes(s) for s in seeds]
    nodes = {
        ident.node_id: GroupProtocol(
            ident,
            config,
            params,
            fingerprint=_FINGERPRINT,
            model_size=_VECTORS.shape[1],
            listen_port=7000 + i,
            rng=random.Random(i),
            randbytes=_byte_source(bytes([bits, i])),
            numpy_rng=np.random.default_rng(100 + i),
        )
        for i, ident in enumerate(identities)
    }
    for node in nodes.values():
        for other in identities:
            node.register_peer(other.node_id, other.public_key)
    ids = [ident.node_id for ident in identities]
    initiator = ids[0]
    for i, node_id in enumerate(ids):
        nodes[node_id].set_contribution(
            _VECTORS[i], _WEIGHTS[i], 5, 0.0, initiate=node_id == initiator
        )
    queue: deque[tuple[NodeId, NodeId, bytes]] = deque()
    messages: list[dict[str, Any]] = []
    applied: dict[NodeId, GroupCompleted] = {}

    def handle(sender: NodeId, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                data = encode_message(action.message)
                messages.append(
                    {
                        "from": ids.index(sender),
                        "to": ids.index(action.peer),
                        "type": type(action.message).__name__,
                        "cbor": data.hex(),
                    }
                )
                queue.append((sender, action.peer, data))
            elif isinstance(action, GroupCompleted):
                applied[sender] = action

    handle(initiator, nodes[initiator].poll(0.0, [p for p in ids if p != initiator]))
    while queue:
        sender, receiver, data = queue.popleft()
        handle(receiver, nodes[receiver].receive(sender, decode_message(data), 0.1))
    assert len(applied) == 3, "the vector group did not complete"
    outcome = applied[initiator]
    return {
        "params": {"bits": bits, "clip": 8.0, "group_max": 8, "scale_bits": params.scale_bits},
        "members": [
            {
                "identity_seed": seeds[i].hex(),
                "node_id": str(ids[i]),
                "x_f32": _VECTORS[i].astype("<f4").tobytes().hex(),
                "weight": _WEIGHTS[i],
            }
            for i in range(3)
        ],
        "note": (
            "members are listed by index in this vector; GroupStart sorts them by node id. "
            "Mask keys, nonce and rounding are the reference's from fixed seeds: reproduce "
            "the bytes with the reference, or check the structure and the sum as verify() does."
        ),
        "messages": messages,
        "mean_f32": outcome.mean.astype("<f4").tobytes().hex(),
        "total_weight": outcome.total_weight,
    }


def generate() -> dict[str, Any]:
    """The vectors, computed by the reference implementation from fixed seeds."""
    return {
        "description": DESCRIPTION,
        "shard_bounds": [
            {"words": n, "members": k, "bounds": [list(b) for b in shard_bounds(n, k)]}
            for n, k in _SPLITS
        ],
        "exchanges": [_exchange(64), _exchange(32)],
    }


def verify(vectors: dict[str, Any]) -> None:
    """Shard bounds from the formula; for each exchange: the message sequence, the signed
    mask keys, shard lengths, each reduced shard the sum of the shards its reducer received
    plus its own (which is not on the wire: recovered from the group sum), and the decoded
    mean close to the weighted mean of the inputs."""
    for case in vectors["shard_bounds"]:
        n, k = case["words"], case["members"]
        assert case["bounds"] == [[j * n // k, (j + 1) * n // k] for j in range(k)]
    for exchange in vectors["exchanges"]:
        bits = exchange["params"]["bits"]
        word = bits // 8
        decoded = [(m, decode_message(bytes.fromhex(m["cbor"]))) for m in exchange["messages"]]
        kinds = [type(msg).__name__ for _, msg in decoded]
        assert kinds[:2] == ["GroupInvite", "GroupInvite"] and kinds.count("GroupReply") == 2
        starts = [msg for _, msg in decoded if isinstance(msg, GroupStart)]
        assert len(starts) == 2 and starts[0] == starts[1]
        start: GroupStart = starts[0]
        keys = [bytes(m.identity_key) for m in start.members]
        ids = [NodeId.from_public_key(key).raw for key in keys]
        assert ids == sorted(ids) and len(set(ids)) == 3
        for info in start.members:
            signed = mask_key_signature_input(start.group_id, bytes(info.mask_key))
            assert verify_signature(bytes(info.identity_key), bytes(info.key_signature), signed)
        members = exchange["members"]
        by_vector_index = [str(NodeId.from_public_key(k)) for k in keys]
        order = [by_vector_index.index(m["node_id"]) for m in members]  # vector i -> position
        d = len(np.frombuffer(bytes.fromhex(members[0]["x_f32"]), "<f4"))
        bounds = shard_bounds(d + 1, 3)
        shards = [(m, msg) for m, msg in decoded if isinstance(msg, Shard)]
        reduced = [(m, msg) for m, msg in decoded if isinstance(msg, ReducedShard)]
        assert len(shards) == 6 and len(reduced) == 6
        for meta, msg in shards:
            a, b = bounds[msg.index]
            assert msg.index == order[meta["to"]] and len(msg.data) == (b - a) * word
        full: list[int] = []
        for j in range(3):
            copies = {bytes(msg.data) for _, msg in reduced if msg.index == j}
            assert len(copies) == 1  # the reducer sends the same sum to everyone
            data = copies.pop()
            a, b = bounds[j]
            assert len(data) == (b - a) * word
            full += [
                int.from_bytes(data[i : i + word], "little") for i in range(0, len(data), word)
            ]
        weight = full[-1]
        assert weight == exchange["total_weight"] == sum(m["weight"] for m in members)
        scale = 1 << exchange["params"]["scale_bits"]
        xs = [np.frombuffer(bytes.fromhex(m["x_f32"]), "<f4") for m in members]
        expected = sum(m["weight"] * x.astype(np.float64) for m, x in zip(members, xs, strict=True))
        mean = np.frombuffer(bytes.fromhex(exchange["mean_f32"]), "<f4")
        for i, word_value in enumerate(full[:-1]):
            as_int = word_value - (1 << bits) if word_value >= 1 << (bits - 1) else word_value
            value = Fraction(as_int, scale * weight)
            # each member's rounding moves its coordinate by less than one step of 1/scale
            assert abs(float(value) - expected[i] / weight) <= 3 / scale, (i, float(value))
            assert abs(float(mean[i]) - float(value)) <= abs(float(value)) * 2**-23 + 2**-149
