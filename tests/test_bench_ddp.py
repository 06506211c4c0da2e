"""Smoke test of the DDP benchmark: tiny, quick, no timing thresholds."""

import pytest

from labkit.bench import ddp as bench
from labkit.models.gpt import GPTConfig


def test_measure_two_ranks_tiny_gpt():
    config = GPTConfig.preset("tiny", vocab_size=20, block_size=16)
    result = bench.measure(2, config, batch_size=2, steps=2, warmup=1, bucket_cap_mb=0.05)
    assert set(result["times"]) == set(bench.VERSIONS)
    assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in result["times"].values())
    assert result["buckets"] > 1                  # the small cap really made several buckets
    # torch's DDP and labkit's three saw the same data and averaged gradients: same parameters
    for version in ("naive", "overlap", "bucketed"):
        assert result["drift"][version] < 1e-5, version
    rows = bench.summarise(result)
    torch_step = sorted(result["times"]["torch"])[0] / 2 + sorted(result["times"]["torch"])[1] / 2
    assert rows["torch"]["step_s"] == pytest.approx(torch_step)
    assert rows["torch"]["vs_torch"] == pytest.approx(1.0)
    assert rows["naive"]["tokens_per_s"] == pytest.approx(2 * 2 * 16 / rows["naive"]["step_s"])
    assert rows["bucketed"]["comm_s"] == pytest.approx(rows["bucketed"]["step_s"] - rows["local"]["step_s"])
    table = bench.format_table(result)
    assert len(table.splitlines()) == 1 + len(bench.VERSIONS) and "bucketed" in table


def test_bad_arguments():
    config = GPTConfig.preset("tiny", vocab_size=20)
    with pytest.raises(ValueError, match="unknown versions"):
        bench.measure(2, config, versions=("torch", "fast"))
    with pytest.raises(ValueError, match="steps"):
        bench.measure(2, config, steps=0)
