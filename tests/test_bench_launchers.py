"""Smoke test of the launcher benchmark: the labkit.launch part, small and quick, no timing thresholds."""

import pytest

from labkit.bench import launchers


@pytest.mark.parametrize("bad_rank", [0, 1])
def test_labkit_part_of_the_benchmark(bad_rank):
    # The hanging-rank measurement lasts its whole timeout: run it once, not for every bad rank.
    hang_timeout = 3.0 if bad_rank == 1 else None
    results = launchers.measure_labkit(world_size=2, repeats=1, bad_rank=bad_rank, failure_repeats=1,
                                       hang_timeout=hang_timeout)

    startup = results["startup"]
    assert "failed" not in startup, startup
    assert len(startup["seconds"]) == 1 and startup["seconds"][0] > 0
    assert startup["values"] == "yes"
    assert results["notebook"] == "yes"

    [run] = results["raise"]
    assert "failed" not in run, run
    assert run["caller_gets"] == "WorkerError"
    assert run["rank"] == bad_rank
    assert run["line"] == f"ValueError: rank {bad_rank} raised on purpose"
    assert run["delay"] > 0
    assert run["leftovers"] == "none"

    if hang_timeout is not None:
        hang = results["hang"]
        assert "failed" not in hang, hang
        assert hang["caller_gets"] == "WorkerError" and hang["rank"] == 1
        assert hang["after"] > 0
        assert hang["leftovers"] == "none"


def test_report_survives_failed_measurements():
    # One failed measurement must not stop the table: it shows up as text in its cell.
    results = {"labkit.launch": {"startup": {"seconds": [0.2, 0.1, 0.3], "values": "yes"}, "notebook": "yes",
                                 "raise": {"failed": "no result within 60 s (killed)"}},
               "spawn": {"startup": {"failed": "RuntimeError: boom"}}}
    text = launchers.report(results, world_size=2, repeats=3, bad_rank=1, failure_repeats=1)
    assert "0.20 [0.10, 0.30]" in text
    assert "measurement failed: no result within 60 s (killed)" in text
    assert "measurement failed: RuntimeError: boom" in text
    assert "not measured" in text
