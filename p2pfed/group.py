"""The group protocol: forming a group without a coordinator, then a secure all-reduce.

One :class:`GroupProtocol` per node, as a pure state machine (spec/group.md): messages,
local decisions and the current time go in; :class:`Send` actions and group outcomes come
out. It owns no sockets and reads no clock; randomness is injected (``rng`` for choices
and priorities, ``randbytes`` for group ids, nonces and mask keys), so simnet can replay
a run exactly.

Rules of this file:

* A node is in one :class:`Phase` at a time, held as one state object per phase with
  exactly that phase's data (``_Ready``, ``_Initiating``, ...). Every phase change goes
  through ``GroupProtocol._transition``, checked against :data:`GROUP_TRANSITIONS` (the
  table spec/group.md shows, generated from it). :data:`PHASES` lists, for each phase,
  the messages it acts on. Three kinds are answered in every phase (:data:`ANSWERED`): an
  invite (a decline where it cannot be accepted), a GroupStart (refused with GroupAbort
  to its members unless it is the start of the group the node is pending for, so they
  abort at once) and an accepting GroupReply for a group the node is not forming
  (answered with GroupAbort, so the invitee stops waiting). Anything else outside the
  table concerns a group we are not in (messages of an aborted group may still be in
  flight) and is ignored.
* Whom to invite, which invites to decline and when to fall back to random groups is a
  grouping policy (:mod:`p2pfed.grouping`: random, grid or exact rounds), chosen at
  construction; the node carries out the policy's decisions itself.
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
from typing import ClassVar

import numpy as np

from p2pfed.errors import InvalidGroupSumError, LocalProtocolError, SecureAggregationError
from p2pfed.exact_rounds import Position, RoundPlan
from p2pfed.fixedpoint import FixedPointParams, decode_group_sum, make_contribution
from p2pfed.grouping import (
    AwaitInvite,
    ExactGrouping,
    FallBack,
    GridGrouping,
    Grouping,
    Invite,
    LookAgain,
    Offer,
    RandomGrouping,
    SitOutRound,
    WaitUntil,
    class_members,
    exact_plan,
)
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
    "GROUP_EVENT_MEANING",
    "GROUP_TRANSITIONS",
    "MASK_KEY_SIGNATURE_CONTEXT",
    "PHASES",
    "Action",
    "GridPosition",
    "GroupAborted",
    "GroupCompleted",
    "GroupConfig",
    "GroupEvent",
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


class GroupEvent(enum.Enum):
    """What moves a node between phases. Deadlines and replies are named by the decision
    they lead to: the invite deadline, say, ends in :attr:`START` or :attr:`CANCEL`
    depending on who accepted, and the table maps each decision to one next phase."""

    CONTRIBUTE = "contribution offered"
    WITHDRAW = "contribution withdrawn"
    INITIATE = "invites sent"
    ACCEPT = "invite accepted"
    CANCEL = "formation cancelled"
    START = "GroupStart sent"
    START_FAILED = "own GroupStart invalid"
    JOIN = "GroupStart from the initiator"
    REFUSE = "GroupStart refused"
    START_TIMEOUT = "start deadline passed"
    INITIATOR_LOST = "initiator disconnected"
    GROUP_ABORT = "GroupAbort of the group"
    COMPLETE = "all reduced shards held"
    ABORT = "all-reduce aborted"


_P, _E = Phase, GroupEvent

#: ``GROUP_TRANSITIONS[(phase, event)] -> next phase``: every phase change of a
#: :class:`GroupProtocol` goes through this table (spec/group.md section 2, generated from
#: it by :mod:`p2pfed.spec_document`); a pair not listed is a bug, raised as
#: :class:`~p2pfed.errors.LocalProtocolError`. Withdrawing while initiating or running
#: first cancels or aborts the group (to READY), then withdraws.
GROUP_TRANSITIONS: dict[tuple[Phase, GroupEvent], Phase] = {
    (_P.IDLE, _E.CONTRIBUTE): _P.READY,
    (_P.IDLE, _E.WITHDRAW): _P.IDLE,
    (_P.READY, _E.CONTRIBUTE): _P.READY,
    (_P.READY, _E.WITHDRAW): _P.IDLE,
    (_P.READY, _E.INITIATE): _P.INITIATING,
    (_P.READY, _E.ACCEPT): _P.PENDING,
    (_P.INITIATING, _E.CONTRIBUTE): _P.INITIATING,
    (_P.INITIATING, _E.CANCEL): _P.READY,
    (_P.INITIATING, _E.START): _P.RUNNING,
    (_P.INITIATING, _E.START_FAILED): _P.READY,
    (_P.PENDING, _E.CONTRIBUTE): _P.PENDING,
    (_P.PENDING, _E.WITHDRAW): _P.IDLE,
    (_P.PENDING, _E.JOIN): _P.RUNNING,
    (_P.PENDING, _E.REFUSE): _P.READY,
    (_P.PENDING, _E.START_TIMEOUT): _P.READY,
    (_P.PENDING, _E.INITIATOR_LOST): _P.READY,
    (_P.PENDING, _E.GROUP_ABORT): _P.READY,
    (_P.RUNNING, _E.CONTRIBUTE): _P.RUNNING,
    (_P.RUNNING, _E.COMPLETE): _P.IDLE,
    (_P.RUNNING, _E.ABORT): _P.READY,
}

#: What each event means, for the generated table in spec/group.md.
GROUP_EVENT_MEANING: dict[GroupEvent, str] = {
    _E.CONTRIBUTE: "the node offers a contribution (a new one replaces the old)",
    _E.WITHDRAW: "the node stops offering its contribution (GroupAbort to a pending "
    "group's initiator)",
    _E.INITIATE: "the initiation delay passed and the grouping rule chose invitees",
    _E.ACCEPT: 'an invite the node accepts (section 3, "Answering")',
    _E.CANCEL: "too few acceptances, a decline or loss in a full group, preemption by a "
    "higher-priority invite, or withdrawal: GroupAbort to those that accepted",
    _E.START: "at least `group_min - 1` acceptances (all of them for a full group), at "
    "the invite deadline or once every invitee replied",
    _E.START_FAILED: "the initiator's own GroupStart does not verify: GroupAbort to its members",
    _E.JOIN: "GroupStart of the pending group from its initiator, valid",
    _E.REFUSE: "that GroupStart lists an excluded node or is invalid: GroupAbort to its members",
    _E.START_TIMEOUT: "no GroupStart within `invite_timeout + start_timeout`",
    _E.INITIATOR_LOST: "the channel to the pending group's initiator closed",
    _E.GROUP_ABORT: "GroupAbort of the pending group, from any sender",
    _E.COMPLETE: "all `k` reduced shards held and the group sum valid: GroupCompleted",
    _E.ABORT: "deadline, lost member, malformed shard, invalid sum, GroupAbort from a "
    "member, or withdrawal: GroupAbort to the members, GroupAborted",
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


# One object per phase, holding exactly the data valid in that phase; the node's state is
# one of them (GroupProtocol._state), replaced only by GroupProtocol._transition.


@dataclass
class _Idle:
    phase: ClassVar[Phase] = Phase.IDLE


@dataclass
class _Ready:
    contribution: _Contribution
    initiate_at: float | None = None  # None: only an invite (or a new position) moves it
    phase: ClassVar[Phase] = Phase.READY


@dataclass
class _Initiating:
    contribution: _Contribution
    group_id: bytes
    priority: int
    deadline: float
    invited: set[NodeId]
    accepted: dict[NodeId, GroupReply] = field(default_factory=dict)
    required: int = 0  # a grid line or exact run: all of these invitees must accept
    phase: ClassVar[Phase] = Phase.INITIATING


@dataclass
class _Pending:
    contribution: _Contribution
    group_id: bytes
    priority: int
    initiator: NodeId
    deadline: float
    mask_private: bytes
    # shards that other members sent before our GroupStart arrived (channels are
    # independent, so this happens); replayed when the group starts
    early: list[tuple[NodeId, Message]] = field(default_factory=list)
    phase: ClassVar[Phase] = Phase.PENDING


@dataclass
class _Running:
    contribution: _Contribution
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
    phase: ClassVar[Phase] = Phase.RUNNING


_State = _Idle | _Ready | _Initiating | _Pending | _Running


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
        self._state: _State = _Idle()
        self._identity_keys: dict[NodeId, bytes] = {}
        # the grouping rule, chosen once; random grouping is also every rule's fallback
        self._random = RandomGrouping(self.node_id, config)
        self._grouping: Grouping = self._random
        if grid is not None:
            self._grouping = GridGrouping(self.node_id, config, grid, self._peer_grid)
        elif self.exact:
            self._grouping = ExactGrouping(
                self.node_id, config, self._peer_position, sit_out=sit_out
            )
        self._now = 0.0  # the time of the latest input

    # -- state machine -------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The node's current phase (spec/group.md section 2)."""
        return self._state.phase

    def _transition(self, event: GroupEvent, state: _State) -> None:
        """The one place the state changes: ``event`` must lead from the current phase to
        ``state``'s phase in :data:`GROUP_TRANSITIONS`."""
        before = self._state.phase
        after = GROUP_TRANSITIONS.get((before, event))
        if after is not state.phase:
            raise LocalProtocolError(
                f"group protocol in phase {before.value} cannot take {event.value!r} "
                f"to phase {state.phase.value}"
            )
        self._state = state

    @property
    def _contribution(self) -> _Contribution | None:
        state = self._state
        return None if isinstance(state, _Idle) else state.contribution

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
        state = self._state
        if (
            isinstance(state, _Ready)
            and self._position is not None
            and not self._passive
            and (state.initiate_at is None or state.initiate_at > self._now)
        ):
            state.initiate_at = self._now

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
        if not isinstance(self._state, _Ready):
            return False
        self._position = position
        return True

    def exact_plan(self, nodes: int) -> RoundPlan:
        """The plan of an exact round of ``nodes`` nodes (:func:`round_plan`). Without
        sitting out (pure averaging: a model that sits out would drop its weight), a count
        that would need it has no plan: its rounds use random groups."""
        return exact_plan(nodes, self.config, sit_out=self.sit_out)

    def class_of(self, peers: Sequence[NodeId]) -> list[NodeId]:
        """This node and those of ``peers`` in its exact-rounds class, sorted by id: peers
        at the same position, and those that were there and have moved on this round."""
        return class_members(self.node_id, self._position, peers, self._peer_position)

    def grid_mates(self, peers: Sequence[NodeId], round: int) -> list[NodeId]:
        """Those of ``peers`` in this node's grid group of ``round`` (sorted by id)."""
        if not isinstance(self._grouping, GridGrouping):
            return []
        return self._grouping.mates(peers, round)

    def busy_with(self) -> set[NodeId]:
        """The peers of the group this node is forming, pending for or running."""
        state = self._state
        if isinstance(state, _Initiating):
            return state.invited | set(state.accepted)
        if isinstance(state, _Pending):
            return {state.initiator}
        if isinstance(state, _Running):
            return set(state.members)
        return set()

    def _offer(self, contribution: _Contribution) -> Offer:
        return Offer(contribution.round, self._position, self._grid_until)

    def _structured(self, contribution: _Contribution, now: float) -> bool:
        """Whether ``contribution`` is still grouped by the structured rule (grid or exact
        rounds), not fallen back to random grouping."""
        return self._grouping.structured(self._offer(contribution), now)

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
        contribution = _Contribution(vector, int(weight), round, carried)
        self._position = position if self.exact else None
        self._grid_until = self._grouping.structured_until(self._position, now)
        state = self._state
        if isinstance(state, _Idle):
            self._transition(GroupEvent.CONTRIBUTE, _Ready(contribution))
            # a random delay spreads contending initiators; a run of an exact round has
            # one initiator and nothing to contend with
            spread = 0.0 if self._position is not None else self.config.initiate_delay
            self._schedule_initiate(now, spread)
        else:
            # a group in progress goes on; the new contribution is the one a retry offers
            state.contribution = contribution
            self._transition(GroupEvent.CONTRIBUTE, state)

    def withdraw(self) -> list[Action]:
        """Stop offering a contribution (shutdown, or out of privacy budget)."""
        actions = self._abort_current("withdrawn by the node")
        self._position = None
        self._transition(GroupEvent.WITHDRAW, _Idle())
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do (``None``: only a message can help)."""
        state = self._state
        if isinstance(state, _Ready):
            return state.initiate_at
        if isinstance(state, _Idle):
            return None
        return state.deadline

    def poll(self, now: float, connected: Sequence[NodeId]) -> list[Action]:
        """Handle expired deadlines, and initiate a group when it is time.

        ``connected``: peers with an open channel that are not excluded.
        """
        self._now = now
        actions: list[Action] = []
        # each check reads the state afresh: one expiry may lead to the next (a cancelled
        # formation schedules a new initiation, which may already be due)
        state = self._state
        if isinstance(state, _Initiating) and now >= state.deadline:
            actions += self._finish_formation(state, now)
        state = self._state
        if isinstance(state, _Pending) and now >= state.deadline:
            self._transition(GroupEvent.START_TIMEOUT, _Ready(state.contribution))
            self._schedule_initiate(now, self.config.retry_backoff)
        state = self._state
        if isinstance(state, _Running) and now >= state.deadline:
            missing = self._missing(state)
            actions += self._abort_run(
                f"all-reduce timed out waiting for {', '.join(m.short for m in missing)}",
                blame=missing,
                notify=True,
            )
        state = self._state
        if isinstance(state, _Ready) and state.initiate_at is not None and now >= state.initiate_at:
            actions += self._initiate(state, now, connected)
        return actions

    def peer_lost(self, peer: NodeId, now: float, *, silent: bool = False) -> list[Action]:
        """A channel closed: a group that needs ``peer`` cannot finish.

        ``silent``: the channel is open but nothing has arrived from ``peer`` for the
        liveness deadline (spec/transport.md, section 6): the group gives up on it the
        same way, but its exact-rounds position is kept (it is back, position and all,
        as soon as anything arrives from it again)."""
        self._now = now
        if not silent:
            self._peer_position.pop(peer, None)
        state = self._state
        if isinstance(state, _Running) and peer in state.members:
            how = "went silent" if silent else "disconnected"
            return self._abort_run(f"member {peer.short} {how}", blame=[peer], notify=True)
        if isinstance(state, _Initiating):
            state.invited.discard(peer)
            state.accepted.pop(peer, None)
        if isinstance(state, _Pending) and state.initiator == peer:
            self._transition(GroupEvent.INITIATOR_LOST, _Ready(state.contribution))
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
        state = self._state
        if isinstance(state, _Pending):  # a Shard or ReducedShard that overtook the start
            if (
                message.group_id == state.group_id  # type: ignore[attr-defined]
                and len(state.early) < 2 * self.config.group_max
            ):
                state.early.append((peer, message))
            return []
        if isinstance(state, _Running):
            if isinstance(message, Shard):
                return self._on_shard(state, peer, message)
            if isinstance(message, ReducedShard):
                return self._on_reduced(state, peer, message)
        return []

    # -- formation -----------------------------------------------------------------------

    def _look_again(self, now: float) -> None:
        """Try initiating again shortly: what was missing (peers, mates, a class) may come."""
        self._schedule_initiate(now, max(self.config.retry_backoff, 0.1) * 2)

    def _schedule_initiate(self, now: float, spread: float) -> None:
        at = None if self._passive else now + self._rng.uniform(0.0, spread)
        state = self._state
        if isinstance(state, _Ready):
            state.initiate_at = at

    def _initiate(self, ready: _Ready, now: float, connected: Sequence[NodeId]) -> list[Action]:
        """Carry out what the grouping rule decides (random grouping once it fell back)."""
        ready.initiate_at = None
        offer = self._offer(ready.contribution)
        policy = self._grouping if self._grouping.structured(offer, now) else self._random
        peers = [p for p in connected if p != self.node_id]
        decision = policy.initiate(offer, peers, now, self._rng)
        if isinstance(decision, Invite):
            return self._invite(ready, now, decision.peers, full=decision.full)
        if isinstance(decision, LookAgain):
            self._look_again(now)
        elif isinstance(decision, WaitUntil):
            ready.initiate_at = decision.at
        elif isinstance(decision, AwaitInvite):
            self._schedule_initiate(now, decision.spread)
        elif isinstance(decision, SitOutRound):
            # this node sits the round out and adopts its average afterwards
            return [SitOut(decision.round, decision.participants, decision.nodes)]
        elif isinstance(decision, FallBack):
            self._grid_until = now
            return self._initiate(ready, now, connected)
        return []

    def _invite(
        self, ready: _Ready, now: float, chosen: Sequence[NodeId], *, full: bool
    ) -> list[Action]:
        contribution = ready.contribution
        formation = _Initiating(
            contribution=contribution,
            group_id=self._randbytes(GROUP_ID_BYTES),
            priority=self._rng.getrandbits(64),
            deadline=now + self.config.invite_timeout,
            invited=set(chosen),
            required=len(chosen) if full else 0,
        )
        self._transition(GroupEvent.INITIATE, formation)
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
        if contribution is not None:
            offer = self._offer(contribution)
            reason = self._grouping.decline(offer, peer, invite.round, now)
            if reason is not None:
                return self._decline(peer, invite.group_id, reason)
        actions: list[Action] = []
        state = self._state
        if isinstance(state, _Initiating):
            if invite.priority <= state.priority:
                return self._decline(peer, invite.group_id, "busy: initiating a group")
            actions += self._cancel_formation(state, "preempted by a higher-priority group")
        elif isinstance(state, _Pending):
            # never withdraw from a group already accepted: its initiator may have sent
            # the start, and the whole group would abort (spec/group.md, rule 3)
            return self._decline(peer, invite.group_id, "busy: joining another group")
        state = self._state
        if not isinstance(state, _Ready):
            return actions + self._decline(peer, invite.group_id, f"busy: {state.phase.value}")
        mask_private, mask_public = generate_mask_keypair(self._randbytes)
        signature = self.identity.sign(mask_key_signature_input(invite.group_id, mask_public))
        pending = _Pending(
            contribution=state.contribution,
            group_id=invite.group_id,
            priority=invite.priority,
            initiator=peer,
            deadline=now + self.config.invite_timeout + self.config.start_timeout,
            mask_private=mask_private,
        )
        self._transition(GroupEvent.ACCEPT, pending)
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
        formation = self._state
        if not isinstance(formation, _Initiating) or reply.group_id != formation.group_id:
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
            return self._finish_formation(formation, now)  # a full group with a decline fails
        return []

    def _cancel_formation(self, formation: _Initiating, reason: str) -> list[Action]:
        self._transition(GroupEvent.CANCEL, _Ready(formation.contribution))
        # only those whose acceptance arrived: an acceptance still on its way is answered
        # with GroupAbort when it arrives (_on_reply), and a decline needs nothing
        abort = GroupAbort(group_id=formation.group_id, reason=reason)
        return [Send(peer, abort) for peer in sorted(formation.accepted)]

    def _finish_formation(self, formation: _Initiating, now: float) -> list[Action]:
        if formation.required and len(formation.accepted) < formation.required:
            # a grid line or exact run is all or nothing: a partial one loses the exact mean
            cancel = self._cancel_formation(
                formation,
                f"group incomplete ({len(formation.accepted) + 1} of "
                f"{formation.required + 1} members)",
            )
            self._schedule_initiate(now, self.config.retry_backoff)
            return cancel
        if len(formation.accepted) + 1 < self.config.group_min:
            cancel = self._cancel_formation(
                formation,
                f"too few members accepted ({len(formation.accepted) + 1} of at least "
                f"{self.config.group_min})",
            )
            self._schedule_initiate(now, self.config.retry_backoff)
            return cancel
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
            round=formation.contribution.round,
            nonce=self._randbytes(32),
            members=[infos[m] for m in members],
        )
        actions: list[Action] = [Send(peer, start) for peer in members if peer != self.node_id]
        try:
            actions += self._begin_run(
                GroupEvent.START, formation.contribution, start, mask_private, now
            )
        except SecureAggregationError as exc:
            actions += self._abort_run(f"cannot start: {exc}", blame=[], notify=True, start=start)
        return actions

    # -- all-reduce ----------------------------------------------------------------------

    def _on_start(self, peer: NodeId, start: GroupStart, now: float) -> list[Action]:
        pending = self._state
        if not isinstance(pending, _Pending) or pending.group_id != start.group_id:
            # we are not (or no longer: our wait timed out) pending for this group: tell
            # its members so they abort now instead of at their all-reduce deadline
            return self._refuse_start(start, "not a pending member of this group")
        if peer != pending.initiator:
            return []
        listed = (NodeId.from_public_key(m.identity_key) for m in start.members)
        excluded = sorted(m for m in listed if m != self.node_id and self._excluded(m, now))
        if excluded:
            # exclusion holds for groups a node joins, not only those it initiates
            self._transition(GroupEvent.REFUSE, _Ready(pending.contribution))
            self._schedule_initiate(now, self.config.retry_backoff)
            names = ", ".join(m.short for m in excluded)
            return self._refuse_start(start, f"the group lists excluded nodes: {names}")
        try:
            actions = self._begin_run(
                GroupEvent.JOIN, pending.contribution, start, pending.mask_private, now
            )
        except SecureAggregationError as exc:
            self._transition(GroupEvent.REFUSE, _Ready(pending.contribution))
            self._schedule_initiate(now, self.config.retry_backoff)
            return self._refuse_start(start, f"invalid group start: {exc}")
        for sender, early in pending.early:
            if not isinstance(self._state, _Running):
                break
            actions += self.receive(sender, early, now)
        return actions

    def _refuse_start(self, start: GroupStart, reason: str) -> list[Action]:
        # a reason naming many listed members can exceed the 256-byte limit
        text = reason.encode("utf-8")[:256].decode("utf-8", "ignore")
        abort = GroupAbort(group_id=start.group_id, reason=text)
        members = [NodeId.from_public_key(m.identity_key) for m in start.members]
        return [Send(m, abort) for m in members if m != self.node_id]

    def _begin_run(
        self,
        event: GroupEvent,
        contribution: _Contribution,
        start: GroupStart,
        mask_private: bytes,
        now: float,
    ) -> list[Action]:
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
        run = _Running(
            contribution=contribution,
            group_id=start.group_id,
            round=start.round,
            members=tuple(ids),
            index=index,
            bounds=bounds,
            deadline=now + self.config.allreduce_timeout,
            masked=masked,
            structured=self._structured(contribution, now),
        )
        self._transition(event, run)
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
        return actions + self._progress(run)

    def _sender_index(self, run: _Running, peer: NodeId) -> int | None:
        try:
            return run.members.index(peer)
        except ValueError:
            return None

    def _words(self, data: bytes | memoryview, expected: int) -> np.ndarray | None:
        dtype = self.params.dtype.newbyteorder("<")
        if len(data) != expected * dtype.itemsize:
            return None
        return np.frombuffer(data, dtype=dtype)

    def _on_shard(self, run: _Running, peer: NodeId, shard: Shard) -> list[Action]:
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
        return self._progress(run)

    def _on_reduced(self, run: _Running, peer: NodeId, reduced: ReducedShard) -> list[Action]:
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
        return self._progress(run)

    def _progress(self, run: _Running) -> list[Action]:
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
            try:
                if not full.any():
                    # every member contributed weight 0: there is no mean to adopt
                    mean, total_weight = run.contribution.vector, 0
                else:
                    mean, total_weight = decode_group_sum(full, self.params)
            except InvalidGroupSumError as exc:
                return actions + self._abort_run(str(exc), blame=[], notify=True)
            self._position = None
            self._transition(GroupEvent.COMPLETE, _Idle())
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

    def _missing(self, run: _Running) -> list[NodeId]:
        if run.index not in run.reduced:
            return [m for j, m in enumerate(run.members) if j not in run.shards]
        return [m for j, m in enumerate(run.members) if j not in run.reduced]

    def _on_abort(self, peer: NodeId, abort: GroupAbort, now: float) -> list[Action]:
        state = self._state
        if isinstance(state, _Initiating) and abort.group_id == state.group_id:
            # an invitee withdrew before the start
            state.accepted.pop(peer, None)
            state.invited.discard(peer)
            if not state.invited or state.required:
                return self._finish_formation(state, now)
            return []
        if isinstance(state, _Pending) and abort.group_id == state.group_id:
            # from the initiator (cancelled) or from a member that refused the start: the
            # group cannot complete either way, so stop waiting for it
            self._transition(GroupEvent.GROUP_ABORT, _Ready(state.contribution))
            self._schedule_initiate(now, self.config.retry_backoff)
            return []
        if (
            isinstance(state, _Running)
            and abort.group_id == state.group_id
            and peer in state.members
        ):
            # pass it on: the sender may not have told everyone (a withdrawn invitee only
            # knows the initiator); each member does this at most once per group
            reason = f"aborted by {peer.short}: {abort.reason}"
            return self._abort_run(reason, blame=[], notify=True)
        return []

    def _abort_current(self, reason: str) -> list[Action]:
        state = self._state
        if isinstance(state, _Initiating):
            return self._cancel_formation(state, reason)
        if isinstance(state, _Pending):
            # withdraw() takes the node from PENDING to IDLE itself
            return [Send(state.initiator, GroupAbort(group_id=state.group_id, reason=reason))]
        if isinstance(state, _Running):
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
        """Drop the running group (nothing applied) and tell the other members; with
        ``start``, the group the node initiated could not even start."""
        state = self._state
        if isinstance(state, _Running):
            event, group_id, members = GroupEvent.ABORT, state.group_id, state.members
        elif isinstance(state, _Initiating) and start is not None:
            event, group_id = GroupEvent.START_FAILED, start.group_id
            members = tuple(NodeId.from_public_key(m.identity_key) for m in start.members)
        else:
            raise LocalProtocolError(f"no group to abort in phase {state.phase.value}")
        actions: list[Action] = []
        if notify:
            # the limit is 256 bytes of UTF-8, and the reason may echo a peer's text
            # (fuzz/README.md: 256 characters can be over 256 bytes)
            text = reason.encode("utf-8")[:256].decode("utf-8", "ignore")
            abort = GroupAbort(group_id=group_id, reason=text)
            actions += [Send(m, abort) for m in members if m != self.node_id]
        self._transition(event, _Ready(state.contribution))
        self._schedule_initiate(self._now, self.config.retry_backoff)
        actions.append(GroupAborted(group_id, reason, tuple(blame), formed=True))
        return actions
