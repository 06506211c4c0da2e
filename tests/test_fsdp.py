"""labkit.fsdp: ZeRO stage 3 takes the steps of one process and of torch's fully_shard, holding 1/N of the model."""

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=23, block_size=8, n_layer=3, n_head=2, n_embd=10)
STEPS = 3


def _data(step, world_size):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, CONFIG.vocab_size, (2 * world_size, 8), generator=g)
    return x, torch.roll(x, 1, 1)


def _one_process(world_size):
    torch.manual_seed(0)
    model = GPT(CONFIG).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for step in range(STEPS):
        x, y = _data(step, world_size)
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def _labkit_worker(prefetch):
    from labkit import comm
    from labkit.fsdp import FSDP, Unit

    rank, N = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = GPT(CONFIG).double()
    names = {id(p): n for n, p in model.named_parameters()}
    fsdp = FSDP(model, prefetch=prefetch)
    opt = torch.optim.AdamW(fsdp.shards(), lr=0.01, weight_decay=0.1)
    most = [0]
    gather = Unit.gather

    def counting_gather(unit, async_op=False):       # how many units are gathered at once, at most
        gather(unit, async_op)
        most[0] = max(most[0], sum(u.gathered for u in fsdp.units))

    Unit.gather = counting_gather
    with comm.record() as events:
        for step in range(STEPS):
            x, y = _data(step, N)
            mine = slice(2 * rank, 2 * rank + 2)
            opt.zero_grad()
            fsdp(x[mine], y[mine])[1].backward()
            opt.step()
    Unit.gather = gather
    left_gathered = [u.name for u in fsdp.units if u.gathered]
    params = {}
    for unit in fsdp.units:
        unit.gather()
        params.update({names[id(p)]: p.detach().clone() for p in unit.params})
        unit.free()
    shard_numel = sum(s.numel() for s in fsdp.shards())
    return params, [(e.op, e.numel) for e in events], most[0], left_gathered, shard_numel


def _torch_worker():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, N = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (N,))
    torch.manual_seed(0)
    model = GPT(CONFIG).double()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for step in range(STEPS):
        x, y = _data(step, N)
        mine = slice(2 * rank, 2 * rank + 2)
        opt.zero_grad()
        model(x[mine], y[mine])[1].backward()
        opt.step()
    return {n: p.full_tensor().detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("world_size", [1, 2, 5])
@pytest.mark.parametrize("prefetch", [False, True])
def test_fsdp_takes_the_steps_of_one_process(world_size, prefetch):
    want = _one_process(world_size)
    psi = sum(p.numel() for p in want.values())
    units = 1 + CONFIG.n_layer
    for rank, (params, events, most, left, shard_numel) in enumerate(
            labkit.launch(_labkit_worker, prefetch, world_size=world_size, timeout=60)):
        assert params.keys() == want.keys()
        for name in want:
            assert torch.allclose(params[name], want[name], rtol=1e-12, atol=1e-13), (name, rank)
        # per step: the root gathered once, every block twice (forward, backward), every unit reduce-scattered
        ops = [op for op, _ in events]
        assert ops.count("all_gather") == STEPS * (1 + 2 * CONFIG.n_layer)
        assert ops.count("reduce_scatter") == STEPS * units
        # the shards hold Ψ/N (plus padding); between steps nothing is gathered; in a step, at most the root,
        # the block in use and (prefetching) the next one
        assert psi / world_size <= shard_numel < psi / world_size + units
        assert left == []
        assert most <= (3 if prefetch else 2) and (world_size == 1 or most >= 2)


def test_fsdp_equals_torchs_fully_shard():
    ours = labkit.launch(_labkit_worker, True, world_size=3, timeout=60)
    theirs = labkit.launch(_torch_worker, world_size=3, timeout=120)
    for (params, *_), reference in zip(ours, theirs):
        for name, value in reference.items():
            assert torch.allclose(params[name], value, rtol=1e-12, atol=1e-13), name
