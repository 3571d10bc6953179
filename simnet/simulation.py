"""Run a scenario: real :class:`p2pfed.node.Node` objects on a :class:`VirtualNetwork`.

:func:`run_simulation` is the entry point: it builds the world from a
:class:`~simnet.scenario.Scenario`, runs it under ``trio.testing.MockClock(
autojump_threshold=0)`` with deterministic scheduling, and returns the per-round metrics.
Everything random derives from the scenario seed through :func:`derive_seed` (identities,
the federation, every node's ``rng`` and ``randbytes``, the network, churn), so the same
scenario gives the same metrics, byte for byte.

Rules of this file:

* **Rounds.** Nodes progress asynchronously. Global round ``r`` is complete when every
  live node has completed at least ``r`` rounds; at that moment one metrics row is taken
  from all live nodes' current models. A node's round counts the groups it completed (it
  adopts a peer's round only in the late-joiner sync of a fresh node), so the global round
  waits for the slowest live node, e.g. one restarted from an older checkpoint; rows skip
  a number only when that node leaves the live set or a fresh node syncs. The run ends
  when global round
  ``scenario.rounds`` is complete and no join is pending, or at ``scenario.duration``.
  Then every node is halted at once (its connections reset, its tasks cancelled; it
  still writes its last checkpoint): no node leaves gracefully, and the summary's
  counters (bytes, chunks, resets, groups) are those of the moment the run ended.
* **Crash** (scheduled or churn): the host goes down in the network (its streams reset)
  and the node's tasks are cancelled at once; nothing of its shutdown code reaches the
  network. **Vanish** (scheduled): the same, but silently (:meth:`VirtualNetwork.vanish`:
  no reset, connects time out); it counts as a crash. **Restart**: a new ``Node`` on the
  same identity and directory (checkpoint and privacy ledger resume), with fresh random
  streams. **Stop**: ``request_stop()``, a
  clean leave.
* The conservation audit (:class:`simnet.checks.GroupAudit`) runs when training is off:
  it records what each member offered (``node.contribution`` with
  ``node.contribution_weight``).
* **Fault watches** (only when ``[checks]`` asks for ``pace``, ``detect_within`` or
  ``merged``): for each vanish event and each partition the run records every node's
  round times, when each other node stopped counting the cut-off peers as responsive
  (``Node.connected_peers``, looked at every ``TICK``), and the groups that span the
  sides after a heal; ``summary["faults"]`` holds what :func:`simnet.checks.run_checks`
  judges.
* **Per-round churn** (``[churn] model = "per-round"``): each time the median round of the
  live nodes advances, ``per_round`` of the churn-subject nodes (drawn from the live ones)
  crash; each restarts ``downtime_rounds`` median rounds later (0: after an exponential
  downtime of mean ``mean_downtime``).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import trio
import trio.testing

from p2pfed.config import DEFAULT_PORT, NodeConfig
from p2pfed.federation import Federation
from p2pfed.fixedpoint import FixedPointParams
from p2pfed.group import GridPosition, GroupAborted, GroupCompleted, GroupConfig, Phase
from p2pfed.identity import NodeId, NodeIdentity
from p2pfed.model_vector import model_to_vector
from p2pfed.node import Node, NodeOptions, RoundReport
from p2pfed.round_rules import fixed_point_of, ring_cap, task_settings, training_weight
from p2pfed.task import Task, load_task
from simnet.checks import (
    QUANTILES,
    Check,
    GroupAudit,
    Observed,
    consensus_distance,
    consensus_distances,
    conservation_tolerance,
    distance_to,
    pace_rate,
    range_excess,
    run_checks,
    spread,
    weighted_mean,
    why_failed,
)
from simnet.determinism import deterministic_scheduling
from simnet.network import NetworkStats, VirtualNetwork
from simnet.scenario import PartitionSpec, Scenario
from simnet.tasks import BUILTIN_TASKS
from simnet.topology import (
    Topology,
    build_topology,
    grid_coordinate,
    grid_mates,
    load_topology_file,
)

__all__ = [
    "ROW_FIELDS",
    "Simulation",
    "SimulationResult",
    "derive_seed",
    "host_address",
    "run_simulation",
]

log = logging.getLogger("simnet")

ROW_FIELDS = (
    "round",
    "time",
    "live_nodes",
    "round_median",
    "consensus_max",
    "consensus_mean",
    "target_distance_max",
    "range_excess_max",
    "loss_mean",
    "accuracy_mean",
    "bytes",
    "chunks",
    "groups_completed",
    "groups_aborted",
    "conservation_error_max",
    "epsilon_max",
    "crashes",
    "restarts",
    # appended later (older files end at "restarts"): the spread over the live nodes
    *(f"{metric}_{name}" for metric in ("loss", "accuracy") for name, _ in QUANTILES),
    *(f"consensus_{name}" for name, _ in QUANTILES if name != "max"),
    # appended later still: the federation-wide figures (spec/group.md, "Federation metrics")
    "federation_accuracy",
    "federation_loss",
)
"""Columns of a metrics row (``None``/empty where not applicable). ``loss_p10`` etc.: the
:data:`~simnet.checks.QUANTILES` over the live nodes' last evaluation; ``consensus_p10``
etc.: of their distances to the mean model (``consensus_max`` is the largest).
``federation_accuracy`` and ``federation_loss``: the federation's figures of the previous
round's model, as the live nodes learnt them under secure aggregation
(``Node.federation_metrics``; their mean over the nodes)."""


TICK = 0.25
"""Simulated seconds between the run's own looks at the nodes' rounds (see ``_tick``)."""


def derive_seed(seed: int, *labels: object) -> int:
    """A 64-bit seed for one purpose, derived from the scenario seed and labels.

    >>> derive_seed(1, "node", 3) == derive_seed(1, "node", 3) != derive_seed(1, "node", 4)
    True
    """
    text = "\x00".join([str(seed), *(str(label) for label in labels)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _derive_bytes(seed: int, *labels: object) -> bytes:
    text = "\x00".join(["bytes", str(seed), *(str(label) for label in labels)])
    return hashlib.sha256(text.encode()).digest()


def host_address(index: int) -> str:
    """The simulated IP address of node ``index`` (10.0.0.1, 10.0.0.2, ...).

    >>> host_address(0), host_address(256)
    ('10.0.0.1', '10.0.1.1')
    """
    value = index + 1
    return f"10.{(value >> 16) & 255}.{(value >> 8) & 255}.{value & 255}"


@dataclass
class _Slot:
    index: int
    host: str
    identity: NodeIdentity
    node_dir: Path
    node: Node | None = None
    scope: trio.CancelScope | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    live: bool = False
    restarting: bool = False
    incarnation: int = 0


@dataclass
class _FaultWatch:
    """One vanish or partition the fault checks judge (see the module rules)."""

    label: str
    kind: str  # "vanish" | "partition"
    start: float
    sides: list[tuple[int, ...]]
    """The nodes that stay on the network, by side (a vanish: one side, the others)."""
    gone: tuple[int, ...] = ()
    """Vanished nodes (not on any side)."""
    lost: dict[int, frozenset[NodeId]] = field(default_factory=dict)
    """Each observing node: the peers it can no longer hear from."""
    detected: dict[int, float] = field(default_factory=dict)
    end: float | None = None
    """When the fault ended (heal, restart); ``None``: it lasted to the end of the run."""
    side_of: dict[NodeId, int] = field(default_factory=dict)
    cross_groups: set[bytes] = field(default_factory=set)
    """Groups spanning two sides that completed after the heal."""
    gap_at_heal: float | None = None
    """The largest distance between two sides' mean models as the partition healed."""


@dataclass
class SimulationResult:
    """What a run produced; ``rows`` and ``summary`` are what the metrics files hold."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    nodes: list[Node]
    """The last incarnation of every node that ever started."""
    stats: NetworkStats
    audit: GroupAudit
    restarted: list[dict[str, Any]]
    """Each restart: time, node index, ``round_at_crash`` and ``round`` (resumed at)."""
    wall_seconds: float
    """Not part of the metrics (it differs from run to run)."""
    checks: list[Check] = field(default_factory=list)
    """The verdicts of :func:`simnet.checks.run_checks` (also in ``summary["checks"]``)."""
    stop_seconds: float = 0.0
    """Wall seconds from the end of the run until every node had stopped (not metrics)."""


class Simulation:
    """One run of a scenario (see the module docstring). Use :func:`run_simulation`."""

    def __init__(
        self,
        scenario: Scenario,
        work_dir: Path,
        *,
        progress: Callable[[dict[str, Any]], None] | None = None,
        task: Task | None = None,
        wall_limit: float | None = None,
    ) -> None:
        self.scenario = scenario
        self.wall_limit = wall_limit
        self.wall_limited = False
        self.work_dir = Path(work_dir)
        self.progress = progress
        self.topology = _topology(scenario)
        self.n = self.topology.n
        if scenario.nodes.count and scenario.nodes.count != self.n:
            raise ValueError(
                f"[nodes] count is {scenario.nodes.count} but the topology file has {self.n} nodes"
            )
        seed = scenario.seed
        self.rng = random.Random(derive_seed(seed, "simulation"))
        self.task = task or load_task(BUILTIN_TASKS.get(scenario.task.name, scenario.task.name))
        self.federation = _federation(scenario)
        link = scenario.link.params()
        self.network = VirtualNetwork(
            rng=random.Random(derive_seed(seed, "network")),
            default_link=link,
            routing=scenario.topology.routing,  # type: ignore[arg-type]
        )
        uplink = scenario.nodes.uplink_mbit * 1e6 / 8
        lan = scenario.nodes.lan_size
        self.slots: list[_Slot] = []
        for index in range(self.n):
            host = host_address(index)
            self.network.add_host(
                host, segment=f"lan{index // lan}" if lan else None, uplink=uplink
            )
            node_dir = self.work_dir / f"node{index:05d}"
            node_dir.mkdir(parents=True, exist_ok=True)
            identity = NodeIdentity.from_private_bytes(_derive_bytes(seed, "identity", index))
            self.slots.append(_Slot(index, host, identity, node_dir))
        if self.topology.edges is not None:
            for number, (a, b) in enumerate(self.topology.edges):
                self.network.add_link(
                    host_address(a), host_address(b), self.topology.link_params(number, link)
                )
        self.bootstrap = self._bootstrap_lists()
        self.joins_pending = {i for e in scenario.events if e.action == "join" for i in e.nodes}
        # scheduled events and partitions not yet played out: the run waits for them
        self.scheduled = len(scenario.events) + len(scenario.partitions)
        # -- metrics state
        self.rows: list[dict[str, Any]] = []
        protocol = scenario.protocol
        self.fixed_point = FixedPointParams.for_federation(
            protocol.fixed_point_bits, protocol.clip, protocol.group_max
        )
        self.audit = GroupAudit(tolerance=conservation_tolerance(self.fixed_point))
        self.completed_groups: set[bytes] = set()
        self.aborted_groups: set[bytes] = set()
        self.crashes = 0
        self.restarts = 0
        self.restarted: list[dict[str, Any]] = []
        self.last_row_round = 0
        self._slowest_round = 0  # the slowest live node's round at the last scan
        self._at_slowest = 0  # how many live nodes were at it and have not reported since
        self.collections = _FullCollections()  # entered by run_simulation for the run
        self.target: np.ndarray | None = None
        self.initial_range: tuple[np.ndarray, np.ndarray] | None = None
        self.initial_consensus: float | None = None
        self.range_excess_max = 0.0
        self.churn_round = 0  # per-round churn: the median round it last acted on
        self.churn_pool: set[int] = set()
        self.churn_restarts: dict[int, list[_Slot]] = {}  # median round -> restart then
        self.churn_rng = random.Random(derive_seed(seed, "churn-rounds"))
        self.final_live: list[tuple[int, np.ndarray]] = []
        self.final_metrics: list[dict[str, float]] = []
        # what the end-of-run diagnosis (checks.why_failed) looks at besides the rows
        self.partition_now: tuple[float, float | None, tuple[tuple[int, ...], ...]] | None = None
        self.fewest_live: tuple[float, int] | None = None
        self.last_group_time: float | None = None
        self.observed = Observed(live_rounds={}, open_channels={})
        checks = scenario.checks
        # fault checks: only when asked for (nothing of this touches an rng or the network)
        self.watching = bool(checks.pace or checks.detect_within or checks.merged)
        self.watches: list[_FaultWatch] = []
        self.round_times: dict[int, list[float]] = {}
        self.cut_sides = [
            self._cut_sides(number, p.cut) if p.cut else None
            for number, p in enumerate(scenario.partitions)
        ]
        self.ending = False
        self.end_counts: _EndCounts | None = None  # the summary's counters, as the run ended
        self.done = trio.Event()

    # -- construction ----------------------------------------------------------------------

    def _cut_sides(self, number: int, cut: tuple[tuple[int, int], ...]) -> list[list[int]]:
        """The sides a partition's ``cut`` leaves: the topology's connected components
        without the cut edges."""
        where = f"[[partitions]] #{number + 1}"
        edges = self.topology.edges
        if edges is None:
            raise ValueError(
                f'{where}: cut needs a topology with edges (kind = "file" or a graph '
                "family); the complete topology has no edge whose loss separates anything"
            )
        present = {frozenset(e) for e in edges}
        for a, b in cut:
            if frozenset((a, b)) not in present:
                raise ValueError(f"{where}: cut names edge [{a}, {b}], not in the topology")
        removed = {frozenset(e) for e in cut}
        adjacency: list[list[int]] = [[] for _ in range(self.n)]
        for a, b in edges:
            if frozenset((a, b)) not in removed:
                adjacency[a].append(b)
                adjacency[b].append(a)
        component = [-1] * self.n
        sides: list[list[int]] = []
        for root in range(self.n):
            if component[root] >= 0:
                continue
            component[root] = len(sides)
            side, stack = [root], [root]
            while stack:
                for there in adjacency[stack.pop()]:
                    if component[there] < 0:
                        component[there] = len(sides)
                        side.append(there)
                        stack.append(there)
            sides.append(sorted(side))
        if len(sides) < 2:
            raise ValueError(
                f"{where}: without the cut edges the topology is still connected: "
                "nothing is cut (cut every link between the sides)"
            )
        return sides

    def _grid(self, index: int) -> GridPosition | None:
        protocol = self.scenario.protocol
        if protocol.grouping != "grid":
            return None
        side, dims = protocol.grid_side, protocol.grid_dims
        return GridPosition(side, grid_coordinate(index, side, dims))

    def _bootstrap_lists(self) -> list[tuple[str, ...]]:
        protocol = self.scenario.protocol
        if protocol.grouping == "grid":
            # grid grouping: every node dials its grid mates of lower index, so each pair
            # of mates shares one channel (both dialling would open two)
            side, dims = protocol.grid_side, protocol.grid_dims
            if side**dims != self.n:
                raise ValueError(f"a grid of {side}^{dims} nodes cannot hold {self.n} nodes")
            return [
                tuple(
                    f"{host_address(j)}:{DEFAULT_PORT}"
                    for j in grid_mates(index, side, dims)
                    if j < index
                )
                for index in range(self.n)
            ]
        mode = self.scenario.nodes.bootstrap
        count = self.scenario.nodes.bootstrap_count
        neighbours = self.topology.neighbours() if mode == "neighbors" else []
        lists: list[tuple[str, ...]] = []
        for index in range(self.n):
            if mode == "first":
                chosen = [0] if index else []
            elif mode == "neighbors":
                pool = neighbours[index]
                chosen = sorted(self.rng.sample(pool, min(count, len(pool))))
            else:
                chosen = []
            lists.append(tuple(f"{host_address(j)}:{DEFAULT_PORT}" for j in chosen))
        return lists

    def _task_config(self, index: int) -> dict[str, Any]:
        return {**self.scenario.task.settings, "node_index": index, "num_nodes": self.n}

    def _make_node(self, slot: _Slot) -> Node:
        sc = self.scenario
        protocol = sc.protocol
        config = NodeConfig(
            listen_host=slot.host,
            listen_port=DEFAULT_PORT,
            bootstrap=self.bootstrap[slot.index],
            mdns=sc.nodes.lan_size > 0,
            handshake_timeout=protocol.handshake_timeout,
            keepalive_interval=protocol.keepalive_interval,
            idle_timeout=protocol.idle_timeout,
            send_timeout=protocol.send_timeout,
        )
        # the scenario's [protocol] table names every GroupConfig field alike
        group = GroupConfig(**{f.name: getattr(protocol, f.name) for f in fields(GroupConfig)})
        options = NodeOptions(
            training=sc.task.training,
            max_rounds=sc.rounds,
            linger=True,
            linger_passive=True,  # finished nodes help laggards, not each other
            task_config=self._task_config(slot.index),
            target_peers=sc.nodes.target_peers,
            group=group,
            evaluate_every=sc.task.evaluate_every,
            sync_timeout=protocol.sync_timeout,
            threads=False,
            masking=protocol.masking,
            grid=self._grid(slot.index),
        )
        labels = (slot.index, slot.incarnation)
        randbytes = random.Random(derive_seed(sc.seed, "randbytes", *labels)).randbytes
        node = Node(
            identity=slot.identity,
            federation=self.federation,
            config=config,
            node_dir=slot.node_dir,
            network=self.network.network_for(slot.host),
            task=self.task,
            options=options,
            randbytes=randbytes,
            rng=random.Random(derive_seed(sc.seed, "rng", *labels)),
            on_round=lambda report: self._on_round(slot, report),
            on_group=lambda outcome, seconds: self._on_group(slot, outcome),
        )
        return node

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> SimulationResult:
        """Run the scenario; must be called inside ``trio.run`` with a ``MockClock``."""
        began = time.perf_counter()
        sc = self.scenario
        if not sc.task.training:
            self.target = self._push_sum_target()
        async with trio.open_nursery() as world:
            self.network.start(world)
            self.world = world
            if self.wall_limit is not None:
                world.start_soon(self._watch_wall, began + self.wall_limit)
            for slot in self.slots:
                if slot.index not in self.joins_pending:
                    await self._start(slot)
            for event in sorted(sc.events, key=lambda e: e.at):
                world.start_soon(self._event, event)
            for number, partition in enumerate(sc.partitions):
                world.start_soon(self._partition, number, partition)
            if sc.churn.model != "none":
                self._start_churn(world)
            self._check_progress()
            world.start_soon(self._tick)
            with trio.move_on_at(sc.duration):
                await self.done.wait()
            self.ended_at = trio.current_time()
            self.ending = True  # also when `duration` ended the run: no rows, no more churn
            # the live nodes' models as the run ends
            self.final_live = [
                (s.index, s.node.model)
                for s in self._live()
                if s.node is not None and s.node.model is not None
            ]
            self.final_metrics = [
                dict(s.node.last_metrics) for s in self._live() if s.node is not None
            ]
            self.observed = self._observe()
            self._halt_all(world)
            halted = time.perf_counter()
        stopped = time.perf_counter()
        result = self._result(stopped - began)
        result.stop_seconds = stopped - halted
        return result

    async def _tick(self) -> None:
        """Look at the rounds every ``TICK`` simulated seconds, not only when a group
        completes: a fresh node's late-joiner sync adopts a peer's round without one, and
        may be the last progress of the run (the others done and waiting passively)."""
        while True:
            await trio.sleep(TICK)
            self.collections.check()
            if self.watching:
                self._watch_detection()
            self._check_progress()
            if self.churn_pool:
                self._round_churn()

    async def _watch_wall(self, deadline: float) -> None:
        """Benchmarks only: end the run after a wall-clock budget (not reproducible)."""
        # virtual seconds: a run of thousands of nodes does only a few ms per wall second
        while not self.done.is_set() and time.perf_counter() < deadline:
            await trio.sleep(0.001)
        if self.done.is_set():
            # the goal was reached first (this task may wake only after the deadline: the
            # nodes' stopping can take wall seconds without advancing the clock), and
            # stopping the nodes is not timed
            return
        self.wall_limited = True
        self.done.set()

    async def _start(self, slot: _Slot) -> None:
        if self.done.is_set() or self.ending:
            return
        slot.node = self._make_node(slot)
        slot.exited = trio.Event()
        await self.world.start(self._run_node, slot)
        slot.live = True
        self.joins_pending.discard(slot.index)

    async def _run_node(self, slot: _Slot, *, task_status: trio.TaskStatus[int]) -> None:
        assert slot.node is not None
        try:
            with trio.CancelScope() as scope:
                slot.scope = scope
                await slot.node.run(task_status=task_status)
        finally:
            slot.live = False
            slot.exited.set()
            self._check_progress()

    def _crash(self, slot: _Slot, *, silent: bool = False) -> None:
        if not slot.live or slot.scope is None or self.done.is_set() or self.ending:
            return
        if silent:
            self.network.vanish(slot.host)
        else:
            self.network.crash(slot.host)
        slot.scope.cancel()
        slot.live = False
        self.crashes += 1
        self._check_progress()

    async def _restart(self, slot: _Slot) -> None:
        if slot.live or slot.restarting or self.done.is_set() or self.ending:
            return  # an event and the churn may both ask: restart once; none when ending
        slot.restarting = True
        try:
            await self._restart_now(slot)
        finally:
            slot.restarting = False

    async def _restart_now(self, slot: _Slot) -> None:
        await slot.exited.wait()
        self.network.restore(slot.host)
        slot.incarnation += 1
        self.restarts += 1
        crashed_at = slot.node.round if slot.node is not None else 0
        for watch in self.watches:
            if slot.index in watch.gone and watch.end is None:
                watch.end = trio.current_time()  # the vanished node is back
        await self._start(slot)
        assert slot.node is not None
        self.restarted.append(
            {
                "time": trio.current_time(),
                "node": slot.index,
                "round_at_crash": crashed_at,
                "round": slot.node.round,
            }
        )

    def _halt_all(self, world: trio.Nursery) -> None:
        """End the run at once: every connection reset, every node cancelled.

        What the run produced was recorded before this (rows, the final models, the
        observations); the counters of the summary are taken now, so nothing of the
        teardown (the resets, the groups that abort as their links go) is counted. A
        graceful leave of every node (a Close per channel, each lingering for the peer's
        hang-up) cost about 70 s of wall time at 1000 nodes and changed no result. Each
        node still writes its last checkpoint (shielded in ``Node.run``).
        """
        self.end_counts = _EndCounts(
            replace(self.network.stats), len(self.completed_groups), len(self.aborted_groups)
        )
        # the channels go without a Close (none could arrive), and no node reacts to the
        # loss of its peers: tearing down ~60 channels per node is then only unwinding
        for slot in self.slots:
            if slot.node is not None:
                slot.node.channels.abandon(streams_reset=True)
        self.network.halt()
        world.cancel_scope.cancel()

    async def _event(self, event: Any) -> None:
        await trio.sleep_until(event.at)
        targets = list(event.nodes)
        if event.fraction is not None:
            if event.action in ("crash", "stop", "vanish"):
                pool = [s.index for s in self.slots if s.live]
            else:
                pool = [s.index for s in self.slots if not s.live]
            targets += sorted(self.rng.sample(pool, round(event.fraction * len(pool))))
        for index in targets:
            if not 0 <= index < self.n:
                raise ValueError(f"event at {event.at}: there is no node {index} (n = {self.n})")
            slot = self.slots[index]
            if event.in_group:
                await self._until_running(slot)
            if event.action == "crash":
                self._crash(slot)
            elif event.action == "vanish":
                self._crash(slot, silent=True)
            elif event.action == "stop":
                if slot.live and slot.node is not None:
                    slot.node.request_stop()
            elif event.action in ("restart", "join"):
                if slot.node is None:
                    await self._start(slot)
                else:
                    await self._restart(slot)
        if event.action == "vanish" and self.watching:
            gone = tuple(sorted(set(targets)))
            self._watch(
                f"vanish of {_node_list(gone)} at t={round(trio.current_time(), 2):g}s",
                "vanish",
                [tuple(s.index for s in self._live() if s.index not in gone)],
                gone,
            )
        self.scheduled -= 1
        self._check_progress()

    async def _until_running(self, slot: _Slot) -> None:
        """Wait until the node is in an all-reduce (``in_group``; checked every 10 ms)."""
        while slot.live and slot.node is not None and not self.ending:
            group = slot.node.group
            if group is not None and group.phase is Phase.RUNNING:
                return
            await trio.sleep(0.01)

    async def _partition(self, number: int, spec: PartitionSpec) -> None:
        await trio.sleep_until(spec.start)
        sides = [list(group) for group in spec.groups]
        if spec.split is not None:
            sides.append(sorted(self.rng.sample(range(self.n), round(spec.split * self.n))))
        cut_sides = self.cut_sides[number]
        if cut_sides is not None:
            sides = cut_sides[:-1]  # the last component is "the rest"
        groups = [[host_address(i) for i in side] for side in sides]
        self.network.partition(groups, mode=spec.mode)  # type: ignore[arg-type]
        named = {i for side in sides for i in side}
        rest = tuple(i for i in range(self.n) if i not in named)
        self.partition_now = (
            spec.start,
            spec.end,
            tuple(tuple(side) for side in sides) + ((rest,) if rest else ()),
        )
        log.info("partition %d at %.1fs", number, trio.current_time())
        watch = None
        if self.watching:
            everyone = [tuple(side) for side in self.partition_now[2]]
            watch = self._watch(
                f"partition {number + 1} at t={spec.start:g}s", "partition", everyone, ()
            )
        if spec.end is not None:
            await trio.sleep_until(spec.end)
            self.network.heal()
            if watch is not None:
                watch.end = trio.current_time()
                live = [(s.index, s.node.model) for s in self._live() if s.node is not None]
                watch.gap_at_heal = _side_gap(watch.sides, live)
            self.partition_now = None
            log.info("partition %d healed at %.1fs", number, trio.current_time())
        self.scheduled -= 1
        self._check_progress()

    def _start_churn(self, world: trio.Nursery) -> None:
        churn = self.scenario.churn
        count = round(churn.fraction * self.n)
        chosen = sorted(self.rng.sample(range(self.n), count))
        if churn.model == "per-round":
            self.churn_pool = set(chosen)  # _round_churn acts as rounds complete
            return
        for index in chosen:
            rng = random.Random(derive_seed(self.scenario.seed, "churn", index))
            world.start_soon(self._churn_loop, self.slots[index], rng)

    async def _churn_loop(self, slot: _Slot, rng: random.Random) -> None:
        churn = self.scenario.churn
        await trio.sleep_until(churn.start)
        while True:
            if churn.model == "weibull":
                session = rng.weibullvariate(churn.weibull_scale, churn.weibull_shape)
            else:
                session = rng.expovariate(1 / churn.mean_session)
            await trio.sleep(session)
            self._crash(slot)
            if churn.mean_downtime <= 0:
                return
            await trio.sleep(rng.expovariate(1 / churn.mean_downtime))
            await self._restart(slot)

    def _round_churn(self) -> None:
        """Per-round churn: crash ``per_round`` of the subject nodes per median round."""
        churn = self.scenario.churn
        live = self._live()
        if not live or self.done.is_set() or self.ending:
            return
        rounds = sorted(s.node.round for s in live if s.node is not None)
        median = rounds[len(rounds) // 2]
        while self.churn_round < median:
            self.churn_round += 1
            for slot in self.churn_restarts.pop(self.churn_round, []):
                self.world.start_soon(self._restart, slot)
            if trio.current_time() < churn.start:
                continue
            pool = [s.index for s in self._live() if s.index in self.churn_pool]
            count = min(len(pool), round(churn.per_round * len(self.churn_pool)))
            for index in sorted(self.churn_rng.sample(pool, count)):
                slot = self.slots[index]
                self._crash(slot)
                if churn.downtime_rounds > 0:
                    due = self.churn_round + churn.downtime_rounds
                    self.churn_restarts.setdefault(due, []).append(slot)
                elif churn.mean_downtime > 0:
                    downtime = self.churn_rng.expovariate(1 / churn.mean_downtime)
                    self.world.start_soon(self._restart_after, slot, downtime)

    async def _restart_after(self, slot: _Slot, delay: float) -> None:
        await trio.sleep(delay)
        await self._restart(slot)

    # -- metrics ---------------------------------------------------------------------------

    def _push_sum_target(self) -> np.ndarray:
        """The sample-weighted mean of every node's initial model (pure averaging's limit)."""
        models, weights = [], []
        # the node's own rules (p2pfed.round_rules): its task settings, with the
        # federation's seed, and the integer weight its initial model carries
        ring = fixed_point_of(self.federation, self.scenario.protocol.group_max)
        cap = functools.partial(ring_cap, ring)
        for slot in self.slots:
            config = task_settings(self.federation, self._task_config(slot.index))
            models.append(model_to_vector(self.task.build_model(config)))
            num_train = self.task.load_data(config).num_train
            weights.append(training_weight(self.federation, num_train, cap))
        # every model pure averaging produces is a convex combination of these
        stacked = np.stack(models)
        self.initial_range = (stacked.min(axis=0), stacked.max(axis=0))
        self.initial_consensus = consensus_distance(models)[0]
        return weighted_mean(models, weights)

    def _on_round(self, slot: _Slot, report: RoundReport) -> None:
        if self.watching:
            self.round_times.setdefault(slot.index, []).append(trio.current_time())
        # the slowest live node's round (what a row and the end wait for) moves only when
        # the last node at it advances: counting those down instead of scanning every
        # node on every report keeps this linear, not quadratic, in the node count (any
        # other change of the live set or of a round rescans: starts, exits, the tick)
        if report.round - 1 == self._slowest_round:
            self._at_slowest -= 1
            if self._at_slowest <= 0:
                self._check_progress()
        if self.churn_pool:
            self._round_churn()

    def _on_group(self, slot: _Slot, outcome: GroupCompleted | GroupAborted) -> None:
        if isinstance(outcome, GroupAborted):
            self.aborted_groups.add(outcome.group_id)
            return
        self.completed_groups.add(outcome.group_id)
        self.last_group_time = trio.current_time()
        for watch in self.watches:
            if watch.kind == "partition" and watch.end is not None:
                sides = {watch.side_of.get(member, -1) for member in outcome.members}
                if len(sides) > 1:
                    watch.cross_groups.add(outcome.group_id)
        node = slot.node
        # on_group runs before the node uses the outcome (GroupDriver.on_group): the
        # node's contribution is still the one this group averaged
        if not self.scenario.task.training and node is not None and node.contribution is not None:
            self.audit.record(node.node_id, outcome, node.contribution, node.contribution_weight)

    # -- fault watches (pace, detection, merging) -------------------------------------------

    def _watch(
        self, label: str, kind: str, sides: list[tuple[int, ...]], gone: tuple[int, ...]
    ) -> _FaultWatch:
        watch = _FaultWatch(label, kind, trio.current_time(), sides, gone)
        ids = [slot.identity.node_id for slot in self.slots]
        for number, side in enumerate(sides):
            for index in side:
                watch.side_of[ids[index]] = number
        live = {s.index for s in self._live()}
        for number, side in enumerate(sides):
            others = frozenset(ids[i] for i in gone) | frozenset(
                ids[i] for k, other in enumerate(sides) if k != number for i in other
            )
            for index in side:
                if index in live:
                    watch.lost[index] = others
        self.watches.append(watch)
        self._watch_detection()
        return watch

    def _watch_detection(self) -> None:
        """Note when each observer stopped counting its lost peers as responsive."""
        now = trio.current_time()
        for watch in self.watches:
            if watch.end is not None or len(watch.detected) == len(watch.lost):
                continue
            for index, lost in watch.lost.items():
                if index in watch.detected:
                    continue
                node = self.slots[index].node
                if node is None or not self.slots[index].live:
                    continue
                if lost.isdisjoint(node.connected_peers()):
                    watch.detected[index] = now

    def _fault_summary(self) -> list[dict[str, Any]]:
        """``summary["faults"]``: what the fault checks judge, one entry per watch."""
        checks = self.scenario.checks
        faults = []
        for watch in self.watches:
            end = self.ended_at if watch.end is None else min(watch.end, self.ended_at)
            before = (max(0.0, watch.start - checks.pace_window), watch.start)
            during = (watch.start + checks.pace_grace, end)
            sides = []
            for side in watch.sides:
                nodes = [i for i in side if i in watch.lost]  # live at the fault
                each = {i: pace_rate(self.round_times, [i], *during) for i in nodes}
                slowest = min(nodes, key=lambda i: each[i] or 0.0, default=None)
                sides.append(
                    {
                        "nodes": list(side),
                        "live": len(nodes),
                        "rate_before": pace_rate(self.round_times, nodes, *before),
                        "rate_during": pace_rate(self.round_times, nodes, *during),
                        "slowest_node": slowest,
                        "slowest_rate_during": None if slowest is None else each[slowest],
                    }
                )
            undetected = sorted(set(watch.lost) - set(watch.detected))
            detected_after = (
                round(max(watch.detected.values()) - watch.start, 6)
                if watch.detected and not undetected
                else None
            )
            faults.append(
                {
                    "fault": watch.label,
                    "kind": watch.kind,
                    "start": round(watch.start, 6),
                    "end": round(end, 6),
                    "healed": watch.kind == "partition" and watch.end is not None,
                    "before": [round(t, 6) for t in before],
                    "during": [round(t, 6) for t in during],
                    "sides": sides,
                    "detected_after": detected_after,
                    "undetected": undetected,
                    "cross_groups_after_heal": (
                        len(watch.cross_groups) if watch.kind == "partition" else None
                    ),
                    "side_gap_at_heal": watch.gap_at_heal,
                    "side_gap_at_end": (
                        _side_gap(watch.sides, self.final_live) if watch.end is not None else None
                    ),
                }
            )
        return faults

    def _live(self) -> list[_Slot]:
        return [s for s in self.slots if s.live and s.node is not None]

    def _check_progress(self) -> None:
        if self.done.is_set() or self.ending:
            return  # stopping: nodes leave, rows would describe the shutdown
        live = self._live()
        now = trio.current_time()
        if now > 0 and (self.fewest_live is None or len(live) < self.fewest_live[1]):
            self.fewest_live = (round(now, 6), len(live))
        if not live:
            return
        rounds = [s.node.round for s in live if s.node is not None]
        reached = min(rounds)
        self._slowest_round, self._at_slowest = reached, rounds.count(reached)
        if reached > self.last_row_round:
            self.last_row_round = reached
            self._row(reached, live)
        goal = self.scenario.rounds
        if goal is not None and reached >= goal and not self.joins_pending and not self.scheduled:
            self.done.set()

    def _row(self, round_: int, live: list[_Slot]) -> None:
        nodes = [s.node for s in live if s.node is not None and s.node.model is not None]
        models = [n.model for n in nodes if n.model is not None]
        cmax, cmean = consensus_distance(models)
        distances = spread(consensus_distances(models))
        excess = self._range_excess(models)
        losses = [n.last_metrics["loss"] for n in nodes if "loss" in n.last_metrics]
        accuracies = [n.last_metrics["accuracy"] for n in nodes if "accuracy" in n.last_metrics]
        epsilons = [n.ledger.spent() for n in nodes if n.ledger is not None]
        # the figures of the previous round's model: what a node at this round has learnt
        figures = [
            f for n in nodes if (f := n.federation_metrics) is not None and f["round"] == round_ - 1
        ]
        row: dict[str, Any] = {
            "round": round_,
            "time": round(trio.current_time(), 6),
            "live_nodes": len(nodes),
            "round_median": float(np.median([n.round for n in nodes])) if nodes else None,
            "consensus_max": cmax,
            "consensus_mean": cmean,
            "target_distance_max": (
                distance_to(models, self.target) if self.target is not None else None
            ),
            "range_excess_max": excess,
            "loss_mean": float(np.mean(losses)) if losses else None,
            "accuracy_mean": float(np.mean(accuracies)) if accuracies else None,
            "bytes": self.network.stats.bytes,
            "chunks": self.network.stats.chunks,
            "groups_completed": len(self.completed_groups),
            "groups_aborted": len(self.aborted_groups),
            "conservation_error_max": self.audit.max_error if self.audit.checked else None,
            "epsilon_max": max(epsilons) if epsilons else None,
            "crashes": self.crashes,
            "restarts": self.restarts,
            **{f"loss_{k}": v for k, v in spread(losses).items()},
            **{f"accuracy_{k}": v for k, v in spread(accuracies).items()},
            **{f"consensus_{k}": v for k, v in distances.items() if k != "max"},
            "federation_accuracy": (
                float(np.mean([f["accuracy"] for f in figures])) if figures else None
            ),
            "federation_loss": float(np.mean([f["loss"] for f in figures])) if figures else None,
        }
        self.rows.append(row)
        if self.progress is not None:
            self.progress(row)

    def _observe(self) -> Observed:
        """The state :func:`simnet.checks.why_failed` explains a failure from (at the end)."""
        live = [s for s in self._live() if s.node is not None]
        down = tuple(s.index for s in self.slots if s.node is not None and not s.live)
        restarts = {
            int(r["node"]): (int(r["round_at_crash"]), int(r["round"])) for r in self.restarted
        }
        pending = tuple(
            sorted(
                [e.at for e in self.scenario.events if e.at > self.ended_at]
                + [p.start for p in self.scenario.partitions if p.start > self.ended_at]
            )
        )
        return Observed(
            live_rounds={s.index: s.node.round for s in live if s.node is not None},
            open_channels={
                s.index: len(s.node.connected_peers()) for s in live if s.node is not None
            },
            down=down,
            never_started=tuple(sorted(self.joins_pending)),
            pending=pending,
            partition=self.partition_now,
            restarts=restarts,
            fewest_live=self.fewest_live,
            last_group=None if self.last_group_time is None else round(self.last_group_time, 6),
            triangle_free=self._triangle_free(),
            wall_limited=self.wall_limited,
        )

    def _triangle_free(self) -> bool:
        if self.scenario.topology.routing != "direct" or self.topology.edges is None:
            return False
        neighbours = [set(n) for n in self.topology.neighbours()]
        return not any(neighbours[a] & neighbours[b] for a, b in self.topology.edges if a != b)

    def _range_excess(self, models: list[np.ndarray]) -> float | None:
        """Training off: how far any model lies outside the initial models' range."""
        if self.initial_range is None:
            return None
        excess = range_excess(models, *self.initial_range)
        self.range_excess_max = max(self.range_excess_max, excess)
        return excess

    def _result(self, wall: float) -> SimulationResult:
        nodes = [s.node for s in self.slots if s.node is not None]
        rounds = [n.round for n in nodes]
        # final_*: the nodes live as the run ended (a crashed node's stale model is no
        # part of the deployment's state)
        models = [model for _, model in self.final_live]
        cmax, cmean = consensus_distance(models)
        self._range_excess(models)
        counts = self.end_counts or _EndCounts(
            self.network.stats, len(self.completed_groups), len(self.aborted_groups)
        )
        stats = counts.stats
        summary: dict[str, Any] = {
            "scenario": self.scenario.name,
            "seed": self.scenario.seed,
            "nodes": self.n,
            "topology": self.topology.description,
            "simulated_seconds": round(self.ended_at, 6),
            "completed": self.done.is_set() and not self.wall_limited,
            "rounds_min": min(rounds, default=0),
            "rounds_max": max(rounds, default=0),
            "live_nodes": len(models),
            "initial_consensus_max": self.initial_consensus,
            "final_consensus_max": cmax,
            "final_consensus_mean": cmean,
            "final_target_distance_max": (
                distance_to(models, self.target) if self.target is not None else None
            ),
            "all_models_finite": all(
                bool(np.all(np.isfinite(n.model))) for n in nodes if n.model is not None
            ),
            "range_excess_max": self.range_excess_max if self.initial_range else None,
            "bytes": stats.bytes,
            "chunks": stats.chunks,
            "connects": stats.connects,
            "connect_failures": stats.connect_failures,
            "resets": stats.resets,
            "stalls": stats.stalls,
            "groups_completed": counts.groups_completed,
            "groups_aborted": counts.groups_aborted,
            "groups_audited": self.audit.checked,
            "conservation_failures": len(self.audit.failures),
            "conservation_error_max": self.audit.max_error if self.audit.checked else None,
            "crashes": self.crashes,
            "restarts": self.restarts,
        }
        # appended later: the per-node spread of the live nodes' last metrics at the end
        if self.watching:
            summary["faults"] = self._fault_summary()
        final_distances = spread(consensus_distances(models))
        for metric in ("loss", "accuracy"):
            values = [m[metric] for m in self.final_metrics if metric in m]
            summary[f"final_{metric}_mean"] = float(np.mean(values)) if values else None
            summary.update({f"final_{metric}_{k}": v for k, v in spread(values).items()})
        summary.update(
            {f"final_consensus_{k}": v for k, v in final_distances.items() if k != "max"}
        )
        checks = run_checks(self.scenario, self.rows, summary, self.audit.failures)
        summary["checks"] = {c.name: "pass" if c.passed else "fail" for c in checks}
        summary["why"] = why_failed(self.scenario, self.rows, summary, checks, self.observed)
        return SimulationResult(
            self.rows, summary, nodes, stats, self.audit, self.restarted, wall, checks
        )


def _side_gap(
    sides: list[tuple[int, ...]], models: Sequence[tuple[int, np.ndarray | None]]
) -> float | None:
    """The largest L2 distance between two sides' mean models (``None``: fewer than two
    sides with a live node)."""
    side_of = {i: number for number, side in enumerate(sides) for i in side}
    members: dict[int, list[np.ndarray]] = {}
    for index, model in models:
        if model is not None and index in side_of:
            members.setdefault(side_of[index], []).append(np.asarray(model, np.float64))
    means = [np.mean(np.stack(m), axis=0) for _, m in sorted(members.items())]
    if len(means) < 2:
        return None
    return max(float(np.linalg.norm(a - b)) for k, a in enumerate(means) for b in means[k + 1 :])


def _node_list(indices: tuple[int, ...]) -> str:
    return ("node " if len(indices) == 1 else "nodes ") + ", ".join(map(str, indices))


def _topology(scenario: Scenario) -> Topology:
    spec = scenario.topology
    if spec.kind == "file":
        assert spec.file is not None
        return load_topology_file(spec.file)
    params: dict[str, Any] = {}
    if spec.kind in ("random-regular", "small-world"):
        params["degree"] = spec.degree
    if spec.kind in ("erdos-renyi", "small-world"):
        params["p"] = spec.p
    if spec.kind == "scale-free":
        params["m"] = spec.m
    if spec.kind in ("grid", "torus"):
        params.update({k: v for k, v in (("rows", spec.rows), ("cols", spec.cols)) if v})
    return build_topology(
        spec.kind, scenario.nodes.count, derive_seed(scenario.seed, "topology"), **params
    )


def _federation(scenario: Scenario) -> Federation:
    params = scenario.federation_params()  # [protocol] and [dp], dp_level included
    material = random.Random(derive_seed(scenario.seed, "federation"))
    return Federation.new(scenario.name or "simnet", randbytes=material.randbytes, params=params)


@dataclass(frozen=True)
class _EndCounts:
    """The summary's counters as the run ended, before the nodes were halted."""

    stats: NetworkStats
    groups_completed: int
    groups_aborted: int


class _FullCollections:
    """Full cyclic-garbage collections only when memory grew, during a run.

    A full collection walks every object of the oldest generation; thousands of nodes
    make millions of them, so CPython's automatic full collections (one every few
    seconds) took 40% of the wall time of a 300-node run (54 of 164 s). Garbage in
    cycles (trio tasks, exceptions) is rare next to what reference counting frees, so
    while a run lasts: the objects from before it are frozen (never walked), automatic
    full collections are off, and :meth:`check` runs one when the resident set grew by
    ``GROWTH`` since the last. Young generations are still collected as usual. Results do
    not depend on when the collector runs.
    """

    GROWTH = 1 << 30

    def __init__(self) -> None:
        self._threshold = gc.get_threshold()
        self._baseline = 0
        self._ticks = 0

    def __enter__(self) -> _FullCollections:
        self._threshold = gc.get_threshold()
        gc.collect()
        gc.freeze()
        young, middle, _ = self._threshold
        gc.set_threshold(young, middle, 1 << 30)  # full collections: only from check()
        self._baseline = self._resident()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.set_threshold(*self._threshold)
        gc.unfreeze()

    def check(self) -> None:
        self._ticks += 1
        resident = self._resident()
        # without /proc (resident 0): one full collection every 240 checks
        if resident - self._baseline > self.GROWTH or (not resident and self._ticks % 240 == 0):
            gc.collect()
            self._baseline = self._resident()

    @staticmethod
    def _resident() -> int:
        try:
            with open("/proc/self/statm", "rb") as statm:
                return int(statm.read().split()[1]) * resource.getpagesize()
        except (OSError, ValueError, IndexError):
            return 0


def run_simulation(
    scenario: Scenario,
    work_dir: Path,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    task: Task | None = None,
    wall_limit: float | None = None,
) -> SimulationResult:
    """Run ``scenario`` to the end in virtual time; node directories go to ``work_dir``.

    ``wall_limit`` (seconds of real time, for benchmarks) ends the run early; a run so
    ended is not reproducible.

    Example::

        result = run_simulation(load_scenario(Path("simnet/scenarios/basic.toml")), tmp)
        print(result.rows[-1]["consensus_max"])
    """
    simulation = Simulation(scenario, work_dir, progress=progress, task=task, wall_limit=wall_limit)

    async def main() -> SimulationResult:
        return await simulation.run()

    with (
        deterministic_scheduling(derive_seed(scenario.seed, "scheduler")),
        simulation.collections,
    ):
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
