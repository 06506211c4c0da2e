"""What the collectives of :mod:`labkit.collectives` need besides their algorithms (engineering, not lecture):

- the pre-flight check: before any data moves, the ranks exchange a few numbers describing their call (op,
  dtype, shape), so that a mismatch is the same clear ``ValueError`` on every rank instead of a hang or garbage;
- a receive buffer kept from call to call;
- the recorder behind ``ring_all_reduce(..., trace=...)``: what each round sent and what every chunk held.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from labkit import comm

__all__ = ["OPS", "PREFLIGHT_TAG", "normalise_op", "resolve_op", "preflight", "scratch_buffer", "Recorder"]

OPS = ("sum", "avg", "max")
# Codes exchanged by the pre-flight check. Unknown values are sent as -1, so every rank learns of them.
_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8]
_MAX_DIMS = 8
# The pre-flight's messages carry this tag: comm.traffic(events) (tag 0) counts the payload only.
PREFLIGHT_TAG = 7


class Recorder:
    """Wraps an exchange to record, for a trace, what each round sent and what every chunk held."""

    def __init__(self, exchange: Callable, chunks: list, rank: int, phase: str, trace: list):
        self.exchange, self.chunks, self.rank, self.phase, self.trace = exchange, chunks, rank, phase, trace
        self.round = 0

    def _index(self, t: torch.Tensor) -> int:
        for c, chunk in enumerate(self.chunks):
            if t is chunk:
                return c
        for c, chunk in enumerate(self.chunks):  # an equal view made anew
            if t.numel() and chunk.numel() == t.numel() and chunk.data_ptr() == t.data_ptr():
                return c
        return -1  # a buffer that is not one of the chunks

    def __call__(self, send, dst, recv, src):
        if self.round:  # the previous round's combine is done: record what it left
            self._snapshot()
        self.pending = dict(phase=self.phase, round=self.round, rank=self.rank, sent_to=dst,
                            sent_chunk=self._index(send), received_from=src)
        self.exchange(send, dst, recv, src)
        self.round += 1

    def _snapshot(self):
        self.trace.append(dict(self.pending, chunks=[c.clone() for c in self.chunks]))

    def finish(self):
        if self.round:
            self._snapshot()


def normalise_op(op: object) -> str | None:
    names = {dist.ReduceOp.SUM: "sum", dist.ReduceOp.AVG: "avg", dist.ReduceOp.MAX: "max"}
    if isinstance(op, str):
        return op.lower() if op.lower() in OPS else None
    try:
        return names.get(op)
    except TypeError:  # unhashable: certainly not an op
        return None


def _describe_call(tensor, op) -> torch.Tensor:
    op_name = normalise_op(op)
    code = [OPS.index(op_name) if op_name else -1,
            _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1,
            tensor.dim() if tensor.dim() <= _MAX_DIMS else -1]
    shape = list(tensor.shape)[:_MAX_DIMS] if tensor.dim() <= _MAX_DIMS else []
    return comm.on(torch.tensor(code + shape + [0] * (_MAX_DIMS - len(shape)), dtype=torch.int64))


def _explain(desc: list, name: str) -> str | None:
    """The error every rank raises, or None if the call is valid and the same everywhere."""
    def text(d):
        op = OPS[d[0]] if d[0] >= 0 else "an unknown op"
        dtype = str(_DTYPES[d[1]]).replace("torch.", "") if d[1] >= 0 else "an unsupported dtype"
        shape = tuple(d[3:3 + d[2]]) if d[2] >= 0 else f"more than {_MAX_DIMS} dims"
        return f"op={op}, dtype={dtype}, shape={shape}"
    calls = [text(d) for d in desc]
    listing = "; ".join(f"rank {r}: {c}" for r, c in enumerate(calls))
    bad_op = [r for r, d in enumerate(desc) if d[0] < 0]
    if bad_op:
        return f"{name}: op must be one of {OPS} (or dist.ReduceOp.SUM/AVG/MAX); rank(s) {bad_op} passed another. [{listing}]"
    if any(d[1] < 0 for d in desc):
        return f"{name}: supported dtypes are {[str(d).replace('torch.', '') for d in _DTYPES]}. [{listing}]"
    if any(d[2] < 0 for d in desc):
        return f"{name}: tensors may have at most {_MAX_DIMS} dimensions. [{listing}]"
    if len(set(calls)) > 1:
        return (f"{name}: every rank must pass a tensor of the same shape and dtype, with the same op; "
                f"they differ. [{listing}]")
    if OPS[desc[0][0]] == "avg" and not _DTYPES[desc[0][1]].is_floating_point:
        return f"{name}: op='avg' needs a floating-point tensor (the mean of integers is not an integer). [{listing}]"
    return None


def resolve_op(tensor: torch.Tensor, op: object, name: str, check: bool, gather: Callable) -> str:
    """The op's name ("sum", "avg", "max"); with ``check``, after the pre-flight (see :func:`preflight`)."""
    if check:
        return preflight(tensor, op, name, gather)
    op_name = normalise_op(op)  # unchecked: only this rank's own arguments can be verified
    if op_name is None:
        raise ValueError(f"{name}: op must be one of {OPS} (or dist.ReduceOp.SUM/AVG/MAX), not {op!r}")
    if op_name == "avg" and not tensor.dtype.is_floating_point:
        raise ValueError(f"{name}: op='avg' needs a floating-point tensor")
    return op_name


def preflight(tensor: torch.Tensor, op: object, name: str, gather: Callable) -> str:
    """Exchange call descriptions (``gather``: the collectives' own all-gather of equal-sized tensors);
    raise the same error on every rank if they disagree."""
    mine = _describe_call(tensor, op)
    everyone = gather(mine, PREFLIGHT_TAG)
    error = _explain(everyone.view(dist.get_world_size(), -1).tolist(), name)
    if error:
        raise ValueError(error)
    return normalise_op(op)


_SCRATCH: dict = {}


def scratch_buffer(dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
    """A receive buffer kept from call to call (one per dtype, grown when needed). Allocating a
    fresh multi-megabyte buffer every call costs page faults on first touch: at 16-64 MB that
    was 10-30% of the ring's time on gloo (docs/collectives-benchmark.md)."""
    buf = _SCRATCH.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]
