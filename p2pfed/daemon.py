"""``p2pfed node``: run a node in the foreground until SIGINT or SIGTERM.

The daemon is the node (:mod:`p2pfed.node`) plus what an operator needs around it: logs
(readable, or JSON lines with ``--log-json``), a graceful stop on SIGINT/SIGTERM (the
current group finishes or aborts cleanly, channels are closed with a Close message), the
status file that ``p2pfed status`` reads, and an optional Prometheus endpoint.

When it stops, the node prints one JSON line to stdout with its final state (round,
metrics, privacy spent): the demo and scripts read it.

Example::

    $ p2pfed node ~/.p2pfed --task p2pfed.tasks.digits:task
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2pfed.config import default_node_dir, load_config, parse_host_port
from p2pfed.errors import ConfigError
from p2pfed.logs import setup_logging

if TYPE_CHECKING:  # the node pulls in torch: import it only when a node runs
    from p2pfed.group import GroupAborted, GroupCompleted
    from p2pfed.node import Node, NodeOptions, RoundReport

__all__ = [
    "add_node_parser",
    "bootstrap_status",
    "cmd_node",
    "parse_listen",
    "parse_task_settings",
    "run_node",
]

log = logging.getLogger("p2pfed.daemon")


def add_node_parser(subparsers: Any) -> None:
    """``p2pfed node [DIR] [options]``."""
    p = subparsers.add_parser(
        "node",
        help="run a node in the foreground (Ctrl-C stops it cleanly)",
        description=(
            "Run the node of DIR: find peers (mDNS, bootstrap, peer exchange), train on the "
            "local data and average privately in groups, checkpointing every round. Stops "
            "cleanly on SIGINT or SIGTERM and resumes from its checkpoint when restarted."
        ),
    )
    p.add_argument("dir", nargs="?", metavar="DIR", help="node directory (default: ~/.p2pfed)")
    p.add_argument("--task", metavar="MODULE:OBJ", help="task to train (overrides config.toml)")
    p.add_argument(
        "--set",
        dest="task_settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task setting (repeatable; integers and floats are converted)",
    )
    p.add_argument("--rounds", type=int, metavar="N", help="stop training after N rounds")
    p.add_argument(
        "--linger",
        action="store_true",
        help="after --rounds, keep averaging (without training) until stopped",
    )
    p.add_argument("--no-train", action="store_true", help="pure secure averaging, no training")
    p.add_argument(
        "--evaluate-every",
        type=int,
        default=1,
        metavar="N",
        help="evaluate on the local test data every N rounds (default 1; 0: never)",
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="listen address (overrides config.toml)")
    p.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a peer to connect to at start (repeatable; added to config.toml's list)",
    )
    p.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    # benchmarks only (bench/allreduce.py): contributions unmasked, the privacy is gone
    p.add_argument("--insecure-no-masking", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.set_defaults(handler=cmd_node)


def parse_task_settings(pairs: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        value: Any = text
        for convert in (int, float):
            try:
                value = convert(text)
                break
            except ValueError:
                continue
        settings[key] = value
    return settings


def cmd_node(args: argparse.Namespace) -> int:
    node_dir = Path(args.dir).expanduser() if args.dir else default_node_dir()
    if not node_dir.is_dir():
        raise ConfigError(f"{node_dir} is not a node directory: run `p2pfed init {node_dir}`")
    setup_logging("json" if args.log_json else "text", args.log_level)
    from p2pfed.node import NodeOptions

    options = NodeOptions(
        training=not args.no_train,
        max_rounds=args.rounds,
        linger=args.linger,
        task_config=parse_task_settings(args.task_settings),
        masking=not args.insecure_no_masking,
        evaluate_every=args.evaluate_every,
    )
    if args.evaluate_every < 0:
        raise ConfigError(
            f"--evaluate-every must be 0 (never) or a number of rounds, got {args.evaluate_every}"
        )
    result = trio.run(run_node, node_dir, options, args)
    print(json.dumps(result), flush=True)
    return 0


async def run_node(node_dir: Path, options: NodeOptions, args: argparse.Namespace) -> dict:
    """Run the node of ``node_dir`` until a signal (or the end of ``--rounds``)."""
    from p2pfed.group import GroupAborted, GroupCompleted
    from p2pfed.metrics import NodeMetrics, serve_metrics
    from p2pfed.network import TcpNetwork
    from p2pfed.node import Node
    from p2pfed.status import StatusWriter, federation_metrics_mode

    config = load_config(node_dir)
    overrides: dict[str, Any] = {}
    if args.listen:
        host, port = parse_listen(args.listen)
        overrides.update(listen_host=host, listen_port=port)
    if args.bootstrap:
        for entry in args.bootstrap:
            parse_host_port(entry)  # a clear error now rather than a failed dial later
        overrides["bootstrap"] = (*config.bootstrap, *args.bootstrap)
    config = dataclasses.replace(config, **overrides)
    if options.grid is None:
        options = dataclasses.replace(options, grid=config.grid_position())
    network = TcpNetwork(mdns=config.mdns, mdns_interfaces=tuple(config.mdns_interfaces))
    metrics = NodeMetrics()
    status = StatusWriter(node_dir, state="starting")

    def on_round(report: RoundReport) -> None:
        refresh()
        metrics.round_completed(report, node)
        status.update(
            trio.current_time(),
            round=report.round,
            accuracy=report.metrics.get("accuracy"),
            loss=report.metrics.get("loss"),
            federation=node.federation_metrics,
            epsilon_spent=report.epsilon_spent,
            local_epsilon_spent=node.ledger.local_spent()
            if node.ledger is not None and node.federation.params.dp_level == "distributed"
            else None,
            dp_exhausted=node.budget_exhausted if node.ledger is not None else None,
        )

    def on_group(outcome: GroupCompleted | GroupAborted, seconds: float) -> None:
        completed = isinstance(outcome, GroupCompleted)
        metrics.group_finished("completed" if completed else "aborted", seconds)
        status.record_group(
            trio.current_time(),
            group_id=outcome.group_id,
            size=len(outcome.members) if isinstance(outcome, GroupCompleted) else 0,
            outcome="completed" if completed else "aborted",
            seconds=seconds,
            reason=outcome.reason if isinstance(outcome, GroupAborted) else None,
        )

    node = Node.from_directory(
        node_dir,
        network=network,
        options=options,
        task_spec=args.task,
        config=config,
        on_round=on_round,
        on_group=on_group,
    )
    if not options.masking:
        # privacy off must never pass unnoticed: every start says so, and so does status
        log.warning(
            "secure aggregation is OFF (--insecure-no-masking): peers see this node's "
            "model in the clear; use it only for benchmarks, never with private data"
        )
    status.update(trio.current_time(), masking=options.masking)
    # trio's clock to wall-clock seconds, fixed once: recomputed on every refresh, the
    # times of an unchanged bootstrap entry could flip by a second and rewrite the file
    wall_offset = time.time() - trio.current_time()

    def refresh() -> None:
        metrics.refresh(node)
        peers = node.peer_summary()
        status.update(
            trio.current_time(),
            peers=peers,
            bootstrap=bootstrap_status(node, wall_offset),
            stall=node.stall_reason(),
            round=node.round,
        )

    async def publish_periodically() -> None:
        while True:
            refresh()
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, node)
        if config.metrics:
            port = await nursery.start(
                serve_metrics, metrics.registry, config.metrics_host, config.metrics_port
            )
            log.info("metrics at http://%s:%d/metrics", config.metrics_host, port)
        async with trio.open_nursery() as running:
            await running.start(node.run)
            status.update(
                trio.current_time(),
                force=True,
                state="running",
                node_id=str(node.node_id),
                listen=f"{config.listen_host}:{node.listen_port}",
                dp_enabled=node.federation.params.dp_enabled,
                epsilon_budget=node.ledger.epsilon_budget if node.ledger else None,
                federation_metrics=federation_metrics_mode(
                    node.federation.params.federation_metrics, node.federation.params.dp_enabled
                ),
            )
            metrics.node_started(node)
            running.start_soon(publish_periodically)
            await node.finished.wait()
            running.cancel_scope.cancel()
        status.update(
            trio.current_time(),
            force=True,
            state="stopped",
            round=node.round,
            accuracy=node.last_metrics.get("accuracy"),
            loss=node.last_metrics.get("loss"),
            federation=node.federation_metrics,
        )
        status.flush(trio.current_time())
        nursery.cancel_scope.cancel()
    return node.final_report()


def parse_listen(text: str) -> tuple[str, int]:
    """``--listen HOST:PORT``, where port 0 means any free port (as in config.toml).

    >>> parse_listen("127.0.0.1:0")
    ('127.0.0.1', 0)
    """
    # parse_host_port is for addresses to dial, where port 0 is meaningless: reuse its
    # checks of the host part with a stand-in port, then put the 0 back
    any_port = text.endswith(":0") and not text.endswith("::0")
    try:
        host, port = parse_host_port(text[:-1] + "1" if any_port else text)
    except ValueError as exc:
        raise ConfigError(f"--listen: {exc}") from None
    return host, 0 if any_port else port


def bootstrap_status(node: Node, wall_offset: float) -> list[dict[str, Any]]:
    """The node's bootstrap addresses as ``status.json`` entries (:mod:`p2pfed.status`).

    The node keeps times in trio's clock; ``wall_offset`` (wall-clock seconds minus trio's
    clock) turns them into the file's ISO 8601 UTC times.
    """
    from p2pfed.status import iso_utc

    def wall(moment: float | None) -> str | None:
        return None if moment is None else iso_utc(moment + wall_offset)

    return [
        {
            **row,
            "failing_since": wall(row["failing_since"]),
            "next_attempt": wall(row["next_attempt"]),
        }
        for row in node.bootstrap_summary()
    ]


async def _stop_on_signals(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: stopping after the current group", signal.Signals(signum).name)
            node.request_stop()
            print("stopping (send again to force)", file=sys.stderr)
            async for _ in signals:
                raise KeyboardInterrupt
