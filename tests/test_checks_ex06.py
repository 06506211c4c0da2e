"""The checker of exercise 6 accepts the solution notebook's one_f_one_b (as lists, or as a whole Schedule) and
rejects each known-wrong version with a message that names the mistake: GPipe's order, too few or too many
warm-up forwards on a stage, the same warm-up on every stage, the warm-up reversed, no cap at m, a backward
before its forward, a missing micro-batch, backwards out of order, a broken steady state, and malformed
results. Every wrong schedule is caught by the simulation, in this process; only a right one is run on real
processes (two launches for the solution)."""

from pathlib import Path

import pytest
from notebook_code import code_cells

from labkit.checks import CheckFailed
from labkit.checks import ex06
from labkit.checks.ex06 import SIZES, check_one_f_one_b
from labkit.pipeline.schedules import one_f_one_b_compute as reference_compute
from labkit.pipeline.schedules import one_f_one_b_warmup as expected_warmup
from labkit.pipeline import schedules
from labkit.pipeline.schedules import Action, Schedule, add_communication
from labkit.pipeline.simulate import (bubble_fraction, expected_bubble, expected_peak_activations, peak_activations,
                                      simulate)

ROOT = Path(__file__).resolve().parents[1]


def _notebook_function(folder):
    """one_f_one_b exactly as the notebook in ``folder`` defines it."""
    code = code_cells(ROOT / folder / "06_pipeline_schedule_exercise.ipynb")
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(compile("from labkit.pipeline.schedules import Action, Schedule, add_communication", "imports", "exec"),
         namespace)
    exec(compile(next(s for s in code if "def one_f_one_b" in s), "one_f_one_b", "exec"), namespace)
    return namespace["one_f_one_b"]


one_f_one_b = _notebook_function("solutions")


def assert_rejected(fn, expected, **kwargs):
    """``check_one_f_one_b(fn)`` raises CheckFailed, and its message contains every text of ``expected``."""
    with pytest.raises(CheckFailed) as info:
        check_one_f_one_b(fn, **kwargs)
    for text in expected:
        assert text in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# The solution passes; the checker's reference is labkit's 1F1B and meets the formulas
# --------------------------------------------------------------------------------------------

def test_the_solution_passes(capsys):
    check_one_f_one_b(one_f_one_b)
    assert capsys.readouterr().out == (
        "✓ one_f_one_b is 1F1B on 18 sizes (p, m) ((3, 5), (4, 8), (2, 3), (5, 9), (4, 5), (8, 12), ..., with m < p, "
        "m = p and p = 1): every stage's warm-up is min(p − i − 1, m), the simulated bubble (p − 1)/(m + p − 1), the "
        "peak min(p − i, m) micro-batches' activations; run for real (2 processes with m = 4; 3 processes with m = 2 "
        "and 5), the loss and gradients equal one process's within 1e-12\n")


def test_the_reference_is_labkits_1f1b_and_meets_the_formulas():
    sizes = set(SIZES)
    assert {(1, 1), (1, 4)} <= sizes                                   # p = 1
    assert any(m < p - 1 for p, m in sizes)                            # the cap at m matters
    assert any(m == p for p, m in sizes) and any(m > p for p, m in sizes)
    assert any(p % 2 and m % 2 for p, m in sizes)                      # odd sizes
    for p, m in SIZES:
        made = schedules.one_f_one_b(p, m)
        assert [made.compute_order(r) for r in range(p)] == reference_compute(p, m)
        assert bubble_fraction(simulate(made)) == pytest.approx(expected_bubble(p, m), abs=1e-12)
        assert peak_activations(made) == expected_peak_activations("1F1B", p, m)
        assert expected_warmup(p, m) == [min(p - i - 1, m) for i in range(p)]


def test_a_whole_schedule_is_accepted_and_run(capsys):
    def as_schedule(p, m):
        return Schedule("mine", p, p, m, add_communication(one_f_one_b(p, m), p))
    check_one_f_one_b(as_schedule, runs=((2, (3,)),))
    assert capsys.readouterr().out.startswith("✓ as_schedule is 1F1B on 18 sizes")


# --------------------------------------------------------------------------------------------
# Known-wrong versions, as a student might write them
# --------------------------------------------------------------------------------------------

def _with_warmup(warmup, name):
    """labkit's 1F1B order with the warm-up of stage i given by ``warmup(p, m, i)``."""
    def fn(p, m):
        return reference_compute(p, m, [warmup(p, m, i) for i in range(p)])
    fn.__name__ = name
    return fn


def gpipe_order(p, m):
    return [[Action("F", k, i) for k in range(m)] + [Action("B", k, i) for k in range(m)] for i in range(p)]


too_few_warmup = _with_warmup(lambda p, m, i: max(min(p - i - 2, m), 0), "too_few_warmup")
too_many_warmup = _with_warmup(lambda p, m, i: min(p - i, m), "too_many_warmup")
same_warmup = _with_warmup(lambda p, m, i: min(p - 1, m), "same_warmup")
no_warmup = _with_warmup(lambda p, m, i: 0, "no_warmup")
reversed_warmup = _with_warmup(lambda p, m, i: min(i, m), "reversed_warmup")
no_cap = _with_warmup(lambda p, m, i: p - i - 1, "no_cap")


def backward_first(p, m):
    """The steady state written backward, then forward."""
    out = []
    for i in range(p):
        w = min(p - i - 1, m)
        order = [Action("F", k, i) for k in range(w)]
        for k in range(m - w):
            order += [Action("B", k, i), Action("F", k + w, i)]
        out.append(order + [Action("B", k, i) for k in range(m - w, m)])
    return out


def missing_microbatch(p, m):
    """The cool-down stops one short."""
    return [[a for a in stage if not (a.kind == "B" and a.microbatch == m - 1)] for stage in reference_compute(p, m)]


def reversed_cooldown(p, m):
    """B k + 1 before B k: the cool-down drained from the newest micro-batch."""
    out = []
    for i in range(p):
        w = min(p - i - 1, m)
        order = [Action("F", k, i) for k in range(w)]
        for k in range(m - w):
            order += [Action("F", k + w, i), Action("B", k, i)]
        out.append(order + [Action("B", k, i) for k in reversed(range(m - w, m))])
    return out


def reversed_warmup_forwards(p, m):
    """The warm-up forwards in the wrong order: F1 before F0."""
    out = []
    for stage in reference_compute(p, m):
        w = next(j for j, a in enumerate(stage) if a.kind == "B") - 1
        out.append(stage[:w][::-1] + stage[w:] if w > 1 else stage)
    return out


def no_alternation(p, m):
    """The right warm-up and first backward, then every remaining forward before the other backwards."""
    out = []
    for i in range(p):
        w = min(p - i - 1, m)
        first = min(w + 1, m)
        out.append([Action("F", k, i) for k in range(first)] + [Action("B", 0, i)]
                   + [Action("F", k, i) for k in range(first, m)] + [Action("B", k, i) for k in range(1, m)])
    return out


WRONG = [
    (gpipe_order, ["gpipe_order(3, 5): this is GPipe, not 1F1B", "stage i holds m = 5 micro-batches' activations",
                   "1F1B holds p − i of them (min(p − i, m) = [3, 2, 1])", "expected [2, 1, 0], yours [5, 5, 5]",
                   "hold at most [5, 5, 5]"]),
    (too_few_warmup, ["too_few_warmup(3, 5): too few warm-up forwards on stage 0: expected 2", "yours 1",
                      "expected [2, 1, 0], yours [1, 0, 0]",
                      "its bubble is 0.545, 1F1B's (p − 1)/(m + p − 1) = 0.286"]),
    (too_many_warmup, ["too_many_warmup(3, 5): too many warm-up forwards on stage 0: expected 2", "yours 3",
                       "expected [2, 1, 0], yours [3, 2, 1]", "hold at most [4, 3, 2] micro-batches' activations, "
                       "1F1B's min(p − i, m) = [3, 2, 1]"]),
    (same_warmup, ["same_warmup(3, 5): every stage runs the same warm-up, 2 forwards",
                   "expected [2, 1, 0], yours [2, 2, 2]", "The warm-up must depend on the stage"]),
    (no_warmup, ["no_warmup(3, 5): every stage runs the same warm-up, 0 forwards", "must depend on the stage",
                 "its bubble is 0.667"]),
    (reversed_warmup, ["reversed_warmup(3, 5): the warm-up is reversed", "expected [2, 1, 0], yours [0, 1, 2]",
                       "Replayed, it deadlocks: rank 0 at step 2 waits in RECV_B0@s0"]),
    (no_cap, ["no_cap(4, 2): stage 0 runs F2, but there are only m = 2 micro-batches (0 .. 1)",
              "cap the warm-up at m, min(p − i − 1, m)", "Stage 0's warm-up: expected 2, yours 3"]),
    (backward_first, ["backward_first(3, 5): stage 2 runs B0 at step 0, before its forward F0 at step 1",
                      "a backward needs the activations its forward saved"]),
    (missing_microbatch, ["missing_microbatch(3, 5): stage 0 never runs B4 (the backward of micro-batch 4)",
                          "each of the m = 5 micro-batches (0 .. 4) exactly once"]),
    (reversed_cooldown, ["reversed_cooldown(3, 5): stage 0 runs B4 before B3",
                         "runs its backwards in the order 0, 1, .., 4"]),
    (reversed_warmup_forwards, ["reversed_warmup_forwards(3, 5): stage 0 runs F1 before F0",
                                "runs its forwards in the order 0, 1, .., 4"]),
    (no_alternation, ["no_alternation(3, 5): stage 0, step 5: yours is F4, 1F1B runs B1",
                      "alternates one forward and one backward (F2 B0 F3 B1 ..)",
                      "its bubble is 0.400", "hold at most [4, 4, 4]"]),
]


@pytest.mark.parametrize("fn,expected", WRONG, ids=[fn.__name__ for fn, _ in WRONG])
def test_known_wrong_schedules_are_named(fn, expected):
    assert_rejected(fn, expected)


@pytest.mark.parametrize("mistake", ex06.WARMUP_MISTAKES, ids=lambda row: row.name)
def test_every_warmup_mistake_of_the_table_is_named_with_its_own_message(mistake):
    """The checker's table, built as schedules: labkit's 1F1B order with the row's warm-ups."""
    def one_f_one_b(p, m):
        return reference_compute(p, m, mistake.variant.example(p, m))
    fixed = mistake.says.split("{head}: ")[1].split("{")[0]      # the words of the text that name the mistake
    assert_rejected(one_f_one_b, ["one_f_one_b(3, 5): " + fixed])


# The words that name each mistake: in its message, and in no other known-wrong version's message.
OWN_WORDS = {"gpipe_order": "this is GPipe", "too_few_warmup": "too few warm-up forwards",
             "too_many_warmup": "too many warm-up forwards", "same_warmup": "the same warm-up",
             "no_warmup": "the same warm-up", "reversed_warmup": "the warm-up is reversed",
             "no_cap": "cap the warm-up at m", "backward_first": "before its forward",
             "missing_microbatch": "never runs", "reversed_cooldown": "runs its backwards in the order",
             "reversed_warmup_forwards": "runs its forwards in the order", "no_alternation": "1F1B runs"}


def test_each_mistake_has_its_own_message():
    """No two known-wrong versions get the same explanation (no warm-up at all is the same warm-up everywhere)."""
    assert sorted(OWN_WORDS) == sorted(fn.__name__ for fn, _ in WRONG)
    messages = {}
    for fn, _ in WRONG:
        with pytest.raises(CheckFailed) as info:
            check_one_f_one_b(fn)
        messages[fn.__name__] = str(info.value)
    for name, message in messages.items():
        for other, words in OWN_WORDS.items():
            assert (words in message) == (words == OWN_WORDS[name]), (name, other, message)


def test_the_warmup_of_a_stage_with_m_below_the_cap_is_named_with_the_cap():
    """m < p − i − 1 on stage 0 of (5, 3), with one forward too few there: the expected warm-up is m."""
    def short(p, m):
        if (p, m) != (5, 3):
            return reference_compute(p, m)
        out = reference_compute(p, m)
        out[0] = [Action("F", 0, 0), Action("F", 1, 0), Action("B", 0, 0), Action("F", 2, 0), Action("B", 1, 0),
                  Action("B", 2, 0)]
        return out
    assert_rejected(short, ["short(5, 3): too few warm-up forwards on stage 0: expected 3 (min(p − i − 1, m) = "
                            "min(4, 3)), yours 1"])


# --------------------------------------------------------------------------------------------
# Malformed results, errors, the stub
# --------------------------------------------------------------------------------------------

def _returning(value, name="one_f_one_b"):
    def fn(p, m):
        return value(p, m) if callable(value) else value
    fn.__name__ = name
    return fn


def _broken_schedule(p, m):
    """A whole Schedule whose stage 0 never sends micro-batch 0's activation."""
    actions = add_communication(reference_compute(p, m), p)
    if p > 1:
        actions[0] = [a for a in actions[0] if not (a.kind == "SEND_F" and a.microbatch == 0)]
    return Schedule("mine", p, p, m, actions)


@pytest.mark.parametrize("value,expected", [
    (None, ["one_f_one_b(3, 5) returned None: return a list of p = 3 lists"]),
    (lambda p, m: [a for stage in reference_compute(p, m) for a in stage],
     ["returned one flat list of 30 Actions: return one list per stage"]),
    (lambda p, m: reference_compute(p, m)[:-1], ["returned 2 lists for p = 3 stages"]),
    (lambda p, m: [[(a.kind, a.microbatch, a.stage) for a in s] for s in reference_compute(p, m)],
     ["stage 0's list, item 0 is a tuple, ('F', 0, 0): write each step as Action(\"F\", k, 0)"]),
    (lambda p, m: add_communication(reference_compute(p, m), p),
     ["stage 0's list, item 1 is SEND_F0@s0: return only the compute actions F and B"]),
    (lambda p, m: [[Action(a.kind, a.stage, a.microbatch) for a in s] for s in reference_compute(p, m)],
     ["stage 0's list, item 1 is F0@s1, an action of stage 1", "Action(\"F\", 1, 0)"]),
    (lambda p, m: schedules.one_f_one_b(p, m + 1), ["returned a Schedule of 6 micro-batches, expected 5"]),
    (_broken_schedule, ["one_f_one_b(3, 5): the schedule cannot run", "never does SEND_F of micro-batch 0"]),
    (lambda p, m: Schedule("mine", p, p, m, add_communication(reference_compute(p, m)[::-1], p)),
     ["one_f_one_b(3, 5): rank 0's compute action 0 is F0@s2, an action of stage 2"]),
])
def test_malformed_results_are_explained(value, expected):
    assert_rejected(_returning(value), expected)


def test_labkits_own_function_and_non_functions_are_refused():
    assert_rejected(schedules.one_f_one_b, ["labkit's own one_f_one_b"])
    assert_rejected(3, ["needs your function, not int"])


def test_an_exception_in_the_students_code_is_shown_with_its_traceback():
    def one_f_one_b(p, m):
        return [[Action("F", k, i) for k in range(m)] + [Action("X", 0, i)] for i in range(p)]
    message = assert_rejected(one_f_one_b, ["one_f_one_b(3, 5) raised ValueError: unknown action kind 'X'",
                                            "--- traceback ---", "test_checks_ex06.py"])
    assert "labkit/pipeline/schedules.py" not in message


def test_an_endless_loop_is_stopped(monkeypatch):
    monkeypatch.setattr(ex06, "_SECONDS", 0.3)

    def one_f_one_b(p, m):
        while True:
            pass
    assert_rejected(one_f_one_b, ["one_f_one_b(3, 5) did not return within 0.3 s: an endless loop?"])


def test_a_wrong_real_run_is_reported_by_stage_and_element(monkeypatch):
    """The real run's comparison works: a reference with one gradient element changed is caught and named."""
    reference = ex06._reference

    def changed(p, m):
        loss, grads = reference(p, m)
        grads[1][0][1, 2] += 1.0
        return loss, grads
    monkeypatch.setattr(ex06, "_reference", changed)
    assert_rejected(one_f_one_b, ["one_f_one_b(2, 3), run on 2 processes by labkit.pipeline.runtime.run_schedule: "
                                  "stage 1 (rank 1), the gradient of layer 2.weight[1, 2] is"],
                    sizes=((2, 3),), runs=((2, (3,)),))


def test_the_stub_and_a_students_own_not_implemented():
    stub = _notebook_function("exercises")
    with pytest.raises(NotImplementedError, match=r"^Exercise 6: the warm-up forwards of stage i"):
        check_one_f_one_b(stub)

    def todo(p, m):
        raise NotImplementedError
    with pytest.raises(NotImplementedError, match=r"^Exercise 6: todo is not written yet"):
        check_one_f_one_b(todo)


# --------------------------------------------------------------------------------------------
# 6b: the least warm-up of interleaved 1F1B, checked by simulation
# --------------------------------------------------------------------------------------------

from labkit.checks.ex06 import INTERLEAVED_MISTAKES, check_interleaved_warmups  # noqa: E402


def _solution_warmups():
    code = code_cells(ROOT / "solutions" / "06_pipeline_schedule_exercise.ipynb")
    namespace = {"__name__": "__main__"}
    exec(compile(next(c for c in code if "def interleaved_warmups" in c), "6b", "exec"), namespace)
    return namespace["interleaved_warmups"]


def _changed(rank, by):
    """The solution's warm-ups with rank ``rank``'s changed by ``by`` (where that rank exists)."""
    solution = _solution_warmups()

    def interleaved_warmups(p, m, v):
        w = solution(p, m, v)
        if rank < p:
            w[rank] += by
        return w
    return interleaved_warmups


def test_the_solution_passes_and_is_the_least_warmup_labkit_can_run(capsys):
    check_interleaved_warmups(_solution_warmups())
    assert "gives the least warm-up on 12 sizes" in capsys.readouterr().out


@pytest.mark.parametrize("mistake", INTERLEAVED_MISTAKES, ids=lambda m: m.name)
def test_every_known_warmup_formula_is_named(mistake):
    with pytest.raises(CheckFailed) as info:
        check_interleaved_warmups(lambda p, m, v: mistake.variant(p, m, v))
    head = mistake.says.split("{effect}")[0].split("{yours}")[-1][:40]
    assert head in str(info.value), str(info.value)


@pytest.mark.parametrize("fn,expected", [
    pytest.param(_changed(0, 1), ["rank 0 could run one forward fewer", "the bubble stays"], id="one_too_many"),
    pytest.param(_changed(1, -1), ["rank 1's warm-up is too short", "the bubble is"], id="one_too_few"),
    pytest.param(_changed(3, -1), ["It cannot run", "comes before its forward"], id="last_rank_short"),
    pytest.param(lambda p, m, v: [min((v - 1) * p + r, v * m) for r in range(p)], ["Replayed, it deadlocks"],
                 id="reversed_deadlocks"),
    pytest.param(lambda p, m, v: None, ["returned None", "a list of p = 4 ints"], id="none"),
    pytest.param(lambda p, m, v: [1] * (p + 1), ["returned 5 numbers for p = 4 ranks"], id="length"),
    pytest.param(lambda p, m, v: [2.0] * p, ["rank 0's warm-up) is a float", "an int"], id="float"),
    pytest.param(lambda p, m, v: [v * m + 1] * p, ["rank 0's warm-up is 17", "between 0 and 16"], id="beyond"),
])
def test_wrong_interleaved_warmups_are_named(fn, expected):
    with pytest.raises(CheckFailed) as info:
        check_interleaved_warmups(fn)
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_megatrons_warmup_is_valid_but_not_the_least():
    """The finding the task rests on: with free messages and t_B = 2 t_F, Megatron-LM's warm-up keeps the least
    bubble and vp − r − 1 does too, with fewer activations held on some rank."""
    from labkit.pipeline.schedules import interleaved_1f1b_warmup
    mistake = next(m for m in INTERLEAVED_MISTAKES if m.name == "Megatron-LM's warm-up")
    assert mistake.variant(4, 8, 2) == interleaved_1f1b_warmup(4, 8, 2) == [10, 8, 6, 4]
    with pytest.raises(CheckFailed, match="could run one forward fewer"):
        check_interleaved_warmups(interleaved_1f1b_warmup)
