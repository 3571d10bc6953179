"""Grouping policies: whom a READY node invites, which invites it declines, and when it
stops grouping by a structured rule and falls back to random groups (spec/group.md
section 3).

:class:`~p2pfed.group.GroupProtocol` picks one policy at construction (random, grid or
exact rounds) and keeps a :class:`RandomGrouping` for the fallback. Policies hold no
per-contribution state and do no I/O: the node passes what they need (an :class:`Offer`,
the connected peers, the time, its random generator) and gets a :data:`Decision` back,
which it carries out itself, so every phase change stays in the group state machine.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from p2pfed.exact_rounds import Position, RoundPlan, class_chunks, round_plan, sitting_out
from p2pfed.identity import NodeId

if TYPE_CHECKING:
    from p2pfed.group import GridPosition, GroupConfig

__all__ = [
    "AwaitInvite",
    "Decision",
    "ExactGrouping",
    "FallBack",
    "GridGrouping",
    "Grouping",
    "Invite",
    "LookAgain",
    "Offer",
    "RandomGrouping",
    "SitOutRound",
    "WaitUntil",
    "class_members",
    "exact_plan",
]


@dataclass(frozen=True)
class Offer:
    """The contribution a node offers, as grouping sees it."""

    round: int
    position: Position | None  # exact rounds: the class it is for
    until: float  # structured grouping applies before this time, random grouping after


@dataclass(frozen=True)
class Invite:
    """Invite ``peers``; ``full``: the group starts only if every one of them accepts."""

    peers: tuple[NodeId, ...]
    full: bool


@dataclass(frozen=True)
class LookAgain:
    """Not enough peers (or mates, or class members) yet: try again shortly."""


@dataclass(frozen=True)
class WaitUntil:
    """Another node invites: do not initiate before ``at``."""

    at: float


@dataclass(frozen=True)
class AwaitInvite:
    """Another node invites: look again after a random delay in ``[0, spread]``."""

    spread: float


@dataclass(frozen=True)
class SitOutRound:
    """Exact rounds: this node sits the round out (no initiation until a new offer)."""

    round: int
    participants: int
    nodes: int


@dataclass(frozen=True)
class FallBack:
    """The structured rule cannot group this contribution: random grouping from now on."""


Decision = Invite | LookAgain | WaitUntil | AwaitInvite | SitOutRound | FallBack


def exact_plan(nodes: int, config: GroupConfig, *, sit_out: bool) -> RoundPlan:
    """The plan of an exact round of ``nodes`` nodes (:func:`round_plan`). Without sitting
    out (pure averaging: a model that sits out would drop its weight), a count that would
    need it has no plan: its rounds use random groups."""
    plan = round_plan(nodes, group_min=config.group_min, group_max=config.group_max)
    if plan.sitting_out and not sit_out:
        return RoundPlan(nodes, 0, ())
    return plan


def class_members(
    node_id: NodeId,
    position: Position | None,
    peers: Sequence[NodeId],
    peer_position: Mapping[NodeId, Position],
) -> list[NodeId]:
    """``node_id`` and those of ``peers`` in its exact-rounds class, sorted by id: peers at
    the same position, and those that were there and have moved on this round."""
    if position is None:
        return []
    same = [p for p in peers if (q := peer_position.get(p)) is not None and q.within(position)]
    return sorted({*same, node_id})


class Grouping:
    """The policy interface; as it stands, random grouping's answers to the last two."""

    def __init__(self, node_id: NodeId, config: GroupConfig) -> None:
        self.node_id = node_id
        self.config = config

    def structured_until(self, position: Position | None, now: float) -> float:
        """When a contribution offered at ``now`` falls back to random grouping: a
        structured group must form within the formation bound (mates that lag or crashed
        must not stall the node); at step 0 of an exact round the class includes peers
        still training, so it may wait up to ``class_timeout``."""
        wait = self.config.invite_timeout + self.config.start_timeout
        if position is not None and position.step == 0:
            wait = max(wait, self.config.class_timeout)
        return now + wait

    def structured(self, offer: Offer, now: float) -> bool:
        """Whether ``offer`` is still grouped by this policy's structured rule."""
        return False

    def decline(self, offer: Offer, peer: NodeId, invite_round: int, now: float) -> str | None:
        """Why an invite from ``peer`` for ``invite_round`` does not fit (None: it does)."""
        return None

    def initiate(
        self, offer: Offer, peers: Sequence[NodeId], now: float, rng: random.Random
    ) -> Decision:
        """What a READY node does when its initiation time comes; ``peers``: connected,
        not excluded, without the node itself."""
        raise NotImplementedError


class RandomGrouping(Grouping):
    """Invite up to ``group_max - 1`` connected peers chosen uniformly at random."""

    def initiate(
        self, offer: Offer, peers: Sequence[NodeId], now: float, rng: random.Random
    ) -> Decision:
        candidates = sorted(peers)
        if len(candidates) < self.config.group_min - 1:
            return LookAgain()  # try again later rather than spin
        return Invite(
            tuple(rng.sample(candidates, min(len(candidates), self.config.group_max - 1))),
            full=False,
        )


class GridGrouping(Grouping):
    """Moshpit grid lines (spec/group.md, "Grid grouping"): in round ``r`` a node's group is
    the line through its cell along dimension ``r mod d``, initiated by its lowest id."""

    def __init__(
        self,
        node_id: NodeId,
        config: GroupConfig,
        grid: GridPosition,
        peer_grid: Mapping[NodeId, tuple[int, ...]],
    ) -> None:
        super().__init__(node_id, config)
        self.grid = grid
        self._peer_grid = peer_grid  # the node's table of announced coordinates, live

    def mates(self, peers: Sequence[NodeId], round: int) -> list[NodeId]:
        """Those of ``peers`` in this node's grid group of ``round`` (sorted by id)."""
        table = self._peer_grid
        return sorted(p for p in peers if p in table and self.grid.is_mate(table[p], round))

    def structured(self, offer: Offer, now: float) -> bool:
        return now < offer.until

    def decline(self, offer: Offer, peer: NodeId, invite_round: int, now: float) -> str | None:
        if self.structured(offer, now) and not (
            invite_round == offer.round and self.mates([peer], invite_round)
        ):
            return f"not in this node's grid group of round {offer.round}"
        return None

    def initiate(
        self, offer: Offer, peers: Sequence[NodeId], now: float, rng: random.Random
    ) -> Decision:
        """Invite the whole line if this node is its initiator and all mates are here.

        The initiator is the mate with the lowest node id, so lines never contend for
        members. A node that is not the initiator waits for its invite: it looks again
        only when random grouping takes over (or after an abort reschedules it).
        """
        mates = self.mates(peers, offer.round)
        if mates and mates[0] < self.node_id:
            return WaitUntil(offer.until)
        if len(mates) < self.grid.side - 1:
            return LookAgain()  # not every mate is connected (or announced) yet
        return Invite(tuple(mates[: self.config.group_max - 1]), full=True)


class ExactGrouping(Grouping):
    """Exact rounds (spec/group.md, "Exact rounds"): a node averages only within its class,
    cut into runs of the plan's group size; the first node of each run invites the rest."""

    def __init__(
        self,
        node_id: NodeId,
        config: GroupConfig,
        peer_position: Mapping[NodeId, Position],
        *,
        sit_out: bool,
    ) -> None:
        super().__init__(node_id, config)
        self._peer_position = peer_position  # the node's table of announced positions, live
        self.sit_out = sit_out

    def plan(self, nodes: int) -> RoundPlan:
        return exact_plan(nodes, self.config, sit_out=self.sit_out)

    def structured(self, offer: Offer, now: float) -> bool:
        """Not fallen back, and the count of nodes has a plan (a count without one, say
        while peers are still connecting, groups by the random rules until it changes)."""
        position = offer.position
        return position is not None and now < offer.until and bool(self.plan(position.size).sizes)

    def decline(self, offer: Offer, peer: NodeId, invite_round: int, now: float) -> str | None:
        if self.structured(offer, now) and (
            invite_round != offer.round or self._peer_position.get(peer) != offer.position
        ):
            return "not in this node's class of its round"
        return None

    def initiate(
        self, offer: Offer, peers: Sequence[NodeId], now: float, rng: random.Random
    ) -> Decision:
        """Invite this node's run of its class, if it is the run's first node and the whole
        class is here."""
        position = offer.position
        if position is None:
            return FallBack()
        plan = self.plan(position.size)
        sizes = plan.sizes
        members = class_members(self.node_id, position, peers, self._peer_position)
        if position.step >= len(sizes):  # a step the plan does not have
            return FallBack()
        expected = position.size if position.step == 0 else plan.participants
        if len(members) < position.expected_class_size(expected, sizes):
            return LookAgain()  # part of the class is still training, or not yet announced
        if position.step == 0 and plan.sitting_out:
            out = sitting_out(position.round, [m.raw for m in members], plan.sitting_out)
            if self.node_id.raw in out:
                return SitOutRound(position.round, plan.participants, plan.nodes)
            members = [m for m in members if m.raw not in out]
        run = next(c for c in class_chunks(members, sizes[position.step]) if self.node_id in c)
        if run[0] != self.node_id:
            # the run's first node invites; look again if no invite comes
            return AwaitInvite(self.config.invite_timeout * 2)
        if len(run) < self.config.group_min:
            return FallBack()  # a class that cannot fill a group
        return Invite(tuple(run[1:]), full=True)
