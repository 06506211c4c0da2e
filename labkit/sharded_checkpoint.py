"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes only its shard, and a run on
another number of ranks loads them into its own shards (lesson 10).

With FSDP (lesson 8) no rank holds the whole model, so no rank can ``torch.save`` it without first gathering it
(Ψ numbers through one process: slow, and more memory than any rank has). DCP writes each rank's shards in
parallel with a plan (which rank has which piece of which tensor) in a metadata file; at load time each rank asks
for the pieces its *own* sharding needs, whatever the sharding that wrote them: saved on 4 ranks, loaded on 2.

    save(model, optimizer, path)    every rank calls it; one folder, one file per rank plus ``.metadata``
    load(model, optimizer, path)    every rank calls it, with the model already sharded its own way
    full_state(model, optimizer)    the whole parameters and optimizer state, gathered (to compare runs)

``train_and_save`` and ``load_and_continue`` are the lesson's experiment: a small GPT under FSDP2 trained and saved
on some ranks, loaded on others, one more step on the same global batch on both.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_state_dict)

__all__ = ["save", "load", "full_state", "train_and_save", "load_and_continue"]


def save(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Each rank writes its shards of the parameters and of the optimizer state (DTensors under FSDP2)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path))


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Fill this rank's shards from a DCP checkpoint written by any number of ranks. The state dict asked for has
    this run's sharding: DCP reads, for each of its pieces, the bytes of the saved pieces that overlap it."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Parameters and optimizer state as whole tensors on the CPU (collective: the shards are all-gathered)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    flat = {f"model.{k}": v for k, v in model_state.items()}
    for key, per_param in optimizer_state["state"].items():
        for name, value in per_param.items():
            flat[f"optimizer.{key}.{name}"] = value
    return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else torch.tensor(v)) for k, v in flat.items()}


# ---- the lesson's experiment ---------------------------------------------------------------------------------------

def _sharded_gpt(config, seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from labkit import comm
    from labkit.models import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    mesh = init_device_mesh(comm.device().type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, optimizer, step: int, batch: int = 4) -> None:
    """One step on the global batch of ``step`` (the course's text), split over the ranks."""
    from labkit import comm
    from labkit.compressed_training import text_batch

    rank, n = dist.get_rank(), dist.get_world_size()
    per = batch // n
    x, y = (t[rank * per:(rank + 1) * per].to(comm.device()) for t in text_batch(step, batch, model.config.block_size))
    optimizer.zero_grad()
    model(x, y)[1].backward()
    optimizer.step()


def train_and_save(path: str | os.PathLike, steps: int, config) -> tuple[dict, dict]:
    """``steps`` steps, save, then one more: (the full state saved, the full state after the extra step)."""
    model, optimizer = _sharded_gpt(config, seed=0)
    for step in range(steps):
        _step(model, optimizer, step)
    save(model, optimizer, path)
    saved = full_state(model, optimizer)
    _step(model, optimizer, steps)
    return saved, full_state(model, optimizer)


def load_and_continue(path: str | os.PathLike, steps: int, config) -> tuple[dict, dict]:
    """Another model and optimizer state, sharded over this run's ranks, loaded from ``path``, then the step that
    follows: (the full state loaded, the full state after that step)."""
    model, optimizer = _sharded_gpt(config, seed=1)          # other weights: the load must replace them all
    _step(model, optimizer, 99)                               # and an optimizer state of its own
    load(model, optimizer, path)
    loaded = full_state(model, optimizer)
    _step(model, optimizer, steps)
    return loaded, full_state(model, optimizer)
