"""labkit.zero: ZeRO stages 1 and 2 take the steps of one process, of DDP and of torch's ZeroRedundancyOptimizer."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import labkit

STEPS = 3


def _model(seed=0):
    torch.manual_seed(seed)
    # 7·5+5 + 5·3+3 + 3 = 61 parameters: no world size of 2..5 divides a bucket evenly
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(),
                         nn.Linear(3, 1, bias=False)).double()


def _data(step, world_size):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4 * world_size, 7, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True))


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def _one_process(world_size):
    model = _model()
    opt = _adamw(model.parameters())
    for step in range(STEPS):
        x, y = _data(step, world_size)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def _zero_worker(kind, stage, bucket_cap_mb):
    from labkit import comm
    from labkit.zero import ZeroOptimizer

    rank, N = dist.get_rank(), dist.get_world_size()
    model = _model()
    if kind == "labkit":
        opt = ZeroOptimizer(model.parameters(), _adamw, stage=stage, bucket_cap_mb=bucket_cap_mb)
        step_fn = opt.step
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        model = nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=0.05, weight_decay=0.1)
        step_fn = opt.step
    with comm.record() as events:
        for step in range(STEPS):
            x, y = _data(step, N)
            mine = slice(4 * rank, 4 * rank + 4)
            opt.zero_grad()
            ((model(x[mine]) - y[mine]) ** 2).mean().backward()
            step_fn()
    live = list((model.module if kind == "torch" else model).parameters())
    grads_kept = sum(p.grad.numel() for p in live if p.grad is not None)      # after the last step, before zero_grad
    params = [p.detach() for p in live]
    state = opt.state_bytes() if kind == "labkit" else None
    return params, [(e.op, e.numel) for e in events], grads_kept, state


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("world_size", [1, 3, 5])
def test_zero_takes_the_steps_of_one_process(stage, world_size):
    want = _one_process(world_size)
    for cap in (1e-4, 25.0):                        # one bucket per tensor (about), and one bucket
        results = labkit.launch(_zero_worker, "labkit", stage, cap, world_size=world_size, timeout=60)
        for rank, (params, events, grads_kept, state) in enumerate(results):
            for w, g in zip(want, params):
                assert torch.allclose(w, g, rtol=1e-12, atol=1e-14), (stage, world_size, cap, rank)
            # per step and bucket: one reduce-scatter of the padded bucket, one all-gather of a chunk
            ops = [op for op, _ in events]
            buckets = ops.count("reduce_scatter") // STEPS
            assert ops.count("all_gather") == buckets * STEPS and len(ops) == 2 * buckets * STEPS
            sent = sum(n for op, n in events if op == "all_gather") // STEPS
            assert sent * world_size >= 61 and sent * world_size < 61 + world_size * buckets
            assert grads_kept == (61 if stage == 1 else 0)   # stage 2 keeps only the chunks (in the master)


def test_zero_equals_torchs_zero_redundancy_optimizer():
    ours = labkit.launch(_zero_worker, "labkit", 1, 25.0, world_size=3, timeout=60)
    theirs = labkit.launch(_zero_worker, "torch", 1, 25.0, world_size=3, timeout=60)
    for (p_ours, *_), (p_theirs, *_) in zip(ours, theirs):
        for a, b in zip(p_ours, p_theirs):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_the_optimizer_state_is_split_over_the_ranks():
    one = labkit.launch(_zero_worker, "labkit", 1, 25.0, world_size=1, timeout=60)[0][3]
    three = [r[3] for r in labkit.launch(_zero_worker, "labkit", 1, 25.0, world_size=3, timeout=60)]
    # m, v and the master chunk: 3 numbers per parameter, padded to 3·⌈61/3⌉ = 63 over the ranks
    assert one == 3 * 61 * 8 and three == [3 * 21 * 8] * 3


def _bad(**kwargs):
    from labkit.zero import ZeroOptimizer
    ZeroOptimizer(_model().parameters(), _adamw, **kwargs)


@pytest.mark.parametrize("kwargs,match", [(dict(stage=3), "stage must be 1 or 2"),
                                          (dict(bucket_cap_mb=0), "bucket_cap_mb must be positive")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(labkit.WorkerError, match=match):
        labkit.launch(_bad, world_size=1, timeout=30, **kwargs)
