"""Checkers for exercise 9, top-k compression with error feedback (``solutions/09_compression_exercise.ipynb``).

    check_topk_hook(topk_hook)                      # 9a: the communication hook on 3, 2 and 4 processes, then training
    check_topk_cost(topk_bytes, break_even_ratio)   # 9b: what top-k sends per rank, and when it sends less

Each prints one ``✓`` line when the code is right and raises :class:`labkit.checks.CheckFailed` naming the
mistake when it is not.

9a. ``topk_hook(state, bucket) -> torch.futures.Future[torch.Tensor]`` is a DDP communication hook (torch's
interface) with a :class:`labkit.compression.TopKState`: each rank sends the k = ⌈ratio·M⌉ entries of largest
magnitude of its gradient plus its residual, every rank returns the average over the ranks of what was sent, and
``state.residual[bucket.index()]`` keeps what was not sent. On 3, 2 and 4 processes, hand-made buckets (two per
step, of 33 and 12 float32 numbers, ratio 0.2: k = 7 and 3; one buffer per bucket, refilled every step as DDP does)
take 4 steps of known gradients (a part common to the ranks and noise of each rank's own, no two entries of equal
size: top-k is unique) next to :func:`labkit.compression.topk_hook` on the same gradients. Compared at every call:
the averaged bucket the future holds, the residual kept, and the messages (``comm.record``): k values and k indices
per rank, all-gathered, (N−1)·2k numbers of at most 8 bytes (labkit's sends (N−1)·k·(v + i) bytes; other layouts,
e.g. (index, value) pairs packed in one tensor, pass; calls of torch.distributed itself and pickled objects, which
comm.record does not count, do not). Where the numbers differ, every row of :data:`TOPK_MISTAKES` (each a small
change of labkit's hook) runs on the same gradients and the one that gives the student's numbers names the mistake.
Then, on 2 processes: the small GPT of :mod:`labkit.compressed_training` trained with the hook (HookedDDP) must
reach the loss labkit's hook reaches (with a margin), and a tiny model under torch's ``DistributedDataParallel``
with the hook must end where labkit's hook under HookedDDP ends.

9b. ``topk_bytes(numel, ratio, world_size, value_bytes=4, index_bytes=8)``: the bytes one rank sends for one
bucket with top-k; ``break_even_ratio(world_size, value_bytes=4, index_bytes=8)``: the ratio below which top-k sends
less than the ring all-reduce, 2(N−1)/N·M·v. Compared in this process with :mod:`labkit.compression_cost` over a grid
(:data:`BYTES_MISTAKES`, :data:`BREAK_EVEN_MISTAKES` name the classic slips), then with the bytes labkit's
``topk_hook`` and ``allreduce_hook`` really send on groups of 2, 3 and 4 processes, on both sides of the break-even
ratio.
"""

# No `from __future__ import annotations` here: torch's DDP compares a hook's return annotation with
# torch.futures.Future[torch.Tensor] itself, and the mistakes of TOPK_MISTAKES are hooks.

import gc
import inspect
import math
import sys
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from labkit import comm
from labkit.checks import call_repr, describe, fail, first_mismatch, fmt_number, fmt_pair, passed, run_on_ranks, \
    time_limit
from labkit.checks.harness import (Described, Mistake, and_list, as_number, call_student, close, close_number,
                                   element_text, find_mistake, keep, need_function, not_written, variants_if_wrong)
from labkit.compressed_training import VOCAB_SIZE, train
from labkit.compression import TopKState, allreduce_hook, done, topk_hook
from labkit.compression_cost import allreduce_bytes, break_even_ratio, topk_bytes, topk_k
from labkit.ddp import Bucket
from labkit.ddp_hooks import GradBucket, HookedDDP
from labkit.models import GPT, GPTConfig
from labkit.network import message_cost

__all__ = ["check_topk_hook", "check_topk_cost", "TOPK_MISTAKES", "BYTES_MISTAKES", "BREAK_EVEN_MISTAKES",
           "WORLD_SIZES", "RATIO", "STEPS", "BUCKETS", "fake_gradient", "fake_run", "TRAIN_CONFIG", "TRAIN_STEPS",
           "TRAIN_RATIO", "BYTES_CASES", "BREAK_EVEN_CASES"]

WORLD_SIZES = (3, 2, 4)   # 3 first: a first failure on 3 ranks reads best
_RTOL, _ATOL = 1e-5, 1e-6  # float32 buckets: a sum in another order differs in the last bits
_HOOK_TYPE = torch.futures.Future[torch.Tensor]
_PAIR_BYTES = 16           # a value and its index, each at most 8 bytes: (index, value) pairs packed in float64 pass


# ============================================================================================
# 9a. The hook on hand-made buckets
# ============================================================================================

RATIO = 0.2
STEPS = 4
# The parameters of each bucket (name, shape): M = 33, k = ⌈6.6⌉ = 7 (⌊6.6⌋ = 6; ⌈0.2·24⌉ = 5 for the first
# gradient alone) and M = 12, k = ⌈2.4⌉ = 3
BUCKETS = ((("weight", (4, 6)), ("bias", (9,))), (("scale", (12,)),))


def _numel(b: int) -> int:
    return sum(math.prod(shape) for _, shape in BUCKETS[b])


def fake_gradient(step: int, b: int, rank: int) -> torch.Tensor:
    """Rank's flat gradient of bucket ``b`` at ``step`` (0-based): a part common to the ranks (so that they often
    pick the same indices, not always) and noise of the rank's own; float32. No two entries of a rank's g + e are
    within 1e-3 of each other in size at the k-th largest (tests/test_checks_ex09.py): top-k is unique."""
    M = _numel(b)
    common = torch.randn(M, generator=torch.Generator().manual_seed(900 + 10 * step + b), dtype=torch.float64)
    own = torch.randn(M, generator=torch.Generator().manual_seed(9000 + 100 * step + 10 * b + rank),
                      dtype=torch.float64)
    return (common + 0.7 * own).float()


# --- the torch.distributed calls a hook makes itself (not through labkit.comm, which comm.record sees) ---------

_DIST_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
             "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
             "reduce_scatter_single", "gather", "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv",
             "all_to_all", "all_to_all_single")


class _Direct:
    """Inside the ``with`` block, ``calls`` collects the names of the torch.distributed functions called from
    anywhere but labkit.comm (whose messages comm.record sees)."""

    def __enter__(self) -> "_Direct":
        self.calls = []
        self._saved = {name: getattr(dist, name) for name in _DIST_OPS if hasattr(dist, name)}
        for name, fn in self._saved.items():
            setattr(dist, name, self._counted(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _counted(self, name: str, fn):
        def counted(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") != comm.__name__:
                self.calls.append(name)
            return fn(*args, **kwargs)
        return counted


def _future_value(future):
    """The tensor a hook's future holds (a future of ``[tensor]``, as torch's all-reduce futures hold, counts), or
    :class:`Described` words for anything else."""
    if not isinstance(future, torch.futures.Future):
        return Described(f"{describe(future)}, not a torch.futures.Future")
    value = future.wait()
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], torch.Tensor):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        return Described(f"a future of {describe(value)}")
    return value


def fake_run(hook, name: str = "topk_hook", seconds: float = 10.0, student: bool = False) -> list:
    """``STEPS`` steps of ``hook`` on this rank's hand-made buckets, as DDP calls it: one TopKState for the run, one
    buffer per bucket refilled with the step's gradient and, after the hook, given the future's value. For each step
    and bucket: what the future held, the residual kept, the events comm.record saw and the direct calls."""
    rank, N = dist.get_rank(), dist.get_world_size()
    state = TopKState(ratio=RATIO)
    buckets = []
    for spec in BUCKETS:
        params = [nn.Parameter(torch.zeros(shape)) for _, shape in spec]
        offsets = [sum(math.prod(s) for _, s in spec[:i]) for i in range(len(spec))]
        buckets.append(Bucket(params, torch.zeros(sum(p.numel() for p in params)), offsets))
    steps = []
    for t in range(STEPS):
        calls = []
        for b, bucket in enumerate(buckets):
            bucket.buffer.copy_(fake_gradient(t, b, rank))
            grad_bucket = GradBucket(b, bucket, b == len(buckets) - 1)
            where = f"on rank {rank} at step {t + 1}, bucket {b}"
            late = (f"{name} did not return within {seconds:g} s {where} ({N} processes): an endless loop, or a "
                    f"collective that the other ranks do not call?")
            with time_limit(seconds, late), comm.record() as events, _Direct() as direct:
                if student:
                    value = call_student(lambda: _future_value(hook(state, grad_bucket)), name=name, task="9a",
                                         where=where)
                else:
                    value = _future_value(hook(state, grad_bucket))
            if isinstance(value, torch.Tensor) and value.shape == bucket.buffer.shape \
                    and value.data_ptr() != bucket.buffer.data_ptr():
                bucket.buffer.copy_(value)            # what DDP does with the future's value
            residuals = getattr(state, "residual", None)
            calls.append(dict(
                returned=keep(value) if isinstance(value, torch.Tensor) else value,
                residual=keep(residuals.get(b)) if isinstance(residuals, dict) else Described(
                    f"state.residual is {describe(residuals)}"),
                keys=sorted(repr(key) for key in residuals) if isinstance(residuals, dict) else [],
                events=[(e.op, e.bytes, e.numel) for e in events], direct=list(direct.calls)))
        steps.append(calls)
    return steps


# --- the known mistakes, each a small change of labkit's topk_hook ---------------------------------------------

@contextmanager
def _changed(obj, **attributes):
    """``obj``'s attributes (of an object or a class) set to other values inside the block, then as they were."""
    saved = {name: vars(obj)[name] for name in attributes if name in vars(obj)}   # not inherited ones: deleted after
    for name, value in attributes.items():
        setattr(obj, name, value)
    try:
        yield obj
    finally:
        for name in attributes:
            if name in saved:
                setattr(obj, name, saved[name])
            else:
                delattr(obj, name)


@contextmanager
def _gathers():
    """Inside the block, every labkit.comm.all_gather is recorded as (this rank's tensor, everyone's): labkit's hook
    gathers the values and the indices (int64) each rank sends."""
    seen, real = [], comm.all_gather

    def recording(outputs, t, group=None):
        real(outputs, t, group=group)
        seen.append((t, outputs))
    comm.all_gather = recording
    try:
        yield seen
    finally:
        comm.all_gather = real


def _sent(seen: list) -> tuple:
    """(everyone's values, everyone's indices, this rank's indices) from what labkit's hook gathered."""
    values = next(outputs for t, outputs in seen if t.is_floating_point())
    mine, indices = next((t, outputs) for t, outputs in seen if not t.is_floating_point())
    return values, indices, mine


def _ratio_for(k: int, numel: int) -> float:
    """A ratio r with ⌈r·M⌉ = k, away from rounding: (k − ½)/M."""
    return (k - 0.5) / numel


def _owed(state, bucket) -> torch.Tensor:
    residual = state.residual.get(bucket.index())
    return residual if residual is not None else torch.zeros_like(bucket.buffer())


def _no_feedback(state, bucket) -> torch.futures.Future[torch.Tensor]:
    with _changed(state, error_feedback=False):
        return topk_hook(state, bucket)


def _reset_each_step(state, bucket) -> torch.futures.Future[torch.Tensor]:
    state.residual.pop(bucket.index(), None)                    # what was owed is forgotten before it is added
    return topk_hook(state, bucket)


def _kept_one_step(state, bucket) -> torch.futures.Future[torch.Tensor]:
    fresh = bucket.buffer().clone()                             # this step's gradient, without the residual
    with _gathers() as seen:
        future = topk_hook(state, bucket)
    fresh[_sent(seen)[2]] = 0
    state.residual[bucket.index()] = fresh
    return future


def _added_twice(state, bucket) -> torch.futures.Future[torch.Tensor]:
    bucket.buffer().add_(_owed(state, bucket))                  # labkit's hook adds it once more
    return topk_hook(state, bucket)


def _keeps_sent(state, bucket) -> torch.futures.Future[torch.Tensor]:
    compensated = bucket.buffer() + _owed(state, bucket)
    future = topk_hook(state, bucket)
    state.residual[bucket.index()] = compensated                # the sent entries not zeroed
    return future


def _minus_average(state, bucket) -> torch.futures.Future[torch.Tensor]:
    compensated = bucket.buffer() + _owed(state, bucket)
    averaged = topk_hook(state, bucket).wait()
    state.residual[bucket.index()] = compensated - averaged
    return done(averaged)


def _aliased(state, bucket) -> torch.futures.Future[torch.Tensor]:
    future = topk_hook(state, bucket)
    state.residual[bucket.index()] = bucket.buffer()            # no clone: the buffer DDP refills every step
    return future


def _signed(state, bucket) -> torch.futures.Future[torch.Tensor]:
    with _changed(torch.Tensor, abs=lambda t: t):               # labkit's hook with g.abs() taken out
        return topk_hook(state, bucket)


def _k_rounded_down(state, bucket) -> torch.futures.Future[torch.Tensor]:
    M = bucket.buffer().numel()
    with _changed(state, ratio=_ratio_for(max(1, math.floor(state.ratio * M)), M)):
        return topk_hook(state, bucket)


def _k_of_first_gradient(state, bucket) -> torch.futures.Future[torch.Tensor]:
    M = bucket.buffer().numel()
    with _changed(state, ratio=_ratio_for(topk_k(bucket.gradients()[0].numel(), state.ratio), M)):
        return topk_hook(state, bucket)


def _not_aligned(state, bucket) -> torch.futures.Future[torch.Tensor]:
    with _gathers() as seen:
        averaged = topk_hook(state, bucket).wait()
    values, _, mine = _sent(seen)
    averaged.zero_()
    averaged[mine] = torch.stack(values).mean(0)                # position j of every rank's list, at my j-th index
    return done(averaged)


def _overwritten(state, bucket) -> torch.futures.Future[torch.Tensor]:
    with _gathers() as seen:
        averaged = topk_hook(state, bucket).wait()
    values, indices, _ = _sent(seen)
    averaged.zero_()
    for v, i in zip(values, indices):
        averaged[i] = v                                         # assigned, not added: the last rank's value wins
    return done(averaged.div_(len(values)))


def _summed(state, bucket) -> torch.futures.Future[torch.Tensor]:
    return done(topk_hook(state, bucket).wait().mul_(dist.get_world_size(state.group)))


def _divided_by_k(state, bucket) -> torch.futures.Future[torch.Tensor]:
    k = topk_k(bucket.buffer().numel(), state.ratio)
    return done(topk_hook(state, bucket).wait().mul_(dist.get_world_size(state.group) / k))


_ALONE: dict = {}


def _alone() -> object:
    """A process group of this rank alone (every rank makes every rank's, once: new_group is collective)."""
    if "groups" not in _ALONE:
        _ALONE["groups"] = [dist.new_group([r]) for r in range(dist.get_world_size())]
    return _ALONE["groups"][dist.get_rank()]


def _dense(state, bucket) -> torch.futures.Future[torch.Tensor]:
    mine = topk_hook(replace(state, group=_alone()), bucket).wait()   # labkit's hook on a world of one: my k entries
    comm.all_reduce(mine, group=state.group)                           # ... as a dense vector of M numbers
    return done(mine.div_(dist.get_world_size(state.group)))


def _own_gradient(state, bucket) -> torch.futures.Future[torch.Tensor]:
    given = bucket.buffer().clone()
    topk_hook(state, bucket)
    return done(given)


_RESIDUAL = ("After a step the residual is what this rank owed and did not send: e_new = g + e_old − (its k sent "
             "entries), that is g + e_old with the k sent entries set to 0.")

# Tried in this order where the numbers differ from labkit's (each row's hook runs on the same gradients and must
# give the student's averaged buckets and residuals at every call); "dense all-reduce" is named from the messages,
# "own gradient returned" from what the future holds.
TOPK_MISTAKES = (
    Mistake("no error feedback", _no_feedback,
            "nothing is kept for the next step: the entries that were not sent are lost, and the gradient becomes "
            "biased towards the coordinates that are large at every step. With error feedback the rank adds its "
            "residual to the gradient before choosing its k entries (g + e_old) and keeps what it did not send in "
            "state.residual[bucket.index()]: e_new = g + e_old with the k sent entries set to 0."),
    Mistake("residual reset each step", _reset_each_step,
            "the residual is kept but never reaches the next step: it is reset (or made anew with zeros) before it "
            "is added, so the k entries are chosen from g alone. Add state.residual[bucket.index()] (when there is "
            "one) to the gradient first, then choose the k largest of g + e_old."),
    Mistake("residual kept one step only", _kept_one_step,
            "the residual is made from this step's gradient g alone (g with the sent entries zeroed), so what was "
            "already owed and is still not sent is dropped: an entry small at every step is carried one step, never "
            "accumulated until it is large enough to be sent. " + _RESIDUAL),
    Mistake("feedback added twice", _added_twice,
            "the residual is added twice (the k entries are chosen from g + 2·e_old): add "
            "state.residual[bucket.index()] once, before choosing."),
    Mistake("residual keeps what was sent", _keeps_sent,
            "the residual keeps the entries that were sent as well (it is the whole g + e_old): they are then sent "
            "again at the next step, and again. " + _RESIDUAL),
    Mistake("residual against the average", _minus_average,
            "the residual is g + e_old minus the averaged result (PowerSGD's error, before − after): what this rank "
            "owes is what *it* did not send, g + e_old minus its own k entries, whatever the other ranks sent."),
    Mistake("residual aliased to the buffer", _aliased,
            "state.residual[bucket.index()] is the bucket's buffer itself (stored without .clone()): the hook then "
            "writes the average into it, and DDP refills the same buffer with the next step's gradient, so the "
            "'residual' is the gradient added to itself. Keep a copy: residual = g.clone(), then zero the sent "
            "entries of the copy."),
    Mistake("top-k of g, not of |g|", _signed,
            "the k entries are the k largest *signed* values (g.topk(k)): the large negative entries are never sent. "
            "Choose by magnitude: g.abs().topk(k).indices, then send g at those indices (with their signs)."),
    Mistake("k rounded down", _k_rounded_down,
            "k is ⌊ratio·M⌋ = {k_down} for a bucket of M = {M} numbers (ratio {ratio}): k = ⌈ratio·M⌉ = {k} (and at "
            "least 1; math.ceil, or max(1, int(np.ceil(...)))), as labkit.compression.TopKState says."),
    Mistake("k of one gradient", _k_of_first_gradient,
            "k is computed from the size of one gradient of the bucket (bucket.gradients()[0]), not from the bucket: "
            "the hook compresses the whole flat buffer, M = bucket.buffer().numel() = {M} numbers, k = ⌈ratio·M⌉ = "
            "{k}."),
    Mistake("indices not aligned", _not_aligned,
            "the ranks' values were averaged position by position (or all-reduced) and put at this rank's own "
            "indices: each rank chose its own k indices, so value j of rank 0 and value j of rank 1 belong to "
            "different coordinates. Gather everyone's indices with their values, and add each rank's values at that "
            "rank's indices (index_add_), then divide by N."),
    Mistake("shared indices overwritten", _overwritten,
            "where two ranks sent the same index, one value replaced the other (out[indices] = values assigns): add "
            "them, out.index_add_(0, indices, values) (or out[indices] += values, rank after rank)."),
    Mistake("sum, not the mean", _summed,
            "the result is N = {N} times the mean: every rank's entries were added up, not divided by the number of "
            "ranks. Divide the sum by N (dist.get_world_size(state.group))."),
    Mistake("divided by k", _divided_by_k,
            "the sum of the ranks' entries was divided by k = {k}, not by N = {N}: the result is the mean over the "
            "ranks of their compressed gradients, (1/N)·Σ_r (rank r's k entries), not a mean over the k entries."),
    Mistake("own gradient returned", _own_gradient,
            "the future holds this rank's own gradient (the buffer as it came, or with the residual added), not the "
            "average: return the averaged tensor, done(averaged) (labkit.compression.done), or write the average "
            "into bucket.buffer() and return done(bucket.buffer())."),
    Mistake("dense all-reduce", _dense,
            "the numbers are right, but rank {r} all-reduced a dense vector of M = {M} numbers ({sent} bytes sent "
            "per rank, where top-k sends (N−1)·k·(v + i) = {bound}): the zeros travel too, and an all-reduce sends "
            "2(N−1)/N·M numbers whatever k is. Send the k values and the k indices (comm.all_gather of each), and "
            "add them up on arrival."),
)
_BY_NUMBERS = tuple(m for m in TOPK_MISTAKES if m.name not in ("own gradient returned", "dense all-reduce"))
_SAYS = {m.name: m.says for m in TOPK_MISTAKES}


def _hook_worker(hook, name: str, seconds: float) -> dict:
    reference = fake_run(topk_hook, "labkit's topk_hook", seconds)
    got = fake_run(hook, name, seconds, student=True)
    right = _same_run(reference, got)
    variants = variants_if_wrong(right, _BY_NUMBERS, lambda variant: fake_run(variant, "variant", seconds))
    return dict(reference=reference, got=got, variants=variants)


# --- in the checker's process: what is wrong ----------------------------------------------------------------------

def _residual_same(want, got) -> bool:
    """Residuals agree, where none kept counts as zeros (no error feedback keeps nothing, or zeros)."""
    if isinstance(want, Described) or isinstance(got, Described):
        return False
    if want is None and got is None:
        return True
    like = want if want is not None else got
    want = torch.zeros_like(like) if want is None else want
    got = torch.zeros_like(like) if got is None else got
    return close(want, got, _RTOL, _ATOL)


def _call_same(want: dict, got: dict) -> bool:
    return close(want["returned"], got["returned"], _RTOL, _ATOL) and _residual_same(want["residual"],
                                                                                    got["residual"])


def _same_run(want: list, got: list) -> bool:
    return all(_call_same(w, g) for ws, gs in zip(want, got) for w, g in zip(ws, gs))


def _flat_name(b: int, i: int) -> str:
    """Element i of bucket b's flat buffer, as a parameter's element: 'bias[2]'."""
    offset = 0
    for name, shape in BUCKETS[b]:
        n = math.prod(shape)
        if i < offset + n:
            index = torch.unravel_index(torch.tensor(i - offset), shape)
            return f"{name}[{', '.join(str(int(j)) for j in index)}]"
        offset += n
    return f"element {i}"


def _element(label: str, b: int, want: torch.Tensor, got) -> str:
    """``'label[i] (bias[2]): expected x, got y'`` at the first differing element, or what is wrong with ``got``."""
    if not (isinstance(got, torch.Tensor) and got.shape == want.shape):
        return element_text(label, want, got, _RTOL, _ATOL)
    (i,), e, g = first_mismatch(want, got, _RTOL, _ATOL)
    e, g = fmt_pair(e, g)
    return f"{label}[{i}] ({_flat_name(b, i)}): expected {e}, got {g}"


def _sent_bytes(events: list, N: int) -> float:
    return sum(message_cost(op, N, nbytes)[1] for op, nbytes, _ in events)


def _sent_numbers(events: list, N: int) -> float:
    return sum(message_cost(op, N, numel)[1] for op, _, numel in events)


def _ops_text(events: list) -> str:
    return ", ".join(f"{op}({nbytes} bytes)" for op, nbytes, _ in events) or "none"


def _fields(N: int, b: int, r: int = 0) -> dict:
    M = _numel(b)
    k = topk_k(M, RATIO)
    return dict(N=N, M=M, k=k, k_down=max(1, math.floor(RATIO * M)), ratio=fmt_number(RATIO), r=r,
                bound=fmt_number(float((N - 1) * k * (4 + 8))))


def _shape_problem(head: str, r: int, got: dict, b: int) -> str | None:
    M = _numel(b)
    value = got["returned"]
    if isinstance(value, Described):
        return (f"{head}: on rank {r} your hook returned {value}: return a torch.futures.Future holding the averaged "
                f"bucket, a tensor of its M = {M} numbers: done(tensor) (labkit.compression.done) makes one.")
    if value.shape != (M,):
        return (f"{head}: on rank {r} the future holds a tensor of shape {tuple(value.shape)}: it must hold the whole "
                f"averaged bucket, a tensor of M = {M} numbers (bucket.buffer()'s shape), not the k values or the "
                f"gathered lists.")
    residual = got["residual"]
    if isinstance(residual, Described) and residual.startswith("state.residual is"):
        return (f"{head}: on rank {r}, {residual}: keep it as labkit.compression.TopKState made it, a dict from the "
                f"bucket's index to its residual.")
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != (M,)):
        shown = residual if isinstance(residual, Described) else describe(residual)
        return (f"{head}: on rank {r}, state.residual[{b}] is {shown}: keep the residual as a tensor of the "
                f"bucket's shape, M = {M} numbers (g + e_old with the sent entries zeroed).")
    return None


def _traffic_problem(head: str, r: int, got: dict, N: int, b: int) -> str | None:
    objects = [op for op, _, _ in got["events"] if op.endswith("_objects")]
    if got["direct"] or objects:
        calls = and_list(sorted(set(f"dist.{op}" for op in got["direct"]) | set(f"comm.{op}" for op in objects)))
        return (f"{head}: the numbers are right, but on rank {r} your hook sent with {calls}: send tensors through "
                f"labkit.comm (comm.all_gather(outputs, tensor, group=state.group)), whose messages comm.record() "
                f"counts (the bytes of the lesson's runs, and of this check); pickled objects cost a pickle each and "
                f"are not counted.")
    f = _fields(N, b, r)
    sent, numbers = _sent_bytes(got["events"], N), _sent_numbers(got["events"], N)
    if numbers <= 2 * (N - 1) * f["k"] and sent <= (N - 1) * f["k"] * _PAIR_BYTES:
        return None
    if any(op == "all_reduce" and numel >= f["M"] for op, _, numel in got["events"]):
        return f"{head}: " + _SAYS["dense all-reduce"].format(**dict(f, sent=fmt_number(sent)))
    return (f"{head}: the numbers are right, but rank {r} sent {fmt_number(numbers)} numbers, {fmt_number(sent)} "
            f"bytes ({_ops_text(got['events'])}, each costed as a ring sends it: an all-gather of b bytes sends "
            f"(N−1)·b, an all-reduce 2(N−1)/N·b). Top-k sends its k values and its k indices, all-gathered: "
            f"(N−1)·2k = {2 * (N - 1) * f['k']} numbers per rank, (N−1)·k·(v + i) = {f['bound']} bytes with values "
            f"in the bucket's dtype and int64 indices (at most 8 bytes each: {(N - 1) * f['k'] * _PAIR_BYTES}).")


def _own_gradient_returned(gots: list, t: int, b: int) -> bool:
    """At call (t, b) every rank's future held its own gradient, as given or with its residual added."""
    for r, steps in enumerate(gots):
        given = fake_gradient(t, b, r)
        owed = steps[t - 1][b]["residual"] if t else None
        candidates = [given] + ([given + owed] if isinstance(owed, torch.Tensor) and owed.shape == given.shape else [])
        if not any(close(c, steps[t][b]["returned"], _RTOL, _ATOL) for c in candidates):
            return False
    return True


def _numbers_problem(head: str, N: int, t: int, b: int, r: int, refs: list, gots: list, variants: list) -> str:
    want, got = refs[r][t][b], gots[r][t][b]
    f = _fields(N, b, r)
    if not close(want["returned"], got["returned"], _RTOL, _ATOL):
        what = _element("the averaged bucket", b, want["returned"], got["returned"])
    elif got["residual"] is None:
        what = (f"state.residual has no entry for bucket {b}"
                + (f" (its keys: {', '.join(got['keys'])})" if got["keys"] else ""))
    else:
        what = _element(f"state.residual[{b}]", b, want["residual"], got["residual"])
    mistake = find_mistake(_BY_NUMBERS, lambda m: all(m.name in v for v in variants) and all(
        _same_run(v[m.name], g) for v, g in zip(variants, gots)))
    if mistake is not None:
        return f"{head}, rank {r}: {what}: " + mistake.says.format(**f)
    if _own_gradient_returned(gots, t, b):
        return f"{head}, rank {r}: {what}: " + _SAYS["own gradient returned"]
    if not close(want["returned"], got["returned"], _RTOL, _ATOL):
        return (f"{head}, rank {r}: {what}. Every rank returns (1/N)·Σ_r (rank r's k entries at rank r's "
                f"indices), where rank r's entries are the k of largest magnitude of its g + e_old"
                + (" (the steps before were right: is the residual added, and kept, as it should be?)" if t else "")
                + ".")
    return f"{head}, rank {r}: {what}. " + _RESIDUAL


def _diagnose_hook(name: str, N: int, out: list) -> str | None:
    refs, gots = [o["reference"] for o in out], [o["got"] for o in out]
    variants = [o["variants"] for o in out]
    for t in range(STEPS):
        for b in range(len(BUCKETS)):
            M = _numel(b)
            head = (f"{name} on {N} processes, step {t + 1}, bucket {b} (M = {M} numbers, k = ⌈{fmt_number(RATIO)}·"
                    f"{M}⌉ = {topk_k(M, RATIO)})")
            for r in range(N):
                problem = _shape_problem(head, r, gots[r][t][b], b)
                if problem:
                    return problem
            for r in range(N):
                if not _call_same(refs[r][t][b], gots[r][t][b]):
                    return _numbers_problem(head, N, t, b, r, refs, gots, variants)
    for t in range(STEPS):
        for b in range(len(BUCKETS)):
            head = f"{name} on {N} processes, step {t + 1}, bucket {b}"
            for r in range(N):
                problem = _traffic_problem(head, r, gots[r][t][b], N, b)
                if problem:
                    return problem
    return None


# ============================================================================================
# 9a, then: training the small GPT, and torch's DDP
# ============================================================================================

TRAIN_STEPS, TRAIN_RATIO, TRAIN_MARGIN = 30, 0.01, 0.1
_TORCH_STEPS, _TORCH_RATIO = 4, 0.1


TRAIN_CONFIG = GPTConfig(vocab_size=VOCAB_SIZE, block_size=16, n_layer=1, n_head=2, n_embd=32)   # Ψ = 15 776


class _Affine(nn.Module):
    """tanh(x W + b), its bias registered first: torch's DDP lays out its one bucket as [b, W] before and after it
    rebuilds the buckets from the order of the first backward, so a residual kept by bucket index stays in place."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(909)
        self.b = nn.Parameter(torch.randn(6, generator=g))
        self.w = nn.Parameter(torch.randn(9, 6, generator=g))

    def forward(self, x):
        return torch.tanh(x @ self.w + self.b)


def _affine_run(hook, under_torch: bool) -> torch.Tensor:
    rank = dist.get_rank()
    model = _Affine()
    ddp = nn.parallel.DistributedDataParallel(model) if under_torch else HookedDDP(model, rebuild_buckets=False)
    state = TopKState(ratio=_TORCH_RATIO)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(_TORCH_STEPS):
        g = torch.Generator().manual_seed(990 + 10 * step + rank)
        x = torch.randn(8, 9, generator=g)
        opt.zero_grad()
        ((ddp(x) - torch.sin(x[:, :6])) ** 2).mean().backward()
        opt.step()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    del ddp, opt, state   # torch's DDP keeps futures whose last reference must not die on a gloo thread
    gc.collect()
    comm.barrier()
    return params


def _training_worker(hook, name: str, seconds: float) -> dict:
    def run(h):
        return train("allreduce", TRAIN_CONFIG, steps=TRAIN_STEPS, comm_hook=(TopKState(ratio=TRAIN_RATIO), h))
    reference = run(topk_hook)
    rank = dist.get_rank()
    with time_limit(seconds, f"{name} did not finish {TRAIN_STEPS} training steps within {seconds:g} s on rank "
                             f"{rank}: an endless loop?"):
        got = call_student(run, hook, name=name, task="9a", where=f"on rank {rank}, training the small GPT under "
                                                                  f"labkit's HookedDDP")
    out = dict(reference=(reference.losses, reference.bytes), got=(got.losses, got.bytes),
               labkit_affine=_affine_run(topk_hook, False))
    with time_limit(seconds, f"{name} did not finish {_TORCH_STEPS} steps under torch's DistributedDataParallel "
                             f"within {seconds:g} s on rank {rank}"):
        out["torch_affine"] = call_student(_affine_run, hook, True, name=name, task="9a", where=(
            f"on rank {rank} under torch's DistributedDataParallel (whose bucket is a torch.distributed.GradBucket: "
            f"buffer(), index(), gradients(), parameters(), is_last())"))
    return out


def _final(losses: list) -> float:
    return sum(losses[-5:]) / 5


def _diagnose_training(name: str, out: list) -> str | None:
    losses, sent = out[0]["got"]
    want_losses, want_sent = out[0]["reference"]
    target = _final(want_losses) + TRAIN_MARGIN
    if not _final(losses) <= target:
        return (f"{name} passes the hand-made buckets, but the small GPT trained with it under labkit's HookedDDP (2 "
                f"processes, {TRAIN_STEPS} AdamW steps, ratio {fmt_number(TRAIN_RATIO)}) ends at a loss of "
                f"{_final(losses):.3f} (mean of the last 5 steps; the first: {losses[0]:.3f}), above the target "
                f"{target:.3f} (labkit's topk_hook: {_final(want_losses):.3f}). Does your hook depend on the bucket's "
                f"size, dtype or index in a way the hand-made buckets did not show?")
    if sent[-1] > want_sent[-1] * _PAIR_BYTES / 12 + 1e-9:          # labkit's: float32 values, int64 indices
        return (f"{name} passes the hand-made buckets, but training the small GPT with it each rank sent "
                f"{fmt_number(sent[-1])} bytes in {TRAIN_STEPS} steps, where labkit's topk_hook sent "
                f"{fmt_number(want_sent[-1])}: k values and k indices per step (at most 8 bytes each), no more.")
    for r, o in enumerate(out):
        if not close(o["labkit_affine"], o["torch_affine"], _RTOL, _ATOL):
            return (f"{name} passes under labkit's HookedDDP, but not under torch's DistributedDataParallel: after "
                    f"{_TORCH_STEPS} SGD steps of a small model on 2 processes (one bucket, ratio "
                    f"{fmt_number(_TORCH_RATIO)}), on rank {r}, "
                    + element_text("the parameters", o["labkit_affine"], o["torch_affine"], _RTOL, _ATOL)
                    + " (labkit's topk_hook under HookedDDP against yours under torch's DDP). torch's bucket is a "
                      "torch.distributed.GradBucket: use only buffer(), index(), gradients(), parameters() and "
                      "is_last().")
    return None


# ============================================================================================
# 9a. The check
# ============================================================================================

def _signature_problem(hook, name: str) -> str | None:
    try:
        sig = inspect.signature(hook)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters)
    if len(params) != 2 or params[1] != "bucket":
        return (f"{name} takes ({', '.join(params)}): a communication hook takes (state, bucket), and torch's DDP "
                f"looks its second parameter up by the name `bucket`: def {name}(state, bucket) -> "
                f"torch.futures.Future[torch.Tensor].")
    annotation = sig.return_annotation
    if isinstance(annotation, str):
        return (f"{name}'s return annotation is the text {annotation!r} (a `from __future__ import annotations` "
                f"makes every annotation a text): torch's DDP compares it with torch.futures.Future[torch.Tensor] "
                f"itself and refuses the hook. Define the hook where annotations are not postponed.")
    if annotation is not inspect.Signature.empty and annotation != _HOOK_TYPE:
        return (f"{name}'s return annotation is {annotation!r}: torch's DDP accepts a hook annotated "
                f"-> torch.futures.Future[torch.Tensor] (or not annotated) only.")
    bucket_type = sig.parameters["bucket"].annotation
    if bucket_type is not inspect.Signature.empty and bucket_type != dist.GradBucket:
        return (f"{name}'s bucket is annotated {bucket_type!r}: torch's DDP accepts torch.distributed.GradBucket "
                f"(or no annotation) only.")
    return None


def check_topk_hook(hook, *, world_sizes=WORLD_SIZES, timeout: float = 20.0) -> None:
    """Check exercise 9a: ``hook(state, bucket) -> torch.futures.Future[torch.Tensor]``, top-k with error feedback as
    a DDP communication hook (``state`` a labkit.compression.TopKState), against labkit.compression.topk_hook on
    hand-made buckets on each of ``world_sizes`` processes (the averaged bucket, the residual, the bytes sent), then
    training the small GPT with it on 2 processes (the target loss) and a small model under torch's
    DistributedDataParallel. ``timeout``: seconds before a rank that hangs is stopped."""
    __tracebackhide__ = True
    name = need_function(hook, "check_topk_hook")
    problem = _signature_problem(hook, name)
    if problem:
        fail(problem)
    first_bucket = {}
    for N in world_sizes:
        out = run_on_ranks(_hook_worker, hook, name, 0.6 * timeout, world_size=N, timeout=timeout, name=name,
                           task="9a")
        problem = _diagnose_hook(name, N, out)
        if problem:
            fail(problem)
        first_bucket[N] = _sent_bytes(out[0]["got"][0][0]["events"], N)
    out = run_on_ranks(_training_worker, hook, name, 1.5 * timeout, world_size=2, timeout=2 * timeout, name=name,
                       task="9a")
    problem = _diagnose_training(name, out)
    if problem:
        fail(problem)
    losses, sent = out[0]["got"]
    full = TRAIN_STEPS * allreduce_bytes(GPT(TRAIN_CONFIG).num_params(), 2)
    sizes = sorted(world_sizes)
    ks = and_list(topk_k(_numel(b), RATIO) for b in range(len(BUCKETS)))
    per_call = and_list(fmt_number(first_bucket[N]) for N in sizes)
    passed(f"{name} equals labkit.compression.topk_hook on {and_list(sizes)} processes ({STEPS} steps of two "
           f"buckets of {and_list(_numel(b) for b in range(len(BUCKETS)))} numbers, k = {ks}: the averaged buckets, "
           f"the residual kept, the messages: {per_call} bytes per rank for the first bucket); the small GPT trained "
           f"with it on 2 processes reaches {_final(losses):.2f} in {TRAIN_STEPS} steps (target "
           f"{_final(out[0]['reference'][0]) + TRAIN_MARGIN:.2f}), sending {fmt_number(sent[-1])} bytes per rank "
           f"instead of {fmt_number(full)} (all-reduce); under torch's DistributedDataParallel it gives the parameters "
           f"of labkit's hook under HookedDDP")


# ============================================================================================
# 9b. Design: what top-k sends, and when it pays
# ============================================================================================

# (numel, ratio, N, value_bytes, index_bytes): ratio·M whole and not, k = 1, N = 2 (where N − 1 = 1 and 2(N−1)/N =
# 1) and many ranks, fp32/fp16/fp64 values, 8- and 4-byte indices
BYTES_CASES = ((1000, 0.01, 4, 4, 8), (1000, 0.0125, 3, 4, 8), (33, 0.2, 3, 4, 8), (12, 0.2, 5, 2, 4),
               (25_000_000, 0.001, 64, 4, 8), (25_000_000, 0.01, 8, 2, 8), (50, 0.001, 16, 8, 8), (4321, 0.05, 2, 4, 8),
               (4321, 0.05, 7, 4, 4), (100_003, 0.3, 1024, 2, 4))
BREAK_EVEN_CASES = tuple((n, v, i) for n in (2, 3, 8, 64, 1000) for v, i in ((4, 8), (2, 4), (2, 8), (8, 8)))


# Each row: how to get the wrong number from labkit.compression_cost's pieces.
BYTES_MISTAKES = (
    Mistake("no indices", lambda M, r, N, v, i: (N - 1) * topk_k(M, r) * v,
            "only the values are counted: each rank's k entries sit at indices of its own, which must travel with "
            "them (i bytes each), or the receivers cannot tell where to add them: (N−1)·k·(v + i)."),
    Mistake("no (N−1)", lambda M, r, N, v, i: topk_k(M, r) * (v + i),
            "this is one copy of the k pairs: in an all-gather every rank receives every other rank's k pairs, and "
            "in a ring each rank forwards N − 1 blocks of k·(v + i) bytes: (N−1)·k·(v + i)."),
    Mistake("N, not N−1", lambda M, r, N, v, i: N * topk_k(M, r) * (v + i),
            "N blocks of k pairs are counted: a rank never sends its own block to itself, so an all-gather sends "
            "N − 1 blocks per rank: (N−1)·k·(v + i)."),
    Mistake("all-reduced like a dense vector", lambda M, r, N, v, i: 2 * (N - 1) / N * topk_k(M, r) * (v + i),
            "2(N−1)/N·k·(v + i) is an all-reduce of the k pairs: a ring all-reduce sums chunks on the way, which "
            "works only when every rank's numbers mean the same coordinates. Each rank's k indices are its own, so "
            "nothing can be summed on the way: the pairs are all-gathered, (N−1)·k·(v + i), and that grows with N."),
    Mistake("k not rounded", lambda M, r, N, v, i: (N - 1) * r * M * (v + i),
            "k = ratio·M is not a whole number of entries here: k = ⌈ratio·M⌉ (labkit.compression_cost.topk_k; at "
            "least 1)."),
    Mistake("k rounded down", lambda M, r, N, v, i: (N - 1) * max(1, math.floor(r * M)) * (v + i),
            "k = ⌊ratio·M⌋ here: the hook sends k = ⌈ratio·M⌉ entries (at least 1)."),
)

_BREAK_EVEN_HOW = ("top-k sends (N−1)·k·(v + i) per rank, the ring all-reduce 2(N−1)/N·M·v; with k = ratio·M, top-k "
                   "sends less while ratio < 2v / (N (v + i)).")
BREAK_EVEN_MISTAKES = (
    Mistake("no indices", lambda N, v, i: 2 / N,
            "2/N leaves out the indices: top-k sends k·(v + i) bytes per entry pair, not k·v, so the ratio must be "
            "smaller by v/(v + i): " + _BREAK_EVEN_HOW),
    Mistake("against one copy of M", lambda N, v, i: v / ((N - 1) * (v + i)),
            "this compares top-k with M·v, one copy of the bucket: a ring all-reduce sends 2(N−1)/N·M·v per rank (a "
            "reduce-scatter and an all-gather, lesson 2). " + _BREAK_EVEN_HOW),
    Mistake("against 2M", lambda N, v, i: 2 * v / ((N - 1) * (v + i)),
            "this compares top-k with 2M·v: a ring all-reduce sends 2(N−1)/N·M·v per rank, the factor (N−1)/N "
            "included. " + _BREAK_EVEN_HOW),
    Mistake("no (N−1) for top-k", lambda N, v, i: 2 * (N - 1) * v / (N * (v + i)),
            "top-k is counted as one copy of the k pairs, but an all-gather sends the N − 1 other blocks per rank: "
            "its cost grows with N while the all-reduce's does not. " + _BREAK_EVEN_HOW),
    Mistake("both all-reduced", lambda N, v, i: v / (v + i),
            "v/(v + i) compares two all-reduces (dense and sparse): top-k's pairs cannot be all-reduced, each rank's "
            "indices are its own; they are all-gathered, (N−1)·k·(v + i), which grows with N. " + _BREAK_EVEN_HOW),
    Mistake("inverted", lambda N, v, i: N * (v + i) / (2 * v),
            "this is the inverse of the break-even ratio (a ratio above 1 means nothing): " + _BREAK_EVEN_HOW),
)


def _number(fn, name: str, task: str, args: tuple, kwargs: dict) -> float:
    __tracebackhide__ = True
    call = call_repr(name, *args, **kwargs)
    got = call_student(fn, *args, name=name, task=task, where=f"for {call}", **kwargs)
    value = as_number(got)
    if value is None:
        fail(f"{call} returned {describe(got)}: return a number (an int or a float).")
    return value


_KEYWORDS = ("value_bytes", "index_bytes")   # the last two numbers of a case, passed by name


def _split(case: tuple) -> tuple[tuple, dict]:
    return case[:-len(_KEYWORDS)], dict(zip(_KEYWORDS, case[-len(_KEYWORDS):]))


def _formula_problem(fn, name: str, task: str, cases: tuple, reference, mistakes: tuple, how: str) -> str | None:
    """The first case where ``fn`` differs from ``reference``, with the mistake of ``mistakes`` that gives ``fn``'s
    numbers on every case, or ``how`` it is computed."""
    got = [_number(fn, name, task, *_split(case)) for case in cases]
    for case, g in zip(cases, got):
        args, kwargs = _split(case)
        want = reference(*args, **kwargs)
        if close_number(want, g):
            continue
        e, shown = fmt_pair(want, g)
        text = f"{call_repr(name, *args, **kwargs)} is {shown}, expected {e}"
        mistake = find_mistake(mistakes, lambda m: all(close_number(m.variant(*c), x) for c, x in zip(cases, got)))
        return f"{text}: {mistake.says}" if mistake else f"{text}. {how}"
    return None


def _measured_worker() -> dict:
    """labkit's topk_hook and allreduce_hook on a bucket of float32 and one of float64, on groups of the first 2, 3
    and 4 ranks: the bytes rank 0 sends (comm.record, costed as a ring)."""
    groups = {n: dist.new_group(list(range(n))) for n in (2, 3, 4)}
    out = {}
    for n, group in groups.items():
        if dist.get_rank() >= n:
            continue
        for numel, ratio, dtype in _MEASURED:
            bucket = Bucket([nn.Parameter(torch.zeros(numel, dtype=dtype))],
                            torch.randn(numel, generator=torch.Generator().manual_seed(n), dtype=dtype), [0])
            with comm.record() as topk_events:
                topk_hook(TopKState(group=group, ratio=ratio), GradBucket(0, bucket, True))
            with comm.record() as dense_events:
                allreduce_hook(group, GradBucket(0, bucket, True))
            out[n, numel, ratio, dtype] = (sum(message_cost(e.op, n, e.bytes)[1] for e in topk_events),
                                          sum(message_cost(e.op, n, e.bytes)[1] for e in dense_events))
    return out


# a bucket of 3000 numbers: around the break-even ratio 2v/(N(v+i)) on each side, and the course's 1 %
_MEASURED = tuple((3000, ratio, dtype) for dtype in (torch.float32, torch.float64)
                  for ratio in (0.01, 0.1, 0.2, 0.3))


def check_topk_cost(topk_bytes_fn, break_even_ratio_fn, *, timeout: float = 30.0) -> None:
    """Check exercise 9b: ``topk_bytes(numel, ratio, world_size, value_bytes=4, index_bytes=8)``, the bytes one rank
    sends for a bucket of ``numel`` numbers with top-k, and ``break_even_ratio(world_size, value_bytes=4,
    index_bytes=8)``, the ratio below which top-k sends less than a ring all-reduce. Compared with
    labkit.compression_cost on a grid, then with the bytes labkit's topk_hook and allreduce_hook send on 2, 3 and 4
    processes."""
    __tracebackhide__ = True
    names = (need_function(topk_bytes_fn, "check_topk_cost"), need_function(break_even_ratio_fn, "check_topk_cost"))
    try:
        problem = (_formula_problem(topk_bytes_fn, names[0], "9b(i)", BYTES_CASES, topk_bytes, BYTES_MISTAKES,
                                    "Each rank all-gathers its k = ⌈ratio·M⌉ values (v bytes) and indices (i bytes): "
                                    "(N−1)·k·(v + i) per rank, costed as a ring sends it.")
                   or _formula_problem(break_even_ratio_fn, names[1], "9b(ii)", BREAK_EVEN_CASES, break_even_ratio,
                                       BREAK_EVEN_MISTAKES, _BREAK_EVEN_HOW))
    except NotImplementedError as err:
        raise not_written([("9b(i)", names[0], lambda: topk_bytes_fn(1000, 0.01, 4)),
                           ("9b(ii)", names[1], lambda: break_even_ratio_fn(4))], err, "9b") from None
    if problem:
        fail(problem)
    measured = run_on_ranks(_measured_worker, world_size=4, timeout=timeout, name="labkit's hooks")[0]
    for (n, numel, ratio, dtype), (topk_sent, dense_sent) in sorted(measured.items(), key=str):
        v = torch.finfo(dtype).bits // 8
        mine = _number(topk_bytes_fn, names[0], "9b(i)", (numel, ratio, n), dict(value_bytes=v, index_bytes=8))
        if not close_number(topk_sent, mine):
            e, g = fmt_pair(topk_sent, mine)
            fail(f"{names[0]} agrees with labkit.compression_cost, but not with labkit's topk_hook on {n} processes: "
                 f"for a bucket of {numel} {str(dtype).replace('torch.', '')} numbers at ratio {fmt_number(ratio)} it "
                 f"sent {e} bytes per rank, your formula gives {g}.")
        pays = ratio < _number(break_even_ratio_fn, names[1], "9b(ii)", (n,), dict(value_bytes=v, index_bytes=8))
        if pays != (topk_sent < dense_sent):
            fail(f"{names[1]}({n}, value_bytes={v}, index_bytes=8) says top-k at ratio {fmt_number(ratio)} "
                 f"{'sends less' if pays else 'does not send less'}, but on {n} processes labkit's topk_hook sent "
                 f"{fmt_number(topk_sent)} bytes per rank and the all-reduce {fmt_number(dense_sent)}.")
    ranks = next(n for n in range(2, 10_000) if not 0.01 < break_even_ratio(n))
    passed(f"{names[0]} and {names[1]} equal labkit.compression_cost on {len(BYTES_CASES)} and "
           f"{len(BREAK_EVEN_CASES)} cases, and the bytes labkit's topk_hook and allreduce_hook send on 2, 3 and 4 "
           f"processes (float32 and float64, on both sides of the break-even ratio). Top-k at 1 % (fp32 values, "
           f"int64 indices) sends less than the all-reduce on at most {ranks - 1} ranks")
