"""ZeRO stages 1 and 2 from scratch (Rajbhandari et al. 2020): data parallelism whose optimizer state, and then
gradients, are split over the N ranks instead of copied on each.

DDP keeps on every rank the whole model state: parameters, gradients and, for Adam, m and v. Only the
parameters are needed whole (for the forward and backward); the optimizer state and the averaged gradients are
needed only where a parameter is updated. So split the update:

    the parameters, bucket by bucket (labkit.ddp.plan_buckets), are laid end to end in a flat vector of P
    numbers, padded to N·c (c = ⌈P/N⌉); rank r owns the chunk [r·c, (r+1)·c) of every bucket

    1. reduce-scatter each bucket's gradients: rank r receives the sum of its chunk (and divides by N: the mean)
    2. the optimizer updates rank r's chunk only, from a master copy of it: Adam's m and v exist for 1/N of Ψ
    3. all-gather the chunks: every rank has every updated parameter again

A reduce-scatter and an all-gather are the two halves of a ring all-reduce (lesson 2): each rank sends
2(N−1)/N·Ψ numbers per step, exactly what DDP's all-reduce sends. Memory is what changes:

    stage 1   optimizer state (and master copy) sharded, the gradients whole (the backward writes p.grad)
    stage 2   the gradients sharded too: as soon as a bucket's gradients are ready in the backward, they are
              copied into the bucket, freed (p.grad = None) and reduce-scattered; only the chunk is kept

The optimizer sees one flat tensor per bucket: correct for elementwise optimizers (SGD, Adam, AdamW), not for
LAMB or LARS, whose per-tensor norms need the whole tensors (exercise 4c shows how to get them).
Stage 3 (the parameters sharded too: FSDP) gathers a unit's parameters before its forward and backward.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from labkit import comm
from labkit.ddp import plan_buckets

__all__ = ["ZeroOptimizer", "ZeroBucket", "bytes_sent_per_step"]


def bytes_sent_per_step(num_params: float, world_size: int, stage: int, dtype_bytes: int = 2) -> float:
    """The bytes each rank sends per step, data parallel with ZeRO stage 0..3, its collectives costed as a ring's
    (lesson 2); ``dtype_bytes``: of the gradients and parameters sent (2 under 16-bit mixed precision). Stages 0–2:
    2Ψ(N−1)/N (an all-reduce of the gradients, or its two halves: a reduce-scatter of the gradients and an all-gather
    of the updated parameters); stage 3: 3Ψ(N−1)/N (the parameters all-gathered for the forward and again for the
    backward, the gradients reduce-scattered)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be a ZeRO stage 0..3, got {stage}")
    return (3 if stage == 3 else 2) * num_params * (world_size - 1) / world_size * dtype_bytes


@dataclass(eq=False)
class ZeroBucket:
    """Parameters whose gradients are reduce-scattered together; rank r owns chunk r of their flat vector."""
    params: list
    offsets: list                                   # where each parameter starts in the flat vector
    numel: int                                      # P, before the padding
    chunk: int                                      # c = ⌈P/N⌉
    master: nn.Parameter                            # this rank's chunk: what the optimizer updates (shard())
    grads: torch.Tensor | None = None               # stage 2: the bucket's gradients while they are collected
    ready: int = 0
    work: object = None                             # the reduce-scatter in flight

    def flat(self, tensors: Iterable[torch.Tensor], world_size: int) -> torch.Tensor:
        """The tensors (one per parameter) laid end to end and padded with zeros to N·c numbers."""
        tensors = list(tensors)
        out = tensors[0].new_zeros(world_size * self.chunk)
        for t, offset in zip(tensors, self.offsets):
            out[offset:offset + t.numel()].copy_(t.reshape(-1))
        return out


class ZeroOptimizer:
    """Wrap an optimizer factory so that each rank keeps and updates 1/N of the model state.

        opt = ZeroOptimizer(model.parameters(), lambda params: torch.optim.AdamW(params, lr=1e-3), stage=2)
        loss.backward(); opt.step(); opt.zero_grad()

    Every rank must start from the same parameters (broadcast them first, as DDP does)."""

    def __init__(self, params: Iterable[nn.Parameter], make_optimizer: Callable[[list], torch.optim.Optimizer], *,
                 stage: int = 1, bucket_cap_mb: float = 25.0, group: dist.ProcessGroup | None = None):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (stage 3 shards the parameters: FSDP), got {stage}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("ZeroOptimizer got no parameters that require a gradient")
        self.stage, self.group = stage, group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.buckets = [self._bucket(ps) for ps in plan_buckets(reversed(self.params), int(bucket_cap_mb * 2 ** 20))]
        self.optimizer = make_optimizer([b.master for b in self.buckets])
        self.next_to_launch = 0
        self._hooks = []
        if stage == 2:
            self._where = {p: (b, i) for b in self.buckets for i, p in enumerate(b.params)}
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]

    def _bucket(self, params: list) -> ZeroBucket:
        offsets = list(itertools.accumulate((p.numel() for p in params), initial=0))
        numel = offsets[-1]
        bucket = ZeroBucket(params, offsets[:-1], numel, -(-numel // self.world_size), master=None)
        with torch.no_grad():
            bucket.master = nn.Parameter(self.shard(bucket))
        return bucket

    def shard(self, bucket: ZeroBucket) -> torch.Tensor:
        """This rank's chunk of the bucket's parameters (a new tensor of c numbers): what it keeps and updates.
        Rank r owns chunk r, because that is the chunk a reduce-scatter hands it; the last chunks may be padding."""
        flat = bucket.flat((p.detach() for p in bucket.params), self.world_size)
        start = self.rank * bucket.chunk
        return flat[start:start + bucket.chunk].clone()

    # --- stage 2: reduce-scatter during the backward, keep only the chunk ---------------------------------------

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        bucket, index = self._where[param]
        if bucket.grads is None:
            bucket.grads = bucket.master.new_zeros(self.world_size * bucket.chunk)
        offset = bucket.offsets[index]
        bucket.grads[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        param.grad = None                                    # the whole gradient is not kept: that is stage 2
        bucket.ready += 1
        # launch in bucket order on every rank: the k-th reduce-scatter of every rank is the same bucket
        while (self.next_to_launch < len(self.buckets)
               and self.buckets[self.next_to_launch].ready == len(self.buckets[self.next_to_launch].params)):
            self._launch(self.next_to_launch, self.buckets[self.next_to_launch].grads)
            self.next_to_launch += 1

    def _launch(self, index: int, flat_grads: torch.Tensor) -> None:
        bucket = self.buckets[index]
        if bucket.master.grad is None:
            bucket.master.grad = torch.zeros_like(bucket.master)
        flat_grads.div_(self.world_size)                     # the mean: divide, then sum
        with comm.label(f"bucket {index}"):
            bucket.work = comm.reduce_scatter_tensor(bucket.master.grad, flat_grads, group=self.group,
                                                     async_op=True)

    # --- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        if self.stage == 1:
            for index, bucket in enumerate(self.buckets):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
                self._launch(index, bucket.flat(grads, self.world_size))
        elif self.next_to_launch != len(self.buckets):
            raise RuntimeError(f"step() after a backward that readied {self.next_to_launch} of {len(self.buckets)} "
                               f"buckets: every parameter must get a gradient (stage 2 reduces as they arrive)")
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.grads, bucket.ready, bucket.work = None, 0, None
        self.next_to_launch = 0
        self.optimizer.step()                                # on this rank's chunks only
        for index in range(len(self.buckets)):
            self._gather(index)

    def _gather(self, index: int) -> None:
        """All-gather bucket ``index``'s updated chunks and copy them into the parameters."""
        bucket = self.buckets[index]
        gathered = bucket.master.new_empty(self.world_size * bucket.chunk)
        with comm.label(f"bucket {index}"):
            comm.all_gather_into_tensor(gathered, bucket.master.detach(), group=self.group)
        for p, offset in zip(bucket.params, bucket.offsets):
            p.copy_(gathered[offset:offset + p.numel()].view_as(p))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        for bucket in self.buckets:
            bucket.master.grad = None

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank keeps (its chunks' m, v, ...), the master chunks included."""
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
        return state + sum(b.master.numel() * b.master.element_size() for b in self.buckets)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
