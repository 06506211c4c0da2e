"""labkit.sharded_checkpoint: FSDP2 shards saved by 4 ranks with torch.distributed.checkpoint load into 2 ranks'
shards (and 3's), with every parameter and optimizer entry equal to the bit; then both go on training alike."""

import os

import torch
import torch.distributed as dist

import labkit
from labkit import comm, sharded_checkpoint
from labkit.compressed_training import VOCAB_SIZE, text_batch
from labkit.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=VOCAB_SIZE, block_size=8, n_layer=2, n_head=2, n_embd=16)


def _sharded_gpt(seed):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = GPT(CONFIG)
    mesh = init_device_mesh(comm.device().type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, optimizer, step):
    rank, n = dist.get_rank(), dist.get_world_size()
    x, y = text_batch(step, 4, CONFIG.block_size)            # the same global batch of 4 for any world size
    per = 4 // n
    optimizer.zero_grad()
    model(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])[1].backward()
    optimizer.step()


def _train_and_save(path, steps):
    model, optimizer = _sharded_gpt(seed=0)
    for step in range(steps):
        _step(model, optimizer, step)
    sharded_checkpoint.save(model, optimizer, path)
    before = sharded_checkpoint.full_state(model, optimizer)
    _step(model, optimizer, steps)
    return before, sharded_checkpoint.full_state(model, optimizer)


def _load_and_continue(path, steps):
    model, optimizer = _sharded_gpt(seed=1)                  # other weights: the load must replace them all
    _step(model, optimizer, 99)                               # and an optimizer state of its own
    sharded_checkpoint.load(model, optimizer, path)
    loaded = sharded_checkpoint.full_state(model, optimizer)
    _step(model, optimizer, steps)
    return loaded, sharded_checkpoint.full_state(model, optimizer)


def test_saved_on_4_ranks_loaded_on_2_and_3(tmp_path):
    path = str(tmp_path / "dcp")
    saved, after = labkit.launch(_train_and_save, path, 3, world_size=4, timeout=120)[0]
    assert sum(f.endswith(".distcp") for f in os.listdir(path)) == 4          # one file per rank that saved
    for world_size in (2, 3):
        loaded, continued = labkit.launch(_load_and_continue, path, 3, world_size=world_size, timeout=120)[0]
        assert saved.keys() == loaded.keys()
        for k in saved:
            assert torch.equal(loaded[k], saved[k]), (world_size, k)
        if 4 % world_size == 0:       # the same global batch of 4, split evenly: the next step agrees too
            for k in after:
                assert torch.allclose(continued[k], after[k], rtol=1e-5, atol=1e-6), k
