"""Collectives built from point-to-point messages only (``isend``/``irecv``, ``send``/``recv``).

    ring_all_reduce(t)          reduce-scatter + all-gather round the ring (labkit.ring's schedule)
    bidirectional_ring_all_reduce(t)  half the tensor round the ring each way, at the same time
    ring_reduce_scatter(t)      rank i ends with the reduced chunk i
    ring_all_gather(t)          every rank's tensor, concatenated, on every rank
    naive_all_reduce(t)         what a central server does: everything to rank 0, the sum back out
    tree_all_reduce(t)          binomial-tree reduce to rank 0, then binomial-tree broadcast
    broadcast(t, src)           binomial tree

All work in place on any shape (contiguous or not), like ``torch.distributed``'s, and accept the ops
"sum", "avg" and "max" (or ``dist.ReduceOp.SUM``/``AVG``/``MAX``). Every message goes through
:mod:`labkit.comm`, so ``with comm.record() as events:`` sees each one, and ``comm.traffic(events)``
counts the bytes this rank really sent and received. A ring round is ``comm.exchange(send, dst,
recv, src)``: the send and the receive start together, so a ring, where every rank sends and
receives at once, cannot deadlock (empty chunks are not sent: both ends know the sizes).

Before any data moves, the ranks exchange a few numbers describing their call (op, dtype, shape)
round the same ring, so that a mismatch is the same clear ``ValueError`` on every rank instead of a
hang or garbage (``check=False`` skips this for benchmarks of the bare algorithm). That check, the
reused receive buffer and the trace recorder live in :mod:`labkit.collectives_support`: this file is
the algorithms.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist

from labkit import comm
from labkit.collectives_support import OPS, Recorder, preflight, resolve_op, scratch_buffer
from labkit.ring import (ALL_GATHER, REDUCE_SCATTER, all_gather_rounds, all_reduce_rounds, chunk_bounds,
                         reduce_scatter_rounds)

__all__ = ["reduce_scatter_phase", "all_gather_phase", "ring_all_reduce", "bidirectional_ring_all_reduce",
           "ring_reduce_scatter", "ring_all_gather", "naive_all_reduce", "tree_all_reduce", "broadcast",
           "provenance_input", "decode_contributions", "OPS"]



def _add(mine: torch.Tensor, received: torch.Tensor) -> None:
    mine.add_(received)


def _maximum(mine: torch.Tensor, received: torch.Tensor) -> None:
    torch.maximum(mine, received, out=mine)


# ---------------------------------------------------------------------------------------------
# The two phases of the ring (Exercise 2 asks for these two functions)
# ---------------------------------------------------------------------------------------------

def reduce_scatter_phase(chunks: list, rank: int, world_size: int, exchange: Callable,
                         combine: Callable = _add, shift: int = 0,
                         scratch: torch.Tensor | None = None) -> None:
    """N-1 rounds; in round j rank i sends chunk (i-j) mod N right, receives chunk (i-j-1) mod N from
    the left and combines it into its own copy. Afterwards rank i holds chunk (i+1) mod N reduced
    over all ranks. ``chunks`` are views into one buffer, changed in place.
    ``scratch``: an optional 1-D buffer (the chunks' dtype, at least the largest chunk's size) for
    the incoming chunks; by default one is allocated for this call."""
    if scratch is None:  # one buffer for every round
        scratch = torch.empty_like(max(chunks, key=torch.numel))
    for rnd in reduce_scatter_rounds(world_size, shift):     # ring.py's schedule, round by round
        send, recv = rnd.sent_by(rank), rnd.received_by(rank)
        buffer = scratch[:chunks[recv.chunk].numel()]
        exchange(chunks[send.chunk], send.receiver, buffer, recv.sender)
        combine(chunks[recv.chunk], buffer)


def all_gather_phase(chunks: list, rank: int, world_size: int, exchange: Callable, shift: int = 1) -> None:
    """N-1 rounds; in round j rank i sends chunk (i+1-j) mod N right and receives chunk (i-j) mod N
    from the left straight into its own copy (overwrite: the incoming chunk is already complete)."""
    for rnd in all_gather_rounds(world_size, shift):         # ring.py's schedule, round by round
        send, recv = rnd.sent_by(rank), rnd.received_by(rank)
        exchange(chunks[send.chunk], send.receiver, chunks[recv.chunk], recv.sender)


# ---------------------------------------------------------------------------------------------
# The collectives
# ---------------------------------------------------------------------------------------------

def _flat_work_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view of the tensor's elements if they are contiguous, else a flat copy (copied back
    by the caller)."""
    return tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)


def _chunks(flat: torch.Tensor, world_size: int) -> list:
    return [flat[a:b] for a, b in chunk_bounds(flat.numel(), world_size)]


def ring_all_reduce(tensor: torch.Tensor, op: str | dist.ReduceOp = "sum", *,
                    trace: list | None = None, check: bool = True,
                    reduce_scatter: Callable = reduce_scatter_phase,
                    all_gather: Callable = all_gather_phase) -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place, round the ring, and return it.

    ``trace``: a list that receives one record per round: phase, round, rank, sent_to, sent_chunk,
    received_from, and ``chunks``: clones of this rank's chunks after the round (see
    :func:`provenance_input` to read them as "which ranks are summed in").
    ``reduce_scatter`` / ``all_gather``: the two phases, replaceable (Exercise 2 plugs its own in).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    op = resolve_op(tensor, op, "ring_all_reduce", check, _gather_equal_sized)
    flat = _flat_work_copy(tensor)
    chunks = _chunks(flat, world_size)
    exchange = comm.exchange
    combine = _maximum if op == "max" else _add
    if trace is None and reduce_scatter is reduce_scatter_phase:
        reduce_scatter(chunks, rank, world_size, exchange, combine,
                       scratch=scratch_buffer(flat.dtype, max(c.numel() for c in chunks), flat.device))
        all_gather(chunks, rank, world_size, exchange)
    elif trace is None:  # a replacement phase (Exercise 2) has the textbook signature
        reduce_scatter(chunks, rank, world_size, exchange, combine)
        all_gather(chunks, rank, world_size, exchange)
    else:
        rec = Recorder(exchange, chunks, rank, REDUCE_SCATTER, trace)
        reduce_scatter(chunks, rank, world_size, rec, combine)
        rec.finish()
        rec = Recorder(exchange, chunks, rank, ALL_GATHER, trace)
        all_gather(chunks, rank, world_size, rec)
        rec.finish()
    if op == "avg":
        flat.div_(world_size)
    if not tensor.is_contiguous():  # flat was a copy
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def bidirectional_ring_all_reduce(tensor: torch.Tensor, op: str | dist.ReduceOp = "sum", *,
                                  left_rounds: list | None = None, check: bool = True) -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place, round the ring in both directions at once, and return it.

    The first half of the flattened tensor (``chunk_bounds(M, 2)``) goes round the ring to the right
    (labkit.ring's schedule), the second half round the ring to the left: ``all_reduce_rounds(N,
    direction=-1)``, or ``left_rounds``, any 2(N-1) rounds in which every rank sends to its left
    neighbour (Exercise 2c). In each round every rank sends one chunk of each half, one to each
    neighbour, all four messages started together: a link is full-duplex, so it carries half the
    one-way ring's elements in each direction at the same time.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    op = resolve_op(tensor, op, "bidirectional_ring_all_reduce", check, _gather_equal_sized)
    right = all_reduce_rounds(world_size)
    left = all_reduce_rounds(world_size, direction=-1) if left_rounds is None else list(left_rounds)
    if len(left) != len(right):
        raise ValueError(f"left_rounds has {len(left)} rounds; the ring takes 2(N-1) = {len(right)}")
    flat = _flat_work_copy(tensor)
    (a, b), (_, c) = chunk_bounds(flat.numel(), 2)
    halves = (_chunks(flat[a:b], world_size), _chunks(flat[b:c], world_size))
    combine = _maximum if op == "max" else _add
    for rounds in zip(right, left):  # round t of both rings together
        messages, merges = [], []
        for chunks, rnd in zip(halves, rounds):
            send, recv = rnd.sent_by(rank), rnd.received_by(rank)
            mine = chunks[recv.chunk]
            into = mine if rnd.phase == ALL_GATHER else torch.empty_like(mine)  # all-gather: overwrite
            messages += [("recv", into, recv.sender), ("send", chunks[send.chunk], send.receiver)]
            if rnd.phase == REDUCE_SCATTER:
                merges.append((mine, into))
        # One batch: with N = 2 both neighbours are the same rank, and its two messages are matched in
        # the order both ranks post them (right ring's first).
        comm._p2p(messages).wait()
        for mine, received in merges:
            combine(mine, received)
    if op == "avg":
        flat.div_(world_size)
    if not tensor.is_contiguous():  # flat was a copy
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def ring_reduce_scatter(tensor: torch.Tensor, op: str | dist.ReduceOp = "sum", *,
                        check: bool = True) -> torch.Tensor:
    """Reduce-scatter round the ring: returns this rank's chunk ``rank`` of the flattened tensor,
    reduced over all ranks (a view into ``tensor``, whose other chunks hold partial sums).
    With N dividing M this equals ``dist.reduce_scatter_single`` (formerly ``reduce_scatter_tensor``)'s output."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    op = resolve_op(tensor, op, "ring_reduce_scatter", check, _gather_equal_sized)
    if not tensor.is_contiguous():
        raise ValueError("ring_reduce_scatter returns a view into its input: pass a contiguous tensor")
    flat = tensor.view(-1)
    chunks = _chunks(flat, world_size)
    # shift=-1: rank i ends with chunk i (torch's convention) instead of chunk i+1.
    reduce_scatter_phase(chunks, rank, world_size, comm.exchange, _maximum if op == "max" else _add, shift=-1,
                         scratch=scratch_buffer(flat.dtype, max(c.numel() for c in chunks), flat.device))
    if op == "avg":
        chunks[rank].div_(world_size)
    return chunks[rank]


def _gather_equal_sized(local: torch.Tensor, tag: int = 0) -> torch.Tensor:
    """Every rank's ``local`` end to end, round the ring (``tag``: the pre-flight's messages are tagged)."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    out = torch.empty(world_size * local.numel(), dtype=local.dtype, device=local.device)
    chunks = list(out.view(world_size, -1).unbind(0))
    chunks[rank].copy_(local.reshape(-1))
    exchange = functools.partial(comm.exchange, tag=tag)
    all_gather_phase(chunks, rank, world_size, exchange, shift=0)  # rank i starts with chunk i
    return out


def ring_all_gather(tensor: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape everywhere), stacked along a new first dimension, on every
    rank: ``dist.all_gather_single`` (formerly ``all_gather_into_tensor``) round the ring."""
    if check:
        preflight(tensor, "sum", "ring_all_gather", _gather_equal_sized)
    out = _gather_equal_sized(tensor)
    return out.view(dist.get_world_size(), *tensor.shape)


def naive_all_reduce(tensor: torch.Tensor, op: str | dist.ReduceOp = "sum", *, root: int = 0,
                     check: bool = True) -> torch.Tensor:
    """The central server: every rank sends its whole tensor to ``root``, which reduces and sends
    the result back to every rank. The root receives and sends (N-1)·M elements: its load grows with N."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    op = resolve_op(tensor, op, "naive_all_reduce", check, _gather_equal_sized)
    flat = _flat_work_copy(tensor)
    if rank == root:
        incoming = [torch.empty_like(flat) for _ in range(world_size - 1)]
        peers = [r for r in range(world_size) if r != root]
        requests = [comm.irecv(buf, src) for buf, src in zip(incoming, peers)]
        for req, buf in zip(requests, incoming):  # combine in rank order: deterministic
            req.wait()
            (_maximum if op == "max" else _add)(flat, buf)
        if op == "avg":
            flat.div_(world_size)
        for dst in peers:
            comm.send(flat, dst)
    else:
        comm.send(flat, root)
        comm.recv(flat, root)
    if not tensor.is_contiguous():  # flat was a copy
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def _tree_reduce(flat, root, combine):
    """Binomial tree: in step k, ranks whose relative number has bit k set send to the rank 2^k
    below and drop out; after log2(N) steps the root holds the reduction."""
    rank, n = dist.get_rank(), dist.get_world_size()
    vr = (rank - root) % n
    buf = torch.empty_like(flat)
    mask = 1
    while mask < n:
        if vr & mask:
            comm.send(flat, (vr - mask + root) % n)
            return
        if vr + mask < n:
            comm.recv(buf, (vr + mask + root) % n)
            combine(flat, buf)
        mask <<= 1


def _tree_broadcast(flat, root):
    """Binomial tree: receive once from the parent, then send to children 2^k above, largest first."""
    rank, n = dist.get_rank(), dist.get_world_size()
    vr = (rank - root) % n
    mask = 1
    while mask < n:
        if vr & mask:
            comm.recv(flat, (vr - mask + root) % n)
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:
        if vr + mask < n:
            comm.send(flat, (vr + mask + root) % n)
        mask >>= 1


def tree_all_reduce(tensor: torch.Tensor, op: str | dist.ReduceOp = "sum", *,
                    check: bool = True) -> torch.Tensor:
    """Binomial-tree reduce to rank 0, then binomial-tree broadcast: 2·ceil(log2 N) steps of M
    elements each. Few rounds (good for small messages), but whole tensors in every step."""
    world_size = dist.get_world_size()
    op = resolve_op(tensor, op, "tree_all_reduce", check, _gather_equal_sized)
    flat = _flat_work_copy(tensor)
    _tree_reduce(flat, 0, _maximum if op == "max" else _add)
    if dist.get_rank() == 0 and op == "avg":
        flat.div_(world_size)
    _tree_broadcast(flat, 0)
    if not tensor.is_contiguous():  # flat was a copy
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0, *,
              check: bool = True) -> torch.Tensor:
    """Rank ``src``'s tensor on every rank (in place), down a binomial tree: ceil(log2 N) steps."""
    world_size = dist.get_world_size()
    if not (isinstance(src, int) and 0 <= src < world_size):
        raise ValueError(f"src must be a rank in 0..{world_size - 1}, not {src!r}")
    if check:
        preflight(tensor, "sum", "broadcast", _gather_equal_sized)
    flat = _flat_work_copy(tensor)
    _tree_broadcast(flat, src)
    if not tensor.is_contiguous():  # flat was a copy
        tensor.copy_(flat.view(tensor.shape))
    return tensor


# ---------------------------------------------------------------------------------------------
# Provenance: inputs whose sums say which ranks were added in
# ---------------------------------------------------------------------------------------------

PROVENANCE_BASE = 16


def provenance_input(rank: int, world_size: int, numel: int) -> torch.Tensor:
    """An int64 tensor full of 16**rank. Any sum of such inputs is exact, and its base-16 digits
    count each rank's contribution: 16**0 + 16**2 = 0x101 means "ranks 0 and 2, once each"."""
    if world_size > 15:
        raise ValueError("provenance inputs are exact for at most 15 ranks")
    return torch.full((numel,), PROVENANCE_BASE ** rank, dtype=torch.int64)


def decode_contributions(value: int, world_size: int) -> dict:
    """``{rank: count}`` of the contributions summed into one provenance value (zero counts left out).

    Rank r's count is the r-th base-16 digit, so it reads correctly while every count is below 16.
    A count of 16 or more carries into the next rank's digit and cannot be told apart from a
    different valid sum (16 contributions of rank 0 read as one of rank 1). Only values that no
    sum of counts below 16 can produce, negative or at least 16**world_size, are detected: they give
    ``{'unreadable': value}``. A correct ring counts every rank once; a check that must also catch
    large over-counts cannot rely on the digits alone."""
    value = int(value)
    if value < 0 or value >= PROVENANCE_BASE ** world_size:
        return {"unreadable": value}
    counts = {}
    for r in range(world_size):
        value, digit = divmod(value, PROVENANCE_BASE)
        if digit:
            counts[r] = digit
    return counts
