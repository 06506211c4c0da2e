"""The checkers of exercise 7 accept the solution notebook's server and worker loops and reject each known-wrong
version with a message that names the mistake: the sum instead of the mean (factor W), an update before all
gradients arrived, one receive buffer for all workers, stale parameters (pulled once, or never copied into the
model), a worker that never pushes, accumulated gradients, overlapping or gapped shards, messages to the wrong
rank; a hang is stopped with what every rank was doing, an exception shows that rank's traceback, and the
exercise notebook's stubs read as not written. A wrong version stops at the first configuration (3 workers,
2 servers), in one launch; the solution runs on every default configuration."""

import time
from pathlib import Path

import nbformat
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from labkit.checks import CheckFailed
from labkit.checks.ex07 import (CONFIGS, LR, STEPS, check_parameter_server, check_server, check_worker, make_batches,
                                make_model, sync_sgd)
from labkit.param_server import run_server as reference_server
from labkit.param_server import run_worker as reference_worker
from labkit.param_server import shard_bounds

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "07_parameter_server_exercise.ipynb"


def _namespace(folder="solutions"):
    """The notebook's import cell and its two function cells, run in a fresh namespace."""
    nb = nbformat.read(ROOT / folder / NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(compile(code[0], f"{folder}-imports", "exec"), namespace)
    for source in code:
        if source.startswith(("def run_server", "def run_worker")):
            exec(compile(source, f"{folder}-functions", "exec"), namespace)
    return namespace


SOLUTION = _namespace()
run_server, run_worker = SOLUTION["run_server"], SOLUTION["run_worker"]
set_flat_params, flat_params, flat_grad = SOLUTION["set_flat_params"], SOLUTION["flat_params"], SOLUTION["flat_grad"]
HEAD = "on 3 workers and 2 servers (5 processes): "


def assert_rejected(check, args, expected, **kwargs):
    """``check(*args)`` raises CheckFailed, and its message contains every text of ``expected``."""
    with pytest.raises(CheckFailed) as info:
        check(*args, **kwargs)
    for text in expected:
        assert text in str(info.value), str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# The solution passes; the stubs read as not written
# --------------------------------------------------------------------------------------------

def test_the_solution_passes_every_check(capsys):
    check_server(run_server)
    check_worker(run_worker)
    check_parameter_server(run_server, run_worker)
    lines = capsys.readouterr().out.split("\n")
    assert lines[0].startswith("✓ run_server is correct with labkit's workers on (W workers, S servers) = (3, 2), "
                               "(2, 1), (4, 1) and (3, 3), 4 steps each")
    assert lines[1].startswith("✓ run_worker is correct with labkit's servers on")
    assert lines[2].startswith("✓ run_server and run_worker are correct together on")
    assert lines[3:] == [""]


def test_the_references_are_all_reduce_sgd():
    """labkit's server and worker, run by hand as the check runs them, end at all-reduce SGD's parameters."""
    import labkit

    def entry(workers, servers):
        rank = dist.get_rank()
        model = make_model()
        flat = flat_params(model)
        if rank < servers:
            a, b = shard_bounds(flat.numel(), servers)[rank]
            return reference_server(flat[a:b].clone(), rank, servers, workers, STEPS, LR)
        reference_worker(model, make_batches(rank - servers), rank - servers, servers)

    for workers, servers in ((3, 2),):
        shards = labkit.launch(entry, workers, servers, world_size=workers + servers)[:servers]
        want = sync_sgd(workers)[-1]
        assert (torch.cat(shards) - want).abs().max().item() < 1e-12
        assert (want - sync_sgd(workers)[0]).abs().max().item() > 0.05   # the parameters did move


def test_the_exercise_stubs_are_reported_as_not_written_each_by_name():
    stubs = _namespace("exercises")
    with pytest.raises(NotImplementedError, match=r"^Exercise 7a: "):
        check_server(stubs["run_server"], configs=((2, 1),))
    with pytest.raises(NotImplementedError, match=r"^Exercise 7b: "):
        check_worker(stubs["run_worker"], configs=((2, 1),))
    with pytest.raises(NotImplementedError) as info:
        check_parameter_server(stubs["run_server"], stubs["run_worker"], configs=((2, 1),))
    message = str(info.value)
    assert "Exercise 7a: " in message and "Exercise 7b: " in message and "Not written yet either" in message
    # one written, one not: only the unwritten one is named
    with pytest.raises(NotImplementedError) as info:
        check_parameter_server(run_server, stubs["run_worker"], configs=((2, 1),))
    assert str(info.value).startswith("Exercise 7b: ") and "7a" not in str(info.value)


def test_a_students_own_not_implemented_is_worded():
    def my_server(shard, server, servers, workers, steps, lr):
        raise NotImplementedError

    with pytest.raises(NotImplementedError) as info:
        check_server(my_server, configs=((2, 1),))
    assert str(info.value) == ("Exercise 7a: my_server is not written yet (it raised NotImplementedError); see the "
                               "instructions above")


# --------------------------------------------------------------------------------------------
# The server (7a): the known-wrong versions
# --------------------------------------------------------------------------------------------

def server_sums(shard, server, servers, workers, steps, lr):
    for step in range(steps):
        for w in range(workers):
            dist.send(shard, dst=servers + w)
        grads = [torch.empty_like(shard) for _ in range(workers)]
        for w in range(workers):
            dist.recv(grads[w], src=servers + w)
        shard -= lr * torch.stack(grads).sum(dim=0)
    return shard


def server_applies_each_on_arrival(shard, server, servers, workers, steps, lr):
    """Answers a worker's pull, takes its gradient, applies it; then the next worker: asynchronous, not sync."""
    for step in range(steps):
        for w in range(workers):
            dist.send(shard, dst=servers + w)
            grad = torch.empty_like(shard)
            dist.recv(grad, src=servers + w)
            shard -= lr * grad / workers
    return shard


def server_one_buffer(shard, server, servers, workers, steps, lr):
    grad = torch.empty_like(shard)
    for step in range(steps):
        for w in range(workers):
            dist.send(shard, dst=servers + w)
        for w in range(workers):
            dist.recv(grad, src=servers + w)
        shard -= lr * grad
    return shard


def server_never_updates(shard, server, servers, workers, steps, lr):
    for step in range(steps):
        for w in range(workers):
            dist.send(shard, dst=servers + w)
        grads = [torch.empty_like(shard) for _ in range(workers)]
        for w in range(workers):
            dist.recv(grads[w], src=servers + w)
        shard - lr * torch.stack(grads).mean(dim=0)   # computed, never stored
    return shard


def server_skips_worker_0(shard, server, servers, workers, steps, lr):
    for step in range(steps):
        for w in range(workers):
            dist.send(shard, dst=servers + w)
        grads = [torch.empty_like(shard) for _ in range(workers)]
        for w in range(1, workers):
            dist.recv(grads[w], src=servers + w)
        shard -= lr * torch.stack(grads[1:]).mean(dim=0)
    return shard


def server_receives_first(shard, server, servers, workers, steps, lr):
    for step in range(steps):
        grads = [torch.empty_like(shard) for _ in range(workers)]
        for w in range(workers):
            dist.recv(grads[w], src=servers + w)
        shard -= lr * torch.stack(grads).mean(dim=0)
        for w in range(workers):
            dist.send(shard, dst=servers + w)
    return shard


def server_wrong_ranks(shard, server, servers, workers, steps, lr):
    for step in range(steps):
        for w in range(workers):
            dist.send(shard, dst=w)          # worker w is rank servers + w
    return shard


def server_broken(shard, server, servers, workers, steps, lr):
    for step in range(steps):
        for w in range(workers):
            dist.send(shard, dst=servers + w)
        grads = [torch.empty_like(shard) for _ in range(workers)]
        for w in range(workers):
            dist.recv(grads[w], src=servers + w)
        shard -= lr * grads.mean(dim=0)
    return shard


UPDATE = "Each step: shard -= lr · (1/W) Σ_w g_w, the mean of the 3 gradients received, applied once"


@pytest.mark.parametrize("server,expected", [
    (server_sums, ["server 0 answered worker 0's pull of step 1 with the wrong parameters: parameter 0 is ",
                   "The update of step 0 is wrong",
                   "the step is 3 times too large (measured factor 3 = W, the number of workers): server 0 applied "
                   "the sum of the 3 gradients, not their mean", UPDATE]),
    (server_applies_each_on_arrival,
     ["server 0 answered worker 1's pull of step 0 with the wrong parameters",
      "It sent worker 0 the right shard of step 0, then changed its shard before answering worker 1's pull of the "
      "same step: it applied a gradient before all 3 gradients of the step had arrived",
      "The parameters it sent worker 1 had already moved by worker 0's gradient of step 0 (lr · g / 3 each)",
      "Synchronous: send the shard to every worker, then receive all 3 gradients, then apply their mean"]),
    (server_one_buffer,
     ["server 0 answered worker 0's pull of step 1 with the wrong parameters",
      "the step is −lr · g with g worker 2's gradient alone: the other 2 gradients of the step were lost",
      "keep one buffer per worker"]),
    (server_never_updates,
     ["server 0 answered worker 0's pull of step 1", "The update of step 0 is wrong",
      "the shard did not change: server 0 sent the same parameters again"]),
], ids=["sum", "update-on-arrival", "one-buffer", "never-updates"])
def test_wrong_servers_are_named(server, expected):
    assert_rejected(check_server, (server,), [f"{server.__name__} (with labkit's workers) is wrong " + HEAD + expected[0],
                                              *expected[1:]])


def test_a_server_that_skips_a_workers_gradient_hangs_and_is_stopped_naming_who_waited():
    message = assert_rejected(check_server, (server_skips_worker_0,), [
        "waited 1 s in dist.send(dst=", "the run hung, and the check stopped it",
        "What every rank was doing at that moment:",
        "server 0 (rank 0): waiting in dist.send(dst=2) with server 0's shard of step 1",
        "→ server 0 went on to step 1 without receiving worker 0's gradient of step 0 (0 gradients from it in all)"],
        timeout=2)
    assert message.startswith("server_skips_worker_0 (with labkit's workers) is wrong " + HEAD)
    assert "worker 0 (rank 2): waiting in dist.send(dst=0) with worker 0's gradient of step 0 for server 0" in message


def test_a_server_that_receives_before_sending_deadlocks_and_is_explained():
    assert_rejected(check_server, (server_receives_first,), [
        "waited 1 s in dist.", "the run hung",
        "→ server 0 waits for worker 0's gradient of step 0 before it has sent that worker its shard of step 0, "
        "which the worker waits for first: each waits for the other"], timeout=2)


def test_a_message_to_the_wrong_rank_is_named():
    assert_rejected(check_server, (server_wrong_ranks,), [
        "server 0 (rank 0) called dist.send(dst=0): that is itself. Here the 2 servers are ranks 0 .. 1 (server s is rank s), the 3 workers ranks 2 .. 4 (worker w is rank "
        "servers + w = 2 + w)"])


def test_an_exception_in_the_server_shows_that_ranks_traceback():
    message = assert_rejected(check_server, (server_broken,), [
        "server_broken raised AttributeError on rank ", "'list' object has no attribute 'mean'",
        "--- traceback of rank "])
    assert "grads.mean(dim=0)" in message


# --------------------------------------------------------------------------------------------
# The worker (7b): the known-wrong versions
# --------------------------------------------------------------------------------------------

def _step(model, x, y):
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return flat_grad(model)


def worker_pulls_once(model, batches, worker, servers):
    flat = flat_params(model)
    bounds = shard_bounds(flat.numel(), servers)
    for step, (x, y) in enumerate(batches):
        if step == 0:
            for s, (a, b) in enumerate(bounds):
                dist.recv(flat[a:b], src=s)
            set_flat_params(model, flat)
        grad = _step(model, x, y)
        for s, (a, b) in enumerate(bounds):
            dist.send(grad[a:b], dst=s)


def worker_not_copying(model, batches, worker, servers):
    flat = flat_params(model)
    bounds = shard_bounds(flat.numel(), servers)
    for x, y in batches:
        for s, (a, b) in enumerate(bounds):
            dist.recv(flat[a:b], src=s)
        grad = _step(model, x, y)
        for s, (a, b) in enumerate(bounds):
            dist.send(grad[a:b], dst=s)


def worker_never_pushes(model, batches, worker, servers):
    flat = flat_params(model)
    bounds = shard_bounds(flat.numel(), servers)
    for x, y in batches:
        for s, (a, b) in enumerate(bounds):
            dist.recv(flat[a:b], src=s)
        set_flat_params(model, flat)
        _step(model, x, y)


def worker_no_zero_grad(model, batches, worker, servers):
    flat = flat_params(model)
    bounds = shard_bounds(flat.numel(), servers)
    for x, y in batches:
        for s, (a, b) in enumerate(bounds):
            dist.recv(flat[a:b], src=s)
        set_flat_params(model, flat)
        F.mse_loss(model(x), y).backward()
        grad = flat_grad(model)
        for s, (a, b) in enumerate(bounds):
            dist.send(grad[a:b], dst=s)


def worker_copies_after_backward(model, batches, worker, servers):
    flat = flat_params(model)
    bounds = shard_bounds(flat.numel(), servers)
    for x, y in batches:
        for s, (a, b) in enumerate(bounds):
            dist.recv(flat[a:b], src=s)
        grad = _step(model, x, y)
        set_flat_params(model, flat)
        for s, (a, b) in enumerate(bounds):
            dist.send(grad[a:b], dst=s)


def _with_bounds(bounds_fn):
    def worker(model, batches, worker, servers):
        flat = flat_params(model)
        bounds = bounds_fn(flat.numel(), servers)
        for x, y in batches:
            for s, (a, b) in enumerate(bounds):
                dist.recv(flat[a:b], src=s)
            set_flat_params(model, flat)
            grad = _step(model, x, y)
            for s, (a, b) in enumerate(bounds):
                dist.send(grad[a:b], dst=s)
    return worker


worker_overlapping = _with_bounds(lambda n, S: [(a, b + 1) for a, b in shard_bounds(n, S)])
worker_overlapping.__name__ = "worker_overlapping"
worker_gap = _with_bounds(lambda n, S: [(s * (n // S), (s + 1) * (n // S)) for s in range(S)])
worker_gap.__name__ = "worker_gap"


def worker_to_workers(model, batches, worker, servers):
    flat = flat_params(model)
    bounds = shard_bounds(flat.numel(), servers)
    for x, y in batches:
        for s, (a, b) in enumerate(bounds):
            dist.recv(flat[a:b], src=s)
        set_flat_params(model, flat)
        grad = _step(model, x, y)
        for s, (a, b) in enumerate(bounds):
            dist.send(grad[a:b], dst=servers + s)


def worker_float32(model, batches, worker, servers):
    flat = flat_params(model)
    bounds = shard_bounds(flat.numel(), servers)
    for x, y in batches:
        for s, (a, b) in enumerate(bounds):
            buffer = torch.empty(b - a)
            dist.recv(buffer, src=s)
            flat[a:b] = buffer


@pytest.mark.parametrize("worker,expected", [
    (worker_pulls_once,
     ["worker 0 (rank 2) pushes its gradient of step 1 to server 0, but it pulled server 0's shard only 1 time (last "
      "for step 0): it computed the gradient of step 1 on stale parameters, those of step 0",
      "in synchronous training every step starts with a pull from every server"]),
    (worker_not_copying,
     ["worker_not_copying (with labkit's servers) is wrong " + HEAD + "worker 0 pushed the wrong gradient at step 1: "
      "element 0 is ", "It is the gradient at the initial parameters θ_0: the shards worker 0 pulled never reached the "
      "model, which still holds θ_0", "set_flat_params(model, flat)"]),
    (worker_never_pushes,
     ["worker 0 (rank 2) pulls server 0's shard of step 1, but it has pushed server 0 only 0 gradients: its gradient "
      "of step 0 never went out. Server 0 waits for that gradient before it answers the pull of step 1, so both "
      "would wait forever"]),
    (worker_no_zero_grad,
     [HEAD + "worker 0 pushed the wrong gradient at step 1", "It is the sum of worker 0's gradients of steps 0 .. 1: "
      "backward adds to .grad, and the gradients were never zeroed. Call model.zero_grad()"]),
    (worker_copies_after_backward,
     [HEAD + "worker 0 pushed the wrong gradient at step 1", "It is the gradient at the parameters of step 0, one step "
      "behind"]),
    (worker_overlapping,
     ["worker 0 (rank 2) pulls server 0's shard into flat[0:13] (13 elements), but server 0 holds elements [0, 12) of "
      "the 23 parameters (12 elements: shard_bounds(23, 2)[0] = (0, 12)). Elements [12, 13) are in server 1's shard "
      "too: the shards overlap, and those parameters would be pulled from two servers and updated by both "
      "(flat[a:b + 1]: a Python slice already leaves its end out, [a, b) is flat[a:b]). Cut both the pulls and the "
      "pushes with a, b = shard_bounds(flat.numel(), servers)[s]"]),
    (worker_gap,
     ["worker 0 (rank 2) pulls server 0's shard into flat[0:11] (11 elements), but server 0 holds elements [0, 12)",
      "Elements [11, 12) are left out: a gap, those parameters would never be pulled or updated (23 // 2 = 11 "
      "elements per server: the last 1 parameter(s) then belong to no server"]),
    (worker_to_workers,
     ["worker 0 (rank 2) called dist.send(dst=2): that is itself"]),
    (worker_float32,
     ["worker 0 (rank 2): the buffer it pulls server 0's shard into is a torch.float32 tensor; the parameters and their "
      "gradients are torch.float64"]),
], ids=["pulls-once", "not-copying", "never-pushes", "no-zero-grad", "copies-after-backward", "overlap", "gap",
        "sends-to-a-worker", "float32"])
def test_wrong_workers_are_named(worker, expected):
    assert_rejected(check_worker, (worker,), expected)


def test_a_worker_stuck_in_its_own_code_is_stopped_naming_who_waited():
    def worker_stuck(model, batches, worker, servers):
        if worker == 1:
            time.sleep(60)
        run_worker(model, batches, worker, servers)

    start = time.perf_counter()
    message = assert_rejected(check_worker, (worker_stuck,), [
        "waited 1 s in dist.", "the run hung, and the check stopped it",
        "worker 1 (rank 3): running its own code (no send or receive) for "],
        timeout=2)
    assert time.perf_counter() - start < 15
    assert "server 0 (rank 0): waiting in dist.send(dst=3) with server 0's shard of step 0" in message


# --------------------------------------------------------------------------------------------
# Both of the student's functions together
# --------------------------------------------------------------------------------------------

def test_together_a_wrong_piece_is_named():
    assert_rejected(check_parameter_server, (server_sums, run_worker), [
        "server_sums and run_worker are wrong together " + HEAD,
        "the step is 3 times too large (measured factor 3 = W, the number of workers)"])
    assert_rejected(check_parameter_server, (run_server, worker_gap), ["Elements [11, 12) are left out: a gap"])


def test_nonblocking_sends_and_receives_and_any_source_are_accepted(capsys):
    """isend/irecv (waited later) and a receive from any source work through the checker's wrappers."""
    def server_nonblocking(shard, server, servers, workers, steps, lr):
        for step in range(steps):
            for request in [dist.isend(shard, dst=servers + w) for w in range(workers)]:
                request.wait()
            grads = [torch.empty_like(shard) for _ in range(workers)]
            for g in grads:
                dist.recv(g)                              # from whichever worker is first: the mean is the same
            shard -= lr * torch.stack(grads).mean(dim=0)
        return shard

    def worker_nonblocking(model, batches, worker, servers):
        flat = flat_params(model)
        bounds = shard_bounds(flat.numel(), servers)
        for x, y in batches:
            for request in [dist.irecv(flat[a:b], src=s) for s, (a, b) in enumerate(bounds)]:
                request.wait()
            set_flat_params(model, flat)
            grad = _step(model, x, y)
            for request in [dist.isend(grad[a:b], dst=s) for s, (a, b) in enumerate(bounds)]:
                request.wait()

    check_parameter_server(server_nonblocking, worker_nonblocking, configs=((3, 2),))
    assert capsys.readouterr().out.startswith("✓ server_nonblocking and worker_nonblocking are correct together")


def test_not_functions_are_refused():
    with pytest.raises(CheckFailed, match=r"pass your function itself: check_server\(run_server\), not a int"):
        check_server(3)


def test_configurations_cover_odd_counts():
    assert CONFIGS[0] == (3, 2) and {(2, 1), (4, 1), (3, 3)} <= set(CONFIGS)
