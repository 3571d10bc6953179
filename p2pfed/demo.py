"""``p2pfed demo``: a small real federation on this machine, against centralized training.

The demo is ``p2pfed run`` (:mod:`p2pfed.run`) with the built-in digits task
(:mod:`p2pfed.tasks.digits`, split non-IID across the nodes): ``--nodes`` real node
processes (forked from one process that imported torch once; mDNS on the loopback
interface plus bootstrap addresses, Noise channels over TCP, secure aggregation), a
progress line, and when every node has done ``--rounds`` rounds a table of each node's
accuracy on the held-out test set next to the same model trained centrally on the union of
all nodes' data. A second federation then runs with record-level differential privacy
(DP-SGD on every node, :data:`DP_PARAMS`) at ``--epsilon`` and its accuracy is reported
too. With ``--dir`` the node directories, the per-round CSV files and the plots of both
runs stay in ``DIR/plain`` and ``DIR/dp``.

Example::

    $ p2pfed demo                 # 4 nodes, DP off then DP on
    $ p2pfed demo --nodes 6 --rounds 30 --no-dp --dir /tmp/demo
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from p2pfed.run import (
    DEFAULT_DP_CLIP,
    DELTA,
    FederationRun,
    RunOptions,
    add_common_arguments,
    create_local_federation,
    free_ports,
    render_table,
    run_federation,
    write_report,
)

__all__ = [
    "add_demo_parser",
    "centralized",
    "cmd_demo",
    "create_local_federation",
    "free_ports",
]

TASK = "p2pfed.tasks.digits:task"
DEFAULT_ROUNDS = 30
DEFAULT_EPSILON = 8.0
WITHIN = 0.03
"""The demo succeeds when every node is within this accuracy of centralized training."""
DP_PARAMS: dict[str, Any] = {
    "dp_level": "record",
    "dp_sample_rate": 0.25,
    "dp_steps": 2,
    "server_optimizer": "fedavgm",
    "server_momentum": 0.7,
}
"""The DP run's protocol parameters. Record level, because node-level DP does not pay with
a handful of nodes (README, "Differential privacy"): two DP-SGD steps a round on Poisson
quarters of the node's records, with server momentum: the setting bench/privacy.py chose
on public (generated) data, not tuned on the digits."""
DP_SETTINGS: dict[str, Any] = {"lr": 2.0}
"""The DP run's task settings: DP-SGD's learning rate (few large clipped steps a round)."""


def add_demo_parser(subparsers: Any) -> None:
    """``p2pfed demo [options]``."""
    p = subparsers.add_parser(
        "demo",
        help="run a small real federation on this machine and compare with central training",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--nodes", type=int, default=4, help="number of node processes (default 4)")
    p.add_argument(
        "--rounds",
        type=int,
        default=DEFAULT_ROUNDS,
        help=f"training rounds (default {DEFAULT_ROUNDS})",
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=DEFAULT_EPSILON,
        help=f"privacy budget of the DP run, at delta={DELTA:g} (default {DEFAULT_EPSILON:g})",
    )
    p.add_argument("--no-dp", action="store_true", help="skip the run with differential privacy")
    add_common_arguments(p)
    p.add_argument("--dir", type=Path, help="keep the node directories, results and plots here")
    p.set_defaults(handler=cmd_demo)


def centralized(seed: int, nodes: int, rounds: int) -> dict[str, float]:
    """The same initial model trained on the union of all nodes' data, as many epochs."""
    from p2pfed.tasks.digits import DEFAULT_TRAINING, task

    epochs = rounds * int(DEFAULT_TRAINING["local_epochs"])
    return task.centralized_baseline({"seed": seed, "num_nodes": nodes}, epochs)


def _run(args: argparse.Namespace, workdir: Path, label: str, dp: bool) -> FederationRun:
    options = RunOptions(
        task=TASK,
        nodes=args.nodes,
        rounds=args.rounds,
        epsilon=args.epsilon if dp else None,
        settings=dict(DP_SETTINGS) if dp else {},
        params=dict(DP_PARAMS) if dp else {},
        mdns=not args.no_mdns,
        timeout=args.timeout,
        label=label,
    )
    run = run_federation(workdir / label, options)
    if args.dir is not None:
        write_report(run, workdir / label)
    return run


def cmd_demo(args: argparse.Namespace) -> int:
    RunOptions(TASK, args.nodes, args.rounds, timeout=args.timeout).check()
    keep = args.dir is not None
    workdir = Path(args.dir) if keep else Path(tempfile.mkdtemp(prefix="p2pfed-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = sys.stdout
    print(
        f"p2pfed demo: {args.nodes} node processes on this machine, digits task split non-IID, "
        f"{args.rounds} rounds, secure aggregation on\n  work directory: {workdir}",
        file=out,
    )
    try:
        print("\nfederation without differential privacy:", file=out, flush=True)
        plain = _run(args, workdir, "plain", dp=False)
        baseline = centralized(plain.seed, args.nodes, args.rounds)["accuracy"]
        print(render_table(plain, baseline), file=out)
        rows = plain.rows()
        worst = max(baseline - (r["accuracy"] or 0.0) for r in rows)
        verdict = "within" if worst <= WITHIN else "NOT within"
        print(
            f"every node {verdict} {100 * WITHIN:g} points of centralized training (worst gap "
            f"{100 * worst:.2f} points); {plain.seconds:.1f}s",
            file=out,
        )
        if not args.no_dp:
            print(
                f"\nfederation with record-level differential privacy (DP-SGD, "
                f"epsilon={args.epsilon:g}, delta={DELTA:g} per record over {args.rounds} "
                "rounds):",
                file=out,
                flush=True,
            )
            private = _run(args, workdir, "dp", dp=True)
            print(render_table(private, baseline), file=out)
            accuracies = [r["accuracy"] or 0.0 for r in private.rows()]
            spent = max((r["epsilon_spent"] or 0.0) for r in private.rows())
            print(
                f"with DP: mean accuracy {sum(accuracies) / len(accuracies):.4f} at epsilon "
                f"spent {spent:.2f} (noise multiplier sigma={private.noise_multiplier:.2f}, "
                f"clip C={DEFAULT_DP_CLIP:g}); {private.seconds:.1f}s",
                file=out,
            )
        if keep:
            print(f"\nresults and plots: {workdir / 'plain'}", file=out)
        return 0 if worst <= WITHIN else 1
    finally:
        if not keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
