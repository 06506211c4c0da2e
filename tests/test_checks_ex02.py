"""The checkers of exercise 2 accept correct phases (labkit's and other correct
ways of writing them) and reject each known-wrong implementation with a message that names the mistake,
and N, M, the round, the rank and the chunk. A wrong version stops at the first world size (3), in one
launch; the correct ones run on every default world size."""

import pytest
import torch

from labkit.checks import CheckFailed
from labkit.checks.ex02 import check_all_gather_phase, check_reduce_scatter_phase, check_ring_all_reduce
from labkit.collectives import all_gather_phase as labkit_all_gather
from labkit.collectives import reduce_scatter_phase as labkit_reduce_scatter


def add(mine, received):
    mine.add_(received)


def assert_rejected(check, *functions, expected):
    """``check(*functions)`` raises CheckFailed, and its message contains every text of ``expected``."""
    with pytest.raises(CheckFailed) as info:
        check(*functions)
    for text in expected:
        assert text in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------
# Correct phases: labkit's, and other correct ways of writing them
# --------------------------------------------------------------------------------------------

# labkit's own phases (labkit.collectives) are the correct versions; the students' other correct ways follow
reduce_scatter_phase, all_gather_phase = labkit_reduce_scatter, labkit_all_gather


def rs_sends_copies(chunks, rank, world_size, exchange, combine=add):
    """Correct: sends a clone of the chunk, receives into a zeroed buffer."""
    for j in range(world_size - 1):
        received = torch.zeros_like(chunks[(rank - j - 1) % world_size])
        exchange(chunks[(rank - j) % world_size].clone(), (rank + 1) % world_size, received, (rank - 1) % world_size)
        combine(chunks[(rank - j - 1) % world_size], received)


def ag_copies_from_a_buffer(chunks, rank, world_size, exchange):
    """Correct: receives into a buffer, then copies it into the chunk."""
    for j in range(world_size - 1):
        received = torch.empty_like(chunks[(rank - j) % world_size])
        exchange(chunks[(rank + 1 - j) % world_size], (rank + 1) % world_size, received, (rank - 1) % world_size)
        chunks[(rank - j) % world_size].copy_(received)


def test_correct_phases_pass_on_every_default_world_size(capsys):
    check_reduce_scatter_phase(reduce_scatter_phase)
    check_all_gather_phase(all_gather_phase)
    out = capsys.readouterr().out
    assert out == (
        "✓ reduce_scatter_phase is correct on world sizes 2, 3, 4, 5 (M = 2N, 2N+1 and N-1 elements): every round "
        "sends the right chunk to the right neighbour and adds what arrives, and after every round each rank's "
        "chunks hold exactly what labkit.ring.simulate says\n"
        "✓ all_gather_phase is correct on world sizes 2, 3, 4, 5 (M = 2N, 2N+1 and N-1 elements): every round "
        "sends the right chunk to the right neighbour and stores what arrives, and after every round each rank's "
        "chunks hold exactly what labkit.ring.simulate says\n")


@pytest.mark.parametrize("check,fn", [(check_reduce_scatter_phase, rs_sends_copies),
                                      (check_all_gather_phase, ag_copies_from_a_buffer)],
                         ids=["rs-copies", "ag-buffer"])
def test_other_correct_phases_pass(check, fn, capsys):
    check(fn, world_sizes=(3,))
    assert capsys.readouterr().out.startswith(f"✓ {fn.__name__} is correct on world sizes 3 ")


def test_ring_all_reduce_check_accepts_the_correct_phases(capsys):
    check_ring_all_reduce(reduce_scatter_phase, all_gather_phase)
    assert capsys.readouterr().out == (
        "✓ ring_all_reduce with reduce_scatter_phase and all_gather_phase matches dist.all_reduce on 3, 4 ranks: "
        "5 float64 tensors (M divisible by N or not, M < N, 2-D), ops sum, max, avg\n")


# --------------------------------------------------------------------------------------------
# Known-wrong reduce-scatters
# --------------------------------------------------------------------------------------------

def _rs(chunks, rank, world_size, exchange, combine, *, send=0, dst=+1, src=-1, buffer="recv", how="combine"):
    """A reduce-scatter with one mistake: chunk offset `send`, neighbours dst/src, buffer, how it merges."""
    for j in range(world_size - 1):
        s, r = (rank - j + send) % world_size, (rank - j - 1 + send) % world_size
        received = {"recv": lambda: torch.empty_like(chunks[r]), "send": lambda: torch.empty_like(chunks[s]),
                    "float": lambda: torch.zeros(chunks[r].numel()), "chunk": lambda: chunks[r]}[buffer]()
        exchange(chunks[s], (rank + dst) % world_size, received, (rank + src) % world_size)
        if how == "combine":
            combine(chunks[r], received)
        elif how == "+=":
            chunks[r] += received
        elif how == "rebind":
            chunks[r] = chunks[r] + received
        elif how == "swapped":
            combine(received, chunks[r])


def rs_off_by_one(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, send=1)


def rs_to_the_left(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, dst=-1, src=+1)


def rs_receives_from_the_right(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, src=+1)


def rs_overwrites(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, buffer="chunk", how="none")


def rs_buffer_of_the_sent_size(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, buffer="send")


def rs_float_buffer(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, buffer="float")


def rs_adds_by_hand(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, how="+=")


def rs_not_in_place(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, how="rebind")


def rs_combine_swapped(chunks, rank, world_size, exchange, combine=add):
    _rs(chunks, rank, world_size, exchange, combine, how="swapped")


def rs_combines_into_the_sent_chunk(chunks, rank, world_size, exchange, combine=add):
    for j in range(world_size - 1):
        s, r = (rank - j) % world_size, (rank - j - 1) % world_size
        received = torch.empty_like(chunks[r])
        exchange(chunks[s], (rank + 1) % world_size, received, (rank - 1) % world_size)
        combine(chunks[s][:received.numel()], received)


def rs_one_round_too_many(chunks, rank, world_size, exchange, combine=add):
    for j in range(world_size):
        s, r = (rank - j) % world_size, (rank - j - 1) % world_size
        received = torch.empty_like(chunks[r])
        exchange(chunks[s], (rank + 1) % world_size, received, (rank - 1) % world_size)
        combine(chunks[r], received)


def rs_rank_0_one_more(chunks, rank, world_size, exchange, combine=add):
    reduce_scatter_phase(chunks, rank, world_size, exchange, combine)
    if rank == 0:
        exchange(chunks[0], 1, torch.empty_like(chunks[world_size - 1]), world_size - 1)


def rs_passes_an_index(chunks, rank, world_size, exchange, combine=add):
    for j in range(world_size - 1):
        received = torch.empty_like(chunks[(rank - j - 1) % world_size])
        exchange((rank - j) % world_size, (rank + 1) % world_size, received, (rank - 1) % world_size)


def rs_does_nothing(chunks, rank, world_size, exchange, combine=add):
    return


def rs_raises_on_rank_1(chunks, rank, world_size, exchange, combine=add):
    if rank == 1:
        raise ValueError("deliberate mistake on rank 1")
    reduce_scatter_phase(chunks, rank, world_size, exchange, combine)


def rs_endless_on_rank_2(chunks, rank, world_size, exchange, combine=add):
    j = 0
    while rank == 2 and j < world_size - 1:
        pass  # forgot j += 1
    reduce_scatter_phase(chunks, rank, world_size, exchange, combine)


def rs_stub(chunks, rank, world_size, exchange, combine=add):
    for j in range(world_size - 1):
        raise NotImplementedError("Exercise 2a: one round of the reduce-scatter; see the instructions above")


def rs_bare_not_implemented(chunks, rank, world_size, exchange, combine=add):
    raise NotImplementedError


CASE = "N=3 ranks, M=6 elements (chunk sizes [2, 2, 2])"


@pytest.mark.parametrize("wrong,expected", [
    (rs_off_by_one, [f"rs_off_by_one is wrong: {CASE}, reduce-scatter round 0: rank 0 sent chunk 1, expected chunk 0 "
                     "(in round j rank i sends chunk (i-j) mod N)",
                     "off by +1: it sent chunk (i+1-j) mod N instead of (i-j) mod N"]),
    (rs_to_the_left, [f"{CASE}, reduce-scatter round 0: rank 0 sent to rank 2, expected rank 1 (the right neighbour "
                      "(i+1) mod N)", "Every rank sent to its left neighbour: the ring goes the other way"]),
    (rs_receives_from_the_right, [f"{CASE}, reduce-scatter round 0: rank 0 received from rank 1, expected rank 2 "
                                  "(the left neighbour (i-1) mod N"]),
    (rs_overwrites, [f"{CASE}, after reduce-scatter round 0: rank 0's chunk 2 holds the contributions of ranks {{2}} "
                     "(rank 0 missing), expected {0, 2}", "overwrite instead of add",
                     "Receive into a separate buffer, then combine(chunks[2], buffer)"]),
    (rs_buffer_of_the_sent_size, ["N=3 ranks, M=7 elements (chunk sizes [3, 2, 2]), reduce-scatter round 0: rank 0 "
                                  "received into a tensor of 3 elements, but chunk 2, which arrives from rank 2, has 2",
                                  "(3 is the size of chunk 0, the one rank 0 sends"]),
    (rs_float_buffer, [f"{CASE}, reduce-scatter round 0: rank 0 received into a tensor whose dtype is not the chunks'",
                       "torch.empty_like(chunks[c])"]),
    (rs_adds_by_hand, [f"{CASE}: every round is right, but rank(s) [0, 1, 2] never called combine",
                       "ring_all_reduce(op='max') hands the phase combine=torch.maximum"]),
    (rs_not_in_place, [f"{CASE}, after reduce-scatter round 0: rank 0's chunk 2 holds the contributions of ranks {{0}} "
                       "(rank 2 missing), expected {0, 2}", "chunks[2] is no longer the chunk your function was given",
                       "Change the chunk in place: combine(chunks[2], received)"]),
    (rs_combine_swapped, ["rank 0's chunk 2 holds the contributions of ranks {0} (rank 2 missing)",
                          "pass your chunk first: combine(chunks[2], received)"]),
    (rs_combines_into_the_sent_chunk, [f"{CASE}, after reduce-scatter round 0: rank 0's chunk 0 holds the "
                                       "contributions of ranks {0, 2} (rank 2 not expected yet), expected {0}",
                                       "did what arrived go into chunk 0 instead of chunk 2?"]),
    (rs_one_round_too_many, [f"{CASE}: every rank called exchange 3 times, but the reduce-scatter takes N-1 = 2 "
                              "rounds"]),
    (rs_rank_0_one_more, [f"{CASE}: rank(s) [1, 2] returned after 2 rounds while rank(s) [0] called exchange for "
                          "round 2"]),
    (rs_passes_an_index, ["exchange is called as exchange(send_tensor, dst_rank, recv_tensor, src_rank); here `send` "
                          "is an int (", "), not a tensor", "--- where rank ", "in rs_passes_an_index"]),
    (rs_does_nothing, [f"rs_does_nothing is wrong: {CASE}: returned without calling exchange. The reduce-scatter "
                       "takes N-1 = 2 rounds"]),
])
def test_wrong_reduce_scatter_is_named(wrong, expected):
    assert_rejected(check_reduce_scatter_phase, wrong, expected=expected)


def test_an_exception_is_reported_with_that_ranks_traceback():
    with pytest.raises(CheckFailed) as info:
        check_reduce_scatter_phase(rs_raises_on_rank_1)
    message = str(info.value)
    assert message.startswith("rs_raises_on_rank_1 raised ValueError on rank 1 (world size 3): deliberate mistake")
    assert 'in rs_raises_on_rank_1\n    raise ValueError("deliberate mistake on rank 1")' in message
    assert "labkit/checks/ex02.py" not in message


def test_an_endless_loop_on_one_rank_is_stopped_and_named():
    with pytest.raises(CheckFailed) as info:
        check_reduce_scatter_phase(rs_endless_on_rank_2, timeout=3)
    message = str(info.value)
    assert message.startswith("rs_endless_on_rank_2 did not return within 1.8 s on rank 2 (N=3 ranks, M=6 elements): "
                              "an endless loop?"), message
    assert "--- where rank 2 was ---" in message and "in rs_endless_on_rank_2" in message
    assert "torch/distributed" not in message  # the waiting ranks are not blamed


def test_the_unfinished_stub_is_reported_as_itself():
    with pytest.raises(NotImplementedError, match="^Exercise 2a: one round of the reduce-scatter"):
        check_reduce_scatter_phase(rs_stub)
    with pytest.raises(NotImplementedError, match="^Exercise 2a: rs_bare_not_implemented is not written yet"):
        check_reduce_scatter_phase(rs_bare_not_implemented)


# --------------------------------------------------------------------------------------------
# Known-wrong all-gathers
# --------------------------------------------------------------------------------------------

def ag_off_by_one(chunks, rank, world_size, exchange):  # the reduce-scatter's indices
    for j in range(world_size - 1):
        exchange(chunks[(rank - j) % world_size], (rank + 1) % world_size, chunks[(rank - j - 1) % world_size],
                 (rank - 1) % world_size)


def ag_to_the_left(chunks, rank, world_size, exchange):
    for j in range(world_size - 1):
        exchange(chunks[(rank + 1 - j) % world_size], (rank - 1) % world_size, chunks[(rank - j) % world_size],
                 (rank + 1) % world_size)


def ag_adds(chunks, rank, world_size, exchange):
    for j in range(world_size - 1):
        received = torch.empty_like(chunks[(rank - j) % world_size])
        exchange(chunks[(rank + 1 - j) % world_size], (rank + 1) % world_size, received, (rank - 1) % world_size)
        chunks[(rank - j) % world_size] += received


def ag_never_stores(chunks, rank, world_size, exchange):
    for j in range(world_size - 1):
        received = torch.empty_like(chunks[(rank - j) % world_size])
        exchange(chunks[(rank + 1 - j) % world_size], (rank + 1) % world_size, received, (rank - 1) % world_size)


def ag_receives_into_the_wrong_chunk(chunks, rank, world_size, exchange):
    for j in range(world_size - 1):
        exchange(chunks[(rank + 1 - j) % world_size], (rank + 1) % world_size, chunks[(rank - j + 1) % world_size],
                 (rank - 1) % world_size)


def ag_stub(chunks, rank, world_size, exchange):
    for j in range(world_size - 1):
        raise NotImplementedError("Exercise 2b: one round of the all-gather; see the instructions above")


@pytest.mark.parametrize("wrong,expected", [
    (ag_off_by_one, [f"ag_off_by_one is wrong: {CASE}, all-gather round 0: rank 0 sent chunk 0, expected chunk 1 "
                     "(in round j rank i sends chunk (i+1-j) mod N)", "off by -1"]),
    (ag_to_the_left, [f"{CASE}, all-gather round 0: rank 0 sent to rank 2, expected rank 1",
                      "Every rank sent to its left neighbour"]),
    (ag_adds, [f"{CASE}, after all-gather round 0: rank 0's chunk 0 holds the contributions of ranks "
               "{0: 2, 1: 1, 2: 1} (rank 0 counted twice), expected {0, 1, 2}", "add instead of overwrite",
               "receive straight into chunks[0]"]),
    (ag_never_stores, [f"{CASE}, after all-gather round 0: rank 0's chunk 0 holds the contributions of ranks {{0}} "
                       "(ranks 1, 2 missing), expected {0, 1, 2}", "but its chunk 0 did not change"]),
    (ag_receives_into_the_wrong_chunk, [f"{CASE}, all-gather round 0: rank 0 received into its chunk 1, but the "
                                        "chunk arriving from rank 2 is chunk 0 (in round j rank i receives chunk "
                                        "(i-j) mod N)"]),
])
def test_wrong_all_gather_is_named(wrong, expected):
    assert_rejected(check_all_gather_phase, wrong, expected=expected)


def test_all_gather_stub_and_nothing():
    with pytest.raises(NotImplementedError, match="^Exercise 2b: one round of the all-gather"):
        check_all_gather_phase(ag_stub)
    with pytest.raises(CheckFailed, match="returned without calling exchange. The all-gather takes N-1 = 2 rounds"):
        check_all_gather_phase(lambda chunks, rank, world_size, exchange: None)


# --------------------------------------------------------------------------------------------
# Both phases inside ring_all_reduce
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rs,ag,expected", [
    (rs_adds_by_hand, all_gather_phase, ["N=3 ranks, x of shape (4, 3), op='max': rank 0, element [0, 0]: expected",
                                         "does your reduce_scatter_phase add by itself instead of calling combine?"]),
    (reduce_scatter_phase, ag_adds, ["N=3 ranks, x of shape (12,), op='sum': rank 0, element [0]: expected",
                                     "(what dist.all_reduce gives)", "check_all_gather_phase say which round"]),
])
def test_ring_all_reduce_check_rejects_wrong_phases(rs, ag, expected):
    assert_rejected(check_ring_all_reduce, rs, ag, expected=expected)


def test_ring_all_reduce_check_reports_a_stub_as_itself():
    with pytest.raises(NotImplementedError, match="^Exercise 2b: one round of the all-gather"):
        check_ring_all_reduce(reduce_scatter_phase, ag_stub)


# --------------------------------------------------------------------------------------------
# The notebook's demo cell: a trace of ring_all_reduce is compared with the simulation, element by element
# --------------------------------------------------------------------------------------------

def _traced_run(numel, all_gather):
    import torch.distributed as dist
    from labkit.collectives import provenance_input, ring_all_reduce
    x = provenance_input(dist.get_rank(), dist.get_world_size(), numel)
    trace = []
    ring_all_reduce(x, trace=trace, reduce_scatter=reduce_scatter_phase, all_gather=all_gather)
    return trace


def test_a_right_trace_is_the_simulation(capsys):
    from labkit import launch
    from labkit.checks.ex02 import compare_with_simulation
    compare_with_simulation(launch(_traced_run, 3, all_gather_phase, world_size=3))
    assert capsys.readouterr().out == "every round is the simulation above\n"


@pytest.mark.parametrize("wrong,expected", [
    (ag_adds, ["all-gather round 0: rank 0's chunk 0 (element 0) holds the contributions of ranks {0: 2, 1: 1, 2: 1} "
               "(rank 0 counted twice); the simulation above has {0, 1, 2}", "add instead of overwrite"]),
    (ag_never_stores, ["all-gather round 0: rank 0's chunk 0 (element 0) holds the contributions of ranks {0} (ranks "
                       "1, 2 missing); the simulation above has {0, 1, 2}"]),
    (ag_off_by_one, ["all-gather round 0: rank 0 sent chunk 0 to rank 1; the simulation sends chunk 1 to rank 1"]),
])
def test_a_wrong_all_gather_is_never_reported_as_the_simulation(wrong, expected, capsys):
    """The hole of the demo cell: a set of ranks hid "counted twice", so an adding all-gather printed the ✓ text."""
    from labkit import launch
    from labkit.checks.ex02 import compare_with_simulation
    traces = launch(_traced_run, 3, wrong, world_size=3)
    with pytest.raises(CheckFailed) as info:
        compare_with_simulation(traces)
    for text in expected:
        assert text in str(info.value), str(info.value)
    assert "every round is the simulation above" not in capsys.readouterr().out


def test_a_trace_with_rounds_missing_is_rejected():
    from labkit.checks.ex02 import compare_with_simulation
    with pytest.raises(CheckFailed, match=r"rank 0 recorded 0 rounds, but the ring takes 2\(N-1\) = 4 rounds"):
        compare_with_simulation([[], [], []])
