"""Train labkit's GPT a few steps under one way of sharding it, and measure what each rank kept and sent.

Used by lesson 8's live runs, ``python -m labkit.bench.fsdp`` and the tests, so that all three run the same
thing. Every rank calls :func:`train` (under ``labkit.launch``, ``torchrun`` or ``accelerate launch``):

    strategy       who keeps what (Ψ parameters, N ranks)                          sends per step per rank
    "ddp"          everything on every rank (labkit.ddp.BucketedDDP)                2Ψ(N−1)/N   all-reduce
    "zero1"        optimizer state and its master chunk: Ψ/N each (labkit.zero)     2Ψ(N−1)/N   reduce-scatter, all-gather
    "zero2"        also the gradients                                               2Ψ(N−1)/N
    "fsdp"         also the parameters, gathered one unit at a time (labkit.fsdp)   3Ψ(N−1)/N
    "torch_ddp", "torch_zero1", "torch_fsdp": PyTorch's DistributedDataParallel, ZeroRedundancyOptimizer (with
    DDP) and FSDP2's fully_shard, for comparison (their messages are not recorded by labkit.comm)

The data: at step k the global batch is N·b sequences drawn from a generator seeded with ``seed + k``; rank r
takes rows r·b … (r+1)·b. ``train("single", ...)`` on one process with ``batch = N·b`` therefore takes the same
steps as any strategy on N ranks.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from labkit import comm
from labkit.cost_model import ring_bytes_sent
from labkit.memory import Memory, _storage_bytes
from labkit.models import GPT, GPTConfig
from labkit.timeline import Event

__all__ = ["STRATEGIES", "RunResult", "train", "batch_at"]

STRATEGIES = ("single", "ddp", "zero1", "zero2", "fsdp", "torch_ddp", "torch_zero1", "torch_fsdp")


@dataclass
class RunResult:
    """What one rank saw. ``memory``: bytes this rank kept after the last step by kind (activations: what the
    last forward saved); ``peak_parameters``: the most parameter bytes it held at once during the last step
    (FSDP: its shards plus the units gathered at that moment); ``sent_per_step``: the bytes a ring puts on the
    wire from this rank in the last step (labkit's strategies; 0 for torch's, whose messages are not seen)."""
    strategy: str
    rank: int
    losses: list = field(default_factory=list)       # this rank's loss at each step
    params: dict = field(default_factory=dict)       # name -> the whole parameter after the last step
    memory: Memory | None = None
    peak_parameters: int = 0
    sent_per_step: float = 0.0
    step_seconds: list = field(default_factory=list)
    timeline: list = field(default_factory=list)     # the last step: each block's forward and backward, each message
    cuda_peak: int = 0                               # on a GPU: torch.cuda.max_memory_allocated() in the last step


def batch_at(step: int, rows: int, config: GPTConfig, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randint(0, config.vocab_size, (rows, seq_len), generator=g)
    return x, torch.roll(x, -1, dims=1)             # predict the next token (cyclically): learnable


def _nbytes(tensors) -> int:
    """Bytes of the tensors' storages, each storage once (views share one)."""
    return sum(_storage_bytes(tensors).values())


def _state_bytes(optimizer) -> int:
    return _nbytes(v for s in optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0)


class _Build:
    """The wrapped model, the optimizer, the step, and how to read back whole parameters and kept bytes."""

    def __init__(self, strategy: str, model: GPT, lr: float, bucket_cap_mb: float, prefetch: bool):
        make = lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.1)   # noqa: E731
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.model, self.zero, self.fsdp, self.torch_fsdp = model, None, None, False
        if strategy in ("single", "torch_ddp", "torch_zero1", "ddp"):
            if strategy == "ddp":
                from labkit.ddp import BucketedDDP
                self.model = BucketedDDP(model, bucket_cap_mb=bucket_cap_mb)
            elif strategy != "single":
                self.model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
            if strategy == "torch_zero1":
                from torch.distributed.optim import ZeroRedundancyOptimizer
                self.optimizer = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=lr,
                                                         weight_decay=0.1)
            else:
                self.optimizer = make(model.parameters())
        elif strategy in ("zero1", "zero2"):
            from labkit.zero import ZeroOptimizer
            self.zero = self.optimizer = ZeroOptimizer(model.parameters(), make, stage=int(strategy[-1]),
                                                       bucket_cap_mb=bucket_cap_mb)
        elif strategy == "fsdp":
            from labkit.fsdp import FSDP
            self.fsdp = self.model = FSDP(model, prefetch=prefetch)
            self.optimizer = make(self.fsdp.shards())
        elif strategy == "torch_fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(comm.device().type, (dist.get_world_size(),))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.torch_fsdp, self.optimizer = True, make(model.parameters())
        else:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")

    def parameter_bytes(self) -> int:
        """Parameter bytes this rank holds now (FSDP: shards + gathered units; a freed buffer has 0 bytes)."""
        if self.fsdp is not None:
            return _nbytes(self.fsdp.shards()) + sum(u.buffer.untyped_storage().nbytes() for u in self.fsdp.units)
        return _nbytes(self.model.parameters())

    def parameter_storages(self) -> set:
        """The addresses of the storages that hold parameters now (what the forward saves of them is not an
        activation). torch's FSDP gathers into buffers of its own: its activations are not told apart."""
        if self.fsdp is not None:
            return {t.untyped_storage().data_ptr() for t in [*self.fsdp.shards(), *(u.buffer for u in self.fsdp.units)]}
        if self.torch_fsdp:
            return set()
        return {p.untyped_storage().data_ptr() for p in self.model.parameters()}

    def kept(self, activations: int) -> Memory:
        if self.zero is not None:
            grads = _nbytes(p.grad for p in self.zero.params) + _nbytes(b.master.grad for b in self.zero.buckets)
            return Memory(parameters=self.parameter_bytes(), gradients=grads,
                          optimizer=_state_bytes(self.zero.optimizer),
                          master=_nbytes(b.master for b in self.zero.buckets), activations=activations)
        params = self.fsdp.shards() if self.fsdp is not None else list(self.model.parameters())
        grads = [p.grad for p in params]
        optimizer = getattr(self.optimizer, "optim", self.optimizer)      # ZeroRedundancyOptimizer's local one
        return Memory(parameters=self.parameter_bytes(), gradients=_nbytes(grads), optimizer=_state_bytes(optimizer),
                      master=0, activations=activations)

    def whole_parameters(self) -> dict:
        if self.fsdp is not None:
            out = {}
            for unit in self.fsdp.units:
                unit.gather()
                out.update({self.names[id(p)]: p.detach().clone() for p in unit.params})
                unit.free()
            return out
        module = getattr(self.model, "module", self.model)
        if self.torch_fsdp:
            return {n: p.full_tensor().detach() for n, p in module.named_parameters()}
        return {n: p.detach().clone() for n, p in module.named_parameters()}


def _time_blocks(model: GPT, rank: int, events: list) -> list:
    """Hooks that record each block's forward and backward as timeline events (into ``events``)."""
    def opened(kind, label):
        events.append(Event(kind, time.perf_counter(), float("nan"), label, rank))

    def closed(*_):
        events[-1].end = time.perf_counter()

    hooks = []
    for i, block in enumerate(model.blocks):
        hooks += [block.register_forward_pre_hook(lambda *_, i=i: opened("forward", f"block {i}")),
                  block.register_forward_hook(closed),
                  block.register_full_backward_pre_hook(lambda *_, i=i: opened("backward", f"block {i}")),
                  block.register_full_backward_hook(closed)]
    return hooks


def _message_events(events, rank: int) -> list:
    return [Event(e.op, e.start, e.end if e.end is not None else e.start, e.label, rank, e.bytes) for e in events]


class _PeakSampler(list):
    """A comm.record() list that also notes the parameter bytes held each time a message starts: they only grow
    when an all-gather refills a unit, so the largest sample is the step's peak."""

    def __init__(self, build: _Build):
        super().__init__()
        self.build, self.peak = build, build.parameter_bytes()

    def append(self, event) -> None:
        super().append(event)
        self.peak = max(self.peak, self.build.parameter_bytes())


def train(strategy: str, config: GPTConfig, *, steps: int = 3, batch: int = 2, seq_len: int | None = None,
          lr: float = 1e-2, dtype: torch.dtype = torch.float64, seed: int = 0, bucket_cap_mb: float = 25.0,
          prefetch: bool = False, timeline: bool = False) -> RunResult:
    """``steps`` AdamW steps of labkit's GPT (built from ``seed`` on every rank) under ``strategy``, on the
    ranks of the default process group, ``batch`` sequences per rank. See the module's table. ``timeline``:
    record the last step's block forwards and backwards (hooks) beside its messages, in ``RunResult.timeline``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    rank, n = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if strategy != "single" and not dist.is_initialized():
        raise RuntimeError(f"strategy {strategy!r} needs a process group (run it under labkit.launch)")
    seq_len = seq_len or config.block_size
    device = comm.device() if dist.is_initialized() else torch.device("cpu")
    torch.manual_seed(seed)
    model = GPT(config).to(device=device, dtype=dtype)
    build = _Build(strategy, model, lr, bucket_cap_mb, prefetch)
    out = RunResult(strategy, rank)
    for step in range(steps):
        x, y = (t[rank * batch:(rank + 1) * batch].to(device).clone()     # its own storage: counted as b·s
                for t in batch_at(step, n * batch, config, seq_len, seed))
        last = step == steps - 1
        saved: dict = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in build.parameter_storages():
                saved[st.data_ptr()] = st.nbytes()
            return t

        events = _PeakSampler(build) if last else []
        compute: list = []
        hooks = _time_blocks(model, rank, compute) if last and timeline else []
        if last and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with comm.record(into=events):
            build.optimizer.zero_grad()
            counting = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            with counting if last else contextlib.nullcontext():
                loss = build.model(x, y)[1]
            loss.backward()
            build.optimizer.step()
        for hook in hooks:
            hook.remove()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.step_seconds.append(time.perf_counter() - start)
        out.losses.append(loss.item())
        if last:
            out.sent_per_step = ring_bytes_sent(events, n)
            out.peak_parameters = events.peak
            out.memory = build.kept(sum(saved.values()))
            out.timeline = compute + _message_events(events, rank)
            out.cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    out.params = build.whole_parameters()
    return out
