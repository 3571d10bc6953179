"""Checkpoints: exact round trips, every kind of damage detected, atomic under kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from p2pfed.checkpoint import (
    CHECKPOINT_MAGIC,
    Checkpoint,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from p2pfed.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent
FP = hashlib.sha256(b"model").digest()


def make(round_: int = 7, n: int = 1000) -> Checkpoint:
    rng = np.random.default_rng(round_)
    return Checkpoint(
        round=round_,
        model=rng.standard_normal(n).astype(np.float32),
        weight=0.25,
        fingerprint=FP,
        trained=True,
        extra={"group": "ab", "released_round": 6, "ok": [1, 2.5, None]},
    )


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "nothing.ckpt") is None


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    ckpt = make()
    ckpt.model[:3] = [np.float32("inf"), -0.0, np.float32(1e-45)]  # odd values survive
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path, expected_fingerprint=FP)
    assert loaded is not None
    assert (loaded.round, loaded.weight, loaded.fingerprint, loaded.trained, loaded.extra) == (
        7,
        0.25,
        FP,
        True,
        {"group": "ab", "released_round": 6, "ok": [1, 2.5, None]},
    )
    assert loaded.model.dtype == np.float32 and loaded.model.flags.writeable
    assert loaded.model.tobytes() == ckpt.model.tobytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_file_layout_is_as_documented(tmp_path: Path) -> None:
    ckpt = Checkpoint(
        round=2, model=np.array([1.0, -2.0], np.float32), weight=3.0, fingerprint=FP, trained=False
    )
    data = encode_checkpoint(ckpt)
    meta = (
        '{"extra":{},"fingerprint":"' + FP.hex() + '","length":2,"round":2,'
        '"trained":false,"weight":3.0}'
    ).encode()
    body = b"P2PFCKPT" + struct.pack(">HI", 1, len(meta)) + meta
    body += struct.pack("<2f", 1.0, -2.0)
    assert data == body + hashlib.sha256(body).digest()


def test_empty_model_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "empty.ckpt"
    save_checkpoint(path, make(n=0))
    loaded = load_checkpoint(path)
    assert loaded is not None and loaded.model.shape == (0,)


def test_every_truncation_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    data = encode_checkpoint(make(n=20))
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="unusable"):
            load_checkpoint(path)


def test_every_single_byte_corruption_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    data = encode_checkpoint(make(n=20))
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)


def rehash(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_wrong_magic_and_version_are_named(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    body = encode_checkpoint(make(n=4))[:-32]
    path.write_bytes(rehash(b"NOTCKPT!" + body[8:]))
    with pytest.raises(CheckpointError, match="not a p2pfed checkpoint"):
        load_checkpoint(path)
    path.write_bytes(rehash(CHECKPOINT_MAGIC + struct.pack(">H", 2) + body[10:]))
    with pytest.raises(CheckpointError, match=r"format version 2.*only version 1"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"round": -1}, "round must be"),
        ({"round": True}, "round must be"),
        ({"weight": "x"}, "weight must be"),
        ({"length": 5}, "says 5 values but 16 bytes"),
        ({"fingerprint": "AB" * 32}, "lowercase hex"),
        ({"trained": 1}, "trained must be a boolean"),
        ({"surprise": 1}, "exactly the keys"),
    ],
)
def test_bad_metadata_with_a_valid_checksum(tmp_path: Path, change: dict, match: str) -> None:
    # a writer bug, not disk damage: the checksum matches but the content is wrong
    path = tmp_path / "model.ckpt"
    data = encode_checkpoint(make(n=4))
    (meta_len,) = struct.unpack(">I", data[10:14])
    meta = json.loads(data[14 : 14 + meta_len]) | change
    text = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    body = data[:10] + struct.pack(">I", len(text)) + text + data[14 + meta_len : -32]
    path.write_bytes(rehash(body))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_fingerprint_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, make())
    with pytest.raises(CheckpointError, match="different model"):
        load_checkpoint(path, expected_fingerprint=bytes(32))


def test_size_limit_checked_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, make(n=100))
    with pytest.raises(CheckpointError, match="more than the limit of 100"):
        load_checkpoint(path, max_bytes=100)


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"round": -1}, ValueError),
        ({"model": np.zeros(3, np.float64)}, TypeError),
        ({"model": np.zeros((3, 1), np.float32)}, TypeError),
        ({"weight": float("nan")}, ValueError),
        ({"weight": -1.0}, ValueError),
        ({"fingerprint": b"short"}, ValueError),
        ({"trained": 1}, TypeError),
        ({"extra": {"x": float("inf")}}, ValueError),
        ({"extra": {"x": object()}}, ValueError),
    ],
)
def test_save_rejects_bad_checkpoints(tmp_path: Path, kwargs: dict, error: type) -> None:
    fields = {
        "round": 1,
        "model": np.zeros(3, np.float32),
        "weight": 1.0,
        "fingerprint": FP,
        "trained": False,
        "extra": {},
    } | kwargs
    with pytest.raises(error):
        save_checkpoint(tmp_path / "x.ckpt", Checkpoint(**fields))
    assert not (tmp_path / "x.ckpt").exists()


_CHILD = """
import sys
import numpy as np
from p2pfed.checkpoint import Checkpoint, save_checkpoint
path = sys.argv[1]
fingerprint = bytes(range(32))
r = 0
while True:
    r += 1
    model = np.full(200_000, float(r), dtype=np.float32)
    save_checkpoint(path, Checkpoint(round=r, model=model, weight=float(r), fingerprint=fingerprint,
                                     trained=r % 2 == 0, extra={"round_again": r}))
    print(r, flush=True)
"""


def test_kill_9_always_leaves_a_loadable_recent_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = np.random.default_rng(5)
    # (lines to read before the kill, extra sleep): kills right after a save returned and
    # at random points inside the following writes
    plan = [(1, 0.0), (2, 0.001), (5, 0.0), (3, 0.004)]
    plan += [(int(rng.integers(1, 8)), float(rng.uniform(0, 0.01))) for _ in range(8)]
    last = 0
    for lines, pause in plan:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(path)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            for _ in range(lines):
                line = child.stdout.readline()
                assert line, "the checkpoint writer died on its own"
                last = int(line)
            time.sleep(pause)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        for line in child.stdout.read().split():  # saves that returned before the kill
            last = int(line)
        ckpt = load_checkpoint(path, expected_fingerprint=bytes(range(32)))
        assert ckpt is not None
        # every save that returned is on disk; at most one more (written, not yet printed)
        assert last <= ckpt.round <= last + 1
        assert ckpt.weight == float(ckpt.round) and ckpt.extra == {"round_again": ckpt.round}
        assert ckpt.trained == (ckpt.round % 2 == 0)
        assert np.all(ckpt.model == np.float32(ckpt.round))
        last = 0  # the next child counts from 1 again and overwrites
