"""How every lab starts: under a launcher (torchrun, accelerate, srun) or starting its own workers.

A lab's ``train(args, device)`` is the code of one rank. ``run_lab`` runs it on every rank:

* under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE is set), this process is one rank: join the
  group the launcher describes, check it is the world asked for (``--world-size``), train;
* as a plain ``python -m labkit.labs.<lab>``, start ``--world-size`` workers with ``labkit.launch``
  (gloo on CPU, NCCL when every worker has its own GPU) and return rank 0's result.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch.distributed as dist

from labkit import comm
from labkit.launcher import init_from_env, launch

__all__ = ["under_launcher", "run_lab", "run_as_script"]


def under_launcher() -> bool:
    """True when an outside launcher started this process as one rank of a world."""
    return "WORLD_SIZE" in os.environ or dist.is_initialized()


def run_lab(train, args, device: str | None = None) -> tuple[int, dict]:
    """Run ``train(args, device)`` on every rank; return ``(this process's rank, its result)``.
    ``args`` needs ``world_size`` (None: whatever the launcher gives, 1 without one) and ``timeout``."""
    if under_launcher():
        rank, _, dev = init_from_env(args.world_size, device=device, timeout=args.timeout)
        try:
            result = train(args, dev)
            # every rank done with its last messages before any tears down its connections: gloo aborts a
            # process ("terminate called without an active exception") whose group is destroyed while a
            # peer's message to it is still in flight (seen once in CI after the final gather)
            comm.barrier()
            return rank, result
        finally:
            dist.destroy_process_group()
    init_from_env(None)  # catches `accelerate launch --cpu` (one process, no world) with a clear error
    results = launch(_launched_worker, train, args, world_size=args.world_size or 1, device=device or "auto",
                     timeout=args.timeout)
    return 0, results[0]


def _launched_worker(train, args):
    _, _, device = init_from_env(args.world_size)   # the group exists: this reads its device (cuda under NCCL)
    return train(args, device)


def run_as_script(main) -> NoReturn:
    """A lab's ``if __name__ == "__main__"``: run ``main()``, then end the process.

    Under a launcher the process ends with ``os._exit`` once its output is flushed, skipping the
    interpreter's teardown. There, after the group is destroyed and the results written, libtorch's
    teardown now and then aborts a rank ("terminate called without an active exception", SIGABRT:
    1 run of about 100 of the torchrun test here (torch 2.13, gloo), and twice in CI), and the launcher then
    reports the whole job as failed. labkit.launch's workers end the same way (forkserver children)."""
    main()
    if under_launcher():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(0)
