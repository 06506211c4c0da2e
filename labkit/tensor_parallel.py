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
import torch.nn.functional as F
from torch import nn

from labkit import comm

__all__ = ["copy_to_tensor_parallel", "reduce_from_tensor_parallel", "gather_from_tensor_parallel",
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
    """One collective made by f, g or the gather, as seen by this rank.
    op: "f", "g" or "gather"; collective: "all_reduce" or "all_gather"; phase: "forward" or
    "backward"; numel, nbytes: the size of the tensor this rank hands to the collective (an
    all-gather brings back tp times as much)."""
    op: str
    collective: str
    phase: str
    numel: int
    nbytes: int


_log: list | None = None     # the list of the innermost count_communication(), else None


@contextmanager
def count_communication():
    """``with count_communication() as log:`` run forward and backward inside; ``log`` is then the list
    of :class:`Communication`, in order. A group of one process communicates nothing, so logs nothing."""
    global _log
    outer, _log = _log, []
    try:
        yield _log
    finally:
        _log = outer


def _record(op: str, collective: str, phase: str, t: torch.Tensor) -> None:
    if _log is not None:
        _log.append(Communication(op, collective, phase, t.numel(), comm.nbytes(t)))


# --- the collectives, and f, g and gather as autograd functions ---------------------------------------

def _all_reduce(x: torch.Tensor, group, op: str, phase: str) -> torch.Tensor:
    """The sum of x over the group, in a new tensor: x itself may still be needed by autograd."""
    if _rank_and_size(group)[1] == 1:
        return x
    total = x.clone(memory_format=torch.contiguous_format)     # gloo wants contiguous tensors
    comm.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    _record(op, "all_reduce", phase, total)
    return total


def _my_slice(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's 1/tp of x along dim."""
    rank, size = _rank_and_size(group)
    if x.size(dim) % size:
        raise ValueError(f"size {x.size(dim)} of dimension {dim} is not divisible by the group size {size}")
    step = x.size(dim) // size
    return x.narrow(dim, rank * step, step)


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x                                  # every rank already holds x: nothing to send

    @staticmethod
    def backward(ctx, grad):
        # each rank's slice used x, so the gradient of x is the sum of every rank's contribution
        return _all_reduce(grad, ctx.group, "f", "backward"), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group, "g", "forward")     # y = Σ_r y_r

    @staticmethod
    def backward(ctx, grad):
        return grad, None                         # dL/dy_r = dL/dy, already on every rank


class _GatherFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        rank, size = _rank_and_size(group)
        if size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        comm.all_gather(parts, x, group=group)
        _record("gather", "all_gather", "forward", x)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        # what follows the gather is replicated, so every rank holds the same dL/dy: keep our slice
        return _my_slice(grad, -1, ctx.group).contiguous(), None


def copy_to_tensor_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """f: forward the identity; backward all-reduce (sum) the gradient over ``group`` (default: world)."""
    return _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """g: forward all-reduce (sum) over ``group``; backward the identity."""
    return _ReduceFromTensorParallel.apply(x, group)


def gather_from_tensor_parallel(x: torch.Tensor, group=None) -> torch.Tensor:
    """Forward: all-gather the ranks' slices and concatenate them along the last dimension, in rank
    order; backward: keep this rank's slice of the gradient."""
    return _GatherFromTensorParallel.apply(x, group)


# --- the two parallel linear layers ---------------------------------------------------------------------

class _ParallelLinear(nn.Module):
    """What both layers share: the shapes, nn.Linear's initialisation, and loading a dense layer."""

    def __init__(self, in_features, out_features, group, weight_shape, bias_size, device, dtype):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.rank, self.tp_size = _rank_and_size(group)
        self.weight = nn.Parameter(torch.empty(weight_shape, device=device, dtype=dtype))
        self.bias = None
        if bias_size is not None:
            self.bias = nn.Parameter(torch.empty(bias_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of the whole dense layer, then keep this rank's shard (Megatron's
        "master weight"): with the same seed on every rank, the shards form exactly one dense layer."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        self.load_dense(dense)

    @torch.no_grad()
    def load_dense(self, linear: nn.Linear) -> None:
        """Copy this rank's shard of a dense nn.Linear (the same on every rank) into this layer."""
        self.weight.copy_(self.dense_shard(linear.weight))
        if self.bias is not None:
            self.bias.copy_(self.dense_shard(linear.bias))

    @classmethod
    def from_dense(cls, linear: nn.Linear, group=None, **kwargs):
        """This rank's shard of ``linear``: its outputs equal the dense layer's (``kwargs``: the
        layer's own options, e.g. ``gather_output``)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, **kwargs,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.load_dense(linear)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank {self.rank} of {self.tp_size}, "
                f"weight shard {tuple(self.weight.shape)}")


def _check_divisible(name: str, value: int, by: int, what: str) -> None:
    if value % by:
        raise ValueError(f"{name}={value} is not divisible by {what}={by}: each rank needs an equal slice")


class ColumnParallelLinear(_ParallelLinear):
    """Y = f(X) W_rᵀ + b_r: rank r holds rows [r·out/tp, (r+1)·out/tp) of W (shape (out/tp, in)) and
    that slice of the bias, and computes those output features. Communication: f's all-reduce of
    dL/dX (B·T·in numbers) in backward; with ``gather_output=True`` also an all-gather of Y in forward.

    ``parts``: W is that many matrices stacked (attention's c_attn: q, k and v, so 3); each is split
    separately and this rank holds its slice of every one, stacked in the same order."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None,
                 gather_output: bool = False, parts: int = 1, *, device=None, dtype=None):
        _, tp = _rank_and_size(group)
        _check_divisible("out_features", out_features, tp * parts,
                         "the group size" if parts == 1 else f"parts × group size ({parts} × {tp})")
        if gather_output and parts > 1:
            raise ValueError("gather_output=True with parts > 1 would interleave the parts: gather each "
                             "part yourself")
        super().__init__(in_features, out_features, group, (out_features // tp, in_features),
                         out_features // tp if bias else None, device, dtype)
        self.gather_output, self.parts = gather_output, parts
        self.reset_parameters()

    def dense_shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a dense (out, in) weight or (out,) bias, or of their gradients."""
        stacked = tensor.unflatten(0, (self.parts, -1))          # (parts, out/parts, ...)
        return _my_slice(stacked, 1, self.group).flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tensor_parallel(x, self.group), self.weight, self.bias)
        return gather_from_tensor_parallel(y, self.group) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """Y = g(X_r W_rᵀ) + b: rank r holds columns [r·in/tp, (r+1)·in/tp) of W (shape (out, in/tp)) and
    takes X_r, its slice of the input's last dimension (what a ColumnParallelLinear outputs). The
    partial products are summed by g's all-reduce (B·T·out numbers) in forward. The bias is whole on
    every rank and added once, after the sum; its gradient is then the same on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group=None, *,
                 device=None, dtype=None):
        _, tp = _rank_and_size(group)
        _check_divisible("in_features", in_features, tp, "the group size")
        super().__init__(in_features, out_features, group, (out_features, in_features // tp),
                         out_features if bias else None, device, dtype)
        self.reset_parameters()

    def dense_shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a dense (out, in) weight; a (out,) bias is replicated: all of it."""
        return _my_slice(tensor, 1, self.group) if tensor.dim() == 2 else tensor

    def forward(self, x_r: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tensor_parallel(F.linear(x_r, self.weight), self.group)
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
    def from_dense(cls, mlp, group=None) -> "ParallelMLP":
        return cls(ColumnParallelLinear.from_dense(mlp.c_fc, group),
                   RowParallelLinear.from_dense(mlp.c_proj, group), mlp.dropout.p)

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
        _check_divisible("n_head", n_head, c_attn.tp_size, "the group size")
        self.n_head = n_head // c_attn.tp_size            # this rank's heads
        self.head_size = c_attn.in_features // n_head
        self.c_attn, self.c_proj, self.flash = c_attn, c_proj, flash
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.register_buffer("mask", mask, persistent=False)

    @classmethod
    def from_dense(cls, attn, group=None) -> "ParallelSelfAttention":
        _check_divisible("n_head", attn.n_head, _rank_and_size(group)[1], "the group size")
        return cls(ColumnParallelLinear.from_dense(attn.c_attn, group, parts=3),
                   RowParallelLinear.from_dense(attn.c_proj, group), attn.n_head, attn.mask.clone(),
                   attn.flash, attn.attn_dropout.p)

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
    def from_dense(cls, block, group=None) -> "ParallelBlock":
        return cls(copy.deepcopy(block.ln_1), ParallelSelfAttention.from_dense(block.attn, group),
                   copy.deepcopy(block.ln_2), ParallelMLP.from_dense(block.mlp, group))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


def tensor_parallel_gpt(model: nn.Module, group=None) -> nn.Module:
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
                shards[full] = module.dense_shard(tensor) if isinstance(module, _ParallelLinear) else tensor
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
