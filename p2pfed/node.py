"""The p2pfed node: channels to peers, discovery, the group protocol, training, state.

A :class:`Node` composes the sans-IO cores (:mod:`p2pfed.channel`, :mod:`p2pfed.group`,
:mod:`p2pfed.peers`) with a :class:`~p2pfed.network.Network`, trio's clock and the
injected randomness. It never opens sockets or reads the wall clock itself, so simnet
runs this very class on a virtual network under ``trio.testing.MockClock``.

One round, as seen by one node:

1. start from the current model (the last group average, or the initial model);
2. train locally (in a worker thread, so channels stay responsive);
3. with DP on: clip and noise the update, and record the release in the privacy ledger
   *before* anything leaves the node; out of budget, contribute the start model unchanged;
4. offer the contribution to the group protocol and wait until a group completes
   (aborted groups are retried with the same contribution, at no extra privacy cost);
5. adopt the group average and its push-sum weight, checkpoint atomically, evaluate.

Example (what ``p2pfed node`` does)::

    node = Node.from_directory(Path("~/.p2pfed").expanduser(), network=TcpNetwork())
    await node.run()
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import trio

from p2pfed import dp
from p2pfed.channel import Role, StaticKey
from p2pfed.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from p2pfed.config import NodeConfig, load_config, parse_host_port
from p2pfed.errors import (
    ChannelClosed,
    CloseCode,
    ConfigError,
    RemoteProtocolError,
)
from p2pfed.federation import Federation, load_federation
from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import (
    Action,
    GridPosition,
    GroupAborted,
    GroupCompleted,
    GroupConfig,
    GroupProtocol,
    GroupStarted,
    Phase,
    Send,
)
from p2pfed.identity import IDENTITY_FILE_NAME, NodeId, NodeIdentity, load_identity
from p2pfed.ledger import PrivacyLedger, ledger_path
from p2pfed.messages import (
    GroupAbort,
    GroupInvite,
    GroupReply,
    GroupStart,
    Message,
    ModelRequest,
    ModelState,
    NodeAnnounce,
    PeerExchangeRequest,
    PeerList,
    ReducedShard,
    Shard,
)
from p2pfed.model_vector import model_fingerprint, model_to_vector, vector_to_model
from p2pfed.network import Network, PeerDeparted, PeerDiscovered
from p2pfed.peers import (
    EXPLORE_INTERVAL,
    PeerExchangeSession,
    PeerSource,
    PeerTable,
    build_peer_list,
    handle_peer_list,
)
from p2pfed.task import NodeData, Task, load_task
from p2pfed.trio_channel import (
    ChannelConfig,
    SecureChannel,
    open_secure_channel,
    serve_secure_channels,
)

__all__ = ["CHECKPOINT_FILE_NAME", "Node", "NodeOptions", "RoundReport", "federation_seed"]

log = logging.getLogger("p2pfed.node")

_T = TypeVar("_T")
CHECKPOINT_FILE_NAME = "checkpoint.bin"
PEER_MAX_AGE = 600.0  # forget an unconnected peer not seen (announced, listed) for this long
_id_bytes = operator.attrgetter("raw")
_GROUP_MESSAGES = (GroupInvite, GroupReply, GroupStart, GroupAbort, Shard, ReducedShard)


@dataclass
class NodeOptions:
    """How a node runs, beyond its config file (set by the CLI, the demo, simnet)."""

    training: bool = True
    """Train on local data each round; off: pure secure averaging of the current model."""
    max_rounds: int | None = None
    """Stop after this many completed rounds (None: run until stopped)."""
    linger: bool = False
    """After ``max_rounds``, keep averaging (without training) until stopped, so that
    peers still short of their rounds find groups."""
    linger_passive: bool = False
    """While lingering, only answer invites and never initiate a group: peers short of
    rounds still find groups, but finished nodes stop averaging among themselves (much
    less traffic; their models then move only when a peer short of rounds invites them)."""
    task_config: dict[str, Any] = field(default_factory=dict)
    """The task's settings (config.toml's [task] table plus runner keys)."""
    target_peers: int = 16
    """Channels to keep open; more are accepted but not dialled."""
    group: GroupConfig | None = None
    """Group protocol sizes and timeouts (default: from the federation parameters)."""
    evaluate_every: int = 1
    """Evaluate the model on local test data every this many rounds (0: never)."""
    sync_timeout: float = 3.0
    """How long a fresh node waits for peers' latest aggregated model before round 1."""
    threads: bool = True
    """Run training, evaluation and file writes in worker threads, so channels stay
    responsive meanwhile. simnet turns this off: under a virtual clock, work outside the
    event loop would let time jump while it runs."""
    masking: bool = True
    """Benchmarks only: ``False`` sends contributions encoded but not masked (the wire
    format is unchanged, the privacy is gone); see :class:`~p2pfed.group.GroupProtocol`."""
    grid: GridPosition | None = None
    """This node's place on a Moshpit grid (grid grouping, spec/group.md); announced to
    every peer. ``None``: random grouping."""


@dataclass(frozen=True)
class RoundReport:
    """What one completed round produced (logged, and passed to ``on_round``)."""

    round: int
    group_size: int
    seconds: float
    """The whole round: training, DP, then finding a group and the all-reduce."""
    train_seconds: float
    formation_seconds: float
    """From offering the contribution to the start of the group that completed."""
    allreduce_seconds: float
    """From that group's start to the result (masking, shards, decoding)."""
    metrics: dict[str, float]
    epsilon_spent: float | None


@dataclass
class _Link:
    channel: SecureChannel
    outbox: trio.MemorySendChannel[Message]
    # how the writer closes the channel once the outbox is closed and drained
    close_code: CloseCode = CloseCode.SHUTTING_DOWN
    close_reason: str = "node stopping"


class Node:
    """One federated-learning node (see the module docstring)."""

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        federation: Federation,
        config: NodeConfig,
        node_dir: Path,
        network: Network,
        task: Task | None,
        options: NodeOptions | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
        rng: random.Random | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        on_group: Callable[[GroupCompleted | GroupAborted, float], None] | None = None,
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.federation = federation
        self.config = config
        self.node_dir = Path(node_dir)
        self.network = network
        self.task = task
        self.options = options or NodeOptions()
        self._randbytes = randbytes
        self._rng = rng or random.Random(int.from_bytes(randbytes(16), "big"))
        self._on_round = on_round
        self._on_group = on_group
        self._offered_at = 0.0
        self._group_started_at: dict[bytes, float] = {}  # group id -> when it started here
        params = federation.params
        self.group_config = self.options.group or GroupConfig(
            group_min=params.group_min, group_max=params.group_max
        )
        self.fixed_point = FixedPointParams.for_federation(
            params.fixed_point_bits, params.clip, self.group_config.group_max
        )
        self.channel_config = ChannelConfig(
            max_message_size=config.effective_max_message_size(params),
            handshake_timeout=config.handshake_timeout,
            keepalive_interval=config.keepalive_interval,
            idle_timeout=config.idle_timeout,
            send_timeout=config.send_timeout,
        )
        self.peers = PeerTable(self.node_id)
        # one Noise static key for all this node's channels (spec/transport.md allows it)
        self._static_key = StaticKey.generate(identity, self._randbytes)
        self._links: dict[NodeId, list[_Link]] = {}
        self._last_active: dict[NodeId, float] = {}  # a message sent or received (not keepalive)
        self._closing: set[NodeId] = set()  # channels being closed by _trim_channels
        self.channels_trimmed = 0  # channels closed for the connection limit
        self._pex: dict[NodeId, PeerExchangeSession] = {}
        self._dialling: set[tuple[str, int]] = set()
        self._host_of: dict[NodeId, str] = {}  # remote address of each peer's channel
        self._links_changed = trio.Event()
        self._queued: dict[NodeId, list[Message]] = {}
        self._wake = trio.Event()
        self._loop_deadline = 0.0  # when the group loop wakes by itself (math.inf: never)
        self._outcomes_send, self._outcomes = trio.open_memory_channel[
            GroupCompleted | GroupAborted | None
        ](math.inf)
        self._connector_wake = trio.Event()
        self._stop = trio.Event()
        self.finished = trio.Event()  # set when run() has shut the node down
        self._nursery: trio.Nursery | None = None
        self.listen_port = 0
        # model state
        self.round = 0
        self.model: np.ndarray | None = None
        self.weight = 1.0
        self._aggregated: tuple[int, np.ndarray] | None = None
        self._sync: trio.MemorySendChannel[ModelState] | None = None
        self.group: GroupProtocol | None = None
        self.ledger: PrivacyLedger | None = None
        self.last_metrics: dict[str, float] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.groups_completed = 0
        self.groups_aborted = 0
        self._announced_finish = False

    # -- construction from a node directory ----------------------------------------------

    @classmethod
    def from_directory(
        cls,
        node_dir: Path,
        *,
        network: Network,
        options: NodeOptions | None = None,
        task_spec: str | None = None,
        **kwargs: Any,
    ) -> Node:
        """Load identity, config, federation and task from ``node_dir`` (``p2pfed init``)."""
        node_dir = Path(node_dir)
        config = load_config(node_dir)
        identity = load_identity(node_dir / IDENTITY_FILE_NAME)
        federation = load_federation(config.federation_path(node_dir))
        spec = task_spec or config.task
        if not spec:
            raise ConfigError(
                f"no task configured in {node_dir / 'config.toml'}: set task = "
                '"package.module:object" (or pass --task), e.g. p2pfed.tasks.digits:task'
            )
        task = load_task(spec)  # also needed without training: it defines the model
        return cls(
            identity=identity,
            federation=federation,
            config=config,
            node_dir=node_dir,
            network=network,
            task=task,
            options=options,
            **kwargs,
        )

    # -- running -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the node to stop after the current group finishes or aborts."""
        if not self._stop.is_set():
            self._stop.set()
            self._outcomes_send.send_nowait(None)  # wakes a round waiting for its group
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (or ``max_rounds``); reports the listen port when listening."""
        torch_model, data = await self._offload(self._prepare_task)
        listener = await self.network.listen(self.config.listen_host, self.config.listen_port)
        self.listen_port = self.network.listen_port(listener)
        self.group = GroupProtocol(
            self.identity,
            self.group_config,
            self.fixed_point,
            fingerprint=self.fingerprint,
            model_size=len(self.model) if self.model is not None else 0,
            listen_port=self.listen_port,
            address_of=self._address_of,
            rng=random.Random(self._rng.getrandbits(64)),
            randbytes=self._randbytes,
            masking=self.options.masking,
            grid=self.options.grid,
        )
        log.info(
            "node %s listening on port %d (federation %s, round %d)",
            self.node_id.short,
            self.listen_port,
            self.federation.name,
            self.round,
        )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._serve, listener)
            nursery.start_soon(self._group_loop)
            nursery.start_soon(self._connector_loop)
            nursery.start_soon(self._discovery_loop)
            task_status.started(self.listen_port)
            try:
                await self._rounds(torch_model, data)
                if data is not None and self.options.evaluate_every:
                    # the model may have moved since the last evaluation (lingering)
                    self.last_metrics = await self._offload(self._evaluate, torch_model, data)
            finally:
                await self._shutdown()
                self.finished.set()
                nursery.cancel_scope.cancel()

    async def _offload(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run blocking work (training, evaluation, fsync) off the event loop if allowed."""
        if self.options.threads:
            return await trio.to_thread.run_sync(function, *args)
        return function(*args)

    def _prepare_task(self) -> tuple[torch.nn.Module, NodeData | None]:
        assert self.task is not None
        torch.set_num_threads(1)
        config = dict(self.options.task_config)
        # every node builds the same initial model: seed it from the federation
        config.setdefault("seed", federation_seed(self.federation))
        self.options.task_config = config
        torch_model = self.task.build_model(config)
        self.fingerprint = model_fingerprint(torch_model, self.task.name)
        self.model = model_to_vector(torch_model)
        data = self.task.load_data(config)
        self.weight = 1.0
        if not self.federation.params.dp_enabled:
            # sample-weighted averaging; with DP the weight must not depend on the data
            self.weight = float(data.num_train)
        checkpoint = load_checkpoint(
            self.node_dir / CHECKPOINT_FILE_NAME, expected_fingerprint=self.fingerprint
        )
        if checkpoint is not None:
            self.round = checkpoint.round
            self.model = checkpoint.model.copy()
            self.weight = checkpoint.weight
            self._aggregated = (self.round, self.model.copy()) if self.round else None
            log.info("resumed from checkpoint at round %d", self.round)
        self._open_ledger(resumed=checkpoint is not None)
        return torch_model, data

    def _open_ledger(self, *, resumed: bool) -> None:
        params = self.federation.params
        if not params.dp_enabled:
            return
        path = ledger_path(self.node_dir)
        if path.exists() or resumed:
            # a node that has run before must have its ledger: never silently reset it
            self.ledger = PrivacyLedger.open(path)
            return
        self.ledger = PrivacyLedger.create(
            path, epsilon_budget=params.dp_epsilon_budget, delta=params.dp_delta
        )

    # -- rounds --------------------------------------------------------------------------

    async def _rounds(self, torch_model: torch.nn.Module, data: NodeData | None) -> None:
        assert self.group is not None and self.model is not None
        if self.round == 0 and self.options.grid is None:
            # a grid node starts from its own model: adopting a peer's aggregate would
            # count it twice in the grid's exact mean and put this node out of step
            await self._sync_model()
        generator = torch.Generator().manual_seed(self._rng.getrandbits(63))
        noise_rng = dp.noise_generator(self._randbytes)
        while not self._stop.is_set():
            finished = self.options.max_rounds is not None and self.round >= self.options.max_rounds
            if finished and not self.options.linger:
                break
            if finished and not self._announced_finish:
                self._announced_finish = True
                log.info("finished %d rounds; averaging without training until stopped", self.round)
            started = trio.current_time()
            start = self.model
            if finished:
                released, train_seconds = start, 0.0
            else:
                released, train_seconds = await self._contribution(
                    torch_model, data, start, generator, noise_rng
                )
            self._offered_at = trio.current_time()
            self.group.set_contribution(
                released,
                max(1, round(self.weight)),
                self.round,
                self._offered_at,
                # lingering only helps peers short of rounds: they invite, we answer
                # (a grid line needs its initiator, whatever its round)
                initiate=not (
                    finished and self.options.linger_passive and self.options.grid is None
                ),
            )
            self._wake.set()
            outcome = await self._await_group()
            if outcome is None:
                break
            completed_at = trio.current_time()
            group_started = self._group_started_at.get(outcome.group_id, completed_at)
            self.model = outcome.mean
            self.weight = outcome.weight
            # one completed group = one round of this node: taking the group's highest
            # round instead would skip local training steps (rounds racing ahead)
            self.round += 1
            self._aggregated = (self.round, self.model)
            await self._offload(self._checkpoint)
            metrics = {}
            every = self.options.evaluate_every
            if data is not None and every and self.round % every == 0:
                metrics = await self._offload(self._evaluate, torch_model, data)
                self.last_metrics = metrics
            report = RoundReport(
                round=self.round,
                group_size=len(outcome.members),
                seconds=trio.current_time() - started,
                train_seconds=train_seconds,
                formation_seconds=group_started - self._offered_at,
                allreduce_seconds=completed_at - group_started,
                metrics=metrics,
                epsilon_spent=self.ledger.spent() if self.ledger else None,
            )
            log.info(
                "round %d done: group of %d, %.2fs (training %.2fs)%s",
                report.round,
                report.group_size,
                report.seconds,
                report.train_seconds,
                "".join(f", {k} {v:.4f}" for k, v in sorted(metrics.items())),
                extra={
                    "event": "round",
                    "round": report.round,
                    "group_size": report.group_size,
                    "seconds": round(report.seconds, 4),
                    "train_seconds": round(report.train_seconds, 4),
                    "formation_seconds": round(report.formation_seconds, 4),
                    "allreduce_seconds": round(report.allreduce_seconds, 4),
                    **{k: round(v, 6) for k, v in metrics.items()},
                },
            )
            if self._on_round is not None:
                self._on_round(report)

    async def _contribution(
        self,
        torch_model: torch.nn.Module,
        data: NodeData | None,
        start: np.ndarray,
        generator: torch.Generator,
        noise_rng: np.random.Generator,
    ) -> tuple[np.ndarray, float]:
        """The model this node releases this round, and the seconds spent training."""
        params = self.federation.params
        if data is None or self.task is None or not self.options.training:
            return start, 0.0
        sigma = params.dp_noise_multiplier
        z = dp.effective_noise_multiplier(sigma) if params.dp_enabled else 0.0
        if self.ledger is not None and self.ledger.would_exceed(z):
            # out of privacy budget: keep averaging, but never train on the data again
            log.warning("privacy budget exhausted: contributing the model without training")
            return start, 0.0
        began = trio.current_time()
        trained = await self._offload(self._train, torch_model, data, start, generator)
        train_seconds = trio.current_time() - began
        if not params.dp_enabled:
            return trained, train_seconds
        update = trained - start
        noisy = dp.clip_and_noise(update, params.dp_clip_norm, sigma, noise_rng)
        ledger = self.ledger
        assert ledger is not None
        # durably record the release before the noisy model can leave this node
        await self._offload(lambda: ledger.record_release(round=self.round, noise_multiplier=z))
        return (start + noisy).astype(np.float32), train_seconds

    def _train(
        self,
        torch_model: torch.nn.Module,
        data: NodeData,
        start: np.ndarray,
        generator: torch.Generator,
    ) -> np.ndarray:
        assert self.task is not None
        vector_to_model(torch_model, start)
        self.task.train(torch_model, data, self.options.task_config, generator)
        return model_to_vector(torch_model)

    def _evaluate(self, torch_model: torch.nn.Module, data: NodeData) -> dict[str, float]:
        assert self.task is not None and self.model is not None
        vector_to_model(torch_model, self.model)
        return {
            k: float(v)
            for k, v in self.task.evaluate(torch_model, data, self.options.task_config).items()
        }

    def traffic(self) -> tuple[int, int]:
        """Bytes sent and received on all channels so far, open and closed."""
        sent, received = self.bytes_sent, self.bytes_received
        for links in self._links.values():
            for link in links:
                sent += link.channel.bytes_sent
                received += link.channel.bytes_received
        return sent, received

    def connected_peers(self) -> list[NodeId]:
        """Peers with an open channel (not being closed), sorted by node id."""
        return self._connected()

    def peer_summary(self) -> list[dict[str, Any]]:
        """Known peers for the status report: short id, address, connected."""
        connected = set(self._connected())
        rows = []
        for record in self.peers.records():
            address = record.address
            rows.append(
                {
                    "id": record.node_id.short,
                    "address": f"{address[0]}:{address[1]}" if address else None,
                    "connected": record.node_id in connected,
                }
            )
        return rows

    def final_report(self) -> dict[str, Any]:
        """The node's state at the end, as JSON-ready data (printed by ``p2pfed node``)."""
        return {
            "node_id": str(self.node_id),
            "round": self.round,
            "metrics": self.last_metrics,
            "epsilon_spent": self.ledger.spent() if self.ledger else None,
            "groups_completed": self.groups_completed,
            "groups_aborted": self.groups_aborted,
            "bytes_sent": self.traffic()[0],
            "bytes_received": self.traffic()[1],
        }

    def _checkpoint(self) -> None:
        assert self.model is not None
        save_checkpoint(
            self.node_dir / CHECKPOINT_FILE_NAME,
            Checkpoint(
                round=self.round,
                model=self.model,
                weight=self.weight,
                fingerprint=self.fingerprint,
                trained=self.options.training,
                extra={},
            ),
        )

    async def _await_group(self) -> GroupCompleted | None:
        """Wait for a completed group (None: stopping); aborted groups are retried."""
        while True:
            outcome = await self._outcomes.receive()
            if outcome is None:
                return None
            if self._on_group is not None:
                self._on_group(outcome, trio.current_time() - self._offered_at)
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

    async def _sync_model(self) -> None:
        """A fresh node adopts the latest aggregated model of its peers, if any has one.

        Only aggregated models are ever served (never a peer's freshly trained one), so
        joining late reveals nothing about any single node's data.
        """
        assert self.model is not None
        send, receive = trio.open_memory_channel[ModelState](math.inf)
        self._sync = send
        asked: set[NodeId] = set()
        answers = 0
        best: ModelState | None = None
        with trio.move_on_after(self.options.sync_timeout):
            while not asked or answers < len(asked):
                for peer in self._connected():
                    if peer not in asked:
                        asked.add(peer)
                        self._send(peer, ModelRequest())
                with trio.move_on_after(0.25):
                    state = await receive.receive()
                    answers += 1
                    if state.round > 0 and (best is None or state.round > best.round):
                        best = state
        self._sync = None
        if best is not None:
            self.model = np.frombuffer(best.parameters, dtype="<f4").astype(np.float32)
            self.round = best.round
            log.info("adopted the aggregated model of round %d from a peer", best.round)

    # -- the group protocol driver -------------------------------------------------------

    async def _group_loop(self) -> None:
        assert self.group is not None
        while True:
            deadline = self.group.next_deadline()
            self._loop_deadline = math.inf if deadline is None else deadline
            with trio.move_on_at(self._loop_deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            eligible = [p for p in self._connected() if not self.peers.is_excluded(p, now)]
            # the loop recomputes its deadline itself: no need to wake itself up again
            self._act(self.group.poll(now, eligible), wake=False)

    def _act(self, actions: list[Action], *, wake: bool = True) -> None:
        """Carry out the group protocol's actions; ``wake`` the group loop, whose next
        deadline may have changed (every caller but the loop itself)."""
        now = trio.current_time()
        for action in actions:
            if isinstance(action, Send):
                self._send(action.peer, action.message, action.address)
            elif isinstance(action, GroupStarted):
                self._group_started_at = {action.group_id: now}
                log.info(
                    "group %s started with %d members",
                    action.group_id.hex()[:8],
                    len(action.members),
                    extra={"event": "group_started", "group": action.group_id.hex()[:8]},
                )
            else:
                for peer in action.blame if isinstance(action, GroupAborted) else ():
                    self.peers.exclude(peer, now + self.group_config.exclusion)
                self._outcomes_send.send_nowait(action)
                # the group's channels were protected from trimming while it ran
                self._trim_channels(keep=None)
        if wake:
            # only an earlier deadline needs the loop now: at its current one, it polls and
            # looks again anyway (waking it for every group message was most of its cost)
            deadline = self.group.next_deadline() if self.group is not None else None
            if deadline is not None and deadline < self._loop_deadline:
                self._wake.set()

    # -- channels ------------------------------------------------------------------------

    def _connected(self) -> list[NodeId]:
        # sorted by the id bytes directly: NodeId's generated __lt__ is slow, and this
        # runs on every wake of the group loop
        closing = self._closing
        return sorted(
            (peer for peer, links in self._links.items() if links and peer not in closing),
            key=_id_bytes,
        )

    def _trim_channels(self, keep: NodeId | None) -> None:
        """Close the longest-idle channels beyond ``max_connections`` (spec/discovery.md,
        "Connection limit"): never ``keep`` (a channel just opened), a peer of the
        current group, or one with messages queued; what is left over is trimmed when the
        group ends. Groups open channels between all their members, so without this a
        node's channel count only grows; and a node that made newcomers wait for a free
        slot instead stalled every group that needed it.
        """
        excess = len(self._links) - len(self._closing) - self.config.max_connections
        if excess <= 0:
            return
        busy = self.group.busy_with() if self.group is not None else set()
        idle = sorted(
            (
                p
                for p in self._links
                if p != keep and p not in busy and p not in self._queued and p not in self._closing
            ),
            key=lambda p: (self._last_active.get(p, 0.0), p.raw),
        )
        for peer in idle[:excess]:
            log.debug("closing idle channel to %s: connection limit", peer.short)
            self._closing.add(peer)
            self.channels_trimmed += 1
            for link in self._links.get(peer, []):
                link.close_code = CloseCode.NORMAL
                link.close_reason = "connection limit: closing the longest-idle channel"
                link.outbox.close()

    def _address_of(self, peer: NodeId) -> tuple[str, int] | None:
        record = self.peers.get(peer)
        return record.address if record is not None else None

    def _send(self, peer: NodeId, message: Message, address: tuple[str, int] | None = None) -> None:
        links = self._links.get(peer)
        if links:
            self._last_active[peer] = trio.current_time()
            try:
                links[0].outbox.send_nowait(message)
                return
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        if self._stop.is_set():
            return  # stopping: no new connections
        # no channel yet: queue and dial (group members may not have met before)
        self._queued.setdefault(peer, []).append(message)
        target = address or self._address_of(peer)
        if target is None or not target[0] or not target[1]:
            self._queued.pop(peer, None)
            if self.group is not None:
                self._act(self.group.peer_lost(peer, trio.current_time()))
            return
        self._dial(target, expect=peer)

    def _dial(self, address: tuple[str, int], expect: NodeId | None = None) -> None:
        if address in self._dialling or self._nursery is None:
            return
        self._dialling.add(address)
        self._nursery.start_soon(self._connect, address, expect)

    async def _connect(self, address: tuple[str, int], expect: NodeId | None) -> None:
        host, port = address
        try:
            try:
                stream = await self.network.connect(host, port)
            except OSError as exc:
                log.debug("cannot reach %s:%d: %s", host, port, exc)
                self._dial_failed(expect)
                return
            try:
                async with open_secure_channel(
                    stream,
                    Role.INITIATOR,
                    self.identity,
                    self.federation,
                    self.channel_config,
                    randbytes=self._randbytes,
                    static_key=self._static_key,
                ) as channel:
                    if expect is not None and channel.peer_id != expect:
                        log.warning(
                            "%s:%d is %s, not %s", host, port, channel.peer_id.short, expect.short
                        )
                    source: PeerSource = "bootstrap" if expect is None else "pex"
                    self.peers.observe(channel.peer_id, host, port, source, trio.current_time())
                    self._dialling.discard(address)
                    await self._serve_channel(channel)
            except RemoteProtocolError as exc:
                log.warning("handshake with %s:%d failed: %s", host, port, exc)
                self._dial_failed(expect)
            except ChannelClosed:
                pass
        finally:
            self._dialling.discard(address)

    def _dial_failed(self, expect: NodeId | None) -> None:
        if expect is None:
            return
        now = trio.current_time()
        self.peers.record_failure(expect, now)
        if self._queued.pop(expect, None) and self.group is not None:
            self._act(self.group.peer_lost(expect, now))

    async def _serve(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def inbound(channel: SecureChannel) -> None:
            await self._serve_channel(channel)

        await serve_secure_channels(
            inbound,
            [listener],  # type: ignore[list-item]
            self.identity,
            self.federation,
            self.channel_config,
            # a hard cap on inbound channels and handshakes in progress: _trim_channels
            # keeps the node at max_connections by closing idle channels, so an inbound
            # peer need not wait (in the backlog, past its handshake timeout) for a slot
            max_connections=2 * self.config.max_connections,
            randbytes=self._randbytes,
            static_key=self._static_key,
            task_status=task_status,  # type: ignore[arg-type]
        )

    async def _serve_channel(self, channel: SecureChannel) -> None:
        """Run one channel: its writer task, its reader loop, and the bookkeeping."""
        peer = channel.peer_id
        assert self.group is not None
        send, outbox = trio.open_memory_channel[Message](math.inf)
        link = _Link(channel, send)
        now = trio.current_time()
        if not self._links.get(peer):
            self.peers.pardon(peer)  # back after a failure: it may join groups again
        host = self.network.peer_host(channel.stream)
        if host:
            self._host_of[peer] = host
        self._links.setdefault(peer, []).append(link)
        self._closing.discard(peer)  # a new channel to a peer whose old one is closing
        self._last_active[peer] = now
        self._trim_channels(keep=peer)
        self.peers.mark_connected(peer, now)
        self.group.register_peer(peer, channel.peer_identity_key)
        session = self._pex.setdefault(peer, PeerExchangeSession())
        grid = self.options.grid.coordinate if self.options.grid is not None else ()
        send.send_nowait(NodeAnnounce(listen_port=self.listen_port, grid=grid))
        for message in self._queued.pop(peer, []):
            send.send_nowait(message)
        # ask for more peers only while short of them (spec/discovery.md: a node SHOULD ask
        # only when it wants more): group members connect to each other, so a busy node
        # opens many channels, and a PeerList on each one was a large part of their cost
        if session.may_request(now) and len(self._links) <= self.options.target_peers:
            send.send_nowait(session.make_request(now))
        self._wake.set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, link, outbox)
                try:
                    async for message in channel:
                        self._dispatch(peer, message)
                except RemoteProtocolError as exc:
                    log.warning("closing channel to %s: %s", peer.short, exc)
                    await channel.aclose(exc.code, str(exc))
                except ChannelClosed as exc:
                    log.info("channel to %s ended: %s", peer.short, exc)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.bytes_sent += channel.bytes_sent
            self.bytes_received += channel.bytes_received
            links = self._links.get(peer, [])
            if link in links:
                links.remove(link)
            send.close()
            self._links_changed.set()
            if not links:
                self._links.pop(peer, None)
                self._last_active.pop(peer, None)
                self._closing.discard(peer)
                self._pex.pop(peer, None)
                self.peers.mark_disconnected(peer, trio.current_time())
                self._act(self.group.peer_lost(peer, trio.current_time()))

    async def _writer(self, link: _Link, outbox: trio.MemoryReceiveChannel[Message]) -> None:
        channel = link.channel
        try:
            async for message in outbox:
                # everything queued meanwhile goes out with it, packed into one write
                batch = [message]
                while True:
                    try:
                        batch.append(outbox.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await channel.send_many(batch)
            # the outbox was closed (the node is stopping, or trimming this channel) and
            # everything queued is sent
            await channel.aclose(link.close_code, link.close_reason)
        except ChannelClosed:
            pass

    def _dispatch(self, peer: NodeId, message: Message) -> None:
        assert self.group is not None
        now = trio.current_time()
        self._last_active[peer] = now
        if isinstance(message, _GROUP_MESSAGES):
            self._act(self.group.receive(peer, message, now))
        elif isinstance(message, NodeAnnounce):
            self.group.set_peer_grid(peer, message.grid)
            host = self._host_of.get(peer)
            if host and message.listen_port:
                self.peers.observe(peer, host, message.listen_port, "inbound", now)
        elif isinstance(message, PeerExchangeRequest):
            session = self._pex.setdefault(peer, PeerExchangeSession())
            session.request_received(now)
            requester = self._host_of.get(peer)
            reply = build_peer_list(self.peers, message, peer, self._rng, requester)
            self._send(peer, reply)
        elif isinstance(message, PeerList):
            self._pex.setdefault(peer, PeerExchangeSession()).list_received(message)
            if handle_peer_list(self.peers, message, peer, now):
                self._wake_connector()
        elif isinstance(message, ModelRequest):
            round_, model = self._aggregated or (0, np.zeros(0, np.float32))
            params = model.astype("<f4", copy=False).data.cast("B")
            self._send(
                peer, ModelState(round=round_, fingerprint=self.fingerprint, parameters=params)
            )
        elif isinstance(message, ModelState):
            ok = (
                message.fingerprint == self.fingerprint
                and self.model is not None
                and len(message.parameters) in (0, 4 * len(self.model))
            )
            if self._sync is not None and ok:
                self._sync.send_nowait(message)
        else:
            log.debug("ignoring %s from %s", type(message).__name__, peer.short)

    # -- discovery and connections -------------------------------------------------------

    def _wake_connector(self) -> None:
        self._connector_wake.set()

    async def _connector_loop(self) -> None:
        """Keep ``target_peers`` channels open: bootstrap first, then known candidates."""
        bootstrap = [parse_host_port(entry) for entry in self.config.bootstrap]
        next_explore: float | None = None  # set when the node first reaches its target
        while True:
            now = trio.current_time()
            self.peers.expire(now, max_age=PEER_MAX_AGE)
            connected = set(self._connected())
            known = {r.address for r in self.peers.records() if r.node_id in connected}
            for address in bootstrap:
                if address not in known:
                    self._dial(address)
            if len(connected) < self.options.target_peers:
                for record in self.peers.candidates(now):
                    if record.node_id in connected or record.address is None:
                        continue
                    self._dial(record.address, expect=record.node_id)
                    if len(connected) + len(self._dialling) >= self.options.target_peers:
                        break
            elif next_explore is None:
                next_explore = now + self._rng.uniform(*EXPLORE_INTERVAL)
            elif now >= next_explore:
                # at target: still dial one known-but-unconnected peer now and then
                # (spec/discovery.md, "Exploration"), or two halves that never met, say
                # sites that booted before the link between them was up, stay apart
                # after the link comes up: every node is content with its own side
                next_explore = now + self._rng.uniform(*EXPLORE_INTERVAL)
                explore = self.peers.exploration_candidate(now, self._rng)
                if (
                    explore is not None
                    and explore.address is not None
                    and len(connected) < self.config.max_connections
                ):
                    self._dial(explore.address, expect=explore.node_id)
            with trio.move_on_after(2.0):
                await self._connector_wake.wait()
            self._connector_wake = trio.Event()

    async def _discovery_loop(self) -> None:
        discovery = self.network.discover(self.node_id, self.federation.tag, self.listen_port)
        async with discovery.events() as events:
            async for event in events:
                now = trio.current_time()
                if isinstance(event, PeerDiscovered):
                    if self.peers.observe(event.node_id, event.host, event.port, "mdns", now):
                        self._wake_connector()
                elif isinstance(event, PeerDeparted) and event.node_id not in self._links:
                    self.peers.remove(event.node_id)

    async def _shutdown(self) -> None:
        """Leave cleanly: abort (or let finish) the current group, close every channel."""
        assert self.group is not None
        if self.group.phase is Phase.RUNNING:
            # let the running all-reduce finish (or abort) before withdrawing: its outcome
            # arrives on the outcome channel like any other
            with trio.move_on_after(self.group_config.allreduce_timeout):
                while self.group.phase is Phase.RUNNING:
                    await self._outcomes.receive()
        self._act(self.group.withdraw())
        # closing the outboxes lets every writer send what is queued (our last reduced
        # shard, the aborts just queued), then close its channel with a Close message
        for links in self._links.values():
            for link in links:
                link.outbox.close()
        with trio.move_on_after(2.0):
            while self._links:
                await self._links_changed.wait()
                self._links_changed = trio.Event()
        for links in list(self._links.values()):
            for link in list(links):
                await link.channel.aclose(CloseCode.SHUTTING_DOWN, "node stopping")


def federation_seed(federation: Federation) -> int:
    """A seed every member derives alike (for the initial model) from the federation id."""
    digest = hashlib.sha256(b"p2pfed-initial-model:" + federation.federation_id).digest()
    return int.from_bytes(digest[:4], "big")
