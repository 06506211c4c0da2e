"""Which rank is stuck, and where: per-rank stack dumps of a hung job, read back and explained (lesson 10).

A collective returns only when every rank of the group has entered it. When one rank does not come (stuck in a
loop, waiting for a file, or past the collective because it skipped it), the others wait, and all a log shows is N
processes that stopped printing; after the group's timeout, every waiting rank reports an error that names itself.
The rank to look at is the one that is *not* in the collective.

    with hangs.watch(directory, seconds=5):     # every rank: if it makes no progress for 5 s, dump its stacks
        for step in ...:
            hangs.beat()                          # progress: re-arm the timer
            ...
    print(hangs.explain(hangs.diagnose(directory)))

``watch`` uses the standard library's ``faulthandler``: a C thread that prints every Python thread's stack when a
timer expires, even while the main thread holds the GIL in a pure-Python loop. ``diagnose`` reads each rank's
dump: a main thread whose innermost frames are in ``torch.distributed`` waits in a collective (which one, called
from where); any other is busy at its innermost frame; a rank without a dump was not stuck.
"""

from __future__ import annotations

import contextlib
import faulthandler
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

__all__ = ["watch", "beat", "RankState", "diagnose", "explain", "scenario", "SCENARIOS", "late_at_barrier"]

_armed: dict = {}


@contextlib.contextmanager
def watch(directory: str | Path, seconds: float = 5.0):
    """Dump this rank's stacks to ``directory/rank<r>.stacks`` if ``beat()`` is not called for ``seconds``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(directory) / f"rank{rank}.stacks"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"main thread 0x{threading.main_thread().ident:016x}\n")   # how faulthandler names it
        f.flush()
        _armed.update(file=f, seconds=seconds)
        beat()
        try:
            yield path
        finally:
            faulthandler.cancel_dump_traceback_later()
            _armed.clear()


def beat() -> None:
    """Progress: re-arm the timer of :func:`watch` (nothing outside it)."""
    if _armed:
        faulthandler.dump_traceback_later(_armed["seconds"], repeat=False, file=_armed["file"], exit=False)


@dataclass
class RankState:
    """What one rank's dump says. ``waiting_in``: the torch.distributed function it waits in (None: busy or not
    stuck); ``where``: the innermost frame of the job's own code ("file:line in function")."""
    rank: int
    stuck: bool
    waiting_in: str | None = None
    where: str | None = None


_FRAME = re.compile(r'\s*File "(?P<file>.+)", line (?P<line>\d+) in (?P<func>\S+)')


def _frames_of_main_thread(text: str) -> list[tuple[str, int, str]]:
    """(file, line, function) of the main thread's dump, innermost first."""
    header = re.match(r"main thread (0x[0-9a-f]+)", text)
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text)
    main = [b for b in blocks[1:] if header and header.group(1) in b.splitlines()[0]]
    frames = []
    for line in (main[-1] if main else "").splitlines()[1:]:
        m = _FRAME.match(line)
        if m:
            frames.append((m["file"], int(m["line"]), m["func"]))
    return frames


def _library(file: str) -> bool:
    return "/torch/" in file or file.endswith("labkit/comm.py") or "/threading.py" in file


def _collective(file: str) -> bool:
    return "/torch/distributed/" in file or file.endswith("labkit/comm.py")


def diagnose(directory: str | Path, world_size: int | None = None) -> list[RankState]:
    """Each rank's state from the dumps :func:`watch` wrote (``world_size``: also list ranks without a file)."""
    files = {int(p.stem[4:]): p for p in Path(directory).glob("rank*.stacks")}
    states = []
    for rank in range(world_size if world_size is not None else max(files, default=-1) + 1):
        frames = _frames_of_main_thread(files[rank].read_text()) if rank in files else []
        if not frames:
            states.append(RankState(rank, stuck=False))
            continue
        own = next((i for i, f in enumerate(frames) if not _library(f[0])), len(frames) - 1)
        inside = [f for f in frames[:own] if f[2] != "wrapper"]      # torch's c10d_logger wraps every collective
        waiting = inside[-1][2] if inside and any(_collective(f[0]) for f in frames[:own]) else None
        file, line, func = frames[own]
        states.append(RankState(rank, stuck=True, waiting_in=waiting, where=f"{Path(file).name}:{line} in {func}"))
    return states


def explain(states: list[RankState]) -> str:
    """One paragraph: which rank to look at first, and why."""
    waiting = [s for s in states if s.waiting_in]
    busy = [s for s in states if s.stuck and not s.waiting_in]
    gone = [s for s in states if not s.stuck]
    lines = []
    if busy:
        lines += [f"rank {s.rank} is busy at {s.where}: not in any collective" for s in busy]
    if gone:
        lines.append(f"rank(s) {[s.rank for s in gone]} never stopped making progress: they returned, or went past "
                     f"a collective the others wait in (skipped it?)")
    if waiting:
        places = {(s.waiting_in, s.where) for s in waiting}
        ranks = [s.rank for s in waiting]
        if len(places) == 1:
            (op, where), = places
            lines.append(f"rank(s) {ranks} wait in {op} called at {where}")
        else:
            lines.append("the ranks wait in different places: "
                         + "; ".join(f"rank {s.rank} in {s.waiting_in} at {s.where}" for s in waiting)
                         + " (mismatched collectives: every rank must call the same ones in the same order)")
    if busy or gone:
        first = (busy or gone)[0].rank
        lines.append(f"look at rank {first} first: the others wait for it")
    return "\n".join(lines) if lines else "no rank was stuck"


# ---- the lesson's three ways to hang a job ------------------------------------------------------------------------

SCENARIOS = ("loop", "skip", "mismatch")


def scenario(kind: str, directory: str | Path, seconds: float = 1.0, steps: int = 4, culprit: int = 1) -> int:
    """Every rank all-reduces once per step under :func:`watch`; at step 2 rank ``culprit`` misbehaves:
    "loop" computes for 10·seconds (stuck in its own code), "skip" skips that step's all-reduce (and then works on
    for 10·seconds, its connections open), "mismatch" calls a broadcast where the others all-reduce. Returns
    ``steps``."""
    import time

    import torch

    from labkit import comm

    if kind not in SCENARIOS:
        raise ValueError(f"kind must be one of {SCENARIOS}, not {kind!r}")
    rank, t = dist.get_rank(), comm.on(torch.ones(4))
    with watch(directory, seconds):
        for step in range(steps):
            beat()
            if step == 2 and rank == culprit:
                if kind == "loop":
                    deadline = time.monotonic() + 10 * seconds
                    while time.monotonic() < deadline:          # a bug: a loop that takes far longer than meant
                        pass
                elif kind == "skip":
                    continue
                elif kind == "mismatch":
                    comm.broadcast(t, src=0)
                    continue
            comm.all_reduce(t)
        if kind == "skip" and rank == culprit:
            time.sleep(10 * seconds)                            # the rest of its work, one all-reduce short
    return steps


def late_at_barrier(seconds: float = 1.0, culprit: int = 1) -> None:
    """``dist.monitored_barrier`` (gloo only) with rank ``culprit`` arriving 3·seconds late: rank 0 raises, naming
    the ranks that did not arrive within ``seconds``, instead of every rank timing out on its own."""
    import time

    from labkit import comm

    if dist.get_rank() == culprit:
        time.sleep(3 * seconds)
    comm.monitored_barrier(seconds)
