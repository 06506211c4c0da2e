"""The figures of lesson 5's tensor parallelism (:mod:`labkit.tensor_parallel`).

    draw_tp_mlp(ax, tp)          Megatron's MLP on tp ranks: W₁ column-parallel, W₂ row-parallel, f and g
    draw_grid(ax, results)       d × t ranks as data parallel × tensor parallel, from a live run's groups
    c_attn_rows_figure(rows, C, n_head)   which rows of attention's stacked q | k | v projection each rank holds
    draw_tp_dp_traffic(ax, tokens, tp_bytes, dp_bytes, crossover)   bytes a rank sends per block and step,
                                 tensor parallel against data parallel, against the tokens of a micro-batch
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle

from labkit.figures import RANK_COLORS

__all__ = ["draw_tp_mlp", "draw_grid", "c_attn_rows_figure", "draw_tp_dp_traffic"]


def draw_tp_mlp(ax, tp: int = 2):
    """Megatron's MLP on tp ranks, one lane per rank: X ·W₁ᵀ (column-parallel) → GELU → ·W₂ᵀ (row-parallel)
    → partial sums → g → Y. W₁ᵀ and W₂ᵀ are drawn as in Y = X·Wᵀ (Megatron's A = Wᵀ). Indices are set as
    subscripts (mathtext: Z₀, Y₀, Σᵣ Yᵣ), never as literal underscores."""
    n, c, c4, lane = 1.6, 1.0, 2.4, 4.0              # drawn sizes: tokens, C, 4C; the height of a lane
    centers = [(tp - 1 - r) * lane for r in range(tp)]
    mid = sum(centers) / tp

    def box(x, y, w, h, color="#D0D0D0", own=True, **kw):
        ax.add_patch(Rectangle((x, y), w, h, facecolor=color if own else "white", edgecolor="black" if own else "#AAAAAA",
                               linestyle="-" if own else "--", linewidth=1 if own else 0.8, **kw))

    def arrow(p0, p1, color="black", **kw):
        ax.add_patch(FancyArrowPatch(p0, p1, arrowstyle="-|>", mutation_scale=12, color=color, linewidth=1.2,
                                     shrinkA=2, shrinkB=2, **kw))

    def node(x, y, text, color):
        ax.add_patch(FancyBboxPatch((x - 0.45, y - 0.4), 0.9, 0.8, boxstyle="round,pad=0.05", facecolor=color,
                                    edgecolor="black", linewidth=1.2, zorder=3))
        ax.text(x, y, text, ha="center", va="center", fontsize=13, fontweight="bold", zorder=4)

    box(-3.2, mid - n / 2, c, n)
    ax.text(-3.2 + c / 2, mid + n / 2 + 0.25, "X  (BT × C)\nthe same on\nevery rank", ha="center", va="bottom", fontsize=8)
    node(-1.3, mid, "f", "#F2E6A0")
    ax.text(-1.3, mid - 0.7, "forward: copy\nbackward:\nall-reduce", ha="center", va="top", fontsize=8)
    arrow((-3.2 + c, mid), (-1.75, mid))
    x_x, x_w1, x_z, x_w2, x_y = 0.0, 1.5, 4.9, 8.3, 10.3
    for r, yc in enumerate(centers):
        color = RANK_COLORS[r]
        arrow((-0.85, mid), (x_x, yc))
        box(x_x, yc - n / 2, c, n)                                               # X, whole
        ax.text(x_x + c + 0.25, yc, "·", fontsize=16, ha="center", va="center")
        for s in range(tp):                                                      # W₁ᵀ: C × 4C, columns cut
            box(x_w1 + s * c4 / tp, yc - c / 2, c4 / tp, c, color, own=(s == r))
        ax.text(x_w1 + c4 / 2, yc + c / 2 + 0.1, f"W₁ᵀ (C × 4C): rank {r} holds\n1/{tp} of its columns",
                ha="center", va="bottom", fontsize=8)
        arrow((x_w1 + c4 + 0.05, yc), (x_z - 0.05, yc))
        ax.text((x_w1 + c4 + x_z) / 2, yc + 0.12, "GELU", ha="center", va="bottom", fontsize=8)
        for s in range(tp):                                                      # Z: BT × 4C, its columns
            box(x_z + s * c4 / tp, yc - n / 2, c4 / tp, n, color, own=(s == r))
        ax.text(x_z + c4 / 2, yc - n / 2 - 0.1, rf"$Z_{r} = \mathrm{{GELU}}(X\,W_{{1,{r}}}^{{\,\top}} + b_{{1,{r}}})$",
                ha="center", va="top", fontsize=8)
        ax.text(x_z + c4 + 0.3, yc, "·", fontsize=16, ha="center", va="center")
        for s in range(tp):                                                      # W₂ᵀ: 4C × C, rows cut
            box(x_w2, yc + c4 / 2 - (s + 1) * c4 / tp, c, c4 / tp, color, own=(s == r))
        ax.text(x_w2 + c / 2, yc + c4 / 2 + 0.1, "W₂ᵀ (4C × C):\nits rows", ha="center", va="bottom", fontsize=8)
        ax.text(x_w2 + c + 0.25, yc, "=", fontsize=13, ha="center", va="center")
        box(x_y, yc - n / 2, c, n, color, hatch="..")                          # the partial sum
        ax.text(x_y + c / 2, yc - n / 2 - 0.1, f"$Y_{r}$: a partial\nsum (BT × C)", ha="center", va="top", fontsize=8)
        ax.text(x_x + c / 2, yc + n / 2 + 0.15, f"rank {r}", ha="center", va="bottom", fontsize=11, color=color,
                fontweight="bold")
        arrow((x_y + c, yc), (12.55, mid))
    node(13.0, mid, "g", "#A8D5BA")
    ax.text(13.0, mid - 0.7, "forward:\nall-reduce Σ\nbackward: copy", ha="center", va="top", fontsize=8)
    arrow((13.45, mid), (14.4, mid))
    ax.text(13.9, mid + 0.15, "+ b₂", ha="center", va="bottom", fontsize=9)
    box(14.45, mid - n / 2, c, n)
    ax.text(14.45 + c / 2, mid + n / 2 + 0.25, "$Y = \\Sigma_r\\, Y_r + b_2$\nthe same on\nevery rank", ha="center",
            va="bottom", fontsize=8)
    ax.text((x_w1 + x_y) / 2 + 0.5, centers[-1] - n / 2 - 1.15,
            "no communication from f to g: GELU acts element by element on each rank's own hidden features",
            ha="center", va="top", fontsize=9, style="italic")
    ax.set_xlim(-4.0, 16.0)
    ax.set_ylim(centers[-1] - n / 2 - 1.7, centers[0] + c4 / 2 + 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax


def draw_grid(ax, results: Sequence[tuple[Any, dict]], d: int = 2, t: int = 2):
    """The d × t grid of ranks as a live run reported it: TP groups (rows, inside a node) all-reduce
    activations, DP groups (columns) all-reduce gradients. ``results[rank]`` is (anything, info) with
    ``info["tp group"]`` and ``info["dp group"]`` (the ranks of its groups, from
    :func:`labkit.tensor_parallel_gpt.grid_groups`) and ``info["sequences"]`` (the first and last sequence of
    the batch its replica read)."""
    pos = {}
    for rank, (_, info) in enumerate(results):
        i, j = info["dp group"].index(rank), info["tp group"].index(rank)
        pos[rank] = (j * 4.8, (d - 1 - i) * 3.2)
    for i in range(d):                                   # one node per TP group
        ax.add_patch(FancyBboxPatch((-1.6, (d - 1 - i) * 3.2 - 1.05), 4.8 * (t - 1) + 3.2, 2.1,
                                    boxstyle="round,pad=0.1", facecolor="none", edgecolor="gray", linestyle="--"))
        ax.text(4.8 * (t - 1) + 1.85, (d - 1 - i) * 3.2, f"node {i}\n(NVLink\ninside)", ha="left", va="center",
                fontsize=8, color="gray")
        seq = results[i * t][1]["sequences"]
        ax.text(-1.9, (d - 1 - i) * 3.2, f"DP replica {i}\nsequences {seq[0]}–{seq[1]}", ha="right", va="center",
                fontsize=9)
    for rank, (x, y) in pos.items():
        j = results[rank][1]["tp group"].index(rank)
        ax.add_patch(FancyBboxPatch((x - 1.3, y - 0.7), 2.6, 1.4, boxstyle="round,pad=0.05",
                                    facecolor=RANK_COLORS[rank], alpha=0.85, edgecolor="black"))
        ax.text(x, y, f"rank {rank}\nshard {j} of every matrix\nheads {2 * j}, {2 * j + 1}", ha="center", va="center",
                fontsize=8, color="white", fontweight="bold")
    for rank, (_, info) in enumerate(results):
        for other in info["tp group"]:
            if other > rank:
                (x0, y0), (x1, y1) = pos[rank], pos[other]
                ax.add_patch(FancyArrowPatch((x0 + 1.35, y0), (x1 - 1.35, y1), arrowstyle="<|-|>", mutation_scale=12,
                                             color=RANK_COLORS[0], linewidth=2.5))
                ax.text((x0 + x1) / 2, y0 + 0.15, "TP: activations\n4 × per block,\nevery micro-batch",
                        ha="center", va="bottom", fontsize=7.5, color=RANK_COLORS[0])
        for other in info["dp group"]:
            if other > rank:
                (x0, y0), (x1, y1) = pos[rank], pos[other]
                ax.add_patch(FancyArrowPatch((x0, y0 - 0.75), (x1, y1 + 0.75), arrowstyle="<|-|>", mutation_scale=12,
                                             color=RANK_COLORS[1], linewidth=2.5))
                ax.text(x0 + 0.15, (y0 + y1) / 2, "DP: gradients of\nthis shard, once\nper step", ha="left",
                        va="center", fontsize=7.5, color=RANK_COLORS[1])
    ax.set_xlim(-4.9, 4.8 * (t - 1) + 3.1)
    ax.set_ylim(-1.4, 3.2 * (d - 1) + 1.6)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax


def c_attn_rows_figure(rows: Mapping[int, Sequence[Sequence[int]]], C: int, n_head: int) -> Figure:
    """Which rows of attention's input projection ``c_attn`` (q | k | v stacked: 3C rows) each rank holds:
    one strip per tensor-parallel size t, each row coloured by its rank, heads marked (qj: head j's rows of
    q). ``rows[t][rank]`` is the list of row indices rank ``rank`` holds when the model is split over t ranks
    (``ParallelSelfAttention.c_attn.shard(torch.arange(3 * C))``); every row must be on exactly one rank."""
    sizes = list(rows)
    fig, axes = plt.subplots(len(sizes), 1, figsize=(12, 1.3 * len(sizes)), squeeze=False)
    axes = axes[:, 0]
    d = C // n_head
    for ax, tp in zip(axes, sizes):
        owner = np.full(3 * C, -1)
        for rank, held in enumerate(rows[tp]):
            owner[list(held)] = rank
        assert (owner >= 0).all(), f"t = {tp}: rows held by no rank"
        for row, r in enumerate(owner):
            ax.add_patch(Rectangle((row, 0), 1, 1, facecolor=RANK_COLORS[r], edgecolor="white", linewidth=0.3))
        for part, name in enumerate("qkv"):
            ax.axvline(part * C, color="black", linewidth=2)
            for head in range(n_head):
                ax.text(part * C + head * d + d / 2, 0.5, f"{name}{head}", ha="center", va="center", fontsize=8,
                        color="white", fontweight="bold")
            for head in range(1, n_head):
                ax.axvline(part * C + head * d, color="black", linewidth=0.8)
        ax.axvline(3 * C, color="black", linewidth=2)
        ax.set_xlim(0, 3 * C)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_ylabel(f"t = {tp}", rotation=0, ha="right", va="center")
        ax.grid(False)
        ax.set_xticks([0, C, 2 * C, 3 * C])
        ax.set_xticklabels(["0", "C", "2C", "3C"] if ax is axes[-1] else [])
    axes[0].set_title(f"Rows of c_attn (q | k | v stacked, 3C = {3 * C} rows; qj = head j's rows of q), coloured by "
                      "the rank that holds them", fontsize=10)
    axes[-1].legend(handles=[Patch(facecolor=RANK_COLORS[r], label=f"rank {r}") for r in range(max(sizes))],
                    ncol=max(sizes), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.45), frameon=False)
    fig.tight_layout()
    return fig


def draw_tp_dp_traffic(ax, tokens: np.ndarray, tp_bytes: np.ndarray, dp_bytes: float, crossover: float, *,
                       measured: tuple[float, float] | None = None, title: str = ""):
    """Bytes one rank sends per transformer block and step (MiB, log-log) against the tokens of a micro-batch
    and replica: tensor parallelism (``tp_bytes``, one value per entry of ``tokens``: four all-reduces of
    the activations, growing with the tokens) against data parallelism (``dp_bytes``: one all-reduce of the
    block's gradients, flat), the token count where they cross dotted, and optionally a ``measured``
    (tokens, bytes) point."""
    mib = 2 ** 20
    ax.plot(tokens, np.asarray(tp_bytes) / mib, color=RANK_COLORS[0], lw=2,
            label="tensor parallel: 4 all-reduces of activations, every micro-batch")
    ax.axhline(dp_bytes / mib, color=RANK_COLORS[1], lw=2, label="data parallel: 1 all-reduce of the gradients, once per step")
    ax.axvline(crossover, color="gray", ls=":", lw=1)
    ax.text(crossover * 1.1, tp_bytes[0] / mib, f"B·T = (12C² + 13C)/4C\n≈ 3C = {crossover:,.0f} tokens", fontsize=8,
            color="gray")
    if measured is not None:
        ax.plot([measured[0]], [measured[1] / mib], "o", color="black", ms=7,
                label=f"measured: the log of one block (B·T = {measured[0]:g})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per micro-batch and replica, B·T")
    ax.set_ylabel("MiB sent per rank, per block and step")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return ax
