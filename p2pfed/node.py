"""The p2pfed node: the composition root of its parts, each with one job.

A :class:`Node` wires the parts together and runs them in one nursery:

* :class:`~p2pfed.channel_pool.ChannelPool`: the secure channels to peers (dialling,
  serving, trimming, liveness, peer exchange, discovery);
* :class:`~p2pfed.group_driver.GroupDriver`: the sans-IO group protocol
  (:mod:`p2pfed.group`) driven over those channels through one action queue;
* :class:`~p2pfed.round_loop.RoundLoop`: the rounds (training, the DP release through
  :class:`~p2pfed.dp_release.PrivateRelease`, the averaging steps, the server optimiser,
  checkpoints through :class:`~p2pfed.checkpoint_writer.CheckpointWriter`, evaluation,
  the round's report) and the model state.

What stays here: construction from a node directory, loading the task, ``run()``, the
network callbacks (a channel opened or lost, a message that is not the group's: model
requests for peers that sync, and their answers), and the properties the daemon, the
status report and simnet read. The node never opens sockets or reads the wall clock
itself, so simnet runs this very class on a virtual network under
``trio.testing.MockClock``.

Example (what ``p2pfed node`` does)::

    node = Node.from_directory(Path("~/.p2pfed").expanduser(), network=TcpNetwork())
    await node.run()
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trio

from p2pfed.channel_pool import LIVENESS_DEADLINE, ChannelPool, PoolHooks
from p2pfed.checkpoint_writer import CHECKPOINT_FILE_NAME, CheckpointWriter
from p2pfed.config import NodeConfig, load_config
from p2pfed.dp_release import PrivateRelease, check_privacy_files
from p2pfed.errors import ConfigError
from p2pfed.federation import Federation, load_federation
from p2pfed.group import (
    GridPosition,
    GroupAborted,
    GroupCompleted,
    GroupConfig,
    GroupProtocol,
)
from p2pfed.group_driver import DriverLinks, GroupDriver
from p2pfed.identity import (
    IDENTITY_FILE_NAME,
    NodeId,
    NodeIdentity,
    load_identity,
)
from p2pfed.ledger import PrivacyLedger
from p2pfed.messages import (
    Message,
    ModelRequest,
    ModelState,
    NodeAnnounce,
)
from p2pfed.model_vector import model_fingerprint, model_to_vector
from p2pfed.network import Network
from p2pfed.peers import (
    BootstrapDialer,
    PeerTable,
)
from p2pfed.round_loop import LoopLinks, RoundLoop, RoundReport
from p2pfed.round_rules import federation_seed, fixed_point_of, task_settings
from p2pfed.task import NodeData, Task, check_device, load_task
from p2pfed.trio_channel import (
    ChannelConfig,
    SecureChannel,
    SharedBudget,
)

__all__ = [
    "CHECKPOINT_FILE_NAME",
    "LIVENESS_DEADLINE",
    "Node",
    "NodeOptions",
    "RoundReport",
    "federation_seed",
]

log = logging.getLogger("p2pfed.node")


def _check_model_fingerprint(federation: Federation, fingerprint: bytes, source: str) -> None:
    """Refuse a task whose model layout differs from the federation file's
    ``model_fingerprint`` (spec/identity.md, "Federation file"), if it names one."""
    expected = federation.model_fingerprint
    if expected is None or expected == fingerprint:
        return
    raise ConfigError(
        f"{source}: the federation's model_fingerprint is {expected.hex()[:16]}..., but this "
        f"node's task builds a model with fingerprint {fingerprint.hex()[:16]}... (run the "
        "task, and task settings, the federation was created with)"
    )


KEEPALIVE_INTERVAL = 1.0
"""The longest a node stays silent on a channel (spec/transport.md, section 6)."""


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
    pace_timeout: float = 10.0
    """Random rounds: how long a node that is a round ahead of a connected peer keeps
    averaging without training, waiting for it (spec/group.md, "Random rounds", pace).
    0: never wait (nodes of different speeds then drift rounds apart)."""


class Node:
    """One federated-learning node (see the module docstring).

    A composition root: :attr:`channels` (a :class:`~p2pfed.channel_pool.ChannelPool`)
    keeps the channels to peers, :attr:`driver` (a
    :class:`~p2pfed.group_driver.GroupDriver`) runs the group protocol over them, and
    :attr:`round_loop` (a :class:`~p2pfed.round_loop.RoundLoop`) runs the rounds:
    training, DP release and ledger, averaging, the server optimiser, evaluation and
    checkpoints. The model state (:attr:`round`, :attr:`model`, ...) is the round loop's;
    the node's properties read it.

    ``on_round`` is called with each completed round's report. ``on_group`` is called
    with each completed or aborted group and the seconds since the contribution was
    offered, before the node uses the outcome: :attr:`contribution` and
    :attr:`contribution_weight` are then still what that group averaged, and
    :attr:`model` not yet replaced (simnet's conservation audit relies on this).
    """

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
        params = federation.params
        self.group_config = self.options.group or GroupConfig(
            group_min=params.group_min, group_max=params.group_max
        )
        self.fixed_point = fixed_point_of(federation, self.group_config.group_max)
        self.channel_config = ChannelConfig(
            max_message_size=config.effective_max_message_size(params),
            handshake_timeout=config.handshake_timeout,
            # spec/transport.md, section 6: at most 1 s of silence, so that peers can tell
            # a vanished node from a quiet one within LIVENESS_DEADLINE
            keepalive_interval=min(config.keepalive_interval, KEEPALIVE_INTERVAL),
            idle_timeout=config.idle_timeout,
            send_timeout=config.send_timeout,
        )
        self.peers = PeerTable(self.node_id)
        self.exact = federation.params.averaging == "exact" and self.options.grid is None
        if self.exact:
            # a node sees its class at step 0 only with a channel to every node of the round
            self.options = dataclasses.replace(
                self.options, target_peers=max(self.options.target_peers, config.max_connections)
            )
        self.channels = ChannelPool(
            identity=identity,
            federation=federation,
            config=config,
            channel_config=self.channel_config,
            network=network,
            peers=self.peers,
            rng=self._rng,
            randbytes=self._randbytes,
            budget=lambda: self.reassembly_budget,
            target_peers=self.options.target_peers,
            group_min=self.group_config.group_min,
            hooks=PoolHooks(
                opened=self._channel_opened,
                received=self._dispatch,
                gone=self._peer_gone,
                undeliverable=self._undeliverable,
                busy=self._busy,
            ),
        )
        """This node's channels to its peers (:class:`~p2pfed.channel_pool.ChannelPool`)."""
        self.driver = GroupDriver(
            self.group_config,
            self.peers,
            DriverLinks(
                send=self.channels.send,
                connected=self.channels.connected,
                version=self.channels.version,
                silent_since=self.channels.silent_since,
                group_ended=functools.partial(self.channels.trim, keep=None),
            ),
            current_round=lambda: self.round,
            may_catch_up=self.options.sync_timeout > 0,  # adopting peers' models is allowed
            on_group=on_group,
        )
        """The group protocol's driver (:class:`~p2pfed.group_driver.GroupDriver`)."""
        self._stop = trio.Event()
        self.checkpoints = CheckpointWriter(self.node_dir, threads=self.options.threads)
        self.finished = trio.Event()  # set when run() has shut the node down
        self.listen_port = 0
        self._sync: trio.MemorySendChannel[ModelState] | None = None
        self.group: GroupProtocol | None = None
        self.privacy = PrivateRelease(
            federation, self.fixed_point, self.node_dir, threads=self.options.threads
        )
        """This node's DP releases and ledger (:class:`~p2pfed.dp_release.PrivateRelease`)."""
        self.round_loop = RoundLoop(
            node_id=self.node_id,
            federation=federation,
            task=task,
            options=self.options,
            group_config=self.group_config,
            fixed_point=self.fixed_point,
            exact=self.exact,
            driver=self.driver,
            privacy=self.privacy,
            checkpoints=self.checkpoints,
            links=LoopLinks(
                connected=self._connected,
                known_peers=lambda: len(self.peers),
                fetch_aggregate=self._fetch_aggregate,
            ),
            stop=self._stop,
            rng=self._rng,
            randbytes=self._randbytes,
            on_round=on_round,
        )
        """The rounds: training, DP, averaging, the server step, checkpoints, evaluation,
        and the model state (:class:`~p2pfed.round_loop.RoundLoop`)."""

    # -- construction from a node directory ----------------------------------------------

    @classmethod
    def from_directory(
        cls,
        node_dir: Path,
        *,
        network: Network,
        options: NodeOptions | None = None,
        task_spec: str | None = None,
        config: NodeConfig | None = None,
        **kwargs: Any,
    ) -> Node:
        """Load identity, config, federation and task from ``node_dir`` (``p2pfed init``).

        ``config`` replaces the directory's ``config.toml`` (the daemon passes it with its
        command-line overrides applied): the node builds its channel settings from it at
        construction, so it must be the final one then, never assigned afterwards."""
        node_dir = Path(node_dir)
        config = config if config is not None else load_config(node_dir)
        identity = load_identity(node_dir / IDENTITY_FILE_NAME)
        federation = load_federation(config.federation_path(node_dir))
        # before anything runs, so that the operator gets one clear line, not a traceback
        check_privacy_files(
            node_dir,
            federation,
            str(config.federation_path(node_dir)),
            resumed=(node_dir / CHECKPOINT_FILE_NAME).exists(),
        )
        spec = task_spec or config.task
        if not spec:
            raise ConfigError(
                f"no task configured in {node_dir / 'config.toml'}: set task = "
                '"package.module:object", or name = "package.module:object" in its [task] '
                "table (or pass --task), e.g. p2pfed.tasks.digits:task"
            )
        task = load_task(spec)  # also needed without training: it defines the model
        if config.task_settings:
            # config.toml's [task] table first, the runner's settings (--set) over it
            options = options or NodeOptions()
            options = dataclasses.replace(
                options, task_config={**config.task_settings, **options.task_config}
            )
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
            self.channels.stopping = True
            self.driver.stop()  # wakes a round waiting for its group

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (or ``max_rounds``); reports the listen port when listening."""
        # building the model or loading the data fails as the task's error (a TaskError)
        torch_model, data = await self.round_loop.offload(self._prepare_task)
        listener = await self.network.listen(self.config.listen_host, self.config.listen_port)
        self.listen_port = self.network.listen_port(listener)
        self.group = GroupProtocol(
            self.identity,
            self.group_config,
            self.fixed_point,
            fingerprint=self.fingerprint,
            model_size=self.round_loop.vector_size(),
            listen_port=self.listen_port,
            address_of=self.channels.address_of,
            excluded=self.peers.is_excluded,
            rng=random.Random(self._rng.getrandbits(64)),
            randbytes=self._randbytes,
            masking=self.options.masking,
            grid=self.options.grid,
            exact=self.exact,
            sit_out=self.options.training,
        )
        self.driver.start(self.group)
        log.info(
            "node %s listening on port %d (federation %s, round %d)",
            self.node_id.short,
            self.listen_port,
            self.federation.name,
            self.round,
        )
        self.channels.listen_port = self.listen_port
        async with trio.open_nursery() as nursery:
            self.channels.bind(nursery)
            await nursery.start(self.channels.serve, listener)
            nursery.start_soon(self.driver.loop)
            nursery.start_soon(self.channels.connector_loop)
            nursery.start_soon(self.channels.discovery_loop)
            if self.options.threads:
                nursery.start_soon(self.checkpoints.run)
            task_status.started(self.listen_port)
            try:
                await self.round_loop.run(torch_model, data)
            finally:
                with trio.CancelScope(shield=True):
                    await self.checkpoints.flush()  # the last round's, before we report done
                await self._shutdown()
                self.finished.set()
                nursery.cancel_scope.cancel()

    def _prepare_task(self) -> tuple[torch.nn.Module, NodeData | None]:
        assert self.task is not None
        config = dict(self.options.task_config)
        config.setdefault("device", check_device(self.config.device))
        if self.config.torch_threads:  # 0: leave torch's default, a thread per core
            torch.set_num_threads(self.config.torch_threads)
        # every node builds the same initial model: seed it from the federation
        config = task_settings(self.federation, config)
        self.options.task_config = config
        torch_model = self.task.build_model(config)
        fingerprint = model_fingerprint(torch_model, self.task.name)
        # before listening or loading data: a node of another layout could never average
        _check_model_fingerprint(
            self.federation, fingerprint, str(self.config.federation_path(self.node_dir))
        )
        model = model_to_vector(torch_model)
        data = self.task.load_data(config)
        self.round_loop.begin(model, fingerprint, data.num_train)
        return torch_model, data

    @property
    def ledger(self) -> PrivacyLedger | None:
        """The privacy ledger (None without DP, or before the node has started)."""
        return self.privacy.ledger

    @property
    def budget_exhausted(self) -> bool:
        """Whether the node has stopped training because its privacy budget is spent."""
        return self.privacy.budget_exhausted

    # -- the model state, held by the round loop ----------------------------------------

    @property
    def round(self) -> int:
        """The rounds this node has completed (or adopted from a peer)."""
        return self.round_loop.round

    @round.setter
    def round(self, value: int) -> None:
        self.round_loop.round = value

    @property
    def model(self) -> np.ndarray | None:
        """The model this node holds (None before the task is prepared)."""
        return self.round_loop.model

    @model.setter
    def model(self, value: np.ndarray | None) -> None:
        self.round_loop.model = value

    @property
    def weight(self) -> int:
        """The push-sum / block weight of :attr:`model` (spec/group.md, "Weights")."""
        return self.round_loop.weight

    @property
    def local_rounds(self) -> int:
        """How many times this node trained (its own, even after a sync)."""
        return self.round_loop.local_rounds

    @property
    def contribution(self) -> np.ndarray | None:
        """The vector of the latest contribution offered to a group."""
        return self.round_loop.contribution

    @property
    def contribution_weight(self) -> int:
        """The integer weight of the latest contribution offered to a group."""
        return self.round_loop.contribution_weight

    @property
    def last_metrics(self) -> dict[str, float]:
        """The latest local evaluation of the model held."""
        return self.round_loop.last_metrics

    @property
    def federation_metrics(self) -> dict[str, float] | None:
        """The latest federation-wide evaluation (:attr:`RoundLoop.federation_metrics`)."""
        return self.round_loop.federation_metrics

    @property
    def fingerprint(self) -> bytes:
        """The fingerprint of the task's model layout (set once the task is prepared)."""
        return self.round_loop.fingerprint

    def traffic(self) -> tuple[int, int]:
        """Bytes sent and received on all channels so far, open and closed."""
        return self.channels.traffic()

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
            "federation_metrics": self.federation_metrics,
            "epsilon_spent": self.ledger.spent() if self.ledger else None,
            "groups_completed": self.groups_completed,
            "groups_aborted": self.groups_aborted,
            "bytes_sent": self.traffic()[0],
            "bytes_received": self.traffic()[1],
        }

    async def _fetch_aggregate(self, after: int, timeout: float) -> ModelState | None:
        """Ask every connected peer (and each that connects meanwhile) for its latest
        aggregated model; the one of the latest round after ``after`` among the answers
        that arrive within ``timeout`` seconds, or None."""
        send, receive = trio.open_memory_channel[ModelState](math.inf)
        self._sync = send
        asked: set[NodeId] = set()
        answers = 0
        best: ModelState | None = None
        with trio.move_on_after(timeout):
            while not asked or answers < len(asked):
                for peer in self._connected():
                    if peer not in asked:
                        asked.add(peer)
                        self._send(peer, ModelRequest())
                with trio.move_on_after(0.25):
                    state = await receive.receive()
                    answers += 1
                    if state.round > after and (best is None or state.round > best.round):
                        best = state
        self._sync = None
        return best

    # -- the group protocol driver -------------------------------------------------------

    # -- channels (p2pfed.channel_pool) and its hooks ------------------------------------

    def _connected(self) -> list[NodeId]:
        return self.channels.connected()

    def stall_reason(self) -> str | None:
        """Why this node cannot form groups now, or None (see
        :meth:`ChannelPool.stall_reason`)."""
        return self.channels.stall_reason()

    def unresponsive_peers(self) -> list[NodeId]:
        """Peers with an open channel but nothing received for LIVENESS_DEADLINE."""
        return self.channels.unresponsive_peers()

    @property
    def groups_completed(self) -> int:
        """Groups this node completed (every step of a round counts)."""
        return self.driver.groups_completed

    @property
    def groups_aborted(self) -> int:
        """Groups that aborted while this node waited for one."""
        return self.driver.groups_aborted

    @property
    def channels_trimmed(self) -> int:
        """Channels closed for the connection limit."""
        return self.channels.channels_trimmed

    @property
    def bootstrap(self) -> BootstrapDialer:
        """The configured bootstrap addresses and how dialing each goes."""
        return self.channels.bootstrap

    def bootstrap_summary(self) -> list[dict[str, Any]]:
        """The bootstrap addresses for the status report (see
        :meth:`ChannelPool.bootstrap_summary`)."""
        return self.channels.bootstrap_summary()

    def _send(self, peer: NodeId, message: Message, address: tuple[str, int] | None = None) -> None:
        self.channels.send(peer, message, address)

    @functools.cached_property
    def reassembly_budget(self) -> SharedBudget:
        """The memory all this node's channels may hold in large messages under
        reassembly (spec/transport.md, section 8): twice the largest message a peer has
        reason to send (a masked model, at most 8 bytes a parameter, capped by
        max_message_size) plus 64 MiB. Made on first use, once the model is known."""
        size = len(self.model) if self.model is not None else 0
        largest = min(self.channel_config.max_message_size, 8 * size + (1 << 20))
        return SharedBudget(2 * largest + (64 << 20))

    def _channel_opened(self, peer: NodeId, channel: SecureChannel) -> list[Message]:
        """A channel to ``peer`` opened: register it with the group protocol, and greet it
        with this node's announcement and its position (or its round, random rounds)."""
        assert self.group is not None
        self.group.register_peer(peer, channel.peer_identity_key)
        grid = self.options.grid.coordinate if self.options.grid is not None else ()
        greeting: list[Message] = [NodeAnnounce(listen_port=self.listen_port, grid=grid)]
        greeting += self.driver.greeting(channel.version)
        self.driver.wake()
        return greeting

    def _peer_gone(self, peer: NodeId) -> None:
        """The peer's last channel closed: its groups lose it, and the class count moves."""
        self.driver.peer_lost(peer)
        self.driver.refresh_position()

    def _undeliverable(self, peer: NodeId) -> None:
        """Messages for ``peer`` cannot be delivered: as if its channel had closed."""
        self.driver.peer_lost(peer)

    def _busy(self) -> set[NodeId]:
        """Peers of the current group: their channels are not trimmed while it runs."""
        return self.driver.busy_with()

    def _dispatch(self, peer: NodeId, message: Message) -> None:
        """A message from ``peer`` (the channel pool has answered peer exchange)."""
        assert self.group is not None
        if self.driver.receive(peer, message):
            return
        if isinstance(message, NodeAnnounce):
            self.group.set_peer_grid(peer, message.grid)
        elif isinstance(message, ModelRequest):
            round_, model = self.round_loop.aggregated or (0, np.zeros(0, np.float32))
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

    async def _shutdown(self) -> None:
        """Leave cleanly: abort (or let finish) the current group, close every channel."""
        await self.driver.finish_running()
        self.driver.withdraw()
        await self.channels.close_all()
