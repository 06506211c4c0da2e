"""Benchmarks that print tables; run with python -m labkit.bench.NAME."""

import argparse
import json
import os


def load_average() -> str:
    """The machine's 1-minute load average, for the benchmarks' headers (timings depend on it)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):   # not measurable, or not on this platform
        return "?"


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
