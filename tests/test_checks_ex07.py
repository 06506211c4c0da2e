"""The checkers of exercise 7 accept the solution notebook's server and worker loops and reject each known-wrong
version with a message that names the mistake. The wrong versions are small edits of labkit's own run_server and
run_worker: every row of the checker's tables (ARRIVAL_MISTAKES, UPDATE_MISTAKES, PUSH_MISTAKES: an update before
all gradients arrived, the sum instead of the mean, one receive buffer for all workers, no step, stale or never
copied parameters, accumulated gradients, ...) is built from its own edits and must be named with its own words;
so are the mistakes found while the messages go (a worker that never pushes or pulls only once, overlapping or
gapped shards, messages to the wrong rank, a float32 buffer). A hang is stopped with what every rank was doing,
an exception shows that rank's traceback, and the exercise notebook's stubs read as not written. A wrong version
stops at the first configuration (3 workers, 2 servers), in one launch; the solution runs on every default
configuration."""

import inspect
import re
import textwrap
import time
from pathlib import Path

import pytest
from notebook_code import code_cells, imports_without_pyplot
import torch
import torch.distributed as dist
import torch.nn.functional as F

from labkit.checks import CheckFailed
from labkit.checks.ex07 import (ARRIVAL_MISTAKES, CONFIGS, LR, PUSH_MISTAKES, STEPS, UPDATE_MISTAKES,
                                check_parameter_server, check_server, check_worker, make_batches, make_model, sync_sgd)
from labkit.param_server import run_server as reference_server
from labkit.param_server import run_worker as reference_worker
from labkit.param_server import shard_bounds

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "07_parameter_server_exercise.ipynb"


def _namespace(folder="solutions"):
    """The notebook's import cell and its two function cells, run in a fresh namespace."""
    code = code_cells(ROOT / folder / NOTEBOOK)
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(compile(imports_without_pyplot(code[0]), f"{folder}-imports", "exec"), namespace)
    for source in code:
        if source.startswith(("def run_server", "def run_worker")):
            exec(compile(source, f"{folder}-functions", "exec"), namespace)
    return namespace


SOLUTION = _namespace()
run_server, run_worker = SOLUTION["run_server"], SOLUTION["run_worker"]
set_flat_params, flat_params, flat_grad = SOLUTION["set_flat_params"], SOLUTION["flat_params"], SOLUTION["flat_grad"]
HEAD = "on 3 workers and 2 servers (5 processes): "


def mutant(fn, edits, name):
    """labkit's ``fn`` with each edit (code, replacement) made on the one line that holds the code: a wrong
    version as a small change of labkit's implementation."""
    source = textwrap.dedent(inspect.getsource(fn))
    for code, replacement in edits:
        assert source.count(code) == 1, f"{code!r} is not once in {fn.__name__}'s source"
        source = source.replace(code, replacement)
    namespace = {**vars(inspect.getmodule(fn)), "__name__": "__main__"}   # travels by value, as a notebook's
    exec(compile(source, f"<{name}>", "exec"), namespace)
    wrong = namespace[fn.__name__]
    wrong.__name__ = wrong.__qualname__ = name
    return wrong


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
# The checker's tables: each row's wrong version, built from its edits, is named with its own words
# --------------------------------------------------------------------------------------------

UPDATE = "Each step: shard -= lr · (1/W) Σ_w g_w, the mean of the 3 gradients received, applied once"


@pytest.mark.parametrize("mistake", UPDATE_MISTAKES, ids=[m.name for m in UPDATE_MISTAKES])
def test_every_wrong_update_is_named(mistake):
    server = mutant(reference_server, mistake.variant.edits, "server_" + mistake.name.replace("-", "_"))
    assert_rejected(check_server, (server,), [
        f"{server.__name__} (with labkit's workers) is wrong " + HEAD + "server 0 answered worker 0's pull of step 1 "
        "with the wrong parameters: parameter ", "The update of step 0 is wrong (what server 0 sent at step 0 and the "
        "gradients it received then were right): " + mistake.says.format(s=0, v=2, W=3, others="2 gradients"), UPDATE])


@pytest.mark.parametrize("mistake", ARRIVAL_MISTAKES, ids=[m.name for m in ARRIVAL_MISTAKES])
def test_every_update_before_all_gradients_arrived_is_named(mistake):
    server = mutant(reference_server, mistake.variant.edits, "server_" + mistake.name.replace("-", "_"))
    assert_rejected(check_server, (server,), [
        HEAD + "server 0 answered worker 1's pull of step 0 with the wrong parameters",
        "It sent worker 0 the right shard of step 0, then changed its shard before answering worker 1's pull of the "
        "same step: it applied a gradient before all 3 gradients of the step had arrived",
        mistake.says.format(w=1, who="worker 0's gradient", t=0, W=3),
        "Synchronous: send the shard to every worker, then receive all 3 gradients, then apply their mean"])


@pytest.mark.parametrize("mistake", PUSH_MISTAKES, ids=[m.name for m in PUSH_MISTAKES])
def test_every_wrong_gradient_is_named(mistake):
    worker = mutant(reference_worker, mistake.variant.edits, "worker_" + mistake.name.replace("-", "_"))
    message = assert_rejected(check_worker, (worker,), [
        f"{worker.__name__} (with labkit's servers) is wrong " + HEAD + "worker 0 pushed the wrong gradient at step "])
    t = int(re.search(r"pushed the wrong gradient at step (\d+): element \d+ is ", message).group(1))
    assert t <= 1 and mistake.says.format(w=0, t=t, prev=t - 1) in message, message


def test_the_tables_name_different_mistakes():
    for table in (ARRIVAL_MISTAKES, UPDATE_MISTAKES, PUSH_MISTAKES):
        assert len({m.name for m in table}) == len({m.says for m in table}) == len(table)


# --------------------------------------------------------------------------------------------
# The server (7a): mistakes found while the messages go
# --------------------------------------------------------------------------------------------

SEND, RECV = "comm.send(shard, servers + w)", "comm.recv(grads[w], servers + w)"
MEAN = "shard -= lr * torch.stack(grads).mean(dim=0)"
server_skips_worker_0 = mutant(reference_server, [(RECV, "if w > 0: " + RECV),
                                                  (MEAN, MEAN.replace("(grads)", "(grads[1:])"))],
                               "server_skips_worker_0")
server_receives_first = mutant(reference_server, [(SEND, "pass"), (MEAN, MEAN + "; [comm.send(shard, servers + v) "
                                                                        "for v in range(workers)]")],
                               "server_receives_first")
server_wrong_ranks = mutant(reference_server, [(SEND, "comm.send(shard, w)")], "server_wrong_ranks")  # w: servers + w


def server_broken(shard, server, servers, workers, steps, lr):
    for step in range(steps):
        for w in range(workers):
            dist.send(shard, dst=servers + w)
        grads = [torch.empty_like(shard) for _ in range(workers)]
        for w in range(workers):
            dist.recv(grads[w], src=servers + w)
        shard -= lr * grads.mean(dim=0)
    return shard


def test_a_server_that_skips_a_workers_gradient_hangs_and_is_stopped_naming_who_waited():
    message = assert_rejected(check_server, (server_skips_worker_0,), [
        "waited 1 s in its ", "the run is deadlocked, and the check stopped it", "What every rank was doing:",
        "server 0 (rank 0): waiting in its 4th dist.send (peer 2), during worker 0's pull of step 1",
        "→ server 0 went on to step 1 without receiving worker 0's gradient of step 0 (0 gradients from it in all)"],
        timeout=2)
    assert message.startswith("server_skips_worker_0 (with labkit's workers) is wrong " + HEAD)
    assert "worker 0 (rank 2): waiting in its 1st dist.send (peer 0), during worker 0's push of step 0 to server 0" \
        in message


def test_a_server_that_receives_before_sending_deadlocks_and_is_explained():
    assert_rejected(check_server, (server_receives_first,), [
        "waited 1 s in its 1st dist.", "the run is deadlocked",
        "→ server 0 waits for worker 0's gradient of step 0 before it has sent that worker its shard of step 0, "
        "which the worker waits for first: each waits for the other"], timeout=2)


def test_a_message_to_the_wrong_rank_is_named():
    assert_rejected(check_server, (server_wrong_ranks,), [
        "server 0 (rank 0) called dist.send(dst=0): that is itself. Here the 2 servers are ranks 0 .. 1 (server s is "
        "rank s), the 3 workers ranks 2 .. 4 (worker w is rank servers + w = 2 + w)"])


def test_an_exception_in_the_server_shows_that_ranks_traceback():
    message = assert_rejected(check_server, (server_broken,), [
        "server_broken raised AttributeError on rank ", "'list' object has no attribute 'mean'",
        "--- traceback of rank "])
    assert "grads.mean(dim=0)" in message


# --------------------------------------------------------------------------------------------
# The worker (7b): mistakes found while the messages go
# --------------------------------------------------------------------------------------------

PULL, PUSH = "comm.recv(flat[a:b], s)", "comm.send(grad[a:b], s)"
BOUNDS = "bounds = shard_bounds(flat.numel(), servers)"
WRONG_WORKERS = {
    "worker_pulls_once": [("for x, y in batches:", "for step, (x, y) in enumerate(batches):"),
                          (PULL, "if step == 0: " + PULL)],
    "worker_never_pushes": [(PUSH, "pass")],
    "worker_overlapping": [(BOUNDS, "bounds = [(a, b + 1) for a, b in shard_bounds(flat.numel(), servers)]")],
    "worker_gap": [(BOUNDS, "n = flat.numel(); bounds = [(s * (n // servers), (s + 1) * (n // servers)) "
                            "for s in range(servers)]")],
    "worker_to_workers": [(PUSH, "comm.send(grad[a:b], servers + s)")],
    "worker_float32": [(PULL, "comm.recv(torch.empty(b - a), s)")],
}
worker_gap = mutant(reference_worker, WRONG_WORKERS["worker_gap"], "worker_gap")


@pytest.mark.parametrize("name,expected", [
    ("worker_pulls_once",
     ["worker 0 (rank 2) pushes its gradient of step 1 to server 0, but it pulled server 0's shard only 1 time (last "
      "for step 0): it computed the gradient of step 1 on stale parameters, those of step 0",
      "in synchronous training every step starts with a pull from every server"]),
    ("worker_never_pushes",
     ["worker 0 (rank 2) pulls server 0's shard of step 1, but it has pushed server 0 only 0 gradients: its gradient "
      "of step 0 never went out. Server 0 waits for that gradient before it answers the pull of step 1, so both "
      "would wait forever"]),
    ("worker_overlapping",
     ["worker 0 (rank 2) pulls server 0's shard into flat[0:13] (13 elements), but server 0 holds elements [0, 12) of "
      "the 23 parameters (12 elements: shard_bounds(23, 2)[0] = (0, 12)). Elements [12, 13) are in server 1's shard "
      "too: the shards overlap, and those parameters would be pulled from two servers and updated by both "
      "(flat[a:b + 1]: a Python slice already leaves its end out, [a, b) is flat[a:b]). Cut both the pulls and the "
      "pushes with a, b = shard_bounds(flat.numel(), servers)[s]"]),
    ("worker_gap",
     ["worker 0 (rank 2) pulls server 0's shard into flat[0:11] (11 elements), but server 0 holds elements [0, 12)",
      "Elements [11, 12) are left out: a gap, those parameters would never be pulled or updated (23 // 2 = 11 "
      "elements per server: the last 1 parameter(s) then belong to no server"]),
    ("worker_to_workers", ["worker 0 (rank 2) called dist.send(dst=2): that is itself"]),
    ("worker_float32",
     ["worker 0 (rank 2): the buffer it pulls server 0's shard into is a torch.float32 tensor; the parameters and "
      "their gradients are torch.float64"]),
], ids=lambda x: x if isinstance(x, str) else "")
def test_wrong_workers_are_named(name, expected):
    # Every worker makes the mistake; the one named is the first to reach it (on a loaded machine not
    # always worker 0): the message must read the same for whichever it names.
    with pytest.raises(CheckFailed) as info:
        check_worker(mutant(reference_worker, WRONG_WORKERS[name], name))
    message = str(info.value)
    named = re.search(r"worker (\d+) \(rank (\d+)\)", message)
    assert named, message
    worker, rank = named.groups()
    for text in [f"{name} (with labkit's servers) is wrong " + HEAD, *expected]:
        text = text.replace("worker 0 (rank 2)", f"worker {worker} (rank {rank})").replace("dst=2", f"dst={rank}")
        assert text in message, message


def test_a_message_of_another_size_is_named_by_its_header():
    """A pull from any server (no src=: the slice checks cannot know whose shard it is) into a buffer of the wrong
    size: the checker's header names both sizes instead of gloo failing."""
    worker = mutant(reference_worker, [(PULL, "comm.recv(torch.empty(5, dtype=torch.float64))")], "worker_any_source")
    assert_rejected(check_worker, (worker,), [
        "worker_any_source (with labkit's servers) is wrong on 2 workers and 1 server (3 processes): worker 0 (rank 1) "
        "receives worker 0's pull of step 0 from server 0 into a buffer of 5 elements (torch.float64), but server 0 "
        "sent 23 elements (torch.float64): the two sides must agree on every message's size."], configs=((2, 1),))


def test_a_worker_stuck_in_its_own_code_is_stopped_naming_who_waited():
    def worker_stuck(model, batches, worker, servers):
        if worker == 1:
            time.sleep(60)
        run_worker(model, batches, worker, servers)

    start = time.perf_counter()
    message = assert_rejected(check_worker, (worker_stuck,), [
        "waited 1 s in its ", "the run is deadlocked, and the check stopped it",
        "worker 1 (rank 3): running its own code, no call for ", "→ worker 1 (rank 3) is still running its own code"],
        timeout=2)
    assert time.perf_counter() - start < 15
    assert "server 0 (rank 0): waiting in its 2nd dist.send (peer 3), during worker 1's pull of step 0" in message


# --------------------------------------------------------------------------------------------
# Both of the student's functions together
# --------------------------------------------------------------------------------------------

def test_together_a_wrong_piece_is_named():
    server_sum = mutant(reference_server, next(m for m in UPDATE_MISTAKES if m.name == "sum").variant.edits,
                        "server_sum")
    assert_rejected(check_parameter_server, (server_sum, run_worker), [
        "server_sum and run_worker are wrong together " + HEAD,
        "the step is 3 times too large (measured factor 3 = W, the number of workers)"])
    assert_rejected(check_parameter_server, (run_server, worker_gap), ["Elements [11, 12) are left out: a gap"])


def test_nonblocking_sends_and_receives_and_any_source_are_accepted(capsys):
    """isend/irecv (waited later) and a receive from any source (which returns the sender, as torch's does) work
    through the checker's watch."""
    def server_nonblocking(shard, server, servers, workers, steps, lr):
        for step in range(steps):
            for request in [dist.isend(shard, dst=servers + w) for w in range(workers)]:
                request.wait()
            grads = [None] * workers
            for _ in range(workers):
                g = torch.empty_like(shard)
                grads[dist.recv(g) - servers] = g             # from whichever worker is first
            shard -= lr * torch.stack(grads).mean(dim=0)
        return shard

    def worker_nonblocking(model, batches, worker, servers):
        flat = flat_params(model)
        bounds = shard_bounds(flat.numel(), servers)
        for x, y in batches:
            for request in [dist.irecv(flat[a:b], src=s) for s, (a, b) in enumerate(bounds)]:
                request.wait()
            set_flat_params(model, flat)
            model.zero_grad()
            F.mse_loss(model(x), y).backward()
            grad = flat_grad(model)
            for request in [dist.isend(grad[a:b], dst=s) for s, (a, b) in enumerate(bounds)]:
                request.wait()

    check_parameter_server(server_nonblocking, worker_nonblocking, configs=((3, 2),))
    assert capsys.readouterr().out.startswith("✓ server_nonblocking and worker_nonblocking are correct together")


def test_not_functions_are_refused():
    with pytest.raises(CheckFailed, match=r"check_server\(run_server\) needs your function, not int"):
        check_server(3)


def test_configurations_cover_odd_counts():
    assert CONFIGS[0] == (3, 2) and {(2, 1), (4, 1), (3, 3)} <= set(CONFIGS)


# --------------------------------------------------------------------------------------------
# 7c: the bounded-staleness rule and the largest staleness, a design task
# --------------------------------------------------------------------------------------------

from labkit.checks.ex07 import (BOUND_MISTAKES, BOUND_SIZES, RELEASE_MISTAKES, STATES,  # noqa: E402
                                check_max_staleness, check_release, largest_staleness, release_variant)
from labkit.checks.harness import literal_parts  # noqa: E402
from labkit.param_server import ssp_release  # noqa: E402


def _design(folder="solutions"):
    """The notebook's 7c cell (release and max_staleness), run in a fresh namespace."""
    code = code_cells(ROOT / folder / NOTEBOOK)
    namespace = {"__name__": "__main__"}
    exec(compile(next(c for c in code if c.startswith("def release")), f"{folder}-7c", "exec"),
         namespace)
    return namespace["release"], namespace["max_staleness"]


def _answers(fn):
    return [sorted(fn(list(s.waiting), list(s.clock), set(s.active), s.tau, s.message)) for s in STATES]


def test_the_design_solution_passes_both_checks(capsys):
    release, max_staleness = _design()
    check_release(release)                       # the constructed states, then the real runs (τ = 1, τ = 0)
    check_max_staleness(max_staleness)
    lines = capsys.readouterr().out.split("\n")
    assert lines[0].startswith("✓ release releases the same workers as labkit's rule on 10 constructed states")
    assert "every call agreed, the runs ended" in lines[0]
    assert lines[1].startswith("✓ max_staleness is the largest staleness on (W, τ) = (2, 0), (2, 1)")


def test_the_design_stubs_are_reported_as_not_written():
    release, max_staleness = _design("exercises")
    with pytest.raises(NotImplementedError, match=r"^Exercise 7c\(i\): "):
        check_release(release)
    with pytest.raises(NotImplementedError, match=r"^Exercise 7c\(ii\): "):
        check_max_staleness(max_staleness)


@pytest.mark.parametrize("mistake", RELEASE_MISTAKES, ids=[m.name for m in RELEASE_MISTAKES])
def test_every_wrong_rule_is_named_on_the_constructed_states(mistake):
    message = assert_rejected(check_release, (release_variant(mistake),), literal_parts(mistake.says), run=False)
    assert "is wrong on constructed states: " in message and "expected to release" in message
    for other in RELEASE_MISTAKES:       # its own words, not another row's
        if other is not mistake:
            assert not all(part in message for part in literal_parts(other.says)), other.name


@pytest.mark.parametrize("name", ["finished workers too", "only the pull that arrived"])
def test_a_rule_that_deadlocks_a_real_run_is_named_by_the_servers_timeout(name):
    # without the constructed states, the real run itself: worker 2 finishes after 3 steps (the minimum over
    # every worker then never moves again), or workers held back are never looked at again. The server's
    # timeout stops the run, and the recorded calls name the mistake. Which τ deadlocks first depends on
    # the timing of the messages (on a loaded machine "only the pull that arrived" deadlocked at τ = 0).
    mistake = next(m for m in RELEASE_MISTAKES if m.name == name)
    expected = ["deadlocked in a real run (W = 3 workers on one server, τ = ", "stopped the run. Its last call was",
                "The first call where it differs from labkit's rule: the server's call"] + literal_parts(mistake.says)
    assert_rejected(check_release, (release_variant(mistake),), expected, states=())


def test_the_rule_tables_name_different_mistakes():
    answers = [_answers(release_variant(m)) for m in RELEASE_MISTAKES]
    assert all(a != _answers(ssp_release) for a in answers)
    assert len({repr(a) for a in answers}) == len(answers)
    bounds = [[m.variant(W, tau) for W, tau in BOUND_SIZES] for m in BOUND_MISTAKES]
    assert len({repr(b) for b in bounds}) == len(bounds)


@pytest.mark.parametrize("fn,expected", [
    (lambda waiting, clock, active, tau, message: None, ["returned None: return a list of the waiting workers"]),
    (lambda waiting, clock, active, tau, message: [0, 1, 2], ["returned worker 0, which has no pull waiting"]),
    (lambda waiting, clock, active, tau, message: list(waiting),
     ["a fast worker two steps ahead", "expected to release [], got [1]", "more than τ = 1: it must wait"]),
    (lambda waiting, clock, active, tau, message: [w for w in waiting if clock[w] - min(clock) <= tau] if tau else [],
     ["τ = 0, the last push of the step", "expected to release [0, 1], got []", "wait needlessly"]),
    (lambda waiting, clock, active, tau, message:       # compared with the others only: alone, with nobody
     [w for w in waiting if clock[w] - min((clock[v] for v in active if v != w), default=clock[w] - tau - 1) <= tau],
     ["one worker left", "expected to release [1], got []", "nobody can push any more, the run deadlocks"]),
], ids=["none", "not waiting", "async", "tau 0 never", "alone never"])
def test_other_wrong_rules_are_explained(fn, expected):
    fn.__name__ = "release"
    assert_rejected(check_release, (fn,), expected, run=False)


@pytest.mark.parametrize("mistake", BOUND_MISTAKES, ids=[m.name for m in BOUND_MISTAKES])
def test_every_wrong_bound_is_named_with_the_order_that_reaches_the_largest(mistake):
    def max_staleness(W, tau):
        return mistake.variant(W, tau)
    assert_rejected(check_max_staleness, (max_staleness,),
                    ["max_staleness(", "labkit's server reaches", "when the clocks were"] + literal_parts(mistake.says))


def test_the_search_is_the_bound_and_its_witness_is_an_order_of_messages():
    for (W, tau), steps in (((2, 1), 6), ((3, 0), 4), ((3, 1), 5)):
        assert largest_staleness(W, tau, steps)[0] == largest_staleness(W, tau)[0]   # more steps: no more
    stale, (w, step, pulled, pushed) = largest_staleness(3, 1)
    assert stale == sum(pushed) - sum(pulled) and pulled[w] == pushed[w] == step
    assert all(pulled[w] - pulled[v] <= 1 for v in range(3))     # its pull was admitted by labkit's rule
    def max_staleness(W, tau):
        return float((W - 1) * (2 * tau + 1))
    with pytest.raises(CheckFailed, match=r"max_staleness\(2, 0\) returned a float \(1.0\): a staleness is a number"):
        check_max_staleness(max_staleness, sizes=((2, 0),))
