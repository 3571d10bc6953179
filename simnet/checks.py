"""Protocol checks for simulated runs: conservation per group, consensus, convergence.

All pure functions and small accumulators over numpy arrays; usable from tests and from
:class:`simnet.simulation.Simulation`, which feeds :class:`GroupAudit` from the nodes'
``on_group`` callbacks.

* **Weighted-sum conservation** (push-sum): with training off, a completed group's members
  contributed their current model ``x_i`` with integer weight ``w_i``; the group protocol
  must give every member the mean ``m`` with ``sum(w_i) == total_weight`` exactly and
  ``sum(w_i * x_i) == total_weight * m`` up to fixed-point rounding.
* **Consensus distance**: the L2 distance of each model to the unweighted mean of all
  models (max and mean over nodes).
* **Convergence target**: pure averaging converges to the sample-weighted global mean of
  the initial models (:func:`weighted_mean`).

Example::

    >>> import numpy as np
    >>> consensus_distance([np.zeros(2), np.ones(2) * 2])
    (1.4142135623730951, 1.4142135623730951)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from p2pfed.group import GroupCompleted
from p2pfed.identity import NodeId

__all__ = [
    "GroupAudit",
    "consensus_distance",
    "distance_to",
    "grid_rounds_to_exact_mean",
    "weighted_mean",
]


def consensus_distance(models: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(max, mean)`` over models of the L2 distance to their unweighted mean."""
    if not models:
        return 0.0, 0.0
    stacked = np.stack([np.asarray(m, dtype=np.float64) for m in models])
    center = stacked.mean(axis=0)
    distances = np.linalg.norm(stacked - center, axis=1)
    return float(distances.max()), float(distances.mean())


def distance_to(models: Sequence[np.ndarray], target: np.ndarray) -> float:
    """The largest L2 distance of any model to ``target``."""
    if not models:
        return 0.0
    stacked = np.stack([np.asarray(m, dtype=np.float64) for m in models])
    return float(np.linalg.norm(stacked - np.asarray(target, np.float64), axis=1).max())


def weighted_mean(models: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum(w_i * x_i) / sum(w_i)`` in float64: what pure push-sum averaging converges to."""
    if len(models) != len(weights) or not models:
        raise ValueError(f"need as many weights as models (got {len(weights)} and {len(models)})")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"the weights must have a positive sum, got {total}")
    acc = np.zeros(len(models[0]), np.float64)
    for model, weight in zip(models, weights, strict=True):
        acc += float(weight) * np.asarray(model, np.float64)
    return acc / total


def grid_rounds_to_exact_mean(n: int, k: int) -> int:
    """Rounds Moshpit's grid arrangement of ``n = k^d`` nodes needs for the exact mean:
    ``ceil(log_k n)`` (each round averages along one grid dimension).

    >>> grid_rounds_to_exact_mean(729, 9)
    3
    """
    if n < 1 or k < 2:
        raise ValueError(f"need n >= 1 and k >= 2, got n={n}, k={k}")
    rounds, size = 0, 1
    while size < n:
        size *= k
        rounds += 1
    return rounds


@dataclass
class _GroupRecord:
    members: int
    total_weight: int
    mean: np.ndarray
    weight_sum: int = 0
    weighted: np.ndarray | None = None
    seen: dict[NodeId, None] = field(default_factory=dict)


@dataclass
class GroupAudit:
    """Accumulates every member's view of each completed group and checks conservation.

    Call :meth:`record` once per member with the model and integer weight it contributed.
    When all members of a group have reported, the group is checked and forgotten.
    ``tolerance`` bounds ``|sum(w_i x_i) - W m|`` relative to ``W * max(1, |x|_inf)``.
    """

    tolerance: float = 1e-6
    checked: int = 0
    failures: list[str] = field(default_factory=list)
    max_error: float = 0.0
    _open: dict[bytes, _GroupRecord] = field(default_factory=dict)

    def record(
        self, member: NodeId, outcome: GroupCompleted, model: np.ndarray, weight: int
    ) -> None:
        group = self._open.get(outcome.group_id)
        if group is None:
            group = self._open[outcome.group_id] = _GroupRecord(
                len(outcome.members), outcome.total_weight, outcome.mean.astype(np.float64)
            )
        if member in group.seen:
            return
        group.seen[member] = None
        contribution = weight * np.asarray(model, np.float64)
        group.weighted = contribution if group.weighted is None else group.weighted + contribution
        group.weight_sum += weight
        if len(group.seen) == group.members:
            self._check(outcome.group_id, group)
            del self._open[outcome.group_id]

    def _check(self, group_id: bytes, group: _GroupRecord) -> None:
        self.checked += 1
        label = group_id.hex()[:8]
        if group.weight_sum != group.total_weight:
            self.failures.append(
                f"group {label}: weights sum to {group.weight_sum}, the protocol says "
                f"{group.total_weight}"
            )
            return
        assert group.weighted is not None
        expected = group.total_weight * group.mean
        scale = group.total_weight * max(1.0, float(np.abs(group.mean).max(initial=0.0)))
        error = float(np.abs(group.weighted - expected).max(initial=0.0)) / scale
        self.max_error = max(self.max_error, error)
        if not error <= self.tolerance or not math.isfinite(error):
            self.failures.append(
                f"group {label}: sum(w x) differs from W * mean by {error:.3g} (relative)"
            )

    @property
    def incomplete(self) -> int:
        """Completed groups not every member has reported (a member crashed first)."""
        return len(self._open)
