"""The ring all-reduce of lesson 2, round by round: the figures of :mod:`labkit.ring`.

    draw_ring_round(ax, N, t)     step t of the ring on N ranks: who holds which partial sums, what moved
    draw_ring_rounds(N)           every step in one figure, with the key
    ring_legend(ax, N)            the key alone
    ring_stepper(N)               the ring on N ranks step by step, with a play button (widgets)

Everything drawn is read from :mod:`labkit.ring`: the schedule ``all_reduce_rounds(N)`` and the states
``simulate(N)`` (or the states decoded from a real run's trace).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, FancyArrowPatch, Patch, Rectangle

from labkit import ring
from labkit.figures import RANK_COLORS
from labkit.ring import ALL_GATHER, REDUCE_SCATTER
from labkit.widgets import sized_figure

__all__ = ["draw_ring_round", "draw_ring_rounds", "ring_legend", "ring_step_figure", "ring_stepper"]

_PHASE_COLORS = {REDUCE_SCATTER: "#C0392B", ALL_GATHER: "#1F618D"}  # red: receiver adds; blue: overwrites


def _ring_step_title(world_size: int, t: int, rounds) -> str:
    head = f"N = {world_size}, step t = {t} of {len(rounds)}"
    if t == 0:
        return head + "\nstart: each rank holds only its own input"
    rnd = rounds[t - 1]
    verb = "receiver adds" if rnd.phase == REDUCE_SCATTER else "receiver overwrites"
    return head + f"\n{rnd.phase} round {rnd.index}: {verb}"


def draw_ring_round(ax, world_size: int, t: int, *, states=None, rounds=None, title: bool = True,
                    chunk_labels: bool | None = None):
    """Draw step ``t`` (0 .. 2(N-1)) of the ring all-reduce on ``world_size`` ranks.

    Ranks are the circles, in ring order clockwise; rank i sends only to rank i+1. Next to each rank,
    a bar of N cells: its copies of chunks 0 .. N-1, left to right. A cell holds one coloured stripe
    per rank whose input is summed into that copy (stripe r at the same height in every cell, in
    rank r's colour), so a chunk is complete when it shows all N stripes (and gets a check mark).
    Step t shows the state after t rounds and, as arrows, the transfers of the round that produced it
    (``rounds[t - 1]``; none at t = 0), each labelled with its chunk; the cells those transfers wrote
    are outlined in the phase's colour (red: reduce-scatter, receiver adds; blue: all-gather, receiver
    overwrites).

    Everything comes from :mod:`labkit.ring`: the schedule ``all_reduce_rounds(N)`` and the states
    ``simulate(N)``. Pass ``states`` (``states[t][rank][chunk]``: a set of ranks, e.g. decoded from a
    real run's trace) to draw those instead, and ``rounds`` to draw another schedule.
    """
    n = world_size
    rounds = ring.all_reduce_rounds(n) if rounds is None else rounds
    states = ring.simulate(n, rounds) if states is None else states
    if not 0 <= t <= len(rounds):
        raise ValueError(f"t must be in 0..{len(rounds)} for world_size {n}, not {t}")
    if len(states) <= t:
        raise ValueError(f"states has {len(states)} steps; step {t} was asked for")
    state = states[t]
    rnd = rounds[t - 1] if t > 0 else None
    written = {(tr.receiver, tr.chunk) for tr in rnd.transfers} if rnd is not None else set()
    phase_color = _PHASE_COLORS.get(rnd.phase, "black") if rnd is not None else "black"
    if chunk_labels is None:
        chunk_labels = n <= 6
    colors = [RANK_COLORS[r % len(RANK_COLORS)] for r in range(n)]

    # Geometry (data units): the ring grows with N so that the chunk bars never overlap.
    radius = 1.0 if n <= 4 else 1.0 + 0.16 * (n - 4)
    node_r = 0.19 if n <= 6 else 0.16
    cell_w = min(0.3, 1.25 / n)
    bar_w, bar_h = cell_w * n, max(0.36, 0.06 * n)
    small = 8 if n <= 6 else 7
    angles = [np.pi / 2 - 2 * np.pi * i / n for i in range(n)]  # rank 0 at the top, clockwise
    node_xy = [np.array([radius * np.cos(a), radius * np.sin(a)]) for a in angles]
    xs, ys = [], []  # extent of everything drawn, for the limits
    fills, frames, written_frames = [], [], []  # cell patches, drawn as three collections (fast)

    # Arrows (under the nodes): the transfers of round t, sender -> receiver, bent towards the centre
    # (to the right of the direction of travel: the ring runs clockwise).
    if rnd is not None:
        for tr in rnd.transfers:
            p0, p1 = node_xy[tr.sender], node_xy[tr.receiver]
            d = np.linalg.norm(p1 - p0)
            u = (p1 - p0) / d
            gap = node_r * 1.2  # start and end on the circles' rims, not at their centres
            bend = {2: 0.5, 3: 0.15}.get(n, 0.3)  # N = 3: the chords pass near the centre
            ax.add_patch(FancyArrowPatch(tuple(p0 + u * gap), tuple(p1 - u * gap),
                                         connectionstyle=f"arc3,rad={bend}", arrowstyle="-|>",
                                         mutation_scale=12, linewidth=1.6, color=phase_color,
                                         shrinkA=0, shrinkB=0, zorder=2))
            # arc3 puts its control point bend*d to the right of the chord, so the curve's midpoint
            # lies bend*d/2 to the right: the label sits on it
            right = np.array([u[1], -u[0]])
            label_xy = (p0 + p1) / 2 + right * (bend * d / 2)
            ax.text(*label_xy, f"c{tr.chunk}", ha="center", va="center", fontsize=small,
                    color=phase_color, fontweight="bold", zorder=5,
                    bbox=dict(boxstyle="round,pad=0.12", fc="white", ec="none", alpha=0.85))

    for rank in range(n):
        p = node_xy[rank]
        ax.add_patch(Circle(tuple(p), node_r, facecolor=colors[rank], edgecolor="black", linewidth=1, zorder=3))
        ax.text(*p, str(rank), ha="center", va="center", color="white", fontsize=10 if n <= 6 else 8,
                fontweight="bold", zorder=4)
        # The rank's chunk bar, just outside its node along the radius (clear of the node whatever
        # the angle: the box's half-extent along the radial direction is |ux| w/2 + |uy| h/2)
        u = p / np.linalg.norm(p)
        extent = abs(u[0]) * bar_w / 2 + abs(u[1]) * bar_h / 2
        centre = p + u * (node_r + 0.2 + extent)  # room for the check marks between node and bar
        left, bottom = centre[0] - bar_w / 2, centre[1] - bar_h / 2
        xs += [left, left + bar_w]
        ys += [bottom - 0.12, bottom + bar_h + 0.12]
        stripe_h = bar_h / n
        for c in range(n):
            cx = left + c * cell_w
            members = state[rank][c]
            fills.append(Rectangle((cx, bottom), cell_w, bar_h, facecolor="white", edgecolor="none"))
            for r in members:
                if isinstance(r, int) and 0 <= r < n:
                    fills.append(Rectangle((cx, bottom + bar_h - (r + 1) * stripe_h), cell_w, stripe_h,
                                           facecolor=colors[r], edgecolor="none"))
            (written_frames if (rank, c) in written else frames).append(Rectangle((cx, bottom), cell_w, bar_h))
            if len(members) == n and all(isinstance(r, int) for r in members):
                ax.text(cx + cell_w / 2, bottom + bar_h + 0.01, "✓", ha="center", va="bottom",
                        fontsize=small, color="black", zorder=5)
            if chunk_labels:
                ax.text(cx + cell_w / 2, bottom - 0.01, str(c), ha="center", va="top", fontsize=6.5,
                        color="#444444", zorder=5)

    ax.add_collection(PatchCollection(fills, match_original=True, zorder=3), autolim=False)
    ax.add_collection(PatchCollection(frames, facecolor="none", edgecolor="#555555", linewidth=0.6, zorder=4),
                      autolim=False)
    ax.add_collection(PatchCollection(written_frames, facecolor="none", edgecolor=phase_color, linewidth=2.4,
                                      zorder=5), autolim=False)
    pad = 0.08
    half_x, half_y = max(map(abs, xs)) + pad, max(map(abs, ys)) + pad
    ax.set_xlim(-half_x, half_x)
    ax.set_ylim(-half_y, half_y)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(_ring_step_title(n, t, rounds), fontsize=9,
                     color=phase_color if rnd is not None else "black")
    return ax


def ring_legend(ax, world_size: int):
    """A key for :func:`draw_ring_round`: rank colours and what the cells, outlines and arrows mean."""
    handles = [Patch(facecolor=RANK_COLORS[r % len(RANK_COLORS)], edgecolor="black", label=f"rank {r}'s input")
               for r in range(world_size)]
    handles += [Line2D([], [], color=_PHASE_COLORS[REDUCE_SCATTER], linewidth=2.4,
                       label="reduce-scatter: sent,\nreceiver adds (outlined)"),
                Line2D([], [], color=_PHASE_COLORS[ALL_GATHER], linewidth=2.4,
                       label="all-gather: sent,\nreceiver overwrites (outlined)")]
    ax.legend(handles=handles, loc="center", fontsize=8, frameon=False,
              title="cell = one chunk's copy;\na stripe per rank summed in;\n✓ = complete (all ranks)",
              title_fontsize=8)
    ax.axis("off")
    return ax


def draw_ring_rounds(world_size: int, *, ncols: int = 4, panel_size: float = 3.3, states=None, rounds=None,
                     suptitle: str | None = None):
    """Every step t = 0 .. 2(N-1) of the ring all-reduce in one figure (one :func:`draw_ring_round`
    panel each) and the key in the last free panel. Returns the figure."""
    rounds = ring.all_reduce_rounds(world_size) if rounds is None else rounds
    steps = len(rounds) + 1
    panels = steps + 1  # one more for the key
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * panel_size, nrows * panel_size))
    axes = np.atleast_1d(axes).ravel()
    for t in range(steps):
        draw_ring_round(axes[t], world_size, t, states=states, rounds=rounds)
    # Panels as tall as the drawing needs (plus its two-line title), not square
    (x0, x1), (y0, y1) = axes[0].get_xlim(), axes[0].get_ylim()
    fig.set_size_inches(ncols * panel_size, nrows * (panel_size * (y1 - y0) / (x1 - x0) + 0.75))
    ring_legend(axes[steps], world_size)
    for ax in axes[steps + 1:]:
        ax.axis("off")
    if suptitle is None:
        suptitle = (f"Ring all-reduce on N = {world_size} ranks: {world_size - 1} reduce-scatter rounds, "
                    f"then {world_size - 1} all-gather rounds")
    fig.suptitle(suptitle, fontsize=12)
    fig.tight_layout()
    return fig


def ring_step_figure(world_size: int, t: int, figure=None):
    """Step ``t`` of the ring on ``world_size`` ranks alone (a ``t`` past the last step shows the last)."""
    fig = sized_figure((6.5, 5.2), figure)
    draw_ring_round(fig.subplots(), world_size, min(t, 2 * (world_size - 1)))
    return fig


def ring_stepper(world_size: int = 4, max_ranks: int = 8):
    """:func:`ring_step_figure` with a choice of N, a step slider and a play button
    (labkit.widgets.FigureExplorer). The links are made in Python: a new N sets both maxima and
    clamps the step in one place, and the figure reads both controls when it redraws."""
    import ipywidgets as widgets
    from labkit.widgets import FigureExplorer

    last = 2 * (world_size - 1)
    ranks = widgets.Dropdown(options=list(range(2, max_ranks + 1)), value=world_size, description="ranks N")
    step = widgets.IntSlider(value=0, min=0, max=last, description="step t", continuous_update=False)
    play = widgets.Play(value=0, min=0, max=last, interval=1200, description="play")
    widgets.link((play, "value"), (step, "value"))

    def new_world_size(change):
        last = 2 * (change["new"] - 1)
        step.value = min(step.value, last)      # first: the slider's maximum may only fall above its value
        play.value = step.value
        step.max = play.max = last

    ranks.observe(new_world_size, names="value")
    return FigureExplorer(ring_step_figure, {"world_size": ranks, "t": step}, layout=[[ranks, play, step]])
