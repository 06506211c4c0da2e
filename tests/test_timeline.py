"""labkit.timeline: the one event type and the one drawing, and the figures built on them."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from labkit.pipeline.schedules import one_f_one_b  # noqa: E402
from labkit.pipeline.simulate import bubble_fraction, simulate  # noqa: E402
from labkit.timeline import Box, Event, busy_fraction, draw_timeline  # noqa: E402


def test_busy_fraction_and_the_bubble_are_one_formula():
    timeline = simulate(one_f_one_b(4, 8), 1.0, 2.0)
    start, end = timeline.origin, timeline.origin + timeline.makespan
    busy = [busy_fraction(timeline.of_rank(r), start, end, busy=("F", "B")) for r in range(4)]
    assert bubble_fraction(timeline) == pytest.approx(1 - sum(busy) / 4)
    assert all(e.kind == e.action.kind and e.rank in range(4) for e in timeline.events)


def test_busy_fraction_of_made_up_events():
    events = [Event("recv", 0.0, 2.0), Event("forward", 2.0, 3.0), Event("backward", 4.0, 6.0)]
    assert busy_fraction(events) == 0.5
    assert busy_fraction(events, 0.0, 10.0, busy=("backward",)) == 0.2
    assert Event("grad", 1.0, 1.0).duration == 0.0


def test_draw_timeline_draws_what_the_style_says():
    rows = [[Event("a", 0.0, 1.0), Event("tick", 0.5, 0.5), Event("skip", 1.0, 2.0)], [Event("a", 1.0, 3.0)]]
    fig, ax = plt.subplots()

    def style(e):
        return None if e.kind == "skip" else Box(text="x" if e.kind == "a" else "")

    draw_timeline(ax, rows, style, row_labels=["one", "two"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["one", "two"]
    assert len(ax.collections) == 3                                      # two boxes and one tick
    assert ax.get_xlim() == (0.0, 3.0)
    with pytest.raises(ValueError, match="empty"):
        draw_timeline(ax, [[]], style)
    plt.close(fig)


def test_the_lessons_figures_draw_made_up_steps():
    from labkit.ddp_figures import ddp_timeline_legend, draw_ddp_timeline
    from labkit.layer_split_figures import draw_layer_split, layer_split_legend
    ddp = [[Event("forward", 0.0, 1.0), Event("grad", 1.5, 1.5, "w"), Event("allreduce", 1.5, 2.5, "bucket 0"),
            Event("wait", 2.0, 2.5)] for _ in range(2)]
    split = [[Event("forward", 0.0, 1.0), Event("send", 1.0, 1.1), Event("recv", 1.1, 3.0), Event("backward", 3.0, 5.0)],
             [Event("recv", 0.0, 1.1), Event("forward", 1.1, 2.0), Event("backward", 2.0, 3.0)]]
    fig, (a, b) = plt.subplots(2, 1)
    draw_ddp_timeline(a, ddp)
    ddp_timeline_legend(a)
    assert [t.get_text() for t in a.get_yticklabels()][:2] == ["rank 0 compute", "rank 0 all-reduces"]
    draw_layer_split(b, split)
    layer_split_legend(b)
    assert any(t.get_text() == "busy 60%" for t in b.texts)
    plt.close(fig)


def test_large_batch_options_are_checked():
    from labkit import large_batch_sweep
    args = large_batch_sweep.options(scales=[4, 1], methods=["lamb", "sgd"], lrs=["lamb=0.01"])
    assert args.scales == [1, 4] and args.methods == ["sgd", "lamb"] and args.lr_grid["lamb"] == (0.01,)
    with pytest.raises(TypeError, match="unknown options"):
        large_batch_sweep.options(batch=3)
    with pytest.raises(ValueError, match="--scales must include 1"):
        large_batch_sweep.options(scales=[2])
