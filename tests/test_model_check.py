"""The Promela model of the group protocol verifies with spin, and spin catches planted bugs.

spec/model/check.sh builds and runs spin's verifier for every configuration of
spec/model/group.pml (see spec/model/README.md). These tests need ``spin`` and ``gcc``:
they fail, not skip, when spin is missing, since a silently skipped model check would
hide that the protocol is no longer checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parent.parent / "spec" / "model"
CHECK = MODEL_DIR / "check.sh"

pytestmark = pytest.mark.spin


def _run_check(*args: str, pan_cflags: str = "") -> subprocess.CompletedProcess[str]:
    missing = [tool for tool in ("spin", "gcc") if shutil.which(tool) is None]
    assert not missing, (
        f"{' and '.join(missing)} not found: the group protocol model check needs them. "
        "Install with: apt-get update && apt-get install -y spin gcc"
    )
    return subprocess.run(
        ["bash", str(CHECK), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=MODEL_DIR,
        env={**os.environ, "PAN_CFLAGS": pan_cflags},
    )


def test_group_model_verifies() -> None:
    result = _run_check()
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"spin found a problem in spec/model/group.pml:\n{output}"
    assert "model check passed" in output
    assert "FAIL" not in output


@pytest.mark.parametrize(
    ("bug", "config", "expected"),
    [
        # a member applies the sum holding only k-1 reduced shards: masks are left
        ("BUG_APPLY_EARLY", "crash4", "assertion violated"),
        # a member reduces its shard holding only k-1 shards: masks are left
        ("BUG_REDUCE_EARLY", "crash4", "assertion violated"),
        # a stale shard of an aborted group is summed into the next group
        ("BUG_NO_GROUP_CHECK", "race3-withdraw", "assertion violated"),
        # a RUNNING member neither notices a lost member nor has a deadline: it waits forever
        ("BUG_NO_ABORT_ON_LOSS", "crash4", "assertion violated"),
        # weight shares rounded down: a group no longer conserves its total weight
        ("BUG_SHARE_ROUNDING", "crash4", "assertion violated"),
    ],
)
def test_model_check_catches_planted_bug(bug: str, config: str, expected: str) -> None:
    # -O0: spin stops at the first error, a few seconds of search at most, where gcc -O2
    # alone would take longer than the whole run
    result = _run_check("--only", config, f"-D{bug}", pan_cflags="-O0")
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"spin did not catch {bug} in {config}:\n{output}"
    assert f"FAIL  {config}" in output
    assert expected in output
