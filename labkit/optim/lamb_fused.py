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

Numbers that change every step (η from a schedule, c and ε′ from t) enter as one small tensor on the
parameters' device: passed as Python floats they would be baked into the compiled code and force a
recompilation at every step.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fused_lamb_step", "step_scalars", "compiled_fused_lamb_step"]


def _accumulator(t: torch.Tensor) -> torch.dtype:
    """Sums of squares in float32 at least (a bf16 sum of millions of squares would lose the norm)."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _direction(theta, m, v, c, eps, weight_decay: float):
    """u = c·m/(√v + ε′) + λ·θ: Adam's bias-corrected direction plus the weight decay."""
    u = c * m / (v.sqrt() + eps)
    return u + weight_decay * theta if weight_decay else u


def fused_lamb_step(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, scalars: torch.Tensor, *,
                    beta1: float, beta2: float, weight_decay: float, adapt: bool,
                    max_weight_norm: float | None) -> torch.Tensor:
    """One LAMB step of every tensor in ``params`` (in place), the same step t for all of them.

    ``scalars`` = tensor([η, c, ε′]) on the parameters' device (:func:`step_scalars`). Returns the
    trust ratios, one per tensor. Plain PyTorch: run it as it is (eager, for tests) or compiled."""
    lr, c, eps = scalars[0], scalars[1], scalars[2]
    weight_norms, update_norms = [], []
    for theta, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):      # pass 1
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = _direction(theta, m, v, c, eps, weight_decay)
        acc = _accumulator(theta)
        weight_norms.append(theta.to(acc).square().sum())
        update_norms.append(u.to(acc).square().sum())
    weight_norm = torch.stack(weight_norms).sqrt()
    update_norm = torch.stack(update_norms).sqrt()
    if not adapt:
        ratios = torch.ones_like(weight_norm)
    else:
        if max_weight_norm is not None:
            weight_norm = weight_norm.clamp(max=max_weight_norm)
        usable = (weight_norm > 0) & (update_norm > 0)
        ratios = torch.where(usable, weight_norm / torch.where(usable, update_norm, 1), 1)
    for i, (theta, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):     # pass 2
        u = _direction(theta, m, v, c, eps, weight_decay)
        theta.sub_((lr * ratios[i]).to(theta.dtype) * u)
    return ratios


def step_scalars(lr: float, step: int, beta1: float, beta2: float, eps: float, bias_correction: bool,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """tensor([η, c, ε′]) for step ``step`` (1-based), on ``device``."""
    if bias_correction:
        root = math.sqrt(1 - beta2 ** step)
        c, eps = root / (1 - beta1 ** step), eps * root
    else:
        c = 1.0
    return torch.tensor([lr, c, eps], dtype=dtype, device=device)


_compiled = None


def compiled_fused_lamb_step():
    """``fused_lamb_step`` compiled once per process (``torch.compile``, the whole step one graph)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(fused_lamb_step, fullgraph=True, dynamic=False)
    return _compiled
