"""What a schedule implies, computed from the schedule alone: is it possible, how long does it take,
how much of the time is idle (the bubble), and how many activations does each stage hold at most.

The simulator replays the action lists with the runtime's rule: sends do not block, a receive waits
until its matching send has happened (plus ``t_comm``), F takes ``t_forward`` and B ``t_backward``.
The events are :class:`labkit.timeline.Event` (kind = the action's kind, ``action`` = the action), the
type measured runs record too (:mod:`labkit.pipeline.runtime`, and the other lessons' steps), so the
formulas below apply to simulated and measured timelines alike.

With F taking t_f and B taking t_b on every stage and free communication, GPipe and 1F1B both take
(m + p − 1)(t_f + t_b): each stage computes for m(t_f + t_b) and waits p − 1 slots of (t_f + t_b),
while the pipeline fills (forwards) and drains (backwards). The bubble fraction, the share of
device-time spent idle, is therefore

    bubble = 1 − m(t_f + t_b) / ((m + p − 1)(t_f + t_b)) = (p − 1) / (m + p − 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from labkit.pipeline.schedules import B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule
from labkit.timeline import Event, busy_fraction

__all__ = ["ScheduleError", "Event", "action_event", "Timeline", "validate", "simulate", "bubble_fraction", "expected_bubble",
           "peak_activations", "expected_peak_activations", "activation_curve"]


class ScheduleError(ValueError):
    """The schedule cannot run: the message names the rank, the position and the rule broken."""


def action_event(rank: int, action: Action, start: float, end: float) -> Event:
    """The record of ``action`` run on ``rank`` from ``start`` to ``end`` (seconds, or simulation units)."""
    return Event(action.kind, start, end, rank=rank, action=action)


@dataclass
class Timeline:
    """The events of one step, simulated or measured. ``num_ranks`` ranks; time runs from ``origin``."""
    num_ranks: int
    events: list
    origin: float = 0.0

    @property
    def makespan(self) -> float:
        return max((e.end for e in self.events), default=self.origin) - self.origin

    def of_rank(self, rank: int) -> list:
        return [e for e in self.events if e.rank == rank]

    def rows(self) -> list[list[Event]]:
        """The events rank by rank: what :func:`labkit.timeline.draw_timeline` draws."""
        return [self.of_rank(r) for r in range(self.num_ranks)]

    def busy(self, rank: int) -> float:
        """Time ``rank`` spent computing (F and B)."""
        return sum(e.duration for e in self.events if e.rank == rank and e.kind in (F, B))


# ---- the message a send posts and a receive waits for ------------------------------------------------

def _message(a: Action) -> tuple:
    """The message an action sends or waits for, named by (what, receiving stage, micro-batch)."""
    if a.kind == SEND_F:
        return ("activation", a.stage + 1, a.microbatch)
    if a.kind == RECV_F:
        return ("activation", a.stage, a.microbatch)
    if a.kind == SEND_B:
        return ("gradient", a.stage - 1, a.microbatch)
    return ("gradient", a.stage, a.microbatch)  # RECV_B


def _needs(schedule: Schedule, stage: int) -> dict:
    """The communication each compute action of ``stage`` must have, as {kind: (before or after, compute)}."""
    first, last = stage == 0, stage == schedule.num_stages - 1
    needs = {}
    if not first:
        needs[RECV_F] = ("before", F)
        needs[SEND_B] = ("after", B)
    if not last:
        needs[SEND_F] = ("after", F)
        needs[RECV_B] = ("before", B)
    return needs


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` is possible: every stage runs F and B of every
    micro-batch exactly once, on its own rank, B after F; every activation and gradient a stage needs is
    received before it is used and sent by the stage that made it, after making it; every receive has
    its send and every send its receive; and, replayed, no rank waits forever (a deadlock)."""
    p, S, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    if S % p:
        raise ScheduleError(f"{schedule.name}: {S} stages cannot be spread evenly over {p} ranks")
    position = {}  # (kind, stage, micro-batch) -> (rank, index in that rank's list)
    for r, actions in enumerate(schedule.actions):
        for i, a in enumerate(actions):
            where = f"{schedule.name}, rank {r}, step {i} ({a})"
            if not (0 <= a.stage < S and 0 <= a.microbatch < m):
                raise ScheduleError(f"{where}: there are stages 0..{S - 1} and micro-batches 0..{m - 1}")
            if schedule.rank_of(a.stage) != r:
                raise ScheduleError(f"{where}: stage {a.stage} lives on rank {schedule.rank_of(a.stage)}, "
                                    f"not on rank {r}")
            key = (a.kind, a.stage, a.microbatch)
            if key in position:
                raise ScheduleError(f"{where}: {a} appears twice (first at step {position[key][1]})")
            if a.kind in (SEND_F, RECV_F, SEND_B, RECV_B) and a.kind not in _needs(schedule, a.stage):
                what = {SEND_F: "no stage after it", RECV_F: "no stage before it",
                        SEND_B: "no stage before it", RECV_B: "no stage after it"}[a.kind]
                raise ScheduleError(f"{where}: stage {a.stage} has {what}, so this {'receive has no matching send' if a.kind.startswith('RECV') else 'send has no matching receive'}")
            position[key] = (r, i)
    for s in range(S):
        for k in range(m):
            for kind in (F, B):
                if (kind, s, k) not in position:
                    raise ScheduleError(f"{schedule.name}: stage {s} never runs {kind} of micro-batch {k} "
                                        f"(rank {schedule.rank_of(s)})")
            (_, f_at), (r, b_at) = position[(F, s, k)], position[(B, s, k)]
            if b_at < f_at:
                raise ScheduleError(f"{schedule.name}, rank {r}: B{k}@s{s} at step {b_at} comes before its "
                                    f"forward F{k}@s{s} at step {f_at} (a backward needs the forward's "
                                    f"saved activations)")
            for kind, (when, compute) in _needs(schedule, s).items():
                if (kind, s, k) not in position:
                    raise ScheduleError(f"{schedule.name}, rank {r}: stage {s} never does {kind} of micro-batch "
                                        f"{k}, which its {compute}{k} needs {when} it")
                at, c_at = position[(kind, s, k)][1], position[(compute, s, k)][1]
                if (when == "before") != (at < c_at):
                    raise ScheduleError(f"{schedule.name}, rank {r}: {kind}{k}@s{s} at step {at} must come "
                                        f"{when} {compute}{k}@s{s} (step {c_at})")
    simulate(schedule, _validated=True)  # raises on a deadlock


def simulate(schedule: Schedule, t_forward: float | Sequence[float] = 1.0, t_backward: float | Sequence[float] = 2.0,
             t_comm: float = 0.0, *, _validated: bool = False) -> Timeline:
    """Replay ``schedule``: F of stage s takes ``t_forward`` (or ``t_forward[s]``), B ``t_backward``;
    sends take no time, a receive ends ``t_comm`` after its send or as soon as its rank reaches it.
    Raises :class:`ScheduleError` if the schedule is invalid or deadlocks."""
    if not _validated:
        validate(schedule)  # validate() calls back here with _validated=True

    def cost(t, stage):
        return t[stage] if isinstance(t, Sequence) else t

    p = schedule.num_ranks
    clock, ptr = [0.0] * p, [0] * p
    posted = {}   # message -> time it was sent
    events = []
    progress = True
    while progress:
        progress = False
        for r in range(p):
            actions = schedule.actions[r]
            while ptr[r] < len(actions):
                a = actions[ptr[r]]
                start = clock[r]
                if a.kind in (RECV_F, RECV_B):
                    sent = posted.get(_message(a))
                    if sent is None:
                        break  # wait for the sender; another rank may unblock us
                    end = max(start, sent + t_comm)
                elif a.kind == F:
                    end = start + cost(t_forward, a.stage)
                elif a.kind == B:
                    end = start + cost(t_backward, a.stage)
                else:
                    end = start
                    posted[_message(a)] = end
                events.append(action_event(r, a, start, end))
                clock[r], ptr[r] = end, ptr[r] + 1
                progress = True
    stuck = [r for r in range(p) if ptr[r] < len(schedule.actions[r])]
    if stuck:
        waits = "; ".join(f"rank {r} at step {ptr[r]} waits in {schedule.actions[r][ptr[r]]}" for r in stuck)
        raise ScheduleError(f"{schedule.name} deadlocks: {waits}, for a message no rank will send before "
                            f"it is itself received")
    return Timeline(p, events)


def bubble_fraction(timeline: Timeline) -> float:
    """The share of device-time spent not computing: 1 − Σ_r busy_r / (p · makespan), i.e. one minus
    the mean of the ranks' :func:`labkit.timeline.busy_fraction` (F and B) over the whole step."""
    start, end = timeline.origin, timeline.origin + timeline.makespan
    if end <= start:
        return 0.0
    fractions = [busy_fraction(timeline.of_rank(r), start, end, busy=(F, B)) for r in range(timeline.num_ranks)]
    return 1.0 - sum(fractions) / timeline.num_ranks


def expected_bubble(p: int, m: int, chunks: int = 1) -> float:
    """(p − 1)/(m + p − 1) for GPipe and 1F1B; with v = ``chunks`` model chunks per rank (interleaved),
    (p − 1)/(v·m + p − 1) (F and B of equal-cost stages, free communication)."""
    return (p - 1) / (chunks * m + p - 1)


def activation_curve(schedule: Schedule, rank: int) -> list[int]:
    """How many micro-batches' activations ``rank`` holds after each of its compute actions: F stores a
    micro-batch's activations for its backward, B frees them. With several chunks per rank, each
    chunk's activations count 1/v (the rank holds 1/v of its layers in each chunk)."""
    per_chunk = schedule.num_ranks / schedule.num_stages
    held, curve = 0.0, []
    for a in schedule.compute_order(rank):
        held += per_chunk if a.kind == F else -per_chunk
        curve.append(round(held, 9))
    return curve


def peak_activations(schedule: Schedule) -> list[float]:
    """For each rank, the most micro-batches' activations it holds at once (see :func:`activation_curve`)."""
    return [max(activation_curve(schedule, r), default=0) for r in range(schedule.num_ranks)]


def expected_peak_activations(name: str, p: int, m: int) -> list[int]:
    """The formulas: GPipe holds all m micro-batches on every stage; 1F1B holds min(p − i, m) at stage i."""
    if name == "GPipe":
        return [m] * p
    if name == "1F1B":
        return [min(p - i, m) for i in range(p)]
    raise ValueError(f"no formula for {name!r} (GPipe and 1F1B have one)")
