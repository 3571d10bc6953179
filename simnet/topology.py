"""Who can reach whom: topologies as edge lists with optional per-edge link parameters.

A :class:`Topology` names ``n`` nodes (indices ``0 .. n-1``) and either no edges at all
(``complete``: every pair is linked with the default link) or an explicit edge list. Each
edge may override the default :class:`~simnet.network.LinkParams` (latency, jitter,
bandwidth, loss, ...). :func:`build_topology` makes the standard families with networkx
(seeded, so the same seed gives the same graph) and :func:`load_topology_file` reads a
file: GML in the style of Shadow's network graphs, or a plain edge list.

Note for protocol users: the group protocol needs every pair of group members to connect
(the butterfly all-reduce is all-to-all). With ``routing = "direct"`` (the default:
reachability is the topology), groups can only form among mutually linked nodes, so a
triangle-free graph (ring, grid, torus) never completes a group of 3 or more. Use
``routing = "shortest-path"`` to treat the graph as an underlay that routes between any
two connected nodes, as Shadow does.

Edge-list format (``.txt``/``.edges``/anything but ``.gml``): one edge per line,
``SOURCE TARGET [key=value ...]``, nodes are integers ``0 .. n-1``, ``#`` starts a comment;
keys are ``latency_ms``, ``jitter_ms``, ``bandwidth_mbit``, ``loss``, ``reset`` and
``connect_failure``::

    # a triangle with one slow, lossy edge
    0 1 latency_ms=5
    1 2 latency_ms=80 bandwidth_mbit=10 loss=0.01
    0 2

GML format: ``graph [ node [ id 0 ] ... edge [ source 0 target 1 latency "50 ms"
packet_loss 0.01 bandwidth "10 Mbit" jitter "2 ms" ] ]``; node ids are mapped to node
indices in order of appearance.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simnet.network import LinkParams, link_from

__all__ = [
    "TOPOLOGY_KINDS",
    "Topology",
    "build_topology",
    "grid_coordinate",
    "grid_mates",
    "link_overrides",
    "load_topology_file",
]

TOPOLOGY_KINDS = (
    "complete",
    "ring",
    "grid",
    "torus",
    "random-regular",
    "erdos-renyi",
    "small-world",
    "scale-free",
    "file",
)
_MAX_FILE_SIZE = 64 * 1024 * 1024
_LINK_KEYS = ("latency_ms", "jitter_ms", "bandwidth_mbit", "loss", "reset", "connect_failure")


@dataclass(frozen=True)
class Topology:
    """``n`` nodes and their edges (``None``: complete graph with default links).

    ``links[i]`` holds the overrides of ``edges[i]`` in :class:`LinkParams` units
    (seconds, bytes per second); empty means the default link.
    """

    n: int
    edges: tuple[tuple[int, int], ...] | None = None
    links: tuple[dict[str, float], ...] = field(default=())
    description: str = "complete"

    def link_params(self, index: int, default: LinkParams) -> LinkParams:
        """The :class:`LinkParams` of ``edges[index]`` given the default link."""
        if not self.links or not self.links[index]:
            return default
        return link_from(self.links[index], default)

    def neighbours(self) -> list[list[int]]:
        """Adjacency lists, each sorted (complete: everyone else)."""
        if self.edges is None:
            return [[j for j in range(self.n) if j != i] for i in range(self.n)]
        adjacency: list[list[int]] = [[] for _ in range(self.n)]
        for a, b in self.edges:
            adjacency[a].append(b)
            adjacency[b].append(a)
        return [sorted(set(row)) for row in adjacency]


def link_overrides(values: dict[str, Any], where: str) -> dict[str, float]:
    """Convert user units (``latency_ms``, ``bandwidth_mbit``, ...) to LinkParams fields.

    >>> link_overrides({"latency_ms": 20, "bandwidth_mbit": 8}, "[link]")
    {'latency': 0.02, 'bandwidth': 1000000.0}
    """
    result: dict[str, float] = {}
    for key, value in values.items():
        if key not in _LINK_KEYS:
            raise ValueError(f"{where}: unknown link key {key!r} (known: {', '.join(_LINK_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: {key} must be a number, got {value!r}")
        number = float(value)
        if key == "latency_ms":
            result["latency"] = number / 1000
        elif key == "jitter_ms":
            result["jitter"] = number / 1000
        elif key == "bandwidth_mbit":
            result["bandwidth"] = number * 1e6 / 8 if number != math.inf else math.inf
        else:
            result[key] = number
    return result


def grid_coordinate(index: int, side: int, dims: int) -> tuple[int, ...]:
    """The Moshpit grid coordinate simnet gives node ``index``: its ``dims`` base-``side``
    digits, least significant first (grid grouping, spec/group.md).

    >>> grid_coordinate(5, 3, 3)
    (2, 1, 0)
    """
    if not 0 <= index < side**dims:
        raise ValueError(f"node {index} is outside a grid of {side}^{dims} nodes")
    return tuple((index // side**axis) % side for axis in range(dims))


def grid_mates(index: int, side: int, dims: int) -> list[int]:
    """The nodes sharing a grid line with node ``index`` in some dimension: the
    ``dims * (side - 1)`` peers it ever averages with under grid grouping.

    >>> grid_mates(0, 3, 2)
    [1, 2, 3, 6]
    """
    coordinate = grid_coordinate(index, side, dims)
    mates = []
    for axis in range(dims):
        base = index - coordinate[axis] * side**axis
        mates += [base + v * side**axis for v in range(side) if v != coordinate[axis]]
    return sorted(mates)


def _grid_shape(n: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    if rows is None and cols is None:
        rows = max(1, math.isqrt(n))
        while n % rows:
            rows -= 1
    if rows is None:
        assert cols is not None
        rows = n // cols
    if cols is None:
        cols = n // rows
    if rows * cols != n:
        raise ValueError(f"a {rows} x {cols} grid has {rows * cols} nodes, not {n}")
    return rows, cols


def build_topology(kind: str, n: int, seed: int, **params: Any) -> Topology:
    """A topology of ``n`` nodes of the named ``kind`` (one of :data:`TOPOLOGY_KINDS`
    except ``file``), drawn with ``seed`` where random.

    Parameters: ``grid``/``torus``: ``rows``, ``cols`` (default: the most square shape);
    ``random-regular``: ``degree``; ``erdos-renyi``: ``p``; ``small-world``: ``degree``
    (k, even) and ``p`` (rewiring); ``scale-free``: ``m`` (edges per new node).

    >>> build_topology("ring", 4, seed=0).edges
    ((0, 1), (0, 3), (1, 2), (2, 3))
    """
    if n < 1:
        raise ValueError(f"a topology needs at least one node, got {n}")
    if kind == "complete":
        return Topology(n, None, (), "complete")
    import networkx as nx  # optional dependency (extra "simnet"); imported only when needed

    def need(name: str, default: Any) -> Any:
        return params.get(name, default)

    graph: Any
    if kind == "ring":
        graph = nx.cycle_graph(n)
    elif kind in ("grid", "torus"):
        rows, cols = _grid_shape(n, need("rows", None), need("cols", None))
        graph = nx.grid_2d_graph(rows, cols, periodic=kind == "torus")
        graph = nx.convert_node_labels_to_integers(graph, ordering="sorted")
    elif kind == "random-regular":
        degree = int(need("degree", 4))
        if degree >= n or (n * degree) % 2:
            raise ValueError(
                f"random-regular: degree {degree} needs degree < n ({n}) and n * degree even"
            )
        graph = nx.random_regular_graph(degree, n, seed=seed)
    elif kind == "erdos-renyi":
        graph = nx.gnp_random_graph(n, float(need("p", 0.1)), seed=seed)
    elif kind == "small-world":
        degree = int(need("degree", 4))
        graph = nx.connected_watts_strogatz_graph(n, degree, float(need("p", 0.1)), seed=seed)
    elif kind == "scale-free":
        m = int(need("m", 2))
        if not 1 <= m < n:
            raise ValueError(f"scale-free: m must be between 1 and n - 1 ({n - 1}), got {m}")
        graph = nx.barabasi_albert_graph(n, m, seed=seed)
    else:
        raise ValueError(f"unknown topology {kind!r}; choose one of {', '.join(TOPOLOGY_KINDS)}")
    edges = sorted((min(a, b), max(a, b)) for a, b in graph.edges())
    details = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return Topology(n, tuple(edges), (), f"{kind}({details})" if details else kind)


def load_topology_file(path: Path) -> Topology:
    """Read a GML graph (``.gml``) or an edge list (any other suffix); see the module doc."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValueError(f"cannot read topology file {path}: {exc.strerror}") from None
    if size > _MAX_FILE_SIZE:
        raise ValueError(f"topology file {path} is {size} bytes; the limit is {_MAX_FILE_SIZE}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".gml":
        return _parse_gml(text, str(path))
    return parse_edge_list(text, str(path))


def parse_edge_list(text: str, where: str = "<edge list>") -> Topology:
    """Parse the edge-list format of the module docstring.

    >>> parse_edge_list("0 1 latency_ms=10\\n1 2").n
    3
    """
    edges: list[tuple[int, int]] = []
    links: list[dict[str, float]] = []
    seen: dict[tuple[int, int], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        here = f"{where}:{number}"
        if len(fields) < 2 or not fields[0].isdigit() or not fields[1].isdigit():
            raise ValueError(f"{here}: expected 'SOURCE TARGET [key=value ...]', got {raw!r}")
        a, b = int(fields[0]), int(fields[1])
        if a == b:
            raise ValueError(f"{here}: an edge from node {a} to itself")
        values: dict[str, Any] = {}
        for item in fields[2:]:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{here}: expected key=value, got {item!r}")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"{here}: {key} must be a number, got {value!r}") from None
        edge = (min(a, b), max(a, b))
        if edge in seen:
            raise ValueError(f"{here}: edge {a}-{b} appears twice (first on line {seen[edge]})")
        seen[edge] = number
        edges.append(edge)
        links.append(link_overrides(values, here))
    if not edges:
        raise ValueError(f"{where}: no edges")
    n = 1 + max(max(edge) for edge in edges)
    return Topology(n, tuple(edges), tuple(links), f"file({where})")


_QUANTITY = re.compile(r"^\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*$")
_TIME_UNITS = {"": 1e-3, "ms": 1e-3, "s": 1.0, "us": 1e-6, "ns": 1e-9}
_RATE_UNITS = {
    "": 1e6 / 8,
    "bit": 1 / 8,
    "kbit": 1e3 / 8,
    "mbit": 1e6 / 8,
    "gbit": 1e9 / 8,
    "byte": 1.0,
    "kib": 1024.0,
    "mib": 1024.0**2,
    "kbyte": 1e3,
    "mbyte": 1e6,
}


def _quantity(value: Any, units: dict[str, float], what: str, where: str) -> float:
    """A Shadow-style quantity: ``"50 ms"``, ``"10 Mbit"``, or a bare number (ms, Mbit)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) * units[""]
    match = _QUANTITY.match(str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in units:
        raise ValueError(
            f"{where}: {what} {value!r} is not a number with a unit "
            f"({', '.join(u for u in units if u)})"
        )
    return float(match.group(1)) * units[unit]


def _parse_gml(text: str, where: str) -> Topology:
    import networkx as nx  # optional dependency (extra "simnet")

    try:
        graph = nx.parse_gml(text, label="id")
    except nx.NetworkXError as exc:
        raise ValueError(f"{where}: not a valid GML graph: {exc}") from None
    index = {node: i for i, node in enumerate(graph.nodes())}
    edges: list[tuple[int, int]] = []
    links: list[dict[str, float]] = []
    seen: set[tuple[int, int]] = set()
    for source, target, data in graph.edges(data=True):
        a, b = index[source], index[target]
        edge = (min(a, b), max(a, b))
        if a == b or edge in seen:
            continue  # self-loops (Shadow's intra-host edges) and duplicates carry no reach
        seen.add(edge)
        here = f"{where}: edge {source}-{target}"
        overrides: dict[str, float] = {}
        if "latency" in data:
            overrides["latency"] = _quantity(data["latency"], _TIME_UNITS, "latency", here)
        if "jitter" in data:
            overrides["jitter"] = _quantity(data["jitter"], _TIME_UNITS, "jitter", here)
        if "bandwidth" in data:
            overrides["bandwidth"] = _quantity(data["bandwidth"], _RATE_UNITS, "bandwidth", here)
        for key in ("packet_loss", "loss"):
            if key in data:
                overrides["loss"] = float(data[key])
        edges.append(edge)
        links.append(overrides)
    order = sorted(range(len(edges)), key=lambda i: edges[i])
    return Topology(
        len(index),
        tuple(edges[i] for i in order),
        tuple(links[i] for i in order),
        f"file({where})",
    )
