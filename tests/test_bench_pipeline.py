"""Smoke test of the pipeline benchmark: 2 ranks, tiny sizes, few steps, no timing thresholds."""

import json
import statistics

import pytest

from labkit.bench import pipeline as bench

TINY = dict(microbatches=(2, 4), dim=16, layers_per_stage=1, batch=8, device_dim=8, device_ms=4.0,
            steps=2, warmup=1, device_steps=2, device_warmup=1, timeout=60.0)


@pytest.fixture(scope="module")
def result():
    return bench.measure(2, **TINY)


def test_results_structure(result):
    assert [(r["workload"], r["schedule"], r["m"]) for r in result["runs"]] == \
        [(w, s, m) for w in bench.WORKLOADS for s in bench.SCHEDULES for m in (2, 4)]
    for run in result["runs"]:
        assert set(run["times"]) == {"torch", "labkit"}
        assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in run["times"].values())
        assert len(run["bubble_labkit"]) == 2 and all(0 <= b < 1 for b in run["bubble_labkit"])
        if run["workload"] == "device":
            assert set(run["bubble_device"]) == {"torch", "labkit"}
            assert all(0 <= b < 1 for bs in run["bubble_device"].values() for b in bs)
        else:
            assert run["bubble_device"] == {}
        assert run["action_ms"]["F"] > 0 and run["action_ms"]["B"] > 0
        # the schedule fixes how many micro-batches each stage holds: GPipe m, 1F1B p - i
        expected = [run["m"]] * 2 if run["schedule"] == "GPipe" else [2, 1]
        assert run["peak_held"] == expected
        # and the bytes are that many micro-batches' worth (inputs are not views of one big batch)
        assert run["peak_saved_bytes"] == [h * b for h, b in zip(expected, run["saved_per_microbatch"])]


def test_gradients_equal_torch(result):
    for run in result["runs"]:
        assert run["grad_diff"] < 1e-6, (run["workload"], run["schedule"], run["m"])


def test_summary_arithmetic(result):
    rows = bench.summarise(result)
    assert len(rows) == len(result["runs"])
    for row, run in zip(rows, result["runs"]):
        labkit_s, torch_s = statistics.median(run["times"]["labkit"]), statistics.median(run["times"]["torch"])
        assert row["labkit_s"] == pytest.approx(labkit_s) and row["torch_s"] == pytest.approx(torch_s)
        assert row["ratio"] == pytest.approx(torch_s / labkit_s)
        turns = [t / lk for t, lk in zip(run["times"]["torch"], run["times"]["labkit"])]
        assert row["ratio_paired"] == pytest.approx(statistics.median(turns))
        formula = 1 / (run["m"] + 1)              # (p - 1)/(m + p - 1) with p = 2
        assert row["bubble_formula"] == pytest.approx(formula)
        bubble = statistics.median(run["bubble_labkit"])
        assert row["bubble_labkit"] == pytest.approx(bubble)
        assert row["bubble_labkit_error"] == pytest.approx((bubble - formula) / formula)
        assert row["bubble_labkit_best"] == min(run["bubble_labkit"]) <= bubble
        assert row["bubble_labkit_best_error"] == pytest.approx((min(run["bubble_labkit"]) - formula) / formula)
        if run["workload"] == "device":
            device = statistics.median(run["bubble_device"]["labkit"])
            assert row["bubble_device_error"] == pytest.approx((device - formula) / formula)
            assert row["bubble_device_torch"] == pytest.approx(statistics.median(run["bubble_device"]["torch"]))
        else:
            assert row["bubble_device_labkit"] is None and row["bubble_device_error"] is None
        assert row["peak_saved_bytes_formula"] == run["peak_saved_bytes"]


def test_tables(result):
    table = bench.format_table(result).splitlines()
    assert len(table) == 1 + len(result["runs"]) and "labkit/torch" in table[0]
    row = bench.summarise(result)[0]
    assert table[1].split()[:3] == ["compute", "GPipe", "2"]
    assert f"{row['ratio']:.2f}" in table[1] and f"{row['bubble_formula']:.3f}" in table[1]
    assert table[-1].split()[:2] == ["device", "1F1B"] and "%" in table[-1]
    memory = bench.format_memory(result).splitlines()
    assert len(memory) == 1 + len(result["runs"])
    assert "2 1  (2 1)" in [line for line in memory if line.split()[:3] == ["compute", "1F1B", "4"]][0]
    assert len(bench.format_actions(result).splitlines()) == 1 + len(result["runs"])


def test_emulated_device_time():
    import torch
    stage = bench.build_stage("device", 0, 2, dim=4, layers_per_stage=1, microbatch_ms=2.0)
    bench._DEVICE_LOG.clear()
    stage(torch.randn(3, 4)).sum().backward()
    forward, backward = bench._DEVICE_LOG
    assert (forward.kind, backward.kind) == ("forward", "backward")
    assert forward.duration >= 2e-3 and backward.duration >= 4e-3   # forward t, backward 2t, as a GPU kernel
    assert backward.start >= forward.end


def test_main_writes_json(tmp_path, capsys):
    path = tmp_path / "pipeline.json"
    bench.main(["--world-size", "2", "--quick", "--microbatches", "2", "--schedules", "1F1B", "--dim", "8",
                "--layers-per-stage", "1", "--batch", "4", "--device-dim", "4", "--device-ms", "2",
                "--steps", "1", "--device-steps", "1", "--json", str(path)])
    out = capsys.readouterr().out
    assert "os.cpu_count()" in out and "load average" in out and "max |grad labkit - grad torch|" in out
    saved = json.loads(path.read_text())
    assert [r["workload"] for r in saved["summary"]] == ["compute", "device"]
    assert saved["args"]["microbatches"] == [2] and saved["args"]["warmup"] == 1   # --quick's default


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 stages"):
        bench.measure(1)
    with pytest.raises(ValueError, match="multiple of every m"):
        bench.measure(2, microbatches=(3,), batch=8)
    with pytest.raises(ValueError, match="positive integers"):
        bench.measure(2, microbatches=(0,))
    with pytest.raises(ValueError, match="steps"):
        bench.measure(2, steps=0)
    with pytest.raises(ValueError, match="unknown schedules"):
        bench.measure(2, schedules=("GPipe", "ZB-H1"))
    with pytest.raises(ValueError, match="unknown workloads"):
        bench.measure(2, workloads=("gpu",))
    with pytest.raises(ValueError, match="unknown workload"):
        bench.build_stage("gpu", 0, 2, dim=4, layers_per_stage=1)
