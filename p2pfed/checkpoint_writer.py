"""Writing a node's checkpoints beside its rounds.

One job: put the latest round's checkpoint, and the server optimiser's state of that same
round, on disk. With worker threads the write (two files, each fsynced with its
directory: tens of milliseconds on a busy disk) happens beside the next round instead of
before it; a crash loses at most the rounds not yet written, which the node re-learns
from its peers, while privacy spending is never deferred (the ledger is written before
each release, elsewhere). Without threads (simnet, under a virtual clock) each is
written at once.

Example::

    writer = CheckpointWriter(node_dir, threads=True)
    nursery.start_soon(writer.run)
    writer.save(checkpoint, optimizer_state)  # returns at once
    await writer.flush()  # on disk
"""

from __future__ import annotations

from pathlib import Path

import trio

from p2pfed.atomicfile import atomic_write_bytes
from p2pfed.checkpoint import Checkpoint, save_checkpoint

__all__ = ["CHECKPOINT_FILE_NAME", "SERVER_OPTIMIZER_FILE_NAME", "CheckpointWriter"]

CHECKPOINT_FILE_NAME = "checkpoint.bin"
SERVER_OPTIMIZER_FILE_NAME = "server-optimizer.bin"

Snapshot = tuple[Checkpoint, bytes | None]


class CheckpointWriter:
    """Writes the newest checkpoint handed to :meth:`save` (see the module docstring)."""

    def __init__(self, node_dir: Path, *, threads: bool) -> None:
        self.node_dir = Path(node_dir)
        self.threads = threads
        self._pending: Snapshot | None = None
        self._wanted = trio.Event()
        self._lock = trio.Lock()

    def save(self, checkpoint: Checkpoint, optimizer_state: bytes | None) -> None:
        """Checkpoint a completed round (``checkpoint`` and the optimiser state must be
        copies: the rounds go on while they are written)."""
        if not self.threads:
            self._write((checkpoint, optimizer_state))
            return
        self._pending = (checkpoint, optimizer_state)
        self._wanted.set()

    async def run(self) -> None:
        """Write the latest pending checkpoint whenever there is one (older ones it
        overtook are skipped: only the newest matters). Runs until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Write the pending checkpoint, if any, and wait until it is on disk."""
        async with self._lock:  # one writer: both use the same temporary file
            snapshot, self._pending = self._pending, None
            if snapshot is not None:
                await trio.to_thread.run_sync(self._write, snapshot)

    def _write(self, snapshot: Snapshot) -> None:
        checkpoint, state = snapshot
        save_checkpoint(self.node_dir / CHECKPOINT_FILE_NAME, checkpoint)
        if state is not None:
            atomic_write_bytes(self.node_dir / SERVER_OPTIMIZER_FILE_NAME, state, mode=0o600)
