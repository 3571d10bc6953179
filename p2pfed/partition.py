"""Split a labelled data set among nodes: IID, Dirichlet label skew, or label shards.

Federated-learning results depend as much on *how* the data is spread over the clients as on
the algorithm, so tasks, benchmarks and reference simulations share these partitioners
instead of each writing its own.

Rules of this file:

* **Pure numpy.** No torch, no I/O: a partitioner maps ``labels`` (one label per example)
  to one array of example positions per node.
* **A function of its arguments.** Every random choice comes from one
  ``numpy.random.Generator(PCG64(seed))`` created here, so every node of a federation (and
  any simulation of it) computes the same split from the same settings, on any machine.
* **Exact cover.** Every position ``0 .. len(labels) - 1`` is given to exactly one node;
  each returned array is sorted (int64).
* **Errors say what to change.** Bad arguments raise :class:`~p2pfed.errors.ConfigError`
  naming the argument and its allowed range (they usually come from a task's settings).

The three schemes, from mild to extreme heterogeneity:

:func:`iid`
    a uniformly random split into near-equal parts;
:func:`dirichlet`
    for every label, the shares of the nodes are drawn from Dirichlet(alpha) (Hsu et al.
    2019): alpha -> infinity is IID, alpha = 0.5 a strong skew, alpha = 0.1 nodes that see
    one or two labels almost only;
:func:`shards`
    sort by label, cut into ``num_nodes * shards_per_node`` equal shards and deal each node
    ``shards_per_node`` of them (McMahan et al. 2017's "pathological non-IID" split).

Example::

    >>> import numpy as np
    >>> labels = np.repeat(np.arange(4), 5)      # 20 examples, labels 0..3
    >>> parts = dirichlet(labels, num_nodes=3, alpha=0.5, seed=1, min_size=2)
    >>> sorted(np.concatenate(parts).tolist()) == list(range(20))
    True
    >>> [len(p) >= 2 for p in parts]
    [True, True, True]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from p2pfed.errors import ConfigError

__all__ = ["MAX_DIRICHLET_DRAWS", "dirichlet", "iid", "label_skew", "shards"]

MAX_DIRICHLET_DRAWS = 10_000
"""How many Dirichlet draws :func:`dirichlet` tries before giving up on ``min_size``."""


def _labels(labels: Any) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ConfigError(f"labels must be a 1-D array (one label per example), got {array.shape}")
    return array


def _count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _rng(seed: Any) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(_count("seed", seed, 0)))


def _check_nodes(labels: np.ndarray, num_nodes: int, min_size: int) -> None:
    if num_nodes * min_size > len(labels):
        raise ConfigError(
            f"cannot give each of {num_nodes} nodes at least {min_size} of {len(labels)} "
            f"examples; use at most {len(labels) // max(1, min_size)} nodes or a smaller min_size"
        )


def iid(labels: Any, num_nodes: int, seed: int) -> list[np.ndarray]:
    """A uniformly random split into ``num_nodes`` parts whose sizes differ by at most one.

    Only ``len(labels)`` matters; the labels are not looked at.

    Example::

        >>> [p.tolist() for p in iid(np.zeros(7), num_nodes=3, seed=0)]
        [[2, 3, 4], [5, 6], [0, 1]]
    """
    array = _labels(labels)
    num_nodes = _count("num_nodes", num_nodes, 1)
    _check_nodes(array, num_nodes, 1 if len(array) else 0)
    order = _rng(seed).permutation(len(array))
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_nodes)]


def dirichlet(
    labels: Any, num_nodes: int, alpha: float, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Label skew: each label's examples are dealt to nodes in Dirichlet(``alpha``) shares.

    For every label value, in increasing order, the positions holding it are shuffled and cut
    into ``num_nodes`` consecutive runs whose sizes follow proportions drawn from a symmetric
    Dirichlet(``alpha``) distribution. If a node ends up with fewer than ``min_size``
    examples, the whole draw is repeated (from the same generator, so the result is still a
    function of the arguments); after :data:`MAX_DIRICHLET_DRAWS` failures it raises.
    Smaller ``alpha`` means more skew (:func:`label_skew` measures it).

    Example::

        >>> labels = np.repeat(np.arange(10), 30)
        >>> parts = dirichlet(labels, num_nodes=4, alpha=0.1, seed=0, min_size=5)
        >>> [len(p) for p in parts]
        [76, 103, 38, 83]
        >>> sum(len(p) for p in parts) == len(labels)
        True
    """
    array = _labels(labels)
    num_nodes = _count("num_nodes", num_nodes, 1)
    min_size = _count("min_size", min_size, 0)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float | np.floating)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ConfigError(
            f"alpha must be a finite number > 0 (e.g. 0.5; smaller is more skewed), got {alpha!r}"
        )
    _check_nodes(array, num_nodes, min_size)
    rng = _rng(seed)
    classes = np.unique(array)
    concentration = np.full(num_nodes, float(alpha))
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for value in classes:
            members = np.flatnonzero(array == value)
            members = members[rng.permutation(len(members))]
            shares = rng.dirichlet(concentration)
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for node, chunk in enumerate(np.split(members, cuts)):
                parts[node].append(chunk)
        result = [
            np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64)
            for p in parts
        ]
        if min(len(r) for r in result) >= min_size:
            return result
    raise ConfigError(
        f"no Dirichlet(alpha={alpha}) split gave each of {num_nodes} nodes at least "
        f"{min_size} examples in {MAX_DIRICHLET_DRAWS} draws; raise alpha, lower min_size or "
        "use fewer nodes"
    )


def shards(labels: Any, num_nodes: int, shards_per_node: int, seed: int) -> list[np.ndarray]:
    """Label shards: sort by label, cut into equal shards, deal ``shards_per_node`` to each node.

    Examples with the same label are ordered randomly before the cut, so which examples of a
    label land in which shard depends on ``seed``; shards are as equal as
    :func:`numpy.array_split` makes them. With 2 shards per node, most nodes see two labels.

    Example::

        >>> labels = np.repeat(np.arange(4), 3)       # 12 examples, labels 0..3
        >>> parts = shards(labels, num_nodes=2, shards_per_node=2, seed=0)
        >>> [sorted(set(labels[p].tolist())) for p in parts]
        [[1, 2], [0, 3]]
    """
    array = _labels(labels)
    num_nodes = _count("num_nodes", num_nodes, 1)
    shards_per_node = _count("shards_per_node", shards_per_node, 1)
    total = num_nodes * shards_per_node
    if total > len(array):
        raise ConfigError(
            f"{num_nodes} nodes x {shards_per_node} shards need at least {total} examples, "
            f"there are {len(array)}; lower shards_per_node or use fewer nodes"
        )
    rng = _rng(seed)
    # random order within each label, then a stable sort by label
    shuffled = rng.permutation(len(array))
    by_label = shuffled[np.argsort(array[shuffled], kind="stable")]
    pieces = np.array_split(by_label, total)
    dealt = rng.permutation(total)
    return [
        np.sort(np.concatenate([pieces[i] for i in dealt[n::num_nodes]])).astype(np.int64)
        for n in range(num_nodes)
    ]


def label_skew(labels: Any, parts: list[np.ndarray]) -> float:
    """How far the nodes' label distributions are from the overall one: the mean over nodes
    of the total-variation distance, weighted by node size (0 for a perfectly IID split, at
    most 1).

    Example::

        >>> labels = np.array([0, 0, 1, 1])
        >>> label_skew(labels, [np.array([0, 2]), np.array([1, 3])])
        0.0
        >>> label_skew(labels, [np.array([0, 1]), np.array([2, 3])])
        0.5
    """
    array = _labels(labels)
    classes, codes = np.unique(array, return_inverse=True)
    overall = np.bincount(codes, minlength=len(classes)) / max(1, len(array))
    distance, total = 0.0, 0
    for part in parts:
        if len(part) == 0:
            continue
        local = np.bincount(codes[part], minlength=len(classes)) / len(part)
        distance += len(part) * 0.5 * float(np.abs(local - overall).sum())
        total += len(part)
    return distance / total if total else 0.0
