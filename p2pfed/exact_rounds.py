"""Exact rounds: the whole federation's weighted average in a few small-group steps.

This is the arithmetic and bookkeeping half of exact averaging (spec/group.md, "Exact
rounds"), pure functions and small values with no I/O; :class:`p2pfed.group.GroupProtocol`
uses them to decide whom to invite and which invites to accept, and
:class:`p2pfed.round_loop.RoundLoop` to move from step to step.

The idea is Moshpit All-Reduce (Ryabinin et al., NeurIPS 2021) with Hivemind's way of
deriving group keys without a coordinator. A round of ``n`` nodes has a *plan*: group sizes
``M_0, ..., M_{d-1}`` whose product is ``n`` (:func:`plan_sizes`). Every node starts step 0
with the empty *key*. At step ``s`` the nodes with the same key (its *class*) split into
groups of ``M_s``; when a group completes, each member draws a distinct *index* in
``[0, M_s)`` from the group id (:func:`member_indices`) and appends it to its key. So the
class of a key at step ``s + 1`` holds exactly one member of every group that class came
from at step ``s``, and by induction every node ends step ``d - 1`` holding the weighted
mean of all ``n`` models, provided each member carries the total weight of the models its
model already averages (its *block weight*, the ``W`` of its last group).

Nobody configures a coordinate: the key is made of the indices a node's own groups gave it.
Within a class, groups are consecutive runs of the class sorted by node id
(:func:`class_chunks`), so every node that sees the whole class computes the same groups.

Example: 16 nodes in groups of 4, two steps::

    >>> plan_sizes(16, group_min=3, group_max=8)
    (4, 4)
    >>> plan_sizes(6, group_min=3, group_max=8)
    (6,)
    >>> plan_sizes(11, group_min=3, group_max=8)  # a prime above group_max: no exact plan
    ()
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "MAX_STEPS",
    "RANDOM_AGREEMENT",
    "Position",
    "RoundPlan",
    "class_chunks",
    "member_indices",
    "plan_sizes",
    "random_steps_for",
    "round_plan",
    "sitting_out",
]

MAX_STEPS = 16
"""The most steps a plan may have (the key of the last step has ``MAX_STEPS - 1`` indices)."""

_INDEX_CONTEXT = b"p2pfed-exact-index:v1\x00"
_SIT_OUT_CONTEXT = b"p2pfed-exact-sit-out:v1\x00"
_T = TypeVar("_T")


@functools.lru_cache(maxsize=4096)
def plan_sizes(n: int, *, group_min: int, group_max: int) -> tuple[int, ...]:
    """The group sizes of an exact round of ``n`` nodes, or ``()`` if there is none.

    The plan has the fewest steps whose sizes, each in ``[group_min, group_max]``, multiply
    to ``n``; among those, the most even sizes (smallest largest size), in non-increasing
    order. ``n <= group_max`` is one step of one group.

    >>> plan_sizes(27, group_min=3, group_max=8)
    (3, 3, 3)
    >>> plan_sizes(24, group_min=3, group_max=8)
    (6, 4)
    >>> plan_sizes(1000, group_min=3, group_max=10)
    (10, 10, 10)
    >>> plan_sizes(2, group_min=3, group_max=8)
    ()
    """
    if n < group_min or group_min < 1:
        return ()
    if n <= group_max:
        return (n,)
    for steps in range(2, MAX_STEPS + 1):
        if group_max**steps < n:
            continue
        if group_min**steps > n:
            return ()
        best = _even_factorisation(n, steps, group_min, group_max)
        if best:
            return best
    return ()


@dataclass(frozen=True)
class RoundPlan:
    """How a round of ``nodes`` nodes averages: ``participants`` of them in groups of
    ``sizes`` (one size per step); the other ``nodes - participants`` sit the round out
    and adopt its average afterwards. ``sizes == ()``: no exact round is possible."""

    nodes: int
    participants: int
    sizes: tuple[int, ...]

    @property
    def sitting_out(self) -> int:
        """How many nodes sit this round out."""
        return self.nodes - self.participants


@functools.lru_cache(maxsize=4096)
def round_plan(n: int, *, group_min: int, group_max: int) -> RoundPlan:
    """The plan of an exact round of ``n`` nodes: the largest ``p <= n`` that has a plan
    (:func:`plan_sizes`) takes part; the ``n - p`` others sit out (chosen by
    :func:`sitting_out`, a different few each round), as FedAvg samples clients.

    >>> round_plan(16, group_min=3, group_max=8)
    RoundPlan(nodes=16, participants=16, sizes=(4, 4))
    >>> round_plan(11, group_min=3, group_max=8)  # 11 is prime; 10 would need a group of 2
    RoundPlan(nodes=11, participants=9, sizes=(3, 3))
    """
    for p in range(n, group_min - 1, -1):
        sizes = plan_sizes(p, group_min=group_min, group_max=group_max)
        if sizes:
            return RoundPlan(n, p, sizes)
    return RoundPlan(n, 0, ())


RANDOM_AGREEMENT = 2048
"""Random rounds with ``random_steps = 0`` take enough steps to shrink the nodes' mean
squared distance from their mean by this factor (:func:`random_steps_for`)."""


def random_steps_for(n: int, *, group_max: int, group_min: int = 3) -> int:
    """How many random groups a node joins per round when ``random_steps = 0``
    (spec/group.md, "Random rounds"): 1 when one group can hold the federation's ``n``
    nodes (``n <= group_max``), else the fewest steps ``s`` with ``rho**s <= 1 / 2048``,
    ``rho = (n - k) / (k * (n - 1))``, ``k = group_min``.

    ``rho`` is what one step of random groups of ``k`` does to the nodes' mean squared
    distance from their mean (exactly, for equal weights and groups of ``k``; the test
    measures it), so the rule reduces disagreement 2048-fold, 45-fold in distance.
    ``group_min`` rather than ``group_max`` because an initiator starts with whoever
    accepts: on 16 real nodes with groups of 3 to 4, 70% of the groups had 3 members.
    A replay of 16 non-IID digits clients (``bench._fedsim.random_replay``) at 30 rounds,
    mean node accuracy against FedAvg's: 3 steps (``rho**3 = 0.024``, the rule before)
    2.2 points behind on average over rounds 11-30 and up to 12 at single rounds; 4 steps
    (0.007) up to 7; 5 steps (0.002) within 3. Real nodes mix less per step than that
    replay (spec/group.md, "Random rounds"): 16 node processes trailed FedAvg by 11.6
    points at round 20 with 3 steps, and by 2.1 to 3.5 at round 20 with 5 (the rule of
    256-fold before). The replay with groups formed as nodes become free
    (``bench._fedsim.round_schedule``), three schedules each: 5 steps 2.6 to 3.7 points
    behind at round 20; 6 steps (``rho**6``, 1/1700) within 0.9 at round 20 but 4.1 at
    round 10 in one; 7 steps (1/5900) within 1.1 at rounds 10, 20 and 30 in all three.

        >>> random_steps_for(16, group_max=4), random_steps_for(1000, group_max=8)
        (7, 7)
        >>> random_steps_for(16, group_max=8, group_min=4)
        5
        >>> random_steps_for(5, group_max=8)
        1
    """
    if n <= group_max or group_min < 2:
        return 1
    k = min(group_min, n - 1)
    # integers, free of floating-point edge cases: (n - k)**s * 2048 <= (k * (n - 1))**s
    for steps in range(1, 17):
        if (n - k) ** steps * RANDOM_AGREEMENT <= (k * (n - 1)) ** steps:
            return steps
    return 16


def sitting_out(round: int, members: Sequence[bytes], count: int) -> set[bytes]:
    """The ``count`` members of a round's class of step 0 that sit the round out: those
    with the largest ``SHA-256(context || u64(round) || node_id)``, a different few each
    round.

    >>> sorted(sitting_out(0, [b"a" * 32, b"b" * 32, b"c" * 32], 1)) in ([b"a" * 32],
    ...     [b"b" * 32], [b"c" * 32])
    True
    """
    if count <= 0:
        return set()
    prefix = _SIT_OUT_CONTEXT + round.to_bytes(8, "big")
    ranked = sorted(members, key=lambda m: hashlib.sha256(prefix + bytes(m)).digest())
    return {bytes(m) for m in ranked[-count:]}


def _even_factorisation(n: int, steps: int, low: int, high: int) -> tuple[int, ...]:
    """Non-increasing factors of ``n`` in ``[low, high]``, ``steps`` of them, with the
    smallest largest factor (``()`` if none)."""
    if steps == 1:
        return (n,) if low <= n <= high else ()
    for largest in range(low, high + 1):  # try the smallest possible largest factor first
        if n % largest:
            continue
        rest = _bounded_factorisation(n // largest, steps - 1, low, largest)
        if rest:
            return (largest, *rest)
    return ()


def _bounded_factorisation(n: int, steps: int, low: int, high: int) -> tuple[int, ...]:
    """Non-increasing factors of ``n`` in ``[low, high]``, ``steps`` of them, largest first."""
    if steps == 1:
        return (n,) if low <= n <= high else ()
    for first in range(min(high, n), low - 1, -1):
        if n % first:
            continue
        rest = _bounded_factorisation(n // first, steps - 1, low, first)
        if rest:
            return (first, *rest)
    return ()


def member_indices(group_id: bytes, members: Sequence[bytes]) -> dict[bytes, int]:
    """Each member's index in a completed group: its rank by ``SHA-256(context || group_id
    || node_id)``, so a member's index is unpredictable before the group forms and every
    member computes the same assignment.

    >>> indices = member_indices(bytes(16), [b"a" * 32, b"b" * 32, b"c" * 32])
    >>> sorted(indices.values())
    [0, 1, 2]
    """
    ranked = sorted(
        members, key=lambda m: hashlib.sha256(_INDEX_CONTEXT + bytes(group_id) + bytes(m)).digest()
    )
    return {bytes(m): i for i, m in enumerate(ranked)}


def class_chunks(sorted_class: Sequence[_T], size: int) -> list[list[_T]]:
    """The groups of one class: consecutive runs of ``size`` nodes of the class sorted by
    node id. A class whose size is not a multiple of ``size`` is incomplete; its last run
    is shorter.

    >>> class_chunks([b"1", b"2", b"3", b"4", b"5", b"6"], 3)
    [[b'1', b'2', b'3'], [b'4', b'5', b'6']]
    """
    return [list(sorted_class[i : i + size]) for i in range(0, len(sorted_class), size)]


@dataclass(frozen=True, order=True)
class Position:
    """Where a node is in exact rounds: which round and step it offers a contribution
    for, its key (the indices its groups of earlier steps of this round gave it), and the
    number of nodes of the round's plan. At step 0 ``size`` is the node's own count of the
    nodes taking part (itself and its connected peers in exact rounds); nodes whose counts
    differ do not group until their views agree, and the count of step 0 is kept for the
    rest of the round.

    Two nodes are in the same class of a step when their positions are equal.
    """

    round: int
    step: int
    key: tuple[int, ...] = ()
    size: int = 0

    def next(self, index: int) -> Position:
        """The position after this step's group gave the node ``index``."""
        return Position(self.round, self.step + 1, (*self.key, index), self.size)

    def within(self, cls: Position) -> bool:
        """Whether a node now at this position was in the class ``cls`` when it was at
        that step: same round and size, and a key that extends ``cls``'s. A class's
        runs are cut from all of these, so that the groups that formed first and moved
        on still count where they stood.

        >>> Position(3, 2, (1, 0), 16).within(Position(3, 1, (1,), 16))
        True
        >>> Position(3, 2, (2, 0), 16).within(Position(3, 1, (1,), 16))
        False
        """
        return (
            self.round == cls.round
            and self.size == cls.size
            and self.step >= cls.step
            and self.key[: cls.step] == cls.key
        )

    def expected_class_size(self, participants: int, sizes: Sequence[int]) -> int:
        """How many nodes the class of this position has when no node is missing: the
        round's ``participants`` divided by the sizes of the steps before this one."""
        expected = participants
        for m in sizes[: self.step]:
            expected //= m
        return expected
