"""Scenario files: one TOML document describes a whole simulated deployment.

Every key is optional except ``[nodes] count`` (or a topology file, which fixes the
count); unknown keys are errors, so a typo never silently falls back to a default. Times
are simulated seconds. The format, with the defaults::

    name = "example"           # a label for reports
    seed = 0                   # every random choice of the run derives from it
    rounds = 10                # stop once every live node has done this many rounds (0: none)
    duration = 3600.0          # ... or when this much simulated time has passed

    [nodes]
    count = 20
    lan_size = 0               # nodes per mDNS LAN segment (0: no mDNS, bootstrap only)
    bootstrap = "neighbors"    # "neighbors" | "first" | "none": whom each node dials first
    bootstrap_count = 2        # neighbours given as bootstrap addresses
    target_peers = 8           # channels each node keeps open
    uplink_mbit = inf          # per-host upload capacity shared by its streams

    [topology]
    kind = "complete"          # complete ring grid torus random-regular erdos-renyi
                               # small-world scale-free file
    routing = "direct"         # "direct": only along edges; "shortest-path": routed
    # degree = 4; p = 0.1; m = 2; rows = 4; cols = 5; file = "graph.gml"

    [link]                     # every edge's defaults (a file may override per edge)
    latency_ms = 5.0
    jitter_ms = 0.0
    bandwidth_mbit = 100.0
    loss = 0.0                 # chunk stalls for a retransmission timeout
    reset = 0.0                # chunk resets the connection
    connect_failure = 0.0      # a connection attempt times out

    [task]
    name = "tiny"              # "tiny", "digits", or "package.module:object"
    training = false           # false: pure secure averaging of the initial models
    evaluate_every = 1
    [task.settings]            # passed to the task (node_index, num_nodes are added)
    params = 100

    [protocol]                 # group protocol and channel parameters
    group_min = 3
    group_max = 8
    fixed_point_bits = 64
    clip = 8.0
    masking = true
    invite_timeout = 2.0
    start_timeout = 5.0
    allreduce_timeout = 30.0
    initiate_delay = 0.05
    retry_backoff = 0.3
    exclusion = 30.0
    sync_timeout = 3.0
    keepalive_interval = 1.0
    idle_timeout = 15.0
    send_timeout = 60.0
    handshake_timeout = 10.0
    grouping = "random"        # "random" | "exact" (exact rounds, derived positions)
                               # | "grid": Moshpit grid of grid_side^grid_dims
    random_steps = 1           # random: groups per round (0: the node's automatic rule;
                               # 1 keeps a round one push-sum step, as scenarios expect)
    grid_side = 0              # grid: nodes per line (= group size, group_min..group_max)
    grid_dims = 0              # grid: dimensions; grid_side ** grid_dims must be the count

    [dp]
    enabled = false
    clip_norm = 1.0
    noise_multiplier = 1.0
    delta = 1e-5
    epsilon_budget = 10.0

    [churn]                    # random crashes and restarts
    model = "none"             # "none" | "exponential" | "weibull" | "per-round"
    per_round = 0.1            # per-round: share of the nodes that crash per round
    mean_session = 300.0       # exponential: mean time between a (re)start and a crash
    weibull_shape = 1.5        # weibull: session lengths ~ Weibull(shape, scale)
    weibull_scale = 300.0
    mean_downtime = 30.0       # exponential time a crashed node stays down (0: forever)
    downtime_rounds = 0        # per-round: restart after this many median rounds instead
    fraction = 1.0             # share of the nodes subject to churn
    start = 0.0                # no churn before this time

    [checks]                   # verdicts of `p2pfed simnet run` (exit status 1 if one fails)
    rounds_after_heal = 1      # global rounds that must complete after the last heal (0: off)
    consensus_drop = 1.0       # training off: final consensus_max must be this many times
                               # below that of the initial models (0: off)
    consensus_max = inf        # training off: final consensus_max must be at most this
    pace = 0.0                 # each side of a fault (vanish, partition) with group_min
                               # nodes keeps this share of its rounds/s (0: off)
    pace_window = 10.0         # pace: seconds before the fault measured as the reference
    pace_grace = 5.0           # pace: seconds after the fault not measured (detection)
    detect_within = 0.0        # every node stops counting the cut-off peers as responsive
                               # within this many seconds of the fault (0: off)
    merged = 0                 # groups spanning the sides of a healed partition that
                               # must complete after the heal (0: off)

    [[events]]                 # scheduled faults
    at = 30.0
    action = "crash"           # "crash" | "restart" | "stop" (clean) | "join" (late start)
                               # | "vanish" (silent: no reset, no refusal, data dropped)
    in_group = false           # crash/vanish: wait from `at` until each node is in an
                               # all-reduce (the worst moment for its group's members)
    nodes = [3, 4]             # or: fraction = 0.1 (drawn from the live nodes)

    [[partitions]]
    start = 20.0
    end = 60.0                 # heal time (omit: never heals)
    groups = [[0, 1, 2]]       # or: split = 0.5 (a random half); the rest is one more group
                               # or: cut = [[3, 4]] (topology edges: the sides are what
                               # stays connected without them, e.g. a router's link)
    mode = "stall"             # "stall" | "reset" | "drop" (existing streams across the cut)

Nodes named in a ``join`` event start only then (the others start at time 0).
``model = "per-round"`` churn crashes ``per_round`` of the churn-subject nodes (drawn
from the live ones) each time the median round of the live nodes advances, and restarts
each ``downtime_rounds`` median rounds later (or, if 0, after an exponential downtime of
mean ``mean_downtime``); simnet/README.md has the details and the checks.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2pfed.config import NodeConfig
from p2pfed.errors import ConfigError
from p2pfed.federation import ProtocolParams
from p2pfed.group import GroupConfig
from simnet.network import LinkParams
from simnet.topology import TOPOLOGY_KINDS, link_overrides

__all__ = [
    "ChecksSpec",
    "ChurnSpec",
    "DpSpec",
    "EventSpec",
    "LinkSpec",
    "NodesSpec",
    "PartitionSpec",
    "ProtocolSpec",
    "Scenario",
    "TaskSpec",
    "TopologySpec",
    "load_scenario",
    "parse_scenario",
]

_MAX_FILE_SIZE = 1024 * 1024


@dataclass(frozen=True)
class NodesSpec:
    count: int = 0
    lan_size: int = 0
    bootstrap: str = "neighbors"
    bootstrap_count: int = 2
    target_peers: int = 8
    uplink_mbit: float = math.inf


@dataclass(frozen=True)
class TopologySpec:
    kind: str = "complete"
    routing: str = "direct"
    degree: int = 4
    p: float = 0.1
    m: int = 2
    rows: int | None = None
    cols: int | None = None
    file: Path | None = None


@dataclass(frozen=True)
class LinkSpec:
    latency_ms: float = 5.0
    jitter_ms: float = 0.0
    bandwidth_mbit: float = 100.0
    loss: float = 0.0
    reset: float = 0.0
    connect_failure: float = 0.0

    def params(self) -> LinkParams:
        """The :class:`LinkParams` these user-unit values describe."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return LinkParams(**link_overrides(values, "[link]"))


@dataclass(frozen=True)
class TaskSpec:
    name: str = "tiny"
    training: bool = False
    evaluate_every: int = 1
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ProtocolSpec:
    # defaults are the real node's: a scenario that sets nothing simulates a default node
    group_min: int = GroupConfig.group_min
    group_max: int = GroupConfig.group_max
    fixed_point_bits: int = ProtocolParams.fixed_point_bits
    clip: float = ProtocolParams.clip
    masking: bool = True
    invite_timeout: float = GroupConfig.invite_timeout
    start_timeout: float = GroupConfig.start_timeout
    allreduce_timeout: float = GroupConfig.allreduce_timeout
    initiate_delay: float = GroupConfig.initiate_delay
    class_timeout: float = GroupConfig.class_timeout
    retry_backoff: float = GroupConfig.retry_backoff
    exclusion: float = GroupConfig.exclusion
    sync_timeout: float = 3.0
    keepalive_interval: float = NodeConfig.keepalive_interval
    idle_timeout: float = NodeConfig.idle_timeout
    send_timeout: float = NodeConfig.send_timeout
    handshake_timeout: float = NodeConfig.handshake_timeout
    grouping: str = "random"
    random_steps: int = 1
    grid_side: int = 0
    grid_dims: int = 0


@dataclass(frozen=True)
class DpSpec:
    enabled: bool = False
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float = 10.0


@dataclass(frozen=True)
class ChurnSpec:
    model: str = "none"
    per_round: float = 0.1
    mean_session: float = 300.0
    weibull_shape: float = 1.5
    weibull_scale: float = 300.0
    mean_downtime: float = 30.0
    downtime_rounds: int = 0
    fraction: float = 1.0
    start: float = 0.0


@dataclass(frozen=True)
class EventSpec:
    at: float
    action: str
    nodes: tuple[int, ...] = ()
    fraction: float | None = None
    in_group: bool = False


@dataclass(frozen=True)
class PartitionSpec:
    start: float
    end: float | None = None
    groups: tuple[tuple[int, ...], ...] = ()
    split: float | None = None
    mode: str = "stall"
    cut: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ChecksSpec:
    rounds_after_heal: int = 1
    consensus_drop: float = 1.0
    consensus_max: float = math.inf
    # the fault checks are off by default: existing scenarios' verdicts stay as they were
    pace: float = 0.0
    pace_window: float = 10.0
    pace_grace: float = 5.0
    detect_within: float = 0.0
    merged: int = 0


@dataclass(frozen=True)
class Scenario:
    """A parsed, validated scenario (see the module docstring for the file format)."""

    name: str = "scenario"
    seed: int = 0
    rounds: int | None = 10
    duration: float = 3600.0
    nodes: NodesSpec = field(default_factory=NodesSpec)
    topology: TopologySpec = field(default_factory=TopologySpec)
    link: LinkSpec = field(default_factory=LinkSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    protocol: ProtocolSpec = field(default_factory=ProtocolSpec)
    dp: DpSpec = field(default_factory=DpSpec)
    churn: ChurnSpec = field(default_factory=ChurnSpec)
    checks: ChecksSpec = field(default_factory=ChecksSpec)
    events: tuple[EventSpec, ...] = ()
    partitions: tuple[PartitionSpec, ...] = ()


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; relative paths in it are relative to the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_SIZE:
            raise ConfigError(f"scenario {path} is {size} bytes; the limit is {_MAX_FILE_SIZE}")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc.strerror or exc}") from None
    return parse_scenario(text, base=path.parent, where=str(path))


def parse_scenario(text: str, *, base: Path | None = None, where: str = "scenario") -> Scenario:
    """Parse scenario TOML text; raises :class:`~p2pfed.errors.ConfigError` naming the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    try:
        return _build(data, base or Path.cwd())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# -- validation helpers -------------------------------------------------------------------


def _number(where: str, value: Any, *, low: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{where} must be {'>' if strict else '>='} {low:g}, got {value!r}")
    return float(value)


def _integer(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{where} must be between {low} and {high}, got {value}")
    return value


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"[{key}] must be a table")
    return value


def _fill(cls: type[Any], table: dict[str, Any], section: str, **special: Any) -> Any:
    """Build dataclass ``cls`` from ``table``, checking names and basic types."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ValueError(f"[{section}] has no key {key!r} (known: {', '.join(known)})")
        if key in special:
            values[key] = special[key](value)
            continue
        default = known[key].default
        where = f"[{section}] {key}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be true or false, got {value!r}")
        elif isinstance(default, int):
            value = _integer(where, value, 0, 10**9)
        elif isinstance(default, float):
            value = _number(where, value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        values[key] = value
    return cls(**values)


def _build(data: dict[str, Any], base: Path) -> Scenario:
    top = {"name", "seed", "rounds", "duration", "nodes", "topology", "link", "task"}
    top |= {"protocol", "dp", "churn", "checks", "events", "partitions"}
    for key in data:
        if key not in top:
            raise ValueError(f"unknown top-level key {key!r} (known: {', '.join(sorted(top))})")
    name = data.get("name", "scenario")
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {name!r}")
    seed = _integer("seed", data.get("seed", 0), 0, 2**63 - 1)
    rounds_value = data.get("rounds", 10)
    rounds = None if rounds_value == 0 else _integer("rounds", rounds_value, 0, 10**6)
    duration = _number("duration", data.get("duration", 3600.0), strict=True)

    topology = _fill(
        TopologySpec,
        _table(data, "topology"),
        "topology",
        file=lambda v: base / str(v),
        rows=lambda v: _integer("[topology] rows", v, 1, 10**6),
        cols=lambda v: _integer("[topology] cols", v, 1, 10**6),
    )
    if topology.kind not in TOPOLOGY_KINDS:
        raise ValueError(
            f"[topology] kind {topology.kind!r} is unknown; "
            f"choose one of {', '.join(TOPOLOGY_KINDS)}"
        )
    if topology.routing not in ("direct", "shortest-path"):
        raise ValueError('[topology] routing must be "direct" or "shortest-path"')
    if topology.kind == "file" and topology.file is None:
        raise ValueError('[topology] kind = "file" needs file = "PATH" (GML or edge list)')
    if not 0 <= topology.p <= 1:
        raise ValueError(f"[topology] p must be a probability, got {topology.p}")

    nodes = _fill(NodesSpec, _table(data, "nodes"), "nodes")
    if nodes.count == 0 and topology.kind != "file":
        raise ValueError("[nodes] count is required (the number of simulated nodes)")
    if nodes.bootstrap not in ("neighbors", "first", "none"):
        raise ValueError('[nodes] bootstrap must be "neighbors", "first" or "none"')
    if nodes.target_peers < 1:
        raise ValueError("[nodes] target_peers must be at least 1")
    link = _fill(LinkSpec, _table(data, "link"), "link")
    link.params()  # validates ranges

    task_table = dict(_table(data, "task"))
    settings = task_table.pop("settings", {})
    if not isinstance(settings, dict):
        raise ValueError("[task.settings] must be a table")
    task = _fill(TaskSpec, task_table, "task")
    task = TaskSpec(task.name, task.training, task.evaluate_every, dict(settings))

    protocol = _fill(ProtocolSpec, _table(data, "protocol"), "protocol")
    if protocol.group_min < 3 or protocol.group_max < protocol.group_min:
        raise ValueError("[protocol] needs 3 <= group_min <= group_max")
    _check_grid(protocol, nodes.count)
    dp = _fill(DpSpec, _table(data, "dp"), "dp")
    churn = _fill(ChurnSpec, _table(data, "churn"), "churn")
    if churn.model not in ("none", "exponential", "weibull", "per-round"):
        raise ValueError('[churn] model must be "none", "exponential", "weibull" or "per-round"')
    if not 0 <= churn.per_round <= 1:
        raise ValueError(f"[churn] per_round must be in [0, 1], got {churn.per_round}")
    if not 0 <= churn.fraction <= 1:
        raise ValueError(f"[churn] fraction must be in [0, 1], got {churn.fraction}")
    if churn.model in ("exponential", "weibull") and (
        churn.mean_session <= 0 or churn.weibull_scale <= 0
    ):
        raise ValueError("[churn] session lengths must be > 0")

    events = tuple(_event(i, e) for i, e in enumerate(_array(data, "events")))
    partitions = tuple(_partition(i, p) for i, p in enumerate(_array(data, "partitions")))
    return Scenario(
        name=name,
        seed=seed,
        rounds=rounds,
        duration=duration,
        nodes=nodes,
        topology=topology,
        link=link,
        task=task,
        protocol=protocol,
        dp=dp,
        churn=churn,
        checks=_checks(_table(data, "checks")),
        events=events,
        partitions=partitions,
    )


def _checks(table: dict[str, Any]) -> ChecksSpec:
    checks: ChecksSpec = _fill(ChecksSpec, table, "checks")
    if checks.pace > 1:
        raise ValueError(
            f"[checks] pace is the share of the rounds per second kept during a fault: "
            f"between 0 (off) and 1, got {checks.pace}"
        )
    if checks.pace_window <= 0:
        raise ValueError(f"[checks] pace_window must be > 0 seconds, got {checks.pace_window}")
    return checks


def _check_grid(protocol: ProtocolSpec, count: int) -> None:
    if protocol.grouping not in ("random", "exact", "grid"):
        raise ValueError('[protocol] grouping must be "random", "exact" or "grid"')
    if not 0 <= protocol.random_steps <= 16:
        raise ValueError("[protocol] random_steps must be between 0 (automatic) and 16")
    if protocol.grouping in ("random", "exact"):
        if protocol.grid_side or protocol.grid_dims:
            raise ValueError('[protocol] grid_side and grid_dims need grouping = "grid"')
        return
    side, dims = protocol.grid_side, protocol.grid_dims
    if not protocol.group_min <= side <= protocol.group_max:
        raise ValueError(
            f"[protocol] grid_side ({side}) is the group size: it must be between group_min "
            f"({protocol.group_min}) and group_max ({protocol.group_max})"
        )
    if not 1 <= dims <= 16:
        raise ValueError(f"[protocol] grid_dims must be between 1 and 16, got {dims}")
    if count and side**dims != count:
        raise ValueError(
            f"[protocol] a grid of {side}^{dims} = {side**dims} nodes needs [nodes] count = "
            f"{side**dims}, not {count}"
        )


def _array(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"[[{key}]] must be an array of tables")
    return value


def _node_list(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of node indices, got {value!r}")
    return tuple(_integer(where, v, 0, 10**7) for v in value)


def _event(index: int, table: dict[str, Any]) -> EventSpec:
    where = f"[[events]] #{index + 1}"
    unknown = set(table) - {"at", "action", "nodes", "fraction", "in_group"}
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {sorted(unknown)} (known: at, action, nodes, fraction, "
            "in_group)"
        )
    if "at" not in table or "action" not in table:
        raise ValueError(f"{where}: needs at = TIME and action = NAME")
    action = table["action"]
    if action not in ("crash", "restart", "stop", "join", "vanish"):
        raise ValueError(f'{where}: action must be "crash", "restart", "stop", "join" or "vanish"')
    fraction = table.get("fraction")
    if fraction is not None and not 0 < _number(f"{where} fraction", fraction) <= 1:
        raise ValueError(f"{where}: fraction must be in (0, 1]")
    nodes = _node_list(f"{where} nodes", table.get("nodes", []))
    if not nodes and fraction is None:
        raise ValueError(f"{where}: name the nodes (nodes = [..]) or a fraction")
    in_group = table.get("in_group", False)
    if not isinstance(in_group, bool):
        raise ValueError(f"{where}: in_group must be true or false, got {in_group!r}")
    if in_group and (action not in ("crash", "vanish") or fraction is not None):
        raise ValueError(
            f'{where}: in_group = true needs action = "crash" or "vanish" and nodes = [..] '
            "(not a fraction)"
        )
    return EventSpec(_number(f"{where} at", table["at"]), action, nodes, fraction, in_group)


def _partition(index: int, table: dict[str, Any]) -> PartitionSpec:
    where = f"[[partitions]] #{index + 1}"
    unknown = set(table) - {"start", "end", "groups", "split", "mode", "cut"}
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {sorted(unknown)} (known: start, end, groups, split, cut, mode)"
        )
    if "start" not in table:
        raise ValueError(f"{where}: needs start = TIME")
    start = _number(f"{where} start", table["start"])
    end = table.get("end")
    if end is not None and _number(f"{where} end", end) <= start:
        raise ValueError(f"{where}: end must be after start")
    groups_value = table.get("groups", [])
    if not isinstance(groups_value, list):
        raise ValueError(f"{where}: groups must be a list of lists of node indices")
    groups = tuple(_node_list(f"{where} groups", g) for g in groups_value)
    split = table.get("split")
    if split is not None and not 0 < _number(f"{where} split", split) < 1:
        raise ValueError(f"{where}: split must be in (0, 1)")
    cut = _cut(where, table.get("cut", []))
    if cut and (groups or split is not None):
        raise ValueError(f"{where}: give one of groups, split or cut (the sides), not several")
    if not groups and split is None and not cut:
        raise ValueError(
            f"{where}: give groups = [[..], ..], split = FRACTION or cut = [[A, B], ..]"
        )
    mode = table.get("mode", "stall")
    if mode not in ("stall", "reset", "drop"):
        raise ValueError(f'{where}: mode must be "stall", "reset" or "drop", got {mode!r}')
    return PartitionSpec(start, None if end is None else float(end), groups, split, mode, cut)


def _cut(where: str, value: Any) -> tuple[tuple[int, int], ...]:
    """``cut = [[A, B], ..]``: topology edges (checked against the topology at the start)."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: cut must be a list of edges [A, B], got {value!r}")
    edges = []
    for edge in value:
        if not isinstance(edge, list) or len(edge) != 2:
            raise ValueError(
                f"{where}: each edge of cut is a pair of node indices [A, B], got {edge!r}"
            )
        a, b = _node_list(f"{where} cut", edge)
        if a == b:
            raise ValueError(f"{where}: cut edge [{a}, {b}] names one node twice")
        edges.append((a, b))
    return tuple(edges)
