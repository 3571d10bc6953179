"""Test-run wide settings: one torch thread per process, and how pytest-xdist may spread
the tests over its workers.

pyproject.toml runs the suite with ``-n logical --dist loadgroup``: tests go to whichever
worker is free, except those given the same ``xdist_group`` here, which share a worker:

* every ``multicast`` test, so that two mDNS tests never answer each other's queries on
  the loopback interface at the same time (their federations differ, but the packets and
  the shared port 5353 do not);
* the tests of a module that has a module- or class-scoped fixture, so that its expensive
  setup (a simnet run, a node process) is made once, not once per worker.

The longest single-process test is collected first (``SLOW_FIRST``): a worker that picks
up the 80-second model check near the end of the run would otherwise keep the run going
alone while the other worker idles.
"""

from __future__ import annotations

import os
import sys

import pytest

# One torch (OpenMP) thread per process: xdist already runs a worker per logical CPU, and
# the node, CLI and demo processes the tests start inherit this. With a thread per core in
# every worker, each of them spin-waits for CPUs the others hold: on this 2-core machine
# at load 13 to 15 the demo's centralized baseline took 119 s with 2 threads, 5 s with 1.
# Set before torch is first imported (it reads the variable once), for this process too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # a plugin imported it first: the variable came too late
    sys.modules["torch"].set_num_threads(1)


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        definition.scope in ("module", "class")
        for definitions in info.name2fixturedefs.values()
        for definition in definitions
    )


SLOW_FIRST = ("test_model_check.py::test_group_model_verifies",)
"""Node-id fragments of tests to start first, longest first: only single-process CPU work
(the spin model check: gcc and pan). Moving the multi-process tests (conformance, daemon,
demo, simnet heal) to the front as well made both workers run them at once and oversubscribe
the 2 cores: the run took 6:52 instead of 5:57, and two real-node tests timed out."""


def _slowness(item: pytest.Item) -> int:
    for rank, fragment in enumerate(SLOW_FIRST):
        if fragment in item.nodeid:
            return rank
    return len(SLOW_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_slowness)  # stable: the rest keep their order
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        if item.get_closest_marker("multicast") is not None:
            item.add_marker(pytest.mark.xdist_group("multicast"))
        elif _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
