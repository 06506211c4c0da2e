"""Stages that take a fixed "device time", to watch a schedule's timing on a machine with fewer cores
than processes.

A GPU computes while its host process waits; four GPUs compute at once whatever the host's cores are
doing. Four CPU processes on a 2-core laptop cannot: when all four compute, each runs at half speed,
so a measured pipeline timeline there stretches exactly where the pipeline is full and the measured
bubble says more about the laptop than about the schedule. :class:`DeviceTime` stands in for the GPU:
it wraps a (small) real layer and then sleeps the forward or backward time the "device" would take;
sleeping processes share no cores, so p of them overlap as p GPUs would. The data and gradients still
flow through the real layer, so the run stays a real pipeline step whose results can be checked.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from labkit.timeline import Event

__all__ = ["DeviceTime"]


def _busy(seconds: float, log: list | None, kind: str) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    if log is not None:
        log.append(Event(kind, start, time.perf_counter(), "device"))


class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward each take a fixed time."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s, log):
        ctx.backward_s, ctx.log = backward_s, log
        _busy(forward_s, log, "forward")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _busy(ctx.backward_s, ctx.log, "backward")
        return grad, None, None, None


class DeviceTime(nn.Module):
    """``layer`` followed by ``forward_ms`` of waiting in the forward and ``backward_ms`` (default twice
    the forward, the usual ratio: a backward computes the gradients of the inputs and of the weights)
    in the backward. ``log``: a list to which every wait appends a :class:`labkit.timeline.Event`
    ("forward" or "backward", perf_counter seconds): the "device's" own busy intervals."""

    def __init__(self, layer: nn.Module, forward_ms: float, backward_ms: float | None = None,
                 log: list | None = None):
        super().__init__()
        if forward_ms < 0 or (backward_ms is not None and backward_ms < 0):
            raise ValueError("device times must be >= 0 ms")
        self.layer = layer
        self.forward_s = forward_ms / 1e3
        self.backward_s = (2 * forward_ms if backward_ms is None else backward_ms) / 1e3
        self.log = log

    def forward(self, x):
        return _Sleep.apply(self.layer(x), self.forward_s, self.backward_s, self.log)

    def extra_repr(self) -> str:
        return f"forward {self.forward_s * 1e3:g} ms, backward {self.backward_s * 1e3:g} ms"
