"""Crash-safe file replacement: the one way p2pfed writes state that must survive.

Identity keys, the privacy ledger and model checkpoints are written here. A reader of the
path sees either the complete old content or the complete new content, never a mix, even
if the process is killed with SIGKILL or the machine loses power at any instant: the data
goes to a temporary file in the same directory, is flushed to disk (``fsync``), renamed
over the target (atomic on POSIX), and the directory entry is flushed too.

Example::

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "state.bin"
    >>> atomic_write_bytes(p, b"hello", mode=0o600)
    >>> p.read_bytes()
    b'hello'
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_directory"]


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` atomically and (unless ``durable=False``) durably.

    ``durable=False`` skips both fsyncs: readers still never see a torn file (the rename
    is atomic), but a power loss may leave the previous version. That suits files a node
    rewrites every second for humans to read (status.json), where two fsyncs per write
    would block the event loop for tens of milliseconds on a busy disk.

    The file is created with permission bits ``mode`` from the start (a secret is never
    readable by others, not even briefly). Leftover temporary files from a crash are named
    ``.<name>.tmp-<pid>`` and are harmless; the next write of the same path by the same
    process id overwrites its own.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    tmp = directory / f".{target.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask and ignored if tmp existed
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, target)
    if durable:
        fsync_directory(directory)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, mode: int = 0o644, durable: bool = True
) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode, durable=durable)
