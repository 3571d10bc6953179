"""Write the seed corpora of every harness into fuzz/corpus/<target>/ from the spec's
test vectors (spec/vectors/*.json), plus a few programs for the structured harnesses.

Run ``python -m fuzz.make_corpus`` after the vectors change (``python -m p2pfed.vectorgen``).
It rewrites only the files it generates (named ``seed-*``); inputs kept because they once
crashed a harness (named ``crash-*``, see fuzz/README.md) are left alone. Every seed is
replayed through its harness before it is written, so a seed that fails is never stored.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from fuzz import cbor_decode, channel_frames, group_protocol, handshake, message_decode
from fuzz._support import CORPUS_ROOT

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
MAX_SEED_BYTES = 8192


def _load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def message_vectors() -> list[tuple[str, str, bytes]]:
    """``(name, decoder, cbor)`` of every message vector, valid and invalid."""
    data = _load("messages.json")
    out = []
    for v in data["valid"]:
        decoder = "handshake-payload" if v.get("class") == "HandshakePayload" else "message"
        out.append((v["name"], decoder, bytes.fromhex(v["cbor"])))
    for v in data["invalid"]:
        out.append((v["name"], v["decoder"], bytes.fromhex(v["cbor"])))
    for v in data["extensions"]:
        out.append((v["name"], "handshake-payload", bytes.fromhex(v["cbor"])))
    for exchange in _load("group_exchange.json")["exchanges"]:
        for i, m in enumerate(exchange["messages"]):
            out.append((f"exchange-{m['type']}-{i}", "message", bytes.fromhex(m["cbor"])))
    return out


def cbor_seeds() -> Iterable[tuple[str, bytes]]:
    for name, _, cbor in message_vectors():
        yield name, cbor
    extra = {
        "floats": "85f93e00fa47c35000fb3ff199999999999af97e00f98000",
        "nested": "8281a1616181a0a2000101f6",
        "text-keys": "a261610161626162",
        "negative": "833bffffffffffffffff2038ff",
    }
    for name, hexed in extra.items():
        yield name, bytes.fromhex(hexed)


def message_seeds() -> Iterable[tuple[str, bytes]]:
    for name, decoder, cbor in message_vectors():
        selector = message_decode.HANDSHAKE_PAYLOAD if decoder == "handshake-payload" else 0
        yield name, bytes([selector]) + cbor


def handshake_seeds() -> Iterable[tuple[str, bytes]]:
    wire = _load("transport.json")["wire"]
    by_side = {
        side: b"".join(bytes.fromhex(w["bytes"]) for w in wire if w["from"] == side)
        for side in ("initiator", "responder")
    }
    # the harness's nodes hold the transport vector's keys, so the vector's messages from
    # one side complete a genuine handshake with the other
    yield "vector-to-responder", b"\x00" + by_side["initiator"]
    yield "vector-to-initiator", b"\x01" + by_side["responder"]
    for role in (0, 1):
        yield f"genuine-{role}", bytes([2, role]) + bytes(12)
        for choice in range(1, 4):
            yield f"payload-{role}-{choice}", bytes([2, role, 1]) + bytes([choice, 3, 1, 2]) * 4
        yield f"wrong-psk-{role}", bytes([2, role, 0]) + bytes(12)
        yield f"flip-{role}", bytes([2, role, 1, 0, 6, 5, 1]) + bytes(8)
    for index, name in enumerate(handshake.NOISE_NAMES):
        for role in (0, 1):
            # role 1 initiates: it writes a 3-byte payload, then reads 48 bytes
            yield f"noise-{name}-{role}", bytes([3, index, role, 3, 1, 2, 3, 0, 48]) + bytes(48)


def channel_seeds() -> Iterable[tuple[str, bytes]]:
    count = len(channel_frames.MESSAGES)
    for role in (0, 1):
        for index in range(count):
            yield f"message-{role}-{index}", bytes([role, 1, 2, index, 0])
        yield f"keepalive-close-{role}", bytes([role, 1, 7, 0, 0, 7, 1, 5, 0, 0])
        yield f"large-frame-{role}", bytes([role, 1, 3, 2, 0x40, 0, 0, 2, 3, 0])
        yield f"no-welcome-{role}", bytes([role, 0, 2, 3, 0, 7, 0, 0])
        yield f"split-{role}", bytes([role, 1, 0, 8, 0, 0, 0, 4, 0xA1, 0, 0x02, 0, 0, 1, 0, 0, 0])
        yield f"replay-{role}", bytes([role, 1, 2, 5, 0, 5, 1, 0, 3, 7])
        yield f"local-{role}", bytes([role, 1, 6, 0, 6, 1, 2, 7, 0, 6, 2])


def group_seeds() -> Iterable[tuple[str, bytes]]:
    yield "drain-only", b""
    yield "weights", bytes([1, 1, 2, 3, 0, 1])
    yield "zero-weights", bytes([2, 0, 0, 0, 0, 0])
    yield "poll-then-fifo", bytes([3, 1, 2, 3, 1, 1, 4, 1]) + bytes(120)
    exchange = _load("group_exchange.json")["exchanges"][0]["messages"]
    for i, m in enumerate(exchange):
        cbor = bytes.fromhex(m["cbor"])
        yield (
            f"inject-{m['type']}-{i}",
            bytes([4, 1, 1, 1, 1, 1, 4, 1, 7, 0]) + len(cbor).to_bytes(2, "big") + cbor,
        )
    rng = random.Random(15)
    kept = 0
    for attempt in range(200):
        program = bytes([attempt % 256, 1, 2, 3, 1, 1]) + bytes(
            rng.choice((0, 0, 0, 1, 4, 4, 5, 6, 8, 9, 10)) if i % 2 == 0 else rng.randrange(4)
            for i in range(rng.randrange(20, 160))
        )
        group_protocol.test_one_input(program)
        stats = group_protocol.last_run
        if (stats["aborted"] and stats["injected"]) or (stats["completed"] < 4 and kept < 6):
            kept += 1
            yield f"program-{attempt}", program
        if kept >= 10:
            break


TARGETS: dict[str, tuple[Callable[[bytes], None], Callable[[], Iterable[tuple[str, bytes]]]]] = {
    "cbor_decode": (cbor_decode.test_one_input, cbor_seeds),
    "message_decode": (message_decode.test_one_input, message_seeds),
    "handshake": (handshake.test_one_input, handshake_seeds),
    "channel_frames": (channel_frames.test_one_input, channel_seeds),
    "group_protocol": (group_protocol.test_one_input, group_seeds),
}


def seeds(target: str) -> dict[bytes, str]:
    """The seeds of ``target``: input -> file name (small, distinct inputs only)."""
    out: dict[bytes, str] = {}
    for name, data in TARGETS[target][1]():
        if len(data) <= MAX_SEED_BYTES and data not in out:
            out[data] = f"seed-{name}-{hashlib.sha1(data).hexdigest()[:8]}"
    return out


def write(target: str) -> int:
    test_one_input = TARGETS[target][0]
    directory = CORPUS_ROOT / target
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("seed-*"):
        old.unlink()
    found = seeds(target)
    for data, name in found.items():
        test_one_input(data)  # a seed that breaks its harness is a bug to fix, not to store
        (directory / name).write_bytes(data)
    return len(found)


def main() -> None:
    for target in sys.argv[1:] or TARGETS:
        print(f"{target}: {write(target)} seeds")


if __name__ == "__main__":
    main()
