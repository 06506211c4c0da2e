"""labkit.layer_split: the partition rule, and a model cut over 2, 3 and 4 processes against one process.

The model is an nn.Sequential of Linear + Tanh layers of different widths (so the activations that
cross a stage boundary have different shapes), in float64. Every rank builds it from the same seed
and keeps its stage; two SGD steps later every parameter must equal the one-process run's.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import labkit
from labkit.layer_split import busy_fraction, busy_fractions, partition, stage_module, train_step

WIDTHS = [6, 9, 5, 8, 7, 4]            # 5 Linear layers, each followed by Tanh: 10 modules
BATCH, STEPS, LR = 5, 2, 0.3


def make_model():
    torch.manual_seed(0)
    layers = []
    for w_in, w_out in zip(WIDTHS, WIDTHS[1:]):
        layers += [nn.Linear(w_in, w_out), nn.Tanh()]
    return nn.Sequential(*layers).double()


def data(step):
    g = torch.Generator().manual_seed(step)
    return (torch.randn(BATCH, WIDTHS[0], generator=g, dtype=torch.float64),
            torch.randn(BATCH, WIDTHS[-1], generator=g, dtype=torch.float64))


# --- partition --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", range(1, 13))
def test_equal_layers_split_like_numpy_array_split(n):
    for stages in range(1, n + 1):
        ranges = partition(n, stages)
        assert [len(r) for r in ranges] == [len(a) for a in np.array_split(np.arange(n), stages)]
        assert [i for r in ranges for i in r] == list(range(n))          # contiguous, in order, all


def test_costs_minimise_the_most_expensive_stage():
    assert partition([4, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]         # 4 | 4, not 5 | 3
    assert partition([1, 1, 1, 1, 4], 2) == [range(0, 4), range(4, 5)]
    assert partition([1, 2, 3, 4, 5, 6], 3) == [range(0, 3), range(3, 5), range(5, 6)]  # 6 | 9 | 6
    assert partition([0, 0, 5], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    # against every possible cut of a small random problem: no cut has a smaller bottleneck
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = rng.integers(1, 10, size=7).tolist()
        ranges = partition(costs, 3)
        bottleneck = max(sum(costs[i] for i in r) for r in ranges)
        best = min(max(sum(costs[:a]), sum(costs[a:b]), sum(costs[b:]))
                   for a in range(1, 6) for b in range(a + 1, 7))
        assert bottleneck == best


def test_partition_errors():
    with pytest.raises(ValueError, match="cannot cut 3 layers into 4 stages"):
        partition(3, 4)
    with pytest.raises(ValueError, match="cannot cut 2 layers into 3 stages"):
        partition([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="positive"):
        partition(3, 0)
    with pytest.raises(ValueError, match="negative"):
        partition([1, -1], 1)
    with pytest.raises(ValueError, match="3 costs for 10 layers"):
        stage_module(make_model(), 0, 2, costs=[1, 2, 3])


def test_stage_module_shares_the_layers_and_keeps_their_names():
    model = make_model()
    stages = [stage_module(model, r, 3) for r in range(3)]
    assert [len(s) for s in stages] == [4, 3, 3]
    assert stages[1][0] is model[4]
    assert [n for s in stages for n, _ in s.named_parameters()] == [n for n, _ in model.named_parameters()]
    x = data(0)[0]
    assert torch.equal(stages[2](stages[1](stages[0](x))), model(x))


# --- the distributed step -------------------------------------------------------------------------------------

def split_training():
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    stage = stage_module(make_model(), rank, world)
    opt = torch.optim.SGD(stage.parameters(), lr=LR)
    losses, timelines = [], []
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        loss, timeline = train_step(stage, x if rank == 0 else None, y if rank == world - 1 else None,
                                    nn.functional.mse_loss)
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
        opt.step()
        losses.append(loss)
        timelines.append(timeline)
    return losses, first_grads, dict(stage.named_parameters()), timelines


def one_process():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach())
    return losses, first_grads, dict(model.named_parameters())


def expected_kinds(rank, world):
    recv_input = ["recv"] if rank > 0 else []
    send_output = ["send", "recv"] if rank < world - 1 else []     # send forward, wait for the gradient
    send_grad = ["send"] if rank > 0 else []
    return recv_input + ["forward"] + send_output + ["backward"] + send_grad


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_layer_split_equals_one_process(world_size):
    results = labkit.launch(split_training, world_size=world_size, timeout=60)
    losses, grads, params = one_process()

    # the loss lives on the last rank only
    assert all(loss is None for r in results[:-1] for loss in r[0])
    for got, expected in zip(results[-1][0], losses):
        assert abs(got.item() - expected.item()) <= 1e-12
    # every gradient of the first step, and every parameter after the steps, gathered from the stages
    split_grads = {n: g for r in results for n, g in r[1].items()}
    split_params = {n: p for r in results for n, p in r[2].items()}
    assert split_grads.keys() == grads.keys() and split_params.keys() == params.keys()
    for name in grads:
        assert (split_grads[name] - grads[name]).abs().max() <= 1e-12, name
        assert (split_params[name] - params[name]).abs().max() <= 1e-12, name
    assert all(g.abs().max() > 0 for g in grads.values())

    for step in range(STEPS):
        timelines = [r[3][step] for r in results]
        for rank, timeline in enumerate(timelines):
            assert [e.kind for e in timeline] == expected_kinds(rank, world_size), rank
            assert all(a.end <= b.start for a, b in zip(timeline, timeline[1:]))   # one after another
        # the chain: a stage's forward ends after its predecessor's, its backward after its successor's
        forward = [next(e for e in t if e.kind == "forward") for t in timelines]
        backward = [next(e for e in t if e.kind == "backward") for t in timelines]
        assert all(a.end <= b.start for a, b in zip(forward, forward[1:]))
        assert all(b.end <= a.start for a, b in zip(backward, backward[1:]))
        fractions = busy_fractions(timelines)
        assert all(0 < f < 1 for f in fractions)
        assert sum(fractions) <= 1 + 1e-9     # one rank computes at a time: they add up to at most 1


def test_busy_fraction_of_a_made_up_timeline():
    from labkit.layer_split import Event
    timeline = [Event("recv", 0.0, 2.0), Event("forward", 2.0, 3.0), Event("send", 3.0, 3.5),
                Event("backward", 4.0, 6.0)]
    assert busy_fraction(timeline) == 3.0 / 6.0
    assert busy_fraction(timeline, 0.0, 10.0) == 0.3
    assert busy_fractions([timeline, [Event("forward", 6.0, 12.0)]]) == [0.25, 0.5]
