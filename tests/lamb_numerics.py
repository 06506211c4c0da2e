"""Checking a LAMB step taken in a low precision (bf16) against the same step in float64.

A bf16 parameter cannot hold its value to better than half a unit in the last place, which may be
larger than what one step moves it: comparing parameters "to within a few ulps" would pass a step
that did nothing. So each element is compared with the float64 step at the rounding of its size plus
a small fraction of its own update, and the check is shown to reject the no-step and the step without
its trust ratio."""

from __future__ import annotations

import torch
from torch import nn

from labkit.optim import Lamb


def float64_step(before: list[torch.Tensor], grads: list[torch.Tensor], **hyper) -> tuple[list, list]:
    """One readable Lamb step on float64 copies: (parameters after, trust ratios)."""
    params = [nn.Parameter(p.detach().double().clone()) for p in before]
    for p, g in zip(params, grads):
        p.grad = g.double()
    optimizer = Lamb(params, foreach=False, **hyper)
    optimizer.step()
    return [p.detach() for p in params], [optimizer.state[p]["trust_ratio"] for p in params]


def step_errors(before: torch.Tensor, after: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                update_share: float = 8.0) -> torch.Tensor:
    """|after − reference| / tolerance per element (≤ 1: within the tolerance). The tolerance: dtype's
    rounding at the element's size, plus ``update_share`` rounding errors of its update (the moments,
    the direction, η·ratio and the product are each rounded once in dtype)."""
    eps = torch.finfo(dtype).eps
    before, after, reference = (t.detach().double().cpu() for t in (before, after, reference))
    tolerance = eps * reference.abs() + update_share * eps * (reference - before).abs() + 1e-30
    return (after - reference).abs() / tolerance


def assert_step_close(before: list, after: list, reference: list, dtype: torch.dtype) -> None:
    """Every element of every tensor within :func:`step_errors`'s tolerance, and the check able to fail:
    neither leaving the parameters as they were nor stepping ten times as far would pass it."""
    for i, (b, a, r) in enumerate(zip(before, after, reference)):
        worst = step_errors(b, a, r, dtype).max().item()
        assert worst <= 1, f"tensor {i}: an element is {worst:.2f}x the tolerance from the float64 step"
        moved = r.double().cpu() - b.double().cpu()
        assert step_errors(b, b, r, dtype).max() > 1, f"tensor {i}: the check would pass a step that did nothing"
        assert step_errors(b, b.double().cpu() + 10 * moved, r, dtype).max() > 1, \
            f"tensor {i}: the check would pass a step ten times too long"
