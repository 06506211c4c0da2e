"""labkit.compression: PowerSGD equals torch's powerSGD_hook, the casts equal torch's compress hooks, top-k carries
what it does not send; every hook runs under torch's DDP and labkit's HookedDDP alike."""

import gc

import pytest
import torch
import torch.distributed as dist
from torch import nn

import labkit
from labkit.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
STEPS = 4


def _train(ddp_kind, hook_name, **kwargs):
    """STEPS SGD steps of a float64 GPT under a DDP with a communication hook; the parameters and the bytes sent."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd

    from labkit import comm, compression
    from labkit.ddp_hooks import HookedDDP

    torch.manual_seed(0)
    model = GPT(CONFIG).double()
    ddp = HookedDDP(model) if ddp_kind == "labkit" else nn.parallel.DistributedDataParallel(model)
    dtype = kwargs.get("dtype", torch.float16)
    state, hook = {
        "torch_powersgd": lambda: (torch_powersgd.PowerSGDState(None, matrix_approximation_rank=kwargs["r"],
                                                                start_powerSGD_iter=2, random_seed=0),
                                   torch_powersgd.powerSGD_hook),
        "powersgd": lambda: (compression.PowerSGDState(rank=kwargs["r"], start_iter=2, seed=0),
                             compression.powersgd_hook),
        "torch_cast": lambda: (None, default_hooks.fp16_compress_hook if dtype == torch.float16
                               else default_hooks.bf16_compress_hook),
        "cast": lambda: (compression.CastState(dtype=dtype), compression.cast_hook),
        "topk": lambda: (compression.TopKState(ratio=0.05), compression.topk_hook),
        "allreduce": lambda: (None, compression.allreduce_hook),
        "none": lambda: (None, None),
    }[hook_name]()
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(dist.get_rank())
    with comm.record() as events:
        for _ in range(STEPS):
            x = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.block_size), generator=g)
            opt.zero_grad()
            ddp(x, torch.roll(x, -1, 1))[1].backward()
            opt.step()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    del ddp, opt, state, hook       # torch's hooks leave futures whose last reference must not die on a gloo thread
    gc.collect()
    dist.barrier()
    return params, [(e.op, e.bytes) for e in events]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("r", [1, 3])
def test_powersgd_takes_the_steps_of_torchs_hook(r):
    theirs = [p for p, _ in labkit.launch(_train, "torch", "torch_powersgd", r=r, world_size=3, timeout=60)]
    ours = labkit.launch(_train, "torch", "powersgd", r=r, world_size=3, timeout=60)
    assert _max_diff(theirs, [p for p, _ in ours]) < 1e-12
    assert _max_diff([ours[0][0]], [ours[1][0]]) == 0.0            # the replicas stay identical


def test_powersgd_sends_rank_r_factors_after_the_first_steps():
    (params, events), *_ = labkit.launch(_train, "labkit", "powersgd", r=1, world_size=2, timeout=60)
    psi = params.numel()
    per_step = [b for op, b in events if op == "all_reduce"]
    full = sum(per_step[:1])                       # steps 1-2: the whole bucket
    assert full == psi * 8
    compressed = sum(per_step[-3:])                # a later step: the small tensors, Σ P, Σ Q
    assert compressed < full / 5


def test_labkit_hooks_give_the_same_steps_under_both_ddps():
    # top-k from the first step: both DDPs rebuild their buckets after it, and the residual is dropped then
    for hook, kwargs in (("powersgd", {"r": 2}), ("cast", {}), ("topk", {})):
        a = labkit.launch(_train, "torch", hook, world_size=2, timeout=60, **kwargs)
        b = labkit.launch(_train, "labkit", hook, world_size=2, timeout=60, **kwargs)
        assert _max_diff([p for p, _ in a], [p for p, _ in b]) < 1e-12, hook


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_cast_equals_torchs_compress_hook_and_sends_16_bits(dtype):
    ours = labkit.launch(_train, "torch", "cast", dtype=dtype, world_size=2, timeout=60)
    plain = labkit.launch(_train, "torch", "allreduce", world_size=2, timeout=60)
    if dtype == torch.float16:          # torch's bf16_compress_hook needs NCCL (it refuses gloo)
        theirs = labkit.launch(_train, "torch", "torch_cast", dtype=dtype, world_size=2, timeout=60)
        assert _max_diff([p for p, _ in theirs], [p for p, _ in ours]) == 0.0
    assert 0 < _max_diff([p for p, _ in ours], [p for p, _ in plain]) < 1e-2
    cast_bytes = sum(b for _, b in ours[0][1])
    assert cast_bytes * 4 == sum(b for _, b in plain[0][1])           # float64 → 16 bits: a quarter


def _topk_steps(ratio, error_feedback, steps=3):
    """The hook alone on one bucket of 20 numbers: what each step sends, what it keeps."""
    from labkit import comm
    from labkit.compression import TopKState, topk_hook
    from labkit.ddp import Bucket
    from labkit.ddp_hooks import GradBucket

    rank, n = dist.get_rank(), dist.get_world_size()
    state = TopKState(ratio=ratio, error_feedback=error_feedback)
    p = nn.Parameter(torch.zeros(20, dtype=torch.float64))
    out = []
    for step in range(steps):
        grad = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + rank))
        owed = state.residual.get(0, torch.zeros(20, dtype=torch.float64))
        bucket = Bucket([p], grad.clone(), [0])
        with comm.record() as events:
            averaged = topk_hook(state, GradBucket(0, bucket, True)).wait()
        exact = grad + owed
        everyone = [torch.empty_like(exact) for _ in range(n)]
        comm.all_gather(everyone, exact)
        out.append(dict(averaged=averaged.clone(), exact=exact, everyone=everyone, residual=state.residual.get(0),
                        bytes=sum(e.bytes for e in events)))
    return out


def test_topk_sends_k_values_and_indices_and_keeps_the_rest():
    results = labkit.launch(_topk_steps, 0.2, True, world_size=3, timeout=60)
    for rank_steps in results:
        for s in rank_steps:
            k = 4
            assert s["bytes"] == k * 8 + k * 8                           # k float64 values, k int64 indices
            sent = s["exact"] - s["residual"]                            # g + e_old = sent + e_new
            assert int((sent != 0).sum()) == k
            kept = s["exact"].abs().sort(descending=True).values
            assert s["residual"].abs().max() <= kept[k - 1]              # what stays is never larger than what went
    # every rank gets (1/N) Σ_i sent_i: the average of what each rank sent
    for step in range(3):
        sents = []
        for rank_steps in results:
            s = rank_steps[step]
            sents.append(s["exact"] - s["residual"])
        want = sum(sents) / len(sents)
        for rank_steps in results:
            assert torch.allclose(rank_steps[step]["averaged"], want, atol=1e-15)


def test_topk_without_error_feedback_keeps_nothing_and_ratio_one_is_the_all_reduce():
    for rank_steps in labkit.launch(_topk_steps, 0.2, False, world_size=2, timeout=60):
        assert all(s["residual"] is None for s in rank_steps)
    for rank_steps in labkit.launch(_topk_steps, 1.0, True, world_size=2, timeout=60):
        for s in rank_steps:
            assert torch.allclose(s["averaged"], sum(s["everyone"]) / 2, atol=1e-15)
            assert (s["residual"] == 0).all()


def test_a_second_hook_is_refused():
    def worker():
        from labkit.compression import allreduce_hook
        from labkit.ddp_hooks import HookedDDP
        ddp = HookedDDP(nn.Linear(2, 2))
        ddp.register_comm_hook(None, allreduce_hook)
        ddp.register_comm_hook(None, allreduce_hook)

    with pytest.raises(labkit.WorkerError, match="once"):
        labkit.launch(worker, world_size=1, timeout=30)
