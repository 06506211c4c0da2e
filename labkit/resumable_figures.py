"""The figures of lesson 10 (failures): the timeline of a job that lost a rank and was restarted.

    restart_timeline_figure(events)     one row per rank: each attempt's life, its checkpoints, the kill, the end
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt

__all__ = ["restart_timeline_figure"]

_ATTEMPT_COLORS = ["#4C72B0", "#55A868", "#8172B3", "#CCB974"]


def restart_timeline_figure(events: Sequence[dict], title: str = ""):
    """``events``: labkit.labs.elastic.read_events (kind, rank, attempt, step, time)."""
    t0 = min(e["time"] for e in events)
    ranks = sorted({e["rank"] for e in events})
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.9 * len(ranks)))
    for rank in ranks:
        mine = [e for e in events if e["rank"] == rank]
        for attempt in sorted({e["attempt"] for e in mine}):
            life = [e for e in mine if e["attempt"] == attempt]
            start, end = life[0]["time"] - t0, life[-1]["time"] - t0
            color = _ATTEMPT_COLORS[attempt % len(_ATTEMPT_COLORS)]
            ax.barh(rank, end - start, left=start, height=0.36, color=color, alpha=0.35, edgecolor=color,
                    label=f"attempt {attempt}" if rank == ranks[0] else None)
            ax.text(start, rank - 0.24, f"starts from step {life[0]['step']}", fontsize=7, va="bottom")
            for e in life:
                x = e["time"] - t0
                if e["kind"] == "checkpoint":
                    ax.plot(x, rank, "|", color="black", markersize=11)
                    ax.text(x, rank + 0.24, str(e["step"]), fontsize=7, ha="center", va="top")
                elif e["kind"] == "killed":
                    ax.plot(x, rank, "X", color="#C44E52", markersize=11)
                    ax.text(x + 0.05, rank + 0.24, f"SIGKILL after step {e['step']}", fontsize=7, color="#C44E52",
                            va="top")
                elif e["kind"] == "done":
                    ax.plot(x, rank, "o", color="black", markersize=5)
    kills = [e["time"] - t0 for e in events if e["kind"] == "killed"]
    restarts = [e["time"] - t0 for e in events if e["kind"] == "start" and e["attempt"] > 0]
    if kills and restarts:
        middle = (min(kills) + min(restarts)) / 2
        ax.text(middle, (ranks[0] + ranks[-1]) / 2, "torchrun stops the\nothers and restarts\nevery rank",
                fontsize=7, ha="center", va="center", color="#555555")
    ax.plot([], [], "|", color="black", markersize=10, label="checkpoint (its step)")
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_ylim(max(ranks) + 0.7, min(ranks) - 0.7)
    ax.set_xlabel("seconds since the first rank started")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title or "a rank killed, the job restarted, every rank resumed from the last checkpoint", fontsize=9)
    fig.tight_layout()
    return fig
