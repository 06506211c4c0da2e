"""The figure of lesson 1's sharding (:mod:`labkit.data_parallel`): which rank reads which sample, epoch by epoch."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap

from labkit.figures import RANK_COLORS

__all__ = ["shard_grid"]


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
