"""Bytes, step time and steps to a target loss of each remedy for the communication bottleneck, on one GPT.

    python -m labkit.bench.compression [--world-size 4] [--steps 250] [--bandwidths 1000 20] [--json FILE]

Each method of :mod:`labkit.compressed_training` (all-reduce, fp16, bf16, top-k with and without error feedback,
PowerSGD rank 1 with and without error feedback and rank 4, local SGD and DiLoCo every 8 steps) trains the small GPT
on the course's text for ``steps`` AdamW steps (``--optimizer sgd``: SGD with momentum) on N processes, every method
in turn on the same processes, once per emulated bandwidth (one link class, α = 100 µs; MB/s as given). The table
shows per method: MiB each rank sends per step (the mean over the run), the median step time at each bandwidth, the
loss of the last 10 steps, and the steps and seconds it takes to reach the target loss (the all-reduce run's loss
after 80 % of the steps, averaged over 10 steps). ``--json`` writes every run's losses, bytes and seconds (lesson 9
loads docs/results/compression.json).

Then PowerSGD from scratch (labkit.compression.powersgd_hook) against torch's powerSGD_hook under torch's DDP, with
no emulated network (torch's hook sends through torch.distributed directly, which labkit.comm cannot hold): the
median step time of each, taking turns, and the bytes labkit's recorded against the count of torch's P and Q.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")     # before torch is imported: N workers share the cores

import gc  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import labkit  # noqa: E402
from labkit.bench import gpt_parser, load_average, publish  # noqa: E402
from labkit.compressed_training import VOCAB_SIZE, text_batch, train_each  # noqa: E402
from labkit.models.gpt import GPT, GPTConfig  # noqa: E402
from labkit.network import Link, Network  # noqa: E402

__all__ = ["METHODS", "measure", "summarise", "format_table", "powersgd_against_torch", "main"]

METHODS = ("allreduce", "fp16", "bf16", "topk", "topk-noef", "powersgd-r1", "powersgd-r1-noef", "powersgd-r4", "localsgd-8", "diloco-8")


def measure(world_size: int, config: GPTConfig, *, methods=METHODS, steps: int = 250, batch: int = 4,
            lr: float = 2e-3, optimizer: str = "adamw", bandwidths=(1000.0, 20.0), timeout: float = 600.0) -> dict:
    """Every method at every bandwidth (MB/s); rank 0's runs."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if steps < 10 or batch < 1 or not bandwidths:
        raise ValueError("steps must be at least 10, batch at least 1, and at least one bandwidth given")
    runs = {}
    for mbs in bandwidths:
        network = Network(inside=Link(alpha=1e-4, bandwidth=mbs * 1e6))
        each = labkit.launch(train_each, methods, config, steps=steps, batch=batch, lr=lr, optimizer=optimizer, network=network,
                             world_size=world_size, timeout=timeout)[0]
        for method, run in each.items():   # rounded: the JSON is committed for lesson 9
            runs[(method, mbs)] = dict(losses=[round(x, 5) for x in run.losses], bytes=run.bytes,
                                       seconds=[round(x, 5) for x in run.seconds])
    return dict(runs=runs, methods=list(methods), bandwidths=list(bandwidths), steps=steps, lr=lr,
                optimizer=optimizer, world_size=world_size, params=GPT(config).num_params())


def _window(steps: int) -> int:
    return max(1, min(10, steps // 5))             # losses are averaged over this many steps (10 in a real run)


def _reached(losses, target, window):
    """The first step whose mean over the last ``window`` steps is at or below ``target`` (None: never)."""
    for i in range(window - 1, len(losses)):
        if sum(losses[i - window + 1:i + 1]) / window <= target:
            return i
    return None


def summarise(result: dict) -> dict:
    steps = result["steps"]
    first = result["bandwidths"][0]
    reference = result["runs"][("allreduce", first)]["losses"]
    end, window = int(0.8 * steps), _window(steps)
    target = sum(reference[end - window:end]) / window
    rows = {}
    for method in result["methods"]:
        row = dict(mib_per_step=result["runs"][(method, first)]["bytes"][-1] / steps / 2 ** 20)
        for mbs in result["bandwidths"]:
            run = result["runs"][(method, mbs)]
            times = [b - a for a, b in zip(run["seconds"], run["seconds"][1:])]
            row[f"step_s@{mbs:g}"] = statistics.median(times)
            at = _reached(run["losses"], target, window)
            row[f"to_target_s@{mbs:g}"] = run["seconds"][at] if at is not None else None
            if mbs == first:
                row["last_loss"] = sum(run["losses"][-window:]) / window
                row["to_target_steps"] = at + 1 if at is not None else None
        rows[method] = row
    return dict(target=target, rows=rows)


def format_table(result: dict) -> str:
    summary = summarise(result)
    bws = result["bandwidths"]
    head = f"{'method':<17} {'MiB/step':>9} " + " ".join(f"{'step ms @' + format(b, 'g'):>13}" for b in bws)
    head += f" {'loss (last 10)':>15} {'steps to target':>16} " + " ".join(f"{'s to target @' + format(b, 'g'):>17}"
                                                                          for b in bws)
    lines = [f"target loss {summary['target']:.3f} (all-reduce's, at 80 % of the steps)", head]
    for method, r in summary["rows"].items():
        line = f"{method:<17} {r['mib_per_step']:>9.3f} " + " ".join(f"{1e3 * r[f'step_s@{b:g}']:>13.1f}" for b in bws)
        steps = "never" if r["to_target_steps"] is None else str(r["to_target_steps"])
        line += f" {r['last_loss']:>15.3f} {steps:>16} "
        line += " ".join(f"{'-' if r[f'to_target_s@{b:g}'] is None else format(r[f'to_target_s@{b:g}'], '.1f'):>17}"
                         for b in bws)
        lines.append(line)
    return "\n".join(lines)


def _powersgd_worker(config: GPTConfig, steps: int, batch: int, rank_r: int):
    """Both hooks under torch's DDP, taking turns step by step: their step times and labkit's recorded bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as theirs

    from labkit import comm
    from labkit.compression import PowerSGDState, powersgd_hook

    rank, n = dist.get_rank(), dist.get_world_size()
    ddps, opts = {}, {}
    for name in ("labkit", "torch"):
        torch.manual_seed(0)
        ddps[name] = torch.nn.parallel.DistributedDataParallel(GPT(config))
        state, hook = ((PowerSGDState(rank=rank_r), powersgd_hook) if name == "labkit" else
                       (theirs.PowerSGDState(None, matrix_approximation_rank=rank_r, start_powerSGD_iter=2),
                        theirs.powerSGD_hook))
        ddps[name].register_comm_hook(state, hook)
        opts[name] = torch.optim.AdamW(ddps[name].parameters(), lr=3e-3)
    times, sent = {name: [] for name in ddps}, []
    for step in range(steps):
        x, y = (t[rank * batch:(rank + 1) * batch] for t in text_batch(step, n * batch, config.block_size))
        for name, ddp in ddps.items():
            comm.barrier()
            start = time.perf_counter()
            with comm.record() as events:
                opts[name].zero_grad()
                ddp(x, y)[1].backward()
                opts[name].step()
            times[name].append(time.perf_counter() - start)
            if name == "labkit" and step >= 2:
                sent.append(sum(e.bytes for e in events if e.op == "all_reduce"))
    drift = max((a - b).abs().max().item() for a, b in zip(ddps["labkit"].parameters(), ddps["torch"].parameters()))
    del ddps, opts
    gc.collect()                      # torch's hook leaves futures that must not die on a gloo thread
    comm.barrier()
    return dict(times=times, sent=statistics.median(sent), drift=drift)


def powersgd_against_torch(world_size: int, config: GPTConfig, *, steps: int = 20, batch: int = 4, rank: int = 1,
                           timeout: float = 600.0) -> dict:
    out = labkit.launch(_powersgd_worker, config, steps, batch, rank, world_size=world_size, timeout=timeout)[0]
    median = {name: statistics.median(ts[2:]) for name, ts in out["times"].items()}
    # torch's hook all-reduces, per compressed n×m matrix, P (n·r) and Q (m·r), and the other tensors whole
    model = GPT(config)
    expected = 0
    for p in model.parameters():
        m = p.detach().reshape(p.shape[0], -1)
        r = min(*m.shape, rank)
        expected += (m.shape[0] + m.shape[1]) * r if (m.shape[0] + m.shape[1]) * r * 2 < m.numel() else m.numel()
    return dict(step_s=median, vs_torch=median["torch"] / median["labkit"], sent=out["sent"],
                expected_bytes=expected * 4, drift=out["drift"])


def main(argv=None) -> None:
    parser = gpt_parser(__doc__, steps=250, warmup=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="adamw (default), or sgd with momentum 0.9")
    parser.add_argument("--bandwidths", nargs="+", type=float, default=[1000.0, 20.0], help="MB/s (default 1000 20)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.set_defaults(preset="tiny", block_size=32, batch_size=4)
    args = parser.parse_args(argv)
    config = GPTConfig.preset(args.preset, VOCAB_SIZE, block_size=args.block_size)
    load_before, start = load_average(), time.perf_counter()
    result = measure(args.world_size, config, methods=args.methods, steps=args.steps, batch=args.batch_size,
                     lr=args.lr, optimizer=args.optimizer, bandwidths=args.bandwidths, timeout=args.timeout)
    versus = powersgd_against_torch(args.world_size, config, batch=args.batch_size, timeout=args.timeout)
    report = "\n".join([
        f"labkit.bench.compression: GPT preset {args.preset!r} ({result['params'] / 1e6:.2f} M parameters), "
        f"N = {args.world_size} CPU processes over gloo, batch {args.batch_size} x {args.block_size} characters per "
        f"rank, {dict(adamw='AdamW', sgd='SGD (momentum 0.9)')[args.optimizer]} lr {args.lr:g}, {args.steps} steps; emulated network: one link class, α = 100 µs, "
        f"{' and '.join(format(b, 'g') for b in args.bandwidths)} MB/s",
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, 1 torch thread "
        f"per rank; load average {load_before} before, {load_average()} after; whole run "
        f"{time.perf_counter() - start:.0f} s",
        "",
        format_table(result),
        "",
        f"PowerSGD rank 1 under torch's DDP, no emulated network: labkit {1e3 * versus['step_s']['labkit']:.1f} ms, "
        f"torch's hook {1e3 * versus['step_s']['torch']:.1f} ms per step (labkit at {versus['vs_torch']:.2f}x torch's "
        f"speed); labkit sends {versus['sent']:.0f} bytes per step, torch's P and Q {versus['expected_bytes']}; "
        f"max |parameter difference| after the run {versus['drift']:.1e}",
    ])
    publish(report, args.output, args.json, dict(args=vars(args), result={**result, "runs": {
        f"{m}@{b:g}": r for (m, b), r in result["runs"].items()}}, summary=summarise(result), powersgd=versus))


if __name__ == "__main__":
    main()
