"""Every vector file in spec/vectors/ is exactly what the code generates, and verifies."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from p2pfed.vectorgen import generator_modules, render

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
MODULES = generator_modules()


def test_there_are_vector_generators() -> None:
    assert MODULES, "no vector generator modules found in p2pfed/vectorgen"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.NAME)
def test_vector_file_matches_code(module: ModuleType) -> None:
    path = VECTORS / f"{module.NAME}.json"
    assert path.exists(), f"{path} missing: run python -m p2pfed.vectorgen"
    assert path.read_text(encoding="utf-8") == render(module.generate()), (
        f"{path} is stale: the code now generates different vectors. If the protocol change "
        "is intended, update the spec and run python -m p2pfed.vectorgen"
    )


@pytest.mark.parametrize(
    "module", [m for m in MODULES if hasattr(m, "verify")], ids=lambda m: m.NAME
)
def test_vector_file_verifies(module: ModuleType) -> None:
    path = VECTORS / f"{module.NAME}.json"
    module.verify(json.loads(path.read_text(encoding="utf-8")))


def test_index_lists_every_vector_file() -> None:
    index = (VECTORS / "README.md").read_text(encoding="utf-8")
    for module in MODULES:
        assert f"`{module.NAME}.json`" in index
