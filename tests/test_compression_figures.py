"""Lesson 9's figures draw what they are given, and the step-time bars are labkit.bottleneck's model."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from labkit.bottleneck import step_time  # noqa: E402
from labkit.compressed_training import Run  # noqa: E402
from labkit.compression_figures import (allreduce_time_figure, curves_figure, explorer, step_time_figure,  # noqa: E402
                                        threshold_figure)
from labkit.network import Link  # noqa: E402


@pytest.fixture(autouse=True)
def _close_all():
    yield
    plt.close("all")


def test_curves_put_each_run_on_three_axes():
    runs = {"allreduce": Run("allreduce", [3.0, 2.0], [1.0, 2.0 * 2 ** 20], [0.1, 0.2]),
            "topk-noef": Run("topk-noef", [3.0, 2.5], [10.0, 20.0], [0.05, 0.1])}
    fig = curves_figure(runs, target=2.2)
    assert len(fig.axes) == 3
    lines = [l for l in fig.axes[1].get_lines() if l.get_label() == "allreduce"]
    assert list(lines[0].get_xdata()) == [1.0 / 2 ** 20, 2.0]
    assert [l.get_linestyle() for l in fig.axes[0].get_lines()][:2] == ["-", "--"]


def test_curves_take_recorded_dicts_and_draw_running_means():
    runs = {"allreduce": dict(losses=[4.0, 2.0, 3.0, 1.0], bytes=[1.0, 2.0, 3.0, 4.0], seconds=[0.1, 0.2, 0.3, 0.4])}
    fig = curves_figure(runs, smooth=2)
    assert list(fig.axes[0].get_lines()[0].get_ydata()) == [4.0, 3.0, 2.5, 2.0]   # the mean of the last two
    assert "mean of 2 steps" in fig.axes[0].get_ylabel()


def test_step_time_bars_are_the_model():
    fig = step_time_figure(psi_b=1.0, tokens=4096, world_size=64, ranks_per_node=8, inside_gbs=450, between_gbs=50,
                           tflops=400, bf16=True)
    ax = fig.axes[0]
    flat = step_time("flat", psi=1e9, tokens=4096, flops=400e12, world_size=64, inside=Link(5e-6, 450e9),
                     between=Link(10e-6, 50e9), ranks_per_node=8, bytes_per_number=2)
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] == pytest.approx(1e3 * flat.compute)
    assert heights[len(heights) // 2] == pytest.approx(1e3 * flat.exposed)


def test_the_other_figures_and_the_widget():
    allreduce_time_figure([1e3, 1e6], {"flat": [1e-3, 1e-2]}, {"flat": [1e-3, 1e-2]})
    threshold_figure([64, 128], [0.05, 0.08], [0.15, 0.16], [0.14, 0.15], 100.0)
    widget = explorer()
    assert {"Ψ (billions)", "ranks N", "between GB/s"} <= {c.description for c in widget.controls.values()}
    assert widget.png.startswith(b"\x89PNG")
