"""The figures of lesson 2's cost of an all-reduce: bytes counted, times measured, and the α–β model of
:mod:`labkit.cost_model`.

    bytes_per_rank_figure(traffic, nbytes)       bytes sent by the busiest rank and by all ranks, against N:
                                                 measured points over the formulas
    alpha_beta_fit_figure(timings, fits)         time per all-reduce against message size, one panel per N:
                                                 measured points, the fitted α–β model as lines
    crossover_figure(alpha, beta, crossovers)    the model's times at cluster scale, one panel per N, with the
                                                 ring = tree crossover M*

Algorithms are named as in :mod:`labkit.cost_model` ("ring", "tree", "naive"); "torch" is gloo's own
``dist.all_reduce``, drawn in black.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from labkit import cost_model
from labkit.figures import RANK_COLORS

__all__ = ["ALGORITHM_COLORS", "ALGORITHM_LABELS", "bytes_per_rank_figure", "alpha_beta_fit_figure",
           "crossover_figure"]

ALGORITHM_COLORS = {"ring": RANK_COLORS[0], "tree": RANK_COLORS[2], "naive": RANK_COLORS[3], "torch": "black"}
ALGORITHM_LABELS = {"ring": "ring (labkit)", "tree": "tree (labkit)", "naive": "central server (labkit)",
                    "torch": "dist.all_reduce (gloo)"}
_MARKERS = {"ring": "o", "tree": "s", "naive": "D", "torch": "x"}

# bytes sent by the busiest rank of one all-reduce of M bytes, in units of M (the formulas of Section 7)
_BUSIEST = {"ring": ("ring, every rank", lambda n: 2 * (n - 1) / n),
            "tree": ("tree, busiest rank (0)", lambda n: np.ceil(np.log2(n))),
            "naive": ("central server, root", lambda n: n - 1)}


def _size_label(nbytes: float) -> str:
    for unit, name in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if nbytes >= unit:
            return f"{nbytes / unit:g} {name}"
    return f"{nbytes:g} B"


def bytes_per_rank_figure(traffic: Mapping[str, Mapping[int, Sequence[tuple[int, int]]]], nbytes: int, *,
                          max_ranks: int = 16):
    """Where the bytes of one all-reduce of ``nbytes`` go, measured against the formulas.

    ``traffic[algorithm][N]``: per rank, (bytes sent, bytes received) in one all-reduce on N ranks
    (algorithm "ring", "tree" or "naive"). Left: the bytes sent by the busiest rank, in units of M, as
    points, over the formulas (lines up to ``max_ranks``): the ring's 2(N−1)/N stays below 2, the tree's
    root sends ⌈log₂N⌉ whole tensors, the server's root N−1. Right: the bytes sent by all ranks
    together, the same 2(N−1)·M for all three (points side by side)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    ns = np.arange(2, max_ranks + 1)
    algorithms = [a for a in _BUSIEST if a in traffic]
    ax = axes[0]
    for a in algorithms:
        label, formula = _BUSIEST[a]
        color, sizes = ALGORITHM_COLORS[a], sorted(traffic[a])
        ax.plot(ns, formula(ns), "-", color=color, alpha=0.6, label=f"{label}: formula")
        ax.plot(sizes, [max(s for s, _ in traffic[a][n]) / nbytes for n in sizes], _MARKERS[a], color=color,
                markersize=8, label=f"{label}: measured")
    ax.axhline(2, color="black", linestyle=":", linewidth=1)
    ax.text(max_ranks, 2.25, "2M: the ring's limit", ha="right", fontsize=8)
    ax.set_xlabel("ranks N")
    ax.set_ylabel("bytes sent by the busiest rank (units of M)")
    ax.set_title("Per-rank load: the ring's stays below 2M, the root's grows with N")
    ax.legend(fontsize=8)
    ax = axes[1]
    offsets = 0.2 * (np.arange(len(algorithms)) - (len(algorithms) - 1) / 2)          # side by side
    for a, offset in zip(algorithms, offsets):
        sizes = sorted(traffic[a])
        ax.plot(np.array(sizes) + offset, [sum(s for s, _ in traffic[a][n]) / nbytes for n in sizes], _MARKERS[a],
                color=ALGORITHM_COLORS[a], markersize=7, label=_BUSIEST[a][0].split(",")[0] + ": measured")
    ax.plot(ns, 2 * (ns - 1), "k-", alpha=0.4, label="2(N−1)·M")
    ax.set_xlabel("ranks N")
    ax.set_ylabel("bytes sent by all ranks together (units of M)")
    ax.set_title("Total traffic: the same for all three")
    ax.legend(fontsize=8)
    fig.suptitle(f"One all-reduce of M = {nbytes // 1000} kB (float32), bytes counted by comm.traffic on real processes")
    fig.tight_layout()
    return fig


def alpha_beta_fit_figure(timings: Mapping[int, Mapping[tuple[str, int], float]],
                          fits: Mapping[str, tuple[float, float]], *, models: Mapping[str, str] | None = None,
                          labels: Mapping[str, str] | None = None):
    """Time per all-reduce against message size, one panel per number of ranks (log-log, shared y).

    ``timings[N][(name, nbytes)]``: measured seconds of algorithm ``name`` on N ranks; ``fits[name]``:
    its fitted (α, β). Points are the measurements, lines :func:`labkit.cost_model.predict` with the
    fitted α and β and the terms of ``models[name]`` (default: the algorithm itself; gloo's "torch" is
    fitted with the ring's terms). The flat left part is latency-bound, the linear right part
    bandwidth-bound."""
    models = {"torch": "ring", **(models or {})}
    labels = {**ALGORITHM_LABELS, **(labels or {})}
    world_sizes = list(timings)
    fig, axes = plt.subplots(1, len(world_sizes), figsize=(6 * len(world_sizes), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, n in zip(axes, world_sizes):
        sizes = sorted({s for _, s in timings[n]})
        fine = np.logspace(np.log10(sizes[0]), np.log10(sizes[-1]), 100)
        for name, (alpha, beta) in fits.items():
            color = ALGORITHM_COLORS.get(name, "gray")
            ax.plot(sizes, [timings[n][name, s] * 1e3 for s in sizes], _MARKERS.get(name, "o"), color=color,
                    markersize=7, label=labels.get(name, name))
            ax.plot(fine, [cost_model.predict(models.get(name, name), n, s, alpha, beta) * 1e3 for s in fine], "-",
                    color=color, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([_size_label(s) for s in sizes])
        ax.set_xlabel("message size M")
        ax.set_title(f"N = {n} processes on this machine")
    axes[0].set_ylabel("time per all-reduce (ms)")
    axes[-1].plot([], [], "-", color="gray", alpha=0.5, label="α–β model, fitted (one line each)")
    fig.suptitle("All-reduce time against message size: points measured, lines the fitted α–β model")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.legend(*axes[-1].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=9, frameon=False)
    return fig


def crossover_figure(alpha: float, beta: float, crossovers: Mapping[int, float], *,
                     sizes: Sequence[float] | None = None):
    """The α–β model's time per all-reduce against message size for the ring, the binomial tree and the
    central server, one panel per N of ``crossovers`` (``crossovers[N]``: the ring = tree message size
    M* in bytes, drawn as a dashed line). Left of M* the tree wins (latency-bound), right of it the
    ring (bandwidth-bound). ``sizes``: the message sizes in bytes (default 100 B to 10 GB)."""
    sizes = np.logspace(2, 10, 200) if sizes is None else np.asarray(sizes, dtype=float)
    fig, axes = plt.subplots(1, len(crossovers), figsize=(6 * len(crossovers), 4.3), sharey=True, squeeze=False)
    axes = axes[0]
    names = {"ring": "ring", "tree": "binomial tree", "naive": "central server"}
    for ax, (n, m_star) in zip(axes, crossovers.items()):
        for name, label in names.items():
            ax.plot(sizes, [cost_model.predict(name, n, s, alpha, beta) for s in sizes], color=ALGORITHM_COLORS[name],
                    label=label)
        ax.axvline(m_star, color="gray", linestyle="--", linewidth=1)
        ax.text(m_star * 1.4, 0.95, f"ring = tree at\nM* ≈ {m_star / 1e3:.0f} kB", fontsize=9, va="top",
                transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("message size M (bytes)")
        ax.set_title(f"N = {n}: α = {alpha * 1e6:g} µs, 1/β = {1 / beta / 1e9:g} GB/s (model)")
    axes[0].set_ylabel("predicted time per all-reduce (s)")
    axes[0].legend()
    fig.suptitle("The α–β model: latency-bound on the left (tree wins), bandwidth-bound on the right (ring wins)")
    fig.tight_layout()
    return fig
