"""simnet's plots: every plot has a labelled y axis."""

from __future__ import annotations

from simnet.report import PLOTS, Y_LABELS


def test_every_plot_has_a_y_label() -> None:
    for name, _, _ in PLOTS:
        assert Y_LABELS.get(name), f"{name} has no y-axis label"
