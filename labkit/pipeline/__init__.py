"""Pipeline parallelism (lesson 6): one schedule, three uses.

    schedules.py        the schedules as data: GPipe, 1F1B, interleaved 1F1B (per-rank action lists)
    simulate.py         validate a schedule, replay it: timeline, bubble, activations held
    gantt.py            draw a timeline (simulated or measured), the notebook's explorer
    runtime.py          execute a schedule on real processes over send/recv; measured timeline
    emulated.py         stages with a fixed "device time", for timing studies on few CPU cores
    gpt_stages.py       the GPT as a sequence of layers, and its tied embedding across stages
    torch_reference.py  torch.distributed.pipelining for the same stages (the reference)
"""

from labkit.pipeline.runtime import StepResult, merge_timelines, run_schedule, split_sequential
from labkit.pipeline.schedules import Action, Schedule, gpipe, interleaved_1f1b, make_schedule, one_f_one_b
from labkit.pipeline.simulate import (ScheduleError, Timeline, bubble_fraction, expected_bubble,
                                      expected_peak_activations, peak_activations, simulate, validate)

__all__ = ["Action", "Schedule", "gpipe", "one_f_one_b", "interleaved_1f1b", "make_schedule", "ScheduleError",
           "Timeline", "validate", "simulate", "bubble_fraction", "expected_bubble", "peak_activations",
           "expected_peak_activations", "StepResult", "run_schedule", "merge_timelines", "split_sequential"]
