"""The figure of lesson 5's layer split (:mod:`labkit.layer_split`): one step, rank by rank, as measured.

    draw_layer_split(ax, timelines)     one row per rank: forward pale, backward dark (the rank's colour),
                                        hatched grey waiting in a receive, black sending; each rank's
                                        busy fraction at the end of its row
    layer_split_legend(ax)              its key

``timelines[r]`` is rank r's timeline from :func:`labkit.layer_split.train_step`: :class:`labkit.timeline.Event`
records, drawn by :func:`labkit.timeline.draw_timeline`.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.patches import Patch

from labkit.figures import RANK_COLORS
from labkit.layer_split import busy_fractions
from labkit.timeline import Box, Event, draw_timeline

__all__ = ["draw_layer_split", "layer_split_legend"]

_WAITING = dict(facecolor="#EEEEEE", hatch="///", edgecolor="#999999")


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
