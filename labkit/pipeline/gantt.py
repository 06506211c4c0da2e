"""Pictures of a pipeline step, all drawn from a :class:`~labkit.pipeline.simulate.Timeline` (simulated
from a schedule, or measured by the runtime), plus the notebook's explorer.

    draw_gantt(ax, timeline)            one row per rank: F boxes light, B boxes dark, the micro-batch
                                        number inside (where it fits); white gaps are the bubble
    draw_activations(ax, timeline)      micro-batches' activations each rank holds, over time
    pipeline_figure(name, p, m, ...)    both, for a schedule, with the bubble and peaks in the title
    measured_figure(measured, simulated, m)   measured runs (filled) over their simulations (dashed)
    draw_measured_bubble(ax, measured, p)     measured bubbles against m, over the formula
    gantt_stack(timelines)              several Gantt charts one above the other, on one time axis
    draw_bubble_vs_m(ax)                the bubble against m: the formula and the simulated schedules
    activation_memory_figure(saved, p, m)     measured peak activations per stage, and their sum against m
    draw_dp_pp_layout(ax)               4 ranks as 2 pipelines of 2 stages, and their data-parallel groups
    explorer()                          ipywidgets controls (schedule, p, m, t_B/t_F, chunks) around
                                        pipeline_figure
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import FancyBboxPatch, Patch
from matplotlib.text import Text
from matplotlib.textpath import text_to_path

from labkit.pipeline.schedules import B, F, gpipe, interleaved_1f1b, make_schedule, one_f_one_b
from labkit.pipeline.simulate import (Timeline, bubble_fraction, expected_bubble, expected_peak_activations,
                                      peak_activations, simulate)
from labkit.timeline import Box, draw_timeline
from labkit.widgets import sized_figure

__all__ = ["draw_gantt", "BoxLabel", "draw_activations", "gantt_legend", "pipeline_figure", "measured_figure",
           "draw_measured_bubble", "gantt_stack", "draw_bubble_vs_m", "activation_memory_figure", "draw_dp_pp_layout",
           "explorer", "MICROBATCH_COLORS"]

# one colour per micro-batch (cycled): F drawn pale, B full
MICROBATCH_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
                     "#CCB974", "#64B5CD"]


def _compute_events(timeline: Timeline):
    return [e for e in timeline.events if e.kind in (F, B)]


class BoxLabel(Text):
    """A label centred in a box from ``x0`` to ``x1`` (data coordinates) that is drawn only where it fits:
    at draw time, with the figure's final size and the axes' final limits, its rendered width plus
    ``pad`` points on either side must not exceed the box's rendered width."""

    def __init__(self, x0: float, x1: float, y: float, text: str, *, pad: float = 1.0, **kwargs):
        super().__init__((x0 + x1) / 2, y, text, ha="center", va="center", **kwargs)
        self.span, self.pad = (x0, x1), pad
        self.set_in_layout(False)          # inside its box: no part of the layout

    def fits(self, renderer) -> bool:
        """Whether the label, as rendered by ``renderer``, lies inside its box with ``pad`` to spare."""
        left, right = self.axes.transData.transform([(self.span[0], 0.0), (self.span[1], 0.0)])[:, 0]
        pad = self.pad * self.figure.dpi / 72
        return super().get_window_extent(renderer).width + 2 * pad <= abs(right - left)

    def draw(self, renderer):
        if self.get_visible() and self.fits(renderer):
            super().draw(renderer)


def draw_gantt(ax, timeline: Timeline, *, unit: float = 1.0, unit_name: str = "", title: str = "",
               labels: bool = True, num_ranks_per_chunk: int | None = None, alpha: float = 1.0, outline: bool = False,
               height: float = 0.8, fontsize: float = 7.0):
    """Draw the compute of every rank: rank 0 on top, F boxes pale, B boxes saturated, in the colour of
    their micro-batch, numbered (``k`` or ``k.c`` for chunk c when ranks hold several stages) in
    ``fontsize`` points wherever the number fits inside its box as drawn (:class:`BoxLabel`; a box too
    narrow for its number is left unlabelled). Whatever is not covered is the bubble. ``outline=True``
    draws only the boxes' edges (to lay a measured run over a simulated one). Times are divided by
    ``unit``. The drawing is :func:`labkit.timeline.draw_timeline` with the pipeline's style."""
    p = timeline.num_ranks
    chunked = num_ranks_per_chunk is not None or any(e.action.stage >= p for e in _compute_events(timeline))
    bottom = (1 - height) / 2

    def style(e) -> Box | None:
        if e.kind not in (F, B):
            return None                                   # sends and receives: not drawn
        if outline:
            return Box(facecolor="none", edgecolor="black", linewidth=1.0, linestyle="--", bottom=bottom,
                       height=height)
        a = e.action
        return Box(facecolor=MICROBATCH_COLORS[a.microbatch % len(MICROBATCH_COLORS)],
                   alpha=alpha * (0.4 if a.kind == F else 0.95), linewidth=0.4, bottom=bottom, height=height)

    draw_timeline(ax, timeline.rows(), style, origin=timeline.origin, end=timeline.origin + timeline.makespan,
                  unit=unit, xlabel=f"time ({unit_name})" if unit_name else "time", title=title)
    if labels and not outline:
        for e in _compute_events(timeline):
            x0, x1 = (e.start - timeline.origin) / unit, (e.end - timeline.origin) / unit
            ax.add_artist(BoxLabel(x0, x1, p - 1 - e.rank + 0.5, _label(e.action, p, chunked), fontsize=fontsize,
                                   color="black" if e.kind == F else "white", clip_on=True))
    return ax


def _label(action, p: int, chunked: bool) -> str:
    return f"{action.microbatch}" + (f".{action.stage // p}" if chunked else "")


def _label_width(text: str, fontsize: float) -> float:
    """The width of ``text`` in points at ``fontsize``, as matplotlib lays it out."""
    return text_to_path.get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)[0]


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
            held += (1 if e.kind == F else -1) / chunks
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
    the activation memory. The title gives the simulated bubble against the formula and the peaks. A new
    figure is 10 inches wide, or wider (up to 14) where that lets the narrowest box hold its label."""
    schedule = make_schedule(name, p, m, chunks)
    v = schedule.num_stages // p
    timeline = simulate(schedule, t_forward=1.0 / v, t_backward=backward_ratio / v)
    fig = sized_figure((_gantt_width(timeline, v > 1), 2.8 + 0.45 * p), figure)
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


def _gantt_width(timeline: Timeline, chunked: bool, *, fontsize: float = 7.0, pad: float = 2.0,
                 least: float = 10.0, most: float = 14.0, margins: float = 1.2) -> float:
    """A figure width (inches) at which the narrowest compute box of ``timeline`` holds its label (the
    widest label, ``fontsize`` points, ``pad`` on either side), given ``margins`` inches outside the
    axes, rounded up to half an inch; between ``least`` and ``most``. :class:`BoxLabel` still checks each
    label when it is drawn."""
    p = timeline.num_ranks
    events = _compute_events(timeline)
    narrowest = min((e.duration for e in events if e.duration > 0), default=timeline.makespan or 1.0)
    label = max((_label_width(_label(e.action, p, chunked), fontsize) for e in events), default=0.0)
    axes_width = timeline.makespan / narrowest * (label + 2 * pad) / 72
    return float(np.clip(np.ceil(2 * (axes_width + margins)) / 2, least, most))


def measured_figure(measured: Mapping[tuple[str, int], Timeline], simulated: Mapping[tuple[str, int], Timeline],
                    m: int, names: Sequence[str] = ("GPipe", "1F1B"), figure=None):
    """For each schedule in ``names``, with m micro-batches: the measured timeline (filled boxes, ms) with
    the simulated one laid over it (dashed outlines), steps and bubbles in the title. ``measured`` and
    ``simulated`` map (name, m) to timelines in seconds (e.g. ``merge_timelines`` of a run, and
    ``simulate`` with the stages' times)."""
    fig = figure or plt.figure(figsize=(11, 2.9 * len(names)))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        got, sim = measured[name, m], simulated[name, m]
        draw_gantt(ax, got, unit=1e-3)
        draw_gantt(ax, sim, unit=1e-3, outline=True)
        ax.set_xlim(0, 1e3 * max(got.makespan, sim.makespan))
        ax.set_xlabel("")
        ax.set_title(f"{name}, p = {got.num_ranks}, m = {m}, measured on {got.num_ranks} processes (filled): "
                     f"{1e3 * got.makespan:.0f} ms, bubble {bubble_fraction(got):.3f};  simulated (dashed): "
                     f"{1e3 * sim.makespan:.0f} ms, bubble {bubble_fraction(sim):.3f}", fontsize=9)
    axes[-1].set_xlabel("time (ms)")
    gantt_legend(axes[-1], loc="upper left", bbox_to_anchor=(0, -0.3), ncol=3)
    fig.tight_layout()
    return fig


def draw_measured_bubble(ax, measured: Mapping[tuple[str, int], Timeline], p: int,
                         styles: Mapping[str, tuple[str, str]] | None = None, title: str = ""):
    """The bubble of each measured timeline (``measured[name, m]``) against m, one marker style per
    schedule (``styles[name]`` = (marker, colour)), over the formula (p − 1)/(m + p − 1)."""
    styles = styles or {"GPipe": ("o", MICROBATCH_COLORS[0]), "1F1B": ("x", MICROBATCH_COLORS[3])}
    ms = sorted({m for _, m in measured})
    grid = np.linspace(1, max(ms) + 2, 200)
    ax.plot(grid, (p - 1) / (grid + p - 1), color="black", lw=1.5, label=f"(p−1)/(m+p−1), p = {p}")
    for name, (marker, color) in styles.items():
        points = sorted(m for n, m in measured if n == name)
        ax.plot(points, [bubble_fraction(measured[name, m]) for m in points], marker, color=color, ms=9, mfc="none",
                mew=2, label=f"{name}, measured")
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble")
    ax.set_ylim(0, 0.8)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def gantt_stack(timelines: Mapping[str, Timeline], *, xlabel: str = "time", legend: bool = False,
                width: float = 10.0, row_height: float = 2.3) -> Figure:
    """Several timelines as Gantt charts (:func:`draw_gantt`) one above the other, each titled by its key,
    on one shared time axis from 0 to the longest step: to compare schedules, or the same work cut
    differently. ``legend`` adds :func:`gantt_legend` to the last chart."""
    fig, axes = plt.subplots(len(timelines), 1, figsize=(width, row_height * len(timelines)), sharex=True,
                             squeeze=False)
    axes = axes[:, 0]
    end = max(t.makespan for t in timelines.values())
    for ax, (title, timeline) in zip(axes, timelines.items()):
        draw_gantt(ax, timeline, title=title)
        ax.set_xlim(0, end)
        ax.set_xlabel("")
    axes[-1].set_xlabel(xlabel)
    if legend:
        gantt_legend(axes[-1], loc="upper right")
    fig.tight_layout()
    return fig


def draw_bubble_vs_m(ax, ps: Sequence[int] = (2, 4, 8), points: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), *,
                     interleaved: tuple[int, int] | None = (4, 2)):
    """The bubble (idle share of the devices' time) against the number of micro-batches m, log-scale in m:
    for each p in ``ps`` the formula (p − 1)/(m + p − 1) as a line and the simulated GPipe (circles) and
    1F1B (crosses) schedules at ``points``; with ``interleaved = (p, v)`` also the interleaved schedule
    with v chunks per rank (squares, simulated with F = 1/v, B = 2/v) over its formula (p − 1)/(vm + p − 1)."""
    ms = np.arange(1, max(points) + 1)
    colors = dict(zip(ps, MICROBATCH_COLORS))
    for p in ps:
        ax.plot(ms, (p - 1) / (ms + p - 1), color=colors[p], lw=1.5, label=f"p = {p}: (p−1)/(m+p−1)")
        ax.plot(points, [bubble_fraction(simulate(gpipe(p, m))) for m in points], "o", color=colors[p], mfc="none", ms=9)
        ax.plot(points, [bubble_fraction(simulate(one_f_one_b(p, m))) for m in points], "x", color=colors[p], ms=7)
    if interleaved is not None:
        p, v = interleaved
        color = colors.get(p, "black")
        ax.plot(ms, (p - 1) / (v * ms + p - 1), ":", color=color, lw=2,
                label=f"p = {p}, interleaved v = {v}: (p−1)/(vm+p−1)")
        valid = [m for m in points if m % p == 0]
        ax.plot(valid, [bubble_fraction(simulate(interleaved_1f1b(p, m, v), 1.0 / v, 2.0 / v)) for m in valid], "s",
                color=color, mfc="none", ms=7)
    ax.plot([], [], "ko", mfc="none", label="GPipe, simulated")
    ax.plot([], [], "kx", label="1F1B, simulated")
    if interleaved is not None:
        ax.plot([], [], "ks", mfc="none", label="interleaved, simulated")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(points))
    ax.set_xticklabels([str(m) for m in points])
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble: idle share of the devices' time")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=2)
    return ax


def activation_memory_figure(saved: Mapping[tuple[str, int], Sequence[float]], m: int,
                             names: Sequence[str] = ("GPipe", "1F1B"), *, batch: str = "the same") -> Figure:
    """Activation memory of the schedules in ``names``, from ``saved[name, m]``: the peak bytes of saved
    activations on each stage, as measured by the runtime. Left: the peak per stage at ``m`` micro-batches
    (bars, KiB), each labelled with the number of micro-batches the formula says the stage holds
    (:func:`~labkit.pipeline.simulate.expected_peak_activations`: m for GPipe, p − i for 1F1B). Right: the
    sum over the stages against every m measured (the batch, ``batch``, cut into m micro-batches)."""
    p = len(next(iter(saved.values())))
    colors = {"GPipe": MICROBATCH_COLORS[0], "1F1B": MICROBATCH_COLORS[3]}
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.9))
    ax = axes[0]
    width = 0.76 / len(names)
    for j, name in enumerate(names):
        kib = [b / 1024 for b in saved[name, m]]
        xs = np.arange(p) + (j - (len(names) - 1) / 2) * width
        ax.bar(xs, kib, width, color=colors.get(name, MICROBATCH_COLORS[j]), alpha=0.8, label=f"{name}: measured")
        for x, k, n in zip(xs, kib, expected_peak_activations(name, p, m)):
            ax.text(x, k + 1, f"{n}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(p))
    ax.set_xticklabels([f"stage {i}" for i in range(p)])
    ax.set_ylabel("peak saved activations (KiB)")
    ax.set_title(f"m = {m}: peak per stage (the number: micro-batches held;\nformula m for GPipe, p − i for 1F1B)",
                 fontsize=10)
    ax.legend(fontsize=8)

    ax = axes[1]
    for j, (name, marker) in enumerate(zip(names, "os^D")):
        ms = sorted(m_ for n, m_ in saved if n == name)
        ax.plot(ms, [sum(saved[name, m_]) / 1024 for m_ in ms], marker + "-",
                color=colors.get(name, MICROBATCH_COLORS[j]), ms=8, label=f"{name}, all stages: measured")
    all_ms = sorted({m_ for _, m_ in saved})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_ms)
    ax.set_xticklabels([str(m_) for m_ in all_ms])
    ax.set_ylim(0, None)
    ax.set_xlabel(f"micro-batches m (the batch stays {batch})")
    ax.set_ylabel("KiB")
    ax.set_title("Sum of the stages' peaks: GPipe stays at the whole batch,\n1F1B falls as 1/m", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_dp_pp_layout(ax, *, allreduce_color: str = MICROBATCH_COLORS[3]):
    """Four ranks as data parallel 2 × pipeline parallel 2: ranks {0, 1} are pipeline 0 and {2, 3}
    pipeline 1, each taking half the batch; activations and gradients go point to point along each
    pipeline, and each stage's two copies all-reduce their gradients in the group {i, i + 2}."""
    ax.set_xlim(-2.2, 4.2)
    ax.set_ylim(-2.55, 0.85)
    ax.axis("off")
    for rank in range(4):
        replica, stage_index = divmod(rank, 2)
        cx, cy = 2.6 * stage_index, -1.75 * replica
        ax.add_patch(FancyBboxPatch((cx - 0.65, cy - 0.38), 1.3, 0.76, boxstyle="round,pad=0.04",
                                    facecolor=MICROBATCH_COLORS[stage_index], alpha=0.35, edgecolor="black"))
        ax.text(cx, cy, f"rank {rank}\nstage {stage_index}", ha="center", va="center", fontsize=10)
    for replica in range(2):
        cy = -1.75 * replica
        ax.annotate("", xy=(1.93, cy + 0.13), xytext=(0.67, cy + 0.13), arrowprops=dict(arrowstyle="-|>", lw=1.5))
        ax.annotate("", xy=(0.67, cy - 0.13), xytext=(1.93, cy - 0.13), arrowprops=dict(arrowstyle="-|>", lw=1.5))
        ax.text(1.3, cy + 0.2, "activations", ha="center", va="bottom", fontsize=8)
        ax.text(1.3, cy - 0.2, "gradients", ha="center", va="top", fontsize=8)
        ax.text(-0.8, cy, f"pipeline {replica}\n(half the batch)", ha="right", va="center", fontsize=9)
    for stage_index in range(2):
        cx = 2.6 * stage_index
        ax.annotate("", xy=(cx, -1.33), xytext=(cx, -0.42),
                    arrowprops=dict(arrowstyle="<|-|>", lw=2, linestyle="--", color=allreduce_color))
        ax.text(cx + 0.1, -0.88, f"all-reduce\n(group {{{stage_index}, {stage_index + 2}}})", ha="left", va="center",
                fontsize=8, color=allreduce_color)
    ax.text(1.3, 0.7, "point to point along each pipeline (send/recv), all-reduce along each data-parallel group",
            ha="center", fontsize=9)
    return ax


def explorer(name: str = "1F1B", p: int = 4, m: int = 8, backward_ratio: float = 2.0, chunks: int = 2):
    """Controls around :func:`pipeline_figure` (labkit.widgets.FigureExplorer): the figure redraws as a
    control moves."""
    import ipywidgets as widgets
    from labkit.widgets import FigureExplorer

    def schedule_figure(figure, name, p, m, backward_ratio, chunks):
        if name == "interleaved" and m % p:
            return f"the interleaved schedule needs m to be a multiple of p = {p}"
        return pipeline_figure(name, p, m, backward_ratio, chunks, figure=figure)

    style = {"description_width": "initial"}
    return FigureExplorer(schedule_figure, {
        "name": widgets.ToggleButtons(options=["GPipe", "1F1B", "interleaved"], value=name),
        "p": widgets.IntSlider(value=p, min=1, max=8, description="stages p", style=style, continuous_update=False),
        "m": widgets.IntSlider(value=m, min=1, max=32, description="micro-batches m", style=style,
                               continuous_update=False),
        "backward_ratio": widgets.FloatSlider(value=backward_ratio, min=0.5, max=4.0, step=0.5,
                                              description="t_B / t_F", style=style, continuous_update=False),
        "chunks": widgets.IntSlider(value=chunks, min=1, max=4, description="chunks v (interleaved)", style=style,
                                    continuous_update=False)})
