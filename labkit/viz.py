"""Small matplotlib helpers for the lessons' figures (each draws on an ``ax`` the caller owns)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

__all__ = ["error_bars", "shard_grid", "RANK_COLORS"]

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
