"""The figures of lesson 7's parameter server (:mod:`labkit.param_server`).

    draw_roles(ax, servers, workers, numel)   servers owning shards, workers talking to every server
    draw_step(ax)                             one step of a worker as a sequence diagram
    draw_stability_bounds(ax, taus, bound)    the largest stable ηλ against the delay τ (constant, scaled rate)
    loss_curves_figure(curves, labels)        loss against server updates and against wall-clock, per mode
    staleness_figure(updates, labels)         histograms of the staleness of every applied push
    draw_divergence(axes, losses, staleness, names)   large-rate runs: loss curves, and each run's staleness
    draw_stability_sweep(ax, runs)            live asynchronous runs (mean τ, ηλ): converged or diverged
    traffic_figure(workers, server_bytes, ring_bytes)   bytes per step: a server against a ring rank, in M
    COLORS                                    one colour per mode (sync, async, bounded, scaled)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from labkit.param_server import Update, shard_bounds

__all__ = ["COLORS", "draw_roles", "draw_step", "draw_stability_bounds", "loss_curves_figure", "staleness_figure",
           "draw_divergence", "draw_stability_sweep", "traffic_figure"]

COLORS = {"sync": "#4C72B0", "async": "#DD8452", "bounded": "#55A868", "scaled": "#8172B3"}


def draw_roles(ax, servers: int = 2, workers: int = 3, numel: int = 9):
    """Who talks to whom: ``servers`` servers, each owning a shard of the ``numel`` parameters
    (:func:`labkit.param_server.shard_bounds`), and ``workers`` workers, each pulling the parameters from
    every server and pushing its gradient's shards back."""
    bounds = shard_bounds(numel, servers)
    sx = np.linspace(1.2, 4.8, servers)
    wx = np.linspace(0.2, 5.8, workers)
    for s, (x, (a, b)) in enumerate(zip(sx, bounds)):
        ax.add_patch(FancyBboxPatch((x - 0.75, 2.6), 1.5, 0.75, boxstyle="round,pad=0.05", fc="#E8EEF8", ec="k"))
        ax.text(x, 2.975, f"server {s}\nshard θ[{a}:{b})\nversion v{s}", ha="center", va="center", fontsize=9)
    for w, x in enumerate(wx):
        ax.add_patch(FancyBboxPatch((x - 0.6, -0.35), 1.2, 0.7, boxstyle="round,pad=0.05", fc="#FBEEE6", ec="k"))
        ax.text(x, 0.0, f"worker {w}\nits own batches", ha="center", va="center", fontsize=9)
    for s, x0 in enumerate(sx):
        for w, x1 in enumerate(wx):
            d = np.array([x1 - x0, -2.15]); d /= np.linalg.norm(d)
            n = np.array([-d[1], d[0]]) * 0.07                  # pull and push side by side
            top, bottom = np.array([x0, 2.55]), np.array([x1, 0.4])
            ax.annotate("", xy=bottom + n, xytext=top + n, arrowprops=dict(arrowstyle="-|>", color=COLORS["sync"], lw=1.3))
            ax.annotate("", xy=top - n, xytext=bottom - n, arrowprops=dict(arrowstyle="-|>", color=COLORS["async"], lw=1.3))
    ax.plot([], [], color=COLORS["sync"], lw=1.5, label="PULL: server → worker: version and params θ[s]")
    ax.plot([], [], color=COLORS["async"], lw=1.5, label="PUSH: worker → server: gradient g[s], version pulled")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=True)
    ax.set_xlim(-0.6, 6.6)
    ax.set_ylim(-0.6, 4.3)
    ax.axis("off")
    ax.set_title(f"{servers} servers, each owning a shard; {workers} workers, each talking to every server", fontsize=10)
    return ax


def draw_step(ax):
    """One step of worker 0 with two servers and 9 parameters, as a sequence diagram (time runs down):
    PULL, the replies (version and shard), forward and backward, PUSH, and what each server applies."""
    lanes = {"server 0": 0.0, "worker 0": 2.0, "server 1": 4.0}
    for name, x in lanes.items():
        ax.plot([x, x], [0.2, -8.6], color="grey", lw=1, zorder=0)
        ax.text(x, 0.45, name, ha="center", fontsize=10, fontweight="bold")

    def msg(y, src, dst, label, color):
        ax.annotate("", xy=(lanes[dst], y), xytext=(lanes[src], y), arrowprops=dict(arrowstyle="-|>", color=color, lw=1.5))
        ax.text((lanes[src] + lanes[dst]) / 2, y + 0.12, label, ha="center", va="bottom", fontsize=8, color=color)

    msg(-0.6, "worker 0", "server 0", "PULL (32 B)", COLORS["sync"])
    msg(-0.6, "worker 0", "server 1", "PULL (32 B)", COLORS["sync"])
    msg(-1.7, "server 0", "worker 0", "v0 (8 B), θ[0:5) (40 B)", COLORS["sync"])
    msg(-2.5, "server 1", "worker 0", "v1 (8 B), θ[5:9) (32 B)", COLORS["sync"])
    ax.add_patch(FancyBboxPatch((1.25, -4.6), 1.5, 1.4, boxstyle="round,pad=0.05", fc="#F4F4F4", ec="k"))
    ax.text(2.0, -3.9, "forward +\nbackward:\ng = ∇L(θ; batch)", ha="center", va="center", fontsize=8)
    msg(-5.4, "worker 0", "server 0", "PUSH (…, v0, step), g[0:5)", COLORS["async"])
    msg(-6.2, "worker 0", "server 1", "PUSH (…, v1, step), g[5:9)", COLORS["async"])
    for x in (0.0, 4.0):
        ax.text(x, -7.5, "apply:\nsync: mean of all W\nasync: at once", ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round", fc="#E8EEF8", ec="k"))
    ax.set_xlim(-1.3, 5.3)
    ax.set_ylim(-8.7, 0.9)
    ax.axis("off")
    ax.set_title("one step of worker 0 (time runs down)", fontsize=10)
    return ax


def draw_stability_bounds(ax, taus: np.ndarray, bound: np.ndarray):
    """Delayed gradient descent on a quadratic: the largest stable ηλ against the delay τ, for a constant
    rate (``bound``, e.g. 2·sin(π/(2(2τ+1)))) and for the staleness-scaled rate η/(1+τ) ((1+τ)·bound, which
    tends to π/2), with the synchronous limit ηλ < 2 dashed."""
    taus, bound = np.asarray(taus), np.asarray(bound)
    right = taus.max()
    ax.plot(taus, bound, "o-", color=COLORS["async"], label="constant rate η: stable below 2·sin(π/(2(2τ+1)))")
    ax.plot(taus, (1 + taus) * bound, "s-", color=COLORS["scaled"], label="staleness-scaled η/(1+τ): stable below (1+τ)·that")
    ax.axhline(np.pi / 2, color=COLORS["scaled"], ls=":", lw=1)
    ax.text(right, np.pi / 2 - 0.04, "π/2", color=COLORS["scaled"], ha="right", va="top")
    ax.axhline(2, color=COLORS["sync"], ls="--", lw=1)
    ax.text(right, 2.03, "synchronous (τ = 0): ηλ < 2", color=COLORS["sync"], ha="right", va="bottom", fontsize=9)
    ax.set_xlabel("delay τ (updates)")
    ax.set_ylabel("largest stable ηλ")
    ax.set_ylim(0, 2.3)
    ax.set_xticks(taus[::2])
    ax.set_title("Delayed gradient descent on a quadratic: where it is stable", fontsize=10)
    ax.legend(fontsize=8, loc="center right")
    return ax


def loss_curves_figure(curves: Mapping[tuple[str, bool], tuple[Sequence[float], Sequence[float]]],
                       labels: Mapping[str, str], *, optimum: float | None = None, slow: float = 1.0,
                       title: str = "") -> Figure:
    """The runs of each mode in ``labels`` (mode → legend), ``curves[mode, straggler]`` = (times, losses):
    one row without and one with a straggler (worker 0 ``slow`` times slower); left the loss against the
    server's updates, right against wall-clock seconds; log-scale, the ``optimum`` dotted."""
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.2), sharey=True)
    for row, straggler in enumerate((False, True)):
        for mode, label in labels.items():
            times, losses = curves[mode, straggler]
            axes[row, 0].plot(np.arange(len(losses)), losses, color=COLORS[mode], label=label)
            axes[row, 1].plot(times, losses, ".-", ms=3, color=COLORS[mode], label=label)
        what = f"worker 0 is {slow:g}× slower" if straggler else "no straggler"
        axes[row, 0].set_title(f"{what}: loss against server updates", fontsize=10)
        axes[row, 1].set_title(f"{what}: loss against wall-clock", fontsize=10)
        axes[row, 0].set_xlabel("server updates (version)")
        axes[row, 1].set_xlabel("seconds since the server started")
    for ax in axes.flat:
        ax.set_yscale("log")
        if optimum is not None:
            ax.axhline(optimum, color="k", ls=":", lw=1)
        ax.legend(fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("full-data loss of the server's θ")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def staleness_figure(updates: Mapping[tuple[str, bool], Sequence[Update]], labels: Mapping[str, str], *,
                     slow: float = 1.0, bounds: Mapping[str, float] | None = None, max_tau: int = 13,
                     title: str = "") -> Figure:
    """Histograms of the staleness τ of every applied push, ``updates[mode, straggler]`` being a server's
    log (:class:`labkit.param_server.Update` records): one column per mode in ``labels``, one row without
    and one with a straggler (worker 0, ``slow`` times slower); the fast workers' pushes light, worker 0's
    dark, stacked; ``bounds[mode]``, if given, dashed (the largest staleness the mode allows)."""
    modes = list(labels)
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 6), sharex=True, squeeze=False)
    bins = np.arange(-0.5, max_tau + 0.5)
    for row, straggler in enumerate((False, True)):
        for col, mode in enumerate(modes):
            ax = axes[row, col]
            log = updates[mode, straggler]
            slow_st = [u.staleness for u in log if u.worker == 0]
            fast_st = [u.staleness for u in log if u.worker != 0]
            ax.hist([fast_st, slow_st], bins=bins, stacked=True, color=[COLORS[mode], "#333333"], alpha=0.8,
                    label=["workers " + ", ".join(str(w) for w in sorted({u.worker for u in log} - {0})),
                           "worker 0" + (f" ({slow:g}× slower)" if straggler else "")])
            if bounds and mode in bounds:
                ax.axvline(bounds[mode], color="k", ls="--", lw=1)
                ax.text(bounds[mode] + 0.2, ax.get_ylim()[1] * 0.9, "(W−1)(2τ+1)", fontsize=8, va="top")
            ax.set_title(f"{labels[mode]}, {'straggler' if straggler else 'no straggler'}: mean τ "
                         f"{np.mean(fast_st):.1f} (fast), {np.mean(slow_st):.1f} (worker 0), max {max(slow_st + fast_st)}",
                         fontsize=9)
            ax.legend(fontsize=8)
            ax.set_ylabel("pushes")
    for ax in axes[1]:
        ax.set_xlabel("staleness τ (updates the gradient missed)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def draw_divergence(axes, losses: Mapping[str, Sequence[float]], staleness: Mapping[str, Sequence[int]],
                    names: Mapping[str, str], *, title: str = ""):
    """Two panels for runs at a large rate: ``axes[0]`` the loss of each run (``losses[name]``, per server
    update, log-scale, legend ``names[name]``); ``axes[1]`` histograms of the staleness of the runs in
    ``staleness``, each run's mean τ in the legend and in the title (live runs: each has its own delays,
    set by its own timing, so they are compared, not claimed equal)."""
    ax = axes[0]
    for name, curve in losses.items():
        ax.plot(np.arange(len(curve)), curve, color=COLORS[name], label=names[name])
    ax.set_yscale("log")
    ax.set_xlabel("server updates (version)")
    ax.set_ylabel("full-data loss of the server's θ")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    tallest, largest = 0, 0
    for name, st in staleness.items():
        counts, _, _ = ax.hist(st, bins=np.arange(-0.5, max(st) + 1.5), alpha=0.6, color=COLORS[name],
                               label=f"{names[name]}: mean τ {np.mean(st):.1f}")
        tallest, largest = max(tallest, counts.max()), max(largest, max(st))
    if tallest:
        ax.set_ylim(0, 1.35 * tallest)                   # room for the legend above the bars
    ax.set_xticks(range(0, largest + 1))
    ax.set_xlabel("staleness τ")
    ax.set_ylabel("pushes")
    means = " and ".join(f"{np.mean(st):.1f}" for st in staleness.values())
    ax.set_title(f"each run's delays (its own timing): mean τ {means}", fontsize=10)
    ax.legend(fontsize=8)
    return axes


def draw_stability_sweep(ax, runs: Sequence[tuple[int, float, float, bool]], *, max_tau: float = 6.0):
    """Live asynchronous runs, ``runs`` = (workers, ηλ_max, measured mean staleness τ, diverged) each: one
    circle per run at (τ, ηλ_max), filled if it converged, empty if it diverged, labelled W = workers,
    over the fixed-delay bound 2·sin(π/(2(2τ+1))). The legend goes outside the axes, to the right, so that
    it covers no run wherever the measured τ fall (lay the figure out with ``tight_layout``)."""
    ts = np.linspace(0, max_tau, 200)
    ax.plot(ts, 2 * np.sin(np.pi / (2 * (2 * ts + 1))), color=COLORS["async"], label="fixed-delay bound 2·sin(π/(2(2τ+1)))")
    for workers, a, mean_tau, diverged in runs:
        ax.plot(mean_tau, a, "o", ms=9, mfc="none" if diverged else COLORS["async"], mec=COLORS["async"])
        ax.annotate(f"W={workers}", (mean_tau, a), textcoords="offset points", xytext=(6, -3), fontsize=7)
    ax.plot([], [], "o", mfc=COLORS["async"], mec=COLORS["async"], label="converged")
    ax.plot([], [], "o", mfc="none", mec=COLORS["async"], label="diverged")
    rates = sorted({a for _, a, _, _ in runs})
    ax.set_yscale("log", base=2)
    ax.set_yticks(rates)
    ax.set_yticklabels([f"{a:g}" for a in rates])
    ax.set_xlabel("measured mean staleness τ")
    ax.set_ylabel("η·λ_max")
    ax.set_title(f"Asynchronous SGD, {len(runs)} live runs: the stable learning rate shrinks like 1/τ", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return ax


def traffic_figure(workers: Sequence[int], server_in: Mapping[int, Sequence[float]], ring: Sequence[float]) -> Figure:
    """Bytes per step in units of M (the model's size), against the number of workers W. Left, what the
    busiest node receives: a parameter server with S servers (``server_in[S]``, measured, one per W) over
    W·M/S, a ring all-reduce rank (``ring``, measured) over 2(N−1)/N·M, a worker's M. Right, all nodes
    together: 2W·M for the parameter server against 2(N−1)·M for the ring."""
    Ws = np.asarray(workers)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for S, marker in zip(server_in, "os^D"):
        color = COLORS["sync"] if S == 1 else COLORS["bounded"]
        ax.plot(Ws, server_in[S], marker, ms=9, mfc="none", color=color, label=f"PS server, S = {S}: measured bytes in per step")
        ax.plot(Ws, Ws / S, "-", color=color, lw=1, label=f"W·M/S, S = {S}")
    ax.plot(Ws, ring, "D", ms=8, mfc="none", color=COLORS["async"], label="ring all-reduce rank: measured")
    wf = np.linspace(Ws.min(), Ws.max(), 100)
    ax.plot(wf, 2 * (wf - 1) / wf, "--", color=COLORS["async"], lw=1, label="2(N−1)/N·M → 2M")
    ax.plot(Ws, np.ones_like(Ws), ":", color="grey", label="PS worker: M (any W, S)")
    ax.set_xlabel("workers W (ring: N = W ranks)")
    ax.set_ylabel("bytes received per step by the busiest node (units of M)")
    ax.set_title("Received per step: the server's load grows with W", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(Ws, 2 * Ws, "o-", color=COLORS["sync"], label="parameter server (any S): W workers × (M up + M down)")
    ax.plot(Ws, 2 * (Ws - 1), "D--", color=COLORS["async"], label="ring all-reduce: N ranks × 2(N−1)/N·M")
    ax.set_xlabel("workers W = N")
    ax.set_ylabel("bytes sent per step, all nodes (units of M)")
    ax.set_title("All the traffic together: about the same; where it flows differs", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
