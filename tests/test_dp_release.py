"""A node's DP releases alone (p2pfed/dp_release.py): a real ledger in a temporary
directory, real noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio

from p2pfed.dp import release_cost
from p2pfed.dp_release import PrivateRelease
from p2pfed.federation import Federation, ProtocolParams
from p2pfed.ledger import PrivacyLedger, ledger_path
from p2pfed.round_rules import fixed_point_of


def private_release(tmp_path: Path, **params: object) -> PrivateRelease:
    federation = Federation.new("dp-release", params=ProtocolParams(**params))  # type: ignore[arg-type]
    privacy = PrivateRelease(federation, fixed_point_of(federation, 8), tmp_path, threads=False)
    privacy.open_ledger(resumed=False)
    return privacy


def test_each_release_is_in_the_ledger_when_it_is_returned(tmp_path: Path) -> None:
    privacy = private_release(tmp_path, dp_noise_multiplier=1.0, dp_epsilon_budget=25.0)
    cost = privacy.cost()
    assert cost is not None and privacy.ledger is not None
    start = np.zeros(16, np.float32)
    trained = np.full(16, 0.1, np.float32)
    noise = np.random.default_rng(1)
    released = trio.run(privacy.release, start, trained, 0, cost, noise)
    assert released.dtype == np.float32 and not np.array_equal(released, trained)
    # on disk, not only in memory: a crash right after the release still counts it
    assert PrivacyLedger.open(ledger_path(tmp_path)).releases() == 1
    assert privacy.carried_words(released, 1) is None  # node level: nothing in the ring


def test_a_spent_budget_stops_releases_and_says_so_once(tmp_path: Path) -> None:
    # one node-level release at sigma 1 costs about 10.7: 25 holds a few
    privacy = private_release(tmp_path, dp_noise_multiplier=1.0, dp_epsilon_budget=25.0)
    cost, ledger = privacy.cost(), privacy.ledger
    assert cost is not None and ledger is not None
    start, noise = np.zeros(4, np.float32), np.random.default_rng(2)
    releases = 0
    while not privacy.exhausted(cost):
        assert not privacy.budget_exhausted and releases < 10
        trio.run(privacy.release, start, start + 0.1, releases, cost, noise)
        releases += 1
    assert releases >= 1 and ledger.releases() == releases and privacy.budget_exhausted
    assert ledger.spent() <= ledger.epsilon_budget
    assert privacy.exhausted(cost)  # and stays so


def test_distributed_words_go_to_the_first_group_after_their_release_only(
    tmp_path: Path,
) -> None:
    privacy = private_release(
        tmp_path,
        dp_level="distributed",
        dp_noise_multiplier=12.82,
        dp_epsilon_budget=100.0,
        clip=128.0,
    )
    cost = privacy.cost()
    assert cost is not None and cost == release_cost(privacy.federation.params)
    start = np.zeros(8, np.float32)
    released = trio.run(privacy.release, start, start + 0.01, 0, cost, np.random.default_rng(3))
    assert privacy.carried_words(released.copy(), 1) is None  # another model: not its words
    released = trio.run(privacy.release, start, start + 0.01, 1, cost, np.random.default_rng(4))
    words = privacy.carried_words(released, 1)
    assert words is not None and int(words[-1]) == 1
    assert privacy.carried_words(released, 1) is None  # once


def test_without_dp_there_is_no_ledger_and_no_cost(tmp_path: Path) -> None:
    privacy = private_release(tmp_path, dp_enabled=False)
    assert privacy.ledger is None and privacy.cost() is None
    assert not ledger_path(tmp_path).exists()
