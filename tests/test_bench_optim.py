"""Smoke test of the optimizer-step benchmark: tiny models, a few steps, no timing thresholds."""

import ast
import math
import os
import platform
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from labkit.bench import optim as bench
from labkit.optim import lamb as lamb_module


@pytest.fixture(autouse=True)
def malloc_untouched(monkeypatch):
    """main() would change malloc for the rest of this test process: tests run it with the call recorded
    instead (test_keeping_freed_memory_ends_the_page_faults runs the real one in a process of its own)."""
    calls = []
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: calls.append(1) or "malloc told to keep (test)")
    return calls


def test_sizes_and_shapes():
    assert bench.parse_size("10M") == 10_000_000
    assert bench.parse_size("0.2M") == 200_000
    assert bench.parse_size("50k") == 50_000
    assert bench.parse_size("1000") == 1000
    assert bench.parse_size("1B") == bench.parse_size("1G") == bench.parse_size("1000M") == 10 ** 9
    assert bench.parse_size("1.5b") == 1_500_000_000
    for bad in ("", "ten", "5T", "0"):
        with pytest.raises(ValueError, match="parameter count"):
            bench.parse_size(bad)
    assert bench.model_shape(10_000_000) == (384, 6)
    assert bench.model_shape(100_000_000) == (832, 12)
    model = bench.build_model(200_000)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5 * 200_000 < n < 2 * 200_000
    assert len(list(model.parameters())) == 12 * bench.model_shape(200_000)[1] + 2   # 12 per block, final LN


def test_measure_tiny_model(monkeypatch):
    # Small chunks, so that labkit's foreach path really updates the tensors chunk by chunk on a CPU.
    monkeypatch.setattr(lamb_module, "CPU_CHUNK_ELEMENTS", 40_000)
    # all but lamb-fused-whole, whose one-graph compile of the 50 tensors would take ~30 s (test_optim tests
    # what differs: Lamb.fused_units)
    versions = bench.VERSIONS + tuple(v for v in bench.EXTRA_VERSIONS if v != "lamb-fused-whole")
    assert bench.make_optimizer("lamb-fused-whole", [nn.Parameter(torch.zeros(2))]).fused_units is False
    assert bench.make_optimizer("lamb-fused", [nn.Parameter(torch.zeros(2))]).fused_units is True
    result = bench.measure(200_000, versions=versions, steps=2, warmup=1)
    assert set(result["times"]) == set(versions)
    assert all(len(ts) == 2 and all(math.isfinite(t) and t > 0 for t in ts) for ts in result["times"].values())
    assert result["steps_done"] == 3 and result["element_size"] == 4
    assert set(result["first_s"]) == set(versions) and all(t > 0 for t in result["first_s"].values())
    # Every optimizer moved the parameters (lr 1e-3 for 3 steps: by about 3e-3 at most)...
    assert all(1e-4 < moved < 1e-2 for moved in result["moved"].values()), result["moved"]
    # ... and the four LAMBs, the same algorithm, to float32 rounding of each other
    assert result["drift"]["lamb"] == 0.0 and result["drift"]["adamw"] is None
    for version in ("lamb-readable", "lamb-fused", "timm", "timm-foreach", "timm-single"):
        assert result["drift"][version] < 1e-6, (version, result["drift"])

    rows = bench.summarise(result, bandwidth=1e10)
    assert rows["adamw"]["vs_adamw"] == pytest.approx(1.0) and rows["timm"]["vs_timm"] == pytest.approx(1.0)
    median = sorted(result["times"]["lamb"])
    assert rows["lamb"]["step_s"] == pytest.approx((median[0] + median[1]) / 2)
    assert rows["lamb"]["best_s"] == median[0]
    assert rows["lamb"]["vs_adamw"] == pytest.approx(rows["lamb"]["step_s"] / rows["adamw"]["step_s"])
    assert rows["lamb"]["limit_s"] == pytest.approx(10 * 4 * result["params"] / 1e10)
    assert rows["adamw"]["limit_s"] == pytest.approx(7 * 4 * result["params"] / 1e10)
    assert rows["adamw-fused"]["per_byte"] == pytest.approx(1.0)
    assert rows["lamb-fused"]["per_byte"] == pytest.approx(
        rows["lamb-fused"]["step_s"] / 10 / (rows["adamw-fused"]["step_s"] / 7))
    assert rows["lamb"]["of_limit"] == pytest.approx(rows["lamb"]["limit_s"] / rows["lamb"]["step_s"])

    # page faults per timed step, one count per version, in the table's "faults" column
    assert set(result["faults_per_step"]) == set(versions)
    assert all(n is not None and n >= 0 for n in result["faults_per_step"].values())
    assert rows["lamb"]["faults"] == result["faults_per_step"]["lamb"]

    table = bench.format_table(result, bandwidth=1e10).splitlines()
    assert len(table) == 1 + len(versions)
    assert table[0].split()[:2] == ["version", "step"] and "faults" in table[0]
    assert [line.split()[0] for line in table[1:]] == list(versions)
    assert "(AdamW)" in table[1]


def test_copy_bandwidth_is_positive():
    assert bench.copy_bandwidth(nbytes=2 ** 20, repeats=2) > 0


def test_main_writes_report_and_json(tmp_path, capsys):
    out, raw = tmp_path / "optim.txt", tmp_path / "optim.json"
    bench.main(["--sizes", "0.05M,0.1M", "--steps", "1", "--warmup", "0", "--versions", "adamw", "lamb",
                "--quiet", "--output", str(out), "--json", str(raw)])
    report = out.read_text()
    assert report.strip() == capsys.readouterr().out.strip()
    assert "torch threads" in report and "load average" in report and report.count("version ") == 2
    assert "first step" not in report           # --warmup 0: the first step is a timed one
    bench.main(["--sizes", "0.05M", "--steps", "1", "--warmup", "1", "--versions", "adamw", "lamb", "--quiet",
                "--output", str(out)])
    assert re.search(r"first step \(allocates the state; compiles the fused LAMB\): adamw [0-9.]+ s, lamb [0-9.]+ s",
                     out.read_text()), out.read_text()
    import json
    data = json.loads(raw.read_text())
    assert len(data["results"]) == 2 and set(data["results"][0]["times"]) == {"adamw", "lamb"}


def test_main_keeps_freed_memory_unless_told_not_to(malloc_untouched, capsys):
    args = ["--sizes", "0.05M", "--steps", "1", "--warmup", "0", "--versions", "adamw", "--quiet"]
    bench.main(args)
    assert malloc_untouched == [1] and "malloc told to keep (test); faults: page faults" in capsys.readouterr().out
    bench.main(args + ["--return-memory"])
    assert malloc_untouched == [1]
    assert "the C library's malloc as it is (--return-memory); faults" in capsys.readouterr().out


def test_fault_counts_are_formatted_short():
    assert [bench._count(n) for n in (None, 0, 812.4, 4100, 117_300)] == ["-", "0", "812", "4.1k", "117k"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory changes glibc's malloc only")
def test_keeping_freed_memory_ends_the_page_faults():
    # A 64 MiB block is above the largest threshold from which glibc maps each block on its own: allocated and
    # freed again and again, it costs a page fault per 4 KiB page every time. Told to keep freed memory,
    # glibc needs a few rounds to have a free block it can align (glibc 2.36: up to 8 here), then none.
    script = textwrap.dedent("""
        import torch
        from labkit.bench import keep_freed_memory, page_faults

        def faults(rounds):
            counts = []
            for _ in range(rounds):
                before = page_faults()
                x = torch.empty(16 * 2 ** 20)
                x.fill_(1.0)
                del x
                counts.append(page_faults() - before)
            return counts

        print(faults(4), keep_freed_memory(), faults(20), sep="\\n")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), check=True).stdout.splitlines()
    before, setting, after = ast.literal_eval(out[0]), out[1], ast.literal_eval(out[2])
    # a fault per page: 16 384 of 4 KiB (here), or 32 of 2 MiB where transparent huge pages are "always" on
    assert min(before) >= 32, before
    assert setting.startswith("glibc malloc keeps freed memory")
    assert max(after[-8:]) < min(before) / 10, after


def test_without_timm_the_other_versions_run_and_timm_is_refused_before_any_timing(monkeypatch, capsys):
    from labkit.optim import references

    def missing():
        raise references._missing("timm")
    monkeypatch.setattr(bench, "timm_lamb", missing)
    bench.main(["--sizes", "0.05M", "--steps", "1", "--warmup", "0", "--versions", "adamw", "lamb", "--quiet"])
    assert "timm: not measured" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "0.05M", "--steps", "1", "--versions", "adamw", "timm-single", "--quiet"])
    captured = capsys.readouterr()
    assert "timm is not installed" in captured.err and "leave timm-single out of --versions" in captured.err
    assert captured.out == ""          # nothing was timed


@pytest.fixture
def inductor_config():
    """torch._inductor.config, with combo_kernels (the option the tests set) restored after the test. Not with
    monkeypatch: pytest 9's undo deletes an attribute that was not in the module's __dict__, and torch's config
    module then hides the option ("does not exist") from every later test in the process."""
    import torch._inductor.config as config
    saved = config.combo_kernels
    yield config
    config.combo_kernels = saved


def test_inductor_options_are_set_and_named_in_the_report(inductor_config, capsys):
    config = inductor_config
    bench.main(["--sizes", "0.05M", "--steps", "1", "--warmup", "0", "--versions", "adamw", "--quiet",
                "--inductor", "combo_kernels=True"])
    assert config.combo_kernels is True
    assert "lamb-fused: Lamb(fused=True), compiled with combo_kernels=True, one call per block;" in capsys.readouterr().out
    for bad, message in (["no_such_option=1", "not NAME=VALUE"], ["combo_kernels", "not NAME=VALUE"],
                         ["os=1", "not NAME=VALUE"],                   # a module attribute, not an option
                         ["combo_kernels=yes please", "not a Python literal"]):
        with pytest.raises(SystemExit):
            bench.main(["--sizes", "0.05M", "--versions", "adamw", "--inductor", bad])
        assert message in capsys.readouterr().err


MAKE_OPTIMIZER = bench.make_optimizer


def _interrupting(monkeypatch, version: str, at_call: int):
    """make_optimizer whose ``version`` raises KeyboardInterrupt (as Ctrl-C or SIGINT would) at its
    ``at_call``-th step, counted over the whole test."""
    real, calls = MAKE_OPTIMIZER, [0]       # the module's own, not an earlier call's wrapper

    def make(name, params):
        optimizer = real(name, params)
        if name == version:
            step = optimizer.step

            def interrupting_step(*args, **kwargs):
                calls[0] += 1
                if calls[0] == at_call:
                    raise KeyboardInterrupt
                return step(*args, **kwargs)
            optimizer.step = interrupting_step
        return optimizer
    monkeypatch.setattr(bench, "make_optimizer", make)


def test_an_interrupted_measurement_keeps_the_timed_steps_every_version_has(monkeypatch):
    # turns: adamw lamb | lamb adamw | adamw lamb | lamb (4th call: interrupted) -> 2 timed steps each
    _interrupting(monkeypatch, "lamb", at_call=4)
    result = bench.measure(50_000, versions=("adamw", "lamb"), steps=5, warmup=1)
    assert result["interrupted"] and result["steps_done"] == 3
    assert {v: len(ts) for v, ts in result["times"].items()} == {"adamw": 2, "lamb": 2}
    assert result["drift"] == {"adamw": None, "lamb": None}       # the versions stopped at different steps
    # before every version has a timed step, there is nothing to report: the interrupt goes on
    _interrupting(monkeypatch, "lamb", at_call=2)
    with pytest.raises(KeyboardInterrupt):
        bench.measure(50_000, versions=("adamw", "lamb"), steps=5, warmup=1)


def test_main_interrupted_reports_what_it_measured_then_stops_as_interrupted(monkeypatch, tmp_path, capsys):
    out = tmp_path / "optim.txt"
    args = ["--sizes", "0.05M", "0.1M", "--steps", "3", "--warmup", "0", "--versions", "adamw", "lamb", "--quiet",
            "--output", str(out)]
    _interrupting(monkeypatch, "lamb", at_call=4)       # the first size done (3 calls), the second's first
    with pytest.raises(KeyboardInterrupt):              # after the report: the run ends as Ctrl-C ends it
        bench.main(args)
    report = out.read_text()
    assert report.count("version ") == 1 and "INTERRUPTED: not measured: 0.1 M" in report, report
    assert "not measured after (interrupted)" in report
    _interrupting(monkeypatch, "lamb", at_call=3)       # the first size, after two timed steps each
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    report = out.read_text()
    assert "INTERRUPTED after 2 of 3 timed steps" in report and "not measured: 0.1 M" in report, report
    _interrupting(monkeypatch, "lamb", at_call=1)       # nothing timed at all: a plain KeyboardInterrupt
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    assert not out.exists()
    capsys.readouterr()


def test_a_fused_version_that_ran_out_of_compiled_versions_is_named(tmp_path):
    # recompile_limit=1: the blocks' call compiles, the final LayerNorm's call cannot; lamb-fused finishes
    # its steps by the foreach path, and the report must not pass those times off as the fused step's.
    import json
    import torch._dynamo
    out, raw = tmp_path / "optim.txt", tmp_path / "optim.json"
    args = ["--sizes", "0.1M", "--steps", "1", "--warmup", "1", "--versions", "lamb", "lamb-fused", "--quiet",
            "--output", str(out), "--json", str(raw)]                                   # 0.1M: 2 blocks
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(RuntimeWarning, match="recompile_limit"):
        bench.main(args)
    torch._dynamo.reset()
    (result,) = json.loads(raw.read_text())["results"]
    assert result["fell_back"] == ["lamb-fused"] and result["drift"]["lamb-fused"] < 1e-6   # the same step
    assert "NOT FUSED: lamb-fused ran out of torch.compile's versions" in out.read_text()
    bench.main(args)
    assert json.loads(raw.read_text())["results"][0]["fell_back"] == [] and "NOT FUSED" not in out.read_text()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown versions"):
        bench.measure(1000, versions=("adamw", "sgd"))
    with pytest.raises(ValueError, match="steps"):
        bench.measure(1000, steps=0)
    with pytest.raises(ValueError, match="unknown version"):
        bench.make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))])


def test_timm_arguments_are_those_the_installed_timm_takes(monkeypatch):
    assert bench.timm_options("timm") == dict(max_grad_norm=None, always_adapt=True)
    assert bench.timm_options("timm-foreach")["foreach"] is True
    assert bench.timm_options("timm-single")["foreach"] is False

    class OldLamb(torch.optim.Optimizer):       # a timm before foreach (1.0.19 and older)
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, grad_averaging=True,
                     max_grad_norm=1.0, trust_clip=False, always_adapt=False):
            super().__init__(params, dict(lr=lr))

    monkeypatch.setattr(bench, "timm_lamb", lambda: OldLamb)
    assert bench.timm_options("timm") == dict(max_grad_norm=None, always_adapt=True)
    assert isinstance(bench.make_optimizer("timm", [torch.nn.Parameter(torch.zeros(2))]), OldLamb)
    with pytest.raises(ValueError, match="no foreach argument"):
        bench.make_optimizer("timm-foreach", [torch.nn.Parameter(torch.zeros(2))])
    assert "only path" in bench.timm_default_path("cpu")

    class AncientLamb(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-3):
            super().__init__(params, dict(lr=lr))

    monkeypatch.setattr(bench, "timm_lamb", lambda: AncientLamb)
    with pytest.raises(ValueError, match="max_grad_norm or always_adapt"):
        bench.timm_options("timm")


def test_timm_default_path_on_cpu():
    # timm follows torch: its foreach path by default on CUDA only
    assert bench.timm_default_path("cpu") == "its per-tensor path"
