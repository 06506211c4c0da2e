"""The figures of lesson 8 (memory): where the bytes of a step go, and what sharding does to them.

    draw_memory_bars(ax, rows)                  stacked bars, one per row (a Memory), one colour per kind
    predicted_measured_figure(pairs)            each setup's predicted bar beside its measured one
    activations_figure(config, batch, seqs)     activation bytes against sequence length, per recomputation
    per_rank_figure(psi, ns)                    model-state bytes per rank against N for ZeRO stages 0–3 (the 1/N
                                                curves), with measured points
    fsdp_timeline_figure(panels)                one FSDP step per panel: block forwards and backwards over the
                                                all-gathers and reduce-scatters (labkit.sharded_step's timeline)
    calculator_figure(...), calculator()        the memory calculator: labkit.memory.predict as stacked bars for
                                                ZeRO stages 0–3 against a device's memory, and its widget
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from labkit.memory import Memory, Setup, activation_bytes, num_parameters, predict
from labkit.models import GPTConfig
from labkit.timeline import Box, draw_timeline
from labkit.widgets import sized_figure

__all__ = ["KINDS", "MODELS", "draw_memory_bars", "predicted_measured_figure", "activations_figure", "per_rank_figure",
           "fsdp_timeline_figure", "calculator_figure", "calculator"]

KINDS = {"parameters": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868", "master": "#8172B3",
         "activations": "#C44E52"}

# GPT shapes (labkit's GPT: MLP 4h, learned positions, tied head) of the usual sizes; Ψ is computed, not named
MODELS = {
    "GPT-2 small": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "GPT-2 XL": GPTConfig(vocab_size=50257, block_size=1024, n_layer=48, n_head=25, n_embd=1600),
    "7B-class": GPTConfig(vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096),
    "13B-class": GPTConfig(vocab_size=32000, block_size=4096, n_layer=40, n_head=40, n_embd=5120),
    "70B-class": GPTConfig(vocab_size=32000, block_size=4096, n_layer=80, n_head=64, n_embd=8192),
}


def _gib(x: float) -> float:
    return x / 2 ** 30


def draw_memory_bars(ax, rows: Mapping[str, Memory], *, unit: float = 2 ** 20, unit_name: str = "MiB",
                     hatch: Mapping[str, str] | None = None, width: float = 0.7, positions=None):
    """One stacked bar per row; ``hatch[label]`` hatches a bar (the measured ones)."""
    labels = list(rows)
    x = np.arange(len(labels)) if positions is None else np.asarray(positions)
    for i, label in enumerate(labels):
        bottom = 0.0
        for kind, color in KINDS.items():
            value = getattr(rows[label], kind) / unit
            if value:
                ax.bar(x[i], value, width, bottom=bottom, color=color, edgecolor="black", linewidth=0.5,
                       hatch=(hatch or {}).get(label))
            bottom += value
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(unit_name)
    return ax


def _kinds_legend(ax, **kwargs):
    ax.legend(handles=[Patch(facecolor=c, edgecolor="black", label=k) for k, c in KINDS.items()], **kwargs)


def predicted_measured_figure(pairs: Mapping[str, tuple[Memory, Memory]], *, title: str = ""):
    """For each setup, the predicted bar (plain) and the measured one (hatched) side by side."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(pairs)), 3.6))
    for i, (label, (predicted, measured)) in enumerate(pairs.items()):
        draw_memory_bars(ax, {f"{label}\npredicted": predicted}, positions=[i - 0.19], width=0.36)
        draw_memory_bars(ax, {"measured": measured}, positions=[i + 0.19], width=0.36, hatch={"measured": "//"})
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels(list(pairs), fontsize=8)
    ax.set_title(title or "bytes of one step: predicted (left) and measured (right, hatched)", fontsize=10)
    _kinds_legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def activations_figure(config: GPTConfig, batch: int, seqs: Sequence[int], *,
                       measured: Mapping[str, Mapping[int, float]] | None = None):
    """Activation bytes of one micro-batch against the sequence length, for each recomputation (and flash
    attention); ``measured[name][s]`` drawn as points over the lines."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    lines = {"none": Setup(batch, 1), "selective": Setup(batch, 1, recompute="selective"),
             "full": Setup(batch, 1, recompute="full"), "flash (no recompute)": Setup(batch, 1, flash=True)}
    styles = ["-", "--", "-", ":"]                  # selective and flash nearly coincide: dashed over dotted
    for (name, setup), color, style in zip(lines.items(), ["#C44E52", "#DD8452", "#4C72B0", "#55A868"], styles):
        ys = [activation_bytes(config, replace(setup, seq_len=s)) / 2 ** 20 for s in seqs]
        ax.plot(seqs, ys, style, color=color, label=name, linewidth=2 if style != "-" else 1.5)
        for s, value in (measured or {}).get(name, {}).items():
            ax.plot(s, value / 2 ** 20, "o", color=color, markeredgecolor="black")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length s")
    ax.set_ylabel("activation MiB (one micro-batch)")
    ax.set_title(f"activations: 16·bsh per layer, plus a·b·s² without flash or recomputation (b = {batch})",
                 fontsize=9)
    ax.legend(fontsize=8, title="recomputation" + (" (points: measured)" if measured else ""), title_fontsize=8)
    fig.tight_layout()
    return fig


def per_rank_figure(psi: float, ns: Sequence[int], *, setup: Setup | None = None,
                    measured: Mapping[int, Mapping[int, float]] | None = None, device_gib: float | None = None):
    """Model-state bytes per rank (parameters, gradients, optimizer state, master) against N for each ZeRO
    stage; ``measured[stage][N]`` as points. Activations are left out: sharding does not touch them."""
    setup = setup or Setup(batch=1, seq_len=1, dtype_bytes=2, mixed_precision=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for stage, color in zip(range(4), ["#8C8C8C", "#55A868", "#DD8452", "#4C72B0"]):
        ys = []
        for n in ns:
            m = predict(GPTConfig(vocab_size=1, block_size=1, n_layer=1, n_head=1, n_embd=1),
                        replace(setup, dp=n, zero=stage), num_params=psi)
            ys.append(_gib(m.total - m.activations))
        ax.plot(ns, ys, "-", color=color, label=["DDP (stage 0)", "ZeRO-1", "ZeRO-2", "ZeRO-3 / FSDP"][stage])
        for n, value in (measured or {}).get(stage, {}).items():
            ax.plot(n, _gib(value), "o", color=color, markeredgecolor="black")
    if device_gib:
        ax.axhline(device_gib, color="black", linestyle="--", linewidth=1)
        ax.text(ns[0], device_gib * 1.08, f"{device_gib:g} GiB", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("data-parallel ranks N")
    ax.set_ylabel("GiB per rank (model state)")
    ax.set_title(f"Ψ = {psi / 1e9:.2f} B parameters: stage 3 falls as 1/N, the others level off", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


_MESSAGE_COLORS = {"all_gather": "#4C72B0", "reduce_scatter": "#DD8452", "all_reduce": "#55A868"}


def _timeline_style(event):
    if event.kind in ("forward", "backward"):
        return Box(facecolor="#B0B0B0" if event.kind == "forward" else "#707070", text=event.label.split()[-1])
    return Box(facecolor=_MESSAGE_COLORS.get(event.kind, "#CCCCCC"), bottom=0.2, height=0.6)


def fsdp_timeline_figure(panels: Mapping[str, Sequence]):
    """One panel per run (e.g. without and with prefetch): row 1 the blocks' forwards (light) and backwards
    (dark, numbered by block), row 2 the messages: all-gathers (blue) and reduce-scatters (orange)."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.5 * len(panels) + 0.6), squeeze=False)
    for ax, (title, events) in zip(axes[:, 0], panels.items()):
        compute = [e for e in events if e.kind in ("forward", "backward")]
        messages = [e for e in events if e.kind not in ("forward", "backward")]
        draw_timeline(ax, [compute, messages], _timeline_style, row_labels=["compute", "messages"], unit=1e-3,
                      xlabel="ms", title=title)
    axes[0, 0].legend(handles=[Patch(facecolor="#B0B0B0", label="forward"), Patch(facecolor="#707070", label="backward"),
                               Patch(facecolor=_MESSAGE_COLORS["all_gather"], label="all-gather"),
                               Patch(facecolor=_MESSAGE_COLORS["reduce_scatter"], label="reduce-scatter")],
                      fontsize=7, ncol=4, loc="lower right", bbox_to_anchor=(1.0, 1.15))
    fig.tight_layout()
    return fig


def calculator_figure(model: str = "7B-class", dp: int = 8, tp: int = 1, pp: int = 1, precision: str = "bf16 mixed",
                      recompute: str = "none", batch: int = 1, seq_len: int = 4096, flash: bool = True,
                      device_gib: float = 80.0, stage: int | None = None, figure=None):
    """labkit.memory.predict for ZeRO stages 0–3 as stacked GiB bars per rank, against the device's memory
    (into ``figure`` if given)."""
    config = MODELS[model]
    mixed = precision == "bf16 mixed"
    setup = Setup(batch=batch, seq_len=seq_len, dtype_bytes=2 if mixed else 4, mixed_precision=mixed, dp=dp, tp=tp,
                  pp=pp, micro_batches=max(pp, 1) * 2, recompute=recompute, flash=flash)
    rows = {f"stage {k}": predict(config, replace(setup, zero=k)) for k in range(4)}
    fig = sized_figure((7.2, 3.6), figure)
    ax = fig.subplots()
    draw_memory_bars(ax, rows, unit=2 ** 30, unit_name="GiB per rank")
    ax.axhline(device_gib, color="black", linestyle="--", linewidth=1)
    for i, m in enumerate(rows.values()):
        fits = m.total <= device_gib * 2 ** 30
        ax.text(i, _gib(m.total), f"{_gib(m.total):.1f}" + ("" if fits else " ✗"), ha="center", va="bottom",
                fontsize=8, fontweight="bold" if i == stage else None)
    psi = num_parameters(config)
    ax.set_title(f"{model}: Ψ = {psi / 1e9:.2f} B, N = {dp}, t = {tp}, p = {pp}, {precision}, b = {batch}, "
                 f"s = {seq_len}, recompute {recompute}" + (", flash" if flash else ""), fontsize=8)
    ax.set_ylim(0, max(device_gib, max(_gib(m.total) for m in rows.values())) * 1.15)
    _kinds_legend(ax, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def calculator(**defaults):
    """Controls around :func:`calculator_figure` (labkit.widgets.FigureExplorer); the figure redraws as a
    control moves."""
    import ipywidgets as widgets
    from labkit.widgets import FigureExplorer

    d = {"model": "7B-class", "dp": 8, "tp": 1, "pp": 1, "precision": "bf16 mixed", "recompute": "none", "batch": 1,
         "seq_len": 4096, "flash": True} | defaults
    style = {"description_width": "initial"}
    return FigureExplorer(calculator_figure, dict(
        model=widgets.Dropdown(options=list(MODELS), value=d["model"], description="model"),
        dp=widgets.Dropdown(options=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512], value=d["dp"], description="data N"),
        tp=widgets.Dropdown(options=[1, 2, 4, 8], value=d["tp"], description="tensor t"),
        pp=widgets.Dropdown(options=[1, 2, 4, 8, 16], value=d["pp"], description="pipeline p"),
        precision=widgets.ToggleButtons(options=["bf16 mixed", "fp32"], value=d["precision"], description="precision"),
        recompute=widgets.ToggleButtons(options=["none", "selective", "full"], value=d["recompute"],
                                        description="recompute"),
        batch=widgets.IntSlider(value=d["batch"], min=1, max=16, description="micro-batch b", style=style,
                                continuous_update=False),
        seq_len=widgets.Dropdown(options=[512, 1024, 2048, 4096, 8192, 16384], value=d["seq_len"],
                                 description="sequence s"),
        flash=widgets.Checkbox(value=d["flash"], description="flash attention")))
