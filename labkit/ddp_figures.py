"""The figure of lesson 3: one step of data-parallel training per rank, as :mod:`labkit.ddp` measured it.

    draw_ddp_timeline(ax, timelines)    per rank: compute (forward, backward, the final wait) over the
                                        all-reduces in flight; left of the dotted line communication hides
                                        behind compute, right of it the step waits for it
    ddp_timeline_legend(ax_or_fig)      its key
    ddp_timelines_figure(panels)        one such timeline per wrapper, stacked on one time axis, with the key

and the lesson's measurements:

    draw_loss_curve(ax, losses)         the training loss of the recipe, step by step, epochs marked
    draw_wrapper_agreement(ax, errors)  each wrapper's parameters against two references (log bars)
    bucket_sweep_figure(caps, ...)      step time against bucket_cap_mb (optionally with the step-time model's
                                        predictions over it), and what communication costs
    scaling_figure(scale, ...)          step time (compute, DDP's own work, exposed all-reduces) and throughput
                                        against N

``timelines[r]`` is rank r's ``ddp.timeline`` (``record_timeline=True``): :class:`labkit.timeline.Event`
records, drawn by :func:`labkit.timeline.draw_timeline`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from labkit.figures import RANK_COLORS
from labkit.timeline import Box, Event, draw_timeline

__all__ = ["draw_ddp_timeline", "ddp_timeline_legend", "ddp_timelines_figure", "draw_loss_curve", "draw_wrapper_agreement",
           "bucket_sweep_figure", "scaling_figure"]

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


def ddp_timelines_figure(panels: Mapping[str, Sequence[Sequence[Event]]], *, steps: Sequence[float] | None = None,
                         title: str = ""):
    """One :func:`draw_ddp_timeline` per entry of ``panels`` (title → the ranks' timelines of one step), stacked
    on one time axis with the key under them. ``steps``: each panel's step time in seconds, written in a box
    at its top right."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.7 * len(panels) + 0.1), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for i, (ax, (panel_title, timelines)) in enumerate(zip(axes, panels.items())):
        draw_ddp_timeline(ax, timelines, title=panel_title)
        if steps is not None:
            ax.text(0.995, 0.96, f"step {1e3 * steps[i]:.0f} ms", transform=ax.transAxes, ha="right", va="top",
                    fontsize=9, bbox=dict(facecolor="white", edgecolor="gray"))
    for ax in axes[:-1]:
        ax.set_xlabel("")
    ddp_timeline_legend(fig, loc="lower center", ncol=5)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    return fig


def draw_loss_curve(ax, losses: Sequence[float], *, vocab_size: int | None = None, steps_per_epoch: int | None = None,
                    label: str = "training loss", xlabel: str = "step", title: str = ""):
    """The training loss, one point per step, over the loss of a uniform guess ln(``vocab_size``) (dashed),
    with a dotted line between epochs every ``steps_per_epoch`` steps."""
    ax.plot(losses, "o-", color=RANK_COLORS[0], markersize=3, label=label)
    if vocab_size:
        ax.axhline(math.log(vocab_size), color="gray", linestyle="--", linewidth=1,
                   label=f"ln {vocab_size}: uniform guess")
    if steps_per_epoch:
        for e in range(steps_per_epoch, len(losses), steps_per_epoch):
            ax.axvline(e - 0.5, color="black", linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("cross-entropy (nats per character)")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def draw_wrapper_agreement(ax, errors: Mapping[str, Sequence[float]], references: Sequence[str], *, tol: float = 1e-10,
                           floor: float = 1e-18, title: str = ""):
    """Does every wrapper train the same model? ``errors[wrapper][j]``: max |Δθ| of its parameters against
    ``references[j]``; one group of log-scale bars per wrapper, one bar per reference (exact zeros drawn at
    ``floor`` and labelled 0), the tolerance dashed. A name's ", " starts a new line on its tick label."""
    xs = np.arange(len(errors))
    width = 0.76 / len(references)
    for j, (what, color) in enumerate(zip(references, RANK_COLORS)):
        values = [e[j] for e in errors.values()]
        pos = xs + (j - (len(references) - 1) / 2) * width
        ax.bar(pos, [max(v, floor) for v in values], width=width, bottom=floor / 10, color=color, label=what)
        for xpos, v in zip(pos, values):
            ax.text(xpos, max(v, floor) * 2, "0" if v == 0 else f"{v:.0e}", ha="center", va="bottom", fontsize=7)
    ax.axhline(tol, color="black", linestyle="--", linewidth=1)
    ax.text(len(errors) - 0.5, tol * 2, f"tolerance {tol:.0e}", ha="right", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(floor / 10, max(1.0, 20 * max(max(e) for e in errors.values())))
    ax.set_xticks(xs)
    ax.set_xticklabels([name.replace(", ", "\n") for name in errors], fontsize=8)
    ax.set_ylabel(f"max |Δθ| (0 drawn at {floor:.0e})")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    return ax


_SWEEP_REFERENCES = {"naive": ("NaiveDDP", RANK_COLORS[3], "--"), "overlap": ("OverlapDDP", RANK_COLORS[1], "--"),
                     "torch": ("torch DDP (defaults)", "black", "-."),
                     "compute only": ("no communication (no_sync)", "gray", ":"),
                     "no messages": ("BucketedDDP, all-reduce a no-op (no messages)", RANK_COLORS[5], "-")}
_MODEL_STYLES = [(RANK_COLORS[2], "s"), (RANK_COLORS[4], "D"), (RANK_COLORS[6], "^"), (RANK_COLORS[7], "v")]


def bucket_sweep_figure(caps: Sequence[float], step_times: Mapping, n_buckets: Mapping[float, int],
                        predicted: Mapping[float, float], *, model: Mapping[str, Mapping[float, float]] | None = None,
                        title: str = "Step time against bucket size"):
    """The bucket-size sweep of BucketedDDP, two panels against ``bucket_cap_mb`` (log scale; a cap below
    0.04 MiB, one tensor per bucket, is drawn at the left edge).

    Left: the measured step time (``step_times[cap]``, seconds) with each point's number of buckets, and
    as horizontal lines the other wrappers' steps (``step_times`` keys "naive", "overlap", "torch" and
    "compute only", "no messages", those present). ``model``: label → {cap: predicted step time in
    seconds}, each drawn over the measured points as a dashed line (the step-time model, for instance
    with its parameters measured and with one of them fitted). Right: what communication costs if nothing
    overlapped (``predicted[cap]``, the α–β model k·α + M·β) against what the step measurably paid for it
    (step time − the compute-only step)."""
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.3))
    xs = [max(cap, 0.04) for cap in caps]
    ticks = ["1 tensor\nper bucket" if cap < 0.04 else f"{cap:g}" for cap in caps]
    ax = axes[0]
    ax.plot(xs, [1e3 * step_times[c] for c in caps], "o-", color=RANK_COLORS[0], markersize=7,
            label="BucketedDDP (measured)")
    for xpos, cap in zip(xs, caps):
        ax.annotate(f"{n_buckets[cap]}", (xpos, 1e3 * step_times[cap]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    for (label, values), (color, marker) in zip((model or {}).items(), _MODEL_STYLES):
        ax.plot(xs, [1e3 * values[c] for c in caps], linestyle="--", marker=marker, color=color, markersize=5,
                linewidth=1.3, label=label)
    for name, (label, color, style) in _SWEEP_REFERENCES.items():
        if name in step_times:
            ax.axhline(1e3 * step_times[name], color=color, linestyle=style, linewidth=1.3, label=label)
    ax.set_xlabel("bucket_cap_mb (MiB); the number above each point: buckets")
    ax.set_ylabel("step time, forward + backward (ms)")
    ax.set_title(title)
    ax.legend(fontsize=7 if model else 8, loc="upper right")
    ax = axes[1]
    ax.plot(xs, [1e3 * predicted[c] for c in caps], "s-", color=RANK_COLORS[2],
            label="communication if nothing overlapped:\nk·α + M·β, α and β measured")
    if "compute only" in step_times:
        ax.plot(xs, [1e3 * (step_times[c] - step_times["compute only"]) for c in caps], "o-", color=RANK_COLORS[0],
                label="step time − compute-only step (measured)")
    ax.set_xlabel("bucket_cap_mb (MiB)")
    ax.set_ylabel("ms per step")
    ax.set_title("What communication costs, and what of it is exposed")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(ticks)
        ax.minorticks_off()
        ax.set_ylim(0, None)
    fig.tight_layout()
    return fig


def scaling_figure(scale: Mapping[int, Mapping[str, float]], tokens_per_step: int, *, cores: int | None = None,
                   title: str = ""):
    """Data parallelism against the number of processes N. ``scale[N]``: the median "step" and "compute"
    (the same step under no_sync) in seconds, and optionally "no messages" (the same step with everything
    the wrapper does except the all-reduces: its hooks, the copies into and out of the buckets);
    ``tokens_per_step``: tokens per rank per step.

    Left: each step as stacked bars: the compute, then, given "no messages" for every N, DDP's own work
    (no messages − compute) and the exposed all-reduces (step − no messages), else the whole step − compute
    in one bar; the bars end at the measured step (a difference below zero, noise, is drawn as 0, "no
    messages" clamped between compute and step); the compute of N = 1 (the ideal for every N:
    each rank has the same work) dotted. Right: the global throughput, measured against N times that of
    N = 1 and, given ``cores``, against the bound of at most ``cores`` processes computing at once."""
    ns = list(scale)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    labels = [str(n) for n in ns]
    compute = np.array([1e3 * scale[n]["compute"] for n in ns])
    ax.bar(labels, compute, color=RANK_COLORS[0], alpha=0.7, label="compute (the same step under no_sync)")
    if all("no messages" in scale[n] for n in ns):
        # the bar's top is the measured step; "no messages" is clamped between compute and step (noise)
        top = np.array([1e3 * max(scale[n]["step"], scale[n]["compute"]) for n in ns])
        middle = np.clip([1e3 * scale[n]["no messages"] for n in ns], compute, top)
        own, exposed = middle - compute, top - middle
        ax.bar(labels, own, bottom=compute, color=RANK_COLORS[5], alpha=0.8,
               label="DDP's own work: hooks, bucket copies\n(step without messages − compute)")
        ax.bar(labels, exposed, bottom=compute + own, color=RANK_COLORS[3], alpha=0.8,
               label="exposed all-reduces (step − step without messages)")
    else:
        exposed = np.array([1e3 * max(scale[n]["step"] - scale[n]["compute"], 0) for n in ns])
        ax.bar(labels, exposed, bottom=compute, color=RANK_COLORS[3], alpha=0.8,
               label="step − compute: exposed all-reduces + DDP's own work")
    ax.axhline(compute[0], color="black", linestyle=":", linewidth=1, label=f"compute at N = {ns[0]}: the ideal for every N")
    ax.set_xlabel("processes N")
    ax.set_ylabel("time per step (ms)")
    ax.set_title("Step time: every rank has the same work")
    ax.legend(fontsize=8)
    ax = axes[1]
    measured = [n * tokens_per_step / scale[n]["step"] for n in ns]
    per_process = measured[0] / ns[0]
    ax.plot(ns, [n * per_process for n in ns], "k--", label=f"ideal: N × (N = {ns[0]})" if ns[0] == 1 else "ideal")
    if cores:
        ax.plot(ns, [min(n, cores) * per_process for n in ns], ":", color="gray", linewidth=2,
                label=f"at most {cores} processes compute at once ({cores} cores)")
    ax.plot(ns, measured, "o-", color=RANK_COLORS[0], markersize=8, label="measured")
    ax.set_xticks(ns)
    ax.set_xlabel("processes N")
    ax.set_ylabel("tokens per second (all ranks)")
    ax.set_ylim(0, None)
    ax.set_title("Throughput")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
