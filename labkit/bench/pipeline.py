"""Step time, bubble and activation memory of labkit's GPipe and 1F1B against torch.distributed.pipelining.

    python -m labkit.bench.pipeline [--world-size 4] [--microbatches 4 8 16] [--device-ms 600] [--quick]

One launch of p CPU processes over gloo, one pipeline stage per process. Every rank builds the same
model (same seed), keeps its own stage twice: one copy for labkit's runtime
(``labkit.pipeline.runtime.run_schedule`` of ``labkit.pipeline.schedules.gpipe`` / ``one_f_one_b``)
and one for torch's (``PipelineStage`` + ``ScheduleGPipe`` / ``Schedule1F1B``, through
``labkit.pipeline.torch_reference``). Both train on the same global batch, cut into m micro-batches;
the global batch is the same for every m, so a larger m shrinks the bubble but pays the per-message
and per-call overheads more often. Two workloads:

``compute``   each stage is ``--layers-per-stage`` blocks of Linear(d, d) + GELU: real CPU compute.
``device``    emulated device time: each stage is one small Linear followed by an autograd function
              that sleeps, as a host waits for a GPU kernel. A stage's forward of the whole global
              batch takes ``--device-ms`` T; a micro-batch (1/m of the batch) takes T/m forward and
              2T/m backward. T is long (600 ms) so that the host's fixed costs per micro-batch (the
              runtime's Python, gloo's handshake for each receive: about 1 ms together) stay small
              against a micro-batch's device time, as a GPU's kernel-launch and NCCL latencies are.

Why the second: the course machine has 2 cores and the pipeline 4 processes, so stages that compute
at the same time share cores and each stretches; the measured bubble of real compute is then not the
schedule's bubble. A GPU computes independently of what its host's other processes do, and so does a
sleeping "device". The target "measured bubble within 10 % of (p - 1)/(m + p - 1)" is judged on the
``device`` rows (and on ``compute`` when there are at least as many cores as processes).

For each workload, schedule and m, after ``--warmup`` untimed steps per version, torch and labkit take
turns step by step (torch, labkit, torch, ...), so that other work on the machine slows both alike. A
step is the pipeline schedule only (forward and backward of all micro-batches; gradients zeroed before,
no optimizer), timed from a barrier to its end on every rank; a step's time is its slowest rank's;
the table shows medians over the timed steps (``--steps``; ``--device-steps`` for the device rows,
whose steps take seconds and, being sleeps, vary little).

    labkit/torch     = torch's step time / labkit's     (throughput ratio; >= 1: labkit is faster)
    paired           = the median over the turns of torch's step time / the labkit step right after it
                       (robust to load that comes and goes during the run: a turn's two steps share it)
    bubble labkit    = bubble_fraction(merge_timelines(...)) of labkit's measured events:
                       1 - sum of F and B times / (p * span from the first action to the last)
    bubble (device)  = the same from the emulated device's own busy intervals (the sleeps), for
                       labkit and torch alike: 1 - device busy / (p * span of device work)
    formula          = (p - 1)/(m + p - 1)
    peak held        = labkit's most micro-batches' activations held at once per stage, against
                       m (GPipe) and p - i (1F1B, stage i); peak MB = the bytes autograd saved for them,
                       against that count times one micro-batch's bytes (measured on its own)

Sanity check: after each configuration's last step, labkit's and torch's stages (same weights, same
data) hold the same gradients; the largest difference is printed.
"""

import os

# One OpenMP thread per process, set before torch is imported (the workers share the cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402  (imports after the environment variable on purpose)
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import labkit  # noqa: E402
from labkit import comm  # noqa: E402
from labkit.bench import load_average  # noqa: E402
from labkit.pipeline.emulated import DeviceTime  # noqa: E402
from labkit.timeline import busy_fraction  # noqa: E402
from labkit.pipeline.runtime import SavedBytes, merge_timelines, run_schedule  # noqa: E402
from labkit.pipeline.schedules import B, F, RECV_F, SEND_B, SEND_F, make_schedule  # noqa: E402
from labkit.pipeline.simulate import bubble_fraction, expected_bubble, expected_peak_activations  # noqa: E402
from labkit.pipeline.torch_reference import TORCH_SCHEDULES, torch_schedule  # noqa: E402

__all__ = ["SCHEDULES", "WORKLOADS", "DeviceTime", "build_stage", "measure", "summarise", "format_table",
           "format_memory", "format_actions", "main"]

SCHEDULES = tuple(TORCH_SCHEDULES)      # ("GPipe", "1F1B"): the schedules both implementations have
WORKLOADS = ("compute", "device")
VERSIONS = ("torch", "labkit")


# ---- the emulated device ---------------------------------------------------------------------------

class _SharedLog(list):
    """A list that copies of a module share (the torch version runs on a deep copy of the stage)."""

    def __deepcopy__(self, memo):
        return self


_DEVICE_LOG = _SharedLog()  # an Event per emulated kernel in this process, perf_counter seconds


def build_stage(workload: str, stage: int, num_stages: int, *, dim: int, layers_per_stage: int,
                microbatch_ms: float = 0.0, seed: int = 0) -> nn.Sequential:
    """Stage ``stage`` of the benchmark's model: the same weights on every rank and for every call with
    the same arguments (the whole model is built from ``seed`` and cut into equal stages)."""
    torch.manual_seed(seed)
    if workload == "compute":
        blocks = [nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(num_stages * layers_per_stage)]
        return nn.Sequential(*blocks[stage * layers_per_stage:(stage + 1) * layers_per_stage])
    if workload == "device":
        linears = [nn.Linear(dim, dim) for _ in range(num_stages)]
        return nn.Sequential(DeviceTime(linears[stage], microbatch_ms, 2 * microbatch_ms, log=_DEVICE_LOG))
    raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")


def _saved_bytes(module: nn.Module, x: torch.Tensor, target: torch.Tensor | None, loss_fn) -> int:
    """Bytes autograd saves for backward in one forward of ``module`` (and of the loss, if a target is
    given): one micro-batch's activation memory at this stage, counted as the runtime counts it."""
    x = x.clone().requires_grad_(x.is_floating_point())
    with SavedBytes(module) as counter:
        y = module(x)
        if target is not None:
            loss_fn(y, target.clone())
    return counter.bytes


# ---- what every rank runs --------------------------------------------------------------------------

def _step(version: str, rank: int, p: int, runner, stage: nn.Module, X, Y, xs, ys, loss_fn, shape):
    """One step of one version; returns labkit's StepResult (None for torch)."""
    if version == "torch":
        if rank == 0:
            runner.step(X)
        elif rank == p - 1:
            runner.step(target=Y, losses=[])
        else:
            runner.step()
        return None
    return run_schedule(runner, {rank: stage}, xs if rank == 0 else None, ys if rank == p - 1 else None,
                        loss_fn, activation_shape=shape)


def _run_config(workload: str, name: str, m: int, *, dim: int, layers_per_stage: int, batch: int,
                device_ms: float, steps: int, warmup: int, seed: int) -> dict | None:
    rank, p = dist.get_rank(), dist.get_world_size()
    stage = build_stage(workload, rank, p, dim=dim, layers_per_stage=layers_per_stage,
                        microbatch_ms=device_ms / m, seed=seed)
    stages = {"labkit": stage, "torch": copy.deepcopy(stage)}
    data = torch.Generator().manual_seed(seed + 1)        # the same batch on every rank, every step
    X, Y = torch.randn(batch, dim, generator=data), torch.randn(batch, dim, generator=data)
    # separate tensors (not views of X, Y), so that the runtime counts one micro-batch's bytes each
    xs, ys = [c.clone() for c in X.chunk(m)], [c.clone() for c in Y.chunk(m)]
    loss_fn = nn.functional.mse_loss
    shape = (batch // m, dim)
    runners = {"torch": torch_schedule(name, stages["torch"], m, loss_fn, torch.empty(shape)),
               "labkit": make_schedule(name, p, m)}
    times = {v: [] for v in VERSIONS}
    events, device, windows = [], {v: [] for v in VERSIONS}, {v: [] for v in VERSIONS}
    last = None
    for step in range(warmup + steps):
        for version in VERSIONS:
            stages[version].zero_grad(set_to_none=True)
            _DEVICE_LOG.clear()
            comm.barrier()
            start = time.perf_counter()
            result = _step(version, rank, p, runners[version], stages[version], X, Y, xs, ys, loss_fn, shape)
            end = time.perf_counter()
            if step < warmup:
                continue
            times[version].append(end - start)
            device[version].append(list(_DEVICE_LOG))
            windows[version].append((start, end))
            if result is not None:
                events.append(result)
                last = result
    grad_diff = max(((a.grad - b.grad).abs().max().item()
                     for a, b in zip(stages["labkit"].parameters(), stages["torch"].parameters())), default=0.0)
    per_mb = _saved_bytes(stage, xs[0], ys[0] if rank == p - 1 else None, loss_fn)

    # a step takes as long as its slowest rank; the rest is gathered on rank 0
    slowest = {}
    for version in VERSIONS:
        t = comm.on(torch.tensor(times[version], dtype=torch.float64))
        comm.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest[version] = t.tolist()
    diff = comm.on(torch.tensor([grad_diff], dtype=torch.float64))
    comm.all_reduce(diff, op=dist.ReduceOp.MAX)
    mine = dict(events=events, device=device, peak_held=last.peak_held, peak_saved_bytes=last.peak_saved_bytes,
                saved_per_microbatch=per_mb)
    gathered = comm.all_gather_objects(mine)
    if rank != 0:
        return None

    timelines = [merge_timelines([g["events"][i] for g in gathered]) for i in range(steps)]
    bubble_labkit = [bubble_fraction(t) for t in timelines]
    costs = [_action_costs(t) for t in timelines]
    action_ms = {kind: (statistics.median([c[kind] for c in costs if c[kind] is not None])
                        if any(c[kind] is not None for c in costs) else None) for kind in costs[0]}
    bubble_device = {}
    if workload == "device":
        for version in VERSIONS:
            bubble_device[version] = [_device_bubble([g["device"][version][i] for g in gathered])
                                      for i in range(steps)]
    return dict(workload=workload, schedule=name, m=m, times=slowest, grad_diff=diff.item(),
                bubble_labkit=bubble_labkit, bubble_device=bubble_device, action_ms=action_ms,
                peak_held=[g["peak_held"] for g in gathered],
                peak_saved_bytes=[g["peak_saved_bytes"] for g in gathered],
                saved_per_microbatch=[g["saved_per_microbatch"] for g in gathered])


def _action_costs(timeline) -> dict:
    """Median milliseconds of labkit's F, B and sends, and of the receives whose message had been sent at
    least 1 ms before the receive started (so the receive did not wait for the sender's compute: what
    it costs is the transport's own handshake)."""
    by_kind = {F: [], B: [], "send": [], "ready_recv": []}
    sent = {(e.action.kind, e.action.stage, e.action.microbatch): e.end
            for e in timeline.events if e.action.kind in (SEND_F, SEND_B)}
    for e in timeline.events:
        kind, s, k = e.action.kind, e.action.stage, e.action.microbatch
        if kind in (F, B):
            by_kind[kind].append(e.duration)
        elif kind in (SEND_F, SEND_B):
            by_kind["send"].append(e.duration)
        else:
            posted = sent[(SEND_F, s - 1, k)] if kind == RECV_F else sent[(SEND_B, s + 1, k)]
            if posted <= e.start - 1e-3:
                by_kind["ready_recv"].append(e.duration)
    return {kind: statistics.median(d) * 1e3 if d else None for kind, d in by_kind.items()}


def _device_bubble(logs: list) -> float:
    """1 − the ranks' mean device busy fraction over the span from the first device start to the last device
    end, from each rank's device Events of one step (the timeline's one bubble formula)."""
    start = min(e.start for log in logs for e in log)
    end = max(e.end for log in logs for e in log)
    return 1.0 - sum(busy_fraction(log, start, end) for log in logs) / len(logs)


def _rank_work(configs, kwargs) -> list:
    return [_run_config(workload, name, m, **kwargs) for workload, name, m in configs]


def measure(world_size: int = 4, *, microbatches=(4, 8, 16), schedules=SCHEDULES, workloads=WORKLOADS,
            dim: int = 512, layers_per_stage: int = 2, batch: int = 1024, device_dim: int = 64,
            device_ms: float = 600.0, steps: int = 10, warmup: int = 2, device_steps: int = 5,
            device_warmup: int = 1, seed: int = 0, timeout: float = 900.0) -> dict:
    """Run the benchmark on ``world_size`` processes (one stage each); rank 0's view, with every rank's
    times already reduced to the slowest. ``steps``/``warmup`` are the compute workload's timed and
    untimed steps per version and configuration, ``device_steps``/``device_warmup`` the device one's
    (its steps are long and, being sleeps, vary little)."""
    if not isinstance(world_size, int) or world_size < 2:
        raise ValueError(f"a pipeline needs at least 2 stages (processes), not world_size={world_size!r}")
    if min(steps, device_steps) < 1 or min(warmup, device_warmup) < 0:
        raise ValueError(f"steps must be at least 1 and warmup at least 0, not steps={steps}, warmup={warmup}, "
                         f"device_steps={device_steps}, device_warmup={device_warmup}")
    if not microbatches or any(not isinstance(m, int) or m < 1 for m in microbatches):
        raise ValueError(f"micro-batch counts must be positive integers, not {list(microbatches)}")
    if any(batch % m for m in microbatches):
        raise ValueError(f"the global batch {batch} must split into equal micro-batches: "
                         f"it is not a multiple of every m in {list(microbatches)}")
    if dim < 1 or device_dim < 1 or layers_per_stage < 1 or device_ms <= 0:
        raise ValueError("dim, device_dim and layers_per_stage must be at least 1, device_ms positive")
    for what, given, known in (("schedules", schedules, SCHEDULES), ("workloads", workloads, WORKLOADS)):
        unknown = set(given) - set(known)
        if unknown or not given:
            raise ValueError(f"unknown {what} {sorted(unknown)}; choose from {', '.join(known)}")
    configs = [(w, s, m) for w in workloads for s in schedules for m in microbatches]
    runs = []
    for workload in workloads:   # one launch per workload, with its own sizes
        if workload == "compute":
            sizes = dict(dim=dim, layers_per_stage=layers_per_stage, steps=steps, warmup=warmup)
        else:
            sizes = dict(dim=device_dim, layers_per_stage=1, steps=device_steps, warmup=device_warmup)
        mine = [c for c in configs if c[0] == workload]
        kwargs = dict(sizes, batch=batch, device_ms=device_ms, seed=seed)
        runs += labkit.launch(_rank_work, mine, kwargs, world_size=world_size, timeout=timeout)[0]
    return dict(world_size=world_size, microbatches=list(microbatches), schedules=list(schedules),
                workloads=list(workloads), dim=dim, layers_per_stage=layers_per_stage, batch=batch,
                device_dim=device_dim, device_ms=device_ms, steps=steps, warmup=warmup,
                device_steps=device_steps, device_warmup=device_warmup, runs=runs)


# ---- summary and tables ----------------------------------------------------------------------------

def summarise(result: dict) -> list:
    """One row per (workload, schedule, m): medians and the ratios and formulas they are set against."""
    p = result["world_size"]
    rows = []
    for run in result["runs"]:
        m, name = run["m"], run["schedule"]
        labkit_s, torch_s = (statistics.median(run["times"][v]) for v in ("labkit", "torch"))
        formula = expected_bubble(p, m)
        bubble = statistics.median(run["bubble_labkit"])
        best = min(run["bubble_labkit"])   # interruptions only add idle time: the best step is the schedule's
        device = {v: statistics.median(b) for v, b in run["bubble_device"].items()}
        held_formula = expected_peak_activations(name, p, m)
        rows.append(dict(
            workload=run["workload"], schedule=name, m=m, labkit_s=labkit_s, torch_s=torch_s,
            ratio=torch_s / labkit_s,
            ratio_paired=statistics.median([t / l for t, l in zip(run["times"]["torch"], run["times"]["labkit"])]),
            bubble_formula=formula, bubble_labkit=bubble, bubble_labkit_error=(bubble - formula) / formula,
            bubble_labkit_best=best, bubble_labkit_best_error=(best - formula) / formula,
            bubble_device_labkit=device.get("labkit"), bubble_device_torch=device.get("torch"),
            bubble_device_error=((device["labkit"] - formula) / formula if "labkit" in device else None),
            peak_held=run["peak_held"], peak_held_formula=held_formula,
            peak_saved_bytes=run["peak_saved_bytes"],
            peak_saved_bytes_formula=[h * b for h, b in zip(held_formula, run["saved_per_microbatch"])],
            grad_diff=run["grad_diff"]))
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def format_table(result: dict) -> str:
    """Step times, throughput ratio and bubbles: one line per (workload, schedule, m)."""
    lines = [f"{'workload':<9} {'schedule':<8} {'m':>3} {'labkit ms':>10} {'torch ms':>9} {'labkit/torch':>12} "
             f"{'paired':>6} {'formula':>8} {'labkit':>7} {'(err)':>6} {'best':>6} {'(err)':>6} {'dev:labkit':>10} "
             f"{'(err)':>6} "
             f"{'dev:torch':>9}"]
    for r in summarise(result):
        dev_l = "-" if r["bubble_device_labkit"] is None else f"{r['bubble_device_labkit']:.3f}"
        dev_t = "-" if r["bubble_device_torch"] is None else f"{r['bubble_device_torch']:.3f}"
        lines.append(f"{r['workload']:<9} {r['schedule']:<8} {r['m']:>3} {r['labkit_s'] * 1e3:>10.1f} "
                     f"{r['torch_s'] * 1e3:>9.1f} {r['ratio']:>12.2f} {r['ratio_paired']:>6.2f} "
                     f"{r['bubble_formula']:>8.3f} "
                     f"{r['bubble_labkit']:>7.3f} {_pct(r['bubble_labkit_error']):>6} "
                     f"{r['bubble_labkit_best']:>6.3f} {_pct(r['bubble_labkit_best_error']):>6} {dev_l:>10} "
                     f"{_pct(r['bubble_device_error']):>6} {dev_t:>9}")
    return "\n".join(lines)


def format_memory(result: dict) -> str:
    """labkit's measured peak activations per stage against the formulas (m for GPipe, p − i for 1F1B)."""
    lines = [f"{'workload':<9} {'schedule':<8} {'m':>3}  {'peak held per stage (formula)':<32} "
             f"{'peak saved MB per stage (formula)'}"]
    for r in summarise(result):
        held = " ".join(f"{h:g}" for h in r["peak_held"])
        held_f = " ".join(f"{h:g}" for h in r["peak_held_formula"])
        mb = " ".join(f"{b / 2 ** 20:.2f}" for b in r["peak_saved_bytes"])
        mb_f = " ".join(f"{b / 2 ** 20:.2f}" for b in r["peak_saved_bytes_formula"])
        lines.append(f"{r['workload']:<9} {r['schedule']:<8} {r['m']:>3}  {held + '  (' + held_f + ')':<32} "
                     f"{mb}  ({mb_f})")
    return "\n".join(lines)


def format_actions(result: dict) -> str:
    """labkit's median action times per configuration (see :func:`_action_costs`)."""
    lines = [f"{'workload':<9} {'schedule':<8} {'m':>3} {'F':>7} {'B':>7} {'send':>7} {'ready recv':>11}"]
    for run in result["runs"]:
        c = {k: ("-" if v is None else f"{v:.2f}") for k, v in run["action_ms"].items()}
        lines.append(f"{run['workload']:<9} {run['schedule']:<8} {run['m']:>3} {c['F']:>7} {c['B']:>7} "
                     f"{c['send']:>7} {c['ready_recv']:>11}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4, help="processes = pipeline stages (default 4)")
    parser.add_argument("--microbatches", type=int, nargs="+", help="m (default 4 8 16; --quick: 4 8)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--dim", type=int, default=512, help="compute: width d of Linear(d, d) (default 512)")
    parser.add_argument("--layers-per-stage", type=int, default=2, help="compute: Linear+GELU blocks per stage")
    parser.add_argument("--batch", type=int, default=1024, help="global batch, cut into m micro-batches (default 1024)")
    parser.add_argument("--steps", type=int, help="compute: timed steps per version (default 10; --quick: 3)")
    parser.add_argument("--warmup", type=int, help="compute: untimed steps per version first (default 2; --quick: 1)")
    parser.add_argument("--device-ms", type=float,
                        help="device: one stage's forward of the whole batch in ms, backward twice that "
                             "(default 600; --quick: 150)")
    parser.add_argument("--device-dim", type=int, default=64, help="device: width of its tiny Linear (default 64)")
    parser.add_argument("--device-steps", type=int, help="device: timed steps per version (default 5; --quick: 2)")
    parser.add_argument("--device-warmup", type=int, default=1, help="device: untimed steps first (default 1)")
    parser.add_argument("--quick", action="store_true", help="a short run (about 30 s): m = 4 8, fewer and "
                        "shorter steps; options given explicitly win")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--json", metavar="FILE", help="write the raw measurements and the summary to FILE")
    args = parser.parse_args(argv)
    defaults = dict(microbatches=[4, 8], steps=3, warmup=1, device_ms=150.0, device_steps=2) if args.quick else \
        dict(microbatches=[4, 8, 16], steps=10, warmup=2, device_ms=600.0, device_steps=5)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    load_before, start = load_average(), time.perf_counter()
    result = measure(args.world_size, microbatches=tuple(args.microbatches), schedules=tuple(args.schedules),
                     workloads=tuple(args.workloads), dim=args.dim, layers_per_stage=args.layers_per_stage,
                     batch=args.batch, device_dim=args.device_dim, device_ms=args.device_ms, steps=args.steps,
                     warmup=args.warmup, device_steps=args.device_steps, device_warmup=args.device_warmup,
                     seed=args.seed, timeout=args.timeout)
    p, cores = args.world_size, os.cpu_count()
    cores_note = ("fewer cores than processes: judge the bubble on the device rows" if cores < p
                  else "a core per process")
    rows = summarise(result)
    worst_grad = max(r["grad_diff"] for r in rows)
    steps = []
    if "compute" in args.workloads:
        steps.append(f"compute {args.warmup} warm-up + {args.steps} timed")
    if "device" in args.workloads:
        steps.append(f"device {args.device_warmup} warm-up + {args.device_steps} timed")
    report = "\n".join([
        f"labkit.bench.pipeline: p = {p} stages on {p} CPU processes over gloo, global batch {args.batch} "
        f"cut into m micro-batches, MSE loss, no optimizer step",
        f"  compute: {args.layers_per_stage} x (Linear({args.dim}, {args.dim}) + GELU) per stage (real CPU work)",
        f"  device:  Linear({args.device_dim}, {args.device_dim}) + emulated device time per stage: "
        f"{args.device_ms:g} ms forward / {2 * args.device_ms:g} ms backward for the whole batch "
        f"({args.device_ms:g}/m and {2 * args.device_ms:g}/m ms per micro-batch)",
        f"torch {torch.__version__}, Python {platform.python_version()}, os.cpu_count() = {cores} "
        f"({cores_note}), "
        f"1 torch thread per rank; load average {load_before} before, {load_average()} after",
        f"steps per version and configuration: {'; '.join(steps)}; torch and labkit take turns; "
        f"whole run {time.perf_counter() - start:.0f} s",
        "step: median over the timed steps of the slowest rank's time (barrier to end); "
        "labkit/torch = torch's step time / labkit's (throughput ratio); paired = median over the turns of "
        "torch's step / the next labkit step (robust to load that changes during the run)",
        "bubble: formula (p-1)/(m+p-1); labkit = median over the timed steps of bubble_fraction of labkit's "
        "measured events, best = the smallest (a stall of the machine only adds idle time); "
        "dev:* = from the emulated device's busy intervals; (err) = (measured - formula)/formula",
        "",
        format_table(result),
        "",
        "activation memory of labkit's runtime, per stage 0..p-1 (formulas: GPipe m, 1F1B p - i; "
        "MB = held x one micro-batch's saved bytes)",
        format_memory(result),
        "",
        "labkit's actions, median ms: F, B, a send (posting the isend), and a receive whose message had been "
        "sent >= 1 ms earlier (the transport's handshake alone)",
        format_actions(result),
        "",
        f"sanity: labkit's gradients equal torch's after a step (same weights, same data): "
        f"max |grad labkit - grad torch| = {worst_grad:.1e} over all configurations",
    ])
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), cpu_count=cores, result=result, summary=rows), f, indent=1)


if __name__ == "__main__":
    main()
