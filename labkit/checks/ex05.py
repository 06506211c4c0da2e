"""Checkers for exercise 5, Megatron's tensor-parallel linear layers (``solutions/05_tensor_parallel_exercise.ipynb``).

    check_f_and_g(CopyToParallel, ReduceFromParallel)             # 5a-5d: the conjugate operators f and g
    check_column_parallel(ColumnParallelLinear)                   # 5e, 5f: shard and forward
    check_row_parallel(RowParallelLinear)                         # 5g, 5h: shard and forward
    check_parallel_mlp(ColumnParallelLinear, RowParallelLinear)   # column -> GELU -> row against a dense MLP
    check_vocab_parallel_embedding(VocabParallelEmbedding)        # 5i: design the vocabulary-parallel embedding

Each prints one ``✓`` line when the code is right, or raises :class:`labkit.checks.CheckFailed` naming the mistake.
The student's f and g are ``torch.autograd.Function`` subclasses (``f.apply(x, group)``); the layers subclass labkit's
:mod:`labkit.tensor_parallel` classes, the reference (a forward is checked with labkit's shards, a shard with labkit's
``__init__``). Every check runs on 3, 2, 4 and 1 processes (:data:`WORLD_SIZES`, stopping at the first problem), in
float64, against the dense computation; on 4 processes also in tensor-parallel groups of 2, each with its own data.
The embedding of 5i (a design task: the student's forward against ``nn.Embedding``, any correct design passes) runs
on 3 and 2 processes, with a vocabulary that does not divide by either.
The collectives are watched (:class:`~labkit.checks.harness.Watch`: phase, group size and op of each call; a deadlock
named as one); an all-gather and a sum is as good as an all-reduce. Mistakes are named from the numbers: where the
student's are wrong, the workers also run every row of the check's table of :class:`~labkit.checks.harness.Mistake`
(small changes to labkit's classes, which the tests build too), and the first that gives the same value names it.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from labkit import comm
from labkit.checks import (CheckFailed, fail, first_mismatch, fmt_index, fmt_pair, passed, run_on_ranks,
                           student_traceback, time_limit)
from labkit.checks.harness import (Board, Mistake, Watch, all_ranks, and_list, board_dir, close, element_text, everyone,
                                   factor, factor_words, find_mistake, keep, not_written, plural, variants_if_wrong)
from labkit.tensor_parallel import (ColumnParallelLinear, CopyToParallel, ReduceFromParallel, RowParallelLinear,
                                    shard_columns, shard_rows)
from labkit.ring import chunk_bounds
from labkit.tensor_parallel_gpt import VocabParallelEmbedding, grid_groups

__all__ = ["check_f_and_g", "check_column_parallel", "check_row_parallel", "check_parallel_mlp",
           "check_vocab_parallel_embedding", "WORLD_SIZES", "F_AND_G_MISTAKES", "COLUMN_SHARD_MISTAKES",
           "ROW_SHARD_MISTAKES", "COLUMN_MISTAKES", "ROW_MISTAKES", "MLP_MISTAKES", "EMBEDDING_MISTAKES"]

# 3 first: its messages read best (a factor 3 is unmistakable, rank 1 sits between two others); 1 last.
WORLD_SIZES = (3, 2, 4, 1)
C, H = 12, 24            # model width and hidden width: divisible by 1, 2, 3 and 4
BT = (2, 3)              # the leading dimensions of the inputs (batch, sequence)
_SUBGROUPS = "tensor-parallel groups of 2: ranks {0, 1} and {2, 3}, each group with its own data"
_FG = ("f", "g")         # the kinds of check_f_and_g's classes; the layers' are "column" and "row"


# === What the student is told =========================================================================================

_F_BACKWARD = ("f's backward must all-reduce (sum) the gradient: x feeds every rank's slice of the layer, so "
               "dL/dx = Σ_r (rank r's contribution), and each rank computed only its own contribution")
_AVERAGED = ("averaged instead of summed: the ranks hold different parts of one computation (different slices "
             "of one layer), not copies of the same model on different data as in data parallelism, so their "
             "contributions add up: all-reduce with the default op, SUM, and do not divide by tp")
_G_FORWARD = ("g's forward must all-reduce (sum) its input: each rank holds a partial sum x_r W_rᵀ of the "
              "layer's output, and y = Σ_r x_r W_rᵀ")
_G_BACKWARD = ("g's backward must be the identity: after g every rank holds the same y, so every rank already "
               "holds the same dL/dy, and dL/dx_r = dL/dy (y = Σ_r x_r). All-reducing it sums tp equal copies")
_F_FORWARD = ("f's forward must be the identity: every rank already holds the same x, so all-reducing it sums tp "
              "equal copies. Return x unchanged; f's all-reduce belongs in its backward")
_DETACHED = ("the output y does not require grad: it is cut off from the autograd graph, so no gradient can flow "
             "back through the layer (a .detach(), a .data, torch.no_grad() or .item() in forward?).")
_OWN = "x.grad is only rank {r}'s own contribution"


# === The known wrong versions: labkit's classes, changed a little =====================================================

def _summed(x: torch.Tensor, group) -> torch.Tensor:
    total = x.clone()
    comm.all_reduce(total, group=group)
    return total


def _then(_, value):
    return value


def _function(name: str, base: type, forward=None, backward=None) -> type:
    """``base`` (labkit's f or g) with ``forward(x, group) -> y`` and/or ``backward(grad, group) -> grad`` replaced."""
    def new_forward(ctx, x, group):
        ctx.group = group
        return forward(x, group)
    methods = {"forward": staticmethod(new_forward)} if forward else {}
    if backward:
        methods["backward"] = staticmethod(lambda ctx, grad: (backward(grad, ctx.group), None))
    return type(name, (base,), methods)


def _size(group) -> int:
    return dist.get_world_size(group)


FReducesInForward = _function("FReducesInForward", CopyToParallel, forward=_summed)
FNoAllReduce = _function("FNoAllReduce", CopyToParallel, backward=lambda grad, group: grad)
FResultDropped = _function("FResultDropped", CopyToParallel,    # all-reduces a copy, returns the gradient itself
                           backward=lambda grad, group: _then(_summed(grad, group), grad))
FAverages = _function("FAverages", CopyToParallel, backward=lambda grad, group: _summed(grad, group) / _size(group))
FInPlace = _function("FInPlace", CopyToParallel,                # all-reduces the gradient autograd hands it
                     backward=lambda grad, group: _then(comm.all_reduce(grad, group=group), grad))
GNoAllReduce = _function("GNoAllReduce", ReduceFromParallel, forward=lambda x, group: x.clone())
GAverages = _function("GAverages", ReduceFromParallel, forward=lambda x, group: _summed(x, group) / _size(group))
GInPlace = _function("GInPlace", ReduceFromParallel, forward=lambda x, group: _then(comm.all_reduce(x, group=group), x))
GReducesInBackward = _function("GReducesInBackward", ReduceFromParallel, backward=_summed)
GDividesInBackward = _function("GDividesInBackward", ReduceFromParallel,
                               backward=lambda grad, group: grad / _size(group))


class _Column(ColumnParallelLinear):
    """labkit's column-parallel layer with another f."""
    f = CopyToParallel

    def forward(self, x):
        return F.linear(self.f.apply(x, self.group), self.weight, self.bias)


class _Row(RowParallelLinear):
    """labkit's row-parallel layer with another g; ``bias_first``: the bias added to each partial sum, before g."""
    g, bias_first = ReduceFromParallel, False

    def forward(self, x_r):
        if self.bias_first:
            return self.g.apply(F.linear(x_r, self.weight, self.bias), self.group)
        return self.g.apply(F.linear(x_r, self.weight), self.group) + self.bias


def _gathers(self, x):
    y = F.linear(CopyToParallel.apply(x, self.group), self.weight, self.bias)
    parts = [torch.empty_like(y) for _ in range(self.tp)]
    comm.all_gather(parts, y.contiguous(), group=self.group)
    return torch.cat(parts, dim=-1)


ColumnFReducesInForward = type("ColumnFReducesInForward", (_Column,), {"f": FReducesInForward})
ColumnFNoAllReduce = type("ColumnFNoAllReduce", (_Column,), {"f": FNoAllReduce})
ColumnFAverages = type("ColumnFAverages", (_Column,), {"f": FAverages})
ColumnWithoutF = type("ColumnWithoutF", (ColumnParallelLinear,),
                      {"forward": lambda self, x: F.linear(x, self.weight, self.bias)})
ColumnWithoutBias = type("ColumnWithoutBias", (ColumnParallelLinear,),
                         {"forward": lambda self, x: F.linear(CopyToParallel.apply(x, self.group), self.weight)})
ColumnGathers = type("ColumnGathers", (ColumnParallelLinear,), {"forward": _gathers})   # the whole output
ColumnSlicesInputs = type("ColumnSlicesInputs", (ColumnParallelLinear,),
                          {"shard": lambda self, t: t.chunk(self.tp, dim=-1)[self.rank]})
ColumnReversed = type("ColumnReversed", (ColumnParallelLinear,),
                      {"shard": lambda self, t: shard_rows(t, self.tp - 1 - self.rank, self.tp)})
ColumnWholeWeight = type("ColumnWholeWeight", (ColumnParallelLinear,), {"shard": lambda self, t: t})
ColumnWholeBias = type("ColumnWholeBias", (ColumnParallelLinear,),
                       {"shard": lambda self, t: shard_rows(t, self.rank, self.tp) if t.dim() == 2 else t})
ColumnBiasReversed = type("ColumnBiasReversed", (ColumnParallelLinear,), {"shard": lambda self, t: shard_rows(
    t, self.rank if t.dim() == 2 else self.tp - 1 - self.rank, self.tp)})
RowGNoAllReduce = type("RowGNoAllReduce", (_Row,), {"g": GNoAllReduce})
RowGAverages = type("RowGAverages", (_Row,), {"g": GAverages})
RowGReducesInBackward = type("RowGReducesInBackward", (_Row,), {"g": GReducesInBackward})
RowWithoutG = type("RowWithoutG", (RowParallelLinear,), {"forward": lambda self, x_r: F.linear(x_r, self.weight)})
RowWithoutBias = type("RowWithoutBias", (_Row,), {"forward": lambda self, x_r: ReduceFromParallel.apply(
    F.linear(x_r, self.weight), self.group)})
RowBiasOnEveryRank = type("RowBiasOnEveryRank", (_Row,), {"bias_first": True})     # the sum holds tp copies of b
# (the bias added on every rank and g averaging: Σ(x_r W_rᵀ + b)/tp = Σ x_r W_rᵀ/tp + b, the same numbers as
# RowGAverages, so the same mistake to name: not a row of its own)
RowBiasOnRankZero = type("RowBiasOnRankZero", (RowParallelLinear,), {"forward": lambda self, x_r: (  # the other ranks'
    ReduceFromParallel.apply(F.linear(x_r, self.weight, self.bias if self.rank == 0 else None), self.group))})  # b: no grad
RowSlicesOutputs = type("RowSlicesOutputs", (RowParallelLinear,),
                        {"shard": lambda self, t: t.chunk(self.tp, dim=0)[self.rank]})
RowReversed = type("RowReversed", (RowParallelLinear,), {"shard": lambda self, t: (
    shard_columns(t, self.tp - 1 - self.rank, self.tp) if t.dim() == 2 else t)})
RowWholeWeight = type("RowWholeWeight", (RowParallelLinear,), {"shard": lambda self, t: t})

# --- the tables: variant = what check_... would be given; says: the end of the message, str.format'ed with
# {r} (the rank), {calls} (the student's collectives in that phase), {times} (the measured factor), ...

F_AND_G_MISTAKES = (
    Mistake("f-forward-all-reduce", (FReducesInForward, ReduceFromParallel),
            "; y is tp times x, {times}, after {calls}. " + _F_FORWARD + "."),
    Mistake("f-result-dropped", (FResultDropped, ReduceFromParallel),
            "; x.grad is rank {r}'s own dy, only its partial sum (your backward made {calls}, but returned a tensor "
            "that does not hold its result: dist.all_reduce(t) writes the sum into t; return that t). "
            + _F_BACKWARD + ": all-reduce (sum) the gradient over ctx.group and return it."),
    Mistake("f-no-all-reduce", (FNoAllReduce, ReduceFromParallel),
            "; x.grad is rank {r}'s own dy, only its partial sum. " + _F_BACKWARD + ": all-reduce (sum) the "
            "gradient over ctx.group and return it."),
    Mistake("f-averages", (FAverages, ReduceFromParallel),
            "; x.grad is the mean of the ranks' dy, {times}: " + _AVERAGED + "."),
    Mistake("f-in-place", (FInPlace, ReduceFromParallel),
            ". f's backward changed the incoming gradient in place: dist.all_reduce(grad) wrote the sum into the "
            "tensor autograd handed to f's backward, and autograd had handed the very same tensor to the other "
            "branch (the residual's x), which then added the sum instead of dy. Autograd may share a gradient "
            "tensor between the inputs of an operation: all-reduce a copy (grad = grad.clone(); "
            "dist.all_reduce(grad, group=ctx.group); return grad, None)."),
    Mistake("g-no-all-reduce", (CopyToParallel, GNoAllReduce),
            "; y is rank {r}'s own x_r, only its partial sum ({calls}). " + _G_FORWARD + ": all-reduce (sum) a "
            "copy of x over group and return it."),
    Mistake("g-averages", (CopyToParallel, GAverages),
            "; y is the mean of the ranks' x_r, {times}: " + _AVERAGED + "."),
    Mistake("g-in-place", (CopyToParallel, GInPlace),
            ". dist.all_reduce(x) writes the sum into x, in place, but x_r may still be needed: by autograd (a "
            "tanh, for one, saves its output for its backward) or by your own code. All-reduce a copy: total = "
            "x.clone(); dist.all_reduce(total, group=group); return total."),
    Mistake("g-backward-all-reduce", (CopyToParallel, GReducesInBackward),
            "; x_r.grad is {times}, after {calls} (expected none). " + _G_BACKWARD + "."),
    Mistake("g-backward-divides", (CopyToParallel, GDividesInBackward),
            "; x_r.grad is dy / tp ({times}). " + _G_BACKWARD + ": return grad as it is."),
)

_OUT_OF_ORDER = "the shards are in the wrong order: {what} kept {span} of W, the shard of rank {k}; rank {r} keeps {own}. "
_WHOLE = "{what} is the whole W, shape {dense_shape}: every rank would hold (and compute) all of it. {how}."
COLUMN_SHARD_MISTAKES = (
    Mistake("column-slices-inputs", ColumnSlicesInputs,
            "{what} sliced the wrong dimension: it kept {span} of W, shape {shape}, this rank's input features "
            "({dense}). {how}."),
    Mistake("column-reversed", ColumnReversed,
            _OUT_OF_ORDER + "Out of order, rank {r} computes the output features of rank {k}: the outputs come out "
            "permuted, wrong once the ranks' slices are put side by side in rank order (a gather), and the "
            "row-parallel layer after it, whose rank r takes the input features of slice r, gets the wrong ones. "
            "Take slice r = self.rank of the self.tp slices, in rank order."),
    Mistake("column-whole-weight", ColumnWholeWeight, _WHOLE),
    Mistake("column-whole-bias", ColumnWholeBias,
            "{bias_what} is the whole bias b, shape {b_shape}: a column-parallel layer splits the bias like the "
            "output features, rank r keeps b[r·out/tp:(r+1)·out/tp], shape {want_b_shape} (shard must handle the "
            "1-D bias too: tensor[rows] slices its first dimension, whatever the number of dimensions)."),
    Mistake("column-bias-reversed", ColumnBiasReversed,
            "the bias shards are in the wrong order: {bias_what} holds entries {bias_span} of b, those of rank "
            "{bias_k}; rank {r} keeps {own_entries}, the entries of its own output features."),
)
ROW_SHARD_MISTAKES = (
    Mistake("row-slices-outputs", RowSlicesOutputs,
            "{what} sliced the wrong dimension: it kept {span} of W, shape {shape}, this rank's output features "
            "({dense}). {how}."),
    Mistake("row-reversed", RowReversed,
            _OUT_OF_ORDER + "Out of order, rank {r} multiplies its slice of the input (the features of slice {r}, "
            "computed by rank {r} of the column-parallel layer before it) by the weights of the features of slice "
            "{k}: the partial sums no longer add up to x Wᵀ. Take slice r = self.rank of the self.tp slices, in "
            "rank order."),
    Mistake("row-whole-weight", RowWholeWeight, _WHOLE),
)

_MEAN = "; x.grad is the mean of the ranks' contributions, {times}: " + _AVERAGED + "."
_F_TP_X = ": f's output came out tp times too large, after {calls}. " + _F_FORWARD + "."
COLUMN_MISTAKES = (
    Mistake("column-f-forward", ColumnFReducesInForward, "; y = (tp·x) W_rᵀ + b_r" + _F_TP_X),
    Mistake("column-without-bias", ColumnWithoutBias, "; y = x W_rᵀ: the bias b_r was not added."),
    Mistake("column-gathers", ColumnGathers,
            "; y is the whole output of the dense layer: a ColumnParallelLinear returns its own out/tp output "
            "features, which is what a RowParallelLinear takes (no gather)."),
    Mistake("column-without-f", ColumnWithoutF,
            "; " + _OWN + " (its out/tp output features): the forward does not go through f (no autograd "
            "Function between x and y), so nothing sums the ranks' contributions. " + _F_BACKWARD + ": start "
            "forward with CopyToParallel.apply(x, self.group)."),
    Mistake("column-f-no-all-reduce", ColumnFNoAllReduce,
            "; " + _OWN + ", a partial sum, after {calls}. " + _F_BACKWARD + "."),
    Mistake("column-f-averages", ColumnFAverages, _MEAN),
)
_ROW_OUTPUT = (
    Mistake("row-g-no-all-reduce", RowGNoAllReduce,
            "; y is rank {r}'s own partial sum x_r W_rᵀ + b, after {calls}. " + _G_FORWARD + ": y = g(x_r W_rᵀ) + b."),
    Mistake("row-without-g", RowWithoutG,
            "; y is rank {r}'s own partial sum x_r W_rᵀ, after {calls}. " + _G_FORWARD + ": y = g(x_r W_rᵀ) + b."),
    Mistake("row-bias-tp-times", RowBiasOnEveryRank,
            "; y − (x Wᵀ + b) = (tp − 1)·b: the bias added tp times, once on every rank before the all-reduce, "
            "which sums the tp copies. Add it once, after the sum: y = g(x_r W_rᵀ) + b (every rank adds it to the "
            "same sum, so every rank gets the same y)."),
    Mistake("row-g-averages", RowGAverages,
            "; y is the mean of the ranks' partial sums (+ b), not their sum: " + _AVERAGED + "."),
    Mistake("row-without-bias", RowWithoutBias,
            "; y = Σ_r x_r W_rᵀ: the bias b was not added (add it after g, on every rank)."),
)
ROW_MISTAKES = (
    Mistake("row-bias-rank-0", RowBiasOnRankZero,
            ": rank {r}'s bias did not take part in the output. Add the bias on every rank, after g (y = g(x_r W_rᵀ) "
            "+ b): then every rank's copy gets the same gradient and the copies stay equal when trained."),
    *_ROW_OUTPUT,
    Mistake("row-g-backward", RowGReducesInBackward,
            ": {times}, after {calls} (expected none). " + _G_BACKWARD + "."),
)
MLP_MISTAKES = (
    Mistake("mlp-bias-rank-0", (ColumnParallelLinear, RowBiasOnRankZero),
            ": the bias must be added on every rank, after g, so that every rank's copy gets the same gradient."),
    Mistake("mlp-f-forward", (ColumnFReducesInForward, RowParallelLinear), "; y is the dense MLP of tp·x" + _F_TP_X),
    *(Mistake("mlp" + m.name[3:], (ColumnParallelLinear, m.variant), m.says) for m in _ROW_OUTPUT),
    Mistake("mlp-g-backward", (ColumnParallelLinear, RowGReducesInBackward),
            ": {times}, after {calls} (expected 1, f's). " + _G_BACKWARD + "."),
    Mistake("mlp-column-without-f", (ColumnWithoutF, RowParallelLinear),
            "; " + _OWN + " (its H/tp hidden features), a partial sum, after {calls} (the forward goes through "
            "fewer than two autograd Functions: is f applied?). " + _F_BACKWARD + "."),
    Mistake("mlp-f-no-all-reduce", (ColumnFNoAllReduce, RowParallelLinear),
            "; " + _OWN + " (its H/tp hidden features), a partial sum, after {calls}. " + _F_BACKWARD + "."),
    Mistake("mlp-f-averages", (ColumnFAverages, RowParallelLinear), _MEAN),
)


# === Records ==========================================================================================================

class Shards(NamedTuple):
    """What ``cls(linear, group)`` kept on one rank (or, if it raised, what its ``shard`` made of the weight, and the
    error with the student's traceback)."""
    weight: Any
    bias: Any
    error: str | None = None


@dataclass
class Run:
    """One version of the code (the student's, or a known mistake's) on one rank: ``values`` (outputs, gradients and
    the ``want_...`` they should equal), its watched calls, the autograd Functions its output went through."""
    values: dict
    calls: list
    functions: int = 0

    def count(self, phase: str) -> int:
        return sum(c.phase == phase for c in self.calls)


class Case(NamedTuple):
    """One rank in one setting (the world, or a group of 2): the student's run and, where some rank's numbers were
    wrong, each known mistake's run by name."""
    world_rank: int
    rank: int            # in its tensor-parallel group
    size: int            # tp
    grouped: bool
    student: Run
    variants: dict


class _Check(NamedTuple):
    """One value of a :class:`Run` against what it should be, and the words of its message (str.format'ed)."""
    key: str              # in Run.values
    want: str             # the expected value, in Run.values
    label: str            # how the message names the value
    where: str            # what ran: the message before the element that differs
    meaning: str = ""     # what the expected value is
    phase: str = ""       # the checker's phase whose calls the message counts
    otherwise: str = "."  # the end of the message when no known mistake matches
    scaled: str = ""      # ... when the value is a named factor times the right one
    none: str = "no gradient reached it (is it used in forward, without .detach()?)."
    graph: bool = False   # a gradient: the known mistake must go through as many autograd Functions


# === Inside the workers ===============================================================================================

_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single")
_LABKIT = {"column": ColumnParallelLinear, "row": RowParallelLinear}
_DENSE = {"column": (C, H), "row": (H, C)}      # (in, out) of the dense layer each kind cuts


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _student(timeout: float, what: str, fn: Callable[[], Any], watch: Watch | None = None, phase: str = "") -> Any:
    """``fn()``, the student's code (``what``), its calls recorded in ``phase``: stopped after 0.6·timeout; a
    backward with the wrong number of gradients explained."""
    seconds = 0.6 * timeout
    if watch is not None:
        watch.phase = phase
    try:
        with time_limit(seconds, f"{what} did not return within {seconds:g} s on rank {dist.get_rank()}: an "
                                 f"endless loop?"):
            return fn()
    except RuntimeError as err:
        if "returned an incorrect number of gradients" in str(err):
            raise CheckFailed(f"{what}: {err}. A Function's backward returns one gradient per input of forward: "
                              f"forward(ctx, x, group) takes x and group, so backward returns (the gradient for x, "
                              f"None), None for group, which is not a tensor.") from None
        raise


def _is(t, shape) -> bool:
    return isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape)


def _function_nodes(t) -> int:
    """How many custom autograd Function nodes (f, g) lie in the graph of ``t``."""
    seen, stack = set(), [getattr(t, "grad_fn", None)]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return sum(isinstance(node, torch.autograd.function.BackwardCFunction) for node in seen)


def _worker(classes: tuple, kinds: tuple, timeout: float, board_path: str) -> list[Case]:
    """One rank of any check: the student's ``classes`` in the world, and on 4 processes in the groups of
    :data:`_SUBGROUPS` (each rank's group, members and index in it); where some rank's numbers are wrong, every
    row of the check's table too, on the same inputs."""
    N, run_one = dist.get_world_size(), _f_and_g_run if kinds == _FG else _layers_run
    board, cases = Board(board_path, dist.get_rank(), N), []
    for grouped in ((False, True) if N == 4 else (False,)):
        group, members = (grid_groups(2, 2)[0], [dist.get_rank() // 2 * 2 + i for i in (0, 1)]) if grouped else \
            (None, list(range(N)))

        def run(variant, group=group, members=members) -> Run:
            variant = variant if isinstance(variant, tuple) else (variant,)
            return run_one(variant, kinds, group, members, Watch(_OPS, deadline=0.5 * timeout, board=board,
                                                                 hint_checking=True), timeout)
        try:
            student = run(classes)
        except NotImplementedError as err:
            raise not_written(_probes(classes, kinds, group, len(members)), err, "5") from None
        right = all(close(student.values.get(c.want), student.values.get(c.key)) for c in _CHECKS[kinds])
        cases.append(Case(dist.get_rank(), members.index(dist.get_rank()), len(members), grouped, student,
                          variants_if_wrong(right, _TABLES[kinds], run)))
    return cases


# --- stubs: an unfinished exercise reads as unfinished, with every unwritten piece named -----------------

def _bare(cls, dense: nn.Linear, group, kind: str):
    """An instance of the student's layer with labkit's shards, without calling the student's ``shard``."""
    return type(cls.__name__, (cls,), {"shard": _LABKIT[kind].shard})(dense, group)


def _probes(classes: tuple, kinds: tuple, group, tp: int) -> list:
    """(task, what, call) per piece of the student's code, each call with labkit's version of the others."""
    def x(*shape):
        return _randn(*shape, seed=1).requires_grad_()
    if kinds == _FG:
        def backward(cls, labkit):   # the student's backward behind labkit's forward
            fn = type(cls.__name__, (torch.autograd.Function,),
                      {"forward": staticmethod(labkit.forward), "backward": staticmethod(cls.backward)})
            return lambda: fn.apply(x(4, 6), group).sum().backward()
        (f, g), fwd = classes, lambda cls: lambda: cls.apply(x(4, 6), group)
        return [("5a", f"{f.__name__}.forward", fwd(f)),
                ("5b", f"{f.__name__}.backward", backward(f, CopyToParallel)),
                ("5c", f"{g.__name__}.forward", fwd(g)),
                ("5d", f"{g.__name__}.backward", backward(g, ReduceFromParallel))]
    probes = []
    for i, (cls, k) in enumerate(zip(classes, kinds)):
        dense, tasks = _linear(*_DENSE[k], seed=11 + i), ("5e", "5f") if k == "column" else ("5g", "5h")
        x_in = x(*BT, C if k == "column" else H // tp)
        probes += [(tasks[0], f"{cls.__name__}.shard", lambda cls=cls, d=dense: cls(d, group)),
                   (tasks[1], f"{cls.__name__}.forward",
                    lambda cls=cls, d=dense, k=k, x=x_in: _bare(cls, d, group, k)(x))]
    return probes


# --- 5a-5d: f and g --------------------------------------------------------------------------------------

def _f_and_g_run(classes: tuple, kinds: tuple, group, members: list, watch: Watch, timeout: float) -> Run:
    (f_cls, g_cls), (f, g) = classes, (c.__name__ for c in classes)
    rank, first, i = dist.get_rank(), members[0], members.index(dist.get_rank())   # a group's data: its first rank's
    v = {}
    with watch.installed():
        # f: the same x on every rank; each rank's own dL/dy (its slice's contribution); dL/dx is their sum
        x = _randn(4, 6, seed=10 + first).requires_grad_()
        dys = [_randn(4, 6, seed=100 + m) for m in members]
        y = _student(timeout, f"{f}.apply(x, group)", lambda: f_cls.apply(x, group), watch, "f forward")
        v.update(x=x.detach().clone(), f_out=keep(y), want_f_grad=sum(dys))
        if all_ranks(_is(y, x.shape) and y.requires_grad, watch):
            _student(timeout, f"{f}.backward (in y = {f}.apply(x, group); y.backward(dy))",
                     lambda: y.backward(dys[i].clone()), watch, "f backward")
            v["f_grad"] = keep(x.grad)
            # x used twice: out = x + f(x). Autograd hands the same gradient tensor to both branches.
            x2 = _randn(4, 6, seed=20 + first).requires_grad_()
            dy2 = [_randn(4, 6, seed=200 + m) for m in members]
            y2 = _student(timeout, f"{f}.apply(x, group)", lambda: f_cls.apply(x2, group), watch, "f residual forward")
            _student(timeout, f"{f}.backward (in out = x + {f}.apply(x, group); out.backward(dy))",
                     lambda: (x2 + y2).backward(dy2[i].clone()), watch, "f residual backward")
            v.update(res_grad=keep(x2.grad), want_res_grad=dy2[i] + sum(dy2))
        # g: each rank's own partial sum x_r; y is their sum; dL/dy is the same on every rank
        xr = _randn(4, 6, seed=400 + rank).requires_grad_()
        before = xr.detach().clone()
        dyg = _randn(4, 6, seed=500 + first)
        yg = _student(timeout, f"{g}.apply(x, group)", lambda: g_cls.apply(xr, group), watch, "g forward")
        v.update(g_in=before, g_in_after=xr.detach().clone(), g_out=keep(yg),
                 want_g_out=sum(_randn(4, 6, seed=400 + m) for m in members), want_g_grad=dyg)
        if all_ranks(_is(yg, xr.shape) and yg.requires_grad, watch):
            _student(timeout, f"{g}.backward (in y = {g}.apply(x, group); y.backward(dy))",
                     lambda: yg.backward(dyg.clone()), watch, "g backward")
            v["g_grad"] = keep(xr.grad)
    return Run(v, watch.calls)


# --- 5e-5h: the layers -----------------------------------------------------------------------------------

def _linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).double()


def _build(cls, dense: nn.Linear, group, kind: str, timeout: float) -> tuple[Any, Shards]:
    """``cls(dense, group)`` and this rank's shards; if it raises, what the student's ``shard`` makes of the weight
    alone (the error is often in the bias's line, after a weight sliced along the wrong dimension)."""
    try:
        layer = _student(timeout, f"{cls.__name__}(linear, group)", lambda: cls(dense, group))
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as err:  # noqa: BLE001 - diagnosed below, then reported with the student's traceback
        r = dist.get_rank(group)
        error = (f"{cls.__name__}(linear, group) raised {type(err).__name__} on rank {r}: {err}\n\n--- traceback of "
                 f"rank {r} ---\n{student_traceback(traceback.format_exc())}")
        try:
            weight = keep(_student(timeout, f"{cls.__name__}.shard(linear.weight)",
                                   lambda: cls.shard(_bare(cls, dense, group, kind), dense.weight.detach())))
        except Exception:  # noqa: BLE001
            weight = None
        return None, Shards(weight, None, error)
    return layer, Shards(keep(getattr(layer, "weight", None)), keep(getattr(layer, "bias", None)))


def _want_shards(W, b, kind: str, r: int, tp: int) -> tuple:
    """labkit's shards of rank r of tp."""
    return (shard_rows(W, r, tp), shard_rows(b, r, tp)) if kind == "column" else (shard_columns(W, r, tp), b)


def _layers_run(classes: tuple, kinds: tuple, group, members: list, watch: Watch, timeout: float) -> Run:
    """The layers (one, or column -> GELU -> row) against the dense ones, on this rank's data (its group's)."""
    r, tp = dist.get_rank(group), len(members)
    mine = slice(r * H // tp, (r + 1) * H // tp)    # this rank's hidden features: a column's outputs, a row's inputs
    dense = [_linear(*_DENSE[k], seed=11 + i) for i, k in enumerate(kinds)]
    x = _randn(*BT, dense[0].in_features, seed=13 + members[0])
    w = _randn(*BT, dense[-1].out_features, seed=14 + members[0])     # loss = Σ y · w
    xd = x.clone().requires_grad_()
    params = [(d.weight.detach().clone().requires_grad_(), d.bias.detach().clone().requires_grad_()) for d in dense]
    yd = xd
    for i, (Wd, bd) in enumerate(params):
        yd = F.linear(F.gelu(yd) if i else yd, Wd, bd)
    (yd * w).sum().backward()
    first_row, last_column = kinds[0] == "row", kinds[-1] == "column"
    x_in, dy = (x[..., mine] if first_row else x), (w[..., mine] if last_column else w)
    v = dict(want_y=yd.detach()[..., mine] if last_column else yd.detach(),
             want_x_grad=xd.grad[..., mine] if first_row else xd.grad)
    for k, d, (Wd, bd) in zip(kinds, dense, params):
        v[f"{k}_W"], v[f"{k}_b"] = d.weight.detach().clone(), d.bias.detach().clone()
        v[f"want_{k}_weight_grad"], v[f"want_{k}_bias_grad"] = _want_shards(Wd.grad, bd.grad, k, r, tp)
    functions, names = 0, [c.__name__ for c in classes]
    with watch.installed():
        built = [_build(cls, d, group, k, timeout) for cls, d, k in zip(classes, dense, kinds)]
        v.update({k: shards for k, (_, shards) in zip(kinds, built)})
        ok = all(s.error is None and all(map(close, _want_shards(d.weight.detach(), d.bias.detach(), k, r, tp), s[:2]))
                 for (_, s), d, k in zip(built, dense, kinds))
        if not all_ranks(ok, watch):
            return Run(v, watch.calls)
        y = x_in = x_in.clone().requires_grad_()
        for i, (cls, (layer, _)) in enumerate(zip(classes, built)):
            if i:        # between the layers: this rank's H/tp hidden features, through GELU
                if not all_ranks(_is(y, (*BT, H // tp)), watch):
                    v["hidden"] = keep(y)
                    return Run(v, watch.calls)
                y = F.gelu(y)
            y = _student(timeout, f"{cls.__name__}.forward", lambda: layer(y), watch, "forward")
        v["y"], functions = keep(y), _function_nodes(y)
        if all_ranks(_is(y, v["want_y"].shape), watch):
            v["detached"] = not y.requires_grad
            if all_ranks(y.requires_grad, watch):
                _student(timeout, f"y.backward(dy) (backward through your {' -> GELU -> '.join(names)})",
                         lambda: y.backward(dy.clone()), watch, "backward")
                v["x_grad"] = keep(x_in.grad)
                for k, (layer, _) in zip(kinds, built):
                    v.update({f"{k}_{n}_grad": keep(None if getattr(layer, n, None) is None else getattr(layer, n).grad)
                              for n in ("weight", "bias")})
    return Run(v, watch.calls, functions)


# === In the parent: diagnoses =========================================================================================

_F_AND_G_CHECKS = (
    _Check("f_out", "x", "y", "{head_f}: on rank {r}, y = {f}.apply(x, group)", phase="f forward",
           otherwise=". f's forward is the identity: return x."),
    _Check("f_grad", "want_f_grad", "x.grad", "{head_f}: on rank {r}, after y = {f}.apply(x, group); y.backward(dy) "
           "with each rank's own dy (its slice's dL/dy)", " (the sum of the ranks' dy)", "f backward",
           scaled="; x.grad is {times}, after {calls}: sum the ranks' gradients once.",
           none="no gradient came back through f. f's backward returns (the gradient for x, None for group)."),
    _Check("res_grad", "want_res_grad", "x.grad", "{head_f}: on rank {r}, in out = x + {f}.apply(x, group) (x used "
           "twice, as in a residual connection), out.backward(dy)", " (dy + the sum of the ranks' dy)",
           "f residual backward"),
    _Check("g_out", "want_g_out", "y", "{head_g}: on rank {r}, y = {g}.apply(x_r, group) with each rank's own x_r",
           " (the sum of the ranks' x_r)", "g forward", scaled="; y is {times}, after {calls}: sum the ranks' x_r once."),
    _Check("g_in_after", "g_in", "x_r", "{head_g}: on rank {r}, y = {g}.apply(x_r, group) changed its input x_r: "
           "after the call ", " (its value before)", "g forward",
           otherwise=". g's forward must leave its input as it was: all-reduce a copy."),
    _Check("g_grad", "want_g_grad", "x_r.grad", "{head_g}: on rank {r}, after y = {g}.apply(x_r, group); "
           "y.backward(dy) with the same dy on every rank", " (dy itself)", "g backward",
           otherwise=". g's backward is the identity: return (grad, None).",
           none="no gradient came back through g. g's backward returns (the gradient for x, None for group)."),
)


def _grad_checks(where: str, kinds: tuple, x_label: str) -> tuple:
    """The weight and bias gradients of each layer, then x's."""
    return tuple(_Check(f"{k}_{n}_grad", f"want_{k}_{n}_grad", f"{{{k}}}.{n}.grad", where, phase="backward",
                        scaled=": {times}, after {calls}.", graph=True) for k in kinds for n in ("weight", "bias")) + (
        _Check("x_grad", "want_x_grad", x_label, where.replace(" with the same dy on every rank", ""),
               phase="backward", scaled=": {times}, after {calls}.", graph=True),)


_CHECKS = {
    _FG: _F_AND_G_CHECKS,
    ("column",): (_Check("y", "want_y", "y", "{head}: on rank {r}, y = layer(x) with the same x on {everywhere}",
                         " (rank {r}'s output features: x W_rᵀ + b_r, W_r = W[{lo}:{hi}])", "forward"),
                  *_grad_checks("{head}: on rank {r}, after y.backward(dy)", ("column",), "x.grad")),
    ("row",): (_Check("y", "want_y", "y", "{head}: on rank {r}, y = layer(x_r) with x_r = x[..., {lo}:{hi}], rank "
                      "{r}'s slice of the input", " (the dense layer's output, x Wᵀ + b)", "forward"),
               *_grad_checks("{head}: on rank {r}, after y.backward(dy)", ("row",), "x_r.grad (x_r = x[..., {lo}:{hi}])")),
    ("column", "row"): (
        _Check("y", "want_y", "y", "{head}: on rank {r}, y = row(gelu(column(x))) with the same x on {everywhere}",
               " (the dense MLP's output)", "forward"),
        *_grad_checks("{head}: on rank {r}, after y.backward(dy) with the same dy on every rank", ("row", "column"),
                      "x.grad")),
}
_TABLES = {_FG: F_AND_G_MISTAKES, ("column",): COLUMN_MISTAKES, ("row",): ROW_MISTAKES,
           ("column", "row"): MLP_MISTAKES}
_PHASES = {"f forward": "f's forward", "f backward": "f's backward", "g forward": "g's forward",
           "g backward": "g's backward", "f residual forward": "f's forward (in out = x + f(x))",
           "f residual backward": "f's backward (in out = x + f(x))"}


def _label(names: tuple, kinds: tuple) -> str:
    if kinds == _FG:
        return f"{names[0]} (f) and {names[1]} (g)"
    return names[0] if len(names) == 1 else f"{names[0]} → GELU → {names[1]}"


def _head(name: str, N: int, grouped: bool, verb: str = "is") -> str:
    where = f"on {N} process{'es' if N > 1 else ''} (tp = {N})" if not grouped else f"on 4 processes in {_SUBGROUPS}"
    return f"{name} {verb} wrong {where}"


def _calls_text(calls, phase: str) -> str:
    kinds = ["all-reduce" if c.op == "all_reduce" else "all-gather" for c in calls if c.phase == phase]
    counts = [plural(kinds.count(k), k) for k in sorted(set(kinds))] or ["0 all-reduces"]
    return f"{' and '.join(counts)} in {_PHASES.get(phase, phase)}"


def _calls_problem(head: str, case: Case) -> str | None:
    """An all-reduce over the whole world instead of ``group``; an op other than SUM."""
    calls, where = case.student.calls, f"{head}: on rank {case.world_rank}, "
    for c in calls:
        if case.grouped and c.group_size != case.size:
            kind = "all-reduce" if c.op == "all_reduce" else "all-gather"
            return (f"{where}an {kind} in {_PHASES.get(c.phase, c.phase)} ran over {c.group_size} ranks, not over "
                    f"the {case.size} ranks of `group`: the ranks of the other tensor-parallel group, which work on "
                    f"other data, were summed in. Pass the group on: dist.all_reduce(t, group=group) (in backward, the "
                    f"group saved in ctx.group), and in the layers CopyToParallel.apply(x, self.group).")
    for c in calls:
        if c.reduce_op is not None and not c.reduce_op.endswith("SUM"):
            op = "ReduceOp." + c.reduce_op.rpartition(".")[2]
            why = _AVERAGED if op.endswith("AVG") else "f and g sum (the default op, ReduceOp.SUM)"
            return f"{where}dist.all_reduce in {_PHASES.get(c.phase, c.phase)} was called with op={op}: {why}."
    return None


def _values_problem(cases, checks, table, **ctx) -> str | None:
    """The first value (in the order of ``checks``, then of the ranks) that differs from what it should be, named by
    the first known mistake of ``table`` whose run gave the same (communicating in the same phases and, for a
    gradient, through as many autograd Functions)."""
    for check in checks:
        for case in cases:
            run = case.student
            got, want = run.values.get(check.key), run.values.get(check.want)
            if close(want, got):
                continue
            step = H // case.size
            words = dict(ctx, r=case.world_rank, lo=case.rank * step, hi=(case.rank + 1) * step,
                         calls=_calls_text(run.calls, check.phase), times=factor_words(factor(want, got), case.size))
            if check.graph and run.values.get("detached"):
                return f"{ctx['head']}: on rank {case.world_rank}, {_DETACHED}"
            where, label = check.where.format(**words), check.label.format(**words)
            absent = got is None and check.phase.endswith("backward")
            if absent:
                text = f"{where}, {label} is None after backward"
            else:
                text = where + ("" if where.endswith(" ") else ": ") + element_text(label, want, got) + \
                       check.meaning.format(**words)

            def looks_like(m: Mistake) -> bool:
                variant = case.variants.get(m.name)
                return (variant is not None and close(variant.values.get(check.key), got)
                        and bool(variant.count(check.phase)) == bool(run.count(check.phase))
                        and (not check.graph or variant.functions == run.functions))
            mistake = find_mistake(table, looks_like)
            if mistake:
                return text + mistake.says.format(**words)
            if absent:
                return f"{text}: {check.none}"
            return text + (check.scaled if words["times"] and check.scaled else check.otherwise).format(**words)
    return None


def _count_problem(head: str, kinds: tuple, case: Case) -> str | None:
    """The right numbers, but communication where none is needed, or more than once."""
    calls, n = case.student.calls, case.student.count
    start = f"{head}: the numbers are right, but on rank {case.world_rank}"
    if kinds == _FG:
        for phase, why in (("f forward", "every rank already holds x"), ("g backward", "every rank already holds "
                                                                                      "dL/dy")):
            if n(phase):
                return (f"{start} there {'was' if n(phase) == 1 else 'were'} {_calls_text(calls, phase)}: {why}, so "
                        f"{_PHASES[phase]} needs no communication (an all-reduce in every layer, for nothing). "
                        f"{_PHASES[phase]} is the identity.")
        return next((f"{start} there were {_calls_text(calls, phase)}: one is enough."
                     for phase in ("f backward", "g forward") if n(phase) > 1), None)
    expected = {"forward": kinds.count("row"), "backward": kinds.count("column")}
    wrong = [phase for phase, count in expected.items() if n(phase) != count]
    if wrong and len(kinds) == 1:
        return (f"{start} the layer made {_calls_text(calls, wrong[0])}, expected {expected[wrong[0]]}: a "
                f"{kinds[0]}-parallel layer communicates once, "
                f"{'in backward (f)' if kinds == ('column',) else 'in forward (g)'}.")
    if wrong:
        return (f"{start} the MLP made {_calls_text(calls, 'forward')} and {_calls_text(calls, 'backward')}: "
                f"Megatron's MLP needs one in each (g's, after the row-parallel layer, in forward; f's, before the "
                f"column-parallel layer, in backward).")
    return None


def _problem(names: tuple, kinds: tuple, N: int, results: list) -> str | None:
    """The first problem of the student's runs on N processes, setting by setting: a shard, a call over the wrong
    group or with the wrong op, a hidden activation of the wrong shape, a wrong value, a wrong number of calls."""
    fg = kinds == _FG
    for cases in zip(*results):
        tp, grouped = cases[0].size, cases[0].grouped
        head = _head(_label(names, kinds), N, grouped, "are" if fg else "is")
        for case, (k, name) in ((case, k_name) for case in cases for k_name in zip(kinds, names) if not fg):
            if problem := _shard_problem(head, name, k, case):
                return problem + (f" (Rank {case.world_rank} of the world is rank {case.rank} of its group: a shard "
                                  f"is cut by the rank in the group, self.rank, which labkit's __init__ sets with "
                                  f"dist.get_rank(group); dist.get_rank() is the rank in the world.)"
                                  if grouped else "")
        problem = next(filter(None, (_calls_problem(head, case) for case in cases)), None)
        for case in cases if not problem else ():
            if "hidden" in case.student.values:
                hidden = case.student.values["hidden"]
                return (f"{head}: on rank {case.world_rank}, {names[0]}'s output has shape "
                        f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else hidden}, expected "
                        f"{(*BT, H // tp)}: this rank's H/tp = {H // tp} hidden features.")
        heads = dict(head_f=_head(f"{names[0]} (f)", N, grouped), head_g=_head(f"{names[-1]} (g)", N, grouped))
        problem = problem or _values_problem(cases, _CHECKS[kinds], _TABLES[kinds], head=head, **heads,
                                             **dict(zip(kinds, names)),
                                             everywhere="every rank of the group" if grouped else "every rank")
        problem = problem or next(filter(None, (_count_problem(head, kinds, case) for case in cases if tp > 1)), None)
        if problem:
            return problem
    return None


# --- the shards ------------------------------------------------------------------------------------------

def _piece(t, dense: torch.Tensor, tp: int) -> tuple | None:
    """(dim, k) when ``t`` is slice k of ``dense`` along dim, (None, None) when it is all of it, else None."""
    if not isinstance(t, torch.Tensor):
        return None
    if close(dense, t):
        return None, None
    for dim in range(dense.dim()):
        step = dense.shape[dim] // tp
        for k in range(tp if dense.shape[dim] % tp == 0 else 0):
            if close(dense.narrow(dim, k * step, step), t):
                return dim, k
    return None


def _kind(t, dense: torch.Tensor, dim: int | None, r: int, tp: int) -> str | None:
    """What a shard ``t`` of ``dense`` is, against slice r of tp along ``dim`` (None: all of ``dense``): "right",
    "whole", "sliced" (where it should be whole), "order" (another rank's slice), "dimension" (along another)."""
    piece = _piece(t, dense, tp)
    if piece == ((None, None) if dim is None or tp == 1 else (dim, r)):
        return "right"
    return (None if piece is None else "whole" if piece[0] is None else "sliced" if dim is None else
            "order" if piece[0] == dim else "dimension")


def _shard_of(cls, tensor, rank: int, tp: int):
    """``cls.shard(tensor)`` as rank ``rank`` of ``tp`` (a known mistake's, in this process)."""
    layer = cls.__new__(cls)
    layer.__dict__.update(rank=rank, tp=tp, parts=1, group=None)
    try:
        return cls.shard(layer, tensor)
    except Exception:  # noqa: BLE001
        return None


def _span(piece, n: int, tp: int, word: bool = True) -> str:
    if piece is None or piece[0] is None:
        return ""
    dim, k = piece
    return f"{['rows', 'cols'][dim] + ' ' if word else ''}[{k * n // tp}, {(k + 1) * n // tp})"


_HOW = {"column": "A column-parallel layer splits W by its output features, the rows (dim 0): rank r keeps "
                  "W[r·out/tp:(r+1)·out/tp], shape (out/tp, in) = {want_shape}, and the same entries of the bias",
        "row": "A row-parallel layer splits W by its input features, the columns (dim 1): rank r keeps "
               "W[:, r·in/tp:(r+1)·in/tp], shape (out, in/tp) = {want_shape}: the weights of the inputs that the "
               "column-parallel layer before it computes on rank r"}


def _shard_problem(head: str, name: str, kind: str, case: Case) -> str | None:
    """The student's shards on one rank against the dense W and b, named from the table of shard mistakes."""
    v, r, tp = case.student.values, case.rank, case.size
    shards, W, b = v[kind], v[f"{kind}_W"], v[f"{kind}_b"]
    want_w, want_b = _want_shards(W, b, kind, r, tp)
    weight_ok = close(want_w, shards.weight)
    if weight_ok and shards.error is None and close(want_b, shards.bias):
        return None
    error = "" if shards.error is None else ("\nThen " if not weight_ok else "") + shards.error
    if weight_ok and shards.error is not None:
        return f"{head}: {error}"
    dim = 0 if kind == "column" else 1
    wp, bp = _piece(shards.weight, W, tp), _piece(shards.bias, b, tp)
    shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t  # noqa: E731
    words = dict(r=r, what=f"{name}.shard(W) on rank {r}", bias_what=f"{name}.bias on rank {r}",
                 k=wp[1] if wp else None, span=_span(wp, W.shape[wp[0]] if wp and wp[0] is not None else 0, tp),
                 own=_span((dim, r), W.shape[dim], tp), shape=shape(shards.weight), dense_shape=tuple(W.shape),
                 dense=f"the dense W has shape (out, in) = {tuple(W.shape)}", b_shape=tuple(b.shape),
                 want_b_shape=tuple(want_b.shape), bias_k=bp[1] if bp else None,
                 bias_span=_span(bp, b.shape[0], tp, word=False), own_entries=_span((0, r), b.shape[0], tp, word=False),
                 how=_HOW[kind].format(want_shape=tuple(want_w.shape)))
    b_dim = 0 if kind == "column" else None
    got_kind = _kind(shards.weight, W, dim, r, tp) if not weight_ok else _kind(shards.bias, b, b_dim, r, tp)

    def kinds(cls, tensor, along) -> set:
        return {_kind(_shard_of(cls, tensor, k, tp), tensor, along, k, tp) for k in range(tp)}

    def matches(m: Mistake) -> bool:   # the same kind of wrong shard, in the same tensor
        if got_kind in (None, "right"):
            return False
        if not weight_ok:
            return got_kind in kinds(m.variant, W, dim)
        return kinds(m.variant, W, dim) == {"right"} and got_kind in kinds(m.variant, b, b_dim)
    table = COLUMN_SHARD_MISTAKES if kind == "column" else ROW_SHARD_MISTAKES
    mistake = find_mistake(table, matches)
    if mistake:
        return f"{head}: {mistake.says.format(**words)}{error}"
    if not weight_ok:
        if shards.weight is None:
            return f"{head}: {words['what']} did not give a tensor. {words['how']}.{error}"
        return (f"{head}: {element_text(words['what'], want_w, shards.weight)} ({words['dense']}). "
                f"{words['how']}.{error}")
    return f"{head}: {element_text(words['bias_what'], want_b, shards.bias)}."


# === The checks =======================================================================================================

def _check(classes: tuple, kinds: tuple, what: str, *, world_sizes, timeout: float, task: str) -> str:
    """Refuse what is not a class of the right base; then the workers on each world size, failing at the first
    problem. Returns the ✓ line's word for the student's collectives."""
    __tracebackhide__ = True
    for cls, kind in zip(classes, kinds):
        base = torch.autograd.Function if kind in _FG else _LABKIT[kind]
        if not isinstance(cls, type):
            fail(f"pass your class itself ({what}), not a {type(cls).__name__} object")
        if not issubclass(cls, base) and kind in _FG:
            fail(f"{cls.__name__} must be a subclass of torch.autograd.Function (class {cls.__name__}("
                 f"torch.autograd.Function): ...), called as {cls.__name__}.apply(x, group)")
        if not issubclass(cls, base):
            fail(f"{cls.__name__} must be a subclass of labkit's layer, as in the notebook: class {cls.__name__}("
                 f"labkit.tensor_parallel.{base.__name__}), whose __init__ calls your shard (the check runs your "
                 f"forward with labkit's shards, and your shard with labkit's __init__)")
    names, calls = tuple(c.__name__ for c in classes), []
    name = " and ".join(names) if kinds == _FG else _label(names, kinds)
    for N in world_sizes:
        with board_dir() as board:
            results = run_on_ranks(_worker, classes, kinds, timeout, board, world_size=N, timeout=timeout, name=name,
                                   task=task, device="cpu")
        problem = _problem(names, kinds, N, results)
        if problem:
            fail(problem)
        calls += [c for per_rank in results for case in per_rank for c in case.student.calls]
    return "all-reduce" if all(c.op == "all_reduce" for c in calls) else "collective"


def _sizes(world_sizes) -> str:
    sizes = sorted(world_sizes)
    return f"{and_list(sizes)} process{'es' if sizes != [1] else ''}"


def check_f_and_g(copy_to_parallel, reduce_from_parallel, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercises 5a-5d, f and g (``torch.autograd.Function`` subclasses, ``cls.apply(x, group)``): f on the
    same x, backward with each rank's own dL/dy (x.grad their sum), also in ``out = x + f(x)`` (the gradient tensor
    is shared: not to be changed in place); g on each rank's own x_r (y their sum, x_r left as it was), backward
    with the same dL/dy (x_r.grad = dL/dy). No communication in f's forward and g's backward."""
    __tracebackhide__ = True
    classes = (copy_to_parallel, reduce_from_parallel)
    collective = _check(classes, _FG, "check_f_and_g(CopyToParallel, ReduceFromParallel)", world_sizes=world_sizes,
                        timeout=timeout, task="5a-5d")
    names = [c.__name__ for c in classes]
    grouped = " and in groups of 2 of 4 processes" if 4 in world_sizes else ""
    passed(f"{names[0]} (f) and {names[1]} (g) are correct on {_sizes(world_sizes)}{grouped}: f's forward is the "
           f"identity and its backward sums the ranks' gradients, g's forward sums and its backward is the identity; "
           f"one {collective} each, in the right direction; the incoming gradient and the input left as they were")


def check_column_parallel(cls, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercises 5e and 5f against a dense ``nn.Linear(12, 24)``: ``cls(linear, group)`` keeps this rank's
    rows of W and b (``shard``); ``forward`` gives this rank's output features through f; x.grad (summed by f's
    backward) and the weight and bias gradients are the dense ones' (rows). One all-reduce, in backward."""
    __tracebackhide__ = True
    collective = _check((cls,), ("column",), "check_column_parallel(ColumnParallelLinear)", world_sizes=world_sizes,
                        timeout=timeout, task="5e-5f")
    grouped = " (the shards also in groups of 2 of 4 processes)" if 4 in world_sizes else ""
    passed(f"{cls.__name__} is correct on {_sizes(world_sizes)}{grouped}: rank r keeps rows [r·out/tp, (r+1)·out/tp) "
           f"of W and b; its output features, the input gradient (one {collective}, in backward) and the weight and "
           f"bias gradients equal the dense nn.Linear's, sliced the same way")


def check_row_parallel(cls, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercises 5g and 5h against a dense ``nn.Linear(24, 12)``: ``cls(linear, group)`` keeps this rank's
    columns of W and the whole bias; ``forward`` on this rank's slice x_r of the input sums the partial products
    with g and adds the bias once; x_r.grad and the weight and bias gradients are the dense ones'. One all-reduce,
    in forward."""
    __tracebackhide__ = True
    collective = _check((cls,), ("row",), "check_row_parallel(RowParallelLinear)", world_sizes=world_sizes,
                        timeout=timeout, task="5g-5h")
    grouped = " (the shards also in groups of 2 of 4 processes)" if 4 in world_sizes else ""
    passed(f"{cls.__name__} is correct on {_sizes(world_sizes)}{grouped}: rank r keeps columns [r·in/tp, (r+1)·in/tp) "
           f"of W and the whole bias, added once after the sum; the output (one {collective}, in forward), the input "
           f"slice's gradient and the weight and bias gradients equal the dense nn.Linear's, sliced the same way")


def check_parallel_mlp(column_cls, row_cls, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check column (12 → 24) → GELU → row (24 → 12) against the dense MLP: the output, x.grad and every weight and
    bias gradient; exactly one all-reduce in forward and one in backward."""
    __tracebackhide__ = True
    collective = _check((column_cls, row_cls), ("column", "row"),
                        "check_parallel_mlp(ColumnParallelLinear, RowParallelLinear)", world_sizes=world_sizes,
                        timeout=timeout, task="5e-5h")
    grouped = " (and in tensor-parallel groups of 2 on 4 processes)" if 4 in world_sizes else ""
    passed(f"{column_cls.__name__} → GELU → {row_cls.__name__} equals the dense MLP on {_sizes(world_sizes)}{grouped}: the output, "
           f"the input gradient and every weight and bias gradient, sliced as the shards are; one {collective} "
           f"in forward, one in backward")


# 5i. The vocabulary-parallel embedding: a design task, checked by what the embedding does
# ============================================================================================
# The task: VocabParallelEmbedding.forward(idx), rank r holding rows [start, end) of the V × d table (labkit's
# __init__, labkit.ring.chunk_bounds' cut), returns every token's row on every rank, and the backward leaves in each
# rank's weight.grad exactly its rows of the dense gradient. Checked against nn.Embedding on 3 and 2 processes: the
# output on every rank, each rank's weight.grad, the collectives of each direction. Any forward with these
# properties passes (an all-gather, a mask by multiplication, a lookup by indexing ...).

EMBEDDING_WORLD_SIZES = (3, 2)
VOCAB, DIM = 11, 4       # 11 rows: 4 + 4 + 3 on 3 ranks, 6 + 5 on 2: uneven on both


class _Embedding(VocabParallelEmbedding):
    """labkit's embedding with its steps replaceable: the rows it reads, whether it zeroes the others' tokens, the
    operator that joins the ranks."""
    join, zeroed = ReduceFromParallel, True

    def rows(self, idx, mine):
        return torch.where(mine, idx - self.start, 0)

    def forward(self, idx):
        mine = (idx >= self.start) & (idx < self.end)
        y = F.embedding(self.rows(idx, mine), self.weight)
        return self.join.apply(y.masked_fill(~mine.unsqueeze(-1), 0.0) if self.zeroed else y, self.group)


EmbeddingNoOffset = type("EmbeddingNoOffset", (_Embedding,), {"rows": lambda self, idx, mine: torch.where(mine, idx, 0)})
EmbeddingClamped = type("EmbeddingClamped", (_Embedding,), {"zeroed": False, "rows": lambda self, idx, mine: (
    idx - self.start).clamp(0, self.end - self.start - 1)})
EmbeddingNotZeroed = type("EmbeddingNotZeroed", (_Embedding,), {"zeroed": False})
EmbeddingWithF = type("EmbeddingWithF", (_Embedding,), {"join": CopyToParallel})
EmbeddingGBackward = type("EmbeddingGBackward", (_Embedding,), {"join": GReducesInBackward})
EmbeddingAverages = type("EmbeddingAverages", (_Embedding,), {"join": GAverages})

_ONE_RANK = "each token's row is on exactly one rank, and the other ranks contribute zeros"
_ZERO = ("A rank must contribute zeros for the tokens it does not hold: zero its output there, after the lookup "
         "(whatever it read for them), and g's sum then holds each token's row once.")
# variant: the class the check would be given; says: the end of the message (no-offset's: all of it), str.format'ed
# with {r} (the rank), {start}, {end}, {last}, {token}, {calls}, {times}, ...
EMBEDDING_MISTAKES = (
    Mistake("no-offset", EmbeddingNoOffset,
            "{head}: {name}.forward raised IndexError on rank {r} ({error}). Rank {r} holds rows [{start}, {end}) of "
            "the table, and its self.weight numbers them 0 .. {last}: row i of self.weight is token self.start + i, so "
            "this rank's token t is its row t − self.start (was the offset subtracted?). The tokens of the other ranks "
            "have no row here at all: look up a valid row for them or none, and contribute zeros."),
    Mistake("clamped-not-zeroed", EmbeddingClamped,
            "; the ranks that do not hold token {token} added rows of their own to it: clamping the other ranks' "
            "tokens into [0, end − start) gives them a row to read, but that row (garbage for them) is still summed "
            "in. " + _ZERO),
    Mistake("masked-input-only", EmbeddingNotZeroed,
            "; every rank that does not hold token {token} added its row 0 to it: replacing the other ranks' tokens "
            "on input by a valid row avoids the IndexError, but the row read for them is still summed in. " + _ZERO),
    Mistake("f-instead-of-g", EmbeddingWithF,
            "; on rank {r}, y holds the rows of its own tokens only ([{start}, {end})) and zeros for the others', "
            "after {calls}: f's forward is the identity, so nothing joined the ranks. " + _ONE_RANK.capitalize()
            + ": every rank needs the sum of the ranks' outputs in forward, g's all-reduce (f's belongs in backward, "
            "where an input feeds every rank)."),
    Mistake("g-backward-all-reduce", EmbeddingGBackward,
            "; rank {r}'s weight.grad is {times}, after {calls} (expected none). After g every rank holds the same y, "
            "so every rank already holds the same dL/dy, and the lookup's backward adds dL/dy[b, t] to the one row "
            "it read for token idx[b, t]: each rank's rows get exactly their tokens' gradient (the zeroed tokens "
            "give none). g's backward is the identity."),
    Mistake("averages", EmbeddingAverages,
            "; y is the mean of the ranks' outputs, {times}: " + _ONE_RANK + ", so their sum is each token's row. "
            "Sum (ReduceOp.SUM, the default), do not divide by tp."),
)
_RAISES = ("no-offset",)       # its wrong version stops with an IndexError on some ranks: named from the exception


class _SameShapes(Watch):
    """Before each collective, the ranks compare the shapes they hand it: gloo stops the processes on a mismatch
    without a Python error (an embedding that returns one row per token of its own, say), so it is named first."""
    head = ""

    def on_call(self, call, args: dict) -> None:
        tensor = args.get("tensor")
        shapes = everyone(tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None, self)
        if len(set(shapes)) > 1:
            given = and_list(f"rank {k} one of shape {shape}" for k, shape in enumerate(shapes))
            raise CheckFailed(f"{self.head}: in {call.phase}, the ranks handed dist.{call.op} tensors of different "
                              f"shapes ({given}). A collective combines the ranks' tensors element by element: every "
                              f"rank hands it the same shape, here that of the output, (B, T, d) = (2, 7, {DIM}), a "
                              f"row for every token of idx.")


def _tokens() -> torch.Tensor:
    """(2, 7) token ids, the same on every rank: every id of the vocabulary once, three of them twice (their rows'
    gradients add up), shuffled."""
    ids = torch.cat([torch.arange(VOCAB), torch.tensor([2, 5, VOCAB - 1])])
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(3))].view(2, 7)


def _embedding_run(cls, watch: Watch, timeout: float) -> Run:
    """``cls`` against nn.Embedding on this rank: the output, then weight.grad after y.backward(dy), the same dy
    on every rank."""
    N, rank, name = dist.get_world_size(), dist.get_rank(), cls.__name__
    torch.manual_seed(5)
    dense = nn.Embedding(VOCAB, DIM).double()
    idx, dy = _tokens(), _randn(2, 7, DIM, seed=15)
    want_y = dense(idx)
    want_y.backward(dy)
    start, end = chunk_bounds(VOCAB, N)[rank]
    v = dict(want_y=want_y.detach(), want_grad=dense.weight.grad[start:end].clone())
    with watch.installed():
        layer = _student(timeout, f"{name}(embedding, group)", lambda: cls(dense, None))
        try:
            y = _student(timeout, f"{name}.forward", lambda: layer(idx), watch, "forward")
        except IndexError as err:
            raise CheckFailed(EMBEDDING_MISTAKES[0].says.format(
                head=f"{name} is wrong on {N} processes (tp = {N})", name=name, r=rank, error=err, start=start,
                end=end, last=end - start - 1)) from None
        v["y"] = keep(y)
        if all_ranks(_is(y, want_y.shape), watch):
            v["detached"] = not y.requires_grad
            if all_ranks(y.requires_grad, watch):
                _student(timeout, f"y.backward(dy) (backward through your {name}.forward)",
                         lambda: y.backward(dy.clone()), watch, "backward")
                v["grad"] = keep(layer.weight.grad)
    return Run(v, watch.calls)


def _embedding_worker(cls, timeout: float, board_path: str) -> Case:
    board, rank, N = Board(board_path, dist.get_rank(), dist.get_world_size()), dist.get_rank(), dist.get_world_size()

    def run(variant) -> Run:
        watch = _SameShapes(_OPS, deadline=0.5 * timeout, board=board, hint_checking=True)
        watch.head = f"{variant.__name__} is wrong on {N} processes (tp = {N})"
        return _embedding_run(variant, watch, timeout)
    student = run(cls)
    right = close(student.values["want_y"], student.values.get("y")) and \
        close(student.values["want_grad"], student.values.get("grad"))
    mistakes = [m for m in EMBEDDING_MISTAKES if m.name not in _RAISES]
    return Case(rank, rank, N, False, student, variants_if_wrong(right, mistakes, run))


def _owner(token: int, tp: int) -> tuple[int, int]:
    """(the rank that holds token's row, the row's index in that rank's weight)."""
    k = next(k for k, (a, b) in enumerate(chunk_bounds(VOCAB, tp)) if a <= token < b)
    return k, token - chunk_bounds(VOCAB, tp)[k][0]


def _element(label: str, bad: tuple) -> str:
    """``'label: expected x, got y'`` for :func:`first_mismatch`'s ``bad``."""
    e, g = fmt_pair(*bad[1:])
    return f"{label}: expected {e}, got {g}"


def _embedding_problem(name: str, N: int, cases: list) -> str | None:
    """The first wrong value (every rank's output, then every rank's weight.grad), named by the first known mistake
    whose run gave the same; then communication in backward, or more than one collective in forward."""
    head, idx = f"{name} is wrong on {N} processes (tp = {N})", _tokens()
    for key, want_key, phase in (("y", "want_y", "forward"), ("grad", "want_grad", "backward")):
        for case in cases:
            run, r = case.student, case.rank
            got, want = run.values.get(key), run.values[want_key]
            if close(want, got):
                continue
            start, end = chunk_bounds(VOCAB, N)[r]
            if key == "grad" and run.values.get("detached"):
                return f"{head}: on rank {r}, {_DETACHED}"
            words = dict(r=r, start=start, end=end, token="", calls=_calls_text(run.calls, phase),
                         times=factor_words(factor(want, got), N))
            bad = first_mismatch(want, got) if _is(got, want.shape) else None
            if key == "y":
                where = f"{head}: on rank {r}, y = layer(idx) with the same idx on every rank: "
                if bad:
                    token = int(idx[bad[0][:2]])
                    k, row = _owner(token, N)
                    words["token"] = token
                    where += _element(f"y{fmt_index(bad[0])} (token {token}, whose row is rank {k}'s row {row})", bad)
                else:
                    where += element_text("y", want, got)
            elif got is None:
                return (f"{head}: on rank {r}, after y.backward(dy), weight.grad is None: no gradient reached this "
                        f"rank's rows (is self.weight used in forward, without .detach()?).")
            else:
                where = f"{head}: on rank {r}, after y.backward(dy) with the same dy on every rank: "
                if bad:
                    i = bad[0][0]
                    where += _element(f"weight.grad{fmt_index(bad[0])} (rank {r}'s row {i}, token {start + i}, "
                                      f"{plural(int((idx == start + i).sum()), 'time')} in idx)", bad)
                else:
                    where += element_text("weight.grad", want, got)

            def looks_like(m: Mistake) -> bool:   # the same value, communicating in the same phases; for a
                variant = case.variants.get(m.name)   # gradient, after the same (right) output
                return (variant is not None and close(variant.values.get(key), got)
                        and bool(variant.count(phase)) == bool(run.count(phase))
                        and (key == "y" or close(run.values.get("y"), variant.values.get("y"))))
            mistake = find_mistake(EMBEDDING_MISTAKES, looks_like)
            if mistake:
                return where + mistake.says.format(**words)
            if key == "y":
                return where + (f": {words['times']}" if words["times"] else "") + (
                    ". Every rank must return the whole embedding of every token, the same on every rank: the row "
                    "of token t, whichever rank holds it.")
            return where + (f": {words['times']}, after {words['calls']}" if words["times"] else "") + (
                f". Rank {r}'s rows must get their dense gradient: for each row, the sum of dL/dy over the positions "
                f"of its token in idx, and nothing else.")
    for case in cases if N > 1 else ():
        run, start = case.student, f"{head}: the numbers are right, but on rank {case.rank}"
        if run.count("backward"):
            return (f"{start} there {'was' if run.count('backward') == 1 else 'were'} "
                    f"{_calls_text(run.calls, 'backward')}: every rank holds the same dL/dy after g, and the lookup's "
                    f"backward sends it to this rank's rows only, so the backward needs no communication.")
        if run.count("forward") > 1:
            return f"{start} there were {_calls_text(run.calls, 'forward')}: one is enough."
    return None


def check_vocab_parallel_embedding(cls, *, world_sizes=EMBEDDING_WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercise 5i: ``cls`` subclasses labkit's :class:`~labkit.tensor_parallel_gpt.VocabParallelEmbedding`
    (its ``__init__``: rank r keeps rows [start, end) of the table) and writes ``forward``. Against
    ``nn.Embedding(11, 4)`` on each of ``world_sizes``, in float64, with every token id in idx and some twice: the
    output on every rank, and each rank's ``weight.grad`` (its rows of the dense gradient); no communication in
    backward."""
    __tracebackhide__ = True
    if not isinstance(cls, type):
        fail(f"pass your class itself (check_vocab_parallel_embedding(VocabParallelEmbedding)), not a "
             f"{type(cls).__name__} object")
    if not issubclass(cls, VocabParallelEmbedding):
        fail(f"{cls.__name__} must be a subclass of labkit's embedding, as in the notebook: class {cls.__name__}("
             f"labkit.tensor_parallel_gpt.VocabParallelEmbedding), whose __init__ keeps this rank's rows")
    name, calls = cls.__name__, []
    for N in world_sizes:
        with board_dir() as board:
            cases = run_on_ranks(_embedding_worker, cls, timeout, board, world_size=N, timeout=timeout, name=name,
                                 task="5i", device="cpu")
        problem = _embedding_problem(name, N, cases)
        if problem:
            fail(problem)
        calls += [c for case in cases for c in case.student.calls]
    collective = "all-reduce" if all(c.op == "all_reduce" for c in calls) else "collective"
    shown = "; ".join(f"{' + '.join(str(b - a) for a, b in chunk_bounds(VOCAB, n))} on {n}" for n in world_sizes)
    passed(f"{name} equals nn.Embedding({VOCAB}, {DIM}) on {_sizes(world_sizes)} (the rows cut {shown}): every rank "
           f"returns every token's row, each rank's weight.grad is its rows of the dense gradient (repeated tokens "
           f"summed), one {collective} in forward, none in backward")
