"""Metrics files and plots of a simulation run.

:func:`write_metrics` writes ``metrics.csv`` (one row per global round, columns
:data:`simnet.simulation.ROW_FIELDS`; the spread columns after ``restarts`` came later)
and ``metrics.json`` (``{"rows": [...], "summary": {...}}``). Both are deterministic
functions of the result: no wall-clock time, floats in Python's shortest round-trip
form, JSON keys in a fixed order, so the same scenario and seed give byte-identical
files. :func:`write_plots` draws PNG plots with matplotlib when it is installed
(``pip install 'p2pfed[simnet]'``) and otherwise says so and skips them; the loss,
accuracy and consensus plots shade the spread over the nodes.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p2pfed.atomicfile import atomic_write_text
from simnet.simulation import ROW_FIELDS, SimulationResult

__all__ = [
    "BANDS",
    "PLOTS",
    "Y_LABELS",
    "metrics_csv",
    "metrics_json",
    "write_metrics",
    "write_plots",
]

PLOTS = (
    ("consensus.png", ("consensus_max", "consensus_mean", "target_distance_max"), True),
    ("loss.png", ("loss_mean", "federation_loss"), False),
    ("accuracy.png", ("accuracy_mean", "federation_accuracy"), False),
    ("groups.png", ("groups_completed", "groups_aborted"), False),
    ("bytes.png", ("bytes",), False),
    ("epsilon.png", ("epsilon_max",), False),
)
"""(file name, columns, log scale) of each plot; plots of columns without values are skipped."""

Y_LABELS = {
    "consensus.png": "L2 distance to the mean model (bands: spread over nodes)",
    "loss.png": "test loss (mean; bands: spread over nodes)",
    "accuracy.png": "test accuracy (mean; bands: spread over nodes)",
    "groups.png": "groups so far (cumulative)",
    "bytes.png": "bytes sent so far (all nodes)",
    "epsilon.png": "epsilon spent (largest over nodes)",
}
"""The y-axis label of each plot."""

BANDS = {"consensus.png": "consensus", "loss.png": "loss", "accuracy.png": "accuracy"}
"""Plots that shade the spread over the nodes of a metric: its ``_min``..``_max`` columns
lightly, ``_p10``..``_p90`` darker (the mean alone hides a node left behind)."""

LAGGED = frozenset({"federation_accuracy", "federation_loss"})
"""Columns that describe the previous round's model (the federation figures are shared
while averaging the next round): plotted at the round of the model they describe."""


def metrics_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The CSV text of the rows (empty cells where a value does not apply)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ROW_FIELDS)
    for row in rows:
        writer.writerow(["" if row.get(k) is None else repr(row[k]) for k in ROW_FIELDS])
    return out.getvalue()


def metrics_json(result: SimulationResult) -> str:
    """The JSON text: ``{"summary": {...}, "rows": [...]}``."""
    rows = [{k: row.get(k) for k in ROW_FIELDS} for row in result.rows]
    return json.dumps({"summary": result.summary, "rows": rows}, indent=1) + "\n"


def write_metrics(result: SimulationResult, out_dir: Path) -> list[Path]:
    """Write ``metrics.csv`` and ``metrics.json`` into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "metrics.csv", out_dir / "metrics.json"
    atomic_write_text(csv_path, metrics_csv(result.rows))
    atomic_write_text(json_path, metrics_json(result))
    return [csv_path, json_path]


def _shade_spread(axes: Any, rows: Sequence[dict[str, Any]], metric: str, log_scale: bool) -> None:
    for low, high, alpha, label in (
        ("min", "max", 0.12, "min..max over nodes"),
        ("p10", "p90", 0.25, "p10..p90 over nodes"),
    ):
        points = [
            (row["round"], row.get(f"{metric}_{low}"), row.get(f"{metric}_{high}")) for row in rows
        ]
        points = [
            p
            for p in points
            if p[1] is not None and p[2] is not None and (not log_scale or p[1] > 0)
        ]
        if points:
            axes.fill_between(
                [p[0] for p in points],
                [p[1] for p in points],
                [p[2] for p in points],
                alpha=alpha,
                color="tab:blue",
                linewidth=0,
                label=label,
            )


def write_plots(result: SimulationResult, out_dir: Path) -> tuple[list[Path], str | None]:
    """Draw the :data:`PLOTS` as PNG files; returns the paths and, if skipped, why."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return [], (
            "matplotlib is not installed: plots skipped (pip install 'p2pfed[simnet]' or "
            "pip install matplotlib); the metrics files are complete without them"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rounds = [row["round"] for row in result.rows]
    for name, columns, log_scale in PLOTS:
        series = {
            c: [row.get(c) for row in result.rows]
            for c in columns
            if any(row.get(c) is not None for row in result.rows)
        }
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
        for column, values in series.items():
            lag = 1 if column in LAGGED else 0
            points = [(r - lag, v) for r, v in zip(rounds, values, strict=True) if v is not None]
            if log_scale:
                points = [(r, v) for r, v in points if v > 0]
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=column)
        if name in BANDS:
            _shade_spread(axes, result.rows, BANDS[name], log_scale)
        if log_scale:
            axes.set_yscale("log")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("global round")
        axes.set_ylabel(Y_LABELS.get(name, ""))
        axes.set_title(f"{result.summary.get('scenario', '')}: {name[:-4]}")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = out_dir / name
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written, None
