"""Lab 4 (labkit/labs/large_batch.py): the batch-size sweep, on sweeps small enough for CI.

One tiny sweep (every method, k = 1 and 2, a few dozen steps) serves several tests: it writes its
outputs, applies each method's scaling rule, tunes on its grid. Two processes read the same global
batches as one and end with the same losses; AdaScale at k = 1 is SGD; bad options are refused
before anything starts.
"""

import json
import math

import pytest
import torch

import labkit
from labkit import large_batch as experiment      # the library: the sweep's pieces
from labkit.labs import large_batch                # the lab: its command line

TINY = ["--scales", "1", "2", "--epochs", "0.02", "--eval-points", "3", "--eval-blocks", "8", "--no-progress",
        "--target-loss", "3.5"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("large_batch") / "sweep.json"
    results = large_batch.main(TINY + ["--lrs", "sgd=0.1", "adam=1e-3,3e-3", "lamb=0.01", "--output", str(out)])
    return results, out


def test_a_tiny_sweep_runs_and_writes_its_outputs(tiny_sweep):
    results, out = tiny_sweep
    saved = json.loads(out.read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["command"].startswith("python -m labkit.labs.large_batch --scales 1 2")
    assert saved["world_size"] == 1 and saved["budget_samples"] == round(0.02 * saved["train_blocks"])
    assert [(r["method"], r["k"]) for r in saved["runs"]] == [
        (m, k) for m in ("sgd", "adam", "lamb", "adascale") for k in (1, 2)]
    for r in saved["runs"]:
        assert not r["diverged"] and math.isfinite(r["final_val_loss"]) and math.isfinite(r["final_train_loss"])
        assert r["val_curve"][0]["step"] == 0 and r["val_curve"][-1]["step"] == r["steps"]
        # 36 steps at k = 1 from ln(78) = 4.36: every method learns something
        assert r["val_curve"][-1]["loss"] < r["val_curve"][0]["loss"] - 0.3, (r["method"], r["k"])


def test_tuning_picks_the_best_rate_of_the_grid_and_records_it(tiny_sweep):
    results, _ = tiny_sweep
    adam = results["tuning"]["adam"]
    assert [t["base_lr"] for t in adam] == [1e-3, 3e-3]
    best = min(adam, key=lambda t: t["final_val_loss"])["base_lr"]
    assert results["best_lr"]["adam"] == best
    assert all(r["base_lr"] == best for r in results["runs"] if r["method"] == "adam")
    assert "adascale" not in results["tuning"]               # SGD's grid serves AdaScale
    k1 = next(r for r in results["runs"] if r["method"] == "adascale" and r["k"] == 1)
    sgd1 = next(r for r in results["runs"] if r["method"] == "sgd" and r["k"] == 1)
    assert k1["same_as"].startswith("sgd") and k1["final_val_loss"] == sgd1["final_val_loss"]


def test_each_method_applies_its_scaling_rule(tiny_sweep):
    results, _ = tiny_sweep
    run = {(r["method"], r["k"]): r for r in results["runs"]}
    eta = results["best_lr"]
    assert run["sgd", 2]["peak_lr"] == pytest.approx(2 * eta["sgd"])                # linear
    assert run["adam", 2]["peak_lr"] == pytest.approx(math.sqrt(2) * eta["adam"])   # square root
    assert run["lamb", 2]["peak_lr"] == pytest.approx(math.sqrt(2) * eta["lamb"])
    assert run["adascale", 2]["peak_lr"] == eta["sgd"] and run["adascale", 2]["scaling"] == "gain"
    # The schedule: warm-up from η to the peak, then cosine decay
    lrs = [lr for _, lr in run["sgd", 2]["lr"]]
    assert lrs[0] == pytest.approx(eta["sgd"]) and max(lrs) == pytest.approx(2 * eta["sgd"]) and lrs[-1] < lrs[0]
    # Fixed budget: k times the batch, k times fewer steps, the same samples
    assert run["sgd", 2]["steps"] == run["sgd", 1]["steps"] // 2
    assert run["sgd", 1]["samples"] == run["sgd", 2]["samples"] == results["budget_samples"]
    # AdaScale: its gain lies in [1, k] and it reads at least the budget (more where the gain is below k)
    ada = run["adascale", 2]
    assert all(1.0 <= g <= 2.0 for _, g in ada["gain"])
    assert ada["progress"] >= results["budget_samples"] / 2 - 1e-9
    assert ada["samples"] >= results["budget_samples"]


def test_scaling_rules_and_schedule():
    assert experiment.lr_multiplier("linear", 8) == 8
    assert experiment.lr_multiplier("sqrt", 16) == 4
    assert experiment.lr_multiplier("none", 16) == 1
    args = large_batch.parse_args(["--warmup", "0.25", "--decay", "linear"])
    lrs = [experiment.schedule(0.1, 4.0, t, 8, args) for t in range(8)]
    assert lrs[0] == pytest.approx(0.1) and lrs[2] == pytest.approx(0.4)     # warm-up over 2 of 8 steps
    assert lrs[7] == pytest.approx(0.4 / 6)                                  # then linear down to 0 at step 8
    assert experiment.schedule(0.1, 1.0, 0, 8, args) == pytest.approx(0.1)   # k = 1: nothing to warm up
    assert [experiment.adascale_gradients(k, n, 4) for k, n in [(1, 1), (2, 1), (32, 1), (32, 2), (1, 4)]] == \
        [2, 2, 4, 4, 4]


def test_first_reach_interpolates_between_evaluations():
    curve = [(0, 0, 4.0), (10, 20, 3.0), (20, 40, 2.0)]
    assert experiment.first_reach(curve, 2.5) == (15.0, 30.0)
    assert experiment.first_reach(curve, 1.0) == (None, None)


def test_every_rank_reads_its_slice_of_the_same_global_batch():
    global_batch = torch.arange(16)
    for world, micro in [(1, 4), (2, 2), (4, 1)]:
        parts = [experiment.my_slices(global_batch, r, world, micro) for r in range(world)]
        assert torch.equal(torch.cat([p for rank in parts for p in rank]), global_batch)
        assert {len(p) for rank in parts for p in rank} == {16 // (world * micro)}


def test_two_processes_equal_one(tmp_path):
    """The same global batches, averaged over 2 ranks: the same training to float32 rounding, and the
    same AdaScale gains (2 ranks × 2 micro-batches measure the 4 gradients of 1 process × 4)."""
    argv = ["--methods", "lamb", "adascale", "--scales", "1", "4", "--epochs", "0.02", "--eval-points", "2",
            "--eval-blocks", "8", "--lrs", "lamb=0.01", "adascale=0.1", "--no-progress", "--no-figure"]
    one = large_batch.main(argv + ["--output", str(tmp_path / "one.json")])
    two = large_batch.main(argv + ["--world-size", "2", "--output", str(tmp_path / "two.json")])
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for a, b in zip(one["runs"], two["runs"]):
        assert (a["method"], a["k"], a["steps"]) == (b["method"], b["k"], b["steps"])
        assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], rel=1e-4), a["method"]
    gains = [[g for _, g in r["gain"]] for r in (one["runs"][-1], two["runs"][-1])]
    assert max(gains[0]) > 1.05                      # a gain that is not trivially 1
    assert gains[1] == pytest.approx(gains[0], rel=1e-3)


def test_adascale_at_k1_is_sgd(tmp_path):
    """S = 1: the gain is 1 at every step whatever the noise, so AdaScale (2 micro-batches) is SGD."""
    common = ["--scales", "1", "--epochs", "0.02", "--eval-points", "1", "--eval-blocks", "8", "--no-progress",
              "--no-figure"]
    ada = large_batch.main(common + ["--methods", "adascale", "--lrs", "adascale=0.1",
                                     "--output", str(tmp_path / "a.json")])
    sgd = large_batch.main(common + ["--methods", "sgd", "--lrs", "sgd=0.1", "--output", str(tmp_path / "s.json")])
    a, s = ada["runs"][0], sgd["runs"][0]
    assert "same_as" not in a and a["adascale_gradients"] == 2
    assert all(g == 1.0 for _, g in a["gain"]) and a["steps"] == s["steps"]
    assert a["final_val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-5)


@pytest.mark.parametrize("argv, match", [
    (["--scales", "2", "4"], "must include 1"),
    (["--scales", "0", "1"], "positive integers"),
    (["--lrs", "rmsprop=0.1"], "METHOD=LR"),
    (["--lrs", "sgd=fast"], "must be numbers"),
    (["--lrs", "sgd=-0.1"], "must be positive"),
    (["--warmup", "1.5"], "--warmup"),
    (["--adascale-gradients", "1"], "--adascale-gradients must be >= 2"),
    (["--base-batch", "0"], "--base-batch must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--world-size", "3"], "not divisible by the world size 3"),
    (["--base-batch", "3", "--scales", "1"], "cannot be cut into 2 equal gradients"),
])
def test_bad_options_are_refused_before_starting(argv, match):
    with pytest.raises(ValueError, match=match):
        large_batch.parse_args(argv)


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        large_batch.parse_args(["--methods", "rmsprop"])
    assert "invalid choice: 'rmsprop'" in capsys.readouterr().err


def test_a_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(labkit.WorkerError, match="more than the 3587 training blocks"):
        large_batch.main(["--base-batch", "200", "--scales", "1", "32", "--no-progress",
                          "--output", str(tmp_path / "x.json")])


def test_under_torchrun(tmp_path):
    """The same script as one rank of torchrun's world (run_lab joins it instead of starting workers)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "torchrun.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "labkit.labs.large_batch", "--world-size", "2", "--methods", "lamb", "--scales", "1",
           "--epochs", "0.01", "--eval-points", "1", "--eval-blocks", "8", "--lrs", "lamb=0.01", "--no-progress",
           "--no-figure", "--output", str(out)]
    run = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["world_size"] == 2 and results["backend"] == "gloo"
    assert results["command"].startswith("torchrun") and len(results["runs"]) == 1
