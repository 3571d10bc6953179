"""Parameter sweeps: one base scenario expanded over lists of values and seeds.

A sweep file names a base scenario (relative to the sweep file) and a ``[sweep]`` table
mapping dotted scenario keys to lists of values, plus ``seeds``; the cartesian product
of the lists (seeds innermost) gives the runs::

    name = "basic-groups"          # a label (default: the file name)
    base = "basic.toml"

    [sweep]
    "protocol.group_max" = [4, 8]
    "link.latency_ms" = [5, 50]
    seeds = [1, 2, 3]              # default: the base scenario's seed

Each run is the base scenario with those keys set and ``seed`` replaced, and nothing
else: not even its ``name``, which seeds the federation. So a run's ``metrics.csv`` and
``metrics.json`` are byte-identical to ``p2pfed simnet run`` of the ``scenario.toml``
the sweep writes beside them. Every run is validated before any starts.

:func:`run_sweep` runs them in parallel, each in a fresh process (so no state of an
earlier run in the same process can leak into a later one): on Ray when a
:class:`RayRunner` is given (a local instance, or a cluster by address), otherwise in
local processes (:class:`LocalRunner`). A run whose worker process died (killed, out of
memory, ``os._exit``) is run once more; a second death marks it ``DIED``. A run that
raised is ``ERROR`` (not retried: it would raise again). Results come back to the caller
as data, not files on the worker's disk, so a cluster needs no shared file system.

Outputs (:func:`write_sweep`): ``runs/NNN-KEY=VALUE-...-seed=S/`` per run (what
``p2pfed simnet run`` writes, plus ``scenario.toml``), ``sweep.csv`` and ``sweep.json``
(one row per run: parameters, seed, status, each check's PASS/FAIL, summary figures,
wall seconds and attempts) and ``sweep-METRIC-by-KEY.png`` comparison plots.
"""

from __future__ import annotations

import copy
import csv
import importlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import socket
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from p2pfed.atomicfile import atomic_write_text
from p2pfed.errors import ConfigError
from simnet.scenario import Scenario, parse_scenario

__all__ = [
    "MAX_RUNS",
    "SUMMARY_FIELDS",
    "LocalRunner",
    "RayRunner",
    "RunJob",
    "RunOutcome",
    "Sweep",
    "SweepRun",
    "load_sweep",
    "parse_sweep",
    "run_job",
    "run_sweep",
    "sweep_csv",
    "write_sweep",
]

MAX_RUNS = 10_000
"""Most runs one sweep file may expand to (checked before expanding)."""

_MAX_FILE_SIZE = 1024 * 1024
_MAX_VALUES = 1000
_ATTEMPTS = 2  # a run whose worker died is run once more

SUMMARY_FIELDS = (
    "completed",
    "rounds_min",
    "rounds_max",
    "simulated_seconds",
    "live_nodes",
    "final_accuracy_mean",
    "final_accuracy_min",
    "final_accuracy_max",
    "final_loss_mean",
    "final_loss_min",
    "final_loss_max",
    "final_consensus_max",
    "final_target_distance_max",
    "groups_completed",
    "groups_aborted",
    "bytes",
    "crashes",
    "restarts",
)
"""The figures of each run's summary (``metrics.json``) that ``sweep.csv`` repeats;
``_min``/``_max`` are the spread over the nodes live at the end."""

PLOT_METRICS = (
    "final_accuracy_mean",
    "final_loss_mean",
    "final_consensus_max",
    "simulated_seconds",
    "groups_aborted",
    "bytes",
)
"""Metrics plotted against each swept key (those without values are skipped)."""


def _scenario_tables() -> dict[str, type[Any]]:
    """The scenario's tables and their dataclasses: ``nodes``: NodesSpec, ..."""
    tables: dict[str, type[Any]] = {}
    for item in fields(Scenario):
        factory = item.default_factory
        if isinstance(factory, type) and is_dataclass(factory):
            tables[item.name] = factory
    return tables


_SECTIONS = _scenario_tables()
# the scenario's own top-level values (rounds, duration), derived so that a key added
# to the format is sweepable at once; name and seed have rules of their own
_TOP_KEYS = tuple(
    f.name
    for f in fields(Scenario)
    if f.name not in ("name", "seed") and f.name not in _SECTIONS and f.default != ()
)
_ARRAYS = tuple(f.name for f in fields(Scenario) if f.default == ())  # [[events]], ...


@dataclass(frozen=True)
class SweepRun:
    """One expanded scenario: the base with ``params`` set and ``seed`` replaced."""

    index: int
    params: tuple[tuple[str, Any], ...]
    seed: int
    scenario_toml: str
    """The whole scenario as TOML: what the run executes, and writes as ``scenario.toml``."""

    @property
    def label(self) -> str:
        """``group_max=8 latency_ms=50 seed=2``: the last part of each key, for people."""
        parts = [f"{key.rsplit('.', 1)[-1]}={_show(value)}" for key, value in self.params]
        return " ".join([*parts, f"seed={self.seed}"])

    @property
    def dirname(self) -> str:
        """``003-group_max=8-latency_ms=50-seed=2``: unique in the sweep, safe as a file name."""
        name = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", self.label.replace(" ", "-"))
        return f"{self.index + 1:03d}-{name}"[:120]


@dataclass(frozen=True)
class Sweep:
    """A parsed, expanded and validated sweep file."""

    name: str
    path: Path
    base: Path
    keys: tuple[str, ...]
    seeds: tuple[int, ...]
    runs: tuple[SweepRun, ...] = field(repr=False)


def _show(value: Any) -> str:
    return tomli_w.dumps({"v": value})[4:-1] if not isinstance(value, str) else value


def load_sweep(path: Path) -> Sweep:
    """Read, expand and validate a sweep file (see the module docstring)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_SIZE:
            raise ConfigError(
                f"sweep file {path} is {size} bytes; the limit is {_MAX_FILE_SIZE} "
                "(list fewer values)"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read sweep file {path}: {exc.strerror or exc} (check the path)"
        ) from None
    return parse_sweep(text, path=path)


def parse_sweep(text: str, *, path: Path) -> Sweep:
    """Parse sweep TOML text; ``path`` locates the base scenario and names the file in errors.

    Raises :class:`~p2pfed.errors.ConfigError` naming the key and saying what to do.
    """
    where = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc} (fix the syntax)") from None
    unknown = sorted(set(data) - {"name", "base", "sweep"})
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key {unknown[0]!r} (known: name, base, [sweep]; "
            "swept scenario keys go in the [sweep] table)"
        )
    base_value = data.get("base")
    if not isinstance(base_value, str) or not base_value:
        raise ConfigError(
            f'{where}: no base scenario (add base = "SCENARIO.toml", relative to the sweep file)'
        )
    base = (path.parent / base_value).resolve()
    name = data.get("name", path.name.removesuffix(".toml").removesuffix(".sweep"))
    if not isinstance(name, str):
        raise ConfigError(f'{where}: name must be a string (name = "LABEL")')
    table = data.get("sweep")
    if not isinstance(table, dict) or not table:
        raise ConfigError(
            f'{where}: no [sweep] table (add [sweep] with lists, e.g. "protocol.group_max" '
            "= [4, 8], and seeds = [1, 2])"
        )
    table = dict(table)
    seeds_value = table.pop("seeds", None)
    lists: list[tuple[str, list[Any]]] = []
    for key, values in _flatten(table):
        _check_key(where, key)
        lists.append((key, _check_list(where, key, values)))
    try:
        base_size = base.stat().st_size
        if base_size > _MAX_FILE_SIZE:
            raise ConfigError(f"{where}: base scenario {base} is {base_size} bytes (too large)")
        base_data = tomllib.loads(base.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read the base scenario {base}: {exc.strerror or exc} "
            "(base is relative to the sweep file)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{base}: not valid TOML: {exc} (fix the base scenario)") from None
    if seeds_value is None:
        seeds = [base_data.get("seed", 0)]
    else:
        seeds = _check_list(where, "seeds", seeds_value)
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ConfigError(f"{where}: [sweep] seeds must be integers >= 0, got {seed!r}")
    total = math.prod(len(values) for _, values in lists) * len(seeds)
    if total > MAX_RUNS:
        raise ConfigError(
            f"{where}: the sweep expands to {total} runs; the limit is {MAX_RUNS} "
            "(list fewer values or split the sweep)"
        )
    _absolute_paths(base_data, base.parent)
    runs: list[SweepRun] = []
    keys = tuple(key for key, _ in lists)
    for combo in itertools.product(*(values for _, values in lists), seeds):
        *values, seed = combo
        params = tuple(zip(keys, values, strict=True))
        scenario = copy.deepcopy(base_data)
        for key, value in params:
            _assign(scenario, key, value)
        scenario["seed"] = seed
        run = SweepRun(len(runs), params, seed, tomli_w.dumps(scenario))
        # every run validated now: a typo in the 40th combination fails before the 1st runs
        parse_scenario(run.scenario_toml, base=base.parent, where=f"{where}: run {run.label}")
        runs.append(run)
    return Sweep(name, path, base, keys, tuple(seeds), tuple(runs))


def _flatten(table: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``"protocol.group_max" = [..]`` and ``[sweep.protocol] group_max = [..]`` alike."""
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_key(where: str, key: str) -> None:
    parts = key.split(".")
    if key == "seed":
        raise ConfigError(f"{where}: [sweep] sweeps seeds with seeds = [..], not seed")
    if key == "name":
        raise ConfigError(
            f"{where}: [sweep] cannot sweep name (it seeds the federation; make two base files)"
        )
    if len(parts) == 1:
        if key in _TOP_KEYS:
            return
        if key in _ARRAYS:
            raise ConfigError(
                f"{where}: [sweep] cannot sweep [[{key}]] (make one base scenario per variant)"
            )
        raise ConfigError(
            f"{where}: [sweep] key {key!r} is not a scenario key (known: seeds, "
            f"{', '.join(_TOP_KEYS)}, or SECTION.KEY with SECTION one of {', '.join(_SECTIONS)})"
        )
    section, rest = parts[0], parts[1:]
    if section not in _SECTIONS:
        raise ConfigError(
            f"{where}: [sweep] key {key!r}: the scenario has no [{section}] "
            f"(sections: {', '.join(_SECTIONS)})"
        )
    known = [f.name for f in fields(_SECTIONS[section])]
    if section == "task" and rest[0] == "settings" and len(rest) == 2:
        return  # task settings are the task's own: any name
    if len(rest) != 1 or rest[0] not in known or (section, rest[0]) == ("task", "settings"):
        raise ConfigError(
            f"{where}: [sweep] key {key!r} is not a scenario key ([{section}] has: "
            f"{', '.join(known)}; task settings are task.settings.NAME)"
        )


def _check_list(where: str, key: str, values: Any) -> list[Any]:
    if not isinstance(values, list):
        raise ConfigError(
            f"{where}: [sweep] {key} must be a list of values (write {key} = [{_show(values)}])"
        )
    if not values:
        raise ConfigError(f"{where}: [sweep] {key} is an empty list (give at least one value)")
    if len(values) > _MAX_VALUES:
        raise ConfigError(
            f"{where}: [sweep] {key} has {len(values)} values (at most {_MAX_VALUES})"
        )
    shown = [_show(v) for v in values]
    if len(set(shown)) != len(shown):
        raise ConfigError(f"{where}: [sweep] {key} lists a value twice (remove the duplicate)")
    return values


def _assign(data: dict[str, Any], key: str, value: Any) -> None:
    *tables, last = key.split(".")
    for name in tables:
        data = data.setdefault(name, {})
    data[last] = value


def _absolute_paths(data: dict[str, Any], base_dir: Path) -> None:
    """Make a topology file path absolute, so that the ``scenario.toml`` written into a
    run's folder runs anywhere (it names the same file, hence the same description)."""
    topology = data.get("topology")
    if isinstance(topology, dict) and isinstance(topology.get("file"), str):
        topology["file"] = str(base_dir / topology["file"])


# -- running ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunJob:
    """What a worker process needs for one run: small and picklable."""

    index: int
    label: str
    scenario_toml: str
    base_dir: str
    log_level: str = "error"
    sys_path: tuple[str, ...] = ()
    """The caller's import path: a custom task (``module:object``) importable there is
    importable in the worker too (Ray workers do not inherit it)."""


@dataclass
class RunOutcome:
    """A finished run: its ``sweep.csv`` row fields and the files of its folder."""

    index: int
    status: str
    """``PASS`` (every check passed), ``FAIL``, ``ERROR`` (the run raised) or ``DIED``."""
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    wall_seconds: float = 0.0
    attempts: int = 1
    error: str = ""


def run_job(job: RunJob) -> RunOutcome:
    """Run one scenario as ``p2pfed simnet run`` would; return its files as bytes.

    Runs in a worker process. An exception of the simulation becomes an ``ERROR``
    outcome (with the message); only the death of the process escapes.
    """
    for entry in reversed(job.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # put the levels back afterwards: a caller running jobs in its own process (a test)
    # keeps its logging as it was
    levels = {name: logging.getLogger(name).level for name in ("p2pfed", "simnet")}
    for name in levels:
        logging.getLogger(name).setLevel(job.log_level.upper())
    try:
        return _simulate(job)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _simulate(job: RunJob) -> RunOutcome:
    started = time.perf_counter()
    try:
        from simnet.report import write_metrics, write_plots
        from simnet.simulation import run_simulation

        scenario = parse_scenario(job.scenario_toml, base=Path(job.base_dir), where=job.label)
        with tempfile.TemporaryDirectory(prefix="simnet-sweep-") as work:
            out = Path(work) / "out"
            result = run_simulation(scenario, Path(work) / "nodes")
            written = write_metrics(result, out)
            plots, _ = write_plots(result, out)
            files = {p.name: p.read_bytes() for p in [*written, *plots]}
    except Exception as exc:  # reported in the run's row; the sweep goes on
        logging.getLogger("simnet.sweep").debug("run %s failed", job.label, exc_info=True)
        return RunOutcome(
            job.index,
            "ERROR",
            wall_seconds=time.perf_counter() - started,
            error=f"{type(exc).__name__}: {exc}",
        )
    failed = [c for c in result.checks if not c.passed]
    return RunOutcome(
        job.index,
        "FAIL" if failed else "PASS",
        summary=result.summary,
        files=files,
        wall_seconds=result.wall_seconds,
    )


Progress = Callable[[str], None]


class LocalRunner:
    """Runs jobs in local processes, at most ``jobs`` at a time, each in a process of its
    own (a single-worker pool per run: a death breaks only that run's pool, so the run to
    retry is known)."""

    def __init__(self, jobs: int | None = None) -> None:
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        # spawn, not fork: the parent may run threads (trio, torch) that fork would copy
        # mid-operation; forkserver would be faster but is not on every platform
        self.context = multiprocessing.get_context("spawn")

    def describe(self) -> str:
        return f"{self.jobs} local process{'es' if self.jobs != 1 else ''}"

    def run(self, jobs: Sequence[RunJob], progress: Progress) -> Iterable[RunOutcome]:
        queue = [(job, 1) for job in jobs]
        queue.reverse()
        active: dict[Future[RunOutcome], tuple[RunJob, int, ProcessPoolExecutor]] = {}
        try:
            while queue or active:
                while queue and len(active) < self.jobs:
                    job, attempt = queue.pop()
                    pool = ProcessPoolExecutor(max_workers=1, mp_context=self.context)
                    active[pool.submit(run_job, job)] = (job, attempt, pool)
                done, _ = wait(list(active), return_when=FIRST_COMPLETED)
                for future in done:
                    job, attempt, pool = active.pop(future)
                    pool.shutdown(wait=True)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        if attempt < _ATTEMPTS:
                            progress(f"run {job.label}: its worker process died; retrying")
                            queue.append((job, attempt + 1))
                            continue
                        outcome = RunOutcome(job.index, "DIED", error=_died(attempt))
                    outcome.attempts = attempt
                    yield outcome
        finally:
            for _, _, pool in active.values():
                pool.shutdown(wait=False, cancel_futures=True)


def _died(attempts: int) -> str:
    return f"the worker process died in each of {attempts} attempts"


class RayRunner:
    """Runs jobs as Ray tasks, one CPU and one fresh worker process (``max_calls=1``)
    each: on a local Ray instance, or on the cluster at ``address``. If Ray is already
    initialised (a notebook, a test), that instance is used and left running."""

    def __init__(self, address: str | None = None, jobs: int | None = None) -> None:
        try:
            # through importlib: Ray is an optional extra, and its own type hints are
            # none of mypy's business here
            self.ray: Any = importlib.import_module("ray")
        except ImportError:
            raise ConfigError(
                "Ray is not installed (pip install 'p2pfed[sweep]', or run the sweep in "
                "local processes: drop --address)"
            ) from None
        self.address = address
        self.jobs = jobs

    def describe(self) -> str:
        return f"Ray at {self.address}" if self.address else "a local Ray instance"

    def run(self, jobs: Sequence[RunJob], progress: Progress) -> Iterable[RunOutcome]:
        ray = self.ray
        owned = not ray.is_initialized()
        if owned and self.address:
            self._reachable(self.address)
        if owned:
            try:
                # WARNING: Ray's INFO lines would interleave with the progress lines; the
                # workers' own log lines (--log-level) still reach the terminal, as locally
                quiet = {"logging_level": logging.WARNING}
                if self.address:
                    ray.init(address=self.address, **quiet)
                else:
                    ray.init(num_cpus=self.jobs, include_dashboard=False, **quiet)
            except Exception as exc:
                raise ConfigError(
                    f"cannot start or reach Ray{f' at {self.address}' if self.address else ''}:"
                    f" {exc} (check --address, or use --local)"
                ) from None
        try:
            yield from self._run(jobs, progress)
        finally:
            if owned:
                ray.shutdown()

    @staticmethod
    def _reachable(address: str) -> None:
        """Fail fast on a ``HOST:PORT`` nobody listens on: Ray itself keeps retrying for
        minutes. Other forms (``auto``, ``ray://...``) are left to Ray."""
        match = re.fullmatch(r"\[?([\w.:-]+?)\]?:(\d+)", address)
        if match is None:
            return
        try:
            socket.create_connection((match[1], int(match[2])), timeout=10).close()
        except OSError as exc:
            raise ConfigError(
                f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} (is its head "
                "running there? give its GCS address, as `ray start --head` prints it, "
                "or use --local)"
            ) from None

    def _run(self, jobs: Sequence[RunJob], progress: Progress) -> Iterable[RunOutcome]:
        ray = self.ray
        errors = importlib.import_module("ray.exceptions")
        # retries are ours, not Ray's max_retries, to count attempts in the same way as the
        # local runner; max_calls=1: a fresh process per run, as locally
        remote = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(run_job)
        pending = {remote.remote(job): (job, 1) for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job, attempt = pending.pop(ref)
                try:
                    outcome: RunOutcome = ray.get(ref)
                except errors.RayTaskError as exc:  # raised inside run_job itself
                    outcome = RunOutcome(job.index, "ERROR", error=str(exc).splitlines()[-1])
                except errors.RayError as exc:  # the worker or its node died
                    if attempt < _ATTEMPTS:
                        progress(f"run {job.label}: its Ray worker died ({type(exc).__name__})")
                        pending[remote.remote(job)] = (job, attempt + 1)
                        continue
                    outcome = RunOutcome(job.index, "DIED", error=_died(attempt))
                outcome.attempts = attempt
                yield outcome


Runner = LocalRunner | RayRunner


def run_sweep(
    sweep: Sweep,
    out_dir: Path,
    runner: Runner,
    *,
    log_level: str = "error",
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Run every run of ``sweep`` with ``runner``; write each run's folder as it finishes
    and then the sweep's table and plots (:func:`write_sweep`). Returns the rows.

    ``progress`` gets one line per finished run (``[3/8] PASS label: ...``) and one per
    retry.
    """
    say = progress or (lambda line: None)
    base_dir = str(sweep.base.parent)
    jobs = [
        RunJob(run.index, run.label, run.scenario_toml, base_dir, log_level, tuple(sys.path))
        for run in sweep.runs
    ]
    outcomes: dict[int, RunOutcome] = {}
    runs_dir = out_dir / "runs"
    for outcome in runner.run(jobs, say):
        run = sweep.runs[outcome.index]
        folder = runs_dir / run.dirname
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "scenario.toml", run.scenario_toml)
        for name, data in outcome.files.items():
            (folder / name).write_bytes(data)
        outcomes[outcome.index] = outcome
        say(f"[{len(outcomes)}/{len(jobs)}] {_progress_line(run, outcome)}")
    rows = [_row(sweep, run, outcomes[run.index]) for run in sweep.runs]
    write_sweep(sweep, rows, out_dir)
    return rows


def _progress_line(run: SweepRun, outcome: RunOutcome) -> str:
    text = f"{outcome.status} {run.label}"
    summary = outcome.summary
    if summary:
        text += f": rounds {summary['rounds_min']}..{summary['rounds_max']}"
        if summary.get("final_accuracy_mean") is not None:
            text += f", accuracy {summary['final_accuracy_mean']:.3f}"
        text += f", consensus {summary['final_consensus_max']:.2e}"
        failed = [name for name, verdict in summary["checks"].items() if verdict != "pass"]
        if failed:
            text += f", failed: {', '.join(failed)}"
    if outcome.error:
        text += f": {outcome.error}"
    return text + f" (wall {outcome.wall_seconds:.1f}s, attempt {outcome.attempts})"


def _row(sweep: Sweep, run: SweepRun, outcome: RunOutcome) -> dict[str, Any]:
    summary = outcome.summary
    row: dict[str, Any] = {"run": run.index + 1, "dir": f"runs/{run.dirname}"}
    row.update(dict(run.params))
    row.update({"seed": run.seed, "status": outcome.status})
    row.update(
        {f"check: {name}": verdict.upper() for name, verdict in summary.get("checks", {}).items()}
    )
    row.update({name: summary.get(name) for name in SUMMARY_FIELDS})
    row.update(
        {
            "why": summary.get("why") or outcome.error or None,
            "wall_seconds": round(outcome.wall_seconds, 3),
            "attempts": outcome.attempts,
        }
    )
    return row


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every row's keys in first-seen order: runs of one sweep may run different checks."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    # the check columns of later rows go beside those of the first, not at the end
    head = [c for c in columns if not c.startswith("check: ") and c not in SUMMARY_FIELDS]
    checks = [c for c in columns if c.startswith("check: ")]
    split = head.index("status") + 1
    tail = [c for c in head[split:] if c not in ("why", "wall_seconds", "attempts")]
    return [*head[:split], *checks, *SUMMARY_FIELDS, *tail, "why", "wall_seconds", "attempts"]


def sweep_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``sweep.csv``: one row per run; empty cells where a value does not apply."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = _columns(rows)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


def write_sweep(sweep: Sweep, rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write ``sweep.csv``, ``sweep.json`` and the comparison plots; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "sweep.csv", out_dir / "sweep.json"
    atomic_write_text(csv_path, sweep_csv(rows))
    document = {
        "sweep": sweep.name,
        "base": str(sweep.base),
        "keys": list(sweep.keys),
        "seeds": list(sweep.seeds),
        "runs": [{c: row.get(c) for c in _columns(rows)} for row in rows],
    }
    atomic_write_text(json_path, json.dumps(document, indent=1) + "\n")
    return [csv_path, json_path, *_write_plots(sweep, rows, out_dir)]


def _x(row: dict[str, Any], key: str, numeric: bool, values: list[str]) -> float:
    """Where a run sits on the x axis: its value, or the value's position if not a number."""
    return float(row[key]) if numeric else float(values.index(_show(row[key])))


def _write_plots(sweep: Sweep, rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """For each swept key and metric: the metric against the key's values, one line per
    combination of the other keys (its mean over seeds) and each seed's run as a dot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    for key in sweep.keys:
        values = list(dict.fromkeys(_show(row[key]) for row in rows))
        numeric = all(isinstance(row[key], int | float) for row in rows)
        others = [k for k in sweep.keys if k != key]
        for metric in PLOT_METRICS:
            points = [row for row in rows if isinstance(row.get(metric), int | float)]
            if not points:
                continue
            figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
            lines: dict[str, list[dict[str, Any]]] = {}
            for row in points:
                label = " ".join(f"{k.rsplit('.', 1)[-1]}={_show(row[k])}" for k in others)
                lines.setdefault(label, []).append(row)
            for label, members in lines.items():
                x_of = {id(r): _x(r, key, numeric, values) for r in members}
                xs = sorted(set(x_of.values()))
                means = [
                    float(np.mean([float(r[metric]) for r in members if x_of[id(r)] == x]))
                    for x in xs
                ]
                (line,) = axes.plot(xs, means, marker="o", label=label or "mean over seeds")
                axes.scatter(
                    [x_of[id(r)] for r in members],
                    [float(r[metric]) for r in members],
                    color=line.get_color(),
                    alpha=0.35,
                    s=14,
                )
            if not numeric:
                axes.set_xticks(range(len(values)), values)
            elif len(values) <= 12:  # the swept values themselves, not 3.2, 3.4, ...
                ticks = sorted({float(row[key]): _show(row[key]) for row in rows}.items())
                axes.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
            axes.set_xlabel(key)
            axes.set_ylabel(metric)
            axes.set_title(
                f"{sweep.name}: {metric}\n(line: mean over seeds; dots: runs)", fontsize="medium"
            )
            axes.grid(True, alpha=0.3)
            if len(lines) > 1:
                axes.legend(fontsize="small")
            figure.tight_layout()
            path = out_dir / f"sweep-{metric}-by-{key.rsplit('.', 1)[-1]}.png"
            figure.savefig(path)
            plt.close(figure)
            written.append(path)
    return written
