"""Mixed precision from scratch: compute in 16 bits, keep in 32 bits what accumulates (Micikevicius et al. 2018).

A 16-bit float halves the bytes of parameters, gradients and activations and runs matrix products several times
faster on GPUs. The two 16-bit formats trade range for precision:

    format     exponent  mantissa  smallest positive (subnormal)  largest     relative step 2^-mantissa
    float32    8         23        1.4e-45                        3.4e38      1.2e-7
    bfloat16   8         7         9.2e-41                        3.4e38      7.8e-3
    float16    5         10        6.0e-8                         65504       9.8e-4

Three things go wrong in 16 bits, and each has its remedy:

1. **Updates vanish.** w + η·g rounds back to w when |η·g| < |w|·2^-(mantissa+1): in bfloat16 an update
   below 0.4 % of the weight is lost. Remedy: fp32 **master weights**. The model computes in 16 bits, the
   optimizer updates an fp32 copy and writes it back rounded (:class:`MasterWeights`). Bytes per parameter
   with Adam: 2 (16-bit weights) + 2 (gradients) + 4 (master) + 8 (m and v in fp32) = 16, as in ZeRO's paper.
2. **Gradients underflow** (float16 only: its range ends at 6e-8). Remedy: **loss scaling**. Multiply the loss
   by S, so every gradient is S times larger, and divide by S in fp32 before the update. A dynamic scaler
   (:class:`LossScaler`, the rule of ``torch.amp.GradScaler``) starts high, halves S and skips the step when a
   gradient overflows to inf, and doubles S after ``growth_interval`` good steps. bfloat16 has fp32's range and
   needs no scaling.
3. **Sums lose digits.** Adding N numbers in 16 bits rounds at every step. All-reducing gradients in bfloat16
   (``labkit.data_parallel.all_reduce_mean_(grads, dtype=torch.bfloat16)``) halves the bytes sent; the error
   against fp32 is measured in the lesson.

``torch.autocast`` is the other way to the same end: the parameters stay fp32 (they are the master weights) and
each matrix product casts its inputs to 16 bits on the fly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["MasterWeights", "LossScaler", "underflow_fraction", "update_survives"]


def underflow_fraction(values: torch.Tensor, dtype: torch.dtype) -> float:
    """Of the nonzero ``values``, the fraction that become exactly 0 when rounded to ``dtype``."""
    nonzero = values[values != 0]
    if nonzero.numel() == 0:
        return 0.0
    return (nonzero.to(dtype) == 0).float().mean().item()


def update_survives(weight: float, update: float, dtype: torch.dtype) -> bool:
    """Whether ``weight + update`` computed in ``dtype`` differs from ``weight`` in ``dtype``."""
    w = torch.tensor(weight, dtype=dtype)
    return bool((w + torch.tensor(update, dtype=dtype)) != w)


class LossScaler:
    """Dynamic loss scaling with the rule of ``torch.amp.GradScaler``: scale the loss by S; after the backward,
    divide the gradients by S and look for inf or nan; if there is one, skip the step and multiply S by
    ``backoff_factor``, otherwise step, and after ``growth_interval`` steps in a row without one multiply S by
    ``growth_factor``."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ValueError("need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.good_steps = growth_interval, 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, grads: Iterable[torch.Tensor]) -> bool:
        """Divide the (fp32) gradients by S in place; return whether any is inf or nan."""
        found_inf = False
        inverse = 1.0 / self.scale
        for g in grads:
            g.mul_(inverse)
            found_inf = found_inf or not bool(torch.isfinite(g).all())
        return found_inf

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0


class MasterWeights:
    """An optimizer for a 16-bit model that updates fp32 copies of its parameters.

        model = GPT(config).to(torch.bfloat16)
        opt = MasterWeights(model.parameters(), lambda ps: torch.optim.AdamW(ps, lr=1e-3))
        model(x, y)[1].backward(); opt.step(); opt.zero_grad()

    ``step`` copies each 16-bit gradient into its fp32 master's ``.grad`` (unscaled by ``scaler`` when there is
    one, the step skipped on inf), steps the optimizer on the masters, and rounds them back into the model. The
    fp32 gradients exist only during the step; between steps a rank keeps 2 + 2 + 4 + 8 bytes per parameter."""

    def __init__(self, params: Iterable[nn.Parameter], make_optimizer: Callable[[list], torch.optim.Optimizer],
                 scaler: LossScaler | None = None):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("MasterWeights got no parameters that require a gradient")
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.params]
        self.optimizer = make_optimizer(self.master)
        self.scaler = scaler
        self.skipped = 0                          # steps skipped because a gradient overflowed

    @torch.no_grad()
    def step(self) -> bool:
        """One update; False when the loss scaler found inf or nan and skipped it."""
        for p, m in zip(self.params, self.master):
            m.grad = p.grad.float() if p.grad is not None else None
        grads = [m.grad for m in self.master if m.grad is not None]
        if self.scaler is not None:
            found_inf = self.scaler.unscale_(grads)
            self.scaler.update(found_inf)
            if found_inf:
                self.skipped += 1
                self._drop_master_grads()
                return False
        self.optimizer.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m)                            # rounded to the model's dtype
        self._drop_master_grads()
        return True

    def _drop_master_grads(self) -> None:
        for m in self.master:
            m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
