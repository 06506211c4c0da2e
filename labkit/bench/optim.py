"""Time of one optimizer step: labkit's LAMB (its three code paths) against timm's Lamb and torch's AdamW.

    python -m labkit.bench.optim [--sizes 10M 100M] [--steps 15] [--device cpu] [--dtype float32]
    python -m labkit.bench.optim --device cuda --sizes 100M 1B

For each size N, one model of about N parameters made like a stack of GPT blocks (per block: two
LayerNorms, the attention's qkv and output Linears, the MLP's two Linears, all with biases: 12
tensors of very different sizes, as in a real network) is copied once per version, and every copy
gets the same fixed random gradients once. There is no forward or backward pass: only
``optimizer.step()`` is timed. The versions, all with lr 1e-3, betas (0.9, 0.999), eps 1e-6 and
weight decay 0.01 on every tensor:

    adamw          torch.optim.AdamW(foreach=True)                 the baseline
    adamw-fused    torch.optim.AdamW(fused=True)                   torch's fused kernel: the anchor
    lamb           labkit.optim.Lamb (foreach=True, the default)   labkit's multi-tensor path
    lamb-fused     labkit.optim.Lamb(fused=True)                   compiled into two passes (GPUs),
                   one compiled call per block of the model (labkit.optim.lamb_fused.compile_units)
    lamb-readable  labkit.optim.Lamb(foreach=False)                the formula, tensor by tensor
    timm           timm's Lamb(max_grad_norm=None, always_adapt=True): the paper's algorithm, with
                   timm's default foreach=None, which picks timm's per-tensor path on a CPU and its
                   multi-tensor (foreach) path on a GPU, as torch's optimizers do. On this CPU the
                   per-tensor path was the faster of the two (much faster at 100 M parameters);
                   ``--versions timm-foreach timm-single`` times each path forced. Older timms
                   have no ``foreach`` argument: the benchmark passes only the arguments the
                   installed Lamb takes, and says so
    lamb-fused-whole  (only on request) Lamb(fused=True) with the whole step one compiled call: the
                   version before the cut into blocks, which compiled ~0.5 s per tensor on this CPU

The versions take turns step by step, in an order that rotates every round, so that other work on
the machine slows them all alike; the table shows the median over the timed steps, after warm-up
steps (the first step allocates the optimizer's state). Ratios: ``vs adamw`` = this step time /
AdamW's (the issue's target for ``lamb``: at most 1.5), ``vs timm`` = this step time / timm's (at
most 1: not slower than timm). The first step of ``lamb-fused`` compiles it (tens of seconds): it is
one of the warm-up steps.

The memory-traffic model. An optimizer step touches every parameter's few numbers once or twice
and does a handful of flops on each: on a GPU it is limited by memory bandwidth, not arithmetic (on
a CPU core, a square root or a division costs about as much as moving its operands). The fewest
bytes a step must move, per parameter, in units of the element size (4 bytes in float32):

    AdamW  7: read θ, g, m, v; write θ, m, v (one pass is enough).
    LAMB  10: the trust ratio needs ‖θ‖ and ‖u‖ of the whole tensor before any of θ may change, so
              two passes: read θ, g, m, v, write m, v, and sum θ² and u² on the way (6); then read
              θ, m, v again to recompute u and write θ (4). Writing u in the first pass instead
              (and reading θ, u in the second) costs the same 10.

So even a perfect LAMB needs 10/7 = 1.43 times AdamW's time: the issue's 1.5 leaves little to
waste. ``limit`` = traffic × N / copy bandwidth, with the bandwidth measured on the same device by
``dst.copy_(src)`` of a large tensor (read + write counted); ``of limit`` = limit / step time, the
fraction of the memory bandwidth the step achieves. Real implementations take more passes (each
``torch._foreach_*`` call is a pass over its tensors; see docs/optim-benchmark.md). ``per byte`` =
(step / traffic) / (adamw-fused's step / its traffic): time per byte that must move, against torch's
fused AdamW (at most 1: the fused LAMB's target).

The benchmark first asks glibc's malloc to keep the memory the process frees (``keep_freed_memory``
in labkit/bench; ``--return-memory`` leaves it as it is). Otherwise the eager versions' temporaries
went back to the kernel or not depending on what had run before in the process, and their times
with them (100 M, lamb: 200 or 300 ms). The ``faults`` column counts the page faults per step.

After the run, the last column checks the versions against each other: lamb, lamb-readable and timm
compute the same thing and, after the same steps on the same gradients, must agree to rounding.
"""

import argparse
import inspect
import os
import platform
import re
import signal
import statistics
import sys
import time

import torch
from torch import nn

from labkit.optim import Lamb
from labkit.optim.references import timm_lamb
from labkit.bench import keep_freed_memory, load_average, page_faults, publish

__all__ = ["VERSIONS", "EXTRA_VERSIONS", "TRAFFIC", "parse_size", "model_shape", "build_model", "make_optimizer",
           "timm_default_path", "copy_bandwidth", "measure", "summarise", "format_table", "set_inductor_options",
           "build_parser", "main"]

VERSIONS = ("adamw", "adamw-fused", "lamb", "lamb-fused", "lamb-readable", "timm")
EXTRA_VERSIONS = ("timm-foreach", "timm-single", "lamb-fused-whole")    # only on request
HYPERPARAMETERS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
# The fewest elements read + written per parameter per step (see the module's docstring).
TRAFFIC = {"adamw": 7, "adamw-fused": 7, "lamb": 10, "lamb-fused": 10, "lamb-readable": 10, "timm": 10,
           "timm-foreach": 10, "timm-single": 10, "lamb-fused-whole": 10}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "G": 10 ** 9}


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'10M' -> 10_000_000, '0.2M' -> 200_000, '50K' -> 50_000, '1B' (or '1G') -> 10**9 (decimal units:
    parameter counts)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMBG]?)\s*", str(text).upper())
    if not match or float(match.group(1)) * _UNITS[match.group(2)] < 1:
        raise ValueError(f"not a parameter count: {text!r} (examples: 10M, 0.2M, 50K, 1B, 1000)")
    return round(float(match.group(1)) * _UNITS[match.group(2)])


def model_shape(n_params: int) -> tuple:
    """(width C, depth L) of a stack of GPT blocks with about ``n_params`` parameters.

    A block has about 12 C² parameters. Keeping GPT-2 small's C / L = 768 / 12 = 64 gives
    C ≈ (64 N / 12)^(1/3), rounded to a multiple of 64, then L = N / (12 C²) rounded:
    10 M -> C = 384, L = 6 (10.6 M); 100 M -> C = 832, L = 12 (99.7 M).
    """
    width = max(64, 64 * round((64 * n_params / 12) ** (1 / 3) / 64))
    depth = max(1, round(n_params / (12 * width ** 2)))
    return width, depth


class Block(nn.Module):
    """The parameter tensors of a GPT block (no forward: the benchmark never runs the model)."""

    def __init__(self, width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn_qkv = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)


def build_model(n_params: int, *, seed: int = 0, device="cpu", dtype=torch.float32) -> nn.Module:
    """A stack of ``Block``s and a final LayerNorm, of about ``n_params`` parameters, with random
    weights and random LayerNorm gains (so that no tensor has a special norm)."""
    width, depth = model_shape(n_params)
    torch.manual_seed(seed)
    model = nn.Sequential(*[Block(width) for _ in range(depth)], nn.LayerNorm(width))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(-0.5, 0.5).add_(1.0 if name.endswith("weight") else 0.0)
    return model.to(device=device, dtype=dtype)


def _fixed_gradients(model: nn.Module, seed: int) -> list:
    """One random gradient per parameter, of a few different scales (as real layers have)."""
    generator = torch.Generator().manual_seed(seed + 1)
    grads = []
    for i, p in enumerate(model.parameters()):
        scale = 10.0 ** -(2 + i % 3)
        grads.append((torch.randn(p.shape, generator=generator, dtype=torch.float32) * scale)
                     .to(device=p.device, dtype=p.dtype))
    return grads


def make_optimizer(version: str, params) -> torch.optim.Optimizer:
    """The optimizer of ``version`` (one of VERSIONS + EXTRA_VERSIONS), with the shared hyperparameters."""
    h = HYPERPARAMETERS
    if version in ("adamw", "adamw-fused"):
        return torch.optim.AdamW(params, **h, **({"fused": True} if version == "adamw-fused" else {"foreach": True}))
    if version in ("lamb", "lamb-readable", "lamb-fused", "lamb-fused-whole"):
        optimizer = Lamb(params, **h, foreach=version == "lamb", fused=version.startswith("lamb-fused"))
        optimizer.fused_units = version != "lamb-fused-whole"
        return optimizer
    if version.startswith("timm"):
        cls, options = timm_lamb(), timm_options(version)
        return cls(params, **h, **options)
    raise ValueError(f"unknown version {version!r}; choose from {', '.join(VERSIONS + EXTRA_VERSIONS)}")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def timm_options(version: str) -> dict:
    """The keyword arguments for timm's Lamb in ``version``, limited to those the installed timm takes.

    max_grad_norm=None: no global gradient clipping; always_adapt=True: the trust ratio on every
    tensor. With those, timm's Lamb is the paper's algorithm, as labkit's is by default. ``foreach``
    (timm 1.0.20 and later) picks its code path; an older timm has one path only."""
    accepted = inspect.signature(timm_lamb().__init__).parameters
    wanted = dict(max_grad_norm=None, always_adapt=True)
    if version != "timm":
        if "foreach" not in accepted:
            raise ValueError(f"--versions {version}: this timm's Lamb has no foreach argument (one code path "
                             f"only); time it as 'timm'")
        wanted["foreach"] = version == "timm-foreach"
    missing = [name for name in ("max_grad_norm", "always_adapt") if name not in accepted]
    if missing:
        raise ValueError(f"this timm's Lamb takes no {' or '.join(missing)}: it cannot run the paper's algorithm "
                         f"(install the version in requirements/references.txt)")
    return wanted


def timm_default_path(device="cpu") -> str:
    """Which of its code paths timm's Lamb takes by default on ``device``."""
    if "foreach" not in inspect.signature(timm_lamb().__init__).parameters:
        return "its only path (this timm's Lamb has no foreach argument)"
    resolve = getattr(sys.modules.get(timm_lamb().__module__), "_resolve_foreach", None)
    try:
        foreach = resolve(None, False, 1e-3, [torch.zeros(1, device=device)])
    except Exception:     # missing or with another signature in this timm: do not guess
        return "timm's choice"
    return "its multi-tensor (foreach) path" if foreach else "its per-tensor path"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device="cpu", *, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` between two tensors of ``nbytes`` (default 256 MiB on a
    CPU, 1 GiB on a GPU, far larger than the caches), counting the bytes read and the bytes written
    (2 × nbytes per copy): the best of ``repeats`` copies, after one untimed."""
    device = torch.device(device)
    nbytes = nbytes or (2 ** 30 if device.type == "cuda" else 256 * 2 ** 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for i in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        _synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def measure(n_params: int, *, versions=VERSIONS, steps: int = 15, warmup: int = 3, device="cpu",
            dtype=torch.float32, seed: int = 0, progress=None) -> dict:
    """Time ``optimizer.step()`` of each version on its own copy of the same model with the same gradients.

    Returns dict(times={version: [seconds per timed step]}, params, tensors, width, depth, element_size,
    drift={version: max |θ - θ of lamb| after the run}, moved={version: max |θ - θ before|}, interrupted,
    first_s={version: seconds of its first step, if a warm-up step}, faults_per_step={version: mean page
    faults of the process per timed step, None where not counted}, fell_back=[fused versions that ran out of
    compiled versions and finished with the foreach path]).

    Interrupted (Ctrl-C, or SIGINT from measure_gpu at a step's time limit) after every version's first
    timed step, it returns what it has, ``interrupted`` True, the same number of timed steps for all and
    no drift (the versions stopped at different steps); before that, the KeyboardInterrupt goes on."""
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be at least 1, warmup at least 0")
    unknown = set(versions) - set(VERSIONS + EXTRA_VERSIONS)
    if unknown:
        raise ValueError(f"unknown versions {sorted(unknown)}; choose from {', '.join(VERSIONS + EXTRA_VERSIONS)}")
    if not versions:
        raise ValueError("no versions to measure")
    device = torch.device(device)
    # A size's compiled versions are of no use to the next size; forgotten, they do not use up
    # torch.compile's recompile_limit (8 per function: lamb-fused needs two per size, one more for -whole)
    torch._dynamo.reset()
    model = build_model(n_params, seed=seed, device=device, dtype=dtype)
    initial = [p.detach().clone() for p in model.parameters()]
    # The gradients are shared by all copies (no optimizer here modifies p.grad): one copy in memory,
    # and exactly the same gradients for every version.
    grads = _fixed_gradients(model, seed)
    params, optimizers = {}, {}
    for version in versions:
        params[version] = [nn.Parameter(p.clone()) for p in initial]
        for p, g in zip(params[version], grads):
            p.grad = g
        optimizers[version] = make_optimizer(version, params[version])
    del model
    times = {v: [] for v in versions}
    faults = {v: [] for v in versions}      # page faults during each timed step (none where not counted)
    first = {}          # each version's first step: it allocates the state, and compiles the fused LAMB
    order = list(versions)
    interrupted = False
    try:
        for step in range(warmup + steps):
            for version in order:
                _synchronize(device)
                faults_before, start = page_faults(), time.perf_counter()
                optimizers[version].step()
                _synchronize(device)
                if step >= warmup:
                    times[version].append(time.perf_counter() - start)
                    if faults_before is not None:
                        faults[version].append(page_faults() - faults_before)
                elif step == 0:
                    first[version] = time.perf_counter() - start
            order = order[1:] + order[:1]    # rotate: nobody always runs first (or right after the same one)
            if progress:
                progress(f"  {step + 1}/{warmup + steps} steps")
    except KeyboardInterrupt:
        done = min(len(ts) for ts in times.values())
        if not done:
            raise
        times, interrupted = {v: ts[:done] for v, ts in times.items()}, True
        faults = {v: fs[:done] for v, fs in faults.items()}
        _synchronize(device)
    reference = params["lamb"] if "lamb" in params and not interrupted else None
    drift, moved = {}, {}
    for version in versions:
        moved[version] = max((p.detach() - p0).abs().max().item() for p, p0 in zip(params[version], initial))
        drift[version] = None if reference is None or version.startswith("adamw") else \
            max((p.detach() - q.detach()).abs().max().item() for p, q in zip(params[version], reference))
    return dict(times=times, params=sum(p.numel() for p in initial), tensors=len(initial),
                width=model_shape(n_params)[0], depth=model_shape(n_params)[1],
                element_size=initial[0].element_size(), steps_done=warmup + len(times[versions[0]]),
                drift=drift, moved=moved, interrupted=interrupted, first_s=first,
                faults_per_step={v: statistics.fmean(fs) if fs else None for v, fs in faults.items()},
                fell_back=[v for v in versions if v.startswith("lamb-fused") and not optimizers[v].fused])


def summarise(result: dict, bandwidth: float | None = None) -> dict:
    """Per version: median and best step time (s), ratios of the medians to adamw's and timm's, the time
    per element of traffic against adamw-fused's, and with ``bandwidth`` (bytes/s) the memory-traffic
    limit (s) and the fraction of it achieved."""
    median = {v: statistics.median(ts) for v, ts in result["times"].items()}
    fused_per_element = median["adamw-fused"] / TRAFFIC["adamw-fused"] if "adamw-fused" in median else None
    rows = {}
    for version, t in median.items():
        limit = None
        if bandwidth:
            limit = TRAFFIC[version] * result["element_size"] * result["params"] / bandwidth
        rows[version] = dict(step_s=t, best_s=min(result["times"][version]),
                             vs_adamw=t / median["adamw"] if "adamw" in median else None,
                             vs_timm=t / median["timm"] if "timm" in median else None,
                             traffic=TRAFFIC[version], limit_s=limit, of_limit=limit / t if limit else None,
                             per_byte=t / TRAFFIC[version] / fused_per_element if fused_per_element else None,
                             drift=result["drift"][version], moved=result["moved"][version],
                             faults=result["faults_per_step"][version])
    return rows


def format_table(result: dict, bandwidth: float | None = None) -> str:
    rows = summarise(result, bandwidth)
    lines = [f"{'version':<16} {'step (ms)':>10} {'best (ms)':>10} {'vs adamw':>9} {'vs timm':>8} {'traffic':>8} "
             f"{'limit (ms)':>11} {'of limit':>9} {'per byte':>9} {'faults':>7} {'max |param - lamb|':>19}"]
    for version, r in rows.items():
        def ratio(x):
            return f"{x:.2f}" if x is not None else "-"
        limit = f"{r['limit_s'] * 1e3:.1f}" if r["limit_s"] is not None else "-"
        of_limit = f"{r['of_limit']:.0%}" if r["of_limit"] is not None else "-"
        drift = f"{r['drift']:.1e}" if r["drift"] is not None else "(AdamW)" if version.startswith("adamw") else "-"
        lines.append(f"{version:<16} {r['step_s'] * 1e3:>10.1f} {r['best_s'] * 1e3:>10.1f} {ratio(r['vs_adamw']):>9} "
                     f"{ratio(r['vs_timm']):>8} {r['traffic']:>7}x {limit:>11} {of_limit:>9} {ratio(r['per_byte']):>9} "
                     f"{_count(r['faults']):>7} {drift:>19}")
    return "\n".join(lines)


def _count(n: float | None) -> str:
    """A page-fault count in a few characters: 0, 812, 4.1k, 117k."""
    if n is None:
        return "-"
    return f"{n:.0f}" if n < 1000 else f"{n / 1e3:.1f}k" if n < 10_000 else f"{n / 1e3:.0f}k"


def set_inductor_options(settings: list[str]) -> dict:
    """Set ``torch._inductor.config`` options from "NAME=VALUE" strings (VALUE a Python literal); returns
    them. Unknown names and values that are not literals are a ValueError, before anything is set."""
    import ast
    import torch._inductor.config as config

    known, options = config.get_config_copy(), {}
    for text in settings:
        name, sep, value = text.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--inductor {text}: not NAME=VALUE with NAME an option of torch._inductor.config")
        try:
            options[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--inductor {text}: {value!r} is not a Python literal (True, 1, 'x')") from None
    for name, value in options.items():
        setattr(config, name, value)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10M", "100M"],
                        help="parameter counts, e.g. 10M 100M 0.2M (default 10M 100M); commas work too")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per version (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=VERSIONS + EXTRA_VERSIONS)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default, "
                        "usually one per core; 1 suffers less from other work on the cores)")
    parser.add_argument("--inductor", nargs="+", default=[], metavar="NAME=VALUE",
                        help="torch._inductor.config options for the compiled versions, e.g. combo_kernels=True "
                             "(many tensors' small kernels launched as one)")
    parser.add_argument("--return-memory", action="store_true",
                        help="leave glibc's malloc as it is: it gives large freed blocks back to the kernel, and "
                             "the eager versions then pay page faults that depend on what ran before them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--output", metavar="FILE", help="also write the report to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the raw timings to FILE")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    timm_versions = [v for v in args.versions if v.startswith("timm")]
    if timm_versions:
        try:
            timm_lamb()
        except ImportError as exc:     # before any timing, not after the other versions' minutes
            parser.error(f"{exc} (or leave {' '.join(timm_versions)} out of --versions)")
    sizes = [parse_size(s) for text in args.sizes for s in text.split(",") if s.strip()]
    try:
        inductor = set_inductor_options(args.inductor)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = None if args.return_memory else keep_freed_memory()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    progress = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))

    load_before, start = load_average(), time.perf_counter()
    bandwidth = copy_bandwidth(device)
    results, interrupted = [], False
    for n in sizes:
        if progress:
            progress(f"{n / 1e6:g} M parameters ({', '.join(args.versions)})")
        try:
            results.append(measure(n, versions=args.versions, steps=args.steps, warmup=args.warmup,
                                   device=device, dtype=dtype, seed=args.seed, progress=progress))
        except KeyboardInterrupt:     # before this size's first timed step: report the sizes done
            if not results:
                raise
            interrupted = True
        else:
            interrupted = results[-1]["interrupted"]
        if interrupted:
            break
    # after an interrupt, no second bandwidth measurement (the time limit may be near)
    bandwidth_after = None if interrupted else copy_bandwidth(device)
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = (f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads "
                 f"({'--threads' if args.threads else 'torch' + chr(39) + 's default'})")
    timm_note = (f"timm: timm's Lamb(max_grad_norm=None, always_adapt=True), foreach=None (timm's default: "
                 f"{timm_default_path(device)} here; --versions timm-foreach timm-single force either)"
                 if timm_versions else "timm: not measured")
    lines = [
        f"labkit.bench.optim: time of optimizer.step(), {args.dtype}, lr 1e-3, betas (0.9, 0.999), eps 1e-6, "
        f"weight decay 0.01; gradients fixed, no forward/backward",
        f"torch {torch.__version__}, Python {platform.python_version()}, {where}; load average {load_before} "
        f"before, {load_average()} after; {args.warmup} warm-up + {args.steps} timed steps per version, "
        f"taking turns; whole run {time.perf_counter() - start:.0f} s",
        f"copy bandwidth (dst.copy_(src), {1024 if device.type == 'cuda' else 256} MiB, read + write): "
        f"{bandwidth / 1e9:.1f} GB/s before, " +
        ("not measured after (interrupted); the limits use it" if interrupted else
         f"{bandwidth_after / 1e9:.1f} GB/s after; the limits use the better of the two"),
        "adamw: torch.optim.AdamW(foreach=True); adamw-fused: AdamW(fused=True); lamb: labkit.optim.Lamb "
        "(foreach); lamb-fused: Lamb(fused=True), compiled" +
        (f" with {', '.join(f'{k}={v!r}' for k, v in inductor.items())}" if inductor else "") +
        ", one call per block" +
        ("; lamb-fused-whole: the same, the whole step one call" if "lamb-fused-whole" in args.versions else "") +
        "; lamb-readable: Lamb(foreach=False); " + timm_note,
        (allocator or "the C library's malloc as it is" + (" (--return-memory)" if args.return_memory else "")) +
        "; faults: page faults of the process per timed step",
        "step: median ms per step (best: the fastest step); vs adamw, vs timm: this median / theirs; "
        "traffic: elements read + written per parameter at least;",
        "limit: traffic x parameters x bytes / copy bandwidth, the time of a step at the memory bandwidth; "
        "of limit: limit / step; per byte: (step / traffic) / (adamw-fused's step / its traffic)",
    ]
    best_bandwidth = max(bandwidth, bandwidth_after or 0)
    for n, result in zip(sizes, results):
        cut = (f"; INTERRUPTED after {len(next(iter(result['times'].values())))} of {args.steps} timed steps: "
               f"the medians are of those" if result["interrupted"] else "")
        lines += ["", f"{result['params'] / 1e6:.1f} M parameters ({n / 1e6:g} M asked): "
                      f"{result['depth']} block{'s' * (result['depth'] != 1)} of width {result['width']}, "
                      f"{result['tensors']} tensors, "
                      f"{result['params'] * result['element_size'] / 2 ** 20:.0f} MiB per copy{cut}",
                  format_table(result, best_bandwidth)]
        if result["first_s"]:
            lines.append("first step (allocates the state; compiles the fused LAMB): " +
                         ", ".join(f"{v} {t:.2f} s" for v, t in result["first_s"].items()))
        if result["fell_back"]:
            lines.append(f"NOT FUSED: {', '.join(result['fell_back'])} ran out of torch.compile's versions "
                         f"(recompile_limit) and took the foreach path: those rows are not the fused step")
    if interrupted and len(results) < len(sizes):
        lines += ["", f"INTERRUPTED: not measured: {', '.join(f'{n / 1e6:g} M' for n in sizes[len(results):])}"]
    report = "\n".join(lines)
    publish(report, args.output, args.json,
            dict(args=vars(args), bandwidth=[bandwidth, bandwidth_after], interrupted=interrupted,
                 results=[dict(result, summary=summarise(result, best_bandwidth)) for result in results]))
    if interrupted:
        raise KeyboardInterrupt       # the run did not finish: end as Ctrl-C ends it (below)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:     # end killed by SIGINT as Python does on Ctrl-C (a shell loop stops), no traceback
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
