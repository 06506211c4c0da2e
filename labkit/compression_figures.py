"""The figures of lesson 9 (the communication bottleneck).

    curves_figure(runs)                 loss against steps, bytes sent and wall-clock, one line per method
    allreduce_time_figure(...)          flat and hierarchical all-reduce on the emulated two-level network:
                                        measured points over the α–β lines
    threshold_figure(...)               step time against tokens per rank, without and with the emulated network,
                                        the model's line and the threshold
    step_time_figure(...), explorer()   labkit.bottleneck's step (compute + exposed messages) for each scheme, and
                                        its widget
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt

from labkit.bottleneck import SCHEMES, step_time
from labkit.network import Link
from labkit.widgets import sized_figure

__all__ = ["curves_figure", "allreduce_time_figure", "threshold_figure", "step_time_figure", "explorer"]


_COLORS = {"allreduce": "black", "fp16": "#DD8452", "bf16": "#937860", "topk": "#55A868", "powersgd-r1": "#8172B3",
           "powersgd-r4": "#4C72B0", "localsgd-8": "#C44E52", "diloco-8": "#DA8BC3"}


def _style(method: str) -> dict:
    dashed = method.endswith("-noef")
    return {"color": _COLORS.get(method.removesuffix("-noef")), "linestyle": "--" if dashed else "-",
            "linewidth": 1.2 if dashed else 1.6}


def _field(run, name: str) -> list:
    return run[name] if isinstance(run, Mapping) else getattr(run, name)


def _running_mean(values: Sequence[float], window: int) -> list:
    """The mean of the last ``window`` values at each step (fewer at the start): a training loss of small batches
    is too noisy to compare methods by eye."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def curves_figure(runs: Mapping, *, target: float | None = None, title: str = "", smooth: int = 1):
    """Loss against steps, MiB sent per rank and seconds. ``runs[method]`` is a labkit.compressed_training.Run
    (rank 0's) or a dict with its ``losses``, ``bytes`` and ``seconds``; ``smooth``: the loss's running mean over
    that many steps."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for method, run in runs.items():
        losses = _running_mean(_field(run, "losses"), smooth)
        steps = range(1, len(losses) + 1)
        mib = [b / 2 ** 20 for b in _field(run, "bytes")]
        for ax, x in zip(axes, (steps, mib, _field(run, "seconds"))):
            ax.plot(x, losses, label=method, **_style(method))
    for ax, xlabel in zip(axes, ("step", "MiB sent per rank", "seconds (emulated network)")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(target, color="black", linewidth=0.8, linestyle=":")
    axes[1].set_xscale("log")
    axes[0].set_ylabel("training loss (mean over ranks)" + (f", mean of {smooth} steps" if smooth > 1 else ""))
    axes[2].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def allreduce_time_figure(sizes: Sequence[float], measured: Mapping[str, Sequence[float]],
                          modelled: Mapping[str, Sequence[float]]):
    """All-reduce time against message size: ``measured[name]`` points over ``modelled[name]`` lines (seconds)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for (name, model), color in zip(modelled.items(), ["#C44E52", "#4C72B0", "#55A868", "#8172B3"]):
        ax.plot(sizes, [1e3 * t for t in model], "-", color=color, label=f"{name} (model)")
        ax.plot(sizes, [1e3 * t for t in measured[name]], "o", color=color, markeredgecolor="black",
                label=f"{name} (measured)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes all-reduced")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def threshold_figure(tokens: Sequence[int], without: Sequence[float], with_network: Sequence[float],
                     model: Sequence[float], threshold: float):
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(tokens, [1e3 * t for t in without], "o-", color="#8C8C8C", label="measured, network off (compute)")
    ax.plot(tokens, [1e3 * t for t in with_network], "o-", color="#C44E52", label="measured, emulated network")
    ax.plot(tokens, [1e3 * t for t in model], "--", color="black", label="model: compute + exposed messages")
    ax.axvline(threshold, color="#4C72B0", linestyle=":", label=f"threshold ≈ {threshold:.0f} tokens per rank")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per rank per step")
    ax.set_ylabel("step time (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def step_time_figure(psi_b: float = 1.0, tokens: int = 4096, world_size: int = 64, ranks_per_node: int = 8,
                     inside_gbs: float = 450.0, between_gbs: float = 50.0, tflops: float = 400.0,
                     bf16: bool = True, fraction: float = 0.01, ratio: float = 0.001, figure=None):
    """Compute and exposed messages of one step per scheme (labkit.bottleneck), for a model of ``psi_b`` billion
    parameters; links in GB/s, FLOP/s in TFLOP/s (achieved, not peak). Into ``figure`` if given."""
    inside, between = Link(5e-6, inside_gbs * 1e9), Link(10e-6, between_gbs * 1e9)
    kw = dict(psi=psi_b * 1e9, tokens=tokens, flops=tflops * 1e12, world_size=world_size, inside=inside,
              between=between, ranks_per_node=ranks_per_node, bytes_per_number=2 if bf16 else 4, fraction=fraction,
              ratio=ratio)
    times = {s: step_time(s, **kw) for s in SCHEMES}
    fig = sized_figure((7.2, 3.4), figure)
    ax = fig.subplots()
    names = list(times)
    ax.bar(names, [1e3 * t.compute for t in times.values()], color="#B0B0B0", edgecolor="black", label="compute")
    ax.bar(names, [1e3 * t.exposed for t in times.values()], bottom=[1e3 * t.compute for t in times.values()],
           color="#C44E52", edgecolor="black", label="exposed messages")
    for i, t in enumerate(times.values()):
        ax.text(i, 1e3 * t.total, f"{1e3 * t.total:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per step")
    ax.set_title(f"Ψ = {psi_b:g} B, {tokens} tokens per rank, N = {world_size} ({ranks_per_node} per node), "
                 f"{inside_gbs:g} / {between_gbs:g} GB/s, {tflops:g} TFLOP/s", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def explorer(**defaults):
    """Controls around :func:`step_time_figure` (labkit.widgets.FigureExplorer)."""
    import ipywidgets as widgets
    from labkit.widgets import FigureExplorer

    d = {"psi_b": 1.0, "tokens": 4096, "world_size": 64, "ranks_per_node": 8, "inside_gbs": 450.0,
         "between_gbs": 50.0, "tflops": 400.0} | defaults
    style = {"description_width": "initial"}
    return FigureExplorer(step_time_figure, dict(
        psi_b=widgets.FloatLogSlider(value=d["psi_b"], base=10, min=-1, max=2, description="Ψ (billions)",
                                     style=style, continuous_update=False),
        tokens=widgets.Dropdown(options=[256, 1024, 4096, 16384, 65536], value=d["tokens"],
                                description="tokens per rank", style=style),
        world_size=widgets.Dropdown(options=[8, 16, 64, 256, 1024], value=d["world_size"], description="ranks N", style=style),
        ranks_per_node=widgets.Dropdown(options=[1, 2, 4, 8], value=d["ranks_per_node"], description="per node", style=style),
        inside_gbs=widgets.FloatLogSlider(value=d["inside_gbs"], base=10, min=0, max=3, description="inside GB/s",
                                          style=style, continuous_update=False),
        between_gbs=widgets.FloatLogSlider(value=d["between_gbs"], base=10, min=-1, max=2.5,
                                           description="between GB/s", style=style, continuous_update=False),
        tflops=widgets.FloatLogSlider(value=d["tflops"], base=10, min=1, max=3, description="TFLOP/s achieved",
                                      style=style, continuous_update=False),
        bf16=widgets.Checkbox(value=True, description="bf16 gradients")), fixed=dict(fraction=0.01, ratio=0.001))
