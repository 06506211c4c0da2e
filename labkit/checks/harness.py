"""What every checker shares, beyond formatting (``labkit.checks``): a table of known mistakes, calling the
student's function, comparing, and watching the student's communication on N processes.

**Mistakes as data.** A checker lists the mistakes it knows as :class:`Mistake` records: a name (which the
tests use), how to make the wrong version from labkit's own implementation (flags, a subclass, a small
function: whatever the checker's ``variant`` means), and what the student is told. The checker tries them in
order where the student's result differs from labkit's (:func:`find_mistake`); the tests build every wrong
version from the same table and assert that the checker names it (:func:`literal_parts`: the fixed text of its
message). One table, two users: a new mistake is one row. Where a wrong version must run beside the student's
(it communicates), :func:`variants_if_wrong` runs every row's in the launched processes once some rank's numbers
are wrong, all ranks deciding together (:func:`all_ranks`).

**Watched communication.** :class:`Watch` replaces functions of ``torch.distributed`` (and of
``labkit.comm``, which labkit's own side of a check calls) while the student's code runs, in the launched
processes only. Each call is done as the real one and recorded as a :class:`Call`; a rank never waits
forever: past ``deadline`` seconds in a call, it stops with what *every* rank was doing at that moment
(each rank writes its state to a small file on a shared :class:`Board`), so a deadlock is named as one (who
waits in what, who returned, who is still computing) instead of as an endless loop or a timeout. With
``defer=True``, an asynchronous call's result reaches the student's tensors only at ``wait()``, so a missing
``wait()`` gives the same wrong result on every run instead of a race.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import string
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.distributed as dist

from labkit import comm
from labkit.checks import CheckFailed, describe, fail, first_mismatch, fmt_index, fmt_number, fmt_pair, \
    time_limit_paused

__all__ = ["Mistake", "find_mistake", "literal_parts", "need_function", "call_student", "not_written", "close",
           "close_number", "as_number", "factor", "factor_words", "element_text", "Described", "keep", "and_list",
           "plural", "bound", "everyone", "all_ranks", "variants_if_wrong", "Board", "board_dir", "Call", "Watch"]


# --------------------------------------------------------------------------------------------
# Mistakes as data
# --------------------------------------------------------------------------------------------

class Mistake(NamedTuple):
    """One known wrong version: ``name`` (what the tests call it), ``variant`` (how to make it from labkit's
    implementation; its meaning is the checker's), ``says`` (what the student is told)."""
    name: str
    variant: Any
    says: str


def find_mistake(mistakes: Iterable[Mistake], matches: Callable[[Mistake], bool]) -> Mistake | None:
    """The first mistake of the table for which ``matches(mistake)`` is true (the student's result equals
    what that wrong version gives), or None."""
    return next((m for m in mistakes if matches(m)), None)


def literal_parts(says: str) -> list[str]:
    """The fixed text of a mistake's ``says`` around its ``{fields}``: what every message naming it contains (what
    the tests look for)."""
    return [text for text, *_ in string.Formatter().parse(says) if text.strip()]


# --------------------------------------------------------------------------------------------
# The student's function, in this process
# --------------------------------------------------------------------------------------------

def need_function(fn: Any, check: str) -> str:
    """The name of the student's function; :class:`CheckFailed` when ``fn`` is not callable."""
    __tracebackhide__ = True
    if not callable(fn):
        fail(f"{check} needs your function, not {type(fn).__name__}")
    return getattr(fn, "__name__", "your function")


def call_student(fn: Callable, *args, name: str, task: str, where: str = "", **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in this process. The exercise's stub (``NotImplementedError("Exercise ...")``)
    goes up as itself; another ``NotImplementedError`` says that exercise ``task`` is not written yet; any other
    exception becomes :class:`CheckFailed` ("``name`` raised X ``where``"), the student's traceback chained."""
    __tracebackhide__ = True
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        if str(exc).startswith("Exercise "):
            raise
        raise NotImplementedError(f"Exercise {task}: {name} is not written yet (it raised "
                                  f"NotImplementedError({str(exc)!r})); see the instructions above") from None
    except CheckFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the student's traceback chained
        raise CheckFailed(f"{name} raised {type(exc).__name__}{' ' + where if where else ''}: {exc}") from exc


def not_written(probes: Iterable[tuple[str, str, Callable]], err: NotImplementedError,
                task: str) -> NotImplementedError:
    """What to raise when a stub stopped a check: every piece of the exercise not written yet, by name. ``probes``:
    ``(task, what, call)`` per piece, ``call`` running that piece alone (with labkit's version of the others); one
    that raises ``NotImplementedError`` is not written, any other outcome is written (the check says if wrong). When
    no probe finds one, ``err`` itself, worded as exercise ``task``'s."""
    def raised(e: NotImplementedError) -> str:
        return f"NotImplementedError({str(e)!r})" if str(e) else "NotImplementedError"

    def worded(e: NotImplementedError, task: str, what: str) -> str:
        return str(e) if str(e).startswith("Exercise ") else (
            f"Exercise {task}: {what} is not written yet (it raised {raised(e)}); see the instructions above")
    found = []
    for piece_task, what, call in probes:
        try:
            call()
        except NotImplementedError as e:
            found.append(worded(e, piece_task, what))
        except Exception:  # noqa: BLE001 - written (maybe wrong): the check itself will say
            pass
    if not found:
        found = [str(err) if str(err).startswith("Exercise ") else
                 f"Exercise {task}: your code raised {raised(err)}; see the instructions above"]
    found = list(dict.fromkeys(found))
    return NotImplementedError(found[0] + ("\nNot written yet either:\n" + "\n".join(
        "  " + m.removesuffix("; see the instructions above") for m in found[1:]) if len(found) > 1 else ""))


# --------------------------------------------------------------------------------------------
# Comparing, and saying how two things differ
# --------------------------------------------------------------------------------------------

def close(want: torch.Tensor | None, got: Any, rtol: float = 1e-9, atol: float = 1e-12) -> bool:
    """``got`` is a tensor of ``want``'s shape, equal within the tolerances (NaN never is); where ``want`` is None
    (nothing expected, e.g. no gradient), ``got`` is None too."""
    if want is None:
        return got is None
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and first_mismatch(want, got, rtol, atol) is None)


def close_number(want: float, got: float, rtol: float = 1e-9, atol: float = 1e-12) -> bool:
    return math.isclose(want, got, rel_tol=rtol, abs_tol=atol) or (math.isnan(want) and math.isnan(got))


def as_number(x: Any) -> float | None:
    """What a student's function returned, as a float when it is one number (an int, a float, a tensor or a numpy
    value of one element), else None (a bool, a list, None, a tensor of several elements)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x.detach().reshape(()).item())
    if type(x).__module__ == "numpy" and getattr(x, "size", 2) == 1:
        return float(x)
    return None


def factor(want: torch.Tensor, got: Any) -> float | None:
    """c when ``got`` = c · ``want`` (a tensor of ``want``'s shape, ``want`` not zero), else None."""
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.shape == got.shape):
        return None
    den = float((want * want).sum())
    c = float((got * want).sum()) / den if den else None
    return c if c is not None and close(c * want, got) else None


def factor_words(c: float | None, n: int, name: str = "tp") -> str:
    """A measured :func:`factor` named against a count ``n`` called ``name``: "tp times too large (measured factor 3
    = tp)", "tp times too small (measured factor 1/3)", "tp² times too large (measured factor 9 = tp²)", "zero";
    "" for None or a factor with no name."""
    if c is None:
        return ""
    named = {n: f"{name} times too large (measured factor {n} = {name})",
             1 / n: f"{name} times too small (measured factor 1/{n})",
             n * n: f"{name}² times too large (measured factor {n * n} = {name}²)", 0: "zero"}
    return next((words for value, words in named.items() if abs(c - value) < 1e-6), "")


class Described(str):
    """A value that is not a tensor, in words (:func:`labkit.checks.describe`): what a launched rank sends back
    instead of the value itself, which may not pickle (see :func:`keep`)."""


def keep(value: Any) -> Any:
    """What a launched rank keeps of a student's value to send back: a tensor detached and copied, None as None,
    anything else :class:`Described`."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return None if value is None else Described(describe(value))


def element_text(label: str, want: torch.Tensor, got: Any, rtol: float = 1e-9, atol: float = 1e-12) -> str:
    """``'label[i, j]: expected x, got y'`` at the first differing element (or what is wrong with the shape; a
    non-tensor described: "label is None, expected a tensor of shape (2, 3)")."""
    if not isinstance(got, torch.Tensor):
        shown = got if isinstance(got, Described) else describe(got)
        return f"{label} is {shown}, expected a tensor of shape {tuple(want.shape)}"
    if want.shape != got.shape:
        return f"{label} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    bad = first_mismatch(want, got, rtol, atol)
    if bad is None:
        return f"{label} is right"
    index, e, g = bad
    e, g = fmt_pair(e, g)
    return f"{label}{fmt_index(index)}: expected {e}, got {g}"


def and_list(values: Iterable) -> str:
    """``[1, 2, 3]`` -> ``'1, 2 and 3'``."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} and {values[-1]}"


def plural(n: int, word: str) -> str:
    """``plural(1, 'send')`` -> ``'1 send'``; ``plural(3, 'send')`` -> ``'3 sends'``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def bound(x: float, floor: int = -12) -> str:
    """A power of ten above a tiny difference, at least ``1e{floor}``: printed output that does not depend on
    the last bits of the arithmetic. The floor sits well above float64's rounding differences, which move
    with the CPU's vector instructions (a floor of 1e-14 printed 1e-13 on one CPU and 1e-14 on another)."""
    return f"1e{max(floor, math.ceil(math.log10(x)) if x > 0 else floor)}"


# --------------------------------------------------------------------------------------------
# Deciding together, in the launched processes
# --------------------------------------------------------------------------------------------

def everyone(obj: Any, watch: Watch | None = None) -> list:
    """Every rank's picklable ``obj``, in rank order: the checker's own collective (not watched, and its wait not
    counted against a :func:`labkit.checks.time_limit` around it). With a ``watch`` that has a board, the ranks
    first meet on the board and compare how many calls each made: a student's collective left open on some ranks
    (made on one rank only, or asynchronous and never waited) would otherwise pair with this gather."""
    if watch is not None and watch.board is not None:
        _meet(watch)
    with time_limit_paused():
        return comm.all_gather_objects(obj)


def _meet(watch: Watch) -> None:
    board = watch.board
    board.meetings += 1
    meeting = Board(board.path, board.rank, board.world_size, prefix="meet")
    meeting.set("met", count=board.meetings, calls=len(watch.calls))
    patience = 2 * watch.deadline + 1.0     # a rank stuck in a call names the deadlock itself first
    until = time.monotonic() + patience
    with time_limit_paused():
        while True:
            states = meeting.states()
            if all(states.get(r, {}).get("count", 0) >= board.meetings for r in range(board.world_size)):
                break
            if time.monotonic() > until:
                raise CheckFailed(f"the ranks did not all finish {watch.phase or 'their part'} within {patience:g} s"
                                  + watch.states_text())
            time.sleep(0.01)
    counts = [states[r]["calls"] for r in range(board.world_size)]
    if len(set(counts)) > 1:
        made = and_list(f"{watch.rank_name(r)} {plural(n, 'call')}" for r, n in enumerate(counts))
        raise CheckFailed(f"the ranks made different numbers of torch.distributed calls"
                          f"{' during ' + watch.phase if watch.phase else ''}: {made}. Every rank must make the same "
                          f"calls: a collective on some ranks only (inside `if rank == ...`), or an asynchronous one "
                          f"whose handle is never waited, leaves the others' next collective paired with the wrong "
                          f"call.")


def all_ranks(ok: bool, watch: Watch | None = None) -> bool:
    """``ok`` on every rank, decided together (with ``watch``: after meeting, see :func:`everyone`). Meanwhile this
    rank shows as checking (with ``Watch(hint_checking=True)``, a rank that waits for it in a student's call names
    it as one that went on), then as running again."""
    if watch is not None:
        watch.checking()
    result = all(everyone(bool(ok), watch))
    if watch is not None:
        watch.running()
    return result


def variants_if_wrong(right: bool, mistakes: Iterable[Mistake], run: Callable[[Any], Any]) -> dict[str, Any]:
    """Where ``right`` is False on some rank (all ranks decide together), every mistake's wrong version run here on
    the same inputs, ``{name: run(variant)}``, for the parent to compare with the student's result
    (:func:`find_mistake`); where every rank is right, {}: nothing to name, nothing run."""
    return {} if all_ranks(right) else {m.name: run(m.variant) for m in mistakes}


# --------------------------------------------------------------------------------------------
# The board: what every rank is doing, for a stuck rank's message
# --------------------------------------------------------------------------------------------

@contextmanager
def board_dir() -> Iterator[str]:
    """A fresh directory for a :class:`Board`, made in the checker's process and removed after the launch."""
    path = tempfile.mkdtemp(prefix="labkit-check-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Board:
    """Each rank's state in a small JSON file of a shared directory: ``running`` (its own code), ``waiting``
    (in a call: ``op``, ``peer``, ``index``), ``returned`` (from the student's function), ``checking`` (in the
    checker's own code, after the student's). Written atomically, read by a rank that is stuck."""

    def __init__(self, path: str, rank: int, world_size: int, prefix: str = "rank"):
        self.path, self.rank, self.world_size, self.prefix = path, rank, world_size, prefix
        self.meetings = 0           # how many times this rank met the others before a gather (see everyone)

    def set(self, state: str, **info) -> None:
        info.update(state=state, rank=self.rank, time=time.time())
        file = os.path.join(self.path, f"{self.prefix}{self.rank}.json")
        with open(file + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(file + ".tmp", file)

    def states(self) -> dict[int, dict]:
        out = {}
        for r in range(self.world_size):
            try:
                with open(os.path.join(self.path, f"{self.prefix}{r}.json")) as f:
                    out[r] = json.load(f)
            except (OSError, ValueError):
                pass
        return out


# --------------------------------------------------------------------------------------------
# Watched communication
# --------------------------------------------------------------------------------------------

@dataclass
class Call:
    """One call of the student's (or of labkit's side of the check) to a watched function."""
    index: int                    # the how-manieth watched call of this rank
    op: str                       # "all_reduce", "send", ...
    phase: str                    # what the checker was running (Watch.phase)
    numel: int                    # elements of the call's tensor (its input for a collective)
    dtype: str
    group_size: int
    peer: int | None = None       # dst of a send, src of a receive, src of a broadcast
    reduce_op: str | None = None  # of a reduction: "ReduceOp.SUM", ...
    async_op: bool = False
    waits: list = field(default_factory=list)   # for asynchronous calls: Watch.moment() at each wait()
    info: dict = field(default_factory=dict)    # what the checker adds (Watch.on_call)


# Where each watched function takes its tensor and writes its result (names as torch's signatures).
_TENSOR = {"all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor", "all_gather": "tensor",
           "all_gather_into_tensor": "input_tensor", "all_gather_single": "input_tensor",
           "reduce_scatter": "input_list", "reduce_scatter_tensor": "input", "reduce_scatter_single": "input",
           "send": "tensor", "recv": "tensor", "isend": "tensor", "irecv": "tensor"}
_OUTPUT = {"all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor", "all_gather": "tensor_list",
           "all_gather_into_tensor": "output_tensor", "all_gather_single": "output_tensor",
           "reduce_scatter": "output", "reduce_scatter_tensor": "output", "reduce_scatter_single": "output",
           "recv": "tensor", "irecv": "tensor"}
_P2P = {"send": "isend", "recv": "irecv", "isend": "isend", "irecv": "irecv"}


class Watch:
    """Inside ``with watch.installed():`` the functions ``ops`` of torch.distributed (and of labkit.comm where
    it has them, if ``comm_too``) are this rank's watched versions: done as the real ones, recorded in
    :attr:`calls`, never waiting longer than ``deadline`` seconds (then :class:`CheckFailed` with every rank's
    state from ``board``; the checkers run on gloo, where a wait blocks the host: NCCL's wait would only order a
    CUDA stream, so the deadline would not hold there). Waiting does not count against a :func:`labkit.checks.time_limit` around it. With
    ``hint_checking``, a rank in the checker's own code (:meth:`checking`) while others wait in a call is named as one
    that went on without it (as a returned one is).

    Subclass hooks: :meth:`on_call` (check or annotate a call before it goes, e.g. its ``phase``, which the
    stuck message shows as "during <phase>"; raise :class:`CheckFailed` to stop), :meth:`rank_name`,
    :meth:`stuck_hints` (what the ranks' states mean for this exercise), :meth:`moment`. :attr:`real` holds the
    functions the watched calls end in (torch's, as they were when the Watch was made, read from :attr:`real` at
    each call): a subclass may wrap them. Make a Watch while no other is installed."""

    def __init__(self, ops: Sequence[str], *, deadline: float, board: Board | None = None, defer: bool = False,
                 comm_too: bool = False, hint_checking: bool = False):
        self.ops = [op for op in ops if hasattr(dist, op)]
        self.deadline, self.board, self.defer, self.comm_too = deadline, board, defer, comm_too
        self.hint_checking = hint_checking
        self.calls: list[Call] = []
        self.phase = ""
        self.real: dict[str, Callable] = {n: getattr(dist, n) for n in set(self.ops) | set(_P2P.values())
                                          if hasattr(dist, n)}
        self._signatures = {n: inspect.signature(self.real[n]) for n in self.ops}

    # --- what the hooks see -------------------------------------------------------------------------------

    def moment(self) -> Any:
        """What a checker records at each ``wait()`` of an asynchronous call (e.g. how many gradients were
        ready); nothing by default."""
        return None

    def on_call(self, call: Call, args: dict) -> None:
        """Called before each call goes, with its arguments by name."""

    def rank_name(self, rank: int) -> str:
        return f"rank {rank}"

    def stuck_hints(self, states: dict[int, dict]) -> list[str]:
        """What the ranks' states mean; the default names collectives that differ between ranks, a rank that
        returned and a rank still in its own code."""
        hints, waiting = [], {r: s for r, s in states.items() if s["state"] == "waiting"}
        collectives = {r: s for r, s in waiting.items() if s["op"] not in _P2P}   # a receive from any rank has no
        kinds = {(s["op"], s.get("count")) for s in collectives.values()}         # peer either: not a collective
        if len(kinds) > 1:
            where = and_list(f"{self.rank_name(r)} in its {_nth(s.get('count', 0))} {s['op']}"
                             for r, s in sorted(collectives.items()))
            hints.append(f"→ the ranks wait in different calls ({where}): every rank must call the same "
                         f"collectives, in the same order, the same number of times.")
        for r, s in sorted(waiting.items()):
            other = waiting.get(s.get("peer"))
            if other is not None and other.get("peer") == r and other["op"] == s["op"] and r < s["peer"]:
                verb = "receive from" if s["op"] in ("recv", "irecv") else "send to"
                hints.append(f"→ {self.rank_name(r)} and {self.rank_name(s['peer'])} both wait to {verb} each "
                             f"other: each waits for the other. One side must {'send' if 'recv' in s['op'] else 'receive'} "
                             f"first (or both start their send and receive together, as comm.exchange does).")
        for r, s in sorted(states.items()):
            if s["state"] == "returned":
                hints.append(f"→ {self.rank_name(r)} has returned: it made fewer calls than the ranks that wait "
                             f"for it (a collective inside `if rank == ...`, or a loop that ends early?).")
            elif s["state"] == "running":
                hints.append(f"→ {self.rank_name(r)} is still running its own code: a very slow or endless "
                             f"computation?")
        hints += [f"→ {self.rank_name(r)} went on without that call: every rank must call the same collectives in "
                  f"the same order (a collective inside `if rank == ...:`?)." for r, s in sorted(states.items())
                  if self.hint_checking and s["state"] == "checking"]
        return hints

    # --- installing -------------------------------------------------------------------------------------

    @contextmanager
    def installed(self) -> Iterator["Watch"]:
        saved_dist = {n: getattr(dist, n) for n in self.ops}
        saved_comm = {n: getattr(comm, n) for n in self.ops if self.comm_too and hasattr(comm, n)}
        for n in self.ops:
            setattr(dist, n, self._watched(n))
        for n in saved_comm:
            setattr(comm, n, self._watched(n))
        self._state("running")
        try:
            yield self
        finally:
            for n, fn in saved_dist.items():
                setattr(dist, n, fn)
            for n, fn in saved_comm.items():
                setattr(comm, n, fn)

    def returned(self) -> None:
        """The student's function returned on this rank (for the others' messages if they get stuck)."""
        self._state("returned")

    def checking(self) -> None:
        """This rank is in the checker's own code again (e.g. its own exchange of results)."""
        self._state("checking")

    def running(self) -> None:
        """This rank is back in the student's code (e.g. after the checker's own exchange)."""
        self._state("running")

    # --- one call -----------------------------------------------------------------------------------------

    def _watched(self, op: str) -> Callable:
        def watched(*args, **kwargs):
            __tracebackhide__ = True
            return self._call(op, args, kwargs)
        watched.__name__ = op
        return watched

    def _call(self, op: str, args: tuple, kwargs: dict):
        __tracebackhide__ = True
        try:
            bound_args = self._signatures[op].bind(*args, **kwargs)
        except TypeError as exc:
            raise CheckFailed(f"dist.{op} was called with arguments it does not take: {exc}") from None
        named = dict(bound_args.arguments)
        tensor = named.get(_TENSOR.get(op, ""))
        if isinstance(tensor, (list, tuple)):
            tensor = tensor[0] if tensor else None
        group = named.get("group")
        peer = named.get("dst", named.get("src"))
        if peer is not None and not isinstance(peer, bool):
            try:
                peer = int(peer)            # an int, or a one-element tensor as torch accepts
            except (TypeError, ValueError, RuntimeError):
                pass
        if peer is not None and not isinstance(peer, int):    # on_call may still name it its own way
            bad_peer, peer = peer, None
        else:
            bad_peer = None
        reduce_op = named.get("op")
        user_async = bool(named.get("async_op", False)) or op in ("isend", "irecv")
        call = Call(index=len(self.calls), op=op, phase=self.phase,
                    numel=tensor.numel() if isinstance(tensor, torch.Tensor) else 0,
                    dtype=str(tensor.dtype).replace("torch.", "") if isinstance(tensor, torch.Tensor) else "",
                    group_size=dist.get_world_size(group), peer=peer,
                    reduce_op=None if reduce_op is None else str(reduce_op), async_op=user_async)
        self.on_call(call, named)
        if bad_peer is not None and call.peer is None:
            key = "dst" if "dst" in named else "src"
            raise CheckFailed(f"dist.{op} was called with {key}={bad_peer!r}: {key} is a rank, an int "
                              f"(0 .. {dist.get_world_size(group) - 1}).")
        self.calls.append(call)
        if op in _P2P:                       # a blocking send/recv is the non-blocking one, waited here
            real = self.real[_P2P[op]]
            call_args = {k: v for k, v in named.items() if k not in ("async_op",)}
        else:
            real = self.real[op]
            call_args = dict(named, async_op=True)
        targets = []
        if self.defer and user_async and op in _OUTPUT:
            # the result goes into copies; the student's tensors get it at wait(): a missing wait() leaves them
            # as they were, on every run (not a race with gloo's background thread)
            out = named[_OUTPUT[op]]
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            copies = [t.detach().clone() for t in outs]
            targets = list(zip(outs, copies))
            call_args[_OUTPUT[op]] = copies if isinstance(out, (list, tuple)) else copies[0]
        work = real(**call_args)
        handle = _Handle(self, call, work, targets)
        if user_async:
            return handle
        handle.wait()
        if op != "recv":
            return None
        return call.peer if call.peer is not None else work._source_rank()   # torch's recv returns the sender

    def _wait(self, work, call: Call) -> None:
        """``work.wait()``, but never longer than the deadline; the time does not count as the student's."""
        __tracebackhide__ = True
        self._state("waiting", op=call.op, peer=call.peer, index=call.index, phase=call.phase,
                    count=sum(c.op == call.op for c in self.calls[: call.index + 1]))
        box, done = {}, threading.Event()

        def run():
            try:
                work.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = exc
            finally:
                done.set()

        with time_limit_paused():
            threading.Thread(target=run, daemon=True).start()
            finished = done.wait(self.deadline)
        if not finished:
            raise CheckFailed(self._stuck_message(call))
        if "error" in box:
            if isinstance(box["error"], CheckFailed):       # the checker's own finding inside the wait (a subclass's)
                raise box["error"]
            states = self.board.states() if self.board else {}
            if any(s["state"] == "returned" for r, s in states.items() if r != self._rank()):
                raise CheckFailed(self._stuck_message(call, failed=box["error"]))
            raise box["error"]
        self._state("running")

    # --- the message of a stuck rank -----------------------------------------------------------------------

    def _rank(self) -> int:
        return dist.get_rank()

    def _stuck_message(self, call: Call, failed: BaseException | None = None) -> str:
        me = self._rank()
        what = f"dist.{call.op}" + (f" (peer {call.peer})" if call.peer is not None else "")
        when = f", during {call.phase}" if call.phase else ""
        nth = _nth(sum(c.op == call.op for c in self.calls[: call.index + 1]))
        if failed is None:
            head = (f"{self.rank_name(me)} waited {fmt_number(self.deadline)} s in its {nth} {what}{when}, and the "
                    f"other side never came: the run is deadlocked, and the check stopped it.")
        else:
            head = (f"{self.rank_name(me)}'s {nth} {what}{when} failed ({type(failed).__name__}) because another "
                    f"rank had already returned: the ranks did not make the same calls.")
        if self.board is None:
            return head
        time.sleep(0.2)   # let the other ranks' states settle (one of them may be about to wait too)
        states = self.board.states()
        lines = [f"  {self._describe(states.get(r), r)}" for r in range(self.board.world_size)]
        hints = self.stuck_hints(states)
        return head + "\nWhat every rank was doing:\n" + "\n".join(lines) + ("\n" + "\n".join(hints) if hints else "")

    def states_text(self) -> str:
        """``"\nWhat every rank was doing:"`` and a line per rank, from the board ("" without one)."""
        if self.board is None:
            return ""
        states = self.board.states()
        return "\nWhat every rank was doing:\n" + "\n".join(f"  {self._describe(states.get(r), r)}"
                                                             for r in range(self.board.world_size))

    def _describe(self, state: dict | None, rank: int) -> str:
        name = self.rank_name(rank)
        if state is None:
            return f"{name}: had not started"
        if state["state"] == "waiting":
            peer = f" (peer {state['peer']})" if state.get("peer") is not None else ""
            phase = f", during {state['phase']}" if state.get("phase") else ""
            return f"{name}: waiting in its {_nth(state.get('count', 0))} dist.{state['op']}{peer}{phase}"
        if state["state"] == "returned":
            return f"{name}: had returned from its function"
        if state["state"] == "checking":
            return f"{name}: had finished its part and was waiting for the others in the check"
        seconds = time.time() - state["time"]
        return f"{name}: running its own code, no call for {fmt_number(round(seconds, 1))} s"

    def _state(self, state: str, **info) -> None:
        if self.board is not None:
            self.board.set(state, **info)


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


class _Handle:
    """What a watched asynchronous call returns: ``wait()`` waits with the deadline, records the moment, and (with
    ``defer``) copies the result into the student's tensors."""

    def __init__(self, watch: Watch, call: Call, work, targets: list):
        self._watch, self._call, self._work, self._targets = watch, call, work, targets
        self._done = False

    def wait(self, timeout=None) -> bool:
        __tracebackhide__ = True
        self._call.waits.append(self._watch.moment())
        if not self._done:
            self._watch._wait(self._work, self._call)
            self._finish()
        return True

    def is_completed(self) -> bool:
        if not self._done and self._work.is_completed():
            self._finish()          # as torch's: once complete, the result is in the student's tensors
        return self._done

    def _finish(self) -> None:
        with torch.no_grad():
            for target, copy in self._targets:
                target.copy_(copy)
        self._done = True

    def is_success(self) -> bool:
        return self._work.is_success()

    def get_future(self):
        raise CheckFailed("During this check, wait for a call with its handle's wait() "
                          "(work = dist.all_reduce(buffer, async_op=True); ...; work.wait()), not get_future().")
