"""The group protocol: forming a group without a coordinator, then a secure all-reduce.

One :class:`GroupProtocol` per node, as a pure state machine (spec/group.md): messages,
local decisions and the current time go in; :class:`Send` actions and group outcomes come
out. It owns no sockets and reads no clock; randomness is injected (``rng`` for choices
and priorities, ``randbytes`` for group ids, nonces and mask keys), so simnet can replay
a run exactly.

Rules of this file:

* A node is in one :class:`Phase` at a time; :data:`PHASES` lists, for each phase, the
  messages it acts on. Three kinds are answered in every phase (:data:`ANSWERED`): an
  invite (a decline where it cannot be accepted), a GroupStart (refused with GroupAbort
  to its members unless it is the start of the group the node is pending for, so they
  abort at once) and an accepting GroupReply for a group the node is not forming
  (answered with GroupAbort, so the invitee stops waiting). Anything else outside the
  table concerns a group we are not in (messages of an aborted group may still be in
  flight) and is ignored.
* Formation: a READY node initiates after a short random delay by inviting up to
  ``group_max - 1`` connected peers with a random 64-bit *priority*. An invitee that is
  READY accepts; an initiator or pending member that receives an invite of *higher*
  priority abandons its own group and accepts, so among concurrent initiators the
  highest-priority one always collects its invitees: no livelock. Every wait has a
  deadline: no deadlock.
* Grid grouping (optional, Moshpit SGD): a node with a :class:`GridPosition` averages in
  round ``r`` only with its *grid mates* of that round, the peers whose announced
  coordinate differs from its own in dimension ``r mod d`` alone. The mate with the lowest
  node id is the only initiator; it invites every mate once all are connected and starts
  only the full line of ``side`` members, so after ``d`` rounds every node holds the exact
  global mean. A node still without a group ``invite_timeout + start_timeout`` after
  offering its contribution falls back to random grouping for that contribution.
* Exact rounds (optional, spec/group.md "Exact rounds"): a node with a
  :class:`~p2pfed.exact_rounds.Position` averages only with peers that announced the same
  position (its *class*). Once it sees its whole class, the class sorted by node id splits
  into runs of the plan's group size; the first node of each run invites the rest and
  starts only the full run. Like grid grouping it falls back to random grouping for a
  contribution that finds no group in time.
* All-reduce (butterfly): the contribution (``d`` model words and one weight word,
  masked) is cut into ``k`` shards; member ``j`` receives shard ``j`` from everyone, sums
  it, and sends the reduced shard to everyone. A member applies a result only when it
  holds all ``k`` reduced shards, each a sum over all ``k`` members, so masks have
  cancelled; any missing piece by the deadline, a lost member or an Abort from anyone
  aborts the group and every member keeps its own model.
"""

from __future__ import annotations

import enum
import functools
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from p2pfed.errors import InvalidGroupSumError, SecureAggregationError
from p2pfed.exact_rounds import Position, RoundPlan, class_chunks, round_plan, sitting_out
from p2pfed.fixedpoint import FixedPointParams, decode_group_sum, make_contribution
from p2pfed.identity import NodeId, NodeIdentity, verify_signature
from p2pfed.masking import GroupMember, MaskingContext, generate_mask_keypair
from p2pfed.messages import (
    MAX_GRID_DIMS,
    MAX_GROUP_MEMBERS,
    GroupAbort,
    GroupInvite,
    GroupMemberInfo,
    GroupReply,
    GroupStart,
    Message,
    ReducedShard,
    Shard,
    is_address_literal,
)

__all__ = [
    "ANSWERED",
    "MASK_KEY_SIGNATURE_CONTEXT",
    "PHASES",
    "Action",
    "GridPosition",
    "GroupAborted",
    "GroupCompleted",
    "GroupConfig",
    "GroupProtocol",
    "GroupStarted",
    "Phase",
    "Send",
    "SitOut",
    "mask_key_signature_input",
    "shard_bounds",
]

MASK_KEY_SIGNATURE_CONTEXT = b"p2pfed-group-mask-key:v1\x00"
GROUP_ID_BYTES = 16
MAX_GRID_SIDE = MAX_GROUP_MEMBERS  # a full grid line is one group


@functools.lru_cache(maxsize=1024)
def _signed(identity_key: bytes, signature: bytes, data: bytes) -> bool:
    """:func:`verify_signature`, cached: a pure function, and every member of a group
    checks the same k signatures (in simnet all in one process, k times over)."""
    return verify_signature(identity_key, signature, data)


def mask_key_signature_input(group_id: bytes, mask_public_key: bytes) -> bytes:
    """What a member signs with its identity to vouch for its mask key in one group."""
    return MASK_KEY_SIGNATURE_CONTEXT + group_id + mask_public_key


def shard_bounds(length: int, k: int) -> list[tuple[int, int]]:
    """Word ranges of the ``k`` shards of a ``length``-word contribution.

    Shard ``j`` is ``[j * length // k, (j + 1) * length // k)``.

    >>> shard_bounds(10, 3)
    [(0, 3), (3, 6), (6, 10)]
    """
    return [(j * length // k, (j + 1) * length // k) for j in range(k)]


@dataclass(frozen=True)
class GroupConfig:
    """Sizes and timeouts of the group protocol (seconds)."""

    group_min: int = 3
    group_max: int = 8
    invite_timeout: float = 2.0
    start_timeout: float = 5.0
    allreduce_timeout: float = 30.0
    class_timeout: float = 30.0
    """Exact rounds: how long a node waits at step 0 for its whole class (peers still
    training) before it falls back to random grouping for that contribution."""
    initiate_delay: float = 0.05
    retry_backoff: float = 0.3
    exclusion: float = 30.0

    def __post_init__(self) -> None:
        if self.group_min < 3:
            raise ValueError("group_min must be at least 3: a group of 2 reveals the other model")
        if self.group_max < self.group_min:
            raise ValueError("group_max must be at least group_min")


@dataclass(frozen=True)
class GridPosition:
    """Where a node sits on a Moshpit grid of ``side ** len(coordinate)`` cells.

    In round ``r`` the node's group is the line through its cell along dimension
    ``r mod d``: the ``side`` nodes whose coordinates equal its own in every other
    dimension (spec/group.md, "Grid grouping").

    >>> GridPosition(3, (0, 2, 1)).is_mate((0, 0, 1), round=1)
    True
    >>> GridPosition(3, (0, 2, 1)).is_mate((0, 0, 1), round=0)
    False
    """

    side: int
    coordinate: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "coordinate", tuple(int(c) for c in self.coordinate))
        if not 2 <= self.side <= MAX_GRID_SIDE:
            raise ValueError(f"grid side must be between 2 and {MAX_GRID_SIDE}, got {self.side}")
        if not 1 <= len(self.coordinate) <= MAX_GRID_DIMS:
            raise ValueError(
                f"a grid coordinate has 1 to {MAX_GRID_DIMS} dimensions, got {self.coordinate}"
            )
        if not all(0 <= c < self.side for c in self.coordinate):
            raise ValueError(f"grid coordinate {self.coordinate} is outside 0..{self.side - 1}")

    @property
    def dims(self) -> int:
        """The number of grid dimensions ``d``."""
        return len(self.coordinate)

    def is_mate(self, other: Sequence[int], round: int) -> bool:
        """Whether a peer at ``other`` is in this node's group of ``round``."""
        axis = round % self.dims
        return (
            len(other) == self.dims
            and all(0 <= c < self.side for c in other)
            and other[axis] != self.coordinate[axis]
            and all(
                o == c
                for i, (o, c) in enumerate(zip(other, self.coordinate, strict=True))
                if i != axis
            )
        )


class Phase(enum.Enum):
    IDLE = "idle"  # no contribution ready (training, or stopped)
    READY = "ready"  # contribution ready, no group yet
    INITIATING = "initiating"  # invited peers, collecting replies
    PENDING = "pending"  # accepted an invite, waiting for the start
    RUNNING = "running"  # in an all-reduce


#: Messages answered in every phase, whatever group they are about (spec/group.md
#: section 2): an invite always gets a reply, and a start or acceptance of a group the
#: node is not in gets a GroupAbort, so nobody waits for it until a deadline.
ANSWERED: frozenset[type[Message]] = frozenset({GroupInvite, GroupStart, GroupReply})

#: Messages each phase acts on (beyond :data:`ANSWERED`); anything else is stale and
#: ignored.
PHASES: dict[Phase, frozenset[type[Message]]] = {
    Phase.IDLE: frozenset(),
    Phase.READY: frozenset(),
    Phase.INITIATING: frozenset({GroupReply, GroupAbort}),
    Phase.PENDING: frozenset({GroupStart, GroupAbort, Shard, ReducedShard}),
    Phase.RUNNING: frozenset({Shard, ReducedShard, GroupAbort}),
}


@dataclass(frozen=True)
class Send:
    """Send ``message`` to ``peer`` (connecting first if needed, to ``address``)."""

    peer: NodeId
    message: Message
    address: tuple[str, int] | None = None


@dataclass(frozen=True)
class GroupCompleted:
    """The group sum arrived complete: adopt ``mean``; the group's total weight is
    ``total_weight`` (spec/group.md, "Weights", says what a member's weight becomes).
    A group whose members all contributed weight 0 has no mean: each member keeps its own
    model (``mean`` is then the member's own contribution)."""

    group_id: bytes
    round: int
    members: tuple[NodeId, ...]
    mean: np.ndarray
    total_weight: int
    structured: bool = False
    """Formed by the grid or exact-round rules (not by random grouping or a fallback)."""
    ring_sum: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The group's unmasked sum of contributions in the ring, weight word last (None if
    every member contributed weight 0): what an exact round carries to its next step."""

    def share(self, member: NodeId) -> int:
        """``member``'s push-sum share of the total weight: ``W`` split into ``k`` integers
        that differ by at most one, the larger ones to the first members in node-id order,
        so that the shares add up to ``W`` exactly.

        >>> from p2pfed.identity import NodeId
        >>> ids = tuple(NodeId(bytes([i]) * 32) for i in range(3))
        >>> done = GroupCompleted(b"g" * 16, 0, ids, np.zeros(1, np.float32), 10)
        >>> [done.share(m) for m in ids]
        [4, 3, 3]
        """
        k = len(self.members)
        base, extra = divmod(self.total_weight, k)
        return base + (1 if self.members.index(member) < extra else 0)


@dataclass(frozen=True)
class GroupAborted:
    """The group failed; nothing was applied. ``blame``: members to avoid for a while."""

    group_id: bytes
    reason: str
    blame: tuple[NodeId, ...] = ()
    formed: bool = False  # True if it failed during the all-reduce


@dataclass(frozen=True)
class GroupStarted:
    """This node is now in an all-reduce with ``members`` (informational)."""

    group_id: bytes
    round: int
    members: tuple[NodeId, ...]


@dataclass(frozen=True)
class SitOut:
    """Exact rounds: this node sits round ``round`` out (its count of nodes has no plan
    for all of them); it should withdraw its contribution and adopt the round's average
    from a peer once the ``participants`` have computed it."""

    round: int
    participants: int
    nodes: int


Action = Send | GroupStarted | GroupCompleted | GroupAborted | SitOut


@dataclass
class _Contribution:
    vector: np.ndarray
    weight: int
    round: int
    carried: np.ndarray | None = None
    """An exact round's ring sum to send as it is (``vector`` is then its mean)."""


@dataclass
class _Formation:
    group_id: bytes
    priority: int
    deadline: float
    invited: set[NodeId]
    accepted: dict[NodeId, GroupReply] = field(default_factory=dict)
    required: int = 0  # a grid line: every one of these invitees must accept (0: random)


@dataclass
class _Pending:
    group_id: bytes
    priority: int
    initiator: NodeId
    deadline: float
    mask_private: bytes
    # shards that other members sent before our GroupStart arrived (channels are
    # independent, so this happens); replayed when the group starts
    early: list[tuple[NodeId, Message]] = field(default_factory=list)


@dataclass
class _Run:
    group_id: bytes
    round: int
    members: tuple[NodeId, ...]
    index: int
    bounds: list[tuple[int, int]]
    deadline: float
    masked: np.ndarray
    structured: bool
    shards: dict[int, np.ndarray] = field(default_factory=dict)  # sender index -> my shard
    reduced: dict[int, np.ndarray] = field(default_factory=dict)  # reducer index -> shard


class GroupProtocol:
    """One node's side of group formation and secure all-reduce (see module docstring).

    ``fingerprint`` and ``model_size`` describe the model: invites for another model are
    declined. ``address_of(node_id)`` gives the listen address of a peer, if known, for
    the member list of a group this node starts. ``excluded(node_id, now)`` says whether
    the node currently excludes a peer it blamed for a failed group (spec/group.md
    section 6): invites from it are declined and a start that lists it is refused.

    ``masking`` is for benchmarks only: with ``False``, contributions are encoded but not
    masked (the wire format is unchanged, the privacy is gone). Mask keys are still
    exchanged and checked, so only the cost of the masks themselves goes away.

    ``grid`` places the node on a Moshpit grid (grid grouping, see the module docstring);
    the driver reports each peer's announced coordinate with :meth:`set_peer_grid`.
    ``None`` (the default): random grouping.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        config: GroupConfig,
        params: FixedPointParams,
        *,
        fingerprint: bytes,
        model_size: int,
        listen_port: int,
        address_of: Callable[[NodeId], tuple[str, int] | None] = lambda _: None,
        excluded: Callable[[NodeId, float], bool] = lambda _peer, _now: False,
        rng: random.Random | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
        numpy_rng: np.random.Generator | None = None,
        masking: bool = True,
        grid: GridPosition | None = None,
        exact: bool = False,
        sit_out: bool = True,
    ) -> None:
        if params.max_group_size < config.group_max:
            raise ValueError("the fixed-point parameters must allow groups of group_max")
        if grid is not None and not config.group_min <= grid.side <= config.group_max:
            raise ValueError(
                f"a grid line of {grid.side} nodes is one group: the side must be between "
                f"group_min ({config.group_min}) and group_max ({config.group_max})"
            )
        self.identity = identity
        self.node_id = identity.node_id
        self.config = config
        self.params = params
        self.fingerprint = fingerprint
        self.model_size = model_size
        self.listen_port = listen_port
        self.masking = masking
        self.grid = grid
        self.exact = exact and grid is None
        # exact rounds of a count without a plan for all: some nodes sit a round out (off
        # for pure averaging, where a model that sits out would drop its weight)
        self.sit_out = sit_out
        self._peer_grid: dict[NodeId, tuple[int, ...]] = {}
        self._position: Position | None = None  # exact rounds: this contribution's class
        self._peer_position: dict[NodeId, Position] = {}
        self._grid_until = 0.0  # grid grouping / exact classes for this contribution until then
        self._passive = False  # answer invites only, never initiate (set_contribution)
        self._address_of = address_of
        self._excluded = excluded
        self._rng = rng or random.Random(int.from_bytes(randbytes(16), "big"))
        self._randbytes = randbytes
        self._np_rng = numpy_rng or np.random.default_rng(
            np.random.SeedSequence(int.from_bytes(randbytes(32), "big"))
        )
        self.phase = Phase.IDLE
        self._contribution: _Contribution | None = None
        self._initiate_at: float | None = None
        self._formation: _Formation | None = None
        self._pending: _Pending | None = None
        self._run: _Run | None = None
        self._identity_keys: dict[NodeId, bytes] = {}
        self._now = 0.0  # the time of the latest input

    def register_peer(self, peer: NodeId, identity_key: bytes) -> None:
        """Remember a connected peer's identity key (from its channel handshake)."""
        self._identity_keys[peer] = identity_key

    def set_peer_grid(self, peer: NodeId, coordinate: Sequence[int]) -> None:
        """Remember the grid coordinate a peer announced (empty: not on a grid)."""
        if coordinate:
            self._peer_grid[peer] = tuple(coordinate)
        else:
            self._peer_grid.pop(peer, None)

    def set_peer_position(self, peer: NodeId, position: Position) -> None:
        """Remember the exact-rounds position a peer announced (GroupPosition).

        A READY node in exact rounds looks at its class again at the next :meth:`poll`:
        the class may just have become complete, and a run should start at once rather
        than at the next retry."""
        self._peer_position[peer] = position
        ready = self.phase is Phase.READY and self._position is not None and not self._passive
        if ready and (self._initiate_at is None or self._initiate_at > self._now):
            self._initiate_at = self._now

    def peer_position(self, peer: NodeId) -> Position | None:
        """The latest exact-rounds position ``peer`` announced, if any."""
        return self._peer_position.get(peer)

    @property
    def position(self) -> Position | None:
        """This node's exact-rounds position for its current contribution."""
        return self._position

    def update_position(self, position: Position) -> bool:
        """Change the position of the current contribution (a node's count of the nodes
        taking part changed while it waits at step 0). Only a READY node moves: one
        forming, pending or running keeps its group. Returns whether it moved."""
        if self.phase is not Phase.READY or self._formation is not None:
            return False
        self._position = position
        return True

    def exact_plan(self, nodes: int) -> RoundPlan:
        """The plan of an exact round of ``nodes`` nodes (:func:`round_plan`). Without
        sitting out (pure averaging: a model that sits out would drop its weight), a count
        that would need it has no plan: its rounds use random groups."""
        plan = round_plan(nodes, group_min=self.config.group_min, group_max=self.config.group_max)
        if plan.sitting_out and not self.sit_out:
            return RoundPlan(nodes, 0, ())
        return plan

    def class_of(self, peers: Sequence[NodeId]) -> list[NodeId]:
        """This node and those of ``peers`` in its exact-rounds class, sorted by id: peers
        at the same position, and those that were there and have moved on this round."""
        position = self._position
        if position is None:
            return []
        same = [
            p for p in peers if (q := self._peer_position.get(p)) is not None and q.within(position)
        ]
        return sorted({*same, self.node_id})

    def grid_mates(self, peers: Sequence[NodeId], round: int) -> list[NodeId]:
        """Those of ``peers`` in this node's grid group of ``round`` (sorted by id)."""
        grid = self.grid
        if grid is None:
            return []
        return sorted(
            p for p in peers if p in self._peer_grid and grid.is_mate(self._peer_grid[p], round)
        )

    def busy_with(self) -> set[NodeId]:
        """The peers of the group this node is forming, pending for or running."""
        peers: set[NodeId] = set()
        if self._formation is not None:
            peers |= self._formation.invited | set(self._formation.accepted)
        if self._pending is not None:
            peers.add(self._pending.initiator)
        if self._run is not None:
            peers.update(self._run.members)
        return peers

    def _grid_grouping(self, now: float) -> bool:
        """Whether the current contribution is still grouped on the grid (not fallen back)."""
        return self.grid is not None and now < self._grid_until

    def _exact_grouping(self, now: float) -> bool:
        """Whether the current contribution is still grouped by its exact-rounds class: not
        fallen back, and its count of nodes has a plan (a count without one, say while
        peers are still connecting, groups by the random rules until it changes)."""
        position = self._position
        return (
            self.exact
            and position is not None
            and now < self._grid_until
            and bool(self.exact_plan(position.size).sizes)
        )

    # -- local decisions -----------------------------------------------------------------

    def set_contribution(
        self,
        vector: np.ndarray,
        weight: int,
        round: int,
        now: float,
        *,
        initiate: bool = True,
        position: Position | None = None,
        carried: np.ndarray | None = None,
    ) -> None:
        """Offer ``vector`` (the model as released: after DP) with push-sum ``weight``.

        The node becomes READY: it accepts invites and will initiate a group itself after a
        short random delay. The same contribution is reused if a group aborts. With
        ``initiate=False`` the node only answers invites (a node that finished its rounds
        and lingers to help others: groups among finished nodes would be traffic for
        nothing).

        ``position`` (exact rounds only) is the class this contribution is for; ``None``
        groups it by the random rules.

        ``carried`` (exact rounds, after step 0) is the unmasked ring sum of the node's
        last group, :attr:`GroupCompleted.ring_sum`, whose weight word is ``weight``: it is
        sent as the contribution instead of an encoding of ``vector`` (its decoded mean),
        so the round's last sum is the integer sum of every trained model's own encoding,
        exactly what one group of all nodes would add up (spec/group.md, "Exact rounds").
        """
        self._now = now
        self._passive = not initiate
        if vector.shape != (self.model_size,) or vector.dtype != np.float32:
            raise ValueError(f"expected a float32 vector of {self.model_size} values")
        if carried is not None and (
            carried.shape != (self.model_size + 1,)
            or carried.dtype != self.params.dtype
            or int(carried[-1]) != int(weight)
            or not 0 < int(weight) <= self.params.max_weight
        ):
            raise ValueError(
                f"a carried sum is {self.model_size + 1} {self.params.dtype} words ending "
                f"with its weight, at most max_weight = {self.params.max_weight}"
            )
        self._contribution = _Contribution(vector, int(weight), round, carried)
        self._position = position if self.exact else None
        # a grid group must form within the formation bound, else random grouping takes
        # over for this contribution (mates that lag or crashed must not stall the node);
        # at step 0 of an exact round the class includes peers still training
        wait = self.config.invite_timeout + self.config.start_timeout
        if self._position is not None and self._position.step == 0:
            wait = max(wait, self.config.class_timeout)
        self._grid_until = now + wait
        if self.phase is Phase.IDLE:
            self.phase = Phase.READY
            # a random delay spreads contending initiators; a run of an exact round has
            # one initiator and nothing to contend with
            spread = 0.0 if self._position is not None else self.config.initiate_delay
            self._schedule_initiate(now, spread)

    def withdraw(self) -> list[Action]:
        """Stop offering a contribution (shutdown, or out of privacy budget)."""
        actions = self._abort_current("withdrawn by the node")
        self._contribution = None
        self._position = None
        self.phase = Phase.IDLE
        self._initiate_at = None
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do (``None``: only a message can help)."""
        times = [
            t
            for t in (
                self._initiate_at if self.phase is Phase.READY else None,
                self._formation.deadline if self._formation else None,
                self._pending.deadline if self._pending else None,
                self._run.deadline if self._run else None,
            )
            if t is not None
        ]
        return min(times) if times else None

    def poll(self, now: float, connected: Sequence[NodeId]) -> list[Action]:
        """Handle expired deadlines, and initiate a group when it is time.

        ``connected``: peers with an open channel that are not excluded.
        """
        self._now = now
        actions: list[Action] = []
        if self._formation and now >= self._formation.deadline:
            actions += self._finish_formation(now)
        if self._pending and now >= self._pending.deadline:
            self._pending = None
            self.phase = Phase.READY
            self._schedule_initiate(now, self.config.retry_backoff)
        if self._run and now >= self._run.deadline:
            run = self._run
            missing = self._missing(run)
            actions += self._abort_run(
                f"all-reduce timed out waiting for {', '.join(m.short for m in missing)}",
                blame=missing,
                notify=True,
            )
        if self.phase is Phase.READY and self._initiate_at is not None and now >= self._initiate_at:
            actions += self._initiate(now, connected)
        return actions

    def peer_lost(self, peer: NodeId, now: float) -> list[Action]:
        """A channel closed: a group that needs ``peer`` cannot finish."""
        self._now = now
        self._peer_position.pop(peer, None)
        if self._run and peer in self._run.members:
            return self._abort_run(f"member {peer.short} disconnected", blame=[peer], notify=True)
        if self._formation:
            self._formation.invited.discard(peer)
            self._formation.accepted.pop(peer, None)
        if self._pending and self._pending.initiator == peer:
            self._pending = None
            self.phase = Phase.READY
            self._schedule_initiate(now, self.config.retry_backoff)
        return []

    # -- messages ------------------------------------------------------------------------

    def receive(self, peer: NodeId, message: Message, now: float) -> list[Action]:
        """Handle a group message from ``peer`` (an authenticated channel's peer id)."""
        self._now = now
        if isinstance(message, GroupInvite):
            return self._on_invite(peer, message, now)
        if isinstance(message, GroupStart):
            return self._on_start(peer, message, now)
        if isinstance(message, GroupReply):
            return self._on_reply(peer, message, now)
        if type(message) not in PHASES[self.phase]:
            return []  # stale: about a group we are no longer in
        if isinstance(message, GroupAbort):
            return self._on_abort(peer, message, now)
        if self._pending is not None:  # a Shard or ReducedShard that overtook the start
            if (
                message.group_id == self._pending.group_id  # type: ignore[attr-defined]
                and len(self._pending.early) < 2 * self.config.group_max
            ):
                self._pending.early.append((peer, message))
            return []
        if isinstance(message, Shard):
            return self._on_shard(peer, message)
        if isinstance(message, ReducedShard):
            return self._on_reduced(peer, message)
        return []

    # -- formation -----------------------------------------------------------------------

    def _look_again(self, now: float) -> None:
        """Try initiating again shortly: what was missing (peers, mates, a class) may come."""
        self._schedule_initiate(now, max(self.config.retry_backoff, 0.1) * 2)

    def _schedule_initiate(self, now: float, spread: float) -> None:
        if self._passive:
            self._initiate_at = None
            return
        self._initiate_at = now + self._rng.uniform(0.0, spread)

    def _initiate(self, now: float, connected: Sequence[NodeId]) -> list[Action]:
        self._initiate_at = None
        if self._grid_grouping(now):
            return self._initiate_grid(now, connected)
        if self._exact_grouping(now):
            return self._initiate_exact(now, connected)
        candidates = sorted(p for p in connected if p != self.node_id)
        if len(candidates) < self.config.group_min - 1:
            # not enough peers yet: try again later rather than spin
            self._look_again(now)
            return []
        chosen = self._rng.sample(candidates, min(len(candidates), self.config.group_max - 1))
        return self._invite(now, chosen, full=False)

    def _initiate_grid(self, now: float, connected: Sequence[NodeId]) -> list[Action]:
        """Invite the whole grid line if this node is its initiator and all mates are here.

        The initiator is the mate with the lowest node id, so lines never contend for
        members. A node that is not the initiator waits for its invite: it looks again
        only when random grouping takes over (or after an abort reschedules it).
        """
        grid, contribution = self.grid, self._contribution
        assert grid is not None and contribution is not None
        mates = self.grid_mates([p for p in connected if p != self.node_id], contribution.round)
        if mates and mates[0] < self.node_id:
            self._initiate_at = self._grid_until
            return []
        if len(mates) < grid.side - 1:
            # not every mate is connected (or announced) yet: look again shortly
            self._look_again(now)
            return []
        return self._invite(now, mates[: self.config.group_max - 1], full=True)

    def _initiate_exact(self, now: float, connected: Sequence[NodeId]) -> list[Action]:
        """Invite this node's run of its class, if it is the run's first node and the
        whole class is here (spec/group.md, "Exact rounds")."""
        position = self._position
        assert position is not None
        plan = self.exact_plan(position.size)
        sizes = plan.sizes
        members = self.class_of([p for p in connected if p != self.node_id])
        if position.step >= len(sizes):  # a step the plan does not have: random grouping
            self._grid_until = now
            return self._initiate(now, connected)
        expected = position.size if position.step == 0 else plan.participants
        if len(members) < position.expected_class_size(expected, sizes):
            # part of the class has not arrived (still training, or not yet announced)
            self._look_again(now)
            return []
        if position.step == 0 and plan.sitting_out:
            out = sitting_out(position.round, [m.raw for m in members], plan.sitting_out)
            if self.node_id.raw in out:
                # this node sits the round out and adopts its average afterwards
                self._initiate_at = None
                return [SitOut(position.round, plan.participants, plan.nodes)]
            members = [m for m in members if m.raw not in out]
        run = next(c for c in class_chunks(members, sizes[position.step]) if self.node_id in c)
        if run[0] != self.node_id:
            # the run's first node invites; look again if no invite comes
            self._schedule_initiate(now, self.config.invite_timeout * 2)
            return []
        if len(run) < self.config.group_min:
            self._grid_until = now  # a class that cannot fill a group: random grouping
            return self._initiate(now, connected)
        return self._invite(now, run[1:], full=True)

    def _invite(self, now: float, chosen: Sequence[NodeId], *, full: bool) -> list[Action]:
        contribution = self._contribution
        assert contribution is not None
        formation = _Formation(
            group_id=self._randbytes(GROUP_ID_BYTES),
            priority=self._rng.getrandbits(64),
            deadline=now + self.config.invite_timeout,
            invited=set(chosen),
            required=len(chosen) if full else 0,
        )
        self._formation = formation
        self.phase = Phase.INITIATING
        invite = GroupInvite(
            group_id=formation.group_id,
            priority=formation.priority,
            round=contribution.round,
            fingerprint=self.fingerprint,
            model_size=self.model_size,
        )
        return [Send(peer, invite) for peer in sorted(chosen)]

    def _decline(self, peer: NodeId, group_id: bytes, reason: str) -> list[Action]:
        reply = GroupReply(
            group_id=group_id,
            accept=False,
            reason=reason,
            mask_key=b"",
            key_signature=b"",
            listen_port=self.listen_port,
        )
        return [Send(peer, reply)]

    def _on_invite(self, peer: NodeId, invite: GroupInvite, now: float) -> list[Action]:
        if invite.fingerprint != self.fingerprint or invite.model_size != self.model_size:
            return self._decline(peer, invite.group_id, "model mismatch: different task or model")
        if self._excluded(peer, now):
            return self._decline(peer, invite.group_id, "excluded: it failed a recent group")
        contribution = self._contribution
        if (
            contribution is not None
            and self._grid_grouping(now)
            and not (invite.round == contribution.round and self.grid_mates([peer], invite.round))
        ):
            return self._decline(
                peer,
                invite.group_id,
                f"not in this node's grid group of round {contribution.round}",
            )
        if (
            contribution is not None
            and self._exact_grouping(now)
            and (
                invite.round != contribution.round
                or self._peer_position.get(peer) != self._position
            )
        ):
            return self._decline(peer, invite.group_id, "not in this node's class of its round")
        actions: list[Action] = []
        if self.phase is Phase.INITIATING:
            assert self._formation is not None
            if invite.priority <= self._formation.priority:
                return self._decline(peer, invite.group_id, "busy: initiating a group")
            actions += self._cancel_formation("preempted by a higher-priority group")
        elif self.phase is Phase.PENDING:
            # never withdraw from a group already accepted: its initiator may have sent
            # the start, and the whole group would abort (spec/group.md, rule 3)
            return self._decline(peer, invite.group_id, "busy: joining another group")
        if self.phase is not Phase.READY:
            return actions + self._decline(peer, invite.group_id, f"busy: {self.phase.value}")
        mask_private, mask_public = generate_mask_keypair(self._randbytes)
        signature = self.identity.sign(mask_key_signature_input(invite.group_id, mask_public))
        self._pending = _Pending(
            group_id=invite.group_id,
            priority=invite.priority,
            initiator=peer,
            deadline=now + self.config.invite_timeout + self.config.start_timeout,
            mask_private=mask_private,
        )
        self.phase = Phase.PENDING
        self._initiate_at = None
        reply = GroupReply(
            group_id=invite.group_id,
            accept=True,
            reason="",
            mask_key=mask_public,
            key_signature=signature,
            listen_port=self.listen_port,
        )
        return [*actions, Send(peer, reply)]

    def _on_reply(self, peer: NodeId, reply: GroupReply, now: float) -> list[Action]:
        formation = self._formation
        if formation is None or reply.group_id != formation.group_id:
            # an acceptance that arrived after we cancelled (or started without it): the
            # invitee is pending for a group that will never start; let it go now
            if reply.accept:
                abort = GroupAbort(group_id=reply.group_id, reason="not forming this group")
                return [Send(peer, abort)]
            return []
        if peer not in formation.invited:
            return []
        formation.invited.discard(peer)
        if reply.accept:
            formation.accepted[peer] = reply
        if not formation.invited or (formation.required and not reply.accept):
            return self._finish_formation(now)  # a grid line with a decline cannot start
        return []

    def _cancel_formation(self, reason: str) -> list[Action]:
        formation = self._formation
        assert formation is not None
        self._formation = None
        self.phase = Phase.READY
        # only those whose acceptance arrived: an acceptance still on its way is answered
        # with GroupAbort when it arrives (_on_reply), and a decline needs nothing
        abort = GroupAbort(group_id=formation.group_id, reason=reason)
        return [Send(peer, abort) for peer in sorted(formation.accepted)]

    def _finish_formation(self, now: float) -> list[Action]:
        formation = self._formation
        assert formation is not None and self._contribution is not None
        if formation.required and len(formation.accepted) < formation.required:
            # a grid line or exact run is all or nothing: a partial one loses the exact mean
            cancel = self._cancel_formation(
                f"group incomplete ({len(formation.accepted) + 1} of "
                f"{formation.required + 1} members)"
            )
            self._schedule_initiate(now, self.config.retry_backoff)
            return cancel
        if len(formation.accepted) + 1 < self.config.group_min:
            cancel = self._cancel_formation(
                f"too few members accepted ({len(formation.accepted) + 1} of at least "
                f"{self.config.group_min})"
            )
            self._schedule_initiate(now, self.config.retry_backoff)
            return cancel
        self._formation = None
        mask_private, mask_public = generate_mask_keypair(self._randbytes)
        own = GroupMemberInfo(
            identity_key=self.identity.public_key,
            mask_key=mask_public,
            key_signature=self.identity.sign(
                mask_key_signature_input(formation.group_id, mask_public)
            ),
            host="",
            port=self.listen_port,
        )
        infos = {self.node_id: own}
        for peer, reply in formation.accepted.items():
            host, _ = self._address_of(peer) or ("", 0)
            if not is_address_literal(host):
                host = ""  # a host name (say a bootstrap entry) is not sent (version 2)
            infos[peer] = GroupMemberInfo(
                identity_key=self._identity_keys[peer],
                mask_key=reply.mask_key,
                key_signature=reply.key_signature,
                host=host,
                port=reply.listen_port,
            )
        members = sorted(infos)
        start = GroupStart(
            group_id=formation.group_id,
            round=self._contribution.round,
            nonce=self._randbytes(32),
            members=[infos[m] for m in members],
        )
        actions: list[Action] = [Send(peer, start) for peer in members if peer != self.node_id]
        try:
            actions += self._begin_run(start, mask_private, now)
        except SecureAggregationError as exc:
            actions += self._abort_run(f"cannot start: {exc}", blame=[], notify=True, start=start)
        return actions

    # -- all-reduce ----------------------------------------------------------------------

    def _on_start(self, peer: NodeId, start: GroupStart, now: float) -> list[Action]:
        pending = self._pending
        if pending is None or pending.group_id != start.group_id:
            # we are not (or no longer: our wait timed out) pending for this group: tell
            # its members so they abort now instead of at their all-reduce deadline
            return self._refuse_start(start, "not a pending member of this group")
        if peer != pending.initiator:
            return []
        self._pending = None
        listed = (NodeId.from_public_key(m.identity_key) for m in start.members)
        excluded = sorted(m for m in listed if m != self.node_id and self._excluded(m, now))
        if excluded:
            # exclusion holds for groups a node joins, not only those it initiates
            self.phase = Phase.READY
            self._schedule_initiate(now, self.config.retry_backoff)
            names = ", ".join(m.short for m in excluded)
            return self._refuse_start(start, f"the group lists excluded nodes: {names}")
        try:
            actions = self._begin_run(start, pending.mask_private, now)
        except SecureAggregationError as exc:
            self.phase = Phase.READY
            self._schedule_initiate(now, self.config.retry_backoff)
            return self._refuse_start(start, f"invalid group start: {exc}")
        for sender, early in pending.early:
            if self._run is None:
                break
            actions += self.receive(sender, early, now)
        return actions

    def _refuse_start(self, start: GroupStart, reason: str) -> list[Action]:
        abort = GroupAbort(group_id=start.group_id, reason=reason)
        members = [NodeId.from_public_key(m.identity_key) for m in start.members]
        return [Send(m, abort) for m in members if m != self.node_id]

    def _begin_run(self, start: GroupStart, mask_private: bytes, now: float) -> list[Action]:
        contribution = self._contribution
        assert contribution is not None
        ids = [NodeId.from_public_key(m.identity_key) for m in start.members]
        if ids != sorted(set(ids)):
            raise SecureAggregationError("members are not sorted by node id, or repeat")
        if self.node_id not in ids:
            raise SecureAggregationError("this node is not in the member list")
        if not self.config.group_min <= len(ids) <= self.config.group_max:
            raise SecureAggregationError(f"group of {len(ids)} is outside the allowed sizes")
        for member_id, info in zip(ids, start.members, strict=True):
            signed = mask_key_signature_input(start.group_id, info.mask_key)
            if not _signed(bytes(info.identity_key), bytes(info.key_signature), signed):
                raise SecureAggregationError(
                    f"the mask key of member {member_id.short} is not signed by its identity"
                )
        masking = MaskingContext(
            self.node_id.raw,
            mask_private,
            [
                GroupMember(node_id=i.raw, mask_public_key=m.mask_key)
                for i, m in zip(ids, start.members, strict=True)
            ],
            start.nonce,
            start.round,
            self.params,
        )
        if contribution.carried is not None:
            masked = contribution.carried.copy()
            if self.masking:
                masking.mask_range(masked, 0, in_place=True)
        elif self.masking:
            masked = masking.masked_contribution(
                contribution.vector, contribution.weight, self._np_rng
            )
        else:  # benchmarks only (see the class docstring): the plain encoding
            masked = make_contribution(
                contribution.vector, contribution.weight, self.params, self._np_rng
            )
        index = ids.index(self.node_id)
        bounds = shard_bounds(len(masked), len(ids))
        run = _Run(
            group_id=start.group_id,
            round=start.round,
            members=tuple(ids),
            index=index,
            bounds=bounds,
            deadline=now + self.config.allreduce_timeout,
            masked=masked,
            structured=self._grid_grouping(now) or self._exact_grouping(now),
        )
        self._run = run
        self.phase = Phase.RUNNING
        self._initiate_at = None
        actions: list[Action] = [GroupStarted(start.group_id, start.round, tuple(ids))]
        # a version-1 initiator may send a host name: ignored, as if it were empty
        addresses = {
            i: (m.host, m.port)
            for i, m in zip(ids, start.members, strict=True)
            if m.host and is_address_literal(m.host)
        }
        for j, member in enumerate(ids):
            a, b = bounds[j]
            if j == index:
                run.shards[index] = masked[a:b]
                continue
            data = masked[a:b].data.cast("B")
            shard = Shard(group_id=start.group_id, index=j, data=data)
            actions.append(Send(member, shard, addresses.get(member)))
        return actions + self._progress()

    def _sender_index(self, run: _Run, peer: NodeId) -> int | None:
        try:
            return run.members.index(peer)
        except ValueError:
            return None

    def _words(self, data: bytes | memoryview, expected: int) -> np.ndarray | None:
        dtype = self.params.dtype.newbyteorder("<")
        if len(data) != expected * dtype.itemsize:
            return None
        return np.frombuffer(data, dtype=dtype)

    def _on_shard(self, peer: NodeId, shard: Shard) -> list[Action]:
        run = self._run
        assert run is not None
        sender = self._sender_index(run, peer)
        if shard.group_id != run.group_id or sender is None:
            return []
        a, b = run.bounds[run.index]
        words = self._words(shard.data, b - a)
        if shard.index != run.index or words is None or sender in run.shards:
            return self._abort_run(
                f"member {peer.short} sent a malformed shard", blame=[peer], notify=True
            )
        run.shards[sender] = words
        return self._progress()

    def _on_reduced(self, peer: NodeId, reduced: ReducedShard) -> list[Action]:
        run = self._run
        assert run is not None
        sender = self._sender_index(run, peer)
        if reduced.group_id != run.group_id or sender is None:
            return []
        a, b = run.bounds[sender]
        words = self._words(reduced.data, b - a)
        if reduced.index != sender or words is None or sender in run.reduced:
            return self._abort_run(
                f"member {peer.short} sent a malformed reduced shard", blame=[peer], notify=True
            )
        run.reduced[sender] = words
        return self._progress()

    def _progress(self) -> list[Action]:
        run = self._run
        assert run is not None
        actions: list[Action] = []
        k = len(run.members)
        if run.index not in run.reduced and len(run.shards) == k:
            total = np.zeros_like(run.shards[run.index])
            for j in range(k):
                np.add(total, run.shards[j], out=total)
            run.reduced[run.index] = total
            run.shards.clear()
            data = total.data.cast("B")
            message = ReducedShard(group_id=run.group_id, index=run.index, data=data)
            actions += [Send(m, message) for m in run.members if m != self.node_id]
        if len(run.reduced) == k:
            full = np.concatenate([run.reduced[j] for j in range(k)])
            contribution = self._contribution
            assert contribution is not None
            try:
                if not full.any():
                    # every member contributed weight 0: there is no mean to adopt
                    mean, total_weight = contribution.vector, 0
                else:
                    mean, total_weight = decode_group_sum(full, self.params)
            except InvalidGroupSumError as exc:
                return actions + self._abort_run(str(exc), blame=[], notify=True)
            self._run = None
            self._contribution = None
            self._position = None
            self.phase = Phase.IDLE
            actions.append(
                GroupCompleted(
                    group_id=run.group_id,
                    round=run.round,
                    members=run.members,
                    mean=mean,
                    total_weight=total_weight,
                    structured=run.structured,
                    ring_sum=full if total_weight else None,
                )
            )
        return actions

    def _missing(self, run: _Run) -> list[NodeId]:
        if run.index not in run.reduced:
            return [m for j, m in enumerate(run.members) if j not in run.shards]
        return [m for j, m in enumerate(run.members) if j not in run.reduced]

    def _on_abort(self, peer: NodeId, abort: GroupAbort, now: float) -> list[Action]:
        if self._formation and abort.group_id == self._formation.group_id:
            # an invitee withdrew before the start
            self._formation.accepted.pop(peer, None)
            self._formation.invited.discard(peer)
            if not self._formation.invited or self._formation.required:
                return self._finish_formation(now)
            return []
        if self._pending and abort.group_id == self._pending.group_id:
            # from the initiator (cancelled) or from a member that refused the start: the
            # group cannot complete either way, so stop waiting for it
            self._pending = None
            self.phase = Phase.READY
            self._schedule_initiate(now, self.config.retry_backoff)
            return []
        if self._run and abort.group_id == self._run.group_id and peer in self._run.members:
            # pass it on: the sender may not have told everyone (a withdrawn invitee only
            # knows the initiator); each member does this at most once per group
            reason = f"aborted by {peer.short}: {abort.reason}"
            return self._abort_run(reason, blame=[], notify=True)
        return []

    def _abort_current(self, reason: str) -> list[Action]:
        if self._formation:
            return self._cancel_formation(reason)
        if self._pending:
            abort = GroupAbort(group_id=self._pending.group_id, reason=reason)
            initiator = self._pending.initiator
            self._pending = None
            return [Send(initiator, abort)]
        if self._run:
            return self._abort_run(reason, blame=[], notify=True)
        return []

    def _abort_run(
        self,
        reason: str,
        *,
        blame: Sequence[NodeId],
        notify: bool,
        start: GroupStart | None = None,
    ) -> list[Action]:
        """Drop the running group (nothing applied) and tell the other members."""
        run = self._run
        self._run = None
        if run is not None:
            group_id, members = run.group_id, run.members
        else:
            assert start is not None
            group_id = start.group_id
            members = tuple(NodeId.from_public_key(m.identity_key) for m in start.members)
        actions: list[Action] = []
        if notify:
            abort = GroupAbort(group_id=group_id, reason=reason[:256])
            actions += [Send(m, abort) for m in members if m != self.node_id]
        self.phase = Phase.READY if self._contribution is not None else Phase.IDLE
        if self.phase is Phase.READY:
            self._schedule_initiate(self._now, self.config.retry_backoff)
        actions.append(GroupAborted(group_id, reason, tuple(blame), formed=True))
        return actions
