"""How labkit.launch compares with the launchers it was written instead of, measured on this machine.

    python -m labkit.bench.launchers [--world-size 4] [--repeats 5]

Five ways of starting ``world_size`` CPU workers that talk over gloo:

    labkit.launch                                   forks the workers (this package)
    torch.multiprocessing.start_processes(fork)     forks; we init the process group in the worker
    accelerate.notebook_launcher                    forks, through torch's elastic agent
    torchrun --nproc-per-node N script.py           a fresh Python (and torch import) per rank
    torch.multiprocessing.spawn                     a fresh Python per rank; the function is pickled

For each one the script measures:

    start-up   wall time of a run whose workers do one all_reduce of one number and return;
    values     whether the caller gets back what each rank returned;
    notebook   whether it runs a function that no module holds (as a notebook cell defines it);
    raise      rank 2 raises ValueError while the others wait in an all_reduce: which rank and which
               error the caller's exception names, how long after the raise the caller hears of
               it, and whether worker processes are still alive after the call returned;
    hang       rank 1 sleeps while the others wait in an all_reduce: when does the caller hear of it?

Every measurement runs in a forked child of this script with a time cap: a launcher that hangs,
leaves processes behind, or changes global state (environment variables, signal handlers,
accelerate's singletons) cannot spoil the next measurement, and nothing can hang the script.
What the launchers and their workers print goes to log files (``--keep-logs`` keeps them).
"""

import os

# One OpenMP thread per process, set before torch is imported: 4 workers share 2 cores here, and
# torchrun would otherwise set this for its own workers only, which would skew the comparison.
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402  (imports after the environment variable on purpose)
import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as torch_mp  # noqa: E402

import labkit  # noqa: E402
from labkit import comm  # noqa: E402

__all__ = ["measure_labkit", "measure", "LAUNCHERS", "main"]

_FORK = multiprocessing.get_context("fork")


# ---------------------------------------------------------------------------------------------
# What the workers run. Module-level functions, so that spawn and torchrun workers can import
# them. Each launcher's own way of joining the process group wraps them (next section).
# ---------------------------------------------------------------------------------------------

def startup_work() -> dict:
    """One all_reduce of one number: the smallest run that shows the process group works."""
    t = comm.on(torch.ones(1))
    comm.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": t.item()}


def raise_work(bad_rank: int, stamp_path: str) -> int:
    """``bad_rank`` raises after one all_reduce; the others are then waiting in a second one."""
    t = comm.on(torch.ones(1))
    comm.all_reduce(t)
    if dist.get_rank() == bad_rank:
        # The bench times from this moment; a file outlives the process that wrote it.
        with open(stamp_path, "w") as f:
            f.write(repr(time.time()))
        raise ValueError(f"rank {bad_rank} raised on purpose")
    comm.all_reduce(t)
    return dist.get_rank()


def hang_work(sleepy_rank: int, marker_dir: str) -> int:
    """``sleepy_rank`` sleeps 60 s while the others wait for it in an all_reduce."""
    if dist.get_rank() == sleepy_rank:
        time.sleep(60)
    else:
        # Tell the bench when this rank starts waiting, and with which timeout: what the process
        # group really uses, read here rather than taken from the documentation.
        with open(os.path.join(marker_dir, f"rank{dist.get_rank()}"), "w") as f:
            json.dump({"entered_at": time.time(), "timeout": _collective_timeout()}, f)
    t = comm.on(torch.ones(1))
    comm.all_reduce(t)
    return dist.get_rank()


def _collective_timeout() -> str:
    try:  # a private API: fine for a report, but it may move between PyTorch versions
        group = dist.distributed_c10d._get_default_group()
        return str(group._get_backend(torch.device("cpu")).options._timeout)
    except Exception:  # noqa: BLE001
        return "?"


# A function as a notebook cell defines it: its module is __main__, but no importable module
# holds it. Fork copies it into the workers with the rest of memory; pickle (spawn) sends a
# function as "module + name", which cannot work. Here pickling already fails in the caller; in
# Jupyter, whose __main__ does hold the function, the spawned worker fails to find it instead.
_NOTEBOOK_CELL = """
import torch
from labkit import comm

def train():
    t = comm.on(torch.ones(1))
    comm.all_reduce(t)
    return t.item()
"""


def notebook_function() -> Callable:
    namespace = {"__name__": "__main__"}
    exec(_NOTEBOOK_CELL, namespace)
    return namespace["train"]


# ---------------------------------------------------------------------------------------------
# The launchers. run(work, args, world_size) starts the workers, each calls work(*args), and it
# returns what the launcher returns (raising what it raises). blame(exception) says which rank
# and which error line the launcher's exception points the user to.
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_labkit(work, args, world_size, timeout=30.0):
    return labkit.launch(work, *args, world_size=world_size, timeout=timeout, threads=1)


def run_labkit_fork(work, args, world_size, timeout=30.0):
    """labkit.launch as it was before its fork server: forking the caller (fails on GPU machines once
    the caller has touched CUDA or run a backward pass)."""
    return labkit.launch(work, *args, world_size=world_size, timeout=timeout, threads=1, start_method="fork")


def _init_and_call(rank, world_size, port, work, args):
    """Worker of start_processes and spawn: they pass the rank, and joining the group is up to us."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        return work(*args)
    finally:
        dist.destroy_process_group()


def run_start_processes(work, args, world_size):
    return torch_mp.start_processes(_init_and_call, args=(world_size, _free_port(), work, args),
                                    nprocs=world_size, start_method="fork")


def run_spawn(work, args, world_size):
    # spawn pickles _init_and_call and its args; each worker imports this module to unpickle them.
    return torch_mp.spawn(_init_and_call, args=(world_size, _free_port(), work, args), nprocs=world_size)


def _accelerate_init_and_call(work, args):
    """Worker of notebook_launcher: its elastic agent sets RANK, WORLD_SIZE, MASTER_ADDR/PORT and
    PartialState(cpu=True) joins a gloo group from them (Accelerator(cpu=True) does the same)."""
    from accelerate import PartialState
    torch.set_num_threads(1)
    PartialState(cpu=True)
    try:
        return work(*args)
    finally:
        dist.destroy_process_group()


def run_notebook_launcher(work, args, world_size):
    from accelerate import notebook_launcher
    return notebook_launcher(_accelerate_init_and_call, args=(work, args), num_processes=world_size,
                             use_port=str(_free_port()))


# torchrun runs a script, so the workers find `work` by name in this module. @record makes a
# rank's exception reach torchrun's error summary (without it torchrun shows no traceback).
_TORCHRUN_SCRIPT = """\
from torch.distributed.elastic.multiprocessing.errors import record
from labkit.bench.launchers import torchrun_worker
record(torchrun_worker)()
"""


def torchrun_worker():
    """Worker of torchrun: ``script.py WORK_NAME JSON_ARGS``; the group comes from torchrun's env."""
    torch.set_num_threads(1)
    work, args = globals()[sys.argv[1]], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    try:
        work(*args)
    finally:
        dist.destroy_process_group()


class TorchrunFailed(Exception):
    """torchrun exited with a non-zero status: all its caller gets is that status and the text."""

    def __init__(self, returncode: int, stderr: str):
        super().__init__(f"torchrun exited with status {returncode}")
        self.returncode, self.stderr = returncode, stderr


def run_torchrun(work, args, world_size):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(_TORCHRUN_SCRIPT)
        command += [f"--nproc-per-node={world_size}", "--master-addr=127.0.0.1",
                    f"--master-port={_free_port()}", script, work.__name__, json.dumps(list(args))]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
    sys.stderr.write(proc.stdout + proc.stderr)  # into this measurement's log file
    if proc.returncode != 0:
        raise TorchrunFailed(proc.returncode, proc.stderr)
    return f"exit status {proc.returncode}"


def _lines(text: str) -> list:
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def _first_line(exc: BaseException) -> str:
    lines = _lines(str(exc))
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def blame_labkit(exc):
    if isinstance(exc, labkit.WorkerError):
        return exc.rank, (_lines(exc.remote_traceback) or [_first_line(exc)])[-1]
    return None, _first_line(exc)


def blame_torch_mp(exc):
    # ProcessContext.join names the first failed process it finds when it wakes up (join=True
    # blocks until some worker exits); ProcessRaisedException carries that process's traceback.
    if isinstance(exc, torch_mp.ProcessRaisedException):
        return exc.error_index, _lines(exc.msg)[-1]
    if isinstance(exc, torch_mp.ProcessExitedException):
        return exc.error_index, _first_line(exc)
    return None, _first_line(exc)


def blame_elastic(exc):
    # notebook_launcher runs torch's elastic agent. For a function (not a script) the agent looks at
    # its workers every 0.1 s (monitor_interval) through ProcessContext.join(-1) and reports the
    # first failed process that finds, checking in rank order; its ChildFailedError holds that one.
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    if isinstance(exc, ChildFailedError):
        rank, failure = exc.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        return rank, (_lines(message) or [f"exit code {failure.exitcode}"])[-1]
    return None, _first_line(exc)


def blame_torchrun(exc):
    # torchrun prints an error summary. Its "Root Cause" is the failure with the smallest timestamp,
    # in whole seconds from each rank's error file: among ranks that failed in the same second, the
    # one the agent happened to record first wins. The section shows that rank, then its traceback.
    if isinstance(exc, TorchrunFailed) and "Root Cause" in exc.stderr:
        section = exc.stderr.split("Root Cause", 1)[1].split("=" * 20, 1)[0]
        rank = re.search(r"rank\s*:\s*(\d+)", section)
        return (int(rank.group(1)) if rank else None), _lines(section)[-1]
    return None, _first_line(exc)


@dataclass(frozen=True)
class Launcher:
    name: str
    run: Callable
    blame: Callable
    notebook: str | None = None  # when set: why the notebook-function check does not apply


LAUNCHERS = [
    Launcher("labkit.launch", run_labkit, blame_labkit),
    Launcher("labkit.launch(fork)", run_labkit_fork, blame_labkit),
    Launcher("start_processes(fork)", run_start_processes, blame_torch_mp),
    Launcher("notebook_launcher", run_notebook_launcher, blame_elastic),
    Launcher("torchrun", run_torchrun, blame_torchrun, notebook="no: it runs a script file"),
    Launcher("spawn", run_spawn, blame_torch_mp),
]


# ---------------------------------------------------------------------------------------------
# Measurements. Each runs inside an isolated child (next section) and returns plain data.
# ---------------------------------------------------------------------------------------------

def _describe(value) -> str:
    return value if isinstance(value, str) else repr(value)


def time_startup(launcher: Launcher, world_size: int, repeats: int) -> dict:
    expected = [{"rank": r, "sum": float(world_size)} for r in range(world_size)]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = launcher.run(startup_work, (), world_size)
        seconds.append(time.perf_counter() - start)
    values = "yes" if result == expected else f"no: the call returns {_describe(result)}"
    return {"seconds": seconds, "values": values}


def try_notebook_function(launcher: Launcher, world_size: int) -> str:
    try:
        launcher.run(notebook_function(), (), world_size)
    except Exception as exc:  # noqa: BLE001 - the error is the measurement
        return "no: " + re.sub(r" at 0x[0-9a-f]+", "", _first_line(exc))
    return "yes"


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie has exited; it only waits for its parent to reap it)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(processes: list, timeout: float) -> list:
    """Wait up to ``timeout`` s for the processes to stop running; returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        running = [p for p in processes if _running(p)]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.02)


def leftover_processes(grace_s: float = 2.0) -> str:
    """Worker processes still running after the launcher has returned control to the caller.

    Those that exit within ``grace_s`` are reported as such; the rest are killed (so that the
    next measurement starts clean) and reported as left running.
    """
    def ours(p):
        # multiprocessing's resource tracker (started by the spawn start method) and fork server
        # (labkit.launch starts workers from it) belong to this process, not to the workers, and
        # exit with it; the workers are the fork server's children, and are counted.
        try:
            return not any("resource_tracker" in part or "forkserver import main" in part for part in p.cmdline())
        except psutil.Error:
            return False

    running = [p for p in psutil.Process().children(recursive=True) if _running(p) and ours(p)]
    if not running:
        return "none"
    still = _wait_gone(running, grace_s)
    if not still:
        return f"{len(running)} exiting, gone within {grace_s:g} s"
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return f"{len(still)} still running after {grace_s:g} s (bench killed them)"


def raise_once(launcher: Launcher, world_size: int, bad_rank: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="labkit-bench-") as tmp:
        stamp = os.path.join(tmp, "raised_at")
        try:
            launcher.run(raise_work, (bad_rank, stamp), world_size)
        except Exception as exc:  # noqa: BLE001 - what the caller gets is the measurement
            caught_at = time.time()
            error = exc
        else:
            return {"caller_gets": "no error at all", "rank": None, "line": "", "delay": None,
                    "leftovers": leftover_processes()}
        leftovers = leftover_processes()
        raised_at = float(open(stamp).read()) if os.path.exists(stamp) else None
    rank, line = launcher.blame(error)
    # torchrun's caller (a shell, a script) gets an exit status and text on stderr, not an exception.
    caller_gets = f"exit status {error.returncode}" if isinstance(error, TorchrunFailed) else type(error).__name__
    return {"caller_gets": caller_gets, "rank": rank, "line": line,
            "delay": None if raised_at is None else caught_at - raised_at, "leftovers": leftovers}


def raise_repeatedly(launcher: Launcher, world_size: int, bad_rank: int, runs: int) -> list:
    """raise_once ``runs`` times in one process, as a notebook kernel would: what a launcher does
    once per process (an import, say) shows in the first run only."""
    results = []
    for _ in range(runs):
        try:
            results.append(raise_once(launcher, world_size, bad_rank))
        except Exception as exc:  # noqa: BLE001
            results.append({"failed": _first_line(exc)})
    return results


def hang_once(run: Callable, blame: Callable, world_size: int, sleepy_rank: int, marker_dir: str) -> dict:
    start = time.time()
    try:
        run(hang_work, (sleepy_rank, marker_dir), world_size)
    except Exception as exc:  # noqa: BLE001 - what the caller gets is the measurement
        caught_at = time.time()
        rank, line = blame(exc)
        entered = [m["entered_at"] for m in _markers(marker_dir)]
        return {"caller_gets": type(exc).__name__, "after": caught_at - start, "rank": rank, "line": line,
                "after_entered": caught_at - max(entered) if entered else None,
                "leftovers": leftover_processes()}
    return {"caller_gets": "a normal return", "after": time.time() - start, "rank": None, "line": "",
            "after_entered": None, "leftovers": leftover_processes()}


def _markers(marker_dir: str) -> list:
    found = []
    for name in os.listdir(marker_dir):
        try:
            with open(os.path.join(marker_dir, name)) as f:
                found.append(json.load(f))
        except (OSError, ValueError):  # being written right now
            pass
    return found


# ---------------------------------------------------------------------------------------------
# Isolation: each measurement runs in a forked child of this script, with a time cap.
# ---------------------------------------------------------------------------------------------

class MeasurementFailed(Exception):
    """The measurement itself failed (the launcher raised where it should not have, or was capped)."""


def _kill_tree(pid: int) -> None:
    """Kill a process and everything it started."""
    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]  # collected first: killing reparents them
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_gone(family, 5)


def _child_main(sender, log_path: str, fn: Callable, args: tuple) -> None:
    # The launchers and their workers (which inherit these file descriptors) print banners and
    # tracebacks: send all of it to a log file so that the table stays readable.
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        message = ("ok", fn(*args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        message = ("error", _first_line(exc))
    sys.stdout.flush()
    sys.stderr.flush()
    # The measurements report leftovers themselves; whatever is still here now must not outlive us.
    for p in psutil.Process().children(recursive=True):
        _kill_tree(p.pid)
    sender.send(message)


class Isolated:
    """``fn(*args)`` running in a forked child. Fork, not spawn: ``fn`` may be any function."""

    def __init__(self, fn: Callable, *args, log_path: str):
        self._receiver, sender = _FORK.Pipe(duplex=False)
        self.process = _FORK.Process(target=_child_main, args=(sender, log_path, fn, args))
        self.process.start()
        sender.close()

    def done(self) -> bool:
        return self._receiver.poll(0)

    def result(self, cap_s: float):
        """fn's return value. Raises MeasurementFailed when fn raised or ran longer than cap_s
        (then the child and everything it started are killed)."""
        if not self._receiver.poll(cap_s):
            self.kill()
            raise MeasurementFailed(f"no result within {cap_s:g} s (killed)")
        try:
            status, value = self._receiver.recv()
        except EOFError:
            status, value = "error", "the measuring process died"
        self.process.join(5)
        if status != "ok":
            raise MeasurementFailed(value)
        return value

    def kill(self) -> None:
        _kill_tree(self.process.pid)
        self.process.join(5)


def isolated(fn: Callable, *args, cap_s: float, log_path: str):
    return Isolated(fn, *args, log_path=log_path).result(cap_s)


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------

def _log_path(log_dir: str, launcher: Launcher, what: str) -> str:
    return os.path.join(log_dir, f"{re.sub(r'[^a-z0-9]+', '_', launcher.name.lower())}-{what}.log")


def _guarded(results: dict, key: str, fn: Callable, *args, **kwargs) -> None:
    """results[key] = fn(...), or the error's first line: one failure must not stop the table."""
    try:
        results[key] = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        results[key] = {"failed": str(exc) if isinstance(exc, MeasurementFailed) else _first_line(exc)}


def measure(launcher: Launcher, world_size: int = 4, repeats: int = 5, bad_rank: int = 2,
            failure_repeats: int = 1, log_dir: str | None = None, progress=None) -> dict:
    """Start-up, return values, notebook functions and a raising rank, for one launcher.

    Returns ``{"startup": {"seconds": [...], "values": ...}, "notebook": ..., "raise": [...]}``;
    a measurement that failed is ``{"failed": first line of the error}`` instead.
    """
    own_log_dir = log_dir is None
    log_dir = log_dir or tempfile.mkdtemp(prefix="labkit-bench-")
    say = progress or (lambda text: None)
    results: dict = {}
    try:
        say(f"{launcher.name}: start-up x{repeats}")
        _guarded(results, "startup", isolated, time_startup, launcher, world_size, repeats,
                 cap_s=30 + 20 * repeats, log_path=_log_path(log_dir, launcher, "startup"))
        if launcher.notebook is not None:
            results["notebook"] = launcher.notebook
        else:
            say(f"{launcher.name}: notebook function")
            _guarded(results, "notebook", isolated, try_notebook_function, launcher, world_size,
                     cap_s=60, log_path=_log_path(log_dir, launcher, "notebook"))
        say(f"{launcher.name}: rank {bad_rank} raises, x{failure_repeats}")
        _guarded(results, "raise", isolated, raise_repeatedly, launcher, world_size, bad_rank,
                 failure_repeats, cap_s=60 * failure_repeats, log_path=_log_path(log_dir, launcher, "raise"))
    finally:
        if own_log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
    return results


def measure_labkit(world_size: int = 4, repeats: int = 5, bad_rank: int = 2, failure_repeats: int = 1,
                   hang_timeout: float | None = 3.0, log_dir: str | None = None, progress=None) -> dict:
    """:func:`measure` for labkit.launch, plus a hanging rank 1 with ``launch(timeout=hang_timeout)``
    (``None``: skip it). The part of the benchmark that needs neither accelerate nor torchrun."""
    launcher = LAUNCHERS[0]
    results = measure(launcher, world_size, repeats, bad_rank, failure_repeats, log_dir, progress)
    if hang_timeout is not None:
        if progress:
            progress(f"{launcher.name}: rank 1 hangs, timeout={hang_timeout:g}")
        with tempfile.TemporaryDirectory(prefix="labkit-bench-") as marker_dir:
            run = functools.partial(run_labkit, timeout=hang_timeout)
            log_path = _log_path(log_dir, launcher, "hang") if log_dir else os.devnull
            _guarded(results, "hang", isolated, hang_once, run, blame_labkit, world_size, 1, marker_dir,
                     cap_s=hang_timeout + 60, log_path=log_path)
            timeouts = sorted({m["timeout"] for m in _markers(marker_dir)})
            results["hang"]["timeout"] = " / ".join(timeouts) or "?"
    return results


def measure_hangs(launchers: list, world_size: int, cap_s: float, log_dir: str, progress=None) -> dict:
    """Rank 1 sleeps 60 s, with each launcher's default collective timeout, all at once.

    The launchers run in parallel (they mostly wait, so this saves time); each is stopped ``cap_s``
    after its other ranks entered the all_reduce, or after 90 s if they never got there.
    """
    if progress:
        progress(f"{', '.join(l.name for l in launchers)}: rank 1 hangs (up to {cap_s:g} s each, in parallel)")
    pending = {}
    for launcher in launchers:
        marker_dir = tempfile.mkdtemp(prefix="labkit-bench-", dir=log_dir)
        child = Isolated(hang_once, launcher.run, launcher.blame, world_size, 1, marker_dir,
                         log_path=_log_path(log_dir, launcher, "hang"))
        pending[launcher.name] = (child, marker_dir, time.time())
    results = {}
    while pending:
        for name, (child, marker_dir, started) in list(pending.items()):
            markers = _markers(marker_dir)
            everyone_waiting = len(markers) == world_size - 1
            waited = time.time() - max(m["entered_at"] for m in markers) if everyone_waiting else 0.0
            if child.done():
                try:
                    results[name] = child.result(5)
                except MeasurementFailed as exc:
                    results[name] = {"failed": str(exc)}
            elif waited > cap_s:
                child.kill()
                results[name] = {"caller_gets": f"nothing yet: still waiting {cap_s:g} s after the other "
                                                f"ranks entered all_reduce (bench stopped it)"}
            elif time.time() - started > 90:
                child.kill()
                results[name] = {"failed": f"only {len(markers)} of {world_size - 1} ranks reached the "
                                           f"all_reduce within 90 s (killed)"}
            else:
                continue
            timeouts = sorted({m["timeout"] for m in markers})
            results[name]["timeout"] = " / ".join(timeouts) if timeouts else "?"
            del pending[name]
        time.sleep(0.1)
    return results


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def format_table(header: list, rows: list) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _failure(entry) -> str | None:
    """The text for a measurement that failed (see _guarded), else None."""
    if entry is None:
        return "not measured"
    if isinstance(entry, dict) and "failed" in entry:
        return f"measurement failed: {entry['failed']}"
    return None


def _shorten(line: str, width: int = 80) -> str:
    # gloo's errors carry a build path and port numbers that change from run to run.
    line = re.sub(r"\[[^\]]*third_party/gloo/", "[gloo/", line)
    line = re.sub(r"(127\.0\.0\.1\]?):\d+", r"\1:PORT", line)
    return line if len(line) <= width else line[: width - 3] + "..."


def startup_row(name: str, results: dict) -> list:
    startup, notebook = results.get("startup"), results.get("notebook")
    if _failure(startup):
        timing = values = _failure(startup)
    else:
        s = startup["seconds"]
        timing, values = f"{statistics.median(s):.2f} [{min(s):.2f}, {max(s):.2f}]", startup["values"]
    return [name, timing, values, _failure(notebook) or notebook]


def raise_row(name: str, results: dict) -> list:
    runs = results.get("raise")
    if _failure(runs):
        return [name, _failure(runs), "", "", "", ""]
    ok = [r for r in runs if "failed" not in r]
    n = len(runs)
    failed = [f"{len(runs) - len(ok)}/{n} failed: {r['failed']}" for r in runs if "failed" in r][:1]

    def counted(values):  # "a (2/3); b (1/3)", most frequent first
        return "; ".join(f"{v} ({c}/{n})" for v, c in collections.Counter(values).most_common())
    named = counted(f"rank {r['rank']}" for r in ok)
    delays = ", ".join("?" if r["delay"] is None else f"{r['delay']:.2f}" for r in ok)
    leftovers = counted(r["leftovers"] for r in ok)
    lines = " | ".join(dict.fromkeys(_shorten(r["line"]) for r in ok))
    return [name, counted(r["caller_gets"] for r in ok), "; ".join([named, *failed]), delays, leftovers, lines]


def hang_row(name: str, results: dict) -> list:
    entry = results.get("hang")
    if _failure(entry):
        return [name, _failure(entry), (entry or {}).get("timeout", "?")]
    text = entry["caller_gets"]
    if "after" in entry:
        text = f"{entry['caller_gets']} {entry['after']:.1f} s after the call"
        if entry["after_entered"] is not None:
            text += f" ({entry['after_entered']:.1f} s after the others entered all_reduce)"
        text += f", naming rank {entry['rank']}"
        if entry["leftovers"] != "none":
            text += f"; left running: {entry['leftovers']}"
    return [name, text, entry.get("timeout", "?")]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def report(results: dict, world_size: int, repeats: int, bad_rank: int, failure_repeats: int,
           load_average: str = "?") -> str:
    """The tables, from {launcher name: what measure() (and the hang measurement) returned}."""
    names = list(results)
    return "\n".join([
        f"world size {world_size}, CPU/gloo, torch {torch.__version__}, accelerate {_version('accelerate')}, "
        f"{os.cpu_count()} CPU cores (load average {load_average}), OMP_NUM_THREADS=1, 1 torch thread per worker",
        "",
        f"Start-up: each rank does one all_reduce of one number and returns (s: median [min, max] of {repeats}; "
        f"labkit.launch's max is its first call, which starts the fork server)",
        format_table(["launcher", "start-up s", "caller gets each rank's return value",
                      "runs a function defined in a notebook"],
                     [startup_row(n, results[n]) for n in names]),
        "",
        f"Rank {bad_rank} raises ValueError after one all_reduce; the others wait in a second one "
        f"({failure_repeats} runs in one process; first run first)",
        format_table(["launcher", "caller gets", "it names", "raise -> caller s", "processes left after the call",
                      "error line it shows"],
                     [raise_row(n, results[n]) for n in names]),
        "",
        "Rank 1 sleeps 60 s while the others wait in an all_reduce",
        format_table(["launcher", "caller gets", "collective timeout (read in a worker)"],
                     [hang_row(n, results[n]) for n in names]),
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="start-up runs per launcher")
    parser.add_argument("--failure-repeats", type=int, default=2,
                        help="raising-rank runs per launcher (the rank a launcher blames can vary)")
    parser.add_argument("--hang-cap", type=float, default=10.0,
                        help="seconds to watch the other launchers wait for a hanging rank")
    parser.add_argument("--keep-logs", action="store_true", help="keep what launchers and workers printed")
    args = parser.parse_args(argv)
    if args.world_size < 2:
        parser.error("--world-size must be at least 2 (a rank raises, another waits)")
    bad_rank = min(2, args.world_size - 1)

    log_dir = tempfile.mkdtemp(prefix="labkit-bench-logs-")
    started = time.time()
    # Other programs on the machine slow process start-up most: record how busy it was beforehand.
    load_before = f"{os.getloadavg()[0]:.1f} before the run" if hasattr(os, "getloadavg") else "?"

    def progress(text):
        print(f"[{time.time() - started:5.1f} s] {text}", file=sys.stderr, flush=True)

    results = {}
    try:
        results[LAUNCHERS[0].name] = measure_labkit(args.world_size, args.repeats, bad_rank,
                                                    args.failure_repeats, 3.0, log_dir, progress)
        for launcher in LAUNCHERS[1:]:
            results[launcher.name] = measure(launcher, args.world_size, args.repeats, bad_rank,
                                             args.failure_repeats, log_dir, progress)
        try:
            hangs = measure_hangs(LAUNCHERS[1:], args.world_size, args.hang_cap, log_dir, progress)
        except Exception as exc:  # noqa: BLE001
            hangs = {launcher.name: {"failed": _first_line(exc)} for launcher in LAUNCHERS[1:]}
        for name, entry in hangs.items():
            results[name]["hang"] = entry
        progress("done")
        print(report(results, args.world_size, args.repeats, bad_rank, args.failure_repeats, load_before))
    finally:
        if args.keep_logs:
            print(f"\nlogs: {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
