"""The figures the notebooks call, drawn on made-up data: each draws what its data says."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from labkit.data_parallel_figures import draw_loss_curves, draw_loss_differences  # noqa: E402
from labkit.figures import RANK_COLORS  # noqa: E402
from labkit.layer_split_figures import draw_model_state_memory  # noqa: E402
from labkit.local_sgd_figures import draw_gap_curves, draw_gap_vs_local_steps  # noqa: E402
from labkit.param_server import Update  # noqa: E402
from labkit.param_server_figures import (draw_divergence, draw_stability_bounds, draw_stability_sweep,  # noqa: E402
                                         loss_curves_figure, staleness_figure, traffic_figure)
from labkit.pipeline.gantt import (activation_memory_figure, draw_bubble_vs_m, draw_dp_pp_layout,  # noqa: E402
                                   gantt_stack)
from labkit.pipeline.schedules import gpipe, one_f_one_b  # noqa: E402
from labkit.pipeline.simulate import expected_bubble, simulate  # noqa: E402
from labkit.tensor_parallel_figures import c_attn_rows_figure, draw_tp_dp_traffic  # noqa: E402


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


@pytest.fixture(autouse=True)
def _close_all():
    yield
    plt.close("all")


def _labels(ax):
    return ax.get_legend_handles_labels()[1]


# --- lesson 1 -------------------------------------------------------------------------------------------------

def test_loss_curves_draw_the_reference_band_and_one_line_per_run(ax):
    draw_loss_curves(ax, [4.0, 2.0, 1.0], {"N = 2": [4.0, 2.0, 1.0], "N = 4": [4.0, 2.1, 1.1]}, title="t")
    assert _labels(ax) == ["single process", "N = 2", "N = 4"]
    assert ax.lines[0].get_linewidth() == 6 and ax.get_yscale() == "log" and ax.get_title() == "t"


def test_loss_differences_draw_zeros_at_the_floor(ax):
    draw_loss_differences(ax, [1.0, 1.0], {"N = 2": [1.0, 1.0 + 1e-14]})
    assert list(ax.lines[0].get_ydata()) == pytest.approx([1e-18, 1e-14], rel=1e-3)
    assert ax.get_ylim() == pytest.approx((1e-18, 1e-10))


def test_gap_against_local_steps_has_a_line_per_optimizer(ax):
    draw_gap_vs_local_steps(ax, [1, 2, 4], {"sgd": [0.0, 1e-6, 1e-4], "adam": [1e-3, 1e-2, 1e-1]})
    assert _labels(ax) == ["sgd", "adam"]
    assert ax.lines[0].get_ydata()[0] == 1e-18                      # an exact zero, at the floor
    assert ax.get_xscale() == "log" and any(t.get_text() == "rounding level" for t in ax.texts)


def test_gap_curves_use_the_given_styles_and_limits(ax):
    draw_gap_curves(ax, [1, 2], {"a": [1e-3, 1e-2], "b": [0.0, 0.0]}, styles=["o-", "s:"], ylim=(1e-18, 10))
    assert [line.get_linestyle() for line in ax.lines[:2]] == ["-", ":"]
    assert ax.get_ylim() == pytest.approx((1e-18, 10))


# --- lesson 5 -------------------------------------------------------------------------------------------------

def test_model_state_memory_stacks_one_bar_per_kind_of_state(ax):
    draw_model_state_memory(ax, {"small": 1e9, "large": 10e9}, {"weights": 2, "optimizer": 14}, 80e9)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 4                                            # 2 models × 2 kinds of state
    assert max(b.get_x() + b.get_width() for b in bars) == pytest.approx(160.0)  # 16 B × 10 G params, in GB
    assert any("16 GB = 0.2 × 80 GB" in t.get_text() for t in ax.texts)
    assert "16 bytes per parameter" in ax.get_title()


def test_c_attn_rows_colour_each_row_by_its_rank():
    C, n_head = 8, 2
    rows = {2: [list(range(0, 4)) + list(range(8, 12)) + list(range(16, 20)),
                list(range(4, 8)) + list(range(12, 16)) + list(range(20, 24))]}
    fig = c_attn_rows_figure(rows, C, n_head)
    (ax,) = fig.axes
    cells = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_width() == 1]
    assert len(cells) == 3 * C
    assert matplotlib.colors.to_hex(cells[5].get_facecolor()) == RANK_COLORS[1].lower()
    assert sorted(t.get_text() for t in ax.texts) == ["k0", "k1", "q0", "q1", "v0", "v1"]
    with pytest.raises(AssertionError):
        c_attn_rows_figure({2: [rows[2][0]]}, C, n_head)             # rows held by no rank


def test_tp_dp_traffic_draws_both_and_the_measured_point(ax):
    tokens = np.array([16.0, 1024.0])
    draw_tp_dp_traffic(ax, tokens, 2 ** 20 * tokens, 2 ** 20 * 100.0, crossover=100.0, measured=(64, 2 ** 20 * 64))
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert list(ax.lines[1].get_ydata()) == [100.0, 100.0]           # data parallel: flat, in MiB
    assert _labels(ax)[-1].startswith("measured") and len(_labels(ax)) == 3


# --- lesson 6 -------------------------------------------------------------------------------------------------

def test_gantt_stack_shares_the_time_axis_up_to_the_longest_step():
    short, long = simulate(gpipe(2, 4), 0.25, 0.5), simulate(gpipe(2, 1), 1.0, 2.0)
    fig = gantt_stack({"short": short, "long": long}, xlabel="time (units)", legend=True)
    assert [ax.get_title() for ax in fig.axes] == ["short", "long"]
    assert all(ax.get_xlim() == pytest.approx((0, long.makespan)) for ax in fig.axes)
    assert fig.axes[-1].get_xlabel() == "time (units)" and fig.axes[-1].get_legend() is not None


def test_bubble_against_m_puts_the_simulated_points_on_the_formula(ax):
    draw_bubble_vs_m(ax, ps=(2, 4), points=(1, 4, 16), interleaved=None)
    formula, gpipe_points = ax.lines[0], ax.lines[1]
    assert list(gpipe_points.get_xdata()) == [1, 4, 16]
    assert list(gpipe_points.get_ydata()) == pytest.approx([expected_bubble(2, m) for m in (1, 4, 16)])
    assert len(formula.get_xdata()) == 16 and ax.get_ylim() == (0, 1)
    assert "interleaved, simulated" not in _labels(ax)


def test_activation_memory_has_a_bar_per_stage_and_schedule():
    p, kib = 4, 1024
    saved = {(name, m): [kib * (m if name == "GPipe" else min(p - i, m)) for i in range(p)]
             for name in ("GPipe", "1F1B") for m in (4, 8)}
    fig = activation_memory_figure(saved, m=8, batch="64 samples")
    left, right = fig.axes
    assert len(left.patches) == 2 * p
    assert [t.get_text() for t in left.texts] == ["8"] * p + ["4", "3", "2", "1"]   # the formula's counts
    assert list(right.lines[0].get_ydata()) == [16, 32] and list(right.lines[1].get_ydata()) == [10, 10]
    assert right.get_xlabel() == "micro-batches m (the batch stays 64 samples)"


def test_dp_pp_layout_draws_four_ranks(ax):
    draw_dp_pp_layout(ax)
    assert sum(t.get_text().startswith("rank ") for t in ax.texts) == 4
    assert sum("all-reduce" in t.get_text() for t in ax.texts) == 3   # two groups and the caption
    assert not ax.axison


# --- lesson 7 -------------------------------------------------------------------------------------------------

def test_stability_bounds_draw_both_rates(ax):
    taus = np.arange(0, 5)
    draw_stability_bounds(ax, taus, 2 * np.sin(np.pi / (2 * (2 * taus + 1))))
    assert ax.lines[0].get_ydata()[0] == pytest.approx(2.0)          # τ = 0: ηλ < 2
    assert ax.lines[1].get_ydata()[-1] == pytest.approx(5 * 2 * np.sin(np.pi / 18))
    assert ax.get_ylim() == (0, 2.3)


def test_loss_curves_figure_has_a_line_per_mode_in_every_panel():
    curves = {(mode, s): ([0.0, 0.1, 0.2], [1.0, 0.5, 0.25]) for mode in ("sync", "async") for s in (False, True)}
    fig = loss_curves_figure(curves, {"sync": "synchronous", "async": "asynchronous"}, optimum=0.1, slow=3, title="T")
    assert len(fig.axes) == 4
    assert all(_labels(ax) == ["synchronous", "asynchronous"] for ax in fig.axes)
    assert fig.axes[2].get_title().startswith("worker 0 is 3× slower")
    assert fig._suptitle.get_text() == "T"


def test_staleness_figure_splits_worker_0_from_the_others():
    log = [Update(0.0, w, s, tau) for w, s, tau in [(0, 0, 4), (1, 0, 0), (2, 0, 1), (1, 1, 1)]]
    fig = staleness_figure({(m, s): log for m in ("async", "bounded") for s in (False, True)},
                           {"async": "asynchronous", "bounded": "bounded"}, slow=4, bounds={"bounded": 6})
    assert len(fig.axes) == 4
    ax = fig.axes[0]
    assert _labels(ax) == ["workers 1, 2", "worker 0"]
    assert "mean τ 0.7 (fast), 4.0 (worker 0), max 4" in ax.get_title()
    assert [line.get_xdata()[0] for line in fig.axes[1].lines] == [6]  # the bound, on the bounded runs only
    assert not fig.axes[0].lines


def test_divergence_has_the_curves_and_the_staleness(ax):
    fig, axes = plt.subplots(1, 2)
    draw_divergence(axes, {"sync": [1.0, 0.1], "async": [1.0, 100.0]}, {"async": [0, 1, 1, 2]},
                    {"sync": "synchronous", "async": "asynchronous"}, title="big rate")
    assert _labels(axes[0]) == ["synchronous", "asynchronous"] and axes[0].get_title() == "big rate"
    assert _labels(axes[1]) == ["asynchronous: mean τ 1.0"]
    assert sum(p.get_height() for p in axes[1].patches) == 4


def test_stability_sweep_fills_converged_runs_only(ax):
    draw_stability_sweep(ax, [(2, 0.2, 0.5, False), (6, 1.6, 4.0, True)])
    points = ax.lines[1:3]
    assert points[0].get_markerfacecolor() != "none" and points[1].get_markerfacecolor() == "none"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.2", "1.6"]
    assert "2 live runs" in ax.get_title()


def test_traffic_figure_draws_server_and_ring_against_workers():
    fig = traffic_figure([1, 2, 4], {1: [1.0, 2.0, 4.0], 2: [0.5, 1.0, 2.0]}, [0.0, 1.0, 1.5])
    left, right = fig.axes
    assert list(left.lines[0].get_ydata()) == [1.0, 2.0, 4.0]
    assert list(right.lines[0].get_ydata()) == [2, 4, 8] and list(right.lines[1].get_ydata()) == [0, 2, 6]
    assert len(_labels(left)) == 7
