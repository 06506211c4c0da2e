"""Checkers for exercise 1, data parallelism by hand (``solutions/01_data_parallel_exercise.ipynb``).

    check_average_gradients(average_gradients)   # 1a: runs it on 1, 2, 3 and 4 processes
    check_shard_indices(shard_indices)           # 1b: a pure function, checked in this process
    check_average_gradients_uneven(average_gradients_uneven)   # 1c: a design task, against one process

Each prints one ``✓`` line when the code is right and raises :class:`labkit.checks.CheckFailed`
naming the mistake when it is not. How the diagnosis works is written next to each check: the
gradients and the sharding cases are chosen so that each classic mistake leaves a recognisable
fingerprint (N× the mean, a rank's own gradient, only rank 0 right, ...).
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from labkit.checks import (CheckFailed, call_repr, describe, expected_got, fail, first_mismatch, fmt_index, fmt_list,
                           fmt_number, fmt_pair, passed, run_on_ranks, time_limit)
from labkit.checks.harness import (Board, Mistake, Watch, board_dir, bound, close, element_text, everyone, factor,
                                   find_mistake, keep, need_function)
from labkit.data_parallel import LinearRegression, make_linear_data, weighted_average_gradients

__all__ = ["check_average_gradients", "check_shard_indices", "check_average_gradients_uneven", "UNEVEN_CASES",
           "UNEVEN_MISTAKES", "ZERO_RANK_MISTAKES", "Weighting"]

_RTOL, _ATOL = 1e-9, 1e-12


# ============================================================================================
# 1a. average_gradients(model): every p.grad becomes the mean over the ranks, in place
# ============================================================================================

# A model whose parameters have different shapes (a matrix, a vector, a 0-d scalar, a 3-d tensor).
_PARAMS = (("layer.weight", (3, 4)), ("layer.bias", (3,)), ("gain", ()), ("table", (2, 2, 2)))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layer = torch.nn.Linear(4, 3, dtype=torch.float64)
        with torch.no_grad():  # fixed weights, and no use of the global random state
            self.layer.weight.copy_(torch.randn(3, 4, generator=g, dtype=torch.float64))
            self.layer.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        self.table = torch.nn.Parameter(torch.randn(2, 2, 2, generator=g, dtype=torch.float64))


def _gradients(world_size: int) -> tuple[list[dict], dict]:
    """Known gradients: ``(per_rank, mean)`` with ``per_rank[r][name]`` rank r's gradient.

    Every value is a multiple of 1/4 (so messages show short numbers and float64 sums are exact);
    every element of the mean is at least 0.5 away from zero (ratios got/expected are meaningful);
    every rank's gradient differs from the mean in every element (a rank that kept its own gradient
    is recognisable) and the ranks' gradients are not multiples of each other.
    """
    g = torch.Generator().manual_seed(1000 + world_size)
    per_rank = [{} for _ in range(world_size)]
    mean = {}
    for name, shape in _PARAMS:
        numel = math.prod(shape)
        sign = torch.randint(0, 2, (numel,), generator=g) * 2 - 1
        mean_q = torch.randint(2, 7, (numel,), generator=g) * sign  # in quarters: ±0.5 ... ±1.5
        deviations = torch.zeros(world_size, numel, dtype=torch.int64)
        if world_size > 1:
            while True:  # nonzero deviations that sum to zero over the ranks
                d = torch.randint(1, 9, (world_size - 1, numel), generator=g)
                d = d * (torch.randint(0, 2, (world_size - 1, numel), generator=g) * 2 - 1)
                last = -d.sum(dim=0, keepdim=True)
                if (last != 0).all():
                    deviations = torch.cat([d, last])
                    break
        mean[name] = (mean_q.to(torch.float64) / 4).reshape(shape)
        for r in range(world_size):
            per_rank[r][name] = ((mean_q + deviations[r]).to(torch.float64) / 4).reshape(shape)
    return per_rank, mean


def _portable(x, depth: int = 0):
    """What the student's function returned, in a form that can travel back from a worker."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)) and depth < 2:
        return [_portable(v, depth + 1) for v in x]
    if isinstance(x, dict) and depth < 2:
        return {str(k): _portable(v, depth + 1) for k, v in x.items()}
    return f"<{type(x).__name__}>"


# Two more probes, run after the main one: each exercises one rule of the brief that the main
# gradients (multiples of 1/4, exact in any float format, none missing) cannot.
_FINE = 2.0 ** -30        # below float32's resolution near 1 (2^-23), far above float64's (2^-52)
_UNUSED = "gain"          # the parameter that took no part in the loss in the third probe


def _fine_gradients(world_size: int) -> tuple[list[dict], dict]:
    """The main gradients plus rank-dependent offsets of 1..40 × 2^-30 per element: exact in float64
    (sums included), lost by an average computed in float32 or bfloat16."""
    per_rank, _ = _gradients(world_size)
    g = torch.Generator().manual_seed(2000 + world_size)
    fine = [{n: per_rank[r][n] + _FINE * torch.randint(1, 41, per_rank[r][n].shape, generator=g).to(torch.float64)
             for n, _ in _PARAMS} for r in range(world_size)]
    mean = {n: torch.stack([fine[r][n] for r in range(world_size)]).sum(dim=0) / world_size for n, _ in _PARAMS}
    return fine, mean


def _run_probe(student_fn, grads: dict, missing: str | None = None) -> dict:
    model = _Net()
    originals = {}
    for name, p in model.named_parameters():
        p.grad = None if name == missing else grads[name].clone()
        originals[name] = p.grad
    weights_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    returned = student_fn(model)
    params = dict(model.named_parameters())
    return {
        "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()},
        "same_object": {n: params[n].grad is originals[n] for n in params},
        "weights_changed": [n for n, p in params.items() if not torch.equal(p.detach(), weights_before[n])],
        "returned": _portable(returned),
    }


def _average_gradients_worker(student_fn) -> dict:
    """On each rank: a model with this rank's known gradients, the student's function, a report."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return _run_probe(student_fn, _gradients(world_size)[0][rank])


def _probes_worker(student_fn) -> dict:
    """Once the main gradients come out right: the precision probe and the missing-gradient probe."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    report = {"fine": _run_probe(student_fn, _fine_gradients(world_size)[0][rank])}
    try:  # every rank has the same missing gradient: a crash happens at the same place on every rank
        report["unused"] = _run_probe(student_fn, _gradients(world_size)[0][rank], missing=_UNUSED)
    except Exception as exc:  # noqa: BLE001 - reported as the rule it breaks
        report["unused"] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return close(a, b, _RTOL, _ATOL)


def _label(got, mean: torch.Tensor, own: torch.Tensor, world_size: int) -> tuple:
    """What a rank's gradient of one parameter is, in terms of the classic mistakes."""
    if got is None:
        return ("none",)
    if got.shape != mean.shape or not got.dtype.is_floating_point:
        return ("shape",)
    if _close(got, mean):
        return ("ok",)
    if _close(got, own):
        return ("own",)
    if _close(got, world_size * mean):
        return ("sum",)
    ratio = got.to(torch.float64) / mean
    c = ratio.reshape(-1)[0].item()
    if (math.isfinite(c) and torch.allclose(ratio, torch.full_like(ratio, c), rtol=_RTOL, atol=_ATOL)) \
            or bool((ratio == c).all()):
        return ("scaled", c)
    return ("other",)


def _where(rank: int, name: str, expected: torch.Tensor, got: torch.Tensor) -> str:
    """'rank r, parameter 'name', element [i, j]: expected x, got y' for the first differing element."""
    found = first_mismatch(expected, got, _RTOL, _ATOL)
    if found is None:
        return f"rank {rank}, parameter {name!r}: as expected"
    index, e, g = found
    return expected_got(f"rank {rank}, parameter {name!r}, element {fmt_index(index)}", e, g)


def _names(names) -> str:
    return ", ".join(repr(n) for n in names)


def _ranks(ranks) -> str:
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)


def _diagnose_average(world_size: int, reports: list[dict]) -> str | None:
    """None when every rank holds the mean in its original .grad tensors; else the mistake."""
    N = world_size
    own, mean = _gradients(N)
    names = [n for n, _ in _PARAMS]
    ranks = range(N)
    got = {(r, n): reports[r]["grads"][n] for r in ranks for n in names}
    labels = {(r, n): _label(got[r, n], mean[n], own[r][n], N) for r in ranks for n in names}
    kinds = {key: lab[0] for key, lab in labels.items()}

    for (r, n), kind in kinds.items():
        if kind == "none":
            return (f"rank {r}: parameter {n!r} has no gradient after your function (p.grad is None). "
                    f"Average the gradient that is there; do not set p.grad to None (model.zero_grad() does).")
        if kind == "shape":
            g = got[r, n]
            return (f"rank {r}, parameter {n!r}: after your function .grad has shape {tuple(g.shape)} and dtype "
                    f"{g.dtype}; it must keep the parameter's shape {tuple(mean[n].shape)} and dtype torch.float64.")
    for r in ranks:
        if reports[r]["weights_changed"]:
            return (f"rank {r}: your function changed the parameter(s) {_names(reports[r]['weights_changed'])} "
                    f"themselves, not only their .grad. Average p.grad and leave the weights to the optimizer.")

    if all(k == "ok" for k in kinds.values()):
        for r in ranks:
            for n in names:
                if not reports[r]["same_object"][n]:
                    return (f"the values are right, but not in place: on rank {r} parameter {n!r} has a new .grad "
                            f"tensor (your function assigned p.grad = ...). Modify the existing tensor instead: "
                            f"dist.all_reduce(p.grad) already works in place, then p.grad /= world_size "
                            f"(or p.grad.div_(world_size)), not p.grad = p.grad / world_size. Code that holds the "
                            f"gradient tensor (gradient hooks, DDP's gradient buckets) would not see a new one.")
        return None

    example = _where(0, names[0], mean[names[0]], got[0, names[0]])
    if N >= 2 and all(k == "own" for k in kinds.values()):
        returned = reports[0]["returned"]
        if returned is not None:
            right = _returned_the_mean(returned, mean)
            return (f"your function returned {describe(returned)} and left every p.grad unchanged (each rank still "
                    f"holds its own gradient{'; what you returned are the right averages' if right else ''}). "
                    f"Write the average into p.grad, in place, and return nothing: the optimizer reads p.grad.")
        return (f"no communication: on every rank .grad is still that rank's own gradient ({example}; "
                f"that is rank 0's own gradient, the expected value is the mean over {N} ranks). "
                f"Call dist.all_reduce(p.grad, op=dist.ReduceOp.SUM) for every parameter, then divide by {N}.")

    if N >= 2:
        rank0 = {kinds[0, n] for n in names}
        bad = [r for r in ranks if r and any(kinds[r, n] != "ok" for n in names)]
        # dist.reduce leaves the sum on dst only; gloo leaves partial sums in the others' tensors.
        reduce_like = all(_is_partial_sum(got[r, n], [own[k][n] for k in ranks], N) for r in bad for n in names)
        if bad and reduce_like and (rank0 == {"ok"} or (rank0 == {"sum"} and any(
                kinds[r, n] != "sum" for r in bad for n in names))):
            if all(kinds[r, n] == "own" for r in bad for n in names):
                what = ("still holds its own gradient" if len(bad) == 1 else "still hold their own gradients")
            else:
                r = bad[0]
                n = next(n for n in names if kinds[r, n] != "ok")
                what = f"{'does' if len(bad) == 1 else 'do'} not ({_where(r, n, mean[n], got[r, n])})"
            msg = (f"only rank 0 ends with the {'average' if rank0 == {'ok'} else 'sum'}: {_ranks(bad)} {what}. "
                   f"That is what dist.reduce does: only the destination rank receives the result, the others' "
                   f"tensors keep their own values or partial sums. Use dist.all_reduce, which leaves the sum "
                   f"on every rank.")
            if rank0 == {"sum"}:
                msg += f" Then divide by the world size: rank 0 holds the sum, {N}× the mean."
            return msg

    if all(k == "sum" for k in kinds.values()):
        return (f"got {N}× the expected value on every rank and parameter ({example}): you summed the gradients "
                f"but did not divide by the world size. The mean is g = (1/N) Σ g_i with N = {N}.")

    scales = {lab[1] for lab in labels.values() if lab[0] == "scaled"}
    if all(k == "scaled" for k in kinds.values()) and (len(scales) == 1 or _all_close(scales)):
        c = next(iter(scales))
        if c == 0:
            return f"every gradient is zero after your function ({example}): did you zero the gradients?"
        divisor = N / c
        shown = fmt_number(round(divisor)) if abs(divisor - round(divisor)) < 1e-9 else fmt_number(divisor)
        return (f"divided by the wrong number: got {fmt_number(c)}× the expected mean on every rank and parameter "
                f"({example}), which is the sum divided by {shown} instead of by the world size N = {N}. "
                f"Use dist.get_world_size().")

    per_param = {n: {labels[r, n] for r in ranks} for n in names}
    if all(len(v) == 1 for v in per_param.values()):  # every rank agrees on what happened to each parameter
        good = [n for n in names if kinds[0, n] == "ok"]
        wrong = [n for n in names if kinds[0, n] != "ok"]
        if good and all(kinds[0, n] == "own" for n in wrong):
            return (f"parameter(s) {_names(wrong)} were skipped: on every rank their .grad is still the rank's own "
                    f"gradient ({_where(0, wrong[0], mean[wrong[0]], got[0, wrong[0]])}), while {_names(good)} "
                    f"are averaged correctly. Average every parameter: loop over model.parameters().")
        if good:
            parts = [f"{n!r}: {_kind_text(labels[0, n], N)}" for n in wrong]
            return (f"some parameters are right ({_names(good)}), others not: " + "; ".join(parts) +
                    f" ({_where(0, wrong[0], mean[wrong[0]], got[0, wrong[0]])}).")

    for n in names:  # ranks disagree: the replicas would drift apart
        stacked = torch.stack([got[r, n].to(torch.float64).reshape(-1) for r in ranks])
        spread = stacked.max(dim=0).values - stacked.min(dim=0).values
        if (spread > _ATOL + _RTOL * stacked.abs().max(dim=0).values).any():
            flat = int((spread > _ATOL + _RTOL * stacked.abs().max(dim=0).values).nonzero()[0, 0])
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mean[n].shape)) \
                if mean[n].dim() else ()
            values = ", ".join(f"rank {r} has {fmt_number(stacked[r, flat].item(), 9)}" for r in ranks)
            return (f"the ranks disagree after your function: parameter {n!r}, element {fmt_index(index)}: {values} "
                    f"(expected {fmt_number(mean[n].reshape(-1)[flat].item(), 9)} on every rank). After averaging "
                    f"every rank must hold the same gradient, or the replicas drift apart.")

    for r in ranks:
        for n in names:
            if kinds[r, n] != "ok":
                return _where(r, n, mean[n], got[r, n])
    return None  # not reached


def _is_partial_sum(got, own: list[torch.Tensor], N: int) -> bool:
    """Whether every element of ``got`` is a sum of some ranks' gradients (or such a sum divided
    by N): what dist.reduce leaves in the tensors of the ranks that are not the destination."""
    if got is None or got.shape != own[0].shape:
        return False
    stacked = torch.stack([g.reshape(-1) for g in own])                       # (N, numel)
    masks = torch.tensor([[m >> k & 1 for k in range(N)] for m in range(1, 2 ** N)], dtype=torch.float64)
    sums = masks @ stacked                                                    # (2^N - 1, numel)
    candidates = torch.cat([sums, sums / N])
    g = got.detach().to(torch.float64).reshape(1, -1)
    return bool(torch.isclose(candidates, g.expand_as(candidates), rtol=_RTOL, atol=_ATOL).any(dim=0).all())


def _kind_text(label: tuple, N: int) -> str:
    kind = label[0]
    if kind == "own":
        return "not averaged (still each rank's own gradient)"
    if kind == "sum":
        return f"summed but not divided by {N}"
    if kind == "scaled":
        return f"{fmt_number(label[1])}× the mean"
    return "wrong"


def _all_close(values) -> bool:
    values = [v for v in values if math.isfinite(v)]
    return bool(values) and max(values) - min(values) <= _RTOL * max(abs(v) for v in values)



def _returned_the_mean(returned, mean: dict) -> bool:
    """Whether what the function returned contains the averaged gradients (in any container)."""
    tensors = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(returned)
    return bool(tensors) and all(any(_close(t, m) for t in tensors) for m in mean.values())


def _diagnose_probes(world_size: int, reports: list[dict]) -> str | None:
    """The precision probe, then the missing-gradient probe (run when the main gradients are right)."""
    N = world_size
    names = [n for n, _ in _PARAMS]
    _, mean = _fine_gradients(N)
    for r in range(N):
        for n in names:
            got = reports[r]["fine"]["grads"][n]
            if got is None or got.shape != mean[n].shape:
                return f"rank {r}, parameter {n!r}: {_where(r, n, mean[n], got) if got is not None else 'no gradient'}"
            found = first_mismatch(mean[n], got.to(torch.float64), _RTOL, _ATOL)
            if found is None:
                continue
            index, e, g = found
            if got.dtype != torch.float64:
                how = f"the gradient came back as {got.dtype}"
            else:
                how = "the gradient is float64 again, but its digits past the 7th are gone"
            where = expected_got(f"rank {r}, parameter {n!r}, element {fmt_index(index)}", e, g)
            return (f"the average lost precision: with gradients that need float64's digits (rank-dependent "
                    f"parts of about 1e-9), {where} (relative error {abs(g - e) / abs(e):.1e}; {how}). That is "
                    f"what an all-reduce in float32 (about 7 digits) or bfloat16 (about 3) leaves. All-reduce "
                    f"p.grad itself, in its own dtype.")
    for r in range(N):
        unused = reports[r]["unused"]
        if "error" in unused:
            return (f"with parameter {_UNUSED!r} unused by the loss (its p.grad is None, as for a frozen or unused "
                    f"parameter) your function raised {unused['error']} on rank {r}. A parameter without a "
                    f"gradient has nothing to average: skip it (if p.grad is None: continue).")
        if unused["grads"][_UNUSED] is not None:
            return (f"with parameter {_UNUSED!r} unused by the loss (p.grad is None), your function gave it a "
                    f"gradient on rank {r}. Leave p.grad None where it is None: skip the parameter.")
        _, main_mean = _gradients(N)
        for n in names:
            got = unused["grads"][n]
            if n != _UNUSED and (got is None or not _close(got, main_mean[n])):
                where = _where(r, n, main_mean[n], got) if got is not None else f"{n!r} has no gradient"
                return (f"with parameter {_UNUSED!r} unused by the loss (p.grad is None), the other parameters were "
                        f"not averaged on rank {r} ({where}). Skip only the parameters whose gradient is None, "
                        f"and average the rest.")
    return None


def check_average_gradients(student_fn, *, world_sizes=(1, 2, 3, 4), timeout: float = 5.0) -> None:
    """Check exercise 1a: ``student_fn(model)`` averages every ``p.grad`` over the ranks, in place.

    On each world size N, each rank builds the same model (parameters of shapes (3, 4), (3,), (), and
    (2, 2, 2), float64) with rank-dependent known gradients, calls ``student_fn(model)``, and reports
    what its gradients became. The checker compares with the exact mean (1/N) Σ g_i and names the
    mistake. Two more calls test the other rules: gradients with parts of about 1e-9 (an average
    computed in float32 or bfloat16 loses them), and a parameter whose gradient is None (skipped).
    ``timeout``: seconds a rank may wait in a collective (a rank that skips one is reported).
    """
    __tracebackhide__ = True  # IPython and pytest show the message, not the checker's frames
    name = getattr(student_fn, "__name__", "your function")
    if not callable(student_fn):
        fail(f"check_average_gradients needs your function, not {type(student_fn).__name__}")
    for N in world_sizes:
        reports = run_on_ranks(_average_gradients_worker, student_fn, world_size=N, timeout=timeout, name=name)
        problem = _diagnose_average(N, reports)
        if not problem:
            probes = run_on_ranks(_probes_worker, student_fn, world_size=N, timeout=timeout, name=name)
            problem = _diagnose_probes(N, probes)
        if problem:
            fail(f"{name} is wrong on {N} process{'es' if N > 1 else ''}: {problem}")
    passed(f"{name} is correct on world sizes {', '.join(str(n) for n in world_sizes)}")


# ============================================================================================
# 1b. shard_indices(num_samples, rank, world_size, epoch, seed=0): this rank's samples this epoch
# ============================================================================================

# Readable cases first (the first failure is the one reported), then the edge cases:
# num_samples not divisible by world_size, and num_samples < world_size (some shards empty).
_NUM_SAMPLES = (10, 7, 16, 33, 100, 5, 3, 2, 1)
_WORLD_SIZES = (1, 2, 3, 4, 5, 8)
_EPOCHS = (0, 1, 2)
_PROBE = 40  # num_samples used to tell "each rank shuffles differently" from "wrong slicing"


class _Caller:
    """Calls the student's function, turns what it returns into a list of ints (or fails with a
    message that names the call), and remembers the answers."""

    def __init__(self, fn, name: str):
        self.fn, self.name, self.cache = fn, name, {}

    def describe(self, n, rank, world_size, epoch, seed=0) -> str:
        return call_repr(self.name, n, rank, world_size, epoch, seed=seed)

    def __call__(self, n, rank, world_size, epoch, seed=0) -> list[int]:
        __tracebackhide__ = True
        key = (n, rank, world_size, epoch, seed)
        if key not in self.cache:
            self.cache[key] = self.fresh(*key)
        return self.cache[key]

    def fresh(self, n, rank, world_size, epoch, seed=0) -> list[int]:
        __tracebackhide__ = True
        call = self.describe(n, rank, world_size, epoch, seed)
        try:
            result = self.fn(n, rank, world_size, epoch, seed=seed)
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the student's traceback chained
            raise CheckFailed(f"{call} raised {type(exc).__name__}: {exc}") from exc
        return _as_indices(result, call)


def _as_indices(result, call: str) -> list[int]:
    __tracebackhide__ = True
    if result is None:
        fail(f"{call} returned None: did you forget to return the list of indices?")
    if isinstance(result, (set, frozenset)):
        fail(f"{call} returned a set: return a list, whose order is the order in which the rank visits its samples")
    if isinstance(result, torch.Tensor) or (hasattr(result, "ndim") and hasattr(result, "tolist")):
        if result.ndim != 1:
            fail(f"{call} returned an array of shape {tuple(result.shape)}: return a 1-D list of indices")
        kind = str(result.dtype)
        if "int" not in kind or "bool" in kind:
            fail(f"{call} returned an array of dtype {kind}: indices must be integers")
        result = result.tolist()
    if isinstance(result, (str, bytes, dict)) or not isinstance(result, (list, tuple, range)):
        fail(f"{call} returned a {type(result).__name__}: expected a list of int indices")
    out = []
    for i, v in enumerate(result):
        try:
            if isinstance(v, (bool, float)):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            fail(f"{call} returned a list whose item {i} is {v!r} ({type(v).__name__}): indices must be ints")
    return out


def _listing(calls_text: str, shards: list[list[int]], limit: int = 16) -> str:
    """The shards of one case, one rank per line, under the calls that made them."""
    if sum(len(s) for s in shards) > 4 * limit:
        return ""
    lines = [f"  {calls_text}:"] + [f"    rank {r}: {fmt_list(s, limit)}" for r, s in enumerate(shards)]
    return "\n" + "\n".join(lines)


def _rank_not_in_common_permutation(calls: _Caller, world_size: int, epoch: int) -> int | None:
    """The first rank whose shard is not a slice (contiguous, or every k-th) of the permutation that
    rank 0 draws, i.e. of ``shard(PROBE, 0, 1, epoch)``; None when every shard is one."""
    perm = calls(_PROBE, 0, 1, epoch)
    if sorted(perm) != list(range(_PROBE)):
        return None
    position = {v: k for k, v in enumerate(perm)}
    for r in range(world_size):
        shard = calls(_PROBE, r, world_size, epoch)
        if len(shard) < 3 or any(v not in position for v in shard):
            continue
        p = [position[v] for v in shard]
        step = p[1] - p[0]
        if step <= 0 or any(b - a != step for a, b in zip(p, p[1:])):
            return r
    return None


def _check_partition(calls: _Caller, n: int, world_size: int, epoch: int) -> None:
    """The shards of one (num_samples, world_size, epoch): in range, disjoint, complete, balanced."""
    __tracebackhide__ = True
    shards = [calls(n, r, world_size, epoch) for r in range(world_size)]
    calls_text = f"{calls.name}({n}, rank, {world_size}, {epoch}) for rank in range({world_size})"
    listing = _listing(calls_text, shards)
    for r, shard in enumerate(shards):
        outside = [i for i in shard if not 0 <= i < n]
        if outside:
            fail(f"rank {r} got index {outside[0]}, outside range({n}): indices must be 0 ... num_samples - 1."
                 f"{listing or ' ' + calls.describe(n, r, world_size, epoch) + ' = ' + fmt_list(shard)}")
        counts = Counter(shard)
        twice = [i for i, c in counts.items() if c > 1]
        if twice:
            times = "twice" if counts[twice[0]] == 2 else f"{counts[twice[0]]} times"
            fail(f"rank {r}'s shard contains index {twice[0]} {times}: a shard must not repeat a sample."
                 f"{listing or ' ' + calls.describe(n, r, world_size, epoch) + ' = ' + fmt_list(shard)}")
    owner: dict[int, int] = {}
    for r, shard in enumerate(shards):
        for i in shard:
            if i in owner:
                fail(_overlap_message(calls, n, world_size, epoch, owner[i], r, i, shards) + listing)
            owner[i] = r
    sizes = [len(s) for s in shards]
    missing = sorted(set(range(n)) - set(owner))
    if missing:
        what = f"index {missing[0]} is" if len(missing) == 1 else f"indices {fmt_list(missing)[1:-1]} are"
        msg = f"{what} in no rank's shard: together the shards must be exactly range({n})."
        q, rest = divmod(n, world_size)
        if len(missing) == rest and all(s == q for s in sizes):
            first = "rank" if rest == 1 else f"{rest} ranks"
            msg += (f" Every rank got num_samples // world_size = {q} samples, so the remainder ({rest}) was "
                    f"dropped. Here no sample may be dropped: let the first {first} take one sample more "
                    f"(order[rank::world_size] does this by itself).")
        fail(msg + listing)
    if max(sizes) - min(sizes) > 1:
        fail(f"shard sizes {sizes} differ by more than one: with {n} samples on {world_size} ranks every rank "
             f"must get {n // world_size} or {math.ceil(n / world_size)} samples, or the ranks take different "
             f"numbers of steps.{listing}")


def _overlap_message(calls, n, world_size, epoch, r1, r2, index, shards) -> str:
    msg = f"ranks {r1} and {r2} both got index {index}"
    sizes = [len(s) for s in shards]
    if world_size > 1 and sum(sizes) > n and all(s == math.ceil(n / world_size) for s in sizes):
        return (msg + f": every rank got ⌈{n}/{world_size}⌉ = {sizes[0]} samples, {sum(sizes)} in all for {n} "
                f"samples, so some samples were padded (repeated) as DistributedSampler does by default. Here the "
                f"shards must not repeat samples: they may differ in size by one.")
    rank = _rank_not_in_common_permutation(calls, world_size, epoch)
    if rank is not None:
        return (msg + f": each rank shuffles differently (rank {rank}'s shard is not a part of the permutation "
                f"that rank 0 draws). Does your seed depend on the rank? Every rank must draw the same "
                f"permutation (a generator seeded with seed + epoch, never with the rank) and then take its own "
                f"part of it; only then are the shards disjoint.")
    return msg + ": shards must be disjoint, every sample belongs to exactly one rank."


def check_shard_indices(student_fn, *, num_samples=_NUM_SAMPLES, world_sizes=_WORLD_SIZES,
                        epochs=_EPOCHS) -> None:
    """Check exercise 1b: ``student_fn(num_samples, rank, world_size, epoch, seed=0)`` returns the indices
    of ``rank``'s shard for ``epoch``, as ``labkit.data_parallel.shard_indices(mode="uneven")`` does.

    For every (num_samples, world_size, epoch): the shards are disjoint, together exactly
    range(num_samples), and differ in size by at most one. Then: the result depends only on the
    arguments, the order is shuffled, changes with the epoch (and the samples each rank gets do
    too), and changes with the seed. Any way of splitting one shared permutation passes.
    """
    __tracebackhide__ = True  # IPython and pytest show the message, not the checker's frames
    name = getattr(student_fn, "__name__", "your function")
    if not callable(student_fn):
        fail(f"check_shard_indices needs your function, not {type(student_fn).__name__}")
    calls = _Caller(student_fn, name)

    # Pure: every rank computes its shard on its own, so the answer must depend on the arguments only.
    first, again = calls(33, 1, 4, 0), calls.fresh(33, 1, 4, 0)
    if first != again:
        fail(f"calling {calls.describe(33, 1, 4, 0)} twice gave two different shards ({fmt_list(first)} and "
             f"{fmt_list(again)}). Every rank computes its shard in its own process, so the permutation must "
             f"come from the arguments only: torch.randperm(num_samples, generator=torch.Generator()"
             f".manual_seed(seed + epoch)), not from the global random state.")

    cases = 0
    for n in num_samples:
        for ws in world_sizes:
            for epoch in epochs:
                _check_partition(calls, n, ws, epoch)
                cases += 1

    n, ws = 100, 4
    epoch0 = [calls(n, r, ws, 0) for r in range(ws)]
    whole = calls(n, 0, 1, 0)
    if whole == list(range(n)) or all(s == sorted(s) for s in epoch0):
        fail(f"the indices are not shuffled: {calls.describe(n, 0, ws, 0)} = {fmt_list(epoch0[0])}, in increasing "
             f"order. Shuffle first: draw one permutation, torch.randperm(num_samples, "
             f"generator=torch.Generator().manual_seed(seed + epoch)), then take this rank's part of it.")
    epoch1 = [calls(n, r, ws, 1) for r in range(ws)]
    if epoch0 == epoch1:
        fail(f"epoch 0 and epoch 1 give the same order ({calls.describe(n, 0, ws, 0)} and "
             f"{calls.describe(n, 0, ws, 1)} both = {fmt_list(epoch0[0])}): did you forget to use the epoch, as "
             f"DistributedSampler.set_epoch does? Seed the permutation with seed + epoch, so that every epoch "
             f"visits the samples in a new order.")
    if all(set(a) == set(b) for a, b in zip(epoch0, epoch1)):
        fail(f"every rank gets the same samples in epoch 0 and in epoch 1, only in another order (rank 0: "
             f"{fmt_list(sorted(epoch0[0]))} both times). Shuffle the whole data set, then split it: each epoch "
             f"every rank should see a new random part of the data.")
    seed1 = [calls(n, r, ws, 0, seed=1) for r in range(ws)]
    if seed1 == epoch0:
        fail(f"seed=1 gives the same shards as seed=0 ({calls.describe(n, 0, ws, 0, seed=1)} = "
             f"{fmt_list(seed1[0])}): your function ignores its seed. Seed the permutation with seed + epoch.")

    passed(f"{name} is correct: {cases} cases (num_samples {min(num_samples)} to {max(num_samples)}, world sizes "
           f"{min(world_sizes)} to {max(world_sizes)}, epochs {min(epochs)} to {max(epochs)}) give disjoint, "
           f"complete, balanced shards, reshuffled every epoch")


# ============================================================================================
# 1c. Design: the average when the ranks hold different numbers of samples
# ============================================================================================
# The task: average_gradients_uneven(model, local_count). Rank r's p.grad holds the gradient of the mean loss over
# its own b_r = local_count samples (b_r may be 0: an empty batch's backward leaves p.grad = 0); afterwards every
# rank's p.grad must be the gradient of the mean loss over all B = Σ b_r samples. Checked on real processes against
# one process on the whole batch, not against a formula: any communication that gives it passes. The known wrong
# versions are small changes of labkit.data_parallel.weighted_average_gradients (send b_r·g_r, all-reduce, divide by
# the all-reduced B): each row says what rank r sends and what it divides the sum by, and the checker computes what
# that gives on every rank from the ranks' local gradients. The mistakes of a rank with no samples show as a
# symptom instead: a skipped collective (the others wait: the Watch names it) or a division by its count (raised).

UNEVEN_CASES = ((5, 2, 0), (0, 3, 1), (3, 3, 3), (7, 1), (2, 2))   # each rank's local count; len = world size
_FEATURES = 3
_START_W, _START_B = (0.5, -0.25, 1.0), 0.25     # common weights, not the optimum: every gradient is nonzero
_UNEVEN_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "barrier", "send", "recv", "isend", "irecv")


class Weighting(NamedTuple):
    """A wrong version as a change of labkit's ``weighted_average_gradients``: rank r all-reduces (sums)
    ``weight(b_r)``·g_r and divides the sum by ``divisor(B, N, b_r)`` (labkit's: b_r and B)."""
    weight: Callable[[int], float]
    divisor: Callable[[int, int, int], float]


_NO_ONE_KNOWS = "which no rank knows alone"

# Tried in order where some rank's gradient is wrong; a row matches when it gives every rank's gradient (its inf and
# nan included). Texts formatted with head, where (the first wrong element), N, B, zero (what a rank without samples
# got, or ""), and for the plain mean big, small (two ranks' counts) and their per-sample weights nb_big, nb_small.
UNEVEN_MISTAKES = (
    Mistake("the plain mean", Weighting(lambda b: 1, lambda B, N, b: N),
            "{head}: this is the plain mean of the ranks' gradients, (1/N) Σ g_r, as in 1a ({where}). It is one "
            "process's gradient only when every rank holds the same number of samples: here each sample of rank "
            "{big} counts 1/{nb_big} in your average and each sample of rank {small} 1/{nb_small}, while one process "
            "on the whole batch counts every sample 1/B = 1/{B}."),
    Mistake("divided by N", Weighting(lambda b: b, lambda B, N, b: N),
            "{head}: on every rank your gradient is B/N = {B}/{N} times one process's ({where}): you divided "
            "Σ b_r g_r by the number of ranks, N = {N}. Σ b_r g_r is the gradient of the loss summed over all "
            "B = {B} samples; the mean loss of the whole batch is that sum divided by the number of samples."),
    Mistake("weighted, then averaged", Weighting(lambda b: b, lambda B, N, b: N * B),
            "{head}: on every rank your gradient is 1/N = 1/{N} of one process's ({where}): after the weights b_r/B "
            "the sum is already the whole batch's mean, and dividing by N once more (1a's mean of the weighted "
            "gradients, or ReduceOp.AVG) counts every sample 1/(N·B) instead of 1/B."),
    Mistake("divided by N·b_r", Weighting(lambda b: b, lambda B, N, b: N * b),
            "{head}: the ranks end with different gradients ({where}): each rank divided Σ b_r g_r by N·b_r, as if "
            "every rank held as many samples as itself. That is the number of samples B only when the counts are "
            "equal; here B = {B}, " + _NO_ONE_KNOWS + ": the ranks must tell each other their counts.{zero}"),
    Mistake("divided by the local count", Weighting(lambda b: b, lambda B, N, b: b),
            "{head}: the ranks end with different gradients ({where}): each rank divided Σ b_r g_r by its own count "
            "b_r, not by the number of samples of the whole batch, B = {B}, " + _NO_ONE_KNOWS + ".{zero}"),
    Mistake("not divided", Weighting(lambda b: b, lambda B, N, b: 1),
            "{head}: on every rank your gradient is B = {B} times one process's ({where}): Σ b_r g_r is the gradient "
            "of the loss summed over the samples; one process differentiates their mean loss, the sum divided by "
            "its B samples."),
)

# A rank with no samples: what it did wrong shows as a symptom, named where it shows (the variant: a short
# description for the tests' table; the wrong versions themselves are in tests/test_checks_ex01.py).
ZERO_RANK_MISTAKES = (
    Mistake("skips the collectives", "returns early when local_count == 0",
            "→ {rank} holds no samples (local_count = 0) and went on without the collectives the others wait in: "
            "a rank with nothing to add is still one of the N ranks, it must make every call the others make (its "
            "contribution is zero), and it takes the same step, so it needs the result too."),
    Mistake("divides by its zero count", "divides by local_count in Python numbers",
            "{head}: rank {rank} holds no samples (local_count = 0) and your function divided by its count: "
            "{error}. A rank with no samples has no mean of its own to rescale, but its share of the whole batch's "
            "gradient is simply zero: compute it without dividing by b_r, and make the same collectives as the "
            "others."),
)


def _counts(counts) -> str:
    return "(" + ", ".join(str(b) for b in counts) + ")"


def _uneven_head(name: str, counts) -> str:
    N = len(counts)
    return f"{name} on {N} process{'es' if N > 1 else ''} with local counts {_counts(counts)} (B = {sum(counts)})"


def _uneven_data(index: int, counts) -> tuple[torch.Tensor, torch.Tensor]:
    X, y, _, _ = make_linear_data(sum(counts), _FEATURES, seed=10 + index, dtype=torch.float64)
    return X, y


def _uneven_model(X: torch.Tensor, y: torch.Tensor, counts, rank: int | None) -> LinearRegression:
    """The common model after the backward of rank ``rank``'s mean loss (its rows of X, maybe none), or of the
    whole batch's (``rank`` None: one process)."""
    model = LinearRegression(_FEATURES, dtype=torch.float64)
    with torch.no_grad():
        model.w.copy_(torch.tensor(_START_W, dtype=torch.float64))
        model.b.fill_(_START_B)
    rows = slice(None) if rank is None else slice(sum(counts[:rank]), sum(counts[:rank + 1]))
    model.loss(X[rows], y[rows]).backward()     # an empty batch: the loss is nan, p.grad is 0
    return model


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


class _UnevenWatch(Watch):
    """Names a rank without samples that went on without the others' collectives."""
    counts: tuple = ()

    def stuck_hints(self, states: dict[int, dict]) -> list[str]:
        hints = super().stuck_hints(states)
        says = ZERO_RANK_MISTAKES[0].says
        return hints + [says.format(rank=self.rank_name(r)) for r, s in sorted(states.items())
                        if s["state"] in ("returned", "checking") and self.counts[r] == 0]


def _uneven_worker(student_fn, cases: list, name: str, timeout: float, board_path: str) -> list[dict]:
    """On each rank, for each (index, counts): the model after this rank's backward, the student's function, what
    it left (the gradients, changed weights, the calls made); the ranks meet after each call."""
    rank, N = dist.get_rank(), dist.get_world_size()
    watch = _UnevenWatch(_UNEVEN_OPS, deadline=0.5 * timeout, board=Board(board_path, rank, N), comm_too=True,
                         hint_checking=True)
    records = []
    for index, counts in cases:
        X, y = _uneven_data(index, counts)
        model = _uneven_model(X, y, counts, rank)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        watch.counts, watch.phase = counts, f"the call with local counts {_counts(counts)}"
        start = len(watch.calls)
        seconds = 0.6 * timeout
        watch.running()
        try:
            with watch.installed(), time_limit(seconds, f"{name}(model, {counts[rank]}) did not return within "
                                                        f"{seconds:g} s on rank {rank}: an endless loop?"):
                student_fn(model, counts[rank])
        except ZeroDivisionError as err:
            if counts[rank]:
                raise
            raise CheckFailed(ZERO_RANK_MISTAKES[1].says.format(
                head=_uneven_head(name, counts), rank=rank, error=f"ZeroDivisionError ({err})")) from err
        watch.returned()
        records.append(dict(
            grads={n: keep(p.grad) for n, p in model.named_parameters()},
            changed=[n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])],
            calls=[c.op for c in watch.calls[start:]]))
        watch.checking()
        everyone(None, watch)   # every rank made as many calls (else named), before the next case pairs with them
    return records


def _same(want: torch.Tensor, got) -> bool:
    """Equal within the tolerances, with the same nan and the same infinities (a division by zero)."""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return False
    w, g = want.to(torch.float64), got.detach().to(torch.float64)
    inf = torch.isinf(w)
    if not (torch.equal(torch.isnan(w), torch.isnan(g)) and torch.equal(inf, torch.isinf(g))
            and torch.equal(w[inf], g[inf])):
        return False
    finite = torch.isfinite(w)
    return close(w[finite], g[finite], _RTOL, _ATOL)


def _weighted(local: list[dict], counts, rank: int, row: Weighting) -> dict:
    """What rank ``rank`` holds after a :class:`Weighting`: Σ_s weight(b_s) g_s / divisor(B, N, b_rank), with IEEE's
    inf and nan where the divisor is 0 (as ``p.grad /= 0`` gives)."""
    N, B = len(counts), sum(counts)
    divisor = torch.tensor(float(row.divisor(B, N, counts[rank])), dtype=torch.float64)
    return {n: sum(row.weight(b) * g[n] for b, g in zip(counts, local)) / divisor for n in local[0]}


def _not_finite(got) -> str:
    kinds = [k for k, test in (("inf", torch.isinf), ("nan", torch.isnan))
             if isinstance(got, torch.Tensor) and got.is_floating_point() and bool(test(got).any())]
    return " and ".join(kinds)


def _diagnose_uneven(name: str, index: int, counts, records: list[dict]) -> tuple[str | None, float]:
    """(None, the largest relative difference) when every rank holds one process's gradient; else (the mistake, 0)."""
    N, B = len(counts), sum(counts)
    head = _uneven_head(name, counts)
    X, y = _uneven_data(index, counts)
    want = _grads(_uneven_model(X, y, counts, None))
    names = list(want)
    got = [rec["grads"] for rec in records]
    for r in range(N):
        for n in names:
            g = got[r][n]
            if g is None:
                return (f"{head}: on rank {r} parameter {n!r} has no gradient after your function (p.grad is None): "
                        f"every rank must end with the whole batch's gradient in p.grad, the ranks without samples "
                        f"too (they take the same step)."), 0.0
            if not isinstance(g, torch.Tensor) or g.shape != want[n].shape:
                return (f"{head}: {element_text(f'on rank {r}, p.grad of {n!r}', want[n], g)}: p.grad must keep "
                        f"its parameter's shape."), 0.0
            if g.dtype != want[n].dtype:
                return (f"{head}: on rank {r}, p.grad of {n!r} has dtype {g.dtype}: keep the gradient's own dtype, "
                        f"torch.float64 (the check compares 12 digits)."), 0.0
        if records[r]["changed"]:
            return (f"{head}: on rank {r} your function changed the parameter(s) {_names(records[r]['changed'])} "
                    f"themselves, not only their .grad: set p.grad and leave the step to the optimizer."), 0.0
    wrong = [(r, n) for r in range(N) for n in names if not _same(want[n], got[r][n])]
    if not wrong:
        worst = max(((want[n] - got[r][n]).abs().max() / want[n].abs().max()).item()
                    for r in range(N) for n in names)
        return None, worst
    r, n = wrong[0]
    index, e, g = first_mismatch(want[n], got[r][n], _RTOL, _ATOL)
    e, g = fmt_pair(e, g)
    where = f"rank {r}, parameter {n}{fmt_index(index) if index else ''}: one process on the whole batch gives {e}, " \
        f"yours {g}"
    zero = " ".join(f"Rank {z}, which holds no samples, divided by 0: its p.grad holds {_not_finite(got[z][m])}."
                    for z in range(N) if counts[z] == 0
                    for m in names[:1] if _not_finite(got[z][m]))
    zero = " " + zero if zero else ""
    local = [_grads(_uneven_model(X, y, counts, s)) for s in range(N)]
    mistake = find_mistake(UNEVEN_MISTAKES, lambda row: all(
        _same(_weighted(local, counts, s, row.variant)[m], got[s][m]) for s in range(N) for m in names))
    if mistake is not None:
        with_samples = sorted((b, s) for s, b in enumerate(counts) if b)
        (b_small, small), (b_big, big) = with_samples[0], with_samples[-1]
        return mistake.says.format(head=head, where=where, N=N, B=B, zero=zero, big=big, small=small,
                                   nb_big=N * b_big, nb_small=N * b_small), 0.0
    for m in names:      # the ranks disagree: they would take different steps
        stacked = torch.stack([got[s][m].to(torch.float64).reshape(-1) for s in range(N)])
        if not all(_same(stacked[0], stacked[s]) for s in range(1, N)):
            s = next(s for s in range(1, N) if not _same(stacked[0], stacked[s]))
            index, a, b = first_mismatch(got[0][m], got[s][m], _RTOL, _ATOL) or ((), math.nan, math.nan)
            a, b = fmt_pair(a, b)
            return (f"{head}: the ranks end with different gradients (parameter {m!r}, element {fmt_index(index)}: "
                    f"rank 0 has {a}, rank {s} has {b}, one process {fmt_number(want[m][index].item(), 9)}). Every "
                    f"rank must end with the same gradient, the whole batch's: they all take the same step, or the "
                    f"replicas drift apart.{zero}"), 0.0
    c = factor(want[n], got[r][n])
    scaled = f" On every rank your gradient is {fmt_number(c)} times one process's." if c is not None and all(
        _same(c * want[m], got[s][m]) for s in range(N) for m in names) else ""
    return f"{head}: {where}.{scaled}{zero}", 0.0


def check_average_gradients_uneven(student_fn, *, cases=UNEVEN_CASES, timeout: float = 5.0) -> None:
    """Check exercise 1c: ``student_fn(model, local_count)``, called on every rank after the backward of the mean
    loss over its own ``local_count`` samples (maybe 0), leaves in every rank's ``p.grad`` the gradient of the mean
    loss over all the ranks' samples: one process's on the whole batch.

    Each tuple of ``cases`` is one call on ``len(tuple)`` processes (``LinearRegression``, float64, common
    weights; rank r holds the next ``tuple[r]`` rows of the data). Every rank's gradient is compared with one
    process's; a wrong one is matched against :data:`UNEVEN_MISTAKES`; a rank without samples that skips a collective
    is named after ``timeout / 2`` seconds, one that divides by its count when it raises."""
    __tracebackhide__ = True
    name = need_function(student_fn, "check_average_gradients_uneven")
    if student_fn is weighted_average_gradients:
        fail("this is labkit's own weighted_average_gradients (lesson 1): write your own")
    worlds: dict[int, list] = {}
    for index, counts in enumerate(cases):
        worlds.setdefault(len(counts), []).append((index, tuple(counts)))
    worst, calls = 0.0, set()
    for N, indexed in worlds.items():
        with board_dir() as path:
            per_rank = run_on_ranks(_uneven_worker, student_fn, indexed, name, timeout, path, world_size=N,
                                    timeout=timeout, name=name, task="1c", device="cpu")
        for k, (index, counts) in enumerate(indexed):
            problem, w = _diagnose_uneven(name, index, counts, [per_rank[r][k] for r in range(N)])
            if problem:
                fail(problem)
            worst = max(worst, w)
            calls |= {len(per_rank[r][k]["calls"]) for r in range(N)}
    shown = "; ".join(f"{N} processes with " + ", ".join(_counts(c) for _, c in indexed)
                      for N, indexed in worlds.items())
    most = max(calls)
    how = "one, the fewest" if most == 1 else f"{most}; one is enough: can everything travel in the same buffer?"
    passed(f"{name} gives every rank the whole batch's gradient ({shown}; a rank with 0 samples included): one "
           f"process's within {bound(worst)}. Collective calls per call: {how}")
