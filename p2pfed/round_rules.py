"""Small rules of a node's rounds that others must apply alike (simnet, export, run).

Each is a pure function of the federation and the numbers it names: the seed every member
builds the initial model from, the task settings with that seed in, and the integer
weight a model may carry into a group (spec/group.md, "Weights"). simnet computes the
limit pure averaging must reach from the same functions the node runs, rather than from
copies of them.

Example::

    config = task_settings(federation, {"node_index": 3})
    fixed_point = fixed_point_of(federation, group_max=8)
    weight = training_weight(federation, data.num_train, functools.partial(ring_cap, fixed_point))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from p2pfed.federation import Federation
from p2pfed.fixedpoint import FixedPointParams

__all__ = ["federation_seed", "fixed_point_of", "ring_cap", "task_settings", "training_weight"]


def federation_seed(federation: Federation) -> int:
    """A seed every member derives alike (for the initial model) from the federation id."""
    digest = hashlib.sha256(b"p2pfed-initial-model:" + federation.federation_id).digest()
    return int.from_bytes(digest[:4], "big")


def task_settings(federation: Federation, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a copy) with the federation's seed as ``seed`` unless they name one:
    every node then builds the same initial model."""
    config = dict(settings)
    config.setdefault("seed", federation_seed(federation))
    return config


def fixed_point_of(federation: Federation, group_max: int) -> FixedPointParams:
    """The federation's ring for groups of at most ``group_max`` members."""
    params = federation.params
    return FixedPointParams.for_federation(params.fixed_point_bits, params.clip, group_max)


def ring_cap(fixed_point: FixedPointParams, weight: float) -> int:
    """``weight`` as a contribution may carry it: an integer in ``[0, max_weight]``."""
    return max(0, min(int(weight), fixed_point.max_weight))


def training_weight(federation: Federation, weight: int, cap: Callable[[int], int]) -> int:
    """The FedAvg weight of a node's trained model (spec/group.md, "Weights"), and so the
    weight of its initial model: with DP on, 1 whatever the data (a weight derived from
    the data would disclose it); else the task's count, capped at the ring's
    ``max_weight`` by ``cap`` (:func:`ring_cap` with the federation's ring)."""
    if federation.params.dp_enabled:
        return 1
    return cap(weight)
