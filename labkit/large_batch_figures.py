"""The figures of lesson 4's batch-size sweep (:mod:`labkit.large_batch`) and of LAMB's trust ratios.

    draw_batch_sweep(axes, results)     final loss, steps and samples to the target, against the batch
    batch_sweep_key(results)            legend handles for it
    batch_sweep_figure(results)         the three panels and the key, as one figure
    draw_trust_ratios(ax, steps, ratios)  LAMB's per-layer ‖θ‖/‖u‖ over training

``results`` is what :func:`labkit.large_batch.train` returns (the lab's JSON has the same format).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

__all__ = ["METHOD_COLORS", "METHOD_LABELS", "draw_batch_sweep", "batch_sweep_key", "batch_sweep_figure",
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
