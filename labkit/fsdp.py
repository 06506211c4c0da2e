"""ZeRO stage 3 / FSDP from scratch: the parameters are sharded too, and gathered only while they are used.

ZeRO 1 and 2 (labkit.zero) shard the optimizer state and the gradients, but every rank still holds every
parameter. Stage 3 (Rajbhandari et al. 2020; PyTorch's FSDP, Zhao et al. 2023) keeps only a 1/N chunk of each
parameter between uses. The model is cut into **units** (for a GPT: each block, plus a root unit with the
embeddings, the final LayerNorm and the head). A unit's parameters are laid end to end in one flat vector padded
to N·c numbers; rank r keeps chunk r (the shard, which the optimizer updates). Then, for every unit:

    forward:   all-gather the unit's flat vector → run the unit → free the gathered parameters
    backward:  all-gather them again → the unit's backward → reduce-scatter its gradients into the shard's
               gradient (the mean over the ranks) → free the gathered parameters and the whole gradients

so at any time a rank holds its shards plus the units in use: Ψ/N + (one or two units) instead of Ψ. The price
is one more all-gather: Ψ (forward) + Ψ (backward) + Ψ (reduce-scatter) = 3Ψ numbers per step, where DDP and
ZeRO 1–2 send 2Ψ. With ``prefetch=True`` the next unit's all-gather is started while the current unit computes.

How the memory is really freed: a unit's parameters are views of one flat buffer, and freeing resizes the
buffer's storage to 0 bytes. The tensors that autograd saved in the forward are views of the same storage, so
after the backward's all-gather refills it they read the right values again (this is what PyTorch's FSDP does).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn

from labkit import comm

__all__ = ["Unit", "FSDP", "gpt_units"]


class Unit:
    """One FSDP unit: some parameters, their shard on this rank and, while in use, their gathered values."""

    def __init__(self, name: str, params: list, group: dist.ProcessGroup | None):
        self.name, self.params, self.group = name, params, group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.offsets = list(itertools.accumulate((p.numel() for p in params), initial=0))[:-1]
        self.numel = sum(p.numel() for p in params)
        self.chunk = -(-self.numel // self.world_size)
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            self.buffer = flat.new_zeros(self.world_size * self.chunk)      # the gathered parameters, padded
            self.buffer[:self.numel] = flat
            start = self.rank * self.chunk
            self.shard = nn.Parameter(self.buffer[start:start + self.chunk].clone())   # what this rank keeps
        for p, offset in zip(params, self.offsets):
            p.data = self.buffer[offset:offset + p.numel()].view_as(p)     # views of the buffer from now on
        self.work, self.ready = None, 0
        self.free()

    @property
    def gathered(self) -> bool:
        return self.buffer.untyped_storage().nbytes() > 0

    def gather(self, async_op: bool = False) -> None:
        """All-gather the shards into the buffer (a no-op while it is gathered or on its way)."""
        if self.gathered or self.work is not None:
            return
        self.buffer.untyped_storage().resize_(self.buffer.numel() * self.buffer.element_size())
        with comm.label(f"{self.name} all-gather"):
            self.work = comm.all_gather_into_tensor(self.buffer, self.shard.detach(), group=self.group, async_op=True)
        if not async_op:
            self.wait()

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None

    def free(self) -> None:
        self.buffer.untyped_storage().resize_(0)

    def reduce_scatter_grads(self) -> None:
        """After the unit's backward: the mean of the ranks' gradients, chunk r into this rank's shard.grad."""
        flat = self.buffer.new_zeros(self.world_size * self.chunk)
        for p, offset in zip(self.params, self.offsets):
            if p.grad is not None:
                flat[offset:offset + p.numel()] = p.grad.reshape(-1)
            p.grad = None                                                   # the whole gradient is not kept
        flat.div_(self.world_size)
        grad = torch.zeros_like(self.shard)
        with comm.label(f"{self.name} reduce-scatter"):
            comm.reduce_scatter_tensor(grad, flat, group=self.group)
        self.shard.grad = grad if self.shard.grad is None else self.shard.grad + grad


def gpt_units(model: nn.Module) -> list[tuple[str, list]]:
    """labkit's GPT cut into units: the root (embeddings, final LayerNorm, tied head) and one unit per block."""
    in_blocks = {id(p) for block in model.blocks for p in block.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    return [("root", root)] + [(f"block {i}", list(block.parameters())) for i, block in enumerate(model.blocks)]


class FSDP(nn.Module):
    """Wrap ``module`` (labkit's GPT by default: :func:`gpt_units`) so that each rank keeps 1/N of every unit.

        model = FSDP(GPT(config))
        opt = torch.optim.AdamW(model.shards(), lr=1e-3)      # the optimizer updates the shards
        loss = model(x, y)[1]; loss.backward(); opt.step(); opt.zero_grad()

    Every rank must build the module with the same parameters (the same seed, or a broadcast first). The units are
    made by ``unit_class`` (a subclass may set its own :class:`Unit`, as exercise 8b does)."""

    unit_class = Unit

    def __init__(self, module: nn.Module, units: list[tuple[str, list]] | None = None, *, prefetch: bool = False,
                 group: dist.ProcessGroup | None = None):
        super().__init__()
        self.module, self.prefetch = module, prefetch
        named = units if units is not None else gpt_units(module)
        self.units = [self.unit_class(name, params, group) for name, params in named]
        self.root, blocks = self.units[0], self.units[1:]
        self._unit_of = {}
        for unit in self.units:
            for p in unit.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
                self._unit_of[p] = unit
        self.blocks = blocks
        for i, (unit, block) in enumerate(zip(blocks, module.blocks)):
            block.register_forward_pre_hook(lambda mod, args, i=i: self._before_forward(i))
            block.register_forward_hook(lambda mod, args, out, i=i: self._after_forward(i, out))

    def shards(self) -> list[nn.Parameter]:
        return [unit.shard for unit in self.units]

    def forward(self, *args, **kwargs):
        self.root.gather()                       # the root stays gathered until its backward is done
        return self.module(*args, **kwargs)

    def _before_forward(self, i: int) -> None:
        self.blocks[i].gather()
        self.blocks[i].wait()
        if self.prefetch and i + 1 < len(self.blocks):
            self.blocks[i + 1].gather(async_op=True)

    def _after_forward(self, i: int, out: torch.Tensor) -> torch.Tensor:
        self.blocks[i].free()
        if out.requires_grad:                    # the backward reaches this unit: gather its parameters first
            out.register_hook(lambda grad, i=i: self._before_backward(i))
        return out

    def _before_backward(self, i: int) -> None:
        self.blocks[i].gather()
        self.blocks[i].wait()
        if self.prefetch and i > 0:
            self.blocks[i - 1].gather(async_op=True)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        unit = self._unit_of[param]
        unit.ready += 1
        if unit.ready == len(unit.params):       # the unit's backward is done
            unit.ready = 0
            unit.reduce_scatter_grads()
            unit.free()
