"""Checkpoints that resume exactly: what a training step depends on, written so that a crash never leaves a
half-written file, read back without running anyone's code (lesson 10).

Step t of data-parallel training depends on

* the parameters and the optimizer's state (Adam's two moments and its step count);
* the learning rate: a schedule's position (a scheduler's ``state_dict``, or the step number for a pure function);
* the data: the sampler's epoch (``DistributedSampler`` shuffles with ``seed + epoch``) and the position in it;
* every random number generator a rank draws from (dropout, augmentation, sampling): torch's CPU generator, the
  CUDA generator of its device, Python's ``random``, NumPy's. One state *per rank*: the ranks draw different numbers.

Leave one out and the resumed run is a different run (:mod:`labkit.resumable` shows each case). This module holds
the two pieces every checkpoint needs whatever it trains: the random states, and a file that is always whole.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from labkit import comm

__all__ = ["CheckpointError", "rng_state", "set_rng_state", "all_rng_states", "save", "load"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back whole (missing, truncated, corrupt, or not one of ours)."""


def rng_state(device: torch.device | None = None) -> dict:
    """Every generator this process draws from, as tensors and plain numbers (loadable with weights_only=True)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached)}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Put back what :func:`rng_state` took. Call it last when resuming: whatever draws after it moves the states."""
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))   # loaded onto a GPU too
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def all_rng_states(device: torch.device | None = None) -> list[dict]:
    """Every rank's :func:`rng_state`, on every rank (rank r's is element r). Collective: every rank calls it."""
    return comm.all_gather_objects(rng_state(device))


def save(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` so that ``path`` always holds a whole checkpoint, the old one or the new one.

    ``torch.save`` writes a temporary file in the same folder; ``fsync`` puts it on the disk; ``os.replace``
    renames it over ``path`` (atomic within one file system: a reader sees the old file or the new one, never half
    of one); a last ``fsync`` of the folder makes the rename itself survive a power cut. Written in place instead,
    a process killed mid-write leaves a truncated file and no checkpoint at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):           # POSIX: make the new directory entry durable too
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``: tensors, numbers, strings and containers, never code (a
    pickled object can run anything when it is loaded). A missing, truncated or corrupt file is a CheckpointError
    that says which file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(f"{path} is not a whole checkpoint ({exc}): truncated or corrupted") from exc
        raise CheckpointError(
            f"{path} holds objects other than tensors, numbers, strings and containers (classes, functions), which "
            f"weights_only=True refuses to load: loading them could run any code. Save state_dict()s and plain "
            f"values.\n{_first_line(exc)}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a whole checkpoint ({type(exc).__name__}: {_first_line(exc)}): it was "
            f"truncated (a process killed while writing it in place?), corrupted, or is not a torch checkpoint. "
            f"labkit.checkpoint.save never leaves a half-written file under the final name; resume from an "
            f"earlier checkpoint.") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint's dict")
    return obj


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's can run to a paragraph)."""
    line = (str(exc).splitlines() or ["(no message)"])[0]
    return line.split(". ")[0][:300]
