"""labkit.data_parallel and labkit.local_sgd (lesson 1).

Unit: shard_indices is DistributedSampler; the weighted mean of shard gradients is the full-batch gradient.
Multi-process (real gloo processes, world sizes 1-4): every way of combining shard gradients equals the
full-batch gradient when it should, data-parallel SGD equals single-process SGD, replicas stay identical,
and parameter averaging equals gradient averaging exactly when the lesson says it does.
"""

import math

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import labkit
from labkit.data_parallel import (LinearRegression, average_gradients, broadcast_parameters, flat_grad,
                                  flat_params, make_linear_data, server_average_gradients, shard_indices,
                                  weighted_average_gradients)
from labkit.local_sgd import averaging_gap

WORLD_SIZES = [1, 2, 3, 4]
TIGHT = dict(rtol=0, atol=1e-12)  # float64: equal up to rounding


def full_batch_gradient(X, y, w0=0.5):
    model = LinearRegression(X.shape[1], dtype=X.dtype)
    with torch.no_grad():
        model.w.fill_(w0)
    model.loss(X, y).backward()
    return flat_grad(model)


# --------------------------------------------------------------------------------------------
# Sharding (single process)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_shard_indices_equals_distributed_sampler(drop_last, shuffle):
    mode = "drop" if drop_last else "pad"
    for n in list(range(0, 20)) + [97, 128]:          # includes n = 0 and n < world_size
        for world_size in range(1, 7):
            for epoch in (0, 1, 5):
                for rank in range(world_size):
                    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                 seed=3, drop_last=drop_last)
                    sampler.set_epoch(epoch)
                    ours = shard_indices(n, rank, world_size, epoch=epoch, seed=3, shuffle=shuffle, mode=mode)
                    assert ours == list(sampler), dict(n=n, world_size=world_size, epoch=epoch, rank=rank)


def test_epoch_reshuffles_and_same_epoch_repeats():
    assert shard_indices(100, 1, 4, epoch=0) == shard_indices(100, 1, 4, epoch=0)
    assert shard_indices(100, 1, 4, epoch=0) != shard_indices(100, 1, 4, epoch=1)
    assert sorted(shard_indices(100, 1, 4, epoch=0)) != sorted(shard_indices(100, 1, 4, epoch=1))


@pytest.mark.parametrize("world_size", range(1, 8))
def test_uneven_mode_is_disjoint_and_complete(world_size):
    for n in range(0, 40):
        shards = [shard_indices(n, r, world_size, epoch=2, mode="uneven") for r in range(world_size)]
        flat = [i for s in shards for i in s]
        assert sorted(flat) == list(range(n))                       # complete, and no index twice
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world_size", range(1, 8))
def test_pad_and_drop_sizes(world_size):
    for n in range(1, 40):
        pad = [shard_indices(n, r, world_size, mode="pad") for r in range(world_size)]
        drop = [shard_indices(n, r, world_size, mode="drop") for r in range(world_size)]
        assert all(len(s) == math.ceil(n / world_size) for s in pad)
        assert set(i for s in pad for i in s) == set(range(n))       # every sample, some twice
        assert all(len(s) == n // world_size for s in drop)
        flat = [i for s in drop for i in s]
        assert len(flat) == len(set(flat))                           # disjoint, tail dropped


def test_shard_indices_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shard_indices(10, 4, 4)
    with pytest.raises(ValueError):
        shard_indices(10, 0, 0)
    with pytest.raises(ValueError):
        shard_indices(10, 0, 2, mode="round-robin")


def test_weighted_mean_of_shard_gradients_is_the_full_batch_gradient():
    """Claim 2 in one process: sum_i B_i g_i / sum_i B_i is exact, the plain mean is off by
    sum_i (1/N - B_i/B) g_i."""
    X, y, _, _ = make_linear_data(300, 5, seed=1, dtype=torch.float64)
    g_full = full_batch_gradient(X, y)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    sizes = [150, 90, 50, 10]
    shards = torch.split(perm, sizes)
    g = [full_batch_gradient(X[s], y[s]) for s in shards]
    weighted = sum(b * gi for b, gi in zip(sizes, g)) / sum(sizes)
    plain = sum(g) / len(g)
    torch.testing.assert_close(weighted, g_full, **TIGHT)
    assert (plain - g_full).abs().max() > 1e-3
    bias = sum((1 / len(g) - b / sum(sizes)) * gi for b, gi in zip(sizes, g))
    torch.testing.assert_close(plain - g_full, bias, **TIGHT)
    # Equal shards: the plain mean is exact.
    equal = [full_batch_gradient(X[s], y[s]) for s in torch.split(perm, 75)]
    torch.testing.assert_close(sum(equal) / 4, g_full, **TIGHT)


def test_flat_params_is_a_snapshot():
    model = LinearRegression(3)
    snap = flat_params(model)
    with torch.no_grad():
        model.w += 1
    assert torch.equal(snap, torch.zeros(4))


# --------------------------------------------------------------------------------------------
# Multi-process: gradients
# --------------------------------------------------------------------------------------------

def _combined_gradients(X, y, mode):
    """Each rank: g_i on its shard, combined by all-reduce mean, server mean and weighted mean."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    idx = shard_indices(len(X), rank, world_size, epoch=1, mode=mode)
    model = LinearRegression(X.shape[1], dtype=X.dtype)
    with torch.no_grad():
        model.w.fill_(0.5)
    out = {}
    for name, combine in [("allreduce", average_gradients), ("server", server_average_gradients),
                          ("weighted", lambda m: weighted_average_gradients(m, len(idx)))]:
        model.zero_grad()
        model.loss(X[idx], y[idx]).backward()
        combine(model)
        out[name] = flat_grad(model).clone()
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_averaged_gradients_equal_the_full_batch_gradient(world_size):
    X, y, _, _ = make_linear_data(120, 6, seed=2, dtype=torch.float64)  # 120: equal shards for N = 1..4
    results = labkit.launch(_combined_gradients, X, y, "drop", world_size=world_size)
    g_full = full_batch_gradient(X, y)
    for rank, out in enumerate(results):
        for name in ("allreduce", "server", "weighted"):
            torch.testing.assert_close(out[name], g_full, **TIGHT, msg=f"{name} on rank {rank}")
        torch.testing.assert_close(out["server"], out["allreduce"], **TIGHT)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_weighted_average_is_exact_for_uneven_shards(world_size):
    X, y, _, _ = make_linear_data(101, 6, seed=3, dtype=torch.float64)  # 101: unequal shards for N = 2..4
    results = labkit.launch(_combined_gradients, X, y, "uneven", world_size=world_size)
    g_full = full_batch_gradient(X, y)
    for out in results:
        torch.testing.assert_close(out["weighted"], g_full, **TIGHT)
        torch.testing.assert_close(out["server"], out["allreduce"], **TIGHT)
        plain_error = (out["allreduce"] - g_full).abs().max().item()
        if world_size == 1:
            assert plain_error < 1e-12
        else:
            assert plain_error > 1e-6  # the plain mean of unequal shards is biased


# --------------------------------------------------------------------------------------------
# Multi-process: training
# --------------------------------------------------------------------------------------------

def _train(X, y, sync_name, epochs=2, global_batch=24, lr=0.1):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sync = {"allreduce": average_gradients, "server": server_average_gradients}[sync_name]
    torch.manual_seed(100 + rank)                  # different on purpose: the broadcast must fix it
    model = LinearRegression(X.shape[1], dtype=X.dtype)
    torch.nn.init.normal_(model.w)
    broadcast_parameters(model, src=0)
    start = flat_params(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    local_batch = global_batch // world_size
    for epoch in range(epochs):
        mine = shard_indices(len(X), rank, world_size, epoch=epoch, mode="drop")
        for i in range(0, len(mine), local_batch):
            idx = mine[i:i + local_batch]
            opt.zero_grad()
            model.loss(X[idx], y[idx]).backward()
            sync(model)
            opt.step()
    return start, flat_params(model)


def _train_single(X, y, w0, epochs=2, global_batch=24, lr=0.1):
    model = LinearRegression(X.shape[1], dtype=X.dtype)
    with torch.no_grad():
        model.w.copy_(w0[:-1])
        model.b.copy_(w0[-1])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(epochs):
        order = shard_indices(len(X), 0, 1, epoch=epoch)
        for i in range(0, len(order), global_batch):
            idx = order[i:i + global_batch]
            opt.zero_grad()
            model.loss(X[idx], y[idx]).backward()
            opt.step()
    return flat_params(model)


@pytest.mark.parametrize("sync_name", ["allreduce", "server"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_data_parallel_sgd_equals_single_process_and_replicas_stay_identical(world_size, sync_name):
    X, y, _, _ = make_linear_data(96, 5, seed=4, dtype=torch.float64)  # 96 / 24 = 4 steps per epoch
    results = labkit.launch(_train, X, y, sync_name, world_size=world_size)
    starts = [r[0] for r in results]
    ends = [r[1] for r in results]
    torch.manual_seed(100)
    expected_start = torch.cat([torch.nn.init.normal_(torch.zeros(5, dtype=torch.float64)),
                                torch.zeros(1, dtype=torch.float64)])
    assert all(torch.equal(s, expected_start) for s in starts)          # broadcast: rank 0's init everywhere
    assert all(torch.equal(e, ends[0]) for e in ends)                   # replicas bitwise identical
    assert (ends[0] - starts[0]).abs().max() > 1e-2                     # it did train
    torch.testing.assert_close(ends[0], _train_single(X, y, expected_start), **TIGHT)


# --------------------------------------------------------------------------------------------
# Multi-process: parameter averaging versus gradient averaging
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_parameter_averaging_equals_gradient_averaging_only_when_it_should(world_size):
    X, y, _, _ = make_linear_data(96, 4, seed=5, dtype=torch.float64)
    gaps = averaging_gap(X, y, world_size, local_steps=(1, 2), rounds=3, lr=0.05)
    reset = averaging_gap(X, y, world_size, optimizers=("momentum",), local_steps=(1,), rounds=3, lr=0.05,
                          reset_state=True)
    for gap in list(gaps.values()) + list(reset.values()):
        assert gap.shape == (4,) and gap[0] == 0
    # Exact: one plain-SGD step per round; momentum with one step per round and the state kept.
    assert gaps["sgd", 1].max() < 1e-12
    assert gaps["momentum", 1].max() < 1e-12
    if world_size == 1:  # nothing to average: every variant is the same algorithm
        assert all(gap.max() < 1e-12 for gap in gaps.values())
        return
    assert gaps["sgd", 2][1] > 1e-6               # k = 2 local steps: different after the first round
    assert gaps["momentum", 2][1] > 1e-6
    # Adam: different even with k = 1. Its first step is about -lr·sign(g_i), so when every shard's
    # gradient has the same signs (as here on 2 and 3 ranks) round 1 agrees up to eps; round 2 cannot.
    assert gaps["adam", 1][1:].max() > 1e-3
    assert reset["momentum", 1][1] < 1e-12        # restarted momentum: same first step (fresh state)...
    assert reset["momentum", 1][2] > 1e-6         # ...then it is plain SGD, not momentum SGD
