"""Gradient compression from scratch, as DDP communication hooks (lesson 9, issue 18).

A DDP communication hook replaces the all-reduce of one bucket of gradients: ``hook(state, bucket)`` gets the
bucket (its flat ``buffer()``, its ``gradients()`` as views of that buffer, its ``index()``) and returns a future
whose value is the averaged buffer. torch's DDP takes one with ``ddp.register_comm_hook(state, hook)``, and so does
``labkit.ddp.BucketedDDP``; the hooks here run under both, and send every message through :mod:`labkit.comm`, so
what they send is recorded.

    hook                 sends per rank, for a bucket of M numbers            what it loses
    cast_hook            M numbers of 2 bytes (bf16 / fp16)                   rounding to 8 or 11 bits
    topk_hook            k values + k indices, all-gathered: (N−1)·k·(4+8)    all but the k largest, unless
                                                                              error feedback carries them over
    powersgd_hook        per n×m matrix, r·(n+m) numbers instead of n·m       all but a rank-r approximation,
                                                                              unless error feedback ...

**Error feedback** (Seide et al. 2014; Karimireddy et al. 2019) keeps what compression dropped, e = g − C(g),
and adds it to the next step's gradient before compressing: nothing is lost, only delayed.

**PowerSGD** (Vogels et al. 2019) approximates each gradient matrix M (n × m) by P Qᵀ of rank r with one step of
power iteration, warm-started from the last step's Q:

    P = M Q            all-reduce P (sum)         P ← orthonormal columns of P
    Q = Mᵀ P           all-reduce Q, divide by N   M ≈ P Qᵀ  (the average over the ranks, rank r)

Since P is orthonormal, P Qᵀ = P Pᵀ (1/N Σ Mᵢ): the average gradient projected on the span of P. This module's
version takes the same steps as ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` (tested equal).
"""


from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from labkit import comm
from labkit.compression_cost import topk_k
from labkit.data_parallel import all_reduce_mean_

__all__ = ["done", "allreduce_hook", "CastState", "cast_hook", "TopKState", "topk_hook", "PowerSGDState",
           "powersgd_hook", "orthonormalize"]


def done(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """A future that already holds ``tensor``: what a hook returns when it has waited for its messages itself."""
    future = torch.futures.Future()
    future.set_result(tensor)
    return future


def _mean_(tensor: torch.Tensor, group) -> torch.Tensor:
    comm.all_reduce(tensor, group=group)
    return tensor.div_(dist.get_world_size(group))


def allreduce_hook(group, bucket) -> torch.futures.Future[torch.Tensor]:
    """No compression: the bucket's mean over the ranks (what DDP does without a hook)."""
    return done(_mean_(bucket.buffer(), group))


# --- casting -------------------------------------------------------------------------------------------------------

@dataclass
class CastState:
    group: object = None
    dtype: torch.dtype = torch.bfloat16


def cast_hook(state: CastState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Send the bucket in ``state.dtype`` (half the bytes of fp32) and sum in it; divide by N first, so that an
    fp16 sum does not overflow 65504 (torch's fp16_compress_hook and bf16_compress_hook do the same)."""
    buffer = bucket.buffer()
    low = buffer.to(state.dtype).div_(dist.get_world_size(state.group))
    comm.all_reduce(low, group=state.group)
    return done(buffer.copy_(low))


# --- top-k with error feedback --------------------------------------------------------------------------------------

@dataclass
class TopKState:
    group: object = None
    ratio: float = 0.01                   # k = ⌈ratio · M⌉ numbers of each bucket
    error_feedback: bool = True
    residual: dict = field(default_factory=dict)     # bucket index → what was not sent last time
    layout: dict = field(default_factory=dict)       # bucket index → its parameters, for which the residual holds


def topk_hook(state: TopKState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Each rank sends its k largest entries (of gradient + residual) as values and indices; every rank adds up
    everyone's and divides by N. With error feedback the rest is kept for the next step."""
    g, index = bucket.buffer(), bucket.index()
    n = dist.get_world_size(state.group)
    layout = [id(p) for p in bucket.parameters()]
    if state.error_feedback and index in state.residual:
        if state.layout.get(index) == layout:
            g.add_(state.residual[index])
        # else: DDP rebuilt its buckets after the first step; the residual no longer lines up, and is dropped
    k = topk_k(g.numel(), state.ratio)
    indices = g.abs().topk(k, sorted=False).indices
    values = g[indices]
    if state.error_feedback:
        residual = g.clone()
        residual[indices] = 0                                    # what was sent is not owed
        state.residual[index], state.layout[index] = residual, layout
    # indices differ from rank to rank: gather everyone's, then add each at its own places
    all_values = [torch.empty_like(values) for _ in range(n)]
    all_indices = [torch.empty_like(indices) for _ in range(n)]
    comm.all_gather(all_values, values, group=state.group)
    comm.all_gather(all_indices, indices, group=state.group)
    g.zero_()
    for v, i in zip(all_values, all_indices):
        g.index_add_(0, i, v)
    return done(g.div_(n))


# --- PowerSGD ------------------------------------------------------------------------------------------------------

def orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """Gram–Schmidt, in place: the columns of ``matrix`` (n × r) become orthonormal."""
    for i in range(matrix.shape[1]):
        col = matrix[:, i:i + 1]
        col /= col.norm()
        rest = matrix[:, i + 1:]
        rest -= col * (col * rest).sum(dim=0, keepdim=True)
    return matrix


@dataclass
class PowerSGDState:
    """What PowerSGD keeps between steps: the error of each bucket, the Q of each matrix (warm start), and a step
    counter (plain all-reduce for the first ``start_iter`` steps, as torch's default does)."""
    group: object = None
    rank: int = 1                          # r
    start_iter: int = 2
    min_compression_rate: float = 2.0      # compress an n×m matrix only if n·m > rate · r(n+m)
    error_feedback: bool = True
    warm_start: bool = True
    seed: int = 0
    iter: int = 0
    error: dict = field(default_factory=dict)
    qs: dict = field(default_factory=dict)              # bucket index → [Q of each compressed matrix]
    rng: np.random.RandomState | None = None

    def __post_init__(self):
        self.rng = np.random.RandomState(self.seed)


def _matrices(bucket, state: PowerSGDState):
    """The bucket's gradients as matrices (n = first dimension), split into those worth compressing and the rest.
    The compressed ones are grouped by shape: the order torch's hook draws their random Q's in."""
    compress, rest = defaultdict(list), []
    for g in bucket.gradients():
        m = g.view(g.shape[0], -1)
        n_rows, n_cols = m.shape
        r = min(n_rows, n_cols, state.rank)
        if (n_rows + n_cols) * r * state.min_compression_rate < n_rows * n_cols:
            compress[m.shape].append(m)
        else:
            rest.append(g)
    return [m for group in compress.values() for m in group], rest


def powersgd_hook(state: PowerSGDState, bucket) -> torch.futures.Future[torch.Tensor]:
    buffer, index = bucket.buffer(), bucket.index()
    if state.iter < state.start_iter:                     # the first steps: uncompressed
        if bucket.is_last():
            state.iter += 1
        return done(_mean_(buffer, state.group))
    if state.error_feedback:
        if index in state.error:
            buffer.add_(state.error[index])
        before = buffer.clone()
    matrices, rest = _matrices(bucket, state)
    all_reduce_mean_(rest, group=state.group)             # small tensors (biases, LayerNorms) go whole
    if matrices:
        if not state.warm_start or index not in state.qs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(state.rng.randint(1_000_000_000))
                state.qs[index] = [torch.randn(m.shape[1], min(*m.shape, state.rank), dtype=m.dtype).to(m.device)
                                   for m in matrices]
        qs = [orthonormalize(q) for q in state.qs[index]]
        ps = [m @ q for m, q in zip(matrices, qs)]
        flat_p = torch.cat([p.reshape(-1) for p in ps])
        comm.all_reduce(flat_p, group=state.group)                       # Σ P (no division: it is normalised)
        ps = [orthonormalize(p) for p in _split(flat_p, ps)]
        qs = [m.T @ p for m, p in zip(matrices, ps)]
        flat_q = _mean_(torch.cat([q.reshape(-1) for q in qs]), state.group)
        qs = _split(flat_q, qs)
        for m, p, q in zip(matrices, ps, qs):
            m.copy_(p @ q.T)                                             # the rank-r average
        state.qs[index] = qs
    if state.error_feedback:
        state.error[index] = before - buffer
    if bucket.is_last():
        state.iter += 1
    return done(buffer)


def _split(flat: torch.Tensor, like: list) -> list:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view_as(t).clone())
        offset += t.numel()
    return out
