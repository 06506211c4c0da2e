"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes only its shard, and a run on
another number of ranks loads them into its own shards (lesson 10).

With FSDP (lesson 8) no rank holds the whole model, so no rank can ``torch.save`` it without first gathering it
(Ψ numbers through one process: slow, and more memory than any rank has). DCP writes each rank's shards in
parallel with a plan (which rank has which piece of which tensor) in a metadata file; at load time each rank asks
for the pieces its *own* sharding needs, whatever the sharding that wrote them: saved on 4 ranks, loaded on 2.

    save(model, optimizer, path)    every rank calls it; one folder, one file per rank plus ``.metadata``
    load(model, optimizer, path)    every rank calls it, with the model already sharded its own way
    full_state(model, optimizer)    the whole parameters and optimizer state, gathered (to compare runs)
"""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_state_dict)

__all__ = ["save", "load", "full_state"]


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
