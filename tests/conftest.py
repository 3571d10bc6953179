"""Test-run wide settings: how pytest-xdist may spread the tests over its workers.

pyproject.toml runs the suite with ``-n logical --dist loadgroup``: tests go to whichever
worker is free, except those given the same ``xdist_group`` here, which share a worker:

* every ``multicast`` test, so that two mDNS tests never answer each other's queries on
  the loopback interface at the same time (their federations differ, but the packets and
  the shared port 5353 do not);
* the tests of a module that has a module- or class-scoped fixture, so that its expensive
  setup (a simnet run, a node process) is made once, not once per worker.
"""

from __future__ import annotations

import pytest


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        definition.scope in ("module", "class")
        for definitions in info.name2fixturedefs.values()
        for definition in definitions
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        if item.get_closest_marker("multicast") is not None:
            item.add_marker(pytest.mark.xdist_group("multicast"))
        elif _shares_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
