"""Communication hooks for labkit's BucketedDDP, with torch's interface (lesson 9, issue 18).

torch's DDP lets a hook replace the all-reduce of each bucket: ``ddp.register_comm_hook(state, hook)``, where
``hook(state, bucket)`` returns a ``torch.futures.Future`` of the averaged flat buffer and ``bucket`` is a
``torch.distributed.GradBucket``. :class:`HookedDDP` is labkit's :class:`~labkit.ddp.BucketedDDP` with the same
method, and :class:`GradBucket` offers what torch's does, so that one hook (labkit.compression's, or torch's own
``powerSGD_hook``) runs under both DDPs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from labkit.ddp import Bucket, BucketedDDP

__all__ = ["GradBucket", "HookedDDP"]


class GradBucket:
    """One bucket as a hook sees it (torch.distributed.GradBucket's methods)."""

    def __init__(self, index: int, bucket: Bucket, last: bool):
        self._index, self._bucket, self._last = index, bucket, last

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        """The bucket's gradients laid end to end (what the hook averages, in place or not)."""
        return self._bucket.buffer

    def gradients(self) -> list[torch.Tensor]:
        """Each parameter's gradient as a view of :meth:`buffer` (writing one writes the buffer)."""
        return [self._bucket.buffer[o:o + p.numel()].view_as(p) for p, o in zip(self._bucket.params, self._bucket.offsets)]

    def parameters(self) -> list[torch.Tensor]:
        return list(self._bucket.params)

    def is_last(self) -> bool:
        """Whether this is the last bucket of the step (hooks count their steps on it)."""
        return self._last


class _HookWork:
    """What BucketedDDP waits on: the hook's future; its value becomes the bucket's buffer."""

    def __init__(self, future: torch.futures.Future, buffer: torch.Tensor):
        self.future, self.buffer = future, buffer

    def wait(self) -> bool:
        result = self.future.wait()
        if isinstance(result, list):         # a future of an all-reduce holds [tensor]
            result = result[0]
        if result.data_ptr() != self.buffer.data_ptr():
            self.buffer.copy_(result)
        return True


class HookedDDP(BucketedDDP):
    """BucketedDDP whose buckets are averaged by a communication hook (torch's register_comm_hook)."""

    comm_hook: tuple | None = None

    def register_comm_hook(self, state: object, hook: Callable) -> None:
        if self.comm_hook is not None:
            raise RuntimeError("register_comm_hook may be called once (as torch's DDP)")
        self.comm_hook = (state, hook)

    def launch(self, index: int) -> None:
        if self.comm_hook is None:
            return super().launch(index)
        state, hook = self.comm_hook
        bucket = self.buckets[index]
        bucket.work = _HookWork(hook(state, GradBucket(index, bucket, index == len(self.buckets) - 1)), bucket.buffer)
