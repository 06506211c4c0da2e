"""Start N worker processes that talk over ``torch.distributed`` and collect what each returns.

    results = labkit.launch(train, data, world_size=4)   # results[r] is what rank r returned

Why not an existing launcher?  Measured in ``python -m labkit.bench.launchers``:
- ``torchrun`` and ``accelerate launch`` start a fresh Python per rank (seconds each on a laptop)
  and cannot run a function defined in a notebook;
- ``torch.multiprocessing.spawn`` cannot pickle a function defined in a notebook;
- ``accelerate.notebook_launcher`` forks (good) but returns no values, and when one rank raises it
  reports a peer's secondary "connection closed" error as the cause.
- forking the caller itself (``notebook_launcher``, ``start_processes(start_method="fork")``) is
  fast but breaks on any machine with an NVIDIA GPU once the kernel has queried CUDA or run one
  backward pass (the children cannot use CUDA, and cannot run autograd even on the CPU), and Python
  3.12+ warns that forking a multi-threaded process (a Jupyter kernel) may deadlock.
So the workers are forked from a *fork server*: a clean Python process started once per kernel with
torch already imported, which never touches CUDA or autograd. The function and its arguments travel
by value with ``cloudpickle``, so functions, lambdas and classes defined in a notebook keep working.
Each launch also sends the caller's environment variables, ``sys.path``, working directory, torch's
CPU random state, default dtype and distributed debug level (what lessons set before launching); other
global state of the caller (numpy's random state, a monkeypatch of a module) stays behind. On top of that, this module adds what a lesson needs: return
values, the *first* failing rank's own traceback, short timeouts, and clean-up that leaves the
Jupyter kernel usable. Everything distributed inside a worker is plain PyTorch
(a ``FileStore`` rendezvous, ``init_process_group``), so the same worker code runs unchanged under
``torchrun`` or ``accelerate launch`` (see :func:`init_from_env`).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import io
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.forkserver as mp_forkserver
import multiprocessing.spawn as mp_spawn
import multiprocessing.util as mp_util
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import types
from dataclasses import dataclass, field

import cloudpickle
import torch
import torch.distributed as dist

__all__ = ["launch", "WorkerError", "pick_device_and_backend", "init_from_env", "check_accelerator",
           "describe_world"]

# How long to keep listening after the first error, so that a rank that failed at the same
# moment (the real cause) is not hidden by the first report that happened to arrive.
_ERROR_GRACE_S = 0.25
_POLL_S = 0.1


class WorkerError(RuntimeError):
    """A worker rank failed. ``rank`` is the rank that failed first; ``remote_traceback`` its own
    traceback text; ``exception`` the original exception when it could be sent back; ``stalled``
    True when no rank's code failed by itself: ranks hung, skipped a collective or deadlocked, and the
    exception (if any) is only a communication error of a rank that was left waiting."""

    def __init__(self, message: str, rank: int | None = None, remote_traceback: str = "",
                 exception: BaseException | None = None, stalled: bool = False):
        super().__init__(message)
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.exception = exception
        self.stalled = stalled


# --------------------------------------------------------------------------------------------
# Device and backend
# --------------------------------------------------------------------------------------------

def gpu_count() -> int:
    """The number of visible CUDA GPUs, asked of NVML: it does not initialise CUDA in this process.

    (``torch.cuda.is_available()`` asks the CUDA runtime unless PYTORCH_NVML_BASED_CUDA_CHECK=1, and
    after that no process forked from this one can use CUDA.)
    """
    if not torch.cuda._is_compiled():  # a CPU build of torch
        return 0
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.device_count()


def pick_device_and_backend(world_size: int, device: str | None = None,
                            backend: str | None = None) -> tuple[str, str]:
    """Choose ``(device, backend)`` for ``world_size`` processes on this machine.

    ``device=None`` or ``'auto'``: one CUDA GPU per process with NCCL when there are enough GPUs,
    else CPU with gloo.
    An explicit choice that cannot work raises ``ValueError`` here, before any process starts
    (a wrong backend inside the workers would otherwise fail late or hang).
    """
    n_gpus = gpu_count()
    if device in (None, "auto"):
        device = "cuda" if (backend in (None, "nccl") and n_gpus >= world_size) else "cpu"
    device = str(device)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', not {device!r}")
    if device == "cuda" and n_gpus < world_size:
        raise ValueError(f"device='cuda'{' (backend nccl)' if backend == 'nccl' else ''} needs one GPU per "
                         f"process: asked for world_size={world_size} but this machine has {n_gpus} CUDA GPU(s). "
                         f"Use device='cpu' with backend='gloo' instead.")
    if backend is None:
        backend = "nccl" if device == "cuda" else "gloo"
    backend = str(backend).lower()
    available = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(),
                 "mpi": dist.is_mpi_available()}
    if backend not in available:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(available)}")
    if not available[backend]:
        raise ValueError(f"backend {backend!r} is not available in this PyTorch build "
                         f"(torch {torch.__version__}); use 'gloo' on CPU")
    if backend == "nccl" and device != "cuda":
        raise ValueError("backend 'nccl' works only on CUDA GPUs (one per process); "
                         "use backend='gloo' for CPU processes")
    return device, backend


def _loopback_interface() -> str | None:
    """Name of the loopback network interface ('lo' on Linux, 'lo0' on macOS)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    for candidate in ("lo", "lo0"):
        if candidate in names:
            return candidate
    return None


# --------------------------------------------------------------------------------------------
# Inside a worker
# --------------------------------------------------------------------------------------------

def _set_parent_death_signal() -> None:
    """Linux: have the kernel kill this worker if its parent dies (no orphans). The parent is the fork
    server, which exits when the caller does (once no worker holds its "caller alive" pipe open: see
    :func:`_forget_inherited_forkserver`)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass


def _release_multiprocessing_objects() -> None:
    try:
        mp_util._run_finalizers(0)
    except Exception:  # noqa: BLE001 - never keep a finished worker from reporting
        pass


def _is_communication_error(exc: BaseException) -> bool:
    """True for errors that a rank gets *because a peer failed* (closed connection, timeout)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "connection closed by peer", "connection reset by peer", "timed out waiting", "wait timeout",
        "broken pipe", "gloo/transport", "socket timeout"))


class _Forward(io.TextIOBase):
    """A worker's ``sys.stdout`` or ``sys.stderr``: each write goes to the caller as a message."""

    def __init__(self, conn, name: str, lock: threading.Lock):
        self.conn, self.name, self.lock = conn, name, lock

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            with self.lock:          # the worker's own threads may print too
                self.conn.send(("out", self.name, text))
        return len(text)


def _worker_main(rank: int, world_size: int, conn, device: str, backend: str, timeout_s: float,
                 threads: int | None) -> None:
    # The parent decides when workers stop (Kernel -> Interrupt reaches it); workers ignore SIGINT
    # so that an interrupt does not print N copies of the same KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal()
    # A forkserver child holds the write end of the server's "caller alive" pipe: drop it, or a hung
    # worker would keep the server, and so itself, alive after the caller died.
    _forget_inherited_forkserver()
    if threads is not None:
        torch.set_num_threads(threads)
    # The caller sends the job once every worker exists (see launch()).
    if not conn.poll(timeout_s):
        os._exit(3)
    job: _Job = conn.recv()
    os.environ.clear()
    os.environ.update(job.environ)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    sys.path[:] = job.sys_path
    torch.set_rng_state(torch.frombuffer(bytearray(job.torch_state["rng"]), dtype=torch.uint8))
    torch.set_default_dtype(job.torch_state["dtype"])
    dist.set_debug_level(job.torch_state["debug"])
    try:
        os.chdir(job.cwd)
    except OSError:
        pass
    # What the worker prints goes to the caller, which prints it: into the notebook's cell, whatever the
    # worker's file descriptors are connected to (the fork server's are the kernel's at its start)
    lock = threading.Lock()
    sys.stdout, sys.stderr = _Forward(conn, "stdout", lock), _Forward(conn, "stderr", lock)
    message: tuple
    try:
        fn, args, kwargs = pickle.loads(job.payload)
        if device == "cuda":
            torch.cuda.set_device(rank % max(1, torch.cuda.device_count()))
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.FileStore(job.store_path, world_size)
        store.set_timeout(timeout)
        # NCCL: name the device, so the communicator is made now (and its first point-to-point call
        # need not involve every rank)
        device_id = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device_id)
        # Wait until every rank's group is up: a rank whose fn returns at once must not exit (closing
        # its sockets) while a peer is still connecting to it.
        if store.add("labkit/joined", 1) == world_size:
            store.set("labkit/all_joined", "1")
        store.wait(["labkit/all_joined"])
        try:
            result = fn(*args, **kwargs)
        finally:
            dist.destroy_process_group()
        try:
            payload = _dumps(result)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            raise TypeError(f"rank {rank} returned a {type(result).__name__} that cannot be "
                            f"pickled to send back to the caller: {exc}") from exc
        message = ("ok", rank, payload)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
        try:
            exc_bytes = _dumps(exc)
        except Exception:  # noqa: BLE001
            exc_bytes = None
        message = ("error", rank, time.time(), type(exc).__name__, traceback.format_exc(),
                   _is_communication_error(exc), exc_bytes)
    # Release what multiprocessing made here (the semaphore of tqdm's lock, for one), before the
    # result goes (the caller then stops the workers): os._exit below skips the finalizers that do
    # it, and the caller's resource tracker would warn of "leaked semaphore objects" at its exit.
    # In a thread, waited for 5 s at most: a finalizer may join processes (a Pool's) that never end.
    finalizing = threading.Thread(target=_release_multiprocessing_objects, daemon=True)
    finalizing.start()
    finalizing.join(5)
    try:
        with lock:
            conn.send(message)
    finally:
        conn.close()
        # Skip interpreter teardown (atexit handlers, flushing what it inherited): the parent
        # already has the result.
        os._exit(0)


# --------------------------------------------------------------------------------------------
# In the caller
# --------------------------------------------------------------------------------------------

@dataclass
class _Job:
    """What every worker of one launch receives once all of them exist."""
    store_path: str        # the rendezvous file
    payload: bytes         # cloudpickle of (fn, args, kwargs)
    environ: dict          # the caller's environment variables, as they are now
    sys_path: list
    cwd: str
    torch_state: dict      # torch's CPU RNG state, default dtype and distributed debug level (other global
                           # state of the caller, numpy's RNG say, is not carried over)


@dataclass
class _Run:
    world_size: int
    results: dict = field(default_factory=dict)        # rank -> unpickled return value
    errors: dict = field(default_factory=dict)         # rank -> error tuple fields
    deaths: dict = field(default_factory=dict)         # rank -> exit code (no message sent)
    first_done_at: float | None = None

    def finished(self, rank: int) -> bool:
        return rank in self.results or rank in self.errors or rank in self.deaths


# Imported once by the fork server, so that no worker of any launch pays for them again. The first
# ``optimizer.step()`` in a process imports ``torch._dynamo`` (about 2 s; N ranks at once on a
# 2-core laptop: seconds).
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "labkit.launcher"]
START_METHODS = ("forkserver", "fork")


def _forget_inherited_forkserver() -> None:
    """In a process forked from one that runs a fork server: forget that server.

    multiprocessing keeps its fork server in a module global, and a forked child inherits it, then
    fails to use it (it is not the child's own child: "No child processes"). Forgetting it makes
    the child start a server of its own when it launches.
    """
    server = getattr(mp_forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass
    for name in ("_forkserver_alive_fd", "_forkserver_address", "_forkserver_pid", "_forkserver_authkey"):
        if hasattr(server, name):
            setattr(server, name, None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_forkserver)


def _context(start_method: str):
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, not {start_method!r}")
    if start_method not in mp.get_all_start_methods():
        raise RuntimeError(f"labkit.launch needs the {start_method!r} start method (Linux, macOS; on "
                           f"Windows use WSL). Scripts can use torchrun or accelerate launch instead.")
    ctx = mp.get_context(start_method)
    if start_method == "fork":   # forked workers inherit what the caller imported: import this once here
        importlib.import_module("torch._dynamo")
    if start_method == "forkserver":
        # The server starts (once per process) with this environment: NVML answers CUDA queries,
        # so even a stray one in an import leaves the server able to fork CUDA-capable workers.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        ctx.set_forkserver_preload(_PRELOAD)
        _start_fork_server()
    return ctx


def _start_fork_server() -> None:
    """Start the fork server (if it is not running) deaf to Ctrl-C.

    Kernel → Interrupt signals the kernel's whole process group. The server ignores SIGINT only once
    it has imported torch (seconds); hit before, it dies and the next launch fails with "unexpected
    EOF". A process started with SIGINT ignored keeps it ignored from its first instruction, so the
    caller ignores it for the few milliseconds it takes to start the server.
    """
    if threading.current_thread() is not threading.main_thread():   # only the main thread may
        mp_forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        mp_forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _without_main_module():
    """Start processes without re-running the caller's main script in each of them.

    A forkserver (or spawn) child first imports the parent's ``__main__`` (a script, a lab module,
    the Jupyter kernel's launcher) so that functions pickled by reference can be found. Here the
    function travels by value, so that import is wasted time, and in a script without an
    ``if __name__ == "__main__":`` guard it would start the launch again in every worker.
    """
    real = mp_spawn.get_preparation_data

    def without_main(name):
        data = real(name)
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
        return data

    mp_spawn.get_preparation_data = without_main
    try:
        yield
    finally:
        mp_spawn.get_preparation_data = real


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, plus: a module object that is importable by its name travels by name, whatever
    its type (torch's config modules, e.g. ``torch._dynamo.config``, subclass ``ModuleType``, and
    cloudpickle knows only the plain type)."""

    def reducer_override(self, obj):
        if (isinstance(obj, types.ModuleType) and type(obj) is not types.ModuleType
                and sys.modules.get(obj.__name__) is obj):
            return importlib.import_module, (obj.__name__,)
        return super().reducer_override(obj)


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _unsendable(fn, args, kwargs) -> list[str]:
    """Which of the function's globals and the arguments cannot be pickled (for the error message)."""
    names = getattr(getattr(fn, "__code__", None), "co_names", ())
    candidates = [(f"the global {n!r} that {getattr(fn, '__name__', 'fn')} uses", fn.__globals__[n])
                  for n in names if n in getattr(fn, "__globals__", {})]
    candidates += [(f"argument {i}", a) for i, a in enumerate(args)]
    candidates += [(f"argument {k}=", v) for k, v in kwargs.items()]
    bad = []
    for what, value in candidates:
        try:
            _dumps(value)
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{what} ({type(value).__name__}: {exc})")
    return bad


def _pickle_job(fn, args, kwargs) -> bytes:
    try:
        return _dumps((fn, args, kwargs))
    except Exception as exc:  # noqa: BLE001 - say which part could not be sent
        culprits = _unsendable(fn, args, kwargs)
        where = f" The culprit: {'; '.join(culprits)}." if culprits else ""
        raise TypeError(f"labkit.launch sends the function and its arguments to the workers by value "
                        f"(cloudpickle), and this failed: {exc}.{where} Pass what the workers need as "
                        f"arguments or build it inside the function; open files, locks, generators and "
                        f"live connections cannot be sent.") from exc


def launch(fn, *args, world_size: int = 2, device: str | None = None, backend: str | None = None,
           timeout: float = 30.0, threads: int | None = 1, start_method: str = "forkserver",
           **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` processes and return ``[result of rank 0, ...]``.

    Inside ``fn`` the default process group is ready: ``dist.get_rank()``, ``dist.all_reduce`` ...
    The environment variables RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE are set as
    ``torchrun`` would set them. ``fn``, ``args`` and ``kwargs`` are copied to the workers (by value,
    with cloudpickle): a worker that changes a global changes only its own copy.

    Args:
        world_size: number of processes.
        device, backend: by default CPU processes over gloo, on every machine, so that a lesson
            prints the same numbers on a laptop and on a GPU server. ``device='cuda'`` (or
            ``backend='nccl'``) gives each process its own GPU with NCCL; ``device='auto'`` does so
            when there is one GPU per process. A choice that cannot work raises ``ValueError``
            before any process starts.
        timeout: seconds a rank may wait in a collective (and the rest of the ranks may keep running
            after one rank has finished) before the run is stopped. PyTorch's default is 30 minutes.
        threads: ``torch.set_num_threads`` in each worker (1: N workers share a laptop's cores fairly);
            ``None`` leaves PyTorch's default.
        start_method: ``'forkserver'`` (works on every machine, whatever the caller did before);
            ``'fork'`` forks the caller itself (kept for the launcher benchmark: it fails on a GPU
            machine once the caller has touched CUDA or run a backward pass).

    Raises:
        WorkerError: naming the rank that failed first, with that rank's own traceback.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, not {world_size!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, not {timeout!r}")
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("launch() starts its own workers; call it from a process that is not itself "
                           "a distributed rank (here a process group is already initialised)")
    if device is None:
        device = "cuda" if backend == "nccl" else "cpu"
    device, backend = pick_device_and_backend(world_size, device, backend)
    ctx = _context(start_method)
    if start_method == "fork" and device == "cuda" and torch.cuda.is_initialized():
        raise RuntimeError("CUDA is already initialised in this process, and forked workers cannot use it: "
                           "use start_method='forkserver' (the default).")
    payload = _pickle_job(fn, args, kwargs)

    store_dir = tempfile.mkdtemp(prefix="labkit-")
    env_backup = {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    loopback = _loopback_interface()
    if loopback:  # gloo/NCCL bind to the loopback interface, never to a public address
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    # Rendezvous through a file (what PyTorch's own multi-process tests use): no store server,
    # no port to choose. gloo then listens on ports the OS picks on the loopback interface.
    # (A TCPStore in this process was tried first: its server thread, and the reverse-DNS
    # lookups c10d makes when it logs socket addresses, stalled ranks now and then.)
    job = _Job(os.path.join(store_dir, "rendezvous"), payload, dict(os.environ), list(sys.path), os.getcwd(),
               # the RNG state as bytes: a tensor would travel through shared memory and a helper thread
               dict(rng=torch.get_rng_state().numpy().tobytes(), dtype=torch.get_default_dtype(),
                    debug=dist.get_debug_level()))
    procs, conns = [], []
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        with _without_main_module():
            for rank in range(world_size):
                parent_end, child_end = ctx.Pipe()
                p = ctx.Process(target=_worker_main, name=f"labkit-rank{rank}", daemon=True,
                                args=(rank, world_size, child_end, device, backend, timeout, threads))
                conns.append(parent_end)          # closed below, also if the start fails
                try:
                    p.start()
                finally:
                    child_end.close()
                procs.append(p)
        for c in conns:
            try:
                c.send(job)
            except OSError:   # that worker died already: _wait reports how
                pass
        run = _wait(procs, conns, timeout)
    finally:
        _stop(procs)
        for c in conns:
            c.close()
        shutil.rmtree(store_dir, ignore_errors=True)
        for k, v in env_backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if signal.getsignal(signal.SIGINT) is not sigint_handler:
            signal.signal(signal.SIGINT, sigint_handler)
    return [run.results[r] for r in range(world_size)]


def _wait(procs, conns, timeout: float) -> _Run:
    run = _Run(len(procs))
    first_error_at = None
    while True:
        pending = [r for r in range(run.world_size) if not run.finished(r)]
        if not pending:
            break
        now = time.monotonic()
        if first_error_at is not None and now - first_error_at > _ERROR_GRACE_S:
            break
        if run.first_done_at is not None and now - run.first_done_at > timeout:
            break
        waitables = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        ready = mp.connection.wait(waitables, timeout=_POLL_S)
        for r in pending:
            if conns[r] in ready or procs[r].sentinel in ready:
                _collect(run, r, conns[r], procs[r])
                if run.finished(r):
                    run.first_done_at = run.first_done_at or time.monotonic()
                    if (r in run.errors or r in run.deaths) and first_error_at is None:
                        first_error_at = time.monotonic()
    if run.errors or run.deaths or len(run.results) < run.world_size:
        _stop(procs)
        raise _explain_failure(run, timeout)
    return run


def _collect(run: _Run, rank: int, conn, proc) -> None:
    """Read rank's message if there is one; else, if it has exited, record how it died."""
    try:
        while conn.poll():
            message = conn.recv()
            if message[0] == "out":      # something the worker printed
                (sys.stdout if message[1] == "stdout" else sys.stderr).write(message[2])
                continue
            if message[0] == "ok":
                run.results[rank] = pickle.loads(message[2])
            else:
                run.errors[rank] = message[2:]
            return
    except (EOFError, OSError):
        pass
    if not proc.is_alive():
        proc.join(0.1)
        run.deaths[rank] = proc.exitcode


def _explain_failure(run: _Run, timeout: float) -> WorkerError:
    """Turn what the ranks reported into one error that names the rank to look at first."""
    n = run.world_size
    still_running = [r for r in range(n) if not run.finished(r)]
    # 1. A rank raised an error of its own (not "a peer went away"): that is the cause.
    #    Among several, the earliest by the workers' own clocks (same machine).
    own = {r: e for r, e in run.errors.items() if not e[3]}
    if own:
        rank, (t, name, tb, _, exc_bytes) = min(own.items(), key=lambda item: item[1][0])
        return WorkerError(f"rank {rank} of {n} failed with {name}\n\n--- traceback of rank {rank} ---\n{tb}",
                           rank=rank, remote_traceback=tb, exception=_unpickle(exc_bytes))
    # 2. A rank died without a Python error (killed, crashed, os._exit): its peers' errors are echoes.
    if run.deaths:
        rank = min(run.deaths)
        code = run.deaths[rank]
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerError(f"rank {rank} of {n} died without a Python error ({how}): out of memory, a crash "
                           f"in native code, or os._exit?", rank=rank)
    # 3. Only communication errors (timeouts, closed connections): the cause is a rank that is
    #    *not* in the collective: still running (hung, or busy elsewhere) or already returned
    #    (it skipped a collective the others are waiting in).
    if run.errors:
        waiting = sorted(run.errors)
        rank0 = waiting[0]
        _, name, tb, _, exc_bytes = run.errors[rank0]
        context = f"\n\n--- traceback of rank {rank0}, waiting ---\n{tb}"
        if still_running:
            culprit = still_running[0]
            head = (f"rank(s) {still_running} of {n} never joined the collective that rank(s) {waiting} waited "
                    f"in ({name}; timeout {timeout:g} s): hung, or skipped a collective (every rank must call "
                    f"the same collectives in the same order)")
        elif run.results:
            returned = sorted(run.results)
            culprit = returned[0]
            head = (f"rank(s) {returned} of {n} returned while rank(s) {waiting} were still waiting in a "
                    f"collective ({name}): did rank(s) {returned} skip a collective?")
        else:  # every rank failed inside communication: all waiting for each other, or disagreeing
            culprit = rank0
            head = (f"every rank of {n} failed while communicating ({name}; timeout {timeout:g} s): they all "
                    f"waited for each other (e.g. every rank in recv, none in send: a deadlock), or called "
                    f"different collectives (every rank must call the same collectives, on matching tensors, "
                    f"in the same order)")
        return WorkerError(head + context, rank=culprit, remote_traceback=tb, exception=_unpickle(exc_bytes),
                           stalled=True)
    # 4. No errors at all: some ranks finished, the others did not within the timeout.
    done = sorted(run.results)
    return WorkerError(f"rank(s) {still_running} of {n} were still running {timeout:g} s after rank(s) {done} "
                       f"had returned: hung, or waiting in a collective the others never called. Stopped "
                       f"them. (Pass a larger timeout= if the work is just slow.)", rank=still_running[0],
                       stalled=True)


def _unpickle(data: bytes | None):
    if data is None:
        return None
    try:
        return pickle.loads(data)
    except Exception:  # noqa: BLE001 - the traceback text is still there
        return None


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)


# --------------------------------------------------------------------------------------------
# Under torchrun / accelerate launch
# --------------------------------------------------------------------------------------------

def _store_of_this_attempt(rank: int, world_size: int, timeout: float) -> dict:
    """Under torchrun, a store whose keys belong to this attempt of the job (``{}``: let env:// make one).

    torchrun keeps one store for the whole job, and env:// adds no prefix per restart: after a restart a rank could
    read the address a peer of the previous attempt published, and fail with "Connection refused" connecting to a
    dead process (pytorch/pytorch#167288; 2 runs in 3 of the lesson's elastic lab before this)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    return dict(store=dist.PrefixStore(f"labkit/attempt_{attempt}", store), rank=rank, world_size=world_size)


def init_from_env(expected_world_size: int | None = None, device: str | None = None,
                  backend: str | None = None, timeout: float = 60.0) -> tuple[int, int, torch.device]:
    """Join the process group described by torchrun's / accelerate's environment variables.

    Returns ``(rank, world_size, device)``. Outside any launcher (no WORLD_SIZE) it is a world of 1
    without a process group. Raises ``RuntimeError`` when the world is not the one asked for, e.g.
    ``accelerate launch --cpu --num_processes 4`` (one process, no world) or a launcher that started
    N independent world-size-1 runs.
    """
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    elif "WORLD_SIZE" in os.environ:
        world_size = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        dev_name, backend = pick_device_and_backend(local_world, device, backend)
        dev = torch.device("cuda", local_rank) if dev_name == "cuda" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                                device_id=dev if dev.type == "cuda" else None,
                                **_store_of_this_attempt(rank, world_size, timeout))
    else:
        rank, world_size, dev = 0, 1, torch.device("cpu")
        if "MASTER_ADDR" in os.environ and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            raise RuntimeError(
                "accelerate started this script as ONE process without a distributed world (this is what "
                "`accelerate launch --cpu --num_processes N` does). Use the shipped config instead:\n"
                "  accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes N ...")
    if expected_world_size is not None and world_size != expected_world_size:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise RuntimeError(
            f"asked for a world of {expected_world_size} processes but this process sees world size "
            f"{world_size} (rank {rank}). The launcher did not build the world you expected: with "
            f"accelerate on CPU use configs/accelerate/cpu.yaml; with torchrun pass --nproc-per-node "
            f"{expected_world_size}.")
    return rank, world_size, dev


def check_accelerator(accelerator, expected_world_size: int | None = None) -> None:
    """Fail loudly when an ``accelerate.Accelerator`` does not see the world that was launched.

    On a machine without GPUs, ``Accelerator()`` without ``cpu=True`` (or ACCELERATE_USE_CPU=1)
    makes every launched process a world of size 1: N independent runs, silently.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    expected = expected_world_size or launched
    if accelerator.num_processes != expected:
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} process(es) but {expected} were launched/asked for. "
            f"On CPU create the Accelerator with cpu=True (or export ACCELERATE_USE_CPU=1); otherwise every "
            f"process trains alone.")


def describe_world() -> str:
    """One line saying who this process is, for logs."""
    if not dist.is_initialized():
        return "single process (no process group)"
    return (f"rank {dist.get_rank()} of {dist.get_world_size()}, backend {dist.get_backend()}, "
            f"pid {os.getpid()}")
