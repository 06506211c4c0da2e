"""Benchmarks that print tables; run with python -m labkit.bench.NAME."""

import argparse
import ctypes
import json
import os
import platform


def load_average() -> str:
    """The machine's 1-minute load average, for the benchmarks' headers (timings depend on it)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):   # not measurable, or not on this platform
        return "?"


def keep_freed_memory() -> str | None:
    """Ask glibc's malloc to keep the memory this process frees, for the rest of the process; returns what
    was set, for a benchmark's header, or None where the C library is not glibc (nothing is changed).

    By default glibc gives large freed blocks back to the kernel (each block above a threshold is its own
    mapping, and the top of the heap is trimmed), so the next allocation of that size gets fresh pages:
    a page fault per 4 KiB, each page zeroed by the kernel. Whether a block goes back depends on the
    thresholds, which glibc moves as blocks are freed, and on where the block lies in the heap: on what
    the process did before. An eager optimizer step at 100 M parameters took 200 or 300 ms in the same
    process depending on that (docs/optim-benchmark.md). With no mappings and no trimming, freed memory
    is reused and a step's time is its own."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4        # from glibc's malloc.h
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        return None
    return "glibc malloc keeps freed memory (M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB)"


def page_faults() -> int | None:
    """Page faults this process has taken so far (minor ones: a page the kernel had to map, and zero),
    or None where the platform does not count them (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def publish(report: str, output: str | None = None, json_path: str | None = None, payload: dict | None = None,
            *, echo: bool = True) -> None:
    """Print the report (unless ``echo`` is False); also write it to ``output`` and the raw ``payload``
    to ``json_path`` when asked."""
    if echo:
        print(report)
    if output:
        with open(output, "w") as f:
            f.write(report + "\n")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)


def gpt_parser(doc: str, *, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every GPT benchmark shares (world size, model, batch, steps, files); a benchmark adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--preset", default="medium", help="GPT size: tiny, small, medium, gpu (default medium)")
    # Short sequences and one per rank: little compute per step, so the gradients every step sends are a large
    # share of it (communication matters).
    parser.add_argument("--block-size", type=int, default=32, help="tokens per sequence (default 32)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per rank per step (default 1)")
    parser.add_argument("--vocab-size", type=int, default=78, help="default: Botchan's 78 characters")
    parser.add_argument("--steps", type=int, default=steps, help=f"timed steps per run (default {steps})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps first (default {warmup})")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--output", metavar="FILE", help="also write the report to FILE")
    parser.add_argument("--json", metavar="FILE", help="write the raw numbers to FILE")
    return parser
