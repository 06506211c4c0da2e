"""LARS: SGD with momentum and a learning rate per layer (You, Gitman, Ginsburg 2017, Algorithm 1).

For each parameter tensor w with gradient g:

    λ = η · ‖w‖ / (‖g‖ + β·‖w‖)          local learning rate (η: trust coefficient, β: weight decay)
    v ← μ·v + γ · λ · (g + β·w)           momentum (μ) on the rescaled step (γ: global learning rate)
    w ← w − v

λ is taken as 1 when ‖w‖ or ‖g‖ is 0 (a layer initialised at zero, or one that got no signal).
LAMB (``labkit.optim.lamb``) keeps this per-layer idea and puts Adam's direction in place of g.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim import Optimizer

from labkit.optim.hyperparameters import check_hyperparameters

__all__ = ["LARS"]


class LARS(Optimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 trust_coefficient: float = 1e-3, *, adapt: bool = True):
        check_hyperparameters("LARS", lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: invalid momentum={momentum!r} (must be in [0, 1))")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, adapt=adapt))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta = group["weight_decay"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                w_norm, g_norm = w.norm(), g.norm()
                if group["adapt"] and w_norm > 0 and g_norm > 0:
                    local_lr = group["trust_coefficient"] * w_norm / (g_norm + beta * w_norm)
                else:
                    local_lr = torch.ones_like(w_norm)
                state = self.state[w]
                state["local_lr"] = local_lr
                step = group["lr"] * local_lr * (g + beta * w)
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(step)
                w.sub_(v)
        return loss
