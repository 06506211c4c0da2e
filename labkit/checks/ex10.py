"""Checkers for exercise 10, a training run that resumes to the bit (``solutions/10_checkpoint_exercise.ipynb``).

    check_resume(MyTrainer)    # 10a: state_dict / load_state_dict of a labkit.resumable.Trainer subclass
    check_save(save)           # 10b: a checkpoint file that stays whole whenever the writer dies

Each prints one ``✓`` line when the code is right and raises :class:`labkit.checks.CheckFailed` naming the
mistake when it is not.

10a. ``MyTrainer`` subclasses :class:`labkit.resumable.Trainer` with its own ``state_dict()`` (everything the next
step depends on; collective: every rank calls it, rank 0 writes it) and ``load_state_dict(state)``. On 2 and 3
processes, runs of :data:`STEPS` steps with a checkpoint every :data:`EVERY` steps are killed after the steps of
:data:`CRASHES` (drawn once with a fixed seed), resumed with the student's class from their last checkpoint, and
must end on the bits of an uninterrupted run, on every rank. Trainer's own two methods are switched off while the
student's class runs (the student writes them; calling them fails the check), and the checkpoint goes through
``labkit.checkpoint.save`` and ``load`` (``weights_only=True``: tensors, numbers, strings and containers only).
Where the parameters differ, each row of :data:`RESUME_MISTAKES` (a piece of state left out, made with
:data:`labkit.resumable.FORGET` from labkit's Trainer) is run the same way, and the one that gives the student's
parameters, to the bit, names the mistake.

10b. ``save(state, path)`` must leave at ``path`` a whole checkpoint, the old one or the new one, whatever moment
the process dies. In this process, after a first save, ``torch.save`` is made to die halfway through writing the
second (an exception that ``except Exception`` does not catch, standing for SIGKILL): ``path`` must still load, as
the first checkpoint. The temporary file must be in ``path``'s folder (``os.replace`` across file systems is not a
rename), and a save that completes leaves ``path`` holding the new state and no temporary file behind.
:data:`SAVE_MISTAKES` names the known wrong versions.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from labkit import checkpoint, comm
from labkit.checks import CheckFailed, fail, first_mismatch, passed, run_on_ranks
from labkit.checks.harness import Mistake, call_student, find_mistake, need_function, not_written
from labkit.resumable import Trainer, train

__all__ = ["check_resume", "check_save", "RESUME_MISTAKES", "SAVE_MISTAKES", "STEPS", "EVERY", "CRASHES",
           "WORLD_SIZES"]

STEPS, EVERY = 20, 5
CRASHES = tuple(sorted(random.Random(10).sample(range(6, STEPS), 2)))    # (6, 15): one right after a checkpoint
WORLD_SIZES = (2, 3)

# ============================================================================================
# 10a. What a resume needs
# ============================================================================================

RESUME_MISTAKES = (
    Mistake("no RNG state", "random states",
            "the resumed run draws other dropout masks and jitter than the uninterrupted one: no random state was "
            "saved or restored. Save every rank's (labkit.checkpoint.all_rng_states(self.device)) and restore "
            "rank r's with checkpoint.set_rng_state, last in load_state_dict"),
    Mistake("RNG of rank 0 only", "random states of ranks > 0",
            "every rank restored rank 0's random state: the ranks now draw the same dropout masks, which they never "
            "did before the crash. Save all the ranks' states (all_rng_states) and restore state['rng'][self.rank]"),
    Mistake("no optimizer state", "optimizer state",
            "AdamW restarted from zero moments and step 1: the optimizer's state was not saved or not restored "
            "(self.optimizer.state_dict() / load_state_dict)"),
    Mistake("schedule restarted", "schedule",
            "the learning-rate schedule restarted at its first step (warm-up again): save and restore "
            "self.scheduler.state_dict()"),
    Mistake("no sampler epoch", "sampler epoch",
            "the resumed run reads its epoch in epoch 0's order: the sampler's epoch (self.epoch, which "
            "_next_batch passes to sampler.set_epoch) was not saved or not restored"),
    Mistake("no position in the epoch", "position in the epoch",
            "the resumed run starts its epoch from the first batch again: the position in the epoch "
            "(self.position) was not saved or not restored"),
)


class _OwnMethodsOnly:
    """While the student's class runs: Trainer's state_dict / load_state_dict refuse to be called."""

    def __enter__(self):
        self.saved = Trainer.state_dict, Trainer.load_state_dict

        def refuse(name):
            def method(*args, **kwargs):
                raise CheckFailed(f"your class called Trainer.{name} (labkit's own): write {name} yourself, "
                                  f"from the attributes of self (the table of lesson 10, section 2)")
            return method
        Trainer.state_dict, Trainer.load_state_dict = refuse("state_dict"), refuse("load_state_dict")
        return self

    def __exit__(self, *exc):
        Trainer.state_dict, Trainer.load_state_dict = self.saved


def _student_runs(trainer_class, directory: str) -> dict:
    """On every rank: the uninterrupted run's parameters, and for each crash the student's resumed run."""
    out = {"clean": train(STEPS).params, "resumed": {}, "start": {}}
    for crash in CRASHES:
        path = Path(directory) / f"student-{crash}.pt"
        with _OwnMethodsOnly():
            train(STEPS, path=path, every=EVERY, stop_after=crash, trainer_class=trainer_class)
            result = train(STEPS, path=path, resume=True, trainer_class=trainer_class)
        out["resumed"][crash], out["start"][crash] = result.params, result.start
    return out


def _mistake_runs(directory: str, crash: int) -> dict:
    """On every rank: labkit's Trainer crashed after ``crash`` and resumed with each mistake's piece left out."""
    path = Path(directory) / f"labkit-{crash}.pt"
    train(STEPS, path=path, every=EVERY, stop_after=crash)
    out = {}
    for mistake in RESUME_MISTAKES:
        copy = Path(directory) / f"labkit-{crash}-{mistake.name.replace(' ', '-')}.pt"
        if dist.get_rank() == 0:
            copy.write_bytes(path.read_bytes())
        comm.barrier()
        out[mistake.name] = train(STEPS, path=copy, resume=True, forget=mistake.variant).params
    return out


def check_resume(trainer_class: type, world_sizes=WORLD_SIZES) -> None:
    __tracebackhide__ = True
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        fail(f"check_resume needs your class, a subclass of labkit.resumable.Trainer, not {trainer_class!r}")
    for method in ("state_dict", "load_state_dict"):
        if getattr(trainer_class, method) is getattr(Trainer, method):
            fail(f"{trainer_class.__name__} does not define {method}: write it in the class (exercise 10a)")
    name = f"{trainer_class.__name__}.state_dict / load_state_dict"
    for n in world_sizes:
        with tempfile.TemporaryDirectory(prefix="ex10-") as directory:
            try:
                ranks = run_on_ranks(_student_runs, trainer_class, directory, world_size=n, timeout=60, name=name,
                                     task="10a")
            except NotImplementedError as err:     # name every stub still there, not only the first one met
                blank = object.__new__(trainer_class)
                raise not_written([("10a(i)", f"{trainer_class.__name__}.state_dict",
                                    lambda: trainer_class.state_dict(blank)),
                                   ("10a(ii)", f"{trainer_class.__name__}.load_state_dict",
                                    lambda: trainer_class.load_state_dict(blank, {}))], err, "10a") from None
            for crash in CRASHES:
                expected_start = crash // EVERY * EVERY
                for rank, r in enumerate(ranks):
                    if r["start"][crash] != expected_start:
                        fail(f"on {n} processes, killed after step {crash}: after your load_state_dict, rank {rank} "
                             f"is at step {r['start'][crash]}, but the last checkpoint was written after step "
                             f"{expected_start}: save and restore self.step")
                wrong = [rank for rank, r in enumerate(ranks) if not torch.equal(r["resumed"][crash], r["clean"])]
                if not wrong:
                    continue
                variants = run_on_ranks(_mistake_runs, directory, crash, world_size=n, timeout=60,
                                        name="labkit's Trainer")
                mistake = find_mistake(RESUME_MISTAKES, lambda m: all(
                    torch.equal(variants[rank][m.name], ranks[rank]["resumed"][crash]) for rank in range(n)))
                rank = wrong[0]
                if mistake is not None:
                    fail(f"on {n} processes, killed after step {crash} and resumed from step {expected_start}, "
                         f"the run ends elsewhere than the uninterrupted one: {mistake.says}")
                index, want, got = first_mismatch(ranks[rank]["clean"], ranks[rank]["resumed"][crash], rtol=0, atol=0)
                fail(f"on {n} processes, killed after step {crash} and resumed from step {expected_start}, rank "
                     f"{rank}'s parameters differ from the uninterrupted run's (parameter element {index[0]}: "
                     f"expected {want!r}, got {got!r}): something the next step depends on is not saved or not "
                     f"restored exactly (lesson 10, section 2)")
    passed(f"{trainer_class.__name__}: killed after steps {' and '.join(map(str, CRASHES))} and resumed, on "
           f"{' and '.join(map(str, world_sizes))} processes, every rank ends on the uninterrupted run's bits")


# ============================================================================================
# 10b. A checkpoint file that is always whole
# ============================================================================================

SAVE_MISTAKES = (
    Mistake("written in place", "in place",
            "the writer died halfway through torch.save and {path} no longer loads ({error}): the new checkpoint "
            "was written over the old one. Write a temporary file, then os.replace it onto the path"),
    Mistake("temporary file elsewhere", "elsewhere",
            "the temporary file {tmp} is not in the checkpoint's folder {folder}: os.replace is a rename only "
            "within one file system, and /tmp often is another one. Put it next to the checkpoint"),
    Mistake("never renamed", "never renamed",
            "after save returned, {path} does not hold the new state: the temporary file was written but not "
            "renamed onto the path (os.replace)"),
    Mistake("temporary file left", "left",
            "after save returned, {left} is still in the folder: a finished save leaves only the checkpoint"),
)


class _Killed(BaseException):
    """Stands for SIGKILL in the middle of a write: not an Exception, so `except Exception` does not stop it."""


def _target_of(f) -> Path | None:
    if isinstance(f, (str, os.PathLike)):
        return Path(f)
    name = getattr(f, "name", None)
    return Path(name) if isinstance(name, str) else None


class _DyingSave:
    """torch.save that records where it writes and, when ``die`` is set, writes half of the file and dies."""

    def __init__(self):
        self.real, self.targets, self.die = torch.save, [], False

    def __call__(self, obj, f, *args, **kwargs):
        target = _target_of(f)
        self.targets.append(target)
        if not self.die:
            return self.real(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        self.real(obj, buffer, *args, **kwargs)
        half = buffer.getvalue()[:len(buffer.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(half)
            f.flush()
        else:
            with open(f, "wb") as out:
                out.write(half)
        raise _Killed()


def check_save(save) -> None:
    __tracebackhide__ = True
    name = need_function(save, "check_save")
    first, second = {"step": 5, "w": torch.arange(6.0)}, {"step": 10, "w": torch.arange(6.0) * 2}
    with tempfile.TemporaryDirectory(prefix="ex10-") as directory:
        folder = Path(directory) / "run"
        folder.mkdir()
        path = folder / "checkpoint.pt"
        dying, labkits = _DyingSave(), checkpoint.save

        def refuse(*args, **kwargs):
            raise CheckFailed(f"{name} called labkit.checkpoint.save: write the steps yourself (exercise 10b)")
        torch.save, checkpoint.save = dying, refuse
        try:
            call_student(save, first, path, name=name, task="10b", where=f"saving to {path.name}")
            left = sorted(p.name for p in folder.iterdir() if p.name != path.name)
            elsewhere = [t for t in dying.targets if t is not None and t.resolve().parent != folder.resolve()]
            if elsewhere:
                fail(SAVE_MISTAKES[1].says.format(tmp=elsewhere[0], folder=folder))
            if not path.exists() or not _holds(path, first):
                fail(SAVE_MISTAKES[2].says.format(path=path.name))
            if left:
                fail(SAVE_MISTAKES[3].says.format(left=", ".join(left)))
            dying.die = True
            try:
                call_student(save, second, path, name=name, task="10b", where=f"saving to {path.name}")
            except _Killed:
                pass
            else:
                fail(f"{name} returned although torch.save died while writing: call torch.save to write the file")
        finally:
            torch.save, checkpoint.save = dying.real, labkits
        try:
            state = checkpoint.load(path)
        except checkpoint.CheckpointError as err:
            cause = err.__cause__ or err
            fail(SAVE_MISTAKES[0].says.format(path=path.name, error=f"{type(cause).__name__}: "
                                              f"{(str(cause).splitlines() or [''])[0].split('. ')[0][:160]}"))
        if not torch.equal(state["w"], first["w"]):
            fail(f"after the writer died, {path.name} holds neither the old checkpoint nor the new one")
    passed(f"{name}: the checkpoint stays whole when the writer dies mid-write, and a finished save leaves only "
           f"the new checkpoint")


def _holds(path: Path, state: dict) -> bool:
    try:
        loaded = checkpoint.load(path)
    except checkpoint.CheckpointError:
        return False
    return loaded.get("step") == state["step"] and torch.equal(loaded.get("w"), state["w"])
