"""Checkers for exercise 7, the synchronous parameter server (``solutions/07_parameter_server_exercise.ipynb``).

    check_server(run_server)                          # 7a: your server loop, with labkit's workers
    check_worker(run_worker)                          # 7b: your worker loop, with labkit's servers
    check_parameter_server(run_server, run_worker)    # both of yours together
    check_release(release)                            # 7c (i): the bounded-staleness rule (a design task)
    check_max_staleness(max_staleness)                # 7c (ii): the largest staleness it allows, derived

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

Every check runs on :data:`CONFIGS` (W workers, S servers), one launch of S + W processes each, stopping at the
first configuration with a problem: a float64 MLP of 23 parameters (4 → 3 → 2, tanh), :data:`STEPS` steps of SGD,
with labkit's other side (:func:`labkit.param_server.run_worker` / :func:`~labkit.param_server.run_server`) where
only one function is the student's. The reference is data-parallel SGD with all-reduce, in one process:
θ_{t+1} = θ_t − lr · (1/W) Σ_w ∇L_w(θ_t).

While the messages go, a :class:`labkit.checks.harness.Watch` (of torch.distributed and of labkit.comm, which
labkit's side calls) checks each one: who talks to whom, its size and dtype (in a small header first, so that a
mismatch is named instead of crashing gloo), a worker's slices against the shards (an overlap or a gap, with its
elements), the order (a push to server s needs a pull from s at the same step, a second pull the push in between);
it records each as a :class:`Message`, and a rank stuck past half the timeout is stopped with every rank's state
and what that means here. Then the run is replayed step by step (the pulls, the pushes, the final shards), and a
wrong number is compared with the known wrong ones: :data:`ARRIVAL_MISTAKES`, :data:`UPDATE_MISTAKES` and
:data:`PUSH_MISTAKES`, each row's :class:`Variant` holding the edits of labkit's run_server or run_worker that
make it (the tests build every row) and the formula of its numbers. Compared within 1e-9 relative (float64).

7c (see "# 7c." below): the student's rule for labkit's bounded server (:func:`labkit.param_server.serve`,
``release=``) against labkit's :func:`~labkit.param_server.ssp_release` on constructed states (:data:`STATES`,
:data:`RELEASE_MISTAKES`), then in real runs; the bound against :func:`largest_staleness`, a search over every order
of messages (:data:`BOUND_MISTAKES`).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from typing import Callable, NamedTuple, NoReturn

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from labkit import comm
from labkit.checks import CheckFailed, describe, fail, first_mismatch, fmt_number, fmt_pair, passed, run_on_ranks
from labkit.checks.harness import (Board, Call, Mistake, Watch, and_list, board_dir, call_student, close,
                                   find_mistake, need_function, not_written, plural)
from labkit.param_server import run_server as labkit_server
from labkit.param_server import run_worker as labkit_worker
from labkit.param_server import shard_bounds

__all__ = ["check_server", "check_worker", "check_parameter_server", "make_model", "make_batches", "sync_sgd",
           "CONFIGS", "STEPS", "LR", "Message", "Variant", "ARRIVAL_MISTAKES", "UPDATE_MISTAKES", "PUSH_MISTAKES",
           "check_release", "check_max_staleness", "State", "STATES", "RELEASE_MISTAKES", "release_variant",
           "largest_staleness", "BOUND_SIZES", "BOUND_MISTAKES"]

# (workers W, servers S). (3, 2) first: its messages read best (a factor 3 is unmistakable, 23 parameters do not
# split evenly in 2); then one server, more workers, and as many servers as workers.
CONFIGS = ((3, 2), (2, 1), (4, 1), (3, 3))
STEPS = 4
LR = 0.5
SIZES = (4, 3, 2)          # the MLP: 4 inputs -> 3 hidden (tanh) -> 2 outputs: 23 parameters
BATCH = 5                  # samples per worker and step
_HEADER_TAG = 7_000_001    # the checker's header before each message (the student's tag is kept for the payload)
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)


# --- The workload and the reference -------------------------------------------------------------------------------

def make_model() -> nn.Sequential:
    """The float64 MLP every rank builds (the same on every rank: a fixed seed)."""
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(), nn.Linear(SIZES[1], SIZES[2])).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def make_batches(worker: int, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Worker ``worker``'s batches, one (x, y) per step."""
    batches = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 + 37 * step + worker)
        x = torch.randn(BATCH, SIZES[0], generator=g, dtype=torch.float64)
        batches.append((x, torch.randn(BATCH, SIZES[-1], generator=g, dtype=torch.float64)))
    return batches


def _flat(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


class _Gradients:
    """∇L_w(θ) on worker w's batch of a step, computed in this process."""

    def __init__(self, workers: int, steps: int = STEPS):
        self.model, self.batches = make_model(), [make_batches(w, steps) for w in range(workers)]

    def __call__(self, worker: int, step: int, flat: torch.Tensor) -> torch.Tensor:
        vector_to_parameters(flat.clone(), self.model.parameters())
        self.model.zero_grad()
        x, y = self.batches[worker][step]
        F.mse_loss(self.model(x), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])


def sync_sgd(workers: int, steps: int = STEPS, lr: float = LR) -> list[torch.Tensor]:
    """The reference: the parameters θ_0 .. θ_steps of data-parallel SGD with all-reduce (the mean of the
    workers' gradients), computed in one process."""
    grad, thetas = _Gradients(workers, steps), [_flat(make_model())]
    for step in range(steps):
        thetas.append(thetas[-1] - lr * torch.stack([grad(w, step, thetas[-1]) for w in range(workers)]).mean(0))
    return thetas


# --- Inside the launched processes: send and recv, watched --------------------------------------------------------

class _Roles(NamedTuple):
    """Who is who: ranks 0 .. S − 1 the servers, S .. S + W − 1 the workers; n parameters."""
    W: int
    S: int
    n: int

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return shard_bounds(self.n, self.S)

    def short(self, rank: int) -> str:
        return f"server {rank}" if rank < self.S else f"worker {rank - self.S}"

    def name(self, rank: int) -> str:
        return f"{self.short(rank)} (rank {rank})"

    def layout(self) -> str:
        servers = "rank 0" if self.S == 1 else f"ranks 0 .. {self.S - 1}"
        return (f"the {plural(self.S, 'server')} are {servers} (server s is rank s), the {self.W} workers ranks "
                f"{self.S} .. {self.S + self.W - 1} (worker w is rank servers + w = {self.S} + w)")


class Message(NamedTuple):
    """One message as a rank saw it: ``op`` "send" or "recv", the other rank, its ``step`` (the how-manieth message
    between the two ranks) and its values."""
    op: str
    peer: int
    step: int
    values: torch.Tensor


class _Board(Board):
    """The harness's board, each rank's state with its message counts and the step of the message it waits in."""

    def __init__(self, path: str, rank: int, world_size: int, watch: "_Watch"):
        super().__init__(path, rank, world_size)
        self.watch = watch

    def set(self, state: str, **info) -> None:
        w = self.watch
        step = w.calls[info["index"]].info.get("step") if "index" in info else None
        super().set(state, sent=dict(w.sent), received=dict(w.received), step=step, **info)


class _Watch(Watch):
    """This rank's send/recv (the student's and labkit.comm's): checked before they go, each message after a
    header that says its size, recorded as :class:`Message`."""

    def __init__(self, roles: _Roles, deadline: float, path: str):
        self.roles, self.me = roles, dist.get_rank()
        self.sent, self.received = Counter(), Counter()       # messages to / from each peer (receives: when posted)
        self.messages: list[Message] = []
        self._posting: Call | None = None
        super().__init__(("send", "recv", "isend", "irecv"), deadline=deadline, comm_too=True,
                         board=_Board(path, self.me, roles.S + roles.W, self))
        self.p2p, self.headers = dict(self.real), []                        # torch's own isend and irecv
        self.real["isend"], self.real["irecv"] = self._isend, self._irecv   # a header first

    def rank_name(self, rank: int) -> str:
        return self.roles.name(rank)

    def _fail(self, message: str) -> NoReturn:
        """When every rank makes the same mistake, the lowest rank's report comes first (the launcher names the
        earliest error): the message reads "worker 0", not whichever was fastest."""
        time.sleep(0.05 * self.me)
        raise CheckFailed(message)

    # before a message goes

    def on_call(self, call: Call, args: dict) -> None:
        roles, me, name = self.roles, self.me, self.roles.name(self.me)
        sending, server = call.op in ("send", "isend"), me < roles.S
        key = "dst" if sending else "src"
        extra = [k for k in ("group", "group_dst", "group_src") if args.get(k) not in (None, dist.group.WORLD)]
        if extra:
            self._fail(f"{name} called dist.{call.op} with {', '.join(extra)}: this exercise uses the default group "
                       f"and global ranks (dst=, src=).")
        peer = args.get(key)
        if sending or peer is not None:
            args[key] = peer = call.peer = self._peer(peer, call.op, key)
        tensor, w = args.get("tensor"), None if peer is None else peer - roles.S
        if server:
            self._dtype(tensor, f"the shard it sends to worker {w}" if sending else
                        "the buffer it receives a gradient into")
            a, b = roles.bounds[me]
            if sending and tensor.numel() != b - a:
                self._fail(f"{name} sends worker {w} {plural(tensor.numel(), 'element')} at step {self.sent[peer]}, "
                           f"but its shard has {b - a} (elements [{a}, {b})): send the shard itself, "
                           f"dist.send(shard, dst=servers + w).")
            if not sending and tensor.numel() != b - a:
                whose = "a" if w is None else f"worker {w}'s"
                self._fail(f"{name} receives {whose} gradient into a "
                           f"buffer of {plural(tensor.numel(), 'element')}, but its shard (and each worker's "
                           f"gradient shard) has {b - a}: receive into torch.empty_like(shard).")
        elif sending:
            self._dtype(tensor, f"the gradient shard it sends to server {peer}")
            k, pulled = self.sent[peer], self.received[peer]
            if pulled == 0:
                self._fail(f"{name} pushes its gradient of step {k} to server {peer} without having pulled server "
                           f"{peer}'s shard first: every step starts with a pull from every server, "
                           f"dist.recv(flat[a:b], src=s), so that the gradient is computed on the current parameters.")
            if pulled <= k:
                self._fail(f"{name} pushes its gradient of step {k} to server {peer}, but it pulled server {peer}'s "
                           f"shard only {plural(pulled, 'time')} (last for step {pulled - 1}): it computed the "
                           f"gradient of step {k} on stale parameters, those of step {pulled - 1}. The parameters "
                           f"change at every step: in synchronous training every step starts with a pull from every "
                           f"server.")
            self._slice(tensor, peer, f"pushes server {peer} its gradient slice")
        elif peer is not None:
            self._dtype(tensor, f"the buffer it pulls server {peer}'s shard into")
            k = self.received[peer]
            if self.sent[peer] < k:
                self._fail(f"{name} pulls server {peer}'s shard of step {k}, but it has pushed server {peer} only "
                           f"{plural(self.sent[peer], 'gradient')}: its gradient of step {k - 1} never went out. "
                           f"Server {peer} waits for that gradient before it answers the pull of step {k}, so both "
                           f"would wait forever. Every step ends with a push to every server: "
                           f"dist.send(grad[a:b], dst=s).")
            self._slice(tensor, peer, f"pulls server {peer}'s shard into")
        if peer is not None:
            counts = self.sent if sending else self.received
            call.info["step"] = counts[peer]
            counts[peer] += 1
        if sending:
            self.messages.append(Message("send", peer, call.info["step"], tensor.detach().clone()))
        call.phase = self._phase(sending, peer, call.info.get("step"))
        self._posting = call

    def _phase(self, sending: bool, peer: int | None, step: int | None) -> str:
        """What a message is, in the protocol (the harness says "during <this>" when a rank is stuck in it)."""
        S = self.roles.S
        if self.me < S:
            return ("a push from any worker" if peer is None else
                    f"worker {peer - S}'s {'pull' if sending else 'push'} of step {step}")
        if peer is None:
            return f"worker {self.me - S}'s pull from any server"
        return f"worker {self.me - S}'s {'push' if sending else 'pull'} of step {step} {'to' if sending else 'from'} " \
               f"server {peer}"

    def _peer(self, peer, op: str, key: str) -> int:
        roles, me, world = self.roles, self.me, self.roles.S + self.roles.W
        call = f"{roles.name(me)} called dist.{op}({key}={peer!r})"
        if isinstance(peer, torch.Tensor) and peer.numel() == 1:
            peer = int(peer)
        if isinstance(peer, bool) or not isinstance(peer, int):
            self._fail(f"{call}: {key} must be a rank, an int. Here {roles.layout()}.")
        if not 0 <= peer < world:
            self._fail(f"{call}: there are {world} ranks, 0 .. {world - 1}; {roles.layout()}.")
        if peer == me:
            self._fail(f"{call}: that is itself. Here {roles.layout()}.")
        if (peer < roles.S) == (me < roles.S):
            kind = "server" if me < roles.S else "worker"
            self._fail(f"{call}: rank {peer} is {roles.short(peer)}, another {kind}. {kind.capitalize()}s talk only "
                       f"to the {'workers' if kind == 'server' else 'servers'}: {roles.layout()}.")
        return peer

    def _dtype(self, tensor, what: str) -> None:
        name = self.roles.name(self.me)
        if not isinstance(tensor, torch.Tensor):
            self._fail(f"{name}: {what} is a {type(tensor).__name__}, not a tensor.")
        if tensor.dtype != torch.float64:
            self._fail(f"{name}: {what} is a {tensor.dtype} tensor; the parameters and their gradients are "
                       f"torch.float64 (make buffers with torch.empty_like(shard) or slices of the flat vectors).")

    def _slice(self, tensor: torch.Tensor, s: int, verb: str) -> None:
        """A worker's slice for server s must be exactly the server's shard: elements shard_bounds(n, S)[s]."""
        (a, b), n, S, count = self.roles.bounds[s], self.roles.n, self.roles.S, tensor.numel()
        if tensor.dim() == 1 and tensor.stride(0) == 1 and tensor.untyped_storage().nbytes() == n * 8:
            a2, b2 = tensor.storage_offset(), tensor.storage_offset() + count      # a slice of a flat vector
            what = f"flat[{a2}:{b2}] ({plural(count, 'element')})"
        elif count == b - a:
            return
        else:
            a2 = b2 = None
            what = plural(count, "element")
        if (a2, b2) == (a, b):
            return
        overlap = "too: the shards overlap, and those parameters would be pulled from two servers and updated by both"
        gap = "left out: a gap, those parameters would never be pulled or updated"
        before = f"server {s - 1}'s shard" if s else "no shard"
        after = f"server {s + 1}'s shard" if s + 1 < S else "no server's shard (past the end)"
        why = [] if a2 is None else [f"elements [{x}, {y}) are {text}" for x, y, wrong, text in (
            (a2, min(a, b2), a2 < a, f"in {before} {overlap}"), (max(b, a2), b2, b2 > b, f"in {after} {overlap}"),
            (a, min(a2, b), a2 > a, gap), (max(b2, a), b, b2 < b, gap)) if wrong]
        hint = ""
        if (a2, b2) == (a, b + 1):
            hint = " (flat[a:b + 1]: a Python slice already leaves its end out, [a, b) is flat[a:b])"
        elif (a2, b2) == (a + 1, b):
            hint = " (flat[a + 1:b]: the shard starts at a, included)"
        elif n % S and count == n // S:
            hint = (f" ({n} // {S} = {n // S} elements per server: the last {n % S} parameter(s) then belong to no "
                    f"server; shard_bounds gives the first {n % S} server(s) one element more)")
        sentences = "; ".join(why)
        self._fail(f"{self.roles.name(self.me)} {verb} {what}, but server {s} holds elements [{a}, {b}) of the {n} "
                   f"parameters ({plural(b - a, 'element')}: shard_bounds({n}, {S})[{s}] = ({a}, {b}))."
                   + (" " + sentences[:1].upper() + sentences[1:] + hint + "." if why else hint)
                   + " Cut both the pulls and the pushes with a, b = shard_bounds(flat.numel(), servers)[s]: "
                     "flat[a:b] and grad[a:b].")

    # the messages, each after a header

    def _isend(self, tensor, dst, group=None, tag=0, group_dst=None):
        code = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
        header = torch.tensor([tensor.numel(), code], dtype=torch.int64)
        # the header arrives before the message can be received: the message's wait covers it
        self.headers = [w for w in self.headers if not w.is_completed()]
        self.headers.append(self.p2p["isend"](header, dst=dst, tag=_HEADER_TAG))
        return self.p2p["isend"](tensor, dst=dst, tag=tag)

    def _irecv(self, tensor, src=None, group=None, tag=0, group_src=None) -> "_Received":
        header = torch.zeros(2, dtype=torch.int64)
        return _Received(self, self._posting, tensor, tag, header, self.p2p["irecv"](header, src=src, tag=_HEADER_TAG))

    # what a stuck run means here

    def stuck_hints(self, states: dict[int, dict]) -> list[str]:
        out, explained = [], set()
        for r, st in sorted(states.items()):
            peer, k = st.get("peer"), st.get("step")
            if st["state"] != "waiting" or r >= self.roles.S or peer is None or k is None:
                continue
            who, got, n = self.roles.short(peer), st["received"].get(str(peer), 0), len(out)
            if "recv" in st["op"] and st["sent"].get(str(peer), 0) <= k:
                out.append(f"→ server {r} waits for {who}'s gradient of step {k} before it has sent that worker its "
                           f"shard of step {k}, which the worker waits for first: each waits for the other. Every "
                           f"step, a server first sends its shard to every worker, then receives the gradients.")
            if "send" in st["op"] and got < k:
                out.append(f"→ server {r} went on to step {k} without receiving {who}'s gradient of step {k - 1} "
                           f"({plural(got, 'gradient')} from it in all): it must receive the gradient of every "
                           f"worker, w = 0 .. workers − 1, at every step.")
            if len(out) > n:
                explained.add(f"→ {self.roles.name(r)} and ")
        # and the harness's own deductions, but for those explained above and the one about collectives (none here)
        return out + [h for h in super().stuck_hints(states)
                      if not h.startswith(("→ the ranks wait in different", *explained))]


class _Received:
    """A receive whose header was posted: waiting takes the header (who sent what), then the message itself."""

    def __init__(self, watch: _Watch, call: Call, tensor: torch.Tensor, tag: int, header, work):
        self.watch, self.call, self.tensor, self.tag, self.header, self.work = watch, call, tensor, tag, header, work
        self.done = False

    def wait(self, timeout=None) -> bool:
        watch, call, roles, tensor = self.watch, self.call, self.watch.roles, self.tensor
        self.work.wait()
        if call.peer is None:                          # from any rank: the header says who
            call.peer = src = int(self.work._source_rank())
            call.info["step"] = watch.received[src]
            watch.received[src] += 1
            call.phase = watch._phase(False, src, call.info["step"])
        src = call.peer
        count, code = (int(v) for v in self.header)
        dtype = _DTYPES[code] if 0 <= code < len(_DTYPES) else "another dtype"
        if count != tensor.numel() or dtype != tensor.dtype:
            watch._fail(f"{roles.name(watch.me)} receives {call.phase} into a buffer of "
                        f"{plural(tensor.numel(), 'element')} ({tensor.dtype}), but {roles.short(src)} sent "
                        f"{plural(count, 'element')} ({dtype}): the two sides must agree on every message's size.")
        watch.p2p["irecv"](tensor, src=src, tag=self.tag).wait()
        watch.messages.append(Message("recv", src, call.info["step"], tensor.detach().clone()))
        self.done = True
        return True

    def is_completed(self) -> bool:
        return self.done


class _RankResult(NamedTuple):
    messages: list[Message]
    final: torch.Tensor | None     # a server's final shard (what it returned, else the shard it was given)
    returned: str                  # what a server's function returned, in words


def _rank_main(server_fn, worker_fn, workers: int, servers: int, deadline: float, path: str) -> _RankResult:
    rank, model = dist.get_rank(), make_model()
    roles = _Roles(workers, servers, sum(p.numel() for p in model.parameters()))
    watch, final, returned = _Watch(roles, deadline, path), None, ""
    with watch.installed():
        if rank < servers:
            a, b = roles.bounds[rank]
            shard = _flat(model)[a:b].clone()
            got = server_fn(shard, rank, servers, workers, STEPS, LR)
            returned = describe(got)
            final = (got if isinstance(got, torch.Tensor) else shard).detach().clone()
        else:
            worker_fn(model, make_batches(rank - servers), rank - servers, servers)
    watch.returned()
    return _RankResult(watch.messages, final, returned)


# --- The known mistakes: how each is made from labkit's code, and what its numbers are ----------------------------

class Variant(NamedTuple):
    """A known wrong version: ``edits`` (code → replacement, each on one line of labkit's run_server or run_worker:
    the tests build the wrong version with them) and ``formula`` (what its numbers are: the checker compares)."""
    edits: tuple[tuple[str, str], ...]
    formula: Callable


_SEND, _RECV = "comm.send(shard, servers + w)", "comm.recv(grads[w], servers + w)"
_UPDATE = "shard -= lr * torch.stack(grads).mean(dim=0)"


def _on_arrival(scale: str) -> tuple[tuple[str, str], ...]:
    return ((_SEND, f"{_SEND}; g = torch.empty_like(shard); comm.recv(g, servers + w); shard -= lr * g{scale}"),
            (_RECV, "pass"), (_UPDATE, "pass"))


# formula(shard at the step's start, the gradients of the workers served before, lr, W) -> what the next one got
ARRIVAL_MISTAKES = (
    Mistake("update-on-arrival-full", Variant(_on_arrival(""), lambda cur, before, lr, W: cur - lr * sum(before)),
            "The parameters it sent worker {w} had already moved by {who} of step {t} (lr · g each)."),
    Mistake("update-on-arrival", Variant(_on_arrival(" / workers"),
                                         lambda cur, before, lr, W: cur - lr * sum(before) / W),
            "The parameters it sent worker {w} had already moved by {who} of step {t} (lr · g / {W} each)."),
)

_LOST = ("the other {others} of the step were lost. Receiving every gradient into the same buffer keeps only the "
         "last one; keep one buffer per worker (grads = [torch.empty_like(shard) for _ in range(workers)]).")
_ONE_BUFFER = (_RECV, "comm.recv(grads[0], servers + w)")

# formula(the step's W gradients, lr) -> the step applied to the shard (a list: one candidate per worker v)
UPDATE_MISTAKES = (
    Mistake("no-step", Variant(((_UPDATE, _UPDATE.replace("-=", "-")),), lambda g, lr: torch.zeros_like(g[0])),
            "the shard did not change: server {s} sent the same parameters again. The update was not applied to "
            "the tensor that is sent and returned (computed into another variable, or not at all)."),
    Mistake("one-buffer", Variant((_ONE_BUFFER, (_UPDATE, "shard -= lr * grads[0]")),
                                  lambda g, lr: [-lr * x for x in g]),
            "the step is −lr · g with g worker {v}'s gradient alone: " + _LOST),
    Mistake("one-buffer-mean", Variant((_ONE_BUFFER, (_UPDATE, "shard -= lr * grads[0] / workers")),
                                       lambda g, lr: [-lr * x / len(g) for x in g]),
            "the step is −lr · g / {W} with g worker {v}'s gradient alone: " + _LOST),
    Mistake("sum", Variant(((_UPDATE, _UPDATE.replace("mean", "sum")),), lambda g, lr: -lr * torch.stack(g).sum(0)),
            "the step is {W} times too large (measured factor {W} = W, the number of workers): server {s} applied "
            "the sum of the {W} gradients, not their mean (or each gradient with the full learning rate as it "
            "arrived)."),
    Mistake("mean-over-W", Variant(((_UPDATE, _UPDATE + " / workers"),),
                                   lambda g, lr: -lr * torch.stack(g).mean(0) / len(g)),
            "the step is {W} times too small (measured factor 1/{W}): the mean divided by W once more."),
    Mistake("ascent", Variant(((_UPDATE, _UPDATE.replace("-=", "+=")),), lambda g, lr: lr * torch.stack(g).mean(0)),
            "the step went the wrong way (measured factor −1): shard += lr · mean climbs the loss."),
)

_COPY = "vector_to_parameters(flat, model.parameters())"
_GRAD = "grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])"

# formula(g(k, θ): the worker's gradient of step k at θ, its pulls θ of every step, θ_0, k) -> what it pushes at k
PUSH_MISTAKES = (
    Mistake("not-copying", Variant(((_COPY, "pass"),), lambda g, pulls, theta0, k: g(k, theta0)),
            "It is the gradient at the initial parameters θ_0: the shards worker {w} pulled never reached the model, "
            "which still holds θ_0. Copy the pulled parameters into the model (set_flat_params(model, flat)) after "
            "the pulls and before the forward pass."),
    Mistake("copies-after-backward",
            Variant(((_COPY, "pass"), (_GRAD, f"{_GRAD}; {_COPY.replace('flat,', 'flat.clone(),')}")),
                    lambda g, pulls, theta0, k: g(k, pulls[k - 1] if k else theta0)),
            "It is the gradient at the parameters of step {prev}, one step behind: the model got the pulled "
            "parameters after the gradient was computed. Pull, copy into the model, then forward and backward."),
    Mistake("no-zero-grad", Variant((("model.zero_grad()", "pass"),),
                                    lambda g, pulls, theta0, k: sum(g(j, pulls[j]) for j in range(k + 1))),
            "It is the sum of worker {w}'s gradients of steps 0 .. {t}: backward adds to .grad, and the gradients "
            "were never zeroed. Call model.zero_grad() before each backward."),
    Mistake("summed-loss", Variant((("F.mse_loss(model(x), y).backward()",
                                     "F.mse_loss(model(x), y, reduction='sum').backward()"),),
                                   lambda g, pulls, theta0, k: BATCH * SIZES[-1] * g(k, pulls[k])),
            f"It is {BATCH * SIZES[-1]} times the expected gradient, {BATCH} samples × {SIZES[-1]} outputs: the "
            f"squared errors summed, not averaged. The loss is F.mse_loss(model(x), y), their mean."),
)


# --- In the parent: the run replayed step by step -----------------------------------------------------------------

def _factor(want: torch.Tensor, got: torch.Tensor) -> float | None:
    """c when got = c · want (want not zero), else None."""
    den = float((want * want).sum())
    c = float((got * want).sum()) / den if den and got.shape == want.shape else None
    return c if c is not None and close(c * want, got) else None


def _first_diff(want: torch.Tensor, got: torch.Tensor, offset: int = 0, what: str = "element") -> str:
    (i,), e, g = first_mismatch(want, got)
    e, g = fmt_pair(e, g)
    return f"{what} {offset + i} is {g}, expected {e}"


class _Run:
    """One run's messages on the servers' side: pulls[s][w][t] (what server s sent worker w at step t), grads[s][w][t]
    (what it received from worker w at step t); each server's final shard and what its function returned."""

    def __init__(self, results: list[_RankResult], workers: int, servers: int):
        self.W, self.S = workers, servers
        self.pulls = [[[] for _ in range(workers)] for _ in range(servers)]
        self.grads = [[[] for _ in range(workers)] for _ in range(servers)]
        for s in range(servers):
            for m in sorted(results[s].messages, key=lambda m: m.step):
                (self.pulls if m.op == "send" else self.grads)[s][m.peer - servers].append(m.values)
        self.finals, self.returned = [r.final for r in results[:servers]], [r.returned for r in results[:servers]]

    def pulled(self, w: int, t: int) -> torch.Tensor:
        return torch.cat([self.pulls[s][w][t] for s in range(self.S)])

    def pushed(self, w: int, t: int) -> torch.Tensor:
        return torch.cat([self.grads[s][w][t] for s in range(self.S)])


def _run_problem(results: list[_RankResult], W: int, S: int, names: dict) -> str | None:
    grad, theta0 = _Gradients(W), _flat(make_model())
    roles, head, run = _Roles(W, S, theta0.numel()), _head(W, S), _Run(results, W, S)
    for s in range(S):                  # every pair talked once per step in each direction
        for w in range(W):
            for kind, got, verb in (("shard", run.pulls[s][w], "sent"), ("gradient", run.grads[s][w], "received")):
                if len(got) != STEPS:
                    return (f"{head}: server {s} {verb} worker {w} {plural(len(got), 'message')} in {STEPS} steps "
                            f"(expected one {kind} per step, {STEPS} in all).")
    cur = [theta0[a:b].clone() for a, b in roles.bounds]          # what each server should hold now
    for t in range(STEPS):
        for s in range(S):              # the pulls of step t: every worker gets every server's current shard
            for w in range(W):
                if not close(cur[s], run.pulls[s][w][t]):
                    return f"{head}: " + _pull_problem(run, roles, s, w, t, cur, names)
        for w in range(W):              # the pushes: the gradient of the worker's batch at the parameters it pulled
            want = grad(w, t, run.pulled(w, t))
            if not close(want, run.pushed(w, t)):
                return f"{head}: " + _push_problem(run, roles, grad, w, t, want, theta0)
        for s in range(S):              # the update: −lr × the mean of what the server received
            cur[s] = cur[s] - LR * torch.stack([run.grads[s][w][t] for w in range(W)]).mean(dim=0)
    for s, (a, b) in enumerate(roles.bounds):
        final = run.finals[s]
        if final.shape != cur[s].shape:
            return (f"{head}: {names['server']} on server {s} returned {run.returned[s]}; it must return the shard "
                    f"after the last step, a tensor of shape {tuple(cur[s].shape)} (the given `return shard`).")
        if not close(cur[s], final) and close(theta0[a:b], final) and run.returned[s] == "None":
            return (f"{head}: server {s}'s final shard is still the initial one: {names['server']} returned None, "
                    f"and the shard it was given never changed (the updates went to new tensors, shard = shard - "
                    f"...). End with `return shard` (given), or update the shard in place (shard -= ...).")
        if not close(cur[s], final):
            where = (f"server {s}'s final shard, after the update of the last step (step {STEPS - 1}), is wrong: "
                     f"{_first_diff(cur[s], final, a, 'parameter')}")
            return f"{head}: " + _update_problem(where, run, s, STEPS - 1, run.pulls[s][0][STEPS - 1], final)
    return None


def _pull_problem(run: _Run, roles: _Roles, s: int, w: int, t: int, cur: list, names: dict) -> str:
    W, (a, _), got = run.W, roles.bounds[s], run.pulls[s][w][t]
    where = (f"server {s} answered worker {w}'s pull of step {t} with the wrong parameters: "
             f"{_first_diff(cur[s], got, a, 'parameter')}")
    if w > 0 and close(cur[s], run.pulls[s][0][t]):          # the shard changed between two workers of one step
        before = [run.grads[s][v][t] for v in range(w)]
        m = find_mistake(ARRIVAL_MISTAKES, lambda m: close(m.variant.formula(cur[s], before, LR, W), got))
        who = "worker 0's gradient" if w == 1 else f"the gradients of workers 0 .. {w - 1}"
        moved = " " + m.says.format(w=w, who=who, t=t, W=W) if m else ""
        return (f"{where}. It sent worker 0 the right shard of step {t}, then changed its shard before answering "
                f"worker {w}'s pull of the same step: it applied a gradient before all {W} gradients of the step had "
                f"arrived, so the workers of one step computed on different parameters (an asynchronous server, not "
                f"a synchronous one).{moved} Synchronous: send the shard to every worker, then receive all {W} "
                f"gradients, then apply their mean, once per step.")
    if t == 0:
        return (f"{where}. At step 0 the workers must get the initial parameters, the shard {names['server']} was "
                f"given: change it only after the gradients of step 0 are in.")
    if all(close(got, run.pulls[s][v][t]) for v in range(W)):
        return _update_problem(f"{where}. The update of step {t - 1} is wrong (what server {s} sent at step {t - 1} "
                               f"and the gradients it received then were right)", run, s, t - 1,
                               run.pulls[s][0][t - 1], got)
    return (f"{where}; and server {s} sent different parameters to different workers at step {t}. Every worker of a "
            f"step must get the same shard.")


def _update_problem(where: str, run: _Run, s: int, t: int, prev: torch.Tensor, got: torch.Tensor) -> str:
    W, grads, step = run.W, [run.grads[s][w][t] for w in range(run.W)], got - prev
    fix = (f"Each step: shard -= lr · (1/W) Σ_w g_w, the mean of the {W} gradients received, applied once (in place, "
           f"or returned: the given `return shard` hands back the final shard).")
    which = {}

    def matches(m: Mistake) -> bool:         # a formula may give one candidate per worker: remember which
        out = m.variant.formula(grads, LR)
        which["v"] = next((v for v, x in enumerate(out if isinstance(out, list) else [out]) if close(x, step)), None)
        return which["v"] is not None

    m = find_mistake(UPDATE_MISTAKES, matches)
    if m:
        return f"{where}: {m.says.format(s=s, v=which['v'], W=W, others=plural(W - 1, 'gradient'))} {fix}"
    c = _factor(-LR * torch.stack(grads).mean(dim=0), step)
    if c is not None:
        return (f"{where}: the step is {fmt_number(round(c, 9))} times the expected one, −lr · mean (lr = "
                f"{fmt_number(LR)}): the learning rate? {fix}")
    return f"{where}. {fix}"


def _push_problem(run: _Run, roles: _Roles, grad: _Gradients, w: int, t: int, want: torch.Tensor,
                  theta0: torch.Tensor) -> str:
    pushed = run.pushed(w, t)
    where = (f"worker {w} pushed the wrong gradient at step {t}: {_first_diff(want, pushed)} (the gradient of its "
             f"batch at the parameters it pulled for step {t})")
    wrong = [s for s, (a, b) in enumerate(roles.bounds) if not close(want[a:b], pushed[a:b])]
    if len(wrong) < run.S:                      # some servers got the right part
        (a, b), part = roles.bounds[wrong[0]], pushed[slice(*roles.bounds[wrong[0]])]
        for a2 in range(0, roles.n - (b - a) + 1):
            if a2 != a and close(want[a2:a2 + b - a], part):
                return (f"{where}. Server {wrong[0]} got elements [{a2}, {a2 + b - a}) of the gradient instead of its "
                        f"own [{a}, {b}): push each server the slice shard_bounds gives it, grad[a:b].")
        return (f"{where}. Only the part pushed to server {'s ' if len(wrong) > 1 else ''}{and_list(wrong)} is "
                f"wrong; the others are right.")
    pulls = [run.pulled(w, k) for k in range(STEPS)]

    def g(k: int, theta: torch.Tensor) -> torch.Tensor:
        return grad(w, k, theta)

    m = find_mistake(PUSH_MISTAKES, lambda m: all(close(m.variant.formula(g, pulls, theta0, k), run.pushed(w, k))
                                                  for k in range(t, STEPS)))
    if m:
        return f"{where}. {m.says.format(w=w, t=t, prev=t - 1)}"
    c = _factor(want, pushed)
    if c is not None:
        return (f"{where}. It is {fmt_number(round(c, 9))} times the expected gradient: the loss is "
                f"F.mse_loss(model(x), y) on this worker's batch of the step, and the worker pushes its gradient as it "
                f"is (the servers average).")
    return f"{where}."


# --- The checks ---------------------------------------------------------------------------------------------------

def _head(workers: int, servers: int) -> str:
    return f"on {workers} workers and {plural(servers, 'server')} ({servers + workers} processes)"


def _success(configs) -> str:
    return (f"on (W workers, S servers) = {and_list(f'({w}, {s})' for w, s in configs)}, {STEPS} steps each: every "
            f"step every worker pulled the same current shard from every server, pushed the gradient of its batch at "
            f"those parameters, and every server applied the mean of the W gradients once; the parameters after "
            f"every step equal data-parallel SGD with all-reduce within 1e-9")


def _check(server_fn, worker_fn, configs, timeout: float, name: str, task: str | None, names: dict,
           wrong: str, right: str) -> None:
    """One launch of S + W processes per configuration, stopping at the first with a problem."""
    __tracebackhide__ = True
    for workers, servers in configs:
        with board_dir() as path:
            try:
                results = run_on_ranks(_rank_main, server_fn, worker_fn, workers, servers, 0.5 * timeout, path,
                                       world_size=servers + workers, timeout=timeout, name=name, task=task,
                                       device="cpu")
                problem = _run_problem(results, workers, servers, names)
            except CheckFailed as err:   # found while the messages went (or a hang, an exception)
                problem = f"{_head(workers, servers)}: {err}"
        if problem:
            fail(f"{name} {wrong} {problem}")
    passed(f"{name} {right} " + _success(configs))


def check_server(run_server: Callable, *, configs=CONFIGS, timeout: float = 10.0) -> None:
    """Check exercise 7a: ``run_server(shard, server, servers, workers, steps, lr)`` with labkit's workers
    (:func:`labkit.param_server.run_worker`), on every configuration (W, S) of ``configs``."""
    __tracebackhide__ = True
    name = need_function(run_server, "check_server(run_server)")
    _check(run_server, labkit_worker, configs, timeout, name, "7a", {"server": name, "worker": "labkit's worker"},
           "(with labkit's workers) is wrong", "is correct with labkit's workers")


def check_worker(run_worker: Callable, *, configs=CONFIGS, timeout: float = 10.0) -> None:
    """Check exercise 7b: ``run_worker(model, batches, worker, servers)`` with labkit's servers
    (:func:`labkit.param_server.run_server`), on every configuration (W, S) of ``configs``."""
    __tracebackhide__ = True
    name = need_function(run_worker, "check_worker(run_worker)")
    _check(labkit_server, run_worker, configs, timeout, name, "7b", {"server": "labkit's server", "worker": name},
           "(with labkit's servers) is wrong", "is correct with labkit's servers")


def _not_written(server_fn, worker_fn, err: NotImplementedError) -> NotImplementedError:
    """The stub that stopped the check, and the other function too if it is not written yet either (probed here:
    outside a launched process any real send or receive fails at once, a stub raises first)."""
    probes = (("7a", getattr(server_fn, "__name__", "7a"),
               lambda: server_fn(torch.zeros(3, dtype=torch.float64), 0, 1, 1, 1, LR)),
              ("7b", getattr(worker_fn, "__name__", "7b"), lambda: worker_fn(make_model(), make_batches(0, 1), 0, 1)))
    return not_written(probes, err, "7")


def check_parameter_server(run_server: Callable, run_worker: Callable, *, configs=CONFIGS,
                           timeout: float = 10.0) -> None:
    """Check exercises 7a and 7b together: your servers and your workers, on every configuration of ``configs``."""
    __tracebackhide__ = True
    names = {"server": need_function(run_server, "check_parameter_server(run_server, run_worker)"),
             "worker": need_function(run_worker, "check_parameter_server(run_server, run_worker)")}
    name = f"{names['server']} and {names['worker']}"
    try:
        _check(run_server, run_worker, configs, timeout, name, None, names, "are wrong together",
               "are correct together")
    except NotImplementedError as err:
        raise _not_written(run_server, run_worker, err) from None


# 7c. Bounded staleness: a design task, checked on constructed states and in a real run
# ============================================================================================
# The task: release(waiting, clock, active, tau, message) -> the waiting workers that may start their next step
# now; labkit's bounded server (labkit.param_server.serve, release=...) calls it after every message, as it calls
# its own rule, ssp_release, the reference. Then max_staleness(W, tau), the largest staleness a push can have,
# checked against every order of messages of labkit's server (an exhaustive search).

class State(NamedTuple):
    """What the server knows when it calls release: which workers wait, each worker's clock (pushes received),
    the workers still training, the bound τ, and the message it just handled."""
    what: str
    waiting: list
    clock: list
    active: set
    tau: int
    message: tuple


STATES = (
    State("at the start", [1], [0, 0, 0], {0, 1, 2}, 1, ("pull", 1)),
    State("a fast worker one step ahead", [1], [0, 1, 0], {0, 1, 2}, 1, ("pull", 1)),
    State("a fast worker two steps ahead", [1], [0, 2, 1], {0, 1, 2}, 1, ("pull", 1)),
    State("the slowest worker pushed", [1, 2], [1, 2, 2], {0, 1, 2}, 1, ("push", 0)),
    State("τ = 0, one worker still on its step", [0, 1], [1, 1, 0], {0, 1, 2}, 0, ("pull", 1)),
    State("τ = 0, the last push of the step", [0, 1], [1, 1, 1], {0, 1, 2}, 0, ("push", 2)),
    State("worker 2 has done its 3 steps", [0], [5, 4, 3], {0, 1}, 1, ("pull", 0)),
    State("τ = 0, worker 2 has done its 2 steps", [0], [3, 3, 2], {0, 1}, 0, ("push", 1)),
    State("one worker left", [1], [4, 5, 3], {1}, 0, ("pull", 1)),
    State("4 workers, τ = 2, a push of the slowest", [2, 1], [3, 5, 6, 4], {0, 1, 2, 3}, 2, ("push", 0)),
)

_LOST = (" Its pushes would be computed on parameters that miss more of the slowest worker's updates than the "
         "bound allows.")
# Edits of labkit's ssp_release (its source, one line each), and what the student is told: {head} is the first
# state where the answer is wrong, with expected and got.
RELEASE_MISTAKES = (
    Mistake("the fastest worker", (("min(clock[v] for v in active)", "max(clock[v] for v in active)"),),
            "{head} You compare a worker's clock with the fastest worker's, not the slowest's: every worker is "
            "level with or behind the fastest, so every pull is answered at once, as in async mode, and the "
            "staleness has no bound." + _LOST),
    Mistake("< instead of <=", (("<= staleness", "< staleness"),),
            "{head} A worker exactly τ steps ahead of the slowest is held back (< τ where ≤ τ is meant): with "
            "τ = 1 the server admits as the synchronous one does, and with τ = 0 no worker may ever start (the run "
            "deadlocks at step 0). A worker may be τ steps ahead."),
    Mistake("finished workers too", (("min(clock[v] for v in active)", "min(clock)"),),
            "{head} The slowest clock is taken over every worker, finished ones too. A worker that has done all its "
            "steps pushes no more: its clock stops there, and once the others are τ steps past it they wait for it "
            "forever. When the workers have different numbers of steps the run deadlocks at the end."),
    Mistake("only the pull that arrived",
            (("if clock[w] - slowest", "if message == ('pull', w) and clock[w] - slowest"),),
            "{head} A worker is let go only when its own pull arrives: one held back is never looked at again, yet a "
            "push of the slowest worker moves the slowest clock. After every message, decide again for every "
            "waiting worker; otherwise they wait forever (a deadlock)."),
)


def release_variant(mistake: Mistake) -> Callable:
    """labkit's ssp_release with the mistake's edits: the wrong version (the tests use it too)."""
    import inspect
    import textwrap
    from labkit import param_server
    source = textwrap.dedent(inspect.getsource(param_server.ssp_release))
    for code, replacement in mistake.variant:
        if source.count(code) != 1:
            raise ValueError(f"{code!r} is not once in ssp_release")
        source = source.replace(code, replacement)
    namespace = {"__name__": "__main__"}        # travels by value into launched processes, as a notebook's
    exec(compile(source, f"<{mistake.name}>", "exec"), namespace)
    return namespace["ssp_release"]


def _state_text(s: State, W: int | None = None) -> str:
    kind, w = s.message
    return (f"τ = {s.tau}, clocks {list(s.clock)} (pushes received from workers 0 .. {len(s.clock) - 1}), still "
            f"training {sorted(s.active)}, waiting {list(s.waiting)}, just after worker {w}'s {kind}")


def _read_release(result, s: State, name: str) -> list:
    head = f"{name} ({_state_text(s)})"
    if not isinstance(result, (list, tuple, set, frozenset)):
        fail(f"{head} returned {describe(result)}: return a list of the waiting workers that may start now "
             f"([] when none)")
    for w in result:
        if isinstance(w, bool) or not isinstance(w, int):
            fail(f"{head} returned {describe(result)}: the workers are ints (0 .. {len(s.clock) - 1})")
        if w not in s.waiting:
            fail(f"{head} returned worker {w}, which has no pull waiting: release only workers of `waiting`")
    return sorted(set(result))


def _why(s: State, expected: list, got: list) -> str:
    """Which worker is wrong and why, in clocks."""
    slowest = min(s.active, key=lambda v: (s.clock[v], v))
    lag = f"the slowest worker still training is worker {slowest}, clock {s.clock[slowest]}"
    for w in sorted(set(got) - set(expected)):
        return (f"worker {w} (clock {s.clock[w]}) is {s.clock[w] - s.clock[slowest]} steps ahead ({lag}), more "
                f"than τ = {s.tau}: it must wait.")
    w = sorted(set(expected) - set(got))[0]
    stuck = (" Every worker still training is waiting: nobody can push any more, the run deadlocks."
             if set(s.active) <= set(s.waiting) and not got else "")
    ahead = plural(s.clock[w] - s.clock[slowest], 'step')
    return (f"worker {w} (clock {s.clock[w]}) is {ahead} ahead ({lag}), at most τ = {s.tau}: holding it back makes "
            f"it wait needlessly.{stuck}")


def _decide(fn: Callable, s: State, name: str) -> list:
    got = call_student(fn, list(s.waiting), list(s.clock), set(s.active), s.tau, s.message, name=name, task="7c(i)",
                       where=f"({_state_text(s)})")
    return _read_release(got, s, name)


def _state_problem(release: Callable, states, name: str, prefix: str) -> str | None:
    """The first state where ``release`` differs from ssp_release, with the known mistake it matches if any."""
    from labkit.param_server import ssp_release
    gots = [_decide(release, s, name) for s in states]
    for s, got in zip(states, gots):
        expected = sorted(ssp_release(list(s.waiting), list(s.clock), set(s.active), s.tau, s.message))
        if got != expected:
            head = (f"{prefix}: {s.what} ({_state_text(s)}): expected to release {expected}, got "
                    f"{got}: {_why(s, expected, got)}")
            m = find_mistake(RELEASE_MISTAKES, lambda m: all(
                sorted(release_variant(m)(list(t.waiting), list(t.clock), set(t.active), t.tau, t.message)) == g
                for t, g in zip(states, gots)))
            return m.says.format(head=head) if m else head
    return None


# The real run: W = 3 workers on one server, worker 0 slowed, worker 2 with fewer steps (it finishes first).
RUN_STEPS = (6, 6, 3)
RUN_TAUS = (1, 0)
RUN_SLOW = 4.0
RUN_COMPUTE_MS = 3.0
RUN_TIMEOUT = 1.5          # the server's: this long without a message, it names the workers it waits for and stops


def _loss(model, x, y):
    return F.mse_loss(model(x), y)


def _run_rank(release: Callable, taus, steps, slow: float, compute_ms: float, timeout: float) -> list:
    """One rank of the real runs, one per τ, each on a fresh gloo group (a receive left posted by a stopped server
    cannot take the next run's messages). The server records every call of ``release``: its state and answer."""
    from labkit.param_server import serve, work
    rank, W = dist.get_rank(), dist.get_world_size() - 1
    out = []
    for tau in taus:
        group = dist.new_group(backend="gloo")
        model = make_model()
        if rank == 0:
            calls = []

            def recorded(waiting, clock, active, staleness, message):
                state = State("", list(waiting), list(clock), set(active), staleness, message)
                got = release(waiting, clock, active, staleness, message)
                calls.append((state, sorted(got) if isinstance(got, (list, tuple, set, frozenset)) else got))
                return got

            result = serve(_flat(model), 0, 1, W, mode="bounded", lr=0.05, staleness=tau, timeout=timeout,
                           group=group, release=recorded)
            out.append((tau, [tuple(u) for u in result.updates], result.stopped, calls))
        else:
            w = rank - 1
            batches = make_batches(w, steps[w])
            r = work(model, w, 1, lambda w, t: batches[t], _loss, steps=steps[w], compute_ms=compute_ms,
                     slow=slow if w == 0 else 1.0, group=group)
            out.append((tau, r.steps_done, r.stopped))
        stopped = torch.tensor([float(rank == 0 and bool(out[-1][2]))])
        comm.all_reduce(stopped, op=dist.ReduceOp.MAX)          # a deadlocked run: no second one
        if stopped.item():
            break
    return out


def _bounded_run_problem(release: Callable, results: list, name: str, steps) -> str | None:
    """The server's recorded calls against ssp_release, then the run's end, stalenesses and admissions."""
    W = len(steps)
    for i, (tau, updates, stopped, calls) in enumerate(results[0]):
        where = (f"in a real run (W = {W} workers on one server, τ = {tau}, worker 0 {fmt_number(RUN_SLOW)} times "
                 f"slower, steps per worker {list(steps)})")
        states = [s._replace(what=f"the server's call {k + 1} (of {len(calls)})") for k, (s, _) in enumerate(calls)]
        if stopped:
            s, got = calls[-1]
            problem = _state_problem(release, states, name, "The first call where it differs from labkit's rule")
            head = (f"{name} deadlocked {where}: the server heard nothing for {fmt_number(RUN_TIMEOUT)} s and stopped "
                    f"the run. Its last call was {_state_text(s)}, and {name} released {got}.")
            return f"{head} {problem}" if problem else head
        problem = _state_problem(release, states, name, f"{name} is wrong {where}")
        if problem:
            return problem
        done = [r[i][1] for r in results[1:]]
        if done != list(steps):
            return f"{name} {where}: the workers did {done} steps, not {list(steps)}."
        bound = largest_staleness(W, tau)[0]
        worst = max(updates, key=lambda u: u[3])
        if worst[3] > bound:
            return (f"{name} {where}: worker {worst[1]}'s push of step {worst[2]} had staleness {worst[3]}, more "
                    f"than any order of messages allows with labkit's rule ({bound}).")
        for k, (_, w, t, _) in enumerate(updates):      # worker w started step t with every other worker still
            for v in range(W):                          # training at most τ steps behind
                before = sum(1 for u in updates[:k] if u[1] == v)
                if v != w and before < min(t - tau, steps[v]):
                    return (f"{name} {where}: worker {w}'s push of step {t} came when worker {v} had pushed only "
                            f"{before} step(s): worker {w} started step {t} more than τ = {tau} steps ahead.")
    return None


@functools.lru_cache(maxsize=None)
def largest_staleness(workers: int, tau: int, steps: int | None = None) -> tuple:
    """The largest staleness of a push over EVERY order of messages of labkit's bounded server (one server,
    ``workers`` workers of ``steps`` steps each, 2τ + 2 by default; labkit's rule ssp_release): (staleness, witness)
    with witness = (worker, its step, the clocks when it pulled, the clocks when it pushed). A search over states."""
    from labkit.param_server import ssp_release
    steps = 2 * tau + 2 if steps is None else steps
    # a worker: ("fly", c) its pull on the way; ("wait", c) its pull waiting; ("run", c, clocks at its pull);
    # ("bye",) its done on the way; ("off",) finished. c: its clock, the pushes the server has from it.

    def clocks(states) -> tuple:
        return tuple(s[1] if s[0] in ("fly", "wait", "run") else steps for s in states)

    def answered(states, message) -> tuple:                  # the server, after every message
        waiting = [v for v, s in enumerate(states) if s[0] == "wait"]
        if not waiting:
            return states
        c = clocks(states)
        go = set(ssp_release(waiting, list(c), {v for v, s in enumerate(states) if s[0] != "off"}, tau, message))
        return tuple(("run", s[1], c) if v in go else s for v, s in enumerate(states))

    @functools.lru_cache(maxsize=None)
    def best(states) -> tuple:
        out, c = (-1, None), clocks(states)
        for w, s in enumerate(states):
            nxt = list(states)
            if s[0] == "fly":
                nxt[w] = ("wait", s[1])
                out = max(out, best(answered(tuple(nxt), ("pull", w))), key=lambda r: r[0])
            elif s[0] == "bye":
                nxt[w] = ("off",)
                out = max(out, best(answered(tuple(nxt), ("done", w))), key=lambda r: r[0])
            elif s[0] == "run":
                nxt[w] = ("fly", s[1] + 1) if s[1] + 1 < steps else ("bye",)
                here = (sum(c) - sum(s[2]), (w, s[1], s[2], c))
                out = max(out, here, best(answered(tuple(nxt), ("push", w))), key=lambda r: r[0])
        return out

    return best(tuple(("fly", 0) for _ in range(workers)))


def check_release(release: Callable, *, states=STATES, run: bool = True) -> None:
    """Check exercise 7c: ``release(waiting, clock, active, tau, message)``, the waiting workers that may start their
    next step now. Against labkit's rule (:func:`labkit.param_server.ssp_release`) on the constructed ``states``;
    then (``run``) in real runs of labkit's bounded server with your rule: W = 3 workers on one server, worker 0
    slowed, worker 2 with fewer steps, τ = 1 then τ = 0: every call of your rule, the run's end, every staleness
    (within the largest any order of messages gives with labkit's rule) and every admission."""
    __tracebackhide__ = True
    name = need_function(release, "check_release")
    problem = _state_problem(release, states, name, f"{name} is wrong on constructed states")
    if problem:
        fail(problem)
    if run:
        results = run_on_ranks(_run_rank, release, RUN_TAUS, RUN_STEPS, RUN_SLOW, RUN_COMPUTE_MS, RUN_TIMEOUT,
                               world_size=1 + len(RUN_STEPS), timeout=30.0, name=name, task="7c(i)", device="cpu")
        problem = _bounded_run_problem(release, results, name, RUN_STEPS)
        if problem:
            fail(problem)
    ran = (f"; and in real runs of labkit's server (W = {len(RUN_STEPS)}, worker 0 slowed, steps {list(RUN_STEPS)}, "
           f"τ = {' and '.join(map(str, RUN_TAUS))}) every call agreed, the runs ended, no staleness exceeded the "
           f"largest possible and no worker started more than τ steps ahead" if run else "")
    passed(f"{name} releases the same workers as labkit's rule on {len(states)} constructed states (a fast worker, "
           f"the slowest one's push, τ = 0, finished workers, one worker left){ran}")


# The largest staleness: checked against the exhaustive search of labkit's server, on small sizes.
BOUND_SIZES = ((2, 0), (2, 1), (3, 0), (3, 1), (2, 2), (4, 0), (3, 2))      # (W, τ)

BOUND_MISTAKES = (     # formulas for the student's function; says: {head} the first size, expected and got
    Mistake("τ", lambda W, tau: tau,
            "{head} τ bounds the clocks (steps), not the staleness, which counts pushes: every push of every other "
            "worker between your pull and your push moves the version."),
    Mistake("one other worker", lambda W, tau: 2 * tau + 1,
            "{head} This is the staleness with one other worker; each of the W − 1 others pushes in between."),
    Mistake("the others only ahead", lambda W, tau: (W - 1) * (tau + 1),
            "{head} You count the others' steps up to τ ahead of the pulling worker, but when it pulls they may be "
            "τ steps behind it: they go on from there."),
    Mistake("the others only behind", lambda W, tau: (W - 1) * tau,
            "{head} The others can do more steps than the τ that separate them from the pulling worker."),
    Mistake("the worker itself too", lambda W, tau: W * (2 * tau + 1),
            "{head} A worker's own pushes never fall between its pull and its push: count the W − 1 others."),
)


def _witness(W: int, tau: int) -> str:
    stale, (w, step, pulled, pushed) = largest_staleness(W, tau)
    return (f"labkit's server reaches {stale}: worker {w} pulled for its step {step} when the clocks were "
            f"{list(pulled)} (version {sum(pulled)}) and pushed it when they were {list(pushed)} (version "
            f"{sum(pushed)})")


def check_max_staleness(max_staleness: Callable, *, sizes=BOUND_SIZES) -> None:
    """Check exercise 7c's bound: ``max_staleness(W, tau)``, the largest staleness a push can have with W workers and
    bound τ on labkit's bounded server. Against an exhaustive search of every order of messages (one server,
    labkit's rule :func:`labkit.param_server.ssp_release`) on every (W, τ) of ``sizes``: equal (a bound that is
    reached: tight)."""
    __tracebackhide__ = True
    name = need_function(max_staleness, "check_max_staleness")
    for W, tau in sizes:
        got = call_student(max_staleness, W, tau, name=name, task="7c(ii)", where=f"for W = {W}, τ = {tau}")
        if isinstance(got, bool) or not isinstance(got, int):
            fail(f"{name}({W}, {tau}) returned {describe(got)}: a staleness is a number of pushes, an int")
        want = largest_staleness(W, tau)[0]
        if got == want:
            continue
        why = (f"a push can be {plural(want, 'version')} stale, more than your bound" if got < want else
               f"no order of messages gives more than {want}: your bound is not tight")
        head = f"{name}({W}, {tau}) = {got}, expected {want}: {why}; {_witness(W, tau)}."
        m = find_mistake(BOUND_MISTAKES, lambda m: all(m.variant(*size) == call_student(
            max_staleness, *size, name=name, task="7c(ii)") for size in sizes))
        fail(m.says.format(head=head) if m else head)
    passed(f"{name} is the largest staleness on (W, τ) = {and_list(f'({W}, {tau})' for W, tau in sizes)}: every order "
           f"of messages of labkit's bounded server, searched, reaches it and none exceeds it")
