"""LAMB's step in two passes over memory, compiled: the fast path for GPUs (``Lamb(fused=True)``).

The lecture's formula (labkit.optim.lamb) is unchanged; this file only schedules it for the memory.
An optimizer step does a few flops per number it touches, so its time is the bytes it moves. The
fewest LAMB can move, per parameter, in elements (see labkit.bench.optim): 10, because the trust
ratio needs ‖θ‖ and ‖u‖ of the whole tensor before any element of θ may change:

    pass 1  read θ, g, m, v; write m, v          m ← β1·m + (1−β1)·g,  v ← β2·v + (1−β2)·g²,
                                                  u = c·m/(√v + ε′) + λ·θ,  sums of θ² and u²
    (between)                                     ratio = ‖θ‖/‖u‖ per tensor (1 where a norm is 0)
    pass 2  read θ, m, v; write θ                 u again, θ ← θ − η·ratio·u

with the bias corrections folded into c = √(1−β2ᵗ)/(1−β1ᵗ) and ε′ = ε·√(1−β2ᵗ), as the foreach path
does. Written in eager PyTorch, each line above is a kernel and a pass of its own (23 elements per
parameter in the foreach path); ``torch.compile`` fuses each pass into one loop per tensor (Triton
kernels on a GPU, C++ loops on a CPU), so the step moves about the 10 the formula needs.

Every number of the step (η from a schedule, c and ε′ from t, and the group's β1, β2, λ and the
clamp of ‖θ‖) enters as one small tensor on the parameters' device: passed as Python floats they would
be baked into the compiled code, and a new learning rate or a second group would compile it again.
What still compiles anew is a new list of tensor shapes and the trust ratio switched off:
torch.compile keeps a few such versions per function (``recompile_limit``, 8 by default), and Lamb
falls back to its foreach path, with a warning, when they run out (or when a compile fails: no C++
compiler, no Triton). Cut into calls as below, a param
group needs two versions (its blocks', and its other tensors'): a model with two groups, four.

Compiling costs time in proportion to the tensors in one call: with the whole step as one graph,
about half a second per tensor on this project's 2-core CPU with the caches off (65–80 s for the
146 tensors of a 12-block model, 148 s for the 338 of 1 B parameters). But LAMB treats each tensor
on its own (its own two norms, its own ratio), so the step may be cut into calls at any tensor.
:func:`compile_units` cuts it where the model repeats itself: one call per block of a stack of equal
blocks, all of them one compiled version, and one call for the tensors outside the stack (15–16 s
for 12 blocks and for 28). The price: a Python call per block instead of one per step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["fused_lamb_step", "step_scalars", "compiled_fused_lamb_step", "Repeat", "longest_repeat",
           "compile_units"]


def _accumulator(t: torch.Tensor) -> torch.dtype:
    """Sums of squares in float32 at least (a bf16 sum of millions of squares would lose the norm)."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _direction(theta, m, v, c, eps, weight_decay):
    """u = c·m/(√v + ε′) + λ·θ: Adam's bias-corrected direction plus the weight decay."""
    return c * m / (v.sqrt() + eps) + weight_decay * theta


def fused_lamb_step(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, scalars: torch.Tensor, *,
                    adapt: bool) -> torch.Tensor:
    """One LAMB step of every tensor in ``params`` (in place), the same step t for all of them.

    ``scalars`` = tensor([η, c, ε′, β1, β2, λ, clamp of ‖θ‖]) on the parameters' device
    (:func:`step_scalars`). Returns the trust ratios, one per tensor. Plain PyTorch: run it as it is
    (eager, for tests) or compiled."""
    lr, c, eps, beta1, beta2, weight_decay, max_weight_norm = scalars.unbind()
    weight_norms, update_norms = [], []
    for theta, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):      # pass 1
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        u = _direction(theta, m, v, c, eps, weight_decay)
        acc = _accumulator(theta)
        weight_norms.append(theta.to(acc).square().sum())
        update_norms.append(u.to(acc).square().sum())
    weight_norm = torch.stack(weight_norms).sqrt()
    update_norm = torch.stack(update_norms).sqrt()
    if not adapt:
        ratios = torch.ones_like(weight_norm)
    else:
        weight_norm = torch.minimum(weight_norm, max_weight_norm.to(weight_norm.dtype))
        usable = (weight_norm > 0) & (update_norm > 0)
        ratios = torch.where(usable, weight_norm / torch.where(usable, update_norm, 1), 1)
    for i, (theta, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):     # pass 2
        u = _direction(theta, m, v, c, eps, weight_decay)
        theta.sub_((lr * ratios[i]).to(theta.dtype) * u)
    return ratios


def step_scalars(lr: float, step: int, group: dict, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """tensor([η, c, ε′, β1, β2, λ, clamp of ‖θ‖ (∞: none)]) for step ``step`` (1-based) of a Lamb
    param group (betas, eps, weight_decay, bias_correction, max_weight_norm), on ``device``."""
    beta1, beta2 = group["betas"]
    c, eps = 1.0, group["eps"]
    if group["bias_correction"]:
        root = math.sqrt(1 - beta2 ** step)
        c, eps = root / (1 - beta1 ** step), eps * root
    clamp = group["max_weight_norm"]
    return torch.tensor([lr, c, eps, beta1, beta2, group["weight_decay"], math.inf if clamp is None else clamp],
                        dtype=dtype, device=device)


_compiled = None


def compiled_fused_lamb_step():
    """``fused_lamb_step`` compiled (``torch.compile``, each call one graph), one per process: every
    optimizer shares it, and torch.compile keeps one version per list of shapes."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(fused_lamb_step, fullgraph=True, dynamic=False)
    return _compiled


# --- where to cut the step into compiled calls -------------------------------------------------------

MIN_UNIT = 8      # tensors per call at least, where the repeating block is smaller (fewer Python calls)


class Repeat(NamedTuple):
    """``count`` copies of the ``period`` signatures starting at ``start``, one after the other."""
    start: int
    period: int
    count: int


def longest_repeat(signatures: list) -> Repeat | None:
    """The repetition that covers the most of ``signatures`` (the shortest period among equals), or
    None if nothing repeats. For each period p, a run of i with signatures[i] == signatures[i + p]
    of length L starting at s makes signatures[s : s + L + p] p-periodic: (L + p) // p copies."""
    best, n = None, len(signatures)
    for period in range(1, n // 2 + 1):
        i = 0
        while i < n - period:
            if signatures[i] != signatures[i + period]:
                i += 1
                continue
            start = i
            while i < n - period and signatures[i] == signatures[i + period]:
                i += 1
            count = (i - start + period) // period
            if count >= 2 and (best is None or count * period > best.count * best.period):
                best = Repeat(start, period, count)
    return best


def compile_units(tensors: list) -> list[list[int]]:
    """The step's calls, as lists of indices into ``tensors``: one call per block (or per group of
    blocks, :data:`MIN_UNIT` tensors at least) of the longest run of repeated shapes, and one call
    for all other tensors. Equal blocks have equal shapes, strides and dtypes: one compiled version."""
    n = len(tensors)
    repeat = longest_repeat([(tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors])
    if repeat is None:
        return [list(range(n))]
    blocks = math.ceil(MIN_UNIT / repeat.period)          # blocks per call
    size, calls = repeat.period * blocks, repeat.count // blocks
    units = [list(range(repeat.start + k * size, repeat.start + (k + 1) * size)) for k in range(calls)]
    rest = [*range(repeat.start), *range(repeat.start + calls * size, n)]
    return units + ([rest] if rest else [])
