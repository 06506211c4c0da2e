"""labkit.sharded_checkpoint: FSDP2 shards saved by 4 ranks with torch.distributed.checkpoint load into 2 ranks'
shards (and 3's), with every parameter and optimizer entry equal to the bit; then both go on training alike."""

import os

import torch

import labkit
from labkit import sharded_checkpoint
from labkit.compressed_training import VOCAB_SIZE
from labkit.models import GPTConfig

CONFIG = GPTConfig(vocab_size=VOCAB_SIZE, block_size=8, n_layer=2, n_head=2, n_embd=16)


def test_saved_on_4_ranks_loaded_on_2_and_3(tmp_path):
    path = str(tmp_path / "dcp")
    saved, after = labkit.launch(sharded_checkpoint.train_and_save, path, 3, CONFIG, world_size=4, timeout=120)[0]
    assert sum(f.endswith(".distcp") for f in os.listdir(path)) == 4          # one file per rank that saved
    for world_size in (2, 3):
        loaded, continued = labkit.launch(sharded_checkpoint.load_and_continue, path, 3, CONFIG, world_size=world_size,
                                          timeout=120)[0]
        assert saved.keys() == loaded.keys()
        for k in saved:
            assert torch.equal(loaded[k], saved[k]), (world_size, k)
        if 4 % world_size == 0:       # the same global batch of 4, split evenly: the next step agrees too
            for k in after:
                assert torch.allclose(continued[k], after[k], rtol=1e-5, atol=1e-6), k
