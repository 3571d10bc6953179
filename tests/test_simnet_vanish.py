"""Silent faults in simnet (issue 15): a node that vanishes without a reset, a router link
cut that heals, and the checks that judge them (pace, failure detected, merged).

The network-level tests pin down what "silent" means (nothing arrives, nothing is reset,
dials time out instead of being refused). The scenario tests run
``simnet/scenarios/silent_vanish.toml`` and ``router_cut.toml`` as shipped (a few seconds
of CPU each) with the real node code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from test_simnet_network import connected_pair, two_hosts

import p2pfed.channel_pool
from p2pfed.errors import ConfigError
from simnet.scenario import load_scenario, parse_scenario
from simnet.simulation import Simulation, SimulationResult, run_simulation

SCENARIOS = Path(__file__).resolve().parent.parent / "simnet" / "scenarios"


# -- the network ----------------------------------------------------------------------------


async def test_a_vanished_host_is_silent_not_reset(autojump_clock: trio.testing.MockClock) -> None:
    net, a, b = two_hosts(latency=0.01)
    client, server = await connected_pair(a, b)
    net.vanish("10.0.0.2")
    # its node is cancelled: closing its end must reach nobody (a crash would reset)
    await server.aclose()
    await client.send_all(b"into the void")  # no reset, no error: the data is lost
    with trio.move_on_after(120) as scope:
        await client.receive_some()
    assert scope.cancelled_caught  # no end of stream, no reset: silence
    with pytest.raises(OSError, match="timed out"):  # not "refused", as after a crash
        await a.connect("10.0.0.2", 7447)
    assert net.stats.resets == 0
    net.restore("10.0.0.2")  # back up: it no longer knows the old connection
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"hello again")


async def test_a_crashed_host_by_contrast_resets_and_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, a, b = two_hosts(latency=0.01)
    client, _ = await connected_pair(a, b)
    net.crash("10.0.0.2")
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    with pytest.raises(OSError, match="refused"):
        await a.connect("10.0.0.2", 7447)


async def test_drop_mode_partition_loses_crossing_streams_for_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net, a, b = two_hosts(latency=0.01)
    client, server = await connected_pair(a, b)
    net.partition([["10.0.0.1"]], mode="drop")
    await client.send_all(b"lost")
    net.heal()
    await client.send_all(b"also lost")  # the router forgot the connection
    with trio.move_on_after(120) as scope:
        await server.receive_some()
    assert scope.cancelled_caught
    assert net.stats.resets == 0
    fresh = await a.connect("10.0.0.2", 7447)  # new connections work after the heal
    await fresh.send_all(b"new")
    listener = net._hosts["10.0.0.2"].listeners[7447]
    accepted = await listener.accept()
    assert await accepted.receive_some() == b"new"


# -- scenario files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[partitions]]\nstart = 1\ncut = [[1, 2, 3]]", "pair of node indices"),
        ("[[partitions]]\nstart = 1\ncut = [[1, 1]]", "names one node twice"),
        ("[[partitions]]\nstart = 1\ncut = [[0, 1]]\nsplit = 0.5", "not several"),
        ("[[partitions]]\nstart = 1\ngroups = [[0]]\nmode = 'lose'", '"drop"'),
        ("[[events]]\nat = 1\naction = 'vanish'", "name the nodes"),
        ("[checks]\npace = 80", r"between 0 \(off\) and 1"),
        ("[checks]\npace_window = 0", "pace_window"),
        ("[checks]\nmerged = 1.5", "merged must be an integer"),
    ],
)
def test_fault_keys_are_validated(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_scenario("[nodes]\ncount = 4\n" + text)


@pytest.mark.parametrize(
    ("topology", "cut", "message"),
    [
        ("kind = 'ring'", "[[0, 2]]", "not in the topology"),
        ("kind = 'ring'", "[[0, 1]]", "still connected"),
        ("kind = 'complete'", "[[0, 1]]", "topology with edges"),
    ],
)
def test_a_cut_must_separate_the_topology(
    tmp_path: Path, topology: str, cut: str, message: str
) -> None:
    scenario = parse_scenario(
        f"[nodes]\ncount = 4\n[topology]\n{topology}\n[[partitions]]\nstart = 1\ncut = {cut}"
    )
    with pytest.raises(ValueError, match=message):
        Simulation(scenario, tmp_path)


def test_a_cut_splits_at_the_router_link(tmp_path: Path) -> None:
    simulation = Simulation(load_scenario(SCENARIOS / "router_cut.toml"), tmp_path)
    assert simulation.cut_sides == [[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]]


def test_existing_scenarios_get_no_fault_checks() -> None:
    # the new checks are off unless asked for: older scenarios' verdicts stay as they were
    scenario = load_scenario(SCENARIOS / "faults.toml")
    assert not (scenario.checks.pace or scenario.checks.detect_within or scenario.checks.merged)


# -- the scenarios, run -----------------------------------------------------------------------


def _verdicts(result: SimulationResult) -> dict[str, bool]:
    return {check.name: check.passed for check in result.checks}


@pytest.fixture(scope="module")
def vanish_run(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    scenario = load_scenario(SCENARIOS / "silent_vanish.toml")
    return run_simulation(scenario, tmp_path_factory.mktemp("vanish"))


@pytest.fixture(scope="module")
def router_run(tmp_path_factory: pytest.TempPathFactory) -> SimulationResult:
    scenario = load_scenario(SCENARIOS / "router_cut.toml")
    return run_simulation(scenario, tmp_path_factory.mktemp("router"))


@pytest.fixture
def idle_timeout_liveness() -> Iterator[None]:
    """The node as before fast failure detection: a silent peer counts as responsive until
    the 60 s idle timeout closes its channel."""
    saved = p2pfed.channel_pool.LIVENESS_DEADLINE
    p2pfed.channel_pool.LIVENESS_DEADLINE = 60.0
    try:
        yield
    finally:
        p2pfed.channel_pool.LIVENESS_DEADLINE = saved


def test_a_silently_vanished_node_is_detected_within_seconds(
    vanish_run: SimulationResult,
) -> None:
    [fault] = vanish_run.summary["faults"]
    assert fault["kind"] == "vanish" and fault["sides"][0]["live"] == 5
    assert fault["detected_after"] is not None and fault["detected_after"] <= 5.0
    verdicts = _verdicts(vanish_run)
    assert verdicts["failure detected"]
    assert verdicts["models finite"] and verdicts["conservation"]
    assert vanish_run.summary["crashes"] == 1  # a vanish counts as a crash
    # its peers dialled the silent address (bootstrap, group messages) and timed out: no
    # such failure ends a node
    assert vanish_run.summary["live_nodes"] == 5 and vanish_run.stats.connect_failures > 0


def test_without_fast_detection_the_vanish_checks_fail(
    tmp_path: Path, idle_timeout_liveness: None
) -> None:
    # the same run, with the node noticing the silent peer only by the idle timeout: the
    # checks must catch it (this is what they are for)
    result = run_simulation(load_scenario(SCENARIOS / "silent_vanish.toml"), tmp_path)
    verdicts = _verdicts(result)
    assert not verdicts["failure detected"]
    assert not verdicts["pace"]
    [fault] = result.summary["faults"]
    side = fault["sides"][0]
    assert side["rate_during"] < 0.8 * side["rate_before"]  # the others slowed down
    assert result.summary["why"].startswith("pace:")


def test_the_others_keep_their_pace_when_a_node_vanishes(vanish_run: SimulationResult) -> None:
    # node 5 vanishes in the middle of an all-reduce (in_group = true)
    assert all(_verdicts(vanish_run).values()), [c.line() for c in vanish_run.checks]
    [fault] = vanish_run.summary["faults"]
    side = fault["sides"][0]
    assert side["rate_during"] >= 0.8 * side["rate_before"] > 0


def test_the_sites_detect_the_cut_and_merge_after_the_heal(router_run: SimulationResult) -> None:
    verdicts = _verdicts(router_run)
    for name in ("failure detected", "merged", "progress after heal", "consensus after heal"):
        assert verdicts[name], [c.line() for c in router_run.checks]
    [fault] = router_run.summary["faults"]
    assert fault["healed"] and fault["cross_groups_after_heal"] >= 3
    # the sites drifted to their own means during the cut, and came back together
    assert fault["side_gap_at_end"] < fault["side_gap_at_heal"] / 10
    for side in fault["sides"]:  # each site of 5 >= group_min kept its rounds going
        assert side["live"] == 5
        assert side["rate_during"] >= 0.8 * side["rate_before"]


def test_no_node_of_a_site_stalls_during_the_cut(router_run: SimulationResult) -> None:
    """A member of a running group that goes silent across the cut is lost to the group
    after the liveness deadline (spec/transport.md, section 6), as if its channel had
    closed: before, node 6 sat in a group spanning the cut from t=10 until the heal
    (the all-reduce timeout is 30 s) and the pace check failed for it."""
    assert all(_verdicts(router_run).values()), [c.line() for c in router_run.checks]


def test_sites_merge_after_a_router_that_forgot_its_connections(tmp_path: Path) -> None:
    """Channels that went silent for good (mode = "drop": a router that lost its
    connection state) close after the idle timeout, 15 s, and the peers dial each other
    again after the heal: with the old 60 s idle timeout no group spanned the sites in
    the 20 s after the heal."""
    text = (SCENARIOS / "router_cut.toml").read_text()
    text = text.replace('mode = "stall"', 'mode = "drop"').replace("duration = 45", "duration = 50")
    scenario = parse_scenario(text, base=SCENARIOS)
    assert scenario.partitions[0].mode == "drop" and scenario.duration == 50
    result = run_simulation(scenario, tmp_path)
    # 20 s after the heal: enough for the stall-mode run to merge (20 groups across)
    assert _verdicts(result)["merged"], [c.line() for c in result.checks]
