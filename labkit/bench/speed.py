"""Where the time of a training step goes: the GPT lab with its speed switches turned on one at a time.

    python -m labkit.bench.speed --device cuda --output docs/results/speed_gpu.txt     # one GPU
    python -m labkit.bench.speed                                                       # CPU, small GPT
    python -m labkit.bench.speed --leave-one-out       # also: everything on but one switch, each in turn
    python -m labkit.bench.speed --long-context 1024   # also: GPT-2's context, the same tokens per step

Each row is one run of ``labkit.labs.train_gpt`` (world size 1 unless --world-size), the same model,
data and steps, with one more switch of ``labkit.speed`` on than the row above it:

    plain fp32        everything off: the lecture's code as written
    + TF32            fp32 matrix multiplies on tensor cores
    + bf16 autocast   matrix multiplies in bf16 (fp32 master weights)
    + flash attention F.scaled_dot_product_attention
    + fused AdamW     AdamW(fused=True)
    + torch.compile   the model compiled
    + batch xK        K times the sequences per step (--big-batch K): a batch that fills the device
    torch DDP         the last row's run with torch's DistributedDataParallel instead of labkit's
                      bucketed DDP (at world size 1: what labkit's wrapper costs)
    context T         (--long-context T) the last row's run with sequences of T tokens, as many fewer
                      of them as keeps the tokens per step: attention's share of the FLOPs grows with T
                      (12·n_layer·T·n_embd per token against 6 per parameter)

On a GPU that torch.compile cannot serve (labkit.speed.compile_problem: no Triton, compute capability
below 7.0) the runs that would compile are left out, and the header says why.

Columns: tokens/s and ms per step (the lab's own timing, its first steps left out), MFU against the
data sheet (GPUs) and against the matrix rate the lab measures on the device, peak memory (the CUDA
allocator's peak on a GPU, the process's resident peak on a CPU), the loss after the last step, and
the speed-up over the row above (the DDP and leave-one-out rows: over the run with every switch on)
and over the first. The table is rewritten after every row, so a run cut short leaves the rows it finished.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from typing import Callable

import torch

from labkit import speed
from labkit.bench import load_average, publish
from labkit.models.gpt import PRESETS, GPTConfig

__all__ = ["ROWS", "plan", "run_row", "measure", "format_table", "build_parser", "main"]

# (row name, switches added to the previous row's); the switches are train_gpt's options.
ROWS = (
    ("plain fp32", dict(dtype="float32", tf32=False, flash=False, fused_optimizer=False, compile=False)),
    ("+ TF32", dict(tf32=True)),
    ("+ bf16 autocast", dict(dtype="bfloat16")),
    ("+ flash attention", dict(flash=True)),
    ("+ fused AdamW", dict(fused_optimizer=True)),
    ("+ torch.compile", dict(compile=True)),
)
SWITCHES = ("tf32", "flash", "fused_optimizer", "compile")


def plan(big_batch: int = 4, leave_one_out: bool = False, long_context: int = 0,
         compile: bool = True) -> list[dict]:
    """The runs, in order: dict(name, switches, batch_factor, ddp, base, block_size), ``base`` the index of
    the run it is compared with (the row above, or the full run for the DDP, context and leave-one-out
    rows); ``block_size`` None: the preset's context. ``compile=False``: no run compiles (a GPU that
    torch.compile cannot serve, labkit.speed.compile_problem)."""
    runs, switches = [], {}
    for name, added in ROWS:
        if not compile and added.get("compile"):
            continue
        switches = {**switches, **added}
        runs.append(dict(name=name, switches=dict(switches), batch_factor=1, ddp="bucketed",
                         base=max(len(runs) - 1, 0)))
    if big_batch > 1:
        runs.append(dict(name=f"+ batch x{big_batch}", switches=dict(switches), batch_factor=big_batch,
                         ddp="bucketed", base=len(runs) - 1))
    full = len(runs) - 1
    runs.append(dict(name="torch DDP", switches=dict(switches), batch_factor=big_batch, ddp="torch", base=full))
    if long_context:
        runs.append(dict(name=f"context {long_context}", switches=dict(switches), batch_factor=big_batch,
                         ddp="bucketed", base=full, block_size=long_context))
    if leave_one_out:
        for name in [s for s in SWITCHES if compile or s != "compile"] + ["dtype"]:
            off = {**switches, name: "float32" if name == "dtype" else False}
            runs.append(dict(name=f"all but {name}", switches=off, batch_factor=big_batch, ddp="bucketed", base=full))
    for run in runs:
        run.setdefault("block_size", None)
    return runs


def sequences(run: dict, batch_size: int, preset_block_size: int) -> int:
    """Sequences per rank per step of a run: the batch times its factor, in as many fewer sequences as
    its context is longer than the preset's (the same tokens per step), at least one."""
    tokens = batch_size * run["batch_factor"] * preset_block_size
    return max(1, tokens // (run.get("block_size") or preset_block_size))


def _options(switches: dict) -> list[str]:
    argv = ["--dtype", switches["dtype"]]
    for name in SWITCHES:
        flag = name.replace("_", "-")
        argv.append(f"--{flag}" if switches[name] else f"--no-{flag}")
    return argv


def run_row(run: dict, args) -> dict:
    """One lab run; returns its metrics (rank 0's)."""
    from labkit.labs import train_gpt

    batch = sequences(run, args.batch_size, GPTConfig.preset(args.preset, 1).block_size)
    with tempfile.TemporaryDirectory(prefix="labkit-speed-") as out_dir:
        argv = ["--world-size", str(args.world_size), "--preset", args.preset, "--steps", str(args.steps),
                "--batch-size", str(batch), "--eval-every", "0",
                *(["--block-size", str(run["block_size"])] if run.get("block_size") else []),
                "--eval-batches", "1", "--ddp", run["ddp"], "--out-dir", out_dir, "--timeout", str(args.timeout),
                *(["--device", args.device] if args.device else []), *_options(run["switches"])]
        return train_gpt.main(argv)


def measure(runs: list[dict], args, runner: Callable | None = None, progress: Callable[[str], None] | None = None,
            on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Each run's row: the run and the numbers the table shows. ``runner(run, args)``: the lab's
    metrics for a run (default :func:`run_row`); ``on_row(rows)`` is called after each run."""
    runner = runner or run_row
    rows = []
    for i, run in enumerate(runs):
        if progress:
            progress(f"[{i + 1}/{len(runs)}] {run['name']}")
        m = runner(run, args)
        rows.append(dict(run, tokens_per_s=m["tokens_per_s"], step_s=m["mean_step_time_s"], mfu=m["mfu"],
                         mfu_of_measured=m["mfu_of_measured"], matmul_tflops=m["measured_matmul_tflops"],
                         peak_memory_bytes=m["peak_memory_bytes"], memory_source=m["peak_memory_source"],
                         loss=m["train_loss"][-1], batch_tokens=m["global_batch_tokens"], params=m["params"],
                         device_name=m["device_name"], peak_source=m["peak_source"]))
        if on_row:
            on_row(rows)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<18} {'tokens/s':>10} {'ms/step':>9} {'MFU sheet':>10} {'MFU meas.':>10} "
             f"{'peak MiB':>9} {'loss':>7} {'vs base':>8} {'vs first':>9}"]
    for i, r in enumerate(rows):
        sheet = "-" if isinstance(r["mfu"], str) else f"{100 * r['mfu']:.1f}%"
        previous = rows[r["base"]]["tokens_per_s"]
        lines.append(f"{r['name']:<18} {r['tokens_per_s']:>10,.0f} {r['step_s'] * 1e3:>9.1f} {sheet:>10} "
                     f"{100 * r['mfu_of_measured']:>9.1f}% {r['peak_memory_bytes'] / 2 ** 20:>9,.0f} "
                     f"{r['loss']:>7.3f} {r['tokens_per_s'] / previous:>7.2f}x "
                     f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:>8.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if there is one")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--preset", default=None, help="GPT size (default: gpu on GPUs, small on CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step before --big-batch (default 32 on GPUs, 8 on CPU)")
    parser.add_argument("--big-batch", type=int, default=4, help="the batch row's factor (1: no such row)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 40 on GPUs, 12 on CPU)")
    parser.add_argument("--leave-one-out", action="store_true", help="also each switch off with the others on")
    parser.add_argument("--long-context", type=int, default=0, metavar="T",
                        help="also the full run with T tokens per sequence, the same tokens per step (0: no such row)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--output", metavar="FILE", help="also write the report to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the raw numbers to FILE")
    return parser


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    args.preset = args.preset or ("gpu" if cuda else "small")
    args.batch_size = (32 if cuda else 8) if args.batch_size is None else args.batch_size
    args.steps = (40 if cuda else 12) if args.steps is None else args.steps
    if args.steps < 5 or args.world_size < 1 or args.batch_size < 1 or args.big_batch < 1 or args.long_context < 0:
        raise ValueError("need --steps >= 5 (the first are left out of the timing) and positive sizes")
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; the presets are {', '.join(PRESETS)}")
    tokens = args.batch_size * args.big_batch * GPTConfig.preset(args.preset, 1).block_size
    if args.long_context and tokens % args.long_context:
        raise ValueError(f"--long-context {args.long_context} must divide the batch row's {tokens} tokens per rank "
                         f"and step, so that its row has the same tokens in longer sequences")
    progress = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    # the lab refuses --compile where torch.compile cannot run (an old GPU, no Triton): measure the rest
    args.compile_problem = speed.compile_problem(torch.device("cuda")) if cuda else None
    if args.compile_problem:
        progress(f"torch.compile left out: {args.compile_problem}")
    load_before, start = load_average(), time.perf_counter()
    runs = plan(args.big_batch, args.leave_one_out, args.long_context, compile=not args.compile_problem)

    def report(rows, final: bool) -> None:
        text = "\n".join(_header(rows, args, load_before, time.perf_counter() - start) +
                         ([] if final else [f"(so far: {len(rows)} of {len(runs)} runs)"]) + ["", format_table(rows)])
        publish(text, args.output, args.json, dict(args=vars(args), rows=rows), echo=final)

    rows = measure(runs, args, progress=progress, on_row=lambda rows: report(rows, final=False))
    report(rows, final=True)
    return rows


def _header(rows: list[dict], args, load_before: str, seconds: float) -> list[str]:
    first = rows[0]
    header = [
        f"labkit.bench.speed: the GPT lab ({args.preset}, {first['params'] / 1e6:.1f} M parameters), world size "
        f"{args.world_size}, {args.batch_size} sequences x {first['batch_tokens'] // args.batch_size // args.world_size}"
        f" tokens per rank per step (x{args.big_batch} in the batch row), {args.steps} steps per run",
        f"{first['device_name']}; torch {torch.__version__}, Python {platform.python_version()}; load average "
        f"{load_before} before, {load_average()} after; whole run {seconds:.0f} s",
        f"MFU sheet: {'against ' if isinstance(first['mfu'], float) else 'none, '}{first['peak_source']}; "
        f"MFU meas.: against the matrix rate measured in each run in its precision "
        f"({first['matmul_tflops']:.3g} TFLOP/s in the first); peak: {first['memory_source']}",
        "vs base: tokens/s against the row above (torch DDP, context and 'all but' rows: against the last run with "
        "every switch on); vs first: against the first row",
    ]
    if getattr(args, "compile_problem", None):
        header.append(f"torch.compile: not measured ({args.compile_problem})")
    return header


if __name__ == "__main__":
    main()
