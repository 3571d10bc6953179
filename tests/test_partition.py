"""The partitioners of p2pfed.partition: exact cover, determinism, skew, argument errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from p2pfed import partition
from p2pfed.errors import ConfigError
from p2pfed.partition import dirichlet, iid, label_skew, shards

LABELS = np.repeat(np.arange(10), 40)[np.random.default_rng(0).permutation(400)]

SCHEMES = {
    "iid": lambda labels, n, seed: iid(labels, n, seed),
    "dirichlet": lambda labels, n, seed: dirichlet(labels, n, 0.5, seed, min_size=5),
    "shards": lambda labels, n, seed: shards(labels, n, 2, seed),
}


def assert_exact_cover(parts: list[np.ndarray], size: int) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == size
    assert np.array_equal(np.sort(joined), np.arange(size))  # each position exactly once
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("num_nodes", [1, 3, 16])
def test_exact_cover_and_determinism(scheme: str, num_nodes: int) -> None:
    split = SCHEMES[scheme]
    parts = split(LABELS, num_nodes, 11)
    assert len(parts) == num_nodes
    assert_exact_cover(parts, len(LABELS))
    again = split(LABELS, num_nodes, 11)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = split(LABELS, num_nodes, 12)
    if num_nodes > 1:
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in iid(LABELS, 7, 0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_respects_min_size() -> None:
    parts = dirichlet(LABELS, 20, 0.1, seed=3, min_size=8)
    assert min(len(p) for p in parts) >= 8
    assert_exact_cover(parts, len(LABELS))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def mean_skew(alpha: float) -> float:
        return float(
            np.mean([label_skew(LABELS, dirichlet(LABELS, 8, alpha, s)) for s in range(5)])
        )

    skews = [mean_skew(alpha) for alpha in (100.0, 1.0, 0.1)]
    assert skews[0] < 0.15  # nearly IID
    assert skews[0] < skews[1] < skews[2]
    assert skews[2] > 0.5  # nodes see mostly one or two labels
    assert label_skew(LABELS, iid(LABELS, 8, 0)) < skews[1]


def test_shards_give_each_node_few_labels() -> None:
    parts = shards(LABELS, 10, 2, seed=1)
    assert all(len(np.unique(LABELS[p])) <= 4 for p in parts)  # a shard spans <= 2 labels
    assert label_skew(LABELS, parts) > 0.6


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid(LABELS, 0, 0), "num_nodes"),
        (lambda: iid(LABELS, 2.5, 0), "num_nodes"),  # type: ignore[arg-type]
        (lambda: iid(LABELS, True, 0), "num_nodes"),
        (lambda: iid(LABELS, 2, -1), "seed"),
        (lambda: iid(np.zeros((4, 2)), 2, 0), "1-D"),
        (lambda: iid(np.zeros(3), 4, 0), "at most 3 nodes"),
        (lambda: dirichlet(LABELS, 4, 0.0, 0), "alpha"),
        (lambda: dirichlet(LABELS, 4, float("nan"), 0), "alpha"),
        (lambda: dirichlet(LABELS, 4, "0.5", 0), "alpha"),  # type: ignore[arg-type]
        (lambda: dirichlet(LABELS, 4, 0.5, 0, min_size=-1), "min_size"),
        (lambda: dirichlet(LABELS, 50, 0.5, 0, min_size=10), "at most 40 nodes"),
        (lambda: dirichlet(np.zeros(30), 3, 0.001, 0, min_size=10), "raise alpha"),
        (lambda: shards(LABELS, 4, 0, 0), "shards_per_node"),
        (lambda: shards(np.zeros(5), 3, 2, 0), "at least 6 examples"),
    ],
)
def test_bad_arguments_say_what_to_change(call: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()  # type: ignore[operator]


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(partition)
    assert tried > 5 and failures == 0
