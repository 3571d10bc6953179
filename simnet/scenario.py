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
    server_optimizer = "fedavg"  # applied to each round's average: "fedavg" | "fedavgm"
                               # | "fedadam" (spec/server-optimizer.md; exact rounds)
    server_lr = 1.0
    server_momentum = 0.9      # fedavgm momentum / fedadam beta1

    [dp]                       # the federation's differential privacy (spec/privacy.md)
    enabled = false
    level = "node"             # "node": each node clips and noises its update (local DP)
                               # | "distributed": Skellam shares summed by secure aggregation
                               #   (needs masking = true; [protocol] clip must leave room
                               #   for the noise: p2pfed.skellam.required_clip)
                               # | "record": DP-SGD in local training (needs training = true)
    clip_norm = 1.0            # C: update (node, distributed) or per-record gradient norm
    noise_multiplier = 1.0     # sigma: p2pfed.dp.calibrate(level, epsilon=.., rounds=..)
    delta = 1e-5
    epsilon_budget = 10.0      # a node whose first release exceeds it refuses to start
    sample_rate = 0.02         # record: Poisson rate of a DP-SGD step's batch
    steps = 50                 # record: DP-SGD steps per round

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

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2pfed.config import NodeConfig
from p2pfed.errors import ConfigError
from p2pfed.federation import ProtocolParams
from p2pfed.group import GroupConfig
from p2pfed.schema import FieldError, check_fields, rules_of, setting, unknown_keys_message
from p2pfed.skellam import check_headroom
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


_BIG = 10**9  # counts and indices: far beyond any simulation this machine runs
_INF = math.inf  # as a bound: infinity is an accepted value ("never", "unlimited")


def _int(default: int | None, low: int = 0, high: int = _BIG, **rule: Any) -> Any:
    return setting(default, "int", low=low, high=high, **rule)


def _at_least_0(default: float | None, **rule: Any) -> Any:
    return setting(default, "float", low=0, **rule)


def _share(default: float | None, **rule: Any) -> Any:
    return setting(default, "float", low=0, high=1, **rule)


_NODE_RULES = rules_of(NodeConfig)
_PARAM_RULES = rules_of(ProtocolParams)


class _Checked:
    """Checks every declared field at construction (FieldError names the key)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class NodesSpec(_Checked):
    count: int = _int(0)
    lan_size: int = _int(0)
    bootstrap: str = setting("neighbors", "str", choices=("neighbors", "first", "none"))
    bootstrap_count: int = _int(2)
    target_peers: int = _int(8, low=1)
    uplink_mbit: float = setting(math.inf, "float", low=0, low_open=True, high=_INF)


@dataclass(frozen=True)
class TopologySpec(_Checked):
    kind: str = setting("complete", "str", choices=tuple(TOPOLOGY_KINDS))
    routing: str = setting("direct", "str", choices=("direct", "shortest-path"))
    degree: int = _int(4)
    p: float = _share(0.1)
    m: int = _int(2)
    rows: int | None = _int(None, low=1, high=10**6, optional=True)
    cols: int | None = _int(None, low=1, high=10**6, optional=True)
    # setting() is a dataclasses.field() with the key's rule: not a shared mutable default
    file: Path | None = setting(None, "path", optional=True)  # noqa: RUF009


@dataclass(frozen=True)
class LinkSpec(_Checked):
    latency_ms: float = _at_least_0(5.0)
    jitter_ms: float = _at_least_0(0.0)
    bandwidth_mbit: float = setting(100.0, "float", low=0, low_open=True, high=_INF)
    loss: float = _share(0.0)
    reset: float = _share(0.0)
    connect_failure: float = _share(0.0)

    def params(self) -> LinkParams:
        """The :class:`LinkParams` these user-unit values describe."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return LinkParams(**link_overrides(values, "[link]"))


@dataclass(frozen=True)
class TaskSpec(_Checked):
    name: str = setting("tiny", "str")
    training: bool = setting(False, "bool")
    evaluate_every: int = _int(1)
    settings: dict[str, Any] = setting(default_factory=dict, kind="table")  # noqa: RUF009


@dataclass(frozen=True)
class ProtocolSpec(_Checked):
    # defaults are the real node's: a scenario that sets nothing simulates a default node;
    # keys a node's files have too are checked by the rule those files declare
    group_min: int = _int(GroupConfig.group_min, low=3, high=64)
    group_max: int = _int(GroupConfig.group_max, low=3, high=64)
    fixed_point_bits: int = setting(
        ProtocolParams.fixed_point_bits, rule=_PARAM_RULES["fixed_point_bits"]
    )
    clip: float = setting(ProtocolParams.clip, rule=_PARAM_RULES["clip"])
    masking: bool = setting(True, "bool")
    invite_timeout: float = _at_least_0(GroupConfig.invite_timeout)
    start_timeout: float = _at_least_0(GroupConfig.start_timeout)
    allreduce_timeout: float = _at_least_0(GroupConfig.allreduce_timeout)
    initiate_delay: float = _at_least_0(GroupConfig.initiate_delay)
    class_timeout: float = _at_least_0(GroupConfig.class_timeout)
    retry_backoff: float = _at_least_0(GroupConfig.retry_backoff)
    exclusion: float = _at_least_0(GroupConfig.exclusion, high=_INF)
    sync_timeout: float = _at_least_0(3.0)
    keepalive_interval: float = setting(
        NodeConfig.keepalive_interval, rule=_NODE_RULES["keepalive_interval"]
    )
    idle_timeout: float = setting(NodeConfig.idle_timeout, rule=_NODE_RULES["idle_timeout"])
    send_timeout: float = setting(NodeConfig.send_timeout, rule=_NODE_RULES["send_timeout"])
    handshake_timeout: float = setting(
        NodeConfig.handshake_timeout, rule=_NODE_RULES["handshake_timeout"]
    )
    grouping: str = setting("random", "str", choices=("random", "exact", "grid"))
    random_steps: int = setting(1, rule=_PARAM_RULES["random_steps"])
    grid_side: int = _int(0)
    grid_dims: int = _int(0, high=16)
    # the federation's server optimiser (spec/server-optimizer.md); its ranges are checked
    # when the scenario's federation parameters are built (Scenario.federation_params)
    server_optimizer: str = setting(
        ProtocolParams.server_optimizer, rule=_PARAM_RULES["server_optimizer"]
    )
    server_lr: float = setting(ProtocolParams.server_lr, rule=_PARAM_RULES["server_lr"])
    server_momentum: float = setting(
        ProtocolParams.server_momentum, rule=_PARAM_RULES["server_momentum"]
    )


@dataclass(frozen=True)
class DpSpec(_Checked):
    enabled: bool = setting(False, "bool")
    # "node" by default: scenarios written before the key keep their meaning
    level: str = setting("node", rule=_PARAM_RULES["dp_level"])
    clip_norm: float = setting(1.0, rule=_PARAM_RULES["dp_clip_norm"])
    noise_multiplier: float = setting(1.0, "float", low=0)
    delta: float = setting(1e-5, rule=_PARAM_RULES["dp_delta"])
    epsilon_budget: float = setting(10.0, rule=_PARAM_RULES["dp_epsilon_budget"])
    sample_rate: float = setting(ProtocolParams.dp_sample_rate, rule=_PARAM_RULES["dp_sample_rate"])
    steps: int = setting(ProtocolParams.dp_steps, rule=_PARAM_RULES["dp_steps"])


@dataclass(frozen=True)
class ChurnSpec(_Checked):
    model: str = setting("none", "str", choices=("none", "exponential", "weibull", "per-round"))
    per_round: float = _share(0.1)
    mean_session: float = _at_least_0(300.0, high=_INF)
    weibull_shape: float = setting(1.5, "float", low=0, low_open=True)
    weibull_scale: float = _at_least_0(300.0, high=_INF)
    mean_downtime: float = _at_least_0(30.0, high=_INF)
    downtime_rounds: int = _int(0)
    fraction: float = _share(1.0)
    start: float = _at_least_0(0.0)


@dataclass(frozen=True)
class EventSpec(_Checked):
    at: float = _at_least_0(None)
    action: str = setting(None, "str", choices=("crash", "restart", "stop", "join", "vanish"))
    nodes: tuple[int, ...] = setting((), "ints", low=0, high=10**7)
    fraction: float | None = _share(None, low_open=True, optional=True)
    in_group: bool = setting(False, "bool")


@dataclass(frozen=True)
class PartitionSpec(_Checked):
    start: float = _at_least_0(None)
    end: float | None = _at_least_0(None, optional=True, high=_INF)
    groups: tuple[tuple[int, ...], ...] = setting((), check=lambda v: _groups(v))
    split: float | None = _share(None, low_open=True, high_open=True, optional=True)
    mode: str = setting("stall", "str", choices=("stall", "reset", "drop"))
    cut: tuple[tuple[int, int], ...] = setting((), check=lambda v: _cut(v))


@dataclass(frozen=True)
class ChecksSpec(_Checked):
    rounds_after_heal: int = _int(1)
    consensus_drop: float = _at_least_0(1.0)
    consensus_max: float = _at_least_0(math.inf, high=_INF)
    # the fault checks are off by default: existing scenarios' verdicts stay as they were
    pace: float = _at_least_0(0.0, check=lambda v: _pace(v))
    pace_window: float = _at_least_0(10.0, low_open=True, unit="seconds")
    pace_grace: float = _at_least_0(5.0)
    detect_within: float = _at_least_0(0.0)
    merged: int = _int(0)


@dataclass(frozen=True)
class Scenario(_Checked):
    """A parsed, validated scenario (see the module docstring for the file format)."""

    name: str = setting("scenario", "str")
    seed: int = _int(0, high=2**63 - 1)
    rounds: int | None = _int(10, high=10**6, optional=True, why="0: no round goal")
    duration: float = _at_least_0(3600.0, low_open=True, high=_INF)
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

    def federation_params(self) -> ProtocolParams:
        """The federation parameters every simulated node shares: ``[protocol]``'s group,
        ring and server-optimiser keys and ``[dp]`` (``level``, ``sample_rate`` and
        ``steps`` are the federation's ``dp_level``, ``dp_sample_rate``, ``dp_steps``)."""
        protocol, dp = self.protocol, self.dp
        return ProtocolParams(
            group_min=protocol.group_min,
            group_max=protocol.group_max,
            fixed_point_bits=protocol.fixed_point_bits,
            clip=protocol.clip,
            dp_enabled=dp.enabled,
            dp_level=dp.level,
            dp_clip_norm=dp.clip_norm,
            dp_noise_multiplier=dp.noise_multiplier,
            dp_delta=dp.delta,
            dp_epsilon_budget=dp.epsilon_budget,
            dp_sample_rate=dp.sample_rate,
            dp_steps=dp.steps,
            averaging="exact" if protocol.grouping == "exact" else "random",
            random_steps=protocol.random_steps,
            server_optimizer=protocol.server_optimizer,
            server_lr=protocol.server_lr,
            server_momentum=protocol.server_momentum,
        )


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
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# -- building a scenario from its tables ----------------------------------------------------


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"[{key}] must be a table, got {value!r}")
    return value


def _fill(cls: type[Any], table: dict[str, Any], where: str, **special: Any) -> Any:
    """Build dataclass ``cls`` from ``table``: unknown keys and invalid values are errors
    naming ``where`` (the table) and the key."""
    allowed = list(rules_of(cls))
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: {unknown_keys_message(unknown, allowed)}".lstrip(": "))
    values = {key: special[key](value) if key in special else value for key, value in table.items()}
    try:
        return cls(**values)
    except FieldError as exc:
        raise ValueError(f"{where} {exc.key} {exc.problem}".lstrip()) from None


def _build(data: dict[str, Any], base: Path) -> Scenario:
    top: dict[str, Any] = {
        key: data[key] for key in ("name", "seed", "rounds", "duration") if key in data
    }
    if "rounds" in top and top["rounds"] == 0 and not isinstance(top["rounds"], bool):
        top["rounds"] = None  # 0: no round goal
    allowed = [f.name for f in fields(Scenario)]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(unknown_keys_message(unknown, allowed, "top-level key"))
    for key in allowed:
        if key not in rules_of(Scenario) and key not in ("events", "partitions"):
            _table(data, key)  # a table of the file, not a value
    head = _fill(Scenario, top, "")

    topology = _fill(
        TopologySpec,
        _table(data, "topology"),
        "[topology]",
        file=lambda v: base / v if isinstance(v, str) and v else v,
    )
    if topology.kind == "file" and topology.file is None:
        raise ValueError('[topology] kind = "file" needs file = "PATH" (GML or edge list)')

    nodes = _fill(NodesSpec, _table(data, "nodes"), "[nodes]")
    if nodes.count == 0 and topology.kind != "file":
        raise ValueError("[nodes] count is required (the number of simulated nodes)")
    link = _fill(LinkSpec, _table(data, "link"), "[link]")
    link.params()  # the simulator's own limits

    task = _fill(TaskSpec, _table(data, "task"), "[task]")

    protocol = _fill(ProtocolSpec, _table(data, "protocol"), "[protocol]")
    if protocol.group_max < protocol.group_min:
        raise ValueError("[protocol] needs 3 <= group_min <= group_max")
    _check_grid(protocol, nodes.count)
    dp_table = _table(data, "dp")
    dp = _fill(DpSpec, dp_table, "[dp]")
    _check_dp(dp, dp_table, protocol, task)
    churn = _fill(ChurnSpec, _table(data, "churn"), "[churn]")
    if churn.model in ("exponential", "weibull") and (
        churn.mean_session <= 0 or churn.weibull_scale <= 0
    ):
        raise ValueError("[churn] session lengths must be > 0")

    events = tuple(_event(i, e) for i, e in enumerate(_array(data, "events")))
    partitions = tuple(_partition(i, p) for i, p in enumerate(_array(data, "partitions")))
    scenario = dataclasses.replace(
        head,
        nodes=nodes,
        topology=topology,
        link=link,
        task=task,
        protocol=protocol,
        dp=dp,
        churn=churn,
        checks=_fill(ChecksSpec, _table(data, "checks"), "[checks]"),
        events=events,
        partitions=partitions,
    )
    try:
        params = scenario.federation_params()
        if params.dp_enabled and params.dp_level == "distributed":
            # the budget is the node's to refuse at start (as for every level), but a
            # ring without room for the noise is a property of the scenario's keys
            check_headroom(params)
    except ConfigError as exc:
        # the federation's key names, as a scenario spells them
        message = str(exc).removeprefix("invalid protocol parameter: ")
        raise ValueError(message.replace("the federation's [params]", "[protocol]")) from None
    return scenario


def _check_dp(dp: DpSpec, table: dict[str, Any], protocol: ProtocolSpec, task: TaskSpec) -> None:
    """Combinations of ``[dp]`` keys a federation would accept but that mean nothing (or
    not what the scenario says)."""
    given = [key for key in ("level", "sample_rate", "steps") if key in table]
    if given and not dp.enabled:
        raise ValueError(f"[dp] {', '.join(given)} need enabled = true (DP is off)")
    record_only = [key for key in ("sample_rate", "steps") if key in table]
    if record_only and dp.level != "record":
        raise ValueError(
            f'[dp] {", ".join(record_only)} are DP-SGD settings: they need level = "record", '
            f"not {dp.level!r}"
        )
    if not dp.enabled:
        return
    if dp.level == "record" and not task.training:
        raise ValueError(
            '[dp] level = "record" runs DP-SGD in training: it needs [task] training = true'
        )
    if dp.level == "distributed" and not protocol.masking:
        raise ValueError(
            '[dp] level = "distributed" adds the noise in shares that only secure aggregation '
            "sums up: it needs [protocol] masking = true"
        )


def _check_grid(protocol: ProtocolSpec, count: int) -> None:
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


def _node_list(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**7 for v in value
    ):
        raise ValueError(f"must be a list of node indices, got {value!r}")
    return tuple(value)


def _groups(value: Any) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of lists of node indices, got {value!r}")
    return tuple(_node_list(group) for group in value)


def _cut(value: Any) -> tuple[tuple[int, int], ...]:
    """``cut = [[A, B], ..]``: topology edges (checked against the topology at the start)."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of edges [A, B], got {value!r}")
    edges = []
    for edge in value:
        if not isinstance(edge, list | tuple) or len(edge) != 2:
            raise ValueError(
                f"must be a list of edges, each a pair of node indices [A, B]; got {edge!r}"
            )
        a, b = _node_list(edge)
        if a == b:
            raise ValueError(f"has the edge [{a}, {b}], which names one node twice")
        edges.append((a, b))
    return tuple(edges)


def _pace(value: float) -> float:
    if value > 1:
        raise ValueError(
            "is the share of the rounds per second kept during a fault: between 0 (off) "
            f"and 1, got {value}"
        )
    return value


def _event(index: int, table: dict[str, Any]) -> EventSpec:
    where = f"[[events]] #{index + 1}"
    if "at" not in table or "action" not in table:
        raise ValueError(f"{where}: needs at = TIME and action = NAME")
    event: EventSpec = _fill(EventSpec, table, where)
    if not event.nodes and event.fraction is None:
        raise ValueError(f"{where}: name the nodes (nodes = [..]) or a fraction")
    if event.in_group and (event.action not in ("crash", "vanish") or event.fraction is not None):
        raise ValueError(
            f'{where}: in_group = true needs action = "crash" or "vanish" and nodes = [..] '
            "(not a fraction)"
        )
    return event


def _partition(index: int, table: dict[str, Any]) -> PartitionSpec:
    where = f"[[partitions]] #{index + 1}"
    if "start" not in table:
        raise ValueError(f"{where}: needs start = TIME")
    partition: PartitionSpec = _fill(PartitionSpec, table, where)
    if partition.end is not None and partition.end <= partition.start:
        raise ValueError(f"{where}: end must be after start")
    sides = [bool(partition.groups), partition.split is not None, bool(partition.cut)]
    if sum(sides) > 1:
        raise ValueError(f"{where}: give one of groups, split or cut (the sides), not several")
    if not any(sides):
        raise ValueError(
            f"{where}: give groups = [[..], ..], split = FRACTION or cut = [[A, B], ..]"
        )
    return partition
