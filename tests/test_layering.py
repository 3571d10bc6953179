"""Layering (issue #13): the node does not import the simulator, and optional or heavy
dependencies load only when used (zeroconf when mDNS starts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return set(json.loads(out.splitlines()[-1]))


def test_the_node_and_its_cli_do_not_import_the_simulator() -> None:
    loaded = _modules_after("import p2pfed.cli, p2pfed.node, p2pfed.daemon, p2pfed.run")
    assert "p2pfed.node" in loaded
    assert not {m for m in loaded if m == "simnet" or m.startswith("simnet.")}


def test_zeroconf_loads_only_when_mdns_starts() -> None:
    loaded = _modules_after("import p2pfed.node, p2pfed.network, simnet.simulation")
    assert "p2pfed.discovery" in loaded
    assert "zeroconf" not in loaded


def test_the_cli_still_offers_simnet_when_it_is_installed() -> None:
    from p2pfed.cli import build_parser

    help_text = build_parser().format_help()
    assert "simnet" in help_text


def test_the_cli_starts_without_torch() -> None:
    # every `p2pfed status`, `federation show` ... would otherwise pay ~2 s of torch import
    loaded = _modules_after("import p2pfed.cli")
    assert "p2pfed.cli" in loaded
    assert "torch" not in loaded
