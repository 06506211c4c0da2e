"""The figure of lesson 3: one step of data-parallel training per rank, as :mod:`labkit.ddp` measured it.

    draw_ddp_timeline(ax, timelines)    per rank: compute (forward, backward, the final wait) over the
                                        all-reduces in flight; left of the dotted line communication hides
                                        behind compute, right of it the step waits for it
    ddp_timeline_legend(ax_or_fig)      its key

``timelines[r]`` is rank r's ``ddp.timeline`` (``record_timeline=True``): :class:`labkit.timeline.Event`
records, drawn by :func:`labkit.timeline.draw_timeline`.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from labkit.figures import RANK_COLORS
from labkit.timeline import Box, Event, draw_timeline

__all__ = ["draw_ddp_timeline", "ddp_timeline_legend"]

_FORWARD, _WAIT = "#B0B0B0", "#C44E52"


def draw_ddp_timeline(ax, timelines: Sequence[Sequence[Event]], *, origin: float | None = None, title: str = "",
                      unit: float = 1e-3, label_buckets: bool = True):
    """Draw one step of data-parallel training per rank (``timelines[r]``: rank r's events).

    Each rank gets two rows. The upper row is its compute: the forward pass (grey), then the backward
    pass in the rank's colour, from the end of the forward to the last gradient, with a tick where each
    gradient became ready, and the wait at the end of backward for the all-reduces still in flight (red).
    The lower row is its communication: every all-reduce, one thin bar each (stacked in launch order,
    first at the top), from its launch to its completion as stamped by the communication thread.
    A dotted line marks the end of the backward computation: communication to its left is hidden behind
    compute, communication to its right is exposed (the step waits for it).

    Times are shown in ``unit`` seconds (default ms) from ``origin`` (default: the earliest event of
    any rank; ``time.perf_counter()`` is one clock for all the processes of a machine).
    """
    if not any(timelines):
        raise ValueError("the timelines are empty: wrap the model with record_timeline=True")
    rows, labels, colour, stack, backward_ends = [], [], {}, {}, []
    for r, tl in enumerate(timelines):
        forward = [e for e in tl if e.kind == "forward"]
        grads = [e for e in tl if e.kind == "grad"]
        reduces = sorted((e for e in tl if e.kind == "allreduce"), key=lambda e: e.start)
        compute = list(forward)
        backward_end = None
        if grads:                   # the backward: from the end of the forward to the last gradient ready
            backward_end = max(g.start for g in grads)
            compute.append(Event("backward", forward[-1].end if forward else grads[0].start, backward_end, rank=r))
        compute += grads + [e for e in tl if e.kind == "wait"]
        for i, e in enumerate(reduces):
            stack[id(e)] = (i, len(reduces))
        for e in compute + reduces:
            colour[id(e)] = RANK_COLORS[r % len(RANK_COLORS)]
        rows += [compute, reduces]
        labels += [f"rank {r} compute", f"rank {r} all-reduces"]
        backward_ends.append(backward_end)

    def style(e: Event) -> Box | None:
        color = colour[id(e)]
        if e.kind == "forward":
            return Box(facecolor=_FORWARD, bottom=0.25, height=0.7)
        if e.kind == "backward":
            return Box(facecolor=color, alpha=0.45, bottom=0.25, height=0.7)
        if e.kind == "grad":
            return Box(facecolor=color, bottom=0.25, height=0.7)
        if e.kind == "wait":
            return Box(facecolor=_WAIT, alpha=0.8, hatch="///", bottom=0.25, height=0.7)
        if e.kind == "allreduce" and e.end == e.end:                      # not NaN: it completed
            i, n = stack[id(e)]
            h = 0.9 / n
            label = e.label.replace("bucket ", "b") if label_buckets and n <= 12 and e.label.startswith("bucket") else ""
            return Box(facecolor=color, edgecolor="black" if n <= 16 else "none", bottom=0.95 - (i + 1) * h,
                       height=h * 0.85, text=label, text_after=True)
        return None

    draw_timeline(ax, rows, style, row_labels=labels, origin=origin, unit=unit, title=title,
                  xlabel="time in the step (ms)" if unit == 1e-3 else f"time in the step (units of {unit:g} s)")
    events = [e for tl in timelines for e in tl]
    origin = min(e.start for e in events) if origin is None else origin
    n = len(rows)
    for r, end in enumerate(backward_ends):
        if end is not None:          # from the bottom of the rank's all-reduce row to the top of its compute row
            ax.vlines((end - origin) / unit, n - 2 * r - 2 + 0.02, n - 2 * r - 0.02, color="black", linestyle=":",
                      linewidth=1.2)
    return ax


def ddp_timeline_legend(ax_or_fig, **kwargs):
    """The key for :func:`draw_ddp_timeline` (on an axes or a figure)."""
    handles = [Patch(facecolor=_FORWARD, edgecolor="black", label="forward"),
               Patch(facecolor=RANK_COLORS[0], alpha=0.45, edgecolor="black",
                     label="backward (| = a gradient ready)"),
               Patch(facecolor=_WAIT, alpha=0.8, hatch="///", edgecolor="black",
                     label="wait for all-reduces in flight"),
               Patch(facecolor=RANK_COLORS[0], edgecolor="black", label="one all-reduce: launch → completion"),
               Line2D([], [], color="black", linestyle=":", label="backward compute ends")]
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    return ax_or_fig.legend(handles=handles, **kwargs)
