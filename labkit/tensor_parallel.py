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
``count_communication()`` records every collective that f, g and the gather make.
"""

from __future__ import annotations

import copy
import math
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
           "ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "ParallelSelfAttention",
           "ParallelBlock", "tensor_parallel_gpt", "shard_like", "Communication", "count_communication",
           "grid_groups"]


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


class ParallelSelfAttention(nn.Module):
    """labkit.models.gpt.CausalSelfAttention with the heads split across ranks: heads never look at
    each other, so rank r computes n_head/tp of them start to end. c_attn is column-parallel with
    parts=3 (it stacks the q, k and v projections: rank r takes its heads' rows of each), c_proj
    row-parallel (its input columns are the heads, side by side). Communication as in ParallelMLP."""

    def __init__(self, c_attn: ColumnParallelLinear, c_proj: RowParallelLinear, n_head: int,
                 mask: torch.Tensor, flash: bool = False, dropout: float = 0.0):
        super().__init__()
        _check_divisible("n_head", n_head, c_attn.tp, "the group size")
        self.n_head = n_head // c_attn.tp                 # this rank's heads
        self.head_size = c_attn.in_features // n_head
        self.c_attn, self.c_proj, self.flash = c_attn, c_proj, flash
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.register_buffer("mask", mask, persistent=False)

    @classmethod
    def from_dense(cls, attn, group: ProcessGroup | None = None) -> "ParallelSelfAttention":
        _check_divisible("n_head", attn.n_head, _rank_and_size(group)[1], "the group size")
        return cls(ColumnParallelLinear(attn.c_attn, group, parts=3), RowParallelLinear(attn.c_proj, group),
                   attn.n_head, attn.mask.clone(), attn.flash, attn.attn_dropout.p)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_head * self.head_size, dim=2)   # this rank's heads only
        q, k, v = (t.view(B, T, self.n_head, self.head_size).transpose(1, 2) for t in (q, k, v))
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.attn_dropout.p if self.training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
            y = self.attn_dropout(F.softmax(att, dim=-1)) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_size)
        return self.resid_dropout(self.c_proj(y))                    # g: the heads' partial sums


class ParallelBlock(nn.Module):
    """A GPT block with parallel attention and MLP; the LayerNorms are replicated (their input, the
    residual stream, is whole on every rank). Two all-reduces in forward, two in backward."""

    def __init__(self, ln_1: nn.LayerNorm, attn: ParallelSelfAttention, ln_2: nn.LayerNorm,
                 mlp: ParallelMLP):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    @classmethod
    def from_dense(cls, block, group: ProcessGroup | None = None) -> "ParallelBlock":
        return cls(copy.deepcopy(block.ln_1), ParallelSelfAttention.from_dense(block.attn, group),
                   copy.deepcopy(block.ln_2), ParallelMLP.from_dense(block.mlp, group))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def tensor_parallel_gpt(model: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """A copy of ``model`` (a labkit GPT, the same on every rank) whose blocks are cut across the ranks
    of ``group``; the embeddings, the final LayerNorm and the tied output layer stay whole on every
    rank. Loss and gradients equal the dense model's (compare them with :func:`shard_like`)."""
    parallel = copy.deepcopy(model)          # keeps the tie between wte and lm_head
    parallel.blocks = nn.ModuleList(ParallelBlock.from_dense(b, group) for b in model.blocks)
    return parallel


def shard_like(parallel_model: nn.Module, dense_tensors: dict) -> dict:
    """For each name of ``parallel_model.named_parameters()`` found in ``dense_tensors`` (a dense
    model's tensors by the same names, e.g. ``{n: p.grad for n, p in dense.named_parameters()}``):
    this rank's shard of it. Replicated parameters get the whole tensor."""
    shards = {}
    for module_name, module in parallel_model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if full in dense_tensors:
                tensor = dense_tensors[full]
                shards[full] = module.shard(tensor) if isinstance(module, _ParallelLinear) else tensor
    return shards


# --- 2-D parallelism: data parallel × tensor parallel -----------------------------------------------------

def grid_groups(data_parallel: int, tensor_parallel: int):
    """The (tp_group, dp_group) of the calling rank in a data_parallel × tensor_parallel grid.

    rank = dp_index · tensor_parallel + tp_index: the ranks of one tensor-parallel group are
    neighbours (Megatron puts them in one node, where the links are fastest: TP talks in every
    layer, DP once per step). On 4 ranks with (2, 2): TP groups {0, 1}, {2, 3}; DP groups {0, 2}, {1, 3}.

    ``dist.new_group`` must be called by every rank of the world, for every group, in the same order,
    even for the groups the rank is not in: so each rank creates all of them and keeps its own two.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if data_parallel * tensor_parallel != world:
        raise ValueError(f"data_parallel × tensor_parallel = {data_parallel} × {tensor_parallel} must equal "
                         f"the world size {world}")
    tp_group = dp_group = None
    for dp_index in range(data_parallel):
        ranks = [dp_index * tensor_parallel + tp_index for tp_index in range(tensor_parallel)]
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group = group
    for tp_index in range(tensor_parallel):
        ranks = [dp_index * tensor_parallel + tp_index for dp_index in range(data_parallel)]
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    return tp_group, dp_group
