"""simnet's plots: every plot has a labelled y axis."""

from __future__ import annotations

from simnet.report import BANDS, PLOTS, Y_LABELS


def test_every_plot_has_a_y_label() -> None:
    for name, _, _ in PLOTS:
        assert Y_LABELS.get(name), f"{name} has no y-axis label"


def test_spread_bands_name_existing_plots_and_columns() -> None:
    from simnet.simulation import ROW_FIELDS

    names = {name for name, _, _ in PLOTS}
    for plot, metric in BANDS.items():
        assert plot in names
        for suffix in ("min", "p10", "p90"):
            assert f"{metric}_{suffix}" in ROW_FIELDS
        assert f"{metric}_max" in ROW_FIELDS
