"""Exercise 10's checkers: labkit's own code passes; each known mistake, written as a small change of it, is named.

The "student" of 10a copies labkit's Trainer.state_dict / load_state_dict into a subclass (the checker switches
Trainer's own off while it runs); the mistakes change one thing of it, as students do. The "student" of 10b is
labkit.checkpoint.save itself, captured before the checker refuses it, and small changes of it.
"""

import os
import tempfile
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from labkit import checkpoint
from labkit.checks import CheckFailed
from labkit.checks.ex10 import RESUME_MISTAKES, SAVE_MISTAKES, check_resume, check_save
from labkit.checks.harness import literal_parts
from labkit.resumable import Trainer

LABKIT_SAVE = checkpoint.save


def _copy(fn):
    """A new function object with fn's code: labkit's method, as the student's own (the checker refuses
    Trainer's, by identity and by switching them off)."""
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class FromLabkit(Trainer):
    state_dict = _copy(Trainer.state_dict)
    load_state_dict = _copy(Trainer.load_state_dict)


class NoRngState(FromLabkit):
    def load_state_dict(self, state):
        with mock.patch.object(checkpoint, "set_rng_state", lambda *args, **kwargs: None):
            FromLabkit.load_state_dict(self, state)


class RankZerosRng(FromLabkit):
    def load_state_dict(self, state):
        FromLabkit.load_state_dict(self, dict(state, rng=[state["rng"][0]] * self.world_size))


class NoOptimizerState(FromLabkit):
    def load_state_dict(self, state):
        with mock.patch.object(self.optimizer, "load_state_dict", lambda s: None):
            FromLabkit.load_state_dict(self, state)


class ScheduleRestarted(FromLabkit):
    def load_state_dict(self, state):
        with mock.patch.object(self.scheduler, "load_state_dict", lambda s: None):
            FromLabkit.load_state_dict(self, state)


class NoEpoch(FromLabkit):
    def load_state_dict(self, state):
        FromLabkit.load_state_dict(self, state)
        self.epoch = 0


class NoPosition(FromLabkit):
    def load_state_dict(self, state):
        FromLabkit.load_state_dict(self, state)
        self.position = 0


MISTAKE_CLASSES = {"no RNG state": NoRngState, "RNG of rank 0 only": RankZerosRng,
                   "no optimizer state": NoOptimizerState, "schedule restarted": ScheduleRestarted,
                   "no sampler epoch": NoEpoch, "no position in the epoch": NoPosition}


def test_labkits_own_methods_pass(capsys):
    check_resume(FromLabkit)
    assert "every rank ends on the uninterrupted run's bits" in capsys.readouterr().out


@pytest.mark.parametrize("mistake", RESUME_MISTAKES, ids=lambda m: m.name)
def test_each_resume_mistake_is_named(mistake):
    with pytest.raises(CheckFailed) as err:
        check_resume(MISTAKE_CLASSES[mistake.name], world_sizes=(2,))
    assert all(part in str(err.value) for part in literal_parts(mistake.says)), str(err.value)


def test_a_step_not_restored_is_named():
    class NoStep(FromLabkit):
        def load_state_dict(self, state):
            FromLabkit.load_state_dict(self, state)
            self.step = 0
    with pytest.raises(CheckFailed, match="rank 0 is at step 0, but the last checkpoint was written after step 5"):
        check_resume(NoStep, world_sizes=(2,))


def test_calling_trainers_own_methods_or_not_writing_them_is_named():
    class Lazy(Trainer):
        def state_dict(self):
            return super().state_dict()

        def load_state_dict(self, state):
            super().load_state_dict(state)
    with pytest.raises(CheckFailed, match="your class called Trainer.state_dict"):
        check_resume(Lazy, world_sizes=(2,))

    class Half(Trainer):
        def state_dict(self):
            return {}
    with pytest.raises(CheckFailed, match="does not define load_state_dict"):
        check_resume(Half)
    with pytest.raises(CheckFailed, match="a subclass of labkit.resumable.Trainer"):
        check_resume(object)


def test_state_that_is_not_plain_data_is_named():
    class KeepsTheSampler(FromLabkit):
        def state_dict(self):
            return dict(FromLabkit.state_dict(self), sampler=self.sampler)
    with pytest.raises(CheckFailed, match="objects other than tensors"):
        check_resume(KeepsTheSampler, world_sizes=(2,))


def test_the_stub_goes_up_as_itself():
    class Stub(Trainer):
        def state_dict(self):
            raise NotImplementedError("Exercise 10a(i): return the step, ...")

        def load_state_dict(self, state):
            raise NotImplementedError("Exercise 10a(ii): restore each piece")
    with pytest.raises(NotImplementedError, match=r"Exercise 10a\(i\)(.|\n)*Not written yet either(.|\n)*10a\(ii\)"):
        check_resume(Stub, world_sizes=(2,))


# ---- 10b ---------------------------------------------------------------------------------------------------------

def test_labkits_save_passes(capsys):
    check_save(LABKIT_SAVE)
    assert "stays whole" in capsys.readouterr().out


def in_place(state, path):
    torch.save(state, path)


def temporary_elsewhere(state, path):
    tmp = Path(tempfile.gettempdir()) / f"ex10-{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def never_renamed(state, path):
    torch.save(state, str(path) + ".tmp")


def temporary_left(state, path):
    tmp = str(path) + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        Path(path).write_bytes(f.read())


@pytest.mark.parametrize("mistake, save", [(SAVE_MISTAKES[0], in_place), (SAVE_MISTAKES[1], temporary_elsewhere),
                                           (SAVE_MISTAKES[2], never_renamed), (SAVE_MISTAKES[3], temporary_left)],
                         ids=lambda x: getattr(x, "name", ""))
def test_each_save_mistake_is_named(mistake, save):
    with pytest.raises(CheckFailed) as err:
        check_save(save)
    assert all(part in str(err.value) for part in literal_parts(mistake.says)), str(err.value)


def test_calling_labkits_save_is_refused():
    with pytest.raises(CheckFailed, match="called labkit.checkpoint.save"):
        check_save(lambda state, path: checkpoint.save(state, path))
