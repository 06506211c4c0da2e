"""The ecosystem map of lesson 10: which tool implements which lesson's idea."""

from __future__ import annotations

import matplotlib.pyplot as plt

from labkit.ecosystem import LESSONS, TOOLS

__all__ = ["ecosystem_figure"]


def ecosystem_figure(tools=TOOLS):
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(tools) + 1.6))
    for row, tool in enumerate(tools):
        ax.scatter(tool.lessons, [row] * len(tool.lessons), s=90, color="#4C72B0", zorder=3)
    ax.set_yticks(range(len(tools)), [t.name for t in tools], fontsize=8)
    ax.set_xticks(list(LESSONS), [f"{k}. {v}" for k, v in LESSONS.items()], rotation=35, ha="right", fontsize=8)
    ax.set_ylim(len(tools) - 0.5, -0.5)
    ax.set_xlim(0.5, len(LESSONS) + 0.5)
    ax.grid(alpha=0.3)
    ax.set_title("the tools, placed on the lessons that build their ideas from scratch", fontsize=9)
    fig.tight_layout()
    return fig
