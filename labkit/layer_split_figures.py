"""The figures of lesson 5's layer split (:mod:`labkit.layer_split`): why a model is split, and one step,
rank by rank, as measured.

    draw_model_state_memory(ax, models, bytes_per_param, gpu_memory)   the model states of large models
                                        (weights, gradients, optimizer) against one GPU's memory
    draw_layer_split(ax, timelines)     one row per rank: forward pale, backward dark (the rank's colour),
                                        hatched grey waiting in a receive, black sending; each rank's
                                        busy fraction at the end of its row
    layer_split_legend(ax)              its key

``timelines[r]`` is rank r's timeline from :func:`labkit.layer_split.train_step`: :class:`labkit.timeline.Event`
records, drawn by :func:`labkit.timeline.draw_timeline`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.patches import Patch

from labkit.figures import RANK_COLORS
from labkit.layer_split import busy_fractions
from labkit.timeline import Box, Event, draw_timeline

__all__ = ["draw_model_state_memory", "draw_layer_split", "layer_split_legend"]

_WAITING = dict(facecolor="#EEEEEE", hatch="///", edgecolor="#999999")
_GB = 1e9


def draw_model_state_memory(ax, models: Mapping[str, float], bytes_per_param: Mapping[str, int], gpu_memory: float, *,
                            xlim: float = 1400):
    """Why a model is split: one horizontal bar per model (``models``: name → parameters), stacked from the
    bytes each parameter costs (``bytes_per_param``: what → bytes, in the rank colours), in GB, with the
    total and how many GPUs of ``gpu_memory`` bytes it fills written beside the bar, and one GPU's memory
    as a dashed line. Activations are not included."""
    names = list(models)
    per_param = sum(bytes_per_param.values())
    left = np.zeros(len(names))
    for i, (what, b) in enumerate(bytes_per_param.items()):
        widths = np.array([b * models[n] / _GB for n in names])
        ax.barh(names, widths, left=left, color=RANK_COLORS[i], label=f"{what}: {b} B/param")
        left += widths
    gpu = f"{gpu_memory / _GB:.0f} GB"
    for y, n in enumerate(names):
        total = per_param * models[n]
        ax.text(left[y] + 15, y, f"{total / _GB:,.0f} GB = {total / gpu_memory:.1f} × {gpu}", va="center", fontsize=9)
    ax.axvline(gpu_memory / _GB, color="black", linestyle="--", linewidth=1.5)
    ax.text(gpu_memory / _GB + 8, -0.5, f"one {gpu} GPU", fontsize=9, va="center")
    ax.set_xlim(0, xlim)
    ax.set_ylim(len(names) - 0.5, -0.75)
    ax.set_xlabel("memory for the model states (GB), activations not included")
    ax.set_title(f"Training with Adam in mixed precision: {per_param} bytes per parameter")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, frameon=False)
    return ax


def draw_layer_split(ax, timelines: Sequence[Sequence[Event]], *, unit: float = 1e-3, busy: bool = True):
    """One row per rank (rank 0 on top): forward pale, backward dark in the rank's colour; hatched grey:
    waiting in a receive; black: sending. Whatever is not coloured is idle. ``busy``: write each rank's
    busy fraction (:func:`labkit.layer_split.busy_fractions`) after its row. Times in ``unit`` seconds."""
    row_of = {id(e): r for r, t in enumerate(timelines) for e in t}

    def style(e: Event) -> Box:
        color = RANK_COLORS[row_of[id(e)] % len(RANK_COLORS)]
        if e.kind == "forward":
            return Box(facecolor=color, alpha=0.45, bottom=0.15, height=0.7)
        if e.kind == "backward":
            return Box(facecolor=color, alpha=0.95, bottom=0.15, height=0.7)
        if e.kind == "recv":
            return Box(**_WAITING, bottom=0.15, height=0.7)
        return Box(facecolor="black", bottom=0.35, height=0.3)               # send

    draw_timeline(ax, timelines, style, unit=unit, fontsize=10,
                  xlabel="time in the step (ms)" if unit == 1e-3 else f"time in the step (units of {unit:g} s)")
    if busy:
        start = min(e.start for t in timelines for e in t)
        end = (max(e.end for t in timelines for e in t) - start) / unit
        p = len(timelines)
        for rank, f in enumerate(busy_fractions(timelines)):
            ax.text(end * 1.01, p - 1 - rank + 0.5, f"busy {f:.0%}", va="center", fontsize=9)
        ax.set_xlim(0, end * 1.12)
    return ax


def layer_split_legend(ax, **kwargs):
    """The key for :func:`draw_layer_split`."""
    handles = [Patch(facecolor=RANK_COLORS[0], alpha=0.45, edgecolor="black", label="forward"),
               Patch(facecolor=RANK_COLORS[0], alpha=0.95, edgecolor="black", label="backward"),
               Patch(**_WAITING, label="waiting for a neighbour"),
               Patch(facecolor="black", label="send")]
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    return ax.legend(handles=handles, **kwargs)
