"""Parameter averaging versus gradient averaging: when are they the same algorithm?

Gradient averaging (synchronous data parallelism, what DDP does): every step, the ranks average
their gradients and every replica applies the same optimizer step to the same weights,

    θ ← opt_step(θ, ḡ),   ḡ = (1/N) Σ_i g_i(θ).

Parameter averaging (local SGD; federated averaging, McMahan et al. 2017): every rank takes k
optimizer steps on its own shard, then the ranks average their weights,

    θ_i ← k local opt steps from θ on shard i,   θ ← (1/N) Σ_i θ_i.

After ONE plain-SGD step from common weights they agree: (1/N) Σ_i (θ − η g_i) = θ − η ḡ.
With k > 1 they do not: the second local gradient is taken at θ_i, not at the common θ.
Momentum is linear in the gradients, so with k = 1 and each rank keeping its own momentum buffer,
the mean of the buffers *is* the momentum of ḡ: still the same algorithm. Adam divides by √v
element-wise, which does not commute with the mean: different even with k = 1.

Everything here runs inside workers started by :func:`labkit.launch` (real processes, real
all-reduce); :func:`averaging_gap` starts them and returns the measured gaps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from labkit.data_parallel import LinearRegression, all_reduce_mean_, average_gradients, flat_params, shard_indices
from labkit.launcher import launch

__all__ = ["OPTIMIZERS", "make_optimizer", "average_parameters", "run_gradient_averaging",
           "run_parameter_averaging", "averaging_gap"]

OPTIMIZERS = ("sgd", "momentum", "adam")


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    """The three optimizers the lesson compares, with the same learning rate."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {name!r}")


def average_parameters(model: torch.nn.Module) -> None:
    """θ ← (1/N) Σ_i θ_i on every rank: the parameter-averaging collective (one bucket)."""
    with torch.no_grad():
        all_reduce_mean_(list(model.parameters()))


def run_gradient_averaging(X: torch.Tensor, y: torch.Tensor, optimizer: str, steps: int, lr: float) -> torch.Tensor:
    """Synchronous data parallelism on this rank's shard (X, y). Returns θ after each step
    (row 0: the start), shape (steps + 1, num_params)."""
    model = LinearRegression(X.shape[1], dtype=X.dtype)  # zeros: every rank starts equal
    opt = make_optimizer(optimizer, model.parameters(), lr)
    history = [flat_params(model)]
    for _ in range(steps):
        opt.zero_grad()
        model.loss(X, y).backward()
        average_gradients(model, one_message=True)   # communicate every step...
        opt.step()                                   # ...so every replica takes the same step
        history.append(flat_params(model))
    return torch.stack(history)


def run_parameter_averaging(X: torch.Tensor, y: torch.Tensor, optimizer: str, rounds: int, local_steps: int, lr: float,
                            reset_state: bool = False) -> torch.Tensor:
    """Local SGD on this rank's shard (X, y): ``local_steps`` steps alone, then average the weights.
    The optimizer state (momentum, Adam's moments) stays on the rank and is carried from round to
    round, unless ``reset_state`` (a fresh optimizer every round, as many federated clients do).
    Returns θ after each round (row 0: the start), shape (rounds + 1, num_params)."""
    model = LinearRegression(X.shape[1], dtype=X.dtype)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    history = [flat_params(model)]
    for _ in range(rounds):
        if reset_state:
            opt = make_optimizer(optimizer, model.parameters(), lr)
        for _ in range(local_steps):  # no communication in here
            opt.zero_grad()
            model.loss(X, y).backward()
            opt.step()
        average_parameters(model)     # communicate once per round
        history.append(flat_params(model))
    return torch.stack(history)


def _gap_worker(X, y, optimizers, local_steps, rounds, lr, reset_state):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # Each rank keeps one fixed shard and uses all of it every step (full-shard gradients):
    # no sampling noise, so any gap comes from the algorithm, not from which samples were drawn.
    idx = shard_indices(len(X), rank, world_size, mode="drop")
    Xi, yi = X[idx], y[idx]
    gaps = {}
    for name in optimizers:
        reference = run_gradient_averaging(Xi, yi, name, max(local_steps) * rounds, lr)
        for k in local_steps:
            averaged = run_parameter_averaging(Xi, yi, name, rounds, k, lr, reset_state)
            # Compare after the same number of gradient evaluations: round r ends after r·k steps.
            same_time = reference[: rounds * k + 1 : k]
            gaps[name, k] = (averaged - same_time).abs().amax(dim=1)
    return gaps if rank == 0 else None


def averaging_gap(X: torch.Tensor, y: torch.Tensor, world_size: int, optimizers: tuple = OPTIMIZERS,
                  local_steps: tuple = (1,), rounds: int = 1,
                  lr: float = 0.05, reset_state: bool = False) -> dict:
    """Parameter averaging versus gradient averaging, measured on ``world_size`` processes: both start
    from the same weights, use the same optimizer and learning rate, and are compared after the same
    number of gradient evaluations per rank (r·k steps of gradient averaging = r rounds of k local steps).

    Returns ``{(optimizer, k): gap}``, ``gap[r]`` = max_j |θ_param-avg − θ_grad-avg|_j after round r
    (``gap[0]`` = 0: the common start).
    """
    return launch(_gap_worker, X, y, list(optimizers), list(local_steps), rounds, lr, reset_state,
                  world_size=world_size)[0]
