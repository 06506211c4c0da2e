"""Lesson 4's experiment: one GPT trained at batch sizes B … 32·B with four large-batch recipes.

    lr_multiplier, schedule    the scaling rules and the learning-rate schedule
    Data, my_slices            one seeded stream of samples, and this rank's slice of a global batch
    make_optimizer, train_run  one method trained at one batch size k·B, on this rank
    mean_loss, average_gradients_and_loss, first_reach     its pieces, which lesson 4 uses on their own

The sweep over methods and batch sizes (its options, the tuning at k = 1, the launch, the summary
table) is :mod:`labkit.large_batch_sweep`; the command line over it is the lab
``python -m labkit.labs.large_batch`` (its options are the sweep's, with dashes); the figures are in
:mod:`labkit.large_batch_figures`.

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

import math
import time

import torch
import torch.nn.functional as F

from labkit import comm
from labkit.data_parallel import all_reduce_mean_
from labkit.models.gpt import GPT, GPTConfig
from labkit.optim import AdaScale, Lamb, lamb_param_groups, warmup_factor
from labkit.text import CharTokenizer, TokenBlocks, load_corpus, split_tokens

__all__ = ["METHODS", "DEFAULT_LRS", "SCALING_RULES", "DECAYS", "Data", "mean_loss", "average_gradients_and_loss",
           "lr_multiplier", "scaling_rule", "schedule", "adascale_gradients", "first_reach", "my_slices", "make_optimizer",
           "train_run"]

METHODS = ("sgd", "adam", "lamb", "adascale")
# Base learning rates tried at k = 1 (factors of about 3 apart, around what works for this GPT).
DEFAULT_LRS = {"sgd": (0.1, 0.3, 1.0), "adam": (1e-3, 3e-3, 1e-2), "lamb": (3e-3, 1e-2, 3e-2)}
SCALING_RULES = ("linear", "sqrt", "none")
DECAYS = ("cosine", "linear", "constant")


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
