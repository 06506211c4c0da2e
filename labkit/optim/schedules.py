"""The linear scaling rule and gradual warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

Linear scaling: when the batch grows k-fold (B = k·b), multiply the learning rate by k. One step on
B samples then moves the weights about as far as k steps on b samples would, as long as the
gradient changes little over those k steps: true after the first phase of training, false at the
start, where the weights (and so the gradients) change fast.

Gradual warm-up: so start at the small-batch rate η and raise it linearly to k·η over the first
``warmup_steps`` steps (Goyal et al.: 5 epochs), then follow the usual schedule.

    lr(t) = k·η · factor(t)     factor(t) = 1/k + (1 − 1/k)·t/warmup      for t < warmup
                                factor(t) = decay(t)                       afterwards
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["scaled_lr", "warmup_factor", "linear_scaling_warmup"]

DECAYS = ("constant", "cosine", "linear")


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """The linear scaling rule: ``base_lr`` was tuned for ``base_batch_size``; this is the rate for
    ``batch_size`` (Goyal et al.: 0.1 for 256 images, so 3.2 for 8192)."""
    if base_lr < 0 or batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(f"scaled_lr needs base_lr >= 0 and positive batch sizes, got "
                         f"{base_lr}, {batch_size}, {base_batch_size}")
    return base_lr * batch_size / base_batch_size


def warmup_factor(step: int, scale: float, warmup_steps: int, total_steps: int | None = None,
                  decay: str = "constant") -> float:
    """Multiplier of the scaled learning rate at ``step`` (0-based): from 1/scale up to 1 during
    warm-up, then constant, or down to 0 at ``total_steps`` along a cosine or a straight line."""
    if step < warmup_steps:
        start = 1.0 / scale
        return start + (1.0 - start) * step / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


def linear_scaling_warmup(optimizer: Optimizer, scale: float, warmup_steps: int,
                          total_steps: int | None = None, decay: str = "constant") -> LambdaLR:
    """A ``LambdaLR`` for an optimizer whose ``lr`` is already the scaled one (k·η, see :func:`scaled_lr`).
    ``scale`` is k, the batch-size multiple; ``scheduler.step()`` once per optimizer step."""
    if not scale >= 1:
        raise ValueError(f"scale must be >= 1 (the batch-size multiple k), got {scale!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    if decay != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(f"decay={decay!r} needs total_steps > warmup_steps, got total_steps={total_steps!r}")
    return LambdaLR(optimizer, lambda step: warmup_factor(step, scale, warmup_steps, total_steps, decay))
