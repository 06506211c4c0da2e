"""Before a multi-node run: does every rank see the world it should? (lesson 10, troubleshooting)

Most failures of a first run on several nodes are not in the training code: a node with another PyTorch, two ranks
on one GPU, a rank that picked the wrong network interface, clocks apart (logs that cannot be lined up), a
different MASTER_ADDR. Each rank reports what it sees; :func:`compare` names what differs.

    problems, reports = labkit.launch(preflight.run, world_size=4)[0]   # or under torchrun / srun, every rank
"""

from __future__ import annotations

import os
import platform
import socket
import time
from collections import Counter

import torch
import torch.distributed as dist

from labkit import comm

__all__ = ["report", "compare", "run", "ENV", "shard_overlap", "my_shard"]

# The variables that decide where a rank connects and how it communicates.
ENV = ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "NCCL_IB_DISABLE",
       "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def report() -> dict:
    """What this rank sees (plain values: it travels to the others)."""
    device = comm.device()
    return {
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "host": socket.gethostname(), "pid": os.getpid(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "nccl": _nccl_version() if device.type == "cuda" else None,
        "env": {k: os.environ.get(k) for k in ENV},
        "clock": time.time(),              # read right after a barrier: the ranks' clocks at the same moment
    }


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def compare(reports: list[dict], clock_tolerance_s: float = 0.5) -> list[str]:
    """What differs between the ranks that should not (empty: nothing found)."""
    problems = []
    for key in ("world_size", "backend", "python", "torch", "cuda", "nccl"):
        values = Counter(str(r[key]) for r in reports)
        if len(values) > 1:
            problems.append(f"{key} differs: " + ", ".join(
                f"{v} on rank(s) {[r['rank'] for r in reports if str(r[key]) == v]}" for v in values))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        values = {r["env"][name] for r in reports}
        if len(values) > 1:
            problems.append(f"{name} differs between ranks: {sorted(map(str, values))}")
    places = Counter((r["host"], r["device"]) for r in reports if not r["device"].startswith("cpu"))
    for (host, device), n in places.items():
        if n > 1:
            problems.append(f"{n} ranks share {device} on {host}: set the device from LOCAL_RANK")
    clocks = [r["clock"] for r in reports]
    if max(clocks) - min(clocks) > clock_tolerance_s:
        problems.append(f"clocks differ by {max(clocks) - min(clocks):.1f} s after a barrier: logs of different "
                        f"nodes will not line up (run NTP/chrony)")
    return problems


def run() -> tuple[list[str], list[dict]]:
    """Every rank calls it: (the problems :func:`compare` finds, every rank's report)."""
    comm.barrier()
    reports = comm.all_gather_objects(report())
    return compare(reports), reports


# ---- a rank with the wrong data ------------------------------------------------------------------------------------

def my_shard(n: int, rank: int | None = None, seed: int = 0) -> list[int]:
    """The indices of the items this rank reads in epoch 0 (DistributedSampler over ``n`` items, shuffled).
    ``rank``: the rank the sampler is told (None: the true one). Collective: every rank's list, on every rank."""
    from torch.utils.data import DistributedSampler

    told = dist.get_rank() if rank is None else rank
    sampler = DistributedSampler(range(n), num_replicas=dist.get_world_size(), rank=told, shuffle=True, seed=seed,
                                 drop_last=True)
    return comm.all_gather_objects(list(sampler))


def shard_overlap(shards: list[list[int]]) -> list[str]:
    """What is wrong with the ranks' shards of one epoch: items read by several ranks (a sampler told the wrong
    rank, or none at all: every rank then trains on the same batches, and the run is one rank's N times over)."""
    problems, seen = [], {}
    for rank, shard in enumerate(shards):
        for item in shard:
            seen.setdefault(item, []).append(rank)
    shared = {item: ranks for item, ranks in seen.items() if len(ranks) > 1}
    if shared:
        item, ranks = min(shared.items())
        problems.append(f"{len(shared)} of {len(seen)} items are read by more than one rank in the same epoch (item "
                        f"{item}: ranks {ranks}): give each rank's DistributedSampler its own rank")
    return problems
