"""The parameter server (Li et al. 2014; DistBelief, Dean et al. 2012): S server ranks each keep a shard
of the parameters, W worker ranks pull the parameters, compute a gradient on their own data and push
it back. Everything is a point-to-point message over ``torch.distributed``, so each one can be seen.

    rank 0 .. S−1        servers: server s owns elements [start_s, end_s) of the flat parameter vector
    rank S .. S+W−1      workers: worker w = rank − S

The simplest form first (exercise 7): :func:`run_server` and :func:`run_worker`, synchronous, every
message in a fixed order. Then the general one, :func:`serve` and :func:`work`:

    worker, every step:   PULL  → each server        ← (version, shard)   the current parameters
                          compute the gradient on this worker's batch
                          PUSH  → each server: (the version it pulled, the gradient's shard)

    server:               answers PULLs and applies PUSHes, in one of three modes
      "sync"      waits for all W pushes of a step, applies their mean, then answers the next pulls:
                  exactly data-parallel SGD with all-reduce (the mean of the shard gradients)
      "async"     applies each push on arrival; answers every pull at once (Hogwild-style staleness)
      "bounded"   as async, but a worker may start a step only while it is at most ``staleness`` τ
                  steps ahead of the slowest worker (stale synchronous parallel, Ho et al. 2013): after
                  every message the server asks :func:`ssp_release` (or ``release=``, your own rule)
                  which of the waiting workers may start now

Each applied push records its staleness: the server's version when it is applied minus the version
the worker pulled (0 in sync mode: nobody moves the parameters between a pull and its push).

Why point-to-point messages and not ``torch.distributed.rpc``: the lesson is the message flow, and
with send/recv every message is one visible line (rpc hides the transport behind remote calls and
futures, and PyTorch has not developed it further since 2.x). A server receives from *any* worker
with ``irecv`` without a source: the header names the sender, and a deadline on the wait lets a
server notice a worker that stopped, instead of hanging.

Messages (tags): a worker's header (kind, worker, version, step) to a server; a gradient shard; the
server's reply (version) and parameter shard. Failures are reported, not hung on: a server that hears
nothing for ``timeout`` seconds names the silent workers. In sync mode (and in bounded mode once the
others are τ steps ahead) the others are waiting for them: the server tells them to stop. In async mode
the others never wait for anyone: they finish their steps, and the server ends once only the silent
workers are left (``timeout`` must exceed a step's time, or a straggler looks dead).

On GPUs: receiving from any source exists only in gloo, so when the world runs NCCL every message of
the parameter server goes over a gloo group made beside it, with the shards on the CPU, as real parameter
servers keep them in host memory; workers compute on their own device and copy each message over.
All messages go through :mod:`labkit.comm`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from labkit import comm
from labkit.ring import chunk_bounds

__all__ = ["MODES", "shard_bounds", "ssp_release", "run_server", "run_worker", "Update", "LossPoint", "ServerResult",
           "WorkerResult", "PSRun", "serve", "work", "parameter_server", "train"]

MODES = ("sync", "async", "bounded")
PULL, PUSH, DONE = 0, 1, 2
_HEADER, _GRAD, _REPLY, _PARAMS = 11, 12, 13, 14   # tags
_STOP = -1.0                                     # a reply version that tells a worker to stop


def shard_bounds(numel: int, servers: int) -> list[tuple[int, int]]:
    """[start, end) of each server's shard of a ``numel``-element vector: the ring's chunks (contiguous,
    disjoint, covering it, sizes differing by at most one), none of them empty."""
    if servers < 1 or servers > numel:
        raise ValueError(f"cannot cut {numel} parameters into {servers} server shards")
    return chunk_bounds(numel, servers)


def ssp_release(waiting: list[int], clock: list[int], active: set[int], staleness: int,
                message: tuple[str, int]) -> list[int]:
    """Bounded staleness (SSP): of the ``waiting`` workers (a pull not answered yet), those that may start their
    next step now. ``clock[v]``: pushes received from worker v (the step it is on); ``active``: the workers not
    finished; ``message``: ("pull" | "push" | "done", worker), the one just handled (any of them may release)."""
    slowest = min(clock[v] for v in active)     # a finished worker pushes no more: it holds nobody back
    return [w for w in waiting if clock[w] - slowest <= staleness]


# --- the synchronous parameter server, in its simplest form (exercise 7) ---------------------------------
# Every step, in a fixed order: server s sends its shard to every worker (the workers' pull), receives
# every worker's gradient of it (their push) and applies the mean. Exactly data-parallel SGD.

def run_server(shard: torch.Tensor, server: int, servers: int, workers: int, steps: int,
               lr: float) -> torch.Tensor:
    """Server ``server`` (rank ``server``) holds ``shard``, its elements of the flat parameters (updated in
    place and returned). Worker w is rank ``servers + w``."""
    for step in range(steps):
        for w in range(workers):
            comm.send(shard, servers + w)                 # answer worker w's pull: the current parameters
        grads = [torch.empty_like(shard) for _ in range(workers)]
        for w in range(workers):
            comm.recv(grads[w], servers + w)              # worker w's gradient, this server's elements of it
        shard -= lr * torch.stack(grads).mean(dim=0)     # all W are in: one SGD step with their mean
    return shard


def run_worker(model: nn.Module, batches: list, worker: int, servers: int) -> None:
    """Worker ``worker`` (rank ``servers + worker``): for each batch (x, y), pull every server's shard into
    the model, compute the gradient of ``F.mse_loss(model(x), y)``, push each server its shard of it."""
    flat = parameters_to_vector(model.parameters()).detach().clone()
    bounds = shard_bounds(flat.numel(), servers)          # server s holds flat[a:b], (a, b) = bounds[s]
    for x, y in batches:
        for s, (a, b) in enumerate(bounds):
            comm.recv(flat[a:b], s)                       # pull: server s's current shard, in place
        vector_to_parameters(flat, model.parameters())
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        for s, (a, b) in enumerate(bounds):
            comm.send(grad[a:b], s)                       # push: server s gets its elements of the gradient


# --- the general parameter server: any order, three modes, failures ---------------------------------------

class Update(NamedTuple):
    """One push applied by a server: when (seconds since the server started), whose, of which step, and
    how stale (the server's version when applied minus the version the worker pulled)."""
    time: float
    worker: int
    step: int
    staleness: int


class LossPoint(NamedTuple):
    """A worker's loss on its batch, at the parameters it pulled for ``step``."""
    time: float
    step: int
    loss: float


@dataclass
class ServerResult:
    server: int
    shard: torch.Tensor                                     # the final parameters of this shard
    version: int = 0                                        # updates applied
    updates: list = field(default_factory=list)             # an Update per applied push
    events: list = field(default_factory=list)              # every message of this server (comm.CommEvent),
                                                            # labelled with the workers' step it belongs to
    lost: list = field(default_factory=list)                # workers that stopped talking
    stopped: str = ""                                       # why a sync server stopped early, else ""

    # The byte counts are read from the messages comm recorded: one count for the whole course.
    @property
    def bytes_in(self) -> int:
        """Headers and gradients received (a receive still posted when the server stopped does not count)."""
        return sum(e.bytes for e in self.events if e.op == "recv" and e.end is not None)

    @property
    def bytes_out(self) -> int:
        """Replies and parameters sent."""
        return sum(e.bytes for e in self.events if e.op == "send")

    @property
    def per_step(self) -> dict:
        """step -> [bytes in, bytes out] of the workers' step."""
        out: dict = {}
        for e in self.events:
            if e.label and (e.op == "send" or e.end is not None):
                out.setdefault(int(e.label.split()[-1]), [0, 0])[e.op == "send"] += e.bytes
        return out


@dataclass
class WorkerResult:
    worker: int
    losses: list = field(default_factory=list)              # a LossPoint per step (at the pulled parameters)
    steps_done: int = 0
    stopped: str = ""


def _arrived(work, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a receive. gloo's own timeout would close the connections (no
    message could go out afterwards, not even "stop"), so a helper thread waits and we wait for it."""
    done = threading.Event()
    threading.Thread(target=lambda: (work.wait(), done.set()), daemon=True).start()
    return done.wait(timeout)


def _step(step: int) -> str:
    return f"step {step}"


class _Server:
    """The state of one server's loop (see :func:`serve`): who is active, who waits for a reply, the pushes."""

    def __init__(self, shard: torch.Tensor, server: int, servers: int, workers: int, mode: str, lr: float,
                 staleness: int, scale_lr: bool, group: ProcessGroup | None, release: Callable | None = None):
        self.result = ServerResult(server, shard)
        self.shard, self.servers, self.workers, self.group = shard, servers, workers, group
        self.mode, self.lr, self.staleness, self.scale_lr = mode, lr, staleness, scale_lr
        self.start = time.perf_counter()
        self.active = set(range(workers))
        self.clock = [0] * workers      # pushes received from each worker
        self.pending: list = []         # (worker, step) pulls not answered yet
        self.inbox: dict = {}           # sync: worker -> gradient of the current step
        self.sending: list = []         # replies still on their way
        self.release = release or ssp_release   # bounded mode: which waiting workers start now

    def reply(self, worker: int, step: int, version: float) -> None:
        # isend of a copy: a blocking send (gloo's returns only once the worker has posted its receive)
        # would stop this server from listening while that worker may be busy sending to another server,
        # a chain of waits that could close into a cycle with S >= 2. A server never waits for a worker
        # this way; the copy keeps the message intact while later pushes update the shard in place.
        with comm.label(_step(step)):
            dst = self.servers + worker
            self.sending.append(comm.isend(torch.tensor([version], dtype=torch.float64), dst, self.group,
                                           tag=_REPLY))
            if version != _STOP:
                self.sending.append(comm.isend(self.shard.clone(), dst, self.group, tag=_PARAMS))
        # forget the replies already delivered (a done one's wait is instant)
        self.sending[:] = [w for w in self.sending if not (w.is_completed() and w.wait())]

    def may_start(self, worker: int, step: int) -> bool:
        if self.mode == "sync":
            return self.result.version == step          # the previous step's update is in
        return True

    def apply(self, g: torch.Tensor, staleness_of_push: int) -> None:
        rate = self.lr / (1 + staleness_of_push) if self.scale_lr else self.lr
        self.shard.sub_(rate * g)
        self.result.version += 1

    def push(self, worker: int, version: int, step: int, grad: torch.Tensor) -> None:
        """A worker's gradient of ``step``, computed at the parameters of ``version``."""
        self.clock[worker] += 1
        now = time.perf_counter() - self.start
        if self.mode == "sync":
            self.inbox[worker] = grad.clone()
            if len(self.inbox) == self.workers:          # everyone's gradient of this step is in
                self.apply(torch.stack([self.inbox[w] for w in sorted(self.inbox)]).mean(dim=0), 0)
                self.result.updates += [Update(now, w, step, 0) for w in sorted(self.inbox)]
                self.inbox.clear()
        else:
            stale = self.result.version - version
            self.apply(grad, stale)
            self.result.updates.append(Update(now, worker, step, stale))

    def answer_pulls(self, message: tuple[str, int]) -> None:
        bounded = self.mode == "bounded"       # the rule sees every waiting worker at once (copies of the state)
        go = set(self.release([w for w, _ in self.pending], list(self.clock), set(self.active), self.staleness,
                              message)) if bounded and self.pending else set()
        still = []
        for w, s in self.pending:
            if (w in go) if bounded else self.may_start(w, s):
                self.reply(w, s, float(self.result.version))
            else:
                still.append((w, s))
        self.pending = still

    def give_up(self, timeout: float) -> None:
        """Nothing for ``timeout`` seconds. (A posted receive cannot be taken back: the server stops listening
        here, whatever the mode.)"""
        silent = sorted(self.active - {w for w, _ in self.pending} - set(self.inbox))
        self.result.lost = silent
        if self.pending:   # workers waiting for us: sync waits for everyone; bounded for the slowest
            why = ("synchronous training waits for every worker" if self.mode == "sync" else
                   f"bounded staleness lets no worker get more than {self.staleness} step(s) ahead of the slowest")
            self.result.stopped = (f"server {self.result.server} (version {self.result.version}): no message from "
                                   f"worker(s) {silent} for {timeout:g} s; {why}, so the run stops here and the "
                                   f"waiting workers {sorted(w for w, _ in self.pending)} are told to stop.")
            for w, s in self.pending:
                self.reply(w, s, _STOP)


def serve(shard: torch.Tensor, server: int, servers: int, workers: int, *, mode: str = "sync", lr: float = 0.1,
          staleness: int = 0, scale_lr: bool = False, steps: int = 10, timeout: float = 10.0,
          group: ProcessGroup | None = None, release: Callable | None = None) -> ServerResult:
    """The server loop of rank ``server``: owns ``shard`` (updated in place) until every worker is done.
    ``release``: bounded mode's rule, called as :func:`ssp_release` (the default) after every message."""
    me = _Server(shard, server, servers, workers, mode, lr, staleness, scale_lr, group, release)
    header = torch.zeros(4, dtype=torch.int64)
    grad = torch.empty_like(shard)
    with comm.record() as events:
        while me.active:
            arrival = comm.irecv_any(header, group, tag=_HEADER)     # from any worker: the header says who
            if not _arrived(arrival, timeout):
                me.give_up(timeout)
                break
            kind, worker, version, step = (int(v) for v in header)
            arrival.events[0].label = _step(step)                    # known only now that it has come
            if kind == PULL:
                me.pending.append((worker, step))
            elif kind == PUSH:
                with comm.label(_step(step)):
                    comm.recv(grad, servers + worker, group, tag=_GRAD)
                me.push(worker, version, step, grad)
            elif kind == DONE:
                me.active.discard(worker)
            me.answer_pulls((("pull", "push", "done")[kind], worker))
        for w in me.sending:       # every reply delivered (to a live worker) before the server returns
            _arrived(w, timeout)
    me.result.events = list(events)
    return me.result


def work(model: nn.Module, worker: int, servers: int, batch_fn: Callable, loss_fn: Callable, *, steps: int = 10,
         compute_ms: float = 0.0, slow: float = 1.0, die_at: int | None = None,
         group: ProcessGroup | None = None) -> WorkerResult:
    """The worker loop: ``steps`` times pull, compute the gradient of ``loss_fn(model, *batch_fn(worker, step))``,
    push. ``compute_ms`` × ``slow`` of emulated compute time per step (a straggler has slow > 1);
    ``die_at``: stop talking before that step, as a crashed worker would."""
    result = WorkerResult(worker)
    start = time.perf_counter()
    params = comm.on(parameters_to_vector(model.parameters()).detach(), group)   # a copy when devices differ
    bounds = shard_bounds(params.numel(), servers)
    version = torch.zeros(1, dtype=torch.float64, device=params.device)
    pulled = [0] * servers

    def tell(server: int, kind: int, pulled_version: int, step: int) -> None:
        comm.send(torch.tensor([kind, worker, pulled_version, step], dtype=torch.int64, device=params.device),
                  server, group, tag=_HEADER)

    for step in range(steps):
        if die_at is not None and step >= die_at:
            result.stopped = f"worker {worker} stopped before step {step} (die_at)"
            return result
        for s in range(servers):                   # pull: ask every server for its shard
            tell(s, PULL, 0, step)
        for s, (a, b) in enumerate(bounds):
            comm.recv(version, s, group, tag=_REPLY)
            if version.item() == _STOP:
                result.stopped = f"worker {worker}: server {s} stopped the run before step {step}"
                return result
            pulled[s] = int(version.item())
            comm.recv(params[a:b], s, group, tag=_PARAMS)
        vector_to_parameters(params.to(next(model.parameters()).device), model.parameters())
        model.zero_grad()
        loss = loss_fn(model, *batch_fn(worker, step))
        loss.backward()
        if compute_ms:
            time.sleep(compute_ms * slow / 1e3)    # the rest of the step's "device" time
        result.losses.append(LossPoint(time.perf_counter() - start, step, loss.item()))
        grad = comm.on(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), group)
        for s, (a, b) in enumerate(bounds):        # push: each server gets its shard of the gradient
            tell(s, PUSH, pulled[s], step)
            comm.send(grad[a:b].contiguous(), s, group, tag=_GRAD)
        result.steps_done = step + 1
    for s in range(servers):
        tell(s, DONE, 0, steps)
    return result


def parameter_server(model_fn: Callable, batch_fn: Callable, loss_fn: Callable, *, servers: int = 1,
                     mode: str = "sync", steps: int = 10, lr: float = 0.1, staleness: int = 0,
                     scale_lr: bool = False, compute_ms: float = 0.0, slow: dict | None = None,
                     die_at: dict | None = None, timeout: float = 10.0,
                     release: Callable | None = None) -> ServerResult | WorkerResult:
    """Run this rank's role (call it on every rank of a launched world of S + W processes)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; the modes are {', '.join(MODES)}")
    rank, world = dist.get_rank(), dist.get_world_size()
    workers = world - servers
    if servers < 1 or workers < 1:
        raise ValueError(f"{world} processes cannot hold {servers} server(s) and at least one worker")
    # any-source receives need gloo: beside an NCCL world, a gloo group over the same ranks carries them
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    model = model_fn()
    if rank < servers:
        flat = comm.on(parameters_to_vector(model.parameters()).detach(), group).clone()
        a, b = shard_bounds(flat.numel(), servers)[rank]
        return serve(flat[a:b].clone(), rank, servers, workers, mode=mode, lr=lr, staleness=staleness,
                     scale_lr=scale_lr, steps=steps, timeout=timeout, group=group, release=release)
    w = rank - servers
    return work(model, w, servers, batch_fn, loss_fn, steps=steps, compute_ms=compute_ms,
                slow=(slow or {}).get(w, 1.0), die_at=(die_at or {}).get(w), group=group)


@dataclass
class PSRun:
    """A whole run, gathered from every rank."""
    servers: list
    workers: list

    @property
    def params(self) -> torch.Tensor:
        """The final parameters: the servers' shards, end to end."""
        return torch.cat([s.shard for s in self.servers])

    @property
    def staleness(self) -> list:
        """Every applied push's staleness (on server 0: each push reaches every server once)."""
        return [u.staleness for u in self.servers[0].updates]

    @property
    def stopped(self) -> str:
        return next((s.stopped for s in self.servers if s.stopped), "")


def train(model_fn: Callable, batch_fn: Callable, loss_fn: Callable, *, workers: int = 2, servers: int = 1,
          timeout: float = 10.0, **options) -> PSRun:
    """Launch S + W processes (``labkit.launch``), run the parameter server, return the gathered :class:`PSRun`.
    ``options``: those of :func:`parameter_server` (mode, steps, lr, staleness, scale_lr, compute_ms, slow,
    die_at, release). ``model_fn``, ``batch_fn``, ``loss_fn`` must give the same model and data on every rank."""
    from labkit.launcher import launch
    results = launch(_entry, model_fn, batch_fn, loss_fn, servers, timeout, options,
                     world_size=servers + workers, timeout=timeout + 30.0)
    return PSRun(results[:servers], results[servers:])


def _entry(model_fn, batch_fn, loss_fn, servers, timeout, options):
    return parameter_server(model_fn, batch_fn, loss_fn, servers=servers, timeout=timeout, **options)
