"""Every fatal runtime failure of `p2pfed node` ends in one line (issue 15, item 4).

Each case runs a real `p2pfed node` process against a real failure (a port another socket
holds, a corrupt file, a full file system, a task that raises) and checks that it exits
non-zero with `p2pfed: error: WHAT (WHAT TO DO)` as the last line of stderr, and that no
traceback reaches stderr at the default log level.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfed.demo import create_local_federation
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.identity import mark_ledger_required
from p2pfed.ledger import ledger_path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ONE_LINE = r"^p2pfed: error: .+ \(.+\)$"


def _env(extra_path: Path | None = None) -> dict[str, str]:
    paths = [str(TESTS), str(REPO)] + ([str(extra_path)] if extra_path else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def _node_dir(tmp_path: Path, *, dp: bool = False, task: str = "support.tiny_task:task") -> Path:
    params = ProtocolParams(dp_enabled=dp, group_max=3)
    federation = dataclasses.replace(Federation.new("fatal-test"), params=params)
    [node_dir] = create_local_federation(
        tmp_path / "fed", federation, 1, mdns=False, task=task, bootstrap=False
    )
    return node_dir


def _run(node_dir: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the node until it exits; its exit status and its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--rounds", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or _env(),
    )
    return done.returncode, done.stderr


def _assert_one_line(status: int, stderr: str, *fragments: str) -> str:
    lines = stderr.strip().splitlines()
    assert status == 1, stderr
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith("p2pfed: error: ") and last.endswith(")"), stderr
    assert "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_node_port_in_use(tmp_path: Path, busy_port: int) -> None:
    node_dir = _node_dir(tmp_path)
    status, stderr = _run(node_dir, "--listen", f"127.0.0.1:{busy_port}")
    _assert_one_line(status, stderr, f"127.0.0.1:{busy_port}", "in use", "--listen")


def test_metrics_port_in_use(tmp_path: Path, busy_port: int) -> None:
    node_dir = _node_dir(tmp_path)
    with open(node_dir / "config.toml", "a", encoding="utf-8") as config:
        config.write(f"metrics = true\nmetrics_port = {busy_port}\n")
    status, stderr = _run(node_dir, "--listen", "127.0.0.1:0")
    _assert_one_line(status, stderr, "metrics", str(busy_port), "in use")


def test_listen_port_zero_is_any_free_port(tmp_path: Path) -> None:
    node_dir = _node_dir(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "p2pfed", "node", str(node_dir), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            assert "error" not in line, line
            if "listening on port" in line:
                port = int(line.split("listening on port ")[1].split()[0])
                assert port > 0
                break
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_corrupt_ledger(tmp_path: Path) -> None:
    node_dir = _node_dir(tmp_path, dp=True)
    ledger_path(node_dir).write_bytes(b"\x00not a ledger\xff" * 10)
    status, stderr = _run(node_dir, "--listen", "127.0.0.1:0")
    _assert_one_line(status, stderr, "ledger")


def test_missing_ledger(tmp_path: Path) -> None:
    node_dir = _node_dir(tmp_path, dp=True)
    mark_ledger_required(node_dir / "identity.key")  # the node released before
    status, stderr = _run(node_dir, "--listen", "127.0.0.1:0")
    _assert_one_line(status, stderr, "ledger", "missing")


def test_bad_checkpoint(tmp_path: Path) -> None:
    node_dir = _node_dir(tmp_path)
    (node_dir / "checkpoint.bin").write_bytes(b"garbage" * 100)
    status, stderr = _run(node_dir, "--listen", "127.0.0.1:0")
    _assert_one_line(status, stderr, "checkpoint")


def test_exception_in_the_task(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken_task.py").write_text(
        "from support.tiny_task import TinyTask\n"
        "class BrokenTask(TinyTask):\n"
        "    def load_data(self, config):\n"
        "        raise RuntimeError('the data is\\nnot there')\n"
        "task = BrokenTask()\n",
        encoding="utf-8",
    )
    node_dir = _node_dir(tmp_path, task="broken_task:task")
    status, stderr = _run(node_dir, "--listen", "127.0.0.1:0", env=_env(tasks))
    _assert_one_line(status, stderr, "BrokenTask", "RuntimeError", "the data is not there")
    # the traceback is there at debug level
    status, stderr = _run(
        node_dir, "--listen", "127.0.0.1:0", "--log-level", "DEBUG", env=_env(tasks)
    )
    assert status == 1 and "Traceback" in stderr and "broken_task.py" in stderr


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the tests run as root); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full(tmp_path: Path, tiny_filesystem: Path) -> None:
    # with DP the node creates its privacy ledger before it looks for peers: the first
    # file it must write, and it cannot
    node_dir = _node_dir(tmp_path, dp=True)
    target = tiny_filesystem / "node"
    target.mkdir(mode=0o700)
    for item in node_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
        (target / item.name).chmod(item.stat().st_mode)
    # fill it to the last block (dd stops with "No space left on device")
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={tiny_filesystem / 'filler'}", "bs=4096"],
        capture_output=True,
        check=False,
    )
    status, stderr = _run(target, "--listen", "127.0.0.1:0")
    _assert_one_line(status, stderr, "the disk is full")


def test_nested_exception_groups_are_unwrapped() -> None:
    import errno

    from p2pfed.errors import LedgerError, fatal_message, main_error

    ledger = LedgerError("privacy ledger x is damaged")
    nested = BaseExceptionGroup(
        "outer", [ExceptionGroup("inner", [ValueError("noise"), ExceptionGroup("deep", [ledger])])]
    )
    assert main_error(nested) is ledger
    assert fatal_message(ledger).startswith("privacy ledger x is damaged (restore the ledger")
    full = OSError(errno.ENOSPC, "No space left on device", "/data/checkpoint.bin")
    assert main_error(ExceptionGroup("g", [RuntimeError("x"), full])) is full
    assert fatal_message(full) == (
        "cannot write /data/checkpoint.bin: the disk is full (free space on it and restart "
        "the node, which resumes from its last checkpoint)"
    )
    interrupted = BaseExceptionGroup("g", [ledger, KeyboardInterrupt()])
    assert isinstance(main_error(interrupted), KeyboardInterrupt)
