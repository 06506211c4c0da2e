"""Checkers for exercise 2, the ring all-reduce (``solutions/02_ring_allreduce_exercise.ipynb``).

    check_reduce_scatter_phase(reduce_scatter_phase)               # 2a, round by round
    check_all_gather_phase(all_gather_phase)                       # 2b, round by round
    check_ring_all_reduce(reduce_scatter_phase, all_gather_phase)  # both inside ring_all_reduce, vs dist.all_reduce
    check_left_ring_rounds(left_ring_rounds)                       # 2c, the design task: the ring to the left

Each prints one ``✓`` line when the code is right and raises :class:`labkit.checks.CheckFailed` naming
N, M, the round, the rank and the chunk, expected versus got, when it is not.

How the phase checkers watch each round. The student's function runs on N real processes (N = 3, 2, 4,
5; for each, M = 2N, 2N+1 and N-1 elements: divisible by N, not divisible, fewer elements than ranks)
and is handed an instrumented ``exchange``. Every call of it is one round. Before any data moves, the
ranks all-gather a description of their call (to whom, from whom, which chunk is sent, into what it is
received) and compare it with the schedule of :mod:`labkit.ring`. Every rank sees the same
descriptions, so all agree on whether the round is right; if it is not, they all stop at once: no rank
is left waiting, no message of the wrong size is ever sent, and a rank that returns early or calls
``exchange`` once too often is named instead of hanging. If the round is right, the chunk really
travels, over ``isend``/``irecv``.

The inputs are :func:`labkit.collectives.provenance_input` (16**r everywhere on rank r): any sum of
them says which ranks it contains and how often (:func:`labkit.collectives.decode_contributions`). The
chunks every rank holds after every round are compared with :func:`labkit.ring.simulate`, and a wrong
chunk is explained from what the round moved: a rank's own contribution gone (overwrite instead of
add), ranks counted twice (add instead of overwrite), the received chunk stored in the wrong place, a
chunk replaced in the list instead of changed in place. The all-gather is checked on its own: it
starts from what labkit's own reduce-scatter leaves.

2c is a design task, checked by behaviour (the end of this file): the student's rounds of the ring to the left
are replayed by :func:`labkit.ring.simulate` (any rounds pass that leave every chunk complete on every rank and
never count a rank twice), then run for real as the left-going half of
:func:`labkit.collectives.bidirectional_ring_all_reduce`. Known wrong versions: ``LEFT_RING_MISTAKES``.
"""

from __future__ import annotations

import operator
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from labkit import comm
from labkit.checks import (CheckFailed, describe, fail, first_mismatch, fmt_index, fmt_pair, passed, run_on_ranks,
                           time_limit, time_limit_paused)
from labkit.checks.harness import Mistake, call_student, find_mistake, need_function, plural
from labkit.collectives import bidirectional_ring_all_reduce, decode_contributions, provenance_input, ring_all_reduce
from labkit.collectives import reduce_scatter_phase as _reference_reduce_scatter
from labkit.ring import (ALL_GATHER, REDUCE_SCATTER, Round, Transfer, all_gather_rounds, all_reduce_rounds,
                         chunk_bounds, chunk_sizes, reduce_scatter_rounds, simulate)

__all__ = ["check_reduce_scatter_phase", "check_all_gather_phase", "check_ring_all_reduce", "compare_with_simulation",
           "check_left_ring_rounds", "LEFT_RING_MISTAKES", "WORLD_SIZES"]

# 3 first: the smallest ring in which the left and the right neighbour differ (so the first failure
# reported is the most readable one); 2 is the degenerate ring, 4 and 5 catch what only shows later.
WORLD_SIZES = (3, 2, 4, 5)


def _sizes(world_size: int) -> tuple[int, ...]:
    """Tensor sizes M tried on N ranks: divisible by N, not divisible, fewer elements than ranks."""
    return 2 * world_size, 2 * world_size + 1, world_size - 1


@dataclass(frozen=True)
class _Phase:
    name: str        # "reduce-scatter" or "all-gather", as in labkit.ring
    task: str        # the exercise id
    rounds: Callable  # labkit.ring's schedule of this phase: world_size -> [Round]
    shift: int       # in round j rank i sends chunk (i-j+shift) mod N and receives chunk (i-j+shift-1) mod N

    def first_state(self, world_size: int) -> int:
        """Where this phase starts in ``simulate(N)``'s states."""
        return 0 if self.name == REDUCE_SCATTER else world_size - 1

    def rule(self, offset: int = 0) -> str:
        """The chunk index rule, as the lesson writes it: '(i-j) mod N', '(i+1-j) mod N' ..."""
        k = self.shift + offset
        return "(i-j) mod N" if k == 0 else "(i+1-j) mod N" if k == 1 else f"(i-j{k:+d}) mod N"


_RS = _Phase(REDUCE_SCATTER, "2a", reduce_scatter_rounds, 0)
_AG = _Phase(ALL_GATHER, "2b", all_gather_rounds, 1)
_PHASES = {p.name: p for p in (_RS, _AG)}

# One row per rank per call of exchange (or per return from the student's function), all-gathered.
_KIND, _DST, _SRC, _SEND, _SEND_HOW, _SEND_NUMEL, _RECV, _RECV_NUMEL, _DTYPE, _STATE = range(10)
_WIDTH = 10
_EXCHANGE, _RETURNED = 0, 1            # _KIND
_VIEW, _COPY, _OTHER = 0, 1, 2         # _SEND_HOW: the chunk itself, an equal copy of it, anything else
_BAD_SEND_DTYPE, _BAD_RECV_DTYPE = 1, 2  # _DTYPE bits


# ============================================================================================
# Inside the workers: the instrumented exchange
# ============================================================================================

class _OffSchedule(BaseException):
    """Raised on every rank at once when a round is off the schedule. A BaseException, so that the
    student's ``except Exception`` does not swallow it."""


class _CheckedExchange:
    """``exchange(send, dst, recv, src)`` that checks each round against the schedule before moving data,
    and remembers, per call, every rank's description of it and this rank's chunks when it began."""

    def __init__(self, phase: _Phase, views: list, given: list, rank: int, world_size: int, numel: int):
        self.phase, self.views, self.given = phase, views, given
        self.rank, self.world_size, self.numel = rank, world_size, numel
        self.schedule = phase.rounds(world_size)
        start = phase.first_state(world_size)
        self.expected = simulate(world_size)[start:start + world_size]  # [t][rank][chunk]: contributing ranks
        self.transport = comm.exchange
        self.round = 0
        self.off = False
        self.rows: list = []      # per call: every rank's row
        self.states: list = []    # per call: this rank's chunks (lists of ints) when the call began
        self.rebound: list = []   # per call: chunk indices whose entry in the student's list was replaced
        self.combines: list = []  # per call of combine: (round it follows, chunk index of `mine` or -1)

    def __call__(self, send, dst, recv, src) -> None:
        __tracebackhide__ = True
        row = self._describe(send, dst, recv, src)
        with time_limit_paused():  # waiting here for a slow peer is not this rank's fault
            self._step(row)
            self.transport(send, row[_DST], recv, row[_SRC])
        self.round += 1

    def combine(self, mine, received) -> None:
        """The ``combine`` handed to the student's reduce-scatter: adds, and records how it was called."""
        self.combines.append((self.round - 1, self._chunk_of(mine) if isinstance(mine, torch.Tensor) else -1))
        mine.add_(received)

    def returned(self) -> None:
        """The student's function returned: tell the others (a rank still calling exchange is named)."""
        with time_limit_paused():
            self._step([_RETURNED] + [-1] * (_WIDTH - 1))

    def _step(self, row: list) -> None:
        if self.off:  # the student's code caught _OffSchedule and went on: stop again, without the others
            raise _OffSchedule
        state = [v.tolist() for v in self.views]
        self.states.append(state)
        self.rebound.append([c for c, (g, v) in enumerate(zip(self.given, self.views)) if g is not v])
        # This rank's chunks after `round` rounds: a wrong one stops every rank here too (the checker then
        # names it), so that nothing that goes wrong later (an exception, another size) can hide it.
        want = self.expected[min(self.round, len(self.expected) - 1)][self.rank]
        row[_STATE] = int(any(_first_wrong(values, want[c], self.world_size) is not None
                              for c, values in enumerate(state)))
        rows = comm.all_gather_objects(row)
        self.rows.append(rows)
        if any(r[_STATE] for r in rows) or _round_problem(self.phase, self.world_size, self.numel, self.round, rows):
            self.off = True
            raise _OffSchedule

    def _chunk_of(self, t: torch.Tensor) -> int:
        """The index of the chunk that ``t`` is (the same tensor, or a view of the same memory), else -1."""
        for c, v in enumerate(self.views):
            if t is v:
                return c
        for c, v in enumerate(self.views):
            if (t.numel() and t.numel() == v.numel() and t.dtype == v.dtype and t.is_contiguous()
                    and t.data_ptr() == v.data_ptr()):
                return c
        return -1

    def _describe(self, send, dst, recv, src) -> list:
        __tracebackhide__ = True
        usage = "exchange is called as exchange(send_tensor, dst_rank, recv_tensor, src_rank)"
        for what, t in (("send", send), ("recv", recv)):
            if not isinstance(t, torch.Tensor):
                raise CheckFailed(f"{usage}; here `{what}` is {_a(type(t).__name__)} ({t!r:.40}), not a tensor. "
                                  f"Pass the chunk itself (chunks[c]) or a buffer tensor, not an index.")
        ranks = []
        for what, r in (("dst", dst), ("src", src)):
            try:
                ranks.append(operator.index(r))
            except TypeError:
                raise CheckFailed(f"{usage}; here `{what}` is {_a(type(r).__name__)}, "
                                  f"not a rank number (int).") from None
        dtype = self.views[0].dtype
        expected = self.schedule[self.round].sent_by(self.rank).chunk if self.round < len(self.schedule) else -1
        send_id, how = self._chunk_of(send), _VIEW
        if send_id < 0:  # a copy of a chunk is fine; anything else is not one of the chunks
            same = [c for c, v in enumerate(self.views)
                    if send.dtype == dtype and v.shape == send.shape and torch.equal(v, send)]
            if expected in same or len(same) == 1:
                send_id, how = (expected if expected in same else same[0]), _COPY
            else:
                send_id, how = -1, _OTHER
        bits = (_BAD_SEND_DTYPE if send.dtype != dtype else 0) | (_BAD_RECV_DTYPE if recv.dtype != dtype else 0)
        return [_EXCHANGE, ranks[0], ranks[1], send_id, how, send.numel(), self._chunk_of(recv), recv.numel(), bits, 0]


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _phase_worker(phase_name: str, student_fn, name: str, sizes, seconds: float) -> list:
    """One rank: run the student's phase on each size M with the checked exchange; return what was seen."""
    phase = _PHASES[phase_name]
    rank, world_size = dist.get_rank(), dist.get_world_size()
    cases = []
    for numel in sizes:
        flat = provenance_input(rank, world_size, numel)
        views = [flat[a:b] for a, b in chunk_bounds(numel, world_size)]
        if phase is _AG:  # start from what a correct reduce-scatter leaves
            _reference_reduce_scatter(list(views), rank, world_size, comm.exchange)
        given = list(views)  # the student's list: its entries can be replaced, our views stay
        exchange = _CheckedExchange(phase, views, given, rank, world_size, numel)
        args = (given, rank, world_size, exchange) + ((exchange.combine,) if phase is _RS else ())
        with time_limit(seconds, f"{name} did not return within {seconds:g} s on rank {rank} (N={world_size} "
                                 f"ranks, M={numel} elements): an endless loop? (a `while` whose condition "
                                 f"never changes, a loop over the wrong range...)"):
            try:
                student_fn(*args)
                if not exchange.off:
                    exchange.returned()
            except _OffSchedule:
                exchange.off = True
        cases.append(dict(M=numel, rows=exchange.rows, states=exchange.states, rebound=exchange.rebound,
                          combines=exchange.combines))
        if exchange.off:
            break
    return cases


# ============================================================================================
# In the caller: the diagnosis
# ============================================================================================

def _case(world_size: int, numel: int) -> str:
    return f"N={world_size} ranks, M={numel} elements (chunk sizes {chunk_sizes(numel, world_size)})"


def _rounds_text(n: int) -> str:
    return plural(n, "round")


def _round_problem(phase: _Phase, N: int, M: int, j: int, rows: list) -> str | None:
    """What is wrong with call ``j`` of exchange (every rank's row), or None. Evaluated by every rank on
    the same rows (so that all stop together) and by the checker (for the message)."""
    n = N - 1
    returned = [i for i, row in enumerate(rows) if row[_KIND] == _RETURNED]
    calling = [i for i, row in enumerate(rows) if row[_KIND] == _EXCHANGE]
    head = _case(N, M)
    loop = "for j in range(world_size - 1)"
    if returned and calling:
        return (f"{head}: rank(s) {returned} returned after {_rounds_text(j)} while rank(s) {calling} called "
                f"exchange for round {j}. Every rank runs the same N-1 = {_rounds_text(n)} ({loop}) and calls exchange "
                f"once in each.")
    if returned:
        if j == n:
            return None
        if j == 0:
            return (f"{head}: returned without calling exchange. The {phase.name} takes N-1 = {_rounds_text(n)}, "
                    f"and in each round every rank calls exchange once: one chunk to the right, one from the left.")
        return f"{head}: returned after {_rounds_text(j)}; the {phase.name} takes N-1 = {_rounds_text(n)} ({loop})."
    if j >= n:
        return (f"{head}: every rank called exchange {j + 1} times, but the {phase.name} takes N-1 = "
                f"{_rounds_text(n)}, one exchange each ({loop}).")

    rnd, sizes = phase.rounds(N)[j], chunk_sizes(M, N)
    head = f"{head}, {phase.name} round {j}"
    for i, row in enumerate(rows):  # 1. to whom
        right = rnd.sent_by(i).receiver
        if row[_DST] != right:
            msg = f"{head}: rank {i} sent to rank {row[_DST]}, expected rank {right} (the right neighbour (i+1) mod N)"
            if row[_DST] == i:
                msg += f"; rank {i} sent to itself"
            elif not 0 <= row[_DST] < N:
                msg += f"; there is no rank {row[_DST]} (ranks are 0 ... {N - 1}: take it mod N)"
            if all(r[_DST] == (k - 1) % N for k, r in enumerate(rows)):
                msg += (". Every rank sent to its left neighbour: the ring goes the other way. Send to "
                        "(rank + 1) % world_size, receive from (rank - 1) % world_size")
            return msg + "."
    for i, row in enumerate(rows):  # 2. from whom
        left = rnd.received_by(i).sender
        if row[_SRC] != left:
            return (f"{head}: rank {i} received from rank {row[_SRC]}, expected rank {left} (the left neighbour "
                    f"(i-1) mod N: every rank sends to the right, so what arrives comes from the left).")
    for i, row in enumerate(rows):  # 3. which chunk
        want = rnd.sent_by(i).chunk
        if row[_SEND] != want:
            if row[_SEND] < 0:
                what = f"a tensor of {row[_SEND_NUMEL]} elements that is neither one of its chunks nor a copy of one"
            else:
                what = f"chunk {row[_SEND]}" + (" (a copy of it)" if row[_SEND_HOW] == _COPY else "")
            msg = f"{head}: rank {i} sent {what}, expected chunk {want} (in round j rank i sends chunk {phase.rule()})"
            offsets = {(r[_SEND] - rnd.sent_by(k).chunk) % N for k, r in enumerate(rows) if r[_SEND] >= 0}
            if len(offsets) == 1 and all(r[_SEND] >= 0 for r in rows):
                d = offsets.pop()
                d = d - N if d > N // 2 else d
                msg += (f". Every rank's chunk index is off by {d:+d}: it sent chunk {phase.rule(d)} instead of "
                        f"{phase.rule()}")
            return msg + "."
    for i, row in enumerate(rows):  # 4. dtypes
        if row[_DTYPE]:
            what = "sent" if row[_DTYPE] & _BAD_SEND_DTYPE else "received into"
            return (f"{head}: rank {i} {what} a tensor whose dtype is not the chunks' dtype (int64 in this check). "
                    f"Make buffers with torch.empty_like(chunks[c]) (same dtype and size), not torch.empty(n) or "
                    f"torch.zeros(n) (float32).")
    for i, row in enumerate(rows):  # 5. into which chunk, 6. how many elements
        arriving, left = rnd.received_by(i).chunk, rnd.received_by(i).sender
        if row[_RECV] >= 0 and row[_RECV] != arriving:
            return (f"{head}: rank {i} received into its chunk {row[_RECV]}, but the chunk arriving from rank {left} "
                    f"is chunk {arriving} (in round j rank i receives chunk {phase.rule(-1)}).")
        if row[_RECV_NUMEL] != sizes[arriving]:
            msg = (f"{head}: rank {i} received into a tensor of {row[_RECV_NUMEL]} elements, but chunk {arriving}, "
                   f"which arrives from rank {left}, has {sizes[arriving]}: the receive buffer must have the size of "
                   f"the arriving chunk, e.g. torch.empty_like(chunks[{arriving}])")
            sent = rnd.sent_by(i).chunk
            if row[_RECV_NUMEL] == sizes[sent]:
                msg += (f". ({row[_RECV_NUMEL]} is the size of chunk {sent}, the one rank {i} sends: when N does not "
                        f"divide M the chunks differ in size.)")
            return msg if msg.endswith(")") else msg + "."
    return None


def _counts_text(counts: dict, expected: frozenset) -> str:
    """{0: 2, 1: 1} -> 'the contributions of ranks {0: 2, 1: 1} (rank 0 counted twice; rank 2 missing)'."""
    if "unreadable" in counts:
        return (f"the value {counts['unreadable']}, which no sum of the inputs gives (rank r puts in 16**r): "
                f"memory that was never written, or not a sum")
    if not counts:
        return "0: no rank's contribution at all"
    listed = ("{" + ", ".join(str(r) for r in counts) + "}" if all(c == 1 for c in counts.values())
              else "{" + ", ".join(f"{r}: {c}" for r, c in counts.items()) + "}")
    notes = []
    for times in sorted({c for c in counts.values() if c > 1}):
        ranks = [r for r, c in counts.items() if c == times]
        word = "twice" if times == 2 else f"{times} times"
        notes.append(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} counted {word}")
    for label, ranks in (("missing", sorted(expected - set(counts))),
                         ("not expected yet", sorted(set(counts) - expected))):
        if ranks:
            notes.append(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} {label}")
    return f"the contributions of ranks {listed}" + (f" ({'; '.join(notes)})" if notes else "")


def _set_text(ranks) -> str:
    return "{" + ", ".join(str(r) for r in sorted(ranks)) + "}"


def _ones(ranks) -> dict:
    return {r: 1 for r in sorted(ranks)}


def _merged(a: dict, b: dict) -> dict:
    return {r: a.get(r, 0) + b.get(r, 0) for r in sorted(set(a) | set(b))}


def _first_wrong(values: list, want: frozenset, world_size: int) -> int | None:
    """The first element of a chunk (provenance values) whose contributions are not exactly ``want``."""
    for k, v in enumerate(values):
        if decode_contributions(v, world_size) != _ones(want):
            return k
    return None


def _state_problem(phase: _Phase, N: int, M: int, t: int, records: list, expected: list) -> str | None:
    """What is wrong with the chunks after ``t`` rounds of the phase, on any rank, or None.
    ``expected[t][rank][chunk]``: simulate's sets of contributing ranks."""
    bounds = chunk_bounds(M, N)
    for rank in range(N):
        chunks = records[rank]["states"][t]
        for c in range(N):
            want = expected[t][rank][c]
            values = chunks[c]
            k = _first_wrong(values, want, N)
            if k is None:
                continue
            got = decode_contributions(values[k], N)
            where = f"rank {rank}'s chunk {c}"
            if len(set(values)) > 1:
                where += f" (its element {k}, element {bounds[c][0] + k} of the tensor)"
            when = "before the first round" if t == 0 else f"after {phase.name} round {t - 1}"
            return (f"{_case(N, M)}, {when}: {where} holds {_counts_text(got, want)}, expected {_set_text(want)}"
                    + _state_hint(phase, N, t, rank, c, got, expected, records))
    return None


def _state_hint(phase: _Phase, N: int, t: int, rank: int, c: int, got: dict, expected: list, records: list) -> str:
    """Why chunk ``c`` of ``rank`` is wrong after ``t`` rounds, from what round t-1 moved."""
    if t == 0:
        return ". Your function changed the chunks before its first exchange."
    j = t - 1
    arrived = phase.rounds(N)[j].received_by(rank)
    rc, left = arrived.chunk, arrived.sender
    before, incoming = _ones(expected[j][rank][c]), _ones(expected[j][left][rc])
    rs = phase is _RS
    if c in records[rank]["rebound"][t]:
        fix = (f"combine(chunks[{c}], received)" if rs
               else f"chunks[{c}].copy_(received), or receive straight into chunks[{c}]")
        return (f". chunks[{c}] is no longer the chunk your function was given: an assignment such as chunks[{c}] = "
                f"chunks[{c}] + received makes a new tensor and leaves the real chunk as it was. Change the chunk "
                f"in place: {fix}.")
    if c != rc:
        msg = (f". In round {j} rank {rank} received chunk {rc} (from rank {left}), so its chunk {c} should not have "
               f"changed (it held {_set_text(before)})")
        if got in (incoming, _merged(before, incoming)):
            msg += (f": did what arrived go into chunk {c} instead of chunk {rc}? In round j rank i receives chunk "
                    f"{phase.rule(-1)}")
        return msg + "."
    if got == before:
        if not rs:
            return (f". In round {j} rank {rank} received chunk {c} from rank {left}, but its chunk {c} did not "
                    f"change: store what arrives in the chunk (receive straight into chunks[{c}]); the next round "
                    f"sends it on.")
        calls = [mine for k, mine in records[rank]["combines"] if k == j]
        if -1 in calls:
            return (f". In round {j} rank {rank} received chunk {c} from rank {left}, but its chunk {c} did not "
                    f"change, and combine was called with something else than a chunk first: combine(mine, "
                    f"received) adds `received` into `mine`, so pass your chunk first: combine(chunks[{c}], received).")
        return (f". In round {j} rank {rank} received chunk {c} from rank {left}, but its chunk {c} did not change: "
                f"after the exchange, add what arrived into it with combine(chunks[{c}], received).")
    if rs and got == incoming:
        return (f". In round {j} rank {rank} received chunk {c} from rank {left} ({_set_text(incoming)}), and it "
                f"replaced rank {rank}'s own copy ({_set_text(before)}) instead of being added to it: overwrite "
                f"instead of add. Receive into a separate buffer, then combine(chunks[{c}], buffer).")
    if not rs and got == _merged(before, incoming):
        return (f". In round {j} rank {rank} received the complete chunk {c} from rank {left} and added it to its own "
                f"partial copy ({_set_text(before)}): add instead of overwrite. In the all-gather every chunk that "
                f"arrives is already complete: overwrite your copy (receive straight into chunks[{c}]).")
    if rs:
        return (f". In round {j} rank {rank} receives chunk {c} from rank {left}, which holds {_set_text(incoming)}, "
                f"and adds it, once, to its own copy {_set_text(before)}.")
    return (f". In round {j} rank {rank} receives the complete chunk {c} from rank {left} and overwrites its own "
            f"copy with it.")


def _diagnose(phase: _Phase, N: int, records: list) -> str | None:
    """The first thing wrong in one case (one M on N ranks), round by round: the chunks after t rounds,
    then the t-th call of exchange."""
    M, rows = records[0]["M"], records[0]["rows"]
    start = phase.first_state(N)
    expected = simulate(N)[start:start + N]
    for t in range(len(rows)):
        problem = _state_problem(phase, N, M, t, records, expected) or _round_problem(phase, N, M, t, rows[t])
        if problem:
            return problem
    if phase is _RS and N > 1:
        lazy = [r for r, record in enumerate(records) if not record["combines"]]
        if lazy:
            return (f"{_case(N, M)}: every round is right, but rank(s) {lazy} never called combine: the sums are "
                    f"right because your code adds by itself, but ring_all_reduce(op='max') hands the phase "
                    f"combine=torch.maximum. Merge what arrives with combine(chunks[c], received).")
    return None



def _check_phase(phase: _Phase, student_fn, world_sizes, timeout: float) -> None:
    __tracebackhide__ = True
    name = getattr(student_fn, "__name__", "your function")
    if not callable(student_fn):
        fail(f"check the {phase.name} with your function, not a {type(student_fn).__name__}")
    for N in world_sizes:
        per_rank = run_on_ranks(_phase_worker, phase.name, student_fn, name, _sizes(N), 0.6 * timeout,
                           world_size=N, timeout=timeout, name=name, task=phase.task)
        for k in range(len(per_rank[0])):
            problem = _diagnose(phase, N, [cases[k] for cases in per_rank])
            if problem:
                fail(f"{name} is wrong: {problem}")
    sizes = ", ".join(str(n) for n in sorted(world_sizes))
    what = "sends the right chunk to the right neighbour" + (" and adds what arrives"
                                                             if phase is _RS else " and stores what arrives")
    passed(f"{name} is correct on world sizes {sizes} (M = 2N, 2N+1 and N-1 elements): every round {what}, and "
           f"after every round each rank's chunks hold exactly what labkit.ring.simulate says")


def check_reduce_scatter_phase(student_fn, *, world_sizes=WORLD_SIZES, timeout: float = 5.0) -> None:
    """Check exercise 2a: ``student_fn(chunks, rank, world_size, exchange, combine)`` is the reduce-scatter
    of labkit.ring's schedule: in round j rank i sends chunk (i-j) mod N to rank (i+1) mod N, receives chunk
    (i-j-1) mod N from rank (i-1) mod N and combines it into its own copy; afterwards rank i holds chunk
    (i+1) mod N summed over all ranks. Checked round by round on real processes (see the module's doc).
    ``timeout``: seconds before a rank that hangs is stopped."""
    __tracebackhide__ = True
    _check_phase(_RS, student_fn, world_sizes, timeout)


def check_all_gather_phase(student_fn, *, world_sizes=WORLD_SIZES, timeout: float = 5.0) -> None:
    """Check exercise 2b: ``student_fn(chunks, rank, world_size, exchange)`` is the all-gather of
    labkit.ring's schedule, starting where labkit's reduce-scatter leaves the chunks: in round j rank i
    sends chunk (i+1-j) mod N to rank (i+1) mod N and overwrites its chunk (i-j) mod N with what arrives
    from rank (i-1) mod N. Checked round by round on real processes (see the module's doc)."""
    __tracebackhide__ = True
    _check_phase(_AG, student_fn, world_sizes, timeout)


# ============================================================================================
# Both phases inside ring_all_reduce, against dist.all_reduce
# ============================================================================================

# (shape, op): divisible, not divisible (and 2-D), fewer elements than ranks, then the other ops.
_ALL_REDUCE_CASES = (((12,), "sum"), ((3, 5), "sum"), ((2,), "sum"), ((4, 3), "max"), ((7,), "avg"))


def _all_reduce_worker(reduce_scatter, all_gather, cases, seconds: float) -> list:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(200 + rank)
    out = []
    for shape, op in cases:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        want = x.clone()
        comm.all_reduce(want, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "avg":
            want /= world_size
        with time_limit(seconds, f"ring_all_reduce with your phases did not return within {seconds:g} s on N="
                                 f"{world_size} ranks (x of shape {shape}, op={op!r}): a rank waits for a message "
                                 f"that never comes (the sends and receives of the ranks do not match up), or "
                                 f"loops forever"):
            got = ring_all_reduce(x.clone(), op, reduce_scatter=reduce_scatter, all_gather=all_gather)
        out.append((got, want))
    return out


def check_ring_all_reduce(reduce_scatter, all_gather, *, world_sizes=(3, 4), timeout: float = 5.0) -> None:
    """Check 2a and 2b together: ``ring_all_reduce(x, op, reduce_scatter=..., all_gather=...)`` with the
    student's two phases gives what ``dist.all_reduce`` gives, on float64 tensors of several shapes
    (M divisible by N or not, M < N, 2-D), with the ops sum, max (the reduce-scatter must use the
    ``combine`` it is handed) and avg."""
    __tracebackhide__ = True
    for fn in (reduce_scatter, all_gather):
        if not callable(fn):
            fail(f"check_ring_all_reduce needs your two functions, not a {type(fn).__name__}")
    rs_name, ag_name = (getattr(f, "__name__", "your function") for f in (reduce_scatter, all_gather))
    name = f"ring_all_reduce with {rs_name} and {ag_name}"
    for N in world_sizes:
        try:
            results = run_on_ranks(_all_reduce_worker, reduce_scatter, all_gather, _ALL_REDUCE_CASES, 0.6 * timeout,
                              world_size=N, timeout=timeout, name=name, task="2a/2b")
        except CheckFailed as exc:
            fail(f"{exc}\n\ncheck_reduce_scatter_phase and check_all_gather_phase say which round goes wrong.")
        for k, (shape, op) in enumerate(_ALL_REDUCE_CASES):
            for rank in range(N):
                got, want = results[rank][k]
                if got.shape != want.shape:
                    fail(f"{name}, N={N} ranks, x of shape {tuple(shape)}, op={op!r}: rank {rank} got a result of "
                         f"shape {tuple(got.shape)}")
                bad = first_mismatch(want, got, rtol=1e-9, atol=1e-12)
                if bad:
                    index, e, g = bad
                    e, g = fmt_pair(e, g)
                    hint = ("With op='sum' it is right: does your reduce_scatter_phase add by itself instead of "
                            "calling combine? For op='max' ring_all_reduce hands it combine=torch.maximum."
                            if op == "max" else "check_reduce_scatter_phase and check_all_gather_phase say which "
                                                "round goes wrong.")
                    fail(f"{name}, N={N} ranks, x of shape {tuple(shape)}, op={op!r}: rank {rank}, element "
                         f"{fmt_index(index)}: expected {e} (what dist.all_reduce gives), got {g}. {hint}")
    passed(f"{name} matches dist.all_reduce on {', '.join(map(str, world_sizes))} ranks: "
           f"{len(_ALL_REDUCE_CASES)} float64 tensors (M divisible by N or not, M < N, 2-D), ops sum, max, avg")


# ============================================================================================
# A trace of ring_all_reduce (the notebook's demo cell), against the simulation
# ============================================================================================

def compare_with_simulation(traces: list) -> None:
    """``traces[rank]``: the records of ``ring_all_reduce(provenance_input(...), trace=...)`` on every rank. Prints
    "every round is the simulation above" when every round sent what labkit.ring's schedule says and left every
    element of every chunk holding each rank's contribution exactly as often as :func:`labkit.ring.simulate` says;
    otherwise raises :class:`CheckFailed` naming the first round, rank, chunk and element that differ."""
    __tracebackhide__ = True
    N = len(traces)
    rounds, states = all_reduce_rounds(N), simulate(N)
    for rank, records in enumerate(traces):
        if len(records) != len(rounds):
            fail(f"rank {rank} recorded {_rounds_text(len(records))}, but the ring takes 2(N-1) = "
                 f"{_rounds_text(len(rounds))} on N={N} ranks (N-1 of the reduce-scatter, N-1 of the all-gather)")
    for t, rnd in enumerate(rounds, start=1):
        when = f"{rnd.phase} round {rnd.index}"
        for rank, records in enumerate(traces):
            rec, sent = records[t - 1], rnd.sent_by(rank)
            if (rec["sent_to"], rec["sent_chunk"]) != (sent.receiver, sent.chunk):
                fail(f"{when}: rank {rank} sent chunk {rec['sent_chunk']} to rank {rec['sent_to']}; the simulation "
                     f"sends chunk {sent.chunk} to rank {sent.receiver}")
            for c, chunk in enumerate(rec["chunks"]):
                want = states[t][rank][c]
                k = _first_wrong([int(v) for v in chunk.reshape(-1).tolist()], want, N)
                if k is not None:
                    got = decode_contributions(int(chunk.reshape(-1)[k]), N)
                    phase = _PHASES[rnd.phase]
                    start = phase.first_state(N)
                    seen = [dict(rebound=[[]] * N, combines=[(rnd.index, c)])] * N   # a trace records neither
                    fail(f"{when}: rank {rank}'s chunk {c} (element {k}) holds {_counts_text(got, want)}; the "
                         f"simulation above has {_set_text(want)}" + _state_hint(
                             phase, N, rnd.index + 1, rank, c, got, states[start:start + N], seen))
    print("every round is the simulation above")


# ============================================================================================
# 2c. The ring to the left, and the bidirectional ring: a design task, checked by behaviour
# ============================================================================================
# The task: left_ring_rounds(N) returns the 2(N-1) rounds (labkit.ring.Round) of an all-reduce in which rank i
# sends only to its left neighbour (i-1) mod N. Checked by simulation, not against a formula: any rounds pass whose
# labkit.ring.simulate ends with every chunk complete on every rank, no rank ever counted twice, on N = 1 .. 8.
# Then they run for real as the left-going half of labkit.collectives.bidirectional_ring_all_reduce (labkit's ring
# to the right carries the other half), against dist.all_reduce. labkit's answer: all_reduce_rounds(N, direction=-1).

LEFT_SIZES = (3, 2, 4, 5, 1, 6, 7, 8)  # simulated; 3 first: the smallest ring in which left and right differ
LEFT_RUN_SIZES = (3, 2, 4, 5, 1)       # run for real
_SECONDS = 2.0                         # for one call of the student's (pure) function


def _left_cases(world_size: int) -> tuple:
    """(shape, op) run for real: halves whose chunks are uneven, fewer elements than 2N, a 2-D tensor with max."""
    return (((4 * world_size + 3,), "sum"), ((world_size + 1,), "sum"), ((3, 5), "max"))


def _redirected(rounds: list, step: int) -> list:
    """The same rounds, every transfer sent to (sender + step) mod N instead: the chunks unchanged."""
    n = len(rounds[0].transfers) if rounds else 1
    return [Round(r.phase, r.index, tuple(Transfer(t.sender, (t.sender + step) % n, t.chunk) for t in r.transfers))
            for r in rounds]


def _masked(n: int) -> list:
    """labkit's rounds to the left with ``& (N - 1)`` in place of ``mod N`` (the same numbers when N is a power of 2)."""
    return [Round(r.phase, r.index, tuple(Transfer(i, (i - 1) & (n - 1), (i + r.index - (r.phase == ALL_GATHER))
                                                   & (n - 1)) for i in range(n)))
            for r in all_reduce_rounds(n, direction=-1)]


_LEFT_PHASES = ("On the left ring rank i receives from its right neighbour (i+1) mod N, so the chunk indices "
                "must run the other way too.")

# Known wrong versions, small changes of labkit's answer (all_reduce_rounds(N, direction=-1)); the student's rounds
# are compared with each at the first N where they fail. ``says``: the diagnosis {problem}, then the mistake named.
LEFT_RING_MISTAKES = (
    Mistake("the ring of 2a and 2b unchanged", lambda n: all_reduce_rounds(n),
            "{problem} These are the rounds of 2a and 2b unchanged. The task is the ring in the other direction, "
            "where rank i sends only to rank (i-1) mod N. " + _LEFT_PHASES),
    Mistake("the sign of j flipped", lambda n: _redirected(all_reduce_rounds(n), -1),
            "{problem} Your rounds send to the left but keep the chunk indices of 2a and 2b, (i-j) mod N and (i+1-j) "
            "mod N: the sign of j is that of the ring to the right. " + _LEFT_PHASES),
    Mistake("the all-gather starts one chunk off",
            lambda n: reduce_scatter_rounds(n, direction=-1) + all_gather_rounds(n, shift=0, direction=-1),
            "{problem} Your reduce-scatter is right, but the all-gather starts one chunk off: in its round 0 every "
            "rank must send the chunk that the reduce-scatter completed on it (simulate(N, rounds)[N-1] shows which)."),
    Mistake("2b's +1 kept in the all-gather",
            lambda n: reduce_scatter_rounds(n, direction=-1) + all_gather_rounds(n, shift=-1, direction=-1),
            "{problem} Your reduce-scatter is right, but the all-gather starts from chunk (i+1) mod N, as 2b does: on "
            "the ring to the left the reduce-scatter leaves rank i another chunk complete (simulate(N, rounds)[N-1] "
            "shows which)."),
    Mistake("N-2 rounds per phase",
            lambda n: reduce_scatter_rounds(n, direction=-1)[:-1] + all_gather_rounds(n, direction=-1)[:-1],
            "{problem} Each phase has N-2 rounds, one too few: in the reduce-scatter a chunk must visit all N ranks, "
            "N-1 hops, and in the all-gather a complete chunk must reach the N-1 other ranks."),
    Mistake("right only for powers of two", _masked,
            "{problem} Your rounds are right only when N is a power of two: x & (N-1) equals x mod N only then. "
            "Take indices with % world_size."),
)


def _canonical(rounds) -> list | None:
    """Rounds as plain tuples (a list of transfers compares equal to a tuple of them), or None if not rounds."""
    if not isinstance(rounds, (list, tuple)) or not all(isinstance(r, Round) for r in rounds):
        return None
    try:
        return [(r.phase, r.index, tuple(r.transfers)) for r in rounds]
    except TypeError:
        return None


def _as_int(x) -> int | None:
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _left_structure(N: int, result, head: str) -> tuple[str | None, list]:
    """(what is wrong with the rounds' form, or None; the rounds with plain ints and tuples)."""
    n_rounds = f"2(N-1) = {_rounds_text(2 * (N - 1))} (N-1 reduce-scatter rounds, then N-1 all-gather rounds)"
    if not isinstance(result, (list, tuple)):
        what = "a generator" if isinstance(result, types.GeneratorType) else describe(result)
        return f"{head} returned {what}: return a list of labkit.ring.Round, the {n_rounds}.", []
    rounds = []
    for k, rnd in enumerate(result):
        if not isinstance(rnd, Round):
            return (f"{head}: item {k} of your list is {describe(rnd)}, not a labkit.ring.Round: make each round "
                    f"with Round(phase, j, transfers)."), []
        where = f"{head}: item {k} ({rnd.phase} round {rnd.index})"
        if rnd.phase not in (REDUCE_SCATTER, ALL_GATHER):
            return (f"{head}: item {k} has phase {rnd.phase!r}: a round's phase is {REDUCE_SCATTER!r} (the receiver "
                    f"adds) or {ALL_GATHER!r} (the receiver overwrites)."), []
        if _as_int(rnd.index) is None:
            return f"{where}: its index is {describe(rnd.index)}, not an int: the round's number j within its phase.", []
        if not isinstance(rnd.transfers, (list, tuple)) or len(rnd.transfers) != N:
            got = (f"{len(rnd.transfers)} transfers" if isinstance(rnd.transfers, (list, tuple))
                   else f"transfers that are {describe(rnd.transfers)}")
            return (f"{where} has {got} for N = {N} ranks: one Transfer per rank, every rank sends one chunk in "
                    f"every round."), []
        transfers = []
        for i, t in enumerate(rnd.transfers):
            if not isinstance(t, Transfer):
                return (f"{where}: transfers[{i}] is {describe(t)}, not a labkit.ring.Transfer(sender, receiver, "
                        f"chunk)."), []
            sender, receiver, chunk = (_as_int(x) for x in (t.sender, t.receiver, t.chunk))
            if sender is None or receiver is None or chunk is None:
                return f"{where}: transfers[{i}] is {t}: its sender, receiver and chunk must be ints.", []
            if sender != i:
                return (f"{where}: transfers[{i}] is rank {sender}'s; list them by sender: transfers[i] is what rank "
                        f"i sends (Round.sent_by(i) reads transfers[i])."), []
            for what, x in (("sends to rank", receiver), ("sends chunk", chunk)):
                if not 0 <= x < N:
                    return (f"{where}: rank {i} {what} {x}, but there are N = {N} ({'ranks' if 'rank' in what else 'chunks'} "
                            f"0 .. {N - 1}): take the index mod N."), []
            transfers.append(Transfer(sender, receiver, chunk))
        rounds.append(Round(rnd.phase, int(rnd.index), tuple(transfers)))
    for k, rnd in enumerate(rounds):  # every rank sends to its left neighbour
        for t in rnd.transfers:
            left = (t.sender - 1) % N
            if t.receiver != left:
                msg = (f"{head}: {rnd.phase} round {rnd.index} (item {k}): rank {t.sender} sends to rank {t.receiver}, "
                       f"expected its left neighbour, rank {left} ((i-1) mod N)")
                if all(u.receiver == (u.sender + 1) % N for r in rounds for u in r.transfers):
                    msg += ". Every rank sends to its right neighbour (i+1) mod N: that is the ring of 2a and 2b"
                return msg + ".", rounds
    phases = [r.phase for r in rounds]
    if ALL_GATHER in phases and REDUCE_SCATTER in phases[phases.index(ALL_GATHER):]:
        k = phases.index(REDUCE_SCATTER, phases.index(ALL_GATHER))
        return (f"{head}: item {k} is a reduce-scatter round after an all-gather round: first the N-1 reduce-scatter "
                f"rounds, then the N-1 all-gather rounds."), rounds
    n_rs, n_ag = phases.count(REDUCE_SCATTER), phases.count(ALL_GATHER)
    if (n_rs, n_ag) != (N - 1, N - 1):
        msg = (f"{head}: {plural(n_rs, 'reduce-scatter round')} and {plural(n_ag, 'all-gather round')}; the all-reduce "
               f"takes N-1 = {N - 1} of each, {n_rounds.split(' (')[0]} in all.")
        if n_rs + n_ag < 2 * (N - 1):
            final = simulate(N, rounds)[-1]
            rank, c = next((r, c) for r in range(N) for c in range(N) if final[r][c] != frozenset(range(N)))
            msg += (f" After your {_rounds_text(len(rounds))} rank {rank}'s chunk {c} holds "
                    f"{_holds(final[rank][c], N)}, expected {_set_text(range(N))}.")
        return msg, rounds
    for k, rnd in enumerate(rounds):
        j = k if k < N - 1 else k - (N - 1)
        if rnd.index != j:
            return (f"{head}: item {k} is {rnd.phase} round {rnd.index}, expected {rnd.phase} round {j}: a round's "
                    f"index counts the rounds of its phase from 0."), rounds
    return None, rounds


def _holds(ranks, N: int) -> str:
    """{0, 1} (rank 2 missing)."""
    missing = sorted(set(range(N)) - set(ranks))
    return _set_text(ranks) + (f" (rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} missing)"
                               if missing else "")


def _passed_on(phase_rounds: list, N: int) -> str:
    """The first rank that does not send on, in round j of a phase, the chunk it received in round j-1 (a chunk that is
    not passed on stops travelling), as a sentence; empty if there is none."""
    for j in range(1, len(phase_rounds)):
        for i in range(N):
            sent, got = phase_rounds[j].sent_by(i), phase_rounds[j - 1].received_by(i)
            if sent.chunk != got.chunk:
                return (f" In {phase_rounds[j].phase} round {j} rank {i} sends chunk {sent.chunk}, but the "
                        f"chunk it received in round {j - 1} (from rank {got.sender}) is chunk {got.chunk}: a chunk "
                        f"that is not passed on stops travelling round the ring.")
    return ""


def _left_problem(N: int, result, head: str) -> str | None:
    """What is wrong with ``result`` as the rounds of the ring to the left on N ranks, or None (checked with
    labkit.ring.simulate: no rank counted twice, every chunk complete on every rank at the end)."""
    problem, rounds = _left_structure(N, result, head)
    if problem:
        return problem
    everyone = frozenset(range(N))
    states = simulate(N, rounds)
    rs, ag = rounds[:N - 1], rounds[N - 1:]
    for t, rnd in enumerate(rs):  # adding a copy that holds a rank the receiver's copy holds already
        for tr in rnd.transfers:
            incoming, own = states[t][tr.sender][tr.chunk], states[t][tr.receiver][tr.chunk]
            if incoming & own:
                twice = sorted(incoming & own)
                return (f"{head}: reduce-scatter round {rnd.index}: rank {tr.sender} sends chunk {tr.chunk}, which "
                        f"holds {_set_text(incoming)}, to rank {tr.receiver}, whose chunk {tr.chunk} holds "
                        f"{_set_text(own)} already: adding it counts rank{'s' if len(twice) > 1 else ''} "
                        f"{', '.join(map(str, twice))} twice." + _passed_on(rs, N))
    after_rs = states[N - 1]
    for c in range(N):
        if not any(after_rs[r][c] == everyone for r in range(N)):
            best = max(range(N), key=lambda r: len(after_rs[r][c]))
            firsts = [rnd.sent_by(i).chunk for i in range(N) for rnd in rs[:1]]
            twice = sorted({x for x in firsts if firsts.count(x) > 1})
            same = [str(i) for i in range(N) if firsts[i] == twice[0]] if twice else []
            hint = (f" In reduce-scatter round 0 ranks {_and(same)} {'both' if len(same) == 2 else 'all'} send chunk "
                    f"{twice[0]}, and no rank sends chunk {min(set(range(N)) - set(firsts))}: each chunk starts its "
                    f"trip round the ring on one rank." if twice else _passed_on(rs, N))
            return (f"{head}: after the reduce-scatter's N-1 = {_rounds_text(N - 1)} no rank holds chunk {c} "
                    f"complete: the most is rank {best}'s, {_holds(after_rs[best][c], N)}, expected "
                    f"{_set_text(everyone)} on one rank." + hint)
    final = states[-1]
    incomplete = next(((r, c) for r in range(N) for c in range(N) if final[r][c] != everyone), None)
    end = (f" After all {_rounds_text(len(rounds))} rank {incomplete[0]}'s chunk {incomplete[1]} holds "
           f"{_holds(final[incomplete[0]][incomplete[1]], N)}, expected {_set_text(everyone)}." if incomplete else "")
    for t, rnd in enumerate(ag, start=N - 1):  # what arrives overwrites: it must be complete
        for tr in rnd.transfers:
            sent = states[t][tr.sender][tr.chunk]
            if sent != everyone:
                if rnd.index == 0:
                    own = [c for c in range(N) if after_rs[tr.sender][c] == everyone]
                    hint = (f" After the reduce-scatter rank {tr.sender} holds chunk {own[0]} complete." if own
                            else "")
                else:
                    hint = _passed_on(ag, N)
                return (f"{head}: all-gather round {rnd.index}: rank {tr.sender} sends its chunk {tr.chunk} to rank "
                        f"{tr.receiver}, but that copy is incomplete, {_holds(sent, N)}, and rank {tr.receiver} "
                        f"overwrites its own copy with it." + hint + end)
    if incomplete:
        r, c = incomplete
        wasted = next(((rnd, tr) for t, rnd in enumerate(ag, start=N - 1) for tr in rnd.transfers
                       if states[t][tr.receiver][tr.chunk] == everyone), None)
        hint = (f" In all-gather round {wasted[0].index} rank {wasted[1].sender} sends chunk {wasted[1].chunk} to rank "
                f"{wasted[1].receiver}, which holds it complete already: that message is wasted."
                if wasted else "")
        return f"{head}: after all {_rounds_text(len(rounds))} rank {r}'s chunk {c} holds {_holds(final[r][c], N)}, " \
               f"expected {_set_text(everyone)}." + hint
    return None


def _bidirectional_worker(left_rounds: list, cases: tuple) -> list:
    """One rank: the bidirectional ring with the student's rounds on the left-going half, and dist.all_reduce."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(300 + rank)
    out = []
    for shape, op in cases:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        want = x.clone()
        comm.all_reduce(want, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        got = bidirectional_ring_all_reduce(x.clone(), op, left_rounds=left_rounds, check=False)
        out.append((got, want))
    return out


def _run_bidirectional(name: str, N: int, rounds: list, timeout: float) -> None:
    """Run ``rounds`` as the left-going half of labkit's bidirectional ring on N processes; fail on a difference
    from dist.all_reduce, naming the rank, the element and which half it is in."""
    __tracebackhide__ = True
    cases = _left_cases(N)
    results = run_on_ranks(_bidirectional_worker, rounds, cases, world_size=N, timeout=timeout, name=name, task="2c")
    for k, (shape, op) in enumerate(cases):
        numel = 1
        for d in shape:
            numel *= d
        (_, b), _ = chunk_bounds(numel, 2)
        for rank in range(N):
            got, want = results[rank][k]
            bad = first_mismatch(want, got, rtol=1e-9, atol=1e-12)
            if bad:
                index, e, g = bad
                e, g = fmt_pair(e, g)
                flat = 0
                for i, d in zip(index, shape):
                    flat = flat * d + i
                half = ("the first half, which labkit's ring to the right carries" if flat < b else
                        f"the second half (elements {b} .. {numel - 1}), which your rounds carry")
                fail(f"{name} is wrong: run for real as the left-going half of the bidirectional ring "
                     f"(labkit.collectives.bidirectional_ring_all_reduce) on N={N} ranks, x of shape {shape}, "
                     f"op={op!r}: rank {rank}, element {fmt_index(index)}, in {half}: expected {e} (what "
                     f"dist.all_reduce gives), got {g}.")


def check_left_ring_rounds(left_ring_rounds, *, sizes=LEFT_SIZES, run_sizes=LEFT_RUN_SIZES,
                           timeout: float = 10.0) -> None:
    """Check exercise 2c: ``left_ring_rounds(N)`` returns the 2(N-1) labkit.ring.Round of an all-reduce in which
    rank i sends only to rank (i-1) mod N. Simulated on every N of ``sizes`` (labkit.ring.simulate: every chunk
    complete on every rank at the end, no rank counted twice; any rounds that do this pass), then run for real on
    the N of ``run_sizes`` as the left-going half of labkit's bidirectional ring, against dist.all_reduce."""
    __tracebackhide__ = True
    name = need_function(left_ring_rounds, "check_left_ring_rounds")
    problems, normalised = {}, {}
    for N in sizes:
        head = f"{name}({N})"
        with time_limit(_SECONDS, f"{head} did not return within {_SECONDS:g} s: an endless loop?"):
            result = call_student(left_ring_rounds, N, name=name, task="2c")
        problem = _left_problem(N, result, head)
        if problem:
            problems[N] = (problem, result)
        else:
            normalised[N] = _left_structure(N, result, head)[1]
    if problems:
        N = next(n for n in sizes if n in problems)
        problem, result = problems[N]
        yours = _canonical(result)
        mistake = find_mistake(LEFT_RING_MISTAKES, lambda row: yours is not None and yours == _canonical(row.variant(N)))
        message = mistake.says.format(problem=problem) if mistake else problem
        right = [n for n in sizes if n not in problems and n > 1]
        if any(n > 2 for n in right):  # (N = 2 alone says little: there the left and the right neighbour coincide)
            message += (f" (Your rounds are right for N = {_and([str(n) for n in sorted(right)])}, wrong for "
                        f"N = {_and([str(n) for n in sorted(problems)])}.)")
        fail(f"{name} is wrong: {message}")
    for N in run_sizes:
        _run_bidirectional(name, N, normalised[N], timeout)
    shown = ", ".join(str(n) for n in sorted(sizes))
    passed(f"{name} is correct on N = {shown}: every rank sends only to its left neighbour, and labkit.ring.simulate "
           f"ends with every chunk complete on every rank, no rank counted twice; run for real as the left-going half "
           f"of the bidirectional ring on N = {', '.join(str(n) for n in sorted(run_sizes))} (labkit's ring to the "
           f"right carries the other half), it matches dist.all_reduce (M = 4N+3 and N+1, and a (3, 5) tensor with "
           f"op='max')")


def _and(items: list) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

