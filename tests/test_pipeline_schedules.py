"""Pipeline schedules as data: the generators, the validator and the simulator, single-process.

The formulas are checked against the simulation over a grid of sizes (not the other way round: the
simulator never reads a formula), and the validator is shown each kind of impossible schedule."""

import dataclasses

import matplotlib
import pytest

from labkit.pipeline.schedules import (B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule, add_communication,
                                       gpipe, interleaved_1f1b, make_schedule, one_f_one_b)
from labkit.pipeline.simulate import (ScheduleError, activation_curve, bubble_fraction, expected_bubble,
                                      expected_peak_activations, peak_activations, simulate, validate)

matplotlib.use("Agg")

SIZES = [(p, m) for p in (1, 2, 3, 4, 5, 8) for m in (1, 2, 3, 4, 7, 8, 16)]


@pytest.mark.parametrize("name", ["GPipe", "1F1B"])
def test_bubble_and_makespan_match_the_formula(name):
    for p, m in SIZES:
        schedule = make_schedule(name, p, m)
        validate(schedule)
        for t_f, t_b in ((1.0, 2.0), (1.0, 1.0), (0.5, 3.0)):
            timeline = simulate(schedule, t_f, t_b)
            assert timeline.makespan == pytest.approx((m + p - 1) * (t_f + t_b)), (p, m)
            assert bubble_fraction(timeline) == pytest.approx(expected_bubble(p, m)), (p, m)


@pytest.mark.parametrize("name", ["GPipe", "1F1B"])
def test_peak_activations_match_the_formula(name):
    for p, m in SIZES:
        assert peak_activations(make_schedule(name, p, m)) == expected_peak_activations(name, p, m), (p, m)
    assert expected_peak_activations("GPipe", 4, 8) == [8, 8, 8, 8]
    assert expected_peak_activations("1F1B", 4, 8) == [4, 3, 2, 1]
    assert expected_peak_activations("1F1B", 4, 2) == [2, 2, 2, 1]


def test_one_f_one_b_order():
    s = one_f_one_b(4, 6)
    assert s.table().splitlines()[0] == "rank 0: F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert s.table().splitlines()[3] == "rank 3: F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"
    # the communication around each compute action, on a middle stage
    first = s.actions[1][:4]
    assert first == (Action(RECV_F, 0, 1), Action(F, 0, 1), Action(SEND_F, 0, 1), Action(RECV_F, 1, 1))
    b0 = s.actions[1].index(Action(B, 0, 1))
    assert s.actions[1][b0 - 1] == Action(RECV_B, 0, 1) and s.actions[1][b0 + 1] == Action(SEND_B, 0, 1)
    # the first and last stages have no neighbour on one side: no receive of activations on stage 0, ...
    assert not any(a.kind in (RECV_F, SEND_B) for a in s.actions[0])
    assert not any(a.kind in (SEND_F, RECV_B) for a in s.actions[3])


def test_gpipe_order():
    assert gpipe(2, 3).table() == "rank 0: F0 F1 F2 B0 B1 B2\nrank 1: F0 F1 F2 B0 B1 B2"


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 2), (2, 8, 3), (3, 6, 2), (4, 4, 2), (4, 8, 2), (4, 16, 4),
                                   (4, 8, 1)])
def test_interleaved_shrinks_the_bubble_v_fold(p, m, v):
    s = interleaved_1f1b(p, m, v)
    validate(s)
    assert s.num_stages == p * v and s.stages_of(1) == [1 + c * p for c in range(v)]
    timeline = simulate(s, 1.0 / v, 2.0 / v)   # each chunk holds 1/v of a rank's layers
    assert bubble_fraction(timeline) == pytest.approx(expected_bubble(p, m, v))
    assert bubble_fraction(timeline) <= expected_bubble(p, m) + 1e-12
    if v == 1:
        assert [s.compute_order(r) for r in range(p)] == [one_f_one_b(p, m).compute_order(r) for r in range(p)]


def test_interleaved_needs_whole_rounds():
    with pytest.raises(ValueError, match="multiple of p"):
        interleaved_1f1b(4, 6, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive integer"):
        gpipe(bad, 4)
    with pytest.raises(ValueError, match="positive integer"):
        one_f_one_b(4, bad)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("zero-bubble", 4, 4)
    with pytest.raises(ValueError, match="unknown action kind"):
        Action("X", 0, 0)
    with pytest.raises(ValueError, match="no formula"):
        expected_peak_activations("interleaved", 4, 4)


def test_unbalanced_stages_the_slowest_sets_the_pace():
    # one stage twice as slow: the steady state runs at its pace, m slots of its (t_f + t_b)
    p, m = 4, 16
    t_f = [1.0, 1.0, 2.0, 1.0]
    timeline = simulate(one_f_one_b(p, m), t_f, [2 * t for t in t_f])
    assert timeline.makespan >= m * 6.0
    assert bubble_fraction(timeline) > expected_bubble(p, m) + 0.2


def test_communication_time_delays_every_hop():
    p, m, c = 4, 4, 0.25
    timeline = simulate(gpipe(p, m), 1.0, 2.0, t_comm=c)
    # the critical path crosses p - 1 stage boundaries forward and p - 1 back
    assert timeline.makespan == pytest.approx((m + p - 1) * 3.0 + 2 * (p - 1) * c)


def test_activation_curve_of_one_f_one_b():
    assert activation_curve(one_f_one_b(4, 6), 1) == [1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 1, 0]
    assert activation_curve(gpipe(2, 3), 0) == [1, 2, 3, 2, 1, 0]


# ---- the validator ----------------------------------------------------------------------------------

def _with(schedule: Schedule, rank: int, actions) -> Schedule:
    lists = list(schedule.actions)
    lists[rank] = tuple(actions)
    return dataclasses.replace(schedule, actions=lists)


def _compute_only(schedule: Schedule, rank: int, order) -> Schedule:
    lists = [schedule.compute_order(r) for r in range(schedule.num_ranks)]
    lists[rank] = order
    return dataclasses.replace(schedule, actions=add_communication(lists, schedule.num_stages))


def test_validator_rejects_a_backward_before_its_forward():
    s = one_f_one_b(3, 4)
    order = s.compute_order(2)              # F0 B0 F1 B1 ...
    order[0], order[1] = order[1], order[0]
    with pytest.raises(ScheduleError, match=r"B0@s2 at step \d+ comes before its forward"):
        validate(_compute_only(s, 2, order))


def test_validator_rejects_a_missing_and_a_duplicated_microbatch():
    s = gpipe(2, 3)
    order = [a for a in s.compute_order(1) if a.microbatch != 2]
    with pytest.raises(ScheduleError, match="stage 1 never runs F of micro-batch 2"):
        validate(_compute_only(s, 1, order))
    order = s.compute_order(0) + [Action(F, 0, 0)]
    with pytest.raises(ScheduleError, match="appears twice"):
        validate(_compute_only(s, 0, order))


def test_validator_rejects_a_receive_without_a_send():
    s = gpipe(2, 2)
    with pytest.raises(ScheduleError, match="no stage before it, so this receive has no matching send"):
        validate(_with(s, 0, (Action(RECV_F, 0, 0),) + s.actions[0]))
    # a stage that receives but whose neighbour never sends
    no_send = [a for a in s.actions[0] if a != Action(SEND_F, 1, 0)]
    with pytest.raises(ScheduleError, match="never does SEND_F of micro-batch 1"):
        validate(_with(s, 0, no_send))


def test_validator_rejects_a_receive_after_its_use():
    s = gpipe(2, 2)
    actions = list(s.actions[1])
    i, j = actions.index(Action(RECV_F, 0, 1)), actions.index(Action(F, 0, 1))
    actions[i], actions[j] = actions[j], actions[i]
    with pytest.raises(ScheduleError, match=r"RECV_F0@s1 at step 1 must come before F0@s1"):
        validate(_with(s, 1, actions))


def test_validator_finds_a_deadlock():
    # the last stage runs its backwards in reverse order while stage 0 waits for them in order: fine
    # (sends never block). A real deadlock: stage 0 waits for a gradient before sending the activation
    # that the last stage needs to produce it.
    s = gpipe(2, 2)
    compute = [[Action(F, 0, 0), Action(B, 0, 0), Action(F, 1, 0), Action(B, 1, 0)], s.compute_order(1)]
    with pytest.raises(ScheduleError, match="deadlocks: rank 0 at step 2 waits in RECV_B0@s0; rank 1"):
        validate(Schedule("bad", 2, 2, 2, add_communication(compute, 2)))


def test_validator_rejects_a_stage_on_the_wrong_rank():
    s = gpipe(2, 2)
    with pytest.raises(ScheduleError, match="stage 1 lives on rank 1, not on rank 0"):
        validate(_with(s, 0, s.actions[0] + (Action(F, 0, 1),)))
    with pytest.raises(ScheduleError, match="there are stages 0..1 and micro-batches 0..1"):
        validate(_with(s, 0, s.actions[0] + (Action(F, 5, 0),)))


def test_schedule_shape_errors():
    with pytest.raises(ValueError, match="3 action lists for 2 ranks"):
        Schedule("x", 2, 2, 1, [[], [], []])


def test_figures_render():
    from labkit.pipeline.gantt import explorer, pipeline_figure
    for name in ("GPipe", "1F1B", "interleaved"):
        fig = pipeline_figure(name, 4, 8)
        assert "bubble" in fig.axes[0].get_title()
        matplotlib.pyplot.close(fig)
    widget = explorer()
    assert [c.description for c in widget.controls.values()][1:] == ["stages p", "micro-batches m", "t_B / t_F",
                                                                     "chunks v (interleaved)"]
    widget.controls["name"].value = "interleaved"
    widget.controls["m"].value = 7
    assert "multiple of p = 4" in widget.message.value and widget.image.layout.display == "none"
    widget.controls["m"].value = 8
    assert widget.message.value == "" and widget.image.layout.display is None
    matplotlib.pyplot.close("all")


def test_device_time_keeps_the_layer_and_waits_its_time():
    import time

    import torch
    from torch import nn

    from labkit.pipeline.emulated import DeviceTime
    torch.manual_seed(0)
    layer = nn.Linear(3, 3).double()
    stage = DeviceTime(layer, forward_ms=5, backward_ms=10)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    start = time.perf_counter()
    y = stage(x)
    middle = time.perf_counter()
    y.sum().backward()
    end = time.perf_counter()
    assert middle - start >= 0.005 and end - middle >= 0.010      # sleep never returns early
    assert torch.equal(y, layer(x))
    x2 = x.detach().clone().requires_grad_()
    layer.zero_grad()
    layer(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert DeviceTime(layer, 4).backward_s == 0.008                # default: backward twice the forward
    with pytest.raises(ValueError, match=">= 0 ms"):
        DeviceTime(layer, -1)
