"""DistributedDataParallel from scratch, in the three steps PyTorch's own DDP took.

    NaiveDDP(model)                        when backward ends: all-reduce every gradient, one by one
    OverlapDDP(model)                      each gradient's all-reduce starts (async) as soon as it is ready
    BucketedDDP(model, bucket_cap_mb=25)   gradients packed into buckets in the order they become
                                           ready; one async all-reduce per full bucket

All three are drop-in replacements for ``torch.nn.parallel.DistributedDataParallel`` in a training
loop: wrap the model, then ``loss.backward()`` returns with every gradient averaged over the ranks
and ``optimizer.step()`` needs nothing else. At wrap time rank 0's parameters and buffers are copied
to every rank, so all replicas start equal. Frozen parameters (``requires_grad=False``) are skipped;
a weight shared by two layers (tied) is one ``Parameter`` and is reduced once. ``with
ddp.no_sync():`` accumulates gradients locally; the next backward outside it averages the sum.

How the hooks work. ``Tensor.register_post_accumulate_grad_hook`` calls a function once per backward
for each parameter, right after its ``.grad`` is final. The first call of a backward also queues a
callback with the autograd engine (``queue_callback``, what torch's FSDP uses) that runs when the
whole backward pass is done: there the pending all-reduces are waited for, so that ``backward()``
returns only when the gradients are averaged.
"""

from __future__ import annotations

import itertools
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

from labkit import comm
from labkit.data_parallel import broadcast_parameters
from labkit.timeline import Event

__all__ = ["NaiveDDP", "OverlapDDP", "BucketedDDP", "Bucket", "plan_buckets"]


def _check_same_model_everywhere(module: nn.Module, group) -> None:
    # A fingerprint of (name, shape, dtype, trainable) for every parameter, compared across ranks:
    # different models would otherwise pair up mismatched all-reduces and hang or give garbage.
    desc = repr([(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters()])
    mine = comm.on(torch.tensor([zlib.crc32(desc.encode())], dtype=torch.int64), group)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    comm.all_gather(everyone, mine, group=group)
    if any(int(f) != int(mine) for f in everyone):
        raise ValueError("DDP: the ranks wrapped different models (parameter names, shapes, dtypes or "
                         "requires_grad differ). Build the same model on every rank before wrapping it.")


class _DataParallel(nn.Module):
    """What the three versions share: the broadcast at wrap time, the per-parameter hook, the
    end-of-backward callback, no_sync. Each version writes ``on_grad_ready`` (a gradient is final) and
    ``finish_backward`` (backward is over), and may reset its state in ``start_backward``."""

    def __init__(self, module: nn.Module, process_group=None, record_timeline: bool = False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"DDP wraps an nn.Module, got {type(module).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("DDP needs a process group: call dist.init_process_group first "
                               "(labkit.launch, torchrun and accelerate launch do it for you)")
        self.module = module
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self._rank = dist.get_rank()
        # parameters() lists a tied weight once; frozen parameters never get a gradient to average
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("DDP: the model has no trainable parameters")
        self._names = {}
        for name, p in module.named_parameters():
            self._names.setdefault(p, name)
        _check_same_model_everywhere(module, process_group)
        self.broadcast_from_rank0()
        self._sync = True
        self.in_backward = False
        self._ready: list = []          # parameters in the order their gradients became ready
        # record_timeline: one labkit.timeline.Event per thing that happens on this rank, in seconds of
        # time.perf_counter(): "forward", "grad" (a gradient became ready: start == end, label = its name),
        # "allreduce" (launch to completion, stamped by the communication thread), "wait" (end of backward)
        self.timeline: list[Event] | None = [] if record_timeline else None
        self._hook_handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    # --- the training-loop interface -------------------------------------------------------------

    def forward(self, *args, **kwargs):
        self.in_backward = False           # a new forward starts a new iteration
        if self.timeline is None:
            return self.module(*args, **kwargs)
        start = time.perf_counter()
        out = self.module(*args, **kwargs)
        self.timeline.append(Event("forward", start, time.perf_counter(), "forward", self._rank))
        return out

    @contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate into ``.grad``; the first one after averages the sum."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def broadcast_from_rank0(self) -> None:
        """At wrap time: every rank gets the group's first rank's parameters and buffers (lesson 1)."""
        first = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        broadcast_parameters(self.module, src=first, group=self.group)

    # --- the hooks ----------------------------------------------------------------------------------

    def _hook(self, param: torch.Tensor) -> None:
        """Called by autograd right after ``param.grad`` is final: once per parameter per backward."""
        if not self._sync:
            return
        if not self.in_backward:       # the first gradient of this backward pass
            self.in_backward = True
            self._ready = []
            self.start_backward()
            Variable._execution_engine.queue_callback(self._end_of_backward)   # once backward is done
        self._ready.append(param)
        if self.timeline is not None:
            now = time.perf_counter()
            self.timeline.append(Event("grad", now, now, self._names[param], self._rank))
        self.on_grad_ready(param)

    def _end_of_backward(self) -> None:
        self.in_backward = False
        if len(self._ready) != len(self.params):
            got = set(self._ready)
            missing = [self._names[p] for p in self.params if p not in got]
            raise RuntimeError(
                f"{type(self).__name__}: these trainable parameters got no gradient in this backward pass: "
                f"{', '.join(missing)}. Every rank waits for every gradient, so each must take part in the "
                "loss. Freeze parameters you do not train (p.requires_grad_(False)) before wrapping; "
                "torch's DDP has find_unused_parameters=True for parameters that are skipped only sometimes.")
        start = time.perf_counter()
        self.finish_backward()
        if self.timeline is not None:
            self.timeline.append(Event("wait", start, time.perf_counter(), "wait for all-reduces", self._rank))

    def _timed_all_reduce(self, tensor: torch.Tensor, label: str):
        work = comm.all_reduce(tensor, group=self.group, async_op=True)
        if self.timeline is not None:
            event = Event("allreduce", time.perf_counter(), float("nan"), label, self._rank, comm.nbytes(tensor))
            self.timeline.append(event)

            def done(fut, event=event):  # runs on the communication thread when the all-reduce ends
                event.end = time.perf_counter()
                return fut.value()
            work.get_future().then(done)
        return work

    # --- what each version does differently -------------------------------------------------------

    def start_backward(self) -> None:
        """The first gradient of a backward pass is ready: reset what the last one left."""

    def on_grad_ready(self, param: torch.Tensor) -> None:
        """``param.grad`` is final."""

    def finish_backward(self) -> None:
        """Backward is over: when this returns, every ``.grad`` holds the average over the ranks."""
        raise NotImplementedError


class NaiveDDP(_DataParallel):
    """Step 1: wait until backward is over, then all-reduce each gradient in turn and divide by N.
    Correct, but the network idles during backward and the CPU idles during communication."""

    def finish_backward(self) -> None:
        for p in self.params:
            work = self._timed_all_reduce(p.grad, self._names[p])
            work.wait()
            p.grad.div_(self.world_size)


class OverlapDDP(_DataParallel):
    """Step 2: start an asynchronous all-reduce of each gradient the moment it is ready, so that
    communication runs while backward computes the earlier layers; wait for all of them at the end.
    One message per parameter: many small, latency-bound messages."""

    def start_backward(self) -> None:
        self._pending = []

    def on_grad_ready(self, param: torch.Tensor) -> None:
        param.grad.div_(self.world_size)          # divide first, then sum: the mean, without overflow
        self._pending.append(self._timed_all_reduce(param.grad, self._names[param]))

    def finish_backward(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending = []


@dataclass
class Bucket:
    """Parameters whose gradients travel together in one flat buffer and one all-reduce."""
    params: list
    buffer: torch.Tensor
    offsets: list = field(default_factory=list)     # where each parameter's gradient sits in buffer
    ready: int = 0                                   # gradients copied in during this backward
    work: object = None                              # the all-reduce in flight

    @property
    def nbytes(self) -> int:
        return comm.nbytes(self.buffer)


def plan_buckets(params, bucket_cap_bytes: int) -> list[list]:
    """Cut ``params`` (in the order given) into consecutive groups of at most ``bucket_cap_bytes``
    (a parameter larger than the cap gets a bucket of its own; a change of dtype starts a new bucket)."""
    buckets, current, size = [], [], 0
    for p in params:
        nbytes = comm.nbytes(p)
        if current and (size + nbytes > bucket_cap_bytes or p.dtype != current[0].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


class BucketedDDP(_DataParallel):
    """Step 3: pack gradients into buckets of about ``bucket_cap_mb`` megabytes, in the order they
    become ready, and start one asynchronous all-reduce per bucket as soon as it is full. Few, large,
    bandwidth-bound messages, still overlapped with backward. (Exercise 3 writes its four methods:
    ``broadcast_from_rank0``, ``bucket_plan``, ``on_grad_ready``, ``finish_backward``.)

    ``self.buckets[k]`` is a :class:`Bucket`; ``self.bucket_of[p] = (k, offset)`` says where ``p``'s
    gradient sits; ``self.next_to_launch`` is the next bucket to launch. Buckets are launched strictly
    in index order on every rank: the k-th all-reduce of every rank must be the same bucket.

    Before the first backward the ready order is unknown: :meth:`bucket_plan` guesses the reverse of
    ``module.parameters()`` (backward runs from the output layer back). Like torch, the buckets are
    then rebuilt from the order recorded in the first backward (rank 0's, so that all ranks agree),
    unless ``rebuild_buckets=False``.
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0, process_group=None,
                 record_timeline: bool = False, rebuild_buckets: bool = True):
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb}")
        super().__init__(module, process_group, record_timeline)
        self.bucket_cap_bytes = int(bucket_cap_mb * 2 ** 20)
        self._rebuild_pending = rebuild_buckets
        self.next_to_launch = 0
        self._set_buckets(self.bucket_plan())

    def bucket_plan(self) -> list[list]:
        """The parameters of each bucket, bucket 0 first, in the order their gradients become ready."""
        return plan_buckets(reversed(self.params), self.bucket_cap_bytes)

    def _set_buckets(self, groups: list[list]) -> None:
        self.buckets, self.bucket_of = [], {}
        for index, params in enumerate(groups):
            offsets = list(itertools.accumulate((p.numel() for p in params), initial=0))
            buffer = torch.zeros(offsets[-1], dtype=params[0].dtype, device=params[0].device)
            self.buckets.append(Bucket(params, buffer, offsets[:-1]))
            for p, offset in zip(params, offsets):
                self.bucket_of[p] = (index, offset)

    @property
    def bucket_names(self) -> list[list[str]]:
        """Each bucket's parameter names, in bucket order (for figures and checks)."""
        return [[self._names.get(p, "?") for p in b.params] for b in self.buckets]

    def start_backward(self) -> None:
        for bucket in self.buckets:
            bucket.ready, bucket.work = 0, None
        self.next_to_launch = 0

    def on_grad_ready(self, param: torch.Tensor) -> None:
        index, offset = self.bucket_of[param]
        bucket = self.buckets[index]
        bucket.buffer[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
        bucket.ready += 1
        # Launch every full bucket whose predecessors are all launched: same order on every rank.
        while (self.next_to_launch < len(self.buckets)
               and self.buckets[self.next_to_launch].ready == len(self.buckets[self.next_to_launch].params)):
            self.launch(self.next_to_launch)
            self.next_to_launch += 1

    def launch(self, index: int) -> None:
        """Start averaging bucket ``index`` (labkit.ddp_hooks.HookedDDP replaces this by a communication hook)."""
        full = self.buckets[index]
        full.buffer.div_(self.world_size)           # divide first, then sum: the mean, without overflow
        full.work = self._timed_all_reduce(full.buffer, f"bucket {index}")

    def finish_backward(self) -> None:
        for bucket in self.buckets:
            bucket.work.wait()                      # its own handle: until then the buffer may be stale
            for p, offset in zip(bucket.params, bucket.offsets):
                p.grad.copy_(bucket.buffer[offset:offset + p.numel()].view_as(p.grad))
        if self._rebuild_pending:
            self._rebuild_pending = False
            self._rebuild_from_ready_order()

    def _rebuild_from_ready_order(self) -> None:
        index = {p: i for i, p in enumerate(self.params)}
        order = comm.on(torch.tensor([index[p] for p in self._ready], dtype=torch.int64), self.group)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        comm.broadcast(order, src=src, group=self.group)  # rank 0's order for everyone
        self._set_buckets(plan_buckets([self.params[i] for i in order.tolist()], self.bucket_cap_bytes))
