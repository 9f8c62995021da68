"""Figures readable at a glance: no empty panels in the suite curves, legends outside the data,
titles at normal size, tuned Adam visible on top of the Adam envelope."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from metaopt.viz.plots import panel_grid as _grid  # noqa: E402
from metaopt.viz.plots import plot_eval_curves, plot_loss_curves, plot_sweep  # noqa: E402
from metaopt.viz.sweep import SweepRun  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 20])
def test_suite_grid_leaves_no_empty_panel_when_avoidable(n):
    rows, cols = _grid(n)
    assert rows * cols >= n and rows * cols - n < cols
    if n <= 5 or n % 5 == 0 or n % 4 == 0 or n % 3 == 0:
        assert rows * cols == n


def _legend_outside_axes(fig, legend, ax):
    fig.canvas.draw()
    lb = legend.get_window_extent()
    ab = ax.get_window_extent()
    return lb.x0 >= ab.x1 - 1 or lb.y1 <= ab.y0 + 1


def test_loss_curve_legend_is_outside_the_axes():
    fig = plot_loss_curves({"learned": np.exp(-np.arange(50) / 10.0)[None],
                            "adam": np.exp(-np.arange(50) / 20.0)[None]}, title="t")
    ax = fig.axes[0]
    assert _legend_outside_axes(fig, ax.get_legend(), ax)
    assert ax.title.get_fontsize() >= plt.rcParams["font.size"]
    plt.close(fig)


def test_eval_and_sweep_figures_use_one_legend_below_the_panels(tmp_path):
    rows = [dict(family=f, task_seed=s, optimizer=o, step=st, valid_loss=1.0 / (st + 1))
            for f in ("digits_mlp", "digits_conv") for s in (0, 1) for o in ("learned", "adam")
            for st in range(0, 50, 10)]
    plot_eval_curves(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").exists()
    runs = [SweepRun(tmp_path / str(i), f"scheme={n}", [f"scheme={n}"],
                     [{"outer_step": k, "wall_time": k, "inner_steps": k, "meta_loss": 1.0 / (k + 1 + i)}
                      for k in range(5)]) for i, n in enumerate(("nested", "interleaved"))]
    fig = plot_sweep(runs)
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    for ax in fig.axes:
        fig.canvas.draw()
        lb, ab = fig.legends[0].get_window_extent(), ax.get_window_extent()
        assert lb.y1 <= ab.y0 + 1
    plt.close(fig)
