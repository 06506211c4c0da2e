"""The checkers of exercise 2 accept correct phases (labkit's and other correct
ways of writing them) and reject each known-wrong implementation with a message that names the mistake,
and N, M, the round, the rank and the chunk. A wrong version stops at the first world size (3), in one
launch; the correct ones run on every default world size."""

import pytest
from notebook_code import code_cells
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


# --------------------------------------------------------------------------------------------
# 2c: the ring to the left (a design task), checked by simulation, then run as half of the bidirectional ring
# --------------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from labkit import ring  # noqa: E402
from labkit.checks.ex02 import LEFT_RING_MISTAKES, _run_bidirectional, check_left_ring_rounds  # noqa: E402
from labkit.checks.harness import literal_parts  # noqa: E402
from labkit.ring import ALL_GATHER, REDUCE_SCATTER, Round, Transfer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _solution_left_ring_rounds():
    source = next(c for c in code_cells(ROOT / "solutions" / "02_ring_allreduce_exercise.ipynb")
                  if "def left_ring_rounds" in c)
    namespace = {"__name__": "__main__", "Round": Round, "Transfer": Transfer}
    exec(compile(source, "2c", "exec"), namespace)
    return namespace["left_ring_rounds"]


def _named(make):
    """``make`` under the name a student gives the function (the messages start with it)."""
    def left_ring_rounds(world_size):
        return make(world_size)
    return left_ring_rounds


def labkits(n):
    return ring.all_reduce_rounds(n, direction=-1)


def test_the_solution_passes_simulated_and_run_as_the_bidirectional_ring(capsys):
    check_left_ring_rounds(_solution_left_ring_rounds())
    assert capsys.readouterr().out == (
        "✓ left_ring_rounds is correct on N = 1, 2, 3, 4, 5, 6, 7, 8: every rank sends only to its left neighbour, "
        "and labkit.ring.simulate ends with every chunk complete on every rank, no rank counted twice; run for real as "
        "the left-going half of the bidirectional ring on N = 1, 2, 3, 4, 5 (labkit's ring to the right carries the "
        "other half), it matches dist.all_reduce (M = 4N+3 and N+1, and a (3, 5) tensor with op='max')\n")


@pytest.mark.parametrize("make", [
    labkits,
    # every chunk renumbered by one: rank i completes chunk i (torch's convention), as correct
    lambda n: ring.reduce_scatter_rounds(n, shift=-1, direction=-1) + ring.all_gather_rounds(n, shift=0, direction=-1),
    lambda n: [Round(r.phase, r.index, list(r.transfers)) for r in labkits(n)],  # transfers as a list
], ids=["labkit", "renumbered", "list-of-transfers"])
def test_any_correct_left_ring_passes(make, capsys):
    check_left_ring_rounds(_named(make), run_sizes=(3, 2))
    assert capsys.readouterr().out.startswith("✓ left_ring_rounds is correct on N = 1, 2, 3, 4, 5, 6, 7, 8")


LEFT_EXPECTED = {
    "the ring of 2a and 2b unchanged": [
        "left_ring_rounds(3): reduce-scatter round 0 (item 0): rank 0 sends to rank 1, expected its left neighbour, "
        "rank 2 ((i-1) mod N). Every rank sends to its right neighbour"],
    "the sign of j flipped": [
        "left_ring_rounds(3): after the reduce-scatter's N-1 = 2 rounds no rank holds chunk 0 complete: the most is rank "
        "0's, {0, 1} (rank 2 missing), expected {0, 1, 2} on one rank.",
        "In reduce-scatter round 1 rank 0 sends chunk 2, but the chunk it received in round 0 (from rank 1) is chunk 1"],
    "the all-gather starts one chunk off": [
        "left_ring_rounds(3): all-gather round 0: rank 0 sends its chunk 0 to rank 2, but that copy is incomplete, {0} "
        "(ranks 1, 2 missing), and rank 2 overwrites its own copy with it. After the reduce-scatter rank 0 holds chunk 2 "
        "complete. After all 4 rounds rank 0's chunk 0 holds {0} (ranks 1, 2 missing), expected {0, 1, 2}."],
    "2b's +1 kept in the all-gather": [
        "all-gather round 0: rank 0 sends its chunk 1 to rank 2, but that copy is incomplete, {0, 1} (rank 2 missing)",
        "After all 4 rounds rank 0's chunk 0 holds {0, 2} (rank 1 missing), expected {0, 1, 2}"],
    "N-2 rounds per phase": [
        "left_ring_rounds(3): 1 reduce-scatter round and 1 all-gather round; the all-reduce takes N-1 = 2 of each, "
        "2(N-1) = 4 rounds in all. After your 2 rounds rank 0's chunk 0 holds {1} (ranks 0, 2 missing), expected "
        "{0, 1, 2}."],
    "right only for powers of two": [
        "left_ring_rounds(3): reduce-scatter round 0 (item 0): rank 2 sends to rank 0, expected its left neighbour, "
        "rank 1", "(Your rounds are right for N = 2, 4 and 8, wrong for N = 3, 5, 6 and 7.)"],
}


@pytest.mark.parametrize("mistake", LEFT_RING_MISTAKES, ids=lambda m: m.name)
def test_every_known_left_ring_mistake_is_named(mistake):
    with pytest.raises(CheckFailed) as info:
        check_left_ring_rounds(_named(mistake.variant))
    message = str(info.value)
    assert message.startswith("left_ring_rounds is wrong: left_ring_rounds(3): "), message
    for text in literal_parts(mistake.says) + LEFT_EXPECTED[mistake.name]:
        assert text in message, message
    for other in LEFT_RING_MISTAKES:  # its own sentence, no other's
        if other is not mistake:
            assert literal_parts(other.says)[-1] not in message, (other.name, message)


def test_every_known_left_ring_mistake_is_a_small_change_of_labkits_rounds():
    """Each wrong version is rounds of labkit's form that differ from labkit's answer on N = 3."""
    for mistake in LEFT_RING_MISTAKES:
        rounds = mistake.variant(3)
        assert rounds != labkits(3) and all(isinstance(r, Round) for r in rounds), mistake.name


def _rs_left(n):
    return ring.reduce_scatter_rounds(n, direction=-1)


def left_same_chunk_every_round(n):  # the reduce-scatter forgets j
    return [Round(REDUCE_SCATTER, j, tuple(Transfer(i, (i - 1) % n, i) for i in range(n))) for j in range(n - 1)] \
        + ring.all_gather_rounds(n, direction=-1)


def left_two_ranks_start_chunk_0(n):
    return [Round(REDUCE_SCATTER, j, tuple(Transfer(i, (i - 1) % n, (j if i < 2 else i + j) % n) for i in range(n)))
            for j in range(n - 1)] + ring.all_gather_rounds(n, direction=-1)


def left_all_gather_never_moves_on(n):  # sends its own complete chunk in every round
    return _rs_left(n) + [Round(ALL_GATHER, j, tuple(Transfer(i, (i - 1) % n, (i - 1) % n) for i in range(n)))
                          for j in range(n - 1)]


def left_numbered_on(n):
    return [Round(r.phase, k, r.transfers) for k, r in enumerate(labkits(n))]


def left_phases_swapped(n):
    rounds = labkits(n)
    return rounds[n - 1:] + rounds[:n - 1]


def left_by_receiver(n):
    return [Round(r.phase, r.index, tuple(sorted(r.transfers, key=lambda t: t.receiver))) for r in labkits(n)]


def left_no_mod(n):
    return [Round(r.phase, r.index, tuple(Transfer(i, (i - 1) % n, i + r.index - (r.phase == ALL_GATHER))
                                          for i in range(n))) for r in labkits(n)]


@pytest.mark.parametrize("make,expected", [
    (left_same_chunk_every_round, [
        "left_ring_rounds(3): reduce-scatter round 1: rank 0 sends chunk 0, which holds {0}, to rank 2, whose chunk 0 "
        "holds {0, 2} already: adding it counts rank 0 twice."]),
    (left_two_ranks_start_chunk_0, [
        "no rank holds chunk 1 complete", "In reduce-scatter round 0 ranks 0 and 1 both send chunk 0, and no rank sends "
        "chunk 1: each chunk starts its trip round the ring on one rank."]),
    (left_all_gather_never_moves_on, [
        "left_ring_rounds(3): after all 4 rounds rank 0's chunk 1 holds {0, 1} (rank 2 missing), expected {0, 1, 2}. "
        "In all-gather round 1 rank 0 sends chunk 2 to rank 2, which holds it complete already: that message is "
        "wasted."]),
    (left_numbered_on, ["item 2 is all-gather round 2, expected all-gather round 0"]),
    (left_phases_swapped, ["item 2 is a reduce-scatter round after an all-gather round"]),
    (left_by_receiver, ["item 0 (reduce-scatter round 0): transfers[0] is rank 1's; list them by sender"]),
    (left_no_mod, ["item 1 (reduce-scatter round 1): rank 2 sends chunk 3, but there are N = 3 (chunks 0 .. 2): take "
                   "the index mod N."]),
    (lambda n: None, ["left_ring_rounds(3) returned None: return a list of labkit.ring.Round, the 2(N-1) = 4 rounds"]),
    (lambda n: (r for r in labkits(n)), ["left_ring_rounds(3) returned a generator: return a list"]),
    (lambda n: [(r.phase, r.index, r.transfers) for r in labkits(n)],
     ["item 0 of your list is a tuple of 3 items, not a labkit.ring.Round"]),
])
def test_other_wrong_left_rings_are_named(make, expected):
    with pytest.raises(CheckFailed) as info:
        check_left_ring_rounds(_named(make), run_sizes=())
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_the_real_run_names_a_wrong_element_in_the_half_of_the_left_ring():
    """Rounds that pass the simulation always sum right; the real run's own diagnosis, on rounds that do not."""
    with pytest.raises(CheckFailed) as info:
        _run_bidirectional("left_ring_rounds", 3, LEFT_RING_MISTAKES[1].variant(3), timeout=10)
    message = str(info.value)
    assert message.startswith("left_ring_rounds is wrong: run for real as the left-going half of the bidirectional "
                              "ring (labkit.collectives.bidirectional_ring_all_reduce) on N=3 ranks, x of shape "
                              "(15,), op='sum': rank 0, element [8], in the second half (elements 8 .. 14), which "
                              "your rounds carry: expected"), message


def test_the_left_ring_stub_is_reported_as_itself():
    def left_ring_rounds(world_size):
        raise NotImplementedError("Exercise 2c: the 2(N-1) rounds of the ring to the left; see the instructions above")
    with pytest.raises(NotImplementedError, match="^Exercise 2c: the 2"):
        check_left_ring_rounds(left_ring_rounds)

    def bare(world_size):
        raise NotImplementedError
    with pytest.raises(NotImplementedError, match="^Exercise 2c: bare is not written yet"):
        check_left_ring_rounds(bare)


def test_labkits_left_ring_is_the_mirror_and_the_bidirectional_ring_halves_each_link():
    for n in range(1, 9):
        mirror = [Round(r.phase, r.index, tuple(Transfer(i, (-t.receiver) % n, (-t.chunk) % n)
                                                for i, t in ((i, r.sent_by((-i) % n)) for i in range(n))))
                  for r in ring.all_reduce_rounds(n)]
        assert labkits(n) == mirror  # rank i <-> -i, chunk c <-> -c
        for m in range(0, 30):
            both = ring.bidirectional_elements_sent(m, n)
            assert sum(r + l for r, l in both) == 2 * (n - 1) * m  # every chunk moves 2(N-1) times
            if m % (2 * n) == 0:
                assert both == [((n - 1) * m // n, (n - 1) * m // n)] * n  # half the one-way ring, each way


def test_bidirectional_ring_all_reduce_with_labkits_own_left_ring_matches_dist_all_reduce():
    """left_rounds=None: labkit's ring to the left (the worker of the check, on 2 and 3 ranks, uneven chunks)."""
    for world_size in (3, 2):
        _run_bidirectional("bidirectional_ring_all_reduce", world_size, None, timeout=10)  # raises on a difference
