"""Every GPU measurement of the speed work in one command that fits one call of a lent GPU machine.

    python3 -m labkit.bench.measure_gpu --out DIR              # on a machine with a CUDA GPU
    python3 -m labkit.bench.measure_gpu --out DIR --rehearse   # the same steps on the CPU, tiny sizes

The steps (:data:`STEPS`), most wanted first, each a command with a time limit:

    speed_gpu        labkit.bench.speed: the GPT lab's switches one at a time (tokens/s, MFU, peak
                     memory), torch's DDP against labkit's bucketed DDP, and GPT-2's context of 1024
    optim_gpu_1B     labkit.bench.optim at 1 B parameters: AdamW, fused AdamW, LAMB and the fused LAMB
                     against the memory-bandwidth floor
    gpu_checks       tests/test_gpu.py's checks of the speed switches and of the fused LAMB on the GPU
    optim_gpu_100M   labkit.bench.optim at 100 M, with the readable LAMB and timm's
    optim_gpu_100M_whole   the fused LAMB at 100 M as one compiled call against one call per block
    optim_gpu_100M_combo   the fused LAMB at 100 M again, compiled with Inductor's combo kernels

A lent machine gives one command at most 10 minutes and a whole task 15, machine starts included; so
the steps share a budget (``--budget``, default 550 s), a step past its limit is stopped (its launched
workers with it) and the next one starts, and each step writes its tables as soon as it has them:
bench.speed after every row, so a run cut short keeps the rows it finished; the optimizer benchmark
at its end, or when stopped at its limit with the timed steps it has (if any). The 1 B step's limit
leaves room for compiling the fused LAMB (one block's call, ~16 s on a 2-core CPU; the whole step as
one call took 148 s). Everything the steps print goes to DIR/measure_gpu.log, with each step's exit
status and time; the tables go to DIR/<step>.txt (at most 8 files come back from a lent machine:
these are 8).

``--rehearse`` runs the same steps on the CPU at tiny sizes (about three minutes), writing the same files:
it shows that every command, option and test selection below works before a GPU's minutes are spent.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["Step", "STEPS", "BUDGET_S", "StepResult", "command", "run_steps", "main"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Step:
    """One command of the measurement: ``python3 -m`` + ``argv`` on a GPU, + ``rehearsal`` on the CPU
    ("{out}" stands for the output folder); ``outputs``: the files it writes there."""
    name: str
    argv: tuple[str, ...]
    rehearsal: tuple[str, ...]
    limit_s: float
    outputs: tuple[str, ...]


GPU_CHECKS = "speed_switch or fused_lamb"
STEPS = (
    Step("speed_gpu",
         ("labkit.bench.speed", "--device", "cuda", "--steps", "20", "--long-context", "1024",
          "--output", "{out}/speed_gpu.txt", "--json", "{out}/speed_gpu.json"),
         ("labkit.bench.speed", "--device", "cpu", "--preset", "tiny", "--batch-size", "4", "--steps", "6",
          "--long-context", "128", "--output", "{out}/speed_gpu.txt", "--json", "{out}/speed_gpu.json"),
         limit_s=240, outputs=("speed_gpu.txt", "speed_gpu.json")),
    # 1 B parameters: four copies with their optimizer state, about 52 GB, fit an 80 GB GPU.
    Step("optim_gpu_1B",
         ("labkit.bench.optim", "--device", "cuda", "--sizes", "1B", "--steps", "10",
          "--versions", "adamw", "adamw-fused", "lamb", "lamb-fused", "--output", "{out}/optim_gpu_1B.txt"),
         ("labkit.bench.optim", "--device", "cpu", "--sizes", "1M", "--steps", "3", "--warmup", "2",
          "--versions", "adamw", "adamw-fused", "lamb", "lamb-fused", "--output", "{out}/optim_gpu_1B.txt"),
         limit_s=150, outputs=("optim_gpu_1B.txt",)),
    Step("gpu_checks",
         ("pytest", "-q", "tests/test_gpu.py", "-m", "gpu", "-k", GPU_CHECKS,
          "--junit-xml", "{out}/gpu_checks.xml"),
         ("pytest", "-q", "tests/test_gpu.py", "-m", "gpu", "-k", GPU_CHECKS,
          "--junit-xml", "{out}/gpu_checks.xml"),
         limit_s=100, outputs=("gpu_checks.xml",)),
    Step("optim_gpu_100M",
         ("labkit.bench.optim", "--device", "cuda", "--sizes", "100M",
          "--versions", "adamw", "adamw-fused", "lamb", "lamb-fused", "lamb-readable", "timm",
          "--output", "{out}/optim_gpu_100M.txt"),
         ("labkit.bench.optim", "--device", "cpu", "--sizes", "0.5M", "--steps", "3", "--warmup", "2",
          "--versions", "adamw", "adamw-fused", "lamb", "lamb-fused", "lamb-readable", "timm",
          "--output", "{out}/optim_gpu_100M.txt"),
         limit_s=80, outputs=("optim_gpu_100M.txt",)),
    # If time is left: what cutting the fused step into one call per block costs or saves on a GPU (one
    # Python call per block; the whole step as one call compiles its ~150 tensors, ~80 s on a CPU core).
    Step("optim_gpu_100M_whole",
         ("labkit.bench.optim", "--device", "cuda", "--sizes", "100M",
          "--versions", "adamw-fused", "lamb-fused", "lamb-fused-whole",
          "--output", "{out}/optim_gpu_100M_whole.txt"),
         ("labkit.bench.optim", "--device", "cpu", "--sizes", "0.5M", "--steps", "3", "--warmup", "2",
          "--versions", "adamw-fused", "lamb-fused", "lamb-fused-whole",
          "--output", "{out}/optim_gpu_100M_whole.txt"),
         limit_s=120, outputs=("optim_gpu_100M_whole.txt",)),
    # Then: the fused LAMB with Inductor's combo kernels (each call's small kernels launched a few at a
    # time), in case launching its ~300 kernels one by one is what holds it back at 100 M.
    Step("optim_gpu_100M_combo",
         ("labkit.bench.optim", "--device", "cuda", "--sizes", "100M", "--versions", "adamw-fused", "lamb-fused",
          "--inductor", "combo_kernels=True", "--output", "{out}/optim_gpu_100M_combo.txt"),
         ("labkit.bench.optim", "--device", "cpu", "--sizes", "0.5M", "--steps", "3", "--warmup", "2",
          "--versions", "adamw-fused", "lamb-fused", "--inductor", "combo_kernels=True",
          "--output", "{out}/optim_gpu_100M_combo.txt"),
         limit_s=70, outputs=("optim_gpu_100M_combo.txt",)),
)
LOG = "measure_gpu.log"
BUDGET_S = 550.0      # a lent machine's command gets 600 s: the rest is Python's start and the tables' print


@dataclass
class StepResult:
    name: str
    returncode: int | None     # None: not started (no budget left), or still running after SIGKILL
    seconds: float
    timed_out: bool
    started: bool = True

    def describe(self) -> str:
        if not self.started:
            return f"{self.name}: not run (the budget was spent)"
        if self.returncode is None:
            return f"{self.name}: could not be stopped ({self.seconds:.0f} s)"
        state = "stopped at its limit" if self.timed_out else ("ok" if self.returncode == 0 else
                                                               f"failed (exit {self.returncode})")
        return f"{self.name}: {state} after {self.seconds:.0f} s"


def command(step: Step, out: Path, rehearse: bool) -> list[str]:
    """The step's command line: this Python, ``-m``, its arguments with the output folder filled in."""
    return [sys.executable, "-m", *(a.replace("{out}", str(out)) for a in (step.rehearsal if rehearse else step.argv))]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):     # the group is gone (or only zombies are left)
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count: they hold no memory)."""
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except FileNotFoundError:        # no /proc (macOS): ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _ppid, group = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):     # gone meanwhile
            continue
        if int(group) == pgid and state not in ("Z", "X"):
            return True
    return False


def _stop(process: subprocess.Popen, grace_s: float, kill_wait_s: float) -> None:
    """SIGINT to the step's whole process group (so that it can stop its workers and write what it
    has), then SIGKILL to what is left of the group: also processes that ignore SIGINT, as the
    launcher's workers and fork server do. Returns when every process of the group has ended (or
    after ``kill_wait_s``): a killed worker may still hold GPU memory the next step needs."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGINT)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + kill_wait_s
    try:
        process.wait(kill_wait_s)
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _prepare_step() -> None:
    """In the step's process before it starts: killed if the driver dies (the device tool stops the
    driver at its limit, and a step in a session of its own would otherwise run on); and SIGINT back
    to its default, which Python turns into KeyboardInterrupt. A driver started in the background
    (``nohup``, a script's ``&``) inherits SIGINT ignored and would pass that on: the stop at a step's
    limit, meant to let it write what it has, would then go unheard until the SIGKILL."""
    from labkit.launcher import _set_parent_death_signal
    _set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_steps(steps: list[Step], out: Path, *, rehearse: bool, budget_s: float, log: BinaryIO,
              grace_s: float = 15, kill_wait_s: float = 10, report: Callable[[str], object] = print
              ) -> list[StepResult]:
    """Each step in turn, its output appended to ``log``, within ``budget_s`` in all: a step gets its
    own limit or what is left of the budget, whichever is less, less the time stopping it may take.
    Whatever a step leaves running in its process group is killed when it ends."""
    results, start = [], time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if rehearse:
        env["CUDA_VISIBLE_DEVICES"] = ""      # a rehearsal is the CPU's, also on a machine with a GPU
    for step in steps:
        left = budget_s - (time.monotonic() - start) - grace_s - kill_wait_s
        if left < 5:
            results.append(StepResult(step.name, None, 0.0, False, started=False))
            report(results[-1].describe())
            continue
        limit = min(step.limit_s, left)
        argv = command(step, out, rehearse)
        log.write(f"\n===== {step.name} (limit {limit:.0f} s): {' '.join(argv)}\n".encode())
        log.flush()
        t0 = time.monotonic()
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=env, preexec_fn=_prepare_step)
        timed_out = False
        try:
            process.wait(limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:         # the driver is stopped (Ctrl-C, SIGTERM): the step goes with it
            _stop(process, 0, kill_wait_s)
            raise
        _stop(process, grace_s, kill_wait_s)
        results.append(StepResult(step.name, process.returncode, time.monotonic() - t0, timed_out))
        log.write(f"===== {results[-1].describe()}\n".encode())
        log.flush()
        report(results[-1].describe())
    return results


def _environment(rehearse: bool) -> str:
    """One line: the device, torch, Python, cores. Asked of a child process, so that this one holds no
    CUDA context (its memory) while the steps run."""
    where = ('"the CPU (rehearsal)"' if rehearse else
             '", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))')
    code = (f"import os, platform, torch; print(f'labkit.bench.measure_gpu on {{{where}}}; torch {{torch.__version__}} "
            f"(CUDA {{torch.version.cuda}}), Python {{platform.python_version()}}, {{os.cpu_count()}} CPU cores')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or f"labkit.bench.measure_gpu: the environment could not be read ({done.stderr[-300:]})"


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for the tables and the log")
    parser.add_argument("--rehearse", action="store_true", help="the same steps on the CPU, tiny sizes")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all the steps (default {BUDGET_S:g})")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="these steps only")
    args = parser.parse_args(argv)
    if not args.rehearse:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: run it on a machine with one, or pass --rehearse")
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    signal.signal(signal.SIGTERM, _exit_on_sigterm)      # stop the running step too (run_steps)
    environment = _environment(args.rehearse)
    print(environment, flush=True)
    with open(args.out / LOG, "wb") as log:
        log.write((environment + "\n").encode())
        results = run_steps(steps, args.out.resolve(), rehearse=args.rehearse, budget_s=args.budget, log=log,
                            report=lambda line: print(line, flush=True))
    for step in steps:                # the tables, so that the end of the output shows them too
        table = args.out / step.outputs[0]
        if table.suffix == ".txt" and table.is_file():
            print(f"\n--- {table.name}\n{table.read_text()}", end="")
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
