"""Lab 3 (labkit/labs/train_gpt.py): a GPT trained with each of the four DDPs on 2 processes.

One launch per DDP (module fixture) serves several tests: each learns, writes its outputs, and all
four end with the same parameters (they average the same gradients). Resuming from a checkpoint
continues exactly; the script also runs under torchrun, accelerate launch and as one process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import labkit
from labkit import speed
from labkit.labs import train_gpt

ROOT = Path(__file__).resolve().parents[1]
DDPS = ("torch", "naive", "overlap", "bucketed")
STEPS = 24
# 8 sequences of 64 characters per rank; eval on one batch per rank at steps 0, 12 and 24.
# --bucket-cap-mb 0.05 (52 KB) cuts the tiny GPT's 250 KB of gradients into several buckets.
COMMON = ["--world-size", "2", "--steps", str(STEPS), "--batch-size", "8", "--eval-every", "12",
          "--eval-batches", "1", "--bucket-cap-mb", "0.05", "--seed", "0"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    runs = {}
    for ddp in DDPS:
        out = tmp_path_factory.mktemp(f"train_gpt_{ddp}")
        result = train_gpt.main(COMMON + ["--ddp", ddp, "--out-dir", str(out)])
        runs[ddp] = (result, out)
    return runs


@pytest.mark.parametrize("ddp", DDPS)
def test_each_ddp_learns_and_writes_its_outputs(ddp_runs, ddp):
    result, out = ddp_runs[ddp]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_loss"] == result["train_loss"]
    assert (metrics["world_size"], metrics["backend"], metrics["ddp"]) == (2, "gloo", ddp)
    assert metrics["replicas_identical"] is True
    assert metrics["global_batch_sequences"] == 16 and metrics["global_batch_tokens"] == 16 * 64
    assert len(metrics["train_loss"]) == len(metrics["step_time_s"]) == STEPS
    assert [step for step, _ in metrics["eval_loss"]] == [0, 12, 24]
    assert metrics["tokens_per_s"] > 0 and metrics["mfu"] == "unknown"   # no peak known for a CPU
    # Measured: train loss 4.37 -> ~3.1 and validation 4.38 -> ~3.1 in 24 steps; ln(78) = 4.36 is chance.
    first, last = metrics["train_loss"][0], sum(metrics["train_loss"][-4:]) / 4
    assert first > 4.2 and last < first - 0.7, metrics["train_loss"]
    assert metrics["eval_loss"][-1][1] < metrics["eval_loss"][0][1] - 0.7, metrics["eval_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint.pt").is_file()


def test_all_four_ddps_end_with_the_same_parameters(ddp_runs):
    """They average the same gradients: only the order of float additions may differ (on 2 ranks, not even that)."""
    final = {ddp: torch.load(out / "checkpoint.pt", weights_only=True)["model"] for ddp, (_, out) in ddp_runs.items()}
    for ddp in DDPS[1:]:
        for name, ref in final["torch"].items():
            torch.testing.assert_close(final[ddp][name], ref, rtol=1e-6, atol=1e-7, msg=f"{ddp}: {name}")
        assert ddp_runs[ddp][0]["train_loss"] == pytest.approx(ddp_runs["torch"][0]["train_loss"], rel=1e-6)


def test_speed_switches_train_the_same_model_on_cpu(tmp_path):
    """--compile, --flash and --fused-optimizer (labkit.speed) change how a step runs, not what it
    computes: the losses of a plain run to float32 rounding. And the speed line's numbers are there."""
    common = ["--world-size", "1", "--steps", "5", "--batch-size", "4", "--eval-every", "0", "--eval-batches", "1"]
    plain = train_gpt.main(common + ["--out-dir", str(tmp_path / "plain")])
    fast = train_gpt.main(common + ["--out-dir", str(tmp_path / "fast"), "--compile", "--flash", "--fused-optimizer"])
    assert plain["switches"] == dict(dtype="float32", tf32=False, flash=False, compile=False, fused_optimizer=False)
    assert fast["switches"] == dict(dtype="float32", tf32=False, flash=True, compile=True, fused_optimizer=True)
    assert fast["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    assert fast["train_loss"][-1] < fast["train_loss"][0] - 0.3
    assert fast["compiled_graphs"] >= 1 and plain["compiled_graphs"] == 0
    for run in (plain, fast):
        assert 0 < run["mfu_of_measured"] < 1 and run["measured_matmul_tflops"] > 0
        assert run["peak_memory_bytes"] > 50 * 2 ** 20 and "resident" in run["peak_memory_source"]
        assert run["timed_steps"] == (2 if run is fast else 4)
    line = train_gpt.speed_line(fast)
    assert "tokens/s" in line and "no data sheet for CPUs" in line and "compile" in line


def test_resume_continues_exactly(tmp_path):
    """6 steps in one go == 3 steps, stop, resume for 3 more: bitwise, with dropout (RNG states restored),
    gradient accumulation (no_sync) and a stop in the middle of an epoch's data."""
    common = ["--world-size", "2", "--steps", "6", "--batch-size", "4", "--grad-accum", "2", "--dropout", "0.1",
              "--eval-every", "0", "--eval-batches", "1", "--ddp", "bucketed"]
    straight = train_gpt.main(common + ["--out-dir", str(tmp_path / "straight")])
    half = train_gpt.main(common + ["--out-dir", str(tmp_path / "halves"), "--stop-after", "3"])
    assert half["steps_done"] == 3 and torch.load(tmp_path / "halves" / "checkpoint.pt")["step"] == 3
    # Only --resume: the other options come from the checkpoint; the outputs go into the same folder.
    resumed = train_gpt.main(["--resume", str(tmp_path / "halves")])
    assert resumed["resumed_from_step"] == 3 and resumed["out_dir"] == str(tmp_path / "halves")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["data"] == b["data"] and a["step"] == b["step"] == 6
    assert resumed["train_loss"] == straight["train_loss"]          # the history carries over
    assert resumed["param_checksum"] == straight["param_checksum"]

    # A checkpoint from before the speed switches existed continues with them off, unless asked.
    old = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)
    for name in ("compile", "tf32", "fused_optimizer"):
        del old["args"][name]
    torch.save(old, tmp_path / "old.pt")
    args = train_gpt.parse_args(["--resume", str(tmp_path / "old.pt")])
    assert (args.compile, args.tf32, args.fused_optimizer) == (False, False, False)
    assert train_gpt.parse_args(["--resume", str(tmp_path / "old.pt"), "--compile"]).compile is True

    # ... and with the preset's context, the only one there was then.
    del old["args"]["block_size"]
    torch.save(old, tmp_path / "old.pt")
    args = train_gpt.parse_args(["--resume", str(tmp_path / "old.pt")])
    assert args.block_size is None
    args.block_size, args.steps = 64, 8                    # train() makes 64 of None for the tiny preset
    assert train_gpt.load_checkpoint(tmp_path / "old.pt", args, torch.device("cpu"), 2)["step"] == 6

    with pytest.raises(labkit.WorkerError, match="cannot resume .* --block-size 64 \\(now 32\\), --batch-size 4 "
                                                 "\\(now 2\\)"):
        train_gpt.main(["--resume", str(tmp_path / "halves"), "--batch-size", "2", "--block-size", "32",
                        "--steps", "8"])
    with pytest.raises(labkit.WorkerError, match="is at step 6 and --steps is 6: nothing to do"):
        train_gpt.main(["--resume", str(tmp_path / "straight" / "checkpoint.pt")])


def test_a_resumed_optimizer_uses_the_kernel_asked_for_not_the_saved_one():
    model = torch.nn.Linear(3, 2)
    saved_run = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.ones(1, 3)).sum().backward()
    saved_run.step()
    for asked in (False, True):
        optimizer = torch.optim.AdamW(model.parameters(), **speed.adamw_options(speed.Switches(fused_optimizer=asked)))
        train_gpt.load_optimizer_state(optimizer, saved_run.state_dict(), speed.Switches(fused_optimizer=asked))
        assert bool(optimizer.param_groups[0]["fused"]) is asked
        assert optimizer.state[model.weight]["step"] == 1


def test_single_process(tmp_path):
    """Plain `python -m labkit.labs.train_gpt`: one worker, a world of 1; --sample prints generated text."""
    result = train_gpt.main(["--steps", "3", "--batch-size", "4", "--eval-batches", "1", "--sample", "40",
                             "--block-size", "32", "--out-dir", str(tmp_path)])
    assert result["world_size"] == 1 and result["replicas_identical"] and len(result["train_loss"]) == 3
    assert result["model_config"]["block_size"] == 32 and result["global_batch_tokens"] == 4 * 32
    assert len(result["sample"]) == 40
    assert json.loads((tmp_path / "metrics.json").read_text())["sample"] == result["sample"]


@pytest.mark.parametrize("argv, error, match", [
    (["--ddp", "bucketed", "--bucket-cap-mb", "0"], ValueError, "--bucket-cap-mb"),
    (["--batch-size", "0"], ValueError, "--batch-size must be positive"),
    (["--block-size", "0"], ValueError, "--block-size must be positive"),
    (["--steps", "4", "--stop-after", "5"], ValueError, "--stop-after"),
    (["--resume", "/nonexistent/run"], FileNotFoundError, "no such checkpoint"),
])
def test_bad_command_lines_are_refused_before_starting(argv, error, match):
    with pytest.raises(error, match=match):
        train_gpt.parse_args(argv)


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        train_gpt.parse_args(["--preset", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_a_context_longer_than_the_text_is_refused_by_name():
    with pytest.raises(ValueError, match="--block-size 30000 is too long for the validation text"):
        train_gpt.load_text("tiny", 0.0, False, 30000)


def test_a_batch_larger_than_a_shard_is_refused():
    with pytest.raises(labkit.WorkerError, match="--batch-size 5000 per rank does not fit"):
        train_gpt.main(["--world-size", "2", "--batch-size", "5000", "--steps", "1"])


def test_lr_schedule_and_data_position():
    args = train_gpt.parse_args(["--steps", "100", "--lr", "1e-3", "--warmup-steps", "10"])
    lrs = [train_gpt.lr_at(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)       # linear warm-up
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-2)  # cosine to lr/10
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # A stream restarted at (epoch, position) yields what the original yields from there on.
    _, _, blocks, _ = train_gpt.load_text("tiny", 0.0, False)
    loader = train_gpt.make_loader(blocks, 512, rank=1, world_size=2, seed=3, shuffle=True)
    stream = train_gpt.DataStream(loader)
    for _ in range(len(loader) + 1):        # into the second epoch
        stream.next()
    again = train_gpt.DataStream(loader, stream.epoch, stream.position)
    assert (stream.epoch, stream.position) == (1, 1)
    for _ in range(len(loader) + 1):
        assert all(torch.equal(a, b) for a, b in zip(stream.next(), again.next()))


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


LAB = ["-m", "labkit.labs.train_gpt", "--world-size", "2", "--steps", "3", "--batch-size", "4",
       "--eval-batches", "1"]


def test_under_torchrun(tmp_path):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                *LAB, "--ddp", "torch", "--out-dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2 (gloo on cpu), ddp=torch" in out.stdout and "replicas identical: True" in out.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["world_size"] == 2


def test_under_accelerate_launch_with_the_shipped_cpu_config(tmp_path):
    out = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml",
                "--num_processes", "2", *LAB, "--ddp", "overlap", "--out-dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2 (gloo on cpu), ddp=overlap" in out.stdout and "replicas identical: True" in out.stdout
    assert (tmp_path / "loss.png").is_file()
