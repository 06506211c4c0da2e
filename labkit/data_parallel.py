"""Data-parallel SGD from first principles (lesson 1).

N workers hold identical copies of the model. Each epoch the data set is cut into N disjoint shards;
worker i computes the gradient g_i of its shard's mean loss; the workers agree on

    g = (1/N) Σ_i g_i            (equal shards: exactly the full-batch gradient)
    g = Σ_i B_i g_i / Σ_i B_i     (shards of unequal sizes B_i: the weighted mean is the exact one)

and every replica applies the same update, so the replicas stay identical. Two ways to agree on g:
a central server (gather to rank 0, average, broadcast back) or an all-reduce (every rank ends with
the sum, no rank is special). Both are here, written with plain ``torch.distributed`` calls.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from labkit import comm

__all__ = [
    "make_linear_data", "LinearRegression", "shard_indices", "average_gradients", "all_reduce_mean_",
    "weighted_average_gradients", "server_average_gradients", "broadcast_parameters", "flat_grad",
    "flat_params",
]


# --------------------------------------------------------------------------------------------
# The workload: linear regression on synthetic data
# --------------------------------------------------------------------------------------------

def make_linear_data(num_samples: int = 512, num_features: int = 8, noise: float = 0.1,
                     seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Synthetic regression data y = X w* + b* + noise, made in code (no download).

    Returns ``(X, y, w_true, b_true)`` with X of shape (num_samples, num_features), y (num_samples,).
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(num_samples, num_features, generator=g, dtype=dtype)
    w_true = torch.randn(num_features, generator=g, dtype=dtype)
    b_true = torch.randn((), generator=g, dtype=dtype)
    y = X @ w_true + b_true + noise * torch.randn(num_samples, generator=g, dtype=dtype)
    return X, y, w_true, b_true


class LinearRegression(torch.nn.Module):
    """ŷ = x·w + b with mean-squared-error loss; starts from zeros so every replica starts equal."""

    def __init__(self, num_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(num_features, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros((), dtype=dtype))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.w + self.b

    def loss(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.mean((self(X) - y) ** 2)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """All of a model's gradients as one vector (for comparing gradients in checks and figures)."""
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """All of a model's parameters as one vector, copied (a snapshot that later steps do not change)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


# --------------------------------------------------------------------------------------------
# Sharding: which samples each rank sees in an epoch
# --------------------------------------------------------------------------------------------

def shard_indices(num_samples: int, rank: int, world_size: int, epoch: int = 0, seed: int = 0,
                  shuffle: bool = True, mode: str = "pad") -> list[int]:
    """The sample indices of ``rank``'s shard for ``epoch``.

    Every rank draws the *same* permutation (seeded with ``seed + epoch``, so it changes every
    epoch: forget the epoch and every epoch repeats one order) and takes every ``world_size``-th
    element starting at ``rank``, so shards are disjoint.

    mode:
        ``"pad"``: repeat the first indices until all shards are equal (``DistributedSampler``,
        ``drop_last=False``; a few samples count twice).
        ``"drop"``: drop the tail until all shards are equal (``drop_last=True``).
        ``"uneven"``: no padding, no dropping: shards differ in size by at most one and together are
        exactly the data set (then the gradient average must be weighted).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if mode not in ("pad", "drop", "uneven"):
        raise ValueError(f"mode must be 'pad', 'drop' or 'uneven', not {mode!r}")
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_samples, generator=g).tolist()
    else:
        order = list(range(num_samples))
    if mode == "pad":
        total = math.ceil(num_samples / world_size) * world_size
        while len(order) < total:  # repeat from the start (several times if num_samples < world_size)
            order += order[: total - len(order)]
    elif mode == "drop":
        per_rank = num_samples // world_size
        order = order[: per_rank * world_size]
    return order[rank::world_size]


# --------------------------------------------------------------------------------------------
# Agreeing on the gradient
# --------------------------------------------------------------------------------------------

def average_gradients(model: torch.nn.Module, one_message: bool = False) -> None:
    """All-reduce: every rank's ``.grad`` becomes the mean over ranks, g = (1/N) Σ g_i.

    Written as sum-then-divide, the way the math reads and the way every backend can do it
    (``ReduceOp.AVG`` exists only on some backends and versions: NCCL always, gloo in recent torch).
    Parameters without a gradient (unused, frozen) are skipped. ``one_message``: one all-reduce of
    all the gradients at once (:func:`all_reduce_mean_`) instead of one per tensor.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if one_message:
        all_reduce_mean_(grads)
        return
    world_size = dist.get_world_size()
    for g in grads:
        comm.all_reduce(g, op=dist.ReduceOp.SUM)
        g /= world_size


def all_reduce_mean_(tensors: list[torch.Tensor], dtype: torch.dtype | None = None,
                     group: ProcessGroup | None = None) -> None:
    """Replace each tensor, in place, by its mean over the ranks, with ONE all-reduce: copy them into
    a single flat buffer first. Every collective pays a fixed latency (milliseconds when processes
    share a few cores), so one call per step instead of one per tensor; DDP's buckets do the same.
    ``dtype``: send in that dtype (bfloat16: half the bytes of fp32; the sum is then taken in it too)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if dtype is not None:
        flat = flat.to(dtype)
    comm.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.to(tensors[0].dtype) / dist.get_world_size(group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def weighted_average_gradients(model: torch.nn.Module, local_count: int) -> None:
    """All-reduce for unequal shards: g = Σ B_i g_i / Σ B_i, with B_i = ``local_count`` on rank i.

    Each g_i is the gradient of a *mean* loss over B_i samples, so B_i g_i is the gradient of the
    shard's *summed* loss; summing those and dividing by the total gives the full-batch mean.
    """
    total = comm.on(torch.tensor([float(local_count)]))
    comm.all_reduce(total, op=dist.ReduceOp.SUM)
    for p in model.parameters():
        if p.grad is not None:
            p.grad *= local_count
            comm.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= total.item()


def server_average_gradients(model: torch.nn.Module, server: int = 0) -> None:
    """The central-server design: every rank sends its gradient to ``server``, which averages them
    and sends the mean back. Same result as :func:`average_gradients`, but the server receives
    N gradients and sends N copies: its traffic grows with N, the all-reduce's per rank does not.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for p in model.parameters():
        if p.grad is None:
            continue
        if rank == server:
            inbox = [torch.empty_like(p.grad) for _ in range(world_size)]
            comm.gather(p.grad, gather_list=inbox, dst=server)
            p.grad.copy_(torch.stack(inbox).mean(dim=0))
        else:
            comm.gather(p.grad, None, dst=server)
        comm.broadcast(p.grad, src=server)


def broadcast_parameters(model: torch.nn.Module, src: int = 0, group: ProcessGroup | None = None) -> None:
    """Make every replica start from rank ``src``'s parameters and buffers (what DDP does when it wraps
    a model; ``src`` is a global rank). Frozen parameters too: they are part of the shared model."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            comm.broadcast(t, src=src, group=group)
