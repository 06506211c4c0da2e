"""Tensor parallelism, Megatron-LM style (Shoeybi et al., 2019): every weight matrix cut across ranks.

A linear layer Y = X Wᵀ (W of shape (out, in)) can be split two ways over tp ranks:

    column-parallel   W = [W_0; W_1; …] by output rows     Y_r = X W_rᵀ          each rank: some outputs
    row-parallel      W = [W_0, W_1, …] by input columns   Y = Σ_r X_r W_rᵀ      each rank: a partial sum

Chained, column then row, the outputs of the first layer are exactly the inputs the second needs, so
the two only talk at the ends: an MLP or an attention layer costs one all-reduce in forward and one
in backward. Two conjugate operators put that communication in the graph:

    f = copy_to_tensor_parallel       forward: identity      backward: all-reduce (sum) the gradient
    g = reduce_from_tensor_parallel   forward: all-reduce    backward: identity

    MLP:        x ─f─▶ [X W_fc,rᵀ → GELU → · W_proj,rᵀ] ─g─▶ y          (rank r's slice in brackets)
    attention:  x ─f─▶ [this rank's heads → · W_proj,rᵀ] ─g─▶ y

Why f's backward sums: x feeds every rank's slice, so dL/dx = Σ_r (the slice's contribution). Why g's
backward is the identity: y = Σ_r y_r, so dL/dy_r = dL/dy, which every rank already holds.

Every rank must run the same computation outside the parallel layers (same input batch, same seed):
LayerNorms, embeddings and the loss are replicated, and their gradients come out equal everywhere.
``count_communication()`` records every collective that f, g and the gather make. Attention, a whole
GPT and the data × tensor grid are built from these pieces in :mod:`labkit.tensor_parallel_gpt`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
import torch.nn.functional as F
from torch import nn

from labkit import comm

__all__ = ["CopyToParallel", "ReduceFromParallel", "GatherFromParallel", "copy_to_tensor_parallel",
           "reduce_from_tensor_parallel", "gather_from_tensor_parallel", "shard_rows", "shard_columns",
           "ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "Communication", "count_communication"]


def _rank_and_size(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1          # one process without a process group: nothing to split, nothing to send
    return dist.get_rank(group), dist.get_world_size(group)


# --- the communication log ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Communication:
    """One collective made by f, g or the gather, as seen by this rank (read from labkit.comm's events,
    which f, g and the gather label "f backward", "g forward", "gather forward").
    op: "f", "g" or "gather"; collective: "all_reduce" or "all_gather"; phase: "forward" or
    "backward"; numel, nbytes: the size of the tensor this rank hands to the collective (an
    all-gather brings back tp times as much)."""
    op: str
    collective: str
    phase: str
    numel: int
    nbytes: int


@contextmanager
def count_communication():
    """``with count_communication() as log:`` run forward and backward inside; ``log`` is then the list
    of :class:`Communication`, in order (filled when the block ends). A group of one process
    communicates nothing, so logs nothing."""
    log: list = []
    with comm.record() as events:
        yield log
    for e in events:
        op, _, phase = e.label.partition(" ")
        if op in ("f", "g", "gather"):
            log.append(Communication(op, e.op, phase, e.numel, e.bytes))


# --- the collectives, and f, g and gather as autograd functions ---------------------------------------

def _all_reduce(x: torch.Tensor, group, op: str, phase: str) -> torch.Tensor:
    """The sum of x over the group, in a new tensor: x itself may still be needed by autograd."""
    if _rank_and_size(group)[1] == 1:
        return x
    total = x.clone(memory_format=torch.contiguous_format)     # gloo wants contiguous tensors
    with comm.label(f"{op} {phase}"):
        comm.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def _my_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's 1/tp of x along dim."""
    rank, size = _rank_and_size(group)
    if x.size(dim) % size:
        raise ValueError(f"size {x.size(dim)} of dimension {dim} is not divisible by the group size {size}")
    step = x.size(dim) // size
    return x.narrow(dim, rank * step, step)


class CopyToParallel(torch.autograd.Function):
    """f: forward the identity; backward all-reduce (sum) the gradient over ``group``. Called as
    ``CopyToParallel.apply(x, group)`` (exercise 5a, 5b)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x                                  # every rank already holds x: nothing to send

    @staticmethod
    def backward(ctx, grad):
        # each rank's slice used x, so the gradient of x is the sum of every rank's contribution
        return _all_reduce(grad, ctx.group, "f", "backward"), None


class ReduceFromParallel(torch.autograd.Function):
    """g: forward all-reduce (sum) over ``group``; backward the identity (exercise 5c, 5d)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group, "g", "forward")     # y = Σ_r y_r

    @staticmethod
    def backward(ctx, grad):
        return grad, None                         # dL/dy_r = dL/dy, already on every rank


class GatherFromParallel(torch.autograd.Function):
    """Forward: all-gather the ranks' slices along the last dimension, in rank order; backward: keep
    this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        rank, size = _rank_and_size(group)
        if size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        with comm.label("gather forward"):
            comm.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        # what follows the gather is replicated, so every rank holds the same dL/dy: keep our slice
        return _my_slice(grad, -1, ctx.group).contiguous(), None


def copy_to_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """f: forward the identity; backward all-reduce (sum) the gradient over ``group`` (default: world)."""
    return CopyToParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """g: forward all-reduce (sum) over ``group``; backward the identity."""
    return ReduceFromParallel.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Forward: all-gather the ranks' slices and concatenate them along the last dimension, in rank
    order; backward: keep this rank's slice of the gradient."""
    return GatherFromParallel.apply(x, group)


# --- which part of a dense weight a rank keeps ----------------------------------------------------------

def shard_rows(tensor: torch.Tensor, rank: int, size: int, parts: int = 1) -> torch.Tensor:
    """Rows [rank·n/size, (rank+1)·n/size) of a (n, ...) tensor: a column-parallel layer's part of a
    dense weight (out, in) or bias (out,). ``parts``: the tensor is that many stacked matrices (q, k, v),
    each cut separately; the rank's rows of each are stacked in the same order."""
    stacked = tensor.unflatten(0, (parts, -1))                   # (parts, n/parts, ...)
    step = stacked.size(1) // size
    return stacked[:, rank * step:(rank + 1) * step].flatten(0, 1)


def shard_columns(weight: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Columns [rank·in/size, (rank+1)·in/size) of a dense (out, in) weight: a row-parallel layer's part."""
    step = weight.size(1) // size
    return weight[:, rank * step:(rank + 1) * step]


# --- the two parallel linear layers ---------------------------------------------------------------------

def _check_dense(layer: str, linear) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{layer} cuts a dense nn.Linear, got {type(linear).__name__}")


def _check_divisible(name: str, value: int, by: int, what: str) -> None:
    if value % by:
        raise ValueError(f"{name}={value} is not divisible by {what}={by}: each rank needs an equal slice")


class _ParallelLinear(nn.Module):
    """What both layers share: built from a dense ``nn.Linear`` that every rank holds (the same seed:
    Megatron's "master weight"), each rank keeps its :meth:`shard` of the weight, and of the bias where
    the bias is cut. Its outputs then equal the dense layer's."""

    shards_bias = True

    def __init__(self, linear: nn.Linear, group: ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.rank, self.tp = _rank_and_size(group)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.weight = nn.Parameter(self.shard(linear.weight).clone())
            self.bias = None
            if linear.bias is not None:
                bias = self.shard(linear.bias) if self.shards_bias else linear.bias
                self.bias = nn.Parameter(bias.clone())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank {self.rank} of {self.tp}, "
                f"weight shard {tuple(self.weight.shape)}")


class ColumnParallelLinear(_ParallelLinear):
    """Y_r = f(X) W_rᵀ + b_r: rank r keeps rows [r·out/tp, (r+1)·out/tp) of the dense W (its shard has
    shape (out/tp, in)) and that slice of the bias, and computes those output features. Communication:
    f's all-reduce of dL/dX (B·T·in numbers) in backward; with ``gather_output=True`` also an
    all-gather of Y in forward. Exercise 5 writes :meth:`shard` and :meth:`forward`.

    ``parts``: W is that many matrices stacked (attention's c_attn: q, k and v, so 3); each is cut
    separately and this rank keeps its slice of every one, stacked in the same order."""

    def __init__(self, linear: nn.Linear, group: ProcessGroup | None = None, gather_output: bool = False,
                 parts: int = 1):
        _check_dense(type(self).__name__, linear)
        tp = _rank_and_size(group)[1]
        _check_divisible("out_features", linear.out_features, tp * parts,
                         "the group size" if parts == 1 else f"parts × group size ({parts} × {tp})")
        if gather_output and parts > 1:
            raise ValueError("gather_output=True with parts > 1 would interleave the parts: gather each "
                             "part yourself")
        self.gather_output, self.parts = gather_output, parts
        super().__init__(linear, group)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a dense (out, in) weight or (out,) bias, or of their gradients."""
        return shard_rows(tensor, self.rank, self.tp, self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(CopyToParallel.apply(x, self.group), self.weight, self.bias)
        return GatherFromParallel.apply(y, self.group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """Y = g(X_r W_rᵀ) + b: rank r keeps columns [r·in/tp, (r+1)·in/tp) of the dense W (shape
    (out, in/tp)) and takes X_r, its slice of the input's last dimension (what a ColumnParallelLinear
    outputs). The partial products are summed by g's all-reduce (B·T·out numbers) in forward. The bias
    is whole on every rank and added once, after the sum; its gradient is then the same on every rank.
    Exercise 5 writes :meth:`shard` and :meth:`forward`."""

    shards_bias = False

    def __init__(self, linear: nn.Linear, group: ProcessGroup | None = None):
        _check_dense(type(self).__name__, linear)
        _check_divisible("in_features", linear.in_features, _rank_and_size(group)[1], "the group size")
        super().__init__(linear, group)

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a dense (out, in) weight; a (out,) bias is replicated: all of it."""
        return shard_columns(tensor, self.rank, self.tp) if tensor.dim() == 2 else tensor

    def forward(self, x_r: torch.Tensor) -> torch.Tensor:
        y = ReduceFromParallel.apply(F.linear(x_r, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


# --- the GPT's blocks, cut across ranks ---------------------------------------------------------------

class ParallelMLP(nn.Module):
    """labkit.models.gpt.MLP with c_fc column-parallel and c_proj row-parallel: GELU works element by
    element, so each rank applies it to its own 4C/tp hidden features. One all-reduce forward (g,
    after c_proj), one backward (f, before c_fc), each of B·T·C numbers."""

    def __init__(self, c_fc: ColumnParallelLinear, c_proj: RowParallelLinear, dropout: float = 0.0):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = c_fc, nn.GELU(), c_proj
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_dense(cls, mlp, group: ProcessGroup | None = None) -> "ParallelMLP":
        return cls(ColumnParallelLinear(mlp.c_fc, group), RowParallelLinear(mlp.c_proj, group), mlp.dropout.p)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
