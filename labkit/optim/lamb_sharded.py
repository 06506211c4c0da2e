"""LAMB when the optimizer state is sharded (ZeRO stage 1, Rajbhandari et al. 2020): exercise 4c's reference.

Each of N ranks keeps Adam's m and v for one slice of every parameter tensor (``labkit.ring.chunk_bounds`` of
the flattened tensor), receives the averaged gradient of that slice (a reduce-scatter) and updates that slice;
an all-gather of the slices then gives every rank the whole parameters again. For Adam nothing else changes:
an element's update depends on that element only. LAMB's trust ratio ‖θ‖/‖u‖ needs the norms of the *whole*
tensors, and a rank holds a slice of each. Squares add across the ranks, norms do not:

    ‖θ‖² = Σ_r ‖θ_r‖²        (θ_r: rank r's slice)

so every rank sends the squared norms of its slices, all tensors' in one message (a message costs α, lesson 2),
and takes the square roots of the sums.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from labkit import comm
from labkit.optim.lamb import Lamb, lamb_direction

__all__ = ["whole_norms", "sharded_lamb_step"]


def whole_norms(shards: Sequence[torch.Tensor], group=None) -> list[float]:
    """On every rank, with this rank's slices of some tensors: the norm of each whole tensor, the same on every
    rank. One all-reduce of len(shards) numbers."""
    if not shards:
        return []
    squares = torch.stack([s.detach().double().pow(2).sum() for s in shards])   # ‖θ_r‖², a 0-dim tensor each
    comm.all_reduce(squares, group=group)                                       # Σ_r ‖θ_r‖², every tensor at once
    return squares.sqrt().tolist()


@torch.no_grad()
def sharded_lamb_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], step: int, *,
                      lr: float, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                      norms: Callable[[list], Sequence[float]] = whole_norms) -> list[float]:
    """One LAMB step on this rank's slices, in place: ``params[i]`` the slice of tensor i this rank owns (possibly
    empty), ``grads[i]`` the averaged gradient of that slice, ``exp_avgs``/``exp_avg_sqs`` its moments. ``norms``
    gives the whole tensors' norms from the slices (called once, for ‖θ‖ and ‖u‖ of every tensor together: one
    message per step). Returns the trust ratios, the same on every rank; equal to ``Lamb`` on the whole tensors."""
    group = dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay, adapt=True, max_weight_norm=None)
    updates = [lamb_direction(p, g, m, v, step, group) for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    both = torch.tensor([float(x) for x in norms(list(params) + updates)], dtype=torch.float64)
    if both.numel() != 2 * len(updates):
        raise ValueError(f"norms returned {both.numel()} numbers for {2 * len(updates)} tensors")
    ratios = Lamb._trust_ratio(both[:len(updates)], both[len(updates):], group)
    for p, u, ratio in zip(params, updates, ratios.tolist()):
        p.sub_(lr * ratio * u)
    return ratios.tolist()
