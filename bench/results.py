"""Recorded benchmark results, so that a slowdown shows up in review.

Each benchmark prints its result with the last recorded run of the same benchmark beside
it (``"last_recorded"``), and ``--record`` replaces the record in ``bench/results/<name>.json``
(commit it with the change that moved the numbers). Records are only comparable when made
on the same kind of machine; each one says where it was made.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def report(name: str, result: dict, *, record: bool = False) -> dict:
    """Attach the last recorded result of ``name``; with ``record``, store this one."""
    path = RESULTS / f"{name}.json"
    last = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    if record:
        RESULTS.mkdir(exist_ok=True)
        stored = dict(result)
        stored["recorded"] = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        }
        path.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {**result, "last_recorded": last}
