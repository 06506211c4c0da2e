"""The figures of lesson 1's data parallelism (:mod:`labkit.data_parallel`).

    shard_grid(ax, owners)                  which rank reads which sample, epoch by epoch
    draw_loss_curves(ax, reference, curves) training losses of several runs over a reference run
    draw_loss_differences(ax, reference, curves)   |loss − reference| of each run, step by step
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from labkit.figures import RANK_COLORS

__all__ = ["shard_grid", "draw_loss_curves", "draw_loss_differences"]


def shard_grid(ax, owners: Sequence[Sequence[int]] | np.ndarray, *, title: str = "", world_size: int | None = None):
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


def draw_loss_curves(ax, reference: Sequence[float], curves: Mapping[str, Sequence[float]], *,
                     reference_label: str = "single process", styles: Sequence[str] = ("-", "--", ":", "-."),
                     xlabel: str = "step", ylabel: str = "full-data loss (MSE)", title: str = ""):
    """Training losses step by step, log-scale: the ``reference`` run as a wide grey band and each run of
    ``curves`` (label → losses) as a line over it, so that equal curves show as lines inside the band."""
    ax.plot(reference, "k-", linewidth=6, alpha=0.25, label=reference_label)
    for (label, losses), style in zip(curves.items(), styles):
        ax.plot(losses, style, linewidth=2, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def draw_loss_differences(ax, reference: Sequence[float], curves: Mapping[str, Sequence[float]], *,
                          floor: float = 1e-18, ylim: tuple[float, float] = (1e-18, 1e-10),
                          ylabel: str = "|loss_N − loss_single|", title: str = ""):
    """|loss − reference loss| of each run of ``curves`` (label → losses), step by step, log-scale; exact
    zeros drawn at ``floor``."""
    for label, losses in curves.items():
        diff = np.abs(np.asarray(losses, dtype=float) - np.asarray(reference, dtype=float))
        ax.plot(np.maximum(diff, floor), "o-", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_ylim(*ylim)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax
