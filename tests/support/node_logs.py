"""Reading a node process's JSON log (``p2pfed node --log-json``) from tests."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def rounds_logged(log: Path) -> int:
    """The highest round a node has logged as completed so far (0 if none)."""
    best = 0
    for line in log.read_text(encoding="utf-8").splitlines():
        if line.startswith("{") and '"event": "round"' in line:
            with contextlib.suppress(json.JSONDecodeError, KeyError):
                best = max(best, json.loads(line)["round"])
    return best
