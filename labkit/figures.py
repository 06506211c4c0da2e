"""What the figures of every lesson share: one colour per rank, and the bar chart of the equivalence checks.

    RANK_COLORS                         rank r is drawn in RANK_COLORS[r] in every figure of the course
    error_bars(ax, labels, errors)      "is it the same?": log-scale bars of max |difference|, green below
                                        the tolerance, red above

Each concept's own figures live beside it: ``data_parallel_figures``, ``local_sgd_figures``, ``ring_figures``,
``cost_model_figures``, ``ddp_figures``, ``large_batch_figures``, ``layer_split_figures``, ``tensor_parallel_figures``, ``pipeline/gantt``,
``param_server_figures``; the timelines of a step are drawn by :mod:`labkit.timeline`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["RANK_COLORS", "error_bars"]

RANK_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def error_bars(ax, labels: Sequence[str], errors: Sequence[float], *, tol: float = 1e-12, floor: float = 1e-18, title: str = "",
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
