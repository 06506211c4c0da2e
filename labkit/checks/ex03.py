"""Checkers for exercise 3, the bucketed DDP (``solutions/03_ddp_exercise.ipynb``).

    check_broadcast(BucketedDDP)         # 3a: broadcast_from_rank0, with labkit's 3b, 3c, 3d
    check_bucket_plan(BucketedDDP)       # 3b: bucket_plan, with labkit's 3a, 3c, 3d
    check_on_grad_ready(BucketedDDP)     # 3c: on_grad_ready, with labkit's 3a, 3b, 3d
    check_finish_backward(BucketedDDP)   # 3d: finish_backward, with labkit's 3a, 3b, 3c
    check_bucketed_ddp(BucketedDDP)      # all of it (any class cls(module, bucket_cap_mb=...)), on 3, 2, 4 ranks
    check_choose_buckets(choose_buckets) # 3e: the buckets chosen from labkit.bucket_model, against the best split

On N processes each rank builds a small float64 model with its own seed (a tied embedding/output weight, a frozen
layer, a buffer, a layer registered before the one it follows), wraps it with three bucket caps and trains 3 SGD
steps next to torch's DistributedDataParallel. After the wrap and after every backward the ranks meet on a
:class:`~labkit.checks.harness.Board` (so that no check collective pairs with a student's all-reduce), gather what
they saw and compute the same verdict. ``dist.all_reduce`` and ``dist.broadcast`` are watched
(:class:`~labkit.checks.harness.Watch`, ``defer=True``: an all-reduce reaches its bucket only at its own handle's
``wait()``, so a missing wait gives the same diagnosis on every run; a stuck rank names the deadlock). An exception
caused by what another method left (a bucket never launched, a ``.grad`` set to None) is blamed on that method.
The known mistakes are :data:`MISTAKES`, each with the change of labkit's class that makes it (:func:`wrong_version`).

3e is checked in this process, without workers: the student's buckets for each of :data:`CHOOSE_CASES` (latency-,
bandwidth- and compute-bound, equal gradients, a GPT with its embedding ready last, a ready order that is not the
reverse of ``model.parameters()``) are timed with :mod:`labkit.bucket_model` and compared with the best contiguous
split of the ready order (:func:`labkit.bucket_model.best_split`); :data:`CHOOSE_MISTAKES` names the known wrong
choices.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import time
import warnings
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from labkit import bucket_model, comm, ddp
from labkit.checks import CheckFailed, describe, fail, first_mismatch, fmt_index, fmt_number, fmt_pair, passed, \
    run_on_ranks, time_limit
from labkit.checks.harness import (Board, Mistake, Watch, and_list, board_dir, bound, call_student, find_mistake,
                                   need_function, plural)
from labkit.data_parallel import broadcast_parameters
from labkit.ddp import plan_buckets

__all__ = ["check_broadcast", "check_bucket_plan", "check_on_grad_ready", "check_finish_backward",
           "check_bucketed_ddp", "TASKS", "WORLD_SIZES", "MISTAKES", "Change", "wrong_version", "check_choose_buckets",
           "Case", "CHOOSE_CASES", "CHOOSE_MISTAKES", "CHOOSE_TOLERANCE"]

WORLD_SIZES = (3, 2, 4)   # 3 first: a first failure on 3 ranks reads best
STEPS, LR, _SEED, MB = 3, 0.5, 100, 2 ** 20
_RTOL, _ATOL = 1e-9, 1e-12
TASKS = {"3a": "broadcast_from_rank0", "3b": "bucket_plan", "3c": "on_grad_ready", "3d": "finish_backward"}
VOCAB, WIDTH, HIDDEN, BATCH = 11, 6, 8, 4


class _Net(nn.Module):
    """Trainable: emb.weight (66, tied with the output), out.weight (48), out.bias (6), hidden.weight (48),
    hidden.bias (8); gradients become ready in the order out.*, hidden.*, emb.weight. Frozen: frozen.*."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(HIDDEN, WIDTH)
        self.hidden = nn.Linear(WIDTH, HIDDEN)
        self.register_buffer("scale", torch.rand(WIDTH) + 0.5)
        self.double()

    def forward(self, tokens, targets):
        h = torch.tanh(self.frozen(self.emb(tokens)) * self.scale)
        h = self.out(torch.tanh(self.hidden(h)))
        return nn.functional.cross_entropy(h @ self.emb.weight.t(), targets)


# (label, bucket_cap_mb, buckets). 900 bytes: hidden.* and out.* (880 bytes) fit, emb.weight does not.
CONFIGS = (("1 bucket", 1.0, 1), ("2 buckets", 900 / MB, 2), ("1 parameter per bucket", 1e-9, 5))
_PARAM_NAMES = ("emb.weight", "frozen.weight", "frozen.bias", "out.weight", "out.bias", "hidden.weight", "hidden.bias")
_FROZEN_KEYS = {"frozen.weight", "frozen.bias"}


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (BATCH,), generator=g), torch.randint(0, VOCAB, (BATCH,), generator=g)


def _trainable(module) -> list:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _grads(module) -> dict:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in _trainable(module)}


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _torch_ddp_run(steps: int) -> tuple[list, dict]:
    """torch's DDP on this rank's data: the averaged gradients after every backward, the final state."""
    module = _Net(seed=_SEED + dist.get_rank())
    torch_ddp = nn.parallel.DistributedDataParallel(module)
    opt = torch.optim.SGD([p for _, p in _trainable(module)], lr=LR)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        torch_ddp(*_batch(step, dist.get_rank())).backward()
        grads.append(_grads(module))
        opt.step()
    return grads, _state(module)


# ============================================================================================
# The known mistakes: what the student is told, and how to make each from labkit's class
# ============================================================================================

class Change(NamedTuple):
    """A wrong version of labkit's BucketedDDP: the task whose check names it, and the methods it overrides."""
    task: str
    methods: dict


class _Waited:
    """A handle with nothing left to wait for: what a wrong version puts where it skips a wait."""

    def wait(self, timeout=None) -> bool:
        return True


def _finish_waiting_for(self, waited: set) -> list:
    """labkit's finish_backward, but only the buckets in ``waited`` are waited on; returns the real handles."""
    works = [b.work for b in self.buckets]
    for k, b in enumerate(self.buckets):
        b.work = b.work if k in waited else _Waited()
    ddp.BucketedDDP.finish_backward(self)
    return works


def _with_world_size(self, param, n: int) -> None:
    """labkit's on_grad_ready, dividing by ``n`` instead of the world size."""
    real, self.world_size = self.world_size, n
    try:
        ddp.BucketedDDP.on_grad_ready(self, param)
    finally:
        self.world_size = real


def _from_zero(self) -> None:
    """labkit's finish_backward, every parameter copied from the start of its bucket."""
    buckets, saved = list(self.buckets), [b.offsets for b in self.buckets]
    for b in buckets:
        b.offsets = [0] * len(b.params)
    ddp.BucketedDDP.finish_backward(self)   # (which may plan new buckets: the old ones get their offsets back)
    for b, offsets in zip(buckets, saved):
        b.offsets = offsets


# What students write calls torch.distributed itself (exercise 3 teaches dist.all_reduce): the wrong versions
# below do too, through these two functions, the only direct calls in labkit outside comm.py (tests/test_comm.py).
def _dist_all_reduce(t: torch.Tensor, **kwargs):
    return dist.all_reduce(t, **kwargs)  # student's code


def _dist_broadcast(t: torch.Tensor, src: int = 0) -> None:
    dist.broadcast(t, src=src)  # student's code


class _AtWait:
    """A handle that launches its all-reduce only when waited on (a launch at the end of backward)."""

    def __init__(self, t):
        self.t = t

    def wait(self, timeout=None) -> bool:
        return _dist_all_reduce(self.t, async_op=True).wait()


def _broadcast(tensors) -> None:
    with torch.no_grad():
        for t in tensors:
            _dist_broadcast(t, src=0)


def _hook_then(self, param, after: Callable) -> None:
    ddp.BucketedDDP.on_grad_ready(self, param)
    after(self)


_LABKIT_PLAN = ddp.BucketedDDP.bucket_plan
_HOW = ("In broadcast_from_rank0, copy rank 0's parameters and buffers to every rank, in place: dist.broadcast(t, "
        "src=0) for every t in self.module.parameters() and self.module.buffers(), under torch.no_grad().")
_APART = ("rank {r}'s initial weights differ from rank 0's: {where} is {want} on rank 0 and {got} on rank {r}. Every "
          "rank built its model with its own seed, so the replicas start apart, and averaging the gradients never "
          "brings them together. ")
_ELEMENT = "on rank {r}, {where} is {got}, torch's DDP has {want}"
_ONE_NTH = "every wrong gradient ({wrong}) is 1/{N} of the average (measured factor {factor}): divided by N = {N} twice?"
_NO_OVERLAP = "no all-reduce started before backward had produced every gradient"
_3c, _3d = "3c", "3d"

MISTAKES = (
    # 3a: after the wrap
    Mistake("rank 0's weights changed", Change("3a", {"broadcast_from_rank0": lambda self: broadcast_parameters(
        self.module, src=1)}), "rank 0's own weights changed: {where} was {before} before the wrap and is {after} "
        "after it. Rank 0 is the source: every rank gets rank 0's weights (src=0), rank 0 keeps them. " + _HOW),
    Mistake("no broadcast", Change("3a", {"broadcast_from_rank0": lambda self: None}),
            _APART + "Nothing was copied. " + _HOW),
    Mistake("buffers not broadcast", Change("3a", {"broadcast_from_rank0": lambda self: _broadcast(
        self.module.parameters())}), _APART + "The parameters agree, but the buffer{s} {listed} "
        "(self.module.buffers()) did not arrive: broadcast the buffers too."),
    Mistake("frozen parameters not broadcast", Change("3a", {"broadcast_from_rank0": lambda self: _broadcast(
        self.params)}), _APART + "The trainable parameters agree, but {listed} differ: broadcast every parameter of "
        "the module, trainable or not (self.module.parameters(), not self.params: frozen layers are part of the "
        "model too){buffers_too}"),
    Mistake("some tensors not broadcast", Change("3a", {"broadcast_from_rank0": lambda self: _broadcast(
        self.module.buffers())}), _APART + "These differ: {listed}. " + _HOW),
    Mistake("broadcast with autograd", Change("3a", {"broadcast_from_rank0": lambda self: [
        _dist_broadcast(t, src=0) for t in [*self.module.parameters(), *self.module.buffers()]]}), "PyTorch warned on rank {r}: \"{warning}\". "
        "dist.broadcast changed the parameters in place while autograd was recording. Broadcast under "
        "torch.no_grad() (with torch.no_grad(): dist.broadcast(t, src=0))."),
    # 3b: the plan, checked when bucket_plan returns
    Mistake("not a list", Change("3b", {"bucket_plan": lambda self: None}),
            "bucket_plan returned {what}: return a list of buckets, each a list of parameters (bucket 0 first)."),
    Mistake("empty bucket", Change("3b", {"bucket_plan": lambda self: _LABKIT_PLAN(self) + [[]]}),
            "bucket {k} is empty: every bucket holds at least one parameter."),
    Mistake("frozen parameter planned", Change("3b", {"bucket_plan": lambda self: plan_buckets(
        reversed(list(self.module.parameters())), self.bucket_cap_bytes)}), "bucket {k} holds {n}, a frozen parameter "
        "(requires_grad=False): it never gets a gradient, so its bucket would never be full. Plan only self.params "
        "(the trainable ones)."),
    Mistake("not a parameter", Change("3b", {"bucket_plan": lambda self: [[p.detach() for p in b] for b in
        _LABKIT_PLAN(self)]}), "bucket {k} holds something that is not a trainable parameter of the module ({n})."),
    Mistake("parameter twice", Change("3b", {"bucket_plan": lambda self: plan_buckets(
        reversed(self.params + self.params[:1]), self.bucket_cap_bytes)}), "{n} is in bucket {first} and in bucket "
        "{k}: every trainable parameter goes into exactly one bucket (a tied weight is one Parameter, listed once in "
        "self.params)."),
    Mistake("parameter missing", Change("3b", {"bucket_plan": lambda self: plan_buckets(
        reversed(self.params[1:]), self.bucket_cap_bytes)}), "{missing} {are} in no bucket: every trainable "
        "parameter (self.params) goes into exactly one bucket."),
    Mistake("over the cap", Change("3b", {"bucket_plan": lambda self: [list(reversed(self.params))]}),
            "bucket {k} holds {names}: {nbytes} bytes of float64 gradients, more than the cap of {cap} bytes "
            "(bucket_cap_mb={cap_mb}). A bucket holds at most self.bucket_cap_bytes, unless one parameter alone is "
            "larger: labkit.ddp.plan_buckets(params, self.bucket_cap_bytes) cuts them so."),
    Mistake("registration order", Change("3b", {"bucket_plan": lambda self: plan_buckets(
        self.params, self.bucket_cap_bytes)}), _NO_OVERLAP + ": bucket 0 holds {names}, and {last}'s gradient is "
        "ready last (the gradients became ready in the order {order}). The buckets are launched in order, so every "
        "bucket waits for bucket 0, and no communication overlaps the backward pass. module.parameters() lists the "
        "parameters in the order the layers were created (about the forward order); backward produces the gradients "
        "from the output back: plan the buckets in the reverse order, plan_buckets(reversed(self.params), "
        "self.bucket_cap_bytes)."),
    # 3c: the all-reduces the hook launches (seen by every rank after backward, or by labkit's finish_backward)
    Mistake("no all-reduce", Change(_3c, {"_timed_all_reduce": lambda self, t, label: None}), "{who} called "
        "dist.all_reduce, so no gradient was averaged. Launch one dist.all_reduce(bucket.buffer, async_op=True) per "
        "full bucket, from on_grad_ready. (The check watches torch.distributed.all_reduce: call it as "
        "dist.all_reduce, not through a name imported with `from torch.distributed import all_reduce`.)"),
    Mistake("all-reduce counts differ", None, "the ranks called dist.all_reduce different numbers of times: {counts} "
            "(ranks 0, 1, ...). Every rank must launch the same all-reduces in the same order."),
    Mistake("wrong reduce op", Change(_3c, {"_timed_all_reduce": lambda self, t, label: _dist_all_reduce(
        t, op=dist.ReduceOp.MAX, async_op=True)}), "rank {r} called dist.all_reduce with op={op}: sum the buckets "
        "(the default op) and divide by the world size."),
    Mistake("launched twice", Change(_3c, {"_timed_all_reduce": lambda self, t, label: [
        _dist_all_reduce(t, async_op=True) for _ in range(2)][-1]}), "{bucket} was all-reduced {times} times: its "
        "gradients are summed over the ranks once per all-reduce. Launch each bucket once per backward (when it "
        "becomes full), e.g. by moving self.next_to_launch past it."),
    Mistake("bucket never launched", None, "{bucket} was never all-reduced (the all-reduces launched were, in order, "
            "of buckets {order}). Launch every bucket once it is full: after copying a gradient in, launch bucket "
            "self.next_to_launch while it is full (a `while`, not an `if`: one gradient can complete several "
            "buckets), and move on to the next."),
    Mistake("launched as they fill", None, "the all-reduces were launched in the bucket order {order}: bucket {k} "
            "before bucket {first}. Launch the buckets strictly in index order, on every rank: the k-th all-reduce of "
            "one rank is summed with the k-th all-reduce of the others, so if two ranks' gradients became ready in "
            "different orders, buckets launched as they fill would pair up the wrong buffers. A full bucket waits "
            "until every bucket before it is launched (self.next_to_launch)."),
    Mistake("synchronous all-reduce", Change(_3c, {"_timed_all_reduce": lambda self, t, label: _dist_all_reduce(t)}),
            "rank {r} called dist.all_reduce for {bucket} without async_op=True: backward stops there until the "
            "communication is over, so nothing overlaps. Launch it with handle = dist.all_reduce(bucket.buffer, "
            "async_op=True), keep the handle in the bucket (bucket.work), and wait in finish_backward."),
    Mistake("handle not kept", Change(_3c, {"on_grad_ready": lambda self, p: _hook_then(self, p, lambda s: [
        setattr(b, "work", None) for b in s.buckets])}), "on rank {r}, {bucket} was launched, but when backward ended "
        "bucket.work was None, so finish_backward had no handle to wait on ({error}). Keep each bucket's own handle: "
        "bucket.work = dist.all_reduce(bucket.buffer, async_op=True)."),
    Mistake("gradient cleared", Change(_3c, {"on_grad_ready": lambda self, p: (self.module.zero_grad(), ddp.BucketedDDP
        .on_grad_ready(self, p))}), "{method} raised {error} on rank {r}, because {names}.grad was None by then, "
        "although its gradient had been ready: something set it to None. zero_grad() (of the module or of the "
        "optimizer) sets every .grad to None; the training loop calls it before backward, never the DDP hooks: read "
        "param.grad, copy it into the bucket, and leave it in place."),
    Mistake("waited in the hook", Change(_3c, {"on_grad_ready": lambda self, p: _hook_then(self, p, lambda s: [
        b.work.wait() for b in s.buckets if b.work is not None])}), "on rank {r}, the all-reduce of {bucket} was "
        "waited on during the backward pass, when only {ready} of the {total} gradients were ready: backward stops "
        "there until the communication is over, so nothing overlaps. Wait for the handles in finish_backward, which "
        "runs once backward is done."),
    Mistake("launched at the end", Change(_3c, {"_timed_all_reduce": lambda self, t, label: _AtWait(t)}),
            _NO_OVERLAP + " (the first, of {bucket}, started after all {total} were ready), so no communication "
            "overlaps the backward pass. Launch each bucket from on_grad_ready as soon as it is full (and every bucket "
            "before it is launched), not at the end of backward."),
    Mistake("no division", Change(_3c, {"on_grad_ready": lambda self, p: _with_world_size(self, p, 1)}),
            "{scope} {N} times the average, on every rank (measured: p.grad / torch DDP's p.grad = {factor} = N). The "
            "all-reduce sums the N ranks' gradients; the average is g = (1/N) Σ g_i: divide each bucket by the world "
            "size (bucket.buffer.div_(self.world_size)) before you launch its all-reduce{every}"),
    Mistake("divided twice", Change(_3c, {"on_grad_ready": lambda self, p: _with_world_size(self, p, self.world_size ** 2)}),
            _ONE_NTH + " Divide each bucket once, before its all-reduce."),
    Mistake("AVG and divided", Change(_3c, {"_timed_all_reduce": lambda self, t, label: _dist_all_reduce(
        t, op=dist.ReduceOp.AVG, async_op=True)}), _ONE_NTH + " op=ReduceOp.AVG already divides by N: with it, do not "
        "divide the bucket yourself (or sum, the default op, and divide once)."),
    # 3d: waiting and copying back
    Mistake("handle never waited", Change(_3d, {"finish_backward": lambda self: _finish_waiting_for(
        self, {len(self.buckets) - 1})}), "on rank {r}, the all-reduce of {bucket} was launched, but its handle was "
        "never waited on before backward returned ({waited}). During this check an all-reduce writes its result into "
        "the bucket only when its own handle's wait() is called (on a GPU, too, it may still be running), so bucket "
        "{k} still holds rank {r}'s own gradients / N. Keep each bucket's own handle (bucket.work = "
        "dist.all_reduce(bucket.buffer, async_op=True)), and in finish_backward wait on every bucket's handle before "
        "copying that bucket back into .grad."),
    Mistake("gradient set to None", Change(_3d, {"finish_backward": lambda self: (ddp.BucketedDDP.finish_backward(
        self), self.module.zero_grad())}), "on rank {r}, {n}.grad is None after backward: copy each bucket back into "
        "the existing .grad tensors (p.grad.copy_(...)) in finish_backward; do not set them to None."),
    Mistake("never copied back", Change(_3d, {"finish_backward": lambda self: [b.work.wait() for b in self.buckets]}),
            _ELEMENT + ": {n}.grad is rank {r}'s own gradient{in_bucket}, not the average. Copy each bucket's "
            "averaged buffer back into .grad in finish_backward, after waiting for its handle."),
    Mistake("copied before the wait", Change(_3d, {"finish_backward": lambda self: [w.wait() for w in
        _finish_waiting_for(self, set())]}), _ELEMENT + ": {n}.grad is rank {r}'s own gradient divided by "
        "N{in_bucket}: the bucket as it was before its all-reduce. Copy a bucket back into .grad only after its "
        "handle's wait()."),
    Mistake("gradients zeroed", Change(_3d, {"finish_backward": lambda self: (ddp.BucketedDDP.finish_backward(self),
        self.module.zero_grad(set_to_none=False))}), _ELEMENT + ": {n}.grad is zero{in_bucket}. Copy each bucket "
        "back into .grad in finish_backward."),
    Mistake("wrong slice", Change(_3d, {"finish_backward": _from_zero}), _ELEMENT + "{in_bucket}. Each parameter's "
            "gradient sits in its bucket at its own offset: copy param.grad into buffer[offset:offset + "
            "param.numel()] in on_grad_ready, and back from the same slice in finish_backward."),
)
_SAYS = {m.name: m.says for m in MISTAKES}


def _say(name: str, **fields) -> str:
    return _SAYS[name].format(**fields)


def wrong_version(mistake: Mistake) -> type:
    """labkit's BucketedDDP with the mistake's change, named after the mistake (``"no division"`` -> NoDivision)."""
    name = "".join(w[:1].upper() + w[1:] for w in mistake.name.replace("-", " ").replace("'s", "").split())
    return type(name, (ddp.BucketedDDP,), dict(mistake.variant.methods))


# ============================================================================================
# Watching the student's code in a rank
# ============================================================================================

class Launch(NamedTuple):
    """One dist.all_reduce of one backward, as every rank sees it after gathering."""
    bucket: int | None    # which bucket's buffer (None: not a bucket of the skeleton)
    async_op: bool
    ready: int            # gradients ready at its launch
    waits: list           # gradients ready at each wait() of its handle
    op: str               # its reduce op ("RedOpType.SUM", ...)


class _Watch(Watch):
    """dist.all_reduce and dist.broadcast, deferred; ``ready`` is the names of the gradients ready so far (hooks
    registered before the student's), and each all-reduce notes its buffer."""

    def __init__(self, board: Board, deadline: float):
        super().__init__(["all_reduce", "broadcast"], deadline=deadline, board=board, defer=True)
        self.ready: list[str] = []

    def moment(self) -> int:
        return len(self.ready)

    def on_call(self, call, args: dict) -> None:
        call.info.update(ptr=args["tensor"].data_ptr(), ready=len(self.ready))

    def launches(self, plan_ptrs: dict) -> list[Launch]:
        return [Launch(plan_ptrs.get(c.info["ptr"]), c.async_op, c.info["ready"], list(c.waits),
                       c.reduce_op or str(dist.ReduceOp.SUM)) for c in self.calls if c.op == "all_reduce"]

    def stuck_hints(self, states: dict) -> list[str]:
        hints = super().stuck_hints(states)
        done = {r: s for r, s in states.items() if s["state"] == "checking" and "all_reduces" in s}
        if done and any(s["state"] == "waiting" for s in states.values()):
            counts = and_list(sorted({s["all_reduces"] for s in done.values()}))
            hints.append(f"→ {and_list(f'rank {r}' for r in done)} had finished this step after {counts} all-reduce(s), "
                         f"while the others wait in one more: every rank must launch the same all-reduces (one per "
                         f"bucket), in the same order (an all-reduce inside `if rank == ...`, or a synchronous one on "
                         f"only some ranks?).")
        return hints


class _Run:
    """What the wrappers around the student's methods need in this rank (one per launched worker)."""
    watch: _Watch
    sync: Board
    meetings = 0
    head = ""
    task: str | None = None
    cap_mb = 1.0
    timeout = 10.0


_RUN = _Run()


@contextmanager
def _student_code(seconds: float, what: str):
    """The student's code: stopped after ``seconds`` (endless loops, with every rank's state), warnings recorded."""
    message = (f"{what} did not return within {seconds:g} s on rank {dist.get_rank()} (N={dist.get_world_size()} "
               f"ranks): an endless loop? (a `while` whose condition never changes, e.g. waiting for a bucket that "
               f"never fills)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _RUN.watch.installed(), time_limit(seconds, message):
                yield caught
        except CheckFailed as exc:
            if exc.args == (message,):
                exc.args = (message + _RUN.watch.states_text(),)
            raise


def _everyone(obj) -> list:
    """Every rank's ``obj``, once every rank has finished its part (met on the board first: a rank still in an
    all-reduce names the deadlock itself, instead of pairing it with this gather)."""
    _RUN.meetings += 1
    _RUN.watch._state("checking", all_reduces=sum(c.op == "all_reduce" for c in _RUN.watch.calls))
    _RUN.sync.set("met", count=_RUN.meetings)
    until = time.monotonic() + 2 * _RUN.timeout   # a rank stuck in a call names itself first (0.8 × timeout)
    while not all(_RUN.sync.states().get(r, {}).get("count", 0) >= _RUN.meetings for r in range(dist.get_world_size())):
        if time.monotonic() > until:
            raise CheckFailed(f"the ranks did not all finish {_RUN.watch.phase} within {2 * _RUN.timeout:g} s"
                              + _RUN.watch.states_text())
        time.sleep(0.01)
    counts = [s.get("all_reduces") for _, s in sorted(_RUN.watch.board.states().items())]
    if len(set(counts)) > 1:   # an all-reduce left pending on some ranks would pair with the gather below
        raise CheckFailed(f"{_RUN.head} " + _say("all-reduce counts differ", counts=counts))
    return comm.all_gather_objects(obj)


def _verdict(problem: str | None) -> None:
    if problem:
        raise CheckFailed(problem)


def _plan_names(model, names: dict) -> list | None:
    try:
        return [[names.get(p, "<not a parameter of the module>") for p in b.params] for b in model.buckets]
    except Exception:  # noqa: BLE001 - a class of the student's own design: no plan to show
        return None


def _guarded(base: type) -> type:
    """``base`` whose bucket_plan is checked when it returns, and whose exceptions in on_grad_ready and
    finish_backward are reported against the method that caused them (module functions: pickled by name, so
    that the student's traceback skips them)."""
    return type(base.__name__, (base,), dict(bucket_plan=_checked_plan, on_grad_ready=_hook_guard,
                                              finish_backward=_finish_guard))


def _checked_plan(self):
    plan = super(type(self), self).bucket_plan()
    _verdict(_plan_problem(self, plan))
    return plan


def _hook_guard(self, param):
    try:
        return super(type(self), self).on_grad_ready(param)
    except (AttributeError, TypeError) as exc:
        problem = _cleared_problem(self, "on_grad_ready", exc)
        if problem:
            _lowest_rank_first()
            raise CheckFailed(problem) from exc
        raise


def _finish_guard(self):
    try:
        return super(type(self), self).finish_backward()
    except CheckFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - told apart below
        problem = _cleared_problem(self, "finish_backward", exc) or _hook_problem(self, exc)
        if problem:
            _lowest_rank_first()
            raise CheckFailed(problem) from exc
        raise


def _lowest_rank_first() -> None:
    """Before a rank raises what it found alone (every rank may find the same): a higher rank waits a little, so
    that the message names the lowest rank on every run."""
    time.sleep(0.3 * dist.get_rank())


def _cleared_problem(model, method: str, exc: Exception) -> str | None:
    """A .grad set to None (zero_grad()) after its gradient was ready, found by the exception it caused."""
    cleared = [n for n, p in _trainable(model.module) if p.grad is None and n in _RUN.watch.ready]
    if not cleared or "NoneType" not in str(exc):
        return None
    return f"{_RUN.head} " + _say("gradient cleared", method=method, error=f"{type(exc).__name__} ({exc})",
                                  r=dist.get_rank(), names=and_list(cleared))


def _hook_problem(model, exc: Exception) -> str | None:
    """finish_backward raised: what the hook left behind, if that is the cause (this rank's view only)."""
    names = {p: n for n, p in model.module.named_parameters()}
    plan = _plan_names(model, names)
    if plan is None:
        return None
    ptrs = {b.buffer.data_ptr(): k for k, b in enumerate(model.buckets)}
    problem = _launch_problem(dist.get_rank(), _RUN.watch.launches(ptrs), plan)
    if problem:
        return f"{_RUN.head} {problem}"
    launched = {row.bucket for row in _RUN.watch.launches(ptrs)}
    lost = [k for k, b in enumerate(model.buckets) if k in launched and getattr(b, "work", 0) is None]
    if lost:
        return f"{_RUN.head} " + _say("handle not kept", r=dist.get_rank(), bucket=_bucket_text(lost[0], plan),
                                      error=f"{type(exc).__name__}: {exc}")
    if _RUN.task == "3c":
        state = "; ".join(f"bucket {k}: {b.ready} of {len(b.params)} gradients counted, work "
                          f"{'None' if b.work is None else 'set'}" for k, b in enumerate(model.buckets))
        return (f"{_RUN.head} labkit's finish_backward raised {type(exc).__name__} ({exc}) on what your on_grad_ready "
                f"left when backward ended (self.next_to_launch = {model.next_to_launch}; {state}). on_grad_ready "
                f"must count each gradient in its bucket (bucket.ready), launch every full bucket in order and keep "
                f"its handle in bucket.work.")
    return None


def _worker(cls, name: str, configs, timeout: float, steps: int, board_path: str, task: str | None) -> list:
    """One rank: the class on every configuration. The student's code may take 0.6 × timeout (then it loops);
    a watched call may wait 0.8 × timeout (then it is deadlocked); gloo gives up at the timeout."""
    rank, world_size, seconds = dist.get_rank(), dist.get_world_size(), 0.6 * timeout
    _RUN.watch = _Watch(Board(board_path, rank, world_size), deadline=0.8 * timeout)
    os.makedirs(os.path.join(board_path, "met"), exist_ok=True)
    _RUN.sync, _RUN.task, _RUN.timeout = Board(os.path.join(board_path, "met"), rank, world_size), task, timeout
    torch_grads, torch_final = _torch_ddp_run(steps)
    summary = []
    for label, cap_mb, _ in configs:
        case = f"N={world_size} ranks, bucket_cap_mb={cap_mb:.3g} ({label})"
        module = _Net(seed=_SEED + rank)
        initial = _state(module)
        names = {p: n for n, p in module.named_parameters()}
        for n, p in _trainable(module):
            p.register_post_accumulate_grad_hook(lambda p, n=n: _RUN.watch.ready.append(n))
        _RUN.head, _RUN.cap_mb, _RUN.watch.calls = f"{name.split('.')[0]}.bucket_plan is wrong ({case}):", cap_mb, []
        _RUN.watch.phase = f"the wrap, {name}(module, bucket_cap_mb={cap_mb:.3g})"
        with _student_code(seconds, f"{name}(module, bucket_cap_mb={cap_mb:.3g})"):
            model = cls(module, bucket_cap_mb=cap_mb)
        _verdict(_broadcast_problem(name, case, _everyone(dict(initial=initial, now=_state(module)))))
        opt = torch.optim.SGD([p for _, p in _trainable(module)], lr=LR)
        for step in range(steps):
            tokens, targets = _batch(step, rank)
            with warnings.catch_warnings():  # what the student's code makes torch say is reported below
                warnings.simplefilter("ignore")
                local = torch.autograd.grad(module(tokens, targets), [p for _, p in _trainable(module)])
            opt.zero_grad()
            when = "in the first backward" if step == 0 else f"in backward {step + 1}"
            _RUN.head, _RUN.watch.ready, _RUN.watch.calls = f"{name} is wrong ({case}), {when}:", [], []
            _RUN.watch.phase = f"backward {step + 1} ({case})"
            plan = _plan_names(model, names)   # the buckets of this backward (labkit's may plan new ones at its end)
            ptrs = {b.buffer.data_ptr(): k for k, b in enumerate(model.buckets)} if plan else {}
            with _student_code(seconds, f"loss.backward() with {name}") as caught:
                model(tokens, targets).backward()
            record = dict(launches=_RUN.watch.launches(ptrs), ready=list(_RUN.watch.ready), grads=_grads(module),
                          torch=torch_grads[step], local={n: g.clone() for (n, _), g in zip(_trainable(module), local)},
                          warnings=[str(w.message) for w in caught], plan=plan)
            _verdict(_step_problem(_RUN.head, step, _everyone(record)))
            opt.step()
        final = _everyone(_state(module))
        _verdict(_final_problem(name, case, steps, final, torch_final))
        summary.append(max(float((final[rank][k] - torch_final[k]).abs().max()) for k in torch_final))
    return summary


# ============================================================================================
# Verdicts (every rank computes the same one from the same gathered data)
# ============================================================================================

def _mismatch(want, got):
    """first_mismatch at this check's tolerances; a tensor of another shape differs at []."""
    if want.shape != got.shape:
        return (), float("nan"), float("nan")
    return first_mismatch(want, got, rtol=_RTOL, atol=_ATOL)


def _first_difference(a: dict, b: dict, keys) -> tuple | None:
    """The first (key, index, value in a, value in b) where two state dicts differ."""
    return next(((k, *bad) for k in keys for bad in [_mismatch(a[k], b[k])] if bad), None)


def _where(key: str, index) -> str:
    return f"{key}{fmt_index(index)}" if index else key


def _broadcast_problem(name: str, case: str, states: list) -> str | None:
    source, keys = states[0]["initial"], list(_PARAM_NAMES) + sorted(set(states[0]["initial"]) - set(_PARAM_NAMES))
    head = f"{name} is wrong ({case}): after wrapping,"
    moved = _first_difference(source, states[0]["now"], keys)
    if moved:
        before, after = fmt_pair(moved[2], moved[3])
        return f"{head} " + _say("rank 0's weights changed", where=_where(*moved[:2]), before=before, after=after)
    for r in range(1, len(states)):
        diff = _first_difference(source, states[r]["now"], keys)
        if diff:
            want, got = fmt_pair(diff[2], diff[3])
            different = [key for key in keys if _first_difference(source, states[r]["now"], [key])]
            buffers, listed = set(keys) - set(_PARAM_NAMES), ", ".join(different)
            fields = dict(r=r, where=_where(*diff[:2]), want=want, got=got, listed=listed)
            if set(different) <= buffers:
                return f"{head} " + _say("buffers not broadcast", s="s" if len(different) > 1 else "", **fields)
            if set(different) <= _FROZEN_KEYS | buffers:
                too = ", and the buffers (self.module.buffers())." if buffers & set(different) else "."
                return f"{head} " + _say("frozen parameters not broadcast", buffers_too=too, **fields)
            return f"{head} " + _say("no broadcast" if set(different) == set(keys) else "some tensors not broadcast",
                                     **fields)
    return None


def _plan_problem(model, plan) -> str | None:
    """The plan the student's bucket_plan returned, checked before labkit's class uses it."""
    head, names = _RUN.head, {p: n for n, p in model.module.named_parameters()}
    if not isinstance(plan, (list, tuple)) or not all(isinstance(b, (list, tuple)) for b in plan):
        return f"{head} " + _say("not a list", what=fmt_number(plan) if plan is None else f"a {type(plan).__name__}")
    where, trainable = {}, [n for n, _ in _trainable(model.module)]
    for k, bucket in enumerate(plan):
        if not bucket:
            return f"{head} " + _say("empty bucket", k=k)
        for p in bucket:
            n = names.get(p) if isinstance(p, torch.Tensor) else None
            if n is not None and n not in trainable:
                return f"{head} " + _say("frozen parameter planned", k=k, n=n)
            if n is None:
                what = f"a tensor of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
                return f"{head} " + _say("not a parameter", k=k, n=what)
            if n in where:
                return f"{head} " + _say("parameter twice", n=n, first=where[n], k=k)
            where[n] = k
    missing = [n for n in trainable if n not in where]
    if missing:
        return f"{head} " + _say("parameter missing", missing=", ".join(missing), are="is" if len(missing) == 1 else "are")
    cap = int(_RUN.cap_mb * MB)
    for k, bucket in enumerate(plan):
        nbytes = sum(comm.nbytes(p) for p in bucket)
        if len(bucket) > 1 and nbytes > cap:
            return f"{head} " + _say("over the cap", k=k, names=", ".join(names[p] for p in bucket), nbytes=nbytes,
                                     cap=cap, cap_mb=f"{_RUN.cap_mb:.3g}")
    return None


def _bucket_text(k, plan) -> str:
    if plan is None or k is None or not 0 <= k < len(plan):
        return f"bucket {k}" if k is not None else "an all-reduce"
    return f"bucket {k} ({', '.join(plan[k])})"


def _launch_problem(r: int, rows: list[Launch], plan) -> str | None:
    """What is wrong with the all-reduces rank ``r`` launched in one backward, from that rank's rows alone."""
    if not rows:
        return _say("no all-reduce", who=f"rank {r} never")
    bad_op = next((row for row in rows if "SUM" not in row.op and "AVG" not in row.op), None)
    if bad_op:   # AVG without dividing is an average too (as in exercise 1)
        return _say("wrong reduce op", r=r, op=bad_op.op)
    if plan is not None and all(row.bucket is not None for row in rows):
        order = [row.bucket for row in rows]
        twice = next((k for k in range(len(plan)) if order.count(k) > 1), None)
        if twice is not None:
            return _say("launched twice", bucket=_bucket_text(twice, plan), times=order.count(twice))
        never = next((k for k in range(len(plan)) if k not in order), None)
        if never is not None:
            return _say("bucket never launched", bucket=_bucket_text(never, plan), order=order)
        if order != sorted(order):
            first = next(i for i in range(len(order)) if order[i] != i)
            return _say("launched as they fill", order=order, k=order[first], first=first)
    sync = next((row for row in rows if not row.async_op), None)
    return _say("synchronous all-reduce", r=r, bucket=_bucket_text(sync.bucket, plan)) if sync else None


def _step_problem(head: str, step: int, records: list) -> str | None:
    total, plan = len(records[0]["ready"]), records[0]["plan"]
    for r, rec in enumerate(records):
        for w in rec["warnings"]:
            if "c10d::broadcast_" in w:
                return f"{head} " + _say("broadcast with autograd", r=r, warning=w.split(".")[0])
    launches = [rec["launches"] for rec in records]
    if not any(launches):
        return f"{head} " + _say("no all-reduce", who="no rank")
    problem = next((p for r, rows in enumerate(launches) for p in [_launch_problem(r, rows, plan)] if p), None)
    if problem:
        return f"{head} {problem}"
    for r, rows in enumerate(launches):
        for i, row in enumerate(rows):
            if not row.waits:
                k = row.bucket if row.bucket is not None else i
                others = [(r2.bucket if r2.bucket is not None else j, len(r2.waits)) for j, r2 in enumerate(rows)
                          if r2.waits]
                waited = ("no handle was waited on at all" if not others else "the handles waited on were those of "
                          + ", ".join(f"bucket {b}" + (f" ({n} times)" if n > 1 else "") for b, n in others))
                return f"{head} " + _say("handle never waited", r=r, bucket=_bucket_text(k, plan), waited=waited, k=k)
            early = [w for w in row.waits if w < total]
            if early:
                return f"{head} " + _say("waited in the hook", r=r, bucket=_bucket_text(row.bucket, plan),
                                         ready=early[0], total=total)
    grads = _grad_problem(head, records, plan)
    if grads:
        return grads
    rows = launches[0]   # overlap: with several buckets, the first all-reduce must start during backward
    if step == 0 and len(rows) > 1 and min(row.ready for row in rows) >= total:
        order = records[0]["ready"]
        if plan and order[-1] in plan[0]:
            return f"{head} " + _say("registration order", names=", ".join(plan[0]), last=order[-1],
                                     order=", ".join(order))
        return f"{head} " + _say("launched at the end", bucket=_bucket_text(rows[0].bucket, plan), total=total)
    return None


def _grad_problem(head: str, records: list, plan) -> str | None:
    """The gradients after backward against torch's DDP, with what they look like when they are wrong."""
    N, names = len(records), list(records[0]["torch"])
    for n in names:
        r = next((i for i, rec in enumerate(records) if rec["grads"][n] is None), None)
        if r is not None:
            return f"{head} " + _say("gradient set to None", r=r, n=n)
    wrong = [n for n in names if any(_mismatch(rec["torch"][n], rec["grads"][n]) for rec in records)]
    if not wrong:
        return None
    ratios = {n: [float((rec["grads"][n] * rec["torch"][n]).sum() / (rec["torch"][n] ** 2).sum()) for rec in records]
              for n in wrong}
    factors = {n: ratios[n][0] for n in wrong
               if all(abs(x - ratios[n][0]) < 1e-9 * abs(ratios[n][0]) + 1e-12 for x in ratios[n])
               and not any(_mismatch(rec["torch"][n] * ratios[n][0], rec["grads"][n]) for rec in records)}
    values = sorted(set(round(f, 6) for f in factors.values()))
    if len(factors) == len(wrong) and len(values) == 1:
        factor = fmt_number(factors[wrong[0]])
        if abs(values[0] - N) < 1e-6:
            scope = "every gradient is" if len(wrong) == len(names) else f"the gradients of {', '.join(wrong)} are"
            return f"{head} " + _say("no division", scope=scope, N=N, factor=factor,
                                     every=" (every bucket)." if len(wrong) < len(names) else ".")
        if abs(values[0] - 1 / N) < 1e-6:
            avg = any("AVG" in row.op for rec in records for row in rec["launches"])
            return f"{head} " + _say("AVG and divided" if avg else "divided twice", wrong=", ".join(wrong), N=N,
                                     factor=factor)
    for n in wrong:   # element by element: the first wrong one, and what it equals
        for r, rec in enumerate(records):
            want, got, own = rec["torch"][n], rec["grads"][n], rec["local"][n]
            bad = _mismatch(want, got)
            if bad:
                e, g = fmt_pair(bad[1], bad[2])
                bucket = next((k for k, b in enumerate(plan) if n in b), None) if plan else None
                fields = dict(r=r, where=_where(n + ".grad", bad[0]), got=g, want=e, n=n,
                              in_bucket=f" (in {_bucket_text(bucket, plan)})" if bucket is not None else "")
                looks = next((m for m, like in (("never copied back", own), ("copied before the wait", own / N),
                                                ("gradients zeroed", own * 0)) if not _mismatch(like, got)), "wrong slice")
                return f"{head} " + _say(looks, **fields)
    return None


def _final_problem(name: str, case: str, steps: int, finals: list, torch_final: dict) -> str | None:
    for r, state in enumerate(finals):
        diff = _first_difference(torch_final, state, list(torch_final))
        if diff:
            w, g = fmt_pair(diff[2], diff[3])
            return (f"{name} is wrong ({case}): after {steps} SGD steps rank {r}'s {_where(*diff[:2])} is {g}, "
                    f"torch's DDP has {w}, although every gradient matched. Does your class change the parameters "
                    f"or buffers outside backward?")
    return None


# ============================================================================================
# The checks
# ============================================================================================

def _mixed(cls, task: str | None) -> type:
    """``cls`` with labkit's methods for every task but ``task`` (None: the class as it is), guarded."""
    if task is None:
        return _guarded(cls) if issubclass(cls, ddp.BucketedDDP) else cls
    missing = [m for m in TASKS.values() if not callable(getattr(cls, m, None))]
    if missing or not issubclass(cls, ddp.BucketedDDP):
        lacks = f"has no method {', '.join(missing)}" if missing else "is not a subclass of labkit.ddp.BucketedDDP"
        fail(f"{cls.__name__} {lacks}: the check of exercise {task} runs your {TASKS[task]} inside "
             f"labkit.ddp.BucketedDDP, with labkit's version of the other methods. Define your class as the notebook "
             f"does, class BucketedDDP(labkit.ddp.BucketedDDP), with its methods (or check a class of your own "
             f"design with check_bucketed_ddp).")
    reference = {m: getattr(ddp.BucketedDDP, m) for t, m in TASKS.items() if t != task}
    return _guarded(type(cls.__name__, (cls,), reference))


def _check(cls, task: str | None, world_sizes, configs, timeout: float) -> list:
    __tracebackhide__ = True
    if not isinstance(cls, type):
        fail(f"pass your class itself (e.g. check_bucketed_ddp(BucketedDDP)), not a {type(cls).__name__} object")
    name = cls.__name__ if task is None else f"{cls.__name__}.{TASKS[task]}"
    tested = _mixed(cls, task)
    diffs = []
    for N in world_sizes:
        with board_dir() as path:
            per_rank = run_on_ranks(_worker, tested, name, configs, timeout, STEPS, path, task, world_size=N,
                                    timeout=timeout, name=name, task=task or "3")
        diffs.extend(d for rank in per_rank for d in rank)
    return diffs


def _configs_text(configs) -> str:
    return ", ".join(label for label, _, _ in configs)


def _ranks(world_sizes) -> str:
    sizes = list(world_sizes)
    return f"{sizes[0]} processes" if len(sizes) == 1 else f"{and_list(sizes)} processes"


def check_broadcast(cls, *, world_sizes=(3,), timeout: float = 10.0) -> None:
    """Check exercise 3a: ``cls.broadcast_from_rank0`` gives every rank rank 0's parameters and buffers.

    Runs the class with labkit's 3b-3d on 3 processes whose models start from different seeds, and checks
    the weights right after the wrap, then 3 SGD steps against torch's DDP."""
    __tracebackhide__ = True
    _check(cls, "3a", world_sizes, CONFIGS[1:2], timeout)
    passed(f"{cls.__name__}.broadcast_from_rank0 is correct: on {_ranks(world_sizes)} whose models started from "
           f"different seeds, every rank holds rank 0's parameters (the frozen ones too) and buffers after the wrap")


def check_bucket_plan(cls, *, world_sizes=(3,), timeout: float = 10.0) -> None:
    """Check exercise 3b: ``cls.bucket_plan`` puts every trainable parameter in one bucket, within the cap,
    with bucket 0 the one whose gradients are ready first, so that communication starts during backward."""
    __tracebackhide__ = True
    _check(cls, "3b", world_sizes, CONFIGS, timeout)
    passed(f"{cls.__name__}.bucket_plan is correct on {_ranks(world_sizes)} ({_configs_text(CONFIGS)}): every "
           f"trainable parameter in one bucket, within the cap, and with several buckets the first all-reduce "
           f"starts while backward is still running")


def check_on_grad_ready(cls, *, world_sizes=(3,), timeout: float = 10.0) -> None:
    """Check exercise 3c: ``cls.on_grad_ready`` copies each gradient into its bucket and launches every full
    bucket, in bucket order, divided by the world size, with an asynchronous all-reduce."""
    __tracebackhide__ = True
    _check(cls, "3c", world_sizes, CONFIGS, timeout)
    passed(f"{cls.__name__}.on_grad_ready is correct on {_ranks(world_sizes)} ({_configs_text(CONFIGS)}): each "
           f"bucket launched once, in bucket order, asynchronously, divided by N, during backward")


def check_finish_backward(cls, *, world_sizes=(3,), timeout: float = 10.0) -> None:
    """Check exercise 3d: ``cls.finish_backward`` waits on every bucket's own handle and copies the averaged
    buckets back into ``.grad``."""
    __tracebackhide__ = True
    _check(cls, "3d", world_sizes, CONFIGS, timeout)
    passed(f"{cls.__name__}.finish_backward is correct on {_ranks(world_sizes)} ({_configs_text(CONFIGS)}): "
           f"every bucket's own handle waited on, and the averaged gradients copied back into .grad")


def check_bucketed_ddp(cls, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check the whole class against ``torch.nn.parallel.DistributedDataParallel``.

    On each world size, ``cls(module, bucket_cap_mb=...)`` wraps a float64 model (tied embedding/output,
    a frozen layer, a buffer, rank-dependent initial weights) with one bucket, two buckets and one
    parameter per bucket, and trains 3 SGD steps; after the wrap and after every backward the weights and
    gradients are compared with torch's DDP on the same data (rtol 1e-9), and the all-reduces are watched
    (see the module's doc). ``timeout``: seconds before a rank that hangs is stopped."""
    __tracebackhide__ = True
    diffs = _check(cls, None, world_sizes, CONFIGS, timeout)
    passed(f"{cls.__name__} matches torch's DistributedDataParallel on {_ranks(sorted(world_sizes))}, with "
           f"{_configs_text(CONFIGS)}: the same weights after the wrap, the same gradients after each of {STEPS} "
           f"SGD steps, the parameters within {bound(max(diffs))} of torch's; the all-reduces launched in "
           f"bucket order during backward and each one waited on")


# ============================================================================================
# 3e. Choosing the buckets from a model: a design task, checked against the best split
# ============================================================================================
# The task: choose_buckets(sizes, ready, alpha, beta) returns the buckets (lists of parameter indices, bucket 0
# first) whose all-reduces, sent one after another in bucket order (labkit.bucket_model), end soonest after the last
# gradient is ready. Checked by labkit's model against the best of every contiguous split of the ready order: any
# buckets whose exposed time is within CHOOSE_TOLERANCE of the best pass.

class Case(NamedTuple):
    """One regime of 3e: ``sizes[i]`` bytes of parameter i's gradient (model.parameters() order), ready at
    ``ready[i]`` seconds; one all-reduce of m bytes costs ``alpha + m·beta``."""
    name: str
    what: str
    sizes: tuple
    ready: tuple
    alpha: float
    beta: float


_MS, _KB = 1e-3, 2 ** 10


def _equal(name: str, what: str, n: int, nbytes: int, every: float, alpha: float, beta: float) -> Case:
    """n gradients of ``nbytes``, one every ``every`` seconds, parameter 0 ready last (backward runs from the output)."""
    return Case(name, what, (nbytes,) * n, tuple(every * (n - i) for i in range(n)), alpha, beta)


def _gpt_like() -> Case:
    """A tied embedding (index 0, 32 MiB) ready last, a position embedding, 3 blocks of a 4 MiB matrix, its bias and a
    norm's weight and bias, a final norm; each matrix takes 1 ms of backward, each small tensor 0.02 ms."""
    sizes = (32 * MB, 1 * MB) + (4 * MB, 16 * _KB, 4 * _KB, 4 * _KB) * 3 + (4 * _KB, 4 * _KB)
    ready, t = [0.0] * len(sizes), 0.0
    for i in range(len(sizes) - 1, 0, -1):
        t += 1.0 * _MS if sizes[i] >= MB else 0.02 * _MS
        ready[i] = round(t, 9)
    ready[0] = round(t + 2.0 * _MS, 9)     # the tied weight's second contribution: the end of backward
    return Case("GPT-like", "16 tensors, a 32 MiB tied embedding ready last, small biases and norms", sizes,
                tuple(ready), 0.5 * _MS, 1e-10)


CHOOSE_CASES = (
    _equal("equal gradients", "12 gradients of 2 MiB, one every 0.5 ms, α = 1 ms", 12, 2 * MB, 0.5 * _MS, 1 * _MS,
           1e-10),
    _equal("latency-bound", "8 gradients of 1 MiB, one every 0.1 ms, α = 5 ms", 8, MB, 0.1 * _MS, 5 * _MS, 1e-10),
    _equal("bandwidth-bound", "8 gradients of 4 MiB, one every 1 ms, 4.2 ms each on the link", 8, 4 * MB, 1 * _MS,
           0.05 * _MS, 1e-9),
    _equal("compute-bound", "8 gradients of 1 MiB, one every 2 ms, α = 0.05 ms", 8, MB, 2 * _MS, 0.05 * _MS, 1e-10),
    _gpt_like(),
    Case("out of order", "5 tensors as Probe's: `out` created before `hidden` but used after it",
         (8 * MB, 8 * MB, 8 * _KB, 8 * MB, 8 * _KB), (6 * _MS, 2 * _MS, 1 * _MS, 4 * _MS, 3 * _MS), 0.1 * _MS, 2e-10),
)
CHOOSE_TOLERANCE = 0.05          # exposed time within 5 % of the best split's passes
_CHOOSE_SECONDS = 10.0           # for one call of the student's function


def _args(case: Case) -> tuple:
    return list(case.sizes), list(case.ready), case.alpha, case.beta


@functools.lru_cache(maxsize=None)
def _best(sizes: tuple, ready: tuple, alpha: float, beta: float) -> list:
    return bucket_model.best_split(sizes, ready, alpha, beta)


def _in_order(order: list, counts: list) -> list:
    """``order`` cut into consecutive buckets of ``counts`` parameters."""
    out, start = [], 0
    for c in counts:
        out.append(order[start:start + c])
        start += c
    return out


def _best_counts_in(order_of: Callable) -> Callable:
    """The best split's bucket sizes (in parameters), filled in another order than the ready order."""
    def variant(sizes, ready, alpha, beta):
        counts = [len(b) for b in _best(tuple(sizes), tuple(ready), alpha, beta)]
        return _in_order(order_of(len(sizes)), counts)
    return variant


def _sqrt_rule(sizes, ready, alpha, beta):
    """k = √(Mβ/α), the minimum of kα + (M/k)β, and a cap of M/k."""
    total = sum(sizes)
    k = min(len(sizes), max(1, round(math.sqrt(total * beta / alpha))))
    return bucket_model.cut_by_cap(bucket_model.ready_order(ready), sizes, total / k)


def _lesson_rough(sizes, ready, alpha, beta):
    """The split that minimises the lesson's rough step time: max(T_b + α + β·(last bucket), kα + Mβ), from the
    first gradient on."""
    backward, total = max(ready) - min(ready), sum(sizes)

    def rough(buckets):
        tail = alpha + beta * sum(sizes[i] for i in buckets[-1])
        return max(backward + tail, len(buckets) * alpha + total * beta), len(buckets)
    return min(bucket_model.splits(bucket_model.ready_order(ready)), key=rough)


_STARTS_LATE = ("A bucket starts only when its last gradient is ready, and every bucket after it waits for it on the "
                "link.")

# Known wrong choices, each a change of labkit's reference (the best split of the ready order); texts formatted with
# head and effect.
CHOOSE_MISTAKES = (
    Mistake("one bucket", lambda sizes, ready, alpha, beta: [bucket_model.ready_order(ready)],
            "{head}: you put every gradient into one bucket. It can start only when the last gradient is ready, so "
            "all of its α + Mβ comes after backward: nothing overlaps.{effect}"),
    Mistake("one bucket per parameter", lambda sizes, ready, alpha, beta: [[i] for i in bucket_model.ready_order(ready)],
            "{head}: one bucket per parameter: every gradient pays α. When α is long next to the time backward takes "
            "to produce the next gradients, the messages queue up on the link and their α's add up after "
            "backward.{effect}"),
    Mistake("torch's 25 MB", lambda sizes, ready, alpha, beta: bucket_model.cut_by_cap(
                bucket_model.ready_order(ready), sizes, 25 * MB),
            "{head}: these are the buckets of torch's default cap, 25 MiB, whatever α and β are. 25 MiB suits an α of "
            "microseconds and links of tens of GB/s; the best buckets depend on α, β and when the gradients are "
            "ready.{effect}"),
    Mistake("k = sqrt(M beta / alpha)", _sqrt_rule,
            "{head}: your buckets are cut with a cap of M/k, k = √(Mβ/α), the k that minimises kα + (M/k)β. That "
            "formula ignores when the gradients are ready: a bucket cannot start before its last gradient, and the "
            "buckets before the last hide behind what backward still has to compute.{effect}"),
    Mistake("the lesson's rough formula", _lesson_rough,
            "{head}: your buckets minimise the lesson's rough step time, max(T_backward + T_tail, kα + Mβ). Its "
            "second term assumes the link can be busy from the first gradient on, but bucket 0 starts only when its "
            "last gradient is ready: with a large first bucket the link waits.{effect}"),
    Mistake("model.parameters() order", _best_counts_in(lambda n: list(range(n))),
            "{head}: your buckets follow the parameters' indices (the order of model.parameters()), not the order "
            "their gradients become ready (sort the indices by ready[i]). " + _STARTS_LATE + "{effect}"),
    Mistake("reversed(model.parameters())", _best_counts_in(lambda n: list(range(n - 1, -1, -1))),
            "{head}: your buckets follow reversed(model.parameters()), 3b's first guess of the ready order. Here the "
            "ready times say otherwise (a layer created before another and used after it), and they are given: "
            "sort the indices by ready[i]. " + _STARTS_LATE + "{effect}"),
)


def _canon(buckets) -> tuple:
    return tuple(tuple(sorted(b)) for b in buckets)


def _ms(seconds: float) -> str:
    return f"{seconds / _MS:.4g} ms"


def _mib(nbytes: float) -> str:
    return f"{nbytes / MB:.3g} MiB"


def _plan_text(buckets, case: Case, limit: int = 6) -> str:
    times = bucket_model.bucket_times(buckets, case.sizes, case.ready, case.alpha, case.beta)
    parts = [f"b{k} = {_list_text(b)}, {_mib(sum(case.sizes[i] for i in b))}, ready {_ms(max(case.ready[i] for i in b))}"
             f", sent {_ms(start)} to {_ms(end)}" for k, (b, (start, end)) in enumerate(zip(buckets, times))]
    if len(parts) > limit:
        parts = parts[:limit - 1] + [f"... {parts[-1]}"]
    return "; ".join(parts)


def _list_text(values) -> str:
    values = list(values)
    return "[" + ", ".join(str(v) for v in values) + "]" if len(values) <= 6 else \
        f"[{', '.join(str(v) for v in values[:4])}, ..., {values[-1]}] ({len(values)} params)"


def _out_of_order(buckets, case: Case) -> str:
    """A bucket that waits for a gradient ready after one of a later bucket: the first such pair, or ""."""
    for a, early in enumerate(buckets):
        last = max(early, key=lambda i: case.ready[i])
        for b in range(a + 1, len(buckets)):
            first = min(buckets[b], key=lambda i: case.ready[i])
            if case.ready[first] < case.ready[last]:
                return (f" Bucket {a} waits for parameter {last} (ready at {_ms(case.ready[last])}) while parameter "
                        f"{first} of the later bucket {b} was ready at {_ms(case.ready[first])}.")
    return ""


def _choose_effect(case: Case, yours: list, best: list) -> str:
    """What the student's buckets do under labkit's model, next to the best split's."""
    args = (case.sizes, case.ready, case.alpha, case.beta)
    mine, least = bucket_model.exposed(yours, *args), bucket_model.exposed(best, *args)
    k, k_best = len(yours), len(best)
    if k > k_best:
        why = f" Your {k} buckets pay α {k} times ({_ms(k * case.alpha)}), the best's {k_best} ({_ms(k_best * case.alpha)})."
    elif k < k_best:
        start, end = bucket_model.bucket_times(yours, *args)[-1]
        why = (f" Your last bucket ({_mib(sum(case.sizes[i] for i in yours[-1]))}) is sent from {_ms(start)} to "
               f"{_ms(end)}: fewer, larger buckets start later.")
    else:
        why = ""
    return (f" Under labkit's model (labkit.bucket_model: bucket k starts when its last gradient is ready and bucket "
            f"k − 1 has arrived, and takes α + m·β), your buckets end {_ms(mine)} after the last gradient is ready "
            f"(at {_ms(max(case.ready))}); the best split of the ready order ends {_ms(least)} after it, with "
            f"{plural(k_best, 'bucket')} of {_list_text(len(b) for b in best)} gradients: yours exposes "
            f"{mine / least:.3g}× as much (up to {1 + CHOOSE_TOLERANCE:g}× passes).{_out_of_order(yours, case)}{why}"
            f"\n  yours:    {_plan_text(yours, case)}\n  the best: {_plan_text(best, case)}")


def _read_buckets(result, head: str, n: int) -> list:
    example = "e.g. [[4, 3], [2, 1, 0]]"
    if not isinstance(result, (list, tuple)):
        fail(f"{head} returned {describe(result)}: return a list of buckets, bucket 0 first, each a list of parameter "
             f"indices ({example})")
    if not result:
        fail(f"{head} returned no bucket: every gradient must travel in some bucket ({example})")
    buckets, where = [], {}
    for k, bucket in enumerate(result):
        if not isinstance(bucket, (list, tuple)):
            counts = all(isinstance(b, int) and not isinstance(b, bool) for b in result)
            hint = (" (the number of parameters per bucket? give the indices themselves)" if counts
                    and sum(result) == n else " (a flat list of indices? put them in buckets)" if counts else "")
            what = f"a number ({bucket!r})" if isinstance(bucket, numbers.Number) else describe(bucket)
            fail(f"{head}: bucket {k} is {what}: each bucket is a list of parameter indices, {example}"
                 f"{hint}")
        if not bucket:
            fail(f"{head}: bucket {k} is empty: an all-reduce of nothing still costs α; leave it out")
        for i in bucket:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                fail(f"{head}: bucket {k} holds {describe(i)}: a parameter index, an int from 0 to {n - 1}")
            if not 0 <= i < n:
                fail(f"{head}: bucket {k} holds {i}: the parameters are 0 .. {n - 1}")
            if int(i) in where:
                fail(f"{head}: parameter {i} is in bucket {where[int(i)]} and in bucket {k}: each gradient travels "
                     f"once")
            where[int(i)] = k
        buckets.append([int(i) for i in bucket])
    missing = [i for i in range(n) if i not in where]
    if missing:
        fail(f"{head}: parameter{'s' if len(missing) > 1 else ''} {and_list(missing)} in no bucket: every gradient "
             f"must be averaged")
    return buckets


def check_choose_buckets(choose_buckets, *, cases=CHOOSE_CASES) -> None:
    """Check exercise 3e: ``choose_buckets(sizes, ready, alpha, beta)`` returns buckets (lists of parameter indices,
    bucket 0 first) whose exposed communication under :mod:`labkit.bucket_model` is within
    :data:`CHOOSE_TOLERANCE` of the best contiguous split of the ready order, on every case of ``cases``.
    A known wrong choice (:data:`CHOOSE_MISTAKES`) is named."""
    __tracebackhide__ = True
    name = need_function(choose_buckets, "check_choose_buckets")
    results, ratios = [], []
    for case in cases:
        head = f"{name} on the {case.name} case ({case.what})"
        with time_limit(_CHOOSE_SECONDS, f"{head} did not return within {_CHOOSE_SECONDS:g} s: an endless loop, or "
                                         f"a search through every split?"):
            result = call_student(choose_buckets, *_args(case), name=name, task="3e")
        results.append((case, head, _read_buckets(result, head, len(case.sizes))))
    for case, head, yours in results:
        best = _best(case.sizes, case.ready, case.alpha, case.beta)
        args = (case.sizes, case.ready, case.alpha, case.beta)
        mine, least = bucket_model.exposed(yours, *args), bucket_model.exposed(best, *args)
        ratios.append(mine / least)
        if mine <= least * (1 + CHOOSE_TOLERANCE) + 1e-15:
            continue

        def same(mistake: Mistake, on) -> bool:
            return all(_canon(mistake.variant(*_args(c))) == _canon(y) for c, _, y in on)
        mistake = (find_mistake(CHOOSE_MISTAKES, lambda m: same(m, results))
                   or find_mistake(CHOOSE_MISTAKES, lambda m: same(m, [(case, head, yours)])))
        says = mistake.says if mistake else "{head}: your buckets are not the best.{effect}"
        fail(says.format(head=head, effect=_choose_effect(case, yours, best)))
    passed(f"{name} is within {CHOOSE_TOLERANCE:.0%} of the best split on {len(cases)} cases "
           f"({', '.join(c.name for c in cases)}): your exposed communication is at most {max(ratios):.3f}× the "
           f"best's, under labkit.bucket_model")
