"""labkit.bench.measure_gpu: the one command that takes every GPU measurement. No GPU here, so: every
step's command line is accepted by the tool it calls (on a GPU and in the CPU rehearsal), its files fit
what a lent machine sends back, and a step past its limit is stopped, workers and all, without
stopping the ones after it."""

import importlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from labkit.bench import measure_gpu as mg


@pytest.mark.parametrize("rehearse", [False, True], ids=["gpu", "rehearsal"])
@pytest.mark.parametrize("step", [s for s in mg.STEPS if s.argv[0].startswith("labkit.")], ids=lambda s: s.name)
def test_each_benchmark_step_is_a_command_line_its_tool_accepts(step, rehearse, tmp_path):
    argv = mg.command(step, tmp_path, rehearse)
    assert argv[:2] == [sys.executable, "-m"]
    module = importlib.import_module(argv[2])
    args = module.build_parser().parse_args(argv[3:])          # exits on an unknown option or value
    if hasattr(args, "device"):
        assert args.device == ("cpu" if rehearse else "cuda")


def test_the_gpu_checks_step_selects_the_checks_it_names(tmp_path):
    step, = [s for s in mg.STEPS if s.name == "gpu_checks"]
    assert step.argv == step.rehearsal
    argv = mg.command(step, tmp_path, rehearse=False)
    junit = argv.index("--junit-xml")
    argv = argv[:junit] + argv[junit + 2:]
    out = subprocess.run(argv + ["--collect-only"], cwd=mg.ROOT, capture_output=True, text=True, timeout=120).stdout
    selected = [line for line in out.splitlines() if line.startswith("tests/test_gpu.py::")]
    names = {line.split("::")[1].split("[")[0] for line in selected}
    assert "test_gpt_lab_with_every_speed_switch_on_the_gpu" in names, out
    assert {"test_fused_lamb_equals_the_readable_one_on_the_gpu_in_float32",
            "test_fused_lamb_compiled_in_bfloat16_is_the_float64_step_rounded"} <= names, out


def test_the_outputs_fit_what_a_lent_machine_sends_back(tmp_path):
    files = [mg.LOG] + [name for step in mg.STEPS for name in step.outputs]
    assert len(files) == len(set(files)) <= 8                   # at most 8 files come back
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    for step in mg.STEPS:
        for argv in (step.argv, step.rehearsal):
            written = {a.split("/", 1)[1] for a in argv if a.startswith("{out}/")}
            assert written == set(step.outputs), step.name
    assert mg.BUDGET_S <= 600 - 30                    # one call's 10 minutes, with time to start and print
    assert mg.STEPS[0].name == "speed_gpu" and all(step.limit_s < mg.BUDGET_S for step in mg.STEPS)


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that may never reap it (PID 1 in a container)."""
    if not os.path.isdir("/proc"):     # macOS: no zombie check
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _module(tmp_path, name: str, code: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))


def test_a_step_past_its_limit_is_stopped_with_its_workers_and_the_next_steps_run(tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    # Its worker ignores SIGINT, as the launcher's workers do: only the SIGKILL to the group ends it.
    _module(tmp_path, "sleeper", f"""
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                   "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(300)"])
        open({str(pids)!r}, "w").write(str(worker.pid))
        print("sleeping", flush=True)
        time.sleep(300)
    """)
    _module(tmp_path, "fails", "import sys; print('about to fail'); sys.exit(3)")
    _module(tmp_path, "writes", "import sys; open(sys.argv[1], 'w').write('table'); print('wrote it')")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    steps = [mg.Step("sleeper", ("sleeper",), ("sleeper",), limit_s=8, outputs=()),
             mg.Step("fails", ("fails",), ("fails",), limit_s=30, outputs=()),
             mg.Step("writes", ("writes", "{out}/table.txt"), ("writes", "{out}/table.txt"), limit_s=30,
                     outputs=("table.txt",)),
             mg.Step("again", ("writes", "{out}/again.txt"), ("writes", "{out}/again.txt"), limit_s=30, outputs=())]
    lines = []
    with open(tmp_path / "log", "wb") as log:
        results = mg.run_steps(steps, tmp_path, rehearse=True, budget_s=60, log=log, grace_s=2, kill_wait_s=5,
                               report=lines.append)
    sleeper, fails, writes, again = results
    assert sleeper.timed_out and sleeper.returncode != 0 and 8 <= sleeper.seconds < 8 + 2 + 5 + 5
    assert not _alive(int(pids.read_text()))         # the step's own worker went with it
    assert (fails.returncode, fails.timed_out) == (3, False)
    assert writes.returncode == 0 and (tmp_path / "table.txt").read_text() == "table"
    log = (tmp_path / "log").read_text()
    for text in ("sleeping", "about to fail", "wrote it", "sleeper: stopped at its limit", "fails: failed (exit 3)",
                 "writes: ok after"):
        assert text in log
    assert again.returncode == 0 and (tmp_path / "again.txt").is_file()     # 60 s were enough for all
    assert lines == [r.describe() for r in results]


def test_a_step_hears_the_sigint_at_its_limit_even_from_a_driver_that_ignores_sigint(tmp_path, monkeypatch):
    # A driver started with nohup or a script's "&" has SIGINT ignored, and children inherit that; the
    # step must still get its KeyboardInterrupt at the limit to write what it has (bench.optim does).
    _module(tmp_path, "patient", """
        import sys, time
        try:
            print("waiting", flush=True)
            time.sleep(300)
        except KeyboardInterrupt:
            open(sys.argv[1], "w").write("partial table")
            sys.exit(130)
    """)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    step = mg.Step("patient", ("patient", "{out}/table.txt"), ("patient", "{out}/table.txt"), limit_s=4,
                   outputs=("table.txt",))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with open(tmp_path / "log", "wb") as log:
            (result,) = mg.run_steps([step], tmp_path, rehearse=True, budget_s=60, log=log, grace_s=10,
                                     kill_wait_s=5, report=lambda line: None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.timed_out and result.returncode == 130, result
    assert (tmp_path / "table.txt").read_text() == "partial table"
    assert result.seconds < 4 + 10, "it waited for the SIGKILL: the SIGINT went unheard"


def test_the_budget_is_shared_and_a_step_with_none_left_is_not_started(tmp_path, monkeypatch):
    _module(tmp_path, "sleeper", "import time; time.sleep(300)")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    steps = [mg.Step("first", ("sleeper",), ("sleeper",), limit_s=100, outputs=()),
             mg.Step("second", ("sleeper",), ("sleeper",), limit_s=100, outputs=())]
    with open(tmp_path / "log", "wb") as log:
        first, second = mg.run_steps(steps, tmp_path, rehearse=True, budget_s=10, log=log, grace_s=1, kill_wait_s=2,
                                     report=str)
    # its limit became what the budget leaves once stopping it is allowed for: 10 - 1 - 2 = 7 s
    assert first.timed_out and 7 <= first.seconds <= 10 + 5
    assert second.returncode is None and second.describe() == "second: not run (the budget was spent)"


def test_without_a_gpu_it_asks_for_one_or_a_rehearsal(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        mg.main(["--out", str(tmp_path)])
    assert "no CUDA GPU here" in capsys.readouterr().err and not (tmp_path / mg.LOG).exists()


def test_a_rehearsal_hides_the_gpu_from_its_steps(tmp_path, monkeypatch):
    _module(tmp_path, "shows_gpus", "import os; print('visible:', repr(os.environ.get('CUDA_VISIBLE_DEVICES')))")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    step = mg.Step("shows", ("shows_gpus",), ("shows_gpus",), limit_s=60, outputs=())
    for rehearse, shown in ((True, "visible: ''"), (False, "visible: '0'")):
        with open(tmp_path / "log", "wb") as log:
            result, = mg.run_steps([step], tmp_path, rehearse=rehearse, budget_s=100, log=log, report=str)
        assert result.returncode == 0 and shown in (tmp_path / "log").read_text()


def test_a_rehearsal_writes_the_log_and_returns_success(tmp_path, capsys):
    assert mg.main(["--out", str(tmp_path), "--rehearse", "--only", "gpu_checks"]) == 0
    log = (tmp_path / mg.LOG).read_text()
    assert log.startswith("labkit.bench.measure_gpu on the CPU (rehearsal)")
    assert "skipped" in log and "gpu_checks: ok after" in log and (tmp_path / "gpu_checks.xml").is_file()
    assert "gpu_checks: ok after" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_step_ends_when_the_driver_is_stopped(how, tmp_path):
    """The device tool stops a command at its limit; a step runs in a session of its own, so it must go
    with the driver: on SIGTERM the driver stops it, on SIGKILL the kernel does (parent-death signal)."""
    pid_file = tmp_path / "step.pid"
    _module(tmp_path, "sleeper", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                 "time.sleep(300)")
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal
        from pathlib import Path
        from labkit.bench import measure_gpu as mg
        signal.signal(signal.SIGTERM, mg._exit_on_sigterm)
        step = mg.Step("sleeper", ("sleeper",), ("sleeper",), limit_s=200, outputs=())
        with open({str(tmp_path / "log")!r}, "wb") as log:
            mg.run_steps([step], Path({str(tmp_path)!r}), rehearse=True, budget_s=300, log=log)
    """)], cwd=mg.ROOT, env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{mg.ROOT}"})
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        step_pid = int(pid_file.read_text())
        assert _alive(step_pid)
        driver.send_signal(getattr(signal, how))
        driver.wait(30)
        deadline = time.monotonic() + 10
        while _alive(step_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(step_pid)
    finally:
        driver.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
