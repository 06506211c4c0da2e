"""labkit.ddp against torch's DistributedDataParallel and against one process on the full batch.

The model is small, in float64, and has everything that trips a DDP implementation up: a frozen
layer, a weight tied between the input embedding and the output, and a buffer. Every rank starts
from different random weights, so only a working broadcast at wrap time makes them agree. One launch
per world size runs every configuration (a launch costs a process start).
"""

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

import labkit
from labkit.ddp import BucketedDDP, NaiveDDP, OverlapDDP, plan_buckets

VOCAB, WIDTH, HIDDEN, BATCH, STEPS = 11, 6, 8, 4, 3
MB = 2 ** 20


class TiedNet(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)
        self.hidden = nn.Linear(WIDTH, HIDDEN)
        self.out = nn.Linear(HIDDEN, WIDTH)
        self.register_buffer("scale", torch.rand(WIDTH) + 0.5)
        self.double()

    def forward(self, tokens, targets):
        h = torch.tanh(self.frozen(self.emb(tokens)) * self.scale)
        h = self.out(torch.tanh(self.hidden(h)))
        logits = h @ self.emb.weight.t()           # the output layer is the embedding, transposed
        return nn.functional.cross_entropy(logits, targets)


def batch(step, rank, micro):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randint(0, VOCAB, (BATCH,), generator=g), torch.randint(0, VOCAB, (BATCH,), generator=g)


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


WRAPPERS = {
    "torch": lambda m: nn.parallel.DistributedDataParallel(m),
    "naive": NaiveDDP,
    "overlap": OverlapDDP,
    "bucketed, 1 bucket": lambda m: BucketedDDP(m, bucket_cap_mb=1.0),
    "bucketed, 2 buckets": lambda m: BucketedDDP(m, bucket_cap_mb=900 / MB),
    "bucketed, 1 parameter per bucket": lambda m: BucketedDDP(m, bucket_cap_mb=1e-9),
}
EXPECTED_BUCKETS = {"bucketed, 1 bucket": 1, "bucketed, 2 buckets": 2, "bucketed, 1 parameter per bucket": 5}


def train(wrapper, optimizer, accumulate):
    rank = dist.get_rank()
    model = WRAPPERS[wrapper](TiedNet(seed=rank))           # different weights on every rank
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(accumulate):
            last = micro == accumulate - 1
            with model.no_sync() if not last else contextlib.nullcontext():
                loss = model(*batch(step, rank, micro)) / accumulate
                loss.backward()
        opt.step()
    buckets = len(model.buckets) if isinstance(model, BucketedDDP) else None
    return {k: v.clone() for k, v in model.module.state_dict().items()}, buckets


def single_process(world_size, optimizer, accumulate):
    model = TiedNet(seed=0)
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad])
    for step in range(STEPS):
        opt.zero_grad()
        parts = [batch(step, r, k) for r in range(world_size) for k in range(accumulate)]
        tokens, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        model(tokens, targets).backward()
        opt.step()
    return model.state_dict()


CONFIGS = [(w, o, a) for w in WRAPPERS for o in ("sgd", "adamw") for a in (1, 2)]


def all_configs():
    torch.set_num_threads(1)
    return {config: train(*config) for config in CONFIGS}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_same_parameters_as_torch_ddp_and_as_one_process(world_size):
    results = labkit.launch(all_configs, world_size=world_size, timeout=120)
    problems = []
    for config in CONFIGS:
        wrapper, optimizer, accumulate = config
        states = [r[config][0] for r in results]
        reference = single_process(world_size, optimizer, accumulate)
        torch_ddp = results[0][("torch", optimizer, accumulate)][0]
        for name, value in states[0].items():
            if any(not torch.equal(s[name], value) for s in states[1:]):
                problems.append(f"{config}: {name} differs between ranks")
            if not torch.allclose(value, reference[name], rtol=0, atol=1e-10):
                problems.append(f"{config}: {name} differs from one process on the full batch by "
                                f"{(value - reference[name]).abs().max():.2e}")
            if not torch.allclose(value, torch_ddp[name], rtol=0, atol=1e-10):
                problems.append(f"{config}: {name} differs from torch's DDP")
        if wrapper in EXPECTED_BUCKETS:
            assert results[0][config][1] == EXPECTED_BUCKETS[wrapper], config
    assert problems == []
    # the training moved the weights (a check that compares nothing would also pass)
    start = TiedNet(seed=0).state_dict()
    assert not torch.allclose(results[0][("naive", "adamw", 2)][0]["hidden.weight"], start["hidden.weight"])
    assert torch.equal(results[0][("naive", "adamw", 2)][0]["frozen.weight"], start["frozen.weight"])


class UsedInReverse(nn.Module):
    """Layers registered in one order and used in the opposite one: ready order != reverse registration."""

    def __init__(self):
        super().__init__()
        self.c = nn.Linear(4, 4)     # registered first, used last: its gradient is ready first
        self.b = nn.Linear(4, 4)
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).pow(2).mean()


def bucket_order_and_timeline(kind):
    torch.manual_seed(0)
    one_weight = 16 * 4 / MB + 1e-12                         # a weight and its bias (80 B) do not fit
    model = {"bucketed": lambda m: BucketedDDP(m, bucket_cap_mb=one_weight, record_timeline=True),
             "overlap": lambda m: OverlapDDP(m, record_timeline=True),
             "naive": lambda m: NaiveDDP(m, record_timeline=True)}[kind](UsedInReverse())
    before = model.bucket_names if kind == "bucketed" else None
    for _ in range(2):
        model.timeline.clear()
        model(torch.randn(3, 4)).backward()
    after = model.bucket_names if kind == "bucketed" else None
    return before, after, model.timeline


def test_buckets_are_rebuilt_in_the_order_gradients_become_ready():
    before, after, _ = labkit.launch(bucket_order_and_timeline, "bucketed", world_size=2)[0]
    # the first guess is the reverse of registration: a, then b, then c
    assert [n.split(".")[0] for n in sum(before, [])] == ["a", "a", "b", "b", "c", "c"]
    # backward really runs c, b, a: after the first step the buckets follow it
    assert [n.split(".")[0] for n in sum(after, [])] == ["c", "c", "b", "b", "a", "a"]
    assert all(len(b) == 1 for b in after)                  # the cap puts one tensor per bucket


@pytest.mark.parametrize("kind,overlaps", [("bucketed", True), ("overlap", True), ("naive", False)])
def test_timeline_shows_communication_overlapping_backward(kind, overlaps):
    for _, _, timeline in labkit.launch(bucket_order_and_timeline, kind, world_size=2):
        grads = [e for e in timeline if e.kind == "grad"]
        reduces = [e for e in timeline if e.kind == "allreduce"]
        assert len(grads) == 6 and reduces
        assert all(e.end >= e.start for e in reduces)       # completion stamped by the comm thread
        last_grad = max(e.start for e in grads)
        assert (reduces[0].start < last_grad) == overlaps


def unused_parameter():
    model = BucketedDDP(UsedInReverse())
    loss = model.module.a(torch.randn(2, 4)).sum()          # b and c take no part
    loss.backward()


def test_a_parameter_without_gradient_is_named_on_every_rank():
    with pytest.raises(labkit.WorkerError) as info:
        labkit.launch(unused_parameter, world_size=2, timeout=30)
    message = str(info.value.exception)
    assert "got no gradient in this backward pass: c.weight, c.bias, b.weight, b.bias. Every" in message


def different_models():
    NaiveDDP(nn.Linear(4, 4 + dist.get_rank()))


def test_different_models_on_different_ranks_are_refused():
    with pytest.raises(labkit.WorkerError) as info:
        labkit.launch(different_models, world_size=2, timeout=30)
    assert "different models" in str(info.value.exception)


def no_sync_is_local():
    rank = dist.get_rank()
    model = OverlapDDP(nn.Linear(3, 1, bias=False))
    with model.no_sync():
        model(torch.full((1, 3), float(rank + 1))).sum().backward()
    local = model.module.weight.grad.clone()
    model(torch.full((1, 3), float(rank + 1))).sum().backward()
    return local, model.module.weight.grad.clone()


def test_no_sync_accumulates_locally_then_averages_the_sum():
    results = labkit.launch(no_sync_is_local, world_size=2)
    (local0, synced0), (local1, synced1) = results
    assert torch.equal(local0, torch.ones(1, 3)) and torch.equal(local1, torch.full((1, 3), 2.0))
    # rank r's accumulated gradient is 2(r+1); the mean over ranks is 3
    assert torch.equal(synced0, torch.full((1, 3), 3.0)) and torch.equal(synced1, synced0)


def test_bad_use_is_a_clear_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        NaiveDDP(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        BucketedDDP(nn.Linear(2, 2), bucket_cap_mb=0)
    with pytest.raises(TypeError, match="nn.Module"):
        NaiveDDP(lambda x: x)


def test_plan_buckets_cuts_by_size_in_the_order_given():
    params = [torch.zeros(n) for n in (10, 10, 30, 5, 5)]   # float32: 40, 40, 120, 20, 20 bytes
    sizes = lambda groups: [[p.numel() for p in g] for g in groups]
    assert sizes(plan_buckets(params, 80)) == [[10, 10], [30], [5, 5]]
    assert sizes(plan_buckets(params, 1)) == [[10], [10], [30], [5], [5]]
    assert sizes(plan_buckets(params, 10 ** 6)) == [[10, 10, 30, 5, 5]]
    mixed = [torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)]
    assert [len(g) for g in plan_buckets(mixed, 10 ** 6)] == [1, 2]  # one dtype per flat buffer


def gpt_all_versions():
    from labkit.models.gpt import GPT, GPTConfig
    torch.set_num_threads(1)
    rank = dist.get_rank()
    config = GPTConfig.preset("tiny", vocab_size=13, block_size=8)
    wrappers = {"torch": lambda m: nn.parallel.DistributedDataParallel(m, bucket_cap_mb=0.02),
                "naive": NaiveDDP, "overlap": OverlapDDP,
                "bucketed": lambda m: BucketedDDP(m, bucket_cap_mb=0.02)}
    out = {}
    for name, wrap in wrappers.items():
        torch.manual_seed(rank)                             # different on every rank: the broadcast fixes it
        model = wrap(GPT(config).double())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randint(0, 13, (2, 9), generator=g)
            opt.zero_grad()
            model(x[:, :-1], x[:, 1:])[1].backward()
            opt.step()
        out[name] = ({k: v.clone() for k, v in model.module.state_dict().items()},
                     len(model.buckets) if name == "bucketed" else None)
    return out


def test_the_gpt_with_its_tied_embedding_trains_the_same_as_under_torch_ddp():
    results = labkit.launch(gpt_all_versions, world_size=2, timeout=120)
    assert results[0]["bucketed"][1] > 2                    # several buckets
    reference = results[0]["torch"][0]
    for rank_result in results:
        for name, (state, _) in rank_result.items():
            for key, value in state.items():
                assert torch.allclose(value, reference[key], rtol=0, atol=1e-10), (name, key)
