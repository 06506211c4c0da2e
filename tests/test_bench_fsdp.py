"""Smoke test of the sharding benchmark: tiny, quick, no timing thresholds."""

import pytest

from labkit.bench import fsdp as bench
from labkit.models.gpt import GPTConfig


def test_measure_two_ranks_tiny_gpt():
    config = GPTConfig.preset("tiny", vocab_size=20, block_size=16)
    versions = ("ddp", "zero2", "fsdp", "torch_fsdp")
    result = bench.measure(2, config, versions=versions, batch_size=1, steps=2, warmup=0, rounds=2)
    assert set(result["times"]) == set(versions)
    assert all(len(ts) == 2 * 2 and all(t > 0 for t in ts) for ts in result["times"].values())
    rows = bench.summarise(result)
    assert rows["fsdp"]["vs_torch"] == pytest.approx(rows["torch_fsdp"]["step_s"] / rows["fsdp"]["step_s"])
    assert rows["ddp"]["vs_torch"] is None                      # torch_ddp was not run
    for version in versions:                                    # labkit's own are predicted to the byte
        assert rows[version]["error"] < 0.01, version
    assert rows["fsdp"]["state"] < rows["zero2"]["state"] < rows["ddp"]["state"]
    psi = result["params"]
    assert rows["ddp"]["sent"] == pytest.approx(2 * psi * 4 / 2)  # 2Ψ(N−1)/N float32 numbers, N = 2
    assert rows["ddp"]["tokens_per_s"] == pytest.approx(2 * 1 * 16 / rows["ddp"]["step_s"])
    table = bench.format_table(result)
    assert len(table.splitlines()) == 1 + len(versions) and "torch_fsdp" in table and "cuda" not in table


def test_bad_arguments():
    config = GPTConfig.preset("tiny", vocab_size=20)
    with pytest.raises(ValueError, match="unknown versions"):
        bench.measure(2, config, versions=("ddp", "zero3"))
    with pytest.raises(ValueError, match="rounds"):
        bench.measure(2, config, rounds=0)
