"""The status file: writer and reader, rate limiting, the report, and ``p2pfed status``."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pfed import cli
from p2pfed.errors import StatusError
from p2pfed.status import (
    GROUP_HISTORY,
    STATUS_FILE_NAME,
    StatusWriter,
    format_status,
    pid_alive,
    read_status,
)

NODE_ID = "b3kq7x2m4n5p6r7s8t9v0w1x2y3z4a5b6c7d8e9f0g1h2j3k4m5n"
WALL = 1_795_000_000.0  # 2026-11-18T11:06:40Z (`date -u -d @1795000000`)


BOOTSTRAP: list[dict[str, Any]] = [
    {
        "address": "10.0.0.2:7447",
        "state": "connected",
        "id": "ab12cd34ef",
        "failed_attempts": 0,
        "failing_since": None,
        "next_attempt": None,
        "error": None,
    },
    {
        "address": "203.0.113.5:7447",
        "state": "failing",
        "id": None,
        "failed_attempts": 4,
        "failing_since": "2026-11-18T11:04:00Z",  # WALL - 160 s
        "next_attempt": "2026-11-18T11:07:20Z",  # WALL + 40 s
        "error": "no answer from 203.0.113.5:7447 within 5 s",
    },
    {
        "address": "[2001:db8::7]:7447",
        "state": "connecting",
        "id": None,
        "failed_attempts": 0,
        "failing_since": None,
        "next_attempt": None,
        "error": None,
    },
]


def _dead_pid() -> int:
    """A pid that cannot be alive: above the kernel's largest pid."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def _writer(node_dir: Path, **fields: Any) -> StatusWriter:
    return StatusWriter(
        node_dir, node_id=NODE_ID, listen="127.0.0.1:7447", wall_clock=lambda: WALL, **fields
    )


def _full_status(node_dir: Path, **fields: Any) -> StatusWriter:
    w = _writer(node_dir, **fields)
    w.update(
        0.0,
        state="running",
        round=12,
        accuracy=0.9312,
        loss=0.2112,
        epsilon_spent=1.5,
        epsilon_budget=8.0,
        dp_enabled=True,
        peers=[
            {"id": "ab12cd34ef", "address": "10.0.0.2:7447", "connected": True},
            {"id": "zz99yy88xx", "address": "[fd00::3]:7447", "connected": False},
        ],
    )
    w.record_group(1.0, group_id=bytes(range(32)), size=4, outcome="completed", seconds=1.8)
    w.record_group(
        2.0, group_id="ffee" * 8, size=3, outcome="aborted", seconds=30, reason="member dropped"
    )
    w.flush(2.0)
    return w


# --- writer and reader -----------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    w = _full_status(tmp_path)
    doc = read_status(tmp_path)
    assert doc == w.snapshot()
    assert doc["schema"] == 1
    assert doc["pid"] == os.getpid()
    assert doc["node_id"] == NODE_ID
    assert doc["state"] == "running"
    assert doc["listen"] == "127.0.0.1:7447"
    assert doc["round"] == 12
    assert doc["accuracy"] == 0.9312
    assert doc["dp_enabled"] is True
    assert doc["started_at"] == "2026-11-18T11:06:40Z"
    assert doc["updated_at"] == "2026-11-18T11:06:40Z"
    assert doc["peers"][1] == {"id": "zz99yy88xx", "address": "[fd00::3]:7447", "connected": False}
    assert doc["last_groups"] == [
        {"id": "000102030405", "size": 4, "outcome": "completed", "seconds": 1.8, "reason": None},
        {"id": "ffeeffeeffee", "size": 3, "outcome": "aborted", "seconds": 30.0,
         "reason": "member dropped"},
    ]  # fmt: skip
    path = tmp_path / STATUS_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != STATUS_FILE_NAME]  # no temp files


def test_nothing_is_written_before_the_first_call(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    assert not (tmp_path / STATUS_FILE_NAME).exists()
    assert w.pending
    assert w.poll(0.0)
    assert read_status(tmp_path)["state"] == "starting"


def test_rate_limiting(tmp_path: Path) -> None:
    w = _writer(tmp_path, min_interval=1.0)
    path = tmp_path / STATUS_FILE_NAME
    assert w.update(100.0, round=1)  # the first write is always due
    assert not w.pending
    assert w.write_due_at is None

    assert not w.update(100.2, round=2)  # too soon: kept, not written
    assert w.pending
    assert w.write_due_at == 101.0
    assert read_status(tmp_path)["round"] == 1
    assert not w.update(100.5, accuracy=0.5)
    assert not w.poll(100.9)
    assert read_status(tmp_path)["round"] == 1

    assert w.poll(101.0)  # due: both changes go out together
    doc = read_status(tmp_path)
    assert (doc["round"], doc["accuracy"]) == (2, 0.5)
    assert not w.poll(105.0)  # nothing pending, nothing written

    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert not w.update(200.0, round=2, accuracy=0.5)  # no change: no write
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before

    assert w.update(200.0, round=3)
    assert w.update(200.1, state="running")  # a state change is written at once
    assert not w.update(200.2, state="running", round=4)
    assert w.update(200.3, round=5, force=True)
    assert read_status(tmp_path)["round"] == 5
    assert not w.record_group(200.4, group_id=b"\x01" * 32, size=3, outcome="declined", seconds=0)
    assert w.flush(200.5)  # shutdown: written regardless of the interval
    assert read_status(tmp_path)["last_groups"][-1]["outcome"] == "declined"


def test_last_groups_keeps_the_newest_ten(tmp_path: Path) -> None:
    w = _writer(tmp_path, min_interval=0)
    for i in range(GROUP_HISTORY + 5):
        w.record_group(
            float(i), group_id=bytes([i]) * 32, size=3 + i, outcome="completed", seconds=i
        )
    groups = read_status(tmp_path)["last_groups"]
    assert len(groups) == GROUP_HISTORY
    assert [g["size"] for g in groups] == [3 + i for i in range(5, GROUP_HISTORY + 5)]
    assert groups[-1]["id"] == f"{GROUP_HISTORY + 4:02x}" * 6


def test_unknown_values_are_null(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    w.update(0.0, accuracy=float("nan"), loss=float("inf"), round=None)
    text = (tmp_path / STATUS_FILE_NAME).read_text()
    doc = json.loads(text)  # strict JSON: no NaN
    assert (doc["accuracy"], doc["loss"], doc["round"]) == (None, None, None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"colour": "red"}, "unknown status field 'colour'"),
        ({"last_groups": []}, "record_group"),
        ({"state": "exploding"}, '\'state\' must be "starting", "running"'),
        ({"round": -1}, "'round' must be at least 0"),
        ({"round": 1.5}, "'round' must be an int"),
        ({"accuracy": "high"}, "'accuracy' must be a number"),
        ({"local_epsilon_spent": "lots"}, "'local_epsilon_spent' must be a number"),
        ({"listen": 7447}, "'listen' must be a str"),
        ({"peers": "ab12"}, "'peers' must be a list"),
        ({"peers": [{"id": "a"}]}, "keys id, address, connected"),
        ({"bootstrap": "10.0.0.9:7447"}, "'bootstrap' must be a list"),
        ({"bootstrap": [{"address": "10.0.0.9:7447"}]}, "a bootstrap entry must be a mapping"),
        ({"bootstrap": [{**BOOTSTRAP[0], "state": "sulking"}]}, "'state' must be \"connected\""),
        ({"bootstrap": [{**BOOTSTRAP[0], "failed_attempts": -1}]}, "'failed_attempts' must"),
    ],
)
def test_bad_fields_are_rejected(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    w = _writer(tmp_path)
    with pytest.raises(ValueError, match=message):
        w.update(0.0, **fields)


def test_bad_group_is_rejected(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    with pytest.raises(ValueError, match="unknown group outcome"):
        w.record_group(0.0, group_id=b"x", size=3, outcome="won", seconds=1)
    with pytest.raises(ValueError, match="'size' must be at least 0"):
        w.record_group(0.0, group_id=b"x", size=-3, outcome="completed", seconds=1)


def test_write_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "not-created-yet"
    w = _writer(missing, min_interval=1.0)
    with caplog.at_level(logging.WARNING, logger="p2pfed.status"):
        assert not w.update(0.0, round=1)
        assert not w.update(0.1, round=2, force=True)
    assert w.pending
    assert [r.getMessage().startswith("cannot write") for r in caplog.records] == [True]
    missing.mkdir()
    assert not w.poll(0.5)  # the failed attempt counts for the rate limit
    assert w.poll(1.1)
    assert read_status(missing)["round"] == 2


# --- reading errors --------------------------------------------------------------------------


def test_read_missing_status(tmp_path: Path) -> None:
    with pytest.raises(StatusError) as info:
        read_status(tmp_path)
    assert str(info.value) == (
        f"no status.json in {tmp_path}: is a node running with this directory?"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not a p2pfed status document"),
        (b'{"schema": 99}', "not a p2pfed status document"),
        (b" " * (1024 * 1024 + 1), "larger than"),
    ],
)
def test_read_invalid_status(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / STATUS_FILE_NAME).write_bytes(content)
    with pytest.raises(StatusError, match=message):
        read_status(tmp_path)


# --- process liveness ------------------------------------------------------------------------


@pytest.mark.proc
def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(1)  # init exists (owned by root or another user: still alive)
    assert not pid_alive(_dead_pid())
    for bad in (0, -1, None, "123", True, 2**80):
        assert not pid_alive(bad)


@pytest.mark.proc
def test_pid_alive_sees_an_unreaped_process_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Wait for the exit but leave the zombie in place (WNOWAIT).
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert not pid_alive(child.pid)
    finally:
        child.wait()


# --- the report ------------------------------------------------------------------------------


def test_format_contains_the_key_facts(tmp_path: Path) -> None:
    _full_status(tmp_path)
    text = format_status(read_status(tmp_path), alive=True, now=WALL + 125)
    assert NODE_ID in text
    assert f"running (pid {os.getpid()})" in text
    assert "127.0.0.1:7447" in text
    assert "2026-11-18 11:06:40 UTC (2 min 5 s ago)" in text
    assert "round:      12" in text
    assert "accuracy 93.12 %" in text
    assert "loss 0.2112" in text
    assert "epsilon 1.500 spent of 8.000 (19 %)" in text
    assert "peers: 1 connected, 2 known" in text
    lines = text.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split() == ["ID", "ADDRESS", "CONNECTED"]
    )
    assert lines[header + 1].split() == ["ab12cd34ef", "10.0.0.2:7447", "yes"]
    assert lines[header + 2].split() == ["zz99yy88xx", "[fd00::3]:7447", "no"]
    group_header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["GROUP", "SIZE"])
    # Newest first.
    assert lines[group_header + 1].split() == [
        "ffeeffeeffee",
        "3",
        "aborted",
        "30.00",
        "member",
        "dropped",
    ]
    assert lines[group_header + 2].split() == ["000102030405", "4", "completed", "1.80"]


def test_distributed_dp_shows_both_epsilons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """dp_level = "distributed": the budgeted central epsilon and, beside it, the weaker
    local one against members who strip the masks, in the file, the report and --json."""
    w = _full_status(tmp_path)
    w.update(3.0, force=True, epsilon_spent=1.5, local_epsilon_spent=4.25)
    doc = read_status(tmp_path)
    assert doc["local_epsilon_spent"] == 4.25
    text = format_status(doc, alive=True, now=WALL)
    assert "epsilon 1.500 spent of 8.000 (19 %), 6.500 remaining" in text
    assert "local epsilon 4.250 spent against members who collude to strip the masks" in text
    assert cli.main(["status", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["local_epsilon_spent"] == 4.25


def test_one_guarantee_shows_no_local_epsilon(tmp_path: Path) -> None:
    # node and record level (and files of older nodes): null, and no line rather than a 0
    _full_status(tmp_path)
    doc = read_status(tmp_path)
    assert doc["local_epsilon_spent"] is None
    assert "local epsilon" not in format_status(doc, alive=True, now=WALL)
    older = {"schema": 1, "pid": 42, "state": "running", "epsilon_spent": 1.0, "peers": []}
    assert "local epsilon" not in format_status(older, now=WALL)
    off = {"schema": 1, "pid": 42, "state": "running", "dp_enabled": False,
           "local_epsilon_spent": 3.0}  # fmt: skip
    assert "local epsilon" not in format_status(off, now=WALL)


def test_bootstrap_addresses_round_trip_and_show_their_state(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    w.poll(0.0)
    assert read_status(tmp_path)["bootstrap"] == []  # none configured
    w.update(1.0, bootstrap=BOOTSTRAP)
    w.flush(1.0)
    doc = read_status(tmp_path)
    assert doc["bootstrap"] == BOOTSTRAP
    assert list(doc).index("bootstrap") == list(doc).index("peers") + 1
    text = format_status(doc, alive=True, now=WALL)
    assert "bootstrap: 1 of 3 connected" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["ADDRESS", "STATE"])
    assert lines[header].split() == [
        "ADDRESS", "STATE", "NODE", "FAILED", "FAILING", "SINCE", "NEXT", "TRY", "ERROR"
    ]  # fmt: skip
    assert lines[header + 1].split() == ["10.0.0.2:7447", "connected", "ab12cd34ef", "0", "-", "-"]
    assert lines[header + 2].split() == [
        "203.0.113.5:7447", "failing", "-", "4", "2", "min", "40", "s", "ago", "in", "40", "s",
        "no", "answer", "from", "203.0.113.5:7447", "within", "5", "s",
    ]  # fmt: skip
    assert lines[header + 3].split() == [
        "[2001:db8::7]:7447",
        "connecting",
        "-",
        "0",
        "-",
        "dialing",
    ]
    # without a clock the times are shown as they are
    assert "2026-11-18 11:07:20 UTC" in format_status(doc)


def test_bootstrap_errors_are_bounded_and_escaped(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    entry = {**BOOTSTRAP[1], "error": "peer refused the channel: \x1b[2J" + "x" * 1000}
    w.update(0.0, bootstrap=[entry])
    doc = read_status(tmp_path)
    assert len(doc["bootstrap"][0]["error"]) == 300
    text = format_status(doc, now=WALL)
    assert "\x1b" not in text and "\\x1b[2J" in text


def test_status_files_without_bootstrap_still_format() -> None:
    # written by a node from before the bootstrap field: no section, no error
    doc = {"schema": 1, "pid": 42, "state": "running", "peers": []}
    assert "bootstrap" not in format_status(doc, now=WALL)


def test_format_without_dp_and_when_dead() -> None:
    status = {"schema": 1, "pid": 42, "state": "stopped", "dp_enabled": False, "accuracy": None}
    text = format_status(status, alive=False)
    assert "not running (stopped cleanly; was pid 42)" in text
    assert "differential privacy OFF" in text
    assert "accuracy not measured yet" in text
    assert "no groups yet" in text


def test_format_tolerates_odd_documents() -> None:
    odd = {
        "schema": 1,
        "pid": "x",
        "round": "many",
        "accuracy": True,
        "epsilon_spent": "lots",
        "updated_at": "yesterday",
        "peers": [{"id": 1}, "junk", {"address": None}],
        "last_groups": "none",
    }
    text = format_status(odd, alive=True, now=WALL)
    assert "peers: 0 connected, 2 known" in text
    assert "updated:    yesterday" in text


def test_format_escapes_control_characters() -> None:
    status = {
        "schema": 1,
        "node_id": "n",
        "peers": [{"id": "ev\x1b[2Jil", "address": "1.2.3.4:1\r\nforged", "connected": True}],
    }
    text = format_status(status)
    assert "\x1b" not in text and "\r" not in text
    assert "ev\\x1b[2Jil" in text
    assert "forged" in text.splitlines()[-3]  # still on the peer's own line


# --- p2pfed status ---------------------------------------------------------------------------


def test_cli_running_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _full_status(tmp_path)  # pid = this process: alive
    assert cli.main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not running" not in out
    assert f"running (pid {os.getpid()})" in out
    assert "ab12cd34ef" in out


def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _full_status(tmp_path)
    assert cli.main(["status", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_status(tmp_path)


@pytest.mark.proc
def test_cli_dead_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _full_status(tmp_path, pid=_dead_pid())
    assert cli.main(["status", str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert out.startswith("node not running (last seen 2026-11-18 11:06:40 UTC, ")
    assert "not running (last state running" in out
    assert "ab12cd34ef" in out  # the last known facts are still shown
    assert cli.main(["status", str(tmp_path), "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["pid"] == _dead_pid()


def test_cli_stopped_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = _full_status(tmp_path)
    w.update(3.0, state="stopped")
    assert cli.main(["status", str(tmp_path)]) == 3  # even though our pid is alive
    assert "stopped cleanly" in capsys.readouterr().out


def test_cli_no_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"p2pfed: error: no status.json in {tmp_path}: is a node running with this directory?\n"
    )
    monkeypatch.setenv("P2PFED_HOME", str(tmp_path))  # the default directory
    _full_status(tmp_path)
    assert cli.main(["status"]) == 0
    assert NODE_ID in capsys.readouterr().out
