"""Lesson 8's figures: each draws what labkit.memory predicts (or the measurement it is given)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from labkit.memory import Memory, Setup, num_parameters, predict  # noqa: E402
from labkit.memory_figures import (KINDS, MODELS, activations_figure, calculator, calculator_figure,  # noqa: E402
                                   draw_memory_bars, fsdp_timeline_figure, per_rank_figure,
                                   predicted_measured_figure)
from labkit.models import GPTConfig  # noqa: E402
from labkit.timeline import Event  # noqa: E402

SMALL = GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(autouse=True)
def _close_all():
    yield
    plt.close("all")


def _bar_tops(ax):
    tops = {}
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2, 6)
        tops[x] = max(tops.get(x, 0.0), patch.get_y() + patch.get_height())
    return [tops[x] for x in sorted(tops)]


def test_memory_bars_stack_every_kind_to_the_total():
    fig, ax = plt.subplots()
    m = Memory(parameters=1 * 2 ** 20, gradients=2 * 2 ** 20, optimizer=0, master=3 * 2 ** 20, activations=4 * 2 ** 20)
    draw_memory_bars(ax, {"a": m})
    assert _bar_tops(ax) == pytest.approx([10.0])
    assert len(ax.patches) == 4                       # a kind of zero bytes draws no box
    assert {p.get_facecolor()[:3] for p in ax.patches} <= {matplotlib.colors.to_rgb(c) for c in KINDS.values()}


def test_calculator_draws_the_four_stages_of_the_prediction():
    fig = calculator_figure("7B-class", dp=8, recompute="selective")
    ax = fig.axes[0]
    want = [predict(MODELS["7B-class"], Setup(batch=1, seq_len=4096, dtype_bytes=2, mixed_precision=True, dp=8,
                                              micro_batches=2, recompute="selective", flash=True, zero=k)).total
            / 2 ** 30 for k in range(4)]
    assert _bar_tops(ax) == pytest.approx(want)
    assert want[0] > 80 > want[3]
    assert "6.59 B" in ax.get_title()


def test_calculator_widget_has_its_controls():
    widget = calculator(model="GPT-2 small", dp=4)
    names = {control.description for control in widget.controls.values()}
    assert {"model", "data N", "tensor t", "pipeline p", "recompute", "flash attention"} <= names


def test_per_rank_curves_fall_as_one_over_n_only_at_stage_3():
    fig = per_rank_figure(1e9, [1, 2, 4, 8])
    lines = fig.axes[0].get_lines()[:4]
    ddp, stage3 = lines[0].get_ydata(), lines[3].get_ydata()
    assert list(ddp) == pytest.approx([16e9 / 2 ** 30] * 4)
    assert list(stage3) == pytest.approx([16e9 / 2 ** 30 / n for n in (1, 2, 4, 8)])


def test_activation_lines_are_the_formula_and_measured_points_are_drawn():
    fig = activations_figure(SMALL, 2, [16, 32, 64], measured={"none": {32: 5 * 2 ** 20}})
    ax = fig.axes[0]
    none = ax.get_lines()[0]
    want = predict(SMALL, Setup(batch=2, seq_len=64)).activations / 2 ** 20
    assert none.get_ydata()[-1] == pytest.approx(want)
    assert any(list(line.get_xdata()) == [32] and list(line.get_ydata()) == [5.0] for line in ax.get_lines())


def test_predicted_and_measured_bars_stand_side_by_side():
    p = predict(SMALL, Setup(batch=2, seq_len=32))
    half = Memory(**{k: v / 2 for k, v in p.as_dict().items() if k != "total"})
    fig = predicted_measured_figure({"x": (p, half)})
    tops = _bar_tops(fig.axes[0])
    assert tops == pytest.approx([p.total / 2 ** 20, p.total / 2 ** 21])


def test_fsdp_timeline_puts_compute_and_messages_on_two_rows():
    events = [Event("forward", 0.0, 0.001, "block 0"), Event("all_gather", 0.0005, 0.002, "block 0 all-gather"),
              Event("backward", 0.002, 0.004, "block 0"), Event("reduce_scatter", 0.003, 0.004, "block 0")]
    fig = fsdp_timeline_figure({"a": events, "b": events})
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["compute", "messages"]


def test_the_models_are_what_their_names_say():
    assert num_parameters(MODELS["GPT-2 small"]) == pytest.approx(124e6, rel=0.02)
    assert num_parameters(MODELS["7B-class"]) == pytest.approx(6.6e9, rel=0.02)
    assert num_parameters(MODELS["70B-class"]) == pytest.approx(65e9, rel=0.05)
