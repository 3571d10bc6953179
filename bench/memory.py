"""Memory of a set of processes, read from ``/proc`` (Linux).

Four views, because "the RSS of 16 processes" has more than one meaning:

* **RSS** per process: resident pages mapped by that process, shared or not;
* **summed RSS**: the sum over processes; a page shared by 16 processes (a library's
  code, copy-on-write memory inherited from a fork server) is counted 16 times, so this
  overstates what the processes occupy;
* **PSS** (proportional set size): each shared page divided among the processes that map
  it; summed over a set of processes that share only among themselves, it is the
  physical memory of the set;
* **unique resident**: the distinct physical pages resident in any process of the set,
  each counted once (from ``/proc/PID/pagemap``; needs root to see page frame numbers,
  ``None`` otherwise). This is the set's resident set size: what the machine would get
  back if every process in the set exited (plus page cache still used by others).
"""

from __future__ import annotations

import os
import statistics
import struct
from pathlib import Path
from typing import Any

__all__ = ["process_memory", "unique_resident_bytes"]

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1


def process_memory(pid: int) -> dict[str, int]:
    """RSS, peak RSS, PSS and USS (private pages) of one process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {
        key: value.split()[0]
        for key, _, value in (line.partition(":") for line in status.splitlines())
        if value.split()
    }
    rollup: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, value = line.partition(":")
            if value.split():
                rollup[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return {
        "rss": int(fields["VmRSS"]) * 1024,
        "peak_rss": int(fields["VmHWM"]) * 1024,
        "pss": rollup.get("Pss", 0),
        "uss": rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
    }


def _resident_frames(pid: int) -> set[int] | None:
    frames: set[int] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            span = line.split(None, 1)[0]
            start, end = (int(x, 16) for x in span.split("-"))
            if start >= 1 << 47:  # [vsyscall]: not in pagemap
                continue
            pagemap.seek(start // PAGE * 8)
            data = pagemap.read((end - start) // PAGE * 8)
            for (entry,) in struct.iter_unpack("<Q", data):
                if entry & _PRESENT:
                    frame = entry & _PFN_MASK
                    if frame == 0:  # frame numbers hidden: not root
                        return None
                    frames.add(frame)
    return frames


def unique_resident_bytes(pids: list[int]) -> int | None:
    """Bytes of distinct physical pages resident in any of ``pids`` (None without root)."""
    union: set[int] = set()
    for pid in pids:
        try:
            frames = _resident_frames(pid)
        except (OSError, PermissionError):
            return None
        if frames is None:
            return None
        union |= frames
    return len(union) * PAGE


def memory_summary(pids: list[int], extra: list[int]) -> dict[str, Any]:
    """The memory of a federation's processes ``pids`` and of ``extra`` (a fork server,
    whose pages the children share), in MB: per-process RSS (max, median, peak) and USS
    (median), and for all together the PSS total, the distinct resident pages (PSS
    without root), the fork server's RSS and the plain sum of per-process RSS."""
    mib = 1024 * 1024
    memory = [process_memory(pid) for pid in pids]
    host = [process_memory(pid) for pid in extra]
    unique = unique_resident_bytes(pids + extra)
    rss = [m["rss"] for m in memory]
    return {
        "processes": len(pids),
        "rss_max_mb": round(max(rss) / mib, 1),
        "rss_median_mb": round(statistics.median(rss) / mib, 1),
        "peak_rss_max_mb": round(max(m["peak_rss"] for m in memory) / mib, 1),
        "uss_median_mb": round(statistics.median(m["uss"] for m in memory) / mib, 1),
        "pss_total_mb": round(sum(m["pss"] for m in memory + host) / mib, 1),
        "rss_total_mb": round((unique or sum(m["pss"] for m in memory + host)) / mib, 1),
        "rss_total_kind": "distinct resident pages" if unique else "PSS (no root)",
        "fork_server_rss_mb": round(sum(m["rss"] for m in host) / mib, 1),
        "rss_summed_mb": round(sum(rss) / mib, 1),
    }
