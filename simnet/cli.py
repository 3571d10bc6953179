"""``p2pfed simnet run SCENARIO.toml [--out DIR]``: run a scenario, write metrics and plots.

Only :func:`add_simnet_parser` is imported by :mod:`p2pfed.cli`; the simulator itself
(torch, networkx, the node) is imported inside :func:`cmd_simnet`, so ``p2pfed --version``
stays fast.

Example::

    $ p2pfed simnet run simnet/scenarios/basic.toml --out /tmp/basic
    round   1/10  t=   121.04s  live   20  median  12.0  consensus 4.52e+00  loss 0.317
        [0.288..0.547]  groups 84/17  (wall 7.2s)
    ...
    wrote /tmp/basic/metrics.csv, /tmp/basic/metrics.json, 4 plots
    PASS round goal: global round 10 of 10 at t=121.69s
    PASS models finite: 20 nodes live at the end; every node's model finite
    ...

(one line per global round, wrapped here; ``acc MEAN [MIN..MAX]`` too where the task
reports accuracy). The exit status is 1 if a check (:func:`simnet.checks.run_checks`)
fails, after one ``simnet: why: ...`` line (:func:`simnet.checks.why_failed`).

``p2pfed simnet sweep SWEEP.toml [--local | --address ADDR] [--jobs N]`` runs a base
scenario over lists of parameter values and seeds in parallel (:mod:`simnet.sweep`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_simnet_parser", "cmd_simnet", "cmd_sweep", "progress_line"]


def add_simnet_parser(subparsers: Any) -> None:
    """``p2pfed simnet run SCENARIO [--out DIR] [--keep-nodes DIR] [--quiet]``."""
    p = subparsers.add_parser(
        "simnet",
        help="simulate a deployment: real nodes on a virtual network in virtual time",
        description=(
            "Run the real p2pfed node code on a simulated network (latency, bandwidth, loss, "
            "partitions, crashes, churn) in virtual time, as a TOML scenario describes "
            "(format: simnet/README.md). The same scenario and seed give identical metrics."
        ),
    )
    actions = p.add_subparsers(dest="simnet_command", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="run a scenario file")
    run.add_argument("scenario", type=Path, metavar="SCENARIO.toml")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder for metrics.csv, metrics.json and plots (default: ./simnet-out/NAME)",
    )
    run.add_argument(
        "--keep-nodes",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the simulated node directories here (default: a temporary folder)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument(
        "--log-level",
        default="error",
        choices=["debug", "info", "warning", "error"],
        help="log level of the simulated nodes (default error: their logs are many)",
    )
    run.set_defaults(handler=cmd_simnet)
    _add_sweep_parser(actions)


def _add_sweep_parser(actions: Any) -> None:
    """``p2pfed simnet sweep SWEEP.toml [--out DIR] [--local] [--jobs N] [--address ADDR]``."""
    sweep = actions.add_parser(
        "sweep",
        help="run a scenario over lists of parameter values and seeds, in parallel",
        description=(
            "Expand a base scenario over the lists of a sweep file (format: simnet/README.md) "
            "and run every combination in parallel: on Ray when it is installed (a local "
            "instance, or --address), otherwise in local processes. Writes each run's "
            "folder, sweep.csv, sweep.json and comparison plots."
        ),
    )
    sweep.add_argument("sweep", type=Path, metavar="SWEEP.toml")
    sweep.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default: ./simnet-out/NAME)",
    )
    where = sweep.add_mutually_exclusive_group()
    where.add_argument(
        "--local", action="store_true", help="run in local processes even if Ray is installed"
    )
    where.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="the Ray cluster to run on (as ray.init(address=...) takes it; needs Ray)",
    )
    sweep.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="runs at once on this machine (default: the number of cores)",
    )
    sweep.add_argument("--quiet", action="store_true", help="no progress lines")
    sweep.add_argument(
        "--log-level",
        default="error",
        choices=["debug", "info", "warning", "error"],
        help="log level of the simulated nodes (default error)",
    )
    sweep.set_defaults(handler=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a sweep file; exit status 1 if a run did not pass (after one summary line)."""
    from p2pfed.errors import ConfigError
    from simnet.sweep import LocalRunner, RayRunner, load_sweep, run_sweep

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs} (omit it for all cores)")
    sweep = load_sweep(args.sweep)
    runner: LocalRunner | RayRunner
    if args.address is not None:
        runner = RayRunner(args.address, args.jobs)
    elif args.local or importlib.util.find_spec("ray") is None:
        runner = LocalRunner(args.jobs)
    else:
        runner = RayRunner(None, args.jobs)
    out_dir: Path = args.out or Path("simnet-out") / sweep.name
    if not args.quiet:
        print(
            f"simnet: sweep {sweep.name}: {len(sweep.runs)} runs of {sweep.base} on "
            f"{runner.describe()}",
            file=sys.stderr,
        )

    def say(line: str) -> None:
        print(f"simnet: {line}", file=sys.stderr, flush=True)

    rows = run_sweep(
        sweep, out_dir, runner, log_level=args.log_level, progress=None if args.quiet else say
    )
    statuses = ("PASS", "FAIL", "ERROR", "DIED")
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in statuses}
    print(f"wrote {out_dir / 'sweep.csv'}, {out_dir / 'sweep.json'} and {out_dir / 'runs'}/")
    verdict = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"simnet: sweep {sweep.name}: {len(rows)} runs: {verdict}", file=sys.stderr)
    return 0 if counts["PASS"] == len(rows) else 1


def progress_line(row: dict[str, Any], total: int | None, wall: float) -> str:
    """One progress line for a metrics row: the round, the live nodes, the consensus
    distance, accuracy and loss (mean, with the spread over the nodes) where the task
    evaluates, and the groups completed/aborted."""
    goal = f"/{total}" if total else ""
    text = (
        f"round {row['round']:>3}{goal}  t={row['time']:>9.2f}s  live {row['live_nodes']:>4}  "
        f"median {row['round_median'] or 0:>5.1f}  consensus {row['consensus_max']:.2e}"
    )
    if row.get("accuracy_mean") is not None:
        text += (
            f"  acc {row['accuracy_mean']:.3f} "
            f"[{row['accuracy_min']:.3f}..{row['accuracy_max']:.3f}]"
        )
    if row.get("loss_mean") is not None:
        text += f"  loss {row['loss_mean']:.3g} [{row['loss_min']:.3g}..{row['loss_max']:.3g}]"
    return text + f"  groups {row['groups_completed']}/{row['groups_aborted']}  (wall {wall:.1f}s)"


def _progress(started: float, total: int | None) -> Any:
    def show(row: dict[str, Any]) -> None:
        line = progress_line(row, total, time.perf_counter() - started)
        print(line, file=sys.stderr, flush=True)

    return show


def _final_metrics(summary: dict[str, Any]) -> str:
    """``; accuracy MEAN [MIN..MAX], loss ...`` of the nodes live at the end, if evaluated."""
    parts = [
        f"{metric} {summary[f'final_{metric}_mean']:.3g} "
        f"[{summary[f'final_{metric}_min']:.3g}..{summary[f'final_{metric}_max']:.3g}]"
        for metric in ("accuracy", "loss")
        if summary.get(f"final_{metric}_mean") is not None
    ]
    return "; final " + ", ".join(parts) if parts else ""


def cmd_simnet(args: argparse.Namespace) -> int:
    """Run the scenario and write the results (see the module docstring)."""
    from simnet.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # the levels are this command's: put them back afterwards, so that an in-process call
    # (a test, a notebook) does not silence the caller's own p2pfed logging
    levels = {name: logging.getLogger(name).level for name in ("p2pfed", "simnet")}
    for name in levels:
        logging.getLogger(name).setLevel(args.log_level.upper())
    try:
        return _run_scenario(args, scenario)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _run_scenario(args: argparse.Namespace, scenario: Any) -> int:
    from simnet.report import write_metrics, write_plots
    from simnet.simulation import run_simulation

    out_dir: Path = args.out or Path("simnet-out") / (scenario.name or args.scenario.stem)
    started = time.perf_counter()
    progress = None if args.quiet else _progress(started, scenario.rounds)
    if not args.quiet:
        print(
            f"simnet: {scenario.name}: {scenario.nodes.count or 'file'} nodes, "
            f"{scenario.topology.kind} topology, seed {scenario.seed}",
            file=sys.stderr,
        )
    try:
        if args.keep_nodes is not None:
            result = run_simulation(scenario, args.keep_nodes, progress=progress)
        else:
            with tempfile.TemporaryDirectory(prefix="simnet-") as work:
                result = run_simulation(scenario, Path(work), progress=progress)
    except ValueError as exc:
        from p2pfed.errors import ConfigError

        raise ConfigError(f"{args.scenario}: {exc}") from None
    files = write_metrics(result, out_dir)
    plots, why = write_plots(result, out_dir)
    if why:
        print(f"simnet: {why}", file=sys.stderr)
    summary = result.summary
    print(
        f"simnet: {'done' if summary['completed'] else 'duration reached'} after "
        f"{summary['simulated_seconds']:.1f} simulated seconds in {result.wall_seconds:.1f}s "
        f"wall; rounds {summary['rounds_min']}..{summary['rounds_max']}, "
        f"{summary['groups_completed']} groups completed, {summary['groups_aborted']} aborted"
        + _final_metrics(summary),
        file=sys.stderr,
    )
    print(f"wrote {', '.join(str(p) for p in files)}" + (f", {len(plots)} plots" if plots else ""))
    for check in result.checks:
        print(check.line())
    failed = [c.name for c in result.checks if not c.passed]
    if failed:
        print(
            f"simnet: {len(failed)} of {len(result.checks)} checks FAILED: {', '.join(failed)}",
            file=sys.stderr,
        )
        if summary.get("why"):
            print(f"simnet: why: {summary['why']}", file=sys.stderr)
        return 1
    print(f"simnet: all {len(result.checks)} checks passed", file=sys.stderr)
    return 0
