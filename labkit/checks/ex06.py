"""Checker for exercise 6, the 1F1B pipeline schedule (``solutions/06_pipeline_schedule_exercise.ipynb``).

    check_one_f_one_b(one_f_one_b)     # 6: simulated on 18 sizes (p, m), then run for real on 2 and 3 processes
    check_interleaved_warmups(interleaved_warmups)   # 6b: the least warm-up of interleaved 1F1B, simulated

Prints one ``✓`` line when the schedule is right and raises :class:`labkit.checks.CheckFailed` naming the
mistake when it is not.

The task. ``one_f_one_b(p, m)`` returns, for each stage i = 0 .. p − 1 (stage i on rank i), the ordered list
of its compute actions ``Action("F", k, i)`` and ``Action("B", k, i)``, k = 0 .. m − 1: min(p − i − 1, m)
warm-up forwards, then one forward and one backward while forwards remain, then the remaining backwards.
The checker inserts the sends and receives with :func:`labkit.pipeline.schedules.add_communication`; a
full :class:`~labkit.pipeline.schedules.Schedule` (communication included) is accepted too and checked as
it is.

What is checked, for every size of :data:`SIZES` (p = 1, m < p, m = p, m > p, odd sizes), stopping at the
first problem:

1. the structure: a list of p lists of ``Action`` objects, F and B only, each on its own stage, every
   micro-batch 0 .. m − 1 forward and backward exactly once (a micro-batch beyond m on a stage whose
   warm-up p − i − 1 exceeds m is named as the missing cap at m), no backward before its forward, the
   forwards and the backwards each in micro-batch order;
2. the warm-up of each stage (read from the forwards before its first backward) against min(p − i − 1, m),
   with the known mistakes named: GPipe's order, the same warm-up on every stage, the warm-up reversed,
   too few or too many forwards on a stage (saying which stage, the expected warm-up and the student's);
   then the steady state and the cool-down against the reference order;
3. :func:`labkit.pipeline.simulate.validate` (a :class:`ScheduleError` is translated for the student);
4. the simulated bubble (F 1, B 2 time units, free messages) against (p − 1)/(m + p − 1);
5. the peak of activations held by each stage against min(p − i, m).

Every message of 2 says what the student's schedule does as a consequence (deadlock, bubble, peak).
Then the schedule runs for real (:data:`RUNS`: 2 processes with m = 4, 3 processes with m = 2 and 5) with
:func:`labkit.pipeline.runtime.run_schedule` on a small float64 ``nn.Sequential`` cut into p stages; the
loss and every gradient must equal one process's on the whole batch.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from labkit.checks import (CheckFailed, describe, fail, first_mismatch, fmt_index, fmt_number, fmt_pair, passed,
                           run_on_ranks, student_traceback, time_limit)
from labkit.checks.harness import Mistake, bound, call_student, find_mistake, need_function, plural
from labkit.pipeline.schedules import B, COMPUTE, F, Action, Schedule, add_communication, interleaved_1f1b_compute
from labkit.pipeline.schedules import one_f_one_b_compute as reference_compute
from labkit.pipeline.schedules import one_f_one_b_warmup as expected_warmup
from labkit.pipeline.simulate import (ScheduleError, bubble_fraction, expected_bubble, expected_peak_activations,
                                      peak_activations, simulate, validate)

__all__ = ["check_one_f_one_b", "SIZES", "RUNS", "WARMUP_MISTAKES", "Warmups", "check_interleaved_warmups",
           "INTERLEAVED_SIZES", "INTERLEAVED_MISTAKES"]

# The first sizes are the ones whose messages read best (m > p: warm-up, steady state and cool-down all
# present); then m = p, p = 1, and m < p (where the warm-up is capped at m) last.
SIZES = ((3, 5), (4, 8), (2, 3), (5, 9), (4, 5), (8, 12), (4, 4), (3, 3), (2, 2), (1, 1), (1, 4),
         (4, 2), (5, 3), (3, 2), (7, 4), (6, 1), (2, 1), (8, 3))
RUNS = ((2, (4,)), (3, (2, 5)))            # (processes p, the values of m run on them)
T_FORWARD, T_BACKWARD = 1.0, 2.0           # the simulation's costs: a backward takes twice a forward
WIDTH, MICRO = 3, 2                        # the real run: layers of width 3, micro-batches of 2 samples
_SECONDS = 10.0                            # for one call of the student's function


def _steps(actions) -> str:
    return " ".join(f"{a.kind}{a.microbatch}" for a in actions) or "(nothing)"


def _list(values) -> str:
    return "[" + ", ".join(fmt_number(v) for v in values) + "]"


# ============================================================================================
# Calling the student's function and reading what it returns
# ============================================================================================

def _call(fn, name: str, p: int, m: int):
    __tracebackhide__ = True
    try:
        with time_limit(_SECONDS, f"{name}({p}, {m}) did not return within {_SECONDS:g} s: an endless loop?"):
            return call_student(fn, p, m, name=name, task="6")
    except CheckFailed as err:
        if err.__cause__ is None:       # the time limit
            raise
        tb = student_traceback("".join(traceback.format_exception(err.__cause__)))
        fail(f"{name}({p}, {m}) raised {type(err.__cause__).__name__}: {err.__cause__}\n\n--- traceback ---\n{tb}")


def _read(result, name: str, p: int, m: int) -> tuple[list, Schedule | None]:
    """(the compute order of each stage, the Schedule if the student returned one), or fail."""
    head = f"{name}({p}, {m})"
    given = None
    if isinstance(result, Schedule):
        for what, got, want in (("ranks", result.num_ranks, p), ("stages", result.num_stages, p),
                                ("micro-batches", result.num_microbatches, m)):
            if got != want:
                fail(f"{head} returned a Schedule of {got} {what}, expected {want} (one stage per rank, "
                     f"m = {m} micro-batches)")
        given, result = result, [result.compute_order(r) for r in range(p)]
    if not isinstance(result, (list, tuple)):
        fail(f"{head} returned {describe(result)}: return a list of p = {p} lists, the list of stage i holding "
             f"its actions Action(\"F\", k, i) and Action(\"B\", k, i) in order")
    if result and all(isinstance(a, Action) for a in result):
        fail(f"{head} returned one flat list of {len(result)} Actions: return one list per stage (a list of "
             f"p = {p} lists), the list of stage i holding stage i's actions in the order stage i runs them")
    if len(result) != p:
        fail(f"{head} returned {len(result)} lists for p = {p} stages: one list per stage i = 0 .. {p - 1}")
    compute = []
    for i, actions in enumerate(result):
        if not isinstance(actions, (list, tuple)):
            fail(f"{head}: item {i} (the list of stage {i}) is {describe(actions)}: a list of Actions is expected")
        for j, a in enumerate(actions):
            where = f"{head}: stage {i}'s list, item {j}" if given is None else \
                f"{head}: rank {i}'s compute action {j}"
            if not isinstance(a, Action):
                fail(f"{where} is {describe(a)}: write each step as Action(\"F\", k, {i}) or Action(\"B\", k, {i}) "
                     f"(from labkit.pipeline.schedules import Action)")
            if a.kind not in COMPUTE:
                fail(f"{where} is {a}: return only the compute actions F and B; the sends and receives are added "
                     f"by add_communication (or return a whole Schedule, communication included)")
            if a.stage != i:
                swapped = (f" Are the micro-batch and the stage swapped? Action(kind, microbatch, stage): "
                           f"Action(\"{a.kind}\", {a.stage}, {i})." if a.microbatch == i else "")
                fail(f"{where} is {a}, an action of stage {a.stage}: stage i's list holds only stage i's actions "
                     f"(on rank {i}: Action(kind, k, {i})).{swapped}")
            if not isinstance(a.microbatch, int) or isinstance(a.microbatch, bool):
                fail(f"{where} is {a}: the micro-batch must be an int, not {type(a.microbatch).__name__}")
        compute.append(list(actions))
    return compute, given


# ============================================================================================
# What the student's schedule does: simulated
# ============================================================================================

def _schedule(compute: list, given: Schedule | None, p: int, m: int) -> Schedule:
    return given if given is not None else Schedule("your 1F1B", p, p, m, add_communication(compute, p))


def _simulated(schedule: Schedule) -> tuple[float | None, str]:
    """(the simulated bubble, "") or (None, why it cannot run: the deadlock, as a sentence for the student)."""
    try:
        return bubble_fraction(simulate(schedule, T_FORWARD, T_BACKWARD)), ""
    except ScheduleError as err:
        text = str(err)
        if " deadlocks: " in text:
            return None, f" Replayed, it deadlocks: {text.split(' deadlocks: ', 1)[1]}."
        return None, f" It cannot run: {text}."


def _consequences(schedule: Schedule, p: int, m: int) -> str:
    """What the schedule does, simulated, where it differs from 1F1B: a deadlock, the bubble, the peaks."""
    bubble, why = _simulated(schedule)
    if bubble is None:
        return why
    parts = []
    want = expected_bubble(p, m)
    if not math.isclose(bubble, want, rel_tol=1e-9, abs_tol=1e-12):
        parts.append(f"its bubble is {bubble:.3f}, 1F1B's (p − 1)/(m + p − 1) = {want:.3f}")
    peaks, wanted = peak_activations(schedule), expected_peak_activations("1F1B", p, m)
    if [round(x, 9) for x in peaks] != wanted:
        parts.append(f"the stages hold at most {_list(peaks)} micro-batches' activations, 1F1B's min(p − i, m) = "
                     f"{_list(wanted)}")
    if not parts:
        return ""
    return f" Simulated (F {fmt_number(T_FORWARD)}, B {fmt_number(T_BACKWARD)} time units): " + "; ".join(parts) + "."


# ============================================================================================
# The diagnosis, on the compute orders
# ============================================================================================

def _diagnose_contents(compute: list, head: str, p: int, m: int) -> str | None:
    """Every micro-batch's F and B exactly once on each stage, in range, B after F, both in order."""
    every = f"every stage runs the forward and the backward of each of the m = {m} micro-batches (0 .. {m - 1}) " \
            f"exactly once"
    for i, actions in enumerate(compute):
        mine = f"stage {i} runs {_steps(actions)}"
        beyond = [a for a in actions if not 0 <= a.microbatch < m]
        if beyond:
            a = beyond[0]
            forwards = next((j for j, b in enumerate(actions) if b.kind == B), len(actions))
            if m < p - i - 1:
                return (f"{head}: stage {i} runs {a.kind}{a.microbatch}, but there are only m = {m} micro-batches "
                        f"(0 .. {m - 1}). With m < p the warm-up p − i − 1 = {p - i - 1} of stage {i} is more than "
                        f"the m micro-batches there are: cap the warm-up at m, min(p − i − 1, m). Stage {i}'s "
                        f"warm-up: expected {min(p - i - 1, m)}, yours {forwards} ({mine}).")
            return f"{head}: stage {i} runs {a.kind}{a.microbatch}, but micro-batch {a.microbatch} does not " \
                   f"exist: {every} ({mine})."
        seen = {}
        for j, a in enumerate(actions):
            key = (a.kind, a.microbatch)
            if key in seen:
                return f"{head}: stage {i} runs {a.kind}{a.microbatch} twice (steps {seen[key]} and {j}): {every} " \
                       f"({mine})."
            seen[key] = j
        for k in range(m):
            for kind in (F, B):
                if (kind, k) not in seen:
                    what = "forward" if kind == F else "backward"
                    return f"{head}: stage {i} never runs {kind}{k} (the {what} of micro-batch {k}): {every} ({mine})."
        for k in range(m):
            f_at, b_at = seen[(F, k)], seen[(B, k)]
            if b_at < f_at:
                return (f"{head}: stage {i} runs B{k} at step {b_at}, before its forward F{k} at step {f_at}: a "
                        f"backward needs the activations its forward saved. In the steady state run the forward "
                        f"first, then the backward: F(k + w), B(k) ({mine}).")
        for kind, why in ((F, "the first stage takes the micro-batches in that order and each stage passes them "
                                 "on"),
                          (B, "as its forwards: the gradients come back from the next stage in that order")):
            order = [a.microbatch for a in actions if a.kind == kind]
            for a, b in zip(order, order[1:]):
                if b < a:
                    what = "forwards" if kind == F else "backwards"
                    return (f"{head}: stage {i} runs {kind}{a} before {kind}{b}: the micro-batches go through the "
                            f"pipeline in order, so each stage runs its {what} in the order 0, 1, .., {m - 1}, {why} "
                            f"({mine}).")
    return None


def _warmups(compute: list, p: int, m: int) -> tuple[list, list]:
    """(the student's warm-up per stage, 1F1B's). The warm-up is read from the forwards before the first
    backward f: f − 1 (the last of them starts the steady state), or m when there is no steady state."""
    expected = expected_warmup(p, m)
    yours = []
    for i, actions in enumerate(compute):
        f = next((j for j, a in enumerate(actions) if a.kind == B), len(actions))
        if f == min(p - i, m):          # the same order as 1F1B's up to the first backward
            yours.append(expected[i])
        else:
            yours.append(m if f >= m else f - 1)
    return yours, expected


class Warmups(NamedTuple):
    """A wrong warm-up, as a :class:`~labkit.checks.harness.Mistake`'s variant: ``example(p, m)`` is one such
    warm-up per stage (the tests build ``one_f_one_b_compute(p, m, example(p, m))``); ``matches(yours,
    expected, p, m)`` says whether the student's warm-ups show it."""
    example: Callable[[int, int], list]
    matches: Callable[[list, list, int, int], bool]


def _first_off(yours: list, expected: list) -> int:
    return next(i for i, (a, b) in enumerate(zip(yours, expected)) if a != b)


_THEN = "then alternates one forward and one backward while forwards remain, then runs the remaining backwards"
_CAP = "(min(p − i − 1, m) = min({p_i_1}, {m}))"

# Tried in order on the warm-ups read from the student's schedule (see _warmups). The texts are formatted with
# head, m, both (the warm-ups side by side), effect (what the schedule does, simulated), held, c, i, ...
WARMUP_MISTAKES = (
    Mistake("GPipe", Warmups(lambda p, m: [m] * p, lambda yours, want, p, m: all(w == m for w in yours)),
            "{head}: this is GPipe, not 1F1B: every stage runs all m = {m} forwards before its first backward, so "
            "stage i holds m = {m} micro-batches' activations at once; 1F1B holds p − i of them (min(p − i, m) = "
            "{held}). Start the backwards early: stage i runs p − i − 1 warm-up forwards (capped at m), " + _THEN +
            " {both}. The bubble is the same as GPipe's; what 1F1B saves is memory.{effect}"),
    Mistake("the same warm-up on every stage",
            Warmups(lambda p, m: [min(p - 1, m)] * p, lambda yours, want, p, m: p > 1 and len(set(yours)) == 1),
            "{head}: every stage runs the same warm-up, {c} forwards {both}. The warm-up must depend on the stage: "
            "stage i runs p − i − 1 warm-up forwards (capped at m), the number of micro-batches it must put into "
            "the pipeline to keep the p − i − 1 stages after it busy until the first gradient comes back.{effect}"),
    Mistake("the warm-up reversed",
            Warmups(lambda p, m: [min(i, m) for i in range(p)],
                    lambda yours, want, p, m: p > 2 and yours == [min(i, m) for i in range(p)]),
            "{head}: the warm-up is reversed: stage i runs i warm-up forwards {both}. The first stage is the one "
            "that waits longest for its first gradient (it comes back through all the stages after it): stage i "
            "runs p − i − 1.{effect}"),
    Mistake("too few warm-up forwards",
            Warmups(lambda p, m: [max(min(p - i - 2, m), 0) for i in range(p)],
                    lambda yours, want, p, m: yours[_first_off(yours, want)] < want[_first_off(yours, want)]),
            "{head}: too few warm-up forwards on stage {i}: expected {want_i} " + _CAP + ", yours {yours_i} {both}. "
            "Stage {i} starts its backwards before it has put enough micro-batches into the pipeline to keep the "
            "{stages_after} after it busy.{effect}"),
    Mistake("too many warm-up forwards",
            Warmups(lambda p, m: [min(p - i, m) for i in range(p)],
                    lambda yours, want, p, m: yours[_first_off(yours, want)] > want[_first_off(yours, want)]),
            "{head}: too many warm-up forwards on stage {i}: expected {want_i} " + _CAP + ", yours {yours_i} {both}. "
            "Each extra forward is one more micro-batch's activations held on stage {i}, and the pipeline is no "
            "faster for it.{effect}"),
)


def _diagnose_warmup(compute: list, schedule: Schedule, head: str, p: int, m: int) -> str | None:
    yours, expected = _warmups(compute, p, m)
    if yours == expected:
        return None
    mistake = find_mistake(WARMUP_MISTAKES, lambda row: row.variant.matches(yours, expected, p, m))
    i = _first_off(yours, expected)
    says = mistake.says if mistake else "{head}: the warm-ups differ from 1F1B's {both}.{effect}"   # (the last two
    return says.format(                                                           # rows cover every difference)
        head=head, m=m, c=yours[0], i=i, want_i=expected[i], yours_i=yours[i], p_i_1=p - i - 1,
        stages_after=plural(p - i - 1, "stage"), held=_list(expected_peak_activations("1F1B", p, m)),
        both=f"(warm-up forwards per stage: expected {_list(expected)}, yours {_list(yours)})",
        effect=_consequences(schedule, p, m))


def _diagnose_order(compute: list, schedule: Schedule, head: str, p: int, m: int) -> str | None:
    for i, (mine, want) in enumerate(zip(compute, reference_compute(p, m))):
        if mine == want:
            continue
        j = next(j for j, (a, b) in enumerate(zip(mine, want)) if a != b)
        w = expected_warmup(p, m)[i]
        return (f"{head}: stage {i}, step {j}: yours is {mine[j].kind}{mine[j].microbatch}, 1F1B runs "
                f"{want[j].kind}{want[j].microbatch}. After its {w} warm-up forwards, stage {i} alternates one "
                f"forward and one backward (F{w} B0 F{w + 1} B1 ..) while forwards remain, then runs the remaining "
                f"backwards (the cool-down). Stage {i}: expected {_steps(want)}; yours {_steps(mine)}."
                f"{_consequences(schedule, p, m)}")
    return None


def _check_size(fn, name: str, p: int, m: int) -> Schedule:
    __tracebackhide__ = True
    head = f"{name}({p}, {m})"
    compute, given = _read(_call(fn, name, p, m), name, p, m)
    problem = _diagnose_contents(compute, head, p, m)
    if problem:
        fail(problem)
    schedule = _schedule(compute, given, p, m)
    problem = _diagnose_warmup(compute, schedule, head, p, m) or _diagnose_order(compute, schedule, head, p, m)
    if problem:
        fail(problem)
    try:
        validate(schedule)
    except ScheduleError as err:
        fail(f"{head}: the schedule cannot run: {err}")
    bubble, want = bubble_fraction(simulate(schedule, T_FORWARD, T_BACKWARD)), expected_bubble(p, m)
    if not math.isclose(bubble, want, rel_tol=1e-9, abs_tol=1e-12):
        fail(f"{head}: simulated (F {fmt_number(T_FORWARD)}, B {fmt_number(T_BACKWARD)}), the bubble is "
             f"{bubble:.4f}, expected (p − 1)/(m + p − 1) = {want:.4f}")
    peaks, wanted = peak_activations(schedule), expected_peak_activations("1F1B", p, m)
    if [round(x, 9) for x in peaks] != wanted:
        fail(f"{head}: the stages hold at most {_list(peaks)} micro-batches' activations, expected "
             f"min(p − i, m) = {_list(wanted)}")
    return schedule


# ============================================================================================
# The real run: the schedule executed by labkit's runtime on p processes
# ============================================================================================

def _model(p: int) -> nn.Sequential:
    """p blocks (Linear(3, 3), Tanh), float64, the same on every process: stage s is blocks 2s, 2s + 1."""
    g = torch.Generator().manual_seed(600 + p)
    layers = []
    for _ in range(p):
        linear = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64))
            linear.bias.copy_(torch.randn(WIDTH, generator=g, dtype=torch.float64))
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers)


def _stage(model: nn.Sequential, s: int) -> nn.Sequential:
    return model[2 * s: 2 * s + 2]


def _data(p: int, m: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(6000 + 100 * p + m)
    inputs = [torch.randn(MICRO, WIDTH, generator=g, dtype=torch.float64) for _ in range(m)]
    targets = [torch.randn(MICRO, WIDTH, generator=g, dtype=torch.float64) for _ in range(m)]
    return inputs, targets


def _reference(p: int, m: int) -> tuple[float, list]:
    """One process, the whole batch: (the loss, the gradients of each stage's parameters)."""
    model = _model(p)
    inputs, targets = _data(p, m)
    loss = nn.functional.mse_loss(model(torch.cat(inputs)), torch.cat(targets))
    loss.backward()
    return loss.item(), [[q.grad.clone() for q in _stage(model, s).parameters()] for s in range(p)]


def _run_worker(schedules: list) -> list:
    from labkit.pipeline.runtime import run_schedule
    rank, p = dist.get_rank(), dist.get_world_size()
    model = _model(p)
    stage = _stage(model, rank)
    records = []
    for schedule in schedules:
        for q in stage.parameters():
            q.grad = None
        inputs, targets = _data(p, schedule.num_microbatches)
        result = run_schedule(schedule, {rank: stage}, inputs, targets, nn.functional.mse_loss,
                              activation_shape=(MICRO, WIDTH), dtype=torch.float64)
        records.append(dict(loss=result.loss, grads=[None if q.grad is None else q.grad.clone()
                                                     for q in stage.parameters()]))
    return records


def _diagnose_run(name: str, p: int, schedules: list, per_rank: list) -> tuple[str | None, float]:
    worst = 0.0
    model = _model(p)
    names = [[n for n, _ in _stage(model, s).named_parameters()] for s in range(p)]
    for c, schedule in enumerate(schedules):
        m = schedule.num_microbatches
        head = f"{name}({p}, {m}), run on {p} processes by labkit.pipeline.runtime.run_schedule"
        loss, grads = _reference(p, m)
        got = per_rank[p - 1][c]["loss"]
        if got is None or not math.isclose(got, loss, rel_tol=1e-9, abs_tol=1e-12):
            e, g = fmt_pair(loss, got) if got is not None else (fmt_number(loss), "None")
            return f"{head}: the loss (the mean over the micro-batches) is {g}, one process gets {e}", worst
        worst = max(worst, abs(got - loss) / max(abs(loss), 1e-300))
        for s in range(p):
            for n, want, have in zip(names[s], grads[s], per_rank[s][c]["grads"]):
                label = f"stage {s} (rank {s}), the gradient of layer {n}"
                if have is None:
                    return f"{head}: {label} is None: stage {s} never ran a backward", worst
                bad = first_mismatch(want, have)
                if bad:
                    e, g = fmt_pair(bad[1], bad[2])
                    return (f"{head}: {label}{fmt_index(bad[0])} is {g}, one process on the whole batch gets {e}",
                            worst)
                worst = max(worst, ((want - have).abs().max() / want.abs().max().clamp(min=1e-300)).item())
    return None, worst


# ============================================================================================
# The check
# ============================================================================================

def check_one_f_one_b(one_f_one_b, *, sizes=SIZES, runs=RUNS, timeout: float = 20.0) -> None:
    """Check exercise 6: ``one_f_one_b(p, m)`` returns the 1F1B order of each stage's forwards and backwards
    (a list of p lists of ``Action("F", k, i)`` / ``Action("B", k, i)``, or a whole ``Schedule``).

    Simulated on every size of ``sizes``: structure, warm-up per stage, order, :func:`validate`, the bubble
    (p − 1)/(m + p − 1) and the peaks min(p − i, m); then run for real on the processes of ``runs`` (loss
    and gradients against one process). ``timeout``: seconds a rank may wait in the real run."""
    __tracebackhide__ = True
    name = need_function(one_f_one_b, "check_one_f_one_b")
    from labkit.pipeline import schedules as _labkit
    if one_f_one_b is _labkit.one_f_one_b:
        fail("this is labkit's own one_f_one_b (labkit.pipeline.schedules): write your own")
    made = {(p, m): _check_size(one_f_one_b, name, p, m) for p, m in sizes}
    worst = 0.0
    for p, ms in runs:
        schedules = [made[(p, m)] if (p, m) in made else _check_size(one_f_one_b, name, p, m) for m in ms]
        per_rank = run_on_ranks(_run_worker, schedules, world_size=p, timeout=timeout, name=name, task="6",
                                device="cpu")
        problem, w = _diagnose_run(name, p, schedules, per_rank)
        if problem:
            fail(problem)
        worst = max(worst, w)
    ran = "; ".join(f"{p} processes with m = {' and '.join(str(m) for m in ms)}" for p, ms in runs)
    shown = ", ".join(f"({p}, {m})" for p, m in sizes[:6])
    passed(f"{name} is 1F1B on {len(sizes)} sizes (p, m) ({shown}, ..., with m < p, m = p and p = 1): every stage's "
           f"warm-up is min(p − i − 1, m), the simulated bubble (p − 1)/(m + p − 1), the peak min(p − i, m) "
           f"micro-batches' activations; run for real ({ran}), the loss and gradients equal one process's within "
           f"{bound(worst)}")


# ============================================================================================
# 6b. The warm-up of interleaved 1F1B: a design task, checked by what the schedule does
# ============================================================================================
# The task: interleaved_warmups(p, m, v) gives each rank's number of warm-up forwards for labkit's interleaved
# order (labkit.pipeline.schedules.interleaved_1f1b_compute), the least that keeps the bubble at its minimum
# (p − 1)/(v·m + p − 1). Checked by simulation, not against a formula: no deadlock, the minimal bubble, and
# on every rank one forward fewer must deadlock or lengthen the step (any warm-ups with these properties pass).

INTERLEAVED_SIZES = ((4, 8, 2), (3, 6, 2), (2, 4, 2), (3, 3, 2), (4, 4, 2), (4, 8, 3), (3, 6, 3), (2, 4, 4),
                     (5, 10, 3), (2, 2, 2), (4, 4, 1), (3, 6, 1))      # (p, m, v); v = 1 is 1F1B


def _interleaved(p: int, m: int, v: int, warmups: list) -> Schedule:
    return Schedule(f"interleaved 1F1B (v={v}), your warm-ups", p, p * v, m,
                    add_communication(interleaved_1f1b_compute(p, m, v, warmups), p * v))


_VIRTUAL = ("With v chunks a micro-batch crosses v·p stages: rank r's chunks are stages r, p + r, .., (v − 1)p + r, "
            "and its first backward is micro-batch 0 on its last chunk, which must first go forward through every "
            "stage and come back from the last one.")

# Known formulas, tried on the student's warm-ups at the first size where they fail; texts formatted with head,
# yours, effect.
INTERLEAVED_MISTAKES = (
    Mistake("1F1B's warm-up", lambda p, m, v: [min(p - r - 1, v * m) for r in range(p)],
            "{head}: these are 1F1B's warm-ups, p − r − 1 per rank {yours}, as if each rank held one stage. " + _VIRTUAL
            + " Until then rank r must keep the pipeline fed with forwards.{effect}"),
    Mistake("Megatron-LM's warm-up", lambda p, m, v: [min(2 * (p - r - 1) + (v - 1) * p, v * m) for r in range(p)],
            "{head}: this is Megatron-LM's warm-up, 2(p − r − 1) + (v − 1)p {yours}. It keeps the bubble at its "
            "minimum, but it is not the least that does here.{effect} The task asks for the smallest warm-up with "
            "the minimal bubble, the one that holds the fewest activations."),
    Mistake("no (v − 1)p", lambda p, m, v: [min(2 * (p - r - 1), v * m) for r in range(p)],
            "{head}: your warm-ups {yours} do not grow with the number of chunks v. " + _VIRTUAL + "{effect}"),
    Mistake("the warm-up reversed", lambda p, m, v: [min((v - 1) * p + r, v * m) for r in range(p)],
            "{head}: the warm-up is reversed {yours}: it grows with r. The first rank waits longest for its first "
            "gradient (it comes back through every stage after it), the last rank least.{effect}"),
    Mistake("every forward first", lambda p, m, v: [v * m] * p,
            "{head}: every rank runs all its v·m forwards before its first backward {yours}: GPipe's order. The bubble "
            "is the least, but each rank holds every micro-batch's activations.{effect}"),
)


def _interleaved_effect(p: int, m: int, v: int, yours: list) -> str:
    """What the warm-ups do, simulated: a deadlock, a longer step (which rank's warm-up is short), or the rank
    that could run fewer forwards. Empty when they are right."""
    schedule = _interleaved(p, m, v, yours)
    bubble, why = _simulated(schedule)
    want = expected_bubble(p, m, v)
    if bubble is None:
        return why
    def minimal(warmups: list) -> bool:
        b, _ = _simulated(_interleaved(p, m, v, warmups))
        return b is not None and math.isclose(b, want, rel_tol=1e-9, abs_tol=1e-12)

    def changed(r: int, by: int) -> list:
        return [w + by if i == r else w for i, w in enumerate(yours)]

    simulated = f"Simulated (F {fmt_number(T_FORWARD)}, B {fmt_number(T_BACKWARD)})"
    if not math.isclose(bubble, want, rel_tol=1e-9, abs_tol=1e-12):
        short = next((r for r in range(p) if yours[r] < v * m and minimal(changed(r, 1))), None)
        which = (f"rank {short}'s warm-up is too short: with one forward more ({yours[short] + 1}) the bubble would be "
                 f"the least" if short is not None else
                 "some rank starts its backwards before the gradient it needs can be back, and waits")
        return f" {simulated}, the bubble is {bubble:.4f}, the least (p − 1)/(v·m + p − 1) = {want:.4f}: {which}."
    for r in range(p):
        if yours[r] > 0 and minimal(changed(r, -1)):
            peak, peak_fewer = peak_activations(schedule)[r], peak_activations(_interleaved(p, m, v, changed(r, -1)))[r]
            held = (f"; its peak of activations would be {fmt_number(peak_fewer)} micro-batches instead of "
                    f"{fmt_number(peak)} (a chunk's micro-batch counts 1/v)" if not math.isclose(peak, peak_fewer)
                    else "")
            return (f" {simulated}: rank {r} could run one forward fewer ({yours[r] - 1} instead of {yours[r]}) and the "
                    f"step would be no longer (the bubble stays {want:.4f}){held}.")
    return ""


def _read_warmups(result, head: str, p: int, m: int, v: int) -> list:
    if not isinstance(result, (list, tuple)):
        fail(f"{head} returned {describe(result)}: return a list of p = {p} ints, rank r's number of warm-up forwards")
    if len(result) != p:
        fail(f"{head} returned {len(result)} numbers for p = {p} ranks: one per rank r = 0 .. {p - 1}")
    for r, w in enumerate(result):
        if isinstance(w, bool) or not isinstance(w, int):
            fail(f"{head}: item {r} (rank {r}'s warm-up) is {describe(w)}: a number of forwards, an int")
        if not 0 <= w <= v * m:
            fail(f"{head}: rank {r}'s warm-up is {w}, but it runs v·m = {v * m} forwards in all ({v} chunks × {m} "
                 f"micro-batches): a warm-up is between 0 and {v * m}")
    return list(result)


def check_interleaved_warmups(interleaved_warmups, *, sizes=INTERLEAVED_SIZES) -> None:
    """Check exercise 6b: ``interleaved_warmups(p, m, v)`` returns each rank's warm-up forwards for labkit's
    interleaved 1F1B order. Simulated on every (p, m, v) of ``sizes``: no deadlock, the bubble (p − 1)/(v·m + p − 1),
    and on every rank one forward fewer deadlocks or lengthens the step (the least warm-up; any such one passes)."""
    __tracebackhide__ = True
    name = need_function(interleaved_warmups, "check_interleaved_warmups")
    for p, m, v in sizes:
        head = f"{name}({p}, {m}, {v})"
        with time_limit(_SECONDS, f"{head} did not return within {_SECONDS:g} s: an endless loop?"):
            result = call_student(interleaved_warmups, p, m, v, name=name, task="6b")
        yours = _read_warmups(result, head, p, m, v)
        effect = _interleaved_effect(p, m, v, yours)
        if not effect:
            continue
        mistake = find_mistake(INTERLEAVED_MISTAKES, lambda row: row.variant(p, m, v) == yours)
        says = mistake.says if mistake else "{head}: your warm-up forwards per rank {yours}.{effect}"
        fail(says.format(head=head, yours=f"({_list(yours)})", effect=effect))
    shown = ", ".join(f"({p}, {m}, {v})" for p, m, v in sizes[:5])
    passed(f"{name} gives the least warm-up on {len(sizes)} sizes (p, m, v) ({shown}, ..., and v = 1): no deadlock, "
           f"the simulated bubble (p − 1)/(v·m + p − 1), and one forward fewer on any rank would deadlock or "
           f"lengthen the step")
