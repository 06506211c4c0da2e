"""labkit.bench.speed: the plan of runs, the table, and one real row on CPU (the lab with every switch
that works on a CPU); no timing thresholds."""

import pytest

from labkit.bench import speed as bench


def test_plan_turns_one_switch_on_per_row():
    runs = bench.plan(big_batch=4, leave_one_out=True)
    names = [r["name"] for r in runs]
    assert names[:8] == ["plain fp32", "+ TF32", "+ bf16 autocast", "+ flash attention", "+ fused AdamW",
                         "+ torch.compile", "+ batch x4", "torch DDP"]
    assert runs[0]["switches"] == dict(dtype="float32", tf32=False, flash=False, fused_optimizer=False, compile=False)
    for previous, run in zip(runs[:6], runs[1:6]):
        changed = {k for k in run["switches"] if run["switches"][k] != previous["switches"][k]}
        assert len(changed) == 1 and run["base"] == runs.index(previous), (run["name"], changed)
    full = runs[6]
    assert full["batch_factor"] == 4 and all(v in (True, "bfloat16") for v in full["switches"].values())
    assert runs[7]["ddp"] == "torch" and runs[7]["switches"] == full["switches"] and runs[7]["base"] == 6
    leave = runs[8:]
    assert [r["name"] for r in leave] == [f"all but {s}" for s in ("tf32", "flash", "fused_optimizer", "compile",
                                                                    "dtype")]
    for r in leave:
        off = {k for k in r["switches"] if r["switches"][k] != full["switches"][k]}
        assert len(off) == 1 and r["base"] == 6 and r["batch_factor"] == 4
    assert [r["name"] for r in bench.plan(big_batch=1)][-2:] == ["+ torch.compile", "torch DDP"]
    assert bench._options(full["switches"]) == ["--dtype", "bfloat16", "--tf32", "--flash", "--fused-optimizer",
                                                "--compile"]
    assert bench._options(runs[0]["switches"])[2:] == ["--no-tf32", "--no-flash", "--no-fused-optimizer",
                                                       "--no-compile"]


def test_without_compile_no_run_compiles_and_the_rows_still_add_one_switch_each():
    # a GPU torch.compile cannot serve (labkit.speed.compile_problem): the compile rows are left out
    runs = bench.plan(big_batch=4, leave_one_out=True, compile=False)
    names = [r["name"] for r in runs]
    assert "+ torch.compile" not in names and "all but compile" not in names and names[5] == "+ batch x4"
    assert not any(r["switches"]["compile"] for r in runs)
    assert runs[5]["base"] == 4 and runs[6]["base"] == 5 and all(r["base"] == 5 for r in runs[7:])


def test_the_long_context_row_keeps_the_tokens_per_step():
    runs = bench.plan(big_batch=4, long_context=1024)
    context = runs[-1]
    assert context["name"] == "context 1024" and context["block_size"] == 1024 and context["ddp"] == "bucketed"
    assert context["base"] == 6 and context["switches"] == runs[6]["switches"]
    assert all(r["block_size"] is None for r in runs[:-1])
    assert bench.sequences(runs[6], 32, 256) == 128 and bench.sequences(context, 32, 256) == 32   # 32 768 tokens
    assert bench.sequences(context, 1, 64) == 1            # never fewer than one sequence
    assert "context" not in [r["name"].split()[0] for r in bench.plan(big_batch=4)]


def _fake_metrics(run, args):
    # tokens/s doubles with every switch on, the batch row doubles again
    speedup = 2 ** sum(v is True or v == "bfloat16" for v in run["switches"].values()) * run["batch_factor"]
    return dict(tokens_per_s=1000.0 * speedup, mean_step_time_s=1 / speedup, mfu=0.1 * speedup,
                mfu_of_measured=0.05 * speedup, measured_matmul_tflops=100.0, peak_memory_bytes=2 ** 30,
                peak_memory_source="test", train_loss=[4.0, 3.0], global_batch_tokens=256, params=1000,
                device_name="test device", peak_source="test sheet")


def test_table_compares_each_row_with_its_base():
    rows = bench.measure(bench.plan(big_batch=2), None, runner=_fake_metrics)
    table = bench.format_table(rows).splitlines()
    assert table[0].split()[0] == "run" and len(table) == 1 + len(rows)
    by_name = {line[:18].strip(): line.split() for line in table[1:]}
    assert by_name["plain fp32"][-2:] == ["1.00x", "1.00x"]
    assert by_name["+ TF32"][-2:] == ["2.00x", "2.00x"]
    assert by_name["+ batch x2"][-2:] == ["2.00x", "64.00x"]
    assert by_name["torch DDP"][-2] == "1.00x"                      # the same fake speed as its base
    assert by_name["+ torch.compile"][4:6] == ["320.0%", "160.0%"]     # MFU: data sheet, measured rate


@pytest.mark.parametrize("option", [["--steps", "3"], ["--batch-size", "0"], ["--big-batch", "0"],
                                    ["--world-size", "0"], ["--long-context", "-1"]])
def test_bad_options_are_refused_before_any_run(option):
    with pytest.raises(ValueError, match="steps >= 5"):
        bench.main(option)


def test_a_long_context_that_would_change_the_tokens_per_step_is_refused():
    with pytest.raises(ValueError, match="--long-context 1000 must divide the batch row's 32768 tokens"):
        bench.main(["--device", "cpu", "--preset", "gpu", "--batch-size", "32", "--long-context", "1000"])


def test_one_real_row_on_cpu():
    class Args:
        world_size, preset, steps, batch_size, device, timeout = 1, "tiny", 5, 4, "cpu", 120
    run = dict(name="cpu switches", switches=dict(dtype="float32", tf32=False, flash=True, fused_optimizer=True,
                                                  compile=False), batch_factor=1, ddp="bucketed", base=0)
    row, = bench.measure([run], Args)
    assert row["tokens_per_s"] > 0 and 0 < row["mfu_of_measured"] < 1 and row["mfu"] == "unknown"
    assert row["loss"] < 4.3 and row["batch_tokens"] == 4 * 64


def test_the_table_is_written_after_every_row(tmp_path, monkeypatch, capsys):
    """A run cut short (a lent GPU's time is up) leaves the rows it finished in --output and --json."""
    output, raw = tmp_path / "speed.txt", tmp_path / "speed.json"
    seen = []

    def runner(run, args):
        seen.append(output.read_text() if output.exists() else None)
        return _fake_metrics(run, args)
    monkeypatch.setattr(bench, "run_row", runner)
    rows = bench.main(["--device", "cpu", "--preset", "tiny", "--steps", "5", "--big-batch", "2", "--long-context", "128",
                       "--output", str(output), "--json", str(raw)])
    assert [r["name"] for r in rows][-1] == "context 128" and len(seen) == len(rows) == 9
    assert seen[0] is None
    for done, text in enumerate(seen[1:], start=1):
        assert f"(so far: {done} of 9 runs)" in text and len(text.split("\n\n", 1)[1].splitlines()) == 1 + done
    final = output.read_text()
    assert "so far" not in final and final.strip() == capsys.readouterr().out.strip()   # printed once, at the end
    import json
    assert len(json.loads(raw.read_text())["rows"]) == 9


def test_on_a_gpu_torch_compile_cannot_serve_the_compile_runs_are_left_out_and_said(monkeypatch, capsys):
    from labkit import speed
    monkeypatch.setattr(speed, "compile_problem", lambda device: "no Triton here")
    ran = []
    monkeypatch.setattr(bench, "run_row", lambda run, args: ran.append(run) or _fake_metrics(run, args))
    bench.main(["--device", "cuda", "--steps", "5", "--big-batch", "1"])
    assert [r["name"] for r in ran] == ["plain fp32", "+ TF32", "+ bf16 autocast", "+ flash attention",
                                        "+ fused AdamW", "torch DDP"]
    assert not any(r["switches"]["compile"] for r in ran)
    assert "torch.compile: not measured (no Triton here)" in capsys.readouterr().out
