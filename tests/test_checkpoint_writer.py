"""The checkpoint writer alone (p2pfed/checkpoint_writer.py): real files in a temporary
directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio

from p2pfed.checkpoint import Checkpoint, load_checkpoint
from p2pfed.checkpoint_writer import (
    CHECKPOINT_FILE_NAME,
    SERVER_OPTIMIZER_FILE_NAME,
    CheckpointWriter,
)

FINGERPRINT = bytes(32)


def checkpoint(round_: int) -> Checkpoint:
    return Checkpoint(round_, np.full(3, round_, np.float32), 1.0, FINGERPRINT, True)


def test_without_threads_each_checkpoint_is_on_disk_when_save_returns(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, threads=False)
    writer.save(checkpoint(1), None)
    loaded = load_checkpoint(tmp_path / CHECKPOINT_FILE_NAME, FINGERPRINT)
    assert loaded is not None and loaded.round == 1
    assert not (tmp_path / SERVER_OPTIMIZER_FILE_NAME).exists()


def test_with_threads_the_newest_pending_checkpoint_is_written(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, threads=True)

    async def main() -> None:
        # rounds faster than the disk: the writer skips what a newer one overtook
        writer.save(checkpoint(1), b"state 1")
        writer.save(checkpoint(2), b"state 2")
        assert not (tmp_path / CHECKPOINT_FILE_NAME).exists()  # not before a flush
        await writer.flush()
        written = load_checkpoint(tmp_path / CHECKPOINT_FILE_NAME, FINGERPRINT)
        assert written is not None and written.round == 2
        assert (tmp_path / SERVER_OPTIMIZER_FILE_NAME).read_bytes() == b"state 2"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            writer.save(checkpoint(3), b"state 3")
            await writer.flush()  # waits for the write run() may have begun
            nursery.cancel_scope.cancel()

    trio.run(main)
    loaded = load_checkpoint(tmp_path / CHECKPOINT_FILE_NAME, FINGERPRINT)
    assert loaded is not None and loaded.round == 3
    np.testing.assert_array_equal(loaded.model, np.full(3, 3, np.float32))
    assert (tmp_path / SERVER_OPTIMIZER_FILE_NAME).read_bytes() == b"state 3"
