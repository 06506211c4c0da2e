"""Naive model parallelism: a model too big for one device, cut into consecutive layers, one stage per rank.

    rank 0: layers [0, a)   ─activation─▶   rank 1: layers [a, b)   ─activation─▶ … ▶ rank p−1: … → loss
           ◀─dL/d(input)──                         ◀─dL/d(input)──                 ◀─ backward starts here

Forward, rank r receives its input from rank r−1 (rank 0 reads the batch), runs its layers and sends
its output to rank r+1; the last rank computes the loss. Backward runs the chain in reverse: rank r
receives dL/d(its output) from rank r+1, backpropagates through its layers (which fills its own
parameters' .grad) and sends dL/d(its input) to rank r−1. Only activations and their gradients
travel, B·width numbers per boundary and direction; the weights never move.

The price: at any moment one rank computes and the others wait. With p equal stages each rank is
busy 1/p of the step and idle (p−1)/p of it, which :func:`train_step`'s timeline shows and
:func:`busy_fractions` measures. Pipeline parallelism (GPipe, 1F1B) fills those gaps with micro-batches.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from labkit import comm
from labkit.timeline import Event, busy_fraction

__all__ = ["partition", "stage_module", "train_step", "Event", "busy_fraction", "busy_fractions"]


# --- cutting the model ------------------------------------------------------------------------------------

def partition(layers: int | Sequence[float], stages: int) -> list[range]:
    """Cut layers 0 … n−1 into ``stages`` contiguous, non-empty ranges, as balanced as possible.

    ``layers``: the number of layers (each costs 1) or a list of per-layer costs (time, FLOPs,
    parameters: whatever should be balanced). The rule: minimise the cost of the most expensive
    stage, because every other stage ends up waiting for it; among the cuts that do, earlier stages
    take as many layers as they can. With equal costs that gives numpy.array_split's sizes: the first
    n mod stages stages have one layer more. Solved exactly by dynamic programming over the cut points.
    """
    costs = [1.0] * layers if isinstance(layers, int) else [float(c) for c in layers]
    n = len(costs)
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    if any(c < 0 for c in costs):
        raise ValueError("layer costs must not be negative")
    if stages > n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages: each stage needs at least one layer")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @lru_cache(maxsize=None)
    def best(first: int, k: int) -> tuple[float, int]:
        """(the smallest bottleneck for layers first … n−1 in k stages, where the first stage ends)."""
        if k == 1:
            return prefix[n] - prefix[first], n
        options = [(max(prefix[end] - prefix[first], best(end, k - 1)[0]), -end)
                   for end in range(first + 1, n - k + 2)]       # leave one layer for each later stage
        bottleneck, neg_end = min(options)                        # ties: the larger end
        return bottleneck, -neg_end

    ranges, first = [], 0
    for k in range(stages, 0, -1):
        end = best(first, k)[1]
        ranges.append(range(first, end))
        first = end
    return ranges


def stage_module(sequential: nn.Sequential, rank: int, stages: int,
                 costs: Sequence[float] | None = None) -> nn.Sequential:
    """Rank ``rank``'s stage: its slice of ``sequential`` as cut by :func:`partition` (by layer count,
    or by ``costs``). The layers are shared, not copied, and keep their names ("3.weight", …)."""
    if costs is not None and len(costs) != len(sequential):
        raise ValueError(f"{len(costs)} costs for {len(sequential)} layers")
    if not 0 <= rank < stages:
        raise ValueError(f"rank {rank} is not one of the {stages} stages")
    layers = partition(len(sequential) if costs is None else costs, stages)[rank]
    return sequential[layers.start:layers.stop]


# --- sending activations -----------------------------------------------------------------------------------

def send_tensor(t: torch.Tensor, dst: int) -> None:
    """Send a tensor whose shape the receiver does not know: first its number of dimensions, then its
    shape, then the data. Three messages; the first two are tiny. (Megatron's pipeline sends shapes the
    same way when they can change; when every stage's input shape is known in advance, one message is
    enough.)"""
    comm.send(comm.on(torch.tensor([t.dim()])), dst)
    comm.send(comm.on(torch.tensor(t.shape)), dst)
    comm.send(t.contiguous(), dst)


def recv_tensor(src: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Receive what :func:`send_tensor` sent: the header tells how much memory the data needs."""
    ndim = torch.empty(1, dtype=torch.long, device=comm.device())
    comm.recv(ndim, src)
    shape = torch.empty(int(ndim), dtype=torch.long, device=comm.device())
    comm.recv(shape, src)
    t = torch.empty(shape.tolist(), dtype=dtype, device=device)
    comm.recv(t, src)
    return t


# --- one training step, with its timeline ----------------------------------------------------------------
# Each rank records labkit.timeline.Event intervals, in seconds of time.perf_counter() (a clock all the
# processes of a machine share), of the kinds "forward" (the last rank's includes the loss), "backward",
# "send", and "recv" (mostly waiting for the neighbour to finish).

@contextmanager
def _timed(timeline: list, kind: str):
    start = time.perf_counter()
    yield
    timeline.append(Event(kind, start, time.perf_counter(), rank=dist.get_rank()))


def train_step(stage: nn.Module, inputs: torch.Tensor | None, target: torch.Tensor | None,
               loss_fn) -> tuple[torch.Tensor | None, list[Event]]:
    """One forward and backward through the stages, one per rank of the world, in rank order.

    Rank 0 passes the batch as ``inputs``, the last rank passes ``target`` (the others pass None);
    the last rank computes ``loss_fn(output, target)``. Afterwards each rank's parameters hold their
    gradients (call ``optimizer.step()`` on each rank). Returns (the loss on the last rank, else None;
    this rank's timeline). Activations arrive in the dtype and on the device of the stage's parameters
    (a stage without parameters: the default dtype, on the CPU).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    first, last = rank == 0, rank == world - 1
    if first and inputs is None:
        raise ValueError("rank 0 reads the batch: pass it as inputs")
    if last and target is None:
        raise ValueError(f"rank {rank}, the last stage, computes the loss: pass the target")
    like = next(stage.parameters(), torch.empty(0))
    timeline: list[Event] = []

    # forward: receive (rank 0: read the batch) → compute → send
    if first:
        x = inputs
    else:
        with _timed(timeline, "recv"):
            x = recv_tensor(rank - 1, like.dtype, like.device)
        x.requires_grad_()               # so that backward computes dL/dx, which rank − 1 needs
    with _timed(timeline, "forward"):
        out = stage(x)
        loss = loss_fn(out, target) if last else None
    if not last:
        with _timed(timeline, "send"):
            send_tensor(out.detach(), rank + 1)

    # backward: receive dL/d(output) (the last rank: start from the loss) → backprop → send dL/d(input)
    if last:
        with _timed(timeline, "backward"):
            loss.backward()
    else:
        grad_out = torch.empty_like(out)  # dL/d(output) has the output's shape: no header needed
        with _timed(timeline, "recv"):
            comm.recv(grad_out, rank + 1)
        with _timed(timeline, "backward"):
            torch.autograd.backward(out, grad_out)
    if not first:
        with _timed(timeline, "send"):
            comm.send(x.grad, rank - 1)
    return (loss.detach() if last else None), timeline


# --- who was busy -------------------------------------------------------------------------------------------

def busy_fractions(timelines: Sequence[Sequence[Event]]) -> list[float]:
    """Each rank's busy fraction (:func:`labkit.timeline.busy_fraction`: the share of the step spent in
    forward and backward) over the whole step: from the first event on any rank to the last.
    With p equal stages and free communication, each is 1/p: the idle fraction is (p − 1)/p."""
    start = min(e.start for t in timelines for e in t)
    end = max(e.end for t in timelines for e in t)
    return [busy_fraction(t, start, end) for t in timelines]
