"""``python -m p2pfed.vectorgen [DIR]``: rewrite the test vectors (default spec/vectors)."""

import sys
from pathlib import Path

from p2pfed.vectorgen import write_all

target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("spec/vectors")
for path in write_all(target):
    print(f"wrote {path}")
