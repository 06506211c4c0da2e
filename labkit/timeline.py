"""A training step as intervals on ranks: the one event type every lesson records, and the one drawing.

    Event(kind, start, end, label, rank, nbytes, action)   something one rank did from start to end
    busy_fraction(events, start, end, busy)                the share of [start, end] spent in ``busy``
    draw_timeline(ax, rows, style)                         one row of boxes per list of events
    Box                                                    how a style draws one event

Three lessons record steps with it: the DDP of lesson 3 (forward, each gradient ready, each all-reduce
from launch to completion, the wait at the end of backward), the layer split of lesson 5 (forward,
backward, send, recv on each rank) and the pipelines of lesson 6 (each action of a schedule, simulated
or measured: ``action`` is the schedule's :class:`~labkit.pipeline.schedules.Action`). Times are
seconds of ``time.perf_counter()`` (one clock for all the processes of a machine) or units of a
simulation. Each lesson's figure (:mod:`labkit.ddp_figures`, :mod:`labkit.layer_split_figures`,
:mod:`labkit.pipeline.gantt`) is :func:`draw_timeline` with a style: a function from an event to the
:class:`Box` that draws it (or None: not drawn).

The idle share of a step has one formula, used by the layer split and the pipeline alike: rank r is
busy b_r of the step's length T, and the machine is idle 1 − Σ_r b_r / (p·T) of its time (the bubble).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "busy_fraction", "Box", "draw_timeline"]


@dataclass
class Event:
    """``kind`` happened on ``rank`` from ``start`` to ``end`` (``start == end``: an instant).

    kind: what it was ("forward", "backward", "send", "recv", "grad", "allreduce", "wait", or a pipeline
    action's kind: "F", "B", "SEND_F", ...); label: which one (a parameter's name, a bucket);
    nbytes: the bytes it communicated; action: the pipeline action it ran (lesson 6), else None.
    Not frozen: an asynchronous all-reduce is recorded at launch and gets its ``end`` on completion."""
    kind: str
    start: float
    end: float
    label: str = ""
    rank: int = 0
    nbytes: int = 0
    action: Any = None

    @property
    def duration(self) -> float:
        return self.end - self.start


def busy_fraction(events: Iterable[Event], start: float | None = None, end: float | None = None,
                  busy: Sequence[str] = ("forward", "backward")) -> float:
    """The share of [start, end] (default: the events' own extent) that the events of the kinds in
    ``busy`` cover: a rank's time spent computing rather than sending or waiting. The bubble of p ranks
    over [start, end] is 1 − the mean of their busy fractions."""
    events = list(events)
    start = min(e.start for e in events) if start is None else start
    end = max(e.end for e in events) if end is None else end
    if end <= start:
        return 0.0
    return sum(e.end - e.start for e in events if e.kind in busy) / (end - start)


@dataclass(frozen=True)
class Box:
    """How :func:`draw_timeline` draws one event: a box from its start to its end, ``bottom`` and
    ``height`` given as shares of its row; an event of no duration is drawn as a tick across the box's
    height. ``text`` goes inside the box where it fits, or after its end with ``text_after=True``."""
    facecolor: str = "#B0B0B0"
    alpha: float = 1.0
    edgecolor: str = "black"
    linewidth: float = 0.5
    linestyle: str = "-"
    hatch: str | None = None
    bottom: float = 0.1
    height: float = 0.8
    text: str = ""
    text_color: str = "black"
    text_after: bool = False


def draw_timeline(ax, rows: Sequence[Sequence[Event]], style: Callable[[Event], Box | None], *,
                  row_labels: Sequence[str] | None = None, origin: float | None = None, end: float | None = None,
                  unit: float = 1.0, xlabel: str = "time", title: str = "", fontsize: float = 8):
    """Draw ``rows[i]`` as row i (row 0 on top, rows one unit tall: row i spans y = n−1−i … n−i), each
    event as ``style(event)`` says (None: skip it). Times are shown in ``unit`` from ``origin``
    (default: the earliest event) to ``end`` (default: the latest); drawing over another timeline on
    the same axes keeps the wider of the two. Returns the axes."""
    events = [e for row in rows for e in row]
    if not events:
        raise ValueError("nothing to draw: the timelines are empty")
    origin = min(e.start for e in events) if origin is None else origin
    end = max(e.end for e in events) if end is None else end
    right = ax.get_xlim()[1] if ax.has_data() else 0.0
    span = (end - origin) / unit
    n = len(rows)
    for i, row in enumerate(rows):
        y = n - 1 - i
        for e in row:
            box = style(e)
            if box is None:
                continue
            x0, w = (e.start - origin) / unit, (e.end - e.start) / unit
            bottom = y + box.bottom
            if w == 0:
                ax.vlines(x0, bottom, bottom + box.height, color=box.facecolor, linewidth=max(box.linewidth, 0.8))
            else:
                ax.broken_barh([(x0, w)], (bottom, box.height), facecolor=box.facecolor, alpha=box.alpha,
                               edgecolor=box.edgecolor, linewidth=box.linewidth, linestyle=box.linestyle,
                               hatch=box.hatch)
            if box.text and box.text_after:
                ax.text(x0 + w, bottom + box.height / 2, " " + box.text, ha="left", va="center",
                        fontsize=fontsize - 1, color=box.text_color)
            elif box.text and w > 0.007 * len(box.text) * span:        # inside, only where it fits
                ax.text(x0 + w / 2, bottom + box.height / 2, box.text, ha="center", va="center",
                        fontsize=fontsize - 1, color=box.text_color, clip_on=True)
    ax.set_yticks([n - 1 - i + 0.5 for i in range(n)])
    ax.set_yticklabels(list(row_labels) if row_labels is not None else [f"rank {i}" for i in range(n)],
                       fontsize=fontsize)
    ax.set_ylim(-0.1, n + 0.1)
    ax.set_xlim(0, max(right, span))
    ax.set_xlabel(xlabel)
    ax.grid(axis="y", visible=False)
    if title:
        ax.set_title(title, fontsize=10)
    return ax
