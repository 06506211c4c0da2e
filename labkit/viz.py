"""Small matplotlib helpers for the lessons' figures (each draws on an ``ax`` the caller owns)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, FancyArrowPatch, Patch, Rectangle

from labkit import ring
from labkit.ring import ALL_GATHER, REDUCE_SCATTER

__all__ = ["error_bars", "shard_grid", "RANK_COLORS", "draw_ring_round", "draw_ring_rounds", "ring_legend"]

RANK_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def error_bars(ax, labels, errors, *, tol: float = 1e-12, floor: float = 1e-18, title: str = "",
               ylabel: str = "max |difference|"):
    """Log-scale bar chart of equivalence errors: green bars are below ``tol`` (equal up to rounding),
    red bars above it (a real difference). Exact zeros are drawn at ``floor`` and labelled "0"."""
    errors = np.asarray(errors, dtype=float)
    heights = np.maximum(errors, floor)
    colors = ["#55A868" if e < tol else "#C44E52" for e in errors]
    x = np.arange(len(labels))
    ax.bar(x, heights, color=colors, bottom=floor / 10)
    ax.set_yscale("log")
    ax.set_ylim(floor / 10, max(1.0, heights.max() * 20))
    ax.axhline(tol, color="black", linestyle="--", linewidth=1)
    ax.text(len(labels) - 0.5, tol * 2, f"tolerance {tol:.0e}", ha="right", va="bottom", fontsize=8)
    for xi, e, h in zip(x, errors, heights):
        ax.text(xi, h * 1.5, "0" if e == 0 else f"{e:.1e}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def shard_grid(ax, owners, *, title: str = "", world_size: int | None = None):
    """Which rank reads each sample in each epoch: ``owners[e][j]`` is the rank that gets sample j in
    epoch e (-1: nobody). One row per epoch, one column per sample, one colour per rank."""
    owners = np.asarray(owners)
    world_size = world_size or int(owners.max()) + 1
    cmap = ListedColormap(["white"] + RANK_COLORS[:world_size])
    ax.imshow(owners + 1, cmap=cmap, vmin=-0.5, vmax=world_size + 0.5, aspect="auto")
    ax.set_xticks(range(owners.shape[1]))
    ax.set_yticks(range(owners.shape[0]))
    ax.set_xlabel("sample index")
    ax.set_ylabel("epoch")
    ax.tick_params(labelsize=7)
    # Grid lines between the cells, so each sample reads as one box.
    ax.set_xticks(np.arange(-0.5, owners.shape[1]), minor=True)
    ax.set_yticks(np.arange(-0.5, owners.shape[0]), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    if title:
        ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=RANK_COLORS[r]) for r in range(world_size)]
    ax.legend(handles, [f"rank {r}" for r in range(world_size)], loc="upper center",
              bbox_to_anchor=(0.5, -0.25), ncol=world_size, fontsize=8, frameon=False)
    return ax


# ---------------------------------------------------------------------------------------------
# The ring all-reduce, round by round (lesson 2). Everything drawn is read from labkit.ring.
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# DDP: one training step per rank, measured (lesson 3). Reads labkit.ddp.TimelineEvent lists.
# ---------------------------------------------------------------------------------------------

__all__ += ["draw_ddp_timeline", "ddp_timeline_legend"]

_TIMELINE_COLORS = {"forward": "#B0B0B0", "wait": "#C44E52"}


def draw_ddp_timeline(ax, timelines, *, origin: float | None = None, title: str = "", unit: float = 1e-3,
                      label_buckets: bool = True):
    """Draw one step of data-parallel training per rank, as measured by ``labkit.ddp``'s
    ``record_timeline=True`` (``timelines[r]``: rank r's list of ``TimelineEvent``).

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
    events = [e for tl in timelines for e in tl]
    if not events:
        raise ValueError("the timelines are empty: wrap the model with record_timeline=True")
    origin = min(e.start for e in events) if origin is None else origin
    scale = lambda t: (t - origin) / unit  # noqa: E731
    n = len(timelines)
    yticks, ylabels = [], []
    for r, tl in enumerate(timelines):
        base = 3.0 * (n - 1 - r)                     # rank 0 on top
        comp_y, comm_y = base + 1.45, base           # compute row [comp_y, comp_y + 1], comm [comm_y, + 1.3]
        color = RANK_COLORS[r % len(RANK_COLORS)]
        forward = [e for e in tl if e.kind == "forward"]
        grads = [e for e in tl if e.kind == "grad"]
        waits = [e for e in tl if e.kind == "wait"]
        reduces = sorted((e for e in tl if e.kind == "allreduce"), key=lambda e: e.start)
        for e in forward:
            ax.broken_barh([(scale(e.start), scale(e.end) - scale(e.start))], (comp_y, 1.0),
                           facecolor=_TIMELINE_COLORS["forward"], edgecolor="black", linewidth=0.5)
        backward_end = None
        if grads:
            backward_start = scale(forward[-1].end) if forward else scale(grads[0].start)
            backward_end = scale(max(g.start for g in grads))
            ax.broken_barh([(backward_start, backward_end - backward_start)], (comp_y, 1.0),
                           facecolor=color, alpha=0.45, edgecolor="black", linewidth=0.5)
            ax.vlines([scale(g.start) for g in grads], comp_y, comp_y + 1.0, color=color, linewidth=0.8)
        for e in waits:
            ax.broken_barh([(scale(e.start), scale(e.end) - scale(e.start))], (comp_y, 1.0),
                           facecolor=_TIMELINE_COLORS["wait"], alpha=0.8, edgecolor="black", linewidth=0.5,
                           hatch="///")
        if reduces:
            h = 1.3 / len(reduces)
            for i, e in enumerate(reduces):
                y = comm_y + 1.3 - (i + 1) * h
                ax.broken_barh([(scale(e.start), max(scale(e.end) - scale(e.start), 0.0))], (y, h * 0.85),
                               facecolor=color, edgecolor="black" if len(reduces) <= 16 else "none",
                               linewidth=0.5)
                if label_buckets and len(reduces) <= 12 and e.label.startswith("bucket"):
                    ax.text(scale(e.end), y + h * 0.42, " " + e.label.replace("bucket ", "b"),
                            va="center", ha="left", fontsize=7)
        if backward_end is not None:
            ax.vlines(backward_end, comm_y - 0.1, comp_y + 1.1, color="black", linestyle=":", linewidth=1.2)
        yticks += [comp_y + 0.5, comm_y + 0.65]
        ylabels += [f"rank {r} compute", f"rank {r} all-reduces"]
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.set_ylim(-0.3, 3.0 * (n - 1) + 2.75)
    ax.set_xlabel("time in the step (ms)" if unit == 1e-3 else f"time in the step (units of {unit:g} s)")
    ax.grid(axis="y", visible=False)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def ddp_timeline_legend(ax_or_fig, **kwargs):
    """The key for :func:`draw_ddp_timeline` (on an axes or a figure)."""
    handles = [Patch(facecolor=_TIMELINE_COLORS["forward"], edgecolor="black", label="forward"),
               Patch(facecolor=RANK_COLORS[0], alpha=0.45, edgecolor="black",
                     label="backward (| = a gradient ready)"),
               Patch(facecolor=_TIMELINE_COLORS["wait"], alpha=0.8, hatch="///", edgecolor="black",
                     label="wait for all-reduces in flight"),
               Patch(facecolor=RANK_COLORS[0], edgecolor="black", label="one all-reduce: launch → completion"),
               Line2D([], [], color="black", linestyle=":", label="backward compute ends")]
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    return ax_or_fig.legend(handles=handles, **kwargs)


# ---------------------------------------------------------------------------------------------
# Large-batch training (lesson 4). Reads the results of labkit.labs.large_batch (or the same format).
# ---------------------------------------------------------------------------------------------

__all__ += ["METHOD_COLORS", "METHOD_LABELS", "draw_batch_sweep", "batch_sweep_key", "batch_sweep_figure",
            "draw_trust_ratios"]

METHOD_COLORS = {"sgd": "#4C72B0", "adam": "#DD8452", "lamb": "#55A868", "adascale": "#C44E52"}
METHOD_LABELS = {"sgd": "SGD + linear scaling + warm-up", "adam": "AdamW + √k scaling + warm-up",
                 "lamb": "LAMB + √k scaling + warm-up", "adascale": "AdaScale SGD (gain; τ budget)"}


def _runs_by_method(results):
    by_method = {}
    for r in results["runs"]:
        by_method.setdefault(r["method"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["k"]) for m, rs in by_method.items()}


def _batch_axis(ax, batches, block_size):
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([f"{b}\n({b * block_size // 1024}K tok)" if b * block_size >= 1024 else str(b)
                        for b in batches], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("global batch (blocks of %d characters)" % block_size)


def draw_batch_sweep(axes, results, *, methods=None, title: bool = True):
    """The batch-size sweep of ``labkit.labs.large_batch`` on three axes, one line per method:

    0. final validation loss (solid) and training loss (dotted) against the batch size, after the
       same number of samples (AdaScale: the same scale-invariant progress, and more samples), and
       the validation loss of letter frequencies alone (``results["unigram_val_loss"]``, if there);
    1. optimizer steps to reach the target validation loss (log-log), with perfect scaling (k times
       the batch, k times fewer steps) drawn from the k = 1 runs;
    2. samples (epochs) read to reach the target: perfect scaling is flat; the rise is the price of
       a batch beyond the gradient noise scale (McCandlish et al. 2018).
    Diverged runs and runs that never reach the target are marked × at the top of their panel.
    """
    by_method = _runs_by_method(results)
    methods = [m for m in (methods or METHOD_COLORS) if m in by_method]
    block = results["block_size"]
    batches = sorted({r["batch_blocks"] for rs in by_method.values() for r in rs})
    n_blocks = results["train_blocks"]
    target = results["target_loss"]
    offsets = {m: 1 + 0.035 * (i - (len(methods) - 1) / 2) for i, m in enumerate(methods)}  # side by side
    tops = []
    for ax in axes:
        _batch_axis(ax, batches, block)
    for m in methods:
        rs, color, dx = by_method[m], METHOD_COLORS.get(m, "black"), offsets[m]
        xs = [r["batch_blocks"] * dx for r in rs]
        val = [r["final_val_loss"] if r["final_val_loss"] is not None else float("nan") for r in rs]
        train = [r["final_train_loss"] if r["final_train_loss"] is not None else float("nan") for r in rs]
        axes[0].plot(xs, val, "o-", color=color, label=METHOD_LABELS.get(m, m), lw=2, ms=6)
        axes[0].plot(xs, train, ":", color=color, lw=1.3, alpha=0.8)
        steps = [r["steps_to_target"] if r["steps_to_target"] else float("nan") for r in rs]
        epochs = [r["samples_to_target"] / n_blocks if r["samples_to_target"] else float("nan") for r in rs]
        axes[1].plot(xs, steps, "o-", color=color, lw=2, ms=6)
        axes[2].plot(xs, epochs, "o-", color=color, lw=2, ms=6)
        tops.append([(x, r) for x, r in zip(xs, rs)])
    # k = 1 reference for perfect scaling: the best of the methods at the base batch
    base = [r for m in methods for r in by_method[m] if r["k"] == 1 and r["steps_to_target"]]
    if base:
        s1 = min(r["steps_to_target"] for r in base)
        b1 = base[0]["batch_blocks"]
        axes[1].plot(batches, [s1 * b1 / b for b in batches], "k--", lw=1,
                     label="perfect scaling (k× batch, k× fewer steps)")
        axes[2].axhline(s1 * b1 / n_blocks, color="black", ls="--", lw=1, label="perfect scaling (same samples)")
    if results.get("unigram_val_loss"):
        axes[0].axhline(results["unigram_val_loss"], color="gray", ls="--", lw=1)
        axes[0].text(batches[0], results["unigram_val_loss"], " letter frequencies only", va="bottom", fontsize=8,
                     color="gray")
    budget = results["budget_samples"] / n_blocks
    axes[2].axhline(budget, color="gray", ls=":", lw=1.5,
                    label=f"sample budget of SGD/AdamW/LAMB ({budget:.2g} epoch{'s' if budget != 1 else ''})")
    axes[1].set_yscale("log")
    # × just under the top of each panel for runs that diverged or never reached the target; an open
    # circle around the points of AdaScale runs stopped by their sample cap before τ reached the budget
    for ax_i, ax in enumerate(axes):
        lo, hi = ax.get_ylim()
        at_top = ax.get_xaxis_transform()             # x in data, y in axes coordinates
        for m, pairs in zip(methods, tops):
            color = METHOD_COLORS.get(m, "black")
            for x, r in pairs:
                missing = r["diverged"] if ax_i == 0 else (r["diverged"] or not r["steps_to_target"])
                if missing:
                    ax.plot([x], [0.96], "x", color=color, ms=9, mew=2.5, transform=at_top, clip_on=False)
                elif ax_i == 0 and r.get("stopped_at_sample_cap"):
                    ax.plot([x], [r["final_val_loss"]], "o", mfc="none", mec=color, ms=13, mew=1.5)
        ax.set_ylim(lo, hi + 0.06 * (hi - lo) if ax.get_yscale() == "linear" else hi * 1.3)
    axes[0].set_ylabel("final loss (nats/character)")
    axes[1].set_ylabel(f"steps to validation loss {target:g}")
    axes[2].set_ylabel(f"epochs read to validation loss {target:g}")
    axes[1].legend(fontsize=8, loc="lower left")
    axes[2].legend(fontsize=8, loc="best")
    if title:
        axes[0].set_title("Final loss after the same budget", fontsize=10)
        axes[1].set_title("Steps to the target (×: never reached)", fontsize=10)
        axes[2].set_title("Samples to the target", fontsize=10)
    return axes


def batch_sweep_key(results, methods=None):
    """Legend handles for :func:`draw_batch_sweep`: the methods, and what the dotted lines and marks mean."""
    present = {r["method"] for r in results["runs"]}
    handles = [Line2D([], [], color=METHOD_COLORS.get(m, "black"), marker="o", lw=2, label=METHOD_LABELS.get(m, m))
               for m in (methods or METHOD_COLORS) if m in present]
    handles += [Line2D([], [], color="gray", ls=":", label="dotted: final training loss"),
                Line2D([], [], color="gray", marker="x", mew=2.5, ls="none", label="×: diverged / target not reached")]
    if any(r.get("stopped_at_sample_cap") for r in results["runs"]):
        handles.append(Line2D([], [], color="gray", marker="o", mfc="none", ms=10, ls="none",
                              label="○: AdaScale stopped by its sample cap"))
    return handles


def batch_sweep_figure(results, *, title: str | None = None, figure=None, methods=None):
    """A whole figure for a sweep: :func:`draw_batch_sweep`'s three panels, the key under them.
    ``figure``: draw into this (e.g. a ``matplotlib.figure.Figure`` without pyplot); default a new
    pyplot figure. Uses matplotlib's constrained layout, which keeps room for the key."""
    fig = figure if figure is not None else plt.figure(figsize=(15, 5.2))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 3)
    draw_batch_sweep(axes, results, methods=methods)
    fig.legend(handles=batch_sweep_key(results, methods), loc="outside lower center", ncol=4, fontsize=9,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def draw_trust_ratios(ax, steps, ratios, *, names=None, log: bool = True, title: str = "", legend: bool = True):
    """LAMB's per-layer trust ratios ‖θ‖/‖u‖ over training: ``ratios[name]`` is one layer's list, one
    value per entry of ``steps``. ``names``: the layers to draw (default all), one line each, in the
    colours of matplotlib's default cycle for up to 10 layers."""
    names = list(ratios) if names is None else list(names)
    cmap = plt.get_cmap("viridis" if len(names) > 10 else "tab10")
    for i, name in enumerate(names):
        color = cmap(i / max(1, len(names) - 1)) if len(names) > 10 else cmap(i % 10)
        ax.plot(steps, ratios[name], color=color, lw=1.5, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("trust ratio ‖θ‖ / ‖u‖")
    if legend and len(names) <= 12:
        ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return ax
