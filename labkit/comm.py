"""The one communication layer: every message labkit's lessons send goes through this module.

Read it to know what is sent, to whom, and how many bytes. Three rules are kept here, once:

1. **Tensors live on the process group's device**: ``cuda:<current>`` for NCCL, the CPU for gloo.
   :func:`device` says which; :func:`on` moves a tensor made on the CPU (a header, a checksum)
   there. A tensor on another device is a ``ValueError`` that names the rank, the tensor and both
   devices, instead of NCCL's "No backend type associated with device type cpu" or a hang.
2. **Point-to-point goes through** ``batch_isend_irecv`` **with** ``P2POp`` (what
   ``torch.distributed.pipelining`` does), which NCCL and gloo both run. Sends and receives that
   belong together (a ring round) are started together, so a ring cannot deadlock.
3. **Every message is recorded as one kind of event**, :class:`CommEvent` (what, peer, bytes,
   start, end), for whoever listens: ``with comm.record() as events: ...``.
4. **An emulated network, when asked for**: inside ``with comm.emulate(network):`` every message is held
   until the time :class:`labkit.network.Network` gives it has passed (α per round, bytes / bandwidth).

Receiving from *any* source (a parameter server waiting for whichever worker pushes first) exists
only in gloo: :func:`irecv_any` refuses an NCCL group with an error that says what to do instead.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["CommEvent", "record", "label", "emulate", "Traffic", "traffic", "device", "on", "nbytes", "send", "recv", "isend", "irecv",
           "exchange", "irecv_any", "all_reduce", "all_gather", "all_gather_into_tensor",
           "reduce_scatter_tensor", "broadcast", "broadcast_objects", "all_gather_objects", "gather", "barrier",
           "monitored_barrier", "Handle"]


@dataclass
class CommEvent:
    """One message or collective as this rank saw it. ``peer``: the other rank of a send or a receive,
    the root of a broadcast or gather (global ranks), ``None`` for other collectives and for a receive
    from any source; ``bytes``: what this rank handed over (a send, a collective's input) or got (a
    receive); ``end``: None until the call is done (an asynchronous one: until it is waited)."""
    op: str
    peer: int | None
    bytes: int
    start: float
    end: float | None = None
    tag: int = 0
    numel: int = 0
    label: str = ""            # what the message is for, set by whoever sends it (see :func:`label`)
    modelled: float = 0.0      # seconds the emulated network gives it (0: no network emulated)
    due: float = 0.0           # under an emulated network: when it is done (after the messages queued before it)


_listeners: list[list] = []
_labels: list[str] = []
_network = None                # a labkit.network.Network while comm.emulate(...) is on
_link_free = {"out": 0.0, "in": 0.0}   # when this rank's link is free again in each direction (emulated)

# torch 2.12 renamed these two (the old names warn); take whichever this torch has
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@contextlib.contextmanager
def record(into: list | None = None) -> Iterator[list]:
    """Collect the :class:`CommEvent` of every call this rank makes inside the ``with`` block (appended to
    ``into`` when given: a list subclass can act on each event as it comes)."""
    events: list = [] if into is None else into
    _listeners.append(events)
    try:
        yield events
    finally:
        _listeners.remove(events)


@contextlib.contextmanager
def label(text: str) -> Iterator[None]:
    """The events of the calls made inside the ``with`` block carry ``text`` (what the messages are for:
    "f backward", "bucket 3"), so that a recording can tell them apart."""
    _labels.append(text)
    try:
        yield
    finally:
        _labels.pop()


@contextlib.contextmanager
def emulate(network) -> Iterator[None]:
    """Hold every message of the ``with`` block for the time ``network`` (labkit.network.Network) gives it; the
    messages of one rank queue on its link, one direction each way."""
    global _network
    previous, _network = _network, network
    _link_free.update({"out": 0.0, "in": 0.0})
    try:
        yield
    finally:
        _network = previous


def _log(op: str, peer: int | None, t: torch.Tensor | None, tag: int = 0, group: ProcessGroup | None = None,
         p2p: bool = False) -> CommEvent:
    event = CommEvent(op, peer, 0 if t is None else nbytes(t), time.perf_counter(), tag=tag,
                      numel=0 if t is None else t.numel(), label=_labels[-1] if _labels else "")
    if _network is not None:
        ranks = ([dist.get_rank(), peer] if p2p and peer is not None else
                 dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        event.modelled = _network.seconds(op, ranks, event.bytes)
        # one link per direction: a message waits for those queued before it (receives use the other direction)
        direction = "in" if op == "recv" else "out"
        event.due = max(event.start, _link_free[direction]) + event.modelled
        _link_free[direction] = event.due
    for events in _listeners:
        events.append(event)
    return event


def _hold(events: Sequence[CommEvent]) -> None:
    """Under an emulated network: sleep until each event is due (its modelled time, after the messages before it)."""
    delay = max((e.due for e in events if e.modelled), default=0.0) - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


@dataclass
class Traffic:
    """What one rank sent and received in point-to-point messages: see :func:`traffic`."""
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0


def traffic(events: Sequence[CommEvent], tag: int | None = 0) -> Traffic:
    """The bytes this rank sent and received, and the messages it sent, in the recorded ``events``
    (sends and receives with ``tag``; None: every tag). Collectives are not counted: what they put
    on the wire is up to the backend."""
    out = Traffic()
    for e in events:
        if tag is not None and e.tag != tag:
            continue
        if e.op == "send":
            out.bytes_sent += e.bytes
            out.messages_sent += 1
        elif e.op == "recv":
            out.bytes_received += e.bytes
    return out


class Handle:
    """What an asynchronous call returns: ``wait()`` blocks until it is done and records when.
    (Over gloo a wait that times out raises, as torch's does.)"""

    def __init__(self, works: list, events: list):
        self.works, self.events = works, events

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def get_future(self) -> torch.futures.Future:
        """The future of a single call (torch's ``Work.get_future``), for a callback when it ends."""
        [work] = self.works
        return work.get_future()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for every part of the call, ``timeout`` seconds in all (None: as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for work in self.works:
            if deadline is None:
                done = work.wait()
            else:
                done = work.wait(datetime.timedelta(seconds=max(0.0, deadline - time.monotonic())))
            if done is False:
                return False
        _hold(self.events)
        now = time.perf_counter()
        for e in self.events:
            e.end = e.end if e.end is not None else now
        return True


def nbytes(t: torch.Tensor) -> int:
    """The bytes of a tensor's own elements (a view counts its elements, not its whole storage)."""
    return t.numel() * t.element_size()


def device(group: ProcessGroup | None = None) -> torch.device:
    """The device every tensor given to ``group``'s communication must be on."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on(t: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """``t`` on ``group``'s device (itself when it is there already)."""
    return t.to(device(group))


def _check(group, what: str, *tensors: torch.Tensor) -> None:
    want = device(group)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rank {dist.get_rank()}: {what} needs tensors, got a {type(t).__name__}")
        if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
            name = what if len(tensors) == 1 else f"{what} (tensor {i})"
            raise ValueError(f"rank {dist.get_rank()}: {name} got a tensor of shape {tuple(t.shape)} on "
                             f"{t.device}, but this process group ({dist.get_backend(group)}) communicates "
                             f"tensors on {want}: move it there first (labkit.comm.on(t, group))")


# ---------------------------------------------------------------------------------------------
# Point to point
# ---------------------------------------------------------------------------------------------

def _p2p(ops: Sequence[tuple[str, torch.Tensor, int]], group: ProcessGroup | None = None, tag: int = 0) -> Handle:
    """Start ``[("send"|"recv", tensor, peer), ...]`` together. Peers are global ranks, as in
    ``torch.distributed.send``, also when ``group`` is a subgroup."""
    ops = [(kind, t, peer) for kind, t, peer in ops if t.numel()]  # both ends skip empty tensors
    _check(group, "send/recv", *(t for _, t, _ in ops))
    if not ops:
        return Handle([], [])
    events = [_log(kind, peer, t, tag, group, p2p=True) for kind, t, peer in ops]
    p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer, group, tag) for kind, t, peer in ops]
    return Handle(dist.batch_isend_irecv(p2p), events)


def isend(t: torch.Tensor, dst: int, group: ProcessGroup | None = None, tag: int = 0) -> Handle:
    return _p2p([("send", t, dst)], group, tag)


def irecv(t: torch.Tensor, src: int, group: ProcessGroup | None = None, tag: int = 0) -> Handle:
    return _p2p([("recv", t, src)], group, tag)


def send(t: torch.Tensor, dst: int, group: ProcessGroup | None = None, tag: int = 0) -> None:
    isend(t, dst, group, tag).wait()


def recv(t: torch.Tensor, src: int, group: ProcessGroup | None = None, tag: int = 0) -> None:
    irecv(t, src, group, tag).wait()


def exchange(send_t: torch.Tensor, dst: int, recv_t: torch.Tensor, src: int, group: ProcessGroup | None = None,
             tag: int = 0) -> None:
    """Send ``send_t`` to ``dst`` while receiving ``recv_t`` from ``src``, and wait for both (one round of
    a ring: started together, so that it cannot deadlock)."""
    _p2p([("recv", recv_t, src), ("send", send_t, dst)], group, tag).wait()


def irecv_any(t: torch.Tensor, group: ProcessGroup | None = None, tag: int = 0) -> Handle:
    """Receive from whichever rank sends first (gloo only); the message itself must say who sent it."""
    if dist.get_backend(group) != "gloo":
        raise RuntimeError(f"receiving from any source needs a gloo group, and this one is "
                           f"{dist.get_backend(group)}: make a gloo group beside it for such messages "
                           f"(dist.new_group(backend='gloo'))")
    _check(group, "irecv_any", t)
    event = _log("recv", None, t, tag, group, p2p=True)
    return Handle([dist.irecv(t, group=group, tag=tag)], [event])


# ---------------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------------

def _done(work, event: CommEvent, async_op: bool):
    handle = Handle([work], [event])
    if async_op:
        return handle
    handle.wait()
    return None


# Each logs its event before torch starts the call: ``start`` is when this rank asked for it.

def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM, group: ProcessGroup | None = None,
               async_op: bool = False) -> Handle | None:
    _check(group, "all_reduce", t)
    event = _log("all_reduce", None, t, group=group)
    return _done(dist.all_reduce(t, op=op, group=group, async_op=True), event, async_op)


def all_gather(outputs: list, t: torch.Tensor, group: ProcessGroup | None = None) -> None:
    _check(group, "all_gather", t, *outputs)
    event = _log("all_gather", None, t, group=group)
    _done(dist.all_gather(outputs, t, group=group, async_op=True), event, False)


def all_gather_into_tensor(output: torch.Tensor, t: torch.Tensor, group: ProcessGroup | None = None,
                           async_op: bool = False) -> Handle | None:
    _check(group, "all_gather_into_tensor", output, t)
    event = _log("all_gather", None, t, group=group)
    return _done(_all_gather_single(output, t, group=group, async_op=True), event, async_op)


def reduce_scatter_tensor(output: torch.Tensor, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM,
                          group: ProcessGroup | None = None, async_op: bool = False) -> Handle | None:
    _check(group, "reduce_scatter_tensor", output, t)
    event = _log("reduce_scatter", None, t, group=group)
    return _done(_reduce_scatter_single(output, t, op=op, group=group, async_op=True), event, async_op)


def broadcast(t: torch.Tensor, src: int, group: ProcessGroup | None = None, async_op: bool = False) -> Handle | None:
    """``src`` is a global rank, as in ``torch.distributed.broadcast``."""
    _check(group, "broadcast", t)
    event = _log("broadcast", src, t, group=group)
    return _done(dist.broadcast(t, src=src, group=group, async_op=True), event, async_op)


def gather(t: torch.Tensor, gather_list: list | None, dst: int, group: ProcessGroup | None = None) -> None:
    """``dst`` is a global rank; only ``dst`` passes a ``gather_list``."""
    _check(group, "gather", t, *(gather_list or []))
    event = _log("gather", dst, t, group=group)
    _done(dist.gather(t, gather_list=gather_list, dst=dst, group=group, async_op=True), event, False)


def broadcast_objects(objects: list, src: int, group: ProcessGroup | None = None) -> None:
    """Rank ``src``'s picklable objects into ``objects`` on every rank (in place; ``bytes`` is 0: torch
    pickles them itself)."""
    event = _log("broadcast_objects", src, None, group=group)
    dist.broadcast_object_list(objects, src=src, group=group)   # torch picks the group's device itself
    _hold([event])
    event.end = time.perf_counter()


def all_gather_objects(obj: object, group: ProcessGroup | None = None) -> list:
    """Every rank's picklable ``obj``, in rank order (``bytes`` is 0: torch pickles them itself)."""
    event = _log("all_gather_objects", None, None, group=group)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    _hold([event])
    event.end = time.perf_counter()
    return out


def monitored_barrier(timeout_s: float, group: ProcessGroup | None = None) -> None:
    """torch's monitored_barrier (gloo only): when it times out, rank 0 raises naming every rank that did not
    arrive (wait_all_ranks), instead of each rank timing out on its own."""
    import datetime

    if dist.get_backend(group) != "gloo":
        raise RuntimeError("monitored_barrier exists only for gloo: use a gloo group (dist.new_group(backend='gloo'))")
    event = _log("monitored_barrier", None, None, group=group)
    dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    event.end = time.perf_counter()


def barrier(group: ProcessGroup | None = None) -> None:
    event = _log("barrier", None, None, group=group)
    if dist.get_backend(group) == "nccl":  # NCCL's barrier guesses a device; say which
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)
    _hold([event])
    event.end = time.perf_counter()
