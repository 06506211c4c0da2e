"""Lab 10: a run that survives a killed rank. torchrun restarts the whole job and every rank resumes from the last
checkpoint; the run ends on the bits of one that was never interrupted.

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m labkit.labs.elastic --dir runs/elastic \\
        --kill-rank 1 --kill-at 13          # rank 1 kills itself (SIGKILL) at step 13 of the first attempt
    python -m labkit.labs.elastic --dir runs/clean --world-size 2   # the same run, uninterrupted (labkit.launch)

The training is :mod:`labkit.resumable` (a checkpoint every ``--every`` steps, written whole). Each rank appends
what happens to it to ``DIR/events.jsonl`` (start, checkpoint, killed, done: time, rank, attempt, step), and rank 0
writes the final parameters to ``DIR/result.pt``. :func:`run_elastic` starts torchrun as a subprocess (the lesson
and the tests use it) and :func:`read_events` reads the timeline back.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from labkit import checkpoint
from labkit.labs.entry import run_as_script, run_lab
from labkit.resumable import train as train_resumable

__all__ = ["parse_args", "train", "main", "run_elastic", "read_events"]

CHECKPOINT, EVENTS, RESULT = "ckpt.pt", "events.jsonl", "result.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--dir", required=True, help="where the checkpoint, the events and the result go")
    p.add_argument("--world-size", type=int, default=None, help="processes expected (checked against the launcher's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=5, help="a checkpoint every this many steps")
    p.add_argument("--kill-rank", type=int, default=None, help="this rank kills itself (SIGKILL) ...")
    p.add_argument("--kill-at", type=int, default=None, help="... after this step, in the first attempt only")
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep after each step (a slower timeline)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a rank may wait in a collective")
    args = p.parse_args(argv)
    if (args.kill_rank is None) != (args.kill_at is None):
        p.error("--kill-rank and --kill-at go together")
    if args.steps < 1 or args.every < 1:
        p.error("--steps and --every must be positive")
    return args


def _log(directory: Path, **event) -> None:
    # one short line per write, opened in append mode: lines of different processes do not interleave
    line = json.dumps(dict(event, time=time.time(), pid=os.getpid())) + "\n"
    with open(directory / EVENTS, "a") as f:
        f.write(line)


def train(args, device: torch.device) -> dict:
    """One rank: resume if a checkpoint exists, train, log, and (first attempt only) kill itself if asked."""
    import torch.distributed as dist

    rank, directory = dist.get_rank(), Path(args.dir)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    path = directory / CHECKPOINT
    resume = path.exists()
    _log(directory, kind="start", rank=rank, attempt=attempt, step=checkpoint.load(path)["step"] if resume else 0)

    def on_step(trainer, saved):
        if saved:
            _log(directory, kind="checkpoint", rank=rank, attempt=attempt, step=trainer.step)
        if attempt == 0 and rank == args.kill_rank and trainer.step == args.kill_at:
            _log(directory, kind="killed", rank=rank, attempt=attempt, step=trainer.step)
            os.kill(os.getpid(), signal.SIGKILL)     # no Python cleanup, no goodbye to the peers: a crash
        time.sleep(args.step_seconds)

    result = train_resumable(args.steps, path=path, every=args.every, resume=resume, on_step=on_step)
    _log(directory, kind="done", rank=rank, attempt=attempt, step=args.steps)
    if rank == 0:
        checkpoint.save({"params": result.params, "losses": result.losses, "start": result.start},
                        directory / RESULT)
    return {"start": result.start, "attempt": attempt}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    rank, result = run_lab(train, args, device="cpu")
    if rank == 0:
        print(f"done: attempt {result['attempt']}, resumed from step {result['start']} -> {args.dir}", flush=True)
    return result


def run_elastic(directory: str | Path, *, world_size: int = 2, steps: int = 20, every: int = 5,
                kill_rank: int | None = 1, kill_at: int | None = 13, max_restarts: int = 1,
                step_seconds: float = 0.0, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --max-restarts ...`` on this lab, as a subprocess; its output is returned."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
           "--max-restarts", str(max_restarts), "-m", "labkit.labs.elastic", "--dir", str(directory),
           "--world-size", str(world_size), "--steps", str(steps), "--every", str(every),
           "--step-seconds", str(step_seconds)]
    if kill_rank is not None:
        cmd += ["--kill-rank", str(kill_rank), "--kill-at", str(kill_at)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def read_events(directory: str | Path) -> list[dict]:
    """The events of every rank and attempt, in time order."""
    lines = (Path(directory) / EVENTS).read_text().splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda e: e["time"])


if __name__ == "__main__":
    run_as_script(main)
