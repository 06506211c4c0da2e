"""The small GPT trained on N ranks with each remedy for the communication bottleneck, measured as loss against
steps, bytes and wall-clock (lesson 9, issue 18).

    method             what each rank sends                                    module
    "allreduce"        every step: the gradients, 2Ψ(N−1)/N numbers            labkit.ddp_hooks.HookedDDP
    "bf16"             every step: the gradients in 16 bits                    compression.cast_hook
    "topk", "topk-noef"  every step: k values and k indices (ratio of Ψ), with / without error feedback
    "powersgd-r<r>", "powersgd-r<r>-noef"  every step: rank-r factors of each matrix, small tensors whole
    "localsgd-<H>"     every H steps: the parameters (their mean replaces them) labkit.local_sgd's averaging
    "diloco-<H>"       every H steps: the parameters; their mean's distance from the last outer parameters is
                       an outer gradient for Nesterov SGD (Douillard et al. 2023)

Each rank takes AdamW (or SGD) steps on its own batches of the course's text (Botchan, characters: :func:`text_batch`). With
``network`` (a labkit.network.Network) every message is held for its modelled time. The bytes are what a ring
puts on the wire from one rank for the recorded messages (labkit.network.message_cost), so that the methods compare
on the same scale; the loss is the mean over the ranks of each rank's loss at that step (that all-reduce is not
counted).
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from labkit import comm
from labkit.data_parallel import all_reduce_mean_
from labkit.models import GPT, GPTConfig
from labkit.network import message_cost
from labkit.text import CharTokenizer, load_corpus

__all__ = ["Run", "train", "train_each", "parse_method", "text_batch", "VOCAB_SIZE"]

_TOKENS = CharTokenizer.from_text(load_corpus())
VOCAB_SIZE = _TOKENS.vocab_size
_IDS = _TOKENS.encode(load_corpus())


def text_batch(step: int, rows: int, seq_len: int, seed: int = 0):
    """``rows`` windows of the text at offsets drawn from a generator seeded with ``seed + step``, and the next
    character of each position: the global batch of a step (rank r takes rows r·b … (r+1)·b)."""
    g = torch.Generator().manual_seed(seed + step)
    starts = torch.randint(0, _IDS.numel() - seq_len - 1, (rows,), generator=g)
    x = torch.stack([_IDS[s:s + seq_len] for s in starts.tolist()])
    y = torch.stack([_IDS[s + 1:s + seq_len + 1] for s in starts.tolist()])
    return x, y


@dataclass
class Run:
    """One rank's view of a run; lists have one entry per step."""
    method: str
    losses: list = field(default_factory=list)        # mean over the ranks
    bytes: list = field(default_factory=list)         # cumulative bytes sent by this rank
    seconds: list = field(default_factory=list)       # cumulative wall-clock of the steps
    params: torch.Tensor | None = None                # all parameters, flat, after the last step


def parse_method(method: str) -> tuple[str, dict]:
    """"powersgd-r4-noef" → ("powersgd", {"rank": 4, "error_feedback": False}); "diloco-8" → ("diloco", {"H": 8})."""
    m = re.fullmatch(r"(allreduce|bf16|fp16|topk|powersgd|localsgd|diloco)(?:-r(\d+))?(?:-(\d+))?(-noef)?", method)
    if not m:
        raise ValueError(f"unknown method {method!r}: allreduce, bf16, fp16, topk[-noef], powersgd-r<r>[-noef], "
                         f"localsgd-<H>, diloco-<H>")
    kind, rank, every, noef = m.groups()
    options = {"error_feedback": noef is None}
    if kind == "powersgd":
        options["rank"] = int(rank or 1)
    if kind in ("localsgd", "diloco"):
        if every is None:
            raise ValueError(f"{method!r}: say every how many steps the ranks synchronise, e.g. {kind}-8")
        options["H"] = int(every)
    return kind, options


def _ddp(model, kind: str, options: dict, topk_ratio: float, bucket_cap_mb: float):
    from labkit import compression
    from labkit.ddp_hooks import HookedDDP

    ddp = HookedDDP(model, bucket_cap_mb=bucket_cap_mb, rebuild_buckets=False)
    if kind in ("bf16", "fp16"):
        ddp.register_comm_hook(compression.CastState(dtype=getattr(torch, {"bf16": "bfloat16"}.get(kind, "float16"))),
                               compression.cast_hook)
    elif kind == "topk":
        ddp.register_comm_hook(compression.TopKState(ratio=topk_ratio, error_feedback=options["error_feedback"]),
                               compression.topk_hook)
    elif kind == "powersgd":
        ddp.register_comm_hook(compression.PowerSGDState(rank=options["rank"], error_feedback=options["error_feedback"]),
                               compression.powersgd_hook)
    return ddp


class _Outer:
    """The synchronisation of local SGD and DiLoCo: every H steps, average the parameters; DiLoCo then treats
    θ_outer − mean(θ_i) as a gradient of the outer parameters and takes a Nesterov SGD step on it."""

    def __init__(self, params: list, diloco: bool, outer_lr: float, outer_momentum: float):
        self.params, self.diloco = params, diloco
        self.outer = [p.detach().clone().requires_grad_(True) for p in params]
        self.optimizer = (torch.optim.SGD(self.outer, lr=outer_lr, momentum=outer_momentum,
                                          nesterov=outer_momentum > 0) if diloco else None)

    @torch.no_grad()
    def sync(self) -> None:
        all_reduce_mean_(self.params)                        # one all-reduce of Ψ numbers
        if not self.diloco:                                   # local SGD: the mean is the new model
            return
        for o, p in zip(self.outer, self.params):
            o.grad = o - p                                    # the outer gradient: where the workers went, reversed
        self.optimizer.step()
        for o, p in zip(self.outer, self.params):
            p.copy_(o)


def train(method: str, config: GPTConfig, *, steps: int = 40, batch: int = 2, seq_len: int | None = None,
          lr: float = 3e-3, topk_ratio: float = 0.01, outer_lr: float = 0.7, outer_momentum: float = 0.9,
          network=None, seed: int = 0, dtype: torch.dtype = torch.float32, comm_hook: tuple | None = None,
          bucket_cap_mb: float = 25.0, optimizer: str = "adamw") -> Run:
    """``steps`` optimizer steps of labkit's GPT on every rank of the default group with ``method`` (module table);
    ``optimizer``: "adamw", or "sgd" (momentum 0.9), the optimizer error feedback was designed for.
    ``comm_hook``: a (state, hook) pair registered instead of the method's (an exercise's own hook; method
    "allreduce" then only names the run)."""
    kind, options = parse_method(method)
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', not {optimizer!r}")
    if config.vocab_size != VOCAB_SIZE:
        raise ValueError(f"the text has {VOCAB_SIZE} characters: build the GPT with vocab_size={VOCAB_SIZE}")
    rank, n = dist.get_rank(), dist.get_world_size()
    seq_len = seq_len or config.block_size
    device = comm.device()                                   # the process group's: cuda under NCCL, else the CPU
    torch.manual_seed(seed)
    model = GPT(config).to(device=device, dtype=dtype)
    local = kind in ("localsgd", "diloco")
    if comm_hook is not None:
        if local:
            raise ValueError(f"{method!r} sends no gradients: a communication hook has nothing to do")
        from labkit.ddp_hooks import HookedDDP
        net = HookedDDP(model, bucket_cap_mb=bucket_cap_mb, rebuild_buckets=False)
        net.register_comm_hook(*comm_hook)
    else:
        net = model if local else _ddp(model, kind, options, topk_ratio, bucket_cap_mb)
    opt = (torch.optim.AdamW(model.parameters(), lr=lr) if optimizer == "adamw" else
           torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    outer = _Outer(list(model.parameters()), kind == "diloco", outer_lr, outer_momentum) if local else None
    run, sent, clock = Run(method), 0.0, 0.0
    for step in range(steps):
        x, y = (t[rank * batch:(rank + 1) * batch].to(device) for t in text_batch(step, n * batch, seq_len, seed))
        start = time.perf_counter()
        with comm.emulate(network) if network is not None else contextlib.nullcontext(), comm.record() as events:
            opt.zero_grad()
            loss = net(x, y)[1]
            loss.backward()
            opt.step()
            if local and (step + 1) % options["H"] == 0:
                outer.sync()
        clock += time.perf_counter() - start
        sent += sum(message_cost(e.op, n, e.bytes)[1] for e in events)
        mean = comm.on(torch.tensor([loss.item()], dtype=torch.float64))   # a metric: outside the emulation, not counted
        comm.all_reduce(mean)
        run.losses.append(mean.item() / n)
        run.bytes.append(sent)
        run.seconds.append(clock)
    run.params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    return run


def train_each(methods, config: GPTConfig, **options) -> dict[str, Run]:
    """:func:`train` with each method in turn on the same ranks: one ``labkit.launch`` for a whole comparison
    (starting four processes costs more than a short run)."""
    return {method: train(method, config, **options) for method in methods}
