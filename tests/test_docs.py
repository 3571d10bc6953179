"""The documentation site builds with warnings as errors, and the API reference renders
every public module from its docstrings (mkdocs.yml, docs/api.md, docs/hooks.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "p2pfed.task",
    "p2pfed.partition",
    "p2pfed.proximal",
    "p2pfed.server_optimizer",
    "p2pfed.run",
    "p2pfed.export",
)


def test_strict_build_renders_the_api_reference(tmp_path: Path) -> None:
    pytest.importorskip("mkdocstrings_handlers.python", reason="pip install -e '.[docs]'")
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    api = (site / "api" / "index.html").read_text()
    headings = set(re.findall(r'<h\d[^>]*\bid="([\w.]+)"', api))
    for name in (*MODULES, "p2pfed.node.Node", "p2pfed.node.NodeOptions"):
        assert name in headings, f"{name} is missing from the API reference"
    # the docstrings' Sphinx roles became code (and links where the page has the target)
    assert not re.search(r":(class|func|meth|mod|data|attr|exc):<code>", api)
    assert '<a href="#p2pfed.task.Task"><code>Task</code></a>' in api
    # doctests render as code blocks, not as nested quotes
    assert "&gt;&gt;&gt; [p.tolist() for p in iid(" in api
    assert not (site / "hooks.py").exists()
