"""The figures of lesson 4: the batch-size sweep (:mod:`labkit.large_batch`), the noise scale, warm-up, LAMB's
trust ratios and AdaScale's gain (:mod:`labkit.optim`).

    draw_batch_sweep(axes, results)     final loss, steps and samples to the target, against the batch
    batch_sweep_key(results)            legend handles for it
    batch_sweep_figure(results)         the three panels and the key, as one figure
    noise_scale_figure(noise, batches)  the measured noise scale during training, and McCandlish et al.'s
                                        steps/samples trade-off with it
    warmup_figure(runs, base_lr, k)     learning rate and loss of runs with and without warm-up
    source_formula_figure(...)          one step of the source article's LAMB formula, read two ways, against LAMB's
    draw_trust_ratios(ax, steps, ratios)  LAMB's per-layer ‖θ‖/‖u‖ over training
    draw_weight_norms(ax, steps, norms)   the layers' ‖θ‖ over training (and ‖u‖ = ‖θ‖/ρ)
    trust_ratio_figure(steps, ratios, norms)  the two side by side, one key
    adascale_gain_figure(gains, ...)    AdaScale's gain against the scale S and during a live run, and τ
    adascale_sweep_gain_figure(results) AdaScale's gain in the sweep's runs, against progress and against k

``results`` is what :func:`labkit.large_batch_sweep.train` returns (the lab's JSON has the same format).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from labkit.figures import RANK_COLORS

__all__ = ["METHOD_COLORS", "METHOD_LABELS", "draw_batch_sweep", "batch_sweep_key", "batch_sweep_figure",
           "noise_scale_figure", "warmup_figure", "source_formula_figure", "draw_trust_ratios", "draw_weight_norms",
           "trust_ratio_figure", "adascale_gain_figure", "adascale_sweep_gain_figure"]

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


def noise_scale_figure(noise: Mapping[int, Mapping[str, float]], batches: Sequence[int], *, base_batch: int,
                       block_size: int):
    """The gradient noise scale (McCandlish et al. 2018) and what it predicts.

    ``noise[step]``: "B_simple" = tr Σ / ‖G‖² in blocks and the validation "loss", measured at that
    step of a run at batch ``base_batch``. Left: B_simple against the step (log scale), each point
    labelled with its loss, the ``batches`` as dotted lines. Right: with B_noise the last measured value,
    the trade-off S/S_min = 1 + B_noise/B (steps) and E/E_min = 1 + B/B_noise (samples) against the batch
    B, the ``batches`` marked on both, the critical batch B ≈ B_noise dashed."""
    steps = list(noise)
    b_noise = noise[steps[-1]]["B_simple"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    ax.plot(steps, [noise[s]["B_simple"] for s in steps], "o-", color=RANK_COLORS[0], lw=2,
            label=r"$B_\mathrm{simple} = \mathrm{tr}\,\Sigma / \|G\|^2$ (measured)")
    for s in steps:
        ax.annotate(f"val loss {noise[s]['loss']:.2f}", (s, noise[s]["B_simple"]), textcoords="offset points",
                    xytext=(8, -4), va="top", fontsize=8, color=RANK_COLORS[3])
    for b in batches:
        ax.axhline(b, color="gray", lw=0.8, ls=":")
        ax.text(steps[-1] * 1.03, b, f"{b}", va="center", fontsize=8, color="gray")
    ax.set_xlim(-20, steps[-1] * 1.08)
    low = min(min(noise[s]["B_simple"] for s in steps), min(batches))
    high = max(max(noise[s]["B_simple"] for s in steps), max(batches))
    ax.set_ylim(min(0.3, low / 2), max(100, high * 1.5))
    ax.set_yscale("log")
    ax.set_xlabel(f"AdamW step at batch B = {base_batch} blocks")
    ax.set_ylabel(f"blocks of {block_size} characters")
    ax.set_title(f"The noise scale grows during training\n(dotted: the batch sizes of the sweep, "
                 f"{min(batches)} … {max(batches)} blocks)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax = axes[1]
    grid = np.geomspace(1, 2 * max(batches), 200)
    ax.plot(grid, 1 + b_noise / grid, color=RANK_COLORS[0], lw=2, label=r"steps $S/S_\mathrm{min} = 1 + B_\mathrm{noise}/B$")
    ax.plot(grid, 1 + grid / b_noise, color=RANK_COLORS[1], lw=2, label=r"samples $E/E_\mathrm{min} = 1 + B/B_\mathrm{noise}$")
    ax.axvline(b_noise, color="black", ls="--", lw=1, label=f"critical batch ≈ B_noise ≈ {b_noise:.0f} blocks")
    for b in batches:
        ax.plot([b, b], [1 + b_noise / b, 1 + b / b_noise], "o", color="gray", ms=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch B (blocks)")
    ax.set_ylabel("× the minimum")
    ax.set_title("McCandlish et al.'s trade-off, with the measured noise scale", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def warmup_figure(runs: Mapping[str, tuple[Sequence[float], Sequence[float]]], base_lr: float, k: int, *,
                  base_batch: int, vocab_size: int | None = None, steps: int | None = None):
    """Runs at k times the base batch with and without warm-up: ``runs[name] = (losses, lrs)``, one value
    per step done (a run that diverged stops early). Left: the learning rate per step, the base rate
    ``base_lr`` (tuned at ``base_batch``) dotted. Right: the training loss (log scale) with the loss of
    a uniform guess ln(``vocab_size``); a run shorter than ``steps`` (default: the longest) is labelled
    with where it stopped. The first run is drawn in red, the second in blue."""
    steps = max(len(losses) for losses, _ in runs.values()) if steps is None else steps
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for (name, (losses, lrs)), color in zip(runs.items(), (RANK_COLORS[3], RANK_COLORS[0], RANK_COLORS[2])):
        axes[0].plot(range(len(lrs)), lrs, color=color, lw=2, label=name)
        stopped = "" if len(losses) >= steps else f" (stopped at step {len(losses)}: loss {losses[-1]:.3g})"
        axes[1].plot(range(1, len(losses) + 1), losses, "o-" if len(losses) < 20 else "-", color=color, lw=2, ms=4,
                     label=name + stopped)
    axes[0].axhline(base_lr, color="gray", ls=":", label=f"η = {base_lr:g}, tuned at B = {base_batch}")
    axes[0].set(xlabel="step", ylabel="learning rate", title=f"SGD at k = {k}: lr = {k}η = {k * base_lr:g}")
    axes[1].set(xlabel="step", ylabel="training loss (batch)", yscale="log", title=f"The same {steps} steps")
    axes[1].set_yticks([3, 4, 6, 10, 20], ["3", "4", "6", "10", "20"])
    axes[1].minorticks_off()
    if vocab_size:
        axes[1].axhline(math.log(vocab_size), color="gray", ls=":", label=f"ln {vocab_size}: a uniform guess")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def source_formula_figure(lams: Sequence[float], layerwise: Mapping[str, Sequence[float]], bs: Sequence[float],
                          constant: Mapping[str, Sequence[float]], r_norms: Mapping[str, float], eta: float,
                          lam: float):
    """The source article's LAMB formula, θ ← θ − η(λθ + r)/(‖r‖/b + λ), read two ways, one line per weight
    matrix (viridis, first matrix to last) against LAMB's relative step η (the thick green line).
    Left: b = ‖θ‖ (the layer-wise factor), ``layerwise[name][i]`` the relative step ‖Δθ‖/‖θ‖ at weight decay
    ``lams[i]``. Right: b a constant, ``constant[name][i]`` the relative step at b = ``bs[i]`` (weight decay
    ``lam``); the dotted line at 1 is a step as long as the weights themselves."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    cmap = plt.get_cmap("viridis")
    for ax, xs, steps in ((axes[0], lams, layerwise), (axes[1], bs, constant)):
        for i, (name, values) in enumerate(steps.items()):
            ax.plot(xs, values, color=cmap(i / max(1, len(steps) - 1)), lw=1.5,
                    label=f"{name.replace('.weight', '')} (‖r‖ = {r_norms[name]:.0f})")
        ax.axhline(eta, color=METHOD_COLORS["lamb"], lw=3, ls="--" if ax is axes[0] else "-",
                   label=f"LAMB, every matrix: η = {eta}")
        ax.set(xscale="log", ylabel="relative step ‖Δθ‖/‖θ‖")
    axes[0].set(xlabel="weight decay λ", title="b = ‖θ‖: LAMB with ‖r‖ + λ‖θ‖ in place of ‖r + λθ‖")
    axes[0].set_ylim(0.75 * eta, 1.05 * eta)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].axhline(1.0, color="black", ls=":", lw=1)
    axes[1].text(bs[0] * 1.3, 1.15, "a step as long as the weights themselves", fontsize=8)
    axes[1].set(yscale="log", xlabel="b, a constant (a batch size, say)",
                title=f"b a constant (λ = {lam:g}): the trust ratio is gone")
    for ax in axes:
        ax.title.set_fontsize(10)
    fig.tight_layout()
    return fig


def _layer_colors(n: int) -> list:
    """The colours of n layers' lines: matplotlib's default cycle (tab10) up to 10, viridis beyond."""
    if n > 10:
        cmap = plt.get_cmap("viridis")
        return [cmap(i / (n - 1)) for i in range(n)]
    return [plt.get_cmap("tab10")(i) for i in range(n)]


def draw_trust_ratios(ax, steps, ratios, *, names=None, log: bool = True, title: str = "", legend: bool = True):
    """LAMB's per-layer trust ratios ‖θ‖/‖u‖ over training: ``ratios[name]`` is one layer's list, one
    value per entry of ``steps``. ``names``: the layers to draw (default all), one line each, in the
    colours of matplotlib's default cycle for up to 10 layers."""
    names = list(ratios) if names is None else list(names)
    for name, color in zip(names, _layer_colors(len(names))):
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


def draw_weight_norms(ax, steps, norms: Mapping[str, Sequence[float]], *, ratios: Mapping[str, Sequence[float]] | None = None,
                      title: str = "", legend: bool = True):
    """The norms ‖θ‖ of the layers over training: ``norms[name]`` one value per entry of ``steps``, one line
    each in the colours of :func:`draw_trust_ratios`. Given the trust ratios ρ (``ratios[name]``), also the
    norm of LAMB's update direction ‖u‖ = ‖θ‖/ρ, dashed, on a log scale."""
    for name, color in zip(norms, _layer_colors(len(norms))):
        theta = np.asarray(norms[name], dtype=float)
        ax.plot(steps, theta, color=color, lw=2 if ratios is not None else 1.5,
                label=f"‖θ‖ {name}" if ratios is not None else name)
        if ratios is not None:
            ax.plot(steps, theta / np.asarray(ratios[name], dtype=float), color=color, lw=1, ls="--", label=f"‖u‖ {name}")
    if ratios is not None:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("‖θ‖ (solid), ‖u‖ (dashed)" if ratios is not None else "‖θ‖")
    if title:
        ax.set_title(title, fontsize=10)
    if legend and len(norms) <= 12:
        ax.legend(fontsize=7, loc="best")
    return ax


def trust_ratio_figure(steps, ratios: Mapping[str, Sequence[float]], norms: Mapping[str, Sequence[float]]):
    """LAMB during training, one line per layer: its trust ratios (:func:`draw_trust_ratios`) beside the
    norms of its weights (:func:`draw_weight_norms`), one key on the right."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2), layout="constrained")
    draw_trust_ratios(axes[0], steps, ratios, legend=False, title="LAMB's trust ratio ‖θ‖/‖u‖ of every weight matrix")
    draw_weight_norms(axes[1], steps, norms, legend=False,
                      title="… and the norms of the weights (each step moves a matrix by η‖θ‖)")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    return fig


def adascale_gain_figure(gains: Mapping[int, Sequence[float]], b_simple: float, base_batch: int,
                         live: Mapping[str, Sequence[float]], scale: int, *, world_size: int = 4):
    """AdaScale's gain ratio r, three panels.

    Left: at fixed weights, the gains measured at each scale S (``gains[S]``: one per step; mean ± std)
    against the prediction from the noise scale, r(S) = (1 + B_simple/B) / (1 + B_simple/(S·B)) with
    B = ``base_batch``, between r = S (all noise) and its limit 1 + B_simple/B. Middle: the gain during a
    live run at scale ``scale`` (``live["gain"]``, one per step). Right: that run's progress τ in base
    steps (``live["tau"]``) between τ = steps (gain 1) and τ = S·steps (gain S)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    scales = sorted(gains)
    s_grid = np.arange(1, max(scales) + 1)
    ax.plot(s_grid, s_grid, "k--", lw=1, label="r = S (all noise: perfect scaling)")
    ax.plot(s_grid, (1 + b_simple / base_batch) / (1 + b_simple / (s_grid * base_batch)), color=RANK_COLORS[0], lw=2,
            label=f"r(S) from B_simple = {b_simple:.0f} blocks (Section 2)")
    ax.errorbar(scales, [np.mean(gains[s]) for s in scales], yerr=[np.std(gains[s]) for s in scales], fmt="o",
                color=RANK_COLORS[3], ms=7, capsize=3, label=f"AdaScale on {world_size} processes (mean ± std)")
    ax.axhline(1 + b_simple / base_batch, color="gray", ls=":", label="limit for S → ∞: 1 + B_simple/B")
    ax.set(xlabel=f"scale S (global batch = S × {base_batch} blocks)", ylabel="gain r",
           title="Gain against batch size, fixed weights")
    ax.legend(fontsize=8)
    ax = axes[1]
    steps = np.arange(1, len(live["gain"]) + 1)
    ax.plot(steps, live["gain"], color=RANK_COLORS[3], lw=2, label=f"gain r (S = {scale})")
    ax.axhline(scale, color="black", ls="--", lw=1, label=f"S = {scale}")
    ax.set(xlabel="step", ylabel="gain r", title="Gain during training: it starts at 1 and grows", ylim=(0, scale + 1))
    ax.legend(fontsize=8, loc="center right")
    ax = axes[2]
    ax.plot(steps, live["tau"], color=RANK_COLORS[3], lw=2, label="τ: scale-invariant iterations")
    ax.plot(steps, steps, "k:", label="τ = steps (gain 1)")
    ax.plot(steps, scale * steps, "k--", lw=1, label=f"τ = {scale}·steps (gain S)")
    ax.set(xlabel="step", ylabel="τ (base-batch steps' worth)", yscale="log", title="Progress counted in base steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def adascale_sweep_gain_figure(results):
    """AdaScale's gain in the sweep's runs at k > 1 (``results`` as :func:`labkit.large_batch_sweep.train` returns).
    Left: each run's smoothed gain against its progress τ/T (T: the base run's steps), one red line per k,
    darker for larger k. Right: the mean gain over each run and the epochs it read, against k, with
    r = k (perfect scaling) dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    ada = sorted((r for r in results["runs"] if r["method"] == "adascale" and r["k"] > 1), key=lambda r: r["k"])
    base_batch = results["options"]["base_batch"]
    total = results["budget_samples"] / base_batch
    cmap = plt.get_cmap("Reds")
    for i, r in enumerate(ada):
        color = cmap(0.35 + 0.65 * i / max(1, len(ada) - 1))
        tau = dict(r["tau"])
        axes[0].plot([tau[s] / total for s, _ in r["gain"] if s in tau], [g for s, g in r["gain"] if s in tau],
                     color=color, lw=2,
                     label=f"k = {r['k']}" + (" (stopped: sample cap)" if r.get("stopped_at_sample_cap") else ""))
    axes[0].set(xlabel="progress τ / T", ylabel="gain r (smoothed)", title="AdaScale's gain during the sweep's runs")
    axes[0].legend(fontsize=8)
    ks = [r["k"] for r in ada]
    axes[1].plot(ks, ks, "k--", lw=1, label="r = k (perfect scaling)")
    axes[1].plot(ks, [r["mean_gain"] for r in ada], "o-", color=METHOD_COLORS["adascale"], lw=2,
                 label="mean gain over the run")
    axes[1].plot(ks, [r["epochs_read"] for r in ada], "s:", color="gray", label="epochs read (budget: 1)")
    axes[1].set(xscale="log", yscale="log", xlabel=f"k (batch = k × {base_batch} blocks)",
                title="Gain and samples against k")
    axes[1].set_xticks(ks, [str(k) for k in ks])
    ticks = [2 ** i for i in range(0, int(math.log2(max(ks))) + 1)]
    axes[1].set_yticks(ticks, [str(t) for t in ticks])
    axes[1].minorticks_off()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig
