"""Benchmarks that print tables; run with python -m labkit.bench.NAME."""

import os


def load_average() -> str:
    """The machine's 1-minute load average, for the benchmarks' headers (timings depend on it)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):   # not measurable, or not on this platform
        return "?"
