"""Pipeline schedules as data: for every rank, the ordered list of what it does in one training step.

A model of S stages is trained on a batch cut into m micro-batches. A schedule says, for each rank, in
which order it runs

    F k       the forward of micro-batch k through its stage
    B k       the backward of micro-batch k through its stage
    RECV_F k  receive micro-batch k's activation from the previous stage   (before F k)
    SEND_F k  send micro-batch k's activation to the next stage            (after F k)
    RECV_B k  receive the gradient of micro-batch k's output from the next stage   (before B k)
    SEND_B k  send the gradient of micro-batch k's input to the previous stage     (after B k)

That list is the single source of truth: :mod:`labkit.pipeline.simulate` validates it and derives the
Gantt chart, the bubble and the activation memory from it, :mod:`labkit.pipeline.gantt` draws it, and
:mod:`labkit.pipeline.runtime` executes it on real processes. What you look at is what runs.

Stage s lives on rank ``s % p`` (p ranks). With one stage per rank (GPipe, 1F1B) stage and rank are the
same number; the interleaved schedule gives each rank v stages ("model chunks"): s, s + p, s + 2p, ...

Sends never block (the runtime uses ``isend``), receives do: a rank waits at RECV until the matching
SEND has happened. Under that rule the two classic schedules are:

- GPipe (Huang et al. 2019): all forwards, then all backwards. Every stage holds the activations of
  all m micro-batches at once.
- 1F1B (PipeDream-Flush, Narayanan et al. 2021): stage i runs p − i − 1 warm-up forwards, then
  alternates one forward, one backward, then drains the remaining backwards. Same bubble as GPipe,
  but stage i never holds more than p − i micro-batches' activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Action", "Schedule", "F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "COMPUTE",
           "gpipe", "gpipe_compute", "one_f_one_b", "one_f_one_b_compute", "one_f_one_b_warmup",
           "interleaved_1f1b", "interleaved_1f1b_compute", "interleaved_1f1b_warmup", "add_communication",
           "SCHEDULES", "make_schedule"]

F, B = "F", "B"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B)
KINDS = (F, B, SEND_F, RECV_F, SEND_B, RECV_B)


@dataclass(frozen=True)
class Action:
    """One step of one rank: ``kind`` (F, B, SEND_F, RECV_F, SEND_B, RECV_B) of ``microbatch`` at ``stage``.

    For a send, ``stage`` is the stage that sends; for a receive, the stage that receives.
    """
    kind: str
    microbatch: int
    stage: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; the kinds are {', '.join(KINDS)}")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@s{self.stage}"

    __repr__ = __str__


@dataclass(frozen=True)
class Schedule:
    """``actions[r]``: what rank r does, in order, in one step of ``num_microbatches`` micro-batches
    through ``num_stages`` stages (stage s on rank ``s % num_ranks``)."""
    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    actions: tuple = field(repr=False)

    def __post_init__(self):
        object.__setattr__(self, "actions", tuple(tuple(a) for a in self.actions))
        if len(self.actions) != self.num_ranks:
            raise ValueError(f"{self.name}: {len(self.actions)} action lists for {self.num_ranks} ranks")

    def rank_of(self, stage: int) -> int:
        return stage % self.num_ranks

    def stages_of(self, rank: int) -> list[int]:
        return list(range(rank, self.num_stages, self.num_ranks))

    def compute_order(self, rank: int) -> list[Action]:
        """Rank ``rank``'s forwards and backwards only, in order."""
        return [a for a in self.actions[rank] if a.kind in COMPUTE]

    def table(self) -> str:
        """The schedule as text, one line per rank (compute actions only): 'rank 0: F0 F1 B0 F2 B1 ...'."""
        lines = []
        for r in range(self.num_ranks):
            chunked = self.num_stages > self.num_ranks
            steps = [f"{a.kind}{a.microbatch}" + (f".{a.stage // self.num_ranks}" if chunked else "")
                     for a in self.compute_order(r)]
            lines.append(f"rank {r}: " + " ".join(steps))
        return "\n".join(lines)


def _check_sizes(p: int, m: int) -> None:
    for name, value in (("stages p", p), ("micro-batches m", m)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"the number of {name} must be a positive integer, not {value!r}")


def add_communication(compute: list[list[Action]], num_stages: int) -> list[list[Action]]:
    """Insert the sends and receives that a per-rank order of F and B implies.

    Before F of a stage that is not the first: receive its input (RECV_F); after it, if a stage follows,
    send the output on (SEND_F). Before B of a stage that is not the last: receive the output's gradient
    (RECV_B); after it, if a stage precedes, send the input's gradient back (SEND_B).
    """
    out = []
    for actions in compute:
        full = []
        for a in actions:
            first, last = a.stage == 0, a.stage == num_stages - 1
            if a.kind == F:
                full += ([] if first else [Action(RECV_F, a.microbatch, a.stage)]) + [a] + \
                        ([] if last else [Action(SEND_F, a.microbatch, a.stage)])
            elif a.kind == B:
                full += ([] if last else [Action(RECV_B, a.microbatch, a.stage)]) + [a] + \
                        ([] if first else [Action(SEND_B, a.microbatch, a.stage)])
            else:
                raise ValueError(f"add_communication takes only F and B actions, got {a}")
        out.append(full)
    return out


def gpipe_compute(p: int, m: int) -> list[list[Action]]:
    """GPipe's compute order: stage i runs F0 .. F(m−1), then B0 .. B(m−1)."""
    return [[Action(F, k, i) for k in range(m)] + [Action(B, k, i) for k in range(m)] for i in range(p)]


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards (GPipe). Bubble (p − 1)/(m + p − 1); every stage holds m."""
    _check_sizes(p, m)
    return Schedule("GPipe", p, p, m, add_communication(gpipe_compute(p, m), p))


def one_f_one_b_warmup(p: int, m: int) -> list[int]:
    """Stage i's warm-up forwards in 1F1B: min(p − i − 1, m), enough to fill the stages after it."""
    return [min(p - i - 1, m) for i in range(p)]


def one_f_one_b_compute(p: int, m: int, warmups: list[int] | None = None) -> list[list[Action]]:
    """1F1B's compute order (exercise 6): stage i's warm-up forwards, then alternate F and B while
    forwards remain, then the remaining backwards. ``warmups``: other warm-ups than 1F1B's (what
    else a stage could do: all m is GPipe's order)."""
    compute = []
    for i, warmup in enumerate(one_f_one_b_warmup(p, m) if warmups is None else warmups):
        order = [Action(F, k, i) for k in range(warmup)]
        for k in range(m - warmup):            # steady state: the forward of k + warmup, the backward of k
            order += [Action(F, k + warmup, i), Action(B, k, i)]
        order += [Action(B, k, i) for k in range(m - warmup, m)]  # cool-down
        compute.append(order)
    return compute


def one_f_one_b(p: int, m: int) -> Schedule:
    """One forward, one backward (PipeDream-Flush). Bubble (p − 1)/(m + p − 1) as GPipe; stage i holds
    at most min(p − i, m) micro-batches' activations."""
    _check_sizes(p, m)
    return Schedule("1F1B", p, p, m, add_communication(one_f_one_b_compute(p, m), p))


def interleaved_1f1b_warmup(p: int, m: int, chunks: int = 2) -> list[int]:
    """Megatron-LM's warm-up forwards of each rank in interleaved 1F1B: 2(p − r − 1) + (v − 1)p, at most v·m
    (with v = 1, 1F1B's p − r − 1). Exercise 6b asks for the smallest warm-up that keeps the bubble."""
    v, total = chunks, m * chunks
    return [min((p - r - 1) * 2 + (v - 1) * p, total) if v > 1 else min(p - r - 1, total) for r in range(p)]


def interleaved_1f1b_compute(p: int, m: int, chunks: int = 2, warmups: list[int] | None = None) -> list[list[Action]]:
    """The compute order of interleaved 1F1B: rank r's u-th forward is micro-batch (u // pv)·p + u % p of chunk
    (u // p) % v (rounds of p micro-batches per chunk; its backwards run the chunks in reverse), on stage
    chunk·p + r; warm-up forwards, then one forward and one backward, then the remaining backwards.
    ``warmups``: other warm-ups than Megatron's (exercise 6b)."""
    v, total = chunks, m * chunks

    def unit(u: int, backward: bool) -> tuple[int, int]:
        """The u-th forward (or backward) of a rank: (micro-batch, chunk)."""
        chunk = (u // p) % v
        return (u // (p * v)) * p + u % p, (v - 1 - chunk if backward else chunk)

    compute = []
    for r, warmup in enumerate(interleaved_1f1b_warmup(p, m, v) if warmups is None else warmups):
        order = []
        for u in range(warmup):
            k, c = unit(u, False)
            order.append(Action(F, k, c * p + r))
        for u in range(total - warmup):
            k, c = unit(u + warmup, False)
            order.append(Action(F, k, c * p + r))
            k, c = unit(u, True)
            order.append(Action(B, k, c * p + r))
        for u in range(total - warmup, total):
            k, c = unit(u, True)
            order.append(Action(B, k, c * p + r))
        compute.append(order)
    return compute


def interleaved_1f1b(p: int, m: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): each rank holds ``chunks`` = v model
    chunks, stages r, r + p, ... so a micro-batch visits every rank v times. The forwards go in rounds
    of p micro-batches per chunk; rank r warms up with 2(p − r − 1) + (v − 1)p forwards. The bubble
    shrinks v-fold, to (p − 1)/(v·m + p − 1), at the price of v times more messages. Needs m % p == 0."""
    _check_sizes(p, m)
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive integer, not {chunks!r}")
    if m % p:
        raise ValueError(f"the interleaved schedule sends micro-batches in rounds of p={p}: "
                         f"m={m} must be a multiple of p")
    return Schedule(f"interleaved 1F1B (v={chunks})", p, p * chunks, m,
                    add_communication(interleaved_1f1b_compute(p, m, chunks), p * chunks))


SCHEDULES = {"GPipe": gpipe, "1F1B": one_f_one_b, "interleaved": interleaved_1f1b}


def make_schedule(name: str, p: int, m: int, chunks: int = 2) -> Schedule:
    """A schedule by name: "GPipe", "1F1B" or "interleaved" (with ``chunks`` model chunks per rank)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return interleaved_1f1b(p, m, chunks) if name == "interleaved" else SCHEDULES[name](p, m)
