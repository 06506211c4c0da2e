"""labkit.checkpoint and labkit.resumable: a run stopped and resumed ends on the bits of an uninterrupted one; each
piece of state left out (a known mistake, written as a small change to the Trainer) makes it another run; a
checkpoint file is always whole, and a broken one says so."""

import os
import random

import numpy as np
import pytest
import torch

import labkit
from labkit import checkpoint
from labkit.resumable import FORGET, Trainer, kill_while_writing, resume_each, train

N, STEPS, EVERY, CRASH = 2, 20, 5, 13        # 6 batches per epoch and rank: the crash is in epoch 2, the resume
#                                              from step 10 (epoch 1, position 4) crosses into epoch 2


def _resumed(tmp_path, trainer_class=Trainer, world_size=N):
    path = str(tmp_path / "ckpt.pt")
    labkit.launch(train, STEPS, path=path, every=EVERY, stop_after=CRASH, world_size=world_size, timeout=60)
    return labkit.launch(train, STEPS, path=path, every=EVERY, resume=True, trainer_class=trainer_class,
                         world_size=world_size, timeout=60)


@pytest.fixture(scope="module")
def uninterrupted():
    return labkit.launch(train, STEPS, world_size=N, timeout=60)


def test_a_stopped_and_resumed_run_ends_on_the_same_bits(uninterrupted, tmp_path):
    resumed = _resumed(tmp_path)
    for rank in range(N):
        assert resumed[rank].start == 10                                      # the last checkpoint before the crash
        assert torch.equal(resumed[rank].params, uninterrupted[rank].params), rank
        assert resumed[rank].losses == uninterrupted[rank].losses[10:]        # every step again, to the bit


class LoaderWithoutItsOwnGenerator(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loader.generator = None          # iter(loader) then draws its seed from torch's global RNG


def test_each_piece_of_state_left_out_makes_another_run(tmp_path):
    differences = labkit.launch(resume_each, tmp_path, STEPS, EVERY, CRASH, world_size=N, timeout=120)[0]
    assert differences.pop("nothing") == 0.0
    assert set(differences) == set(FORGET) and all(d > 0 for d in differences.values()), differences


def test_a_loader_that_draws_from_the_global_generator_breaks_the_resume(uninterrupted, tmp_path):
    resumed = _resumed(tmp_path, LoaderWithoutItsOwnGenerator)
    assert not all(torch.equal(resumed[r].params, uninterrupted[r].params) for r in range(N))


def test_resuming_on_another_world_size_says_why_not(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    labkit.launch(train, 4, path=path, world_size=N, timeout=60)
    with pytest.raises(labkit.WorkerError, match="written by 2 ranks and this run has 1"):
        labkit.launch(train, 8, path=path, resume=True, world_size=1, timeout=60)


def test_rng_state_brings_back_every_generator():
    state = checkpoint.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(2))
    torch.rand(5), random.random(), np.random.rand(7)                 # move them on
    checkpoint.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])


def test_save_replaces_the_file_whole_and_load_reads_only_data(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)
    checkpoint.save({"step": 2, "w": torch.zeros(3)}, path)
    loaded = checkpoint.load(path)
    assert loaded["step"] == 2 and torch.equal(loaded["w"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["c.pt"]                          # no temporary file left behind
    torch.save({"code": Trainer}, tmp_path / "pickled.pt")             # a class: weights_only refuses to load it
    with pytest.raises(checkpoint.CheckpointError, match="objects other than tensors"):
        checkpoint.load(tmp_path / "pickled.pt")


def test_a_truncated_or_missing_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])                           # what a kill during an in-place write leaves
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(path)
    path.write_bytes(b"")                                             # killed just after opening it
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "missing.pt")


def test_a_kill_during_a_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    assert kill_while_writing(tmp_path / "c.pt", "atomic") == 0     # SIGKILLs that fall inside writes of 8 MB
