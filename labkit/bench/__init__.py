"""Benchmarks that print tables; run with python -m labkit.bench.NAME."""

import json
import os


def load_average() -> str:
    """The machine's 1-minute load average, for the benchmarks' headers (timings depend on it)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):   # not measurable, or not on this platform
        return "?"


def publish(report: str, output: str | None = None, json_path: str | None = None, payload: dict | None = None) -> None:
    """Print the report; also write it to ``output`` and the raw ``payload`` to ``json_path`` when asked."""
    print(report)
    if output:
        with open(output, "w") as f:
            f.write(report + "\n")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)
