"""Lesson 4's experiment: one GPT trained at batch sizes B … 32·B with four large-batch recipes.

    options(**changes)      the sweep's options (defaults: DEFAULTS), checked
    sweep(options)          the whole sweep on options.world_size processes (labkit.launch); the results
    train(options, device)  the sweep on this rank of a process group that exists (what the lab runs)
    Data, mean_loss, average_gradients_and_loss, lr_multiplier, schedule, first_reach, summary_table
                            its pieces, which lesson 4 uses on their own

The command line over it is the lab ``python -m labkit.labs.large_batch`` (its options are these, with
dashes); its figures are in :mod:`labkit.large_batch_figures`.

The experiment. The tiny GPT of lesson 3 (63 K parameters) learns to predict the next character of
*Botchan*. For every batch size k·B (``--scales``; B = ``--base-batch`` blocks of 64 characters) and
every method, it trains from the same initial weights on the same stream of samples and records the
final training and validation losses and the number of steps (and of samples) it took to reach a
target validation loss. Four methods:

    sgd        SGD with momentum, the linear scaling rule (lr = k·η) and gradual warm-up from η
               (Goyal et al. 2017)
    adam       AdamW, lr = √k·η (``--adam-scaling``; the square-root rule: Adam's step is normalised
               by √v, so the noise of its step falls like 1/√batch; Malladi et al. 2022), same warm-up
    lamb       LAMB (You et al. 2020): Adam's direction, rescaled per layer by ‖θ‖/‖u‖; lr = √k·η
               (``--lamb-scaling``; the paper's square-root scaling), the same warm-up
    adascale   SGD with momentum wrapped in AdaScale (Johnson et al. 2020): no scaling rule and no
               warm-up of its own; it multiplies η by the measured gain r ∈ [1, k] at every step and
               runs until its scale-invariant progress τ = Σ r reaches the base run's number of steps

The protocol (the honest one). Each method's base learning rate η is tuned once, at k = 1, on a
small grid (``--lrs``; the best final validation loss wins; every grid point is recorded, and a best
value on the edge of its grid is flagged). Then each method's scaling rule is applied unchanged at
every k: no retuning per batch size. AdaScale is not tuned: it takes SGD's η (at k = 1 AdaScale *is*
SGD, its gain being 1 by definition, so its k = 1 point is SGD's). sgd, adam and lamb get a fixed
budget of samples (``--epochs``): k times fewer steps at k times the batch. AdaScale's budget is in
scale-invariant iterations: where its gain is below k it takes more than T/k steps, and so reads
more samples (the results say how many; ``--adascale-max-epochs`` caps them).

Schedules. T steps (T = samples / (k·B)); warm-up over the first ``--warmup`` fraction of them,
from η to the scaled rate (Goyal et al.: from the small-batch rate; at k = 1 there is nothing to warm
up), then cosine decay to 0 (``--decay``). AdaScale follows the k = 1 schedule in τ: lr(τ).

Why this model and these sizes. The effects to show need a batch range that straddles the gradient
noise scale B_noise ≈ tr(Σ)/‖G‖² (McCandlish et al. 2018). For this GPT it is below one block at
initialisation and grows to tens of blocks as the loss falls (lesson 4 measures it), so B = 2 … 64
blocks (128 … 4096 characters) spans it. One epoch of the text keeps the whole sweep (29 runs) to
about 5 minutes on one free CPU core (the JSON records how long it took).

Data parallelism. With N processes every step's global batch of k·B blocks (the next k·B blocks of
one seeded stream, the same for every k and every N) is cut into N equal slices; each rank back-
propagates its slice, and the gradients are averaged by one all-reduce of one flat buffer. AdaScale
needs several *independent* gradients per step to estimate the gradient noise: it uses the N
workers' gradients and, within each worker, n/N micro-batches accumulated one after the other
(``num_gradients_to_accumulate``), n = ``--adascale-gradients`` (at most k). On one process the
micro-batches alone play the workers. The estimate does not depend on how the n gradients are split
between processes and micro-batches: one process with 4 micro-batches and 2 processes with 2 each
measure the same gradients (tested). With tiny per-rank batches the all-reduce costs more than the
computation: on a 2-core laptop one process is the fastest way to run the sweep.

Results: a dict (JSON-ready: the command, the options, the tuning grid, every run's losses, curves,
steps and gains); the lab writes it to ``--output`` with the figure next to it.
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
import torch.nn.functional as F

from labkit import comm
from labkit.data_parallel import all_reduce_mean_
from labkit.models.gpt import GPT, GPTConfig
from labkit.optim import AdaScale, Lamb, lamb_param_groups, warmup_factor
from labkit.text import CharTokenizer, TokenBlocks, load_corpus, split_tokens

__all__ = ["METHODS", "DEFAULT_LRS", "DEFAULTS", "options", "check_options", "sweep", "train", "Data", "mean_loss",
           "average_gradients_and_loss", "lr_multiplier", "schedule", "adascale_gradients", "first_reach",
           "my_slices", "train_run", "summary_table"]

METHODS = ("sgd", "adam", "lamb", "adascale")
# Base learning rates tried at k = 1 (factors of about 3 apart, around what works for this GPT).
DEFAULT_LRS = {"sgd": (0.1, 0.3, 1.0), "adam": (1e-3, 3e-3, 1e-2), "lamb": (3e-3, 1e-2, 3e-2)}
SCALING_RULES = ("linear", "sqrt", "none")
DECAYS = ("cosine", "linear", "constant")
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
        args.command = "labkit.large_batch.options(" + ", ".join(f"{k}={v!r}" for k, v in changes.items()) + ")"
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


def adascale_gradients(k: int, world_size: int, wanted: int) -> int:
    """n, the independent gradients of one AdaScale step: ``wanted`` capped at k (each then covers at
    least one base batch), at least 2, and a multiple of the world size (micro-batches per worker)."""
    n = max(2, min(wanted, k))
    accumulate = max(1, n // world_size)
    return world_size * accumulate


def lr_multiplier(rule: str, k: int) -> float:
    """The scaling rule: the learning rate at k·B is ``lr_multiplier(rule, k)`` × the one tuned at B."""
    if rule == "linear":
        return float(k)
    if rule == "sqrt":
        return math.sqrt(k)
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown scaling rule {rule!r}; one of {', '.join(SCALING_RULES)}")


def scaling_rule(method: str, args) -> str:
    """Each method's rule; AdaScale has none (its gain scales the rate at every step)."""
    return "gain" if method == "adascale" else getattr(args, f"{method}_scaling")


def schedule(base_lr: float, multiplier: float, step: float, total: int, args) -> float:
    """Learning rate at ``step`` of ``total``: warm-up from ``base_lr`` to ``multiplier × base_lr``
    over ``--warmup`` of the steps (labkit.optim.schedules.warmup_factor), then ``--decay``."""
    warmup = round(args.warmup * total)
    return base_lr * multiplier * warmup_factor(step, multiplier, warmup, total, args.decay)


# --------------------------------------------------------------------------------------------
# Data: one seeded stream of training blocks, the same for every batch size and world size
# --------------------------------------------------------------------------------------------

class Data:
    """The corpus as tensors: train blocks (X, Y), validation blocks, and the sample stream.

    The stream is epoch after epoch of seeded permutations of the training blocks; step t of a run at
    batch b reads stream[t·b : (t+1)·b]. Every run thus reads the same samples in the same order:
    the first 32 steps at k = 1 read exactly the first step at k = 32.
    """

    def __init__(self, preset: str, seed: int):
        text = load_corpus()
        self.tok = CharTokenizer.from_text(text)
        self.config = GPTConfig.preset(preset, self.tok.vocab_size)
        train_tokens, val_tokens = split_tokens(self.tok.encode(text))
        self.x, self.y = self._stack(TokenBlocks(train_tokens, self.config.block_size))
        self.val_x, self.val_y = self._stack(TokenBlocks(val_tokens, self.config.block_size))
        self.num_blocks = len(self.x)
        # The final training loss: as many training blocks as there are validation blocks, evenly spread.
        spread = torch.linspace(0, self.num_blocks - 1, len(self.val_x)).round().long()
        self.train_eval_x, self.train_eval_y = self.x[spread], self.y[spread]
        # The loss of a model that knows only the letter frequencies (of the training text, add-one
        # smoothed): where every run starts its descent, and where a run that learned nothing more ends.
        counts = torch.bincount(train_tokens, minlength=self.tok.vocab_size).double() + 1
        self.unigram_val_loss = -(counts / counts.sum()).log()[val_tokens].mean().item()
        self.seed = seed
        self._stream = torch.empty(0, dtype=torch.long)

    @staticmethod
    def _stack(blocks: TokenBlocks):
        chunks = blocks.tokens[:len(blocks) * blocks.block_size + 1]
        x = chunks[:-1].view(len(blocks), blocks.block_size)
        y = chunks[1:].view(len(blocks), blocks.block_size)
        return x, y

    def stream(self, start: int, stop: int) -> torch.Tensor:
        """Block indices stream[start:stop], extending the stream by whole epochs as needed."""
        while len(self._stream) < stop:
            epoch = len(self._stream) // self.num_blocks
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._stream = torch.cat([self._stream, torch.randperm(self.num_blocks, generator=g)])
        return self._stream[start:stop]


def my_slices(indices: torch.Tensor, rank: int, world_size: int, micro_batches: int) -> list[torch.Tensor]:
    """This rank's part of a global batch (the rank-th of N equal slices), cut into micro-batches."""
    local = len(indices) // world_size
    mine = indices[rank * local:(rank + 1) * local]
    return list(mine.chunk(micro_batches))


# --------------------------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------------------------

def make_optimizer(method: str, model, lr: float, k: int, args, world_size: int):
    """The optimizer of ``method`` (``lr`` is set again at every step by the schedule)."""
    if method in ("sgd", "adascale"):
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
        if method == "sgd":
            return sgd
        n = adascale_gradients(k, world_size, args.adascale_gradients)
        return AdaScale(sgd, world_size=world_size, scale=k, num_gradients_to_accumulate=n // world_size)
    # Adam and LAMB: the same groups, the same moments (β, ε); only the trust ratio differs.
    groups = lamb_param_groups(model, weight_decay=args.weight_decay)
    if method == "adam":
        for g in groups:
            g.pop("adapt", None)
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    return Lamb(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)


@torch.no_grad()
def mean_loss(model, x, y, rank: int, world_size: int, chunk: int = 128) -> float:
    """Mean cross-entropy over the blocks (x, y), each rank taking its share, summed over the ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    share = range(rank, len(x), world_size)
    idx = torch.tensor(list(share), dtype=torch.long)
    for part in idx.split(chunk):
        logits, _ = model(x[part])
        total[0] += F.cross_entropy(logits.flatten(0, 1), y[part].flatten(), reduction="sum").double()
        total[1] += y[part].numel()
    model.train()
    if world_size > 1:
        comm.all_reduce(total)
    return (total[0] / total[1]).item()


def average_gradients_and_loss(model, loss: torch.Tensor, world_size: int) -> float:
    """Average the gradients and this step's loss over the ranks with ONE all-reduce of one flat
    buffer: with a batch of a few blocks per rank, one message per tensor would cost more than the
    computation. Returns the mean loss."""
    if world_size == 1:
        return loss.item()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    mean_loss = loss.detach().reshape(1).to(grads[0].dtype, copy=True)
    all_reduce_mean_(grads + [mean_loss])
    return mean_loss.item()


def first_reach(curve, target: float):
    """(steps, samples) where the validation curve first reaches ``target``, interpolated linearly
    between the two evaluations around the crossing; (None, None) if it never does."""
    if curve and curve[0][2] <= target:
        return 0.0, 0.0
    for (s0, n0, l0), (s1, n1, l1) in zip(curve, curve[1:]):
        if l1 <= target:                  # l0 > target here: the crossing lies between the two
            f = (l0 - target) / (l0 - l1)
            return s0 + f * (s1 - s0), n0 + f * (n1 - n0)
    return None, None


def train_run(method: str, base_lr: float, k: int, data: Data, args, rank: int, world_size: int) -> dict:
    """Train one (method, learning rate, batch multiple k) from the common initial weights."""
    B = args.base_batch
    batch = k * B
    budget = round(args.epochs * data.num_blocks)                    # samples (blocks) for sgd/adam/lamb
    base_steps = round(budget / B)                                   # T at k = 1: AdaScale's τ budget
    torch.manual_seed(args.seed)
    model = GPT(data.config)
    optimizer = make_optimizer(method, model, base_lr, k, args, world_size)
    adascale = isinstance(optimizer, AdaScale)
    rule = scaling_rule(method, args)
    if adascale:
        multiplier, total = 1.0, base_steps
        micro = optimizer.accumulate
        max_epochs = args.adascale_max_epochs or 8 * args.epochs
        max_steps = math.floor(max_epochs * data.num_blocks / batch)
    else:
        multiplier, total = lr_multiplier(rule, k), max(1, round(budget / batch))
        micro, max_steps = 1, None
    peak_lr = base_lr * multiplier
    diverge_at = 2 * math.log(data.config.vocab_size)                # twice the loss of a uniform guess

    curve = [(0, 0, mean_loss(model, data.val_x[:args.eval_blocks], data.val_y[:args.eval_blocks],
                              rank, world_size))]
    next_eval = 1                                                    # the next of the eval_points grid points
    losses, gains, lrs, taus = [], [], [], []
    step, progress, diverged, stopped = 0, 0.0, False, False
    start = time.perf_counter()
    while progress < total:
        position = progress if adascale else step                    # where the schedule is: τ or t
        lr = schedule(base_lr, multiplier, position, total, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(())
        for part in my_slices(data.stream(step * batch, (step + 1) * batch), rank, world_size, micro):
            _, loss = model(data.x[part], data.y[part])
            (loss / micro).backward()
            loss_sum += loss.detach() / micro
        loss_value = average_gradients_and_loss(model, loss_sum, world_size)  # the data-parallel average
        optimizer.step()
        step += 1
        if adascale:
            progress = optimizer.progress
            gains.append(optimizer.gain())
            taus.append(progress)
        else:
            progress = step
        losses.append(loss_value)
        lrs.append(lr * (gains[-1] if adascale else 1.0))
        if not math.isfinite(loss_value) or loss_value > diverge_at:
            diverged = True
            break
        if max_steps is not None and step >= max_steps and progress < total:
            stopped = True
            break
        crossed = False
        while next_eval <= args.eval_points and progress >= next_eval * total / args.eval_points - 1e-9:
            next_eval, crossed = next_eval + 1, True
        if crossed:                                                  # a grid point was passed: evaluate
            val = mean_loss(model, data.val_x[:args.eval_blocks], data.val_y[:args.eval_blocks], rank, world_size)
            curve.append((step, step * batch, val))
    seconds = time.perf_counter() - start
    result = dict(method=method, k=k, batch_blocks=batch, batch_tokens=batch * data.config.block_size,
                  base_lr=base_lr, scaling=rule, peak_lr=peak_lr, steps=step, samples=step * batch,
                  epochs_read=step * batch / data.num_blocks, diverged=diverged, stopped_at_sample_cap=stopped,
                  seconds=seconds)
    if diverged:
        result.update(final_train_loss=None, final_val_loss=None, steps_to_target=None, samples_to_target=None)
    else:
        result["final_val_loss"] = mean_loss(model, data.val_x, data.val_y, rank, world_size)
        result["final_train_loss"] = mean_loss(model, data.train_eval_x, data.train_eval_y, rank, world_size)
        result["steps_to_target"], result["samples_to_target"] = first_reach(curve, args.target_loss)
    result["val_curve"] = [dict(step=s, samples=n, loss=l) for s, n, l in curve]
    result["train_loss"] = _thin(losses)
    result["lr"] = _thin(lrs)
    if adascale:
        result.update(adascale_gradients=optimizer.samples, progress=optimizer.progress, gain=_thin(gains),
                      tau=_thin(taus), mean_gain=sum(gains) / len(gains), final_gain=gains[-1])
    return result


def _thin(values, points: int = 100) -> list:
    """At most ``points`` (step, value) pairs, evenly spaced, the last one always kept."""
    n = len(values)
    if n == 0:
        return []
    m = min(n, points)
    keep = sorted({round(i * (n - 1) / max(1, m - 1)) for i in range(m)})
    return [(i + 1, values[i]) for i in keep]


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
