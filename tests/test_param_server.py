"""The parameter server on real processes: synchronous mode is data-parallel SGD with all-reduce (same
parameters, any number of servers), asynchronous and bounded-staleness modes record the staleness
they allow, the traffic counters count every byte, and a worker that dies is reported, not hung on."""

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit.data_parallel import LinearRegression, make_linear_data
from labkit.param_server import shard_bounds, train

X, Y, _, _ = make_linear_data(240, 8, seed=0, dtype=torch.float64)
BATCH = 48


def model_fn():
    return LinearRegression(8, dtype=torch.float64)


def make_batch_fn(workers):
    def batch_fn(worker, step):
        idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(step))[:BATCH]
        return X[idx].chunk(workers)[worker], Y[idx].chunk(workers)[worker]
    return batch_fn


def loss_fn(model, xb, yb):
    return model.loss(xb, yb)


def _all_reduce_sgd(workers, steps, lr):
    """The same training with all-reduce data parallelism on `workers` processes: the parameters after."""
    model = model_fn()
    batch_fn = make_batch_fn(workers)
    for step in range(steps):
        model.zero_grad()
        loss_fn(model, *batch_fn(dist.get_rank(), step)).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= workers
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


@pytest.mark.parametrize("workers,servers", [(2, 1), (3, 2), (4, 3)])
def test_sync_equals_all_reduce_sgd(workers, servers):
    run = train(model_fn, make_batch_fn(workers), loss_fn, workers=workers, servers=servers, mode="sync",
                steps=6, lr=0.1, timeout=10)
    reference = labkit.launch(_all_reduce_sgd, workers, 6, 0.1, world_size=workers)[0]
    assert (run.params - reference).abs().max().item() < 1e-12
    assert run.stopped == "" and all(w.steps_done == 6 for w in run.workers)
    assert set(run.staleness) == {0} and len(run.staleness) == 6 * workers
    assert all(s.version == 6 for s in run.servers)
    # the loss each worker saw went down
    assert all(w.losses[-1].loss < w.losses[0].loss for w in run.workers)


def test_traffic_counters_count_every_byte():
    workers, servers, steps = 3, 2, 4
    run = train(model_fn, make_batch_fn(workers), loss_fn, workers=workers, servers=servers, mode="sync",
                steps=steps, lr=0.1)
    header = 4 * 8                        # (kind, worker, version, step) in int64
    for s, (a, b) in enumerate(shard_bounds(9, servers)):
        shard = (b - a) * 8
        # per worker and step: a pull header, a push header and the gradient shard in; done header at the end
        assert run.servers[s].bytes_in == workers * (steps * (2 * header + shard) + header)
        # per worker and step: the version (a float64) and the parameter shard out
        assert run.servers[s].bytes_out == workers * steps * (8 + shard)
        # the same, step by step (the workers' "done" headers count at step `steps`)
        assert run.servers[s].per_step == {**{t: [workers * (2 * header + shard), workers * (8 + shard)]
                                              for t in range(steps)}, steps: [workers * header, 0]}


@pytest.mark.parametrize("mode", ["async", "bounded"])
def test_asynchronous_modes_record_staleness(mode):
    run = train(model_fn, make_batch_fn(3), loss_fn, workers=3, servers=2, mode=mode, steps=8, lr=0.05,
                staleness=1, compute_ms=4, slow={0: 4.0})
    assert run.stopped == "" and all(w.steps_done == 8 for w in run.workers)
    for server in run.servers:
        assert server.version == 24 and len(server.updates) == 24
        assert all(stale >= 0 for *_, stale in server.updates)
    # the straggler's pushes are the stale ones: the others moved the parameters meanwhile
    slow = [u.staleness for u in run.servers[0].updates if u.worker == 0]
    assert max(slow) >= 2
    if mode == "bounded":
        # a worker may start step t only while it is at most 1 step ahead of the slowest: the fast ones
        # never finish more than 2 steps before the straggler's step
        order = [(u.worker, u.step) for u in run.servers[0].updates]
        for i, (worker, step) in enumerate(order):
            done_by_slow = sum(1 for w, _ in order[:i] if w == 0)
            assert step <= done_by_slow + 1, (worker, step, done_by_slow)
    assert all(w.losses[-1].loss < w.losses[0].loss for w in run.workers)


def test_a_dead_worker_stops_sync_with_a_clear_message():
    run = train(model_fn, make_batch_fn(3), loss_fn, workers=3, servers=1, mode="sync", steps=8, lr=0.1,
                timeout=1.5, die_at={1: 3})
    assert "no message from worker(s) [1]" in run.stopped and "waiting workers [0, 2]" in run.stopped
    assert run.servers[0].lost == [1] and run.servers[0].version == 3
    assert [w.steps_done for w in run.workers] == [4, 3, 4]   # the others pushed step 3, then waited
    assert "stopped the run" in run.workers[0].stopped


def test_a_dead_worker_does_not_stop_async():
    run = train(model_fn, make_batch_fn(3), loss_fn, workers=3, servers=1, mode="async", steps=8, lr=0.1,
                timeout=1.5, die_at={1: 3})
    assert run.stopped == "" and run.servers[0].lost == [1]
    assert [w.steps_done for w in run.workers] == [8, 3, 8]
    assert run.servers[0].version == 8 + 3 + 8


def test_shard_bounds():
    assert shard_bounds(9, 2) == [(0, 5), (5, 9)]
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="cannot cut 3 parameters into 4"):
        shard_bounds(3, 4)


def test_bad_arguments():
    with pytest.raises(labkit.WorkerError, match="unknown mode 'hogwild'"):
        train(model_fn, make_batch_fn(2), loss_fn, workers=1, servers=1, mode="hogwild", timeout=2)


def test_many_servers_and_workers_never_deadlock():
    # A stress test: no compute, so the pulls and pushes of 4 workers to 3 servers interleave as densely as
    # they can. Every server keeps listening (its replies are isends), so every message gets through.
    run = train(model_fn, make_batch_fn(4), loss_fn, workers=4, servers=3, mode="async", steps=40, lr=0.01,
                timeout=5.0)
    assert run.stopped == "" and [w.steps_done for w in run.workers] == [40] * 4
    assert [s.version for s in run.servers] == [160] * 3
    assert sum(s.shard.numel() for s in run.servers) == 9
