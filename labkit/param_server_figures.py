"""The figures of lesson 7's parameter server (:mod:`labkit.param_server`).

    draw_roles(ax, servers, workers, numel)   servers owning shards, workers talking to every server
    draw_step(ax)                             one step of a worker as a sequence diagram
    COLORS                                    one colour per mode (sync, async, bounded, scaled)
"""

from __future__ import annotations

import numpy as np
from matplotlib.patches import FancyBboxPatch

from labkit.param_server import shard_bounds

__all__ = ["COLORS", "draw_roles", "draw_step"]

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
