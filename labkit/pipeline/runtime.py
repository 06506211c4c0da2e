"""Execute a pipeline schedule on real processes, one action at a time, over point-to-point messages.

Each rank walks its own list from :mod:`labkit.pipeline.schedules`:

    RECV_F k  receive a (micro-batch, ...) activation from the rank of the previous stage
    F k       y = stage(x) and keep (x, y) for the backward; the last stage's y is loss_k / m
    SEND_F k  dist.isend y to the rank of the next stage (non-blocking: the rank moves on)
    RECV_B k  receive ∂L/∂y from the rank of the next stage
    B k       backward from y with that gradient (the last stage: from its loss), freeing the graph
    SEND_B k  dist.isend ∂L/∂x back to the rank of the previous stage

Why the loss is divided by m: the micro-batches' gradients add up in ``.grad`` over the step, so
Σ_k ∇(loss_k / m) is the gradient of the mean loss over the whole batch, as one process would compute
it (for a loss that averages over its batch and micro-batches of equal size).

Why sends do not block and receives do: a blocking send in 1F1B's steady state would have stage i
sending an activation to i + 1 while i + 1 sends a gradient to i, each waiting for the other's receive.
Every message carries a tag naming (stage, micro-batch, activation or gradient), so messages between
the same two ranks can never be mistaken for one another, whatever order the schedule posts them in.
The interpreter itself is the loop at the end of :func:`run_schedule`, one method per kind of action.
Two speed-ups for gloo live apart, in :mod:`labkit.pipeline.prefetch`, and can be turned off
(``prefetch=False``): each receive posted one compute action early (gloo moves a message only once its
receive is posted), and sent tensors freed as soon as the schedule proves them delivered.

On GPUs, mind one difference: NCCL ignores tags and runs the messages between two ranks on one CUDA
stream in the order they were posted, so an ``isend`` to a neighbour can wait behind a ``recv`` from
it. Production runtimes (torch.distributed.pipelining, Megatron) therefore post each step's sends and
receives together with ``dist.batch_isend_irecv``. This runtime posts one action at a time, which is
exact over gloo; under NCCL with several ranks it would deadlock (a rank's early ``irecv`` of a gradient
holds its stream ahead of the activation it must send first), so there it refuses with an error that
points to :mod:`labkit.pipeline.torch_reference`. Messages go through :mod:`labkit.comm`.

The runtime times every action (``time.perf_counter``, one clock for all processes of a machine) and
counts the bytes autograd saves for each forward, so a step returns its measured timeline and its
measured activation memory, to set against :func:`labkit.pipeline.simulate.simulate`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from labkit import comm
from labkit.pipeline.prefetch import Prefetch
from labkit.pipeline.schedules import B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, Schedule
from labkit.pipeline.simulate import Timeline, action_event

__all__ = ["StepResult", "run_schedule", "merge_timelines", "split_sequential", "SavedBytes"]


@dataclass
class StepResult:
    """What one rank did in one step."""
    rank: int                                      # this rank's place in the pipeline (0 .. p − 1)
    losses: list = field(default_factory=list)     # per micro-batch (on the rank with the last stage)
    events: list = field(default_factory=list)     # labkit.timeline.Event per action, perf_counter seconds
    peak_held: float = 0.0                         # most micro-batches' activations held at once
    peak_saved_bytes: int = 0                      # most bytes autograd held saved for backward at once

    @property
    def loss(self) -> float | None:
        """The batch's mean loss (the mean over micro-batches), on the last stage's rank, else None."""
        return sum(self.losses) / len(self.losses) if self.losses else None


def split_sequential(model: nn.Sequential, num_stages: int, costs: Sequence[float] | None = None) -> list:
    """``model`` cut into ``num_stages`` consecutive ``nn.Sequential`` pieces (sharing its parameters),
    balanced by layer count or by ``costs`` (see :func:`labkit.layer_split.partition`)."""
    from labkit.layer_split import partition
    bounds = partition(list(costs) if costs is not None else len(model), num_stages)
    layers = list(model)
    return [nn.Sequential(*layers[r.start:r.stop]) for r in bounds]


class SavedBytes:
    """``with SavedBytes(module) as counter:`` run a forward; ``counter.bytes`` is then what autograd
    saved for the backward: one micro-batch's activation memory (``module``'s parameters excluded:
    they are held anyway). A tensor counts once, however many operations save it, and a view counts its own
    elements (a micro-batch cut from the batch with ``chunk`` is a view of the whole batch's storage)."""

    def __init__(self, module: nn.Module):
        self.params = {p.data_ptr() for p in module.parameters()}
        self.seen, self.bytes = set(), 0

    def pack(self, t: torch.Tensor):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if t.data_ptr() not in self.params and key not in self.seen:
            self.seen.add(key)
            self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _tag(schedule: Schedule, what: str, stage: int, k: int) -> int:
    """The tag of the message that stage ``stage`` receives for micro-batch k: unique within a step."""
    return 2 * (stage * schedule.num_microbatches + k) + (what == "gradient")


class _Rank:
    """One rank's part of a step: what it keeps between actions, and one method per kind of action."""

    def __init__(self, schedule: Schedule, me: int, stages: dict, inputs, targets, loss_fn, activation_shape,
                 dtype, device, ranks: list):
        self.schedule, self.me, self.stages, self.ranks = schedule, me, stages, ranks
        self.inputs, self.targets, self.loss_fn = inputs, targets, loss_fn
        self.shape, self.dtype, self.device = tuple(activation_shape), dtype, device
        self.m, self.last = schedule.num_microbatches, schedule.num_stages - 1
        self.result = StepResult(me)
        self.kept, self.outputs, self.input_grads, self.saved = {}, {}, {}, {}
        self.receiving: dict = {}   # receive action -> (work or None once arrived, buffer)
        self.sending: dict = {}     # send action -> (work, tensor): the tensor must live until its isend completes
        self.held, self.held_bytes = 0.0, 0
        self.per_chunk = schedule.num_ranks / schedule.num_stages   # interleaved: a chunk holds 1/v of a layer set

    def peer(self, stage: int) -> int:
        return self.ranks[self.schedule.rank_of(stage)]

    def post_receive(self, a: Action):
        """irecv the message ``a`` waits for (an activation from the stage before, a gradient from the stage
        after) into a new buffer; the tag says which micro-batch and stage it is."""
        if a not in self.receiving:
            what, src = ("activation", a.stage - 1) if a.kind == RECV_F else ("gradient", a.stage + 1)
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            tag = _tag(self.schedule, what, a.stage, a.microbatch)
            self.receiving[a] = (comm.irecv(buf, self.peer(src), tag=tag), buf)
        return self.receiving[a]

    def receive(self, a: Action) -> None:                        # RECV_F k, RECV_B k
        work, buf = self.post_receive(a)
        if work is not None:
            work.wait()
        self.receiving[a] = (None, buf)

    def forward(self, a: Action) -> None:                        # F k: y = stage(x), kept for the backward
        s, k = a.stage, a.microbatch
        x = self.inputs[k].to(self.device) if s == 0 else \
            self.receiving.pop(Action(RECV_F, k, s))[1].requires_grad_()
        with SavedBytes(self.stages[s]) as counter:
            y = self.stages[s](x)
            if s == self.last:
                y = self.loss_fn(y, self.targets[k].to(self.device)) / self.m
        self.kept[(s, k)], self.outputs[(s, k)], self.saved[(s, k)] = x, y, counter.bytes
        self.held, self.held_bytes = self.held + self.per_chunk, self.held_bytes + counter.bytes
        self.result.peak_held = max(self.result.peak_held, self.held)
        self.result.peak_saved_bytes = max(self.result.peak_saved_bytes, self.held_bytes)

    def send_forward(self, a: Action) -> None:                   # SEND_F k: the activation to the next stage
        s, k = a.stage, a.microbatch
        y = self.outputs[(s, k)].detach()
        self.sending[a] = (comm.isend(y, self.peer(s + 1), tag=_tag(self.schedule, "activation", s + 1, k)), y)

    def backward(self, a: Action) -> None:                       # B k: from the loss, or from ∂L/∂y received
        s, k = a.stage, a.microbatch
        x, y = self.kept.pop((s, k)), self.outputs.pop((s, k))
        if s == self.last:
            y.backward()                  # the graph (and its saved tensors) is freed here
            self.result.losses.append((k, y.item() * self.m))
        else:
            torch.autograd.backward(y, self.receiving.pop(Action(RECV_B, k, s))[1])
        if s > 0:
            self.input_grads[(s, k)] = x.grad
        self.held, self.held_bytes = self.held - self.per_chunk, self.held_bytes - self.saved.pop((s, k))

    def send_backward(self, a: Action) -> None:                  # SEND_B k: ∂L/∂x to the stage before
        s, k = a.stage, a.microbatch
        g = self.input_grads.pop((s, k))
        self.sending[a] = (comm.isend(g, self.peer(s - 1), tag=_tag(self.schedule, "gradient", s - 1, k)), g)

    def do(self, a: Action) -> None:
        {RECV_F: self.receive, RECV_B: self.receive, F: self.forward, SEND_F: self.send_forward,
         B: self.backward, SEND_B: self.send_backward}[a.kind](a)

    def finish(self) -> StepResult:
        for work, _ in self.sending.values():
            work.wait()
        self.result.losses = [loss for _, loss in sorted(self.result.losses)]
        return self.result


def run_schedule(schedule: Schedule, stages: dict, inputs: Sequence | None = None, targets: Sequence | None = None,
                 loss_fn: Callable | None = None, *, activation_shape: Sequence[int],
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 ranks: Sequence[int] | None = None, prefetch: bool = True) -> StepResult:
    """Run this rank's part of one step of ``schedule``; gradients accumulate in the stages' ``.grad``.

    Args:
        stages: {stage index: module} for the stages this rank holds (one, or v for interleaved).
        inputs: the m micro-batches, on the rank holding stage 0 (ignored elsewhere).
        targets: the m targets, on the rank holding the last stage; ``loss_fn(output, target)`` gives
            each micro-batch's loss there.
        activation_shape: the shape of one micro-batch's activation between two stages (all the same).
        ranks: the global rank of each pipeline rank 0 .. p − 1 (default ``range(p)``); several pipelines
            side by side (data parallel × pipeline parallel) each pass their own.
        prefetch: gloo's speed-ups (:mod:`labkit.pipeline.prefetch`): each receive posted one compute action
            early, and sent tensors freed as soon as the schedule proves them delivered. The results are the
            same without them; only the timeline and the memory held change.
    """
    p, S, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
    ranks = list(ranks) if ranks is not None else list(range(p))
    if len(ranks) != p:
        raise ValueError(f"ranks names {len(ranks)} processes for a pipeline of {p} ranks")
    me = ranks.index(dist.get_rank())
    if sorted(stages) != schedule.stages_of(me):
        raise ValueError(f"rank {me} holds stages {schedule.stages_of(me)} in {schedule.name}, "
                         f"but was given stages {sorted(stages)}")
    if 0 in stages and (inputs is None or len(inputs) != m):
        raise ValueError(f"the rank with stage 0 needs the {m} input micro-batches")
    if S - 1 in stages and (targets is None or len(targets) != m or loss_fn is None):
        raise ValueError(f"the rank with the last stage needs loss_fn and the {m} target micro-batches")
    if p > 1 and dist.get_backend() == "nccl":
        raise RuntimeError("labkit.pipeline.runtime posts one send or receive at a time, which deadlocks under "
                           "NCCL (messages between two GPUs run in posting order on one stream). On GPUs run the "
                           "schedule with torch.distributed.pipelining: labkit.pipeline.torch_reference.")
    device = torch.device(device) if device is not None else comm.device()
    rank = _Rank(schedule, me, stages, inputs, targets, loss_fn, activation_shape, dtype, device, ranks)
    speedups = Prefetch(schedule, me, rank) if prefetch else None
    for i, a in enumerate(schedule.actions[me]):      # the interpreter: one action at a time, in list order
        start = time.perf_counter()
        if speedups:
            speedups.before(i, a)
        rank.do(a)
        if speedups:
            speedups.after(a)
        rank.result.events.append(action_event(me, a, start, time.perf_counter()))
    return rank.finish()


def merge_timelines(results: Sequence[StepResult]) -> Timeline:
    """One timeline from every rank's :class:`StepResult`, time 0 at the first rank's first action."""
    events = [e for r in results for e in r.events]
    origin = min(e.start for e in events)
    shifted = [dataclasses.replace(e, start=e.start - origin, end=e.end - origin) for e in events]
    return Timeline(len(results), shifted)
