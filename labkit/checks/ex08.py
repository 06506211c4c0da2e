"""Checkers for exercise 8, ZeRO and FSDP from the inside (``solutions/08_zero_fsdp_exercise.ipynb``).

    check_zero1(Zero1)                      # 8a: shard and step of a labkit.zero.ZeroOptimizer subclass
    check_fsdp_unit(MyUnit)                 # 8b: gather, free and reduce_scatter_grads of a labkit.fsdp.Unit subclass
    check_zero_bytes(zero_bytes_per_rank)   # 8c: the bytes a rank keeps under ZeRO stages 0-3, and sends per step

Each prints one ``✓`` line when the code is right and raises :class:`labkit.checks.CheckFailed` naming the
mistake when it is not.

8a. The student's subclass of :class:`labkit.zero.ZeroOptimizer` writes ``shard(bucket)`` (this rank's chunk of a
bucket's parameters: the master copy it keeps and updates) and ``step()`` (ZeRO stage 1: reduce-scatter the mean
gradient into each ``bucket.master.grad``, step the optimizer on the chunks, all-gather them back into the
parameters). On 3, 2 and 4 processes, a float64 MLP of 67 parameters (no world size divides it; with one parameter
per bucket, a bias of one element leaves chunks of pure padding) takes 3 AdamW steps with one bucket and with one
parameter per bucket, next to labkit's ZeroOptimizer on the same data (and, on the first world size, torch's
ZeroRedundancyOptimizer with DDP; one process is computed here). The shards right after the construction,
``master.grad`` when the optimizer steps, the parameters after each step, the collectives of each step (through
torch.distributed or labkit.comm, each counted once; a reduce-scatter or all-gather whose tensors cannot work is
named before gloo fails) and the optimizer state kept are compared; all ranks stop together at the first step where
one is wrong, and :data:`ZERO_MISTAKES` names what is wrong.

8b. The student's subclass of :class:`labkit.fsdp.Unit` writes ``gather`` (refill the freed buffer's storage and
all-gather the shards into it), ``free`` (give the storage back) and ``reduce_scatter_grads`` (the mean gradient of
this rank's chunk into ``shard.grad``, the whole gradients released). On 3, 2 and 4 processes labkit's FSDP runs a
float64 GPT of 3 blocks made of those units, without and with prefetch, 3 AdamW steps (the last accumulating two
micro-batches), next to labkit's own units (and, on the first world size, torch's ``fully_shard``). After every
call of the three methods the parameters must still be views of ``self.buffer`` and a synchronous gather must have
waited; each step is checked for its all-gathers and reduce-scatters (1 + 2L and 1 + L per micro-batch), the
gradients the optimizer sees, the shards after it, and the memory: the bytes gathered after each gather, free and
block forward against the prediction (the root and one block, one more with prefetch; the shards, Ψ/N, besides),
nothing gathered between steps, no whole gradient kept. :data:`UNIT_MISTAKES` names the known mistakes.

8c. ``zero_bytes_per_rank(psi, n, stage, mixed_precision=True)`` returns the bytes one rank keeps of each kind
(parameters, gradients, Adam's state, fp32 master weights) and the bytes it sends per step, data parallel on n ranks
with ZeRO stage 0-3. Compared in this process with :func:`labkit.memory.predict` and
:func:`labkit.zero.bytes_sent_per_step` over a grid of sizes, world sizes and stages (:data:`BYTES_MISTAKES` names
the classic slips), then with what labkit's DDP, ZeroOptimizer (stages 1, 2) and FSDP keep and send on 4 processes.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from labkit import comm
from labkit.checks import CheckFailed, call_repr, describe, fail, first_mismatch, fmt_number, fmt_pair, passed, \
    run_on_ranks, time_limit
from labkit.checks.harness import (Described, Mistake, all_ranks, and_list, as_number, bound, call_student, close,
                                   factor, find_mistake, keep, not_written, plural)
from labkit.cost_model import ring_bytes_sent
from labkit.fsdp import FSDP, Unit
from labkit.models import GPT, GPTConfig
from labkit.zero import ZeroBucket, ZeroOptimizer, bytes_sent_per_step

__all__ = ["check_zero1", "check_fsdp_unit", "check_zero_bytes", "ZERO_MISTAKES", "UNIT_MISTAKES", "BYTES_MISTAKES",
           "wrong_zero", "wrong_unit", "WORLD_SIZES", "ZERO_CONFIGS", "FSDP_CONFIG", "zero_bytes_reference",
           "BYTES_CASES"]

WORLD_SIZES = (3, 2, 4)   # 3 first: a first failure on 3 ranks reads best
_RTOL, _ATOL = 1e-9, 1e-12


def _same(want: torch.Tensor, got) -> bool:
    return close(want, got, _RTOL, _ATOL)


def _element(label: str, want: torch.Tensor, got: torch.Tensor, index_of: Callable = None) -> str:
    """``'label[i]: expected x, got y'`` at the first differing element (``index_of(i)`` names a flat index)."""
    index, e, g = first_mismatch(want, got, _RTOL, _ATOL)
    e, g = fmt_pair(e, g)
    where = index_of(index[0]) if index_of else f"{label}[{', '.join(map(str, index))}]"
    return f"{where}: expected {e}, got {g}"


class _Done:
    """A handle with nothing left to wait for."""

    def wait(self, timeout=None) -> bool:
        return True


# ============================================================================================
# The collectives a rank makes, through torch.distributed or labkit.comm, each counted once
# ============================================================================================

_OPS = {"all_reduce": "all_reduce", "all_gather": "all_gather", "all_gather_into_tensor": "all_gather",
        "all_gather_single": "all_gather", "reduce_scatter": "reduce_scatter", "reduce_scatter_tensor":
        "reduce_scatter", "reduce_scatter_single": "reduce_scatter", "broadcast": "broadcast"}
_OUT_NAMES, _IN_NAMES = ("output_tensor", "output"), ("input_tensor", "input", "t")


class _Collectives:
    """Inside the ``with`` block, every collective this rank starts is recorded as ``(op, numel of its input)``: once,
    whether the code calls torch.distributed or labkit.comm (which calls torch.distributed in turn). A reduce-scatter or
    all-gather whose tensors cannot work (an input that is not N times the output, an output whose storage was freed)
    stops with :class:`CheckFailed` saying so, instead of torch's error from inside gloo."""

    def __init__(self, head: str):
        self.head, self.calls, self._inside, self._saved = head, [], False, []

    def __enter__(self) -> "_Collectives":
        for module in (dist, comm):
            for name, op in _OPS.items():
                if hasattr(module, name):
                    fn = getattr(module, name)
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._counted(op, fn))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, fn in self._saved:
            setattr(module, name, fn)
        self._saved = []

    def _counted(self, op: str, fn: Callable) -> Callable:
        def counted(*args, **kwargs):
            __tracebackhide__ = True
            if self._inside:
                return fn(*args, **kwargs)
            self._inside = True
            try:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                out = args[0] if args else next((kwargs[k] for k in _OUT_NAMES if k in kwargs), None)
                inp = args[1] if len(args) > 1 else next((kwargs[k] for k in _IN_NAMES if k in kwargs), None)
                if op in ("all_gather", "reduce_scatter") and isinstance(out, torch.Tensor) \
                        and isinstance(inp, torch.Tensor):
                    self._preflight(op, out, inp)
                    self.calls.append((op, inp.numel()))
                else:
                    self.calls.append((op, tensors[0].numel() if tensors else 0))
                return fn(*args, **kwargs)
            finally:
                self._inside = False
        return counted

    def _preflight(self, op: str, out: torch.Tensor, inp: torch.Tensor) -> None:
        __tracebackhide__ = True
        N, rank = dist.get_world_size(), dist.get_rank()
        if out.dtype != inp.dtype:
            raise CheckFailed(f"{self.head}: on rank {rank}, a {op.replace('_', '-')} from {inp.dtype} into "
                              f"{out.dtype}: its output must have its input's dtype (torch.empty(n) and torch.zeros(n) "
                              f"make float32: torch.empty_like(t), t.new_empty(n) or dtype=t.dtype make t's dtype).")
        if out.untyped_storage().nbytes() < (out.storage_offset() + out.numel()) * out.element_size():
            raise CheckFailed(f"{self.head}: " + _say(_UNIT_SAYS, "gather not refilling", r=rank, n=out.numel(),
                                                      nbytes=out.untyped_storage().nbytes()))
        if op == "reduce_scatter" and inp.numel() != N * out.numel():
            raise CheckFailed(f"{self.head}: " + _UNPADDED.format(r=rank, got=inp.numel(), out=out.numel(), N=N,
                                                                   want=N * out.numel()))
        if op == "all_gather" and out.numel() != N * inp.numel():
            raise CheckFailed(f"{self.head}: on rank {rank}, an all-gather got an input of {inp.numel()} numbers "
                              f"for an output of {out.numel()}: its output must hold N·c = {N}·{inp.numel()} = "
                              f"{N * inp.numel()} numbers (rank r's tensor lands at chunk r).")


# What both checks say of a gradient N times, or 1/N of, the mean (``grad``: which tensor, where)
_SUM = ("at step {t}, when the optimizer stepped, {grad} on rank {r} was N = {N} times the mean gradient (measured "
        "factor {factor}): the reduce-scatter sums the N ranks' gradients, and the mean is the sum divided by N. "
        "Divide the flat gradients by the world size before the reduce-scatter.")
_TWICE = ("at step {t}, when the optimizer stepped, {grad} on rank {r} was 1/N of the mean gradient (measured factor "
          "{factor}): divided by N = {N} twice (or ReduceOp.AVG and a division)? Divide once.")
_UNPADDED = ("on rank {r}, a reduce-scatter got an input of {got} numbers for an output of {out}: its input must hold "
             "N·c = {N}·{out} = {want} numbers (rank r receives the sum of chunk r). Lay the gradients end to end in a "
             "flat vector of N·c numbers, padded with zeros after the P real ones (c = ⌈P/N⌉), and reduce-scatter it "
             "into a tensor of c.")


def _say(says: dict, name: str, **fields) -> str:
    return says[name].format(**fields)


def _not_written(cls: type, task: str, calls: dict, err: NotImplementedError) -> NotImplementedError:
    """The stub that stopped the check, and every other method of ``cls`` not written yet (each called here on a
    stand-in for ``self``: a stub raises at once, written code does something else, even fail)."""
    return not_written([(task, f"{cls.__name__}.{m}", lambda m=m, args=args: getattr(cls, m)(*args))
                        for m, args in calls.items()], err, task)


def _ops_text(calls: list) -> str:
    return ", ".join(f"{op}({n})" for op, n in calls) or "none"


def _count(calls: list, op: str) -> int:
    return sum(o == op for o, _ in calls)


_WATCHED = ("(The check counts the calls of torch.distributed's and labkit.comm's functions: call them as "
            "comm.reduce_scatter_tensor or dist.reduce_scatter_tensor, not through a name imported with `from ... "
            "import`.)")


# ============================================================================================
# 8a. ZeRO stage 1: the shard and the step
# ============================================================================================

ZERO_STEPS, ZERO_LR, ZERO_DECAY = 3, 0.05, 0.1
# label, bucket_cap_mb: one bucket of all 67 parameters; one parameter per bucket (1, 3, 3, 15, 5, 40 numbers)
ZERO_CONFIGS = (("one bucket", 25.0), ("one parameter per bucket", 1e-9))


def _zero_model() -> nn.Module:
    torch.manual_seed(8)
    # 8·5+5 + 5·3+3 + 3·1+1 = 67 parameters: no world size of 2..4 divides them
    return nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _zero_batch(step: int, world_size: int):
    g = torch.Generator().manual_seed(800 + step)
    x = torch.randn(4 * world_size, 8, generator=g, dtype=torch.float64)
    return x, torch.sin(x[:, :3].sum(1, keepdim=True))


def _adamw(params):
    return torch.optim.AdamW(params, lr=ZERO_LR, weight_decay=ZERO_DECAY)


def _zero_one_process(world_size: int) -> list:
    model = _zero_model()
    opt = _adamw(model.parameters())
    for step in range(ZERO_STEPS):
        x, y = _zero_batch(step, world_size)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


# --- the known mistakes, each a change of labkit's ZeroOptimizer ---------------------------------------------------

def _padded(self, bucket) -> torch.Tensor:
    return bucket.flat([p.detach() for p in bucket.params], self.world_size)


def _from(self, bucket, start: int, length: int) -> torch.Tensor:
    return _padded(self, bucket)[start:start + length].clone()


def _scaled_launch(factor_of: Callable) -> Callable:
    """labkit's reduce-scatter launch with the flat gradients multiplied by ``factor_of(N)`` first."""
    def launch(self, index, flat):
        ZeroOptimizer._launch(self, index, flat.mul_(factor_of(self.world_size)))
    return launch


def _own_gradient(self, index, flat) -> None:
    bucket = self.buckets[index]
    bucket.master.grad = flat[self.rank * bucket.chunk:(self.rank + 1) * bucket.chunk] / self.world_size
    bucket.work = _Done()


def _all_reduced(self, index, flat) -> None:
    bucket = self.buckets[index]
    comm.all_reduce(flat.div_(self.world_size))
    bucket.master.grad = flat[self.rank * bucket.chunk:(self.rank + 1) * bucket.chunk].clone()
    bucket.work = _Done()


def _whole_bucket_grad(self, index, flat) -> None:
    comm.all_reduce(flat.div_(self.world_size))
    self.buckets[index].master.grad, self.buckets[index].work = flat, _Done()


def _whole_bucket_back(self, index) -> None:
    bucket = self.buckets[index]
    for p, offset in zip(bucket.params, bucket.offsets):
        p.copy_(bucket.master.detach()[offset:offset + p.numel()].view_as(p))


def _gathered_not_copied(self, index) -> None:
    bucket = self.buckets[index]
    gathered = bucket.master.new_empty(self.world_size * bucket.chunk)
    comm.all_gather_into_tensor(gathered, bucket.master.detach())
    for p, offset in zip(bucket.params, bucket.offsets):
        p = gathered[offset:offset + p.numel()].view_as(p)          # a new name, not the parameter


def _own_chunk_back(self, index) -> None:
    bucket = self.buckets[index]
    flat = bucket.flat([p.detach() for p in bucket.params], self.world_size)
    flat[self.rank * bucket.chunk:(self.rank + 1) * bucket.chunk] = bucket.master.detach()
    for p, offset in zip(bucket.params, bucket.offsets):
        p.copy_(flat[offset:offset + p.numel()].view_as(p))


def _copied_from_zero(self, index) -> None:
    bucket = self.buckets[index]
    offsets, bucket.offsets = bucket.offsets, [0] * len(bucket.offsets)
    try:
        ZeroOptimizer._gather(self, index)
    finally:
        bucket.offsets = offsets


def _no_optimizer_step(self) -> None:
    real = self.optimizer.step
    self.optimizer.step = lambda *args, **kwargs: None
    try:
        ZeroOptimizer.step(self)
    finally:
        self.optimizer.step = real


_OWNER = ("the reduce-scatter hands rank r the summed gradients of chunk r, and the all-gather puts rank r's tensor at "
          "chunk r: rank r owns chunk r, elements [r·c, (r+1)·c) of the padded flat vector.")
_GATHER_HOW = ("all-gather every bucket's master into a tensor of N·c numbers (comm.all_gather_into_tensor) and copy "
               "each parameter's slice of it into the parameter in place: p.copy_(gathered[offset:offset + "
               "p.numel()].view_as(p)).")

# Tried in this order by the diagnosis (each at its own moment: the shards, the gradients, the parameters, the
# traffic); the tests build every row with wrong_zero().
ZERO_MISTAKES = (
    # the shard, seen right after the construction
    Mistake("whole bucket on every rank", dict(shard=lambda self, b: _padded(self, b).clone(),
                                               _launch=_whole_bucket_grad, _gather=_whole_bucket_back),
            "rank {r}'s shard of {bucket} is the whole bucket ({k} numbers): every rank then keeps and steps every "
            "parameter, with Adam's m and v for all of them, and nothing is sharded (ZeRO-1 keeps c = ⌈P/N⌉ = {c} "
            "numbers per rank, 1/N of the state). Return chunk r only."),
    Mistake("padding dropped", dict(shard=lambda self, b: torch.cat([p.detach().reshape(-1) for p in b.params])[
        self.rank * b.chunk:(self.rank + 1) * b.chunk].clone()),
            "rank {r}'s shard of {bucket} has {k} numbers, not c = {c}: chunk r of the flat vector padded with zeros "
            "to N·c = {nc} numbers (bucket.flat pads it). The collectives need N chunks of equal length, even where a "
            "chunk is partly or only padding (here rank {r}'s chunk holds {real} real parameters)."),
    Mistake("chunks of ⌊P/N⌋", dict(shard=lambda self, b: _from(self, b, self.rank * (b.numel // self.world_size),
                                                                 b.numel // self.world_size)),
            "rank {r}'s shard of {bucket} has {k} = ⌊P/N⌋ = ⌊{P}/{N}⌋ numbers: with chunks rounded down, the last "
            "{missed} of the {P} parameters belong to no rank and would never be updated. Round up, c = ⌈P/N⌉ = {c}, "
            "and pad the flat vector with zeros to N·c."),
    Mistake("overlapping chunks", dict(shard=lambda self, b: _from(self, b, self.rank * (b.numel // self.world_size),
                                                                   b.chunk)),
            "rank {r}'s shard of {bucket} is elements [{start}, {stop}) of its flat vector: it starts at "
            "r·⌊P/N⌋ = {start} but is c = ⌈P/N⌉ = {c} long, so the chunks overlap and {repeated} are kept by two ranks "
            "(and the last parameters by none). Rank r's chunk starts at r·c = {want_start}."),
    Mistake("wrong owner", dict(shard=lambda self, b: _from(self, b, (self.world_size - 1 - self.rank) * b.chunk,
                                                            b.chunk)),
            "rank {r} keeps chunk {k} (elements [{start}, {stop})) of {bucket}, not chunk {r}: " + _OWNER),
    # the gradient the optimizer sees (bucket.master.grad when self.optimizer.step() is called)
    Mistake("no optimizer step", dict(step=_no_optimizer_step),
            "at step {t} rank {r}'s optimizer never stepped (self.optimizer.step() was not called), so no chunk "
            "changed. After the reduce-scatter, call self.optimizer.step(): it updates every bucket.master from "
            "bucket.master.grad."),
    Mistake("sum instead of mean", dict(_launch=_scaled_launch(lambda n: n)), _SUM + " (Adam hides most of it, its "
            "step hardly depends on the gradient's scale; SGD would not.)"),
    Mistake("divided twice", dict(_launch=_scaled_launch(lambda n: 1 / n)), _TWICE),
    Mistake("no reduce-scatter", dict(_launch=_own_gradient),
            "at step {t}, bucket.master.grad of {bucket} on rank {r} is rank {r}'s own gradient of its chunk{scaled}, "
            "not the mean over the ranks: nothing brought the other ranks' gradients. Reduce-scatter the bucket's "
            "flat gradients (N·c numbers, divided by N) into bucket.master.grad: comm.reduce_scatter_tensor(out, "
            "flat)."),
    # the parameters after the step
    Mistake("no all-gather", dict(_gather=lambda self, index: None),
            "after step {t} rank {r}'s parameters are what they were before the step, and no all-gather was made: "
            "the optimizer updated each bucket.master (this rank's chunk), but nothing brought the updated chunks back "
            "into the model. " + _GATHER_HOW[0].upper() + _GATHER_HOW[1:]),
    Mistake("gathered, not copied", dict(_gather=_gathered_not_copied),
            "after step {t} rank {r}'s parameters are what they were before the step, although the all-gather ran: "
            "the gathered values never reached the parameters. Copy them in place, p.copy_(gathered[offset:offset + "
            "p.numel()].view_as(p)) under torch.no_grad(); `p = ...` only gives the name p to a new tensor."),
    Mistake("own chunk only", dict(_gather=_own_chunk_back),
            "after step {t} only chunk {r} of {bucket} moved on rank {r} ({where} still has its value from before "
            "the step): each rank copied its own updated chunk back, and the other ranks' chunks never arrived. "
            + _GATHER_HOW[0].upper() + _GATHER_HOW[1:]),
    Mistake("wrong offsets", dict(_gather=_copied_from_zero),
            "after step {t} on rank {r}, {element}: {param} received the start of {bucket}'s gathered vector, but "
            "it starts at offset {offset}. Copy gathered[offset:offset + p.numel()] into each parameter, with the "
            "offsets of bucket.offsets."),
    Mistake("flat not padded", dict(_launch=lambda self, index, flat: ZeroOptimizer._launch(
        self, index, flat[:self.buckets[index].numel])), _UNPADDED),
    # the traffic, once every number is right
    Mistake("all-reduce instead of reduce-scatter", dict(_launch=_all_reduced),
            "the parameters are right, but rank {r} sent {sent} numbers per step where ZeRO-1 sends {want}: it "
            "all-reduced each bucket's N·c gradients and kept its chunk. An all-reduce is a reduce-scatter followed by "
            "an all-gather of the sums, which no rank needs: reduce-scatter the flat gradients into bucket.master.grad "
            "directly (comm.reduce_scatter_tensor), and the all-gather of the updated chunks completes the step."),
)
_ZERO_SAYS = {m.name: m.says for m in ZERO_MISTAKES}


def wrong_zero(mistake: Mistake) -> type:
    """labkit's ZeroOptimizer with the mistake's methods, named after it ("no all-gather" -> NoAllGather)."""
    name = "".join(w[:1].upper() + w[1:] for w in mistake.name.replace("-", " ").replace("⌊P/N⌋", "floor").replace(
        ",", "").split())
    return type(name, (ZeroOptimizer,), dict(mistake.variant))


# --- in the launched processes --------------------------------------------------------------------------------

def _recording(cls: type, name: str) -> type:
    """The student's class, its shard() checked as it returns (a tensor of c numbers, or the check says what it got)."""
    class Recorded(cls):
        def shard(self, bucket):
            __tracebackhide__ = True
            out = call_student(super().shard, bucket, name=f"{name}.shard", task="8a", where=f"on rank {self.rank}")
            if not isinstance(out, torch.Tensor):
                raise CheckFailed(f"{name}.shard returned {describe(out)} on rank {self.rank} for a bucket of "
                                  f"{bucket.numel} parameters: return this rank's chunk, a tensor of c = ⌈P/N⌉ = "
                                  f"{bucket.chunk} numbers.")
            return out.detach()
    Recorded.__name__ = Recorded.__qualname__ = cls.__name__
    return Recorded


def _zero_run(cls, cap: float, name: str, seconds: float, reference: dict | None = None) -> dict:
    """3 AdamW steps with ``cls`` (the student's when ``reference`` is given: then all ranks stop together at the
    first step where some rank differs from it)."""
    rank, N = dist.get_rank(), dist.get_world_size()
    model = _zero_model()
    params = list(model.parameters())
    names = {p: n for n, p in model.named_parameters()}
    student = reference is not None
    late = f"did not return within {seconds:g} s on rank {rank} ({N} processes): an endless loop?"
    with time_limit(seconds, f"{name}(...) {late}"):
        opt = cls(params, _adamw, stage=1, bucket_cap_mb=cap)
    layout = [dict(numel=b.numel, chunk=b.chunk, offsets=list(b.offsets), names=[names[p] for p in b.params],
                   shapes=[tuple(p.shape) for p in b.params]) for b in opt.buckets]
    record = dict(layout=layout, shards=[b.master.detach().clone() for b in opt.buckets], steps=[], right=True)
    if student and not all_ranks(all(_real_same(r, s, lay, rank)
                                     for s, r, lay in zip(record["shards"], reference["shards"], layout))):
        record["right"] = False
        return record
    seen: list = []
    real_step = opt.optimizer.step

    def optimizer_step(*args, **kwargs):
        seen.append([None if b.master.grad is None else b.master.grad.detach().clone() for b in opt.buckets])
        return real_step(*args, **kwargs)
    opt.optimizer.step = optimizer_step
    for step in range(ZERO_STEPS):
        x, y = _zero_batch(step, N)
        mine = slice(4 * rank, 4 * rank + 4)
        opt.zero_grad()
        ((model(x[mine]) - y[mine]) ** 2).mean().backward()
        local = [p.grad.detach().clone() for p in params]
        before = [p.detach().clone() for p in params]
        seen.clear()
        with time_limit(seconds, f"{name}.step {late}"), _Collectives(f"{name} is wrong on {N} processes") as calls:
            if student:
                call_student(opt.step, name=f"{name}.step", task="8a", where=f"on rank {rank} at step {step + 1}")
            else:
                opt.step()
        record["steps"].append(dict(local=local, before=before, grads=seen[0] if seen else None, stepped=len(seen),
                                    params=[p.detach().clone() for p in params], calls=calls.calls))
        if student and not all_ranks(_zero_step_right(reference["steps"][step], record["steps"][-1], layout, rank)):
            record["right"] = False
            return record
    record["state_bytes"] = opt.state_bytes()
    return record


def _real(lay: dict, rank: int) -> int:
    """How many numbers of rank's chunk of a bucket (or unit) ``lay`` are real parameters (the rest is padding)."""
    return max(0, min(lay["chunk"], lay["numel"] - rank * lay["chunk"]))


def _real_same(want, got, lay: dict, rank: int) -> bool:
    """``got`` has ``want``'s shape and equals it on the real part of rank's chunk (the padding may hold anything)."""
    n = _real(lay, rank)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and _same(want[:n], got[:n])


def _zero_step_right(want: dict, got: dict, layout: list, rank: int) -> bool:
    if got["grads"] is None or got["stepped"] != 1:
        return False
    return (all(_real_same(w, g, lay, rank) for w, g, lay in zip(want["grads"], got["grads"], layout))
            and all(_same(w, g) for w, g in zip(want["params"], got["params"])))


def _torch_zero_run() -> list:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    rank, N = dist.get_rank(), dist.get_world_size()
    model = _zero_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=ZERO_LR, weight_decay=ZERO_DECAY)
    for step in range(ZERO_STEPS):
        x, y = _zero_batch(step, N)
        mine = slice(4 * rank, 4 * rank + 4)
        opt.zero_grad()
        ((ddp(x[mine]) - y[mine]) ** 2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _zero_worker(cls, name: str, seconds: float, with_torch: bool) -> dict:
    out = dict(torch=_torch_zero_run() if with_torch else None, configs=[])
    for label, cap in ZERO_CONFIGS:
        reference = _zero_run(ZeroOptimizer, cap, "labkit", seconds)
        got = _zero_run(_recording(cls, name), cap, name, seconds, reference)
        out["configs"].append((label, reference, got))
        if not got["right"]:
            break
    return out


# --- in the checker's process: what is wrong ---------------------------------------------------------------------

def _bucket_text(layout: list, b: int) -> str:
    lay = layout[b]
    names = and_list(lay["names"]) if len(lay["names"]) <= 3 else f"{len(lay['names'])} tensors"
    return f"bucket {b} ({names}: P = {lay['numel']} numbers)"


def _flat_index(lay: dict, i: int) -> str:
    """Element i of a bucket's flat vector, as a parameter's element."""
    for name, shape, offset in zip(lay["names"], lay["shapes"], lay["offsets"]):
        n = math.prod(shape)
        if offset <= i < offset + n:
            index = torch.unravel_index(torch.tensor(i - offset), shape) if shape else ()
            return f"{name}[{', '.join(str(int(k)) for k in index)}]"
    return f"padding element {i}"


def _flat(tensors: list, lay: dict, N: int, names: list) -> torch.Tensor:
    """The bucket's tensors (``tensors`` in the order of ``names``) laid end to end, padded to N·c."""
    by_name = dict(zip(names, tensors))
    out = torch.zeros(N * lay["chunk"], dtype=torch.float64)
    for name, offset in zip(lay["names"], lay["offsets"]):
        t = by_name[name].reshape(-1)
        out[offset:offset + t.numel()] = t
    return out


_ZERO_NAMES = [n for n, _ in _zero_model().named_parameters()]


def _shard_problem(head: str, layout: list, shards: list, N: int) -> str | None:
    initial = [p.detach() for p in _zero_model().parameters()]
    for b in sorted(range(len(layout)), key=lambda b: -layout[b]["numel"]):   # the largest: unambiguous windows
        lay = layout[b]
        P, c = lay["numel"], lay["chunk"]
        flat = _flat(initial, lay, N, _ZERO_NAMES)
        sizes = [shards[r][b].numel() for r in range(N)]
        fields = dict(bucket=_bucket_text(layout, b), c=c, nc=N * c, P=P, N=N)
        if any(k != c for k in sizes):
            r = next(r for r, k in enumerate(sizes) if k != c)
            fields.update(r=r, k=sizes[r], real=_real(lay, r))
            if all(k in (N * c, P) for k in sizes):
                return f"{head}: " + _say(_ZERO_SAYS, "whole bucket on every rank", **fields)
            if sizes == [_real(lay, q) for q in range(N)]:
                return f"{head}: " + _say(_ZERO_SAYS, "padding dropped", **fields)
            if all(k == P // N for k in sizes):
                return f"{head}: " + _say(_ZERO_SAYS, "chunks of ⌊P/N⌋", missed=P - N * (P // N), **fields)
            return (f"{head}: rank {r}'s shard of {fields['bucket']} has {sizes[r]} numbers, expected c = ⌈P/N⌉ = "
                    f"⌈{P}/{N}⌉ = {c} (this rank's chunk of the flat vector padded to N·c = {N * c}).")
        for r in range(N):
            n = _real(lay, r)
            want, got = flat[r * c:(r + 1) * c], shards[r][b]
            if _same(want[:n], got[:n]):
                continue
            fields.update(r=r)
            starts = [s for s in range(N * c - c + 1) if _same(flat[s:s + c], got)]
            owners = [s // c for s in starts if s % c == 0]
            if owners:
                k = owners[0]
                return f"{head}: " + _say(_ZERO_SAYS, "wrong owner", k=k, start=k * c, stop=(k + 1) * c, **fields)
            if starts and starts[0] == r * (P // N):
                s = starts[0]
                others = [(q * (P // N), q * (P // N) + c) for q in range(N) if q != r]
                twice = sorted(i for i in range(s, min(s + c, P)) if any(a <= i < z for a, z in others))
                repeated = "elements " + and_list(_flat_index(lay, i) for i in twice[:3]) + (
                    f" (and {len(twice) - 3} more)" if len(twice) > 3 else "")
                return f"{head}: " + _say(_ZERO_SAYS, "overlapping chunks", start=s, stop=s + c, want_start=r * c,
                                          repeated=repeated, **fields)
            if starts:
                return (f"{head}: rank {r}'s shard of {fields['bucket']} is elements [{starts[0]}, {starts[0] + c}) of "
                        f"its flat vector, not [r·c, (r+1)·c) = [{r * c}, {(r + 1) * c}): " + _OWNER)
            return (f"{head}: rank {r}'s shard of {fields['bucket']} is not its chunk of the parameters: "
                    + _element("", want[:n], got[:n], lambda i, r=r: _flat_index(lay, r * c + i))
                    + " (the shard is the bucket's parameters, as they are at the start, elements [r·c, (r+1)·c) of "
                      "the flat vector).")
    return None


def _scale_problem(head: str, says: dict, want: torch.Tensor, got, n: int, fields: dict) -> str | None:
    """What both checks say of a wrong gradient the optimizer saw (``got``, labkit's ``want``; ``n`` real numbers):
    not a tensor of c numbers, or N times or 1/N of the mean (the rows of ``says``); None when it is neither."""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        shown = got if isinstance(got, Described) else describe(got)
        return (f"{head}: at step {fields['t']}, when the optimizer stepped, {fields['grad']} on rank {fields['r']} "
                f"was {shown}: reduce-scatter the mean gradients into a new tensor of c = {fields['c']} numbers, and "
                f"set the gradient to it (or add it to the one there) before the optimizer steps.")
    f, N = factor(want[:n], got[:n]), fields["N"]
    for value, mistake in ((N, "sum instead of mean"), (1 / N, "divided twice")):
        if f is not None and abs(f - value) < 1e-6 * value:
            return f"{head}: " + _say(says, mistake, factor=fmt_number(f), **fields)
    return None


def _grad_problem(head: str, t: int, layout: list, want: dict, got: dict, r: int, N: int) -> str | None:
    if got["stepped"] == 0:
        return f"{head}: " + _say(_ZERO_SAYS, "no optimizer step", t=t, r=r)
    if got["stepped"] > 1:
        return (f"{head}: at step {t} rank {r}'s optimizer stepped {got['stepped']} times: step it once per step, "
                f"after every bucket's reduce-scatter.")
    for b, lay in enumerate(layout):
        n, c = _real(lay, r), lay["chunk"]
        w, g = want["grads"][b], got["grads"][b]
        if n == 0 or _real_same(w, g, lay, r):
            continue
        fields = dict(t=t, r=r, N=N, c=c, bucket=_bucket_text(layout, b), grad=f"bucket.master.grad of "
                      f"{_bucket_text(layout, b)}")
        problem = _scale_problem(head, _ZERO_SAYS, w, g, n, fields)
        if problem:
            return problem
        own = _flat(got["local"], lay, N, _ZERO_NAMES)[r * c:r * c + n]
        for scale, words in ((1 / N, " divided by N"), (1, "")):
            if _same(own * scale, g[:n]):
                return f"{head}: " + _say(_ZERO_SAYS, "no reduce-scatter", scaled=words, **fields)
        return (f"{head}: at step {t}, when the optimizer stepped, bucket.master.grad of {fields['bucket']} on rank "
                f"{r} is wrong: " + _element("", w[:n], g[:n], lambda i: _flat_index(lay, r * c + i) + ".grad")
                + ". It must be the mean over the ranks of the gradients of chunk r.")
    return None


def _param_problem(head: str, t: int, layout: list, want: dict, got: dict, r: int, N: int) -> str | None:
    if all(_same(w, g) for w, g in zip(want["params"], got["params"])):
        return None
    if all(_same(b, g) for b, g in zip(got["before"], got["params"])):
        gathered = any(op == "all_gather" for op, _ in got["calls"])
        return f"{head}: " + _say(_ZERO_SAYS, "gathered, not copied" if gathered else "no all-gather", t=t, r=r)
    names = _ZERO_NAMES
    for b, lay in enumerate(layout):
        c = lay["chunk"]
        w = _flat(want["params"], lay, N, names)
        g, before = _flat(got["params"], lay, N, names), _flat(got["before"], lay, N, names)
        if _same(w, g):
            continue
        mine = torch.zeros_like(w, dtype=torch.bool)
        mine[r * c:(r + 1) * c] = True
        if _same(w[mine], g[mine]) and _same(before[~mine], g[~mine]):
            i = next(i for i in range(lay["numel"]) if not mine[i] and not _same(w[i:i + 1], before[i:i + 1]))
            return f"{head}: " + _say(_ZERO_SAYS, "own chunk only", t=t, r=r, bucket=_bucket_text(layout, b),
                                      where=_flat_index(lay, i))
        for name, shape, offset in zip(lay["names"], lay["shapes"], lay["offsets"]):
            n = math.prod(shape)
            if offset and _same(w[:n], g[offset:offset + n]) and not _same(w[offset:offset + n], g[offset:offset + n]):
                return f"{head}: " + _say(_ZERO_SAYS, "wrong offsets", t=t, r=r, bucket=f"bucket {b}", param=name,
                                          offset=offset, element=_element("", w[offset:offset + n],
                                                                          g[offset:offset + n],
                                                                          lambda i: _flat_index(lay, offset + i)))
        return (f"{head}: after step {t} on rank {r}, " + _element("", w[:lay["numel"]], g[:lay["numel"]],
                                                                   lambda i: _flat_index(lay, i))
                + ": the gradients and the optimizer's chunks were right, so the all-gather or the copy into the "
                  "parameters is wrong. " + _GATHER_HOW[0].upper() + _GATHER_HOW[1:])
    return None


def _ring_numbers(calls: list, N: int) -> float:
    """The numbers one rank sends in these collectives ``(op, numbers in)`` if a ring runs them (lesson 2)."""
    return ring_bytes_sent([SimpleNamespace(op=op, bytes=n) for op, n in calls
                            if op in ("all_reduce", "reduce_scatter", "all_gather")], N)


def _traffic_problem(head: str, layout: list, steps: list, r: int, N: int) -> str | None:
    want = [("reduce_scatter", N * lay["chunk"]) for lay in layout] + [("all_gather", lay["chunk"]) for lay in layout]
    for t, step in enumerate(steps, start=1):
        calls = step["calls"]
        if sorted(calls) == sorted(want):
            continue
        sent, per_step = _ring_numbers(calls, N), _ring_numbers(want, N)
        if any(op == "all_reduce" for op, _ in calls):
            return f"{head}: " + _say(_ZERO_SAYS, "all-reduce instead of reduce-scatter", r=r, sent=fmt_number(sent),
                                      want=fmt_number(per_step))
        return (f"{head}: the parameters are right, but at step {t} rank {r} made the collectives {_ops_text(calls)} "
                f"(op(numbers in)): ZeRO-1 makes, per bucket, one reduce-scatter of its N·c gradients and one "
                f"all-gather of its chunk of c: {_ops_text(want)}. " + _WATCHED)
    return None


def _per_config(out: list):
    """For each configuration the ranks ran (the workers' ``configs``): its label, its layout, and labkit's and the
    student's records, one per rank."""
    for index, (label, ref, _) in enumerate(out[0]["configs"]):
        yield label, ref["layout"], [rank["configs"][index][1] for rank in out], [rank["configs"][index][2]
                                                                                  for rank in out]


def _diagnose_zero(name: str, N: int, out: list, one_process: list) -> tuple[str | None, float]:
    """The first problem on N processes, or (None, the largest difference from torch's and one process's)."""
    diff = 0.0
    for label, layout, refs, gots in _per_config(out):
        head = f"{name} is wrong on {N} processes ({label})"
        problem = _shard_problem(head, layout, [g["shards"] for g in gots], N)
        if problem:
            return problem, diff
        for t in range(ZERO_STEPS):
            for check in (_grad_problem, _param_problem):
                for r in range(N):
                    if t >= len(gots[r]["steps"]):
                        continue
                    problem = check(head, t + 1, layout, refs[r]["steps"][t], gots[r]["steps"][t], r, N)
                    if problem:
                        return problem, diff
        for r in range(N):
            problem = _traffic_problem(head, layout, gots[r]["steps"], r, N)
            if problem:
                return problem, diff
            if gots[r].get("state_bytes", 0) > refs[r]["state_bytes"]:
                return (f"{head}: the parameters are right, but rank {r} keeps {gots[r]['state_bytes']} bytes of "
                        f"optimizer state (state_bytes(): Adam's m and v and the master chunks), labkit's "
                        f"ZeroOptimizer {refs[r]['state_bytes']}: the state is not split over the ranks.", diff)
        for r in range(N):
            final = gots[r]["steps"][-1]["params"]
            for reference, whose in ((out[r]["torch"], "torch's ZeroRedundancyOptimizer"),
                                     (one_process, "one process")):
                for n, w, g in zip(_ZERO_NAMES, reference or [], final):
                    if not _same(w, g):
                        return (f"{head}: after {ZERO_STEPS} steps rank {r}'s {_element(n, w, g)} ({whose}), "
                                f"although each step equals labkit's ZeroOptimizer.", diff)
                    diff = max(diff, float((w - g).abs().max()))
    return None, diff


def check_zero1(cls, *, world_sizes=WORLD_SIZES, timeout: float = 20.0) -> None:
    """Check exercise 8a: ``cls``, a subclass of :class:`labkit.zero.ZeroOptimizer` with its own ``shard(bucket)``
    (this rank's chunk, a new tensor of c numbers) and ``step()`` (ZeRO stage 1), against labkit's ZeroOptimizer,
    torch's ZeroRedundancyOptimizer and one process: on each world size, 3 AdamW steps with one bucket and with one
    parameter per bucket (float64, rtol 1e-9). ``timeout``: seconds before a rank that hangs is stopped."""
    __tracebackhide__ = True
    if not isinstance(cls, type) or not issubclass(cls, ZeroOptimizer):
        fail(f"check_zero1 needs your class, a subclass of labkit.zero.ZeroOptimizer (class Zero1(labkit.zero."
             f"ZeroOptimizer): ...), not {describe(cls)}")
    name = cls.__name__
    state = {}
    largest = 0.0
    for N in world_sizes:
        try:
            out = run_on_ranks(_zero_worker, cls, name, 0.6 * timeout, N == world_sizes[0], world_size=N,
                               timeout=timeout, name=name, task="8a")
        except NotImplementedError as err:
            fake = SimpleNamespace(rank=0, world_size=2, buckets=[], optimizer=SimpleNamespace(step=lambda: None))
            bucket = ZeroBucket([torch.zeros(3)], [0], 3, 2, None)
            raise _not_written(cls, "8a", dict(shard=(fake, bucket), step=(fake,)), err) from None
        problem, diff = _diagnose_zero(name, N, out, _zero_one_process(N))
        if problem:
            fail(problem)
        largest = max(largest, diff)
        state[N] = out[0]["configs"][0][2]["state_bytes"]
    sizes = sorted(world_sizes)
    psi = sum(p.numel() for p in _zero_model().parameters())
    kept = ", ".join(f"{state[n]} on {n}" for n in sizes)
    passed(f"{name} matches labkit.zero.ZeroOptimizer and one process on {and_list(sizes)} processes, and torch's "
           f"ZeroRedundancyOptimizer (with DDP) on {world_sizes[0]}: {ZERO_STEPS} AdamW steps of a {psi}-parameter "
           f"model (no world size divides it, some chunks only padding), one bucket and one parameter per bucket, the "
           f"parameters within {bound(largest)} of torch's and one process's; one reduce-scatter and one "
           f"all-gather per bucket; each rank keeps 1/N of the optimizer state (bytes per rank with one bucket: "
           f"{kept}; one process: {3 * psi * 8})")


# ============================================================================================
# 8b. The FSDP unit: gather, free, reduce-scatter the gradients
# ============================================================================================

FSDP_CONFIG = GPTConfig(vocab_size=23, block_size=8, n_layer=3, n_head=2, n_embd=10)   # root 330, blocks 1330
FSDP_MICRO_BATCHES = (1, 1, 2)          # per step; the last accumulates two micro-batches before the optimizer
FSDP_LR, FSDP_DECAY = 0.01, 0.1


def _fsdp_batch(step: int, micro: int, world_size: int):
    g = torch.Generator().manual_seed(810 + 10 * step + micro)
    x = torch.randint(0, FSDP_CONFIG.vocab_size, (2 * world_size, FSDP_CONFIG.block_size), generator=g)
    return x, torch.roll(x, 1, 1)


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(FSDP_CONFIG).double()


def _fsdp_one_process(world_size: int) -> dict:
    model = _gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=FSDP_LR, weight_decay=FSDP_DECAY)
    for step, micro in enumerate(FSDP_MICRO_BATCHES):
        opt.zero_grad()
        for m in range(micro):
            model(*_fsdp_batch(step, m, world_size))[1].backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


# --- the known mistakes, each a change of labkit's Unit ---------------------------------------------------------

def _scaled_grads(factor_of: Callable) -> Callable:
    """labkit's reduce_scatter_grads, this backward's part of shard.grad multiplied by ``factor_of(N)``."""
    def reduce_scatter_grads(self):
        before = self.shard.grad
        Unit.reduce_scatter_grads(self)
        new = self.shard.grad if before is None else self.shard.grad - before
        self.shard.grad = factor_of(self.world_size) * new + (0 if before is None else before)
    return reduce_scatter_grads


def _kept_whole(self) -> None:
    grads = [p.grad for p in self.params]
    Unit.reduce_scatter_grads(self)
    for p, g in zip(self.params, grads):
        p.grad = g


def _gather_into_freed(self, async_op: bool = False) -> None:
    if self.gathered or self.work is not None:
        return
    self.work = comm.all_gather_into_tensor(self.buffer, self.shard.detach(), group=self.group, async_op=True)
    if not async_op:
        self.wait()


def _gather_not_waited(self, async_op: bool = False) -> None:
    Unit.gather(self, async_op=True)


def _gather_every_time(self, async_op: bool = False) -> None:
    self.wait()
    self.buffer.untyped_storage().resize_(self.buffer.numel() * self.buffer.element_size())
    self.work = comm.all_gather_into_tensor(self.buffer, self.shard.detach(), group=self.group, async_op=True)
    if not async_op:
        self.wait()


def _gather_new_buffer(self, async_op: bool = False) -> None:
    if self.buffer.numel() or self.work is not None:
        return
    self.buffer = self.shard.new_empty(self.world_size * self.chunk)
    self.work = comm.all_gather_into_tensor(self.buffer, self.shard.detach(), group=self.group, async_op=True)
    if not async_op:
        self.wait()


def _flat_grads(self) -> torch.Tensor:
    flat = self.shard.new_zeros(self.world_size * self.chunk)
    for p, offset in zip(self.params, self.offsets):
        if p.grad is not None:
            flat[offset:offset + p.numel()] = p.grad.reshape(-1)
        p.grad = None
    return flat.div_(self.world_size)


def _all_reduce_grads(self) -> None:
    flat = _flat_grads(self)
    comm.all_reduce(flat, group=self.group)
    grad = flat[self.rank * self.chunk:(self.rank + 1) * self.chunk].clone()
    self.shard.grad = grad if self.shard.grad is None else self.shard.grad + grad


def _unpadded_grads(self) -> None:
    flat = _flat_grads(self)[:self.numel]
    grad = torch.zeros_like(self.shard)
    comm.reduce_scatter_tensor(grad, flat, group=self.group)
    self.shard.grad = grad if self.shard.grad is None else self.shard.grad + grad


def _overwritten(self) -> None:
    self.shard.grad = None
    Unit.reduce_scatter_grads(self)


_RESIZE = "self.buffer.untyped_storage().resize_(self.buffer.numel() * self.buffer.element_size())"
_FREE_HOW = ("free() gives the memory back by resizing the buffer's storage to 0 bytes: "
             "self.buffer.untyped_storage().resize_(0). The parameters are views of the buffer, so they lose their "
             "memory with it; gather() refills the same storage.")

# Tried in this order by the diagnosis; the tests build every row with wrong_unit().
UNIT_MISTAKES = (
    Mistake("new buffer", dict(free=lambda self: setattr(self, "buffer", self.buffer.new_empty(0)),
                               gather=_gather_new_buffer),
            "on rank {r}, after {method}() unit {unit}'s parameters are not views of self.buffer: the parameters were "
            "made views of the buffer in __init__ (p.data = buffer[offset:offset + n]), and a new tensor in "
            "self.buffer leaves them reading the old one, which keeps its memory and never sees a gather. Keep the "
            "same buffer: free its storage with self.buffer.untyped_storage().resize_(0), and refill it in gather() "
            "with " + _RESIZE + " before the all-gather."),
    Mistake("never freed", dict(free=lambda self: None),
            "on rank {r}, {when} the units {units} were gathered at once: {peak} bytes of gathered parameters, where "
            "the prediction allows {limit} ({allowed}; the shards, Ψ/N, hold {shards} more). free() left unit "
            "{unit}'s {held} bytes in place, so every unit stays gathered and the memory is that of the whole model. "
            + _FREE_HOW),
    Mistake("gather not refilling", dict(gather=_gather_into_freed),
            "on rank {r}, an all-gather wrote into a buffer of {n} numbers whose storage has {nbytes} bytes: the "
            "buffer is freed (its storage resized to 0 bytes), and gather() must give it its memory back before the "
            "all-gather: " + _RESIZE + "."),
    Mistake("gradients kept whole", dict(reduce_scatter_grads=_kept_whole),
            "on rank {r}, after the backward of step {t}, {params} still have their whole gradients (p.grad: {nbytes} "
            "bytes): once a unit's gradients are reduce-scattered into shard.grad, the whole ones are not needed, "
            "and keeping them costs Ψ numbers per rank, what FSDP saves. Set p.grad = None after copying each into "
            "the flat vector. (They would also be added to the next step's gradients.)"),
    Mistake("not waited", dict(gather=_gather_not_waited),
            "on rank {r}, {unit}.gather(async_op=False) returned while its all-gather was still on its way (self.work "
            "is not None): the forward would read a buffer the all-gather may not have filled yet, and the next "
            "gather() would take the unit for gathered. Unless async_op, wait before returning: self.wait() (which "
            "also sets self.work to None)."),
    Mistake("gathered twice", dict(gather=_gather_every_time),
            "with prefetch, at step {t} rank {r} made {got} all-gathers where FSDP needs {want} ({per} per "
            "micro-batch: the root once, each block for its forward and again for its backward): gather() "
            "all-gathered a unit that was already gathered, or whose all-gather was on its way (a prefetch). "
            "Return at once when self.gathered or self.work is not None."),
    Mistake("all-reduce then slice", dict(reduce_scatter_grads=_all_reduce_grads),
            "the gradients are right, but at step {t} rank {r} all-reduced the units' N·c gradients and kept its "
            "chunk: an all-reduce sends twice what a reduce-scatter sends, and gives every rank sums that it throws "
            "away. Reduce-scatter the flat gradients into a tensor of c numbers (comm.reduce_scatter_tensor)."),
    Mistake("sum instead of mean", dict(reduce_scatter_grads=_scaled_grads(lambda n: n)), _SUM),
    Mistake("divided twice", dict(reduce_scatter_grads=_scaled_grads(lambda n: 1 / n)), _TWICE),
    Mistake("shard.grad overwritten", dict(reduce_scatter_grads=_overwritten),
            "at step {t}, which accumulates {micro} micro-batches before the optimizer steps, shard.grad of unit "
            "{unit} on rank {r} holds the last micro-batch's gradient only: reduce_scatter_grads replaced shard.grad "
            "instead of adding to it. Add this backward's chunk to shard.grad when there is one already (the "
            "optimizer's zero_grad() sets it to None between steps)."),
    Mistake("flat not padded", dict(reduce_scatter_grads=_unpadded_grads), _UNPADDED),
)
_UNIT_SAYS = {m.name: m.says for m in UNIT_MISTAKES}


def wrong_unit(mistake: Mistake) -> type:
    """labkit's Unit with the mistake's methods, named after it ("never freed" -> NeverFreed)."""
    name = "".join(w[:1].upper() + w[1:] for w in mistake.name.replace("-", " ").replace(".", " ").split())
    return type(name, (Unit,), dict(mistake.variant))


# --- in the launched processes --------------------------------------------------------------------------------

def _held(unit) -> int:
    """Bytes of the unit's parameters' storages (each counted once): what is gathered of it."""
    return sum({p.untyped_storage()._cdata: p.untyped_storage().nbytes() for p in unit.params}.values())


def _views_buffer(unit) -> bool:
    mine = unit.buffer.untyped_storage()._cdata
    return all(p.untyped_storage()._cdata == mine for p in unit.params)


class _Probe:
    """The bytes the units hold gathered, sampled after each of their calls, each block's forward and each backward
    (the peak of a step, and which units made it), and the first unit whose free() kept its bytes or whose parameters
    are not views of its buffer."""

    def __init__(self):
        self.units, self.replaced, self.not_freed = None, [], []
        self.reset()

    def reset(self) -> None:
        self.peak, self.most = 0, []

    def after(self, unit, method: str) -> None:
        if not _views_buffer(unit) and not self.replaced:
            self.replaced.append((unit.name, method))
        if method == "free" and _held(unit) and not self.not_freed:
            self.not_freed.append((unit.name, _held(unit)))
        self.sample()

    def sample(self) -> None:
        if self.units is None:
            return
        storages = {p.untyped_storage()._cdata: p.untyped_storage().nbytes() for u in self.units for p in u.params}
        if sum(storages.values()) > self.peak:
            self.peak, self.most = sum(storages.values()), [u.name for u in self.units if _held(u)]


def _watched_unit(cls: type, name: str, probe: _Probe, student: bool) -> type:
    """``cls`` with each of its three methods followed by the probe (and, for the student's, run as the student's)."""
    def run(method, self, *args):
        __tracebackhide__ = True
        if student:
            return call_student(method, *args, name=f"{name}.{method.__name__}", task="8b",
                                where=f"on rank {self.rank} (unit {self.name})")
        return method(*args)

    class Watched(cls):
        def gather(self, async_op=False):
            __tracebackhide__ = True
            in_flight = self.work is not None           # a prefetch on its way: FSDP waits for it after this call
            run(super().gather, self, async_op)
            if not async_op and not in_flight and self.work is not None:
                raise CheckFailed(f"{name} is wrong on {self.world_size} processes: "
                                  + _say(_UNIT_SAYS, "not waited", r=self.rank, unit=self.name))
            probe.after(self, "gather")

        def free(self):
            run(super().free, self)
            probe.after(self, "free")

        def reduce_scatter_grads(self):
            run(super().reduce_scatter_grads, self)
            probe.after(self, "reduce_scatter_grads")
    Watched.__name__ = Watched.__qualname__ = cls.__name__
    return Watched


def _fsdp_run(unit_cls: type, prefetch: bool, name: str, seconds: float, reference: dict | None = None) -> dict:
    rank, N = dist.get_rank(), dist.get_world_size()
    student = reference is not None
    probe = _Probe()
    model = _gpt()
    names = {p: n for n, p in model.named_parameters()}
    late = f"did not return within {seconds:g} s on rank {rank} ({N} processes): an endless loop?"
    watched = _watched_unit(unit_cls, name, probe, student)
    with time_limit(seconds, f"FSDP with {name} {late}"):
        fsdp = type("FSDP", (FSDP,), dict(unit_class=watched))(model, prefetch=prefetch)
    probe.units = fsdp.units
    for block in model.blocks:
        block.register_forward_hook(lambda *args: probe.sample())
    layout = [dict(name=u.name, numel=u.numel, chunk=u.chunk, names=[names[p] for p in u.params],
                   shapes=[tuple(p.shape) for p in u.params], offsets=list(u.offsets)) for u in fsdp.units]
    record = dict(layout=layout, steps=[], right=True, built=dict(replaced=list(probe.replaced),
                                                                   not_freed=list(probe.not_freed)))
    opt = torch.optim.AdamW(fsdp.shards(), lr=FSDP_LR, weight_decay=FSDP_DECAY)
    seen: list = []
    real_step = opt.step

    def optimizer_step(*args, **kwargs):
        seen.append([keep(u.shard.grad) for u in fsdp.units])
        return real_step(*args, **kwargs)
    opt.step = optimizer_step
    for step, micro in enumerate(FSDP_MICRO_BATCHES):
        opt.zero_grad()
        probe.reset()
        seen.clear()
        after = []
        with time_limit(seconds, f"FSDP with {name} {late}"), \
                _Collectives(f"{name} is wrong on {N} processes") as calls:
            for m in range(micro):
                x, y = _fsdp_batch(step, m, N)
                fsdp(x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2])[1].backward()
                probe.sample()
                after.append(dict(grads=[keep(u.shard.grad) for u in fsdp.units],
                                  whole=[(names[p], p.grad.nbytes) for u in fsdp.units for p in u.params
                                         if p.grad is not None]))
            opt.step()
        probe.sample()
        record["steps"].append(dict(
            grads=seen[0] if seen else None, after=after, shards=[u.shard.detach().clone() for u in fsdp.units],
            calls=calls.calls, peak=probe.peak, most=probe.most,
            replaced=list(probe.replaced), not_freed=list(probe.not_freed), left=[u.name for u in fsdp.units
                                                                                  if _held(u)]))
        if student and not all_ranks(_fsdp_step_right(reference["steps"][step], record["steps"][-1], layout, rank,
                                                      N, prefetch)):
            record["right"] = False
            break
    return record


def _gathered_limit(layout: list, N: int, prefetch: bool) -> int:
    """The bytes a rank may hold gathered at once: the root and one block (two with prefetch), each N·c float64."""
    blocks = sorted((N * lay["chunk"] * 8 for lay in layout[1:]), reverse=True)
    return N * layout[0]["chunk"] * 8 + sum(blocks[:2 if prefetch else 1])


def _fsdp_step_right(want: dict, got: dict, layout: list, rank: int, N: int, prefetch: bool) -> bool:
    return (got["grads"] is not None and not got["replaced"] and not got["not_freed"] and not got["left"]
            and got["peak"] <= _gathered_limit(layout, N, prefetch)
            and all(not a["whole"] for a in got["after"]) and sorted(got["calls"]) == sorted(want["calls"])
            and all(_real_same(w, g, lay, rank) for w, g, lay in zip(want["grads"], got["grads"], layout))
            and all(_real_same(w, g, lay, rank) for w, g, lay in zip(want["shards"], got["shards"], layout)))


def _torch_fsdp_run() -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, N = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (N,))
    model = _gpt()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=FSDP_LR, weight_decay=FSDP_DECAY)
    for step, micro in enumerate(FSDP_MICRO_BATCHES):
        opt.zero_grad()
        for m in range(micro):
            x, y = _fsdp_batch(step, m, N)
            model(x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2])[1].backward()
        opt.step()
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _fsdp_worker(cls, name: str, seconds: float, with_torch: bool) -> dict:
    out = dict(torch=_torch_fsdp_run() if with_torch else {}, configs=[])
    for prefetch in (False, True):
        reference = _fsdp_run(Unit, prefetch, "labkit's Unit", seconds)
        got = _fsdp_run(cls, prefetch, name, seconds, reference)
        out["configs"].append((prefetch, reference, got))
        if not got["right"]:
            break
    return out


# --- in the checker's process: what is wrong ---------------------------------------------------------------------

def _unit_shard_bytes(layout: list) -> int:
    return sum(lay["chunk"] * 8 for lay in layout)


def _memory_problem(head: str, got: dict, layout: list, r: int, N: int, prefetch: bool, when: str) -> str | None:
    limit = _gathered_limit(layout, N, prefetch)
    if not (got["not_freed"] or got["left"] or got["peak"] > limit):
        return None
    allowed = "the root and one block" + (", plus the next block prefetched" if prefetch else "")
    fields = dict(r=r, when=when, units=and_list(got["most"]) if got["most"] else "none", peak=got["peak"],
                  limit=limit, allowed=allowed, shards=_unit_shard_bytes(layout))
    if got["not_freed"]:
        unit, held = got["not_freed"][0]
        return f"{head}: " + _say(_UNIT_SAYS, "never freed", unit=unit, held=held, **fields)
    if got["left"]:
        return (f"{head}: on rank {r}, after the step the units {and_list(got['left'])} are still gathered: every unit "
                f"is freed after its backward, so that between steps a rank holds its shards only.")
    return (f"{head}: on rank {r}, {when} the units {fields['units']} were gathered at once: {got['peak']} bytes, "
            f"where the prediction allows {limit} ({allowed}).")


def _unit_grad_problem(head: str, t: int, micro: int, layout: list, want: dict, got: dict, r: int,
                       N: int) -> str | None:
    for u, lay in enumerate(layout):
        w, g = want["grads"][u], got["grads"][u]
        n = _real(lay, r)
        if _real_same(w, g, lay, r):
            continue
        fields = dict(t=t, r=r, N=N, c=lay["chunk"], unit=lay["name"], micro=micro,
                      grad=f"shard.grad of unit {lay['name']}")
        problem = _scale_problem(head, _UNIT_SAYS, w, g, n, fields)
        if problem:
            return problem
        if micro > 1:
            last = want["after"][-1]["grads"][u][:n] - want["after"][-2]["grads"][u][:n]
            if _same(last, g[:n]):
                return f"{head}: " + _say(_UNIT_SAYS, "shard.grad overwritten", **fields)
        return (f"{head}: at step {t}, when the optimizer stepped, shard.grad of unit {lay['name']} on rank {r} is "
                f"wrong: " + _element("", w[:n], g[:n], lambda i: _flat_index(lay, r * lay["chunk"] + i) + ".grad")
                + ". It must be the mean over the ranks of the gradients of chunk r of the unit's flat vector.")
    return None


def _fsdp_step_problem(head: str, t: int, layout: list, wants: list, gots: list, N: int,
                       prefetch: bool) -> str | None:
    """The first problem of step t (1, 2, ...): ``wants`` and ``gots``, labkit's and the student's record of it, per
    rank."""
    micro = FSDP_MICRO_BATCHES[t - 1]
    for r, got in enumerate(gots):
        if got["replaced"]:
            unit, method = got["replaced"][0]
            return f"{head}: " + _say(_UNIT_SAYS, "new buffer", r=r, unit=unit, method=method)
    for r, got in enumerate(gots):
        problem = _memory_problem(head, got, layout, r, N, prefetch, f"during step {t}")
        if problem and got["not_freed"]:
            return problem
    for r, got in enumerate(gots):
        whole = next((a["whole"] for a in got["after"] if a["whole"]), None)
        if whole:
            shown = and_list([n for n, _ in whole[:3]] + ([f"{len(whole) - 3} more"] if len(whole) > 3 else []))
            return f"{head}: " + _say(_UNIT_SAYS, "gradients kept whole", r=r, t=t, params=shown,
                                      nbytes=sum(b for _, b in whole))
    for r, got in enumerate(gots):
        calls, want = got["calls"], wants[r]["calls"]
        if sorted(calls) == sorted(want):
            continue
        if _count(calls, "all_reduce"):
            return f"{head}: " + _say(_UNIT_SAYS, "all-reduce then slice", t=t, r=r)
        per = 1 + 2 * FSDP_CONFIG.n_layer
        if _count(calls, "all_gather") > _count(want, "all_gather"):
            return f"{head}: " + _say(_UNIT_SAYS, "gathered twice", t=t, r=r, got=_count(calls, "all_gather"),
                                      want=_count(want, "all_gather"), per=per)
        return (f"{head}: at step {t} rank {r} made {plural(_count(calls, 'all_gather'), 'all-gather')} and "
                f"{plural(_count(calls, 'reduce_scatter'), 'reduce-scatter')}, where FSDP makes, per micro-batch, "
                f"1 + 2L = {per} all-gathers (the root once, each of the L = {FSDP_CONFIG.n_layer} blocks for its "
                f"forward and for its backward) and 1 + L = {1 + FSDP_CONFIG.n_layer} reduce-scatters (one per unit, "
                f"when its backward ends); {micro} micro-batch{'es' if micro > 1 else ''} at this step. " + _WATCHED)
    for r, got in enumerate(gots):
        if got["grads"] is None:
            return f"{head}: at step {t} rank {r}'s optimizer never stepped: did the backward finish?"
        problem = _unit_grad_problem(head, t, micro, layout, wants[r], got, r, N)
        if problem:
            return problem
    for r, got in enumerate(gots):
        for u, lay in enumerate(layout):
            w, g = wants[r]["shards"][u], got["shards"][u]
            if not _real_same(w, g, lay, r):
                n = _real(lay, r)
                return (f"{head}: after step {t}, rank {r}'s shard of unit {lay['name']}: "
                        + _element("", w[:n], g[:n], lambda i: _flat_index(lay, r * lay["chunk"] + i))
                        + ", although its gradient was right: does your code change the shard itself?")
    for r, got in enumerate(gots):
        problem = _memory_problem(head, got, layout, r, N, prefetch, f"during step {t}")
        if problem:
            return problem
    return None


def _gathered_params(gots: list, layout: list) -> dict:
    """The parameters from every rank's shards after the last step."""
    out = {}
    for u, lay in enumerate(layout):
        flat = torch.cat([g["steps"][-1]["shards"][u] for g in gots])
        for name, shape, offset in zip(lay["names"], lay["shapes"], lay["offsets"]):
            out[name] = flat[offset:offset + math.prod(shape)].reshape(shape)
    return out


def _diagnose_fsdp(name: str, N: int, out: list, one_process: dict) -> tuple[str | None, float]:
    diff = 0.0
    for prefetch, layout, refs, gots in _per_config(out):
        head = f"{name} is wrong on {N} processes ({'with' if prefetch else 'without'} prefetch)"
        for r, got in enumerate(gots):
            if got["built"]["replaced"]:
                unit, method = got["built"]["replaced"][0]
                return f"{head}: " + _say(_UNIT_SAYS, "new buffer", r=r, unit=unit, method=method), diff
        for t in range(len(FSDP_MICRO_BATCHES)):
            present = [g["steps"][t] for g in gots if t < len(g["steps"])]
            if len(present) < N:
                break
            problem = _fsdp_step_problem(head, t + 1, layout, [ref_r["steps"][t] for ref_r in refs], present, N,
                                         prefetch)
            if problem:
                return problem, diff
        params = _gathered_params(gots, layout)
        for reference, whose in ((out[0]["torch"], "torch's fully_shard"), (one_process, "one process")):
            for n, w in reference.items():
                if not _same(w, params[n]):
                    return (f"{head}: after {len(FSDP_MICRO_BATCHES)} steps {_element(n, w, params[n])} ({whose}), "
                            f"although each step equals labkit's FSDP.", diff)
                diff = max(diff, float((w - params[n]).abs().max()))
    return None, diff


def check_fsdp_unit(cls, *, world_sizes=WORLD_SIZES, timeout: float = 30.0) -> None:
    """Check exercise 8b: ``cls``, a subclass of :class:`labkit.fsdp.Unit` with its own ``gather``, ``free`` and
    ``reduce_scatter_grads``, as the units of labkit's FSDP around a float64 GPT (root + 3 blocks), without and with
    prefetch, 3 AdamW steps (the last accumulating two micro-batches), against labkit's units, torch's fully_shard and
    one process (rtol 1e-9); the collectives per step and the bytes gathered at once against the prediction.
    ``timeout``: seconds before a rank that hangs is stopped."""
    __tracebackhide__ = True
    if not isinstance(cls, type) or not issubclass(cls, Unit):
        fail(f"check_fsdp_unit needs your class, a subclass of labkit.fsdp.Unit (class MyUnit(labkit.fsdp.Unit): ...), "
             f"not {describe(cls)}")
    name = cls.__name__
    largest, peaks = 0.0, {}
    for N in world_sizes:
        try:
            out = run_on_ranks(_fsdp_worker, cls, name, 0.6 * timeout, N == world_sizes[0], world_size=N,
                               timeout=timeout, name=name, task="8b")
        except NotImplementedError as err:
            fake = SimpleNamespace(gathered=True, work=None, buffer=torch.zeros(2), params=[], offsets=[], chunk=1,
                                   world_size=2, rank=0, shard=torch.zeros(1), numel=1, wait=lambda: None)
            raise _not_written(cls, "8b", dict(gather=(fake,), free=(fake,), reduce_scatter_grads=(fake,)),
                               err) from None
        problem, diff = _diagnose_fsdp(name, N, out, _fsdp_one_process(N))
        if problem:
            fail(problem)
        largest = max(largest, diff)
        layout = out[0]["configs"][0][2]["layout"]
        peaks[N] = (max(s["peak"] for s in out[0]["configs"][0][2]["steps"]), _gathered_limit(layout, N, False),
                    _unit_shard_bytes(layout))
    sizes = sorted(world_sizes)
    psi = sum(p.numel() for p in _gpt().parameters())
    most = ", ".join(f"{peaks[n][0]} of {peaks[n][1]} on {n}" for n in sizes)
    shards = ", ".join(str(peaks[n][2]) for n in sizes)
    passed(f"{name} (gather, free, reduce_scatter_grads) matches labkit's FSDP and one process on {and_list(sizes)} "
           f"processes, and torch's fully_shard on {world_sizes[0]}, without and with prefetch: "
           f"{len(FSDP_MICRO_BATCHES)} AdamW steps of a GPT of {psi} parameters (root + {FSDP_CONFIG.n_layer} "
           f"blocks; two micro-batches accumulated), within {bound(largest)} of torch's and one process's; per "
           f"micro-batch 1 + 2L all-gathers and 1 + L reduce-scatters, no whole gradient kept; the most bytes "
           f"gathered at once (without prefetch) against the prediction, the root and the largest block: {most} (the "
           f"shards: {shards} bytes)")


# ============================================================================================
# 8c. Design: what a rank keeps and sends under ZeRO stages 0-3
# ============================================================================================

_KINDS = ("parameters", "gradients", "optimizer", "master", "sent")
_ACTIVATIONS_CONFIG = GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4)
# (Ψ, N, stage, mixed_precision): every stage and both precisions, a Ψ no N divides, 1 rank, many ranks
BYTES_CASES = tuple((psi, n, stage, mp) for mp in (True, False) for psi in (7_500_000_000, 1_000_003)
                    for n in (64, 3, 1, 8) for stage in (0, 1, 2, 3))


def zero_bytes_reference(psi: float, n: int, stage: int, mixed_precision: bool = True) -> dict:
    """labkit's numbers: :func:`labkit.memory.predict` (Adam; 16-bit parameters and gradients with fp32 master weights
    and state under mixed precision, all fp32 otherwise) and :func:`labkit.zero.bytes_sent_per_step`."""
    from labkit.memory import Setup, predict

    dtype_bytes = 2 if mixed_precision else 4
    setup = Setup(batch=1, seq_len=1, dtype_bytes=dtype_bytes, mixed_precision=mixed_precision, optimizer="adam",
                  dp=n, zero=stage)
    m = predict(_ACTIVATIONS_CONFIG, setup, num_params=psi)
    return dict(parameters=m.parameters, gradients=m.gradients, optimizer=m.optimizer, master=m.master,
                sent=bytes_sent_per_step(psi, n, stage, dtype_bytes))


def _kind(name: str, stages, f: Callable) -> Callable:
    """A wrong version that changes one kind at some stages."""
    def variant(ref, psi, n, stage, mp):
        value = f(ref, psi, n, stage, mp) if stage in stages else None
        return dict(ref, **({name: value} if value is not None else {}))
    return variant


_MP = ("Under mixed precision a rank keeps, per parameter, the 16-bit parameter (2 bytes) and gradient (2), and in "
       "fp32 Adam's m and v (8) and the master copy of the parameter (4): 16 bytes; in fp32 training 4 + 4 + 8 and no "
       "master copy.")
_ALL = (0, 1, 2, 3)

# Each row changes one kind of labkit's numbers (zero_bytes_reference); tried against the kind that is wrong.
BYTES_MISTAKES = (
    Mistake("parameters sharded at stages 1 and 2", _kind("parameters", (1, 2), lambda r, psi, n, s, mp:
                                                                           r["parameters"] / n),
            "the parameters are divided by N at stage {stage}: ZeRO-1 and ZeRO-2 keep every parameter on every rank "
            "(the forward and the backward need them all); only stage 3 (FSDP) shards them."),
    Mistake("gradients sharded at stage 1", _kind("gradients", (1,), lambda r, psi, n, s, mp: r["gradients"] / n),
            "the gradients are divided by N at stage 1: ZeRO-1 shards the optimizer state only; the backward still "
            "writes every whole gradient (p.grad) on every rank. Stage 2 shards the gradients."),
    Mistake("gradients sharded only at stage 3", _kind("gradients", (2,), lambda r, psi, n, s, mp: r["gradients"] * n),
            "the gradients are whole at stage 2: ZeRO-2 is stage 1 plus sharded gradients (each bucket "
            "reduce-scattered as soon as it is ready and the whole gradients freed), so they take 1/N."),
    Mistake("optimizer state not sharded", _kind("optimizer", (1, 2, 3), lambda r, psi, n, s, mp: r["optimizer"] * n),
            "Adam's state is whole at stage {stage}: sharding the optimizer state is what stage 1 does (each rank "
            "keeps m and v for its chunk), so from stage 1 on it takes 1/N."),
    Mistake("optimizer state of 12 bytes", _kind("optimizer", _ALL, lambda r, psi, n, s, mp: r["optimizer"] * 1.5
                                                  if mp else None),
            "Adam's state is 12 bytes per parameter here, and the master weights are counted again: the ZeRO paper's "
            "K = 12 is m, v and the master copy together (4 + 4 + 4). Counted by kind, the optimizer state is m and v, "
            "8 bytes per parameter in fp32, and the master copy is its own 4."),
    Mistake("optimizer state in 16-bit", _kind("optimizer", _ALL, lambda r, psi, n, s, mp: r["optimizer"] / 2
                                                if mp else None),
            "Adam's m and v are counted in 16-bit (4 bytes per parameter): under mixed precision they stay in fp32, "
            "2 · 4 = 8 bytes per parameter (the 16-bit copies are for the forward and the backward only)."),
    Mistake("no master weights", _kind("master", _ALL, lambda r, psi, n, s, mp: 0 if mp else None),
            "the master weights are missing: under mixed precision the optimizer updates an fp32 copy of the "
            "parameters (4 bytes per parameter; a 16-bit update would lose small steps to rounding), and the 16-bit "
            "parameters are made from it."),
    Mistake("master weights in fp32 training", _kind("master", _ALL, lambda r, psi, n, s, mp: None if mp else
                                                     4 * psi / (n if s >= 1 else 1)),
            "there are master weights without mixed precision: in fp32 training the parameters are the fp32 copy the "
            "optimizer updates, so there is no second one (master = 0)."),
    Mistake("master weights not sharded", _kind("master", (1, 2, 3), lambda r, psi, n, s, mp: r["master"] * n),
            "the master weights are whole at stage {stage}: they belong to the optimizer's update, so stage 1 shards "
            "them with the optimizer state (each rank keeps the fp32 copy of its chunk only)."),
    Mistake("sent without (N−1)/N", _kind("sent", _ALL, lambda r, psi, n, s, mp: (3 if s == 3 else 2) * psi *
                                          (2 if mp else 4)),
            "the bytes sent are 2Ψ (3Ψ at stage 3) whatever N: in a ring each rank keeps its own chunk and sends the "
            "other N − 1, so a reduce-scatter or an all-gather sends Ψ·(N−1)/N numbers per rank (nothing when N = 1)."),
    Mistake("half of what a ring sends", _kind("sent", _ALL, lambda r, psi, n, s, mp: r["sent"] / 2),
            "the bytes sent are half of what the ring sends: an all-reduce is a reduce-scatter followed by an "
            "all-gather, Ψ(N−1)/N numbers each, 2Ψ(N−1)/N in all (lesson 2); ZeRO-1 and 2 send exactly that, stage 3 "
            "one all-gather more."),
    Mistake("stages 1 and 2 send 3Ψ", _kind("sent", (1, 2), lambda r, psi, n, s, mp: r["sent"] * 1.5),
            "stage {stage} sends 3Ψ(N−1)/N: ZeRO-1 and 2 replace the all-reduce by its two halves, a reduce-scatter of "
            "the gradients and an all-gather of the updated parameters, 2Ψ(N−1)/N as for DDP. Only stage 3 adds an "
            "all-gather (the parameters, again, for the backward)."),
    Mistake("stage 3 sends 2Ψ", _kind("sent", (3,), lambda r, psi, n, s, mp: r["sent"] * 2 / 3),
            "stage 3 sends 2Ψ(N−1)/N: the parameters are freed after each unit's forward, so they are all-gathered "
            "twice (forward and backward) besides the reduce-scatter of the gradients, 3Ψ(N−1)/N."),
    Mistake("sent in fp32", _kind("sent", _ALL, lambda r, psi, n, s, mp: r["sent"] * 2 if mp else None),
            "the bytes sent are counted in fp32 under mixed precision: the gradients reduce-scattered and the "
            "parameters all-gathered are the 16-bit ones, 2 bytes per number."),
)

_KIND_HOW = {
    "parameters": "Ψ parameters of 2 bytes under mixed precision (4 in fp32), divided by N at stage 3 only.",
    "gradients": "one gradient per parameter, as many bytes as a parameter, divided by N from stage 2.",
    "optimizer": "Adam's m and v, 2 · 4 bytes per parameter (fp32 even under mixed precision), divided by N from "
                 "stage 1.",
    "master": "an fp32 copy of the parameters (4 bytes each) under mixed precision, none in fp32 training; divided by "
              "N from stage 1.",
    "sent": "a ring's all-reduce, or a reduce-scatter and an all-gather, sends 2Ψ(N−1)/N numbers per rank at stages "
            "0-2; stage 3 all-gathers the parameters twice, 3Ψ(N−1)/N; each number 2 bytes under mixed precision, 4 "
            "in fp32.",
}


def _bytes_result(fn, name: str, case: tuple) -> dict:
    __tracebackhide__ = True
    psi, n, stage, mp = case
    call = call_repr(name, psi, n, stage, mixed_precision=mp)
    got = call_student(fn, psi, n, stage, mixed_precision=mp, name=name, task="8c", where=f"for {call}")
    if not isinstance(got, dict) or set(got) != set(_KINDS):
        keys = f" with the keys {sorted(got)}" if isinstance(got, dict) else ""
        fail(f"{call} returned {describe(got)}{keys}: return a dict with the keys {', '.join(_KINDS)} (bytes per "
             f"rank of each kind, and bytes this rank sends per step).")
    values = {k: as_number(got[k]) for k in _KINDS}
    bad = next((k for k in _KINDS if values[k] is None), None)
    if bad:
        fail(f"{call}[{bad!r}] is {describe(got[bad])}: each value is a number of bytes (an int or a float).")
    return values


def _bytes_same(want: float, got: float) -> bool:
    return math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-6)


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


# --- measured on 4 processes --------------------------------------------------------------------------------------

_MEASURED_CONFIG = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8)   # root 208, blocks 872
_MEASURED_N = 4                                                                      # divides every unit: no padding


def _measured_worker() -> dict:
    """labkit's four ways of training, 2 steps of a small GPT in fp32 (labkit.sharded_step): what rank 0 keeps and
    sends."""
    from labkit.sharded_step import train

    out = {}
    for stage, strategy in enumerate(("ddp", "zero1", "zero2", "fsdp")):
        run = train(strategy, _MEASURED_CONFIG, steps=2, dtype=torch.float32)
        out[stage] = dict(parameters=run.memory.parameters, optimizer=run.memory.optimizer, sent=run.sent_per_step)
    return out


_MEASURED_BY = {0: "labkit.ddp.BucketedDDP", 1: "labkit.zero.ZeroOptimizer(stage=1)",
                2: "labkit.zero.ZeroOptimizer(stage=2)", 3: "labkit.fsdp.FSDP"}


def check_zero_bytes(zero_bytes_per_rank, *, cases=BYTES_CASES, timeout: float = 30.0) -> None:
    """Check exercise 8c: ``zero_bytes_per_rank(psi, n, stage, mixed_precision=True)`` returns ``dict(parameters=,
    gradients=, optimizer=, master=, sent=)``: the bytes one of n data-parallel ranks keeps of each kind for a model
    of psi parameters trained with Adam under ZeRO stage 0-3, and the bytes it sends per step. Compared with
    :func:`zero_bytes_reference` (labkit.memory.predict and labkit.zero.bytes_sent_per_step) on ``cases``, then with
    what labkit's DDP, ZeroOptimizer and FSDP keep and send on 4 processes in fp32."""
    __tracebackhide__ = True
    name = getattr(zero_bytes_per_rank, "__name__", "your function")
    if not callable(zero_bytes_per_rank):
        fail(f"check_zero_bytes needs your function, not {type(zero_bytes_per_rank).__name__}")
    got = {case: _bytes_result(zero_bytes_per_rank, name, case) for case in cases}
    want = {case: zero_bytes_reference(*case) for case in cases}
    for case in cases:
        kind = next((k for k in _KINDS if not _bytes_same(want[case][k], got[case][k])), None)
        if kind is None:
            continue
        psi, n, stage, mp = case
        e, g = fmt_pair(want[case][kind], got[case][kind])
        text = (f"{call_repr(name, psi, n, stage, mixed_precision=mp)}[{kind!r}] is {g}, expected {e} "
                f"({'mixed precision' if mp else 'fp32'}, Ψ = {psi}, N = {n}, ZeRO stage {stage})")
        mistake = find_mistake(BYTES_MISTAKES, lambda m: all(_bytes_same(
            m.variant(want[c], *c)[kind], got[c][kind]) for c in cases))
        if mistake:
            fail(f"{text}: " + mistake.says.format(stage=stage))
        fail(f"{text}. {kind.capitalize()}: {_KIND_HOW[kind]} {_MP if kind != 'sent' else ''}".rstrip())
    measured = run_on_ranks(_measured_worker, world_size=_MEASURED_N, timeout=timeout, name="labkit's runs")[0]
    model = GPT(_MEASURED_CONFIG)
    psi = sum(p.numel() for p in model.parameters())
    # labkit's FSDP keeps the root gathered from its forward to its backward: one all-gather of it fewer
    root_kept = (psi - sum(p.numel() for p in model.blocks.parameters())) * (_MEASURED_N - 1) / _MEASURED_N * 4
    for stage in _ALL:
        mine = _bytes_result(zero_bytes_per_rank, name, (psi, _MEASURED_N, stage, False))
        for kind in ("parameters", "optimizer", "sent"):
            expected = mine[kind] - (root_kept if (kind, stage) == ("sent", 3) else 0)
            if not _bytes_same(measured[stage][kind], expected):
                e, g = fmt_pair(measured[stage][kind], expected)
                what = (f" (your number less {fmt_number(root_kept)}, the root's second all-gather, which labkit's "
                        f"FSDP saves by keeping the root gathered from its forward to its backward)"
                        if (kind, stage) == ("sent", 3) else "")
                fail(f"{name} agrees with labkit.memory.predict, but not with {_MEASURED_BY[stage]} run on "
                     f"{_MEASURED_N} processes in fp32 (Ψ = {psi}): {kind} measured {e} bytes per rank, your formula "
                     f"gives {g}{what}.")
    paper = [got.get((7_500_000_000, 64, s, True)) or zero_bytes_reference(7_500_000_000, 64, s) for s in _ALL]
    totals = ", ".join(_gb(sum(v for k, v in p.items() if k != "sent")) for p in paper)
    passed(f"{name} equals labkit.memory.predict and labkit.zero.bytes_sent_per_step on {len(cases)} cases (ZeRO "
           f"stages 0-3, mixed precision and fp32, N = 1 to 64, a Ψ no N divides), and what labkit's DDP, "
           f"ZeroOptimizer (stages 1, 2) and FSDP keep and send on {_MEASURED_N} processes (fp32, Ψ = {psi}: "
           f"parameters, Adam's state, bytes sent per step). Ψ = 7.5 B on 64 ranks, "
           f"mixed precision: {totals} per rank at stages 0-3")
