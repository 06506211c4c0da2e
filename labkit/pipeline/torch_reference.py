"""PyTorch's own pipeline, ``torch.distributed.pipelining``, for the same stages: the reference that
labkit's runtime is checked against (same loss, same gradients) and benchmarked against.

One ``PipelineStage`` per rank wraps its piece of the model; ``ScheduleGPipe`` or ``Schedule1F1B``
cuts the batch into micro-batches (along dim 0) and runs the step. With ``scale_grads=True`` (the
default) torch divides the summed gradients by the number of micro-batches, as labkit's runtime does
by dividing each micro-batch's loss by m. Over gloo this needs torch >= 2.10 (2.9.1's stages crash there:
a message of 8 bytes where 4 were expected).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["TORCH_SCHEDULES", "torch_schedule"]


def _schedule_classes() -> dict:
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    return {"GPipe": ScheduleGPipe, "1F1B": Schedule1F1B}


TORCH_SCHEDULES = ("GPipe", "1F1B")


def torch_schedule(name: str, module: nn.Module, num_microbatches: int, loss_fn: Callable,
                   example_microbatch: torch.Tensor, *, device=None, group=None):
    """A torch schedule for this rank's ``module`` (stage = this rank's place in ``group``). Call
    ``.step(x)`` on the first stage, ``.step(target=y, losses=[])`` on the last, ``.step()`` between.

    ``example_microbatch``: one micro-batch of this stage's input (its shape and dtype are what torch
    needs to allocate receive buffers without an extra round of messages).
    """
    from torch.distributed.pipelining import PipelineStage
    classes = _schedule_classes()
    if name not in classes:
        raise ValueError(f"torch.distributed.pipelining schedules compared here: {', '.join(classes)}; not {name!r}")
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    device = torch.device(device if device is not None else "cpu")
    stage = PipelineStage(module, rank, world, device, input_args=(example_microbatch,), group=group)
    return classes[name](stage, num_microbatches, loss_fn=loss_fn)
