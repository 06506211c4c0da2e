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

__all__ = ["DeviceTime"]


class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward each take a fixed time."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class DeviceTime(nn.Module):
    """``layer`` followed by ``forward_ms`` of waiting in the forward and ``backward_ms`` (default twice
    the forward, the usual ratio: a backward computes the gradients of the inputs and of the weights)
    in the backward."""

    def __init__(self, layer: nn.Module, forward_ms: float, backward_ms: float | None = None):
        super().__init__()
        if forward_ms < 0 or (backward_ms is not None and backward_ms < 0):
            raise ValueError("device times must be >= 0 ms")
        self.layer = layer
        self.forward_s = forward_ms / 1e3
        self.backward_s = (2 * forward_ms if backward_ms is None else backward_ms) / 1e3

    def forward(self, x):
        return _Sleep.apply(self.layer(x), self.forward_s, self.backward_s)
