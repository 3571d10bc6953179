"""The privacy ledger: durable, refuses over-budget releases, detects damage, survives kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from p2pfed.accountant import RdpAccountant, epsilon_for
from p2pfed.errors import LedgerError, PrivacyBudgetExceeded
from p2pfed.ledger import (
    LEDGER_FILE_NAME,
    MAX_LEDGER_BYTES,
    RECENT_RELEASES,
    PrivacyLedger,
    ledger_path,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return ledger_path(tmp_path)


def test_ledger_path_is_in_the_node_directory(tmp_path: Path) -> None:
    assert ledger_path(tmp_path) == tmp_path / LEDGER_FILE_NAME == tmp_path / "privacy-ledger.json"


def test_round_trip(path: Path) -> None:
    ledger = PrivacyLedger.create(path, epsilon_budget=10.0, delta=1e-5)
    assert ledger.spent() == 0.0 and ledger.releases() == 0 and not ledger.exhausted
    for r in range(5):
        spent = ledger.record_release(round=r, noise_multiplier=3.0)
    spent = ledger.record_release(round=5, noise_multiplier=4.5)
    acc = RdpAccountant()
    acc.add_gaussian(3.0, 5)
    acc.add_gaussian(4.5, 1)
    assert spent == pytest.approx(acc.epsilon(1e-5)[0], rel=1e-12)

    again = PrivacyLedger.open(path)
    assert again.releases() == 6
    assert again.spent() == ledger.spent() == spent
    assert again.epsilon_budget == 10.0 and again.delta == 1e-5
    assert again.recent_releases() == [(0, 3.0), (1, 3.0), (2, 3.0), (3, 3.0), (4, 3.0), (5, 4.5)]
    assert again.remaining() == pytest.approx(10.0 - spent)
    # the reopened ledger keeps counting from where it was
    again.record_release(round=6, noise_multiplier=3.0)
    assert PrivacyLedger.open(path).releases() == 7


def test_file_content_is_documented_json_with_checksum(path: Path) -> None:
    ledger = PrivacyLedger.create(path, epsilon_budget=5.0, delta=1e-6)
    ledger.record_release(round=3, noise_multiplier=8.0)
    data = path.read_bytes()
    outer = json.loads(data)
    assert set(outer) == {"body", "sha256"} and data.endswith(b"\n")
    body = outer["body"]
    assert body["format"] == "p2pfed-privacy-ledger" and body["version"] == 1
    assert body["epsilon_budget"] == 5.0 and body["delta"] == 1e-6
    assert body["releases"] == 1
    assert body["by_noise_multiplier"] == [{"noise_multiplier": 8.0, "count": 1}]
    assert body["recent"] == [{"round": 3, "noise_multiplier": 8.0}]
    assert body["epsilon_spent"] == pytest.approx(epsilon_for(8.0, 1, 1e-6), rel=1e-12)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert outer["sha256"] == hashlib.sha256(canonical).hexdigest()


def test_file_stays_small_over_many_rounds(path: Path) -> None:
    ledger = PrivacyLedger.create(path, epsilon_budget=1e9, delta=1e-5)
    for r in range(300):
        ledger.record_release(round=r, noise_multiplier=50.0 if r % 2 else 60.0)
    size_300 = path.stat().st_size
    reopened = PrivacyLedger.open(path)
    assert reopened.releases() == 300
    assert [r for r, _ in reopened.recent_releases()] == list(range(300 - RECENT_RELEASES, 300))
    assert size_300 < 4096  # constant size: counts per noise multiplier + a fixed window


def test_mode_is_0600(path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        ledger = PrivacyLedger.create(path, epsilon_budget=1.0, delta=1e-5)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        ledger.record_release(round=0, noise_multiplier=10.0)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_create_refuses_an_existing_file(path: Path) -> None:
    PrivacyLedger.create(path, epsilon_budget=1.0, delta=1e-5).record_release(
        round=0, noise_multiplier=10.0
    )
    before = path.read_bytes()
    with pytest.raises(LedgerError, match="already exists"):
        PrivacyLedger.create(path, epsilon_budget=100.0, delta=1e-5)
    assert path.read_bytes() == before


def test_budget_refusal_writes_nothing(path: Path) -> None:
    z = 2.0
    budget = epsilon_for(z, 3, 1e-5) * 1.0001  # room for exactly three releases
    ledger = PrivacyLedger.create(path, epsilon_budget=budget, delta=1e-5)
    for r in range(3):
        assert not ledger.would_exceed(z)
        ledger.record_release(round=r, noise_multiplier=z)
    assert ledger.exhausted and ledger.would_exceed(z)
    assert not ledger.would_exceed(1000.0)  # a much noisier release would still fit
    before = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    with pytest.raises(PrivacyBudgetExceeded, match="stop contributing"):
        ledger.record_release(round=3, noise_multiplier=z)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert ledger.releases() == 3
    assert PrivacyLedger.open(path).releases() == 3


def test_budget_too_small_for_any_first_release(path: Path) -> None:
    ledger = PrivacyLedger.create(path, epsilon_budget=0.01, delta=1e-5)
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.record_release(round=0, noise_multiplier=1.0)
    assert PrivacyLedger.open(path).releases() == 0


def test_missing_file_is_an_error_never_a_fresh_start(path: Path) -> None:
    with pytest.raises(LedgerError, match="does not exist") as info:
        PrivacyLedger.open(path)
    assert "never delete" in str(info.value) and "PrivacyLedger.create" in str(info.value)
    assert not path.exists()


def test_unreadable_or_oversized_file(path: Path, tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="directory"):
        PrivacyLedger.open(tmp_path)
    path.write_bytes(b" " * (MAX_LEDGER_BYTES + 1))
    with pytest.raises(LedgerError, match="more than"):
        PrivacyLedger.open(path)


def _valid(path: Path) -> bytes:
    ledger = PrivacyLedger.create(path, epsilon_budget=20.0, delta=1e-5)
    for r in range(4):
        ledger.record_release(round=r, noise_multiplier=2.5)
    return path.read_bytes()


def _rewrite_body(path: Path, data: bytes, edit: object, *, fix_checksum: bool) -> None:
    outer = json.loads(data)
    body = outer["body"]
    edit(body)  # type: ignore[operator]
    body_bytes = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(body_bytes).hexdigest() if fix_checksum else outer["sha256"]
    path.write_bytes(b'{"body":' + body_bytes + b',"sha256":"' + digest.encode() + b'"}\n')


def test_truncated_file_is_corrupt(path: Path) -> None:
    data = _valid(path)
    for cut in (0, 1, len(data) // 2, len(data) - 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(LedgerError, match="corrupt"):
            PrivacyLedger.open(path)


def test_every_flipped_byte_is_detected(path: Path) -> None:
    data = _valid(path)
    rng = np.random.default_rng(5)
    positions = sorted(set(rng.integers(0, len(data), 60).tolist()) | {0, 10, len(data) - 1})
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(damaged))
        with pytest.raises(LedgerError):
            PrivacyLedger.open(path)


def test_edited_count_with_stale_checksum_is_detected(path: Path) -> None:
    data = _valid(path)

    def forget(body: dict) -> None:
        body["by_noise_multiplier"][0]["count"] = 1
        body["releases"] = 1

    _rewrite_body(path, data, forget, fix_checksum=False)
    with pytest.raises(LedgerError, match="checksum"):
        PrivacyLedger.open(path)


def test_wrong_version_is_refused(path: Path) -> None:
    data = _valid(path)
    _rewrite_body(path, data, lambda b: b.update(version=4), fix_checksum=True)
    with pytest.raises(LedgerError, match="version 4"):
        PrivacyLedger.open(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b.update(releases=3),  # total disagrees with the counts
        lambda b: b.update(epsilon_spent=0.001),  # stored epsilon disagrees
        lambda b: b.update(epsilon_budget=0.5),  # spent above budget
        lambda b: b.update(delta=1.5),
        lambda b: b.update(format="something-else"),
        lambda b: b.update(extra=1),
        lambda b: b.pop("recent"),
        lambda b: b["by_noise_multiplier"][0].update(noise_multiplier=-2.5),
        lambda b: b["by_noise_multiplier"][0].update(count=True),
        lambda b: b["recent"][0].update(noise_multiplier=9.0),
        lambda b: b["recent"].pop(),
    ],
)
def test_inconsistent_fields_are_corrupt(path: Path, edit: object) -> None:
    data = _valid(path)
    _rewrite_body(path, data, edit, fix_checksum=True)
    with pytest.raises(LedgerError, match="corrupt"):
        PrivacyLedger.open(path)


def test_bad_arguments(path: Path) -> None:
    with pytest.raises(ValueError, match="epsilon_budget"):
        PrivacyLedger.create(path, epsilon_budget=0.0, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger.create(path, epsilon_budget=1.0, delta=0.0)
    assert not path.exists()
    ledger = PrivacyLedger.create(path, epsilon_budget=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="round"):
        ledger.record_release(round=-1, noise_multiplier=10.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ledger.record_release(round=0, noise_multiplier=0.0)
    assert PrivacyLedger.open(path).releases() == 0


def test_unwritable_directory_records_nothing(path: Path, tmp_path: Path) -> None:
    ledger = PrivacyLedger.create(path, epsilon_budget=10.0, delta=1e-5)
    if os.geteuid() == 0:
        # root ignores permission bits: make the temp-file name a directory instead
        os.mkdir(tmp_path / f".{LEDGER_FILE_NAME}.tmp-{os.getpid()}")
    else:
        tmp_path.chmod(0o500)
    try:
        with pytest.raises(LedgerError, match="must not be sent"):
            ledger.record_release(round=0, noise_multiplier=5.0)
    finally:
        tmp_path.chmod(0o700)
    assert ledger.releases() == 0 and PrivacyLedger.open(path).releases() == 0


_FORKER = """
import os
import sys
from p2pfed.ledger import PrivacyLedger  # imported once (it imports torch): children fork
for _ in sys.stdin:  # one line per child
    pid = os.fork()
    if pid == 0:
        ledger = PrivacyLedger.open(sys.argv[1])
        round_ = ledger.releases()
        print(f"pid {os.getpid()}", flush=True)
        while True:
            ledger.record_release(round=round_, noise_multiplier=1000.0)
            round_ += 1
            print(ledger.releases(), flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"status {status}", flush=True)
"""
"""Forks one ledger-writing child per line of input and reports how it ended: a fresh
process per kill, without paying the interpreter's and torch's start-up each time."""


def test_kill_9_never_forgets_a_recorded_release(path: Path) -> None:
    PrivacyLedger.create(path, epsilon_budget=1e6, delta=1e-5)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = np.random.default_rng(11)
    # (lines to read before the kill, extra sleep in seconds): kills land right after a
    # record returned, and at random points inside the next write
    plan = [(1, 0.0), (3, 0.001), (10, 0.0), (5, 0.003), (20, 0.0005), (2, 0.01), (7, 0.0)]
    plan += [(int(rng.integers(1, 30)), float(rng.uniform(0, 0.005))) for _ in range(8)]
    errors = path.parent / "forker.err"
    with errors.open("w") as stderr:
        forker = subprocess.Popen(
            [sys.executable, "-c", _FORKER, str(path)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert forker.stdin is not None and forker.stdout is not None
    try:
        for lines, sleep in plan:
            forker.stdin.write("fork\n")
            forker.stdin.flush()
            first = forker.stdout.readline()
            assert first.startswith("pid "), f"no child: {first!r} {errors.read_text()}"
            child = int(first.split()[1])
            last = None
            try:
                for _ in range(lines):
                    line = forker.stdout.readline()
                    assert not line.startswith("status"), f"child died early: {errors.read_text()}"
                    last = int(line)
                time.sleep(sleep * float(rng.uniform(0.5, 1.5)))
            finally:
                os.kill(child, signal.SIGKILL)
            # read what the child printed before dying: those records had returned
            while not (line := forker.stdout.readline()).startswith("status"):
                assert line, f"the forker died: {errors.read_text()}"
                last = int(line)
            status = int(line.split()[1])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert last is not None
            reopened = PrivacyLedger.open(path)
            # at most one record (written, killed before printing) more than the child reported
            assert last <= reopened.releases() <= last + 1
    finally:
        forker.kill()
        forker.wait()
