"""The figures the notebooks call, drawn on made-up data: each draws what its data says."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from labkit.cost_model_figures import alpha_beta_fit_figure, bytes_per_rank_figure, crossover_figure  # noqa: E402
from labkit.data_parallel_figures import draw_loss_curves, draw_loss_differences  # noqa: E402
from labkit.ddp_figures import (bucket_sweep_figure, ddp_timelines_figure, draw_loss_curve,  # noqa: E402
                                draw_wrapper_agreement, scaling_figure)
from labkit.figures import RANK_COLORS  # noqa: E402
from labkit.large_batch_figures import (adascale_gain_figure, adascale_sweep_gain_figure,  # noqa: E402
                                        draw_weight_norms, noise_scale_figure, source_formula_figure,
                                        trust_ratio_figure, warmup_figure)
from labkit.layer_split_figures import draw_model_state_memory  # noqa: E402
from labkit.local_sgd_figures import draw_gap_curves, draw_gap_vs_local_steps  # noqa: E402
from labkit.param_server import Update  # noqa: E402
from labkit.param_server_figures import (draw_divergence, draw_stability_bounds, draw_stability_sweep,  # noqa: E402
                                         loss_curves_figure, staleness_figure, traffic_figure)
from labkit.pipeline.gantt import (BoxLabel, activation_memory_figure, draw_bubble_vs_m,  # noqa: E402
                                   draw_dp_pp_layout, gantt_stack, pipeline_figure)
from labkit.pipeline.schedules import gpipe  # noqa: E402
from labkit.pipeline.simulate import expected_bubble, simulate  # noqa: E402
from labkit.tensor_parallel_figures import c_attn_rows_figure, draw_tp_dp_traffic, draw_tp_mlp  # noqa: E402
from labkit.timeline import Event  # noqa: E402


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


# --- lesson 2 -------------------------------------------------------------------------------------------------

def test_bytes_per_rank_divides_by_m_busiest_left_total_right():
    m = 100
    traffic = {"ring": {2: [(m, m), (m, m)], 4: [(150, 150)] * 4},
               "naive": {2: [(m, m), (m, m)], 4: [(3 * m, 3 * m), (m, m), (m, m), (m, m)]}}
    fig = bytes_per_rank_figure(traffic, m, max_ranks=8)
    left, right = fig.axes
    assert list(left.lines[1].get_ydata()) == [1.0, 1.5]                 # the ring, measured: busiest rank
    assert list(left.lines[3].get_ydata()) == [1.0, 3.0]                 # the server's root
    assert list(right.lines[1].get_ydata()) == [2.0, 6.0]                # the server, all ranks: 2(N-1)
    assert list(right.lines[-1].get_ydata()) == [2 * (n - 1) for n in range(2, 9)]
    assert _labels(right) == ["ring: measured", "central server: measured", "2(N−1)·M"]


def test_alpha_beta_fit_draws_points_and_the_fitted_model_per_n():
    sizes = [1024, 4096]
    timings = {n: {(name, s): 1e-4 + s * 1e-9 for name in ("ring", "torch") for s in sizes} for n in (2, 4)}
    fig = alpha_beta_fit_figure(timings, {"ring": (1e-4, 1e-9), "torch": (5e-5, 2e-9)})
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["N = 2 processes on this machine", "N = 4 processes on this machine"]
    assert list(axes[0].lines[0].get_ydata()) == pytest.approx([1e3 * (1e-4 + s * 1e-9) for s in sizes])
    model = axes[0].lines[1]                                              # ring on 2 ranks: 2 rounds, M bytes
    assert model.get_ydata()[0] == pytest.approx(1e3 * (2e-4 + 1024e-9))
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1 KiB", "4 KiB"]
    assert "dist.all_reduce (gloo)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_crossover_marks_m_star_in_each_panel():
    fig = crossover_figure(10e-6, 1 / 12.5e9, {8: 235e3, 64: 1.4e6}, sizes=[1e2, 1e6])
    left, right = fig.axes
    assert list(left.lines[3].get_xdata()) == [235e3, 235e3]
    assert "M* ≈ 1400 kB" in right.texts[0].get_text()
    assert left.get_title() == "N = 8: α = 10 µs, 1/β = 12.5 GB/s (model)"
    assert _labels(left) == ["ring", "binomial tree", "central server"]


# --- lesson 3 -------------------------------------------------------------------------------------------------

def _ddp_step(rank, t0):
    return [Event("forward", t0, t0 + 1, rank=rank), Event("grad", t0 + 2, t0 + 2, rank=rank),
            Event("allreduce", t0 + 2, t0 + 3, label="bucket 0", rank=rank), Event("wait", t0 + 2, t0 + 3, rank=rank)]


def test_ddp_timelines_figure_stacks_the_panels_with_their_step_times():
    fig = ddp_timelines_figure({"a": [_ddp_step(0, 0.0), _ddp_step(1, 0.0)], "b": [_ddp_step(0, 0.0)]},
                               steps=[0.003, 0.0025], title="T")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["a", "b"]
    assert [t.get_text() for ax in axes for t in ax.texts if t.get_text().startswith("step")] == ["step 3 ms",
                                                                                                    "step 2 ms"]
    assert axes[0].get_xlabel() == "" and axes[1].get_xlabel() != "" and fig.legends


def test_loss_curve_marks_the_uniform_guess_and_the_epochs(ax):
    draw_loss_curve(ax, [4.0, 3.5, 3.2, 3.0, 2.9, 2.8], vocab_size=78, steps_per_epoch=2, label="loss")
    assert _labels(ax) == ["loss", "ln 78: uniform guess"]
    assert ax.lines[1].get_ydata()[0] == pytest.approx(np.log(78))
    assert [line.get_xdata()[0] for line in ax.lines[2:]] == [1.5, 3.5]


def test_wrapper_agreement_draws_a_bar_per_wrapper_and_reference(ax):
    draw_wrapper_agreement(ax, {"torch": (0.0, 1e-15), "Bucketed, 1 bucket": (2e-15, 1e-3)}, ["vs a", "vs b"])
    assert len(ax.patches) == 4 and ax.patches[0].get_height() == pytest.approx(1e-18)   # the zero, at the floor
    assert [t.get_text() for t in ax.get_xticklabels()] == ["torch", "Bucketed\n1 bucket"]
    assert "1e-03" in [t.get_text() for t in ax.texts] and _labels(ax) == ["vs a", "vs b"]


def test_bucket_sweep_draws_steps_references_and_exposed_cost():
    caps = [1e-9, 1.0]
    steps = {1e-9: 0.050, 1.0: 0.030, "naive": 0.080, "compute only": 0.020}
    fig = bucket_sweep_figure(caps, steps, {1e-9: 52, 1.0: 4}, {1e-9: 0.010, 1.0: 0.004})
    left, right = fig.axes
    assert list(left.lines[0].get_ydata()) == pytest.approx([50.0, 30.0])
    assert _labels(left) == ["BucketedDDP (measured)", "NaiveDDP", "no communication (no_sync)"]
    assert [t.get_text() for t in left.texts] == ["52", "4"]
    assert list(right.lines[1].get_ydata()) == pytest.approx([30.0, 10.0])       # step − compute only
    assert left.get_xticklabels()[0].get_text() == "1 tensor\nper bucket"


def test_scaling_figure_stacks_exposed_communication_on_compute():
    scale = {1: {"step": 0.010, "compute": 0.008}, 2: {"step": 0.020, "compute": 0.015}}
    fig = scaling_figure(scale, 100, cores=1)
    left, right = fig.axes
    heights = [p.get_height() for p in left.patches]
    assert heights == pytest.approx([8.0, 15.0, 2.0, 5.0])
    assert list(right.lines[0].get_ydata()) == pytest.approx([10_000, 20_000])   # ideal: N × (N = 1)
    assert list(right.lines[1].get_ydata()) == pytest.approx([10_000, 10_000])   # one core
    assert list(right.lines[2].get_ydata()) == pytest.approx([10_000, 10_000])   # measured


def test_bucket_sweep_draws_the_step_model_over_the_measured_points():
    caps = [1e-9, 1.0]
    steps = {1e-9: 0.050, 1.0: 0.030, "compute only": 0.020, "no messages": 0.022}
    model = {"model, α measured": {1e-9: 0.040, 1.0: 0.028}, "model, α fitted": {1e-9: 0.049, 1.0: 0.031}}
    fig = bucket_sweep_figure(caps, steps, {1e-9: 52, 1.0: 4}, {1e-9: 0.010, 1.0: 0.004}, model=model)
    left, _ = fig.axes
    assert _labels(left) == ["BucketedDDP (measured)", "model, α measured", "model, α fitted",
                             "no communication (no_sync)", "BucketedDDP, all-reduce a no-op (no messages)"]
    assert list(left.lines[1].get_ydata()) == pytest.approx([40.0, 28.0])
    assert list(left.lines[2].get_ydata()) == pytest.approx([49.0, 31.0])
    assert list(left.lines[1].get_xdata()) == list(left.lines[0].get_xdata())     # over the measured points


def test_scaling_figure_splits_the_wrappers_own_work_from_the_all_reduces():
    scale = {1: {"step": 0.011, "compute": 0.008, "no messages": 0.010},
             2: {"step": 0.020, "compute": 0.015, "no messages": 0.014}}         # below compute: noise
    fig = scaling_figure(scale, 100)
    left, _ = fig.axes
    heights = [p.get_height() for p in left.patches]
    assert heights == pytest.approx([8.0, 15.0, 2.0, 0.0, 1.0, 5.0])            # compute, own work, all-reduces
    assert [p.get_y() + p.get_height() for p in left.patches[4:]] == pytest.approx([11.0, 20.0])   # the step
    assert "DDP's own work" in _labels(left)[2] and "all-reduces" in _labels(left)[3]   # after the ideal line


# --- lesson 4 -------------------------------------------------------------------------------------------------

def test_noise_scale_figure_uses_the_last_measurement_as_b_noise():
    noise = {0: {"B_simple": 0.5, "loss": 4.0}, 100: {"B_simple": 8.0, "loss": 3.0}}
    fig = noise_scale_figure(noise, [2, 8, 32], base_batch=2, block_size=64)
    left, right = fig.axes
    assert list(left.lines[0].get_ydata()) == [0.5, 8.0]
    assert [t.get_text() for t in left.texts if t.get_text().startswith("val")] == ["val loss 4.00", "val loss 3.00"]
    assert right.lines[2].get_xdata()[0] == 8.0                                   # the critical batch
    assert list(right.lines[3].get_ydata()) == pytest.approx([1 + 8 / 2, 1 + 2 / 8])


def test_warmup_figure_labels_the_run_that_stopped():
    runs = {"no warm-up": ([4.0, 30.0], [0.6, 0.6]), "warm-up": ([4.0, 3.5, 3.0], [0.3, 0.45, 0.6])}
    fig = warmup_figure(runs, 0.3, 2, base_batch=2, vocab_size=78)
    left, right = fig.axes
    assert _labels(right)[:2] == ["no warm-up (stopped at step 2: loss 30)", "warm-up"]
    assert left.get_title() == "SGD at k = 2: lr = 2η = 0.6" and right.get_title() == "The same 3 steps"
    assert left.lines[2].get_ydata()[0] == 0.3


def test_source_formula_has_a_line_per_matrix_in_each_reading_and_lamb_flat():
    lams, bs = np.array([0.01, 0.1, 1.0]), np.array([1.0, 10.0, 100.0])
    fig = source_formula_figure(lams, {"a.weight": [0.01, 0.0099, 0.009], "b.weight": [0.01, 0.0098, 0.0085]}, bs,
                                {"a.weight": 0.01 * bs, "b.weight": 0.02 * bs}, {"a.weight": 3.0, "b.weight": 40.0},
                                0.01, 0.01)
    left, right = fig.axes
    for ax in (left, right):
        assert _labels(ax) == ["a (‖r‖ = 3)", "b (‖r‖ = 40)", "LAMB, every matrix: η = 0.01"]
        assert list(ax.lines[2].get_ydata()) == [0.01, 0.01]
    assert list(left.lines[1].get_xdata()) == list(lams) and list(right.lines[1].get_xdata()) == list(bs)
    assert left.get_yscale() == "linear" and right.get_yscale() == "log"
    assert "b = ‖θ‖" in left.get_title() and "b a constant (λ = 0.01)" in right.get_title()


def test_weight_norms_with_ratios_draw_u_dashed(ax):
    draw_weight_norms(ax, [1, 2], {"wte": [2.0, 4.0]}, ratios={"wte": [0.5, 0.1]})
    theta, u = ax.lines
    assert list(u.get_ydata()) == pytest.approx([4.0, 40.0]) and u.get_linestyle() == "--"
    assert _labels(ax) == ["‖θ‖ wte", "‖u‖ wte"] and ax.get_yscale() == "log"


def test_trust_ratio_figure_shares_one_key_between_the_panels():
    fig = trust_ratio_figure([1, 2], {"a": [0.1, 0.2], "b": [0.3, 0.4]}, {"a": [1.0, 1.1], "b": [2.0, 2.1]})
    left, right = fig.axes
    assert left.get_legend() is None and right.get_legend() is None
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    assert left.lines[1].get_color() == right.lines[1].get_color()              # a layer keeps its colour


def test_adascale_gain_figure_predicts_from_the_noise_scale():
    live = {"gain": [1.0, 1.5, 2.0], "tau": [1.0, 2.5, 4.5]}
    fig = adascale_gain_figure({4: [2.0, 3.0], 8: [4.0, 4.0]}, b_simple=6.0, base_batch=2, live=live, scale=8)
    left, middle, right = fig.axes
    prediction = left.lines[1]
    assert prediction.get_ydata()[0] == pytest.approx(1.0)                        # S = 1: gain 1
    assert prediction.get_ydata()[-1] == pytest.approx((1 + 3) / (1 + 3 / 8))
    assert middle.get_ylim() == (0, 9)
    assert list(right.lines[2].get_ydata()) == [8, 16, 24]                        # τ = S·steps


def test_adascale_sweep_gain_figure_has_a_line_per_k():
    runs = [{"method": "adascale", "k": k, "tau": [[0, 0.0], [10, 50.0]], "gain": [[0, 1.0], [10, k / 2]],
             "mean_gain": k / 3, "epochs_read": 1.0, "stopped_at_sample_cap": k == 4} for k in (1, 2, 4)]
    runs.append({"method": "sgd", "k": 2})
    fig = adascale_sweep_gain_figure({"runs": runs, "options": {"base_batch": 2}, "budget_samples": 200})
    left, right = fig.axes
    assert _labels(left) == ["k = 2", "k = 4 (stopped: sample cap)"]
    assert list(left.lines[1].get_xdata()) == [0.0, 0.5]                          # τ / T, T = 200 / 2
    assert list(right.lines[1].get_ydata()) == pytest.approx([2 / 3, 4 / 3])


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


def test_tp_mlp_sets_indices_as_subscripts(ax):
    draw_tp_mlp(ax, tp=2)
    texts = [t.get_text() for t in ax.texts]
    outside_math = ["".join(text.split("$")[::2]) for text in texts]      # what is not between $ … $
    assert not [text for text in outside_math if "_" in text]            # no literal underscore is shown
    assert any(text.startswith("$Z_0 = ") for text in texts) and any(text.startswith("$Y_1$") for text in texts)
    assert any(text.startswith(r"$Y = \Sigma_r\, Y_r + b_2$") for text in texts)
    ax.figure.canvas.draw()                                               # the mathtext parses


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


def test_gantt_labels_are_drawn_only_inside_their_boxes(monkeypatch):
    p, m, v = 4, 8, 2
    fig = pipeline_figure("interleaved", p, m, chunks=v)
    assert fig.get_figwidth() > 10 and pipeline_figure("1F1B", p, m).get_figwidth() == 10
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if isinstance(t, BoxLabel)]
    assert len(labels) == p * v * m * 2                                   # every F and B of every chunk
    assert {t.get_text() for t in labels} == {f"{k}.{c}" for k in range(m) for c in range(v)}
    for label in labels:                                                  # the figure is wide enough: all fit
        assert label.fits(renderer)
        left, right = ax.transData.transform([(label.span[0], 0.0), (label.span[1], 0.0)])[:, 0]
        extent = label.get_window_extent(renderer)
        assert left < extent.x0 and extent.x1 < right
    fig.set_size_inches(9, fig.get_figheight())                          # narrower: the forward boxes are too
    fig.canvas.draw()                                                     # narrow, their labels are not drawn
    renderer = fig.canvas.get_renderer()
    fitting = [t for t in labels if t.fits(renderer)]
    assert [t.span[1] - t.span[0] for t in fitting] == [2 / v] * (len(labels) // 2)   # the backward boxes' only
    drawn = []
    monkeypatch.setattr(matplotlib.text.Text, "draw", lambda self, renderer: drawn.append(self))
    fig.canvas.draw()
    assert [t for t in drawn if isinstance(t, BoxLabel)] == fitting


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
    assert axes[1].get_title() == "each run's delays (its own timing): mean τ 1.0"
    assert sum(p.get_height() for p in axes[1].patches) == 4


def test_stability_sweep_fills_converged_runs_only(ax):
    draw_stability_sweep(ax, [(2, 0.2, 0.5, False), (6, 1.6, 4.0, True)])
    points = ax.lines[1:3]
    assert points[0].get_markerfacecolor() != "none" and points[1].get_markerfacecolor() == "none"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.2", "1.6"]
    assert "2 live runs" in ax.get_title()


def test_stability_sweep_legend_covers_no_run():
    fig, ax = plt.subplots(figsize=(10, 4))
    runs = [(w, a, tau, a > 0.5) for w, tau in ((2, 0.7), (6, 3.3), (12, 5.9)) for a in (0.2, 0.4, 0.8, 1.6)]
    draw_stability_sweep(ax, runs)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.x0 > ax.get_window_extent(renderer).x1                  # outside the axes, to the right
    assert not [t.get_text() for t in ax.texts if t.get_window_extent(renderer).overlaps(legend)]
    assert legend.x1 <= fig.bbox.x1                                       # and inside the figure


def test_traffic_figure_draws_server_and_ring_against_workers():
    fig = traffic_figure([1, 2, 4], {1: [1.0, 2.0, 4.0], 2: [0.5, 1.0, 2.0]}, [0.0, 1.0, 1.5])
    left, right = fig.axes
    assert list(left.lines[0].get_ydata()) == [1.0, 2.0, 4.0]
    assert list(right.lines[0].get_ydata()) == [2, 4, 8] and list(right.lines[1].get_ydata()) == [0, 2, 6]
    assert len(_labels(left)) == 7
