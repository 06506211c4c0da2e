"""Checkers for exercise 2, the ring all-reduce (``solutions/02_ring_allreduce_exercise.ipynb``).

    check_reduce_scatter_phase(reduce_scatter_phase)               # 2a, round by round
    check_all_gather_phase(all_gather_phase)                       # 2b, round by round
    check_ring_all_reduce(reduce_scatter_phase, all_gather_phase)  # both inside ring_all_reduce, vs dist.all_reduce

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
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from labkit import comm
from labkit.checks import (CheckFailed, fail, first_mismatch, fmt_index, fmt_pair, passed, run_on_ranks, time_limit,
                           time_limit_paused)
from labkit.checks.harness import plural
from labkit.collectives import decode_contributions, provenance_input, ring_all_reduce
from labkit.collectives import reduce_scatter_phase as _reference_reduce_scatter
from labkit.ring import (ALL_GATHER, REDUCE_SCATTER, all_gather_rounds, all_reduce_rounds, chunk_bounds,
                         chunk_sizes, reduce_scatter_rounds, simulate)

__all__ = ["check_reduce_scatter_phase", "check_all_gather_phase", "check_ring_all_reduce", "compare_with_simulation",
           "WORLD_SIZES"]

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
