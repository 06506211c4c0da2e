"""Lab 1: data-parallel SGD on linear regression, with a central server or an all-reduce.

    python -m labkit.labs.dp_sgd --world-size 4 [--sync server|allreduce] [--epochs 20]
    torchrun --nproc-per-node 4 -m labkit.labs.dp_sgd --world-size 4
    accelerate launch --config_file configs/accelerate/cpu.yaml -m labkit.labs.dp_sgd --world-size 4
    accelerate launch --config_file configs/accelerate/gpu.yaml -m labkit.labs.dp_sgd --world-size 4

Under a launcher (torchrun / accelerate: WORLD_SIZE is set) this process is one rank and joins the
launcher's world; otherwise it starts ``--world-size`` workers itself with :func:`labkit.launch`.
Either way ``--world-size`` is checked against the world the process really sees, so a launcher
that silently starts independent single-process runs is an error, not a wrong result.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from labkit import comm
from labkit.data_parallel import (LinearRegression, average_gradients, broadcast_parameters,
                                  make_linear_data, server_average_gradients, shard_indices)
from labkit.labs.entry import run_as_script, run_lab


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes expected (checked against the launcher's world)")
    p.add_argument("--sync", choices=["allreduce", "server"], default="allreduce",
                   help="how workers agree on the gradient")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=48, help="global batch size (split over ranks)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a rank may wait in a collective")
    p.add_argument("--out", default=None, help="write the metrics as JSON to this file (rank 0)")
    return p.parse_args(argv)


def train(args, device: torch.device) -> dict:
    """One rank's training loop. The process group is already initialised."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the world size {world_size}")
    X, y, w_true, _ = make_linear_data(args.samples, args.features, seed=args.seed)
    X, y = X.to(device), y.to(device)
    torch.manual_seed(args.seed + rank)  # different init per rank on purpose: the broadcast fixes it
    model = LinearRegression(args.features).to(device)
    torch.nn.init.normal_(model.w)
    broadcast_parameters(model, src=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    sync = average_gradients if args.sync == "allreduce" else server_average_gradients
    local_batch = args.batch_size // world_size
    history, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        # mode="drop": every rank takes the same number of steps (no rank waits in a collective alone)
        mine = torch.tensor(shard_indices(args.samples, rank, world_size, epoch=epoch, seed=args.seed,
                                          mode="drop"), device=device)
        for step in range(len(mine) // local_batch):
            idx = mine[step * local_batch:(step + 1) * local_batch]
            opt.zero_grad()
            model.loss(X[idx], y[idx]).backward()
            sync(model)
            opt.step()
        with torch.no_grad():
            full_loss = model.loss(X, y).item()
        history.append(full_loss)
        if rank == 0:
            print(f"epoch {epoch + 1:3d}/{args.epochs}  full-data loss {full_loss:.6f}", flush=True)
    # Check that data parallelism kept the replicas identical: gather every rank's weights on rank 0.
    weights = torch.cat([model.w.detach().reshape(-1), model.b.detach().reshape(-1)])
    gathered = [torch.empty_like(weights) for _ in range(world_size)] if rank == 0 else None
    comm.gather(weights, gathered, dst=0)
    return dict(rank=rank, world_size=world_size, backend=dist.get_backend(), device=str(device),
                sync=args.sync, loss=history, seconds=time.perf_counter() - start,
                weight_error=(model.w.detach().cpu() - w_true).norm().item(),
                replicas_identical=None if rank else all(torch.equal(g, weights) for g in gathered))


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, result = run_lab(train, args)
    if rank == 0:
        print(f"world size {result['world_size']} ({result['backend']} on {result['device']}), "
              f"sync={result['sync']}: final loss {result['loss'][-1]:.6f}, "
              f"|w - w_true| = {result['weight_error']:.4f}, replicas identical: {result['replicas_identical']}, "
              f"{result['seconds']:.2f} s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    run_as_script(main)
