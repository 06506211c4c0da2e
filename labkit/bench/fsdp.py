"""Step time and memory per rank of labkit's ZeRO-1/2 and FSDP against DDP and PyTorch's own, on one GPT.

    python -m labkit.bench.fsdp [--world-size 4] [--preset medium] [--rounds 3] [--device cpu|cuda]

Each strategy of :mod:`labkit.sharded_step` (labkit's ``ddp``, ``zero1``, ``zero2``, ``fsdp``; torch's
``torch_ddp``, ``torch_zero1`` = ZeroRedundancyOptimizer with DDP, ``torch_fsdp`` = FSDP2's ``fully_shard`` on
every block and the root) trains the GPT for ``warmup + steps + 1`` AdamW steps in its own launch of N processes.
The strategies take turns, ``rounds`` times over, so that other work on the machine slows them alike; a step's time
is its slowest rank's, and the table shows the median over every round's timed steps (the last step of a run, in
which the memory is counted, is not timed).

    tokens/s   N · batch · block / step time
    vs torch   the torch counterpart's step time / this one's (ddp: torch_ddp; zero1, zero2: torch_zero1; fsdp:
               torch_fsdp): >= 1 means at least as fast
    state      parameters + gradients + optimizer state (+ master chunks) rank 0 keeps after a step, measured
    predicted  labkit.memory.predict for the same setup; error = |measured - predicted| / predicted, on the
               state plus the activations (torch's FSDP gathers into buffers of its own, which the count of
               activations cannot tell apart: its row compares the state alone)
    sent       bytes a ring puts on the wire per step from rank 0, for the messages labkit.comm recorded
               (torch's strategies: not recorded)

With ``--device cuda`` (one GPU per process, NCCL) the table adds torch.cuda.max_memory_allocated in the last step.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")     # before torch is imported: N workers share the cores

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import labkit  # noqa: E402
from labkit.bench import gpt_parser, load_average, publish  # noqa: E402
from labkit.memory import Setup, predict, relative_error  # noqa: E402
from labkit.models.gpt import GPTConfig  # noqa: E402
from labkit.sharded_step import STRATEGIES, train  # noqa: E402

__all__ = ["VERSIONS", "COUNTERPART", "measure", "summarise", "format_table", "main"]

VERSIONS = STRATEGIES[1:]
COUNTERPART = {"ddp": "torch_ddp", "zero1": "torch_zero1", "zero2": "torch_zero1", "fsdp": "torch_fsdp"}
_STAGE = {"ddp": 0, "torch_ddp": 0, "zero1": 1, "torch_zero1": 1, "zero2": 2, "fsdp": 3, "torch_fsdp": 3}


def _setup(version: str, world_size: int, batch_size: int, block_size: int, dtype_bytes: int) -> Setup:
    # labkit.zero keeps its chunk as a copy of the parameters, in their dtype: a master
    return Setup(batch=batch_size, seq_len=block_size, dtype_bytes=dtype_bytes, state_bytes=dtype_bytes,
                 dp=world_size, zero=_STAGE[version], mixed_precision=version in ("zero1", "zero2"))


def measure(world_size: int, config: GPTConfig, *, versions=VERSIONS, batch_size: int = 1, steps: int = 4,
            warmup: int = 1, rounds: int = 2, device: str = "cpu", timeout: float = 600.0) -> dict:
    """Run every version ``rounds`` times; rank 0's memory, every step's slowest-rank time."""
    if steps < 1 or warmup < 0 or batch_size < 1 or rounds < 1:
        raise ValueError("steps, batch_size and rounds must be at least 1, warmup at least 0")
    unknown = set(versions) - set(VERSIONS)
    if unknown:
        raise ValueError(f"unknown versions {sorted(unknown)}; choose from {', '.join(VERSIONS)}")
    times = {v: [] for v in versions}
    last = {}
    for _ in range(rounds):
        for version in versions:
            results = labkit.launch(train, version, config, steps=warmup + steps + 1, batch=batch_size,
                                    dtype=torch.float32, world_size=world_size, device=device, timeout=timeout)
            per_step = zip(*(r.step_seconds[warmup:-1] for r in results))
            times[version] += [max(ts) for ts in per_step]
            last[version] = results[0]
    params = sum(p.numel() for p in last[versions[0]].params.values())
    return dict(times=times, memory={v: last[v].memory.as_dict() for v in versions},
                peak_parameters={v: last[v].peak_parameters for v in versions},
                sent={v: last[v].sent_per_step for v in versions}, cuda_peak={v: last[v].cuda_peak for v in versions},
                params=params, world_size=world_size, batch_size=batch_size, block_size=config.block_size,
                config=config.__dict__)


def summarise(result: dict) -> dict:
    config = GPTConfig(**result["config"])
    tokens = result["world_size"] * result["batch_size"] * result["block_size"]
    median = {v: statistics.median(ts) for v, ts in result["times"].items()}
    rows = {}
    for version, t in median.items():
        got = result["memory"][version]
        want = predict(config, _setup(version, result["world_size"], result["batch_size"], result["block_size"], 4),
                       num_params=result["params"]).as_dict()
        state = got["total"] - got["activations"]
        want_state = want["total"] - want["activations"]
        compared = (state, want_state) if version == "torch_fsdp" else (got["total"], want["total"])
        other = COUNTERPART.get(version)
        rows[version] = dict(step_s=t, tokens_per_s=tokens / t, vs_torch=median[other] / t if other in median else None,
                             state=state, predicted_state=want_state, error=relative_error(compared[1], compared[0]),
                             peak_parameters=result["peak_parameters"][version], sent=result["sent"][version],
                             cuda_peak=result["cuda_peak"][version])
    return rows


def format_table(result: dict) -> str:
    rows = summarise(result)
    gpu = any(r["cuda_peak"] for r in rows.values())
    header = (f"{'version':<12} {'step (ms)':>10} {'tokens/s':>9} {'vs torch':>9} {'state MiB':>10} "
              f"{'predicted':>10} {'error':>7} {'peak params MiB':>16} {'sent MiB':>9}")
    lines = [header + (f" {'cuda peak MiB':>14}" if gpu else "")]
    for version, r in rows.items():
        vs = f"{r['vs_torch']:.2f}" if r["vs_torch"] is not None else "-"
        sent = f"{r['sent'] / 2 ** 20:.1f}" if not version.startswith("torch") else "-"
        line = (f"{version:<12} {r['step_s'] * 1e3:>10.1f} {r['tokens_per_s']:>9.0f} {vs:>9} "
                f"{r['state'] / 2 ** 20:>10.1f} {r['predicted_state'] / 2 ** 20:>10.1f} {r['error']:>7.1%} "
                f"{r['peak_parameters'] / 2 ** 20:>16.1f} {sent:>9}")
        lines.append(line + (f" {r['cuda_peak'] / 2 ** 20:>14.1f}" if gpu else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = gpt_parser(__doc__, steps=4, warmup=1)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every version, taking turns (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=VERSIONS)
    args = parser.parse_args(argv)
    config = GPTConfig.preset(args.preset, args.vocab_size, block_size=args.block_size)
    load_before, start = load_average(), time.perf_counter()
    result = measure(args.world_size, config, versions=args.versions, batch_size=args.batch_size, steps=args.steps,
                     warmup=args.warmup, rounds=args.rounds, device=args.device, timeout=args.timeout)
    report = "\n".join([
        f"labkit.bench.fsdp: GPT preset {args.preset!r} ({result['params'] / 1e6:.1f} M parameters), "
        f"N = {args.world_size} processes ({args.device}), batch {args.batch_size} x {args.block_size} tokens per "
        f"rank, AdamW, float32",
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores, 1 torch thread "
        f"per rank; load average {load_before} before, {load_average()} after; {args.rounds} rounds of "
        f"{args.warmup} warm-up + {args.steps} timed steps per version; whole run {time.perf_counter() - start:.0f} s",
        "step: median of the slowest rank's step time; memory: rank 0 after the last step",
        "",
        format_table(result),
    ])
    publish(report, args.output, args.json, dict(args=vars(args), result=result, summary=summarise(result)))


if __name__ == "__main__":
    main()
