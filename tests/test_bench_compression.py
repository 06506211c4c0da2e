"""Smoke test of the compression benchmark: tiny, quick, no timing thresholds."""

import pytest

from labkit.bench import compression as bench
from labkit.compressed_training import VOCAB_SIZE
from labkit.models.gpt import GPTConfig

CONFIG = GPTConfig.preset("tiny", VOCAB_SIZE, block_size=16)


def test_measure_two_methods_at_two_bandwidths():
    result = bench.measure(2, CONFIG, methods=("allreduce", "localsgd-8"), steps=10, batch=2, bandwidths=(1000, 50))
    rows = bench.summarise(result)["rows"]
    assert set(rows) == {"allreduce", "localsgd-8"}
    assert rows["localsgd-8"]["mib_per_step"] == pytest.approx(rows["allreduce"]["mib_per_step"] / 10)  # 1 of 10
    assert rows["allreduce"]["to_target_steps"] is not None           # its own target, by construction
    table = bench.format_table(result)
    assert "step ms @50" in table and len(table.splitlines()) == 2 + 2


def test_powersgd_from_scratch_sends_torchs_bytes_and_takes_its_steps():
    out = bench.powersgd_against_torch(2, CONFIG, steps=4, batch=2)
    assert out["sent"] == out["expected_bytes"]
    assert out["drift"] < 1e-5
    assert out["step_s"]["labkit"] > 0 and out["step_s"]["torch"] > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown methods"):
        bench.measure(2, CONFIG, methods=("zip",))
    with pytest.raises(ValueError, match="steps"):
        bench.measure(2, CONFIG, steps=3)
