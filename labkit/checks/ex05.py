"""Checkers for exercise 5, Megatron's tensor-parallel linear layers (``solutions/05_tensor_parallel_exercise.ipynb``).

    check_f_and_g(CopyToParallel, ReduceFromParallel)             # 5a-5d: the conjugate operators f and g
    check_column_parallel(ColumnParallelLinear)                   # 5e, 5f: shard and forward
    check_row_parallel(RowParallelLinear)                         # 5g, 5h: shard and forward
    check_parallel_mlp(ColumnParallelLinear, RowParallelLinear)   # column -> GELU -> row against a dense MLP

Each prints one ``✓`` line when the code is right and raises :class:`labkit.checks.CheckFailed` naming the
mistake when it is not.

What the student writes. ``f`` and ``g`` are ``torch.autograd.Function`` subclasses called as
``f.apply(x, group)``: f's forward is the identity and its backward all-reduces (sums) the gradient over
``group``; g's forward all-reduces (sums) and its backward is the identity. The layers subclass labkit's
(:class:`labkit.tensor_parallel.ColumnParallelLinear`, :class:`~labkit.tensor_parallel.RowParallelLinear`):
``cls(linear, group)`` is labkit's ``__init__``, which calls the student's ``shard(tensor)`` to keep this rank's
part of the dense weight (and, for the column layer, of the bias); the student writes ``shard`` and ``forward``
(with their own f and g). labkit's own classes are the reference: a forward is checked with labkit's shards, a
shard with labkit's ``__init__``, and the expected shards are :func:`~labkit.tensor_parallel.shard_rows` and
:func:`~labkit.tensor_parallel.shard_columns`; on 4 processes the layers are also built in groups of 2.

What runs. Every check runs on 3, 2, 4 and 1 real processes (:data:`WORLD_SIZES`, one launch each, stopping
at the first world size with a problem), in float64, against the dense computation: an ``nn.Linear`` or a
dense MLP (Linear -> GELU -> Linear) that every rank builds from the same seed. The workers compute and return
what the student's code produced (the shards, outputs, input gradient and every weight and bias gradient);
the parent compares them with the dense values (the gradients sliced as the shards are), and names the first
problem: which rank, which tensor, which element, expected versus got. On 4 processes :func:`check_f_and_g`
and :func:`check_parallel_mlp` also run in two tensor-parallel groups of 2 ranks ({0, 1} and {2, 3}, each with
its own data), which tells whether ``group`` is used.

How the known mistakes are named: from the numbers, not from the source. A wrong tensor is compared with what
each known mistake produces (a rank's own partial sum; 1/tp or tp times the answer; the bias added tp times;
another rank's slice; the other dimension's slice), and ``dist.all_reduce`` is wrapped in the workers to count
the all-reduces of the forward and of the backward pass and the size of their group. A gradient changed in
place by f's backward is caught in ``out = x + f(x)`` (x used twice, as in a residual connection), where
autograd hands the same gradient tensor to both branches; g's forward must leave its input as it was.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from labkit import comm
from labkit.checks import (CheckFailed, fail, first_mismatch, fmt_index, fmt_number, fmt_pair, passed, run_on_ranks,
                           student_traceback, time_limit, time_limit_paused)
from labkit.tensor_parallel import (ColumnParallelLinear, CopyToParallel, ReduceFromParallel, RowParallelLinear,
                                    grid_groups, shard_columns, shard_rows)

__all__ = ["check_f_and_g", "check_column_parallel", "check_row_parallel", "check_parallel_mlp", "WORLD_SIZES"]

# 3 first: its messages read best (a factor 3 is unmistakable, rank 1 sits between two others); 1 last.
WORLD_SIZES = (3, 2, 4, 1)
C, H = 12, 24            # model width and hidden width: divisible by 1, 2, 3 and 4
BT = (2, 3)              # the leading dimensions of the inputs (batch, sequence)
_RTOL, _ATOL = 1e-9, 1e-12
_SUBGROUPS = "tensor-parallel groups of 2: ranks {0, 1} and {2, 3}, each group with its own data"


# ============================================================================================
# Inside the workers
# ============================================================================================

def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).double()


class _Watch:
    """Inside ``with``: ``dist.all_reduce`` and the all-gathers record every call (the checker's phase, the
    collective, the size of the group, the op) and then do it. An all-gather followed by a sum is as good as an
    all-reduce: what is checked is that the ranks communicated, where and over which group, not which call."""

    _GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_single")

    def __init__(self):
        self.phase = "setup"
        self.calls: list = []
        self._original = {}

    def _record(self, kind: str, tensor, group, op=dist.ReduceOp.SUM) -> None:
        self.calls.append(dict(phase=self.phase, kind=kind, numel=tensor.numel(), group=dist.get_world_size(group),
                               sum=op == dist.ReduceOp.SUM, op=str(op)))

    def __call__(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        self._record("all-reduce", tensor, group, op)
        with time_limit_paused():       # waiting for a peer is not this rank's endless loop: the launch's timeout
            return self._original["all_reduce"](tensor, op=op, group=group, async_op=async_op)

    def _gather(self, name: str):
        def watched(*args, **kwargs):           # (outputs, tensor, group) as torch's, by position or name
            group = kwargs.get("group", args[2] if len(args) > 2 else None)
            tensor = args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input_tensor"))
            self._record("all-gather", tensor, group)
            with time_limit_paused():
                return self._original[name](*args, **kwargs)
        return watched

    def start(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self):
        for name in ("all_reduce", *self._GATHERS):
            if hasattr(dist, name):
                self._original[name] = getattr(dist, name)
        dist.all_reduce = self
        for name in self._GATHERS:
            if name in self._original:
                setattr(dist, name, self._gather(name))
        return self

    def __exit__(self, *exc):
        for name, fn in self._original.items():
            setattr(dist, name, fn)
        return False


def _collective(records) -> str:
    """"all-reduce" when every recorded collective was one, else "collective" (for the ✓ lines)."""
    kinds = set()

    def walk(x):
        if isinstance(x, dict):
            kinds.update(c["kind"] for c in x.get("calls", []))
        elif isinstance(x, list):
            for item in x:
                walk(item)
    walk(records)
    return "all-reduce" if kinds <= {"all-reduce"} else "collective"


@contextmanager
def _student(seconds: float, what: str):
    """The student's code: stopped after ``seconds`` (an endless loop); a backward that returns the wrong number
    of gradients is explained."""
    try:
        with time_limit(seconds, f"{what} did not return within {seconds:g} s on rank {dist.get_rank()}: an "
                                 f"endless loop?"):
            yield
    except RuntimeError as err:
        if "returned an incorrect number of gradients" in str(err):
            raise CheckFailed(f"{what}: {err}. A Function's backward returns one gradient per input of forward: "
                              f"forward(ctx, x, group) takes x and group, so backward returns (the gradient for x, "
                              f"None), None for group, which is not a tensor.") from None
        raise


def _everyone(obj) -> list:
    """Every rank's ``obj`` (the checker's own collective, not the watched all-reduce)."""
    with time_limit_paused():
        return comm.all_gather_objects(obj)


def _keep(t):
    """What the student returned, detached and copied; a non-tensor as its type name."""
    if isinstance(t, torch.Tensor):
        return t.detach().clone()
    return None if t is None else f"<{type(t).__name__}>"


def _is(t, shape) -> bool:
    return isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape)


def _function_nodes(t) -> int:
    """How many custom autograd Function nodes (f, g) lie in the graph of ``t``."""
    seen, stack, count = set(), [t.grad_fn] if isinstance(t, torch.Tensor) else [], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += isinstance(node, torch.autograd.function.BackwardCFunction)
        stack.extend(n for n, _ in node.next_functions)
    return count


def _groups(world_size: int, grouped: bool):
    """(group, members, this rank's index in it): the world, or the 2-rank group of :data:`_SUBGROUPS`."""
    rank = dist.get_rank()
    if not grouped:
        return None, list(range(world_size)), rank
    tp_group, _ = grid_groups(2, 2)
    first = rank // 2 * 2
    return tp_group, [first, first + 1], rank - first


# --- stubs: an unfinished exercise reads as unfinished, with every unwritten piece named -----------------

def _not_written(probes, err: NotImplementedError) -> NotImplementedError:
    """The stub that stopped the check, plus every other piece of ``probes`` that is not written yet.
    ``probes``: [(task, what, call)], each call running one piece with labkit's version of the others."""
    found = []
    for task, what, call in probes:
        try:
            call()
        except NotImplementedError as e:
            found.append(str(e) if str(e).startswith("Exercise ") else
                         f"Exercise {task}: {what} is not written yet (it raised {_repr_nie(e)}); see the "
                         f"instructions above")
        except Exception:  # noqa: BLE001 - written (maybe wrong): the check itself will say
            pass
    if not found:
        found = [str(err) if str(err).startswith("Exercise ") else
                 f"Exercise 5: your code raised {_repr_nie(err)}; see the instructions above"]
    found = list(dict.fromkeys(found))
    message = found[0]
    if len(found) > 1:
        message += "\nNot written yet either:\n" + "\n".join(
            "  " + m.removesuffix("; see the instructions above") for m in found[1:])
    return NotImplementedError(message)


def _repr_nie(e) -> str:
    return f"NotImplementedError({str(e)!r})" if str(e) else "NotImplementedError"


def _with_forward(cls, forward):
    """``cls``'s backward behind labkit's ``forward``."""
    return type(cls.__name__, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(cls.backward)})


_LABKIT = {"column": ColumnParallelLinear, "row": RowParallelLinear}


def _bare(cls, dense: nn.Linear, group, kind: str):
    """An instance of the student's layer with labkit's shards, without calling the student's ``shard``."""
    return type(cls.__name__, (cls,), {"shard": _LABKIT[kind].shard})(dense, group)


def _layer_probes(cls, dense, group, kind: str, x):
    shard_task, forward_task = ("5e", "5f") if kind == "column" else ("5g", "5h")
    return [(shard_task, f"{cls.__name__}.shard", lambda: cls(dense, group)),
            (forward_task, f"{cls.__name__}.forward", lambda: _bare(cls, dense, group, kind)(x))]


# --- 5a-5d: f and g --------------------------------------------------------------------------------------

def _f_and_g_worker(f_cls, g_cls, seconds: float) -> list:
    N = dist.get_world_size()
    cases = []
    for grouped in ((False, True) if N == 4 else (False,)):
        group, members, _ = _groups(N, grouped)
        x = _randn(4, 6, seed=1)
        probes = [("5a", f"{f_cls.__name__}.forward", lambda: f_cls.apply(x.clone().requires_grad_(), group)),
                  ("5b", f"{f_cls.__name__}.backward",
                   lambda: _with_forward(f_cls, CopyToParallel.forward).apply(x.clone().requires_grad_(), group).sum()
                   .backward()),
                  ("5c", f"{g_cls.__name__}.forward", lambda: g_cls.apply(x.clone().requires_grad_(), group)),
                  ("5d", f"{g_cls.__name__}.backward",
                   lambda: _with_forward(g_cls, ReduceFromParallel.forward).apply(x.clone().requires_grad_(), group)
                   .sum()
                   .backward())]
        try:
            cases.append(_f_and_g_case(f_cls, g_cls, group, members, grouped, seconds))
        except NotImplementedError as err:
            raise _not_written(probes, err) from None
    return cases


def _f_and_g_case(f_cls, g_cls, group, members, grouped: bool, seconds: float) -> dict:
    rank = dist.get_rank()
    first = members[0]                   # the data of a group: seeded by its first rank
    f_name, g_name = f_cls.__name__, g_cls.__name__
    rec = dict(rank=members.index(rank), size=len(members), grouped=grouped)
    with _Watch() as watch:
        rec["calls"] = watch.calls
        # f: the same x on every rank; each rank's own dL/dy (its slice's contribution); dL/dx is their sum
        x = _randn(4, 6, seed=10 + first).requires_grad_()
        dys = {m: _randn(4, 6, seed=100 + m) for m in members}
        watch.start("f forward")
        with _student(seconds, f"{f_name}.apply(x, group)"):
            y = f_cls.apply(x, group)
        rec.update(x=x.detach().clone(), f_out=_keep(y), dy=dys[rank], f_grad_want=sum(dys.values()))
        if _all_ranks(_is(y, x.shape) and y.requires_grad):
            watch.start("f backward")
            with _student(seconds, f"{f_name}.backward (in y = {f_name}.apply(x, group); y.backward(dy))"):
                y.backward(dys[rank].clone())
            rec["f_grad"] = _keep(x.grad)
            # x used twice: out = x + f(x). Autograd hands the same gradient tensor to both branches.
            x2 = _randn(4, 6, seed=20 + first).requires_grad_()
            dy2 = {m: _randn(4, 6, seed=200 + m) for m in members}
            watch.start("f residual forward")
            with _student(seconds, f"{f_name}.apply(x, group)"):
                y2 = f_cls.apply(x2, group)
            handed = []
            y2.register_hook(lambda grad: handed.append((grad, grad.detach().clone())))
            watch.start("f residual backward")
            with _student(seconds, f"{f_name}.backward (in out = x + {f_name}.apply(x, group); out.backward(dy))"):
                (x2 + y2).backward(dy2[rank].clone())
            rec.update(res_grad=_keep(x2.grad), res_want=dy2[rank] + sum(dy2.values()),
                       res_inplace=bool(handed) and not torch.equal(handed[0][0], handed[0][1]))
        # g: each rank's own partial sum x_r; y is their sum; dL/dy is the same on every rank
        xr = _randn(4, 6, seed=400 + rank).requires_grad_()
        before = xr.detach().clone()
        dyg = _randn(4, 6, seed=500 + first)
        watch.start("g forward")
        with _student(seconds, f"{g_name}.apply(x, group)"):
            yg = g_cls.apply(xr, group)
        rec.update(g_in=before, g_in_after=xr.detach().clone(), g_out=_keep(yg),
                   g_out_want=sum(_randn(4, 6, seed=400 + m) for m in members), g_grad_want=dyg)
        if _all_ranks(_is(yg, xr.shape) and yg.requires_grad):
            watch.start("g backward")
            with _student(seconds, f"{g_name}.backward (in y = {g_name}.apply(x, group); y.backward(dy))"):
                yg.backward(dyg.clone())
            rec["g_grad"] = _keep(xr.grad)
    return rec


def _all_ranks(ok: bool) -> bool:
    return all(_everyone(bool(ok)))


# --- 5e-5h: the layers -----------------------------------------------------------------------------------

def _build(cls, dense, group, kind: str, seconds: float) -> dict:
    """``cls(dense, group)``, with this rank's shards; if it raises, what the student's ``shard`` makes of the
    weight alone (the error is often in the bias's line, after a weight sliced along the wrong dimension)."""
    rec = dict(layer=None, error=None)
    try:
        with _student(seconds, f"{cls.__name__}(linear, group)"):
            layer = cls(dense, group)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as err:  # noqa: BLE001 - diagnosed below, then reported with the student's traceback
        rec["error"] = (type(err).__name__, str(err), student_traceback(traceback.format_exc()))
        try:
            with _student(seconds, f"{cls.__name__}.shard(linear.weight)"):
                rec["weight"] = _keep(cls.shard(_bare(cls, dense, group, kind), dense.weight.detach()))
        except Exception:  # noqa: BLE001
            rec["weight"] = None
        rec["bias"] = None
        return rec
    rec.update(layer=layer, weight=_keep(getattr(layer, "weight", None)), bias=_keep(getattr(layer, "bias", None)))
    return rec


def _shards_ok(rec, W, b, kind: str, group) -> bool:
    r, tp = dist.get_rank(group), dist.get_world_size(group)
    want_w, want_b = _want_shards(W, b, kind, r, tp)
    return rec["error"] is None and _same(want_w, rec["weight"]) and _same(want_b, rec["bias"])


def _want_shards(W, b, kind: str, r: int, tp: int):
    """labkit's shards of rank r of tp."""
    if kind == "column":
        return shard_rows(W, r, tp), shard_rows(b, r, tp)
    return shard_columns(W, r, tp), b


def _params(layer) -> dict:
    return {n: getattr(layer, n, None) for n in ("weight", "bias")}


def _layer_worker(cls, kind: str, seconds: float) -> dict:
    rank, N = dist.get_rank(), dist.get_world_size()
    n_in, n_out = (C, H) if kind == "column" else (H, C)
    dense = _linear(n_in, n_out, seed=5)
    W, b = dense.weight.detach().clone(), dense.bias.detach().clone()
    x = _randn(*BT, n_in, seed=6)
    w = _randn(*BT, n_out, seed=7)                    # loss = Σ (dense y) · w
    step_in, step_out = n_in // N, n_out // N
    x_in = x if kind == "column" else x[..., rank * step_in:(rank + 1) * step_in]
    rec = dict(kind=kind, rank=rank, size=N, W=W, b=b, x=x, w=w)
    try:
        with _Watch() as watch:
            rec["calls"] = watch.calls
            built = _build(cls, dense, None, kind, seconds)
            rec.update(weight=built["weight"], bias=built["bias"], error=built["error"])
            if not _all_ranks(_shards_ok(built, W, b, kind, None)):
                return rec
            layer = built["layer"]
            x_in = x_in.clone().requires_grad_()
            watch.start("forward")
            with _student(seconds, f"{cls.__name__}.forward"):
                y = layer(x_in)
            rec.update(y=_keep(y), functions=_function_nodes(y))
            out_shape = (*BT, step_out) if kind == "column" else (*BT, n_out)
            if not _all_ranks(_is(y, out_shape) and y.requires_grad):
                return rec
            dy = w[..., rank * step_out:(rank + 1) * step_out] if kind == "column" else w
            watch.start("backward")
            with _student(seconds, f"{cls.__name__}: y.backward(dy) (backward through your forward)"):
                y.backward(dy.clone())
            rec.update(x_grad=_keep(x_in.grad), grads={n: _keep(None if p is None else p.grad)
                                                       for n, p in _params(layer).items()})
        if N == 4:  # the same layer in groups of 2: the shard is the group's (self.rank), not the world's
            group, _, r = _groups(N, True)
            built = _build(cls, dense, group, kind, seconds)
            rec["group_shard"] = dict(rank=r, weight=built["weight"], bias=built["bias"], error=built["error"])
        return rec
    except NotImplementedError as err:
        raise _not_written(_layer_probes(cls, dense, None, kind, x_in.detach().clone()), err) from None


def _mlp_worker(col_cls, row_cls, seconds: float) -> list:
    N = dist.get_world_size()
    cases = []
    for grouped in ((False, True) if N == 4 else (False,)):
        group, members, r = _groups(N, grouped)
        fc, proj = _linear(C, H, seed=11), _linear(H, C, seed=12)
        x = _randn(*BT, C, seed=13 + members[0])
        w = _randn(*BT, C, seed=14 + members[0])
        try:
            cases.append(_mlp_case(col_cls, row_cls, fc, proj, x, w, group, r, len(members), grouped, seconds))
        except NotImplementedError as err:
            probes = (_layer_probes(col_cls, fc, group, "column", x) +
                      _layer_probes(row_cls, proj, group, "row", x[..., :H // len(members)].clone()))
            raise _not_written(probes, err) from None
    return cases


def _mlp_case(col_cls, row_cls, fc, proj, x, w, group, r: int, tp: int, grouped: bool, seconds: float) -> dict:
    rec = dict(rank=r, size=tp, grouped=grouped, W1=fc.weight.detach().clone(), b1=fc.bias.detach().clone(),
               W2=proj.weight.detach().clone(), b2=proj.bias.detach().clone(), x=x, w=w)
    with _Watch() as watch:
        rec["calls"] = watch.calls
        col = _build(col_cls, fc, group, "column", seconds)
        row = _build(row_cls, proj, group, "row", seconds)
        rec.update(col={k: col[k] for k in ("weight", "bias", "error")},
                   row={k: row[k] for k in ("weight", "bias", "error")})
        if not _all_ranks(_shards_ok(col, rec["W1"], rec["b1"], "column", group) and
                          _shards_ok(row, rec["W2"], rec["b2"], "row", group)):
            return rec
        x_in = x.clone().requires_grad_()
        watch.start("forward")
        with _student(seconds, f"{col_cls.__name__}.forward"):
            h = col["layer"](x_in)
        if not _all_ranks(_is(h, (*BT, H // tp))):
            rec["hidden"] = _keep(h)
            return rec
        with _student(seconds, f"{row_cls.__name__}.forward"):
            y = row["layer"](F.gelu(h))
        rec.update(y=_keep(y), functions=_function_nodes(y))
        if not _all_ranks(_is(y, (*BT, C)) and y.requires_grad):
            return rec
        watch.start("backward")
        with _student(seconds, "y.backward(dy) (backward through your column -> GELU -> row)"):
            y.backward(w.clone())
        rec.update(x_grad=_keep(x_in.grad),
                   grads={f"{part}.{n}": _keep(None if p is None else p.grad)
                          for part, built in (("row", row), ("column", col))
                          for n, p in _params(built["layer"]).items()})
    return rec


# ============================================================================================
# In the parent: comparisons and diagnoses
# ============================================================================================

def _same(want, got) -> bool:
    return (isinstance(got, torch.Tensor) and want.shape == got.shape
            and first_mismatch(want, got, rtol=_RTOL, atol=_ATOL) is None)


def _factor(want, got):
    """c when got = c · want (want not zero), else None."""
    if not (isinstance(got, torch.Tensor) and want.shape == got.shape):
        return None
    den = float((want * want).sum())
    if den == 0:
        return None
    c = float((got * want).sum()) / den
    return c if _same(c * want, got) else None


def _differs(where: str, want, got) -> str:
    """"W[1, 2] is 0.5, expected 0.25" at the first element that differs, or the shapes."""
    if not isinstance(got, torch.Tensor):
        shown = got if isinstance(got, str) else repr(got)
        return f"{where} is {shown}, expected a tensor of shape {tuple(want.shape)}"
    if want.shape != got.shape:
        return f"{where} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    index, e, g = first_mismatch(want, got, rtol=_RTOL, atol=_ATOL)
    e, g = fmt_pair(e, g)
    return f"{where}{fmt_index(index)} is {g}, expected {e}"


def _times(c: float, tp: int) -> str | None:
    """A measured factor as words ("tp times too large (measured factor 3 = tp)" ...), or None for a factor
    with no name."""
    if abs(c - tp) < 1e-6:
        return f"tp times too large (measured factor {fmt_number(round(c, 9))} = tp)"
    if abs(c - 1 / tp) < 1e-6:
        return f"tp times too small (measured factor 1/{tp})"
    if abs(c - tp * tp) < 1e-6:
        return f"tp² times too large (measured factor {fmt_number(round(c, 9))} = tp²)"
    if abs(c) < 1e-12:
        return "zero"
    return None


def _head(name: str, N: int, grouped: bool, verb: str = "is") -> str:
    where = f"on {N} process{'es' if N > 1 else ''} (tp = {N})" if not grouped else f"on 4 processes in {_SUBGROUPS}"
    return f"{name} {verb} wrong {where}"


def _count(calls, phase: str) -> int:
    return sum(c["phase"] == phase for c in calls)


def _phase(phase: str) -> str:
    """A phase of the checker as words: "f backward" -> "f's backward"."""
    return {"f forward": "f's forward", "f backward": "f's backward", "g forward": "g's forward",
            "g backward": "g's backward", "f residual forward": "f's forward (in out = x + f(x))",
            "f residual backward": "f's backward (in out = x + f(x))"}.get(phase, phase)


def _calls_text(calls, phase: str) -> str:
    kinds = [c["kind"] for c in calls if c["phase"] == phase]
    if not kinds or set(kinds) == {"all-reduce"}:
        return f"{len(kinds)} all-reduce{'s' if len(kinds) != 1 else ''} in {_phase(phase)}"
    parts = [f"{kinds.count(k)} {k}{'s' if kinds.count(k) != 1 else ''}" for k in sorted(set(kinds))]
    return f"{' and '.join(parts)} in {_phase(phase)}"


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


def _group_problem(head: str, rec: dict) -> str | None:
    """In the 2-rank groups: an all-reduce over the whole world instead of ``group``."""
    if not rec["grouped"]:
        return None
    wrong = [c for c in rec["calls"] if c["group"] != rec["size"]]
    if not wrong:
        return None
    c = wrong[0]
    return (f"{head}: on rank {rec['world_rank']}, an {c['kind']} in {_phase(c['phase'])} ran over {c['group']} "
            f"ranks, not over the {rec['size']} ranks of `group`: the ranks of the other tensor-parallel group, which work on "
            f"other data, were summed in. Pass the group on: dist.all_reduce(t, group=group) (in backward, the group "
            f"saved in ctx.group), and in the layers CopyToParallel.apply(x, self.group).")


def _op_problem(head: str, rec: dict) -> str | None:
    for c in rec["calls"]:
        if not c["sum"]:
            where = f"{head}: on rank {rec['world_rank']}, dist.all_reduce in {_phase(c['phase'])} was called with op="
            if "AVG" in c["op"]:
                return f"{where}ReduceOp.AVG: {_AVERAGED}."
            return f"{where}{c['op']}: f and g sum (the default op, ReduceOp.SUM)."
    return None


def _f_and_g_problem(names: tuple, N: int, records: list) -> str | None:
    f_name, g_name = names
    for case in range(len(records[0])):
        recs = [rank_records[case] for rank_records in records]
        for world_rank, rec in enumerate(recs):
            rec["world_rank"] = world_rank
        tp, grouped = recs[0]["size"], recs[0]["grouped"]
        head_f = _head(f"{f_name} (f)", N, grouped)
        head_g = _head(f"{g_name} (g)", N, grouped)
        head = _head(f"{f_name} (f) and {g_name} (g)", N, grouped, "are")
        for rec in recs:
            problem = _group_problem(head, rec) or _op_problem(head, rec)
            if problem:
                return problem
        # f's forward
        for rec in recs:
            r, got, want = rec["world_rank"], rec["f_out"], rec["x"]
            if _same(want, got):
                continue
            text = f"{head_f}: on rank {r}, y = {f_name}.apply(x, group): " + _differs("y", want, got)
            c = _factor(want, got)
            if c is not None and abs(c - tp) < 1e-6:
                return (f"{text}; y is tp times x, {_times(c, tp)}, after {_calls_text(rec['calls'], 'f forward')}. "
                        f"{_F_FORWARD}.")
            return text + ". f's forward is the identity: return x."
        # f's backward
        for rec in recs:
            r, got, want = rec["world_rank"], rec.get("f_grad"), rec["f_grad_want"]
            where = (f"{head_f}: on rank {r}, after y = {f_name}.apply(x, group); y.backward(dy) with each rank's "
                     f"own dy (its slice's dL/dy)")
            if got is None:
                return (f"{where}, x.grad is None: no gradient came back through f. f's backward returns (the "
                        f"gradient for x, None for group).")
            if _same(want, got):
                continue
            text = f"{where}: " + _differs("x.grad", want, got) + " (the sum of the ranks' dy)"
            calls = _calls_text(rec["calls"], "f backward")
            if _same(rec["dy"], got):
                extra = ("" if _count(rec["calls"], "f backward") == 0 else
                         f" (your backward made {calls}, but returned a tensor that does not hold its result: "
                         f"dist.all_reduce(t) writes the sum into t; return that t)")
                return (f"{text}; x.grad is rank {r}'s own dy, only its partial sum{extra}. {_F_BACKWARD}: "
                        f"all-reduce (sum) the gradient over ctx.group and return it.")
            c = _factor(want, got)
            if c is not None and abs(c - 1 / tp) < 1e-6:
                return f"{text}; x.grad is the mean of the ranks' dy, {_times(c, tp)}: {_AVERAGED}."
            if c is not None and _times(c, tp):
                return f"{text}; x.grad is {_times(c, tp)}, after {calls}: sum the ranks' gradients once."
            return text + "."
        # f's backward must not change the gradient autograd hands it
        for rec in recs:
            r, got, want = rec["world_rank"], rec.get("res_grad"), rec["res_want"]
            if _same(want, got):
                continue
            text = (f"{head_f}: on rank {r}, in out = x + {f_name}.apply(x, group) (x used twice, as in a residual "
                    "connection), out.backward(dy): " + _differs("x.grad", want, got) + " (dy + the sum of the "
                    "ranks' dy)")
            if rec["res_inplace"]:
                return (f"{text}. f's backward changed the incoming gradient in place: dist.all_reduce(grad) wrote "
                        f"the sum into the tensor autograd handed to f's backward, and autograd had handed the very "
                        f"same tensor to the other branch (the residual's x), which then added the sum instead of "
                        f"dy. Autograd may share a gradient tensor between the inputs of an operation: all-reduce a "
                        f"copy (grad = grad.clone(); dist.all_reduce(grad, group=ctx.group); return grad, None).")
            return text + "."
        # g's forward
        for rec in recs:
            r, got, want = rec["world_rank"], rec["g_out"], rec["g_out_want"]
            if _same(want, got):
                continue
            text = (f"{head_g}: on rank {r}, y = {g_name}.apply(x_r, group) with each rank's own x_r: "
                    + _differs("y", want, got) + " (the sum of the ranks' x_r)")
            calls = _calls_text(rec["calls"], "g forward")
            if _same(rec["g_in"], got):
                return (f"{text}; y is rank {r}'s own x_r, only its partial sum ({calls}). {_G_FORWARD}: all-reduce "
                        f"(sum) a copy of x over group and return it.")
            c = _factor(want, got)
            if c is not None and abs(c - 1 / tp) < 1e-6:
                return f"{text}; y is the mean of the ranks' x_r, {_times(c, tp)}: {_AVERAGED}."
            if c is not None and _times(c, tp):
                return f"{text}; y is {_times(c, tp)}, after {calls}: sum the ranks' x_r once."
            return text + "."
        # g's forward must leave its input alone
        for rec in recs:
            r = rec["world_rank"]
            if not _same(rec["g_in"], rec["g_in_after"]):
                return (f"{head_g}: on rank {r}, y = {g_name}.apply(x_r, group) changed its input x_r: after the "
                        "call " + _differs("x_r", rec["g_in"], rec["g_in_after"]) + " (its value before). "
                        "dist.all_reduce(x) writes the sum into x, in place, but x_r may still be needed: by "
                        "autograd (a tanh, for one, saves its output for its backward) or by your own code. "
                        "All-reduce a copy: total = x.clone(); dist.all_reduce(total, group=group); return total.")
        # g's backward
        for rec in recs:
            r, got, want = rec["world_rank"], rec.get("g_grad"), rec["g_grad_want"]
            where = (f"{head_g}: on rank {r}, after y = {g_name}.apply(x_r, group); y.backward(dy) with the same dy "
                     f"on every rank")
            if got is None:
                return (f"{where}, x_r.grad is None: no gradient came back through g. g's backward returns (the "
                        f"gradient for x, None for group).")
            if _same(want, got):
                continue
            text = f"{where}: " + _differs("x_r.grad", want, got) + " (dy itself)"
            calls = _calls_text(rec["calls"], "g backward")
            c = _factor(want, got)
            if c is not None and abs(c - tp) < 1e-6:
                return f"{text}; x_r.grad is {_times(c, tp)}, after {calls} (expected none). {_G_BACKWARD}."
            if c is not None and abs(c - 1 / tp) < 1e-6:
                return f"{text}; x_r.grad is dy / tp ({_times(c, tp)}). {_G_BACKWARD}: return grad as it is."
            return text + ". g's backward is the identity: return (grad, None)."
        # the right numbers, but communication where none is needed
        if tp > 1:
            for rec in recs:
                for phase, name, why in (("f forward", "f's forward", "every rank already holds x"),
                                         ("g backward", "g's backward", "every rank already holds dL/dy")):
                    if _count(rec["calls"], phase):
                        return (f"{head}: the numbers are right, but on rank {rec['world_rank']} there "
                                f"{'was' if _count(rec['calls'], phase) == 1 else 'were'} "
                                f"{_calls_text(rec['calls'], phase)}: {why}, so {name} needs no communication (an "
                                f"all-reduce in every layer, for nothing). {name} is the identity.")
                for phase, name in (("f backward", "f's backward"), ("g forward", "g's forward")):
                    if _count(rec["calls"], phase) > 1:
                        return (f"{head}: the numbers are right, but on rank {rec['world_rank']} there were "
                                f"{_calls_text(rec['calls'], phase)}: one is enough.")
    return None


# --- the shards ------------------------------------------------------------------------------------------

def _slice_of(t, dense, tp: int):
    """Which slice of ``dense`` (2-D) the tensor ``t`` is: ("rows"|"cols", k), ("whole", None) or None."""
    if not isinstance(t, torch.Tensor):
        return None
    if _same(dense, t):
        return "whole", None
    for dim, kind in ((0, "rows"), (1, "cols")):
        if dense.dim() <= dim or dense.shape[dim] % tp:
            continue
        step = dense.shape[dim] // tp
        for k in range(tp):
            if _same(dense.narrow(dim, k * step, step), t):
                return kind, k
    return None


def _span(kind: str, k: int, n: int, tp: int) -> str:
    step = n // tp
    return f"{kind} [{k * step}, {(k + 1) * step})"


def _shard_problem(head: str, cls_name: str, kind: str, rec: dict, W, b, r: int, tp: int) -> str | None:
    """The student's shards of rank r against the dense W and b."""
    want_w, want_b = _want_shards(W, b, kind, r, tp)
    weight, bias, error = rec["weight"], rec["bias"], rec["error"]
    out_n, in_n = W.shape
    dense_text = f"the dense W has shape (out, in) = {tuple(W.shape)}"
    good = ("rows" if kind == "column" else "cols", r)
    if kind == "column":
        how = (f"A column-parallel layer splits W by its output features, the rows (dim 0): rank r keeps "
               f"W[r·out/tp:(r+1)·out/tp], shape (out/tp, in) = {tuple(want_w.shape)}, and the same entries of the "
               f"bias")
    else:
        how = (f"A row-parallel layer splits W by its input features, the columns (dim 1): rank r keeps "
               f"W[:, r·in/tp:(r+1)·in/tp], shape (out, in/tp) = {tuple(want_w.shape)}: the weights of the inputs "
               f"that the column-parallel layer before it computes on rank r")
    if not _same(want_w, weight):
        found = _slice_of(weight, W, tp)
        what = f"{cls_name}.shard(W) on rank {r}"
        if found and found != good and found[0] in ("rows", "cols") and found[0] != good[0]:
            dim_n = out_n if found[0] == "rows" else in_n
            feats = "output features" if found[0] == "rows" else "input features"
            text = (f"{head}: {what} sliced the wrong dimension: it kept {_span(found[0], found[1], dim_n, tp)} of W, "
                    f"shape {tuple(weight.shape)}, this rank's {feats} ({dense_text}). {how}.")
        elif found and found[0] == good[0]:
            n = out_n if found[0] == "rows" else in_n
            text = (f"{head}: the shards are in the wrong order: {what} kept {_span(found[0], found[1], n, tp)} of W, "
                    f"the shard of rank {found[1]}; rank {r} keeps {_span(good[0], r, n, tp)}. ")
            if kind == "column":
                text += (f"Out of order, rank {r} computes the output features of rank {found[1]}: the outputs come "
                         f"out permuted, wrong once the ranks' slices are put side by side in rank order (a gather), "
                         f"and the row-parallel layer after it, whose rank r takes the input features of slice r, "
                         f"gets the wrong ones. ")
            else:
                text += (f"Out of order, rank {r} multiplies its slice of the input (the features of slice {r}, "
                         f"computed by rank {r} of the column-parallel layer before it) by the weights of the "
                         f"features of slice {found[1]}: the partial sums no longer add up to x Wᵀ. ")
            text += "Take slice r = self.rank of the self.tp slices, in rank order."
        elif found and found[0] == "whole":
            text = (f"{head}: {what} is the whole W, shape {tuple(W.shape)}: every rank would hold (and compute) "
                    f"all of it. {how}.")
        elif weight is None:
            text = f"{head}: {what} did not give a tensor. {how}."
        else:
            text = f"{head}: " + _differs(what, want_w, weight) + f" ({dense_text}). {how}."
        if error is not None:
            text += "\nThen " + _error_text(cls_name, r, error)
        return text
    if error is not None:
        return f"{head}: " + _error_text(cls_name, r, error)
    if not _same(want_b, bias):
        what = f"{cls_name}.bias on rank {r}"
        if kind == "column" and _same(b, bias):
            return (f"{head}: {what} is the whole bias b, shape {tuple(b.shape)}: a column-parallel layer splits "
                    f"the bias like the output features, rank r keeps b[r·out/tp:(r+1)·out/tp], shape "
                    f"{tuple(want_b.shape)} (shard must handle the 1-D bias too: tensor[rows] slices its first "
                    f"dimension, whatever the number of dimensions).")
        if kind == "column" and isinstance(bias, torch.Tensor) and bias.shape == want_b.shape:
            step = out_n // tp
            for k in range(tp):
                if _same(b[k * step:(k + 1) * step], bias):
                    return (f"{head}: the bias shards are in the wrong order: {what} holds entries "
                            f"[{k * step}, {(k + 1) * step}) of b, those of rank {k}; rank {r} keeps "
                            f"[{r * step}, {(r + 1) * step}), the entries of its own output features.")
        if kind == "row" and isinstance(bias, torch.Tensor) and bias.shape != b.shape:
            return (f"{head}: {what} has shape {tuple(bias.shape)}: a row-parallel layer keeps the whole bias, shape "
                    f"{tuple(b.shape)}, on every rank, and adds it once, after the sum.")
        return f"{head}: " + _differs(what, want_b, bias) + "."
    return None


def _error_text(cls_name: str, r: int, error) -> str:
    kind, message, tb = error
    return f"{cls_name}(linear, group) raised {kind} on rank {r}: {message}\n\n--- traceback of rank {r} ---\n{tb}"


# --- the layers' outputs and gradients -------------------------------------------------------------------

def _column_problem(name: str, N: int, recs: list) -> str | None:
    head = _head(name, N, False)
    W, b, x, w = (recs[0][k] for k in ("W", "b", "x", "w"))
    for rec in recs:
        rec["world_rank"] = rec["rank"]
        problem = _shard_problem(head, name, "column", rec, W, b, rec["rank"], N) or _op_problem(head, rec)
        if problem:
            return problem
    step = H // N
    for rec in recs:
        r = rec["rank"]
        rows = slice(r * step, (r + 1) * step)
        Wr, br = W[rows], b[rows]
        want = F.linear(x, Wr, br)
        got = rec["y"]
        if _same(want, got):
            continue
        text = (f"{head}: on rank {r}, y = layer(x) with the same x on every rank: " +
                _differs("y", want, got) + f" (rank {r}'s output features: x W_rᵀ + b_r, W_r = W[{rows.start}:"
                                           f"{rows.stop}])")
        calls = _calls_text(rec["calls"], "forward")
        if _same(F.linear(N * x, Wr, br), got):
            return (f"{text}; y = (tp·x) W_rᵀ + b_r: f's output came out tp times too large, after {calls}. "
                    f"{_F_FORWARD}.")
        if _same(F.linear(x, Wr), got):
            return f"{text}; y = x W_rᵀ: the bias b_r was not added."
        if _same(F.linear(x, W, b), got):
            return (f"{text}; y is the whole output of the dense layer: a ColumnParallelLinear returns its own "
                    f"out/tp output features, which is what a RowParallelLinear takes (no gather).")
        return text + "."
    return _layer_grads_problem(head, name, "column", N, recs) or _group_shard_problem(name, "column", N, recs)


def _group_shard_problem(name: str, kind: str, N: int, recs: list) -> str | None:
    """On 4 processes the layer is also built in tensor-parallel groups of 2: each rank keeps the shard of its
    rank in the group (what labkit's __init__ sets as self.rank), not of its rank in the world."""
    W, b = recs[0]["W"], recs[0]["b"]
    for rec in recs:
        g = rec.get("group_shard")
        if g is None:
            continue
        problem = _shard_problem(_head(name, N, True), name, kind, g, W, b, g["rank"], 2)
        if problem:
            return (f"{problem} (Rank {rec['rank']} of the world is rank {g['rank']} of its group: a shard is cut "
                    f"by the rank in the group, self.rank, which labkit's __init__ sets with "
                    f"dist.get_rank(group); dist.get_rank() is the rank in the world.)")
    return None


def _row_problem(name: str, N: int, recs: list) -> str | None:
    head = _head(name, N, False)
    W, b, x, w = (recs[0][k] for k in ("W", "b", "x", "w"))
    for rec in recs:
        rec["world_rank"] = rec["rank"]
        problem = _shard_problem(head, name, "row", rec, W, b, rec["rank"], N) or _op_problem(head, rec)
        if problem:
            return problem
    step = H // N
    partial = [F.linear(x[..., k * step:(k + 1) * step], W[:, k * step:(k + 1) * step]) for k in range(N)]
    want = F.linear(x, W, b)
    for rec in recs:
        r, got = rec["rank"], rec["y"]
        if _same(want, got):
            continue
        text = (f"{head}: on rank {r}, y = layer(x_r) with x_r = x[..., {r * step}:{(r + 1) * step}], rank {r}'s "
                f"slice of the input: " + _differs("y", want, got) + " (the dense layer's output, x Wᵀ + b)")
        problem = _reduced_output_problem(text, got, want, partial, b, r, N, rec["calls"])
        return problem or text + "."
    return _layer_grads_problem(head, name, "row", N, recs) or _group_shard_problem(name, "row", N, recs)


def _reduced_output_problem(text: str, got, want, partial: list, b, r: int, N: int, calls) -> str | None:
    """The output of g(partial sums) + b, wrong in one of the known ways."""
    total = sum(partial)
    forward = _calls_text(calls, "forward")
    if _same(partial[r] + b, got) or _same(partial[r], got):
        return (f"{text}; y is rank {r}'s own partial sum x_r W_rᵀ{' + b' if _same(partial[r] + b, got) else ''}, "
                f"after {forward}. {_G_FORWARD}: y = g(x_r W_rᵀ) + b.")
    if N > 1 and _same(want + (N - 1) * b, got):
        return (f"{text}; y − (x Wᵀ + b) = (tp − 1)·b: the bias added tp times, once on every rank before the "
                f"all-reduce, which sums the tp copies. Add it once, after the sum: y = g(x_r W_rᵀ) + b (every rank "
                f"adds it to the same sum, so every rank gets the same y).")
    if N > 1 and (_same(total / N + b, got) or _same((total + N * b) / N, got)):
        return f"{text}; y is the mean of the ranks' partial sums (+ b), not their sum: {_AVERAGED}."
    if _same(total, got):
        return f"{text}; y = Σ_r x_r W_rᵀ: the bias b was not added (add it after g, on every rank)."
    return None


def _layer_grads_problem(head: str, name: str, kind: str, N: int, recs: list) -> str | None:
    W, b, x, w = (recs[0][k] for k in ("W", "b", "x", "w"))
    xd = x.clone().requires_grad_()
    Wd, bd = W.clone().requires_grad_(), b.clone().requires_grad_()
    (F.linear(xd, Wd, bd) * w).sum().backward()
    n_in = W.shape[1]
    for rec in recs:
        r = rec["rank"]
        if "grads" not in rec:
            return f"{head}: on rank {r}, {_DETACHED}"
        want_w, want_b = _want_shards(Wd.grad, bd.grad, kind, r, N)
        if kind == "column":
            rows = slice(r * H // N, (r + 1) * H // N)
            own = torch.autograd.grad((F.linear(xd, W[rows], b[rows]) * w[..., rows]).sum(), xd)[0]
            want_x, what_x = xd.grad, "x.grad"
        else:
            cols = slice(r * n_in // N, (r + 1) * n_in // N)
            own = None
            want_x, what_x = xd.grad[..., cols], f"x_r.grad (x_r = x[..., {cols.start}:{cols.stop}])"
        for what, want, got, partial in (("weight.grad", want_w, rec["grads"]["weight"], None),
                                         ("bias.grad", want_b, rec["grads"]["bias"], None),
                                         (what_x, want_x, rec["x_grad"], own)):
            problem = _grad_problem(head, name, kind, r, N, what, want, got, partial, rec)
            if problem:
                return problem
    if N > 1:
        expected = {"column": {"forward": 0, "backward": 1}, "row": {"forward": 1, "backward": 0}}[kind]
        for rec in recs:
            for phase, n in expected.items():
                if _count(rec["calls"], phase) != n:
                    return (f"{head}: the numbers are right, but on rank {rec['rank']} the layer made "
                            f"{_calls_text(rec['calls'], phase)}, expected {n}: a {kind}-parallel layer communicates "
                            f"once, {'in backward (f)' if kind == 'column' else 'in forward (g)'}.")
    return None


def _grad_problem(head, name, kind, r, N, what, want, got, own, rec) -> str | None:
    if got is None:
        if kind == "row" and what == "bias.grad":
            return (f"{head}: on rank {r}, {name}.bias.grad is None after backward: rank {r}'s bias did not take part "
                    f"in the output. Add the bias on every rank, after g (y = g(x_r W_rᵀ) + b): then every rank's "
                    f"copy gets the same gradient and the copies stay equal when trained.")
        shown = f"{name}.{what}" if not what.startswith("x") else what
        return (f"{head}: on rank {r}, {shown} is None after backward: no gradient reached it "
                f"(is it used in forward, without .detach()?).")
    if _same(want, got):
        return None
    text = f"{head}: on rank {r}, after y.backward(dy): " + _differs(f"{name}.{what}" if not what.startswith("x")
                                                                     else what, want, got)
    backward = _calls_text(rec["calls"], "backward")
    if own is not None and _same(own, got):
        if not rec.get("functions"):
            return (f"{text}; x.grad is only rank {r}'s own contribution (its out/tp output features): the forward "
                    f"does not go through f (no autograd Function between x and y), so nothing sums the ranks' "
                    f"contributions. {_F_BACKWARD}: start forward with CopyToParallel.apply(x, self.group).")
        return f"{text}; x.grad is only rank {r}'s own contribution, a partial sum, after {backward}. {_F_BACKWARD}."
    c = _factor(want, got)
    if c is not None and N > 1 and abs(c - 1 / N) < 1e-6 and what.startswith("x") and kind == "column":
        return f"{text}; x.grad is the mean of the ranks' contributions, {_times(c, N)}: {_AVERAGED}."
    if c is not None and N > 1 and abs(c - N) < 1e-6 and kind == "row":
        return f"{text}: {_times(c, N)}, after {backward} (expected none). {_G_BACKWARD}."
    if c is not None and _times(c, N):
        return f"{text}: {_times(c, N)}, after {backward}."
    return text + "."


# --- the MLP ---------------------------------------------------------------------------------------------

def _mlp_problem(names: tuple, N: int, records: list) -> str | None:
    col_name, row_name = names
    for case in range(len(records[0])):
        recs = [rank_records[case] for rank_records in records]
        for world_rank, rec in enumerate(recs):
            rec["world_rank"] = world_rank
        tp, grouped = recs[0]["size"], recs[0]["grouped"]
        head = _head(f"{col_name} → GELU → {row_name}", N, grouped)
        for rec in recs:
            r = rec["rank"]
            problem = (_shard_problem(head, col_name, "column", rec["col"], rec["W1"], rec["b1"], r, tp) or
                       _shard_problem(head, row_name, "row", rec["row"], rec["W2"], rec["b2"], r, tp))
            if problem:
                return problem
        for rec in recs:
            problem = _group_problem(head, rec) or _op_problem(head, rec)
            if problem:
                return problem
        for rec in recs:
            problem = _mlp_rank_problem(head, rec, col_name, row_name)
            if problem:
                return problem
        if tp > 1:
            for rec in recs:
                forward, backward = _count(rec["calls"], "forward"), _count(rec["calls"], "backward")
                if (forward, backward) != (1, 1):
                    return (f"{head}: the numbers are right, but on rank {rec['world_rank']} the MLP made "
                            f"{_calls_text(rec['calls'], 'forward')} and {_calls_text(rec['calls'], 'backward')}: "
                            f"Megatron's MLP needs one in each (g's, after the row-parallel layer, in forward; f's, "
                            f"before the column-parallel layer, in backward).")
    return None


def _mlp_rank_problem(head: str, rec: dict, col_name: str, row_name: str) -> str | None:
    r, tp, wr = rec["rank"], rec["size"], rec["world_rank"]
    W1, b1, W2, b2, x, w = (rec[k] for k in ("W1", "b1", "W2", "b2", "x", "w"))
    step = H // tp
    if "hidden" in rec:
        return (f"{head}: on rank {wr}, {col_name}'s output has shape "
                f"{tuple(rec['hidden'].shape) if isinstance(rec['hidden'], torch.Tensor) else rec['hidden']}, "
                f"expected {(*BT, step)}: this rank's H/tp = {step} hidden features.")
    xd = x.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (W1, b1, W2, b2)]
    W1d, b1d, W2d, b2d = params

    def mlp(x_):
        return F.linear(F.gelu(F.linear(x_, W1d, b1d)), W2d, b2d)

    want = mlp(xd)
    (want * w).sum().backward()
    want = want.detach()
    partial = [F.linear(F.gelu(F.linear(x, W1[k * step:(k + 1) * step], b1[k * step:(k + 1) * step])),
                        W2[:, k * step:(k + 1) * step]) for k in range(tp)]
    got = rec["y"]
    if not _same(want, got):
        everywhere = "every rank of the group" if rec["grouped"] else "every rank"
        text = (f"{head}: on rank {wr}, y = row(gelu(column(x))) with the same x on {everywhere}: "
                + _differs("y", want, got) + " (the dense MLP's output)")
        if _same(mlp(tp * x).detach(), got):
            return (f"{text}; y is the dense MLP of tp·x: f's output came out tp times too large, after "
                    f"{_calls_text(rec['calls'], 'forward')}. {_F_FORWARD}.")
        problem = _reduced_output_problem(text, got, want, partial, b2, r, tp, rec["calls"])
        return problem or text + "."
    if "grads" not in rec:
        return f"{head}: on rank {wr}, {_DETACHED}"
    rows = slice(r * step, (r + 1) * step)
    own = torch.autograd.grad((F.linear(F.gelu(F.linear(xd, W1[rows], b1[rows])), W2[:, rows]) * w).sum(), xd)[0]
    backward = _calls_text(rec["calls"], "backward")
    checks = (("row.weight", f"{row_name}.weight.grad", W2d.grad[:, rows]),
              ("row.bias", f"{row_name}.bias.grad", b2d.grad),
              ("column.weight", f"{col_name}.weight.grad", W1d.grad[rows]),
              ("column.bias", f"{col_name}.bias.grad", b1d.grad[rows]))
    for key, what, want_g in checks:
        got_g = rec["grads"][key]
        if got_g is None:
            return (f"{head}: on rank {wr}, {what} is None after backward: "
                    + ("the bias must be added on every rank, after g, so that every rank's copy gets the same "
                       "gradient." if key == "row.bias" else "no gradient reached it."))
        if _same(want_g, got_g):
            continue
        text = (f"{head}: on rank {wr}, after y.backward(dy) with the same dy on every rank: "
                + _differs(what, want_g, got_g))
        c = _factor(want_g, got_g)
        if c is not None and tp > 1 and abs(c - tp) < 1e-6:
            return f"{text}: {_times(c, tp)}, after {backward} (expected 1, f's). {_G_BACKWARD}."
        if c is not None and _times(c, tp):
            return f"{text}: {_times(c, tp)}, after {backward}."
        return text + "."
    got_x = rec["x_grad"]
    if got_x is None:
        return f"{head}: on rank {wr}, x.grad is None after backward: no gradient came back through the MLP."
    if _same(xd.grad, got_x):
        return None
    text = f"{head}: on rank {wr}, after y.backward(dy): " + _differs("x.grad", xd.grad, got_x)
    if _same(own, got_x):
        if not rec.get("functions") or rec["functions"] < 2:
            extra = " (the forward goes through fewer than two autograd Functions: is f applied?)"
        else:
            extra = ""
        return (f"{text}; x.grad is only rank {wr}'s own contribution (its H/tp hidden features), a partial sum, "
                f"after {backward}{extra}. {_F_BACKWARD}.")
    c = _factor(xd.grad, got_x)
    if c is not None and tp > 1 and abs(c - 1 / tp) < 1e-6:
        return f"{text}; x.grad is the mean of the ranks' contributions, {_times(c, tp)}: {_AVERAGED}."
    if c is not None and _times(c, tp):
        return f"{text}: {_times(c, tp)}, after {backward}."
    return text + "."


# ============================================================================================
# The checks
# ============================================================================================

def _and(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} and {values[-1]}"


def _sizes(world_sizes) -> str:
    sizes = sorted(world_sizes)
    return f"{_and(sizes)} process{'es' if sizes != [1] else ''}"


def _need_class(cls, what: str, base=None) -> None:
    """Refuse what is not a class (an instance, a function) or, for f and g, not an autograd Function."""
    __tracebackhide__ = True
    if not isinstance(cls, type):
        fail(f"pass your class itself ({what}), not a {type(cls).__name__} object")
    if base is torch.autograd.Function and not issubclass(cls, base):
        fail(f"{cls.__name__} must be a subclass of torch.autograd.Function (class {cls.__name__}("
             f"torch.autograd.Function): ...), called as {cls.__name__}.apply(x, group)")
    if base in _LABKIT.values() and not issubclass(cls, base):
        fail(f"{cls.__name__} must be a subclass of labkit's layer, as in the notebook: class {cls.__name__}("
             f"labkit.tensor_parallel.{base.__name__}), whose __init__ calls your shard (the check runs your "
             f"forward with labkit's shards, and your shard with labkit's __init__)")


def check_f_and_g(copy_to_parallel, reduce_from_parallel, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercises 5a-5d: ``copy_to_parallel`` (f) and ``reduce_from_parallel`` (g), two
    ``torch.autograd.Function`` subclasses called as ``cls.apply(x, group)``.

    On each world size: f on the same x on every rank, then backward with each rank's own dL/dy (x.grad must
    be their sum); f in ``out = x + f(x)`` (the gradient tensor autograd hands f's backward is shared with the
    residual branch: it must not be changed in place); g on each rank's own x_r (y must be their sum, x_r left
    as it was), then backward with the same dL/dy on every rank (x_r.grad must be dL/dy). On 4 processes, the
    same in two groups of 2. The all-reduces are counted: none in f's forward and g's backward."""
    __tracebackhide__ = True
    _need_class(copy_to_parallel, "check_f_and_g(CopyToParallel, ReduceFromParallel)", torch.autograd.Function)
    _need_class(reduce_from_parallel, "check_f_and_g(CopyToParallel, ReduceFromParallel)", torch.autograd.Function)
    names = (copy_to_parallel.__name__, reduce_from_parallel.__name__)
    what = f"{names[0]} and {names[1]}"
    seen = []
    for N in world_sizes:
        records = run_on_ranks(_f_and_g_worker, copy_to_parallel, reduce_from_parallel, 0.6 * timeout,
                               world_size=N, timeout=timeout, name=what, task="5a-5d", device="cpu")
        seen.append(records)
        problem = _f_and_g_problem(names, N, records)
        if problem:
            fail(problem)
    grouped = " and in groups of 2 of 4 processes" if 4 in world_sizes else ""
    passed(f"{names[0]} (f) and {names[1]} (g) are correct on {_sizes(world_sizes)}{grouped}: f's forward is the "
           f"identity and its backward sums the ranks' gradients, g's forward sums and its backward is the identity; "
           f"one {_collective(seen)} each, in the right direction; the incoming gradient and the input left as they "
           f"were")


def check_column_parallel(cls, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercises 5e and 5f: ``cls(linear, group)`` keeps this rank's rows of the dense weight and bias
    (``shard``) and its ``forward`` computes this rank's output features through f.

    On each world size, every rank builds the same float64 ``nn.Linear(12, 24)``; the shards, this rank's
    output slice, x.grad (the whole input's gradient, summed by f's backward) and the weight and bias gradients
    (the dense gradients' rows) are compared with the dense layer's. One all-reduce, in backward."""
    __tracebackhide__ = True
    _need_class(cls, "check_column_parallel(ColumnParallelLinear)", ColumnParallelLinear)
    seen = []
    for N in world_sizes:
        records = run_on_ranks(_layer_worker, cls, "column", 0.6 * timeout, world_size=N, timeout=timeout,
                               name=cls.__name__, task="5e-5f", device="cpu")
        seen.append(records)
        problem = _column_problem(cls.__name__, N, records)
        if problem:
            fail(problem)
    grouped = " (the shards also in groups of 2 of 4 processes)" if 4 in world_sizes else ""
    passed(f"{cls.__name__} is correct on {_sizes(world_sizes)}{grouped}: rank r keeps rows [r·out/tp, (r+1)·out/tp) of W "
           f"and b; its output features, the input gradient (one {_collective(seen)}, in backward) and the weight and bias "
           f"gradients equal the dense nn.Linear's, sliced the same way")


def check_row_parallel(cls, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check exercises 5g and 5h: ``cls(linear, group)`` keeps this rank's columns of the dense weight (the bias
    whole) and its ``forward`` sums the ranks' partial products with g, then adds the bias once.

    On each world size, every rank builds the same float64 ``nn.Linear(24, 12)`` and gets its slice x_r of the
    input; the shards, the output (whole on every rank), x_r.grad and the weight and bias gradients are compared
    with the dense layer's. One all-reduce, in forward."""
    __tracebackhide__ = True
    _need_class(cls, "check_row_parallel(RowParallelLinear)", RowParallelLinear)
    seen = []
    for N in world_sizes:
        records = run_on_ranks(_layer_worker, cls, "row", 0.6 * timeout, world_size=N, timeout=timeout,
                               name=cls.__name__, task="5g-5h", device="cpu")
        seen.append(records)
        problem = _row_problem(cls.__name__, N, records)
        if problem:
            fail(problem)
    grouped = " (the shards also in groups of 2 of 4 processes)" if 4 in world_sizes else ""
    passed(f"{cls.__name__} is correct on {_sizes(world_sizes)}{grouped}: rank r keeps columns [r·in/tp, (r+1)·in/tp) of W "
           f"and the whole bias, added once after the sum; the output (one {_collective(seen)}, in forward), the input "
           f"slice's gradient and the weight and bias gradients equal the dense nn.Linear's, sliced the same way")


def check_parallel_mlp(column_cls, row_cls, *, world_sizes=WORLD_SIZES, timeout: float = 10.0) -> None:
    """Check the two layers together: column (12 → 24) → GELU → row (24 → 12) against the dense MLP.

    On each world size, the output (whole on every rank), x.grad and every weight and bias gradient (against
    the dense gradients' slices); exactly one all-reduce in forward and one in backward. On 4 processes also in
    two tensor-parallel groups of 2, each with its own data (``group`` must reach f and g)."""
    __tracebackhide__ = True
    _need_class(column_cls, "check_parallel_mlp(ColumnParallelLinear, RowParallelLinear)", ColumnParallelLinear)
    _need_class(row_cls, "check_parallel_mlp(ColumnParallelLinear, RowParallelLinear)", RowParallelLinear)
    names = (column_cls.__name__, row_cls.__name__)
    seen = []
    for N in world_sizes:
        records = run_on_ranks(_mlp_worker, column_cls, row_cls, 0.6 * timeout, world_size=N, timeout=timeout,
                               name=f"{names[0]} → GELU → {names[1]}", task="5e-5h", device="cpu")
        seen.append(records)
        problem = _mlp_problem(names, N, records)
        if problem:
            fail(problem)
    grouped = " (and in tensor-parallel groups of 2 on 4 processes)" if 4 in world_sizes else ""
    passed(f"{names[0]} → GELU → {names[1]} equals the dense MLP on {_sizes(world_sizes)}{grouped}: the output, "
           f"the input gradient and every weight and bias gradient, sliced as the shards are; one {_collective(seen)} "
           f"in forward, one in backward")
