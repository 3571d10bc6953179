"""Replay inputs through a harness without atheris: ``python -m fuzz.replay TARGET PATH...``.

Each PATH is a file or a directory of inputs (a corpus, or crash files written by a
run). Prints one line per failing input and a summary; exits non-zero if any failed.
Runs under ``coverage run`` to measure what a corpus reaches (fuzz/README.md).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from fuzz import make_corpus


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in make_corpus.TARGETS:
        names = ", ".join(make_corpus.TARGETS)
        print(f"usage: python -m fuzz.replay TARGET PATH... (TARGET: {names})", file=sys.stderr)
        return 2
    test_one_input = make_corpus.TARGETS[argv[0]][0]
    files: list[Path] = []
    for arg in argv[1:]:
        path = Path(arg)
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    failed = 0
    for path in files:
        try:
            test_one_input(path.read_bytes())
        except Exception:
            failed += 1
            print(f"FAIL {path}", file=sys.stderr)
            traceback.print_exc()
    print(f"{argv[0]}: {len(files)} inputs, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
