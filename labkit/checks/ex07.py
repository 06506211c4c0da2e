"""Checkers for exercise 7, the synchronous parameter server (``solutions/07_parameter_server_exercise.ipynb``).

    check_server(run_server)                          # 7a: your server loop, with labkit's workers
    check_worker(run_worker)                          # 7b: your worker loop, with labkit's servers
    check_parameter_server(run_server, run_worker)    # both of yours together

Each prints one ``✓`` line when the code is right and raises :class:`labkit.checks.CheckFailed` naming the
mistake when it is not.

What the student writes. Ranks 0 .. S − 1 are the servers, ranks S .. S + W − 1 the workers (worker w is rank
S + w). Server s holds elements ``shard_bounds(numel, S)[s]`` of the flat parameter vector (the caller cuts them
and hands the server its ``shard``). Every step, in this fixed order:

    server s:   dist.send(shard, dst=S + w) for every worker w           answer every worker's pull
                dist.recv(grads[w], src=S + w) for every worker w        every worker's gradient shard
                shard -= lr · mean_w grads[w]                            one SGD step with the mean
    worker w:   dist.recv(flat[a_s:b_s], src=s) for every server s       pull: the current parameters
                copy them into the model, forward, backward on this worker's batch of the step
                dist.send(grad[a_s:b_s], dst=s) for every server s       push: each server its shard of the gradient

    run_server(shard, server, servers, workers, steps, lr) -> the final shard
    run_worker(model, batches, worker, servers)            batches[step] = (x, y); loss F.mse_loss(model(x), y)

What runs. Every check runs on :data:`CONFIGS` (W workers, S servers) = (3, 2), (2, 1), (4, 1), (3, 3), one
launch of S + W real processes each, stopping at the first configuration with a problem: a float64 MLP of 23
parameters (4 → 3 → 2, tanh), trained :data:`STEPS` steps with SGD. :func:`check_server` runs the student's
server with labkit's workers (:func:`labkit.param_server.run_worker`), :func:`check_worker` the student's worker
with labkit's servers (:func:`labkit.param_server.run_server`). The reference is data-parallel SGD with all-reduce, computed here in one
process: θ_{t+1} = θ_t − lr · (1/W) Σ_w ∇L_w(θ_t), the mean of the W workers' batch gradients.

How the mistakes are found: ``dist.send``, ``dist.recv``, ``dist.isend`` and ``dist.irecv`` are replaced, in the
launched processes only, by versions that do the same and also

- check each message as it goes: who talks to whom (servers only to workers), the element count and dtype
  (sent in a small header first, so a mismatch is named instead of crashing gloo), a worker's slices of its flat
  vectors against the servers' shards (an overlap or a gap is named with its elements), and the order of a
  worker's messages: a push to server s needs a pull from s at the same step (else the gradient was computed on
  stale parameters), a second pull needs the push in between (else both sides wait forever);
- record every message (who, the how-manieth between the two ranks: that is its step, the values);
- stop a rank that waits longer than half the timeout in a send or a receive, with what every rank was doing at
  that moment (each rank writes its state into a small file) and what that means: a worker that never pushed, a
  server that skipped a worker's gradient, a rank still computing, a rank that already returned.

After a run the parent replays it step by step, from the records: did server s send every worker, at step t, the
shard it should hold after the updates so far (else: which update went wrong, from the numbers: W× the mean step
is the sum, one worker's gradient alone, no step at all, a shard changed between two workers of one step: an
update before all gradients arrived)? Did worker w push the gradient of its batch at the parameters it pulled
(else: the gradient at the initial parameters, at the previous step's, accumulated over the steps, ...)? Then each
server's final shard. Everything is compared within 1e-9 relative (float64).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from labkit import comm
from labkit.checks import CheckFailed, describe, fail, first_mismatch, fmt_number, fmt_pair, passed, run_on_ranks
from labkit.param_server import run_server as labkit_server
from labkit.param_server import run_worker as labkit_worker
from labkit.param_server import shard_bounds

__all__ = ["check_server", "check_worker", "check_parameter_server",
           "make_model", "make_batches", "sync_sgd", "CONFIGS", "STEPS", "LR"]

# (workers W, servers S). (3, 2) first: its messages read best (a factor 3 is unmistakable, 23 parameters do not
# split evenly in 2); then one server, more workers, and as many servers as workers.
CONFIGS = ((3, 2), (2, 1), (4, 1), (3, 3))
STEPS = 4
LR = 0.5
SIZES = (4, 3, 2)          # the MLP: 4 inputs -> 3 hidden (tanh) -> 2 outputs: 23 parameters
BATCH = 5                  # samples per worker and step
_RTOL, _ATOL = 1e-9, 1e-12
_HEADER_TAG = 7_000_001    # the checker's header before each message (the student's tag is kept for the payload)
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)


# ============================================================================================
# The workload and the reference
# ============================================================================================

def make_model() -> nn.Sequential:
    """The float64 MLP every rank builds (the same on every rank: a fixed seed)."""
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(), nn.Linear(SIZES[1], SIZES[2])).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def make_batches(worker: int, steps: int = STEPS) -> list:
    """Worker ``worker``'s batches, one (x, y) per step."""
    batches = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + 37 * step + worker)
        x = torch.randn(BATCH, SIZES[0], generator=g, dtype=torch.float64)
        y = torch.randn(BATCH, SIZES[-1], generator=g, dtype=torch.float64)
        batches.append((x, y))
    return batches


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


class _Gradients:
    """∇L_w(θ) on worker w's batch of a step, computed in this process."""

    def __init__(self, workers: int, steps: int = STEPS):
        self.model = make_model()
        self.batches = [make_batches(w, steps) for w in range(workers)]

    def __call__(self, worker: int, step: int, flat: torch.Tensor) -> torch.Tensor:
        _set_flat(self.model, flat)
        self.model.zero_grad()
        x, y = self.batches[worker][step]
        F.mse_loss(self.model(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()]).clone()


def sync_sgd(workers: int, steps: int = STEPS, lr: float = LR) -> list:
    """The reference: the parameters θ_0 .. θ_steps of data-parallel SGD with all-reduce (the mean of the
    workers' gradients), computed in one process."""
    grad = _Gradients(workers, steps)
    thetas = [_flat(make_model())]
    for step in range(steps):
        mean = torch.stack([grad(w, step, thetas[-1]) for w in range(workers)]).mean(dim=0)
        thetas.append(thetas[-1] - lr * mean)
    return thetas


# ============================================================================================
# Inside the launched processes: send and recv, checked and recorded
# ============================================================================================

def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class _Roles:
    """Who is who: ranks 0 .. S − 1 the servers, S .. S + W − 1 the workers."""

    def __init__(self, workers: int, servers: int, numel: int):
        self.W, self.S, self.n = workers, servers, numel
        self.bounds = shard_bounds(numel, servers)

    def is_server(self, rank: int) -> bool:
        return rank < self.S

    def name(self, rank: int) -> str:
        return f"server {rank} (rank {rank})" if rank < self.S else f"worker {rank - self.S} (rank {rank})"

    def short(self, rank: int) -> str:
        return f"server {rank}" if rank < self.S else f"worker {rank - self.S}"

    def message(self, sender: int, receiver: int, k: int) -> str:
        """What the k-th message (0-based) from sender to receiver is, in the protocol."""
        if sender < self.S <= receiver:
            return f"server {sender}'s shard of step {k}"
        if receiver < self.S <= sender:
            return f"{self.short(sender)}'s gradient of step {k} for server {receiver}"
        return f"message {k} from rank {sender}"

    def layout(self) -> str:
        servers = "rank 0" if self.S == 1 else f"ranks 0 .. {self.S - 1}"
        return (f"the {_plural(self.S, 'server')} are {servers} (server s is rank s), the {self.W} workers ranks "
                f"{self.S} .. {self.S + self.W - 1} (worker w is rank servers + w = {self.S} + w)")


class _Comm:
    """This rank's send/recv: checked, recorded, and never waiting forever."""

    def __init__(self, rank: int, roles: _Roles, deadline: float, state_dir: str):
        self.rank, self.roles, self.deadline, self.state_dir = rank, roles, deadline, state_dir
        self.sent, self.received = Counter(), Counter()
        self.records = []          # (op, peer, k, values)
        self.real = {}
        self.state("running", since_event="started")

    # --- the state file: what this rank is doing, for the others' messages -----------------------------

    def state(self, what: str, **info) -> None:
        info.update(state=what, rank=self.rank, time=time.time(), sent=dict(self.sent),
                    received=dict(self.received))
        path = os.path.join(self.state_dir, f"rank{self.rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)

    def states(self) -> dict:
        out = {}
        for r in range(self.roles.S + self.roles.W):
            try:
                with open(os.path.join(self.state_dir, f"rank{r}.json")) as f:
                    out[r] = json.load(f)
            except (OSError, ValueError):
                pass
        return out

    def _fail(self, message: str) -> NoReturn:
        """Stop this rank with ``message``. When every rank makes the same mistake, the lowest rank's report comes
        first (the launcher names the earliest error): the message reads "worker 0", not whichever was fastest."""
        time.sleep(0.05 * self.rank)
        raise CheckFailed(message)

    @contextmanager
    def installed(self):
        """The student calls torch.distributed's send and recv; labkit's side of a check (run_server,
        run_worker) calls labkit.comm's: both go through this rank's checked versions."""
        names = ("send", "recv", "isend", "irecv")
        self.real = {n: getattr(dist, n) for n in names}
        labkit_comm = {n: getattr(comm, n) for n in names}
        for n in names:
            setattr(dist, n, getattr(self, n))
            setattr(comm, n, getattr(self, n))
        try:
            yield self
        finally:
            for n in names:
                setattr(dist, n, self.real[n])
                setattr(comm, n, labkit_comm[n])

    # --- checks before a message goes -------------------------------------------------------------------

    def _peer(self, peer, op: str, arg: str) -> int:
        roles, me = self.roles, self.rank
        world = roles.S + roles.W
        call = f"dist.{op}({arg}={peer!r})"
        if isinstance(peer, torch.Tensor) and peer.numel() == 1:
            peer = int(peer)
        if isinstance(peer, bool) or not isinstance(peer, int):
            self._fail(f"{roles.name(me)} called {call}: {arg} must be a rank, an int. Here {roles.layout()}.")
        if not 0 <= peer < world:
            self._fail(f"{roles.name(me)} called {call}: there are {world} ranks, 0 .. {world - 1}; "
                              f"{roles.layout()}.")
        if peer == me:
            self._fail(f"{roles.name(me)} called {call}: that is itself. Here {roles.layout()}.")
        if roles.is_server(peer) == roles.is_server(me):
            if roles.is_server(me):
                self._fail(f"{roles.name(me)} called {call}: rank {peer} is server {peer}, another server. "
                                  f"Servers talk only to the workers: {roles.layout()}.")
            self._fail(f"{roles.name(me)} called {call}: rank {peer} is {roles.short(peer)}, another worker. "
                              f"Workers talk only to the servers: {roles.layout()}.")
        return peer

    def _dtype(self, tensor, what: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            self._fail(f"{self.roles.name(self.rank)}: {what} is a {type(tensor).__name__}, not a tensor.")
        if tensor.dtype != torch.float64:
            self._fail(f"{self.roles.name(self.rank)}: {what} is a {tensor.dtype} tensor; the parameters and "
                              f"their gradients are torch.float64 (make buffers with torch.empty_like(shard) or "
                              f"slices of the flat vectors).")

    def _slice(self, tensor: torch.Tensor, s: int, verb: str) -> None:
        """A worker's slice for server s must be exactly the server's shard: elements shard_bounds(n, S)[s]."""
        roles = self.roles
        a, b = roles.bounds[s]
        n = roles.n
        count = tensor.numel()
        in_flat = (tensor.dim() == 1 and tensor.stride(0) == 1
                   and tensor.untyped_storage().nbytes() == n * tensor.element_size())
        if in_flat:
            a2 = tensor.storage_offset()
            b2 = a2 + count
            if (a2, b2) == (a, b):
                return
            what = f"flat[{a2}:{b2}] ({_plural(count, 'element')})"
        elif count == b - a:
            return
        else:
            a2 = b2 = None
            what = f"{_plural(count, 'element')}"
        head = (f"{roles.name(self.rank)} {verb} {what}, but server {s} holds elements [{a}, {b}) of the {n} "
                f"parameters ({_plural(b - a, 'element')}: shard_bounds({n}, {roles.S})[{s}] = ({a}, {b})).")
        why = []
        if a2 is not None:
            if a2 < a:
                owner = f"server {s - 1}'s shard" if s > 0 else "no shard"
                why.append(f"elements [{a2}, {min(a, b2)}) are in {owner} too: the shards overlap, and those "
                           f"parameters would be pulled from two servers and updated by both")
            if b2 > b:
                owner = f"server {s + 1}'s shard" if s + 1 < roles.S else "no server's shard (past the end)"
                why.append(f"elements [{max(b, a2)}, {b2}) are in {owner} too: the shards overlap, and those "
                           f"parameters would be pulled from two servers and updated by both")
            if a2 > a:
                why.append(f"elements [{a}, {min(a2, b)}) are left out: a gap, those parameters would never be "
                           f"pulled or updated")
            if b2 < b:
                why.append(f"elements [{max(b2, a)}, {b}) are left out: a gap, those parameters would never be "
                           f"pulled or updated")
        hint = ""
        if a2 == a and b2 == b + 1:
            hint = " (flat[a:b + 1]: a Python slice already leaves its end out, [a, b) is flat[a:b])"
        elif a2 == a + 1 and b2 == b:
            hint = " (flat[a + 1:b]: the shard starts at a, included)"
        elif n % roles.S and count == n // roles.S:
            hint = (f" ({n} // {roles.S} = {n // roles.S} elements per server: the last {n % roles.S} "
                    f"parameter(s) then belong to no server; shard_bounds gives the first {n % roles.S} server(s) "
                    f"one element more)")
        sentences = "; ".join(why)
        text = head + (" " + sentences[:1].upper() + sentences[1:] + hint + "." if why else hint)
        self._fail(text + " Cut both the pulls and the pushes with a, b = shard_bounds(flat.numel(), servers)[s]: "
                          "flat[a:b] and grad[a:b].")

    def _before_send(self, tensor, dst) -> int:
        roles, me = self.roles, self.rank
        dst = self._peer(dst, "send", "dst")
        k = self.sent[dst]
        if roles.is_server(me):
            self._dtype(tensor, f"the shard it sends to worker {dst - roles.S}")
            a, b = roles.bounds[me]
            if tensor.numel() != b - a:
                self._fail(f"{roles.name(me)} sends worker {dst - roles.S} {_plural(tensor.numel(), 'element')} "
                                  f"at step {k}, but its shard has {b - a} (elements [{a}, {b})): send the shard "
                                  f"itself, dist.send(shard, dst=servers + w).")
        else:
            s = dst
            self._dtype(tensor, f"the gradient shard it sends to server {s}")
            pulled = self.received[s]
            if pulled <= k:
                if pulled == 0:
                    self._fail(
                        f"{roles.name(me)} pushes its gradient of step {k} to server {s} without having pulled "
                        f"server {s}'s shard first: every step starts with a pull from every server, "
                        f"dist.recv(flat[a:b], src=s), so that the gradient is computed on the current parameters.")
                self._fail(
                    f"{roles.name(me)} pushes its gradient of step {k} to server {s}, but it pulled server {s}'s "
                    f"shard only {_plural(pulled, 'time')} (last for step {pulled - 1}): it computed the gradient of "
                    f"step {k} on stale parameters, those of step {pulled - 1}. The parameters change at every step: "
                    f"in synchronous training every step starts with a pull from every server.")
            self._slice(tensor, s, f"pushes server {s} its gradient slice")
        return dst

    def _before_recv(self, tensor, src) -> int | None:
        roles, me = self.roles, self.rank
        if src is not None:
            src = self._peer(src, "recv", "src")
        if roles.is_server(me):
            self._dtype(tensor, "the buffer it receives a gradient into")
            a, b = roles.bounds[me]
            if tensor.numel() != b - a:
                who = f"worker {src - roles.S}'s" if src is not None else "a"
                self._fail(f"{roles.name(me)} receives {who} gradient into a buffer of "
                                  f"{_plural(tensor.numel(), 'element')}, but its shard (and each worker's gradient "
                                  f"shard) has {b - a}: receive into torch.empty_like(shard).")
        elif src is not None:
            s = src
            self._dtype(tensor, f"the buffer it pulls server {s}'s shard into")
            k = self.received[s]
            if self.sent[s] < k:
                self._fail(
                    f"{roles.name(me)} pulls server {s}'s shard of step {k}, but it has pushed server {s} only "
                    f"{_plural(self.sent[s], 'gradient')}: its gradient of step {k - 1} never went out. Server {s} "
                    f"waits for that gradient before it answers the pull of step {k}, so both would wait forever. "
                    f"Every step ends with a push to every server: dist.send(grad[a:b], dst=s).")
            self._slice(tensor, s, f"pulls server {s}'s shard into")
        return src

    # --- the messages --------------------------------------------------------------------------------------

    def send(self, tensor, dst=None, group=None, tag=0, **kwargs):
        self._do_send(tensor, dst, tag, kwargs).wait()

    def isend(self, tensor, dst=None, group=None, tag=0, **kwargs):
        return self._do_send(tensor, dst, tag, kwargs)

    def recv(self, tensor, src=None, group=None, tag=0, **kwargs):
        return self._do_recv(tensor, src, tag, kwargs).wait()

    def irecv(self, tensor, src=None, group=None, tag=0, **kwargs):
        return self._do_recv(tensor, src, tag, kwargs)

    def _do_send(self, tensor, dst, tag, kwargs):
        self._no_group(kwargs, "send")
        dst = self._before_send(tensor, dst)
        k = self.sent[dst]
        self.sent[dst] += 1
        self.records.append(("send", dst, k, tensor.detach().clone()))
        header = torch.tensor([tensor.numel(), _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1],
                              dtype=torch.int64)
        works = [self.real["isend"](header, dst=dst, tag=_HEADER_TAG),
                 self.real["isend"](tensor, dst=dst, tag=tag)]
        return _SendWork(self, works, dst, k)

    def _do_recv(self, tensor, src, tag, kwargs):
        self._no_group(kwargs, "recv")
        src = self._before_recv(tensor, src)
        if src is not None:
            self.received[src] += 1   # counted when posted: the order checks see the pull at once
        header = torch.zeros(2, dtype=torch.int64)
        work = self.real["irecv"](header, src=src, tag=_HEADER_TAG)
        return _RecvWork(self, tensor, src, tag, header, work)

    def _no_group(self, kwargs, op: str) -> None:
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if extra:
            self._fail(f"{self.roles.name(self.rank)} called dist.{op} with {', '.join(extra)}: this exercise "
                              f"uses the default group and global ranks (dst=, src=).")

    # --- waiting, with a deadline ----------------------------------------------------------------------------

    def wait(self, work, op: str, peer, k: int | None) -> None:
        self.state("waiting", op=op, peer=peer, k=k, since=time.time())
        box, done = {}, threading.Event()

        def run():
            try:
                work.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()
        if not done.wait(self.deadline):
            self._fail(self._stuck(op, peer, k))
        if "error" in box:
            gone = self._returned_peer(peer)
            if gone is not None:
                self._fail(self._stuck(op, peer, k, returned=gone))
            raise box["error"]
        self.state("running", since_event=f"{op} {peer} {k}")

    def _returned_peer(self, peer):
        states = self.states()
        candidates = [peer] if peer is not None else sorted(states)
        for r in candidates:
            if states.get(r, {}).get("state") == "returned":
                return r
        return None

    def _stuck(self, op: str, peer, k, returned=None) -> str:
        roles, me = self.roles, self.rank
        if op == "recv":
            call = f"dist.recv(src={peer})" if peer is not None else "dist.recv() from any rank"
            what = roles.message(peer, me, k) if peer is not None else "a message"
        else:
            call = f"dist.send(dst={peer})"
            what = roles.message(me, peer, k)
        if returned is None:
            wait = (f"for {what}, which never came" if op == "recv" else f"with {what}, which was never received")
            head = (f"{roles.name(me)} waited {fmt_number(self.deadline)} s in {call} {wait}: the run hung, and the "
                    f"check stopped it.")
        else:
            head = (f"{roles.name(me)} waited in {call} {'for' if op == 'recv' else 'with'} {what}, but "
                    f"{roles.name(returned)} had already returned from its function: it "
                    f"{'sends' if op == 'recv' else 'receives'} fewer messages than {roles.short(me)} expects.")
        states = self.states()
        lines = [f"  {self._describe(states.get(r), r)}" for r in range(roles.S + roles.W)]
        hints = self._deductions(states)
        return (head + "\nWhat every rank was doing at that moment:\n" + "\n".join(lines)
                + ("\n" + "\n".join(hints) if hints else ""))

    def _describe(self, st, r: int) -> str:
        roles = self.roles
        name = roles.name(r)
        if st is None:
            return f"{name}: had not started"
        sent = sum(st["sent"].values())
        got = sum(st["received"].values())
        if st["state"] == "waiting":
            peer, k = st["peer"], st["k"]
            if st["op"] == "recv":
                what = roles.message(peer, r, k) if peer is not None else "a message from any rank"
                return f"{name}: waiting in dist.recv(src={peer}) for {what}"
            return f"{name}: waiting in dist.send(dst={peer}) with {roles.message(r, peer, k)}"
        done = f"after {_plural(sent, 'send')} and {_plural(got, 'receive')}"
        if st["state"] == "returned":
            return f"{name}: had returned from its function, {done}"
        seconds = time.time() - st["time"]
        return f"{name}: running its own code (no send or receive) for {fmt_number(round(seconds, 1))} s, {done}"

    def _deductions(self, states: dict) -> list:
        roles = self.roles
        out = []
        for r, st in sorted(states.items()):
            sent = {int(p): n for p, n in st["sent"].items()}
            got = {int(p): n for p, n in st["received"].items()}
            if st["state"] == "waiting" and st["peer"] is not None:
                peer, k, op = st["peer"], st["k"], st["op"]
                if roles.is_server(r) and op == "recv" and sent.get(peer, 0) <= k:
                    out.append(f"→ server {r} waits for {roles.short(peer)}'s gradient of step {k} before it has "
                               f"sent that worker its shard of step {k}, which the worker waits for first: each waits "
                               f"for the other. Every step, a server first sends its shard to every worker, then "
                               f"receives the gradients.")
                if roles.is_server(r) and op == "send" and got.get(peer, 0) < k:
                    out.append(f"→ server {r} went on to step {k} without receiving {roles.short(peer)}'s gradient "
                               f"of step {k - 1} ({_plural(got.get(peer, 0), 'gradient')} from it in all): it must "
                               f"receive the gradient of every worker, w = 0 .. workers − 1, at every step.")
                peer_state = states.get(peer)
                role = (f"whose message {roles.short(r)} waits for" if op == "recv" else
                        f"which {roles.short(r)} waits to send to")
                if peer_state is not None and peer_state["state"] == "running":
                    out.append(f"→ {roles.short(peer)}, {role}, is still running its own code: a very slow or "
                               f"endless computation?")
                if peer_state is not None and peer_state["state"] == "returned":
                    out.append(f"→ {roles.short(peer)}, {role}, has returned: it ran fewer steps, or "
                               f"{'sent' if op == 'recv' else 'received'} fewer messages, than {roles.short(r)} "
                               f"expects.")
        return list(dict.fromkeys(out))


class _SendWork:
    def __init__(self, comm: _Comm, works, dst: int, k: int):
        self.comm, self.works, self.dst, self.k, self.done = comm, works, dst, k, False

    def wait(self, timeout=None):
        if not self.done:
            for work in self.works:
                self.comm.wait(work, "send", self.dst, self.k)
            self.done = True
        return True

    def is_completed(self):
        return self.done or all(w.is_completed() for w in self.works)


class _RecvWork:
    def __init__(self, comm: _Comm, tensor, src, tag, header, work):
        self.comm, self.tensor, self.src, self.tag, self.header, self.work = comm, tensor, src, tag, header, work
        self.k = comm.received[src] - 1 if src is not None else None
        self.done = False
        self.source = src

    def wait(self, timeout=None):
        if self.done:
            return self.source
        comm, roles = self.comm, self.comm.roles
        comm.wait(self.work, "recv", self.src, self.k)
        src = self.src
        if src is None:          # from any rank: the header says who
            src = comm._peer(self.work._source_rank(), "recv", "src")
            self.k = comm.received[src]
            comm.received[src] += 1
        count, code = (int(v) for v in self.header)
        dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else "another dtype"
        if count != self.tensor.numel() or dtype != self.tensor.dtype:
            comm._fail(
                f"{roles.name(comm.rank)} receives {roles.message(src, comm.rank, self.k)} into a buffer of "
                f"{_plural(self.tensor.numel(), 'element')} ({self.tensor.dtype}), but {roles.short(src)} sent "
                f"{_plural(count, 'element')} ({dtype}): the two sides must agree on every message's size.")
        work = comm.real["irecv"](self.tensor, src=src, tag=self.tag)
        comm.wait(work, "recv", src, self.k)
        comm.records.append(("recv", src, self.k, self.tensor.detach().clone()))
        self.done, self.source = True, src
        return src

    def is_completed(self):
        return self.done


def _rank_main(server_fn, worker_fn, workers: int, servers: int, steps: int, lr: float, deadline: float,
               state_dir: str) -> dict:
    rank = dist.get_rank()
    model = make_model()
    flat = _flat(model)
    roles = _Roles(workers, servers, flat.numel())
    comm = _Comm(rank, roles, deadline, state_dir)
    out = {"rank": rank, "final": None, "returned": None}
    with comm.installed():
        if rank < servers:
            a, b = roles.bounds[rank]
            shard = flat[a:b].clone()
            given = shard
            returned = server_fn(shard, rank, servers, workers, steps, lr)
            out["returned"] = describe(returned)
            if isinstance(returned, torch.Tensor):
                out["final"] = returned.detach().clone()
            else:
                out["final"] = given.detach().clone()
        else:
            worker_fn(model, make_batches(rank - servers, steps), rank - servers, servers)
    comm.state("returned")
    out["records"] = comm.records
    return out



# ============================================================================================
# In the parent: the run replayed step by step
# ============================================================================================

def _close(want: torch.Tensor, got) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and first_mismatch(want, got, rtol=_RTOL, atol=_ATOL) is None)


def _factor(want: torch.Tensor, got: torch.Tensor):
    """c when got = c · want (want not zero), else None."""
    den = float((want * want).sum())
    if den == 0 or got.shape != want.shape:
        return None
    c = float((got * want).sum()) / den
    return c if _close(c * want, got) else None


def _first_diff(want: torch.Tensor, got: torch.Tensor, offset: int = 0, what: str = "element") -> str:
    found = first_mismatch(want, got, rtol=_RTOL, atol=_ATOL)
    if found is None:
        return ""
    (i,), e, g = found
    e, g = fmt_pair(e, g)
    return f"{what} {offset + i} is {g}, expected {e}"


class _Run:
    """One run's messages, indexed: pulls[s][w][t] (what server s sent worker w at step t), grads[s][w][t]
    (what server s received from worker w at step t)."""

    def __init__(self, results: list, workers: int, servers: int):
        self.W, self.S = workers, servers
        self.results = results
        self.pulls = [[[] for _ in range(workers)] for _ in range(servers)]
        self.grads = [[[] for _ in range(workers)] for _ in range(servers)]
        for s in range(servers):
            for op, peer, k, values in results[s]["records"]:
                w = peer - servers
                (self.pulls if op == "send" else self.grads)[s][w].append(values)
        self.finals = [results[s]["final"] for s in range(servers)]


def _run_problem(results: list, workers: int, servers: int, steps: int, lr: float, names: dict) -> str | None:
    W, S = workers, servers
    roles = _Roles(W, S, sum(p.numel() for p in make_model().parameters()))
    head = _head(W, S)
    run = _Run(results, W, S)
    # Every pair talked once per step in each direction (a completed run matched every send with a receive).
    for s in range(S):
        for w in range(W):
            for kind, lst, verb in (("shard", run.pulls[s][w], "sent"), ("gradient", run.grads[s][w], "received")):
                if len(lst) != steps:
                    return (f"{head}: server {s} {verb} worker {w} {_plural(len(lst), 'message')} in {steps} steps "
                            f"(expected one {kind} per step, {steps} in all).")
    grad = _Gradients(W, steps)
    theta0 = _flat(make_model())
    cur = [theta0[a:b].clone() for a, b in roles.bounds]          # what each server should hold now
    pulled_before = [None] * W
    for t in range(steps):
        # 1. the pulls of step t: every worker gets every server's current shard
        for s, (a, b) in enumerate(roles.bounds):
            for w in range(W):
                got = run.pulls[s][w][t]
                if _close(cur[s], got):
                    continue
                return _pull_problem(head, run, roles, s, w, t, cur, lr, names)
        # 2. the pushes of step t: the gradient of the worker's batch at the parameters it pulled
        for w in range(W):
            pulled = torch.cat([run.pulls[s][w][t] for s in range(S)])
            pushed = torch.cat([run.grads[s][w][t] for s in range(S)])
            want = grad(w, t, pulled)
            if not _close(want, pushed):
                return _push_problem(head, run, roles, grad, w, t, pulled, pushed, want, theta0, names)
            pulled_before[w] = pulled
        # 3. the update: each server's shard moves by −lr × the mean of what it received
        for s in range(S):
            cur[s] = cur[s] - lr * torch.stack([run.grads[s][w][t] for w in range(W)]).mean(dim=0)
    for s, (a, b) in enumerate(roles.bounds):
        final = run.finals[s]
        if not isinstance(final, torch.Tensor) or final.shape != cur[s].shape:
            return (f"{head}: {names['server']} on server {s} returned {results[s]['returned']}; it must return the "
                    f"shard after the last step, a tensor of shape {tuple(cur[s].shape)} (the given `return shard`).")
        if not _close(cur[s], final) and _close(theta0[a:b], final) and results[s]["returned"] == "None":
            return (f"{head}: server {s}'s final shard is still the initial one: {names['server']} returned None, and "
                    f"the shard it was given never changed (the updates went to new tensors, shard = shard - ...). "
                    f"End with `return shard` (given), or update the shard in place (shard -= ...).")
        if not _close(cur[s], final):
            prev = run.pulls[s][0][steps - 1]
            where = (f"server {s}'s final shard, after the update of the last step (step {steps - 1}), is wrong: "
                     f"{_first_diff(cur[s], final, a, 'parameter')}")
            return f"{head}: " + _update_problem(where, run, roles, s, steps - 1, prev, final, lr, names)
    return None


def _pull_problem(head, run: _Run, roles: _Roles, s: int, w: int, t: int, cur, lr, names) -> str:
    W = run.W
    a, b = roles.bounds[s]
    got = run.pulls[s][w][t]
    first = run.pulls[s][0][t]
    where = (f"server {s} answered worker {w}'s pull of step {t} with the wrong parameters: "
             f"{_first_diff(cur[s], got, a, 'parameter')}")
    if w > 0 and _close(cur[s], first):
        # the shard changed between two workers of the same step
        before = [run.grads[s][v][t] for v in range(w)]
        moved = ""
        for c, how in ((1.0, "lr · g each"), (1.0 / W, f"lr · g / {W} each")):
            if _close(cur[s] - lr * c * torch.stack(before).sum(dim=0), got):
                who = "worker 0's gradient" if w == 1 else f"the gradients of workers 0 .. {w - 1}"
                moved = f" The parameters it sent worker {w} had already moved by {who} of step {t} ({how})."
                break
        return (f"{head}: {where}. It sent worker 0 the right shard of step {t}, then changed its shard before "
                f"answering worker {w}'s pull of the same step: it applied a gradient before all {W} gradients of "
                f"the step had arrived, so the workers of one step computed on different parameters (an "
                f"asynchronous server, not a synchronous one).{moved} Synchronous: send the shard to every worker, "
                f"then receive all {W} gradients, then apply their mean, once per step.")
    same = all(_close(got, run.pulls[s][v][t]) for v in range(W))
    if t == 0:
        return (f"{head}: {where}. At step 0 the workers must get the initial parameters, the shard "
                f"{names['server']} was given: change it only after the gradients of step 0 are in.")
    if same:
        prev = run.pulls[s][0][t - 1]
        return f"{head}: " + _update_problem(
            f"{where}. The update of step {t - 1} is wrong (what server {s} sent at step {t - 1} and the gradients "
            f"it received then were right)", run, roles, s, t - 1, prev, got, lr, names)
    return (f"{head}: {where}; and server {s} sent different parameters to different workers at step {t}. Every "
            f"worker of a step must get the same shard.")


def _update_problem(where: str, run: _Run, roles: _Roles, s: int, t: int, prev, got, lr, names) -> str:
    W = run.W
    grads = [run.grads[s][w][t] for w in range(W)]
    want_step = -lr * torch.stack(grads).mean(dim=0)
    step = got - prev
    fix = (f"Each step: shard -= lr · (1/W) Σ_w g_w, the mean of the {W} gradients received, applied once (in place, "
           f"or returned: the given `return shard` hands back the final shard).")
    if _close(torch.zeros_like(step), step):
        return (f"{where}: the shard did not change: server {s} sent the same parameters again. The update was not "
                f"applied to the tensor that is sent and returned (computed into another variable, or not at all). "
                + fix)
    for v in range(W):
        for c, how in ((1.0, "lr · g"), (1.0 / W, f"lr · g / {W}")):
            if _close(-lr * c * grads[v], step):
                return (f"{where}: the step is −{how} with g worker {v}'s gradient alone: the other "
                        f"{_plural(W - 1, 'gradient')} of the step were lost. Receiving every gradient into the "
                        f"same buffer keeps only the last one; keep one buffer per worker "
                        f"(grads = [torch.empty_like(shard) for _ in range(workers)]). " + fix)
    c = _factor(want_step, step)
    if c is not None:
        if abs(c - W) < 1e-6:
            return (f"{where}: the step is {W} times too large (measured factor {fmt_number(round(c, 9))} = W, the "
                    f"number of workers): server {s} applied the sum of the {W} gradients, not their mean (or each "
                    f"gradient with the full learning rate as it arrived). " + fix)
        if abs(c - 1 / W) < 1e-6:
            return (f"{where}: the step is {W} times too small (measured factor 1/{W}): the mean divided by W once "
                    f"more. " + fix)
        if abs(c + 1) < 1e-6:
            return (f"{where}: the step went the wrong way (measured factor −1): shard += lr · mean climbs the "
                    f"loss. " + fix)
        return (f"{where}: the step is {fmt_number(round(c, 9))} times the expected one, −lr · mean (lr = "
                f"{fmt_number(lr)}): the learning rate? " + fix)
    return f"{where}. " + fix


def _push_problem(head, run: _Run, roles: _Roles, grad: _Gradients, w: int, t: int, pulled, pushed, want, theta0,
                  names) -> str:
    S = run.S
    where = (f"worker {w} pushed the wrong gradient at step {t}: {_first_diff(want, pushed, 0, 'element')} (the "
             f"gradient of its batch at the parameters it pulled for step {t})")
    # which servers got a wrong part
    wrong = [s for s, (a, b) in enumerate(roles.bounds) if not _close(want[a:b], pushed[a:b])]
    if len(wrong) < S:
        s = wrong[0]
        a, b = roles.bounds[s]
        part = pushed[a:b]
        for a2 in range(0, roles.n - (b - a) + 1):
            if a2 != a and _close(want[a2:a2 + b - a], part):
                return (f"{head}: {where}. Server {s} got elements [{a2}, {a2 + b - a}) of the gradient instead of "
                        f"its own [{a}, {b}): push each server the slice shard_bounds gives it, grad[a:b].")
        return (f"{head}: {where}. Only the part pushed to server {'s ' if len(wrong) > 1 else ''}"
                f"{', '.join(map(str, wrong))} is wrong; the others are right.")
    if t > 0:
        def pulls(k):
            return torch.cat([run.pulls[s][w][k] for s in range(S)])

        def pushes(k):
            return torch.cat([run.grads[s][w][k] for s in range(S)])

        initial = not _close(theta0, pulled) and _close(grad(w, t, theta0), pushed)
        behind = _close(grad(w, t, pulls(t - 1)), pushed)
        if initial and behind and t + 1 < len(run.pulls[0][w]):   # θ_0 was also the previous step's: look ahead
            initial = _close(grad(w, t + 1, theta0), pushes(t + 1))
            behind = not initial
        if initial:
            return (f"{head}: {where}. It is the gradient at the initial parameters θ_0: the shards worker {w} pulled "
                    f"never reached the model, which still holds θ_0. Copy the pulled parameters into the model "
                    f"(set_flat_params(model, flat)) after the pulls and before the forward pass.")
        if behind:
            return (f"{head}: {where}. It is the gradient at the parameters of step {t - 1}, one step behind: the "
                    f"model got the pulled parameters after the gradient was computed. Pull, copy into the model, "
                    f"then forward and backward.")
        accumulated = sum(grad(w, k, pulls(k)) for k in range(t + 1))
        if _close(accumulated, pushed):
            return (f"{head}: {where}. It is the sum of worker {w}'s gradients of steps 0 .. {t}: backward adds to "
                    f".grad, and the gradients were never zeroed. Call model.zero_grad() before each backward.")
    c = _factor(want, pushed)
    if c is not None and abs(c - BATCH * SIZES[-1]) < 1e-6:
        return (f"{head}: {where}. It is {BATCH * SIZES[-1]} times the expected gradient, {BATCH} samples × "
                f"{SIZES[-1]} outputs: the squared errors summed, not averaged. The loss is F.mse_loss(model(x), y), "
                f"their mean.")
    if c is not None:
        return (f"{head}: {where}. It is {fmt_number(round(c, 9))} times the expected gradient: the loss is "
                f"F.mse_loss(model(x), y) on this worker's batch of the step, and the worker pushes its gradient "
                f"as it is (the servers average).")
    return f"{head}: {where}."


# ============================================================================================
# The checks
# ============================================================================================

def _configs_text(configs) -> str:
    parts = [f"({w}, {s})" for w, s in configs]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _need_function(fn, call: str) -> None:
    __tracebackhide__ = True
    if not callable(fn):
        fail(f"pass your function itself: {call}, not a {type(fn).__name__}")


def _head(workers: int, servers: int) -> str:
    return f"on {workers} workers and {_plural(servers, 'server')} ({servers + workers} processes)"


def _run_config(server_fn, worker_fn, workers: int, servers: int, timeout: float, name: str, task: str | None,
                names: dict) -> str | None:
    """One launch of S + W processes: None when all is right, else the problem, starting "on W workers and ..."."""
    __tracebackhide__ = True
    state_dir = tempfile.mkdtemp(prefix="labkit-ex07-")
    try:
        results = run_on_ranks(_rank_main, server_fn, worker_fn, workers, servers, STEPS, LR, 0.5 * timeout,
                               state_dir, world_size=servers + workers, timeout=timeout, name=name, task=task,
                               device="cpu")
    except CheckFailed as err:   # found while the messages went (or a hang, an exception): add the configuration
        return f"{_head(workers, servers)}: {err}"
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return _run_problem(results, workers, servers, STEPS, LR, names)


def _success(configs) -> str:
    return (f"on (W workers, S servers) = {_configs_text(configs)}, {STEPS} steps each: every step every worker "
            f"pulled the same current shard from every server, pushed the gradient of its batch at those "
            f"parameters, and every server applied the mean of the W gradients once; the parameters after every "
            f"step equal data-parallel SGD with all-reduce within 1e-9")


def check_server(run_server, *, configs=CONFIGS, timeout: float = 10.0) -> None:
    """Check exercise 7a: ``run_server(shard, server, servers, workers, steps, lr)`` with labkit's workers
    (:func:`labkit.param_server.run_worker`), on every configuration (W, S) of ``configs``."""
    __tracebackhide__ = True
    _need_function(run_server, "check_server(run_server)")
    name = getattr(run_server, "__name__", "run_server")
    names = {"server": name, "worker": "labkit's worker"}
    for workers, servers in configs:
        problem = _run_config(run_server, labkit_worker, workers, servers, timeout, name, "7a", names)
        if problem:
            fail(f"{name} (with labkit's workers) is wrong {problem}")
    passed(f"{name} is correct with labkit's workers " + _success(configs))


def check_worker(run_worker, *, configs=CONFIGS, timeout: float = 10.0) -> None:
    """Check exercise 7b: ``run_worker(model, batches, worker, servers)`` with labkit's servers
    (:func:`labkit.param_server.run_server`), on every configuration (W, S) of ``configs``."""
    __tracebackhide__ = True
    _need_function(run_worker, "check_worker(run_worker)")
    name = getattr(run_worker, "__name__", "run_worker")
    names = {"server": "labkit's server", "worker": name}
    for workers, servers in configs:
        problem = _run_config(labkit_server, run_worker, workers, servers, timeout, name, "7b", names)
        if problem:
            fail(f"{name} (with labkit's servers) is wrong {problem}")
    passed(f"{name} is correct with labkit's servers " + _success(configs))


def _not_written(server_fn, worker_fn, err: NotImplementedError) -> NotImplementedError:
    """The stub that stopped the check, and the other function too if it is not written yet either (probed here:
    outside a launched process any real send or receive fails at once, a stub raises first)."""
    found = []
    probes = (("7a", server_fn, lambda: server_fn(torch.zeros(3, dtype=torch.float64), 0, 1, 1, 1, LR)),
              ("7b", worker_fn, lambda: worker_fn(make_model(), make_batches(0, 1), 0, 1)))
    for task, fn, call in probes:
        try:
            call()
        except NotImplementedError as e:
            found.append((task, str(e) if str(e).startswith("Exercise ") else
                          f"Exercise {task}: {getattr(fn, '__name__', task)} is not written yet (it raised "
                          f"NotImplementedError{f'({str(e)!r})' if str(e) else ''}); see the instructions above"))
        except Exception:  # noqa: BLE001 - written (a send outside a process group fails): the run will say
            pass
    if not found:
        return err
    message = found[0][1]
    if len(found) > 1:
        message += "\nNot written yet either:\n" + "\n".join(
            "  " + m.removesuffix("; see the instructions above") for _, m in found[1:])
    return NotImplementedError(message)


def check_parameter_server(run_server, run_worker, *, configs=CONFIGS, timeout: float = 10.0) -> None:
    """Check exercises 7a and 7b together: your servers and your workers, on every configuration of ``configs``."""
    __tracebackhide__ = True
    _need_function(run_server, "check_parameter_server(run_server, run_worker)")
    _need_function(run_worker, "check_parameter_server(run_server, run_worker)")
    names = {"server": getattr(run_server, "__name__", "run_server"),
             "worker": getattr(run_worker, "__name__", "run_worker")}
    name = f"{names['server']} and {names['worker']}"
    for workers, servers in configs:
        try:
            problem = _run_config(run_server, run_worker, workers, servers, timeout, name, None, names)
        except NotImplementedError as err:
            raise _not_written(run_server, run_worker, err) from None
        if problem:
            fail(f"{name} are wrong together {problem}")
    passed(f"{name} are correct together " + _success(configs))
