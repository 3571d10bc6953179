"""The group driver: runs this node's :class:`~p2pfed.group.GroupProtocol` in trio.

One job: feed the sans-IO group protocol what happens (messages, lost peers, the clock,
silent members) and carry out what it asks (sends, group starts, outcomes). Actions go
through one queue drained in one place: an action whose execution yields more actions (a
send to a peer that cannot be reached makes the protocol drop that peer) appends them to
the queue instead of re-entering the drain, so actions run one at a time, in the order
they were produced.

It also keeps the node's position (exact rounds: round, step, class; random rounds: the
round it works on, for pacing) and announces it to peers (spec/group.md, "Exact rounds"
and "Random rounds").

The driver sends through a function (the channel pool's ``send``), and learns about
peers through a few more; a test drives it with an in-memory send function and a
protocol of its own (tests/test_group_driver.py).

Example (what :class:`p2pfed.node.Node` does)::

    driver = GroupDriver(config, peers, send=pool.send, connected=pool.connected, ...)
    driver.start(GroupProtocol(...))
    nursery.start_soon(driver.loop)
    outcome = await driver.offer(model, weight, round_, initiate=True)
"""

from __future__ import annotations

import logging
import math
import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import trio

from p2pfed.exact_rounds import Position
from p2pfed.group import (
    Action,
    GroupAborted,
    GroupCompleted,
    GroupConfig,
    GroupProtocol,
    GroupStarted,
    Phase,
    Send,
    SitOut,
)
from p2pfed.identity import NodeId
from p2pfed.messages import (
    GroupAbort,
    GroupInvite,
    GroupPosition,
    GroupReply,
    GroupStart,
    Message,
    ReducedShard,
    Shard,
)
from p2pfed.peers import PeerTable

__all__ = ["GROUP_MESSAGES", "POSITION_VERSION", "DriverLinks", "GroupDriver", "position_message"]

log = logging.getLogger("p2pfed.node")  # the node's log: operators filter on one name

GROUP_MESSAGES = (GroupInvite, GroupReply, GroupStart, GroupAbort, Shard, ReducedShard)
POSITION_VERSION = 2  # GroupPosition exists from protocol version 2 on
_id_bytes = operator.attrgetter("raw")

Outcome = GroupCompleted | GroupAborted
OnGroup = Callable[[Outcome, float], None]


def position_message(position: Position) -> GroupPosition:
    return GroupPosition(
        round=position.round, step=position.step, key=position.key, size=position.size
    )


def _no_peers() -> list[NodeId]:
    return []


def _nothing() -> None:
    return None


@dataclass
class DriverLinks:
    """What the driver needs of the node's channels (the channel pool's methods)."""

    send: Callable[[NodeId, Message, tuple[str, int] | None], None]
    """Send a message to a peer (dialling it at the address if there is no channel)."""
    connected: Callable[[], list[NodeId]] = _no_peers
    """Responsive peers with an open channel, sorted by id bytes."""
    version: Callable[[NodeId], int] = lambda peer: POSITION_VERSION
    """The protocol version of the peer's channel."""
    silent_since: Callable[[NodeId], float | None] = lambda peer: None
    """When the peer went (or goes) silent; None without a channel."""
    group_ended: Callable[[], None] = _nothing
    """A group ended: its channels are no longer protected (the pool trims them)."""


class GroupDriver:
    """Drives this node's group protocol (see the module docstring)."""

    def __init__(
        self,
        config: GroupConfig,
        peers: PeerTable,
        links: DriverLinks,
        *,
        current_round: Callable[[], int],
        may_catch_up: bool = True,
        on_group: OnGroup | None = None,
    ) -> None:
        self.config = config
        self.peers = peers
        self.links = links
        self._current_round = current_round
        self._may_catch_up = may_catch_up
        self.on_group = on_group
        """Called with each completed or aborted group and the seconds since the offer,
        when the round waiting for it receives it: before the round uses the outcome, so
        :attr:`p2pfed.node.Node.contribution` is still the contribution that group
        averaged, and the node's model not yet replaced."""
        self.group: GroupProtocol | None = None
        self.stopping = False
        self._pending: deque[Action] = deque()
        self._draining = False
        self._wake = trio.Event()
        self._loop_deadline = 0.0  # when the loop wakes by itself (math.inf: never)
        self._outcomes_send, self._outcomes = trio.open_memory_channel[
            GroupCompleted | GroupAborted | SitOut | None
        ](math.inf)
        self.offered_at = 0.0
        self.started_at: dict[bytes, float] = {}  # group id -> when it started here
        self.groups_completed = 0
        self.groups_aborted = 0
        # exact rounds
        self.position: Position | None = None  # the current step's class
        self.behind = False  # every peer is at a later round (catch up)
        # random rounds (pace)
        self.peer_round: dict[NodeId, int] = {}  # each peer's latest round
        self.pace_round: int | None = None  # the round announced to peers
        self.pace_changed = trio.Event()
        self.pace_gave_up: dict[NodeId, int] = {}  # peer -> the round it made us time out at

    def start(self, group: GroupProtocol) -> None:
        """The protocol to drive (made once the node listens: it announces the port)."""
        self.group = group

    # -- carrying out actions ------------------------------------------------------------

    def act(self, actions: list[Action], *, wake: bool = True) -> None:
        """Carry out the group protocol's actions, in order, after any still queued;
        ``wake`` the loop, whose next deadline may have changed (every caller but the
        loop itself)."""
        self._pending.extend(actions)
        if not self._draining:
            self._draining = True
            try:
                while self._pending:
                    self._carry_out(self._pending.popleft())
            finally:
                self._draining = False
        if wake:
            # only an earlier deadline needs the loop now: at its current one, it polls and
            # looks again anyway (waking it for every group message was most of its cost)
            deadline = self.group.next_deadline() if self.group is not None else None
            if deadline is not None and deadline < self._loop_deadline:
                self._wake.set()

    def _carry_out(self, action: Action) -> None:
        now = trio.current_time()
        if isinstance(action, Send):
            self.links.send(action.peer, action.message, action.address)
        elif isinstance(action, GroupStarted):
            self.started_at = {action.group_id: now}
            log.info(
                "group %s started with %d members",
                action.group_id.hex()[:8],
                len(action.members),
                extra={"event": "group_started", "group": action.group_id.hex()[:8]},
            )
        else:
            for peer in action.blame if isinstance(action, GroupAborted) else ():
                self.peers.exclude(peer, now + self.config.exclusion)
            self._outcomes_send.send_nowait(action)
            # the group's channels were protected from trimming while it ran
            self.links.group_ended()

    def wake(self) -> None:
        """Make the loop poll the protocol now."""
        self._wake.set()

    def wake_round(self) -> None:
        """Wake a round waiting for its group (to stop, or to catch up)."""
        self._outcomes_send.send_nowait(None)

    def stop(self) -> None:
        """The node is stopping: wake the round and the loop."""
        self.stopping = True
        self.wake_round()
        self._wake.set()

    def withdraw(self) -> None:
        assert self.group is not None
        self.act(self.group.withdraw())

    # -- the loop ------------------------------------------------------------------------

    async def loop(self) -> None:
        """Poll the protocol at its deadlines and whenever woken, until cancelled."""
        assert self.group is not None
        while True:
            deadline = self.group.next_deadline()
            self._loop_deadline = min(
                math.inf if deadline is None else deadline, self.give_up_silent_members()
            )
            with trio.move_on_at(self._loop_deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            self.give_up_silent_members()
            # a count that changed while the node was forming a group is announced now
            self.refresh_position()
            eligible = [p for p in self.links.connected() if not self.peers.is_excluded(p, now)]
            # the loop recomputes its deadline itself: no need to wake itself up again
            self.act(self.group.poll(now, eligible), wake=False)

    def give_up_silent_members(self) -> float:
        """Give up on each peer of this node's current group (forming, pending or running)
        from which nothing has arrived for the liveness deadline, as if its channel had
        closed (spec/transport.md, section 6): a member cut off silently would otherwise
        hold the group until the all-reduce timeout. Returns when the next of them would
        go silent."""
        assert self.group is not None
        now = trio.current_time()
        next_silent = math.inf
        for peer in sorted(self.group.busy_with(), key=_id_bytes):
            silent_at = self.links.silent_since(peer)
            if silent_at is None:
                continue  # no channel (its loss was handled when it closed)
            if silent_at <= now:
                self.act(self.group.peer_lost(peer, now, silent=True), wake=False)
            else:
                next_silent = min(next_silent, silent_at)
        return next_silent

    # -- what happens to peers -----------------------------------------------------------

    def busy_with(self) -> set[NodeId]:
        """Peers of the current group (their channels must stay open)."""
        return self.group.busy_with() if self.group is not None else set()

    def greeting(self, version: int) -> list[Message]:
        """What a new channel of protocol ``version`` learns of this node's position."""
        if self.position is not None and version >= POSITION_VERSION:
            return [position_message(self.position)]
        if self.pace_round is not None and version >= POSITION_VERSION:
            return [self.round_message(self.pace_round)]
        return []

    def receive(self, peer: NodeId, message: Message) -> bool:
        """A message from ``peer``: True if it was the driver's (a group message or a
        position), False if not."""
        assert self.group is not None
        if isinstance(message, GROUP_MESSAGES):
            if isinstance(message, GroupInvite):
                self.saw_round(peer, message.round)
            self.act(self.group.receive(peer, message, trio.current_time()))
            return True
        if isinstance(message, GroupPosition):
            self.saw_round(peer, message.round)
            position = Position(message.round, message.step, message.key, message.size)
            self.group.set_peer_position(peer, position)
            self.refresh_position()
            self._wake.set()
            return True
        return False

    def peer_lost(self, peer: NodeId) -> None:
        """The peer's last channel closed (or messages for it cannot be delivered)."""
        if self.group is not None:
            self.act(self.group.peer_lost(peer, trio.current_time()))

    # -- offering a contribution ---------------------------------------------------------

    async def offer(
        self,
        model: np.ndarray,
        weight: int,
        round_: int,
        *,
        initiate: bool,
        position: Position | None = None,
        carried: np.ndarray | None = None,
    ) -> GroupCompleted | SitOut | None:
        """Offer a contribution and wait until a group completes with it (aborted groups
        are retried); None: stopping, or behind (exact rounds: catch up)."""
        assert self.group is not None
        self.position = position
        self.group.set_contribution(
            model,
            weight,
            round_,
            trio.current_time(),
            initiate=initiate,
            position=position,
            carried=carried,
        )
        self.announce_position()
        self._wake.set()
        return await self.outcome()

    async def outcome(self) -> GroupCompleted | SitOut | None:
        """Wait for a completed group (None: stopping); aborted groups are retried."""
        while True:
            outcome = await self._outcomes.receive()
            if outcome is None:
                if self.stopping or self.behind:
                    return None
                continue  # a wake-up for a catch-up that a completed group overtook
            if isinstance(outcome, SitOut):
                return outcome
            if self.on_group is not None:
                self.on_group(outcome, trio.current_time() - self.offered_at)
            if isinstance(outcome, GroupCompleted):
                self.groups_completed += 1
                return outcome
            self.groups_aborted += 1
            log.info(
                "group %s aborted: %s",
                outcome.group_id.hex()[:8],
                outcome.reason,
                extra={"event": "group_aborted", "group": outcome.group_id.hex()[:8]},
            )

    async def finish_running(self) -> None:
        """Let a running all-reduce finish (or abort) before withdrawing: its outcome
        arrives on the outcome channel like any other."""
        assert self.group is not None
        if self.group.phase is Phase.RUNNING:
            with trio.move_on_after(self.config.allreduce_timeout):
                while self.group.phase is Phase.RUNNING:
                    await self._outcomes.receive()

    # -- exact rounds: positions ---------------------------------------------------------

    def class_count(self) -> int:
        """The nodes of this node's exact round as it sees them: itself and each connected
        peer that speaks exact rounds (a channel of protocol version 2), whether or not
        its position has arrived yet (a node behind catches up, see
        :meth:`refresh_position`)."""
        version = self.links.version
        return 1 + sum(1 for peer in self.links.connected() if version(peer) >= POSITION_VERSION)

    def refresh_position(self) -> None:
        """At step 0, keep the announced count of nodes current as peers come and go, and
        notice when this node is behind: a peer is already at a later round (this node
        started late, restarted from an old checkpoint, or was left out of a round), so
        the round it waits for has happened without it; it then adopts a peer's latest
        average instead of holding up the next round."""
        position = self.position
        if self.group is None or position is None or position.step != 0:
            return
        count = self.class_count()
        rounds = [
            q.round
            for peer in self.links.connected()
            if (q := self.group.peer_position(peer)) is not None
        ]
        if (
            self.group.exact_plan(count).sizes
            and self._may_catch_up
            and rounds
            and max(rounds) > position.round
            and self.group.phase is Phase.READY
            and not self.behind
        ):
            self.behind = True
            self.wake_round()  # to catch up
            return
        if count == position.size:
            return
        moved = Position(position.round, 0, (), count)
        if self.group.update_position(moved):
            self.position = moved
            self.announce_position()
            self._wake.set()

    def announce_position(self) -> None:
        """Send this node's position to every connected peer that speaks version 2."""
        position = self.position
        if position is None:
            return
        connected = self.links.connected()
        log.debug(
            "position: round %d step %d key %s of %d nodes (%d peers connected)",
            position.round,
            position.step,
            list(position.key),
            position.size,
            len(connected),
        )
        self._to_current_peers(position_message(position))

    def _to_current_peers(self, message: Message) -> None:
        for peer in self.links.connected():
            if self.links.version(peer) >= POSITION_VERSION:
                self.links.send(peer, message, None)

    # -- random rounds: pace -------------------------------------------------------------

    def saw_round(self, peer: NodeId, round_: int) -> None:
        """Remember the round a peer is at (its GroupPosition, or the round of its invite)."""
        self.peer_round[peer] = round_
        self.pace_changed.set()

    def round_message(self, round_: int) -> GroupPosition:
        """A random-rounds node's position: its round only (no classes or steps)."""
        return GroupPosition(round=round_, step=0, key=(), size=1 + len(self.links.connected()))

    def announce_round(self, round_: int) -> None:
        """Random rounds: tell every connected peer the round this node now works on, so
        that a node ahead of it waits."""
        if self.pace_round == round_:
            return
        self.pace_round = round_
        self._to_current_peers(self.round_message(round_))

    def laggards(self) -> list[NodeId]:
        """Connected peers still at the round before this node's: they finish the round this
        node just finished. (A peer further behind, one that restarted from an old
        checkpoint or joined late, is not waited for: it would hold every round up; nor
        is a peer that already made this node wait out ``pace_timeout`` at that round.)"""
        behind = self._current_round() - 1
        return [
            peer
            for peer in self.links.connected()
            if self.peer_round.get(peer) == behind and self.pace_gave_up.get(peer) != behind
        ]
