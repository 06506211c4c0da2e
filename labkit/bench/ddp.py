"""Training-step time of torch's DistributedDataParallel against labkit's three DDPs, on one GPT.

    python -m labkit.bench.ddp [--world-size 4] [--preset medium] [--batch-size 1] [--block-size 32]

One launch of N CPU processes over gloo. Every rank builds the same GPT five times (same seed) and
wraps each copy differently: ``torch`` (torch.nn.parallel.DistributedDataParallel), labkit's ``naive``,
``overlap`` and ``bucketed`` (labkit.ddp), and ``local``: the bare model with no communication at all,
which measures the compute alone. Each has its own AdamW. The five take turns step by step (torch,
naive, overlap, bucketed, local, torch, ...), so that other work on the machine slows them all
alike. A step is zero_grad + forward + backward (+ the gradient all-reduces) + optimizer step, timed
from a barrier to its end on every rank; a step's time is its slowest rank's, and the table shows
the median over the timed steps.

    tokens/s = N * batch_size * block_size / step time      (all ranks' tokens)
    vs torch = torch's step time / this one's              (>= 1: at least as fast as torch's DDP)
    comm     = step time - local step time                 (what communicating costs, unhidden)

The ``local`` model trains on its own rank's data only: its parameters drift apart across ranks. It
is there for its time, not its result. The other four see the same data and the same averaged
gradients, so after the run their parameters agree to rounding (printed as a sanity check).
"""

import os

# One OpenMP thread per process, set before torch is imported (N workers share the cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import labkit  # noqa: E402
from labkit import comm  # noqa: E402
from labkit.ddp import BucketedDDP, NaiveDDP, OverlapDDP  # noqa: E402
from labkit.models.gpt import GPT, GPTConfig  # noqa: E402
from labkit.bench import gpt_parser, load_average, publish  # noqa: E402

__all__ = ["VERSIONS", "measure", "summarise", "format_table", "main"]

VERSIONS = ("torch", "naive", "overlap", "bucketed", "local")


def _wrap(version: str, model: nn.Module, bucket_cap_mb: float) -> nn.Module:
    if version == "torch":
        return nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    if version == "bucketed":
        return BucketedDDP(model, bucket_cap_mb=bucket_cap_mb)
    return {"naive": NaiveDDP, "overlap": OverlapDDP, "local": lambda m: m}[version](model)


def _rank_work(config: GPTConfig, versions, batch_size: int, steps: int, warmup: int,
               bucket_cap_mb: float, seed: int) -> dict:
    torch.set_num_threads(1)
    rank = dist.get_rank()
    models, optimizers = {}, {}
    for version in versions:
        torch.manual_seed(seed)                          # the same initial weights for every version
        models[version] = _wrap(version, GPT(config), bucket_cap_mb)
        optimizers[version] = torch.optim.AdamW(models[version].parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(seed + 1000 * rank)  # each rank its own batches
    times = {v: [] for v in versions}
    for step in range(warmup + steps):
        x = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), generator=data)
        for version in versions:
            model, opt = models[version], optimizers[version]
            comm.barrier()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            if step >= warmup:
                times[version].append(time.perf_counter() - start)
    # a step is done when its slowest rank is
    slowest = {}
    for version in versions:
        t = comm.on(torch.tensor(times[version], dtype=torch.float64))
        comm.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest[version] = t.tolist()
    reference = models[versions[0]]
    reference = getattr(reference, "module", reference)
    drift = {}
    for version in versions:
        model = getattr(models[version], "module", models[version])
        drift[version] = max((a - b).abs().max().item() for a, b in
                             zip(model.parameters(), reference.parameters()))
    buckets = len(models["bucketed"].buckets) if "bucketed" in models else None
    return dict(times=slowest, drift=drift, buckets=buckets, params=reference.num_params())


def measure(world_size: int, config: GPTConfig, *, versions=VERSIONS, batch_size: int = 2, steps: int = 10,
            warmup: int = 2, bucket_cap_mb: float = 25.0, seed: int = 0, timeout: float = 600.0) -> dict:
    """Run the benchmark on ``world_size`` processes; rank 0's view (times are already the slowest rank's)."""
    if steps < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1, warmup at least 0")
    unknown = set(versions) - set(VERSIONS)
    if unknown:
        raise ValueError(f"unknown versions {sorted(unknown)}; choose from {', '.join(VERSIONS)}")
    result = labkit.launch(_rank_work, config, tuple(versions), batch_size, steps, warmup, bucket_cap_mb, seed,
                           world_size=world_size, timeout=timeout)[0]
    result.update(world_size=world_size, batch_size=batch_size, block_size=config.block_size)
    return result


def summarise(result: dict) -> dict:
    """Per version: median step time (s), tokens/s, ratio to torch, communication time over local."""
    tokens = result["world_size"] * result["batch_size"] * result["block_size"]
    median = {v: statistics.median(ts) for v, ts in result["times"].items()}
    rows = {}
    for version, t in median.items():
        rows[version] = dict(step_s=t, tokens_per_s=tokens / t,
                             vs_torch=median["torch"] / t if "torch" in median else None,
                             comm_s=t - median["local"] if "local" in median else None,
                             drift=result["drift"][version])
    return rows


def format_table(result: dict) -> str:
    rows = summarise(result)
    lines = [f"{'version':<10} {'step (ms)':>10} {'tokens/s':>10} {'vs torch':>9} {'comm (ms)':>10} "
             f"{'max |param - torch|':>20}"]
    for version, r in rows.items():
        vs = f"{r['vs_torch']:.2f}" if r["vs_torch"] is not None else "-"
        comm = f"{r['comm_s'] * 1e3:.0f}" if r["comm_s"] is not None and version != "local" else "-"
        drift = "(own data)" if version == "local" else f"{r['drift']:.1e}"
        lines.append(f"{version:<10} {r['step_s'] * 1e3:>10.1f} {r['tokens_per_s']:>10.0f} {vs:>9} {comm:>10} "
                     f"{drift:>20}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = gpt_parser(__doc__, steps=10, warmup=2)
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="torch's and labkit's (default 25)")
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=VERSIONS)
    args = parser.parse_args(argv)
    config = GPTConfig.preset(args.preset, args.vocab_size, block_size=args.block_size)
    load_before, start = load_average(), time.perf_counter()
    result = measure(args.world_size, config, versions=args.versions, batch_size=args.batch_size,
                     steps=args.steps, warmup=args.warmup, bucket_cap_mb=args.bucket_cap_mb, timeout=args.timeout)
    grad_mb = result["params"] * 4 / 2 ** 20
    report = "\n".join([
        f"labkit.bench.ddp: GPT preset {args.preset!r} ({result['params'] / 1e6:.1f} M parameters, "
        f"{grad_mb:.0f} MB of float32 gradients per step), N = {args.world_size} CPU processes over gloo, "
        f"batch {args.batch_size} x {args.block_size} tokens per rank, AdamW",
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, "
        f"1 torch thread per rank; load average {load_before} before, {load_average()} after; "
        f"{args.warmup} warm-up + {args.steps} timed steps per version, taking turns; "
        f"bucket_cap_mb {args.bucket_cap_mb:g} (labkit bucketed: {result['buckets']} buckets); "
        f"whole run {time.perf_counter() - start:.0f} s",
        "step: median over the timed steps of the slowest rank's time; vs torch = torch's step time / this one's",
        "",
        format_table(result),
    ])
    publish(report, args.output, args.json, dict(args=vars(args), result=result, summary=summarise(result)))


if __name__ == "__main__":
    main()
