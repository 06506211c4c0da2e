"""Where the time of a training step goes: the GPT lab with its speed switches turned on one at a time.

    python -m labkit.bench.speed --device cuda --output docs/results/speed_gpu.txt     # one GPU
    python -m labkit.bench.speed                                                       # CPU, small GPT
    python -m labkit.bench.speed --leave-one-out       # also: everything on but one switch, each in turn

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

Columns: tokens/s and ms per step (the lab's own timing, its first steps left out), MFU against the
data sheet (GPUs) and against the matrix rate the lab measures on the device, peak memory (the CUDA
allocator's peak on a GPU, the process's resident peak on a CPU), the loss after the last step, and
the speed-up over the row above (the DDP and leave-one-out rows: over the run with every switch on)
and over the first.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import torch

from labkit.bench import load_average, publish

__all__ = ["ROWS", "plan", "run_row", "measure", "format_table", "main"]

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


def plan(big_batch: int = 4, leave_one_out: bool = False) -> list[dict]:
    """The runs, in order: dict(name, switches, batch_factor, ddp, base), ``base`` the index of the run
    it is compared with (the row above, or the full run for the DDP and leave-one-out rows)."""
    runs, switches = [], {}
    for name, added in ROWS:
        switches = {**switches, **added}
        runs.append(dict(name=name, switches=dict(switches), batch_factor=1, ddp="bucketed",
                         base=max(len(runs) - 1, 0)))
    if big_batch > 1:
        runs.append(dict(name=f"+ batch x{big_batch}", switches=dict(switches), batch_factor=big_batch,
                         ddp="bucketed", base=len(runs) - 1))
    full = len(runs) - 1
    runs.append(dict(name="torch DDP", switches=dict(switches), batch_factor=big_batch, ddp="torch", base=full))
    if leave_one_out:
        for name in SWITCHES + ("dtype",):
            off = {**switches, name: "float32" if name == "dtype" else False}
            runs.append(dict(name=f"all but {name}", switches=off, batch_factor=big_batch, ddp="bucketed", base=full))
    return runs


def _options(switches: dict) -> list[str]:
    argv = ["--dtype", switches["dtype"]]
    for name in SWITCHES:
        flag = name.replace("_", "-")
        argv.append(f"--{flag}" if switches[name] else f"--no-{flag}")
    return argv


def run_row(run: dict, args) -> dict:
    """One lab run; returns its metrics (rank 0's)."""
    from labkit.labs import train_gpt

    with tempfile.TemporaryDirectory(prefix="labkit-speed-") as out_dir:
        argv = ["--world-size", str(args.world_size), "--preset", args.preset, "--steps", str(args.steps),
                "--batch-size", str(args.batch_size * run["batch_factor"]), "--eval-every", "0",
                "--eval-batches", "1", "--ddp", run["ddp"], "--out-dir", out_dir, "--timeout", str(args.timeout),
                *(["--device", args.device] if args.device else []), *_options(run["switches"])]
        return train_gpt.main(argv)


def measure(runs: list[dict], args, runner=None, progress=None) -> list[dict]:
    """Each run's row: the run and the numbers the table shows. ``runner(run, args)``: the lab's
    metrics for a run (default :func:`run_row`)."""
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


def main(argv=None) -> list[dict]:
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
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--output", metavar="FILE", help="also write the report to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the raw numbers to FILE")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    args.preset = args.preset or ("gpu" if cuda else "small")
    args.batch_size = (32 if cuda else 8) if args.batch_size is None else args.batch_size
    args.steps = (40 if cuda else 12) if args.steps is None else args.steps
    if args.steps < 5 or args.world_size < 1 or args.batch_size < 1 or args.big_batch < 1:
        raise ValueError("need --steps >= 5 (the first are left out of the timing) and positive sizes")
    progress = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    load_before, start = load_average(), time.perf_counter()
    rows = measure(plan(args.big_batch, args.leave_one_out), args, progress=progress)
    first = rows[0]
    header = [
        f"labkit.bench.speed: the GPT lab ({args.preset}, {first['params'] / 1e6:.1f} M parameters), world size "
        f"{args.world_size}, {args.batch_size} sequences x {first['batch_tokens'] // args.batch_size // args.world_size}"
        f" tokens per rank per step (x{args.big_batch} in the batch row), {args.steps} steps per run",
        f"{first['device_name']}; torch {torch.__version__}, Python {platform.python_version()}; load average "
        f"{load_before} before, {load_average()} after; whole run {time.perf_counter() - start:.0f} s",
        f"MFU sheet: {'against ' if isinstance(first['mfu'], float) else 'none, '}{first['peak_source']}; "
        f"MFU meas.: against the matrix rate measured in each run in its precision "
        f"({first['matmul_tflops']:.3g} TFLOP/s in the first); peak: {first['memory_source']}",
        "vs base: tokens/s against the row above (torch DDP and 'all but' rows: against the last run with every "
        "switch on); vs first: against the first row",
    ]
    publish("\n".join(header + ["", format_table(rows)]), args.output, args.json, dict(args=vars(args), rows=rows))
    return rows


if __name__ == "__main__":
    main()
