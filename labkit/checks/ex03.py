"""Checkers for exercise 3, the bucketed DDP (``solutions/03_ddp_exercise.ipynb``).

    check_broadcast(BucketedDDP)         # 3a: broadcast_from_rank0, with labkit's 3b, 3c, 3d
    check_bucket_plan(BucketedDDP)       # 3b: bucket_plan, with labkit's 3a, 3c, 3d
    check_on_grad_ready(BucketedDDP)     # 3c: on_grad_ready, with labkit's 3a, 3b, 3d
    check_finish_backward(BucketedDDP)   # 3d: finish_backward, with labkit's 3a, 3b, 3c
    check_bucketed_ddp(BucketedDDP)      # all of it, on 3, 2 and 4 processes, against torch's DDP

The student's class subclasses :class:`labkit.ddp.BucketedDDP` (its ``__init__``, the per-parameter
hook, the end-of-backward callback) and writes four of its methods. Each task's check runs the
student's method with labkit's own version of the other three, so that a task is checked on its own;
:func:`check_bucketed_ddp` runs the whole class as written (any class ``cls(module,
bucket_cap_mb=...)`` that works like torch's DDP, labkit's subclass or not).

What runs. On N real processes, each rank builds a small float64 model with its own seed (so only the
broadcast at wrap time makes the replicas equal): a tied embedding/output weight, a frozen layer, a
buffer, and a layer registered before the one it follows (so that the reverse of ``parameters()`` is
not exactly the order gradients become ready). The student's class wraps it with three bucket caps
(one bucket; two buckets; one parameter per bucket) and trains 3 SGD steps next to
``torch.nn.parallel.DistributedDataParallel`` on the same data. After the wrap and after every
backward, the ranks all-gather what they saw and every rank computes the same verdict, so they all stop
together at the first problem and nothing waits for a rank that stopped.

What is watched, in each rank, during the student's code:
- ``dist.all_reduce`` is replaced by a wrapper that records each call (which bucket buffer, how many
  gradients were ready at that moment, async or not) and, for ``async_op=True``, reduces a private copy
  and writes the result into the student's tensor only when *that call's* handle is waited on. So a
  handle that is never waited leaves its bucket un-averaged, deterministically, as a late all-reduce
  might on a GPU; and the check can name the bucket whose handle was never waited.
- hooks registered before the student's count the gradient-ready events, so a launch can be placed in
  the backward pass: a bucket launched only after the last gradient overlapped nothing.
- the gradients after every backward are compared with torch's DDP, and with the rank's own local
  gradient (one more forward/backward of the bare module with ``torch.autograd.grad``, which fires no
  hooks), which tells "N times too large", "never averaged", "copied back before the wait" apart.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from labkit import comm
from labkit.checks import (CheckFailed, fail, first_mismatch, fmt_index, fmt_number, fmt_pair, passed, run_on_ranks,
                           time_limit)
from labkit import ddp

__all__ = ["check_broadcast", "check_bucket_plan", "check_on_grad_ready", "check_finish_backward",
           "check_bucketed_ddp", "TASKS", "WORLD_SIZES"]

# 3 first (the message of a first failure on 3 ranks reads best: rank 1 and 2 both exist), then 2, 4.
WORLD_SIZES = (3, 2, 4)
STEPS = 3
LR = 0.5
_SEED = 100           # rank r builds its model with seed _SEED + r
_RTOL, _ATOL = 1e-9, 1e-12
MB = 2 ** 20

# The methods of the skeleton that the student writes, by task.
TASKS = {"3a": "broadcast_from_rank0", "3b": "bucket_plan", "3c": "on_grad_ready", "3d": "finish_backward"}


# ============================================================================================
# The model, the data, torch's DDP
# ============================================================================================

VOCAB, WIDTH, HIDDEN, BATCH = 11, 6, 8, 4


class _Net(nn.Module):
    """Tied embedding/output weight, a frozen layer, a buffer; ``out`` is registered before ``hidden``
    but used after it. Trainable parameters, in registration order: emb.weight (66 elements),
    out.weight (48), out.bias (6), hidden.weight (48), hidden.bias (8). Gradients become ready in the
    order out.*, hidden.*, emb.weight (the embedding is used first and last: its gradient is complete
    only at the very end)."""

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
        logits = h @ self.emb.weight.t()           # the output layer is the embedding, transposed
        return nn.functional.cross_entropy(logits, targets)


# (label, bucket_cap_mb, buckets labkit's plan makes). 900 bytes: hidden.* and out.* (110 float64
# elements, 880 bytes) fit, emb.weight does not; registration order would cut [emb.weight], [the rest].
CONFIGS = (("1 bucket", 1.0, 1), ("2 buckets", 900 / MB, 2), ("1 parameter per bucket", 1e-9, 5))


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (BATCH,), generator=g), torch.randint(0, VOCAB, (BATCH,), generator=g)


def _trainable(module):
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _grads(module) -> dict:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in _trainable(module)}


def _torch_ddp_run(steps: int) -> tuple[list, dict]:
    """torch's DDP on this rank's data: the averaged gradients after every backward, the final state."""
    rank = dist.get_rank()
    module = _Net(seed=_SEED + rank)
    torch_ddp = nn.parallel.DistributedDataParallel(module)
    opt = torch.optim.SGD([p for _, p in _trainable(module)], lr=LR)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        torch_ddp(*_batch(step, rank)).backward()
        grads.append(_grads(module))
        opt.step()
    return grads, _state(module)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ============================================================================================
# Watching the student's code in a rank
# ============================================================================================

class _ReadyLog:
    """Hooks registered before the student's: the order in which gradients become ready."""

    def __init__(self, module):
        self.names = {}
        for n, p in _trainable(module):
            self.names.setdefault(p, n)
            p.register_post_accumulate_grad_hook(self._ready)
        self.order: list = []

    def _ready(self, p):
        self.order.append(self.names[p])


class _Launch:
    """One call of dist.all_reduce during the student's code."""

    def __init__(self, tensor, async_op: bool, ready: int, op):
        self.tensor = tensor
        self.numel = tensor.numel()
        self.async_op = async_op
        self.ready = ready            # gradients ready when it was launched
        self.op = op
        self.waits: list = []         # gradients ready at each wait() of its handle

    def row(self, bucket: int | None) -> dict:
        return dict(bucket=bucket, numel=self.numel, async_op=self.async_op, ready=self.ready, waits=self.waits,
                    op=str(self.op), sum=self.op == dist.ReduceOp.SUM)


class _Handle:
    """What the watched dist.all_reduce(..., async_op=True) returns: the result reaches the student's
    tensor only when this handle's wait() is called."""

    def __init__(self, work, scratch, target, launch: _Launch, ready_log: _ReadyLog):
        self._work, self._scratch, self._target = work, scratch, target
        self._launch, self._ready_log = launch, ready_log
        self._written = False

    def wait(self, timeout=None):
        self._work.wait()
        self._launch.waits.append(len(self._ready_log.order))
        if not self._written:
            self._written = True
            with torch.no_grad():
                self._target.copy_(self._scratch)
        return True

    def is_completed(self):
        return self._work.is_completed()

    def is_success(self):
        return self._work.is_success()

    def get_future(self):
        raise CheckFailed("During this check, wait for an all-reduce with its handle's wait() "
                          "(work = dist.all_reduce(buffer, async_op=True); ...; work.wait()), not get_future().")


class _WatchedAllReduce:
    """Inside ``with``: ``dist.all_reduce`` is the recording wrapper (see the module's doc)."""

    def __init__(self, ready_log: _ReadyLog):
        self.ready_log = ready_log
        self.launches: list = []
        self._original = dist.all_reduce

    def __call__(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        launch = _Launch(tensor, async_op, len(self.ready_log.order), op)
        self.launches.append(launch)
        if not async_op:
            return self._original(tensor, op=op, group=group, async_op=False)
        scratch = tensor.detach().clone()
        work = self._original(scratch, op=op, group=group, async_op=True)
        return _Handle(work, scratch, tensor, launch, self.ready_log)

    def __enter__(self):
        dist.all_reduce = self
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original
        return False


@contextmanager
def _student_code(seconds: float, what: str):
    """The student's code: stopped after ``seconds`` (endless loops), with its warnings recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with time_limit(seconds, f"{what} did not return within {seconds:g} s on rank {dist.get_rank()} "
                                 f"(N={dist.get_world_size()} ranks): an endless loop? (a `while` whose "
                                 f"condition never changes, e.g. waiting for a bucket that never fills)"):
            yield caught


def _everyone(obj) -> list:
    """Every rank's ``obj`` (the checker's own collective; never the watched all_reduce)."""
    return comm.all_gather_objects(obj)


def _verdict(problem: str | None) -> None:
    """Every rank computed the same ``problem`` from the same gathered data: all stop together."""
    if problem:
        raise CheckFailed(problem)


def _plan_rows(model, names: dict):
    """The student's buckets as [(names, data_ptr)], if the class keeps the skeleton's ``buckets``."""
    buckets = getattr(model, "buckets", None)
    try:
        return [([names.get(p, "<not a parameter of the module>") for p in b.params], b.buffer.data_ptr())
                for b in buckets]
    except Exception:  # noqa: BLE001 - a class of the student's own design: no plan to show
        return None


def _worker(cls, name: str, configs, seconds: float, steps: int) -> list:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch_grads, torch_final = _torch_ddp_run(steps)
    summary = []
    for label, cap_mb, _ in configs:
        case = f"N={world_size} ranks, bucket_cap_mb={cap_mb:.3g} ({label})"
        module = _Net(seed=_SEED + rank)
        initial = _state(module)
        ready = _ReadyLog(module)
        names = {p: n for n, p in reversed(list(module.named_parameters()))}  # frozen ones too
        with _WatchedAllReduce(ready), _student_code(seconds, f"{name}(module, bucket_cap_mb={cap_mb:.3g})"):
            model = cls(module, bucket_cap_mb=cap_mb)
        _verdict(_broadcast_problem(name, case, _everyone(dict(initial=initial, now=_state(module)))))
        plan = _plan_rows(model, names)
        if plan is not None:
            _verdict(_plan_problem(name, case, cap_mb, [n for n, _ in _trainable(module)],
                                   {n for n, p in module.named_parameters() if not p.requires_grad}, plan))
        opt = torch.optim.SGD([p for _, p in _trainable(module)], lr=LR)
        for step in range(steps):
            tokens, targets = _batch(step, rank)
            with warnings.catch_warnings():  # what the student's code makes torch say is reported below
                warnings.simplefilter("ignore")
                local = torch.autograd.grad(module(tokens, targets), [p for _, p in _trainable(module)])
            opt.zero_grad()
            ready.order = []
            with _WatchedAllReduce(ready) as watch, _student_code(seconds, f"loss.backward() with {name}") as caught:
                model(tokens, targets).backward()
            plan = _plan_rows(model, names)
            ptrs = {ptr: k for k, (_, ptr) in enumerate(plan)} if plan else {}
            record = dict(
                launches=[launch.row(ptrs.get(launch.tensor.data_ptr())) for launch in watch.launches],
                ready=list(ready.order), grads=_grads(module), torch=torch_grads[step],
                local={n: g.clone() for (n, _), g in zip(_trainable(module), local)},
                warnings=[str(w.message) for w in caught], plan=[n for n, _ in plan] if plan else None)
            _verdict(_step_problem(name, case, step, _everyone(record)))
            opt.step()
        final = _everyone(_state(module))
        _verdict(_final_problem(name, case, steps, final, torch_final))
        summary.append(max(float((final[rank][k] - torch_final[k]).abs().max()) for k in torch_final))
    return summary


# ============================================================================================
# Verdicts (every rank computes the same one from the same gathered data)
# ============================================================================================

def _first_difference(a: dict, b: dict, keys) -> tuple | None:
    """The first (key, index, value in a, value in b) where two state dicts differ."""
    for k in keys:
        bad = _first_mismatch(a[k], b[k])
        if bad:
            return (k, *bad)
    return None


def _where(key: str, index) -> str:
    return f"{key}{fmt_index(index)}" if index else key


_BROADCAST_HOW = ("In broadcast_from_rank0, copy rank 0's parameters and buffers to every rank, in place: "
                  "dist.broadcast(t, src=0) for every t in self.module.parameters() and self.module.buffers(), "
                  "under torch.no_grad().")


def _broadcast_problem(name: str, case: str, states: list) -> str | None:
    source = states[0]["initial"]
    params = list(_PARAM_NAMES)
    keys = params + [k for k in source if k not in params]  # the parameters first, then the buffers
    head = f"{name} is wrong ({case}): after wrapping,"
    moved = _first_difference(source, states[0]["now"], keys)
    if moved:
        k, index, before, after = moved
        b, a = fmt_pair(before, after)
        return (f"{head} rank 0's own weights changed: {_where(k, index)} was {b} before the wrap and is {a} "
                f"after it. Rank 0 is the source: every rank gets rank 0's weights (src=0), rank 0 keeps them. "
                + _BROADCAST_HOW)
    for r in range(1, len(states)):
        diff = _first_difference(source, states[r]["now"], keys)
        if not diff:
            continue
        k, index, want, got = diff
        w, g = fmt_pair(want, got)
        different = [key for key in keys if _first_difference(source, states[r]["now"], [key])]
        buffers = set(keys) - set(params)
        listed = ", ".join(different)
        if set(different) <= buffers:
            hint = (f"The parameters agree, but the buffer{'s' if len(different) > 1 else ''} {listed} "
                    f"(self.module.buffers()) did not arrive: broadcast the buffers too.")
        elif set(different) <= _FROZEN_KEYS | buffers:
            hint = (f"The trainable parameters agree, but {listed} differ: broadcast every parameter of the module, "
                    f"trainable or not (self.module.parameters(), not self.params: frozen layers are part of the "
                    f"model too)" + (", and the buffers (self.module.buffers())." if buffers & set(different) else "."))
        elif set(different) == set(keys):
            hint = "Nothing was copied. " + _BROADCAST_HOW
        else:
            hint = f"These differ: {listed}. " + _BROADCAST_HOW
        return (f"{head} rank {r}'s initial weights differ from rank 0's: {_where(k, index)} is {w} on rank 0 and "
                f"{g} on rank {r}. Every rank built its model with its own seed, so the replicas start apart, and "
                f"averaging the gradients never brings them together. {hint}")
    return None


# _Net's parameters, in registration order, and the frozen ones among them.
_PARAM_NAMES = ("emb.weight", "frozen.weight", "frozen.bias", "out.weight", "out.bias", "hidden.weight", "hidden.bias")
_FROZEN_KEYS = {"frozen.weight", "frozen.bias"}


def _plan_problem(name: str, case: str, cap_mb: float, trainable: list, frozen: set, plan: list) -> str | None:
    head = f"{name}.bucket_plan is wrong ({case}):"
    where = {}
    for k, (names, _) in enumerate(plan):
        if not names:
            return f"{head} bucket {k} is empty: every bucket holds at least one parameter."
        for n in names:
            if n in frozen:
                return (f"{head} bucket {k} holds {n}, a frozen parameter (requires_grad=False): it never gets a "
                        f"gradient, so its bucket would never be full. Plan only self.params (the trainable ones).")
            if n not in trainable:
                return f"{head} bucket {k} holds something that is not a trainable parameter of the module ({n})."
            if n in where:
                return (f"{head} {n} is in bucket {where[n]} and in bucket {k}: every trainable parameter goes into "
                        f"exactly one bucket (a tied weight is one Parameter, listed once in self.params).")
            where[n] = k
    missing = [n for n in trainable if n not in where]
    if missing:
        return (f"{head} {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} in no bucket: every trainable "
                f"parameter (self.params) goes into exactly one bucket.")
    cap = int(cap_mb * MB)
    sizes = dict(_SIZES)
    for k, (names, _) in enumerate(plan):
        nbytes = sum(sizes[n] for n in names) * 8
        if len(names) > 1 and nbytes > cap:
            return (f"{head} bucket {k} holds {', '.join(names)}: {nbytes} bytes of float64 gradients, more than "
                    f"the cap of {cap} bytes (bucket_cap_mb={cap_mb:.3g}). A bucket holds at most "
                    f"self.bucket_cap_bytes, unless one parameter alone is larger: labkit.ddp.plan_buckets(params, "
                    f"self.bucket_cap_bytes) cuts them so.")
    return None


_SIZES = (("emb.weight", VOCAB * WIDTH), ("out.weight", WIDTH * HIDDEN), ("out.bias", WIDTH),
          ("hidden.weight", HIDDEN * WIDTH), ("hidden.bias", HIDDEN))


def _bucket_text(k, plan) -> str:
    if plan is None or k is None or not 0 <= k < len(plan):
        return f"bucket {k}" if k is not None else "an all-reduce"
    return f"bucket {k} ({', '.join(plan[k])})"


def _step_problem(name: str, case: str, step: int, records: list) -> str | None:
    when = "in the first backward" if step == 0 else f"in backward {step + 1}"
    head = f"{name} is wrong ({case}), {when}:"
    total = len(records[0]["ready"])
    for r, rec in enumerate(records):
        for w in rec["warnings"]:
            if "c10d::broadcast_" in w:
                return (f"{head} PyTorch warned on rank {r}: \"{w.split('.')[0]}\". dist.broadcast changed the "
                        f"parameters in place while autograd was recording. Broadcast under torch.no_grad() "
                        f"(with torch.no_grad(): dist.broadcast(t, src=0)).")
    launches = [rec["launches"] for rec in records]
    if not any(launches):
        return (f"{head} no rank called dist.all_reduce, so no gradient was averaged. Launch one "
                f"dist.all_reduce(bucket.buffer, async_op=True) per full bucket, from on_grad_ready. (The check "
                f"watches torch.distributed.all_reduce: call it as dist.all_reduce, not through a name imported "
                f"with `from torch.distributed import all_reduce`.)")
    if any(len(x) != len(launches[0]) for x in launches):
        return (f"{head} the ranks called dist.all_reduce different numbers of times: "
                f"{[len(x) for x in launches]} (ranks 0, 1, ...). Every rank must launch the same all-reduces in "
                f"the same order.")
    plan = records[0]["plan"]
    for r, rec in enumerate(records):
        for i, row in enumerate(rec["launches"]):
            if not row["sum"] and "AVG" not in row["op"]:   # AVG without dividing is an average too (as in 1a)
                return (f"{head} rank {r} called dist.all_reduce with op={row['op']}: sum the buckets (the default "
                        f"op) and divide by the world size.")
    rows = records[0]["launches"]
    # launch order and completeness: needs the skeleton's buckets to tell which buffer was sent
    if plan is not None and all(row["bucket"] is not None for row in rows):
        order = [row["bucket"] for row in rows]
        for k in range(len(plan)):
            if order.count(k) > 1:
                return (f"{head} {_bucket_text(k, plan)} was all-reduced {order.count(k)} times: its gradients are "
                        f"summed over the ranks once per all-reduce. Launch each bucket once per backward (when it "
                        f"becomes full), e.g. by moving self.next_to_launch past it.")
        for k in range(len(plan)):
            if k not in order:
                return (f"{head} {_bucket_text(k, plan)} was never all-reduced (the all-reduces launched were, in "
                        f"order, of buckets {order}). Launch every bucket once it is full: after copying a gradient "
                        f"in, launch bucket self.next_to_launch while it is full, and move on to the next.")
        if order != sorted(order):
            first = next(i for i in range(len(order)) if order[i] != i)
            return (f"{head} the all-reduces were launched in the bucket order {order}: bucket {order[first]} before "
                    f"bucket {first}. Launch the buckets strictly in index order, on every rank: the k-th all-reduce "
                    f"of one rank is summed with the k-th all-reduce of the others, so if two ranks' gradients became "
                    f"ready in different orders, buckets launched as they fill would pair up the wrong buffers. A full "
                    f"bucket waits until every bucket before it is launched (self.next_to_launch).")
    for r, rec in enumerate(records):
        for i, row in enumerate(rec["launches"]):
            if not row["async_op"]:
                return (f"{head} rank {r} called dist.all_reduce for {_bucket_text(row['bucket'], plan)} without "
                        f"async_op=True: backward stops there until the communication is over, so nothing overlaps. "
                        f"Launch it with handle = dist.all_reduce(bucket.buffer, async_op=True), keep the handle in "
                        f"the bucket (bucket.work), and wait in finish_backward.")
    for r, rec in enumerate(records):
        for i, row in enumerate(rec["launches"]):
            if not row["waits"]:
                k = row["bucket"] if row["bucket"] is not None else i
                others = [(row2["bucket"] if row2["bucket"] is not None else j, len(row2["waits"]))
                          for j, row2 in enumerate(rec["launches"]) if row2["waits"]]
                waited = ("no handle was waited on at all" if not others else
                          "the handles waited on were those of " +
                          ", ".join(f"bucket {b}" + (f" ({n} times)" if n > 1 else "") for b, n in others))
                return (f"{head} on rank {r}, the all-reduce of {_bucket_text(k, plan)} was launched, but its "
                        f"handle was never waited on before backward returned ({waited}). During this check an "
                        f"all-reduce writes its result into the bucket only when its own handle's wait() is called "
                        f"(on a GPU, too, it may still be running), so bucket {k} still holds rank {r}'s own "
                        f"gradients / N. Keep each bucket's own handle (bucket.work = dist.all_reduce(bucket.buffer, "
                        f"async_op=True)), and in finish_backward wait on every bucket's handle before copying "
                        f"that bucket back into .grad.")
            early = [w for w in row["waits"] if w < total]
            if early:
                return (f"{head} on rank {r}, the all-reduce of {_bucket_text(row['bucket'], plan)} was waited on "
                        f"during the backward pass, when only {early[0]} of the {total} gradients were ready: "
                        f"backward stops there until the communication is over, so nothing overlaps. Wait for the "
                        f"handles in finish_backward, which runs once backward is done.")
    grads = _grad_problem(head, records, plan)
    if grads:
        return grads
    # overlap: in a configuration with several buckets, the first all-reduce must start during backward
    if step == 0 and len(rows) > 1 and min(row["ready"] for row in rows) >= total:
        ready_order = records[0]["ready"]
        last = ready_order[-1]
        if plan is not None and plan and last in plan[0]:
            return (f"{head} no all-reduce started before backward had produced every gradient: bucket 0 holds "
                    f"{', '.join(plan[0])}, and {last}'s gradient is ready last (the gradients became ready in the "
                    f"order {', '.join(ready_order)}). The buckets are launched in order, so every bucket waits for "
                    f"bucket 0, and no communication overlaps the backward pass. module.parameters() lists the "
                    f"parameters in the order the layers were created (about the forward order); backward produces "
                    f"the gradients from the output back: plan the buckets in the reverse order, "
                    f"plan_buckets(reversed(self.params), self.bucket_cap_bytes).")
        first = rows[0]
        return (f"{head} no all-reduce started before backward had produced every gradient (the first, of "
                f"{_bucket_text(first['bucket'], plan)}, started after all {total} were ready), so no communication "
                f"overlaps the backward pass. Launch each bucket from on_grad_ready as soon as it is full (and every "
                f"bucket before it is launched), not at the end of backward.")
    return None


def _grad_problem(head: str, records: list, plan) -> str | None:
    """The gradients after backward against torch's DDP, with what they look like when they are wrong."""
    N = len(records)
    names = list(records[0]["torch"])
    # 1. the whole picture: the ratio got/expected per parameter (the same on every rank when it is a factor)
    ratios = {}
    for n in names:
        want = records[0]["torch"][n]
        got = [rec["grads"][n] for rec in records]
        if any(g is None for g in got):
            r = next(i for i, g in enumerate(got) if g is None)
            return (f"{head} on rank {r}, {n}.grad is None after backward: copy each bucket back into the existing "
                    f".grad tensors (p.grad.copy_(...)) in finish_backward; do not set them to None.")
        ratios[n] = [float((g * want).sum() / (want * want).sum()) for g in got]
    wrong = [n for n in names if any(_first_mismatch(records[r]["torch"][n], records[r]["grads"][n]) for r in range(N))]
    if not wrong:
        return None
    factors = {n: ratios[n][0] for n in wrong
               if all(abs(x - ratios[n][0]) < 1e-9 * abs(ratios[n][0]) + 1e-12 for x in ratios[n])
               and all(not _first_mismatch(records[r]["torch"][n] * ratios[n][0], records[r]["grads"][n])
                       for r in range(N))}
    if len(factors) == len(wrong):
        values = sorted(set(round(f, 6) for f in factors.values()))
        if len(values) == 1 and abs(values[0] - N) < 1e-6:
            scope = ("every gradient is" if len(wrong) == len(names) else
                     f"the gradients of {', '.join(wrong)} are")
            return (f"{head} {scope} {N} times the average, on every rank (measured: p.grad / torch DDP's p.grad = "
                    f"{fmt_number(factors[wrong[0]])} = N). The all-reduce sums the N ranks' gradients; the average "
                    f"is g = (1/N) Σ g_i: divide each bucket by the world size (bucket.buffer.div_(self.world_size)) "
                    f"before you launch its all-reduce" + (" (every bucket)." if len(wrong) < len(names) else "."))
        if len(values) == 1 and abs(values[0] - 1 / N) < 1e-6:
            avg = any("AVG" in row["op"] for rec in records for row in rec["launches"])
            why = (" op=ReduceOp.AVG already divides by N: with it, do not divide the bucket yourself (or sum, the "
                   "default op, and divide once)." if avg else " Divide each bucket once, before its all-reduce.")
            return (f"{head} every wrong gradient ({', '.join(wrong)}) is 1/{N} of the average (measured factor "
                    f"{fmt_number(factors[wrong[0]])}): divided by N = {N} twice?{why}")
    # 2. element by element: the first wrong one, and what it equals
    for n in wrong:
        for r, rec in enumerate(records):
            want, got, own = rec["torch"][n], rec["grads"][n], rec["local"][n]
            bad = _first_mismatch(want, got)
            if not bad:
                continue
            index, e, g = bad
            e, g = fmt_pair(e, g)
            msg = f"{head} on rank {r}, {_where(n + '.grad', index)} is {g}, torch's DDP has {e}"
            bucket = next((k for k, b in enumerate(plan) if n in b), None) if plan else None
            in_bucket = f" (in {_bucket_text(bucket, plan)})" if bucket is not None else ""
            if not _first_mismatch(own, got):
                return (msg + f": {n}.grad is rank {r}'s own gradient{in_bucket}, not the average. Copy each "
                        f"bucket's averaged buffer back into .grad in finish_backward, after waiting for its handle.")
            if not _first_mismatch(own / N, got):
                return (msg + f": {n}.grad is rank {r}'s own gradient divided by N{in_bucket}: the bucket as it was "
                        f"before its all-reduce. Copy a bucket back into .grad only after its handle's wait().")
            if not _first_mismatch(own * 0, got):
                return msg + f": {n}.grad is zero{in_bucket}. Copy each bucket back into .grad in finish_backward."
            return (msg + f"{in_bucket}. Each parameter's gradient sits in its bucket at its own offset: copy "
                    f"param.grad into buffer[offset:offset + param.numel()] in on_grad_ready, and back from the same "
                    f"slice in finish_backward.")
    return None


def _first_mismatch(want, got):
    """labkit.checks.first_mismatch at this check's tolerances; a gradient of another shape differs at []."""
    if want.shape != got.shape:
        return (), float("nan"), float("nan")
    return first_mismatch(want, got, rtol=_RTOL, atol=_ATOL)


def _final_problem(name: str, case: str, steps: int, finals: list, torch_final: dict) -> str | None:
    for r, state in enumerate(finals):
        diff = _first_difference(torch_final, state, list(torch_final))
        if diff:
            k, index, want, got = diff
            w, g = fmt_pair(want, got)
            return (f"{name} is wrong ({case}): after {steps} SGD steps rank {r}'s {_where(k, index)} is {g}, "
                    f"torch's DDP has {w}, although every gradient matched. Does your class change the parameters "
                    f"or buffers outside backward?")
    return None


# ============================================================================================
# The checks
# ============================================================================================

def _mixed(cls, task: str | None):
    """``cls`` with labkit's methods for every task but ``task`` (None: the class as it is)."""
    if task is None:
        return cls
    missing = [m for m in TASKS.values() if not callable(getattr(cls, m, None))]
    if missing or not issubclass(cls, ddp.BucketedDDP):
        lacks = f"has no method {', '.join(missing)}" if missing else "is not a subclass of labkit.ddp.BucketedDDP"
        fail(f"{cls.__name__} {lacks}: the check of exercise {task} runs your {TASKS[task]} inside "
             f"labkit.ddp.BucketedDDP, with labkit's version of the other methods. Define your class as the notebook "
             f"does, class BucketedDDP(labkit.ddp.BucketedDDP), with its methods (or check a class of your own "
             f"design with check_bucketed_ddp).")
    reference = {m: getattr(ddp.BucketedDDP, m) for t, m in TASKS.items() if t != task}
    return type(cls.__name__, (cls,), reference)



def _bound(x: float) -> str:
    """A power of ten above a tiny difference, at least 1e-14: printed output that does not depend on the
    last bits of the arithmetic (the notebooks store and compare it)."""
    return f"1e{max(-14, math.ceil(math.log10(x)) if x > 0 else -14)}"


def _check(cls, task: str | None, world_sizes, configs, timeout: float) -> list:
    __tracebackhide__ = True
    if not isinstance(cls, type):
        fail(f"pass your class itself (e.g. check_bucketed_ddp(BucketedDDP)), not a {type(cls).__name__} object")
    name = cls.__name__ if task is None else f"{cls.__name__}.{TASKS[task]}"
    tested = _mixed(cls, task)
    diffs = []
    for N in world_sizes:
        per_rank = run_on_ranks(_worker, tested, name, configs, 0.6 * timeout, STEPS, world_size=N, timeout=timeout,
                           name=name, task=task or "3")
        diffs.extend(d for rank in per_rank for d in rank)
    return diffs


def _configs_text(configs) -> str:
    return ", ".join(label for label, _, _ in configs)


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
           f"SGD steps, the parameters within {_bound(max(diffs))} of torch's; the all-reduces launched in "
           f"bucket order during backward and each one waited on")


def _ranks(world_sizes) -> str:
    sizes = list(world_sizes)
    return (f"{sizes[0]} processes" if len(sizes) == 1 else
            f"{', '.join(map(str, sizes[:-1]))} and {sizes[-1]} processes")
