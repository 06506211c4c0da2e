"""Lesson 4's sweep: every method of :mod:`labkit.large_batch` at every batch size, tuned once at k = 1.

    options(**changes)      the sweep's options (defaults: DEFAULTS), checked
    sweep(options)          the whole sweep on options.world_size processes (labkit.launch); the results
    train(options, device)  the sweep on this rank of a process group that exists (what the lab runs)
    summary_table(results)  the results as text, one row per (method, k)

The experiment and its protocol are described in :mod:`labkit.large_batch`; this file is the engineering
around it: checking options, planning the runs, a progress bar, and the record of the results.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

from labkit.large_batch import DEFAULT_LRS, METHODS, Data, adascale_gradients, train_run
from labkit.models.gpt import GPT

__all__ = ["DEFAULTS", "options", "parse_lrs", "check_options", "planned_runs", "train", "sweep", "summary_table"]

# The sweep's options and their defaults (the lab's command line: --base-batch is base_batch, ...)
DEFAULTS = dict(world_size=None, methods=list(METHODS), scales=[1, 2, 4, 8, 16, 32], base_batch=2, epochs=1.0,
                lrs=[], adam_scaling="sqrt", lamb_scaling="sqrt", sgd_scaling="linear", warmup=0.1, decay="cosine",
                momentum=0.9, weight_decay=0.01, adascale_gradients=4, adascale_max_epochs=None, target_loss=2.5,
                eval_points=16, eval_blocks=128, preset="tiny", seed=0, progress=True, timeout=120.0)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

def options(**changes) -> argparse.Namespace:
    """The sweep's options: :data:`DEFAULTS` with ``changes`` (``lrs`` as on the command line:
    ``["adam=1e-3,3e-3"]``), checked by :func:`check_options`."""
    unknown = set(changes) - set(DEFAULTS) - {"command"}
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; the options are {', '.join(DEFAULTS)}")
    args = argparse.Namespace(**{**DEFAULTS, **changes})
    args.methods, args.scales, args.lrs = list(args.methods), list(args.scales), list(args.lrs)
    if not hasattr(args, "command"):
        args.command = "labkit.large_batch_sweep.options(" + ", ".join(f"{k}={v!r}" for k, v in changes.items()) + ")"
    check_options(args)
    return args


def parse_lrs(items) -> dict:
    """``["sgd=0.1,0.3", "lamb=0.01"]`` → ``{"sgd": (0.1, 0.3), "lamb": (0.01,)}``."""
    lrs = {}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in METHODS:
            raise ValueError(f"--lrs {item!r}: expected METHOD=LR[,LR...] with METHOD one of {', '.join(METHODS)}")
        try:
            rates = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--lrs {item!r}: the learning rates must be numbers") from None
        if not rates or not all(r > 0 and math.isfinite(r) for r in rates):
            raise ValueError(f"--lrs {item!r}: learning rates must be positive")
        lrs[method] = rates
    return lrs


def check_options(args) -> None:
    """Refuse bad options in every process, before any rendezvous, naming the option as the command line
    spells it. Completes them: ``scales`` sorted, ``methods`` in a fixed order, ``lr_grid`` from ``lrs``."""
    for name in ("base_batch", "eval_points", "eval_blocks", "timeout", "world_size", "target_loss"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.epochs > 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if any(k < 1 for k in args.scales):
        raise ValueError(f"--scales must be positive integers, got {args.scales}")
    if 1 not in args.scales:
        raise ValueError(f"--scales must include 1: each method's learning rate is tuned at the base batch "
                         f"(k = 1), then scaled; got {args.scales}")
    args.scales = sorted(set(args.scales))
    args.methods = [m for m in METHODS if m in args.methods]           # a fixed order, no repeats
    if not 0.0 <= args.warmup < 1.0:
        raise ValueError(f"--warmup is a fraction of the steps, in [0, 1), got {args.warmup}")
    if not 0.0 <= args.momentum < 1.0:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.adascale_gradients < 2:
        raise ValueError(f"--adascale-gradients must be >= 2 (AdaScale measures the noise from the spread of "
                         f"several gradients), got {args.adascale_gradients}")
    if args.adascale_max_epochs is not None and not args.adascale_max_epochs >= args.epochs:
        raise ValueError(f"--adascale-max-epochs must be >= --epochs {args.epochs}, got {args.adascale_max_epochs}")
    args.lr_grid = {**{m: DEFAULT_LRS[m] for m in DEFAULT_LRS}, **parse_lrs(args.lrs)}
    if "adascale" not in args.lr_grid:
        args.lr_grid["adascale"] = args.lr_grid["sgd"]                 # tuned as SGD: k = 1 is SGD
    world = args.world_size or 1
    for k in args.scales:
        batch = k * args.base_batch
        if batch % world:
            raise ValueError(f"the global batch {k}·{args.base_batch} = {batch} blocks is not divisible by the "
                             f"world size {world}: use a --base-batch that is")
        if "adascale" in args.methods:
            n = adascale_gradients(k, world, args.adascale_gradients)
            if batch % n:
                raise ValueError(f"AdaScale at k = {k}: {batch} blocks cannot be cut into {n} equal gradients "
                                 f"(--adascale-gradients {args.adascale_gradients}, world size {world})")


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------

def planned_runs(args) -> list[tuple]:
    """(phase, method, lr or None, k) in order: the k = 1 tuning grids, then every k > 1."""
    plan = []
    for method in args.methods:
        if method == "adascale" and "sgd" in args.methods and args.lr_grid["adascale"] == args.lr_grid["sgd"]:
            continue                                    # SGD's runs serve both: at k = 1 AdaScale is SGD
        plan += [("tune", method, lr, 1) for lr in args.lr_grid[method]]
    for method in args.methods:
        plan += [("sweep", method, None, k) for k in args.scales if k > 1]
    return plan


def train(args: argparse.Namespace, device: torch.device) -> dict:
    """The whole sweep on this rank (the process group is initialised). Returns the results."""
    if device.type != "cpu":
        raise ValueError("this lab runs on CPU processes (a tiny model: a GPU would wait on Python)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.world_size is not None and world_size != args.world_size:
        raise RuntimeError(f"--world-size {args.world_size} but the world has {world_size} processes")
    data = Data(args.preset, args.seed)
    for k in args.scales:                # checked here too: under a launcher the world size may be new
        n = adascale_gradients(k, world_size, args.adascale_gradients) if "adascale" in args.methods else 1
        if (k * args.base_batch) % world_size or (k * args.base_batch) % n:
            raise ValueError(f"k = {k}: the batch of {k * args.base_batch} blocks cannot be split into "
                             f"{world_size} ranks (× micro-batches: {n} AdaScale gradients)")
    if max(args.scales) * args.base_batch > data.num_blocks:
        raise ValueError(f"the largest batch, {max(args.scales)}·{args.base_batch} blocks, is more than the "
                         f"{data.num_blocks} training blocks")
    plan = planned_runs(args)
    from tqdm import tqdm   # not tqdm.auto: a worker forked from a notebook cannot draw widgets
    bar = tqdm(total=len(plan), disable=rank != 0 or not args.progress, unit="run", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 5.0)
    start = time.perf_counter()
    tuning, runs, best = {}, [], {}
    for phase, method, lr, k in plan:
        if phase == "sweep" and method not in best:
            best[method] = _pick(method, tuning, args)
        bar.set_description(f"{method} k={k}" + (f" lr={lr:g}" if lr else ""))
        result = train_run(method, lr if phase == "tune" else best[method]["base_lr"], k, data, args, rank,
                           world_size)
        (tuning.setdefault(method, []) if phase == "tune" else runs).append(result)
        loss = result["final_val_loss"]
        bar.set_postfix(val=f"{loss:.3f}" if loss is not None else "diverged", refresh=False)
        bar.update(1)
    bar.close()
    for method in args.methods:
        best.setdefault(method, _pick(method, tuning, args))
        k1 = dict(best[method])
        if k1["method"] != method:        # AdaScale at k = 1 is its SGD (gain ≡ 1): SGD's run stands for it
            k1.update(method=method, scaling="gain", same_as="sgd at k = 1 (the gain is 1 by definition)")
        runs.append(k1)
    order = {m: i for i, m in enumerate(METHODS)}
    runs.sort(key=lambda r: (order[r["method"]], r["k"]))
    return dict(
        lab="labkit.labs.large_batch", command=args.command, options=_options(args),
        world_size=world_size, backend=dist.get_backend(), device=str(device),
        torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
        model=dict(preset=args.preset, params=GPT(data.config).num_params(), **vars(data.config)),
        train_blocks=data.num_blocks, val_blocks=len(data.val_x), block_size=data.config.block_size,
        budget_samples=round(args.epochs * data.num_blocks), target_loss=args.target_loss,
        unigram_val_loss=data.unigram_val_loss,
        tuning={m: [dict(base_lr=r["base_lr"], final_val_loss=r["final_val_loss"], diverged=r["diverged"])
                    for r in tuning[m]] for m in tuning},
        best_lr={m: best[m]["base_lr"] for m in args.methods},
        runs=runs, seconds=time.perf_counter() - start,
        finished=datetime.datetime.now().isoformat(timespec="seconds"))


def _pick(method: str, tuning: dict, args) -> dict:
    """The k = 1 run with the lowest final validation loss of ``method``'s grid (AdaScale: SGD's)."""
    owner = "sgd" if method == "adascale" and method not in tuning else method
    candidates = [r for r in tuning[owner] if not r["diverged"]]
    if not candidates:
        raise RuntimeError(f"{owner}: every learning rate of the grid {args.lr_grid[method]} diverged at k = 1")
    best = min(candidates, key=lambda r: r["final_val_loss"])
    grid = sorted(args.lr_grid[method])
    best = dict(best, method=owner, tuned_on_edge=len(grid) > 1 and best["base_lr"] in (grid[0], grid[-1]))
    return best


def _options(args) -> dict:
    """The options as the results record them."""
    skip = {"argv", "lrs", "command"}
    out = {k: v for k, v in vars(args).items() if k not in skip}
    out["lr_grid"] = {m: list(v) for m, v in args.lr_grid.items()}
    return out


def sweep(args: argparse.Namespace) -> dict:
    """The whole sweep on ``args.world_size`` CPU processes (1 if None) started by :func:`labkit.launch`,
    from a notebook or a script; returns the results (rank 0's). No file is written: the lab does that."""
    from labkit.launcher import launch
    return launch(_sweep_worker, args, world_size=args.world_size or 1, device="cpu", timeout=args.timeout)[0]


def _sweep_worker(args: argparse.Namespace) -> dict:
    return train(args, torch.device("cpu"))


def summary_table(results: dict) -> str:
    """The sweep as text: one row per (method, k)."""
    lines = [f"{'method':>9} {'k':>3} {'batch':>6} {'peak lr':>9} {'steps':>6} {'epochs':>6} {'train':>7} "
             f"{'val':>7} {'steps→' + format(results['target_loss'], 'g'):>9} {'gain':>6}"]
    for r in results["runs"]:
        fmt = lambda v, f: "-" if v is None else format(v, f)   # noqa: E731
        lines.append(f"{r['method']:>9} {r['k']:3d} {r['batch_blocks']:6d} {r['peak_lr']:9.3g} {r['steps']:6d} "
                     f"{r['epochs_read']:6.2f} {fmt(r['final_train_loss'], '7.3f')} {fmt(r['final_val_loss'], '7.3f')} "
                     f"{fmt(r['steps_to_target'], '9.1f')} {fmt(r.get('mean_gain'), '6.2f')}"
                     + ("  diverged" if r["diverged"] else "") + ("  (stopped: sample cap)"
                                                                   if r["stopped_at_sample_cap"] else ""))
    return "\n".join(lines)
