"""Lab 3: train a small GPT on a novel with data parallelism, torch's DDP or one of labkit's own.

    python -m labkit.labs.train_gpt --world-size 4 --ddp bucketed              # labkit.launch, CPU
    torchrun --standalone --nproc-per-node 4 -m labkit.labs.train_gpt --world-size 4 --ddp torch
    accelerate launch --config_file configs/accelerate/cpu.yaml -m labkit.labs.train_gpt --world-size 4 --ddp overlap
    accelerate launch --config_file configs/accelerate/gpu.yaml --num_processes 8 -m labkit.labs.train_gpt \\
        --world-size 8 --dtype bfloat16
    python -m labkit.labs.train_gpt --resume runs/train_gpt-bucketed-20250101-120000 --steps 400

One step: every rank reads ``--grad-accum`` micro-batches of ``--batch-size`` blocks from its own
shard of the text (``DistributedSampler``), runs forward and backward on each (gradients are
averaged over the ranks only on the last one: ``no_sync()`` on the others), clips the gradient
norm, and takes an AdamW step with a warm-up + cosine learning rate. Rank 0 shows a progress bar,
evaluates on the held-out end of the text every ``--eval-every`` steps, and writes to ``--out-dir``:
``metrics.json`` (losses, tokens/s, step time, model FLOPs utilisation, peak memory), ``loss.png`` and
``checkpoint.pt`` (at the end, and every ``--checkpoint-every`` steps). ``--resume RUN`` continues a
run exactly where it stopped, with the options it was started with unless given again: N steps in
one go and N/2 + N/2 give the same parameters, bit for bit.

Device and backend come from the launcher alone, as in lab 1: one GPU per process with NCCL when
there are enough GPUs (the GPU from LOCAL_RANK), else CPU processes over gloo.

Speed: the switches (``--dtype``, ``--tf32``, ``--flash``, ``--compile``, ``--fused-optimizer``) are
explained, and their defaults set, in one place, labkit.speed: all on for GPUs, all off on a CPU.
``python -m labkit.bench.speed`` turns them on one at a time and measures each.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from labkit import checkpoint, comm, speed
from labkit.ddp import BucketedDDP, NaiveDDP, OverlapDDP
from labkit.labs.entry import run_as_script, run_lab, under_launcher
from labkit.models.gpt import GPT, PRESETS, GPTConfig
from labkit.text import CharTokenizer, TokenBlocks, batches, distributed_loader, load_corpus, split_tokens

DDP_CHOICES = ("torch", "naive", "overlap", "bucketed")
CHECKPOINT = "checkpoint.pt"

# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class _HelpWithDefaults(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, unless X is None (then the help says it)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and action.option_strings and action.nargs != 0:
            help_text += " (default: %(default)s)"
        return help_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpWithDefaults,
                                allow_abbrev=False)   # exact option names: see _inherit_from_checkpoint
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes expected (checked against the launcher's world); "
                        "without a launcher, how many workers labkit.launch starts (default 1)")
    p.add_argument("--ddp", choices=DDP_CHOICES, default="bucketed",
                   help="torch: torch.nn.parallel.DistributedDataParallel; naive/overlap/bucketed: labkit.ddp")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="bucket size of --ddp bucketed and torch")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="model size (default: tiny on CPU, gpu on GPUs)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per sequence, the model's context (default: the preset's; GPT-2's is 1024)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability (a different mask on each rank)")
    p.add_argument("--flash", action=argparse.BooleanOptionalAction, default=None,
                   help="fused scaled_dot_product_attention (default: on GPUs only; see labkit.speed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (default: on GPUs that Triton supports; the first "
                        "steps compile)")
    p.add_argument("--fused-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="AdamW(fused=True), one kernel for the whole step (default: on GPUs only)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="TF32 tensor cores for the matrix multiplies left in float32 (default: on Ampere GPUs "
                        "and later)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in the whole run")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch, per rank")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (no_sync on all but the last)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="learning rate at the end (default lr/10)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default steps/10, at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of the 2-D weights")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches per rank")
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order, dropout")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="bfloat16: autocast; weights, gradients and all-reduces stay float32 "
                        "(default: bfloat16 on Ampere GPUs and later; float32 on older ones and on CPU, the "
                        "digits the lessons print)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: one GPU per process if there are enough, else CPU")
    p.add_argument("--out-dir", default=None,
                   help="where metrics.json, loss.png and checkpoint.pt go "
                        "(default runs/train_gpt-<ddp>-<time>, or the --resume folder)")
    p.add_argument("--resume", default=None, help="a checkpoint file, or a run's folder holding checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save a checkpoint every N steps (one is always saved at the end)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step as if the job were killed (the schedule still follows --steps); "
                        "continue with --resume")
    p.add_argument("--sample", type=int, default=0, help="rank 0 prints N generated characters at the end")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device, for the model FLOPs utilisation (default: known GPUs)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a rank may wait in a collective")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.resume is not None:
        _inherit_from_checkpoint(p, argv, args)
    check_args(args)
    return args


# Options a resumed run never takes from the checkpoint it continues.
NOT_INHERITED = {"help", "resume", "out_dir", "stop_after"}
# Switches older checkpoints do not record (labkit.speed): those runs had them off.
SWITCHES_ADDED_LATER = ("compile", "tf32", "fused_optimizer")


def _inherit_from_checkpoint(parser, argv, args) -> None:
    """``--resume RUN`` continues RUN as it was started: every option not given on this command
    line takes the value saved in the checkpoint (so ``--resume RUN --steps 400`` just trains longer)."""
    saved = checkpoint.load(checkpoint_path(args.resume))["args"]
    # A checkpoint from before a switch existed ran without it: continue so (else a GPU would turn
    # compile, TF32 and the fused optimizer on halfway, and the resumed run would not be the same run).
    saved = {**{name: False for name in SWITCHES_ADDED_LATER}, **saved}
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for action in parser._actions:
        if (action.dest in saved and action.dest not in NOT_INHERITED
                and not given.intersection(action.option_strings)):
            setattr(args, action.dest, saved[action.dest])


def check_args(args) -> None:
    """Refuse a bad command line here, in every process, before any rendezvous."""
    def positive(name, value):
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("steps", "batch_size", "grad_accum", "lr", "eval_batches", "timeout", "world_size",
                 "peak_tflops", "block_size"):
        positive(name, getattr(args, name))
    for name in ("eval_every", "checkpoint_every", "sample", "grad_clip", "weight_decay", "warmup_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.ddp in ("bucketed", "torch") and not args.bucket_cap_mb > 0:
        raise ValueError(f"--ddp {args.ddp} needs a positive --bucket-cap-mb, got {args.bucket_cap_mb}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.steps:
        raise ValueError(f"--stop-after must be between 1 and --steps {args.steps}, got {args.stop_after}")
    if args.resume is not None:
        checkpoint_path(args.resume)   # raises if it is not there


def checkpoint_path(resume: str) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"--resume {resume}: this folder has no {CHECKPOINT} (a run writes one at "
                                    f"its end and every --checkpoint-every steps)")
    elif not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file or run folder")
    return path


# --------------------------------------------------------------------------------------------
# Data, model, optimizer, schedule
# --------------------------------------------------------------------------------------------

def load_text(preset: str, dropout: float, flash: bool, block_size: int | None = None):
    """The model's configuration and the text cut into blocks of its context length (the preset's,
    or ``block_size``). Every rank builds the same tokenizer and the same blocks from the same text."""
    text = load_corpus()
    tok = CharTokenizer.from_text(text)
    config = GPTConfig.preset(preset, tok.vocab_size, dropout=dropout, flash=flash,
                              **({"block_size": block_size} if block_size else {}))
    train_tokens, val_tokens = split_tokens(tok.encode(text))
    try:
        return config, tok, TokenBlocks(train_tokens, config.block_size), TokenBlocks(val_tokens, config.block_size)
    except ValueError as exc:
        raise ValueError(f"--block-size {config.block_size} is too long for the validation text: {exc}") from None


def check_data_fits(train_blocks, val_blocks, batch_size: int, world_size: int) -> None:
    per_rank = len(train_blocks) // world_size
    if per_rank < batch_size:
        raise ValueError(
            f"--batch-size {batch_size} per rank does not fit: the training text has {len(train_blocks)} blocks "
            f"of {train_blocks.block_size} tokens, {per_rank} per rank at world size {world_size}. "
            f"Use a smaller --batch-size (and --grad-accum to keep the global batch).")
    if len(val_blocks) // world_size < 1:
        raise ValueError(f"the validation text has {len(val_blocks)} blocks, fewer than the {world_size} ranks")


def make_loader(blocks, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool):
    loader = distributed_loader(blocks, batch_size, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
    # Each iter(loader) draws a seed from loader.generator, or from the global RNG when it is None:
    # give it its own, so that reading data never moves the RNG that dropout uses (exact resume).
    loader.generator = torch.Generator().manual_seed(seed)
    return loader


class DataStream:
    """This rank's endless batches, remembering where it is: (epoch, index of the next batch).

    The sampler's order is a function of (seed, epoch) alone, so that pair is all a checkpoint
    needs; resuming skips the batches of the current epoch that were already read.
    """

    def __init__(self, loader, epoch: int = 0, position: int = 0):
        self.loader, self.epoch, self.position = loader, epoch, position
        self._batches = batches(loader, start_epoch=epoch)
        for _ in range(position):           # cheap: a batch is a few slices of one tensor
            next(self._batches)

    def next(self):
        epoch, step, x, y = next(self._batches)
        self.epoch, self.position = (epoch, step + 1) if step + 1 < len(self.loader) else (epoch + 1, 0)
        return x, y


def wrap(model: nn.Module, args, device: torch.device) -> nn.Module:
    """The four ways of averaging gradients; each broadcasts rank 0's weights when it wraps."""
    if args.ddp == "torch":
        # The GPT's only buffers are constant causal masks: synchronised when wrapping (as labkit's
        # wrappers do), not re-sent at every forward (torch >= 2.13 renamed broadcast_buffers).
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                          else {"broadcast_buffers": False})
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=args.bucket_cap_mb, **no_buffer_sync)
    if args.ddp == "naive":
        return NaiveDDP(model)
    if args.ddp == "overlap":
        return OverlapDDP(model)
    return BucketedDDP(model, bucket_cap_mb=args.bucket_cap_mb)


def make_optimizer(model: nn.Module, args, switches: speed.Switches | None = None) -> torch.optim.AdamW:
    """AdamW; weight decay on the 2-D weights (matrices, embeddings), none on biases and LayerNorms;
    fused when the switch is on."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95),
                             **speed.adamw_options(switches or speed.Switches()))


def lr_at(step: int, args) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine decay to min_lr.
    A pure function of the step, so a resumed run needs only the step number."""
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, args.steps // 10)
    min_lr = args.min_lr if args.min_lr is not None else args.lr / 10
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------------
# Collectives of the training loop (besides the gradient all-reduce inside DDP)
# --------------------------------------------------------------------------------------------

def mean_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    comm.all_reduce(t)                    # SUM: gloo has no AVG
    return t.item() / dist.get_world_size()


def checksum(module: nn.Module) -> int:
    """CRC32 of every parameter and buffer's bytes: equal checksums, (all but surely) equal replicas."""
    crc = 0
    for name, t in sorted(module.state_dict().items()):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def replicas_identical(module: nn.Module, device) -> bool:
    mine = torch.tensor([checksum(module)], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    comm.all_gather(everyone, mine)
    return all(int(c) == int(mine) for c in everyone)


@torch.no_grad()
def evaluate(module: nn.Module, val_loader, n_batches: int, device, autocast) -> float:
    """Mean validation loss over this rank's first n_batches batches, averaged over the ranks."""
    module.eval()
    total, count = 0.0, 0
    for x, y in val_loader:
        if count == n_batches:
            break
        with autocast():
            _, loss = module(x.to(device), y.to(device))
        total, count = total + loss.item(), count + 1
    module.train()
    return mean_over_ranks(total / count, device)


# --------------------------------------------------------------------------------------------
# Checkpoints and outputs
# --------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, module, optimizer, step: int, data: DataStream, history: dict, args,
                    device) -> None:
    """Every rank's random state is gathered; rank 0 writes the file whole (labkit.checkpoint.save)."""
    states = checkpoint.all_rng_states(device)
    if dist.get_rank() != 0:
        return
    state = {
        "model": module.state_dict(),            # the unwrapped model: loads without any DDP
        "optimizer": optimizer.state_dict(),
        "scheduler": {"kind": "warmup-cosine", "step": step},   # lr_at(step, args) is the whole state
        "step": step,
        "data": {"epoch": data.epoch, "position": data.position},  # same on every rank
        "rng": states,                            # one per rank
        "world_size": dist.get_world_size(),
        "history": history,
        "args": vars(args),
    }
    checkpoint.save(state, path)


# What a resumed run must share with the run that wrote the checkpoint for the data order (and so
# the result) to continue exactly; the rest (lr, steps, eval, ddp flavour...) may change.
MUST_MATCH = ("preset", "block_size", "batch_size", "grad_accum", "seed", "dropout")


def _saved_arg(saved: dict, name: str):
    """A checkpoint's option, as the run used it (checkpoints from before --block-size: the preset's)."""
    if name == "block_size" and saved.get(name) is None and saved.get("preset") in PRESETS:
        return GPTConfig.preset(saved["preset"], 1).block_size
    return saved.get(name)


def load_checkpoint(path: Path, args, device, world_size: int) -> dict:
    state = checkpoint.load(path, map_location=device)
    old = state["args"]
    diff = [f"--{k.replace('_', '-')} {_saved_arg(old, k)} (now {getattr(args, k)})" for k in MUST_MATCH
            if _saved_arg(old, k) != getattr(args, k)]
    if state["world_size"] != world_size:
        diff.append(f"world size {state['world_size']} (now {world_size})")
    if diff:
        raise ValueError(f"cannot resume {path} exactly: it was written with " + ", ".join(diff) +
                         ". The data order (each rank's shard, the position in the epoch) depends on these.")
    if state["step"] >= args.steps:
        raise ValueError(f"{path} is at step {state['step']} and --steps is {args.steps}: nothing to do. "
                         f"Pass a larger --steps to train on.")
    return state


def plot_losses(metrics: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # no pyplot: no global backend change
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    losses = metrics["train_loss"]
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="train (global batch)")
    if metrics["eval_loss"]:
        steps, values = zip(*metrics["eval_loss"])
        ax.plot(steps, values, "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)",
           title=f"GPT {metrics['preset']}, {metrics['world_size']} × {metrics['ddp']} DDP ({metrics['backend']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------
# One rank's training run
# --------------------------------------------------------------------------------------------

def train(args, device: torch.device) -> dict:
    """Train on this rank; the process group is initialised. Returns the metrics (rank 0's in full)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    is_cuda = device.type == "cuda"
    speed.reset_peak_memory(device)
    preset = args.preset = args.preset or ("gpu" if is_cuda else "tiny")
    args.block_size = args.block_size or GPTConfig.preset(preset, 1).block_size
    switches = resolve_switches(args, device)
    autocast = speed.autocast(switches, device)
    speed.set_tf32(switches.tf32)

    # One output folder, chosen by rank 0 (under torchrun every rank reads its own clock).
    out_dir = [str(resolve_out_dir(args))]
    comm.broadcast_objects(out_dir, src=0)
    out_dir = Path(out_dir[0])

    config, tok, train_blocks, val_blocks = load_text(preset, args.dropout, switches.flash, args.block_size)
    check_data_fits(train_blocks, val_blocks, args.batch_size, world_size)
    train_loader = make_loader(train_blocks, args.batch_size, rank, world_size, args.seed, shuffle=True)
    eval_batch = min(args.batch_size, len(val_blocks) // world_size)
    val_loader = make_loader(val_blocks, eval_batch, rank, world_size, args.seed, shuffle=False)

    torch.manual_seed(args.seed)                 # the same initial weights everywhere (DDP checks anyway)
    model = GPT(config)
    state = None
    if args.resume:
        state = load_checkpoint(checkpoint_path(args.resume), args, device, world_size)
        model.load_state_dict(state["model"])
    model.to(device)
    speed.compile_blocks(model, switches)     # in place, block by block: see labkit.speed
    ddp_model = wrap(model, args, device)
    if not replicas_identical(model, device):
        raise RuntimeError("the replicas differ after wrapping the model: the wrapper did not broadcast rank 0's "
                           "weights")
    optimizer = make_optimizer(model, args, switches)
    torch.manual_seed(args.seed + 1 + rank)      # dropout: a different mask on every rank
    if state is None:
        start_step, data = 0, DataStream(train_loader)
        history = {"train_loss": [], "lr": [], "step_time_s": [], "eval_loss": []}
    else:
        load_optimizer_state(optimizer, state["optimizer"], switches)
        start_step = state["step"]
        data = DataStream(train_loader, state["data"]["epoch"], state["data"]["position"])
        history = state["history"]
        checkpoint.set_rng_state(state["rng"][rank], device)   # last: nothing above may draw from it
        del state

    last_step = args.stop_after or args.steps
    seqs_per_step = world_size * args.grad_accum * args.batch_size
    tokens_per_step = seqs_per_step * config.block_size
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"GPT {preset}: {model.num_params():,} parameters, {model.flops_per_token():,} FLOPs per token | "
              f"{world_size} rank(s) x {args.grad_accum} micro-batch(es) x {args.batch_size} sequences = "
              f"global batch {seqs_per_step} sequences, {tokens_per_step:,} tokens | "
              f"ddp={args.ddp}, {dist.get_backend()} on {device.type}, {switches.describe()} | "
              f"steps {start_step + 1}..{last_step} of {args.steps}"
              f"{f' (resumed from {args.resume})' if start_step else ''} | {out_dir}", flush=True)
    if start_step == 0:
        history["eval_loss"].append((0, evaluate(model, val_loader, args.eval_batches, device, autocast)))

    from tqdm import tqdm   # not tqdm.auto: a worker forked from a notebook cannot draw widgets
    bar = tqdm(total=last_step, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    times = []
    for step in range(start_step, last_step):
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        local_loss = 0.0
        for micro in range(args.grad_accum):
            x, y = data.next()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # gradients are averaged over the ranks only in the last micro-batch's backward
            sync = micro == args.grad_accum - 1
            with contextlib.nullcontext() if sync else ddp_model.no_sync():
                with autocast():
                    _, loss = ddp_model(x, y)
                (loss / args.grad_accum).backward()
            local_loss += loss.detach() / args.grad_accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        loss_value = mean_over_ranks(float(local_loss), device)   # .item(): waits for the GPU too
        dt = time.perf_counter() - t0
        times.append(dt)
        history["train_loss"].append(loss_value)
        history["lr"].append(lr)
        history["step_time_s"].append(dt)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
        bar.update(1)
        done = step + 1
        if done == last_step or (args.eval_every and done % args.eval_every == 0):
            val = evaluate(model, val_loader, args.eval_batches, device, autocast)
            history["eval_loss"].append((done, val))
            if rank == 0:
                bar.write(f"step {done:5d}/{args.steps}  train loss {loss_value:.4f}  val loss {val:.4f}  "
                          f"{tokens_per_step / dt:,.0f} tokens/s  lr {lr:.2e}")
        if done == last_step or (args.checkpoint_every and done % args.checkpoint_every == 0):
            save_checkpoint(out_dir / CHECKPOINT, model, optimizer, done, data, history, args, device)
    bar.close()

    identical = replicas_identical(model, device)
    peak_memory, memory_source = speed.peak_memory_bytes(device)
    # Throughput of this run, leaving out its first step (bucket rebuild, allocator warm-up), or its
    # first three under --compile (compiling, and a recompilation or two as the first steps settle).
    skip = 3 if switches.compile else 1
    timed = times[skip:] or times[-1:]
    tokens_per_s = tokens_per_step * len(timed) / sum(timed)
    flops = tokens_per_s * model.flops_per_token()
    peak, peak_source = speed.datasheet_peak_flops(device, args.peak_tflops)
    # The matrix rate this device really reaches, in the run's matmul precision (rank 0 measures;
    # after training, so that it takes nothing from the timed steps).
    matmul = speed.measured_matmul_flops(device, torch.bfloat16 if switches.dtype == "bfloat16"
                                         else torch.float32) if rank == 0 else None
    metrics = dict(
        rank=rank, world_size=world_size, backend=dist.get_backend(), device=str(device),
        device_name=torch.cuda.get_device_name(device) if is_cuda else "cpu", ddp=args.ddp, preset=preset,
        dtype=args.dtype, switches=vars(switches), config=vars(args), model_config=vars(config),
        params=model.num_params(),
        flops_per_token=model.flops_per_token(), global_batch_sequences=seqs_per_step,
        global_batch_tokens=tokens_per_step, steps_done=last_step, resumed_from_step=start_step or None,
        train_loss=history["train_loss"], eval_loss=history["eval_loss"], lr=history["lr"],
        step_time_s=history["step_time_s"], tokens_per_s=tokens_per_s,
        mean_step_time_s=sum(timed) / len(timed), achieved_tflops=flops / 1e12,
        mfu=flops / (peak * world_size) if peak else "unknown", peak_tflops_per_device=peak and peak / 1e12,
        peak_source=peak_source, measured_matmul_tflops=matmul and matmul / 1e12,
        mfu_of_measured=matmul and flops / (matmul * world_size), timed_steps=len(timed),
        peak_memory_bytes=peak_memory, peak_memory_source=memory_source,
        compiled_graphs=compiled_graphs() if switches.compile else 0,
        replicas_identical=identical, param_checksum=checksum(model),
        out_dir=str(out_dir))
    if rank == 0:
        if args.sample:
            metrics["sample"] = sample_text(model, tok, args.sample, args.seed, device)
            print(f"--- {args.sample} characters sampled from the model ---\n{metrics['sample']}\n---", flush=True)
        with open(out_dir / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=1)
        plot_losses(metrics, out_dir / "loss.png")
    return metrics


def speed_line(result: dict) -> str:
    """Tokens/s, MFU against the data sheet and against the measured matrix rate, peak memory."""
    mfu, switches = result["mfu"], result["switches"]
    on = ", ".join(name for name, value in switches.items() if value is True) or "no switch on"
    sheet = (f"{100 * mfu:.1f} % of the data sheet's {result['peak_tflops_per_device']:g} TFLOP/s"
             if not isinstance(mfu, str) else f"unknown against a data sheet ({result['peak_source']})")
    return (f"{result['tokens_per_s']:,.0f} tokens/s, {result['mean_step_time_s'] * 1e3:.1f} ms/step, "
            f"{result['achieved_tflops']:.3g} TFLOP/s of model FLOPs; MFU {sheet}, "
            f"{100 * result['mfu_of_measured']:.1f} % of the {result['measured_matmul_tflops']:.3g} TFLOP/s its "
            f"matrix multiplies reach here; peak memory {result['peak_memory_bytes'] / 2 ** 20:,.0f} MiB "
            f"({result['peak_memory_source']}) [{switches['dtype']}, {on}]")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, switches: speed.Switches) -> None:
    """The saved moments and step counts; the kernel this run asked for (``--fused-optimizer``), not
    the one the saved param groups name (``load_state_dict`` would restore their ``fused`` flag)."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        group["fused"] = speed.adamw_options(switches).get("fused")


def compiled_graphs() -> int:
    """Graphs torch.compile made in this process: one or a few; more means recompilations."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def resolve_switches(args, device: torch.device) -> speed.Switches:
    """labkit.speed's defaults for this device, overridden by the options given; written back into
    ``args`` so that a checkpoint records what the run used."""
    switches = speed.default_switches(device)
    for name in ("dtype", "tf32", "flash", "compile", "fused_optimizer"):
        if getattr(args, name) is not None:
            setattr(switches, name, getattr(args, name))
        setattr(args, name, getattr(switches, name))
    problem = speed.compile_problem(device) if switches.compile else None
    if problem:
        inherited = f" (as in the checkpoint of --resume {args.resume})" if args.resume else ""
        raise ValueError(f"--compile{inherited}: {problem}; run with --no-compile")
    return switches


def sample_text(model: GPT, tok: CharTokenizer, n: int, seed: int, device) -> str:
    model.eval()
    start = tok.encode("\n") if "\n" in tok.chars else torch.zeros(1, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(start.view(1, 1).to(device), n, generator=generator)
    model.train()
    return tok.decode(out[0, 1:].cpu())


def resolve_out_dir(args) -> Path:
    """--out-dir; else the folder of the run being resumed; else runs/train_gpt-<ddp>-<time>."""
    if args.out_dir:
        return Path(args.out_dir)
    if args.resume:
        return checkpoint_path(args.resume).parent
    return Path("runs") / f"train_gpt-{args.ddp}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


# --------------------------------------------------------------------------------------------
# Entry point: under a launcher, or starting the workers itself
# --------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    if not under_launcher():
        args.out_dir = str(resolve_out_dir(args))   # chosen once, here, for every worker
    rank, result = run_lab(train, args, device=args.device)
    if rank == 0:
        print(f"world size {result['world_size']} ({result['backend']} on {result['device']}), ddp={result['ddp']}: "
              f"final train loss {result['train_loss'][-1]:.4f}, val loss {result['eval_loss'][-1][1]:.4f}, "
              f"replicas identical: {result['replicas_identical']} -> {result['out_dir']}\n"
              f"speed: {speed_line(result)}", flush=True)
    return result


if __name__ == "__main__":
    run_as_script(main)
