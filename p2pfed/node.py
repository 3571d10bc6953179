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
   with exact averaging (the default) this is ``d`` steps of small groups, after which
   every node holds the exact sample-weighted average of all nodes' models
   (:mod:`p2pfed.exact_rounds`);
5. adopt the average (through the federation's server optimiser), checkpoint atomically,
   evaluate.

Example (what ``p2pfed node`` does)::

    node = Node.from_directory(Path("~/.p2pfed").expanduser(), network=TcpNetwork())
    await node.run()
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import operator
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import trio

from p2pfed import dp, dp_sgd, skellam
from p2pfed.atomicfile import atomic_write_bytes
from p2pfed.channel import Role, StaticKey
from p2pfed.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from p2pfed.config import FEDERATION_FILE_NAME, NodeConfig, load_config, parse_host_port
from p2pfed.errors import (
    ChannelClosed,
    CloseCode,
    ConfigError,
    LedgerError,
    P2pfedError,
    RemoteProtocolError,
    TaskError,
    raised_in,
)
from p2pfed.exact_rounds import Position, RoundPlan, member_indices, random_steps_for
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
    SitOut,
)
from p2pfed.identity import (
    IDENTITY_FILE_NAME,
    NodeId,
    NodeIdentity,
    has_ledger_marker,
    load_identity,
    mark_ledger_required,
)
from p2pfed.ledger import PrivacyLedger, ledger_path
from p2pfed.messages import (
    GroupAbort,
    GroupInvite,
    GroupPosition,
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
    BootstrapDialer,
    PeerExchangeSession,
    PeerSource,
    PeerTable,
    build_peer_list,
    format_address,
    handle_peer_list,
)
from p2pfed.server_optimizer import (
    ServerOptimizer,
    ServerOptimizerSettings,
    ServerOptimizerStateError,
)
from p2pfed.task import (
    NodeData,
    RoundContext,
    Task,
    TrainResult,
    call_train,
    check_device,
    load_task,
    round_config,
)
from p2pfed.trio_channel import (
    ChannelConfig,
    SecureChannel,
    SharedBudget,
    open_secure_channel,
    serve_secure_channels,
)

__all__ = ["CHECKPOINT_FILE_NAME", "Node", "NodeOptions", "RoundReport", "federation_seed"]

log = logging.getLogger("p2pfed.node")

_T = TypeVar("_T")
CHECKPOINT_FILE_NAME = "checkpoint.bin"


def _check_privacy_files(
    node_dir: Path, federation: Federation, source: str, *, resumed: bool
) -> None:
    """Refuse to start a DP node whose budget cannot hold one release, or that has released
    before (a checkpoint, or the marker in its identity file) but lost its ledger: a fresh
    ledger would spend the budget again (spec/privacy.md, section 5)."""
    params = federation.params
    if not params.dp_enabled:
        return
    dp.check_budget(params, source)
    path = ledger_path(node_dir)
    if path.exists() or path.is_symlink():
        return
    marked = has_ledger_marker(node_dir / IDENTITY_FILE_NAME)
    if resumed or marked:
        why = "its identity key records a release" if marked else "it has a checkpoint"
        raise LedgerError(
            f"privacy ledger missing: {path} does not exist, but this node has spent privacy "
            f"budget before ({why}), and a new ledger would spend it again (restore it from "
            "backup, or create a new identity with p2pfed init in a new node directory)"
        )


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


SERVER_OPTIMIZER_FILE_NAME = "server-optimizer.bin"
KEEPALIVE_INTERVAL = 1.0
"""The longest a node stays silent on a channel (spec/transport.md, section 6)."""
LIVENESS_DEADLINE = 3.0
"""A peer with nothing received for this long is unresponsive (spec/transport.md, 6)."""
STALL_GRACE = 10.0
"""Seconds after start before a node says why it forms no groups (finding peers takes a
moment; saying so at every start would be noise)."""
PEER_MAX_AGE = 600.0  # forget an unconnected peer not seen (announced, listed) for this long
_id_bytes = operator.attrgetter("raw")
_GROUP_MESSAGES = (GroupInvite, GroupReply, GroupStart, GroupAbort, Shard, ReducedShard)
_POSITION_VERSION = 2  # GroupPosition exists from protocol version 2 on
EVALUATION_WORDS = 3
"""Words a contribution appends to the model with federation metrics on (spec/group.md,
"Federation metrics"): correct count, loss sum and sample count, each over its weight."""


class _CaughtUp:
    """A round given up because the node was behind and adopted its peers' average."""


_CAUGHT_UP = _CaughtUp()


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
    steps: int = 1
    """Groups this round took (exact averaging: the plan's steps)."""
    coverage: int = 0
    """Exact averaging: how many nodes' models the round's average can include (the
    product of the sizes of this node's groups); equal to ``nodes`` when it is exact."""
    nodes: int = 0
    """Exact averaging: the number of nodes of the round (0 for random groups)."""
    train_loss: float | None = None
    federation: dict[str, float] | None = None
    """The federation's figures this round computed (:attr:`Node.federation_metrics`), or
    None if it computed none."""


@dataclass
class _Link:
    channel: SecureChannel
    outbox: trio.MemorySendChannel[Message]
    # how the writer closes the channel once the outbox is closed and drained
    close_code: CloseCode = CloseCode.SHUTTING_DOWN
    close_reason: str = "node stopping"
    # peer exchange is per channel (spec/discovery.md 4.2-4.4): a second channel to the
    # same peer has its own request and its own rate limit
    pex: PeerExchangeSession = field(default_factory=PeerExchangeSession)
    initiated: bool = False  # this node dialed it (spec/discovery.md, "Duplicate channels")


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
            # spec/transport.md, section 6: at most 1 s of silence, so that peers can tell
            # a vanished node from a quiet one within LIVENESS_DEADLINE
            keepalive_interval=min(config.keepalive_interval, KEEPALIVE_INTERVAL),
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
        self._dialling: set[tuple[str, int]] = set()
        self._stall_logged: str | None = None  # the stall reason last logged
        self._host_of: dict[NodeId, str] = {}  # remote address of each peer's channel
        self._links_changed = trio.Event()
        self._queued: dict[NodeId, list[Message]] = {}
        self._wake = trio.Event()
        self._loop_deadline = 0.0  # when the group loop wakes by itself (math.inf: never)
        self._outcomes_send, self._outcomes = trio.open_memory_channel[
            GroupCompleted | GroupAborted | SitOut | None
        ](math.inf)
        self._connector_wake = trio.Event()
        self._stop = trio.Event()
        self._checkpoint_pending: tuple[Checkpoint, bytes | None] | None = None
        self._checkpoint_wanted = trio.Event()
        self._checkpoint_lock = trio.Lock()
        self.finished = trio.Event()  # set when run() has shut the node down
        self._nursery: trio.Nursery | None = None
        self.listen_port = 0
        # model state
        self.round = 0
        self.local_rounds = 0  # how many times this node trained (its own, even after a sync)
        self.model: np.ndarray | None = None
        self.weight = 1  # push-sum / block weight of the model held (spec/group.md, "Weights")
        self.training_weight = 1  # this node's FedAvg weight n_k when it has trained
        self.contribution_weight = 1  # the integer weight of the latest contribution offered
        self.contribution: np.ndarray | None = None  # the model of the latest contribution
        self.exact = federation.params.averaging == "exact" and self.options.grid is None
        if self.exact:
            # a node sees its class at step 0 only with a channel to every node of the round
            self.options = dataclasses.replace(
                self.options, target_peers=max(self.options.target_peers, config.max_connections)
            )
        self._aggregated: tuple[int, np.ndarray] | None = None
        self._sync: trio.MemorySendChannel[ModelState] | None = None
        self.group: GroupProtocol | None = None
        self.ledger: PrivacyLedger | None = None
        # distributed DP: (released model, its noisy ring words) until the first group
        self._distributed_release: tuple[np.ndarray, np.ndarray] | None = None
        self.budget_exhausted = False
        """Whether the node has stopped training because its privacy budget is spent."""
        self.last_metrics: dict[str, float] = {}
        self.federation_metrics: dict[str, float] | None = None
        """The latest federation-wide evaluation (spec/group.md, "Federation metrics"):
        "accuracy" and "loss" over every sample the members' evaluations saw, "round" (the
        round whose model they evaluated) and, when the round was exact, "samples"; None
        until a round has carried evaluation sums (or always, with the feature off)."""
        self._evaluated: tuple[int, dict[str, float], int] | None = None  # round, metrics, n
        self._words_scaled = False  # warned that the evaluation words were scaled down
        self._round_position: Position | None = None  # exact rounds: the current step's class
        self._behind = False  # exact rounds: every peer is at a later round (catch up)
        self._peer_round: dict[NodeId, int] = {}  # random rounds: each peer's latest round
        self._pace_round: int | None = None  # random rounds: the round announced to peers
        self._pace_changed = trio.Event()
        self._pace_gave_up: dict[NodeId, int] = {}  # peer -> the round it made us time out at
        self.server_optimizer: ServerOptimizer | None = None
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
        _check_privacy_files(
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
            model_size=self._vector_size(),
            listen_port=self.listen_port,
            address_of=self._address_of,
            excluded=self.peers.is_excluded,
            rng=random.Random(self._rng.getrandbits(64)),
            randbytes=self._randbytes,
            masking=self.options.masking,
            grid=self.options.grid,
            exact=self.exact,
            sit_out=self.options.training,
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
            if self.options.threads:
                nursery.start_soon(self._checkpointer)
            task_status.started(self.listen_port)
            try:
                await self._rounds(torch_model, data)
                if data is not None and self.options.evaluate_every:
                    # the model may have moved since the last evaluation (lingering)
                    self.last_metrics = await self._offload(self._evaluate, torch_model, data)
            finally:
                with trio.CancelScope(shield=True):
                    await self._flush_checkpoint()  # the last round's, before we report done
                await self._shutdown()
                self.finished.set()
                nursery.cancel_scope.cancel()

    async def _offload(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run blocking work (training, evaluation, fsync) off the event loop if allowed.

        An exception raised in the task's own code becomes a :class:`TaskError`, so that
        the operator is told it is the task that failed (the cause keeps the traceback).
        """
        try:
            if self.options.threads:
                return await trio.to_thread.run_sync(function, *args)
            return function(*args)
        except Exception as exc:
            if isinstance(exc, P2pfedError) or not raised_in(exc, self._task_files()):
                raise
            text = " ".join(str(exc).split()) or "no message"
            raise TaskError(
                f"the task {type(self.task).__name__} failed: {type(exc).__name__}: {text}"
            ) from exc

    def _task_files(self) -> list[str]:
        """The source files of the task's class and its bases, but for p2pfed's own
        plumbing (its tasks package counts as a task)."""
        package = os.path.dirname(os.path.abspath(__file__))
        tasks = os.path.join(package, "tasks")
        files = []
        for cls in type(self.task).__mro__:
            module = sys.modules.get(cls.__module__)
            path = getattr(module, "__file__", None)
            if path is None:
                continue
            path = os.path.abspath(path)
            if not path.startswith(package + os.sep) or path.startswith(tasks + os.sep):
                files.append(path)
        return files

    def _prepare_task(self) -> tuple[torch.nn.Module, NodeData | None]:
        assert self.task is not None
        config = dict(self.options.task_config)
        config.setdefault("device", check_device(self.config.device))
        if self.config.torch_threads:  # 0: leave torch's default, a thread per core
            torch.set_num_threads(self.config.torch_threads)
        # every node builds the same initial model: seed it from the federation
        config.setdefault("seed", federation_seed(self.federation))
        self.options.task_config = config
        torch_model = self.task.build_model(config)
        self.fingerprint = model_fingerprint(torch_model, self.task.name)
        # before listening or loading data: a node of another layout could never average
        _check_model_fingerprint(
            self.federation, self.fingerprint, str(self.config.federation_path(self.node_dir))
        )
        self.model = model_to_vector(torch_model)
        data = self.task.load_data(config)
        self.training_weight = self._training_weight(data.num_train)
        self.weight = self.training_weight
        checkpoint = load_checkpoint(
            self.node_dir / CHECKPOINT_FILE_NAME, expected_fingerprint=self.fingerprint
        )
        if checkpoint is not None:
            self.round = checkpoint.round
            self.model = checkpoint.model.copy()
            self.weight = self._ring_cap(round(checkpoint.weight))
            self.local_rounds = int(checkpoint.extra.get("local_rounds", checkpoint.round))
            self._aggregated = (self.round, self.model.copy()) if self.round else None
            log.info("resumed from checkpoint at round %d", self.round)
        self._open_ledger(resumed=checkpoint is not None)
        self.server_optimizer = self._open_server_optimizer()
        return torch_model, data

    def _open_server_optimizer(self) -> ServerOptimizer | None:
        """The federation's server optimiser with this node's saved state
        (spec/server-optimizer.md, section 6); None for plain FedAvg."""
        assert self.model is not None
        settings = ServerOptimizerSettings.from_params(self.federation.params)
        if settings.name == "fedavg":
            return None
        path = self.node_dir / SERVER_OPTIMIZER_FILE_NAME
        optimizer: ServerOptimizer | None = None
        try:
            optimizer = ServerOptimizer.load(path, len(self.model), settings)
        except ServerOptimizerStateError as exc:
            log.warning("not using the server optimiser state: %s", exc)
        if optimizer is not None and optimizer.name == settings.name:
            if optimizer.round == self.round:
                return optimizer
            log.warning(
                "the server optimiser state is of round %d, the checkpoint of round %d: "
                "starting it again from zero (this node's model will differ from its "
                "peers' for a while)",
                optimizer.round,
                self.round,
            )
        return ServerOptimizer(settings, len(self.model), round=self.round)

    def _training_weight(self, weight: int) -> int:
        """The FedAvg weight of this node's trained model (spec/group.md, "Weights"): with DP
        on, 1 whatever the data (a weight derived from the data would disclose it); else
        the task's count, capped at the ring's ``max_weight``."""
        if self.federation.params.dp_enabled:
            return 1
        return self._ring_cap(weight)

    def _ring_cap(self, weight: int) -> int:
        """``weight`` as a contribution may carry it: an integer in ``[0, max_weight]``."""
        return max(0, min(int(weight), self.fixed_point.max_weight))

    def _open_ledger(self, *, resumed: bool) -> None:
        params = self.federation.params
        if not params.dp_enabled:
            return
        _check_privacy_files(
            self.node_dir,
            self.federation,
            str(self.node_dir / FEDERATION_FILE_NAME),
            resumed=resumed,
        )
        path = ledger_path(self.node_dir)
        if path.exists():
            self.ledger = PrivacyLedger.open(path)
            return
        self.ledger = PrivacyLedger.create(
            path, epsilon_budget=params.dp_epsilon_budget, delta=params.dp_delta
        )

    def _mark_identity(self) -> None:
        """Bind "this node has released" to its identity before the first release (a node
        built without a key file, in tests and simulations, has nothing to mark)."""
        key = self.node_dir / IDENTITY_FILE_NAME
        if key.exists():
            mark_ledger_required(key)

    # -- rounds --------------------------------------------------------------------------

    async def _rounds(self, torch_model: torch.nn.Module, data: NodeData | None) -> None:
        assert self.group is not None and self.model is not None
        if self.round == 0 and self.options.grid is None:
            # a grid node starts from its own model: adopting a peer's aggregate would
            # count it twice in the grid's exact mean and put this node out of step
            await self._sync_model()
        if self.exact and self.round == 0:
            await self._settle()
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
            result: TrainResult | None = None
            train_seconds = 0.0
            if finished:
                released = start
            else:
                if not self.exact and data is not None and self.options.training:
                    # pacing keeps training in step; pure averaging has nothing to pace
                    await self._keep_pace()
                    start = self.model
                released, result, train_seconds = await self._contribution(
                    torch_model, data, start, generator, noise_rng
                )
            weight = self._round_weight(result, finished=finished)
            # lingering only helps peers short of rounds: they invite, we answer (a grid
            # line, and an exact round's class, needs its initiator, whatever its round)
            initiate = (
                not (finished and self.options.linger_passive and self.options.grid is None)
                or self.exact
            )
            self._offered_at = trio.current_time()
            done = await self._average(released, weight, initiate=initiate)
            if done is None:
                break
            if isinstance(done, _CaughtUp):
                continue  # train again, from the adopted average
            outcome, steps, coverage, nodes = done
            completed_at = trio.current_time()
            group_started = self._group_started_at.get(outcome.group_id, completed_at)
            self.model = self._server_step(start, self.model)
            # one completed round of this node: taking a peer's higher round instead would
            # skip local training steps (rounds racing ahead)
            self.round += 1
            if result is not None:
                self.local_rounds += 1
            self._aggregated = (self.round, self.model)
            self._save_checkpoint()
            metrics: dict[str, float] = {}
            every = self.options.evaluate_every
            if data is not None and every and self.round % every == 0:
                metrics = await self._offload(self._evaluate, torch_model, data)
                self.last_metrics = metrics
                self._evaluated = (self.round, metrics, data.num_test)
            train_loss = result.loss if result is not None else None
            figure = self.federation_metrics
            fresh = figure is not None and figure["round"] == self.round - 1
            report = RoundReport(
                round=self.round,
                group_size=len(outcome.members),
                seconds=trio.current_time() - started,
                train_seconds=train_seconds,
                formation_seconds=group_started - self._offered_at,
                allreduce_seconds=completed_at - group_started,
                metrics=metrics,
                epsilon_spent=self.ledger.spent() if self.ledger else None,
                steps=steps,
                coverage=coverage,
                nodes=nodes,
                train_loss=train_loss,
                federation=dict(figure) if figure is not None and fresh else None,
            )
            self._log_round(report)
            if self._on_round is not None:
                self._on_round(report)

    def _round_weight(self, result: TrainResult | None, *, finished: bool) -> int:
        """This round's contribution weight (spec/group.md, "Weights"): the training weight
        after training; a node that does not train contributes the weight of the model it
        holds (pure averaging conserves the weighted sum), except in an exact round, where
        a node that skipped its training (finished, or out of privacy budget) adds nothing
        (weight 0), as FedAvg averages only the clients that trained."""
        if result is not None:
            declared = result.weight
            self.training_weight = self._training_weight(
                self.training_weight if declared is None else declared
            )
            return self.training_weight
        if self.exact and self.options.training:
            return 0  # it would have trained (finished, out of budget, no data): no new update
        return self.weight

    async def _average(
        self, released: np.ndarray, weight: int, *, initiate: bool
    ) -> tuple[GroupCompleted, int, int, int] | _CaughtUp | None:
        """Average ``released`` with peers: one group, or the steps of an exact round.

        Sets ``self.model`` and ``self.weight`` to the result and returns the last group,
        the number of steps, the coverage and the number of nodes (None: stopping;
        ``_CAUGHT_UP``: the node adopted a peer's average instead). With federation
        metrics on, the averaged vector is ``released`` followed by this node's evaluation
        words; their average becomes :attr:`federation_metrics`.
        """
        assert self.group is not None
        released = self._with_evaluation_words(released, weight)
        if not self.exact:
            return await self._random_steps(released, weight, initiate=initiate)
        position = Position(self.round, 0, (), self._class_count())
        model, coverage, steps = released, 1, 0
        carried: np.ndarray | None = None
        sums_carried = True  # every step after the first sent the previous integer sum on
        while True:
            if steps and carried is None:
                sums_carried = False
            outcome = await self._one_group(
                model, weight, initiate=initiate, position=position, carried=carried
            )
            if outcome is None and self._behind and not self._stop.is_set():
                await self._catch_up()
                return _CAUGHT_UP
            if outcome is None:
                return None
            if isinstance(outcome, SitOut):
                await self._sit_out(outcome)
                return _CAUGHT_UP
            steps += 1
            coverage *= len(outcome.members)
            model, carried = outcome.mean, None
            if not outcome.total_weight:
                pass  # nobody had weight: every member keeps its own model and weight 0
            elif outcome.structured:
                # the block weight: the group's total, the weight of all the models it
                # averaged (a share would no longer weigh the blocks of the next step right)
                weight = self._ring_cap(outcome.total_weight)
                if weight == outcome.total_weight:
                    # send the group's integer sum on as it is: the round's last sum is
                    # then the one a single group of all nodes would have, bit for bit
                    # (re-encoding the float32 mean would round twice more)
                    carried = outcome.ring_sum
            else:
                weight = outcome.share(self.node_id)  # a fallback group: push-sum
            # the position the group formed at (its count may have moved while waiting)
            current = self._round_position
            assert current is not None
            plan = self.group.exact_plan(current.size)
            if steps >= len(plan.sizes):
                break
            index = member_indices(outcome.group_id, [m.raw for m in outcome.members])
            position = current.next(index[self.node_id.raw])
        # the last group's integer sum is every node's step-0 words summed only if it
        # covered the round and no step in between re-encoded a float32 mean
        whole = coverage == plan.nodes and sums_carried and outcome.structured
        self.model = self._adopt(model, outcome.ring_sum if whole else None)
        self.weight = weight
        self._log_coverage(plan, coverage)
        return outcome, steps, coverage, plan.nodes

    def _saw_round(self, peer: NodeId, round_: int) -> None:
        """Remember the round a peer is at (its GroupPosition, or the round of its invite)."""
        self._peer_round[peer] = round_
        self._pace_changed.set()

    def _round_message(self, round_: int) -> GroupPosition:
        """A random-rounds node's position: its round only (no classes or steps)."""
        return GroupPosition(round=round_, step=0, key=(), size=1 + len(self._connected()))

    def _announce_round(self) -> None:
        """Random rounds: tell every connected peer the round this node now works on, so
        that a node ahead of it waits (:meth:`_keep_pace`)."""
        if self._pace_round == self.round:
            return
        self._pace_round = self.round
        message = self._round_message(self.round)
        for peer in self._connected():
            links = self._links.get(peer)
            if links and links[0].channel.version >= _POSITION_VERSION:
                self._send(peer, message)

    def _laggards(self) -> list[NodeId]:
        """Connected peers still at the round before this node's: they finish the round this
        node just finished. (A peer further behind, one that restarted from an old
        checkpoint or joined late, is not waited for: it would hold every round up; nor
        is a peer that already made this node wait out ``pace_timeout`` at that round.)"""
        behind = self.round - 1
        return [
            peer
            for peer in self._connected()
            if self._peer_round.get(peer) == behind and self._pace_gave_up.get(peer) != behind
        ]

    async def _keep_pace(self) -> None:
        """Random rounds: before training round ``r``, wait while a connected peer has
        announced round ``r - 1``, for at most ``pace_timeout`` seconds, answering the
        groups such peers invite it to with the current model (pure averaging conserves the
        weighted sum; spec/group.md, "Random rounds", pace).

        Without it nodes drift apart by their speed (a node with 50 records trains ten
        times as fast as one with 500): a fast node's round ``r`` then averages mostly
        models of much earlier rounds, and each node's accuracy per round trails FedAvg's.
        It waits passively (answering invites, never initiating) so that waiting nodes do
        not spend the slow node's CPU and bandwidth averaging among themselves.
        """
        self._announce_round()
        timeout = self.options.pace_timeout
        if timeout <= 0 or not self._laggards():
            return
        waited, mixed = trio.current_time(), 0
        with trio.move_on_after(timeout) as scope:
            while self._laggards() and not self._stop.is_set():
                outcome = await self._answer_laggards()
                if outcome is None:
                    break
                mixed += 1
                self.model = self._adopt(outcome.mean, None)
                if outcome.total_weight:
                    self.weight = outcome.share(self.node_id)
        if scope.cancelled_caught:
            assert self.group is not None
            self._act(self.group.withdraw())
            for peer in self._laggards():
                # stuck (e.g. short of a group on its side): not waited for again until it
                # moves on, or every round would wait the whole timeout for it
                self._pace_gave_up[peer] = self.round - 1
            log.info(
                "pace: %d peer(s) still at round %d after %.1f s; training anyway",
                len(self._laggards()),
                self.round - 1,
                trio.current_time() - waited,
            )
        elif mixed:
            log.debug(
                "pace: waited %.2f s (%d groups) for peers to reach round %d",
                trio.current_time() - waited,
                mixed,
                self.round,
            )

    async def _answer_laggards(self) -> GroupCompleted | None:
        """Offer the current model passively until a group completes (returned) or no
        connected peer is behind any more while no group is forming (None)."""
        assert self.group is not None and self.model is not None
        group = self.group
        outcome: GroupCompleted | SitOut | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while True:
                    self._pace_changed = trio.Event()
                    idle = group.phase is Phase.READY
                    if idle and (not self._laggards() or self._stop.is_set()):
                        self._act(group.withdraw())
                        nursery.cancel_scope.cancel()
                        return
                    with trio.move_on_after(0.25):  # the phase moves without an event
                        await self._pace_changed.wait()

            nursery.start_soon(watch)
            offered = self._with_evaluation_words(self.model, self.weight)
            outcome = await self._one_group(offered, self.weight, initiate=False)
            nursery.cancel_scope.cancel()
        return outcome if isinstance(outcome, GroupCompleted) else None

    def random_steps(self) -> int:
        """How many random groups this node joins per round (spec/group.md, "Random
        rounds"): the federation's ``random_steps``, or with 0 enough for the federation
        as this node sees it (``min_nodes``, or itself and every peer it knows of)."""
        configured = self.federation.params.random_steps
        if configured:
            return configured
        seen = max(self.federation.params.min_nodes, 1 + len(self.peers))
        return random_steps_for(seen, group_max=self.group_config.group_max)

    async def _random_steps(
        self, released: np.ndarray, weight: int, *, initiate: bool
    ) -> tuple[GroupCompleted, int, int, int] | None:
        """Random averaging: push-sum over ``random_steps()`` random groups. Each group
        leaves its members the group's weighted mean and an integer share of its weight,
        so the next group weighs them right and the weighted sum is conserved."""
        model, steps, wanted = released, 0, self.random_steps()
        outcome: GroupCompleted | None = None
        while steps < wanted:
            completed = await self._one_group(model, weight, initiate=initiate)
            if completed is None or isinstance(completed, SitOut):
                if outcome is None:
                    return None
                break  # stopping: keep what the finished steps averaged
            outcome, steps = completed, steps + 1
            model = outcome.mean
            weight = outcome.share(self.node_id) if outcome.total_weight else weight
        assert outcome is not None
        self.model, self.weight = self._adopt(model, None), weight
        return outcome, steps, 0, 0

    def _vector_size(self) -> int:
        """The length of the averaged vector: the model, and the evaluation words if on."""
        size = len(self.model) if self.model is not None else 0
        return size + (EVALUATION_WORDS if self.federation.params.federation_metrics_active else 0)

    def _with_evaluation_words(self, released: np.ndarray, weight: int) -> np.ndarray:
        """``released`` followed by this node's evaluation words, if the federation shares
        them (spec/group.md, "Federation metrics"): ``correct / w``, ``loss_sum / w`` and
        ``n / w`` for the ``n`` test samples of its evaluation of the model it holds, ``w``
        its contribution weight, so that the group's weighted mean of each word is the
        members' sum over their total weight. Zeros with weight 0, or without an
        evaluation of this round's start model (``evaluate_every``, a model just adopted
        from a peer): the figures then describe one model, of one round."""
        if not self.federation.params.federation_metrics_active:
            return released
        words = np.zeros(EVALUATION_WORDS, np.float64)
        evaluated = self._evaluated
        if weight > 0 and evaluated is not None and evaluated[0] == self.round:
            _, metrics, count = evaluated
            accuracy, loss = metrics.get("accuracy"), metrics.get("loss")
            if (
                count > 0
                and accuracy is not None
                and loss is not None
                and math.isfinite(accuracy)
                and math.isfinite(loss)
            ):
                ratio = count / weight
                words[:] = (accuracy * ratio, loss * ratio, ratio)
        peak = float(np.abs(words).max())
        # a word beyond the clip would be clipped alone and skew its ratio: scale all three
        # (this node's evaluation then counts as fewer samples, its figures unchanged)
        limit = self.fixed_point.clip * (1 - 2**-20)  # float32 rounding stays inside
        if peak > limit:
            words *= limit / peak
            if not self._words_scaled:
                self._words_scaled = True
                log.warning(
                    "the evaluation words (test samples per unit of weight %.4g, loss %.4g) "
                    "exceed the federation's clip %g: this node's evaluation counts as %.3g "
                    "of its samples in the federation's figures",
                    words[2] * peak / limit,
                    words[1] / words[2] if words[2] else math.nan,
                    self.fixed_point.clip,
                    limit / peak,
                )
        return np.concatenate([released.astype(np.float32, copy=False), words.astype(np.float32)])

    def _adopt(self, vector: np.ndarray, ring_sum: np.ndarray | None) -> np.ndarray:
        """The model part of an averaged vector; its evaluation words, if any, set
        :attr:`federation_metrics`. ``ring_sum``: the round's whole integer sum (an exact
        round with every step's sum carried), from which the figures are exact and the
        number of samples follows; else they come from the float32 mean."""
        if not self.federation.params.federation_metrics_active:
            return vector
        model, words = vector[:-EVALUATION_WORDS], vector[-EVALUATION_WORDS:]
        figure: dict[str, float] | None = None
        if ring_sum is not None and len(ring_sum) == len(vector) + 1:
            signed = ring_sum[-EVALUATION_WORDS - 1 : -1].view(self.fixed_point.signed_dtype)
            correct, loss_sum, count = (int(v) for v in signed)
            if count > 0:
                figure = {
                    "accuracy": correct / count,
                    "loss": loss_sum / count,
                    "samples": float(round(count / self.fixed_point.scale)),
                }
        else:
            correct_mean, loss_mean, count_mean = (float(v) for v in words)
            if count_mean > 0:
                figure = {"accuracy": correct_mean / count_mean, "loss": loss_mean / count_mean}
        if figure is not None:
            figure["round"] = float(self.round)
            self.federation_metrics = figure
        return model

    def _log_coverage(self, plan: RoundPlan, coverage: int) -> None:
        if plan.sizes and coverage == plan.participants < plan.nodes:
            log.info(
                "round %d was exact over %d of %d nodes (%d sat it out: %d nodes have no "
                "plan of groups of %d to %d)",
                self.round + 1,
                coverage,
                plan.nodes,
                plan.sitting_out,
                plan.nodes,
                self.group_config.group_min,
                self.group_config.group_max,
            )
        elif coverage != plan.nodes:
            log.warning(
                "round %d was not exact: its average covers at most %d of %d nodes (%s)",
                self.round + 1,
                coverage,
                plan.nodes,
                "a class was incomplete" if plan.sizes else "no exact plan for this many nodes",
                extra={"event": "inexact_round", "coverage": coverage, "nodes": plan.nodes},
            )

    async def _catch_up(self) -> None:
        """Adopt a peer's later average: this node was left behind (see
        :meth:`_refresh_position`)."""
        assert self.group is not None
        self._behind = False
        self._act(self.group.withdraw())
        self._round_position = None
        behind = self.round
        await self._sync_model()
        log.warning(
            "this node was at round %d while its peers were further: adopted their "
            "average of round %d (its training of round %d is not used)",
            behind,
            self.round,
            behind,
            extra={"event": "caught_up", "from_round": behind, "to_round": self.round},
        )

    async def _one_group(
        self,
        model: np.ndarray,
        weight: int,
        *,
        initiate: bool,
        position: Position | None = None,
        carried: np.ndarray | None = None,
    ) -> GroupCompleted | SitOut | None:
        assert self.group is not None
        if carried is None and self._distributed_release is not None:
            # the first group after a distributed-DP release gets its noisy ring words
            released, words = self._distributed_release
            self._distributed_release = None
            if model is released and weight == int(words[-1]):
                carried = words
                log.debug("distributed DP: contributing the noisy ring words of this release")
        self.contribution_weight = weight
        self.contribution = model
        self._round_position = position
        self.group.set_contribution(
            model,
            weight,
            self.round,
            trio.current_time(),
            initiate=initiate,
            position=position,
            carried=carried,
        )
        self._announce_position()
        self._wake.set()
        return await self._await_group()

    def _log_round(self, report: RoundReport) -> None:
        metrics = report.metrics
        figure = report.federation
        log.info(
            "round %d done: %s, %.2fs (training %.2fs%s)%s%s",
            report.round,
            f"{report.steps} steps, exact over {report.nodes} nodes"
            if report.nodes and report.coverage == report.nodes
            else f"{report.steps} steps, covering {report.coverage} of {report.nodes} nodes"
            if report.nodes
            else f"{report.steps} random groups, the last of {report.group_size}"
            if report.steps > 1
            else f"group of {report.group_size}",
            report.seconds,
            report.train_seconds,
            f", loss {report.train_loss:.4f}" if report.train_loss is not None else "",
            "".join(f", {k} {v:.4f}" for k, v in sorted(metrics.items())),
            _federation_text(figure),
            extra={
                "event": "round",
                "round": report.round,
                "group_size": report.group_size,
                "steps": report.steps,
                "coverage": report.coverage,
                "nodes": report.nodes,
                "seconds": round(report.seconds, 4),
                "train_seconds": round(report.train_seconds, 4),
                "formation_seconds": round(report.formation_seconds, 4),
                "allreduce_seconds": round(report.allreduce_seconds, 4),
                **(
                    {"train_loss": round(report.train_loss, 6)}
                    if report.train_loss is not None and math.isfinite(report.train_loss)
                    else {}
                ),
                **(
                    {"epsilon_spent": round(report.epsilon_spent, 6)}
                    if report.epsilon_spent is not None
                    else {}
                ),
                **{k: round(v, 6) for k, v in metrics.items()},
                **(
                    {f"federation_{k}": round(v, 6) for k, v in figure.items()}
                    if figure is not None
                    else {}
                ),
            },
        )

    def _server_step(self, start: np.ndarray, average: np.ndarray) -> np.ndarray:
        """The federation's server optimiser on this round's average (fedavg: adopt it)."""
        if self.server_optimizer is None:
            return average
        return self.server_optimizer.step(start, average, round=self.round + 1)

    # -- exact rounds: positions ---------------------------------------------------------

    async def _sit_out(self, sit_out: SitOut) -> None:
        """Sit round ``sit_out.round`` out: withdraw, wait for the participants' average of
        that round, and adopt it (spec/group.md, "Exact rounds", sitting out)."""
        assert self.group is not None
        self._act(self.group.withdraw())
        self._round_position = None
        behind = self.round
        deadline = trio.current_time() + 2 * self.group_config.class_timeout
        while self.round <= behind and trio.current_time() < deadline:
            if self._stop.is_set():
                return
            await self._sync_model(timeout=max(self.options.sync_timeout, 1.0))
            if self.round <= behind:
                await trio.sleep(0.05)
        log.info(
            "sat round %d out (%d of %d nodes take part in a round); %s",
            behind + 1,
            sit_out.participants,
            sit_out.nodes,
            f"adopted its average (round {self.round})"
            if self.round > behind
            else "no peer served its average in time",
            extra={"event": "sat_out", "round": behind + 1},
        )

    def _class_count(self) -> int:
        """The nodes of this node's exact round as it sees them: itself and each connected
        peer that speaks exact rounds (a channel of protocol version 2), whether or not
        its position has arrived yet (a node behind catches up, see
        :meth:`_refresh_position`)."""
        return 1 + sum(
            1
            for peer in self._connected()
            if (links := self._links.get(peer)) and links[0].channel.version >= _POSITION_VERSION
        )

    def _refresh_position(self) -> None:
        """At step 0, keep the announced count of nodes current as peers come and go, and
        notice when this node is behind: a peer is already at a later round (this node
        started late, restarted from an old checkpoint, or was left out of a round), so
        the round it waits for has happened without it; it then adopts a peer's latest
        average instead of holding up the next round."""
        position = self._round_position
        if self.group is None or position is None or position.step != 0:
            return
        count = self._class_count()
        rounds = [
            q.round
            for peer in self._connected()
            if (q := self.group.peer_position(peer)) is not None
        ]
        if (
            self.group.exact_plan(count).sizes
            and self.options.sync_timeout > 0  # adopting peers' models is allowed
            and rounds
            and max(rounds) > position.round
            and self.group.phase is Phase.READY
            and not self._behind
        ):
            self._behind = True
            self._outcomes_send.send_nowait(None)  # wakes the round to catch up
            return
        if count == position.size:
            return
        moved = Position(position.round, 0, (), count)
        if self.group.update_position(moved):
            self._round_position = moved
            self._announce_position()
            self._wake.set()

    def _announce_position(self) -> None:
        """Send this node's position to every connected peer that speaks version 2."""
        position = self._round_position
        if position is None:
            return
        log.debug(
            "position: round %d step %d key %s of %d nodes (%d peers connected)",
            position.round,
            position.step,
            list(position.key),
            position.size,
            len(self._connected()),
        )
        message = _position_message(position)
        for peer in self._connected():
            links = self._links.get(peer)
            if links and links[0].channel.version >= _POSITION_VERSION:
                self._send(peer, message)

    async def _contribution(
        self,
        torch_model: torch.nn.Module,
        data: NodeData | None,
        start: np.ndarray,
        generator: torch.Generator,
        noise_rng: np.random.Generator,
    ) -> tuple[np.ndarray, TrainResult | None, float]:
        """The model this node releases this round, what training reported (None: it did
        not train) and the seconds spent training."""
        params = self.federation.params
        if data is None or self.task is None or not self.options.training:
            return start, None, 0.0
        sigma = params.dp_noise_multiplier
        cost = dp.release_cost(params) if params.dp_enabled else None
        if (
            self.ledger is not None
            and cost is not None
            and self.ledger.would_exceed(
                cost.noise_multiplier, cost.sampling_rate, cost.steps, cost.local_noise_multiplier
            )
        ):
            # out of privacy budget: keep averaging, but never train on the data again
            if not self.budget_exhausted:
                log.warning(
                    "privacy budget exhausted (epsilon %.4g of %.4g spent): this node has "
                    "stopped training and contributes its model unchanged",
                    self.ledger.spent(),
                    self.ledger.epsilon_budget,
                )
            self.budget_exhausted = True
            return start, None, 0.0
        began = trio.current_time()
        context = RoundContext(
            round=self.round,
            local_round=self.local_rounds,
            node_seed=self._rng.getrandbits(63),
        )
        record_level = cost is not None and params.dp_level == "record"
        dp_rng = noise_rng if record_level else None
        trained, result = await self._offload(
            self._train, torch_model, data, start, generator, context, dp_rng
        )
        train_seconds = trio.current_time() - began
        if cost is None:
            return trained, result, train_seconds
        words: np.ndarray | None = None
        if record_level:
            released = trained  # DP-SGD's output is the release: no further noise
        elif params.dp_level == "distributed":
            # a Skellam share of the noise, added in the ring: the words go to the group as
            # they are (spec/privacy.md 2B); `released` is what they decode to
            shares = skellam.DistributedDP(
                clip_norm=params.dp_clip_norm,
                noise_multiplier=sigma,
                group_min=params.group_min,
                model_size=start.shape[0],
                fixed_point=self.fixed_point,
            )
            words, released = shares.encode_release(start, trained - start, noise_rng)
        else:
            noisy = dp.clip_and_noise(trained - start, params.dp_clip_norm, sigma, noise_rng)
            released = (start + noisy).astype(np.float32)
        ledger = self.ledger
        assert ledger is not None
        # durably record the release (and, once, that this identity has released) before
        # the model can leave this node
        if ledger.releases() == 0:
            await self._offload(self._mark_identity)
        await self._offload(
            lambda: ledger.record_release(
                round=self.round,
                noise_multiplier=cost.noise_multiplier,
                sampling_rate=cost.sampling_rate,
                steps=cost.steps,
                local_noise_multiplier=cost.local_noise_multiplier,
            )
        )
        self._distributed_release = None if words is None else (released, words)
        return released, result, train_seconds

    def _train(
        self,
        torch_model: torch.nn.Module,
        data: NodeData,
        start: np.ndarray,
        generator: torch.Generator,
        context: RoundContext,
        dp_rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, TrainResult]:
        """Local training from ``start``: the task's ``train``, or with ``dp_rng`` (record-level
        DP) the federation's DP-SGD steps on the task's data, loss and learning rate."""
        assert self.task is not None
        vector_to_model(torch_model, start)
        config = round_config(self.task, context.round, self.options.task_config)
        if dp_rng is None:
            result = call_train(self.task, torch_model, data, config, generator, context)
            return model_to_vector(torch_model), result
        params = self.federation.params
        _, targets = dp_sgd.training_tensors(data.train)
        report = dp_sgd.dp_sgd(
            torch_model,
            data.train,
            steps=params.dp_steps,
            sampling_rate=params.dp_sample_rate,
            clip_norm=params.dp_clip_norm,
            noise_multiplier=params.dp_noise_multiplier,
            lr=float(config.get("lr", 0.1)),
            rng=dp_rng,
            loss=dp_sgd.task_loss(self.task, targets),
        )
        # the weight stays data-independent (1, spec/privacy.md 2.3): no count is declared
        return model_to_vector(torch_model), TrainResult(samples=report.samples, loss=report.loss)

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
            "federation_metrics": self.federation_metrics,
            "epsilon_spent": self.ledger.spent() if self.ledger else None,
            "groups_completed": self.groups_completed,
            "groups_aborted": self.groups_aborted,
            "bytes_sent": self.traffic()[0],
            "bytes_received": self.traffic()[1],
        }

    def _checkpoint_snapshot(self) -> tuple[Checkpoint, bytes | None]:
        """The checkpoint of the round just completed, and the server optimiser's state
        file of that same moment (copies: the round loop goes on while they are written)."""
        assert self.model is not None
        checkpoint = Checkpoint(
            round=self.round,
            model=self.model.copy(),
            weight=self.weight,
            fingerprint=self.fingerprint,
            trained=self.options.training,
            extra={"local_rounds": self.local_rounds},
        )
        state = self.server_optimizer.encode() if self.server_optimizer is not None else None
        return checkpoint, state

    def _write_checkpoint(self, snapshot: tuple[Checkpoint, bytes | None]) -> None:
        checkpoint, state = snapshot
        save_checkpoint(self.node_dir / CHECKPOINT_FILE_NAME, checkpoint)
        if state is not None:
            atomic_write_bytes(self.node_dir / SERVER_OPTIMIZER_FILE_NAME, state, mode=0o600)

    def _save_checkpoint(self) -> None:
        """Checkpoint the round just completed.

        With worker threads the write (two files, each fsynced with its directory: tens of
        milliseconds on a busy disk) happens beside the next round instead of before it,
        by :meth:`_checkpointer`; a crash loses at most the rounds not yet written, which
        the node re-learns from its peers, while privacy spending is never deferred (the
        ledger is written before each release). Without threads (simnet) it is written
        here, at once."""
        if not self.options.threads:
            self._write_checkpoint(self._checkpoint_snapshot())
            return
        self._checkpoint_pending = self._checkpoint_snapshot()
        self._checkpoint_wanted.set()

    async def _checkpointer(self) -> None:
        """Write the latest pending checkpoint whenever there is one (older ones it
        overtook are skipped: only the newest matters)."""
        while True:
            await self._checkpoint_wanted.wait()
            self._checkpoint_wanted = trio.Event()
            await self._flush_checkpoint()

    async def _flush_checkpoint(self) -> None:
        """Write the pending checkpoint, if any, and wait until it is on disk."""
        async with self._checkpoint_lock:  # one writer: both use the same temporary file
            snapshot, self._checkpoint_pending = self._checkpoint_pending, None
            if snapshot is not None:
                await trio.to_thread.run_sync(self._write_checkpoint, snapshot)

    async def _await_group(self) -> GroupCompleted | SitOut | None:
        """Wait for a completed group (None: stopping); aborted groups are retried."""
        while True:
            outcome = await self._outcomes.receive()
            if outcome is None:
                if self._stop.is_set() or self._behind:
                    return None
                continue  # a wake-up for a catch-up that a completed group overtook
            if isinstance(outcome, SitOut):
                return outcome
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

    async def _settle(self, quiet: float = 1.0) -> None:
        """Exact rounds, before a fresh federation's first round: wait until this node sees
        the federation's ``min_nodes`` (logging what it waits for every 10 s), then until
        its set of peers has stopped changing for ``quiet`` seconds (at most
        ``sync_timeout``), so that the first round is not run by the first few nodes up
        while the others are still connecting (they would only catch up by adopting its
        average)."""
        wanted = self.federation.params.min_nodes
        waiting_since = trio.current_time()
        next_log = waiting_since + 10.0
        while 1 + len(self._connected()) < wanted and not self._stop.is_set():
            now = trio.current_time()
            if now >= next_log:
                log.info(
                    "waiting for the first round: %d of the federation's min_nodes = %d "
                    "nodes connected (%.0f s)",
                    1 + len(self._connected()),
                    wanted,
                    now - waiting_since,
                )
                next_log = now + 10.0
            await trio.sleep(0.05)
        deadline = trio.current_time() + self.options.sync_timeout
        last = set(self._connected())
        changed_at = trio.current_time()
        while trio.current_time() < deadline and not self._stop.is_set():
            await trio.sleep(0.05)
            now, peers = trio.current_time(), set(self._connected())
            if peers != last:
                last, changed_at = peers, now
            elif now - changed_at >= quiet:
                return

    async def _sync_model(self, timeout: float | None = None) -> None:
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
        with trio.move_on_after(self.options.sync_timeout if timeout is None else timeout):
            while not asked or answers < len(asked):
                for peer in self._connected():
                    if peer not in asked:
                        asked.add(peer)
                        self._send(peer, ModelRequest())
                with trio.move_on_after(0.25):
                    state = await receive.receive()
                    answers += 1
                    if state.round > self.round and (best is None or state.round > best.round):
                        best = state
        self._sync = None
        if best is not None:
            self.model = np.frombuffer(best.parameters, dtype="<f4").astype(np.float32)
            self.round = best.round
            if self.server_optimizer is not None:
                # the peer's optimiser state is not transferred: start it from zero
                self.server_optimizer.reset(self.round)
            log.info("adopted the aggregated model of round %d from a peer", best.round)

    # -- the group protocol driver -------------------------------------------------------

    async def _group_loop(self) -> None:
        assert self.group is not None
        while True:
            deadline = self.group.next_deadline()
            self._loop_deadline = min(
                math.inf if deadline is None else deadline, self._give_up_silent_members()
            )
            with trio.move_on_at(self._loop_deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            self._give_up_silent_members()
            # a count that changed while the node was forming a group is announced now
            self._refresh_position()
            eligible = [p for p in self._connected() if not self.peers.is_excluded(p, now)]
            # the loop recomputes its deadline itself: no need to wake itself up again
            self._act(self.group.poll(now, eligible), wake=False)

    def _give_up_silent_members(self) -> float:
        """Give up on each peer of this node's current group (forming, pending or running)
        from which nothing has arrived for LIVENESS_DEADLINE, as if its channel had closed
        (spec/transport.md, section 6): a member cut off silently would otherwise hold the
        group until the all-reduce timeout. Returns when the next of them would go silent."""
        assert self.group is not None
        now = trio.current_time()
        next_silent = math.inf
        for peer in sorted(self.group.busy_with(), key=_id_bytes):
            links = self._links.get(peer)
            if not links:
                continue  # no channel (its loss was handled when it closed)
            silent_at = max(link.channel.last_received for link in links) + LIVENESS_DEADLINE
            if silent_at <= now:
                self._act(self.group.peer_lost(peer, now, silent=True), wake=False)
            else:
                next_silent = min(next_silent, silent_at)
        return next_silent

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
        """Peers with an open channel that are responsive: something arrived from them
        within LIVENESS_DEADLINE (spec/transport.md, section 6). A peer that vanished
        without closing (a cut cable, a router down) drops out within seconds, so group
        formation neither invites it nor waits for it, though its channel lingers until
        the idle timeout; it is back as soon as anything arrives from it again."""
        # sorted by the id bytes directly: NodeId's generated __lt__ is slow, and this
        # runs on every wake of the group loop
        closing = self._closing
        heard_since = trio.current_time() - LIVENESS_DEADLINE
        return sorted(
            (
                peer
                for peer, links in self._links.items()
                if peer not in closing
                and any(link.channel.last_received >= heard_since for link in links)
            ),
            key=_id_bytes,
        )

    def stall_reason(self) -> str | None:
        """Why this node cannot form groups now, or None: too few responsive peers for
        ``group_min``, and what it knows of the others (for the log and the status)."""
        group_min = self.group_config.group_min
        responsive = len(self._connected())
        if self._stop.is_set() or responsive + 1 >= group_min:
            return None
        parts = [
            f"{responsive} responsive peer{'' if responsive == 1 else 's'}, but a group needs "
            f"{group_min} nodes (the federation's group_min)"
        ]
        silent = len(self.unresponsive_peers())
        if silent:
            parts.append(f"{silent} connected but silent for over {LIVENESS_DEADLINE:g} s")
        linked = set(self._links)
        known = [r for r in self.peers.records() if r.node_id not in linked and r.address]
        if known:
            parts.append(f"{len(known)} known but not connected (dialing them with backoff)")
        failing = [e for e in self.bootstrap.entries() if e.state == "failing"]
        for entry in failing[:3]:
            # (its error has warnings of its own: the reason changes with the state only)
            parts.append(f"bootstrap {entry.label} failing")
        if not known and not silent and not failing:
            if not self.config.bootstrap and not self.config.mdns:
                parts.append(
                    "no peer known: mDNS is off and no bootstrap address is configured "
                    "(add --bootstrap HOST:PORT, or bootstrap in config.toml)"
                )
            elif not self.config.bootstrap:
                parts.append(
                    "no peer found by mDNS yet (other nodes must be on this network segment, "
                    "in the same federation; on one machine, mdns_interfaces = ['127.0.0.1'])"
                )
        return "; ".join(parts)

    def _log_stall(self) -> None:
        """Log when the reason the node cannot form groups changes (once per change)."""
        reason = self.stall_reason()
        if reason == self._stall_logged:
            return
        if reason is not None:
            # info, the daemon's default level: a stall is a state, not a fault (its causes,
            # such as a failing bootstrap address, warn on their own)
            log.info("not forming groups: %s", reason, extra={"event": "stalled"})
        elif self._stall_logged is not None:
            log.info("enough responsive peers to form groups again", extra={"event": "unstalled"})
        self._stall_logged = reason

    def unresponsive_peers(self) -> list[NodeId]:
        """Peers with an open channel but nothing received for LIVENESS_DEADLINE."""
        responsive = set(self._connected())
        return sorted(
            (p for p, links in self._links.items() if links and p not in responsive),
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

    def _dial(self, address: tuple[str, int], expect: NodeId | None = None) -> bool:
        """Dial ``address`` in the background (``expect``: the node id claimed there; None
        for a bootstrap address). Returns False if it is being dialed already."""
        if address in self._dialling or self._nursery is None:
            return False
        self._dialling.add(address)
        self._nursery.start_soon(self._connect, address, expect)
        return True

    async def _connect(self, address: tuple[str, int], expect: NodeId | None) -> None:
        """One outgoing connection: connect, handshake, then serve the channel until it
        ends. Never raises (but for cancellation): a failure is a failed dial."""
        host, port = address
        where = format_address(host, port)
        try:
            try:
                stream = await self.network.connect(host, port)
            except OSError as exc:
                # the Network contract: every way a connection attempt fails is an OSError,
                # a timeout included
                log.debug("cannot reach %s: %s", where, exc)
                self._dial_failed(expect, address, exc.strerror or str(exc))
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
                    budget=self.reassembly_budget,
                ) as channel:
                    if expect is not None and channel.peer_id != expect:
                        log.warning(
                            "%s:%d is %s, not %s", host, port, channel.peer_id.short, expect.short
                        )
                    source: PeerSource = "bootstrap" if expect is None else "pex"
                    now = trio.current_time()
                    self.peers.observe(channel.peer_id, host, port, source, now)
                    self._dialling.discard(address)
                    if expect is None:
                        self._bootstrap_reached(address, channel.peer_id, now)
                    await self._serve_channel(channel, initiated=True)
            except RemoteProtocolError as exc:
                # a handshake timeout is one too (HandshakeError); a bootstrap address
                # gets its own warning from _dial_failed
                if expect is not None:
                    log.warning("handshake with %s failed: %s", where, exc)
                self._dial_failed(expect, address, f"handshake failed: {exc}")
            except ChannelClosed:
                pass
        except Exception:
            # Not a failure the code above expects (a bug, or a Network breaking its
            # contract). One connection must not end the node: inbound channels are
            # handled alike (serve_secure_channels logs the error and drops the channel).
            log.exception("connection to %s failed unexpectedly", where)
            self._dial_failed(expect, address, "unexpected error (see the log)")
        finally:
            self._dialling.discard(address)
            if expect is None:
                self.bootstrap.attempt_ended(address)

    def _dial_failed(
        self, expect: NodeId | None, address: tuple[str, int] | None = None, reason: str = ""
    ) -> None:
        """A dial failed: back off from the peer (or from the bootstrap ``address`` when
        ``expect`` is None), and give up on what was queued for it."""
        now = trio.current_time()
        if expect is None:
            if address is not None:
                self._bootstrap_failed(address, reason, now)
            return
        self.peers.record_failure(expect, now)
        if self._queued.pop(expect, None) and self.group is not None:
            self._act(self.group.peer_lost(expect, now))

    @functools.cached_property
    def bootstrap(self) -> BootstrapDialer:
        """The configured bootstrap addresses and how dialing each goes.

        Made on first use (when the node starts connecting), from ``config`` as it is
        then: ``p2pfed node`` replaces the config after construction (``--bootstrap``).
        """
        return BootstrapDialer(parse_host_port(entry) for entry in self.config.bootstrap)

    def bootstrap_summary(self) -> list[dict[str, Any]]:
        """The bootstrap addresses for the status report, in configuration order.

        Each: ``address``, ``state`` (connected, connecting, failing, not connected), ``id``
        (short id of the node reached there, None before a handshake), ``failed_attempts``
        (in a row), and in trio's clock ``failing_since`` and ``next_attempt`` (None when
        not failing, or when connected or being dialed), and the last ``error``.
        """
        self._refresh_bootstrap()
        rows = []
        for entry in self.bootstrap.entries():
            waiting = not entry.connected and not entry.dialling
            rows.append(
                {
                    "address": entry.label,
                    "state": entry.state,
                    "id": entry.node_id.short if entry.node_id is not None else None,
                    "failed_attempts": entry.failures,
                    "failing_since": entry.failing_since,
                    "next_attempt": entry.next_attempt if waiting else None,
                    "error": entry.last_error,
                }
            )
        return rows

    def _refresh_bootstrap(self) -> None:
        """Tell the bootstrap dialer which bootstrap addresses have an open channel."""
        connected = set(self._connected())
        known = {r.address for r in self.peers.records() if r.node_id in connected and r.address}
        self.bootstrap.update_connected(connected, known)

    def _bootstrap_reached(self, address: tuple[str, int], peer: NodeId, now: float) -> None:
        failed = self.bootstrap.attempt_succeeded(address, peer, now)
        if failed:
            log.info(
                "bootstrap %s reachable again (node %s) after %d failed attempts",
                format_address(*address),
                peer.short,
                failed,
            )

    def _bootstrap_failed(self, address: tuple[str, int], reason: str, now: float) -> None:
        delay = self.bootstrap.attempt_failed(address, now, reason)
        if delay is None:
            return  # no attempt in progress: this failure was counted and reported already
        # once per backoff step (each failure starts the next, longer step): an operator
        # sees an address that never answers without a line every few seconds
        log.warning(
            "bootstrap %s unreachable: %s; next attempt in %s",
            format_address(*address),
            reason,
            f"{delay:g} s",
        )

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
            # handshakes are limited per source address (spec/transport.md, section 8):
            # the network knows the address, simnet's virtual streams included
            source_of=self.network.peer_host,
            randbytes=self._randbytes,
            static_key=self._static_key,
            budget=self.reassembly_budget,
            task_status=task_status,  # type: ignore[arg-type]
        )

    @functools.cached_property
    def reassembly_budget(self) -> SharedBudget:
        """The memory all this node's channels may hold in large messages under
        reassembly (spec/transport.md, section 8): twice the largest message a peer has
        reason to send (a masked model, at most 8 bytes a parameter, capped by
        max_message_size) plus 64 MiB. Made on first use, once the model is known."""
        size = len(self.model) if self.model is not None else 0
        largest = min(self.channel_config.max_message_size, 8 * size + (1 << 20))
        return SharedBudget(2 * largest + (64 << 20))

    async def _serve_channel(self, channel: SecureChannel, *, initiated: bool = False) -> None:
        """Run one channel: its writer task, its reader loop, and the bookkeeping."""
        peer = channel.peer_id
        assert self.group is not None
        send, outbox = trio.open_memory_channel[Message](math.inf)
        link = _Link(channel, send, initiated=initiated)
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
        session = link.pex
        grid = self.options.grid.coordinate if self.options.grid is not None else ()
        send.send_nowait(NodeAnnounce(listen_port=self.listen_port, grid=grid))
        if self._round_position is not None and channel.version >= _POSITION_VERSION:
            send.send_nowait(_position_message(self._round_position))
        elif self._pace_round is not None and channel.version >= _POSITION_VERSION:
            send.send_nowait(self._round_message(self._pace_round))
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
                        self._dispatch(peer, message, link)
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
                self.peers.mark_disconnected(peer, trio.current_time())
                self._act(self.group.peer_lost(peer, trio.current_time()))
                self._refresh_position()

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

    def _dispatch(self, peer: NodeId, message: Message, link: _Link) -> None:
        assert self.group is not None
        now = trio.current_time()
        self._last_active[peer] = now
        if isinstance(message, _GROUP_MESSAGES):
            if isinstance(message, GroupInvite):
                self._saw_round(peer, message.round)
            self._act(self.group.receive(peer, message, now))
        elif isinstance(message, GroupPosition):
            self._saw_round(peer, message.round)
            position = Position(message.round, message.step, message.key, message.size)
            self.group.set_peer_position(peer, position)
            self._refresh_position()
            self._wake.set()
        elif isinstance(message, NodeAnnounce):
            self.group.set_peer_grid(peer, message.grid)
            host = self._host_of.get(peer)
            if host and message.listen_port:
                self.peers.observe(peer, host, message.listen_port, "inbound", now)
        elif isinstance(message, PeerExchangeRequest):
            link.pex.request_received(now)
            requester = self._host_of.get(peer)
            reply = build_peer_list(self.peers, message, peer, self._rng, requester)
            # on the channel the request came on: the requester checks it there
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                link.outbox.send_nowait(reply)
        elif isinstance(message, PeerList):
            link.pex.list_received(message)
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
        bootstrap = self.bootstrap
        next_explore: float | None = None  # set when the node first reaches its target
        started = trio.current_time()
        while True:
            now = trio.current_time()
            self.peers.expire(now, max_age=PEER_MAX_AGE)
            connected = set(self._connected())
            self._refresh_bootstrap()
            if now - started >= STALL_GRACE:
                self._log_stall()
            # an unconnected bootstrap address is redialed when its backoff allows
            # (spec/discovery.md sections 3 and 5: 5 s doubling to 600 s), not on every pass
            for entry in bootstrap.due(now):
                if self._dial(entry.address):
                    bootstrap.attempt_started(entry.address, now)
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
            # wake when the next bootstrap attempt is due, so that it happens when the
            # warning said; else within 2 s anyway (a bootstrap address skipped because
            # another dial to it was under way is retried then)
            wait = 2.0
            due = bootstrap.next_attempt_at(now)
            if due is not None:
                wait = min(wait, due - now)
            with trio.move_on_after(wait):
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


def _federation_text(figure: dict[str, float] | None) -> str:
    """The per-round log line's federation part (empty without a figure this round)."""
    if figure is None:
        return ""
    samples = figure.get("samples")
    over = f", over {samples:.0f} samples" if samples is not None else ""
    return (
        f"; federation accuracy {figure['accuracy']:.4f}, loss {figure['loss']:.4f} "
        f"(model of round {figure['round']:.0f}{over})"
    )


def _position_message(position: Position) -> GroupPosition:
    return GroupPosition(
        round=position.round, step=position.step, key=position.key, size=position.size
    )


def federation_seed(federation: Federation) -> int:
    """A seed every member derives alike (for the initial model) from the federation id."""
    digest = hashlib.sha256(b"p2pfed-initial-model:" + federation.federation_id).digest()
    return int.from_bytes(digest[:4], "big")
