"""Feeding the GPUs: a data loader that keeps up with the step, or not (lesson 10, the cluster's data flow).

On a cluster the training data sit on a distributed file system, sharded into files; each rank reads its shard,
decodes and augments it, and batches it. If one batch takes longer to prepare than a training step takes to use it,
the accelerator waits. PyTorch's ``DataLoader`` hides the preparation behind the step with worker processes
(``num_workers``), each preparing whole batches ahead (``prefetch_factor`` of them).

The model of it, for a batch that takes ``load`` seconds to prepare and a step of ``step`` seconds, over ``n`` batches:

    no workers:        n · (load + step)                  the step waits for every batch
    w workers:         ≈ n · max(step, load / w)          + the workers' start-up

(as long as the machine has cores for the workers: waiting for a disk or a network overlaps on any number of
cores; decoding on the CPU does not.) :func:`measure` times both on a dataset whose items take a chosen time to
"read" (waiting, like a remote file system) and a step that takes a chosen time (waiting, like a GPU).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["SlowDataset", "Timing", "predicted_seconds", "measure"]


class SlowDataset(Dataset):
    """``n`` items of ``size`` floats; reading one waits ``read_s`` seconds (a file system's latency)."""

    def __init__(self, n: int, read_s: float, size: int = 256):
        self.n, self.read_s, self.size = n, read_s, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.read_s)
        return torch.full((self.size,), float(i))


@dataclass
class Timing:
    """One loader configuration: the seconds for ``batches`` steps, measured and by the model above."""
    workers: int
    prefetch: int | None
    measured: float
    predicted: float


def predicted_seconds(batches: int, load_s: float, step_s: float, workers: int) -> float:
    """The model of the module docstring (start-up not included)."""
    return batches * (load_s + step_s) if workers == 0 else batches * max(step_s, load_s / workers)


def measure(workers: int, *, batches: int = 20, batch_size: int = 4, read_s: float = 0.01, step_s: float = 0.01,
            prefetch: int | None = 2) -> Timing:
    """Time ``batches`` training steps (each waits ``step_s``) fed by a DataLoader with ``workers`` processes."""
    data = SlowDataset(batches * batch_size, read_s)
    options = dict(num_workers=workers, batch_size=batch_size)
    if workers:
        # fork is fast, but a forked child cannot use a GPU its parent has initialised: then spawn
        context = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        options.update(prefetch_factor=prefetch, multiprocessing_context=context, persistent_workers=False)
    start = time.perf_counter()
    with warnings.catch_warnings():      # "more workers than cores": these workers wait, they do not compute
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        for _ in DataLoader(data, **options):
            time.sleep(step_s)                           # the training step: the accelerator busy, the CPU free
    measured = time.perf_counter() - start
    return Timing(workers, prefetch if workers else None, measured,
                  predicted_seconds(batches, batch_size * read_s, step_s, workers))
