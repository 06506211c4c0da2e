"""A data-parallel training run that can be stopped at any step and resumed to the same bits (lesson 10).

The run is small on purpose, and has every kind of state a real one has:

    model       an MLP with dropout (torch's RNG), wrapped in labkit's BucketedDDP
    optimizer   AdamW (two moments and a step count per parameter)
    schedule    LambdaLR: linear warm-up, then cosine decay (its position is state)
    data        DistributedSampler, shuffled per epoch (seed + epoch), read from a position inside an epoch
    randomness  dropout masks (torch), a scale jitter of each batch (Python's random), both different per rank

``Trainer.state_dict()`` is what a checkpoint must hold and ``Trainer.load_state_dict()`` puts it back: the
exercise of lesson 10 has students write these two. :func:`train` runs ``steps`` steps, writes a checkpoint every
``every`` steps with :func:`labkit.checkpoint.save`, and can stop early (``stop_after``) or resume from a
checkpoint; its :class:`Result` ends with the parameters, so a stopped-and-resumed run can be compared with an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from labkit import checkpoint, comm
from labkit.ddp import BucketedDDP

__all__ = ["Trainer", "Result", "train", "make_data", "FORGET", "resume_each", "kill_while_writing"]


def make_data(n: int = 48, features: int = 8, seed: int = 0) -> TensorDataset:
    """A fixed regression problem: y = sin(x·w) + noise, from its own generator (never the global one)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 1, generator=g)
    return TensorDataset(x, torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g))


def _schedule(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return factor


class Trainer:
    """One rank's training state and its step. The process group is initialised (every rank builds one)."""

    def __init__(self, steps: int, *, batch: int = 4, lr: float = 1e-2, seed: int = 0,
                 data: TensorDataset | None = None):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = comm.device()
        torch.manual_seed(seed)                                   # the same initial weights on every rank
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
        self.model = model.to(self.device)
        self.ddp = BucketedDDP(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _schedule(steps, warmup=max(1, steps // 5)))
        self.sampler = DistributedSampler(make_data() if data is None else data, num_replicas=self.world_size, rank=self.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        # iter(loader) draws a seed from the loader's generator, or from torch's global one when it has none: then
        # restarting an epoch's iterator on resume would move the RNG that dropout draws from
        self.loader = DataLoader(self.sampler.dataset, batch_size=batch, sampler=self.sampler, drop_last=True,
                                 generator=torch.Generator().manual_seed(seed))
        self.step, self.epoch, self.position = 0, 0, 0           # position: batches of this epoch already read
        torch.manual_seed(seed + 1 + self.rank)                   # dropout and jitter: different on every rank
        random.seed(seed + 1 + self.rank)
        self._batches = None

    # ---- what a checkpoint holds ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the next step depends on. Collective (the random states of every rank are gathered)."""
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "data": {"epoch": self.epoch, "position": self.position},
                "rng": checkpoint.all_rng_states(self.device), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(f"this checkpoint was written by {state['world_size']} ranks and this run has "
                             f"{self.world_size}: each rank's data shard and random state belong to its world")
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.position = state["data"]["epoch"], state["data"]["position"]
        self._batches = None
        checkpoint.set_rng_state(state["rng"][self.rank], self.device)   # last: nothing after it may draw

    # ---- the step ---------------------------------------------------------------------------------------------

    def _next_batch(self):
        if self._batches is None:                   # (re)start the epoch's order and skip what was read
            self.sampler.set_epoch(self.epoch)
            self._batches = iter(self.loader)
            for _ in range(self.position):
                next(self._batches)
        batch = next(self._batches, None)
        if batch is None:                           # the epoch is over: the next one, in a new order
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
            return self._next_batch()
        self.position += 1
        return batch

    def train_step(self) -> float:
        x, y = (t.to(self.device) for t in self._next_batch())
        x = x * (1 + 0.05 * random.gauss(0.0, 1.0))                 # augmentation from Python's RNG
        loss = nn.functional.mse_loss(self.ddp(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item()


@dataclass
class Result:
    """One rank's run: the losses of the steps it took, where it started, and the parameters at its end."""
    losses: list = field(default_factory=list)
    start: int = 0
    params: torch.Tensor | None = None


# What a resume can forget, each as a change to the state it loads (the lesson's table; the tests use it too).
FORGET = {
    "random states": lambda trainer, state: dict(state, rng=checkpoint.all_rng_states(trainer.device)),
    "random states of ranks > 0": lambda trainer, state: dict(state, rng=[state["rng"][0]] * trainer.world_size),
    "optimizer state": lambda trainer, state: dict(state, optimizer=trainer.optimizer.state_dict()),
    "schedule": lambda trainer, state: dict(state, scheduler=trainer.scheduler.state_dict()),
    "sampler epoch": lambda trainer, state: dict(state, data=dict(state["data"], epoch=0)),
    "position in the epoch": lambda trainer, state: dict(state, data=dict(state["data"], position=0)),
}


def train(steps: int, *, path: str | Path | None = None, every: int = 0, stop_after: int | None = None,
          resume: bool = False, forget: str | None = None, trainer_class: type = Trainer, on_step=None,
          **options) -> Result:
    """Train to ``steps`` (every rank calls it). ``path``: the checkpoint file, written every ``every`` steps and at
    the end (by rank 0); ``resume``: start from it; ``stop_after``: stop after that step, as a crash would (the
    checkpoint is not written there unless ``every`` divides it). ``trainer_class``: a Trainer or a subclass (an
    exercise's). ``forget``: a key of FORGET, left out of the state loaded on resume. ``on_step(trainer, saved)``:
    called after each step (``saved``: a checkpoint was just written)."""
    trainer = trainer_class(steps, **options)
    if resume:
        state = checkpoint.load(path, map_location=trainer.device)
        trainer.load_state_dict(FORGET[forget](trainer, state) if forget else state)
    result = Result(start=trainer.step)
    last = steps if stop_after is None else min(steps, stop_after)
    while trainer.step < last:
        result.losses.append(trainer.train_step())
        saved = path is not None and ((every and trainer.step % every == 0) or trainer.step == steps)
        if saved:
            state = trainer.state_dict()
            if trainer.rank == 0:
                checkpoint.save(state, path)
            comm.barrier()                          # no rank runs ahead of a checkpoint that is not written yet
        if on_step is not None:
            on_step(trainer, saved)
    result.params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).cpu()
    return result


def resume_each(directory: str | Path, steps: int = 20, every: int = 5, crash: int = 13) -> dict:
    """On every rank: an uninterrupted run; a run that crashes after step ``crash``; then resumes from its last
    checkpoint, whole and with each piece of FORGET left out. Returns, for each, the largest difference of any
    parameter on any rank from the uninterrupted run's (0.0: the same bits)."""
    clean = train(steps)
    path = Path(directory) / "crash.pt"
    train(steps, path=path, every=every, stop_after=crash)
    differences = {}
    for i, forget in enumerate([None, *FORGET]):
        copy = Path(directory) / f"resume-{i}.pt"    # each resume writes its own last checkpoint
        if dist.get_rank() == 0:
            copy.write_bytes(path.read_bytes())
        comm.barrier()
        resumed = train(steps, path=copy, resume=True, forget=forget)
        mine = (resumed.params - clean.params).abs().max().item()
        differences[forget or "nothing"] = max(comm.all_gather_objects(mine))
    return differences


_WRITER = """
import sys, torch
from labkit import checkpoint
i = 0
while True:
    i += 1
    state = {"i": i, "w": torch.full((2_000_000,), float(i))}
    torch.save(state, sys.argv[1]) if sys.argv[2] == "in place" else checkpoint.save(state, sys.argv[1])
    print(i, flush=True)
"""


def kill_while_writing(path: str | Path, how: str, delays=(0.05, 0.13, 0.31, 0.07, 0.2)) -> int:
    """A process writes an 8 MB checkpoint over and over (``how``: "in place" with torch.save, or "atomic" with
    labkit.checkpoint.save) and is killed with SIGKILL after each delay. Returns how many kills left ``path``
    unreadable."""
    import signal
    import subprocess
    import sys

    broken = 0
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), how], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()                          # one checkpoint at least was written whole
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        try:
            checkpoint.load(path)
        except checkpoint.CheckpointError:
            broken += 1
    return broken
