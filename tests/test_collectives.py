"""labkit.collectives on real processes over gloo, checked against torch.distributed.

One launch per world size runs many cases (each launch costs a process start), and returns what
went wrong, case by case, so that a failure names the algorithm, dtype, op and shape.
"""

import pytest
import torch
import torch.distributed as dist

import labkit
from labkit import comm
from labkit import collectives as C
from labkit import ring
from labkit.collectives_support import PREFLIGHT_TAG, scratch_buffer

WORLD_SIZES = [1, 2, 3, 5, 7]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int32]
OPS = ["sum", "avg", "max"]
ALGORITHMS = {"ring": C.ring_all_reduce, "naive": C.naive_all_reduce, "tree": C.tree_all_reduce}


def _inputs(rank, world_size):
    """Shapes of every kind: scalar, fewer elements than ranks, not divisible, 3-D, non-contiguous."""
    g = torch.Generator().manual_seed(1000 + rank)
    cases = {
        "scalar": torch.randn((), generator=g),
        "one": torch.randn(1, generator=g),
        "fewer than ranks": torch.randn(max(world_size - 1, 1), generator=g),
        "prime length": torch.randn(13, generator=g),
        "3-D": torch.randn(2, 3, 5, generator=g),
        "non-contiguous": torch.randn(6, 4, generator=g).t(),
        "empty": torch.randn(0, generator=g),
    }
    return cases


def _close(got, want):
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if not got.dtype.is_floating_point:
        return torch.equal(got, want)             # integers: exactly
    # floats: the ring adds in another order than gloo does; bfloat16 keeps 8 bits
    tol = dict(rtol=2e-2, atol=5e-2) if got.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    return torch.allclose(got.double(), want.double(), **tol)


def _all_reduce_cases():
    rank, world_size = dist.get_rank(), dist.get_world_size()
    failures, checked = [], 0
    for shape_name, base in _inputs(rank, world_size).items():
        for dtype in DTYPES:
            x = (base * 10).to(dtype) if not dtype.is_floating_point else base.to(dtype)
            for op in OPS:
                if op == "avg" and not dtype.is_floating_point:
                    continue
                want = x.clone()
                dist.all_reduce(want, op=getattr(dist.ReduceOp, op.upper()))
                for name, fn in ALGORITHMS.items():
                    got = x.clone()                       # clone keeps the strides: still non-contiguous
                    out = fn(got, op)
                    checked += 1
                    if out is not got or got.stride() != x.stride():
                        failures.append(f"{name} {shape_name} {dtype} {op}: did not work in place")
                    if not _close(got, want):
                        failures.append(f"{name} {shape_name} {dtype} {op}: max error "
                                        f"{(got.double() - want.double()).abs().max().item() if got.numel() else 'n/a'}")
    # The ops may also be given as torch's enums
    t = torch.full((5,), float(rank))
    C.ring_all_reduce(t, dist.ReduceOp.MAX)
    if not torch.equal(t, torch.full((5,), float(world_size - 1))):
        failures.append("ReduceOp.MAX not honoured")
    return checked, failures


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_reduce_algorithms_equal_torch(world_size):
    results = labkit.launch(_all_reduce_cases, world_size=world_size, timeout=60)
    for rank, (checked, failures) in enumerate(results):
        assert checked == 7 * (3 * 3 + 2 * 2) * 3
        assert failures == [], f"rank {rank}: {failures[:10]}"


def _other_collectives():
    rank, world_size = dist.get_rank(), dist.get_world_size()
    failures = []
    # reduce-scatter, when N divides M: equals reduce_scatter_single
    for dtype in (torch.float32, torch.int64):
        x = (torch.arange(4 * world_size) * (rank + 1)).to(dtype)
        want = torch.empty(4, dtype=dtype)
        comm.reduce_scatter_tensor(want, x.clone())   # torch's, under either of its names
        got = C.ring_reduce_scatter(x.clone())
        if not torch.equal(got, want):
            failures.append(f"reduce_scatter {dtype}: {got} != {want}")
    # any M: rank r gets chunk r of the sum
    x = torch.arange(11.0) + rank
    full = x.clone()
    dist.all_reduce(full)
    a, b = ring.chunk_bounds(11, world_size)[rank]
    got = C.ring_reduce_scatter(x.clone())
    if not torch.equal(got, full[a:b]):
        failures.append(f"reduce_scatter of 11 elements: {got} != {full[a:b]}")
    # all-gather: equals all_gather_single, shape (N, *shape)
    local = torch.full((2, 3), float(rank)) + torch.arange(6.0).view(2, 3)
    want = torch.empty(world_size * 6)
    comm.all_gather_into_tensor(want, local.reshape(-1).clone())
    got = C.ring_all_gather(local)
    if got.shape != (world_size, 2, 3) or not torch.equal(got.reshape(-1), want):
        failures.append(f"all_gather: {got} != {want}")
    # broadcast from every source
    for src in range(world_size):
        t = torch.arange(9.0).view(3, 3) * (rank + 1)
        C.broadcast(t, src=src)
        if not torch.equal(t, torch.arange(9.0).view(3, 3) * (src + 1)):
            failures.append(f"broadcast from {src}: {t}")
    return failures


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_reduce_scatter_all_gather_broadcast_equal_torch(world_size):
    for rank, failures in enumerate(labkit.launch(_other_collectives, world_size=world_size, timeout=60)):
        assert failures == [], f"rank {rank}: {failures}"


def _traced(numel):
    rank, world_size = dist.get_rank(), dist.get_world_size()
    x = C.provenance_input(rank, world_size, numel)
    trace = []
    C.ring_all_reduce(x, trace=trace)
    rows = [(rec["phase"], rec["round"], rec["sent_to"], rec["sent_chunk"], rec["received_from"],
             [C.decode_contributions(c[0].item(), world_size) if c.numel() else None for c in rec["chunks"]])
            for rec in trace]
    return rows, x.tolist()


@pytest.mark.parametrize("world_size,numel", [(2, 5), (3, 7), (5, 3), (5, 10)])
def test_trace_of_the_real_run_is_the_simulated_schedule(world_size, numel):
    """One idea, three uses: what the processes really did, round by round, is labkit.ring's schedule,
    and what each chunk really held (decoded from provenance inputs) is its simulation."""
    results = labkit.launch(_traced, numel, world_size=world_size, timeout=30)
    rounds = ring.all_reduce_rounds(world_size)
    states = ring.simulate(world_size)
    sizes = ring.chunk_sizes(numel, world_size)
    everyone = sum(C.PROVENANCE_BASE ** r for r in range(world_size))
    for rank, (rows, final) in enumerate(results):
        assert final == [everyone] * numel
        assert len(rows) == len(rounds)
        for t, (row, rnd) in enumerate(zip(rows, rounds)):
            phase, index, sent_to, sent_chunk, received_from, held = row
            assert (phase, index) == (rnd.phase, rnd.index)
            assert sent_to == rnd.sent_by(rank).receiver and received_from == rnd.received_by(rank).sender
            if sizes[rnd.sent_by(rank).chunk]:  # an empty chunk cannot be told from another empty one
                assert sent_chunk == rnd.sent_by(rank).chunk
            for chunk, counts in enumerate(held):
                if sizes[chunk]:
                    assert counts == {r: 1 for r in states[t + 1][rank][chunk]}, (t, rank, chunk)


def _repeated_calls():
    # Growing, shrinking and equal sizes, two dtypes: the kept receive buffer must never leak a
    # previous call's data into a result, and is reused (not reallocated) for an equal size.
    bad, pointers = [], []
    for numel, dtype in [(1000, torch.float32), (10, torch.float32), (5000, torch.float32),
                         (5000, torch.float32), (7, torch.int64), (3000, torch.int64)]:
        x = (torch.arange(numel) * (dist.get_rank() + 1)).to(dtype)
        want = x.clone()
        dist.all_reduce(want)
        C.ring_all_reduce(x)
        if not torch.equal(x, want):
            bad.append((numel, dtype))
        if dtype == torch.float32:
            pointers.append(scratch_buffer(dtype, 1, x.device).data_ptr())
    return bad, pointers


def test_ring_keeps_its_receive_buffer_between_calls():
    for bad, pointers in labkit.launch(_repeated_calls, world_size=3):
        assert bad == []
        assert pointers[2] == pointers[3]       # the two 5000-element calls share one buffer


def _count_bytes(numel, dtype):
    stats = {}
    x = torch.ones(numel, dtype=dtype)
    for name, fn in ALGORITHMS.items():
        with comm.record() as events:
            fn(x.clone())                       # the pre-flight's messages are tagged: not counted below
        s = comm.traffic(events)
        stats[name] = (s.bytes_sent, s.bytes_received, s.messages_sent)
        stats[name + " pre-flight"] = comm.traffic(events, tag=PREFLIGHT_TAG).messages_sent
    return stats


@pytest.mark.parametrize("world_size", [2, 4, 5])
def test_bytes_sent_are_the_formulas(world_size):
    numel, dtype = 20 * world_size + 3, torch.float32   # not divisible: the chunks differ by one
    item = 4
    results = labkit.launch(_count_bytes, numel, dtype, world_size=world_size)
    expected = ring.ring_elements_sent(numel, world_size)
    n, m = world_size, numel
    for rank, stats in enumerate(results):
        sent, received, messages = stats["ring"]
        assert sent == expected[rank] * item
        assert received == expected[(rank - 1) % n] * item    # what the left neighbour sent
        assert messages == 2 * (n - 1)
        # ~2(N-1)/N·M per rank, and never more than 2M
        assert abs(sent - 2 * (n - 1) * m * item / n) <= 2 * (n - 1) * item
        root_sent, root_received, _ = stats["naive"]
        if rank == 0:   # the server: (N-1)·M in and out
            assert (root_sent, root_received) == ((n - 1) * m * item, (n - 1) * m * item)
        else:
            assert (root_sent, root_received) == (m * item, m * item)
    # the whole ring moves 2(N-1)·M elements; the naive server alone receives (N-1)·M
    assert sum(r["ring"][0] for r in results) == 2 * (n - 1) * m * item
    # the tree: every message is the whole tensor, 2(N-1) of them in all
    assert sum(r["tree"][2] for r in results) == 2 * (n - 1)
    assert sum(r["tree"][0] for r in results) == 2 * (n - 1) * m * item
    # the pre-flight ran (N-1 ring rounds per call), recorded beside the payload under its own tag
    assert all(r[name + " pre-flight"] == n - 1 for r in results for name in ALGORITHMS)


def _bad_call(case):
    rank = dist.get_rank()
    x = torch.ones(4)
    try:
        if case == "shape":
            C.ring_all_reduce(torch.ones(4 if rank else 5))
        elif case == "dtype":
            C.tree_all_reduce(torch.ones(4, dtype=torch.float64 if rank == 1 else torch.float32))
        elif case == "unknown op":
            C.ring_all_reduce(x, "mean" if rank == 1 else "sum")
        elif case == "different ops":
            C.naive_all_reduce(x, "max" if rank == 0 else "sum")
        elif case == "avg of integers":
            C.ring_all_reduce(torch.ones(4, dtype=torch.int64), "avg")
        elif case == "gather shapes":
            C.ring_all_gather(torch.ones(2, 2) if rank else torch.ones(4))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("case,words", [
    ("shape", "same shape"), ("dtype", "same shape and dtype"), ("unknown op", "rank(s) [1] passed another"),
    ("different ops", "same op"), ("avg of integers", "floating-point"), ("gather shapes", "same shape")])
def test_bad_input_is_the_same_clear_error_on_every_rank(case, words):
    messages = labkit.launch(_bad_call, case, world_size=3, timeout=10)  # a hang would time out
    assert all(m is not None for m in messages), messages
    assert len(set(messages)) == 1
    assert words in messages[0]
    assert "rank 0:" in messages[0] and "rank 2:" in messages[0]   # it lists what every rank passed
