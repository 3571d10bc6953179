"""Protocol checks for simulated runs: conservation per group, consensus, convergence.

All pure functions and small accumulators over numpy arrays; usable from tests and from
:class:`simnet.simulation.Simulation`, which feeds :class:`GroupAudit` from the nodes'
``on_group`` callbacks.

* **Weighted-sum conservation** (push-sum): with training off, a completed group's members
  contributed their current model ``x_i`` with integer weight ``w_i``; the group protocol
  must give every member the mean ``m`` with ``sum(w_i) == total_weight`` exactly and
  ``sum(w_i * x_i) == total_weight * m`` up to fixed-point rounding
  (:func:`conservation_tolerance` derives the tolerance). The weights are the integers the
  members actually offered, ``max(1, round(w))`` of their push-sum weight ``w``: a member
  leaves a group with the float ``W / k`` and offers it rounded next time, so the push-sum
  *mass* drifts by up to ``k / 2`` per group (the run's limit moves slightly off the
  sample-weighted mean: ``target_distance_max`` levels off instead of reaching 0), but
  each group's own sum is exact in its weights, and that is what the audit checks.
* **Consensus distance**: the L2 distance of each model to the unweighted mean of all
  models (max and mean over nodes).
* **Convergence target**: pure averaging converges to the sample-weighted global mean of
  the initial models (:func:`weighted_mean`).
* **No corrupted model** (:func:`range_excess`): with training off every model a node can
  hold (initial, group mean, checkpoint, synced) is a convex combination of the initial
  models, so each coordinate stays within their range up to fixed-point rounding. A group
  sum whose masks did not cancel, or a mixed-up vector, lands far outside.
* **Run verdicts** (:func:`run_checks`): the pass/fail lines ``p2pfed simnet run`` prints
  (round goal, finite and uncorrupted models, conservation, progress and consensus after
  the last heal; where asked for, the pace kept during a fault, how fast it was detected,
  and groups across a healed cut), with thresholds from the scenario's ``[checks]`` table.

Example::

    >>> import numpy as np
    >>> consensus_distance([np.zeros(2), np.ones(2) * 2])
    (1.4142135623730951, 1.4142135623730951)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import GroupCompleted
from p2pfed.identity import NodeId
from simnet.scenario import Scenario

__all__ = [
    "QUANTILES",
    "Check",
    "GroupAudit",
    "Observed",
    "consensus_distance",
    "consensus_distances",
    "conservation_tolerance",
    "distance_to",
    "grid_rounds_to_exact_mean",
    "pace_rate",
    "range_excess",
    "run_checks",
    "spread",
    "step_error",
    "weighted_mean",
    "why_failed",
]

QUANTILES = (("min", 0.0), ("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("max", 1.0))
"""(suffix, quantile) of the per-node spread columns: ``loss_p10`` and so on."""


def consensus_distance(models: Sequence[np.ndarray]) -> tuple[float, float]:
    """``(max, mean)`` over models of the L2 distance to their unweighted mean."""
    if not models:
        return 0.0, 0.0
    stacked = np.stack([np.asarray(m, dtype=np.float64) for m in models])
    center = stacked.mean(axis=0)
    distances = np.linalg.norm(stacked - center, axis=1)
    return float(distances.max()), float(distances.mean())


def consensus_distances(models: Sequence[np.ndarray]) -> list[float]:
    """Each model's L2 distance to the unweighted mean of all of them (same order)."""
    if not models:
        return []
    stacked = np.stack([np.asarray(m, dtype=np.float64) for m in models])
    return [float(d) for d in np.linalg.norm(stacked - stacked.mean(axis=0), axis=1)]


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """The :data:`QUANTILES` of one value per node (linear interpolation between nodes;
    ``None`` for every key when no node has the value).

    >>> spread([4.0, 1.0, 3.0, 2.0, 5.0])
    {'min': 1.0, 'p10': 1.4, 'p50': 3.0, 'p90': 4.6, 'max': 5.0}
    """
    if not values:
        return {name: None for name, _ in QUANTILES}
    array = np.asarray(values, dtype=np.float64)
    return {name: float(np.quantile(array, q)) for name, q in QUANTILES}


def pace_rate(
    round_times: Mapping[int, Sequence[float]], nodes: Sequence[int], start: float, end: float
) -> float | None:
    """Rounds per simulated second per node: the rounds ``nodes`` completed in
    ``[start, end)``, over ``len(nodes) * (end - start)`` (``None``: no node or an empty
    window).

    >>> pace_rate({0: [1.0, 2.0, 3.0], 1: [2.5]}, [0, 1], 1.0, 3.0)
    0.75
    """
    if not nodes or end <= start:
        return None
    count = sum(1 for i in nodes for t in round_times.get(i, ()) if start <= t < end)
    return count / (len(nodes) * (end - start))


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


def range_excess(models: Sequence[np.ndarray], low: np.ndarray, high: np.ndarray) -> float:
    """How far (max over models and coordinates) any model lies outside ``[low, high]``.

    >>> range_excess([np.array([0.5, 2.5])], np.zeros(2), np.full(2, 2.0))
    0.5
    """
    if not models:
        return 0.0
    stacked = np.stack([np.asarray(m, dtype=np.float64) for m in models])
    below = np.asarray(low, np.float64) - stacked
    above = stacked - np.asarray(high, np.float64)
    return float(max(0.0, below.max(initial=0.0), above.max(initial=0.0)))


def step_error(params: FixedPointParams) -> float:
    """The most one group average can move a coordinate (in ``[-clip, clip]``) off the
    exact weighted mean: :func:`p2pfed.fixedpoint.error_bound` at ``|mean| = clip``,
    ``1/scale + 2**-23 * (clip + 1/scale) + 2**-149`` (stochastic rounding, then the
    float32 result)."""
    inv = 1.0 / params.scale
    return inv + 2.0**-23 * (params.clip + inv) + 2.0**-149


def conservation_tolerance(params: FixedPointParams) -> float:
    """The :class:`GroupAudit` tolerance for a federation's fixed-point parameters.

    The audit measures ``|sum(w_i x_i) - W m|_inf / (W * max(1, |m|_inf))``. Per coordinate
    the decoded mean ``m`` is within ``1/scale + 2**-23 * (|m| + 1/scale) + 2**-149`` of the
    exact ``sum(w_i x_i) / W`` (:func:`p2pfed.fixedpoint.error_bound`; inputs within the
    clip), so the relative error is at most ``1/scale + 2**-23 * (1 + 1/scale)`` plus
    subnormal dust: about ``1.2e-7`` in the 64-bit ring (float32 rounding dominates) and
    ``1.5e-5`` in a 32-bit ring of scale ``2**16``. The tolerance is twice that (float64
    accumulation in the audit itself); a wrong weight or an uncancelled mask is off by
    orders of magnitude more. An input beyond ``clip`` is clipped before it is sent, so a
    model outside ``[-clip, clip]`` fails the audit, rightly: the group did not average
    what the member held.

    >>> conservation_tolerance(FixedPointParams.for_federation(64, 8.0, 8)) < 3e-7
    True
    """
    inv = 1.0 / params.scale
    return 2.0 * (inv + 2.0**-23 * (1.0 + inv) + 2.0**-149)


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


def random_regrouping_factor(group_size: float) -> float:
    """Theory: the factor by which the consensus distance shrinks per round when every
    node averages with ``group_size - 1`` peers drawn at random each round.

    Averaging ``k`` independent deviations divides their variance by ``k``, so the
    root-mean-square distance to the mean shrinks by ``1 / sqrt(k)`` per round (an
    idealisation: real groups overlap and form asynchronously, so measured factors
    scatter around it).

    >>> round(random_regrouping_factor(4), 3)
    0.5
    """
    if group_size < 2:
        raise ValueError(f"a group has at least 2 members, got {group_size}")
    return float(1.0 / math.sqrt(group_size))


def consensus_decay(rounds: Sequence[float], distances: Sequence[float]) -> tuple[float, float]:
    """Fit ``distance ~ c * factor ** round``; return ``(factor, r_squared)``.

    A least-squares line through ``log(distance)``: ``factor`` is the measured shrink per
    round (compare with :func:`random_regrouping_factor`), ``r_squared`` how exponential
    the decay is (1: a straight line in log scale).

    >>> factor, r2 = consensus_decay([1, 2, 3], [1.0, 0.5, 0.25])
    >>> round(factor, 6), round(r2, 6)
    (0.5, 1.0)
    """
    x = np.asarray(rounds, dtype=float)
    d = np.asarray(distances, dtype=float)
    if len(x) < 3 or len(d) != len(x) or not np.all(np.isfinite(d) & (d > 0)):
        raise ValueError("need at least 3 rounds with positive, finite distances")
    y = np.log(d)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    spread = float(((y - y.mean()) ** 2).sum())
    return math.exp(slope), (1.0 - residual / spread if spread > 0 else 1.0)


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
        if group.total_weight == 0:
            return  # every member offered weight 0: each keeps its own model, nothing to sum
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


@dataclass(frozen=True)
class Check:
    """One verdict on a finished run: a short name, pass or fail, and the numbers behind it."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        """``PASS name: detail`` (or ``FAIL``), as ``p2pfed simnet run`` prints it."""
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.detail}"


def _last_heal(scenario: Scenario, ended_at: float) -> float | None:
    ends = [p.end for p in scenario.partitions if p.end is not None and p.end <= ended_at]
    return max(ends) if ends else None


def _row_before(rows: Sequence[Mapping[str, Any]], at: float) -> Mapping[str, Any] | None:
    before = [row for row in rows if row["time"] <= at]
    return before[-1] if before else None


def run_checks(
    scenario: Scenario,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    failures: Sequence[str] = (),
) -> list[Check]:
    """The verdicts on a run (its metrics ``rows`` and ``summary``, and the audit's
    ``failures``); thresholds come from ``scenario.checks``.

    Always: the models of the nodes live at the end are finite. With a round goal: it was
    reached before ``duration``. With training off: no model left the initial models'
    range by more than the fixed-point rounding of ``rounds_max + 1`` averaging steps
    (:func:`step_error`), every completed group that all members reported conserved the
    weighted sum (at least one was audited), and ``final_consensus_max`` is
    ``consensus_drop`` times below the initial models' consensus distance and at most
    ``consensus_max``. With a partition that healed before the end: at least
    ``rounds_after_heal`` global rounds (and some groups) completed after the heal, and
    (training off) ``final_consensus_max`` is below its value in the last row before the
    heal (or, if there is none, the first row after it). Where ``[checks]`` asks for them,
    from ``summary["faults"]`` (each vanish and partition): ``pace`` (each side of at least
    ``group_min`` nodes kept ``pace`` of its rounds per node and second, its slowest node
    half that), ``failure detected`` (every node stopped counting the cut-off peers as
    responsive within ``detect_within`` seconds) and ``merged`` (``merged`` groups across
    the sides after a heal, and the sides' mean models closer at the end than at it).
    """
    spec = scenario.checks
    checks: list[Check] = []
    last = rows[-1] if rows else None
    ended_at = float(summary["simulated_seconds"])
    if scenario.rounds is not None:
        reached = last["round"] if last else 0
        checks.append(
            Check(
                "round goal",
                bool(summary["completed"]),
                f"global round {reached} of {scenario.rounds} at t={ended_at:.2f}s"
                + ("" if summary["completed"] else " (stopped before the goal)"),
            )
        )
    live = int(summary["live_nodes"])
    checks.append(
        Check(
            "models finite",
            bool(summary["all_models_finite"]) and live > 0,
            f"{live} nodes live at the end; every node's model "
            + ("finite" if summary["all_models_finite"] else "NOT finite"),
        )
    )
    training = scenario.task.training
    if not training and summary.get("range_excess_max") is not None:
        protocol = scenario.protocol
        params = FixedPointParams.for_federation(
            protocol.fixed_point_bits, protocol.clip, protocol.group_max
        )
        tolerance = (int(summary["rounds_max"]) + 1) * step_error(params)
        excess = float(summary["range_excess_max"])
        checks.append(
            Check(
                "models uncorrupted",
                excess <= tolerance,
                f"every live model in every row within the initial models' range "
                f"(largest excess {excess:.3g}, rounding allows {tolerance:.3g})",
            )
        )
    if not training:
        audited = int(summary["groups_audited"])
        failed = int(summary["conservation_failures"])
        error = summary.get("conservation_error_max")
        detail = f"{audited} groups audited, {failed} failed"
        if error is not None:
            detail += f", largest relative error {float(error):.3g}"
        if failures:
            detail += "; " + "; ".join(failures[:3])
        checks.append(Check("conservation", audited > 0 and failed == 0, detail))
    heal = _last_heal(scenario, ended_at)
    if heal is not None and spec.rounds_after_heal > 0 and last is not None:
        at_heal = _row_before(rows, heal)
        round_at, groups_at = (at_heal["round"], at_heal["groups_completed"]) if at_heal else (0, 0)
        gained = last["round"] - round_at
        groups = int(summary["groups_completed"]) - int(groups_at)
        checks.append(
            Check(
                "progress after heal",
                gained >= spec.rounds_after_heal and groups > 0,
                f"heal at t={heal:g}s: global round {round_at} -> {last['round']} "
                f"(+{gained}, need {spec.rounds_after_heal}), {groups} groups completed since",
            )
        )
    initial = summary.get("initial_consensus_max")
    final = float(summary["final_consensus_max"])
    if not training and initial is not None:
        if spec.consensus_drop > 0 or math.isfinite(spec.consensus_max):
            bound = min(
                float(initial) / spec.consensus_drop if spec.consensus_drop > 0 else math.inf,
                spec.consensus_max,
            )
            checks.append(
                Check(
                    "consensus",
                    final <= bound,
                    f"consensus_max {float(initial):.3g} between the initial models, "
                    f"{final:.3g} at the end (must be <= {bound:.3g}); consensus_mean "
                    f"{float(summary['final_consensus_mean']):.3g} at the end",
                )
            )
        if heal is not None and rows:
            reference = _row_before(rows, heal)
            where = f"before the heal at t={heal:g}s"
            if reference is None:
                reference, where = rows[0], f"in the first row after the heal at t={heal:g}s"
            before = float(reference["consensus_max"])
            checks.append(
                Check(
                    "consensus after heal",
                    final < before,
                    f"consensus_max {before:.3g} {where} (round {reference['round']}), "
                    f"{final:.3g} at the end: {'falling' if final < before else 'NOT falling'}",
                )
            )
    checks += _fault_checks(scenario, summary.get("faults") or [])
    return checks


def _fault_checks(scenario: Scenario, faults: Sequence[Mapping[str, Any]]) -> list[Check]:
    """``pace``, ``failure detected`` and ``merged`` (each where ``[checks]`` asks)."""
    spec = scenario.checks
    checks: list[Check] = []
    if spec.pace > 0:
        passed, parts = bool(faults), []
        for fault in faults:
            b0, b1 = fault["before"]
            d0, d1 = fault["during"]
            for number, side in enumerate(fault["sides"]):
                name = f"{fault['fault']}, side {number + 1} ({side['live']} nodes)"
                if side["live"] < scenario.protocol.group_min:
                    parts.append(f"{name}: fewer than group_min, not judged")
                    continue
                before, during = side["rate_before"], side["rate_during"]
                if before is None or during is None or before <= 0:
                    passed = False
                    parts.append(
                        f"{name}: nothing to compare (no rounds in t={b0:g}..{b1:g}s, or no "
                        f"time in t={d0:g}..{d1:g}s: schedule the fault later, or end it later)"
                    )
                    continue
                kept = during / before
                # the slowest node too, against half the bar (random grouping spreads the
                # nodes' rates): a side's mean hides a node stuck in a group that waits for
                # a cut-off member
                slowest = float(side["slowest_rate_during"] or 0.0) / before
                passed = passed and kept >= spec.pace and slowest >= spec.pace / 2
                parts.append(
                    f"{name}: {before:.3g} rounds/s per node in t={b0:g}..{b1:g}s, "
                    f"{during:.3g} in t={d0:g}..{d1:g}s ({kept:.0%}, need {spec.pace:.0%}); "
                    f"slowest node {side['slowest_node']} {slowest:.0%} "
                    f"(need {spec.pace / 2:.0%})"
                )
        checks.append(Check("pace", passed, "; ".join(parts) or "no vanish or partition ran"))
    if spec.detect_within > 0:
        passed, parts = bool(faults), []
        for fault in faults:
            after = fault["detected_after"]
            if after is None:
                passed = False
                stuck = fault["undetected"]
                parts.append(
                    f"{fault['fault']}: {_nodes(stuck)} still counted a cut-off peer as "
                    f"responsive at t={fault['end']:g}s"
                )
                continue
            passed = passed and after <= spec.detect_within
            parts.append(
                f"{fault['fault']}: every node stopped counting the cut-off peers as "
                f"responsive within {after:.3g}s (need {spec.detect_within:g}s)"
            )
        checks.append(
            Check("failure detected", passed, "; ".join(parts) or "no vanish or partition ran")
        )
    if spec.merged > 0:
        healed = [f for f in faults if f["healed"]]
        passed, parts = bool(healed), []
        for fault in healed:
            cross = int(fault["cross_groups_after_heal"])
            gap_heal, gap_end = fault["side_gap_at_heal"], fault["side_gap_at_end"]
            # the sides' mean models must also have come closer (unless already equal)
            closer = gap_heal is None or gap_end is None or gap_heal == 0 or gap_end < gap_heal
            passed = passed and cross >= spec.merged and closer
            detail = (
                f"{fault['fault']}, healed at t={fault['end']:g}s: {cross} groups spanning "
                f"the sides completed since (need {spec.merged})"
            )
            if gap_heal is not None and gap_end is not None:
                detail += (
                    f"; distance between the sides' mean models {gap_heal:.3g} at the heal, "
                    f"{gap_end:.3g} at the end" + ("" if closer else " (NOT closer)")
                )
            parts.append(detail)
        checks.append(Check("merged", passed, "; ".join(parts) or "no partition healed"))
    return checks


@dataclass(frozen=True)
class Observed:
    """What a run saw besides its metrics rows, for :func:`why_failed`.

    Node numbers are scenario indices. ``live_rounds`` and ``open_channels`` cover the
    nodes live when the run ended.
    """

    live_rounds: dict[int, int]
    """Each live node's round at the end."""
    open_channels: dict[int, int]
    """Each live node's open channels at the end."""
    down: tuple[int, ...] = ()
    """Nodes that had started and were not live at the end (crashed or stopped)."""
    never_started: tuple[int, ...] = ()
    """Nodes whose ``join`` had not come by the end."""
    pending: tuple[float, ...] = ()
    """Times of scheduled events and partitions not yet played out at the end."""
    partition: tuple[float, float | None, tuple[tuple[int, ...], ...]] | None = None
    """The partition in effect at the end: its start, its heal time (``None``: never),
    and its sides (every node of the run, live or not)."""
    restarts: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Each node's last restart: (round at the crash, round it resumed at)."""
    fewest_live: tuple[float, int] | None = None
    """When, and how few, nodes were live at the low point of the run (after the start)."""
    last_group: float | None = None
    """When the last group completed (``None``: none did)."""
    triangle_free: bool = False
    """``routing = "direct"`` on a topology without a triangle: no group of 3 can form."""
    wall_limited: bool = False
    """A wall-clock limit (benchmarks) ended the run."""


def _nodes(indices: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in sorted(indices)[:limit])
    more = len(indices) - limit
    return f"{'node' if len(indices) == 1 else 'nodes'} {shown}" + (
        f" and {more} more" if more > 0 else ""
    )


def _round_goal_why(
    scenario: Scenario,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    observed: Observed,
    goal: int,
) -> str:
    """Why the global round stopped short of ``goal`` (0: why it stopped progressing)."""
    group_min = scenario.protocol.group_min
    ended_at = float(summary["simulated_seconds"])
    reached = rows[-1]["round"] if rows else 0
    live = observed.live_rounds
    crashed = int(summary.get("crashes", 0))
    restarted = int(summary.get("restarts", 0))
    if observed.wall_limited:
        return "the run's wall-clock limit ended it before the goal"
    if goal and reached >= goal and (observed.pending or observed.never_started):
        waiting = [f"t={t:g}s" for t in sorted(observed.pending)]
        if observed.never_started:
            waiting.append(f"the join of {_nodes(observed.never_started)}")
        return (
            f"global round {reached} reached, but the run waits for what is scheduled after "
            f"duration = {scenario.duration:g}s ({', '.join(waiting)}): lengthen duration "
            "or move the events"
        )
    if int(summary["groups_completed"]) == 0:
        if observed.triangle_free:
            return (
                f'no group ever formed: with routing = "direct" the {scenario.topology.kind} '
                f"topology has no triangle, and every pair of a group's {group_min}+ members "
                'must be linked (use routing = "shortest-path")'
            )
        if len(live) < group_min:
            return (
                f"no group ever formed: only {len(live)} nodes were live, fewer than "
                f"group_min = {group_min}"
            )
        return (
            f"no group ever completed ({summary['groups_aborted']} aborted, "
            f"{summary.get('connect_failures', 0)} of {summary.get('connects', 0)} connects "
            "failed): the nodes could not reach each other"
        )
    if len(live) < group_min:
        gone = (
            f"{_nodes(observed.down)} crashed or stopped and never restarted"
            if observed.down
            else "the others never started"
        )
        return (
            f"only {len(live)} nodes were live at the end, fewer than group_min = {group_min}, "
            f"so no group could form: {gone} ({crashed} crashes, {restarted} restarts)"
        )
    if not live:
        return f"no node was live at the end ({crashed} crashes, {restarted} restarts)"
    slowest = min(live.values())
    laggards = [i for i, r in live.items() if r == slowest]
    median = sorted(live.values())[len(live) // 2]
    if observed.partition is not None:
        start, end, sides = observed.partition
        small = [
            side
            for side in sides
            if 0 < sum(1 for i in side if i in live) < group_min
            and any(i in laggards for i in side)
        ]
        healed = "never healed" if end is None else f"heals only at t={end:g}s, after the end"
        if small:
            side = small[0]
            count = sum(1 for i in side if i in live)
            return (
                f"the partition from t={start:g}s {healed}: {_nodes(side)} on one side, "
                f"{count} of them live, fewer than group_min = {group_min}, stayed at "
                f"round {slowest} while the median was {median}"
            )
        if any(i in side for side in sides for i in laggards):
            return (
                f"the partition from t={start:g}s {healed}; slowest: {_nodes(laggards)} at "
                f"round {slowest} while the median was {median}"
            )
    behind = {i: observed.restarts[i] for i in laggards if i in observed.restarts}
    if behind and median - slowest >= 2:
        node, (crashed_at, resumed) = min(behind.items())
        return (
            f"{_nodes(sorted(behind))} restarted from an older checkpoint (node {node} crashed "
            f"at round {crashed_at}, resumed at {resumed}) and reached only round {slowest} "
            f"while the median was {median}: the global round waits for the slowest node"
        )
    isolated = [i for i in laggards if observed.open_channels.get(i, 0) + 1 < group_min]
    if isolated:
        node = isolated[0]
        return (
            f"{_nodes(isolated)} stayed at round {slowest} (median {median}) with "
            f"{observed.open_channels.get(node, 0)} open channels, too few for a group of "
            f"group_min = {group_min}: check the topology, bootstrap and partitions"
        )
    last_row = float(rows[-1]["time"]) if rows else 0.0
    last_progress = max(last_row, observed.last_group or 0.0)
    quiet = ended_at - last_progress
    if goal and rows and reached > 0 and quiet < 0.25 * ended_at:
        per_round = last_row / reached
        return (
            f"rounds too slow for the time limit: global round {reached} at t={last_row:.2f}s, "
            f"about {per_round:.3g}s per round, so {goal} rounds need about "
            f"{per_round * goal:.3g}s but duration = {scenario.duration:g}s"
        )
    return (
        f"no progress in the last {quiet:.3g}s of the run: {_nodes(laggards)} stuck at round "
        f"{slowest} while the median was {median} ({summary['groups_aborted']} groups aborted)"
    )


def why_failed(
    scenario: Scenario,
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    checks: Sequence[Check],
    observed: Observed,
) -> str | None:
    """One plain line saying why the first failed check failed, from what the run
    observed (``None`` if every check passed).

    The round goal is explained by the first cause that fits: events scheduled after
    ``duration``, no group at all (a triangle-free topology with direct routing, too few
    nodes, unreachable peers), fewer live nodes than ``group_min`` at the end, a partition
    still in effect with a side too small for a group, laggards restarted from older
    checkpoints, laggards without enough open channels, and otherwise either steady but
    too slow progress or a stall.
    """
    failed = [c for c in checks if not c.passed]
    if not failed:
        return None
    first = failed[0]
    if first.name in ("round goal", "progress after heal"):
        goal = (scenario.rounds or 0) if first.name == "round goal" else 0
        return f"{first.name}: {_round_goal_why(scenario, rows, summary, observed, goal)}"
    if first.name == "models finite":
        if not observed.live_rounds:
            return (
                f"models finite: no node was live at the end ({summary.get('crashes', 0)} "
                f"crashes, {summary.get('restarts', 0)} restarts)"
            )
        return "models finite: a node's model holds NaN or infinity (diverging training?)"
    if first.name == "conservation":
        if int(summary["groups_audited"]) == 0:
            return (
                "conservation: no group was audited, so nothing was checked "
                f"({summary['groups_completed']} groups completed)"
            )
        return f"conservation: {first.detail}"
    if first.name == "pace":
        return (
            f"pace: a side of a fault completed rounds more slowly than before it: "
            f"{first.detail} (a node near 0%: stuck in a group that waits for a member gone "
            "silent, until the all-reduce timeout or the heal; a low mean: nodes keep "
            "inviting silent peers, or the side is too small for the groups it formed)"
        )
    if first.name == "failure detected":
        return (
            f"failure detected: {first.detail} (a node hears a silent peer as gone only "
            "once its liveness deadline passes without a keepalive)"
        )
    if first.name == "merged":
        return (
            f"merged: {first.detail} (after a heal the sides meet again only through "
            "channels across the cut: peer exchange and exploration dials)"
        )
    if first.name in ("consensus", "consensus after heal"):
        return (
            f"{first.name}: the models did not mix enough: "
            f"{summary['groups_completed']} groups completed, "
            f"{summary['groups_aborted']} aborted, global round "
            f"{rows[-1]['round'] if rows else 0} (more rounds, or larger groups, mix more)"
        )
    return f"{first.name}: {first.detail}"
