"""Tensor parallelism for a whole GPT, built from :mod:`labkit.tensor_parallel`'s layers: attention split
by heads, the block, the model, and the grid of data × tensor parallel groups (lesson 5).

    attention:  x ─f─▶ [this rank's heads → · W_proj,rᵀ] ─g─▶ y          (rank r's slice in brackets)
    block:      x + attn(ln_1(x)), then + mlp(ln_2(x)): two all-reduces forward, two backward
    embedding:  idx ─▶ [rows of this rank's tokens, zeros for the others] ─g─▶ every token's row
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
import torch.nn.functional as F
from torch import nn

from labkit.ring import chunk_bounds
from labkit.tensor_parallel import (ColumnParallelLinear, ParallelMLP, ReduceFromParallel, RowParallelLinear,
                                    _check_divisible, _ParallelLinear, _rank_and_size)

__all__ = ["VocabParallelEmbedding", "ParallelSelfAttention", "ParallelBlock", "tensor_parallel_gpt", "shard_like",
           "grid_groups"]


class VocabParallelEmbedding(nn.Module):
    """A dense ``nn.Embedding`` (V, d) cut by vocabulary rows, as Megatron-LM cuts the token embedding: rank r keeps
    rows [start, end) = ``labkit.ring.chunk_bounds(V, tp)[r]`` (the first V mod tp ranks one row more; Megatron
    pads V to a multiple of tp instead). Every rank returns the whole embedding of every token (exercise 5i).

    A token's row is on one rank only: the others contribute zeros, and g sums. Backward, g is the identity and
    the lookup sends dL/dy[token] to the row it read: rank r's rows get exactly their tokens' gradient, no
    communication."""

    def __init__(self, embedding: nn.Embedding, group: ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.rank, self.tp = _rank_and_size(group)
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        if self.num_embeddings < self.tp:
            raise ValueError(f"num_embeddings={self.num_embeddings} is less than the group size={self.tp}: "
                             f"each rank needs at least one row")
        self.start, self.end = chunk_bounds(self.num_embeddings, self.tp)[self.rank]
        with torch.no_grad():
            self.weight = nn.Parameter(self.shard(embedding.weight).clone())

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows [start, end) of a dense (V, d) table, or of its gradient."""
        return tensor[self.start:self.end]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        mine = (idx >= self.start) & (idx < self.end)              # the tokens whose rows this rank holds
        local = torch.where(mine, idx - self.start, 0)             # their rows here; row 0 for the others' (read,
        y = F.embedding(local, self.weight)                        # then zeroed: no contribution, no gradient)
        y = y.masked_fill(~mine.unsqueeze(-1), 0.0)
        return ReduceFromParallel.apply(y, self.group)             # Σ_r: each token's row from its one rank

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank {self.rank} of {self.tp}, "
                f"rows [{self.start}, {self.end})")


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
                shards[full] = module.shard(tensor) if isinstance(module, (_ParallelLinear, VocabParallelEmbedding)) \
                    else tensor
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
