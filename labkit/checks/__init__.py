"""Exercise checkers: run the student's code (on N processes where it is distributed) and say
precisely what is wrong: which rank, which parameter, which element, expected versus got.

One module per exercise (``labkit.checks.ex01`` ...). A checker prints one ``✓`` line when the code
is right and raises :class:`CheckFailed` (an ``AssertionError``, shown in red in the notebook) with
the diagnosis when it is not. A student function that still raises the exercise's
``NotImplementedError`` stub is reported as that ``NotImplementedError``, so an unfinished exercise
reads as unfinished, not as wrong.

The helpers below are what the checkers share: number formatting that shows enough digits to see
the difference, the first mismatching element of two tensors, running a student function on N
processes with its exceptions and hangs turned into clear messages.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from typing import Any, NoReturn

import torch

from labkit.checks.notebook_errors import in_labkit
from labkit.launcher import WorkerError, launch

__all__ = ["CheckFailed", "fail", "passed", "describe", "fmt_number", "fmt_pair", "fmt_index", "fmt_list",
           "call_repr", "first_mismatch", "expected_got", "student_traceback", "run_on_ranks", "time_limit",
           "time_limit_paused"]


class CheckFailed(AssertionError):
    """The student's code is wrong; the message says how. Raised by every checker."""


def fail(message: str) -> NoReturn:
    __tracebackhide__ = True  # IPython and pytest: show the message, not this frame
    # `from None`: the student needs the diagnosis, not the checker's internal traceback chain.
    raise CheckFailed(message) from None


def passed(message: str) -> None:
    """Print a checker's success line (deterministic text: notebooks store and compare it)."""
    print(f"✓ {message}")


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def fmt_number(x: Any, digits: int = 6) -> str:
    """A number as a person writes it: 3 not 3.0, 0.25, 1.33333, inf, nan."""
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return repr(x)
    if isinstance(x, int):
        return str(x)
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.{digits}g}"


def describe(x: Any) -> str:
    """What a student's function gave, in a few words: None, a tensor of shape (2, 3), a list, [1, 2] (or a
    list of 12 items when long), a dict of 3 items, a float (0.5)."""
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        shown = repr(x)
        return f"a {type(x).__name__}, {shown}" if len(shown) <= 40 else f"a {type(x).__name__} of {len(x)} items"
    if isinstance(x, dict):
        return f"a dict of {len(x)} items"
    return f"a {type(x).__name__} ({x!r:.60})"


def fmt_pair(expected: Any, got: Any) -> tuple[str, str]:
    """Format two numbers with as many digits as it takes to see that they differ."""
    for digits in (6, 9, 12, 17):
        e, g = fmt_number(expected, digits), fmt_number(got, digits)
        if e != g:
            return e, g
    return e, g


def fmt_index(index: tuple[int, ...]) -> str:
    """``(1, 2)`` -> ``[1, 2]``; the empty index of a 0-d tensor -> ``[]`` (the scalar)."""
    return "[" + ", ".join(str(i) for i in index) + "]"


def fmt_list(values, limit: int = 12) -> str:
    """A list of numbers, shortened in the middle of long ones: [3, 1, 4, ..., 5] (20 items)."""
    values = list(values)
    if len(values) <= limit:
        return "[" + ", ".join(fmt_number(v) for v in values) + "]"
    head = ", ".join(fmt_number(v) for v in values[: limit - 2])
    return f"[{head}, ..., {fmt_number(values[-1])}] ({len(values)} items)"


def call_repr(name: str, *args, **kwargs) -> str:
    """``call_repr("f", 10, 2, seed=0)`` -> ``'f(10, 2, seed=0)'``."""
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def expected_got(where: str, expected: Any, got: Any) -> str:
    """``"<where>: expected <e>, got <g>"`` with enough digits to see the difference."""
    e, g = fmt_pair(expected, got)
    return f"{where}: expected {e}, got {g}"


def first_mismatch(expected: torch.Tensor, got: torch.Tensor, rtol: float = 1e-9,
                   atol: float = 1e-12) -> tuple[tuple[int, ...], float, float] | None:
    """The first element (in row-major order) where ``got`` differs from ``expected``:
    ``(index, expected value, got value)``, or None when they agree within the tolerances.
    The shapes must be equal. NaN never agrees."""
    expected = expected.detach().to(torch.float64)
    got = got.detach().to(torch.float64)
    bad = ~torch.isclose(got, expected, rtol=rtol, atol=atol)
    if not bad.any():
        return None
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), expected.shape)) if expected.dim() else ()
    return index, expected.reshape(-1)[flat].item(), got.reshape(-1)[flat].item()


# --------------------------------------------------------------------------------------------
# Tracebacks and running on N processes
# --------------------------------------------------------------------------------------------

_FRAME_RE = re.compile(r'^  File "(?P<file>[^"]+)", line \d+, in ')


def student_traceback(text: str) -> str:
    """A traceback's text without the frames inside labkit (launcher, checker): what is left
    starts at the student's own code."""
    lines = text.rstrip("\n").split("\n")
    out: list[str] = []
    skipping = False
    for line in lines:
        frame = _FRAME_RE.match(line)
        if frame:
            skipping = in_labkit(frame.group("file"))
            if not skipping:
                out.append(line)
        elif line.startswith("    ") and skipping:
            continue  # the source line (and ^^^ markers) of a skipped frame
        else:
            skipping = False
            out.append(line)
    return "\n".join(out)


def run_on_ranks(worker, *args, world_size: int, timeout: float, name: str, task: str | None = None,
                 **kwargs) -> list:
    """``labkit.launch(worker, *args, ...)`` for a checker that calls the student's function ``name``
    inside ``worker``. Returns each rank's result. A failure becomes a message for the student:

    - the stub's ``NotImplementedError`` is raised again as itself (the exercise is not done yet);
      with ``task`` (e.g. ``"3c"``), any other ``NotImplementedError`` (one the student raised, not the
      stub's "Exercise ..." one) is reworded to say that exercise ``task`` is not written yet;
    - a :class:`CheckFailed` raised inside the worker (by the checker's instrumentation, or by
      :func:`time_limit`) is raised again with its message and the student's frames of that rank;
    - any other exception in the student's code: :class:`CheckFailed` with that rank's traceback;
    - a hang or a skipped collective: :class:`CheckFailed` saying which ranks never arrived.
    """
    __tracebackhide__ = True
    try:
        return launch(worker, *args, world_size=world_size, timeout=timeout, **kwargs)
    except WorkerError as err:
        exc = err.exception
        if isinstance(exc, NotImplementedError):
            if task is None or str(exc).startswith("Exercise "):
                raise exc.with_traceback(None) from None
            raised = f"NotImplementedError({str(exc)!r})" if str(exc) else "NotImplementedError"
            raise NotImplementedError(f"Exercise {task}: {name} is not written yet (it raised {raised}); "
                                      f"see the instructions above") from None
        tb = student_traceback(err.remote_traceback) if err.remote_traceback else ""
        if isinstance(exc, CheckFailed):  # the checker's own code in the worker found the mistake
            where = _frames_outside(tb, _LIBRARY_DIRS)
            fail(f"{exc}\n\n--- where rank {err.rank} was ---\n{where}" if where else str(exc))
        if exc is not None and not err.stalled:
            fail(f"{name} raised {type(exc).__name__} on rank {err.rank} "
                 f"(world size {world_size}): {exc}\n\n"
                 f"--- traceback of rank {err.rank} ---\n{tb}")
        first_line = str(err).split("\n")[0]
        if "died without a Python error" in first_line:
            fail(f"{name} on {world_size} processes: {first_line}")
        end = "" if first_line.endswith((".", "?", ")")) else "."
        fail(f"{name} did not finish on {world_size} processes: {first_line}{end}\n"
             f"Every rank must call the same collectives in the same order: a collective that only some "
             f"ranks call (e.g. inside `if rank == 0:`) waits for the others until the timeout ({timeout:g} s).")


# torch and the standard library: frames a student did not write
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, os))


def _frames_outside(text: str, folders: tuple) -> str:
    """The frames of a traceback's text (no header, no exception line) whose files are not in ``folders``."""
    out: list[str] = []
    keep = False
    for line in text.split("\n"):
        frame = _FRAME_RE.match(line)
        if frame:
            keep = not os.path.abspath(frame.group("file")).startswith(folders)
        elif not line.startswith("    "):
            keep = False
        if keep:
            out.append(line)
    return "\n".join(out)


@contextmanager
def time_limit(seconds: float, message: str):
    """Inside a worker: raise :class:`CheckFailed` (``message``) if the block runs longer than ``seconds``.

    For the student's code between collectives: an endless loop that never reaches a collective would
    otherwise run until the whole launch is interrupted. Uses SIGALRM, so it works in the main thread
    of a process (a launched worker); elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise CheckFailed(message)

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def time_limit_paused():
    """Inside :func:`time_limit`: the time spent in this block does not count (a checker's own
    collective, where a rank waits for a slower peer: the peer is the one to name)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    remaining = signal.setitimer(signal.ITIMER_REAL, 0)[0]
    try:
        yield
    finally:
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, remaining)


# In a notebook, a failed check shows the student's cell and the message, not labkit's frames.
from labkit.checks import notebook_errors as _notebook_errors     # noqa: E402

_notebook_errors.install((CheckFailed, NotImplementedError))
