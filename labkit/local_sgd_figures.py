"""The figures of lesson 1's parameter against gradient averaging (:mod:`labkit.local_sgd`).

    draw_gap_vs_local_steps(ax, ks, gaps)    the gap after one round of k local steps, one line per optimizer
    draw_gap_curves(ax, steps, curves)       the gap round after round, one line per run

The gap is max |θ_param-avg − θ_grad-avg| (:func:`labkit.local_sgd.averaging_gap`), drawn on a log scale
with exact zeros at ``floor`` and the rounding level 1e-12 dashed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["draw_gap_vs_local_steps", "draw_gap_curves"]

GAP_LABEL = "max |θ_param-avg − θ_grad-avg|"


def _rounding_line(ax):
    ax.axhline(1e-12, color="black", linestyle="--", linewidth=1)


def draw_gap_vs_local_steps(ax, ks: Sequence[int], gaps: Mapping[str, Sequence[float]], *, floor: float = 1e-18,
                            title: str = ""):
    """The gap after one round of k local steps, against k (log-log), one line per optimizer
    (``gaps[name][i]`` is the gap at ``ks[i]``), over the rounding level 1e-12 (dashed, labelled)."""
    for (name, gap), marker in zip(gaps.items(), "osD^v"):
        ax.plot(ks, np.maximum(np.asarray(gap, dtype=float), floor), marker + "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("local steps k per round")
    ax.set_ylabel(GAP_LABEL)
    _rounding_line(ax)
    ax.text(ks[0], 2e-12, "rounding level", fontsize=8)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def draw_gap_curves(ax, steps: Sequence[float], curves: Mapping[str, Sequence[float]], *,
                    styles: Sequence[str] = ("o-", "s-", "D-", "^-", "v-"), floor: float = 1e-18,
                    ylim: tuple[float, float] | None = None, xlabel: str = "round", title: str = "",
                    legend: dict | None = None):
    """The gap at the end of each round (``curves[label][i]`` at ``steps[i]``), one line per run in the
    given ``styles``, log-scale, over the rounding level 1e-12 (dashed). ``legend`` is passed to
    ``ax.legend``."""
    for (label, gap), style in zip(curves.items(), styles):
        ax.plot(steps, np.maximum(np.asarray(gap, dtype=float), floor), style, label=label)
    ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    _rounding_line(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(GAP_LABEL)
    if title:
        ax.set_title(title)
    ax.legend(**(legend or {}))
    return ax
