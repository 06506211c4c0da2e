"""labkit's ring all-reduce against torch.distributed.all_reduce, timed the way nccl-tests times them.

    python -m labkit.bench.collectives [--world-sizes 2 4 8] [--min-bytes 4K] [--max-bytes 64M]

For each world size N (one launch of N CPU processes over gloo) and each message size M, every
algorithm reduces the same float32 tensor of M bytes, after a few warm-up calls, a number of times;
each call starts after a barrier and the table shows the median over the calls of the slowest rank's
time t. From t, as in nccl-tests' all_reduce_perf:

    algbw = M / t                  the algorithm bandwidth: how fast "a tensor of M bytes" got reduced;
    busbw = algbw * 2(N-1)/N       the bus bandwidth: what each rank's link carried per second if the
                                   all-reduce was bandwidth-optimal (a ring sends 2(N-1)/N*M bytes per
                                   rank). Unlike algbw it does not fall as N grows, so it compares
                                   world sizes with each other and with the link's raw speed.

The algorithms: ``ring`` is ``labkit.collectives.ring_all_reduce(t, check=False)``, the bare algorithm;
``ring+check`` the same with its default pre-flight check (one ring all-gather of a few numbers that
describe the call, so that ranks that disagree get a clear error), as students call it; ``torch`` is
``torch.distributed.all_reduce`` (gloo's own C++ all-reduce). ``ring/torch`` is ring's busbw divided by
torch's (at equal M and N, the same as the ratio of their times inverted): 1.0 means the ring written
in Python over isend/irecv moves data as fast as gloo's; below 1 it loses time somewhere (Python, one
message per round, no overlap of the additions with the transfers). ``tree`` and ``naive``
(``tree_all_reduce``, ``naive_all_reduce``) run on the smaller sizes only: they move whole tensors in
each step and are slow for large ones. Their busbw uses the same 2(N-1)/N factor: it is a property of
the all-reduce, not of the algorithm, so a slower algorithm simply shows a lower busbw.

Below the tables: α (latency per message) and β (seconds per byte, shown as 1/β in GB/s) fitted with
labkit.cost_model's terms, once to all sizes and once to the large sizes only. torch is fitted with
the ring's terms: gloo's default all-reduce is a ring too, written in C++, and it cuts each chunk
into segments so that sending one segment overlaps adding the previous one.

The algorithms take turns call by call (ring, ring+check, torch, ring, ...), so that other work on
the machine slows them all alike. Large sizes get fewer calls: the number of timed calls per size is
``--iters``, cut down so that one size takes about ``--budget`` seconds (never below 3).
"""

import os

# One OpenMP thread per process, set before torch is imported (N workers share the cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402  (imports after the environment variable on purpose)
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import labkit  # noqa: E402
from labkit import comm  # noqa: E402
from labkit import collectives, cost_model  # noqa: E402
from labkit.bench import load_average, publish  # noqa: E402

__all__ = ["ALGORITHMS", "MAIN", "SLOW", "FIT_LARGE_BYTES", "parse_bytes", "message_sizes", "measure", "summarise",
           "format_results", "fit", "format_fits", "main"]

# name -> the call each rank makes, and the cost-model algorithm its α–β fit uses (None: no fit).
ALGORITHMS = {
    "ring": (lambda t: collectives.ring_all_reduce(t, check=False), "ring"),
    "ring+check": (lambda t: collectives.ring_all_reduce(t), None),
    "torch": (lambda t: comm.all_reduce(t), "ring"),
    "tree": (lambda t: collectives.tree_all_reduce(t, check=False), "tree"),
    "naive": (lambda t: collectives.naive_all_reduce(t, check=False), "naive"),
}
MAIN = ("ring", "ring+check", "torch")   # every size
SLOW = ("tree", "naive")                 # sizes up to --slow-max-bytes
FIT_LARGE_BYTES = 4 * 2 ** 20            # the second α–β fit uses these sizes and up
MIN_TIMED = 3                            # timed calls per size, whatever the budget says
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int32": torch.int32, "int64": torch.int64}


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


def parse_bytes(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864, '100' -> 100 (binary units, an optional B: '4KB', '4KiB')."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(I?B)?\s*", str(text).upper())
    if not match:
        raise ValueError(f"not a size in bytes: {text!r} (examples: 4096, 4K, 64M, 1G)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def format_bytes(nbytes: int) -> str:
    for unit in ("G", "M", "K"):
        if nbytes >= _UNITS[unit] and nbytes % _UNITS[unit] == 0:
            return f"{nbytes // _UNITS[unit]}{unit}"
    return str(nbytes)


def message_sizes(min_bytes: int, max_bytes: int, factor: int = 4) -> list:
    """min_bytes, min_bytes*factor, ... up to max_bytes (included when it is on the way)."""
    if min_bytes < 1 or max_bytes < min_bytes or factor < 2:
        raise ValueError(f"need 1 <= min_bytes <= max_bytes and factor >= 2, not {min_bytes}, {max_bytes}, {factor}")
    sizes = [min_bytes]
    while sizes[-1] * factor <= max_bytes:
        sizes.append(sizes[-1] * factor)
    return sizes


# ---------------------------------------------------------------------------------------------
# What each rank runs: one launch per world size, looping over all sizes
# ---------------------------------------------------------------------------------------------

def _fill(tensor: torch.Tensor) -> None:
    # Every call starts from the same values, rank + 1: sums stay small and exact (no overflow to
    # inf after many calls), and the first result can be checked.
    tensor.fill_(dist.get_rank() + 1)


def _warm_up(name: str, tensor: torch.Tensor, warmup: int) -> float:
    """``warmup`` untimed calls (at least one, checked); returns the seconds the last one took."""
    call = ALGORITHMS[name][0]
    n = dist.get_world_size()
    seconds = 0.0
    for i in range(max(warmup, 1)):
        _fill(tensor)
        comm.barrier()
        start = time.perf_counter()
        call(tensor)
        seconds = time.perf_counter() - start
        if i == 0:
            expected = n * (n + 1) // 2
            if not bool((tensor == expected).all()):
                wrong = tensor[tensor != expected]
                raise RuntimeError(f"{name} on rank {dist.get_rank()} of {n}: {wrong.numel()} of {tensor.numel()} "
                                   f"elements are not {expected} (e.g. {wrong[0].item()}): the benchmark would time "
                                   f"a wrong result")
    return seconds


def _agreed_iterations(per_round_s: float, iters: int, budget_s: float) -> int:
    """How many timed rounds fit the budget, from the slowest rank's warm-up: every rank must run
    the same number of calls, so the ranks agree on it with one all_reduce(MAX)."""
    slowest = comm.on(torch.tensor([per_round_s], dtype=torch.float64))
    comm.all_reduce(slowest, op=dist.ReduceOp.MAX)
    fit = math.floor(budget_s / slowest.item()) if slowest.item() > 0 else iters
    return max(min(iters, fit), min(iters, MIN_TIMED))


def _rank_work(sizes: list, dtype: torch.dtype, iters: int, warmup: int, budget_s: float,
               slow_max_bytes: int, progress: bool) -> dict:
    """On every rank: {(nbytes, name): [seconds of each timed call on this rank]}."""
    element_size = torch.empty((), dtype=dtype).element_size()
    times = {}
    for nbytes in sizes:
        names = list(MAIN) + (list(SLOW) if nbytes <= slow_max_bytes else [])
        tensor = torch.empty(max(nbytes // element_size, 1), dtype=dtype)
        per_round = sum(_warm_up(name, tensor, warmup) for name in names)
        rounds = _agreed_iterations(per_round, iters, budget_s)
        if progress and dist.get_rank() == 0:
            print(f"  N={dist.get_world_size()} {format_bytes(nbytes):>5}: {rounds} timed call(s) of "
                  f"{', '.join(names)}", file=sys.stderr, flush=True)
        for name in names:
            times[(nbytes, name)] = []
        for _ in range(rounds):
            for name in names:  # take turns: a burst of load elsewhere slows every algorithm alike
                _fill(tensor)
                comm.barrier()
                start = time.perf_counter()
                ALGORITHMS[name][0](tensor)
                times[(nbytes, name)].append(time.perf_counter() - start)
        del tensor
    return times


def measure(world_size: int, sizes: list, *, dtype: torch.dtype = torch.float32, iters: int = 50,
            warmup: int = 3, budget_s: float = 20.0, slow_max_bytes: int = 16 * 2 ** 20,
            timeout: float = 120.0, progress: bool = False) -> list:
    """Time every algorithm on ``world_size`` processes for each size in ``sizes`` (bytes).

    Returns one record per (size, algorithm): ``{"world_size", "nbytes", "numel", "algorithm",
    "times": [slowest rank's seconds, per timed call], "seconds": median of times}``.
    """
    if world_size < 2:
        raise ValueError("world_size must be at least 2: an all-reduce on one rank sends nothing")
    element_size = torch.empty((), dtype=dtype).element_size()
    per_rank = labkit.launch(_rank_work, sizes, dtype, iters, warmup, budget_s, slow_max_bytes, progress,
                             world_size=world_size, timeout=timeout)
    records = []
    for (nbytes, name), rank0_times in per_rank[0].items():
        # A call is done when its slowest rank is done: per call, the maximum over ranks.
        slowest = [max(rank[(nbytes, name)][i] for rank in per_rank) for i in range(len(rank0_times))]
        records.append({"world_size": world_size, "nbytes": nbytes, "numel": max(nbytes // element_size, 1),
                        "algorithm": name, "times": slowest, "seconds": statistics.median(slowest)})
    return records


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def summarise(records: list) -> dict:
    """{(world_size, nbytes): {"numel", "iters", algorithm: {"us", "algbw", "busbw"}, "ring/torch"}}
    with bandwidths in GB/s (10^9 bytes per second, as nccl-tests) and ring/torch the busbw ratio."""
    table = {}
    for r in records:
        row = table.setdefault((r["world_size"], r["nbytes"]), {"numel": r["numel"], "iters": len(r["times"])})
        row[r["algorithm"]] = {
            "us": r["seconds"] * 1e6,
            "algbw": cost_model.algorithm_bandwidth(r["nbytes"], r["seconds"]) / 1e9,
            "busbw": cost_model.bus_bandwidth(r["nbytes"], r["seconds"], r["world_size"]) / 1e9,
        }
    for row in table.values():
        if "ring" in row and "torch" in row:
            row["ring/torch"] = row["ring"]["busbw"] / row["torch"]["busbw"]
    return table


def _columns(algorithms) -> list:
    """(group, heading, unit, cell(row) -> text) for each column of a table of these algorithms."""
    cols = [("", "size", "(B)", lambda row, key: str(key[1])),
            ("", "count", "(elements)", lambda row, key: str(row["numel"])),
            ("", "calls", "(timed)", lambda row, key: str(row["iters"]))]
    for name in algorithms:
        def cell(field, fmt, name=name):
            return lambda row, key: format(row[name][field], fmt) if name in row else "-"
        cols += [(name, "time", "(us)", cell("us", ".1f")),
                 (name, "algbw", "(GB/s)", cell("algbw", ".3f")),
                 (name, "busbw", "(GB/s)", cell("busbw", ".3f"))]
    if "ring" in algorithms and "torch" in algorithms:
        cols.append(("", "ring/torch", "(busbw)",
                     lambda row, key: format(row["ring/torch"], ".2f") if "ring/torch" in row else "-"))
    return cols


def format_results(table: dict, world_size: int, algorithms=MAIN, rows_with=None) -> str:
    """nccl-tests-like lines for one world size: a group line naming each algorithm over its three
    columns, two heading lines, then one line per size (numbers right-aligned) where any of
    ``rows_with`` (default: any of ``algorithms``) was measured."""
    rows_with = algorithms if rows_with is None else rows_with
    keys = sorted(k for k, row in table.items() if k[0] == world_size and any(a in row for a in rows_with))
    cols = _columns(algorithms)
    cells = [[cell(table[key], key) for *_, cell in cols] for key in keys]
    widths = [max(len(c[1]), len(c[2]), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]

    def line(texts):
        return "  ".join(t.rjust(w) for t, w in zip(texts, widths)).rstrip()
    groups, i = [], 0
    while i < len(cols):  # one label centred over each algorithm's columns
        j = i
        while j < len(cols) and cols[j][0] == cols[i][0]:
            j += 1
        span = sum(widths[i:j]) + 2 * (j - i - 1)
        label = f" {cols[i][0]} " if cols[i][0] else ""
        groups.append(label.center(span, "-") if label else " " * span)
        i = j
    return "\n".join(["  ".join(groups).rstrip(), line([c[1] for c in cols]), line([c[2] for c in cols]),
                      *(line(c) for c in cells)])


def fit(records: list, min_bytes: int = 0) -> dict:
    """{algorithm: {"model", "alpha_us", "gbps" (1/β in GB/s), "median_error" (relative), "points"}}:
    α and β fitted to every measured (N, size >= min_bytes) point of each algorithm with a cost model."""
    fits = {}
    for name, (_, model) in ALGORITHMS.items():
        points = [(r["world_size"], r["nbytes"], r["seconds"]) for r in records
                  if r["algorithm"] == name and r["nbytes"] >= min_bytes]
        if model is None or len(points) < 2:
            continue
        alpha, beta = cost_model.fit_alpha_beta(model, points)
        errors = [abs(cost_model.predict(model, n, m, alpha, beta) - t) / t for n, m, t in points]
        fits[name] = {"model": model, "alpha_us": alpha * 1e6, "gbps": (1 / beta / 1e9) if beta > 0 else math.inf,
                      "median_error": statistics.median(errors), "points": len(points)}
    return fits


def format_fits(fits: dict, title: str) -> str:
    lines = [title, f"  {'algorithm':<11}{'model':<7}{'alpha (us)':>11}{'1/beta (GB/s)':>15}"
                    f"{'median |error|':>16}{'points':>8}"]
    for name, f in fits.items():
        lines.append(f"  {name:<11}{f['model']:<7}{f['alpha_us']:>11.1f}{f['gbps']:>15.3f}"
                     f"{f['median_error']:>16.0%}{f['points']:>8}")
    return "\n".join(lines)


def header(world_sizes, dtype_name: str, args_line: str, load_before: str) -> str:
    return (f"labkit.bench.collectives: all-reduce on CPU over gloo, {dtype_name}, world sizes "
            f"{', '.join(map(str, world_sizes))}; torch {torch.__version__}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPU cores (load average {load_before} before the run), 1 torch thread per "
            f"rank\n{args_line}\n"
            "time: median over the timed calls of the slowest rank's time, each call after a barrier; "
            "algbw = size/time; busbw = algbw*2(N-1)/N; GB/s = 1e9 B/s")


def report(records: list, world_sizes, dtype_name: str, args_line: str, load_before: str,
           notes: list = ()) -> str:
    table = summarise(records)
    parts = [header(world_sizes, dtype_name, args_line, load_before), *notes]
    for n in world_sizes:
        if not any(k[0] == n for k in table):
            continue
        parts += ["", f"N = {n} ranks", format_results(table, n, MAIN)]
        if any(k[0] == n and any(a in row for a in SLOW) for k, row in table.items()):
            parts += ["", f"N = {n} ranks: tree and naive on the smaller sizes (ring again for comparison)",
                      format_results(table, n, ("ring", *SLOW), rows_with=SLOW)]
    large = f"sizes >= {format_bytes(FIT_LARGE_BYTES)}, where bandwidth dominates"
    smallest = min((r["nbytes"] for r in records), default=0)
    for min_bytes, which in ((0, "all sizes"), (FIT_LARGE_BYTES, large)):
        if min_bytes and smallest >= min_bytes:
            break  # the same points as the fit to all sizes
        fits = fit(records, min_bytes)
        if fits:
            parts += ["", format_fits(fits, f"alpha-beta fit, all N, {which} (labkit.cost_model.fit_alpha_beta; "
                                            f"torch with the ring's terms)")]
    return "\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8], metavar="N")
    parser.add_argument("--min-bytes", type=parse_bytes, default=parse_bytes("4K"), metavar="SIZE",
                        help="smallest message (4K, 1M, ...; default 4K)")
    parser.add_argument("--max-bytes", type=parse_bytes, default=parse_bytes("64M"), metavar="SIZE",
                        help="largest message (default 64M)")
    parser.add_argument("--factor", type=int, default=4, help="each size is this times the previous (default 4)")
    parser.add_argument("--slow-max-bytes", type=parse_bytes, default=parse_bytes("16M"), metavar="SIZE",
                        help="tree and naive run up to this size (default 16M; 0: not at all)")
    parser.add_argument("--iters", type=int, default=50,
                        help="timed calls per size and algorithm, at most (default 50)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed calls before them (default 3; at least 1, whose result is checked)")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timed calls per size and world size; large sizes get fewer calls (default 20)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--timeout", type=float, default=120.0, help="labkit.launch timeout, seconds (default 120)")
    parser.add_argument("--output", metavar="FILE", help="also write the table to FILE")
    parser.add_argument("--json", metavar="FILE", help="write every timing, the table and the fits to FILE")
    args = parser.parse_args(argv)
    if min(args.world_sizes) < 2:
        parser.error("world sizes must be at least 2")
    if args.iters < 1:
        parser.error("--iters must be at least 1")
    try:
        sizes = message_sizes(args.min_bytes, args.max_bytes, args.factor)
    except ValueError as exc:
        parser.error(str(exc))

    started = time.time()
    load_before = load_average()

    def progress(text):
        print(f"[{time.time() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    records, notes = [], []
    for n in args.world_sizes:
        progress(f"N={n}: {len(sizes)} sizes, {format_bytes(sizes[0])} to {format_bytes(sizes[-1])}")
        t0 = time.time()
        try:
            records += measure(n, sizes, dtype=DTYPES[args.dtype], iters=args.iters, warmup=args.warmup,
                               budget_s=args.budget, slow_max_bytes=args.slow_max_bytes, timeout=args.timeout,
                               progress=True)
        except Exception as exc:  # noqa: BLE001 - the other world sizes still make a table
            notes.append(f"N = {n}: not measured: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            progress(notes[-1])
        else:
            notes.append(f"N = {n}: measured in {time.time() - t0:.0f} s")
    elapsed = time.time() - started
    progress("done")
    slow = f"up to {format_bytes(args.slow_max_bytes)}" if args.slow_max_bytes >= sizes[0] else "not run"
    args_line = (f"sizes {format_bytes(sizes[0])}..{format_bytes(sizes[-1])} x{args.factor}, tree/naive {slow}, "
                 f"warm-up {args.warmup}, at most {args.iters} timed calls (at least {min(args.iters, MIN_TIMED)}) "
                 f"within about {args.budget:g} s per size; whole run {elapsed:.0f} s, load average "
                 f"{load_average()} after it")
    text = report(records, args.world_sizes, args.dtype, args_line, load_before, notes)
    publish(text, args.output, args.json,
            {"args": vars(args), "records": records, "fits": fit(records), "fits_large": fit(records, FIT_LARGE_BYTES),
             "torch": torch.__version__, "cpu_count": os.cpu_count(), "seconds": elapsed})


if __name__ == "__main__":
    main()
