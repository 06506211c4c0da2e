"""Pictures of a pipeline step, all drawn from a :class:`~labkit.pipeline.simulate.Timeline` (simulated
from a schedule, or measured by the runtime), plus the notebook's explorer.

    draw_gantt(ax, timeline)            one row per rank: F boxes light, B boxes dark, the micro-batch
                                        number inside; white gaps are the bubble
    draw_activations(ax, timeline)      micro-batches' activations each rank holds, over time
    pipeline_figure(name, p, m, ...)    both, for a schedule, with the bubble and peaks in the title
    explorer()                          ipywidgets controls (schedule, p, m, t_B/t_F, chunks) around
                                        pipeline_figure
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from labkit.pipeline.schedules import B, F, make_schedule
from labkit.pipeline.simulate import (Timeline, bubble_fraction, expected_bubble, peak_activations, simulate)

__all__ = ["draw_gantt", "draw_activations", "gantt_legend", "pipeline_figure", "explorer", "MICROBATCH_COLORS"]

# one colour per micro-batch (cycled): F drawn pale, B full
MICROBATCH_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
                     "#CCB974", "#64B5CD"]


def _compute_events(timeline: Timeline):
    return [e for e in timeline.events if e.action.kind in (F, B)]


def draw_gantt(ax, timeline: Timeline, *, unit: float = 1.0, unit_name: str = "", title: str = "",
               labels: bool = True, num_ranks_per_chunk: int | None = None, alpha: float = 1.0, outline: bool = False,
               y_offset: float = 0.0, height: float = 0.8):
    """Draw the compute of every rank: rank 0 on top, F boxes pale, B boxes saturated, in the colour of
    their micro-batch, numbered (``k`` or ``k.c`` for chunk c when ranks hold several stages). Whatever
    is not covered is the bubble. ``outline=True`` draws only the boxes' edges (to lay a measured run
    over a simulated one). Times are divided by ``unit``."""
    p = timeline.num_ranks
    right = ax.get_xlim()[1] if ax.has_data() else 0.0   # drawing over another timeline: keep the wider
    events = _compute_events(timeline)
    chunked = num_ranks_per_chunk is not None or any(e.action.stage >= p for e in events)
    for e in events:
        a = e.action
        color = MICROBATCH_COLORS[a.microbatch % len(MICROBATCH_COLORS)]
        y = (p - 1 - e.rank) + y_offset
        x0, w = (e.start - timeline.origin) / unit, e.duration / unit
        if outline:
            ax.broken_barh([(x0, w)], (y + (1 - height) / 2, height), facecolor="none", edgecolor="black",
                           linewidth=1.0, linestyle="--")
            continue
        ax.broken_barh([(x0, w)], (y + (1 - height) / 2, height), facecolor=color,
                       alpha=alpha * (0.4 if a.kind == F else 0.95), edgecolor="black", linewidth=0.4)
        text = f"{a.microbatch}" + (f".{a.stage // p}" if chunked else "")
        if labels and w * unit > 0.007 * len(text) * timeline.makespan:  # only where the number fits
            ax.text(x0 + w / 2, y + 0.5, text, ha="center", va="center", fontsize=7,
                    color="black" if a.kind == F else "white", clip_on=True)
    ax.set_yticks([p - 1 - r + 0.5 for r in range(p)])
    ax.set_yticklabels([f"rank {r}" for r in range(p)], fontsize=8)
    ax.set_ylim(-0.1, p + 0.1)
    ax.set_xlim(0, max(right, timeline.makespan / unit))
    ax.set_xlabel(f"time ({unit_name})" if unit_name else "time")
    ax.grid(axis="y", visible=False)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def gantt_legend(ax, **kwargs):
    """Key for :func:`draw_gantt`: pale = forward, dark = backward, numbers are micro-batches."""
    handles = [Patch(facecolor=MICROBATCH_COLORS[0], alpha=0.4, edgecolor="black", label="forward of micro-batch k"),
               Patch(facecolor=MICROBATCH_COLORS[0], alpha=0.95, edgecolor="black", label="backward of micro-batch k"),
               Patch(facecolor="white", edgecolor="lightgrey", label="idle: the bubble")]
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    return ax.legend(handles=handles, **kwargs)


def draw_activations(ax, timeline: Timeline, *, chunks: int = 1, unit: float = 1.0, unit_name: str = ""):
    """Micro-batches' activations held by each rank over time: +1 (or +1/v) when an F ends, −1 when a
    B ends (a B frees its micro-batch's saved tensors)."""
    p = timeline.num_ranks
    for r in range(p):
        held, xs, ys = 0.0, [0.0], [0.0]
        for e in sorted((e for e in _compute_events(timeline) if e.rank == r), key=lambda e: e.end):
            held += (1 if e.action.kind == F else -1) / chunks
            xs.append((e.end - timeline.origin) / unit)
            ys.append(held)
        xs.append(timeline.makespan / unit)
        ys.append(held)
        ax.step(xs, ys, where="post", label=f"rank {r}", color=plt.cm.viridis(r / max(p - 1, 1)))
    ax.set_ylabel("activations held\n(micro-batches)", fontsize=8)
    ax.set_xlabel(f"time ({unit_name})" if unit_name else "time")
    ax.legend(fontsize=7, frameon=False, ncol=min(p, 4), loc="upper right")
    ax.set_xlim(0, timeline.makespan / unit)
    return ax


def pipeline_figure(name: str = "1F1B", p: int = 4, m: int = 8, backward_ratio: float = 2.0, chunks: int = 2,
                    figure=None):
    """The schedule ``name`` (GPipe, 1F1B, interleaved) for p stages and m micro-batches, simulated with
    F = 1 and B = ``backward_ratio`` per stage (per chunk: 1/v and ratio/v), drawn as a Gantt chart over
    the activation memory. The title gives the simulated bubble against the formula and the peaks."""
    schedule = make_schedule(name, p, m, chunks)
    v = schedule.num_stages // p
    timeline = simulate(schedule, t_forward=1.0 / v, t_backward=backward_ratio / v)
    fig = figure or plt.figure(figsize=(10, 2.8 + 0.45 * p))
    fig.clear()
    ax_gantt, ax_mem = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [p, 2.2]})
    draw_gantt(ax_gantt, timeline)
    ax_gantt.set_xlabel("")
    draw_activations(ax_mem, timeline, chunks=v, unit_name="units of one stage's forward")
    bubble, formula = bubble_fraction(timeline), expected_bubble(p, m, v)
    peaks = ", ".join(f"{x:g}" for x in peak_activations(schedule))
    ax_gantt.set_title(f"{schedule.name}: p = {p}, m = {m}, t_B/t_F = {backward_ratio:g}\n"
                       f"bubble {bubble:.3f} (formula (p−1)/({'v·' if v > 1 else ''}m+p−1) = {formula:.3f});  "
                       f"peak activations per rank: {peaks}", fontsize=9)
    gantt_legend(ax_mem, loc="upper left", bbox_to_anchor=(0.0, -0.45), ncol=3)
    fig.tight_layout()
    return fig


def explorer(name: str = "1F1B", p: int = 4, m: int = 8, backward_ratio: float = 2.0, chunks: int = 2):
    """ipywidgets controls around :func:`pipeline_figure`: the figure redraws as a control moves."""
    import ipywidgets as widgets

    def show(schedule, stages, microbatches, ratio, model_chunks):
        if schedule == "interleaved" and microbatches % stages:
            print(f"the interleaved schedule needs m to be a multiple of p = {stages}")
            return
        pipeline_figure(schedule, stages, microbatches, ratio, model_chunks)
        plt.show()

    return widgets.interactive(
        show,
        schedule=widgets.ToggleButtons(options=["GPipe", "1F1B", "interleaved"], value=name),
        stages=widgets.IntSlider(value=p, min=1, max=8, description="stages p", continuous_update=False),
        microbatches=widgets.IntSlider(value=m, min=1, max=32, description="micro-batches m",
                                       continuous_update=False),
        ratio=widgets.FloatSlider(value=backward_ratio, min=0.5, max=4.0, step=0.5, description="t_B / t_F",
                                  continuous_update=False),
        model_chunks=widgets.IntSlider(value=chunks, min=1, max=4, description="chunks v (interleaved)",
                                       continuous_update=False))
